"""minidp's hand-written backprop, optimizers and schedules against PyTorch, step for step in float64.

The same MLP (torch's nn.Linear layers hold minidp's weights, transposed) is
trained by both on the same batches for 2000 steps; the loss at every step and
the final weights agree to 1e-10 relative. Round-off differences (an FMA here,
a summation order there) do grow through training, but for these small nets and
steps they stay near 1e-13.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from minidp.nn import mlp, net_backward, net_forward
from minidp.optim import (SGD, Adam, AdamConfig, SGDConfig, cosine_annealing, cosine_warm_restarts,
                          step_decay)
from minidp.training.tutorial import mse_step

torch = pytest.importorskip("torch")

N_STEPS = 2000
ACTIVATIONS = ("tanh", "relu", "gelu", "softplus", "sigmoid", "relu6")


def _torch_activation(name: str):
    return {
        "tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(), "relu6": torch.nn.ReLU6(),
        # deepmd-kit's (and minidp's) gelu is the tanh approximation
        "gelu": torch.nn.GELU(approximate="tanh"),
        # torch's softplus turns linear above z = 20; the nets here stay far below
        "softplus": torch.nn.Softplus(), "sigmoid": torch.nn.Sigmoid(), "linear": torch.nn.Identity(),
    }[name]


def _torch_copy(net):
    """nn.Sequential(Linear, activation, ...) in float64 holding the net's weights (W^T: torch is out x in)."""
    modules = []
    for layer in net.layers:
        assert layer.idt is None and not layer.resnet, "the plain MLP only"
        linear = torch.nn.Linear(layer.n_in, layer.n_out, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer.W.T.copy()))
            linear.bias.copy_(torch.from_numpy(layer.b))
        modules += [linear, _torch_activation(layer.activation)]
    return torch.nn.Sequential(*modules)


def _torch_weights(tnet):
    """The torch net's parameters in minidp's layout: [{"W": (n_in, n_out), "b": (n_out,)}, ...]."""
    linears = [m for m in tnet if isinstance(m, torch.nn.Linear)]
    return [{"W": m.weight.detach().numpy().T, "b": m.bias.detach().numpy()} for m in linears]


def _batches(seed: int, n_rows: int = 200, nb: int = 10):
    """N_STEPS batches of nb rows of cos(x), x on [0, 8]: x (nb, 1), y (nb, 1) each."""
    rng = np.random.default_rng(seed)
    # (n_rows, 1)
    x = rng.uniform(0.0, 8.0, size=(n_rows, 1))
    y = np.cos(x)
    picks = [rng.choice(n_rows, nb, replace=False) for _ in range(N_STEPS)]
    return [(x[p], y[p]) for p in picks]


def _train_minidp(net, opt, schedule, batches):
    """One step per batch at lr = schedule(step); returns the loss before each step."""
    losses = []
    for step, (x, y) in enumerate(batches):
        loss, grads = mse_step(net, x, y)
        opt.step(grads, schedule(step))
        losses.append(loss)
    return np.array(losses)


def _train_torch(tnet, opt, scheduler, batches):
    """The same with torch's optimizer and (per-step) scheduler; also returns the lr of every step."""
    losses, lrs = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.mean((tnet(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    return np.array(losses), np.array(lrs)


def _max_rel(a, b) -> float:
    """max |a - b| / max |b|: a relative error that does not blow up on entries near zero."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Each case: activation, minidp optimizer, torch optimizer, minidp schedule, torch scheduler (all at lr0).
CASES = {
    "sgd-steplr": ("relu", lambda p: SGD(p), lambda p: torch.optim.SGD(p, lr=0.01),
                   partial(step_decay, lr0=0.01, step_size=200, gamma=0.8),
                   lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=200, gamma=0.8)),
    "sgd-momentum": ("tanh", lambda p: SGD(p, SGDConfig(momentum=0.9)),
                     lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
                     partial(step_decay, lr0=0.01, step_size=500, gamma=0.5),
                     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=500, gamma=0.5)),
    "sgd-nesterov-weight-decay": ("gelu", lambda p: SGD(p, SGDConfig(momentum=0.8, nesterov=True, weight_decay=1e-3)),
                                  lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True,
                                                            weight_decay=1e-3),
                                  partial(step_decay, lr0=0.01, step_size=500, gamma=0.5),
                                  lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=500, gamma=0.5)),
    "adam": ("tanh", lambda p: Adam(p), lambda p: torch.optim.Adam(p, lr=1e-3),
             partial(step_decay, lr0=1e-3, step_size=1000, gamma=0.5),
             lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1000, gamma=0.5)),
    "adam-weight-decay-warm-restarts": ("softplus",
                                        lambda p: Adam(p, AdamConfig(beta1=0.8, beta2=0.99, weight_decay=1e-2)),
                                        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99), weight_decay=1e-2),
                                        partial(cosine_warm_restarts, lr0=1e-3, t_0=50, t_mult=2, eta_min=1e-5),
                                        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                                            o, T_0=50, T_mult=2, eta_min=1e-5)),
    "sgd-cosine-annealing": ("sigmoid", lambda p: SGD(p, SGDConfig(momentum=0.5)),
                             lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5),
                             partial(cosine_annealing, lr0=0.05, t_max=700, eta_min=1e-4),
                             lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=700, eta_min=1e-4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_agrees_with_torch_step_for_step(case):
    activation, make_opt, make_torch_opt, schedule, make_scheduler = CASES[case]
    net = mlp(10, 2, activation, seed=7)
    tnet = _torch_copy(net)
    batches = _batches(seed=11)
    topt = make_torch_opt(tnet.parameters())
    t_losses, t_lrs = _train_torch(tnet, topt, make_scheduler(topt), batches)
    losses = _train_minidp(net, make_opt(net.params()), schedule, batches)
    # the schedules: torch's recursive updates against minidp's closed forms
    np.testing.assert_allclose([schedule(s) for s in range(N_STEPS)], t_lrs, rtol=1e-10)
    assert losses.shape == (N_STEPS,)
    np.testing.assert_allclose(losses, t_losses, rtol=1e-10)
    # training did something: the check is not between two nets that stood still
    assert losses[-100:].mean() < 0.5 * losses[:100].mean()
    for k, (mine, theirs) in enumerate(zip(net.params(), _torch_weights(tnet))):
        for name in ("W", "b"):
            assert mine[name].shape == theirs[name].shape
            assert _max_rel(mine[name], theirs[name]) < 1e-10, (k, name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_equals_torch_autograd(activation):
    # L = sum(r * net(x)) for a random r: dL/dy = r, then every parameter's and the input's gradient
    rng = np.random.default_rng(3)
    net = mlp(8, 3, activation, n_in=3, n_out=2, seed=5)
    # (nb, n_in) = (13, 3), (nb, n_out) = (13, 2)
    x, r = rng.normal(size=(13, 3)), rng.normal(size=(13, 2))
    y, caches = net_forward(net, x)
    dx, grads = net_backward(net, caches, r)
    assert y.shape == (13, 2) and dx.shape == (13, 3)

    tnet = _torch_copy(net)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = tnet(tx)
    torch.sum(ty * torch.from_numpy(r)).backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-14)
    linears = [m for m in tnet if isinstance(m, torch.nn.Linear)]
    for g, m in zip(grads, linears):
        assert g["W"].shape == (m.in_features, m.out_features) and g["b"].shape == (m.out_features,)
        np.testing.assert_allclose(g["W"], m.weight.grad.numpy().T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g["b"], m.bias.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t_0, t_mult", [(1, 10), (1, 3), (7, 2), (25, 1)])
def test_warm_restarts_closed_form_equals_torch_scheduler_over_2000_steps(t_0, t_mult):
    # (1, 10) restarts at 111 and 1111, where a float-log closed form would misplace the restart
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=1e-4)
    torch_lrs = []
    for _ in range(N_STEPS):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    mine = [cosine_warm_restarts(s, 0.1, t_0, t_mult, 1e-4) for s in range(N_STEPS)]
    np.testing.assert_allclose(mine, torch_lrs, rtol=1e-13)
