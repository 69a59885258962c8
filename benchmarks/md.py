r"""The MD benchmark: LAMMPS with deepmd-kit's ``pair_style deepmd`` against ``pair_style minidp``.

    python -m benchmarks.md --pb ../shared/models/water-14000.pb --dp ../shared/models/water-14000.dp \
        --data ../shared/data/water/data_0 --out out/bench-md [--compressed-pb X.pb] [--quick]

The benchmark deepmd-kit's papers use: the water box replicated (1x1x1 = 192, 2x2x2 = 1,536,
4x4x4 = 12,288 atoms), NVE, 20 steps of 0.5 fs from 330 K velocities, the deck of
:mod:`validation.md_engines`. Reported: microseconds per step per atom, from LAMMPS's own
"Loop time" (the steps only: not start-up, not TensorFlow's or Numba's first call). Contenders, all in
one run, each a fresh process with ``--threads`` threads (OMP_NUM_THREADS, BLAS, TensorFlow's intra-
and inter-op pools; minidp's workers), interleaved size by size:

- deepmd-kit ``pair_style deepmd`` on the .pb, and on a ``dp --tf compress``-ed .pb if given;
- minidp ``pair_style minidp`` on the .dp (exact), and on a compressed model if ``--compressed-dp``
  names one (the compression issue's ``minidp compress``);
- with ``--mpi``: the plain .pb and minidp again as ``mpirun -np 2`` with one thread per rank, at
  the sizes of ``--mpi-atoms`` (minidp's several-rank path is the exact cluster scheme of
  :mod:`minidp.md.lammps`).

Writes results.json, results.md (a Markdown table with the machine load) and md.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from benchmarks.run import child_env, log_tail, run_process
from minidp.io.outputs import atomic_path
from validation import md_engines as md

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REPLICAS = ((1, 1, 1), (2, 2, 2), (4, 4, 4))
STEPS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.md", description=__doc__.split("\n\n")[0])
    p.add_argument("--pb", type=Path, default=SHARED / "models" / "water-14000.pb", help="deepmd-kit model (.pb)")
    p.add_argument("--compressed-pb", type=Path, default=None, help="the same model after `dp --tf compress`")
    p.add_argument("--dp", type=Path, default=SHARED / "models" / "water-14000.dp", help="the model for minidp")
    p.add_argument("--compressed-dp", type=Path, default=None, help="the same model after `minidp compress`")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_0", help="deepmd/npy water system")
    p.add_argument("--out", type=Path, default=Path("out/bench-md"), help="results folder")
    p.add_argument("--threads", type=int, default=2, help="threads of every contender (default 2)")
    p.add_argument("--steps", type=int, default=STEPS, help="NVE steps per run (default 20)")
    p.add_argument("--mpi", action="store_true", help="also mpirun -np 2 with one thread per rank")
    p.add_argument("--mpi-atoms", type=int, nargs="+", default=[1536],
                   help="sizes (atoms) at which the --mpi runs are made (default 1536)")
    p.add_argument("--quick", action="store_true", help="192 and 1,536 atoms only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds after which a run is killed")
    return p


def contenders(args, natoms: int) -> list[tuple[str, str, Path, int]]:
    """(name, engine, model, MPI ranks) of every contender at a size."""
    rows = [("deepmd-kit pair_style deepmd", "deepmd", args.pb, 1)]
    if args.compressed_pb is not None:
        rows.append(("deepmd-kit pair_style deepmd, compressed", "deepmd", args.compressed_pb, 1))
    rows.append(("minidp pair_style minidp (exact)", "minidp", args.dp, 1))
    if args.compressed_dp is not None:
        rows.append(("minidp pair_style minidp, compressed", "minidp", args.compressed_dp, 1))
    if args.mpi and natoms in args.mpi_atoms:
        rows += [("deepmd-kit pair_style deepmd, 2 ranks", "deepmd", args.pb, 2),
                 ("minidp pair_style minidp, 2 ranks", "minidp", args.dp, 2)]
    return rows


def loop_seconds(log: Path) -> float:
    """LAMMPS's 'Loop time of X on N procs for S steps' of the last run."""
    found = re.findall(r"Loop time of ([0-9.eE+-]+) on", log.read_text())
    if not found:
        raise ValueError(f"{log} has no 'Loop time' line")
    return float(found[-1])


def measure(name: str, engine: str, model: Path, nprocs: int, replicas, args, folder: Path) -> dict:
    """One run: us/step/atom from the loop time, or the reason it has none."""
    natoms = 192 * replicas[0] * replicas[1] * replicas[2]
    folder.mkdir(parents=True, exist_ok=True)
    deck = md.lammps_deck("nve", args.steps, str(args.out / "water.lmp"), replicas, thermo=args.steps)
    (folder / "in.lammps").write_text(deck)
    env = child_env(1 if nprocs > 1 else args.threads)
    t0 = time.perf_counter()
    status = run_process(md.lammps_command(engine, folder / "in.lammps", model.resolve(), nprocs), env, folder,
                         folder / "output.txt", args.timeout, mem_limit=1 << 40)
    row = {"name": name, "atoms": natoms, "ranks": nprocs, "threads": 1 if nprocs > 1 else args.threads,
           "status": status, "wall_seconds": time.perf_counter() - t0}
    if status == "ok":
        row["loop_seconds"] = loop_seconds(folder / "log.lammps")
        row["us_per_step_atom"] = 1e6 * row["loop_seconds"] / args.steps / natoms
    else:
        row["tail"] = log_tail(folder / "output.txt")
    print(f"{name:45s} {natoms:6d} atoms  {row.get('us_per_step_atom', float('nan')):8.1f} us/step/atom  "
          f"({status})", flush=True)
    return row


def markdown(results: dict) -> str:
    rows = results["rows"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    sizes = sorted({r["atoms"] for r in rows})
    lines = [f"# MD benchmark: LAMMPS, NVE water, {results['steps']} steps", "",
             f"{results['machine']}; load before: {results['load_before']}; after: {results['load_after']}", "",
             "microseconds per step per atom (LAMMPS loop time); ratio: to deepmd-kit plain at the same size", "",
             "| contender | " + " | ".join(f"{n:,} atoms" for n in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    plain = {r["atoms"]: r.get("us_per_step_atom") for r in rows if r["name"] == "deepmd-kit pair_style deepmd"}
    for name in names:
        cells = []
        for n in sizes:
            r = next((r for r in rows if r["name"] == name and r["atoms"] == n), None)
            if r is None:
                cells.append("-")
            elif "us_per_step_atom" not in r:
                cells.append(r["status"])
            else:
                ratio = f" ({r['us_per_step_atom'] / plain[n]:.2f}x)" if plain.get(n) else ""
                cells.append(f"{r['us_per_step_atom']:.0f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidp.io.figures import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["name"] for r in results["rows"]):
        pts = [(r["atoms"], r["us_per_step_atom"]) for r in results["rows"]
               if r["name"] == name and "us_per_step_atom" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("atoms")
    ax.set_ylabel("time per step per atom (us)")
    ax.set_title(f"LAMMPS NVE water, {results['steps']} steps, {results['threads']} threads")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = tuple(p for p in (args.compressed_pb, args.compressed_dp) if p is not None)
    for path in (args.pb, args.dp, args.data) + extra:
        if not path.exists():
            print(f"benchmarks.md: {path} does not exist", file=sys.stderr)
            return 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    md.write_water_data(args.data, args.out / "water.lmp")
    results = {"steps": args.steps, "threads": args.threads, "load_before": os.getloadavg(),
               "machine": f"{cpu_name()}, {os.cpu_count()} cores", "rows": []}
    replicas = REPLICAS[:2] if args.quick else REPLICAS
    for rep in replicas:
        for name, engine, model, nprocs in contenders(args, 192 * rep[0] * rep[1] * rep[2]):
            folder = args.out / "runs" / f"{engine}-{model.stem}-{nprocs}rank-{'x'.join(map(str, rep))}"
            results["rows"].append(measure(name, engine, model, nprocs, rep, args, folder))
    results["load_after"] = os.getloadavg()
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    with atomic_path(args.out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    png = plot(results, args.out / "md.png")
    print(markdown(results))
    print(f"-> {args.out / 'results.md'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
