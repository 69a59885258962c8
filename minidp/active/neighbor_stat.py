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
from tqdm.auto import tqdm

from minidp.checks import FrameError, InputError, names, number
from minidp.io.systems import iter_blocks, lazy_system, model_types
from minidp.neighbor import build_neighbor_list

# deepmd-kit's starting value of the smallest squared distance
START_MIN_R2 = 100.0

# The most neighbour slots (frames x atoms x sum(sel)) one neighbour list holds: ~50 bytes each
# (index, r_ij, r^2 and masks), so about 200 MB
MAX_SLOTS = 2**22


class NeighborStat(NamedTuple):
    """The statistics of a dataset."""

    min_nbor_dist: float  # smallest neighbour distance (Angstrom)
    max_nbor_size: list[int]  # largest number of neighbours of each type within rcut


def block_stat(coords, cells, types: np.ndarray, rcut: float, ntypes: int, sel: list[int]
               ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(smallest r^2 within rcut of each frame (nf,), largest count per type (ntypes,), whether sel held
    every neighbour).

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
    # (nf,)
    min_r2 = np.where(inside, r2, np.inf).min(axis=(1, 2), initial=np.inf)
    return min_r2, counts, nl.n_over == 0


def estimate_sel(coords, cells, types: np.ndarray, rcut: float, ntypes: int) -> list[int]:
    """A first sel from the density of each type: 1.5 N_t (4/3) pi rc^3 / V + 8 (open systems: N_t).

    Only a start (stat_blocks doubles it as needed): a cell with no volume, which
    build_neighbor_list then refuses by frame, starts from N_t as well.
    """
    counts = np.bincount(types, minlength=ntypes)
    volume = None if cells is None else abs(float(np.linalg.det(cells[0])))
    # an absurd rcut (1e300) overflows rcut**3: no estimate then, as without a volume
    if volume is None or not (np.isfinite(volume) and volume > 0) or rcut > 1e100:
        return [int(c) for c in counts]
    sphere = 4.0 / 3.0 * math.pi * rcut**3
    return [int(1.5 * c * sphere / volume) + 8 for c in counts]


def _check_finite(coords, cells) -> None:
    """FrameError naming the first frame (of the block) with a NaN or inf coordinate or cell entry."""
    # (nf,)
    bad = ~np.isfinite(coords).all(axis=(1, 2))
    if cells is not None:
        bad |= ~np.isfinite(cells).all(axis=(1, 2))
    if bad.any():
        raise FrameError(int(np.argmax(bad)), "frame {frame} has a non-finite coordinate or cell entry")


def stat_blocks(blocks, rcut: float, ntypes: int) -> NeighborStat:
    """d_min and N_t over blocks (coords (nf, nloc, 3), cells (nf, 3, 3) or None, types (nloc,)), in order.

    ``sel`` starts from :func:`estimate_sel` and grows (doubling) until a block's neighbours all fit;
    it is kept between blocks, so a dataset of alike frames builds each block once. A bad frame
    (non-finite, a singular or too thin cell, two atoms on one spot) raises FrameError numbered
    from the first frame of ``blocks``.
    """
    rcut = number("rcut", rcut, positive=True)
    min_r2, counts, sel, first = START_MIN_R2, np.zeros(ntypes, dtype=int), None, 0
    for coords, cells, types in blocks:
        try:
            r2, c, sel = _block_with_room(coords, cells, types, rcut, ntypes, sel)
        except FrameError as err:
            raise err.shifted(first) from None
        min_r2, counts = min(min_r2, r2), np.maximum(counts, c)
        first += len(coords)
    return NeighborStat(math.sqrt(min_r2), [int(c) for c in counts])


def _block_with_room(coords, cells, types, rcut: float, ntypes: int, sel) -> tuple[float, np.ndarray, list[int]]:
    """(smallest r^2, largest counts) of a block by block_stat, with a sel that holds every neighbour
    (grown by doubling), and that sel.

    The block is cut into runs of frames of at most MAX_SLOTS neighbour slots: a large rcut makes
    sel, and the neighbour list of 64 frames, large (rcut 20 A on 192 waters: 5000 slots per atom).
    """
    _check_finite(coords, cells)
    sel = sel or estimate_sel(coords, cells, types, rcut, ntypes)
    nf, nloc = coords.shape[:2]
    min_r2, counts, start = np.inf, np.zeros(ntypes, dtype=int), 0
    while start < nf:
        stop = min(nf, start + max(1, MAX_SLOTS // max(1, nloc * sum(sel))))
        part = slice(start, stop)
        try:
            r2, c, complete = block_stat(coords[part], None if cells is None else cells[part], types, rcut,
                                         ntypes, sel)
        except FrameError as err:
            raise err.shifted(start) from None
        if not complete:
            sel = [2 * s + 4 for s in sel]
            continue
        # (nclose,)  r < 1e-6: one atom written twice, which would make d_min 0
        close = np.flatnonzero(r2 <= 1e-12)
        if close.size:
            raise FrameError(start + int(close[0]), "two atoms of frame {frame} are on the same spot (distance "
                                                    f"{math.sqrt(r2[close[0]]):.3g}); remove the duplicated atoms")
        min_r2, counts, start = min(min_r2, float(r2.min(initial=np.inf))), np.maximum(counts, c), stop
    return min_r2, counts, sel


def neighbor_stat(systems, rcut: float, type_map: list[str] | None = None, frames_per_block: int = 64,
                  progress: bool | None = None) -> NeighborStat:
    """d_min and N_t over every frame of every system (deepmd/npy folders or deepmd/hdf5 files), streamed.

    ``type_map`` numbers the types (default: the first system's type_map.raw,
    then any new names of later systems appended). A bad frame is named with
    its system and its index there.
    """
    rcut = number("rcut", rcut, positive=True)
    if type_map is not None:
        type_map = names("type_map", list(type_map) if isinstance(type_map, tuple) else type_map)
    lazies = [lazy_system(s) for s in systems]
    if type_map is None:
        type_map = []
        for lazy in lazies:
            type_map += [n for n in lazy.atom_names if n not in type_map]
    # disable=None: the bar shows only on a terminal
    bar = tqdm(total=sum(s.nframes for s in lazies), desc="neighbor-stat", unit="frame",
               disable=None if progress is None else not progress)

    def blocks(lazy):
        types = model_types(lazy.atom_names, lazy.atom_types, type_map)
        for block in iter_blocks(lazy, frames_per_block, labels=False):  # positions only: a bad label is not ours
            yield block.coords, block.cells, types
            bar.update(block.coords.shape[0])

    stat = NeighborStat(math.sqrt(START_MIN_R2), [0] * len(type_map))
    with bar:
        for lazy in lazies:
            try:
                part = stat_blocks(blocks(lazy), rcut, len(type_map))
            except FrameError as err:
                raise InputError(f"system {lazy.path}: {err}") from None
            stat = NeighborStat(min(stat.min_nbor_dist, part.min_nbor_dist),
                                np.maximum(stat.max_nbor_size, part.max_nbor_size).tolist())
    return stat


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
