"""Chunked inference with deepmd-kit's ``DeepPot`` interface.

``DeepPot(model_file).eval(coords, cells, atom_types)`` returns what
deepmd-kit's ``deepmd.infer.DeepPot`` returns, with the same shapes, so the
tutorial's code runs unchanged after ``from minidp import DeepPot``:

- ``e``: (nf, 1) energy, ``f``: (nf, natoms, 3) forces, ``v``: (nf, 9) virial;
- with ``atomic=True`` also ``ae``: (nf, natoms, 1) and ``av``: (nf, natoms, 9).

Frames are evaluated in chunks of at most ``batch_size`` atoms (frames x
atoms per frame, deepmd-kit's ``DP_INFER_BATCH_SIZE``), so the memory a call
needs is bounded whatever the number of frames. :meth:`DeepPot.iter_eval`
yields the results chunk by chunk for datasets that should never be held in
memory at once.

Shape symbols: ``nf`` frames, ``natoms`` atoms per frame (``nloc`` inside the
model), see :mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from minidp.model import EnergyModel, Prediction, energy_forces
from minidp.neighbor import build_neighbor_list
from minidp.se_e2_a import descriptor
from minidp.serialization import load_model

# Bytes of working memory per (atom, neighbour slot) in one evaluation: the
# embedding nets' layer caches (input, pre-activation and activation of every
# layer), G and the environment matrix, all float64. Used to turn a byte
# budget into a chunk size.


def bytes_per_atom(model: EnergyModel) -> int:
    """Working memory (bytes) one atom needs during energy_forces, estimated from the net sizes.

    Per neighbour slot: every embedding layer keeps x (n_in), z and a (n_out)
    for the backward, plus G (ng), R and its gradient (4 + 4) and r_ij (3);
    the fitting nets cost the same per atom. float64 = 8 bytes.
    """
    se = model.descriptor
    widths = (1,) + tuple(se.config.neuron)
    per_slot = sum(widths[k] + 2 * widths[k + 1] for k in range(len(widths) - 1))
    per_slot += se.config.ng + 4 + 4 + 3 + 3
    fit = model.fitting[0]
    per_atom_fit = sum(layer.n_in + 2 * layer.n_out for layer in fit.layers) + 3 * se.config.dim_out
    return 8 * (se.config.nnei * per_slot + per_atom_fit + se.config.ng * 4 * 3)


@dataclass(frozen=True)
class ChunkPlan:
    """How a call is split: frames per chunk."""

    frames_per_chunk: int  # frames evaluated together (at least 1)


def plan_chunks(natoms: int, batch_size: int) -> ChunkPlan:
    """Frames per chunk so that frames * natoms <= batch_size (always at least one frame)."""
    return ChunkPlan(max(1, batch_size // max(natoms, 1)))


def default_batch_size(model: EnergyModel, memory_budget: int | None = None) -> int:
    """Atoms per chunk: the byte budget (default: a quarter of the machine's free memory,
    at most 4 GiB) divided by the memory one atom needs."""
    if memory_budget is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
        memory_budget = min(free // 4, 4 << 30)
    return max(1, int(memory_budget // bytes_per_atom(model)))


# ---------------------------------------------------------------------------
# Input checking at the public boundary
# ---------------------------------------------------------------------------


class Frames(NamedTuple):
    """Validated inputs: float64 arrays in minidp's layout."""

    coords: np.ndarray  # (nf, natoms, 3)
    cells: np.ndarray | None  # (nf, 3, 3) lattice vectors as rows, or None (open boundary)
    atom_types: np.ndarray  # (natoms,) int


def _as_float_array(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be an array of real numbers, got dtype {arr.dtype}")
    # float32 data (the water example's coordinates) is widened before any
    # arithmetic: differences of float32 coordinates would lose 1e-7 relative
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} contains {arr[idx]} at index {idx}; expected finite numbers")
    return arr


def check_frames(coords, cells, atom_types, ntypes: int) -> Frames:
    """Reshape and validate deepmd-kit-style inputs (raising ValueError/TypeError naming the problem)."""
    types = np.asarray(atom_types)
    if not np.issubdtype(types.dtype, np.integer):
        raise TypeError(f"atom_types must be integers, got dtype {types.dtype}")
    if types.ndim == 2 and types.shape[0] >= 1 and (types == types[0]).all():
        types = types[0]  # one row per frame, all alike (deepmd-kit accepts this)
    if types.ndim != 1:
        raise ValueError(f"atom_types must have shape (natoms,), got {types.shape} "
                         "(frames with different atom types are not supported)")
    natoms = types.size
    if natoms == 0:
        raise ValueError("atom_types is empty; expected at least one atom")
    if types.min() < 0 or types.max() >= ntypes:
        bad = types[(types < 0) | (types >= ntypes)][0]
        raise ValueError(f"atom type {bad} is outside the model's types 0..{ntypes - 1}")
    xyz = _as_float_array("coords", coords)
    if xyz.size % (natoms * 3) != 0 or xyz.size == 0:
        raise ValueError(f"coords has shape {xyz.shape}, which does not hold (nframes, {natoms}, 3) "
                         f"for the {natoms} atoms in atom_types")
    # (nf, natoms, 3)
    xyz = xyz.reshape(-1, natoms, 3)
    nf = xyz.shape[0]
    if cells is None:
        return Frames(xyz, None, types)
    box = _as_float_array("cells", cells)
    if box.size != nf * 9:
        raise ValueError(f"cells has shape {box.shape}; expected ({nf}, 9) or ({nf}, 3, 3) "
                         f"for {nf} frames, or None for open boundaries")
    # (nf, 3, 3)
    return Frames(xyz, box.reshape(nf, 3, 3), types)


# ---------------------------------------------------------------------------
# DeepPot
# ---------------------------------------------------------------------------


class DeepPot:
    """A deepmd-kit se_e2_a energy model, evaluated by minidp.

    Parameters
    ----------
    model_file : path to a .dp / .yaml / .json model (or .pb / .pth with deepmd-kit installed)
    batch_size : atoms per chunk (frames x atoms); default from ``memory_budget``
    memory_budget : bytes a chunk may use (default: a quarter of free memory, at most 4 GiB)
    progress : show a progress bar over chunks (None: only on a terminal)
    """

    def __init__(self, model_file, *, batch_size: int | None = None,
                 memory_budget: int | None = None, progress: bool | None = None,
                 neighbor_backend: str = "numba"):
        self.model_file = str(model_file)
        self.model = load_model(model_file)
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer (atoms per chunk), got {batch_size!r}")
        self.batch_size = int(batch_size or default_batch_size(self.model, memory_budget))
        self.progress = progress
        self.neighbor_backend = neighbor_backend

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

    # --- evaluation ---
    def _chunks(self, frames: Frames) -> Iterator[tuple[slice, object]]:
        """(frame slice, neighbour list) per chunk, with a progress bar over chunks."""
        from tqdm.auto import tqdm

        nf, natoms, _ = frames.coords.shape
        step = plan_chunks(natoms, self.batch_size).frames_per_chunk
        starts = range(0, nf, step)
        # disable=None: tqdm shows the bar only when stderr is a terminal
        bar = tqdm(starts, desc="minidp", unit="chunk", leave=False,
                   disable=None if self.progress is None else not self.progress)
        cfg = self.model.descriptor.config
        for s in bar:
            sl = slice(s, min(s + step, nf))
            cells = None if frames.cells is None else frames.cells[sl]
            nl = build_neighbor_list(frames.coords[sl], cells, frames.atom_types, cfg.rcut,
                                     list(cfg.sel), backend=self.neighbor_backend)
            yield sl, nl

    def iter_eval(self, coords, cells, atom_types) -> Iterator[tuple[slice, Prediction]]:
        """Yield (frame slice, Prediction) chunk by chunk; nothing is accumulated."""
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        for sl, nl in self._chunks(frames):
            yield sl, energy_forces(nl.rij, nl.nlist, frames.atom_types, self.model)

    def eval(self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None,
             mixed_type: bool = False, **kwargs):
        """Energy (nf, 1), force (nf, natoms, 3), virial (nf, 9) [, atom energy (nf, natoms, 1),
        atom virial (nf, natoms, 9)], as deepmd-kit's DeepPot.eval."""
        self._refuse_extras(fparam, aparam, mixed_type, kwargs)
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        nf, natoms, _ = frames.coords.shape
        e, f, v = np.empty((nf, 1)), np.empty((nf, natoms, 3)), np.empty((nf, 9))
        ae, av = (np.empty((nf, natoms, 1)), np.empty((nf, natoms, 9))) if atomic else (None, None)
        for sl, nl in self._chunks(frames):
            p = energy_forces(nl.rij, nl.nlist, frames.atom_types, self.model)
            e[sl, 0], f[sl], v[sl] = p.energy, p.force, p.virial
            if atomic:
                ae[sl, :, 0], av[sl] = p.atom_energy, p.atom_virial
        return (e, f, v, ae, av) if atomic else (e, f, v)

    def eval_descriptor(self, coords, cells, atom_types, fparam=None, aparam=None,
                        mixed_type: bool = False, **kwargs) -> np.ndarray:
        """The se_e2_a descriptor D, (nf, natoms, ng * m2) (1600 for the water model)."""
        self._refuse_extras(fparam, aparam, mixed_type, kwargs)
        frames = check_frames(coords, cells, atom_types, self.model.ntypes)
        nf, natoms, _ = frames.coords.shape
        out = np.empty((nf, natoms, self.get_dim_descriptor()))
        for sl, nl in self._chunks(frames):
            out[sl], _ = descriptor(nl.rij, nl.nlist, frames.atom_types, self.model.descriptor)
        return out

    @staticmethod
    def _refuse_extras(fparam, aparam, mixed_type, kwargs) -> None:
        if fparam is not None or aparam is not None:
            raise ValueError("this model takes no fparam/aparam (its dim_fparam and dim_aparam are 0)")
        if mixed_type:
            raise ValueError("mixed_type=True is not supported: pass one atom_types row for all frames")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
