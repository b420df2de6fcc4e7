"""Pieces shared by text pretraining and fine-tuning: batching, the model, reductions, log text."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..data.batches import epoch_order, num_batches
from ..distributed.env import all_reduce_sum
from ..distributed.parallel import ParallelContext
from ..files import tensors_digest
from ..memory import check_activations_fit
from ..models.registry import apply_overrides, create_model
from .budget import Cadence, time_per_call
from .evaluate import RoutingTally, summed_over_ranks
from .text_config import TextRunConfig

Batch = dict[str, torch.Tensor]  # name -> tensor with the examples on dim 0


def shuffled_batches(data: Batch, batch_size: int, seed: int, epoch: int, start_batch: int) -> Iterator[Batch]:
    """The epoch's batches in an order fixed by (seed, epoch), from `start_batch` on."""
    n = len(next(iter(data.values())))
    order = epoch_order(n, seed, epoch)
    for start in range(start_batch * batch_size, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def split_contents(data: Batch, split: str = "training") -> str:
    """What a resumed run compares to know it trains (split "training") or evaluates (its validation
    or held-out split) on the data it started on (a corpus or task file can change under its name):
    the number of the split's sequences and a hash of their tensors."""
    return f"{len(data['input_ids'])} {split} sequences, token ids {tensors_digest(data)[:12]}"


def build_text_model(cfg: TextRunConfig, vocab_size: int, pad_id: int, seq_len: int, **task: Any) -> nn.Module:
    """The preset sized for the tokenizer; seq_len must fit the model's positions."""
    _refuse_given_settings(cfg, dict(pad_token_id=pad_id), "the tokenizer", "the tokenizer")
    if cfg.model_overrides.get("vocab_size", vocab_size) < vocab_size:  # larger: embedding rows to spare
        raise ValueError(f"--set vocab_size={cfg.model_overrides['vocab_size']}: the tokenizer has {vocab_size} "
                         "pieces, which all need an embedding row (leave vocab_size out)")
    overrides: dict[str, Any] = dict(vocab_size=vocab_size, pad_token_id=pad_id, **task)
    if cfg.dropout:
        overrides["dropout"] = cfg.dropout
    overrides.update(cfg.model_overrides)
    model = create_model(cfg.model, **overrides)
    check_fits_positions(cfg.model, model.cfg.max_positions, seq_len)
    return model


def check_batch_fits(model_cfg: Any, batch_size: int, seq_len: int, parallel: ParallelContext,
                     device: torch.device, amp: torch.dtype | None) -> None:
    """MemoryError before training when a batch of batch_size sequences of seq_len tokens cannot
    keep its activations in this machine's memory (one process on the CPU; see
    widenet.memory.check_activations_fit), rather than the kernel ending the process later."""
    if parallel.checks_host_memory(device):
        check_activations_fit(batch_size, seq_len, model_cfg.encoder, f"the activations of a batch of "
                              f"{batch_size} sequences of {seq_len} tokens", amp)


def check_fits_positions(name: str, max_positions: int, seq_len: int) -> None:
    """Raise ValueError unless sequences of seq_len fit the model's positions."""
    if seq_len > max_positions:
        raise ValueError(f"sequence length {seq_len} exceeds {name}'s {max_positions} positions; "
                         f"use a shorter length or --set max_positions={seq_len}")


def saved_text_model(saved: dict[str, Any], cfg: TextRunConfig, name: str, **task: Any) -> nn.Module:
    """A new model (random weights) of a saved model config with `task`'s fields (task, num_labels) and
    the run's --set settings and --dropout applied, named `name`."""
    from ..models.text import TextConfig, TextTransformer

    _refuse_given_settings(cfg, task, "the run's task", "the task and its data")
    _refuse_given_settings(cfg, {key: saved.get(key) for key in ("vocab_size", "pad_token_id")}, "the model",
                           "the tokenizer the model was trained with")
    changes = dict(cfg.model_overrides, **({"dropout": cfg.dropout} if cfg.dropout else {}))
    model = TextTransformer(apply_overrides(TextConfig(**{**saved, **task}), changes))
    model.model_name = name
    return model


def _refuse_given_settings(cfg: TextRunConfig, given: dict[str, Any], source: str, follows: str) -> None:
    """ValueError for a --set of a model setting that `source` decides (the task: num_labels; the
    tokenizer: vocab_size, pad_token_id), where the two differ: applied, it was silently wrong."""
    for key, value in given.items():
        if key in cfg.model_overrides and value is not None and cfg.model_overrides[key] != value:
            raise ValueError(f"--set {key}={cfg.model_overrides[key]}: {source} gives {key} {value!r} "
                             f"(it follows {follows}: leave {key} out)")


def init_text_model(source: Any, cfg: TextRunConfig, vocab_size: int, seq_len: int, **task: Any) -> nn.Module:
    """The --init model (train/exported.py Source) with its weights, set up for `task`; its heads are
    kept where they fit, else new. The tokenizer must be the one the model's ids came from."""
    from .exported import require_kind, weights_from

    require_kind(source, "text")
    saved = source.meta["model_config"]
    if saved["vocab_size"] < vocab_size:  # more rows than pieces: an embedding padded to spare rows
        raise ValueError(f"the tokenizer has {vocab_size} pieces, the model {source.path} {saved['vocab_size']}: "
                         "pass the tokenizer the model was trained with")
    model = saved_text_model(saved, cfg, source.meta.get("model") or cfg.model, **task)
    weights_from(source, model, skip_heads=True)
    if seq_len > model.cfg.max_positions:
        raise ValueError(f"sequence length {seq_len} exceeds the model's {model.cfg.max_positions} positions")
    return model


def local_rows(batch: Batch, parallel: ParallelContext) -> Batch:
    """This process's contiguous rows of a global batch (all of it on one process)."""
    return {k: parallel.shard(v) for k, v in batch.items()}


def global_sums(sums: dict[str, float], parallel: ParallelContext, device: torch.device) -> dict[str, float]:
    """Per-process sums added over processes (unchanged on one process)."""
    if not parallel.distributed:
        return sums
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return dict(zip(sums, t.tolist()))


def evaluation_batches(data: Batch, batch_size: int, parallel: ParallelContext) -> Iterator[tuple[int | None, Batch]]:
    """This process's share of an evaluation (ParallelContext.evaluation_share): (index, batch) for its
    run of whole batches of `batch_size` rows in order, then (None, a batch of no rows) for each padding
    pass (an empty batch adds nothing to the sums)."""
    first, stop, padding = parallel.evaluation_share(num_batches(len(next(iter(data.values()))), batch_size))
    for i in range(first, stop):
        yield i, {k: v[i * batch_size:(i + 1) * batch_size] for k, v in data.items()}
    for _ in range(padding):
        yield None, {k: v[:0] for k, v in data.items()}


def summed_evaluation(sums: dict[str, float], routing: RoutingTally, parallel: ParallelContext
                      ) -> tuple[dict[str, float], RoutingTally]:
    """An evaluation's sums and routing tally added over processes (unchanged on one process)."""
    if not parallel.distributed:
        return sums, routing
    values, routing = summed_over_ranks(list(sums.values()), routing, parallel)
    return dict(zip(sums, values)), routing


def describe_floats(result: dict[str, Any]) -> str:
    """An evaluation's numbers in one log line: "mlm_loss 4.1234 mlm_accuracy 0.2500 ..."."""
    return " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))


class TextTask:
    """What every text task shares (see the Trainer's Task): shuffled batches of a dict of
    tensors, results that are plain dicts of numbers, evaluation timed by one call, and no
    BatchNorm to recalibrate. Subclasses define loss and evaluate."""

    unit, split = "tokens", "validation"
    def __init__(self, cfg: TextRunConfig, train: Batch, device: torch.device, amp: torch.dtype | None,
                 parallel: ParallelContext, **cadence: int | None) -> None:
        self.cfg, self.train = cfg, train
        self.device, self.amp, self.parallel = device, amp, parallel
        self.steps_per_epoch = num_batches(len(train["input_ids"]), cfg.batch_size)
        self.cadence = Cadence(self.steps_per_epoch, **cadence)

    def batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        return shuffled_batches(self.train, self.cfg.batch_size, self.cfg.seed, epoch, start_batch)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    record = staticmethod(dict)
    describe = staticmethod(describe_floats)

    def time_evaluation(self, model: nn.Module) -> float:
        return time_per_call(lambda: self.evaluate(model), warmup=0, min_calls=1, min_seconds=0.0)

    def calibration_inputs(self) -> None:
        return None  # no BatchNorm in the text models


def describe_processes(parallel: ParallelContext, compile: bool = False) -> str:
    """", 2 processes (ddp)" on several processes, ", compiled" with --compile; else nothing."""
    processes = f", {parallel.env.world_size} processes ({parallel.mode})" if parallel.distributed else ""
    return processes + (", compiled (the first steps compile)" if compile else "")
