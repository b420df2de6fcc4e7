"""Model folders: export, from_pretrained, upcycling and --init, through the library and the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import widenet
from widenet import create_model, files
from widenet.cli import main
from widenet.models.upcycle import UpcycleError, upcycle
from widenet.train.checkpoint import CheckpointError
from widenet.train import exported
from widenet.train.exported import write_export

pytestmark = pytest.mark.usefixtures("single_thread")




def _one_line(rc, out, err):
    assert rc == 2 and "Traceback" not in err, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, fmnist_dir, tiny_set_args):
    """A dense ViT trained for a few steps on the synthetic Fashion-MNIST."""
    out = tmp_path_factory.mktemp("vit-run")
    rc = main(["train", "--model", "vit_tiny", "--data-dir", str(fmnist_dir), "--out", str(out), "--max-steps", "3",
               "--batch-size", "32", *tiny_set_args])
    assert rc == 0
    return out


def test_export_then_from_pretrained_gives_the_runs_model(vit_run, tmp_path, cli):
    rc, out, err = cli(["export", vit_run, "--to", tmp_path / "exp"])
    assert rc == 0, err
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["format"] == "widenet-model" and config["format_version"] == 1 and config["kind"] == "vision"
    assert config["classes"][0] == "T-shirt/top" and len(config["image"]["mean"]) == 1
    images = torch.randn(4, 1, 28, 28)
    from_run, from_export = widenet.from_pretrained(vit_run), widenet.from_pretrained(tmp_path / "exp")
    assert not from_export.training
    with torch.no_grad():
        torch.testing.assert_close(from_export(images).logits, from_run(images).logits, rtol=0, atol=0)
    loaded = widenet.load_pretrained(tmp_path / "exp")
    assert loaded.kind == "vision" and loaded.classes == config["classes"] and loaded.mean == tuple(config["image"]["mean"])
    assert loaded.resize is None  # trained at the data's size, without --image-size: no resize to follow
    for file in ("model.safetensors", "config.json"):  # a file of the folder named instead (was: "state.pt missing")
        assert widenet.load_pretrained(tmp_path / "exp" / file).classes == config["classes"]
    # an existing folder is not overwritten without --overwrite, and is with it
    line = _one_line(*cli(["export", vit_run, "--to", tmp_path / "exp"]))
    assert "already holds a model (a widenet or Hugging Face folder)" in line and "--overwrite" in line
    assert cli(["export", vit_run, "--to", tmp_path / "exp", "--overwrite"])[0] == 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_export_whose_weights_were_damaged_in_place_is_refused_by_name(tmp_path, cli):
    """A bit flipped in an export's weights (same size) loaded, evaluated and predicted without a word."""
    write_export(tmp_path / "m", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                 model_name="vit_tiny")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights do not match the checksum saved"):
        widenet.from_pretrained(tmp_path / "m")
    line = _one_line(*cli(["export", tmp_path / "m", "--to", tmp_path / "copy"]))
    assert "do not match the checksum" in line and not (tmp_path / "copy").exists()


def _two_exports(tmp_path):
    """Two exports of one architecture with different weights: folders a and b."""
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        write_export(tmp_path / name, create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                     model_name="vit_tiny", classes=[name + "0", name + "1"] + [str(i) for i in range(2, 10)])
    return tmp_path / "a", tmp_path / "b"


def test_an_export_whose_weights_belong_to_another_is_refused(tmp_path, cli):
    """model.safetensors copied in from another export of the same shape loaded without a word, with
    the first one's class names (a reader racing `export --overwrite` could read such a pair too)."""
    a, b = _two_exports(tmp_path)
    config = json.loads((a / "config.json").read_text())
    from safetensors.torch import load_file
    assert config["weights_sha256"] == files.tensors_digest(load_file(a / "model.safetensors"))
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(CheckpointError, match=MISMATCH):
        widenet.from_pretrained(a)
    line = _one_line(*cli(["predict", "--checkpoint", a, tmp_path / "no-image.png"]))
    assert re.fullmatch(f"widenet: error: {re.escape(str(a))}: {MISMATCH}", line), line


MISMATCH = (r"the weights digest its config.json records \(weights_sha256\) does not match its model.safetensors: "
            r"one of the two was changed or replaced after they were written together; put back the files as "
            r"written, or write the folder again")


def test_an_export_whose_recorded_digest_was_edited_names_both_files(tmp_path, cli):
    """weights_sha256 changed by hand in config.json: the weights are the export's own, so the message
    may not say they belong to another model; it says the two files disagree, not which one changed."""
    a, _ = _two_exports(tmp_path)
    config = json.loads((a / "config.json").read_text())
    config["weights_sha256"] = "0" * 64
    (a / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=MISMATCH) as caught:
        widenet.from_pretrained(a)
    assert "two models" not in str(caught.value)
    line = _one_line(*cli(["predict", "--checkpoint", a, tmp_path / "no-image.png"]))
    assert re.fullmatch(f"widenet: error: {re.escape(str(a))}: {MISMATCH}", line), line


@pytest.mark.parametrize("hf", [False, True])
def test_a_folder_read_while_overwritten_is_read_again_whole(tmp_path, monkeypatch, hf):
    """The folder swapped for another model's (as `export --overwrite` renames it into place) between
    reading config.json and the weights: the weights and class names of two models came back
    together (a Hugging Face folder has no record binding its files). It is read again, whole."""
    a, b = _two_exports(tmp_path)
    if hf:
        for name in ("a", "b"):
            write_export(tmp_path / f"{name}-hf", widenet.from_pretrained(tmp_path / name), model_name="vit_tiny",
                         classes=[name + "0", name + "1"] + [str(i) for i in range(2, 10)], hf=True)
        a, b = tmp_path / "a-hf", tmp_path / "b-hf"
    from widenet.models import hf as hf_module
    real_load = files.load_safetensors
    reads = []

    def swapped_before_the_weights(path, *args):
        reads.append(path)
        if len(reads) == 1:  # b's config.json is read: now b's folder is replaced by a copy of a's
            shutil.copytree(a, tmp_path / "incoming")
            os.rename(b, tmp_path / "old")
            os.rename(tmp_path / "incoming", b)
        return real_load(path, *args)

    monkeypatch.setattr(exported, "load_safetensors", swapped_before_the_weights)
    monkeypatch.setattr(hf_module, "load_safetensors", swapped_before_the_weights)
    loaded = widenet.load_pretrained(b)
    assert len(reads) >= 2 and loaded.classes[0] == "a0"  # now b holds a's model: its weights and names
    want = widenet.from_pretrained(a).state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], want[k]) for k in want)


def test_exports_without_the_weights_record_or_digest_still_load(tmp_path):
    """Exports written before config.json named its weights, and weights a user changed and saved with
    another tool (no digest inside), load as before."""
    from safetensors.torch import load_file, save_file
    a, b = _two_exports(tmp_path)
    edited = {k: v * 2 for k, v in load_file(a / "model.safetensors").items()}
    save_file(edited, a / "model.safetensors")  # no metadata
    assert torch.equal(widenet.from_pretrained(a).state_dict()["head.bias"], edited["head.bias"])
    config = json.loads((b / "config.json").read_text())
    del config["weights_sha256"]
    (b / "config.json").write_text(json.dumps(config))
    shutil.copy(a / "model.safetensors", b / "model.safetensors")  # nothing to tell it by: loads
    assert widenet.load_pretrained(b).classes[0] == "b0"


def test_two_exports_racing_to_one_new_folder_do_not_replace_each_other(tmp_path, monkeypatch):
    """Both were checked against an empty destination, then the later one swapped its folder in over
    the first (which had reported success) without --overwrite."""
    write_export(tmp_path / "other", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                 model_name="vit_tiny")
    second = create_model("vit_tiny", dim=16, depth=1, num_heads=2, mlp_dim=32)
    real_carry = exported.carry_user_files

    def the_other_export_lands_first(old, new):  # between this export's check and its move
        shutil.copytree(tmp_path / "other", tmp_path / "m")
        real_carry(old, new)

    monkeypatch.setattr(exported, "carry_user_files", the_other_export_lands_first)
    with pytest.raises(FileExistsError, match=r"m was filled by another process while this export was written; "
                                              r"pass --overwrite"):
        write_export(tmp_path / "m", second, model_name="vit_tiny")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_config"]["encoder"]["dim"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]  # no temporary left beside it


def test_what_a_killed_export_left_is_cleared_by_the_next(tmp_path):
    """kill -9 during an export left `.tmp-NAME-PID/` beside the destination for good; during a swap
    without renameat2, the old model waited in `.old-NAME-PID` and was lost with it."""
    import subprocess

    from widenet.files import STALE_TEMPORARY_S

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    model = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    write_export(tmp_path / "kept", model, model_name="vit_tiny")
    day_ago = __import__("time").time() - STALE_TEMPORARY_S - 60
    leftovers = {name: tmp_path / name for name in (f".tmp-m-{dead.pid}", f".tmp-m-2-{dead.pid}", f".tmp-old-m-{dead.pid}",
                                                    f".tmp-m-{dead.pid}-new")}
    for folder in leftovers.values():  # half-written exports of killed processes, a day old
        folder.mkdir()
        os.utime(folder, (day_ago, day_ago))
    (tmp_path / ".tmp-m-1").mkdir()  # a live process's (pid 1's), however old: kept
    os.utime(tmp_path / ".tmp-m-1", (day_ago, day_ago))
    (tmp_path / "kept").rename(tmp_path / f".old-m-{dead.pid}")  # killed between the swap's two renames
    write_export(tmp_path / "n", model, model_name="vit_tiny")  # another destination: nothing of m's touched
    assert all(folder.exists() for folder in leftovers.values()) and (tmp_path / f".old-m-{dead.pid}").exists()
    with pytest.raises(FileExistsError, match="already holds a model"):
        write_export(tmp_path / "m", model, model_name="vit_tiny")  # the old model, put back, is not replaced
    assert exported.is_export(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([  # "m-2"'s, "old-m"'s: other destinations'
        f".tmp-m-2-{dead.pid}", f".tmp-old-m-{dead.pid}", f".tmp-m-{dead.pid}-new", ".tmp-m-1", "m", "n"])
    (tmp_path / f".old-m-{dead.pid}").mkdir()  # not a model (half of a folder): never put back
    (tmp_path / "m").rename(tmp_path / "elsewhere")
    write_export(tmp_path / "m", model, model_name="vit_tiny")
    assert (tmp_path / f".old-m-{dead.pid}").exists() and exported.is_export(tmp_path / "m")


def test_overwrite_keeps_what_the_user_added_beside_the_model(tmp_path):
    """A model card or other files put into an export folder survive --overwrite; the model's own
    files (a tokenizer the new model does not have included) are the new export's."""
    dest = tmp_path / "m"
    write_export(dest, create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64), model_name="vit_tiny")
    (dest / "README.md").write_text("my model card\n")
    (dest / "assets").mkdir()
    (dest / "assets" / "plot.txt").write_text("curve\n")
    (dest / "tokenizer.json").write_text("{}")  # the old model's file: not carried over
    write_export(dest, create_model("vit_tiny", dim=16, depth=1, num_heads=2, mlp_dim=32), model_name="vit_tiny",
                 overwrite=True)
    assert (dest / "README.md").read_text() == "my model card\n"
    assert (dest / "assets" / "plot.txt").read_text() == "curve\n"
    assert not (dest / "tokenizer.json").exists()
    assert json.loads((dest / "config.json").read_text())["model_config"]["encoder"]["dim"] == 16
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_interrupted_export_leaves_no_half_written_folder(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (a KeyboardInterrupt) while the files are written: nothing at the destination,
    and no .tmp-NAME-PID folder beside it for ever (its name carries the pid, so no later export clears it)."""
    import widenet.train.exported as exported

    def interrupted(_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(exported, "fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_export(tmp_path / "m", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                     model_name="vit_tiny")
    assert list(tmp_path.iterdir()) == []


def test_a_newer_format_and_broken_folders_are_refused(tmp_path):
    write_export(tmp_path / "m", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                 model_name="vit_tiny")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        widenet.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not read the weights"):
        widenet.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        widenet.from_pretrained(tmp_path / "missing")


def test_upcycled_vit_trains_with_init_and_keeps_the_dense_parts(vit_run, tmp_path, fmnist_dir, cli):
    rc, out, err = cli(["upcycle", "--from", os.path.relpath(vit_run), "--experts", 4, "--top-k", 2,
                        "--out", tmp_path / "up"])
    assert rc == 0, err
    assert "capacity" not in out  # the ViT's blocks differ: an upcycled WideNet was never its function
    saved = json.loads((tmp_path / "up" / "config.json").read_text())
    assert saved["model"] == "vit_tiny_upcycled"  # the source is named as it was, where it is from anywhere
    assert saved["source"]["model"] == "vit_tiny" and Path(saved["source"]["path"]).is_absolute()
    dense, up = widenet.from_pretrained(vit_run), widenet.from_pretrained(tmp_path / "up")
    enc = up.cfg.encoder
    assert (enc.moe_blocks, enc.share_attention, enc.share_ffn, enc.share_norms) == ("all", True, True, False)
    assert enc.moe.num_experts == 4 and enc.moe.renormalize
    d, u = dense.state_dict(), up.state_dict()
    for key in ("patch_embed.proj.weight", "pos_embed", "head.weight", "encoder.final_norm.weight",
                "encoder.norms.1.ffn_norm.weight"):
        assert torch.equal(d[key], u[key]), key
    mean_qkv = (d["encoder.attention.0.qkv.weight"] + d["encoder.attention.1.qkv.weight"]) / 2
    torch.testing.assert_close(u["encoder.attention.0.qkv.weight"], mean_qkv)
    # 4 experts from 2 blocks' FFNs: cycling through them (0, 1, 0, 1), as W^T
    for e, block in enumerate([0, 1, 0, 1]):
        assert torch.equal(u["encoder.moes.0.experts.w1"][e], d[f"encoder.mlps.{block}.fc1.weight"].t())
        assert torch.equal(u["encoder.moes.0.experts.b2"][e], d[f"encoder.mlps.{block}.fc2.bias"])
    rc, out, err = cli(["train", "--init", tmp_path / "up", "--data-dir", fmnist_dir, "--out", tmp_path / "ft",
                         "--max-steps", 2, "--batch-size", 32, "--lr", "1e-9"])
    assert rc == 0, err
    meta = json.loads(next((tmp_path / "ft" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["model"] == "vit_tiny_upcycled" and meta["model_config"]["encoder"]["moe_blocks"] == "all"
    # Training started from the upcycled weights (at lr 1e-9 two AdamW steps move none by 1e-7), not new ones.
    trained = widenet.from_pretrained(tmp_path / "ft").state_dict()
    assert trained.keys() == u.keys()
    for key, value in u.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-7, msg=key)
    rc, out, err = cli(["eval", "--checkpoint", tmp_path / "ft", "--data-dir", fmnist_dir])
    assert rc == 0 and "vit_tiny_upcycled @ step 2" in out, err
    rc, out, err = cli(["eval", "--checkpoint", tmp_path / "up", "--data", "fashion-mnist", "--data-dir", fmnist_dir,
                        "--json"])  # an export has no training step: it used to say "step 0"
    assert rc == 0 and json.loads(out)["step"] is None, err
    rc, out, err = cli(["eval", "--checkpoint", tmp_path / "up", "--data-dir", fmnist_dir])  # the export names its data
    assert rc == 0 and out.startswith(f"vit_tiny_upcycled ({tmp_path / 'up'}): accuracy "), (out, err)


def test_an_export_through_a_symbolic_link_fills_the_folder_it_points_to(tmp_path, cli):
    """--to LINK --overwrite replaced the link with a folder and left '.tmp-del-LINK-PID' -> TARGET
    beside it (rmtree refuses links); the target kept the old model."""
    first = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    second = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    write_export(tmp_path / "a", first, model_name="vit_tiny")
    write_export(tmp_path / "b", second, model_name="vit_tiny")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert cli(["export", tmp_path / "b", "--to", tmp_path / "link", "--overwrite"])[0] == 0
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "link"]
    got = widenet.from_pretrained(tmp_path / "a").state_dict()
    assert all(torch.equal(got[k], v) for k, v in second.state_dict().items())
    exported.remove_tree(tmp_path / "link")  # a link removed is the link alone
    assert not (tmp_path / "link").exists() and (tmp_path / "a" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_link_that_leads_nowhere_is_refused_as_a_destination(tmp_path, cli, fmnist_dir, tiny_set_args):
    """A loop of links gave a traceback (RuntimeError: Symlink loop); a dangling link had its missing
    target created, parents and all, wherever it pointed; `train --out` said "File exists"."""
    write_export(tmp_path / "m", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64), model_name="vit_tiny")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deep")
    for link, target in (("loop_a", "loop_b"), ("dangling", "nowhere/deep")):
        for argv in (["export", tmp_path / "m", "--to", tmp_path / link],
                     ["train", "--data-dir", fmnist_dir, "--out", tmp_path / link, "--max-steps", 1, *tiny_set_args]):
            line = _one_line(*cli(argv))
            assert f"{link}: a symbolic link to {tmp_path / target}, which leads nowhere" in line, line
    assert not (tmp_path / "nowhere").exists()


def test_upcycle_refuses_what_it_cannot_do(tmp_path, cli):
    moe_model = create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    with pytest.raises(UpcycleError, match="already has an MoE"):
        upcycle(moe_model, 4)
    dense = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    with pytest.raises(UpcycleError, match=r"attention must be 'mean' or 'block:N' with N in 0..1"):
        upcycle(dense, 4, attention="block:7")
    albert = create_model("albert_tiny", dim=32, depth=3, num_heads=2, mlp_dim=64)  # one shared attention
    for how in ("block:5", "first"):  # were taken as "its one attention" without a word
        with pytest.raises(UpcycleError, match=rf"attention must be 'mean' or 'block:N' with N in 0..2, got '{how}'"):
            upcycle(albert, 4, attention=how)
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        upcycle(dense, 4, top_k=5)
    for noise in (-0.1, 1e30, float("nan")):  # 1e30 made a model whose activations overflow
        with pytest.raises(UpcycleError, match=r"noise must be a number from 0 to 1.0 \(a multiple of the weights"):
            upcycle(dense, 4, noise=noise)
    write_export(tmp_path / "moe", moe_model, model_name="widenet_tiny")
    line = _one_line(*cli(["upcycle", "--from", tmp_path / "moe", "--experts", 2, "--out", tmp_path / "o"]))
    assert "already has an MoE" in line
    line = _one_line(*cli(["import", tmp_path / "moe", "--out", tmp_path / "o"]))
    assert "already a widenet export" in line and "read it as it is" in line and "Hugging Face" not in line


def test_upcycled_attention_is_the_chosen_blocks_or_their_mean():
    """attention="block:N" copies the attention block N runs; "mean" averages them all. Checked by name
    against the source's modules: only refusals were tested, so block:1 copying block 0 passed."""
    dense = create_model("vit_tiny", dim=32, depth=3, num_heads=2, mlp_dim=64)
    blocks = [m.state_dict() for m in dense.encoder.attention]
    assert len(blocks) == 3 and not torch.equal(blocks[1]["qkv.weight"], blocks[2]["qkv.weight"])
    for how, expect in (("block:1", lambda k: blocks[1][k]), ("block:2", lambda k: blocks[2][k]),
                        ("mean", lambda k: (blocks[0][k] + blocks[1][k] + blocks[2][k]) / 3)):
        shared = upcycle(dense, 2, attention=how).encoder.attention
        assert len(shared) == 1
        for key, value in shared[0].state_dict().items():
            torch.testing.assert_close(value, expect(key), rtol=1e-6, atol=1e-7, msg=f"{how} {key}")
    albert = create_model("albert_tiny", dim=32, depth=3, num_heads=2, mlp_dim=64)  # one attention for 3 blocks
    one = albert.encoder.attention[0].state_dict()
    got = upcycle(albert, 2, attention="block:2").encoder.attention[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in one.items())


def test_upcycling_beyond_the_memory_is_refused_before_copying(tmp_path, cli, monkeypatch):
    """The upcycled model and the stacked copies it is loaded from are both in memory at once: an
    expert count whose model alone would fit but not twice is refused by name, not killed by the kernel."""
    import widenet.memory as memory

    dense = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64)
    with torch.device("meta"):
        size = memory.parameter_bytes(create_model("widenet_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64,
                                                   num_experts=64))
    monkeypatch.setattr(memory, "available_memory", lambda: size * 3 // 2)  # once fits, twice does not
    with pytest.raises(MemoryError, match="upcycling to 64 experts: the new model and the copies .* need"):
        upcycle(dense, 64)
    write_export(tmp_path / "vit", dense, model_name="vit_tiny")
    line = _one_line(*cli(["upcycle", "--from", tmp_path / "vit", "--experts", 64, "--out", tmp_path / "o"]))
    assert "upcycling to 64 experts" in line and not (tmp_path / "o").exists()
    monkeypatch.setattr(memory, "available_memory", lambda: size * 2)
    assert sum(p.numel() for p in upcycle(dense, 64).parameters()) * 4 == size


def test_a_broken_config_json_is_named_as_such(tmp_path, cli):
    """A folder whose config.json is damaged is neither an export nor a Hugging Face folder: every
    command that reads a model says what is wrong with that file, not that a checkpoint is missing."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"")
    (tmp_path / "in.txt").write_text("a sentence\n")
    for text, expected in (('{"model_type": "vit",', "not valid JSON"), ("[1]", "not a JSON object"),
                           ('{"format": "other"}', 'has no "format": "widenet-model" or "model_type"')):
        (bad / "config.json").write_text(text)
        for args in (["train", "--init", bad, "--out", tmp_path / "r", "--max-steps", 1],
                     ["predict", "--checkpoint", bad, "--text", tmp_path / "in.txt"], ["export", bad, "--to", tmp_path / "e"]):
            line = _one_line(*cli(args))
            assert f"{bad / 'config.json'}: {expected}" in line, (args, line)
        line = _one_line(*cli(["import", bad, "--out", tmp_path / "o"]))
        assert expected.replace('"format": "widenet-model" or ', "") in line
    assert "no config.json, so not a Hugging Face checkpoint" in _one_line(*cli(["import", tmp_path, "--out", bad]))
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists() and not (tmp_path / "o").exists()


def test_export_of_an_export_says_what_it_copied(tmp_path, cli):
    write_export(tmp_path / "m", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                 model_name="vit_tiny")
    rc, out, err = cli(["export", tmp_path / "m", "--to", tmp_path / "copy"])
    assert rc == 0 and "copied from a widenet export" in out and "step 0" not in out, (out, err)


def test_the_experts_are_as_wide_as_the_dense_ffns_they_copy():
    """A dense model's expert_dim (vit_moe_b16's 4096 beside mlp_dim 3072, kept with moe_blocks=none)
    sized the experts: loading the mlp_dim-wide copies failed with a size mismatch."""
    dense = create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64, expert_dim=128)
    experts = upcycle(dense, 4).encoder.moes[0].experts
    assert experts.w1.shape == (4, 32, 64) and experts.w2.shape == (4, 64, 32)
    assert torch.equal(experts.w1[0], dense.encoder.mlps[0].fc1.weight.t())
    assert torch.equal(experts.w1[3], dense.encoder.mlps[1].fc1.weight.t())


def test_upcycled_albert_computes_the_albert_exactly(tmp_path):
    """With equal experts, renormalised top-k and no drops the WideNet is the ALBERT it came from."""
    transformers = pytest.importorskip("transformers")
    from widenet.models.hf import load_hf

    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=60, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=24)
    transformers.AlbertForPreTraining(config).save_pretrained(tmp_path)
    albert = load_hf(tmp_path).model
    wide = upcycle(albert, 4, 2, dropless=True).eval()
    assert wide.cfg.encoder.norm_position == "post" and wide.cfg.encoder.activation == "gelu_tanh"
    ids = torch.randint(1, 60, (3, 10))
    keep = torch.ones_like(ids)
    keep[2, 6:] = 0
    masked = keep.bool()
    with torch.no_grad():
        a = albert(ids, keep_mask=keep, masked_positions=masked)
        b = wide(ids, keep_mask=keep, masked_positions=masked)
    torch.testing.assert_close(b.hidden[masked], a.hidden[masked], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.mlm_logits, a.mlm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.sop_logits, a.sop_logits, atol=1e-5, rtol=1e-5)
    noisy = upcycle(albert, 4, 2, dropless=True, noise=0.05).eval()
    with torch.no_grad():
        assert not torch.allclose(noisy(ids, keep_mask=keep).hidden[masked], a.hidden[masked], atol=1e-5)


def test_overwrite_never_replaces_a_run_a_source_or_other_files(vit_run, tmp_path, cli):
    """--overwrite replaces an earlier export only: never the source, a run folder or someone's files."""
    checkpoints = sorted(p.name for p in (vit_run / "checkpoints").iterdir())
    for dest in (vit_run, vit_run / "checkpoints"):  # the source itself, or a folder inside it
        line = _one_line(*cli(["export", vit_run, "--to", dest, "--overwrite"]))
        assert "apart from the source" in line
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    line = _one_line(*cli(["upcycle", "--from", vit_run, "--experts", 2, "--out", other, "--overwrite"]))
    assert "not a model folder" in line and (other / "metrics.jsonl").exists()
    assert line.startswith(f"widenet: error: {other} already holds files")  # not "writing under OTHER: OTHER ..."
    copy = tmp_path / "copy"  # among another run's checkpoints, where training would take it for one
    shutil.copytree(vit_run, copy)
    for command in (["export", copy, "--to"], ["upcycle", "--from", copy, "--experts", 2, "--out"]):
        line = _one_line(*cli([*command, vit_run / "checkpoints" / "step_00000099"]))
        assert f"lies inside {(vit_run / 'checkpoints').resolve()}, which holds a run's checkpoints" in line
    shared = tmp_path / "shared" / "checkpoints"  # a folder one may enter but not list (as /home often is)
    shared.mkdir(parents=True)
    from widenet.train import export_destination

    real = export_destination.step_folders

    def unlistable(folder):
        if folder == shared:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_destination, "step_folders", unlistable)
        assert cli(["export", copy, "--to", shared / "model"])[0] == 0
    assert sorted(p.name for p in (vit_run / "checkpoints").iterdir()) == checkpoints


def test_nan_weights_are_refused_by_name(vit_run, tmp_path, cli):
    model = widenet.from_pretrained(vit_run)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    write_export(tmp_path / "nan", model, model_name="vit_tiny")
    with pytest.raises(CheckpointError, match="head.bias holds NaN"):
        widenet.from_pretrained(tmp_path / "nan")
    line = _one_line(*cli(["upcycle", "--from", tmp_path / "nan", "--experts", 2, "--out", tmp_path / "o"]))
    assert "head.bias holds NaN" in line


def test_resume_of_an_init_run_needs_only_the_run(vit_run, tmp_path, fmnist_dir, cli):
    start = tmp_path / "start"
    assert cli(["export", vit_run, "--to", start])[0] == 0
    args = ["train", "--init", start, "--data-dir", fmnist_dir, "--out", tmp_path / "r", "--batch-size", 32,
            "--max-steps", 4, "--save-every", 2]
    assert cli(args)[0] == 0
    shutil.rmtree(start)
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step_00000004")  # as if stopped after step 2
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step_00000002")
    rc, out, err = cli([*args, "--resume"])
    assert rc == 0, err
    assert (tmp_path / "r" / "checkpoints" / "step_00000004").is_dir()
    line = _one_line(*cli(["train", "--init", tmp_path / "gone", "--data-dir", fmnist_dir, "--out", tmp_path / "x"]))
    assert "gone: does not exist" in line and "hub" not in line
    for hub_id in ("albert-base-v2", "google/vit-base-patch16-224"):  # never downloaded: say so
        with pytest.raises(FileNotFoundError, match="if it names a Hugging Face hub model: widenet reads local "
                                                    "folders only, so download it first"):
            widenet.from_pretrained(hub_id)


def test_pretraining_continues_from_an_upcycled_albert(tmp_path, cli):
    """ALBERT pretrained here -> upcycled to a WideNet -> `pretrain --init` continues with its tokenizer."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("the red fox jumps over the lazy dog. a small bird sings in the old tree. "
                                  "the river runs down to the sea." for _ in range(60)))
    sizes = [a for k, v in dict(embedding_size=16, dim=32, depth=2, num_heads=2, mlp_dim=64, max_positions=64).items()
             for a in ("--set", f"{k}={v}")]
    common = ["--corpus", corpus, "--seq-len", 32, "--max-steps", 2, "--batch-size", 8, "--eval-examples", 8]
    assert cli(["pretrain", "--model", "albert_text_tiny", "--vocab-size", 120, *common, *sizes,
                "--out", tmp_path / "albert"])[0] == 0
    rc, out, err = cli(["upcycle", "--from", tmp_path / "albert", "--experts", 2, "--out", tmp_path / "wide"])
    assert rc == 0 and "note: the experts keep a capacity (1.2 x their share of the tokens)" in out, err
    rc, out, err = cli(["upcycle", "--from", tmp_path / "albert", "--experts", 2, "--dropless", "--out",
                        tmp_path / "exact"])
    assert rc == 0 and "capacity" not in out, out
    rc, out, err = cli(["upcycle", "--from", tmp_path / "albert", "--experts", 2, "--noise", 0.01, "--out",
                        tmp_path / "noisy"])  # noisy copies: no longer the dense model's function anyway
    assert rc == 0 and "capacity" not in out, out
    rc, out, err = cli(["upcycle", "--from", tmp_path / "albert", "--experts", 2, "--top-k", 1, "--dropless", "--out",
                        tmp_path / "top1"])
    assert rc == 0 and "top-1 with renormalised combine weights (each is then 1): the router learns from the " \
                       "balance loss alone" in out, out
    rc, out, err = cli(["pretrain", "--init", tmp_path / "wide", *common, "--out", tmp_path / "more"])
    assert rc == 0, err
    assert "pretraining albert_text_tiny_upcycled" in out
    meta = json.loads(next((tmp_path / "more" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["model_config"]["encoder"]["moe_blocks"] == "all"
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (tmp_path / "wide" / "tokenizer.json").read_text()
    line = _one_line(*cli(["pretrain", "--init", tmp_path / "wide", *common, "--tokenizer", tmp_path / "none.json",
                           "--out", tmp_path / "x"]))
    assert "none.json" in line


def test_init_from_the_wrong_kind_of_model_is_named_first(tmp_path, fmnist_dir, cli):
    """An image model given to pretraining or fine-tuning, or a text model to image training, is refused
    by name before anything else is asked of it (pretraining used to ask for a tokenizer first)."""
    vision = write_export(tmp_path / "vision", create_model("vit_tiny", dim=32, depth=2, num_heads=2, mlp_dim=64),
                          model_name="vit_tiny")
    text = write_export(tmp_path / "text", create_model("albert_text_tiny", vocab_size=50, dim=32, depth=1,
                                                        num_heads=2, mlp_dim=64, embedding_size=16),
                        model_name="albert_text_tiny")
    (tmp_path / "corpus.txt").write_text("One sentence here. Another one there.\n")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    for args, expected in (
            (["pretrain", "--init", vision, "--corpus", tmp_path / "corpus.txt"], "--init needs a text model"),
            (["finetune", "--init", vision, "--task", "classify", "--train", tmp_path / "t.tsv", "--validation",
              tmp_path / "t.tsv"], "fine-tuning needs a text model"),
            (["train", "--init", text, "--data-dir", fmnist_dir, "--max-steps", 1], "--init needs an image model")):
        line = _one_line(*cli([*args, "--out", tmp_path / "run"]))
        assert f"{vision if 'text model' in expected else text}: {expected}, this one is" in line, line
        assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_a_text_run_without_its_tokenizer_is_not_exported(tmp_path, cli):
    """With the run's tokenizer.json missing the export was written without one (exit 0), and predict
    then failed on it; with it damaged, a note said so, with exit 0 all the same."""
    run = shutil.copytree(Path(__file__).parent / "fixtures" / "v0" / "text_run", tmp_path / "run")
    (run / "tokenizer.json").unlink()
    line = _one_line(*cli(["export", run, "--to", tmp_path / "a"]))
    assert f"{run / 'tokenizer.json'} is missing: the run's model reads ids of that tokenizer" in line
    (run / "tokenizer.json").write_text("{")
    line = _one_line(*cli(["export", run, "--to", tmp_path / "b"]))
    assert "tokenizer.json: not valid JSON" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _dense_vit(depth: int, dim: int = 32, seed: int = 0):
    """A dense vit_tiny whose blocks all differ, biases and LayerNorms included (a fresh model's biases are
    0 and its norms 1: a copy from the wrong block's bias or norm could not be told apart)."""
    torch.manual_seed(seed)
    dense = create_model("vit_tiny", dim=dim, depth=depth, num_heads=2, mlp_dim=2 * dim)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        dense.head.weight.normal_(0, 0.5, generator=gen)  # 0 in a fresh ViT: its logits would not see the rest
    return dense


@pytest.mark.parametrize("depth, experts, blocks", [
    (5, 4, [0, 1, 3, 4]),  # round(e * 4 / 3): 0, 1.33, 2.67, 4 (int() would give 0, 1, 2, 4)
    (3, 3, [0, 1, 2]),
    (3, 5, [0, 1, 2, 0, 1]),  # more experts than blocks: cycling through them
    (5, 1, [2]),  # one expert: the middle block
])
def test_each_expert_copies_the_ffn_of_the_block_the_recipe_picks(depth, experts, blocks):
    """upcycle.py's recipe: expert e copies the FFN (w1, b1, w2, b2) of block round(e (depth - 1) / (E - 1)),
    the middle block for E = 1, cycling through the blocks when E > depth; block i keeps block i's two norms, the final norm is kept.
    Only 2-block models with zero biases were tested, so int() for round() and b1 always from block 0 passed."""
    if experts == 1:
        assert blocks == [depth // 2]
    elif experts <= depth:
        assert blocks == [round(e * (depth - 1) / (experts - 1)) for e in range(experts)]
    else:
        assert blocks == [e % depth for e in range(experts)]
    dense = _dense_vit(depth)
    ffns = dense.encoder.mlps
    assert len(ffns) == depth and not torch.equal(ffns[0].fc1.bias, ffns[1].fc1.bias)
    wide = upcycle(dense, experts, top_k=min(2, experts))
    got = wide.encoder.moes[0].experts
    assert got.w1.shape[0] == experts
    for e, b in enumerate(blocks):
        assert torch.equal(got.w1[e], ffns[b].fc1.weight.t()), (e, b, "w1")
        assert torch.equal(got.b1[e], ffns[b].fc1.bias), (e, b, "b1")
        assert torch.equal(got.w2[e], ffns[b].fc2.weight.t()), (e, b, "w2")
        assert torch.equal(got.b2[e], ffns[b].fc2.bias), (e, b, "b2")
    assert len(wide.encoder.norms) == depth
    for i in range(depth):
        for key, value in dense.encoder.norms[i].state_dict().items():
            assert torch.equal(wide.encoder.norms[i].state_dict()[key], value), (i, key)
    for key, value in dense.encoder.final_norm.state_dict().items():
        assert torch.equal(wide.encoder.final_norm.state_dict()[key], value), key


def test_upcycle_noise_is_relative_to_the_weights_std_and_leaves_the_biases():
    """noise > 0 adds noise * std(W) * N(0, 1) to each copy's weight matrices (not to the biases)."""
    dense = _dense_vit(4)
    for ffn in dense.encoder.mlps:  # far from 1: noise not scaled by std(W) would be seen
        assert 0.05 < ffn.fc1.weight.std() < 0.5 and 0.05 < ffn.fc2.weight.std() < 0.5
    got = upcycle(dense, 4, noise=0.1, seed=3).encoder.moes[0].experts
    for e, ffn in enumerate(dense.encoder.mlps):  # E = depth = 4: expert e copies block e
        for ours, weight in ((got.w1[e], ffn.fc1.weight.t()), (got.w2[e], ffn.fc2.weight.t())):
            ratio = ((ours - weight).std() / (0.1 * weight.std())).item()
            assert 0.85 < ratio < 1.15, (e, ratio)
        assert torch.equal(got.b1[e], ffn.fc1.bias) and torch.equal(got.b2[e], ffn.fc2.bias)
    again = upcycle(dense, 4, noise=0.1, seed=3).encoder.moes[0].experts
    assert torch.equal(again.w1, got.w1)  # from `seed`: reproducible
    assert not torch.equal(upcycle(dense, 4, noise=0.1, seed=4).encoder.moes[0].experts.w1, got.w1)


def test_upcycled_router_starts_normal_with_std_one_over_sqrt_dim():
    """The router: normal(0, 1/sqrt(D)) from `seed` (D = 64: 1/8; 8 x 64 draws)."""
    dense = _dense_vit(2, dim=64)
    router = upcycle(dense, 8).encoder.moes[0].router.weight
    assert router.shape == (8, 64)
    assert 0.85 < (router.std() * 64 ** 0.5).item() < 1.15
    assert abs(router.mean().item()) < 4 * 64 ** -0.5 / (8 * 64) ** 0.5  # 4 standard errors of the mean
    assert torch.equal(upcycle(dense, 8, seed=0).encoder.moes[0].router.weight, router)
    assert not torch.equal(upcycle(dense, 8, seed=1).encoder.moes[0].router.weight, router)


def test_an_upcycled_model_is_in_the_mode_of_its_source():
    """A model in eval mode upcycled came back in training mode (a new module's), so its MoE dropped
    tokens by the training capacity and drew router noise where the source was being evaluated."""
    dense = _dense_vit(2)
    for training in (False, True):
        wide = upcycle(dense.train(training), 4)
        assert {m.training for m in wide.modules()} == {training}


def test_upcycled_moe_renormalises_its_top_k_weights():
    """MoE settings: top_k 2 by default and renormalize=True (the K combine weights sum to one), whatever
    the source's MoE config said (vit_tiny's says False), unless the caller asks otherwise. Checked on the function too: a one-block ViT
    has one attention and one FFN, so with equal experts and no drops the WideNet is the ViT; without
    the renormalisation its FFN outputs would be scaled by the top-2 probabilities' sum."""
    dense = _dense_vit(1).eval()
    assert dense.cfg.encoder.moe.renormalize is False
    wide = upcycle(dense, 4, dropless=True)
    moe = wide.cfg.encoder.moe
    assert moe.renormalize is True and moe.top_k == 2 and moe.num_experts == 4 and moe.dropless
    assert wide.encoder.moes[0].router.renormalize is True
    assert upcycle(dense, 4, renormalize=False).cfg.encoder.moe.renormalize is False  # only a default
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(wide.forward_features(images).hidden, dense.forward_features(images).hidden,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wide(images).logits, dense(images).logits, atol=1e-5, rtol=1e-5)
