"""The sources a student reads are clean text: no control characters in any tracked .py, .md or .ipynb
file, and none in any docstring once Python has read it (a "\\bar" or "\\top" in a non-raw string becomes
a backspace or a tab, and the formula renders as garbage)."""

from __future__ import annotations

import ast
import re
import subprocess

import pytest

from tests.conftest import ROOT

# every C0 control character but the newline, and DEL
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def tracked(*suffixes: str) -> list:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.splitlines() if p.endswith(suffixes) and (ROOT / p).is_file()]


def test_no_control_characters_in_sources():
    bad = []
    for path in tracked(".py", ".md", ".ipynb"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if CONTROL.search(line.rstrip("\r")):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:60]!r}")
    assert not bad, "control characters:\n" + "\n".join(bad)


def test_no_control_characters_in_docstrings():
    bad = []
    for path in tracked(".py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and CONTROL.search(doc):
                    bad.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)} {getattr(node, 'name', '')}")
    assert not bad, "docstrings with control characters (use a raw string r\"\"\"...\"\"\"):\n" + "\n".join(bad)
