"""MD cross-check: the same LAMMPS decks and i-PI inputs run by deepmd-kit's engines and by minidp's.

    python -m validation.md_crosscheck --pb ../shared/models/water-14000.pb \\
        --dp ../shared/models/water-14000.dp --data ../shared/data/water/data_0 --out out/md-validation

Cases (see :mod:`validation.md_engines` for the inputs):

- ``lammps-nve``: 100 NVE steps, orthogonal box; ``pair_style deepmd X.pb`` against
  ``pair_style minidp X.dp``: pe and press every step, the pressure tensor, positions, velocities
  after the last step;
- ``lammps-npt``: 100 steps of ``fix npt ... tri`` in a triclinic cell, the same plus the box;
- ``lammps-mpi``: the lammps-npt deck on 2 MPI ranks, ``mpirun -np 2 lmp`` with ``pair_style deepmd``
  against ``mpirun -np 2 minidp lammps`` (each rank evaluates its own atoms, ghost forces go back to
  their owners: the same trajectory as deepmd-kit's domain decomposition);
- ``lammps-devi``: two models (the second the first with its first fitting layer scaled by 1.01),
  ``out_file devi.out out_freq 10``: the plugin's deviation file against minidp's, column by column
  (it prints 7 digits: passes at 1e-6), and the trajectory as in lammps-nve (needs minidp.active.model_devi);
- ``ipi-nvt`` and ``ipi-pimd``: i-PI NVT (Langevin) and a 4-bead path integral (PILE-L) driven by
  ``dp_ipi`` and by ``minidp ipi``: conserved quantity, temperature, potential, pressure every step,
  bead positions and momenta at the end.

Passes when every relative difference (max |minidp - deepmd-kit| / max |deepmd-kit|) is at most
--tol (1e-8). Writes report.md and report.json to --out; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from minidp.io.outputs import atomic_path
from validation import md_engines as md

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CASES = ("lammps-nve", "lammps-npt", "lammps-mpi", "lammps-devi", "ipi-nvt", "ipi-pimd")
# the model-deviation file prints 7 digits (%18.6e): equal to that
DEVI_TOL = 1e-6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.md_crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--pb", type=Path, default=SHARED / "models" / "water-14000.pb", help="deepmd-kit model (.pb)")
    p.add_argument("--dp", type=Path, default=SHARED / "models" / "water-14000.dp", help="the same model for minidp")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "water" / "data_0", help="deepmd/npy water system")
    p.add_argument("--out", type=Path, default=Path("out/md-validation"), help="work and report folder")
    p.add_argument("--steps", type=int, default=100, help="MD steps per LAMMPS case (default 100)")
    p.add_argument("--ipi-steps", type=int, default=50, help="MD steps per i-PI case (default 50)")
    p.add_argument("--replicate", type=int, nargs=3, default=(1, 1, 1), help="copies of the box along a, b, c")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which cases to run")
    p.add_argument("--tol", type=float, default=1e-8, help="largest relative difference passed (default 1e-8)")
    return p


def run_case(case: str, args, work: Path) -> dict:
    """One case: both runs, their seconds and the relative differences."""
    data = md.write_water_data(args.data, work / "water.lmp")
    if case.startswith("lammps"):
        ensemble = "nve" if case in ("lammps-nve", "lammps-devi") else "npt"
        deck = md.lammps_deck(ensemble, args.steps, str(data), tuple(args.replicate))
        if case == "lammps-devi":
            return devi_case(args, deck, work / case)
        nprocs = 2 if case == "lammps-mpi" else 1
        ref = md.run_lammps("deepmd", deck, args.pb, work / case / "deepmd", nprocs=nprocs)
        ours = md.run_lammps("minidp", deck, args.dp, work / case / "minidp", nprocs=nprocs)
        ranks = ", 2 ranks" if nprocs > 1 else ""
        names = (f"deepmd-kit pair_style deepmd{ranks}", f"minidp pair_style minidp{ranks}")
        diffs = md.compare_lammps(ours, ref)
    else:
        nbeads = 4 if case == "ipi-pimd" else 1
        ref = md.run_ipi("deepmd", args.data, args.pb, work / case / "deepmd", args.ipi_steps, nbeads)
        ours = md.run_ipi("minidp", args.data, args.dp, work / case / "minidp", args.ipi_steps, nbeads)
        names = ("dp_ipi", "minidp ipi")
        diffs = md.compare_ipi(ours, ref)
    return {"reference": names[0], "ours": names[1], "seconds": [ref.seconds, ours.seconds],
            "differences": diffs, "tol": f"{args.tol:.0e}", "passed": all(v <= args.tol for v in diffs.values())}


def second_model(dp: Path, folder: Path) -> tuple[Path, Path]:
    """A second model for the deviation: the first fitting layer of the .dp scaled by 1.01, as .dp and as .pb."""
    import subprocess

    from minidp.io.serialization import load_model, save_model

    folder.mkdir(parents=True, exist_ok=True)
    other = load_model(dp)
    other.fitting[0].layers[0].W *= 1.01
    save_model(folder / "other.dp", other)
    subprocess.run(["dp", "convert-backend", "other.dp", "other.pb"], cwd=folder, check=True, capture_output=True)
    return folder / "other.dp", folder / "other.pb"


def devi_case(args, deck: str, folder: Path) -> dict:
    """Two models, the deviation every 10 steps: deepmd-kit's plugin file against minidp's, column by column."""
    other_dp, other_pb = second_model(args.dp, folder)
    deck = md.with_second_model(deck, 10)
    ref = md.run_lammps("deepmd", deck, args.pb, folder / "deepmd", variables={"model2": other_pb})
    ours = md.run_lammps("minidp", deck, args.dp, folder / "minidp", variables={"model2": other_dp})
    a, b = md.read_devi(ours.folder / "devi.out"), md.read_devi(ref.folder / "devi.out")
    names = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f")
    diffs = {"steps": float(not np.array_equal(a[:, 0], b[:, 0]))}
    diffs.update({n: md.relative_difference(a[:, k + 1], b[:, k + 1]) for k, n in enumerate(names)})
    trajectory = md.compare_lammps(ours, ref)
    passed = all(v <= DEVI_TOL for v in diffs.values()) and all(v <= args.tol for v in trajectory.values())
    diffs.update(trajectory)
    return {"reference": "deepmd-kit pair_style deepmd, 2 models", "ours": "minidp pair_style minidp, 2 models",
            "seconds": [ref.seconds, ours.seconds], "differences": diffs,
            "tol": f"{DEVI_TOL:.0e} (devi columns), {args.tol:.0e}", "passed": passed}


def markdown(results: dict) -> str:
    lines = ["# MD cross-check", "", f"{results['settings']}", "",
             "| case | reference | minidp | quantity | max rel. difference | tol | seconds (ref, minidp) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case, r in results["cases"].items():
        for q, d in r["differences"].items():
            lines.append(f"| {case} | {r['reference']} | {r['ours']} | {q} | {d:.1e} | {r['tol']} | "
                         f"{r['seconds'][0]:.1f}, {r['seconds'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in (args.pb, args.dp, args.data):
        if not path.exists():
            print(f"md_crosscheck: {path} does not exist", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"settings": f"{args.steps} LAMMPS steps, {args.ipi_steps} i-PI steps, water {args.data.name} "
                           f"replicated {tuple(args.replicate)}", "cases": {}}
    for case in args.cases:
        if case == "lammps-devi" and importlib.util.find_spec("minidp.active.model_devi") is None:
            print("lammps-devi  skipped: minidp.active.model_devi (the model-deviation issue) is absent", flush=True)
            continue
        results["cases"][case] = run_case(case, args, args.out)
        r = results["cases"][case]
        worst = max(r["differences"].values())
        print(f"{case:12s} {'ok' if r['passed'] else 'FAILED'}  worst relative difference {worst:.1e} "
              f"(tol {r['tol']})", flush=True)
    with atomic_path(args.out / "report.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_path(args.out / "report.md") as tmp:
        tmp.write_text(markdown(results))
    return 0 if all(r["passed"] for r in results["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
