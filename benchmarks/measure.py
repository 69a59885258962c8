r"""One measurement in a process of its own: ``python -m benchmarks.measure SPEC.json RESULT.json``.

:mod:`benchmarks.run` writes a spec (a JSON dict), starts this module in a
fresh interpreter with the thread settings it wants, and reads the result.
A process per measurement makes the peak resident memory (``ru_maxrss``)
belong to that measurement alone, and keeps TensorFlow's and Numba's thread
pools from meeting.

A model measurement (``kind`` "minidp", "tf" or "pt": deepmd-kit's TensorFlow or PyTorch) goes in five steps:

1. import the library, load the model and the frames: ``rss_load`` (bytes);
2. a tiny warm-up, two atoms of each type of the first frame, which compiles
   the Numba kernels (or builds TensorFlow's session) without touching the
   memory a full call needs: ``rss_base``; then the peak is reset
   (Linux's ``/proc/self/clear_refs``), so the peak that follows is the calls';
3. a full warm-up call, two for deepmd-kit's TorchScript model (their time is kept, as ``warmup_s``);
4. timed calls, each one ``eval`` of all the frames (:func:`time_calls`
   decides how many), and the cores they kept busy on average (CPU time
   over wall time: less than the threads asked for when the machine is
   shared, which flags a disturbed measurement);
5. ``peak``: ``ru_maxrss`` since the reset; ``peak_setup`` is the one before.

Memory is reported as measured, in bytes; what it means (peak over the
baseline, against a budget) is :mod:`benchmarks.run`'s business.

Shape symbols: ``nf`` frames, ``natoms`` atoms per frame, ``nrep`` replicas
of a box (local to this module).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

# ---------------------------------------------------------------------------
# Memory of this process
# ---------------------------------------------------------------------------


def rss_now() -> int:
    """Resident memory now (bytes), from /proc/self/status; the peak where that file is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    """Peak resident memory (bytes) of this process, ``ru_maxrss`` (kB on Linux) since start or the last reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads (from getrusage)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak() -> bool:
    """Reset the peak to the current resident memory (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def replicate(coords: np.ndarray, cell: np.ndarray, atom_types: np.ndarray, reps) -> tuple:
    r"""A periodic box tiled reps = (n_a, n_b, n_c) times along its lattice vectors.

    .. math::  \mathbf r_{i,\mathbf n} = \mathbf r_i + \mathbf n \cdot \mathbf h,
               \quad 0 \le n_k < \mathrm{reps}_k,\qquad \mathbf h' = \mathrm{diag}(\mathrm{reps})\,\mathbf h

    Every atom keeps its environment exactly (the same neighbours at the same
    displacements), so energies per atom and work per atom do not change.
    coords (natoms, 3), cell (3, 3) with lattice vectors as rows; returns
    coords (nrep * natoms, 3), cell (3, 3), atom_types (nrep * natoms,).
    """
    reps = np.asarray(reps, dtype=int)
    if reps.shape != (3,) or (reps < 1).any():
        raise ValueError(f"reps must be three positive integers, got {reps.tolist()}")
    # (nrep, 3)  integer lattice shifts n
    shifts = np.stack(np.meshgrid(*(np.arange(r) for r in reps), indexing="ij"), axis=-1).reshape(-1, 3)
    # (nrep * natoms, 3)
    tiled = (coords[None] + (shifts @ cell)[:, None]).reshape(-1, 3)
    # (3, 3)
    big_cell = cell * reps[:, None]
    return tiled, big_cell, np.tile(atom_types, len(shifts))


def tiny_subset(atom_types: np.ndarray, per_type: int = 2) -> np.ndarray:
    """Indices of the first ``per_type`` atoms of each type present: a frame small enough to warm up on."""
    return np.concatenate([np.flatnonzero(atom_types == t)[:per_type] for t in np.unique(atom_types)])


def load_frames(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spec's input: ``nframes`` frames of the .npz (cycled if it has fewer), or its first frame
    replicated ``reps`` times.

    Returns coords (nf, natoms, 3), cells (nf, 3, 3) and atom_types (natoms,), float64 / int.
    """
    with np.load(spec["frames"]) as npz:
        coords, cells, types = npz["coords"], npz["cells"], npz["atom_types"]
    if spec.get("reps"):
        xyz, cell, types = replicate(coords[0], cells[0], types, spec["reps"])
        return xyz[None], cell[None], types
    # (nf,)  frame indices, cycling through the stored frames
    idx = np.arange(spec["nframes"]) % coords.shape[0]
    return coords[idx], cells[idx], types


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_calls(call: Callable[[], object], repeats: int, min_seconds: float = 0.0,
               max_seconds: float = float("inf"), max_calls: int = 1000) -> list[float]:
    """Wall-clock seconds of successive calls.

    At least one call; then more while fewer than ``repeats`` were made or
    they took less than ``min_seconds`` in all (short calls are repeated
    until the total is long enough to time), but not past ``max_seconds``
    in all nor more than ``max_calls``.
    """
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        total = sum(times)
        if len(times) >= max_calls or total >= max_seconds:
            return times
        if len(times) >= repeats and total >= min_seconds:
            return times


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# The two implementations behind one call signature
# ---------------------------------------------------------------------------


def deepmd_evaluator(spec: dict) -> tuple[Callable, dict]:
    """deepmd-kit's DeepPot on the spec's model: TensorFlow for a .pb, PyTorch for a .pth (run.py then puts
    the copy of deepmd-kit of benchmarks.deepmd_pt first on PYTHONPATH); threads come from the environment."""
    from deepmd.infer import DeepPot

    dp = DeepPot(spec["model"])

    def evaluate(coords, cells, types):
        nf = coords.shape[0]
        return dp.eval(coords.reshape(nf, -1), cells.reshape(nf, 9), types)

    return evaluate, {"backend": type(dp.deep_eval).__name__}


def minidp_evaluator(spec: dict) -> tuple[Callable, dict]:
    """minidp's DeepPot with the spec's batch_size / memory_budget / workers (None: minidp's defaults)."""
    from minidp import DeepPot
    from minidp.infer import bytes_per_atom

    dp = DeepPot(spec["model"], batch_size=spec.get("batch_size"), memory_budget=spec.get("memory_budget"),
                 workers=spec.get("workers"), progress=False, backend=spec.get("backend", "numba"))
    info = {"batch_size": dp.batch_size, "workers": dp.workers, "bytes_per_atom": bytes_per_atom(dp.model)}
    return dp.eval, info


def chunk_info(info: dict, nf: int, natoms: int) -> dict:
    """How minidp cuts this input: the chunks and the largest chunk's centre atoms."""
    from minidp.infer import plan_chunks

    chunks = plan_chunks(nf, natoms, info["batch_size"], info["workers"])
    sizes = [(c.frames.stop - c.frames.start) * (c.atoms.stop - c.atoms.start) for c in chunks]
    return {"n_chunks": len(chunks), "chunk_atoms": max(sizes)}


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def measure_model(spec: dict) -> dict:
    """The five steps of the module docstring for one implementation on one input."""
    make = {"tf": deepmd_evaluator, "pt": deepmd_evaluator, "minidp": minidp_evaluator}[spec["kind"]]
    evaluate, info = make(spec)
    coords, cells, types = load_frames(spec)
    nf, natoms, _ = coords.shape
    if spec["kind"] == "minidp":
        info.update(chunk_info(info, nf, natoms))
    rss_load = rss_now()
    sub = tiny_subset(types)
    evaluate(coords[:1, sub], cells[:1], types[sub])
    rss_base, peak_setup = rss_now(), peak_rss()
    was_reset = reset_peak()
    t0 = time.perf_counter()
    if spec.get("warmup", True):
        # deepmd-kit's PyTorch model is TorchScript: its profiling executor optimises the graph only after
        # the first two calls, so it gets two warm-up calls
        for _ in range(2 if spec["kind"] == "pt" else 1):
            evaluate(coords, cells, types)
    warmup_s = time.perf_counter() - t0
    out = {}

    def call():
        out["e"] = evaluate(coords, cells, types)[0]

    cpu0 = cpu_seconds()
    times = time_calls(call, spec.get("repeats", 5), spec.get("min_seconds", 0.0), spec.get("max_seconds", 60.0))
    # cores kept busy on average: below the thread count when others share the machine (or threads wait)
    cores_used = (cpu_seconds() - cpu0) / sum(times)
    return {**info, "nframes": nf, "natoms": natoms, "times": times, "warmup_s": warmup_s, "cores_used": cores_used,
            "rss_load": rss_load, "rss_base": rss_base, "peak": peak_rss(), "peak_setup": peak_setup,
            "peak_was_reset": was_reset, "energy_per_atom": float(np.asarray(out["e"]).ravel()[0]) / natoms}


def measure_dgemm(spec: dict) -> dict:
    """GFLOP/s of matmuls C = A B (2 m k n FLOPs) for each shape (m, k, n) and BLAS thread count, in the
    spec's ``dtype`` (default float64: dgemm; float32: sgemm)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    dtype = np.dtype(spec.get("dtype", "float64"))
    rows = []
    for m, k, n in spec["shapes"]:
        # (m, k), (k, n), (m, n)
        a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
        c = np.empty((m, n), dtype)
        for threads in spec["threads_list"]:
            with threadpool_limits(threads):
                np.matmul(a, b, out=c)  # warm-up: BLAS thread start, page faults on c
                times = time_calls(lambda: np.matmul(a, b, out=c), spec.get("repeats", 5),
                                   spec.get("min_seconds", 0.5), spec.get("max_seconds", 20.0))
            rows.append({"shape": [m, k, n], "threads": threads, "times": times,
                         "gflops": 2.0 * m * k * n / float(np.median(times)) / 1e9})
    return {"rows": rows}


def main(argv: list[str]) -> int:
    """Read the spec, measure, write the result as JSON (to a temporary name, then renamed)."""
    if len(argv) != 2:
        print("usage: python -m benchmarks.measure SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = measure_dgemm(spec) if spec["kind"] == "dgemm" else measure_model(spec)
    target = Path(argv[1])
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
