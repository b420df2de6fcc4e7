"""Command line: thin parsers over library functions.

    widenet list
    widenet params MODEL [MODEL ...] [--num-classes N] [--representation] [--json]
    widenet bench moe [--tokens --dim --hidden --experts --top-k --capacity-factor] [--json]
    widenet bench model MODEL [--batch-size N] [--steps N] [--json]

Bad input exits with status 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Callable, Sequence

from . import __version__


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


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

    from .models.registry import count_parameters, create_model

    overrides = {}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.representation:
        overrides["representation"] = True
    rows = []
    for name in args.models:
        with torch.device("meta"):  # counts only: allocate nothing
            model = create_model(name, **overrides)
        rows.append({"model": name, "params": count_parameters(model),
                     "num_classes": model.cfg.num_classes,
                     "representation": model.cfg.representation_size is not None})
    if args.json:
        _print_json(rows[0] if len(rows) == 1 else rows)
        return 0
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        print(f"{r['model']:<{width}}  {r['params']:>13,d}  ({r['params'] / 1e6:.2f}M)")
    return 0


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from .bench.model_bench import resolve_device
    from .bench.moe_bench import MoEBenchConfig, format_moe_bench, run_moe_bench

    cfg = MoEBenchConfig(tokens=args.tokens, dim=args.dim, hidden=args.hidden, experts=args.experts,
                         top_k=args.top_k, capacity_factor=args.capacity_factor, repeats=args.repeats,
                         device=str(resolve_device(args.device)))
    result = run_moe_bench(cfg)
    if args.json:
        _print_json(result)
    else:
        print(format_moe_bench(result))
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .bench.model_bench import bench_model

    r = bench_model(args.model, batch_size=args.batch_size, steps=args.steps, device=args.device)
    if args.json:
        _print_json(asdict(r))
    else:
        print(f"{r.model}: {r.images_per_s:.1f} images/s training (batch {r.batch_size}, "
              f"{r.steps} steps, {r.params / 1e6:.2f}M params, {r.device})")
    return 0


# --- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="widenet", description="WideNet: go wider instead of deeper.")
    parser.add_argument("--version", action="version", version=f"widenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list the model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("params", help="count trainable parameters (shared weights once)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--num-classes", type=_positive_int, default=None)
    p.add_argument("--representation", action="store_true", help="add the pre-logits layer (hidden x hidden, tanh)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", metavar="WHAT", required=True)
    p = bench.add_parser("moe", help="MoE layer vs dense FFN, one-hot einsum and expert loop")
    p.add_argument("--tokens", type=_positive_int, default=8192)
    p.add_argument("--dim", type=_positive_int, default=192)
    p.add_argument("--hidden", type=_positive_int, default=768)
    p.add_argument("--experts", type=_positive_int, default=4)
    p.add_argument("--top-k", type=_positive_int, default=2)
    p.add_argument("--capacity-factor", type=_positive_float, default=1.2)
    p.add_argument("--repeats", type=_positive_int, default=7)
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_moe)

    p = bench.add_parser("model", help="training throughput (images/s) on random input")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--steps", type=_positive_int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CLIError, ValueError) as err:
        # Library and user errors: one line, no traceback.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"widenet: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("widenet: interrupted", file=sys.stderr)
        return 130
