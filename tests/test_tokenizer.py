"""WordPiece tokenizers: training, special ids, pairs, save/load, vocab.txt, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from widenet.data.text.tokenizer import (
    SPECIAL_TOKENS,
    SpecialIds,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
    vocab_fingerprint,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A dictionary lists words with their meanings and pronunciations.",
    "Arrogant people make exorbitant claims of rank or estimation.",
    "The arrow was feathered and barbed, to be shot from a bow.",
    "Wider networks share one transformer block across all layers.",
    "Mixture of experts layers route every token to a few experts.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=200, min_frequency=1)


def _write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


BERT_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "play", "##ing", ",", "."]


def test_trained_special_ids_are_0_to_4(tok):
    assert special_ids(tok) == SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert 5 < tok.get_vocab_size() <= 200


def test_training_gives_one_vocabulary_in_every_process():
    """Hugging Face's trainer breaks ties between equally frequent merges by numbers it gives the
    continuation pieces in a per-process hash order: the same corpus gave other vocabularies in
    other processes (this corpus: a different one in most of three)."""
    script = ("import json, sys; from widenet.data.text.tokenizer import train_tokenizer; "
              "texts = json.loads(sys.stdin.read()); "
              "print(json.dumps(sorted(train_tokenizer(texts, vocab_size=200, min_frequency=1).get_vocab().items())))")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(3)]
    vocabularies = [run.communicate(json.dumps(TEXTS), timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
    here = train_tokenizer(TEXTS, vocab_size=200, min_frequency=1).get_vocab()
    assert dict(json.loads(vocabularies[0])) == here


def test_training_reads_a_one_shot_iterator_for_both_passes(tok):
    """Training reads its texts twice (the continuation pieces first); a generator is kept as a
    list, so its texts reach the second pass too."""
    from_generator = train_tokenizer((text for text in TEXTS), vocab_size=200, min_frequency=1)
    assert from_generator.get_vocab() == tok.get_vocab()
    assert len(tok.get_vocab()) == 200


def test_the_continuation_pieces_are_ordinary_pieces(tok):
    """The second pass gets the continuation pieces as special tokens; they must not stay special
    (a special "##e" would be cut out of any text holding it and dropped by decoding)."""
    assert [t.content for t in tok.get_added_tokens_decoder().values()] == list(SPECIAL_TOKENS)
    assert "##e" in tok.get_vocab()
    assert tok.encode("a##e", add_special_tokens=False).tokens == ["a", "[UNK]", "[UNK]", "e"]  # no '#' in TEXTS
    assert tok.decode(tok.encode("jumps", add_special_tokens=False).ids) == "jumps"


def test_special_ids_also_without_lowercasing():
    cased = train_tokenizer(TEXTS, vocab_size=150, lowercase=False, min_frequency=1)
    assert special_ids(cased).as_tuple() == (0, 1, 2, 3, 4)
    assert "The" in cased.encode("The", add_special_tokens=False).tokens


def test_single_and_pair_templates(tok):
    single = tok.encode("the quick fox")
    assert single.tokens[0] == "[CLS]" and single.tokens[-1] == "[SEP]"
    assert set(single.type_ids) == {0}
    pair = tok.encode("the quick fox", "the lazy dog")
    first_sep = pair.tokens.index("[SEP]")
    assert pair.tokens[0] == "[CLS]" and pair.tokens[-1] == "[SEP]"
    assert pair.type_ids[: first_sep + 1] == [0] * (first_sep + 1)
    assert pair.type_ids[first_sep + 1 :] == [1] * (len(pair.tokens) - first_sep - 1)
    bare = tok.encode("the quick fox", add_special_tokens=False)
    assert not set(bare.tokens) & set(SPECIAL_TOKENS)
    assert bare.ids == single.ids[1:-1]


def test_lowercase_and_decode(tok):
    assert tok.encode("THE Quick").ids == tok.encode("the quick").ids
    assert tok.decode(tok.encode("the quick fox").ids) == "the quick fox"


def test_save_load_round_trip(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "sub" / "tok.json")
    loaded = load_tokenizer(path)
    assert vocab_fingerprint(loaded) == vocab_fingerprint(tok)
    assert loaded.encode("arrows and experts", "a lazy dog").ids == tok.encode("arrows and experts", "a lazy dog").ids
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left behind


def test_save_into_folder_and_load_folder(tok, tmp_path):
    assert save_tokenizer(tok, tmp_path) == tmp_path / "tokenizer.json"
    assert vocab_fingerprint(load_tokenizer(tmp_path)) == vocab_fingerprint(tok)


def test_fingerprint_depends_on_vocab_and_case(tok):
    other = train_tokenizer(TEXTS[:3], vocab_size=120, min_frequency=1)
    cased = train_tokenizer(TEXTS, vocab_size=200, lowercase=False, min_frequency=1)
    prints = {vocab_fingerprint(tok), vocab_fingerprint(other), vocab_fingerprint(cased)}
    assert len(prints) == 3
    assert vocab_fingerprint(tok) == vocab_fingerprint(tok)


def test_fingerprint_tells_apart_vocabularies_of_one_size_and_case(tmp_path):
    """Two word pieces swapped: the same size, the same case, other ids for the same text."""
    swapped = BERT_VOCAB[:6] + ["world", "hello"] + BERT_VOCAB[8:]
    a = load_tokenizer(_write_vocab(tmp_path / "a.txt", BERT_VOCAB))
    b = load_tokenizer(_write_vocab(tmp_path / "b.txt", swapped))
    assert a.get_vocab_size() == b.get_vocab_size() and a.encode("hello").ids != b.encode("hello").ids
    assert vocab_fingerprint(a) != vocab_fingerprint(b)


def test_load_bert_vocab_txt(tmp_path):
    path = _write_vocab(tmp_path / "vocab.txt", BERT_VOCAB)
    tok = load_tokenizer(path)
    assert special_ids(tok) == SpecialIds(pad=0, unk=2, cls=3, sep=4, mask=5)
    enc = tok.encode("Hello, playing World!")
    assert enc.tokens == ["[CLS]", "hello", ",", "play", "##ing", "world", "[UNK]", "[SEP]"]
    pair = tok.encode("hello", "world")
    assert pair.ids == [3, 6, 4, 7, 4] and pair.type_ids == [0, 0, 0, 1, 1]
    assert vocab_fingerprint(load_tokenizer(tmp_path)) == vocab_fingerprint(tok)  # the folder works too


def test_vocab_txt_lines_and_ids_as_hugging_face_reads_them(tmp_path):
    """Only \\n, \\r\\n and \\r end a line (splitlines() also broke at \\x85, \\u2028, \\x0c, \\x1c...) and
    the rest of the line is the token: every id after such a token used to be shifted from Hugging Face's."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert import load_vocab

    # Read alike by both of Hugging Face's readers: load_vocab and from_pretrained (tokenizers' WordPiece).
    odd = ["x\u2028y", "a\x85b", "\x0cpage", "rec\x1esep", "\x1c"]
    lines = BERT_VOCAB[:6] + odd + BERT_VOCAB[6:]
    path = tmp_path / "vocab.txt"
    path.write_bytes(("\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n").encode("utf-8"))
    expected = {token: index for index, token in enumerate(lines)}
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path))  # (its vocab_file= argument is ignored)
    assert dict(load_vocab(str(path))) == hf.get_vocab() == expected  # the oracles read what was written
    tok = load_tokenizer(path)
    assert tok.get_vocab(with_added_tokens=True) == expected
    sentence = "Hello, playing World."
    assert tok.encode(sentence).ids == hf.encode(sentence) == [3] + [6 + len(odd) + k for k in (0, 4, 2, 3, 1, 5)] + [4]
    # Where tokenizers' reader differs (it trims a line's end and keeps a lone \\r), load_vocab's reading (as
    # BertTokenizer's own) is followed: spaces and a lone \\x85 are tokens, a lone \\r ends a line.
    path.write_bytes("[PAD]\r[UNK]\r\n[CLS]\n \x85\n[SEP]\rspaced \n[MASK]".encode("utf-8"))  # no final newline
    assert load_tokenizer(path).get_vocab(with_added_tokens=True) == dict(load_vocab(str(path))) == {
        "[PAD]": 0, "[UNK]": 1, "[CLS]": 2, " \x85": 3, "[SEP]": 4, "spaced ": 5, "[MASK]": 6}


def test_vocab_txt_cased(tmp_path):
    path = _write_vocab(tmp_path / "vocab.txt", BERT_VOCAB)
    cased = load_tokenizer(path, lowercase=False)
    assert cased.encode("Hello hello", add_special_tokens=False).tokens == ["[UNK]", "hello"]
    assert vocab_fingerprint(cased) != vocab_fingerprint(load_tokenizer(path))


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found") as info:
        load_tokenizer(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)


def test_corrupt_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not valid JSON") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_json_that_is_not_a_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    for other in ({"hello": "world"}, [1, 2], {"model": "bert"}):  # a parser's detail used to be all it said
        path.write_text(json.dumps(other), encoding="utf-8")
        with pytest.raises(TokenizerError, match=r"JSON, but not a Hugging Face tokenizer file \(it has no \"model\""):
            load_tokenizer(path)
    path.write_text(json.dumps({"model": {"type": "Nonsense"}}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer file"):  # tokenizers' own reason
        load_tokenizer(path)


def test_vocab_lacking_special_tokens(tmp_path):
    path = _write_vocab(tmp_path / "vocab.txt", [t for t in BERT_VOCAB if t != "[MASK]"])
    with pytest.raises(TokenizerError, match=r"lacks the special token\(s\) \[MASK\]") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_tokenizer_json_lacking_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    path = tmp_path / "tokenizer.json"
    path.write_text(bare.to_str(), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"\[PAD\], \[CLS\], \[SEP\], \[MASK\]"):
        load_tokenizer(path)


def test_vocab_duplicate_and_empty_lines(tmp_path):
    with pytest.raises(TokenizerError, match=":8: token 'hello' already on line 7"):
        load_tokenizer(_write_vocab(tmp_path / "vocab.txt", BERT_VOCAB[:7] + ["hello"]))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer(tmp_path / "empty.txt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=5)


def test_uncased_strips_accents_as_bert_uncased_does(tmp_path):
    """An uncased vocabulary reads "Café" as "cafe" (BERT-uncased lowercases and strips accents); a cased
    one keeps the accent. Oracle: Hugging Face's BertTokenizer on the same vocab.txt."""
    transformers = pytest.importorskip("transformers")
    path = _write_vocab(tmp_path / "vocab.txt", BERT_VOCAB[:6] + ["cafe", "naive", "resume", "é", "ï", "c", "##a",
                                                                  "##f", "##é", "##e"])
    uncased, cased = load_tokenizer(path), load_tokenizer(path, lowercase=False)
    text = "Café naïve RÉSUMÉ"
    ours = uncased.encode(text, add_special_tokens=False)
    assert ours.tokens == ["cafe", "naive", "resume"]
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path), do_lower_case=True)
    assert ours.ids == hf.convert_tokens_to_ids(hf.tokenize(text))
    assert cased.encode("café", add_special_tokens=False).tokens == ["c", "##a", "##f", "##é"]


def test_coverage_counts_only_word_pieces(tok):
    """[UNK] is measured among word pieces: padding and the other special tokens are not text. A batch
    that is 30% [UNK] and 70% padding is all unknown text."""
    from widenet.data.text.tokenizer import check_coverage

    special = special_ids(tok)
    ids = torch.tensor([[special.unk] * 3 + [special.pad] * 7])
    with pytest.raises(TokenizerError, match="100% of the task's word pieces are \\[UNK\\]"):
        check_coverage(ids, special, "the task", "advice")
    framed = torch.tensor([[special.cls] + [5] * 9 + [special.unk] + [special.sep, special.mask] + [special.pad] * 7])
    with pytest.warns(UserWarning, match="10% of the task's word pieces are \\[UNK\\]"):  # 1 of 10 pieces
        check_coverage(framed, special, "the task", "advice")
