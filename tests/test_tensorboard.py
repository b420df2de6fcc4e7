"""--tensorboard: event files beside metrics.jsonl that hold the same numbers, on every training command.

Each run is tiny (a few steps of a 2-block widenet_tiny on the synthetic
Fashion-MNIST folder of conftest.py, or of widenet_text_tiny on a small corpus);
the event files are read back with TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from typing import Any

import pytest

from widenet.train import trainer
from widenet.train.config import TrainConfig
from widenet.train.images import train
from widenet.train.metrics import read_metrics
from widenet.train.tensorboard import INSTALL_HINT, record_scalars

# The writing tests need the package (the `test` extra has it); the missing-package test does not.
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the tensorboard package is not installed")

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT_TINY = dict(embedding_size=16, dim=32, depth=2, num_heads=2, mlp_dim=64, max_positions=64)
PHRASES = ["the red fox jumps over the lazy dog.", "a small bird sings in the old tree.",
           "the river runs down to the sea.", "my brother reads a long book at night."]




def _events(out: Path) -> Any:
    """TensorBoard's own reader over OUT/tensorboard/ (every event file, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return events


def _curve(events: Any, tag: str) -> dict[int, float]:
    steps = [(e.step, e.value) for e in events.Scalars(tag)]
    assert len({s for s, _ in steps}) == len(steps), f"{tag}: a step written twice: {steps}"
    return dict(steps)


def _assert_same_numbers(out: Path, events: Any, split: str, keys: tuple[str, ...]) -> None:
    """Every `keys` value of metrics.jsonl's `split` records equals the event at its step (float32)."""
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]
    assert records, f"no {split} records"
    for key in keys:
        curve = _curve(events, f"{split}/{key}")
        assert curve == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6, abs=1e-9), key


@needs_tensorboard
def test_train_writes_losses_accuracy_lr_and_routing(tmp_path, fmnist_dir, tiny_set_args, cli):
    out = tmp_path / "run"
    rc, _, err = cli(["train", "--data-dir", fmnist_dir, "--out", out, "--batch-size", 32, "--max-steps", 3,
                       "--log-every", 1, "--device", "cpu", "--tensorboard", *tiny_set_args])
    assert rc == 0, err
    events = _events(out)
    _assert_same_numbers(out, events, "train", ("loss", "aux_loss", "accuracy", "lr"))
    _assert_same_numbers(out, events, "test", ("accuracy", "loss"))
    assert sorted(_curve(events, "train/loss")) == [1, 2, 3]
    # widenet_tiny: every block routes through the shared MoE (4 experts); loads sum to 1 per block
    final = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "test"][-1]
    tags = events.Tags()["scalars"]
    for block in final["routing"]:
        prefix = f"routing/test/block{block['block']}"
        loads = [_curve(events, f"{prefix}/expert_load/e{i}")[3] for i in range(len(block["expert_fraction"]))]
        assert loads == pytest.approx(block["expert_fraction"], rel=1e-6)
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        assert _curve(events, f"{prefix}/dropped")[3] == pytest.approx(block["dropped_fraction"], abs=1e-7)
    assert "routing/test/block1/expert_load/e3" in tags
    assert not any(t.endswith(("/step", "/epoch", "/tta")) for t in tags)


def test_no_flag_no_event_files(tmp_path, fmnist_dir, tiny_overrides):
    cfg = TrainConfig(data_dir=str(fmnist_dir), out=str(tmp_path / "run"), batch_size=64, max_steps=1,
                      model_overrides=dict(tiny_overrides), download=False)
    train(cfg, log=lambda _: None)
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()


class _SimulatedKill(BaseException):
    pass


@needs_tensorboard
@pytest.mark.parametrize("first_with_tensorboard", [True, False])
def test_resume_appends_and_replaces_the_steps_it_redoes(tmp_path, fmnist_dir, tiny_overrides, monkeypatch,
                                                          first_with_tensorboard):
    """Killed during step 5 (checkpoint at step 3), resumed to step 6: every step once, with the
    values metrics.jsonl ends with. A first part run without --tensorboard is written at the resume."""
    settings = dict(data_dir=str(fmnist_dir), out=str(tmp_path / "run"), batch_size=32, max_steps=6, save_every=3,
                    log_every=1, model_overrides=dict(tiny_overrides), download=False)
    real_update, updates = trainer.Trainer.update, []

    def update_then_die(*args, **kwargs):
        if len(updates) == 4:
            raise _SimulatedKill()
        updates.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "update", update_then_die)
    with pytest.raises(_SimulatedKill):
        train(TrainConfig(**settings, tensorboard=first_with_tensorboard), log=lambda _: None)
    monkeypatch.setattr(trainer.Trainer, "update", real_update)
    train(TrainConfig(**settings, tensorboard=True, resume=True), log=lambda _: None)

    out = tmp_path / "run"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == (2 if first_with_tensorboard else 1)
    events = _events(out)
    _assert_same_numbers(out, events, "train", ("loss", "aux_loss", "accuracy", "lr"))
    assert sorted(_curve(events, "train/loss")) == [1, 2, 3, 4, 5, 6]
    _assert_same_numbers(out, events, "test", ("accuracy", "loss"))


@needs_tensorboard
def test_overwrite_run_replaces_the_earlier_runs_events(tmp_path, fmnist_dir, tiny_overrides):
    """A run of 4 steps, then an --overwrite run of 2 into the same folder: TensorBoard shows the
    second run's steps 1 and 2 only, with the values of its metrics.jsonl."""
    settings = dict(data_dir=str(fmnist_dir), out=str(tmp_path / "run"), batch_size=32, log_every=1,
                    model_overrides=dict(tiny_overrides), download=False, tensorboard=True)
    train(TrainConfig(**settings, max_steps=4), log=lambda _: None)
    assert sorted(_curve(_events(tmp_path / "run"), "train/loss")) == [1, 2, 3, 4]
    train(TrainConfig(**settings, max_steps=2, lr=1e-4, overwrite=True), log=lambda _: None)
    out = tmp_path / "run"
    events = _events(out)
    assert sorted(_curve(events, "train/loss")) == [1, 2]
    assert sorted(_curve(events, "test/accuracy")) == [2]
    _assert_same_numbers(out, events, "train", ("loss", "lr"))


@needs_tensorboard
def test_a_new_runs_event_file_drops_what_earlier_files_in_the_folder_hold(tmp_path):
    """open_metrics for a new run (no truncate_after: not a resume) into a folder whose tensorboard/
    still holds an earlier run's events at steps 1..5: after two records at steps 1 and 2, TensorBoard
    reads only those two (the earlier steps 3..5 and values at 1 and 2 are gone)."""
    from torch.utils.tensorboard import SummaryWriter

    from widenet.train.tensorboard import open_metrics

    out = tmp_path / "run"
    earlier = SummaryWriter(log_dir=str(out / "tensorboard"))
    for step in range(1, 6):
        earlier.add_scalar("train/loss", 100.0 + step, step)
    earlier.close()
    assert _curve(_events(out), "train/loss") == {s: 100.0 + s for s in range(1, 6)}
    metrics = open_metrics(out, tensorboard=True)
    metrics.write(dict(split="train", step=1, epoch=0, loss=1.5))
    metrics.write(dict(split="train", step=2, epoch=0, loss=0.5))
    metrics.close()
    assert _curve(_events(out), "train/loss") == {1: 1.5, 2: 0.5}


def _corpus(folder: Path) -> Path:
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(PHRASES).capitalize() for _ in range(rng.randint(3, 5))) for _ in range(40)]
    path = folder / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@needs_tensorboard
def test_pretrain_writes_its_losses_and_validation_routing(tmp_path, cli):
    out = tmp_path / "pre"
    rc, _, err = cli(["pretrain", "--corpus", _corpus(tmp_path), "--vocab-size", 120, "--seq-len", 32,
                       "--batch-size", 8, "--eval-examples", 8, "--max-steps", 3, "--log-every", 1,
                       "--cache-dir", tmp_path / "cache", "--out", out, "--device", "cpu", "--tensorboard",
                       *[f"--set={k}={v}" for k, v in TEXT_TINY.items()]])
    assert rc == 0, err
    events = _events(out)
    _assert_same_numbers(out, events, "train", ("mlm_loss", "sop_loss", "aux_loss", "mlm_accuracy", "lr"))
    _assert_same_numbers(out, events, "validation", ("mlm_loss", "mlm_accuracy", "sop_accuracy"))
    assert "routing/validation/block0/expert_load/e0" in events.Tags()["scalars"]


@pytest.mark.parametrize("command", [
    ["train", "--data-dir", "nowhere"],
    ["pretrain", "--corpus", "nowhere.txt"],
    ["finetune", "--task", "classify", "--init", "nowhere", "--train", "a.tsv", "--validation", "b.tsv"],
])
def test_missing_package_fails_up_front_in_one_line(tmp_path, monkeypatch, cli, command):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    out = tmp_path / "run"
    rc, stdout, err = cli([*command, "--out", out, "--max-steps", 1, "--device", "cpu", "--tensorboard"])
    assert rc == 2 and stdout == ""
    assert err.strip().splitlines() == [f"widenet: error: {INSTALL_HINT}"]
    assert "pip install 'widenet[tensorboard]'" in INSTALL_HINT and "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written


def test_record_scalars_names():
    record = {"split": "test_ema", "step": 7, "epoch": 1, "tta": "flip", "accuracy": 0.5, "examples": 64,
              "flag": True, "nested": {"a": 1, "b": [2.0, None]},
              "routing": [{"block": 3, "expert_fraction": [0.25, 0.75], "dropped_fraction": 0.125}]}
    assert record_scalars(record) == {
        "test_ema/accuracy": 0.5, "test_ema/nested/a": 1.0, "test_ema/nested/b/0": 2.0,
        "routing/test_ema/block3/expert_load/e0": 0.25, "routing/test_ema/block3/expert_load/e1": 0.75,
        "routing/test_ema/block3/dropped": 0.125}
