"""No document cites a file that does not exist.

Every relative Markdown link in README.md and docs/ must point at an existing file (and,
for a link into a Markdown page, at an existing heading); every repository path a
document names in passing (``docs/install.md``, ``tests/.../x.py``) must exist too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# Files that cite documents in comments or strings.
CITING = [*DOCUMENTS, ROOT / "pyproject.toml", ROOT / "tox.ini"]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
# A path of this repository named in passing (outside links and fenced code, where
# examples name files of the reader's own project).
CITED_PATH = re.compile(
    r"(?<![\w/.-])((?:docs|scripts|tests/integration|tests/unit|wove_adapters)/"
    r"[\w./-]*\.(?:md|py|toml|json|ini|svg))"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    found: set[str] = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(match.group(1))
        n = 0
        while (candidate := slug if n == 0 else f"{slug}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [m.group(1) for m in (*LINK.finditer(text), *IMAGE.finditer(text))]


def test_there_are_documents_to_check() -> None:
    assert ROOT / "README.md" in DOCUMENTS
    assert len(DOCUMENTS) > 10


@pytest.mark.parametrize("page", DOCUMENTS, ids=_rel)
def test_every_relative_link_points_at_an_existing_file(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target} (no file {destination})")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no heading #{anchor} in {_rel(destination)})")
    assert not broken, f"{_rel(page)} has broken links:\n  " + "\n  ".join(broken)


def _cited(source: Path) -> set[str]:
    text = source.read_text()
    if source.suffix == ".md":
        text = LINK.sub("", IMAGE.sub("", FENCE.sub("", text)))
    return {m.group(1).rstrip(".") for m in CITED_PATH.finditer(text)}


@pytest.mark.parametrize("source", CITING, ids=_rel)
def test_every_cited_repository_path_exists(source: Path) -> None:
    missing = sorted(path for path in _cited(source) if not (ROOT / path).exists())
    assert not missing, f"{_rel(source)} cites files that do not exist: {missing}"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The patterns are not vacuous: a broken link, a missing heading and a missing cited
    file are each found."""
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[gone](missing.md) [here](#top) [nowhere](#bottom)\n"
                    "See docs/no-such-page.md.\n```\n[in code](ignored.md) docs/x.md\n```\n")
    assert _links(page) == ["missing.md", "#top", "#bottom"]
    assert _anchors(page) == {"top"}
    assert _cited(page) == {"docs/no-such-page.md"}
    assert _slug("Inside a wove weave") == "inside-a-wove-weave"
    assert _slug("`local`") == "local"
    assert _slug("Capabilities and start-up rejection") == "capabilities-and-start-up-rejection"
