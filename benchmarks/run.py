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
6. FLOPs per frame (:mod:`benchmarks.flops`) and the fraction of the dgemm peak, also per minidp row;
7. float32 rows (``--no-float32`` to skip); deepmd-kit's PyTorch backend from a copy of the package
   (:mod:`benchmarks.deepmd_pt`, ``--no-pt`` to skip); one frame per call;
8. training: dp --tf / --pt train against minidp train, s/step (:mod:`benchmarks.training`, ``--train-steps``);
9. ``--load``: every measurement also with a busy process beside it, every ratio idle and loaded.

Outputs in ``--out`` (each written whole, then renamed): results.json,
results.md (its summary table: :func:`benchmarks.report.summary_md`), PNG plots (:mod:`benchmarks.report`).
Medians throughout; ratios
are of medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numba
import numpy as np

from benchmarks import deepmd_pt, training
from benchmarks.measure import cpu_name
from benchmarks.processes import (
    ROOT,
    busy_neighbour,
    child_env,
    dp_command,
    log_tail,
    run_process,
)
from benchmarks.report import ok_rows, write_outputs
from minidp.io.serialization import save_model

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
# deepmd-kit's PyTorch measurements get this many times --timeout
PT_TIMEOUT_FACTOR = 3
# steps of each training run (the issue's: 300, disp_freq 100, the first 100 left out as warm-up)
TRAIN_STEPS = 300


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
    pt: bool = False  # also deepmd-kit's PyTorch backend (benchmarks.deepmd_pt; on from the command line)
    train_steps: int | None = None  # training steps of each training run (None: no training section)
    load: bool = False  # every measurement also with a CPU-bound busy process beside it
    shared: Path = SHARED  # models/input.json and data/water/data_0..3: the training section's input


# ---------------------------------------------------------------------------
# Running one measurement
# ---------------------------------------------------------------------------


class Runner:
    """Runs specs through benchmarks.measure in fresh processes, in a scratch folder."""

    def __init__(self, settings: Settings, work: Path, bar):
        self.settings = settings  # the run's settings (threads, limits)
        self.work = work  # scratch folder for specs, results and logs
        self.bar = bar  # tqdm bar, advanced once per measurement
        self.count = 0  # measurements started, for unique file names

    def __call__(self, spec: dict, label: str, timeout: float | None = None) -> dict:
        """The measurement's result dict plus "status" (and "log" when it did not succeed).

        With ``--load`` a model measurement is made twice, back to back: idle, then with
        :func:`busy_neighbour` beside it; the second result is the first's "loaded".
        """
        result = self.once(spec, label, timeout, loaded=False)
        if self.settings.load and spec["kind"] != "dgemm":
            result["loaded"] = self.once(spec, label + " (loaded)", timeout, loaded=True)
        return result

    def once(self, spec: dict, label: str, timeout: float | None, loaded: bool) -> dict:
        """One measurement in a fresh process (with the busy neighbour beside it when ``loaded``)."""
        s, self.count = self.settings, self.count + 1
        paths = [self.work / f"{self.count:03d}.{ext}" for ext in ("spec.json", "result.json", "log")]
        paths[0].write_text(json.dumps(spec))
        self.bar.set_description(label)
        cmd = [sys.executable, "-m", "benchmarks.measure", str(paths[0]), str(paths[1])]
        with busy_neighbour(loaded):
            status = run_process(cmd, child_env(s.threads, spec.get("pythonpath")), ROOT, paths[2],
                                 timeout or s.timeout, s.mem_limit)
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
    loaded = [r["loaded"] for r in results if "loaded" in r]
    if loaded:  # --load: the loaded twins, merged the same way
        merged["loaded"] = merge_rounds(loaded)
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
    if "loaded" in r:  # --load: the same measurement with a busy process beside it
        row["loaded"] = timing_row(name, r["loaded"], **extra)
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


ONE_FRAME = "one frame per call"


def bench_throughput(run, s: Settings, frames: Path, compressed: Path | None,
                     float32: dict | None = None, pt: dict | None = None) -> dict[str, list[dict]]:
    """Sections 2-3: ms/frame on ``nframes`` frames for TF, compressed TF and minidp per chunk size; with
    ``float32`` (make_float32_models' paths) also TF and minidp (default chunks) on the float32 model; with
    ``pt`` (make_pt_models' paths) deepmd-kit's PyTorch backend on both. Then one frame per call (each call
    waits for the last, as in MD): TF, PyTorch and minidp (default chunks).

    The contenders take turns, round after round, so that the machine's busy
    spells fall on all of them; each row pools its rounds' timed calls.
    Returns {"batch": rows, "one_frame": rows}.
    """
    pt = pt or {}
    pt_spec = {"pythonpath": pt.get("pythonpath")}
    contenders = [("tf", model_spec(s, "tf", frames, nframes=s.nframes), {})]
    if compressed is not None:
        contenders.append(("tf-compressed", model_spec(s, "tf", frames, nframes=s.nframes, model=str(compressed)), {}))
    if pt.get("pth"):
        contenders.append(("pt", model_spec(s, "pt", frames, nframes=s.nframes, model=pt["pth"], **pt_spec), {}))
    contenders += [("minidp", model_spec(s, "minidp", frames, nframes=s.nframes, batch_size=bs), {"requested": bs})
                   for bs in s.chunk_sizes]
    if float32 and float32.get("pb"):
        contenders.append(("tf-float32", model_spec(s, "tf", frames, nframes=s.nframes, model=float32["pb"]), {}))
    if pt.get("pth_float32"):
        contenders.append(("pt-float32", model_spec(s, "pt", frames, nframes=s.nframes, model=pt["pth_float32"],
                                                    **pt_spec), {}))
    if float32 and float32.get("dp"):
        contenders.append(("minidp-float32", model_spec(s, "minidp", frames, nframes=s.nframes, model=float32["dp"]),
                           {}))
    # one short call at a time: repeated for at least two seconds (0.3 in --quick)
    one = {"nframes": 1, "min_seconds": 0.3 if s.quick else 2.0}
    contenders += [("tf", model_spec(s, "tf", frames, **one), {"mode": ONE_FRAME})]
    if pt.get("pth"):
        contenders.append(("pt", model_spec(s, "pt", frames, model=pt["pth"], **one, **pt_spec), {"mode": ONE_FRAME}))
    contenders.append(("minidp", model_spec(s, "minidp", frames, **one), {"mode": ONE_FRAME}))
    raw: list[list[dict]] = [[] for _ in contenders]
    for k in range(s.rounds):
        for (name, spec, extra), got in zip(contenders, raw):
            label = " ".join(str(x) for x in (name, extra.get("requested", ""), extra.get("mode", "")) if x)
            # deepmd-kit's PyTorch backend is the slowest contender and warms up twice: more time before the kill
            timeout = PT_TIMEOUT_FACTOR * s.timeout if spec["kind"] == "pt" else None
            got.append(run(spec, f"{label} round {k + 1}/{s.rounds}", timeout))
    rows = [timing_row(name, merge_rounds(got), **extra) for (name, _, extra), got in zip(contenders, raw)]
    batch, one_frame = [r for r in rows if "mode" not in r], [r for r in rows if "mode" in r]
    for group in (batch, one_frame):
        add_speedups(group)
        add_speedups([r["loaded"] for r in group if "loaded" in r])
    return {"batch": batch, "one_frame": one_frame}


def add_speedups(rows: list[dict]) -> None:
    """Into every minidp row: deepmd-kit's median (and fastest) ms/frame over minidp's, for every deepmd-kit
    row of the same measurement mode ("speedup_vs_tf", "speedup_vs_pt_float32", ...)."""
    for ref in ok_rows(rows):
        for row in ok_rows(rows):
            if ref["name"].startswith(("tf", "pt")) and row["name"].startswith("minidp"):
                tag = ref["name"].replace("-", "_")
                row[f"speedup_vs_{tag}"] = ref["ms_per_frame"] / row["ms_per_frame"]
                row[f"speedup_best_vs_{tag}"] = ref["ms_per_frame_min"] / row["ms_per_frame_min"]


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
    dp = dp_command()
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


def convert_backend(s: Settings, source: Path, target: Path, first_path: str | None = None) -> dict:
    """``dp convert-backend source target`` (the target's suffix picks deepmd-kit's backend: .pb TensorFlow,
    .pth PyTorch), once: kept while newer than source. ``first_path`` goes first on PYTHONPATH (the copy of
    deepmd-kit of :mod:`benchmarks.deepmd_pt`, for .pth). dp runs in a scratch folder; only a finished model
    is moved into place.

    Returns {"status", "path" (None when it could not be made), "message" (the log's tail on failure)}.
    """
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return {"status": "ok (cached)", "path": str(target)}
    dp = dp_command()
    if dp is None:
        return {"status": "deepmd-kit's dp command was not found", "path": None}
    with tempfile.TemporaryDirectory(dir=s.out, prefix=".convert-") as tmp:
        work = Path(tmp)
        cmd = [dp, "convert-backend", str(source.resolve()), target.name]
        status = run_process(cmd, child_env(s.threads, first_path), work, work / "convert.log", 10 * s.timeout,
                             s.mem_limit)
        if status == "ok" and (work / target.name).exists():
            os.replace(work / target.name, target)
            return {"status": "ok", "path": str(target)}
        return {"status": f"dp convert-backend: {status}", "message": log_tail(work / "convert.log", 10),
                "path": None}


def make_float32_models(s: Settings, model) -> dict:
    """The float32 model of the run (the .dp's nets rounded to float32, deepmd-kit's ``precision: float32``):
    out/model-float32.dp by minidp, and out/model-float32.pb by ``dp convert-backend`` of it (both kept
    while newer than the model). Returns their paths ("dp", "pb"; None for one that could not be made)
    and a status."""
    dp32 = s.out / "model-float32.dp"
    fresh = dp32.exists() and dp32.stat().st_mtime >= s.model_minidp.stat().st_mtime
    if not fresh:
        save_model(dp32, model.astype(np.float32), overwrite=dp32.exists())
    pb32 = convert_backend(s, dp32, s.out / "model-float32.pb")
    return {"status": pb32["status"], "dp": str(dp32), "pb": pb32["path"],
            **({"message": pb32["message"]} if pb32.get("message") else {})}


def make_pt_models(s: Settings, float32: dict | None) -> dict:
    """deepmd-kit's PyTorch backend for the run: the copy of the package (:mod:`benchmarks.deepmd_pt`) and the
    model as .pth by ``dp convert-backend`` of the minidp model (and of the float32 .dp when there is one),
    each made once into ``--out``.

    Returns {"status", "pythonpath" (the copy's folder, None when the backend cannot run), "pth",
    "pth_float32" (None for one that could not be made), "message" (why, on failure)}.
    """
    copy = deepmd_pt.package_copy(s.out)
    result = {"status": copy["status"], "pythonpath": copy["pythonpath"], "pth": None, "pth_float32": None}
    if copy["pythonpath"] is None:
        return result
    pth = convert_backend(s, s.model_minidp, s.out / "model.pth", copy["pythonpath"])
    result.update(status=pth["status"], pth=pth["path"], message=pth.get("message"))
    if pth["path"] is None:
        result["pythonpath"] = None
        return result
    if float32 and float32.get("dp"):
        pth32 = convert_backend(s, Path(float32["dp"]), s.out / "model-float32.pth", copy["pythonpath"])
        result["pth_float32"] = pth32["path"]
        if pth32["path"] is None:
            result["message"] = f"float32 .pth: {pth32['status']}: {pth32.get('message')}"
    return result


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
    from benchmarks.flops import flops_per_frame, neighbour_counts, training_flops
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
    # the float32 rows do the same FLOPs as their float64 twins, against the sgemm peak; deepmd-kit's PyTorch
    # se_e2_a runs every sel slot through the nets, as TF does
    counted = [(n, p, peak) for n, p in per_frame.items()] + [("pt", per_frame["tf"], peak)] + [
        (f"{n}-float32", per_frame["tf" if n == "pt" else n], speak) for n in ("minidp", "tf", "pt")]
    for name, parts, top in counted:
        ms = [r["ms_per_frame"] for r in ok_rows(results["throughput"], name)]
        if ms:
            gflops = parts["total"] / (min(ms) * 1e-3) / 1e9
            achieved[name] = {"ms_per_frame": min(ms), "gflops": gflops,
                              "fraction_of_peak": gflops / top if top else None}
    for row in ok_rows(results["throughput"]) + ok_rows(results["one_frame"]):
        if row["name"].startswith("minidp"):
            add_rate(row, per_frame["minidp"]["total"], speak if row["name"].endswith("float32") else peak)
    # a training step of the water input is one frame of these (batch_size "auto": 32 atoms or more)
    step = training_flops(model, counts, np.bincount(types, minlength=cfg.ntypes))["total"]
    for row in ok_rows(results.get("training", {}).get("rows", []), "minidp"):
        top = speak if row["precision"] == "float32" else peak
        row["gflops"] = step / row["seconds_per_step"] / 1e9
        row["fraction_of_gemm"] = row["gflops"] / top if top else None
    return {"natoms": int(types.size), "real_neighbours_per_atom": float(counts.sum()) / types.size,
            "slots_per_atom": cfg.nnei, "per_frame": per_frame, "achieved": achieved, "dgemm_peak_gflops": peak,
            "sgemm_peak_gflops": speak}


def add_rate(row: dict, flops: float, gemm_peak: float | None) -> None:
    """Into a timing row (and its loaded twin): "gflops" = flops per frame / median time per frame, and
    "fraction_of_gemm" of the gemm peak (dgemm for float64 rows, sgemm for float32 ones)."""
    for r in [row] + ([row["loaded"]] if row.get("loaded", {}).get("status") == "ok" else []):
        r["gflops"] = flops / (r["ms_per_frame"] * 1e-3) / 1e9
        r["fraction_of_gemm"] = r["gflops"] / gemm_peak if gemm_peak else None


def meta(s: Settings) -> dict:
    """Machine, versions and settings: what the numbers were measured on."""
    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        import deepmd

        versions["deepmd-kit"] = deepmd.__version__
    except ImportError:
        versions["deepmd-kit"] = None
    return {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run"] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "versions": versions, "threads": s.threads, "quick": s.quick,
            "model_pb": str(s.model_pb), "model_minidp": str(s.model_minidp), "data": str(s.data),
            "nframes": s.nframes, "budget_frames": s.budget_frames, "rounds": s.rounds, "repeats": s.repeats,
            "timeout_s": s.timeout, "mem_limit_gib": s.mem_limit / GIB,
            "DP_INFER_BATCH_SIZE": os.environ.get("DP_INFER_BATCH_SIZE", "default (1024)")}


def planned_runs(s: Settings, compressed: bool, float32: dict | None, pt: dict | None) -> int:
    """Measurements the run will make (for the progress bar; training runs not included)."""
    n_pt = bool(pt and pt["pythonpath"]) * (2 + bool(pt and pt.get("pth_float32")))
    total = (1 + s.rounds * (1 + compressed + len(s.chunk_sizes) + 2 + n_pt) + len(s.budgets)
             + 2 * len(s.replicas) + (s.large_replicas is not None))
    total += (1 + 2 * s.rounds) if float32 else 0
    total = (0 if s.compressed_only else total) + 4 * s.rounds + 2 * len(s.replicas)
    return total * (1 + s.load)


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
    pt = make_pt_models(s, float32) if s.pt and not s.compressed_only else None
    if pt:
        results["pt"] = pt
        if pt["pythonpath"] is None:  # the one line of why: the run goes on without these rows
            why = f"{pt['status']} ({pt['message']})" if pt.get("message") else pt["status"]
            print("deepmd-kit PyTorch rows skipped: " + why.replace("\n", " / "), file=sys.stderr)
    pt_path = pt["pythonpath"] if pt else None
    train = bool(s.train_steps) and not s.compressed_only
    total = planned_runs(s, compressed is not None, float32, pt) + (training.runs_planned(s, pt_path) if train else 0)
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
        sweep = bench_throughput(run, s, work / "frames.npz", compressed, float32, pt)
        results["throughput"], results["one_frame"] = sweep["batch"], sweep["one_frame"]
        results["budgets"] = bench_budgets(run, s, work / "frames.npz")
        results["scaling"] = bench_scaling(run, s, work / "frames.npz")
        if s.large_replicas is not None:
            results["large"] = bench_large(run, s, work / "frames.npz")
        if train:
            results["training"] = training.bench(s, s.shared, work, pt_path, bar)
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
    p.add_argument("--quick", action="store_true",
                   help="a short version: fewer frames, sizes, rounds and 20 training steps")
    p.add_argument("--threads", type=int, default=2, help="threads of every program (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (default 120)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GiB of resident memory at which a measurement is killed (default: 8, or 40%% of free memory)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default 2, quick 1)")
    p.add_argument("--compressed-only", action="store_true", help="only the compressed models' section")
    p.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                   help="also the float32 model, minidp and TF, beside float64 (default on)")
    p.add_argument("--pt", action=argparse.BooleanOptionalAction, default=True,
                   help="also deepmd-kit's PyTorch backend, from a copy of the package in --out (default on)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="steps of each training run (default 300, quick 20; 0 skips the training section)")
    p.add_argument("--load", action="store_true",
                   help="every measurement also with a CPU-bound busy process beside it; ratios idle and loaded")
    p.add_argument("--shared", type=Path, default=SHARED,
                   help="folder with models/input.json and data/water/data_0..3 (the training input)")
    a = p.parse_args(argv)
    if a.model.suffix != ".pb" or not a.model.is_file():
        raise ValueError(f"--model {a.model} must be an existing deepmd-kit frozen model (.pb)")
    if not a.data.is_dir():
        raise ValueError(f"--data {a.data} is not a folder; expected a deepmd/npy system")
    for name in ("threads", "timeout", "mem_limit", "rounds"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if a.train_steps is not None and a.train_steps < 0:
        raise ValueError(f"--train-steps must be 0 (no training section) or more, got {a.train_steps}")
    base = settings(a.model, a.data, a.out, a.threads, a.quick, a.timeout, a.mem_limit, a.rounds)
    steps = base.train_steps if a.train_steps is None else a.train_steps
    if steps and not (a.shared / "models" / "input.json").is_file():
        raise ValueError(f"--shared {a.shared} has no models/input.json for the training section; "
                         "expected the shared folder (or --train-steps 0)")
    return replace(base, compressed_only=a.compressed_only, float32=a.float32, pt=a.pt, load=a.load,
                   train_steps=steps or None, shared=a.shared)


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
                    budgets=BUDGETS, replicas=REPLICAS, large_replicas=LARGE_REPLICAS, dgemm_shapes=DGEMM_SHAPES,
                    train_steps=TRAIN_STEPS)
    if not quick:
        return base
    return replace(base, rounds=rounds or 1, nframes=20, budget_frames=40, repeats=3, chunk_sizes=(192, 960, 7680),
                   budgets=(256 * MIB,), replicas=((1, 1, 1), (2, 2, 1), (2, 2, 2)), large_replicas=None,
                   train_steps=20)


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
