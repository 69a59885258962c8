"""Sphinx's roles in minidp's docstrings, rewritten for mkdocstrings (a griffe extension).

minidp's docstrings are written to be read in the source, with Sphinx's markup for what must render:
``:func:`name```, ``:class:``, ``:meth:``, ``:mod:`` for cross-references, ``:math:`x``` and
``.. math::`` blocks for formulas. mkdocstrings renders docstrings as Markdown, where none of these
mean anything. This extension rewrites each docstring once, when griffe loads its object:

- a cross-reference becomes an autorefs link, ``[`name`][name]``; the handler's ``scoped_crossrefs``
  resolves a short name in the scope of the docstring's object, as Sphinx does, and a name that
  resolves nowhere fails the strict build (``~a.b.c`` shows ``c``, as in Sphinx);
- ``:math:`x``` becomes ``$x$``, and each equation of a ``.. math::`` directive a ``$$ ... $$`` block at
  the directive's indentation, which pymdownx.arithmatex hands to MathJax;
- the body of a top-level list item, indented as reStructuredText indents it (under the item's text,
  3 columns for ``1. ``), is indented by 4, as Python-Markdown needs to keep a formula block or a
  second paragraph inside the item;
- in a numpy-style ``Parameters`` section, ``name : what it is`` is a description, not a type (minidp's
  types are in the annotations): it becomes ``name`` with the text indented below it, as the numpy
  parser reads a description.

mkdocs.yml loads it by path (``extensions: [docs/_ext/sphinx_roles.py:SphinxRoles]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`~minidp.model.energy_forces`, :class:`DeepPot`, :meth:`DeepPot.iter_eval`, :mod:`minidp.nn`
XREF = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
# ".. math::" alone on its line (the formula indented below), or with the formula after it
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ ]*)\.\. math::[ ]*(?P<inline>.*)$")
LIST_ITEM = re.compile(r"^(?:\d+\.|[-*+]) +")
# a numpy-style section title and its underline, then "name : description" lines
SECTION = re.compile(r"^(?P<title>[A-Z][a-z]+)\n-+\n(?P<body>(?:.+\n?)+)", re.MULTILINE)
PARAMETER = re.compile(r"^(?P<name>\*{0,2}\w+) : (?P<text>.*)$", re.MULTILINE)


def _xref(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    return f"[`{title}`][{target}]"


def _inline_math(match: re.Match) -> str:
    return f"${match.group(1).strip()}$"


def _math_block(body: list[str], indent: str) -> list[str]:
    """The lines of a ``.. math::`` body as ``$$`` blocks, one per equation (blank-line separated)."""
    depth = min((len(line) - len(line.lstrip(" ")) for line in body if line.strip()), default=0)
    out: list[str] = []
    equation: list[str] = []
    for line in [*body, ""]:
        if line.strip():
            equation.append(indent + line[depth:])
        elif equation:
            out += [indent + "$$", *equation, indent + "$$", ""]
            equation = []
    return out


def _list_bodies(lines: list[str]) -> list[str]:
    """Top-level list items' bodies moved from the reStructuredText indent to Python-Markdown's 4.

    An item whose body holds a blank line (a formula block, a second paragraph) is followed by a
    blank line too: without it, Python-Markdown reads the next item as part of that body.
    """
    out: list[str] = []
    width, loose = 0, False
    for line in lines:
        depth = len(line) - len(line.lstrip(" "))
        item = LIST_ITEM.match(line)
        if item:
            if loose and out and out[-1].strip():
                out.append("")
            width, loose = item.end(), False
        elif not line.strip():
            loose = loose or bool(width)
        elif depth < width:
            width, loose = 0, False
        elif width:
            line = " " * (depth - width + 4) + line.lstrip(" ")
        out.append(line)
    return out


def _described(match: re.Match) -> str:
    body = PARAMETER.sub(r"\g<name>\n    \g<text>", match.group("body"))
    return f"{match.group('title')}\n{'-' * len(match.group('title'))}\n{body}"


def _math_directives(lines: list[str]) -> list[str]:
    """Each ``.. math::`` directive and its body (the lines indented deeper than it) as ``$$`` blocks."""
    out: list[str] = []
    k = 0
    while k < len(lines):
        directive = MATH_DIRECTIVE.match(lines[k])
        k += 1
        if directive is None:
            out.append(lines[k - 1])
            continue
        indent, start = directive.group("indent"), k
        while k < len(lines) and (not lines[k].strip() or lines[k].startswith(indent + " ")):
            k += 1
        body = lines[start:k]
        while body and not body[-1].strip():
            body.pop()
        if directive.group("inline").strip():
            body = [indent + "    " + directive.group("inline").strip(), "", *body]
        out += _math_block(body, indent)
    return out


def rewrite(text: str) -> str:
    """A docstring with its Sphinx roles and math directives in mkdocstrings' Markdown."""
    text = "\n".join(_list_bodies(_math_directives(text.splitlines())))
    text = SECTION.sub(_described, text)
    text = INLINE_MATH.sub(_inline_math, text)
    return XREF.sub(_xref, text)


class SphinxRoles(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rewrite`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
