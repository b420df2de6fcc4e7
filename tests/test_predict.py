"""`widenet predict` and widenet.inference.predict: images, sentences and questions through a saved model.

Predictions are checked against an independent computation: the test prepares
the inputs by hand (Pillow + numpy for images, encode_classification /
encode_squad for text) and runs the model itself.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer import TEXTS as TOKENIZER_TEXTS
import torch
from PIL import Image

import widenet.cli as cli
import widenet.inference.predict_text
from widenet import MoE, create_model
from widenet.data.text.classification import ClassificationExample, encode_classification
from widenet.data.text.squad import SquadExample, encode_squad, postprocess_squad
from widenet.data.text.tokenizer import save_tokenizer, special_ids, train_tokenizer
from widenet.inference import (ImageFailure, ImagePrediction, PredictError, answer_questions, classify_texts,
                               find_images, load_pretrained, predict_images, read_sentences)
from widenet.inference.predict_text import read_sentence_lines
from widenet.train.checkpoint import CheckpointError, save_checkpoint
from widenet.train.exported import write_export
from widenet.train.text_inputs import recorded_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ["cat", "dog", "eel"]
MEAN, STD = 0.5, 0.25
SIZE = 8
TEXTS = TOKENIZER_TEXTS[: len(TOKENIZER_TEXTS) // 2]  # the sentences the tokenizer tests train on
TEXT_TINY = dict(depth=1, dim=32, num_heads=2, mlp_dim=64, embedding_size=16, max_positions=64)


# --- fixtures: saved models --------------------------------------------------------------
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Heads start at zero (uniform predictions); give them weights so the classes differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit_tiny", image_size=SIZE, in_channels=1, num_classes=3, dim=16, depth=1, num_heads=2,
                         mlp_dim=32)
    _randomize(model.head, 1)
    return write_export(tmp_path_factory.mktemp("vision") / "model", model, model_name="vit_tiny", classes=CLASSES,
                        image_stats={"mean": [MEAN], "std": [STD]})


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = train_tokenizer(TEXTS, vocab_size=120, min_frequency=1)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer.json"), tok


def _text_export(path, tokenizer_file, task: str, num_labels: int = 2, seed: int = 0, inputs: dict | None = None):
    file, tok = tokenizer_file
    torch.manual_seed(seed)
    model = create_model("bert_text_tiny", vocab_size=tok.get_vocab_size(), task=task, num_labels=num_labels,
                         **TEXT_TINY)
    for head in ("classifier", "span_head"):
        if hasattr(model, head):
            _randomize(getattr(model, head), seed + 1)
    classes = ["neg", "neu", "pos"] if task == "classify" else None
    return write_export(path, model, model_name="bert_text_tiny", classes=classes, tokenizer_file=file, inputs=inputs)


@pytest.fixture(scope="module")
def classify_dir(tmp_path_factory, tokenizer_file):
    return _text_export(tmp_path_factory.mktemp("cls") / "model", tokenizer_file, "classify", 3)


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory, tokenizer_file):
    return _text_export(tmp_path_factory.mktemp("qa") / "model", tokenizer_file, "qa", seed=3)


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, tokenizer_file):
    return _text_export(tmp_path_factory.mktemp("pre") / "model", tokenizer_file, "pretrain")


@pytest.fixture()
def images(tmp_path):
    """A folder of images of several sizes and modes, one nested, plus a non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (10, 13), dtype=np.uint8), "L").save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 9, 3), dtype=np.uint8), "RGB").save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / "sub" / "c.bmp")
    (root / "notes.txt").write_text("not an image")
    return root


# --- helpers --------------------------------------------------------------------------------
def _reference_pixels(path) -> torch.Tensor:
    """The image as the model should see it, prepared by hand: grey, the central square cut out,
    resized to SIZE x SIZE (bicubic), [0, 1], normalised -> (1, SIZE, SIZE)."""
    with Image.open(path) as im:
        im = im.convert("L")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy((array - MEAN) / STD)[None]


def _reference_probs(model, files) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.stack([_reference_pixels(f) for f in files])).logits.softmax(-1)


def _cli(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """widenet.cli.main(argv): (exit code, stdout, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, out, err) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- images -------------------------------------------------------------------------------
def test_image_predictions_match_hand_made_preprocessing(vision_dir, images):
    pre = load_pretrained(vision_dir)
    files = [images / "a.png", images / "b.jpg", images / "sub" / "c.bmp"]
    results = predict_images(pre, files, top_k=3, batch_size=2, device="cpu")
    want = _reference_probs(pre.model, files)
    assert [r.file for r in results] == [str(f) for f in files]
    for result, probs in zip(results, want):
        assert isinstance(result, ImagePrediction) and result.ok
        order = probs.argsort(descending=True).tolist()
        assert [c.name for c in result.top] == [CLASSES[i] for i in order]
        assert [c.probability for c in result.top] == pytest.approx(probs[order].tolist(), abs=1e-5)
        assert result.top[0].probability >= result.top[1].probability >= result.top[2].probability
    # batches of one give the same numbers
    single = predict_images(pre, files, top_k=3, batch_size=1, device="cpu")
    assert [c.probability for r in single for c in r.top] == pytest.approx(
        [c.probability for r in results for c in r.top], abs=1e-5)


def test_a_model_trained_on_resized_images_sees_them_resized_alike_in_predict(fmnist_dir, tiny_set_args, tmp_path,
                                                                              cli, monkeypatch):
    """--image-size resizes Fashion-MNIST bilinearly, while predict resized files bicubically (more than 8
    levels apart on these pictures). The run records its resize; predict follows it, from the run and
    from its export."""
    from widenet.data.images import load_dataset, resize_dataset
    from widenet.data.images.folder import decode_image

    run = tmp_path / "run"
    assert cli(["train", "--data", "fashion-mnist", "--data-dir", fmnist_dir, "--image-size", 32, "--out", run,
                "--max-steps", 1, "--batch-size", 8, "--device", "cpu", "--set", "patch_size=8",
                *tiny_set_args])[0] == 0
    assert cli(["export", str(run), "--to", str(tmp_path / "export")])[0] == 0
    test = load_dataset("fashion-mnist", "test", data_dir=fmnist_dir, download=False)
    trained_on = resize_dataset(test, 32).images[:4]
    for i, image in enumerate(test.images[:4]):
        Image.fromarray(image[0].numpy()).save(tmp_path / f"{i}.png")
    files = [tmp_path / f"{i}.png" for i in range(4)]
    bicubic = torch.stack([decode_image(f, 32, 1) for f in files])
    assert (bicubic.int() - trained_on.int()).abs().max() > 8  # the mismatch this test is about
    seen = {}  # what predict decodes, by file: the pixels its model gets

    def decode(path, *args, **kw):
        seen[path] = decode_image(path, *args, **kw)
        return seen[path]

    monkeypatch.setattr(widenet.inference.predict, "decode_image", decode)
    for saved in (run, tmp_path / "export"):
        pre = load_pretrained(saved)
        assert pre.resize == {"crop": True, "resample": "bilinear"}
        seen.clear()
        results = predict_images(pre, files, top_k=10, device="cpu")
        assert (torch.stack([seen[f] for f in files]).int() - trained_on.int()).abs().max() <= 1
        x = ((trained_on.float() / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std))
        with torch.no_grad():
            want = pre.model.eval()(x).logits.softmax(-1)
        for result, probs in zip(results, want):
            got = {c.name: c.probability for c in result.top}
            assert [got[name] for name in pre.classes] == pytest.approx(probs.tolist(), abs=2e-2)


def test_an_moe_models_answer_does_not_depend_on_its_batch_neighbours(images, tmp_path):
    """With a capacity per call, an image's tokens competed with its neighbours' for expert slots:
    its answer changed with what it was batched with. predict routes every token."""
    torch.manual_seed(0)
    model = create_model("widenet_tiny", image_size=SIZE, in_channels=1, num_classes=3, dim=16, depth=2,
                         num_heads=2, expert_dim=32, capacity_factor=0.25, eval_capacity_factor=0.25)
    _randomize(model, 2)  # sharp routing: many tokens want one expert
    pre = load_pretrained(write_export(tmp_path / "moe", model, model_name="widenet_tiny", classes=CLASSES,
                                       image_stats={"mean": [MEAN], "std": [STD]}))
    files = [images / "a.png", images / "b.jpg", images / "sub" / "c.bmp"]
    with torch.no_grad():  # the model as trained drops tokens here, and the batch changes the answer
        pixels = torch.stack([_reference_pixels(f) for f in files])
        alone, together = model.eval()(pixels[:1]).logits, model(pixels).logits[:1]
    assert not torch.allclose(alone, together)
    together = predict_images(pre, files, top_k=3, batch_size=3, device="cpu")[0]
    alone = predict_images(pre, files[:1], top_k=3, batch_size=1, device="cpu")[0]
    assert [(c.name, c.probability) for c in alone.top] == [(c.name, pytest.approx(c.probability, abs=1e-6))
                                                            for c in together.top]
    # The model's own layers are as they were: a caller's model is not left dropless.
    assert [m.cfg.dropless for m in pre.model.modules() if isinstance(m, MoE)] == [False]


def test_top_k_is_capped_and_truncates(vision_dir, images):
    pre = load_pretrained(vision_dir)
    assert len(predict_images(pre, [images / "a.png"], top_k=10, device="cpu")[0].top) == 3
    full = predict_images(pre, [images / "a.png"], top_k=3, device="cpu")[0].top
    assert predict_images(pre, [images / "a.png"], top_k=2, device="cpu")[0].top == full[:2]


def test_folders_and_globs_expand_sorted(images, tmp_path):
    assert find_images([images]) == [images / "a.png", images / "b.jpg", images / "sub" / "c.bmp"]
    assert find_images([str(images / "*.png")]) == [images / "a.png"]
    assert find_images([str(images / "**" / "*.bmp")]) == [images / "sub" / "c.bmp"]
    # each file once, in the order first named; a file named outright is taken whatever its name
    assert find_images([images / "b.jpg", images, images / "notes.txt"]) == [
        images / "b.jpg", images / "a.png", images / "sub" / "c.bmp", images / "notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no images in this folder"):
        find_images([tmp_path / "empty"])
    with pytest.raises(PredictError, match="no files match"):
        find_images([str(tmp_path / "*.gif")])
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait for a writer forever
    with pytest.raises(PredictError, match="pipe.png: not a regular file or a folder"):
        find_images([tmp_path / "pipe.png"])


def test_each_prediction_belongs_to_its_own_file_around_failures(vision_dir, images):
    """An unreadable file first in a batch: the readable ones after it keep their own predictions
    (each equal to its prediction alone), not their neighbours'."""
    (images / "x.png").write_bytes(b"not a png")
    (images / "y.png").write_bytes(b"nor this")
    pretrained = load_pretrained(vision_dir)
    files = [images / "x.png", images / "a.png", images / "b.jpg", images / "y.png", images / "sub" / "c.bmp"]
    together = predict_images(pretrained, files, top_k=3, device="cpu", batch_size=5)
    assert [r.ok for r in together] == [False, True, True, False, True]
    for file, result in zip(files, together):
        if result.ok:
            alone = predict_images(pretrained, [file], top_k=3, device="cpu")[0]
            assert result.file == alone.file == str(file)
            assert [c.name for c in result.top] == [c.name for c in alone.top]
            assert [c.probability for c in result.top] == pytest.approx([c.probability for c in alone.top], abs=1e-6)


def test_undecodable_image_is_reported_and_the_rest_predicted(vision_dir, images):
    (images / "x.png").write_bytes(b"\x00garbage, not a png" * 10)
    results = predict_images(load_pretrained(vision_dir), [images], device="cpu", batch_size=2)
    assert [r.file for r in results] == [str(images / n) for n in ("a.png", "b.jpg", "sub/c.bmp", "x.png")]
    assert [r.ok for r in results] == [True, True, True, False]
    assert isinstance(results[3], ImageFailure) and "Pillow" in results[3].reason
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.float32), "F").save(images / "float.tiff")
    failure = predict_images(load_pretrained(vision_dir), [images / "float.tiff"], device="cpu")[0]
    assert failure.reason.startswith("floating-point pixels are not supported")  # the path was said twice


def test_cli_images_table_json_and_bad_file(vision_dir, images, capsys, monkeypatch):
    (images / "x.png").write_bytes(b"garbage" * 20)
    rc, out, err = _cli(["predict", "--checkpoint", vision_dir, images, "--top-k", "2", "--device", "cpu"],
                        capsys, monkeypatch)
    assert rc == 1
    assert err.strip().splitlines() == [f"widenet: cannot read image {images / 'x.png'}: not an image Pillow can "
                                        "decode (unknown format or damaged file)"]
    lines = out.splitlines()
    assert lines[0].split() == ["file", "top", "1", "top", "2"]
    assert len(lines) == 4 and lines[1].startswith(str(images / "a.png")) and "%" in lines[1]
    # JSON lines: the same numbers as the Python API
    rc, out, err = _cli(["predict", "--checkpoint", vision_dir, str(images / "*.png"), "--json", "--device", "cpu"],
                        capsys, monkeypatch)
    assert rc == 1 and "x.png" in err and "Traceback" not in err
    records = [json.loads(line) for line in out.splitlines()]
    api = predict_images(load_pretrained(vision_dir), [images / "a.png"], device="cpu")[0]
    assert records == [{"file": str(images / "a.png"),
                        "top": [{"class": c.name, "probability": pytest.approx(c.probability, abs=1e-6)}
                                for c in api.top]}]


def test_cli_json_of_a_file_named_in_another_encoding_is_valid_utf8(vision_dir, images, capsys, monkeypatch):
    """A Latin-1 file name reaches Python with a lone surrogate: written raw into a JSON line it made
    the line invalid UTF-8 (exit 0, and json.loads of the bytes failed). Such a line is ASCII-escaped."""
    named = images / os.fsdecode(b"caf\xe9.png")
    try:
        shutil.copy(images / "a.png", named)
    except OSError:  # a file system that takes only UTF-8 names (APFS)
        pytest.skip("this file system refuses names that are not UTF-8")
    rc, out, err = _cli(["predict", "--checkpoint", vision_dir, named, images / "b.jpg", "--json", "--device", "cpu"],
                        capsys, monkeypatch)
    assert rc == 0, err
    lines = out.splitlines()
    assert all(line.encode("utf-8") for line in lines)  # raises on a lone surrogate
    assert [json.loads(line)["file"] for line in lines] == [str(named), str(images / "b.jpg")]


def test_cli_all_good_images_exit_zero_and_columns_align(vision_dir, images, capsys, monkeypatch):
    files = [images / "a.png", images / "sub" / "c.bmp", images / "b.jpg"]
    rc, out, err = _cli(["predict", "--checkpoint", vision_dir, *files, "--device", "cpu", "--batch-size", "1"],
                        capsys, monkeypatch)
    assert (rc, err) == (0, "")
    header, *rows = out.splitlines()
    api = predict_images(load_pretrained(vision_dir), files, device="cpu")
    assert len(rows) == len(files)
    for rank in range(1, 4):  # every rank's column starts where its heading does
        at = header.index(f"top {rank}")
        for row, result in zip(rows, api):
            assert row[at:].startswith(result.top[rank - 1].name + " ") and row[at - 1] == " "
    assert [row.split()[0] for row in rows] == [str(f) for f in files]


def test_cli_no_images_found_is_one_line(vision_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    line = _one_line_error(*_cli(["predict", "--checkpoint", vision_dir, tmp_path / "empty"], capsys, monkeypatch))
    assert "no images in this folder" in line
    line = _one_line_error(*_cli(["predict", "--checkpoint", vision_dir, str(tmp_path / "*.jpg")], capsys,
                                 monkeypatch))
    assert "no files match" in line


def test_progress_bar_only_when_asked_or_long_on_a_terminal(vision_dir, images, capsys):
    pre = load_pretrained(vision_dir)
    predict_images(pre, [images], batch_size=1, device="cpu", progress=True)
    assert "image" in capsys.readouterr().err
    predict_images(pre, [images], batch_size=1, device="cpu")  # stderr is no terminal here
    assert capsys.readouterr().err == ""


# --- text classification --------------------------------------------------------------------
def test_classify_texts_matches_the_model_on_encoded_ids(classify_dir):
    pre = load_pretrained(classify_dir)
    texts = ["the quick brown fox", ("a dictionary lists words", "arrogant people make claims"),
             "mixture of experts route every token to a few experts across all layers"]
    results = classify_texts(pre, texts, top_k=3, batch_size=2, device="cpu")
    examples = [ClassificationExample(*(t if isinstance(t, tuple) else (t, None)), None) for t in texts]
    enc = encode_classification(examples, pre.tokenizer, None, 64)
    pad = special_ids(pre.tokenizer).pad
    with torch.no_grad():
        probs = pre.model(enc["input_ids"], enc["token_type_ids"],
                          padding_mask=enc["input_ids"] == pad).logits.softmax(-1)
    for result, text, p in zip(results, texts, probs):
        order = p.argsort(descending=True).tolist()
        assert [c.name for c in result.top] == [["neg", "neu", "pos"][i] for i in order]
        assert [c.probability for c in result.top] == pytest.approx(p[order].tolist(), abs=1e-5)
        assert (result.text, result.text_pair) == (text if isinstance(text, tuple) else (text, None))


def test_a_sentences_classes_do_not_depend_on_its_batch_neighbours(tokenizer_file, tmp_path):
    """The text side of the image test above: an MoE classifier with little capacity per call. Whether the
    model as trained changes a given text's answer in a given batch depends on the token ids, so on the
    tokenizer's vocabulary: every way of putting three of the six sentences
    in a batch, the last one scored, is tried, and in at least one the batch must change the model's own
    answer; predict's answer for the last text is its answer alone in every one."""
    file, tok = tokenizer_file
    torch.manual_seed(0)
    model = create_model("widenet_text_tiny", vocab_size=tok.get_vocab_size(), task="classify", num_labels=3,
                         capacity_factor=0.25, eval_capacity_factor=0.25, **TEXT_TINY)
    _randomize(model, 2)
    pre = load_pretrained(write_export(tmp_path / "moe", model, model_name="widenet_text_tiny",
                                       classes=["neg", "neu", "pos"], tokenizer_file=file))
    changed = 0
    for order in itertools.permutations(range(6), 3):
        texts = [TEXTS[i] for i in order]
        enc = encode_classification([ClassificationExample(t, None, None) for t in texts], pre.tokenizer, None, 64)
        with torch.no_grad():  # the model as trained drops tokens here, and the batch may change the answer
            ids, types = enc["input_ids"], enc["token_type_ids"]
            pad = ids == special_ids(pre.tokenizer).pad
            alone = model.eval()(ids[-1:], types[-1:], padding_mask=pad[-1:]).logits
            together = model(ids, types, padding_mask=pad).logits[-1:]  # the last text: its tokens lose slots
        changed += not torch.allclose(alone, together)
        together = classify_texts(pre, texts, top_k=3, batch_size=3, device="cpu")[-1]
        alone = classify_texts(pre, texts[-1:], top_k=3, batch_size=1, device="cpu")[0]
        assert [(c.name, c.probability) for c in alone.top] == [(c.name, pytest.approx(c.probability, abs=1e-6))
                                                                for c in together.top], order
    assert changed > 0  # the test means something: some batch changes the model's own answer


def test_read_sentences_lines_pairs_and_errors(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("one sentence\n\nfirst\tsecond\n", encoding="utf-8")
    assert read_sentences(f) == ["one sentence", ("first", "second")]
    assert read_sentence_lines(f) == [(1, "one sentence"), (3, ("first", "second"))]
    assert read_sentences("-", stdin=io.StringIO("from stdin\n")) == ["from stdin"]
    f.write_text("a\tb\tc\n")
    with pytest.raises(PredictError, match="line 1"):
        read_sentences(f)
    f.write_text("\n \n")
    with pytest.raises(PredictError, match="no sentences"):
        read_sentences(f)


def test_cli_text_from_stdin_json_and_table(classify_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nthe lazy dog\n\n  \nwider networks\tshare one block\n"))
    rc, out, err = _cli(["predict", "--checkpoint", classify_dir, "--text", "-", "--json", "--top-k", "2"],
                        capsys, monkeypatch)
    assert (rc, err) == (0, "")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in records] == [2, 5]  # blank lines skipped; each record says which line it is
    api = classify_texts(load_pretrained(classify_dir), ["the lazy dog", ("wider networks", "share one block")],
                         top_k=2, device="cpu")
    assert [r["text"] for r in records] == ["the lazy dog", "wider networks"]
    assert records[1]["text_pair"] == "share one block"
    assert [[t["class"] for t in r["top"]] for r in records] == [[c.name for c in a.top] for a in api]
    monkeypatch.setattr(sys, "stdin", io.StringIO("the lazy dog\n"))
    rc, out, err = _cli(["predict", "--checkpoint", classify_dir, "--text", "-"], capsys, monkeypatch)
    assert rc == 0 and out.splitlines()[1].startswith("the lazy dog")


def test_long_sentences_are_truncated_with_one_note(classify_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "long.txt"
    # "a dog" is at most 4 word pieces (one per letter) whatever the tokenizer's vocabulary
    f.write_text("\n".join(["the quick brown fox jumps over the lazy dog " * 3] * 3 + ["a dog"]))
    rc, out, err = _cli(["predict", "--checkpoint", classify_dir, "--text", f, "--max-len", "8",
                         "--batch-size", "2"], capsys, monkeypatch)
    assert rc == 0
    assert err.strip().splitlines() == ["widenet: note: 3 of 4 texts were longer than 8 tokens and were "
                                        "truncated (longest first)"]


# --- question answering ---------------------------------------------------------------------
def test_answers_are_spans_of_the_context_as_postprocess_picks_them(qa_dir):
    pre = load_pretrained(qa_dir)
    context = "The arrow was feathered and barbed, to be shot from a bow. " * 4
    pairs = [("what was the arrow?", context), ("who lists words?", "A dictionary lists words with meanings.")]
    answers = answer_questions(pre, pairs, max_len=24, doc_stride=8, batch_size=1, device="cpu")
    for answer, (question, ctx) in zip(answers, pairs):
        assert answer.question == question and answer.answer and answer.answer in ctx
        assert 0.0 < answer.score <= 1.0
    # the same answers as fine-tuning's evaluation path, run by hand
    examples = [SquadExample(str(i), q, c, [], False) for i, (q, c) in enumerate(pairs)]
    features = encode_squad(examples, pre.tokenizer, max_len=24, doc_stride=8)
    ids = features.input_ids
    with torch.no_grad():
        out = pre.model(ids, features.token_type_ids, padding_mask=ids == special_ids(pre.tokenizer).pad)
    want = postprocess_squad(examples, features, out.start_logits, out.end_logits, version_2=False)
    assert [a.answer for a in answers] == [want["0"], want["1"]]


def _window_logits(pre, question: str, context: str, **windows):
    """encode_squad's windows of one question and the model's start/end logits for them, run by hand."""
    features = encode_squad([SquadExample("0", question, context, [], False)], pre.tokenizer, **windows)
    ids = features.input_ids
    with torch.no_grad():
        out = pre.model(ids, features.token_type_ids, padding_mask=ids == special_ids(pre.tokenizer).pad)
    return features, out.start_logits, out.end_logits


def test_an_answers_score_is_its_spans_probability(qa_dir):
    """One window: the best span by start + end logit is also the one with the largest product of the
    two softmax probabilities, found here by trying every span of the context up to 30 tokens. Several
    questions and contexts (which spans win depends on the tokenizer's ids): at least one answer must be
    several tokens long, where a start and an end probability taken at the same place would differ."""
    pre = load_pretrained(qa_dir)
    pairs = [(question, context) for question in ("who makes claims?", "what jumps?", "what routes tokens?")
             for context in TEXTS[:6]]
    answers = answer_questions(pre, pairs, max_len=64, device="cpu")
    longer = 0
    for (question, context), answer in zip(pairs, answers):
        features, start, end = _window_logits(pre, question, context, max_len=64)
        assert len(features) == 1
        inside = [i for i, o in enumerate(features.offsets[0]) if o is not None]
        p_start, p_end = start[0].softmax(-1), end[0].softmax(-1)
        best, s, e = max((float(p_start[s] * p_end[e]), s, e) for s in inside for e in inside if s <= e < s + 30)
        assert answer.score == pytest.approx(best, rel=1e-5)
        longer += s < e
    assert longer > 0


def test_scores_follow_the_best_window_and_the_null_threshold_by_brute_force():
    """_scores against an enumeration of every span: over three windows of two examples, the answer
    is the best span of any window (start + end logit, in the context, at most MAX_ANSWER_LEN long),
    scored in its own window; with no-answer allowed it becomes [CLS] of the window least sure of an
    answer exactly when that null score beats the best span by more than the threshold."""
    from types import SimpleNamespace

    from widenet.inference.predict import MAX_ANSWER_LEN
    from widenet.inference.predict_text import _scores

    gen = torch.Generator().manual_seed(3)
    windows, length = 3, 12  # fewer positions than N_BEST: the candidates are every context token
    starts, ends = (torch.randn(2 * windows, length, generator=gen) * 3 for _ in range(2))
    offsets = [[None] * 3 + [(k, k + 1) for k in range(length - 4)] + [None] for _ in range(2 * windows)]
    class Features(SimpleNamespace):
        def __len__(self):
            return len(self.offsets)

    features = Features(example_index=torch.arange(2).repeat_interleave(windows), offsets=offsets)
    examples = [SquadExample(f"q{i}", "question?", "context", [], False) for i in range(2)]

    def prob(f, s, e):
        return float(starts[f].softmax(-1)[s] * ends[f].softmax(-1)[e])

    best_windows = []
    for ex in range(2):
        rows = range(ex * windows, (ex + 1) * windows)
        best = max((float(starts[f, s] + ends[f, e]), f, s, e) for f in rows for s in range(3, length - 1)
                   for e in range(s, min(s + MAX_ANSWER_LEN, length - 1)))
        null_value, null_f = min((float(starts[f, 0] + ends[f, 0]), f) for f in rows)
        gap, _ = null_value - best[0], best_windows.append(best[1] - ex * windows)
        assert _scores(examples, features, starts, ends, False, 0.0)[ex] == pytest.approx(prob(*best[1:]))
        for threshold, null_wins in ((gap - 0.01, True), (gap + 0.01, False)):
            score = _scores(examples, features, starts, ends, True, threshold)[ex]
            assert score == pytest.approx(prob(null_f, 0, 0) if null_wins else prob(*best[1:])), (ex, threshold)
    assert any(best_windows), best_windows  # (a best span lies past its example's first window)


def test_no_answer_is_scored_in_the_window_most_sure_of_it(qa_dir, capsys, monkeypatch):
    """allow_no_answer with a threshold below every gap answers nothing; its score is the [CLS] span's
    probability in the window whose no-answer logits (start + end at [CLS]) are highest... by the rule
    SQuAD 2.0 evaluation uses: the lowest null score across windows is the example's null score."""
    pre = load_pretrained(qa_dir)
    question, context = "what was the arrow?", "The arrow was feathered and barbed, to be shot from a bow. " * 4
    windows = dict(max_len=24, doc_stride=8, max_query_len=64)
    features, start, end = _window_logits(pre, question, context, **windows)
    assert len(features) > 2
    null = start[:, 0] + end[:, 0]
    f = int(null.argmin())
    assert int(null.argmax()) != f  # the windows disagree: the rule is tested
    nothing = answer_questions(pre, [(question, context)], device="cpu", allow_no_answer=True, null_threshold=-1e9,
                               **windows)[0]
    assert nothing.answer == ""
    assert nothing.score == pytest.approx(float(start[f].softmax(-1)[0] * end[f].softmax(-1)[0]), rel=1e-5)
    span = answer_questions(pre, [(question, context)], device="cpu", allow_no_answer=True, null_threshold=1e9,
                            **windows)[0]
    assert span.answer and span.answer in context
    for threshold, says_nothing in (("-1e9", True), ("1e9", False)):
        rc, out, err = _cli(["predict", "--checkpoint", qa_dir, "--question", question, "--context", context,
                             "--max-len", 24, f"--null-threshold={threshold}", "--json"], capsys, monkeypatch)
        assert (rc, err) == (0, "")
        assert (json.loads(out)["answer"] == "") == says_nothing


def test_no_answer_follows_the_squad_version_the_model_was_fine_tuned_on(tokenizer_file, tmp_path, capsys,
                                                                          monkeypatch):
    """A SQuAD 2.0 model answers "" where its fine-tuning's evaluation would (its recorded threshold),
    without being told; a SQuAD 1.1 model, whose no-answer score never trained, refuses a threshold.
    Before, predict answered every question of a 2.0 model with a span unless given --null-threshold."""
    question, context = "what was the arrow?", "The arrow was feathered and barbed, to be shot from a bow. " * 4
    windows = dict(max_len=24, doc_stride=8, max_query_len=64)
    v2 = load_pretrained(_text_export(tmp_path / "v2", tokenizer_file, "qa", seed=3,
                                      inputs=dict(windows, no_answer=True, null_threshold=-1e9)))
    assert answer_questions(v2, [(question, context)], device="cpu")[0].answer == ""  # its threshold: always ""
    for given in (dict(null_threshold=1e9), dict(allow_no_answer=False)):
        assert answer_questions(v2, [(question, context)], device="cpu", **given)[0].answer in context
    v1 = _text_export(tmp_path / "v1", tokenizer_file, "qa", seed=3,
                      inputs=dict(windows, no_answer=False, trained_no_answer=False))
    assert answer_questions(load_pretrained(v1), [(question, context)], device="cpu")[0].answer in context
    # trained on SQuAD 1.1, evaluated on 2.0 data: spans by default (it was refused without any flag)
    v1_val2 = load_pretrained(_text_export(tmp_path / "v1v2", tokenizer_file, "qa", seed=3,
                                           inputs=dict(windows, no_answer=True, trained_no_answer=False)))
    assert answer_questions(v1_val2, [(question, context)], device="cpu")[0].answer in context
    with pytest.raises(PredictError, match="without unanswerable questions"):
        answer_questions(v1_val2, [(question, context)], device="cpu", null_threshold=0.0)
    # trained on SQuAD 2.0, evaluated on 1.1 data (or recorded before trained_no_answer): a threshold applies
    for inputs in (dict(windows, no_answer=False, trained_no_answer=True), dict(windows, no_answer=False)):
        mixed = load_pretrained(_text_export(tmp_path / "mixed", tokenizer_file, "qa", seed=3, inputs=inputs))
        assert answer_questions(mixed, [(question, context)], device="cpu")[0].answer in context
        assert answer_questions(mixed, [(question, context)], device="cpu", null_threshold=-1e9)[0].answer == ""
        shutil.rmtree(tmp_path / "mixed")
    for given in (dict(null_threshold=0.0), dict(allow_no_answer=True)):
        with pytest.raises(PredictError, match="fine-tuned on SQuAD 1.1 data, without unanswerable questions"):
            answer_questions(load_pretrained(v1), [(question, context)], device="cpu", **given)
    rc, out, err = _cli(["predict", "--checkpoint", v1, "--question", question, "--context", context,
                         "--null-threshold", "1"], capsys, monkeypatch)
    assert (rc, out) == (2, "") and err.startswith(f"widenet: error: {v1} was fine-tuned on SQuAD 1.1 data")
    assert err.count("\n") == 1


def test_cli_qa_json_and_table(qa_dir, tmp_path, capsys, monkeypatch):
    context = "Mixture of experts layers route every token to a few experts."
    rc, out, err = _cli(["predict", "--checkpoint", qa_dir, "--question", "what routes tokens?", "--question",
                         "where do tokens go?", "--context", context, "--json"], capsys, monkeypatch)
    assert (rc, err) == (0, "")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in records] == ["what routes tokens?", "where do tokens go?"]
    assert all(r["answer"] in context and 0 <= r["score"] <= 1 for r in records)
    (tmp_path / "ctx.txt").write_text(context + "\n")
    rc, out, err = _cli(["predict", "--checkpoint", qa_dir, "--question", "what routes tokens?", "--context-file",
                         tmp_path / "ctx.txt"], capsys, monkeypatch)
    assert rc == 0 and out.splitlines()[0].split() == ["question", "answer", "score"]
    assert records[0]["answer"].split()[0] in out.splitlines()[1]


def test_a_question_too_long_for_the_window_names_predicts_own_setting(qa_dir, capsys, monkeypatch):
    """The model holds 64 positions; a 70-word question, cut to 64 tokens, leaves no room for the
    context. The message names max_len (predict's --max-len), not fine-tuning's max_query_len."""
    long_question = " ".join(["experts"] * 70) + "?"
    rc, out, err = _cli(["predict", "--checkpoint", qa_dir, "--question", long_question, "--context", "a context."],
                        capsys, monkeypatch)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "question 1 takes 64 tokens" in err and "the model holds 64 positions" in err
    assert "max_query_len" not in err
    with pytest.raises(PredictError, match=r"question 2 takes \d+ tokens.*raise max_len to \d+ or more"):
        answer_questions(load_pretrained(qa_dir), [("short?", "a context."), (" ".join(["why"] * 20), "c.")],
                         max_len=16)
    pretrained = load_pretrained(qa_dir)  # the boundary: [CLS] 12 tokens [SEP] one context token [SEP] is 16
    word = next(w for w in ("a", "the", "of", "experts", "why") if len(pretrained.tokenizer.encode(w).ids) == 3)
    assert answer_questions(pretrained, [(" ".join([word] * 12), "a context.")], max_len=16)[0].answer is not None
    with pytest.raises(PredictError, match="question 1 takes 13 tokens"):
        answer_questions(pretrained, [(" ".join([word] * 13), "a context.")], max_len=16)


# --- the inputs as fine-tuning prepared them ------------------------------------------------
def test_fine_tuning_records_its_inputs_and_predict_and_export_keep_them(pretrain_dir, tmp_path, cli):
    """A classifier fine-tuned on sentence pairs at 16 tokens: its checkpoint and its export say so,
    and predict refuses a single sentence (line 2 of the file) instead of scoring a form it never saw."""
    rows = [f"{a}\t{b}\t{label}" for a, b, label in
            zip(TEXTS[:12], TEXTS[1:13], ["x", "y"] * 6)]
    (tmp_path / "t.tsv").write_text("sentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    rc, _, err = cli(["finetune", "--task", "classify", "--init", pretrain_dir, "--train", tmp_path / "t.tsv",
                      "--validation", tmp_path / "t.tsv", "--max-len", "16", "--epochs", "1", "--batch-size", "4",
                      "--out", tmp_path / "run"])
    assert rc == 0, err
    rc, _, err = cli(["export", tmp_path / "run", "--to", tmp_path / "export"])
    assert rc == 0, err
    for folder in (tmp_path / "run", tmp_path / "export"):
        assert load_pretrained(folder).inputs == {"pairs": True, "max_len": 16}
    (tmp_path / "s.txt").write_text(f"{TEXTS[0]}\t{TEXTS[1]}\n{TEXTS[2]}\n")
    rc, out, err = cli(["predict", "--checkpoint", tmp_path / "export", "--text", tmp_path / "s.txt"])
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert f"{tmp_path / 's.txt'} line 2: one sentence, but the model was fine-tuned on sentence pairs" in err


def test_texts_of_the_other_form_than_fine_tunings_are_refused(tokenizer_file, classify_dir, tmp_path):
    pairs = load_pretrained(_text_export(tmp_path / "p", tokenizer_file, "classify", 3,
                                         inputs=dict(pairs=True, max_len=64)))
    single = load_pretrained(_text_export(tmp_path / "s", tokenizer_file, "classify", 3,
                                          inputs=dict(pairs=False, max_len=64)))
    with pytest.raises(PredictError, match="text 2: one sentence, but the model was fine-tuned on sentence pairs"):
        classify_texts(pairs, [("the lazy dog", "a bow"), "the lazy dog"], device="cpu")
    with pytest.raises(PredictError, match="text 1: a sentence pair, but the model was fine-tuned on single"):
        classify_texts(single, [("the lazy dog", "a bow")], device="cpu")
    assert len(classify_texts(single, ["the lazy dog"], device="cpu")) == 1
    # a model that does not say (fine-tuned before this was recorded, or from Hugging Face) takes both
    assert load_pretrained(classify_dir).inputs is None
    assert len(classify_texts(load_pretrained(classify_dir), [("a", "b"), "c"], device="cpu")) == 2


def test_predict_uses_the_lengths_the_model_was_fine_tuned_with(tokenizer_file, tmp_path, monkeypatch):
    saved = dict(max_len=24, doc_stride=8, max_query_len=6)
    qa = load_pretrained(_text_export(tmp_path / "qa", tokenizer_file, "qa", seed=3, inputs=saved))
    calls = []
    real = widenet.inference.predict_text.encode_squad
    monkeypatch.setattr(widenet.inference.predict_text, "encode_squad",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    context = "The arrow was feathered and barbed, to be shot from a bow. " * 4
    question = "what was the arrow feathered and barbed to be shot from?"  # more than 6 tokens
    with pytest.warns(UserWarning, match="1 of 1 questions were longer than 6 tokens"):
        by_default = answer_questions(qa, [(question, context)], device="cpu")
    assert calls == [saved]
    assert by_default == answer_questions(qa, [(question, context)], device="cpu", **saved)
    cls = load_pretrained(_text_export(tmp_path / "cls", tokenizer_file, "classify", 3,
                                       inputs=dict(pairs=False, max_len=8)))
    with pytest.warns(UserWarning, match="1 of 1 texts were longer than 8 tokens"):
        classify_texts(cls, [TEXTS[1]], device="cpu")


def test_saved_inputs_are_checked_and_older_runs_read_from_their_settings():
    model = {"max_positions": 64}
    older_qa = dict(model_config=model, train_config=dict(task="qa", max_len=None, doc_stride=16, max_query_len=8))
    assert recorded_inputs(older_qa, "m") == {"max_len": 64, "doc_stride": 16, "max_query_len": 8}
    older_cls = dict(model_config=model, train_config=dict(task="classify", max_len=32, doc_stride=128))
    assert recorded_inputs(older_cls, "m") == {"max_len": 32}
    assert recorded_inputs(dict(model_config=model, train_config=dict(mask_prob=0.15)), "m") is None  # pretraining
    partial = dict(model_config=model, train_config=dict(task="qa", doc_stride=16))  # a hand-edited meta
    assert recorded_inputs(partial, "m") == {"max_len": 64, "doc_stride": 16}
    with pytest.raises(CheckpointError, match="m: the fine-tuning settings .* should hold"):
        recorded_inputs(dict(model_config=model, train_config=dict(task="qa", doc_stride="16")), "m")
    # A run fine-tuned before no_answer was recorded: from the SQuAD version saved with its data.
    v2 = dict(model_config=model, train_config=dict(task="qa", doc_stride=16, max_len=32, null_threshold=1.5),
              data=dict(squad_version="2.0", inputs=dict(max_len=32, doc_stride=16, max_query_len=8)))
    assert recorded_inputs(v2, "m") == dict(max_len=32, doc_stride=16, max_query_len=8, no_answer=True,
                                            null_threshold=1.5)
    v2["data"]["squad_version"] = "1.1"
    assert recorded_inputs(v2, "m")["no_answer"] is False
    for bad in ({"max_len": 0}, {"max_len": "32"}, {"pairs": "yes"}, {"doc_stride": True}, {"stride": 8}, [1],
                {"no_answer": 1}, {"null_threshold": float("nan")}, {"null_threshold": "0"}):
        with pytest.raises(CheckpointError, match="m/meta.json: the saved inputs"):
            recorded_inputs({"data": {"inputs": bad}}, "m/meta.json")


def test_lines_end_only_at_line_breaks_and_text_must_be_utf8(classify_dir, qa_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "s.txt"
    f.write_bytes("page one\x0cstill one\r\nsix\u2028seven\xc2\x85eight\rlast\n".encode("utf-8"))
    assert read_sentence_lines(f) == [(1, "page one\x0cstill one"), (2, "six\u2028seven\xc2\x85eight"), (3, "last")]
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n"), encoding="utf-8", errors="surrogateescape")
    with pytest.raises(PredictError, match=r"stdin: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        read_sentence_lines("-", stdin)
    monkeypatch.setattr(sys, "stdin", None)
    rc, out, err = _cli(["predict", "--checkpoint", classify_dir, "--text", "-"], capsys, monkeypatch)
    assert (rc, out, err) == (2, "", "widenet: error: stdin is closed: give the sentences in a file, or on stdin\n")
    rc, out, err = _cli(["predict", "--checkpoint", qa_dir, "--question", "caf\udce9?", "--context", "a context"],
                        capsys, monkeypatch)  # bytes on a command line that are not UTF-8 (PEP 383)
    assert (rc, out) == (2, "") and err == "widenet: error: question 1: not UTF-8 text (the byte 0xe9 at character 3)\n"
    with pytest.raises(PredictError, match=r"text 1: not UTF-8 text \(the byte 0xe9 at character 3\)"):
        classify_texts(load_pretrained(classify_dir), ["caf\udce9"], device="cpu")


# --- inputs that do not fit the model -------------------------------------------------------
def test_wrong_kind_of_input_is_one_line(vision_dir, classify_dir, qa_dir, pretrain_dir, images, tmp_path, capsys,
                                         monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("a sentence\n")
    cases = [
        (["--checkpoint", classify_dir, images], "text classifier; it takes sentences"),
        (["--checkpoint", vision_dir, "--text", text], "image classifier; it takes image files"),
        (["--checkpoint", classify_dir, "--question", "q?", "--context", "c"], "text classifier"),
        (["--checkpoint", qa_dir, "--text", text], "question-answering model; it takes --question"),
        (["--checkpoint", pretrain_dir, "--text", text], "fine-tune it first"),
        (["--checkpoint", vision_dir], "nothing to predict on"),
        (["--checkpoint", vision_dir, images, "--text", text], "one kind of input"),
        (["--checkpoint", qa_dir, "--question", "q?"], "--question needs --context"),
        (["--checkpoint", qa_dir, "--context", "c"], "--context needs a --question"),
        (["--checkpoint", tmp_path / "missing", images], "missing"),
    ]
    for argv, expected in cases:
        line = _one_line_error(*_cli(["predict", *argv], capsys, monkeypatch))
        assert line.startswith("widenet: error: ") and expected in line, (argv, line)
    with pytest.raises(PredictError, match="image classifier"):
        classify_texts(load_pretrained(vision_dir), ["x"])
    with pytest.raises(PredictError, match="text classifier"):
        predict_images(load_pretrained(classify_dir), [images])


def _copy_with_huge_weights(folder, tmp_path) -> Path:
    """The export at `folder` with every weight times 1e30: finite, but the activations overflow
    (what `widenet upcycle --noise 1e30` made before noise was capped)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"{folder.parent.name}-huge"
    shutil.copytree(folder, copy)
    save_file({k: v * 1e30 for k, v in load_file(copy / "model.safetensors").items()}, copy / "model.safetensors")
    return copy


def test_nan_scores_are_refused_not_ranked(vision_dir, classify_dir, qa_dir, images, tmp_path, capsys, monkeypatch):
    """A model whose scores come out NaN used to print 'nan%' rankings (images, sentences) and
    arbitrary spans (QA) with exit status 0."""
    broken = [_copy_with_huge_weights(folder, tmp_path) for folder in (vision_dir, classify_dir, qa_dir)]
    (tmp_path / "lines.txt").write_text("a small red fox\n")
    calls = (["predict", "--checkpoint", broken[0], images / "a.png"],
             ["predict", "--checkpoint", broken[1], "--text", tmp_path / "lines.txt"],
             ["predict", "--checkpoint", broken[2], "--question", "what runs?", "--context", "the river runs down"])
    for argv in calls:
        line = _one_line_error(*_cli(argv, capsys, monkeypatch))
        assert "the model's scores are NaN or inf (its weights are finite but so large" in line, line
    pretrained = load_pretrained(vision_dir)  # loading refuses NaN weights; a model changed in memory may hold them
    with torch.no_grad():
        pretrained.model.head.weight[0, 0] = float("nan")
    with pytest.raises(PredictError, match=r"scores are NaN or inf \(1 of its weights are NaN or inf\)"):
        predict_images(pretrained, [images / "a.png"], device="cpu")


def test_class_names_that_do_not_fit_the_head_are_noted_not_used(vision_dir, images, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(vision_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["classes"] = ["cat", "dog"]  # the head has 3 outputs
    (edited / "config.json").write_text(json.dumps(config))
    for names in (["cat", "dog"], ["cat", "dog", "cow", "pig"]):  # fewer or more names than outputs
        config["classes"] = names
        (edited / "config.json").write_text(json.dumps(config))
        with pytest.warns(UserWarning, match=f"{len(names)} class names are saved for the model's 3 outputs; classes "
                                             "are shown by"):
            result = predict_images(load_pretrained(edited), [images / "a.png"], top_k=3, device="cpu")[0]
        assert sorted(c.name for c in result.top) == ["0", "1", "2"]


def test_damaged_image_statistics_are_named(tmp_path, capsys, monkeypatch):
    """A run's meta.json whose std is NaN, zero or of the wrong length gave NaN scores or silently
    different ones; eval printed 'loss NaN' (not JSON) with exit status 0."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", image_size=SIZE, in_channels=1, num_classes=3, dim=16, depth=1, num_heads=2,
                         mlp_dim=32)
    meta = dict(model="vit_tiny", model_config=model.cfg.to_dict(),
                data=dict(name="fashion-mnist", classes=CLASSES, mean=[MEAN], std=[STD]))
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8), "L").save(tmp_path / "x.png")
    for std, named in (([float("nan")], "[nan]"), ([0.0], "[0.0]"), ([0.3, 0.3], "[0.3, 0.3]")):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        meta_file = save_checkpoint(run, 1, model, {}, meta) / "meta.json"
        edited = json.loads(meta_file.read_text())
        edited["data"]["std"] = std  # by hand: json writes NaN, which Python's reader accepts
        meta_file.write_text(json.dumps(edited))
        for argv in (["predict", "--checkpoint", run, tmp_path / "x.png"], ["eval", "--checkpoint", run]):
            line = _one_line_error(*_cli(argv, capsys, monkeypatch))
            assert f"the saved image std {named} should be one finite number per channel (1), each > 0" in line


def test_text_settings_for_images_and_qa_settings_for_sentences_are_refused(vision_dir, classify_dir, qa_dir,
                                                                              images, tmp_path, capsys, monkeypatch):
    """--max-len on an image model and --null-threshold on a sentence classifier used to be ignored."""
    line = _one_line_error(*_cli(["predict", "--checkpoint", vision_dir, images / "a.png", "--max-len", 16],
                                 capsys, monkeypatch))
    assert "--max-len would change nothing for images (text and QA settings); leave it out" in line
    (tmp_path / "lines.txt").write_text("a small red fox\n")
    line = _one_line_error(*_cli(["predict", "--checkpoint", classify_dir, "--text", tmp_path / "lines.txt",
                                  "--null-threshold", 1], capsys, monkeypatch))
    assert "--null-threshold would change nothing for sentence classification (a QA setting)" in line
    line = _one_line_error(*_cli(["predict", "--checkpoint", qa_dir, "--question", "Where?", "--context",
                                  "In the box.", "--top-k", 3], capsys, monkeypatch))
    assert "--top-k would change nothing for questions (one answer each)" in line


def test_a_tokenizer_that_is_not_the_models_is_refused_not_used(classify_dir, tokenizer_file, tmp_path, capsys,
                                                                monkeypatch):
    # Another tokenizer of the same size copied over the model's: predict would encode with the wrong ids.
    # (Its texts, the model's spelled backwards, give other pieces: the same texts give the same tokenizer.)
    other = train_tokenizer([text[::-1] for text in TEXTS], vocab_size=120, min_frequency=1)
    assert other.get_vocab_size() == tokenizer_file[1].get_vocab_size()
    assert other.get_vocab() != tokenizer_file[1].get_vocab()
    folder = shutil.copytree(classify_dir, tmp_path / "model")
    save_tokenizer(other, folder / "tokenizer.json")
    (tmp_path / "in.txt").write_text("the lazy dog\n")
    line = _one_line_error(*_cli(["predict", "--checkpoint", folder, "--text", tmp_path / "in.txt"], capsys,
                                 monkeypatch))
    assert "is not the one the model" in line and "(the vocabularies differ)" in line
    # An export of it leaves the wrong tokenizer behind (and says so) instead of recording its fingerprint.
    rc, out, err = _cli(["export", folder, "--to", tmp_path / "shipped"], capsys, monkeypatch)
    assert rc == 0, err
    assert "the tokenizer was not kept" in out + err
    assert not (tmp_path / "shipped" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "shipped" / "config.json").read_text())["tokenizer"] is None
    # A config.json whose tokenizer record is not one (hand-edited): named, not a traceback.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tokenizer="abc")))
    line = _one_line_error(*_cli(["predict", "--checkpoint", folder, "--text", tmp_path / "in.txt"], capsys,
                                 monkeypatch))
    assert "config.json: 'tokenizer' must be {fingerprint, vocab_size}" in line
