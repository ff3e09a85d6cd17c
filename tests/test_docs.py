"""The docs name what the code has: every registered optimizer has its row in docs/optimizers.md, and
every page the README links to exists."""

from __future__ import annotations

import re
from pathlib import Path

from optim.builder import load_all

REPO = Path(__file__).resolve().parents[1]


def test_every_optimizer_has_a_row_in_the_optimizer_table():
    text = (REPO / "docs" / "optimizers.md").read_text()
    table = text[text.index("| `optimizer=` | source |") :].split("\n\n")[0]  # the first table only
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.MULTILINE)
    missing = sorted(set(load_all()) - set(rows))
    assert not missing, f"docs/optimizers.md's table has no row for {missing}"


def test_the_readme_links_to_pages_that_exist():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+\.md)", readme)
    assert {"ARCHITECTURE.md", "docs/running.md"} <= set(links)
    assert not [link for link in links if not (REPO / link).exists()]
    for page in (REPO / "docs").glob("*.md"):  # and the pages' own relative links and images
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"
