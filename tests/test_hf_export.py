"""`widenet export --format hf`: Hugging Face checkpoint folders that transformers' own classes load
and compute exactly as widenet does (transformers is the oracle), which `widenet import` reads back."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import widenet
from widenet import create_model
from widenet.data.images import FASHION_MNIST_CLASSES
from widenet.data.images.folder import decode_image
from widenet.data.text.tokenizer import train_tokenizer
import widenet.inference
from widenet.models.hf_export import HFExportError, hf_checkpoint
from widenet.train.exported import write_export

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(dim=32, depth=2, num_heads=2, mlp_dim=64)
CLASSES = [f"class {i}" for i in range(10)]


def _randomised(model):
    """Weights far from their init (zero heads, unit norms), so that a tensor mapped wrongly shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _hf_model(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def test_a_vit_loads_in_transformers_with_its_image_processor(tmp_path):
    """A grey ViT is written as an RGB one (luma weights on its patch kernel), since transformers'
    pipelines convert every image to RGB: on a grey image it computes exactly the grey model's
    logits, on a colour one the grey model's on the image's grey conversion (to Pillow's rounding)."""
    from PIL import Image

    model = _randomised(create_model("vit_tiny", **TINY))
    stats = dict(mean=[0.3], std=[0.2])
    write_export(tmp_path / "hf", model, model_name="vit_tiny", classes=CLASSES, image_stats=stats, hf=True)
    theirs = _hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == "ViTForImageClassification" and theirs.config.id2label[3] == "class 3"
    assert theirs.config.num_channels == 3
    rng = np.random.RandomState(0)
    grey, colour = tmp_path / "g.png", tmp_path / "c.png"
    Image.fromarray((rng.rand(28, 28) * 255).astype("uint8"), "L").save(grey)
    Image.fromarray((rng.rand(28, 28, 3) * 255).astype("uint8"), "RGB").save(colour)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    for image, atol in ((grey, 2e-5), (colour, 2e-2)):  # as they are: the processor converts to RGB (it refused grey)
        pixels = processor(images=Image.open(image), return_tensors="pt").pixel_values
        ours = (decode_image(image, 28, 1).float() / 255 - 0.3) / 0.2  # what widenet's predict feeds the model
        with torch.no_grad():
            torch.testing.assert_close(theirs(pixel_values=pixels).logits, model(ours[None]).logits, rtol=0, atol=atol)
    rgba = processor(images=Image.open(grey).convert("RGBA"), return_tensors="pt").pixel_values
    assert torch.equal(rgba, processor(images=Image.open(grey), return_tensors="pt").pixel_values)
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "hf"), top_k=3)
    mine = widenet.inference.predict_images(widenet.load_pretrained(tmp_path / "hf"), [grey], top_k=3, device="cpu")
    assert [(r["label"], round(r["score"], 5)) for r in classify(str(grey))] == [
        (c.name, round(c.probability, 5)) for c in mine[0].top]
    back = widenet.load_pretrained(tmp_path / "hf")  # the import reads the folder back: the same function
    assert back.classes == CLASSES and back.mean == (0.3,) * 3 and back.std == (0.2,) * 3
    as_rgb, as_grey = ((decode_image(grey, 28, channels).float() / 255 - 0.3) / 0.2 for channels in (3, 1))
    with torch.no_grad():
        torch.testing.assert_close(back.model(as_rgb[None]).logits, model(as_grey[None]).logits, rtol=0, atol=2e-5)


def test_an_rgb_vit_round_trips_exactly(tmp_path):
    model = _randomised(create_model("vit_tiny", **TINY, in_channels=3))
    write_export(tmp_path / "hf", model, model_name="vit_tiny", image_stats=dict(mean=[0.4] * 3, std=[0.3] * 3),
                 hf=True)
    assert _hf_model(tmp_path / "hf").config.num_channels == 3
    for channels, converts in ((3, True), (4, False)):  # four channels are not RGB: nothing to convert to
        folder = tmp_path / f"c{channels}"
        write_export(folder, create_model("vit_tiny", **TINY, in_channels=channels), model_name="vit_tiny",
                     image_stats=dict(mean=[0.4] * channels, std=[0.3] * channels), hf=True)
        assert json.loads((folder / "preprocessor_config.json").read_text())["do_convert_rgb"] is converts
    mine = model.state_dict()
    back = widenet.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(back[k], mine[k]) for k in mine)


@pytest.mark.parametrize("name,task,tied", [
    ("albert_text_tiny", "pretrain", True), ("albert_text_tiny", "pretrain", False),
    ("albert_text_tiny", "classify", True), ("albert_text_tiny", "qa", True),
    ("bert_text_tiny", "pretrain", True), ("bert_text_tiny", "classify", True)])
def test_a_post_norm_text_model_computes_what_transformers_albert_does(tmp_path, name, task, tied):
    """ALBERT-style (one shared layer) and unshared (a BERT with the factorized embedding: an ALBERT
    with a layer group per block) text models."""
    model = _randomised(create_model(name, **TINY, vocab_size=60, embedding_size=16, norm_position="post",
                                     task=task, num_labels=3, tie_word_embeddings=tied, activation="gelu_tanh"))
    classes = ["neg", "neutral", "pos"] if task == "classify" else None
    write_export(tmp_path / "hf", model, model_name=name, classes=classes, hf=True)
    theirs = _hf_model(tmp_path / "hf")
    assert theirs.config.num_hidden_groups == (1 if name == "albert_text_tiny" else 2)
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 12, dtype=torch.long)
    keep[1, 8:] = 0
    types = (torch.arange(12) >= 6).long().expand(2, 12)
    with torch.no_grad():
        ours = model(ids, types, attention_mask=keep, masked_positions=keep.bool() if task == "pretrain" else None)
        out = theirs(input_ids=ids, attention_mask=keep, token_type_ids=types)
    if task == "pretrain":
        assert type(theirs).__name__ == "AlbertForPreTraining"
        torch.testing.assert_close(out.prediction_logits[keep.bool()], ours.mlm_logits, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.sop_logits, ours.sop_logits, rtol=0, atol=2e-5)
    elif task == "classify":
        assert theirs.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
        torch.testing.assert_close(out.logits, ours.logits, rtol=0, atol=2e-5)
    else:  # widenet masks padding positions out of the span scores; transformers leaves them
        real = keep.bool()
        torch.testing.assert_close(out.start_logits[real], ours.start_logits[real], rtol=0, atol=2e-5)
        torch.testing.assert_close(out.end_logits[real], ours.end_logits[real], rtol=0, atol=2e-5)
    back = widenet.from_pretrained(tmp_path / "hf").state_dict()
    for key, value in model.state_dict().items():
        if not (task == "qa" and key.startswith("backbone.pooler.")):  # a QA model has no pooler in transformers
            assert torch.equal(back[key], value), key


def test_the_tokenizer_goes_with_a_text_model(tmp_path):
    texts = ["The cat sat on the mat.", "A dog ran in the park!", "Cats and dogs are friends."] * 5
    tokenizer = train_tokenizer(texts, vocab_size=80, min_frequency=1)
    model = create_model("albert_text_tiny", **TINY, vocab_size=tokenizer.get_vocab_size(), norm_position="post")
    write_export(tmp_path / "hf", model, model_name="albert_text_tiny", tokenizer=tokenizer, hf=True)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    encoded = theirs("the cat ran", "dogs sat on a mat")
    ours = tokenizer.encode("the cat ran", "dogs sat on a mat")
    assert encoded["input_ids"] == ours.ids and encoded["token_type_ids"] == ours.type_ids
    assert theirs.pad_token_id == 0 and theirs.mask_token == "[MASK]" and theirs.model_max_length == 128
    assert widenet.load_pretrained(tmp_path / "hf").tokenizer is not None
    # a fine-tuned model's input settings go with it: predict on the folder cut texts as the run did
    classifier = create_model("albert_text_tiny", **TINY, vocab_size=tokenizer.get_vocab_size(),
                              norm_position="post", task="classify", num_labels=2)
    inputs = {"pairs": False, "max_len": 24}
    write_export(tmp_path / "tuned", classifier, model_name="albert_text_tiny", tokenizer=tokenizer, inputs=inputs,
                 hf=True)
    assert widenet.load_pretrained(tmp_path / "tuned").inputs == inputs
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "tuned").model_max_length == 24
    assert _hf_model(tmp_path / "tuned").config.widenet_inputs == inputs  # an extra key transformers keeps


@pytest.mark.parametrize("name,settings,named", [
    ("widenet_tiny", {}, "mixture-of-experts blocks (moe_blocks=all), which ViT has not"),
    ("albert_tiny", {}, "it shares weights between blocks; ViT gives every block its own"),
    ("vit_tiny", dict(stem="conv"), "stem='conv': ViT has only stem='patch'"),
    ("vit_tiny", dict(pool="avg"), "pool='avg': ViT has only pool='token'"),
    ("vit_tiny", dict(representation_size=16), "a pre-logits layer"),
    ("albert_text_tiny", {}, "its blocks are pre-norm and ALBERT's post-norm (--set norm_position=post trains one)"),
    ("albert_text_tiny", dict(norm_position="post", share_norms=False), "it shares attention, FFN but not all three "
                                                                       "of attention, FFN and norms"),
    ("widenet_text_tiny", dict(norm_position="post"), "mixture-of-experts"),
])
def test_models_transformers_has_no_class_for_are_refused_by_name(name, settings, named):
    model = create_model(name, **TINY, **settings)
    with pytest.raises(HFExportError, match="no Hugging Face model computes this one: " + ".*" + named.replace(
            "(", r"\(").replace(")", r"\)")):
        hf_checkpoint(model)


def test_the_export_command_writes_and_replaces_hf_folders(tmp_path, fmnist_dir, tiny_set_args, cli):
    run = tmp_path / "run"
    assert cli(["train", "--model", "widenet_tiny", "--data-dir", fmnist_dir, "--out", run, "--max-steps", "1",
                "--batch-size", "16", *tiny_set_args])[0] == 0
    rc, out, err = cli(["export", run, "--to", tmp_path / "hf", "--format", "hf"])
    assert rc == 2 and err.count("\n") == 1 and "mixture-of-experts blocks" in err and not (tmp_path / "hf").exists()
    vit = tmp_path / "vit"
    assert cli(["train", "--model", "vit_tiny", "--data-dir", fmnist_dir, "--out", vit, "--max-steps", "1",
                "--batch-size", "16", *tiny_set_args])[0] == 0
    rc, out, err = cli(["export", vit, "--to", tmp_path / "hf", "--format", "hf"])
    assert rc == 0 and "ViTForImageClassification.from_pretrained" in out and "squashes" in out, (out, err)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                   "preprocessor_config.json"]
    (tmp_path / "hf" / "README.md").write_text("my card")
    rc, out, err = cli(["export", vit, "--to", tmp_path / "hf", "--format", "hf"])
    assert rc == 2 and "already holds a model (a widenet or Hugging Face folder); pass --overwrite" in err
    assert cli(["export", vit, "--to", tmp_path / "hf", "--overwrite"])[0] == 0  # the widenet format replaces it
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["format"] == "widenet-model"
    with torch.no_grad():
        images = torch.randn(2, 1, 28, 28)  # grey, and as RGB for the exported model (a grey image's R = G = B)
        torch.testing.assert_close(_hf_model_from(vit, tmp_path, cli)(pixel_values=images.expand(2, 3, 28, 28)).logits,
                                   widenet.from_pretrained(vit)(images).logits, rtol=0, atol=2e-5)


def test_a_grey_models_hf_export_is_evaluated_and_fine_tuned_on_its_grey_data(tmp_path, fmnist_dir, tiny_set_args,
                                                                              cli):
    """Written as RGB, a Fashion-MNIST model's export was refused by eval and --init on Fashion-MNIST
    (3 channels against the data's 1): the grey images are now read as RGB ones, as Pillow reads them."""
    vit = tmp_path / "vit"
    assert cli(["train", "--model", "vit_tiny", "--data-dir", fmnist_dir, "--out", vit, "--max-steps", "3",
                "--batch-size", "16", *tiny_set_args])[0] == 0
    assert cli(["export", vit, "--to", tmp_path / "hf", "--format", "hf"])[0] == 0
    scores = []
    for model in (vit, tmp_path / "hf"):
        rc, out, err = cli(["eval", "--checkpoint", model, "--data", "fashion-mnist", "--data-dir", fmnist_dir,
                            "--json"])
        assert rc == 0, err
        scores.append(json.loads(out))
    assert scores[0]["examples"] == scores[1]["examples"] == 64
    assert scores[1]["accuracy"] == scores[0]["accuracy"] and scores[1]["loss"] == pytest.approx(scores[0]["loss"],
                                                                                                 abs=1e-5)
    tuned = tmp_path / "tuned"
    rc, out, err = cli(["train", "--init", tmp_path / "hf", "--data-dir", fmnist_dir, "--out", tuned, "--max-steps",
                        "1", "--batch-size", "16"])
    assert rc == 0, err
    assert widenet.from_pretrained(tuned).cfg.in_channels == 3 and "head starts new" not in out  # 10 classes


def test_eval_of_a_model_saved_without_statistics_normalises_as_predict_and_transformers_do(tmp_path, fmnist_dir,
                                                                                            cli):
    """eval normalised such a model with the test set's own statistics, predict and the Hugging Face
    export with ViT's 0.5: one model, two answers. Now all take 0.5, with a note."""
    model = _randomised(create_model("vit_tiny", **TINY, in_channels=1))
    with pytest.warns(UserWarning, match="no image mean / std saved"):
        widenet.save_pretrained(model, tmp_path / "bare_hf", classes=FASHION_MNIST_CLASSES, format="hf")
    widenet.save_pretrained(model, tmp_path / "bare", classes=FASHION_MNIST_CLASSES)
    widenet.save_pretrained(model, tmp_path / "half", classes=FASHION_MNIST_CLASSES, mean=[0.5], std=[0.5])
    scores = {}
    for name in ("bare", "bare_hf", "half"):
        rc, out, err = cli(["eval", "--checkpoint", tmp_path / name, "--data", "fashion-mnist", "--data-dir", fmnist_dir,
                            "--json"])
        assert rc == 0, err
        assert ("no image mean / std saved with the model; normalising with mean 0.5 and std 0.5" in err) == (
            name == "bare"), (name, err)  # the export's preprocessor_config.json holds the 0.5
        scores[name] = json.loads(out)
    for name in ("bare", "bare_hf"):
        assert scores[name]["accuracy"] == scores["half"]["accuracy"], name
        assert scores[name]["loss"] == pytest.approx(scores["half"]["loss"], abs=1e-5), name


def test_overwriting_a_downloaded_folder_leaves_none_of_its_model_files(tmp_path, cli):
    """A Hugging Face download's shards, their index and added_tokens.json were carried into the new
    folder as if they were the user's: AutoTokenizer then read the old added tokens (wrong ids, no
    error) beside the new model. The user's own files stay."""
    download = tmp_path / "download"
    config = transformers.AlbertConfig(vocab_size=60, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)
    transformers.AlbertModel(config).save_pretrained(download, max_shard_size="20KB")
    (download / "added_tokens.json").write_text('{"zzzq": 60}')
    (download / "spiece.model").write_bytes(b"a sentencepiece model")
    (download / "README.md").write_text("my notes")
    assert len(list(download.glob("model-*-of-*.safetensors"))) > 1
    model = create_model("vit_tiny", **TINY)
    write_export(tmp_path / "vit", model, model_name="vit_tiny")
    rc, out, err = cli(["export", tmp_path / "vit", "--to", download, "--format", "hf"])
    assert rc == 2 and "already holds a model (a widenet or Hugging Face folder); pass --overwrite" in err
    assert cli(["export", tmp_path / "vit", "--to", download, "--format", "hf", "--overwrite"])[0] == 0
    assert sorted(p.name for p in download.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                         "preprocessor_config.json"]
    assert (download / "README.md").read_text() == "my notes"
    # in a widenet folder only widenet's three files are the model's: a user's vocab.txt or .bin stays
    for name in ("vocab.txt", "pytorch_model_before.bin", "notes.safetensors.index.json"):
        (tmp_path / "vit" / name).write_text("mine")
    widenet.save_pretrained(model, tmp_path / "vit", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == [
        "config.json", "model.safetensors", "notes.safetensors.index.json", "pytorch_model_before.bin", "vocab.txt"]


def _hf_model_from(run, tmp_path, cli):
    assert cli(["export", run, "--to", tmp_path / "again", "--format", "hf"])[0] == 0
    return _hf_model(tmp_path / "again")


def test_save_pretrained_writes_either_format_from_a_model_or_a_loaded_one(tmp_path, fmnist_dir, tiny_set_args, cli):
    run = tmp_path / "run"
    assert cli(["train", "--model", "vit_tiny", "--data-dir", fmnist_dir, "--out", run, "--max-steps", "1",
                "--batch-size", "16", *tiny_set_args])[0] == 0
    loaded = widenet.load_pretrained(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: its statistics are saved
        widenet.save_pretrained(loaded, tmp_path / "hf", format="hf")  # its classes and statistics go with it
    with pytest.warns(UserWarning, match=r"no image mean / std saved with the model: .* mean 0\.5 and std 0\.5"):
        widenet.save_pretrained(loaded.model, tmp_path / "bare", format="hf")  # a model alone: ViT's 0.5 was silent
    assert json.loads((tmp_path / "bare" / "preprocessor_config.json").read_text())["image_std"] == [0.5] * 3
    theirs = _hf_model(tmp_path / "hf")
    assert [theirs.config.id2label[i] for i in range(10)] == loaded.classes
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(loaded.mean) * 3 and processor["image_std"] == list(loaded.std) * 3
    wide = widenet.upcycle(loaded.model, num_experts=2)
    widenet.save_pretrained(wide, tmp_path / "wide", classes=loaded.classes, mean=(0.5,), std=(0.25,))
    back = widenet.load_pretrained(tmp_path / "wide")
    assert back.classes == loaded.classes and back.mean == (0.5,) and back.std == (0.25,)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back.model(images).logits, wide.eval()(images).logits, rtol=0, atol=0)
    with pytest.raises(HFExportError, match="mixture-of-experts"):
        widenet.save_pretrained(wide, tmp_path / "no", format="hf")
    with pytest.raises(ValueError, match="format must be 'widenet' or 'hf', got 'onnx'"):
        widenet.save_pretrained(wide, tmp_path / "no", format="onnx")
    with pytest.raises(TypeError, match="got Linear"):
        widenet.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "no")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        widenet.save_pretrained(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="2 class names for a model with 10 classes"):  # were saved, and shown
        widenet.save_pretrained(wide, tmp_path / "no", classes=["cat", "dog"])
    text = create_model("albert_text_tiny", **TINY, norm_position="post")
    for form in ("widenet", "hf"):
        with pytest.raises(ValueError, match="2 class names for a model with no classifier \\(task 'pretrain'\\)"):
            widenet.save_pretrained(text, tmp_path / "no", classes=["a", "b"], format=form)
    assert not (tmp_path / "no").exists()


def test_what_goes_beside_the_weights_is_checked_before_anything_is_written(tmp_path):
    """save_pretrained wrote folders that loading then refused (three means for a grey model, std 0,
    NaN), dropped a mean given without its std, stored image statistics with a text model, and a
    bare float gave a TypeError traceback; a loaded model could not be saved back where it came from."""
    vit = create_model("vit_tiny", **TINY)
    text = create_model("albert_text_tiny", **TINY, norm_position="post", vocab_size=50)
    cases = [
        (vit, dict(mean=(0.5,)), "give the image mean and std together, got mean"),
        (vit, dict(mean=(0.1, 0.2, 0.3), std=(0.5,)), r"mean \[0.1, 0.2, 0.3\] should be one finite number per "
                                                       r"channel \(1\)"),
        (vit, dict(mean=(0.5,), std=(0.0,)), r"std \[0.0\] should be one finite number per channel \(1\), each > 0"),
        (vit, dict(mean=(float("nan"),), std=(0.5,)), r"mean \[nan\] should be one finite number"),
        (vit, dict(mean=0.5, std=0.5), "mean 0.5 should be one finite number per channel"),
        (vit, dict(classes=list(range(10))), "class names must be text"),
        (create_model("vit_tiny", **TINY, num_classes=3), dict(classes="abc"), "class names must be text"),
        (text, dict(mean=(0.5,), std=(0.5,)), "image mean and std are for image models; this is a text model"),
        (text, dict(tokenizer=train_tokenizer(["a b c d e f g h"] * 20 + [f"w{i}" for i in range(200)],
                                              vocab_size=120, min_frequency=1)),
         r"the tokenizer has \d+ pieces and the model's vocabulary 50 ids"),
    ]
    for model, settings, message in cases:
        for form in ("widenet", "hf"):
            with pytest.raises(ValueError, match=message):
                widenet.save_pretrained(model, tmp_path / "no", format=form, **settings)
            assert not (tmp_path / "no").exists()
    widenet.save_pretrained(vit, tmp_path / "m", mean=[0.2], std=[0.4], classes=CLASSES)
    loaded = widenet.load_pretrained(tmp_path / "m")
    with torch.no_grad():
        loaded.model.head.bias.fill_(1.5)
    widenet.save_pretrained(loaded, tmp_path / "m", overwrite=True)  # back where it came from
    again = widenet.load_pretrained(tmp_path / "m")
    assert float(again.model.head.bias[0]) == 1.5 and again.classes == CLASSES and again.mean == (0.2,)
    assert again.model_name == "vit_tiny"  # create_model's name, kept


def test_eval_names_a_text_model_as_what_it_is_and_model_commands_take_out_or_to(tmp_path, cli):
    """eval called a Hugging Face text folder "a text run" and sent the user to its metrics.jsonl;
    import and upcycle took --out where export took --to: each now takes both."""
    text = create_model("albert_text_tiny", **TINY, norm_position="post")
    write_export(tmp_path / "hf", text, model_name="albert_text_tiny", hf=True)
    rc, out, err = cli(["eval", "--checkpoint", tmp_path / "hf"])
    assert rc == 2 and err.strip().endswith("a text model; widenet eval evaluates image classifiers"), err
    assert "metrics.jsonl" not in err
    assert cli(["import", tmp_path / "hf", "--to", tmp_path / "imported"])[0] == 0
    qa = create_model("albert_text_tiny", **TINY, norm_position="post", task="qa")
    write_export(tmp_path / "qa", qa, model_name="albert_text_tiny")
    rc, out, err = cli(["export", tmp_path / "qa", "--to", tmp_path / "qa-hf", "--format", "hf"])
    assert rc == 0 and "note: AlbertForQuestionAnswering has no pooler" in out, (out, err)
    assert cli(["export", tmp_path / "imported", "--out", tmp_path / "again"])[0] == 0
    vit = create_model("vit_tiny", **TINY)
    write_export(tmp_path / "vit", vit, model_name="vit_tiny")
    assert cli(["upcycle", "--from", tmp_path / "vit", "--experts", "2", "--to", tmp_path / "wide"])[0] == 0
    assert widenet.load_pretrained(tmp_path / "wide").model.cfg.encoder.moe.num_experts == 2


def test_an_untrained_head_stays_marked_through_either_format(tmp_path):
    """A ViTModel (no classifier) imports with a random head that predict warns about; exported to a
    Hugging Face folder or saved again, it lost that mark and was shown as if trained."""
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4, num_channels=3)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    loaded = widenet.load_pretrained(tmp_path / "bare")
    assert loaded.untrained_head == "the classifier"
    with pytest.warns(UserWarning, match="no image mean / std saved with the model"):  # (a folder without its
        widenet.save_pretrained(loaded, tmp_path / "hf", format="hf")  # preprocessor_config.json)
    widenet.save_pretrained(loaded, tmp_path / "widenet", format="widenet")
    for form in ("hf", "widenet"):
        assert widenet.load_pretrained(tmp_path / form).untrained_head == "the classifier", form


@pytest.mark.parametrize("name", ["vit_tiny", "albert_text_tiny"])
def test_a_bf16_model_is_written_in_float32_so_transformers_computes_as_widenet_does(tmp_path, name):
    """transformers loads a checkpoint in the dtype its file holds (dtype="auto"), widenet in float32:
    a bf16 model's weights written as they were computed in bf16 there (logits ~5e-3 apart here)."""
    from safetensors.torch import load_file

    text = name.startswith("albert")
    settings = dict(vocab_size=60, embedding_size=16, norm_position="post", task="classify", num_labels=3)
    model = _randomised(create_model(name, **TINY, **(settings if text else {}))).to(torch.bfloat16)
    widenet.save_pretrained(model, tmp_path / "hf", format="hf", **({} if text else dict(mean=(0.3,), std=(0.2,))))
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.float32}
    theirs, back, model = _hf_model(tmp_path / "hf"), widenet.from_pretrained(tmp_path / "hf"), model.float()
    assert next(theirs.parameters()).dtype == torch.float32
    generator = torch.Generator().manual_seed(1)
    if text:
        ids = torch.randint(5, 60, (2, 12), generator=generator)
        inputs, ours, hf_inputs = (ids,), (ids,), dict(input_ids=ids)
    else:  # a grey model: written as an RGB one (GREY_AS_RGB), given a grey image as RGB
        grey = torch.randn(2, 1, model.cfg.image_size, model.cfg.image_size, generator=generator)
        inputs, ours, hf_inputs = (grey,), (grey.expand(-1, 3, -1, -1),), dict(pixel_values=grey.expand(-1, 3, -1, -1))
    with torch.no_grad():
        logits = theirs(**hf_inputs).logits
        torch.testing.assert_close(logits, model(*inputs).logits, rtol=0, atol=2e-5)  # the bf16 weights in float32
        torch.testing.assert_close(logits, back(*ours).logits, rtol=0, atol=2e-5)  # widenet's read of the folder
