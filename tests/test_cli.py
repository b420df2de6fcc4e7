"""The `widenet` command line: listing, parameter counts, benchmarks and its error contract.

The CLI's contract (widenet/cli.py): bad input exits with status 2 and a
one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
import torch


pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]

# The paper's Table 1 (ImageNet setup: 1001 classes and a pre-logits layer), in millions.
PAPER_PARAMS_M = {"vit_b16": 87, "vit_l16": 305, "vit_moe_b16": 128, "vit_moe_l16": 406,
                  "widenet_b16": 29, "widenet_l16": 40, "widenet_h16": 63}


_cli = run_cli  # (argv, capsys) -> (exit status, stdout, stderr)


def _assert_one_line_error(rc, out: str, err: str) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message on stderr, got {len(lines)} lines:\n{err}"
    return lines[0]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --- processes: console script, python -m, and a real error exit -------------------------------
def test_list_same_output_from_script_module_and_main(capsys, tmp_path):
    script = shutil.which("widenet")
    assert script is not None, "the widenet console script is not installed (pip install -e .)"
    commands = {"script": [script, "list"], "module": [sys.executable, "-m", "widenet", "list"]}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
                                    text=True) for name, cmd in commands.items()}
    results = {name: (*p.communicate(timeout=120), p.returncode) for name, p in procs.items()}

    rc, out, err = _cli(["list"], capsys)
    assert rc == 0 and err == ""
    for name in ("script", "module"):
        stdout, stderr, code = results[name]
        assert code == 0, stderr
        assert stdout == out, name
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(names)
    assert set(PAPER_PARAMS_M) | {"vit_tiny", "vit_moe_tiny", "albert_tiny", "widenet_tiny"} <= set(names)


TORCHRUN_RANK_1 = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")  # what torchrun gives its second process


@pytest.mark.parametrize("launcher", [{}, TORCHRUN_RANK_1], ids=["alone", "under-torchrun"])
def test_closed_stdout_pipe_ends_quietly(launcher):
    """`widenet list | head -0`: the reader is gone before anything is written. No traceback,
    no "Exception ignored" message; the status a shell reports for a process SIGPIPE ended."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "widenet", "list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=dict(_env(), **launcher))
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == ""


def test_a_closed_stdout_is_refused_where_the_output_is_the_result(tmp_path):
    """`widenet predict ... >&-` exited 0 with every prediction written nowhere (a closed stdout is
    opened on /dev/null so that training can run); commands whose product is their output refuse."""
    def closed_stdout(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "widenet", *args],
                              stderr=subprocess.PIPE, text=True, timeout=120, env=_env(), cwd=tmp_path)

    for args in (["list"], ["params", "vit_tiny"]):
        proc = closed_stdout(*args)
        assert proc.returncode == 2 and proc.stderr == (f"widenet: error: standard output is closed, so what "
                                                        f"{args[0]} prints would be lost; send it to a file (or to "
                                                        "/dev/null to discard it)\n")
    proc = closed_stdout("gcide-task", "pos", "--out", str(tmp_path / "task"), "--gcide", str(tmp_path / "none.dz"))
    assert proc.returncode == 2 and "none.dz" in proc.stderr
    assert "standard output is closed" not in proc.stderr  # its product is files: it goes on (to its own error)


def test_a_torchrun_process_keeps_its_output_and_status_but_skips_finalizing():
    """Under torchrun the CLI ends with os._exit after flushing (distributed.env.exit_without_finalizing):
    finalizing can abort a process after a successful run. An atexit hook shows which way it left."""
    script = ("import atexit, sys; atexit.register(print, 'finalized'); sys.argv[0] = 'widenet'; "
              "from widenet.cli import run; run()")

    def launch(*args: str, **launcher: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                              env=dict(_env(), **launcher))

    alone, worker = launch("list"), launch("list", **TORCHRUN_RANK_1)
    assert alone.returncode == worker.returncode == 0, alone.stderr + worker.stderr
    assert alone.stdout.endswith("\nfinalized\n")
    assert worker.stdout == alone.stdout.removesuffix("finalized\n")  # all of it, block-buffered into a pipe
    failed = launch("params", "no_such_model", **TORCHRUN_RANK_1)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.startswith("widenet: error (process 1 of 2): ") and "no_such_model" in failed.stderr
    odd = launch("list", WORLD_SIZE="two")  # not a number: no command here needed it, so it ran and finalized
    assert odd.returncode == 0 and odd.stdout == alone.stdout


# Ctrl-C arrives as a KeyboardInterrupt raised wherever Python is; an import hook raises it at a
# chosen import, so the test does not depend on when a signal lands.
_INTERRUPT_AT = """
import sys
at = sys.argv.pop(1)
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == at:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv[0] = "widenet"
from widenet.__main__ import run
run()
"""


@pytest.mark.parametrize("module", ["torch", "widenet.train.config"], ids=["loading-torch", "building-the-parser"])
def test_ctrl_c_before_the_command_starts_is_one_line(module):
    """Ctrl-C in the second or two before a command starts (torch loading, the parser being built)
    ends like Ctrl-C during a command: one line and status 130, not Python's traceback."""
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_AT, module, "train", "--help"], capture_output=True,
                          text=True, timeout=120, env=_env())
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "widenet: interrupted\n", "")
    unhooked = subprocess.run([sys.executable, "-c", _INTERRUPT_AT, "no_such_module", "train", "--help"],
                              capture_output=True, text=True, timeout=120, env=_env())
    assert unhooked.returncode == 0 and "--model" in unhooked.stdout  # the hook alone changes nothing


def test_the_package_loads_torch_when_a_name_is_first_used():
    """`import widenet` and the entry point are torch-free (so the CLI can catch Ctrl-C while torch
    loads); every public name and subpackage is there on first use, the same object as in its module."""
    code = """
import importlib, sys, widenet
from widenet.__main__ import run
assert "torch" not in sys.modules, "torch loaded by the package or the entry point"
assert set(widenet.__all__) == {*widenet._HOME, "__version__"}
for name in widenet.__all__:
    value = getattr(widenet, name)
    if name != "__version__":
        assert value is getattr(importlib.import_module(f"widenet.{widenet._HOME[name]}"), name), name
assert set(widenet.__all__) <= set(dir(widenet))
assert widenet.models.create_model is widenet.create_model and widenet.layers.moe.MoE is widenet.MoE
try:
    widenet.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("an unknown name was not refused")
namespace = {}
exec("from widenet import *", namespace)
assert set(widenet.__all__) <= set(namespace)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.stdout == "ok\n", proc.stderr


def test_list_json(capsys):
    rc, out, _ = _cli(["list", "--json"], capsys)
    assert rc == 0
    rows = json.loads(out)
    assert [r["model"] for r in rows] == sorted(r["model"] for r in rows)
    assert all(isinstance(r["description"], str) and r["description"] for r in rows)


@pytest.mark.parametrize("argv, flag", [(["compare", "--seed", "7"], "--seed 7"),
                                        (["train", "--model", "vit_tiny", "--epo", "1"], "--epo 1")])
def test_abbreviated_flags_are_refused_not_completed(argv, flag, cli):
    """argparse completes unique prefixes by default: `compare --seed 7` trained seven seeds (--seeds)."""
    rc, out, err = cli(argv)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"widenet: error: unrecognized arguments: {flag} (see widenet {argv[0]} --help)"]


# --- params ---------------------------------------------------------------------------------------
def test_params_widenet_b16_matches_paper(capsys):
    rc, out, _ = _cli(["params", "widenet_b16", "--num-classes", 1001, "--representation", "--json"], capsys)
    assert rc == 0
    row = json.loads(out)
    # By hand: D 768, 12 blocks sharing one attention and one MoE of 4 experts (hidden 4096), own norms;
    # 224 px in 16 px patches (196 + [CLS] positions); a 768-wide representation layer; 1001 classes.
    d, h, e = 768, 4096, 4
    attention = 4 * d * d + 4 * d  # qkv and output projections with biases
    moe = e * d + e * (2 * d * h + h + d)  # router (no bias), experts
    norms = 12 * 2 * 2 * d + 2 * d  # two LayerNorms per block, the final one
    stem = 3 * 16 * 16 * d + d + d + 197 * d  # patch conv with bias, [CLS], positions
    head = d * d + d + d * 1001 + 1001  # representation layer, classifier
    want = stem + attention + moe + norms + head
    assert row == {"model": "widenet_b16", "params": want, "num_classes": 1001, "representation": True}
    assert math.floor(row["params"] / 1e6) == 29  # the paper's 29M


def test_params_paper_models_in_one_call(capsys):
    rc, out, _ = _cli(["params", *PAPER_PARAMS_M, "--num-classes", 1001, "--representation", "--json"], capsys)
    assert rc == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and [r["model"] for r in rows] == list(PAPER_PARAMS_M)
    got = {r["model"]: math.floor(r["params"] / 1e6) for r in rows}
    assert got == PAPER_PARAMS_M
    assert all(r["num_classes"] == 1001 and r["representation"] is True for r in rows)


def test_params_table_and_defaults(capsys):
    rc, out, _ = _cli(["params", "vit_b16", "widenet_b16"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("vit_b16") and lines[1].startswith("widenet_b16")
    assert lines[0].rstrip().endswith("M)")
    # Without --representation and with the preset's 1000 classes the count is smaller.
    rc, out, _ = _cli(["params", "widenet_b16", "--json"], capsys)
    row = json.loads(out)
    assert row["num_classes"] == 1000 and row["representation"] is False and row["params"] < 29692137


# --- benchmarks -----------------------------------------------------------------------------------
def test_bench_moe_json(capsys):
    rc, out, err = _cli(["bench", "moe", "--tokens", 256, "--dim", 16, "--hidden", 32, "--experts", 4,
                         "--repeats", 3, "--json"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    for key in ("moe_ms", "loop_ms", "padded_ms", "dense_ms", "einsum_ms", "mixtral_ms", "ratio_vs_dense",
                "speedup_vs_einsum", "ratio_vs_mixtral", "loop_vs_dense", "padded_vs_dense"):
        assert isinstance(result[key], float) and result[key] > 0 and math.isfinite(result[key]), key
    assert result["einsum_saved_mb"] > result["moe_saved_mb"]  # the one-hot tensors
    # torch._grouped_mm runs on CPU in float32 too, so the grouped kernel is measured here.
    assert result["grouped_vs_dense"] > 0


def test_interleaved_times_rotate_the_order_and_honour_limits():
    from widenet.bench.moe_bench import interleaved_times, median_ratio

    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_times(steps, 3, torch.device("cpu"), {"c": 1})
    # Warm-ups, then rounds in orders rotated by one (abc, bca, cab); c is timed once only.
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "a", "a", "b"]
    assert [len(times[n]) for n in "abc"] == [3, 3, 1]
    assert median_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0


def test_bench_moe_text(capsys):
    rc, out, _ = _cli(["bench", "moe", "--tokens", 64, "--dim", 8, "--hidden", 16, "--repeats", 1], capsys)
    assert rc == 0
    assert "moe / dense" in out and "interleaved rounds" in out


def test_bench_model_json(capsys):
    rc, out, err = _cli(["bench", "model", "vit_tiny", "--batch-size", 4, "--steps", 1, "--device", "cpu",
                         "--json"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["model"] == "vit_tiny" and result["batch_size"] == 4 and result["steps"] == 1
    assert result["images_per_s"] > 0 and result["params"] > 0 and result["device"] == "cpu"


def test_bench_model_times_several_models_interleaved(capsys):
    rc, out, err = _cli(["bench", "model", "vit_tiny", "widenet_tiny", "--batch-size", 2, "--steps", 3,
                         "--device", "cpu", "--json"], capsys)
    assert rc == 0, err
    first, second = json.loads(out)
    assert (first["model"], second["model"]) == ("vit_tiny", "widenet_tiny")
    assert first["ratio_vs_first"] == 1.0 and second["ratio_vs_first"] > 0
    assert first["steps"] == second["steps"] == 3 and first["compiled"] is False
    rc, out, _ = _cli(["bench", "model", "vit_tiny", "widenet_tiny", "--batch-size", 2, "--steps", 1,
                       "--device", "cpu"], capsys)
    assert "widenet_tiny / vit_tiny: " in out and "x the images/s" in out


def test_bench_model_gives_moe_settings_to_the_moe_models(capsys, monkeypatch):
    """The same-recipe comparison (vit_tiny beside widenet_tiny with --set top_k=1) routes WideNet
    top-1 and leaves ViT as it is; MoE settings no model takes are refused."""
    import widenet.bench.model_bench as model_bench

    built = {}
    real = model_bench.create_model
    monkeypatch.setattr(model_bench, "create_model", lambda name, **kw: built.setdefault(name, real(name, **kw)))
    rc, out, err = _cli(["bench", "model", "vit_tiny", "widenet_tiny", "--batch-size", 2, "--steps", 1,
                         "--device", "cpu", "--top-k", 1, "--set", "depth=2", "--json"], capsys)
    assert rc == 0 and [r["model"] for r in json.loads(out)] == ["vit_tiny", "widenet_tiny"], err
    assert built["widenet_tiny"].cfg.encoder.moe.top_k == 1 and built["vit_tiny"].cfg.encoder.depth == 2
    rc, out, err = _cli(["bench", "model", "vit_tiny", "albert_tiny", "--steps", 1, "--top-k", 1], capsys)
    assert rc == 2 and "top_k: none of vit_tiny, albert_tiny has MoE layers" in err and "(widenet_tiny)" in err
    rc, out, err = _cli(["bench", "model", "widenet_tiny", "widenet_tiny", "--steps", 1], capsys)
    assert rc == 2 and "widenet_tiny named more than once; a model timed against itself compares nothing" in err


def test_bench_model_reports_flops_utilisation(capsys):
    rc, out, err = _cli(["bench", "model", "vit_tiny", "--batch-size", 4, "--steps", 1, "--device", "cpu",
                         "--peak-tflops", "2", "--json"], capsys)
    assert rc == 0, err
    r = json.loads(out)
    # vit_tiny forward, counted by hand: 49 patches x (16 x 64) embedding + 6 blocks of
    # 50 tokens x (4 x 64 x 64 projections + 2 x 64 x 256 MLP) + 2 x 50 x 50 x 64 attention
    # + head 64 x 10, times 2 FLOPs per multiply-add; training = 3 x forward.
    block = 50 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 50 * 50 * 64
    forward = 2 * (49 * 16 * 64 + 6 * block + 64 * 10)
    assert r["train_flops_per_image"] == 3 * forward
    assert r["achieved_tflops"] == pytest.approx(r["train_flops_per_image"] * r["images_per_s"] / 1e12)
    assert r["peak_tflops"] == 2 and r["mfu"] == pytest.approx(r["achieved_tflops"] / 2)
    assert "above the peak" not in err
    rc, out, err = _cli(["bench", "model", "vit_tiny", "--batch-size", 4, "--steps", 1, "--device", "cpu",
                         "--peak-tflops", "1e-9"], capsys)  # an MFU of millions of percent, without a word
    assert rc == 0 and "above the peak of 1e-09 TFLOP/s the MFU is taken against: is --peak-tflops" in err, err


def test_compare_takes_model_settings_as_the_docs_say(monkeypatch, capsys):
    """vision.md's `compare --preset full --set stem=patch ...` was refused: compare had no --set."""
    from widenet.analysis import compare as compare_mod

    got = {}
    monkeypatch.setattr(compare_mod, "compare", lambda models, out, **kw: got.update(kw) or "report.md")
    rc, out, err = _cli(["compare", "--preset", "full", "--set", "stem=patch", "--set", "patch_size=4",
                         "--set", "stem_width=none", "--epochs", 30], capsys)
    assert rc == 0, err
    assert got["model_overrides"] == {"stem": "patch", "patch_size": 4, "stem_width": None}


# --- error exits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, flip", [([], True), (["--flip"], True), (["--no-flip"], False)])
def test_train_flip_flag_reaches_the_config(flags, flip):
    from widenet.cli import build_parser, train_config_from_args
    args = build_parser().parse_args(["train", *flags, "--set", "drop_path=0.1"])
    cfg = train_config_from_args(args)
    assert cfg.flip is flip
    assert cfg.model_overrides == {"drop_path": 0.1}


def test_unknown_model(capsys):
    line = _assert_one_line_error(*_cli(["params", "nosuch_model"], capsys))
    assert line.startswith("widenet: error:") and "unknown model 'nosuch_model'" in line


@pytest.mark.parametrize("argv,command", [(["params", "widenet_tiny", "--set", "dim=32"], "widenet params"),
                                          (["bench", "moe", "--foo"], "widenet bench moe"),
                                          (["list", "--bogus"], "widenet list"),
                                          (["--bogus", "list"], "widenet")])  # before the command: the top level's
def test_an_argument_no_command_takes_points_at_the_given_commands_help(capsys, argv, command):
    """It pointed at the top level's `widenet --help`, which does not list a command's flags."""
    line = _assert_one_line_error(*_cli(argv, capsys))
    assert line.startswith("widenet: error: unrecognized arguments: ") and line.endswith(f"(see {command} --help)")
    assert ("--set dim=32" if argv[0] == "params" else argv[-1] if argv[0] == "bench" else "--bogus") in line


def test_bench_model_unknown_model(capsys):
    line = _assert_one_line_error(*_cli(["bench", "model", "nosuch_model", "--steps", 1], capsys))
    assert "nosuch_model" in line


def test_bench_moe_top_k_exceeds_experts(capsys):
    line = _assert_one_line_error(*_cli(["bench", "moe", "--top-k", 8, "--experts", 4], capsys))
    assert "top_k=8 exceeds num_experts=4" in line  # MoEConfig's own check


def test_unknown_model_setting(tmp_path, fmnist_dir, capsys):
    line = _assert_one_line_error(*_cli(["train", "--data-dir", fmnist_dir, "--out", tmp_path / "run",
                                         "--max-steps", 1, "--set", "no_such_setting=1"], capsys))
    assert "no_such_setting" in line


def test_train_patch_size_must_divide_image_size(tmp_path, fmnist_dir, capsys):
    line = _assert_one_line_error(*_cli(["train", "--model", "widenet_b16", "--data-dir", fmnist_dir,
                                         "--out", tmp_path / "run", "--max-steps", 1], capsys))
    assert "28" in line and "16" in line and "divisible" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_missing_image_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    line = _assert_one_line_error(*_cli(["train", "--data", "folder", "--data-dir", missing, "--image-size", 28,
                                         "--out", tmp_path / "run", "--max-steps", 1], capsys))
    assert str(missing) in line and "does not exist" in line


def test_train_folder_without_data_dir(tmp_path, capsys):
    line = _assert_one_line_error(*_cli(["train", "--data", "folder", "--image-size", 28,
                                         "--out", tmp_path / "run", "--max-steps", 1], capsys))
    assert "data_dir" in line


@pytest.mark.parametrize("argv, expected", [
    (["params", "vit_tiny", "--num-classes", "0"], "--num-classes"),
    (["bench", "moe", "--capacity-factor", "0"], "--capacity-factor"),
    (["train", "--data", "nosuch"], "nosuch"),
    (["train", "--set", "dim"], "KEY=VALUE"),
    (["train", "--set", "=3"], "KEY=VALUE"),
    (["train", "--epochs", "2", "--max-steps", "3"], "not allowed with"),
], ids=["num-classes-0", "capacity-factor-0", "unknown-data", "set-without-equals", "set-without-key",
        "epochs-and-max-steps"])
def test_argument_errors_are_one_line(argv, expected, capsys):
    """Rejected by the argument parser: status 2 and, per the CLI's contract, one line on stderr."""
    rc, out, err = _cli(argv, capsys)
    assert rc == 2
    assert expected in err
    _assert_one_line_error(rc, out, err)


def test_an_error_line_is_one_write_and_names_its_process(monkeypatch):
    """Under torchrun every process meets a bad setting; written in pieces (unbuffered stderr), the
    processes' lines ran into each other ("...MoE layerswidenet: error: ...")."""
    from widenet.cli_errors import say_error

    class Stream:
        writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    stream = Stream()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    say_error("bad setting")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    say_error("bad setting")
    monkeypatch.setenv("RANK", "0")
    say_error("bad setting")
    assert stream.writes == ["widenet: error: bad setting\n", "widenet: error (process 1 of 2): bad setting\n",
                             "widenet: error: bad setting\n"]


@pytest.mark.parametrize("argv,line", [
    (["train", "--model", "widenet_text_tiny", "--max-steps", "1"],
     "widenet_text_tiny is a text model; widenet train takes image models such as widenet_tiny (widenet pretrain and "
     "widenet finetune train text models)"),
    (["pretrain", "--model", "vit_tiny", "--corpus", "CORPUS"],
     "vit_tiny is an image model; widenet pretrain takes text models such as widenet_text_tiny (widenet train trains "
     "image models)"),
])
def test_a_model_of_the_other_kind_is_named_before_anything_runs(argv, line, tmp_path, cli):
    """pretrain --model vit_tiny died of an AttributeError reported as a bug; train --model of a text
    preset blamed settings the user never gave (image_size, in_channels, num_classes)."""
    (tmp_path / "c.txt").write_text("One sentence here. Another one there.\n")
    argv = [str(tmp_path / "c.txt") if a == "CORPUS" else a for a in argv]
    rc, out, err = cli([*argv, "--out", tmp_path / "run"])
    assert rc == 2 and err.strip() == f"widenet: error: {line}", err
    assert not (tmp_path / "run").exists()
