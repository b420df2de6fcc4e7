"""Text corpora: reading formats, sentence splitting, the tokenized cache, SOP examples, masking, GCIDE."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import damage_in_place

from widenet.data.text.corpus import PretrainCorpus, load_pretrain_corpus
from widenet.data.text.documents import CorpusError, corpus_files, iter_documents
from widenet.data.text.gcide import GCIDE_PATH, GcideEntry, gcide_documents, read_gcide
from widenet.data.text.gcide_tasks import write_gcide_task
from widenet.data.text.pretraining import _truncation, make_sop_examples, mask_tokens
from widenet.data.text.sentences import split_sentences
from widenet.data.text.tokenizer import SpecialIds, TokenizerError, special_ids, train_tokenizer

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)

PROSE = [
    "The river rose slowly through the night and flooded the lower fields.",
    "By morning the farmers had moved their cattle to the hills.",
    "Dr. Hale, who kept the weather records, said it was the worst flood in forty years.",
    "Nobody in the village remembered water that high.",
    "The old mill, built in 1820, lost its wheel to the current.",
    "Children watched from the bridge as tree trunks drifted past.",
    "Some of them counted the logs; others threw stones into the brown water.",
    "At noon the rain stopped and a pale sun came out.",
    "The mayor called a meeting in the school hall.",
    "He asked every family to report damage to their houses and barns.",
    "Mrs. Ward offered her kitchen to anyone who needed a warm meal.",
    "Within an hour the room was full of wet coats and loud voices.",
    "The engineers from the county arrived late in the afternoon.",
    "They measured the height of the water against the church wall.",
    "One of them, a young woman named J. Carter, took photographs of every street.",
    "Her report later helped the village win money for a new embankment.",
    "The embankment took three summers to build.",
    "Stone was carried by cart from a quarry ten miles away.",
    "When it was finished, the whole village walked along its top.",
    "Since then the river has risen many times, but never into the fields.",
]


def _prose_documents(count: int, sentences: int, seed: int = 0) -> list[str]:
    """``count`` realistic documents of ``sentences`` shuffled prose sentences, wrapped at ~70 columns."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        text = " ".join(rng.choice(PROSE) for _ in range(sentences))
        words, lines, line = text.split(), [], ""
        for word in words:
            if len(line) + len(word) > 70:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        docs.append("\n".join(lines + [line]))
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(PROSE * 3, vocab_size=200, min_frequency=1)


def _write(path: Path, data: str) -> Path:
    """`data` into `path`, gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _write_text(path: Path, docs: list[str]) -> Path:
    return _write(path, "\n\n".join(docs) + "\n")


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    return _write(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz", "a.gz"])
def test_text_files_split_on_blank_lines(tmp_path, name):
    path = _write_text(tmp_path / name, ["First doc.\nstill first.", "Second doc.", "  \nThird doc."])
    assert list(iter_documents([path])) == ["First doc.\nstill first.", "Second doc.", "Third doc."]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_jsonl_files(tmp_path, name):
    path = _write_jsonl(
        tmp_path / name, [json.dumps({"text": "One. Two."}), "", json.dumps({"text": "Three", "id": 3})]
    )
    assert list(iter_documents(path)) == ["One. Two.", "Three"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "{not json"])
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents([path]))
    path = _write_jsonl(tmp_path / "bad2.jsonl", [json.dumps({"body": "no text field"})])
    with pytest.raises(CorpusError, match=r'bad2\.jsonl:1: expected a JSON object with a string "text" field'):
        list(iter_documents([path]))


def test_folder_recursion_sorted_and_filtered(tmp_path):
    _write_text(tmp_path / "b" / "z.txt", ["from b/z"])
    _write_text(tmp_path / "a.txt", ["from a"])
    _write_jsonl(tmp_path / "b" / "c" / "y.jsonl", [json.dumps({"text": "from b/c/y"})])
    (tmp_path / "notes.md").write_text("not a corpus file", encoding="utf-8")
    _write_text(tmp_path / ".hidden" / "h.txt", ["hidden"])
    with pytest.warns(UserWarning) as caught:  # the notes.md is named (it was skipped without a word), not .hidden
        assert [p.relative_to(tmp_path).as_posix() for p in corpus_files([tmp_path])] == [
            "a.txt", "b/c/y.jsonl", "b/z.txt"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path}: skipped 1 non-corpus file (corpus files: *.txt, *.txt.gz, *.gz, *.jsonl, *.jsonl.gz, "
        f"*.dict.dz), e.g. {tmp_path / 'notes.md'}"]
    with pytest.warns(UserWarning, match="skipped 1 non-corpus file "):
        assert list(iter_documents([tmp_path])) == ["from a", "from b/c/y", "from b/z"]


def test_a_file_named_twice_is_read_once(tmp_path):
    """The same file twice, or a folder and a file inside it, used to double its documents (and
    could put a copy of a held-out document in training)."""
    _write_text(tmp_path / "a.txt", ["from a"])
    _write_text(tmp_path / "b" / "z.txt", ["from b/z"])
    with pytest.warns(UserWarning) as caught:
        files = corpus_files([tmp_path / "a.txt", tmp_path, tmp_path / "b" / ".." / "a.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.txt", "b/z.txt"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'a.txt'} is in the corpus more than once; it is read once",
        f"{tmp_path / 'b' / '..' / 'a.txt'} is in the corpus more than once (also as {tmp_path / 'a.txt'}); "
        "it is read once"]
    with pytest.warns(UserWarning):
        assert list(iter_documents([tmp_path, tmp_path / "b"])) == ["from a", "from b/z"]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="corpus path not found"):
        list(iter_documents([tmp_path / "missing.txt"]))
    with pytest.raises(CorpusError, match="/dev/null: not a regular file or a folder"):  # it was "not found"
        list(iter_documents(["/dev/null"]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"folder has no corpus files \(looked for \*\.txt"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(CorpusError, match="unsupported corpus file type"):
        list(iter_documents([tmp_path / "data.csv"]))


def test_empty_corpus_and_bad_encoding(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no text found in the corpus"):
        list(iter_documents([blank]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("first line\n\n" * 40000 + "un caf\xe9 au lait\n").encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt: not UTF-8 text \(invalid continuation byte on line 80001, "
                                         r"byte 7 of the line\)$"):  # was "at byte 190 of a chunk"
        list(iter_documents([latin]))
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CorpusError, match=r"broken\.txt\.gz: cannot read file"):
        list(iter_documents([broken]))


# --------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------


def test_split_sentences_basic():
    text = 'It rained.  Then it stopped! Did it? "Yes," she said. 3 people came. (And left.)'
    assert split_sentences(text) == [
        "It rained.",
        "Then it stopped!",
        "Did it?",
        '"Yes," she said.',
        "3 people came.",
        "(And left.)",
    ]


def test_split_sentences_abbreviations_and_initials():
    text = (
        "Mr. Smith met Dr. Jones on St. Mary street, e.g. near the bank. "
        "J. R. Tolkien wrote, i.e. often. The U.S. Army came."
    )
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones on St. Mary street, e.g. near the bank.",
        "J. R. Tolkien wrote, i.e. often.",
        "The U.S. Army came.",
    ]


def test_split_sentences_newlines_and_whitespace():
    text = (
        "A first line that ends a sentence.\nlowercase start, new sentence\n"
        "  wrapped here. and no split mid-line.\n\n  "
    )
    assert split_sentences(text) == [
        "A first line that ends a sentence.",
        "lowercase start, new sentence wrapped here. and no split mid-line.",
    ]
    assert split_sentences("   \n ") == []
    assert split_sentences("no terminal punctuation") == ["no terminal punctuation"]


# --------------------------------------------------------------------------
# The tokenized corpus and its cache
# --------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a tokenizer and counts batch-encoding calls (either method) of the corpus's text (not
    those of the tokenizer's pipeline fingerprint, which encodes a few fixed texts)."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = 0

    def _count(self, texts) -> None:
        from widenet.data.text.tokenizer import _PIPELINE_PROBES

        self.calls += list(texts) != list(_PIPELINE_PROBES)

    def encode_batch(self, texts, *args, **kwargs):
        self._count(texts)
        return self.tok.encode_batch(texts, *args, **kwargs)

    def encode_batch_fast(self, texts, *args, **kwargs):
        self._count(texts)
        return self.tok.encode_batch_fast(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_corpus_layout(tmp_path, tok):
    path = _write_text(tmp_path / "c.txt", ["The river rose. The mill lost its wheel.", "Nobody remembered."])
    corpus = load_pretrain_corpus([path], tok, cache_dir=None)
    assert (corpus.num_documents, corpus.num_sentences) == (2, 3)
    assert corpus.tokens.dtype == torch.int32 and corpus.sentence_offsets.dtype == torch.int64
    assert corpus.document_offsets.tolist() == [0, 2, 3]
    first = corpus.tokens[corpus.sentence_offsets[0] : corpus.sentence_offsets[1]].tolist()
    assert first == tok.encode("The river rose.", add_special_tokens=False).ids
    assert corpus.num_tokens == int(corpus.sentence_offsets[-1])
    assert int(corpus.tokens.min()) >= 5  # no special tokens


def test_a_tokenizer_that_does_not_cover_the_corpus_is_refused(tmp_path, tok):
    """A tokenizer of another script turned ~90% of a corpus into [UNK], and pretraining went on."""
    greek = _write_text(tmp_path / "greek.txt", ["Ο ποταμός πλημμύρισε. Ο μύλος έχασε τον τροχό του.", "Κανείς δεν θυμόταν."])
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # built, then cached, then read from the cache
        with pytest.raises(TokenizerError, match=r"^\d+% of the corpus's word pieces are \[UNK\]: the tokenizer does "
                                              r"not cover this text"):
            load_pretrain_corpus([greek], tok, cache_dir=cache)
    mixed = _write_text(tmp_path / "mixed.txt", _prose_documents(1, 10) + ["Κανείς δεν θυμόταν τον μύλο. " * 4])
    unk = special_ids(tok).unk
    with pytest.warns(UserWarning, match=r"of the corpus's word pieces are \[UNK\]; the tokenizer") as caught:
        corpus = load_pretrain_corpus([mixed], tok)
    share = float((corpus.tokens == unk).double().mean())  # the share the note names, counted here
    assert 0.05 < share <= 0.5 and str(caught[0].message).startswith(f"{share:.0%} ")


def test_cache_hit_does_not_tokenize_again(tmp_path, tok):
    path = _write_text(tmp_path / "c.txt", _prose_documents(3, 10))
    counting = CountingTokenizer(tok)
    first = load_pretrain_corpus([path], counting, cache_dir=tmp_path / "cache", chunk_sentences=7)
    calls = counting.calls
    assert calls > 1  # chunked
    (cache_file,) = (tmp_path / "cache").glob("corpus-*.pt")
    again = load_pretrain_corpus([str(path)], counting, cache_dir=tmp_path / "cache")
    assert counting.calls == calls
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.document_offsets, first.document_offsets)
    assert again.vocab_fingerprint == first.vocab_fingerprint
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_file.name]  # nothing half-written
    # another vocabulary (same file, same everything else) misses it: its own ids, its own cache file
    other = CountingTokenizer(train_tokenizer(PROSE[:2], vocab_size=60, min_frequency=1))
    theirs = load_pretrain_corpus([path], other, cache_dir=tmp_path / "cache")
    assert other.calls > 0 and not torch.equal(theirs.tokens, first.tokens)
    assert len(list((tmp_path / "cache").glob("corpus-*.pt"))) == 2
    # changing the file invalidates the cache
    _write_text(path, _prose_documents(2, 10, seed=1))
    os.utime(path, ns=(1, 1))
    load_pretrain_corpus([path], counting, cache_dir=tmp_path / "cache")
    assert counting.calls > calls


def test_the_cache_folder_keeps_the_most_recently_used_corpus_caches(tmp_path, tok):
    """Each new tokenizer (every `pretrain` without --tokenizer trains one) added a cache of the whole
    tokenized corpus (~30 MB for GCIDE) that nothing ever removed."""
    from widenet.data.text.corpus import CORPUS_CACHES_KEPT

    cache = tmp_path / "cache"
    cache.mkdir()
    old = [cache / f"corpus-{i:064x}.pt" for i in range(CORPUS_CACHES_KEPT + 1)]  # oldest first
    for age, path in enumerate(reversed(old), start=1):
        path.write_bytes(b"an earlier corpus")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    theirs = [cache / "corpus-notes.pt", cache / "other.pt", cache / f".corpus-{0:064x}.pt.x.tmp"]
    for path in theirs:
        path.write_bytes(b"not a corpus cache")
        os.utime(path, (1, 1))
    path = _write_text(tmp_path / "c.txt", _prose_documents(3, 10))
    used = load_pretrain_corpus([path], tok, cache_dir=cache)
    (new,) = set(cache.glob("corpus-*.pt")) - set(old) - set(theirs)
    assert sorted(p for p in old if p.exists()) == old[-(CORPUS_CACHES_KEPT - 1):]  # the newest 7 and this one
    assert all(p.exists() for p in theirs)
    # a hit marks its file used: written first, then eight other tokenizers' corpora, it stays
    os.utime(new, (2_000_000, 2_000_000))
    for vocab in range(CORPUS_CACHES_KEPT - 1):
        other = train_tokenizer(PROSE[: 2 + vocab % 3], vocab_size=60 + vocab, min_frequency=1)
        load_pretrain_corpus([path], other, cache_dir=cache)
        if vocab == 2:
            counting = CountingTokenizer(tok)
            assert torch.equal(load_pretrain_corpus([path], counting, cache_dir=cache).tokens, used.tokens)
            assert counting.calls == 0 and new.stat().st_mtime > 2_000_000
    assert new.exists() and len(list(cache.glob("corpus-*.pt"))) == CORPUS_CACHES_KEPT + 1  # + corpus-notes.pt
    load_pretrain_corpus([path], train_tokenizer(PROSE[:1], vocab_size=50, min_frequency=1), cache_dir=cache)
    assert new.exists() and not any(p.exists() for p in old)


def test_a_file_swapped_for_one_of_the_same_size_and_date_is_read_again(tmp_path, tok):
    """Keyed by size and mtime only, two files of one size and date swapped under their names (an
    archive packed with fixed times, `cp -p`, `touch -r`) served the other file's tokens."""
    docs = _prose_documents(4, 10)
    a = _write_text(tmp_path / "a.txt", docs)
    b = _write_text(tmp_path / "b.txt", list(reversed(docs)))
    assert a.stat().st_size == b.stat().st_size
    for path in (a, b):
        os.utime(path, ns=(1, 1))
    first = load_pretrain_corpus([a], tok, cache_dir=tmp_path / "cache")
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (b.stat().st_size, 1)
    counting = CountingTokenizer(tok)
    again = load_pretrain_corpus([a], counting, cache_dir=tmp_path / "cache")
    assert counting.calls > 0 and not torch.equal(again.tokens, first.tokens)


def test_max_documents_keeps_the_first_documents_and_has_its_own_cache_entry(tmp_path, tok):
    """max_documents=1 reads the first document only (its tokens are those of that document read on
    its own); the same call without the limit, into the same cache, gets all three documents, not the
    limited corpus cached just before; each limit has its own cache file, and each is hit again."""
    docs = _prose_documents(3, 4)
    path = _write_text(tmp_path / "c.txt", docs)
    alone = load_pretrain_corpus([_write_text(tmp_path / "first.txt", docs[:1])], tok, cache_dir=None)
    cache = tmp_path / "cache"
    one = load_pretrain_corpus([path], tok, cache_dir=cache, max_documents=1)
    assert one.num_documents == 1
    assert torch.equal(one.tokens, alone.tokens) and torch.equal(one.sentence_offsets, alone.sentence_offsets)
    everything = load_pretrain_corpus([path], tok, cache_dir=cache, max_documents=None)
    assert everything.num_documents == 3 and everything.num_tokens > one.num_tokens
    assert len(list(cache.glob("corpus-*.pt"))) == 2
    counting = CountingTokenizer(tok)
    again_one = load_pretrain_corpus([path], counting, cache_dir=cache, max_documents=1)
    again_all = load_pretrain_corpus([path], counting, cache_dir=cache)
    assert counting.calls == 0  # both from the cache
    assert again_one.num_documents == 1 and torch.equal(again_one.tokens, one.tokens)
    assert again_all.num_documents == 3 and torch.equal(again_all.tokens, everything.tokens)


def test_corrupt_cache_is_rebuilt(tmp_path, tok):
    path = _write_text(tmp_path / "c.txt", _prose_documents(2, 5))
    first = load_pretrain_corpus([path], tok, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("corpus-*.pt")
    cache_file.write_bytes(b"this is not a torch file")
    counting = CountingTokenizer(tok)
    with pytest.warns(UserWarning, match="ignoring unreadable corpus cache"):
        rebuilt = load_pretrain_corpus([path], counting, cache_dir=tmp_path)
    assert counting.calls > 0 and torch.equal(rebuilt.tokens, first.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrain_corpus([path], counting, cache_dir=tmp_path)  # valid again, no warning
    damage_in_place(cache_file, first.tokens.numpy().tobytes())  # same size, loads: was trained on as it was
    with pytest.warns(UserWarning, match=r"corpus cache .* \(its tensors do not match the checksum saved with them"):
        again = load_pretrain_corpus([path], tok, cache_dir=tmp_path)
    assert torch.equal(again.tokens, first.tokens)


# --------------------------------------------------------------------------
# Sentence-order examples
# --------------------------------------------------------------------------


def _corpus(documents: list[list[list[int]]]) -> PretrainCorpus:
    """A PretrainCorpus from documents given as lists of sentences of token ids."""
    tokens, sentence_offsets, document_offsets = [], [0], [0]
    for doc in documents:
        for sentence in doc:
            tokens.extend(sentence)
            sentence_offsets.append(len(tokens))
        document_offsets.append(len(sentence_offsets) - 1)
    return PretrainCorpus(
        torch.tensor(tokens, dtype=torch.int32),
        torch.tensor(sentence_offsets, dtype=torch.int64),
        torch.tensor(document_offsets, dtype=torch.int64),
        "test",
    )


def _check_layout(examples, seq_len: int) -> None:
    for ids, types in zip(examples.input_ids.tolist(), examples.token_type_ids.tolist()):
        assert len(ids) == seq_len and ids[0] == SPECIAL.cls
        seps = [i for i, t in enumerate(ids) if t == SPECIAL.sep]
        assert len(seps) == 2 and 1 < seps[0] < seps[1] - 1  # both segments non-empty
        assert all(t == SPECIAL.pad for t in ids[seps[1] + 1 :])
        assert SPECIAL.pad not in ids[: seps[1]]
        assert types == [0] * (seps[0] + 1) + [1] * (seps[1] - seps[0]) + [0] * (seq_len - seps[1] - 1)


def test_swapped_example_is_original_segments_reversed():
    corpus = _corpus([[[10, 11, 12], [20, 21]]])
    seen = set()
    for seed in range(30):
        ex = make_sop_examples(corpus, seq_len=12, seed=seed, special=SPECIAL, short_seq_prob=0.0)
        assert len(ex) == 1
        label = int(ex.sop_labels[0])
        seen.add(label)
        expected = [2, 20, 21, 3, 10, 11, 12, 3] if label == 1 else [2, 10, 11, 12, 3, 20, 21, 3]
        assert ex.input_ids[0].tolist() == expected + [0] * 4
        types = [0, 0, 0, 0, 1, 1, 1, 1] if label == 1 else [0, 0, 0, 0, 0, 1, 1, 1]
        assert ex.token_type_ids[0].tolist() == types + [0] * 4
    assert seen == {0, 1}


def test_one_sentence_documents_split_at_a_token_and_tiny_docs_skipped():
    corpus = _corpus([[[10, 11, 12, 13]], [[30]], [[40, 41]]])
    ex = make_sop_examples(corpus, seq_len=10, seed=0, special=SPECIAL, short_seq_prob=0.0)
    assert len(ex) == 2  # the one-token document is skipped
    _check_layout(ex, 10)
    for ids, label in zip(ex.input_ids.tolist(), ex.sop_labels.tolist()):
        body = [t for t in ids if t > 4]
        sep = ids.index(3)
        first, second = ids[1:sep], [t for t in ids[sep + 1 :] if t > 4]
        assert sorted(body) in ([10, 11, 12, 13], [40, 41])
        assert (second + first if label else first + second) == sorted(body)
    with pytest.raises(CorpusError, match="no sentence-order example"):
        make_sop_examples(_corpus([[[30]], [[31]]]), seq_len=10, seed=0, special=SPECIAL)


def test_long_sentences_are_truncated_to_fit():
    """Every token is its position in the corpus (5, 6, 7, ...): each segment kept must be a run of
    consecutive tokens of one document (truncation trims ends, never the middle), and the two
    segments of an example sit next to each other in the text (swapped when the label says so)."""
    rng = random.Random(0)
    counter = itertools.count(5)
    docs = [[[next(counter) for _ in range(rng.randrange(1, 60))] for _ in range(6)] for _ in range(20)]
    ex = make_sop_examples(_corpus(docs), seq_len=24, seed=3, special=SPECIAL)
    _check_layout(ex, 24)
    document_of = {t: d for d, doc in enumerate(docs) for sentence in doc for t in sentence}
    for ids, label in zip(ex.input_ids.tolist(), ex.sop_labels.tolist()):
        first_sep = ids.index(SPECIAL.sep)
        a, b = ids[1:first_sep], ids[first_sep + 1 : ids.index(SPECIAL.sep, first_sep + 1)]
        for segment in (a, b):
            assert segment == list(range(segment[0], segment[0] + len(segment))), segment
        earlier, later = (b, a) if label == 1 else (a, b)
        assert earlier[-1] < later[0] and document_of[earlier[0]] == document_of[later[-1]]


def test_a_sentence_longer_than_a_sequence_is_used_whole_in_pieces():
    """Text without sentence punctuation is one long sentence: it is cut into sequence-sized pieces,
    not trimmed to a single sequence (which used 9 of these 99 tokens)."""
    long_sentence = list(range(5, 104))  # 99 distinct tokens; seq_len 12 leaves 9 per pair
    corpus = _corpus([[long_sentence], [[200, 201, 202], [203, 204]]])
    ex = make_sop_examples(corpus, seq_len=12, seed=0, special=SPECIAL, short_seq_prob=0.0)
    _check_layout(ex, 12)
    used = sorted(t for t in ex.input_ids.flatten().tolist() if t > 4)
    assert used == long_sentence + [200, 201, 202, 203, 204]  # every token once, the next document intact
    assert len(ex) == 12


def test_truncation_matches_the_reference_loop():
    for len_a, len_b, max_total in itertools.product(range(1, 12), range(1, 12), range(2, 14)):
        a, b = len_a, len_b
        while a + b > max_total:
            if a > b:
                a -= 1
            else:
                b -= 1
        assert _truncation(len_a, len_b, max_total) == (len_a - a, len_b - b)


def test_sop_on_realistic_text(tmp_path, tok):
    path = _write_text(tmp_path / "prose.txt", _prose_documents(12, 40))
    corpus = load_pretrain_corpus([path], tok, cache_dir=None)
    special = special_ids(tok)
    ex = make_sop_examples(corpus, seq_len=64, seed=0, special=special)
    assert special == SPECIAL
    _check_layout(ex, 64)
    assert ex.input_ids.dtype == torch.int64 and ex.sop_labels.shape == (len(ex),)
    assert 0.3 < ex.sop_labels.float().mean() < 0.7
    assert ex.fill_ratio(special.pad) > 0.85  # packed close to the maximum length
    again = make_sop_examples(corpus, seq_len=64, seed=0, special=special)
    other = make_sop_examples(corpus, seq_len=64, seed=1, special=special)
    assert torch.equal(again.input_ids, ex.input_ids) and torch.equal(again.sop_labels, ex.sop_labels)
    assert not torch.equal(other.input_ids[: min(len(ex), len(other))], ex.input_ids[: min(len(ex), len(other))])


# --------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------


def _batch(rows: int = 256, length: int = 128, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    ids[:, 0] = SPECIAL.cls
    ids[:, 50] = SPECIAL.sep
    lengths = torch.randint(60, length + 1, (rows,), generator=g)
    for row, end in enumerate(lengths.tolist()):
        ids[row, end - 1] = SPECIAL.sep
        ids[row, end:] = SPECIAL.pad
    return ids


def test_mask_proportions_and_specials():
    ids = _batch()
    masked, labels = mask_tokens(ids, SPECIAL, vocab_size=1000, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    regular = ids > 4
    assert not (chosen & ~regular).any()  # never [CLS]/[SEP]/[PAD]
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    expected = (regular.sum(1).double() * 0.15).round()
    assert torch.equal(chosen.sum(1).double(), expected)
    n = int(chosen.sum())
    to_mask = (masked == SPECIAL.mask) & chosen
    kept = (masked == ids) & chosen
    replaced = chosen & ~to_mask & ~kept
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.03
    assert abs(int(replaced.sum()) / n - 0.1) < 0.03
    assert abs(int(kept.sum()) / n - 0.1) < 0.03
    assert int(masked[replaced].min()) >= 5 and int(masked[replaced].max()) < 1000


def test_mask_at_least_one_and_none_for_empty_rows():
    ids = torch.tensor([[2, 7, 3, 0, 0], [2, 3, 0, 0, 0]])
    _, labels = mask_tokens(ids, SPECIAL, vocab_size=10, generator=torch.Generator().manual_seed(1))
    assert labels[0].tolist() == [-100, 7, -100, -100, -100]
    assert labels[1].tolist() == [-100] * 5


def test_mask_deterministic_and_leaves_global_rng_alone():
    ids = _batch(rows=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mask_tokens(ids, SPECIAL, 1000, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, SPECIAL, 1000, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, SPECIAL, 1000, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_unk_and_mask_ids_in_the_input_are_never_chosen():
    """The docstring: never a special token. [UNK] and [MASK] already in the input (as well as
    [CLS], [SEP] and [PAD]) keep their ids and get no label, even when nearly every regular piece is
    chosen; the regular pieces alone are counted."""
    unk, mask = SPECIAL.unk, SPECIAL.mask
    row = [SPECIAL.cls, 7, unk, 8, mask, 9, unk, SPECIAL.sep, 10, mask, SPECIAL.sep, SPECIAL.pad, SPECIAL.pad]
    ids = torch.tensor([row] * 64)
    special_positions = torch.tensor([i not in (1, 3, 5, 8) for i in range(len(row))])
    for seed in range(20):
        masked, labels = mask_tokens(ids, SPECIAL, vocab_size=12, generator=torch.Generator().manual_seed(seed),
                                     mask_prob=0.99)
        assert (labels[:, special_positions] == -100).all(), seed
        assert torch.equal(masked[:, special_positions], ids[:, special_positions]), seed
        # round(0.99 * 4) = 4: every regular piece is chosen, labelled with its own id
        assert torch.equal(labels[:, ~special_positions], ids[:, ~special_positions]), seed


def test_random_replacements_skip_scattered_special_ids():
    bert = SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103)
    ids = torch.randint(1, 99, (64, 64), generator=torch.Generator().manual_seed(0))
    masked, labels = mask_tokens(ids, bert, vocab_size=110, generator=torch.Generator().manual_seed(0), mask_prob=0.5)
    replaced = (labels != -100) & (masked != ids) & (masked != bert.mask)
    assert replaced.any()
    assert not torch.isin(masked[replaced], torch.tensor([0, 100, 101, 102, 103])).any()


# --------------------------------------------------------------------------
# GCIDE
# --------------------------------------------------------------------------

GCIDE_HEADER = """
00-database-url
   ftp://ftp.gnu.org/gnu/gcide

00-database-info
   This file was converted from the original database on:
The original data was distributed with the notice shown below.
GCIDE is free software; you can redistribute it.

"""

GCIDE_ENTRIES = """Arrogant \\Ar"ro*gant\\, a. [F. arrogant, L. arrogans, p. pr. of
   arrogare. See {Arrogate}.]
   1. Making, or having the disposition to make, exorbitant
      claims of rank or estimation; haughty.
      [1913 Webster]

            Arrogant Winchester, that haughty prelate. --Shak.
      [1913 Webster]

   2. Containing arrogance; marked with arrogance.
      [1913 Webster]

   Syn: Magisterial; lordly; proud. See {Magisterial}.
        [1913 Webster]

Arrogantly \\Ar"ro*gant*ly\\, adv.
   In an arrogant manner; with undue pride. --Shak.
   [1913 Webster]

Arrow \\Ar"row\\, n. [OE. arewe, AS. arewe.]
   A missile weapon, pointed and feathered, to be shot from a bow.
   [1913 Webster]

Arrow \\Ar"row\\, v. t.
   To shoot an arrow at a mark or target.
   [Webster 1913 Suppl.]

Arrogate \\Ar"ro*gate\\, v. t. [imp. & p. p. {Arrogated}.]
   To assume, or claim as one's own, unduly; as, the pope arrogated
   dominion over kings.
   [1913 Webster]

Laundry \\Laun"dry\\, n.; pl. {Laundries}. [OE. lavendrie.]
   A place or room where laundering is done.
   [1913 Webster]

Abox \\A*box"\\, adv. & a. (Naut.)
   Braced aback.
   [1913 Webster]

Unfavorable \\Un*fa"vor*a*ble\\, a.
   Not favorable; adverse. -- {Un*fa"vor*a*ble*ness}, n. --
   {Un*fa"vor*a*bly}, adv.
   [1913 Webster]

aerobic \\a`["e]r*o"bic\\ adj.
   1. (Biol.) Depending on free oxygen or air; as, aerobic bacteria.
      [WordNet 1.5 +PJC]
"""


def _write_gcide(path: Path, entries: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(GCIDE_HEADER + entries)
    return path


def test_read_gcide_entries(tmp_path):
    entries = list(read_gcide(_write_gcide(tmp_path / "gcide.dict.dz", GCIDE_ENTRIES)))
    assert [(e.headword, e.pos) for e in entries] == [
        ("Arrogant", "adjective"),
        ("Arrogantly", "adverb"),
        ("Arrow", "noun"),
        ("Arrow", "verb"),
        ("Arrogate", "verb"),
        ("Laundry", "noun"),
        ("Abox", None),
        ("Unfavorable", "adjective"),
        ("aerobic", "adjective"),
    ]
    first = entries[0].text
    assert first.startswith("Making, or having the disposition to make, exorbitant claims")
    assert "Syn: Magisterial; lordly; proud. See Magisterial." in first
    assert "[1913 Webster]" not in first and "{" not in first and "F. arrogant" not in first and "  " not in first
    assert entries[4].text.startswith("To assume, or claim")  # inflections and etymology dropped
    assert entries[5].text == "A place or room where laundering is done."
    assert entries[7].text == "Not favorable; adverse. -- Unfavorableness, n. -- Unfavorably, adv."  # stress marks gone
    assert entries[8].text == "Depending on free oxygen or air; as, aerobic bacteria."
    # the subject field of the first sense: on the header line or opening it; "(Biol.)" is not a task label
    assert [e.field for e in entries] == [None] * 6 + ["nautical", None, None]


def test_gcide_documents_and_iter_documents(tmp_path):
    path = _write_gcide(tmp_path / "words.dict.dz", GCIDE_ENTRIES)
    singles = list(gcide_documents(path, entries_per_document=1))
    assert singles[1] == "Arrogantly: In an arrogant manner; with undue pride. --Shak."
    pairs = list(gcide_documents(path, entries_per_document=2))
    assert pairs[0] == singles[0] + " " + singles[1]
    assert len(pairs) == (len(singles) + 1) // 2
    assert list(iter_documents([tmp_path])) == list(gcide_documents(path))


def _pos_entries(per_label: int) -> str:
    """Synthetic GCIDE entries: ``per_label`` headwords for each of the four labels."""
    kinds = {
        "n.": "A kind of thing numbered",
        "v. t.": "To do the act numbered",
        "a.": "Having the quality numbered",
        "adv.": "In the manner numbered",
    }
    lines = []
    for label, (abbrev, gloss) in enumerate(kinds.items()):
        count = per_label if abbrev != "adv." else per_label // 3  # fewer adverbs
        for index in range(count):
            word = f"Word{label}x{index}"
            lines.append(
                f"{word} \\{word}\\, {abbrev}\n   {gloss} k{label}x{index}, unlike {word.lower()}.\n   [1913 Webster]\n"
            )
    lines.append("Word0x0 \\Word0x0\\, v. t.\n   To do the other act of word0x0 k9.\n   [1913 Webster]\n")
    return "\n".join(lines)


def _read_tsv(path: Path) -> list[list[str]]:
    rows = path.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "sentence\tlabel"
    return [row.split("\t") for row in rows[1:]]


def _headword_id(sentence: str) -> str:
    """The headword id ("1x7") a synthetic definition sentence belongs to; k9 is Word0x0's verb sense."""
    if "k9" in sentence:
        return "0x0"
    match = re.search(r"k(\d)x(\d+)", sentence)
    assert match, sentence
    return f"{match[1]}x{match[2]}"


def test_write_pos_task(tmp_path):
    path = _write_gcide(tmp_path / "pos.dict.dz", _pos_entries(30))
    train_path, val_path = write_gcide_task(path, tmp_path / "task", "pos", train_size=60, validation_size=20, seed=0)
    train, val = _read_tsv(train_path), _read_tsv(val_path)
    assert all(len(row) == 2 for row in train + val)
    assert (len(train), len(val)) == (60, 20)
    counts = Counter(label for _, label in train + val)
    assert counts["adverb"] == 10  # all there are
    assert min(counts["noun"], counts["verb"], counts["adjective"]) >= 23  # the rest shared evenly
    assert set(Counter(label for _, label in val)) == {"noun", "verb", "adjective", "adverb"}
    for sentence, _ in train + val:
        assert sentence.endswith(("unlike _.", "_ k9."))  # headword hidden
        assert "word" not in sentence.lower()
    assert not {_headword_id(s) for s, _ in train} & {_headword_id(s) for s, _ in val}
    again = write_gcide_task(path, tmp_path / "task2", "pos", train_size=60, validation_size=20, seed=0)
    assert again[0].read_text() == train_path.read_text() and again[1].read_text() == val_path.read_text()
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["train.tsv", "validation.tsv"]


def test_write_field_task(tmp_path, cli):
    fields = {"Zool.": "An animal numbered", "Bot.": "A plant numbered", "Chem.": "A salt numbered"}
    lines = []
    for label, (mark, gloss) in enumerate(fields.items()):
        for index in range(12):
            word = f"Word{label}x{index}"
            sense = f"1. ({mark})" if index % 2 else f"({mark})"  # numbered sense or not
            lines.append(f"{word} \\{word}\\, n.\n   {sense} {gloss} k{label}x{index}, unlike {word.lower()}.\n")
    lines.append("Wordless \\Wordless\\, n.\n   (Biol.) A cell numbered k8x0.\n")  # not a task field
    lines.append("Wordy \\Wordy\\, n.\n   A word numbered k8x1; (Zool.) later.\n")  # field not on the first sense
    path = _write_gcide(tmp_path / "fields.dict.dz", "\n".join(lines))
    train_path, val_path = write_gcide_task(path, tmp_path / "task", "field", train_size=24, validation_size=9, seed=0)
    train, val = _read_tsv(train_path), _read_tsv(val_path)
    assert Counter(label for _, label in train) == {"zoology": 8, "botany": 8, "chemistry": 8}
    assert Counter(label for _, label in val) == {"zoology": 3, "botany": 3, "chemistry": 3}
    gloss = {"zoology": "An animal", "botany": "A plant", "chemistry": "A salt"}
    for sentence, label in train + val:
        assert sentence.startswith(gloss[label]) and sentence.endswith("unlike _.")  # no mark, headword hidden
    assert not {_headword_id(s) for s, _ in train} & {_headword_id(s) for s, _ in val}
    with pytest.raises(ValueError, match="unknown GCIDE task 'topic'; choose one of pos, field, usage"):
        write_gcide_task(path, tmp_path / "bad", "topic")
    rc, out, _ = cli(["gcide-task", "field", "--gcide", path, "--out", tmp_path / "cli", "--train-size", 24,
                      "--validation-size", 9])
    assert rc == 0 and "wrote" in out
    assert (tmp_path / "cli" / "train.tsv").read_text() == train_path.read_text()
    rc, _, err = cli(["gcide-task", "field", "--gcide", tmp_path / "missing.dict.dz", "--out", tmp_path / "x"])
    assert rc == 2 and "GCIDE file not found" in err and "Traceback" not in err


def test_write_usage_task(tmp_path):
    """usage: the first "as, ..." example that uses the headword, the headword hidden, labelled with the
    part of speech; entries without such an example give no row."""
    kinds = {"n.": ("A thing", "the {w} of a child"), "v. t.": ("To act", "to {w} a nuisance"),
             "a.": ("Having a quality", "an {w} force")}
    lines = []
    for label, (abbrev, (gloss, use)) in enumerate(kinds.items()):
        for index in range(8):
            word = f"Word{label}x{index}"
            example = use.format(w=word.lower()) + f" k{label}x{index}"
            lines.append(f"{word} \\{word}\\, {abbrev}\n   {gloss}; as, a red rose; as, {example}. --Shak.\n")
    lines.append("Bare \\Bare\\, a.\n   Naked; as, a red rose.\n")  # no example uses the headword
    lines.append("Bold \\Bold\\, a.\n   Daring; as, bold men.\n")  # one that says too little (2 words)
    lines.append("Calm \\Calm\\, a.\n   Still; as, the sea is calm.\n")
    path = _write_gcide(tmp_path / "usage.dict.dz", "\n".join(lines))
    train_path, val_path = write_gcide_task(path, tmp_path / "task", "usage", train_size=18, validation_size=7,
                                            seed=0)
    train, val = _read_tsv(train_path), _read_tsv(val_path)
    rows = dict(train + val)
    assert len(train) + len(val) == len(rows) == 25  # 24 examples and Calm's; not Bare's nor Bold's
    assert rows["the sea is _"] == "adjective"
    template = {"noun": "the _ of a child k0x", "verb": "to _ a nuisance k1x", "adjective": "an _ force k2x"}
    for sentence, label in rows.items():
        assert sentence == "the sea is _" or sentence.startswith(template[label])  # rose skipped, --Shak. cut
    assert Counter(rows.values()) == {"noun": 8, "verb": 8, "adjective": 9}
    assert not {_headword_id(s) for s, _ in train if "k" in s} & {_headword_id(s) for s, _ in val if "k" in s}


def test_a_sentence_that_reads_alike_for_several_headwords_is_one_row(tmp_path):
    """With the headword hidden, GCIDE's usage examples often read alike ("to _ the arm"): 9% of the
    usage task's validation rows were also training rows, word for word."""
    lines = []
    for label, (abbrev, use) in enumerate({"n.": "the _ of a vessel", "v. t.": "to _ the arm"}.items()):
        for index in range(12):
            word = f"Word{label}x{index}"
            example = use.replace("_", word.lower()) + (f" k{label}x{index}" if index >= 6 else "")
            lines.append(f"{word} \\{word}\\, {abbrev}\n   A gloss; as, {example}.\n")
    path = _write_gcide(tmp_path / "usage.dict.dz", "\n".join(lines))
    train_path, val_path = write_gcide_task(path, tmp_path / "task", "usage", train_size=10, validation_size=4,
                                            seed=0)
    train, val = _read_tsv(train_path), _read_tsv(val_path)
    sentences = [sentence for sentence, _ in train + val]
    assert len(sentences) == len(set(sentences)) == 14  # 6 + 6 distinct, and one of each alike set
    assert {"the _ of a vessel", "to _ the arm"} <= set(sentences)


def test_pos_rows_hide_headword_and_drop_attributions(tmp_path):
    path = _write_gcide(tmp_path / "small.dict.dz", GCIDE_ENTRIES)
    train_path, val_path = write_gcide_task(path, tmp_path, "pos", train_size=6, validation_size=2, seed=1)
    train, val = _read_tsv(train_path), _read_tsv(val_path)
    rows = {sentence: label for sentence, label in train + val}
    assert len(train) + len(val) == len(rows) == 8  # every labelled entry (Abox has no usable label)
    assert rows["Not favorable; adverse."] == "adjective"  # run-on derived forms ("-- Unfavorably, adv.") cut
    assert rows["To shoot an _ at a mark or target."] == "verb"
    assert rows["In an arrogant manner; with undue pride."] == "adverb"  # "--Shak." dropped
    assert all("--" not in sentence for sentence in rows)
    arrow_rows = {
        "To shoot an _ at a mark or target.",
        "A missile weapon, pointed and feathered, to be shot from a bow.",
    }
    assert arrow_rows <= {s for s, _ in train} or arrow_rows <= {s for s, _ in val}  # one headword, one split


@pytest.mark.skipif(not GCIDE_PATH.is_file(), reason="Debian dict-gcide is not installed")
def test_real_gcide_first_entries():
    entries: list[GcideEntry] = list(itertools.islice(read_gcide(GCIDE_PATH), 3000))
    assert len(entries) == 3000
    labels = {entry.pos for entry in entries}
    assert {"noun", "verb", "adjective", "adverb"} <= labels
    assert sum(entry.pos is not None for entry in entries) > 2500
    for entry in entries:
        assert entry.text and "[1913 Webster]" not in entry.text and "{" not in entry.text
        assert not entry.headword.startswith("00-database")
    by_word = {(e.headword, e.pos): e.text for e in entries}
    assert by_word[("Abandon", "verb")].startswith("To cast or drive out")  # inflections and etymology dropped
    assert by_word[("Abbey", "noun")].startswith("A monastery or society of persons")
    assert ("Abnormally", "adverb") in by_word and ("Able", "adjective") in by_word
