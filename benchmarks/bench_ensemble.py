r"""The cost of an ensemble: 4-model model deviation against one model's eval, in one run.

    python -m benchmarks.bench_ensemble [--shared ../shared] [--frames 80] [--repeats 3]

Four models (the water model and three copies with perturbed weights, made in
memory by validation.active_learning.perturbed_model) on the first
``--frames`` frames of data_0 (192 atoms). The calls alternate, one model's
``DeepPot.eval`` then ``Ensemble.eval`` (the models sharing each chunk's
neighbour list, deviations included), so both see the same machine load;
printed: the medians, their ratio, the process's cores in use and the load
average. The ratio cannot fall far below 4: the embedding nets, three
quarters of a model's time, differ between the models; the neighbour list,
the one shared piece, is ~2% of an evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import cpu_seconds, time_calls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(shared: Path, nframes: int, repeats: int) -> dict:
    """Median seconds of one model's eval and of the 4-model ensemble's, alternated."""
    from minidp.infer import DeepPot
    from minidp.model_devi import Ensemble
    from validation.active_learning import perturbed_model

    base = shared / "models" / "water-14000.dp"
    system = shared / "data" / "water" / "data_0"
    coords = np.load(system / "set.000" / "coord.npy")[:nframes]
    cells = np.load(system / "set.000" / "box.npy")[:nframes]
    types = np.loadtxt(system / "type.raw", dtype=int)
    one = DeepPot(base, progress=False)
    ensemble = Ensemble([one] + [DeepPot(perturbed_model(base, k), progress=False) for k in (1, 2, 3)])
    one.eval(coords[:1], cells[:1], types)  # compile the kernels
    ensemble.eval(coords[:1], cells[:1], types)
    single, many = [], []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        single += time_calls(lambda: one.eval(coords, cells, types), 1)
        many += time_calls(lambda: ensemble.eval(coords, cells, types), 1)
    cores = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    t1, t4 = float(np.median(single)), float(np.median(many))
    return {"frames": nframes, "atoms": int(types.size), "one_model_s": t1, "four_models_s": t4, "ratio": t4 / t1,
            "ratio_per_repeat": [m / s for s, m in zip(single, many)], "cores_used": cores, "workers": one.workers,
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(measure(Path(args.shared), args.frames, args.repeats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
