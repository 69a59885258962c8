r"""Neighbour lists with deepmd-kit's ``sel`` layout, periodic or open.

For every atom i we want each neighbour image j within the cutoff,

.. math::

    \mathbf r_{ij} = \mathbf r_j + \mathbf n \cdot \mathbf h - \mathbf r_i, \qquad
    |\mathbf r_{ij}| < r_c,\quad \mathbf n \in \mathbb Z^3,

where the rows of the cell :math:`\mathbf h` are the lattice vectors (the
layout of deepmd-kit's ``box.npy``). In a cell whose perpendicular width
:math:`w_k = V / |\mathbf a_l \times \mathbf a_m|` is shorter than
:math:`r_c`, one atom can see several images of the same neighbour, and of
itself: shifts up to :math:`n_k = \lceil r_c / w_k \rceil` are needed. Only
:math:`j = i,\ \mathbf n = 0` is excluded.

deepmd-kit's layout (``sel``): the ``nnei = sum(sel)`` slots of an atom are cut
into sections, slots ``sec[t]:sec[t+1]`` for neighbours of type t, each
section sorted by distance (ties by j, then by image), the nearest ``sel[t]``
kept and the rest of the section padded with ``-1``. A system with more
neighbours of a type than ``sel`` allows is truncated, with a warning: the
energy is then no longer smooth, which the user should know.

Two searches give the same lists: ``backend="numpy"``, a short brute force
over all pairs and all needed images (to read, and to check against), and
``backend="numba"``, a cell list (bins at least ``rcut`` wide, so only
neighbouring bins are searched), linear in the number of atoms.

Shape symbols: ``nf`` frames, ``nloc`` atoms, ``nnei`` slots; ``nc`` candidates.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit

# Images are numbered by one integer so that ties in distance are broken the
# same way by both searches: code = ((n0 + K) (2K+1) + n1 + K) (2K+1) + n2 + K.
_K = 1000


@dataclass(frozen=True)
class NeighborList:
    """Neighbours of every atom in deepmd-kit's sel layout."""

    nlist: np.ndarray  # (nf, nloc, nnei) int64: index j of each neighbour, -1 for padding
    rij: np.ndarray  # (nf, nloc, nnei, 3) float64: r_j + image shift - r_i, 0 where padded
    n_over: int  # (frame, atom, type) sections that had more neighbours than sel


# ---------------------------------------------------------------------------
# Input checks and the geometry both searches share
# ---------------------------------------------------------------------------


def _check_inputs(coords, cells, atom_types, rcut, sel):
    xyz = np.asarray(coords)
    if not np.issubdtype(xyz.dtype, np.floating) and not np.issubdtype(xyz.dtype, np.integer):
        raise TypeError(f"coords must be real numbers, got dtype {xyz.dtype}")
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"coords must have shape (nframes, natoms, 3), got {xyz.shape}")
    # float32 data (the water example's coordinates) is widened first: the
    # difference of two float32 positions keeps only ~7 digits
    xyz = xyz.astype(np.float64)
    if not np.isfinite(xyz).all():
        raise ValueError("coords contain NaN or inf; expected finite numbers")
    types = np.asarray(atom_types)
    if types.shape != xyz.shape[1:2] or not np.issubdtype(types.dtype, np.integer):
        raise ValueError(f"atom_types must be {xyz.shape[1]} integers, got shape {types.shape} dtype {types.dtype}")
    sel = [int(s) for s in sel]
    if not sel or min(sel) < 1:
        raise ValueError(f"sel must be a non-empty list of positive integers, got {sel}")
    if types.size and (types.min() < 0 or types.max() >= len(sel)):
        raise ValueError(f"atom types must lie in 0..{len(sel) - 1} (one per sel entry), got {sorted(set(types.tolist()))}")
    if not (np.isfinite(rcut) and rcut > 0):
        raise ValueError(f"rcut must be a positive number, got {rcut!r}")
    if cells is None:
        return xyz, None, types.astype(np.int64), float(rcut), sel
    box = np.asarray(cells, dtype=np.float64)
    if box.shape != (xyz.shape[0], 3, 3):
        raise ValueError(f"cells must have shape ({xyz.shape[0]}, 3, 3), got {box.shape}")
    if not np.isfinite(box).all():
        raise ValueError("cells contain NaN or inf; expected finite numbers")
    det = np.linalg.det(box)
    bad = np.flatnonzero(np.abs(det) < 1e-6 * np.maximum(np.abs(box).max(axis=(1, 2)) ** 3, 1e-300))
    if bad.size:
        raise ValueError(f"cell of frame {bad[0]} is singular (determinant {det[bad[0]]:.3g}); "
                         "expected three independent lattice vectors, or cells=None for open boundaries")
    return xyz, box, types.astype(np.int64), float(rcut), sel


def wrap(x: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions moved into the cell: fractional f = x h^-1 taken mod 1, back as f h.

    Returns (wrapped positions (nloc, 3), fractional coordinates in [0, 1) (nloc, 3)).
    """
    # (nloc, 3)
    frac = x @ np.linalg.inv(cell)
    frac -= np.floor(frac)
    # rounding can leave exactly 1.0: that is 0.0 of the next image
    frac[frac >= 1.0] = 0.0
    return frac @ cell, frac


def image_counts(cell: np.ndarray, rcut: float) -> np.ndarray:
    """n_k = ceil(rcut / w_k): images needed each way along lattice vector k (w_k = perpendicular width)."""
    volume = abs(np.linalg.det(cell))
    widths = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return np.ceil(rcut / widths).astype(np.int64)


def _shift_vectors(shifts: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """n . h for integer shifts (ns, 3), summed in a fixed order so both searches round alike."""
    return shifts[:, 0:1] * cell[0] + shifts[:, 1:2] * cell[1] + shifts[:, 2:3] * cell[2]


# ---------------------------------------------------------------------------
# The NumPy search: all pairs, all images
# ---------------------------------------------------------------------------


def _candidates_numpy(x: np.ndarray, cell: np.ndarray | None, rcut: float):
    """All (i, j, image code, r, r_ij) with r < rcut, i.e. nc candidates, by brute force."""
    nloc = x.shape[0]
    if cell is None:
        shifts = np.zeros((1, 3), dtype=np.int64)
        sv = np.zeros((1, 3))
    else:
        n = image_counts(cell, rcut)
        grids = np.meshgrid(*(np.arange(-k, k + 1) for k in n), indexing="ij")
        # (ns, 3)
        shifts = np.stack([g.ravel() for g in grids], axis=1)
        sv = _shift_vectors(shifts, cell)
    # (nloc, nloc, ns, 3)  r_j + shift - r_i
    d = (x[None, :, None, :] + sv[None, None]) - x[:, None, None, :]
    # (nloc, nloc, ns)
    r2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    zero = np.all(shifts == 0, axis=1)
    keep = r2 < rcut * rcut
    keep[np.arange(nloc), np.arange(nloc)] &= ~zero
    i, j, s = np.nonzero(keep)
    code = ((shifts[s, 0] + _K) * (2 * _K + 1) + shifts[s, 1] + _K) * (2 * _K + 1) + shifts[s, 2] + _K
    return i, j, code, np.sqrt(r2[i, j, s]), d[i, j, s]


def _select(i, j, code, r, d, types, nloc, sel):
    """Fill deepmd-kit's layout from candidates: per (i, type) the sel[t] nearest, ties by j then image."""
    sec = np.concatenate([[0], np.cumsum(sel)])
    tj = types[j]
    # (nc,)  sorted by atom, type, distance, j, image
    order = np.lexsort((code, j, r, tj, i))
    i, j, tj, d = i[order], j[order], tj[order], d[order]
    group = i * len(sel) + tj
    # rank of each candidate within its (atom, type) group
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[first, group.size])
    rank = np.arange(group.size) - np.repeat(first, sizes)
    n_over = int(np.sum(sizes > np.asarray(sel)[group[first] % len(sel)]))
    kept = rank < np.asarray(sel)[tj]
    slot = sec[tj] + rank
    # (nloc, nnei), (nloc, nnei, 3)
    nlist = np.full((nloc, sec[-1]), -1, dtype=np.int64)
    rij = np.zeros((nloc, sec[-1], 3))
    nlist[i[kept], slot[kept]] = j[kept]
    rij[i[kept], slot[kept]] = d[kept]
    return nlist, rij, n_over


# ---------------------------------------------------------------------------
# The Numba search: a cell list
# ---------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _before(r1, j1, code1, r2, j2, code2):  # pragma: no cover
    """(r, j, image) ordering of two candidates: is the first one before the second?"""
    if r1 != r2:
        return r1 < r2
    if j1 != j2:
        return j1 < j2
    return code1 < code2


@njit(cache=True, nogil=True)
def _cell_list_frame(x, frac, cell, periodic, nbin, reach, types, rcut, sel, nlist, rij):  # pragma: no cover
    """Fill nlist (nloc, nnei) and rij (nloc, nnei, 3) for one frame; returns (n_over, i, j) with
    i, j >= 0 naming two atoms on the same spot (or -1, -1).

    Atoms are binned by fractional coordinate; a bin is at least rcut wide
    across, so atom i's neighbours lie within ``reach`` bins each way.
    Searching bin b + o of a periodic cell means image floor((b + o) / nbin).
    """
    nloc = x.shape[0]
    ntypes = sel.size
    sec = np.zeros(ntypes + 1, np.int64)
    for t in range(ntypes):
        sec[t + 1] = sec[t] + sel[t]
    # bin of every atom, and the atoms of every bin (counting sort)
    b = np.empty((nloc, 3), np.int64)
    for a in range(nloc):
        for k in range(3):
            b[a, k] = min(int(frac[a, k] * nbin[k]), nbin[k] - 1)
    flat = (b[:, 0] * nbin[1] + b[:, 1]) * nbin[2] + b[:, 2]
    order = np.argsort(flat, kind="mergesort")
    start = np.zeros(nbin[0] * nbin[1] * nbin[2] + 1, np.int64)
    for a in range(nloc):
        start[flat[a] + 1] += 1
    for q in range(1, start.size):
        start[q] += start[q - 1]
    cap = 64
    cj = np.empty(cap, np.int64)
    ccode = np.empty(cap, np.int64)
    cr = np.empty(cap)
    cd = np.empty((cap, 3))
    n_over = 0
    rc2 = rcut * rcut
    for i in range(nloc):
        nc = 0
        for o0 in range(-reach[0], reach[0] + 1):
            for o1 in range(-reach[1], reach[1] + 1):
                for o2 in range(-reach[2], reach[2] + 1):
                    B0, B1, B2 = b[i, 0] + o0, b[i, 1] + o1, b[i, 2] + o2
                    s0, s1, s2 = B0 // nbin[0], B1 // nbin[1], B2 // nbin[2]
                    if not periodic and (s0 != 0 or s1 != 0 or s2 != 0):
                        continue
                    q = ((B0 - s0 * nbin[0]) * nbin[1] + B1 - s1 * nbin[1]) * nbin[2] + B2 - s2 * nbin[2]
                    sv0 = s0 * cell[0, 0] + s1 * cell[1, 0] + s2 * cell[2, 0]
                    sv1 = s0 * cell[0, 1] + s1 * cell[1, 1] + s2 * cell[2, 1]
                    sv2 = s0 * cell[0, 2] + s1 * cell[1, 2] + s2 * cell[2, 2]
                    code = ((s0 + _K) * (2 * _K + 1) + s1 + _K) * (2 * _K + 1) + s2 + _K
                    for p in range(start[q], start[q + 1]):
                        j = order[p]
                        d0 = (x[j, 0] + sv0) - x[i, 0]
                        d1 = (x[j, 1] + sv1) - x[i, 1]
                        d2 = (x[j, 2] + sv2) - x[i, 2]
                        r2 = d0 * d0 + d1 * d1 + d2 * d2
                        if r2 >= rc2 or (j == i and s0 == 0 and s1 == 0 and s2 == 0):
                            continue
                        if r2 == 0.0:
                            return n_over, i, j
                        if nc == cap:  # grow the candidate buffers
                            cap *= 2
                            cj2, cc2, cr2, cd2 = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap), np.empty((cap, 3))
                            cj2[:nc], cc2[:nc], cr2[:nc], cd2[:nc] = cj[:nc], ccode[:nc], cr[:nc], cd[:nc]
                            cj, ccode, cr, cd = cj2, cc2, cr2, cd2
                        cj[nc], ccode[nc], cr[nc] = j, code, np.sqrt(r2)
                        cd[nc, 0], cd[nc, 1], cd[nc, 2] = d0, d1, d2
                        nc += 1
        # sort by distance, then by (j, image) where distances tie: the argsort
        # leaves ties in any by_r, and an insertion pass only moves within them
        by_r = np.argsort(cr[:nc])
        for m in range(1, nc):
            c = by_r[m]
            n = m
            while n > 0 and _before(cr[c], cj[c], ccode[c], cr[by_r[n - 1]], cj[by_r[n - 1]], ccode[by_r[n - 1]]):
                by_r[n] = by_r[n - 1]
                n -= 1
            by_r[n] = c
        filled = np.zeros(ntypes, np.int64)
        counted = np.zeros(ntypes, np.int64)
        for m in range(nc):
            c = by_r[m]
            t = types[cj[c]]
            counted[t] += 1
            if filled[t] < sel[t]:
                slot = sec[t] + filled[t]
                nlist[i, slot] = cj[c]
                rij[i, slot, 0], rij[i, slot, 1], rij[i, slot, 2] = cd[c, 0], cd[c, 1], cd[c, 2]
                filled[t] += 1
        for t in range(ntypes):
            if counted[t] > sel[t]:
                n_over += 1
    return n_over, -1, -1


def _search_numba(x, frac, cell, types, rcut, sel):
    """One frame through the cell list; the bins of an open system span its bounding box."""
    nloc = x.shape[0]
    sel_arr = np.asarray(sel, dtype=np.int64)
    # (nloc, nnei), (nloc, nnei, 3)
    nlist = np.full((nloc, int(sel_arr.sum())), -1, dtype=np.int64)
    rij = np.zeros((nloc, int(sel_arr.sum()), 3))
    if cell is None:
        lo, hi = x.min(axis=0), x.max(axis=0)
        extent = np.maximum(hi - lo, rcut) * (1 + 1e-9)
        frac = (x - lo) / extent
        nbin = np.maximum(np.floor(extent / rcut), 1).astype(np.int64)
        reach = np.ones(3, dtype=np.int64)
        periodic, box = False, np.zeros((3, 3))
    else:
        widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        nbin = np.maximum(np.floor(widths / rcut), 1).astype(np.int64)
        reach = np.ceil(rcut * nbin / widths).astype(np.int64)
        periodic, box = True, cell
    n_over, i, j = _cell_list_frame(x, frac, box, periodic, nbin, reach, types, rcut, sel_arr, nlist, rij)
    if i >= 0:
        raise ValueError(f"atoms {i} and {j} are on the same spot; expected distinct positions")
    return nlist, rij, n_over


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


def build_neighbor_list(coords, cells, atom_types, rcut: float, sel, *, backend: str = "numba") -> NeighborList:
    """Neighbours of every atom of every frame (math and layout in the module docstring).

    coords (nf, nloc, 3); cells (nf, 3, 3) with lattice vectors as rows, or
    None for open boundaries; atom_types (nloc,); sel: slots per neighbour type.
    """
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend must be 'numba' or 'numpy', got {backend!r}")
    xyz, box, types, rcut, sel = _check_inputs(coords, cells, atom_types, rcut, sel)
    nf, nloc, _ = xyz.shape
    # (nf, nloc, nnei), (nf, nloc, nnei, 3)
    nlist = np.empty((nf, nloc, sum(sel)), dtype=np.int64)
    rij = np.empty((nf, nloc, sum(sel), 3))
    n_over = 0
    for f in range(nf):
        cell = None if box is None else box[f]
        x, frac = (xyz[f], None) if cell is None else wrap(xyz[f], cell)
        if backend == "numba":
            nlist[f], rij[f], over = _search_numba(x, frac, cell, types, rcut, sel)
        else:
            i, j, code, r, d = _candidates_numpy(x, cell, rcut)
            if r.size and r.min() == 0.0:
                k = int(np.argmin(r))
                raise ValueError(f"atoms {i[k]} and {j[k]} are on the same spot; expected distinct positions")
            nlist[f], rij[f], over = _select(i, j, code, r, d, types, nloc, sel)
        n_over += over
    if n_over:
        warnings.warn(f"{n_over} (frame, atom, neighbour type) sections have more neighbours within "
                      f"rcut = {rcut} than sel = {sel} allows; the farthest were dropped, so energies "
                      "and forces are not smooth there: raise sel", UserWarning, stacklevel=2)
    return NeighborList(nlist, rij, n_over)

