"""backend="reference", the plain se_e2_a path (every slot through the nets, G materialised, the backward
through the nets by nn.net_backward): against finite differences, and the fast path against it.

The fast path (packing, padded tails, forward-mode dG/ds, Numba) must give the reference's descriptor,
energies, forces and virials to 1e-12 (relative, Frobenius) under hypothesis and on the water frames.
deepmd-kit against the reference: tests/test_validation.py (every case of the cross-check suite).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.model import energy_forces
from minidp.se_e2_a import compute_descriptor, descriptor_backward, embed_reference, env_matrix
from tests.conftest import MODEL_DP, need, random_model, rel_err, se_configs
from tests.test_model import FLOOR, make, neighbors, specs
from tests.test_se_e2_a import H, random_pairs

seeds = st.integers(0, 2**16)
TOL = 1e-12


@settings(max_examples=30, deadline=None)
@given(cfg=se_configs(), nf=st.integers(1, 2), nloc=st.integers(1, 5), seed=seeds)
def test_fast_descriptor_and_backward_agree_with_the_reference(cfg, nf, nloc, seed):
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, nf, nloc, rng)
    D_ref, c_ref = compute_descriptor(rij, nlist, types, se, "reference")
    dD = rng.normal(size=D_ref.shape)
    g_ref = descriptor_backward(dD, c_ref, se, "reference")
    for backend in ("numpy", "numba"):
        D, c = compute_descriptor(rij, nlist, types, se, backend)
        assert rel_err(D, D_ref) <= TOL, backend
        assert rel_err(descriptor_backward(dD, c, se, backend), g_ref) <= TOL, backend


@settings(max_examples=10, deadline=None)
@given(cfg=se_configs(max_sel=3), seed=seeds)
def test_reference_backward_is_the_finite_difference(cfg, seed):
    """dL/d rij of L = sum(W * D) by the reference backward, against central differences of its forward."""
    rng = np.random.default_rng(seed)
    se = random_model(cfg, seed, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, 1, 2, rng)
    D, cache = compute_descriptor(rij, nlist, types, se, "reference")
    W = rng.normal(size=D.shape)
    g = descriptor_backward(W, cache, se, "reference")
    fd = np.zeros_like(rij)
    for idx in np.ndindex(rij.shape):
        if nlist[idx[:3]] < 0:
            continue  # padded slots depend on no position
        step = np.zeros_like(rij)
        step[idx] = H
        plus = compute_descriptor(rij + step, nlist, types, se, "reference")[0]
        minus = compute_descriptor(rij - step, nlist, types, se, "reference")[0]
        fd[idx] = np.sum(W * (plus - minus)) / (2 * H)
    assert rel_err(g, fd) <= 1e-6


def test_reference_formula_by_loops():
    """T_i = (1/nnei) sum_j G(s_ij)^T R_ij, one atom and one slot at a time, as the paper writes it."""
    from minidp.nn import net_forward
    from minidp.se_e2_a import SeAConfig

    cfg = SeAConfig(rcut=4.0, rcut_smth=1.0, sel=(3, 2), neuron=(3, 6), axis_neuron=2, type_one_side=False)
    rng = np.random.default_rng(0)
    se = random_model(cfg, 0, per_slot=True).descriptor
    types, nlist, rij = random_pairs(cfg, 1, 3, rng)
    R, _ = env_matrix(rij, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, "reference")
    T, _ = embed_reference(R, types, se)
    for i in range(3):
        Ti = np.zeros((cfg.ng, 4))
        for j in range(cfg.nnei):
            tj = int(np.searchsorted(cfg.sec, j, side="right") - 1)
            G, _ = net_forward(se.nets[types[i], tj], R[0, i, j:j + 1, :1])
            Ti += G[0][:, None] * R[0, i, j][None, :] / cfg.nnei
        np.testing.assert_allclose(T[0, i], Ti, rtol=1e-13, atol=1e-15)


@settings(max_examples=20, deadline=None)
@given(spec=specs())
def test_fast_energy_forces_virials_agree_with_the_reference(spec):
    model, coords, cells, types = make(spec)
    nl = neighbors(model, coords, cells, types)
    ref = energy_forces(nl.rij, nl.nlist, types, model, "reference")
    for backend in ("numpy", "numba"):
        p = energy_forces(nl.rij, nl.nlist, types, model, backend)
        for name, mine, theirs in zip(p._fields, p, ref):
            assert rel_err(mine, theirs, FLOOR) <= TOL, (backend, name)


def test_water_fast_paths_agree_with_the_reference(water_frames):
    """Two water frames (192 atoms) through DeepPot, every output, and big frames split into chunks."""
    from minidp import DeepPot

    coords, cells, types = water_frames
    coords, cells = coords[:2], cells[:2]
    ref = DeepPot(need(MODEL_DP), backend="reference").eval(coords, cells, types, atomic=True)
    D_ref = DeepPot(MODEL_DP, backend="reference").eval_descriptor(coords, cells, types)
    for backend, batch in (("numba", None), ("numpy", None), ("numba", 50), ("reference", 50)):
        pot = DeepPot(MODEL_DP, backend=backend, batch_size=batch)
        out = pot.eval(coords, cells, types, atomic=True)
        for k, (mine, theirs) in enumerate(zip(out, ref)):
            assert rel_err(mine, theirs) <= TOL, (backend, batch, k, rel_err(mine, theirs))
        if batch is None:
            assert rel_err(pot.eval_descriptor(coords, cells, types), D_ref) <= TOL


def test_unknown_backend_is_refused_by_name():
    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(rcut=3.0, rcut_smth=1.0, sel=(2,), neuron=(4,), axis_neuron=2,
                                   type_one_side=True), 0)
    rij, nlist = np.zeros((1, 1, 2, 3)), -np.ones((1, 1, 2), dtype=int)
    for call in (lambda: energy_forces(rij, nlist, np.zeros(1, int), model, "gpu"),
                 lambda: compute_descriptor(rij, nlist, np.zeros(1, int), model.descriptor, "gpu")):
        with pytest.raises(ValueError, match=r"backend must be one of \['reference', 'numpy', 'numba'\], got 'gpu'"):
            call()
    with pytest.raises(ValueError, match="keep=True .* needs backend 'numpy' or 'numba'"):
        compute_descriptor(rij, nlist, np.zeros(1, int), model.descriptor, "reference", keep=True)
