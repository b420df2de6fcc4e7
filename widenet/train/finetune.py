"""Fine-tuning a pretrained text encoder (`widenet finetune`).

Data files may also be hub names, hf:DATASET[/CONFIG]:SPLIT (needs the
`datasets` package and a network; see widenet.data.text.hub).

--task classify: GLUE-style files (one sentence or a pair, and a label);
    reports accuracy. The label set comes from the training file; a
    validation label outside it is an error.
--task qa: SQuAD v1.1 / v2.0 JSON; windows of "[CLS] question [SEP] context
    [SEP]" with a stride; start/end cross-entropy (an answer outside the
    window, or none, points at [CLS]); reports the official exact match and
    F1 (with SQuAD 2.0's no-answer rules when the data has unanswerable
    questions).

The model preset, its sizes and the tokenizer come from the pretraining
checkpoint (`--init`); only the task head is new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text.classification import encode_classification, read_classification_task
from ..data.text.hub import resolve_task_file
from ..data.text.squad import encode_squad, postprocess_squad, read_squad
from ..data.text.squad_metrics import squad_scores
from ..data.text.task_common import TaskDataError
from ..data.text.tokenizer import (TokenizerError, check_coverage, load_tokenizer, save_tokenizer, special_ids,
                                  tokenizer_record)
from ..distributed.parallel import ParallelContext
from ..files import tensors_digest
from ..models.registry import count_parameters
from ..models.text import TextTransformer, load_backbone
from ..runtime import autocast, autocast_dtype, resolve_device
from .checkpoint import LoadedCheckpoint
from .evaluate import RoutingTally, summed_over_processes
from .exported import TOKENIZER_FILE, Source, check_tokenizer_matches, load_source, require_kind, source_tokenizer
from .progress import StepResult
from .run_folder import claim_run_folder
from .text_common import (Batch, TextTask, check_batch_fits, describe_processes, evaluation_batches, global_sums,
                          local_rows, saved_text_model, split_contents, summed_evaluation)
from .text_config import FinetuneConfig
from .text_inputs import default_max_len
from .trainer import RunResult, Trainer



@dataclass
class FinetuneResult:
    out_dir: Path
    params: int
    run: RunResult
    model: nn.Module


# --- the pretrained starting point ----------------------------------------------------
def load_init(cfg: FinetuneConfig):
    """The pretrained starting point (a pretraining run or checkpoint, an exported or upcycled
    widenet folder, or a Hugging Face ALBERT/BERT folder) and its tokenizer, checked to belong
    together."""
    source = load_source(cfg.init)
    require_kind(source, "text", "fine-tuning")
    path = Path(cfg.tokenizer) if cfg.tokenizer else source.tokenizer_path
    if path is None or not path.exists():
        raise TokenizerError(f"no tokenizer found beside {source.path}; pass the pretraining tokenizer with "
                             "--tokenizer")
    if cfg.tokenizer:
        tokenizer = load_tokenizer(path)
        check_tokenizer_matches(tokenizer, path, source)
    else:
        tokenizer = source_tokenizer(source)
    return source, tokenizer


def build_finetune_model(ckpt: LoadedCheckpoint | Source, cfg: FinetuneConfig, num_labels: int) -> TextTransformer:
    """The pretrained backbone with a new head for cfg.task (cfg.scratch: random weights throughout)."""
    # --set changes e.g. the capacity factor for fine-tuning
    model = saved_text_model(ckpt.meta["model_config"], cfg, ckpt.meta["model"], task=cfg.task, num_labels=num_labels)
    if not cfg.scratch:
        load_backbone(model, ckpt.model_state)
    return model


def max_length(cfg: FinetuneConfig, model_cfg: dict) -> int:
    limit = model_cfg["max_positions"]
    if cfg.max_len is None:
        return default_max_len(cfg.task, limit)
    if cfg.max_len > limit:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's {limit} positions")
    return cfg.max_len


# --- tasks ------------------------------------------------------------------------------
class _FinetuneTask(TextTask):
    """What both fine-tuning tasks share: batching, the forward pass, the global step values
    (see the Trainer's Task). Evaluated after every epoch."""

    def __init__(self, cfg: FinetuneConfig, pad_id: int, train: Batch, device: torch.device, amp,
                 parallel: ParallelContext) -> None:
        super().__init__(cfg, train, device, amp, parallel, every_epochs=1)
        self.cfg, self.pad_id = cfg, pad_id

    def forward(self, batch: Batch, model: nn.Module):
        ids = batch["input_ids"].to(self.device)
        with autocast(self.device, self.amp):
            return model(ids, batch["token_type_ids"].to(self.device), padding_mask=ids == self.pad_id)

    def train_forward(self, batch: Batch, net: nn.Module, step: int):
        """This process's rows of the global batch through the training model: (rows, output)."""
        mine = local_rows(batch, self.parallel)
        with self.parallel.forward_rng(step, self.device):
            return mine, self.forward(mine, net)

    def finish(self, loss_sum: torch.Tensor, out, sums: Callable[[], dict[str, float]], batch: Batch
               ) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        """The global mean loss (sum x processes / global examples: DDP averages) and, after the update,
        the global step values: loss, each of `sums` per example, aux loss."""
        n, world = len(batch["input_ids"]), self.parallel.env.world_size

        def result() -> StepResult:
            total = global_sums(dict(loss=float(loss_sum.detach()), **sums(), aux=float(out.aux_loss.detach())),
                                self.parallel, self.device)
            values = {k: v / n for k, v in total.items() if k != "aux"} | dict(aux_loss=total["aux"] / world)
            tokens = int((batch["input_ids"] != self.pad_id).sum())
            return StepResult(values["loss"], values, n, tokens)

        return world * loss_sum / n + self.cfg.aux_weight * out.aux_loss, result


class ClassifyTask(_FinetuneTask):
    def __init__(self, *args, validation: Batch, labels: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validation, self.labels = validation, labels

    def loss(self, net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        mine, out = self.train_forward(batch, net, step)
        labels = mine["labels"].to(self.device)
        loss = F.cross_entropy(out.logits.float(), labels, reduction="sum")
        return self.finish(loss, out, lambda: dict(accuracy=int((out.logits.detach().argmax(-1) == labels).sum())),
                           batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Accuracy and loss on the validation set; on several processes each evaluates its share of the
        batches (text_common.evaluation_batches) and the sums are added."""
        net = self.parallel.module(model)  # (FSDP's and expert parallel's forwards still communicate)
        was_training = net.training
        net.eval()
        sums, routing = dict(loss=0.0, correct=0, examples=0), RoutingTally()
        for _, batch in evaluation_batches(self.validation, self.cfg.eval_batch_size, self.parallel):
            out = self.forward(batch, net)
            labels = batch["labels"].to(self.device)
            sums["loss"] += float(F.cross_entropy(out.logits.float(), labels, reduction="sum"))
            sums["correct"] += int((out.logits.argmax(-1) == labels).sum())
            sums["examples"] += len(labels)
            routing.add(out.routing, float((batch["input_ids"] != self.pad_id).sum()))
        net.train(was_training)
        sums, routing = summed_evaluation(sums, routing, self.parallel)
        n = max(sums["examples"], 1)
        return dict(accuracy=sums["correct"] / n, loss=sums["loss"] / n, examples=int(round(sums["examples"])),
                    routing=[vars(r) for r in routing.blocks()])


class QATask(_FinetuneTask):
    def __init__(self, *args, val_examples, val_features, version_2: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_examples, self.val_features, self.version_2 = val_examples, val_features, version_2

    def loss(self, net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        mine, out = self.train_forward(batch, net, step)
        start, end = mine["start_positions"].to(self.device), mine["end_positions"].to(self.device)
        loss = (F.cross_entropy(out.start_logits.float(), start, reduction="sum")
                + F.cross_entropy(out.end_logits.float(), end, reduction="sum")) / 2

        def exact() -> dict[str, float]:
            hits = (out.start_logits.detach().argmax(-1) == start) & (out.end_logits.detach().argmax(-1) == end)
            return dict(span_accuracy=int(hits.sum()))

        return self.finish(loss, out, exact, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """SQuAD scores of the validation questions. On several processes each computes the windows' start
        and end logits of its share of the batches (text_common.evaluation_batches); they are added over
        the processes into every window's (zeros elsewhere: exact), so that every process scores every
        question from all its windows, wherever the batches cut them."""
        net = self.parallel.module(model)  # (FSDP's and expert parallel's forwards still communicate)
        was_training = net.training
        net.eval()
        f, rows = self.val_features, self.cfg.eval_batch_size
        data = dict(input_ids=f.input_ids, token_type_ids=f.token_type_ids)
        logits, routing = torch.zeros(2, *f.input_ids.shape), RoutingTally()  # (start/end, windows, T)
        for i, batch in evaluation_batches(data, rows, self.parallel):
            out = self.forward(batch, net)
            if i is not None:
                logits[:, i * rows:i * rows + len(batch["input_ids"])] = torch.stack(
                    [out.start_logits.float().cpu(), out.end_logits.float().cpu()])
            routing.add(out.routing, float((batch["input_ids"] != self.pad_id).sum()))
        net.train(was_training)
        _, routing = summed_evaluation({}, routing, self.parallel)
        starts, ends = summed_over_processes(logits, self.parallel)
        predictions = postprocess_squad(self.val_examples, f, starts, ends,
                                        version_2=self.version_2, null_threshold=self.cfg.null_threshold)
        scores = squad_scores(predictions, self.val_examples)
        return dict({k: float(v) if isinstance(v, float) else v for k, v in scores.items()},
                    routing=[vars(r) for r in routing.blocks()])


def _classify_data(cfg: FinetuneConfig, tokenizer, max_len: int) -> tuple[Batch, Batch, list[str], bool]:
    """(training batch, validation batch, labels, whether the texts are sentence pairs)."""
    train_file, val_file = resolve_task_file(cfg.train, "classify"), resolve_task_file(cfg.validation, "classify")
    train_ex, val_ex, labels = read_classification_task(train_file, val_file)
    train = encode_classification(train_ex, tokenizer, labels, max_len, str(train_file))
    _check_task_coverage(train["input_ids"], tokenizer, train_file)
    validation = encode_classification(val_ex, tokenizer, labels, max_len, str(val_file))
    return train, validation, labels, train_ex[0].text_b is not None


def _check_task_coverage(input_ids: torch.Tensor, tokenizer, task_file: str | Path) -> None:
    """The pretrained model's tokenizer must cover the task's text (it cannot be changed here)."""
    check_coverage(input_ids, special_ids(tokenizer), str(task_file),
                   "fine-tune a model pretrained on text like it")


def _check_not_empty(*files: tuple[str, list]) -> None:
    for path, examples in files:
        if not examples:
            raise TaskDataError(f"{path}: no examples")


def _qa_data(cfg: FinetuneConfig, tokenizer, max_len: int):
    train_file, val_file = resolve_task_file(cfg.train, "qa"), resolve_task_file(cfg.validation, "qa")
    (train_ex, train_version), (val_ex, version) = read_squad(train_file), read_squad(val_file)
    _check_not_empty((train_file, train_ex), (val_file, val_ex))
    kw = dict(max_len=max_len, doc_stride=cfg.doc_stride, max_query_len=cfg.max_query_len)
    tf, vf = encode_squad(train_ex, tokenizer, **kw), encode_squad(val_ex, tokenizer, **kw)
    for file, examples, features in ((train_file, train_ex, tf), (val_file, val_ex, vf)):
        if features.questions_cut:
            warnings.warn(f"{file}: {features.questions_cut} of {len(examples)} questions were longer than "
                          f"--max-query-len {cfg.max_query_len} tokens and were cut to their first ones", stacklevel=2)
    _check_task_coverage(tf.input_ids, tokenizer, train_file)
    train = dict(input_ids=tf.input_ids, token_type_ids=tf.token_type_ids, start_positions=tf.start_positions,
                 end_positions=tf.end_positions)
    version_2 = version == "2.0" or any(e.is_impossible for e in val_ex)
    trained = train_version == "2.0" or any(e.is_impossible for e in train_ex)  # no-answer scores learned
    return train, val_ex, vf, version_2, trained


def qa_validation_contents(examples: list, features) -> str:
    """split_contents for SQuAD validation data: its windows' token ids and its questions' ids,
    texts and answers (which the scores compare with), hashed."""
    windows = dict(input_ids=features.input_ids, token_type_ids=features.token_type_ids,
                   example_index=features.example_index)
    questions = [[e.id, e.question, e.context, e.answers, e.is_impossible] for e in examples]
    digest = hashlib.sha256((tensors_digest(windows) + json.dumps(questions)).encode()).hexdigest()
    return (f"{len(examples)} validation questions in {len(features.input_ids)} sequences, token ids and "
            f"answers {digest[:12]}")


# --- entry point ------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Run (or resume) fine-tuning as `cfg` says; under torchrun, data, fully sharded or expert parallel."""
    started = time.monotonic()
    cfg = cfg.with_absolute_paths()
    parallel = ParallelContext.for_run(cfg.batch_size, cfg.seed, cfg.fsdp, cfg.expert_parallel)
    device = parallel.device(resolve_device(cfg.device))
    amp = autocast_dtype(cfg.amp, device)
    ckpt, tokenizer = load_init(cfg)
    cfg = dataclasses.replace(cfg, model=ckpt.meta["model"])
    max_len = max_length(cfg, ckpt.meta["model_config"])
    pad = special_ids(tokenizer).pad
    if cfg.task == "classify":
        train, validation, labels, pairs = _classify_data(cfg, tokenizer, max_len)
        extra, num_labels = dict(validation=validation, labels=labels), len(labels)
        data_meta = dict(labels=labels, inputs=dict(pairs=pairs, max_len=max_len),
                         validation_contents=split_contents(validation, "validation"))
    else:
        train, val_ex, val_features, version_2, trained = _qa_data(cfg, tokenizer, max_len)
        extra, num_labels = dict(val_examples=val_ex, val_features=val_features, version_2=version_2), 2
        data_meta = dict(squad_version="2.0" if version_2 else "1.1",
                         inputs=dict(max_len=max_len, doc_stride=cfg.doc_stride, max_query_len=cfg.max_query_len,
                                     no_answer=version_2, null_threshold=cfg.null_threshold,
                                     trained_no_answer=trained),
                         validation_contents=qa_validation_contents(val_ex, val_features))
    data_meta["contents"] = split_contents(train)
    torch.manual_seed(cfg.seed)
    model = build_finetune_model(ckpt, cfg, num_labels)
    check_batch_fits(model.cfg, min(cfg.batch_size, len(train["input_ids"])), train["input_ids"].shape[1], parallel,
                     device, amp)  # a batch beyond the task's examples is all of them
    model = model.to(device)
    parallel.check_epoch(len(train["input_ids"]), cfg.batch_size, "training sequences", "--batch-size")
    task_cls = ClassifyTask if cfg.task == "classify" else QATask
    task = task_cls(cfg, pad, train, device, amp, parallel, **extra)
    params = count_parameters(model)
    meta = dict(model=cfg.model, model_config=model.cfg.to_dict(), train_config=cfg.to_dict(),
                tokenizer=tokenizer_record(tokenizer),
                init=str(ckpt.path), data=data_meta)
    out = Path(cfg.out)
    with claim_run_folder(out, cfg.resume, cfg.overwrite, parallel, log):
        # resume: the same training and validation data (a record the checkpoint lacks is not compared)
        trainer = Trainer(cfg, task, model, parallel, device, amp, meta, log, started=started,
                          expected_meta=dict(data={k: data_meta[k] for k in ("contents", "validation_contents")}))
        if parallel.is_main and not (out / TOKENIZER_FILE).exists():  # the run folder is self-contained
            out.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tokenizer, out / TOKENIZER_FILE)
        start = f"random weights (the architecture of {ckpt.path})" if cfg.scratch else ckpt.path
        trainer.log(f"fine-tuning {cfg.model} ({params / 1e6:.3f}M params) for {cfg.task} from {start}: "
                    f"{len(train['input_ids'])} training sequences of up to {max_len} tokens; "
                    f"{trainer.progress.total} steps; {device}" + describe_processes(parallel, cfg.compile))
        return FinetuneResult(out, params, trainer.run(), model)
