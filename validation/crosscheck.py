"""The cross-check suite: minidp's DeepPot against deepmd-kit's, case by case.

    python -m validation.crosscheck --model ../shared/models/water-14000.pb \\
        --data ../shared/data/water/data_3 --out out/validation

The reference is deepmd-kit's ``deepmd.infer.DeepPot`` on the .pb (its
TensorFlow backend). minidp loads the same .pb (through deepmd-kit's
converter) and, when one sits beside it, the .dp; both are compared, and so is
minidp's plain reference path (``backend="reference"``). Cases
(see :mod:`validation.cases`): the system as given, sheared, cells shorter
than 2 rcut and than rcut, an open cluster, a ``type_one_side: false`` model
with random weights on all of those, and lone atoms. Then both codes' RMSE
against the system's labels, beside ``dp test``'s. Writes report.md,
report.json and parity plots to --out; exits 1 if any case is off by more
than --tol.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from minidp.infer import Frames
from validation import cases
from validation.compare import (evaluate, label_errors, max_errors, parameter_differences, pb_out_bias,
                                type_offsets)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "water-14000.pb"
DEFAULT_DATA = SHARED / "data" / "water" / "data_3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="deepmd-kit se_e2_a model, .pb (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="system dpdata reads, e.g. deepmd/npy (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out/validation"), help="report folder (default: %(default)s)")
    p.add_argument("--nframes", type=int, default=8, help="frames per case, the first of the system (default: %(default)s)")
    p.add_argument("--rmse-frames", type=int, default=0, help="frames for the RMSE against labels, 0: all (default)")
    p.add_argument("--tol", type=float, default=1e-10, help="largest absolute difference passed (default: %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="seed of the type_one_side: false model (default: %(default)s)")
    p.add_argument("--no-dp-test", action="store_true", help="do not run `dp test` (saves ~10 s)")
    return p


def check_args(args) -> None:
    """Refuse bad arguments with a message naming them (ValueError / FileNotFoundError)."""
    if args.model.suffix.lower() != ".pb":
        raise ValueError(f"--model {args.model}: expected a .pb file, since the reference is deepmd-kit's "
                         "TensorFlow DeepPot (convert others with `dp convert-backend MODEL model.pb`)")
    for name, path in (("--model", args.model), ("--data", args.data)):
        if not path.exists():
            raise FileNotFoundError(f"{name} {path} does not exist")
    if args.nframes < 1 or args.rmse_frames < 0:
        raise ValueError(f"--nframes must be >= 1 and --rmse-frames >= 0, got {args.nframes} and {args.rmse_frames}")
    if not (args.tol > 0):
        raise ValueError(f"--tol must be a positive number, got {args.tol}")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def load_frames(path: Path, type_map: list[str], nframes: int) -> tuple[Frames, dict | None]:
    """The first nframes frames of a system in the model's types, and their labels (None if unlabelled).

    Labels: energy (nf,), force (nf, natoms, 3), virial (nf, 9) if present.
    """
    from minidp.io.systems import model_types, read_system

    system = read_system(path)
    n = min(nframes or len(system), len(system))
    types = model_types(system["atom_names"], system["atom_types"], type_map)
    # float64 from the start: the stored float32 values are kept exactly
    coords = np.asarray(system["coords"][:n], dtype=np.float64)
    cells = None if system.nopbc else np.asarray(system["cells"][:n], dtype=np.float64)
    frames = Frames(coords, cells, types)
    if "energies" not in system.data:
        return frames, None
    labels = {"energy": np.asarray(system["energies"][:n], np.float64),
              "force": np.asarray(system["forces"][:n], np.float64)}
    if "virials" in system.data:
        labels["virial"] = np.asarray(system["virials"][:n], np.float64).reshape(n, 9)
    return frames, labels


def geometries(frames: Frames, rcut: float, sel) -> tuple[list[cases.Geometry], list[str]]:
    """Cases 1-4 and 6 from the given frames (small cells thinned to fit sel), and notes on any not built."""
    geos, notes = [cases.as_given(frames)], []
    if frames.cells is None:
        notes.append("the system has no cell (nopbc): the sheared and small-cell cases were skipped")
    else:
        geos.append(cases.sheared(frames))
        geos.append(cases.small_cell(frames, edge=7.5, fit=(rcut, sel)))
        geos.append(cases.small_cell(frames, edge=0.75 * rcut, fit=(rcut, sel), key="3b-shorter-than-rcut",
                                     title=f"cell shorter than rcut: the corner of each frame's cell, edge "
                                           f"{0.75 * rcut:g} A (every atom sees images of itself)"))
    geos.append(cases.cluster(frames))
    geos.append(cases.lone_atoms(len(sel), rcut))
    return geos, notes


def minidp_pots(pb: Path) -> dict:
    """minidp's DeepPot on the .pb and, if there is one beside it, on the .dp, and minidp's reference
    path (backend "reference", the plain NumPy one of minidp.se_e2_a) on the .dp, else the .pb:
    {label: DeepPot}."""
    from minidp import DeepPot

    dp = pb.with_suffix(".dp")
    pots = {"minidp (.pb)": DeepPot(pb)}
    if dp.is_file():
        pots["minidp (.dp)"] = DeepPot(dp)
    suffix = ".dp" if dp.is_file() else ".pb"
    pots[f"minidp reference ({suffix})"] = DeepPot(dp if dp.is_file() else pb, backend="reference")
    return pots


def plot_name(key: str, label: str) -> str:
    """A file name for one case's parity plot of one minidp model: 'minidp reference (.dp)' -> 'reference-dp'."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower().replace("minidp", "")).strip("-")
    return f"{key}-{slug}.png"


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------


def compare_case(geometry: cases.Geometry, reference, pots: dict, tol: float, ntypes: int) -> tuple[list, list]:
    """deepmd-kit's outputs per group, and per minidp model (comparison dict: errors, pass, diagnosis; its outputs)."""
    ref = [evaluate(reference, g) for g in geometry.groups]
    comparisons = []
    for label, pot in pots.items():
        ours = [evaluate(pot, g) for g in geometry.groups]
        errors = max_errors(ours, ref, geometry.groups)
        failed = [q for q, e in errors.items() if not e.max_abs <= tol]
        comparisons.append(({
            "label": label, "minidp_model": pot.model_file, "passed": not failed, "failed": failed,
            "errors": {q: e.to_dict() for q, e in errors.items()},
            # a failing energy is split by atom type: a constant per type is a bias
            "type_offsets": type_offsets(ours, ref, geometry.groups, ntypes)
            if {"ae", "e/atom"} & set(failed) else None,
        }, ours))
    return ref, comparisons


def run_case(geometry: cases.Geometry, reference, reference_file: Path, pots: dict, args, plots: list) -> dict:
    """Evaluate, compare, plot one case; the JSON-ready result."""
    from validation.reporting import parity_figure

    start = time.perf_counter()
    some = next(iter(pots.values()))
    cfg = some.model.descriptor.config
    stats = cases.neighbour_stats(geometry, cfg.rcut, cfg.sel)
    stats["min_distance"] = None if np.isinf(stats["min_distance"]) else stats["min_distance"]
    ref, comparisons = compare_case(geometry, reference, pots, args.tol, some.get_ntypes())
    for comp, ours in comparisons:
        path = parity_figure(ours, ref, args.out / "plots" / plot_name(geometry.key, comp["label"]),
                             f"{geometry.key}: {comp['label']} against deepmd-kit")
        comp["plot"] = str(path.relative_to(args.out))
        plots.append(comp["plot"])
    return {"key": geometry.key, "title": geometry.title, "reference": str(reference_file),
            "nframes": geometry.nframes, "natoms": list(geometry.natoms), "group_labels": list(geometry.labels),
            "geometry": stats, "comparisons": [comp for comp, _ in comparisons], "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------
# Case 5: the type_one_side: false model
# ---------------------------------------------------------------------------


def type_one_side_false(given: list[cases.Geometry], type_map: list[str], rcut: float, sel, args,
                        plots: list) -> tuple[dict, dict, str]:
    """Build the random model (out/type-one-side-false/model.{dp,pb}) and run every geometry through it.

    Returns the case result, minidp's pots on it, and a note on its biases.
    """
    from deepmd.infer import DeepPot as Reference

    # a smaller cutoff keeps it cheap; sel scaled with the volume, 30 % spare
    rcut5 = min(4.5, 0.75 * rcut)
    sel5 = [int(np.ceil(s * (rcut5 / rcut) ** 3 * 1.3)) for s in sel]
    config = cases.random_model_config(type_map, rcut5, sel5, args.seed)
    folder = args.out / "type-one-side-false"
    model_dict = cases.write_random_model(folder / "model.dp", folder / "model.pb", config, args.seed)
    pots = minidp_pots(folder / "model.pb")
    geometry = cases.combined("5-type-one-side-false",
                              f"type_one_side: false, random weights (rcut {rcut5:g}, sel {sel5}), on every case above",
                              given)
    result = run_case(geometry, Reference(str(folder / "model.pb")), folder / "model.pb", pots, args, plots)
    bias = np.ravel(model_dict["fitting"]["@variables"]["bias_atom_e"])
    out_bias = np.ravel(model_dict["@variables"]["out_bias"])
    note = (f"the type_one_side: false model (case 5) has bias_atom_e {np.round(bias, 10).tolist()} and "
            f"out_bias {np.round(out_bias, 10).tolist()} (per type {type_map}); deepmd-kit's TF graph adds both")
    return result, pots, note


def parameter_rows(*pot_sets: dict) -> list[dict]:
    """For each model minidp read from both .pb and .dp: the largest parameter differences."""
    rows = []
    for pots in (p for p in pot_sets if "minidp (.dp)" in p):
        a, b = pots["minidp (.pb)"], pots["minidp (.dp)"]
        rows.append({"a": a.model_file, "b": b.model_file, "max_abs_diff": parameter_differences(a.model, b.model)})
    return rows


def out_bias_notes(rows: list[dict], type_map: list[str]) -> list[str]:
    """A note for each .pb whose graph holds an out_bias that deepmd-kit's converter does not return."""
    notes = []
    for row in rows:
        converted = np.zeros(len(type_map)) if row["converter"] is None else np.array(row["converter"])
        for name, values in row["graph"].items():
            missing = np.array(values) - converted
            if np.abs(missing).max() > 0:
                notes.append(
                    f"{row['model']}: the TF graph holds out_bias {values} (tensor {name}) but deepmd-kit's "
                    f"converter, through which minidp reads .pb files, returns {converted.tolist()}: minidp's "
                    f"atomic energies from this .pb lack {missing.tolist()} eV per atom of type {type_map}; "
                    "forces, virials and descriptors do not depend on it")
    return notes


# ---------------------------------------------------------------------------
# Against the labels
# ---------------------------------------------------------------------------

DP_TEST_RMSE = {"energy_per_atom": r"Energy RMSE/Natoms\s*:\s*(\S+)", "force": r"Force\s+RMSE\s*:\s*(\S+)",
                "virial_per_atom": r"Virial RMSE/Natoms\s*:\s*(\S+)"}


def parse_dp_test(text: str) -> dict[str, float]:
    """The RMSEs in dp test's log (the last of each: the weighted average over systems)."""
    out = {}
    for key, pattern in DP_TEST_RMSE.items():
        found = re.findall(pattern, text)
        if found:
            out[key] = float(found[-1])
    return out


def run_dp_test(model: Path, system: Path, n: int) -> dict:
    """`dp test -m model -s system -n n` in a subprocess: its RMSEs, or the error it ended with."""
    command = [cases.dp_executable(), "test", "-m", str(model), "-s", str(system), "-n", str(n)]
    shown = "dp " + " ".join(shlex.quote(c) for c in command[1:])
    run = subprocess.run(command, capture_output=True, text=True)
    rmse = parse_dp_test(run.stdout + run.stderr)
    if run.returncode != 0 or "force" not in rmse:
        tail = " / ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
        return {"command": shown, "rmse": rmse, "error": f"exit {run.returncode}: {tail}"}
    return {"command": shown, "rmse": rmse, "error": None}


def label_section(args, type_map: list[str], reference, pots: dict, plots: list) -> dict | None:
    """RMSE of deepmd-kit (Python and dp test) and of each minidp model against the labels; minidp's parity plots."""
    from minidp.io.figures import parity_plots

    frames, labels = load_frames(args.data, type_map, args.rmse_frames)
    if labels is None:
        return None
    nf, natoms, _ = frames.coords.shape
    rmse = {"deepmd-kit (DeepPot)": label_errors(reference, frames, labels)[0]}
    dpt = None
    if not args.no_dp_test:
        dpt = run_dp_test(args.model, args.data, nf)
        rmse["deepmd-kit (`dp test`)"] = dpt["rmse"]
    for i, (label, pot) in enumerate(pots.items()):
        rmse[label], predicted = label_errors(pot, frames, labels)
        if i == 0:
            written = parity_plots(predicted, labels, natoms, args.out / "plots" / "dft", names=("minidp", "DFT"))
            plots.extend(str(p.relative_to(args.out)) for p in written)
    return {"nframes": nf, "natoms": natoms, "rmse": rmse, "dp_test": dpt}


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------


def run(args) -> dict:
    """Every case, the parameter comparison and the labels; the results dict report.json holds."""
    start = time.perf_counter()
    import deepmd
    from deepmd.infer import DeepPot as Reference
    from tqdm.auto import tqdm

    import minidp

    reference = Reference(str(args.model))
    type_map = list(reference.get_type_map())
    pots = minidp_pots(args.model)
    cfg = next(iter(pots.values())).model.descriptor.config
    frames, _ = load_frames(args.data, type_map, args.nframes)
    given, notes = geometries(frames, cfg.rcut, cfg.sel)
    plots: list[str] = []
    results = [run_case(g, reference, args.model, pots, args, plots)
               for g in tqdm(given, desc="cases", unit="case", disable=None)]
    case5, pots5, note5 = type_one_side_false(given, type_map, cfg.rcut, cfg.sel, args, plots)
    results.insert(len(results) - 1, case5)  # numbered order: case 6 (lone atoms) last
    notes.append(note5)
    parameters = parameter_rows(pots, pots5)
    out_bias = [pb_out_bias(p) for p in (args.model, Path(pots5["minidp (.pb)"].model_file))]
    notes += out_bias_notes(out_bias, type_map)
    notes += [f"{c['key']}: some atom has more neighbours of a type than sel allows ({c['geometry']['max_neighbours']} "
              f"> {c['geometry']['sel']}); both codes then keep the nearest" for c in results if c["geometry"]["sel_exceeded"]]
    labels = label_section(args, type_map, reference, pots, plots)
    return {
        "command": " ".join(["python -m validation.crosscheck"] + [shlex.quote(a) for a in args.argv]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"deepmd-kit": deepmd.__version__, "minidp": minidp.__version__},
        "model": str(args.model), "data": str(args.data), "nframes": int(frames.coords.shape[0]),
        "tolerance": args.tol, "type_map": type_map, "cases": results, "parameters": parameters,
        "out_bias": out_bias, "labels": labels, "plots": sorted(plots), "notes": notes,
        "passed": all(comp["passed"] for c in results for comp in c["comparisons"]),
        "runtime_s": time.perf_counter() - start,
    }


def summary(results: dict) -> str:
    """A few lines for the terminal: each case's verdict and the largest absolute errors."""
    lines = []
    for c in results["cases"]:
        for comp in c["comparisons"]:
            worst = ", ".join(f"{q} {e['max_abs']:.1e}" for q, e in comp["errors"].items())
            lines.append(f"{'pass' if comp['passed'] else 'FAIL'}  {c['key']:<22} {comp['label']:<13} {worst}")
    lines.append(f"{'PASS' if results['passed'] else 'FAIL'} in {results['runtime_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from validation.reporting import write_report

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        check_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # TensorFlow's C++ log lines drown the report otherwise; errors still show
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        results = run(args)
    except ImportError as err:
        print(f"error: the cross-checks need deepmd-kit (pip install -e '.[ref]'): {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # bad system or model, dp convert-backend
        print(f"error: {err}", file=sys.stderr)
        return 2
    md, js = write_report(results, args.out)
    print(summary(results))
    print(f"report -> {md} and {js}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
