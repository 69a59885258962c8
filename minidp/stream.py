"""Streaming inference: datasets larger than memory, on one machine or on a Dask cluster.

A deepmd/npy system is a folder with ``type.raw`` (the type of each atom),
``type_map.raw`` (the element of each type) and ``set.*`` folders holding
``coord.npy`` (nf, natoms * 3), ``box.npy`` (nf, 9) and optionally the labels
``energy.npy``, ``force.npy`` and ``virial.npy``, and a model's frame and
atomic parameters ``fparam.npy`` (nf, nfp) and ``aparam.npy`` (nf, natoms * nap)
(read when the model takes them, :func:`select_params`, as ``dp test`` reads
them); ``nopbc``, if present, marks open boundaries. deepmd/hdf5 keeps the same names as groups and datasets in
one HDF5 file (``data.h5``, or ``data.h5#group`` for a system inside it).
deepmd/npy/mixed adds ``real_atom_types.npy`` (nf, natoms) to each set: every
frame's own types (-1 for a padding atom), type.raw holding placeholders.

:func:`open_systems` is the one reader of what a user names with ``-s``
(eval, test, eval-desc, model-devi): folders and HDF5 files expand to the
systems they hold, as deepmd-kit expands them (:func:`find_systems`); any other
format is read through dpdata, checked against the file, into memory
(:func:`minidp.data.read_dpdata`). Each system is a :class:`LazySystem`.
:func:`lazy_system` reads only the metadata (types and the arrays' headers);
:func:`read_frames` copies one range of frames, across ``set.*`` boundaries,
out of memory maps (``np.load(mmap_mode="r")``) or HDF5 slices that are opened
for that range and closed after it, so the process never maps a whole set.
On top of that:

- :func:`stream_eval` yields (:class:`Block`, Prediction) block by block,
  frames of per-frame types evaluated one kind at a time (:func:`by_kind`);
- :func:`write_labelled_stream` writes a system labelled by the model into
  memory-mapped ``.npy`` files, block by block, in a temporary folder that is
  moved into place only when complete (:func:`minidp.data.safe_output`);
- :func:`chunk_bag` and :func:`dask_eval` spread the blocks of many systems
  over a Dask cluster, each worker process loading the model once.

Memory is bounded by the block: a few hundred bytes per atom of the block
(its coordinates, labels and results, ~300 * frames_per_chunk * natoms),
plus DeepPot's own working memory (its ``memory_budget``), whatever the
number of frames.

Shape symbols (see :mod:`minidp.se_e2_a`): ``nf`` frames of a block,
``natoms`` atoms per frame.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from minidp.checks import FrameError, positive_int
from minidp.data import (
    DpdataPart,
    guess_format,
    model_types,
    read_dpdata,
    require_labels,
    safe_output,
)
from minidp.infer import Kind, frame_kinds
from minidp.model import Prediction

# deepmd names of the per-frame arrays, and the numbers each frame holds (times natoms when True)
LABELS = ("energy", "force", "virial")
OUTPUTS = {"coord": (3, True), "box": (9, False), "energy": (1, False), "force": (3, True), "virial": (9, False)}
# deepmd/npy/mixed: each frame's own types (nf, natoms), indices into type_map.raw, -1 for a padding atom;
# type.raw then holds placeholders
REAL_TYPES = "real_atom_types"
# a model's frame parameters (nf, nfp) and atomic parameters (nf, natoms * nap), and whether per atom
PARAMS = {"fparam": False, "aparam": True}
# the formats minidp reads itself, block by block; any other goes through dpdata (minidp.data.read_dpdata)
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
        yield {p.stem: _load_npy(p) for p in folder.glob("*.npy") if p.stem in wanted}
        return
    import h5py

    with h5py.File(system.path, "r") as f:
        g = f[system.group] if system.group else f
        s = g[system.sets[index]]
        yield {k[:-4]: s[k] for k in s.keys() if k.endswith(".npy") and k[:-4] in wanted}


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
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file ({err})") from None
    with f:
        if group and group not in f:
            raise ValueError(f"{path} has no group {group!r}")
        g = f[group] if group else f
        if "type.raw" not in g:
            raise ValueError(f"{path}#{group} has no type.raw; expected a deepmd/hdf5 system")
        types = np.asarray(g["type.raw"][:]).reshape(-1)
        if types.dtype.kind not in "iu":
            raise ValueError(f"{path}#{group}/type.raw holds {types.dtype} values; expected one integer per atom")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g["type_map.raw"][:]] \
            if "type_map.raw" in g else None
        return types.astype(np.int64), names, "nopbc" in g, sorted(k for k in g.keys() if k.startswith("set."))


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


def find_systems(path) -> list[str]:
    """The systems under ``path``, as deepmd-kit's -s expands it: every folder holding a type.raw (the
    root itself last), every group of an HDF5 file holding one (file.h5#/group; the root as the file);
    any other file as given."""
    file, group = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    if file.is_dir():
        root = str(path).rstrip("/")
        below = sorted(f"{root}/{p.parent.relative_to(file).as_posix()}" for p in file.rglob("type.raw")
                       if p.parent != file)
        return below + ([str(path)] if (file / "type.raw").is_file() else [])
    if guess_format(file) != "deepmd/hdf5":
        return [str(path)]
    import h5py

    try:
        f = h5py.File(file, "r")
    except OSError as err:
        raise ValueError(f"{file} is not a readable HDF5 file ({err})") from None
    with f:
        if group and group not in f:
            raise ValueError(f"{file} has no group {group!r}")
        top = f[group] if group else f
        below = []
        top.visititems(lambda name, obj: below.append(name) if isinstance(obj, h5py.Group) and "type.raw" in obj
                       else None)
        root = [str(path)] if "type.raw" in top else []
    prefix = f"{str(path).partition('#')[0]}#/{group + '/' if group else ''}"
    return [prefix + name for name in sorted(below)] + root


def open_systems(path, fmt: str | None = None, type_map: list[str] | None = None,
                 labelled: bool = False) -> list[LazySystem]:
    """Every system a -s argument names, ready to be read block by block (:func:`iter_blocks`).

    deepmd/npy (and its per-frame-typed deepmd/npy/mixed) folders and
    deepmd/hdf5 files are found as deepmd-kit finds them (:func:`find_systems`:
    folders searched for type.raw, HDF5 files for their groups) and read from
    disk block by block; any other file is read through dpdata
    (:func:`minidp.data.read_dpdata`, checked against the file) into memory,
    one system per kind of frame. ``labelled=True``: every system must hold
    energy and force labels. All systems are opened (and checked) here, before
    any frame is evaluated.
    """
    file, _ = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = fmt or guess_format(file)
    if fmt in DEEPMD or (fmt == "auto" and file.is_dir()):  # a folder is read by dpdata only if -f says so
        found = find_systems(path)
        if not found:
            raise ValueError(f"no system (a folder or HDF5 group with type.raw) in {path}")
        systems = [lazy_system(p, type_map, per_frame_types=True) for p in found]
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


def predict_block(dp, block: Block, atom_types: np.ndarray) -> Prediction:
    """DeepPot's results for the block's frames (``atom_types`` already in the model's numbering).

    ``atom_types``: (natoms,), or (nf, natoms) per frame (each kind of frame
    evaluated apart, :func:`by_kind`). One Prediction of nf frames: energy
    (nf,), force (nf, natoms, 3), virial (nf, 9), atom_energy (nf, natoms),
    atom_virial (nf, natoms, 9); zeros for padding atoms.
    """
    nf, natoms = block.coords.shape[:2]
    # (nf,), (nf, natoms, 3), (nf, 9), (nf, natoms), (nf, natoms, 9)
    out = Prediction(np.zeros(nf), np.zeros((nf, natoms, 3)), np.zeros((nf, 9)), np.zeros((nf, natoms)),
                     np.zeros((nf, natoms, 9)))
    for kind, p in by_kind(block, atom_types, functools.partial(_predict, dp)):
        out.energy[kind.rows], out.virial[kind.rows] = p.energy, p.virial
        for whole, part in ((out.force, p.force), (out.atom_energy, p.atom_energy), (out.atom_virial, p.atom_virial)):
            whole[np.ix_(kind.rows, kind.atoms)] = part
    return out


def _predict(dp, coords: np.ndarray, cells: np.ndarray | None, atom_types: np.ndarray, fparam=None,
             aparam=None) -> Prediction:
    """The frame groups of :meth:`minidp.infer.DeepPot.iter_eval` joined into one Prediction of the call's frames."""
    nf = coords.shape[0]
    out, filled = None, np.zeros(nf, dtype=bool)
    for fs, p in dp.iter_eval(coords, cells, atom_types, fparam, aparam):
        if out is None:
            # (nf,), (nf, natoms, 3), (nf, 9), (nf, natoms), (nf, natoms, 9)
            out = Prediction(*(np.empty((nf,) + a.shape[1:]) for a in p))
        for whole, part in zip(out, p):
            whole[fs] = part
        filled[fs] = True
    if out is None or not filled.all():
        raise RuntimeError(f"DeepPot.iter_eval returned results for {int(filled.sum())} of {nf} frames")
    return out


def descriptor_block(dp, block: Block, atom_types: np.ndarray) -> np.ndarray:
    """DeepPot's descriptors of the block's frames, (nf, natoms, ng * m2); zeros for padding atoms."""
    nf, natoms = block.coords.shape[:2]
    # (nf, natoms, ng * m2)
    out = np.zeros((nf, natoms, dp.get_dim_descriptor()))
    for kind, D in by_kind(block, atom_types, dp.eval_descriptor):
        out[np.ix_(kind.rows, kind.atoms)] = D
    return out


def stream_eval(dp, system_path, frames_per_chunk: int, progress: bool | None = None, labels: bool = True
                ) -> Iterator[tuple[Block, Prediction]]:
    """Yield (block, its Prediction) for a system read block by block.

    ``dp``: a :class:`minidp.DeepPot`; ``system_path``: a deepmd/npy (or
    deepmd/npy/mixed) folder or a deepmd/hdf5 file (or a :class:`LazySystem`).
    The system's type_map is mapped onto the model's. For blocks k = 0, 1, ...
    of frames [k n, min((k + 1) n, nframes)), n = frames_per_chunk, the
    predictions concatenated over k are ``dp.eval(coords, cells, types,
    atomic=True)`` (to round-off: frame groups change the order of BLAS sums).
    ``labels=False``: the blocks carry no labels (none is read).
    """
    from tqdm.auto import tqdm

    system = system_path if isinstance(system_path, LazySystem) else lazy_system(system_path, per_frame_types=True)
    system = select_params(system, dp)
    type_map = dp.get_type_map()
    # disable=None: the bar shows only on a terminal
    with tqdm(total=system.nframes, desc=system.path.name, unit="frame",
              disable=None if progress is None else not progress) as bar:
        for block in iter_blocks(system, frames_per_chunk, labels=labels):
            prediction = predict_block(dp, block, block_types(system, block, type_map))
            bar.update(block.coords.shape[0])
            yield block, prediction


# ---------------------------------------------------------------------------
# Writing a labelled system block by block
# ---------------------------------------------------------------------------


def _create_outputs(folder: Path, system: LazySystem, set_size: int) -> tuple[int, ...]:
    """Lay out the labelled system: type.raw, type_map.raw, nopbc, and empty .npy files per set.

    The files are created at their full size (sparse until written); every
    block then writes its rows through a memory map. Returns the frames per set.
    A deepmd/npy/mixed system keeps its layout: each set gets real_atom_types.npy.
    """
    folder.mkdir(parents=True)
    np.savetxt(folder / "type.raw", system.atom_types, fmt="%d")
    (folder / "type_map.raw").write_text("\n".join(system.atom_names) + "\n")
    if system.nopbc:
        (folder / "nopbc").touch()
    nf = system.nframes
    counts = tuple(min(set_size, nf - a) for a in range(0, nf, set_size))
    for index, n in enumerate(counts):
        (folder / f"set.{index:03d}").mkdir()
        for key, (per_frame, per_atom) in OUTPUTS.items():
            if key != "box" or not system.nopbc:
                width = per_frame * (system.natoms if per_atom else 1)
                # (n, width): dpdata's layout, float64 as dpdata writes by default; closed at once
                np.lib.format.open_memmap(folder / f"set.{index:03d}" / f"{key}.npy", "w+", np.float64, (n, width))
        if system.mixed:
            # (n, natoms)
            np.lib.format.open_memmap(folder / f"set.{index:03d}" / f"{REAL_TYPES}.npy", "w+", np.int64,
                                      (n, system.natoms))
        for key, width in system.params:  # the parameters the model read, kept beside its labels
            # (n, nfp) or (n, natoms * nap)
            np.lib.format.open_memmap(folder / f"set.{index:03d}" / f"{key}.npy", "w+", np.float64,
                                      (n, width * (system.natoms if PARAMS[key] else 1)))
    return counts


def _write_block(folder: Path, counts: tuple[int, ...], block: Block, prediction: Prediction) -> None:
    """Write one block's frames (and per-frame types) and the model's labels into the output sets it falls in."""
    nf = block.coords.shape[0]
    rows = {"coord": block.coords, "box": block.cells, "energy": prediction.energy,
            "force": prediction.force, "virial": prediction.virial, REAL_TYPES: block.types,
            "fparam": block.fparam, "aparam": block.aparam}
    for index, a, b, offset in set_ranges(counts, block.frames.start, block.frames.stop):
        for key, values in rows.items():
            if values is None:
                continue
            out = np.lib.format.open_memmap(folder / f"set.{index:03d}" / f"{key}.npy", "r+")
            out[a:b] = values.reshape(nf, -1)[offset:offset + b - a]
            # unmapping here keeps the written pages out of this process's memory;
            # the mapping is shared, so the data is in the file from now on
            del out


def write_labelled(dp, system: LazySystem, folder: Path, frames_per_chunk: int, set_size: int = 5000,
                   progress: bool | None = None) -> None:
    """Label a system with the model, block by block, into the new folder ``folder`` (deepmd/npy layout;
    deepmd/npy/mixed for a mixed system). The caller makes it safe (:func:`minidp.data.safe_output`)."""
    system = select_params(system, dp)
    counts = _create_outputs(folder, system, positive_int("set_size", set_size))
    for block, prediction in stream_eval(dp, system, frames_per_chunk, progress, labels=False):
        _write_block(folder, counts, block, prediction)


def write_labelled_stream(dp, system_path, output, frames_per_chunk: int, set_size: int = 5000,
                          progress: bool | None = None, overwrite: bool = False) -> Path:
    """Label a system with the model, block by block, as a deepmd/npy system at ``output``.

    The output holds the input's types, type map, coordinates and cells and the
    model's energy (nf, 1), force (nf, natoms * 3) and virial (nf, 9) in sets of
    ``set_size`` frames (dpdata's default layout). It is written into a
    temporary folder beside ``output`` and moved onto it only when every block
    is written: a failed run leaves no ``output``. An existing ``output`` is
    refused unless ``overwrite`` and it holds only a previous minidp deepmd/npy
    output; one that is, holds or lies in the input is always refused
    (:func:`minidp.data.safe_output`).
    """
    set_size = positive_int("set_size", set_size)
    system = system_path if isinstance(system_path, LazySystem) else lazy_system(system_path, per_frame_types=True)
    with safe_output(output, "deepmd/npy", (system.path,), overwrite) as tmp:
        write_labelled(dp, system, tmp, frames_per_chunk, set_size, progress)
    return Path(output)


# ---------------------------------------------------------------------------
# Many machines: Dask
# ---------------------------------------------------------------------------


def _dask_bag():
    try:
        import dask.bag
    except ImportError as err:
        raise ImportError("chunk_bag and dask_eval need Dask: pip install 'minidp[tools]'") from err
    return dask.bag


@functools.lru_cache(maxsize=4)
def worker_deeppot(model_path: str):
    """The DeepPot of a model file, loaded once per process (each Dask worker process keeps its own)."""
    from minidp.infer import DeepPot

    # One thread: Dask runs threads_per_worker blocks at once in each worker,
    # and more threads per block would fight them for the cores. No progress
    # bars from workers: their stderr may be the client's terminal.
    return DeepPot(model_path, workers=1, progress=False)


def _eval_chunk(task: tuple, model_path: str) -> tuple[int, slice, Prediction]:
    """Dask task: (system index, its LazySystem, start, stop) -> (system index, frames, Prediction)."""
    from threadpoolctl import threadpool_limits

    index, system, start, stop = task
    dp = worker_deeppot(model_path)
    system = select_params(system, dp)
    types = model_types(system.atom_names, system.atom_types, dp.get_type_map())
    with threadpool_limits(1):  # BLAS too keeps to the task's one core
        prediction = predict_block(dp, read_frames(system, start, stop), types)
    return index, slice(start, stop), prediction


def chunk_bag(model_path, system_paths, frames_per_chunk: int):
    """A dask.bag with one element per (system, block of frames): (system index, frame slice, Prediction).

    Only the metadata is read here; the frames are read where the tasks run, so
    the systems' paths must be visible to the workers (a shared file system).
    """
    bag = _dask_bag()
    n = positive_int("frames_per_chunk", frames_per_chunk)
    if isinstance(system_paths, (str, Path)):
        raise TypeError(f"system_paths must be a list of systems, got the single path {system_paths!r}")
    systems = [lazy_system(p) for p in system_paths]
    tasks = [(i, s, a, min(a + n, s.nframes)) for i, s in enumerate(systems) for a in range(0, s.nframes, n)]
    if not tasks:
        raise ValueError("system_paths is empty; expected at least one system")
    # one partition per block: the scheduler spreads them over the workers
    return bag.from_sequence(tasks, npartitions=len(tasks)).map(_eval_chunk, str(Path(model_path).resolve()))


def dask_eval(model_path, system_paths, frames_per_chunk: int, client=None) -> list[Prediction]:
    """Evaluate many systems on a Dask cluster; one Prediction per system, frames in order.

    ``client``: a ``dask.distributed.Client``; None uses Dask's current
    scheduler (the active Client if there is one). The results equal
    ``DeepPot(model_path).eval`` on each system (to round-off).
    """
    if not Path(model_path).exists():
        raise FileNotFoundError(f"model {model_path} does not exist")
    bag = chunk_bag(model_path, system_paths, frames_per_chunk)
    results = bag.compute() if client is None else client.gather(client.compute(bag))
    per_system: dict[int, list[Prediction]] = {}
    for index, _, prediction in results:  # in the bag's order: systems, then frames
        per_system.setdefault(index, []).append(prediction)
    # per system: (nf,), (nf, natoms, 3), (nf, 9), (nf, natoms), (nf, natoms, 9) over all its frames
    return [Prediction(*(np.concatenate(parts) for parts in zip(*per_system[i]))) for i in sorted(per_system)]
