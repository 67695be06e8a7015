"""Every relative link in README.md and docs/*.md points at a file that exists, and a #anchor at a heading there."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images too would need the file, see below
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links and headings there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return [*LINK.findall(text), *IMAGE.findall(text)]


def test_slug_follows_github():
    assert slug("Labels + pairs") == "labels--pairs"
    assert slug("The main job: `simskip-faiss run`") == "the-main-job-simskip-faiss-run"
    assert slug("Does it help? Measured on WordNet + MiniLM") == "does-it-help-measured-on-wordnet--minilm"
    assert slug("sentence-transformers") == "sentence-transformers"


def test_pages_have_links():
    assert sum(len(links(p)) for p in PAGES) > 50  # the check below is not vacuous


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / unquote(path_part)).resolve()
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md":
                bad.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)
