"""Shared fixtures: where ../shared is, and small water frames from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
