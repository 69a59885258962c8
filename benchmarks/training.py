"""Training speed: seconds per step of ``dp --tf train``, ``minidp train`` and ``dp --pt train``.

A section of :mod:`benchmarks.run` (``results["training"]``, ``--train-steps N``, 0 to skip it). Every
program trains on the water input of ``../shared/models/input.json`` (training systems data_0..2,
validation data_3; :func:`validation.train_compare.make_input`) for N steps with disp_freq 100 (a third
of a shorter run), in float64 and in float32 (``precision: float32`` in the descriptor and the fitting
net), each run a fresh process in a folder of its own, the contenders taking turns for ``--rounds``
rounds. The time per step is what each program prints after its warm-up:

- deepmd-kit (both backends): "average training time: X s/batch", which leaves out the first display
  interval (parsed by :func:`validation.train_compare.average_training_time`);
- minidp: "trained N steps, X s/step", the mean step after its first 10.

Start-up (imports, data statistics, neighbour statistics: deepmd-kit's is skipped with
``--skip-neighbor-stat``) is in neither; the whole command's wall time is kept beside it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.processes import (
    busy_neighbour,
    child_env,
    dp_command,
    log_tail,
    run_process,
)
from benchmarks.report import ok_rows
from validation.train_compare import average_training_time, make_input

PRECISIONS = ("float64", "float32")
# minidp train's closing line: "trained N steps, X s/step; last line: ..."
MINIDP_STEP_TIME = re.compile(r"trained \d+ steps, ([0-9.eE+-]+) s/step")


def display_frequency(steps: int) -> int:
    """disp_freq of a run of ``steps``: 100 (the issue's), or a third of a shorter run, so that deepmd-kit's
    average can leave out a first interval (the warm-up) and still time two."""
    return min(100, max(1, steps // 3))


def training_input(shared: Path, steps: int, precision: str) -> dict:
    """The water input with ``steps`` steps, absolute systems, and ``precision`` in both nets."""
    return make_input((shared / "models" / "input.json").resolve(), steps, display_frequency(steps), None, precision)


def contenders(pt_path: str | None) -> list[tuple[str, list[str], str | None]]:
    """(name, command run in the run's folder, first PYTHONPATH entry) of each program that can run here:
    deepmd-kit's when its ``dp`` is found, its PyTorch backend when ``pt_path`` (the copy of
    :mod:`benchmarks.deepmd_pt`) is given."""
    dp = dp_command()
    found = [("dp --tf", [dp, "--tf", "train", "input.json", "--skip-neighbor-stat"], None)] if dp else []
    found.append(("minidp", [sys.executable, "-m", "minidp", "train", "input.json", "-o", "model.dp", "--quiet"],
                  None))
    if dp and pt_path:
        found.append(("dp --pt", [dp, "--pt", "train", "input.json", "--skip-neighbor-stat"], pt_path))
    return found


def seconds_per_step(name: str, log: str) -> float | None:
    """The program's own seconds per step after its warm-up, from its output (None when it printed none)."""
    if name == "minidp":
        m = MINIDP_STEP_TIME.search(log)
        return float(m.group(1)) if m else None
    return average_training_time(log)


def train_once(s, name: str, cmd: list[str], first_path: str | None, inputs: dict, folder: Path,
               loaded: bool) -> dict:
    """One training run in ``folder`` (a CPU-bound neighbour beside it when ``loaded``): its status, its
    seconds per step and the command's wall time; the log's tail when it failed."""
    folder.mkdir(parents=True)
    (folder / "input.json").write_text(json.dumps(inputs, indent=1))
    log = folder / "train.log"
    # generous: the watchdog is there for a hung run, not to judge a slow one
    timeout = s.timeout + 3.0 * s.train_steps
    with busy_neighbour(loaded):
        t0 = time.perf_counter()
        status = run_process(cmd, child_env(s.threads, first_path), folder, log, timeout, s.mem_limit)
        wall = time.perf_counter() - t0
    seconds = seconds_per_step(name, log.read_text(errors="replace")) if status == "ok" else None
    if status == "ok" and seconds is None:
        status = "failed (no time per step in the output)"
    if status != "ok":
        return {"status": status, "log": log_tail(log)}
    return {"status": "ok", "seconds_per_step": seconds, "wall_s": wall}


def training_row(name: str, precision: str, runs: list[dict]) -> dict:
    """One row from a contender's rounds: the median and the fastest seconds per step, steps per second."""
    ok = ok_rows(runs)
    row = {"name": name, "precision": precision, "status": "ok" if ok else runs[0]["status"]}
    if not ok:
        return {**row, "log": runs[0].get("log", "")}
    per = [r["seconds_per_step"] for r in ok]
    median = float(np.median(per))
    return {**row, "seconds_per_step": median, "seconds_per_step_min": min(per), "steps_per_s": 1.0 / median,
            "rounds": len(ok), "per_round": per, "wall_s": float(np.median([r["wall_s"] for r in ok]))}


def add_speedups(rows: list[dict]) -> None:
    """Into every minidp row: each deepmd-kit row's seconds per step (same precision) over minidp's,
    "speedup_vs_dp_tf" / "speedup_vs_dp_pt"."""
    for ref in ok_rows(rows):
        for row in ok_rows(rows):
            if ref["name"].startswith("dp") and row["name"] == "minidp" and ref["precision"] == row["precision"]:
                row[f"speedup_vs_{ref['name'].replace('dp --', 'dp_')}"] = (ref["seconds_per_step"]
                                                                          / row["seconds_per_step"])


def bench(s, shared: Path, work: Path, pt_path: str | None, bar) -> dict:
    """The section: every contender in both precisions, ``--rounds`` interleaved rounds (each run twice,
    idle then loaded, with ``--load``). Returns {"steps", "disp_freq", "rows"}."""
    programs = contenders(pt_path)
    cases = [(name, cmd, path, precision) for precision in PRECISIONS for name, cmd, path in programs]
    inputs = {p: training_input(shared, s.train_steps, p) for p in PRECISIONS}
    idle: list[list[dict]] = [[] for _ in cases]
    loaded: list[list[dict]] = [[] for _ in cases]
    for k in range(s.rounds):
        for i, (name, cmd, path, precision) in enumerate(cases):
            for busy, got in ((False, idle), (True, loaded))[: 1 + s.load]:
                bar.set_description(f"train {name} {precision} round {k + 1}/{s.rounds}" + " (loaded)" * busy)
                folder = work / f"train-{i}-{k}{'-loaded' * busy}"
                got[i].append(train_once(s, name, cmd, path, inputs[precision], folder, busy))
                bar.update()
    rows = [training_row(name, precision, runs) for (name, _, _, precision), runs in zip(cases, idle)]
    if s.load:
        for row, (name, _, _, precision), runs in zip(rows, cases, loaded):
            row["loaded"] = training_row(name, precision, runs)
    add_speedups(rows)
    add_speedups([r["loaded"] for r in rows if "loaded" in r])
    return {"steps": s.train_steps, "disp_freq": display_frequency(s.train_steps), "rows": rows}


def runs_planned(s, pt_path: str | None) -> int:
    """Training runs the section will make (for the progress bar)."""
    return s.rounds * len(PRECISIONS) * len(contenders(pt_path)) * (1 + s.load)
