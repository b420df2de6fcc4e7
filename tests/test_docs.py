"""The README and docs/ stay true: links resolve, the site lists every page, CI runs the
README's test command and builds the site, the commands they show parse, and their Python
examples run.

`mkdocs build --strict` (run by .ci/run) checks the links inside docs/ too; these tests
also cover README.md, which mkdocs does not see, and need no mkdocs.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
ALL = [README, *PAGES]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
INLINE_COMMAND = re.compile(r"`((?:widenet|python -m widenet) [^`]+)`")


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings inside them do not count)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and Python-Markdown's toc both make it for plain headings:
    lower case, code marks and punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKD", heading).replace("`", "")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"\s", "-", text)


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(_prose(path.read_text(encoding="utf-8")))}


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"index.md", "vision.md", "text.md", "distributed.md", "gpu.md", "checkpoints.md",
            "experiments.md"} <= names


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_relative_links_resolve(path):
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link {target!r} points at a missing file"
        if path.parent == DOCS:
            assert DOCS in dest.parents or dest == DOCS, \
                f"{path.name}: link {target!r} leaves docs/ (the site would not contain it)"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: link {target!r}: no such heading in {dest.name}"


def test_mkdocs_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^theme:\s*\n\s+name:\s*material\s*$", config, re.M)
    listed = re.findall(r":\s*([\w./-]+\.md)\s*$", config, re.M)
    assert sorted(listed) == sorted(p.name for p in PAGES), "mkdocs.yml's nav and docs/*.md differ"


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for block in FENCE.findall(quick) for line in block[1].splitlines()]
    assert commands == ["bash run.sh", "bash test.sh"]


def test_ci_runs_the_readme_test_command_and_builds_the_site():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    assert "set -euo pipefail" in lines
    assert "bash test.sh" in lines
    build = [line for line in lines if "mkdocs build" in line]
    assert build and "--strict" in build[0]
    assert lines.index("bash test.sh") < lines.index(build[0])
    assert "site/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def _commands(path: Path) -> list[str]:
    """The widenet invocations shown in a page: lines of its shell code blocks (continuations
    joined, `torchrun ... -m widenet` included) and inline code spans that give flags."""
    text = path.read_text(encoding="utf-8")
    found = []
    for lang, body in FENCE.findall(text):
        if lang.strip() not in ("", "sh", "bash", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("widenet "):
                found.append(line)
            elif " -m widenet " in line and line.startswith("torchrun "):
                found.append("widenet " + line.split(" -m widenet ", 1)[1])
    spans = INLINE_COMMAND.findall(_prose(text))  # with a flag: a command, not a command's name
    found += [m.removeprefix("python -m ") for m in spans if " --" in m]
    return found


def _is_concrete(argv: list[str]) -> bool:
    """False for synopses: placeholders (M, DIR, KEY=VALUE), elisions (...), alternatives, options."""
    for token in argv:
        if "..." in token or "|" in token or token.startswith("[") or token.endswith("]"):
            return False
        if re.fullmatch(r"[A-Z][A-Z_]*", token.split("=", 1)[-1]):  # M, DIR, KEY=VALUE
            return False
    return True


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_shown_commands_parse(path):
    from widenet.cli import build_parser

    parser = build_parser()
    checked = 0
    for command in _commands(path):
        argv = shlex.split(command, comments=True)[1:]
        if not argv or not _is_concrete(argv):
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"{path.name}: `{command}` does not parse (exit {exit_.code})")
        checked += 1
    if path in (README, DOCS / "vision.md", DOCS / "text.md"):
        assert checked >= 3, f"{path.name}: expected its example commands to be checked"


@pytest.mark.parametrize("path", [README, DOCS / "models.md"], ids=["README.md", "docs/models.md"])
def test_python_examples_run(path):
    """The Python blocks of a page, in order, in one namespace (as a reader would paste them)."""
    namespace: dict = {}
    blocks = [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang.strip() == "python"]
    assert blocks
    for body in blocks:
        exec(compile(body, f"{path.name} example", "exec"), namespace)  # noqa: S102 - the repo's own docs
