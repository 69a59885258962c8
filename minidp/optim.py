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

  and its weight decay :math:`\lambda` in one of two meanings: Adam's, an
  L2 term in the gradient (:math:`g \leftarrow g + \lambda p` before the
  moments, torch.optim.Adam), or AdamW's, decoupled from the moments
  (:math:`p \leftarrow (1 - \eta\lambda) p` before the step above,
  torch.optim.AdamW, which is torch's Adam with decoupled_weight_decay).
  deepmd-kit's PyTorch backend takes these two torch optimizers for its
  ``optimizer`` types Adam and AdamW (:func:`adam_config` reads that section).

Learning-rate schedules are pure functions of the step number: no state,
so any step's rate can be computed (and plotted, and tested) on its own.
A schedule with its settings bound (``functools.partial``) is a function of
the step alone, which is what :func:`warmup` composes with. deepmd-kit's
schedules (exp, cosine, wsd, each with a warm-up) hold their settings in
frozen dataclasses (:class:`ExpLR`, :class:`CosineLR`, :class:`WsdLR`, read
from a ``learning_rate`` section by :func:`lr_schedule`) whose ``lr(step)``
calls those functions.

Shape symbols: the parameters and gradients keep the shapes of
:mod:`minidp.nn` (``(n_in, n_out)`` weights, ``(n_out,)`` biases and
timesteps); nothing here makes an array of a new shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.checks import integer, number
from minidp.nn import zeros_like_params

Params = list  # list[dict[str, np.ndarray]], as Net.params() returns

_REAL = (int, float, np.integer, np.floating)


def _check_unit(name: str, value) -> None:
    """A number in [0, 1)."""
    number(name, value, lo=0.0)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


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
        number("momentum", self.momentum, lo=0.0)
        number("weight_decay", self.weight_decay, lo=0.0)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs a momentum > 0, got momentum=0")


@dataclass(frozen=True)
class AdamConfig:
    """Adam (torch.optim.Adam), or AdamW (torch.optim.AdamW) with decoupled_weight_decay.

    The two differ in weight decay only (math in the module docstring): an L2
    term added to the gradient, which the moments then rescale, or a shrink of
    the weights by lr * weight_decay outside the moments.
    """

    beta1: float = 0.9  # decay of the running mean of gradients
    beta2: float = 0.999  # decay of the running mean of squared gradients
    eps: float = 1e-8  # keeps the step finite where v is ~0
    weight_decay: float = 0.0  # lambda
    decoupled_weight_decay: bool = False  # AdamW: p <- (1 - lr lambda) p; Adam: g <- g + lambda p

    def __post_init__(self):
        _check_unit("beta1", self.beta1)
        _check_unit("beta2", self.beta2)
        number("eps", self.eps, positive=True)
        number("weight_decay", self.weight_decay, lo=0.0)
        if not isinstance(self.decoupled_weight_decay, (bool, np.bool_)):
            raise TypeError(f"decoupled_weight_decay must be true or false, got "
                            f"{type(self.decoupled_weight_decay).__name__} {self.decoupled_weight_decay!r}")


# deepmd-kit's optimizer.type -> whether its weight decay is decoupled
ADAM_TYPES = {"Adam": False, "AdamW": True}


def adam_config(section: Mapping) -> AdamConfig:
    """The AdamConfig of a deepmd-kit ``optimizer`` section: type Adam (default) or AdamW.

    Keys adam_beta1, adam_beta2, weight_decay; their defaults 0.9, 0.999 and
    0.0 for both types (deepmd-kit's input conversion fills those in before
    its schema could give AdamW 0.001). eps is torch's 1e-8: deepmd-kit has
    no key for it. Other optimizer types are refused by name.
    """
    if not isinstance(section, Mapping):
        raise TypeError(f"optimizer must be a mapping of keys, got {type(section).__name__}")
    keys = dict(section)
    kind = keys.pop("type", "Adam")
    if kind not in ADAM_TYPES:
        raise ValueError(f"optimizer.type {kind!r} is not supported; minidp trains with {' or '.join(ADAM_TYPES)}")
    # deepmd-kit's key -> AdamConfig's field, and the check that names the key as the user wrote it
    fields_of = {"adam_beta1": "beta1", "adam_beta2": "beta2", "weight_decay": "weight_decay"}
    for key, value in keys.items():
        if key not in fields_of:
            raise ValueError(f"optimizer.{key}: not a key of the {kind} optimizer; expected {sorted(fields_of)}")
        if key == "weight_decay":
            number(f"optimizer.{key}", value, lo=0.0)
        else:
            _check_unit(f"optimizer.{key}", value)
    return AdamConfig(**{fields_of[k]: v for k, v in keys.items()}, decoupled_weight_decay=ADAM_TYPES[kind])


def _layout(arrays: Params) -> list[dict[str, tuple]]:
    """The shape of every array, by layer and name: what grads must match."""
    return [{k: np.shape(v) for k, v in d.items()} for d in arrays]


def _check_grads(layout: list[dict[str, tuple]], grads: Params) -> None:
    """grads must mirror the parameters: same layers, same names, same shapes.

    NumPy would broadcast a (1,) gradient onto a (n_out,) bias without a word,
    so the layout is compared at every step (one comprehension: cheap).
    """
    if len(grads) == len(layout) and _layout(grads) == layout:
        return
    if len(grads) != len(layout):
        raise ValueError(f"grads has {len(grads)} layers, expected {len(layout)} (one dict per layer of params)")
    for k, (want, got) in enumerate(zip(layout, _layout(grads))):
        if got != want:
            raise ValueError(f"grads[{k}] has arrays of shapes {got}, expected {want}")


class SGD:
    """SGD over a list of parameter dicts; keeps its momentum buffers."""

    def __init__(self, params: Params, config: SGDConfig = SGDConfig()):
        self.params, self.config = params, config
        self.layout = _layout(params)  # the parameters are updated in place: shapes never change
        self.buffers: Params | None = None  # momentum buffers b, made at the first step

    def step(self, grads: Params, lr: float) -> None:
        r"""One update with learning rate lr = :math:`\eta` (math in the module docstring)."""
        number("lr", lr, lo=0.0)
        _check_grads(self.layout, grads)
        mu, wd = self.config.momentum, self.config.weight_decay
        first = self.buffers is None
        if mu and first:
            self.buffers = zeros_like_params(self.params)
        for k, (p, g) in enumerate(zip(self.params, grads)):
            for name, value in p.items():
                d = g[name] + wd * value if wd else g[name]
                if mu:
                    buf = self.buffers[k][name]
                    # torch starts the buffer at g itself, not at mu * 0 + g: the same
                    # number, but dampening != 0 would tell them apart
                    if first:
                        buf[...] = d
                    else:
                        buf *= mu
                        buf += d
                    d = d + mu * buf if self.config.nesterov else buf
                value -= lr * d


class Adam:
    """Adam, or AdamW, over a list of parameter dicts (as its config says); keeps its moment estimates
    and step count."""

    def __init__(self, params: Params, config: AdamConfig = AdamConfig()):
        self.params, self.config = params, config
        self.layout = _layout(params)  # the parameters are updated in place: shapes never change
        self.m, self.v = zeros_like_params(params), zeros_like_params(params)
        self.t = 0  # steps taken, for the bias corrections

    def step(self, grads: Params, lr: float) -> None:
        r"""One update with learning rate lr = :math:`\eta` (math in the module docstring): :func:`adam_plain`
        on every array, or its fused kernel (kernels.adam_update, the same numbers to the bit) where the
        four arrays are contiguous: one pass over memory instead of about ten NumPy passes and their
        temporaries (1.5 M parameters, one core: 4x less time in float64, 5x in float32)."""
        number("lr", lr, lo=0.0)
        _check_grads(self.layout, grads)
        self.t += 1
        scalars = adam_scalars(self.config, lr, self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            for name, value in p.items():
                arrays = (value, g[name], m[name], v[name])
                if all(a.flags.c_contiguous and a.dtype == value.dtype for a in arrays):
                    kernels.adam_update(*(a.reshape(-1) for a in arrays), *scalars)
                else:
                    adam_plain(*arrays, self.config, lr, self.t)


class AdamScalars(NamedTuple):
    """The numbers of one Adam step that are the same for every array, in kernels.adam_update's order."""

    one_m_beta1: float  # 1 - beta1
    beta2: float
    one_m_beta2: float  # 1 - beta2
    sqrt_bias2: float  # sqrt(1 - beta2^t)
    eps: float
    step: float  # lr / (1 - beta1^t)
    l2: float  # Adam's weight decay (added to the gradient), else 0
    shrink: float  # AdamW's 1 - lr weight_decay, else 1


def adam_scalars(c: AdamConfig, lr: float, t: int) -> AdamScalars:
    """kernels.adam_update's scalars for step t (1-based) at rate lr (math in the module docstring)."""
    coupled = c.weight_decay if c.weight_decay and not c.decoupled_weight_decay else 0.0
    shrink = 1.0 - lr * c.weight_decay if c.weight_decay and c.decoupled_weight_decay else 1.0
    return AdamScalars(1.0 - c.beta1, c.beta2, 1.0 - c.beta2, math.sqrt(1.0 - c.beta2**t), c.eps,
                       lr / (1.0 - c.beta1**t), coupled, shrink)


def adam_plain(value: np.ndarray, d: np.ndarray, m: np.ndarray, v: np.ndarray, c: AdamConfig, lr: float,
               t: int) -> None:
    """Adam's update of one array (math in the module docstring) at step t (1-based), in place on value,
    m and v, from the gradient d: the plain NumPy lines."""
    bias1, bias2 = 1.0 - c.beta1**t, 1.0 - c.beta2**t
    if c.weight_decay and c.decoupled_weight_decay:
        # AdamW: the weights shrink on their own, before the step and outside m and v
        value *= 1.0 - lr * c.weight_decay
    elif c.weight_decay:
        d = d + c.weight_decay * value
    # m + w (d - m) is torch's lerp for w < 1/2, rounding included
    m += (1.0 - c.beta1) * (d - m)
    v *= c.beta2
    v += (1.0 - c.beta2) * d * d
    # eps is added after the bias correction of sqrt(v), as torch does:
    # early on sqrt(v) is ~|g| sqrt(1 - beta2), far below eps' scale
    denom = np.sqrt(v) / math.sqrt(bias2) + c.eps
    value -= (lr / bias1) * (m / denom)


# ---------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the step
# ---------------------------------------------------------------------------


def step_decay(step: int, lr0: float, step_size: int, gamma: float) -> float:
    r"""PyTorch's StepLR (stepped once per epoch in the tutorial).

    .. math:: \eta(t) = \eta_0 \, \gamma^{\lfloor t / s \rfloor}, \qquad s = \mathrm{step\_size}
    """
    integer("step", step, lo=0)
    number("lr0", lr0, positive=True)
    integer("step_size", step_size, lo=1)
    number("gamma", gamma, positive=True)
    return lr0 * gamma ** (step // step_size)


def exp_decay(step: int, start_lr: float, stop_lr: float, decay_steps: int, numb_steps: int,
              staircase: bool = True, decay_rate: float | None = None) -> float:
    r"""deepmd-kit's ``exp`` schedule (its decay phase: deepmd-kit's warm-up precedes it).

    .. math::

        r = \exp\!\Big(\frac{\ln(\max(\mathrm{stop\_lr}, 10^{-10}) / \mathrm{start\_lr})}{T / s}\Big), \qquad
        \eta(t) = \max(\mathrm{start\_lr} \cdot r^{\lfloor t / s \rfloor}, \mathrm{stop\_lr})

    with s = decay_steps and T = numb_steps, the steps of the decay phase (in
    deepmd-kit, the training steps minus the warm-up ones); t / s without the
    floor when not staircase (deepmd-kit's ``smooth``). As in deepmd-kit: a
    given decay_rate is r itself (and s is kept as given); without one, a
    decay_steps not below numb_steps is replaced by 100 (or numb_steps // 100
    + 1 for runs of at most 1000 steps), and r = 1 when T = 0; the rate never
    drops below stop_lr, whatever the step and whichever r.
    """
    integer("step", step, lo=0)
    number("start_lr", start_lr, positive=True)
    number("stop_lr", stop_lr, lo=0.0)
    integer("decay_steps", decay_steps, lo=1)
    integer("numb_steps", numb_steps, lo=0)
    if decay_rate is not None:
        number("decay_rate", decay_rate, positive=True)
        rate = decay_rate
    else:
        if decay_steps >= numb_steps:
            decay_steps = 100 if numb_steps // 10 > 100 else numb_steps // 100 + 1
        # deepmd-kit floors stop_lr at 1e-10 inside the log only: stop_lr = 0 decays to 1e-10, then holds at 0
        rate = math.exp(math.log(max(stop_lr, 1e-10) / start_lr) / (numb_steps / decay_steps)) if numb_steps else 1.0
    exponent = step // decay_steps if staircase else step / decay_steps
    try:
        value = start_lr * rate**exponent
    except OverflowError:  # a growing schedule (stop_lr > start_lr) past its run: inf, as deepmd-kit's power gives
        value = math.inf
    return max(value, stop_lr)


def _ramp(step: int, warmup_steps: int, peak: float, start_factor: float) -> float:
    """f peak + (peak - f peak) t / W: the warm-up's line (deepmd-kit's order of operations)."""
    lr_start = start_factor * peak
    return lr_start + (peak - lr_start) * (step / warmup_steps)


def warmup(step: int, warmup_steps: int, schedule: Callable[[int], float], start_factor: float = 0.0) -> float:
    r"""Linear warm-up to schedule(0) over warmup_steps W, then the schedule, shifted by W.

    .. math::

        \eta(t) = \begin{cases}
            \eta_s(0) \, (f + (1 - f)\, t / W) & t < W \\
            \eta_s(t - W) & t \ge W
        \end{cases}

    with f = start_factor and :math:`\eta_s` = schedule (deepmd-kit's warm-up,
    composable with any schedule of this module bound with functools.partial).
    """
    integer("step", step, lo=0)
    integer("warmup_steps", warmup_steps, lo=0)
    if not callable(schedule):
        raise TypeError(f"schedule must be a function of the step, got {type(schedule).__name__}")
    number("start_factor", start_factor, lo=0.0)
    if start_factor > 1:
        raise ValueError(f"start_factor must lie in [0, 1], got {start_factor!r}")
    if step < warmup_steps:
        return _ramp(step, warmup_steps, schedule(0), start_factor)
    return schedule(step - warmup_steps)


def cosine_annealing(step: int, lr0: float, t_max: int, eta_min: float = 0.0) -> float:
    r"""PyTorch's CosineAnnealingLR, in closed form.

    .. math:: \eta(t) = \eta_{min} + (\eta_0 - \eta_{min}) \frac{1 + \cos(\pi t / T_{max})}{2}

    Beyond T_max the cosine comes back up, as torch's does (it is periodic in 2 T_max).
    """
    integer("step", step, lo=0)
    number("lr0", lr0, positive=True)
    integer("t_max", t_max, lo=1)
    number("eta_min", eta_min, lo=0.0)
    # pi (t / T), deepmd-kit's order: near t = T_max, 1 + cos is ~(pi (T - t) / T)^2 / 2 and an ulp
    # more or less in the angle can move it by 1e-10 of itself, and the rate with it when eta_min = 0
    return eta_min + (lr0 - eta_min) * (1.0 + math.cos(math.pi * (step / t_max))) / 2.0


WSD_DECAY_TYPES = ("inverse_linear", "cosine", "linear")


def wsd_decay(step: int, start_lr: float, stop_lr: float, stable_steps: int, decay_steps: int,
              decay_type: str = "inverse_linear") -> float:
    r"""deepmd-kit's ``wsd`` (warm-up, stable, decay) after its warm-up: stable, then one decay to stop_lr.

    With S = stable_steps, D = decay_steps, u = (t - S) / D:

    .. math::

        \eta(t) = \begin{cases}
            \eta_0 & t < S \\
            1 / (u / \eta_1 + (1 - u) / \eta_0) & S \le t < S + D, \text{ inverse\_linear} \\
            \eta_1 + (\eta_0 - \eta_1) (1 + \cos \pi u) / 2 & S \le t < S + D, \text{ cosine} \\
            \eta_0 + (\eta_1 - \eta_0) u & S \le t < S + D, \text{ linear} \\
            \eta_1 & t \ge S + D
        \end{cases}

    with :math:`\eta_0` = start_lr, :math:`\eta_1` = stop_lr (> 0: inverse_linear divides by it).
    """
    integer("step", step, lo=0)
    number("start_lr", start_lr, positive=True)
    number("stop_lr", stop_lr, positive=True)
    integer("stable_steps", stable_steps, lo=0)
    integer("decay_steps", decay_steps, lo=1)
    if decay_type not in WSD_DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {WSD_DECAY_TYPES}, got {decay_type!r}")
    if step < stable_steps:
        return start_lr
    if step >= stable_steps + decay_steps:
        return stop_lr
    if decay_type == "cosine":
        return cosine_annealing(step - stable_steps, start_lr, decay_steps, stop_lr)
    u = (step - stable_steps) / decay_steps
    if decay_type == "linear":
        return start_lr + (stop_lr - start_lr) * u
    return 1.0 / (u / stop_lr + (1.0 - u) / start_lr)


def cosine_warm_restarts(step: int, lr0: float, t_0: int, t_mult: int = 1, eta_min: float = 0.0) -> float:
    r"""SGDR: cosine annealing restarted after T_0, T_0 T_mult, T_0 T_mult^2, ... steps.

    .. math::

        \eta(t) = \eta_{min} + (\eta_0 - \eta_{min}) \frac{1 + \cos(\pi T_{cur} / T_i)}{2}

    with T_i the current period and T_cur the steps since the last restart
    (PyTorch's CosineAnnealingWarmRestarts stepped once per step).
    """
    integer("step", step, lo=0)
    number("lr0", lr0, positive=True)
    integer("t_0", t_0, lo=1)
    integer("t_mult", t_mult, lo=1)
    number("eta_min", eta_min, lo=0.0)
    if t_mult == 1:
        t_cur, t_i = step % t_0, t_0
    else:
        # Whole periods are peeled off in integers. The textbook closed form,
        # n = floor(log_{T_mult}(t (T_mult - 1) / T_0 + 1)), rounds the log
        # down at restarts (log_10(1000) = 2.9999999999999996) and would put
        # step 111 of (T_0 = 1, T_mult = 10) at the bottom of a cosine
        # instead of at the top. The loop runs log_{T_mult}(t) times.
        t_cur, t_i = step, t_0
        while t_cur >= t_i:
            t_cur, t_i = t_cur - t_i, t_i * t_mult
    return eta_min + (lr0 - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0


# ---------------------------------------------------------------------------
# deepmd-kit's learning_rate section: its settings, validated once, in frozen
# dataclasses; the rates come from the pure functions above
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LRSchedule:
    r"""What every deepmd-kit schedule shares: the rates, the run length, the warm-up.

    Over the first W warm-up steps the rate climbs linearly from
    f start_lr to start_lr; the schedule's own decay then runs over the
    remaining T = num_steps - W steps (step t - W of it at step t):

    .. math::

        \eta(t) = f \eta_0 + (\eta_0 - f \eta_0)\, t / W \quad (t < W), \qquad
        \eta(t) = \eta_{decay}(t - W) \quad (t \ge W).

    Field names are deepmd-kit's keys. Exactly one of stop_lr and
    stop_lr_ratio (stop_lr = start_lr * ratio); at most one of warmup_steps
    and warmup_ratio (W = int(ratio * num_steps)); W < num_steps unless both
    are 0 (a run of no steps). ``lr(step)`` is the rate of the 0-based step.
    """

    start_lr: float  # eta_0: the rate after the warm-up
    num_steps: int  # N: the training steps, warm-up included
    stop_lr: float | None = None  # eta_1: the rate the decay ends at (exp: also a floor)
    stop_lr_ratio: float | None = None  # eta_1 / eta_0, instead of stop_lr
    warmup_steps: int = 0  # W
    warmup_ratio: float | None = None  # W / N, instead of warmup_steps
    warmup_start_factor: float = 0.0  # f: the warm-up starts at f eta_0

    def __post_init__(self):
        number("start_lr", self.start_lr, positive=True)
        integer("num_steps", self.num_steps, lo=0)
        if (self.stop_lr is None) == (self.stop_lr_ratio is None):
            raise ValueError(f"exactly one of stop_lr and stop_lr_ratio is needed, got stop_lr={self.stop_lr!r} "
                             f"and stop_lr_ratio={self.stop_lr_ratio!r}")
        for name in ("stop_lr", "stop_lr_ratio"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), lo=0.0)
        integer("warmup_steps", self.warmup_steps, lo=0)
        if self.warmup_ratio is not None:
            _check_unit("warmup_ratio", self.warmup_ratio)
            if self.warmup_steps:
                raise ValueError(f"warmup_steps and warmup_ratio are exclusive, got warmup_steps={self.warmup_steps!r} "
                                 f"and warmup_ratio={self.warmup_ratio!r}")
        number("warmup_start_factor", self.warmup_start_factor, lo=0.0)
        if self.n_warmup and self.n_warmup >= self.num_steps:
            key = "warmup_steps" if self.warmup_ratio is None else "warmup_ratio"
            raise ValueError(f"{key} gives {self.n_warmup} warm-up steps, "
                             f"expected fewer than num_steps = {self.num_steps}")

    @property
    def end_lr(self) -> float:
        """eta_1: stop_lr, or start_lr * stop_lr_ratio."""
        return self.stop_lr if self.stop_lr is not None else self.start_lr * self.stop_lr_ratio

    @property
    def n_warmup(self) -> int:
        """W: warmup_steps, or int(warmup_ratio * num_steps)."""
        return self.warmup_steps if self.warmup_ratio is None else int(self.warmup_ratio * self.num_steps)

    @property
    def n_decay(self) -> int:
        """T = num_steps - W: the steps of the decay phase."""
        return self.num_steps - self.n_warmup

    def lr(self, step: int) -> float:
        """The learning rate of the 0-based training step (math in the class docstring)."""
        integer("step", step, lo=0)
        W = self.n_warmup
        if step < W:
            return _ramp(step, W, self.start_lr, self.warmup_start_factor)
        return self.decay(step - W)

    def decay(self, step: int) -> float:
        """The rate at step t of the decay phase (after the warm-up): each schedule's own."""
        raise NotImplementedError(f"{type(self).__name__} has no decay: use ExpLR, CosineLR or WsdLR")


@dataclass(frozen=True)
class ExpLR(LRSchedule):
    """deepmd-kit's ``exp`` schedule: :func:`exp_decay` over the decay phase."""

    decay_steps: int = 5000  # s: the rate drops once every s steps
    decay_rate: float | None = None  # r; by default the r that reaches stop_lr at the end of the run
    smooth: bool = False  # r^(t/s) at every step instead of r^floor(t/s)

    def __post_init__(self):
        super().__post_init__()
        integer("decay_steps", self.decay_steps, lo=1)
        if self.decay_rate is not None:
            # deepmd-kit's input check refuses a rate that would let the rate grow
            number("decay_rate", self.decay_rate, positive=True)
            if self.decay_rate > 1:
                raise ValueError(f"decay_rate must lie in (0, 1], got {self.decay_rate!r}")
        if not isinstance(self.smooth, (bool, np.bool_)):
            raise TypeError(f"smooth must be true or false, got {type(self.smooth).__name__} {self.smooth!r}")

    def decay(self, step: int) -> float:
        return exp_decay(step, self.start_lr, self.end_lr, self.decay_steps, self.n_decay, not self.smooth,
                         self.decay_rate)


@dataclass(frozen=True)
class CosineLR(LRSchedule):
    r"""deepmd-kit's ``cosine`` schedule: from start_lr down half a cosine to stop_lr over the decay phase.

    .. math:: \eta(t) = \eta_1 + (\eta_0 - \eta_1) (1 + \cos(\pi t / T)) / 2 \;(t < T), \qquad \eta_1 \;(t \ge T)

    (:func:`cosine_annealing` held at its bottom); start_lr throughout when T = 0.
    """

    def decay(self, step: int) -> float:
        T = self.n_decay
        if T == 0:
            return self.start_lr
        return cosine_annealing(step, self.start_lr, T, self.end_lr) if step < T else self.end_lr


@dataclass(frozen=True)
class WsdLR(LRSchedule):
    """deepmd-kit's ``wsd`` schedule: :func:`wsd_decay` over the decay phase, its last
    D = max(1, min(int(decay_phase_ratio num_steps), T)) steps decaying; stop_lr throughout when T = 0."""

    decay_phase_ratio: float = 0.1  # D / num_steps
    decay_type: str = "inverse_linear"  # the shape of the decay: one of WSD_DECAY_TYPES

    def __post_init__(self):
        super().__post_init__()
        if self.end_lr <= 0:
            raise ValueError(f"the wsd schedule needs a stop_lr > 0, got {self.end_lr!r}")
        number("decay_phase_ratio", self.decay_phase_ratio, positive=True)
        if self.decay_phase_ratio > 1:
            raise ValueError(f"decay_phase_ratio must lie in (0, 1], got {self.decay_phase_ratio!r}")
        if self.decay_type not in WSD_DECAY_TYPES:
            raise ValueError(f"decay_type must be one of {WSD_DECAY_TYPES}, got {self.decay_type!r}")

    @property
    def n_decay_phase(self) -> int:
        """D: the steps of the final decay."""
        return max(1, min(int(self.decay_phase_ratio * self.num_steps), self.n_decay))

    def decay(self, step: int) -> float:
        T = self.n_decay
        if T == 0:
            return self.end_lr
        D = self.n_decay_phase
        return wsd_decay(step, self.start_lr, self.end_lr, T - D, D, self.decay_type)


# deepmd-kit's learning_rate.type -> its schedule
# the stop_lr of a learning_rate section that gives neither stop_lr nor stop_lr_ratio (deepmd-kit's old default)
DEFAULT_STOP_LR = 5e-8
LR_SCHEDULES: dict[str, type[LRSchedule]] = {"exp": ExpLR, "cosine": CosineLR, "wsd": WsdLR}


def lr_schedule(section: Mapping, num_steps: int) -> LRSchedule:
    """The schedule of a deepmd-kit ``learning_rate`` section for a run of num_steps steps.

    ``type`` picks it (``exp`` when absent); the other keys are its fields,
    and without stop_lr and stop_lr_ratio stop_lr is 5e-8 (deepmd-kit's
    input check fills that in). ``scale_by_worker`` (linear, sqrt or none)
    scales the rate by the number of parallel workers, one here: any of its
    values leaves the rate as is.
    """
    if not isinstance(section, Mapping):
        raise TypeError(f"learning_rate must be a mapping of keys, got {type(section).__name__}")
    keys = dict(section)
    kind = keys.pop("type", "exp")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"learning_rate.type {kind!r} is not supported; expected one of {sorted(LR_SCHEDULES)}")
    if keys.pop("scale_by_worker", "linear") not in ("linear", "sqrt", "none"):
        raise ValueError(f"learning_rate.scale_by_worker must be 'linear', 'sqrt' or 'none', "
                         f"got {section['scale_by_worker']!r}")
    if "start_lr" not in keys:
        raise ValueError("learning_rate.start_lr is missing (the rate after the warm-up)")
    if keys.get("stop_lr") is None and keys.get("stop_lr_ratio") is None:
        keys["stop_lr"] = DEFAULT_STOP_LR
    cls = LR_SCHEDULES[kind]
    allowed = {f.name for f in fields(cls)} - {"num_steps"}
    for key in keys:
        if key not in allowed:
            raise ValueError(f"learning_rate.{key}: not a key of the {kind} schedule; expected {sorted(allowed)}")
    try:
        return cls(num_steps=num_steps, **keys)
    except (TypeError, ValueError) as err:
        raise type(err)(f"learning_rate ({kind}): {err}") from None


# ---------------------------------------------------------------------------
# The tutorial's one-dimensional gradient descent
# ---------------------------------------------------------------------------


def gradient_descent_1d(grad: Callable, x0, lr: float, threshold: float = 1e-2,
                        max_iter: int = 1000) -> np.ndarray:
    r"""The tutorial's loop: :math:`x_{n+1} = x_n - \eta f'(x_n)` from x0.

    Stops after the first step with :math:`|x_{n+1} - x_n| < \mathrm{threshold}`
    (that step is kept), or after max_iter steps. On y = x^2 from 3 with
    lr 0.1 and threshold 0.01, :math:`x_n = 3 \cdot 0.8^n` and the step
    :math:`0.6 \cdot 0.8^{n-1}` first falls below 0.01 at n = 20: 21 points.

    x0 may also be an array (the positions of a molecule, say), and then |.|
    is the largest component. Returns the path (x_0, x_1, ..., x_N): shape
    (N + 1,) for a number, (N + 1, *x0.shape) for an array.
    """
    if not callable(grad):
        raise TypeError(f"grad must be a function of x, got {type(grad).__name__}")
    number("lr", lr, positive=True)
    number("threshold", threshold, positive=True)
    integer("max_iter", max_iter, lo=1)
    path = [np.asarray(x0, dtype=np.float64)]
    if not np.all(np.isfinite(path[0])):
        raise ValueError(f"x0 must be finite, got {x0!r}")
    for _ in range(max_iter):
        path.append(path[-1] - lr * grad(path[-1]))
        if np.max(np.abs(path[-1] - path[-2])) < threshold:
            break
    # (N + 1,) or (N + 1, *x0.shape)
    return np.array(path)
