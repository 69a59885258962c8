r"""Where a step of ``minidp lammps`` spends its CPU time, phase by phase, on every rank of every layout.

    python -m benchmarks.md_phases --model water-14000-compressed.dp --atoms 1536 --layouts 1x1 1x2 2x1 \
        --steps 40 --out out/md-phases

The deck and the water box of :mod:`benchmarks.md` (NVE, 0.5 fs), each layout RANKSxTHREADS a fresh
process (``mpirun -np RANKS`` for several ranks) that wraps minidp's phase functions (:data:`PHASES`)
with timers and then runs ``minidp lammps``. Each phase's time is the CPU time of the thread that ran it
(``time.thread_time``: a phase on a worker thread is counted there, and a thread that waits for the
machine is not charged), summed over the threads of a rank and divided by the steps; the fix's callback
and the whole MD loop are process CPU time (``time.process_time``, every thread). The first callback
(setup: Numba's first calls, the first exchange plan) is left out. CPU time, unlike wall time, hardly
moves with the load of a shared machine, so the shares can be compared across layouts and runs; the
wall time per step is printed too, with the load averages, for what it is worth.

The rows: the phases; "rest of the callback" (the callback's process CPU less its phases: the glue that
extracts LAMMPS's arrays, maps types, concatenates, calls the model); "LAMMPS" (the loop's process CPU
less the callback's: integration, LAMMPS's own communication and neighbour lists). MPI phases include
MPICH's busy waiting for a slower rank. Writes ``phases.json`` and ``phases.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from benchmarks.md import REPLICAS, SHARED, layout, loop_seconds
from benchmarks.run import child_env, log_tail, run_process
from minidp.cli import main as minidp_main
from minidp.io.outputs import atomic_path
from minidp.md.lammps import DeckRunner, mpi_rank
from validation import md_engines as md

# label -> (module, function) whose calls are timed; none of them calls another of the list
PHASES = {
    "neighbour search (local + ghost atoms)": ("minidp.infer", "search_neighbors"),
    "descriptor: environment + embedding": ("minidp.model", "descriptor_forward"),
    "fitting net": ("minidp.model", "atomic_energy"),
    "fitting net backward": ("minidp.model", "atomic_energy_backward"),
    "descriptor backward": ("minidp.model", "descriptor_backward"),
    "chunk renumbering (compact_atoms)": ("minidp.infer", "compact_atoms"),
    "scatter onto atoms (chunks)": ("minidp.infer", "scatter_pairs"),
    "scatter onto atoms (whole frames)": ("minidp.model", "scatter_pairs"),
    "ghosts in reach": ("minidp.md.lammps", "in_reach"),
    "energy + virial over ranks (MPI)": ("minidp.md.lammps", "sum_over_ranks"),
    "ghost forces to owners (MPI)": ("minidp.md.lammps", "reverse_sum"),
    "exchange plan (MPI, at re-neighbouring)": ("minidp.md.lammps", "plan_exchange"),
}
CALLBACK, LOOP = "callback (process CPU)", "MD loop (process CPU)"
REST, LAMMPS = "rest of the callback", "LAMMPS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.md_phases", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SHARED / "models" / "water-14000.dp", help="the model (.dp)")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_0", help="deepmd/npy water system")
    p.add_argument("--atoms", type=int, choices=sorted(REPLICAS), default=1536, help="system size (default 1536)")
    p.add_argument("--layouts", type=layout, nargs="+", default=[layout(t) for t in ("1x1", "1x2", "2x1")],
                   help="RANKSxTHREADS (default: 1x1 1x2 2x1)")
    p.add_argument("--steps", type=int, default=40, help="NVE steps (default 40)")
    p.add_argument("--out", type=Path, default=Path("out/md-phases"), help="results folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds after which a run is killed")
    return p


class Timers:
    """Per-phase [thread CPU s, wall s, calls], shared by the threads of one process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.table: dict[str, list[float]] = {}

    def add(self, label: str, cpu: float, wall: float) -> None:
        with self.lock:
            row = self.table.setdefault(label, [0.0, 0.0, 0])
            row[0], row[1], row[2] = row[0] + cpu, row[1] + wall, row[2] + 1


def timed(function, label: str, timers: Timers, clock=time.thread_time):
    """``function`` with its calls' ``clock`` and wall times added to timers[label]."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        c0, w0 = clock(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timers.add(label, clock() - c0, time.perf_counter() - w0)

    return wrapper


def instrument(timers: Timers) -> None:
    """Wrap every PHASES function (in its module's namespace, where its callers look it up) and the fix's
    callback. The first callback clears the table when it ends (setup left out)."""
    for label, (module, name) in PHASES.items():
        mod = importlib.import_module(module)
        setattr(mod, name, timed(getattr(mod, name), label, timers))
    callback = timed(DeckRunner.callback, CALLBACK, timers, time.process_time)
    marks = {"calls": 0, "start": (0.0, 0.0), "end": (0.0, 0.0)}

    def first_left_out(self, *args):
        callback(self, *args)
        marks["calls"] += 1
        now = (time.process_time(), time.perf_counter())
        if marks["calls"] == 1:
            timers.table.clear()
            marks["start"] = now
        marks["end"] = now
        elapsed = [e - s for e, s in zip(marks["end"], marks["start"])]
        timers.table[LOOP] = elapsed + [marks["calls"] - 1]

    DeckRunner.callback = first_left_out


def worker(prefix: str, argv: list[str]) -> int:
    """One rank: instrument, run ``minidp ARGV``, write the table to PREFIX.RANK.json."""
    timers = Timers()
    instrument(timers)
    try:
        return minidp_main(argv)
    finally:
        Path(f"{prefix}.{mpi_rank()}.json").write_text(json.dumps(timers.table))


def per_step(table: dict, steps: int) -> dict[str, float]:
    """A rank's table in CPU milliseconds per step, with the rest of the callback and LAMMPS's share."""
    ms = {label: 1e3 * row[0] / max(steps, 1) for label, row in table.items()}
    ms[REST] = ms.get(CALLBACK, 0.0) - sum(ms.get(label, 0.0) for label in PHASES)
    ms[LAMMPS] = ms.get(LOOP, 0.0) - ms.get(CALLBACK, 0.0)
    return ms


def markdown(results: dict) -> str:
    """The table: one row per phase, one column per rank of every layout (CPU ms per step)."""
    runs = results["runs"]
    columns = [(run, rank) for run in runs for rank in range(len(run.get("ranks", [])))]
    lines = [f"# CPU time per MD step by phase: minidp lammps, {results['atoms']:,} atoms, {results['model']}", "",
             f"load before: {results['load_before']}; after: {results['load_after']}", "",
             "| phase | " + " | ".join(f"{r['layout']} rank {k}" for r, k in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    labels = list(PHASES) + [REST, CALLBACK, LAMMPS, LOOP]
    for label in labels:
        cells = [run["ranks"][k].get(label) for run, k in columns]
        if any(c for c in cells):
            lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    lines.append("| wall per step (LAMMPS loop time), ms | "
                 + " | ".join(f"{r['loop_ms']:.1f}" for r, _ in columns) + " |")
    lines += [f"\n{r['layout']}: {r['status']}: {r.get('tail', '')}" for r in runs if r["status"] != "ok"]
    return "\n".join(lines) + "\n"


def measure(ranks: int, threads: int, args, deck: Path) -> dict:
    """One layout: its ranks' per-step tables (CPU ms) and the loop's wall time per step."""
    folder = args.out / f"{ranks}x{threads}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("phases.*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "benchmarks.md_phases", "--worker", str(folder / "phases"), "--", "lammps",
           str(deck), "--overwrite", "-v", "pair", "minidp", "-v", "model", str(args.model.resolve()),
           "-log", "log.lammps", "-screen", "none"]
    cmd = (["mpirun", "-np", str(ranks)] + cmd) if ranks > 1 else cmd
    status = run_process(cmd, child_env(threads), folder, folder / "output.txt", args.timeout, mem_limit=1 << 40)
    run = {"layout": f"{ranks}x{threads}", "status": status}
    if status != "ok":
        run["tail"] = log_tail(folder / "output.txt")
        return run
    tables = [json.loads((folder / f"phases.{k}.json").read_text()) for k in range(ranks)]
    run["ranks"] = [per_step(t, int(t[LOOP][2])) for t in tables]
    run["loop_ms"] = 1e3 * loop_seconds(folder / "log.lammps") / args.steps
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[3:])
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    md.write_water_data(args.data, args.out / "water.lmp")
    deck = args.out / "in.lammps"
    deck.write_text(md.lammps_deck("nve", args.steps, str(args.out / "water.lmp"), REPLICAS[args.atoms],
                                   thermo=args.steps))
    results = {"atoms": args.atoms, "model": args.model.name, "steps": args.steps,
               "load_before": os.getloadavg(), "runs": []}
    for ranks, threads in args.layouts:
        results["runs"].append(measure(ranks, threads, args, deck))
        print(f"{ranks}x{threads}: {results['runs'][-1]['status']}", flush=True)
    results["load_after"] = os.getloadavg()
    with atomic_path(args.out / "phases.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    text = markdown(results)
    with atomic_path(args.out / "phases.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
