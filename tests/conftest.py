"""Shared fixtures: where ../shared is, small water frames from it, and small random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from minidp.model import EnergyModel, new_model
from minidp.se_e2_a import SeAConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WATER = SHARED / "data" / "water"
MODEL_PB = SHARED / "models" / "water-14000.pb"
MODEL_DP = SHARED / "models" / "water-14000.dp"


def need(path: Path) -> Path:
    """Skip the test cleanly when a file from ../shared is absent."""
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def water_frames():
    """(coords (4, 576) float32, cells (4, 9) float32, atom_types (192,)) from data_3, as stored."""
    system = need(WATER / "data_3")
    coords = np.load(system / "set.000" / "coord.npy")[:4]
    cells = np.load(system / "set.000" / "box.npy")[:4]
    types = np.loadtxt(system / "type.raw", dtype=int)
    return coords, cells, types


@pytest.fixture(scope="session")
def water_dp():
    """minidp's DeepPot on the reference water model (.dp: needs no deepmd-kit)."""
    from minidp import DeepPot

    return DeepPot(need(MODEL_DP))


# ---------------------------------------------------------------------------
# Small random se_e2_a models for the gradient and property tests
# ---------------------------------------------------------------------------

# embedding widths: plain, doubling (resnet [x, x]) and equal (resnet x) layers
NEURONS = [(4,), (3, 5), (4, 4), (4, 8), (2, 4, 8), (3, 6, 6)]


@st.composite
def se_configs(draw, max_sel: int = 5) -> SeAConfig:
    """An SeAConfig with 1-2 types; tests that need another sel replace it (dataclasses.replace)."""
    ntypes = draw(st.integers(1, 2))
    neuron = draw(st.sampled_from(NEURONS))
    rcut = draw(st.floats(3.0, 4.5))
    return SeAConfig(rcut=rcut, rcut_smth=draw(st.floats(0.25, 0.8)) * rcut,
                     sel=tuple(draw(st.integers(1, max_sel)) for _ in range(ntypes)), neuron=neuron,
                     axis_neuron=draw(st.integers(1, min(3, neuron[-1]))), type_one_side=draw(st.booleans()),
                     resnet_dt=draw(st.booleans()))


def random_model(cfg: SeAConfig, seed: int, per_slot: bool = False, fitting_neuron=(6, 6)) -> EnergyModel:
    """new_model with nonzero davg, dstd != 1 and a bias, so that the padded slots' rows -davg/dstd matter.

    per_slot=False draws deepmd-kit's kind of statistics, one (m, 0, 0, 0) and (s_r, s_a, s_a, s_a) per
    centre type for all slots: the energy is then invariant under rotations and under the order of
    equidistant neighbours. per_slot=True draws every slot and column apart (for the slot bookkeeping).
    """
    model = new_model([f"T{t}" for t in range(cfg.ntypes)], cfg, fitting_neuron, seed=seed)
    rng = np.random.default_rng(seed)
    model.descriptor.davg, model.descriptor.dstd = random_stats(cfg, rng, per_slot)
    model.bias = rng.normal(0.0, 1.0, cfg.ntypes)
    return model


def random_stats(cfg: SeAConfig, rng: np.random.Generator, per_slot: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """davg, dstd (ntypes, nnei, 4) as :func:`random_model` draws them (per_slot: see there)."""
    shape = (cfg.ntypes, cfg.nnei, 4)
    if per_slot:
        return rng.normal(0.0, 0.5, shape), rng.uniform(0.2, 1.0, shape)
    davg = np.zeros(shape)
    davg[..., 0] = rng.uniform(0.05, 0.5, (cfg.ntypes, 1))
    dstd = rng.uniform(0.1, 0.5, (cfg.ntypes, 1, 2))[..., [0, 1, 1, 1]] * np.ones(shape)
    return davg, dstd


def rel_err(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """|a - b| / |b| (Frobenius norms); below |b| = floor the error counts as absolute / floor."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))
