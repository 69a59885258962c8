"""Streaming inference: datasets larger than memory, on one machine or on a Dask cluster.

A deepmd/npy system is a folder with ``type.raw`` (the type of each atom),
``type_map.raw`` (the element of each type) and ``set.*`` folders holding
``coord.npy`` (nf, natoms * 3), ``box.npy`` (nf, 9) and optionally the labels
``energy.npy``, ``force.npy`` and ``virial.npy``; ``nopbc``, if present, marks
open boundaries. deepmd/hdf5 keeps the same names as groups and datasets in
one HDF5 file (``data.h5``, or ``data.h5#group`` for a system inside it).

:func:`lazy_system` reads only the metadata (types and the arrays' headers);
:func:`read_frames` copies one range of frames, across ``set.*`` boundaries,
out of memory maps (``np.load(mmap_mode="r")``) or HDF5 slices that are opened
for that range and closed after it, so the process never maps a whole set.
On top of that:

- :func:`stream_eval` yields (:class:`Block`, Prediction) block by block;
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
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from minidp.checks import FrameError, positive_int
from minidp.data import guess_format, model_types, safe_output
from minidp.model import Prediction

# deepmd names of the per-frame arrays, and the numbers each frame holds (times natoms when True)
LABELS = ("energy", "force", "virial")
OUTPUTS = {"coord": (3, True), "box": (9, False), "energy": (1, False), "force": (3, True), "virial": (9, False)}

# ---------------------------------------------------------------------------
# Lazy systems
# ---------------------------------------------------------------------------


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

    @property
    def nframes(self) -> int:
        return int(sum(self.counts))

    @property
    def natoms(self) -> int:
        return int(self.atom_types.size)


class Block(NamedTuple):
    """A range of frames of a system, copied into memory as float64."""

    frames: slice  # which frames of the system
    coords: np.ndarray  # (nf, natoms, 3)
    cells: np.ndarray | None  # (nf, 3, 3), None with open boundaries
    labels: dict  # the stored labels: energy (nf,), force (nf, natoms, 3), virial (nf, 9)


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
    if system.group is None:
        folder = system.path / system.sets[index]
        yield {p.stem: _load_npy(p) for p in folder.glob("*.npy") if p.stem in OUTPUTS}
        return
    import h5py

    with h5py.File(system.path, "r") as f:
        g = f[system.group] if system.group else f
        s = g[system.sets[index]]
        yield {k[:-4]: s[k] for k in s.keys() if k.endswith(".npy") and k[:-4] in OUTPUTS}


def _metadata(path: Path, group: str | None) -> tuple[np.ndarray, list[str] | None, bool, list[str]]:
    """(atom types, type map or None, nopbc, set names) of a deepmd/npy folder or an HDF5 group."""
    if group is None:
        types = np.loadtxt(path / "type.raw", dtype=int, ndmin=1)
        names = (path / "type_map.raw").read_text().split() if (path / "type_map.raw").is_file() else None
        return types, names, (path / "nopbc").exists(), sorted(p.name for p in path.glob("set.*") if p.is_dir())
    import h5py

    with h5py.File(path, "r") as f:
        if group and group not in f:
            raise ValueError(f"{path} has no group {group!r}")
        g = f[group] if group else f
        if "type.raw" not in g:
            raise ValueError(f"{path}#{group} has no type.raw; expected a deepmd/hdf5 system")
        types = np.asarray(g["type.raw"][:], dtype=int).reshape(-1)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g["type_map.raw"][:]] \
            if "type_map.raw" in g else None
        return types, names, "nopbc" in g, sorted(k for k in g.keys() if k.startswith("set."))


def lazy_system(path) -> LazySystem:
    """Read a system's metadata and check its sets' shapes; no frame is read.

    ``path``: a deepmd/npy folder, a deepmd/hdf5 file, or ``file.h5#group``.
    """
    file, group = _split_hdf5(path)
    if not file.exists():
        raise FileNotFoundError(f"system {path} does not exist")
    fmt = guess_format(file)
    if fmt not in ("deepmd/npy", "deepmd/hdf5"):
        raise ValueError(f"cannot stream {path}: expected a deepmd/npy folder (with type.raw) "
                         "or a deepmd/hdf5 file (.h5, .hdf5)")
    types, names, nopbc, sets = _metadata(file.resolve(), None if fmt == "deepmd/npy" else group)
    if types.size == 0 or types.min() < 0:
        raise ValueError(f"type.raw of {path} must list one type >= 0 per atom, got {types.tolist()[:10]}")
    names = names or [f"Type_{t}" for t in range(types.max() + 1)]  # dpdata's names when type_map.raw is absent
    if types.max() >= len(names):
        raise ValueError(f"type.raw of {path} has type {types.max()} but type_map.raw names {len(names)} types")
    if not sets:
        raise ValueError(f"{path} has no set.* folders; expected frames in set.000, ...")
    system = LazySystem(file.resolve(), None if fmt == "deepmd/npy" else group, names, types, nopbc,
                        tuple(sets), (), LABELS)
    counts, labels = [], set(LABELS)
    for i in range(len(sets)):
        with _set_arrays(system, i) as arrays:
            counts.append(_check_set(arrays, f"{path}/{sets[i]}", system.natoms, nopbc))
            labels &= set(arrays)
    return system._replace(counts=tuple(counts), labels=tuple(k for k in LABELS if k in labels))


def _check_set(arrays: dict, where: str, natoms: int, nopbc: bool) -> int:
    """The number of frames of one set, after checking that every array has it and the right width."""
    if "coord" not in arrays:
        raise ValueError(f"{where} has no coord.npy")
    if "box" not in arrays and not nopbc:
        raise ValueError(f"{where} has no box.npy (and the system has no nopbc file)")
    needed = [k for k in arrays if k != "box" or not nopbc]
    nf = arrays["coord"].shape[0]
    for key in needed:
        per_frame, per_atom = OUTPUTS[key]
        width = per_frame * (natoms if per_atom else 1)
        shape = arrays[key].shape
        if len(shape) == 0 or shape[0] != nf or int(np.prod(shape[1:])) != width:
            raise ValueError(f"{where}/{key}.npy has shape {shape}; expected ({nf}, {width}) "
                             f"for {nf} frames of {natoms} atoms")
    return int(nf)


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


def read_frames(system: LazySystem, start: int, stop: int) -> Block:
    """Copy frames start..stop-1 (across set.* boundaries) into float64 arrays; nothing else is read."""
    if not 0 <= start < stop <= system.nframes:
        raise ValueError(f"frames {start}..{stop - 1} are not within the {system.nframes} frames of {system.path}")
    nf, natoms = stop - start, system.natoms
    # (nf, natoms, 3)
    coords = np.empty((nf, natoms, 3))
    # (nf, 3, 3)
    cells = None if system.nopbc else np.empty((nf, 3, 3))
    # energy (nf,), force (nf, natoms, 3), virial (nf, 9)
    labels = {"energy": np.empty(nf), "force": np.empty((nf, natoms, 3)), "virial": np.empty((nf, 9))}
    labels = {k: v for k, v in labels.items() if k in system.labels}
    for index, a, b, offset in set_ranges(system.counts, start, stop):
        rows = slice(offset, offset + b - a)
        with _set_arrays(system, index) as arrays:
            # float32 data is widened here, in the copy (as minidp.checks.real_array does:
            # r_j - r_i in float32 would keep only ~7 digits)
            coords[rows] = np.asarray(arrays["coord"][a:b]).reshape(b - a, natoms, 3)
            if cells is not None:
                cells[rows] = np.asarray(arrays["box"][a:b]).reshape(b - a, 3, 3)
            for key, out in labels.items():
                out[rows] = np.asarray(arrays[key][a:b]).reshape(out[rows].shape)
    return Block(slice(start, stop), coords, cells, labels)


def iter_blocks(system: LazySystem, frames_per_chunk: int) -> Iterator[Block]:
    """Blocks of ``frames_per_chunk`` frames (the last one shorter), in order, one in memory at a time."""
    n = positive_int("frames_per_chunk", frames_per_chunk)
    for start in range(0, system.nframes, n):
        yield read_frames(system, start, min(start + n, system.nframes))


# ---------------------------------------------------------------------------
# Evaluating blocks
# ---------------------------------------------------------------------------


def predict_block(dp, block: Block, atom_types: np.ndarray) -> Prediction:
    """DeepPot's results for the block's frames (``atom_types`` already in the model's numbering).

    The frame groups of :meth:`minidp.infer.DeepPot.iter_eval` are joined into one Prediction
    of nf frames: energy (nf,), force (nf, natoms, 3), virial (nf, 9),
    atom_energy (nf, natoms), atom_virial (nf, natoms, 9).
    """
    nf = block.coords.shape[0]
    out, filled = None, np.zeros(nf, dtype=bool)
    try:
        for fs, p in dp.iter_eval(block.coords, block.cells, atom_types):
            if out is None:
                # (nf,), (nf, natoms, 3), (nf, 9), (nf, natoms), (nf, natoms, 9)
                out = Prediction(*(np.empty((nf,) + a.shape[1:]) for a in p))
            for whole, part in zip(out, p):
                whole[fs] = part
            filled[fs] = True
    except FrameError as err:  # numbered within the block: renumber within the system
        raise err.shifted(block.frames.start) from None
    if out is None or not filled.all():
        raise RuntimeError(f"DeepPot.iter_eval returned results for {int(filled.sum())} of the block's {nf} frames")
    return out


def stream_eval(dp, system_path, frames_per_chunk: int, progress: bool | None = None
                ) -> Iterator[tuple[Block, Prediction]]:
    """Yield (block, its Prediction) for a system read block by block.

    ``dp``: a :class:`minidp.DeepPot`; ``system_path``: a deepmd/npy folder or a
    deepmd/hdf5 file (or a :class:`LazySystem`). The system's type_map is mapped
    onto the model's. For blocks k = 0, 1, ... of frames
    [k n, min((k + 1) n, nframes)), n = frames_per_chunk, the predictions
    concatenated over k are ``dp.eval(coords, cells, types, atomic=True)``
    (to round-off: frame groups change the order of BLAS sums).
    """
    from tqdm.auto import tqdm

    system = system_path if isinstance(system_path, LazySystem) else lazy_system(system_path)
    types = model_types(system.atom_names, system.atom_types, dp.get_type_map())
    # disable=None: the bar shows only on a terminal
    with tqdm(total=system.nframes, desc=system.path.name, unit="frame",
              disable=None if progress is None else not progress) as bar:
        for block in iter_blocks(system, frames_per_chunk):
            prediction = predict_block(dp, block, types)
            bar.update(block.coords.shape[0])
            yield block, prediction


# ---------------------------------------------------------------------------
# Writing a labelled system block by block
# ---------------------------------------------------------------------------


def _create_outputs(folder: Path, system: LazySystem, set_size: int) -> tuple[int, ...]:
    """Lay out the labelled system: type.raw, type_map.raw, nopbc, and empty .npy files per set.

    The files are created at their full size (sparse until written); every
    block then writes its rows through a memory map. Returns the frames per set.
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
    return counts


def _write_block(folder: Path, counts: tuple[int, ...], block: Block, prediction: Prediction) -> None:
    """Write one block's frames and the model's labels into the output sets it falls in."""
    nf = block.coords.shape[0]
    rows = {"coord": block.coords, "box": block.cells, "energy": prediction.energy,
            "force": prediction.force, "virial": prediction.virial}
    for index, a, b, offset in set_ranges(counts, block.frames.start, block.frames.stop):
        for key, values in rows.items():
            if values is None:
                continue
            out = np.lib.format.open_memmap(folder / f"set.{index:03d}" / f"{key}.npy", "r+")
            out[a:b] = values.reshape(nf, -1)[offset:offset + b - a]
            # unmapping here keeps the written pages out of this process's memory;
            # the mapping is shared, so the data is in the file from now on
            del out


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
    system = system_path if isinstance(system_path, LazySystem) else lazy_system(system_path)
    with safe_output(output, "deepmd/npy", (system.path,), overwrite) as tmp:
        counts = _create_outputs(tmp, system, set_size)
        for block, prediction in stream_eval(dp, system, frames_per_chunk, progress):
            _write_block(tmp, counts, block, prediction)
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
