"""Predictions of text models: classes of sentences (or pairs) and answers to questions.

See widenet.inference.predict for the shared machinery and the image side.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.text.classification import ClassificationExample, encode_classification
from ..data.text.squad import SquadExample, _best_span, encode_squad, postprocess_squad
from ..data.text.tokenizer import special_ids
from ..layers.moe import dropless_routing
from .loading import Pretrained
from ..train.text_inputs import QA_DOC_STRIDE, QA_MAX_QUERY_LEN, default_max_len
from .predict import (MAX_ANSWER_LEN, N_BEST, Answer, PredictError, TextPrediction, _batches, _check_sizes,
                      _class_names, _on_device, _progress, _top, check_finite_scores, check_fits)


__all__ = ["answer_questions", "check_text_form", "classify_texts", "iter_answer_questions", "iter_classify_texts",
           "read_sentence_lines", "read_sentences"]


# --- text classification -----------------------------------------------------------------
def read_sentences(source: str | os.PathLike, stdin: Any = None) -> list[str | tuple[str, str]]:
    """The sentences of a UTF-8 file (or of stdin for "-"), one a line, blank lines skipped; a line
    holding a TAB is a sentence pair (the text before it, the text after it)."""
    return [sentence for _, sentence in read_sentence_lines(source, stdin)]


def read_sentence_lines(source: str | os.PathLike, stdin: Any = None) -> list[tuple[int, str | tuple[str, str]]]:
    """read_sentences with each sentence's line number (from 1), which says where the skipped blank
    lines were. Lines end at a line break as a text editor's do (\\n, \\r\\n or \\r), not at the other
    characters str.splitlines() also breaks on (a form feed, U+2028, ...)."""
    where = "stdin" if os.fspath(source) == "-" else os.fspath(source)
    try:
        if where == "stdin":
            stream = stdin or sys.stdin
            if stream is None:
                raise PredictError("stdin is closed: give the sentences in a file, or on stdin")
            data = getattr(stream, "buffer", stream).read()  # bytes where it can: decoded strictly below
            text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        else:
            text = Path(source).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PredictError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    sentences: list[tuple[int, str | tuple[str, str]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise PredictError(f"{where} line {number}: {len(parts) - 1} TABs; a line holds one sentence, or "
                               "two separated by one TAB")
        if any(not p.strip() for p in parts):
            raise PredictError(f"{where} line {number}: an empty sentence beside the TAB")
        sentences.append((number, parts[0] if len(parts) == 1 else (parts[0], parts[1])))
    if not sentences:
        raise PredictError(f"{where}: no sentences (one a line)")
    return sentences


def check_text_form(pretrained: Pretrained, texts: Sequence[tuple[Any, str | tuple[str, str]]]) -> None:
    """Raise PredictError at the first text whose form (one sentence, or a pair) is not the one the
    classifier was fine-tuned on; texts: (where, sentence or pair), e.g. ("stdin line 3", "...").
    Nothing is checked when the model does not say (runs fine-tuned before this was recorded)."""
    pairs = (pretrained.inputs or {}).get("pairs")
    if pairs is None:
        return
    for where, text in texts:
        if isinstance(text, str) == pairs:
            got, trained = ("one sentence", "sentence pairs") if pairs else ("a sentence pair", "single sentences")
            hint = "two texts separated by a TAB" if pairs else "a line without a TAB"
            raise PredictError(f"{where}: {got}, but the model was fine-tuned on {trained} ({hint} on each line of "
                               "--text; a model's scores for the other form mean nothing)")


def _check_utf8(text: str, where: str) -> None:
    """Text from a command line or stdin that was not UTF-8 reaches Python as lone surrogates (PEP 383)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start]) - 0xDC00 if 0xDC80 <= ord(text[err.start]) <= 0xDCFF else None
        shown = f"the byte 0x{byte:02x}" if byte is not None else repr(text[err.start])
        raise PredictError(f"{where}: not UTF-8 text ({shown} at character {err.start})") from None


def _max_len(pretrained: Pretrained, max_len: int | None, task: str) -> int:
    """max_len, else the length the model was fine-tuned with, else fine-tuning's default for task."""
    limit = pretrained.model.cfg.max_positions
    if max_len is None:
        saved = (pretrained.inputs or {}).get("max_len")
        return min(saved, limit) if saved else default_max_len(task, limit)
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive whole number, got {max_len!r}")
    if max_len > limit:
        raise PredictError(f"max_len {max_len} exceeds the model's {limit} positions")
    return max_len


def _encode(examples: list[ClassificationExample], tokenizer: Any, max_len: int) -> tuple[dict, int]:
    """encode_classification's ids, and how many examples it truncated (its warning, kept for one
    note on all the batches at the end)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_classification(examples, tokenizer, None, max_len)
    truncated = 0
    for w in caught:
        if found := re.match(r"(\d+) of \d+ examples were longer", str(w.message)):
            truncated += int(found.group(1))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return encoded, truncated


def iter_classify_texts(pretrained: Pretrained, texts: Sequence[str | tuple[str, str]], top_k: int = 5,
                        batch_size: int = 64, device: str | torch.device = "auto", max_len: int | None = None,
                        progress: bool | None = None) -> Iterator[TextPrediction]:
    """classify_texts, one result at a time as the batches finish (same order)."""
    _check_sizes(top_k=top_k, batch_size=batch_size)
    check_fits(pretrained, "text")
    examples = []
    for i, text in enumerate(texts):
        pair = [text] if isinstance(text, str) else list(text) if isinstance(text, (tuple, list)) else []
        if not 1 <= len(pair) <= 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise PredictError(f"text {i + 1}: expected a non-empty sentence or a pair of them, got {text!r}")
        for t in pair:
            _check_utf8(t, f"text {i + 1}")
        examples.append(ClassificationExample(pair[0], pair[1] if len(pair) == 2 else None, None))
    if not examples:
        raise PredictError("no sentences given")
    check_text_form(pretrained, [(f"text {i + 1}", ex.text_a if ex.text_b is None else (ex.text_a, ex.text_b))
                                 for i, ex in enumerate(examples)])
    length = _max_len(pretrained, max_len, "classify")
    tokenizer, pad = pretrained.tokenizer, special_ids(pretrained.tokenizer).pad
    names = _class_names(pretrained, pretrained.model.cfg.num_labels)
    model, dev = _on_device(pretrained, device)
    truncated = 0
    with _progress(len(examples), batch_size, "text", progress) as bar:
        for batch in _batches(examples, batch_size):
            encoded, cut = _encode(list(batch), tokenizer, length)
            truncated += cut
            ids = encoded["input_ids"].to(dev)
            with torch.inference_mode():
                with dropless_routing(model):
                    logits = model(ids, encoded["token_type_ids"].to(dev), padding_mask=ids == pad).logits
            for ex, top in zip(batch, _top(pretrained, logits, names, top_k)):
                yield TextPrediction(ex.text_a, ex.text_b, top)
            bar.update(len(batch))
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} texts were longer than {length} tokens and were "
                      "truncated (longest first)", stacklevel=2)


def classify_texts(pretrained: Pretrained, texts: Sequence[str | tuple[str, str]], top_k: int = 5,
                   batch_size: int = 64, device: str | torch.device = "auto", max_len: int | None = None,
                   progress: bool | None = None) -> list[TextPrediction]:
    """The top_k classes (at most all) of each sentence or (a, b) pair, encoded as fine-tuning did
    (encode_classification, max_len tokens, default the model's fine-tuning length, else 128),
    `batch_size` at a time on `device`. A text of the other form than fine-tuning's (one sentence
    for a model fine-tuned on pairs, or the reverse) is refused."""
    return list(iter_classify_texts(pretrained, texts, top_k, batch_size, device, max_len, progress))


# --- question answering ------------------------------------------------------------------
def _span_score(start: torch.Tensor, end: torch.Tensor, s: int, e: int) -> float:
    """The probability of the span (s, e) in one window: softmax over the window's positions."""
    return float(start.softmax(-1)[s] * end.softmax(-1)[e])


def _scores(examples: list[SquadExample], features, starts: torch.Tensor, ends: torch.Tensor,
            allow_no_answer: bool, null_threshold: float) -> list[float]:
    """The probability of each example's answer, chosen by postprocess_squad's rule: the best span
    (start + end logit) over the windows, unless there is none or (allow_no_answer) the no-answer
    option beats it by more than null_threshold: then [CLS] of the window where that option is best."""
    best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, feature, start, end)
    null: dict[int, tuple[float, int]] = {}  # example -> (lowest null logit sum, its feature)
    for f in range(len(features)):
        ex = int(features.example_index[f])
        value = float(starts[f, 0] + ends[f, 0])
        if ex not in null or value < null[ex][0]:
            null[ex] = (value, f)
        context = torch.tensor([o is not None for o in features.offsets[f]])
        span = _best_span(starts[f], ends[f], context, N_BEST, MAX_ANSWER_LEN)
        if span is not None and (ex not in best or span[0] > best[ex][0]):
            best[ex] = (span[0], f, span[1], span[2])
    scores = []
    for i in range(len(examples)):
        if i in best and not (allow_no_answer and null[i][0] - best[i][0] > null_threshold):
            _, f, s, e = best[i]
            scores.append(_span_score(starts[f], ends[f], s, e))
        else:
            f = null[i][1]
            scores.append(_span_score(starts[f], ends[f], 0, 0))
    return scores


def iter_answer_questions(pretrained: Pretrained, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                          device: str | torch.device = "auto", max_len: int | None = None,
                          doc_stride: int | None = None, max_query_len: int | None = None,
                          allow_no_answer: bool | None = None, null_threshold: float | None = None,
                          progress: bool | None = None) -> Iterator[Answer]:
    """answer_questions, one answer at a time as the batches finish (same order)."""
    _check_sizes(batch_size=batch_size)
    check_fits(pretrained, "qa")
    examples = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(t, str) and t.strip() for t in pair)):
            raise PredictError(f"question {i + 1}: expected a non-empty (question, context) pair, got {pair!r}")
        _check_utf8(pair[0], f"question {i + 1}")
        _check_utf8(pair[1], f"the context of question {i + 1}")
        examples.append(SquadExample(str(i), pair[0], pair[1], [], False))
    if not examples:
        raise PredictError("no questions given")
    length = _max_len(pretrained, max_len, "qa")
    saved = pretrained.inputs or {}
    doc_stride = _positive_or(doc_stride, "doc_stride", saved.get("doc_stride") or QA_DOC_STRIDE)
    max_query_len = _positive_or(max_query_len, "max_query_len", saved.get("max_query_len") or QA_MAX_QUERY_LEN)
    _check_questions_fit(pretrained, examples, length, max_query_len)
    allow_no_answer, null_threshold = _no_answer_rule(pretrained, allow_no_answer, null_threshold)
    pad = special_ids(pretrained.tokenizer).pad
    model, dev = _on_device(pretrained, device)
    with _progress(len(examples), batch_size, "question", progress) as bar:
        for chunk in _batches(examples, batch_size):
            chunk = list(chunk)
            features = encode_squad(chunk, pretrained.tokenizer, max_len=length, doc_stride=doc_stride,
                                    max_query_len=max_query_len)
            starts, ends = [], []
            for rows in _batches(range(len(features)), batch_size):
                ids = features.input_ids[rows.start:rows.stop].to(dev)
                types = features.token_type_ids[rows.start:rows.stop].to(dev)
                with torch.inference_mode():
                    with dropless_routing(model):
                        out = model(ids, types, padding_mask=ids == pad)
                starts.append(out.start_logits.float().cpu())
                ends.append(out.end_logits.float().cpu())
            start, end = torch.cat(starts), torch.cat(ends)
            check_finite_scores(pretrained, start, end)
            answers = postprocess_squad(chunk, features, start, end, N_BEST, MAX_ANSWER_LEN,
                                        version_2=allow_no_answer, null_threshold=null_threshold)
            scores = _scores(chunk, features, start, end, allow_no_answer, null_threshold)
            for example, score in zip(chunk, scores):
                yield Answer(example.question, answers[example.id], score, example.context)
            bar.update(len(chunk))


def _no_answer_rule(pretrained: Pretrained, allow_no_answer: bool | None,
                    null_threshold: float | None) -> tuple[bool, float]:
    """Whether an answer may be "" and the margin no-answer must win by: by default as the model's
    fine-tuning evaluated it (SQuAD 2.0 validation data: allowed, with its null threshold), unless its
    training data held no unanswerable question (SQuAD 1.1: its no-answer score never trained; then a
    threshold given is refused); a threshold given allows it."""
    saved = pretrained.inputs or {}
    trained = saved.get("trained_no_answer")  # None: not known (recorded before; other folders)
    if allow_no_answer is None:  # as its evaluation did; unknown (a Hugging Face folder, an older export): no
        allow_no_answer = null_threshold is not None or (bool(saved.get("no_answer")) and trained is not False)
    if allow_no_answer and trained is False:
        raise PredictError(f"{pretrained.source} was fine-tuned on SQuAD 1.1 data, without unanswerable "
                           "questions: its no-answer score was never trained, so it cannot answer nothing "
                           "(leave out the null threshold)")
    return allow_no_answer, saved.get("null_threshold", 0.0) if null_threshold is None else null_threshold


def _positive_or(value: int | None, name: str, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _check_questions_fit(pretrained: Pretrained, examples: list[SquadExample], length: int,
                         max_query_len: int) -> None:
    """Raise PredictError naming the first question that, cut to max_query_len tokens, leaves no room
    in a window of `length` tokens for [CLS], two [SEP] and one context token; a note for questions
    cut (as fine-tuning cut them)."""
    questions = pretrained.tokenizer.encode_batch([ex.question for ex in examples], add_special_tokens=False)
    for number, encoded in enumerate(questions, start=1):
        tokens = min(len(encoded.ids), max_query_len)
        if tokens + 4 > length:
            limit = pretrained.model.cfg.max_positions
            room = (f"raise max_len to {tokens + 4} or more" if tokens + 4 <= limit else
                    f"the model holds {limit} positions: shorten the question")
            raise PredictError(f"question {number} takes {tokens} tokens, which leaves no room for the context "
                               f"in max_len {length} ([CLS] question [SEP] context [SEP]); {room}")
    cut = sum(len(encoded.ids) > max_query_len for encoded in questions)
    if cut:
        warnings.warn(f"{cut} of {len(examples)} questions were longer than {max_query_len} tokens (max_query_len) "
                      "and were cut to their first ones, as fine-tuning cut them", stacklevel=3)


def answer_questions(pretrained: Pretrained, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                     device: str | torch.device = "auto", max_len: int | None = None,
                     doc_stride: int | None = None, max_query_len: int | None = None,
                     allow_no_answer: bool | None = None, null_threshold: float | None = None,
                     progress: bool | None = None) -> list[Answer]:
    """The answer to each (question, context): the best span, as fine-tuning's evaluation picks it
    (encode_squad windows of max_len tokens, stride doc_stride, questions cut to max_query_len: by
    default as the model was fine-tuned, else 384, 128, 64; then postprocess_squad); "" when
    no-answer beats the best span by more than null_threshold. By default a model fine-tuned on
    SQuAD 2.0 data answers "" as its fine-tuning's evaluation did (its null threshold) and other
    models never do; a null_threshold given (or allow_no_answer=True) allows it, except for a model
    fine-tuned on SQuAD 1.1 data (refused: its no-answer score never trained)."""
    return list(iter_answer_questions(pretrained, pairs, batch_size, device, max_len, doc_stride, max_query_len,
                                      allow_no_answer, null_threshold, progress))

