"""README and docs/: every relative link resolves, README stays short and links every docs page. No model needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 15_000  # bytes
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def link_targets(text: str) -> list[str]:
    """The targets of the markdown links `[text](target)` in TEXT, outside code blocks and code spans."""
    text = _FENCE.sub("", text)
    text = _CODE_SPAN.sub("", text)  # [`name`](target) keeps its link: only the text inside the brackets goes
    return _LINK.findall(text)


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative link targets in DOC whose file or folder does not exist (anchors are not checked)."""
    broken = []
    for target in link_targets(doc.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0]
        if not path:  # an anchor in the same page
            continue
        resolved = root / path.lstrip("/") if path.startswith("/") else doc.parent / path
        if not resolved.exists():
            broken.append(target)
    return broken


def test_the_checker_reports_a_broken_link_and_only_that(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "See [the guide](docs/guide.md), [a section](docs/guide.md#guide), [here](#top),\n"
        "[the web](https://example.com/x.md), [mail](mailto:someone@example.com) and [gone](docs/missing.md#part).\n"
        '![a picture](docs/missing.png "title")\n'
        "```\n[in a code block](docs/not-checked.md)\n```\n"
        "and `[in a code span](docs/not-checked-either.md)`.\n"
    )
    assert broken_links(doc, root=tmp_path) == ["docs/missing.md#part", "docs/missing.png"]
    (tmp_path / "docs" / "missing.md").write_text("")
    (tmp_path / "docs" / "missing.png").write_bytes(b"")
    assert broken_links(doc, root=tmp_path) == []


def test_links_resolve_relative_to_the_linking_file(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "bench.md").write_text("")
    page = tmp_path / "docs" / "results" / "run.md"
    page.write_text("[bench](../bench.md) [not here](bench.md) [from the root](/docs/bench.md)\n")
    assert broken_links(page, root=tmp_path) == ["bench.md"]


def test_there_are_pages_to_check():
    assert README in DOCS and (ROOT / "docs" / "architecture.md") in DOCS and len(DOCS) > 10
    assert len(link_targets(README.read_text(encoding="utf-8"))) > 10


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == [], f"{doc.relative_to(ROOT)} links to files that do not exist"


def test_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to a page under docs/"


def test_readme_links_every_docs_page():
    linked = {
        (ROOT / target.split("#", 1)[0]).resolve()
        for target in link_targets(README.read_text(encoding="utf-8"))
        if not _EXTERNAL.match(target)
    }
    unlinked = [str(doc.relative_to(ROOT)) for doc in DOCS[1:] if doc.resolve() not in linked]
    assert unlinked == [], "README's documentation table should link these pages"
