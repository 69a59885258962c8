"""Argument checks shared by the public functions (one wording everywhere)."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Bad input from a user (a file, an option, a value): the command line prints it on one line, exit 2."""


class InputTypeError(InputError, TypeError):
    """A value of the wrong type: a TypeError to Python callers, one line on the command line."""


def real_array(name: str, value) -> np.ndarray:
    """value as a float64 array; TypeError unless it holds real numbers, ValueError on NaN/inf."""
    # (any shape)
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputTypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    # float32 data (the water example's coordinates) is widened before any
    # difference is taken: r_j - r_i in float32 keeps only ~7 digits
    arr = arr.astype(np.float64)
    # (nbad, arr.ndim)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has a non-finite entry {arr[tuple(bad[0])]} at index {tuple(bad[0].tolist())}; "
                         "expected finite numbers")
    return arr


def is_positive_int(n) -> bool:
    """A positive integer; bools are ints to Python, but never a size or a count."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1


def positive_int(name: str, n) -> int:
    """n as an int, or ValueError naming it: '<name> must be a positive integer, got <n>'."""
    if not is_positive_int(n):
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)
