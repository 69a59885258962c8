"""The command reference's ``--help`` texts, generated from minidp's own parser (an MkDocs hook).

A line ``<!-- help: minidp eval -->`` in a page becomes a code block holding what
``minidp eval --help`` prints, so the reference cannot drift from the parser. A marker naming no
command, and a subcommand that no marker shows, are warnings, which fail ``mkdocs build --strict``.

mkdocs.yml loads it (``hooks: [docs/_ext/cli_help.py]``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re

from minidp.cli import build_parser

log = logging.getLogger("mkdocs.hooks.cli_help")
MARKER = re.compile(r"^<!-- help: minidp(?P<words>(?: [\w-]+)*) -->$", re.MULTILINE)
# argparse wraps its help to the terminal's width: fix it so that the page does not depend on it
WIDTH = "100"


def subcommands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under ``parser``: ("eval",), ..., ("tutorial",), ("tutorial", "cos"), ..."""
    found = []
    # argparse offers no public way to list subparsers: read them off the parser's actions
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*words, name), *subcommands(sub, (*words, name))]
    return found


def help_text(words: tuple[str, ...]) -> str:
    """What ``minidp WORDS... --help`` prints, at a fixed width."""
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([*words, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    markers = {tuple(m.group("words").split()) for m in MARKER.finditer(markdown)}
    if not markers:
        return markdown
    known = set(subcommands(build_parser()))
    for words in sorted(markers - known - {()}):
        log.warning("%s: '<!-- help: minidp %s -->' names no minidp command", page.file.src_uri, " ".join(words))
    for words in sorted(known - markers):
        log.warning("%s: no '<!-- help: minidp %s -->' for that command", page.file.src_uri, " ".join(words))

    def block(match: re.Match) -> str:
        return "```text\n" + help_text(tuple(match.group("words").split())) + "\n```"

    return MARKER.sub(block, markdown)
