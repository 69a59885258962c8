"""The tutorial's experiments: `minidp tutorial cos` and `minidp tutorial optimize`, end to end."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.cli import main
from minidp.nn import mlp
from minidp.training.tutorial import FitConfig, cos_data, mse_step, piecewise, train

COS_PNGS = ("cos-data.png", "cos-fit.png", "piecewise-fit.png", "cos-loss.png")


def test_cos_data_has_499_points_and_a_gap():
    x, y = cos_data()
    assert x.shape == (499, 1) and y.shape == (499, 1)
    assert np.sum(x <= 4.0) == 333 and np.sum(x >= 6.0) == 166
    assert not np.any((x > 4.0) & (x < 6.0))
    np.testing.assert_array_equal(y, np.cos(x))


def test_piecewise_is_a_ramp_a_plateau_and_a_slope():
    np.testing.assert_allclose(piecewise(np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 4.0])),
                               [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, -1.0])


@settings(max_examples=30, deadline=None)
@given(activation=st.sampled_from(["tanh", "relu", "gelu", "softplus", "sigmoid"]), nb=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_mse_gradient_equals_central_differences(activation, nb, seed):
    # L = mean((net(x) - y)^2): every parameter entry nudged by +-h, in float64
    rng = np.random.default_rng(seed)
    net = mlp(4, 2, activation, seed=seed)
    # (nb, 1)
    x, y = rng.uniform(0, 8, size=(nb, 1)), rng.normal(size=(nb, 1))
    loss, grads = mse_step(net, x, y)
    h = 1e-6
    for p, g in zip(net.params(), grads):
        for name, value in p.items():
            assert g[name].shape == value.shape
            fd = np.zeros_like(value)
            for i in np.ndindex(value.shape):
                keep = value[i]
                value[i] = keep + h
                up = mse_step(net, x, y)[0]
                value[i] = keep - h
                down = mse_step(net, x, y)[0]
                value[i] = keep
                fd[i] = (up - down) / (2 * h)
            np.testing.assert_allclose(g[name], fd, rtol=1e-6, atol=1e-8 * max(1.0, loss))


def test_cos_command_writes_its_plots_and_prints_the_losses(tmp_path, capsys):
    out = tmp_path / "cos"
    assert main(["tutorial", "cos", "--out", str(out), "--epochs", "200"]) == 0
    text = capsys.readouterr().out
    for name in COS_PNGS:
        assert (out / name).stat().st_size > 1000
        assert f"wrote {out / name}" in text
    assert re.search(r"^epoch   200  lr 0\.01000  loss 0\.\d{4}$", text, re.M)
    # nothing else is left in the folder (no temporaries)
    assert sorted(p.name for p in out.iterdir()) == sorted(COS_PNGS)


@pytest.mark.slow
def test_default_seed_reaches_the_tutorials_loss_by_epoch_1800(capsys):
    # the tutorial printed 0.0849 at epoch 200 and 0.0117 at epoch 1800
    x, y = cos_data()
    cfg = FitConfig(epochs=1800)
    history = train(mlp(cfg.width, cfg.depth, cfg.activation, seed=cfg.seed), x, y, cfg)
    lines = re.findall(r"^epoch +(\d+)  lr ([\d.]+)  loss ([\d.]+)$", capsys.readouterr().out, re.M)
    assert [int(e) for e, _, _ in lines] == list(range(200, 1801, 200))
    assert lines[-1][1] == f"{0.01 * 0.8**8:.5f}"
    assert len(history) == 1800
    assert history[199] <= 0.0849 and history[1799] <= 0.0117


def test_cos_command_refuses_bad_epochs_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cos"
    assert main(["tutorial", "cos", "--out", str(out), "--epochs", "0"]) == 2
    assert "epochs must be a positive integer, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_optimize_command_paths_and_plots(tmp_path, capsys):
    out = tmp_path / "opt"
    assert main(["tutorial", "optimize", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {m[0]: (int(m[1]), float(m[2]))
            for m in re.findall(r"^(\S+) +lr \S+ +(\d+) points, x_end = +(\S+),", text, re.M)}
    assert rows["x2-from-3"] == (21, pytest.approx(3 * 0.8**20, abs=5e-6))
    # the quartic x^4 + x^3 - 7x^2 - x + 6: global minimum at -2.2537, local one at 1.5742
    assert rows["quartic-from-minus-3.5"][1] == pytest.approx(-2.25375, abs=1e-3)
    assert rows["quartic-from-0.5"][1] == pytest.approx(1.57421, abs=1e-3)
    # |x| at lr 0.9 never settles: stopped by max_iter (30 steps)
    assert rows["abs-lr-0.9"][0] == 31
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == sorted([f"descent-{name}.png" for name in rows] + ["lr-schedules.png"])
    for name in pngs:
        assert f"wrote {out / name}" in text


def test_train_refuses_data_that_does_not_fit_the_net():
    x, y = cos_data()
    with pytest.raises(ValueError, match=r"x and y must have shapes \(n, 1\) and \(n, 1\), "
                                         r"got \(499, 1\) and \(498, 1\)"):
        train(mlp(4, 1, seed=0), x, y[1:], FitConfig(epochs=1))
    with pytest.raises(ValueError, match=r"epochs must be a positive integer, got -3"):
        FitConfig(epochs=-3)
    with pytest.raises(ValueError, match=r"lr and gamma must be positive, got lr=0\.0"):
        FitConfig(lr=0.0)
