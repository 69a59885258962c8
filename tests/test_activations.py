"""Every activation deepmd-kit 3.2 accepts: value, phi' and phi'' against central differences, deepmd-kit's
own functions and torch's autograd; names and thresholds; float32 / long double; the users of the table.

The users are the layer's backward and its forward-mode pass (force training differentiates phi' once
more through layer_jvp_backward) and the compressed tables (compress.net_derivatives, value, slope and
curvature of an embedding net).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidp.compress import net_derivatives
from minidp.nn import (ACTIVATIONS, SILUT_THRESHOLD, Layer, embedding_net, get_activation, layer_jvp,
                       layer_jvp_backward, net_forward, net_jvp, silut)

# Every name of the table, and members of the silut family with other thresholds
NAMES = sorted(ACTIVATIONS) + ["silut:2.5", "custom_silu:0.5", "silut:-1.5", "SiLUT:8"]
# Step of the fourth-order central difference: truncation ~H^4 phi^(5), rounding ~eps |phi| / H
H = 1e-4
fast = settings(deadline=None, max_examples=60)


def kinks(name: str) -> tuple[float, ...]:
    """Where phi (relu, relu6) or phi'' (silut, at its threshold) jumps: no difference quotient may straddle one."""
    base, _, param = name.lower().partition(":")
    if base in ("silut", "custom_silu"):
        return (float(param) if param else SILUT_THRESHOLD,)
    return {"relu": (0.0,), "relu6": (0.0, 6.0)}.get(base, ())


def threshold(name: str) -> float | None:
    return kinks(name)[0] if name.lower().partition(":")[0] in ("silut", "custom_silu") else None


@st.composite
def points(draw, name: str) -> np.ndarray:
    """Points spread over [-30, 30], close to 0 and close to every kink on both sides (never within 3H)."""
    near = [0.0] + list(kinks(name))
    offsets = st.floats(3 * H, 0.05) | st.floats(0.05, 2.0)
    one = st.floats(-30.0, 30.0) | st.builds(lambda c, u, sign: c + sign * u, st.sampled_from(near), offsets,
                                             st.sampled_from([-1.0, 1.0]))
    return np.array(draw(st.lists(one, min_size=1, max_size=40)))


def central(fun, z: np.ndarray) -> np.ndarray:
    """d fun/dz by the fourth-order central difference of step H."""
    return (-fun(z + 2 * H) + 8 * fun(z + H) - 8 * fun(z - H) + fun(z - 2 * H)) / (12 * H)


def away_from_kinks(name: str, z: np.ndarray) -> np.ndarray:
    """The points whose difference stencil (z +- 2H) crosses no kink of the activation."""
    return np.all([np.abs(z - k) > 2.5 * H for k in kinks(name)], axis=0) if kinks(name) else np.ones(z.shape, bool)


# ---------------------------------------------------------------------------
# Derivatives against central differences (float64)
# ---------------------------------------------------------------------------


@fast
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_first_and_second_derivative_match_central_differences(data, name):
    act = get_activation(name)
    z = data.draw(points(name))
    z = z[away_from_kinks(name, z)]
    assume(z.size)

    def d1(x):
        return act.grad(x, act.f(x))

    a, g = act.f(z), d1(z)
    # rounding of the quotient: a few eps of the values differenced, divided by H
    noise = 20 * np.finfo(float).eps / H
    np.testing.assert_allclose(g, central(act.f, z), rtol=1e-8, atol=noise * (1.0 + np.max(np.abs(a))))
    np.testing.assert_allclose(act.grad2(z, a, g), central(d1, z), rtol=1e-7, atol=noise * (1.0 + np.max(np.abs(g))))


@fast
@given(T=st.floats(-6.0, 8.0), u=st.floats(1e-9, 1e-6))
def test_silut_is_c1_at_its_threshold_and_its_curvature_jumps(T, u):
    """Value and slope meet at T from both sides; phi'' goes from silu''(T) to 0 (tanh'' at 0)."""
    act, silu = silut(T), ACTIVATIONS["silu"]
    z = np.array([T - u, T, T + u])
    a = act.f(z)
    d1 = act.grad(z, a)
    d2 = act.grad2(z, a, d1)
    zt = np.array([T])
    C, s = silu.f(zt)[0], silu.grad(zt, None)[0]
    # (silut's C and s are deepmd-kit's float64 silu(T), silu'(T): within an ulp or two of minidp's silu)
    assert a[1] == pytest.approx(C, rel=1e-15) and d1[1] == pytest.approx(s, rel=1e-15) and d2[1] == 0.0
    # across u on either side the value moves by ~s u and the slope by ~|phi''| u
    np.testing.assert_allclose(a[[0, 2]], [C - s * u, C + s * u], rtol=0, atol=1e-12 + 2 * u * u)
    np.testing.assert_allclose(d1[[0, 2]], s, rtol=0, atol=2 * u + 1e-15)
    np.testing.assert_allclose(d2[0], silu.grad2(zt, None, None)[0], rtol=0, atol=4 * u)
    # (T + u is rounded to T's ulp: the offset the tail sees is z[2] - T, not u)
    assert abs(d2[2]) <= 2 * abs(s) ** 3 * (z[2] - T) * (1 + 1e-12) + 1e-15


# ---------------------------------------------------------------------------
# Values against deepmd-kit, derivatives against torch's autograd
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_network():
    pytest.importorskip("deepmd")
    return pytest.importorskip("deepmd.dpmodel.utils.network")


def test_the_table_has_every_activation_deepmd_kit_accepts():
    common = pytest.importorskip("deepmd.common")
    assert set(common.VALID_ACTIVATION) | {"custom_silu"} == set(ACTIVATIONS)


def assert_values_match_deepmd_kit(dp_network, name: str, z: np.ndarray) -> None:
    ref = dp_network.get_activation_fn(name)(z)
    # deepmd-kit's softplus is log(1 + e^z): below z ~ -15 the rounding of 1 + e^z (half an ulp of 1)
    # is most of the value, which minidp's log1p keeps; elsewhere both are within round-off
    atol = 1.2e-16 if name == "softplus" else 0.0
    np.testing.assert_allclose(get_activation(name).f(z), ref, rtol=1e-14, atol=atol)


@fast
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_values_match_deepmd_kit(dp_network, data, name):
    z = data.draw(points(name))
    z = np.concatenate([z, [0.0, -0.0, 6.0, kinks(name)[0] if kinks(name) else 1.0]])
    with np.errstate(over="ignore"):  # deepmd-kit's 1/(1 + e^-z) overflows to 0 in the far tail
        assert_values_match_deepmd_kit(dp_network, name, z)


@fast
@given(T=st.floats(-8.0, 10.0), data=st.data())
def test_silut_of_any_threshold_matches_deepmd_kit(dp_network, T, data):
    for name in (f"silut:{T!r}", f"custom_silu:{T!r}"):
        assert_values_match_deepmd_kit(dp_network, name, np.append(data.draw(points(name)), T))


@pytest.mark.parametrize("T", [0.0, -3.6169478166252245e-14, 1e-14, -750.0, 50.0])
def test_silut_of_extreme_thresholds_matches_deepmd_kit(dp_network, T):
    """Near T = 0 the tail is a cancellation (tanh(s (z - T)) ~ -C ~ T/2), so C and s must be deepmd-kit's
    to the bit; for T < -709 deepmd-kit's 1 + e^-T overflows and sigma(T) = 0."""
    z = np.array([T - 1.0, T, T + abs(T) * 1e-3, 0.0, 1.0, -1.0, 60.0])
    with np.errstate(over="ignore"):
        assert_values_match_deepmd_kit(dp_network, f"silut:{T!r}", z)


def torch_reference(torch, name: str):
    """The activation written with torch's own functions (torch's silu, tanh-gelu, relu6 ...)."""
    F = torch.nn.functional
    base, T = name.lower().partition(":")[0], threshold(name)
    if T is not None:
        sig = torch.sigmoid(torch.tensor(T, dtype=torch.float64))
        C, s = (T * sig).item(), (sig + T * sig * (1 - sig)).item()
        return lambda x: torch.where(x < T, F.silu(x), torch.tanh(s * (x - T)) + C)
    return {"tanh": torch.tanh, "relu": F.relu, "relu6": F.relu6, "gelu": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_tf": lambda x: F.gelu(x, approximate="tanh"), "sigmoid": torch.sigmoid, "silu": F.silu,
            # torch's Softplus turns linear above 20; logaddexp is the function itself
            "softplus": lambda x: torch.logaddexp(torch.zeros_like(x), x),
            "linear": lambda x: x, "none": lambda x: x}[base]


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_torch_autograd(name):
    """phi' and phi'' to round-off against autograd (exact derivatives of torch's formulas)."""
    torch = pytest.importorskip("torch")
    z = np.linspace(-25.0, 25.0, 5001) + 1e-3 / 7  # no point on a kink
    x = torch.tensor(z, requires_grad=True)
    (g,) = torch.autograd.grad(torch_reference(torch, name)(x).sum(), x, create_graph=True)
    # a linear phi leaves autograd nothing to differentiate twice
    g2 = torch.autograd.grad(g.sum(), x)[0] if g.requires_grad else torch.zeros_like(x)
    act = get_activation(name)
    a = act.f(z)
    d1 = act.grad(z, a)
    # Where a derivative is a small difference of O(1) terms (gelu's 1 + tanh u against z (1 - tanh^2 u) u'
    # in the left tail, both ~1e-14 at z = -7), its float64 round-off is eps times those terms, which grow
    # like |z| (phi') and |z|^3 (phi'': z u'^2): the tolerance follows them.
    eps = np.finfo(float).eps
    for what, got, ref, atol in [("phi'", d1, g.detach().numpy(), 8 * eps * (1 + np.abs(z))),
                                 ("phi''", act.grad2(z, a, d1), g2.numpy(), 8 * eps * (1 + np.abs(z)) ** 3)]:
        bad = np.abs(got - ref) > 1e-13 * np.abs(ref) + atol
        assert not bad.any(), f"{name} {what} at z = {z[bad][:3]}: {got[bad][:3]} vs torch {ref[bad][:3]}"


# ---------------------------------------------------------------------------
# Names, thresholds, dtypes
# ---------------------------------------------------------------------------


def test_a_threshold_in_the_name_is_parsed_and_the_default_is_3():
    assert get_activation("silut") is get_activation("silut:3") is get_activation("Custom_SiLU:3.0")
    assert get_activation("silut:2.5") is silut(2.5) is not get_activation("silut")
    z = np.array([2.0, 2.75, 3.5])
    # 2.75 is past the threshold 2.5 but not 3: silu there under the default only
    assert get_activation("silut").f(z)[1] == ACTIVATIONS["silu"].f(z)[1] != silut(2.5).f(z)[1]


@pytest.mark.parametrize("name, message", [
    ("silut:abc", r"activation 'silut:abc': expected a number after ':', got 'abc'"),
    ("silut:", r"activation 'silut:': expected a number after ':', got ''"),
    ("silut:inf", r"activation 'silut:inf': the number after ':' must be finite, got 'inf'"),
    ("custom_silu:nan", r"activation 'custom_silu:nan': the number after ':' must be finite, got 'nan'"),
    ("tanh:3", r"activation 'tanh:3': 'tanh' takes no number after ':'"),
    ("silutx", r"unknown activation 'silutx'; expected one of \[.*\] \(silut and custom_silu also as 'silut:T'"),
    ("swish", r"unknown activation 'swish'; expected one of"),
])
def test_bad_names_are_refused_in_one_line(name, message):
    with pytest.raises(ValueError, match=message) as err:
        get_activation(name)
    assert "\n" not in str(err.value)


def test_silut_refuses_an_infinite_threshold():
    with pytest.raises(ValueError, match=re.escape("silut threshold must be a finite number, got inf")):
        silut(float("inf"))


@pytest.mark.parametrize("dtype", [np.float32, np.longdouble])
@pytest.mark.parametrize("name", NAMES)
def test_every_activation_keeps_the_dtype(name, dtype):
    """float32 nets stay float32; the compressed tables evaluate nets in long double."""
    act = get_activation(name)
    z = np.linspace(-8, 8, 33).astype(dtype)
    a = act.f(z)
    d1 = act.grad(z, a)
    assert a.dtype == d1.dtype == act.grad2(z, a, d1).dtype == dtype


# ---------------------------------------------------------------------------
# The users of the table: the layer's forward mode and its reverse, the compressed tables
# ---------------------------------------------------------------------------


@fast
@given(name=st.sampled_from(NAMES), idt=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_jvp_backward_matches_central_differences(name, idt, seed):
    """For L = <gy, y> + <gty, ty>: dL/dx, dL/d(tx), dL/dW, dL/db, dL/d idt (phi'' enters through ty)."""
    rng = np.random.default_rng(seed)
    T = threshold(name)
    # centre the pre-activations on the interesting region: the threshold, or 0
    layer = Layer(rng.normal(size=(3, 3)), rng.normal(T or 0.0, 2.0, 3), rng.normal(1.0, 0.5, 3) if idt else None,
                  name, True)
    x, tx = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    gy, gty = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    # the stencil moves one entry by up to 2H, and z = xW + b by 2H |W| (an x), 2H |x| (a W), 2H (a b)
    margin = 2.5 * H * max(np.max(np.abs(layer.W)), np.max(np.abs(x)), 1.0)
    z = x @ layer.W + layer.b
    assume(all(np.min(np.abs(z - k)) > margin for k in kinks(name)))

    def L():
        y, ty, _ = layer_jvp(layer, x, tx)
        return np.sum(gy * y) + np.sum(gty * ty)

    _, _, cache = layer_jvp(layer, x, tx)
    gx, gtx, grads = layer_jvp_backward(layer, cache, gy, gty)
    for what, value, grad in [("x", x, gx), ("tx", tx, gtx)] + [(k, layer.params()[k], grads[k]) for k in grads]:
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            old = value[idx]
            vals = []
            for step in (2 * H, H, -H, -2 * H):
                value[idx] = old + step
                vals.append(L())
            value[idx] = old
            fd[idx] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * H)
        err = np.linalg.norm(grad - fd)
        assert err <= 1e-7 * np.linalg.norm(fd) + 1e-9, f"{name} dL/d{what}: error {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_compressed_table_derivatives_of_every_activation(name):
    """compress.net_derivatives (G, dG/ds, d2G/ds2 by forward mode) against net_forward, net_jvp and
    central differences, for an embedding net of the activation (the rows whose stencil crosses a
    kink of some layer are left out)."""
    net = embedding_net([4, 8, 8], 1, name, resnet_dt=False, seed=3)
    rng = np.random.default_rng(4)
    for layer in net.layers:  # biases of spread 3: the pre-activations reach both sides of every kink
        layer.b = rng.normal(0.0, 3.0, layer.b.shape)
    s = np.linspace(-3.0, 6.0, 901)[:, None] + 1e-3 / 7
    G, dG, d2G = net_derivatives(net, s)
    np.testing.assert_allclose(G, net_forward(net, s)[0], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dG, net_jvp(net, s, np.ones_like(s))[1], rtol=1e-13, atol=1e-13)

    def sides(x):
        """For every layer and kink, which side each row's pre-activations are on."""
        caches = net_forward(net, x)[1]
        return np.concatenate([c.z > k for c in caches for k in kinks(name)] or [np.zeros((len(x), 0), bool)],
                              axis=1)

    ok = np.all([np.all(sides(s + t) == sides(s), axis=1) for t in (2 * H, -2 * H)], axis=0)
    assert ok.mean() > 0.8
    fd1 = central(lambda x: net_forward(net, x)[0], s)
    fd2 = central(lambda x: net_derivatives(net, x)[1], s)
    np.testing.assert_allclose(dG[ok], fd1[ok], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(d2G[ok], fd2[ok], rtol=1e-6, atol=1e-7)
