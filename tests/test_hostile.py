"""Hostile use: nothing lost, nothing silently wrong.

Each case either gives the right result or ends with one line on stderr and a
non-zero status, with what was already saved untouched: two runs into one
folder, a folder that already holds a run, settings of the wrong type or
out of range, data whose classes do not line up, corpora and task files too
small to evaluate, files that cannot be written (a file as --out, /proc, a
read-only mount, a full disk), sizes that cannot be allocated, damaged run
folders, and a bug (which keeps its traceback and asks for a report).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import widenet
from widenet.cli import main
from widenet.data.augment import AugmentConfig
from widenet.files import save_atomic
from widenet.layers.moe import MoEConfig
from widenet.memory import readable_size
from widenet.models.encoder import EncoderConfig
from widenet.models.registry import create_model
from widenet.models.text import TextConfig
from widenet.models.vision import VisionConfig
from widenet.settings import SettingError, SettingTypeError, field_kinds, parse_setting_text
from widenet.train.checkpoint import checkpoint_dir_name, find_latest_checkpoint, load_checkpoint, read_checkpoint_meta
from widenet.train.config import TrainConfig
from widenet.train.metrics import read_metrics
from widenet.train.text_config import FinetuneConfig, PretrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "v0"
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def _train_args(data_dir, out, tiny_set_args, *extra) -> list:
    return ["train", "--data-dir", data_dir, "--out", out, "--batch-size", 32, "--log-every", 1, "--device", "cpu",
            *tiny_set_args, *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what "untouched" is checked against."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, WIDENET_DATA_HOME=str(tmp_path / "data-home"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------
# The run folder: one run at a time, nothing of an earlier run replaced unasked
# --------------------------------------------------------------------------
def test_two_runs_into_one_folder(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A second run into a folder a live run holds is refused, naming it; once that run was killed -9,
    the lock it left is taken over with a warning."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "widenet", *map(str, _train_args(fmnist_dir, out, tiny_set_args)),
               "--max-steps", "100000", "--save-every", "2"]
    first = subprocess.Popen(command, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while find_latest_checkpoint(out) is None and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert find_latest_checkpoint(out) is not None, "the first run never saved"
        line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--resume"),
                                     capsys)[::2])
        assert f"{out} is in use by pid {first.pid} on " in line and "choose another --out" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert load_checkpoint(out).step >= 2  # the killed run's checkpoints are intact
    rc, _, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--overwrite"), capsys)
    assert rc == 0, err
    assert f"from pid {first.pid}" in err and "ended without releasing it" in err
    assert load_checkpoint(out).step == 2 and not (out / ".widenet.lock").exists()


def test_a_symbolic_link_in_place_of_the_lock_file_is_refused_not_followed(tmp_path, fmnist_dir, tiny_set_args,
                                                                           capsys):
    """OUT/.widenet.lock -> a user's file: the run took over "the lock" and truncated the file to its pid line."""
    precious = tmp_path / "precious.txt"
    precious.write_text("line 1\nline 2\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".widenet.lock").symlink_to(precious)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--max-steps", 1),
                                 capsys)[::2])
    assert "run/.widenet.lock: a symbolic link where the run's lock file belongs" in line and "remove the link" in line
    assert precious.read_text() == "line 1\nline 2\n" and find_latest_checkpoint(tmp_path / "run") is None


def test_a_reader_that_goes_away_does_not_end_the_training(tmp_path, fmnist_dir, tiny_set_args):
    """`widenet train ... | head -1` used to die of the broken pipe at the next progress line, before
    its next checkpoint."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "widenet", *map(str, _train_args(fmnist_dir, out, tiny_set_args)),
               "--max-steps", "4", "--save-every", "1"]
    env = {k: v for k, v in _env(tmp_path).items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: buffered
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.stdout.readline().startswith(b"training widenet_tiny")
    run.stdout.close()  # as head does after its line
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err.decode()
    assert b"the reader of the output went away; training goes on without printing" in err
    assert load_checkpoint(out).step == 4


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, fmnist_dir, tiny_set_args, capsys):
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[0] == 0
    before = _snapshot(out)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 3), capsys)[::2])
    assert "already holds a run (checkpoints/, metrics.jsonl)" in line and "--overwrite" in line
    assert _snapshot(out) == before
    rc, _, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 3, "--overwrite"), capsys)
    assert rc == 0 and "--overwrite: set aside the earlier run's checkpoints/, metrics.jsonl" in err + _
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
    assert not (out / ".widenet-overwritten").exists() and load_checkpoint(out).step == 3
    rc, _, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--resume", "--overwrite"), capsys)
    assert rc == 2 and "not allowed with argument" in err


def test_a_folder_holding_a_saved_model_is_not_a_run_folder(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A run into an export would leave eval, predict and export reading the exported model, not the run."""
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    assert _cli(["export", out, "--to", tmp_path / "shipped"], capsys)[0] == 0
    before = _snapshot(tmp_path / "shipped")
    for extra in ((), ("--resume",), ("--overwrite",)):
        line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "shipped", tiny_set_args, "--max-steps", 1,
                                                 *extra), capsys)[::2])
        assert "holds a saved model (config.json" in line and "choose another --out" in line
    assert _snapshot(tmp_path / "shipped") == before


def test_overwrite_puts_the_earlier_run_back_when_the_new_one_fails_before_a_checkpoint(
        tmp_path, fmnist_dir, tiny_set_args, capsys, monkeypatch):
    """--overwrite used to delete the earlier run before anything of the new one was checked: a
    setting the data refused, or a crash at the first step, lost both runs."""
    from widenet.train.images import ImageTask

    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[0] == 0
    before = _snapshot(out)
    for setting, named in (("num_classes=5", "fashion-mnist has 10 classes"),
                           ("in_channels=2", "images are read as grey (1) or RGB (3); leave in_channels out"),
                           ("image_size=32", "are 28x28; to train at another size, resize them with --image-size 32")):
        line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 3, "--overwrite",
                                                 "--set", setting), capsys)[::2])
        assert f"--set {setting}: " in line and named in line, line
        assert _snapshot(out) == before, setting

    real_loss, calls = ImageTask.loss, []

    def interrupted_at(step: int):
        def loss(self, net, batch, step_):
            calls.append(step_)
            if len(calls) == step:
                raise KeyboardInterrupt
            return real_loss(self, net, batch, step_)
        return loss

    monkeypatch.setattr(ImageTask, "loss", interrupted_at(1))  # Ctrl-C before the new run's first checkpoint
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 3, "--save-every", 1,
                                       "--overwrite"), capsys)
    assert rc == 130 and "put the earlier run back" in stdout + err
    assert err.splitlines()[-1] == ("widenet: interrupted; next: run it again with --overwrite (the earlier run in "
                                    "the folder was put back)")
    assert _snapshot(out) == before

    def failing(self, net, batch, step_):  # an ordinary error inside the run (a bug: traceback, status 1)
        raise RuntimeError("boom")

    monkeypatch.setattr(ImageTask, "loss", failing)
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 3, "--overwrite"), capsys)
    assert rc == 1 and "boom" in err and "put the earlier run back" in stdout + err
    assert _snapshot(out) == before

    calls.clear()  # Ctrl-C after the new run saved a checkpoint: the new run is the one kept, resumable
    monkeypatch.setattr(ImageTask, "loss", interrupted_at(3))
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 4, "--save-every", 1,
                                       "--overwrite"), capsys)
    assert rc == 130 and "put the earlier run back" not in stdout + err
    assert load_checkpoint(out).step == 2 and not (out / ".widenet-overwritten").exists()
    assert read_checkpoint_meta(find_latest_checkpoint(out))["train_config"]["max_steps"] == 4

    # a run killed before its first checkpoint leaves the earlier one set aside: the next run puts it back
    monkeypatch.undo()
    (out / ".widenet-overwritten").mkdir()
    for name in ("checkpoints", "metrics.jsonl"):
        (out / name).rename(out / ".widenet-overwritten" / name)
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')  # what the killed run wrote
    line = _one_line_error(*_cli(["eval", "--checkpoint", out, "--device", "cpu"], capsys)[::2])
    assert "no complete checkpoint found" in line and "set aside waits in" in line and "puts it back" in line
    import socket  # the same folder while the replacing run lives (its lock names it): not "a killed" one
    (out / ".widenet.lock").write_text(f"pid 1 on {socket.gethostname()} since 2026-12-07 10:00:00")  # pid 1 lives
    line = _one_line_error(*_cli(["eval", "--checkpoint", out, "--device", "cpu"], capsys)[::2])
    assert "the run training here (pid 1 on " in line and "has saved none yet" in line, line
    dead = subprocess.Popen(["true"])
    dead.wait()  # a lock left by a killed run: the earlier wording
    (out / ".widenet.lock").write_text(f"pid {dead.pid} on {socket.gethostname()} since 2026-12-07 10:00:00")
    line = _one_line_error(*_cli(["eval", "--checkpoint", out, "--device", "cpu"], capsys)[::2])
    assert "set aside waits in" in line
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 4, "--save-every", 1,
                                       "--resume"), capsys)
    assert rc == 0, err
    assert "ended (killed?) before saving a checkpoint; put back the run it was replacing" in stdout + err
    assert "(step 2)" in stdout + err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]
    assert not (out / ".widenet-overwritten").exists()


def test_overwrite_that_cannot_set_everything_aside_moves_nothing(tmp_path, fmnist_dir, tiny_set_args, capsys,
                                                                  monkeypatch):
    """A rename that fails half-way (a mount point inside OUT) used to leave part of the run set
    aside, and the next run would have deleted the rest as the failed run's output."""
    import widenet.train.run_folder as run_folder

    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    before = _snapshot(out)
    real, moves = os.replace, []

    def second_fails(src, dst):
        moves.append(src)
        if len(moves) == 2:
            raise OSError(16, "Device or resource busy", str(src))
        real(src, dst)

    monkeypatch.setattr(run_folder.os, "replace", second_fails)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1, "--overwrite"),
                                 capsys)[::2])
    assert "Device or resource busy" in line
    monkeypatch.undo()
    assert _snapshot(out) == before and not (out / ".widenet-overwritten").exists()


def test_resume_names_a_changed_model_setting_before_loading_weights(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A changed model setting on --resume is named with both values (it used to surface as a
    list of weight shapes that do not fit), and the run is left as it was."""
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[0] == 0
    before = _snapshot(out)
    args = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--resume", "--set", "num_experts=8",
                       "--batch-size", 16)
    line = _one_line_error(*_cli(args, capsys)[::2])
    assert "cannot resume with different settings (batch_size: 32 -> 16, num_experts: 4 -> 8)" in line
    assert _snapshot(out) == before


def test_a_dense_run_saved_with_moe_settings_still_resumes(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """Before MoE settings were refused on a dense model, compare-text gave top_k=1 to every model
    and runs saved it; resuming such a run (run.sh again) must not call that a changed setting."""
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--model", "vit_tiny", "--max-steps", 2,
                            "--save-every", 1), capsys)[0] == 0
    for meta_file in out.glob("checkpoints/step_*/meta.json"):  # as the older widenet wrote it
        meta = json.loads(meta_file.read_text())
        meta["model_config"]["encoder"]["moe"]["top_k"] = 1
        meta["train_config"]["model_overrides"]["top_k"] = 1
        meta_file.write_text(json.dumps(meta))
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--model", "vit_tiny", "--max-steps", 3,
                                       "--resume"), capsys)
    assert rc == 2 and "max_steps: 2 -> 3" in err and "top_k" not in err  # only the real change is named
    (out / "checkpoints" / "latest").write_text("step_00000001\n")
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    rc, stdout, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--model", "vit_tiny", "--max-steps", 2,
                                       "--resume"), capsys)
    assert rc == 0 and "(step 1)" in stdout + err, err
    # an MoE model's top_k is still a setting a resume must keep
    wide = tmp_path / "wide"
    assert _cli(_train_args(fmnist_dir, wide, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    line = _one_line_error(*_cli(_train_args(fmnist_dir, wide, tiny_set_args, "--max-steps", 1, "--resume",
                                             "--top-k", 1), capsys)[::2])
    assert "top_k: 2 -> 1" in line


def test_resume_for_a_longer_run_says_how_to_train_on(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A finished run cannot be resumed with a larger --max-steps (its schedule was planned for the
    old length); the refusal says how to go on, and that command works."""
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[0] == 0
    before = _snapshot(out)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 4, "--resume"),
                                 capsys)[::2])
    assert "cannot resume with different settings (max_steps: 2 -> 4)" in line
    assert ("to train for another length start a new run from this one's weights: "
            f"--init {out} --out NEW_FOLDER") in line
    assert _snapshot(out) == before
    rc, stdout, err = _cli(["train", "--init", out, "--data-dir", fmnist_dir, "--max-steps", 2, "--batch-size", 32,
                            "--out", tmp_path / "more"], capsys)
    assert rc == 0, err
    args = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--lr", 0.5, "--resume")
    line = _one_line_error(*_cli(args, capsys)[::2])
    assert "--init" not in line  # a changed recipe gets no such hint


# --------------------------------------------------------------------------
# Strict settings: the Python API and the command line refuse the same values
# --------------------------------------------------------------------------
CONFIGS = {
    MoEConfig: {}, EncoderConfig: {}, VisionConfig: {}, TextConfig: {}, AugmentConfig: {}, TrainConfig: {},
    PretrainConfig: dict(corpus=["corpus.txt"]), FinetuneConfig: dict(init="run", train="a.tsv", validation="b.tsv"),
}


@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda c: c.__name__)
def test_every_config_refuses_wrong_types_and_numbers_out_of_range(cls):
    """Each simple field of every config, given a value of the wrong type or a number without meaning."""
    base = CONFIGS[cls]
    cls(**base)  # the defaults are valid
    checked = 0
    for name, (kind, optional) in field_kinds(cls).items():
        if name in base:
            continue
        wrong_type = {bool: ["false", 1, None], int: [1.5, True, "3", None], float: ["0.1", True, None],
                      str: [3, None, True]}[kind]
        out_of_range = {bool: [], int: [2**70], float: [math.nan, math.inf, -math.inf, 1e39], str: []}[kind]
        for value, error in [(v, SettingTypeError) for v in wrong_type] + [(v, SettingError) for v in out_of_range]:
            if value is None and optional:
                continue
            with pytest.raises(error, match=name):
                cls(**base, **{name: value})
            checked += 1
        if optional:
            cls(**base, **{name: None})
    assert checked >= 3


def test_boolean_words_on_the_command_line():
    for word, value in [("true", True), ("Yes", True), ("1", True), ("FALSE", False), ("no", False), ("0", False)]:
        assert parse_setting_text(word, bool, False, "share_norms") is value
    for bad in ("maybe", "", "2", "nan", "'True'"):
        with pytest.raises(SettingError, match="share_norms must be true or false"):
            parse_setting_text(bad, bool, False, "share_norms")
    with pytest.raises(SettingError, match="capacity_factor must be a finite number"):
        parse_setting_text("nan", float, False, "capacity_factor")


def test_share_norms_false_really_is_false(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """`--set share_norms=false` used to keep the truthy string "false": the norms were shared."""
    runs = {}
    for word in ("false", "yes"):
        out = tmp_path / word
        rc, _, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1, "--set",
                                      f"share_norms={word}"), capsys)
        assert rc == 0, err
        runs[word] = load_checkpoint(out)
    assert runs["false"].meta["model_config"]["encoder"]["share_norms"] is False
    assert runs["yes"].meta["model_config"]["encoder"]["share_norms"] is True
    norms = lambda c: sum(v.numel() for k, v in c.model_state.items() if "norm" in k)  # noqa: E731
    assert norms(runs["false"]) > norms(runs["yes"])  # per-block norms hold more parameters


FINITE = "must be a finite number within +-3.4e+38, got"


@pytest.mark.parametrize("flags, message", [
    (["--noise-std", "nan"], f"argument --noise-std: {FINITE} 'nan'"),
    (["--mixup", "nan"], f"argument --mixup: {FINITE} 'nan'"),
    (["--capacity-factor", "inf"], f"argument --capacity-factor: {FINITE} 'inf'"),
    (["--set", "capacity_factor=nan"], "capacity_factor must be a finite number, got 'nan'"),
    (["--set", "share_norms=maybe"], "share_norms must be true or false (or yes/no, 1/0), got 'maybe'"),
    (["--lr", "1e300"], f"argument --lr: {FINITE} '1e300'"),
    (["--set", "num_classes=" + "9" * 30], "num_classes must be an integer within +-9.22e+18"),
    (["--out", ""], "argument --out: must not be empty"),
    (["--randaugment-m", "-1"], "randaugment_m must be in (0, 30), got -1.0"),
    (["--set", "image_size=0"], "--set image_size=0: image_size must be a positive integer"),  # not "--image-size 0"
])
def test_meaningless_values_stop_before_training(tmp_path, fmnist_dir, tiny_set_args, capsys, flags, message):
    """Each is refused in one line that names the value and what it must be, before anything trains."""
    out = tmp_path / "run"
    args = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1)
    if flags[0] == "--out":
        args[args.index("--out") + 1] = ""
    else:
        args += flags
    rc, _, err = _cli(args, capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not (out / "metrics.jsonl").exists()


def test_moe_settings_for_a_model_without_moe_layers_are_refused(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """--top-k, --dropless, --set num_experts=... on a dense model used to be accepted and ignored:
    a run that said nothing about its MoE flags having no effect."""
    from widenet import create_model
    from widenet.models.registry import model_config, settings_for

    for flags in (["--top-k", 1], ["--dropless"], ["--set", "num_experts=8"]):
        line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--model", "vit_tiny",
                                                 "--max-steps", 1, *flags), capsys)[::2])
        assert "the model has no MoE layer (moe_blocks=" in line and "give it MoE layers (moe_blocks=all" in line, line
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--max-steps", 1,
                                             "--set", "moe_blocks=every:4"), capsys)[::2])  # every 4th of 2 blocks
    assert "moe_blocks='every:4' picks no block of depth=2" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"^top_k, dropless: the model has no MoE layer"):
        create_model("albert_text_tiny", top_k=1, dropless=True)
    assert create_model("vit_tiny", moe_blocks="last:1", top_k=1, depth=2).cfg.encoder.moe.top_k == 1
    # a driver giving one set of settings to several models (compare) gives the dense ones none of the MoE's
    assert settings_for(model_config("vit_tiny"), dict(top_k=1, depth=2)) == dict(depth=2)
    assert settings_for(model_config("widenet_tiny"), dict(top_k=1, depth=2)) == dict(top_k=1, depth=2)


def test_an_unknown_model_setting_names_the_nearest_and_all_settings(tmp_path, fmnist_dir, tiny_set_args, capsys):
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--set", "num_expert=8",
                                             "--set", "topk=1"), capsys)[::2])
    assert "unknown model setting(s): num_expert, topk (did you mean " in line
    near = line.split("did you mean ")[1].split("?")[0].split(", ")
    assert {"num_experts", "top_k"} <= set(near)
    listed = line.split("the settings of VisionConfig are ")[1].split(", ")
    assert listed == sorted(listed) and {"depth", "num_experts", "top_k", "stem"} <= set(listed)
    assert "encoder" not in listed and "moe" not in listed  # nested configs, not settings


@pytest.mark.parametrize("argv, message", [
    (["train", "--init", "RUN", "--model", "vit_tiny"], "--model vit_tiny and --init both given: the run trains "
                                                        "--init's model; leave --model out"),
    (["pretrain", "--init", "RUN", "--model", "bert_text_tiny", "--corpus", "c.txt"], "--model bert_text_tiny and "
                                                                                      "--init both given"),
    (["train", "--set", "depth=1", "--set", "dim=8", "--set", "depth=2"], "--set depth given more than once"),
    (["pretrain", "--corpus", "c.txt", "--tokenizer", "t.json", "--vocab-size", 500],
     "--vocab-size would change nothing with --tokenizer (it sizes a tokenizer trained on the corpus"),
    (["pretrain", "--corpus", "c.txt", "--init", "RUN", "--vocab-size", 500], "--vocab-size would change nothing "
                                                                              "with --init"),
    (["finetune", "--task", "classify", "--init", "RUN", "--train", "t.tsv", "--validation", "v.tsv",
      "--doc-stride", 64, "--null-threshold", 1], "--doc-stride, --null-threshold would change nothing with --task "
                                                  "classify (they are span QA settings); leave them out"),
])
def test_flags_that_would_change_nothing_are_refused(tmp_path, capsys, argv, message):
    """Each was accepted and ignored (the last --set won; --model trained --init's model anyway)."""
    rc, _, err = _cli([*argv, "--out", tmp_path / "out"], capsys)
    assert message in _one_line_error(rc, err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Data contracts
# --------------------------------------------------------------------------
def _image_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    """root/<split>/<class>/<i>.png, two small images per class, one brightness per class."""
    for split, names in classes.items():
        for k, name in enumerate(names):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("L", (8, 8), 40 * k + 5 * i).save(root / split / name / f"{i}.png")
    return root


def _folder_args(data_dir: Path, out: Path, tiny_set_args) -> list:
    return ["train", "--data", "folder", "--data-dir", data_dir, "--image-size", 8, "--out", out, "--batch-size", 4,
            "--max-steps", 1, "--device", "cpu", "--set", "patch_size=4", *tiny_set_args]


@pytest.mark.parametrize("test_classes, expected", [
    (["cat", "dog", "owl"], "owl not among"),  # a test class that train lacks: was "Target 2 is out of bounds"
    (["ant", "bee"], "ant, bee not among"),  # the same count, other names: was trained and scored silently
    (["cat"], "lacks dog"),
])
def test_train_and_test_classes_must_match(tmp_path, tiny_set_args, capsys, test_classes, expected):
    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "test": test_classes})
    line = _one_line_error(*_cli(_folder_args(data, tmp_path / "run", tiny_set_args), capsys)[::2])
    assert "classes differ" in line and expected in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_class_is_refused(tmp_path, tiny_set_args, capsys):
    data = _image_folder(tmp_path / "data", {"train": ["cat"], "test": ["cat"]})
    line = _one_line_error(*_cli(_folder_args(data, tmp_path / "run", tiny_set_args), capsys)[::2])
    assert "only one class (cat)" in line


def test_eval_and_resume_check_the_class_names(tmp_path, tiny_set_args, capsys):
    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    other = _image_folder(tmp_path / "other", {"train": ["ant", "bee"], "test": ["ant", "bee"]})
    out = tmp_path / "run"
    assert _cli(_folder_args(data, out, tiny_set_args), capsys)[0] == 0
    before = _snapshot(out)
    line = _one_line_error(*_cli(["eval", "--checkpoint", out, "--data-dir", other, "--device", "cpu"], capsys)[::2])
    assert "classes differ from the checkpoint's" in line
    line = _one_line_error(*_cli(_folder_args(other, out, tiny_set_args) + ["--resume"], capsys)[::2])
    assert "this run's data differs from the checkpoint's (classes ['ant', 'bee'] here, ['cat', 'dog'] in the " \
           "checkpoint)" in line
    assert _snapshot(out) == before


def test_eval_on_a_text_run_is_one_line(capsys):
    line = _one_line_error(*_cli(["eval", "--checkpoint", FIXTURES / "text_run", "--device", "cpu"], capsys)[::2])
    assert "a text run" in line


def test_pretraining_corpus_too_small_to_hold_out(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("One short sentence. And another one.\n\nA second document here. It ends.\n")
    args = ["pretrain", "--corpus", corpus, "--vocab-size", 60, "--seq-len", 16, "--max-steps", 1, "--device",
            "cpu", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run", "--set", "dim=16",
            "--set", "depth=1", "--set", "num_heads=2", "--set", "mlp_dim=32", "--set", "embedding_size=8"]
    line = _one_line_error(*_cli(args, capsys)[::2])
    assert str(corpus) in line and "at least 10 are needed to hold one out" in line


def test_a_sequence_longer_than_the_positions_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    line = _one_line_error(*_cli(["pretrain", "--corpus", FIXTURES / "corpus.txt", "--seq-len", 200, "--out", out,
                                  "--device", "cpu"], capsys)[::2])
    assert "sequence length 200 exceeds widenet_text_tiny's 128 positions" in line
    assert not out.exists()  # no tokenizer trained on the corpus first, no folder claimed


def test_sequences_much_longer_than_the_documents_are_noted(tmp_path, capsys):
    args = ["pretrain", "--corpus", FIXTURES / "corpus.txt", "--vocab-size", 200, "--max-steps", 1, "--device",
            "cpu", "--cache-dir", tmp_path / "cache", "--set", "dim=16", "--set", "depth=1", "--set", "num_heads=2",
            "--set", "mlp_dim=32", "--set", "embedding_size=8"]
    rc, _, err = _cli(args + ["--seq-len", 128, "--out", tmp_path / "long"], capsys)
    assert rc == 0 and "% padding: the corpus's documents are much shorter than --seq-len 128" in err
    rc, _, err = _cli(args + ["--seq-len", 16, "--out", tmp_path / "short"], capsys)
    assert rc == 0 and "padding" not in err


def test_a_leftover_tokenizer_is_not_reused(tmp_path, capsys):
    """An earlier attempt's OUT/tokenizer.json (no checkpoint) used to be reused, ignoring --vocab-size."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(FIXTURES / "text_run" / "tokenizer.json", out / "tokenizer.json")
    args = ["pretrain", "--corpus", FIXTURES / "corpus.txt", "--out", out, "--max-steps", 1, "--device", "cpu"]
    line = _one_line_error(*_cli(args, capsys)[::2])  # not "pass --resume", which would then refuse too
    assert "already holds a run that never saved a checkpoint (tokenizer.json): nothing to resume; pass --overwrite" \
        in line and "--resume" not in line
    line = _one_line_error(*_cli(args + ["--resume"], capsys)[::2])
    assert "holds no complete checkpoint to resume, only tokenizer.json" in line


def test_a_text_run_that_saved_nothing_leaves_no_tokenizer_behind(tmp_path, capsys, monkeypatch):
    """A pretraining or fine-tuning run that ended before its first checkpoint (Ctrl-C while the corpus
    was read, a crash in the first step) left OUT/tokenizer.json, so running it again was refused
    until --overwrite; now it leaves nothing, unless it logged steps (their metrics are kept)."""
    from widenet.train import pretrain as pretrain_module
    from widenet.train import trainer

    out = tmp_path / "pre"
    args = ["pretrain", "--corpus", FIXTURES / "corpus.txt", "--vocab-size", 200, "--seq-len", 16, "--max-steps", 1,
            "--device", "cpu", "--cache-dir", tmp_path / "cache", "--out", out, "--set", "dim=16", "--set", "depth=1",
            "--set", "num_heads=2", "--set", "mlp_dim=32", "--set", "embedding_size=8"]

    def interrupted(*_args, **_kwargs):
        assert (out / "tokenizer.json").is_file()  # saved by then
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module, "load_pretrain_corpus", interrupted)
        rc, _, err = _cli(args, capsys)
    assert rc == 130 and err.strip().splitlines()[-1] == "widenet: interrupted; next: run it again", err
    assert sorted(p.name for p in out.iterdir()) == []
    assert _cli(args, capsys)[0] == 0  # no --overwrite needed

    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"the cat sat {i}\t{('good', 'bad')[i % 2]}\n" for i in range(8)))
    tune = ["finetune", "--task", "classify", "--init", out, "--train", data, "--validation", data, "--epochs", 1,
            "--batch-size", 2, "--log-every", 1, "--device", "cpu", "--out", tmp_path / "tuned"]
    real_update, calls = trainer.Trainer.update, []

    def fails_at(step: int):
        def update(self, *a, **kw):
            calls.append(1)
            if len(calls) == step:
                raise RuntimeError("a crash in the step")
            return real_update(self, *a, **kw)
        return update

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "update", fails_at(1))
        assert _cli(tune, capsys)[0] == 1
    assert not (tmp_path / "tuned").exists() or not any((tmp_path / "tuned").iterdir())
    calls.clear()
    with monkeypatch.context() as patch:  # a crash after a logged step: its metrics stay, and so does the tokenizer
        patch.setattr(trainer.Trainer, "update", fails_at(2))
        assert _cli(tune, capsys)[0] == 1
    assert {p.name for p in (tmp_path / "tuned").iterdir()} >= {"metrics.jsonl", "tokenizer.json"}
    rc, _, err = _cli(tune, capsys)
    assert rc == 2 and "already holds a run that never saved a checkpoint (metrics.jsonl, tokenizer.json)" in \
        err.strip().splitlines()[-1]


def test_finetuning_needs_two_labels_and_a_validation_set(tmp_path, capsys):
    one_label = tmp_path / "train.tsv"
    one_label.write_text("sentence\tlabel\na b c\tgood\nd e f\tgood\n")
    empty = tmp_path / "validation.tsv"
    empty.write_text("sentence\tlabel\n")
    base = ["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--out", tmp_path / "run", "--device",
            "cpu"]
    line = _one_line_error(*_cli(base + ["--train", one_label, "--validation", one_label], capsys)[::2])
    assert "every example has the label 'good'" in line
    two = tmp_path / "two.tsv"
    two.write_text("sentence\tlabel\na b c\tgood\nd e f\tbad\n")
    line = _one_line_error(*_cli(base + ["--train", two, "--validation", empty], capsys)[::2])
    assert str(empty) in line and "no examples" in line
    unnamed = tmp_path / "category.tsv"  # a label column under a name the reader does not know
    unnamed.write_text("sentence\tcategory\na b c\tgood\nd e f\tbad\n")
    line = _one_line_error(*_cli(base + ["--train", unnamed, "--validation", two], capsys)[::2])
    assert f"{unnamed}: no label column; name it gold_label or label or is_duplicate" in line


def test_task_files_that_would_score_the_wrong_thing(tmp_path, capsys):
    """Files that read fine one by one but would give a meaningless score: a header naming a
    column twice (a row as a dict keeps the last), pairs for training but single sentences for
    validation, and SQuAD questions sharing an id (answers and scores are looked up by id)."""
    base = ["finetune", "--init", FIXTURES / "text_run", "--out", tmp_path / "run", "--device", "cpu",
            "--max-steps", 1]
    single = tmp_path / "single.tsv"
    single.write_text("sentence\tlabel\na b c\tgood\nd e f\tbad\n")
    twice = tmp_path / "twice.tsv"
    twice.write_text("sentence\tsentence\tlabel\na b\tc d\tgood\ne f\tg h\tbad\n")
    line = _one_line_error(*_cli(base + ["--task", "classify", "--train", twice, "--validation", single],
                                 capsys)[::2])
    assert "twice.tsv line 1: column 'sentence' appears more than once" in line
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\na b\tc d\tgood\ne f\tg h\tbad\n")
    line = _one_line_error(*_cli(base + ["--task", "classify", "--train", pairs, "--validation", single],
                                 capsys)[::2])
    assert f"{single} has single sentences but {pairs} has sentence pairs" in line
    context = "The Eiffel Tower is in Paris."
    qas = [{"id": "1", "question": "Where is it?", "answers": [{"text": "Paris", "answer_start": 23}]},
           {"id": "1", "question": "What is in Paris?", "answers": [{"text": "The Eiffel Tower", "answer_start": 0}]}]
    squad = tmp_path / "dup.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}))
    line = _one_line_error(*_cli(base + ["--task", "qa", "--train", squad, "--validation", squad], capsys)[::2])
    assert "qas[1]: question id '1' appears twice (first at data[0] ('T') paragraphs[0] qas[0])" in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))


def test_a_library_warning_reaches_the_user_as_one_note(tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{'bird ' * n}sings\t{'ab'[n % 2]}\n" for n in range(1, 9)))
    rc, _, err = _cli(["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--train", data,
                       "--validation", data, "--max-len", 6, "--max-steps", 1, "--out", tmp_path / "run"], capsys)
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "longer than" in line]
    assert len(notes) == 1  # training and validation sets: the same file, so the same note, said once
    assert all(re.fullmatch(rf"widenet: note: {re.escape(str(data))}: \d of 8 examples were longer than "
                            r"max_len=6 tokens and were truncated \(longest first\)", line) for line in notes), notes
    assert "UserWarning" not in err and "encode_classification" not in err  # no file:line, no source line
    other = tmp_path / "validation.tsv"
    shutil.copy(data, other)  # another file: another note
    rc, _, err = _cli(["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--train", data,
                       "--validation", other, "--max-len", 6, "--max-steps", 1, "--out", tmp_path / "run2"], capsys)
    assert rc == 0, err
    assert [line.split(": ")[2] for line in err.splitlines() if "longer than" in line] == [str(data), str(other)]


def test_each_distinct_note_is_said_once_per_command(capsys, monkeypatch):
    """Python's "once per place" forgets what it showed whenever the warning filters change (any
    catch_warnings block): compare-text said one data note for each of its six fine-tuning runs."""
    import warnings
    from widenet.cli_errors import warnings_as_notes

    def note(text):
        warnings.warn(text, stacklevel=1)

    with warnings_as_notes():
        for _ in range(3):
            note("data.tsv: 3 of 1500 examples were longer than max_len=64 tokens")
            with warnings.catch_warnings():  # as torch.load's callers do, between the runs
                warnings.simplefilter("ignore")
            note("corpus.txt: 2 lines skipped")
    assert capsys.readouterr().err.splitlines() == [
        "widenet: note: data.tsv: 3 of 1500 examples were longer than max_len=64 tokens",
        "widenet: note: corpus.txt: 2 lines skipped"]
    monkeypatch.setenv("RANK", "1")  # under torchrun the first process alone says them: one line, not one each
    with warnings_as_notes():
        note("data.tsv: 3 of 1500 examples were longer than max_len=64 tokens")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------
# The error boundary: files, disks, memory, damaged runs, bugs
# --------------------------------------------------------------------------
def test_out_that_cannot_be_a_folder(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A file given as --out (or standing where a folder above it would be) is refused in one line that
    names the flag, the file and the way out, alike in every command that writes a folder."""
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")

    def refused(argv, flag="--out", way_out=None):
        way_out = way_out or f"choose another {flag}"
        assert _one_line_error(*_cli([*argv, flag, a_file], capsys)[::2]) == (
            f"widenet: error: {flag} {a_file} is a file, not a folder; {way_out}")
        assert _one_line_error(*_cli([*argv, flag, a_file / "inner"], capsys)[::2]) == (
            f"widenet: error: {flag} {a_file / 'inner'}: {a_file} is a file, not a folder; {way_out}")

    refused(["train", "--data-dir", fmnist_dir, "--batch-size", 32, "--device", "cpu", *tiny_set_args,
             "--max-steps", 1])
    if Path("/proc/self").exists():
        line = _one_line_error(*_cli(_train_args(fmnist_dir, "/proc/widenet-run", tiny_set_args, "--max-steps", 1),
                                     capsys)[::2])
        assert "/proc/widenet-run" in line
    tasks = tmp_path / "task.tsv"
    tasks.write_text("sentence\tlabel\nthe cat sleeps\ta\nthe dog runs\tb\n")
    refused(["pretrain", "--corpus", FIXTURES / "corpus.txt", "--max-steps", 1])
    refused(["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--train", tasks, "--validation",
             tasks, "--max-steps", 1])
    # the comparisons, before they load data or train a tokenizer (they failed at their first run)
    refused(["compare", "--models", "vit_tiny", "--max-steps", 1])
    refused(["compare-text"])
    refused(["gcide-task", "pos", "--gcide", tmp_path / "no-gcide"],
            way_out="choose a folder for train.tsv and validation.tsv")
    # the model-folder writers (export, upcycle, import), before they read their source
    run = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, run, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    refused(["export", run], flag="--to")
    refused(["upcycle", "--from", run, "--experts", 2])
    refused(["import", tmp_path / "no-hf-folder"])
    # the Python API has no flags: save_pretrained names the path and "another destination"
    with pytest.raises(NotADirectoryError, match=rf"^{re.escape(str(a_file / 'inner'))}: {re.escape(str(a_file))} is a "
                       r"file, not a folder; choose another destination$"):
        widenet.save_pretrained(create_model("vit_tiny", **TINY), a_file / "inner")
    assert a_file.read_text() == "precious"
    if Path("/proc/self").exists():  # (export names the destination, never its .tmp- folder)
        line = _one_line_error(*_cli(["export", run, "--to", "/proc/widenet-model"], capsys)[::2])
        assert line.endswith("/proc/widenet-model: No such file or directory") and ".tmp-" not in line, line


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_read_only_folder(tmp_path, fmnist_dir, tiny_set_args, capsys):
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=1m")
    try:
        line = _one_line_error(*_cli(_train_args(fmnist_dir, mount / "run", tiny_set_args, "--max-steps", 1),
                                     capsys)[::2])
        assert str(mount / "run") in line and "Read-only file system" in line
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_full_disk_keeps_the_last_checkpoint(tmp_path, fmnist_dir, tiny_set_args, capsys, monkeypatch):
    """The disk fills up right after the step-2 checkpoint: the step-4 save fails with one line, and the
    step-2 checkpoint stays complete, named by `latest`, with no partial folder beside it."""
    import widenet.train.trainer as trainer_module

    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=4m")
    out, saved = mount / "run", {}
    real_save = trainer_module.save_checkpoint

    def save_then_fill_the_disk(*args, **kwargs):
        folder = real_save(*args, **kwargs)
        saved.update(_snapshot(out / "checkpoints"))
        with open(mount / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
        return folder

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_fill_the_disk)
    try:
        line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 4, "--save-every",
                                                 2), capsys)[::2])
        assert line.startswith("widenet: error: no space left on device (") and str(out) in line
        assert line.endswith("free some space and --resume")
        (mount / "filler").unlink()
        assert _snapshot(out / "checkpoints") == saved and load_checkpoint(out).step == 2
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_a_cache_on_a_full_disk_is_skipped_with_a_note(tmp_path, capsys):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos"), which the optional caches
    did not catch: the run died as "a bug in widenet"."""
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=64k")
    try:
        with pytest.raises(OSError) as caught:
            save_atomic({"x": torch.zeros(100_000)}, mount / "big.pt")
        assert caught.value.errno == errno.ENOSPC and list(mount.iterdir()) == []
        args = ["pretrain", "--corpus", FIXTURES / "corpus.txt", "--vocab-size", 200, "--seq-len", 16, "--max-steps",
                1, "--device", "cpu", "--cache-dir", mount / "cache", "--out", tmp_path / "run", "--set", "dim=16",
                "--set", "depth=1", "--set", "num_heads=2", "--set", "mlp_dim=32", "--set", "embedding_size=8"]
        with open(mount / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
        rc, _, err = _cli(args, capsys)
        assert rc == 0 and "could not write corpus cache" in err and "continuing without it" in err
    finally:
        assert subprocess.run(["umount", str(mount)]).returncode == 0  # no file left open on it


def test_a_full_disk_advises_what_will_work_once_space_is_freed(tmp_path, fmnist_dir, tiny_set_args, capsys,
                                                               monkeypatch):
    """--resume only where a checkpoint of this run waits: a run whose first save failed has none (--resume
    would refuse), and an --overwrite run that failed before its first save put the earlier run back
    (--resume would continue that one). Each piece of advice is then followed and works."""
    import widenet.train.trainer as trainer_module

    real_save = trainer_module.save_checkpoint

    def disk_full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoints"))

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "save_checkpoint", disk_full)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[::2])
    assert line.endswith("free some space and run it again with --overwrite (the run saved no checkpoint to "
                         "resume from)")
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert "holds no complete checkpoint" in _one_line_error(
        *_cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--resume"), capsys)[::2])
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--overwrite"), capsys)[0] == 0
    kept = _snapshot(out / "checkpoints")

    monkeypatch.setattr(trainer_module, "save_checkpoint", disk_full)  # replacing that run fails at its first save
    rc, _, err = _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--overwrite", "--seed", 5),
                      capsys)
    assert rc == 2 and err.rstrip().endswith("free some space and run it again with --overwrite (the earlier run in "
                                             "the folder was put back)"), err
    assert _snapshot(out / "checkpoints") == kept
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--overwrite", "--seed", 5),
                capsys)[0] == 0

    saves = []  # a longer run whose second save fails: its first checkpoint waits for --resume

    def second_save_fails(*args, **kwargs):
        saves.append(1)
        return real_save(*args, **kwargs) if len(saves) == 1 else disk_full()

    monkeypatch.setattr(trainer_module, "save_checkpoint", second_save_fails)
    longer = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 4, "--save-every", 2, "--seed", 5)
    line = _one_line_error(*_cli([*longer, "--overwrite"], capsys)[::2])
    assert line.endswith("free some space and --resume"), line
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert _cli([*longer, "--resume"], capsys)[0] == 0 and load_checkpoint(out).step == 4


def test_a_full_disk_advises_resume_only_where_there_is_one(tmp_path, capsys, monkeypatch):
    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shipped"))

    monkeypatch.setattr("widenet.train.exported.write_export", full)
    line = _one_line_error(*_cli(["export", FIXTURES / "text_run", "--to", tmp_path / "shipped"], capsys)[::2])
    assert line == f"widenet: error: no space left on device ({tmp_path / 'shipped'}); free some space and run it again"


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_an_export_to_a_read_only_disk_names_the_destination(tmp_path, capsys):
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=1m")
    try:
        line = _one_line_error(*_cli(["export", FIXTURES / "text_run", "--to", mount / "shipped"], capsys)[::2])
        assert line == f"widenet: error: {mount / 'shipped'}: Read-only file system"  # not its .tmp- folder
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_image_size_that_cannot_fit_in_memory(tmp_path, fmnist_dir, tiny_set_args, capsys):
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--max-steps", 1,
                                             "--image-size", 100000, "--train-subset", 2), capsys)[::2])
    assert "out of memory" in line and re.search(r"need [0-9.]+ [GTP]iB, more than", line)


@pytest.mark.parametrize("num_bytes, shown", [(5 << 20, "5.0 MiB"), ((1 << 30) - (1 << 20), "1023.0 MiB"),
                                               (3 << 30, "3.0 GiB"), (int(1.5 * 2**40), "1.5 TiB"),
                                               (int(178841400.1 * 2**30), "170.6 PiB"), (2**62, "4.0 EiB")])
def test_sizes_in_messages_keep_their_number_under_1024(num_bytes, shown):
    """bench moe at 10^8 tokens once asked for "178841400.1 GiB"."""
    assert readable_size(num_bytes) == shown


def test_available_memory_counts_reclaimable_cache_and_can_be_overruled(tmp_path, monkeypatch):
    """A container's memory.current counts page cache (checkpoints just written): left in, a model
    that fits was refused ("0.0 GiB > -0.0 GiB")."""
    import widenet.memory as memory

    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("1100000000\n")  # over the limit, mostly cache
    (tmp_path / "memory.stat").write_text("anon 500000000\ninactive_file 500000000\n")
    monkeypatch.setattr(memory, "_CGROUP", tmp_path)
    assert memory.available_memory() == 1000000000 - 600000000
    memory.check_fits_memory(300_000_000, "the weights")  # fits
    with pytest.raises(MemoryError, match="WIDENET_NO_MEMORY_CHECK=1 skips this check"):
        memory.check_fits_memory(500_000_000, "the weights")
    # cgroup v1 (older container hosts): its own file names; an unlimited v1 limit is a number near 2**63
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1000000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("800000000\n")
    (v1 / "memory" / "memory.stat").write_text("rss 500000000\ntotal_inactive_file 300000000\n")
    monkeypatch.setattr(memory, "_CGROUP", v1)
    assert memory.available_memory() == 1000000000 - 500000000
    monkeypatch.setenv("WIDENET_NO_MEMORY_CHECK", "1")
    memory.check_fits_memory(500_000_000, "the weights")


def test_weights_or_training_state_beyond_the_memory_are_refused_before_allocating(
        tmp_path, fmnist_dir, tiny_set_args, capsys, monkeypatch):
    """Weights that each fit but together do not used to fill the machine until the kernel killed the
    process without a word; now the sizes are checked against the memory available first."""
    import widenet.memory as memory

    weights = 4 * sum(p.numel() for p in create_model("widenet_tiny", **TINY).parameters())
    monkeypatch.setattr(memory, "available_memory", lambda: weights - 1)
    with pytest.raises(MemoryError, match=r"the model's weights \(.* parameters\) need .* MiB, more than the"):
        create_model("widenet_tiny", **TINY)
    line = _one_line_error(*_cli(["bench", "moe", "--tokens", 64, "--dim", 4096, "--hidden", 16384, "--experts", 64,
                                  "--repeats", 1], capsys)[::2])
    assert line.startswith("widenet: error: out of memory: the model's weights (8,591,507,456 parameters) need")
    # The weights fit, their gradients and AdamW's moments do not (a batch's activations would: at least
    # 1 image x 50 tokens x 2 blocks x (8 vectors of width 32 + 2 of the top-2 experts' 2 x 64) x 4 bytes).
    assert 1 * 50 * TINY["depth"] * (8 * TINY["dim"] + 2 * 2 * TINY["mlp_dim"]) * 4 < 2.5 * weights < 3 * weights
    monkeypatch.setattr(memory, "available_memory", lambda: int(2.5 * weights))
    rc, _, err = _cli(_train_args(fmnist_dir, tmp_path / "run", tiny_set_args, "--max-steps", 1, "--batch-size", 1),
                      capsys)
    note, line = err.strip().splitlines()  # the activations take more than half: noted
    assert rc == 2 and "the gradients and optimizer state of training need" in line
    assert "need at least 0.2 MiB of the 0.2 MiB of memory available: the process may be stopped" in note
    # Images resized to 280 px: 4901 tokens each (--image-size 5000 got the process killed after 90 s);
    # 32 x 4901 x 2 blocks x (8 x 32 + 2 x 2 x 64) x 4 bytes = 612.6 MiB.
    monkeypatch.setattr(memory, "available_memory", lambda: 2**28)
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "big", tiny_set_args, "--max-steps", 1,
                                             "--image-size", 280), capsys)[::2])
    assert "the activations of a batch of 32 images of 280 px (4901 tokens each) need 612.6 MiB, more than the " \
           "256.0 MiB of memory available" in line
    line = _one_line_error(*_cli(_train_args(fmnist_dir, tmp_path / "big16", tiny_set_args, "--max-steps", 1,
                                             "--image-size", 280, "--amp", "bf16"), capsys)[::2])
    assert "(4901 tokens each) need 306.3 MiB" in line  # 2 bytes a value under bf16 autocast
    # The benchmarks: `bench moe --tokens 100000000` and a huge `bench model` batch were killed unannounced.
    line = _one_line_error(*_cli(["bench", "moe", "--tokens", 10**8, "--dim", 16, "--hidden", 32, "--repeats", 1],
                                 capsys)[::2])
    assert "the activations of 100,000,000 tokens (the one-hot einsum's two 100,000,000 x 4 x 60,000,000 " in line
    line = _one_line_error(*_cli(["bench", "model", "widenet_tiny", *tiny_set_args, "--batch-size", 10**4, "--steps",
                                  1, "--device", "cpu"], capsys)[::2])
    assert "the activations of widenet_tiny for a batch of 10000 images of 28 px (50 tokens each) need 1.9 GiB" \
           in line  # 10**4 x 50 x 2 x 512 x 4 bytes


def test_a_text_batch_beyond_the_memory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """Text runs had no activation check: 64 sequences of 512 tokens at width 2048 trained a tokenizer,
    then were left to the kernel's out-of-memory killer. Lower bound: batch x tokens x blocks x (8 vectors
    of width D + 2 of top-k x the expert width H) x 4 bytes."""
    import widenet.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 3 * 2**19)  # 1.5 MiB
    out = tmp_path / "pretrain"  # widenet_text_tiny: D 128, H 256, 4 blocks: 16 x 128 x 4 x (1024 + 1024) x 4
    line = _one_line_error(*_cli(["pretrain", "--corpus", FIXTURES / "corpus.txt", "--batch-size", 16, "--out", out,
                                  "--device", "cpu"], capsys)[::2])
    assert "the activations of a batch of 16 sequences of 128 tokens need 64.0 MiB, more than the 1.5 MiB" in line
    assert not out.exists()  # refused before a tokenizer was trained and a folder claimed
    # The fixture's model: D 16, H 32, 2 blocks: 128 x 32 x 2 x (128 + 128) x 4 = 8 MiB; 4 MiB for 16 tokens.
    line = _one_line_error(*_cli(["pretrain", "--corpus", FIXTURES / "corpus.txt", "--init", FIXTURES / "text_run",
                                  "--seq-len", 32, "--batch-size", 128, "--out", tmp_path / "more", "--device", "cpu"],
                                 capsys)[::2])
    assert "the activations of a batch of 128 sequences of 32 tokens need 8.0 MiB" in line
    data = tmp_path / "train.tsv"  # rows truncated to --max-len 16 tokens: the longest is 16; 128 of them
    data.write_text("sentence\tlabel\n" + "".join(f"{'the cat sat on the mat ' * 6}\t{label}\n"
                                                  for label in ("good", "bad") * 64))
    rc, _, err = _cli(["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--train", data,
                       "--validation", data, "--max-len", 16, "--batch-size", 128, "--out", tmp_path / "tuned",
                       "--device", "cpu"], capsys)
    line = err.strip().splitlines()[-1]  # after the truncation notes
    assert rc == 2 and "Traceback" not in err
    assert "the activations of a batch of 128 sequences of 16 tokens need 4.0 MiB, more than the 1.5 MiB" in line
    monkeypatch.setattr(memory, "available_memory", lambda: 2**30)  # and the same batch trains where it fits
    rc, _, err = _cli(["finetune", "--task", "classify", "--init", FIXTURES / "text_run", "--train", data,
                       "--validation", data, "--max-len", 16, "--batch-size", 128, "--epochs", 1, "--out",
                       tmp_path / "tuned", "--device", "cpu"], capsys)
    assert rc == 0, err


def test_damaged_run_folders_are_named(tmp_path, fmnist_dir, tiny_set_args, capsys):
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2), capsys)[0] == 0
    resume = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--resume")  # a finished run
    # A metrics line that is not a record (not the torn last line of a kill).
    metrics = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("[1, 2]\n" + metrics)
    line = _one_line_error(*_cli(resume, capsys)[::2])
    assert "metrics.jsonl line 1: not a metrics record" in line
    (out / "metrics.jsonl").write_text(metrics)
    # A state.pt without the optimizer state.
    state_file = find_latest_checkpoint(out) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"]
    torch.save(state, state_file)
    before = _snapshot(out)
    line = _one_line_error(*_cli(resume, capsys)[::2])  # rewritten since it was saved: its checksum says so
    assert "state.pt: the train state does not match the checksum saved with it" in line and _snapshot(out) == before
    meta_file = state_file.parent / "meta.json"  # as a checkpoint from before the checksum: what it lacks
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "state_sha256"}))
    before = _snapshot(out)
    line = _one_line_error(*_cli(resume, capsys)[::2])
    assert "state.pt: lacks optimizer" in line and _snapshot(out) == before


def test_a_damaged_checkpoint_is_named_not_called_good_or_given_up(tmp_path, fmnist_dir, tiny_set_args, capsys):
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--save-every", 1), capsys)[0] == 0
    resume = _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--save-every", 1, "--resume")
    shutil.rmtree(find_latest_checkpoint(out))  # as if killed before step 2 was saved
    # Bit rot in the latest weights: resuming would train to a NaN loss and blame the step.
    latest = find_latest_checkpoint(out)
    weights = load_file(latest / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], math.nan)
    save_file(weights, latest / "model.safetensors")
    before = _snapshot(out)
    line = _one_line_error(*_cli(resume, capsys)[::2])
    assert f"{latest / 'model.safetensors'}: weight {name} holds NaN" in line and _snapshot(out) == before
    # Only checkpoints that lack a file: named as such, not as "a run that never saved one" to be overwritten.
    for folder in (out / "checkpoints").glob("step_*"):
        (folder / "meta.json").unlink()
    line = _one_line_error(*_cli(resume, capsys)[::2])
    assert "step_00000001 lacks meta.json" in line
    assert "never saved" not in line and "put the missing files back" in line


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import widenet.cli as cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "cmd_list", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    rc, _, err = _cli(["list"], capsys)
    assert rc == 1 and "Traceback" in err and "KeyError: 'internal'" in err
    assert err.strip().splitlines()[-1].startswith("widenet: this is a bug in widenet")


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:  # every sub-command runs `func`
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


class _Crafted:
    """Any class: loading an instance would run its module's code."""


def test_refused_pickles_never_advise_loading_them(tmp_path, fmnist_dir, tiny_set_args, capsys):
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    state_file = find_latest_checkpoint(out) / "state.pt"
    torch.save({"payload": _Crafted()}, state_file)
    line = _one_line_error(*_cli(["eval", "--checkpoint", out, "--ema", "--device", "cpu"], capsys)[::2])
    assert "this file tries to run code" in line and "it was not loaded" in line
    assert "weights_only" not in line.split("(a state.pt")[0]
    json.loads((find_latest_checkpoint(out) / "meta.json").read_text())  # the rest of the run is intact


def test_a_damaged_train_state_stops_only_what_reads_it(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """eval, predict and export use the weights alone, yet read state.pt (the optimizer's moments, all
    of it into memory) and stopped at a damaged one; --ema and --resume, which need it, still refuse."""
    from conftest import damage_in_place

    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--ema-decay", "0.5"), capsys)[0] == 0
    eval_args = ["eval", "--checkpoint", out, "--device", "cpu", "--json"]
    before = {k: v for k, v in json.loads(_cli(eval_args, capsys)[1]).items()}
    state_file = find_latest_checkpoint(out) / "state.pt"
    average = torch.load(state_file, weights_only=True)["ema"]["weights"]["head.weight"]
    damage_in_place(state_file, average.numpy().tobytes())
    rc, printed, err = _cli(eval_args, capsys)
    assert rc == 0 and json.loads(printed) == before, err
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(tmp_path / "shirt.png")
    assert _cli(["predict", "--checkpoint", out, tmp_path / "shirt.png"], capsys)[0] == 0
    assert _cli(["export", out, "--to", tmp_path / "model"], capsys)[0] == 0
    for args in (["eval", "--checkpoint", out, "--ema", "--device", "cpu"], ["export", out, "--to", tmp_path / "avg",
                                                                             "--ema"],
                 _train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2, "--ema-decay", "0.5", "--resume")):
        line = _one_line_error(*_cli(args, capsys)[::2])
        assert "state.pt: the train state does not match the checksum saved with it" in line, (args, line)


def test_ema_of_a_run_without_an_average_or_of_a_model_folder_says_which(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """eval --ema of an exported model said "the run was trained without --ema-decay" of a run that was:
    an export holds one set of weights (the average is exported with export --ema)."""
    out = tmp_path / "run"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1), capsys)[0] == 0
    assert _cli(["export", out, "--to", tmp_path / "model"], capsys)[0] == 0
    for folder, why in ((out, "no averaged weights (the run was trained without --ema-decay)"),
                        (tmp_path / "model", "a model folder holds one set of weights, no average; export the "
                                             "average from its run with widenet export RUN --ema")):
        for args in (["eval", "--checkpoint", folder, "--ema", "--device", "cpu"],
                     ["export", folder, "--to", tmp_path / "avg", "--ema"]):
            line = _one_line_error(*_cli(args, capsys)[::2])
            assert why in line, (args, line)
    assert not (tmp_path / "avg").exists()


def test_a_preset_takes_the_channels_it_is_given_and_train_names_data_that_contradict_them(
        tmp_path, fmnist_dir, tiny_set_args, capsys):
    """--set in_channels=3 on Fashion-MNIST trains an RGB model on its images as RGB ones (it was
    refused); images passed to train() that contradict the setting are named before a run folder is made."""
    from widenet.train.config import TrainConfig
    from widenet.train.images import load_data, train

    out = tmp_path / "rgb"
    assert _cli(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 1, "--set", "in_channels=3"), capsys)[0] == 0
    saved = load_checkpoint(out)
    assert saved.meta["model_config"]["in_channels"] == 3
    grey = load_data(TrainConfig(data_dir=str(fmnist_dir), out=str(tmp_path / "x")))
    assert saved.meta["data"]["mean"] == pytest.approx([grey[0].mean[0]] * 3)  # one grey image's statistics, thrice
    rc, printed, err = _cli(["eval", "--checkpoint", out, "--device", "cpu", "--json"], capsys)
    assert rc == 0 and json.loads(printed)["examples"] == 64, err
    cfg = TrainConfig(data_dir=str(fmnist_dir), out=str(tmp_path / "given"), max_steps=1, device="cpu",
                      model_overrides=dict(TINY, in_channels=3))
    with pytest.raises(ValueError, match=r"--set in_channels=3: fashion-mnist's images have 1 channel"):
        train(cfg, log=lambda line: None, data=grey)
    assert not (tmp_path / "given").exists()


def test_a_model_of_other_channels_than_grey_or_rgb_is_refused_by_name(tmp_path, fmnist_dir, capsys):
    """A 2-channel model (made with the Python API) gave numpy's "cannot reshape array of size 2352 into
    shape (28,28,2)" in predict, and a patch-weight shape error for --init on Fashion-MNIST."""
    from widenet.data.images import FASHION_MNIST_CLASSES

    model = widenet.create_model("vit_tiny", **TINY, in_channels=2)
    widenet.save_pretrained(model, tmp_path / "two", classes=list(FASHION_MNIST_CLASSES), mean=[0.5] * 2,
                            std=[0.5] * 2)
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(tmp_path / "shirt.png")
    for args in (["predict", "--checkpoint", tmp_path / "two", tmp_path / "shirt.png"],
                 ["eval", "--checkpoint", tmp_path / "two", "--data", "fashion-mnist", "--data-dir", fmnist_dir],
                 ["train", "--init", tmp_path / "two", "--data-dir", fmnist_dir, "--out", tmp_path / "run"]):
        line = _one_line_error(*_cli(args, capsys)[::2])
        assert "takes 2-channel images, and images are read as grey (1) or RGB (3)" in line, (args[0], line)
    assert not (tmp_path / "run").exists()


def _make_or_skip(folder: Path) -> None:
    try:
        folder.mkdir()
    except OSError:  # a file system that takes only UTF-8 names (APFS)
        pytest.skip("this file system refuses names that are not UTF-8")


def _main_in_a_utf8_terminal(argv) -> tuple[int, bytes, bytes]:
    """main(argv) with stdout and stderr as a UTF-8 locale gives them (strict errors): (status, bytes written)."""
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
    with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
        rc = main([str(a) for a in argv])
    for stream in streams:
        stream.flush()
    return rc, streams[0].buffer.getvalue(), streams[1].buffer.getvalue()


def test_a_run_folder_named_in_another_encoding_is_written_and_read(tmp_path, fmnist_dir, tiny_set_args):
    """A run under a Latin-1 folder name trained and saved, then failed printing its last line (a
    UTF-8 stdout refuses the name), and every reader (--resume, eval, export) called its intact
    weights "corrupt or unreadable" (safetensors opens UTF-8 paths only)."""
    out = tmp_path / os.fsdecode(b"caf\xe9") / "run"  # b"\xe9" is not UTF-8: Python holds it as a surrogate
    _make_or_skip(out.parent)
    rc, printed, err = _main_in_a_utf8_terminal(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2,
                                                            "--save-every", 1))
    assert rc == 0, err
    assert os.fsencode(out) in printed  # the folder named as the bytes it is called by
    rc, printed, err = _main_in_a_utf8_terminal(["eval", "--checkpoint", out, "--data-dir", fmnist_dir])
    assert rc == 0 and b"@ step 2" in printed, err
    rc, _, err = _main_in_a_utf8_terminal(["export", out, "--to", out.parent / "exported"])
    assert rc == 0, err
    exported = widenet.from_pretrained(out.parent / "exported").state_dict()
    saved = load_checkpoint(out).model_state
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    (out / "checkpoints" / checkpoint_dir_name(2)).rename(out.parent / "gone")  # as if killed after step 1
    rc, _, err = _main_in_a_utf8_terminal(_train_args(fmnist_dir, out, tiny_set_args, "--max-steps", 2,
                                                      "--save-every", 1, "--resume"))
    assert rc == 0 and load_checkpoint(out).meta["step"] == 2, err


def test_safetensors_files_named_in_another_encoding_are_written_and_read(tmp_path):
    """Both ways round safetensors' UTF-8-only paths: a file in such a folder (opened through the
    folder's descriptor) and a file so named itself (read and written whole through Python)."""
    from widenet.files import load_safetensors, save_safetensors

    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    _make_or_skip(folder)
    for path in (folder / "model.safetensors", tmp_path / os.fsdecode(b"model-\xe9.safetensors")):
        save_safetensors(tensors, path, metadata={"format": "pt"})
        loaded = load_safetensors(path)
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("command", ["compare", "compare-text"])
def test_comparisons_under_torchrun_are_one_line(tmp_path, capsys, monkeypatch, command):
    """WORLD_SIZE=2 (torchrun, or left set) made compare's first run wait for a process group nobody had
    started: a traceback ending in "this is a bug in widenet"."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = _one_line_error(*_cli([command, "--models", "vit_tiny" if command == "compare" else "bert_text_tiny",
                                  "--out", tmp_path / "c"], capsys)[::2])
    assert line == (f"widenet: error: {command} runs its models one after another in one process; run it "
                    "without torchrun (WORLD_SIZE=2 is set)")
    assert not (tmp_path / "c").exists()


def test_an_allocation_torch_refuses_is_one_line_with_its_size():
    from widenet.cli_errors import explain

    err = RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 12094627905536 bytes. Error code 12 (Cannot allocate memory)")
    assert explain(err) == "out of memory: an allocation of 11.0 TiB failed"
    assert explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug, not memory
