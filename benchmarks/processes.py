"""Processes of the benchmark: their environment, a watchdog on time and memory, a busy neighbour (--load).

Shared by :mod:`benchmarks.run` and its sections (:mod:`benchmarks.training`, :mod:`benchmarks.deepmd_pt`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def child_env(threads: int, first_path: str | None = None) -> dict[str, str]:
    """The environment of a measurement: every thread pool at ``threads``, TensorFlow quiet.

    TF gets intra-op and inter-op pools of ``threads`` each, which is what
    deepmd-kit picks by default on a ``threads``-core machine and was the
    fastest setting we measured for it at 2 threads (deepmd-kit's PyTorch
    backend reads the same two variables). ``first_path`` goes first on
    PYTHONPATH (the copy of deepmd-kit that runs its PyTorch backend,
    :mod:`benchmarks.deepmd_pt`).
    """
    env = dict(os.environ)
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n, NUMBA_NUM_THREADS=n,
               DP_INTRA_OP_PARALLELISM_THREADS=n, DP_INTER_OP_PARALLELISM_THREADS=n, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([p for p in [first_path, str(ROOT), env.get("PYTHONPATH")] if p]))
    return env


# A CPU-bound neighbour for --load: one thread of NumPy arithmetic on a small array (in cache, no BLAS),
# forever, until killed.
BUSY_LOOP = "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = np.sin(a) + 0.5\n"


@contextmanager
def busy_neighbour(enabled: bool = True):
    """A second, single-threaded CPU-bound process beside the block (--load), killed when the block ends.

    Yields its pid (None when not enabled).
    """
    if not enabled:
        yield None
        return
    env = dict(child_env(1), PYTHONPATH="")
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


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


def dp_command() -> str | None:
    """deepmd-kit's ``dp`` command beside this interpreter, else on PATH (None when there is none)."""
    return shutil.which("dp", path=str(Path(sys.executable).parent)) or shutil.which("dp")
