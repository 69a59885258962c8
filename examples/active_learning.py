"""One round of active learning, DP-GEN style: train an ensemble, explore with MD, pick candidates.

    python examples/active_learning.py [--steps 400] [--md-steps 200] [--temperature 600] [--out out/al]

1. **Train** 4 short models on the shipped water frames (minidp/examples/water),
   the same input with different seeds (descriptor, fitting and batch order).
2. **Explore**: Langevin MD of the water box at a higher temperature than the
   data (ASE, minidp's calculator, model 0), one frame every ``--every`` steps,
   written as a deepmd/npy system.
3. **Model deviation** of the 4 models on those frames: ``model_devi.out``, as
   ``dp model-devi`` (and ``minidp model-devi``) write it.
4. **Select** as DP-GEN does with max_devi_f and two trust levels lo < hi:
   accurate below lo (the ensemble agrees: nothing to learn), candidate in
   [lo, hi) (to be labelled by DFT and added to the training data), failed at
   hi and above (too far from the data to trust even the configuration).
5. **Plot** the distribution of max_devi_f with the trust levels marked (PNG).

The defaults take a few minutes on 2 cores; the models are short-trained, so
the deviations are large: the trust levels are set from them by default (the
25th and 75th percentiles) unless ``--lo`` / ``--hi`` are given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "minidp" / "examples" / "water"


def train_ensemble(out: Path, steps: int, n: int = 4) -> list[Path]:
    """n models from the shipped input, seeds 1..n, each trained ``steps`` steps (cached)."""
    from minidp.training.config import read_input, with_numb_steps
    from minidp.training.loop import train

    base = read_input(SHIPPED / "input.json")
    paths = []
    for k in range(n):
        path = out / f"graph.{k:03d}.dp"
        if not path.exists():
            from dataclasses import replace

            config = replace(with_numb_steps(base, steps), model_seed=k + 1, seed=100 + k, disp_freq=max(1, steps // 4),
                             save_freq=steps)
            train(config, path, out / f"train.{k:03d}", progress=False)
        paths.append(path)
    return paths


def explore(model: Path, target: Path, md_steps: int, every: int, temperature: float) -> Path:
    """Langevin MD of the first shipped frame at ``temperature`` K; every ``every`` steps a frame (deepmd/npy)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from minidp.md.calculator import MiniDPCalculator
    from minidp.io.outputs import atomic_path

    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from _water import water_box

    atoms = water_box(SHIPPED / "frames")
    atoms.calc = MiniDPCalculator(str(model))
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02,
                   fixcm=False, rng=np.random.default_rng(1))
    coords, cells = [], []
    dyn.attach(lambda: (coords.append(atoms.get_positions()), cells.append(atoms.get_cell()[:])), interval=every)
    dyn.run(md_steps)
    with atomic_path(target) as tmp:
        (tmp / "set.000").mkdir(parents=True)
        np.save(tmp / "set.000" / "coord.npy", np.array(coords).reshape(len(coords), -1))
        np.save(tmp / "set.000" / "box.npy", np.array(cells).reshape(len(cells), 9))
        for name in ("type.raw", "type_map.raw"):
            (tmp / name).write_text((SHIPPED / "frames" / name).read_text())
    return target


def select(max_devi_f: np.ndarray, lo: float, hi: float) -> dict[str, np.ndarray]:
    """DP-GEN's three classes by max_devi_f: accurate (< lo), candidate ([lo, hi)), failed (>= hi)."""
    if not lo < hi:
        raise ValueError(f"the trust levels must satisfy lo < hi, got lo = {lo}, hi = {hi}")
    return {"accurate": np.flatnonzero(max_devi_f < lo),
            "candidate": np.flatnonzero((max_devi_f >= lo) & (max_devi_f < hi)),
            "failed": np.flatnonzero(max_devi_f >= hi)}


def plot(max_devi_f: np.ndarray, lo: float, hi: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidp.io.figures import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(max_devi_f, bins=30, color="0.6")
    for x, name, color in ((lo, "lo", "tab:green"), (hi, "hi", "tab:red")):
        ax.axvline(x, color=color, ls="--", label=f"trust level {name} = {x:.3g} eV/Å")
    ax.set(xlabel="max_devi_f (eV/Å)", ylabel="frames", title="Model deviation of the explored frames")
    ax.legend()
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--md-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=5, help="MD steps between explored frames")
    p.add_argument("--temperature", type=float, default=600.0, help="K")
    p.add_argument("--lo", type=float, default=None, help="trust level lo (eV/Å)")
    p.add_argument("--hi", type=float, default=None, help="trust level hi (eV/Å)")
    p.add_argument("--out", type=Path, default=Path("out/active-learning"))
    args = p.parse_args(argv)

    from minidp.active.model_devi import Ensemble, system_deviations, write_model_devi

    args.out.mkdir(parents=True, exist_ok=True)
    models = train_ensemble(args.out, args.steps)
    system = explore(models[0], args.out / "explored", args.md_steps, args.every, args.temperature)
    steps, devi = system_deviations(Ensemble(models), str(system), frequency=args.every)
    (args.out / "model_devi.out").unlink(missing_ok=True)
    write_model_devi(args.out / "model_devi.out", [(str(system), steps, devi)])
    max_devi_f = devi[:, 3]
    lo = args.lo if args.lo is not None else float(np.percentile(max_devi_f, 25))
    hi = args.hi if args.hi is not None else float(np.percentile(max_devi_f, 75))
    classes = select(max_devi_f, lo, hi)
    summary = {name: steps[idx].tolist() for name, idx in classes.items()}
    (args.out / "candidates.json").write_text(json.dumps({"lo": lo, "hi": hi, **summary}, indent=1))
    print(f"{len(steps)} frames: " + ", ".join(f"{len(v)} {k}" for k, v in summary.items())
          + f" (lo {lo:.3g}, hi {hi:.3g} eV/Å); candidate steps -> {args.out / 'candidates.json'}")
    print(f"wrote {args.out / 'model_devi.out'} and {plot(max_devi_f, lo, hi, args.out / 'max_devi_f.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
