r"""Micro-benchmark of :func:`minidp.neighbor.build_neighbor_list` on water (rcut 6, sel [46, 92]).

    python -m benchmarks.bench_neighbor [--shared ../shared] [--quick]

Prints, after the Numba kernels are compiled (or loaded from their cache):

- 192 atoms: median ms per frame, one frame per call (as an MD step calls it)
  and all frames of data_0 in one call; the NumPy brute force for scale;
- 24,576 atoms (4 x 4 x 8 boxes) and 110,592 atoms (9 x 8 x 8 boxes, more
  than 100,000): the first frame tiled over lattice shifts, median seconds.

Wall-clock medians on whatever else the machine is doing; the process CPU
time is printed beside them, since a shared machine inflates the wall clock.
Shape symbols: ``nf`` frames, ``nloc`` atoms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import replicate, time_calls  # noqa: E402
from minidp.neighbor import build_neighbor_list  # noqa: E402

RCUT, SEL = 6.0, [46, 92]


def timed(call, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of repeated calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        wall += time_calls(call, 1)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, and no 110,592-atom frame")
    args = parser.parse_args(argv)
    system = args.shared / "data" / "water" / "data_0"
    if not (system / "set.000" / "coord.npy").exists():
        print(f"{system} is not available", file=sys.stderr)
        return 1
    # (nf, nloc, 3), (nf, 3, 3), (nloc,)
    coords = np.load(system / "set.000" / "coord.npy").reshape(-1, 192, 3)
    cells = np.load(system / "set.000" / "box.npy").reshape(-1, 3, 3)
    types = np.loadtxt(system / "type.raw", dtype=int)
    t0 = time.perf_counter()
    build_neighbor_list(coords[:1], cells[:1], types, RCUT, SEL)
    print(f"first call (compiles the kernels, or loads them from numba's cache): {time.perf_counter() - t0:.2f} s")

    nf, passes = coords.shape[0], 1 if args.quick else 5
    frames = iter(np.tile(np.arange(nf), passes))

    def next_frame():
        f = next(frames)
        return build_neighbor_list(coords[f:f + 1], cells[f:f + 1], types, RCUT, SEL)

    wall, cpu = timed(next_frame, nf * passes)
    print(f"192 atoms, one frame per call:      {1e3 * wall:7.3f} ms per frame (CPU {1e3 * cpu:.3f} ms)")
    wall, cpu = timed(lambda: build_neighbor_list(coords, cells, types, RCUT, SEL), passes)
    print(f"192 atoms, {nf} frames in one call:  {1e3 * wall / nf:7.3f} ms per frame (CPU {1e3 * cpu / nf:.3f} ms)")
    wall, cpu = timed(lambda: build_neighbor_list(coords[:1], cells[:1], types, RCUT, SEL, backend="numpy"), 3)
    print(f"192 atoms, NumPy brute force:       {1e3 * wall:7.3f} ms per frame (CPU {1e3 * cpu:.3f} ms)")

    for reps in [(4, 4, 8)] + ([] if args.quick else [(9, 8, 8)]):
        x, cell, big_types = replicate(coords[0].astype(np.float64), cells[0].astype(np.float64), types, reps)
        repeats = 1 if args.quick else 3
        wall, cpu = timed(lambda: build_neighbor_list(x[None], cell[None], big_types, RCUT, SEL), repeats)
        print(f"{len(x):,} atoms ({'x'.join(map(str, reps))} boxes): {wall:7.3f} s (CPU {cpu:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
