"""Weight averaging (`--ema-decay`): the update rule, buffers, shared weights, training, resume, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from widenet.cli import main
from widenet.models.registry import create_model
from widenet.train import images, trainer
from widenet.train.checkpoint import checkpoint_dir_name, find_latest_checkpoint, load_checkpoint
from widenet.train.config import TrainConfig
from widenet.train.ema import ModelEMA
from widenet.train.metrics import read_metrics, without_timing

pytestmark = pytest.mark.usefixtures("single_thread")


def _quiet(_line: str) -> None:
    pass


def _config(data_dir, out, overrides, **changes) -> TrainConfig:
    settings = dict(model="widenet_tiny", data_dir=str(data_dir), out=str(out), max_steps=12, batch_size=32,
                    lr=3e-3, log_every=4, model_overrides=dict(overrides), download=False)
    return TrainConfig(**{**settings, **changes})


def test_update_follows_the_rule_with_its_warm_up():
    """ema <- d * ema + (1 - d) * w with d = min(decay, (1 + t) / (10 + t)), computed by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.5)
    expected = model.weight.detach().clone()
    for t in range(12):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, expected)
    assert ema.updates == 12 and ema.current_decay() == 0.5
    assert not ema.module.training and not ema.module.weight.requires_grad


def test_buffers_are_copied_not_averaged():
    model = nn.BatchNorm1d(4)
    ema = ModelEMA(model, decay=0.99)
    model.train()(torch.randn(16, 4) * 3 + 5)
    ema.update(model)
    assert torch.equal(ema.module.running_mean, model.running_mean)
    assert torch.equal(ema.module.num_batches_tracked, model.num_batches_tracked)


def test_shared_weights_stay_shared_in_the_average():
    model = create_model("widenet_tiny", dim=32, depth=3, num_heads=2, mlp_dim=64)
    ema = ModelEMA(model, decay=0.9)
    enc = ema.module.encoder
    assert len(enc.attention) == 1 and len(enc.moes) == 1
    assert len(list(ema.module.parameters())) == len(list(model.parameters()))
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.9, 1 / 10)  # the warm-up's decay at the first update
    for old, mine, theirs in zip(before, ema.module.parameters(), model.parameters()):
        # each shared weight moved once (a weight listed per block would have moved three times)
        torch.testing.assert_close(mine, d * old + (1 - d) * theirs.detach())


def test_batch_norm_recalibration_recomputes_the_statistics_of_the_averaged_weights():
    """running mean/var = the average over the calibration batches of each batch's mean and unbiased
    variance of the averaged conv's outputs (computed by hand), whatever the trained model's were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5))
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    model.train()(torch.randn(8, 1, 6, 6))  # the trained model's statistics: of other weights
    ema.update(model)
    inputs = [torch.randn(5, 1, 6, 6) for _ in range(3)]
    assert ema.recalibrate_batch_norm(inputs)
    per_batch = [ema.module[0](x).transpose(0, 1).reshape(3, -1) for x in inputs]  # (3, 5 * 4 * 4) each
    torch.testing.assert_close(ema.module[1].running_mean, torch.stack([c.mean(1) for c in per_batch]).mean(0))
    torch.testing.assert_close(ema.module[1].running_var, torch.stack([c.var(1) for c in per_batch]).mean(0))
    assert ema.module[1].momentum == model[1].momentum and not ema.module.training
    assert not any(m.training for m in ema.module.modules())
    assert not ModelEMA(nn.Linear(2, 2), 0.9).recalibrate_batch_norm(iter([torch.randn(1, 2)]))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, 0.9)
    for _ in range(3):
        ema.update(nn.Linear(3, 2))
    other = ModelEMA(nn.Linear(3, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and torch.equal(other.module.weight, ema.module.weight)


@pytest.mark.parametrize("changes, message", [
    (dict(ema_decay=1.0), "ema_decay must be in"),
    (dict(ema_decay=0.0), "ema_decay must be in"),
    (dict(ema_decay=0.99, fsdp=True), "not with fsdp or expert_parallel"),
    (dict(ema_decay=0.99, expert_parallel=2), "not with fsdp or expert_parallel"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


@pytest.fixture(scope="module")
def averaged_run(single_thread, tmp_path_factory, fmnist_dir, tiny_overrides):
    out = tmp_path_factory.mktemp("ema") / "run"
    cfg = _config(fmnist_dir, out, {**tiny_overrides, "stem": "conv"}, ema_decay=0.9)  # BatchNorm in the stem
    return cfg, images.train(cfg, log=_quiet)


def test_averaging_never_changes_the_trained_weights(averaged_run, tmp_path, fmnist_dir, tiny_overrides):
    cfg, averaged = averaged_run
    plain = images.train(_config(fmnist_dir, tmp_path / "plain", cfg.model_overrides), log=_quiet)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(averaged.model.state_dict()[key], value), key
    assert averaged.final_eval.accuracy == plain.final_eval.accuracy
    assert plain.ema_eval is None and averaged.ema_eval is not None


def test_each_epoch_logs_the_average_and_the_checkpoint_keeps_it(averaged_run):
    cfg, result = averaged_run
    records = read_metrics(f"{cfg.out}/metrics.jsonl")
    tests = [(r["step"], r["split"]) for r in records if r["split"].startswith("test")]
    assert tests == [(8, "test"), (8, "test_ema"), (12, "test"), (12, "test_ema")]  # 256 images / 32 = 8 per epoch
    last = [r for r in records if r["split"] == "test_ema"][-1]
    assert last["accuracy"] == result.ema_eval.accuracy
    state = load_checkpoint(find_latest_checkpoint(cfg.out)).train_state["ema"]
    assert state["updates"] == 12 and state["decay"] == 0.9
    trained = result.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in state["weights"].items() if v.is_floating_point())


def test_skipped_evaluations_leave_the_average_alone(averaged_run, tmp_path):
    """Recomputing the average's BatchNorm statistics for an evaluation touches neither it nor training;
    a checkpoint without an evaluation gets them recomputed too (for `widenet eval --ema`)."""
    cfg, averaged = averaged_run
    sparse = images.train(_config(cfg.data_dir, tmp_path / "sparse", cfg.model_overrides, ema_decay=0.9,
                                eval_every=2), log=_quiet)
    tests = [(r["step"], r["split"]) for r in read_metrics(tmp_path / "sparse" / "metrics.jsonl")
             if r["split"].startswith("test")]
    assert tests == [(12, "test"), (12, "test_ema")]  # epoch 1 (step 8) skipped, the last kept
    for step in (8, 12):  # step 8's checkpoint without an evaluation: its statistics recomputed all the same
        saved = [load_checkpoint(run / "checkpoints" / checkpoint_dir_name(step)).train_state["ema"]["weights"]
                 for run in (Path(cfg.out), tmp_path / "sparse")]
        for key, value in saved[0].items():
            assert torch.equal(saved[1][key], value), (step, key)
    assert sparse.ema_eval.accuracy == averaged.ema_eval.accuracy


def test_cli_eval_ema_reproduces_the_training_record(averaged_run, capsys):
    cfg, result = averaged_run
    rc = main(["eval", "--checkpoint", cfg.out, "--ema", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)
    assert report["ema"] is True  # the record says which weights it scored
    assert report["accuracy"] == result.ema_eval.accuracy
    assert report["loss"] == pytest.approx(result.ema_eval.loss, rel=1e-6)
    assert main(["eval", "--checkpoint", cfg.out, "--json"]) == 0  # the trained weights: said so too
    report = json.loads(capsys.readouterr().out)
    assert report["ema"] is False and report["accuracy"] == result.final_eval.accuracy


def test_cli_eval_ema_without_average_is_a_clear_error(tmp_path, fmnist_dir, tiny_overrides, capsys):
    cfg = _config(fmnist_dir, tmp_path / "plain", tiny_overrides, max_steps=2)
    images.train(cfg, log=_quiet)
    rc = main(["eval", "--checkpoint", cfg.out, "--ema"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained without --ema-decay" in err and "Traceback" not in err


class _Killed(BaseException):
    pass


def test_resume_restores_the_average_exactly(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    settings = dict(max_steps=12, save_every=5, ema_decay=0.9)
    tiny_overrides = {**tiny_overrides, "stem": "conv"}
    whole = images.train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)

    real_step, steps = trainer.Trainer.update, []

    def step_then_die(*args, **kwargs):
        if len(steps) == 7:  # checkpoint at step 5, killed during step 8
            raise _Killed()
        steps.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "update", step_then_die)
    with pytest.raises(_Killed):
        images.train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings), log=_quiet)
    monkeypatch.setattr(trainer.Trainer, "update", real_step)
    resumed = images.train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)

    saved = [load_checkpoint(find_latest_checkpoint(tmp_path / run)).train_state["ema"] for run in ("A", "B")]
    assert saved[0]["updates"] == saved[1]["updates"] == 12
    for key, value in saved[1]["weights"].items():
        assert torch.equal(saved[0]["weights"][key], value), key
    assert resumed.ema_eval.accuracy == whole.ema_eval.accuracy
    assert (without_timing(read_metrics(tmp_path / "A" / "metrics.jsonl"))
            == without_timing(read_metrics(tmp_path / "B" / "metrics.jsonl")))


def test_cli_bad_decay_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train", "--ema-decay", "1.5", "--max-steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "ema_decay must be in (0, 1), got 1.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
