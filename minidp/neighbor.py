r"""Neighbour lists with deepmd-kit's ``sel`` layout, periodic (any cell shape) or open.

For every atom i we want each neighbour image j within the cutoff,

.. math::

    \mathbf r_{ij} = \mathbf r_j + \mathbf n \cdot \mathbf h - \mathbf r_i, \qquad
    |\mathbf r_{ij}| \le r_c,\quad \mathbf n \in \mathbb Z^3,

where the rows of the cell :math:`\mathbf h` are the lattice vectors (the
layout of deepmd-kit's ``box.npy``) and the positions have first been wrapped
into the cell (fractional coordinates taken mod 1; this changes each
:math:`\mathbf r_{ij}` by a lattice vector only, i.e. picks another image).
Only :math:`j = i,\ \mathbf n = 0` is excluded: in a cell whose perpendicular
width

.. math::

    w_k = \frac{V}{|\mathbf a_l \times \mathbf a_m|}, \qquad V = |\det \mathbf h|,

is shorter than :math:`2 r_c`, an atom sees several images of one neighbour,
and images of itself. Since wrapped fractional coordinates lie in [0, 1),
shifts :math:`|n_k| \le \lceil r_c / w_k \rceil` find them all.

The cutoff is inclusive, :math:`r \le r_c`, as in deepmd-kit (its Python
builder masks ``rr > rcut``, its C++ formatter keeps ``rr <= rcut``); the
smooth switch is zero at :math:`r_c`, so only the ``sel`` count can tell.

deepmd-kit's layout: the ``nnei = sum(sel)`` slots of an atom are cut into
sections, slots ``sec[t]:sec[t+1]`` (``sec = cumsum([0] + sel)``) for
neighbours of type t, each sorted by :math:`r_{ij}^2` ascending (ties by j,
then by image, so the order is deterministic), the nearest ``sel[t]`` kept
and the rest of the section padded with ``nlist = -1``, ``rij = 0``. A section
with more than ``sel[t]`` neighbours is truncated, with a warning: the energy
is then no longer smooth there, which the user should know.

Two searches give identical lists (both compute :math:`\mathbf r_{ij}` with
the same floating-point operations, so even ties in distance fall alike):
``backend="numpy"``, a short brute force over all pairs and all ``ns`` needed
images (cost :math:`\propto n_{loc}^2 n_s`: to read and to check against, on
small systems), and ``backend="numba"``, a cell list (bins at least
:math:`r_c` wide, so only the 27 bins around an atom's are searched), whose
cost is linear in the number of atoms.

Shape symbols: ``nf`` frames, ``nloc`` atoms per frame, ``nnei`` neighbour
slots per atom (``sum(sel)``), ``ntypes`` atom types (``len(sel)``), ``nc``
centre atoms (``centers``); local to this module: ``ncand`` candidate pairs
within :math:`r_c`, ``ns`` image shifts, ``ngroups`` (atom, type) groups among
the candidates, ``nbin`` bins of a cell list, ``nvisit`` (bin, image) pairs
searched per atom, ``cap`` the most pairs one atom can try; for a caller's list (:func:`extend_frame`)
``npair`` pairs it names, ``nghost`` images they reach and ``nall = nloc + nghost``.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from minidp import checks
from minidp.checks import FrameError, InputTypeError, real_array

# Images are numbered by one integer, so that both searches break ties in
# distance alike: code = ((n0 + K)(2K + 1) + n1 + K)(2K + 1) + n2 + K orders
# shifts lexicographically; it needs |n_k| < K, which _MAX_IMAGES ensures.
_K = 100_000
# At most this many images prod(2 n_k + 1) of a cell are searched: more means
# a cell hundreds of times smaller than the cutoff, most likely a unit mistake.
_MAX_IMAGES = 100_000
# Bins are made this much (relatively) wider than rcut: an atom rounded into
# the next bin then still finds every neighbour within rcut.
_BIN_MARGIN = 1e-9


@dataclass(frozen=True)
class NeighborList:
    """Neighbours of every atom in deepmd-kit's sel layout."""

    nlist: np.ndarray  # (nf, nloc, nnei) int64: index j of each neighbour, -1 for padding
    rij: np.ndarray  # (nf, nloc, nnei, 3) float64: r_j + image shift - r_i, 0 where padded
    n_over: int  # (frame, atom, neighbour type) sections that had more neighbours than sel


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_cells(cells, nf: int, rcut: float) -> np.ndarray:
    """cells as (nf, 3, 3) float64, checked by :func:`check_cells`."""
    box = real_array("cells", cells)
    if box.shape != (nf, 3, 3):
        raise ValueError(f"cells must have shape ({nf}, 3, 3) (lattice vectors as rows), got {box.shape}")
    check_cells(box, rcut)
    return box


def check_cells(box: np.ndarray, rcut: float) -> None:
    """FrameError (a ValueError) unless every cell of box (nf, 3, 3), float64 with lattice vectors as
    rows, has a clearly nonzero determinant and is not absurdly thin for rcut.

    :func:`build_neighbor_list` calls it; DeepPot calls it once per evaluation, before its chunks'
    searches (:func:`search_neighbors`), which trust the cells.
    """
    # (nf,)
    det = np.linalg.det(box)
    # (nf,)  relative to |a||b||c|, so that the test does not depend on the cell's size
    scale = np.prod(np.linalg.norm(box, axis=2), axis=1)
    bad = np.flatnonzero(~(np.abs(det) > 1e-12 * scale))
    if bad.size:
        f = int(bad[0])
        raise FrameError(f, f"cell of frame {{frame}} is singular (determinant {det[f]:.3g}); expected three "
                         "independent lattice vectors, or cells=None for open boundaries")
    # (nf,)  images searched per frame
    images = np.prod(2 * image_counts(box, rcut) + 1, axis=1)
    if images.size and images.max() > _MAX_IMAGES:
        f = int(np.argmax(images))
        raise FrameError(f, f"cell of frame {{frame}} is only {np.array2string(face_widths(box[f]), precision=3)} wide "
                         f"(perpendicular widths), so rcut = {rcut} would need {images[f]} periodic images; "
                         f"expected at most {_MAX_IMAGES} (are the cell and rcut in the same unit?)")


def _check_types_sel(atom_types, nloc: int, rcut, sel) -> tuple[np.ndarray, float, list[int]]:
    """atom_types (nloc,) int64, rcut as float, sel as a list of ints, checked against each other."""
    if isinstance(rcut, bool) or not isinstance(rcut, numbers.Real):
        raise InputTypeError(f"rcut must be a real number, got {rcut!r}")
    if not (np.isfinite(rcut) and rcut > 0):
        raise ValueError(f"rcut must be a positive finite number, got {rcut!r}")
    if isinstance(sel, (str, bytes)) or not np.iterable(sel):
        raise InputTypeError(f"sel must be a list of integers (slots per neighbour type), got {sel!r}")
    sel = list(sel)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sel):
        raise InputTypeError(f"sel must be a list of integers (slots per neighbour type), got {sel!r}")
    sel = [int(s) for s in sel]
    if not sel or min(sel) < 0:
        raise ValueError(f"sel must be a non-empty list of non-negative integers, got {sel}")
    # one type per sel entry
    return checks.atom_types(atom_types, len(sel), nloc), float(rcut), sel


# ---------------------------------------------------------------------------
# Geometry both searches share
# ---------------------------------------------------------------------------


def wrap(x: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions moved into the cell: fractional f = x h^-1 taken mod 1, back as f h.

    Works on one frame (x (nloc, 3), cell (3, 3)) or a stack (x (nf, nloc, 3),
    cell (nf, 3, 3)). Returns (wrapped positions, fractional coordinates in [0, 1)), both shaped like x.
    """
    # (nf, nloc, 3) or (nloc, 3)
    frac = x @ np.linalg.inv(cell)
    frac -= np.floor(frac)
    # a tiny negative f becomes 1 - eps, which can round to exactly 1.0: that is 0.0 of the next image
    frac[frac >= 1.0] = 0.0
    # (nf, nloc, 3) or (nloc, 3)
    wrapped = frac @ cell
    return wrapped, frac


def face_widths(cell: np.ndarray) -> np.ndarray:
    """Perpendicular widths w_k = V / |a_l x a_m| of cells (..., 3, 3): (..., 3)."""
    # (..., 3, 3)  rows l and m of each k = 0, 1, 2
    u, v = cell[..., [1, 2, 0], :], cell[..., [2, 0, 1], :]
    # (..., 3, 3)  a_1 x a_2, a_2 x a_0, a_0 x a_1, the normals of the faces across a_0, a_1, a_2
    # (written out: np.cross costs ~50 us of axis juggling per call, a fifth of a water frame's search)
    normals = np.stack([u[..., 1] * v[..., 2] - u[..., 2] * v[..., 1],
                        u[..., 2] * v[..., 0] - u[..., 0] * v[..., 2],
                        u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]], axis=-1)
    return np.abs(np.linalg.det(cell))[..., None] / np.sqrt(np.sum(normals * normals, axis=-1))


def image_counts(cell: np.ndarray, rcut: float) -> np.ndarray:
    """n_k = ceil(rcut / w_k): images needed each way along lattice vector k, (..., 3) int64."""
    return np.ceil(rcut / face_widths(cell)).astype(np.int64)


def _shift_vectors(shifts: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """n . h for integer shifts (ns, 3) -> (ns, 3), summed in the order the Numba search uses (same rounding)."""
    return shifts[:, 0:1] * cell[0] + shifts[:, 1:2] * cell[1] + shifts[:, 2:3] * cell[2]


def _image_code(shifts: np.ndarray) -> np.ndarray:
    """One integer per image, ordered like the shifts (n0, n1, n2) lexicographically."""
    return ((shifts[..., 0] + _K) * (2 * _K + 1) + shifts[..., 1] + _K) * (2 * _K + 1) + shifts[..., 2] + _K


# ---------------------------------------------------------------------------
# The NumPy search: all pairs, all images
# ---------------------------------------------------------------------------


def _candidates_numpy(x: np.ndarray, cell: np.ndarray | None, rcut: float):
    """All ncand candidates (i, j, image code, r^2, r_ij) with r <= rcut of one frame, by brute force."""
    nloc = x.shape[0]
    if cell is None:
        # (1, 3)
        shifts = np.zeros((1, 3), dtype=np.int64)
    else:
        # 3 x (2 n_0 + 1, 2 n_1 + 1, 2 n_2 + 1)
        grids = np.meshgrid(*(np.arange(-n, n + 1) for n in image_counts(cell, rcut)), indexing="ij")
        # (ns, 3)
        shifts = np.stack([g.ravel() for g in grids], axis=1)
    # (ns, 3)
    sv = np.zeros((1, 3)) if cell is None else _shift_vectors(shifts, cell)
    found = []
    # a few images at a time: all pairs of a small cell seen through many images would not fit in memory
    step = max(1, 2**21 // max(nloc * nloc, 1))
    for s0 in range(0, len(shifts), step):
        # (nloc, nloc, step, 3)  r_j + shift - r_i, in that order of operations
        d = (x[None, :, None, :] + sv[None, None, s0:s0 + step]) - x[:, None, None, :]
        # (nloc, nloc, step)
        r2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
        # (nloc, nloc, step)  within the cutoff, and not atom i itself
        keep = r2 <= rcut * rcut
        keep[np.arange(nloc), np.arange(nloc)] &= np.any(shifts[s0:s0 + step] != 0, axis=1)
        i, j, s = np.nonzero(keep)
        found.append((i, j, _image_code(shifts[s0 + s]), r2[i, j, s], d[i, j, s]))
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _select(i, j, code, r2, d, types, nloc, sel):
    """Fill deepmd-kit's layout from candidates: per (i, type) the sel[t] nearest, ties by j then image."""
    # (ntypes + 1,), (ntypes,)
    sec = np.concatenate([[0], np.cumsum(sel)]).astype(np.int64)
    sel_arr = np.asarray(sel, dtype=np.int64)
    # (ncand,)
    tj = types[j]
    # (ncand,)  by atom, type, distance, j, image
    order = np.lexsort((code, j, r2, tj, i))
    i, j, tj, d = i[order], j[order], tj[order], d[order]
    # (ncand,)  one number per (atom, type)
    group = i * len(sel) + tj
    # (ngroups,)  where each (atom, type) group starts, and its size
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if group.size else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[first, group.size])
    # (ncand,)  rank of each candidate within its group
    rank = np.arange(group.size) - np.repeat(first, sizes)
    n_over = int(np.sum(sizes > sel_arr[tj[first]]))
    # (ncand,)
    kept = rank < sel_arr[tj]
    # (nloc, nnei)
    nlist = np.full((nloc, sec[-1]), -1, dtype=np.int64)
    # (nloc, nnei, 3)
    rij = np.zeros((nloc, sec[-1], 3))
    nlist[i[kept], sec[tj[kept]] + rank[kept]] = j[kept]
    rij[i[kept], sec[tj[kept]] + rank[kept]] = d[kept]
    return nlist, rij, n_over


def _search_numpy(x, frac, box, types, rcut, sel, centers):
    """Every frame of wrapped positions x by brute force (frac is unused: the signature of _search_numba),
    for the centre atoms in the range ``centers``.

    Returns (nlist (nf, nc, nnei), rij (nf, nc, nnei, 3), n_over).
    """
    nf = x.shape[0]
    nloc = centers.stop - centers.start
    # (nf, nloc, nnei)
    nlist = np.empty((nf, nloc, sum(sel)), dtype=np.int64)
    # (nf, nloc, nnei, 3)
    rij = np.empty((nf, nloc, sum(sel), 3))
    n_over = 0
    for f in range(nf):
        i, j, code, r2, d = _candidates_numpy(x[f], None if box is None else box[f], rcut)
        # (ncand,)  the pairs whose centre is in range, numbered from its start
        mine = (i >= centers.start) & (i < centers.stop)
        i, j, code, r2, d = i[mine] - centers.start, j[mine], code[mine], r2[mine], d[mine]
        if r2.size and r2.min() == 0.0:
            k = int(np.argmin(r2))
            raise FrameError(f, f"atoms {i[k] + centers.start} and {j[k]} are on the same spot (frame {{frame}}); "
                             "expected distinct positions")
        nlist[f], rij[f], over = _select(i, j, code, r2, d, types, nloc, sel)
        n_over += over
    return nlist, rij, n_over


# ---------------------------------------------------------------------------
# The Numba search: a cell list
# ---------------------------------------------------------------------------


def _grid(x, frac, box, rcut):
    """Cell-list layout per frame: (coordinates scaled to [0, 1) (nf, nloc, 3), the fractional ones
    in a cell; bins per direction (nf, 3); reach (nf, 3), the bins searched each way).

    Bins are at least rcut (1 + margin) wide, so an atom's neighbours lie in
    the 27 bins around its own (reach 1). A periodic cell too narrow for two
    bins gets one, searched as far as the brute force, n_k = ceil(rcut / w_k).
    An open system is binned over its bounding box. (Bins of rcut / 2, reach 2,
    fit the cutoff sphere better but visit 125 bins: slower for water.)
    """
    nf, nloc, _ = x.shape
    if box is None:
        # (nf, 1, 3)
        lo = x.min(axis=1, keepdims=True) if nloc else np.zeros((nf, 1, 3))
        hi = x.max(axis=1, keepdims=True) if nloc else np.zeros((nf, 1, 3))
        # (nf, 1, 3)  a little wider than the atoms' span, so that every f < 1
        extent = np.maximum(hi - lo, rcut) * (1 + _BIN_MARGIN)
        # (nf, nloc, 3)
        frac = (x - lo) / extent
        # (nf, 3)
        widths = extent[:, 0]
    else:
        # (nf, 3)
        widths = face_widths(box)
    # (nf, 3)
    # capped before the cast: a 1e20 A box would overflow int64, and the product below is taken in
    # floats for the same reason (it is cut down to about the atom count anyway)
    nbin = np.clip(np.floor(widths / (rcut * (1 + _BIN_MARGIN))), 1, 2.0**20).astype(np.int64)
    # a sparse system (atoms far apart) would get far more bins than atoms: merge bins pairwise
    for f in range(nf):
        while np.prod(nbin[f], dtype=np.float64) > 4 * nloc + 64:
            nbin[f] = np.maximum(nbin[f] // 2, 1)
    # (nf, 3)  a single periodic bin is searched as far as n_k = ceil(rcut / w_k), like image_counts
    reach = np.ones((nf, 3)) if box is None else np.where(nbin == 1, np.ceil(rcut / widths), 1)
    return frac, nbin, reach.astype(np.int64)


@njit(cache=True, nogil=True)
def _bin_atoms(frac, nbin):  # pragma: no cover (compiled)
    """Counting sort of atoms into bins: atoms by bin (nloc,), their bins (nloc, 3), bin starts (nbin + 1,)."""
    nloc = frac.shape[0]
    # (nloc, 3)
    b = np.empty((nloc, 3), np.int64)
    # (nloc,)
    flat = np.empty(nloc, np.int64)
    # (nbin + 1,)
    start = np.zeros(nbin[0] * nbin[1] * nbin[2] + 1, np.int64)
    for a in range(nloc):
        for k in range(3):
            # f < 1, but f * nbin can still round up to nbin
            b[a, k] = min(int(frac[a, k] * nbin[k]), nbin[k] - 1)
        flat[a] = (b[a, 0] * nbin[1] + b[a, 1]) * nbin[2] + b[a, 2]
        start[flat[a] + 1] += 1
    for q in range(1, start.size):
        start[q] += start[q - 1]
    # (nloc,)
    order = np.argsort(flat, kind="mergesort")
    return order, b[order], start


@njit(cache=True, nogil=True)
def _visits(b, cell, periodic, nbin, reach, vbin, vshift, vcode):  # pragma: no cover (compiled)
    """The bins an atom in bin b (3,) searches: bin index, image shift n.h and image code of each, into
    vbin (nvisit,), vshift (nvisit, 3), vcode (nvisit,); returns nvisit and which visit is the atom's own
    bin, unshifted.

    Bin b + o of a periodic cell is bin (b + o) mod nbin of image floor((b + o) / nbin); distinct
    offsets o give distinct (bin, image) pairs, so no pair is found twice.
    """
    nv = 0
    own = 0
    for o0 in range(-reach[0], reach[0] + 1):
        for o1 in range(-reach[1], reach[1] + 1):
            for o2 in range(-reach[2], reach[2] + 1):
                B0, B1, B2 = b[0] + o0, b[1] + o1, b[2] + o2
                s0, s1, s2 = B0 // nbin[0], B1 // nbin[1], B2 // nbin[2]
                if not periodic and (s0 != 0 or s1 != 0 or s2 != 0):
                    continue
                vbin[nv] = ((B0 - s0 * nbin[0]) * nbin[1] + B1 - s1 * nbin[1]) * nbin[2] + B2 - s2 * nbin[2]
                # the same operations, in the same order, as _shift_vectors
                vshift[nv, 0] = s0 * cell[0, 0] + s1 * cell[1, 0] + s2 * cell[2, 0]
                vshift[nv, 1] = s0 * cell[0, 1] + s1 * cell[1, 1] + s2 * cell[2, 1]
                vshift[nv, 2] = s0 * cell[0, 2] + s1 * cell[1, 2] + s2 * cell[2, 2]
                vcode[nv] = ((s0 + _K) * (2 * _K + 1) + s1 + _K) * (2 * _K + 1) + s2 + _K
                if o0 == 0 and o1 == 0 and o2 == 0:
                    own = nv
                nv += 1
    return nv, own


@njit(cache=True, nogil=True)
def _gather(p, xs, start, nv, own, vbin, vshift, rc2, cm, cv, cr2):  # pragma: no cover (compiled)
    """Candidates of the p-th atom in bin order: (its neighbour's place m in bin order, visit v, r^2)
    into cm, cv, cr2; returns their count, or -1 - m when the m-th atom sits on it (r = 0).

    xs (nloc, 3) holds the positions in bin order, so that a bin's atoms are contiguous.
    """
    ncand = 0
    # locals, not array reads: the compiler cannot tell that the stores below leave them alone
    xp0, xp1, xp2 = xs[p, 0], xs[p, 1], xs[p, 2]
    for v in range(nv):
        sv0, sv1, sv2 = vshift[v, 0], vshift[v, 1], vshift[v, 2]
        for m in range(start[vbin[v]], start[vbin[v] + 1]):
            d0 = (xs[m, 0] + sv0) - xp0
            d1 = (xs[m, 1] + sv1) - xp1
            d2 = (xs[m, 2] + sv2) - xp2
            r2 = d0 * d0 + d1 * d1 + d2 * d2
            # only the atom itself is at exactly r = 0 (x + 0.0 - x is 0.0); any other atom there is an error
            if r2 == 0.0 and not (m == p and v == own):
                return -1 - m
            # written always, kept by counting: a branch here would be mispredicted
            # for about one pair in seven, which costs more than the stores
            cm[ncand], cv[ncand], cr2[ncand] = m, v, r2
            ncand += (r2 <= rc2) & (r2 > 0.0)
    return ncand


@njit(cache=True, nogil=True)
def _sort_candidates(ncand, cm, cv, cr2, order, vcode, rc2, bucket, count, perm):  # pragma: no cover (compiled)
    """Order (ncand,) of the candidates by (r^2, j, image code), in perm[:ncand].

    A comparison sort mispredicts a branch at nearly every step; a bucket sort
    on (r / rcut)^3, about uniform in a dense system (one candidate per bucket
    on average), costs O(ncand). Buckets rise with r^2, so the insertion pass
    after it only sorts within buckets, equal distances by (j, image) included.
    (j = order[cm], image code = vcode[cv].)
    """
    nb = max(ncand, 1)
    count[: nb + 1] = 0
    for c in range(ncand):
        u = cr2[c] / rc2
        k = min(int(u * np.sqrt(u) * nb), nb - 1)
        bucket[c] = k
        count[k + 1] += 1
    for k in range(nb):
        count[k + 1] += count[k]
    for c in range(ncand):
        perm[count[bucket[c]]] = c
        count[bucket[c]] += 1
    for m in range(1, ncand):
        c = perm[m]
        n = m
        while n > 0:
            a = perm[n - 1]
            if cr2[a] < cr2[c] or (cr2[a] == cr2[c] and (order[cm[a]] < order[cm[c]] or (
                    order[cm[a]] == order[cm[c]] and vcode[cv[a]] < vcode[cv[c]]))):
                break
            perm[n] = a
            n -= 1
        perm[n] = c
    return perm[:ncand]


@njit(cache=True, nogil=True)
def _fill_sections(p, by_r, cm, cv, xs, order, vshift, types, sec, counted, nlist_i, rij_i):  # pragma: no cover
    """Sorted candidates of the p-th atom (bin order) into its type sections, nlist_i (nnei,) and
    rij_i (nnei, 3), every slot written (padding -1 and 0); returns how many sections overflowed.

    r_ij is recomputed here for the kept pairs only, by the very operations of _gather (same bits).
    """
    counted[:] = 0
    for k in range(by_r.size):
        m, v = cm[by_r[k]], cv[by_r[k]]
        t = types[order[m]]
        slot = sec[t] + counted[t]
        counted[t] += 1
        if slot < sec[t + 1]:
            nlist_i[slot] = order[m]
            for a in range(3):
                rij_i[slot, a] = (xs[m, a] + vshift[v, a]) - xs[p, a]
    over = 0
    for t in range(counted.size):
        over += counted[t] > sec[t + 1] - sec[t]
        for slot in range(sec[t] + counted[t], sec[t + 1]):
            nlist_i[slot] = -1
            rij_i[slot, 0], rij_i[slot, 1], rij_i[slot, 2] = 0.0, 0.0, 0.0
    return over


@njit(cache=True, nogil=True)
def _cell_list_frame(x, frac, cell, periodic, nbin, reach, types, rc2, sec, first, nlist, rij):  # pragma: no cover
    """One frame: writes every entry of nlist (nc, nnei) and rij (nc, nnei, 3) for the
    centre atoms first .. first + nc - 1 (all atoms are binned: any can be a neighbour).

    Returns (n_over, i, j) with i, j >= 0 naming two atoms on the same spot, else (n_over, -1, -1).
    """
    order, bs, start = _bin_atoms(frac, nbin)
    # (nloc, 3)  positions in bin order: the atoms of a bin are contiguous in memory
    xs = x[order]
    nvisit = (2 * reach[0] + 1) * (2 * reach[1] + 1) * (2 * reach[2] + 1)
    # (nvisit,) (nvisit, 3) (nvisit,)
    vbin, vshift, vcode = np.empty(nvisit, np.int64), np.empty((nvisit, 3)), np.empty(nvisit, np.int64)
    most = 0
    for q in range(start.size - 1):
        most = max(most, start[q + 1] - start[q])
    cap = nvisit * most
    # (cap,) x 3: candidate buffers; (cap,) (cap + 1,) (cap,): the sort's; all reused for every atom
    cm, cv, cr2 = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap)
    bucket, count, perm = np.empty(cap, np.int64), np.empty(cap + 1, np.int64), np.empty(cap, np.int64)
    # (ntypes,)
    counted = np.zeros(sec.size - 1, np.int64)
    n_over = 0
    for p in range(x.shape[0]):
        if order[p] < first or order[p] >= first + nlist.shape[0]:
            continue
        nv, own = _visits(bs[p], cell, periodic, nbin, reach, vbin, vshift, vcode)
        ncand = _gather(p, xs, start, nv, own, vbin, vshift, rc2, cm, cv, cr2)
        if ncand < 0:
            return n_over, order[p], order[-1 - ncand]
        by_r = _sort_candidates(ncand, cm, cv, cr2, order, vcode, rc2, bucket, count, perm)
        n_over += _fill_sections(p, by_r, cm, cv, xs, order, vshift, types, sec, counted,
                                 nlist[order[p] - first], rij[order[p] - first])
    return n_over, -1, -1


def _search_numba(x, frac, box, types, rcut, sel, centers):
    """Every frame of wrapped positions x (fractional frac) through the cell list, for the
    centre atoms in the range ``centers``: (nlist (nf, nc, nnei), rij (nf, nc, nnei, 3), n_over)."""
    nf = x.shape[0]
    nloc = centers.stop - centers.start
    frac, nbin, reach = _grid(x, frac, box, rcut)
    # (ntypes + 1,)
    sec = np.concatenate([[0], np.cumsum(sel)]).astype(np.int64)
    # (nf, nloc, nnei)  every entry is written by the search
    nlist = np.empty((nf, nloc, sec[-1]), dtype=np.int64)
    # (nf, nloc, nnei, 3)
    rij = np.empty((nf, nloc, sec[-1], 3))
    # (3, 3)  unused by an open system, whose images are never searched
    zero_cell = np.zeros((3, 3))
    n_over = 0
    for f in range(nf):
        cell = zero_cell if box is None else np.ascontiguousarray(box[f])
        over, i, j = _cell_list_frame(np.ascontiguousarray(x[f]), np.ascontiguousarray(frac[f]), cell,
                                      box is not None, nbin[f], reach[f], types, rcut * rcut, sec, centers.start,
                                      nlist[f], rij[f])
        if i >= 0:
            raise FrameError(f, f"atoms {i} and {j} are on the same spot (frame {{frame}}); expected distinct positions")
        n_over += over
    return nlist, rij, n_over


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


def build_neighbor_list(coords, cells, atom_types, rcut: float, sel, *, backend: str = "numba",
                        centers: slice | None = None) -> NeighborList:
    """Neighbours of every atom of every frame (the math and the layout are in the module docstring).

    coords (nf, nloc, 3), any real dtype (computed in float64); cells (nf, 3, 3)
    with lattice vectors as rows, or None for open boundaries; atom_types
    (nloc,) in [0, len(sel)); rcut > 0; sel: slots per neighbour type.
    ``backend``: "numba", else the NumPy search ("numpy" and "reference").
    Returns nlist (nf, nloc, nnei), rij (nf, nloc, nnei, 3) = r_j + n.h - r_i
    of the wrapped positions, and n_over, the number of (frame, atom, type)
    sections with more neighbours than sel[t] (a UserWarning says so).
    ``centers`` (a range of atoms) lists the neighbours of those atoms only:
    a large frame's chunks each build their own part.

    The public entry: every argument is checked here, then
    :func:`search_neighbors` searches.
    """
    checks.check_backend(backend)
    xyz = real_array("coords", coords)
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"coords must have shape (nf, nloc, 3), got {xyz.shape}")
    types, rcut, sel = _check_types_sel(atom_types, xyz.shape[1], rcut, sel)
    box = None if cells is None else _check_cells(cells, xyz.shape[0], rcut)
    nloc = xyz.shape[1]
    centers = slice(0, nloc) if centers is None else centers
    if not isinstance(centers, slice) or centers.indices(nloc)[2] != 1:
        raise ValueError(f"centers must be a slice of consecutive atoms, got {centers!r}")
    return search_neighbors(xyz, box, types, rcut, sel, backend, slice(*centers.indices(nloc)[:2]))


def search_neighbors(x: np.ndarray, box: np.ndarray | None, atom_types: np.ndarray, rcut: float, sel,
                     backend: str, centers: slice) -> NeighborList:
    """:func:`build_neighbor_list` on checked input: x (nf, nloc, 3) float64 positions, box (nf, 3, 3)
    float64 cells that passed :func:`check_cells` (or None), atom_types (nloc,) int64 in [0, len(sel)),
    rcut > 0, sel positive ints, centers slice(start, stop) within the atoms. DeepPot checks its frames
    once per evaluation and calls this on each chunk.
    """
    # (nf, nloc, 3), (nf, nloc, 3)  both searches get the same wrapped positions, hence the same r_ij bits
    x, frac = (x, None) if box is None else wrap(x, box)
    search = _search_numba if backend == "numba" else _search_numpy
    nlist, rij, n_over = search(x, frac, box, atom_types, rcut, sel, centers)
    if n_over:
        warnings.warn(f"{n_over} (frame, atom, neighbour type) sections have more neighbours within rcut = {rcut} "
                      f"than sel = {list(sel)} allows; the counts that exceed sel were cut to the nearest, so "
                      "energies and forces are not smooth there: raise sel", UserWarning, stacklevel=3)
    return NeighborList(nlist, rij, int(n_over))


# ---------------------------------------------------------------------------
# A neighbour list the caller built (deepmd-kit's DeepPot(neighbor_list=...))
# ---------------------------------------------------------------------------


class GivenPairs(NamedTuple):
    """The pairs a caller's list names for one frame: r_ij = x_j + shift . h - x_i."""

    i: np.ndarray  # (npair,) int64 centre atom
    j: np.ndarray  # (npair,) int64 neighbour atom
    shift: np.ndarray  # (npair, 3) int64 image of j, in lattice vectors


class ExtendedFrame(NamedTuple):
    """One frame as its nloc atoms followed by the ghost images its pairs reach, with those pairs."""

    coords: np.ndarray  # (nall, 3) the nloc atoms, then the ghosts
    atom_types: np.ndarray  # (nall,)
    owner: np.ndarray  # (nall - nloc,) the atom each ghost is an image of
    neighbors: NeighborList  # nlist (1, nloc, nnei) into the nall atoms, rij (1, nloc, nnei, 3)


def ase_primitive_list(neighbor_list):
    """The list to update with (pbc, cell, positions): an ASE NewPrimitiveNeighborList or
    PrimitiveNeighborList as given, or the one inside ase's NeighborList (its ``nl``).
    TypeError (one line) for anything else. ASE is not imported: the object is read by its methods."""
    inner = getattr(neighbor_list, "nl", neighbor_list)
    if not all(callable(getattr(inner, name, None)) for name in ("update", "get_neighbors")):
        raise InputTypeError(f"neighbor_list must be an ASE neighbour list (ase.neighborlist.NewPrimitiveNeighborList, "
                             f"PrimitiveNeighborList or NeighborList), got {type(neighbor_list).__name__}")
    return inner


def read_ase_pairs(inner, x: np.ndarray, cell: np.ndarray | None) -> GivenPairs:
    """Update an ASE primitive list to this frame (x (nloc, 3), cell (3, 3) or None: open) and read
    every pair it names, in both directions, without self pairs.

    deepmd-kit sets the list's bothways=True and self_interaction=False before updating it; here the
    caller's list is left as it is: a half list's pairs are completed with their reverse
    (j, i, -shift), and an atom listed as its own neighbour at shift 0 is dropped, which gives the
    same pairs without touching the caller's object. The list's own skin decides when it rebuilds.
    """
    nloc = x.shape[0]
    radii = np.asarray(getattr(inner, "cutoffs", 0.0))
    if radii.ndim == 1 and radii.size != nloc:
        raise ValueError(f"neighbor_list has {radii.size} cutoff radii (one per atom) but the frame has {nloc} atoms")
    built = getattr(inner, "positions", getattr(inner, "coordinates", None))
    if getattr(inner, "nupdates", 0) and built is not None and len(built) != nloc:
        raise ValueError(f"neighbor_list was built for {len(built)} atoms but the frame has {nloc}; "
                         "give each system its own list")
    # ASE takes a 3x3 cell also for an open system; pbc False keeps it from making images
    inner.update(np.repeat(cell is not None, 3), np.zeros((3, 3)) if cell is None else cell, x)
    found = [inner.get_neighbors(a) for a in range(nloc)]
    # (npair,), (npair,), (npair, 3)  as named, then reversed
    i = np.repeat(np.arange(nloc), [len(js) for js, _ in found])
    j = np.concatenate([np.asarray(js, dtype=np.int64).reshape(-1) for js, _ in found] + [np.zeros(0, np.int64)])
    shift = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1, 3) for _, s in found]
                           + [np.zeros((0, 3), np.int64)])
    if j.size and (j.min() < 0 or j.max() >= nloc):
        raise ValueError(f"neighbor_list names atom {int(j[(j < 0) | (j >= nloc)][0])}, outside the frame's "
                         f"{nloc} atoms")
    # (2 npair, 5) rows (i, j, shift), each pair once per direction
    rows = np.unique(np.concatenate([np.column_stack([i, j, shift]), np.column_stack([j, i, -shift])]), axis=0)
    rows = rows[(rows[:, 0] != rows[:, 1]) | rows[:, 2:].any(axis=1)]
    return GivenPairs(rows[:, 0], rows[:, 1], rows[:, 2:])


def extend_frame(x: np.ndarray, cell: np.ndarray | None, atom_types: np.ndarray, pairs: GivenPairs,
                 rcut: float, sel) -> ExtendedFrame:
    """The given pairs within rcut (inclusive, as the search) in deepmd-kit's sel layout, over the
    frame's atoms and one ghost per image (j, shift != 0) they reach.

    An image of an atom becomes a ghost atom at x_j + shift . h (deepmd-kit's DeepPot does the same
    with an ASE list), so the frame is evaluated as an open cluster whose first nloc atoms are the
    centres. Sections with more neighbours than sel are cut to the nearest, as the search cuts them
    (with its warning). A pair at distance 0 is refused (ValueError).
    """
    nloc = x.shape[0]
    # (npair, 3)
    sv = np.zeros((pairs.i.size, 3)) if cell is None else _shift_vectors(pairs.shift, cell)
    d = (x[pairs.j] + sv) - x[pairs.i]
    # (npair,)
    r2 = np.sum(d * d, axis=1)
    if r2.size and r2.min() == 0.0:
        k = int(np.argmin(r2))
        raise ValueError(f"neighbor_list pairs atoms {pairs.i[k]} and {pairs.j[k]} at distance 0; "
                         "expected distinct positions")
    keep = r2 <= rcut * rcut
    i, j, shift, sv, r2, d = pairs.i[keep], pairs.j[keep], pairs.shift[keep], sv[keep], r2[keep], d[keep]
    image = shift.any(axis=1)
    # (nghost, 4) one row (j, shift) per image reached; (nimage,) which ghost each imaged pair reaches
    ghosts, which = np.unique(np.column_stack([j[image], shift[image]]), axis=0, return_inverse=True)
    j_ext = j.copy()
    j_ext[image] = nloc + which.reshape(-1)
    # (nall, 3), (nall,)
    first = np.unique(which.reshape(-1), return_index=True)[1]
    coords = np.concatenate([x, (x[j[image]] + sv[image])[first]])
    types = np.concatenate([atom_types, atom_types[ghosts[:, 0]]])
    nlist, rij, n_over = _select(i, j_ext, np.zeros_like(i), r2, d, types, nloc, list(sel))
    if n_over:
        warnings.warn(f"{n_over} (atom, neighbour type) sections of neighbor_list have more neighbours within "
                      f"rcut = {rcut} than sel = {list(sel)} allows; the counts that exceed sel were cut to the "
                      "nearest, so energies and forces are not smooth there: raise sel", UserWarning, stacklevel=3)
    return ExtendedFrame(coords, types, ghosts[:, 0].astype(np.int64),
                         NeighborList(nlist[None], rij[None], int(n_over)))
