"""`widenet compare-text` end to end on a tiny budget and small files the test writes."""

from __future__ import annotations

import itertools
import random
import re
import statistics
from pathlib import Path

import pytest

from test_text_train import PHRASES, TINY_TEXT, _write_classify

from widenet.analysis.compare_text import (TextModelResult, TextSeedResult, _context_note, _downstream_verdict,
                                          _sop_note, _transfer_note)
from widenet.cli import main
from widenet.train.metrics import read_metrics


def _corpus(path) -> None:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(PHRASES).capitalize() for _ in range(rng.randint(3, 6))) for _ in range(80)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def test_compare_text_writes_the_report_and_reuses_finished_runs(tmp_path, capsys):
    _corpus(tmp_path / "corpus.txt")
    _write_classify(tmp_path / "train.tsv", 64, 0)
    _write_classify(tmp_path / "dev.tsv", 32, 1)
    out = tmp_path / "cmp"
    args = ["compare-text", "--models", "bert_text_tiny,widenet_text_tiny", "--max-steps", "4", "--seeds", "2",
            "--corpus", str(tmp_path / "corpus.txt"), "--task-train", str(tmp_path / "train.tsv"),
            "--task-validation", str(tmp_path / "dev.tsv"), "--out", str(out)]
    args += [f"--set={k}={v}" for k, v in TINY_TEXT.items()]
    assert main(args) == 0
    report = (out / "report_text.md").read_text()
    assert "| bert_text_tiny |" in report and "| widenet_text_tiny |" in report
    assert "MLM acc" in report and "downstream acc" in report
    assert "(model settings: embedding_size=" in report and "; MoE models: top_k=1)" in report  # the preset's top-1
    assert "| no-context level (%) |" in report and "| from random weights (%) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| widenet_text_tiny |"))
    assert len(row.strip("|").split("|")) == 8 and row.count("±") == 5  # every number over the 2 seeds
    assert "Masked LM against its no-context level: bert_text_tiny " in report
    assert "Pretraining against fine-tuning from random weights, downstream: bert_text_tiny " in report
    _assert_rows_are_the_runs_numbers(report, out, ["bert_text_tiny", "widenet_text_tiny"], seeds=2)
    assert "widenet_text_tiny block 1:" in report  # expert load of every WideNet block
    assert "bert_text_tiny block" not in report  # dense model: no routing
    for png in ("text_accuracy_vs_params.png", "text_mlm_loss.png"):
        assert (out / "figures" / png).stat().st_size > 1000
    metrics = out / "runs" / "widenet_text_tiny" / "seed0" / "finetune" / "metrics.jsonl"
    before = read_metrics(metrics)
    assert main(args) == 0  # the same command again: finished runs are reused, nothing retrains
    assert read_metrics(metrics) == before
    out.rename(tmp_path / "moved")  # the fine-tuning runs start from OUT/runs/.../pretrain: it moved with them
    assert main([str(tmp_path / "moved") if a == str(out) else a for a in args]) == 0, capsys.readouterr().err  # was "made by an earlier call"
    assert read_metrics(tmp_path / "moved" / metrics.relative_to(out)) == before
    capsys.readouterr()
    # every run's metrics.jsonl gone: reported again from the checkpoints, the curves left out (was FileNotFoundError)
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for gone in (tmp_path / "moved").glob("runs/*/seed*/*/metrics.jsonl"):
        gone.unlink()
    assert main([str(tmp_path / "moved") if a == str(out) else a for a in args]) == 0
    pretrain_metrics = tmp_path / "moved" / "runs" / "bert_text_tiny" / "seed0" / "pretrain" / "metrics.jsonl"
    assert f"  {pretrain_metrics} is missing: this run's curve is left out of the figures" in capsys.readouterr().out
    again = (tmp_path / "moved" / "report_text.md").read_text()
    assert [line for line in again.splitlines() if line.startswith("| ")] == table


def _last(path: Path, key: str) -> float:
    """The last value of `key` among the evaluation (non-train) records of a metrics.jsonl."""
    return [r[key] for r in read_metrics(path) if r.get("split") != "train" and key in r][-1]


def _assert_rows_are_the_runs_numbers(report: str, out: Path, models: list[str], seeds: int) -> None:
    """Every number of a model's row is the mean ± sample std over the seeds of what its runs wrote,
    read back here from each run's metrics.jsonl, in the column the header names."""
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for model in models:
        runs = [out / "runs" / model / f"seed{seed}" for seed in range(seeds)]
        pre = [r / "pretrain" / "metrics.jsonl" for r in runs]
        numbers = {
            "MLM acc": [_last(p, "mlm_accuracy") for p in pre],
            "no-context level": [_last(p, "unigram_accuracy") for p in pre],
            "SOP acc": [_last(p, "sop_accuracy") for p in pre],
            "downstream acc": [_last(r / "finetune" / "metrics.jsonl", "accuracy") for r in runs],
            "from random weights": [_last(r / "scratch" / "metrics.jsonl", "accuracy") for r in runs],
        }
        row = next(line for line in lines if line.startswith(f"| {model} |"))
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        for name, values in numbers.items():
            column = next(c for c in columns if c.startswith(name))
            want = f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
            assert cells[column] == want, (model, column, cells[column], want)


def test_compare_text_needs_both_task_files(tmp_path, capsys):
    assert main(["compare-text", "--task-train", str(tmp_path / "t.tsv"), "--corpus", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "give both --task-train and --task-validation" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    (dict(seeds=0), "seeds must be a whole number of at least 1, got 0"),  # was the preset's seeds
    (dict(seeds=-2), "seeds must be a whole number of at least 1, got -2"),
    (dict(seeds=10**9), "seeds must be at most 1000, got 1000000000: every seed trains every model once more"),
    (dict(pretrain_steps=0), "pretrain_steps must be a whole number of at least 1, got 0"),  # the preset's steps
])
def test_compare_text_refuses_counts_below_one_from_python(tmp_path, settings, message):
    from widenet.analysis.compare_text import compare_text

    with pytest.raises(ValueError, match=message):
        compare_text(["bert_text_tiny"], tmp_path / "o", corpus=[str(tmp_path / "none.txt")], log=lambda _: None,
                     **settings)
    assert not (tmp_path / "o").exists()


def _no_training(monkeypatch) -> None:
    """Any training (the shared tokenizer, pretraining) fails the test."""
    def boom(*_args, **_kw):
        raise AssertionError("training started")

    monkeypatch.setattr("widenet.analysis.compare_text._shared_tokenizer", boom)
    monkeypatch.setattr("widenet.analysis.compare_text.pretrain", boom)


def test_compare_text_refuses_gcide_task_beside_task_files(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    _write_classify(tmp_path / "t.tsv", 8, 0)
    assert main(["compare-text", "--models", "widenet_text_tiny", "--corpus", str(tmp_path / "t.tsv"),
                 "--task-train", str(tmp_path / "t.tsv"), "--task-validation", str(tmp_path / "t.tsv"),
                 "--gcide-task", "usage", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["widenet: error: give --gcide-task or --task-train/--task-validation, not both"]
    assert not (tmp_path / "o").exists()


def test_compare_text_without_task_files_uses_the_usage_task(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    asked = []

    def gcide_task(out, budget, kind):
        asked.append(kind)
        raise ValueError("stop here")

    monkeypatch.setattr("widenet.analysis.compare_text._gcide_task", gcide_task)
    _corpus(tmp_path / "corpus.txt")
    assert main(["compare-text", "--models", "widenet_text_tiny", "--corpus", str(tmp_path / "corpus.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert asked == ["usage"] and "stop here" in capsys.readouterr().err


def test_shared_files_made_with_other_settings_are_named_not_reused(tmp_path, monkeypatch):
    """An interrupted quick call left OUT/tokenizer.json and the GCIDE task files; a later call with other
    settings (the full preset) reused them and reported a recipe it had not run."""
    import widenet.analysis.compare_text as ct
    from widenet.train.checkpoint_layout import SettingsChanged

    corpus = tmp_path / "corpus.txt"
    _corpus(corpus)
    lines = []
    first = ct._shared_tokenizer(tmp_path / "o", [str(corpus)], dict(max_documents=5), lines.append)
    assert ct._shared_tokenizer(tmp_path / "o", [str(corpus)], dict(max_documents=5), lines.append) == first
    assert len(lines) == 1  # trained once, then reused
    with pytest.raises(SettingsChanged, match=r"tokenizer.json was made by an earlier call with other settings "
                                              r"\(max_documents: 5 -> None\); repeat that call"):
        ct._shared_tokenizer(tmp_path / "o", [str(corpus)], dict(max_documents=None), lines.append)

    made = []

    def write_task(_dictionary, folder, kind, train, validation, overwrite):
        made.append((kind, train, validation))
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train.tsv", "validation.tsv"):
            (folder / name).write_text("sentence\tlabel\n")
        return folder / "train.tsv", folder / "validation.tsv"

    monkeypatch.setattr(ct, "write_gcide_task", write_task)
    monkeypatch.setattr(ct, "_gcide", lambda: corpus)
    quick, full = dict(task_train=1500, task_validation=600), dict(task_train=3000, task_validation=900)
    ct._gcide_task(tmp_path / "o", quick, "usage")
    ct._gcide_task(tmp_path / "o", quick, "usage")
    assert made == [("usage", 1500, 600)]
    with pytest.raises(SettingsChanged, match=r"gcide-usage was made by an earlier call with other settings "
                                              r"\(train: 1500 -> 3000; validation: 600 -> 900\)"):
        ct._gcide_task(tmp_path / "o", full, "usage")


@pytest.mark.parametrize("models, train, message", [
    ("widenet_text_tiny,nosuch", None, "widenet: error: unknown model 'nosuch'; choose one of: "),
    ("widenet_tiny", None, "widenet: error: widenet_tiny is an image model; widenet compare-text takes text models "
                           "such as widenet_text_tiny (widenet compare compares image models)"),
    ("albert_text_tiny,albert_text_tiny", None, "widenet: error: albert_text_tiny named more than once in --models"),
    ("albert_text_tiny --top-k 2", None, "widenet: error: top_k: none of albert_text_tiny has MoE layers, so this "
                                         "would change nothing; add an MoE model (widenet_text_tiny)"),  # was ignored
    ("widenet_text_tiny", "sentence\tlabel\nthe fox\tgood\nthe bird\n", "train.tsv line 3: expected 2 fields"),
    ("widenet_text_tiny", "sentence\tlabel\nthe fox\tgood\n", "every example has the label 'good'"),
    # these were found after the shared tokenizer had trained:
    ("widenet_text_tiny --set task=qa", None, "compare-text sets task itself (it pretrains, then fine-tunes on the "
                                              "task with its shared tokenizer of 8000 pieces): leave --set task out"),
    ("widenet_text_tiny --set vocab_size=500", None, "compare-text sets vocab_size itself"),
    ("widenet_text_tiny --device cuda", None, "--device cuda was asked for, but no CUDA GPU is available"),
])
def test_compare_text_checks_models_and_task_files_before_training(tmp_path, capsys, monkeypatch, models, train,
                                                                     message):
    _no_training(monkeypatch)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # (--device cuda on a machine with a GPU)
    _corpus(tmp_path / "corpus.txt")
    if train is None:
        _write_classify(tmp_path / "train.tsv", 16, 0)
    else:
        (tmp_path / "train.tsv").write_text(train, encoding="utf-8")
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    assert main(["compare-text", "--models", *models.split(" "), "--corpus", str(tmp_path / "corpus.txt"),
                 "--task-train", str(tmp_path / "train.tsv"), "--task-validation", str(tmp_path / "dev.tsv"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_compare_text_checks_the_corpus_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    assert main(["compare-text", "--models", "bert_text_tiny", "--corpus", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'none.txt'}: corpus path not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_text_checks_the_sequence_length_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    _write_classify(tmp_path / "train.tsv", 16, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    assert main(["compare-text", "--models", "widenet_text_tiny", "--corpus", str(tmp_path / "train.tsv"),
                 "--task-train", str(tmp_path / "train.tsv"), "--task-validation", str(tmp_path / "dev.tsv"),
                 "--set", "max_positions=8", "--out", str(tmp_path / "o")]) == 2
    assert "exceeds widenet_text_tiny's 8 positions; use a shorter length or --set max_positions=" \
        in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_text_checks_validation_labels_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    _write_classify(tmp_path / "train.tsv", 16, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1, labels=("good", "meh"))
    _corpus(tmp_path / "corpus.txt")
    assert main(["compare-text", "--models", "widenet_text_tiny", "--corpus", str(tmp_path / "corpus.txt"),
                 "--task-train", str(tmp_path / "train.tsv"), "--task-validation", str(tmp_path / "dev.tsv"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "label 'meh' is not one of the training labels: 'bad', 'good'" in capsys.readouterr().err


def _model(name: str, mlm: list[float], unigram: float, task: list[float], scratch: list[float],
           sop: list[float] | None = None) -> TextModelResult:
    seeds = [TextSeedResult(params=1, tokens_per_s=1.0, mlm_accuracy=m, unigram_accuracy=unigram, sop_accuracy=o,
                            task_accuracy=t, scratch_accuracy=s, routing=[], curve={})
             for m, t, s, o in zip(mlm, task, scratch, sop or [0.5] * len(mlm))]
    return TextModelResult(name, seeds)


def test_context_and_transfer_notes_judge_by_the_seed_spread():
    flat = _model("flat", [0.061, 0.061], 0.061, [0.40, 0.42], [0.41, 0.40])
    learned = _model("learned", [0.30, 0.32], 0.06, [0.60, 0.62], [0.40, 0.41])
    note = _context_note([flat, learned])
    assert "flat +0.0 points" in note and "learned +25.0 points (spread 1.4)" in note
    assert note.endswith("Clearly above it (more than twice the spread): learned; the others are not.")
    assert "No model is clearly above it" in _context_note([flat])
    assert _context_note([learned]).endswith("Every model has learned context beyond word-piece frequencies.")
    transfer = _transfer_note([flat, learned])
    assert "flat +0.5 points (spread 2.1, no clear effect)" in transfer
    assert "learned +20.5 points (spread 0.7, helped)" in transfer
    chance = _model("chance", [0.06, 0.06], 0.06, [0.4, 0.4], [0.4, 0.4], sop=[0.52, 0.55])  # +3.5, spread 2.1
    ordered = _model("ordered", [0.06, 0.06], 0.06, [0.4, 0.4], [0.4, 0.4], sop=[0.64, 0.66])
    sop = _sop_note([chance, ordered])
    assert "chance +3.5 points (spread 2.1)" in sop and "ordered +15.0 points (spread 1.4)" in sop
    assert sop.endswith("Clearly above it (more than twice the spread): ordered; the others are not.")
    assert _sop_note([chance]).endswith("No model is clearly above chance.")
    assert _sop_note([ordered]).endswith("Every model is clearly above chance.")
    one = _model("one", [0.3], 0.06, [0.5], [0.3], sop=[0.524])
    assert "one seed, no spread to judge by" in _transfer_note([one])
    sop = _sop_note([one])  # +2.4 points of one seed: not "clearly above chance", and no "spread 0.0"
    assert sop == ("Sentence order against chance (50%): one +2.4 points. With one seed per model there is no "
                   "spread to judge the gains above 2 points by (--seeds 2 or more).")
    flat_one = _model("flat", [0.061], 0.061, [0.4], [0.4], sop=[0.51])  # within the floors: no gain, seeds or not
    assert _sop_note([flat_one]).endswith("+1.0 points. No model is clearly above chance.")
    assert "No model is clearly above it" in _context_note([flat_one])


def test_full_preset_passes_its_warmup_and_fine_tuning_recipe_to_the_runs(tmp_path, capsys):
    """--preset full: 80 warmup steps, cut to a tenth of a shortened run (here 2 of 20), and fine-tuning
    at batch 32 and 64 tokens; the saved run settings say what each run trained with."""
    import json

    _corpus(tmp_path / "corpus.txt")
    _write_classify(tmp_path / "train.tsv", 64, 0)
    _write_classify(tmp_path / "dev.tsv", 32, 1)
    out = tmp_path / "cmp"
    assert main(["compare-text", "--preset", "full", "--models", "albert_text_tiny", "--max-steps", "20",
                 "--seeds", "1", "--corpus", str(tmp_path / "corpus.txt"), "--task-train",
                 str(tmp_path / "train.tsv"), "--task-validation", str(tmp_path / "dev.tsv"), "--out", str(out),
                 *[f"--set={k}={v}" for k, v in dict(TINY_TEXT, max_positions=128).items()]]) == 0
    run = out / "runs" / "albert_text_tiny" / "seed0"

    def settings(name: str) -> dict:
        latest = (run / name / "checkpoints" / "latest").read_text().strip()
        return json.loads((run / name / "checkpoints" / latest / "meta.json").read_text())["train_config"]

    assert {k: settings("pretrain")[k] for k in ("max_steps", "warmup_steps", "seq_len", "batch_size")} == \
        dict(max_steps=20, warmup_steps=2, seq_len=128, batch_size=16)
    for name in ("finetune", "scratch"):
        assert {k: settings(name)[k] for k in ("max_len", "batch_size", "epochs")} == \
            dict(max_len=64, batch_size=32, epochs=3)
    report = (out / "report_text.md").read_text()
    assert "preset `full`: pretraining 20 steps x 16 sequences of 128 tokens" in report
    row = next(line for line in report.splitlines() if line.startswith("| albert_text_tiny |"))
    assert "±" not in report and "One seed: no spread to show." in report, row  # not a spread of 0.0
    note = next(line for line in report.splitlines() if line.startswith("Pretraining against fine-tuning"))
    assert re.fullmatch(r"Pretraining against fine-tuning from random weights, downstream: albert_text_tiny "
                        r"[+-]\d+\.\d points \(one seed, no spread to judge by\)\.", note), note  # no "spread 0.0"
    printed = capsys.readouterr()
    assert "for classify from random weights (the architecture of " in printed.out + printed.err


def test_downstream_verdict_ranks_by_task_accuracy_against_twice_the_spread():
    """Task accuracy (not masked LM, ordered the other way here) picks the winner; the margin is to the
    runner-up, and a winner needs more than twice the larger of the two seed spreads."""
    top = _model("top", [0.10, 0.10], 0.06, [0.80, 0.82], [0.4, 0.4])  # task 81, mlm 10
    mid = _model("mid", [0.20, 0.20], 0.06, [0.70, 0.72], [0.4, 0.4])  # task 71, mlm 20
    low = _model("low", [0.30, 0.30], 0.06, [0.50, 0.52], [0.4, 0.4])  # task 51, mlm 30
    # 81 - 71 = 10 points; spread 100 * stdev(0.80, 0.82) = 1.41, twice that 2.83 < 10: a winner.
    for order in itertools.permutations([top, mid, low]):
        assert _downstream_verdict(list(order)) == (
            "Downstream, top won: 10.0 points above mid (more than twice the seed spread of 1.4).")
    # 2 points above (81 against 79): more than the spread (1.41), within twice it (2.83): no winner.
    close = _model("close", [0.20, 0.20], 0.06, [0.78, 0.80], [0.4, 0.4])
    assert _downstream_verdict([close, top, low]) == (
        "Downstream, top scored highest (81.0%), 2.0 points above close; within twice the seed spread, so "
        "this run does not establish a winner.")
    # Exactly twice the spread (binary-exact: 75 against 25, spread stdev(0.5, 0.75, 1.0) = 25): no winner.
    edge = _model("edge", [0.1] * 3, 0.06, [0.5, 0.75, 1.0], [0.4] * 3)
    flat = _model("flat", [0.1] * 3, 0.06, [0.25] * 3, [0.4] * 3)
    assert _downstream_verdict([flat, edge]) == (
        "Downstream, edge scored highest (75.0%), 50.0 points above flat; within twice the seed spread, so "
        "this run does not establish a winner.")
    # Two seeds that agree (spread 0) do not make 1.5 points a win (the main job's report once said
    # "helped" of a +1.0 whose two seeds happened to gain alike).
    agree = _model("agree", [0.1] * 2, 0.06, [0.80, 0.80], [0.785, 0.785])
    behind = _model("behind", [0.1] * 2, 0.06, [0.785, 0.785], [0.785, 0.785])
    assert _downstream_verdict([behind, agree]) == (
        "Downstream, agree scored highest (80.0%), 1.5 points above behind; under 2 points, which fine-tuning "
        "seeds alone can move, so this run does not establish a winner.")
    assert _transfer_note([agree]).endswith("agree +1.5 points (spread 0.0, no clear effect).")
    assert _transfer_note([_model("m", [0.1] * 2, 0.06, [0.81, 0.81], [0.785, 0.785])]).endswith(
        "m +2.5 points (spread 0.0, helped).")
    one_a, one_b = _model("a", [0.1], 0.06, [0.9], [0.4]), _model("b", [0.1], 0.06, [0.5], [0.4])
    assert _downstream_verdict([one_b, one_a]) == (
        "Downstream, a scored highest (90.0%), 40.0 points above b; one seed cannot separate it from noise, so "
        "this run does not establish a winner.")
    assert _downstream_verdict([one_a]) == "Only a was run."


def test_transfer_note_calls_a_gain_an_effect_only_beyond_twice_the_spread():
    """Per seed pretrained minus scratch: -2.5, -1.5, -0.5 points (mean -1.5, spread 1.0) is within
    twice the spread, so neither "hurt" nor "helped"; 1 point further (-2.5) is beyond it."""
    def gains(name, points):
        return _model(name, [0.1] * 3, 0.06, [0.5 + p / 100 for p in points], [0.5] * 3)

    assert _transfer_note([gains("m", [-2.5, -1.5, -0.5])]).endswith("m -1.5 points (spread 1.0, no clear effect).")
    assert _transfer_note([gains("m", [-3.5, -2.5, -1.5])]).endswith("m -2.5 points (spread 1.0, hurt).")
    assert _transfer_note([gains("m", [0.5, 1.5, 2.5])]).endswith("m +1.5 points (spread 1.0, no clear effect).")
    assert _transfer_note([gains("m", [1.5, 2.5, 3.5])]).endswith("m +2.5 points (spread 1.0, helped).")
    # Exactly twice the spread (binary-exact: diffs -75, -50, -25 points, spread 25) is no effect either way.
    edge_down = _model("m", [0.1] * 3, 0.06, [0.25, 0.5, 0.75], [1.0] * 3)
    edge_up = _model("m", [0.1] * 3, 0.06, [0.25, 0.5, 0.75], [0.0] * 3)
    assert _transfer_note([edge_down]).endswith("m -50.0 points (spread 25.0, no clear effect).")
    assert _transfer_note([edge_up]).endswith("m +50.0 points (spread 25.0, no clear effect).")
