"""Shared fixtures: a tiny, learnable dataset in Fashion-MNIST's on-disk format.

The images are 28x28 grey; the class (labels 0..3 of Fashion-MNIST's ten)
is the overall brightness, with per-pixel noise. That survives the default
training augmentation (zero-pad 4 + random crop, horizontal flip), so a tiny
model learns it within a few dozen steps and "loss goes down" / "accuracy
above chance" tests mean something.
"""

from __future__ import annotations

import gzip
import signal
import struct
from pathlib import Path

import numpy as np
import pytest

SYNTH_CLASSES = 4
SYNTH_TRAIN = 256
SYNTH_TEST = 64
LEVELS = np.array([20, 90, 160, 230])  # class k: mean brightness LEVELS[k]

# Model overrides that keep every run tiny (patch 4 on 28x28 comes from the *_tiny presets).
TINY = dict(dim=32, depth=2, num_heads=2, mlp_dim=64)


def pytest_configure(config) -> None:
    """Ctrl-C handled as in a terminal, also when the suite runs as a shell's background job or under
    nohup, where SIGINT starts out ignored (the stopping tests send it to this process and to children,
    which inherit an ignored SIGINT)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding ``array``."""
    assert array.dtype == np.uint8
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (n, 28, 28) and their labels in 0..SYNTH_CLASSES-1.

    Class k is a noisy flat image of brightness LEVELS[k]: trivially learnable,
    and unaffected by flips and (mostly) by pad-and-crop.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % SYNTH_CLASSES).astype(np.uint8)
    rng.shuffle(labels)
    noise = rng.integers(-25, 26, size=(n, 28, 28))
    images = np.clip(LEVELS[labels][:, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def damage_in_place(path: Path, stored: bytes) -> None:
    """Flip one bit in the middle of `stored` (a tensor's bytes) where it lies in the file at `path`:
    the file keeps its size and its format, as after a failing disk or a bad copy."""
    data = bytearray(path.read_bytes())
    start = data.find(stored)
    assert start >= 0 and len(stored) > 1, "the bytes are not stored as they are in the file"
    data[start + len(stored) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def write_fashion_mnist(folder: Path, n_train: int = SYNTH_TRAIN, n_test: int = SYNTH_TEST) -> Path:
    """Write the four Fashion-MNIST .gz files of a synthetic dataset into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_images(n, seed)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return folder


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """Folder holding a tiny learnable Fashion-MNIST-format dataset (256 train / 64 test)."""
    return write_fashion_mnist(tmp_path_factory.mktemp("synthetic-fmnist"))


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """Model overrides for a tiny model (TrainConfig(model_overrides=...))."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_set_args() -> list[str]:
    """The same overrides as CLI arguments: --set dim=32 --set depth=2 ..."""
    return [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one intra-op thread, restoring the setting afterwards.

    Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine
    two spinning OpenMP threads make each training step about ten times slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run widenet.cli.main in-process: (exit status, stdout, stderr)."""
    from widenet.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits this way
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def cli(capsys):
    """cli(argv): run_cli with this test's captured output."""
    return lambda argv: run_cli(argv, capsys)
