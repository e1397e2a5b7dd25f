"""The README and the pages under docs/ are documents the repository keeps true: every relative link leads to a
file (and its #anchor to a heading of that file), every `python -m src.X` / `python -m benchmarks.X` they name is a
module, every page is linked from the README, and the README stays a short front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MODULE = re.compile(r"python -m ((?:src|benchmarks)(?:\.\w+)+)")


def prose(text: str) -> str:
    """The text outside code: fenced blocks and inline code spans removed (a `[x](y)` in code is no link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (inline markup too), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file offers; a repeated heading gets GitHub's -1, -2, ... suffix."""
    found: set[str] = set()
    for heading in HEADING.findall(prose(path.read_text())):
        name, n = anchor(heading), 1
        while name in found:
            name, n = f"{anchor(heading)}-{n}", n + 1
        found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file does not exist, or whose #anchor names no heading of it."""
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not this repository's files
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{page.name}: {target}: no file {path}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{page.name}: {target}: no heading #{fragment} in {resolved.name}")
    return problems


def missing_modules(page: Path) -> list[str]:
    """Each `python -m src.X` / `python -m benchmarks.X` of ``page`` that is neither a module nor a package."""
    problems = []
    for module in sorted(set(MODULE.findall(page.read_text()))):
        path = REPO_ROOT.joinpath(*module.split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
            problems.append(f"{page.name}: python -m {module}: no such module")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_named_module_exists(page):
    assert missing_modules(page) == []


def test_readme_is_short_and_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(prose(text))}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == [], "pages the README does not link"


def test_the_checks_see_a_broken_link_anchor_and_module(tmp_path):
    """The checks themselves can fail: a doctored page with one of each fault is reported, a good link is not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with punctuation\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[ok](other.md#a-section-with-punctuation) [self](#page) [web](https://example.com)\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such-section) `[code](not-a-link.md)`\n"
                    "```bash\npython -m src.no_such_stage\n```\n")
    assert broken_links(page) == ["page.md: missing.md: no file missing.md",
                                  "page.md: other.md#no-such-section: no heading #no-such-section in other.md"]
    assert missing_modules(page) == ["page.md: python -m src.no_such_stage: no such module"]
