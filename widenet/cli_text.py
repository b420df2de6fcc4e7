"""The text commands of the CLI: `widenet pretrain`, `finetune`, `compare-text` and `gcide-task`."""

from __future__ import annotations

import argparse

from .cli_args import (add_budget_arguments, add_moe_arguments, add_process_arguments, add_recipe_arguments,
                       add_run_arguments, add_set_argument, config_fields, finite_float, model_overrides, nonempty,
                       positive_float, positive_int, refuse_unused)
from .listing import counted


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .cli_run import run_on_processes
    from .train.pretrain import pretrain
    from .train.text_config import PretrainConfig

    if args.tokenizer or args.init:
        refuse_unused(args, ("vocab_size",), "with " + ("--tokenizer" if args.tokenizer else "--init") +
                      " (it sizes a tokenizer trained on the corpus when none is given)")
    result = run_on_processes(pretrain, PretrainConfig(**config_fields(args, PretrainConfig)), args.ddp_backend,
                              args.ddp_timeout)
    if result is None:
        return 0
    e, run = result.run.final_eval, result.run
    print(f"done: {counted(run.steps, 'step')}, held-out MLM accuracy {e['mlm_accuracy']:.4f} "
          f"(loss {e['mlm_loss']:.4f}; without context, from word-piece frequencies alone: "
          f"{e['unigram_accuracy']:.4f}, loss {e['unigram_loss']:.4f}), SOP accuracy {e['sop_accuracy']:.4f} (chance 0.5), "
          f"{run.tokens_per_s:.0f} tokens/s; run folder {result.out_dir}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .cli_run import run_on_processes
    from .train.finetune import finetune
    from .train.text_config import FinetuneConfig

    if args.task != "qa":
        refuse_unused(args, ("doc_stride", "max_query_len", "null_threshold"),
                      f"with --task {args.task} (they are span QA settings)")
    result = run_on_processes(finetune, FinetuneConfig(**config_fields(args, FinetuneConfig)), args.ddp_backend,
                              args.ddp_timeout)
    if result is None:
        return 0
    e, run = result.run.final_eval, result.run
    score = (f"accuracy {e['accuracy']:.4f}" if "accuracy" in e
             else f"exact match {e['exact']:.2f}, F1 {e['f1']:.2f}")
    print(f"done: {counted(run.steps, 'step')}, validation {score}, {run.tokens_per_s:.0f} tokens/s; "
          f"run folder {result.out_dir}")
    return 0


def cmd_compare_text(args: argparse.Namespace) -> int:
    from .analysis.compare_text import compare_text
    from .cli_run import refuse_several_processes

    refuse_several_processes("compare-text")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    report = compare_text(models, args.out, preset=args.preset, seeds=args.seeds, corpus=args.corpus,
                          task_train=args.task_train, task_validation=args.task_validation,
                          pretrain_steps=args.max_steps, device=args.device, model_overrides=model_overrides(args),
                          gcide_task=args.gcide_task)
    print(f"report: {report}")
    return 0


def cmd_gcide_task(args: argparse.Namespace) -> int:
    from .data.text.gcide_tasks import write_gcide_task

    train, validation = write_gcide_task(args.gcide, args.out, args.kind, args.train_size, args.validation_size,
                                         args.seed, overwrite=args.overwrite)
    print(f"wrote {train} and {validation}")
    return 0


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    """Budget, optimisation and bookkeeping arguments of both text commands."""
    add_budget_arguments(p)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--eval-batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    add_recipe_arguments(p)
    add_run_arguments(p, "num_experts=8")
    add_moe_arguments(p)
    p.add_argument("--tokenizer", type=nonempty, help="tokenizer.json or vocab.txt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    add_process_arguments(p, command)


def add_text_commands(sub) -> None:
    """Register the text commands on the CLI's subparsers."""
    from .data.text.gcide import GCIDE_PATH  # constants; the modules import nothing heavy
    from .data.text.gcide_tasks import TASK_KINDS

    p = sub.add_parser("pretrain", help="pretrain a text model: masked LM + sentence-order prediction")
    p.add_argument("--model", help="a text preset (widenet list; default widenet_text_tiny)")
    p.add_argument("--init", type=nonempty, metavar="PATH",
                   help="continue from this text model (run, widenet folder such as an upcycled ALBERT, Hugging "
                        "Face ALBERT/BERT folder): its config, weights and tokenizer, instead of a preset's")
    p.add_argument("--corpus", type=nonempty, nargs="+", required=True, metavar="PATH",
                   help="text files or folders (.txt, .txt.gz, .jsonl, GCIDE .dict.dz)")
    p.add_argument("--vocab-size", type=positive_int, help="pieces of the tokenizer trained when none is given")
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--mask-prob", type=finite_float)
    p.add_argument("--sop-weight", type=finite_float)
    p.add_argument("--eval-every", type=positive_int, help="evaluate (and checkpoint) every N steps")
    p.add_argument("--eval-examples", type=positive_int, help="held-out sequences for evaluation")
    p.add_argument("--cache-dir", type=nonempty, help="where the tokenized corpus is cached")
    p.add_argument("--out", type=nonempty, default="runs/pretrain")
    _add_common(p, "pretrain")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained text model: classification or span QA")
    p.add_argument("--task", required=True, choices=("classify", "qa"))
    p.add_argument("--init", type=nonempty, required=True,
                   help="pretraining run or checkpoint, a widenet folder (export, upcycle, import) or a Hugging "
                        "Face ALBERT/BERT folder with its tokenizer")
    p.add_argument("--scratch", action="store_true", default=None,
                   help="train the --init model's architecture and tokenizer from random weights (the baseline "
                        "that shows what pretraining brings)")
    p.add_argument("--train", type=nonempty, required=True, help="TSV/CSV/JSONL (classify) or SQuAD JSON (qa); or hf:DATASET[/CONFIG]:SPLIT "
                        "with the datasets package and a network, e.g. hf:glue/sst2:train")
    p.add_argument("--validation", type=nonempty, required=True)
    p.add_argument("--max-len", type=positive_int, help="tokens per sequence (default 128 classify, 384 qa)")
    p.add_argument("--doc-stride", type=positive_int)
    p.add_argument("--max-query-len", type=positive_int)
    p.add_argument("--null-threshold", type=finite_float, help="SQuAD 2.0: answer '' when null beats the best span by this")
    p.add_argument("--out", type=nonempty, default="runs/finetune")
    _add_common(p, "finetune")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare-text", help="pretrain + fine-tune text models alike; write OUT/report_text.md")
    p.add_argument("--models", default="bert_text_tiny,albert_text_tiny,widenet_text_tiny",
                   help="comma-separated text presets")
    p.add_argument("--preset", default="quick", choices=("quick", "full"))
    p.add_argument("--seeds", type=positive_int)
    p.add_argument("--max-steps", type=positive_int, help="pretraining steps per model (default: the preset's)")
    p.add_argument("--corpus", type=nonempty, nargs="+", metavar="PATH", help="default: the GCIDE dictionary")
    p.add_argument("--task-train", type=nonempty, help="classification TSV/CSV/JSONL (default: a GCIDE task, "
                                                       "--gcide-task)")
    p.add_argument("--task-validation", type=nonempty)
    add_set_argument(p, "a model setting for every model, e.g. --set depth=2")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_moe_arguments(p)
    p.add_argument("--gcide-task", choices=tuple(TASK_KINDS),
                   help="the GCIDE task used without --task-train: a definition's subject field, the headword's "
                        "part of speech from its definition (pos) or from an example of its use (usage, the "
                        "default)")
    p.add_argument("--out", type=nonempty, default="runs/compare-text")
    p.set_defaults(func=cmd_compare_text)

    p = sub.add_parser("gcide-task", help="write a classification task (train.tsv, validation.tsv) from GCIDE")
    p.add_argument("kind", choices=tuple(TASK_KINDS),
                   help="field: a definition's subject (zoology, botany, ...); pos: the headword's part of speech from "
                        "its definition; usage: the same from an example of its use")
    p.add_argument("--out", type=nonempty, required=True, help="folder for train.tsv and validation.tsv")
    p.add_argument("--train-size", type=positive_int, default=3000)
    p.add_argument("--validation-size", type=positive_int, default=900)
    p.add_argument("--seed", type=int, default=0, help="which headwords go to which split")
    p.add_argument("--gcide", type=nonempty, default=str(GCIDE_PATH), help="the GCIDE .dict.dz file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace train.tsv and validation.tsv if --out already holds them")
    p.set_defaults(func=cmd_gcide_task)
