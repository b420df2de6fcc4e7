"""Text pretraining (`widenet pretrain`): masked LM + sentence-order prediction, as ALBERT.

Pipeline: corpus files -> WordPiece tokenizer (trained on the corpus, or
loaded) -> tokenized corpus (cached) -> "[CLS] A [SEP] B [SEP]" examples
packed to seq_len, B and A swapped for half of them -> a held-out slice for
evaluation -> steps. Each step masks --mask-prob (15%) of the word pieces
(80% [MASK], 10% random, 10% kept) with a generator seeded by (seed, step),
so masks do not depend on where a run was resumed. The held-out evaluation
always masks 15% with fixed masks, so runs with other masking rates compare,
and reports the unigram level beside the model: the accuracy and loss of
predicting every masked piece from the training pieces' frequencies alone,
without context.

    loss = MLM cross-entropy (masked positions only)
         + sop_weight * SOP cross-entropy + aux_weight * summed MoE balance loss
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.downloads import data_home
from ..data.errors import DatasetError
from ..data.text.corpus import load_pretrain_corpus
from ..data.text.documents import Documents
from ..data.text.pretraining import make_sop_examples, mask_tokens
from ..data.text.tokenizer import (SpecialIds, TokenizerError, load_tokenizer, save_tokenizer, special_ids,
                                   tokenizer_record, train_tokenizer)
from ..distributed.env import main_process_first
from ..distributed.parallel import ParallelContext
from ..models.registry import count_parameters, model_config, require_preset_kind
from ..runtime import autocast, autocast_dtype, resolve_device
from .checkpoint import find_latest_checkpoint
from .evaluate import RoutingTally
from .exported import TOKENIZER_FILE, Source, check_tokenizer_matches, init_source, source_tokenizer
from .progress import StepResult
from .run_folder import claim_run_folder
from .text_common import (Batch, TextTask, build_text_model, check_batch_fits, check_fits_positions, describe_processes,
                          evaluation_batches, global_sums, init_text_model, local_rows, split_contents,
                          summed_evaluation)
from .text_config import PretrainConfig
from .trainer import RunResult, Trainer, seeded_generator

EVAL_MASK_PROB = 0.15  # the held-out masking rate, whatever --mask-prob trains with


@dataclass
class PretrainResult:
    out_dir: Path
    params: int
    run: RunResult
    model: nn.Module


# --- data -----------------------------------------------------------------------
def prepare_tokenizer(cfg: PretrainConfig, out: Path, log: Callable[[str], None], init: Source | None = None):
    """The given tokenizer, else OUT/tokenizer.json from an earlier attempt, else the --init model's,
    else one trained on the corpus.

    A copy stays in OUT/tokenizer.json, so the run folder is all that fine-tuning needs.
    """
    saved = out / TOKENIZER_FILE
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if init is not None:  # the --init model's embedding rows belong to its own pieces
            check_tokenizer_matches(tokenizer, Path(cfg.tokenizer), init)
    elif saved.exists():
        tokenizer = load_tokenizer(saved)
    elif cfg.resume and find_latest_checkpoint(out) is not None:  # trained anew, it would not cut text alike
        raise TokenizerError(f"{saved} is missing: the run's checkpoints were trained with the tokenizer saved "
                             "there, and one trained again would not cut text alike; put it back (or pass it "
                             "with --tokenizer)")
    elif init is not None:
        tokenizer = source_tokenizer(init)
        if tokenizer is None:
            raise TokenizerError(f"no tokenizer beside {init.path}; pass the one its ids were made with: --tokenizer")
    else:
        log(f"training a WordPiece tokenizer ({cfg.vocab_size} pieces) on the corpus")
        tokenizer = train_tokenizer(Documents(cfg.corpus, cfg.max_documents),
                                    vocab_size=cfg.vocab_size)
        if (got := tokenizer.get_vocab_size()) != cfg.vocab_size:  # WordPiece keeps every character it saw
            log(f"the tokenizer has {got} pieces, not {cfg.vocab_size}: "
                + ("the corpus's characters alone take more" if got > cfg.vocab_size else "the corpus holds no more"))
    if not saved.exists():
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, saved)
    return tokenizer


def split_held_out(examples: Batch, n_eval: int, seed: int, source: str = "the corpus") -> tuple[Batch, Batch]:
    """A seeded random slice of at most n_eval examples (and at most 10%) for evaluation."""
    n = len(examples["input_ids"])
    n_eval = min(n_eval, n // 10)
    if n_eval < 1:
        raise DatasetError(f"{source} gives only {n} sequences; at least 10 are needed to hold one out for "
                           "evaluation (give more text, or a shorter --seq-len)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n_eval].sort().values, order[n_eval:].sort().values
    return {k: v[kept] for k, v in examples.items()}, {k: v[held] for k, v in examples.items()}


# --- the task -----------------------------------------------------------------------
class PretrainTask(TextTask):
    """MLM + SOP steps and the held-out evaluation (see the Trainer's Task)."""

    def __init__(self, cfg: PretrainConfig, special: SpecialIds, vocab_size: int, train: Batch, held_out: Batch,
                 device: torch.device, amp, parallel: ParallelContext) -> None:
        super().__init__(cfg, train, device, amp, parallel, every_steps=cfg.eval_every)
        self.cfg, self.special, self.vocab_size, self.held_out = cfg, special, vocab_size, held_out
        self.unigram_log_probs = unigram_log_probs(train["input_ids"], special, vocab_size)  # (V,)

    def masked(self, batch: Batch, generator: torch.Generator, mask_prob: float | None = None) -> Batch:
        """The batch with its MLM masking (at cfg.mask_prob unless given): masked input ids and labels
        (-100 where not masked)."""
        ids, labels = mask_tokens(batch["input_ids"], self.special, self.vocab_size, generator,
                                  mask_prob or self.cfg.mask_prob)
        return dict(batch, masked_ids=ids, mlm_labels=labels)

    def forward(self, model: nn.Module, batch: Batch):
        """Run `model` on a masked batch: (output, MLM labels (M,) in the row-major order of the mask)."""
        d, labels = self.device, batch["mlm_labels"]
        positions = labels != -100  # (B, T) bool
        with autocast(d, self.amp):
            out = model(batch["masked_ids"].to(d), batch["token_type_ids"].to(d),
                        padding_mask=(batch["input_ids"] == self.special.pad).to(d), masked_positions=positions.to(d))
        return out, labels[positions].to(d)

    def loss(self, net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, Callable[[], StepResult]]:
        """The loss of a global batch. The masks are drawn for the whole batch, so they do not depend
        on the number of processes; each process takes its rows, and losses are sums divided by the
        global counts times the number of processes, so DDP's average is the global mean."""
        batch = self.masked(batch, seeded_generator(self.cfg.seed, step))
        n, n_masked = len(batch["input_ids"]), int((batch["mlm_labels"] != -100).sum())
        mine, world = local_rows(batch, self.parallel), self.parallel.env.world_size
        with self.parallel.forward_rng(step, self.device):
            out, mlm_labels = self.forward(net, mine)
        sop_labels = mine["sop_labels"].to(self.device)
        mlm = F.cross_entropy(out.mlm_logits.float(), mlm_labels, reduction="sum")
        sop = F.cross_entropy(out.sop_logits.float(), sop_labels, reduction="sum")
        loss = world * (mlm / n_masked + self.cfg.sop_weight * sop / n) + self.cfg.aux_weight * out.aux_loss

        def result() -> StepResult:
            sums = global_sums(dict(mlm=float(mlm.detach()), mlm_correct=_correct(out.mlm_logits, mlm_labels),
                                    sop=float(sop.detach()), sop_correct=_correct(out.sop_logits, sop_labels),
                                    aux=float(out.aux_loss.detach())), self.parallel, self.device)
            values = dict(mlm_loss=sums["mlm"] / n_masked, mlm_accuracy=sums["mlm_correct"] / n_masked,
                          sop_loss=sums["sop"] / n, sop_accuracy=sums["sop_correct"] / n,
                          aux_loss=sums["aux"] / world)
            tokens = int((batch["input_ids"] != self.special.pad).sum())
            return StepResult(values["mlm_loss"] + values["sop_loss"], values, n, tokens)

        return loss, result

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """MLM loss/accuracy (and their unigram levels) and SOP accuracy on the held-out examples, fixed
        masks at EVAL_MASK_PROB; routing per block. On several processes each evaluates its share of the
        batches (text_common.evaluation_batches; a batch's masks follow its index) and the sums are added."""
        net = self.parallel.module(model)  # (FSDP's and expert parallel's forwards still communicate)
        was_training = net.training
        net.eval()
        sums = dict(mlm_loss=0.0, mlm_correct=0, unigram_loss=0.0, unigram_correct=0, masked=0, sop_correct=0,
                    examples=0)
        unigram = self.unigram_log_probs.to(self.device)
        most_frequent = unigram.argmax()
        routing = RoutingTally()
        for i, batch in evaluation_batches(self.held_out, self.cfg.eval_batch_size, self.parallel):
            batch = self.masked(batch, seeded_generator(self.cfg.seed + 1, i or 0), EVAL_MASK_PROB)
            out, mlm_labels = self.forward(net, batch)
            sums["mlm_loss"] += float(F.cross_entropy(out.mlm_logits.float(), mlm_labels, reduction="sum"))
            sums["mlm_correct"] += int((out.mlm_logits.argmax(-1) == mlm_labels).sum())
            sums["unigram_loss"] -= float(unigram[mlm_labels].sum())
            sums["unigram_correct"] += int((mlm_labels == most_frequent).sum())
            sums["masked"] += len(mlm_labels)
            sums["sop_correct"] += int((out.sop_logits.argmax(-1).cpu() == batch["sop_labels"]).sum())
            sums["examples"] += len(batch["sop_labels"])
            routing.add(out.routing, float((batch["input_ids"] != self.special.pad).sum()))
        net.train(was_training)
        sums, routing = summed_evaluation(sums, routing, self.parallel)
        masked, n = max(sums["masked"], 1), max(sums["examples"], 1)
        return dict(mlm_loss=sums["mlm_loss"] / masked, mlm_accuracy=sums["mlm_correct"] / masked,
                    unigram_loss=sums["unigram_loss"] / masked, unigram_accuracy=sums["unigram_correct"] / masked,
                    sop_accuracy=sums["sop_correct"] / n, examples=int(round(sums["examples"])),
                    routing=[vars(r) for r in routing.blocks()])


def unigram_log_probs(input_ids: torch.Tensor, special: SpecialIds, vocab_size: int) -> torch.Tensor:
    """(V,) log-frequencies of the regular word pieces in ``input_ids`` (add-one smoothed; special ids
    -inf): the best a model can do without context."""
    counts = torch.bincount(input_ids.flatten(), minlength=vocab_size)[:vocab_size].double() + 1.0
    counts[[i for i in special.as_tuple() if 0 <= i < vocab_size]] = 0.0
    return (counts / counts.sum()).log().float()


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.detach().argmax(-1) == labels).sum())


# --- entry point --------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> PretrainResult:
    """Run (or resume) pretraining as `cfg` says; under torchrun, data, fully sharded or expert parallel."""
    started = time.monotonic()
    if cfg.init is None:  # (an --init model is checked when read)
        require_preset_kind(cfg.model, "text", "widenet pretrain")
    cfg = cfg.with_absolute_paths()
    parallel = ParallelContext.for_run(cfg.batch_size, cfg.seed, cfg.fsdp, cfg.expert_parallel)
    device = parallel.device(resolve_device(cfg.device))
    amp = autocast_dtype(cfg.amp, device)
    out = Path(cfg.out)
    if cfg.init is None:  # before a tokenizer is trained on the whole corpus (--init models are checked later)
        config = model_config(cfg.model, **cfg.model_overrides)
        check_fits_positions(cfg.model, config.max_positions, cfg.seq_len)
        check_batch_fits(config, cfg.batch_size, cfg.seq_len, parallel, device, amp)
    with claim_run_folder(out, cfg.resume, cfg.overwrite, parallel, log):
        with main_process_first():  # rank 0 trains/saves the tokenizer and fills the cache; the others read them
            init = init_source(cfg.init, cfg.out, cfg.resume, kind="text") if cfg.init else None  # then the tokenizer
            tokenizer = prepare_tokenizer(cfg, out, parallel.log(log), init)
            special, vocab = special_ids(tokenizer), tokenizer.get_vocab_size()
            cache = Path(cfg.cache_dir) if cfg.cache_dir else data_home() / "text-cache"
            corpus = load_pretrain_corpus(cfg.corpus, tokenizer, cache, max_documents=cfg.max_documents)
        examples = make_sop_examples(corpus, cfg.seq_len, cfg.seed, special)
        if (fill := examples.fill_ratio(special.pad)) < 0.5:
            warnings.warn(f"the training sequences are {1 - fill:.0%} padding: the corpus's documents are much "
                          f"shorter than --seq-len {cfg.seq_len}; a smaller --seq-len trains on the same text faster")
        train_set, held_out = split_held_out(
            dict(input_ids=examples.input_ids, token_type_ids=examples.token_type_ids, sop_labels=examples.sop_labels),
            cfg.eval_examples, cfg.seed, ", ".join(cfg.corpus))
        parallel.check_epoch(len(train_set["input_ids"]), cfg.batch_size, "sequences", "--batch-size")
        torch.manual_seed(cfg.seed)
        if init is None:
            model = build_text_model(cfg, vocab, special.pad, cfg.seq_len, task="pretrain")
        else:
            model = init_text_model(init, cfg, vocab, cfg.seq_len, task="pretrain")
            cfg = dataclasses.replace(cfg, model=model.model_name)
            check_batch_fits(model.cfg, cfg.batch_size, cfg.seq_len, parallel, device, amp)
        model = model.to(device)
        task = PretrainTask(cfg, special, vocab, train_set, held_out, device, amp, parallel)
        params = count_parameters(model)
        data = dict(contents=split_contents(train_set), validation_contents=split_contents(held_out, "held-out"))
        meta = dict(model=cfg.model, model_config=model.cfg.to_dict(), train_config=cfg.to_dict(),
                    tokenizer=tokenizer_record(tokenizer), data=data)
        # A resumed run must use the tokenizer and the text it started with: the training sequences and the
        # held-out ones (an edit of text that only held-out sequences hold leaves the training ones alike).
        trainer = Trainer(cfg, task, model, parallel, device, amp, meta, log,
                          expected_meta=dict(tokenizer=meta["tokenizer"], data=meta["data"]), started=started)
        trainer.log(f"pretraining {cfg.model} ({params / 1e6:.3f}M params): {corpus.num_documents} documents, "
                    f"{corpus.num_tokens} tokens, {len(train_set['input_ids'])} training sequences of {cfg.seq_len}, "
                    f"{len(held_out['input_ids'])} held out; {trainer.progress.total} steps; {device}"
                    + (f", {amp}" if amp else "") + describe_processes(parallel, cfg.compile))
        return PretrainResult(out, params, trainer.run(), model)
