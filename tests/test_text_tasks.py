"""GLUE/SQuAD readers, encoders and SQuAD post-processing on small files written here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from widenet.data.text.classification import (
    ClassificationExample,
    _pair_lengths,
    check_labels,
    encode_classification,
    label_vocabulary,
    read_classification,
    read_classification_task,
)
from widenet.data.text.squad import QAFeatures, SquadExample, encode_squad, postprocess_squad, read_squad
from widenet.data.text.squad_metrics import squad_scores
from widenet.data.text.task_common import TaskDataError

tokenizers = pytest.importorskip("tokenizers")

PAD, UNK, CLS, SEP, MASK = range(5)

FILLER = [
    "the river flows past the old mill near the village",
    "farmers bring grain to the mill every autumn",
    "a stone bridge crosses the river below the hill",
]
CORPUS = FILLER + [
    "The Eiffel Tower is in Paris, France.",
    "Where is the Eiffel Tower? Who built the bridge?",
    "it's a \"great film with a good story",
    "a dull and boring movie",
    "Marie Curie won the Nobel Prize in physics and chemistry.",
    "What did Marie Curie win? Which prize is it?",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny WordPiece tokenizer with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    return tok


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# Classification readers
# --------------------------------------------------------------------------


def test_sst2_tsv_keeps_unbalanced_quote(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\nit \'s a "great film \t1\na dull movie \t0\n')
    examples = read_classification(path)
    assert examples == [
        ClassificationExample('it \'s a "great film ', None, "1"),
        ClassificationExample("a dull movie ", None, "0"),
    ]
    assert [ex.line for ex in examples] == [2, 3]


def test_mnli_tsv_with_extra_columns(tmp_path):
    header = "index\tgenre\tsentence1_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = [
        "0\tfiction\t(ROOT x)\tA man sleeps.\tA person rests.\tneutral\tentailment",
        "1\tgov\t(ROOT y)\tIt rains.\tIt is dry.\tcontradiction\tcontradiction",
    ]
    examples = read_classification(write(tmp_path / "dev_matched.tsv", "\n".join([header, *rows]) + "\n"))
    assert examples[0] == ClassificationExample("A man sleeps.", "A person rests.", "entailment")
    assert examples[1].label == "contradiction"


@pytest.mark.parametrize(
    "header, row, expected",
    [
        ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "7\t1\t2\tWhy?\tHow?\t1", ("Why?", "How?", "1")),
        ("index\tquestion\tsentence\tlabel", "0\tWho?\tHim.\tentailment", ("Who?", "Him.", "entailment")),
        ("index\tsentence", "0\tunlabeled test sentence", ("unlabeled test sentence", None, None)),
    ],
    ids=["qqp", "qnli", "sst2-test"],
)
def test_tsv_column_sets(tmp_path, header, row, expected):
    (ex,) = read_classification(write(tmp_path / "x.tsv", f"{header}\n{row}\n"))
    assert (ex.text_a, ex.text_b, ex.label) == expected


def test_csv_with_quoted_commas(tmp_path):
    path = write(tmp_path / "train.csv", 'sentence1,sentence2,label\n"Yes, it is.",No,0\nA,"B, C",1\n')
    examples = read_classification(path)
    assert examples == [ClassificationExample("Yes, it is.", "No", "0"), ClassificationExample("A", "B, C", "1")]


def test_jsonl_premise_hypothesis_and_int_labels(tmp_path):
    lines = [
        json.dumps({"premise": "P one", "hypothesis": "H one", "label": 1}),
        "",
        json.dumps({"premise": "P two", "hypothesis": "H two", "label": 0, "idx": 5}),
    ]
    examples = read_classification(write(tmp_path / "train.jsonl", "\n".join(lines) + "\n"))
    assert examples == [ClassificationExample("P one", "H one", "1"), ClassificationExample("P two", "H two", "0")]
    assert examples[1].line == 3
    (ex,) = read_classification(write(tmp_path / "t.jsonl", json.dumps({"text": "solo"}) + "\n"))
    assert ex == ClassificationExample("solo", None, None)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.tsv", "", "empty.tsv: file is empty"),
        ("blank.jsonl", "\n\n", "blank.jsonl: file is empty"),
        ("cols.tsv", "idx\tfoo\tlabel\n0\tx\t1\n", "no recognised text column; found columns 'idx', 'foo', 'label'"),
        ("fields.tsv", "sentence\tlabel\nok\t1\ntoo\tmany\tfields\n", "fields.tsv line 3: expected 2 fields"),
        ("value.tsv", "sentence\tlabel\nok\t1\nok\t1\nno label\t\n", "value.tsv line 4: missing value for column 'label'"),
        ("bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl line 2: bad JSON"),
        ("key.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n', "key.jsonl line 2: missing value for column 'text'"),
        ("first.jsonl", '{"text": "a"}\n{"text": "b", "label": 0}\n', "first.jsonl line 2: has 'label', which the "
         "first record (line 1) lacks: the first record's keys choose the columns, so give it a label too"),
        ("kind.txt", "sentence\n", "unsupported file type '.txt'"),
    ],
)
def test_classification_errors(tmp_path, name, content, message):
    with pytest.raises(TaskDataError) as info:
        read_classification(write(tmp_path / name, content))
    assert message in str(info.value)


def test_missing_column_error_lists_accepted_names(tmp_path):
    with pytest.raises(TaskDataError, match="accepted names: .*sentence1\\+sentence2.*sentence, text"):
        read_classification(write(tmp_path / "cols.csv", "a,b\n1,2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="nope.tsv: no such file"):
        read_classification(tmp_path / "nope.tsv")


def test_label_vocabulary_and_check(tmp_path):
    train = [ClassificationExample("a", None, "positive"), ClassificationExample("b", None, "negative")] * 2
    labels = label_vocabulary(train)
    assert labels == ["negative", "positive"]
    rows = ["sentence\tlabel"] + [f"s{i}\tpositive" for i in range(5)] + ["odd one\tmaybe"]
    path = write(tmp_path / "validation.tsv", "\n".join(rows) + "\n")
    dev = read_classification(path)
    with pytest.raises(TaskDataError) as info:
        check_labels(dev, labels, path.name)
    assert str(info.value) == ("validation.tsv line 7: label 'maybe' is not one of the training labels: "
                               "'negative', 'positive'")
    check_labels(dev[:5], labels, path.name)  # fine
    with pytest.raises(TaskDataError, match="no label"):
        label_vocabulary([ClassificationExample("a", None, None)])


# --------------------------------------------------------------------------
# Classification encoding
# --------------------------------------------------------------------------


def test_pair_lengths_matches_token_by_token_longest_first():
    def slow(a: int, b: int, budget: int) -> tuple[int, int]:
        while a + b > budget:
            if a > b:
                a -= 1
            else:
                b -= 1
        return a, b

    for a in range(12):
        for b in range(12):
            for budget in range(1, 14):
                assert _pair_lengths(a, b, budget) == slow(a, b, budget), (a, b, budget)


def test_encode_classification_layout(tokenizer):
    examples = [
        ClassificationExample("a dull movie", None, "0"),
        ClassificationExample("the river flows past the old mill", "the mill", "1"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated -> no warning
        out = encode_classification(examples, tokenizer, ["0", "1"], max_len=64)
    assert set(out) == {"input_ids", "token_type_ids", "labels"}
    ids, types = out["input_ids"], out["token_type_ids"]
    assert ids.dtype == types.dtype == out["labels"].dtype == torch.int64
    assert ids.shape == types.shape and ids.shape[0] == 2
    a = tokenizer.encode("a dull movie", add_special_tokens=False).ids
    assert ids[0, : len(a) + 2].tolist() == [CLS, *a, SEP]
    assert (ids[0, len(a) + 2 :] == PAD).all() and (types[0] == 0).all()
    # the pair: same ids as the tokenizer's own template, type 1 on "b [SEP]"
    ref = tokenizer.encode("the river flows past the old mill", "the mill")
    assert ids[1].tolist() == ref.ids and types[1].tolist() == ref.type_ids
    assert out["labels"].tolist() == [0, 1]
    assert "labels" not in encode_classification(examples, tokenizer, None, max_len=64)


def test_encode_classification_truncates_and_warns_once(tokenizer):
    long = " ".join(FILLER)
    examples = [
        ClassificationExample(long, None, "0"),
        ClassificationExample(long, "the mill", "1"),
        ClassificationExample("a dull movie", None, "0"),
    ]
    with pytest.warns(UserWarning, match="2 of 3 examples were longer than max_len=10") as record:
        out = encode_classification(examples, tokenizer, ["0", "1"], max_len=10)
    assert len(record) == 1
    assert out["input_ids"].shape == (3, 10)
    row = out["input_ids"][1].tolist()
    assert row[0] == CLS and row[-1] == SEP and row.count(SEP) == 2
    mill = tokenizer.encode("the mill", add_special_tokens=False).ids
    assert row[-len(mill) - 1 : -1] == mill  # the short text survives longest-first truncation
    with pytest.raises(TaskDataError, match="not one of"), pytest.warns(UserWarning):
        encode_classification(examples, tokenizer, ["0"], max_len=10)
    assert "lost every token" not in str(record[0].message)  # both texts of the pair kept some


def test_a_pair_text_cut_to_nothing_is_named(tokenizer):
    """max_len 4 leaves one token for a pair: longest-first keeps it in text_a and drops text_b
    whole, which the truncation note says."""
    examples = [ClassificationExample("the river flows", "the mill", "1"), ClassificationExample("a", None, "0")]
    with pytest.warns(UserWarning, match="1 of 2 examples were longer .*; in 1 of them one text of the pair "
                                         "lost every token"):
        out = encode_classification(examples, tokenizer, ["0", "1"], max_len=4)
    assert out["token_type_ids"][0].tolist() == [0, 0, 0, 1]  # [CLS] a [SEP] [SEP]: nothing of b


def test_labels_differing_only_in_case_or_spaces_are_noted(tmp_path):
    rows = ["sentence\tlabel", "a\tpos", "b\tPos ", "c\tneg", "d\tneg"]
    train = write(tmp_path / "train.tsv", "\n".join(rows) + "\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\ne\tpos\n")
    with pytest.warns(UserWarning, match="train.tsv: labels 'Pos ' and 'pos' differ only in case or spaces"):
        _, _, labels = read_classification_task(train, dev)
    assert labels == ["Pos ", "neg", "pos"]  # kept as given
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct labels: no note
        read_classification_task(write(tmp_path / "t2.tsv", "sentence\tlabel\na\tpos\nb\tneg\n"), dev)


def test_score_labels_are_noted_and_non_finite_labels_refused(tmp_path):
    """STS-B-style similarity scores become one class per distinct score (noted); JSON's NaN is no class."""
    train = write(tmp_path / "sts.tsv", "sentence1\tsentence2\tlabel\na\tb\t3.8\nc\td\t0.25\ne\tf\t5\n")
    with pytest.warns(UserWarning, match=r"sts.tsv: the labels are numbers, some with fractions \('0.25'\), as "
                                         r"scores are; they are trained as 3 separate classes"):
        read_classification_task(train, train)
    whole = write(tmp_path / "whole.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # class numbers are classes: no note
        read_classification_task(whole, whole)
    bad = write(tmp_path / "nan.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": NaN}\n')
    with pytest.raises(TaskDataError, match=r"nan.jsonl.*line 2: label nan is not a class"):
        read_classification(bad)


# --------------------------------------------------------------------------
# SQuAD reading
# --------------------------------------------------------------------------

EIFFEL = "The Eiffel Tower is in Paris, France."
CURIE = "Marie Curie won the Nobel Prize in physics and chemistry."


def squad_json(version: str | None, qas_eiffel: list[dict], qas_curie: list[dict]) -> dict:
    data = {
        "data": [
            {"title": "Eiffel", "paragraphs": [{"context": EIFFEL, "qas": qas_eiffel}]},
            {"title": "Curie", "paragraphs": [{"context": CURIE, "qas": qas_curie}]},
        ]
    }
    if version is not None:
        data["version"] = version
    return data


def qa(qid: str, question: str, answers: list[tuple[str, int]], impossible: bool | None = None) -> dict:
    out = {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
    if impossible is not None:
        out["is_impossible"] = impossible
    return out


def test_read_squad_v11_round_trip(tmp_path):
    data = squad_json(
        "1.1",
        [qa("e1", "Where is the Eiffel Tower?", [("Paris", 23), ("Paris, France", 23)])],
        [qa("c1", "What did Marie Curie win?", [("the Nobel Prize", 16)])],
    )
    examples, version = read_squad(write(tmp_path / "train.json", json.dumps(data)))
    assert version == "1.1"
    assert examples == [
        SquadExample("e1", "Where is the Eiffel Tower?", EIFFEL, [("Paris", 23), ("Paris, France", 23)], False),
        SquadExample("c1", "What did Marie Curie win?", CURIE, [("the Nobel Prize", 16)], False),
    ]


@pytest.mark.parametrize("version", ["v2.0", None])
def test_read_squad_v20_round_trip_and_inference(tmp_path, version):
    data = squad_json(
        version,
        [qa("e1", "Where is the Eiffel Tower?", [("Paris", 23)], False)],
        [{"id": "c2", "question": "Who built the bridge?", "answers": [], "is_impossible": True,
          "plausible_answers": [{"text": "Marie Curie", "answer_start": 0}]}],
    )
    examples, got = read_squad(write(tmp_path / "dev.json", json.dumps(data)))
    assert got == "2.0"
    assert examples[1] == SquadExample("c2", "Who built the bridge?", CURIE, [], True)


def test_read_squad_fixes_small_offsets(tmp_path):
    data = squad_json(None, [qa("e1", "Where?", [("Paris", 24), ("France", 29)])], [])
    (ex,), version = read_squad(write(tmp_path / "d.json", json.dumps(data)))
    assert version == "1.1"
    assert ex.answers == [("Paris", 23), ("France", 30)]  # 24 -> 23 (-1), 29 -> 30 (+1)


@pytest.mark.parametrize(
    "data, message",
    [
        (squad_json(None, [qa("e9", "Where?", [("Paris", 10)])], []), "question id 'e9'"),
        (squad_json(None, [qa("e1", "Where?", [("Paris", 23)]), {"id": "e2", "answers": []}], []),
         "data[0] ('Eiffel') paragraphs[0] qas[1] (question id 'e2'): missing key 'question'"),
        ({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}, "data[0] ('T') paragraphs[0]: missing key 'context'"),
        ({"version": "1.1"}, "top level: missing key 'data'"),
        (squad_json(None, [qa("e3", "Where?", [])], []), "'e3'): answerable question has no answers"),
        (squad_json(None, [qa("e4", "Where?", [("Paris", -5)])], []), "answer_start=-5 is negative"),
    ],
    ids=["mismatch", "qa-key", "paragraph-key", "data-key", "no-answers", "negative-start"],
)
def test_read_squad_errors(tmp_path, data, message):
    with pytest.raises(TaskDataError) as info:
        read_squad(write(tmp_path / "bad.json", json.dumps(data)))
    assert message in str(info.value) and "bad.json" in str(info.value)


def test_read_squad_bad_json_and_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="broken.json line 2: bad JSON"):
        read_squad(write(tmp_path / "broken.json", '{"data":\n [}'))
    with pytest.raises(TaskDataError, match="absent.json: no such file"):
        read_squad(tmp_path / "absent.json")


# --------------------------------------------------------------------------
# SQuAD features
# --------------------------------------------------------------------------


def span_text(ex: SquadExample, feats: QAFeatures, f: int) -> str:
    s, e = int(feats.start_positions[f]), int(feats.end_positions[f])
    return ex.context[feats.offsets[f][s][0] : feats.offsets[f][e][1]]


def test_encode_squad_layout_and_answer_offsets(tokenizer):
    examples = [
        SquadExample("e1", "Where is the Eiffel Tower?", EIFFEL, [("Paris, France", 23)], False),
        SquadExample("c1", "What did Marie Curie win?", CURIE, [("Nobel Prize", 20)], False),
        SquadExample("c2", "Who built the bridge?", CURIE, [], True),
    ]
    feats = encode_squad(examples, tokenizer, max_len=64, doc_stride=16)
    assert len(feats) == 3 and feats.example_index.tolist() == [0, 1, 2]
    assert feats.input_ids.dtype == torch.int64 and feats.input_ids.shape == feats.token_type_ids.shape
    for f, ex in enumerate(examples[:2]):
        assert span_text(ex, feats, f) == ex.answers[0][0]
    assert (feats.start_positions[2], feats.end_positions[2]) == (0, 0)  # impossible -> [CLS]
    # layout: [CLS] question [SEP] context [SEP] pad
    q = tokenizer.encode(examples[0].question, add_special_tokens=False).ids
    c = tokenizer.encode(EIFFEL, add_special_tokens=False).ids
    row = feats.input_ids[0].tolist()
    assert row[: len(q) + len(c) + 3] == [CLS, *q, SEP, *c, SEP]
    assert all(t == PAD for t in row[len(q) + len(c) + 3 :])
    types = feats.token_type_ids[0].tolist()
    assert types[: len(q) + 2] == [0] * (len(q) + 2) and types[len(q) + 2 : len(q) + len(c) + 3] == [1] * (len(c) + 1)
    offsets = feats.offsets[0]
    assert len(offsets) == feats.input_ids.shape[1]
    assert offsets[: len(q) + 2] == [None] * (len(q) + 2) and offsets[len(q) + len(c) + 2 :] == [None] * (
        len(offsets) - len(q) - len(c) - 2
    )


def long_example() -> SquadExample:
    """A context of ~90 tokens with the answer in the middle."""
    before = " ".join(FILLER * 2)
    after = " ".join(FILLER[::-1] * 2)
    context = f"{before} {EIFFEL} {after}"
    start = context.index("Eiffel Tower")
    return SquadExample("long", "Where is the Eiffel Tower?", context, [("Eiffel Tower", start)], False)


def test_long_context_sliding_windows(tokenizer):
    ex = long_example()
    n_ctx = len(tokenizer.encode(ex.context, add_special_tokens=False).ids)
    feats = encode_squad([ex], tokenizer, max_len=32, doc_stride=8, max_query_len=64)
    assert len(feats) > 3 and (feats.example_index == 0).all()
    a_start, a_end = ex.answers[0][1], ex.answers[0][1] + len("Eiffel Tower")
    covered, holding = set(), []
    for f in range(len(feats)):
        spans = [o for o in feats.offsets[f] if o is not None]
        covered.update(spans)
        inside = spans[0][0] <= a_start and spans[-1][1] >= a_end
        holding.append(inside)
        if inside:
            assert span_text(ex, feats, f) == "Eiffel Tower"
        else:
            assert (feats.start_positions[f], feats.end_positions[f]) == (0, 0)
        assert int((feats.input_ids[f] != PAD).sum()) <= 32
    assert sum(holding) >= 2 and not all(holding)  # overlapping windows; not every one has it
    assert len(covered) == n_ctx  # every context token lies in some window


def test_question_truncation_and_too_small_max_len(tokenizer):
    ex = long_example()
    feats = encode_squad([ex], tokenizer, max_len=32, doc_stride=8, max_query_len=3)
    assert feats.input_ids[0, 4].item() == SEP  # [CLS] q q q [SEP]
    assert feats.questions_cut == 1  # fine-tuning says it (it cut every question without a word)
    assert encode_squad([ex], tokenizer, max_len=32, doc_stride=8, max_query_len=64).questions_cut == 0
    with pytest.raises(TaskDataError, match="cannot hold question 'long'"):
        encode_squad([ex], tokenizer, max_len=8, max_query_len=64)


# --------------------------------------------------------------------------
# SQuAD post-processing
# --------------------------------------------------------------------------


def test_postprocess_picks_the_hand_made_span(tokenizer):
    ex = SquadExample("e1", "Where is the Eiffel Tower?", EIFFEL, [("Paris", 23)], False)
    feats = encode_squad([ex], tokenizer, max_len=64)
    L = feats.input_ids.shape[1]
    ctx = [i for i, o in enumerate(feats.offsets[0]) if o is not None]
    want = next(i for i in ctx if EIFFEL[feats.offsets[0][i][0] :].startswith("Eiffel"))
    start, end = torch.zeros(1, L), torch.zeros(1, L)
    start[0, want], end[0, want + 1] = 5.0, 5.0  # "eiffel tower" (tokens want, want+1)
    start[0, 1] = end[0, 1] = 50.0  # a question token: never a valid answer
    end[0, want - 1] = 9.0  # ends before the start: invalid
    pred = postprocess_squad([ex], feats, start, end, version_2=False)
    assert pred == {"e1": "Eiffel Tower"}
    # max_answer_len=1 rules the 2-token span out; single tokens: "The" 0 + 9 = 9 beats
    # "Eiffel" 5 + 0 and "Tower" 0 + 5
    pred = postprocess_squad([ex], feats, start, end, max_answer_len=1, version_2=False)
    assert pred == {"e1": "The"}
    # v2: null score 0+0 vs span 10 -> answer; null 6+6=12 -> "" (12 - 10 > 0)
    assert postprocess_squad([ex], feats, start, end, version_2=True) == {"e1": "Eiffel Tower"}
    start[0, 0], end[0, 0] = 6.0, 6.0
    assert postprocess_squad([ex], feats, start, end, version_2=True) == {"e1": ""}
    assert postprocess_squad([ex], feats, start, end, version_2=True, null_threshold=3.0) == {"e1": "Eiffel Tower"}
    with pytest.raises(TaskDataError, match="start_logits must have shape"):
        postprocess_squad([ex], feats, start[:, :5], end, version_2=True)


def gold_logits(feats: QAFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, L) logits with +10 on each feature's gold start and end (0 = [CLS] for no answer)."""
    start = torch.zeros(feats.input_ids.shape)
    end = torch.zeros(feats.input_ids.shape)
    rows = torch.arange(len(feats))
    start[rows, feats.start_positions] = 10.0
    end[rows, feats.end_positions] = 10.0
    return start, end


def test_gold_logits_end_to_end(tmp_path, tokenizer):
    long = long_example()
    data = {
        "version": "v2.0",
        "data": [
            {"title": "Long", "paragraphs": [{"context": long.context, "qas": [
                qa("long", long.question, [long.answers[0]], False),
                {"id": "none", "question": "Who built the bridge?", "answers": [], "is_impossible": True},
            ]}]},
            {"title": "Curie", "paragraphs": [{"context": CURIE, "qas": [
                qa("c1", "What did Marie Curie win?", [("the Nobel Prize", 16), ("Nobel Prize", 20)], False),
            ]}]},
        ],
    }
    examples, version = read_squad(write(tmp_path / "dev.json", json.dumps(data)))
    feats = encode_squad(examples, tokenizer, max_len=32, doc_stride=8)
    assert len(feats) > len(examples)
    start, end = gold_logits(feats)
    preds = postprocess_squad(examples, feats, start, end, version_2=version == "2.0")
    assert preds == {"long": "Eiffel Tower", "none": "", "c1": "the Nobel Prize"}
    scores = squad_scores(preds, examples)
    assert scores["exact"] == 100.0 and scores["f1"] == 100.0
    assert scores["HasAns_total"] == 2 and scores["NoAns_total"] == 1


# --------------------------------------------------------------------------
# GCIDE tasks (`widenet gcide-task`): sizes, refusals, existing files
# --------------------------------------------------------------------------


def _gcide_pos(tmp_path: Path) -> Path:
    """30 nouns, 31 verbs (Word0x0 is both), 30 adjectives, 10 adverbs: 101 examples, 100 headwords."""
    from test_text_corpus import _pos_entries, _write_gcide

    return _write_gcide(tmp_path / "pos.dict.dz", _pos_entries(30))


def _task_rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    return [line.split("\t") for line in lines[1:]]


def _headwords(rows: list[list[str]]) -> set[str]:
    """The synthetic headword ids ("1x7") of rows; "k9" is Word0x0's verb sense."""
    import re

    return {"0x0" if "k9" in sentence else re.search(r"k(\d)x(\d+)", sentence).group(0)[1:] for sentence, _ in rows}


@pytest.mark.parametrize("train_size, validation_size", [(10, 5), (11, 4), (7, 3), (1, 1), (60, 20), (91, 10),
                                                         (100, 1), (2, 99)])
def test_gcide_task_writes_exactly_the_sizes_asked_for(tmp_path, train_size, validation_size):
    from widenet.data.text.gcide_tasks import write_gcide_task

    train_path, val_path = write_gcide_task(_gcide_pos(tmp_path), tmp_path / "task", "pos", train_size,
                                            validation_size, seed=3)
    train, val = _task_rows(train_path), _task_rows(val_path)
    assert (len(train), len(val)) == (train_size, validation_size)
    assert len({tuple(row) for row in train + val}) == train_size + validation_size  # no row twice
    assert not _headwords(train) & _headwords(val)  # a headword in one split only


@pytest.mark.parametrize("train_size, validation_size", [(100000000, 10), (100, 2), (10, 92)])
def test_gcide_task_refuses_more_examples_than_there_are(tmp_path, cli, train_size, validation_size):
    rc, out, err = cli(["gcide-task", "pos", "--gcide", _gcide_pos(tmp_path), "--out", tmp_path / "task",
                        "--train-size", train_size, "--validation-size", validation_size])
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        f"widenet: error: {tmp_path / 'pos.dict.dz'}: the pos task has 101 examples, fewer than the {train_size} "
        f"training + {validation_size} validation asked for; ask for at most 101 in all"]
    assert not (tmp_path / "task").exists()  # nothing written, no empty set


def _gcide_shared_headwords(tmp_path: Path) -> Path:
    """Ann and Bob are nouns and verbs, Cal a verb, Dee and Eve adjectives: 7 examples, 5 headwords."""
    from test_text_corpus import _write_gcide

    senses = [("Ann", "n.", "A thing"), ("Ann", "v. t.", "To act"), ("Bob", "n.", "A thing"),
              ("Bob", "v. t.", "To act"), ("Cal", "v. t.", "To act"), ("Dee", "a.", "Having a quality"),
              ("Eve", "a.", "Having a quality")]
    entries = [f"{word} \\{word}\\, {abbrev}\n   {gloss} named {i} after {word.lower()}.\n   [1913 Webster]\n"
               for i, (word, abbrev, gloss) in enumerate(senses)]
    return _write_gcide(tmp_path / "shared.dict.dz", "\n".join(entries))


def test_gcide_task_refuses_sizes_a_headword_split_cannot_meet(tmp_path, cli):
    """3 validation rows (a noun, a verb, an adjective) need Ann or Bob, whose verb sense is then lost to
    training: 3 training rows fit, not 4; never a short training set written without a word."""
    from widenet.data.text.gcide_tasks import write_gcide_task

    path = _gcide_shared_headwords(tmp_path)
    train_path, val_path = write_gcide_task(path, tmp_path / "ok", "pos", 3, 3, seed=0)
    train, val = _task_rows(train_path), _task_rows(val_path)
    assert (len(train), len(val)) == (3, 3)
    assert sorted(label for _, label in val) == sorted(label for _, label in train) == ["adjective", "noun", "verb"]
    numbers = lambda rows: {sentence.split()[-3] for sentence, _ in rows}  # noqa: E731 ("named 3 after _.")
    headword = {"0": "Ann", "1": "Ann", "2": "Bob", "3": "Bob", "4": "Cal", "5": "Dee", "6": "Eve"}
    assert not {headword[n] for n in numbers(train)} & {headword[n] for n in numbers(val)}
    rc, out, err = cli(["gcide-task", "pos", "--gcide", path, "--out", tmp_path / "short", "--train-size", 4,
                        "--validation-size", 3])
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"widenet: error: {path}: the pos task has 7 examples, but with each headword in one set only and the "
        "labels balanced, just 3 training examples fit beside 3 validation ones; ask for fewer"]
    assert not (tmp_path / "short").exists()


def test_gcide_task_refuses_to_replace_a_task_without_overwrite(tmp_path, cli):
    path = _gcide_pos(tmp_path)
    out = tmp_path / "task"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc, _, _ = cli(["gcide-task", "pos", "--gcide", path, "--out", out, "--train-size", 10, "--validation-size", 5])
    assert rc == 0  # a folder without a task in it is fine
    first = {name: (out / name).read_text() for name in ("train.tsv", "validation.tsv", "notes.txt")}
    rc, stdout, err = cli(["gcide-task", "pos", "--gcide", path, "--out", out, "--train-size", 20,
                           "--validation-size", 6])
    assert rc == 2 and stdout == ""
    assert err.strip().splitlines() == [
        f"widenet: error: {out / 'train.tsv'} already exists; give --overwrite to replace it"]
    assert {name: (out / name).read_text() for name in first} == first  # the earlier task kept
    (out / "train.tsv").unlink()  # validation.tsv alone is refused too
    rc, _, err = cli(["gcide-task", "pos", "--gcide", path, "--out", out, "--train-size", 20,
                      "--validation-size", 6])
    assert rc == 2 and f"{out / 'validation.tsv'} already exists; give --overwrite" in err
    assert (out / "validation.tsv").read_text() == first["validation.tsv"]
    rc, _, _ = cli(["gcide-task", "pos", "--gcide", path, "--out", out, "--train-size", 20, "--validation-size", 6,
                    "--overwrite"])
    assert rc == 0
    assert (len(_task_rows(out / "train.tsv")), len(_task_rows(out / "validation.tsv"))) == (20, 6)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.tsv", "validation.tsv"]  # no temp files
    rc, _, err = cli(["gcide-task", "pos", "--gcide", path, "--out", out / "notes.txt"])  # was "File exists"
    assert rc == 2 and f"--out {out / 'notes.txt'} is a file, not a folder" in err
    assert (out / "notes.txt").read_text() == "mine\n"
