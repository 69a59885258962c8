"""Chunked inference with deepmd-kit's ``DeepPot`` interface.

``DeepPot(model_file).eval(coords, cells, atom_types)`` returns what
deepmd-kit's ``deepmd.infer.DeepPot`` returns, with the same shapes, so the
tutorial's code runs unchanged after ``from minidp import DeepPot``:

- ``e``: (nf, 1) energy, ``f``: (nf, natoms, 3) forces, ``v``: (nf, 9) virial;
- with ``atomic=True`` also ``ae``: (nf, natoms, 1) and ``av``: (nf, natoms, 9).

A model with frame or atomic parameters takes them as deepmd-kit does
(``fparam``, ``aparam``; the shapes :func:`check_params` accepts), and
atom types may differ from frame to frame (an (nf, natoms) ``atom_types``,
deepmd-kit's ``mixed_type``; -1 marks a padding atom, which is left out).
The other getters of deepmd-kit's DeepPot are here too (``get_dim_fparam``,
``get_sel_type``, ``get_model_def_script``, ...), and
:meth:`DeepPot.eval_fitting_last_layer`.

How the work is split (:func:`plan_chunks`): frames are taken together up to
``batch_size`` atoms (deepmd-kit's ``DP_INFER_BATCH_SIZE``); a frame larger
than that is split over its centre atoms, whose shares of the energy, forces
and virials add up. The default size is the fastest one within a byte budget
(a size to aim at; the budget is the bound), so the memory a call needs is
bounded whatever the number or the size of the frames, and the results do not
depend on it (to round-off). Chunks run on ``workers`` threads, kept from call to call:
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
import copy
import math
import os
import weakref
from typing import Callable, Iterator, NamedTuple

import numpy as np

from minidp import checks, runtime
from minidp.checks import FrameError, positive_int, real_array
from minidp.io.serialization import load_model
from minidp.io.systems import frame_kinds
from minidp.model import (
    EnergyModel,
    FitParams,
    FittingInput,
    Prediction,
    fitting_last_layer,
    pair_gradients,
    predict_frames,
    scatter_pairs,
)
from minidp.neighbor import (
    NeighborList,
    ase_primitive_list,
    check_cells,
    extend_frame,
    read_ase_pairs,
    search_neighbors,
)
from minidp.runtime import default_workers
from minidp.se_e2_a import descriptor_forward
from minidp.type_embed import type_vectors

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


def plan_chunks(nf: int, natoms: int, batch_size: int, workers: int = 1, limit: int | None = None) -> list[Chunk]:
    """Split nf frames of natoms atoms into chunks of about batch_size centre atoms, at most ``limit``.

    Whole frames go together while they fit; a larger frame is cut into
    near-equal ranges of centre atoms, as many as natoms / batch_size rounded
    to the nearest count, and at least as many as ``limit`` (default
    batch_size: then no chunk is larger than batch_size) requires. Chunks are
    also made small enough that every worker gets one (a single frame in an
    MD step is split over the workers rather than evaluated on one of them).
    """
    if natoms == 0:
        # no centre atoms: one chunk of all frames, whose energies are empty sums (0) and forces (nf, 0, 3)
        return [Chunk(slice(0, nf), slice(0, 0))]
    share = math.ceil(nf * natoms / workers)
    size = max(1, min(batch_size, share))
    if natoms <= size:
        step = size // natoms
        return [Chunk(slice(f, min(f + step, nf)), slice(0, natoms)) for f in range(0, nf, step)]
    # Rounding, not rounding up: a frame a few atoms over a multiple of the size (an MD rank's 770
    # atoms at 384) would get one more, smaller chunk, and each chunk costs a neighbour-cell pass over
    # all the frame's atoms and runs its nets on fewer rows (measured: 3 chunks of 257 atoms 6% slower
    # than 2 of 385, compressed water model).
    most = max(1, min(size if limit is None else max(limit, size), share))
    count = max(round(natoms / size), math.ceil(natoms / most))
    cuts = np.linspace(0, natoms, count + 1).round().astype(int)
    return [Chunk(slice(f, f + 1), slice(int(a), int(b))) for f in range(nf) for a, b in zip(cuts[:-1], cuts[1:])]


# Chunks beyond a few hundred atoms gain nothing in speed (the embedding works
# in row blocks of a size of its own, se_e2_a.row_block) and lose some to caches: the benchmark measured
# 192-384-atom chunks ~12% faster than 960-atom ones. A budget only lowers it.
FASTEST_CHUNK = 384


def memory_batch_size(model: EnergyModel, memory_budget: int | None = None, workers: int = 1,
                      backend: str = "numba") -> int:
    """The most atoms per chunk for which the chunks computing at once (one per worker) fit the byte
    budget. The default budget is a quarter of the machine's available memory, at most 4 GiB."""
    if memory_budget is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
        memory_budget = min(free // 4, 4 << 30)
    return int(max(1, memory_budget // (workers * bytes_per_atom(model, backend))))


def default_batch_size(model: EnergyModel, memory_budget: int | None = None, workers: int = 1,
                       backend: str = "numba") -> int:
    """Atoms per chunk: at most FASTEST_CHUNK, and few enough that the chunks
    computing at once fit the byte budget (:func:`memory_batch_size`)."""
    return min(FASTEST_CHUNK, memory_batch_size(model, memory_budget, workers, backend))


# ---------------------------------------------------------------------------
# Input checking at the public boundary
# ---------------------------------------------------------------------------


class Frames(NamedTuple):
    """Validated inputs: float64 arrays in minidp's layout."""

    coords: np.ndarray  # (nf, natoms, 3)
    cells: np.ndarray | None  # (nf, 3, 3) lattice vectors as rows, or None (open boundary)
    atom_types: np.ndarray  # (natoms,) int; (nf, natoms) per frame (-1: padding) with per_frame=True
    fparam: np.ndarray | None = None  # (nf, nfp) frame parameters, or None (none, or the model's default)
    aparam: np.ndarray | None = None  # (nf, natoms, nap) atomic parameters, or None

    def params(self, frames: slice | np.ndarray, atoms: slice | np.ndarray) -> FitParams:
        """The parameters of some frames and atoms (a chunk, a kind of frame)."""
        return FitParams(None if self.fparam is None else self.fparam[frames],
                         None if self.aparam is None else self.aparam[frames][:, atoms])






def _per_frame_types(types: np.ndarray, ntypes: int) -> np.ndarray:
    """(nf, natoms) integer types in -1..ntypes-1 (-1: a padding atom), or TypeError/ValueError."""
    if types.dtype == bool or not np.issubdtype(types.dtype, np.integer):
        raise checks.InputTypeError(f"atom_types must be integers, got dtype {types.dtype}")
    if types.size and (types.min() < -1 or types.max() >= ntypes):
        bad = types[(types < -1) | (types >= ntypes)][0]
        raise ValueError(f"atom type {bad} is outside the model's types 0..{ntypes - 1} (-1 for a padding atom)")
    return types.astype(np.int64)


def check_frames(coords, cells, atom_types, ntypes: int, per_frame: bool = False) -> Frames:
    """Reshape and validate deepmd-kit-style inputs (raising ValueError/TypeError naming the problem).

    atom_types (natoms,), or (nf, natoms) one row per frame: rows all alike
    become one row; rows that differ are refused unless ``per_frame`` (then
    kept, -1 allowed for a padding atom: deepmd-kit's mixed_type).
    """
    types = np.asarray(atom_types)
    rows = types.shape[0] if types.ndim == 2 else None
    if types.ndim == 2 and types.shape[0] >= 1 and (types == types[0]).all() and (types[0] >= 0).all():
        types = types[0]  # one row per frame, all alike (deepmd-kit accepts this)
    if types.ndim == 2 and not per_frame:
        raise ValueError(f"atom_types must have shape (natoms,), got {types.shape} "
                         "(frames with different atom types, or padding atoms of type -1, are not supported here)")
    if types.ndim == 2:
        types = _per_frame_types(types, ntypes)
    else:
        if types.size == 0:
            types = types.astype(np.int64)  # [] is float64 to NumPy; an empty list names no type
        types = checks.atom_types(types, ntypes)
    natoms = types.shape[-1]
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


def check_params(fparam, aparam, nf: int, natoms: int, spec: FittingInput
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """fparam as (nf, nfp) and aparam as (nf, natoms, nap), or None; deepmd-kit's shapes, told apart by size.

    fparam: nf * nfp numbers (one row per frame) or nfp (the same for every
    frame); None takes the model's default_fparam. aparam: nf * natoms * nap,
    natoms * nap (the same for every frame) or nap (the same for every atom).
    A model that needs one and has none, or a wrong size, is refused in one line.
    """
    nfp, nap = spec.numb_fparam, spec.numb_aparam
    if fparam is not None:
        fparam = real_array("fparam", fparam)
        if fparam.size and not nfp:
            raise ValueError(f"fparam has shape {fparam.shape} but this model takes no fparam (numb_fparam = 0)")
        if fparam.size not in (nf * nfp, nfp):
            raise ValueError(f"fparam has shape {fparam.shape}; this model takes {nfp} numbers per frame "
                             f"(numb_fparam): expected ({nf}, {nfp}) or ({nfp},)")
        # (nf, nfp)
        fparam = np.broadcast_to(fparam.reshape(-1, nfp), (nf, nfp)) if nfp else None
    elif nfp and spec.default_fparam is None:
        raise ValueError(f"this model needs fparam ({nfp} numbers per frame, numb_fparam) and has no "
                         "default_fparam; pass fparam")
    if aparam is not None:
        aparam = real_array("aparam", aparam)
        if aparam.size and not nap:
            raise ValueError(f"aparam has shape {aparam.shape} but this model takes no aparam (numb_aparam = 0)")
        if aparam.size not in (nf * natoms * nap, natoms * nap, nap):
            raise ValueError(f"aparam has shape {aparam.shape}; this model takes {nap} numbers per atom "
                             f"(numb_aparam): expected ({nf}, {natoms}, {nap}), ({natoms}, {nap}) or ({nap},)")
        if nap == 0 or natoms == 0:
            # (nf, 0, nap) for frames of no atoms
            aparam = None if nap == 0 else np.zeros((nf, 0, nap))
        elif aparam.size == nap:  # one atom's values, for every atom of every frame
            # (nf, natoms, nap)
            aparam = np.broadcast_to(aparam.reshape(1, 1, nap), (nf, natoms, nap))
        else:  # every frame's, or one frame's for every frame
            # (nf, natoms, nap)
            aparam = np.broadcast_to(aparam.reshape(-1, natoms, nap), (nf, natoms, nap))
    elif nap and not spec.use_aparam_as_mask:
        raise ValueError(f"this model needs aparam ({nap} numbers per atom, numb_aparam); pass aparam")
    return fparam, aparam


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
    batch_size : centre atoms per chunk, at most; default: about FASTEST_CHUNK (a frame is cut into the
        nearest number of near-equal chunks), fewer if ``memory_budget`` needs, never more than it allows
    memory_budget : bytes the chunks in flight may use (default: a quarter of available memory, at most 4 GiB)
    workers : threads evaluating chunks (default: OMP_NUM_THREADS, else the usable cores)
    progress : show a progress bar over chunks (None: only on a terminal)
    backend : "numba" (default), "numpy" (the same fast path in NumPy) or "reference"
        (the plain path of minidp.se_e2_a, every slot through the nets; slower, the one to read)
    keep_freed_memory : tune glibc to keep freed memory in the process (faster; see minidp.runtime,
        which also documents the MINIDP_KEEP_FREED_MEMORY=0 opt-out)
    neighbor_list : an ASE neighbour list (ase.neighborlist.NewPrimitiveNeighborList, as deepmd-kit's
        DeepPot takes it, PrimitiveNeighborList or NeighborList) that :meth:`eval` then updates and
        evaluates with, one frame per call: the pairs it names within rcut are the neighbours
        (a half list is completed with its reverse pairs); build it with cutoffs >= rcut for the
        results of the model's own search
    """

    def __init__(self, model_file, *, batch_size: int | None = None, memory_budget: int | None = None,
                 workers: int | None = None, progress: bool | None = None, backend: str = "numba",
                 keep_freed_memory: bool = True, neighbor_list=None):
        for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget), ("workers", workers)):
            if value is not None:
                positive_int(name, value)
        self.backend = checks.check_backend(backend)
        self.model_file = str(model_file)
        self.model = model_file if isinstance(model_file, EnergyModel) else load_model(model_file)
        self.workers = int(workers or default_workers())
        self.batch_size = int(batch_size or default_batch_size(self.model, memory_budget, self.workers, backend))
        # a batch_size given is a bound; the default one only a size to aim at, within the memory budget
        self.batch_limit = int(batch_size or memory_batch_size(self.model, memory_budget, self.workers, backend))
        self.progress = progress
        self.neighbor_list = None if neighbor_list is None else ase_primitive_list(neighbor_list)
        runtime.keep_freed_memory(keep_freed_memory)
        # the chunks' threads, kept from call to call (an MD run calls once a step: fresh threads cost
        # 1-2 ms a call); they end when this DeepPot is collected, and a pickled or forked copy starts its
        # own (runtime.Workers)
        self._threads = runtime.Workers(self.workers)
        weakref.finalize(self, self._threads.close, False)

    # --- deepmd-kit's getters ---
    def get_type_map(self) -> list[str]:
        return list(self.model.type_map)

    def get_rcut(self) -> float:
        return self.model.descriptor.config.rcut

    def get_ntypes(self) -> int:
        return self.model.ntypes

    def get_sel(self) -> list[int]:
        return list(self.model.descriptor.config.sel)

    def eval_typeebd(self) -> np.ndarray:
        """The type vectors e_t (ntypes, ne) of se_e2_a with a type embedding (deepmd-kit's eval_typeebd;
        se_e2_a never reads a padding row, so there is none); ValueError for a model without one."""
        if self.model.type_embedding is None:
            raise ValueError("this model has no type embedding (eval_typeebd is for se_e2_a with a type embedding)")
        return type_vectors(self.model.type_embedding.net)

    def get_dim_fparam(self) -> int:
        """Numbers per frame the model takes as fparam (numb_fparam)."""
        return self.model.fitting_input.numb_fparam

    def get_dim_aparam(self) -> int:
        """Numbers per atom the model takes as aparam (numb_aparam; also with use_aparam_as_mask)."""
        return self.model.fitting_input.numb_aparam

    def has_default_fparam(self) -> bool:
        """Whether eval may be called without fparam (the model's default_fparam is then used)."""
        return self.model.fitting_input.default_fparam is not None

    def get_default_fparam(self) -> list[float] | None:
        default = self.model.fitting_input.default_fparam
        return None if default is None else default.tolist()

    def get_sel_type(self) -> list[int]:
        """The types whose atoms have an energy: all but the model's atom_exclude_types."""
        return self.model.sel_type

    def get_model_def_script(self) -> dict:
        """The model section of the training input, as the model file stores it ({} if it stores none)."""
        return copy.deepcopy(self.model.model_def_script)

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

    def _run(self, frames: Frames, work: Callable[[NeighborList, Chunk], object], centres: int | None = None,
             given: NeighborList | None = None) -> Iterator[tuple[Chunk, object]]:
        """Yield (chunk, work(neighbours of its centres, chunk)) in order, chunks on worker threads.

        The centres are a frame's first ``centres`` atoms (default: all of them). Each
        chunk builds its own neighbour list on its worker. At most
        workers + 1 chunks are submitted at once, which bounds the memory.
        ``given`` (one frame's centres' neighbours) replaces the search: each chunk takes its rows.
        With several workers each task limits BLAS to one thread while it
        runs (minidp.runtime.one_blas_thread), not the caller's loop.
        """
        from tqdm.auto import tqdm

        nf, natoms, _ = frames.coords.shape
        if frames.cells is not None:  # once per call: the chunks' searches trust the cells
            check_cells(frames.cells, self.model.descriptor.config.rcut)
        chunks = plan_chunks(nf, natoms if centres is None else centres, self.batch_size, self.workers,
                             self.batch_limit)
        limit = runtime.one_blas_thread if self.workers > 1 else contextlib.nullcontext

        def task(chunk: Chunk):
            with limit():
                nl = self._neighbors(frames, chunk) if given is None else NeighborList(
                    given.nlist[:, chunk.atoms], given.rij[:, chunk.atoms], 0)
                return work(nl, chunk)

        # disable=None: tqdm shows the bar only when stderr is a terminal
        bar = tqdm(total=len(chunks), desc="minidp", unit="chunk", leave=False,
                   disable=None if self.progress is None else not self.progress)
        with bar:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append((chunk, self._threads.submit(task, chunk)))
                while len(pending) > self.workers or (chunk is chunks[-1] and pending):
                    done, future = pending.popleft()
                    bar.update()
                    yield done, future.result()

    def _predict(self, frames: Frames, models: tuple[EnergyModel, ...] | None = None, centres: int | None = None,
                 given: NeighborList | None = None) -> Iterator[tuple[slice, Prediction]]:
        """(frame slice, Prediction) per group of whole frames, summing the atom chunks of big frames.

        With ``models`` (an ensemble sharing this model's rcut and sel), each
        chunk's neighbour list serves all of them and a tuple of Predictions
        (one per model) is yielded instead. With ``centres`` (one frame), only
        the first ``centres`` atoms are centres, the others neighbours only
        (:meth:`eval_extended`): atom_energy then has ``centres`` columns; ``given``: their neighbours.
        """
        nf, natoms, _ = frames.coords.shape
        many = models is not None
        models = models if many else (self.model,)
        ncentres = natoms if centres is None else centres

        def work(nl: NeighborList, chunk: Chunk) -> tuple[np.ndarray | None, list[Prediction]]:
            types = frames.atom_types[chunk.atoms]
            params = frames.params(chunk.frames, chunk.atoms)
            if chunk.atoms.stop - chunk.atoms.start == natoms:
                return None, [predict_frames(nl.rij, nl.nlist, types, m, self.backend, params) for m in models]
            return self._chunk_shares(nl, chunk, types, models, params)

        totals = None
        for chunk, (touched, ps) in self._run(frames, work, centres, given):
            if touched is None:
                yield chunk.frames, (tuple(ps) if many else ps[0])
                continue
            # a big frame: add this chunk's share, on the atoms its pairs touch
            if chunk.atoms.start == 0:
                totals = [Prediction(np.zeros(1), np.zeros((1, natoms, 3)), np.zeros((1, 9)),
                                     np.zeros((1, ncentres)), np.zeros((1, natoms, 9))) for _ in models]
            for total, p in zip(totals, ps):
                total.energy[:] += p.energy
                total.virial[:] += p.virial
                total.force[:, touched] += p.force
                total.atom_virial[:, touched] += p.atom_virial
                total.atom_energy[:, chunk.atoms] = p.atom_energy
            if chunk.atoms.stop == ncentres:
                yield chunk.frames, (tuple(totals) if many else totals[0])

    def _chunk_shares(self, nl: NeighborList, chunk: Chunk, types: np.ndarray, models: tuple[EnergyModel, ...],
                      params: FitParams) -> tuple[np.ndarray, list[Prediction]]:
        """A chunk of a big frame: its centres' energies, and its pairs' shares of the forces and
        virials on the atoms they touch (touched (ntouched,) frame indices; a Prediction over those
        ntouched atoms per model)."""
        touched, nlist, first = compact_atoms(nl.nlist, chunk.atoms)
        shares = []
        for model in models:
            E_atom, g = pair_gradients(nl.rij, nl.nlist, types, model, self.backend, params)
            # (nf, ntouched, 3), (nf, ntouched, 9)  nf = 1: plan_chunks splits one frame at a time
            F = np.zeros((g.shape[0], touched.size, 3))
            W = np.zeros((g.shape[0], touched.size, 9))
            scatter_pairs(g, nl.rij, nlist, F, W, first, self.backend)
            shares.append(Prediction(E_atom.sum(axis=1), F, W.sum(axis=1), E_atom, W))
        return touched, shares

    def _per_atom(self, frames: Frames, layer: Callable[[NeighborList, np.ndarray, FitParams], np.ndarray],
                  width: int) -> np.ndarray:
        """(nf, natoms, width): layer(neighbours, centre types, parameters) of every chunk, put in place."""
        nf, natoms, _ = frames.coords.shape
        # (nf, natoms, width)
        out = np.empty((nf, natoms, width))

        def work(nl: NeighborList, chunk: Chunk) -> np.ndarray:
            return layer(nl, frames.atom_types[chunk.atoms], frames.params(chunk.frames, chunk.atoms))

        for chunk, values in self._run(frames, work):
            out[chunk.frames, chunk.atoms] = values
        return out

    def check_inputs(self, coords, cells, atom_types, fparam=None, aparam=None, per_frame: bool = False) -> Frames:
        """:func:`check_frames`, then :func:`check_params` against this model: the checked Frames."""
        frames = check_frames(coords, cells, atom_types, self.model.ntypes, per_frame)
        nf, natoms, _ = frames.coords.shape
        fparam, aparam = check_params(fparam, aparam, nf, natoms, self.model.fitting_input)
        return frames._replace(fparam=fparam, aparam=aparam)

    def _by_kind(self, frames: Frames, evaluate: Callable[[Frames], tuple], shapes: tuple[tuple, ...]) -> tuple:
        """Arrays of the given shapes, (nf, k) per frame or (nf, natoms, k) per atom, filled with
        evaluate(frames of one kind) kind by kind (per-frame types; padding atoms stay 0)."""
        nf = frames.coords.shape[0]
        # each of shapes: (nf, k) or (nf, natoms, k), zero where an atom is padding
        outs = tuple(np.zeros(shape) for shape in shapes)
        per_atom = [len(shape) == 3 for shape in shapes]
        for kind in frame_kinds(frames.atom_types, nf):
            # (nk, na, 3), (nk, 3, 3) or None, (na,), (nk, nfp) or None, (nk, na, nap) or None
            sub = Frames(frames.coords[kind.rows][:, kind.atoms],
                         None if frames.cells is None else frames.cells[kind.rows], kind.types,
                         *frames.params(kind.rows, kind.atoms))
            try:
                results = evaluate(sub)
            except FrameError as err:  # numbered within the kind: renumber within the call
                raise FrameError(int(kind.rows[err.frame]), err.message) from None
            for out, value, atomwise in zip(outs, results, per_atom):
                if atomwise:
                    out[np.ix_(kind.rows, kind.atoms)] = value
                else:
                    out[kind.rows] = value
        return outs

    # --- evaluation ---
    def iter_eval(self, coords, cells, atom_types, fparam=None, aparam=None) -> Iterator[tuple[slice, Prediction]]:
        """Yield (frame slice, Prediction) group by group; nothing is accumulated.

        Prediction fields: energy (n,), force (n, natoms, 3), virial (n, 9),
        atom_energy (n, natoms), atom_virial (n, natoms, 9) for the n frames of
        the slice. One row of types for all frames; fparam, aparam as :meth:`eval`.
        """
        yield from self._predict(self.check_inputs(coords, cells, atom_types, fparam, aparam))

    def iter_eval_shared(self, coords, cells, atom_types, others=(), fparam=None, aparam=None
                         ) -> Iterator[tuple[slice, tuple[Prediction, ...]]]:
        """:meth:`iter_eval` for this model and ``others`` at once: one Prediction per model, this one first.

        Each chunk's neighbour list is built once and serves every model, as an
        ensemble's models share it (``dp model-devi``): ``others`` are DeepPots with
        this model's rcut, sel and type map. The chunks are this DeepPot's; fparam
        and aparam as :meth:`eval` takes them, checked against every model.
        """
        mine = (self.get_rcut(), self.get_sel(), self.get_type_map())
        for dp in others:
            if not isinstance(dp, DeepPot):
                raise TypeError(f"others must be DeepPot objects, got {type(dp).__name__}")
            if (dp.get_rcut(), dp.get_sel(), dp.get_type_map()) != mine:
                raise ValueError(f"{dp.model_file} (rcut, sel, type map {dp.get_rcut()}, {dp.get_sel()}, "
                                 f"{dp.get_type_map()}) cannot share the neighbour lists of {self.model_file} {mine}")
        frames = self.check_inputs(coords, cells, atom_types, fparam, aparam)
        nf, natoms, _ = frames.coords.shape
        for dp in others:  # one model may lack the default_fparam another has
            check_params(fparam, aparam, nf, natoms, dp.model.fitting_input)
        yield from self._predict(frames, (self.model, *(dp.model for dp in others)))

    def _eval_frames(self, frames: Frames, atomic: bool) -> tuple:
        """e (nf, 1), f (nf, natoms, 3), v (nf, 9) [, ae (nf, natoms, 1), av (nf, natoms, 9)] of frames
        with one row of types."""
        nf, natoms, _ = frames.coords.shape
        # (nf, 1), (nf, natoms, 3), (nf, 9), and with atomic (nf, natoms, 1), (nf, natoms, 9)
        e, f, v = np.empty((nf, 1)), np.empty((nf, natoms, 3)), np.empty((nf, 9))
        ae, av = (np.empty((nf, natoms, 1)), np.empty((nf, natoms, 9))) if atomic else (None, None)
        for fs, p in self._predict(frames):
            e[fs, 0], f[fs], v[fs] = p.energy, p.force, p.virial
            if atomic:
                ae[fs, :, 0], av[fs] = p.atom_energy, p.atom_virial
        return (e, f, v, ae, av) if atomic else (e, f, v)

    def eval_extended(self, coords, atom_types, nloc: int, fparam=None, aparam=None,
                      neighbors: NeighborList | None = None) -> Prediction:
        r"""The energy of the first nloc atoms of an open cluster, and its derivatives on every atom.

        The nall atoms are local ones (0..nloc-1, the centres) followed by atoms that are
        neighbours only (an MD engine's ghost atoms: images and other ranks' atoms):

            E = sum_{i < nloc} E_i,   F_k = -dE/dr_k (k < nall),   W = -sum_{i < nloc, j} g_ij (x) r_ij,

        and the atomic virial W_k = -sum_{(i, j): j = k} g_ij (x) r_ij (each pair's term on its
        neighbour, as in :func:`minidp.model.scatter_pairs`), so that sum_k W_k = W. Every pair
        (i, j) with i local is evaluated once; summing F_k and W_k of every image of an atom onto it
        gives that atom's exact force and virial. coords (nall, 3), atom_types (nall,), no cell (the
        ghosts are the images). Returns a Prediction of one frame: energy (1,), force (1, nall, 3),
        virial (1, 9), atom_energy (1, nloc), atom_virial (1, nall, 9). The centres' chunks run on
        the workers, as in :meth:`eval`. fparam (nfp,) and aparam ((nloc, nap) of the centres, or
        (nap,) for all) as :func:`check_params` takes them for one frame of nloc atoms. ``neighbors``:
        the centres' neighbours (nlist (1, nloc, nnei) into the nall atoms, in the sel layout, and
        their rij), used instead of a search (a caller's list, :meth:`eval` with ``neighbor_list``).
        """
        # (nall, 3), (nall,)
        x = real_array("coords", coords)
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"coords must have shape (nall, 3), got {x.shape}")
        types = checks.atom_types(atom_types, self.model.ntypes, x.shape[0])
        nloc = checks.integer("nloc", nloc, lo=0)
        if nloc > x.shape[0]:
            raise ValueError(f"nloc = {nloc} is more than the {x.shape[0]} atoms given")
        nall = x.shape[0]
        fparam, aparam = check_params(fparam, aparam, 1, nloc, self.model.fitting_input)
        nnei = sum(self.get_sel())
        if neighbors is not None and (neighbors.nlist.shape != (1, nloc, nnei)
                                      or neighbors.nlist.max(initial=-1) >= nall):
            raise ValueError(f"neighbors.nlist has shape {neighbors.nlist.shape} and largest index "
                             f"{neighbors.nlist.max(initial=-1)}; expected (1, {nloc}, {nnei}) into the {nall} atoms")
        if nloc == 0:
            # no centre, no energy (a rank that owns no atom): nothing to list
            return Prediction(np.zeros(1), np.zeros((1, nall, 3)), np.zeros((1, 9)), np.zeros((1, 0)),
                              np.zeros((1, nall, 9)))
        (_, p), = self._predict(Frames(x[None], None, types, fparam, aparam), centres=nloc, given=neighbors)
        return p

    def _eval_listed(self, frames: Frames, atomic: bool) -> tuple:
        """:meth:`eval` of one frame over the pairs the caller's ``neighbor_list`` names, as deepmd-kit's
        DeepPot evaluates with an ASE list: the frame and the images its pairs reach
        (:func:`minidp.neighbor.extend_frame`) evaluated as an open cluster (:meth:`eval_extended`),
        then each image's force and atomic virial added onto the atom it is an image of."""
        nf, natoms, _ = frames.coords.shape
        if nf != 1 or frames.atom_types.ndim != 1:
            raise ValueError(f"a DeepPot with a neighbor_list evaluates one frame of one row of atom types per call, "
                             f"got {nf} frames{'' if frames.atom_types.ndim == 1 else ' with per-frame types'}")
        cfg = self.model.descriptor.config
        if frames.cells is not None:
            check_cells(frames.cells, cfg.rcut)
        cell = None if frames.cells is None else frames.cells[0]
        pairs = read_ase_pairs(self.neighbor_list, frames.coords[0], cell)
        ext = extend_frame(frames.coords[0], cell, frames.atom_types, pairs, cfg.rcut, cfg.sel)
        p = self.eval_extended(ext.coords, ext.atom_types, natoms, None if frames.fparam is None else frames.fparam[0],
                               None if frames.aparam is None else frames.aparam[0], ext.neighbors)
        # (natoms, 3), (natoms, 9)  the atoms' own rows, then their images' rows added on
        force, atom_virial = p.force[0, :natoms].copy(), p.atom_virial[0, :natoms].copy()
        np.add.at(force, ext.owner, p.force[0, natoms:])
        np.add.at(atom_virial, ext.owner, p.atom_virial[0, natoms:])
        out = (p.energy.reshape(1, 1), force[None], p.virial.reshape(1, 9))
        return out + (p.atom_energy[:, :, None], atom_virial[None]) if atomic else out

    def eval(self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None,
             mixed_type: bool = False, **kwargs):
        """Energy (nf, 1), force (nf, natoms, 3), virial (nf, 9) [, atom energy (nf, natoms, 1),
        atom virial (nf, natoms, 9)], as deepmd-kit's DeepPot.eval.

        fparam, aparam: see :func:`check_params`. atom_types (natoms,), or
        (nf, natoms) with a row per frame (mixed_type; -1 marks a padding atom,
        whose outputs are 0). ``mixed_type`` is accepted for deepmd-kit's
        signature: the shape of atom_types says it.
        """
        self._refuse_kwargs(kwargs)
        frames = self.check_inputs(coords, cells, atom_types, fparam, aparam, per_frame=True)
        if self.neighbor_list is not None and frames.coords.shape[1]:
            return self._eval_listed(frames, atomic)
        if frames.atom_types.ndim == 1:
            return self._eval_frames(frames, atomic)
        nf, natoms, _ = frames.coords.shape
        shapes = [(nf, 1), (nf, natoms, 3), (nf, 9)] + ([(nf, natoms, 1), (nf, natoms, 9)] if atomic else [])
        return self._by_kind(frames, lambda sub: self._eval_frames(sub, atomic), tuple(shapes))

    def eval_descriptor(self, coords, cells, atom_types, fparam=None, aparam=None,
                        mixed_type: bool = False, **kwargs) -> np.ndarray:
        """The se_e2_a descriptor D, (nf, natoms, ng * m2) (1600 for the water model).

        fparam and aparam are checked as :meth:`eval` checks them (the descriptor does not read them).
        """
        self._refuse_kwargs(kwargs)
        frames = self.check_inputs(coords, cells, atom_types, fparam, aparam, per_frame=True)

        def descriptor(nl: NeighborList, types: np.ndarray, params: FitParams) -> np.ndarray:
            return descriptor_forward(nl.rij, nl.nlist, types, self.model.descriptor, self.backend)[0]

        return self._layer(frames, descriptor, self.get_dim_descriptor())

    def eval_fitting_last_layer(self, coords, cells, atom_types, fparam=None, aparam=None,
                                mixed_type: bool = False, **kwargs) -> np.ndarray:
        """The fitting nets' last hidden layer, (nf, natoms, neuron[-1]) (:func:`minidp.model.fitting_last_layer`:
        each atom's net without its final linear layer, on the descriptor and the parameters)."""
        self._refuse_kwargs(kwargs)
        frames = self.check_inputs(coords, cells, atom_types, fparam, aparam, per_frame=True)

        def last_layer(nl: NeighborList, types: np.ndarray, params: FitParams) -> np.ndarray:
            D, _ = descriptor_forward(nl.rij, nl.nlist, types, self.model.descriptor, self.backend)
            return fitting_last_layer(D, types, self.model, params)

        return self._layer(frames, last_layer, self.model.fitting[0].layers[-1].n_in)

    def _layer(self, frames: Frames, layer, width: int) -> np.ndarray:
        """(nf, natoms, width): a per-atom layer on frames of one row of types, or kind by kind."""
        if frames.atom_types.ndim == 1:
            return self._per_atom(frames, layer, width)
        nf, natoms, _ = frames.coords.shape
        return self._by_kind(frames, lambda sub: (self._per_atom(sub, layer, width),), ((nf, natoms, width),))[0]

    @staticmethod
    def _refuse_kwargs(kwargs) -> None:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
