"""Sphinx's roles in minidp's docstrings, rewritten for mkdocstrings (a griffe extension).

minidp's docstrings are written to be read in the source, with Sphinx's markup for what must render:
``:func:`name```, ``:class:``, ``:meth:``, ``:mod:`` for cross-references, ``:math:`x``` and
``.. math::`` blocks for formulas. mkdocstrings renders docstrings as Markdown, where none of these
mean anything. This extension rewrites each docstring once, when griffe loads its object:

- a cross-reference becomes an autorefs link, ``[`name`][name]``; the handler's ``scoped_crossrefs``
  resolves a short name in the scope of the docstring's object, as Sphinx does, and a name that
  resolves nowhere fails the strict build (``~a.b.c`` shows ``c``, as in Sphinx);
- ``:math:`x``` becomes ``$x$`` and each equation of a ``.. math::`` block a ``$$ ... $$`` block at the
  directive's indentation, which pymdownx.arithmatex hands to MathJax.

mkdocs.yml loads it by path (``extensions: [docs/_ext/sphinx_roles.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`~minidp.model.energy_forces`, :class:`DeepPot`, :meth:`DeepPot.iter_eval`, :mod:`minidp.nn`
XREF = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ ]*)\.\. math::[ ]*$")
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


def _described(match: re.Match) -> str:
    body = PARAMETER.sub(r"\g<name>\n    \g<text>", match.group("body"))
    return f"{match.group('title')}\n{'-' * len(match.group('title'))}\n{body}"


def rewrite(text: str) -> str:
    """A docstring with its Sphinx roles and math directives in mkdocstrings' Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    k = 0
    while k < len(lines):
        directive = MATH_DIRECTIVE.match(lines[k])
        if directive is None:
            out.append(lines[k])
            k += 1
            continue
        indent = directive.group("indent")
        k += 1
        # the body: every following line that is blank or indented deeper than the directive
        start = k
        while k < len(lines) and (not lines[k].strip() or lines[k].startswith(indent + " ")):
            k += 1
        end = k
        while end > start and not lines[end - 1].strip():
            end -= 1
        out += _math_block(lines[start:end], indent)
    text = "\n".join(out)
    text = SECTION.sub(_described, text)
    text = INLINE_MATH.sub(_inline_math, text)
    return XREF.sub(_xref, text)


class SphinxRoles(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rewrite`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
