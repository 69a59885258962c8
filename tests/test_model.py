"""The energy model's physics on small random models and frames: forces and virials are the energy's
derivatives, the energy has the symmetries it should, and it is smooth where neighbours come and go.

hypothesis draws a configuration (see conftest.se_configs), 1-12 atoms, open or periodic boundaries
(orthorhombic or triclinic cells 0.6-1.4 rcut wide, so atoms see images of each other and of
themselves) and a seed for the numbers. sel is then set to the most neighbours of each type any atom
has, plus 1-3: every atom has padded slots, and no neighbour is ever cut off (a cut-off neighbour
would make the energy jump, which no property here could survive). davg, dstd and the bias are
random (conftest.random_model), so the padded slots' rows -davg/dstd are not zero.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidp.model import (Prediction, atomic_energy, atomic_energy_backward, energy_forces, new_model, pair_gradients,
                          scatter_pairs)
from minidp.neighbor import build_neighbor_list, image_counts
from minidp.nn import net_forward
from minidp.se_e2_a import SeAConfig, compute_descriptor, contract
from tests.conftest import random_model, rel_err, se_configs

# central-difference step (Angstrom, or strain): the truncation error (h^2 times third derivatives of
# order 10 for atoms 0.8 apart) and the round-off (1e-16 |E| / h) both stay below 1e-8 of the forces
H = 1e-5
TOL = 1e-6
# forces and virials below this (eV/A, eV) are compared absolutely: a lone atom in a cell has F = 0
# exactly, and its difference quotient is round-off
FLOOR = 1e-3
# closest approach of two atoms (and of an atom and its images)
DMIN = 0.8


@dataclasses.dataclass(frozen=True)
class Spec:
    """What hypothesis draws; make() turns it into a model and a frame."""

    cfg: SeAConfig  # its sel is replaced by what the frame needs
    nloc: int  # atoms
    periodic: bool  # a cell, or open boundaries
    triclinic: bool  # a cell with random off-diagonal parts
    extra: int  # padded slots beyond the most neighbours any atom has
    seed: int  # the numbers: coordinates, cell, types, weights, statistics


@st.composite
def specs(draw, periodic=None, max_atoms=12):
    return Spec(draw(se_configs()), draw(st.integers(1, max_atoms)),
                draw(st.booleans()) if periodic is None else periodic, draw(st.booleans()),
                draw(st.integers(1, 3)), draw(st.integers(0, 2**16)))


def min_distance(x: np.ndarray, others: np.ndarray, cell: np.ndarray | None) -> float:
    """Closest approach of x (3,) to others (m, 3), over the images nearest in fractional space."""
    d = others - x
    if cell is not None:
        frac = d @ np.linalg.inv(cell)
        frac -= np.round(frac)
        # (27, m, 3)  the 27 images around the nearest one in fractional coordinates
        d = (frac[None] + np.array(list(itertools.product([-1, 0, 1], repeat=3)))[:, None]) @ cell
    return float(np.min(np.linalg.norm(d, axis=-1), initial=np.inf))


def random_frame(spec: Spec, rng):
    """coords (1, nloc, 3), cells (1, 3, 3) or None, types (nloc,): atoms at least DMIN apart."""
    rcut, n = spec.cfg.rcut, spec.nloc
    # room for every atom: about 3 A^3 each
    side = max((3.0 * n) ** (1 / 3), 0.6 * rcut)
    cell = None
    if spec.periodic:
        lengths = np.maximum(rng.uniform(0.6, 1.4, 3) * rcut, side)
        cell = np.diag(lengths)
        if spec.triclinic:
            cell = cell + rng.uniform(-0.3, 0.3, (3, 3)) * lengths[:, None] * (1 - np.eye(3))
    pts = np.empty((0, 3))
    for _ in range(n):
        for _ in range(1000):
            x = rng.random(3) @ cell if spec.periodic else rng.random(3) * 1.2 * side
            if min_distance(x, pts, cell) > DMIN:
                break
        else:
            assume(False)  # too crowded; hypothesis draws another frame
        pts = np.vstack([pts, x])
    if spec.periodic:
        # an atom's own images must not be closer than DMIN either
        shifts = np.array([k for k in itertools.product([-1, 0, 1], repeat=3) if any(k)])
        assume(np.linalg.norm(shifts @ cell, axis=1).min() > DMIN)
    return pts[None], None if cell is None else cell[None], rng.integers(0, spec.cfg.ntypes, n)


def needed_sel(coords, cells, types, cfg: SeAConfig) -> list[int]:
    """The most neighbours of each type that any atom has within rcut."""
    n_img = 1 if cells is None else int(np.prod(2 * image_counts(cells[0], cfg.rcut) + 1))
    big = [coords.shape[1] * n_img] * cfg.ntypes
    nlist = build_neighbor_list(coords, cells, types, cfg.rcut, big).nlist
    return [int((nlist[..., t * big[0]:(t + 1) * big[0]] >= 0).sum(-1).max()) for t in range(cfg.ntypes)]


def make(spec: Spec):
    """(model, coords, cells, types) of a Spec, with sel what the frame needs plus spec.extra."""
    rng = np.random.default_rng(spec.seed)
    coords, cells, types = random_frame(spec, rng)
    sel = tuple(n + spec.extra for n in needed_sel(coords, cells, types, spec.cfg))
    return random_model(dataclasses.replace(spec.cfg, sel=sel), spec.seed), coords, cells, types


def neighbors(model, coords, cells, types, backend: str = "numba"):
    """The neighbour list for the model's rcut and sel, which must hold every neighbour."""
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, cfg.sel, backend=backend)
    assert nl.n_over == 0, "sel must hold every neighbour"
    return nl


def predict(model, coords, cells, types, backend: str = "numba") -> tuple[Prediction, np.ndarray]:
    """Energy, forces, virials and the descriptor D of frames, through the neighbour list."""
    nl = neighbors(model, coords, cells, types, backend)
    D, _ = compute_descriptor(nl.rij, nl.nlist, types, model.descriptor, backend)
    return energy_forces(nl.rij, nl.nlist, types, model, backend), D


def energy(model, coords, cells, types) -> float:
    nl = neighbors(model, coords, cells, types)
    return float(energy_forces(nl.rij, nl.nlist, types, model).energy[0])


def random_rotation(rng) -> np.ndarray:
    """A random orthogonal matrix, proper or improper (the descriptor is blind to reflections too)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def strained(x: np.ndarray | None, eps: np.ndarray) -> np.ndarray | None:
    """Rows r -> (1 + eps) r: for coordinates and lattice vectors alike."""
    return None if x is None else x @ (np.eye(3) + eps).T


# ---------------------------------------------------------------------------
# Derivatives
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(spec=specs())
def test_forces_are_minus_the_energy_gradient(spec):
    model, coords, cells, types = make(spec)
    p, _ = predict(model, coords, cells, types)
    fd = np.zeros_like(coords)
    for k, a in np.ndindex(spec.nloc, 3):
        step = np.zeros_like(coords)
        step[0, k, a] = H
        e_plus, e_minus = energy(model, coords + step, cells, types), energy(model, coords - step, cells, types)
        fd[0, k, a] = -(e_plus - e_minus) / (2 * H)
    assert rel_err(p.force, fd, FLOOR) <= TOL
    # Newton's third law: every pair's g_ij pushes i and j apart equally
    assert np.abs(p.force.sum(axis=1)).max() <= 1e-12 * max(np.abs(p.force).max(), 1.0) * spec.nloc
    np.testing.assert_allclose(p.atom_energy.sum(axis=1), p.energy, rtol=1e-14)
    np.testing.assert_allclose(p.atom_virial.sum(axis=1), p.virial, rtol=1e-12, atol=1e-14 * np.abs(p.virial).max())


@settings(max_examples=25, deadline=None)
@given(spec=specs())
def test_virial_is_minus_the_strain_derivative(spec):
    """W[3a + b] = -dE/d eps_ab, where the strain moves every coordinate and lattice vector r_a by eps_ab r_b."""
    model, coords, cells, types = make(spec)
    p, _ = predict(model, coords, cells, types)
    fd = np.zeros(9)
    for a, b in np.ndindex(3, 3):
        eps = np.zeros((3, 3))
        eps[a, b] = H
        e_plus = energy(model, strained(coords, eps), strained(cells, eps), types)
        e_minus = energy(model, strained(coords, -eps), strained(cells, -eps), types)
        fd[3 * a + b] = -(e_plus - e_minus) / (2 * H)
    assert rel_err(p.virial[0], fd, FLOOR) <= TOL
    # a rotation-invariant energy has a symmetric virial, which is why these differences cannot tell W
    # from its transpose; the atomic virials, not symmetric, are pinned by the pair-formula test below
    W = p.virial[0].reshape(3, 3)
    assert rel_err(W, W.T, FLOOR) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(spec=specs(max_atoms=6))
def test_atomic_virials_follow_the_pair_formula(spec):
    """W_k[3a + b] = -sum over pairs (i, j = k) of g_ij,a r_ij,b, with g_ij = dE_i/dr_ij by differences.

    The strain derivative only sees the (symmetric) sum; this pins the flattening a*3 + b (a: the
    gradient's component, b: the displacement's) and which atom of a pair receives its term.
    """
    model, coords, cells, types = make(spec)
    cfg = model.descriptor.config
    nl = neighbors(model, coords, cells, types)
    p = energy_forces(nl.rij, nl.nlist, types, model)
    # E_i depends on atom i's r_ij only: move slot k's component b in every atom at once
    g = np.zeros_like(nl.rij)
    for k, b in np.ndindex(cfg.nnei, 3):
        step = np.zeros((cfg.nnei, 3))
        step[k, b] = H
        e_plus = energy_forces(nl.rij + step, nl.nlist, types, model).atom_energy
        e_minus = energy_forces(nl.rij - step, nl.nlist, types, model).atom_energy
        g[..., k, b] = (e_plus - e_minus) / (2 * H)
    force, atom_virial = np.zeros_like(p.force), np.zeros_like(p.atom_virial)
    for i, k in np.ndindex(spec.nloc, cfg.nnei):
        j = nl.nlist[0, i, k]
        if j >= 0:
            force[0, i] += g[0, i, k]
            force[0, j] -= g[0, i, k]
            atom_virial[0, j] -= np.outer(g[0, i, k], nl.rij[0, i, k]).reshape(9)
    assert rel_err(p.force, force, FLOOR) <= TOL
    assert rel_err(p.atom_virial, atom_virial, FLOOR) <= TOL


# ---------------------------------------------------------------------------
# Symmetries
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(spec=specs())
def test_invariant_under_translation_rotation_and_wrapping(spec):
    model, coords, cells, types = make(spec)
    rng = np.random.default_rng(spec.seed + 1)
    p, D = predict(model, coords, cells, types)
    # translation: everything stays
    q, Dq = predict(model, coords + rng.uniform(-10, 10, 3), cells, types)
    assert rel_err(q.energy, p.energy, 1.0) <= 1e-12 and rel_err(Dq, D) <= 1e-12
    assert rel_err(q.force, p.force, FLOOR) <= 1e-10 and rel_err(q.virial, p.virial, FLOOR) <= 1e-10
    # rotation (or reflection) of coordinates and cell: D and E stay, F and W turn with it
    Q = random_rotation(rng)
    q, Dq = predict(model, coords @ Q.T, None if cells is None else cells @ Q.T, types)
    assert rel_err(q.energy, p.energy, 1.0) <= 1e-12 and rel_err(Dq, D) <= 1e-12
    assert rel_err(q.force, p.force @ Q.T, FLOOR) <= 1e-10
    assert rel_err(q.virial.reshape(3, 3), Q @ p.virial.reshape(3, 3) @ Q.T, FLOOR) <= 1e-10
    if cells is not None:
        # atoms moved by whole lattice vectors are the same crystal
        n = rng.integers(-2, 3, (spec.nloc, 3))
        q, Dq = predict(model, coords + n @ cells[0], cells, types)
        assert rel_err(q.energy, p.energy, 1.0) <= 1e-12 and rel_err(Dq, D) <= 1e-12
        assert rel_err(q.force, p.force, FLOOR) <= 1e-10 and rel_err(q.virial, p.virial, FLOOR) <= 1e-10


@settings(max_examples=25, deadline=None)
@given(spec=specs())
def test_permuting_atoms_permutes_the_results(spec):
    """Atoms renumbered (types along with them): E stays, D, F, E_i and W_i are renumbered alike."""
    model, coords, cells, types = make(spec)
    perm = np.random.default_rng(spec.seed + 2).permutation(spec.nloc)
    p, D = predict(model, coords, cells, types)
    q, Dq = predict(model, coords[:, perm], cells, types[perm])
    assert rel_err(q.energy, p.energy, 1.0) <= 1e-12
    for mine, theirs, floor in ((Dq, D, 1e-12), (q.force, p.force, FLOOR), (q.atom_energy, p.atom_energy, 1.0),
                                (q.atom_virial, p.atom_virial, FLOOR)):
        assert rel_err(mine, theirs[:, perm], floor) <= 1e-10


@settings(max_examples=25, deadline=None)
@given(spec=specs(periodic=True, max_atoms=6))
def test_supercell_is_eight_copies(spec):
    """A 2x2x2 supercell: every atom has the same neighbours (images), so E and W are 8 times, F and D repeat."""
    model, coords, cells, types = make(spec)
    p, D = predict(model, coords, cells, types)
    # (8, 3)  the shifts of the eight copies
    shifts = np.array(list(itertools.product(range(2), repeat=3))) @ cells[0]
    big = (coords[0][None] + shifts[:, None]).reshape(1, -1, 3)
    q, Dq = predict(model, big, 2 * cells, np.tile(types, 8))
    assert rel_err(q.energy, 8 * p.energy, 1.0) <= 1e-12
    assert rel_err(q.virial, 8 * p.virial, FLOOR) <= 1e-10
    assert rel_err(q.force, np.tile(p.force, (1, 8, 1)), FLOOR) <= 1e-10
    assert rel_err(Dq, np.tile(D, (1, 8, 1))) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(spec=specs(periodic=False), triclinic=st.booleans())
def test_open_boundaries_equal_a_huge_box(spec, triclinic):
    """A cluster in a box far wider than itself plus rcut: no atom sees another's image. The cluster
    is centred on a corner, so wrapping scatters it over the box and the images bring it back."""
    model, coords, _, types = make(spec)
    p, D = predict(model, coords, None, types)
    box = np.diag([60.0, 70.0, 80.0]) + (np.array([[0, 0, 0], [10.0, 0, 0], [-8.0, 12.0, 0]]) if triclinic else 0)
    q, Dq = predict(model, coords - coords.mean(axis=1, keepdims=True), box[None], types)
    assert rel_err(q.energy, p.energy, 1.0) <= 1e-12 and rel_err(Dq, D) <= 1e-12
    for mine, theirs in zip(q, p):
        assert rel_err(mine, theirs, FLOOR) <= 1e-10


# ---------------------------------------------------------------------------
# Smoothness at the cutoff, the lone atom
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), n_more=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_energy_and_forces_are_continuous_where_a_neighbour_crosses_rcut(cfg, n_more, seed):
    """Atom 1 moves radially away from atom 0 through rcut in steps h; other atoms sit around atom 0.

    The jumps of E and F across the crossing are no larger than those of the steps beside it (which
    are O(h)): the leaving row s(r)(1/r, x/r^2) reaches the padded row continuously, value and slope.
    With davg/dstd drawn per slot, this also checks that the padded slots' sums start at the right slot.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    # atom 0, atom 1 where it crosses, and the others within 2.6 A of atom 0 (all its neighbours)
    pts = [np.zeros(3), cfg.rcut * u]
    while len(pts) < 2 + n_more:
        x = rng.uniform(-1.5, 1.5, 3)
        if min(np.linalg.norm(x - y) for y in pts) > DMIN:
            pts.append(x)
    others = np.array(pts[2:]).reshape(-1, 3)
    h = 1e-4
    radii = cfg.rcut + h * (np.arange(-4, 4) + 0.5)
    frames = np.stack([np.vstack([[np.zeros(3), r * u], others]) for r in radii])
    types = rng.integers(0, cfg.ntypes, len(pts))
    sel = tuple(n + 1 for n in needed_sel(frames[:1], None, types, cfg))
    # statistics per slot: the leaving neighbour's row must become the padded row of its own slot
    model = random_model(dataclasses.replace(cfg, sel=sel), seed, per_slot=True)
    nl = build_neighbor_list(frames, None, types, cfg.rcut, sel)
    # atom 1 is atom 0's neighbour before the crossing (frame 3), not after (frame 4)
    assert 1 in nl.nlist[3, 0] and 1 not in nl.nlist[4, 0]
    # With statistics per slot, two neighbours of one type trading ranks would make E jump too
    # (deepmd-kit's statistics, the same for all slots, do not care): the distances to an atom's
    # neighbours must stay apart by more than atom 1 moves along the path (8 h)
    r = np.linalg.norm(nl.rij[0], axis=-1)
    for i, t in np.ndindex(len(pts), cfg.ntypes):
        s = slice(model.descriptor.config.sec[t], model.descriptor.config.sec[t + 1])
        assume(np.all(np.diff(r[i, s][nl.nlist[0, i, s] >= 0]) > 16 * h))
    p = energy_forces(nl.rij, nl.nlist, types, model)
    dE = np.abs(np.diff(p.energy))
    dF = np.abs(np.diff(p.force, axis=0)).max(axis=(1, 2))
    beside = np.r_[0:3, 4:7]
    assert dE[3] <= 10 * dE[beside].max() + 1e-12 * (1 + np.abs(p.energy).max())
    assert dF[3] <= 10 * dF[beside].max() + 1e-12 * (1 + np.abs(p.force).max())
    # and the steps are O(h): |dE| <= h max|F_1| (atom 1 is the only one moving), up to F's change in a step
    assert dE.max() <= 2 * h * np.abs(p.force[:, 1]).max() + 1e-12 * (1 + np.abs(p.energy).max())


@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), seed=st.integers(0, 2**16), periodic=st.booleans())
def test_lone_atom_gets_the_fitting_of_the_all_padded_descriptor(cfg, seed, periodic):
    """One atom, no neighbours: R is -davg/dstd in every slot, E = F_t(D) + b_t, no force, no virial."""
    model = random_model(cfg, seed)
    se = model.descriptor
    cells = np.eye(3)[None] * (3 * cfg.rcut) if periodic else None
    for t in range(cfg.ntypes):
        types = np.array([t])
        p, D = predict(model, np.full((1, 1, 3), 0.3), cells, types)
        # (nnei, 4)
        R = -se.davg[t] / se.dstd[t]
        T = sum(net_forward(se.nets[t, tj], R[se.config.sec[tj]:se.config.sec[tj + 1], :1])[0].T
                @ R[se.config.sec[tj]:se.config.sec[tj + 1]] for tj in range(cfg.ntypes)) / cfg.nnei
        D_ref = contract(T[None, None], cfg.axis_neuron)
        e_ref = net_forward(model.fitting[t], D_ref[0])[0][0, 0] + model.bias[t]
        assert rel_err(D, D_ref) <= 1e-12
        assert rel_err(p.energy, np.array([e_ref]), 1.0) <= 1e-12
        assert np.all(p.force == 0.0) and np.all(p.virial == 0.0)


# ---------------------------------------------------------------------------
# Bookkeeping: shapes, centre chunks, backends, bad input
# ---------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(spec=specs())
def test_shapes_are_those_the_comments_claim(spec):
    model, coords, cells, types = make(spec)
    nf, nloc, cfg = 2, spec.nloc, model.descriptor.config
    coords2 = np.concatenate([coords, coords + 0.01])
    cells2 = None if cells is None else np.concatenate([cells, cells])
    p, D = predict(model, coords2, cells2, types)
    assert p.energy.shape == (nf,) and p.virial.shape == (nf, 9)
    assert p.force.shape == (nf, nloc, 3) and p.atom_virial.shape == (nf, nloc, 9)
    assert p.atom_energy.shape == (nf, nloc) and D.shape == (nf, nloc, cfg.dim_out)
    E_atom, caches = atomic_energy(D, types, model)
    assert E_atom.shape == (nf, nloc) and len(caches) == len(set(types.tolist()))
    assert atomic_energy_backward(np.ones_like(E_atom), caches, cfg.dim_out).dD.shape == (nf, nloc, cfg.dim_out)


@settings(max_examples=25, deadline=None)
@given(spec=specs(), data=st.data())
def test_centre_chunks_add_up_to_the_frame(spec, data):
    """pair_gradients on centres first..first+nc-1, scattered as DeepPot does for big frames, gives
    their shares; the shares add up to the whole."""
    model, coords, cells, types = make(spec)
    nl = neighbors(model, coords, cells, types)
    whole = energy_forces(nl.rij, nl.nlist, types, model)
    cut = data.draw(st.integers(0, spec.nloc), label="cut")
    F, W, E = np.zeros_like(whole.force), np.zeros_like(whole.atom_virial), []
    for s in (slice(0, cut), slice(cut, spec.nloc)):
        E_atom, g = pair_gradients(nl.rij[:, s], nl.nlist[:, s], types[s], model)
        scatter_pairs(g, nl.rij[:, s], nl.nlist[:, s], F, W, s.start)
        E.append(E_atom)
    assert rel_err(F, whole.force, FLOOR) <= 1e-12 and rel_err(W, whole.atom_virial, FLOOR) <= 1e-12
    assert rel_err(np.concatenate(E, axis=1), whole.atom_energy, 1.0) <= 1e-14


@settings(max_examples=25, deadline=None)
@given(spec=specs())
def test_numba_and_numpy_backends_agree(spec):
    model, coords, cells, types = make(spec)
    p, D = predict(model, coords, cells, types, "numba")
    q, Dq = predict(model, coords, cells, types, "numpy")
    assert rel_err(Dq, D) <= 1e-13
    for mine, theirs in zip(q, p):
        assert rel_err(mine, theirs, FLOOR) <= 1e-12


def test_new_model_refuses_a_type_map_that_does_not_match_sel():
    cfg = SeAConfig(rcut=4.0, rcut_smth=1.0, sel=(3, 4), neuron=(4,), axis_neuron=2, type_one_side=True)
    with pytest.raises(ValueError, match="type_map has 1 types but sel has 2"):
        new_model(["O"], cfg)
