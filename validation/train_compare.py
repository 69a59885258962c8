"""minidp train against dp train on the same input: final errors over seeds, learning curves, seconds per step.

    python -m validation.train_compare                        # water, 2000 steps, the input's seeds
    python -m validation.train_compare --seeds 1 2 3 --dp-seeds 1 --out out/water-float64
    python -m validation.train_compare --precision float32 --seeds 1 2 3 --out out/water-float32
    python -m validation.train_compare --input ex/fparam/train/input.json --out out/fparam
    python -m validation.train_compare --collect out/water-float64 out/water-float32   # one table of both

Both programs read the same input (--input, default ../shared/models/input.json) with numb_steps,
disp_freq and save_freq replaced, the systems made absolute (relative ones are taken from the input's
folder), and with --precision the precision of the descriptor and the fitting net. --seeds S runs
minidp once per seed with seed S for both nets' initial weights and S + 1 for the batch order;
--dp-seeds (default: the first seed) does the same for dp train. Every run is one after the other on
the same machine with the same thread settings (OMP_NUM_THREADS, also given to TensorFlow). Then every
final model is evaluated on every frame of the validation systems (the training systems when the input
has none) by the same code (deepmd-kit's model frozen to .pb and run by deepmd-kit's DeepPot; minidp's
by minidp's), so all RMSEs are comparable; each program's mean and min-max over its seeds are reported.

An input minidp cannot train is refused in one line before anything runs. A run folder whose run.json
holds the same input is reused (delete it to train again). Writes to --out: summary.json, summary.md,
lcurves.png, and one folder per run (deepmd-s1/, minidp-s1/, ...) with its input, lcurve.out, log,
model and run.json. Seconds per step are those of this machine at the time, with its load: not a benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PROGRAMS = ("deepmd-kit", "minidp")
ERRORS = ("rmse_e_per_atom", "rmse_f")


def _absolute(systems, base: Path):
    """A data section's systems (one path or a list) made absolute, relative ones taken from base."""
    if isinstance(systems, str):
        return str((base / systems).resolve())
    return [str((base / s).resolve()) for s in systems]


def make_input(path: Path, steps: int, disp_freq: int, seed: int | None = None, precision: str | None = None) -> dict:
    """The input at path with this run's length, absolute system paths, (optionally) other seeds and precision."""
    d = json.loads(path.read_text())
    model, tr = d["model"], d["training"]
    if seed is not None:
        # the initial weights of both nets and the order of the batches
        model["descriptor"]["seed"] = model["fitting_net"]["seed"] = seed
        tr["seed"] = seed + 1
    if precision is not None:
        model["descriptor"]["precision"] = model["fitting_net"]["precision"] = precision
    for key in ("training_data", "validation_data"):
        if key in tr:
            tr[key]["systems"] = _absolute(tr[key]["systems"], path.parent)
    for key in ("stop_batch", "numb_epoch"):  # other ways to say the run's length: numb_steps replaces them
        tr.pop(key, None)
    tr.update(numb_steps=steps, disp_freq=disp_freq, save_freq=steps)
    return d


def thread_env(threads: int) -> dict:
    """The environment of every run: `threads` for OpenMP, Numba and TensorFlow's intra-op pool, 1 inter-op."""
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", n),
                TF_INTRA_OP_PARALLELISM_THREADS=n, TF_INTER_OP_PARALLELISM_THREADS="1",
                DP_INTRA_OP_PARALLELISM_THREADS=n, DP_INTER_OP_PARALLELISM_THREADS="1")


def run_deepmd(work: Path, env: dict) -> dict:
    """dp --tf train, then freeze; its own 'average training time' and the whole command's wall time."""
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


def run_minidp(work: Path, d: dict) -> dict:
    """minidp's train in this process; mean step time after the first 100 steps (deepmd-kit's rule)."""
    # imported here, once main has put the thread settings in os.environ (Numba reads them at import)
    from minidp.training.config import parse_input
    from minidp.training.loop import train

    t0 = time.perf_counter()
    result = train(parse_input(d), work / "model.dp", work, progress=True)
    wall = time.perf_counter() - t0
    steps = result.step_seconds
    skip = 100 if steps.size > 200 else 0
    return {"seconds_per_step": float(np.mean(steps[skip:])), "median_seconds_per_step": float(np.median(steps)),
            "wall_seconds": wall}


def run_once(program: str, work: Path, d: dict, env: dict) -> dict:
    """One training run in work (its timings), or the one already there if its run.json holds the same input."""
    record = work / "run.json"
    if record.is_file() and json.loads(record.read_text()).get("input") == d:
        print(f"{program}: reusing {work}", flush=True)
        return json.loads(record.read_text())["timing"]
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(d, indent=1))
    print(f"{program} train in {work} ...", flush=True)
    timing = run_deepmd(work, env) if program == "deepmd-kit" else run_minidp(work, d)
    # written last: a run interrupted before here is trained again
    record.write_text(json.dumps({"input": d, "timing": timing}, indent=1))
    return timing


def eval_systems(d: dict) -> list:
    """The systems the final models are scored on: the input's validation systems, else its training ones."""
    from minidp.training.config import parse_input
    from minidp.training.sampling import load_systems

    config = parse_input(d)
    data = config.validation if config.validation is not None else config.training
    numb_fparam = d["model"]["fitting_net"].get("numb_fparam", 0)
    return load_systems(data.systems, list(config.type_map), numb_fparam=numb_fparam)


def final_errors(predict, systems) -> dict:
    """RMSE of the energy per atom and of the force components over every frame of the labelled systems."""
    from minidp.io.figures import rmse_mae

    e_per_atom, e_label, f, f_label = [], [], [], []
    for system in systems:
        extra = {} if system.fparam is None else {"fparam": system.fparam}
        # (nf, 1), (nf, nloc, 3)
        e, force, _ = predict(system.coords, system.cells, system.atom_types, **extra)
        n = system.atom_types.size
        e_per_atom.append(np.ravel(e) / n), e_label.append(system.energy / n)
        f.append(np.ravel(force)), f_label.append(np.ravel(system.force))
    return {"rmse_e_per_atom": rmse_mae(np.concatenate(e_per_atom), np.concatenate(e_label))[0],
            "rmse_f": rmse_mae(np.concatenate(f), np.concatenate(f_label))[0]}


def spread(runs: dict) -> dict:
    """Mean, min and max over the seeds of each final error: {error: {"mean", "min", "max"}}."""
    out = {}
    for key in ERRORS:
        # (nseeds,)
        values = np.array([r[key] for r in runs.values()])
        out[key] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    return out


def machine(threads: int) -> dict:
    """Where and when: CPU model, cores, load average, thread settings, UTC date."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "threads": (f"OMP_NUM_THREADS={threads}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', threads)}, "
                        f"TensorFlow intra-op {threads} and inter-op 1"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _cell(s: dict, scale: float) -> str:
    """mean [min-max] of one error, scaled (to meV); the value alone for one seed."""
    if s["min"] == s["max"]:
        return f"{s['mean'] * scale:.4g}"
    return f"{s['mean'] * scale:.4g} [{s['min'] * scale:.4g}-{s['max'] * scale:.4g}]"


def _case(s: dict) -> str:
    return f"{Path(s['input']).parent.name}/{Path(s['input']).name}, {s['precision']}, {s['steps']} steps"


def _machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']}; load average {m['load_average']} at the start; "
            f"{m['date']}")


def _stats_rows(s: dict, case: str = "") -> list[str]:
    """One table row per program of a summary: its seeds and its errors' mean [min-max], in meV."""
    rows = []
    for program in PROGRAMS:
        if s["runs"].get(program):
            st = s["stats"][program]
            rows.append(f"| {case}{program} | {', '.join(s['runs'][program])} | "
                        f"{_cell(st['rmse_e_per_atom'], 1e3)} | {_cell(st['rmse_f'], 1e3)} |")
    return rows


STATS_HEADER = "program | seeds | energy RMSE (meV/atom) | force RMSE (meV/Å) |"
RUNS_HEADER = ("| program | seed | energy RMSE (meV/atom) | force RMSE (meV/Å) "
               "| s/step (loaded machine, not a benchmark) |")


def summarize(s: dict) -> str:
    """summary.md: each program's final errors over its seeds, then every run."""
    rows = [f"# minidp train vs dp train: {_case(s)}", "",
            f"Final errors on every frame of {', '.join(s['evaluated_on'])}; mean [min-max] over the seeds.", "",
            f"| {STATS_HEADER}", "| --- | --- | --- | --- |", *_stats_rows(s), "", RUNS_HEADER,
            "| --- | --- | --- | --- | --- |"]
    for program in PROGRAMS:
        for seed, r in s["runs"].get(program, {}).items():
            rows.append(f"| {program} | {seed} | {r['rmse_e_per_atom'] * 1e3:.4g} | {r['rmse_f'] * 1e3:.4g} | "
                        f"{r['seconds_per_step']:.3g} |")
    rows += ["", f"Machine: {_machine_line(s['machine'])}. Learning curves: lcurves.png."]
    return "\n".join(rows) + "\n"


def collect(summaries: list[dict]) -> str:
    """One markdown table of several summaries: a row per input and program, mean [min-max] over the seeds."""
    rows = [f"| case | {STATS_HEADER}", "| --- | --- | --- | --- | --- |"]
    for s in summaries:
        rows += _stats_rows(s, f"{_case(s)} | ")
    rows += [""] + [f"- {_case(s)}: {_machine_line(s['machine'])}" for s in summaries]
    return "\n".join(rows) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder with models/input.json (the default --input)")
    ap.add_argument("--input", type=Path, default=None, help="deepmd-kit input (default: SHARED/models/input.json)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of every run (default 2000)")
    ap.add_argument("--disp-freq", type=int, default=100, help="steps between lcurve lines (default 100)")
    ap.add_argument("--precision", choices=("float64", "float32"), default=None,
                    help="precision of the descriptor and the fitting net (default: the input's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="minidp's seeds (default: the input's)")
    ap.add_argument("--dp-seeds", type=int, nargs="*", default=None,
                    help="dp train's seeds (default: the first of --seeds; none: no dp run)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "train-compare")
    ap.add_argument("--collect", type=Path, nargs="+", default=None,
                    help="print one table of these --out folders' summary.json and stop")
    args = ap.parse_args(argv)
    args.input = args.input if args.input is not None else args.shared / "models" / "input.json"
    args.seeds = args.seeds if args.seeds is not None else [None]
    args.dp_seeds = args.dp_seeds if args.dp_seeds is not None else args.seeds[:1]
    return args


def check_trainable(d: dict) -> str | None:
    """None if minidp can train the input, else parse_input's one-line reason."""
    from minidp.training.config import parse_input

    try:
        parse_input(d)
    except ValueError as err:
        return str(err)
    return None


def train_all(args, env: dict) -> dict:
    """Every run (dp's seeds then minidp's), each program's final errors per seed and their spread."""
    from deepmd.infer import DeepPot as DeepmdPot

    from minidp import DeepPot

    runs = {program: {} for program in PROGRAMS}
    for program, seeds, prefix in (("deepmd-kit", args.dp_seeds, "deepmd"), ("minidp", args.seeds, "minidp")):
        for seed in seeds:
            d = make_input(args.input.resolve(), args.steps, args.disp_freq, seed, args.precision)
            runs[program]["input" if seed is None else str(seed)] = run_once(
                program, args.out / f"{prefix}-s{'input' if seed is None else seed}", d, env)
    systems = eval_systems(make_input(args.input.resolve(), args.steps, args.disp_freq, None, args.precision))
    for program, prefix in (("deepmd-kit", "deepmd"), ("minidp", "minidp")):
        for seed, r in runs[program].items():
            work = args.out / f"{prefix}-s{seed}"
            model = DeepmdPot(str(work / "model.pb")) if program == "deepmd-kit" else DeepPot(work / "model.dp")
            r.update(final_errors(model.eval, systems))
    stats = {program: spread(r) for program, r in runs.items() if r}
    return {"runs": runs, "stats": stats, "evaluated_on": [str(s.path) for s in systems]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.collect:
        print(collect([json.loads((folder / "summary.json").read_text()) for folder in args.collect]), end="")
        return 0
    if not args.input.is_file():
        print(f"train_compare: {args.input} not found", file=sys.stderr)
        return 2
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    env = thread_env(threads)
    # before minidp (Numba) is imported: its thread count is read once, at import
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")})
    reason = check_trainable(make_input(args.input.resolve(), args.steps, args.disp_freq, None, args.precision))
    if reason is not None:
        print(f"train_compare: minidp cannot train {args.input}: {reason}", file=sys.stderr)
        return 2
    summary = {"input": str(args.input.resolve()), "steps": args.steps, "machine": machine(threads),
               "precision": args.precision or "the input's"}
    args.out.mkdir(parents=True, exist_ok=True)
    summary.update(train_all(args, env))
    from minidp.training.lcurve import plot_lcurves

    plot_lcurves({f"{p} s{seed}": args.out / f"{'deepmd' if p == 'deepmd-kit' else 'minidp'}-s{seed}" / "lcurve.out"
                  for p in PROGRAMS for seed in summary["runs"][p]}, args.out / "lcurves.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(summarize(summary))
    print(summarize(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
