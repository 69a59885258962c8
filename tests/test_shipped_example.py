"""The example that ships with minidp: it loads, evaluates, and is what its README says."""

from __future__ import annotations

import numpy as np

from minidp import DeepPot
from minidp.io.figures import rmse_mae
from tests.conftest import ROOT

EXAMPLE = ROOT / "minidp" / "examples" / "water"


def test_shipped_model_reproduces_its_dp_test_figure():
    frames = EXAMPLE / "frames"
    coords = np.load(frames / "set.000" / "coord.npy")
    cells = np.load(frames / "set.000" / "box.npy")
    force = np.load(frames / "set.000" / "force.npy")
    types = np.loadtxt(frames / "type.raw", dtype=int)
    assert coords.shape == (60, 576) and types.tolist() == [0] * 64 + [1] * 128
    _, f, _ = DeepPot(EXAMPLE / "model.dp").eval(coords, cells, types)
    # `dp test` on these frames gave a force RMSE of 0.1386 eV/A (minidp/examples/water/README.md)
    assert abs(rmse_mae(f, force.reshape(f.shape))[0] - 0.1386) < 5e-4


def test_shipped_water_molecules_are_intact():
    """Every O has two H at 0.8-1.2 A (minimum image): the MD did not break molecules."""
    frames = EXAMPLE / "frames"
    x = np.load(frames / "set.000" / "coord.npy")[-1].reshape(-1, 3)
    cell = np.load(frames / "set.000" / "box.npy")[-1].reshape(3, 3)
    d = x[None, 64:] - x[:64, None]
    frac = d @ np.linalg.inv(cell)
    d = (frac - np.round(frac)) @ cell
    r = np.linalg.norm(d, axis=-1)
    close = (r > 0.8) & (r < 1.2)
    assert (close.sum(axis=1) == 2).all()


def test_shipped_training_input_runs_with_minidp_train(tmp_path):
    """The example's input.json (deepmd-kit's format) trains as is with minidp (30 steps: a smoke test)."""
    from dataclasses import replace

    from minidp.training.config import read_input, with_numb_steps
    from minidp.training.lcurve import read_lcurve
    from minidp.training.loop import train

    config = replace(with_numb_steps(read_input(EXAMPLE / "input.json"), 30), disp_freq=10, save_freq=30)
    result = train(config, tmp_path / "model.dp", tmp_path, progress=False)
    curve = read_lcurve(tmp_path / "lcurve.out")
    assert curve["step"].tolist() == [0, 10, 20, 30]
    assert np.isfinite(curve["rmse_trn"]).all() and curve["lr"][-1] < curve["lr"][0]
    assert result.model.descriptor.config.neuron == (8, 16, 32)
