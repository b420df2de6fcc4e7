"""Training loop: learning, metrics.jsonl, checkpoints, exact kill-and-resume, errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from widenet.cli import main
from widenet.data.images import load_dataset, subset
from widenet.layers.moe import MoE
from widenet.models import create_model
from widenet.train import images, trainer
from widenet.train.checkpoint import (CheckpointError, checkpoint_dir_name, find_latest_checkpoint,
                                      list_checkpoints, load_checkpoint)
from widenet.train.budget import Cadence, Deadline
from widenet.train.config import TrainConfig
from widenet.data.augment import normalize
from widenet.train.evaluate import evaluate, mean_of_views
from widenet.train.images import TrainingError, build_model_for, train
from widenet.train.metrics import TIMING_KEYS, read_metrics, without_timing
from widenet.train.progress import Progress

REPO = Path(__file__).resolve().parents[1]
LEARN_STEPS = 40

pytestmark = pytest.mark.usefixtures("single_thread")


def _quiet(_line: str) -> None:
    pass


def _cli(argv, capsys) -> tuple[int, str, str]:
    """Run widenet.cli.main in-process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message on stderr, got:\n{err}"


def _config(data_dir: Path, out: Path, overrides: dict, **changes) -> TrainConfig:
    settings = dict(model="widenet_tiny", data_dir=str(data_dir), out=str(out), max_steps=LEARN_STEPS,
                    batch_size=32, lr=3e-3, log_every=5, model_overrides=dict(overrides), download=False)
    settings.update(changes)
    return TrainConfig(**settings)


# --- one short run, shared by the read-only checks below ------------------------------------------
@pytest.fixture(scope="module")
def learned(single_thread, tmp_path_factory, fmnist_dir, tiny_overrides):
    """40 steps of a tiny WideNet on the learnable synthetic data (batch 32, lr 3e-3)."""
    out = tmp_path_factory.mktemp("learn") / "run"
    cfg = _config(fmnist_dir, out, tiny_overrides)
    result = train(cfg, log=_quiet)
    return cfg, result


def test_short_run_learns(learned):
    cfg, result = learned
    records = read_metrics(Path(cfg.out) / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(5, LEARN_STEPS + 1, 5))
    first, last = train_records[0]["loss"], train_records[-1]["loss"]
    assert last < first - 0.3, f"training loss went {first:.3f} -> {last:.3f}"
    assert result.steps == LEARN_STEPS
    # 4 equally frequent classes: chance is 0.25.
    assert result.final_eval.accuracy >= 0.6
    assert result.final_eval.examples == 64
    assert math.isfinite(result.final_eval.loss)


def test_metrics_jsonl_records(learned):
    cfg, result = learned
    lines = (Path(cfg.out) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    assert {r["split"] for r in records} == {"train", "test"}
    for r in records:
        if r["split"] == "train":
            assert {"step", "loss", "accuracy", "lr", "images_per_s"} <= set(r)
            assert 0 <= r["accuracy"] <= 1 and r["lr"] >= 0 and math.isfinite(r["loss"])
            assert r["images_per_s"] > 0  # throughput sanity, not timed
        else:
            assert {"step", "accuracy", "loss", "routing"} <= set(r)
            assert 0 <= r["accuracy"] <= 1
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    evals = [r for r in records if r["split"] == "test"]
    # 256 images / batch 32 = 8 steps per epoch: one evaluation per epoch.
    assert [r["step"] for r in evals] == [8, 16, 24, 32, 40]
    # epoch: the epochs complete at the line's step, in train and test lines alike (at step 40 the
    # train line said 4 and the test line 5)
    assert all(r["epoch"] == r["step"] // 8 for r in records)
    assert evals[-1]["accuracy"] == pytest.approx(result.final_eval.accuracy)
    assert result.train_images_per_s > 0


def test_eval_every_and_tta_change_evaluation_not_training(learned, tmp_path, capsys):
    """--eval-every 2 --tta flip: test lines after epochs 2, 4 and the last, each averaging an image's
    and its mirror image's predictions (checked against a direct computation); the same weights as
    a run evaluated every epoch on single views."""
    cfg, result = learned
    lines: list[str] = []
    sparse = train(_config(cfg.data_dir, tmp_path / "run", cfg.model_overrides, eval_every=2, tta="flip"),
                   log=lines.append)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["tta"]) for r in records if r["split"] == "test"] == [(16, "flip"), (32, "flip"),
                                                                                  (40, "flip")]  # epochs 2, 4, 5
    assert "epoch 1/5 step 8 (evaluated every 2 epochs)" in lines
    final_line = [line for line in lines if line.startswith("epoch 5/5 step 40: test accuracy ")]
    assert len(final_line) == 1 and "(flip TTA; single images: accuracy " in final_line[0]
    for key, value in result.model.state_dict().items():  # evaluation draws no random numbers
        assert torch.equal(sparse.model.state_dict()[key], value), key

    test_set = load_dataset("fashion-mnist", "test", cfg.data_dir, download=False)
    train_set = load_dataset("fashion-mnist", "train", cfg.data_dir, download=False)
    model = result.model.eval()
    with torch.no_grad():  # all 64 test images in one call, as the evaluation's one batch of 512
        x = normalize(test_set.images, train_set.mean, train_set.std)
        probs = (model(x).logits.double().softmax(-1) + model(x.flip(-1)).logits.double().softmax(-1)) / 2
    labels = test_set.labels
    assert sparse.final_eval.accuracy == (probs.argmax(-1) == labels).double().mean().item()
    assert sparse.final_eval.loss == pytest.approx(-probs[torch.arange(len(labels)), labels].log().mean().item(),
                                                   rel=1e-5)
    # The plain images' own numbers come along: those of the run evaluated without TTA.
    assert (sparse.final_eval.single_accuracy, result.final_eval.single_accuracy) == (result.final_eval.accuracy, None)
    assert sparse.final_eval.single_loss == pytest.approx(result.final_eval.loss, rel=1e-6)
    final_record = [r for r in records if r["split"] == "test"][-1]
    assert final_record["single_accuracy"] == result.final_eval.accuracy
    assert (without_timing([r for r in records if r["split"] == "train"])
            == without_timing([r for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if r["split"] == "train"]))
    # A resumed run may change them (they do not change training); the CLI refuses bad values.
    changed = _config(cfg.data_dir, cfg.out, cfg.model_overrides, eval_every=3, tta="flip")
    assert changed.resume_conflicts(cfg.to_dict()) == []
    for flag, value in (("--eval-every", "0"), ("--tta", "rotate")):
        rc, _, err = _cli(["train", flag, value, "--out", tmp_path / "bad"], capsys)
        _assert_one_line_error(rc, err)
        assert flag in err and not (tmp_path / "bad").exists()


def test_folder_settings_are_recorded_absolute_and_compared_as_the_paths_they_name(tmp_path, monkeypatch):
    """--init up as ./up or /abs/up was refused at --resume ("init: 'up' -> '/abs/up'"), while the same
    'up' typed in another folder, naming another model, was accepted."""
    from widenet.train.config import TrainConfig
    from widenet.train.text_config import FinetuneConfig, PretrainConfig

    monkeypatch.chdir(tmp_path)
    run = TrainConfig(init="up", data_dir="data/")
    assert run.with_absolute_paths().init == str(tmp_path / "up")
    assert run.with_absolute_paths().data_dir == str(tmp_path / "data")
    saved = run.with_absolute_paths().to_dict()
    for same in ("up", "./up", str(tmp_path / "up"), "../" + tmp_path.name + "/up"):
        assert TrainConfig(init=same, data_dir="data").resume_conflicts(saved) == [], same
    assert TrainConfig(init="up").resume_conflicts(run.to_dict()) == []  # a run recorded before: relative
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert TrainConfig(init="up").resume_conflicts(saved) == ["init"]
    corpus = PretrainConfig(corpus=[str(tmp_path / "c.txt")], init=None).to_dict()
    assert PretrainConfig(corpus=["../c.txt"]).resume_conflicts(corpus) == []
    hub = dict(FinetuneConfig(init="m", train="hf:glue/sst2:train", validation="v.tsv").to_dict())
    assert FinetuneConfig(init="m", train="hf:glue/sst2:train", validation="./v.tsv").resume_conflicts(hub) == []
    assert FinetuneConfig(init="m", train="hf:glue/cola:train", validation="v.tsv").resume_conflicts(hub) == ["train"]
    recorded = FinetuneConfig(init="m", train="t.tsv", validation="hf:glue/sst2:validation").with_absolute_paths()
    assert (recorded.init, recorded.train, recorded.validation) == (
        str(tmp_path / "elsewhere" / "m"), str(tmp_path / "elsewhere" / "t.tsv"), "hf:glue/sst2:validation")
    assert FinetuneConfig(init="./m", train="./t.tsv", validation="hf:glue/sst2:validation").resume_conflicts(
        recorded.to_dict()) == []
    assert PretrainConfig(corpus=["a.txt", "hf:x"]).with_absolute_paths().corpus == [
        str(tmp_path / "elsewhere" / "a.txt"), "hf:x"]
    monkeypatch.chdir(tmp_path)  # the same names typed in another folder name other files
    assert FinetuneConfig(init="m", train="t.tsv", validation="hf:glue/sst2:validation").resume_conflicts(
        recorded.to_dict()) == ["init", "train"]


def test_path_settings_moved_with_the_run_folder_are_the_same(tmp_path):
    """compare-text's output folder holds the fine-tuning runs, the pretraining runs they start from and
    the task files: moved or copied whole, its runs were refused as made with other settings."""
    from widenet.train.text_config import FinetuneConfig

    def run(root: Path, train: str = "task/train.tsv") -> FinetuneConfig:
        return FinetuneConfig(init=str(root / "runs/m/pretrain"), train=str(root / train),
                              validation=str(root / "task/v.tsv"), out=str(root / "runs/m/finetune"))

    saved, folder = run(tmp_path / "a").to_dict(), str(tmp_path / "a" / "runs/m/finetune")
    assert run(tmp_path / "b").resume_conflicts(saved, folder) == []  # moved whole
    assert run(tmp_path / "b").resume_conflicts(saved) == ["init", "train", "validation"]  # (an older checkpoint)
    assert run(tmp_path / "b", "task/other.tsv").resume_conflicts(saved, folder) == ["train"]
    elsewhere = dataclasses.replace(run(tmp_path / "a"), out=str(tmp_path / "b/runs/m/finetune"))
    assert elsewhere.resume_conflicts(saved, folder) == []  # the run alone moved: its inputs stayed
    assert dataclasses.replace(elsewhere, train=str(tmp_path / "b/task/train.tsv")).resume_conflicts(
        saved, folder) == []  # (the file at the moved place: taken as the run's own inputs, moved with it)
    from widenet.train.text_config import PretrainConfig

    def corpus(root: Path) -> PretrainConfig:  # one file inside the run's tree, one outside it, item by item
        return PretrainConfig(corpus=[str(root / "text.txt"), str(tmp_path / "shared.txt")], out=str(root / "pt"))

    assert corpus(tmp_path / "b").resume_conflicts(corpus(tmp_path / "a").to_dict(), str(tmp_path / "a/pt")) == []
    assert corpus(tmp_path / "b").resume_conflicts(corpus(tmp_path / "a").to_dict()) == ["corpus"]


def test_randaugment_n_beyond_its_operations_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch):
    """--randaugment-n 16 used to fail in kornia's words ("Expect `n` in [1, 15]"), once the data had loaded."""
    from kornia.augmentation.auto import RandAugment

    from widenet.data.augment import tf_randaugment_policy

    operations = len(tf_randaugment_policy(15.0))
    with pytest.raises(ValueError, match="Expect `n`"):  # kornia's own limit: the policy's operations
        RandAugment(n=operations + 1, m=15, policy=tf_randaugment_policy(15.0))
    assert operations == 15 and TrainConfig(randaugment_n=operations).randaugment_n == operations
    with pytest.raises(ValueError, match=r"^randaugment_n \(--randaugment-n\) must be in 0\.\.15 .*got 16$"):
        TrainConfig(randaugment_n=16)

    def no_data(*_args, **_kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr("widenet.train.images.load_dataset", no_data)
    argv = ["train", "--model", "vit_tiny", "--data", "fashion-mnist", "--data-dir", tmp_path / "none",
            "--randaugment-n", "16", "--max-steps", "1", "--device", "cpu", "--out", tmp_path / "bad"]
    rc, _, err = _cli(argv, capsys)
    _assert_one_line_error(rc, err)
    assert "--randaugment-n" in err and "0..15" in err and not (tmp_path / "bad").exists()


def test_mean_of_views_by_hand():
    """softmax([0, ln 3]) = [1/4, 3/4] and its mirror [3/4, 1/4] average to [1/2, 1/2]."""
    a = torch.tensor([[0.0, math.log(3.0)]])
    both = mean_of_views(a, a.flip(-1))
    assert torch.allclose(both, torch.full((1, 2), -math.log(2.0)))
    assert torch.equal(mean_of_views(a), a.log_softmax(-1))


def test_evaluate_routing_per_moe_block(learned, fmnist_dir):
    cfg, result = learned
    model = result.model
    test_set = load_dataset("fashion-mnist", "test", fmnist_dir, download=False)
    train_set = load_dataset("fashion-mnist", "train", fmnist_dir, download=False)
    ev = evaluate(model, test_set, cfg.eval_batch_size, torch.device("cpu"), train_set.mean, train_set.std)
    moe_blocks = model.cfg.encoder.moe_block_ids
    assert len(moe_blocks) == cfg.model_overrides["depth"]  # WideNet: every block routes
    assert [r.block for r in ev.routing] == list(range(len(moe_blocks)))
    for r in ev.routing:
        assert len(r.expert_fraction) == model.cfg.encoder.moe.num_experts
        assert sum(r.expert_fraction) == pytest.approx(1.0, abs=1e-5)
        assert all(f >= 0 for f in r.expert_fraction)
        assert 0.0 <= r.dropped_fraction <= 1.0
    # Evaluation (eval mode: no router noise, no dropout) is deterministic.
    assert ev.accuracy == result.final_eval.accuracy
    assert ev.loss == pytest.approx(result.final_eval.loss, rel=1e-6)
    for mine, final in zip(ev.routing, result.final_eval.routing, strict=True):
        assert mine.expert_fraction == pytest.approx(final.expert_fraction)


def test_evaluation_counts_dropped_assignments_beside_dropped_tokens(fmnist_dir):
    """Top-2 at a low capacity: a token over one expert's capacity keeps its other expert, so the
    dropped tokens (no expert left) were 0 while 1 in 5 assignments was dropped, and the report
    showed only the 0. Both are batch-weighted means of the layer's own statistics."""
    from widenet.train.evaluate import dropped_text

    torch.manual_seed(0)
    model = create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64, top_k=2,
                         eval_capacity_factor=0.7).eval()
    data = subset(load_dataset("fashion-mnist", "test", fmnist_dir, download=False), 24, 0)
    mean, std = [0.5], [0.25]
    ev = evaluate(model, data, 16, torch.device("cpu"), mean, std)  # batches of 16 and 8
    expected = [[0.0, 0.0] for _ in ev.routing]
    with torch.no_grad():
        for start in (0, 16):
            images = normalize(data.images[start:start + 16], mean, std)
            for block, stats in enumerate(model(images).routing):
                expected[block][0] += float(stats.dropped_fraction) * len(images) / 24
                expected[block][1] += float(stats.dropped_assignment_fraction) * len(images) / 24
    for r, (tokens, assignments) in zip(ev.routing, expected, strict=True):
        assert (r.dropped_fraction, r.dropped_assignment_fraction) == pytest.approx((tokens, assignments))
        assert r.dropped_assignment_fraction > r.dropped_fraction  # what the single column hid
    text = dropped_text(vars(ev.routing[0]))
    assert text == f"{ev.routing[0].dropped_fraction:.3f} of tokens, {ev.routing[0].dropped_assignment_fraction:.3f} " \
                   "of assignments"
    assert dropped_text(dict(dropped_fraction=0.25)) == "0.250 of tokens"  # a record from before


def test_sharded_evaluation_sums_keep_each_block_in_its_place(monkeypatch):
    """The all-reduce of an evaluation's sums as one vector: two ranks with the same sums must give
    the one rank's result, every block's load and both drop shares where they belong."""
    from widenet.train import evaluate as ev

    sums = ev.EvalSums(loss=6.0, correct=3, seen=4, single_loss=6.0, single_correct=3)
    tally = sums.routing
    tally.load = {0: torch.tensor([1.0, 3.0]), 2: torch.tensor([2.0, 2.0])}
    tally.dropped, tally.dropped_assignments, tally.weight = {0: 0.4, 2: 0.0}, {0: 0.8, 2: 0.2}, 4.0
    monkeypatch.setattr(ev, "on_backend_device", lambda t: t)
    monkeypatch.setattr(ev, "all_reduce_sum", lambda t: t.mul_(2))  # a second rank with the same sums
    two = ev._all_reduce_sums(sums, SimpleNamespace(distributed=True)).result()
    one = sums.result()
    assert (two.accuracy, two.loss, two.examples) == (one.accuracy, one.loss, 8)
    assert [vars(b) for b in two.routing] == [vars(b) for b in one.routing] == [
        dict(block=0, expert_fraction=[0.25, 0.75], dropped_fraction=0.1, dropped_assignment_fraction=0.2),
        dict(block=2, expert_fraction=[0.5, 0.5], dropped_fraction=0.0, dropped_assignment_fraction=0.05)]


def test_sharded_evaluation_takes_whole_batches_and_gives_one_processs_result(fmnist_dir, tiny_overrides,
                                                                              monkeypatch):
    """Two ranks (run one after the other; the all-reduce adds rank 0's sums into rank 1's) evaluate
    whole batches each, rank 1 with an empty padding pass for the odd batch: with a capacity that drops
    tokens, the result is one process's, routing included (slicing the rows of every batch, each rank
    routed half batches under half the capacity: other drops, other scores)."""
    from widenet.distributed.parallel import ParallelContext
    from widenet.train import evaluate as ev

    test_set = load_dataset("fashion-mnist", "test", fmnist_dir, download=False)
    assert len(test_set) == 64  # 5 batches of 13 rows: rank 0 takes 3, rank 1 two and a padding pass
    cfg = TrainConfig(model="widenet_tiny", model_overrides=dict(tiny_overrides, capacity_factor=0.5))
    torch.manual_seed(0)
    model = build_model_for(cfg, test_set)
    args = (test_set, 13, torch.device("cpu"), test_set.mean, test_set.std)
    alone = evaluate(model, *args)
    assert 0.1 < max(r.dropped_fraction for r in alone.routing) < 0.9  # capacity matters here

    class Rank:  # a ParallelContext's evaluation-facing part
        distributed = True
        evaluation_share = ParallelContext.evaluation_share
        module = staticmethod(lambda m: m)

        def __init__(self, rank: int) -> None:
            self.env = SimpleNamespace(rank=rank, world_size=2)

    sizes, first = [], []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, x: sizes.append(len(x)) or forward(self, x))
    monkeypatch.setattr(ev, "on_backend_device", lambda t: t)
    monkeypatch.setattr(ev, "all_reduce_sum", lambda t: first.append(t.clone()) if not first else t.add_(first[0]))
    ev.evaluate_on(Rank(0), model, *args)
    rank0, sizes[:] = list(sizes), []
    both = ev.evaluate_on(Rank(1), model, *args)
    assert (both.accuracy, both.examples) == (alone.accuracy, alone.examples)
    assert both.loss == pytest.approx(alone.loss, rel=1e-6)
    for b, a in zip(both.routing, alone.routing, strict=True):
        assert b.expert_fraction == pytest.approx(a.expert_fraction, abs=1e-6)
        assert (b.dropped_fraction, b.dropped_assignment_fraction) == pytest.approx(
            (a.dropped_fraction, a.dropped_assignment_fraction), abs=1e-6)
    assert (rank0, sizes) == ([13, 13, 13], [13, 12, 0])


def test_evaluate_dense_model_has_no_routing(fmnist_dir, tiny_overrides):
    test_set = load_dataset("fashion-mnist", "test", fmnist_dir, download=False)
    cfg = TrainConfig(model="vit_tiny", model_overrides=dict(tiny_overrides))
    torch.manual_seed(0)
    model = build_model_for(cfg, test_set)
    model.train()
    ev = evaluate(model, test_set, 64, torch.device("cpu"), test_set.mean, test_set.std)
    assert ev.routing == [] and ev.examples == len(test_set)
    assert model.training  # evaluate restores the mode


def test_final_checkpoint_matches_model(learned):
    cfg, result = learned
    latest = find_latest_checkpoint(cfg.out)
    assert latest is not None and latest.name == checkpoint_dir_name(LEARN_STEPS)
    fresh = build_model_for(cfg, load_dataset("fashion-mnist", "train", cfg.data_dir, download=False))
    ckpt = load_checkpoint(cfg.out, fresh, expected_meta={"model": "widenet_tiny"})
    assert ckpt.step == LEARN_STEPS
    assert ckpt.meta["train_config"]["lr"] == cfg.lr
    for key, value in result.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


# --- CLI eval on a checkpoint ------------------------------------------------------------------
def test_cli_eval_checkpoint_json(learned, capsys):
    cfg, result = learned
    rc, out, err = _cli(["eval", "--checkpoint", cfg.out, "--json", "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["model"] == "widenet_tiny" and report["step"] == LEARN_STEPS and report["tta"] == "none"
    assert report["accuracy"] == pytest.approx(result.final_eval.accuracy)
    rc, out, err = _cli(["eval", "--checkpoint", cfg.out, "--json", "--tta", "flip"], capsys)
    assert rc == 0, err
    flipped = json.loads(out)
    test_set = load_dataset("fashion-mnist", "test", cfg.data_dir, download=False)
    train_set = load_dataset("fashion-mnist", "train", cfg.data_dir, download=False)
    direct = evaluate(result.model, test_set, 512, torch.device("cpu"), train_set.mean, train_set.std, tta="flip")
    assert flipped["tta"] == "flip" and flipped["accuracy"] == direct.accuracy
    assert flipped["loss"] == pytest.approx(direct.loss, rel=1e-6) and flipped["loss"] != report["loss"]
    assert (flipped["single_accuracy"], "single_accuracy" in report) == (report["accuracy"], False)
    rc, out, err = _cli(["eval", "--checkpoint", cfg.out, "--tta", "flip"], capsys)
    assert rc == 0 and out.splitlines()[1] == (f"  single images: accuracy {report['accuracy']:.4f}, "
                                               f"loss {flipped['single_loss']:.4f}")
    assert len(report["routing"]) == 2
    for block in report["routing"]:
        assert sum(block["expert_fraction"]) == pytest.approx(1.0, abs=1e-5)


def test_cli_eval_of_other_data_does_not_look_in_the_runs_data_folder(learned, capsys, monkeypatch):
    """--data cifar10 without --data-dir read CIFAR from the run's Fashion-MNIST folder ("no cifar10
    batches found in .../fashion-mnist"): the run's folder is only for the run's own data."""
    from widenet.train import evaluate_cli

    asked = []

    def record(name, split, data_dir=None, *args, **kw):
        asked.append((name, data_dir))
        raise SystemExit(0)

    monkeypatch.setattr(evaluate_cli, "load_dataset", record)
    for data in ("cifar10", "fashion-mnist"):
        _cli(["eval", "--checkpoint", learned[0].out, "--data", data], capsys)
    assert asked == [("cifar10", None), ("fashion-mnist", learned[0].data_dir)]


def test_cli_eval_dropless_does_not_depend_on_the_batch_size(learned, capsys):
    """Capacity holds per forward pass, so an MoE model's loss depends on --batch-size; --dropless routes every
    token, and then one image at a time gives what 512 at a time give. Dropping nothing, it is also the
    model evaluated with a capacity no call can fill (checked against evaluate on a dropless copy)."""
    cfg, result = learned
    reports = {}
    for args in (["--batch-size", 1], ["--batch-size", 512], ["--batch-size", 1, "--dropless"],
                 ["--batch-size", 512, "--dropless"]):
        rc, out, err = _cli(["eval", "--checkpoint", cfg.out, "--json", *args], capsys)
        assert rc == 0, err
        reports[" ".join(map(str, args))] = json.loads(out)
    capped_1, capped_512, free_1, free_512 = reports.values()
    assert capped_1["loss"] != capped_512["loss"]  # the batch changed what was dropped
    assert free_1["loss"] == pytest.approx(free_512["loss"], rel=1e-6) and free_1["accuracy"] == free_512["accuracy"]
    assert all(block["dropped_fraction"] == 0 for block in free_512["routing"])
    assert (free_512["batch_size"], free_512["dropless"], capped_1["batch_size"], capped_1["dropless"]) == \
        (512, True, 1, False)
    model = copy.deepcopy(result.model)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.cfg = dataclasses.replace(moe.cfg, capacity_factor=1e6, eval_capacity_factor=1e6)
    test_set = load_dataset("fashion-mnist", "test", cfg.data_dir, download=False)
    train_set = load_dataset("fashion-mnist", "train", cfg.data_dir, download=False)
    direct = evaluate(model, test_set, 7, torch.device("cpu"), train_set.mean, train_set.std)
    assert free_512["loss"] == pytest.approx(direct.loss, rel=1e-6)


def test_cli_eval_missing_checkpoint(tmp_path, capsys):
    rc, _, err = _cli(["eval", "--checkpoint", tmp_path / "nosuch"], capsys)
    _assert_one_line_error(rc, err)
    assert "nosuch" in err and "does not exist" in err


def test_cli_eval_empty_run_folder(tmp_path, capsys):
    rc, _, err = _cli(["eval", "--checkpoint", tmp_path], capsys)
    _assert_one_line_error(rc, err)
    assert "no complete checkpoint" in err


def test_cli_eval_corrupt_safetensors(learned, tmp_path, capsys):
    cfg, _ = learned
    copy = tmp_path / "copy"
    shutil.copytree(find_latest_checkpoint(cfg.out), copy / "checkpoints" / checkpoint_dir_name(LEARN_STEPS))
    weights = copy / "checkpoints" / checkpoint_dir_name(LEARN_STEPS) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    rc, _, err = _cli(["eval", "--checkpoint", copy], capsys)
    _assert_one_line_error(rc, err)
    assert "model.safetensors" in err


# --- resume rules (no training happens in the refusals) ---------------------------------------
def test_resume_refuses_changed_settings(learned, capsys):
    cfg, _ = learned
    with pytest.raises(CheckpointError, match=r"cannot resume with different settings \(lr: 0.003 -> 0.001\)"):
        train(_config(cfg.data_dir, cfg.out, cfg.model_overrides, lr=1e-3, resume=True), log=_quiet)
    # The same through the CLI: one line, exit status 2.
    before = (Path(cfg.out) / "metrics.jsonl").read_bytes()
    args = ["train", "--model", "widenet_tiny", "--data-dir", cfg.data_dir, "--out", cfg.out,
            "--max-steps", LEARN_STEPS, "--batch-size", 32, "--lr", 1e-3, "--resume"]
    for key, value in cfg.model_overrides.items():
        args += ["--set", f"{key}={value}"]
    rc, _, err = _cli(args, capsys)
    _assert_one_line_error(rc, err)
    assert "lr" in err and "cannot resume" in err
    assert (Path(cfg.out) / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("name, value", [
    ("weight_decay", 0.1), ("dropout", 0.1), ("label_smoothing", 0.0), ("mixup", 0.2), ("batch_size", 16),
    ("seed", 1), ("warmup_steps", 3), ("schedule", "linear"), ("optimizer", "lamb"),
    # Not in RESUME_KEYS, yet each changes every following step (loss weight, gradient clipping,
    # augmentation), so a resumed run would silently match neither recipe.
    ("aux_weight", 0.1), ("clip_norm", 0.5), ("crop", "none"), ("flip", False), ("randaugment_n", 1),
])
def test_resume_refuses_changed_training_recipe(learned, tmp_path, name, value):
    cfg, _ = learned
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    assert getattr(cfg, name) != value
    with pytest.raises(CheckpointError, match=rf"cannot resume with different settings \({name}: "):
        train(_config(cfg.data_dir, run, cfg.model_overrides, resume=True, **{name: value}), log=_quiet)


def test_resume_refuses_changed_model_overrides(learned):
    cfg, _ = learned
    changed = dict(cfg.model_overrides, mlp_dim=96)  # other weight shapes
    with pytest.raises(CheckpointError, match=r"cannot resume with different settings \(mlp_dim: 64 -> 96\)"):
        train(_config(cfg.data_dir, cfg.out, changed, resume=True), log=_quiet)
    changed = dict(cfg.model_overrides, capacity_factor=2.0)  # the same weights, another MoE
    with pytest.raises(CheckpointError, match=r"cannot resume with different settings \(capacity_factor: 1\.2 -> 2\.0\)"):
        train(_config(cfg.data_dir, cfg.out, changed, resume=True), log=_quiet)


def test_train_into_folder_with_checkpoints_needs_resume(learned):
    cfg, _ = learned
    with pytest.raises(ValueError, match="already holds a run"):
        train(_config(cfg.data_dir, cfg.out, cfg.model_overrides), log=_quiet)


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, fmnist_dir, tiny_overrides):
    lines: list[str] = []
    result = train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=2, resume=True),
                   log=lines.append)
    assert any("no checkpoint" in line and "from scratch" in line for line in lines)
    assert result.steps == 2
    assert find_latest_checkpoint(tmp_path / "run").name == checkpoint_dir_name(2)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 2]


def test_resume_without_checkpoint_keeps_the_lost_attempts_records(tmp_path, fmnist_dir, tiny_overrides):
    """A run killed before its first checkpoint left metric lines: --resume has nothing to continue and
    refuses (touching nothing); --overwrite deletes them and starts again."""
    run = tmp_path / "run"
    run.mkdir()
    lost = '{"split": "train", "step": 1, "loss": 9.0}\n'
    (run / "metrics.jsonl").write_text(lost)
    with pytest.raises(ValueError, match=r"holds no complete checkpoint to resume, only metrics.jsonl.*--overwrite"):
        train(_config(fmnist_dir, run, tiny_overrides, max_steps=2, resume=True), log=_quiet)
    assert (run / "metrics.jsonl").read_text() == lost
    train(_config(fmnist_dir, run, tiny_overrides, max_steps=2, overwrite=True), log=_quiet)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 2]
    assert all(r.get("loss") != 9.0 for r in records)


# --- non-finite loss ------------------------------------------------------------------------
class _NanAfter:
    """Stands in for torch.nn.functional inside images.py: cross_entropy turns NaN at call `k`."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def cross_entropy(self, *args, **kwargs):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * float("nan") if self.calls >= self.k else loss


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    out = tmp_path / "run"
    fake = _NanAfter(5)
    monkeypatch.setattr(images, "F", fake)
    cfg = _config(fmnist_dir, out, tiny_overrides, max_steps=8, save_every=2, log_every=1)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5") as info:
        train(cfg, log=_quiet)
    # step 5's loss is that of the weights after 4 updates: the ones step_00000004 holds
    assert f"the newest checkpoint {out / 'checkpoints' / checkpoint_dir_name(4)} holds the weights that gave it; " \
           f"{out / 'checkpoints' / checkpoint_dir_name(2)} before it is intact" in str(info.value)
    assert fake.calls == 5
    latest = find_latest_checkpoint(out)
    assert latest is not None and latest.name == checkpoint_dir_name(4)
    assert not (out / "checkpoints" / checkpoint_dir_name(5)).exists()
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_dir_name(2), checkpoint_dir_name(4)]
    model = build_model_for(cfg, load_dataset("fashion-mnist", "train", fmnist_dir, download=False))
    ckpt = load_checkpoint(out, model)
    assert ckpt.step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ckpt.train_state["progress"]["step"] == 4
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_non_finite_loss_through_cli(tmp_path, fmnist_dir, tiny_set_args, monkeypatch, capsys):
    monkeypatch.setattr(images, "F", _NanAfter(1))
    rc, _, err = _cli(["train", "--data-dir", fmnist_dir, "--out", tmp_path / "run", "--max-steps", 3,
                       "--batch-size", 32, *tiny_set_args], capsys)
    _assert_one_line_error(rc, err)
    assert "loss became nan at step 1" in err
    assert find_latest_checkpoint(tmp_path / "run") is None


def test_a_batch_size_beyond_the_training_set_trains_on_all_of_it(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """--batch-size 10000000 on a few hundred images was refused for memory (1907 GiB of activations),
    though a batch is never larger than the training set; the log said "batch 100000" for one of 256."""
    rc, out, err = _cli(["train", "--data-dir", fmnist_dir, "--out", tmp_path / "run", "--max-steps", 1,
                         "--batch-size", 10_000_000, *tiny_set_args], capsys)
    n = len(load_dataset("fashion-mnist", "train", fmnist_dir, download=False))
    assert rc == 0 and f"{n} images, 1 step, batch {n} (all of them), cpu" in out, err
    assert "done: 1 step, test accuracy" in out  # was "1 steps"


def test_an_infinite_aux_loss_stops_the_run(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """--z-loss-weight 3e38 made the aux loss inf from the first step: clipping scaled every gradient by
    1/inf, so the model never moved, and the run logged "aux_loss inf" and ended with exit 0."""
    rc, _, err = _cli(["train", "--data-dir", fmnist_dir, "--out", tmp_path / "run", "--max-steps", 3,
                       "--batch-size", 32, "--z-loss-weight", "3e38", *tiny_set_args], capsys)
    _assert_one_line_error(rc, err)
    assert "aux_loss became inf (the MoE's balance and z-losses: see --aux-weight, --z-loss-weight) at step 1" in err
    assert find_latest_checkpoint(tmp_path / "run") is None


def test_an_evaluation_that_drops_most_tokens_says_so(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """--capacity-factor 0.01 trained and evaluated with ~98% of the tokens getting no expert output, and
    only `widenet eval` showed it."""
    common = ["--data-dir", fmnist_dir, "--max-steps", 2, "--batch-size", 32, *tiny_set_args]
    rc, out, err = _cli(["train", *common, "--out", tmp_path / "low", "--capacity-factor", "0.01"], capsys)
    assert rc == 0, err
    worst = max(r["dropped_fraction"] for r in read_metrics(tmp_path / "low" / "metrics.jsonl")[-1]["routing"])
    assert worst > 0.9 and f"note: the MoE dropped {worst:.0%} of a block's tokens" in out
    assert "--eval-capacity-factor" in out and out.count("note: the MoE dropped") == 1  # one evaluation
    rc, out, err = _cli(["train", *common, "--out", tmp_path / "ample", "--capacity-factor", "2"], capsys)
    assert rc == 0 and "dropped" not in out, err


def test_an_update_that_breaks_the_weights_stops_at_the_evaluation(tmp_path, fmnist_dir, tiny_overrides):
    """lr 1e30: the one step's loss (computed before its update) is finite, the weights after it are
    not. The run used to save them, report "loss nan" and exit 0 (and compare ranked such models)."""
    out = tmp_path / "run"
    cfg = _config(fmnist_dir, out, tiny_overrides, max_steps=1, lr=1e30, warmup_steps=0)
    with pytest.raises(TrainingError, match=r"the evaluation at step 1 gave loss nan: the model.s outputs are no longer "
                                            r"finite; stopped \(no checkpoint was saved yet\)"):
        train(cfg, log=_quiet)
    assert find_latest_checkpoint(out) is None
    assert [r["split"] for r in read_metrics(out / "metrics.jsonl")] == ["train"]  # no NaN evaluation recorded


# --- kill -9 and resume == uninterrupted ---------------------------------------------------
RESUME_STEPS = 40  # 8 steps per epoch: the resumed run crosses epoch boundaries
SAVE_EVERY = 5
KILL_AFTER = 13  # kill once step 13 is logged: the newest checkpoint is then step 10 (mid-epoch) or later


def _train_command(data_dir: Path, out: Path, tiny_set_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "widenet", "train", "--model", "widenet_tiny", "--data-dir", str(data_dir),
            *tiny_set_args, "--max-steps", str(RESUME_STEPS), "--batch-size", "32", "--lr", "3e-3",
            "--dropout", "0.1", "--save-every", str(SAVE_EVERY), "--log-every", "1", "--device", "cpu",
            "--out", str(out)]


def _env(tmp_path: Path) -> dict:
    # One intra-op thread per process (see the single_thread fixture); the same for every run.
    env = dict(os.environ, WIDENET_DATA_HOME=str(tmp_path / "data-home"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _logged_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_metrics(metrics) if r.get("split") == "train"] if metrics.exists() else []


def _last_logged_step(metrics: Path) -> int:
    """Step of the newest train record, read cheaply (the file only grows while training)."""
    try:
        text = metrics.read_bytes()
    except FileNotFoundError:
        return 0
    for line in reversed(text.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "train":
            return record["step"]
    return 0


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, fmnist_dir, tiny_set_args):
    a, b = tmp_path / "A", tmp_path / "B"
    env = _env(tmp_path)
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("A1", "A2", "B")}
    # B (uninterrupted) runs alongside A to overlap the interpreter/torch start-up.
    proc_b = subprocess.Popen(_train_command(fmnist_dir, b, tiny_set_args), env=env, cwd=tmp_path,
                              stdout=logs["B"], stderr=subprocess.STDOUT)
    proc_a = subprocess.Popen(_train_command(fmnist_dir, a, tiny_set_args), env=env, cwd=tmp_path,
                              stdout=logs["A1"], stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc_a.poll() is None:
            if _last_logged_step(a / "metrics.jsonl") >= KILL_AFTER:
                os.kill(proc_a.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        code = proc_a.wait(timeout=30)
        assert code == -signal.SIGKILL, "the run was not killed mid-way (exit status %s): %s" % (
            code, (tmp_path / "A1.log").read_text(errors="replace")[-2000:])
    finally:
        if proc_a.poll() is None:
            proc_a.kill()
            proc_a.wait()
    killed_at = max(_logged_steps(a / "metrics.jsonl"))
    saved = find_latest_checkpoint(a)
    saved_step = load_checkpoint(saved).step
    assert 2 * SAVE_EVERY <= saved_step <= killed_at < RESUME_STEPS

    resumed = subprocess.run(_train_command(fmnist_dir, a, tiny_set_args) + ["--resume"], env=env, cwd=tmp_path,
                             stdout=logs["A2"], stderr=subprocess.STDOUT, timeout=300)
    assert proc_b.wait(timeout=300) == 0, (tmp_path / "B.log").read_text(errors="replace")
    for f in logs.values():
        f.close()
    assert resumed.returncode == 0, (tmp_path / "A2.log").read_text(errors="replace")
    assert f"(step {saved_step})" in (tmp_path / "A2.log").read_text()

    final = checkpoint_dir_name(RESUME_STEPS)
    assert find_latest_checkpoint(a).name == final and find_latest_checkpoint(b).name == final
    weights_a = load_file(str(a / "checkpoints" / final / "model.safetensors"))
    weights_b = load_file(str(b / "checkpoints" / final / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key

    metrics_a = read_metrics(a / "metrics.jsonl")
    metrics_b = read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in metrics_b if r["split"] == "train"] == list(range(1, RESUME_STEPS + 1))
    assert without_timing(metrics_a) == without_timing(metrics_b)
    assert all(key not in r for r in without_timing(metrics_a) for key in TIMING_KEYS)
    # The counters and RNG state saved at the end agree too.
    state_a = load_checkpoint(a).train_state
    state_b = load_checkpoint(b).train_state
    for key in ("step", "epoch", "batch", "examples"):
        assert state_a["progress"][key] == state_b["progress"][key]
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])


def _assert_same_run(resumed, uninterrupted, run_a, run_b) -> None:
    """Equal final weights, and equal metrics.jsonl apart from timings."""
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    metrics_a = without_timing(read_metrics(run_a / "metrics.jsonl"))
    metrics_b = without_timing(read_metrics(run_b / "metrics.jsonl"))
    assert [(r["split"], r["step"]) for r in metrics_a] == [(r["split"], r["step"]) for r in metrics_b]
    assert metrics_a == metrics_b


# --- a crash between an epoch's evaluation and its checkpoint ---------------------------------
class _SimulatedKill(BaseException):
    pass


def test_crash_after_epoch_eval_then_resume_matches_uninterrupted(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """--save-every lands on the last step of an epoch (8 = 256 / 32). That step is saved once, after
    the epoch's evaluation record. A crash between epoch 2's evaluation record (step 16) and its
    checkpoint resumes from step 8, drops the records after it, and evaluates epoch 2 again:
    metrics.jsonl must equal the uninterrupted run's (no duplicated evaluation line)."""
    settings = dict(max_steps=16, save_every=8, log_every=4)
    uninterrupted = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)

    calls = []
    real_save = trainer.save_checkpoint

    def save_then_die(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the end-of-epoch checkpoint of step 16, right after its evaluation record
            raise _SimulatedKill()
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_SimulatedKill):
        train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings), log=_quiet)
    assert calls == [8, 16]
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)

    _assert_same_run(resumed, uninterrupted, tmp_path / "A", tmp_path / "B")


def _kill_during_step_7(monkeypatch, cfg: TrainConfig, counting=lambda: True) -> None:
    """Train cfg (a checkpoint every 5 steps) until a simulated kill during its 7th step; the last
    checkpoint is step 5's. counting() says whether an update is one of the run's own."""
    real_step = trainer.Trainer.update
    steps = []

    def step_then_die(*args, **kwargs):
        if counting():
            if len(steps) == 6:  # steps 1..6 done, checkpoint at 5: "killed" during step 7
                raise _SimulatedKill()
            steps.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "update", step_then_die)
    with pytest.raises(_SimulatedKill):
        train(cfg, log=_quiet)
    monkeypatch.setattr(trainer.Trainer, "update", real_step)
    assert find_latest_checkpoint(cfg.out).name == checkpoint_dir_name(5)


def test_resume_between_log_lines_matches_uninterrupted(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """The checkpoint (every 5 steps) falls inside a logging window (every 4 steps): after a crash at
    step 7 and a resume from step 5, the train record of step 8 must still average steps 5..8 as in
    the uninterrupted run ("exactly the weights and metrics of an uninterrupted run")."""
    settings = dict(max_steps=12, save_every=5, log_every=4)
    uninterrupted = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)

    _kill_during_step_7(monkeypatch, _config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings))
    resumed = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)

    _assert_same_run(resumed, uninterrupted, tmp_path / "A", tmp_path / "B")


def test_float16_run_resumes_with_its_loss_scale(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """--amp fp16 keeps a loss scale that backs off when gradients overflow (those steps are skipped):
    part of the training state, saved and resumed like the optimizer's. Started high here, so that
    steps overflow and the scale moves before the checkpoint at step 5."""
    from widenet.train import update

    monkeypatch.setattr(trainer, "loss_scaler", lambda *a: torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    settings = dict(max_steps=12, save_every=5, log_every=4, amp="fp16", batch_size=8)
    uninterrupted = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)
    _kill_during_step_7(monkeypatch, _config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings))
    saved = load_checkpoint(tmp_path / "A" / "checkpoints" / checkpoint_dir_name(5)).train_state["scaler"]
    assert saved["scale"] < 2.0 ** 24  # it backed off
    resumed = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)
    _assert_same_run(resumed, uninterrupted, tmp_path / "A", tmp_path / "B")
    assert update.loss_scaler(torch.bfloat16, torch.device("cpu")) is None  # bf16: float32's range, no scale


# --- --time-budget ------------------------------------------------------------------------------
def _planning_fixed_steps(monkeypatch, steps: int, replanned: int | None = None) -> list:
    """Let the trainer's plan_budget measure for real (running its throwaway steps and evaluation), then
    return `steps`: the planned count becomes deterministic while the planning's side effects stay.
    The re-plans after each epoch answer `replanned` (default: `steps` again)."""
    plans = []
    real_plan = trainer.plan_budget

    def plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return dataclasses.replace(plans[-1], steps=steps)

    monkeypatch.setattr(trainer, "plan_budget", plan)
    monkeypatch.setattr(Deadline, "steps", lambda self, done: steps if replanned is None else replanned)
    return plans


def test_time_budget_run_equals_the_fixed_length_run(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """Planning trains and evaluates throwaway copies, then restores the RNG states: the budgeted
    run must end with exactly the weights and metrics of a --max-steps run of the planned length."""
    settings = dict(log_every=4, eval_every=2)
    fixed = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, max_steps=12, **settings), log=_quiet)
    plans = _planning_fixed_steps(monkeypatch, 12)
    lines: list[str] = []
    budgeted = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, max_steps=None, time_budget=1.0,
                             **settings), log=lines.append)
    assert len(plans) == 1 and plans[0].step_s > 0 and plans[0].eval_s > 0
    assert any(line.startswith("time budget 1 min:") for line in lines)
    assert budgeted.steps == 12
    _assert_same_run(budgeted, fixed, tmp_path / "A", tmp_path / "B")


def test_time_budget_planning_leaves_the_float16_loss_scale_alone(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """The planner's throwaway steps overflow and back off a loss scale too: their own copy's, or the run
    would start from a lowered scale and differ from the --max-steps run of its planned length."""
    monkeypatch.setattr(trainer, "loss_scaler", lambda *a: torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    settings = dict(log_every=4, amp="fp16", batch_size=8)
    fixed = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, max_steps=12, **settings), log=_quiet)
    _planning_fixed_steps(monkeypatch, 12)
    budgeted = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, max_steps=None, time_budget=1.0,
                             **settings), log=_quiet)
    scales = [load_checkpoint(find_latest_checkpoint(tmp_path / run)).train_state["scaler"]["scale"] for run in "AB"]
    assert scales[0] == scales[1] < 2.0 ** 24  # it backed off in both, alike
    _assert_same_run(budgeted, fixed, tmp_path / "A", tmp_path / "B")


def test_time_budget_replan_moves_the_schedule_end(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """Planned 12 steps; after the first epoch (8 steps) the re-plan says 20: the run goes on to 20,
    and the cosine schedule now ends at 20 (at step 12 the lr is no longer 0)."""
    _planning_fixed_steps(monkeypatch, 12, replanned=20)
    lines: list[str] = []
    result = train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=None, time_budget=1.0,
                           log_every=4), log=lines.append)
    assert result.steps == 20
    assert any(line.startswith("time budget:") and line.endswith("12 -> 20 steps") for line in lines), lines
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"}
    assert lr[12] > 0 and lr[20] == 0.0
    assert load_checkpoint(find_latest_checkpoint(tmp_path / "run")).train_state["progress"]["total"] == 20


def test_time_budget_leaves_the_compiling_step_out_of_the_step_time(tmp_path, fmnist_dir, tiny_overrides,
                                                                    monkeypatch):
    """--compile: the first step compiles (30-90 s on a CPU). Counted as a step, it inflated the mean
    step time for the rest of the run and a budgeted run ended well before its deadline; it also
    made a compiled run's images/s (the log lines', the result's, compare's) a fraction of its speed."""
    class CompilingOnFirstCall(torch.nn.Module):  # stands in for torch.compile: the first call is slow
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                time.sleep(2.0)
            return self.model(*args, **kwargs)

    monkeypatch.setattr(trainer, "compiled_if", lambda enabled, model, device: CompilingOnFirstCall(model))
    _planning_fixed_steps(monkeypatch, 12)
    observed = []
    real_observe = Deadline.observe_steps
    monkeypatch.setattr(Deadline, "observe_steps",
                        lambda self, steps, seconds: (observed.append((steps, seconds)), real_observe(self, steps, seconds)))
    result = train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=None, time_budget=1.0,
                           compile=True, log_every=1), log=_quiet)
    assert result.steps == 12
    (steps, seconds), *_ = observed  # the first epoch: 8 steps, the compiling one left out
    assert steps == 7 and seconds < 1.5, observed
    # The speeds are over the 11 other steps: their time, implied by the speed, holds no 2 s sleep.
    assert 0 < 11 * 32 / result.train_images_per_s < 1.5, result.train_images_per_s
    first, second = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"][:2]
    assert first["step"] == 1 and "images_per_s" not in first, first  # the compiling step alone: no speed
    assert second["step"] == 2 and 0 < 32 / second["images_per_s"] < 1.5, second


def test_a_run_stopped_while_compiling_resumes_its_budget_from_the_seconds_spent():
    """A checkpoint saved after the compiling step alone holds no timed step: the resumed budget's
    step time is the budget's seconds per step (a step time of 0 made the deadline refuse to plan)."""
    stopped = Progress.from_state(dict(step=1, untimed_steps=1, train_seconds=0.0, wall_seconds=70.0, total=50))
    assert stopped.step_seconds() == 70.0
    deadline = Deadline(600.0, Cadence(per_epoch=1, every_epochs=1), stopped.step_seconds(), 1.0, time.monotonic(),
                        spent_before=70.0)
    deadline.observe_steps(0, 65.0)  # the resumed process's first epoch: its own compiling step only
    assert 0 < deadline.steps(2) - 2 <= 530 / 70
    assert Progress.from_state(dict(step=10, untimed_steps=1, train_seconds=4.5)).step_seconds() == 0.5
    assert Progress.from_state(dict(step=10, train_seconds=5.0)).step_seconds() == 0.5  # saved before untimed_steps


def test_time_budget_resume_keeps_the_planned_steps(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """A resumed budgeted run does not plan from scratch: it continues from the plan stored in the
    checkpoint (its re-plans here keep 12 steps)."""
    settings = dict(max_steps=None, time_budget=1.0, save_every=5, log_every=4)
    _planning_fixed_steps(monkeypatch, 12)
    uninterrupted = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)

    plans = _planning_fixed_steps(monkeypatch, 12)
    # Only the run's own steps count: the planning's throwaway steps come first (then plans is filled).
    _kill_during_step_7(monkeypatch, _config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings),
                        counting=lambda: bool(plans))

    def no_second_plan(*args, **kwargs):
        raise AssertionError("a resumed run planned its budget again")

    monkeypatch.setattr(trainer, "plan_budget", no_second_plan)
    resumed = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)
    assert resumed.steps == 12
    _assert_same_run(resumed, uninterrupted, tmp_path / "A", tmp_path / "B")


def test_time_budget_really_measured(tmp_path, fmnist_dir, tiny_overrides):
    """Without any patching: one plan before training, re-plans after epochs; the last one is the run's length."""
    lines: list[str] = []
    result = train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=None, time_budget=0.1),
                   log=lines.append)
    plans = [line for line in lines if line.startswith("time budget")]
    assert plans[0].startswith("time budget 0.1 min:") and all(p.startswith("time budget:") for p in plans[1:])
    assert plans[-1].endswith(f"-> {result.steps} steps") or f"-> {result.steps} steps (" in plans[-1], lines
    assert result.steps >= 1


def test_time_budget_too_short_is_a_clear_error(tmp_path, fmnist_dir, tiny_overrides):
    with pytest.raises(ValueError, match="does not fit one training step"):
        train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=None, time_budget=1e-6),
              log=_quiet)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_time_budget_settings_are_checked(tmp_path, fmnist_dir, tiny_overrides):
    with pytest.raises(ValueError, match="either time_budget or max_steps"):
        _config(fmnist_dir, tmp_path, tiny_overrides, time_budget=1.0)
    for bad in (0, -1.0, float("inf"), "5"):
        with pytest.raises(ValueError, match="time_budget must be a (positive|finite) number"):
            _config(fmnist_dir, tmp_path, tiny_overrides, max_steps=None, time_budget=bad)


@pytest.mark.parametrize("extra", [["--time-budget", "5", "--max-steps", "3"], ["--time-budget", "5", "--epochs", "2"],
                                   ["--time-budget", "0"], ["--time-budget", "soon"]])
def test_cli_time_budget_bad_arguments(tmp_path, fmnist_dir, capsys, extra):
    rc, _, err = _cli(["train", "--data-dir", fmnist_dir, "--out", tmp_path / "run", *extra], capsys)
    _assert_one_line_error(rc, err)
    assert "time-budget" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_run_resumes_exactly(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """--compile: a run killed during step 7 and resumed from step 5 ends with exactly the weights
    and metrics of an uninterrupted compiled run (compiled code draws the router noise from the
    global generators, whose states the checkpoints hold)."""
    settings = dict(max_steps=10, save_every=5, log_every=4, compile=True)
    uninterrupted = train(_config(fmnist_dir, tmp_path / "B", tiny_overrides, **settings), log=_quiet)

    _kill_during_step_7(monkeypatch, _config(fmnist_dir, tmp_path / "A", tiny_overrides, **settings))
    resumed = train(_config(fmnist_dir, tmp_path / "A", tiny_overrides, resume=True, **settings), log=_quiet)

    _assert_same_run(resumed, uninterrupted, tmp_path / "A", tmp_path / "B")


# --- the update step's schedule and clipping, as the Trainer applies them ------------------------
def _spy_optimizer(monkeypatch) -> list[dict]:
    """Wrap the trainer's optimizer so that each update records the lr it applies and the global L2
    norm of the gradients it is given (after the trainer's clipping), summed by hand here."""
    updates: list[dict] = []
    real_build = trainer.build_optimizer

    def build(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)

        def before_step(opt, _args, _kwargs):
            grads = [p.grad.detach().double() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            updates.append(dict(lr=[g["lr"] for g in opt.param_groups], grad_norm=norm))

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build)
    return updates


def _factor_by_hand(s: int, warmup: int, total: int, decay: str) -> float:
    """The schedule's factor for the update of 0-based index s: (s + 1) / W during the W warmup
    updates, then linear or cosine decay from 1 (at s = W) to 0 (at s = T)."""
    if s < warmup:
        return (s + 1) / warmup
    p = min(1.0, (s - warmup) / (total - warmup))
    return 1.0 - p if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_trainer_applies_warmup_steps_and_the_chosen_schedule(tmp_path, fmnist_dir, tiny_overrides, monkeypatch,
                                                               decay):
    """warmup_steps=3 of 6 updates: the lr of every update, and the lr logged after each step (the
    next update's), follow the hand formula for the chosen decay, not a default."""
    total, warmup, lr = 6, 3, 1e-3
    updates = _spy_optimizer(monkeypatch)
    train(_config(fmnist_dir, tmp_path / "run", tiny_overrides, max_steps=total, warmup_steps=warmup, lr=lr,
                  schedule=decay, log_every=1), log=_quiet)
    expected = [lr * _factor_by_hand(s, warmup, total, decay) for s in range(total)]
    assert len(updates) == total
    for s, update in enumerate(updates):
        assert update["lr"] == pytest.approx([expected[s]] * len(update["lr"]), rel=1e-12, abs=1e-15), s
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(logged) == list(range(1, total + 1))
    for step, value in logged.items():  # after `step` updates: the lr of update index `step`
        assert value == pytest.approx(lr * _factor_by_hand(step, warmup, total, decay), rel=1e-12, abs=1e-15), step
    # the hand values themselves: 1/3, 2/3, 1 while warming up, then 1 at s = W
    assert [round(e / lr, 12) for e in expected[:4]] == [round(1 / 3, 12), round(2 / 3, 12), 1.0, 1.0]


def test_trainer_clips_the_global_gradient_norm(tmp_path, fmnist_dir, tiny_overrides, monkeypatch):
    """clip_norm 1e-3: every update sees gradients of global norm at most 1e-3, while the same run
    without clipping (clip_norm 0) sees larger ones, and ends with other weights."""
    clip = 1e-3
    updates = _spy_optimizer(monkeypatch)
    clipped = train(_config(fmnist_dir, tmp_path / "clipped", tiny_overrides, max_steps=3, clip_norm=clip),
                    log=_quiet)
    seen_clipped = [u["grad_norm"] for u in updates]
    updates.clear()
    free = train(_config(fmnist_dir, tmp_path / "free", tiny_overrides, max_steps=3, clip_norm=0.0), log=_quiet)
    seen_free = [u["grad_norm"] for u in updates]
    assert len(seen_clipped) == len(seen_free) == 3
    assert all(0 < n <= clip * (1 + 1e-6) for n in seen_clipped), seen_clipped
    assert all(n > 10 * clip for n in seen_free), seen_free  # so the clip did act
    differs = [k for k, v in clipped.model.state_dict().items() if not torch.equal(v, free.model.state_dict()[k])]
    assert differs
