r"""minidp against deepmd-kit's DeepPot.eval: speed, memory, size scaling, FLOPs. One command:

    python -m benchmarks.run --model ../shared/models/water-14000.pb \
        --data ../shared/data/water/data_3 --out out/bench [--quick] [--threads 2]

Every measurement runs in a fresh process (:mod:`benchmarks.measure`) with
the same thread count for both implementations; a watchdog kills it past
``--timeout`` seconds or ``--mem-limit`` of resident memory, and the result
says so. Sections (each a function below):

1. dgemm peak: NumPy matmul GFLOP/s, square and embedding-shaped;
2. + 3. throughput on the frames of ``--data``: deepmd-kit TF (plain and
   ``dp compress``-ed) and minidp at several chunk sizes, the contenders
   interleaved over ``--rounds`` so that a busy spell of the shared machine
   falls on all of them; then minidp's peak memory against memory budgets;
4. size scaling: one frame of replicated water boxes, 192 to 24,576 atoms;
5. a frame of more than 100,000 atoms in a 2 GiB budget;
6. FLOPs per frame (:mod:`benchmarks.flops`) and the fraction of the dgemm peak.

Outputs in ``--out`` (each written whole, then renamed): results.json,
results.md, PNG plots (:mod:`benchmarks.report`). Medians throughout; ratios
are of medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.report import ok_rows, write_outputs
from minidp.io.serialization import save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MIB = 1 << 20
GIB = 1 << 30

# minidp's batch_size values (centre atoms per chunk) for the throughput sweep
CHUNK_SIZES = (192, 384, 960, 1920, 7680)
# memory_budget values (bytes) checked against minidp's measured peak
BUDGETS = (256 * MIB, 512 * MIB, 1 * GIB)
# replicas (n_a, n_b, n_c) of the 192-atom water box: 192 ... 24,576 atoms
REPLICAS = ((1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (4, 2, 2), (4, 4, 2), (4, 4, 4), (4, 4, 8))
# 9 x 8 x 8 boxes: 110,592 atoms, more than the 100,000 the target names
LARGE_REPLICAS, LARGE_BUDGET = (9, 8, 8), 2 * GIB
DGEMM_SHAPES = ((2000, 2000, 2000), (17000, 50, 100))


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures, and how."""

    model_pb: Path  # deepmd-kit's frozen TF model
    model_minidp: Path  # the .dp beside it when present (needs no deepmd-kit to load), else the .pb
    data: Path  # a system of frames (deepmd/npy): the throughput input, and the box replicated for scaling
    out: Path  # where results, plots and the compressed model go
    threads: int  # OMP/BLAS/TF threads of both implementations, and minidp's workers
    quick: bool  # a 1-2 minute version: fewer frames, sizes and repeats
    timeout: float  # seconds after which a measurement is killed (the large frame gets three times this)
    mem_limit: int  # resident bytes at which a measurement is killed (protects the shared machine)
    rounds: int  # interleaved passes over the throughput contenders
    nframes: int  # frames per eval call in the throughput sweep
    budget_frames: int  # frames per eval call in the memory-budget check
    repeats: int  # timed calls per measurement (at least)
    chunk_sizes: tuple[int, ...]  # minidp batch_size values of the throughput sweep
    budgets: tuple[int, ...]  # minidp memory_budget values (bytes) checked against the measured peak
    replicas: tuple[tuple[int, int, int], ...]  # replicated boxes of the size scaling
    large_replicas: tuple[int, int, int] | None  # the > 100,000-atom frame (None: skip it)
    dgemm_shapes: tuple[tuple[int, int, int], ...]  # matmul (m, k, n) shapes; the first, square, sets the peak
    compressed_only: bool = False  # run the compressed-model section alone (benchmarks.compressed)
    float32: bool = False  # also the float32 model (the same weights rounded): minidp and TF rows, and sgemm (on from
    # the command line)


# ---------------------------------------------------------------------------
# Running one measurement
# ---------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measurement: every thread pool at ``threads``, TensorFlow quiet.

    TF gets intra-op and inter-op pools of ``threads`` each, which is what
    deepmd-kit picks by default on a ``threads``-core machine and was the
    fastest setting we measured for it at 2 threads.
    """
    env = dict(os.environ)
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n, NUMBA_NUM_THREADS=n,
               DP_INTRA_OP_PARALLELISM_THREADS=n, DP_INTER_OP_PARALLELISM_THREADS=n, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


def process_rss(pid: int) -> int:
    """Resident bytes of process pid (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_process(cmd: list[str], env: dict, cwd: Path, log: Path, timeout: float, mem_limit: int) -> str:
    """Run cmd (output to log), killing it past timeout seconds or mem_limit resident bytes.

    Returns "ok", "timeout (> N s)", "memory (> N GiB)" or "failed (exit N)".
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    status = None
    while proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            status = f"timeout (> {timeout:.0f} s)"
        elif process_rss(proc.pid) > mem_limit:
            status = f"memory (> {mem_limit / GIB:.1f} GiB resident)"
        if status:
            proc.kill()
            proc.wait()
            return status
        time.sleep(0.1)
    return "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def log_tail(log: Path, lines: int = 6) -> str:
    """The last lines of a log that say something (TF's and CUDA's start-up chatter left out)."""
    noise = ("implib-gen", "cudart", "WARNING: All log", "oneDNN", "To enable", "DT_DOUBLE", "W0000", "I0000",
             "DP_INFER_BATCH_SIZE", "To get the best performance")
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join([t for t in text if t.strip() and not any(n in t for n in noise)][-lines:])


class Runner:
    """Runs specs through benchmarks.measure in fresh processes, in a scratch folder."""

    def __init__(self, settings: Settings, work: Path, bar):
        self.settings = settings  # the run's settings (threads, limits)
        self.work = work  # scratch folder for specs, results and logs
        self.bar = bar  # tqdm bar, advanced once per measurement
        self.count = 0  # measurements started, for unique file names

    def __call__(self, spec: dict, label: str, timeout: float | None = None) -> dict:
        """The measurement's result dict plus "status" (and "log" when it did not succeed)."""
        s, self.count = self.settings, self.count + 1
        paths = [self.work / f"{self.count:03d}.{ext}" for ext in ("spec.json", "result.json", "log")]
        paths[0].write_text(json.dumps(spec))
        self.bar.set_description(label)
        cmd = [sys.executable, "-m", "benchmarks.measure", str(paths[0]), str(paths[1])]
        status = run_process(cmd, child_env(s.threads), ROOT, paths[2], timeout or s.timeout, s.mem_limit)
        self.bar.update()
        if status == "ok" and paths[1].exists():
            return {**json.loads(paths[1].read_text()), "status": "ok"}
        return {"status": status, "log": log_tail(paths[2])}


# ---------------------------------------------------------------------------
# Summaries of raw results
# ---------------------------------------------------------------------------


def memory_summary(r: dict) -> dict:
    """MiB: absolute peak, peak over the RSS after loading model + data, and over the baseline after compiling."""
    peak = r["peak"]
    return {"peak_mib": max(peak, r["peak_setup"]) / MIB, "over_load_mib": (peak - r["rss_load"]) / MIB,
            "over_base_mib": (peak - r["rss_base"]) / MIB, "base_mib": r["rss_base"] / MIB,
            "load_mib": r["rss_load"] / MIB}


def merge_rounds(results: list[dict]) -> dict:
    """One result from several rounds of a measurement: all timed calls, the largest memory figures."""
    ok = ok_rows(results)
    if not ok:
        return results[0]
    merged = {**ok[0], "times": [t for r in ok for t in r["times"]], "rounds": len(ok),
              "cores_used": float(np.mean([r["cores_used"] for r in ok]))}
    mems = [memory_summary(r) for r in ok]
    merged["memory"] = {k: max(m[k] for m in mems) for k in mems[0]}
    return merged


def timing_row(name: str, r: dict, **extra) -> dict:
    """A table row: status, and for a finished measurement the median call and its memory."""
    row = {"name": name, **extra, "status": r["status"]}
    if r["status"] != "ok":
        return {**row, "log": r.get("log", "")} if r["status"].startswith("failed") else row
    median, best = float(np.median(r["times"])), min(r["times"])
    nf, natoms = r["nframes"], r["natoms"]
    row.update(natoms=natoms, nframes=nf, calls=len(r["times"]), call_s=median, call_s_min=best,
               ms_per_frame=1e3 * median / nf, ms_per_frame_min=1e3 * best / nf, frames_per_s=nf / median,
               us_per_atom=1e6 * median / (nf * natoms), us_per_atom_min=1e6 * best / (nf * natoms),
               memory=r.get("memory") or memory_summary(r), energy_per_atom=r["energy_per_atom"],
               warmup_s=r["warmup_s"], cores_used=r["cores_used"], times=r["times"], rounds=r.get("rounds", 1))
    row.update({k: r[k] for k in ("batch_size", "workers", "chunk_atoms", "n_chunks", "bytes_per_atom") if k in r})
    return row


# ---------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------


def model_spec(s: Settings, kind: str, frames: Path, **extra) -> dict:
    """A measurement of the water model by ``kind`` ("tf": model_pb; "minidp": model_minidp, workers = threads)."""
    spec = {"kind": kind, "frames": str(frames), "repeats": s.repeats, "max_seconds": 2 * s.timeout / 5}
    if kind == "minidp":
        spec.update(model=str(s.model_minidp), workers=s.threads)
    else:
        spec.update(model=str(s.model_pb))
    return {**spec, **extra}


def bench_dgemm(run, s: Settings, dtype: str = "float64") -> dict:
    """Section 1: matmul GFLOP/s in ``dtype`` (float64: dgemm, float32: sgemm), with 1 and with ``threads``
    BLAS threads.

    "The dgemm peak" is the square product's rate on ``threads`` cores: the
    larger of the rate measured with ``threads`` BLAS threads and ``threads``
    times the one-thread rate (on a shared machine the threaded figure can
    fall below the single-threaded one; the per-core figure times the cores
    is then what the hardware gives, and the fraction of it the honest one).
    The sgemm peak likewise, for the float32 rows.
    """
    spec = {"kind": "dgemm", "shapes": [list(x) for x in s.dgemm_shapes], "threads_list": sorted({1, s.threads}),
            "repeats": s.repeats, "dtype": dtype}
    r = run(spec, "dgemm" if dtype == "float64" else "sgemm")
    if r["status"] != "ok":
        return {"status": r["status"], "log": r.get("log", ""), "peak_gflops": None}
    square = {x["threads"]: x["gflops"] for x in r["rows"] if x["shape"] == list(s.dgemm_shapes[0])}
    return {"status": "ok", "rows": r["rows"], "peak_gflops": max(square[s.threads], s.threads * square[1])}


def bench_throughput(run, s: Settings, frames: Path, compressed: Path | None,
                     float32: dict | None = None) -> list[dict]:
    """Sections 2-3: ms/frame on ``nframes`` frames for TF, compressed TF and minidp per chunk size; with
    ``float32`` (make_float32_models' paths) also TF and minidp (default chunks) on the float32 model.

    The contenders take turns, round after round, so that the machine's busy
    spells fall on all of them; each row pools its rounds' timed calls.
    """
    contenders = [("tf", model_spec(s, "tf", frames, nframes=s.nframes), {})]
    if compressed is not None:
        contenders.append(("tf-compressed", model_spec(s, "tf", frames, nframes=s.nframes, model=str(compressed)), {}))
    contenders += [("minidp", model_spec(s, "minidp", frames, nframes=s.nframes, batch_size=bs), {"requested": bs})
                   for bs in s.chunk_sizes]
    if float32 and float32.get("pb"):
        contenders.append(("tf-float32", model_spec(s, "tf", frames, nframes=s.nframes, model=float32["pb"]), {}))
    if float32 and float32.get("dp"):
        contenders.append(("minidp-float32", model_spec(s, "minidp", frames, nframes=s.nframes, model=float32["dp"]),
                           {}))
    raw: list[list[dict]] = [[] for _ in contenders]
    for k in range(s.rounds):
        for (name, spec, extra), got in zip(contenders, raw):
            got.append(run(spec, f"{name} {extra.get('requested', '')} round {k + 1}/{s.rounds}".replace("  ", " ")))
    rows = [timing_row(name, merge_rounds(got), **extra) for (name, _, extra), got in zip(contenders, raw)]
    for ref in ok_rows(rows):
        for row in ok_rows(rows):
            if ref["name"].startswith("tf") and row["name"].startswith("minidp"):
                tag = ref["name"].replace("-", "_")
                row[f"speedup_vs_{tag}"] = ref["ms_per_frame"] / row["ms_per_frame"]
                row[f"speedup_best_vs_{tag}"] = ref["ms_per_frame_min"] / row["ms_per_frame_min"]
    return rows


def bench_budgets(run, s: Settings, frames: Path) -> list[dict]:
    """Section 3b: minidp's peak over the baseline for each memory_budget, on ``budget_frames`` frames."""
    rows = []
    for budget in s.budgets:
        spec = model_spec(s, "minidp", frames, nframes=s.budget_frames, memory_budget=budget)
        row = timing_row("minidp", run(spec, f"budget {budget // MIB} MiB"), budget_mib=budget / MIB)
        if row["status"] == "ok":
            row["over_base_vs_budget"] = row["memory"]["over_base_mib"] * MIB / budget
            row["over_load_vs_budget"] = row["memory"]["over_load_mib"] * MIB / budget
        rows.append(row)
    return rows


def bench_scaling(run, s: Settings, frames: Path) -> list[dict]:
    """Section 4: one frame of replicated boxes per call, minidp then TF at each size.

    Once an implementation fails a size (timeout, memory), its larger sizes
    are skipped: they would only fail slower.
    """
    rows, failed = [], set()
    for reps in s.replicas:
        for name in ("minidp", "tf"):
            tag = "x".join(map(str, reps))
            if name in failed:
                rows.append({"name": name, "reps": tag, "status": "skipped (a smaller size failed)"})
                continue
            spec = model_spec(s, name, frames, reps=list(reps), min_seconds=2.0 if not s.quick else 0.3)
            row = timing_row(name, run(spec, f"{name} {tag}"), reps=tag)
            if row["status"] != "ok":
                failed.add(name)
            rows.append(row)
    return rows


def bench_large(run, s: Settings, frames: Path) -> dict:
    """Section 5: minidp on one frame of LARGE_REPLICAS boxes (> 100,000 atoms) with memory_budget = 2 GiB.

    No full warm-up (the tiny one compiles every kernel); two timed calls.
    """
    reps = s.large_replicas
    spec = model_spec(s, "minidp", frames, reps=list(reps), memory_budget=LARGE_BUDGET, warmup=False,
                      repeats=2, max_seconds=s.timeout)
    row = timing_row("minidp", run(spec, "large frame", timeout=3 * s.timeout), reps="x".join(map(str, reps)),
                     budget_mib=LARGE_BUDGET / MIB)
    if row["status"] == "ok":
        row["over_base_vs_budget"] = row["memory"]["over_base_mib"] * MIB / LARGE_BUDGET
        row["peak_vs_budget"] = row["memory"]["peak_mib"] * MIB / LARGE_BUDGET
    return row


def compress_model(s: Settings) -> dict:
    """``dp --tf compress`` of model_pb into out/model-compressed.pb, once (kept while newer than the .pb).

    dp writes compress.json and a model-compression/ folder into its working
    directory, so it runs in a scratch folder; only a finished model is moved
    into place.
    """
    target = s.out / "model-compressed.pb"
    if target.exists() and target.stat().st_mtime >= s.model_pb.stat().st_mtime:
        return {"status": "ok (cached)", "path": str(target)}
    dp = shutil.which("dp", path=str(Path(sys.executable).parent)) or shutil.which("dp")
    if dp is None:
        return {"status": "failed", "message": "deepmd-kit's dp command was not found", "path": None}
    with tempfile.TemporaryDirectory(dir=s.out, prefix=".compress-") as tmp:
        work = Path(tmp)
        cmd = [dp, "--tf", "compress", "-i", str(s.model_pb.resolve()), "-o", "model-compressed.pb"]
        status = run_process(cmd, child_env(s.threads), work, work / "compress.log", 10 * s.timeout, s.mem_limit)
        if status == "ok" and (work / "model-compressed.pb").exists():
            os.replace(work / "model-compressed.pb", target)
            return {"status": "ok", "path": str(target)}
        return {"status": status, "message": log_tail(work / "compress.log", 10), "path": None}


def make_float32_models(s: Settings, model) -> dict:
    """The float32 model of the run (the .dp's nets rounded to float32, deepmd-kit's ``precision: float32``):
    out/model-float32.dp by minidp, and out/model-float32.pb by ``dp convert-backend`` of it (both kept
    while newer than the model). Returns their paths ("dp", "pb"; None for one that could not be made)
    and a status."""
    dp32, pb32 = s.out / "model-float32.dp", s.out / "model-float32.pb"
    fresh = dp32.exists() and dp32.stat().st_mtime >= s.model_minidp.stat().st_mtime
    if not fresh:
        save_model(dp32, model.astype(np.float32), overwrite=dp32.exists())
    if pb32.exists() and pb32.stat().st_mtime >= dp32.stat().st_mtime:
        return {"status": "ok (cached)", "dp": str(dp32), "pb": str(pb32)}
    dp = shutil.which("dp", path=str(Path(sys.executable).parent)) or shutil.which("dp")
    if dp is None:
        return {"status": "no TF float32 model: deepmd-kit's dp command was not found", "dp": str(dp32), "pb": None}
    with tempfile.TemporaryDirectory(dir=s.out, prefix=".float32-") as tmp:
        work = Path(tmp)
        cmd = [dp, "convert-backend", str(dp32.resolve()), "model-float32.pb"]
        status = run_process(cmd, child_env(s.threads), work, work / "convert.log", 10 * s.timeout, s.mem_limit)
        if status == "ok" and (work / "model-float32.pb").exists():
            os.replace(work / "model-float32.pb", pb32)
            return {"status": "ok", "dp": str(dp32), "pb": str(pb32)}
        return {"status": f"dp convert-backend: {status}", "message": log_tail(work / "convert.log", 10),
                "dp": str(dp32), "pb": None}


def prepare_frames(s: Settings, model, target: Path) -> dict:
    """Read ``--data`` once (dpdata), map its types onto the model's, save float64 arrays for the measurements.

    Returns the arrays too: coords (nf, natoms, 3), cells (nf, 3, 3), atom_types (natoms,).
    """
    from minidp.io.systems import model_types, read_system

    system = read_system(s.data)
    if system.nopbc or "cells" not in system.data:
        raise ValueError(f"{s.data} has no periodic cell; the benchmark replicates periodic boxes")
    frames = {"coords": np.asarray(system["coords"], dtype=np.float64),
              "cells": np.asarray(system["cells"], dtype=np.float64),
              "atom_types": model_types(system["atom_names"], system["atom_types"], model.type_map)}
    if frames["coords"].shape[0] == 0:
        raise ValueError(f"{s.data} holds no frames")
    np.savez(target, **frames)
    return frames


def flops_section(model, frames: dict, results: dict) -> dict:
    """Section 6: FLOPs per frame by part (benchmarks.flops) and what each implementation achieves.

    Achieved GFLOP/s use the best median ms/frame of each implementation in
    the throughput sweep; the fraction is of the square dgemm peak.
    """
    from benchmarks.flops import flops_per_frame, neighbour_counts
    from minidp.neighbor import build_neighbor_list

    cfg = model.descriptor.config
    coords, cells, types = frames["coords"], frames["cells"], frames["atom_types"]
    nl = build_neighbor_list(coords[: results["meta"]["nframes"]], cells[: results["meta"]["nframes"]], types,
                             cfg.rcut, list(cfg.sel))
    counts = neighbour_counts(nl.nlist, types, cfg.sec)
    per_frame = flops_per_frame(model, counts, np.bincount(types, minlength=cfg.ntypes))
    peak = results["dgemm"].get("peak_gflops")
    speak = results.get("sgemm", {}).get("peak_gflops")
    achieved = {}
    # the float32 rows do the same FLOPs as their float64 twins, against the sgemm peak
    for name, parts, top in [(n, p, peak) for n, p in per_frame.items()] + [
            (f"{n}-float32", per_frame[n], speak) for n in ("minidp", "tf")]:
        ms = [r["ms_per_frame"] for r in ok_rows(results["throughput"], name)]
        if ms:
            gflops = parts["total"] / (min(ms) * 1e-3) / 1e9
            achieved[name] = {"ms_per_frame": min(ms), "gflops": gflops,
                              "fraction_of_peak": gflops / top if top else None}
    return {"natoms": int(types.size), "real_neighbours_per_atom": float(counts.sum()) / types.size,
            "slots_per_atom": cfg.nnei, "per_frame": per_frame, "achieved": achieved, "dgemm_peak_gflops": peak,
            "sgemm_peak_gflops": speak}


def meta(s: Settings) -> dict:
    """Machine, versions and settings: what the numbers were measured on."""
    import platform

    import numba

    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        import deepmd

        versions["deepmd-kit"] = deepmd.__version__
    except ImportError:
        versions["deepmd-kit"] = None
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    return {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run"] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "cores": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "versions": versions, "threads": s.threads, "quick": s.quick,
            "model_pb": str(s.model_pb), "model_minidp": str(s.model_minidp), "data": str(s.data),
            "nframes": s.nframes, "budget_frames": s.budget_frames, "rounds": s.rounds, "repeats": s.repeats,
            "timeout_s": s.timeout, "mem_limit_gib": s.mem_limit / GIB,
            "DP_INFER_BATCH_SIZE": os.environ.get("DP_INFER_BATCH_SIZE", "default (1024)")}


def run_all(s: Settings, run=None) -> dict:
    """Every section in order; ``run`` (spec, label[, timeout]) -> result defaults to a subprocess Runner."""
    from tqdm.auto import tqdm

    from minidp.io.serialization import load_model

    t0 = time.time()
    model = load_model(s.model_minidp)
    s.out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta(s), "compress": compress_model(s)}
    compressed = Path(results["compress"]["path"]) if results["compress"].get("path") else None
    float32 = make_float32_models(s, model) if s.float32 and not s.compressed_only else None
    if float32:
        results["float32_models"] = float32
    total = (1 + s.rounds * (1 + (compressed is not None) + len(s.chunk_sizes)) + len(s.budgets)
             + 2 * len(s.replicas) + (s.large_replicas is not None))
    total += (1 + 2 * s.rounds) if float32 else 0
    total = (0 if s.compressed_only else total) + 4 * s.rounds + 2 * len(s.replicas)
    with tempfile.TemporaryDirectory(dir=s.out, prefix=".work-") as tmp, \
            tqdm(total=total, unit="run", disable=None) as bar:
        work = Path(tmp)
        frames = prepare_frames(s, model, work / "frames.npz")
        run = run or Runner(s, work, bar)
        from benchmarks import compressed as section

        if compressed is not None:
            results["compress_minidp"] = section.compress_minidp(s, run_process, child_env, work)
        if compressed is not None and results["compress_minidp"]["path"]:
            results["compressed"] = section.bench(run, s, work / "frames.npz", compressed,
                                                  Path(results["compress_minidp"]["path"]), model_spec, timing_row)
        if s.compressed_only:
            results["meta"].update(elapsed_s=time.time() - t0, loadavg_end=os.getloadavg())
            return results
        results["dgemm"] = bench_dgemm(run, s)
        if float32:
            results["sgemm"] = bench_dgemm(run, s, "float32")
        results["throughput"] = bench_throughput(run, s, work / "frames.npz", compressed, float32)
        results["budgets"] = bench_budgets(run, s, work / "frames.npz")
        results["scaling"] = bench_scaling(run, s, work / "frames.npz")
        if s.large_replicas is not None:
            results["large"] = bench_large(run, s, work / "frames.npz")
    results["flops"] = flops_section(model, frames, results)
    results["meta"].update(elapsed_s=time.time() - t0, loadavg_end=os.getloadavg())
    return results


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line (ValueError naming a bad value)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SHARED / "models" / "water-14000.pb", help="deepmd-kit frozen .pb")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_3", help="system of frames")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")
    p.add_argument("--quick", action="store_true", help="a 1-2 minute version")
    p.add_argument("--threads", type=int, default=2, help="threads of both implementations (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (default 120)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GiB of resident memory at which a measurement is killed (default: 8, or 40%% of free memory)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default 2, quick 1)")
    p.add_argument("--compressed-only", action="store_true", help="only the compressed models' section")
    p.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                   help="also the float32 model, minidp and TF, beside float64 (default on)")
    a = p.parse_args(argv)
    if a.model.suffix != ".pb" or not a.model.is_file():
        raise ValueError(f"--model {a.model} must be an existing deepmd-kit frozen model (.pb)")
    if not a.data.is_dir():
        raise ValueError(f"--data {a.data} is not a folder; expected a deepmd/npy system")
    for name in ("threads", "timeout", "mem_limit", "rounds"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return replace(settings(a.model, a.data, a.out, a.threads, a.quick, a.timeout, a.mem_limit, a.rounds),
                   compressed_only=a.compressed_only, float32=a.float32)


def settings(model: Path, data: Path, out: Path, threads: int, quick: bool, timeout: float = 120.0,
             mem_limit_gib: float | None = None, rounds: int | None = None) -> Settings:
    """The full or the quick plan for a model and data."""
    dp_file = model.with_suffix(".dp")
    if mem_limit_gib is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 16 * GIB
        mem_limit_gib = min(8.0, 0.4 * free / GIB)
    base = Settings(model_pb=model, model_minidp=dp_file if dp_file.is_file() else model, data=data, out=out,
                    threads=threads, quick=quick, timeout=timeout, mem_limit=int(mem_limit_gib * GIB),
                    rounds=rounds or 2, nframes=40, budget_frames=80, repeats=3, chunk_sizes=CHUNK_SIZES,
                    budgets=BUDGETS, replicas=REPLICAS, large_replicas=LARGE_REPLICAS, dgemm_shapes=DGEMM_SHAPES)
    if not quick:
        return base
    return replace(base, rounds=rounds or 1, nframes=20, budget_frames=40, repeats=3, chunk_sizes=(192, 960, 7680),
                   budgets=(256 * MIB,), replicas=((1, 1, 1), (2, 2, 1), (2, 2, 2)), large_replicas=None)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write its outputs, print their paths and the Markdown table."""
    try:
        s = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_all(s)
    if s.compressed_only:
        from benchmarks.compressed import write_outputs as write_compressed

        write_outputs_ = write_compressed
    else:
        write_outputs_ = write_outputs
    for path in write_outputs_(results, s.out):
        print(path)
    print((s.out / ("results-compressed.md" if s.compressed_only else "results.md")).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
