"""The package layout: imports run one way and no module imports itself back.

Read from the source with ``ast`` (nothing is imported), counting imports
inside functions too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "widenet"

# Lower tiers may not import higher ones. distributed/ sits below train/ and
# beside data/: neither may import the other.
TIERS: dict[str, int] = {
    "files": 0, "listing": 0, "memory": 0, "rng": 0, "runtime": 0, "settings": 0, "signals": 0,
    "layers": 1,
    "models": 2,
    "data": 3, "distributed": 3,
    "train": 4,
    "analysis": 5, "inference": 5,
    "bench": 6,
    "cli": 7, "cli_args": 7, "cli_errors": 7, "cli_run": 7, "cli_text": 7, "cli_models": 7, "cli_predict": 7, "__main__": 7,
}
SIBLINGS_APART = {("data", "distributed"), ("distributed", "data")}
MAX_LINES = 460


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The widenet modules an ``import``/``from ... import`` names (a name may be a submodule)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                candidates = resolve(name, path.name == "__init__.py", node)
            else:
                continue
            targets.update(c for c in candidates if c in files and c != name)
        graph[name] = targets
    return graph


def tier_of(module: str) -> tuple[str, int] | None:
    """(top-level part, tier) of a widenet module; None for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1], TIERS[parts[1]]


def test_every_top_level_module_has_a_tier():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert tops <= set(TIERS), f"place these in TIERS: {sorted(tops - set(TIERS))}"


def test_imports_run_one_way():
    wrong = []
    for module, targets in import_graph().items():
        source = tier_of(module)
        for target in targets:
            dest = tier_of(target)
            if source is None or dest is None:
                continue
            if dest[1] > source[1] or (source[0], dest[0]) in SIBLINGS_APART:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_distributed_imports_neither_train_data_nor_analysis():
    graph = import_graph()
    wrong = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("widenet.distributed")
             for t in targets if t.split(".")[1] in ("train", "data", "analysis")]
    assert not wrong


def test_no_import_cycles():
    graph = import_graph()
    # Submodules do not count as importing their package's __init__ (Python
    # runs it first anyway), so drop arrows from a module to its own ancestors.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_planted_cycle_and_a_wrong_arrow(tmp_path, monkeypatch):
    """The checks above are only worth something if they can fail."""
    fake = tmp_path / "widenet"
    for rel, text in {
        "__init__.py": "",
        "layers/__init__.py": "",
        "layers/a.py": "from . import b\n",
        "layers/b.py": "def f():\n    from .a import x\n",
        "train/__init__.py": "",
        "distributed/__init__.py": "",
        "distributed/c.py": "from ..train import loop\n",
        "train/loop.py": "",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    with pytest.raises(AssertionError, match=r"widenet.layers.a -> widenet.layers.b -> widenet.layers.a"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match=r"widenet.distributed.c -> widenet.train"):
        test_imports_run_one_way()


def test_no_source_file_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these into modules named for what they hold: {long}"
