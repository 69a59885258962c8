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
import re
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from minidp.checks import InputError

# dpdata's names of the extended XYZ reader (one implementation, several names)
EXTXYZ = ("extxyz", "quip/gap/xyz", "quip/gap/xyz_file", "gpumd/xyz", "nequip/xyz", "mace/xyz")
# extended XYZ's spellings of a periodic and an open direction
TRUE, FALSE = ("T", "TRUE", "1"), ("F", "FALSE", "0")
# dpdata's data keys -> what minidp calls them in messages
KEYS = {"coords": "coordinate", "cells": "cell", "energies": "energy", "forces": "force", "virials": "virial"}


def guess_format(path: Path) -> str:
    """dpdata's format name for a path.

    deepmd/npy/mixed for a folder with type.raw whose sets hold per-frame types
    (real_atom_types.npy), deepmd/npy for one without them, deepmd/hdf5 for
    .h5/.hdf5, extxyz for an .xyz/.extxyz file whose first comment line has
    extended-XYZ fields (Properties=, Lattice=), else dpdata's "auto".
    """
    path = Path(path)
    if path.is_dir() and (path / "type.raw").is_file():
        return "deepmd/npy/mixed" if any(path.glob("set.*/real_atom_types.npy")) else "deepmd/npy"
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return "deepmd/hdf5"
    if suffix in (".xyz", ".extxyz") and path.is_file():
        with open(path, "rb") as f:
            head = f.readline() + f.readline()
        return "extxyz" if b"Properties=" in head or b"Lattice=" in head else "xyz"
    return "auto"


class DpdataPart(NamedTuple):
    """Frames of one kind (the same atoms in the same order) read by dpdata, and where they stood in the file."""

    frames: np.ndarray  # (nf,) index of each frame in the file
    system: object  # dpdata.System or dpdata.LabeledSystem


def read_dpdata(path, fmt: str | None = None, type_map: list[str] | None = None,
                labelled: bool = False) -> list[DpdataPart]:
    """Read a file (any format dpdata reads) into parts of one kind of frame each; everything checked.

    dpdata's result is not trusted: no frame or atom, a non-finite coordinate,
    cell or label (named by file and frame), and for extended XYZ a frame count
    other than the file's (counted here), a frame whose ``pbc`` is partly
    periodic (minidp evaluates fully periodic or open systems), are refused.
    An extended XYZ file gives one part per kind of frame, in order of first
    appearance; any other format one part. deepmd systems are read by
    :func:`minidp.stream.open_systems`; the multi-system forms (mixed types,
    several HDF5 groups) are refused here.
    """
    import dpdata

    path = Path(path)
    # dpdata's file.h5#group names a system inside an HDF5 file
    file = path if path.exists() else Path(str(path).partition("#")[0])
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = fmt or guess_format(file)
    _refuse_many(path, fmt)
    if fmt == "deepmd/npy" and path.is_dir():
        from minidp.stream import lazy_system

        lazy_system(path)  # every set's arrays against each other: "box.npy has shape (79, 9); expected (80, 9)"
    if fmt in EXTXYZ:
        parts = _read_extxyz(path, fmt)
    else:
        if fmt == "xyz" and len(_extxyz_comments(path)) > 1:  # dpdata's plain XYZ reader reads the first frame
            raise ValueError(f"system {path} holds {len(_extxyz_comments(path))} frames, of which dpdata's plain "
                             "xyz reader reads one; write it as extended XYZ (with Lattice= and Properties=)")
        system = _dpdata_system(dpdata, path, fmt, type_map, labelled)
        parts = [DpdataPart(np.arange(system.get_nframes()), system)]
    for part in parts:
        _check_dpdata(path, fmt, part, labelled)
    return parts


def read_system(path, fmt: str | None = None, type_map: list[str] | None = None, labelled: bool = False):
    """Read one system with dpdata (:func:`read_dpdata`); labelled (energies/forces) when the source has labels.

    ``type_map`` names the types of formats that only number them (a LAMMPS
    data file's types 1, 2, ... become type_map[0], type_map[1], ...).
    ``labelled=True``: the system must hold energies and forces; the reason
    dpdata could not read them (a corrupt force.npy, ...) is the error.
    A file holding frames of several kinds of atoms is refused.
    """
    parts = read_dpdata(path, fmt, type_map, labelled)
    if len(parts) > 1:
        kinds = ", ".join(f"{p.system.formula} from frame {p.frames[0]}" for p in parts)
        raise ValueError(f"system {path} holds frames of {len(parts)} kinds of atoms ({kinds}); "
                         "expected one kind per system")
    return parts[0].system


def _refuse_many(path: Path, fmt: str) -> None:
    """A path that holds several systems (per-frame types, HDF5 groups) is not one dpdata system."""
    if fmt == "deepmd/npy/mixed":
        raise ValueError(f"system {path} is deepmd/npy/mixed (per-frame types in set.*/real_atom_types.npy); "
                         "this reader takes one type per atom")
    if fmt == "deepmd/hdf5" and "#" not in str(path):
        import h5py  # only HDF5 systems need it

        try:
            with h5py.File(path, "r") as f:
                if "type.raw" not in f:
                    groups = [k for k in f if isinstance(f[k], h5py.Group) and "type.raw" in f[k]]
                    raise ValueError(f"{path} holds no system at its root (groups {groups[:5]}); "
                                     f"name one as {path}#GROUP")
        except OSError as err:
            raise ValueError(f"{path} is not a readable HDF5 file ({err})") from None


def _dpdata_system(dpdata, path: Path, fmt: str, type_map, labelled: bool):
    """dpdata's LabeledSystem, or its System when the source has no labels; dpdata's errors named."""
    try:
        return dpdata.LabeledSystem(str(path), fmt=fmt, type_map=type_map)
    except Exception as err:
        reason = err
    if not labelled:  # not labelled (or not readable as such): read the coordinates only
        try:
            return dpdata.System(str(path), fmt=fmt, type_map=type_map)
        except NotImplementedError:  # a format of labelled data only: the labelled reader's reason is the one
            pass
        except Exception as err:
            reason = err
    raise ValueError(f"cannot read system {path} as {fmt!r}{_reason(reason, type_map)}")


def _reason(err: Exception, type_map) -> str:
    """Why dpdata failed, in one line: its assertion's condition, not decoded text, its message shortened."""
    if isinstance(err, UnicodeDecodeError):
        return f": it is not a text file (byte {err.start} is not {err.encoding})"
    if isinstance(err, NotImplementedError) and "support LabeledSystem" in str(err):
        return ": dpdata reads no labels (energies, forces) from this format; expected a labelled system"
    if isinstance(err, AssertionError):
        if type_map:
            return f": dpdata's check failed (does -t name every atom type of the file? it names {type_map})"
        where = traceback.extract_tb(err.__traceback__)[-1]
        if where.name == "rot_frame_lower_triangular":
            return ": its cell is left-handed (negative determinant), which dpdata refuses; swap two lattice vectors"
        return f": dpdata's check `{where.line}` failed in {where.name}"
    reason = " ".join(str(err).split())
    reason = reason if len(reason) <= 300 else reason[:297] + "..."  # dpdata may list every format it knows
    return f" (give -f FORMAT?): {type(err).__name__}: {reason}"


def _check_dpdata(path: Path, fmt: str, part: DpdataPart, labelled: bool) -> None:
    """What dpdata returned is what a system must be: frames, atoms, finite numbers, labels if asked."""
    data = part.system.data
    nf = part.system.get_nframes()
    if nf == 0 or part.system.get_natoms() == 0:
        raise ValueError(f"system {path} read as {fmt!r} holds {nf} frames of {part.system.get_natoms()} atoms; "
                         "is the file complete?")
    for key, name in KEYS.items():
        if key not in data or (key == "cells" and data.get("nopbc")):
            continue
        # (nf, numbers per frame)
        values = np.asarray(data[key], dtype=np.float64).reshape(nf, -1)
        bad = ~np.isfinite(values)
        if bad.any():
            k, i = np.argwhere(bad)[0]
            raise ValueError(f"system {path}: frame {part.frames[k]} has a non-finite {name} ({values[k, i]}); "
                             "expected finite numbers")
    if labelled:
        require_labels(path, [name for key, name in KEYS.items() if key in data])


def require_labels(system, labels) -> None:
    """ValueError naming the system unless ``labels`` (deepmd names) hold energy and force."""
    missing = [k for k in ("energy", "force") if k not in labels]
    if missing:
        raise ValueError(f"system {system} has no {' and no '.join(missing)} labels; expected a labelled system")


# ---------------------------------------------------------------------------
# Extended XYZ: dpdata reads the frames, minidp counts them and reads pbc
# ---------------------------------------------------------------------------


def _extxyz_comments(path: Path) -> list[str]:
    """The comment line of every frame, the file walked here (dpdata skips lines it cannot parse)."""
    comments = []
    try:
        with open(path, encoding="utf-8") as f:
            number = 0
            while line := f.readline():
                number += 1
                if not line.strip():
                    continue
                k = len(comments)
                try:
                    natoms = int(line)
                except ValueError:
                    raise ValueError(f"{path} line {number}: expected the atom count of frame {k}, got "
                                     f"{line.strip()[:40]!r}") from None
                if natoms < 1:
                    raise ValueError(f"{path} line {number}: frame {k} has {natoms} atoms; expected at least one")
                comments.append(f.readline())
                number += 1
                fields = None
                for i in range(natoms):
                    atom = f.readline()
                    number += 1
                    if not atom:
                        raise ValueError(f"{path} ends inside frame {k}: {i} of its {natoms} atom lines")
                    # a line cut short (a truncated file) has fewer fields than the frame's first
                    fields = fields or len(atom.split())
                    if len(atom.split()) != fields:
                        raise ValueError(f"{path} line {number}: atom {i} of frame {k} has {len(atom.split())} "
                                         f"fields where the frame's first atom has {fields}")
    except UnicodeDecodeError as err:
        raise ValueError(f"cannot read system {path}: it is not a text file (byte {err.start} is not "
                         f"{err.encoding})") from None
    if not comments:
        raise ValueError(f"system {path} holds no frames; expected an extended XYZ file")
    return comments


def _extxyz_periodic(path: Path, frame: int, comment: str) -> bool:
    """True for pbc="T T T" (or a Lattice without pbc), False for "F F F" (or neither); anything else refused."""
    found = re.search(r"""(?:^|\s)pbc=(?:"([^"]*)"|'([^']*)'|(\S+))""", comment)
    has_lattice = re.search(r"(?:^|\s)Lattice=", comment) is not None
    if found is None:
        return has_lattice
    text = next(g for g in found.groups() if g is not None)
    flags = [f.upper() for f in text.split()]
    if len(flags) != 3 or not (all(f in TRUE for f in flags) or all(f in FALSE for f in flags)):
        raise ValueError(f"{path} frame {frame} has pbc=\"{text}\"; minidp evaluates fully periodic (T T T) "
                         "or open (F F F) systems only")
    if flags[0] in TRUE and not has_lattice:
        raise ValueError(f"{path} frame {frame} is periodic (pbc=\"{text}\") but has no Lattice")
    return flags[0] in TRUE


def _read_extxyz(path: Path, fmt: str) -> list[DpdataPart]:
    """Every frame of an extended XYZ file, grouped by kind of frame (the same atoms in the same order)."""
    from dpdata.format import Format

    comments = _extxyz_comments(path)
    periodic = [_extxyz_periodic(path, k, c) for k, c in enumerate(comments)]
    try:
        frames = list(Format.get_formats()[fmt]().from_multi_systems(str(path)))
    except Exception as err:
        raise ValueError(f"cannot read system {path} as {fmt!r}{_reason(err, None)}") from None
    if len(frames) != len(comments):
        raise ValueError(f"dpdata read {len(frames)} frames of {path}, which holds {len(comments)}; "
                         "refusing a partial read")
    kinds: dict[tuple, list[int]] = {}
    for k, frame in enumerate(frames):
        if bool(frame.get("nopbc")) == periodic[k]:
            raise ValueError(f"dpdata read frame {k} of {path} as {'open' if periodic[k] else 'periodic'}; "
                             f"its comment line says {'periodic' if periodic[k] else 'open'}")
        species = tuple(np.asarray(frame["atom_names"])[frame["atom_types"]])
        kinds.setdefault(species, []).append(k)
    return [DpdataPart(np.array(ks), _join_frames(path, [frames[k] for k in ks], ks)) for ks in kinds.values()]


def _join_frames(path: Path, frames: list[dict], numbers: list[int]):
    """One dpdata.LabeledSystem of frames with the same atoms; frames must agree on boundaries and labels."""
    import dpdata

    first = frames[0]
    for k, frame in zip(numbers, frames):
        if bool(frame["nopbc"]) != bool(first["nopbc"]):
            raise ValueError(f"{path} mixes periodic and open frames of the same atoms (frames {numbers[0]} "
                             f"and {k}); expected one kind of boundary per system")
        if ("virials" in frame) != ("virials" in first):
            raise ValueError(f"{path}: frames {numbers[0]} and {k} (the same atoms) differ in having a virial; "
                             "expected a virial in all or none")
    data = {key: first[key] for key in ("atom_names", "atom_numbs", "atom_types", "orig")}
    data["nopbc"] = bool(first["nopbc"])
    for key in ("cells", "coords", "energies", "forces", "virials"):
        if key in first:
            data[key] = np.concatenate([np.asarray(f[key], dtype=np.float64) for f in frames])
    return dpdata.LabeledSystem(data=data)


def model_types(atom_names: list[str], atom_types: np.ndarray, type_map: list[str]) -> np.ndarray:
    """Map a system's types (indices into its atom_names) onto the model's type_map.

    Any shape of ``atom_types``: (natoms,) or per-frame (nf, natoms). A type of
    -1 (a virtual atom of padded deepmd/npy/mixed data) stays -1.
    """
    atom_types = np.asarray(atom_types)
    missing = [name for name in atom_names if name not in type_map]
    used = {atom_names[t] for t in np.unique(atom_types) if t >= 0}
    if used & set(missing):
        raise ValueError(f"element(s) {sorted(used & set(missing))} are not in the model's type map {type_map}")
    # (ntypes + 1,): the last entry maps -1 onto itself
    index = np.array([type_map.index(n) if n in type_map else -1 for n in atom_names] + [-1])
    return index[atom_types]


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
