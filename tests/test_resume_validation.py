"""--resume compares the data a run is scored on, not only the data it trains on: a validation file,
a corpus's held-out sequences or an image folder's test split that changed between the start and
the resume made the scores before and after it incomparable, without a word."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil

import pytest
import torch
from PIL import Image

from test_folder_layouts import make_folder
from test_text_train import PHRASES, _squad, _write_classify
from test_text_train import _pretrain_cfg as pretrain_cfg

from widenet.cli import main
from widenet.data.text.corpus import load_pretrain_corpus
from widenet.data.text.pretraining import make_sop_examples
from widenet.data.text.tokenizer import load_tokenizer, special_ids
from widenet.train.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from widenet.train.pretrain import pretrain, split_held_out
from widenet.train.text_config import PretrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

REFUSAL = (r"this run's data differs from the checkpoint's \(validation_contents '{what}' here, '{what}' in the "
           r"checkpoint\); a resumed run keeps the data it started with")


def _documents(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(PHRASES).capitalize() for _ in range(rng.randint(3, 6))) for _ in range(120)]


def _write_corpus(path, docs: list[str]) -> None:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def _pretrain_cfg(corpus, out, **kw) -> PretrainConfig:
    """test_text_train's pretraining settings, two steps long."""
    return pretrain_cfg(corpus, out, **dict(dict(max_steps=2, log_every=1), **kw))


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A two-step pretraining run: a starting point for fine-tuning, and its tokenizer."""
    folder = tmp_path_factory.mktemp("init")
    _write_corpus(folder / "docs.txt", _documents())
    pretrain(_pretrain_cfg(folder / "docs.txt", folder / "run"), log=lambda _: None)
    return folder / "run"


def _forget_validation_records(run) -> None:
    """The run's latest checkpoint as widenet wrote it before it recorded the validation data."""
    meta_file = find_latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    for key in ("validation_contents", "test_contents"):
        meta["data"].pop(key, None)
    meta_file.write_text(json.dumps(meta), encoding="utf-8")


def _finetune_args(init, folder, task: str, train: str, validation: str, *extra: str) -> list[str]:
    """`widenet finetune` from `init` on folder/train and folder/validation into folder/ft, batches of 8."""
    return ["finetune", "--task", task, "--init", str(init), "--train", str(folder / train), "--validation",
            str(folder / validation), "--batch-size", "8", "--out", str(folder / "ft"), *extra]


def test_finetune_resume_refuses_a_changed_validation_file(init, tmp_path, capsys):
    _write_classify(tmp_path / "train.tsv", 16, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    args = _finetune_args(init, tmp_path, "classify", "train.tsv", "dev.tsv", "--max-steps", "2", "--save-every", "1")
    assert main(args) == 0, capsys.readouterr().err
    recorded = load_checkpoint(tmp_path / "ft").meta["data"]["validation_contents"]
    assert re.fullmatch(r"8 validation sequences, token ids \w{12}", recorded)
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err  # the same file: resumed
    capsys.readouterr()
    _write_classify(tmp_path / "dev.tsv", 8, 2)  # other sentences; the training file is the same
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(REFUSAL.format(what=r"8 validation sequences, token ids \w{12}"), err), err
    assert f"'{recorded}' in the checkpoint" in err and err.count("\n") == 1
    # A checkpoint from before the record (step 1 of a run stopped there) resumes unchecked, and says so;
    # its next checkpoint does not record the file it reads now as the one the run began with.
    shutil.rmtree(tmp_path / "ft" / "checkpoints" / "step_00000002")
    (tmp_path / "ft" / "checkpoints" / "latest").unlink()
    _forget_validation_records(tmp_path / "ft")
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "step_00000001 was saved before widenet recorded data.validation_contents: this resume cannot check" in err
    assert "validation_contents" not in load_checkpoint(tmp_path / "ft").meta["data"]


def test_finetune_qa_resume_refuses_changed_validation_answers(init, tmp_path, capsys):
    """The scores compare predictions with the validation file's answers, which its token ids do not hold."""
    _squad(tmp_path / "train.json", 16, 0)
    _squad(tmp_path / "dev.json", 8, 1)
    args = _finetune_args(init, tmp_path, "qa", "train.json", "dev.json", "--max-steps", "1", "--max-len", "32")
    assert main(args) == 0, capsys.readouterr().err
    dev = json.loads((tmp_path / "dev.json").read_text(encoding="utf-8"))
    paragraph = dev["data"][0]["paragraphs"][0]
    context, qa = paragraph["context"], paragraph["qas"][0]
    qa["answers"].append(dict(text="keeper", answer_start=context.index("keeper")))  # the same text and questions
    (tmp_path / "dev.json").write_text(json.dumps(dev), encoding="utf-8")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    what = r"8 validation questions in \d+ sequences, token ids and answers \w{12}"
    assert re.search(REFUSAL.format(what=what), err) and err.count("\n") == 1, err


def _changed_only_held_out(corpus, docs: list[str], cfg: PretrainConfig) -> list[str]:
    """The documents with one word of one document changed for another of as many word pieces, such
    that only held-out sequences change (the training ones, and so their recorded hash, stay)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    special = special_ids(tokenizer)

    def split(texts: list[str]):
        _write_corpus(corpus, texts)
        ex = make_sop_examples(load_pretrain_corpus([corpus], tokenizer), cfg.seq_len, cfg.seed, special)
        data = dict(input_ids=ex.input_ids, token_type_ids=ex.token_type_ids, sop_labels=ex.sop_labels)
        return split_held_out(data, cfg.eval_examples, cfg.seed)

    train, held = split(docs)
    for i, doc in enumerate(docs):
        if "fox" not in doc:
            continue
        changed = docs[:i] + [doc.replace("fox", "dog", 1)] + docs[i + 1:]
        train2, held2 = split(changed)
        same_train = all(torch.equal(train[k], train2[k]) for k in train)
        if same_train and not all(torch.equal(held[k], held2[k]) for k in held):
            return changed
    raise AssertionError("no document whose sequences are all held out holds 'fox'")


def test_pretrain_resume_refuses_changed_held_out_text(init, tmp_path):
    """An edit of text that only held-out sequences hold left the training sequences, all that the
    checkpoint recorded, alike: the run resumed scoring other held-out text."""
    docs, corpus = _documents(), tmp_path / "docs.txt"
    cfg = _pretrain_cfg(corpus, tmp_path / "pre", tokenizer=str(init / "tokenizer.json"))
    changed = _changed_only_held_out(corpus, docs, cfg)
    _write_corpus(corpus, docs)
    pretrain(cfg, log=lambda _: None)
    _write_corpus(corpus, changed)
    resumed = dataclasses.replace(cfg, resume=True)
    with pytest.raises(CheckpointError, match=REFUSAL.format(what=r"\d+ held-out sequences, token ids \w{12}")):
        pretrain(resumed, log=lambda _: None)
    _forget_validation_records(tmp_path / "pre")
    pretrain(resumed, log=lambda _: None)  # recorded before the held-out sequences were: resumed unchecked


def test_image_folder_resume_refuses_a_changed_test_split(tmp_path, tiny_set_args, capsys):
    root = make_folder(tmp_path / "data", {"train": 4, "test": 2})
    args = [str(a) for a in ["train", "--data", "folder", "--data-dir", root, "--out", tmp_path / "run",
                             "--batch-size", 4, "--image-size", 8, "--device", "cpu", "--max-steps", 1,
                             *tiny_set_args, "--set", "patch_size=4"]]
    assert main(args) == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run").meta["data"]["test_contents"].startswith("4 images, pixels ")
    Image.new("L", (8, 8), 250).save(root / "test" / "cat" / "0.png")  # a test image replaced under its name
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"this run's data differs from the checkpoint's \(test_contents '4 images, pixels \w{12}' here, "
                     r"'4 images, pixels \w{12}' in the checkpoint\); a resumed run keeps the data it started with",
                     err) and err.count("\n") == 1, err
    _forget_validation_records(tmp_path / "run")
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
