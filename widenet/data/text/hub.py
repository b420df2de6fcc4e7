"""Fine-tuning data by name from the Hugging Face hub (optional: needs `datasets` and a network).

A name is written `hf:DATASET[/CONFIG]:SPLIT`, e.g. `hf:glue/sst2:train`,
`hf:glue/mnli:validation_matched`, `hf:squad_v2:validation`. The split is
fetched once with `datasets.load_dataset` and written to widenet's data cache
in the formats the file readers take (JSONL for classification, SQuAD JSON
for QA), so everything after that is the same as for local files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ...files import atomic_path
from ..downloads import data_home
from .task_common import TaskDataError

PREFIX = "hf:"


def is_hub_name(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def parse_hub_name(spec: str) -> tuple[str, str | None, str]:
    """'hf:glue/sst2:train' -> ('glue', 'sst2', 'train')."""
    body = spec[len(PREFIX):]
    name, sep, split = body.rpartition(":")
    if not sep or not name or not split:
        raise TaskDataError(f"{spec!r}: a hub name is hf:DATASET[/CONFIG]:SPLIT, e.g. hf:glue/sst2:train")
    dataset, _, config = name.partition("/")
    return dataset, config or None, split


def resolve_task_file(spec: str, task: str, cache_dir: Path | None = None) -> str:
    """A local path as given; a hub name fetched (once) into the cache, returning the written file."""
    if not is_hub_name(spec):
        return spec
    dataset, config, split = parse_hub_name(spec)
    slug = "-".join(filter(None, [dataset, config, split])).replace("/", "_")
    target = (cache_dir or data_home() / "hub") / (f"{slug}.json" if task == "qa" else f"{slug}.jsonl")
    if target.exists():
        return str(target)
    rows = _load_split(spec, dataset, config, split)
    text = _squad_json(rows) if task == "qa" else _classification_jsonl(rows)
    _write_atomically(target, text)
    return str(target)


def _load_split(spec: str, dataset: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"{spec}: reading hub datasets needs the `datasets` package "
                            "(pip install datasets) and network access; or pass a local file") from None
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # network, unknown name or split: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskDataError(f"{spec}: could not load it with datasets.load_dataset ({first})") from None


def _label_names(rows: Any) -> list[str] | None:
    """Names of a ClassLabel 'label' column, when the dataset declares them."""
    feature = getattr(rows, "features", {}).get("label") if hasattr(rows, "features") else None
    return list(getattr(feature, "names", []) or []) or None


def _classification_jsonl(rows: Iterable[dict]) -> str:
    names = _label_names(rows)
    lines = []
    for row in rows:
        row = dict(row)
        label = row.get("label")
        if isinstance(label, int) and names and 0 <= label < len(names):
            row["label"] = names[label]
        elif isinstance(label, int) and label < 0:  # GLUE test splits: -1 = no label
            row.pop("label")
        lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def _squad_json(rows: Iterable[dict]) -> str:
    """Hub SQuAD rows (id, context, question, answers{text, answer_start}) -> SQuAD JSON v2.0 layout."""
    paragraphs: dict[str, dict] = {}
    impossible_seen = False
    for row in rows:
        answers = row["answers"]
        pairs = [dict(text=t, answer_start=s) for t, s in zip(answers["text"], answers["answer_start"])]
        impossible_seen |= not pairs
        para = paragraphs.setdefault(row["context"], dict(context=row["context"], qas=[]))
        para["qas"].append(dict(id=row["id"], question=row["question"], answers=pairs, is_impossible=not pairs))
    version = "v2.0" if impossible_seen else "1.1"
    return json.dumps(dict(version=version, data=[dict(title="hub", paragraphs=list(paragraphs.values()))]))


def _write_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
