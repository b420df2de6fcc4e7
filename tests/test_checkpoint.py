"""Tests for widenet.train.checkpoint: layout, round trips, corruption, crash safety."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from widenet.train import checkpoint as ckpt_mod
from widenet.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from widenet.train.optim import build_optimizer, build_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Toy(nn.Module):
    """Tiny model with tied weights (shared storage) and a buffer."""

    def __init__(self, dim: int = 4, vocab: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.embed(idx)))) * self.scale


class _NotAllowed:
    """An arbitrary class that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.payload = "boom"


def _train(model, opt, sched, steps: int) -> None:
    for i in range(steps):
        opt.zero_grad()
        model(torch.tensor([[i % 7, 3, 5]])).logsumexp(-1).sum().backward()
        opt.step()
        sched.step()


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _Toy()
    opt = build_optimizer("lamb", model, lr=0.01, weight_decay=0.01)
    sched = build_schedule(opt, warmup_steps=2, total_steps=20, decay="cosine")
    return model, opt, sched


def _train_state(opt, sched, step: int) -> dict:
    return {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "step": step,
        "epoch": 1,
    }


def _save_simple(out, step, value: float = 0.0, keep_last=2) -> Path:
    model = _Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return save_checkpoint(out, step, model, {"step": step}, {"model": "toy"}, keep_last=keep_last)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    meta = {"model": "toy", "config": {"dim": 4, "vocab": 7}}
    folder = save_checkpoint(tmp_path, 3, model, _train_state(opt, sched, 3), meta)

    assert folder == tmp_path / "checkpoints" / "step_00000003"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["meta.json", "model.safetensors", "state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    on_disk = json.loads((folder / "meta.json").read_text())
    assert on_disk["model"] == "toy" and on_disk["config"] == {"dim": 4, "vocab": 7}
    assert on_disk["step"] == 3 and on_disk["epoch"] == 1 and on_disk["widenet_version"]

    model2, opt2, sched2 = _setup(seed=1)
    loaded = load_checkpoint(tmp_path, model2, expected_meta={"model": "toy"})
    assert loaded.path == folder and loaded.step == 3 and loaded.meta == on_disk
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert model2.head.weight is model2.embed.weight  # tie survives loading
    opt2.load_state_dict(loaded.train_state["optimizer"])
    sched2.load_state_dict(loaded.train_state["scheduler"])
    assert loaded.train_state["step"] == 3 and loaded.train_state["epoch"] == 1

    # resumed training continues exactly like the original
    _train(model, opt, sched, 2)
    _train(model2, opt2, sched2, 2)
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("by_name", [True, False], ids=["opened-by-name", "read-whole"])
def test_weights_damaged_in_place_are_refused(tmp_path, monkeypatch, by_name):
    """A file whose tensor bytes changed but kept its size (a failing disk, a bad copy) loaded without a
    word; the digest saved in its metadata now names it. Files without one (other tools', older
    widenet's) load as before."""
    import contextlib

    from safetensors.torch import save_file

    from widenet import files

    if not by_name:  # a folder safetensors cannot open by name: the bytes are read and parsed here
        monkeypatch.setattr(files, "_openable_name", lambda path: contextlib.nullcontext(None))
    model, opt, sched = _setup()
    folder = save_checkpoint(tmp_path, 1, model, _train_state(opt, sched, 1), {"model": "toy"})
    weights = folder / "model.safetensors"
    state = files.load_safetensors(weights)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights do not match the checksum saved") as err:
        load_checkpoint(tmp_path, _setup(seed=1)[0])
    assert "corrupt or unreadable" not in str(err.value)  # said once, not wrapped in the generic message
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(6.0)}, str(plain))  # no digest: nothing to check against
    assert torch.equal(files.load_safetensors(plain)["w"], torch.arange(6.0))


def test_a_train_state_damaged_in_place_is_refused(tmp_path):
    """state.pt (optimizer moments, the weight average) had no checksum: zeroed moments were resumed
    from, and a damaged average evaluated and exported (with a fresh, valid checksum) without a word."""
    from conftest import damage_in_place

    model, opt, sched = _setup()
    _train(model, opt, sched, 1)
    folder = save_checkpoint(tmp_path, 1, model, _train_state(opt, sched, 1), {"model": "toy"})
    assert json.loads((folder / "meta.json").read_text())["state_sha256"] == \
        __import__("hashlib").sha256((folder / "state.pt").read_bytes()).hexdigest()
    moments = next(iter(opt.state_dict()["state"].values()))["exp_avg"]
    damage_in_place(folder / "state.pt", moments.numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"state.pt: the train state does not match the checksum saved with it "
                                              r"in meta.json"):
        load_checkpoint(tmp_path, _setup(seed=1)[0])
    meta = json.loads((folder / "meta.json").read_text())
    del meta["state_sha256"]  # a checkpoint saved before the record: loads unchecked, as before
    (folder / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path, _setup(seed=1)[0]).step == 1


def test_a_train_state_read_later_names_a_checkpoint_removed_or_replaced_since(tmp_path):
    """eval --ema and export --ema read state.pt after the weights: a run still training may have
    pruned the checkpoint, or --overwrite replaced it, which read as a damaged file."""
    from widenet.train.exported import load_source

    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model, _train_state(opt, sched, 1), {"model": "toy"})
    for change in ("replace", "remove"):
        source = load_source(tmp_path)
        if change == "replace":
            _train(model, opt, sched, 1)
            shutil.rmtree(source.path)
            save_checkpoint(tmp_path, 1, model, _train_state(opt, sched, 2), {"model": "toy"})
        else:
            shutil.rmtree(source.path)
        with pytest.raises(CheckpointError, match="removed or replaced since its weights were read"):
            source.train_state
    model, opt, sched = _setup()
    folder = save_checkpoint(tmp_path / "kept", 1, model, _train_state(opt, sched, 1), {"model": "toy"})
    source = load_source(tmp_path / "kept")
    (folder / "state.pt").write_bytes(b"not a pickle")  # the same checkpoint, damaged: named as damaged
    with pytest.raises(CheckpointError, match="corrupt or unreadable state.pt"):
        source.train_state


def test_weights_checksum_is_the_sha256_of_names_dtypes_shapes_and_bytes():
    """The digest files and text runs record, rebuilt here with hashlib and numpy: its value must not
    drift, or weights saved before read as damaged and text runs' recorded data stop matching."""
    import hashlib

    from widenet.files import tensors_digest

    tensors = {"b": torch.tensor([True, False]), "a": torch.arange(3), "c": torch.tensor([[1.5], [-2.0]], dtype=torch.float64),
               "d": torch.arange(6, dtype=torch.float32).view(2, 3).t()}  # not contiguous: hashed as its values
    oracle = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        oracle.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        oracle.update(np.ascontiguousarray(t.numpy()).tobytes())
    assert tensors_digest(tensors) == oracle.hexdigest()
    assert tensors_digest({"a": torch.arange(3)}) != tensors_digest({"a": torch.arange(3).view(3, 1)})


@pytest.mark.parametrize("which", ["run", "folder", "model_file", "checkpoints_dir"])
def test_load_accepts_path_variants(tmp_path, which):
    folder = _save_simple(tmp_path, 5, value=1.5)
    path = {
        "run": tmp_path,
        "folder": folder,
        "model_file": folder / "model.safetensors",
        "checkpoints_dir": tmp_path / "checkpoints",
    }[which]
    loaded = load_checkpoint(path)
    assert loaded.path == folder and loaded.step == 5
    assert torch.all(loaded.model_state["proj.weight"] == 1.5)


def test_missing_paths_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    assert find_latest_checkpoint(tmp_path / "empty") is None
    folder = _save_simple(tmp_path / "run", 1)
    (folder / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"state\.pt: missing"):
        load_checkpoint(folder)


# ----------------------------------------------------------------------- RNG


def _draw():
    return (
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
        np.random.rand(3).tolist(),
        np.random.standard_normal(3).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
    )


def test_rng_round_trip_in_memory():
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    random.gauss(0.0, 1.0)
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    assert _draw() == first


def test_rng_round_trip_through_disk(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    np.random.standard_normal()
    save_checkpoint(tmp_path, 1, nn.Linear(2, 2), {"rng": capture_rng_state()}, {"model": "lin"})
    expected = _draw()
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    _draw()
    restore_rng_state(load_checkpoint(tmp_path).train_state["rng"])
    assert _draw() == expected


def test_restore_rng_rejects_garbage():
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"something": 1})


# ------------------------------------------------------------ layout handling


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        _save_simple(tmp_path, step, value=float(step))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    _save_simple(tmp_path, 6, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006"]
    for step in (7, 8):
        _save_simple(tmp_path, step, keep_last=None)
    assert len([p for p in root.iterdir() if p.name.startswith("step_")]) == 3
    # re-saving an older step keeps it (just written) and the newest others
    _save_simple(tmp_path, 2, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000008"]
    assert find_latest_checkpoint(tmp_path).name == "step_00000002"


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_resave_same_step_replaces_it(tmp_path, monkeypatch, atomic_swap):
    if not atomic_swap:
        monkeypatch.setattr(ckpt_mod.files, "rename_exchange", lambda a, b: False)
    _save_simple(tmp_path, 3, value=1.0)
    folder = _save_simple(tmp_path, 3, value=2.0)
    assert torch.all(load_checkpoint(folder).model_state["proj.weight"] == 2.0)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["latest", "step_00000003"]


def test_latest_fallbacks(tmp_path):
    for step in (1, 2, 3):
        _save_simple(tmp_path, step, keep_last=None)
    root = tmp_path / "checkpoints"
    assert find_latest_checkpoint(tmp_path) == root / "step_00000003"
    (root / "latest").write_text("step_00000002\n")  # the pointer file given as the checkpoint: what it names
    assert load_checkpoint(root / "latest").step == 2  # (it was "not a checkpoint file")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint file .*, or latest"):
        load_checkpoint(root / "notes.txt")

    (root / "latest").unlink()
    assert find_latest_checkpoint(tmp_path) == root / "step_00000003"

    _save_simple(tmp_path, 4, keep_last=None)
    shutil.rmtree(root / "step_00000004")  # latest now names a deleted folder
    assert find_latest_checkpoint(tmp_path) == root / "step_00000003"
    assert load_checkpoint(tmp_path).step == 3

    (root / "step_00000003" / "meta.json").unlink()  # incomplete folders are skipped
    assert find_latest_checkpoint(tmp_path) == root / "step_00000002"

    (root / "latest").write_text("../../../etc\n")  # nonsense is ignored
    assert find_latest_checkpoint(tmp_path) == root / "step_00000002"


def test_leftover_tmp_folder_ignored_then_cleaned(tmp_path):
    folder = _save_simple(tmp_path, 5)
    root = folder.parent
    leftover = root / f".tmp-step_00000009-{_dead_pid()}"
    shutil.copytree(folder, leftover)  # complete-looking, higher step
    (root / f".tmp-latest-{_dead_pid()}").write_text("step_00000009\n")
    (root / "latest").unlink()
    assert find_latest_checkpoint(tmp_path) == folder
    assert load_checkpoint(tmp_path).step == 5
    _save_simple(tmp_path, 6)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_interrupted_non_atomic_replace_is_recovered(tmp_path):
    _save_simple(tmp_path, 2, value=2.0)
    folder = _save_simple(tmp_path, 3, value=3.0)
    root = folder.parent
    # what a kill between the two renames of a non-atomic replace leaves behind
    displaced = root / f".tmp-old-step_00000003-{_dead_pid()}"
    os.rename(folder, displaced)
    assert find_latest_checkpoint(tmp_path) == displaced
    assert torch.all(load_checkpoint(tmp_path).model_state["proj.weight"] == 3.0)
    _save_simple(tmp_path, 4, value=4.0, keep_last=None)  # moves it back into place
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step_00000002", "step_00000003", "step_00000004"
    ]
    assert torch.all(load_checkpoint(root / "step_00000003").model_state["proj.weight"] == 3.0)


# ----------------------------------------------------------------- corruption


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_tail", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    folder = _save_simple(tmp_path, 1)
    file = folder / "model.safetensors"
    size = file.stat().st_size
    if damage == "truncate_half":
        _truncate(file, size // 2)
    elif damage == "truncate_tail":
        _truncate(file, -3)
    elif damage == "garbage":
        file.write_bytes(os.urandom(size))
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*safetensors"):
        load_checkpoint(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_state_pt(tmp_path, damage):
    folder = _save_simple(tmp_path, 1)
    file = folder / "state.pt"
    if damage == "garbage":
        file.write_bytes(os.urandom(300))
    else:
        _truncate(file, file.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"state\.pt: corrupt"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "text", ['{"step": 1, "model": ', "[1, 2]", '{"model": "toy"}', "\xff\xfe"]
)
def test_corrupt_meta_json(tmp_path, text):
    folder = _save_simple(tmp_path, 1)
    (folder / "meta.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"meta\.json: corrupt"):
        load_checkpoint(folder)


def test_state_with_arbitrary_object_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1)
    torch.save({"step": 1, "evil": _NotAllowed()}, folder / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: this file tries to run code \(it asks for .*_NotAllowed\); "
                                              r"it was not loaded") as info:
        load_checkpoint(folder)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_state_that_would_run_code_is_refused_without_advice_to_run_it(tmp_path):
    folder = _save_simple(tmp_path, 1)
    torch.save({"step": 1, "payload": _RunsCode()}, folder / "state.pt")
    with pytest.raises(CheckpointError, match=r"tries to run code \(it asks for posix\.system\)") as info:
        load_checkpoint(folder)
    assert "weights_only" not in str(info.value).replace("(a state.pt", "")


def test_save_refuses_unloadable_train_state(tmp_path):
    with pytest.raises(TypeError, match=r"train_state\['extra'\]\[0\].*_NotAllowed"):
        save_checkpoint(tmp_path, 1, _Toy(), {"extra": [_NotAllowed()]}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, _Toy(), {}, {"bad": object()})
    assert not (tmp_path / "checkpoints" / "latest").exists()


# ---------------------------------------------------------- model mismatches


def test_shape_mismatch_lists_keys_and_shapes(tmp_path):
    _save_simple(tmp_path, 1)
    other = _Toy(dim=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, other)
    msg = str(info.value)
    assert "model.safetensors" in msg and "shape mismatch" in msg
    assert "embed.weight: checkpoint (7, 4) vs model (7, 8)" in msg
    assert "shape mismatch (6)" in msg and "... and 1 more" in msg
    assert "'toy'" in msg
    for key, value in other.state_dict().items():  # untouched
        assert torch.equal(value, before[key])


def test_other_model_lists_missing_and_unexpected_keys(tmp_path):
    _save_simple(tmp_path, 1)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, other)
    msg = str(info.value)
    assert "missing keys (2): 0.bias, 0.weight" in msg
    assert "unexpected keys (7): embed.weight, head.weight" in msg and "... and 2 more" in msg


def test_expected_meta_mismatch(tmp_path):
    _save_simple(tmp_path, 1)
    want = r"meta\.json.*model 'toy'.*'widenet_tiny' was requested"
    with pytest.raises(CheckpointError, match=want):
        load_checkpoint(tmp_path, expected_meta={"model": "widenet_tiny"})
    with pytest.raises(CheckpointError, match="'epoch'"):
        load_checkpoint(tmp_path, expected_meta={"model": "toy", "epoch": 4})


# ------------------------------------------------------------ crash safety

_KILL_MODEL_DIM = 48


def _writer_loop(out: Path, start_version: int, ready: Path) -> None:
    """Save checkpoints forever; version v has every weight == v and step v // 2."""
    model = nn.Linear(_KILL_MODEL_DIM, _KILL_MODEL_DIM)
    version = start_version
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(version))
        state = {"version": torch.tensor(version), "blob": torch.full((256,), float(version))}
        meta = {"model": "killtest", "version": version}
        save_checkpoint(out, version // 2, model, state, meta, keep_last=2)
        if version == start_version:
            ready.touch()
        version += 1


def _check_after_kill(out: Path, min_version: int, atomic_swap: bool = True) -> int:
    """Assert the run folder holds a loadable, self-consistent checkpoint; return its version."""
    root = out / "checkpoints"
    latest_name = (root / "latest").read_text().strip()
    found = find_latest_checkpoint(out)
    if atomic_swap:  # without it, a kill mid-replace briefly leaves only .tmp-old-<latest>
        files = ("model.safetensors", "state.pt", "meta.json")
        assert all((root / latest_name / f).is_file() for f in files)
        assert found == root / latest_name
    model = nn.Linear(_KILL_MODEL_DIM, _KILL_MODEL_DIM)
    loaded = load_checkpoint(found, model, expected_meta={"model": "killtest"})
    version = loaded.meta["version"]
    assert version >= min_version
    assert loaded.step == version // 2
    assert int(loaded.train_state["version"]) == version
    assert torch.equal(loaded.train_state["blob"], torch.full((256,), float(version)))
    for p in model.parameters():
        assert torch.equal(p.detach(), torch.full_like(p, float(version)))
    return version


def _wait_for(path: Path, pid_alive, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert pid_alive(), "writer process died before its first save"
        assert time.monotonic() < deadline, "writer process never saved"
        time.sleep(0.002)


def _fork_writer(out: Path, start_version: int, ready: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            _writer_loop(out, start_version, ready)
        finally:
            os._exit(code)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("atomic_swap", [True, False], ids=["exchange", "two_renames"])
def test_sigkill_during_saves_leaves_loadable_checkpoint(tmp_path, monkeypatch, atomic_swap):
    if not atomic_swap:  # the forked writer inherits this patch
        monkeypatch.setattr(ckpt_mod.files, "rename_exchange", lambda a, b: False)
    rng = random.Random()
    version, delays = 0, []
    for i in range(6):
        ready = tmp_path / f"ready-{i}"
        pid = _fork_writer(tmp_path, version, ready)
        try:
            _wait_for(ready, lambda: os.waitpid(pid, os.WNOHANG) == (0, 0))
            delays.append(rng.uniform(0.0, 0.06))
            time.sleep(delays[-1])
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        version = _check_after_kill(tmp_path, min_version=version, atomic_swap=atomic_swap) + 1
    # a normal save afterwards cleans up whatever the kills left behind
    save_checkpoint(tmp_path, version, nn.Linear(2, 2), {}, {"model": "killtest"}, keep_last=2)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"delays={delays}"
    assert version > 6, "writer made too little progress to exercise the kill"


_SUBPROCESS_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from tests.test_checkpoint import _writer_loop
    _writer_loop(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    """
)


@pytest.mark.slow
def test_sigkill_of_separate_python_process(tmp_path):
    version = 0
    for i, delay in enumerate([random.uniform(0.0, 0.05)]):
        ready = tmp_path / f"ready-{i}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS_WRITER]
            + [str(REPO_ROOT), str(tmp_path), str(version), str(ready)],
            cwd=REPO_ROOT,
        )
        try:
            _wait_for(ready, lambda: proc.poll() is None, timeout=60.0)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        version = _check_after_kill(tmp_path, min_version=version) + 1
