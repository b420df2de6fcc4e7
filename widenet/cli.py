"""Command line: thin parsers over library functions.

    widenet list
    widenet params MODEL [MODEL ...] [--num-classes N] [--representation] [--json]
    widenet bench moe [--tokens --dim --hidden --experts --top-k --capacity-factor --amp] [--json]
    widenet bench model MODEL [MODEL ...] [--batch-size N] [--steps N] [--compile] [--json]
    widenet train --model M --data D [--epochs N | --max-steps N | --time-budget MIN] [--eval-every N] [--tta flip]
                  [--compile] [--out DIR] [--resume] ...
    widenet eval --checkpoint PATH [--data D] [--ema] [--tta flip] [--json]
    widenet compare [--models A,B,...] [--preset quick|full] [--seeds N] [--epochs N | --time-budget MIN] [--out DIR]
    widenet import / upcycle / export (cli_models.py), widenet predict (cli_predict.py), pretrain / finetune /
    compare-text / gcide-task (cli_text.py)

Bad input exits with status 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import traceback
from dataclasses import asdict
from typing import Callable, NoReturn, Sequence

from . import __version__
from .cli_args import (Parser, add_budget_arguments, add_moe_arguments, add_process_arguments, add_recipe_arguments,
                       add_run_arguments, add_set_argument, config_fields, finite_float, model_overrides, nonempty,
                       parse_command_line, positive_float, positive_int)
from .cli_errors import (BUG_REPORT, INTERRUPTED, CLIError, explain, file_names_printable,
                         latest_checkpoint_identity, lost_results, missing_outputs_to_devnull,
                         output_survives_its_reader, rerun_advice, say_error, say_last, termination_interrupts,
                         Terminated, warnings_as_notes)
from .cli_models import add_model_commands
from .cli_predict import add_predict_command
from .cli_text import add_text_commands
from .listing import counted
from .signals import native_call_abandoned
from .train.stopping import TrainingStopped


def cmd_bench_ddp(args: argparse.Namespace) -> int:
    from .bench.ddp_bench import LaunchError, format_ddp_bench, run_ddp_bench

    try:
        r = run_ddp_bench(args.model, processes=args.processes, batch_size=args.batch_size, steps=args.steps,
                          expert_parallel=args.expert_parallel)
    except LaunchError as err:
        raise CLIError(str(err)) from None
    _print_json(asdict(r)) if args.json else print(format_ddp_bench(r))
    return 0


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


# --- commands -----------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from .models.registry import get_entry, list_models

    names = list_models()
    if args.json:
        _print_json([{"model": n, "description": get_entry(n).description} for n in names])
        return 0
    width = max(map(len, names))
    for n in names:
        print(f"{n:<{width}}  {get_entry(n).description}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    import torch

    from .models.registry import count_parameters, create_model, model_config

    rows = []
    for name in args.models:
        overrides = _params_overrides(name, model_config(name), args)
        with torch.device("meta"):  # counts only: allocate nothing
            model = create_model(name, **overrides)
        row = {"model": name, "params": count_parameters(model)}
        if hasattr(model.cfg, "num_classes"):  # vision models
            row.update(num_classes=model.cfg.num_classes,
                       representation=model.cfg.representation_size is not None)
        else:  # text models
            row["task"] = model.cfg.task
            if model.cfg.task == "classify":
                row["num_labels"] = model.cfg.num_labels
        rows.append(row)
    if args.json:
        _print_json(rows[0] if len(rows) == 1 else rows)
        return 0
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        print(f"{r['model']:<{width}}  {r['params']:>13,d}  ({r['params'] / 1e6:.2f}M)")
    return 0


def _params_overrides(name: str, cfg, args: argparse.Namespace) -> dict:
    """--num-classes / --representation as overrides for one model.

    Text models take --num-classes as num_labels when their task is
    "classify"; otherwise (and for --representation) the flag is ignored
    with a note on stderr.
    """
    if hasattr(cfg, "num_classes"):
        overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
        return {**overrides, "representation": True} if args.representation else overrides
    overrides = {}
    if args.num_classes is not None and cfg.task == "classify":
        overrides["num_labels"] = args.num_classes
    elif args.num_classes is not None:
        print(f"widenet: note: --num-classes ignored for {name} (a text model with task {cfg.task!r})",
              file=sys.stderr)
    if args.representation:
        print(f"widenet: note: --representation ignored for {name} (a text model)", file=sys.stderr)
    return overrides


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from .runtime import resolve_device
    from .bench.moe_bench import MoEBenchConfig, format_moe_bench, run_moe_bench

    cfg = MoEBenchConfig(tokens=args.tokens, dim=args.dim, hidden=args.hidden, experts=args.experts,
                         top_k=args.top_k, capacity_factor=args.capacity_factor, repeats=args.repeats,
                         device=str(resolve_device(args.device)), amp=args.amp)
    result = run_moe_bench(cfg)
    if args.json:
        _print_json(result)
    else:
        print(format_moe_bench(result))
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .bench.model_bench import bench_models

    results = bench_models(args.model, batch_size=args.batch_size, steps=args.steps, device=args.device,
                           amp=args.amp, peak=args.peak_tflops, compile=args.compile, **model_overrides(args))
    if args.json:
        _print_json(asdict(results[0]) if len(results) == 1 else [asdict(r) for r in results])
        return 0
    for r in results:
        mfu = f", MFU {100 * r.mfu:.1f}% of {r.peak_tflops:g} TFLOP/s" if r.mfu is not None else ""
        extras = ", ".join(x for x in (r.device, r.amp, "compiled" if r.compiled else None) if x)
        print(f"{r.model}: {r.images_per_s:.1f} images/s training (batch {r.batch_size}, median of "
              f"{counted(r.steps, 'step')}, {r.params / 1e6:.2f}M params, {extras}); "
              f"{r.train_flops_per_image / 1e9:.2f} GFLOP per training image, {r.achieved_tflops:.3f} TFLOP/s{mfu}")
    first = results[0].model
    for r in results[1:]:
        print(f"{r.model} / {first}: {r.ratio_vs_first:.3f}x the images/s (median of per-round ratios)")
    return 0


def train_config_from_args(args: argparse.Namespace):
    from .train.config import TrainConfig

    return TrainConfig(**config_fields(args, TrainConfig))


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under torchrun (WORLD_SIZE > 1) every process runs this and joins the process group."""
    from .cli_run import run_on_processes
    from .train.images import train

    result = run_on_processes(train, train_config_from_args(args), args.ddp_backend, args.ddp_timeout)
    if result is not None:
        e, ema = result.final_eval, result.ema_eval
        averaged = f" (EMA weights: {ema.accuracy:.4f}, loss {ema.loss:.4f})" if ema else ""
        print(f"done: {counted(result.steps, 'step')}, test accuracy {e.accuracy:.4f}, loss {e.loss:.4f}{averaged}, "
              f"{result.train_images_per_s:.0f} images/s; run folder {result.out_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.evaluate import dropped_text
    from .train.evaluate_cli import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, data=args.data, data_dir=args.data_dir,
                                 batch_size=args.batch_size, device=args.device, test_subset=args.test_subset,
                                 ema=args.ema, tta=args.tta or "none", dropless=args.dropless)
    if args.json:
        _print_json(report)
        return 0
    weights = " (EMA weights)" if args.ema else ""
    weights += f" ({report['tta']} TTA)" if report["tta"] != "none" else ""
    weights += " (every token routed)" if args.dropless else ""
    at = f"@ step {report['step']}" if report["step"] is not None else f"({report['checkpoint']})"
    print(f"{report['model']} {at}{weights}: accuracy {report['accuracy']:.4f}, "
          f"loss {report['loss']:.4f} on {counted(report['examples'], report['data'] + ' test image')}"
          + (f" (from {report['data_dir']})" if report["data_dir"] else ""))
    if "single_accuracy" in report:
        print(f"  single images: accuracy {report['single_accuracy']:.4f}, loss {report['single_loss']:.4f}")
    for r in report["routing"]:
        load = " ".join(f"{f:.2f}" for f in r["expert_fraction"])
        print(f"  block {r['block']:>2}: expert load [{load}]  dropped {dropped_text(r)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import compare
    from .cli_run import refuse_several_processes

    refuse_several_processes("compare")
    settings = {k: v for k, v in vars(args).items()
                if k in ("train_subset", "test_subset", "batch_size", "lr", "data", "data_dir", "device",
                         "max_steps", "time_budget") and v is not None}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if model_overrides(args):
        settings["model_overrides"] = model_overrides(args)
    report = compare(models, args.out, preset=args.preset, seeds=args.seeds, epochs=args.epochs,
                     ablation=args.ablation, **settings)
    print(f"report: {report}")
    return 0


def _add_data_and_budget(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `train` and `compare`: data, budget (one of epochs, steps, minutes), batch,
    lr, device."""
    from .data.images import DATASET_NAMES

    p.add_argument("--data", default="fashion-mnist", choices=DATASET_NAMES)
    p.add_argument("--data-dir", type=nonempty)
    p.add_argument("--train-subset", type=positive_int, help="train on this many images (quick runs)")
    p.add_argument("--test-subset", type=positive_int)
    add_budget_arguments(p)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))


def _add_tta_argument(p: argparse.ArgumentParser) -> None:
    from .train.config import TTA_NAMES

    p.add_argument("--tta", choices=TTA_NAMES,
                   help="test-time augmentation: flip averages each image's and its mirror's predictions "
                        "(default none)")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train.config import CROP_NAMES

    p.add_argument("--model", help="a preset (widenet list; default widenet_tiny)")
    p.add_argument("--init", type=nonempty, metavar="PATH",
                   help="start from this model's config and weights instead of a preset's: a run, an "
                        "exported or upcycled folder (widenet export/upcycle) or a Hugging Face ViT folder")
    _add_data_and_budget(p)
    p.add_argument("--image-size", type=positive_int,
                   help="image side: resize the data to it (default: the dataset's own; --data folder: the "
                        "model's image size, at which the images are decoded)")
    add_recipe_arguments(p)
    p.add_argument("--label-smoothing", type=finite_float)
    p.add_argument("--mixup", type=finite_float, help="Beta(alpha, alpha) mixup: 0 (off) or alpha >= 0.01")
    p.add_argument("--crop", choices=CROP_NAMES)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default on)")
    p.add_argument("--randaugment-n", type=int)
    p.add_argument("--randaugment-m", type=finite_float)
    p.add_argument("--eval-every", type=positive_int, metavar="EPOCHS",
                   help="evaluate on the test set every N epochs (default 1); the last epoch always")
    _add_tta_argument(p)
    add_run_arguments(p, "share_norms=True")
    add_moe_arguments(p)
    p.add_argument("--out", type=nonempty, help="run folder (metrics.jsonl, checkpoints/)")
    add_process_arguments(p, "train")


# --- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="widenet", description="WideNet: go wider instead of deeper.")
    parser.add_argument("--version", action="version", version=f"widenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list the model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("params", help="count trainable parameters (shared weights once)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--num-classes", type=positive_int, default=None)
    p.add_argument("--representation", action="store_true", help="add the pre-logits layer (hidden x hidden, tanh)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", metavar="WHAT", required=True)
    p = sub.add_parser("train", help="train an image classifier (checkpoints, metrics, resume)")
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, loss, routing per block")
    from .data.images import DATASET_NAMES
    p.add_argument("--checkpoint", type=nonempty, required=True, help="checkpoint folder, run folder or model.safetensors")
    p.add_argument("--data", choices=DATASET_NAMES, help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", type=nonempty)
    p.add_argument("--test-subset", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=512,
                   help="images per forward pass (default 512, as a run on one process evaluates). An MoE "
                        "layer's capacity holds per pass, so its results depend on it (a run on N processes "
                        "evaluated 512/N per pass and process); --dropless removes the dependence")
    p.add_argument("--dropless", action="store_true",
                   help="route every token to its top-k experts whatever the capacity (as predict does): "
                        "results that do not depend on --batch-size or on which images share a pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ema", action="store_true", help="the averaged weights of a run trained with --ema-decay")
    _add_tta_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train several models with one recipe and write OUT/report.md")
    p.add_argument("--models", default="vit_tiny,vit_moe_tiny,albert_tiny,widenet_tiny",
                   help="comma-separated presets")
    p.add_argument("--preset", default="quick", choices=("quick", "full"))
    p.add_argument("--seeds", type=positive_int)
    _add_data_and_budget(p)
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                   help="also train WideNet with shared LayerNorms (default: full preset yes, quick no)")
    add_set_argument(p, "a model setting for every model, e.g. --set stem=patch")
    add_moe_arguments(p)
    p.add_argument("--out", type=nonempty, default="runs/compare")
    p.set_defaults(func=cmd_compare)

    add_text_commands(sub)
    add_model_commands(sub)
    add_predict_command(sub)

    p = bench.add_parser("moe", help="MoE layer vs dense FFN, one-hot einsum and expert loop")
    p.add_argument("--tokens", type=positive_int, default=8192)
    p.add_argument("--dim", type=positive_int, default=192)
    p.add_argument("--hidden", type=positive_int, default=768)
    p.add_argument("--experts", type=positive_int, default=4)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--capacity-factor", type=positive_float, default=1.2)
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="autocast (default off)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_moe)

    p = bench.add_parser("model", help="training throughput (images/s) and FLOPs utilisation on random input")
    p.add_argument("model", metavar="MODEL", nargs="+",
                   help="one or more presets; several are timed interleaved, with ratios to the first")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=10)
    add_set_argument(p, "any model setting, e.g. --set moe_blocks=all")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast (auto: bf16 on GPUs, off on CPUs)")
    p.add_argument("--peak-tflops", type=positive_float, help="device peak for MFU (known GPUs: looked up)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (warm-up steps compile)")
    add_moe_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_model)

    p = bench.add_parser("ddp", help="data-parallel scaling efficiency: torchrun with 1 and N processes")
    p.add_argument("--model", default="widenet_tiny")
    p.add_argument("--processes", type=positive_int, default=2)
    p.add_argument("--batch-size", type=positive_int, default=64, help="the global batch")
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--expert-parallel", action="store_true", help="also split the experts over the processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_ddp)
    return parser


def _show_library_notes() -> None:
    """The library's logged decisions (e.g. which expert kernel a GPU takes) as `widenet: ...` lines."""
    import logging

    class ToStderr(logging.Handler):  # resolves sys.stderr when it writes (tests swap it)
        def emit(self, record: logging.LogRecord) -> None:
            print(f"widenet: {record.getMessage()}", file=sys.stderr)

    logger = logging.getLogger("widenet")
    if not logger.handlers:
        logger.addHandler(ToStderr())
        logger.setLevel(logging.INFO)


def run() -> NoReturn:
    """The console script (and `python -m widenet`): main(), then exit with its status.

    A process started by torchrun (WORLD_SIZE > 1) exits without Python's
    finalization, which can abort it after a successful run (see
    widenet.distributed.env.exit_without_finalizing); so does one that a stop
    signal ended while the tokenizer trained (widenet.signals.NATIVE_CALL_THREAD).
    """
    code = main()
    several = False
    if "WORLD_SIZE" in os.environ:  # torch is imported only then
        from .distributed.env import DistEnv
        with contextlib.suppress(ValueError):  # a bad WORLD_SIZE, already reported by a command that needed it
            several = DistEnv.from_environ().distributed
    if several or native_call_abandoned():  # (a tokenizer trainer abandoned to a stop signal: signals.py)
        from .distributed.env import exit_without_finalizing
        exit_without_finalizing(code)
    raise SystemExit(code)


_RESUMABLE = ("train", "pretrain", "finetune")  # --resume after a full disk, where a checkpoint waits
_TRAINING_COMMANDS = (*_RESUMABLE, "compare", "compare-text")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every expected failure ends as one line and status 2 (cli_errors.py)."""
    closed = missing_outputs_to_devnull()
    with file_names_printable():
        return _main(argv, closed)


def _main(argv: Sequence[str] | None, closed: list[str]) -> int:
    args = parse_command_line(build_parser(), argv)
    if (lost := lost_results(args.command, closed)) is not None:
        say_error(lost)
        return 2
    before = latest_checkpoint_identity(getattr(args, "out", None)) if args.command in _RESUMABLE else None
    _show_library_notes()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with termination_interrupts(), warnings_as_notes(), output_survives_its_reader(
                args.command in _TRAINING_COMMANDS):
            code = func(args)
        sys.stdout.flush()  # output still buffered for a closed pipe fails here, where it is handled
        return code
    except TrainingStopped as err:  # a stop signal, after the run saved its checkpoint
        say_last(f"widenet: {err}")
        return err.status
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP (Terminated), where no run could save first
        line, status = (f"widenet: {err}", err.status) if isinstance(err, Terminated) else (INTERRUPTED, 130)
        if args.command in _RESUMABLE:  # how to go on, as after a full disk
            line += "; next: " + rerun_advice(args.out, True, getattr(args, "overwrite", False), before)
        say_last(line)
        return status
    except BrokenPipeError:
        # The reader closed the pipe (`widenet list | head -1`): stop quietly, as cat does,
        # and keep the interpreter's final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a process that signal ended
    except Exception as err:
        out, resumable = getattr(args, "out", None), args.command in _RESUMABLE
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        advice = rerun_advice(out, resumable, getattr(args, "overwrite", False), before) if full else \
            "run it again"
        message = explain(err, out, advice)
        if message is None:  # a bug: the traceback, and where to send it
            traceback.print_exc()
            print(BUG_REPORT, file=sys.stderr)
            return 1
        say_error(message)
        return 2
