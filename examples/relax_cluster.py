"""Relax a distorted water cluster three ways: the tutorial's plain gradient descent, FIRE and BFGS.

    python examples/relax_cluster.py [--model M] [--frames F] [--out out/relax]

A cluster of the water molecules nearest the box centre is cut out (open
boundaries), every atom is displaced by up to 0.15 A, and the three
optimizers run until the largest force is below --fmax. Plain gradient
descent moves every atom by lr * F: it needs a step small enough for the stiff
O-H bonds, so it crawls along the soft intermolecular directions; FIRE and
BFGS adapt. Prints the steps each needed and plots max |F| against the step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _water import default_frames, default_model, water_box


def water_cluster(frames: Path, n_molecules: int, seed: int):
    """The n_molecules molecules whose O is nearest the box centre, distorted, without PBC."""
    box = water_box(frames)
    box.wrap()
    pos = box.positions
    O = np.flatnonzero(np.array(box.get_chemical_symbols()) == "O")
    H = np.flatnonzero(np.array(box.get_chemical_symbols()) == "H")
    centre = box.cell.sum(axis=0) / 2
    keep_O = O[np.argsort(np.linalg.norm(pos[O] - centre, axis=1))[:n_molecules]]
    # each O's two nearest H (minimum image) form its molecule
    keep = list(keep_O)
    for o in keep_O:
        d = box.get_distances(o, H, mic=True, vector=True)
        near = np.argsort(np.linalg.norm(d, axis=1))[:2]
        for h, v in zip(H[near], d[near]):
            box.positions[h] = pos[o] + v  # unwrap the H next to its O
            keep.append(h)
    cluster = box[keep]
    cluster.pbc = False
    cluster.cell = None
    rng = np.random.default_rng(seed)
    cluster.positions += rng.uniform(-0.15, 0.15, cluster.positions.shape)
    return cluster


def relax_gradient_descent(atoms, fmax: float, lr: float, max_steps: int) -> list[float]:
    """x <- x + lr F (the tutorial's loop, on all coordinates); returns max |F| per step."""
    from minidp.optim import gradient_descent_1d

    history = []

    def grad(x):
        atoms.positions = x.reshape(-1, 3)
        f = atoms.get_forces()
        history.append(float(np.abs(f).max()))
        return -f.ravel()

    # |x_n - x_{n-1}| = lr max|F|: stopping at lr * fmax means max|F| < fmax
    gradient_descent_1d(grad, atoms.positions.ravel(), lr, threshold=lr * fmax, max_iter=max_steps)
    return history


def relax_ase(atoms, optimizer, fmax: float, max_steps: int) -> list[float]:
    history = []
    opt = optimizer(atoms, logfile=None)
    opt.attach(lambda: history.append(float(np.abs(atoms.get_forces()).max())))
    opt.run(fmax=fmax, steps=max_steps)
    return history


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.optimize import BFGS, FIRE

    from minidp.md.calculator import MiniDPCalculator
    from minidp.io.figures import save_figure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--frames", type=Path, default=None)
    p.add_argument("--molecules", type=int, default=8)
    p.add_argument("--fmax", type=float, default=0.05, help="eV/A")
    p.add_argument("--lr", type=float, default=0.01, help="plain gradient descent step (A^2/eV)")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--out", type=Path, default=Path("out/relax"))
    args = p.parse_args()

    calc = MiniDPCalculator(str(args.model or default_model()))
    start = water_cluster(args.frames or default_frames(), args.molecules, seed=0)
    runs = {}
    for name in ("gradient descent", "FIRE", "BFGS"):
        atoms = start.copy()
        atoms.calc = calc
        e0 = atoms.get_potential_energy()
        if name == "gradient descent":
            runs[name] = relax_gradient_descent(atoms, args.fmax, args.lr, args.max_steps)
        else:
            runs[name] = relax_ase(atoms, FIRE if name == "FIRE" else BFGS, args.fmax, args.max_steps)
        print(f"{name:<17} {len(runs[name]):5d} force evaluations, E {e0:.4f} -> "
              f"{atoms.get_potential_energy():.4f} eV, max|F| {np.abs(atoms.get_forces()).max():.4f} eV/A")

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in runs.items():
        ax.semilogy(history, label=f"{name} ({len(history)})")
    ax.axhline(args.fmax, color="k", lw=0.5, ls="--")
    ax.set(xlabel="step", ylabel="max |F| (eV/A)", title=f"relaxing {args.molecules} water molecules")
    ax.legend()
    print(f"wrote {save_figure(fig, args.out / 'relax.png')}")


if __name__ == "__main__":
    main()
