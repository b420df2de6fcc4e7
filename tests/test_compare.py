"""`compare`: several models, one recipe, a report with tables and figures; reruns reuse runs."""

from __future__ import annotations

import platform
import re
import statistics
from pathlib import Path

import pytest
import torch

from widenet.analysis import compare as compare_mod
from widenet.analysis.compare import RunSpec, SpecResult, compare
from widenet.analysis.similarity import block_similarity
from widenet.cli import main
from widenet.models.registry import count_parameters
from widenet.train.exported import model_from_meta
from widenet.train.metrics import read_metrics
from widenet.train.checkpoint import SettingsChanged, find_latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ["vit_tiny", "widenet_tiny"]
LABELS = ["vit_tiny", "widenet_tiny", "widenet_tiny (shared norms)"]
SLUGS = ["vit_tiny", "widenet_tiny", "widenet_tiny__shared_norms"]
SEEDS = 2
# The real *_tiny presets (compare has no per-model overrides), on a tiny budget.
BUDGET = dict(max_steps=2, train_subset=64, test_subset=32, batch_size=16)


def _quiet(_line: str) -> None:
    pass


def _section(report: str, title: str) -> str:
    """The text of the '## title' section (up to the next '## ')."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", report, flags=re.M | re.S)
    assert match, f"no section {title!r} in the report:\n{report}"
    return match.group(1)


def _table_rows(section: str) -> dict[str, list[str]]:
    """First-column label -> cells, for the data rows of the markdown table(s) in `section`."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under each run's checkpoints/."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.glob("runs/*/seed*/checkpoints/**/*")) if p.is_file()}


@pytest.fixture(scope="module")
def compared(single_thread, tmp_path_factory, fmnist_dir):
    """One `widenet compare` through the CLI, then the same comparison again through the API."""
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", "--models", ",".join(MODELS), "--seeds", str(SEEDS), "--data-dir", str(fmnist_dir),
            "--out", str(out), "--device", "cpu", "--ablation"]
    for key, value in BUDGET.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    first_report = (out / "report.md").read_text(encoding="utf-8")
    first_files = _snapshot(out)
    first_metrics = {p: p.read_bytes() for p in out.glob("runs/*/seed*/metrics.jsonl")}
    second_path = compare(MODELS, out, preset="quick", seeds=SEEDS, data="fashion-mnist", ablation=True,
                          data_dir=str(fmnist_dir), device="cpu", log=_quiet, **BUDGET)
    return dict(out=out, first_report=first_report, first_files=first_files, first_metrics=first_metrics,
                second_path=second_path)


def test_report_results_table(compared):
    report = compared["first_report"]
    rows = _table_rows(_section(report, "Results"))
    assert list(rows) == MODELS
    for cells in rows.values():
        assert len(cells) == 4, cells
        assert re.fullmatch(r"\d+\.\d+M", cells[0]), cells  # params
        assert re.fullmatch(r"\d+\.\d+ ± \d+\.\d+", cells[3]), cells  # accuracy mean ± std over seeds
        assert 0 <= float(cells[3].split(" ± ")[0]) <= 100
    assert "**Winner:" in report
    assert f"Seeds: {SEEDS}." in report


def test_report_numbers_are_the_runs_numbers(compared):
    """Each accuracy cell is the mean ± sample std of the seeds' final test accuracies (read back from
    their metrics.jsonl), each params cell the saved model's parameter count, and the budget line the
    steps the runs took: max_steps 2 of 64 images / batch 16 = 4 steps per epoch, half an epoch, not
    the quick preset's 2 epochs."""
    rows = {**_table_rows(_section(compared["first_report"], "LayerNorm ablation")),
            **_table_rows(_section(compared["first_report"], "Results"))}
    for label, slug in zip(LABELS, SLUGS):
        seeds = [compared["out"] / "runs" / slug / f"seed{seed}" for seed in range(SEEDS)]
        accuracy = [100 * [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "test"][-1]["accuracy"]
                    for d in seeds]
        assert rows[label][3] == f"{statistics.fmean(accuracy):.2f} ± {statistics.stdev(accuracy):.2f}", label
        meta = load_checkpoint(find_latest_checkpoint(seeds[0])).meta
        assert rows[label][0] == f"{count_parameters(model_from_meta(meta)) / 1e6:.3f}M", label
    budget = next(line for line in compared["first_report"].splitlines() if line.startswith("Budget per run"))
    assert "2 steps (0.50 epochs)" in budget, budget


def test_report_ablation_section(compared):
    section = _section(compared["first_report"], "LayerNorm ablation")
    rows = _table_rows(section)
    assert list(rows) == ["widenet_tiny", "widenet_tiny (shared norms)"]
    assert all(re.fullmatch(r"\d+\.\d+ ± \d+\.\d+", cells[3]) for cells in rows.values())
    # Shared norms save parameters: fewer than individual norms.
    assert float(rows["widenet_tiny (shared norms)"][0][:-1]) < float(rows["widenet_tiny"][0][:-1])
    assert "Individual LayerNorms vs shared" in section


def test_report_routing_table(compared):
    section = _section(compared["first_report"], "Routing")
    lines = [line for line in section.splitlines() if line.startswith("| widenet_tiny")]
    # widenet_tiny: every block routes (one row per block); vit_tiny has no MoE, so no rows.
    meta = load_checkpoint(find_latest_checkpoint(compared["out"] / "runs" / "widenet_tiny" / "seed0")).meta
    depth = meta["model_config"]["encoder"]["depth"]
    experts = meta["model_config"]["encoder"]["moe"]["num_experts"]
    by_label: dict[str, list[int]] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        by_label.setdefault(cells[0], []).append(int(cells[1]))
        loads = [float(x) for x in cells[2].split(" / ")]
        assert len(loads) == experts and sum(loads) == pytest.approx(1.0, abs=0.03)  # printed to 2 decimals
        assert 0 <= float(cells[3]) <= 1
    assert by_label == {"widenet_tiny": list(range(depth)), "widenet_tiny (shared norms)": list(range(depth))}
    assert "| vit_tiny |" not in section


def test_report_figures_are_valid_pngs(compared):
    out = compared["out"]
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", compared["first_report"])
    expected = {"accuracy_vs_params.png", "training_curves.png", "block_similarity.png",
                "expert_load_widenet_tiny.png", "expert_load_widenet_tiny__shared_norms.png"}
    assert set(names) == expected
    for name in names:
        path = out / name
        assert path.is_file(), name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 2000, name
        assert b"IEND" in data[-16:], name


def test_run_folders_per_model_and_seed(compared):
    out = compared["out"]
    for slug in SLUGS:
        for seed in range(SEEDS):
            run = out / "runs" / slug / f"seed{seed}"
            ckpt = load_checkpoint(find_latest_checkpoint(run))
            assert ckpt.step == BUDGET["max_steps"]
            assert ckpt.meta["train_config"]["seed"] == seed
            assert ckpt.meta["train_config"]["train_subset"] == BUDGET["train_subset"]
    shared = load_checkpoint(find_latest_checkpoint(out / "runs" / "widenet_tiny__shared_norms" / "seed0"))
    assert shared.meta["train_config"]["model_overrides"] == {**compare_mod.QUICK_MODEL, "share_norms": True}
    assert shared.meta["model_config"]["encoder"]["share_norms"] is True


def test_second_call_reuses_finished_runs(compared):
    out = compared["out"]
    assert compared["second_path"] == out / "report.md"
    # No checkpoint was rewritten (same files, same mtimes), no metrics record added or changed.
    assert _snapshot(out) == compared["first_files"]
    assert compared["first_files"], "no checkpoint files found"
    for path, data in compared["first_metrics"].items():
        assert path.read_bytes() == data
    # The report is the same apart from its time stamp.
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("Generated ")]  # noqa: E731
    assert strip(compared["second_path"].read_text(encoding="utf-8")) == strip(compared["first_report"])


def test_single_dense_model_report(tmp_path, fmnist_dir):
    # an earlier call into this folder compared widenet_tiny too: its figure goes with its report
    (tmp_path / "out" / "runs" / "widenet_tiny").mkdir(parents=True)
    for name in ("expert_load_widenet_tiny.png", "expert_load_mine.png"):  # the second not compare's
        (tmp_path / "out" / name).write_bytes(PNG_MAGIC)
    report_path = compare(["vit_tiny"], tmp_path / "out", seeds=1, data_dir=str(fmnist_dir), log=_quiet,
                          **BUDGET)
    report = report_path.read_text(encoding="utf-8")
    rows = _table_rows(_section(report, "Results"))
    assert list(rows) == ["vit_tiny"]
    seed0 = tmp_path / "out" / "runs" / "vit_tiny" / "seed0"
    final = [r for r in read_metrics(seed0 / "metrics.jsonl") if r["split"] == "test"][-1]["accuracy"]
    assert rows["vit_tiny"][3] == f"{100 * final:.2f}"  # one seed: its accuracy, no "± 0.00" spread
    assert f"One model in the comparison: vit_tiny, {100 * final:.2f}% test accuracy." in report
    assert "Winner" not in report
    assert f"on {platform.machine()} CPU with {torch.get_num_threads()} threads (torch {torch.__version__})." in report
    assert "Same budget and recipe for every model (model settings: " in report  # the preset's stem, at least
    assert "ablation" not in report.lower()  # no WideNet: nothing to ablate
    # The same folder with another budget: named as the earlier call's, not given train's --init advice.
    with pytest.raises(SettingsChanged) as caught:
        compare(["vit_tiny"], tmp_path / "out", seeds=1, data_dir=str(fmnist_dir), log=_quiet,
                **dict(BUDGET, max_steps=3))
    message = str(caught.value)
    assert "seed0 was made by an earlier call with other settings (max_steps: 2 -> 3)" in message
    assert "another --out" in message and "--init" not in message
    assert "(no MoE model in the comparison)" in _section(report, "Routing")
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert not any(name.startswith("expert_load") for name in names)
    assert [p.name for p in (tmp_path / "out").glob("expert_load_*")] == ["expert_load_mine.png"]
    for name in names:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    # the run's metrics.jsonl deleted: the same call reports again from the checkpoint, without its curve
    (seed0 / "metrics.jsonl").unlink()
    notes = []
    compare(["vit_tiny"], tmp_path / "out", seeds=1, data_dir=str(fmnist_dir), log=notes.append, **BUDGET)
    assert f"  {seed0 / 'metrics.jsonl'} is missing: this run's curve is left out of the figures" in notes
    again = report_path.read_text(encoding="utf-8")
    assert _table_rows(_section(again, "Results"))["vit_tiny"][3] == f"{100 * final:.2f}"


def test_quick_preset_trains_with_the_conv_stem_and_gives_way_to_a_given_length(tmp_path, fmnist_dir):
    """The quick preset's conv stem stays under the caller's overrides; a given step count replaces its
    time budget; without WideNet there is nothing to ablate, and with it the preset skips the ablation."""
    compare(["vit_tiny", "widenet_tiny"], tmp_path / "out", seeds=1, data_dir=str(fmnist_dir), log=_quiet,
            model_overrides=dict(stem_width=32), **BUDGET)
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["vit_tiny", "widenet_tiny"]
    meta = load_checkpoint(find_latest_checkpoint(tmp_path / "out" / "runs" / "vit_tiny" / "seed0")).meta
    assert (meta["model_config"]["stem"], meta["model_config"]["patch_size"]) == ("conv", 8)
    assert meta["model_config"]["stem_width"] == 32
    assert meta["train_config"]["time_budget"] is None and meta["train_config"]["max_steps"] == 2
    assert compare_mod.PRESETS["quick"]["time_budget"] == 1.2  # what the main job spends per run


def test_model_overrides_are_honoured(tmp_path, fmnist_dir):
    """compare(**train_settings) passes TrainConfig fields on: model_overrides reach every run's model."""
    tiny = dict(dim=32, depth=2, num_heads=2, mlp_dim=64)
    compare(["widenet_tiny"], tmp_path / "out", seeds=1, ablation=False, data_dir=str(fmnist_dir),
            log=_quiet, model_overrides=tiny, **BUDGET)
    ckpt = load_checkpoint(find_latest_checkpoint(tmp_path / "out" / "runs" / "widenet_tiny" / "seed0"))
    encoder = ckpt.meta["model_config"]["encoder"]
    assert (encoder["dim"], encoder["depth"], encoder["num_heads"], encoder["mlp_dim"]) == (32, 2, 2, 64)


def test_compare_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        compare(["vit_tiny"], tmp_path, preset="nosuch", log=_quiet)
    with pytest.raises(ValueError, match="no models"):
        compare([], tmp_path, log=_quiet)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("models, message", [
    (["vit_tiny", "widenet_tiny", "vit_tiny"], "vit_tiny named more than once in --models"),  # one folder, twice
    (["vit_tiny", "nosuch"], "unknown model 'nosuch'"),  # was found after vit_tiny had trained
    (["vit_tiny", "albert_text_tiny"], "albert_text_tiny is a text model; widenet compare takes image models such as "
                                       r"widenet_tiny \(widenet compare-text compares text models\)"),
    (["vit_tiny", "albert_tiny"], "top_k: none of vit_tiny, albert_tiny has MoE layers"),  # --top-k was ignored
])
def test_compare_checks_every_model_before_reading_data(tmp_path, models, message):
    """The data folder does not exist: each refusal must come before anything is read or trained."""
    with pytest.raises(ValueError, match=message):
        compare(models, tmp_path / "out", data_dir=str(tmp_path / "no-data"), log=_quiet,
                model_overrides=dict(top_k=1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, message", [
    (dict(seeds=-1), "seeds must be a whole number of at least 1, got -1"),  # was an IndexError
    (dict(seeds=0), "seeds must be a whole number of at least 1, got 0"),  # was the preset's 2 seeds
    (dict(epochs=0), "epochs must be a whole number of at least 1, got 0"),  # was the preset's length
    (dict(seeds=1.5), "seeds must be a whole number"),
    (dict(seeds=10**9), "seeds must be at most 1000, got 1000000000: every seed trains every model once more"),
    # the ablation's "individual norms" run had shared ones too, and the report compared a model with itself
    (dict(ablation=True, model_overrides=dict(share_norms=True)), "but --set share_norms=True shares them in both"),
    (dict(preset="full", model_overrides=dict(share_norms=True)), "give --no-ablation"),
])
def test_compare_refuses_settings_it_would_have_ignored(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        compare(["vit_tiny", "widenet_tiny"], tmp_path / "out", data_dir=str(tmp_path / "no-data"), log=_quiet,
                **settings)
    assert not (tmp_path / "out").exists()


def test_compare_refuses_more_seeds_than_it_could_ever_finish(tmp_path, fmnist_dir, capsys, monkeypatch):
    """--seeds 10**9 trained seed after seed for ever (a run folder each, no report); the limit itself
    (MAX_SEEDS) still trains."""
    def boom(*_args, **_kw):
        raise AssertionError("training started")

    monkeypatch.setattr(compare_mod, "train", boom)
    args = ["compare", "--models", "vit_tiny", "--max-steps", "1", "--data-dir", str(fmnist_dir),
            "--out", str(tmp_path / "out")]
    assert main([*args, "--seeds", str(10**9)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "widenet: error: seeds must be at most 1000, got 1000000000: every seed trains every model once more, one "
        "run after another, before the report; give 1000 or fewer"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="training started"):
        compare(["vit_tiny"], tmp_path / "out", seeds=compare_mod.MAX_SEEDS, data_dir=str(fmnist_dir), log=_quiet,
                **BUDGET)


def test_an_ablation_asked_for_needs_a_widenet(tmp_path):
    with pytest.raises(ValueError, match="it needs a WideNet model in --models"):  # was ignored without a word
        compare(["vit_tiny"], tmp_path / "out", ablation=True, data_dir=str(tmp_path / "no-data"), log=_quiet)
    for ablation in (None, False):  # the full preset's own ablation is for the WideNets there are
        with pytest.raises(ValueError, match="no-data"):
            compare(["vit_tiny"], tmp_path / "out", preset="full", ablation=ablation,
                    data_dir=str(tmp_path / "no-data"), log=_quiet, model_overrides=dict(share_norms=True))


def _result(label: str, model: str, accuracies: list[float], overrides: dict | None = None) -> SpecResult:
    return SpecResult(spec=RunSpec(label, model, overrides or {}), accuracies=accuracies, params=1, flops=1.0,
                      images_per_s=1.0, steps=1.0, routing=[], similarity=[], curve={})


def test_training_curves_mark_the_points_of_a_short_run(tmp_path, monkeypatch):
    """A short run logs one training loss (log_every 50): drawn as a line alone, it left the panel empty."""
    from widenet.analysis import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    short = dict(train_step=[50], train_loss=[0.9], test_step=[60], test_acc=[0.5])
    long = dict(train_step=list(range(1, 101)), train_loss=[1.0] * 100, test_step=[100], test_acc=[0.5])
    plots.training_curves({"short": short, "long": long}, tmp_path / "c.png")
    short_line, long_line = drawn[0].axes[0].lines
    assert short_line.get_marker() == "o" and long_line.get_marker() in ("None", None, "")


def test_ablation_verdict_on_a_tie_names_no_winner():
    """Equal accuracies: neither kind of norm did better."""
    own = _result("widenet_tiny", "widenet_tiny", [0.5, 0.5])
    shared = _result("widenet_tiny (shared norms)", "widenet_tiny", [0.5, 0.5], {"share_norms": True})
    text = compare_mod._ablation_verdict([own], shared)
    assert "+0.00 points" in text
    assert "shared norms did better" not in text and "individual norms did better" not in text, text


def test_verdict_clear_and_unclear_wins():
    a = _result("a", "a", [0.90, 0.92])
    b = _result("b", "b", [0.80, 0.82])
    assert compare_mod._verdict([b, a], 2).startswith("**Winner: a**")
    assert "not a clear win" not in compare_mod._verdict([b, a], 2)
    noisy = _result("c", "c", [0.70, 0.99])
    assert "not a clear win" in compare_mod._verdict([noisy, b], 2)
    twin = _result("d", "d", [0.92, 0.90])  # a's mean: was "**Winner: a** ... 0.00 points ahead of d"
    assert compare_mod._verdict([b, twin, a], 2) == "**No winner:** d, a tie at 91.00% test accuracy."
    near = _result("e", "e", [0.905, 0.905])  # half a point from a: still a winner, if not a clear one
    assert compare_mod._verdict([near, a], 2).startswith("**Winner: a** with 91.00% test accuracy, 0.50 points ahead")


def test_time_budget_report_gives_each_models_steps(tmp_path, fmnist_dir):
    """Under --time-budget the runs' step counts differ by model: the budget line says minutes and the
    table gains a steps column that matches the run's last checkpoint."""
    budget = dict(BUDGET, max_steps=None, time_budget=0.1)
    report_path = compare(["vit_tiny"], tmp_path / "out", seeds=1, data_dir=str(fmnist_dir), log=_quiet,
                          ablation=False, **budget)
    report = report_path.read_text(encoding="utf-8")
    line = next(line for line in report.splitlines() if line.startswith("Budget per run"))
    assert "0.1 minutes of wall-clock time" in line, line
    assert "| model | params | FLOPs / image | train images/s | test accuracy (%) | steps |" in report
    cells = _table_rows(_section(report, "Results"))["vit_tiny"]
    last = load_checkpoint(find_latest_checkpoint(tmp_path / "out" / "runs" / "vit_tiny" / "seed0"))
    assert int(cells[4]) == last.step >= 1


class _HiddenStates:
    """A stand-in model whose forward returns fixed hidden states (L x (B, T, D)) of varied scales."""

    def __init__(self, states):
        self.states, self.training, self.modes = states, True, []

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        self.modes.append(mode)
        return self

    def __call__(self, images, return_hidden_states=False):
        assert return_hidden_states and not self.training  # measured in eval mode
        from types import SimpleNamespace
        return SimpleNamespace(hidden_states=self.states)


def test_block_similarity_is_the_mean_token_cosine_of_a_naive_loop():
    """Entry (i, j): the mean over every (image, token) of cos(h_i, h_j) along the features, as
    F.cosine_similarity gives it pair by pair; diagonal 1, symmetric; the model's mode restored."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    # per-token scales and an offset, so that normalising over anything but the features shows
    states = [torch.randn(3, 5, 8, generator=gen) * torch.rand(3, 5, 1, generator=gen) * 10 + 0.3 * i
              for i in range(4)]
    model = _HiddenStates(states)
    sim = block_similarity(model, torch.zeros(3, 1, 8, 8))
    naive = torch.tensor([[F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item() for b in states]
                          for a in states], dtype=torch.float64)
    torch.testing.assert_close(sim.double(), naive, atol=1e-6, rtol=0)
    torch.testing.assert_close(sim.diagonal().double(), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(sim, sim.T)
    assert model.training is True


def test_verdict_counts_a_difference_below_the_reports_last_digit_as_a_tie():
    """4312/5000 and 4288/5000 average to 0.86 as 4300/5000 twice does, but not in float: the exact
    comparison named a "winner 0.00 points ahead". A hundredth of a point (the report's last digit)
    is a difference."""
    a = _result("a", "a", [4312 / 5000, 4288 / 5000])
    b = _result("b", "b", [4300 / 5000, 4300 / 5000])
    assert compare_mod._verdict([a, b], 2) == "**No winner:** a, b tie at 86.00% test accuracy."
    assert compare_mod._verdict([b, a], 2) == "**No winner:** b, a tie at 86.00% test accuracy."  # the table's order
    ahead = _result("c", "c", [0.8601, 0.8601])  # 86.01 against 86.00: 0.01 points
    assert compare_mod._verdict([b, ahead], 2) == "**Winner: c** with 86.01% test accuracy, 0.01 points ahead of b."
    # Exactly half a hundredth (0.005 points, exact in float from 5e-05 against 0) shows as 0.01 vs 0.00: not a tie.
    edge, zero = _result("e", "e", [5e-05, 5e-05]), _result("z", "z", [0.0, 0.0])
    assert compare_mod._verdict([zero, edge], 2) == "**Winner: e** with 0.01% test accuracy, 0.01 points ahead of z."
    # The ablation verdict reads ties with the same tolerance.
    own = _result("widenet_tiny", "widenet_tiny", [4312 / 5000, 4288 / 5000])
    shared = _result("widenet_tiny (shared norms)", "widenet_tiny", [0.86, 0.86], {"share_norms": True})
    assert "no difference at this budget" in compare_mod._ablation_verdict([own], shared)


def test_verdict_names_the_runner_up():
    """Means 90, 85 and 70: the gap is to the second best (85), not to the last."""
    a = _result("a", "a", [0.89, 0.91])
    b = _result("b", "b", [0.84, 0.86])
    c = _result("c", "c", [0.69, 0.71])
    for rows in ([c, a, b], [a, c, b], [b, c, a]):
        assert compare_mod._verdict(rows, 2) == "**Winner: a** with 90.00% test accuracy, 5.00 points ahead of b."


def _ablation(own_acc: list[float], shared_acc: list[float]) -> str:
    own = _result("widenet_tiny", "widenet_tiny", own_acc)
    shared = _result("widenet_tiny (shared norms)", "widenet_tiny", shared_acc, {"share_norms": True})
    return compare_mod._ablation_verdict([_result("vit_tiny", "vit_tiny", [0.1, 0.1]), own], shared)


def test_an_ablation_of_one_seed_says_its_noise_is_unknown():
    """The main verdict said so for one seed; the ablation's called a 10-point gap a result."""
    assert _ablation([0.6], [0.5]).startswith("Individual LayerNorms vs shared: +10.00 points; individual norms did "
                                              "better at this budget (one seed: the gap's noise is unknown)")
    assert "one seed" not in _ablation([0.6, 0.6], [0.5, 0.5])


def test_ablation_verdict_sign_tolerance_and_spread():
    paper = " (paper: individual norms help)."
    # Own 91, shared 81: +10 points for individual norms (spread 1.41, well outside it); swapped, -10 for shared.
    assert _ablation([0.90, 0.92], [0.80, 0.82]) == (
        "Individual LayerNorms vs shared: +10.00 points; individual norms did better at this budget" + paper)
    assert _ablation([0.80, 0.82], [0.90, 0.92]) == (
        "Individual LayerNorms vs shared: -10.00 points; shared norms did better at this budget" + paper)
    # 0.4 points is a difference (the tie tolerance is half the report's last digit, 0.005 points).
    assert _ablation([0.504, 0.504], [0.50, 0.50]) == (
        "Individual LayerNorms vs shared: +0.40 points; individual norms did better at this budget" + paper)
    # +1 point (82 vs 81) against a spread of 100 * stdev(0.80, 0.84) = 2.83: within it.
    assert _ablation([0.80, 0.84], [0.81, 0.81]) == (
        "Individual LayerNorms vs shared: +1.00 points; individual norms did better at this budget, "
        "within the seed-to-seed spread (2.83)" + paper)


def test_budget_line_counts_a_partial_last_batch_as_a_step():
    """Batch 128 over 1000 images: 7 full batches and one of 104, so 8 steps an epoch (the trainer
    keeps the partial batch); 3 epochs are 24 steps, and 20 steps are 20 / 8 = 2.5 epochs."""
    from widenet.train.config import TrainConfig

    budget = compare_mod._budget
    assert budget(TrainConfig(model="vit_tiny", batch_size=128, epochs=3), 1000) == "24 steps (3.00 epochs)"
    assert budget(TrainConfig(model="vit_tiny", batch_size=128, max_steps=20), 1000) == (
        "20 steps (2.50 epochs)")
    assert budget(TrainConfig(model="vit_tiny", batch_size=128, max_steps=1), 256) == "1 step (0.50 epochs)"


def test_report_gives_images_per_s_and_steps_as_means_over_seeds(tmp_path, fmnist_dir, monkeypatch):
    """Under a time budget seeds differ in speed and steps: each table cell is the mean over the seeds
    (300 and 500 images/s -> 400; 10 and 30 steps -> 20), not one seed's. Training is stood in for:
    each seed's run returns an untrained model with these figures."""
    from widenet.train.evaluate import EvalResult
    from widenet.train.images import TrainResult, build_model_for

    figures = {0: (300.0, 10, 0.50), 1: (500.0, 30, 0.60)}  # images/s, steps, accuracy per seed

    def fake_train(cfg, log=print, data=None):
        speed, steps, accuracy = figures[cfg.seed]
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 2.0}\n'
                                           '{"split": "test", "step": 1, "accuracy": 0.5}\n', encoding="utf-8")
        model = build_model_for(cfg, data[0])
        return TrainResult(out_dir=out, steps=steps, final_eval=EvalResult(accuracy=accuracy, loss=1.0, examples=32),
                           params=count_parameters(model), train_images_per_s=speed, model=model)

    monkeypatch.setattr(compare_mod, "train", fake_train)
    budget = dict(BUDGET, max_steps=None, time_budget=0.05)
    report = compare(["vit_tiny"], tmp_path / "out", seeds=2, data_dir=str(fmnist_dir), log=_quiet,
                     ablation=False, model_overrides=dict(dim=32, depth=2, num_heads=2, mlp_dim=64), **budget)
    cells = _table_rows(_section(report.read_text(encoding="utf-8"), "Results"))["vit_tiny"]
    assert cells[2] == "400", cells  # images/s
    assert cells[4] == "20", cells  # steps
    assert cells[3] == "55.00 ± 7.07", cells  # 100 * stdev(0.5, 0.6) = 7.07


def test_reports_name_the_gpu_they_ran_on(monkeypatch):
    """Both comparisons' reports named the CPU whatever --device was."""
    from widenet.runtime import describe_device

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert describe_device(torch.device("cuda")) == f"NVIDIA H200 (torch {torch.__version__})"
    assert "CPU" in describe_device(torch.device("cpu"))
