"""The README is a front page and a map: its links resolve, every docs page is on the map and opens with its
command, and the file map names every top-level file the repository tracks."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in target]


def test_readme_is_a_front_page_of_at_most_300_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_link_resolves(page):
    missing = [target for target in links(page) if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_every_docs_page_is_on_the_readme_map_and_opens_with_its_command():
    linked = {(REPO / target).resolve() for target in links(README)}
    for page in sorted(DOCS.glob("*.md")):
        assert page.resolve() in linked, f"README does not link {page.relative_to(REPO)}"
        head = page.read_text(encoding="utf-8").split("\n## ")[0]  # the title and what comes before a section
        assert head.startswith("# ") and "```" in head, f"{page.name} does not open with its command"


def test_file_map_names_every_file_the_repository_tracks():
    """Each tracked file is named, or a folder holding it is (`tests/`, `docs/`): one line per module."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    file_map = README.read_text(encoding="utf-8").split("## File map", 1)[1]
    named = set(re.findall(r"^\| `([^`]+)`", file_map, flags=re.MULTILINE))
    unnamed = [
        path
        for path in tracked
        if path not in named and not any(name.endswith("/") and path.startswith(name) for name in named)
    ]
    unnamed = [path for path in unnamed if not path.endswith("__init__.py")]
    assert not unnamed, f"the README's file map misses {unnamed}"
