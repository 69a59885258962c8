"""Argument checks shared by the public functions (one wording everywhere)."""

from __future__ import annotations

import numpy as np


def real_array(name: str, value) -> np.ndarray:
    """value as a float64 array; TypeError unless it holds real numbers, ValueError on NaN/inf."""
    # (any shape)
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
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
        raise TypeError(f"atom_types must be integers, got dtype {types.dtype}")
    want = "natoms" if natoms is None else natoms
    if types.ndim != 1 or (natoms is not None and types.shape != (natoms,)):
        raise ValueError(f"atom_types must have shape ({want},), one type per atom, got {types.shape}")
    if types.size and (types.min() < 0 or types.max() >= ntypes):
        bad = types[(types < 0) | (types >= ntypes)][0]
        raise ValueError(f"atom type {bad} is outside the model's types 0..{ntypes - 1} "
                         f"(got types {sorted(set(types.tolist()))})")
    return types.astype(np.int64)
