"""Chunked inference with deepmd-kit's ``DeepPot`` interface.

``DeepPot(model_file).eval(coords, cells, atom_types)`` returns what
deepmd-kit's ``deepmd.infer.DeepPot`` returns, with the same shapes, so the
tutorial's code runs unchanged after ``from minidp import DeepPot``:

- ``e``: (nf, 1) energy, ``f``: (nf, natoms, 3) forces, ``v``: (nf, 9) virial;
- with ``atomic=True`` also ``ae``: (nf, natoms, 1) and ``av``: (nf, natoms, 9).

How the work is split (:func:`plan_chunks`): frames are taken together up to
``batch_size`` atoms (deepmd-kit's ``DP_INFER_BATCH_SIZE``); a frame larger
than that is split over its centre atoms, whose shares of the energy, forces
and virials add up. ``batch_size`` follows from a byte budget, so the memory a
call needs is bounded whatever the number or the size of the frames, and the
results do not depend on it (to round-off). Chunks run on ``workers`` threads:
NumPy, BLAS and the Numba kernels release the GIL, and each task's BLAS is
kept to one core while it runs, so the threads do not fight over them
(:mod:`minidp.runtime` holds that setting and the malloc tuning, with its
opt-out). The inputs are checked here, once per call (``backend`` when the
DeepPot is made: "numba" (default), "numpy", or "reference", the plain path of
:mod:`minidp.se_e2_a`; the frames by :func:`check_frames` and the cells by
:func:`minidp.neighbor.check_cells`); the chunks' neighbour searches and model
evaluations trust them.
:meth:`DeepPot.iter_eval` yields the results frame group by frame group, for
datasets that should never be held in memory at once.

Shape symbols: ``nf`` frames, ``natoms`` atoms per frame (``nloc`` inside the
model), see :mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple

import numpy as np

from minidp import checks, runtime
from minidp.runtime import default_workers
from minidp.checks import FrameError, positive_int, real_array
from minidp.model import EnergyModel, Prediction, pair_gradients, predict_frames, scatter_pairs
from minidp.neighbor import NeighborList, check_cells, search_neighbors
from minidp.se_e2_a import descriptor_forward
from minidp.serialization import load_model

# ---------------------------------------------------------------------------
# How much work goes in one chunk
# ---------------------------------------------------------------------------


def bytes_per_atom(model: EnergyModel, backend: str = "numba") -> int:
    """Working memory (bytes) one centre atom needs in energy_forces, from the model's sizes.

    Per neighbour slot (float64 numbers): the neighbour list and r_ij (4), the
    environment matrix and its caches (10), the packed row, G and dG/ds
    (5 + 2 ng), the backward's gradients and temporaries (21). Per atom: T and
    dT (8 ng), D and dD (2 ng m2), and each fitting layer's caches and
    gradients (2 (n_in + 2 n_out)). The benchmark checks it against measured
    peak memory. The reference path also keeps, per slot, every embedding
    layer's caches (3 sum(neuron)) and dL/dG (ng).
    """
    cfg = model.descriptor.config
    per_slot = 4 + 10 + 5 + 2 * cfg.ng + 21
    if backend == "reference":
        per_slot += 3 * sum(cfg.neuron) + cfg.ng
    fit = sum(2 * (layer.n_in + 2 * layer.n_out) for layer in model.fitting[0].layers)
    return 8 * (cfg.nnei * per_slot + 8 * cfg.ng + 2 * cfg.dim_out + fit)


class Chunk(NamedTuple):
    """One unit of work: some frames, and which of their atoms are centres."""

    frames: slice  # frames of the call
    atoms: slice  # centre atoms (all of them unless a frame is larger than batch_size)


def plan_chunks(nf: int, natoms: int, batch_size: int, workers: int = 1) -> list[Chunk]:
    """Split nf frames of natoms atoms into chunks of at most batch_size centre atoms.

    Whole frames go together while they fit; a larger frame is cut into
    near-equal ranges of centre atoms. Chunks are also made small enough that
    every worker gets one (a single frame in an MD step is split over the
    workers rather than evaluated on one of them).
    """
    if natoms == 0:
        # no centre atoms: one chunk of all frames, whose energies are empty sums (0) and forces (nf, 0, 3)
        return [Chunk(slice(0, nf), slice(0, 0))]
    size = max(1, min(batch_size, math.ceil(nf * natoms / workers)))
    if natoms <= size:
        step = size // natoms
        return [Chunk(slice(f, min(f + step, nf)), slice(0, natoms)) for f in range(0, nf, step)]
    cuts = np.linspace(0, natoms, math.ceil(natoms / size) + 1).round().astype(int)
    return [Chunk(slice(f, f + 1), slice(int(a), int(b))) for f in range(nf) for a, b in zip(cuts[:-1], cuts[1:])]


# Chunks beyond a few hundred atoms gain nothing in speed (the embedding works
# in fixed row blocks anyway) and lose some to caches: the benchmark measured
# 192-384-atom chunks ~12% faster than 960-atom ones. A budget only lowers it.
FASTEST_CHUNK = 384


def default_batch_size(model: EnergyModel, memory_budget: int | None = None, workers: int = 1,
                       backend: str = "numba") -> int:
    """Atoms per chunk: at most FASTEST_CHUNK, and few enough that the chunks
    computing at once (one per worker) fit the byte budget.

    The default budget is a quarter of the machine's available memory, at
    most 4 GiB.
    """
    if memory_budget is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
        memory_budget = min(free // 4, 4 << 30)
    return int(max(1, min(FASTEST_CHUNK, memory_budget // (workers * bytes_per_atom(model, backend)))))


# ---------------------------------------------------------------------------
# Input checking at the public boundary
# ---------------------------------------------------------------------------


class Frames(NamedTuple):
    """Validated inputs: float64 arrays in minidp's layout."""

    coords: np.ndarray  # (nf, natoms, 3)
    cells: np.ndarray | None  # (nf, 3, 3) lattice vectors as rows, or None (open boundary)
    atom_types: np.ndarray  # (natoms,) int


def check_frames(coords, cells, atom_types, ntypes: int) -> Frames:
    """Reshape and validate deepmd-kit-style inputs (raising ValueError/TypeError naming the problem)."""
    types = np.asarray(atom_types)
    rows = types.shape[0] if types.ndim == 2 else None
    if types.ndim == 2 and types.shape[0] >= 1 and (types == types[0]).all():
        types = types[0]  # one row per frame, all alike (deepmd-kit accepts this)
    if types.ndim == 2:
        raise ValueError(f"atom_types must have shape (natoms,), got {types.shape} "
                         "(frames with different atom types are not supported)")
    if types.size == 0:
        types = types.astype(np.int64)  # [] is float64 to NumPy; an empty list names no type
    types = checks.atom_types(types, ntypes)
    natoms = types.size
    xyz = real_array("coords", coords)
    if natoms == 0:
        return _empty_frames(xyz, cells, rows)
    if xyz.size % (natoms * 3) != 0 or xyz.size == 0:
        raise ValueError(f"coords has shape {xyz.shape}, which does not hold (nframes, {natoms}, 3) "
                         f"for the {natoms} atoms in atom_types")
    # (nf, natoms, 3)
    xyz = xyz.reshape(-1, natoms, 3)
    nf = xyz.shape[0]
    if rows is not None and rows != nf:
        raise ValueError(f"atom_types has {rows} rows (one per frame) but coords holds {nf} frames")
    return Frames(xyz, _check_cells(cells, nf), types)


def _check_cells(cells, nf: int) -> np.ndarray | None:
    """cells as (nf, 3, 3) lattice vectors in rows, or None (open boundaries)."""
    if cells is None:
        return None
    box = real_array("cells", cells)
    if box.size != nf * 9:
        raise ValueError(f"cells has shape {box.shape}; expected ({nf}, 9) or ({nf}, 3, 3) "
                         f"for {nf} frames, or None for open boundaries")
    # (nf, 3, 3)
    return box.reshape(nf, 3, 3)


def _empty_frames(xyz: np.ndarray, cells, rows: int | None) -> Frames:
    """Frames of zero atoms (deepmd-kit's DeepPot takes them: energy 0, forces (nf, 0, 3)).

    With no atoms the size of coords cannot tell the frames apart: its first axis counts them,
    coords of shape (nf, 0, 3) or (nf, 0); a flat empty coords is one frame, as a flat coords is.
    """
    if xyz.size != 0 or xyz.ndim > 3 or (xyz.ndim == 3 and xyz.shape[2] != 3):
        raise ValueError(f"coords has shape {xyz.shape} but atom_types is empty; expected (nframes, 0, 3) "
                         "for frames of no atoms")
    nf = xyz.shape[0] if xyz.ndim >= 2 else 1
    if nf == 0:
        raise ValueError(f"coords has shape {xyz.shape}: no frames; expected (nframes, 0, 3) with nframes >= 1")
    if rows is not None and rows != nf:
        raise ValueError(f"atom_types has {rows} rows (one per frame) but coords holds {nf} frames")
    # (nf, 0, 3)
    return Frames(xyz.reshape(nf, 0, 3), _check_cells(cells, nf), np.zeros(0, dtype=np.int64))


def compact_atoms(nlist: np.ndarray, centers: slice) -> tuple[np.ndarray, np.ndarray, int]:
    """Number a chunk's atoms compactly: the centres and the neighbours their pairs reach.

    A chunk of a large frame touches only the atoms within rcut of its
    centres; its forces and atomic virials are computed over those alone
    (not over the whole frame, which would cost the frame's size per chunk).
    Returns touched (ntouched,) frame indices, sorted; nlist renumbered into them
    (-1 kept); and where the centres start among them.
    """
    valid = nlist >= 0
    # (ntouched,), (nc + number of real pairs,)
    touched, local = np.unique(np.concatenate([np.arange(centers.start, centers.stop), nlist[valid]]),
                               return_inverse=True)
    # (nf, nc, nnei)
    renumbered = np.full_like(nlist, -1)
    renumbered[valid] = local[centers.stop - centers.start:]
    return touched, renumbered, int(np.searchsorted(touched, centers.start))


# ---------------------------------------------------------------------------
# DeepPot
# ---------------------------------------------------------------------------


class DeepPot:
    """A deepmd-kit se_e2_a energy model, evaluated by minidp.

    Parameters
    ----------
    model_file : path to a .dp / .yaml / .json model (or .pb / .pth with deepmd-kit installed),
        or an :class:`~minidp.model.EnergyModel` already in memory
    batch_size : centre atoms per chunk; default from ``memory_budget``
    memory_budget : bytes the chunks in flight may use (default: a quarter of available memory, at most 4 GiB)
    workers : threads evaluating chunks (default: OMP_NUM_THREADS, else the usable cores)
    progress : show a progress bar over chunks (None: only on a terminal)
    backend : "numba" (default), "numpy" (the same fast path in NumPy) or "reference"
        (the plain path of minidp.se_e2_a, every slot through the nets; slower, the one to read)
    keep_freed_memory : tune glibc to keep freed memory in the process (faster; see minidp.runtime,
        which also documents the MINIDP_KEEP_FREED_MEMORY=0 opt-out)
    """

    def __init__(self, model_file, *, batch_size: int | None = None, memory_budget: int | None = None,
                 workers: int | None = None, progress: bool | None = None, backend: str = "numba",
                 keep_freed_memory: bool = True):
        for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget), ("workers", workers)):
            if value is not None:
                positive_int(name, value)
        self.backend = checks.check_backend(backend)
        self.model_file = str(model_file)
        self.model = model_file if isinstance(model_file, EnergyModel) else load_model(model_file)
        self.workers = int(workers or default_workers())
        self.batch_size = int(batch_size or default_batch_size(self.model, memory_budget, self.workers, backend))
        self.progress = progress
        runtime.keep_freed_memory(keep_freed_memory)

    # --- deepmd-kit's getters ---
    def get_type_map(self) -> list[str]:
        return list(self.model.type_map)

    def get_rcut(self) -> float:
        return self.model.descriptor.config.rcut

    def get_ntypes(self) -> int:
        return self.model.ntypes

    def get_sel(self) -> list[int]:
        return list(self.model.descriptor.config.sel)

    def get_dim_fparam(self) -> int:
        return 0

    def get_dim_aparam(self) -> int:
        return 0

    def get_dim_descriptor(self) -> int:
        return self.model.descriptor.config.dim_out

    # --- the chunk machinery, shared by every evaluation ---
    def _neighbors(self, frames: Frames, chunk: Chunk) -> NeighborList:
        """The neighbours of a chunk's centre atoms (among all atoms of its frames); frames checked by _run."""
        cfg = self.model.descriptor.config
        cells = None if frames.cells is None else frames.cells[chunk.frames]
        try:
            return search_neighbors(frames.coords[chunk.frames], cells, frames.atom_types, cfg.rcut, cfg.sel,
                                    self.backend, chunk.atoms)
        except FrameError as err:  # numbered within the chunk: renumber within the call
            raise err.shifted(chunk.frames.start) from None

    def _run(self, frames: Frames, work: Callable[[NeighborList, Chunk], object]) -> Iterator[tuple[Chunk, object]]:
        """Yield (chunk, work(neighbours of its centres, chunk)) in order, chunks on worker threads.

        Each chunk builds its own neighbour list on its worker. At most
        workers + 1 chunks are submitted at once, which bounds the memory.
        With several workers each task limits BLAS to one thread while it
        runs (minidp.runtime.one_blas_thread), not the caller's loop.
        """
        from tqdm.auto import tqdm

        nf, natoms, _ = frames.coords.shape
        if frames.cells is not None:  # once per call: the chunks' searches trust the cells
            check_cells(frames.cells, self.model.descriptor.config.rcut)
        chunks = plan_chunks(nf, natoms, self.batch_size, self.workers)
        limit = runtime.one_blas_thread if self.workers > 1 else contextlib.nullcontext

        def task(chunk: Chunk):
            with limit():
                return work(self._neighbors(frames, chunk), chunk)

        # disable=None: tqdm shows the bar only when stderr is a terminal
        bar = tqdm(total=len(chunks), desc="minidp", unit="chunk", leave=False,
                   disable=None if self.progress is None else not self.progress)
        with bar, ThreadPoolExecutor(self.workers) as pool:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append((chunk, pool.submit(task, chunk)))
                while len(pending) > self.workers or (chunk is chunks[-1] and pending):
                    done, future = pending.popleft()
                    bar.update()
                    yield done, future.result()

    def _predict(self, frames: Frames, models: tuple[EnergyModel, ...] | None = None
                 ) -> Iterator[tuple[slice, Prediction]]:
        """(frame slice, Prediction) per group of whole frames, summing the atom chunks of big frames.

        With ``models`` (an ensemble sharing this model's rcut and sel), each
        chunk's neighbour list serves all of them and a tuple of Predictions
        (one per model) is yielded instead.
        """
        nf, natoms, _ = frames.coords.shape
        many = models is not None
        models = models if many else (self.model,)

        def work(nl: NeighborList, chunk: Chunk) -> tuple[np.ndarray | None, list[Prediction]]:
            types = frames.atom_types[chunk.atoms]
            if chunk.atoms.stop - chunk.atoms.start == natoms:
                return None, [predict_frames(nl.rij, nl.nlist, types, m, self.backend) for m in models]
            return self._chunk_shares(nl, chunk, types, models)

        totals = None
        for chunk, (touched, ps) in self._run(frames, work):
            if touched is None:
                yield chunk.frames, (tuple(ps) if many else ps[0])
                continue
            # a big frame: add this chunk's share, on the atoms its pairs touch
            if chunk.atoms.start == 0:
                totals = [Prediction(np.zeros(1), np.zeros((1, natoms, 3)), np.zeros((1, 9)),
                                     np.zeros((1, natoms)), np.zeros((1, natoms, 9))) for _ in models]
            for total, p in zip(totals, ps):
                total.energy[:] += p.energy
                total.virial[:] += p.virial
                total.force[:, touched] += p.force
                total.atom_virial[:, touched] += p.atom_virial
                total.atom_energy[:, chunk.atoms] = p.atom_energy
            if chunk.atoms.stop == natoms:
                yield chunk.frames, (tuple(totals) if many else totals[0])

    def _chunk_shares(self, nl: NeighborList, chunk: Chunk, types: np.ndarray, models: tuple[EnergyModel, ...]
                      ) -> tuple[np.ndarray, list[Prediction]]:
        """A chunk of a big frame: its centres' energies, and its pairs' shares of the forces and
        virials on the atoms they touch (touched (ntouched,) frame indices; a Prediction over those
        ntouched atoms per model)."""
        touched, nlist, first = compact_atoms(nl.nlist, chunk.atoms)
        shares = []
        for model in models:
            E_atom, g = pair_gradients(nl.rij, nl.nlist, types, model, self.backend)
            # (nf, ntouched, 3), (nf, ntouched, 9)  nf = 1: plan_chunks splits one frame at a time
            F = np.zeros((g.shape[0], touched.size, 3))
            W = np.zeros((g.shape[0], touched.size, 9))
            scatter_pairs(g, nl.rij, nlist, F, W, first, self.backend)
            shares.append(Prediction(E_atom.sum(axis=1), F, W.sum(axis=1), E_atom, W))
        return touched, shares

    # --- evaluation ---
    def iter_eval(self, coords, cells, atom_types) -> Iterator[tuple[slice, Prediction]]:
        """Yield (frame slice, Prediction) group by group; nothing is accumulated.

        Prediction fields: energy (n,), force (n, natoms, 3), virial (n, 9),
        atom_energy (n, natoms), atom_virial (n, natoms, 9) for the n frames of the slice.
        """
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        yield from self._predict(frames)

    def eval(self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None,
             mixed_type: bool = False, **kwargs):
        """Energy (nf, 1), force (nf, natoms, 3), virial (nf, 9) [, atom energy (nf, natoms, 1),
        atom virial (nf, natoms, 9)], as deepmd-kit's DeepPot.eval."""
        self._refuse_extras(fparam, aparam, mixed_type, kwargs)
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        nf, natoms, _ = frames.coords.shape
        # (nf, 1), (nf, natoms, 3), (nf, 9), and with atomic (nf, natoms, 1), (nf, natoms, 9)
        e, f, v = np.empty((nf, 1)), np.empty((nf, natoms, 3)), np.empty((nf, 9))
        ae, av = (np.empty((nf, natoms, 1)), np.empty((nf, natoms, 9))) if atomic else (None, None)
        for fs, p in self._predict(frames):
            e[fs, 0], f[fs], v[fs] = p.energy, p.force, p.virial
            if atomic:
                ae[fs, :, 0], av[fs] = p.atom_energy, p.atom_virial
        return (e, f, v, ae, av) if atomic else (e, f, v)

    def eval_descriptor(self, coords, cells, atom_types, fparam=None, aparam=None,
                        mixed_type: bool = False, **kwargs) -> np.ndarray:
        """The se_e2_a descriptor D, (nf, natoms, ng * m2) (1600 for the water model)."""
        self._refuse_extras(fparam, aparam, mixed_type, kwargs)
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        nf, natoms, _ = frames.coords.shape
        # (nf, natoms, ng * m2)
        out = np.empty((nf, natoms, self.get_dim_descriptor()))

        def work(nl: NeighborList, chunk: Chunk) -> np.ndarray:
            D, _ = descriptor_forward(nl.rij, nl.nlist, frames.atom_types[chunk.atoms], self.model.descriptor,
                                      self.backend)
            return D

        for chunk, D in self._run(frames, work):
            out[chunk.frames, chunk.atoms] = D
        return out

    @staticmethod
    def _refuse_extras(fparam, aparam, mixed_type, kwargs) -> None:
        if fparam is not None or aparam is not None:
            raise ValueError("this model takes no fparam/aparam (its dim_fparam and dim_aparam are 0)")
        if mixed_type:
            raise ValueError("mixed_type=True is not supported: pass one atom_types row for all frames")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
