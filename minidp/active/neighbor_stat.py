r"""Neighbour statistics of a dataset, as ``dp neighbor-stat`` computes them, and ``sel: "auto"``.

For every frame and atom i, with r_ij over every image j != i (periodic images
of i itself included) as in :mod:`minidp.neighbor`:

- the smallest neighbour distance  d_min = min_(frames, i, j) |r_ij|;
- the largest neighbour count per type  N_t = max_(frames, i) #{j of type t : |r_ij| < r_c}.

deepmd-kit counts with a strict ``<`` and starts d_min^2 at 100 (so 10 is the
largest distance it reports); minidp does the same. Its minimum runs over
every pair in the ghost region, minidp's over the pairs within r_c: they
differ only when no two atoms of the dataset are closer than r_c.

The work is minidp.neighbor's Numba cell list, linear in the number of
atoms; the frames are streamed from disk block by block
(:func:`minidp.io.systems.iter_blocks`), so the memory depends on the block, not
on the number of frames. The cell list needs a ``sel`` to size its slots: it
starts from an estimate and doubles a type's sel whenever a block had more
neighbours than it could hold, redoing that block.

``sel: "auto"`` / ``"auto:FACTOR"`` in a training input (deepmd-kit's
update_sel): sel_t = 4 ceil(floor(FACTOR N_t) / 4), FACTOR 1.1 by default.

Shape symbols: ``nf`` frames of a block, ``nloc`` atoms per frame, ``nnei``
neighbour slots, ``ntypes`` types.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

from minidp.io.systems import iter_blocks, lazy_system, model_types
from minidp.neighbor import build_neighbor_list

# deepmd-kit's starting value of the smallest squared distance
START_MIN_R2 = 100.0


class NeighborStat(NamedTuple):
    """The statistics of a dataset."""

    min_nbor_dist: float  # smallest neighbour distance (Angstrom)
    max_nbor_size: list[int]  # largest number of neighbours of each type within rcut


def block_stat(coords, cells, types: np.ndarray, rcut: float, ntypes: int, sel: list[int]
               ) -> tuple[float, np.ndarray, bool]:
    """(smallest r^2 within rcut, largest count per type (ntypes,), whether sel held every neighbour).

    coords (nf, nloc, 3), cells (nf, 3, 3) or None, types (nloc,) in 0..ntypes-1.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an overflow is handled by the caller
        nl = build_neighbor_list(coords, cells, types, rcut, sel)
    # (nf, nloc, nnei)
    r2 = np.einsum("fijk,fijk->fij", nl.rij, nl.rij)
    # (nf, nloc, nnei): real neighbours strictly within rcut (the list keeps r <= rcut)
    inside = (nl.nlist >= 0) & (r2 < rcut * rcut)
    sec = np.concatenate([[0], np.cumsum(sel)])
    # (ntypes,)
    counts = np.array([inside[..., sec[t]:sec[t + 1]].sum(axis=-1).max(initial=0) for t in range(ntypes)])
    min_r2 = float(r2[inside].min(initial=np.inf))
    return min_r2, counts, nl.n_over == 0


def estimate_sel(coords, cells, types: np.ndarray, rcut: float, ntypes: int) -> list[int]:
    """A first sel from the density of each type: 1.5 N_t (4/3) pi rc^3 / V + 8 (open systems: N_t)."""
    counts = np.bincount(types, minlength=ntypes)
    if cells is None:
        return [int(c) for c in counts]
    volume = abs(float(np.linalg.det(cells[0])))
    sphere = 4.0 / 3.0 * math.pi * rcut**3
    return [int(1.5 * c * sphere / volume) + 8 for c in counts]


def stat_blocks(blocks, rcut: float, ntypes: int) -> NeighborStat:
    """d_min and N_t over blocks (coords (nf, nloc, 3), cells (nf, 3, 3) or None, types (nloc,)), in order.

    ``sel`` starts from :func:`estimate_sel` and grows (doubling) until a block's neighbours all fit;
    it is kept between blocks, so a dataset of alike frames builds each block once.
    """
    if not (isinstance(rcut, (int, float)) and not isinstance(rcut, bool) and rcut > 0):
        raise ValueError(f"rcut must be a positive number, got {rcut!r}")
    min_r2, counts, sel = START_MIN_R2, np.zeros(ntypes, dtype=int), None
    for coords, cells, types in blocks:
        sel = sel or estimate_sel(coords, cells, types, rcut, ntypes)
        while True:
            r2, c, complete = block_stat(coords, cells, types, rcut, ntypes, sel)
            if complete:
                break
            sel = [2 * s + 4 for s in sel]
        if math.isclose(r2, 0.0, abs_tol=1e-12):
            raise ValueError("two atoms are on the same spot (distance 0); remove the duplicated atoms")
        min_r2, counts = min(min_r2, r2), np.maximum(counts, c)
    return NeighborStat(math.sqrt(min_r2), [int(c) for c in counts])


def neighbor_stat(systems, rcut: float, type_map: list[str] | None = None, frames_per_block: int = 64,
                  progress: bool | None = None) -> NeighborStat:
    """d_min and N_t over every frame of every system (deepmd/npy folders or deepmd/hdf5 files), streamed.

    ``type_map`` numbers the types (default: the first system's type_map.raw,
    then any new names of later systems appended).
    """
    from tqdm.auto import tqdm

    lazies = [lazy_system(s) for s in systems]
    if type_map is None:
        type_map = []
        for lazy in lazies:
            type_map += [n for n in lazy.atom_names if n not in type_map]
    # disable=None: the bar shows only on a terminal
    bar = tqdm(total=sum(s.nframes for s in lazies), desc="neighbor-stat", unit="frame",
               disable=None if progress is None else not progress)

    def blocks():
        for lazy in lazies:
            types = model_types(lazy.atom_names, lazy.atom_types, type_map)
            for block in iter_blocks(lazy, frames_per_block):
                yield block.coords, block.cells, types
                bar.update(block.coords.shape[0])

    with bar:
        return stat_blocks(blocks(), rcut, len(type_map))


def auto_sel(sel, max_nbor_size: list[int]) -> list[int] | None:
    """deepmd-kit's sel for ``"auto"`` / ``"auto:FACTOR"``: each count times FACTOR (1.1), rounded up to 4.

    Returns None when ``sel`` is not an "auto" string (the user's sel stands).
    """
    if not isinstance(sel, str):
        return None
    words = sel.split(":")
    if words[0] != "auto" or len(words) > 2:
        raise ValueError(f"sel must be a list of integers, 'auto' or 'auto:FACTOR', got {sel!r}")
    try:
        factor = float(words[1]) if len(words) == 2 else 1.1
    except ValueError:
        raise ValueError(f"the factor of sel {sel!r} is not a number") from None
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"the factor of sel {sel!r} must be a positive number")
    # deepmd-kit truncates the product to an integer first, then rounds up to a multiple of 4
    return [4 * ((int(n * factor) + 3) // 4) for n in max_nbor_size]
