"""Encoder: config validation, block plan, sharing, parameter counts, aux loss, padding."""

from __future__ import annotations

import pytest
import torch

import widenet
from widenet.layers.drop_path import drop_path
from widenet.layers.moe import MoE, MoEConfig
from widenet.models.encoder import Encoder, EncoderConfig

SMALL = {"dim": 16, "depth": 4, "num_heads": 2, "mlp_dim": 24, "expert_dim": 20, "num_experts": 4, "top_k": 2}
WIDENET = {"moe_blocks": "all", "share_attention": True, "share_ffn": True, "share_norms": False}
VIT = {"moe_blocks": "none", "share_attention": False, "share_ffn": False, "share_norms": False}
ALBERT = {"moe_blocks": "none", "share_attention": True, "share_ffn": True, "share_norms": True}
VIT_MOE = {"moe_blocks": "last:2", "share_attention": False, "share_ffn": False, "share_norms": False}


def _encoder(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = EncoderConfig.from_dict({**SMALL, "noise_std": 0.0, **kw})
    enc = Encoder(cfg).to(dtype)
    # Random norm affine parameters: every block's norms differ, as after training.
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return enc


# ----------------------------------------------------------------------------
# Config validation and block ids
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"dim": 30, "num_heads": 4},
    {"moe_blocks": "last:0"},
    {"moe_blocks": "last:99", "depth": 6},
    {"moe_blocks": "last:7", "depth": 6},
    {"moe_blocks": "foo"},
    {"moe_blocks": "every:0"},
    {"moe_blocks": "every"},
    {"moe_blocks": "last:-1"},
    {"moe_blocks": "All"},
    {"moe_blocks": "all", "top_k": 5, "num_experts": 4},
    {"moe_blocks": "last:2", "top_k": 3, "num_experts": 2},
    {"depth": 0},
    {"dim": 0},
    {"num_heads": 0},
    {"capacity_factor": 0.0},
    {"dropout": 1.0},
    {"expert_dim": 0},
])
def test_config_errors(kwargs):
    with pytest.raises(ValueError):
        EncoderConfig.from_dict(kwargs)


def test_moe_settings_are_validated_even_without_moe_blocks():
    """The MoE settings are one MoEConfig, validated when built, whatever blocks use it."""
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        EncoderConfig.from_dict(dict(moe_blocks="none", top_k=5, num_experts=4))
    with pytest.raises(ValueError, match="capacity_factor must be a finite number, got nan"):
        EncoderConfig.from_dict(dict(capacity_factor=float("nan")))
    with pytest.raises(ValueError, match="dropless must be True or False, got 'false'"):
        EncoderConfig.from_dict(dict(dropless="false"))


def test_flat_and_nested_moe_settings_give_one_config():
    """Checkpoints before MoEConfig held the MoE settings among the encoder's own keys."""
    flat = EncoderConfig.from_dict(dict(dim=16, num_heads=2, num_experts=8, top_k=1, capacity_factor=2.0))
    nested = EncoderConfig.from_dict(dict(dim=16, num_heads=2, moe=dict(num_experts=8, top_k=1, capacity_factor=2.0)))
    assert flat == nested and flat.moe.num_experts == 8
    assert flat.to_dict()["moe"]["top_k"] == 1 and "top_k" not in flat.to_dict()
    assert flat.replace(top_k=2, depth=3).moe.top_k == 2


def test_a_depth_no_machine_can_build_is_refused():
    """depth=10**9 was accepted and building it got the process killed for memory."""
    with pytest.raises(ValueError, match="depth must be at most 10,000, got 1,000,000,000"):
        widenet.create_model("widenet_tiny", depth=10**9)
    assert EncoderConfig(dim=16, depth=10_000, num_heads=2).depth == 10_000


def test_named_moe_settings_apply_on_top_of_a_given_moe_config():
    """create_model(..., moe=MoEConfig(num_experts=8), top_k=1) built the preset's 4 experts."""
    model = widenet.create_model("widenet_tiny", moe=MoEConfig(num_experts=8), top_k=1)
    assert (model.cfg.encoder.moe.num_experts, model.cfg.encoder.moe.top_k) == (8, 1)
    assert [m.router.weight.shape[0] for m in model.modules() if isinstance(m, MoE)] == [8]
    assert widenet.create_model("widenet_tiny", moe=dict(num_experts=8), top_k=1).cfg.encoder.moe.num_experts == 8
    with pytest.raises(ValueError, match="moe: the model has no MoE layer"):  # as top_k=1 there is refused
        widenet.create_model("vit_tiny", moe=MoEConfig(num_experts=8))


@pytest.mark.parametrize("spec,depth,expected", [
    ("none", 6, []),
    ("all", 6, [0, 1, 2, 3, 4, 5]),
    ("last:2", 6, [4, 5]),
    ("last:6", 6, [0, 1, 2, 3, 4, 5]),
    ("every:2", 6, [1, 3, 5]),
    ("every:3", 7, [2, 5]),
    ("every:1", 3, [0, 1, 2]),
    ("every:4", 4, [3]),
])
def test_moe_block_ids(spec, depth, expected):
    cfg = EncoderConfig.from_dict(dict(dim=16, depth=depth, num_heads=2, moe_blocks=spec))
    assert cfg.moe_block_ids == expected
    assert cfg.uses_moe == (spec != "none")


def test_an_unknown_moe_setting_in_a_moe_dict_is_named():
    """create_model(..., moe={"bogus": 1}) raised MoEConfig's own TypeError."""
    with pytest.raises(ValueError, match=r"unknown MoE setting\(s\) 'bogus' in moe; known: num_experts, top_k"):
        EncoderConfig(dim=16, depth=2, num_heads=2, moe={"bogus": 1, "top_k": 1})
    assert EncoderConfig(dim=16, depth=2, num_heads=2, moe={"top_k": 1}).moe.top_k == 1


def test_every_n_beyond_the_depth_is_refused_not_built_dense():
    """every:7 of 6 blocks picks none: it used to build a model without any MoE layer, silently."""
    from widenet.layers.moe import MoE

    with pytest.raises(ValueError, match=r"moe_blocks='every:7' picks no block of depth=6"):
        EncoderConfig(dim=16, depth=6, num_heads=2, moe_blocks="every:7")
    with pytest.raises(ValueError, match=r"moe_blocks='every:3' picks no block of depth=2"):
        EncoderConfig.from_dict(dict(dim=16, depth=3, num_heads=2, moe_blocks="every:3")).replace(depth=2)
    # A saved config (a dict: a checkpoint's or an export's) from before the refusal still loads, as the
    # dense model it built, with a note.
    with pytest.warns(UserWarning, match=r"moe_blocks='every:7' picks no block of depth=6; read as 'none'"):
        saved = EncoderConfig.from_dict(dict(dim=16, depth=6, num_heads=2, moe_blocks="every:7"))
    assert saved.moe_blocks == "none" and not any(isinstance(m, MoE) for m in Encoder(saved).modules())
    for depth, spec in ((6, "every:6"), (1, "every:1")):  # the largest N allowed: the last block only
        enc = Encoder(EncoderConfig.from_dict(dict(dim=16, depth=depth, num_heads=2, moe_blocks=spec)))
        assert sum(isinstance(module, MoE) for module in enc.modules()) == 1
        assert enc.cfg.moe_block_ids == [depth - 1]


# ----------------------------------------------------------------------------
# Sharing
# ----------------------------------------------------------------------------
def _prefixes(keys, group):
    return {".".join(k.split(".")[:2]) for k in keys if k.startswith(group + ".")}


def test_widenet_sharing_state_dict():
    enc = _encoder(**WIDENET)
    keys = list(enc.state_dict())
    assert _prefixes(keys, "attention") == {"attention.0"}
    assert _prefixes(keys, "moes") == {"moes.0"}
    assert _prefixes(keys, "mlps") == set()
    assert _prefixes(keys, "norms") == {f"norms.{i}" for i in range(4)}
    # Norms: depth distinct pairs with distinct storage.
    norm_tensors = [p for n, p in enc.named_parameters() if n.startswith("norms.")]
    assert len(norm_tensors) == 4 * 2 * 2
    assert len({p.data_ptr() for p in norm_tensors}) == len(norm_tensors)
    with torch.no_grad():
        enc.norms[0].attn_norm.weight.fill_(3.0)
    assert not torch.equal(enc.norms[1].attn_norm.weight, enc.norms[0].attn_norm.weight)


def test_widenet_preset_state_dict_keys():
    model = widenet.create_model("widenet_tiny")
    depth = model.cfg.encoder.depth
    keys = list(model.state_dict())
    assert {k for k in keys if k.startswith("encoder.attention.")} == {
        k for k in keys if k.startswith("encoder.attention.0.")} != set()
    assert {k for k in keys if k.startswith("encoder.moes.")} == {
        k for k in keys if k.startswith("encoder.moes.0.")} != set()
    assert not any(k.startswith("encoder.mlps.") for k in keys)
    assert {".".join(k.split(".")[:3]) for k in keys if k.startswith("encoder.norms.")} == {
        f"encoder.norms.{i}" for i in range(depth)}
    assert len(model.encoder.attention) == 1 and len(model.encoder.moes) == 1
    assert len(model.encoder.norms) == depth


def test_vit_sharing():
    enc = _encoder(**VIT)
    assert len(enc.attention) == 4 and len(enc.mlps) == 4 and len(enc.norms) == 4 and len(enc.moes) == 0
    ptrs = {enc.attention[i].qkv.weight.data_ptr() for i in range(4)}
    assert len(ptrs) == 4


def test_albert_sharing():
    enc = _encoder(**ALBERT)
    assert len(enc.attention) == 1 and len(enc.mlps) == 1 and len(enc.norms) == 1 and len(enc.moes) == 0
    keys = list(enc.state_dict())
    assert _prefixes(keys, "norms") == {"norms.0"}


def test_vit_moe_layout():
    enc = _encoder(**VIT_MOE)
    assert len(enc.attention) == 4 and len(enc.mlps) == 2 and len(enc.moes) == 2
    assert enc.moes[0].experts.w1.shape == (4, 16, 20)  # expert_dim is the experts' hidden width
    assert enc.mlps[0].fc1.weight.shape == (24, 16)  # mlp_dim for dense blocks


def test_shared_moe_with_every_n_and_shared_dense_mlp():
    enc = _encoder(moe_blocks="every:2", share_attention=True, share_ffn=True)
    assert len(enc.moes) == 1 and len(enc.mlps) == 1 and len(enc.attention) == 1


def _call_tracker(module, calls):
    """Forward hook keeping each call's (input, output tensor) (MoE: .output)."""

    def hook(mod, inputs, output):
        calls.append((inputs[0], output.output if hasattr(output, "output") else output))

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("setting", [WIDENET, ALBERT], ids=["widenet", "albert"])
def test_every_block_contributes_gradient_to_shared_weights(setting):
    """The shared module runs once per block, and the shared weight's gradient is the sum of
    non-zero per-call contributions, one from every block."""
    enc = _encoder(**setting)
    ffn = enc.moes[0] if enc.moes else enc.mlps[0]
    shared = [(enc.attention[0], enc.attention[0].qkv.weight),
              (ffn, ffn.experts.w1 if enc.moes else ffn.fc1.weight)]
    calls = {0: [], 1: []}
    handles = [_call_tracker(m, calls[i]) for i, (m, _) in enumerate(shared)]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = enc(x)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.hidden.shape, generator=gen, dtype=torch.float64)
    loss = (out.hidden * g).sum()
    for i, (_, weight) in enumerate(shared):
        assert len(calls[i]) == 4, "shared module must be called once per block"
        (total,) = torch.autograd.grad(loss, weight, retain_graph=True)
        call_grads = torch.autograd.grad(loss, [y for _, y in calls[i]], retain_graph=True)
        parts = []
        module = shared[i][0]
        for (inp, _), gy in zip(calls[i], call_grads):
            # The direct (partial) contribution of this call: re-run it on its detached input.
            y = module(inp.detach())
            y = y.output if hasattr(y, "output") else y
            (part,) = torch.autograd.grad(y, weight, grad_outputs=gy)
            assert part.abs().sum() > 0, "a block's call contributes no gradient to the shared weight"
            parts.append(part)
        torch.testing.assert_close(sum(parts), total, rtol=1e-8, atol=1e-10)


def test_per_block_norms_each_get_gradient():
    enc = _encoder(**WIDENET)
    out = enc(torch.randn(2, 5, 16, dtype=torch.float64))
    (out.hidden.pow(2).sum() + out.aux_loss).backward()
    for i in range(4):
        for norm in (enc.norms[i].attn_norm, enc.norms[i].ffn_norm):
            assert norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0
    assert enc.moes[0].router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# Parameter counts in closed form
# ----------------------------------------------------------------------------
def _closed_form(image, patch, chans, classes, rep, dim, depth, heads, mlp, expert, experts,
                 moe_blocks, share_attention, share_ffn, share_norms):
    attn = 3 * dim * dim + 3 * dim + dim * dim + dim
    norms = 2 * 2 * dim
    dense = dim * mlp + mlp + mlp * dim + dim
    moe = experts * dim + experts * (dim * expert + expert + expert * dim + dim)
    n_moe = len(moe_blocks)
    n_dense = depth - n_moe
    encoder = ((1 if share_attention else depth) * attn
               + (1 if share_norms else depth) * norms
               + (min(n_dense, 1) if share_ffn else n_dense) * dense
               + (min(n_moe, 1) if share_ffn else n_moe) * moe
               + 2 * dim)
    patches = (image // patch) ** 2
    stem = chans * patch * patch * dim + dim + dim + (patches + 1) * dim  # conv, cls, pos
    head = (dim * rep + rep if rep else 0) + (rep or dim) * classes + classes
    return stem + encoder + head


@pytest.mark.parametrize("name,moe_ids,sharing", [
    ("widenet_tiny", list(range(6)), (True, True, False)),
    ("vit_tiny", [], (False, False, False)),
    ("albert_tiny", [], (True, True, True)),
    ("vit_moe_tiny", [4, 5], (False, False, False)),
])
@pytest.mark.parametrize("rep", [None, 48])
def test_parameter_count_closed_form(name, moe_ids, sharing, rep):
    over = {"dim": 32, "depth": 6, "num_heads": 2, "mlp_dim": 40, "expert_dim": 24, "num_classes": 7}
    if rep:
        over["representation_size"] = rep
    model = widenet.create_model(name, **over)
    expected = _closed_form(28, 4, 1, 7, rep, 32, 6, 2, 40, 24, 4, moe_ids, *sharing)
    assert widenet.count_parameters(model) == expected


def test_encoder_parameter_count_widenet_vs_vit():
    d, depth, h, e = 16, 4, 20, 4
    wide = _encoder(**WIDENET)
    vit = _encoder(**VIT)
    attn = 4 * d * d + 4 * d
    assert widenet.count_parameters(wide) == attn + depth * 4 * d + e * d + e * (2 * d * h + h + d) + 2 * d
    assert widenet.count_parameters(vit) == depth * (attn + 4 * d + 2 * d * 24 + 24 + d) + 2 * d


# ----------------------------------------------------------------------------
# Forward: hidden states, aux loss, padding
# ----------------------------------------------------------------------------
def test_hidden_states_returned_when_asked():
    enc = _encoder(**WIDENET)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plain = enc(x)
    assert plain.hidden_states is None
    out = enc(x, return_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert all(h.shape == (2, 5, 16) for h in out.hidden_states)
    torch.testing.assert_close(enc.final_norm(out.hidden_states[-1]), out.hidden)
    torch.testing.assert_close(out.hidden, plain.hidden, rtol=0, atol=0)
    # Blocks really differ: consecutive states are not equal.
    for a, b in zip(out.hidden_states, out.hidden_states[1:]):
        assert not torch.allclose(a, b)


def _manual_forward(enc, x, padding_mask=None):
    """The encoder loop re-written from the spec with the encoder's own submodules;
    module indices derived from the config, not from enc.plan."""
    cfg = enc.cfg
    moe_ids = set(cfg.moe_block_ids)
    aux = torch.zeros((), dtype=torch.float64)
    per_block, states = [], []
    n_moe = n_dense = 0
    for i in range(cfg.depth):
        attn = enc.attention[0 if cfg.share_attention else i]
        norms = enc.norms[0 if cfg.share_norms else i]
        x = x + attn(norms.attn_norm(x), padding_mask)
        h = norms.ffn_norm(x)
        if i in moe_ids:
            moe = enc.moes[0 if cfg.share_ffn else n_moe]
            n_moe += 1
            res = moe(h, padding_mask)
            x = x + res.output
            aux = aux + res.aux_loss
            per_block.append(res.aux_loss)
        else:
            mlp = enc.mlps[0 if cfg.share_ffn else n_dense]
            n_dense += 1
            x = x + mlp(h)
            per_block.append(None)
        states.append(x)
    return enc.final_norm(x), aux, per_block, states


@pytest.mark.parametrize("setting", [WIDENET, VIT_MOE, ALBERT, {"moe_blocks": "every:2", "share_attention": True,
                                                                    "share_ffn": False}],
                         ids=["widenet", "vit_moe", "albert", "every2"])
def test_aux_loss_is_sum_of_block_losses(setting):
    enc = _encoder(capacity_factor=0.8, z_loss_weight=0.05, **setting)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out = enc(x, return_hidden_states=True)
    hidden, aux, per_block, states = _manual_forward(enc, x)
    torch.testing.assert_close(out.hidden, hidden, rtol=1e-10, atol=1e-12)
    for a, b in zip(out.hidden_states, states):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-6, atol=1e-8)
    assert len(out.routing) == enc.cfg.depth
    for stats, block_aux in zip(out.routing, per_block):
        assert (stats is None) == (block_aux is None)
        if stats is not None:
            expected = stats.balance_loss + 0.05 * stats.z_loss
            torch.testing.assert_close(expected.double(), block_aux.detach().double(), rtol=1e-6, atol=1e-8)
    if not enc.cfg.uses_moe:
        assert out.aux_loss.item() == 0.0


def test_widenet_aux_loss_has_depth_terms():
    """With a uniform (zero) router each MoE call has balance loss exactly 1: aux = depth."""
    enc = _encoder(**WIDENET)
    with torch.no_grad():
        enc.moes[0].router.weight.zero_()
    out = enc(torch.randn(2, 3, 16, dtype=torch.float64))
    assert out.aux_loss.item() == pytest.approx(4.0)


@pytest.mark.parametrize("setting", [WIDENET, VIT, VIT_MOE], ids=["widenet", "vit", "vit_moe"])
def test_padding_does_not_change_real_tokens(setting):
    enc = _encoder(dropless=True, **setting).eval()
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 7, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(1, 4, 16, generator=gen, dtype=torch.float64)
    batch = torch.cat([a, torch.cat([b, torch.randn(1, 3, 16, generator=gen, dtype=torch.float64) * 5], 1)])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    padded = enc(batch, padding_mask=mask)
    alone_a, alone_b = enc(a), enc(b)
    torch.testing.assert_close(padded.hidden[0], alone_a.hidden[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(padded.hidden[1, :4], alone_b.hidden[0], rtol=1e-9, atol=1e-10)
    assert torch.isfinite(padded.hidden).all()
    # Changing the padding tokens' content changes nothing real.
    batch2 = batch.clone()
    batch2[1, 4:] = -batch2[1, 4:] * 3
    torch.testing.assert_close(enc(batch2, padding_mask=mask).hidden[~mask], padded.hidden[~mask],
                               rtol=1e-9, atol=1e-10)


def test_padding_aux_loss_equals_unpadded_call():
    """Same real tokens, with and without padding tokens: identical aux loss (batch of one sequence)."""
    enc = _encoder(capacity_factor=0.7, **WIDENET)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(1, 4, 16, dtype=torch.float64)], 1)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 5:] = True
    p, u = enc(padded, padding_mask=mask), enc(x)
    torch.testing.assert_close(p.aux_loss, u.aux_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(p.hidden[0, :5], u.hidden[0], rtol=1e-9, atol=1e-10)


def test_encoder_input_errors():
    enc = _encoder(**WIDENET)
    with pytest.raises(ValueError):
        enc(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(ValueError):
        enc(torch.randn(2, 5, 15, dtype=torch.float64))


def test_encoder_float32_default_runs_and_backprops():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_dict(dict(**SMALL, **WIDENET)))
    out = enc(torch.randn(2, 5, 16))
    (out.hidden.square().mean() + 0.01 * out.aux_loss).backward()
    assert out.hidden.dtype == torch.float32
    for n, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_activation_checkpointing_gives_the_same_forward_and_gradients(norm_position):
    """Recomputing blocks in backward replays the same dropout and drop-path masks and router noise."""
    cfg = EncoderConfig.from_dict(dict(dim=16, depth=3, num_heads=2, mlp_dim=32, num_experts=4, moe_blocks="all",
                        share_attention=True, share_ffn=True, dropout=0.2, attn_dropout=0.1, noise_std=0.5,
                        drop_path=0.3, norm_position=norm_position))
    torch.manual_seed(0)
    plain = Encoder(cfg).double()
    recomputing = Encoder(EncoderConfig.from_dict({**cfg.to_dict(), "activation_checkpointing": True})).double()
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    results, calls = [], []
    for model in (plain, recomputing):
        torch.manual_seed(1)
        runs = [0]
        model.moes[0].register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))  # the shared MoE
        out = model(x)
        (out.hidden.square().sum() + out.aux_loss).backward()
        results.append((out.hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        calls.append(runs[0])
    assert calls == [3, 6]  # once per block, and again in backward when the blocks are recomputed
    (h0, g0), (h1, g1) = results
    assert torch.equal(h0, h1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-12), name


# ----------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------
def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    branch = torch.randn(2000, 3, 4)
    out = drop_path(branch, 0.25, training=True)
    kept = out.flatten(1).ne(0).any(1)  # (B,)
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert torch.allclose(out[kept], branch[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.04  # binomial sd 0.01
    assert drop_path(branch, 0.25, training=False) is branch
    assert drop_path(branch, 0.0, training=True) is branch


def test_drop_path_rates_rise_linearly_over_blocks():
    enc = Encoder(EncoderConfig.from_dict({**SMALL, "depth": 4, "drop_path": 0.3}))
    assert enc.drop_rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert Encoder(EncoderConfig.from_dict({**SMALL, "depth": 1, "drop_path": 0.3})).drop_rates == [0.3]
    with pytest.raises(ValueError, match="drop_path"):
        EncoderConfig.from_dict(dict(**SMALL, drop_path=1.0))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_drop_path_output_is_one_of_the_hand_built_branch_choices(norm_position):
    """Depth 2 with rate p: block 0 never drops, block 1 drops its attention and FFN branches
    independently per sample. Each sample must equal one of the four outputs built by hand
    from the modules, and with p = 0.5 all four occur."""
    p, keep = 0.5, 0.5
    enc = _encoder(**{**SMALL, **VIT, "depth": 2, "drop_path": p, "norm_position": norm_position})
    x = torch.randn(64, 5, 16, dtype=torch.float64)
    enc.train()
    with torch.no_grad():
        got = enc(x).hidden
        enc.eval()
        assert torch.allclose(enc(x).hidden, _encoder(**{**SMALL, **VIT, "depth": 2,
                                                          "norm_position": norm_position})(x).hidden)
        (n0, n1), (a0, a1), (m0, m1) = enc.norms, enc.attention, enc.mlps
        if norm_position == "pre":
            h = x + a0(n0.attn_norm(x))
            h = h + m0(n0.ffn_norm(h))
            choices = []
            for ka in (0.0, 1 / keep):
                g = h + ka * a1(n1.attn_norm(h))
                choices += [enc.final_norm(g + kf * m1(n1.ffn_norm(g))) for kf in (0.0, 1 / keep)]
        else:
            h = n0.attn_norm(x + a0(x))
            h = n0.ffn_norm(h + m0(h))
            choices = []
            for ka in (0.0, 1 / keep):
                g = n1.attn_norm(h + ka * a1(h))
                choices += [n1.ffn_norm(g + kf * m1(g)) for kf in (0.0, 1 / keep)]
    seen = set()
    for b in range(len(x)):
        matches = [i for i, c in enumerate(choices) if torch.allclose(got[b], c[b], atol=1e-10)]
        assert len(matches) == 1, b
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}
