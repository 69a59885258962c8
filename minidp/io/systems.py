"""Reading systems: what a user names with ``-s``, and the training data, as deepmd-kit reads them.

A deepmd/npy system is a folder with ``type.raw`` (the type of each atom),
``type_map.raw`` (the element of each type) and ``set.*`` folders holding
``coord.npy`` (nf, natoms * 3), ``box.npy`` (nf, 9) and optionally the labels
``energy.npy``, ``force.npy`` and ``virial.npy``; ``nopbc``, if present, marks
open boundaries. deepmd/hdf5 keeps the same names as groups and datasets in
one HDF5 file (``data.h5``, or ``data.h5#group`` for a system inside it).
deepmd/npy/mixed adds ``real_atom_types.npy`` (nf, natoms) to each set: every
frame's own types (-1 for a padding atom), type.raw holding placeholders.

:func:`open_systems` is the one reader of what a user names with ``-s``
(eval, test, eval-desc, model-devi): folders and HDF5 files expand to the
systems they hold, as deepmd-kit expands them (:func:`find_systems`).
deepmd/npy, deepmd/npy/mixed and deepmd/hdf5 are read lazily: each system is a
:class:`LazySystem`, :func:`lazy_system` reads only the metadata (types and the
arrays' headers), and :func:`read_frames` / :func:`iter_blocks` copy one range
of frames, across ``set.*`` boundaries, out of memory maps
(``np.load(mmap_mode="r")``) or HDF5 slices opened for that range and closed
after it, so the process never maps a whole set. Any other format (VASP,
LAMMPS, extxyz, ...) goes through dpdata (:func:`read_dpdata`), and what dpdata
returns is checked against the file: the frame count, finite numbers, the
boundary conditions, the labels. Frames of per-frame types are evaluated one
kind at a time (:func:`by_kind`).

Shape symbols (see :mod:`minidp.se_e2_a`): ``nf`` frames of a block,
``natoms`` atoms per frame.
"""

from __future__ import annotations

import contextlib
import re
import traceback
from pathlib import Path
from typing import Iterator, NamedTuple

import h5py
import numpy as np

from minidp.checks import FrameError, positive_int

# dpdata's names of the extended XYZ reader (one implementation, several names)
EXTXYZ = ("extxyz", "quip/gap/xyz", "quip/gap/xyz_file", "gpumd/xyz", "nequip/xyz", "mace/xyz")
# extended XYZ's spellings of a periodic and an open direction
TRUE, FALSE = ("T", "TRUE", "1"), ("F", "FALSE", "0")
# dpdata's data keys -> what minidp calls them in messages
KEYS = {"coords": "coordinate", "cells": "cell", "energies": "energy", "forces": "force", "virials": "virial"}


# deepmd-kit's LMDB datasets: a folder holding data.mdb (see lmdb_systems)
LMDB, LMDB_FILE = "deepmd/lmdb", "data.mdb"


def guess_format(path: Path) -> str:
    """dpdata's format name for a path.

    deepmd/npy/mixed for a folder with type.raw whose sets hold per-frame types
    (real_atom_types.npy), deepmd/npy for one without them, deepmd/hdf5 for
    .h5/.hdf5, extxyz for an .xyz/.extxyz file whose first comment line has
    extended-XYZ fields (Properties=, Lattice=), else dpdata's "auto".
    """
    path = Path(path)
    if path.is_dir() and (path / LMDB_FILE).is_file() and not (path / "type.raw").is_file():
        return LMDB
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
    :func:`minidp.io.systems.open_systems`; the multi-system forms (mixed types,
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



# deepmd names of the per-frame arrays, and the numbers each frame holds (times natoms when True)
LABELS = ("energy", "force", "virial")
OUTPUTS = {"coord": (3, True), "box": (9, False), "energy": (1, False), "force": (3, True), "virial": (9, False)}
# deepmd/npy/mixed: each frame's own types (nf, natoms), indices into type_map.raw, -1 for a padding atom;
# type.raw then holds placeholders
REAL_TYPES = "real_atom_types"
# a model's frame parameters (nf, nfp) and atomic parameters (nf, natoms * nap), and whether per atom
PARAMS = {"fparam": False, "aparam": True}
# the formats minidp reads itself, block by block; any other goes through dpdata (minidp.io.systems.read_dpdata)
DEEPMD = ("deepmd/npy", "deepmd/npy/mixed", "deepmd/hdf5")
# atoms per block read from disk: a few hundred bytes each (coordinates, labels, results), ~20 MB a block
BLOCK_ATOMS = 1 << 16

# ---------------------------------------------------------------------------
# Lazy systems
# ---------------------------------------------------------------------------


class Block(NamedTuple):
    """A range of frames of a system, copied into memory as float64."""

    frames: slice  # which frames of the system
    coords: np.ndarray  # (nf, natoms, 3)
    cells: np.ndarray | None  # (nf, 3, 3), None with open boundaries
    labels: dict  # the stored labels: energy (nf,), force (nf, natoms, 3), virial (nf, 9)
    types: np.ndarray | None = None  # (nf, natoms) each frame's types (deepmd/npy/mixed); None: the system's
    fparam: np.ndarray | None = None  # (nf, nfp) frame parameters, when the system's params name them
    aparam: np.ndarray | None = None  # (nf, natoms, nap) atomic parameters, likewise


class LazySystem(NamedTuple):
    """What is known of a system without reading its frames (small, so it travels to Dask workers)."""

    path: Path  # the folder (deepmd/npy) or the HDF5 file (deepmd/hdf5), absolute
    group: str | None  # the system's group inside the HDF5 file ("" for the root); None for deepmd/npy
    atom_names: list[str]  # element of each type (type_map.raw)
    atom_types: np.ndarray  # (natoms,) type of each atom, an index into atom_names
    nopbc: bool  # open boundaries: no cells
    sets: tuple[str, ...]  # the set.* names, in order
    counts: tuple[int, ...]  # frames in each set
    labels: tuple[str, ...]  # the labels (energy, force, virial) that every set holds
    mixed: bool = False  # the sets hold each frame's types (deepmd/npy/mixed): blocks carry them
    memory: Block | None = None  # all frames, for a file read through dpdata; None: read from the sets
    name: str = ""  # the system as the user names it (a path, file.h5#/group, file.xyz[formula])
    # (name, numbers per frame or atom) of the fparam/aparam every set holds; read_frames reads those
    # that select_params kept (the ones a model takes)
    params: tuple[tuple[str, int], ...] = ()

    @property
    def nframes(self) -> int:
        return int(sum(self.counts))

    @property
    def natoms(self) -> int:
        return int(self.atom_types.size)


def _split_hdf5(path) -> tuple[Path, str]:
    """'data.h5#group' -> (Path('data.h5'), 'group'), dpdata's spelling of a system inside a file."""
    if Path(path).exists():  # a folder or file whose name holds a '#'
        return Path(path), ""
    name, _, group = str(path).partition("#")
    return Path(name), group.strip("/")


def _load_npy(path: Path) -> np.ndarray:
    """A memory map of one .npy file; a damaged one is named (numpy's own error does not say which)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array ({type(err).__name__}: {err})") from None
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{path} holds {arr.dtype} values; expected numbers")
    return arr


@contextlib.contextmanager
def _set_arrays(system: LazySystem, index: int) -> Iterator[dict]:
    """The arrays of set ``index`` by deepmd name (memory maps or h5py datasets), open for the block only."""
    wanted = (*OUTPUTS, REAL_TYPES, *PARAMS)
    if system.group is None:
        folder = system.path / system.sets[index]
        yield _by_frame({p.stem: _load_npy(p) for p in folder.glob("*.npy") if p.stem in wanted})
        return
    with h5py.File(system.path, "r") as f:
        g = f[system.group] if system.group else f
        s = g[system.sets[index]]
        yield {k[:-4]: s[k] for k in s.keys() if k.endswith(".npy") and k[:-4] in wanted}


def _by_frame(arrays: dict) -> dict:
    """Arrays written as one long row, such as the fparam example's aparam.npy (1, nf * natoms), with one
    row per frame (coord.npy's rows), as deepmd-kit reads them (it reshapes every array of a set to
    (nframes, -1)); any other shape is left as the file has it, for the checks to name."""
    coord = arrays.get("coord")
    if coord is None or coord.ndim == 0 or coord.shape[0] == 0:
        return arrays
    nf = coord.shape[0]
    return {k: a.reshape(nf, -1) if a.ndim == 2 and a.shape[0] == 1 and nf > 1 and a.size % nf == 0 else a
            for k, a in arrays.items()}


def _set_name(system: LazySystem, index: int) -> str:
    """How messages name a set: folder/set.000, or file.h5#group/set.000."""
    if system.group is None:
        return f"{system.path}/{system.sets[index]}"
    return f"{system.path}#{system.group}/{system.sets[index]}"


def _raw_types(path: Path) -> np.ndarray:
    """type.raw: one integer per atom (an empty or binary file named, not a numpy warning)."""
    try:
        words = path.read_bytes().decode("utf-8").split()
        return np.array([int(w) for w in words], dtype=np.int64)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} must list one integer type per atom") from None


@contextlib.contextmanager
def hdf5_group(file: Path, group: str | None) -> Iterator:
    """The group ``group`` (the root when None) of an HDF5 file, open for reading; named one-line errors."""
    try:
        f = h5py.File(file, "r")
    except OSError as err:
        raise ValueError(f"{file} is not a readable HDF5 file ({err})") from None
    with f:
        if group and group not in f:
            raise ValueError(f"{file} has no group {group!r}")
        yield f[group] if group else f


def _metadata(path: Path, group: str | None) -> tuple[np.ndarray, list[str] | None, bool, list[str]]:
    """(atom types, type map or None, nopbc, set names) of a deepmd/npy folder or an HDF5 group."""
    if group is None:
        types = _raw_types(path / "type.raw")
        try:
            names = (path / "type_map.raw").read_text().split() if (path / "type_map.raw").is_file() else None
        except UnicodeDecodeError:
            raise ValueError(f"{path / 'type_map.raw'} is not a text file; expected one element name a line"
                             ) from None
        return types, names, (path / "nopbc").exists(), sorted(p.name for p in path.glob("set.*") if p.is_dir())
    with hdf5_group(path, group) as g:
        if "type.raw" not in g:
            raise ValueError(f"{path}#{group} has no type.raw; expected a deepmd/hdf5 system")
        types = np.asarray(g["type.raw"][:]).reshape(-1)
        if types.dtype.kind not in "iu":
            raise ValueError(f"{path}#{group}/type.raw holds {types.dtype} values; expected one integer per atom")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g["type_map.raw"][:]] \
            if "type_map.raw" in g else None
        return types.astype(np.int64), names, "nopbc" in g, sorted(k for k in g.keys() if k.startswith("set."))


def stored_type_map(path) -> list[str] | None:
    """The element names a deepmd/npy folder or deepmd/hdf5 group stores (type_map.raw), or None."""
    file, group = _split_hdf5(path)
    if guess_format(file) == LMDB:
        return _lmdb_metadata(file).get("type_map")
    return _metadata(file.resolve(), None if guess_format(file) != "deepmd/hdf5" else group)[1]


def system_file(path) -> Path:
    """The file or folder of a system's path ('data.h5#group' -> data.h5)."""
    return _split_hdf5(path)[0]


def lazy_system(path, type_map: list[str] | None = None, per_frame_types: bool = False) -> LazySystem:
    """Read a system's metadata and check its sets' shapes; no frame is read.

    ``path``: a deepmd/npy folder, a deepmd/hdf5 file, or ``file.h5#group``.
    ``type_map`` names the types when the system has no type_map.raw.
    A deepmd/npy/mixed system (per-frame types in set.*/real_atom_types.npy)
    is read only with ``per_frame_types=True``, by a caller that takes each
    block's types (:attr:`Block.types`); any other caller would type every
    atom by type.raw's placeholders.
    """
    file, group = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = guess_format(file)
    if fmt not in DEEPMD:
        raise ValueError(f"cannot stream {path}: expected a deepmd/npy folder (with type.raw) "
                         "or a deepmd/hdf5 file (.h5, .hdf5)")
    types, names, nopbc, sets = _metadata(file.resolve(), None if fmt != "deepmd/hdf5" else group)
    if types.size == 0:
        raise ValueError(f"type.raw of {path} is empty; expected one type per atom")
    if types.min() < 0:
        raise ValueError(f"type.raw of {path} must list one type >= 0 per atom, got {types.tolist()[:10]}")
    names = names or (list(type_map) if type_map else [f"Type_{t}" for t in range(types.max() + 1)])
    if types.max() >= len(names):
        raise ValueError(f"type.raw of {path} has type {types.max()} but type_map.raw names {len(names)} types")
    if not sets:
        raise ValueError(f"{path} has no set.* folders; expected frames in set.000, ...")
    system = LazySystem(file.resolve(), None if fmt != "deepmd/hdf5" else group, names, types, nopbc,
                        tuple(sets), (), LABELS, name=str(path))
    return _scan_sets(system, per_frame_types)


def _scan_sets(system: LazySystem, per_frame_types: bool) -> LazySystem:
    """The system with its frames per set, the labels every set holds, whether the sets hold per-frame
    types and the parameters they hold; every set's arrays checked against each other (headers only)."""
    counts, labels, mixed, params = [], set(LABELS), [], []
    for i in range(len(system.sets)):
        with _set_arrays(system, i) as arrays:
            counts.append(_check_set(arrays, _set_name(system, i), system.natoms, system.nopbc))
            labels &= set(arrays)
            mixed.append(REAL_TYPES in arrays)
            params.append({k: int(np.prod(arrays[k].shape[1:])) // (system.natoms if PARAMS[k] else 1)
                           for k in PARAMS if k in arrays})
    if any(mixed) and not all(mixed):
        raise ValueError(f"{_set_name(system, mixed.index(False))} has no {REAL_TYPES}.npy but "
                         f"{_set_name(system, mixed.index(True))} has; expected it in every set or none")
    if any(mixed) and not per_frame_types:
        raise ValueError(f"system {system.name} is deepmd/npy/mixed (per-frame types in {REAL_TYPES}.npy); "
                         "this reader takes one type per atom")
    if sum(counts) == 0:
        raise ValueError(f"system {system.name} has no frames (its sets hold 0); expected at least one")
    for k, p in enumerate(params[1:], 1):  # a model reads the same parameters from every frame
        if p != params[0]:
            raise ValueError(f"{_set_name(system, k)} holds parameters {p or 'none'} (numbers per frame or atom) "
                             f"but {_set_name(system, 0)} holds {params[0] or 'none'}; expected the same in every set")
    return system._replace(counts=tuple(counts), labels=tuple(k for k in LABELS if k in labels), mixed=any(mixed),
                           params=tuple(params[0].items()) if params else ())


def _check_set(arrays: dict, where: str, natoms: int, nopbc: bool) -> int:
    """The number of frames of one set, after checking that every array has it and the right width."""
    if "coord" not in arrays:
        raise ValueError(f"{where} has no coord.npy")
    if "box" not in arrays and not nopbc:
        raise ValueError(f"{where} has no box.npy (and the system has no nopbc file)")
    needed = [k for k in arrays if (k != "box" or not nopbc) and k not in PARAMS]
    nf = arrays["coord"].shape[0] if arrays["coord"].ndim else 0
    for key in (k for k in PARAMS if k in arrays):
        # fparam (nf, nfp), aparam (nf, natoms * nap): a model's numbers of parameters, checked by select_params
        shape = arrays[key].shape
        width = int(np.prod(shape[1:])) if len(shape) else 0
        per = natoms if PARAMS[key] else 1
        if len(shape) == 0 or shape[0] != nf or width == 0 or width % per:
            raise ValueError(f"{where}/{key}.npy has shape {shape}; expected ({nf}, "
                             f"{'natoms * nap' if PARAMS[key] else 'nfp'}) for {nf} frames of {natoms} atoms")
    for key in needed:
        per_frame, per_atom = OUTPUTS.get(key, (1, True))  # real_atom_types: one per atom
        width = per_frame * (natoms if per_atom else 1)
        shape = arrays[key].shape
        if len(shape) == 0 or shape[0] != nf or int(np.prod(shape[1:])) != width:
            raise ValueError(f"{where}/{key}.npy has shape {shape}; expected ({nf}, {width}) "
                             f"for {nf} frames of {natoms} atoms")
    if REAL_TYPES in arrays and arrays[REAL_TYPES].dtype.kind not in "iu":
        raise ValueError(f"{where}/{REAL_TYPES}.npy holds {arrays[REAL_TYPES].dtype} values; expected integers")
    return int(nf)


# ---------------------------------------------------------------------------
# The systems a user names: one reading function for every command
# ---------------------------------------------------------------------------


def find_systems(path, patterns: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The systems under ``path``, as deepmd-kit's -s expands it: every folder holding a type.raw (the
    root itself last), every group of an HDF5 file holding one (file.h5#/group; the root as the file);
    any other file as given. ``patterns`` (training's rglob_patterns): only the folders below the root
    that match one of these glob patterns (deepmd-kit's rglob_sys_str; not the root itself)."""
    file, group = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    if file.is_dir() and guess_format(file) == LMDB:
        return [str(path)]
    if file.is_dir():
        root = str(path).rstrip("/")
        if patterns is not None:
            found = {p for pattern in patterns for p in file.rglob(pattern) if (p / "type.raw").is_file()}
            return sorted(f"{root}/{p.relative_to(file).as_posix()}" for p in found)
        below = sorted(f"{root}/{p.parent.relative_to(file).as_posix()}" for p in file.rglob("type.raw")
                       if p.parent != file)
        return below + ([str(path)] if (file / "type.raw").is_file() else [])
    if guess_format(file) != "deepmd/hdf5":
        return [str(path)]
    with hdf5_group(file, group) as top:
        below = []
        top.visititems(lambda name, obj: below.append(name) if isinstance(obj, h5py.Group) and "type.raw" in obj
                       else None)
        root = [str(path)] if "type.raw" in top else []
    prefix = f"{str(path).partition('#')[0]}#/{group + '/' if group else ''}"
    return [prefix + name for name in sorted(below)] + root


def open_systems(path, fmt: str | None = None, type_map: list[str] | None = None,
                 labelled: bool = False, model_type_map: list[str] | None = None) -> list[LazySystem]:
    """Every system a -s argument names, ready to be read block by block (:func:`iter_blocks`).

    deepmd/npy (and its per-frame-typed deepmd/npy/mixed) folders and
    deepmd/hdf5 files are found as deepmd-kit finds them (:func:`find_systems`:
    folders searched for type.raw, HDF5 files for their groups) and read from
    disk block by block; any other file is read through dpdata
    (:func:`minidp.io.systems.read_dpdata`, checked against the file) into memory,
    one system per kind of frame. ``labelled=True``: every system must hold
    energy and force labels. ``model_type_map`` names the types of a deepmd/npy
    or LMDB system without type_map.raw when no ``type_map`` is given (dp test
    numbers them by the model's types); dpdata's readers never see it (they
    would refuse an element the model lacks before reading the file). All
    systems are opened (and checked) here, before any frame is evaluated.
    """
    file, _ = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = fmt or guess_format(file)
    if fmt in DEEPMD or (fmt == "auto" and file.is_dir()):  # a folder is read by dpdata only if -f says so
        found = find_systems(path)
        if not found:
            raise ValueError(f"no system (a folder or HDF5 group with type.raw) in {path}")
        systems = [lazy_system(p, type_map or model_type_map, per_frame_types=True) for p in found]
    elif fmt == LMDB:
        systems = lmdb_systems(path, type_map or model_type_map)
    else:
        parts = read_dpdata(path, fmt, type_map, labelled)
        systems = [_memory_system(path, part, len(parts) > 1) for part in parts]
        names = [s.name for s in systems]
        systems = [s._replace(name=f"{s.name[:-1]}-{k}]") if names.count(s.name) > 1 else s
                   for k, s in enumerate(systems)]
    for system in systems:
        if labelled:
            require_labels(system.name, system.labels)
    return systems


def _lmdb_modules():
    """lmdb and msgpack, imported when an LMDB dataset is read (optional: only those datasets need them)."""
    try:
        import lmdb
        import msgpack
    except ImportError:
        raise ImportError("reading an LMDB dataset needs the lmdb and msgpack packages (pip install lmdb msgpack)"
                          ) from None
    return lmdb, msgpack


def _lmdb_metadata(path: Path, txn=None) -> dict:
    """The __metadata__ record of a deepmd-kit LMDB dataset (nframes, frame_idx_fmt, type_map, ...)."""
    if txn is None:
        with _lmdb_env(path) as env, env.begin() as reader:
            return _lmdb_metadata(path, reader)
    raw = txn.get(b"__metadata__")
    meta = None if raw is None else _lmdb_modules()[1].unpackb(raw, raw=False)
    if not isinstance(meta, dict) or not isinstance(meta.get("nframes"), int):
        raise ValueError(f"{path} has no __metadata__ with nframes; expected a deepmd-kit LMDB dataset")
    return meta


def _lmdb_env(path: Path):
    lmdb = _lmdb_modules()[0]
    try:
        return lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as err:
        raise ValueError(f"{path} is not a readable LMDB dataset ({err})") from None


def _lmdb_array(value, where: str) -> np.ndarray:
    """One array of a frame, stored by deepmd-kit as {type, shape, data} (raw bytes)."""
    try:
        return np.frombuffer(value["data"], dtype=np.dtype(value["type"])).reshape(value["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} is not an array record ({type(err).__name__}: {err})") from None


def lmdb_systems(path, type_map: list[str] | None = None) -> list[LazySystem]:
    """The frames of a deepmd-kit LMDB dataset (a folder with data.mdb: msgpack frames under the keys
    format(i, frame_idx_fmt), each with atom_types, coords, cells, energies, forces, virials; a
    __metadata__ record with nframes and type_map), in memory, one system per row of atom types.
    Every number is checked finite, naming the frame."""
    path, msgpack = Path(path), _lmdb_modules()[1]
    with _lmdb_env(path) as env, env.begin() as txn:
        meta = _lmdb_metadata(path, txn)
        frames = []
        for i in range(meta["nframes"]):
            raw = txn.get(format(i, meta.get("frame_idx_fmt", "012d")).encode())
            if raw is None:
                raise ValueError(f"{path}: frame {i} is missing; __metadata__ says {meta['nframes']} frames")
            frame = {k: _lmdb_array(v, f"{path}: frame {i}: {k}") for k, v in
                     msgpack.unpackb(raw, raw=False).items() if isinstance(v, dict)}
            for key, value in frame.items():
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise ValueError(f"{path}: frame {i}: {key} holds {value[~np.isfinite(value)][0]}; "
                                     "expected finite numbers")
            if "atom_types" not in frame or "coords" not in frame:
                raise ValueError(f"{path}: frame {i} has no atom_types or coords; expected a deepmd-kit LMDB frame")
            frames.append(frame)
    rows: dict[bytes, list[int]] = {}
    for i, f in enumerate(frames):
        rows.setdefault(np.asarray(f["atom_types"], dtype=np.int64).tobytes(), []).append(i)
    names = meta.get("type_map") or type_map
    return [_lmdb_system(path, [frames[i] for i in index], names, len(rows) > 1, k)
            for k, index in enumerate(rows.values())]


def _lmdb_system(path: Path, frames: list[dict], names, several: bool, kind: int) -> LazySystem:
    """The frames of one row of atom types as an in-memory LazySystem (a Block of float64 arrays)."""
    types = np.asarray(frames[0]["atom_types"], dtype=np.int64)
    nf, natoms = len(frames), types.size
    names = list(names) if names else [f"Type_{t}" for t in range(types.max() + 1)]
    keys = {"energy": ("energies", (nf,)), "force": ("forces", (nf, natoms, 3)), "virial": ("virials", (nf, 9))}
    # energy (nf,), force (nf, natoms, 3), virial (nf, 9): those every frame holds
    labels = {k: np.array([f[d] for f in frames], dtype=np.float64).reshape(shape)
              for k, (d, shape) in keys.items() if all(d in f for f in frames)}
    # (nf, natoms, 3), (nf, 3, 3) or None
    coords = np.array([f["coords"] for f in frames], dtype=np.float64).reshape(nf, natoms, 3)
    nopbc = not all("cells" in f for f in frames)
    cells = None if nopbc else np.array([f["cells"] for f in frames], dtype=np.float64).reshape(nf, 3, 3)
    name = f"{path}[kind {kind}]" if several else str(path)
    return LazySystem(path.resolve(), None, names, types, nopbc, (), (nf,), tuple(k for k in LABELS if k in labels),
                      memory=Block(slice(0, nf), coords, cells, labels), name=name)


def _memory_system(path, part: DpdataPart, several: bool) -> LazySystem:
    """A LazySystem holding the frames dpdata read (already checked by read_dpdata) in memory."""
    s = part.system
    nf, natoms = s.get_nframes(), s.get_natoms()
    keys = {"energy": ("energies", (nf,)), "force": ("forces", (nf, natoms, 3)), "virial": ("virials", (nf, 9))}
    # energy (nf,), force (nf, natoms, 3), virial (nf, 9): those dpdata read
    labels = {k: np.asarray(s[d], dtype=np.float64).reshape(shape) for k, (d, shape) in keys.items() if d in s.data}
    # (nf, natoms, 3), (nf, 3, 3) or None
    coords = np.asarray(s["coords"], dtype=np.float64).reshape(nf, natoms, 3)
    cells = None if s.nopbc else np.asarray(s["cells"], dtype=np.float64).reshape(nf, 3, 3)
    return LazySystem(Path(path).resolve(), None, list(s["atom_names"]), np.asarray(s["atom_types"], dtype=np.int64),
                      bool(s.nopbc), (), (nf,), tuple(k for k in LABELS if k in labels),
                      memory=Block(slice(0, nf), coords, cells, labels),
                      name=f"{path}[{s.formula}]" if several else str(path))


def output_names(root, systems: list[LazySystem]) -> list[str]:
    """A file name for each system of the -s argument ``root``: the root's own name for one system, else
    the part of each system's name below the root, separators made '_' (distinct: duplicates refused)."""
    if len(systems) == 1:
        return [Path(root).resolve().name]
    root = str(root).rstrip("/")
    names = [re.sub(r"[/#\[\]\s]+", "_", s.name.removeprefix(root)).strip("_")
             or Path(root).resolve().name for s in systems]
    return distinct_names(names, systems)


def distinct_names(names: list[str], systems: list[LazySystem]) -> list[str]:
    """``names`` (one output name per system), unless two systems would be written under one name."""
    for k, name in enumerate(names):
        if name in names[:k]:
            raise ValueError(f"systems {systems[names.index(name)].name} and {systems[k].name} would both write "
                             f"{name}; give systems of distinct names")
    return names


def frames_per_block(natoms: int) -> int:
    """Frames per block read at once: BLOCK_ATOMS atoms, at least one frame."""
    return max(1, BLOCK_ATOMS // max(int(natoms), 1))


# ---------------------------------------------------------------------------
# Reading ranges of frames
# ---------------------------------------------------------------------------


def set_ranges(counts, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """Pieces of frames start..stop-1 of sets holding ``counts`` frames each, one after another.

    Each piece is (set, first frame in the set, end in the set, offset in the range):
    frame ``offset + k`` of the range is frame ``first + k`` of the set.
    """
    pieces, base = [], 0
    for index, n in enumerate(counts):
        a, b = max(start, base), min(stop, base + n)
        if a < b:
            pieces.append((index, a - base, b - base, a - start))
        base += n
    return pieces


def read_frames(system: LazySystem, start: int, stop: int, labels: bool = True) -> Block:
    """Copy frames start..stop-1 (across set.* boundaries) into float64 arrays; nothing else is read.

    Every number read is checked finite, and each frame's types (deepmd/npy/mixed)
    within the type map: a bad one is named by file and frame. ``labels=False``
    leaves the labels unread (and unchecked).
    """
    if not 0 <= start < stop <= system.nframes:
        raise ValueError(f"frames {start}..{stop - 1} are not within the {system.nframes} frames of {system.name}")
    wanted = system.labels if labels else ()
    if system.memory is not None:
        m = system.memory
        return Block(slice(start, stop), m.coords[start:stop], None if m.cells is None else m.cells[start:stop],
                     {k: m.labels[k][start:stop] for k in wanted})
    nf, natoms = stop - start, system.natoms
    # (nf, natoms, 3)
    coords = np.empty((nf, natoms, 3))
    # (nf, 3, 3)
    cells = None if system.nopbc else np.empty((nf, 3, 3))
    # energy (nf,), force (nf, natoms, 3), virial (nf, 9)
    out = {"energy": np.empty(nf), "force": np.empty((nf, natoms, 3)), "virial": np.empty((nf, 9))}
    out = {k: v for k, v in out.items() if k in wanted}
    # (nf, natoms) or None
    types = np.empty((nf, natoms), dtype=np.int64) if system.mixed else None
    # fparam (nf, nfp), aparam (nf, natoms, nap): the parameters select_params kept
    params = {k: np.empty((nf, natoms, n) if PARAMS[k] else (nf, n)) for k, n in system.params}
    arrays_of = {"coord": coords, "box": cells, **out, REAL_TYPES: types, **params}
    for index, a, b, offset in set_ranges(system.counts, start, stop):
        rows = slice(offset, offset + b - a)
        with _set_arrays(system, index) as arrays:
            for key, whole in arrays_of.items():
                if whole is None:
                    continue
                # float32 data is widened here, in the copy (as minidp.checks.real_array does:
                # r_j - r_i in float32 would keep only ~7 digits)
                whole[rows] = np.asarray(arrays[key][a:b]).reshape(whole[rows].shape)
                _check_rows(whole[rows], f"{_set_name(system, index)}/{key}.npy", a, start + offset,
                            len(system.atom_names))
    return Block(slice(start, stop), coords, cells, out, types, params.get("fparam"), params.get("aparam"))


def _check_rows(values: np.ndarray, where: str, first: int, first_in_system: int, ntypes: int) -> None:
    """Frames read from one file: finite numbers; types (integers) in -1..ntypes-1, not all -1."""
    # (nf, numbers per frame)
    flat = values.reshape(values.shape[0], -1)
    if values.dtype.kind in "iu":
        outside = (flat < -1) | (flat >= ntypes)
        bad = outside.any(axis=1) | (flat < 0).all(axis=1)
        expected = f"types in 0..{ntypes - 1} (-1 for padding), at least one atom"
    else:
        outside = ~np.isfinite(flat)
        bad = outside.any(axis=1)
        expected = "finite numbers"
    if bad.any():
        k = int(np.argmax(bad))
        value = flat[k][outside[k]][0] if outside[k].any() else "padding (-1) only"
        raise ValueError(f"{where}: frame {first + k} (frame {first_in_system + k} of the system) holds {value}; "
                         f"expected {expected}")


def select_params(system: LazySystem, dp) -> LazySystem:
    """The system with the parameters the model of ``dp`` takes (fparam.npy, aparam.npy), as dp test reads
    them: fparam when get_dim_fparam() > 0 (optional with a default_fparam), aparam when get_dim_aparam() > 0;
    one that is missing or holds another number per frame or atom is refused, naming the system."""
    held, kept = dict(system.params), []
    for key, dim, optional in (("fparam", dp.get_dim_fparam(), dp.has_default_fparam()),
                               ("aparam", dp.get_dim_aparam(), False)):
        if dim == 0:
            continue
        if key not in held:
            if optional:
                continue
            raise ValueError(f"system {system.name} has no {key}.npy; the model takes {dim} numbers per "
                             f"{'atom' if PARAMS[key] else 'frame'} (numb_{key})"
                             + ("" if PARAMS[key] else " and has no default_fparam"))
        if held[key] != dim:
            raise ValueError(f"system {system.name}: {key}.npy holds {held[key]} numbers per "
                             f"{'atom' if PARAMS[key] else 'frame'}; the model takes {dim} (numb_{key})")
        kept.append((key, dim))
    return system._replace(params=tuple(kept))


def iter_blocks(system: LazySystem, frames_per_chunk: int, stop: int | None = None,
                labels: bool = True) -> Iterator[Block]:
    """Blocks of ``frames_per_chunk`` frames (the last one shorter) of frames 0..stop-1 (default: all),
    in order, one in memory at a time; ``labels=False`` leaves the labels unread."""
    n = positive_int("frames_per_chunk", frames_per_chunk)
    stop = system.nframes if stop is None else min(stop, system.nframes)
    for start in range(0, stop, n):
        yield read_frames(system, start, min(start + n, stop), labels)


# ---------------------------------------------------------------------------
# Evaluating blocks
# ---------------------------------------------------------------------------


class Kind(NamedTuple):
    """The frames that share one row of types, and that row's atoms (padding atoms left out)."""

    rows: np.ndarray  # (nk,) frames
    atoms: np.ndarray  # (na,) the atoms with a type (>= 0)
    types: np.ndarray  # (na,) their types


def frame_kinds(atom_types: np.ndarray, nf: int) -> list[Kind]:
    """One Kind for one row of types (natoms,); one per distinct row of per-frame types (nf, natoms).

    DeepPot evaluates frames of one kind at a time; a padding atom (type -1,
    deepmd/npy/mixed's atom_numb_pad) is not an atom and is left out.
    """
    if atom_types.ndim == 1:
        return [Kind(np.arange(nf), np.arange(atom_types.size), atom_types)]
    # (nkinds, natoms), (nf,)
    rows, inverse = np.unique(atom_types, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [Kind(np.flatnonzero(inverse == k), np.flatnonzero(row >= 0), row[row >= 0]) for k, row in enumerate(rows)]


def block_types(system: LazySystem, block: Block, type_map: list[str]) -> np.ndarray:
    """The block's types in the model's numbering: (natoms,), or (nf, natoms) for per-frame types."""
    try:
        return model_types(system.atom_names, system.atom_types if block.types is None else block.types, type_map)
    except ValueError as err:  # an element the model does not know: say which system holds it
        raise ValueError(f"system {system.name}: {err}") from None


def by_kind(block: Block, atom_types: np.ndarray, evaluate) -> Iterator[tuple[Kind, object]]:
    """(kind, evaluate(coords, cells, types, fparam=, aparam=)) for each kind of frame of the block
    (:func:`frame_kinds`); fparam and aparam are the kind's share of the block's (None when it has none).

    A FrameError of ``evaluate`` (frames counted in its call) is renumbered within the system.
    """
    for kind in frame_kinds(np.asarray(atom_types), block.coords.shape[0]):
        # (nk, na, 3), (nk, 3, 3) or None, (nk, nfp) or None, (nk, na, nap) or None
        coords = block.coords[kind.rows][:, kind.atoms]
        cells = None if block.cells is None else block.cells[kind.rows]
        fparam = None if block.fparam is None else block.fparam[kind.rows]
        aparam = None if block.aparam is None else block.aparam[kind.rows][:, kind.atoms]
        try:
            result = evaluate(coords, cells, kind.types, fparam=fparam, aparam=aparam)
        except FrameError as err:
            raise FrameError(block.frames.start + int(kind.rows[err.frame]), err.message) from None
        yield kind, result
