"""The front door and the site: README.md stays short, whole and runnable, and the docs build strict.

``mkdocs build --strict`` fails on a broken link or anchor, a cross-reference that resolves nowhere
(in a page or a docstring), a notebook cell that raises, and a command the command reference lacks.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
API_DIRECTIVE = re.compile(r"^::: (minidp(?:\.\w+)*)\s*$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~)")
# a cell boundary of a Markdown table: a pipe not escaped by a backslash
CELL_PIPE = re.compile(r"(?<!\\)\|")


def markdown_tables(text: str) -> list[list[tuple[int, str]]]:
    """Each run of consecutive table lines (starting with '|'), outside fenced code, with line numbers."""
    tables, current, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            current.append((number, line.strip()))
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def table_defects(text: str) -> list[str]:
    """Where a table would not render: a run of rows without its header separator (a table cut by a
    blank line renders its tail as loose pipes), or a row whose cells differ in number from the header's."""
    defects = []
    for table in markdown_tables(text):
        (first, header), rows = table[0], table[1:]
        if not rows or not re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", rows[0][1]):
            defects.append(f"line {first}: table rows without a header and separator row")
            continue
        cells = len(CELL_PIPE.findall(header))
        defects += [f"line {n}: {len(CELL_PIPE.findall(row)) - 1} cells, the header has {cells - 1}"
                    for n, row in rows if len(CELL_PIPE.findall(row)) != cells]
    return defects


def test_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert table_defects(text) == []


@pytest.mark.parametrize("page", sorted(DOCS.glob("**/*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_tables_are_whole(page):
    assert table_defects(page.read_text()) == []


def test_table_check_sees_a_cut_table():
    cut = "| a | b |\n| --- | --- |\n| 1 | 2 |\n\n| 3 | 4 |\n| 5 | 6 | 7 |\n"
    assert table_defects(cut) == ["line 5: table rows without a header and separator row"]
    assert table_defects("| a | b |\n| --- | --- |\n| 1 \\| 2 | 3 |\n| 4 | 5 | 6 |\n") == [
        "line 4: 3 cells, the header has 2"]


def test_readme_shows_what_ci_runs():
    """.ci/run runs README's commands as they stand: each of its command lines is in README.md."""
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]
    assert commands, "no command found in .ci/run"
    readme = README.read_text()
    for command in commands:
        assert command in readme, f"README.md lacks .ci/run's command: {command}"


def test_readme_python_example_runs(monkeypatch, capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no Python example"
    monkeypatch.chdir(ROOT)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.strip()


def test_every_module_has_one_api_entry():
    """Each module of the package stands on exactly one API page (docs/api/*.md, ``::: minidp.x``)."""
    entries = [m for page in sorted((DOCS / "api").glob("*.md")) for m in API_DIRECTIVE.findall(page.read_text())]
    repeated = sorted({m for m in entries if entries.count(m) > 1})
    assert repeated == [], f"modules on more than one API page: {repeated}"
    found = list(pkgutil.walk_packages([str(ROOT / "minidp")], prefix="minidp."))
    public = [info for info in found if not any(part.startswith("_") for part in info.name.split("."))]
    missing = sorted({info.name for info in public if not info.ispkg} - set(entries))
    assert missing == [], f"add '::: <module>' for each to a page of docs/api/: {missing}"
    gone = sorted(set(entries) - {info.name for info in public})
    assert gone == [], f"docs/api/ documents modules that do not exist: {gone}"


def sphinx_roles():
    """docs/_ext/sphinx_roles.py, the griffe extension that turns the docstrings' Sphinx roles into Markdown."""
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "_ext" / "sphinx_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_roles_become_markdown():
    rewrite = sphinx_roles().rewrite
    assert rewrite("See :func:`~minidp.nn.net_forward` and :mod:`minidp.nn`.") == (
        "See [`net_forward`][minidp.nn.net_forward] and [`minidp.nn`][minidp.nn].")
    assert rewrite(r"with :math:`\mathbf r_{ij}` here") == r"with $\mathbf r_{ij}$ here"
    # a directive alone, its equations below (one block each), and one with its formula on its line
    assert rewrite(".. math::\n\n    a = b\n\n    c = d\n\nafter") == (
        "$$\na = b\n$$\n\n$$\nc = d\n$$\n\nafter")
    assert rewrite(".. math:: a = b\n") == "$$\na = b\n$$\n"


def test_docstring_list_items_keep_their_blocks():
    """A formula inside a numbered item stays in it, and the next item starts a new one."""
    text = "1. first,\n\n   .. math::\n\n       x = 1\n\n   then\n2. second\n   goes on"
    assert sphinx_roles().rewrite(text) == (
        "1. first,\n\n    $$\n    x = 1\n    $$\n\n    then\n\n2. second\n    goes on")


def test_docstring_parameters_are_descriptions():
    text = "Parameters\n----------\nbatch_size : centre atoms per chunk\n    more words\nworkers : threads"
    assert sphinx_roles().rewrite(text) == (
        "Parameters\n----------\nbatch_size\n    centre atoms per chunk\n    more words\nworkers\n    threads")


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """The whole site, as `mkdocs build --strict` makes it (about 20 s, the notebook's run included)."""
    for package in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter", "nbclient"):
        pytest.importorskip(package)
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # Material prints an advertisement for its successor on every build
           "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    problems = [line for line in done.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, "\n".join(problems) or done.stderr[-4000:]
    # the notebook ran at build time and shows its six figures
    notebook = (site / "reference-walkthrough" / "index.html").read_text()
    assert notebook.count("data:image/png;base64") >= 6
    # docstrings' formulas went to MathJax, and every page loads it
    api = (site / "api" / "core" / "index.html").read_text()
    assert 'class="arithmatex"' in api
    assert all("mathjax" in page.read_text().lower() for page in site.glob("**/index.html"))
    # the command reference holds the parser's own help (the build warns when a command lacks it)
    assert "usage: minidp eval" in (site / "cli" / "index.html").read_text()
