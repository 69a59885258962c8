r"""Gradient descent and its relatives, and learning-rate schedules.

Optimizers update parameters in place from their gradients (the
``Net.params()`` layout of :mod:`minidp.nn`: a list of dicts of arrays).
Their update rules are PyTorch's, to the operation, so that minidp and
torch trained from the same start agree to round-off:

- SGD with momentum :math:`\mu`, dampening 0, weight decay :math:`\lambda`:

  .. math::

      g \leftarrow g + \lambda p, \quad b \leftarrow \mu b + g \;(b_1 = g), \quad
      p \leftarrow p - \eta\,(g + \mu b \text{ if Nesterov else } b)

- Adam with :math:`\beta_1, \beta_2, \epsilon` and bias corrections:

  .. math::

      m \leftarrow m + (1-\beta_1)(g - m), \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
      p \leftarrow p - \frac{\eta}{1-\beta_1^t} \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

Learning-rate schedules are pure functions of the step number: no state,
so any step's rate can be computed (and plotted, and tested) on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Params = list  # list[dict[str, np.ndarray]], as Net.params() returns


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value) and ok):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SGDConfig:
    """Stochastic gradient descent, PyTorch's torch.optim.SGD (dampening 0)."""

    momentum: float = 0.0  # mu: weight of the previous update direction
    nesterov: bool = False  # look ahead: step along g + mu b instead of b
    weight_decay: float = 0.0  # lambda: L2 penalty added to the gradient

    def __post_init__(self):
        _check_positive("momentum", self.momentum, allow_zero=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs a momentum > 0")


@dataclass(frozen=True)
class AdamConfig:
    """Adam, PyTorch's torch.optim.Adam (weight decay as an L2 term in the gradient)."""

    beta1: float = 0.9  # decay of the running mean of gradients
    beta2: float = 0.999  # decay of the running mean of squared gradients
    eps: float = 1e-8  # keeps the step finite where v is ~0
    weight_decay: float = 0.0  # lambda: L2 penalty added to the gradient

    def __post_init__(self):
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {v!r}")
        _check_positive("eps", self.eps)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)


def _zeros_like(params: Params) -> Params:
    return [{k: np.zeros_like(v) for k, v in p.items()} for p in params]


class SGD:
    """SGD over a list of parameter dicts; keeps its momentum buffers."""

    def __init__(self, params: Params, config: SGDConfig = SGDConfig()):
        self.params, self.config = params, config
        self.buffers: Params | None = None  # momentum buffers, made at the first step

    def step(self, grads: Params, lr: float) -> None:
        """One update with learning rate lr (math in the module docstring)."""
        _check_positive("lr", lr, allow_zero=True)
        mu, wd = self.config.momentum, self.config.weight_decay
        first = self.buffers is None
        if mu and first:
            self.buffers = _zeros_like(self.params)
        for k, (p, g) in enumerate(zip(self.params, grads)):
            for name, value in p.items():
                d = g[name] + wd * value if wd else g[name]
                if mu:
                    buf = self.buffers[k][name]
                    if first:
                        buf[...] = d
                    else:
                        buf *= mu
                        buf += d
                    d = d + mu * buf if self.config.nesterov else buf
                value -= lr * d


class Adam:
    """Adam over a list of parameter dicts; keeps its moment estimates and step count."""

    def __init__(self, params: Params, config: AdamConfig = AdamConfig()):
        self.params, self.config = params, config
        self.m, self.v = _zeros_like(params), _zeros_like(params)
        self.t = 0  # steps taken, for the bias corrections

    def step(self, grads: Params, lr: float) -> None:
        """One update with learning rate lr (math in the module docstring)."""
        _check_positive("lr", lr, allow_zero=True)
        c = self.config
        self.t += 1
        bias1, bias2 = 1.0 - c.beta1**self.t, 1.0 - c.beta2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            for name, value in p.items():
                d = g[name] + c.weight_decay * value if c.weight_decay else g[name]
                m[name] += (1.0 - c.beta1) * (d - m[name])
                v[name] *= c.beta2
                v[name] += (1.0 - c.beta2) * d * d
                denom = np.sqrt(v[name]) / math.sqrt(bias2) + c.eps
                value -= (lr / bias1) * (m[name] / denom)


# ---------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the step
# ---------------------------------------------------------------------------


def step_decay(step: int, lr0: float, step_size: int, gamma: float) -> float:
    """lr = lr0 * gamma^floor(step / step_size)   (PyTorch's StepLR, stepped once per epoch)."""
    _check_positive("step_size", step_size)
    return lr0 * gamma ** (step // step_size)


def exp_decay(step: int, start_lr: float, stop_lr: float, decay_steps: int, numb_steps: int,
              staircase: bool = True) -> float:
    r"""deepmd-kit's ``exp`` schedule.

    .. math::

        r = (\mathrm{stop\_lr} / \mathrm{start\_lr})^{s / T}, \qquad
        lr(t) = \max(\mathrm{start\_lr} \cdot r^{\lfloor t / s \rfloor}, \mathrm{stop\_lr})

    with s = decay_steps and T = numb_steps (t / s without the floor when not
    staircase). As in deepmd-kit, a decay_steps not below numb_steps is
    replaced by a sensible one (100, or numb_steps // 100 + 1 for short runs).
    """
    _check_positive("start_lr", start_lr)
    _check_positive("stop_lr", stop_lr)
    _check_positive("decay_steps", decay_steps)
    _check_positive("numb_steps", numb_steps)
    if decay_steps >= numb_steps:
        decay_steps = 100 if numb_steps // 10 > 100 else numb_steps // 100 + 1
    rate = math.exp(math.log(max(stop_lr, 1e-10) / start_lr) / (numb_steps / decay_steps))
    exponent = step // decay_steps if staircase else step / decay_steps
    return max(start_lr * rate**exponent, stop_lr)


def warmup(step: int, warmup_steps: int, schedule: Callable[[int], float], start_factor: float = 0.0) -> float:
    """Linear warm-up to schedule(0) over warmup_steps, then schedule(step - warmup_steps).

    lr = schedule(0) * (f + (1 - f) step / warmup_steps) while step < warmup_steps, f = start_factor.
    """
    _check_positive("warmup_steps", warmup_steps, allow_zero=True)
    if step < warmup_steps:
        return schedule(0) * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    return schedule(step - warmup_steps)


def cosine_annealing(step: int, lr0: float, t_max: int, eta_min: float = 0.0) -> float:
    """lr = eta_min + (lr0 - eta_min) (1 + cos(pi step / t_max)) / 2   (PyTorch's CosineAnnealingLR)."""
    _check_positive("t_max", t_max)
    return eta_min + (lr0 - eta_min) * (1.0 + math.cos(math.pi * step / t_max)) / 2.0


def cosine_warm_restarts(step: int, lr0: float, t_0: int, t_mult: int = 1, eta_min: float = 0.0) -> float:
    """SGDR: cosine annealing restarted after t_0, t_0 t_mult, t_0 t_mult^2, ... steps.

    lr = eta_min + (lr0 - eta_min) (1 + cos(pi t_cur / t_i)) / 2, with t_cur the
    steps since the last restart and t_i the current period
    (PyTorch's CosineAnnealingWarmRestarts).
    """
    _check_positive("t_0", t_0)
    if not isinstance(t_mult, (int, np.integer)) or t_mult < 1:
        raise ValueError(f"t_mult must be an integer >= 1, got {t_mult!r}")
    if t_mult == 1:
        t_cur, t_i = step % t_0, t_0
    else:
        n = int(math.log(step / t_0 * (t_mult - 1) + 1, t_mult))
        t_cur = step - t_0 * (t_mult**n - 1) / (t_mult - 1)
        t_i = t_0 * t_mult**n
    return eta_min + (lr0 - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0


# ---------------------------------------------------------------------------
# The tutorial's one-dimensional gradient descent
# ---------------------------------------------------------------------------


def gradient_descent_1d(grad: Callable, x0, lr: float, threshold: float = 1e-2,
                        max_iter: int = 1000) -> np.ndarray:
    r"""x_{n+1} = x_n - lr f'(x_n), from x0, until |x_{n+1} - x_n| < threshold or max_iter steps.

    The tutorial's loop on one number; x0 may also be an array (the positions
    of a molecule, say), and then |.| is the largest component.
    Returns the path (x_0, x_1, ..., x_N), the stopping point included.
    """
    _check_positive("lr", lr)
    _check_positive("threshold", threshold)
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    path = [np.asarray(x0, dtype=np.float64)]
    for _ in range(max_iter):
        path.append(path[-1] - lr * grad(path[-1]))
        if np.max(np.abs(path[-1] - path[-2])) < threshold:
            break
    return np.array(path)
