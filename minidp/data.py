"""Systems in, labelled systems out: dpdata glue and the one safe writer of outputs.

minidp reads frames through dpdata (deepmd/npy, deepmd/hdf5, VASP, LAMMPS,
extxyz, ...) and writes results as deepmd/npy systems. Every output of every
command goes through :func:`safe_output`, which

- refuses an output that is, contains or lies inside an input (or the current
  folder), one under a file, one in a folder it may not write;
- refuses an existing, non-empty output, unless ``overwrite`` is given and it
  holds nothing but a previous minidp output of the same kind (a folder minidp
  wrote carries the MARKER file naming its kind);
- writes to a temporary name beside the target and moves it into place only
  when complete (os.replace); an old output is renamed away first and deleted
  only after the new one is in place. A failed or interrupted run leaves
  nothing half-written and nothing of the user's lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from minidp.checks import InputError


def guess_format(path: Path) -> str:
    """dpdata's format name for a path: deepmd/npy for a folder with type.raw, deepmd/hdf5 for .h5/.hdf5."""
    if path.is_dir() and (path / "type.raw").is_file():
        return "deepmd/npy"
    if path.suffix.lower() in (".h5", ".hdf5"):
        return "deepmd/hdf5"
    return "auto"


def read_system(path, fmt: str | None = None, type_map: list[str] | None = None, labelled: bool = False):
    """Read frames with dpdata; labelled (energies/forces) when the source has labels.

    ``type_map`` names the types of formats that only number them (a LAMMPS
    data file's types 1, 2, ... become type_map[0], type_map[1], ...).
    ``labelled=True``: the system must hold energies and forces; the reason
    dpdata could not read them (a corrupt force.npy, ...) is the error.
    """
    import dpdata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    hint = "" if fmt else " (give -f FORMAT?)"  # a format that was guessed may be the wrong one
    fmt = fmt or guess_format(path)
    if fmt == "deepmd/npy" and path.is_dir():
        from minidp.stream import lazy_system

        lazy_system(path)  # every set's arrays against each other: "box.npy has shape (79, 9); expected (80, 9)"
    try:
        try:
            system = dpdata.LabeledSystem(str(path), fmt=fmt, type_map=type_map)
        except Exception:  # not labelled (or not readable as such): read the coordinates only
            if labelled:
                raise
            system = dpdata.System(str(path), fmt=fmt, type_map=type_map)
    except AssertionError as err:  # dpdata's own checks (e.g. more types in the file than in -t)
        hint = f"does -t name every atom type of the file? it names {type_map}" if type_map else str(err)
        raise ValueError(f"cannot read system {path} as {fmt!r}: dpdata's check failed ({hint or 'no reason given'})"
                         ) from None
    except Exception as err:
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."  # dpdata may list every format it knows
        raise ValueError(f"cannot read system {path} as {fmt!r}{hint}: {type(err).__name__}: {reason}"
                         ) from None
    missing = [name for k, name in (("energies", "energy"), ("forces", "force")) if labelled and k not in system.data]
    if missing:
        raise ValueError(f"system {path} has no {' and no '.join(missing)} labels; expected a labelled system")
    return system


def model_types(atom_names: list[str], atom_types: np.ndarray, type_map: list[str]) -> np.ndarray:
    """Map a system's types (indices into its atom_names) onto the model's type_map."""
    missing = [name for name in atom_names if name not in type_map]
    used = {atom_names[t] for t in np.unique(atom_types)}
    if used & set(missing):
        raise ValueError(f"element(s) {sorted(used & set(missing))} are not in the model's type map {type_map}")
    index = np.array([type_map.index(n) if n in type_map else -1 for n in atom_names])
    return index[np.asarray(atom_types)]


# ---------------------------------------------------------------------------
# Writing outputs: never onto a user's files, all of it or nothing
# ---------------------------------------------------------------------------

# A folder minidp writes carries this file, naming its kind: only such a folder
# (holding nothing minidp would not have written) may be replaced, and only with
# overwrite=True.
MARKER = ".minidp-output"

# kind -> the paths (relative, glob patterns) a minidp output folder of that kind holds;
# FILE_KINDS are single files, recognised by their content (_is_previous_output).
FOLDER_KINDS = {
    "deepmd/npy": ("type.raw", "type_map.raw", "nopbc", "set.[0-9][0-9][0-9]",
                   *(f"set.[0-9][0-9][0-9]/{k}.npy" for k in ("coord", "box", "energy", "force", "virial"))),
    "descriptors": ("*.npy",),
    "plots": ("parity-*.png",),
}
# "any": scripts' own results (validation, benchmarks), replaced whatever they hold
FILE_KINDS = ("model", "png", "npy", "lcurve", "checkpoint", "model_devi", "any")


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
            if p.is_symlink() or not (rel.as_posix() == MARKER or any(rel.match(a) and
                                                                     len(rel.parts) == len(Path(a).parts)
                                                                     for a in allowed)):
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
    if kind == "model_devi":  # dp model-devi: '# <system>' then '# step max_devi_v ...'; the LAMMPS plugin: the latter
        return any(line.startswith(b"#") and line[1:].split()[:2] == [b"step", b"max_devi_v"]
                   for line in head.split(b"\n")[:2])
    if kind == "checkpoint":  # the .npz half of a training checkpoint
        import zipfile

        if not zipfile.is_zipfile(target):
            return False
        with zipfile.ZipFile(target) as z:
            return "adam_t.npy" in z.namelist()
    if kind == "model":
        from minidp.serialization import read_model_dict

        try:
            return read_model_dict(target).get("software") == "minidp"
        except (ValueError, OSError):
            return False
    return kind == "any"


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
