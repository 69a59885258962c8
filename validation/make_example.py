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
DT = 0.5  # fs, MD time step
T0 = 330.0  # K, thermostat target
RELAX_STEPS = 40  # steepest-descent steps before the MD
TAU_EQUIL, TAU_SAMPLE = 25.0, 100.0  # fs, Berendsen coupling times: tight while equilibrating, loose while sampling

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


def relax(x, cell, types, force: ForceFn, steps: int = RELAX_STEPS, max_step: float = 0.02) -> np.ndarray:
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


def sample(x, cell, types, force: ForceFn, *, nframes: int, stride: int, equil: int, seed: int) -> Frames:
    """Relax, equilibrate ``equil`` steps (τ = TAU_EQUIL), then keep every ``stride``-th step (τ = TAU_SAMPLE)."""
    from tqdm.auto import tqdm

    m = MASSES[types]
    x = relax(x, cell, types, force)
    s = MDState(x, maxwell_boltzmann(np.random.default_rng(seed), m, T0), *force(x, cell, types))
    s = verlet(s, cell, types, m, force, DT, equil, T0, tau=TAU_EQUIL)
    kept = []
    for _ in tqdm(range(nframes), desc="MD frames", disable=None):
        s = verlet(s, cell, types, m, force, DT, stride, T0, tau=TAU_SAMPLE)
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
        # the scratch folder (and the log in it) is removed on failure: show the end of the output
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    print(f"  {' '.join(cmd)}: {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.stdout


def dp_test(model: Path, system: Path, cwd: Path, log: Path) -> dict[str, float]:
    """Energy RMSE/atom, force RMSE and virial RMSE/atom that ``dp test`` reports for one system."""
    out = run(["dp", "--tf", "test", "-m", str(model.resolve()), "-s", str(system.resolve())], cwd, log)
    figures = {}
    for key, label in (("energy_rmse_per_atom", r"Energy RMSE/Natoms"), ("force_rmse", r"Force  RMSE"),
                       ("virial_rmse_per_atom", r"Virial RMSE/Natoms")):
        found = re.search(label + r"\s*:\s*(\S+)", out)
        if found is None:
            raise RuntimeError(f"dp test printed no {label!r}:\n{out[-2000:]}")
        figures[key] = float(found.group(1))
    return figures


def train(work: Path, frames_dir: Path, steps: int, log: Path) -> dict:
    """Train, freeze and convert the small model in ``work``; return its input dict.

    The input names its data ``frames`` (a link to the frames being written), so
    the shipped ``input.json`` also runs as is from the example's directory.
    """
    config = training_input(steps, ["frames"])
    (work / "frames").symlink_to(frames_dir.resolve(), target_is_directory=True)
    (work / "input.json").write_text(json.dumps(config, indent=2) + "\n")
    run(["dp", "--tf", "train", "input.json"], work, log)
    run(["dp", "--tf", "freeze", "-o", "model.pb"], work, log)
    run(["dp", "convert-backend", "model.pb", "model.dp"], work, log)
    return config


def check_dp_file(model_dp: Path, model_pb: Path, frames: Frames, cell: np.ndarray, types: np.ndarray) -> float:
    """Largest |E_i(dp) - E_i(pb)| over all atomic energies: the converted ``.dp`` must reproduce the ``.pb``.

    deepmd-kit evaluates a ``.dp`` with its NumPy backend, which has no
    derivatives (its forces and virials are NaN), so the atomic energies are
    what can be compared; minidp's own cross-checks cover the forces.
    """
    from deepmd.infer import DeepPot

    cells = np.repeat(cell.reshape(1, 9), len(frames.energy), axis=0)
    ae_dp = DeepPot(str(model_dp)).eval(frames.coords, cells, types, atomic=True)[3]
    ae_pb = DeepPot(str(model_pb)).eval(frames.coords, cells, types, atomic=True)[3]
    err = float(np.abs(ae_dp - ae_pb).max())
    if not err < 1e-8:  # also catches NaN
        raise RuntimeError(f"model.dp and model.pb disagree: max |ΔE_i| = {err:.3g} eV, expected < 1e-8")
    print(f"  model.dp reproduces model.pb: max |ΔE_i| = {err:.1e} eV", flush=True)
    return err


README = """# The water example

A small se_e2_a water model (`model.dp`) and {nf} frames of 64 water molecules (`frames/`),
generated by the project itself so that README.md's main command runs without `../shared`:

```bash
minidp eval -m minidp/examples/water/model.dp -s minidp/examples/water/frames -o out/water-labelled
```

## How it was made

`validation/make_example.py` (regenerate with the command below, about {minutes:.0f} minutes on 2 cores):

1. **Box.** 64 rigid water molecules (O-H {r_oh} Å, H-O-H {angle}°) on a 4x4x4 grid in a cubic box of
   {box} Å (the density of deepmd-kit's water example), each randomly oriented (seed {seed}).
   Atoms: 64 O (type 0) then 128 H (type 1); type map `["O", "H"]`.
2. **Frames.** Velocity-Verlet MD (dt {dt} fs, masses O 15.999 / H 1.008 amu) driven by the reference
   model `../shared/models/water-14000.pb` through deepmd-kit's `DeepPot`: {relax} steepest-descent steps,
   {equil} steps of equilibration with a Berendsen thermostat at {T0:.0f} K (τ = {tau_e:g} fs), then one frame
   every {stride} steps ({every:g} fs, τ = {tau_s:g} fs). Frame temperature {tmean:.0f} ± {tstd:.0f} K.
   The first {nf} frames are shipped in `frames/` (deepmd/npy, float64, labelled with the reference
   model's energy, force and virial); the next {nheld} are held out from training (not shipped).
3. **Model.** `dp --tf train input.json` ({steps} steps, batch 1, exp learning rate 1e-3 → 1e-5),
   `dp --tf freeze`, `dp convert-backend model.pb model.dp`. `input.json` is the training input
   (it names its data `frames`, so it runs as is from this directory); `lcurve.out` is its learning curve.

## How good the small model is (`dp test`, against the reference model's labels)

| frames | energy RMSE/atom (eV) | force RMSE (eV/Å) | virial RMSE/atom (eV) |
| --- | --- | --- | --- |
| `frames/` ({nf}, trained on) | {train[energy_rmse_per_atom]:.2e} | {train[force_rmse]:.3f} | {train[virial_rmse_per_atom]:.2e} |
| held out ({nheld}) | {held[energy_rmse_per_atom]:.2e} | {held[force_rmse]:.3f} | {held[virial_rmse_per_atom]:.2e} |

It is a tiny model trained for minutes on {nf} correlated frames: good for exercising and
cross-checking minidp, not for physics.

## Regenerate

```bash
pip install -e ".[ref]"   # deepmd-kit 3.2 with its TensorFlow backend
OMP_NUM_THREADS=2 python validation/make_example.py --shared ../shared --out minidp/examples/water
```

The box and the MD are deterministic (fixed seeds); TensorFlow's training is seeded but not
guaranteed bit-for-bit reproducible, so a regenerated `model.dp` differs in the last digits.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=Path("../shared"), help="folder holding models/water-14000.pb")
    p.add_argument("--out", type=Path, default=Path("minidp/examples/water"), help="the example's folder (replaced)")
    p.add_argument("--frames", type=int, default=60, help="frames shipped (and trained on)")
    p.add_argument("--held-out", type=int, default=20, help="further frames kept for testing only (not shipped)")
    p.add_argument("--stride", type=int, default=20, help="MD steps between frames")
    p.add_argument("--equil", type=int, default=600, help="MD steps of equilibration")
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--engine", choices=["deepmd", "minidp"], default="deepmd", help="who evaluates the MD's forces")
    p.add_argument("--seed", type=int, default=2024, help="seed of the orientations and velocities")
    args = p.parse_args(argv)
    for name in ("frames", "held_out", "stride", "equil", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def make_frames(args: argparse.Namespace) -> tuple[Frames, np.ndarray, np.ndarray]:
    """The box, and its MD frames (shipped ones first, then the held-out ones)."""
    reference = args.shared / "models" / "water-14000.pb"
    if not reference.is_file():
        raise SystemExit(f"reference model {reference} not found: pass --shared <folder holding models/>")
    x, cell, types = water_box(seed=args.seed)
    force = make_force_fn(reference, args.engine)
    nframes = args.frames + args.held_out
    print(f"MD with {reference} ({args.engine}): {RELAX_STEPS} relaxation + {args.equil} + "
          f"{nframes * args.stride} steps", flush=True)
    t0 = time.perf_counter()
    frames = sample(x, cell, types, force, nframes=nframes, stride=args.stride, equil=args.equil, seed=args.seed)
    print(f"  {time.perf_counter() - t0:.0f} s, T = {frames.temperature.mean():.0f} "
          f"± {frames.temperature.std():.0f} K", flush=True)
    return frames, cell, types


def build_example(out: Path, work: Path, args, frames: Frames, cell, types) -> dict:
    """Write the frames, train and test the model in ``work``, write the shipped files into ``out``."""
    shipped = Frames(*(a[: args.frames] for a in frames))
    held = Frames(*(a[args.frames:] for a in frames))
    write_frames(out / "frames", shipped, cell, types)
    write_frames(work / "heldout", held, cell, types)
    log = work / "log.txt"
    config = train(work, out / "frames", args.steps, log)
    check_dp_file(work / "model.dp", work / "model.pb", frames, cell, types)
    figures = {"train": dp_test(work / "model.pb", out / "frames", work, log),
               "held": dp_test(work / "model.pb", work / "heldout", work, log)}
    shutil.copy(work / "model.dp", out / "model.dp")
    shutil.copy(work / "lcurve.out", out / "lcurve.out")
    (out / "input.json").write_text(json.dumps(config, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    from minidp.io.outputs import atomic_path

    args = parse_args(argv)
    t0 = time.perf_counter()
    frames, cell, types = make_frames(args)
    with atomic_path(args.out) as out, tempfile.TemporaryDirectory(prefix="make_example.") as scratch:
        out.mkdir()
        figures = build_example(out, Path(scratch), args, frames, cell, types)
        (out / "README.md").write_text(README.format(
            nf=args.frames, nheld=args.held_out, minutes=max((time.perf_counter() - t0) / 60, 1), r_oh=R_OH,
            angle=ANGLE_HOH, box=BOX, seed=args.seed, dt=DT, relax=RELAX_STEPS, equil=args.equil, T0=T0,
            stride=args.stride, every=DT * args.stride, tau_e=TAU_EQUIL, tau_s=TAU_SAMPLE, tmean=frames.temperature.mean(),
            tstd=frames.temperature.std(), steps=args.steps, **figures))
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"  {path} {path.stat().st_size / 1024:.1f} KiB")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
