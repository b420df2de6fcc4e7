"""Run folders written by earlier versions keep working.

tests/fixtures/v0 holds two tiny runs written by commit 28f8db8 (before
MoEConfig: the MoE settings sat among the encoder's own keys), with
`python -m widenet train --model widenet_tiny --data fashion-mnist --data-dir
FMNIST --set dim=16 --set depth=2 --set num_heads=2 --set mlp_dim=32
--capacity-factor 1.5 --max-steps 4 --batch-size 32 --log-every 2` (FMNIST:
conftest's synthetic Fashion-MNIST) and `python -m widenet pretrain --model
widenet_text_tiny --corpus corpus.txt --vocab-size 120 --seq-len 32
--max-steps 2 --batch-size 8 --eval-examples 8 --log-every 1 --set dim=16
--set depth=2 --set num_heads=2 --set mlp_dim=32 --set embedding_size=8
--set max_positions=32 --set capacity_factor=1.5`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from widenet.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "v0"
VISION_FLAGS = ["--model", "widenet_tiny", "--data", "fashion-mnist", "--set", "dim=16", "--set", "depth=2",
                "--set", "num_heads=2", "--set", "mlp_dim=32", "--capacity-factor", "1.5", "--batch-size", "32",
                "--log-every", "2"]


def test_an_old_vision_run_evaluates_and_resumes(tmp_path, fmnist_dir, capsys):
    rc = main(["eval", "--checkpoint", str(FIXTURES / "vision_run"), "--data-dir", str(fmnist_dir), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["step"] == 4 and len(report["routing"]) == 2
    assert len(report["routing"][0]["expert_fraction"]) == 4

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "vision_run", run)
    rc = main(["train", *VISION_FLAGS, "--data-dir", str(fmnist_dir), "--max-steps", "4", "--resume",
               "--out", str(run)])  # the run had finished: resumed, it reports its evaluation
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "resumed from" in out and f"test accuracy {report['accuracy']:.4f}" in out


def test_an_old_pretraining_run_is_fine_tuned(tmp_path, capsys):
    lines = ["sentence\tlabel"] + [f"the {w} cat sits on the mat\t{w}" for w in ("red", "blue") * 8]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    rc = main(["finetune", "--task", "classify", "--init", str(FIXTURES / "text_run"),
               "--train", str(tmp_path / "train.tsv"), "--validation", str(tmp_path / "train.tsv"),
               "--max-steps", "2", "--batch-size", "8", "--max-len", "16", "--out", str(tmp_path / "ft")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    meta = json.loads(next((tmp_path / "ft" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["model_config"]["encoder"]["moe"]["capacity_factor"] == 1.5
    assert meta["model_config"]["encoder"]["dim"] == 16


@pytest.mark.parametrize("run", ["vision_run", "text_run"])
def test_fixtures_hold_the_old_flat_layout(run):
    """Guard: the fixtures really are the old format (flat MoE keys), or the tests above prove nothing."""
    meta = json.loads(next((FIXTURES / run / "checkpoints").glob("step_*/meta.json")).read_text())
    encoder = meta["model_config"]["encoder"]
    assert "moe" not in encoder and encoder["capacity_factor"] == 1.5
