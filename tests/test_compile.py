"""torch.compile(model, fullgraph=True) on whole models, and --compile's error contract.

fullgraph=True fails on any graph break, so a passing compile is the proof
that the MoE path has static shapes and no host synchronisation (the
"grouped"/"padded" kernels and the device-side dispatch plan). One graph for
training and one for evaluation, whatever the depth: the blocks share their
attention and MoE modules without re-specialising the graph per block.
The models compile with aot_eager (dynamo and AOT autograd: the same graph
capture, forward and backward, without generating C++), and a two-block
widenet_tiny with inductor (the real backend), to keep the suite's time.
Random draws (router noise) are compared too: inductor runs with
fallback_random, as widenet.runtime.compile_model sets it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import widenet
from widenet.cli import main
from widenet.runtime import CompileUnavailable, check_compile_available, compile_model

pytestmark = pytest.mark.slow


def _compiled(model, backend):
    """inductor: exactly as `--compile` compiles (runtime.compile_model); another backend: the same
    capture (fullgraph, the masked-LM head's data-dependent gather) without inductor's code."""
    import torch._dynamo

    torch._dynamo.reset()
    if backend == "inductor":
        return compile_model(model)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, fullgraph=True, backend=backend)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _check_against_eager(model, run, backend, rtol=1e-4, atol=1e-5):
    """run(module) -> (loss, outputs to compare). Training (loss and every gradient) then
    evaluation, each compiled once and called twice without a recompilation."""
    compiled = _compiled(model, backend)
    params = [p for p in model.parameters() if p.requires_grad]
    before = _graphs()
    for training, new_graphs in ((True, 1), (False, 2)):
        graphs = before + new_graphs
        model.train(training)
        results = []
        for module in (compiled, model):
            torch.manual_seed(5)  # the same router noise in both
            with torch.set_grad_enabled(training):
                loss, outputs = run(module)
                grads = torch.autograd.grad(loss, params, allow_unused=True) if training else []
            results.append((loss, outputs, grads))
        assert _graphs() == graphs, f"{_graphs() - before} graphs after {'training' if training else 'evaluation'}"
        (loss, outs, grads), (ref_loss, ref_outs, ref_grads) = results
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
        for out, ref in zip(outs, ref_outs):
            torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        for (name, _), g, r in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), grads, ref_grads):
            assert (g is None) == (r is None), name
            if g is not None:
                torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        with torch.set_grad_enabled(training):
            run(compiled)
        assert _graphs() == graphs, "a second call with the same shapes recompiled"
    return compiled


def _vision_run(images, labels):
    def run(module):
        out = module(images)
        loss = F.cross_entropy(out.logits, labels) + 0.01 * out.aux_loss
        return loss, [out.logits, out.aux_loss] + [r.expert_fraction for r in out.routing if r is not None]
    return run


def test_widenet_tiny_compiles_whole():
    torch.manual_seed(0)
    model = widenet.create_model("widenet_tiny", drop_path=0.1)  # 6 blocks, router noise, stochastic depth
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([1, 7, 3, 0])
    _check_against_eager(model, _vision_run(images, labels), "aot_eager")


def test_inductor_code_matches_eager():
    """The real backend, generated C++ included, on two blocks (compile time grows with depth:
    ~90 s for all six on 2 cores with a cold cache)."""
    torch.manual_seed(0)
    model = widenet.create_model("widenet_tiny", depth=2, drop_path=0.1)
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([1, 7, 3, 0])
    compiled = _check_against_eager(model, _vision_run(images, labels), "inductor")
    with torch.no_grad():  # another batch size recompiles with the token count symbolic: the capacity's
        # decimal rounding in inductor's code then corrupted the heap (the process aborted)
        torch.testing.assert_close(compiled(images[:2]).logits, model(images[:2]).logits, rtol=1e-4, atol=1e-5)


def test_layers_with_other_capacity_factors_compile_in_one_process():
    """The second layer's factor became a symbolic float in dynamo, whose decimal rounding failed
    with an AssertionError hundreds of lines long (a capacity-factor sweep in one notebook)."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(10, 8)
    for factor in (1.0, 1.1):
        moe = widenet.MoE(8, 16, num_experts=4, top_k=2, capacity_factor=factor, noise_std=0.0)
        compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x).output, moe(x).output, rtol=1e-5, atol=1e-6)
        assert moe.capacity(10) == {1.0: 5, 1.1: 6}[factor]


def test_widenet_b16_compiles_whole():
    torch.manual_seed(0)
    model = widenet.create_model("widenet_b16", image_size=32, num_classes=10)  # 12 blocks, D 768, 4 patches
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    _check_against_eager(model, _vision_run(images, labels), "aot_eager")


def test_text_model_compiles_whole_with_padding_and_masked_positions():
    torch.manual_seed(0)
    model = widenet.create_model("widenet_text_tiny", vocab_size=300)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (3, 24), generator=gen)
    ids[0, 17:] = 0  # padding: takes no part in routing
    types = torch.zeros_like(ids)
    masked = (torch.rand(3, 24, generator=gen) < 0.2) & (ids != 0)
    masked[:, 1] = True
    labels = torch.randint(5, 300, (int(masked.sum()),), generator=gen)

    def run(module):
        out = module(ids, types, masked_positions=masked)
        loss = (F.cross_entropy(out.mlm_logits, labels) + F.cross_entropy(out.sop_logits, torch.tensor([0, 1, 0]))
                + 0.01 * out.aux_loss)
        return loss, [out.mlm_logits, out.sop_logits, out.aux_loss]

    _check_against_eager(model, run, "aot_eager")


def test_text_classifier_compiles_whole_with_a_keep_mask_of_numbers():
    """Hugging Face's attention_mask (1 = a real token, int64) as keep_mask: its 0/1 check was a
    data-dependent branch, which fullgraph refused (a bool padding_mask compiled)."""
    torch.manual_seed(0)
    model = widenet.create_model("widenet_text_tiny", vocab_size=300, task="classify", num_labels=3, depth=2)
    ids = torch.randint(5, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    keep = torch.ones_like(ids)
    keep[1, 9:] = 0

    def run(module):
        logits = module(ids, keep_mask=keep).logits
        return F.cross_entropy(logits, torch.tensor([0, 2, 1])), [logits]

    _check_against_eager(model, run, "aot_eager")


def test_save_pretrained_writes_the_model_a_compiled_one_wraps(tmp_path):
    """torch.compile(model) is an OptimizedModule (its state dict's keys prefixed "_orig_mod."):
    save_pretrained refused it, though the weights are the model's."""
    torch.manual_seed(0)
    model = widenet.create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    widenet.save_pretrained(torch.compile(model), tmp_path / "m")
    loaded = widenet.load_pretrained(tmp_path / "m").model
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_importing_widenet_does_not_load_the_compiler():
    import subprocess
    import sys

    code = "import sys, widenet; [getattr(widenet, name) for name in widenet.__all__]; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch, capsys):
    """Inductor takes $CXX (read when it loads), else g++: the check asks inductor's own search (it
    accepted any of g++, c++, clang++ on the PATH, and a run then failed at its first step)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))
    with pytest.raises(CompileUnavailable, match="needs a C\\+\\+ compiler: /nonexistent/g\\+\\+ did not run \\(set CXX to use another\\); run without --compile"):
        check_compile_available(torch.device("cpu"))
    rc = main(["bench", "model", "vit_tiny", "--batch-size", "2", "--steps", "1", "--device", "cpu", "--compile"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("widenet: error: torch.compile on a CPU needs a C++ compiler")
