"""Image folders laid out as datasets ship them: train/ plus test/, val/ (ImageNet's) or validation/,
decoded by default at the model's own image size."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from widenet.cli import main
from widenet.data.images import (TEST_SPLIT_FOLDERS, DatasetError, DatasetNotFoundError, load_dataset,
                                  load_image_folder)
from widenet.models.registry import model_config
from widenet.train.checkpoint import load_checkpoint
from widenet.train.config import TrainConfig
from widenet.train.images import folder_image_size, load_data

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ("cat", "dog")


def make_folder(root: Path, splits: dict[str, int]) -> Path:
    """root/<split>/<class>/<i>.png: `splits[split]` 8x8 images per class, one brightness per class."""
    for split, count in splits.items():
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("L", (8, 8), 60 + 120 * k + 3 * i).save(root / split / name / f"{i}.png")
    return root


def _config(root: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(data="folder", data_dir=str(root), out=str(out), batch_size=4, max_steps=1, device="cpu",
                    model_overrides=dict(dim=32, depth=2, num_heads=2, mlp_dim=64))
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize("held_out", ["test", "val", "validation"])
def test_each_layout_gives_train_and_test_splits(tmp_path, held_out):
    root = make_folder(tmp_path / "data", {"train": 3, held_out: 2})
    test = load_dataset("folder", "test", root, image_size=8)
    assert len(test) == 4 and test.classes == list(CLASSES) and test.name == f"folder-data-{held_out}"
    train_set, test_set = load_data(_config(root, tmp_path / "run", image_size=8))
    assert (len(train_set), len(test_set)) == (6, 4)
    assert train_set.classes == test_set.classes == list(CLASSES)
    assert sorted(test_set.labels.tolist()) == [0, 0, 1, 1]


def test_test_is_preferred_over_val_over_validation(tmp_path):
    assert TEST_SPLIT_FOLDERS == ("test", "val", "validation")
    root = make_folder(tmp_path / "data", {"train": 1, "test": 1, "val": 2, "validation": 3})
    assert len(load_image_folder(root, "test", image_size=8)) == 2  # test/: one per class
    for name in ("test", "val"):
        for path in (root / name).rglob("*.png"):
            path.unlink()
        for folder in sorted((root / name).rglob("*"), reverse=True):
            folder.rmdir()
        (root / name).rmdir()
        expected = {"test": 4, "val": 6}[name]  # then val/ (2 per class), then validation/ (3 per class)
        assert len(load_image_folder(root, "test", image_size=8)) == expected
    # an explicit split is read from its own folder only
    assert len(load_image_folder(root, "validation", image_size=8)) == 6
    with pytest.raises(DatasetNotFoundError, match=r"data has no val/ \(it holds train/, validation/\); the folder to "
                                                   r"pass holds val/<class>/<image>$"):
        load_image_folder(root, "val", image_size=8)


def test_missing_test_split_names_the_folders_looked_for(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"train": 2, "valid": 2})
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("folder", "test", root, image_size=8)
    message = str(caught.value)
    assert str(root) in message and "test/, val/, validation/" in message
    assert main(["train", "--data", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"widenet: error: {message}"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_size_defaults_to_the_models(tmp_path):
    root = make_folder(tmp_path / "data", {"train": 2, "val": 1})
    size = model_config("widenet_tiny").image_size
    assert size != 8  # the files' own size: decoding must have resized them
    cfg = _config(root, tmp_path / "run")
    assert cfg.image_size is None and folder_image_size(cfg) == size
    train_set, test_set = load_data(cfg)
    assert train_set.image_size == test_set.image_size == size
    assert folder_image_size(_config(root, tmp_path / "run", image_size=12)) == 12
    overridden = _config(root, tmp_path / "run", model_overrides=dict(image_size=16))
    assert load_data(overridden)[0].image_size == 16


def test_train_and_eval_on_an_imagenet_layout_without_image_size(tmp_path, tiny_set_args, capsys):
    root = make_folder(tmp_path / "data", {"train": 4, "val": 2})
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", "--data", "folder", "--data-dir", root, "--out", out, "--batch-size", 4,
                                  "--max-steps", 2, "--device", "cpu", *tiny_set_args]]) == 0, capsys.readouterr().err
    assert "test accuracy" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt.meta["model_config"]["image_size"] == model_config("widenet_tiny").image_size
    assert ckpt.meta["train_config"]["image_size"] is None and ckpt.meta["data"]["classes"] == list(CLASSES)
    assert "resize" not in ckpt.meta["data"]  # decoded as predict decodes files: nothing to follow
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--json"]) == 0
    report = capsys.readouterr().out
    assert '"examples": 4' in report and '"data": "folder"' in report
    # the same run's eval on a copy laid out with validation/ instead
    other = make_folder(tmp_path / "other", {"train": 1, "validation": 3})
    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(other), "--device", "cpu", "--json"]) == 0
    assert '"examples": 6' in capsys.readouterr().out


def test_a_grey_model_reads_a_folder_in_grey_and_init_decides_the_size(tmp_path, fmnist_dir, tiny_set_args, capsys):
    """A folder was always decoded to RGB at the preset's size: a one-channel model (Fashion-MNIST's)
    could not be fine-tuned with --init or evaluated on one."""
    grey = tmp_path / "grey"
    argv = ["train", "--data-dir", fmnist_dir, "--out", grey, "--batch-size", 32, "--max-steps", 1, "--device", "cpu",
            *tiny_set_args, "--set", "image_size=32", "--image-size", 32]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    root = make_folder(tmp_path / "data", {"train": 4, "test": 2})
    cfg = _config(root, tmp_path / "run", init=str(grey), model_overrides={})
    from widenet.train.images import image_channels, read_init

    source = read_init(cfg)
    assert (image_channels(cfg, source), folder_image_size(cfg, source)) == (1, 32)  # the init model's
    assert image_channels(_config(root, tmp_path / "run")) is None  # a preset: the data's own, a folder's RGB
    assert load_data(_config(root, tmp_path / "run"))[0].channels == 3
    assert image_channels(_config(root, tmp_path / "run", model_overrides=dict(in_channels=1))) == 1
    with pytest.raises(ValueError, match=r"--set in_channels=4: images are read as grey \(1\) or RGB \(3\)"):
        image_channels(_config(root, tmp_path / "run", model_overrides=dict(in_channels=4)))
    out = tmp_path / "tuned"
    assert main([str(a) for a in ["train", "--init", grey, "--data", "folder", "--data-dir", root, "--out", out,
                                  "--batch-size", 4, "--max-steps", 1, "--device", "cpu", "--image-size", 32]]) == 0, \
        capsys.readouterr()
    assert "resize" in load_checkpoint(grey).meta["data"]  # Fashion-MNIST resized by resize_dataset
    assert "resize" not in load_checkpoint(out).meta["data"]  # a folder decoded at 32 px as predict decodes
    tuned = load_checkpoint(out).meta["model_config"]
    assert (tuned["in_channels"], tuned["image_size"], tuned["num_classes"]) == (1, 32, 2)
    note = "note: the --init model classifies 10 classes, the data has 2: its head starts new"
    assert note in capsys.readouterr().out
    # a model setting that contradicts the --init model's channels is named before any data are read
    for data in (["--data-dir", fmnist_dir], ["--data", "folder", "--data-dir", root]):
        assert main([str(a) for a in ["train", "--init", grey, *data, "--out", tmp_path / "no", "--set",
                                      "in_channels=3", "--image-size", 32]]) == 2
        err = capsys.readouterr().err
        assert f"--set in_channels=3: the --init model {grey}" in err and "takes 1-channel images" in err, err
        assert err.count("\n") == 1 and not (tmp_path / "no").exists()
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--json"]) == 0
    assert '"examples": 4' in capsys.readouterr().out


def test_init_onto_other_classes_of_the_same_count_is_noted(tmp_path, capsys):
    """--init kept a head of the same class count without a word when the data's classes were others:
    output 0 had meant 'cat' and now stood for 'bird'."""
    make_folder(tmp_path / "pets", {"train": 4, "test": 2})
    make_folder(tmp_path / "birds", {"train": 4, "test": 2})
    for split in ("train", "test"):
        for old, new in zip(CLASSES, ("bird", "fish")):
            (tmp_path / "birds" / split / old).rename(tmp_path / "birds" / split / new)
    common = ["--data", "folder", "--batch-size", 4, "--max-steps", 1, "--device", "cpu", "--set", "dim=32",
              "--set", "depth=2", "--set", "num_heads=2", "--set", "mlp_dim=64", "--image-size", 8, "--set",
              "patch_size=4"]
    assert main([str(a) for a in ["train", "--data-dir", tmp_path / "pets", "--out", tmp_path / "a", *common]]) == 0
    capsys.readouterr()
    note = ("note: the --init model's 2 classes are the data's under other names (its: cat, dog; the data's: bird, fish): "
            "its head is kept, output i now standing for the data's class i")
    for data, noted in ((tmp_path / "birds", True), (tmp_path / "pets", False)):
        argv = ["train", "--init", tmp_path / "a", "--data-dir", data, "--out", tmp_path / f"from-{data.name}",
                *common[:-4]]
        assert main([str(a) for a in argv]) == 0
        out = capsys.readouterr().out
        assert (note in out) is noted and ("note: the --init model" in out) is noted, out
    from types import SimpleNamespace

    from widenet.train.images import init_head_note

    ten = [f"c{i}" for i in range(10)]
    source = SimpleNamespace(meta={"model_config": {"num_classes": 10}}, classes=ten)
    assert init_head_note(source, ten[::-1]) == (
        "note: the --init model's 10 classes are the data's in another order (its: c0, c1, c2, c3, c4, ... and 5 "
        "more; the data's: c9, c8, c7, c6, c5, ... and 5 more): its head is kept, output i now standing for the data's class i")
    assert init_head_note(source, ten) is None and init_head_note(None, ten) is None
    assert init_head_note(SimpleNamespace(meta=source.meta, classes=None), ten[::-1]) is None  # names unknown
    assert init_head_note(SimpleNamespace(meta={"model_config": {}}, classes=ten), ten[:3]) is None  # count unknown
    assert init_head_note(source, ten[:3]).endswith("the data has 3: its head starts new")


def test_a_run_knows_its_folder_wherever_it_is_evaluated_or_resumed(tmp_path, tiny_set_args, capsys, monkeypatch):
    """A relative --data-dir was recorded as typed: eval from another directory read whatever folder
    had that name there. A resume after images were added trained on them (and on new statistics)."""
    make_folder(tmp_path / "data", {"train": 4, "test": 2})
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in ["train", "--data", "folder", "--data-dir", "data", "--out", "run", "--batch-size", 4,
                             "--image-size", 8, "--device", "cpu", *tiny_set_args, "--set", "patch_size=4"]]
    assert main(args + ["--max-steps", "1"]) == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run").meta["train_config"]["data_dir"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    make_folder(elsewhere / "data", {"train": 1, "test": 5})  # a folder of the same name: not the run's
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert f"on 4 folder test images (from {tmp_path / 'data'})" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    Image.new("L", (8, 8), 10).save(tmp_path / "data" / "train" / "cat" / "new.png")
    assert main(args + ["--max-steps", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "this run's data differs from the checkpoint's (contents '9 images, pixels" in err
    assert "here, '8 images, pixels" in err and err.count("\n") == 1


def test_an_image_size_the_model_cannot_take_is_refused_before_decoding(tmp_path, tiny_set_args, capsys):
    """Refused only after both splits were decoded and cached (minutes on a large folder); with
    --init, the hint said "pass --image-size" when --image-size was the cause."""
    root = make_folder(tmp_path / "data", {"train": 2, "test": 1})
    base = ["train", "--data", "folder", "--data-dir", root, "--batch-size", 2, "--max-steps", 1, "--device", "cpu"]
    argv = [str(a) for a in base + ["--out", tmp_path / "a", "--image-size", 18, *tiny_set_args,
                                    "--set", "patch_size=4"]]
    assert main(argv) == 2
    assert capsys.readouterr().err == "widenet: error: image size 18 is not divisible by patch size 4\n"
    assert not (root / ".widenet-cache").exists()
    argv = [str(a) for a in base + ["--out", tmp_path / "b", "--image-size", 8, *tiny_set_args, "--set",
                                    "patch_size=4"]]
    assert main(argv) == 0, capsys.readouterr().err
    assert main([str(a) for a in base + ["--out", tmp_path / "c", "--init", tmp_path / "b", "--image-size", 12]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("widenet: error: --image-size 12: the --init model ") and err.endswith(
        " takes 8 px images (its position embeddings are for that size); pass --image-size 8 or leave it out\n")


def test_a_folder_given_at_the_wrong_level_or_with_other_accents_is_explained(tmp_path):
    root = make_folder(tmp_path / "data", {"train": 1, "test": 1})
    with pytest.raises(DatasetNotFoundError, match=r"data/train has no train/ \(it holds cat/, dog/\); the folder "
                                                   r"to pass holds train/<class>/<image> and test/<class>/<image>"):
        load_dataset("folder", "train", root / "train", image_size=8)
    with pytest.raises(DatasetNotFoundError, match=r"0.png is a file, not a folder"):
        load_dataset("folder", "train", root / "train" / "cat" / "0.png", image_size=8)
    nfd = "cafe\u0301"  # the test split copied from a Mac: the same name, decomposed
    (root / "train" / "cat").rename(root / "train" / "caf\u00e9")
    (root / "test" / "cat").rename(root / "test" / nfd)
    with pytest.raises(DatasetError, match="the names look alike but are written with other Unicode characters"):
        load_data(_config(root, tmp_path / "run", image_size=8))


def test_decode_scales_16_bit_grey_and_refuses_float_and_32_bit_pixels(tmp_path):
    import numpy as np
    import torch

    from widenet.data.errors import DatasetError
    from widenet.data.images.folder import decode_image

    wide = np.full((6, 6), 65535, dtype=np.uint16)
    wide[:, :3] = 257 * 10
    Image.fromarray(wide).save(tmp_path / "wide.png")
    grey = decode_image(tmp_path / "wide.png", 6, 1)  # 6 px: no resampling
    assert grey.dtype == torch.uint8 and grey[0, 0, 0] == 10 and grey[0, 0, 5] == 255
    Image.fromarray(wide).save(tmp_path / "wide.pgm")  # Pillow opens 16-bit PGM as mode "I", as if 32-bit
    assert torch.equal(decode_image(tmp_path / "wide.pgm", 6, 1), grey)
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(DatasetError, match="floating-point pixels"):
        decode_image(tmp_path / "float.tiff", 2, 1)
    # 32-bit integers (0..255 here) used to be divided by 257 as if 16-bit: a black image.
    Image.fromarray(np.full((4, 4), 255, dtype=np.int32)).save(tmp_path / "int32.tiff")
    with pytest.raises(DatasetError, match="32-bit integer pixels are not supported"):
        decode_image(tmp_path / "int32.tiff", 2, 1)
    Image.new("RGB", (3000, 1), (200, 100, 50)).save(tmp_path / "thin.png")  # the central 1x1 square
    assert decode_image(tmp_path / "thin.png", 224, 3)[:, 100, 100].tolist() == [200, 100, 50]


def test_decode_turns_images_upright_as_their_exif_orientation_says(tmp_path):
    """Orientation 6 (a phone held upright): the stored pixels are shown turned 90 degrees clockwise; the
    other seven orientations as Pillow's exif_transpose turns them."""
    import numpy as np
    from PIL import ImageOps

    from widenet.data.images.folder import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)  # 4 rows, 6 columns
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        file = tmp_path / f"phone{orientation}.png"
        Image.fromarray(pixels).save(file, exif=exif)  # PNG: lossless
        with Image.open(file) as image:
            upright = np.asarray(ImageOps.exif_transpose(image))  # the oracle
        side = min(upright.shape[:2])
        top, left = (upright.shape[0] - side) // 2, (upright.shape[1] - side) // 2
        decoded = decode_image(file, side, 3).permute(1, 2, 0).numpy()  # 4 px: no resampling
        assert np.array_equal(decoded, upright[top:top + side, left:left + side]), orientation
        if orientation == 6:
            assert np.array_equal(upright, np.rot90(pixels, k=-1))  # the oracle turns as the tag means
            assert not np.array_equal(decoded, pixels[:, 1:5])  # the stored pixels' central square, unturned


def test_a_damaged_exif_block_leaves_the_image_readable():
    """A JPEG whose EXIF block is damaged elsewhere (found by fuzzing): Pillow's exif_transpose raised
    TypeError rewriting the block; the image decodes, turned by its readable orientation tag (6)."""
    import numpy as np

    from widenet.data.images.folder import decode_image

    file = Path(__file__).parent / "fixtures" / "damaged_exif.jpg"
    with Image.open(file) as image:
        stored = np.asarray(image.convert("L"))
    turned = np.rot90(stored, k=-1)
    side = min(turned.shape)
    top, left = (turned.shape[0] - side) // 2, (turned.shape[1] - side) // 2
    decoded = decode_image(file, side, 1)[0].numpy()
    assert np.array_equal(decoded, turned[top:top + side, left:left + side])
