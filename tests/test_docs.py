"""The user guide: README.md stays short, its quick-start commands stay what CI runs, and every relative link or
repository path in README.md and docs/ points to something in the repository.

Pure text checks (no jax): they fail when a file the docs name is moved or deleted without updating them.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
MAX_README_LINES = 220

# The two quick-start commands, character for character: .ci/run runs the test command (checked below) and
# tests/test_demo.py the main command shrunk by flags; change them together.
MAIN_COMMAND = "pip install -e . && python -m fmbpo_jax.main"
TEST_COMMAND = 'pip install "torch==2.13.0" && pip install -e ".[dev,convert]" && python -m pytest -q -n 2 --dist loadfile tests'

# Top-level folders of the repository: a `code span` starting with one of these names a path that must exist.
REPO_DIRS = ("fmbpo_jax/", "convert_ckpt/", "configs/", "launch/", "tests/", "docs/", ".ci/")
# Citations of files that live outside the repository (background material a reader cannot open).
FOREIGN_CITATION = re.compile(r"\bspec/|\bALGORITHM\.md|\bDESIGN\.md|\bENVIRONMENTS\.md|/work/|\b(?i:issue) \d+")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def doc_files() -> list[Path]:
    return [README] + sorted((REPO / "docs").rglob("*.md"))


def _strip_fenced_code(text: str) -> str:
    """Text outside ``` fences (commands in code blocks are examples, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _strip_fenced_code(path.read_text(encoding="utf-8"))
    heads = {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}
    return heads | set(HTML_ANCHOR.findall(text))


def relative_links(path: Path) -> list[str]:
    text = _strip_fenced_code(path.read_text(encoding="utf-8"))
    targets = LINK.findall(text) + IMAGE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # skip http:, https:, mailto:


def broken_links(path: Path) -> list[str]:
    """Relative links of one Markdown file whose file (or #anchor in a Markdown file) does not exist."""
    bad = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading or anchor #{anchor} in {_rel(dest)})")
    return bad


def missing_repo_paths(path: Path) -> list[str]:
    """`code spans` naming a repository path (e.g. `fmbpo_jax/pwm.py`, `tests/test_x.py::test_y`) that is absent."""
    text = path.read_text(encoding="utf-8")
    bad = []
    for span in CODE_SPAN.findall(text):
        token = span.split("::")[0].strip()
        if " " in token or not token.startswith(REPO_DIRS) or re.search(r"[{}<>*]|NN", token):
            continue
        if not (REPO / token).exists():
            bad.append(token)
    return bad


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(REPO)}: broken relative links"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_exist(path):
    assert missing_repo_paths(path) == [], f"{path.relative_to(REPO)} names paths that are not in the repository"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_citations_of_files_outside_the_repository(path):
    hits = [m.group(0) for m in FOREIGN_CITATION.finditer(path.read_text(encoding="utf-8"))]
    assert hits == [], f"{path.relative_to(REPO)} cites material that is not in the repository: {hits}"


def test_readme_is_a_short_guide():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move details to docs/"


def test_readme_links_every_docs_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md")}
    assert pages - linked == set(), f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def _quick_start_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Quick start\s*$(.*?)^## ", text, flags=re.S | re.M)
    assert m, "README.md has no '## Quick start' section followed by another section"
    return [line.strip() for line in m.group(1).splitlines()]


def test_readme_quick_start_commands_unchanged():
    lines = _quick_start_lines()
    assert MAIN_COMMAND in lines, f"README quick start lost the main command {MAIN_COMMAND!r}"
    assert TEST_COMMAND in lines, f"README quick start lost the test command {TEST_COMMAND!r}"


def _normalised(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pip"]:
        words = ["pip"] + words[3:]
    return words


def ci_commands() -> list[list[str]]:
    """The install and test commands .ci/run executes, in order (`python -m pip` written as `pip`)."""
    out = []
    for line in CI_RUN.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if re.match(r"^(python -m pip|pip|python -m pytest|pytest)\b", line):
            out.append(_normalised(line))
    return out


def test_ci_runs_exactly_the_readme_test_command():
    readme_steps = [_normalised(step.strip()) for step in TEST_COMMAND.split("&&")]
    assert ci_commands() == readme_steps, (
        f".ci/run must run exactly the README's test command {TEST_COMMAND!r}; it runs {ci_commands()}")


def test_checks_catch_what_they_guard(tmp_path):
    """The checkers themselves flag a missing file, a missing anchor and an absent repository path."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](nowhere.md) [bad anchor](#nope) `fmbpo_jax/not_here.py`\n")
    assert broken_links(page) == ["nowhere.md (no such file)", f"#nope (no heading or anchor #nope in {page.resolve()})"]
    assert missing_repo_paths(page) == ["fmbpo_jax/not_here.py"]
    cited = FOREIGN_CITATION.findall("see spec/ALGORITHM.md and Issue 9; our docs/design.md is fine")
    assert cited == ["spec/", "ALGORITHM.md", "Issue 9"]
    assert _slug("Memory at 48M x 30 tasks") == "memory-at-48m-x-30-tasks"
    assert _slug("The joint variant's learning rate") == "the-joint-variants-learning-rate"
