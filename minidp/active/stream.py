"""Streamed labelling: datasets larger than memory, on one machine or on a Dask cluster.

The systems are read block by block (:mod:`minidp.io.systems`); on top of that:

- :func:`stream_eval` yields (Block, Prediction) block by block, frames of
  per-frame types evaluated one kind at a time (:func:`minidp.io.systems.by_kind`);
- :func:`write_labelled_stream` writes a system labelled by the model into
  memory-mapped ``.npy`` files, block by block, in a temporary folder that is
  moved into place only when complete (:func:`minidp.io.outputs.safe_output`);
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

import functools
from pathlib import Path
from typing import Iterator

import numpy as np

from minidp.checks import positive_int
from minidp.infer import DeepPot
from minidp.io.outputs import safe_output
from minidp.io.systems import (
    OUTPUTS,
    PARAMS,
    REAL_TYPES,
    Block,
    LazySystem,
    block_types,
    by_kind,
    iter_blocks,
    lazy_system,
    model_types,
    read_frames,
    select_params,
    set_ranges,
)
from minidp.model import Prediction


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
    deepmd/npy/mixed for a mixed system). The caller makes it safe (:func:`minidp.io.outputs.safe_output`)."""
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
    (:func:`minidp.io.outputs.safe_output`).
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
