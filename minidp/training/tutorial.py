"""The experiments of the tutorial minidp grew from, on the command line.

``minidp tutorial cos``: a small MLP (width 10, depth 3, relu) learns cos(x)
from 499 points on [0, 4] and [6, 8] with SGD (lr 0.01), a StepLR schedule
(x0.8 every 200 epochs), batches of 10 and 2000 epochs, printing the
running-mean loss every 200 epochs; then the same net on a piecewise function
seen on [0, 2.5] only. Both show that a net is an interpolator: where it saw
no data (the gap [4, 6], beyond 2.5) it has no reason to be right.

``minidp tutorial optimize``: gradient descent on one-dimensional functions
(a parabola; a quartic with a global and a local minimum; |x|, where a fixed
step oscillates forever; |0.01 x|, where it crawls) and the learning-rate
schedules deepmd-kit and others use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from minidp.checks import positive_int
from minidp.io.figures import save_figure
from minidp.nn import Net, get_activation, mlp, net_backward, net_forward
from minidp.optim import SGD, cosine_warm_restarts, exp_decay, gradient_descent_1d, step_decay, warmup

# ---------------------------------------------------------------------------
# Part 1: fitting cos(x)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """The tutorial's training setup."""

    width: int = 10  # units per hidden layer
    depth: int = 3  # hidden layers
    activation: str = "relu"  # hidden activation
    lr: float = 0.01  # SGD learning rate at epoch 0
    step_size: int = 200  # StepLR: epochs between decays
    gamma: float = 0.8  # StepLR: decay factor
    batch_size: int = 10  # samples per SGD step
    epochs: int = 2000  # passes over the data
    # initial weights and shuffling; seed 1 reaches a loss of 0.0002 by epoch 1800 (the tutorial: 0.0117),
    # while some seeds (5) start with every relu dead and stall at 0.54
    seed: int = 1
    report_every: int = 200  # epochs between printed losses

    def __post_init__(self):
        for name in ("width", "depth", "step_size", "batch_size", "epochs", "report_every"):
            positive_int(name, getattr(self, name))
        if not self.lr > 0 or not self.gamma > 0:
            raise ValueError(f"lr and gamma must be positive, got lr={self.lr!r}, gamma={self.gamma!r}")
        get_activation(self.activation)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")


def cos_data() -> tuple[np.ndarray, np.ndarray]:
    """499 points, nearly evenly spaced (~0.012): 333 on [0, 4] and 166 on [6, 8], and cos(x).

    Returns x (499, 1), y (499, 1).
    """
    # (499,)
    x = np.concatenate([np.linspace(0.0, 4.0, 333), np.linspace(6.0, 8.0, 166)])
    return x[:, None], np.cos(x)[:, None]


def piecewise(x: np.ndarray) -> np.ndarray:
    """A ramp, a plateau and a slope: x on [0, 1), 1 on [1, 2), 3 - x beyond."""
    return np.where(x < 1.0, x, np.where(x < 2.0, 1.0, 3.0 - x))


def mse_step(net: Net, x: np.ndarray, y: np.ndarray) -> tuple[float, list]:
    """L = mean((net(x) - y)^2) over all nb * n_out entries, and dL/dparams.

    dL/d net(x) = 2 (net(x) - y) / (nb n_out), then backpropagated through the net.
    """
    pred, caches = net_forward(net, x)
    # (nb, n_out)
    diff = pred - y
    _, grads = net_backward(net, caches, 2.0 * diff / diff.size)
    return float(np.mean(diff**2)), grads


def train(net: Net, x: np.ndarray, y: np.ndarray, cfg: FitConfig,
          log: Callable[[str], None] | None = None) -> list[float]:
    """Minibatch SGD with StepLR, stepped per epoch; returns the running-mean loss of every epoch.

    Every epoch visits the rows in a fresh random order, cfg.batch_size at a
    time (the last batch may be smaller); every cfg.report_every epochs a line
    goes to ``log`` (default: printed, beside the progress bar).
    """
    from tqdm.auto import tqdm

    if x.ndim != 2 or x.shape[1] != net.n_in or y.shape != (len(x), net.n_out):
        raise ValueError(f"x and y must have shapes (n, {net.n_in}) and (n, {net.n_out}), got {x.shape} and {y.shape}")
    rng = np.random.default_rng(cfg.seed)
    opt = SGD(net.params())
    history = []
    # disable=None: the bar shows only when stderr is a terminal
    with tqdm(range(cfg.epochs), desc="epochs", leave=False, disable=None) as bar:
        log = log or bar.write
        for epoch in bar:
            lr = step_decay(epoch, cfg.lr, cfg.step_size, cfg.gamma)
            # (n,)
            order = rng.permutation(len(x))
            losses = []
            for start in range(0, len(x), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                loss, grads = mse_step(net, x[batch], y[batch])
                opt.step(grads, lr)
                losses.append(loss)
            history.append(float(np.mean(losses)))
            if (epoch + 1) % cfg.report_every == 0:
                log(f"epoch {epoch + 1:5d}  lr {lr:.5f}  loss {history[-1]:.4f}")
    return history


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:

    print(f"wrote {save_figure(fig, path, dpi=110)}")
    return path


def _plot_fit(net: Net, truth: Callable, window: tuple[float, float], gaps, title: str, path: Path) -> Path:
    """The net against the truth on window, the stretches without training data shaded."""
    plt = _figure()
    # (401, 1)
    grid = np.linspace(*window, 401)[:, None]
    fig, ax = plt.subplots(figsize=(6, 3))
    for k, (lo, hi) in enumerate(gaps):
        ax.axvspan(lo, hi, color="0.9", label="no training data" if k == 0 else None)
    ax.plot(grid, truth(grid), "k-", lw=1, label="truth")
    ax.plot(grid, net_forward(net, grid)[0], "r-", label="MLP")
    ax.set(title=title, xlabel="x", ylabel="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def run_cos(out: Path, cfg: FitConfig = FitConfig()) -> dict:
    """The cos(x) experiment and its piecewise variant; returns the loss histories."""
    plt = _figure()
    x, y = cos_data()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(x, y, ".", ms=2)
    ax.set(title=f"training data: cos(x), {len(x)} points on [0, 4] and [6, 8]", xlabel="x", ylabel="y")
    _save(fig, out / "cos-data.png")

    print("fitting cos(x):")
    net = mlp(cfg.width, cfg.depth, cfg.activation, seed=cfg.seed)
    history = train(net, x, y, cfg)
    _plot_fit(net, np.cos, (0.0, 8.0), [(4.0, 6.0)], "the net interpolates, but cannot know the gap",
              out / "cos-fit.png")

    print("fitting a piecewise function seen on [0, 2.5]:")
    # (251, 1)
    xp = np.linspace(0.0, 2.5, 251)[:, None]
    net_p = mlp(cfg.width, cfg.depth, cfg.activation, seed=cfg.seed)
    history_p = train(net_p, xp, piecewise(xp), cfg, log=lambda s: None)
    print(f"epoch {cfg.epochs:5d}  loss {history_p[-1]:.4f}")
    _plot_fit(net_p, piecewise, (0.0, 4.0), [(2.5, 4.0)], "trained on [0, 2.5], shown on [0, 4]",
              out / "piecewise-fit.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy(np.arange(1, cfg.epochs + 1), history, label="cos(x)")
    ax.semilogy(np.arange(1, cfg.epochs + 1), history_p, label="piecewise")
    ax.set(xlabel="epoch", ylabel="running-mean loss")
    ax.legend()
    _save(fig, out / "cos-loss.png")
    return {"cos": history, "piecewise": history_p}


# ---------------------------------------------------------------------------
# Part 2: gradient descent in one dimension, and learning-rate schedules
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Descent:
    """One 1-D descent experiment."""

    name: str  # label and file name
    f: Callable[[np.ndarray], np.ndarray]  # the function
    grad: Callable[[float], float]  # its derivative
    x0: float  # start
    lr: float  # fixed learning rate
    threshold: float  # stop when |x_n - x_{n-1}| < threshold
    max_iter: int  # or after this many steps
    window: tuple[float, float]  # x range to plot


def _quartic(x):
    return x**4 + x**3 - 7 * x**2 - x + 6


def _quartic_grad(x):
    return 4 * x**3 + 3 * x**2 - 14 * x - 1


DESCENTS = (
    Descent("x2-from-3", lambda x: x**2, lambda x: 2 * x, 3.0, 0.1, 0.01, 1000, (-3.5, 3.5)),
    Descent("quartic-from-minus-3.5", _quartic, _quartic_grad, -3.5, 0.01, 1e-4, 1000, (-3.5, 3.0)),
    Descent("quartic-from-0.5", _quartic, _quartic_grad, 0.5, 0.01, 1e-4, 1000, (-3.5, 3.0)),
    # |x|: the gradient is +-1 whatever x, so a fixed step of 0.9 overshoots forever
    Descent("abs-lr-0.9", np.abs, np.sign, 2.0, 0.9, 1e-4, 30, (-2.5, 2.5)),
    # |0.01 x|: the gradient is tiny, so the same rule crawls
    Descent("abs-0.01x", lambda x: np.abs(0.01 * x), lambda x: 0.01 * np.sign(x), 2.0, 0.9, 1e-4, 300, (-2.5, 2.5)),
)


def run_optimize(out: Path) -> dict:
    """Each descent printed and plotted on its function; the schedules plotted."""
    plt = _figure()
    paths = {}
    for d in DESCENTS:
        path = gradient_descent_1d(d.grad, d.x0, d.lr, d.threshold, d.max_iter)
        paths[d.name] = path
        print(f"{d.name:<24} lr {d.lr:<5} {len(path):4d} points, x_end = {path[-1]: .5f}, f = {d.f(path[-1]): .5f}")
        grid = np.linspace(*d.window, 400)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(grid, d.f(grid), "k-", lw=1)
        ax.plot(path, d.f(path), "o-", ms=3, lw=0.8, color="tab:red")
        ax.set(title=f"{d.name}: {len(path)} points", xlabel="x", ylabel="f(x)")
        _save(fig, out / f"descent-{d.name}.png")

    # deepmd-kit's warm-up + exp over 20000 steps: the decay phase is the 19000 after the warm-up
    steps = range(20000)
    exp = partial(exp_decay, start_lr=1e-3, stop_lr=3.51e-8, decay_steps=1000, numb_steps=19000)
    schedules = {
        "warm-up 1000 + exp decay (deepmd-kit)": [warmup(s, 1000, exp) for s in steps],
        "cosine annealing, restarts (T0 2000, x2)": [cosine_warm_restarts(s, 1e-3, 2000, 2, 1e-6) for s in steps],
    }
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, lrs in schedules.items():
        ax.semilogy(steps, lrs, label=label)
    ax.set(xlabel="step", ylabel="learning rate")
    ax.legend(fontsize=8)
    _save(fig, out / "lr-schedules.png")
    return paths


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _cmd_cos(args) -> int:
    cfg = FitConfig(epochs=args.epochs, seed=args.seed)
    run_cos(Path(args.out), cfg)
    return 0


def _cmd_optimize(args) -> int:
    run_optimize(Path(args.out))
    return 0


def add_subcommands(tsub) -> None:
    """Register `cos` and `optimize` on the `minidp tutorial` sub-parsers."""
    p = tsub.add_parser("cos", help="fit cos(x) with a hand-written MLP, SGD and StepLR")
    p.add_argument("--out", default="out/tutorial-cos", help="folder for the PNG plots")
    p.add_argument("--epochs", type=int, default=FitConfig.epochs, help="training epochs")
    p.add_argument("--seed", type=int, default=FitConfig.seed, help="initial weights and shuffling")
    p.set_defaults(func=_cmd_cos)
    p = tsub.add_parser("optimize", help="1-D gradient descent and learning-rate schedules")
    p.add_argument("--out", default="out/tutorial-optimize", help="folder for the PNG plots")
    p.set_defaults(func=_cmd_optimize)
