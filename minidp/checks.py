"""Argument checks shared by the public functions (one wording everywhere)."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """Bad input from a user (a file, an option, a value): the command line prints it on one line, exit 2."""


class InputTypeError(InputError, TypeError):
    """A value of the wrong type: a TypeError to Python callers, one line on the command line."""


class FrameError(InputError):
    """A problem with one frame. ``message`` holds "{frame}" where the frame's number goes, so that a
    caller that passed a slice of its frames (a chunk, a block) can renumber it: errors name frames
    by their index in the whole call."""

    def __init__(self, frame: int, message: str):
        self.frame, self.message = int(frame), message
        super().__init__(message.replace("{frame}", str(self.frame)))

    def shifted(self, offset: int) -> "FrameError":
        """The same error, the frame counted from ``offset`` frames earlier."""
        return FrameError(self.frame + offset, self.message)


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


def finite_frames(name: str, value) -> np.ndarray:
    """value (nf, ...) as float64, frame by frame; FrameError at the first frame holding a NaN or an
    inf: '<name>: frame <f> holds nan; expected finite numbers' (name: the file it was read from)."""
    # (nf, ...)
    arr = np.asarray(value, dtype=np.float64)
    # (nf, values per frame)
    flat = arr.reshape(len(arr), -1)
    # (nbad, 2)
    bad = np.argwhere(~np.isfinite(flat))
    if bad.size:
        f, k = bad[0]
        entry = f" (entry {k} of the frame)" if flat.shape[1] > 1 else ""
        raise FrameError(f, f"{name}: frame {{frame}} holds {flat[f, k]}{entry}; expected finite numbers")
    return arr


def is_positive_int(n) -> bool:
    """A positive integer; bools are ints to Python, but never a size or a count."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1


def positive_int(name: str, n) -> int:
    """n as an int, or ValueError naming it: '<name> must be a positive integer, got <n>'."""
    if not is_positive_int(n):
        raise InputError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


# The ways minidp computes a model (see minidp.se_e2_a): the plain reference
# path, and the fast path in NumPy or with its loops compiled by Numba.
BACKENDS = ("reference", "numpy", "numba")


def check_backend(backend) -> str:
    """backend, or ValueError naming it: one of BACKENDS."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def atom_types(value, ntypes: int, natoms: int | None = None) -> np.ndarray:
    """value as an int64 array (natoms,) of types in 0..ntypes-1, or TypeError/ValueError naming the problem.

    The one check of atom types, for DeepPot and build_neighbor_list alike.
    """
    # (natoms,)
    types = np.asarray(value)
    if types.dtype == bool or not np.issubdtype(types.dtype, np.integer):
        raise InputTypeError(f"atom_types must be integers, got dtype {types.dtype}")
    want = "natoms" if natoms is None else natoms
    if types.ndim != 1 or (natoms is not None and types.shape != (natoms,)):
        raise ValueError(f"atom_types must have shape ({want},), one type per atom, got {types.shape}")
    if types.size and (types.min() < 0 or types.max() >= ntypes):
        bad = types[(types < 0) | (types >= ntypes)][0]
        raise ValueError(f"atom type {bad} is outside the model's types 0..{ntypes - 1} "
                         f"(got types {sorted(set(types.tolist()))})")
    return types.astype(np.int64)


# ---------------------------------------------------------------------------
# Values read from files (models, training inputs): no coercion, the key named
# ---------------------------------------------------------------------------


def read_text(path, what: str) -> str:
    """The text of a user's input file, or one line naming it: missing, a folder, or not text (UTF-8).

    ``what`` says what the file is for ("input deck", "initial configuration"), for the message.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not a text file: byte 0x{raw[err.start]:02x} at offset {err.start} "
                         "is not UTF-8") from None


def short(value) -> str:
    """repr(value), cut to 40 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(name: str, value, lo: int = 1) -> int:
    """An integer >= lo; a bool, a float or a string such as "3" is refused."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InputTypeError(f"{name}: expected an integer, got {type(value).__name__} {short(value)}")
    if value < lo:
        raise InputError(f"{name}: {value} is below {lo}")
    return int(value)


def number(name: str, value, lo: float | None = None, positive: bool = False) -> float:
    """A finite real number (>= lo, > 0 if positive); a bool or a string such as "six" is refused."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise InputTypeError(f"{name}: expected a number, got {type(value).__name__} {short(value)}")
    if not np.isfinite(value):
        raise InputError(f"{name}: {value} is not finite")
    if (lo is not None and value < lo) or (positive and value <= 0):
        raise InputError(f"{name}: {value} is {'not positive' if positive else f'below {lo}'}")
    return float(value)


def boolean(name: str, value) -> bool:
    """True or False; the string "false" is refused (it would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name}: expected true or false, got {type(value).__name__} {short(value)}")
    return bool(value)


def integers(name: str, value, n: int | None = None, what: str = "one per type") -> tuple[int, ...]:
    """A non-empty list of positive integers (of length n if given); a 1-D array counts as a list."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise InputTypeError(f"{name}: expected a list of positive integers, got {type(value).__name__} {short(value)}")
    if n is not None and len(value) != n:
        raise InputError(f"{name}: {len(value)} entries {list(value)}, expected {n} ({what})")
    return tuple(integer(f"{name}[{k}]", v) for k, v in enumerate(value))


def names(name: str, value) -> list[str]:
    """A non-empty list of distinct non-empty strings (a type map)."""
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise InputTypeError(f"{name}: expected a list of element names, got {short(value)}")
    for t in value:
        if value.count(t) > 1:
            raise InputError(f"{name}: {t!r} appears {value.count(t)} times")
    return list(value)


def file_path(name: str, value, expected: str = "a path") -> Path:
    """value as a Path, if it is a non-empty str or os.PathLike naming text; else InputTypeError
    '<name> must be <expected>, got <type> <value>' (DeepPot(123) said only 'expected str, bytes...')."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise InputTypeError(f"{name} must be {expected}, got {type(value).__name__} {short(value)}")
    if not text:
        raise InputError(f"{name} must be {expected}, got an empty path")
    return Path(text)


def validated(where: str, cls, **kwargs):
    """cls(**kwargs) for a configuration dataclass that checks its own ranges (SeAConfig): its
    ValueError comes back with ``where`` (the file and key path) in front; the rules stay in cls."""
    try:
        return cls(**kwargs)
    except InputTypeError as err:  # a value of the wrong type, named by the rule (a plain TypeError is a bug)
        raise InputTypeError(f"{where}: {err}") from None
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None
