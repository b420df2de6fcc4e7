"""Argument types and argument groups shared by the CLI's commands."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

from .cli_errors import CLIError
from .settings import FLOAT_LIMIT, INT_LIMIT, repeated


class Parser(argparse.ArgumentParser):
    """Argument errors as one line (plus a hint), exit status 2; sub-parsers inherit it. No
    abbreviated flags: `compare --seed 7` would otherwise mean `--seeds 7` (seven seeds)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be >= 1 (and below 2**63), got {value}")
    return value


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (every float flag's type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and abs(value) <= FLOAT_LIMIT):
        raise argparse.ArgumentTypeError(f"must be a finite number within +-{FLOAT_LIMIT:.3g}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonempty(value: str) -> str:
    """A path or name that is not empty (an empty --out would mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def parse_setting(text: str) -> tuple[str, str]:
    """KEY=VALUE, both as written (model_overrides() reads VALUE as the setting's declared type)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """Optimiser, schedule and regularisation settings of every training command."""
    from .train.config import OPTIMIZER_NAMES, SCHEDULE_NAMES

    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES)
    p.add_argument("--weight-decay", type=finite_float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=SCHEDULE_NAMES)
    p.add_argument("--clip-norm", type=finite_float)
    p.add_argument("--dropout", type=finite_float)
    p.add_argument("--aux-weight", type=finite_float, help="weight of the summed balance loss (paper: 0.01)")
    p.add_argument("--ema-decay", type=finite_float, metavar="D",
                   help="also keep and evaluate an exponential moving average of the weights (e.g. 0.999)")


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """How long a run trains: one of epochs, steps or minutes."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_int)
    budget.add_argument("--max-steps", type=positive_int)
    budget.add_argument("--time-budget", type=positive_float, metavar="MINUTES",
                        help="train (each run) for as many steps as fit in this wall-clock time, evaluations "
                             "included: planned from measured steps, re-planned after every epoch; one process")


def add_process_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """Several processes (torchrun): data, fully sharded or expert parallel."""
    dist = p.add_argument_group(f"several processes (launch with torchrun --nproc_per_node N -m widenet {command})")
    dist.add_argument("--fsdp", action="store_true", default=None,
                      help="shard weights, gradients and optimizer state (fully_shard) instead of DDP")
    dist.add_argument("--expert-parallel", type=positive_int, metavar="N",
                      help="split each MoE's experts over groups of N processes (N divides the number of "
                           "processes; the groups are data-parallel replicas)")
    dist.add_argument("--ddp-backend", default="auto", choices=("auto", "gloo", "nccl"),
                      help="process-group backend (auto: nccl with CUDA, else gloo)")
    dist.add_argument("--ddp-timeout", type=positive_float, metavar="SECONDS",
                      help="fail a collective that waits longer than this (default: torch's 30 minutes)")


def add_set_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    """--set KEY=VALUE, repeatable: model settings (read by model_overrides)."""
    p.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE", help=help_text)


def add_run_arguments(p: argparse.ArgumentParser, example_setting: str) -> None:
    """Model settings, seed, checkpointing, logging, precision and resume."""
    add_set_argument(p, f"any model setting, e.g. --set {example_setting}")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=positive_int, help="also checkpoint every N steps")
    p.add_argument("--log-every", type=positive_int)
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write what metrics.jsonl records (losses, accuracy, lr, expert load and drops per "
                        "MoE block) as TensorBoard event files in OUT/tensorboard/; needs the tensorboard package "
                        "(pip install 'widenet[tensorboard]')")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (the first steps compile: ~1 min on a CPU)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its checkpoints and metrics; deleted once this run "
                            "saves a checkpoint, put back if it stops before)")


def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per MoE setting, generated from layers.moe.MoEConfig (--top-k 1, --capacity-factor 1.5,
    --dropless, ...): what they set applies to every MoE layer of the model; they win over --set."""
    from .layers.moe import MoEConfig

    group = p.add_argument_group("MoE settings (every MoE layer of the model)")
    for f in dataclasses.fields(MoEConfig):
        flag, dest, help_text = "--" + f.name.replace("_", "-"), "moe_" + f.name, f.metadata["help"]
        if f.type == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = positive_int if f.type == "int" else finite_float if "float" in f.type else str
            group.add_argument(flag, dest=dest, type=kind, metavar=f.name.upper(), help=help_text)


def moe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The MoE flags given on the command line, by MoEConfig field name."""
    from .layers.moe import MOE_SETTINGS

    return {name: getattr(args, "moe_" + name) for name in MOE_SETTINGS
            if getattr(args, "moe_" + name, None) is not None}


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set KEY=VALUE settings read as their declared types (share_norms=no -> False,
    capacity_factor=nan -> an error naming it), then the MoE flags (which win)."""
    from .models.registry import setting_kinds
    from .settings import parse_setting_text

    kinds, settings = setting_kinds(), {}
    if twice := repeated(key for key, _ in getattr(args, "set", None) or []):
        raise CLIError(f"--set {', '.join(twice)} given more than once; give each setting once")
    for key, text in getattr(args, "set", None) or []:
        # An unknown key stays text: applying it names every unknown setting at once.
        settings[key] = parse_setting_text(text, *kinds[key], key) if key in kinds else text
    return {**settings, **moe_overrides(args)}


def refuse_unused(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """CLIError naming the flags among `names` (argument dests) that were given although they
    would change nothing here (`why`: "with --tokenizer (...)"), rather than ignoring them."""
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} would change nothing {why}; leave {'it' if len(given) == 1 else 'them'} "
                       "out")


def config_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The arguments given on the command line that are fields of the config class `cls`, and the
    model settings (--set, MoE flags). --model beside --init is refused: --init's model is trained."""
    if getattr(args, "init", None) and getattr(args, "model", None):
        raise CLIError(f"--model {args.model} and --init both given: the run trains --init's model; "
                       "leave --model out")
    fields = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None}
    fields["model_overrides"] = model_overrides(args)
    return fields


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args, but arguments no command takes are named with the --help of the command
    given (`widenet params --help`), not the top level's."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        given = list(sys.argv[1:] if argv is None else argv)
        # `widenet --bogus list`: an argument before the command is the top level's
        ahead = extra[0] in given and args.command in given and given.index(extra[0]) < given.index(args.command)
        command = "widenet" if ahead else " ".join(filter(None, ("widenet", args.command, getattr(args, "bench", None))))
        parser.exit(2, f"widenet: error: unrecognized arguments: {' '.join(extra)} (see {command} --help)\n")
    return args
