"""Where the ASE examples find a water model and a water box.

The shipped example (minidp/examples/water) is used when present, so the
examples run on a fresh clone; ``--model`` / ``--frames`` point elsewhere,
for instance at ../shared/models/water-14000.pb and ../shared/data/water/data_0.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "minidp" / "examples" / "water"
SHARED = ROOT.parent / "shared"


def default_model() -> Path:
    for path in (SHIPPED / "model.dp", SHARED / "models" / "water-14000.dp"):
        if path.exists():
            return path
    raise FileNotFoundError("no water model: pass --model")


def default_frames() -> Path:
    for path in (SHIPPED / "frames", SHARED / "data" / "water" / "data_0"):
        if path.exists():
            return path
    raise FileNotFoundError("no water frames: pass --frames")


class WaterFrame(NamedTuple):
    """One frame of a deepmd/npy system, in Angstrom."""

    elements: list  # (natoms,) element names, through type_map.raw
    positions: np.ndarray  # (natoms, 3)
    cell: np.ndarray  # (3, 3) lattice vectors as rows


def water_frame(frames: Path) -> WaterFrame:
    """The first frame of a deepmd/npy water system."""
    type_map = (frames / "type_map.raw").read_text().split()
    types = np.loadtxt(frames / "type.raw", dtype=int)
    sets = sorted(frames.glob("set.*"))
    coords = np.load(sets[0] / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    cell = np.load(sets[0] / "box.npy")[0].reshape(3, 3).astype(np.float64)
    return WaterFrame([type_map[t] for t in types], coords, cell)


def water_box(frames: Path):
    """The first frame of a deepmd/npy water system as periodic ASE Atoms."""
    from ase import Atoms

    frame = water_frame(frames)
    return Atoms(frame.elements, positions=frame.positions, cell=frame.cell, pbc=True)
