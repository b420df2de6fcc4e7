"""torch.distributed on this CPU: real 2-process groups over gloo.

Two launches keep the file fast: one `torchrun ... -m widenet train` (data
parallel through the CLI, from scratch, then resumed in one process) and one
torch.multiprocessing spawn that runs every expert-parallel check and three
training runs (DDP and expert parallel resuming a one-process checkpoint,
FSDP from scratch) in the same two processes; a short spawn checks clipping and
LAMB on a tensor split over the ranks. All are bounded by timeouts, so a hang
fails instead of blocking.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from widenet.cli import main
from widenet.distributed.env import DistEnv, destroy_distributed, exit_without_finalizing, init_distributed
from widenet.distributed.expert_parallel import (ExpertParallelMoE, consolidated_state_dict,
                                                 convert_to_expert_parallel, gather_shards,
                                                 load_consolidated_state_dict, source_to_expert_order)
from widenet.distributed.parallel import ParallelContext, check_global_batch, check_last_batch, shard_bounds
from widenet.layers.moe import MoE
from widenet.train.checkpoint import load_checkpoint
from widenet.train.config import TrainConfig
from widenet.train.evaluate_cli import evaluate_checkpoint
from widenet.train.images import build_model_for, train
from widenet.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT = 120  # seconds for a whole 2-process launch
STEPS = 4

pytestmark = pytest.mark.usefixtures("single_thread")


def _quiet(_line: str) -> None:
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The settings under which the number of processes must not change the result.
EXACT = dict(dropout=0.0, aux_weight=0.0, max_steps=STEPS, batch_size=32, lr=3e-3, log_every=1, save_every=2,
             download=False, device="cpu")
EXACT_MODEL = dict(dropless=True, noise_std=0.0)


def _config(data_dir: Path, out: Path, tiny: dict, **changes) -> TrainConfig:
    settings = dict(EXACT, model="widenet_tiny", data_dir=str(data_dir), out=str(out),
                    model_overrides=dict(tiny, **EXACT_MODEL))
    settings.update(changes)
    return TrainConfig(**settings)


def _assert_close_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-4), \
            f"{key}: max difference {(a[key].float() - b[key].float()).abs().max():.3g}"


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def _train_metric(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def _assert_same_step_metrics(run: Path, reference: Path) -> None:
    """Logged accuracy and aux loss per step are global: the correct predictions summed over the
    ranks, and the mean of the ranks' aux losses (each rank's balance loss is computed on its own
    tokens, so that is close to, not equal to, the one-process value: up to ~2% apart here, where
    a sum instead of a mean is 100% off)."""
    assert _train_metric(run, "accuracy") == pytest.approx(_train_metric(reference, "accuracy"), abs=1e-9)
    assert _train_metric(run, "aux_loss") == pytest.approx(_train_metric(reference, "aux_loss"), rel=0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fmnist_dir, tiny_overrides):
    """The one-process run every multi-process run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_config(fmnist_dir, out, tiny_overrides), log=_quiet)
    return out


@pytest.fixture(scope="module")
def reference_lamb(tmp_path_factory, fmnist_dir, tiny_overrides):
    """The same one-process run with LAMB (its trust ratios need whole-tensor norms)."""
    out = tmp_path_factory.mktemp("ref_lamb") / "run"
    train(_config(fmnist_dir, out, tiny_overrides, optimizer="lamb"), log=_quiet)
    return out


# --- pure pieces ---------------------------------------------------------------------------
def test_dist_env_from_environ():
    assert DistEnv.from_environ({}) == DistEnv(0, 1, 0)
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.distributed) == (3, 4, 1, False, True)
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        DistEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be a whole number"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})


def test_init_distributed_is_a_no_op_on_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistEnv()
    assert not dist.is_initialized()
    destroy_distributed()  # nothing to destroy: no error


def test_shards_cover_the_batch_contiguously():
    assert [shard_bounds(32, r, 2) for r in range(2)] == [(0, 16), (16, 32)]
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    check_global_batch(32, 2)
    with pytest.raises(ValueError, match="--batch-size 33 is the global batch and must be divisible by"):
        check_global_batch(33, 2)
    check_last_batch(256, 32, 2)
    with pytest.raises(ValueError, match="last batch of every epoch holds 1 of 257 images"):
        check_last_batch(257, 32, 2)
    # text runs name their sequences and the one flag they have (they said "images" and --train-subset)
    with pytest.raises(ValueError, match=r"^the last batch of every epoch holds 2 of 32 training sequences, fewer "
                                         r"than the 3 processes; change --batch-size$"):
        check_last_batch(32, 6, 3, "training sequences", "--batch-size")


def test_text_evaluation_takes_whole_batches_in_runs_padded_to_one_count():
    """Text evaluation's share of a process: a contiguous run of the batches one process evaluates (their
    index kept: pretraining's masks follow it), then empty passes up to the most any process makes."""
    from widenet.train.text_common import evaluation_batches

    data = dict(input_ids=torch.arange(20).view(10, 2), labels=torch.arange(10))  # batches of 3: 3 3 3 1

    def shares(world: int) -> list[list[tuple[int | None, list[int]]]]:
        return [[(i, b["labels"].tolist()) for i, b in evaluation_batches(data, 3, ParallelContext(
            DistEnv(rank, world, rank), "ddp"))] for rank in range(world)]

    alone = [(i, b["labels"].tolist()) for i, b in evaluation_batches(data, 3, ParallelContext(DistEnv()))]
    assert alone == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8]), (3, [9])]
    assert shares(2) == [alone[:2], alone[2:]]
    assert shares(3) == [alone[:2], [alone[2], (None, [])], [alone[3], (None, [])]]
    assert shares(5) == [[row] for row in alone] + [[(None, [])]]


def test_loss_scale_makes_an_uneven_last_batch_the_global_mean():
    """25 rows on 2 ranks: 13 and 12. Each rank's mean loss is scaled by local * W / total, so DDP's
    average of the two is the mean over all 25 rows; an even split is left alone (1.0)."""
    ranks = [ParallelContext(DistEnv(r, 2, r), "ddp") for r in range(2)]
    assert ranks[0].loss_scale(13, 25) == pytest.approx(26 / 25, abs=1e-15)
    assert ranks[1].loss_scale(12, 25) == pytest.approx(24 / 25, abs=1e-15)
    assert [c.loss_scale(16, 32) for c in ranks] == [1.0, 1.0]
    assert ParallelContext(DistEnv(), "single").loss_scale(13, 25) == 1.0  # one process: its mean is global
    rows = torch.rand(25, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scaled = []
    for rank, ctx in enumerate(ranks):
        start, stop = shard_bounds(25, rank, 2)
        scaled.append(rows[start:stop].mean() * ctx.loss_scale(stop - start, 25))
    assert float(sum(scaled) / 2) == pytest.approx(float(rows.mean()), abs=1e-15)  # DDP's average


def test_forward_rng_depends_on_seed_step_and_rank_and_restores_the_global_rng():
    """Dropout / router noise inside the forward: a (seed, step, rank) stream, the global RNG untouched."""
    cpu = torch.device("cpu")

    def draw(rank: int, step: int, seed: int = 7) -> torch.Tensor:
        with ParallelContext(DistEnv(rank, 2, rank), "ddp", seed=seed).forward_rng(step, cpu):
            return torch.rand(16)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [draw(rank, 5) for rank in range(2)]
    assert torch.equal(torch.get_rng_state(), before)  # the shared augmentation stream stays in step
    assert not torch.equal(first[0], first[1])  # ranks draw different masks
    assert all(torch.equal(draw(rank, 5), first[rank]) for rank in range(2))  # repeatable (resume)
    assert not torch.equal(draw(0, 6), first[0])  # a new mask every step
    assert not torch.equal(draw(0, 5, seed=8), first[0])
    expected = torch.rand(16)  # the global stream continues as if nothing had been drawn
    torch.set_rng_state(before)
    with ParallelContext(DistEnv(), "single").forward_rng(5, cpu):  # one process: the global RNG itself
        assert torch.equal(torch.rand(16), expected)


def test_clipping_accepts_float64_gradients():
    """Norms were measured with vector_norm(dtype=float32), which refuses float64 gradients."""
    from widenet.distributed.clip import clip_grad_norm, clip_grad_norm_with_shards

    model = torch.nn.Linear(2, 2).double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert float(clip_grad_norm(model.parameters(), None)) == pytest.approx(6 ** 0.5)
    assert float(clip_grad_norm_with_shards(model, [], 1.0)) == pytest.approx(6 ** 0.5)  # no group: no reduce
    for p in model.parameters():  # a norm of 2e39: inf in float32, which would zero every gradient
        p.grad = torch.full_like(p, 1e39)
    assert float(clip_grad_norm_with_shards(model, [], 1.0)) == pytest.approx(6 ** 0.5 * 1e39)
    assert all(torch.allclose(p.grad, torch.full_like(p, 6 ** -0.5)) for p in model.parameters())


def test_source_to_expert_order():
    # 2 sources x 2 local experts: rows arrive (s0e0: 2, s0e1: 1, s1e0: 1, s1e1: 2).
    received = torch.tensor([[2, 1], [1, 2]])
    assert source_to_expert_order(received).tolist() == [0, 1, 3, 2, 4, 5]
    assert source_to_expert_order(torch.zeros(2, 2, dtype=torch.int64)).tolist() == []


def test_batch_not_divisible_by_world_size_is_a_clear_error(tmp_path, fmnist_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main(["train", "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "run"), "--batch-size", "33",
               "--max-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "widenet: error: --batch-size 33 is the global batch and must be divisible by the number of processes (2)"]
    with pytest.raises(ValueError, match="must be divisible"):
        ParallelContext.for_run(33, 0)
    assert not (tmp_path / "run").exists()


def _train_as_rank(rank: int, train_fn, tmp_path: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    """`widenet train` as process `rank` of 2 (no real group) with train() replaced; (rc, stderr lines)."""
    import widenet.distributed.env as env_module
    from widenet.train import images

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(env_module, "init_distributed", lambda *a: DistEnv(rank, 2, rank))
    monkeypatch.setattr(images, "train", train_fn)
    rc = main(["train", "--out", str(tmp_path / "run"), "--batch-size", "32", "--device", "cpu"])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_lost_peer_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    def lost_peer(cfg):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:931: Connection reset by "
                           "peer. This is typically caused by a remote worker hanging\nmore detail")

    rc, lines = _train_as_rank(1, lost_peer, tmp_path, monkeypatch, capsys)
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith("widenet: error: process 1 lost the other processes ([../gloo/transport")
    assert "are intact (--resume)" in lines[0]


def test_the_launchers_sigterm_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """torchrun stops the surviving processes with SIGTERM: each says so in one line, then the handler is reset."""
    def stopped_by_launcher(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt training")

    before = signal.getsignal(signal.SIGTERM)
    rc, lines = _train_as_rank(0, stopped_by_launcher, tmp_path, monkeypatch, capsys)
    assert rc == 2 and len(lines) == 1
    assert "process 0 lost the other processes (stopped by the launcher (SIGTERM)" in lines[0]
    assert signal.getsignal(signal.SIGTERM) is before


def test_parallel_modes_need_processes():
    with pytest.raises(ValueError, match="--fsdp shards the model over several processes"):
        ParallelContext.for_run(32, 0, fsdp=True)
    with pytest.raises(ValueError, match="--expert-parallel 2 must divide the number of processes \\(1\\)"):
        ParallelContext.for_run(32, 0, expert_parallel=2)


def test_expert_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        ExpertParallelMoE(8, 16, 4)


# --- data parallel through the CLI (torchrun) ----------------------------------------------------
def _launch_torchrun(args: list[str], env: dict, log_file, program: tuple[str, ...] = ("-m", "widenet")
                     ) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *program, *args]
    return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def _torchrun(args: list[str], env: dict, log: Path, program: tuple[str, ...] = ("-m", "widenet")) -> int:
    """Run torchrun to the end (at most TIMEOUT seconds); its return code."""
    with log.open("wb") as f:
        proc = _launch_torchrun(args, env, f, program)
        try:
            return proc.wait(timeout=TIMEOUT)
        finally:
            proc.kill()


def _cli_env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WIDENET_DATA_HOME=str(tmp_path / "home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, fmnist_dir, tiny_set_args, reference, tiny_overrides):
    out = tmp_path / "ddp"
    args = ["train", "--data-dir", str(fmnist_dir), *tiny_set_args, "--set", "dropless=True", "--noise-std", "0",
            "--dropout", "0", "--aux-weight", "0", "--max-steps", str(STEPS), "--batch-size", "32", "--lr", "3e-3",
            "--log-every", "1", "--save-every", "2", "--device", "cpu", "--ddp-timeout", "60", "--tta", "flip",
            "--out", str(out)]
    rc = _torchrun(args, _cli_env(tmp_path), tmp_path / "torchrun.log")
    text = (tmp_path / "torchrun.log").read_text(errors="replace")
    assert rc == 0, text[-3000:]
    # Rank 0 alone logs and writes: every line and record once, no stray files.
    assert text.count("done: 4 steps") == 1 and text.count("2 processes (ddp)") == 1
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", s) for s in range(1, 5)] + [("test", 4)]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]

    # Same global batch, no dropout / noise / capacity drops / aux loss: the same run up to rounding.
    final = "checkpoints/step_00000004/model.safetensors"
    _assert_close_weights(load_file(str(out / final)), load_file(str(reference / final)))
    assert _train_losses(out) == pytest.approx(_train_losses(reference), abs=1e-5)
    _assert_same_step_metrics(out, reference)
    assert records[-1]["examples"] == 64  # evaluation sharded over both ranks, reduced
    alone = evaluate_checkpoint(str(out), device="cpu", tta="flip")  # the same weights in one process
    for key in ("accuracy", "single_accuracy", "loss", "single_loss"):
        assert records[-1][key] == pytest.approx(alone[key], abs=1e-6), key

    # The checkpoint loads in one process, and a world-size-1 resume of step 2 ends where the reference does.
    cfg = _config(fmnist_dir, tmp_path / "resumed", tiny_overrides, resume=True)
    model = build_model_for(cfg, _train_set(fmnist_dir))
    assert load_checkpoint(out, model).step == 4
    _copy_back_to_step_2(out, tmp_path / "resumed")
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert any("(step 2)" in line for line in lines)
    _assert_close_weights(load_file(str(tmp_path / "resumed" / final)), load_file(str(reference / final)))


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the launcher's descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    todo = list(children.get(launcher, []))
    while todo:
        pid = todo.pop()
        try:
            if f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
        todo += children.get(pid, [])
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through Linux /proc")
def test_a_killed_rank_stops_the_run_and_the_checkpoint_stays_loadable(tmp_path, fmnist_dir, tiny_set_args):
    """SIGKILL one real worker mid-run: the launch ends (no hang) with a message naming the failure,
    and the newest checkpoint loads."""
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(fmnist_dir), *tiny_set_args, "--max-steps", "5000", "--batch-size", "32",
            "--save-every", "2", "--log-every", "1", "--device", "cpu", "--ddp-timeout", "30", "--out", str(out)]
    log = tmp_path / "torchrun.log"
    with log.open("wb") as f:
        proc = _launch_torchrun(args, _cli_env(tmp_path), f)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (out / "checkpoints" / "latest").exists():
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "no checkpoint written"
                time.sleep(0.2)
            victim = _worker_pid(proc.pid, rank=1)
            assert victim is not None, "rank 1 not found"
            os.kill(victim, signal.SIGKILL)
            rc = proc.wait(timeout=TIMEOUT)  # a hang fails here
        finally:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc != 0
    # The survivor's own one-line error (its collective failed, or the launcher's SIGTERM), and torchrun's report.
    assert "widenet: error: process 0 lost the other processes" in text, text[-3000:]
    assert "are intact (--resume)" in text and "rank      : 1 (local_rank: 1)" in text
    ckpt = load_checkpoint(out)  # the newest complete checkpoint: a fresh loader reads it
    assert ckpt.step >= 2 and ckpt.step % 2 == 0


def _copy_back_to_step_2(run: Path, to: Path) -> None:
    """A copy of a finished 4-step run whose newest checkpoint is step 2 (as if killed after it)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step_00000004")
    (to / "checkpoints" / "latest").write_text("step_00000002\n")


def _train_set(data_dir: Path):
    from widenet.data.images import load_dataset

    return load_dataset("fashion-mnist", "train", data_dir, download=False)


# --- expert parallel (and FSDP) in two spawned processes ----------------------------------------------
def _entry(rank: int, port: int, world: int, checks: list[str], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=60)
    try:
        for name in checks:
            globals()[name](rank, *args)
    finally:
        destroy_distributed()
    exit_without_finalizing(0)  # as the CLI does: finalizing could abort a process whose checks all passed


def _spawn(checks: list[str], *args, world: int = WORLD) -> None:
    """Run the named check functions, in order, on `world` ranks; fail on an error or after TIMEOUT."""
    context = mp.start_processes(_entry, args=(_free_port(), world, checks, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process checks did not finish within {TIMEOUT} s (a hang?)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def _tokens(sizes: list[int], dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in sizes]


def _check_ep_matches_moe(rank: int, sizes: list[int], **moe_kwargs) -> None:
    """Rank r's EP output, aux loss, stats and gradients == the one-process MoE's on rank r's tokens."""
    torch.manual_seed(0)
    ref = MoE(8, 16, num_experts=4, top_k=2, noise_std=0.0, **moe_kwargs).double()
    ep = ExpertParallelMoE.from_moe(copy.deepcopy(ref))
    xs, gs = _tokens(sizes, 8, seed=1), _tokens(sizes, 8, seed=2)
    xs = [x.requires_grad_() for x in xs]
    ref_outs = [ref(x) for x in xs]
    sum((o.output * g).sum() + 0.3 * o.aux_loss for o, g in zip(ref_outs, gs)).backward()

    x = xs[rank].detach().clone().requires_grad_()
    out = ep(x)
    ((out.output * gs[rank]).sum() + 0.3 * out.aux_loss).backward()
    want = ref_outs[rank]
    assert torch.allclose(out.output, want.output, atol=1e-12)
    assert torch.allclose(out.aux_loss, want.aux_loss, atol=1e-12)
    for field in ("expert_fraction", "dropped_fraction", "dropped_assignment_fraction", "balance_loss"):
        assert torch.allclose(getattr(out.stats, field), getattr(want.stats, field)), field
    want_grad = xs[rank].grad if xs[rank].grad is not None else torch.zeros_like(x)  # MoE skips 0 tokens
    assert torch.allclose(x.grad, want_grad, atol=1e-12)
    for name in ("w1", "b1", "w2", "b2"):
        full = gather_shards(getattr(ep.experts, name).grad)
        assert torch.allclose(full, getattr(ref.experts, name).grad, atol=1e-12), name
    router = ep.router.weight.grad.clone()
    dist.all_reduce(router)
    assert torch.allclose(router, ref.router.weight.grad, atol=1e-12)
    if moe_kwargs.get("capacity_factor", 2.0) < 1.0 and sizes[rank] > 0:
        assert float(out.stats.dropped_assignment_fraction) > 0  # dropping really happened


def ep_dropless(rank: int, *_) -> None:
    _check_ep_matches_moe(rank, [13, 7], dropless=True)


def ep_with_dropping(rank: int, *_) -> None:
    _check_ep_matches_moe(rank, [16, 11], capacity_factor=0.5)


def ep_rank_without_tokens(rank: int, *_) -> None:
    _check_ep_matches_moe(rank, [9, 0], dropless=True)


def ep_checkpoint_helpers(rank: int, *_) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), MoE(8, 16, num_experts=4))
    full = {k: v.clone() for k, v in net.state_dict().items()}
    convert_to_expert_parallel(net)
    assert isinstance(net[1], ExpertParallelMoE) and net[1].experts.w1.shape[0] == 2
    gathered = consolidated_state_dict(net)
    assert gathered.keys() == full.keys()
    assert all(torch.equal(gathered[k], full[k]) for k in full)
    changed = {k: v + 1 for k, v in full.items()}
    load_consolidated_state_dict(net, changed)
    assert torch.equal(net[1].experts.w1, changed["1.experts.w1"][2 * rank:2 * rank + 2])


def ep_widenet_model(rank: int, data_dir: str, tiny: dict, *_) -> None:
    """A WideNet (one MoE shared by every block) converted to EP: same logits and gradients per rank."""
    cfg = _config(Path(data_dir), Path("unused"), tiny)
    torch.manual_seed(0)
    ref = build_model_for(cfg, _train_set(Path(data_dir))).double()
    ep = convert_to_expert_parallel(copy.deepcopy(ref))
    images = torch.randn(2 * WORLD, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out_ref = ref(images)
    out_ref.logits.square().sum().backward()
    mine = images[2 * rank:2 * rank + 2]
    out = ep(mine)
    (out.logits.square().sum()).backward()
    assert torch.allclose(out.logits, ref(mine).logits, atol=1e-10)
    w1 = gather_shards(ep.encoder.moes[0].experts.w1.grad)
    assert torch.allclose(w1, ref.encoder.moes[0].experts.w1.grad, atol=1e-10)


def ddp_activation_checkpointing(rank: int, data_dir: str, tiny: dict, *_) -> None:
    """DDP over a WideNet that recomputes its blocks in backward (its shared modules run in every
    block, twice): no "marked ready twice", and the gradients of the full batch."""
    import dataclasses

    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    cfg = _config(Path(data_dir), Path("unused"), tiny)
    torch.manual_seed(0)
    ref = build_model_for(cfg, _train_set(Path(data_dir))).double()
    model = copy.deepcopy(ref)
    model.encoder.cfg = dataclasses.replace(model.encoder.cfg, activation_checkpointing=True)
    ddp = DistributedDataParallel(model)
    images = torch.randn(2 * WORLD, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.arange(2 * WORLD)
    F.cross_entropy(ref(images).logits, labels).backward()
    mine = slice(2 * rank, 2 * rank + 2)
    for _ in range(2):  # the reducer's hooks must work on every step, not only the first
        ddp.zero_grad()
        F.cross_entropy(ddp(images[mine]).logits, labels[mine]).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), name


def sharded_clip_and_lamb(rank: int, *_) -> None:
    """Each rank holds half the rows of one tensor (a marked shard), the halves 10x apart in scale:
    clipping and one LAMB step give what one process gives for the whole tensor. Clipping runs in
    float32 (training's dtype), LAMB in float64."""
    from widenet.distributed.clip import clip_grad_norm_with_shards
    from widenet.distributed.shards import mark_sharded
    from widenet.train.optim import Lamb

    g = torch.Generator().manual_seed(11)
    weight, grad = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    weight[3:] *= 10  # rank 1's weight rows are large
    grad[:3] *= 10  # rank 0's gradient rows are large
    bias, bias_grad = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2))  # replicated
    mine = slice(3 * rank, 3 * rank + 3)

    def module(w: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
        m = torch.nn.Module()
        m.w, m.b = torch.nn.Parameter(w.to(dtype, copy=True)), torch.nn.Parameter(bias.to(dtype, copy=True))
        m.b.grad = bias_grad.to(dtype, copy=True)
        return m

    whole, shard = module(weight, torch.float32), module(weight[mine], torch.float32)
    whole.w.grad, shard.w.grad = grad.float(), grad[mine].float()
    want = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.5)  # one process, the whole tensor
    assert float(want) > 5.0  # clipping really scales the gradients down
    norm = clip_grad_norm_with_shards(shard, [shard.w], 0.5)
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    assert torch.allclose(shard.w.grad, whole.w.grad[mine], rtol=1e-6, atol=0)
    assert torch.allclose(shard.b.grad, whole.b.grad, rtol=1e-6, atol=0)

    whole, shard = module(weight, torch.float64), module(weight[mine], torch.float64)
    whole.w.grad, shard.w.grad = grad.clone(), grad[mine].clone()
    mark_sharded(shard.w, None)  # split over the default group
    for m in (whole, shard):
        Lamb([m.w], lr=0.1, weight_decay=0.01).step()
    assert torch.allclose(shard.w.detach(), whole.w.detach()[mine], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_sharded_clipping_and_lamb_use_the_norms_of_the_whole_tensor():
    _spawn(["sharded_clip_and_lamb"])


def _parallel_run(rank: int, data_dir: str, tiny: dict, out: str, **changes) -> None:
    cfg = _config(Path(data_dir), Path(out), tiny, **changes)
    lines: list[str] = []
    train(cfg, log=lines.append)
    if rank == 0:
        assert load_checkpoint(Path(out)).step == STEPS
        assert any("(step 2)" in line for line in lines) == cfg.resume
    else:
        assert lines == []  # rank 0 alone logs


def ddp_resume(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """World size 2 continues a one-process run from its step-2 checkpoint."""
    _parallel_run(rank, data_dir, tiny, out + "/ddp", resume=True)


def expert_parallel_resume(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """Expert parallel continues a one-process run: full weights and optimizer state are sharded."""
    _parallel_run(rank, data_dir, tiny, out + "/ep", expert_parallel=WORLD, resume=True)


def fsdp_training(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    _parallel_run(rank, data_dir, tiny, out + "/fsdp", fsdp=True)


def fsdp_lamb_training(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """LAMB over sharded parameters: each trust ratio must use the norms of the whole tensor."""
    _parallel_run(rank, data_dir, tiny, out + "/fsdp_lamb", fsdp=True, optimizer="lamb")


def expert_parallel_lamb_training(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """The same with the experts split over the ranks (trust ratios of expert shards summed over ranks)."""
    _parallel_run(rank, data_dir, tiny, out + "/ep_lamb", expert_parallel=WORLD, optimizer="lamb")


def conv_stem_runs(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """The conv stem's BatchNorm statistics, updated by each rank on its own rows, in every mode."""
    conv = dict(tiny, stem="conv", patch_size=8, stem_width=32)
    for name, changes in (("ddp", {}), ("fsdp", dict(fsdp=True)), ("ep", dict(expert_parallel=WORLD))):
        _parallel_run(rank, data_dir, conv, f"{out}/bn_{name}", **changes)


@pytest.mark.slow
def test_batch_norm_statistics_are_rank_0s_when_evaluated_and_saved(tmp_path, fmnist_dir, tiny_overrides):
    """Each rank updates its BatchNorm statistics on its own rows (DDP copies rank 0's only at the start of a
    training forward; FSDP and expert shards never): every rank must take rank 0's, the ones the checkpoint
    holds, before the sharded evaluation, or the logged metrics are not the saved model's."""
    _spawn(["conv_stem_runs"], str(fmnist_dir), dict(tiny_overrides), str(tmp_path))
    for name in ("ddp", "fsdp", "ep"):
        logged = read_metrics(tmp_path / f"bn_{name}" / "metrics.jsonl")[-1]
        alone = evaluate_checkpoint(str(tmp_path / f"bn_{name}"), device="cpu")
        assert logged["split"] == "test" and logged["examples"] == alone["examples"]
        for key in ("accuracy", "loss"):  # (3e-4 apart in the loss before; the sums' rounding: 3e-7)
            assert logged[key] == pytest.approx(alone[key], abs=1e-6), (name, key)


@pytest.mark.slow
def test_expert_parallel_and_fsdp_on_two_processes(tmp_path, fmnist_dir, tiny_overrides, reference, reference_lamb):
    for name in ("ddp", "ep"):
        _copy_back_to_step_2(reference, tmp_path / name)
    checks = ["ep_dropless", "ep_with_dropping", "ep_rank_without_tokens", "ep_checkpoint_helpers",
              "ep_widenet_model", "ddp_activation_checkpointing", "ddp_resume", "expert_parallel_resume", "fsdp_training",
              "fsdp_lamb_training", "expert_parallel_lamb_training"]
    _spawn(checks, str(fmnist_dir), dict(tiny_overrides), str(tmp_path))
    final = "checkpoints/step_00000004/model.safetensors"
    expected = load_file(str(reference / final))
    ref_state = load_checkpoint(reference).train_state["optimizer"]
    for mode in ("ddp", "ep", "fsdp"):
        # Consolidated checkpoints: the plain model's keys and shapes, the one-process result.
        _assert_close_weights(load_file(str(tmp_path / mode / final)), expected)
        assert _train_losses(tmp_path / mode) == pytest.approx(_train_losses(reference), abs=1e-5)
        _assert_same_step_metrics(tmp_path / mode, reference)
        state = load_checkpoint(tmp_path / mode).train_state["optimizer"]
        assert state["state"].keys() == ref_state["state"].keys()
        for index, entry in ref_state["state"].items():
            assert torch.allclose(state["state"][index]["exp_avg"], entry["exp_avg"], atol=1e-6), (mode, index)
    for mode in ("fsdp_lamb", "ep_lamb"):
        _assert_close_weights(load_file(str(tmp_path / mode / final)), load_file(str(reference_lamb / final)))
        assert _train_losses(tmp_path / mode) == pytest.approx(_train_losses(reference_lamb), abs=1e-5), mode
        _assert_same_step_metrics(tmp_path / mode, reference_lamb)


def expert_and_data_parallel_training(rank: int, data_dir: str, tiny: dict, out: str) -> None:
    """4 processes, --expert-parallel 2: ranks 0-1 and 2-3 each split the experts, and replicate each other."""
    _parallel_run(rank, data_dir, tiny, out + "/ep_dp", expert_parallel=2)
    _parallel_run(rank, data_dir, tiny, out + "/ep_dp_lamb", expert_parallel=2, optimizer="lamb")


@pytest.mark.slow
def test_expert_parallel_groups_with_data_parallel_replicas(tmp_path, fmnist_dir, tiny_overrides, reference,
                                                             reference_lamb):
    _spawn(["expert_and_data_parallel_training"], str(fmnist_dir), dict(tiny_overrides), str(tmp_path), world=4)
    final = "checkpoints/step_00000004/model.safetensors"
    for mode, ref in (("ep_dp", reference), ("ep_dp_lamb", reference_lamb)):
        _assert_close_weights(load_file(str(tmp_path / mode / final)), load_file(str(ref / final)))
        assert _train_losses(tmp_path / mode) == pytest.approx(_train_losses(ref), abs=1e-5), mode


@pytest.mark.slow
def test_bench_ddp_reports_scaling_efficiency(capsys):
    assert main(["bench", "ddp", "--model", "vit_tiny", "--batch-size", "8", "--steps", "2", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["processes"] == 2 and r["images_per_s_1"] > 0 and r["images_per_s_n"] > 0
    assert r["efficiency"] == pytest.approx(r["images_per_s_n"] / (2 * r["images_per_s_1"]))
    assert main(["bench", "ddp", "--batch-size", "7"]) == 2
    assert "must be divisible by 2" in capsys.readouterr().err


def test_bench_ddp_checks_the_model_before_launching_and_names_a_worker_failure(capsys, monkeypatch):
    from widenet.bench import ddp_bench

    launched = []
    monkeypatch.setattr(ddp_bench, "_launch", lambda *a: launched.append(a) or 1.0)
    assert main(["bench", "ddp", "--model", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "ddp", "--model", "albert_text_tiny"]) == 2
    assert "albert_text_tiny is a text model" in capsys.readouterr().err
    assert main(["bench", "ddp", "--model", "vit_tiny", "--expert-parallel"]) == 2  # was timed as "expert parallel"
    assert "vit_tiny has no MoE layers, so there are no experts to split" in capsys.readouterr().err
    assert main(["bench", "ddp", "--model", "widenet_tiny", "--processes", "3", "--batch-size", "6",
                 "--expert-parallel"]) == 2
    assert "divisible by 3; widenet_tiny has 4" in capsys.readouterr().err
    assert launched == []  # none reached torchrun
    monkeypatch.setattr(ddp_bench.os, "sched_getaffinity", lambda pid: {0})  # this process may use one core
    monkeypatch.setattr(ddp_bench.torch.cuda, "is_available", lambda: False)
    assert main(["bench", "ddp", "--model", "vit_tiny", "--batch-size", "8", "--steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "2 processes on 1 CPU core(s): they take turns" in err and "global batch 8, 1 step: " in out
    monkeypatch.setattr(ddp_bench.os, "sched_getaffinity", lambda pid: {0, 1})  # a core each: no note
    assert main(["bench", "ddp", "--model", "vit_tiny", "--batch-size", "8", "--steps", "1"]) == 0
    assert "take turns" not in capsys.readouterr().err
    monkeypatch.setattr(ddp_bench.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(ddp_bench.torch.cuda, "is_available", lambda: True)  # a GPU each: the cores do not count
    monkeypatch.setattr(ddp_bench.torch.cuda, "device_count", lambda: 2)
    assert main(["bench", "ddp", "--model", "vit_tiny", "--batch-size", "8", "--steps", "1"]) == 0
    assert "take turns" not in capsys.readouterr().err
    launched.clear()
    assert main(["bench", "ddp", "--model", "vit_tiny", "--processes", "4", "--batch-size", "8"]) == 2
    assert "--processes 4: this machine has 2 GPU(s), and each process takes one" in capsys.readouterr().err
    monkeypatch.setattr(ddp_bench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ddp_bench, "check_fits_memory", lambda need, what: (_ for _ in ()).throw(
        MemoryError(f"{what} need {need}")))  # a machine without room for the workers
    assert main(["bench", "ddp", "--model", "vit_tiny", "--processes", "4", "--batch-size", "8"]) == 2
    assert f"--processes 4: 4 workers (each a Python process with torch loaded) need {4 * 220 << 20}" in (
        capsys.readouterr().err)
    assert launched == []  # refused before torchrun
    # torchrun frames a worker's failure with rules of "="; the message names the exception instead,
    # a worker's before torchrun's own, with the "[rankN]: " torchrun puts before each worker line.
    output = ("[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: expert parallelism needs 4\n"
              "Traceback (most recent call last):\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 60 + "\n")
    assert ddp_bench._failure_line(output) == "ValueError: expert parallelism needs 4"
    output = ("Traceback (most recent call last):\n  File \"w.py\", line 1\nRuntimeError: out of memory\n"
              "E1201 12:00:00 failed (exitcode: 1)\n" + "=" * 60 + "\nRoot Cause:\n" + "=" * 60 + "\n")
    assert ddp_bench._failure_line(output) == "RuntimeError: out of memory"
    assert ddp_bench._failure_line("killed\n" + "=" * 60) == "killed"
    assert ddp_bench._failure_line("") == "no output"


# `widenet`, with each eval-mode forward pass of a text model adding a line with its number of rows to
# OUT.evaluated/rowsRANK beside the run folder OUT (which rows each process evaluated), and each QA
# evaluation a line with its answers to OUT.evaluated/answersRANK.
_COUNTING_CLI = """
import json
import os
import sys
from pathlib import Path

import widenet.train.finetune
from widenet.models.text import TextTransformer

out = Path(sys.argv[sys.argv.index("--out") + 1])
rows, answers = (out.parent / f"{out.name}.evaluated" / f"{what}{os.environ.get('RANK', '0')}"
                 for what in ("rows", "answers"))
rows.parent.mkdir(parents=True, exist_ok=True)
forward, postprocess = TextTransformer.forward, widenet.train.finetune.postprocess_squad


def counted(self, input_ids, *args, **kwargs):
    if not self.training:
        with rows.open("a") as f:
            f.write(f"{len(input_ids)}\\n")
    return forward(self, input_ids, *args, **kwargs)


def recorded(*args, **kwargs):
    predictions = postprocess(*args, **kwargs)
    with answers.open("a") as f:
        f.write(json.dumps(predictions) + "\\n")
    return predictions


TextTransformer.forward, widenet.train.finetune.postprocess_squad = counted, recorded
from widenet.__main__ import run

run()
"""


def _text_runs(tmp_path: Path):
    """A corpus, one tokenizer, a classification and a QA task; command builders for pretrain and
    finetune (evaluation batches of 3 rows: 8 held-out sequences make 3 batches, 16 validation examples
    6, 8 validation questions 30 windows, 10 batches, the 4th question's windows on both halves)."""
    import random

    from test_text_train import PHRASES, TINY_TEXT, _squad, _write_classify

    from widenet.data.text.tokenizer import save_tokenizer, train_tokenizer

    rng = random.Random(0)
    docs = [" ".join(rng.choice(PHRASES).capitalize() for _ in range(rng.randint(3, 6))) for _ in range(60)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    save_tokenizer(train_tokenizer(docs, vocab_size=120), tmp_path / "tok.json")  # one vocabulary for all
    _write_classify(tmp_path / "train.tsv", 32, 0)
    _write_classify(tmp_path / "dev.tsv", 16, 1)
    _squad(tmp_path / "train.json", 32, 0)
    _squad(tmp_path / "dev.json", 8, 1)
    (tmp_path / "counting_cli.py").write_text(_COUNTING_CLI, encoding="utf-8")
    sets = [f"--set={k}={v}" for k, v in TINY_TEXT.items()]

    def common(model: str) -> list[str]:
        return ["--model", model, "--tokenizer", str(tmp_path / "tok.json"), "--batch-size", "8", "--max-steps", "4",
                "--log-every", "1", "--dropout", "0", "--eval-batch-size", "3", *sets]

    def pretrain_args(out: Path, model: str = "bert_text_tiny", *extra: str) -> list[str]:
        return ["pretrain", "--corpus", str(tmp_path / "corpus.txt"), "--seq-len", "32", "--eval-examples", "8",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *common(model), *extra]

    def finetune_args(init: Path, out: Path, task: str = "classify", *extra: str) -> list[str]:
        files = ("train.tsv", "dev.tsv") if task == "classify" else ("train.json", "dev.json")
        windows = ["--max-len", "24", "--doc-stride", "8"] if task == "qa" else []
        return ["finetune", "--task", task, "--init", str(init), "--train", str(tmp_path / files[0]),
                "--validation", str(tmp_path / files[1]), "--out", str(out), *windows, *common("bert_text_tiny")[2:],
                *extra]

    return _cli_env(tmp_path), pretrain_args, finetune_args


def _counting_cli(args: list[str]) -> tuple[str, ...]:
    """The program that runs `args` counting evaluated rows (_COUNTING_CLI, written by _text_runs)."""
    return (str(Path(args[args.index("--out") + 1]).parent / "counting_cli.py"),)


def _one_process(args: list[str], env: dict) -> None:
    one = subprocess.run([sys.executable, *_counting_cli(args), *args], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-2000:]


def _two_processes(args: list[str], env: dict, log: Path, mode: str) -> None:
    rc = _torchrun(args, env, log, _counting_cli(args))
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert text.count("done: 4 steps") == 1 and text.count(f"2 processes ({mode})") == 1


def _assert_same_text_run(a: Path, b: Path, key: str, noise: tuple[str, ...] = ()) -> None:
    final = "checkpoints/step_00000004/model.safetensors"
    # The key third of a qkv bias has a true gradient of exactly zero (softmax ignores a constant
    # added to every key), so its gradient is rounding noise that AdamW scales up to +-lr steps:
    # those tensors (and `noise`, others alike) are left out; the loss trajectories below cover them.
    wa, wb = (load_file(str(run / final)) for run in (a, b))
    left_out = ("qkv.bias", *noise)
    _assert_close_weights(*({k: v for k, v in w.items() if not k.endswith(left_out)} for w in (wb, wa)))
    ra = [r for r in read_metrics(a / "metrics.jsonl") if r["split"] == "train"]
    rb = [r for r in read_metrics(b / "metrics.jsonl") if r["split"] == "train"]
    assert [r[key] for r in rb] == pytest.approx([r[key] for r in ra], abs=1e-5)
    # The validation metrics too (of weights equal up to rounding), routing included.
    va, vb = ([r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "validation"] for run in (a, b))
    assert len(va) == len(vb) > 0
    for x, y in zip(va, vb):
        _assert_same_numbers(y, x, 1e-5)


def _assert_same_numbers(got, expected, tol: float, where: str = "") -> None:
    """Equal keys and lists, numbers within tol, everywhere inside a record."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_numbers(got[key], expected[key], tol, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same_numbers(g, e, tol, f"{where}[{i}]")
    else:
        assert got == pytest.approx(expected, abs=tol), where


def _assert_evaluated_shares(one: Path, two: Path) -> None:
    """The processes of run `two` evaluated contiguous shares of the batches that run `one` evaluated in one
    process (the same batches, not each all of them), padded with empty passes to as many passes each."""
    (alone,) = _evaluated_rows(one).values()
    evaluations = len([r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "validation"])
    batches = alone[:len(alone) // evaluations]
    assert len(batches) > WORLD and alone == batches * evaluations
    passes = -(-len(batches) // WORLD)
    shares = _evaluated_rows(two)
    assert sorted(shares) == list(range(WORLD))
    for rank, rows in shares.items():
        start, stop = shard_bounds(len(batches), rank, WORLD)
        assert rows == (batches[start:stop] + [0] * (passes - (stop - start))) * evaluations, rank


def _evaluated_rows(run: Path) -> dict[int, list[int]]:
    """rank -> the rows of each of its eval-mode forward passes (written by _COUNTING_CLI)."""
    return {int(f.name.removeprefix("rows")): [int(n) for n in f.read_text().split()]
            for f in (run.parent / f"{run.name}.evaluated").glob("rows*")}


def _evaluated_answers(run: Path) -> dict[int, dict[str, str]]:
    """rank -> its last QA evaluation's answers, question id -> text (written by _COUNTING_CLI)."""
    return {int(f.name.removeprefix("answers")): json.loads(f.read_text().splitlines()[-1])
            for f in (run.parent / f"{run.name}.evaluated").glob("answers*")}


def _evaluated_alone(args: list[str], run: Path, copy: Path) -> dict:
    """What one process (this one) reports of the final weights of `run` (made by `args`): a copy of the
    finished run, resumed, evaluates them."""
    from widenet.cli import build_parser
    from widenet.cli_args import config_fields, parse_command_line
    from widenet.train.finetune import finetune
    from widenet.train.pretrain import pretrain
    from widenet.train.text_config import FinetuneConfig, PretrainConfig

    shutil.copytree(run, copy)
    ns = parse_command_line(build_parser(), [*args, "--out", str(copy), "--resume", "--device", "cpu"])
    fn, cls = (pretrain, PretrainConfig) if ns.command == "pretrain" else (finetune, FinetuneConfig)
    return fn(cls(**config_fields(ns, cls)), log=_quiet).run.final_eval


def _answers_alone(args: list[str], run: Path, copy: Path) -> dict[str, str]:
    """The answers one process (this one) gives with the final weights of the QA run `run` (made by `args`)."""
    import widenet.train.finetune as finetune

    postprocess, answers = finetune.postprocess_squad, []
    finetune.postprocess_squad = lambda *a, **k: answers.append(postprocess(*a, **k)) or answers[-1]
    try:
        _evaluated_alone(args, run, copy)
    finally:
        finetune.postprocess_squad = postprocess
    return answers[-1]


def _assert_evaluated_as_alone(args: list[str], run: Path, copy: Path) -> None:
    """The last validation record of a run on 2 processes is what one process evaluates of the same weights."""
    record = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "validation"][-1]
    alone = _evaluated_alone(args, run, copy)
    _assert_same_numbers({k: v for k, v in record.items() if k not in ("split", "step", "epoch")}, alone, 1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:5% of .*train.json's word pieces are \[UNK\]")  # ("?")
def test_text_pretraining_and_finetuning_on_two_processes_match_one(tmp_path):
    """`widenet pretrain` / `finetune` under torchrun: the global batch's masks are drawn before it is
    split and losses are normalised by global counts, so 2 processes follow 1 up to rounding. Evaluation
    is sharded: each process evaluates its run of whole evaluation batches (pretraining: 2 and 1 of 3,
    the second with an empty padding pass; classification: 3 and 3 of 6; QA: 5 and 5 of 10) and the
    sums are added, so the logged validation metrics are those one process gets of the same weights.
    QA scores every question from the start and end logits of all its windows, added over the processes."""
    env, pretrain_args, finetune_args = _text_runs(tmp_path)
    for args in (pretrain_args(tmp_path / "pre1"), finetune_args(tmp_path / "pre1", tmp_path / "ft1"),
                 finetune_args(tmp_path / "pre1", tmp_path / "qa1", "qa")):
        _one_process(args, env)
    _two_processes(pretrain_args(tmp_path / "pre2"), env, tmp_path / "pre.log", "ddp")
    _two_processes(finetune_args(tmp_path / "pre2", tmp_path / "ft2"), env, tmp_path / "ft.log", "ddp")
    # (QA under DDP failed at its second step, waiting for a gradient of the pooler, which its loss never
    # reaches; DDP now leaves the pooler out)
    qa2 = finetune_args(tmp_path / "pre2", tmp_path / "qa2", "qa")
    _two_processes(qa2, env, tmp_path / "qa.log", "ddp")
    _assert_same_text_run(tmp_path / "pre1", tmp_path / "pre2", "mlm_loss")
    _assert_same_text_run(tmp_path / "ft1", tmp_path / "ft2", "loss")
    # (a span head's bias and the final norm's, through it, only shift every position's logit alike, which
    # the softmax over positions ignores: zero gradient, as the key bias)
    _assert_same_text_run(tmp_path / "qa1", tmp_path / "qa2", "loss", ("span_head.proj.bias", "final_norm.bias"))
    for one, two in (("pre1", "pre2"), ("ft1", "ft2"), ("qa1", "qa2")):
        _assert_evaluated_shares(tmp_path / one, tmp_path / two)
    _assert_evaluated_as_alone(pretrain_args(tmp_path / "pre2"), tmp_path / "pre2", tmp_path / "pre2_alone")
    _assert_evaluated_as_alone(finetune_args(tmp_path / "pre2", tmp_path / "ft2"), tmp_path / "ft2",
                               tmp_path / "ft2_alone")
    _assert_evaluated_as_alone(qa2, tmp_path / "qa2", tmp_path / "qa2_alone")
    # (the scores of 4 steps' weights say little: the answers themselves are compared, every question's)
    answers = _evaluated_answers(tmp_path / "qa2")
    assert answers[0] == answers[1] == _answers_alone(qa2, tmp_path / "qa2", tmp_path / "qa2_answers")
    assert len(answers[0]) == 8 and len(set(answers[0].values())) > 1


@pytest.mark.slow
def test_text_pretraining_fully_sharded_and_expert_parallel_match_one_process(tmp_path):
    """The one trainer gives text runs --fsdp and --expert-parallel too: BERT-style pretraining with its
    weights sharded, and WideNet pretraining with its experts split over 2 processes (dropless, no
    router noise, no balance loss: then the experts compute what one process computes). Both make the
    evaluation's forward passes together (FSDP gathers weights, expert parallel exchanges tokens): the
    process with fewer batches makes an empty pass with the other's last one."""
    env, pretrain_args, _ = _text_runs(tmp_path)
    exact = ("--dropless", "--noise-std", "0", "--aux-weight", "0")
    _one_process(pretrain_args(tmp_path / "bert1"), env)
    _one_process(pretrain_args(tmp_path / "wide1", "widenet_text_tiny", *exact), env)
    _two_processes(pretrain_args(tmp_path / "fsdp", "bert_text_tiny", "--fsdp"), env, tmp_path / "fsdp.log", "fsdp")
    _two_processes(pretrain_args(tmp_path / "ep", "widenet_text_tiny", *exact, "--expert-parallel", "2"), env,
                   tmp_path / "ep.log", "expert")
    _assert_same_text_run(tmp_path / "bert1", tmp_path / "fsdp", "mlm_loss")
    _assert_same_text_run(tmp_path / "wide1", tmp_path / "ep", "mlm_loss")
    _assert_evaluated_shares(tmp_path / "bert1", tmp_path / "fsdp")
    _assert_evaluated_shares(tmp_path / "wide1", tmp_path / "ep")


def test_a_slow_join_says_what_it_waits_for_and_a_quick_one_says_nothing(monkeypatch, caplog):
    """WORLD_SIZE and RANK left set without torchrun: the process waited for peers that never came,
    for torch's whole rendezvous timeout, without a word."""
    import time

    import widenet.distributed.env as env_module

    joins, joins_delay = [], [0.5]

    def join(*_args, **_kwargs):  # the rendezvous, taking joins_delay[0] seconds
        time.sleep(joins_delay[0])
        joins.append(1)

    monkeypatch.setattr(env_module, "JOIN_NOTE_AFTER_S", 0.05)
    monkeypatch.setattr(env_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(env_module.dist, "init_process_group", join)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29533")
    with caplog.at_level("WARNING", logger="widenet.distributed"):
        env_module.init_distributed("gloo")
    assert caplog.messages == ["process 1 of 2 is still waiting for the others at 10.0.0.7:29533; started "
                               "without torchrun? then unset WORLD_SIZE and RANK"]
    caplog.clear()
    joins_delay[0] = 0.0  # (a note due after 1 s: a loaded machine may pause this thread for 50 ms)
    monkeypatch.setattr(env_module, "JOIN_NOTE_AFTER_S", 1.0)
    with caplog.at_level("WARNING", logger="widenet.distributed"):
        env_module.init_distributed("gloo")
        time.sleep(1.2)  # past the note's time: the timer was cancelled when the join ended
    assert caplog.messages == [] and len(joins) == 2
