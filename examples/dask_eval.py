"""Evaluating water frames on a Dask cluster, checked against a plain DeepPot.eval.

    python examples/dask_eval.py [--model M] [--systems S [S ...]] [--frames-per-chunk 10] [--workers 2]

A ``LocalCluster`` of two worker processes (one thread each) stands in for a
cluster of many machines: :func:`minidp.active.stream.dask_eval` cuts every system
into blocks of frames, each worker loads the model once and evaluates the
blocks it is given, and the results come back in order. On a real cluster,
connect a ``Client`` to its scheduler instead; the systems and the model must
then sit on a file system that every worker sees.

Defaults: the shipped example (minidp/examples/water), else ../shared.
Needs ``pip install 'minidp[tools]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _water import default_frames, default_model


def main() -> int:
    from dask.distributed import Client, LocalCluster

    from minidp import DeepPot
    from minidp.io.systems import model_types
    from minidp.active.stream import dask_eval
    from minidp.io.systems import lazy_system, read_frames

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--systems", type=Path, nargs="+", default=None, help="deepmd/npy folders or deepmd/hdf5 files")
    p.add_argument("--frames-per-chunk", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster")
    args = p.parse_args()
    model, systems = args.model or default_model(), args.systems or [default_frames()]

    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t1 = time.perf_counter()
        results = dask_eval(model, systems, args.frames_per_chunk, client=client)
        t2 = time.perf_counter()
    print(f"LocalCluster of {args.workers} workers: started in {t1 - t0:.1f} s, evaluated in {t2 - t1:.1f} s")

    dp = DeepPot(model, progress=False)
    worst = 0.0
    for path, ours in zip(systems, results):
        s = lazy_system(path)
        block = read_frames(s, 0, s.nframes)  # the whole system at once, for the plain call
        t3 = time.perf_counter()
        e, f, v = dp.eval(block.coords, block.cells, model_types(s.atom_names, s.atom_types, dp.get_type_map()))
        print(f"{path}: {s.nframes} frames of {s.natoms} atoms, plain DeepPot.eval in {time.perf_counter() - t3:.1f} s")
        for name, a, b in (("energy", ours.energy, e[:, 0]), ("force", ours.force, f), ("virial", ours.virial, v)):
            diff = np.abs(a - b).max()
            worst = max(worst, diff / np.abs(b).max())
            print(f"  {name:7s} max |dask - eval| = {diff:.3e}  (largest |value| {np.abs(b).max():.3e})")
    print(f"largest relative difference {worst:.1e}: {'same results' if worst <= 1e-12 else 'DIFFERENT'}")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":  # the workers are new processes that import this file: start nothing on import
    sys.exit(main())
