"""Text models: post-norm encoder, TextTransformer heads, padding, sharing, presets, load_backbone."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from widenet.cli import main as cli_main
from widenet.models import (
    TextConfig,
    TextOutput,
    TextTransformer,
    count_parameters,
    create_model,
)
from widenet.models.encoder import Encoder, EncoderConfig
from widenet.models.text import SPAN_MASK_VALUE, TextBackbone, load_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_ENC = dict(dim=16, depth=2, num_heads=2, mlp_dim=24, num_experts=4, top_k=2, norm_position="post")
MOE = dict(moe_blocks="all", share_attention=True, share_ffn=True, share_norms=False,
           capacity_factor=8.0, noise_std=0.0)
V, T = 50, 10


def _cfg(task: str = "pretrain", vocab: int = V, **encoder) -> TextConfig:
    return TextConfig(vocab_size=vocab, embedding_size=8, max_positions=16, task=task, num_labels=3,
                      encoder={**SMALL_ENC, **encoder})


def _model(task: str = "pretrain", seed: int = 0, **encoder) -> TextTransformer:
    torch.manual_seed(seed)
    return TextTransformer(_cfg(task, **encoder)).eval()


def _ids(b: int = 3, t: int = T, seed: int = 1) -> torch.Tensor:
    """Random ids avoiding the padding id 0."""
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)


# ----------------------------------------------------------------------------
# Post-norm encoder
# ----------------------------------------------------------------------------
def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _attention(attn, x, pad):
    """Multi-head self-attention by hand: x (B, T, D), pad (B, T) True = padding."""
    b, t, d = x.shape
    h = attn.num_heads
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias  # (B, T, 3D)
    q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in qkv.split(d, dim=-1))  # (B, h, T, hs)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, h, T, T)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return y @ attn.proj.weight.t() + attn.proj.bias


def _mlp(mlp, x):
    return F.gelu(x @ mlp.fc1.weight.t() + mlp.fc1.bias) @ mlp.fc2.weight.t() + mlp.fc2.bias


def test_norm_position_is_validated():
    with pytest.raises(ValueError, match="norm_position must be 'pre' or 'post'"):
        EncoderConfig.from_dict(dict(norm_position="middle"))


def test_post_norm_one_block_matches_hand_computation():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_dict({**SMALL_ENC, "depth": 1})).double()
    _randomize_norms(enc)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    norms, eps = enc.norms[0], enc.cfg.norm_eps
    h = _layer_norm(x + _attention(enc.attention[0], x, pad),
                    norms.attn_norm.weight, norms.attn_norm.bias, eps)
    want = _layer_norm(h + _mlp(enc.mlps[0], h), norms.ffn_norm.weight, norms.ffn_norm.bias, eps)
    out = enc(x, pad)
    torch.testing.assert_close(out.hidden[~pad], want[~pad])
    assert isinstance(enc.final_norm, torch.nn.Identity)


def test_post_norm_moe_blocks_chain_and_add_aux_losses():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_dict({**SMALL_ENC, **MOE})).double().eval()
    _randomize_norms(enc)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    attn, moe = enc.attention[0], enc.moes[0]
    h, aux = x, 0.0
    for norms in enc.norms:  # own norms per block, shared attention and MoE
        h = _layer_norm(h + _attention(attn, h, torch.zeros(2, 6, dtype=torch.bool)),
                        norms.attn_norm.weight, norms.attn_norm.bias, enc.cfg.norm_eps)
        moe_out = moe(h)
        aux = aux + moe_out.aux_loss
        h = _layer_norm(h + moe_out.output, norms.ffn_norm.weight, norms.ffn_norm.bias, enc.cfg.norm_eps)
    out = enc(x, return_hidden_states=True)
    torch.testing.assert_close(out.hidden, h)
    torch.testing.assert_close(out.hidden_states[-1], out.hidden)  # no final norm
    torch.testing.assert_close(out.aux_loss, aux)


def test_post_norm_has_no_final_norm_parameters():
    pre = Encoder(EncoderConfig.from_dict({**SMALL_ENC, "norm_position": "pre"}))
    post = Encoder(EncoderConfig.from_dict(SMALL_ENC))
    assert count_parameters(pre) - count_parameters(post) == 2 * SMALL_ENC["dim"]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"task": "translate"}, "task must be one of"),
    ({"pad_token_id": V}, "pad_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"embedding_size": 0}, "embedding_size"),
    ({"max_positions": -3}, "max_positions"),
    ({"num_labels": 0}, "num_labels"),
    ({"type_vocab_size": 1.5}, "type_vocab_size"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextConfig(**{"vocab_size": V, **kwargs})


def test_config_round_trips_through_dict():
    cfg = _cfg("qa", **MOE)
    again = TextConfig(**cfg.to_dict())
    assert again == cfg and isinstance(again.encoder, EncoderConfig)


# ----------------------------------------------------------------------------
# Shapes and heads
# ----------------------------------------------------------------------------
def test_pretrain_outputs():
    model = _model("pretrain")
    ids = _ids()
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, 2] = masked[2, 5] = masked[2, 7] = True
    out = model(ids, masked_positions=masked, return_hidden_states=True)
    assert isinstance(out, TextOutput)
    assert out.mlm_logits.shape == (3, V) and out.sop_logits.shape == (3, 2)
    assert out.hidden.shape == (3, T, 16) and out.pooled.shape == (3, 16)
    assert len(out.hidden_states) == 2 and out.logits is None and out.start_logits is None
    # rows follow the mask in row-major order
    full = model.mlm_head(out.hidden, model.word_embedding)  # (B, T, V)
    torch.testing.assert_close(out.mlm_logits, torch.stack([full[0, 2], full[2, 5], full[2, 7]]))
    assert model(ids).mlm_logits is None


def test_classify_and_qa_outputs():
    ids = _ids()
    out = _model("classify")(ids)
    assert out.logits.shape == (3, 3) and out.sop_logits is None and out.mlm_logits is None
    ids[1, 6:] = 0  # padding at the end of sequence 1
    out = _model("qa")(ids)
    assert out.start_logits.shape == out.end_logits.shape == (3, T)
    assert torch.all(out.start_logits[1, 6:] == SPAN_MASK_VALUE)
    assert torch.all(out.end_logits[1, 6:] == SPAN_MASK_VALUE)
    assert torch.all(out.start_logits[1, :6] > SPAN_MASK_VALUE / 2)
    assert out.logits is None and out.sop_logits is None


def test_pooled_is_tanh_of_pooler_on_first_token():
    model = _model("classify")
    out = model(_ids())
    pooler = model.backbone.pooler
    torch.testing.assert_close(out.pooled, torch.tanh(out.hidden[:, 0] @ pooler.weight.t() + pooler.bias))


def test_token_types_change_the_output():
    model = _model("classify")
    ids = _ids()
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    assert not torch.allclose(model(ids).hidden, model(ids, token_type_ids=types).hidden)
    torch.testing.assert_close(model(ids).hidden, model(ids, token_type_ids=torch.zeros_like(ids)).hidden)


# ----------------------------------------------------------------------------
# Tied decoder
# ----------------------------------------------------------------------------
def test_mlm_decoder_is_the_word_embedding():
    model = _model("pretrain")
    word = model.backbone.embeddings.word.weight
    assert model.word_embedding is word
    assert not any(p.shape == word.shape for p in model.mlm_head.parameters())  # no copy
    assert [k for k in model.state_dict() if k.endswith("word.weight")] == ["backbone.embeddings.word.weight"]
    ids, masked = _ids(), torch.zeros(3, T, dtype=torch.bool)
    masked[:, 3] = True
    before = model(ids, masked_positions=masked).mlm_logits
    with torch.no_grad():
        word[7] += torch.randn(8)  # editing the embedding edits the decoder
    after = model(ids, masked_positions=masked).mlm_logits
    assert not torch.allclose(before[:, 7], after[:, 7])


def test_word_embedding_gets_gradient_from_the_mlm_head():
    model = _model("pretrain").train()
    ids = torch.randint(1, 20, (2, T))  # ids 20.. never looked up: only the decoder reaches them
    masked = torch.zeros(2, T, dtype=torch.bool)
    masked[:, 1] = True
    out = model(ids, masked_positions=masked)
    F.cross_entropy(out.mlm_logits, torch.tensor([3, 4])).backward()
    grad = model.word_embedding.grad
    assert grad[20:].abs().sum(dim=1).gt(0).all()
    assert model.mlm_head.bias.grad is not None


def test_untied_decoder_is_its_own_table_and_only_inputs_train_the_embedding():
    torch.manual_seed(0)
    cfg = _cfg("pretrain")
    cfg.tie_word_embeddings = False
    model = TextTransformer(cfg).train()
    tied = _model("pretrain")
    assert count_parameters(model) - count_parameters(tied) == V * 8  # one (V, E) table more
    head = model.mlm_head
    assert head.decoder.shape == (V, 8) and 0.01 < head.decoder.std() < 0.03
    ids = torch.randint(1, 20, (2, T))  # ids 20.. never looked up
    masked = torch.zeros(2, T, dtype=torch.bool)
    masked[:, 1] = True
    out = model(ids, masked_positions=masked)
    hidden = model.backbone(ids).hidden[masked]  # (M, D): the logits by hand, from the head's own table
    by_hand = F.layer_norm(F.gelu(hidden @ head.dense.weight.t() + head.dense.bias), (8,), head.norm.weight,
                           head.norm.bias, head.norm.eps) @ head.decoder.t() + head.bias
    torch.testing.assert_close(out.mlm_logits, by_hand)
    F.cross_entropy(out.mlm_logits, torch.tensor([3, 40])).backward()
    assert head.decoder.grad[20:].abs().sum(dim=1).gt(0).all()
    assert model.word_embedding.grad[20:].abs().sum() == 0  # no push from the softmax
    assert model.word_embedding.grad[1:20].abs().sum() > 0
    assert TextConfig(**{k: v for k, v in cfg.to_dict().items() if k != "tie_word_embeddings"}).tie_word_embeddings


def test_init():
    model = _model("pretrain")
    emb = model.backbone.embeddings
    assert torch.all(emb.word.weight[0] == 0)  # padding row
    assert 0.01 < emb.position.weight.std() < 0.03
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.all(p == 0), name
    # Every nn.Linear is Xavier-uniform: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)), std b / sqrt(3) (torch's
    # default, kaiming-uniform with a = sqrt(5), would give b = 1 / sqrt(fan_in): 0.25 against 0.43 at 16 x 16).
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n == "sop_head.proj" for n, _ in linears) and any(n == "backbone.pooler" for n, _ in linears)
    for name, m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound, name
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.2 * bound / math.sqrt(3), name


# ----------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", [{}, MOE], ids=["dense", "moe"])
def test_appended_padding_changes_nothing_at_real_positions(encoder):
    model = _model("pretrain", **encoder)
    ids = _ids()
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, 2] = True
    masked_padded = torch.cat([masked, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    a = model(ids, masked_positions=masked, return_hidden_states=True)
    b = model(padded, masked_positions=masked_padded, return_hidden_states=True)
    torch.testing.assert_close(b.hidden[:, :T], a.hidden)
    for sa, sb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(sb[:, :T], sa)
    for field in ("pooled", "mlm_logits", "sop_logits", "aux_loss"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field))


@pytest.mark.parametrize("encoder", [{"dropless": True}, {"capacity_factor": 8.0}],
                         ids=["dropless", "capacity"])
def test_padding_takes_no_part_in_routing(encoder):
    model = _model("classify", **{**MOE, **encoder}).train()  # train mode: capacity factor in use
    ids = _ids()
    ids[0, 7:] = 0
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    a, b = model(ids), model(padded)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    for ra, rb in zip(a.routing, b.routing):
        torch.testing.assert_close(rb.expert_fraction, ra.expert_fraction)
        torch.testing.assert_close(rb.balance_loss, ra.balance_loss)
        torch.testing.assert_close(rb.dropped_fraction, ra.dropped_fraction)


def test_explicit_padding_mask_overrides_the_pad_id():
    model = _model("classify")
    ids = _ids()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 8:] = True
    a = model(ids, padding_mask=mask)
    changed = ids.clone()
    changed[:, 8:] = 5  # content under an explicit mask does not matter
    b = model(changed, keep_mask=(~mask).int())  # Hugging Face's attention_mask convention, by name
    torch.testing.assert_close(b.hidden[:, :8], a.hidden[:, :8])
    torch.testing.assert_close(b.logits, a.logits)
    c = model(changed, attention_mask=(~mask).float())  # by Hugging Face's own name, as a float mask too
    torch.testing.assert_close(c.logits, a.logits)
    with pytest.raises(ValueError, match="give keep_mask or attention_mask"):
        model(ids, keep_mask=~mask, attention_mask=~mask)
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        model(ids, padding_mask=mask.int())


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: dict(input_ids=_ids(t=17)), "sequence length 17 exceeds max_positions=16"),
    (lambda: dict(input_ids=_ids().index_fill(1, torch.tensor([3]), V)),
     f"input_ids holds id {V}, outside 0..{V - 1}"),
    (lambda: dict(input_ids=-_ids()), "outside 0"),
    (lambda: dict(input_ids=_ids()[0]), "input_ids must have shape"),
    (lambda: dict(input_ids=_ids().float()), "integer"),
    (lambda: dict(input_ids=_ids(), token_type_ids=torch.full((3, T), 2)), "token_type_ids holds id 2"),
    (lambda: dict(input_ids=_ids(), token_type_ids=torch.zeros(3, T - 1, dtype=torch.long)),
     r"token_type_ids shape \(3, 9\) does not match input_ids \(3, 10\)"),
    (lambda: dict(input_ids=_ids(), padding_mask=torch.zeros(2, T, dtype=torch.bool)), "padding_mask shape"),
    (lambda: dict(input_ids=_ids(), masked_positions=torch.zeros(3, T)), "bool mask"),
    (lambda: dict(input_ids=_ids(), masked_positions=torch.zeros(3, 4, dtype=torch.bool)),
     "masked_positions shape"),
])
def test_bad_input_raises_helpful_errors(make, message):
    with pytest.raises(ValueError, match=message):
        _model("pretrain")(**make())


def test_masked_positions_need_a_pretraining_model():
    with pytest.raises(ValueError, match="task='pretrain'"):
        _model("classify")(_ids(), masked_positions=torch.zeros(3, T, dtype=torch.bool))


# ----------------------------------------------------------------------------
# Sharing and presets
# ----------------------------------------------------------------------------
def _counts(model):
    enc = model.backbone.encoder
    return len(enc.attention), len(enc.mlps), len(enc.moes), len(enc.norms)


def test_sharing_of_the_tiny_presets():
    with torch.device("meta"):
        albert = create_model("albert_text_tiny")
        bert = create_model("bert_text_tiny")
        widenet = create_model("widenet_text_tiny")
    assert _counts(albert) == (1, 1, 0, 1)
    assert _counts(bert) == (4, 4, 0, 4)
    assert _counts(widenet) == (1, 0, 1, 4)  # one attention, one MoE, own norms per block
    for model in (albert, bert, widenet):
        assert model.cfg.encoder.norm_position == "pre" and model.cfg.vocab_size == 8000


PAPER_PARAMS = {"albert_base": (12, 11_813_810), "bert_factorized": (89, 89_780_402),
                "widenet_text_4e": (26, 26_017_970), "widenet_text_8e": (45, 44_910_770),
                "widenet_text_16e": (83, 82_696_370)}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    paper_m, exact = PAPER_PARAMS[name]
    n = count_parameters(model)
    assert abs(n - paper_m * 1e6) < 1e6
    assert n == exact  # the value in text_presets' docstring
    assert model.cfg.task == "pretrain" and model.cfg.encoder.norm_position == "post"


def test_the_parameter_counts_text_presets_documents_are_the_models():
    """Both tables of the module's docstring, read from it (the tiny rows had gone stale by 256)."""
    import re

    import widenet.models.text_presets as presets

    rows = re.findall(r"^    (\w+)\s+([\d,]+)\b", presets.__doc__, re.MULTILINE)
    assert len(rows) == 8
    for name, documented in rows:
        with torch.device("meta"):
            assert count_parameters(create_model(name)) == int(documented.replace(",", "")), name


def test_widenet_presets_sizes():
    with torch.device("meta"):
        model = create_model("widenet_text_8e")
    enc = model.cfg.encoder
    assert (enc.moe.num_experts, enc.moe.top_k, enc.moe.capacity_factor, enc.mlp_dim) == (8, 2, 1.2, 3072)
    assert _counts(model) == (1, 0, 1, 12)


def test_create_model_overrides_reach_text_and_encoder_fields():
    model = create_model("widenet_text_tiny", vocab_size=500, task="classify", num_labels=3, depth=2)
    assert isinstance(model.cfg, TextConfig)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.task, cfg.num_labels, cfg.encoder.depth) == (500, "classify", 3, 2)
    out = model.eval()(torch.randint(1, 500, (2, 12)))
    assert out.logits.shape == (2, 3)


def test_cli_params_counts_text_models(capsys):
    assert cli_main(["params", "albert_base", "widenet_text_4e", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"model": "albert_base", "params": 11_813_810, "task": "pretrain"},
                    {"model": "widenet_text_4e", "params": 26_017_970, "task": "pretrain"}]
    assert cli_main(["params", "bert_text_tiny", "--num-classes", "5"]) == 0
    assert "--num-classes ignored for bert_text_tiny" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# load_backbone
# ----------------------------------------------------------------------------
def test_load_backbone_moves_the_backbone_and_keeps_the_head():
    pretrained = _model("pretrain", seed=1, **MOE)
    fine = _model("qa", seed=2, **MOE)
    head_before = {k: v.clone() for k, v in fine.span_head.state_dict().items()}
    load_backbone(fine, pretrained.state_dict())
    for key, value in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(fine.backbone.state_dict()[key], value)
    for key, value in fine.span_head.state_dict().items():
        torch.testing.assert_close(value, head_before[key])
    ids = _ids()
    torch.testing.assert_close(fine(ids).hidden, pretrained(ids).hidden)


def test_load_backbone_complains_on_mismatch():
    fine = _model("classify")
    with torch.device("meta"):
        other_vocab = TextTransformer(_cfg("pretrain", vocab=60)).state_dict()
        other_sharing = TextTransformer(_cfg("pretrain", **MOE)).state_dict()
    with pytest.raises(ValueError, match=f"checkpoint vocabulary 60 does not match the model's {V}"):
        load_backbone(fine, other_vocab)
    with pytest.raises(ValueError, match="missing backbone keys: .*unexpected backbone keys: .*moes"):
        load_backbone(fine, other_sharing)
    with pytest.raises(ValueError, match="no 'backbone"):
        load_backbone(fine, {"mlm_head.bias": torch.zeros(V)})


def test_backbone_alone_is_usable():
    torch.manual_seed(0)
    backbone = TextBackbone(_cfg()).eval()
    out = backbone(_ids())
    assert out.pooled.shape == (3, 16) and out.padding_mask.dtype == torch.bool


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", [{}, MOE], ids=["dense", "moe"])
def test_mlm_and_sop_losses_go_down(encoder):
    torch.manual_seed(0)
    model = TextTransformer(_cfg("pretrain", **encoder)).train()  # post-norm
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(1, V, (8, 4)).repeat(1, 3)  # a repeated pattern: masked tokens are recoverable
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.2
    masked[:, 0] = True
    order = torch.randint(0, 2, (8,))
    mlm_losses, sop_losses = [], []
    for _ in range(40):
        out = model(ids.masked_fill(masked, 1), masked_positions=masked)
        mlm = F.cross_entropy(out.mlm_logits, ids[masked])
        sop = F.cross_entropy(out.sop_logits, order)
        opt.zero_grad()
        (mlm + sop + 0.01 * out.aux_loss).backward()
        opt.step()
        mlm_losses.append(mlm.item())
        sop_losses.append(sop.item())
    assert mlm_losses[0] == pytest.approx(math.log(V), abs=0.3)
    assert mlm_losses[-1] < mlm_losses[0] - 1.0
    assert sop_losses[-1] < 0.1
