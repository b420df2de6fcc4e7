"""TensorBoard event files beside metrics.jsonl (`--tensorboard`): every record, as scalars.

Every record the Trainer writes to OUT/metrics.jsonl also goes, on the main
process only, to event files in OUT/tensorboard/ at the record's step:

    train/loss, train/aux_loss, train/accuracy, train/lr, train/images_per_s, ...   (log lines)
    test/accuracy, test/loss, validation/mlm_accuracy, test_ema/..., ...           (evaluations)
    routing/<split>/block<b>/expert_load/e<i>   fraction of the block's assignments to expert i
    routing/<split>/block<b>/dropped            fraction of the block's tokens dropped (no expert left)
    routing/<split>/block<b>/dropped_assignments  fraction of its (token, expert) assignments dropped

(``<split>`` is the record's split; blocks count from 0, as in metrics.jsonl.)
Numbers nested in dicts or lists become ``<split>/<key>/<subkey>`` tags;
strings, booleans and the step and epoch counters are left out.

A resumed run appends a new event file. Its first event tells TensorBoard to
drop what earlier files hold from the step after the checkpoint on (the steps
the resumed run writes again, as metrics.jsonl is cut back to the checkpoint);
a new run's first event drops everything earlier (an --overwrite run's leftovers).
When OUT/tensorboard/ holds no event files at a resume (a run started without
--tensorboard), the records metrics.jsonl keeps are written first.

Needs the `tensorboard` package (``pip install 'widenet[tensorboard]'``);
`require_tensorboard` checks for it before a run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import MetricsLog, read_metrics

__all__ = ["TENSORBOARD_DIR", "MissingPackageError", "TensorBoardMetrics", "open_metrics", "record_scalars",
           "require_tensorboard"]

TENSORBOARD_DIR = "tensorboard"  # under OUT, beside metrics.jsonl
INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'widenet[tensorboard]'"
_NOT_SCALARS = ("split", "step", "epoch", "examples")  # labels and counters, not curves


class MissingPackageError(ValueError):
    """An optional package a setting needs is not installed (a ValueError: the CLI prints one line)."""


def _summary_writer_class() -> type:
    """torch's SummaryWriter (importing it imports tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingPackageError(INSTALL_HINT) from None
    except Exception as err:  # installed but broken (e.g. a protobuf it cannot use)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingPackageError(f"{INSTALL_HINT} (importing it failed: {cause})") from None
    return SummaryWriter


def require_tensorboard() -> None:
    """Raise MissingPackageError (one line, with the install command) unless TensorBoard can be written."""
    _summary_writer_class()


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers as {tag: value} (see the module doc for the tags)."""
    split = str(record.get("split", "metrics"))
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS:
            continue
        if key == "routing" and isinstance(value, list):
            _add_routing(scalars, split, value)
        else:
            _add_numbers(scalars, f"{split}/{key}", value)
    return scalars


def _add_routing(scalars: dict[str, float], split: str, blocks: list[Any]) -> None:
    """Per-block expert load and dropped fraction (evaluate.BlockRouting's fields)."""
    for position, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        prefix = f"routing/{split}/block{block.get('block', position)}"
        for expert, fraction in enumerate(block.get("expert_fraction") or []):
            _add_numbers(scalars, f"{prefix}/expert_load/e{expert}", fraction)
        _add_numbers(scalars, f"{prefix}/dropped", block.get("dropped_fraction"))
        _add_numbers(scalars, f"{prefix}/dropped_assignments", block.get("dropped_assignment_fraction"))


def _add_numbers(scalars: dict[str, float], tag: str, value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        scalars[tag] = float(value)
    elif isinstance(value, dict):
        for key, inner in value.items():
            _add_numbers(scalars, f"{tag}/{key}", inner)
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            _add_numbers(scalars, f"{tag}/{index}", inner)


class TensorBoardMetrics:
    """A MetricsLog that also writes every record to TensorBoard event files in `log_dir`.

    The event file is opened at the first record (so a run that fails before
    training leaves none), flushed after every record and closed by close().
    """

    def __init__(self, metrics: MetricsLog, log_dir: str | Path) -> None:
        self.metrics, self.log_dir = metrics, Path(log_dir)
        self._writer_class = _summary_writer_class()
        self._writer: Any = None
        self._purge_step = 0  # a new run: TensorBoard drops whatever earlier files in log_dir hold
        self._replay: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        return self.metrics.path

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self._write_events(record)
        self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """A resume from the checkpoint at `step`: metrics.jsonl keeps the records up to it, and so
        does TensorBoard (its events from step + 1 on are dropped when the new file is read)."""
        self.metrics.truncate_after(step)
        self._purge_step = step + 1
        has_events = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        if not has_events and self.path.exists():  # first --tensorboard of this run: write its past too
            self._replay = read_metrics(self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_events(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=self._purge_step)
            for earlier in self._replay:
                self._add(earlier)
            self._replay = []
        self._add(record)

    def _add(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in record_scalars(record).items():
            self._writer.add_scalar(tag, value, step)


def open_metrics(out: str | Path, tensorboard: bool = False) -> MetricsLog | TensorBoardMetrics:
    """OUT/metrics.jsonl's log; with `tensorboard`, one that also writes OUT/tensorboard/."""
    metrics = MetricsLog(Path(out) / "metrics.jsonl")
    return TensorBoardMetrics(metrics, Path(out) / TENSORBOARD_DIR) if tensorboard else metrics
