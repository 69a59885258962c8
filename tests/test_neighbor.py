"""Neighbour lists: the two backends against each other, against a loop-over-images reference, against
deepmd-kit's dpmodel builder, and the layout, cutoff, tie, overflow and error conventions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.neighbor import NeighborList, build_neighbor_list

WATER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "water"
BACKENDS = ["numba", "numpy"]


# ---------------------------------------------------------------------------
# Random systems and an independent reference
# ---------------------------------------------------------------------------


@st.composite
def systems(draw, max_atoms: int = 14, kinds=("open", "orthorhombic", "triclinic")):
    """(coords (nf, nloc, 3), cells (nf, 3, 3) or None, atom_types (nloc,), rcut, sel).

    Periodic cells are 0.45 to 3 rcut across, so cells shorter than 2 rcut (several images of one
    atom, and of the atom itself) are common; atoms are placed up to a cell outside it, to be wrapped.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nf, nloc, ntypes = draw(st.integers(1, 2)), draw(st.integers(0, max_atoms)), draw(st.integers(1, 3))
    rcut = draw(st.floats(0.5, 3.0))
    sel = draw(st.lists(st.integers(0, 40), min_size=ntypes, max_size=ntypes))
    kind = draw(st.sampled_from(kinds))
    types = rng.integers(0, ntypes, nloc)
    if kind == "open":
        # a cluster far from the origin: bins span the atoms, not the origin
        coords = rng.uniform(-1, 1, (nf, nloc, 3)) * draw(st.floats(0.3, 3.0)) * rcut + 100.0
        return coords, None, types, rcut, sel
    # (nf, 3, 3)  lattice vectors as rows: diagonal lengths, then (triclinic) tilts and a rotation
    cells = np.stack([np.diag(rng.uniform(0.45, 3.0, 3) * rcut) for _ in range(nf)])
    if kind == "triclinic":
        cells += np.tril(rng.uniform(-0.5, 0.5, (nf, 3, 3)), -1) * cells.diagonal(axis1=1, axis2=2)[:, None, :]
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        cells = cells @ rotation
        cells[:, 0] *= rng.choice([-1, 1])  # left-handed cells too
    coords = rng.uniform(-1.0, 2.0, (nf, nloc, 3)) @ cells
    return coords, cells, types, rcut, sel


def reference(x, cell, types, rcut):
    """Every image within rcut, by loops over generously many images (independent of minidp).

    Returns {(i, t): sorted list of (j, m0, m1, m2)} with r_ij = x_j + m.h - x_i (m relative to the
    positions as given), and {(i, t): sorted distances}.
    """
    nloc = x.shape[0]
    if cell is None:
        xw, off, shifts = x, np.zeros((nloc, 3)), np.zeros((1, 3), dtype=int)
    else:
        frac = np.linalg.solve(cell.T, x.T).T
        off = np.floor(frac)
        xw = (frac - off) @ cell
        widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        n = np.ceil(rcut / widths).astype(int) + 1  # one more than needed
        shifts = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in n), indexing="ij"), -1).reshape(-1, 3)
    sets, dists = {}, {}
    for n in shifts:
        d = xw[None, :, :] + n @ (np.zeros((3, 3)) if cell is None else cell) - xw[:, None, :]
        r = np.linalg.norm(d, axis=-1)
        for i, j in zip(*np.nonzero(r <= rcut)):
            if i == j and not n.any():
                continue
            m = tuple(int(v) for v in n - off[j] + off[i])
            sets.setdefault((i, types[j]), []).append((j, *m))
            dists.setdefault((i, types[j]), []).append(r[i, j])
    return {k: sorted(v) for k, v in sets.items()}, {k: np.sort(v) for k, v in dists.items()}


def found(nl: NeighborList, f, x, cell, sel):
    """The same as reference() read from a neighbour list, and the rij it holds for each (i, t)."""
    sec = np.cumsum([0] + list(sel))
    sets, dists, vectors = {}, {}, {}
    for i in range(x.shape[0]):
        for t in range(len(sel)):
            j = nl.nlist[f, i, sec[t]:sec[t + 1]]
            rij = nl.rij[f, i, sec[t]:sec[t + 1]][j >= 0]
            j = j[j >= 0]
            if j.size == 0:
                continue
            # (n, 3)  the lattice vector that rij adds to x_j - x_i, in lattice coordinates
            m = np.zeros((j.size, 3)) if cell is None else np.linalg.solve(cell.T, (rij - (x[j] - x[i])).T).T
            assert np.allclose(m, np.round(m), atol=1e-6)
            sets[(i, t)] = sorted((int(a), *(int(v) for v in b)) for a, b in zip(j, np.round(m)))
            dists[(i, t)] = np.linalg.norm(rij, axis=1)
            vectors[(i, t)] = (j, np.round(m), rij)
    return sets, dists, vectors


def quiet(*args, **kwargs) -> NeighborList:
    """build_neighbor_list without the sel-overflow warning (tests that check it call it directly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_neighbor_list(*args, **kwargs)


# ---------------------------------------------------------------------------
# Backends, reference, layout
# ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(systems(max_atoms=24))
def test_numba_and_numpy_agree_exactly(system):
    coords, cells, types, rcut, sel = system
    a = quiet(coords, cells, types, rcut, sel, backend="numba")
    b = quiet(coords, cells, types, rcut, sel, backend="numpy")
    np.testing.assert_array_equal(a.nlist, b.nlist)
    np.testing.assert_allclose(a.rij, b.rij, rtol=0, atol=1e-12)
    assert a.n_over == b.n_over


@settings(max_examples=60, deadline=None)
@given(systems(kinds=("open", "triclinic")), st.sampled_from(BACKENDS))
def test_against_loops_over_images(system, backend):
    coords, cells, types, rcut, sel = system
    for f in range(coords.shape[0]):
        cell = None if cells is None else cells[f]
        want, want_r = reference(coords[f], cell, types, rcut)
        # room for every neighbour: the sets must match exactly
        roomy = [max([len(v) for (i, t), v in want.items() if t == s], default=0) + 1 for s in range(len(sel))]
        nl = build_neighbor_list(coords[f:f + 1], None if cell is None else cell[None], types, rcut, roomy,
                                 backend=backend)
        got, got_r, vectors = found(nl, 0, coords[f], cell, roomy)
        assert got == want
        for (i, t), (j, m, rij) in vectors.items():
            # r_ij is r_j + m.h - r_i of the positions as given, up to the rounding of the wrap
            exact = coords[f][j] + (0 if cell is None else m @ cell) - coords[f][i]
            np.testing.assert_allclose(rij, exact, rtol=0, atol=1e-9)
            # nearest first within a section
            assert np.all(np.diff(got_r[(i, t)]) >= 0)
        # with the drawn (often too small) sel: the nearest sel[t] are kept, and overflows are counted
        nl = quiet(coords[f:f + 1], None if cell is None else cell[None], types, rcut, sel, backend=backend)
        _, kept, _ = found(nl, 0, coords[f], cell, sel)
        for key, r in want_r.items():
            np.testing.assert_allclose(kept.get(key, np.zeros(0)), r[:sel[key[1]]], rtol=0, atol=1e-9)
        assert nl.n_over == sum(len(r) > sel[t] for (i, t), r in want_r.items())


@settings(max_examples=40, deadline=None)
@given(systems(kinds=("orthorhombic", "triclinic")), st.data())
def test_wrapping_by_lattice_vectors_keeps_the_neighbour_set(system, data):
    coords, cells, types, rcut, sel = system
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # (nf, nloc, 3)  every atom moved by its own lattice vector
    moved = coords + np.einsum("fak,fkc->fac", rng.integers(-3, 4, coords.shape), cells)
    a, b = quiet(coords, cells, types, rcut, sel), quiet(moved, cells, types, rcut, sel)
    assert a.n_over == b.n_over
    np.testing.assert_array_equal(np.sort(a.nlist, axis=-1), np.sort(b.nlist, axis=-1))
    np.testing.assert_allclose(np.sort(np.linalg.norm(a.rij, axis=-1), axis=-1),
                               np.sort(np.linalg.norm(b.rij, axis=-1), axis=-1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_and_section_layout(backend):
    rng = np.random.default_rng(7)
    cells = np.stack([np.diag([5.0, 6.0, 7.0]), [[5.0, 0, 0], [2.0, 5.5, 0], [-1.0, 1.5, 6.0]]])
    # (nf, nloc, 3)
    coords = rng.uniform(0, 1, (2, 30, 3)) @ cells
    types = rng.integers(0, 3, 30)
    sel = [4, 0, 9]
    nl = quiet(coords, cells, types, 3.0, sel, backend=backend)
    assert nl.nlist.shape == (2, 30, 13) and nl.nlist.dtype == np.int64
    assert nl.rij.shape == (2, 30, 13, 3) and nl.rij.dtype == np.float64
    sec = np.cumsum([0] + sel)
    for t in range(3):
        j = nl.nlist[:, :, sec[t]:sec[t + 1]]
        r = np.linalg.norm(nl.rij[:, :, sec[t]:sec[t + 1]], axis=-1)
        real = j >= 0
        assert np.all(types[j[real]] == t)
        # neighbours first, then padding; padding has rij = 0; distances ascending
        assert np.all(real[..., :-1] >= real[..., 1:])
        assert np.all(nl.rij[:, :, sec[t]:sec[t + 1]][~real] == 0)
        assert np.all(np.diff(np.where(real, r, 0.0), axis=-1)[real[..., 1:]] >= 0)
        assert np.all(r[real] <= 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_broken_by_j_then_by_image(backend):
    # one atom in a cube of side 2, rcut 3: its six images at distance exactly 2, then twelve at 2 sqrt 2
    nl = build_neighbor_list(np.zeros((1, 1, 3)), 2.0 * np.eye(3)[None], [0], 3.0, [18], backend=backend)
    assert np.all(nl.nlist == 0) and nl.n_over == 0
    first = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]  # lexicographic shifts
    np.testing.assert_array_equal(nl.rij[0, 0, :6], 2.0 * np.array(first))
    np.testing.assert_allclose(np.linalg.norm(nl.rij[0, 0, 6:], axis=-1), 2.0 * np.sqrt(2))
    # two atoms at the same distance from atom 0: the smaller index first, wherever it sits
    coords = np.array([[[0.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0]]])
    nl = build_neighbor_list(coords, None, [0, 0, 0], 1.5, [3], backend=backend)
    np.testing.assert_array_equal(nl.nlist[0, 0], [1, 2, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cutoff_is_inclusive_as_in_deepmd(backend):
    coords = np.array([[[0.0, 0, 0], [3.0, 0, 0]]])
    at = build_neighbor_list(coords, None, [0, 0], 3.0, [1], backend=backend)
    beyond = build_neighbor_list(coords, None, [0, 0], np.nextafter(3.0, 0), [1], backend=backend)
    np.testing.assert_array_equal(at.nlist[0], [[1], [0]])
    np.testing.assert_array_equal(beyond.nlist[0], [[-1], [-1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_coordinates_are_widened_before_subtracting(backend):
    rng = np.random.default_rng(3)
    cell = np.diag([6.1, 5.3, 7.2]).astype(np.float32)[None]
    coords = (rng.uniform(0, 1, (1, 40, 3)) @ cell).astype(np.float32) + np.float32(1000.0)
    a = quiet(coords, cell, np.zeros(40, int), 2.5, [30], backend=backend)
    b = quiet(coords.astype(np.float64), cell.astype(np.float64), np.zeros(40, int), 2.5, [30], backend=backend)
    np.testing.assert_array_equal(a.nlist, b.nlist)
    np.testing.assert_array_equal(a.rij, b.rij)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_lonely(backend):
    nl = build_neighbor_list(np.zeros((2, 0, 3)), None, np.zeros(0, int), 6.0, [3, 4], backend=backend)
    assert nl.nlist.shape == (2, 0, 7) and nl.rij.shape == (2, 0, 7, 3) and nl.n_over == 0
    nl = build_neighbor_list(np.ones((1, 1, 3)), None, [1], 6.0, [3, 4], backend=backend)
    assert np.all(nl.nlist == -1) and np.all(nl.rij == 0)


# ---------------------------------------------------------------------------
# sel overflow
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sel_overflow_warns_and_keeps_the_nearest(backend):
    coords = np.array([[[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.5]]])
    with pytest.warns(UserWarning, match=r"4 \(frame, atom, neighbour type\) sections .* sel = \[1\].*exceed sel"):
        nl = build_neighbor_list(coords, None, [0, 0, 0, 0], 4.0, [1], backend=backend)
    assert nl.n_over == 4
    np.testing.assert_array_equal(nl.nlist[0, :, 0], [1, 0, 0, 0])
    # exactly as many neighbours as sel: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_neighbor_list(coords, None, [0, 0, 0, 0], 4.0, [3], backend=backend).n_over == 0


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

GOOD = dict(coords=np.zeros((2, 3, 3)) + np.arange(3.0)[:, None], cells=np.stack([4.0 * np.eye(3)] * 2),
            atom_types=np.array([0, 1, 0]), rcut=2.0, sel=[2, 2])
SINGULAR = np.stack([4.0 * np.eye(3), [[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]]])
BAD = [
    (dict(coords=np.zeros((3, 3))), ValueError, r"coords must have shape \(nf, nloc, 3\), got \(3, 3\)"),
    (dict(coords=np.full((2, 3, 3), "a")), TypeError, r"coords must hold real numbers, got dtype <U1"),
    (dict(coords=np.where(np.arange(3) == 1, np.nan, GOOD["coords"])), ValueError,
     r"coords has a non-finite entry nan at index \(0, 0, 1\)"),
    (dict(coords=np.full((2, 3, 3), np.inf)), ValueError, r"coords has a non-finite entry inf at index \(0, 0, 0\)"),
    (dict(cells=np.eye(3)), ValueError, r"cells must have shape \(2, 3, 3\).*got \(3, 3\)"),
    (dict(cells=np.full((2, 3, 3), np.nan)), ValueError, r"cells has a non-finite entry nan"),
    (dict(cells=SINGULAR), ValueError, r"cell of frame 1 is singular \(determinant 0\)"),
    (dict(cells=np.stack([4.0 * np.eye(3), np.diag([0.1, 0.1, 0.01])])), ValueError,
     r"cell of frame 1 is only \[0.1 +0.1 +0.01\] wide .*rcut = 2.0 would need 674081 periodic images"),
    (dict(atom_types=np.array([0, 2, 0])), ValueError,
     r"atom type 2 is outside the model.s types 0..1 \(got types \[0, 2\]\)"),
    (dict(atom_types=np.array([0, -1, 0])), ValueError, r"atom type -1 is outside the model.s types 0..1"),
    (dict(atom_types=np.array([0.0, 1.0, 0.0])), TypeError, r"atom_types must be integers, got dtype float64"),
    (dict(atom_types=np.array([0, 1])), ValueError, r"atom_types must have shape \(3,\).*got \(2,\)"),
    (dict(rcut=-1.0), ValueError, r"rcut must be a positive finite number, got -1.0"),
    (dict(rcut=0), ValueError, r"rcut must be a positive finite number, got 0"),
    (dict(rcut=float("nan")), ValueError, r"rcut must be a positive finite number, got nan"),
    (dict(rcut="6"), TypeError, r"rcut must be a real number, got '6'"),
    (dict(sel=[2, -1]), ValueError, r"sel must be a non-empty list of non-negative integers, got \[2, -1\]"),
    (dict(sel=[]), ValueError, r"sel must be a non-empty list"),
    (dict(sel=[2.5, 2]), TypeError, r"sel must be a list of integers .*got \[2.5, 2\]"),
    (dict(sel=46), TypeError, r"sel must be a list of integers .*got 46"),
]


@pytest.mark.parametrize("change, error, message", BAD)
def test_bad_input_is_named(change, error, message):
    with pytest.raises(error, match=message):
        build_neighbor_list(**{**GOOD, **change})


def test_bad_backend_and_atoms_on_one_spot():
    with pytest.raises(ValueError, match=r"backend must be one of \['reference', 'numpy', 'numba'\], got 'cuda'"):
        build_neighbor_list(**GOOD, backend="cuda")
    coords = GOOD["coords"].copy()
    coords[1, 2] = coords[1, 0] + GOOD["cells"][1, 0]  # atom 2 on an image of atom 0, in frame 1
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"atoms (0 and 2|2 and 0) are on the same spot \(frame 1\)"):
            build_neighbor_list(**{**GOOD, "coords": coords}, backend=backend)


# ---------------------------------------------------------------------------
# Water: replication, and deepmd-kit
# ---------------------------------------------------------------------------


def water_frame(system: str = "data_0"):
    """(coords (1, 192, 3) float32, cell (1, 3, 3), types (192,)) of the first frame, or skip."""
    path = WATER / system
    if not (path / "set.000" / "coord.npy").exists():
        pytest.skip(f"{path} is not available")
    coords = np.load(path / "set.000" / "coord.npy")[:1].reshape(1, -1, 3)
    cell = np.load(path / "set.000" / "box.npy")[:1].reshape(1, 3, 3)
    return coords, cell, np.loadtxt(path / "type.raw", dtype=int)


def test_replicated_water_box_sees_the_same_neighbourhoods():
    """A 2x2x2 supercell (1536 atoms, 4 bins a side) gives every copy of an atom the original's neighbours."""
    coords, cell, types = water_frame()
    shifts = np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(2)]) @ cell[0].astype(np.float64)
    # (1, 8 * 192, 3)
    big = (coords[0].astype(np.float64)[None] + shifts[:, None]).reshape(1, -1, 3)
    one = build_neighbor_list(coords, cell, types, 6.0, [46, 92])
    many = build_neighbor_list(big, 2 * cell, np.tile(types, 8), 6.0, [46, 92])
    r_one = np.linalg.norm(one.rij[0], axis=-1)
    r_many = np.linalg.norm(many.rij[0], axis=-1).reshape(8, 192, -1)
    np.testing.assert_allclose(r_many, np.broadcast_to(r_one, r_many.shape), rtol=0, atol=1e-9)
    # the same atoms, up to which copy: j mod 192 as sets (near-equal distances may swap places)
    j_many = np.where(many.nlist[0] >= 0, many.nlist[0] % 192, -1).reshape(8, 192, -1)
    j_one = np.broadcast_to(np.sort(one.nlist[0], axis=-1), j_many.shape)
    np.testing.assert_array_equal(np.sort(j_many, axis=-1), j_one)


def deepmd_sections(coords, cell, types, rcut, sel):
    """deepmd-kit's dpmodel neighbour list of one frame: (nlist (nloc, nnei) as local indices, |r_ij|)."""
    nlist_mod = pytest.importorskip("deepmd.dpmodel.utils.nlist")
    nloc = coords.shape[1]
    ext, _, mapping, nlist = nlist_mod.extend_input_and_build_neighbor_list(
        coords.reshape(1, -1), types[None], rcut, sel, box=cell.reshape(1, 9))
    ext, nlist, mapping = np.asarray(ext).reshape(-1, 3), np.asarray(nlist)[0], np.asarray(mapping)[0]
    real = nlist >= 0
    r = np.where(real, np.linalg.norm(ext[np.where(real, nlist, 0)] - ext[:nloc, None], axis=-1), np.inf)
    return np.where(real, mapping[np.where(real, nlist, 0)], -1), r


def compare_with_deepmd(coords, cell, types, rcut, sel):
    j_dp, r_dp = deepmd_sections(coords.astype(np.float64), cell.astype(np.float64), types, rcut, sel)
    nl = build_neighbor_list(coords, cell, types, rcut, sel)
    r_me = np.where(nl.nlist[0] >= 0, np.linalg.norm(nl.rij[0], axis=-1), np.inf)
    sec = np.cumsum([0] + sel)
    for t in range(len(sel)):
        part = slice(sec[t], sec[t + 1])
        # the same neighbours in every section: sorted distances, and sorted indices
        a, b = np.sort(r_dp[:, part], axis=1), np.sort(r_me[:, part], axis=1)
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
        np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(np.sort(j_dp[:, part], axis=1), np.sort(nl.nlist[0][:, part], axis=1))


def test_water_frame_matches_deepmd():
    coords, cell, types = water_frame()
    compare_with_deepmd(coords, cell, types, 6.0, [46, 92])


def test_small_sheared_cell_matches_deepmd():
    """A triclinic cell narrower than rcut: many images of each atom, and of itself."""
    rng = np.random.default_rng(11)
    cell = np.array([[[3.1, 0.0, 0.0], [1.2, 2.9, 0.0], [-0.8, 0.7, 3.4]]])
    coords = rng.uniform(-0.5, 1.5, (1, 6, 3)) @ cell[0]
    types = np.array([0, 1, 1, 0, 1, 0])
    # room for all of them: deepmd's dpmodel builder truncates to sum(sel) before splitting types
    compare_with_deepmd(coords, cell, types, 4.0, [150, 150])


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_centers_give_the_rows_of_the_full_list(backend):
    """A range of centre atoms gets exactly those rows of the whole frame's list."""
    rng = np.random.default_rng(7)
    coords = rng.uniform(0, 7, size=(2, 30, 3))
    cells = np.tile(np.eye(3) * 7.0, (2, 1, 1))
    types = rng.integers(0, 2, 30)
    full = build_neighbor_list(coords, cells, types, 3.0, [20, 20], backend=backend)
    for centers in (slice(0, 30), slice(5, 17), slice(29, 30), slice(10, 10)):
        part = build_neighbor_list(coords, cells, types, 3.0, [20, 20], backend=backend, centers=centers)
        np.testing.assert_array_equal(part.nlist, full.nlist[:, centers])
        np.testing.assert_array_equal(part.rij, full.rij[:, centers])
    with pytest.raises(ValueError, match=r"centers must be a slice of consecutive atoms, got slice\(0, 10, 2\)"):
        build_neighbor_list(coords, cells, types, 3.0, [20, 20], centers=slice(0, 10, 2))
