"""The ``minidp`` command line.

Each subcommand is a small function ``_cmd_<name>(args) -> int``; ``main``
turns the known errors (bad input, missing files) into one line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _add_tutorial(sub) -> None:
    p = sub.add_parser("tutorial", help="re-run the experiments of the tutorial minidp grew from")
    tsub = p.add_subparsers(dest="experiment", required=True)
    # --- owned by the tutorial module: see minidp/tutorial.py ---
    from minidp import tutorial

    tutorial.add_subcommands(tsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tutorial(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"minidp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
