"""`widenet compare`: train several models with one recipe and write a report.

Every model gets the same data, budget, recipe and seeds. The report
(OUT/report.md) holds a table like the paper's (parameters, FLOPs per image,
training images/s, test accuracy mean +- std over seeds), the shared- vs
individual-LayerNorm ablation of WideNet, and PNG figures: accuracy against
parameters, training curves, expert load per block, block-output similarity.
Runs live in OUT/runs/<label>/seed<k>; a rerun of the same command resumes
unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..data.augment import normalize
from ..data.images import ImageDataset, subset
from ..files import refuse_non_folder
from ..layers.moe import MOE_SETTINGS
from ..listing import counted
from ..models.registry import model_config, require_preset_kind, settings_for, settings_for_each
from ..runtime import describe_device, resolve_device
from ..settings import repeated
from ..train.config import TrainConfig
from ..train.images import TrainResult, load_data, train
from ..train.metrics import read_metrics
from ..train.run_folder import driver_run, resume_or_restart
from . import plots
from .flops import flops_per_image
from .similarity import block_similarity

# Budgets. "quick" is the README's main job: 1.2 minutes per run on a 2-core CPU, every model
# with the convolutional stem (4 x 4 tokens from 28 px), where a minute reaches ~85% instead of
# the ~52% of the patch stem's 49 tokens (docs/experiments.md). The MoE models keep the paper's
# top-2 routing. "full" trains the same models 3 epochs each (a length in steps: the same for every
# model, and unchanged by a busy machine), on the whole test set, with 3 seeds and the ablation
# (WideNet with shared LayerNorms); 33 minutes on 2 cores. The models' own patch stems at 30 epochs
# (~5 hours here) are `--preset full --set stem=patch --set patch_size=4 --set stem_width=none --epochs 30`.
QUICK_MODEL = dict(stem="conv", patch_size=8, stem_width=96)
_RECIPE = dict(train_subset=None, batch_size=128, lr=3e-3, warmup_fraction=0.05, crop="none", log_every=50,
               model_overrides=QUICK_MODEL)
PRESETS: dict[str, dict] = {
    "quick": dict(_RECIPE, test_subset=5000, time_budget=1.2, seeds=2, ablation=False),
    "full": dict(_RECIPE, test_subset=None, epochs=3, seeds=3, ablation=True),
}
DEFAULT_MODELS = ("vit_tiny", "vit_moe_tiny", "albert_tiny", "widenet_tiny")


@dataclass
class RunSpec:
    label: str
    model: str
    overrides: dict = field(default_factory=dict)


@dataclass
class SpecResult:
    spec: RunSpec
    accuracies: list[float]
    params: int
    flops: float
    images_per_s: float
    steps: float  # mean over seeds (differs between models under a time budget)
    routing: list[dict]
    similarity: list[list[float]]
    curve: dict[str, list]

    @property
    def acc_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def acc_std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def settings_note(overrides: dict) -> str:
    """The model settings the models ran with, for a report's first paragraph ("" when none): those
    for every model, and the MoE settings, which only the MoE models took (settings_for)."""
    common = [f"{k}={v}" for k, v in overrides.items() if k not in MOE_SETTINGS]
    moe = [f"{k}={v}" for k, v in overrides.items() if k in MOE_SETTINGS]
    parts = ([f"model settings: {', '.join(common)}"] if common else []) + (
        [f"MoE models: {', '.join(moe)}"] if moe else [])
    return f" ({'; '.join(parts)})" if parts else ""


def check_distinct(models: list[str]) -> None:
    """At least one model, none named twice (its runs would share, and overwrite, one folder)."""
    if not models:
        raise ValueError("no models to compare")
    if twice := repeated(models):
        raise ValueError(f"{', '.join(twice)} named more than once in --models")


def check_count(name: str, value: int | None) -> None:
    """None (the preset's value) or a whole number of at least 1 (seeds, epochs, steps)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


# Each seed is one more training run of every model, one after another in one process, and the report
# waits for the last: 10**9 seeds never finish (and fill the disk with run folders first). A thousand
# already pins a spread down to ~2%; more can only be a mistake.
MAX_SEEDS = 1000


def check_seeds(seeds: int | None) -> None:
    """None (the preset's) or a whole number of seeds from 1 to MAX_SEEDS."""
    check_count("seeds", seeds)
    if seeds is not None and seeds > MAX_SEEDS:
        raise ValueError(f"seeds must be at most {MAX_SEEDS}, got {seeds}: every seed trains every model once "
                         f"more, one run after another, before the report; give {MAX_SEEDS} or fewer")


def _check_models(models: list[str], overrides: dict, ablation: bool, asked: bool) -> None:
    """Every name an image model that takes the settings, before anything trains; and an ablation
    (`asked` for, or the preset's) that can compare individual with shared LayerNorms."""
    for name in models:
        require_preset_kind(name, "vision", "widenet compare", "widenet compare-text compares text models")
    configs = {name: model_config(name, **own) for name, own in settings_for_each(models, overrides).items()}
    widenets = _widenets(models)
    if asked and ablation and not widenets:
        raise ValueError("--ablation trains WideNet with shared LayerNorms beside its own: it needs a WideNet "
                         "model in --models")
    if ablation and widenets and configs[widenets[0]].encoder.share_norms:
        raise ValueError(f"the LayerNorm ablation (--ablation; on in --preset full) compares {widenets[0]}'s "
                         "individual LayerNorms with shared ones, but --set share_norms=True shares them in both "
                         "runs: give --no-ablation, or leave the setting out")


def _widenets(models: list[str]) -> list[str]:
    return [m for m in models if m.startswith("widenet")]


def run_specs(models: list[str], ablation: bool) -> list[RunSpec]:
    """The models, plus WideNet with shared LayerNorms when WideNet is among them."""
    specs = [RunSpec(m, m) for m in models]
    widenets = _widenets(models)
    if ablation and widenets:
        specs.append(RunSpec(f"{widenets[0]} (shared norms)", widenets[0], {"share_norms": True}))
    return specs


def compare(models: list[str], out: str | Path, preset: str = "quick", seeds: int | None = None,
            epochs: int | None = None, ablation: bool | None = None, log: Callable[[str], None] = print,
            **train_settings) -> Path:
    """Train every (model, seed), then write OUT/report.md and its figures.

    The preset gives the budget; `epochs`, `max_steps` or `time_budget` replace its length (one of
    them), other settings replace the preset's, and `model_overrides` add to its own. `ablation`
    (WideNet with shared LayerNorms too) defaults to the preset's choice.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    check_distinct(models)
    check_seeds(seeds)
    check_count("epochs", epochs)
    budget = dict(PRESETS[preset])
    preset_seeds, preset_ablation = budget.pop("seeds"), budget.pop("ablation")
    n_seeds = preset_seeds if seeds is None else seeds
    asked, ablation = ablation is not None, preset_ablation if ablation is None else ablation
    if epochs is not None:
        train_settings["epochs"] = epochs
    if {k for k, v in train_settings.items() if v is not None} & {"epochs", "max_steps", "time_budget"}:
        # the caller's length replaces the preset's
        budget.pop("time_budget", None)
    train_settings["model_overrides"] = {**budget.pop("model_overrides", {}), **train_settings.get("model_overrides", {})}
    budget.update(train_settings)
    _check_models(models, train_settings["model_overrides"], ablation, asked)
    out = Path(out)
    refuse_non_folder(out, "--out")  # before the data loads
    base = TrainConfig(model=models[0], out=str(out), **budget)
    data = load_data(base)
    specs = run_specs(models, ablation)
    results = [_run_spec(spec, base, data, n_seeds, out, log) for spec in specs]
    return write_report(results, base, n_seeds, preset, out, data)


def _run_spec(spec: RunSpec, base: TrainConfig, data: tuple[ImageDataset, ImageDataset], n_seeds: int,
              out: Path, log: Callable[[str], None]) -> SpecResult:
    runs: list[TrainResult] = []
    for seed in range(n_seeds):
        run_dir = out / "runs" / _slug(spec.label) / f"seed{seed}"
        overrides = settings_for(model_config(spec.model), {**base.model_overrides, **spec.overrides})
        cfg = dataclasses.replace(base, model=spec.model, model_overrides=overrides, seed=seed,
                                  out=str(run_dir), **resume_or_restart(run_dir))
        log(f"== {spec.label}, seed {seed} ==")
        with driver_run(run_dir):
            runs.append(train(cfg, log=lambda line: log(f"  {line}"), data=data))
    first = runs[0]
    model = first.model
    c = model.cfg
    probe = normalize(subset(data[1], 256, 0).images, data[0].mean, data[0].std)
    device = next(model.parameters()).device
    return SpecResult(
        spec=spec,
        accuracies=[r.final_eval.accuracy for r in runs],
        params=first.params,
        flops=flops_per_image(model, (c.in_channels, c.image_size, c.image_size)),
        images_per_s=statistics.fmean(r.train_images_per_s for r in runs),
        steps=statistics.fmean(r.steps for r in runs),
        routing=[vars(b) for b in first.final_eval.routing],
        similarity=block_similarity(model, probe.to(device)).tolist(),
        curve=_curve(first.out_dir / "metrics.jsonl", log),
    )


def curve_records(path: Path, log: Callable[[str], None]) -> list[dict]:
    """A run's metrics records for its curve in a figure; none, with a note, where the file is gone
    (the run's results, from its checkpoint, still stand)."""
    if not path.exists():
        log(f"  {path} is missing: this run's curve is left out of the figures")
        return []
    return read_metrics(path)


def _curve(path: Path, log: Callable[[str], None]) -> dict[str, list]:
    records = curve_records(path, log)
    train_r = [r for r in records if r.get("split") == "train"]
    test_r = [r for r in records if r.get("split") == "test"]
    return dict(train_step=[r["step"] for r in train_r], train_loss=[r["loss"] for r in train_r],
                test_step=[r["step"] for r in test_r], test_acc=[r["accuracy"] for r in test_r])


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label).strip("_")


# --- report -------------------------------------------------------------------
def write_report(results: list[SpecResult], base: TrainConfig, n_seeds: int, preset: str, out: Path,
                 data: tuple[ImageDataset, ImageDataset]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in results if not r.spec.overrides]
    ablation = [r for r in results if r.spec.overrides]
    figures = _figures(results, out)
    lines = [
        f"# WideNet comparison on {base.data}",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `widenet compare` (preset `{preset}`) "
        f"on {describe_device(resolve_device(base.device))}.",
        f"Budget per run: {_budget(base, len(data[0]))} over {len(data[0])} training images, "
        f"batch {base.batch_size}, "
        f"{base.optimizer} lr {base.lr}, weight decay {base.weight_decay}, {base.schedule} schedule, "
        f"label smoothing {base.label_smoothing}, mixup {base.mixup}, crop `{base.crop}`, "
        f"balance-loss weight {base.aux_weight}. Test set: {len(data[1])} images. Seeds: {n_seeds}. "
        f"Same budget and recipe for every model{settings_note(base.model_overrides)}.",
        "",
        "## Results",
        "",
        _table(main, steps=base.time_budget is not None),
        "",
        _verdict(main, n_seeds),
        "",
    ]
    if ablation:
        lines += ["## LayerNorm ablation (WideNet with shared vs individual norms)", "",
                  _table([r for r in main if r.spec.model == ablation[0].spec.model] + ablation,
                         steps=base.time_budget is not None), "",
                  _ablation_verdict(main, ablation[0]), ""]
    lines += ["## Routing: expert load per block (seed 0, test set)", "", _routing_table(results), ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(report)
    return report


def _budget(cfg: TrainConfig, num_images: int) -> str:
    if cfg.time_budget is not None:
        return (f"{counted(float(cfg.time_budget), 'minute')} of wall-clock time, evaluations included "
                "(steps in the tables)")
    per_epoch = math.ceil(num_images / cfg.batch_size)
    steps = cfg.max_steps or cfg.epochs * per_epoch
    return f"{counted(steps, 'step')} ({steps / per_epoch:.2f} epochs)"


def _table(rows: list[SpecResult], steps: bool = False) -> str:
    """The results table; `steps` adds each model's training steps (under a time budget they differ)."""
    head = ("| model | params | FLOPs / image | train images/s | test accuracy (%) |" + (" steps |" if steps else "")
            + "\n|---|---:|---:|---:|---:|" + ("---:|" if steps else ""))
    body = [f"| {r.spec.label} | {r.params / 1e6:.3f}M | {r.flops / 1e6:.1f}M | {r.images_per_s:.0f} | "
            f"{mean_spread(r.accuracies)} |" + (f" {r.steps:.0f} |" if steps else "")
            for r in rows]
    return "\n".join([head, *body])


def mean_spread(values: list[float], digits: int = 2) -> str:
    """Fractions as percentages "mean ± sample std" over seeds; one seed's value alone (it has no spread)."""
    mean = f"{100 * statistics.fmean(values):.{digits}f}"
    return f"{mean} ± {100 * statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


# Two mean accuracies closer than this many points (half the report's last shown digit, 0.01) are a
# tie: a float difference below it (0.86 from 4312/5000, 4288/5000 against 4300/5000 twice) is
# rounding, and the report would show "0.00 points ahead".
TIE_POINTS = 0.005


def _same_points(a: float, b: float) -> bool:
    """Whether accuracies `a` and `b` (fractions) differ by less than TIE_POINTS percentage points."""
    return abs(100 * (a - b)) < TIE_POINTS


def _verdict(rows: list[SpecResult], n_seeds: int) -> str:
    if not rows:
        return ""
    ranked = sorted(rows, key=lambda r: r.acc_mean, reverse=True)
    best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    tied = [r.spec.label for r in rows if _same_points(best.acc_mean, r.acc_mean)]
    if len(tied) > 1:  # no winner to name: the order among equals is the table's
        return f"**No winner:** {', '.join(tied)} tie at {100 * best.acc_mean:.2f}% test accuracy."
    if second is None:
        return f"One model in the comparison: {best.spec.label}, {100 * best.acc_mean:.2f}% test accuracy."
    gap = 100 * (best.acc_mean - second.acc_mean)
    noise = 100 * max(best.acc_std, second.acc_std)
    text = (f"**Winner: {best.spec.label}** with {100 * best.acc_mean:.2f}% test accuracy, {gap:.2f} points ahead "
            f"of {second.spec.label}")
    if n_seeds < 2:
        text += " (one seed: the gap's noise is unknown)"
    elif gap <= noise:
        text += f" — within the seed-to-seed spread ({noise:.2f}), so not a clear win"
    return text + "."


def _ablation_verdict(main: list[SpecResult], shared: SpecResult) -> str:
    own = next((r for r in main if r.spec.model == shared.spec.model), None)
    if own is None:
        return ""
    diff = 100 * (own.acc_mean - shared.acc_mean)
    if _same_points(own.acc_mean, shared.acc_mean):
        outcome = "no difference at this budget"
    else:
        outcome = f"{'individual' if diff > 0 else 'shared'} norms did better at this budget"
    noise = 100 * max(own.acc_std, shared.acc_std)
    if outcome[0] != "n" and len(shared.accuracies) < 2:
        outcome += " (one seed: the gap's noise is unknown)"
    elif outcome[0] != "n" and abs(diff) <= noise:
        outcome += f", within the seed-to-seed spread ({noise:.2f})"
    return f"Individual LayerNorms vs shared: {diff:+.2f} points; {outcome} (paper: individual norms help)."


def _routing_table(results: list[SpecResult]) -> str:
    rows = ["| model | block | expert load | tokens dropped | assignments dropped |", "|---|---:|---|---:|---:|"]
    for r in results:
        for b in r.routing:
            load = " / ".join(f"{f:.2f}" for f in b["expert_fraction"])
            assignments = b.get("dropped_assignment_fraction")
            rows.append(f"| {r.spec.label} | {b['block']} | {load} | {b['dropped_fraction']:.3f} | "
                        + ("-" if assignments is None else f"{assignments:.3f}") + " |")
    return "\n".join(rows) if len(rows) > 2 else "(no MoE model in the comparison)"


def _figures(results: list[SpecResult], out: Path) -> list[str]:
    names = []
    rows = [dict(label=r.spec.label, params=r.params, acc_mean=r.acc_mean, acc_std=r.acc_std) for r in results]
    names.append(plots.accuracy_vs_params(rows, out / "accuracy_vs_params.png").name)
    names.append(plots.training_curves({r.spec.label: r.curve for r in results}, out / "training_curves.png").name)
    for r in results:
        if r.routing:
            path = out / f"expert_load_{_slug(r.spec.label)}.png"
            load = [b["expert_fraction"] for b in r.routing]
            blocks = [b["block"] for b in r.routing]
            names.append(plots.expert_load(load, blocks, f"{r.spec.label}: expert load per block", path).name)
    sims = {r.spec.label: r.similarity for r in results}
    names.append(plots.similarity_heatmaps(sims, out / "block_similarity.png").name)
    for stale in set(out.glob("expert_load_*.png")) - {out / name for name in names}:
        if (out / "runs" / stale.stem.removeprefix("expert_load_")).is_dir():  # of a model an earlier call ran
            stale.unlink(missing_ok=True)
    return names
