"""The se_e2_a descriptor's pieces: each backward against central finite differences, the padded
slots' shortcut against the plain sum over all slots, the shapes the shape comments claim.

Every check draws its configuration with hypothesis (1-2 types, sel, embedding widths with plain,
doubling and equal-width resnet layers, axis_neuron, type_one_side, resnet_dt) and its numbers
from a drawn seed. The inputs are random pair displacements with padded slots (the neighbour
search is tested in test_neighbor.py), at |r| in [0.5, 0.98 rcut], half of them inside
rcut_smth (s = 1) and half in the switching zone. The loss is L = sum(W * output) with a random
W, so that a backward's input dL/doutput is W.

An atom's T and D depend on that atom's inputs only (and a row of R on its own r_ij only), so one
perturbation of the same input entry in every (frame, atom) at once, contracted with W atom by atom,
gives every atom's finite difference: a few dozen evaluations per check instead of thousands.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.nn import net_forward
from minidp.training.force_training import contract_jvp, embed_jvp, env_matrix_jvp, padded_tail_backward
from minidp.se_e2_a import (compute_descriptor, contract, contract_backward, descriptor_backward, embed, embed_backward,
                            env_matrix, env_matrix_backward, net_padded_tails, smooth_switch)
from tests.conftest import random_model, rel_err, se_configs

BACKENDS = ["numba", "numpy"]
seeds = st.integers(0, 2**16)
# central-difference step: the inputs are O(1), so the truncation error (h^2) and the round-off
# (1e-16 / h) are both near 1e-10, far below the 1e-6 the checks ask for
H = 1e-6
TOL = 1e-6


def random_pairs(cfg, nf: int, nloc: int, rng):
    """types (nloc,), nlist (nf, nloc, nnei) and rij (nf, nloc, nnei, 3) in the sel layout.

    Each (frame, atom, neighbour type) section gets 0..sel[t] real neighbours, padding after them
    (nlist -1, rij 0). The neighbour indices are arbitrary: the descriptor only asks whether a
    slot is real.
    """
    types = rng.integers(0, cfg.ntypes, nloc)
    # (nf, nloc, nnei)
    nlist = np.full((nf, nloc, cfg.nnei), -1)
    for t, n_t in enumerate(cfg.sel):
        count = rng.integers(0, n_t + 1, (nf, nloc, 1))
        j = rng.integers(0, nloc, (nf, nloc, n_t))
        nlist[..., cfg.sec[t]:cfg.sec[t + 1]] = np.where(np.arange(n_t) < count, j, -1)
    inside = rng.uniform(0.5, cfg.rcut_smth, nlist.shape)
    zone = rng.uniform(cfg.rcut_smth, 0.98 * cfg.rcut, nlist.shape)
    # (nf, nloc, nnei)
    r = np.where(rng.random(nlist.shape) < 0.5, inside, zone) * (nlist >= 0)
    # (nf, nloc, nnei, 3)
    u = rng.normal(size=nlist.shape + (3,))
    rij = r[..., None] * u / np.linalg.norm(u, axis=-1, keepdims=True)
    return types, nlist, rij


def atomwise_fd(f, x, W, n_atom_axes: int = 2):
    """Central differences of L = sum(W * f(x)) for every entry of x, when f's output for atom
    (frame, i) depends on x[frame, i] alone: each trailing index of x is moved in all atoms at once."""
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[n_atom_axes:]):
        step = np.zeros(x.shape[n_atom_axes:])
        step[idx] = H
        diff = W * (f(x + step) - f(x - step))
        fd[(Ellipsis,) + idx] = diff.reshape(diff.shape[:n_atom_axes] + (-1,)).sum(-1) / (2 * H)
    return fd


# ---------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(rcut=st.floats(1.0, 8.0), frac=st.floats(0.05, 0.95))
def test_smooth_switch_values_and_derivative(rcut, frac):
    rs = frac * rcut
    r = np.concatenate([np.linspace(0.01, rcut + 1.0, 401), [rs, rcut]])
    sw, dsw = smooth_switch(r, rs, rcut)
    fd = (smooth_switch(r + H, rs, rcut)[0] - smooth_switch(r - H, rs, rcut)[0]) / (2 * H)
    # ds/dr is of order 1 / (rcut - rs): the error relative to that scale
    assert np.abs(dsw - fd).max() * (rcut - rs) <= TOL
    assert np.all(sw[r <= rs] == 1.0) and np.all(sw[r >= rcut] == 0.0)
    assert np.all(dsw[(r <= rs) | (r >= rcut)] == 0.0)
    assert np.all((sw >= 0.0) & (sw <= 1.0)) and np.all(dsw <= 0.0)
    # d2s/dr2 vanishes at both ends too (s is C2): the slope leaves zero quadratically, so this
    # difference quotient is 15 h / w^3 (w = rcut - rs), where a kink would give order 1 / w^2
    w = rcut - rs
    for end in (rs, rcut):
        d2 = (smooth_switch(end + H, rs, rcut)[1] - smooth_switch(end - H, rs, rcut)[1]) / (2 * H)
        assert abs(d2) * w**2 <= 16 * H / w


# ---------------------------------------------------------------------------
# Backwards against central differences
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 4), seed=seeds)
def test_env_matrix_backward_matches_finite_differences(backend, cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)

    def R_of(x):
        return env_matrix(x, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend)[0]

    R, cache = env_matrix(rij, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend)
    dR = rng.normal(size=R.shape)
    grad = env_matrix_backward(dR, cache, backend)
    # a row depends on its own r_ij only: slots are independent like atoms
    fd = atomwise_fd(R_of, rij, dR, n_atom_axes=3)
    assert rel_err(grad, fd) <= TOL
    assert np.all(grad[nlist < 0] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 4), seed=seeds)
def test_embed_backward_matches_finite_differences(backend, cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    R, _ = env_matrix(rij, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend)
    T, pieces = embed(R, nlist, types, se, backend)
    dT = rng.normal(size=T.shape)
    dR = embed_backward(dT, R, pieces, backend)
    fd = atomwise_fd(lambda x: embed(x, nlist, types, se, backend)[0], R, dT)
    assert rel_err(dR, fd) <= TOL
    # padded rows are constants (-davg/dstd): embed reads them from the statistics, not from R
    assert np.all(dR[nlist < 0] == 0.0)


@settings(max_examples=25, deadline=None)
@given(nf=st.integers(1, 2), nloc=st.integers(1, 3), ng=st.integers(1, 8), data=st.data(), seed=seeds)
def test_contract_backward_matches_finite_differences(nf, nloc, ng, data, seed):
    m2 = data.draw(st.integers(1, ng), label="m2")
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(nf, nloc, ng, 4))
    D = contract(T, m2)
    # D[a * m2 + b] = sum_c T[a, c] T[b, c], written out
    ref = np.einsum("fiac,fibc->fiab", T, T[:, :, :m2]).reshape(nf, nloc, ng * m2)
    np.testing.assert_allclose(D, ref, rtol=1e-13, atol=1e-13)
    dD = rng.normal(size=D.shape)
    dT = contract_backward(dD, T, m2)
    assert rel_err(dT, atomwise_fd(lambda x: contract(x, m2), T, dD)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 4), seed=seeds)
def test_descriptor_backward_matches_finite_differences(backend, cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    D, cache = compute_descriptor(rij, nlist, types, se, backend)
    dD = rng.normal(size=D.shape)
    g = descriptor_backward(dD, cache, se, backend)
    fd = atomwise_fd(lambda x: compute_descriptor(x, nlist, types, se, backend)[0], rij, dD)
    assert rel_err(g, fd) <= TOL
    assert np.all(g[nlist < 0] == 0.0)


# ---------------------------------------------------------------------------
# The padded slots' shortcut, the two backends, the shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 4), seed=seeds)
def test_embed_equals_the_plain_sum_over_all_slots(backend, cfg, nf, nloc, seed):
    """T = (1/nnei) sum over every slot, padded ones included, of G(R_j0)^T R_j: what deepmd-kit computes."""
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    R, _ = env_matrix(rij, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend)
    # the env matrix gives padded slots the row -davg/dstd of the centre's type
    pad = nlist < 0
    np.testing.assert_allclose(R[pad], np.broadcast_to(-se.davg[types] / se.dstd[types], R.shape)[pad], rtol=1e-15)
    T_ref = np.zeros((nf, nloc, cfg.ng, 4))
    for f, i, tj in np.ndindex(nf, nloc, cfg.ntypes):
        rows = R[f, i, cfg.sec[tj]:cfg.sec[tj + 1]]
        G, _ = net_forward(se.nets[types[i], tj], rows[:, :1])
        T_ref[f, i] += G.T @ rows / cfg.nnei
    T, _ = embed(R, nlist, types, se, backend)
    np.testing.assert_allclose(T, T_ref, rtol=1e-12, atol=1e-13 * np.abs(T_ref).max())


@settings(max_examples=25, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 4), seed=seeds)
def test_numba_and_numpy_backends_agree(cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    (Da, ca), (Db, cb) = (compute_descriptor(rij, nlist, types, se, b) for b in BACKENDS)
    dD = rng.normal(size=Da.shape)
    ga, gb = descriptor_backward(dD, ca, se, "numba"), descriptor_backward(dD, cb, se, "numpy")
    assert rel_err(Da, Db) <= 1e-13 and rel_err(ga, gb) <= 1e-13


@settings(max_examples=10, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 3), nloc=st.integers(1, 5), seed=seeds)
def test_shapes_are_those_the_comments_claim(cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    nnei, ng, m2 = cfg.nnei, cfg.ng, cfg.axis_neuron
    D, cache = compute_descriptor(rij, nlist, types, se, keep=True)
    env = cache.env
    assert cache.R.shape == (nf, nloc, nnei, 4)
    assert env.rij.shape == (nf, nloc, nnei, 3)
    assert env.inv_r.shape == env.sw.shape == env.dsw.shape == env.inv_rp.shape == (nf, nloc, nnei)
    assert env.row_scale.shape == (1, nloc, nnei, 4)
    assert cache.T.shape == (nf, nloc, ng, 4)
    assert D.shape == (nf, nloc, ng * m2) and ng * m2 == cfg.dim_out
    groups = 1 if cfg.type_one_side else cfg.ntypes
    assert len(cache.pieces) == groups * cfg.ntypes
    for pc in cache.pieces:
        na, n_t = pc.atoms.size, pc.slots.stop - pc.slots.start
        nb = int(pc.rows.real.sum())
        assert pc.rows.real.shape == (nf, na, n_t) and pc.rows.count.shape == (nf, na)
        assert pc.rows.owner.shape == (nb,) and pc.rows.R_real.shape == (nb, 4)
        assert pc.G.shape == pc.dG_ds.shape == (nb, ng)
        assert net_padded_tails(se.nets[0, 0], se.davg, se.dstd, slots=pc.slots)[0].shape == (cfg.ntypes, n_t + 1, ng, 4)
        if na:
            assert padded_tail_backward(rng.normal(size=(nf, na, ng, 4)), pc, types).shape == (cfg.ntypes * n_t, ng)
    # the training tangents
    Rdot = env_matrix_jvp(rng.normal(size=rij.shape), env)
    assert Rdot.shape == (nf, nloc, nnei, 4)
    Tdot = embed_jvp(Rdot, cache.pieces)
    assert Tdot.shape == (nf, nloc, ng, 4)
    assert contract_jvp(cache.T, Tdot, m2).shape == (nf, nloc, ng * m2)
    dD = rng.normal(size=D.shape)
    dT = contract_backward(dD, cache.T, m2)
    assert dT.shape == (nf, nloc, ng, 4)
    assert embed_backward(dT, cache.R, cache.pieces).shape == (nf, nloc, nnei, 4)
    assert descriptor_backward(dD, cache, se).shape == (nf, nloc, nnei, 3)


# ---------------------------------------------------------------------------
# The descriptor's contract with a compressed model's tables
# ---------------------------------------------------------------------------


def test_se_e2_a_never_imports_compress_and_types_it_by_a_protocol():
    """The compressed embedding is reached through SeA.compress (a TabulatedEmbedding), so se_e2_a imports
    no part of minidp.compress, not even inside a function; minidp.compress imports se_e2_a, one way only."""
    import ast
    import typing

    import minidp.se_e2_a as sea
    from minidp.compress import Compression, compress_descriptor
    from tests.conftest import ROOT

    tree = ast.parse((ROOT / "minidp" / "se_e2_a.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names]
    assert not [name for name in imported if "compress" in name], imported

    assert typing.get_type_hints(sea.SeA)["compress"] == typing.Optional[sea.TabulatedEmbedding]
    cfg = sea.SeAConfig(rcut=4.0, rcut_smth=2.0, sel=(3, 2), neuron=(4, 8), axis_neuron=2, type_one_side=False)
    se = compress_descriptor(random_model(cfg, 0).descriptor, 0.9)
    assert isinstance(se.compress, Compression) and isinstance(se.compress, sea.TabulatedEmbedding)
    with pytest.raises(TypeError, match="SeA.compress must provide embed and embed_backward"):
        sea.SeA(se.config, se.davg, se.dstd, se.nets, compress=object())
