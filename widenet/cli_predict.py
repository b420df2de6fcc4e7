"""`widenet predict`: the classes of images or sentences, or answers to questions, from a saved model.

    widenet predict --checkpoint RUN|DIR IMAGE|FOLDER|GLOB ... [--top-k K] [--json]
    widenet predict --checkpoint RUN|DIR --text FILE|- [--top-k K] [--json]
    widenet predict --checkpoint RUN|DIR --question Q [--question Q2 ...] --context C | --context-file F [--json]

Output: an aligned table, or with --json one JSON object a line ({"file", "top":
[{"class", "probability"}, ...]}; sentences: {"line", "text", "top"}, line being the
input line, blank ones skipped; QA: {"question", "answer", "score"}).
An image that cannot be read is named on stderr (`widenet: cannot read image
X: why`); the others are still predicted and the exit status is then 1.
Everything else that is wrong ends the command with one line, status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .cli_args import finite_float, nonempty, positive_int, refuse_unused
from .cli_errors import CLIError, say

__all__ = ["add_predict_command", "cmd_predict"]

TEXT_COLUMN = 60  # characters of a sentence or question shown in a table (JSON has them whole)
TOP_K = 5  # classes shown per image or sentence unless --top-k says


def add_predict_command(sub) -> None:
    """Register `predict` on the CLI's subparsers."""
    p = sub.add_parser("predict", help="classify images or sentences, or answer questions, with a saved model",
                       description="Predict with any saved model: a run folder, checkpoint, export or Hugging Face "
                                   "folder. Images: the top classes of files, folders (searched recursively) and "
                                   "globs. Text classifiers: --text. QA models: --question with --context.")
    p.add_argument("inputs", nargs="*", type=nonempty, metavar="IMAGE",
                   help="image files, folders (their .png .jpg .bmp .gif .webp .tif .pgm ... files, "
                        "recursively) or globs "
                        "(quoted globs are expanded too; ** spans folders)")
    p.add_argument("--checkpoint", type=nonempty, required=True, metavar="RUN|DIR",
                   help="run folder (its latest checkpoint), checkpoint folder, export or Hugging Face folder")
    p.add_argument("--text", type=nonempty, metavar="FILE",
                   help="sentences to classify, one a line ('-': stdin); a TAB separates a sentence pair")
    p.add_argument("--question", action="append", type=nonempty, metavar="Q",
                   help="a question on the context (QA models); repeat for several")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", type=nonempty, metavar="TEXT", help="the passage the answer is taken from")
    context.add_argument("--context-file", type=nonempty, metavar="FILE", help="the passage, from a UTF-8 file")
    p.add_argument("--top-k", type=positive_int, help=f"classes shown per input (default {TOP_K})")
    p.add_argument("--batch-size", type=positive_int, default=64, help="inputs per forward pass (default 64)")
    p.add_argument("--max-len", type=positive_int,
                   help="text: tokens per sequence (default: the model's fine-tuning length, else 128 classify, "
                        "384 qa)")
    p.add_argument("--null-threshold", type=finite_float,
                   help="QA: answer nothing when the no-answer option beats the best span by more than this "
                        "(default: a model fine-tuned on SQuAD 2.0 data uses its fine-tuning's threshold, other "
                        "models always answer a span; refused for SQuAD 1.1 models)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_predict)


def _input_kind(args: argparse.Namespace) -> str:
    """"images", "text" or "qa": the one kind of input given (CLIError when none or several)."""
    qa = bool(args.question or args.context is not None or args.context_file is not None)
    given = [kind for kind, present in (("images", bool(args.inputs)), ("text", args.text is not None), ("qa", qa))
             if present]
    if not given:
        raise CLIError("nothing to predict on: give image files, folders or globs, --text FILE (- for stdin), "
                       "or --question with --context")
    if len(given) > 1:
        names = {"images": "images", "text": "--text", "qa": "--question/--context"}
        raise CLIError(f"give one kind of input, not {' and '.join(names[k] for k in given)}")
    if qa and not args.question:
        raise CLIError("--context needs a --question")
    if qa and args.context is None and args.context_file is None:
        raise CLIError("--question needs --context TEXT or --context-file FILE")
    return given[0]


def _read_context(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CLIError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise CLIError(f"{path}: the context file is empty")
    return text.strip()


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference.loading import load_pretrained
    from .inference.predict import check_fits
    from .inference.predict_text import check_text_form, read_sentence_lines
    from .runtime import resolve_device

    kind = _input_kind(args)
    device = resolve_device(args.device)
    lines = read_sentence_lines(args.text) if kind == "text" else None
    context = None
    if kind == "qa":
        context = args.context if args.context is not None else _read_context(args.context_file)
    pretrained = load_pretrained(args.checkpoint)
    for note in pretrained.notes:
        say(f"widenet: note: {note}")
    check_fits(pretrained, kind)
    if kind == "images":
        refuse_unused(args, ("max_len", "null_threshold"), "for images (text and QA settings)")
        return _predict_images(args, pretrained, device)
    if kind == "text":
        refuse_unused(args, ("null_threshold",), "for sentence classification (a QA setting)")
        where = "stdin" if args.text == "-" else args.text
        check_text_form(pretrained, [(f"{where} line {number}", text) for number, text in lines])
        return _classify_texts(args, pretrained, lines, device)
    refuse_unused(args, ("top_k",), "for questions (one answer each)")
    return _answer_questions(args, pretrained, [(q, context) for q in args.question], device)


def _print_json(record: dict) -> None:
    """One JSON line, text as it is, except where a file name is not UTF-8 (its undecodable bytes,
    held as lone surrogates, would make the line invalid UTF-8): that line is written in ASCII escapes."""
    from .files import is_utf8

    line = json.dumps(record, ensure_ascii=False)
    print(line if is_utf8(line) else json.dumps(record), flush=True)


def _predict_images(args: argparse.Namespace, pretrained, device) -> int:
    from .inference.predict import iter_predict_images

    rows, failed = [], 0
    for result in iter_predict_images(pretrained, args.inputs, args.top_k or TOP_K, args.batch_size, device):
        if not result.ok:
            failed += 1
            say(f"widenet: cannot read image {result.file}: {result.reason}")
        elif args.json:
            _print_json(result.to_record())
        else:
            rows.append((result.file, result.top))
    if rows:
        _print_table("file", rows)
    return 1 if failed else 0


def _shorten(text: str, width: int = TEXT_COLUMN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _classify_texts(args: argparse.Namespace, pretrained, lines, device) -> int:
    """lines: (line number, sentence or pair) of the input; a JSON record names its line (blank
    lines are skipped, so records and input lines need not pair up one to one)."""
    from .inference.predict_text import iter_classify_texts

    rows = []
    texts = [text for _, text in lines]
    results = iter_classify_texts(pretrained, texts, args.top_k or TOP_K, args.batch_size, device, args.max_len)
    for result, (number, _) in zip(results, lines):  # results first: run to its end (its truncation note)
        if args.json:
            _print_json({"line": number, **result.to_record()})
        else:
            shown = result.text if result.text_pair is None else f"{result.text} | {result.text_pair}"
            rows.append((_shorten(shown), result.top))
    if rows:
        _print_table("text", rows)
    return 0


def _answer_questions(args: argparse.Namespace, pretrained, pairs, device) -> int:
    from .inference.predict_text import iter_answer_questions

    rows = []
    for answer in iter_answer_questions(pretrained, pairs, args.batch_size, device, args.max_len,
                                        null_threshold=args.null_threshold):
        if args.json:
            _print_json(answer.to_record())
        else:
            rows.append([_shorten(answer.question), _shorten(answer.answer) if answer.answer else "(no answer)",
                         f"{answer.score:.4f}"])
    if rows:
        _print_aligned([["question", "answer", "score"], *rows])
    return 0


def _print_table(first: str, rows: Sequence[tuple[str, list]]) -> None:
    """One line per input: its name, then "class  probability" per rank, every column aligned."""
    ranks = max(len(top) for _, top in rows)
    names = [max((len(top[r].name) for _, top in rows if r < len(top)), default=0) for r in range(ranks)]
    lines = [[first, *(f"top {r + 1}" for r in range(ranks))]]
    for label, top in rows:
        lines.append([label, *(f"{c.name:<{names[r]}}  {100 * c.probability:6.2f}%" for r, c in enumerate(top))])
    _print_aligned(lines)


def _print_aligned(lines: Sequence[Sequence[str]]) -> None:
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(max(map(len, lines)))]
    for line in lines:
        print("   ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
