"""Hub dataset names (hf:DATASET[/CONFIG]:SPLIT) with a stand-in `datasets` module: no network."""

from __future__ import annotations

import sys
import types

import pytest

from widenet.data.text.classification import read_classification
from widenet.data.text.hub import parse_hub_name, resolve_task_file
from widenet.data.text.squad import read_squad
from widenet.data.text.task_common import TaskDataError


class _Rows(list):
    """What datasets.load_dataset returns, as far as widenet uses it: rows and features."""

    def __init__(self, rows, features=None):
        super().__init__(rows)
        self.features = features or {}


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []
    label = types.SimpleNamespace(names=["negative", "positive"])

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "glue":
            return _Rows([dict(sentence="a fine film", label=1, idx=0), dict(sentence="dull", label=0, idx=1)],
                         dict(label=label))
        if name == "squad_v2":
            return _Rows([dict(id="q1", title="t", context="Anna keeps the key.", question="Who keeps it?",
                               answers=dict(text=["Anna"], answer_start=[0])),
                          dict(id="q2", title="t", context="Anna keeps the key.", question="Who lost it?",
                               answers=dict(text=[], answer_start=[]))])
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_parse_hub_name():
    assert parse_hub_name("hf:glue/sst2:train") == ("glue", "sst2", "train")
    assert parse_hub_name("hf:squad_v2:validation") == ("squad_v2", None, "validation")
    with pytest.raises(TaskDataError, match="hf:DATASET"):
        parse_hub_name("hf:glue")


def test_classification_split_is_fetched_once_with_label_names(fake_datasets, tmp_path):
    path = resolve_task_file("hf:glue/sst2:train", "classify", tmp_path)
    examples = read_classification(path)
    assert [(e.text_a, e.label) for e in examples] == [("a fine film", "positive"), ("dull", "negative")]
    assert resolve_task_file("hf:glue/sst2:train", "classify", tmp_path) == path
    assert fake_datasets == [("glue", "sst2", "train")]  # the second call read the cache


def test_squad_split_becomes_squad_json(fake_datasets, tmp_path):
    examples, version = read_squad(resolve_task_file("hf:squad_v2:validation", "qa", tmp_path))
    assert version == "2.0"
    assert examples[0].answers == [("Anna", 0)] and examples[1].is_impossible


def test_local_paths_pass_through_and_hub_errors_are_one_line(fake_datasets, tmp_path, monkeypatch):
    assert resolve_task_file("data/train.tsv", "classify", tmp_path) == "data/train.tsv"
    with pytest.raises(TaskDataError, match="could not load it.*doesn't exist"):
        resolve_task_file("hf:nope:train", "classify", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(TaskDataError, match="needs the `datasets` package"):
        resolve_task_file("hf:glue/cola:train", "classify", tmp_path)
