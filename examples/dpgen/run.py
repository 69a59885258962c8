"""One DP-GEN exploration task run by ``minidp lammps``: the deck DP-GEN writes, unchanged.

    python examples/dpgen/run.py [--out dpgen-example] [--steps 200] [--ensemble npt|nvt] [--models 4]

What DP-GEN's model_devi step does, in miniature:

1. Models: DP-GEN trains 4 models that differ in their seeds and links them as graph.000.pb ...
   into the iteration's 01.model_devi/ folder. Here: the shipped water model (minidp/examples/water)
   and copies of it whose fitting-net weights carry a small random perturbation (seed k for copy k),
   written as OUT/graph.00K.dp (minidp reads deepmd-kit's .dp directly, and DP-GEN's .pb through
   deepmd-kit's converter).
2. A task folder OUT/task.000.000000/ as DP-GEN makes one: conf.lmp (the example's first frame),
   an empty traj/ for the dumps, and input.lammps from input.lammps.template (next to this
   script, in the layout of DP-GEN's generated deck), its V_ keys replaced as DP-GEN's
   revise_by_keys replaces a user template's.
3. The command DP-GEN runs in the task folder: ``{command} -i input.lammps -v restart 0`` with
   the machine.json command ``minidp lammps`` (README.md here): LAMMPS runs the deck, and
   ``pair_style deepmd graph.000.dp ... out_freq 10 out_file model_devi.out`` writes the model
   deviation every 10 steps in deepmd-kit's plugin format.
4. DP-GEN's selection: each frame of model_devi.out is accurate (max_devi_f < trust_lo),
   a candidate for labelling, or failed (max_devi_f >= trust_hi).

About 10 s for 200 steps of the 192-atom box on one core.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from minidp.io.serialization import load_model, save_model

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parents[1] / "minidp" / "examples" / "water"
ENSEMBLES = {  # the fix line DP-GEN writes for each ensemble
    "npt": "fix             1 all npt temp ${TEMP} ${TEMP} ${TAU_T} iso ${PRES} ${PRES} ${TAU_P}",
    "nvt": "fix             1 all nvt temp ${TEMP} ${TEMP} ${TAU_T}",
}


def write_models(out: Path, n: int, scale: float) -> list[str]:
    """The shipped model and n - 1 perturbed copies: fitting weights W -> W (1 + scale g), g ~ N(0, 1)."""
    names = []
    for k in range(n):
        model = load_model(SHIPPED / "model.dp")
        rng = np.random.default_rng(k)
        for net in model.fitting if k else ():
            for layer in net.layers:
                layer.W = layer.W * (1 + scale * rng.standard_normal(layer.W.shape))
        save_model(out / f"graph.{k:03d}.dp", model)
        names.append(f"../graph.{k:03d}.dp")
    return names


def write_conf(frames: Path, path: Path) -> None:
    """The first frame as a LAMMPS data file (atomic style; DP-GEN's deck sets the masses itself)."""
    types = np.loadtxt(frames / "type.raw", dtype=int)
    x = np.load(frames / "set.000" / "coord.npy")[0].reshape(-1, 3)
    cell = np.load(frames / "set.000" / "box.npy")[0].reshape(3, 3)
    if np.any(np.triu(cell, 1)):
        raise ValueError(f"{frames}: the cell must be lower triangular (LAMMPS's restricted triclinic form)")
    lines = [f"{frames}, frame 0", "", f"{len(types)} atoms", f"{types.max() + 1} atom types",
             f"0 {cell[0, 0]:.10f} xlo xhi", f"0 {cell[1, 1]:.10f} ylo yhi", f"0 {cell[2, 2]:.10f} zlo zhi",
             f"{cell[1, 0]:.10f} {cell[2, 0]:.10f} {cell[2, 1]:.10f} xy xz yz", "", "Atoms # atomic", ""]
    lines += [f"{i + 1} {t + 1} {a:.10f} {b:.10f} {c:.10f}" for i, (t, (a, b, c)) in enumerate(zip(types, x))]
    path.write_text("\n".join(lines) + "\n")


def write_deck(task: Path, keys: dict[str, str]) -> None:
    """input.lammps: the template with each V_ key replaced (longest first, so no key eats another)."""
    text = (HERE / "input.lammps.template").read_text()
    for key in sorted(keys, key=len, reverse=True):
        text = text.replace(key, keys[key])
    (task / "input.lammps").write_text(text)


def select(devi: Path, lo: float, hi: float) -> tuple[int, int, int]:
    """DP-GEN's sorting of the frames by max_devi_f (column 4): (accurate, candidate, failed)."""
    max_devi_f = np.loadtxt(devi, ndmin=2)[:, 4]
    return int((max_devi_f < lo).sum()), int(((max_devi_f >= lo) & (max_devi_f < hi)).sum()), int((max_devi_f >= hi).sum())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("dpgen-example"), help="a new folder")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ensemble", choices=sorted(ENSEMBLES), default="npt")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.05, help="relative perturbation of the copies' fitting weights")
    p.add_argument("--trust", type=float, nargs=2, default=(0.05, 0.15), metavar=("LO", "HI"),
                   help="DP-GEN's model_devi_f_trust_lo and _hi (eV/A)")
    p.add_argument("--command", default=f"{shlex.quote(sys.executable)} -m minidp lammps",
                   help="machine.json's model_devi command (default: this Python's minidp lammps)")
    args = p.parse_args()

    task = args.out / "task.000.000000"
    (task / "traj").mkdir(parents=True)  # refuses an existing --out: DP-GEN's tasks are new folders too
    models = write_models(args.out, args.models, args.scale)
    write_conf(SHIPPED / "frames", task / "conf.lmp")
    write_deck(task, {"V_NSTEPS": str(args.steps), "V_TRJ_FREQ": "10", "V_TEMP": "330.000000",
                      "V_PRES": "1.000000", "V_MODELS": " ".join(models), "V_SEED": "123457",
                      "V_ENSEMBLE": ENSEMBLES[args.ensemble]})
    command = shlex.split(args.command) + ["-i", "input.lammps", "-v", "restart", "0"]
    print("in", task, ":", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=task, stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        return done.returncode
    accurate, candidate, failed = select(task / "model_devi.out", *args.trust)
    print((task / "model_devi.out").read_text(), end="")
    print(f"{accurate + candidate + failed} frames: {accurate} accurate, {candidate} candidates, {failed} failed "
          f"(max_devi_f trust levels {args.trust[0]}-{args.trust[1]} eV/A); "
          f"{len(list((task / 'traj').iterdir()))} dumps in traj/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
