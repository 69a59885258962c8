"""The process-wide settings minidp changes, all in this one module.

Two settings belong to the whole process rather than to one call, so minidp
changes them only where it must, and says so:

- **malloc** (:func:`keep_freed_memory`): every inference chunk and every
  training step allocates and frees the same few large arrays. By default
  glibc hands blocks over 32 MB (or, at first, 128 kB) back to the kernel at
  once, and each new array then pays a page fault per 4 kB touched, which
  made NumPy's temporaries 3-4x slower here. minidp raises glibc's mmap and
  trim thresholds so freed blocks stay in the process, and keeps every
  thread's blocks in the one (main) arena: glibc gives a thread an arena of
  its own, whose heaps (64 MB at most) are unmapped as they empty whatever the
  thresholds say: a float64 training run's kept worker thread (:class:`Workers`)
  grew a second heap and dropped it at every step, ~4,000 page faults a step
  (10% of its time) in about half the runs. (One arena costs float32 steps
  ~1 ms of 46 here, the threads sharing its free lists; the page faults cost 9.)
  ``DeepPot`` and ``minidp train`` call it. Opt out with the environment variable
  ``MINIDP_KEEP_FREED_MEMORY=0`` (or ``DeepPot(..., keep_freed_memory=False)``):
  memory then goes back to the system sooner, at the price of speed.
  No effect outside glibc.
- **BLAS threads** (:func:`one_blas_thread`): when DeepPot runs chunks on
  several worker threads, each chunk's BLAS calls use one core, so the
  workers do not fight over them. The limit is taken by each worker task and
  released when the last running task ends: it is never held while no chunk
  is computing (the caller's loop over ``iter_eval``, an abandoned generator).
  A training step's parallel regions (:func:`parallel_map`) hold it the same way.

Threads: :func:`default_workers` is how many minidp uses unless told (OMP_NUM_THREADS,
else the usable cores); :func:`parallel_map` runs independent pieces of work on
them, each piece's BLAS on one core, so that both cores work through a
training step instead of only inside BLAS calls (whose idle threads spin, which
costs most when another process wants the cores). What calls on threads
again and again keeps them in a :class:`Workers` that it owns: ``minidp train``
for the run (three parallel regions a step), closed when the run ends, and
each ``DeepPot`` for its lifetime (a call per MD step), closed when it is
collected.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

OPT_OUT = "MINIDP_KEEP_FREED_MEMORY"


def keep_freed_memory(enabled: bool = True) -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB and keep to one arena (see the module docstring).

    Does nothing when ``enabled`` is False or MINIDP_KEEP_FREED_MEMORY is "0";
    returns whether the setting was applied.
    """
    if not enabled or os.environ.get(OPT_OUT, "1").strip() == "0":
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
        # threads that already have an arena keep it; new ones share the main one
        libc.mallopt(m_arena_max, 1)
        return True
    return False


# BLAS's thread count is one setting for the whole process, so concurrent
# tasks share one limit: the first task to start sets it, the last to end
# restores the original (a per-task set/restore would let an early-ending
# task restore it under a running one, or leave it on for good).
_lock = threading.Lock()
_state = {"users": 0, "limiter": None, "controller": None}


@contextlib.contextmanager
def one_blas_thread():
    """BLAS limited to one thread while any task inside this context runs (see the module docstring)."""
    with _lock:
        if _state["users"] == 0:
            if _state["controller"] is None:
                from threadpoolctl import ThreadpoolController

                _state["controller"] = ThreadpoolController()
            _state["limiter"] = _state["controller"].limit(limits=1, user_api="blas")
        _state["users"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["users"] -= 1
            if _state["users"] == 0:
                _state["limiter"].restore_original_limits()
                _state["limiter"] = None


def l2_cache_bytes(default: int = 1 << 20) -> int:
    """One core's L2 cache in bytes, as Linux describes cpu0's caches (sysfs); ``default`` (1 MiB)
    where it does not. Read, never set: the blocks of the embedding nets are sized by it
    (minidp.se_e2_a.row_block)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    with contextlib.suppress(OSError, ValueError):
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return default


def default_workers() -> int:
    """Threads to use: OMP_NUM_THREADS if set (as deepmd-kit honours it), else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Workers:
    """``n`` threads kept for many parallel regions, started as they are first needed.

    Starting and joining a thread pool costs ~0.2 ms here, and more in what follows: fresh threads
    made a training step 2.5 ms slower (of 50) and a one-frame DeepPot call 1-2 ms (of 10 compressed)
    than threads kept for the run. A training step has three parallel regions, an MD run a call per
    step. :func:`parallel_map` takes a Workers wherever it takes a count (its caller is one of the n
    threads); :meth:`submit` runs one task on a kept thread (a DeepPot chunk; minidp train's next
    batch, drawn while the optimizer updates). A context manager, or :meth:`close`: the threads end.

    Threads travel neither by pickle (OpenMM's XmlSerializer stores a DeepPot, a process pool sends one)
    nor by fork (multiprocessing's default on Linux): a copy, or a forked process, starts its own.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers must be a positive integer, got {n!r}")
        self.n = n
        self._start()

    def _start(self) -> None:
        self.pool = ThreadPoolExecutor(self.n)
        # the process whose threads these are
        self._pid = os.getpid()

    def submit(self, fn: Callable[..., R], *args) -> Future:
        """fn(*args) on a kept thread; its Future."""
        if self._pid != os.getpid():  # forked: the pool's threads stayed in the parent, tasks would wait forever
            self._start()
        return self.pool.submit(fn, *args)

    def __getstate__(self) -> dict:
        return {"n": self.n}

    def __setstate__(self, state: dict) -> None:
        self.n = state["n"]
        self._start()

    def close(self, wait: bool = True) -> None:
        """End the threads once their tasks are done (``wait``: return then, else at once)."""
        self.pool.shutdown(wait=wait)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_count(workers: int | Workers) -> int:
    """The number of threads a count or a :class:`Workers` stands for."""
    return workers.n if isinstance(workers, Workers) else workers


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int | Workers) -> list[R]:
    """[fn(x) for x in items], on n = min(workers, len(items)) threads, in order.

    NumPy, BLAS and minidp's Numba kernels release the GIL, so the pieces run
    at once; BLAS is kept to one thread while they do (:func:`one_blas_thread`,
    held by the caller for the whole region: no per-piece switching). With one
    worker or one item, fn runs in the calling thread and nothing changes.
    Thread k of the n takes items k, k + n, ...; the calling thread is thread 0 (it would only wait
    otherwise): n - 1 threads are started (or taken from ``workers``, a :class:`Workers`), not n, and the
    caller does not wake up to collect the last piece (a training step has three regions: each thread start
    and wake-up is ~0.1 ms on the critical path).
    An exception in a piece is raised here once all pieces have ended.
    """
    items = list(items)
    if worker_count(workers) <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    n = min(worker_count(workers), len(items))

    def run(k: int) -> list[R]:
        return [fn(x) for x in items[k::n]]

    # kept threads (Workers), else a pool for this region alone
    threads = contextlib.nullcontext(workers) if isinstance(workers, Workers) else ThreadPoolExecutor(n - 1)
    with one_blas_thread(), threads as pool:
        futures = [pool.submit(run, k) for k in range(1, n)]
        try:
            mine = run(0)
        finally:
            # the other threads end before anything is raised or returned
            wait(futures)
        # (n lists)  thread k's results, items k, k + n, ...
        done = [mine] + [f.result() for f in futures]
    return [done[i % n][i // n] for i in range(len(items))]
