"""The documentation's links resolve: every relative link in README.md and docs/*.md names a file
that exists and, where it has one, an anchor that a heading of that file makes (GitHub's rule),
and every docs page is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", re.M | re.S)  # fenced code blocks


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives `text`'s headings: lower case, punctuation but '-' and '_'
    dropped, spaces to '-', a repeated one suffixed -1, -2, ..."""
    out: set[str] = set()
    for line in FENCED.sub("", text).splitlines():
        m = re.match(r"^#{1,6} (.+?)\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        base, n = slug, 0
        while slug in out:
            n += 1
            slug = f"{base}-{n}"
        out.add(slug)
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


def test_anchor_rule_on_known_headings():
    text = (
        "# Merge and export\n## The causal-LM formulation (`--head lm`)\n## Results\n## Results\n"
    )
    assert anchors(text) == {
        "merge-and-export",
        "the-causal-lm-formulation---head-lm",
        "results",
        "results-1",
    }
    assert links(ROOT / "README.md")  # the README links to its pages


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading makes #{frag} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_every_command_is_in_the_command_table():
    """docs/cli.md's table names every subcommand the parser has, and no other."""
    from loralab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    table = re.findall(r"^\| `loralab (\w+)` \|", (ROOT / "docs" / "cli.md").read_text(), re.M)
    assert sorted(table) == sorted(sub.choices)
