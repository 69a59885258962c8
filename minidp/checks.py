"""Argument checks shared by the public functions (one wording everywhere)."""

from __future__ import annotations

import numpy as np


def is_positive_int(n) -> bool:
    """A positive integer; bools are ints to Python, but never a size or a count."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1


def positive_int(name: str, n) -> int:
    """n as an int, or ValueError naming it: '<name> must be a positive integer, got <n>'."""
    if not is_positive_int(n):
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)
