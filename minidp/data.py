"""Systems in, labelled systems out: dpdata glue and atomic file writing.

minidp reads frames through dpdata (deepmd/npy, deepmd/hdf5, VASP, LAMMPS,
extxyz, ...) and writes results as deepmd/npy systems. Every write goes to a
temporary name beside the target and is moved into place only when complete,
so a failed run never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def guess_format(path: Path) -> str:
    """dpdata's format name for a path: deepmd/npy for a folder with type.raw, deepmd/hdf5 for .h5/.hdf5."""
    if path.is_dir() and (path / "type.raw").is_file():
        return "deepmd/npy"
    if path.suffix.lower() in (".h5", ".hdf5"):
        return "deepmd/hdf5"
    return "auto"


def read_system(path, fmt: str | None = None, type_map: list[str] | None = None):
    """Read frames with dpdata; labelled (energies/forces) when the source has labels.

    ``type_map`` names the types of formats that only number them (a LAMMPS
    data file's types 1, 2, ... become type_map[0], type_map[1], ...).
    """
    import dpdata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = fmt or guess_format(path)
    try:
        try:
            return dpdata.LabeledSystem(str(path), fmt=fmt, type_map=type_map)
        except Exception:  # not labelled (or not readable as such): read the coordinates only
            return dpdata.System(str(path), fmt=fmt, type_map=type_map)
    except Exception as err:
        raise ValueError(f"cannot read system {path} as {fmt!r}: {type(err).__name__}: {err}") from None


def model_types(atom_names: list[str], atom_types: np.ndarray, type_map: list[str]) -> np.ndarray:
    """Map a system's types (indices into its atom_names) onto the model's type_map."""
    missing = [name for name in atom_names if name not in type_map]
    used = {atom_names[t] for t in np.unique(atom_types)}
    if used & set(missing):
        raise ValueError(f"element(s) {sorted(used & set(missing))} are not in the model's type map {type_map}")
    index = np.array([type_map.index(n) if n in type_map else -1 for n in atom_names])
    return index[np.asarray(atom_types)]


@contextlib.contextmanager
def atomic_path(target) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
