"""`widenet compare-text`: the text counterpart of the vision comparison.

Every model (BERT-style: nothing shared; ALBERT-style: everything shared;
WideNet: shared attention + shared MoE, own LayerNorms) is pretrained with
masked LM + sentence-order prediction on the same corpus, tokenizer, budget
and seeds, then fine-tuned on the same downstream classification task. The
report (OUT/report_text.md) gives parameters, pretraining tokens/s, held-out
MLM and SOP accuracy and the downstream accuracy (mean +- std over seeds),
the expert load per block, and two figures. Beside each model's MLM accuracy
stands the no-context level (predicting every masked piece from word-piece
frequencies alone), and beside its downstream accuracy the same model
fine-tuned from random weights, so the report says whether pretraining
taught context and whether it transferred.

Offline default data: Debian's GCIDE dictionary as the corpus, and a task
derived from it (data/text/gcide_tasks.py): a headword's part of speech
from an example of its use, with the headword hidden ("usage", a syntactic
task); with gcide_task="field" the subject field of a definition, with "pos"
the part of speech from the definition.
Runs live in OUT/runs/<model>/seed<k>/{pretrain,finetune}; rerunning the
same command resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.text.documents import Documents, corpus_files
from ..data.text.gcide import GCIDE_PATH
from ..data.text.gcide_tasks import write_gcide_task
from ..data.text.tokenizer import save_tokenizer, train_tokenizer
from ..files import refuse_non_folder
from ..listing import counted
from ..models.registry import model_config, require_preset_kind, settings_for, settings_for_each
from ..runtime import describe_device, resolve_device
from ..train.evaluate import dropped_text
from ..train.finetune import finetune
from ..train.checkpoint_layout import SettingsChanged
from ..train.exported import TOKENIZER_FILE
from ..train.run_folder import driver_run, resume_or_restart
from ..train.pretrain import pretrain
from ..train.text_config import FinetuneConfig, PretrainConfig
from . import plots
from .compare import check_count, check_distinct, check_seeds, curve_records, mean_spread, settings_note

# Budgets. "quick" fits beside the vision comparison in the README's main job; it is far too short
# to leave masked LM's no-context plateau, which its report says, but long enough for sentence order
# to leave chance (docs/experiments.md). "full" is the recipe of docs/text.md (batch 16 x 128, lr 1e-3,
# 80 warmup steps, linear decay, WideNet top-1) for 6000 steps, past the point where all three models
# leave the plateau in its 30-minute runs, and the fine-tuning recipe of its transfer measurement
# (3 epochs of batch 32 at lr 1e-3, 64 tokens); 65 minutes on 2 cores. Both route WideNet's
# tokens to one expert: its blocks then do the FLOPs of the dense models' (top-2 costs 1.5x and left it
# behind at equal minutes). warmup_steps None: pretraining's default (10% of the steps).
TEXT_PRESETS: dict[str, dict] = {
    "quick": dict(seeds=2, seq_len=64, pretrain_steps=400, warmup_steps=None, batch_size=16, lr=1e-3,
                  finetune_epochs=2, finetune_batch_size=16, finetune_max_len=64, finetune_lr=1e-3,
                  task_train=1500, task_validation=600, max_documents=3000, scratch=True,
                  model_overrides=dict(top_k=1)),
    "full": dict(seeds=2, seq_len=128, pretrain_steps=6000, warmup_steps=80, batch_size=16, lr=1e-3,
                 finetune_epochs=3, finetune_batch_size=32, finetune_max_len=64, finetune_lr=1e-3,
                 task_train=3000, task_validation=900, max_documents=None, scratch=True,
                 model_overrides=dict(top_k=1)),
}
VOCAB_SIZE = 8000
# Downstream accuracies closer than this are no effect and no win, whatever the seeds' spread: two
# seeds can agree by chance (a spread of 0), while on the GCIDE task fine-tuning seeds alone move a
# model's accuracy by 0.5-1.6 points (standard deviation, docs/text.md).
DOWNSTREAM_FLOOR = 0.02
MADE_WITH_FILE = "made-with.json"  # the settings a shared file of OUT (task files, tokenizer) was made with


@dataclass
class TextSeedResult:
    params: int
    tokens_per_s: float
    mlm_accuracy: float
    unigram_accuracy: float  # held-out MLM from word-piece frequencies alone
    sop_accuracy: float
    task_accuracy: float
    scratch_accuracy: float | None  # the same model fine-tuned from random weights
    routing: list[dict]
    curve: dict[str, list]


@dataclass
class TextModelResult:
    model: str
    seeds: list[TextSeedResult]

    def mean(self, name: str) -> float:
        return statistics.fmean(getattr(s, name) for s in self.seeds)

    def std(self, name: str) -> float:
        values = [getattr(s, name) for s in self.seeds]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def compare_text(models: list[str], out: str | Path, preset: str = "quick", seeds: int | None = None,
                 corpus: list[str] | None = None, task_train: str | None = None,
                 task_validation: str | None = None, pretrain_steps: int | None = None,
                 device: str = "auto", model_overrides: dict | None = None, gcide_task: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Pretrain + fine-tune every (model, seed) (and fine-tune it from random weights too, when the
    preset says scratch), then write OUT/report_text.md and its figures. Without task files the task
    is GCIDE's `gcide_task` (data.text.gcide_tasks.TASK_KINDS; default "usage"). The model names and
    settings and the task files are checked before anything trains."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(TEXT_PRESETS)}")
    check_distinct(models)
    if (task_train is None) != (task_validation is None):
        raise ValueError("give both --task-train and --task-validation, or neither (the GCIDE task)")
    if task_train is not None and gcide_task is not None:
        raise ValueError("give --gcide-task or --task-train/--task-validation, not both")
    check_seeds(seeds)
    check_count("pretrain_steps", pretrain_steps)
    budget = dict(TEXT_PRESETS[preset])
    budget.update((k, v) for k, v in (("seeds", seeds), ("pretrain_steps", pretrain_steps)) if v is not None)
    if budget["warmup_steps"] is not None:  # a shortened run warms up over at most a tenth of its steps
        budget["warmup_steps"] = min(budget["warmup_steps"], max(1, budget["pretrain_steps"] // 10))
    budget["model_overrides"] = {**budget.get("model_overrides", {}), **(model_overrides or {})}
    _check_models(models, budget, model_overrides or {})
    runs_on = resolve_device(device)  # these before the tokenizer trains (a minute on GCIDE)
    if corpus:
        corpus_files(corpus)
    out = Path(out)
    refuse_non_folder(out, "--out")
    corpus = corpus or [str(_gcide())]
    if task_train is None:
        task_train, task_validation = map(str, _gcide_task(out, budget, gcide_task or "usage"))
    _check_task_files(task_train, task_validation)
    tokenizer = _shared_tokenizer(out, corpus, budget, log)
    results = [TextModelResult(m, [_run_seed(m, seed, out, corpus, tokenizer, task_train, task_validation,
                                             budget, device, log) for seed in range(budget["seeds"])])
               for m in models]
    return write_text_report(results, budget, preset, corpus, task_train, out, runs_on)


def _check_models(models: list[str], budget: dict, given: dict) -> None:
    """Raise ValueError unless every name is a text preset that takes the budget's model settings and
    sequence length, and the MoE settings `given` by the caller reach a model (the preset's own
    top_k=1 is for the MoE models when there are any)."""
    from ..models.registry import apply_overrides, get_entry
    from ..train.text_common import check_fits_positions

    if fixed := [key for key in ("task", "vocab_size", "num_labels") if key in given]:
        raise ValueError(f"compare-text sets {', '.join(fixed)} itself (it pretrains, then fine-tunes on the task "
                         f"with its shared tokenizer of {VOCAB_SIZE} pieces): leave "
                         + " and ".join(f"--set {key}" for key in fixed) + " out")
    for name in models:
        require_preset_kind(name, "text", "widenet compare-text", "widenet compare compares image models")
        cfg = get_entry(name).make_config()
        settings = settings_for(cfg, budget["model_overrides"])
        check_fits_positions(name, apply_overrides(cfg, settings).max_positions, budget["seq_len"])
    settings_for_each(models, given)


def _check_task_files(task_train: str, task_validation: str) -> None:
    """Read both task files and raise TaskDataError as fine-tuning would (malformed rows, no examples,
    fewer than two labels, validation labels or columns unlike training's)."""
    from ..data.text.classification import read_classification_task
    from ..data.text.hub import resolve_task_file

    read_classification_task(resolve_task_file(task_train, "classify"), resolve_task_file(task_validation, "classify"))


def _gcide() -> Path:
    if not GCIDE_PATH.exists():
        raise ValueError(f"no corpus given and the GCIDE dictionary is not installed ({GCIDE_PATH}); "
                         "install it (apt-get install dict-gcide) or pass --corpus and --task-train/--task-validation")
    return GCIDE_PATH


def _gcide_task(out: Path, budget: dict, kind: str) -> tuple[Path, Path]:
    folder = out / f"gcide-{kind}"
    train, validation = folder / "train.tsv", folder / "validation.tsv"
    made_with = dict(kind=kind, train=budget["task_train"], validation=budget["task_validation"],
                     dictionary=str(GCIDE_PATH))
    if train.exists() and validation.exists():
        _check_made_alike(folder / MADE_WITH_FILE, made_with, folder)
        return train, validation
    train, validation = write_gcide_task(_gcide(), folder, kind, budget["task_train"], budget["task_validation"],
                                         overwrite=True)  # our own folder; a half-written pair is redone
    (folder / MADE_WITH_FILE).write_text(json.dumps(made_with) + "\n")
    return train, validation


def _shared_tokenizer(out: Path, corpus: list[str], budget: dict, log: Callable[[str], None]) -> Path:
    """One WordPiece tokenizer for every model, trained once on (a prefix of) the corpus."""
    path = out / TOKENIZER_FILE
    made_with = dict(corpus=[str(Path(c).resolve()) for c in corpus], max_documents=budget["max_documents"],
                     vocab_size=VOCAB_SIZE)
    record = out / f"tokenizer.{MADE_WITH_FILE}"
    if path.exists():
        _check_made_alike(record, made_with, path)
        return path
    log(f"training a shared WordPiece tokenizer ({VOCAB_SIZE} pieces)")
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(train_tokenizer(Documents(corpus, budget["max_documents"]), vocab_size=VOCAB_SIZE),
                   path)
    record.write_text(json.dumps(made_with) + "\n")
    return path


def _check_made_alike(record: Path, settings: dict, made: Path) -> None:
    """SettingsChanged when `made` (already there) was made with other settings than `settings`, as its
    record says (the runs of OUT were made with it); nothing when they agree or when a widenet that
    kept no record made it."""
    try:
        before = json.loads(record.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        before = {}
    changes = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    if changes:
        raise SettingsChanged(f"{made} was made by an earlier call with other settings ({'; '.join(changes)}); "
                              "repeat that call to continue it, or give this one another --out", "; ".join(changes))


def _run_seed(model: str, seed: int, out: Path, corpus: list[str], tokenizer: Path, task_train: str,
              task_validation: str, budget: dict, device: str, log: Callable[[str], None]) -> TextSeedResult:
    run = out / "runs" / model / f"seed{seed}"
    with driver_run(run):
        return _train_seed(model, seed, run, corpus, tokenizer, task_train, task_validation, budget, device, log)


def _train_seed(model: str, seed: int, run: Path, corpus: list[str], tokenizer: Path, task_train: str,
                task_validation: str, budget: dict, device: str, log: Callable[[str], None]) -> TextSeedResult:
    indent = lambda line: log(f"  {line}")  # noqa: E731
    log(f"== {model}, seed {seed}: pretraining ==")
    pre = pretrain(PretrainConfig(
        model=model, corpus=corpus, tokenizer=str(tokenizer), seq_len=budget["seq_len"],
        max_steps=budget["pretrain_steps"], batch_size=budget["batch_size"], lr=budget["lr"],
        warmup_steps=budget["warmup_steps"], max_documents=budget["max_documents"],
        model_overrides=settings_for(model_config(model), budget["model_overrides"]), seed=seed,
        log_every=10, device=device,
        out=str(run / "pretrain"), **resume_or_restart(run / "pretrain")), log=indent)
    fine = {}
    for name in ("finetune", "scratch") if budget["scratch"] else ("finetune",):
        log(f"== {model}, seed {seed}: fine-tuning" + (" from random weights ==" if name == "scratch" else " =="))
        fine[name] = finetune(FinetuneConfig(
            task="classify", init=str(run / "pretrain"), scratch=name == "scratch", train=task_train,
            validation=task_validation, tokenizer=str(tokenizer), max_len=budget["finetune_max_len"],
            epochs=budget["finetune_epochs"], batch_size=budget["finetune_batch_size"], lr=budget["finetune_lr"],
            seed=seed,
            log_every=10, device=device, out=str(run / name), **resume_or_restart(run / name)), log=indent)
    e = pre.run.final_eval
    scratch = fine["scratch"].run.final_eval["accuracy"] if "scratch" in fine else None
    return TextSeedResult(pre.params, pre.run.tokens_per_s, e["mlm_accuracy"], e["unigram_accuracy"],
                          e["sop_accuracy"], fine["finetune"].run.final_eval["accuracy"], scratch, e["routing"],
                          _mlm_curve(run / "pretrain", log))


def _mlm_curve(run: Path, log: Callable[[str], None]) -> dict[str, list]:
    train = [r for r in curve_records(run / "metrics.jsonl", log) if r.get("split") == "train"]
    return dict(train_step=[r["step"] for r in train], train_loss=[r["mlm_loss"] for r in train],
                test_step=[], test_acc=[])


# --- report ----------------------------------------------------------------------------
def write_text_report(results: list[TextModelResult], budget: dict, preset: str, corpus: list[str],
                      task_train: str, out: Path, device: torch.device) -> Path:
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(label=r.model, params=r.seeds[0].params, acc_mean=r.mean("task_accuracy"),
                 acc_std=r.std("task_accuracy")) for r in results]
    figures = [plots.accuracy_vs_params(rows, fig_dir / "text_accuracy_vs_params.png"),
               plots.training_curves({r.model: r.seeds[0].curve for r in results}, fig_dir / "text_mlm_loss.png")]
    lines = [
        "# WideNet text comparison",
        "",
        f"{_dt.datetime.now():%Y-%m-%d %H:%M}, {describe_device(device)}, preset `{preset}`: pretraining "
        f"{counted(budget['pretrain_steps'], 'step')} x {budget['batch_size']} sequences of {budget['seq_len']} tokens "
        f"on {', '.join(corpus)}; fine-tuning {counted(budget['finetune_epochs'], 'epoch')} on {task_train}; "
        f"{counted(budget['seeds'], 'seed')}. Same tokenizer, budget and recipe for every model"
        f"{settings_note(budget['model_overrides'])}. "
        f"{'Mean ± standard deviation over seeds' if budget['seeds'] > 1 else 'One seed: no spread to show'}. "
        "*No-context level*: held-out MLM accuracy from word-piece "
        "frequencies alone; SOP's chance level is 50%.",
        "",
        "| model | params | pretrain tokens/s | MLM acc (%) | no-context level (%) | SOP acc (%) | "
        "downstream acc (%) | from random weights (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[_row(r) for r in results],
        "",
        *[paragraph + "\n" for paragraph in _text_verdict(results)],
        "## Expert load per block (held-out pretraining data, first seed)",
        "",
        *_routing_lines(results),
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figures],
        "",
    ]
    report = out / "report_text.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _pm(r: TextModelResult, name: str) -> str:
    return mean_spread([getattr(s, name) for s in r.seeds], digits=1)


def _row(r: TextModelResult) -> str:
    scratch = _pm(r, "scratch_accuracy") if r.seeds[0].scratch_accuracy is not None else "-"
    return (f"| {r.model} | {r.seeds[0].params / 1e6:.2f}M | {r.mean('tokens_per_s'):.0f} | "
            f"{_pm(r, 'mlm_accuracy')} | {_pm(r, 'unigram_accuracy')} | {_pm(r, 'sop_accuracy')} | "
            f"{_pm(r, 'task_accuracy')} | {scratch} |")


def _text_verdict(results: list[TextModelResult]) -> list[str]:
    """Paragraphs: what masked LM learned (context or only frequencies), the downstream ranking, and
    what pretraining transferred."""
    return [p for p in (_context_note(results), _sop_note(results), _downstream_verdict(results),
                        _transfer_note(results)) if p]


def _context_note(results: list[TextModelResult]) -> str:
    """Whether held-out MLM rose above its no-context level by more than the seeds' spread, per model."""
    return _above_reference(
        "Masked LM against its no-context level", results,
        [_gap(r, "mlm_accuracy", "unigram_accuracy") for r in results], floor=0.01,
        none=("No model is clearly above it: at this budget masked LM has learned word-piece frequencies, not "
              "context, so it does not rank the models; the 30-minute recipe of docs/text.md (or --preset full) "
              "is where context shows."),
        every="Every model has learned context beyond word-piece frequencies.")


def _sop_note(results: list[TextModelResult]) -> str:
    """Whether sentence-order accuracy rose above chance (50%) by more than twice the seeds' spread."""
    return _above_reference(
        "Sentence order against chance (50%)", results,
        [(r.mean("sop_accuracy") - 0.5, r.std("sop_accuracy")) for r in results], floor=0.02,
        none="No model is clearly above chance.", every="Every model is clearly above chance.")


def _above_reference(head: str, results: list[TextModelResult], gaps: list[tuple[float, float]], floor: float,
                     none: str, every: str) -> str:
    """One verdict paragraph: each model's gain over a reference level with the seeds' spread (`gaps`,
    fractions), then which models clear it by more than twice their spread and by more than `floor`."""
    one_seed = all(len(r.seeds) == 1 for r in results)  # its spread of 0 says nothing
    parts = [f"{r.model} {100 * gain:+.1f} points" + ("" if one_seed else f" (spread {100 * spread:.1f})")
             for r, (gain, spread) in zip(results, gaps)]
    above = [r.model for r, (gain, spread) in zip(results, gaps) if gain > max(floor, 2 * spread)]
    text = f"{head}: " + "; ".join(parts) + ". "
    if one_seed and above:  # a gain within the floor is no gain whatever the spread; one above it cannot be judged
        return text + (f"With one seed per model there is no spread to judge the gains above {100 * floor:g} points "
                       "by (--seeds 2 or more).")
    if not above:
        return text + none
    if len(above) < len(results):
        return text + f"Clearly above it (more than twice the spread): {', '.join(above)}; the others are not."
    return text + every


def _gap(r: TextModelResult, name: str, baseline: str) -> tuple[float, float]:
    """Mean over seeds of name - baseline, and the standard deviation of that difference."""
    diffs = [getattr(s, name) - getattr(s, baseline) for s in r.seeds]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def _transfer_note(results: list[TextModelResult]) -> str:
    """Pretrained minus from-random-weights downstream accuracy, per model, with the seeds' spread."""
    measured = [r for r in results if r.seeds[0].scratch_accuracy is not None]
    if not measured:
        return ""
    parts = []
    for r in measured:
        gain, spread = _gap(r, "task_accuracy", "scratch_accuracy")
        beyond = max(DOWNSTREAM_FLOOR, 2 * spread)
        verdict = ("one seed, no spread to judge by" if len(r.seeds) == 1 else "helped" if gain > beyond
                   else "hurt" if gain < -beyond else "no clear effect")
        spread_shown = f"spread {100 * spread:.1f}, " if len(r.seeds) > 1 else ""  # one seed has none
        parts.append(f"{r.model} {100 * gain:+.1f} points ({spread_shown}{verdict})")
    return "Pretraining against fine-tuning from random weights, downstream: " + "; ".join(parts) + "."


def _downstream_verdict(results: list[TextModelResult]) -> str:
    best = max(results, key=lambda r: r.mean("task_accuracy"))
    others = [r for r in results if r is not best]
    if not others:
        return f"Only {best.model} was run."
    second = max(others, key=lambda r: r.mean("task_accuracy"))
    gap = best.mean("task_accuracy") - second.mean("task_accuracy")
    spread = max(best.std("task_accuracy"), second.std("task_accuracy"))
    n = len(best.seeds)
    if n == 1 or gap <= max(DOWNSTREAM_FLOOR, 2 * spread):
        why = ("one seed cannot separate it from noise" if n == 1 else "within twice the seed spread"
               if gap <= 2 * spread else f"under {100 * DOWNSTREAM_FLOOR:g} points, which fine-tuning seeds alone can move")
        return (f"Downstream, {best.model} scored highest ({100 * best.mean('task_accuracy'):.1f}%), "
                f"{100 * gap:.1f} points above {second.model}; {why}, so this run does not establish a winner.")
    return (f"Downstream, {best.model} won: {100 * gap:.1f} points above {second.model} "
            f"(more than twice the seed spread of {100 * spread:.1f}).")


def _routing_lines(results: list[TextModelResult]) -> list[str]:
    lines = []
    for r in results:
        for b in r.seeds[0].routing:
            load = " ".join(f"{f:.2f}" for f in b["expert_fraction"])
            lines.append(f"- {r.model} block {b['block']}: [{load}], dropped {dropped_text(b)}")
    return lines or ["(no MoE blocks)"]
