"""minidp.nn: backprop against finite differences, float32, shapes, residual rules, deepmd-kit, bad input.

Every gradient (dL/dx and dL/dW, dL/db, dL/d idt of every layer) is compared with central
differences in float64 of a random linear functional L = sum(c * y), over hypothesis-drawn
widths (with n_out = n_in and n_out = 2 n_in steps), depths, activations, batch sizes and
per-layer resnet / resnet_dt flags, and over the three builders.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidp.nn import (ACTIVATIONS, Layer, Net, embedding_net, fitting_net, get_activation, layer_forward,
                       layer_jvp, layer_jvp_backward, mlp, net_backward, net_forward, net_jvp, residual_kind)

ACTS = sorted(ACTIVATIONS)
# Where an activation is not differentiable (relu, relu6) or its curvature jumps (silut at its threshold 3);
# a difference quotient straddling one is meaningless.
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "silut": (3.0,), "custom_silu": (3.0,)}
# Step of the fourth-order central difference: truncation ~H^4 f^(5) ~ 1e-16, rounding ~eps |L| / H.
H = 1e-4
EPS = np.finfo(np.float64).eps
# timings on a shared machine are too noisy for hypothesis' deadline
fast = settings(deadline=None, max_examples=100)

# ---------------------------------------------------------------------------
# Drawn networks
# ---------------------------------------------------------------------------


@st.composite
def chains(draw, n0: int, max_depth: int = 4) -> list[int]:
    """Widths n0 -> ...: each step keeps the width, doubles it, or draws a new one."""
    widths = [n0]
    for _ in range(draw(st.integers(1, max_depth))):
        step, prev = draw(st.sampled_from(["same", "double", "free"])), widths[-1]
        if step == "same":
            widths.append(prev)
        elif step == "double" and prev <= 8:
            widths.append(2 * prev)
        else:
            widths.append(draw(st.integers(1, 8)))
    return widths


def random_x_c(rng, nb: int, n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """An input batch x (nb, n_in) and the loss weights c (nb, n_out)."""
    return rng.normal(0.0, scale, (nb, n_in)), rng.normal(size=(nb, n_out))


# 4.0: pre-activations cross relu6's upper kink at 6 and saturate tanh / sigmoid
scales = st.sampled_from([0.3, 1.0, 4.0])
seeds = st.integers(0, 2**32 - 1)


@st.composite
def cases(draw) -> tuple[Net, np.ndarray, np.ndarray]:
    """(net, x, c) for a net of hand-made Layers: activation, resnet and idt drawn per layer."""
    widths = draw(chains(draw(st.integers(1, 4))))
    depth = len(widths) - 1
    acts = draw(st.lists(st.sampled_from(ACTS), min_size=depth, max_size=depth))
    flags = draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=depth, max_size=depth))
    rng = np.random.default_rng(draw(seeds))
    layers = []
    for n_in, n_out, act, (resnet, dt) in zip(widths[:-1], widths[1:], acts, flags):
        # idt around 1, not deepmd-kit's 0.1, so that the activated branch weighs as much as the residual
        idt = rng.normal(1.0, 0.5, n_out) if dt else None
        layers.append(Layer(rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, n_out)), rng.normal(0.0, 1.0, n_out),
                            idt, act, resnet))
    x, c = random_x_c(rng, draw(st.integers(1, 6)), widths[0], widths[-1], draw(scales))
    return Net(layers), x, c


@st.composite
def builder_cases(draw) -> tuple[Net, np.ndarray, np.ndarray]:
    """(net, x, c) for a net made by embedding_net, fitting_net or mlp."""
    kind, act, seed = draw(st.sampled_from(["embedding", "fitting", "mlp"])), draw(st.sampled_from(ACTS)), draw(seeds)
    if kind == "embedding":
        widths = draw(chains(draw(st.sampled_from([1, 1, 2, 3]))))
        net = embedding_net(widths[1:], widths[0], act, draw(st.booleans()), seed=seed)
    elif kind == "fitting":
        widths = draw(chains(draw(st.integers(1, 6)), max_depth=3))
        net = fitting_net(widths[0], widths[1:], draw(st.integers(1, 3)), act, draw(st.booleans()), seed=seed)
    else:
        net = mlp(draw(st.integers(1, 8)), draw(st.integers(1, 3)), act, draw(st.integers(1, 3)),
                  draw(st.integers(1, 3)), seed=seed)
    x, c = random_x_c(np.random.default_rng(seed), draw(st.integers(1, 6)), net.n_in, net.n_out, draw(scales))
    return net, x, c


# ---------------------------------------------------------------------------
# Checking helpers
# ---------------------------------------------------------------------------


def kink_sides(net: Net, caches) -> list[np.ndarray]:
    """For each kink of each layer's activation, which side of it every pre-activation z lies on."""
    return [cache.z > k for layer, cache in zip(net.layers, caches) for k in KINKS.get(layer.activation, ())]


def kink_margin(net: Net, caches) -> float:
    """Distance from the nearest pre-activation z to a kink of its layer's activation (inf if none)."""
    gaps = [np.min(np.abs(cache.z - k)) for layer, cache in zip(net.layers, caches)
            for k in KINKS.get(layer.activation, ())]
    return min(gaps, default=np.inf)


def central_diff(f, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """df/d arr by fourth-order central differences, perturbing arr in place one entry at a time.

    f() returns (value, smooth): smooth is False when the perturbation moved a pre-activation
    across a kink. Returns the derivative and where it is valid (no stencil point crossed a kink).
    """
    g, valid = np.empty_like(arr), np.ones(arr.shape, dtype=bool)
    for i in np.ndindex(arr.shape):
        v = arr[i]
        vals = []
        for step in (2 * H, H, -H, -2 * H):
            arr[i] = v + step
            val, smooth = f()
            vals.append(val)
            valid[i] &= smooth
        arr[i] = v
        g[i] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * H)
    return g, valid


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref||, norm-wise so that entries near zero do not dominate."""
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), np.finfo(float).tiny))


def assert_shapes(net: Net, x, y, caches, dx, grads) -> None:
    """The shapes the comments in nn.py claim."""
    nb = x.shape[0]
    assert y.shape == (nb, net.n_out) and dx.shape == x.shape == (nb, net.n_in)
    assert len(caches) == len(grads) == len(net.layers)
    for k, (layer, cache, g) in enumerate(zip(net.layers, caches, grads)):
        n_in, n_out = layer.n_in, layer.n_out
        assert (cache.x.shape, cache.z.shape, cache.a.shape) == ((nb, n_in), (nb, n_out), (nb, n_out))
        assert k == 0 or net.layers[k - 1].n_out == n_in
        assert g.keys() == layer.params().keys()
        assert g["W"].shape == (n_in, n_out) and g["b"].shape == (n_out,)
        assert "idt" not in g or g["idt"].shape == (n_out,)


def check_against_central_differences(net: Net, x: np.ndarray, c: np.ndarray) -> None:
    """dL/dx and every parameter gradient from net_backward vs central differences of L = sum(c y)."""
    y, caches = net_forward(net, x)
    dx, grads = net_backward(net, caches, c)
    assert_shapes(net, x, y, caches, dx, grads)
    sides = kink_sides(net, caches)

    def loss() -> tuple[float, bool]:
        y, caches = net_forward(net, x)
        return float(np.sum(c * y)), all(map(np.array_equal, kink_sides(net, caches), sides))

    # Each value of L carries a rounding error of a few eps * sum|c y|, which the quotient divides
    # by H: gradients that saturation made that small can be checked to this floor only.
    noise = 10 * EPS * (np.sum(np.abs(c * y)) + 1.0) / H

    def check(got: np.ndarray, arr: np.ndarray, what: str) -> None:
        fd, valid = central_diff(loss, arr)
        got, fd = got[valid], fd[valid]
        err = np.linalg.norm(got - fd)
        assert err <= 1e-6 * np.linalg.norm(fd) + noise * np.sqrt(fd.size), \
            f"{what}: relative error {rel_err(got, fd):.2e}, |grad| {np.linalg.norm(fd):.2e}, noise {noise:.1e}"

    check(dx, x, "dL/dx")
    for k, (layer, g) in enumerate(zip(net.layers, grads)):
        for name, p in layer.params().items():
            check(g[name], p, f"layer {k} ({layer.activation}) dL/d{name}")


def check_jvp_and_input_only_backward(net: Net, x: np.ndarray, c: np.ndarray) -> None:
    """net_jvp gives net_forward's y, and ty = J tx satisfies c . (J tx) = (J^T c) . tx."""
    y, caches = net_forward(net, x)
    dx, grads = net_backward(net, caches, c)
    dx_only, empty = net_backward(net, caches, c, param_grads=False)
    np.testing.assert_array_equal(dx_only, dx)
    assert empty == [{} for _ in net.layers]
    tx = np.random.default_rng(1).normal(size=x.shape)
    y_jvp, ty, _ = net_jvp(net, x, tx)
    assert y_jvp.shape == y.shape and ty.shape == y.shape
    np.testing.assert_allclose(y_jvp, y, rtol=1e-14, atol=1e-14)
    lhs, rhs = np.sum(c * ty), np.sum(dx * tx)
    assert abs(lhs - rhs) <= 1e-12 * (np.sum(np.abs(c * ty)) + np.sum(np.abs(dx * tx)) + 1.0)


# ---------------------------------------------------------------------------
# Gradients in float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_activation_derivative_matches_central_differences(act):
    """phi'(z, phi(z)) on a grid over both tails and both sides of every kink (kept H-clear of them)."""
    z = np.linspace(-12.0, 12.0, 2401) + 0.5 / 2400  # no grid point lands on 0 or 6
    f = get_activation(act)
    fd = (-f.f(z + 2 * H) + 8 * f.f(z + H) - 8 * f.f(z - H) + f.f(z - 2 * H)) / (12 * H)
    np.testing.assert_allclose(f.grad(z, f.f(z)), fd, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_activation_second_derivative_matches_central_differences(act):
    """phi''(z, phi, phi') against differences of phi' (what the force-loss gradient needs)."""
    z = np.linspace(-12.0, 12.0, 2401) + 0.5 / 2400
    f = get_activation(act)

    def d1(x):
        return f.grad(x, f.f(x))

    fd = (-d1(z + 2 * H) + 8 * d1(z + H) - 8 * d1(z - H) + d1(z - 2 * H)) / (12 * H)
    np.testing.assert_allclose(f.grad2(z, f.f(z), d1(z)), fd, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(n_in=st.integers(1, 4), factor=st.sampled_from([1, 2, 3]), act=st.sampled_from(["tanh", "gelu", "softplus", "sigmoid"]),
       idt=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_jvp_backward_matches_central_differences(n_in, factor, act, idt, seed):
    """For L = <gy, y> + <gty, ty>: layer_jvp_backward's dL/dx, dL/d(tx), dL/dparams against differences."""
    rng = np.random.default_rng(seed)
    n_out = n_in * factor if factor < 3 else n_in + 1
    layer = Layer(rng.normal(size=(n_in, n_out)), rng.normal(size=n_out),
                  rng.normal(1.0, 0.5, n_out) if idt else None, act, True)
    x, tx = rng.normal(size=(5, n_in)), rng.normal(size=(5, n_in))
    gy, gty = rng.normal(size=(5, n_out)), rng.normal(size=(5, n_out))

    def L():
        y, ty, _ = layer_jvp(layer, x, tx)
        return np.sum(gy * y) + np.sum(gty * ty)

    _, _, cache = layer_jvp(layer, x, tx)
    gx, gtx, grads = layer_jvp_backward(layer, cache, gy, gty)
    for name, value, grad in [("x", x, gx), ("tx", tx, gtx)] + [(k, layer.params()[k], grads[k]) for k in grads]:
        assert grad.shape == value.shape, name
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            old = value[idx]
            value[idx] = old + H
            up = L()
            value[idx] = old - H
            fd[idx] = (up - L()) / (2 * H)
            value[idx] = old
        assert rel_err(grad, fd) <= 1e-6, name


@fast
@given(case=cases())
def test_net_backward_matches_central_differences(case):
    check_against_central_differences(*case)


@fast
@given(case=builder_cases())
def test_builders_backward_matches_central_differences(case):
    check_against_central_differences(*case)


@fast
@given(case=cases())
def test_jvp_and_input_only_backward_agree_with_backward(case):
    check_jvp_and_input_only_backward(*case)


@pytest.mark.parametrize("n_in,n_out", [(3, 3), (3, 6), (3, 4)])
def test_layer_jvp_is_the_directional_derivative(n_in, n_out):
    """layer_jvp's ty against central differences of layer_forward along tx."""
    rng = np.random.default_rng(n_out)
    layer = Layer(rng.normal(size=(n_in, n_out)), rng.normal(size=n_out), rng.normal(1.0, 0.5, n_out), "gelu", True)
    x, tx = rng.normal(size=(5, n_in)), rng.normal(size=(5, n_in))
    y, ty, _ = layer_jvp(layer, x, tx)
    yt = [layer_forward(layer, x + t * tx)[0] for t in (2 * H, H, -H, -2 * H)]
    fd = (-yt[0] + 8 * yt[1] - 8 * yt[2] + yt[3]) / (12 * H)
    np.testing.assert_allclose(y, layer_forward(layer, x)[0], rtol=1e-14)
    assert rel_err(ty, fd) <= 1e-6


# ---------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------


def magnitudes(net: Net, x: np.ndarray, c: np.ndarray):
    """(y, dx, grads) of the net with every array replaced by its absolute value and every phi by the
    identity, with b + 1 (|phi(z)| <= |z| + 1 and |phi'| <= 1.13 for every activation here).

    These bound the size of the terms each output and gradient sums; float32 rounding is
    proportional to them even where the terms cancel, or a saturated tanh' = 1 - a^2 or gelu's
    1 + tanh(u) leaves a small result of which few float32 digits are right.
    """
    abs_net = Net([replace(layer, W=np.abs(layer.W), b=np.abs(layer.b) + 1.0, activation="linear",
                           idt=None if layer.idt is None else np.abs(layer.idt)) for layer in net.layers])
    y, caches = net_forward(abs_net, np.abs(x))
    return (y,) + net_backward(abs_net, caches, np.abs(c))


@fast
@given(case=cases())
def test_float32_keeps_its_dtype_and_agrees_with_float64(case):
    net, x, c = case
    net32 = net.astype(np.float32)
    net64 = net32.astype(np.float64)  # the float32 parameters exactly, in float64
    x32, c32 = x.astype(np.float32), c.astype(np.float32)
    x64, c64 = x32.astype(np.float64), c32.astype(np.float64)
    y64, caches64 = net_forward(net64, x64)
    # float32 rounding moves z by ~1e-6: relu's derivative must not flip between the two precisions
    assume(kink_margin(net64, caches64) > 1e-4)
    dx64, grads64 = net_backward(net64, caches64, c64)

    y32, caches32 = net_forward(net32, x32)
    dx32, grads32 = net_backward(net32, caches32, c32)
    y_jvp, ty, _ = net_jvp(net32, x32, np.ones_like(x32))
    assert_shapes(net32, x32, y32, caches32, dx32, grads32)
    arrays32 = [y32, dx32, y_jvp, ty] + [a for cache in caches32 for a in cache] \
        + [g for d in grads32 for g in d.values()]
    assert {a.dtype for a in arrays32} == {np.dtype(np.float32)}

    # 1e-5 relative, or a few float32 roundings of the magnitude of the summed terms
    y_mag, dx_mag, grads_mag = magnitudes(net64, x64, c64)
    pairs = [("y", y32, y64, y_mag), ("dx", dx32, dx64, dx_mag)] + [
        (f"layer {k} d{name}", g32[name], g64[name], g_mag[name])
        for k, (g32, g64, g_mag) in enumerate(zip(grads32, grads64, grads_mag)) for name in g64]
    for what, got, ref, mag in pairs:
        tol = 1e-5 * np.linalg.norm(ref) + 4 * np.finfo(np.float32).eps * np.linalg.norm(mag)
        assert np.linalg.norm(got - ref) <= tol, f"{what}: relative error {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("act", ACTS)
def test_activation_keeps_float32(act):
    z = np.linspace(-8, 8, 33, dtype=np.float32)
    f = get_activation(act)
    a = f.f(z)
    assert a.dtype == np.float32 and f.grad(z, a).dtype == np.float32


# ---------------------------------------------------------------------------
# Residual rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [False, True])
@pytest.mark.parametrize("n_in,n_out,resnet,kind", [
    (3, 3, True, "same"), (3, 6, True, "double"), (1, 2, True, "double"), (3, 4, True, "none"),
    (6, 3, True, "none"), (3, 3, False, "none"), (3, 6, False, "none"),
])
def test_layer_residual_is_x_or_x_x_or_nothing(n_in, n_out, resnet, kind, dt):
    assert residual_kind(n_in, n_out, resnet) == kind
    rng = np.random.default_rng(n_in * 10 + n_out)
    idt = rng.normal(1.0, 0.5, n_out) if dt else None
    layer = Layer(rng.normal(size=(n_in, n_out)), rng.normal(size=n_out), idt, "tanh", resnet)
    x = rng.normal(size=(4, n_in))
    y, _ = layer_forward(layer, x)
    branch = np.tanh(x @ layer.W + layer.b) * (1.0 if idt is None else idt)
    residual = {"same": x, "double": np.concatenate([x, x], axis=1), "none": 0.0}[kind]
    np.testing.assert_allclose(y, branch + residual, rtol=1e-14, atol=1e-15)


def kinds(net: Net) -> list[str]:
    return [residual_kind(layer.n_in, layer.n_out, layer.resnet) for layer in net.layers]


@pytest.mark.parametrize("resnet_dt", [False, True])
def test_embedding_net_residuals_and_timesteps(resnet_dt):
    net = embedding_net([2, 2, 4, 3, 3, 6], n_in=1, activation="gelu", resnet_dt=resnet_dt, seed=0)
    assert kinds(net) == ["double", "same", "double", "none", "same", "double"]
    assert all(layer.resnet and layer.activation == "gelu" for layer in net.layers)
    # a timestep only on the layers that have a residual to scale against
    assert [layer.idt is not None for layer in net.layers] == [resnet_dt and k != "none" for k in kinds(net)]


def test_fitting_net_ends_in_a_plain_linear_layer():
    # 4 -> 4 -> 8 -> 8 hidden (same, double, same), then 8 -> 8 out: equal widths, yet no residual
    net = fitting_net(4, [4, 8, 8], n_out=8, activation="tanh", resnet_dt=True, seed=0)
    assert kinds(net) == ["same", "double", "same", "none"]
    last = net.layers[-1]
    assert (last.activation, last.resnet, last.idt) == ("linear", False, None)
    assert all(layer.idt is not None for layer in net.layers[:-1])
    x = np.random.default_rng(0).normal(size=(5, 4))
    y, caches = net_forward(net, x)
    np.testing.assert_allclose(y, caches[-1].x @ last.W + last.b, rtol=1e-14)


def test_mlp_has_no_residuals():
    net = mlp(3, 3, "tanh", n_in=3, n_out=3, seed=0)  # every layer 3 -> 3, where resnet would add x
    assert kinds(net) == ["none"] * 4
    assert all(not layer.resnet and layer.idt is None for layer in net.layers)
    assert [layer.activation for layer in net.layers] == ["tanh"] * 3 + ["linear"]
    x = np.random.default_rng(0).normal(size=(5, 3))
    h = x
    for layer in net.layers[:-1]:
        h = np.tanh(h @ layer.W + layer.b)
    np.testing.assert_allclose(net_forward(net, x)[0], h @ net.layers[-1].W + net.layers[-1].b, rtol=1e-13)


def test_builders_are_seeded_and_cast():
    a = fitting_net(5, [4, 8], seed=3)
    b = fitting_net(5, [4, 8], seed=3)
    for pa, pb in zip(a.params(), b.params()):
        assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert a.n_params() == (5 * 4 + 4) + (4 * 8 + 8 + 8) + (8 + 1)
    assert embedding_net([4, 8], dtype=np.float32, resnet_dt=True).dtype == np.float32
    assert a.astype(np.float32).dtype == np.float32 and a.dtype == np.float64


# ---------------------------------------------------------------------------
# deepmd-kit's NumPy backend
# ---------------------------------------------------------------------------

DP_ACTS = ["tanh", "gelu", "relu", "softplus", "sigmoid", "relu6", "linear", "silu", "silut", "custom_silu:1.5"]


@pytest.fixture(scope="module")
def dp_network():
    pytest.importorskip("deepmd")
    return pytest.importorskip("deepmd.dpmodel.utils.network")


def copy_into(dp_net, net: Net, rng) -> None:
    """Give dp_net's layers fresh weights and copy them into net, checking both have one structure."""
    assert len(dp_net.layers) == len(net.layers)
    for dl, layer in zip(dp_net.layers, net.layers):
        assert dl.w.shape == layer.W.shape and dl.resnet == layer.resnet
        assert (dl.idt is None) == (layer.idt is None)
        assert get_activation(dl.activation_function) is get_activation(layer.activation)
        # idt around 1 and b of spread 2 (deepmd-kit starts at 0.1 and 1): the activations must show
        dl.w = rng.normal(0.0, 1.0 / np.sqrt(layer.n_in), dl.w.shape)
        dl.b = rng.normal(0.0, 2.0, dl.b.shape)
        if dl.idt is not None:
            dl.idt = rng.normal(1.0, 0.5, dl.idt.shape)
        layer.W, layer.b, layer.idt = dl.w.copy(), dl.b.copy(), None if dl.idt is None else dl.idt.copy()


@pytest.mark.parametrize("resnet_dt", [False, True])
@pytest.mark.parametrize("act", DP_ACTS)
def test_embedding_net_matches_deepmd_kit(dp_network, act, resnet_dt):
    neuron = [2, 4, 4, 3, 6]  # double, double, same, none, double
    dp_net = dp_network.EmbeddingNet(1, neuron, act, resnet_dt, precision="float64", seed=1)
    net = embedding_net(neuron, 1, act, resnet_dt, seed=1)
    rng = np.random.default_rng(2)
    copy_into(dp_net, net, rng)
    s = rng.normal(0.0, 3.0, (200, 1))
    np.testing.assert_allclose(net_forward(net, s)[0], dp_net.call(s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("resnet_dt", [False, True])
@pytest.mark.parametrize("act", DP_ACTS)
def test_fitting_net_matches_deepmd_kit(dp_network, act, resnet_dt):
    neuron = [4, 8, 8, 5]  # same (from n_in = 4), double, same, none
    dp_net = dp_network.FittingNet(4, 2, neuron, act, resnet_dt, precision="float64", bias_out=True, seed=1)
    net = fitting_net(4, neuron, 2, act, resnet_dt, seed=1)
    rng = np.random.default_rng(3)
    copy_into(dp_net, net, rng)
    d = rng.normal(0.0, 3.0, (200, 4))
    np.testing.assert_allclose(net_forward(net, d)[0], dp_net.call(d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", DP_ACTS)
def test_activations_match_deepmd_kit(dp_network, act):
    # the relu6 kinks, and tails where softplus / sigmoid are written differently
    z = np.concatenate([np.linspace(-40.0, 40.0, 801), [0.0, 6.0, -1e-300, 6.0 + 1e-12]])
    np.testing.assert_allclose(get_activation(act).f(z), dp_network.get_activation_fn(act)(z),
                               rtol=1e-12, atol=1e-15)


def test_gelu_is_the_tanh_approximation_like_deepmd_kit(dp_network):
    scipy_special = pytest.importorskip("scipy.special")
    z = np.linspace(-6.0, 6.0, 1201)
    ours = get_activation("gelu").f(z)
    for name in ("gelu", "gelu_tf"):
        np.testing.assert_allclose(ours, dp_network.get_activation_fn(name)(z), rtol=1e-15, atol=1e-15)
    # ... and not the erf form z Phi(z), from which it differs by up to 4.7e-4 (near z = -2.7)
    exact = 0.5 * z * (1.0 + scipy_special.erf(z / np.sqrt(2.0)))
    assert np.max(np.abs(ours - exact)) > 1e-4


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swish", "tanhh", ""])
def test_unknown_activation_is_named(name):
    with pytest.raises(ValueError, match=rf"unknown activation {re.escape(repr(name))}; expected one of"):
        get_activation(name)


def test_activation_names_are_case_insensitive():
    assert get_activation("TanH") is ACTIVATIONS["tanh"]
    assert get_activation("None") is get_activation("linear")


@pytest.mark.parametrize("name", [3, None, np.tanh])
def test_non_string_activation_is_a_type_error(name):
    with pytest.raises(TypeError, match=rf"activation must be a string, got {re.escape(repr(name))}"):
        get_activation(name)


@pytest.mark.parametrize("build", [
    lambda: embedding_net([4], activation="swish"),
    lambda: fitting_net(3, [4], activation="swish"),
    lambda: mlp(4, 2, "swish"),
    lambda: layer_forward(Layer(np.ones((1, 2)), np.zeros(2), activation="swish"), np.ones((3, 1))),
])
def test_builders_and_layers_reject_an_unknown_activation(build):
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build()


@pytest.mark.parametrize("neuron", [[], [0], [4, -1], [2.5], ["8"], [True, 2], [4, None]])
def test_bad_neuron_lists_are_named(neuron):
    msg = re.escape(f"neuron must be a non-empty list of positive integers, got {neuron!r}")
    with pytest.raises(ValueError, match=msg):
        embedding_net(neuron)
    with pytest.raises(ValueError, match=msg):
        fitting_net(3, neuron)


@pytest.mark.parametrize("neuron", [5, None, "24"])
def test_a_neuron_list_that_is_no_list_is_a_type_error(neuron):
    with pytest.raises(TypeError, match=re.escape(f"neuron must be a list of positive integers, got {neuron!r}")):
        embedding_net(neuron)


def test_neuron_may_be_any_sequence_of_integers():
    assert embedding_net(np.array([4, 8])).n_out == embedding_net((4, 8)).n_out == 8


@pytest.mark.parametrize("build,msg", [
    (lambda: embedding_net([4], n_in=0), "n_in must be a positive integer, got 0"),
    (lambda: embedding_net([4], n_in=2.0), "n_in must be a positive integer, got 2.0"),
    (lambda: fitting_net(0, [4]), "n_in must be a positive integer, got 0"),
    (lambda: fitting_net(4, [4], n_out=-1), "n_out must be a positive integer, got -1"),
    (lambda: mlp(0, 2), "width must be a positive integer, got 0"),
    (lambda: mlp(4, 2.5), "depth must be a positive integer, got 2.5"),
    (lambda: mlp(True, 2), "width must be a positive integer, got True"),
    (lambda: mlp(4, 2, n_in=0), "n_in must be a positive integer, got 0"),
    (lambda: mlp(4, 2, n_out=None), "n_out must be a positive integer, got None"),
])
def test_bad_sizes_are_named(build, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        build()
