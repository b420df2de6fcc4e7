"""Bounded fuzzing of the command line (widenet.cli.main) with Hypothesis.

Each example starts from a quick, valid command line (a tiny model, one
training step, the tiny Fashion-MNIST-format folder of conftest.py, the old
runs in tests/fixtures/v0) and overrides one or two of its typed flags with a
hostile value: nan, inf, negative, zero, huge, empty, not a number, "maybe" for
a boolean setting, a missing path, a file where a folder is expected. The
contract checked (widenet/cli.py):

* main returns an int status: 0, or 2 for bad input (argparse exits with
  SystemExit(2));
* a failure prints exactly one line on stderr, starting with "widenet", and
  never a Python traceback;
* a value that means nothing (nan or inf for a rate, a negative weight, a
  string for a boolean setting, a path that is not there) is refused: status
  0 for it is a silently accepted bad value; given alone, its refusal names
  the flag (else some later step tripped over it by accident);
* a plain valid value of every train flag is accepted (a flag that refused
  everything would pass the rest).

Everything runs in-process, in a scratch working folder, with the network
blocked and a time limit per example, so nothing trains for long. Examples are
derandomized: CI runs the same ones every time.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from widenet.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "v0"
TEXT_TINY = dict(embedding_size=8, dim=16, depth=2, num_heads=2, mlp_dim=32, max_positions=32)
HUGE = str(10 ** 30)
EXAMPLE_SECONDS = 30  # one example: far above the ~0.1 s a tiny run takes, far below a real training run
EXAMPLE_MEMORY = 6 << 30  # bytes of address space one example may add: a tiny run needs well under 1 GiB

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no "explain": it re-runs failures
                suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------
# Hostile values and what each flag must refuse
# ----------------------------------------------------------------------------
Judge = Callable[[str], bool]  # the text given on the command line -> whether it must be refused

FLOAT_TEXTS = ("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "0", "-0.0", "-1", "-1e-9",
               "1e30", "-1e30", "1e-320", "", " ", "abc", "1,5", "0x1p3")
INT_TEXTS = ("0", "-1", "-7", "", " ", "1.5", "2.0", "1e3", "nan", "inf", "0x10", "seven")
BOOL_TEXTS = ("false", "true", "yes", "no", "maybe", "", "off", "2", "-1", "nan", "'True'", "[]", "True", "False", "0")
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
PATH_KINDS = ("<missing>", "<file>", "<binary>", "<empty-dir>", "<under-file>", "")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def refuse_float(accept: Callable[[float], bool]) -> Judge:
    """A float flag: refuse what is not a number, and numbers outside `accept`."""
    return lambda text: (x := _number(text)) is None or not accept(x)


def refuse_int(accept: Callable[[int], bool]) -> Judge:
    return lambda text: (n := _integer(text)) is None or not accept(n)


def refuse_unless_in(*accepted: str) -> Judge:
    return lambda text: text not in accepted


def no_claim(_text: str) -> bool:
    return False


def _finite(x: float) -> bool:
    return math.isfinite(x)


positive = refuse_float(lambda x: _finite(x) and x > 0)
non_negative = refuse_float(lambda x: _finite(x) and x >= 0)
unit_half_open = refuse_float(lambda x: 0 <= x < 1)
unit_open = refuse_float(lambda x: 0 < x < 1)
positive_int = refuse_int(lambda n: n >= 1)
non_negative_int = refuse_int(lambda n: n >= 0)
any_int = refuse_int(lambda n: True)


def bool_meaning(text: str) -> bool | None:
    """What a boolean word means (true/false, yes/no, on/off, 1/0, any case); None for nonsense."""
    return BOOL_WORDS.get(text.strip().lower())


def not_a_bool(text: str) -> bool:
    return bool_meaning(text) is None


def floats_text(bound: float | None = None) -> st.SearchStrategy[str]:
    """The hostile texts and any float, or floats within +-bound: capacity factors of 1e5..1e9
    ask the padded kernel for gigabytes (1e30 fails fast: the slot count overflows int64)."""
    drawn = st.floats() if bound is None else st.floats(-bound, bound)
    return st.one_of(st.sampled_from(FLOAT_TEXTS), drawn.map(repr))


def ints_text(largest: int = 64, huge: bool = True) -> st.SearchStrategy[str]:
    """Integers up to `largest` (bigger ones cost time or memory), the hostile texts, and 10**30
    where a huge value fails fast (past int64, nothing can be allocated or looped over)."""
    texts = INT_TEXTS + ((HUGE, "-" + HUGE) if huge else ())
    return st.one_of(st.sampled_from(texts), st.integers(-2, largest).map(str))


@dataclass(frozen=True)
class Flag:
    """A typed flag, its hostile values and which of them must be refused.

    option "--lr" renders as "--lr=VALUE" (so "-inf" reaches the type check),
    "--set:key" as "--set=key=VALUE", and a flag without `values` as itself.
    replaces: options of the base command line this flag cannot go with.
    """

    option: str
    values: st.SearchStrategy[str] | None
    refuse: Judge
    replaces: tuple[str, ...] = ()
    meaning: Callable[[str], object] | None = None  # the setting a run that accepts the text must record
    path: bool = False  # its values are kinds of paths; a refusal names the path rather than the flag

    def render(self, value: str) -> list[str]:
        if self.values is None:
            return [self.option]
        if self.option.startswith("--set:"):
            return [f"--set={self.option.removeprefix('--set:')}={value}"]
        return [f"{self.option}={value}"]


def path_flag(option: str, refused: tuple[str, ...]) -> Flag:
    """A path flag: the values are kinds of paths (Sandbox.path) and `refused` are those it must refuse."""
    kinds = PATH_KINDS + tuple(k for k in refused if k not in PATH_KINDS)
    return Flag(option, st.sampled_from(kinds), lambda kind: kind in refused, path=True)


def float_flag(option: str, judge: Judge, bound: float | None = None) -> Flag:
    return Flag(option, floats_text(bound), judge)


def int_flag(option: str, judge: Judge = positive_int, largest: int = 64, huge: bool = True) -> Flag:
    return Flag(option, ints_text(largest, huge), judge)


def text_flag(option: str, texts: tuple[str, ...], accepted: tuple[str, ...]) -> Flag:
    return Flag(option, st.sampled_from(texts), refuse_unless_in(*accepted))


def setting(key: str, values: st.SearchStrategy[str], judge: Judge) -> Flag:
    return Flag(f"--set:{key}", values, judge)


def bool_setting(key: str) -> Flag:
    """A boolean setting: a word for true or false may be refused, or accepted and then recorded
    as that bool in the run's meta.json (not as the truthy string "false"); other text is refused."""
    return Flag(f"--set:{key}", st.sampled_from(BOOL_TEXTS), not_a_bool, meaning=bool_meaning)


MISSING_INPUT = ("<missing>", "<empty-dir>", "<under-file>", "<binary>", "")  # none of these holds data
NOT_A_FOLDER = ("<file>", "<binary>", "<under-file>", "")  # an output folder cannot be one of these

RECIPE = (
    float_flag("--lr", positive),
    float_flag("--weight-decay", non_negative),
    float_flag("--clip-norm", non_negative),
    float_flag("--dropout", unit_half_open),
    float_flag("--aux-weight", non_negative),
    float_flag("--ema-decay", unit_open),
    int_flag("--warmup-steps", non_negative_int),
    int_flag("--seed", any_int),
    int_flag("--save-every"),
    int_flag("--log-every"),
    int_flag("--batch-size"),
    int_flag("--max-steps", largest=2, huge=False),
    Flag("--time-budget", st.sampled_from(("nan", "inf", "-inf", "0", "-1", "", "soon", "1e-9")), positive,
         replaces=("--max-steps",)),  # a real budget would train for minutes
    float_flag("--ddp-timeout", positive),
    int_flag("--expert-parallel", refuse_int(lambda n: n == 1)),  # must divide the one process
)
MOE = (
    int_flag("--num-experts", largest=16),
    int_flag("--top-k", largest=8),
    float_flag("--capacity-factor", positive, bound=64),
    float_flag("--eval-capacity-factor", positive, bound=64),
    float_flag("--noise-std", non_negative),
    float_flag("--z-loss-weight", non_negative),
    text_flag("--expert-backend", ("", "nosuch", "LOOP", " loop", "loop", "padded", "grouped", "auto"),
              ("auto", "loop", "grouped", "padded")),
)
SETTINGS = (
    bool_setting("share_norms"),
    bool_setting("share_attention"),
    bool_setting("dropless"),
    bool_setting("renormalize"),
    setting("capacity_factor", floats_text(bound=64), positive),
    setting("noise_std", floats_text(), non_negative),
    setting("z_loss_weight", floats_text(), non_negative),
    setting("drop_path", floats_text(), unit_half_open),
    setting("attn_dropout", floats_text(), unit_half_open),
    setting("norm_eps", floats_text(), positive),
    setting("num_experts", ints_text(16, huge=False), positive_int),
    setting("top_k", ints_text(4, huge=False), positive_int),
    setting("moe_blocks", st.sampled_from(("all", "none", "every:1", "last:1", "every:0", "last:0", "last:-1",
                                           "last:99", "maybe", "", "every:x")),
            refuse_unless_in("all", "none", "every:1", "last:1")),
    Flag("--set", st.sampled_from(("dim", "=3", "nosuch=1", "share_norms", "dim=", "depth=nan")), lambda _: True),
)
MODEL_NAMES = ("", "nosuch", "WIDENET_TINY", "widenet_tiny ", "../widenet_tiny")


@dataclass(frozen=True)
class Command:
    """A quick valid command line (base: option -> value or None, then fixed extra words) and its flags."""

    base: Callable[[Sandbox], dict[str, str | None]]
    flags: tuple[Flag, ...]
    extra: Callable[[Sandbox], list[str]] = lambda _: []

    def flag(self, option: str) -> Flag:
        return next(f for f in self.flags if f.option == option)

    def argv(self, box: Sandbox, chosen: list[tuple[str, str]]) -> list[str]:
        """The base command line, then each chosen (option, value)."""
        base = self.base(box)
        for option, _ in chosen:
            for replaced in self.flag(option).replaces:
                base.pop(replaced, None)
        words = [w for option, value in base.items() for w in ((option,) if value is None else (option, value))]
        words += self.extra(box)  # before the hostile flags: the last --set of a key wins
        for option, value in chosen:
            words += self.flag(option).render(box.path(value) if _is_path_kind(value) else value)
        return words

    def must_refuse(self, chosen: list[tuple[str, str]]) -> bool:
        return any(self.flag(option).refuse(value) for option, value in chosen)


def _is_path_kind(value: str) -> bool:
    return value.startswith("<") and value.endswith(">")


def _set_words(settings_: dict[str, object]) -> list[str]:
    return [f"--set={key}={value}" for key, value in settings_.items()]


TRAIN = Command(
    lambda box: {"train": None, "--data-dir": str(box.fmnist), "--out": box.fresh(), "--max-steps": "1",
                 "--batch-size": "8", "--train-subset": "16", "--test-subset": "16", "--device": "cpu"},
    (*RECIPE, *MOE, *SETTINGS,
     text_flag("--model", MODEL_NAMES + ("vit_tiny",), ("vit_tiny",)),
     path_flag("--data-dir", MISSING_INPUT + ("<file>",)),
     path_flag("--out", NOT_A_FOLDER),
     int_flag("--image-size", largest=64),
     int_flag("--train-subset"),
     int_flag("--test-subset"),
     int_flag("--eval-every"),
     float_flag("--label-smoothing", unit_half_open),
     float_flag("--mixup", refuse_float(lambda a: _finite(a) and (a == 0 or a >= 0.01))),  # augment.MIN_MIXUP_ALPHA
     int_flag("--randaugment-n", non_negative_int, largest=2, huge=False),
     float_flag("--randaugment-m", refuse_float(lambda m: 0 < m < 30))),  # augment.py's range
    lambda box: box.tiny_set,
)
EVAL = Command(
    lambda box: {"eval": None, "--checkpoint": str(FIXTURES / "vision_run"), "--data-dir": str(box.fmnist),
                 "--device": "cpu", "--test-subset": "16", "--batch-size": "16", "--json": None},
    (path_flag("--checkpoint", PATH_KINDS + ("<text-run>",)),
     path_flag("--data-dir", MISSING_INPUT + ("<file>",)),
     text_flag("--data", ("", "nosuch", "Fashion-MNIST", "fashion-mnist"), ("fashion-mnist",)),
     int_flag("--test-subset"),
     int_flag("--batch-size"),
     Flag("--ema", None, lambda _: True)),  # the old run kept no weight average
)
PRETRAIN = Command(
    lambda box: {"pretrain": None, "--corpus": str(FIXTURES / "corpus.txt"),
                 "--tokenizer": str(FIXTURES / "text_run" / "tokenizer.json"), "--seq-len": "32",
                 "--batch-size": "8", "--eval-examples": "8", "--max-steps": "1", "--device": "cpu",
                 "--cache-dir": box.fresh(), "--out": box.fresh()},
    (*RECIPE, *MOE, *SETTINGS,
     path_flag("--corpus", MISSING_INPUT),
     path_flag("--tokenizer", PATH_KINDS),
     path_flag("--cache-dir", ()),  # an unusable cache may be skipped with a warning
     path_flag("--out", NOT_A_FOLDER),
     int_flag("--vocab-size"),
     int_flag("--seq-len", largest=40),
     float_flag("--mask-prob", unit_open),
     float_flag("--sop-weight", non_negative),
     int_flag("--eval-every"),
     int_flag("--eval-examples", largest=16, huge=False),
     int_flag("--eval-batch-size")),
    lambda box: _set_words(TEXT_TINY),
)
FINETUNE = Command(
    lambda box: {"finetune": None, "--task": "classify", "--init": str(FIXTURES / "text_run"),
                 "--train": str(box.tsv), "--validation": str(box.tsv), "--max-steps": "1", "--batch-size": "8",
                 "--max-len": "16", "--device": "cpu", "--out": box.fresh()},
    (*RECIPE, *MOE,
     path_flag("--init", PATH_KINDS + ("<vision-run>",)),
     path_flag("--train", MISSING_INPUT + ("<file>",)),
     path_flag("--validation", MISSING_INPUT + ("<file>",)),
     path_flag("--tokenizer", PATH_KINDS),
     path_flag("--out", NOT_A_FOLDER),
     int_flag("--max-len", largest=40),
     int_flag("--doc-stride"),
     int_flag("--max-query-len"),
     float_flag("--null-threshold", refuse_float(lambda x: not math.isnan(x)))),  # +-inf: always / never null
)
COMPARE = Command(
    lambda box: {"compare": None, "--models": "widenet_tiny", "--seeds": "1", "--no-ablation": None,
                 "--max-steps": "1", "--train-subset": "16", "--test-subset": "16", "--batch-size": "8",
                 "--device": "cpu", "--data-dir": str(box.fmnist), "--out": box.fresh()},
    (text_flag("--models", ("", ",", " , ", "nosuch", "widenet_tiny,nosuch", "widenet_tiny"), ("widenet_tiny",)),
     int_flag("--seeds", largest=1, huge=False),
     float_flag("--lr", positive),
     float_flag("--capacity-factor", positive, bound=64),
     float_flag("--noise-std", non_negative),
     path_flag("--out", NOT_A_FOLDER),
     path_flag("--data-dir", MISSING_INPUT + ("<file>",))),
)
BENCH_MOE = Command(
    lambda box: {"bench": None, "moe": None, "--tokens": "32", "--dim": "8", "--hidden": "16", "--experts": "4",
                 "--top-k": "2", "--repeats": "1", "--device": "cpu", "--json": None},
    (int_flag("--tokens"), int_flag("--dim"), int_flag("--hidden"), int_flag("--experts", largest=16),
     int_flag("--top-k", largest=8), float_flag("--capacity-factor", positive, bound=64),
     int_flag("--repeats", largest=2, huge=False),
     Flag("--device", st.sampled_from(("", "nosuch", "meta", "cpu:0", "cuda", "cuda:7", "auto", "cpu")),
          lambda text: text in ("", "nosuch", "meta"))),  # cuda: a GPU may be there
)
PARAMS = Command(
    lambda box: {"params": None},
    (int_flag("--num-classes"), Flag("--representation", None, no_claim), Flag("--json", None, no_claim)),
)


# ----------------------------------------------------------------------------
# The sandbox and one run of the command line
# ----------------------------------------------------------------------------
@dataclass(repr=False)
class Sandbox:
    root: Path
    fmnist: Path
    tsv: Path
    tiny_set: list[str]  # --set words of conftest's tiny vision model
    _count: Iterator[int] = field(default_factory=itertools.count)

    def __repr__(self) -> str:
        return f"Sandbox({self.root})"

    def fresh(self) -> str:
        """A new run folder (not yet there)."""
        return str(self.root / "runs" / f"run{next(self._count)}")

    def path(self, kind: str) -> str:
        return {"<missing>": str(self.root / "no" / "such" / "path"), "<file>": str(self.root / "a_file.txt"),
                "<binary>": str(self.root / "binary.bin"), "<empty-dir>": str(self.root / "empty_dir"),
                "<under-file>": str(self.root / "a_file.txt" / "sub"), "": "",
                "<text-run>": str(FIXTURES / "text_run"), "<vision-run>": str(FIXTURES / "vision_run")}[kind]


def _no_network(*_args: object, **_kwargs: object) -> None:
    raise OSError("network access is blocked in the CLI fuzz tests")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path, tiny_set_args: list[str]
            ) -> Iterator[Sandbox]:
    """A scratch working folder (relative default paths land there), its own data home, no network."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    (root / "a_file.txt").write_text("just a line of text\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty_dir").mkdir()
    tsv = root / "train.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"the {w} cat sits on the mat\t{w}\n" for w in ("red", "blue") * 8))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WIDENET_DATA_HOME", str(root / "data-home"))
        for name in ("getaddrinfo", "create_connection"):
            mp.setattr(socket, name, _no_network)
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        yield Sandbox(root, fmnist_dir, tsv, tiny_set_args)


class ExampleTimeout(BaseException):
    """One command line ran past EXAMPLE_SECONDS (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ExampleTimeout after `seconds` (SIGALRM: the main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise ExampleTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _memory_limit(headroom: int) -> Iterator[None]:
    """Cap the address space at its current size plus headroom, so that a value asking for
    gigabytes fails the example (an allocation error) instead of waking the OOM killer."""
    try:
        with open("/proc/self/statm") as f:
            in_use = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    status: object
    out: str
    err: str
    from_argparse: bool


def run_cli(argv: list[str]) -> Outcome:
    """main(argv) in-process; stdout and stderr captured. Exceptions other than SystemExit propagate."""
    out, err = io.StringIO(), io.StringIO()
    from_argparse = False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _time_limit(EXAMPLE_SECONDS), \
                _memory_limit(EXAMPLE_MEMORY):
            try:
                status: object = main(argv)
            except SystemExit as exit_:
                status, from_argparse = exit_.code, True
    except ExampleTimeout:
        pytest.fail(f"ran for more than {EXAMPLE_SECONDS} s: {argv}")
    except Exception as error:
        error.add_note(f"widenet.cli.main raised for argv {argv}\nstderr: {err.getvalue()[-2000:]}")
        raise
    return Outcome(status, out.getvalue(), err.getvalue(), from_argparse)


def spellings(option: str) -> tuple[str, ...]:
    """How a refusal may name a flag: --max-steps, max-steps or max_steps; a --set key as itself."""
    name = option.removeprefix("--set:").lstrip("-")
    return option, name, name.replace("-", "_")


def check_contract(argv: list[str], result: Outcome, must_refuse: bool, named: str | None = None) -> None:
    """named: the one flag given a value that means nothing; its refusal must name it (a refusal
    that names something else came from some later step tripping over the value)."""
    said = f"argv {argv}\nstatus {result.status!r}\nstderr:\n{result.err}\nstdout (end):\n{result.out[-500:]}"
    assert isinstance(result.status, int) and not isinstance(result.status, bool), said
    assert "Traceback" not in result.err and "Traceback" not in result.out, said
    if result.status == 0:
        assert not must_refuse, f"a nonsense value was silently accepted: {said}"
        return
    assert result.status == 2, said
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr: {said}"
    assert lines[0].startswith("widenet"), said
    if result.from_argparse:
        assert ": error: " in lines[0], said
    if named is not None:
        assert any(name in lines[0] for name in spellings(named)), f"the refusal does not name {named}: {said}"


def _with_value(flag: Flag) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(st.just(flag.option), flag.values if flag.values is not None else st.just(""))


def hostile(command: Command) -> st.SearchStrategy[list[tuple[str, str]]]:
    """One or two (option, value) pairs: distinct flags of the command, each with a hostile value."""
    one = st.sampled_from(command.flags).flatmap(_with_value)
    return st.lists(one, min_size=1, max_size=2, unique_by=lambda pair: pair[0])


def run_folder(argv: list[str]) -> Path:
    """The folder the last --out of argv names."""
    out = ""
    for i, word in enumerate(argv):
        if word == "--out":
            out = argv[i + 1]
        elif word.startswith("--out="):
            out = word.removeprefix("--out=")
    return Path(out)


def recorded_setting(argv: list[str], key: str) -> object:
    """The value of model setting `key` in the newest meta.json of the run argv wrote."""
    meta = sorted(run_folder(argv).glob("checkpoints/step_*/meta.json"))[-1]
    pending = [json.loads(meta.read_text())["model_config"]]
    while pending:  # nested configs: model -> encoder -> moe
        config = pending.pop()
        if key in config:
            return config[key]
        pending += [v for v in config.values() if isinstance(v, dict)]
    raise KeyError(f"{key} is not in {meta}")


def fuzz(box: Sandbox, command: Command, chosen: list[tuple[str, str]]) -> None:
    argv = command.argv(box, chosen)
    result = run_cli(argv)
    refused = [option for option, value in chosen if command.flag(option).refuse(value)]
    named = refused[0] if len(chosen) == 1 and refused and command.flag(refused[0]).values is not None \
        and not command.flag(refused[0]).path else None
    check_contract(argv, result, bool(refused), named)
    for option, value in chosen:
        flag = command.flag(option)
        if result.status == 0 and flag.meaning is not None:
            recorded = recorded_setting(argv, option.removeprefix("--set:"))
            assert recorded is flag.meaning(value), \
                f"{option.removeprefix('--set:')}={value!r} was recorded as {recorded!r}: argv {argv}"


# ----------------------------------------------------------------------------
# The properties, one test per command
# ----------------------------------------------------------------------------
@settings(FUZZ, max_examples=50)  # the command with the most flags
@given(chosen=hostile(TRAIN))
@example(chosen=[("--set:share_norms", "false")])
@example(chosen=[("--capacity-factor", "inf")])
@example(chosen=[("--set:capacity_factor", "nan")])
@example(chosen=[("--noise-std", "nan")])
@example(chosen=[("--lr", "1e300")])  # past float32: the optimizer cannot hold it
@example(chosen=[("--noise-std", "1e300")])
@example(chosen=[("--num-experts", HUGE)])
@example(chosen=[("--image-size", HUGE)])
@example(chosen=[("--out", "<under-file>")])
@example(chosen=[("--out", "")])
@example(chosen=[("--randaugment-m", "-1")])
def test_train_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, TRAIN, chosen)


PLAIN = ("0.5", "1", "true", "all", "loop")  # the first a flag must accept is its plain value, unless:
PLAIN_FOR = {"--num-experts": "4", "--set:num_experts": "4", "--image-size": "28", "--model": "vit_tiny"}


@pytest.mark.parametrize("flag", [f for f in TRAIN.flags if f.values is not None and not f.path
                                  and f.option not in ("--set", "--time-budget")], ids=lambda f: f.option)
def test_train_accepts_a_plain_value_of_every_flag(sandbox: Sandbox, flag: Flag) -> None:
    """The other half of the contract: a flag that refused everything would pass the fuzzing."""
    value = PLAIN_FOR.get(flag.option) or next(text for text in PLAIN if not flag.refuse(text))
    argv = TRAIN.argv(sandbox, [(flag.option, value)])
    result = run_cli(argv)
    assert result.status == 0, f"{flag.option}={value} refused: {result.err}"


@FUZZ
@given(chosen=hostile(EVAL))
@example(chosen=[("--checkpoint", "<text-run>")])
@example(chosen=[("--data", "")])
@example(chosen=[("--data-dir", "")])
def test_eval_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, EVAL, chosen)


@FUZZ
@given(chosen=hostile(PRETRAIN))
@example(chosen=[("--mask-prob", "nan")])
@example(chosen=[("--tokenizer", "")])
def test_pretrain_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, PRETRAIN, chosen)


@FUZZ
@given(chosen=hostile(FINETUNE))
@example(chosen=[("--tokenizer", "")])
@example(chosen=[("--ddp-timeout", "inf")])
def test_finetune_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, FINETUNE, chosen)


@settings(FUZZ, max_examples=4)  # a comparison writes plots and a report: ~1 s each
@given(chosen=hostile(COMPARE))
@example(chosen=[("--out", "<file>")])
def test_compare_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, COMPARE, chosen)


@FUZZ
@given(chosen=hostile(BENCH_MOE))
@example(chosen=[("--capacity-factor", "inf")])
@example(chosen=[("--capacity-factor", "1e30")])
@example(chosen=[("--tokens", HUGE)])
def test_bench_moe_survives_hostile_flags(sandbox: Sandbox, chosen: list[tuple[str, str]]) -> None:
    fuzz(sandbox, BENCH_MOE, chosen)


@FUZZ
@given(model=st.sampled_from(MODEL_NAMES + ("widenet_tiny", "widenet_text_tiny")), chosen=hostile(PARAMS))
@example(model="widenet_tiny", chosen=[("--num-classes", HUGE)])
def test_params_survives_hostile_flags(sandbox: Sandbox, model: str, chosen: list[tuple[str, str]]) -> None:
    known = model in ("widenet_tiny", "widenet_text_tiny")
    argv = PARAMS.argv(sandbox, chosen)
    argv.insert(1, model)  # the positional MODEL
    check_contract(argv, run_cli(argv), not known or PARAMS.must_refuse(chosen))
