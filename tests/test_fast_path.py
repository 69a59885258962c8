"""The speed tricks of the embedding, fitting and training step, each against the plain function it replaces.

- nn.dual_layer / dual_layer_backward (value and tangent stacked, one product per layer, a broadcast for
  one input, tanh's lines fused) against nn.layer_jvp / layer_jvp_backward;
- nn.layer_tangent / net_tangent (the tangent of a layer already run forward) against nn.layer_jvp;
- nn.stacked_cache (layer_jvp's cache restacked for dual_layer_backward) against layer_jvp_backward;
- nn.dual_net_backward given its tangent half (the forces' backward, nn.net_input_cotangents) against computing it;
- force_training.atomic_energy_tangent against atomic_energy_jvp;
- se_e2_a.embed given the padded tails made beforehand (block_padded_tail) against embed making them;
- se_e2_a.padded_tail_sums' kernel (kernels.suffix_outer_sums) against its NumPy lines;
- the embedding in many row blocks (se_e2_a.row_block) against one block, training's gradients included;
- loss_and_grad split over pieces of centre atoms on several threads (started per region, or kept in a
  runtime.Workers) against one piece.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minidp.training.loss
from minidp.training.force_training import atomic_energy_jvp, atomic_energy_tangent
from minidp.training.loss import centre_chunks, loss_and_grad
from minidp.model import atomic_energy
from minidp.nn import (Layer, dual_layer, dual_layer_backward, dual_net, dual_net_backward, embedding_net,
                       fitting_net, layer_forward, layer_jvp, layer_jvp_backward, layer_tangent, net_forward,
                       net_input_cotangents, net_jvp, net_jvp_backward, net_tangent, stacked_cache)
from minidp.runtime import Workers
from minidp.se_e2_a import SeAConfig, block_padded_tail, embed, env_matrix, padded_tail_sums, tail_blocks
from tests.conftest import random_model
from tests.test_loss import _batch
from tests.test_model import make, neighbors, specs

# tanh has the fused kernels; gelu takes layer_jvp itself inside dual_layer
ACTS = ["tanh", "gelu"]


def _layer(rng, n_in: int, n_out: int, act: str, idt: bool, dtype=np.float64) -> Layer:
    return Layer(rng.normal(size=(n_in, n_out)).astype(dtype), rng.normal(size=n_out).astype(dtype),
                 rng.normal(1.0, 0.5, n_out).astype(dtype) if idt else None, act, True)


@settings(max_examples=60, deadline=None)
@given(n_in=st.integers(1, 5), factor=st.sampled_from([1, 2, 3]), act=st.sampled_from(ACTS), idt=st.booleans(),
       nb=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_dual_layer_is_layer_jvp(n_in, factor, act, idt, nb, seed):
    """Y2 = [y; ty] and the stacked reverse equal layer_jvp and layer_jvp_backward (residuals none, same,
    double; one input: the broadcast), the gradients accumulated onto what grads held."""
    rng = np.random.default_rng(seed)
    n_out = n_in * factor if factor < 3 else n_in + 1
    layer = _layer(rng, n_in, n_out, act, idt)
    X2 = rng.normal(size=(2, nb, n_in))
    y, ty, cache = layer_jvp(layer, X2[0], X2[1])
    Y2, dcache = dual_layer(layer, X2, keep=True)
    np.testing.assert_allclose(Y2[0], y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(Y2[1], ty, rtol=1e-13, atol=1e-13)
    G2 = rng.normal(size=(2, nb, n_out))
    gx, gtx, grads = layer_jvp_backward(layer, cache, G2[0], G2[1])
    start = {k: rng.normal(size=v.shape) for k, v in layer.params().items()}
    acc = {k: v.copy() for k, v in start.items()}
    GX2 = dual_layer_backward(layer, dcache, G2, acc)
    np.testing.assert_allclose(GX2[0], gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(GX2[1], gtx, rtol=1e-12, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(acc[k] - start[k], grads[k], rtol=1e-11, atol=1e-11)
    assert dual_layer_backward(layer, dcache, G2, acc, input_grads=False) is None
    # layer_jvp's own cache restacked (nn.stacked_cache, the fitting nets' reverse): the same reverse
    acc = {k: v.copy() for k, v in start.items()}
    GX2 = dual_layer_backward(layer, stacked_cache(layer, cache), G2, acc)
    np.testing.assert_allclose(GX2, np.stack([gx, gtx]), rtol=1e-12, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(acc[k] - start[k], grads[k], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("act", ACTS)
def test_dual_net_writes_into_out_and_matches_net_jvp(act):
    """An embedding net on [s; 1] gives net_jvp's G and dG/ds, written into a strided view; its reverse gives
    net_jvp_backward's weight gradients."""
    rng = np.random.default_rng(3)
    net = embedding_net([4, 8, 8], 1, act, True, seed=1)
    s = rng.normal(size=(7, 1))
    y, ty, caches = net_jvp(net, s, np.ones_like(s))
    out = np.full((2, 10, 8), np.nan)
    S2 = np.stack([s, np.ones_like(s)])
    Y2, dcaches = dual_net(net, S2, keep=True, out=out[:, 2:9])
    assert np.shares_memory(Y2, out) and np.isnan(out[:, :2]).all() and np.isnan(out[:, 9:]).all()
    np.testing.assert_allclose(out[0, 2:9], y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out[1, 2:9], ty, rtol=1e-13, atol=1e-13)
    G2 = rng.normal(size=(2, 7, 8))
    _, _, want = net_jvp_backward(net, caches, G2[0], G2[1], input_grads=False)
    GX2, got = dual_net_backward(net, dcaches, G2, input_grads=False)
    assert GX2 is None
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), act=st.sampled_from(["tanh", "gelu"]),
       k=st.sampled_from([-1.0, 0.5]), seed=st.integers(0, 2**16))
def test_known_tangent_half_is_the_computed_one(widths, act, k, seed):
    """dual_net_backward given gtx = k x the first-order backward's layer cotangents (nn.net_input_cotangents,
    seed dy_0) when dL/d(ty) = k dy_0, as training's fitting nets take it: the same GX2 and weight gradients
    as computing both halves."""
    rng = np.random.default_rng(seed)
    net = fitting_net(4, widths, 2, act, seed=seed % 97)
    x, tx = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    caches = net_forward(net, x)[1]
    dcaches = [stacked_cache(layer, c) for layer, c in zip(net.layers, net_tangent(net, caches, tx)[1])]
    # (5, 2) each: the forces' seed and the value half's cotangent
    dy0, gy = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    G2 = np.stack([gy, k * dy0])
    want_GX2, want = dual_net_backward(net, dcaches, G2)
    known = [k * h for h in net_input_cotangents(net, caches, dy0)]
    GX2, got = dual_net_backward(net, dcaches, G2, gtx=known)
    np.testing.assert_allclose(GX2, want_GX2, rtol=1e-12, atol=1e-12)
    for w, g in zip(want, got):
        for name in w:
            np.testing.assert_allclose(g[name], w[name], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n_in=st.integers(1, 5), factor=st.sampled_from([1, 2, 3]), act=st.sampled_from(["tanh", "gelu", "silu"]),
       idt=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_tangent_is_layer_jvp(n_in, factor, act, idt, seed):
    """The tangent from layer_forward's cache: layer_jvp's ty and cache."""
    rng = np.random.default_rng(seed)
    n_out = n_in * factor if factor < 3 else n_in + 1
    layer = _layer(rng, n_in, n_out, act, idt)
    x, tx = rng.normal(size=(6, n_in)), rng.normal(size=(6, n_in))
    _, ty, cache = layer_jvp(layer, x, tx)
    _, fcache = layer_forward(layer, x)
    ty2, cache2 = layer_tangent(layer, fcache, tx)
    np.testing.assert_allclose(ty2, ty, rtol=1e-14, atol=1e-14)
    for a, b in zip(cache2, cache):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


def test_net_tangent_and_atomic_energy_tangent_are_the_jvps():
    rng = np.random.default_rng(0)
    net = fitting_net(6, [5, 5, 10], 1, seed=2)
    x, tx = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    _, ty, _ = net_jvp(net, x, tx)
    np.testing.assert_allclose(net_tangent(net, net_forward(net, x)[1], tx)[0], ty, rtol=1e-14, atol=1e-14)
    model = random_model(SeAConfig(4.0, 1.0, (3, 3), (4, 8), 2, True), 2)
    D = rng.normal(size=(2, 5, model.descriptor.config.dim_out))
    Ddot = rng.normal(size=D.shape)
    types = np.array([0, 1, 1, 0, 1])
    _, fcaches = atomic_energy(D, types, model)
    _, Edot, _ = atomic_energy_jvp(D, Ddot, types, model)
    np.testing.assert_allclose(atomic_energy_tangent(Ddot, fcaches, model)[0], Edot, rtol=1e-13, atol=1e-13)


@settings(max_examples=10, deadline=None)
@given(specs(max_atoms=8))
def test_embed_with_padded_tails_made_beforehand_is_embed(spec):
    """embed given every block's padded tails (tail_blocks, block_padded_tail: what loss_and_grad makes once
    for its pieces) returns what embed making them returns, to the bit, on a piece of the atoms too."""
    model, coords, cells, types = make(spec)
    se = model.descriptor
    nl = neighbors(model, coords, cells, types)
    R, _ = env_matrix(nl.rij, nl.nlist, types, se.davg, se.dstd, se.config.switch_start, se.config.rcut)
    tails = {b: block_padded_tail(se, b) for b in tail_blocks(se)}
    for c in (np.arange(types.size), np.arange(types.size)[::2]):
        T, pieces = embed(R[:, c], nl.nlist[:, c], types[c], se, keep=True)
        T2, pieces2 = embed(R[:, c], nl.nlist[:, c], types[c], se, keep=True, tails=tails)
        np.testing.assert_array_equal(T2, T)
        for a, b in zip(pieces, pieces2):
            np.testing.assert_array_equal(a.trace.R_pad, b.trace.R_pad)


def test_centre_chunks_cover_the_atoms_once():
    rng = np.random.default_rng(0)
    for types in [np.zeros(1, int), np.array([1, 0]), np.zeros(5, int), np.zeros(192, int), rng.integers(0, 3, 7),
                  np.repeat([0, 1], [64, 128])]:
        for pieces in (1, 2, 3, 8):
            chunks = centre_chunks(types, pieces)
            assert len(chunks) == min(types.size, pieces) and all(c.stop > c.start for c in chunks)
            assert np.array_equal(np.concatenate([np.arange(types.size)[c] for c in chunks]), np.arange(types.size))


def test_centre_chunks_near_equal_cost():
    """One type: near-equal halves; water's 64 O then 128 H: the piece with both types (two fitting nets) gets
    TYPE_COST_ATOMS / 2 atoms fewer, unless many frames make the atoms' work dominate."""
    assert centre_chunks(np.zeros(192, int), 2) == [slice(0, 96), slice(96, 192)]
    water = np.repeat([0, 1], [64, 128])
    cut = 96 - minidp.training.loss.TYPE_COST_ATOMS // 2
    assert centre_chunks(water, 2) == [slice(0, cut), slice(cut, 192)]
    assert centre_chunks(water, 3) == [slice(0, 64), slice(64, 128), slice(128, 192)]
    assert centre_chunks(water, 2, nf=40)[0].stop == 96


@settings(max_examples=30, deadline=None)
@given(ntypes=st.integers(1, 3), n_t=st.integers(1, 12), ng=st.integers(1, 9), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_padded_tail_sums_kernel_is_the_numpy_lines(ntypes, n_t, ng, seed, dtype):
    """P[t, k] = sum over slots >= k of G^T R: the kernel gives NumPy's numbers to the bit, P[:, n_t] = 0."""
    rng = np.random.default_rng(seed)
    G, R = rng.normal(size=(ntypes, n_t, ng)).astype(dtype), rng.normal(size=(ntypes, n_t, 4)).astype(dtype)
    plain = padded_tail_sums(G, R, backend="numpy")
    fast = padded_tail_sums(G, R)
    assert fast.dtype == plain.dtype == dtype and fast.shape == (ntypes, n_t + 1, ng, 4)
    np.testing.assert_array_equal(fast, plain)
    assert not fast[:, n_t].any()


@settings(max_examples=10, deadline=None)
@given(specs(max_atoms=8), st.integers(2, 3))
def test_loss_and_grad_on_several_threads_is_the_one_thread_result(spec, workers):
    """Centre-atom ranges on threads: the same loss, predictions and gradients, to round-off (pieces of
    any size here: these frames are far below MIN_PIECE_ATOMS)."""
    model, batch = _batch(spec, 2, True)
    one = loss_and_grad(model, batch, (0.5, 2.0, 0.3), workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minidp.training.loss, "MIN_PIECE_ATOMS", 1)
        many = loss_and_grad(model, batch, (0.5, 2.0, 0.3), workers=workers)
        with Workers(workers) as kept:
            twice = [loss_and_grad(model, batch, (0.5, 2.0, 0.3), workers=kept) for _ in range(2)]
    for result in [many, *twice]:
        assert result[0].loss == pytest.approx(one[0].loss, rel=1e-12)
        for a, b in zip(result[2], one[2]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        assert len(result[1]) == len(one[1]) == len(model.params())
        for ga, gb in zip(result[1], one[1]):
            for k in gb:
                np.testing.assert_allclose(ga[k], gb[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@settings(max_examples=5, deadline=None)
@given(spec=specs(max_atoms=8))
def test_many_row_blocks_are_one_block(backend, spec):
    """embedding_features' row blocks (64 rows, the smallest row_block) give the one-block loss, predictions
    and weight gradients: the blocks' caches, rows' cotangents (made block by block, on either backend) and
    gradient shares add up."""
    import minidp.se_e2_a as sea

    model, batch = _batch(spec, 12, True)
    # rows enough for several blocks of 64 in some net
    assume((batch.nlist >= 0).sum() > 4 * 64)
    one = loss_and_grad(model, batch, (0.5, 2.0, 0.3), backend=backend, workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sea, "L2_BYTES", 1)
        assert sea.row_block(model.descriptor.config.ng, model.descriptor.dtype) == 64
        many = loss_and_grad(model, batch, (0.5, 2.0, 0.3), backend=backend, workers=1)
    assert many[0].loss == pytest.approx(one[0].loss, rel=1e-12)
    for a, b in zip(many[2], one[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(many[1], one[1]):
        for k in gb:
            np.testing.assert_allclose(ga[k], gb[k], rtol=1e-10, atol=1e-12)
