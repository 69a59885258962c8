r"""Multi-layer perceptrons with hand-written backpropagation.

Everything a Deep Potential learns lives in small dense networks: the
*embedding nets* that turn a neighbour's scaled inverse distance into ``ng``
features, and the *fitting nets* that turn an atom's descriptor into its
energy. This module builds them from one dense layer, whose backward sits
right below its forward.

A layer computes

.. math::

    z = x W + b, \qquad a = \phi(z), \qquad
    y = \begin{cases}
        a \odot \mathrm{idt} + x            & n_{out} = n_{in}   \text{ (resnet)}\\
        a \odot \mathrm{idt} + [x, x]       & n_{out} = 2 n_{in} \text{ (resnet)}\\
        a \odot \mathrm{idt}                & \text{otherwise}
    \end{cases}

where ``idt`` (deepmd-kit's "timestep", present only with ``resnet_dt``) is a
learnable per-feature scale, and is 1 when absent.

Shape symbols (shared by the whole package):

- ``nb``: rows pushed through a net at once (batch; for an embedding net,
  every (atom, neighbour) pair)
- ``n_in``, ``n_out``: a layer's input and output widths
- ``nf, nloc, nall, nnei, ng, m2``: see :mod:`minidp.se_e2_a`.

Conventions: a forward returns ``(output, cache)``; the cache holds exactly
what the backward needs, so nothing is recomputed and nothing is stored on
the parameter objects. A backward takes the cache and ``dL/d(output)`` and
returns ``dL/d(input)`` and the parameter gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.checks import is_positive_int, positive_int

# ---------------------------------------------------------------------------
# Activations: each is phi(z), phi'(z) and phi''(z), written by hand side by
# side. The derivatives take the already computed a = phi(z) (and phi'(z)) so
# that the ones expressible through them recompute nothing costly.
# ---------------------------------------------------------------------------

# deepmd-kit's gelu is the tanh approximation. A Python float, not np.sqrt's np.float64:
# under NumPy 2 promotion a NumPy float64 scalar turns a float32 array into float64.
_GELU_C = float(np.sqrt(2.0 / np.pi))
# silut's threshold when its name carries none ("silut", "custom_silu"), as deepmd-kit
SILUT_THRESHOLD = 3.0


def _gelu(z):
    """gelu(z) = z/2 (1 + tanh(c (z + 0.044715 z^3))), c = sqrt(2/pi)."""
    return 0.5 * z * (1.0 + np.tanh(_GELU_C * (z + 0.044715 * z**3)))


def _gelu_grad(z, a):
    """d gelu/dz = (1+t)/2 + z/2 (1-t^2) c (1 + 3*0.044715 z^2), t = tanh(...)."""
    t = np.tanh(_GELU_C * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * z * z)


def _gelu_grad2(z, a, d1):
    """d^2 gelu/dz^2 = (1 - t^2) (u' + z/2 (u'' - 2 t u'^2)), u = c (z + 0.044715 z^3)."""
    t = np.tanh(_GELU_C * (z + 0.044715 * z**3))
    du = _GELU_C * (1.0 + 3 * 0.044715 * z * z)
    d2u = _GELU_C * 6 * 0.044715 * z
    return (1.0 - t * t) * (du + 0.5 * z * (d2u - 2.0 * t * du * du))


def _tanh_grad(z, a):
    """tanh' = 1 - tanh^2, from a = tanh(z) alone (one temporary, no recomputation)."""
    g = np.square(a)
    return np.subtract(1.0, g, out=g)


def _softplus(z):
    """softplus(z) = log(1 + e^z), written so large |z| neither overflows nor loses digits."""
    return np.logaddexp(0.0, z)


def _sigmoid(z):
    """sigma(z) = 1 / (1 + e^-z), computed as e^min(z, 0) / (1 + e^-|z|).

    e^-|z| <= 1 cannot overflow, and both tails keep their relative accuracy:
    for z << 0 the value is ~e^z, which a 1/2 (1 + tanh(z/2)) form would round
    to 0 long before it underflows (silu = z sigma(z) inherits that accuracy).
    """
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


def _silu(z):
    """silu(z) = z sigma(z) (deepmd-kit's "silu", also called swish)."""
    return z * _sigmoid(z)


# silu's derivatives need sigma(z), which a = z sigma(z) cannot give back at z = 0:
# they evaluate it again (one exp) rather than widen the (z, a, phi') interface.
def _silu_grad(z, a):
    """silu'(z) = sigma (1 + z (1 - sigma)), sigma = sigma(z)."""
    s = _sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _silu_grad2(z, a, d1):
    """silu''(z) = sigma (1 - sigma) (2 + z (1 - 2 sigma)), sigma = sigma(z)."""
    s = _sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


class Activation(NamedTuple):
    """An activation phi, phi'(z) given (z, a = phi(z)), and phi''(z) given (z, a, phi'(z)).

    The second derivative is needed when training on forces (a force is
    already a first derivative of the energy, so its gradient with respect to
    the weights differentiates phi' once more, see :func:`layer_jvp_backward`)
    and by the compressed tables (value, slope and curvature at every node).
    ``with_param`` is set for a family whose name carries a number after a
    colon ("silut:2.5"): it builds the member for that number.
    """

    f: Callable[[np.ndarray], np.ndarray]
    grad: Callable[[np.ndarray, np.ndarray], np.ndarray]
    grad2: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    with_param: Callable[[float], "Activation"] | None = None


def _zero2(z, a, d1):
    """phi'' = 0 (piecewise linear activations; relu's kink has measure zero)."""
    return np.zeros_like(z)


@lru_cache(maxsize=None)
def silut(threshold: float) -> Activation:
    r"""deepmd-kit's silut (alias custom_silu) with threshold T: silu below T, a tanh tail above.

    .. math::

        \phi(z) = \begin{cases} z\sigma(z) & z < T \\ \tanh(s (z - T)) + C & z \ge T \end{cases},
        \qquad C = \mathrm{silu}(T), \quad s = \mathrm{silu}'(T),

        \phi'(z) = \mathrm{silu}'(z) \text{ or } s (1 - \tau^2), \qquad
        \phi''(z) = \mathrm{silu}''(z) \text{ or } -2 s^2 \tau (1 - \tau^2), \qquad
        \tau = \tanh(s (z - T)).

    C and s make value and slope continuous at T (the curvature jumps there,
    from silu''(T) to 0), and the tail levels off at C + 1 instead of growing
    like z. z == T takes the tanh side, as deepmd-kit. T must be finite.
    """
    T = float(threshold)
    if not math.isfinite(T):
        raise ValueError(f"silut threshold must be a finite number, got {threshold!r}")
    # C and s in deepmd-kit's float64 arithmetic, to the bit: near T = 0 the tail's value
    # tanh(s (z - T)) + C is a cancellation of terms ~T/2, of which an ulp of C is a visible part.
    # (1 + e^-T overflows to inf for T < -709, giving sigma(T) = 0 as it should.) Python floats,
    # so that a float32 z stays float32.
    with np.errstate(over="ignore"):
        sig_T = float(1.0 / (1.0 + np.exp(-np.float64(T))))
    C, s = T * sig_T, sig_T + T * sig_T * (1.0 - sig_T)

    def f(z):
        """silu(z) for z < T, tanh(s (z - T)) + C from T on."""
        return np.where(z < T, _silu(z), np.tanh(s * (z - T)) + C)

    # the tail's tau is evaluated again: a - C would lose its digits where tau is small
    def grad(z, a):
        """silu'(z) for z < T, s (1 - tau^2) from T on."""
        tau = np.tanh(s * (z - T))
        return np.where(z < T, _silu_grad(z, a), s * (1.0 - tau * tau))

    def grad2(z, a, d1):
        """silu''(z) for z < T, -2 s^2 tau (1 - tau^2) from T on."""
        tau = np.tanh(s * (z - T))
        return np.where(z < T, _silu_grad2(z, a, d1), -2.0 * s * s * tau * (1.0 - tau * tau))

    return Activation(f, grad, grad2, silut)


# Every activation deepmd-kit 3.2 accepts (its common.VALID_ACTIVATION, plus the aliases its
# get_activation_fn knows), as value, first and second derivative:
ACTIVATIONS: dict[str, Activation] = {
    # tanh' = 1 - tanh^2: from a alone; tanh'' = -2 tanh tanh'
    "tanh": Activation(np.tanh, _tanh_grad, lambda z, a, d1: -2.0 * a * d1),
    # relu = max(z, 0); relu' = [z > 0], 0 at z = 0 (the sub-gradient PyTorch also picks); relu'' = 0
    "relu": Activation(lambda z: np.maximum(z, 0.0), lambda z, a: (z > 0).astype(z.dtype), _zero2),
    # relu6 = clip(z, 0, 6); relu6' = [0 < z < 6]; relu6'' = 0
    "relu6": Activation(lambda z: np.clip(z, 0.0, 6.0), lambda z, a: ((z > 0) & (z < 6)).astype(z.dtype), _zero2),
    # gelu, tanh approximation (gelu_tf below is the same function: TF's op vs its own kernel)
    "gelu": Activation(_gelu, _gelu_grad, _gelu_grad2),
    # softplus' = sigmoid, so softplus'' = sigmoid (1 - sigmoid)
    "softplus": Activation(_softplus, lambda z, a: _sigmoid(z), lambda z, a, d1: d1 * (1.0 - d1)),
    # sigmoid' = sigmoid (1 - sigmoid), sigmoid'' = sigmoid' (1 - 2 sigmoid)
    "sigmoid": Activation(_sigmoid, lambda z, a: a * (1.0 - a), lambda z, a, d1: d1 * (1.0 - 2.0 * a)),
    "silu": Activation(_silu, _silu_grad, _silu_grad2),
    # "silut:T" / "custom_silu:T" name another threshold (get_activation)
    "silut": silut(SILUT_THRESHOLD),
    # linear = z, linear' = 1, linear'' = 0
    "linear": Activation(lambda z: z, lambda z, a: np.ones_like(z), _zero2),
}
# deepmd-kit spells some activations more than one way
ACTIVATIONS["none"] = ACTIVATIONS["linear"]
ACTIVATIONS["gelu_tf"] = ACTIVATIONS["gelu"]
ACTIVATIONS["custom_silu"] = ACTIVATIONS["silut"]


def get_activation(name: str) -> Activation:
    """Look up an activation by deepmd-kit's name (case-insensitive).

    A family takes its number after a colon: "silut:2.5" (or "custom_silu:2.5")
    is silut with threshold 2.5; a bare "silut" has threshold 3.0.
    """
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {name!r} ({type(name).__name__})")
    base, colon, param = name.lower().partition(":")
    act = ACTIVATIONS.get(base)
    if act is None:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} "
                         f"(silut and custom_silu also as 'silut:T', T a threshold)")
    if not colon:
        return act
    if act.with_param is None:
        raise ValueError(f"activation {name!r}: {base!r} takes no number after ':'")
    try:
        value = float(param)
    except ValueError:
        raise ValueError(f"activation {name!r}: expected a number after ':', got {param!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"activation {name!r}: the number after ':' must be finite, got {param!r}")
    return act.with_param(value)


# ---------------------------------------------------------------------------
# Mixed precision: a layer's products on operands rounded to a narrower float
# ---------------------------------------------------------------------------
#
# deepmd-kit's ``training/mixed_precision`` (TF backend) casts a net's inputs and
# weights to float16 or bfloat16 before each product and casts the net's output
# back. NumPy has float16 but no bfloat16, and the hardware these formats are for
# (tensor cores) multiplies the narrow operands and accumulates in float32. minidp
# emulates exactly that: operands rounded to the compute precision and stored in
# the weights' float (float32 or float64), so that the product accumulates there.

COMPUTE_PRECISIONS = ("float16", "bfloat16")


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16 (ties to even), returned in x's dtype (float32 or float64).

    bfloat16 is float32 with the low 16 bits of the mantissa dropped: the bits are
    rounded at bit 16 (add 0x7FFF plus the kept part's lowest bit, then clear the low
    half). float64 goes through float32 first, as PyTorch's cast does. NaN stays
    NaN (the addition would carry its payload into the sign); overflow gives +-inf.
    """
    # (...)  x in float32 (a float64 beyond float32's range becomes inf, as in PyTorch), its bits as integers
    with np.errstate(over="ignore"):
        x32 = np.asarray(x, dtype=np.float32)
    bits = x32.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    # (...)
    y = np.where(np.isnan(x32), x32, rounded.view(np.float32))
    return y.astype(np.result_type(x, np.float32), copy=False)


def round_to(x: np.ndarray, compute: str | None) -> np.ndarray:
    """x rounded to the compute precision, kept in x's dtype: float16 (NumPy's cast, one rounding to
    nearest even; beyond 65504 it overflows to inf), bfloat16 (:func:`round_to_bfloat16`), or x itself
    for None (no mixed precision). The derivative is taken as 1 (a cast's, "straight through")."""
    if compute is None:
        return x
    if compute == "float16":
        # (...)  the hazard is range, not digits: |x| > 65504 becomes inf (the run stops at a non-finite loss)
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(x.dtype)
    if compute == "bfloat16":
        return round_to_bfloat16(x)
    raise ValueError(f"compute precision {compute!r} is not supported; expected one of {list(COMPUTE_PRECISIONS)}")


# ---------------------------------------------------------------------------
# The dense layer
# ---------------------------------------------------------------------------


@dataclass
class Layer:
    """Parameters and configuration of one dense layer (math in the module docstring)."""

    W: np.ndarray  # (n_in, n_out) weights
    b: np.ndarray  # (n_out,) bias
    idt: np.ndarray | None = None  # (n_out,) resnet timestep, or None
    activation: str = "tanh"  # name in ACTIVATIONS
    resnet: bool = False  # add the input back when n_out is n_in or 2 n_in
    # mixed precision: the inputs of the layer's products are rounded to this (round_to) as they
    # enter; None: no rounding. Set together with the rounded weights by with_compute, never alone.
    compute: str | None = None

    @property
    def n_in(self) -> int:
        return self.W.shape[0]

    @property
    def n_out(self) -> int:
        return self.W.shape[1]

    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays by name (idt only when present)."""
        p = {"W": self.W, "b": self.b}
        if self.idt is not None:
            p["idt"] = self.idt
        return p


class LayerCache(NamedTuple):
    """What layer_backward needs from layer_forward."""

    x: np.ndarray  # (nb, n_in) input
    z: np.ndarray  # (nb, n_out) pre-activation xW + b
    a: np.ndarray  # (nb, n_out) phi(z)


def residual_kind(n_in: int, n_out: int, resnet: bool) -> str:
    """'same' (y += x), 'double' (y += [x, x]) or 'none', deepmd-kit's rule."""
    if resnet and n_out == n_in:
        return "same"
    if resnet and n_out == 2 * n_in:
        return "double"
    return "none"


def _add_residual(out: np.ndarray, inp: np.ndarray, kind: str) -> None:
    """out += inp ('same') or [inp, inp] ('double', half by half, without building
    the concatenation), in place; nothing for 'none'."""
    n = inp.shape[1]
    if kind == "same":
        out += inp
    elif kind == "double":
        out[:, :n] += inp
        out[:, n:] += inp


def _residual_backward(dx: np.ndarray, dy: np.ndarray, kind: str) -> None:
    """dx += the residual's share of dy (the transpose of _add_residual), in place."""
    n = dx.shape[1]
    if kind == "same":
        dx += dy
    elif kind == "double":
        dx += dy[:, :n]
        dx += dy[:, n:]


def layer_forward(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, LayerCache]:
    """y = phi(xW + b) * idt (+ x or [x, x] with resnet); returns (y, cache).

    With ``layer.compute`` (mixed precision) x is first rounded to it (:func:`round_to`)."""
    # (nb, n_in)
    x = round_to(x, layer.compute)
    # (nb, n_out)
    z = x @ layer.W
    z += layer.b
    # (nb, n_out)
    a = get_activation(layer.activation).f(z)
    kind = residual_kind(layer.n_in, layer.n_out, layer.resnet)
    if layer.idt is None and kind == "none":
        return a, LayerCache(x, z, a)
    # (nb, n_out)  a fresh array: a itself is kept for the backward
    y = a * layer.idt if layer.idt is not None else a.copy()
    _add_residual(y, x, kind)
    return y, LayerCache(x, z, a)


def layer_backward(
    layer: Layer, cache: LayerCache, dy: np.ndarray, param_grads: bool = True
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of layer_forward.

    With g = dL/dy:  dL/d idt = sum_rows(g * a);  dL/dz = g * idt * phi'(z);
    dL/dW = x^T dL/dz;  dL/db = sum_rows(dL/dz);  dL/dx = dL/dz W^T + (g, or
    g[:, :n] + g[:, n:] for the doubling residual).
    """
    x, z, a = cache
    grads: dict[str, np.ndarray] = {}
    if layer.idt is not None:
        if param_grads:
            # (n_out,)
            grads["idt"] = np.sum(dy * a, axis=0)
        dy_a = dy * layer.idt
    else:
        dy_a = dy
    # (nb, n_out)
    dz = get_activation(layer.activation).grad(z, a)
    dz *= dy_a
    if param_grads:
        # (n_in, n_out)
        grads["W"] = x.T @ dz
        # (n_out,)
        grads["b"] = np.sum(dz, axis=0)
    # (nb, n_in)
    dx = dz @ layer.W.T
    _residual_backward(dx, dy, residual_kind(layer.n_in, layer.n_out, layer.resnet))
    return dx, grads


class JvpCache(NamedTuple):
    """What layer_jvp_backward needs from layer_jvp."""

    x: np.ndarray  # (nb, n_in) input
    tx: np.ndarray  # (nb, n_in) its tangent
    z: np.ndarray  # (nb, n_out) pre-activation xW + b
    tz: np.ndarray  # (nb, n_out) its tangent tx W
    a: np.ndarray  # (nb, n_out) phi(z)
    d1: np.ndarray  # (nb, n_out) phi'(z)
    ta: np.ndarray  # (nb, n_out) the tangent of a, phi'(z) tz


def layer_jvp(layer: Layer, x: np.ndarray, tx: np.ndarray) -> tuple[np.ndarray, np.ndarray, JvpCache]:
    """Forward-mode derivative: y = layer(x) and ty = (dy/dx) tx, in one pass.

    With a = phi(z), z = xW + b:  tz = tx W,  ta = phi'(z) * tz,
    ty = ta * idt + (tx, [tx, tx] or nothing, as the residual of y).

    When a net's input is a scalar s (an embedding net), tx = 1 gives dG/ds
    for every row at the price of one more matmul per layer. Returns
    (y, ty, cache); the cache is for :func:`layer_jvp_backward` and may be
    dropped when only y and ty are wanted.
    """
    act = get_activation(layer.activation)
    # (nb, n_in) each: the operands rounded to the compute precision (mixed precision; else as they are)
    x, tx = round_to(x, layer.compute), round_to(tx, layer.compute)
    # (nb, n_out), (nb, n_out)
    z = x @ layer.W
    z += layer.b
    tz = tx @ layer.W
    # (nb, n_out) each: phi(z), phi'(z) and the tangent of a
    a = act.f(z)
    d1 = act.grad(z, a)
    ta = d1 * tz
    cache = JvpCache(x, tx, z, tz, a, d1, ta)
    kind = residual_kind(layer.n_in, layer.n_out, layer.resnet)
    if layer.idt is None and kind == "none":
        return a, ta, cache
    # (nb, n_out), (nb, n_out)  fresh arrays: a and ta are kept in the cache
    y = a * layer.idt if layer.idt is not None else a.copy()
    ty = ta * layer.idt if layer.idt is not None else ta.copy()
    _add_residual(y, x, kind)
    _add_residual(ty, tx, kind)
    return y, ty, cache


def layer_tangent(layer: Layer, cache: LayerCache, tx: np.ndarray) -> tuple[np.ndarray, JvpCache]:
    """layer_jvp's tangent for a layer already run forward: ty from tx, reusing layer_forward's cache.

    Training computes every fitting net's forward first (the energy and the
    forces define the loss, hence the displacement the tangent follows);
    its tangent pass then needs no second value pass (tz = tx W, ta = phi'(z) tz,
    ty as in :func:`layer_jvp`): one product per layer instead of two. Returns
    (ty, the JvpCache layer_jvp would have made).
    """
    x, z, a = cache
    # (nb, n_in)  rounded as layer_forward rounded x (mixed precision)
    tx = round_to(tx, layer.compute)
    # (nb, n_out) each: tz, phi'(z), ta
    tz = tx @ layer.W
    d1 = get_activation(layer.activation).grad(z, a)
    ta = d1 * tz
    jcache = JvpCache(x, tx, z, tz, a, d1, ta)
    kind = residual_kind(layer.n_in, layer.n_out, layer.resnet)
    if layer.idt is None and kind == "none":
        return ta, jcache
    # (nb, n_out)  a fresh array: ta is kept in the cache
    ty = ta * layer.idt if layer.idt is not None else ta.copy()
    _add_residual(ty, tx, kind)
    return ty, jcache


def layer_jvp_backward(
    layer: Layer, cache: JvpCache, gy: np.ndarray, gty: np.ndarray, input_grads: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, np.ndarray]]:
    r"""Reverse mode through layer_jvp: from dL/dy and dL/d(ty) to dL/dx, dL/d(tx), dL/dparams.

    This is what training on forces needs: the force is a tangent (ty), and
    its loss must be differentiated with respect to the weights. With
    gy = dL/dy, gty = dL/d(ty), the chain rule through the forward's lines:

    .. math::

        \bar{\mathrm{idt}} = \sum (g_y a + g_{ty} \dot a), \quad
        \bar{\dot z} = g_{ty}\, \mathrm{idt}\, \phi'(z), \quad
        \bar z = g_y\, \mathrm{idt}\, \phi'(z) + g_{ty}\, \mathrm{idt}\, \dot z\, \phi''(z),

        \bar W = x^\top \bar z + \dot x^\top \bar{\dot z}, \quad \bar b = \sum \bar z, \quad
        \bar x = \bar z W^\top + \mathrm{res}^\top(g_y), \quad
        \bar{\dot x} = \bar{\dot z} W^\top + \mathrm{res}^\top(g_{ty}).

    The phi'' term is the second derivative: the tangent ta = phi'(z) tz moves
    when z does. With ``input_grads=False`` (a net's first layer, when its
    input is data) dL/dx and dL/d(tx) are not computed and None is returned.
    """
    x, tx, z, tz, a, d1, ta = cache
    grads: dict[str, np.ndarray] = {}
    if layer.idt is not None:
        # (n_out,)
        grads["idt"] = np.sum(gy * a, axis=0) + np.sum(gty * ta, axis=0)
        gy_a, gty_a = gy * layer.idt, gty * layer.idt
    else:
        gy_a, gty_a = gy, gty
    # (nb, n_out) dL/d(tz)
    gtz = gty_a * d1
    # (nb, n_out) dL/dz, the second term through phi'' (built in place: these are the largest arrays)
    gz = gy_a * d1
    h = get_activation(layer.activation).grad2(z, a, d1)
    h *= tz
    h *= gty_a
    gz += h
    # (n_in, n_out), (n_out,)
    grads["W"] = x.T @ gz
    grads["W"] += tx.T @ gtz
    grads["b"] = np.sum(gz, axis=0)
    if not input_grads:
        return None, None, grads
    # (nb, n_in), (nb, n_in)
    gx = gz @ layer.W.T
    gtx = gtz @ layer.W.T
    kind = residual_kind(layer.n_in, layer.n_out, layer.resnet)
    _residual_backward(gx, gy, kind)
    _residual_backward(gtx, gty, kind)
    return gx, gtx, grads


# ---------------------------------------------------------------------------
# Networks: a list of layers
# ---------------------------------------------------------------------------


@dataclass
class Net:
    """A stack of dense layers, applied in order."""

    layers: list[Layer] = field(default_factory=list)

    @property
    def n_in(self) -> int:
        return self.layers[0].n_in

    @property
    def n_out(self) -> int:
        return self.layers[-1].n_out

    @property
    def dtype(self) -> np.dtype:
        return self.layers[0].W.dtype

    def params(self) -> list[dict[str, np.ndarray]]:
        """Trainable arrays, one dict per layer (the layout of net_backward's grads)."""
        return [layer.params() for layer in self.layers]

    def n_params(self) -> int:
        return sum(p.size for d in self.params() for p in d.values())

    def astype(self, dtype) -> "Net":
        """A copy with every parameter cast to dtype (float64 or float32)."""
        return Net(
            [
                replace(
                    layer,
                    W=layer.W.astype(dtype),
                    b=layer.b.astype(dtype),
                    idt=None if layer.idt is None else layer.idt.astype(dtype),
                )
                for layer in self.layers
            ]
        )


def with_compute(net: Net, compute: str | None, last: bool = True) -> Net:
    r"""The net as mixed precision runs it: a copy whose weights W, b, idt are rounded to ``compute``
    (:func:`round_to`, in the net's float) and whose layers round their inputs to it.

    .. math::

        z = \mathrm{r}(x)\, \mathrm{r}(W) + \mathrm{r}(b), \qquad \mathrm{r} = \text{round to compute}

    the product accumulated in the net's float (float32: as a tensor core); the activation, the timestep's
    scaling and a resnet layer's sum (which adds the rounded input) stay in it too. The rounding's derivative is
    taken as 1, so the gradients of this copy are those of the master weights (the net itself, which
    the optimizer updates). ``last=False`` leaves the last layer in the net's float (deepmd-kit's
    fitting nets: their output layer stays in the output precision).
    """
    n = len(net.layers) if last else len(net.layers) - 1
    return Net([
        replace(layer, W=round_to(layer.W, compute), b=round_to(layer.b, compute),
                idt=None if layer.idt is None else round_to(layer.idt, compute), compute=compute)
        if k < n else layer
        for k, layer in enumerate(net.layers)
    ])


def net_forward(net: Net, x: np.ndarray) -> tuple[np.ndarray, list[LayerCache]]:
    """y = layer_L(... layer_1(x)); returns (y, one cache per layer)."""
    caches = []
    for layer in net.layers:
        x, cache = layer_forward(layer, x)
        caches.append(cache)
    return x, caches


def net_backward(
    net: Net, caches: list[LayerCache], dy: np.ndarray, param_grads: bool = True
) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Backward of net_forward: the chain rule through the layers in reverse.

    Returns dL/dx and a list (in layer order) of per-layer parameter gradients;
    with ``param_grads=False`` only dL/dx is computed (the lists are empty dicts),
    which is all that forces need: :func:`net_input_cotangents`' chain, its first entry.
    """
    if not param_grads:
        return net_input_cotangents(net, caches, dy)[0], [{} for _ in net.layers]
    grads: list[dict[str, np.ndarray]] = [{} for _ in net.layers]
    for i in reversed(range(len(net.layers))):
        dy, grads[i] = layer_backward(net.layers[i], caches[i], dy)
    return dy, grads


def net_input_cotangents(net: Net, caches: list[LayerCache], dy: np.ndarray) -> list[np.ndarray]:
    """dL/dx_l of every layer's input x_l, the first layer's (the net's dL/dx) first: the chain rule
    through the layers in reverse, without parameter gradients, each step kept. Forces need the first
    (:func:`net_backward` with ``param_grads=False``); training on forces reuses them all: they are the
    tangent half of the fitting nets' second-order reverse (:func:`dual_net_backward`'s ``gtx``)."""
    gx: list[np.ndarray] = [dy] * len(net.layers)
    for i in reversed(range(len(net.layers))):
        dy, _ = layer_backward(net.layers[i], caches[i], dy, param_grads=False)
        gx[i] = dy
    return gx


def net_jvp(net: Net, x: np.ndarray, tx: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[JvpCache]]:
    """y = net(x) and its forward-mode derivative ty = (dy/dx) tx, layer by layer (and the caches)."""
    caches = []
    for layer in net.layers:
        x, tx, cache = layer_jvp(layer, x, tx)
        caches.append(cache)
    return x, tx, caches


def net_tangent(net: Net, caches: list[LayerCache], tx: np.ndarray) -> tuple[np.ndarray, list[JvpCache]]:
    """net_jvp's tangent ty for a net already run forward (net_forward's caches), layer by layer with
    :func:`layer_tangent`; returns ty and the JvpCaches net_jvp_backward needs."""
    jcaches = []
    for layer, cache in zip(net.layers, caches):
        tx, jcache = layer_tangent(layer, cache, tx)
        jcaches.append(jcache)
    return tx, jcaches


def net_jvp_backward(
    net: Net, caches: list[JvpCache], gy: np.ndarray, gty: np.ndarray, input_grads: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None, list[dict[str, np.ndarray]]]:
    """Reverse mode through net_jvp: layer_jvp_backward from the last layer to the first.

    Returns dL/dx, dL/d(tx) (None with ``input_grads=False``: the input is
    data) and the per-layer parameter gradients, in net.params() layout.
    """
    grads: list[dict[str, np.ndarray]] = [{} for _ in net.layers]
    for i in reversed(range(len(net.layers))):
        need = input_grads or i > 0
        gy, gty, grads[i] = layer_jvp_backward(net.layers[i], caches[i], gy, gty, need)
    return gy, gty, grads


# ---------------------------------------------------------------------------
# Fast path: value and tangent stacked, one product per layer
# ---------------------------------------------------------------------------
#
# layer_jvp multiplies x and tx by W in two products and makes seven arrays per
# layer; training and inference push hundreds of thousands of embedding rows
# through it. The fast path keeps the dual numbers stacked, X2 = [x; tx] of
# shape (2, nb, n), and saves three things:
#
# 1. a layer is one product X2 W (2 nb rows), its reverse two: X2^T GZ2 (the
#    weight gradient, K = 2 nb, instead of x^T gz + tx^T gtz and their sum) and GZ2 W^T;
# 2. a layer with one input (an embedding net's first) needs no product at all:
#    X2 W is the broadcast X2 * W[0] (a K = 1 product costs BLAS more than it computes);
# 3. with tanh (deepmd-kit's default, and the water model's) the elementwise lines of
#    layer_jvp and layer_jvp_backward run as one fused pass each (kernels.tanh_dual,
#    kernels.tanh_dual_backward), and the cache is two arrays, a = tanh(z) and tz,
#    besides the input: phi' = 1 - a^2 and phi'' = -2 a phi' come from a.
#
# Other activations take layer_jvp / layer_jvp_backward themselves (their cache is
# a JvpCache). tests/test_nn.py checks both against the plain functions above.


class DualCache(NamedTuple):
    """What dual_layer_backward needs from dual_layer (tanh layers)."""

    X2: np.ndarray  # (2, nb, n_in) the input x and its tangent tx, stacked
    AZ2: np.ndarray  # (2, nb, n_out) a = tanh(z) and tz = tx W, stacked


# nn.residual_kind's names as kernels.tanh_dual's codes
_RESIDUAL_CODE = {"none": kernels.RES_NONE, "same": kernels.RES_SAME, "double": kernels.RES_DOUBLE}


def _fused(layer: Layer) -> bool:
    """Whether the layer's elementwise lines have a fused kernel (tanh)."""
    return layer.activation.lower() == "tanh"


def _idt(layer: Layer) -> np.ndarray:
    """The timestep, or ones (n_out,) in the weights' dtype: the fused kernels always scale."""
    return layer.idt if layer.idt is not None else np.ones(layer.n_out, dtype=layer.W.dtype)


def dual_product(X2: np.ndarray, W: np.ndarray) -> np.ndarray:
    """[x W; tx W] for X2 = [x; tx] (2, nb, n_in): one product, or a broadcast when n_in = 1. Returns (2, nb, n_out)."""
    _, nb, n_in = X2.shape
    if n_in == 1:
        # (2, nb, n_out)  the outer product, elementwise
        return X2 * W[0]
    # (2, nb, n_out)
    return (X2.reshape(2 * nb, n_in) @ W).reshape(2, nb, W.shape[1])


def dual_layer(layer: Layer, X2: np.ndarray, keep: bool = False, out: np.ndarray | None = None
               ) -> tuple[np.ndarray, DualCache | JvpCache | None]:
    """layer_jvp on stacked dual numbers: Y2 = [y; ty] from X2 = [x; tx], each (2, nb, n).

    Returns Y2 (written into ``out`` when given: any (2, nb, n_out) view) and,
    with ``keep``, the cache for :func:`dual_layer_backward`.
    """
    if not _fused(layer):
        y, ty, cache = layer_jvp(layer, X2[0], X2[1])
        Y2 = np.empty((2,) + y.shape, dtype=y.dtype) if out is None else out
        Y2[0], Y2[1] = y, ty
        return Y2, (cache if keep else None)
    # (2, nb, n_in)  rounded to the compute precision (mixed precision; else X2 itself)
    X2 = round_to(X2, layer.compute)
    # (2, nb, n_out)  [xW; txW], then its first half becomes a = tanh(xW + b) in place
    AZ2 = dual_product(X2, layer.W)
    A = AZ2[0]
    A += layer.b
    np.tanh(A, out=A)
    # (2, nb, n_out)
    Y2 = np.empty_like(AZ2) if out is None else out
    code = _RESIDUAL_CODE[residual_kind(layer.n_in, layer.n_out, layer.resnet)]
    kernels.tanh_dual(AZ2[0], AZ2[1], X2[0], X2[1], _idt(layer), code, Y2[0], Y2[1])
    return Y2, (DualCache(X2, AZ2) if keep else None)


def dual_layer_backward(layer: Layer, cache: DualCache | JvpCache, G2: np.ndarray, grads: dict[str, np.ndarray],
                        input_grads: bool = True, gtx: np.ndarray | None = None) -> np.ndarray | None:
    """layer_jvp_backward on stacked numbers: GX2 = [dL/dx; dL/d(tx)] (2, nb, n_in) from G2 = [dL/dy; dL/d(ty)].

    The parameter gradients are *added* to ``grads`` (a dict in layer.params()
    layout that the caller owns: row blocks of one net accumulate into it).
    Returns None with ``input_grads=False``. ``gtx`` (nb, n_in): dL/d(tx) when the caller already
    knows it (training's fitting nets, see :func:`dual_net_backward`); a tanh layer then makes the
    product of the value half only (non-tanh layers compute both halves).
    """
    if isinstance(cache, JvpCache):
        gx, gtx, g = layer_jvp_backward(layer, cache, G2[0], G2[1], input_grads)
        for k, v in g.items():
            grads[k] += v
        return None if gx is None else np.stack([gx, gtx])
    X2, AZ2 = cache
    _, nb, n_out = AZ2.shape
    n_in = X2.shape[2]
    # (2, nb, n_out)  [dL/dz; dL/d(tz)]
    GZ2 = np.empty_like(AZ2)
    gidt = grads["idt"] if layer.idt is not None else np.zeros(n_out, dtype=AZ2.dtype)
    kernels.tanh_dual_backward(G2[0], G2[1], AZ2[0], AZ2[1], _idt(layer), GZ2[0], GZ2[1], grads["b"], gidt)
    # (n_in, n_out)  x^T gz + tx^T gtz as one product
    grads["W"] += X2.reshape(2 * nb, n_in).T @ GZ2.reshape(2 * nb, n_out)
    if not input_grads:
        return None
    code = _RESIDUAL_CODE[residual_kind(layer.n_in, layer.n_out, layer.resnet)]
    if gtx is None:
        # (2, nb, n_in)
        GX2 = (GZ2.reshape(2 * nb, n_out) @ layer.W.T).reshape(2, nb, n_in)
    else:
        # (2, nb, n_in)  the value half's product; the tangent half, residual included, is the caller's
        GX2 = np.empty((2, nb, n_in), dtype=GZ2.dtype)
        np.matmul(GZ2[0], layer.W.T, out=GX2[0])
        GX2[1] = gtx
    # _residual_backward on each computed half, in one pass (G2 may be a strided view: no reshaped copy of it)
    if code != kernels.RES_NONE:
        kernels.residual_backward(G2[0], GX2[0], code)
        if gtx is None:
            kernels.residual_backward(G2[1], GX2[1], code)
    return GX2


def stacked_cache(layer: Layer, cache: JvpCache) -> DualCache | JvpCache:
    """layer_jvp's (or layer_tangent's) cache in dual_layer_backward's form: for a tanh layer the stacked
    DualCache(X2 = [x; tx], AZ2 = [a; tz]) (two copies), whose reverse takes one product for the weight
    gradient (K = 2 nb) and one for the input's instead of four, and the fused kernel; other layers keep
    their JvpCache. For nets run forward by net_jvp/net_tangent (the fitting nets: a few hundred rows,
    the copies cost a few percent of the products they merge)."""
    if not _fused(layer):
        return cache
    # (2, nb, n_in), (2, nb, n_out)
    return DualCache(np.stack([cache.x, cache.tx]), np.stack([cache.a, cache.tz]))


def dual_net(net: Net, X2: np.ndarray, keep: bool = False, out: np.ndarray | None = None
             ) -> tuple[np.ndarray, list]:
    """net_jvp on stacked dual numbers, layer by layer with :func:`dual_layer`: Y2 = [y; ty] (2, nb, n_out)
    (into ``out`` when given) and, with ``keep``, one cache per layer."""
    caches = []
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        X2, cache = dual_layer(layer, X2, keep, out if i == last else None)
        caches.append(cache)
    return X2, caches


def dual_net_backward(net: Net, caches: list, G2: np.ndarray, grads: list[dict[str, np.ndarray]] | None = None,
                      input_grads: bool = True, gtx: list[np.ndarray] | None = None
                      ) -> tuple[np.ndarray | None, list[dict[str, np.ndarray]]]:
    """net_jvp_backward on stacked numbers: GX2 (None with ``input_grads=False``) and the parameter
    gradients, added to ``grads`` when given (net.params() layout), else to fresh zeros.

    ``gtx``: each layer's dL/d(tx_l), when the tangent half of the reverse is known beforehand. It is
    when dL/d(ty) = k dy_0 for the seed dy_0 of a first-order backward through the same caches: the
    tangent half's chain, dL/d(tz) = dL/d(ty) idt phi'(z) and dL/d(tx) = dL/d(tz) W^T + res^T(dL/d(ty)),
    has no term from the value half, so it is k times that backward's (:func:`net_input_cotangents`).
    Training on forces has k = -1: one of its seven products per fitting layer is saved.
    """
    grads = zeros_like_params(net.params()) if grads is None else grads
    for i in reversed(range(len(net.layers))):
        known = None if gtx is None else gtx[i]
        G2 = dual_layer_backward(net.layers[i], caches[i], G2, grads[i], input_grads or i > 0, known)
    return G2, grads


# ---------------------------------------------------------------------------
# Builders for the three shapes of net used in this package
# ---------------------------------------------------------------------------


def _init_layer(rng, n_in, n_out, dtype, activation, resnet, resnet_dt, init) -> Layer:
    """One freshly initialized layer.

    ``init="deepmd"``: W ~ N(0, 1/(n_in+n_out)), b ~ N(0, 1), idt ~ N(0.1, 0.001^2)
    (deepmd-kit's choice); ``init="torch"``: W, b ~ U(-k, k), k = 1/sqrt(n_in)
    (PyTorch's nn.Linear default, used by the tutorial).
    """
    if init == "deepmd":
        W = rng.normal(0.0, 1.0 / np.sqrt(n_in + n_out), size=(n_in, n_out))
        b = rng.normal(0.0, 1.0, size=n_out)
    elif init == "torch":
        k = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-k, k, size=(n_in, n_out))
        b = rng.uniform(-k, k, size=n_out)
    else:
        raise ValueError(f"init must be 'deepmd' or 'torch', got {init!r}")
    idt = rng.normal(0.1, 0.001, size=n_out).astype(dtype) if resnet_dt else None
    return Layer(W.astype(dtype), b.astype(dtype), idt, activation, resnet)


def _check_sizes(name: str, sizes) -> list[int]:
    # a bare int or a string would otherwise fail in list() or be split into characters
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"{name} must be a list of positive integers, got {sizes!r}")
    sizes = list(sizes)
    if not sizes or not all(is_positive_int(n) for n in sizes):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {sizes!r}")
    return [int(n) for n in sizes]


def embedding_net(
    neuron, n_in: int = 1, activation: str = "tanh", resnet_dt: bool = False,
    dtype=np.float64, seed: int | None = None,
) -> Net:
    """deepmd-kit's embedding net: every layer activated, resnet where widths allow.

    Widths n_in -> neuron[0] -> ... -> neuron[-1]; layer k adds its input when
    neuron[k] == neuron[k-1] and [x, x] when neuron[k] == 2 neuron[k-1]. With
    ``resnet_dt`` only those residual layers get a timestep ``idt``: that is
    what deepmd-kit's TensorFlow backend builds, and a model with an ``idt``
    elsewhere would change when converted to it.
    """
    neuron = _check_sizes("neuron", neuron)
    n_in = positive_int("n_in", n_in)
    get_activation(activation)
    rng = np.random.default_rng(seed)
    widths = [n_in] + neuron
    return Net([
        _init_layer(rng, widths[k], widths[k + 1], dtype, activation, True,
                    resnet_dt and residual_kind(widths[k], widths[k + 1], True) != "none", "deepmd")
        for k in range(len(neuron))
    ])


def fitting_net(
    n_in: int, neuron, n_out: int = 1, activation: str = "tanh", resnet_dt: bool = True,
    dtype=np.float64, seed: int | None = None,
) -> Net:
    """deepmd-kit's fitting net: an embedding net of ``neuron`` then a linear layer to n_out."""
    n_out = positive_int("n_out", n_out)
    hidden = embedding_net(neuron, n_in, activation, resnet_dt, dtype, seed)
    rng = np.random.default_rng(None if seed is None else seed + 1)
    out = _init_layer(rng, hidden.n_out, n_out, dtype, "linear", False, False, "deepmd")
    return Net(hidden.layers + [out])


def mlp(
    width: int, depth: int, activation: str = "relu", n_in: int = 1, n_out: int = 1,
    dtype=np.float64, seed: int | None = None,
) -> Net:
    """The tutorial's ``FittingNet(width, depth, activation)``: a plain MLP.

    ``depth`` hidden layers of ``width`` units (no residual connections), then a
    linear output layer; PyTorch's default initialization.
    """
    width, depth = positive_int("width", width), positive_int("depth", depth)
    n_in, n_out = positive_int("n_in", n_in), positive_int("n_out", n_out)
    get_activation(activation)
    rng = np.random.default_rng(seed)
    widths = [n_in] + [width] * depth
    layers = [
        _init_layer(rng, widths[k], widths[k + 1], dtype, activation, False, False, "torch")
        for k in range(depth)
    ]
    layers.append(_init_layer(rng, width, n_out, dtype, "linear", False, False, "torch"))
    return Net(layers)


def add_grads(grads: list[list[dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """The sum of several gradients of one net (each a list of per-layer dicts, same layout), added into
    the first one's arrays, which it returns (the callers own fresh gradients: no copy of ~1 M numbers)."""
    total = grads[0]
    for g in grads[1:]:
        for t_layer, g_layer in zip(total, g):
            for k, v in g_layer.items():
                t_layer[k] += v
    return total


def zeros_like_params(params: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Zeros in the layout of params (per-layer dicts): a zero gradient, an optimizer's fresh buffers."""
    return [{k: np.zeros_like(v) for k, v in p.items()} for p in params]
