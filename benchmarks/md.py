r"""The MD benchmark: LAMMPS with deepmd-kit's ``pair_style deepmd`` against ``pair_style minidp``.

    python -m benchmarks.md --pb ../shared/models/water-14000.pb --dp ../shared/models/water-14000.dp \
        --data ../shared/data/water/data_0 --out out/bench-md [--compressed-pb X.pb] [--compressed-dp X.dp] \
        [--layouts 1x1 1x2 2x1] [--atoms 1536 12288]

The benchmark deepmd-kit's papers use: the water box replicated (1x1x1 = 192, 2x2x2 = 1,536,
4x4x4 = 12,288 atoms), NVE, 20 steps of 0.5 fs from 330 K velocities, the deck of
:mod:`validation.md_engines`. Reported: microseconds per step per atom, from LAMMPS's own
"Loop time" (the steps only: not start-up, not TensorFlow's or Numba's first call). Contenders:

- deepmd-kit ``pair_style deepmd`` on the .pb, and on a ``dp --tf compress``-ed .pb if given;
- minidp ``pair_style minidp`` on the .dp (exact), and on a ``minidp compress``-ed model if
  ``--compressed-dp`` names one;

each at every layout of ``--layouts``, RANKSxTHREADS: ``1x1`` one rank with one thread, ``1x2`` one
rank with two threads, ``2x1`` ``mpirun -np 2`` with one thread per rank (OMP_NUM_THREADS, BLAS,
TensorFlow's intra- and inter-op pools and minidp's workers all set to the threads), each run a fresh
process, interleaved size by size and layout by layout in one run.

Writes results.json, results.md (a Markdown table with the machine load) and md.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import cpu_name
from benchmarks.run import child_env, log_tail, run_process
from minidp.io.outputs import atomic_path
from validation import md_engines as md

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# atoms -> replicas of the 192-atom water box
REPLICAS = {192: (1, 1, 1), 1536: (2, 2, 2), 12288: (4, 4, 4)}
STEPS = 20
LAYOUTS = ("1x1", "1x2", "2x1")
PLAIN = "deepmd-kit pair_style deepmd"


def layout(text: str) -> tuple[int, int]:
    """'RANKSxTHREADS' -> (ranks, threads), both >= 1."""
    m = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected RANKSxTHREADS, e.g. 2x1")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.md", description=__doc__.split("\n\n")[0])
    p.add_argument("--pb", type=Path, default=SHARED / "models" / "water-14000.pb", help="deepmd-kit model (.pb)")
    p.add_argument("--compressed-pb", type=Path, default=None, help="the same model after `dp --tf compress`")
    p.add_argument("--dp", type=Path, default=SHARED / "models" / "water-14000.dp", help="the model for minidp")
    p.add_argument("--compressed-dp", type=Path, default=None, help="the same model after `minidp compress`")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_0", help="deepmd/npy water system")
    p.add_argument("--out", type=Path, default=Path("out/bench-md"), help="results folder")
    p.add_argument("--layouts", type=layout, nargs="+", default=[layout(t) for t in LAYOUTS],
                   help="RANKSxTHREADS of every contender (default: 1x1 1x2 2x1)")
    p.add_argument("--atoms", type=int, nargs="+", choices=sorted(REPLICAS), default=sorted(REPLICAS),
                   help="system sizes (default: 192 1536 12288)")
    p.add_argument("--quick", action="store_true", help="192 and 1,536 atoms only")
    p.add_argument("--steps", type=int, default=STEPS, help="NVE steps per run (default 20)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds after which a run is killed")
    return p


@dataclass(frozen=True)
class Contender:
    """A pair style with a model: deepmd-kit's or minidp's, plain (exact) or compressed."""

    name: str
    engine: str  # "deepmd" or "minidp" (validation.md_engines.lammps_command)
    model: Path
    compressed: bool


def contenders(args) -> list[Contender]:
    """Every contender the arguments name (the compressed ones only when their models are given)."""
    rows = [Contender(PLAIN, "deepmd", args.pb, False)]
    if args.compressed_pb is not None:
        rows.append(Contender(f"{PLAIN}, compressed", "deepmd", args.compressed_pb, True))
    rows.append(Contender("minidp pair_style minidp (exact)", "minidp", args.dp, False))
    if args.compressed_dp is not None:
        rows.append(Contender("minidp pair_style minidp, compressed", "minidp", args.compressed_dp, True))
    return rows


def loop_seconds(log: Path) -> float:
    """LAMMPS's 'Loop time of X on N procs for S steps' of the last run."""
    found = re.findall(r"Loop time of ([0-9.eE+-]+) on", log.read_text())
    if not found:
        raise ValueError(f"{log} has no 'Loop time' line")
    return float(found[-1])


def measure(who: Contender, ranks: int, threads: int, natoms: int, args, folder: Path) -> dict:
    """One run: us/step/atom from the loop time, or the reason it has none."""
    folder.mkdir(parents=True, exist_ok=True)
    deck = md.lammps_deck("nve", args.steps, str(args.out / "water.lmp"), REPLICAS[natoms], thermo=args.steps)
    (folder / "in.lammps").write_text(deck)
    t0 = time.perf_counter()
    status = run_process(md.lammps_command(who.engine, folder / "in.lammps", who.model.resolve(), ranks),
                         child_env(threads), folder, folder / "output.txt", args.timeout, mem_limit=1 << 40)
    row = {"name": who.name, "compressed": who.compressed, "atoms": natoms, "ranks": ranks, "threads": threads,
           "status": status, "wall_seconds": time.perf_counter() - t0}
    if status == "ok":
        row["loop_seconds"] = loop_seconds(folder / "log.lammps")
        row["us_per_step_atom"] = 1e6 * row["loop_seconds"] / args.steps / natoms
    else:
        row["tail"] = log_tail(folder / "output.txt")
    print(f"{who.name:40s} {ranks}x{threads} {natoms:6d} atoms  {row.get('us_per_step_atom', float('nan')):8.1f} "
          f"us/step/atom  ({status})", flush=True)
    return row


def line_of(row: dict) -> tuple[str, int, int]:
    """The table line of a result: (contender, ranks, threads)."""
    return row["name"], row.get("ranks", 1), row.get("threads", 1)


def cell(row: dict | None, us: dict) -> str:
    """A result in the table: us/step/atom (ratio to deepmd-kit's plugin with the same kind of model at the
    same layout; throughput relative to the same contender at 1x1), or why there is no time."""
    if row is None:
        return "-"
    if "us_per_step_atom" not in row:
        return row["status"]
    name, ranks, threads = line_of(row)
    t, n = row["us_per_step_atom"], row["atoms"]
    reference = f"{PLAIN}, compressed" if row.get("compressed") else PLAIN
    ref, base = us.get((reference, ranks, threads, n)), us.get((name, 1, 1, n))
    notes = [f"{t / ref:.2f}x"] if ref and name != reference else []
    notes += [f"{base / t:.2f}x 1x1"] if base and (ranks, threads) != (1, 1) else []
    return f"{t:.0f}" + (f" ({'; '.join(notes)})" if notes else "")


def markdown(results: dict) -> str:
    """The table: one line per contender and layout, one column per size (see :func:`cell`)."""
    rows = results["rows"]
    sizes = sorted({r["atoms"] for r in rows})
    us = {line_of(r) + (r["atoms"],): r["us_per_step_atom"] for r in rows if "us_per_step_atom" in r}
    found = {line_of(r) + (r["atoms"],): r for r in rows}
    lines = [f"# MD benchmark: LAMMPS, NVE water, {results['steps']} steps", "",
             f"{results['machine']}; load before: {results['load_before']}; after: {results['load_after']}", "",
             ("microseconds per step per atom (LAMMPS loop time); in brackets: the ratio to deepmd-kit's plugin "
              "with the same kind of model (plain or compressed) at the same layout, then the throughput "
              "relative to the same contender at 1 rank x 1 thread"), "",
             "| contender | ranks x threads | " + " | ".join(f"{n:,} atoms" for n in sizes) + " |",
             "| --- | --- |" + " --- |" * len(sizes)]
    for name, ranks, threads in dict.fromkeys(line_of(r) for r in rows):
        cells = [cell(found.get((name, ranks, threads, n)), us) for n in sizes]
        lines.append(f"| {name} | {ranks} x {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidp.io.figures import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in dict.fromkeys(line_of(r) for r in results["rows"]):
        pts = [(r["atoms"], r["us_per_step_atom"]) for r in results["rows"]
               if line_of(r) == key and "us_per_step_atom" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{key[0]}, {key[1]}x{key[2]}")
    ax.set_xscale("log")
    ax.set_xlabel("atoms")
    ax.set_ylabel("time per step per atom (us)")
    ax.set_title(f"LAMMPS NVE water, {results['steps']} steps, ranks x threads")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


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
    results = {"steps": args.steps, "layouts": [f"{r}x{t}" for r, t in args.layouts],
               "load_before": os.getloadavg(), "machine": f"{cpu_name()}, {os.cpu_count()} cores", "rows": []}
    sizes = [n for n in sorted(set(args.atoms)) if not args.quick or n <= 1536]
    for natoms in sizes:
        for ranks, threads in args.layouts:
            for who in contenders(args):
                folder = args.out / "runs" / f"{who.engine}-{who.model.stem}-{ranks}x{threads}-{natoms}"
                results["rows"].append(measure(who, ranks, threads, natoms, args, folder))
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
