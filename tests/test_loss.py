"""The ener loss and its exact weight gradient (forces are first derivatives, so this is a second one).

Every check is against central finite differences in float64, on configurations hypothesis draws.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.training.loss import Batch, LossConfig, loss_and_grad, pair_tangent, prefactors
from minidp.training.force_training import atomic_energy_jvp, contract_jvp, embed_jvp, env_matrix_jvp, row_cotangents
from minidp.model import atomic_energy, energy_forces
from minidp.se_e2_a import EnvCache, compute_descriptor, env_matrix
from tests.test_model import make, neighbors, specs


def _batch(spec, nframes: int, virial: bool):
    """A model, and a batch of nframes jittered copies of spec's frame with random labels."""
    model, coords, cells, types = make(spec)
    rng = np.random.default_rng(spec.seed + 1)
    coords = np.concatenate([coords] + [coords + rng.normal(0, 0.03, coords.shape) for _ in range(nframes - 1)])
    cells = None if cells is None else np.repeat(cells, nframes, axis=0)
    # the jitter may bring a new neighbour within rcut: give sel room for it
    cfg = model.descriptor.config
    big = dataclasses.replace(cfg, sel=tuple(s + 4 for s in cfg.sel))
    model.descriptor.config = big
    model.descriptor.davg = np.repeat(model.descriptor.davg[:, :1], big.nnei, axis=1)
    model.descriptor.dstd = np.repeat(model.descriptor.dstd[:, :1], big.nnei, axis=1)
    nl = neighbors(model, coords, cells, types)
    labels = (rng.normal(0, 1, nframes), rng.normal(0, 1, coords.shape), rng.normal(0, 1, (nframes, 9)) if virial else None)
    return model, Batch(nl.rij, nl.nlist, types, *labels)


def _loss_along(model, batch, pref, direction, h):
    """L(theta + h d)."""
    params = model.params()
    for p, d in zip(params, direction):
        for k in p:
            p[k] += h * d[k]
    try:
        return loss_and_grad(model, batch, pref)[0].loss
    finally:
        for p, d in zip(params, direction):
            for k in p:
                p[k] -= h * d[k]


def assert_directional_gradient(model, batch, pref, seed: int) -> None:
    """dL/dtheta . d against a five-point difference of L along a random direction d over every weight."""
    _, grads, _ = loss_and_grad(model, batch, pref)
    rng = np.random.default_rng(seed)
    direction = [{k: rng.normal(size=v.shape) for k, v in p.items()} for p in model.params()]
    analytic = sum(float(np.sum(g[k] * d[k])) for g, d in zip(grads, direction) for k in g)
    h = 1e-5

    def central(step):
        return _loss_along(model, batch, pref, direction, step) - _loss_along(model, batch, pref, direction, -step)

    # five-point (Richardson) difference: truncation O(h^4), so a large third derivative along a
    # random direction over every weight cannot pass for a gradient error
    fd = (8 * central(h) - central(2 * h)) / (12 * h)
    assert abs(analytic - fd) <= 1e-6 * max(abs(fd), 1e-3)



@settings(max_examples=25, deadline=None)
@given(specs(max_atoms=8), st.integers(1, 2), st.booleans(), st.floats(0.0, 2.0))
def test_weight_gradient_matches_finite_differences(spec, nframes, virial, pv):
    """dL/dtheta . d against (L(theta + h d) - L(theta - h d)) / 2h, for a random direction d over all weights."""
    model, batch = _batch(spec, nframes, virial)
    pref = (0.7, 3.0, pv)
    assert_directional_gradient(model, batch, pref, spec.seed)


@settings(max_examples=10, deadline=None)
@given(specs(max_atoms=6))
def test_every_weight_of_a_small_model_matches_finite_differences(spec):
    """The gradient entry by entry (a direction check could hide two errors that cancel)."""
    model, batch = _batch(spec, 2, True)
    pref = (0.5, 2.0, 0.3)
    assert_entrywise_gradient(model, batch, pref, entries=4)


def assert_entrywise_gradient(model, batch, pref, entries: int) -> None:
    """The first ``entries`` entries of every weight array: dL/dtheta against its own central difference
    (h = 1e-6, to 1e-6 relative); the gradient arrays have their weights' shapes."""
    _, grads, _ = loss_and_grad(model, batch, pref)
    h = 1e-6
    for p, g in zip(model.params(), grads):
        for k, value in p.items():
            assert g[k].shape == value.shape
            for idx in list(np.ndindex(value.shape))[:entries]:
                old = value[idx]
                value[idx] = old + h
                up = loss_and_grad(model, batch, pref)[0].loss
                value[idx] = old - h
                down = loss_and_grad(model, batch, pref)[0].loss
                value[idx] = old
                fd = (up - down) / (2 * h)
                assert abs(g[k][idx] - fd) <= 1e-6 * max(abs(fd), 1e-2), (k, idx)


@settings(max_examples=20, deadline=None)
@given(specs(max_atoms=8))
def test_the_tangent_pass_is_minus_force_and_virial_along_the_displacement(spec):
    """E' along delta r_ij = v_j - v_i + V r_ij equals -(sum v . F + sum V : W): the tangents are the forces' transposes."""
    model, coords, cells, types = make(spec)
    nl = neighbors(model, coords, cells, types)
    p = energy_forces(nl.rij, nl.nlist, types, model)
    rng = np.random.default_rng(spec.seed)
    v, V = rng.normal(size=p.force.shape), rng.normal(size=(1, 9))
    D, cache = compute_descriptor(nl.rij, nl.nlist, types, model.descriptor, keep=True)
    Rdot = env_matrix_jvp(pair_tangent(v, V, nl.rij, nl.nlist), cache.env)
    Ddot = contract_jvp(cache.T, embed_jvp(Rdot, cache.pieces), model.descriptor.config.axis_neuron)
    _, Edot, _ = atomic_energy_jvp(D, Ddot, types, model)
    expected = -(np.sum(v * p.force) + np.sum(V * p.virial))
    assert abs(Edot.sum() - expected) <= 1e-9 * max(1.0, abs(expected))
    # the kernels (backend numba, the default) against the NumPy lines
    drij = pair_tangent(v, V, nl.rij, nl.nlist, "numpy")
    np.testing.assert_allclose(pair_tangent(v, V, nl.rij, nl.nlist, "numba"), drij, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(Rdot, env_matrix_jvp(drij, cache.env, "numpy"), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(specs(max_atoms=8))
def test_env_matrix_jvp_is_the_directional_derivative(spec):
    model, coords, cells, types = make(spec)
    nl = neighbors(model, coords, cells, types)
    se, cfg = model.descriptor, model.descriptor.config
    drij = np.random.default_rng(spec.seed).normal(size=nl.rij.shape) * (nl.nlist >= 0)[..., None]

    def R(rij):
        return env_matrix(rij, nl.nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut)[0]

    _, cache = env_matrix(nl.rij, nl.nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut)
    assert isinstance(cache, EnvCache)
    h = 1e-6
    fd = (R(nl.rij + h * drij) - R(nl.rij - h * drij)) / (2 * h)
    Rdot = env_matrix_jvp(drij, cache)
    assert Rdot.shape == nl.rij.shape[:3] + (4,)
    np.testing.assert_allclose(Rdot, fd, rtol=1e-6, atol=1e-8)


@settings(max_examples=15, deadline=None)
@given(specs(max_atoms=8))
def test_numba_and_numpy_backends_give_the_same_gradient(spec):
    model, batch = _batch(spec, 2, True)
    a = loss_and_grad(model, batch, (0.5, 2.0, 0.3), backend="numba")
    b = loss_and_grad(model, batch, (0.5, 2.0, 0.3), backend="numpy")
    assert abs(a[0].loss - b[0].loss) <= 1e-12 * abs(b[0].loss)
    for ga, gb in zip(a[1], b[1]):
        for k in ga:
            np.testing.assert_allclose(ga[k], gb[k], rtol=1e-9, atol=1e-12)


def test_row_cotangents_shapes():
    """The shape comments of row_cotangents: (nb, ng) each."""
    rng = np.random.default_rng(0)
    owner = np.array([0, 0, 1, 2, 2, 2])
    Tbar, Tdotbar = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    R, Rdot = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    for backend in ("numba", "numpy"):
        Gbar, dGbar = row_cotangents(Tbar, Tdotbar, R, Rdot, owner, backend)
        assert Gbar.shape == dGbar.shape == (6, 5)
        np.testing.assert_allclose(Gbar[3], Tbar[2] @ R[3] + Tdotbar[2] @ Rdot[3])
        np.testing.assert_allclose(dGbar[3], (Tdotbar[2] @ R[3]) * Rdot[3, 0])


def test_loss_value_is_deepmd_kits_formula():
    """L = p_e/N <dE^2> + p_f <dF^2> + p_v/N <dW^2>, and the RMSEs deepmd-kit displays."""
    from minidp.training.loss import ener_loss

    rng = np.random.default_rng(1)
    nf, N = 2, 5
    E, F, W = rng.normal(size=nf), rng.normal(size=(nf, N, 3)), rng.normal(size=(nf, 9))
    b = Batch(None, None, np.zeros(N, int), rng.normal(size=nf), rng.normal(size=(nf, N, 3)), rng.normal(size=(nf, 9)))
    value, c_E, c_F, c_W = ener_loss(E, F, W, b, (0.1, 10.0, 0.2))
    expected = 0.1 / N * np.mean((E - b.energy) ** 2) + 10 * np.mean((F - b.force) ** 2) + 0.2 / N * np.mean((W - b.virial) ** 2)
    assert value.loss == pytest.approx(expected, rel=1e-14)
    assert value.rmse_e == pytest.approx(np.sqrt(np.mean((E - b.energy) ** 2)) / N)
    assert value.rmse_f == pytest.approx(np.sqrt(np.mean((F - b.force) ** 2)))
    assert c_E.shape == (nf,) and c_F.shape == (nf, N, 3) and c_W.shape == (nf, 9)


def test_prefactors_move_with_the_learning_rate():
    cfg = LossConfig(0.02, 1.0, 1000.0, 1.0, 0.0, 0.0)
    assert prefactors(cfg, 1e-3, 1e-3)[:5] == pytest.approx((0.02, 1000.0, 0.0, 0.0, 0.0), rel=1e-14)
    pe, pf, pv = prefactors(cfg, 1e-4, 1e-3)[:3]
    assert pe == pytest.approx(1.0 + (0.02 - 1.0) * 0.1) and pf == pytest.approx(1.0 + 999.0 * 0.1) and pv == 0.0


@pytest.mark.parametrize("field, value, message", [("start_pref_f", -1.0, "-1.0 is below 0.0"),
                                                    ("limit_pref_e", float("nan"), "nan is not finite"),
                                                    ("start_pref_v", "1", "expected a number, got str '1'"),
                                                    ("start_pref_v", True, "expected a number, got bool True")])
def test_loss_config_refuses_bad_prefactors(field, value, message):
    """One check of a number for the whole package (minidp.checks.number)."""
    with pytest.raises(ValueError, match=f"loss {field}: {message}"):
        LossConfig(**{field: value})


def test_atomic_energy_jvp_gives_atomic_energy():
    """The tangent pass's energies are the plain forward's (it recomputes nothing differently)."""
    from tests.conftest import random_model
    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(4.0, 1.0, (3, 3), (4, 8), 2, True), 2)
    rng = np.random.default_rng(0)
    D = rng.normal(size=(2, 5, model.descriptor.config.dim_out))
    types = np.array([0, 1, 1, 0, 1])
    E, _ = atomic_energy(D, types, model)
    E2, Edot, _ = atomic_energy_jvp(D, rng.normal(size=D.shape), types, model)
    np.testing.assert_array_equal(E, E2)
    assert Edot.shape == E.shape == (2, 5)
