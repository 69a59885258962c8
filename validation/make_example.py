"""Make the water example that ships with minidp (``minidp/examples/water``).

One command regenerates it (about 6 minutes on 2 cores)::

    OMP_NUM_THREADS=2 python validation/make_example.py --shared ../shared --out minidp/examples/water

1. Build a box of 64 rigid water molecules (own code, fixed seed).
2. Sample frames by velocity-Verlet MD driven by the reference model
   ``<shared>/models/water-14000.pb`` (through deepmd-kit's ``DeepPot``), with a
   Berendsen thermostat at 330 K, and label every frame with the reference
   model's energy, force and virial.
3. Train a small se_e2_a model on the shipped frames with deepmd-kit
   (``dp --tf train``), freeze it, convert it to deepmd-kit's backend-neutral
   ``.dp`` and measure it with ``dp test`` on the shipped frames and on frames
   held out from training.

Only small, generated files are shipped: ``frames/`` (deepmd/npy, float64),
``model.dp``, ``input.json``, ``lcurve.out`` and ``README.md``; nothing is
copied from ``<shared>/data``. Everything is written to a temporary directory
beside ``--out`` and moved into place only when every step has succeeded.

Units: eV, Å, fs, amu. 1 eV/(Å·amu) = 0.0096485 Å/fs², so an acceleration is
``a = ACC * f / m`` and a kinetic energy ``K = sum(m v^2) / (2 ACC)`` in eV.

Shape symbols: ``nmol`` molecules, ``natoms = 3 nmol`` atoms (all O first,
then all H), ``nf`` frames.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

BOX = 12.4447  # Å, cubic box edge of deepmd-kit's 64-molecule water example (its density)
R_OH = 0.9572  # Å, rigid TIP3P-like O-H bond
ANGLE_HOH = 104.52  # degrees
TYPE_MAP = ["O", "H"]
MASSES = np.array([15.999, 1.008])  # amu, by type
ACC = 0.0096485  # Å/fs² per eV/(Å·amu)
KB = 8.617333262e-5  # eV/K

ForceFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- the box
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3).

    QR of a 3x3 standard Gaussian matrix, columns signed so that diag(R) > 0,
    is Haar-distributed on O(3); flipping one column when det = -1 keeps it
    uniform on SO(3).
    """
    # (3, 3)
    Q, Rq = np.linalg.qr(rng.standard_normal((3, 3)))
    # (3, 3)
    Q = Q * np.sign(np.diag(Rq))
    if np.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def water_box(nside: int = 4, box: float = BOX, seed: int = 2024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``nside**3`` water molecules on a cubic grid, each randomly oriented.

    Oxygen k sits at the centre of grid cell k: ``O_k = (ijk + 1/2) * box / nside``;
    its hydrogens at ``O_k + Q_k h_±`` with ``h_± = R_OH (±sin(θ/2), cos(θ/2), 0)``.
    Returns coords (natoms, 3) with all O first, then H; cell (3, 3); atom types (natoms,).
    """
    rng = np.random.default_rng(seed)
    half = np.deg2rad(ANGLE_HOH) / 2
    # (2, 3): the two O-H bond vectors in the molecule's frame
    h = R_OH * np.array([[np.sin(half), np.cos(half), 0.0], [-np.sin(half), np.cos(half), 0.0]])
    # (nmol, 3)
    grid = np.stack(np.meshgrid(*[np.arange(nside)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    # (nmol, 3)
    oxygens = (grid + 0.5) * (box / nside)
    # (nmol, 3, 3)
    Q = np.stack([random_rotation(rng) for _ in range(len(oxygens))])
    # (nmol, 2, 3): H_k± = O_k + Q_k h_±
    hydrogens = oxygens[:, None, :] + np.einsum("kab,hb->kha", Q, h)
    # (natoms, 3)
    coords = np.concatenate([oxygens, hydrogens.reshape(-1, 3)])
    # (natoms,)
    types = np.repeat([0, 1], [len(oxygens), 2 * len(oxygens)])
    return coords, np.eye(3) * box, types


# ---------------------------------------------------------------- forces
def make_force_fn(model_path, engine: str = "deepmd") -> ForceFn:
    """``force(x (natoms, 3), cell (3, 3), types) -> (E, F (natoms, 3), W (9,))`` from a model.

    ``engine="deepmd"`` evaluates with deepmd-kit's ``deepmd.infer.DeepPot``;
    ``engine="minidp"`` with ``minidp.DeepPot``, which has the same ``eval``.
    """
    if engine == "deepmd":
        from deepmd.infer import DeepPot
    elif engine == "minidp":
        from minidp import DeepPot
    else:
        raise ValueError(f"engine must be 'deepmd' or 'minidp', got {engine!r}")
    dp = DeepPot(str(model_path))
    if dp.get_type_map()[: len(TYPE_MAP)] != TYPE_MAP:
        raise ValueError(f"model {model_path} has type map {dp.get_type_map()}, expected it to start with {TYPE_MAP}")

    def force(x: np.ndarray, cell: np.ndarray, types: np.ndarray):
        e, f, v = dp.eval(x[None], cell.reshape(1, 9), types)
        return float(e[0, 0]), f[0], v[0]

    return force


# ---------------------------------------------------------------- dynamics
class MDState(NamedTuple):
    x: np.ndarray  # (natoms, 3) Å, unwrapped positions
    v: np.ndarray  # (natoms, 3) Å/fs
    e: float  # eV, potential energy at x
    f: np.ndarray  # (natoms, 3) eV/Å, forces at x
    w: np.ndarray  # (9,) eV, virial at x


def relax(x, cell, types, force: ForceFn, steps: int = 40, max_step: float = 0.02) -> np.ndarray:
    """Steepest descent ``x <- x + α F`` with ``α = min(0.01 Å²/eV, max_step / max_i |F_i|)``.

    Only meant to take the grid-built box off its worst contacts before the MD:
    the cap on the largest atomic move keeps a clash from throwing atoms across the box.
    """
    for _ in range(steps):
        _, f, _ = force(x, cell, types)
        alpha = min(0.01, max_step / max(np.linalg.norm(f, axis=1).max(), 1e-12))
        # (natoms, 3)
        x = x + alpha * f
    return x


def temperature(v: np.ndarray, m: np.ndarray) -> float:
    """``T = sum_i m_i |v_i|^2 / (ACC k_B (3 natoms - 3))``: the centre of mass does not move."""
    return float((m[:, None] * v * v).sum() / (ACC * KB * (v.size - 3)))


def maxwell_boltzmann(rng: np.random.Generator, m: np.ndarray, T: float) -> np.ndarray:
    """Velocities with ``v_i,a ~ N(0, ACC k_B T / m_i)``, zero total momentum, rescaled to exactly T."""
    # (natoms, 3)
    v = rng.standard_normal((m.size, 3)) * np.sqrt(ACC * KB * T / m)[:, None]
    # (natoms, 3): remove the centre-of-mass velocity
    v = v - (m[:, None] * v).sum(0) / m.sum()
    return v * np.sqrt(T / temperature(v, m))


def verlet(s: MDState, cell, types, m, force: ForceFn, dt: float, steps: int, T0: float, tau: float) -> MDState:
    """``steps`` velocity-Verlet steps, each followed by a Berendsen rescaling.

    v(t+dt/2) = v(t) + (dt/2) ACC F(t)/m;  x(t+dt) = x(t) + dt v(t+dt/2);
    v(t+dt) = v(t+dt/2) + (dt/2) ACC F(t+dt)/m;  then v <- λ v with
    λ = sqrt(1 + (dt/τ)(T0/T - 1)) (Berendsen's weak coupling to T0).
    """
    inv_m = ACC / m[:, None]
    x, v, e, f, w = s
    for _ in range(steps):
        # (natoms, 3)
        v = v + 0.5 * dt * f * inv_m
        # (natoms, 3)
        x = x + dt * v
        e, f, w = force(x, cell, types)
        # (natoms, 3)
        v = v + 0.5 * dt * f * inv_m
        v = v * np.sqrt(1.0 + dt / tau * (T0 / temperature(v, m) - 1.0))
    return MDState(x, v, e, f, w)


class Frames(NamedTuple):
    coords: np.ndarray  # (nf, natoms, 3) Å, wrapped into the box
    energy: np.ndarray  # (nf,) eV
    force: np.ndarray  # (nf, natoms, 3) eV/Å
    virial: np.ndarray  # (nf, 9) eV
    temperature: np.ndarray  # (nf,) K


def sample(x, cell, types, force: ForceFn, *, nframes: int, stride: int, equil: int, T0: float = 330.0,
           dt: float = 0.5, seed: int = 2024) -> Frames:
    """Relax, equilibrate ``equil`` steps (τ = 25 fs), then keep every ``stride``-th step (τ = 100 fs)."""
    from tqdm.auto import tqdm

    m = MASSES[types]
    x = relax(x, cell, types, force)
    s = MDState(x, maxwell_boltzmann(np.random.default_rng(seed), m, T0), *force(x, cell, types))
    s = verlet(s, cell, types, m, force, dt, equil, T0, tau=25.0)
    kept = []
    for _ in tqdm(range(nframes), desc="MD frames", disable=None):
        s = verlet(s, cell, types, m, force, dt, stride, T0, tau=100.0)
        kept.append(s)
    # (nf, natoms, 3): wrapping is harmless for a periodic model and keeps the files tidy
    coords = np.stack([k.x for k in kept]) % np.diag(cell)
    return Frames(coords, np.array([k.e for k in kept]), np.stack([k.f for k in kept]),
                  np.stack([k.w for k in kept]), np.array([temperature(k.v, m) for k in kept]))


def write_frames(path: Path, frames: Frames, cell: np.ndarray, types: np.ndarray) -> None:
    """Write labelled frames as a deepmd/npy system in float64 (coord, box, energy, force, virial)."""
    import dpdata

    nf = len(frames.energy)
    data = {
        "atom_names": list(TYPE_MAP), "atom_numbs": [int((types == t).sum()) for t in range(len(TYPE_MAP))],
        "atom_types": types, "orig": np.zeros(3), "nopbc": False,
        "cells": np.repeat(cell[None], nf, axis=0), "coords": frames.coords,
        "energies": frames.energy, "forces": frames.force, "virials": frames.virial.reshape(nf, 3, 3),
    }
    dpdata.LabeledSystem(data=data).to("deepmd/npy", str(path), prec=np.float64)


# ---------------------------------------------------------------- training
def training_input(steps: int, systems: list[str]) -> dict:
    """A reduced se_e2_a water model: deepmd-kit's water example, smaller nets, exp lr 1e-3 -> 1e-5."""
    return {
        "model": {
            "type_map": TYPE_MAP,
            "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.5, "rcut": 6.0,
                           "neuron": [8, 16, 32], "resnet_dt": False, "axis_neuron": 4,
                           "type_one_side": True, "precision": "float64", "seed": 1},
            "fitting_net": {"neuron": [32, 32, 32], "resnet_dt": True, "precision": "float64", "seed": 1},
        },
        "learning_rate": {"type": "exp", "decay_steps": max(steps // 20, 1), "start_lr": 1e-3, "stop_lr": 1e-5},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000,
                 "limit_pref_f": 1, "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"training_data": {"systems": systems, "batch_size": 1}, "numb_steps": steps,
                     "seed": 10, "disp_file": "lcurve.out", "disp_freq": max(steps // 40, 1),
                     "save_freq": steps},
    }


def run(cmd: list[str], cwd: Path, log: Path) -> str:
    """Run ``cmd`` in ``cwd``, its stdout and stderr appended to ``log``; raise if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    print(f"  {' '.join(cmd)}: {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.stdout


def dp_test(model: Path, system: Path, cwd: Path, log: Path) -> dict[str, float]:
    """Energy RMSE/atom, force RMSE and virial RMSE/atom that ``dp test`` reports for one system."""
    out = run(["dp", "--tf", "test", "-m", str(model), "-s", str(system)], cwd, log)
    figures = {}
    for key, label in (("energy_rmse_per_atom", r"Energy RMSE/Natoms"), ("force_rmse", r"Force  RMSE"),
                       ("virial_rmse_per_atom", r"Virial RMSE/Natoms")):
        found = re.search(label + r"\s*:\s*(\S+)", out)
        if found is None:
            raise RuntimeError(f"dp test printed no {label!r}; see {log}")
        figures[key] = float(found.group(1))
    return figures
