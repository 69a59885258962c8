r"""Where the time goes: a training step and an exact evaluation, stage by stage.

    python -m benchmarks.profile [--model M.dp] [--data DIR] [--steps 20] [--threads 2] [--float32]

Each stage is a function of minidp (:data:`STAGES`). For the run, the
function is replaced, in every minidp module that holds it, by a wrapper
that adds its *exclusive* wall-clock and CPU time (minus the wrapped stages
it calls) to its stage; afterwards the originals are put back. What no stage
claims is Python glue, allocation and the loops around the stages
("unattributed"). CPU time is the whole process's (all threads) while the
stage runs on the calling thread, so ``cores`` = CPU / wall says how busy the
machine's cores were in that stage (1 per thread that worked; less when
other processes took the cores).

Workloads, on one frame of ``--data`` (192 atoms for water):

- **training step, the stages on one core**: the neighbour list, then
  :func:`minidp.training.loss.loss_and_grad` with one worker and BLAS at one thread,
  as ``minidp train`` runs a step (the Adam update is not timed here);
- **exact evaluation, the stages on one core**: :func:`minidp.model.predict_frames`
  on the frame (one chunk, in the calling thread), BLAS at one thread;
- **training step on ``--threads`` workers**: the same step as minidp runs it,
  whose stages run inside the parallel regions (minidp.runtime.parallel_map):
  what is left outside them is the serial stretch;
- **DeepPot.eval**: one frame per call and ``--batch`` frames per call with
  ``--threads`` workers, whole calls only (wall, CPU, cores busy).

The stages are timed on one core because an idle BLAS thread spins on the
other one: with BLAS at two threads a single-threaded stage shows two cores
busy (see benchmarks/README.md, "Where the time goes").

FLOPs per stage are counted as :mod:`benchmarks.flops` counts them (matrix
products only) and set against the GEMM rate measured in the same process at
the same thread count (a 1000^3 product, best of repeats): the stage's
fraction of what the hardware's GEMM gives. Timings on a shared machine are
noisy: the tables say the load average; compare stages within one run.

Shape symbols: see :mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.flops import matmul_flops, neighbour_counts
from benchmarks.measure import cpu_name
from minidp import DeepPot, neighbor
from minidp.io.serialization import load_model
from minidp.io.systems import model_types, read_system
from minidp.model import predict_frames
from minidp.neighbor import build_neighbor_list
from minidp.runtime import keep_freed_memory, one_blas_thread

try:  # an older minidp (an A/B against its checkout) starts its threads in every region
    from minidp.runtime import Workers
except ImportError:
    Workers = None
from minidp.training.loss import Batch, loss_and_grad

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# (stage label, ["module:function", ...]); a function belongs to one stage.
STAGES = [
    ("neighbour list", ["minidp.neighbor:build_neighbor_list"]),
    ("environment matrix (fwd, bwd, tangent)", ["minidp.se_e2_a:env_matrix", "minidp.se_e2_a:env_matrix_backward",
                                                "minidp.training.force_training:env_matrix_jvp"]),
    ("embedding nets: value + tangent", ["minidp.se_e2_a:embedding_features"]),
    ("embedding nets: padded tails", ["minidp.se_e2_a:net_padded_tails"]),
    ("packing, sums G^T R and their backward", ["minidp.se_e2_a:pack_rows", "minidp.se_e2_a:sum_rows",
                                                 "minidp.se_e2_a:sum_rows_backward"]),
    ("descriptor backward: scatter to dR", ["minidp.se_e2_a:embed_backward"]),
    ("contraction D = T T<^T (fwd, bwd, tangent)", ["minidp.se_e2_a:contract", "minidp.se_e2_a:contract_backward",
                                                    "minidp.training.force_training:contract_jvp"]),
    ("fitting nets: forward", ["minidp.model:atomic_energy"]),
    ("fitting nets: backward to D (forces)", ["minidp.model:atomic_energy_backward"]),
    ("forces and virials (scatter)", ["minidp.model:pair_forces_virials"]),
    ("loss and pair tangent", ["minidp.training.loss:ener_loss", "minidp.training.loss:pair_tangent"]),
    ("tangent T' of the sums", ["minidp.training.force_training:embed_jvp"]),
    # atomic_energy_jvp and _net_grads: what minidp ran before issue 25 (an A/B against an older checkout)
    ("fitting nets: tangent", ["minidp.training.force_training:atomic_energy_tangent",
                               "minidp.training.force_training:atomic_energy_jvp"]),
    ("fitting nets: reverse to weights", ["minidp.training.force_training:atomic_energy_param_backward"]),
    ("embedding: rows' cotangents", ["minidp.training.force_training:row_cotangents",
                                     "minidp.training.force_training:padded_tail_backward"]),
    ("embedding nets: reverse to weights", ["minidp.nn:dual_net_backward", "minidp.training.force_training:_net_grads"]),
    ("embedding reverse: glue, padded tails", ["minidp.training.force_training:embed_param_backward"]),
    # with several workers the stages above run inside these regions, on the workers' threads
    ("parallel regions (all workers)", ["minidp.runtime:parallel_map"]),
]
# A function shared by two stages: called inside the stage named here, its time stays in that stage (the
# fitting nets' tanh layers reverse through nn.dual_net_backward too, see force_training.atomic_energy_param_backward)
STAYS_IN = {"embedding nets: reverse to weights": "fitting nets: reverse to weights"}


# ---------------------------------------------------------------------------
# Timing the stages
# ---------------------------------------------------------------------------


@dataclass
class StageTimes:
    """Exclusive seconds per stage (wall and process CPU) and calls, accumulated over a run."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, wall: float, cpu: float) -> None:
        self.wall[label] = self.wall.get(label, 0.0) + wall
        self.cpu[label] = self.cpu.get(label, 0.0) + cpu
        self.calls[label] = self.calls.get(label, 0) + 1


class StageTimer:
    """Installs timing wrappers on the STAGES' functions (a context manager; restores them on exit).

    Only calls from the thread that entered are timed (stages that run inside
    worker threads count in the stage that started them).
    """

    def __init__(self, stages=STAGES):
        self.stages = stages
        self.times = StageTimes()
        self._patches: list[tuple[object, str, object]] = []
        self._stack: list[list[float]] = []  # per active stage: [wall, cpu] spent in nested stages
        self._labels: list[str] = []  # the active stages, innermost last
        self._thread = None
        self.missing: list[str] = []  # targets this version of minidp does not have (an older one, for A/B)

    def _wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != self._thread or (self._labels and self._labels[-1] == STAYS_IN.get(label)):
                return fn(*args, **kwargs)
            self._labels.append(label)
            self._stack.append([0.0, 0.0])
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                inner = self._stack.pop()
                self._labels.pop()
                self.times.add(label, wall - inner[0], cpu - inner[1])
                if self._stack:
                    self._stack[-1][0] += wall
                    self._stack[-1][1] += cpu

        return timed

    def __enter__(self) -> StageTimes:
        self._thread = threading.get_ident()
        mods = [m for name, m in list(sys.modules.items()) if name.startswith("minidp") and m is not None]
        for label, targets in self.stages:
            for target in targets:
                modname, fname = target.split(":")
                original = getattr(sys.modules.get(modname), fname, None)
                if original is None:
                    self.missing.append(target)
                    continue
                wrapped = self._wrap(label, original)
                # patch every module that imported the function by name
                for m in mods:
                    if getattr(m, fname, None) is original:
                        self._patches.append((m, fname, original))
                        setattr(m, fname, wrapped)
        return self.times

    def __exit__(self, *exc) -> None:
        for m, fname, original in reversed(self._patches):
            setattr(m, fname, original)
        self._patches.clear()


# ---------------------------------------------------------------------------
# FLOPs per stage and the GEMM rate
# ---------------------------------------------------------------------------


def stage_flops(model, nlist: np.ndarray, atom_types: np.ndarray, training: bool) -> dict[str, float]:
    """Matrix-product FLOPs per call of each stage on one frame (benchmarks.flops' counting)."""
    cfg = model.descriptor.config
    ng, m2, nt = cfg.ng, cfg.axis_neuron, cfg.ntypes
    counts = neighbour_counts(nlist, atom_types, cfg.sec)
    emb = np.array([[matmul_flops(model.descriptor.nets[ti, tj]) for tj in range(nt)] for ti in range(nt)])
    E = float((emb * counts).sum())  # one pass of every real row through its net
    n_real, natoms = float(counts.sum()), float(atom_types.size)
    F = float(sum(matmul_flops(model.fitting[t]) * np.sum(atom_types == t) for t in range(nt)))
    out = {"embedding nets: value + tangent": 2 * E, "fitting nets: forward": F,
           "fitting nets: backward to D (forces)": F,
           "packing, sums G^T R and their backward": (8 + 18) * ng * n_real,
           "contraction D = T T<^T (fwd, bwd, tangent)": (8 + 16 + (16 if training else 0)) * ng * m2 * natoms}
    if training:
        out.update({"embedding nets: reverse to weights": 4 * E, "fitting nets: tangent": F,
                    "fitting nets: reverse to weights": 4 * F, "tangent T' of the sums": 16 * ng * n_real,
                    "embedding: rows' cotangents": 25 * ng * n_real})
        # the second-order reverse through the contraction sits in weight_gradients' glue
    return out


def gemm_rate(dtype, threads: int, n: int = 1000, repeats: int = 10) -> float:
    """GFLOP/s of an n^3 matmul in dtype with ``threads`` BLAS threads, best of repeats (on one thread timed
    by CPU time, which other processes on the machine disturb far less than wall time)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype)
    clock = time.process_time if threads == 1 else time.perf_counter
    best = float("inf")
    with threadpool_limits(threads, user_api="blas"):
        np.matmul(a, b, out=c)
        for _ in range(repeats):
            t0 = clock()
            np.matmul(a, b, out=c)
            best = min(best, clock() - t0)
    return 2.0 * n**3 / best / 1e9


# ---------------------------------------------------------------------------
# The workloads
# ---------------------------------------------------------------------------


@dataclass
class Workload:
    """One profiled workload: per-step stage times and the step's totals."""

    name: str
    steps: int
    times: StageTimes
    wall: float  # seconds per step
    cpu: float  # CPU seconds per step (all threads)
    flops: dict[str, float]  # per step, by stage


def run_profile(name: str, step, steps: int, flops: dict[str, float]) -> Workload:
    """Warm up, then time ``steps`` calls of step() under the StageTimer (best of three batches of calls
    for the totals; the stage times of all of them)."""
    step()
    timer = StageTimer()
    with timer as times:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if timer.missing:
        print(f"(not in this version of minidp, not timed: {', '.join(timer.missing)})", file=sys.stderr)
    return Workload(name, steps, times, wall / steps, cpu / steps, flops)


def table(w: Workload, rate: float) -> list[str]:
    """The Markdown table of one workload (rate: the GEMM GFLOP/s the fractions refer to)."""
    n = w.steps
    rows = sorted(w.times.wall, key=lambda k: -w.times.wall[k])
    ran = min(w.wall, w.cpu)
    total = sum(w.flops.values())
    lines = [f"### {w.name}: {1e3 * w.wall:.1f} ms wall, {1e3 * w.cpu:.1f} ms CPU per step "
             f"(cores busy {w.cpu / w.wall:.2f}); {total / 1e6:.0f} MFLOP counted, "
             f"{total / ran / 1e9:.1f} GFLOP/s = {total / ran / 1e9 / rate:.0%} of the GEMM rate ({rate:.0f} GFLOP/s)",
             "", "GFLOP/s: FLOPs over the smaller of wall and CPU time (CPU time on one core, wall time on several).",
             "",
             "| stage | calls/step | ms wall | ms CPU | cores | share | MFLOP | GFLOP/s | of GEMM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in rows:
        wall, cpu, fl = w.times.wall[k] / n, w.times.cpu[k] / n, w.flops.get(k)
        # the rate while the stage ran: CPU time on one core (less than wall when other processes took the
        # core), wall time on several (where CPU time adds up the cores)
        ran = min(wall, cpu) if cpu > 0 else wall
        gf = fl / ran / 1e9 if fl and ran > 0 else None
        lines.append(f"| {k} | {w.times.calls[k] / n:.0f} | {1e3 * wall:.2f} | {1e3 * cpu:.2f} | "
                     f"{cpu / wall if wall > 0 else 0:.2f} | {wall / w.wall:.0%} | "
                     f"{'' if fl is None else f'{fl / 1e6:.0f}'} | {'' if gf is None else f'{gf:.1f}'} | "
                     f"{'' if gf is None else f'{gf / rate:.0%}'} |")
    rest_wall = w.wall - sum(w.times.wall.values()) / n
    rest_cpu = w.cpu - sum(w.times.cpu.values()) / n
    lines.append(f"| unattributed (Python glue, allocation, stages not listed) | | {1e3 * rest_wall:.2f} | "
                 f"{1e3 * rest_cpu:.2f} | | {rest_wall / w.wall:.0%} | | | |")
    return lines


def load(model_path: Path, data: Path, float32: bool):
    """The model (its nets cast to float32 with ``float32``) and the first frame of data."""
    model = load_model(model_path)
    if float32:
        model = model.astype(np.float32)
    system = read_system(data)
    coords = np.asarray(system["coords"][:1], dtype=np.float64)
    cells = np.asarray(system["cells"][:1], dtype=np.float64)
    types = model_types(system["atom_names"], system["atom_types"], model.type_map)
    labels = (np.asarray(system["energies"][:1], dtype=np.float64), np.asarray(system["forces"][:1], dtype=np.float64))
    return model, coords, cells, types, labels


def profile(model_path: Path, data: Path, steps: int, threads: int, batch: int, float32: bool) -> str:
    """Every workload's table, as Markdown."""
    keep_freed_memory()
    model, coords, cells, types, (energy, force) = load(model_path, data, float32)
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    dtype = np.float32 if float32 else np.float64
    rate1 = gemm_rate(dtype, 1)
    # on a shared machine the threaded figure can fall below threads x the one-thread one (benchmarks.run's rule)
    rate = max(gemm_rate(dtype, threads), threads * rate1)

    # an older minidp (profiled for an A/B: PYTHONPATH=<its checkout>) has no workers: one core anyway
    threaded = "workers" in inspect.signature(loss_and_grad).parameters

    def train_step(workers):
        # through the module, so that the stage timer sees the call
        b = neighbor.build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
        loss_and_grad(model, Batch(b.rij, b.nlist, types, energy, force, None), (0.02, 1000.0, 0.0),
                      **({"workers": workers} if threaded else {}))

    def eval_step():
        predict_frames(nl.rij, nl.nlist, types, model)

    out = [f"Machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the start; "
           f"{np.dtype(dtype).name} GEMM (1000^3) {rate1:.0f} GFLOP/s on 1 thread, {rate:.0f} on {threads} "
           f"(the rate the fractions refer to); "
           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", ""]
    # the stages on one core (BLAS at one thread: its idle threads would spin on the other core and
    # count as CPU time), then the whole step as minidp runs it on ``threads`` workers
    workloads = [("training step (1 frame), the stages on one core", lambda: train_step(1), True, rate1),
                 ("exact evaluation (1 frame, one chunk), the stages on one core", eval_step, False, rate1)]
    with contextlib.ExitStack() as run:
        if threads > 1 and threaded:
            # the threads kept for the run, as minidp train keeps them (runtime.Workers, where it exists)
            kept = run.enter_context(Workers(threads)) if Workers is not None else threads
            label = f"training step (1 frame) on {threads} workers: parallel regions and serial stretches"
            workloads.append((label, lambda: train_step(kept), True, rate))
        for name, step, training, peak in workloads:
            with (one_blas_thread() if peak is rate1 else contextlib.nullcontext()):
                w = run_profile(name, step, steps, stage_flops(model, nl.nlist, types, training))
            out += table(w, peak) + [""]
    dp = DeepPot(model, workers=threads, progress=False)
    frames = np.repeat(coords, batch, axis=0), np.repeat(cells, batch, axis=0)
    out += ["### DeepPot.eval, whole calls", "", "| call | ms wall per frame | ms CPU per frame | cores busy |",
            "|---|---|---|---|"]
    for nf in (1, batch):
        xyz, box = frames[0][:nf], frames[1][:nf]
        dp.eval(xyz, box, types)
        best = (float("inf"), 0.0)
        for _ in range(max(3, steps // nf)):
            w0, c0 = time.perf_counter(), time.process_time()
            dp.eval(xyz, box, types)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best = min(best, (wall, cpu))
        out.append(f"| {nf} frame(s), {threads} workers | {1e3 * best[0] / nf:.1f} | {1e3 * best[1] / nf:.1f} | "
                   f"{best[1] / best[0]:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SHARED / "models" / "water-14000.dp", help="minidp-readable model")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_3", help="system of frames")
    p.add_argument("--steps", type=int, default=20, help="timed steps per workload (default 20)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="threads (BLAS, minidp's workers; default OMP_NUM_THREADS or 2)")
    p.add_argument("--batch", type=int, default=40, help="frames per DeepPot.eval call of the batch row")
    p.add_argument("--float32", action="store_true", help="the model's nets cast to float32 (sgemm rate)")
    a = p.parse_args(argv)
    for name in ("steps", "threads", "batch"):
        if getattr(a, name) < 1:
            print(f"error: --{name} must be positive, got {getattr(a, name)}", file=sys.stderr)
            return 2
    print(profile(a.model, a.data, a.steps, a.threads, a.batch, a.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
