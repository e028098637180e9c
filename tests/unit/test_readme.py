"""The README a new user reads: short, with a table of contents that matches its sections,
links (README and docs/) that lead somewhere, the exact commands CI runs, and only commands
the CLI has. Generated tables live in docs/ and have their own sync tests
(tests/unit/test_touch_point_list.py, tests/sglang/in_venv/checks_touch_points.py)."""

import re
import shlex
from pathlib import Path

import pytest

from mla_plugin.cli import build_parser
from tests.paths import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
CI_COMMANDS = ("bash scripts/setup.sh", ".venv/bin/python -m pytest -q -rs tests")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _headings(path: Path) -> list[str]:
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            lines.append(line)
    return lines


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    assert max(len(line) for line in lines if not line.startswith("|")) <= 120


def test_table_of_contents_matches_the_sections():
    text = README.read_text()
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[(.+?)\]\(#(.+?)\)$", contents, re.M)
    sections = [h[3:] for h in _headings(README) if h.startswith("## ") and h != "## Contents"]
    assert [title for title, _ in listed] == sections
    assert all(anchor == _anchor(title) for title, anchor in listed), listed


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page):
    broken = []
    for link in _links(page):
        if re.match(r"https?://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif anchor and path.suffix == ".md" and anchor not in {_anchor(h.lstrip("#")) for h in _headings(path)}:
            broken.append(link)
    assert broken == [], broken


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        for link in _links(page):
            target = link.partition("#")[0]
            if target.endswith(".md") and not re.match(r"https?://", target):
                path = (page.parent / target).resolve()
                if path.exists() and path not in reached:
                    reached.add(path)
                    todo.append(path)
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {(DOCS / "PYPI.md").resolve()}  # the wheel's page
    assert pages - reached == set(), sorted(p.name for p in pages - reached)


def test_readme_shows_the_commands_ci_runs():
    readme = README.read_text()
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == list(CI_COMMANDS)
    for command in CI_COMMANDS:
        assert re.search(rf"^    {re.escape(command)}( |$)", readme, re.M), command


def test_readme_says_what_a_gpu_user_needs():
    text = README.read_text()
    assert "not on PyPI" in text
    assert 'pip install "mla_plugin[vllm] @ git+' in text
    sglang_section = text.split("## Usage: SGLang", 1)[1].split("\n## ", 1)[0]
    # SGLang graph mode is served (issue 23): no instruction to turn it off
    assert "disable-cuda-graph" not in text and "disable_cuda_graph" not in sglang_section
    box = text.split("## Status and versions", 1)[1].split("\n## ", 1)[0]
    assert "Not verified on CUDA: anything inside vLLM or SGLang on a GPU" in box


def _subcommands(parser) -> dict:
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = _subcommands(sub)
    return found


def test_readme_commands_exist():
    tree = _subcommands(build_parser())
    for line in README.read_text().splitlines():
        words = line.strip().split("#")[0].strip()
        if not words.startswith("mla-plugin "):
            continue
        argv = shlex.split(words.rstrip("\\"))[1:]
        node = tree
        for word in argv:
            if word.startswith("-") or word.isupper() or not node:
                break
            assert word in node, f"README shows `{line.strip()}`, but `mla-plugin` has no {word!r}"
            node = node[word]
