r"""The cost of an ensemble: 4-model model deviation against one model's eval, in one run.

    python -m benchmarks.bench_ensemble [--shared ../shared] [--frames 80] [--repeats 3]
    python -m benchmarks.bench_ensemble --neighbor-stat out/nstat     # memory on 1,000 and 10,000 frames

Four models (the water model and three copies with perturbed weights, made in
memory by validation.active_learning.perturbed_model) on the first
``--frames`` frames of data_0 (192 atoms). The calls alternate, one model's
``DeepPot.eval`` then ``Ensemble.eval`` (the models sharing each chunk's
neighbour list, deviations included), so both see the same machine load;
printed: the medians, their ratio, the process's cores in use and the load
average.

Then where one model's time goes (``shares``: one thread, one 2-frame chunk,
medians of 5): the work the models of an ensemble can share (the neighbour
list; the environment matrix and the packing of its real rows when the models
share davg/dstd; the scatter's reading of the pairs) against the work each
model must do with its own weights (embedding nets, fitting nets, their
backwards). With a shared fraction f of one evaluation, 4 models cost at
least 4 - 3f evaluations (``ratio_bound``) unless the nets themselves get
cheaper, which would make the single evaluation cheaper too.
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
    from minidp.active.model_devi import Ensemble
    from minidp.infer import DeepPot
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


def stage_shares(shared: Path, nframes: int = 2, repeats: int = 5) -> dict:
    """Seconds per stage of one model's evaluation of one chunk, on one thread (see the module docstring)."""
    from minidp.infer import DeepPot
    from minidp.model import energy_forces
    from minidp.neighbor import build_neighbor_list
    from minidp.runtime import one_blas_thread
    from minidp.se_e2_a import env_matrix, pack_rows

    system = shared / "data" / "water" / "data_0"
    # (nf, natoms, 3), (nf, 3, 3)
    coords = np.load(system / "set.000" / "coord.npy")[:nframes].reshape(nframes, -1, 3)
    cells = np.load(system / "set.000" / "box.npy")[:nframes].reshape(nframes, 3, 3)
    types = np.loadtxt(system / "type.raw", dtype=int)
    model = DeepPot(shared / "models" / "water-14000.dp", progress=False).model
    se, cfg = model.descriptor, model.descriptor.config

    def nlist():
        return build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))

    nl = nlist()

    def env_and_packing():
        R, _ = env_matrix(nl.rij, nl.nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut)
        return [pack_rows(R, nl.nlist, atoms, cfg.slots(tj)) for atoms, _ in se.center_groups(types)
                for tj in range(cfg.ntypes)]

    stages = {"neighbour_list": nlist, "env_matrix_and_packing": env_and_packing,
              "whole_model": lambda: energy_forces(nl.rij, nl.nlist, types, model)}
    with one_blas_thread():  # the Numba kernels run on one thread already
        times = {name: float(np.median(time_calls(f, repeats + 1)[1:])) for name, f in stages.items()}
    one = times["neighbour_list"] + times["whole_model"]
    share = (times["neighbour_list"] + times["env_matrix_and_packing"]) / one
    return {"frames": nframes, "seconds": times, "shared_fraction": share, "ratio_bound": 4 - 3 * share}


def neighbor_stat_memory(shared: Path, work: Path, nframes_list=(1000, 10000)) -> list[dict]:
    """Peak memory and time of ``minidp neighbor-stat`` (a fresh process each) on data_0's 80 frames
    repeated to each size, written as one deepmd/npy system (float32 coordinates, as deepmd-kit's data)."""
    import subprocess

    system = shared / "data" / "water" / "data_0"
    rows = []
    for nf in nframes_list:
        target = work / f"water-{nf}"
        if not (target / "set.000" / "coord.npy").exists():
            (target / "set.000").mkdir(parents=True, exist_ok=True)
            for name in ("type.raw", "type_map.raw"):
                (target / name).write_text((system / name).read_text())
            for name in ("coord.npy", "box.npy"):
                a = np.load(system / "set.000" / name)
                np.save(target / "set.000" / name, a[np.arange(nf) % len(a)].astype(np.float32))
        code = ("import resource, time, sys; from minidp.active.neighbor_stat import neighbor_stat; t = time.perf_counter(); "
                f"s = neighbor_stat([{str(target)!r}], 6.0, ['O', 'H'], progress=False); "
                "print(s.min_nbor_dist, s.max_nbor_size, time.perf_counter() - t, "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout.split()
        rows.append({"frames": nf, "min_nbor_dist": float(out[0]), "seconds": float(out[-2]),
                     "peak_rss_mib": int(out[-1]) / 2**20})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--neighbor-stat", default=None, metavar="DIR",
                   help="instead: neighbor-stat's peak memory on 1,000 and 10,000 frames written to DIR")
    args = p.parse_args(argv)
    if args.neighbor_stat:
        print(json.dumps(neighbor_stat_memory(Path(args.shared), Path(args.neighbor_stat)), indent=1))
        return 0
    result = measure(Path(args.shared), args.frames, args.repeats)
    result["shares"] = stage_shares(Path(args.shared))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
