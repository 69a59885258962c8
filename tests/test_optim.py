"""Optimizers, learning-rate schedules and the tutorial's 1-D descent: closed forms, convergence, bad input.

The step-for-step agreement with PyTorch is in test_torch_crosscheck.py.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.optim import (SGD, Adam, AdamConfig, SGDConfig, adam_config, adam_plain, cosine_annealing,
                          cosine_warm_restarts, exp_decay, gradient_descent_1d, lr_schedule, step_decay, warmup)

steps = st.integers(0, 100_000)
# timings on a shared machine are too noisy for hypothesis' deadline: every test sets deadline=None


@pytest.fixture(scope="module")
def dp_lr():
    """deepmd-kit's learning-rate module (the tests using it skip without deepmd-kit)."""
    return pytest.importorskip("deepmd.dpmodel.utils.learning_rate")

lrs = st.floats(1e-6, 1.0)

# ---------------------------------------------------------------------------
# Schedules against their closed forms and reference implementations
# ---------------------------------------------------------------------------


@settings(deadline=None)
@given(step=steps, lr0=lrs, step_size=st.integers(1, 500), gamma=st.floats(0.05, 1.0))
def test_step_decay_is_the_steplr_recursion(step, lr0, step_size, gamma):
    # StepLR multiplies by gamma at every multiple of step_size; k products round k times
    lr, k = lr0, step // step_size
    for _ in range(k):
        lr *= gamma
    assert step_decay(step, lr0, step_size, gamma) == pytest.approx(lr, rel=1e-15 * (k + 1))


@settings(deadline=None)
@given(step=steps, start_lr=st.floats(1e-4, 1e-2), ratio=st.floats(1e-8, 0.5),
       decay_steps=st.integers(1, 10_000), numb_steps=st.integers(1, 200_000), staircase=st.booleans())
def test_exp_decay_matches_deepmd_kit(dp_lr, step, start_lr, ratio, decay_steps, numb_steps, staircase):
    ref = dp_lr.LearningRateExp(start_lr=start_lr, stop_lr=start_lr * ratio, num_steps=numb_steps,
                                decay_steps=decay_steps, smooth=not staircase)
    got = exp_decay(step, start_lr, start_lr * ratio, decay_steps, numb_steps, staircase)
    assert got == pytest.approx(ref.value(step), rel=1e-12)


@settings(deadline=None)
@given(start_lr=st.floats(1e-4, 1e-2), ratio=st.floats(1e-6, 0.5), k=st.integers(1, 200), n=st.integers(0, 400))
def test_exp_decay_reaches_stop_lr_after_numb_steps_and_never_goes_below(start_lr, ratio, k, n):
    # numb_steps = k decay periods: r^k = stop/start, so the last period sits at stop_lr
    stop_lr = start_lr * ratio
    assert exp_decay(k * 100, start_lr, stop_lr, 100, k * 100 + 1) >= stop_lr
    assert exp_decay(k * 100, start_lr, stop_lr, 100, k * 100) == pytest.approx(stop_lr, rel=1e-10)
    assert exp_decay(n * 100, start_lr, stop_lr, 100, k * 100) >= stop_lr
    assert exp_decay(0, start_lr, stop_lr, 100, k * 100) == start_lr


@settings(deadline=None)
@given(step=st.integers(0, 50_000), warmup_steps=st.integers(1, 5000), factor=st.floats(0.0, 1.0),
       decay_steps=st.integers(1, 5000))
def test_warmup_then_exp_matches_deepmd_kit(dp_lr, step, warmup_steps, factor, decay_steps):
    total = 50_000
    ref = dp_lr.LearningRateExp(start_lr=1e-3, stop_lr=3.51e-8, num_steps=total, decay_steps=decay_steps,
                                warmup_steps=warmup_steps, warmup_start_factor=factor)
    # deepmd-kit's decay phase is what follows the warm-up
    exp = partial(exp_decay, start_lr=1e-3, stop_lr=3.51e-8, decay_steps=decay_steps, numb_steps=total - warmup_steps)
    assert warmup(step, warmup_steps, exp, factor) == pytest.approx(ref.value(step), rel=1e-12)


@settings(deadline=None)
@given(step=st.integers(0, 1000), warmup_steps=st.integers(1, 1000), factor=st.floats(0.0, 1.0), lr0=lrs)
def test_warmup_is_linear_then_hands_over(step, warmup_steps, factor, lr0):
    def flat(t):
        return lr0

    got = warmup(step, warmup_steps, flat, factor)
    if step < warmup_steps:
        assert got == pytest.approx(lr0 * (factor + (1 - factor) * step / warmup_steps), rel=1e-12)
    else:
        assert got == lr0
    assert warmup(warmup_steps, warmup_steps, partial(step_decay, lr0=lr0, step_size=1, gamma=0.5)) == lr0


@settings(deadline=None)
@given(step=st.integers(0, 10_000), lr0=lrs, t_max=st.integers(1, 5000), eta_frac=st.floats(0.0, 0.9))
def test_cosine_annealing_closed_form(step, lr0, t_max, eta_frac):
    eta_min = lr0 * eta_frac
    got = cosine_annealing(step, lr0, t_max, eta_min)
    assert got == pytest.approx(eta_min + (lr0 - eta_min) * (1 + np.cos(np.pi * (step / t_max))) / 2, rel=1e-12)
    assert eta_min - 1e-15 <= got <= lr0 + 1e-15
    # symmetric about T_max / 2, lr0 at the start, eta_min at T_max
    mirror = cosine_annealing(t_max, lr0, t_max, eta_min) + cosine_annealing(0, lr0, t_max, eta_min)
    if step <= t_max:
        assert got + cosine_annealing(t_max - step, lr0, t_max, eta_min) == pytest.approx(mirror, rel=1e-12)


def _sgdr_by_stepping(n_steps, lr0, t_0, t_mult, eta_min):
    """Torch's CosineAnnealingWarmRestarts.step(): T_cur += 1, restart when it reaches T_i."""
    t_cur, t_i, out = 0, t_0, []
    for _ in range(n_steps):
        out.append(eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
        t_cur += 1
        if t_cur >= t_i:
            t_cur, t_i = t_cur - t_i, t_i * t_mult
    return out


@settings(max_examples=40, deadline=None)
@given(lr0=lrs, t_0=st.integers(1, 50), t_mult=st.integers(1, 4), eta_frac=st.floats(0.0, 0.5))
def test_cosine_warm_restarts_equals_stepping_torchs_counters(lr0, t_0, t_mult, eta_frac):
    ref = _sgdr_by_stepping(1500, lr0, t_0, t_mult, lr0 * eta_frac)
    got = [cosine_warm_restarts(s, lr0, t_0, t_mult, lr0 * eta_frac) for s in range(1500)]
    np.testing.assert_allclose(got, ref, rtol=1e-13)


@settings(deadline=None)
@given(step=steps, lr0=lrs, t_0=st.integers(1, 5000))
def test_cosine_warm_restarts_with_t_mult_1_is_periodic_cosine_annealing(step, lr0, t_0):
    assert cosine_warm_restarts(step, lr0, t_0) == pytest.approx(cosine_annealing(step % t_0, lr0, t_0), rel=1e-12)


@pytest.mark.parametrize("t_mult, restarts", [(10, [1, 11, 111, 1111, 11111]), (3, [1, 4, 13, 40, 121, 364])])
def test_cosine_warm_restarts_restarts_at_the_top_exactly(t_mult, restarts):
    # log_10(1000) rounds to 2.9999999999999996: a float-log closed form puts step 111 at the bottom
    for s in restarts:
        assert cosine_warm_restarts(s, 0.1, 1, t_mult, 1e-4) == 0.1
        # the step before is the last of a period of T_0 t_mult^k >= t_mult steps (not at the top)
        if s > 1:
            assert cosine_warm_restarts(s - 1, 0.1, 1, t_mult, 1e-4) < 0.1


# ---------------------------------------------------------------------------
# Optimizers: closed forms on simple problems, convergence on convex quadratics
# ---------------------------------------------------------------------------


@settings(deadline=None)
@given(mu=st.floats(0.0, 0.95), nesterov=st.booleans(), lr=st.floats(1e-4, 0.5), n=st.integers(1, 60),
       seed=st.integers(0, 2**16))
def test_sgd_momentum_on_a_constant_gradient_has_the_geometric_closed_form(mu, nesterov, lr, n, seed):
    # b_k = g (1 - mu^k) / (1 - mu); the step is b_k, or g + mu b_k with Nesterov
    nesterov = nesterov and mu > 0
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(3, 2))
    p = [{"W": rng.normal(size=(3, 2))}]
    p0 = p[0]["W"].copy()
    opt = SGD(p, SGDConfig(momentum=mu, nesterov=nesterov))
    for _ in range(n):
        opt.step([{"W": g}], lr)
    k = np.arange(1, n + 1)
    b = (1 - mu**k) / (1 - mu)
    total = np.sum(1 + mu * b if nesterov else b)
    np.testing.assert_allclose(p[0]["W"], p0 - lr * total * g, rtol=1e-10, atol=1e-12)
    assert p[0]["W"].shape == (3, 2)


@settings(deadline=None)
@given(wd=st.floats(1e-4, 1.0), lr=st.floats(1e-3, 0.5), n=st.integers(1, 50))
def test_weight_decay_alone_shrinks_geometrically(wd, lr, n):
    p = [{"W": np.full((2, 2), 3.0), "b": np.array([-1.0, 2.0])}]
    opt = SGD(p, SGDConfig(weight_decay=wd))
    zero = [{"W": np.zeros((2, 2)), "b": np.zeros(2)}]
    for _ in range(n):
        opt.step(zero, lr)
    np.testing.assert_allclose(p[0]["b"], np.array([-1.0, 2.0]) * (1 - lr * wd) ** n, rtol=1e-12)


@settings(deadline=None)
@given(lr=st.floats(1e-4, 0.1), eps=st.floats(1e-12, 1e-6), seed=st.integers(0, 2**16))
def test_adam_first_step_is_lr_times_the_sign(lr, eps, seed):
    # after one step m_hat = g and v_hat = g^2: the step is lr g / (|g| + eps)
    rng = np.random.default_rng(seed)
    g = rng.normal(size=5) + np.sign(rng.normal(size=5))
    p = [{"b": np.zeros(5)}]
    Adam(p, AdamConfig(eps=eps)).step([{"b": g}], lr)
    np.testing.assert_allclose(p[0]["b"], -lr * g / (np.abs(g) + eps), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", [AdamConfig(), AdamConfig(weight_decay=0.1, beta1=0.8, beta2=0.99),
                                    AdamConfig(weight_decay=0.1, eps=1e-6, decoupled_weight_decay=True)])
def test_adam_fused_update_is_the_plain_one_to_the_bit(dtype, config):
    """Adam.step's kernel (contiguous arrays) against adam_plain's NumPy lines, step after step; a
    non-contiguous parameter takes the plain lines themselves."""
    rng = np.random.default_rng(1)
    params = [{"W": rng.normal(size=(7, 5)).astype(dtype), "b": rng.normal(size=5).astype(dtype)},
              {"W": np.asfortranarray(rng.normal(size=(5, 3))).astype(dtype, order="F")}]
    ref = [{k: v.copy() for k, v in p.items()} for p in params]
    m_ref, v_ref = ([{k: np.zeros_like(v) for k, v in p.items()} for p in ref] for _ in range(2))
    opt = Adam(params, config)
    for t in range(1, 5):
        # a zero gradient where v is still 0: m / (0 + eps) in both
        grads = [{k: (rng.normal(size=v.shape) * (t > 1)).astype(dtype) for k, v in p.items()} for p in params]
        lr = 10.0 ** -t
        opt.step(grads, lr)
        for p, g, m, v in zip(ref, grads, m_ref, v_ref):
            for k in p:
                adam_plain(p[k], g[k], m[k], v[k], config, lr, t)
        for got, want in [(params, ref), (opt.m, m_ref), (opt.v, v_ref)]:
            for a, b in zip(got, want):
                for k in a:
                    assert a[k].dtype == dtype
                    np.testing.assert_array_equal(a[k], b[k])


@st.composite
def spd_problems(draw):
    """A (n, n) SPD matrix with condition number <= 10 (diagonal or dense), and a minimum p*."""
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lam = rng.uniform(0.1, 1.0, n) * draw(st.floats(0.1, 100.0))
    if draw(st.booleans()):
        # a random rotation of the eigenvalues: a dense SPD matrix
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        A = q @ np.diag(lam) @ q.T
    else:
        A = np.diag(lam)
    return A, rng.normal(size=n), np.max(lam)


@settings(max_examples=40, deadline=None)
@given(problem=spd_problems(), c=st.floats(0.2, 1.8), mu=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans())
def test_sgd_converges_on_a_convex_quadratic_with_a_stable_step(problem, c, mu, nesterov):
    # f(p) = (p - p*)^T A (p - p*) / 2: plain GD contracts every eigen-direction for lr < 2/L,
    # heavy-ball momentum for lr < 2 (1 + mu) / L, Nesterov's for lr < 2 (1 + mu) / ((1 + 2 mu) L)
    A, p_star, L = problem
    nesterov = nesterov and mu > 0
    lr = c / L * ((1 + mu) / (1 + 2 * mu) if nesterov else 1.0)
    p = [{"b": np.zeros_like(p_star)}]
    opt = SGD(p, SGDConfig(momentum=mu, nesterov=nesterov))
    start = np.linalg.norm(p_star)
    for _ in range(3000):
        opt.step([{"b": A @ (p[0]["b"] - p_star)}], lr)
    assert np.linalg.norm(p[0]["b"] - p_star) <= 1e-8 * start


# ---------------------------------------------------------------------------
# Adam and AdamW against torch, step for step
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _train_both(torch, config: AdamConfig, make_torch_opt, n_steps: int = 2000, seed: int = 0):
    """minidp's Adam (config) and torch's optimizer on the same closed loop, in float64.

    Each step's gradient is g = A p + noise_t (A a fixed positive diagonal per array, the same
    noise in both), computed from each side's own parameters; the rate follows deepmd-kit's exp
    schedule with a warm-up, set on torch's param group every step as deepmd-kit's LambdaLR does.
    Returns (minidp's final parameters, torch's, as flat lists of arrays).
    """
    rng = np.random.default_rng(seed)
    params = [{"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}, {"W": rng.normal(size=(4, 1)),
                                                                         "b": rng.normal(size=1)}]
    tparams = [torch.tensor(a.copy(), requires_grad=True) for d in params for a in d.values()]
    scale = [rng.uniform(0.1, 2.0, a.shape) for d in params for a in d.values()]
    opt, topt = Adam(params, config), make_torch_opt(tparams)
    schedule = lr_schedule({"start_lr": 1e-2, "stop_lr": 1e-5, "decay_steps": 100, "warmup_steps": 50}, n_steps)
    for t in range(n_steps):
        noise = [rng.normal(size=a.shape) for a in scale]
        lr = schedule.lr(t)
        mine = [a * p + e for a, p, e in zip(scale, (p for d in params for p in d.values()), noise)]
        grads = [dict(zip(d, mine[k:k + len(d)])) for k, d in zip((0, 2), params)]
        for tp, a, e in zip(tparams, scale, noise):
            tp.grad = torch.from_numpy(a * tp.detach().numpy() + e)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(grads, lr)
    return [p for d in params for p in d.values()], [tp.detach().numpy() for tp in tparams]


ADAM_CASES = {
    "adam": (AdamConfig(), lambda torch, p: torch.optim.Adam(p, lr=0.0)),
    "adam-l2": (AdamConfig(weight_decay=0.1, beta1=0.8, beta2=0.99),
                lambda torch, p: torch.optim.Adam(p, lr=0.0, betas=(0.8, 0.99), weight_decay=0.1)),
    "adamw": (AdamConfig(weight_decay=0.1, decoupled_weight_decay=True),
              lambda torch, p: torch.optim.AdamW(p, lr=0.0, weight_decay=0.1)),
    "adamw-betas-eps": (AdamConfig(beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=2.0, decoupled_weight_decay=True),
                        lambda torch, p: torch.optim.AdamW(p, lr=0.0, betas=(0.5, 0.9), eps=1e-6, weight_decay=2.0)),
    # deepmd-kit's optimizer section, read as deepmd-kit's PyTorch backend builds torch's AdamW from it
    "deepmd-adamw-section": (adam_config({"type": "AdamW", "adam_beta1": 0.85, "weight_decay": 0.05}),
                             lambda torch, p: torch.optim.AdamW(p, lr=0.0, betas=(0.85, 0.999), weight_decay=0.05)),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_and_adamw_agree_with_torch_step_for_step(torch, case):
    config, make = ADAM_CASES[case]
    mine, theirs = _train_both(torch, config, lambda p: make(torch, p))
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(b)), (case, k)


def test_the_two_weight_decays_differ(torch):
    """Coupled (Adam) and decoupled (AdamW) decay of one strength train to different weights, each
    as torch's own (so the test above tells the two meanings apart)."""
    coupled, _ = _train_both(torch, AdamConfig(weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.0), 300)
    decoupled, _ = _train_both(torch, AdamConfig(weight_decay=0.1, decoupled_weight_decay=True),
                               lambda p: torch.optim.AdamW(p, lr=0.0), 300)
    assert max(np.max(np.abs(a - b)) for a, b in zip(coupled, decoupled)) > 1e-3


@settings(deadline=None)
@given(wd=st.floats(1e-4, 1.0), lr=st.floats(1e-4, 0.5), n=st.integers(1, 50))
def test_adamw_with_zero_gradients_only_shrinks_the_weights(wd, lr, n):
    # m = v = 0: the Adam step is 0, the decoupled decay alone acts, p (1 - lr wd)^n
    p = [{"b": np.array([-1.0, 2.0])}]
    opt = Adam(p, AdamConfig(weight_decay=wd, decoupled_weight_decay=True))
    for _ in range(n):
        opt.step([{"b": np.zeros(2)}], lr)
    np.testing.assert_allclose(p[0]["b"], np.array([-1.0, 2.0]) * (1 - lr * wd) ** n, rtol=1e-12)


def test_adam_config_reads_deepmd_kits_optimizer_section():
    assert adam_config({}) == AdamConfig()
    assert adam_config({"type": "Adam", "weight_decay": 0.01}) == AdamConfig(weight_decay=0.01)
    # AdamW's weight decay defaults to 0 too: deepmd-kit's input conversion fills 0.0 in
    assert adam_config({"type": "AdamW"}) == AdamConfig(decoupled_weight_decay=True)
    assert adam_config({"type": "AdamW", "adam_beta1": 0.8, "adam_beta2": 0.95, "weight_decay": 1e-3}) == \
        AdamConfig(beta1=0.8, beta2=0.95, weight_decay=1e-3, decoupled_weight_decay=True)


def test_adam_config_defaults_are_deepmd_kits_after_its_input_conversion():
    compat = pytest.importorskip("deepmd.utils.compat")
    normalize = pytest.importorskip("deepmd.utils.argcheck").normalize
    for section in ({"type": "Adam"}, {"type": "AdamW"}, {"type": "AdamW", "weight_decay": 0.2}):
        keys = {"model": {"descriptor": {"type": "se_e2_a"}, "fitting_net": {}},
                "learning_rate": {"start_lr": 1e-3}, "loss": {}, "optimizer": dict(section),
                "training": {"training_data": {"systems": ["x"]}, "numb_steps": 10}}
        full = normalize(compat.update_deepmd_input(keys, warning=False))["optimizer"]
        assert adam_config(full) == adam_config(section), section


@pytest.mark.parametrize("section, error, message", [
    ({"type": "LKF"}, ValueError, r"optimizer\.type 'LKF' is not supported; minidp trains with Adam or AdamW"),
    ({"type": "adamw"}, ValueError, r"optimizer\.type 'adamw' is not supported"),
    ({"type": "AdamW", "momentum": 0.9}, ValueError,
     r"optimizer\.momentum: not a key of the AdamW optimizer; expected \['adam_beta1', 'adam_beta2', 'weight_decay'\]"),
    ({"adam_beta1": 1.0}, ValueError, r"optimizer\.adam_beta1 must lie in \[0, 1\), got 1\.0"),
    ({"type": "AdamW", "weight_decay": -0.1}, ValueError, r"optimizer\.weight_decay: .* is below 0\.0"),
    ({"adam_beta2": "0.99"}, TypeError, r"optimizer\.adam_beta2: expected a number, got str '0\.99'"),
    (["Adam"], TypeError, r"optimizer must be a mapping of keys, got list"),
])
def test_adam_config_refuses_bad_sections_in_one_line(section, error, message):
    with pytest.raises(error, match=message):
        adam_config(section)


# ---------------------------------------------------------------------------
# The tutorial's 1-D descent
# ---------------------------------------------------------------------------


def test_parabola_from_3_takes_21_points():
    path = gradient_descent_1d(lambda x: 2 * x, 3.0, 0.1, 0.01)
    assert path.shape == (21,)
    np.testing.assert_allclose(path, 3.0 * 0.8 ** np.arange(21), rtol=1e-13)
    assert abs(path[-1] - path[-2]) < 0.01 <= abs(path[-2] - path[-3])


@settings(deadline=None)
@given(x0=st.floats(-100, 100), lr=st.floats(0.01, 0.45), threshold=st.floats(1e-6, 1.0),
       max_iter=st.integers(1, 2000))
def test_descent_stops_at_the_first_small_step_or_max_iter(x0, lr, threshold, max_iter):
    path = gradient_descent_1d(lambda x: 2 * x, x0, lr, threshold, max_iter)
    assert path.ndim == 1 and 2 <= len(path) <= max_iter + 1
    np.testing.assert_allclose(path, x0 * (1 - 2 * lr) ** np.arange(len(path)), rtol=1e-10, atol=1e-300)
    moves = np.abs(np.diff(path))
    assert np.all(moves[:-1] >= threshold)
    assert moves[-1] < threshold or len(path) == max_iter + 1


def test_descent_on_an_array_keeps_its_shape_and_uses_the_largest_move():
    x0 = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    path = gradient_descent_1d(lambda x: 2 * x, x0, 0.1, 0.01)
    # the largest component (3) follows the 1-D path from 3: 21 points
    assert path.shape == (21, 2, 3)
    np.testing.assert_allclose(path[-1], x0 * 0.8**20, rtol=1e-13)


def test_descent_on_abs_with_a_big_step_oscillates_until_max_iter():
    path = gradient_descent_1d(np.sign, 2.0, 0.9, 1e-4, max_iter=30)
    assert path.shape == (31,)
    np.testing.assert_allclose(path[-4:], [0.2, -0.7, 0.2, -0.7][::-1] if path[-1] < 0 else [-0.7, 0.2, -0.7, 0.2],
                               atol=1e-12)


# ---------------------------------------------------------------------------
# Bad input: named in the message, never silently used
# ---------------------------------------------------------------------------


def _net_like():
    return [{"W": np.zeros((1, 3)), "b": np.zeros(3)}, {"W": np.zeros((3, 1)), "b": np.zeros(1)}]


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
def test_optimizers_refuse_bad_lr_and_grads_of_the_wrong_layout(opt_cls):
    params = _net_like()
    opt = opt_cls(params)
    with pytest.raises(ValueError, match=r"lr: -0\.1 is below 0\.0"):
        opt.step(_net_like(), -0.1)
    with pytest.raises(ValueError, match=r"lr: nan is not finite"):
        opt.step(_net_like(), float("nan"))
    with pytest.raises(TypeError, match=r"lr: expected a number, got str '0\.1'"):
        opt.step(_net_like(), "0.1")
    with pytest.raises(ValueError, match=r"grads has 1 layers, expected 2"):
        opt.step(_net_like()[:1], 0.1)
    bad = _net_like()
    # a (1,) gradient would broadcast onto the (3,) bias without a word
    bad[0]["b"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"grads\[0\] has arrays of shapes \{'W': \(1, 3\), 'b': \(1,\)\}, "
                                         r"expected \{'W': \(1, 3\), 'b': \(3,\)\}"):
        opt.step(bad, 0.1)
    missing = _net_like()
    del missing[1]["b"]
    with pytest.raises(ValueError, match=r"grads\[1\] has arrays of shapes \{'W': \(3, 1\)\}"):
        opt.step(missing, 0.1)
    # nothing was updated by the refused steps
    assert all(np.all(v == 0) for d in params for v in d.values())


def test_optimizer_configs_refuse_bad_values():
    with pytest.raises(ValueError, match=r"momentum: -0\.5 is below 0\.0"):
        SGDConfig(momentum=-0.5)
    with pytest.raises(ValueError, match=r"nesterov=True needs a momentum > 0"):
        SGDConfig(nesterov=True)
    with pytest.raises(ValueError, match=r"weight_decay: -1 is below 0\.0"):
        SGDConfig(weight_decay=-1)
    with pytest.raises(ValueError, match=r"beta1 must lie in \[0, 1\), got 1\.0"):
        AdamConfig(beta1=1.0)
    with pytest.raises(ValueError, match=r"beta2: -0\.1 is below 0\.0"):
        AdamConfig(beta2=-0.1)
    with pytest.raises(ValueError, match=r"eps: 0 is not positive"):
        AdamConfig(eps=0)
    with pytest.raises(TypeError, match=r"decoupled_weight_decay must be true or false, got str 'yes'"):
        AdamConfig(decoupled_weight_decay="yes")


@pytest.mark.parametrize("call, error, message", [
    (lambda: step_decay(-1, 0.1, 10, 0.5), ValueError, r"step: -1 is below 0"),
    (lambda: step_decay(1.5, 0.1, 10, 0.5), TypeError, r"step: expected an integer, got float 1\.5"),
    (lambda: step_decay(1, -0.1, 10, 0.5), ValueError, r"lr0: -0\.1 is not positive"),
    (lambda: step_decay(1, 0.1, 0, 0.5), ValueError, r"step_size: 0 is below 1"),
    (lambda: step_decay(1, 0.1, 10, 0.0), ValueError, r"gamma: 0\.0 is not positive"),
    (lambda: exp_decay(1, 1e-3, -1e-3, 10, 100), ValueError, r"stop_lr: -0\.001 is below 0\.0"),
    (lambda: exp_decay(1, 1e-3, 1e-8, 10, -1), ValueError, r"numb_steps: -1 is below 0"),
    (lambda: exp_decay(1, 1e-3, 1e-8, 10, 100, decay_rate=0.0), ValueError, r"decay_rate: .* is not positive"),
    (lambda: exp_decay(1, float("inf"), 1e-8, 10, 100), ValueError, r"start_lr: inf is not finite"),
    (lambda: warmup(1, -5, lambda t: 0.1), ValueError, r"warmup_steps: -5 is below 0"),
    (lambda: warmup(1, 5, 0.1), TypeError, r"schedule must be a function of the step, got float"),
    (lambda: warmup(1, 5, lambda t: 0.1, 1.5), ValueError, r"start_factor must lie in \[0, 1\], got 1\.5"),
    (lambda: cosine_annealing(1, 0.1, 0), ValueError, r"t_max: 0 is below 1"),
    (lambda: cosine_annealing(1, 0.1, 10, -1e-3), ValueError, r"eta_min: -0\.001 is below 0\.0"),
    (lambda: cosine_warm_restarts(1, 0.1, 10, 0), ValueError, r"t_mult: 0 is below 1"),
    (lambda: cosine_warm_restarts(1, 0.1, 10, 1.5), TypeError, r"t_mult: expected an integer, got float 1\.5"),
    (lambda: gradient_descent_1d(np.sign, 1.0, -0.1), ValueError, r"lr: -0\.1 is not positive"),
    (lambda: gradient_descent_1d(np.sign, 1.0, 0.1, 0.0), ValueError, r"threshold: 0\.0 is not positive"),
    (lambda: gradient_descent_1d(np.sign, 1.0, 0.1, 0.01, 0), ValueError, r"max_iter: 0 is below 1"),
    (lambda: gradient_descent_1d(np.sign, float("nan"), 0.1), ValueError, r"x0 must be finite, got nan"),
    (lambda: gradient_descent_1d(2.0, 1.0, 0.1), TypeError, r"grad must be a function of x, got float"),
])
def test_schedules_and_descent_refuse_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
