"""minidp train against dp train on the same input: learning curves, final errors, seconds per step.

    python -m validation.train_compare                 # 2000 steps each, ../shared beside the clone
    python -m validation.train_compare --steps 4000 --out out/train-compare

Both programs read the same input (../shared/models/input.json with numb_steps, disp_freq and
save_freq replaced and the systems made absolute): training on data_0..2, validating on data_3.
Both run one after the other on the same machine with the same thread settings. Afterwards both
final models are evaluated on every frame of data_3 by the same code (deepmd-kit's model frozen to
.pb and run by deepmd-kit's DeepPot; minidp's by minidp's), so the two RMSEs are comparable.

Writes to --out: summary.json, summary.md, lcurves.png (both learning curves), and each run's
folder (deepmd/, minidp/) with its lcurve.out, log and model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def make_input(base: Path, steps: int, disp_freq: int, seed: int | None = None) -> dict:
    """The shared water input with this run's length, absolute system paths and (optionally) other seeds."""
    d = json.loads((base / "models" / "input.json").read_text())
    tr = d["training"]
    if seed is not None:
        # the initial weights of both nets and the order of the batches
        d["model"]["descriptor"]["seed"] = d["model"]["fitting_net"]["seed"] = seed
        tr["seed"] = seed + 1
    tr["training_data"]["systems"] = [str(base / "data" / "water" / f"data_{i}") for i in range(3)]
    tr["validation_data"]["systems"] = [str(base / "data" / "water" / "data_3")]
    tr.update(numb_steps=steps, disp_freq=disp_freq, save_freq=steps)
    return d


def run_deepmd(work: Path, env: dict) -> dict:
    """dp --tf train, then freeze; its own 'average training time' and the whole command's wall time."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(work / "train.log", "w") as log:
        subprocess.run(["dp", "--tf", "train", "input.json"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    wall = time.perf_counter() - t0
    subprocess.run(["dp", "--tf", "freeze", "-o", "model.pb"], cwd=work, env=env, capture_output=True, check=True)
    seconds = average_training_time((work / "train.log").read_text())
    return {"seconds_per_step": float("nan") if seconds is None else seconds, "wall_seconds": wall}


def average_training_time(log: str) -> float | None:
    """Seconds per step of a ``dp train`` run (TensorFlow or PyTorch backend), from its log: deepmd-kit's
    "average training time: X s/batch", which leaves out the first display interval (the warm-up) when the
    run had at least two. None when the log has no such line (a run shorter than disp_freq, or a failed one)."""
    m = re.search(r"average training time: ([0-9.]+) s/batch", log)
    return float(m.group(1)) if m else None


def run_minidp(work: Path, config) -> tuple[dict, object]:
    """minidp's train in this process; mean step time after the first 100 steps (deepmd-kit's rule)."""
    from minidp.training.loop import train

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = train(config, work / "model.dp", work, progress=True)
    wall = time.perf_counter() - t0
    steps = result.step_seconds
    skip = 100 if steps.size > 200 else 0
    return {"seconds_per_step": float(np.mean(steps[skip:])), "median_seconds_per_step": float(np.median(steps)),
            "wall_seconds": wall}, result.model


def final_errors(predict, system) -> dict:
    """RMSE of energy per atom and forces over every frame of a labelled system."""
    from minidp.io.figures import rmse_mae

    e, f, _ = predict(system.coords, system.cells, system.atom_types)
    n = system.atom_types.size
    return {"rmse_e_per_atom": rmse_mae(np.ravel(e) / n, system.energy / n)[0],
            "rmse_f": rmse_mae(np.reshape(f, system.force.shape), system.force)[0]}


def summarize(s: dict) -> str:
    d, m = s["deepmd-kit"], s["minidp"]
    rows = [
        f"# minidp train vs dp train: {s['steps']} steps, water (train data_0..2, validate on all of data_3)",
        "",
        "| | deepmd-kit (TF) | minidp | minidp / deepmd-kit |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (("rmse_f", "force RMSE (eV/Å)"), ("rmse_e_per_atom", "energy RMSE (eV/atom)"),
                       ("seconds_per_step", "seconds per step"), ("wall_seconds", "wall time of the run (s)")):
        rows.append(f"| {label} | {d[key]:.4g} | {m[key]:.4g} | {m[key] / d[key]:.3f} |")
    rows += ["", f"Machine: {s['machine']}. Learning curves: lcurves.png."]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder with models/input.json and data/water")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of both runs (default 2000)")
    ap.add_argument("--disp-freq", type=int, default=100, help="steps between lcurve lines (default 100)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "train-compare")
    ap.add_argument("--seed", type=int, default=None, help="other seeds for both programs (default: the input's)")
    ap.add_argument("--skip-deepmd", action="store_true", help="reuse the deepmd-kit run already in --out")
    args = ap.parse_args(argv)
    if not (args.shared / "models" / "input.json").is_file():
        print(f"train_compare: {args.shared}/models/input.json not found", file=sys.stderr)
        return 2
    from minidp.training.sampling import load_systems
    from minidp.training.config import parse_input
    from minidp.training.lcurve import plot_lcurves

    d = make_input(args.shared.resolve(), args.steps, args.disp_freq, args.seed)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               TF_INTRA_OP_PARALLELISM_THREADS="2", TF_INTER_OP_PARALLELISM_THREADS="1")
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS",)})
    summary = {"steps": args.steps, "seed": args.seed, "machine": f"{os.cpu_count()} cores, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"}
    (args.out / "deepmd").mkdir(parents=True, exist_ok=True)
    (args.out / "deepmd" / "input.json").write_text(json.dumps(d, indent=1))
    if args.skip_deepmd:
        summary["deepmd-kit"] = json.loads((args.out / "summary.json").read_text())["deepmd-kit"]
    else:
        print("dp train ...", flush=True)
        summary["deepmd-kit"] = run_deepmd(args.out / "deepmd", env)
    print("minidp train ...", flush=True)
    summary["minidp"], model = run_minidp(args.out / "minidp", parse_input(d))

    from deepmd.infer import DeepPot as DeepmdPot

    from minidp import DeepPot

    val = load_systems([args.shared / "data" / "water" / "data_3"], ["O", "H"])[0]
    summary["deepmd-kit"].update(final_errors(DeepmdPot(str(args.out / "deepmd" / "model.pb")).eval, val))
    summary["minidp"].update(final_errors(DeepPot(model).eval, val))
    plot_lcurves({"deepmd-kit": args.out / "deepmd" / "lcurve.out", "minidp": args.out / "minidp" / "lcurve.out"},
                 args.out / "lcurves.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(summarize(summary))
    print(summarize(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
