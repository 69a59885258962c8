"""Every output minidp writes goes through :func:`safe_output`: never onto or around an input or a
user's file, all or nothing (written beside, then renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import h5py
import yaml

from minidp.checks import InputError

# ---------------------------------------------------------------------------
# Writing outputs: never onto a user's files, all of it or nothing
# ---------------------------------------------------------------------------

# A folder minidp writes carries this file, naming its kind: only such a folder
# (holding nothing minidp would not have written) may be replaced, and only with
# overwrite=True.
MARKER = ".minidp-output"

# kind -> the paths (relative, glob patterns) a minidp output folder of that kind holds;
# FILE_KINDS are single files, recognised by their content (_is_previous_output).
# A deepmd/npy output holds one system, or (a -s of several systems) one system per sub-folder.
FOLDER_KINDS = {
    "deepmd/npy": ("type.raw", "type_map.raw", "nopbc", "set.[0-9][0-9][0-9]",
                   *(f"set.[0-9][0-9][0-9]/{k}.npy"
                     for k in ("coord", "box", "energy", "force", "virial", "real_atom_types"))),
    "descriptors": ("*.npy",),
    "plots": ("parity-*.png",),
}
# "any": scripts' own results (validation, benchmarks), replaced whatever they hold
FILE_KINDS = ("model", "png", "npy", "lcurve", "checkpoint", "model_devi", "lammps_log", "any")


def _matches(rel: Path, patterns) -> bool:
    """rel is one of the glob patterns, part for part."""
    return any(rel.match(a) and len(rel.parts) == len(Path(a).parts) for a in patterns)


def _is_previous_output(target: Path, kind: str) -> bool:
    """Does the existing ``target`` hold nothing but a previous minidp output of this kind?"""
    if kind in FOLDER_KINDS:
        if not target.is_dir() or target.is_symlink() or not (target / MARKER).is_file():
            return False
        if (target / MARKER).read_text().strip() != kind:
            return False
        allowed = FOLDER_KINDS[kind]
        for p in target.rglob("*"):
            rel = p.relative_to(target)
            # a system in a sub-folder (deepmd/npy of several systems): the folder, and a system's files in it
            nested = kind == "deepmd/npy" and (target / rel.parts[0] / "type.raw").is_file() and (
                len(rel.parts) == 1 or _matches(Path(*rel.parts[1:]), allowed))
            if p.is_symlink() or not (rel.as_posix() == MARKER or _matches(rel, allowed) or nested):
                return False
        return True
    if not target.is_file() or target.is_symlink():
        return False
    head = target.read_bytes()[:4096]
    if kind == "png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if kind == "npy":
        return head.startswith(b"\x93NUMPY")
    if kind == "lcurve":
        return head.startswith(b"# step")
    if kind == "lammps_log":  # LAMMPS's log and screen files open with its version line
        return head.startswith(b"LAMMPS (")
    if kind == "model_devi":  # dp model-devi: '# <system>' then '# step max_devi_v ...'; the LAMMPS plugin: the latter
        return any(line.startswith(b"#") and line[1:].split()[:2] == [b"step", b"max_devi_v"]
                   for line in head.split(b"\n")[:2])
    if kind == "checkpoint":  # the .npz half of a training checkpoint
        if not zipfile.is_zipfile(target):
            return False
        with zipfile.ZipFile(target) as z:
            return "adam_t.npy" in z.namelist()
    if kind == "model":
        return _written_by_minidp(target)
    return kind == "any"


def _written_by_minidp(target: Path) -> bool:
    """Whether a model file says ``"software": "minidp"`` at its top level (.dp, .json, .yaml/.yml).

    Only that key is read, not the model: the writer must not depend on the model reader (which
    writes through it), and a file that is not a readable model of this kind is simply not ours.
    """
    suffix = target.suffix.lower()
    try:
        if suffix == ".dp":  # deepmd-kit's HDF5: the dict as JSON in the 'json' attribute
            with h5py.File(target, "r") as f:
                top = json.loads(f.attrs["json"])
        elif suffix == ".json":
            top = json.loads(target.read_text())
        elif suffix in (".yaml", ".yml"):
            top = yaml.safe_load(target.read_text())
        else:
            return False
    except (OSError, KeyError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(top, dict) and top.get("software") == "minidp"


def _overlap(a: Path, b: Path) -> bool:
    """a is b, lies inside b, or contains b."""
    return a == b or a in b.parents or b in a.parents


def check_output(target, kind: str, inputs=(), overwrite: bool = False) -> Path:
    """The absolute path of ``target`` once it is known to be safe to write; ValueError otherwise.

    Refused: an output that is, contains or lies inside one of ``inputs`` or the
    current folder; one under an existing file; one that exists and is not
    empty, unless ``overwrite`` is given and it holds only a previous minidp
    output of the same ``kind`` (FOLDER_KINDS, FILE_KINDS).
    """
    if kind not in FOLDER_KINDS and kind not in FILE_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if not str(target).strip():
        raise InputError("output path is empty; expected a file or folder name")
    path = Path(os.path.abspath(target))
    real = path.resolve()
    for given in inputs:
        if given is not None and _overlap(real, Path(given).resolve()):
            raise InputError(f"output {target} overlaps the input {given}; write outputs elsewhere")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise InputError(f"output {target} is or contains the current folder; give a new name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output {target}: cannot write into {parent} (permission denied)")
    if os.path.lexists(path):
        empty = (path.is_dir() and not any(path.iterdir())) or (path.is_file() and path.stat().st_size == 0)
        if kind == "any":
            pass
        elif kind in FOLDER_KINDS and path.is_file():
            raise InputError(f"output {target} is an existing file; expected a new folder")
        elif kind in FILE_KINDS and path.is_dir():
            raise InputError(f"output {target} is an existing folder; expected a new file")
        if not empty and not overwrite:
            raise InputError(f"output {target} exists and is not empty; give a new name "
                             "(or --overwrite to replace a previous minidp output)")
        if not empty and not _is_previous_output(path, kind):
            raise InputError(f"output {target} exists and holds more than a previous minidp {kind} output; "
                             "refusing to replace it")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(f"output {target}: cannot write into {path.parent} (permission denied)")
    return path


@contextlib.contextmanager
def safe_output(target, kind: str, inputs=(), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` only if the block succeeds.

    ``target`` is checked first (:func:`check_output`). A folder kind gets its
    marker file. An existing target is renamed away, the new output moved in
    (os.replace), and the old one deleted only after that succeeded; on any
    failure (or Ctrl-C) the temporary output is removed and the old one stays.
    """
    path = check_output(target, kind, inputs, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = scratch / path.name
    try:
        yield tmp
        if kind in FOLDER_KINDS:
            tmp.mkdir(exist_ok=True)
            (tmp / MARKER).write_text(kind + "\n")
        if not os.path.lexists(tmp):
            raise RuntimeError(f"nothing was written for {target}")
        old = scratch / f"{path.name}.old"
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target) -> Iterator[Path]:
    """safe_output(target, "any", overwrite=True): for scripts' own results (validation, benchmarks) only."""
    with safe_output(target, "any", overwrite=True) as tmp:
        yield tmp
