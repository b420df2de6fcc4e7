"""`widenet compare-text` end to end on a tiny budget and small files the test writes."""

from __future__ import annotations

import random

from test_text_train import PHRASES, TINY_TEXT, _write_classify

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
    args = ["compare-text", "--models", "bert_text_tiny,widenet_text_tiny", "--max-steps", "4",
            "--corpus", str(tmp_path / "corpus.txt"), "--task-train", str(tmp_path / "train.tsv"),
            "--task-validation", str(tmp_path / "dev.tsv"), "--out", str(out)]
    args += [f"--set={k}={v}" for k, v in TINY_TEXT.items()]
    assert main(args) == 0
    report = (out / "report_text.md").read_text()
    assert "| bert_text_tiny |" in report and "| widenet_text_tiny |" in report
    assert "MLM acc" in report and "downstream acc" in report
    assert "widenet_text_tiny block 1:" in report  # expert load of every WideNet block
    assert "bert_text_tiny block" not in report  # dense model: no routing
    for png in ("text_accuracy_vs_params.png", "text_mlm_loss.png"):
        assert (out / "figures" / png).stat().st_size > 1000
    metrics = out / "runs" / "widenet_text_tiny" / "seed0" / "finetune" / "metrics.jsonl"
    before = read_metrics(metrics)
    assert main(args) == 0  # the same command again: finished runs are reused, nothing retrains
    assert read_metrics(metrics) == before
    capsys.readouterr()


def test_compare_text_needs_both_task_files(tmp_path, capsys):
    assert main(["compare-text", "--task-train", str(tmp_path / "t.tsv"), "--corpus", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "give both --task-train and --task-validation" in capsys.readouterr().err
