"""report.md, report.json and the parity plots of a cross-check run.

The run's results are one plain dict (see :func:`validation.crosscheck.run`);
report.json is that dict, report.md its tables. Every file is written under a
temporary name and moved into place when complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from minidp.io.outputs import atomic_path
from minidp.io.figures import save_figure
from validation.compare import QUANTITIES

UNITS = {"e/atom": "eV", "f": "eV/A", "v/atom": "eV", "ae": "eV", "av": "eV", "D": "1"}
PLOTTED = ("e/atom", "f", "v/atom", "ae", "av")


def parity_figure(ours: list[dict], ref: list[dict], path: Path, title: str) -> Path:
    """One PNG, a panel per quantity in PLOTTED: minidp against deepmd-kit over all groups, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.2 * len(PLOTTED), 3.4))
    for ax, q in zip(axes, PLOTTED):
        # (all entries of all groups,)
        x = np.concatenate([b[q].ravel() for b in ref])
        y = np.concatenate([a[q].ravel() for a in ours])
        ax.plot(x, y, ".", ms=2)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
        ax.set_xlabel(f"deepmd-kit {q} ({UNITS[q]})")
        ax.set_ylabel(f"minidp {q} ({UNITS[q]})")
        ax.set_title(f"{q}: max|diff| {np.abs(x - y).max():.1e}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=100)


def _num(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}e}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def cases_table(results: dict) -> list[str]:
    lines = ["| case | what | frames | atoms per frame | closest pair (A) | most neighbours / sel |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in results["cases"]:
        g = c["geometry"]
        lo, hi = c["natoms"]
        closest = "none within rcut" if g["min_distance"] is None else f"{g['min_distance']:.3f}"
        most = ", ".join(f"{m}/{s}" for m, s in zip(g["max_neighbours"], g["sel"]))
        lines.append(_row([c["key"], c["title"], c["nframes"], lo if lo == hi else f"{lo}-{hi}", closest, most]))
    return lines


def errors_table(results: dict, kind: str) -> list[str]:
    """One row per (case, minidp model): the largest error of each quantity (kind: max_abs or max_rel)."""
    head = [f"{q} ({UNITS[q]})" if kind == "max_abs" else q for q in QUANTITIES]
    lines = [_row(["case", "minidp model"] + head + (["result"] if kind == "max_abs" else [])),
             _row(["---"] * (len(head) + 2 + (kind == "max_abs")))]
    for c in results["cases"]:
        for comp in c["comparisons"]:
            values = [_num(comp["errors"][q][kind]) if q in comp["errors"] else "-" for q in QUANTITIES]
            verdict = ["pass" if comp["passed"] else "**FAIL** (" + ", ".join(comp["failed"]) + ")"]
            lines.append(_row([c["key"], comp["label"]] + values + (verdict if kind == "max_abs" else [])))
    return lines


def disagreement_lines(results: dict) -> list[str]:
    """Each failing quantity: how large, where (group, frame, atom and its type), both values; per-type offsets."""
    type_map, lines = results["type_map"], []
    for c in results["cases"]:
        for comp in (comp for comp in c["comparisons"] if not comp["passed"]):
            lines.append(f"- **{c['key']}, {comp['label']}** (minidp on {comp['minidp_model']}, "
                         f"deepmd-kit on {c['reference']}):")
            for q in comp["failed"]:
                err = comp["errors"][q]
                w = dict(err["where"])
                place = c["group_labels"][w.pop("group")]
                where = ", ".join(f"{k} {type_map[v] if k == 'atom_type' else v}" for k, v in w.items()
                                  if k not in ("minidp", "reference"))
                lines.append(f"  - {q}: max |diff| {_num(err['max_abs'], 3)} {UNITS[q]} "
                             f"(relative {_num(err['max_rel'], 2)}) at {place}, {where}: "
                             f"minidp {w['minidp']:.10g}, deepmd-kit {w['reference']:.10g}")
            for row in comp.get("type_offsets") or []:
                lines.append(f"  - ae_minidp - ae_deepmd-kit over the {row['atoms']} {type_map[row['atom_type']]} atoms: "
                             f"mean {row['mean']:+.10f} eV, spread (max - min) {_num(row['spread'], 1)} eV")
    return lines or ["None: every quantity of every case is within the tolerance."]


def parameter_lines(results: dict) -> list[str]:
    if not results["parameters"]:
        return ["No model had both a .pb and a .dp to compare."]
    names = list(results["parameters"][0]["max_abs_diff"])
    lines = [_row(["minidp loading", "against"] + names), _row(["---"] * (len(names) + 2))]
    for p in results["parameters"]:
        lines.append(_row([p["a"], p["b"]] + [_num(p["max_abs_diff"][n]) for n in names]))
    return lines


def out_bias_lines(results: dict) -> list[str]:
    lines = ["| .pb model | out_bias in the TF graph | as deepmd-kit's converter returns it |", "| --- | --- | --- |"]
    for row in results["out_bias"]:
        graph = "; ".join(f"`{name}` {values}" for name, values in row["graph"].items()) or "none"
        lines.append(_row([row["model"], graph, row["converter"]]))
    return lines


def label_lines(results: dict) -> list[str]:
    lab = results["labels"]
    if lab is None:
        return ["The system has no energy/force labels."]
    lines = [f"First {lab['nframes']} frames of {results['data']} ({lab['natoms']} atoms each), "
             "RMSE as `dp test` computes it (energy and virial divided by the number of atoms).", "",
             "| evaluated by | energy RMSE (eV/atom) | force RMSE (eV/A) | virial RMSE (eV/atom) |",
             "| --- | --- | --- | --- |"]
    for name, rmse in lab["rmse"].items():
        lines.append(_row([name] + [_num(rmse.get(k), 6) for k in ("energy_per_atom", "force", "virial_per_atom")]))
    dpt = lab.get("dp_test")
    if dpt is not None and dpt.get("error"):
        lines += ["", f"`{dpt['command']}` failed: {dpt['error']}"]
    return lines


def markdown(results: dict) -> str:
    verdict = "PASS" if results["passed"] else "FAIL"
    parts = [
        "# minidp against deepmd-kit", "",
        f"**{verdict}** against |minidp - deepmd-kit| <= {results['tolerance']:g} (absolute; energies and "
        f"virials per atom). Runtime {results['runtime_s']:.0f} s.", "",
        f"- command: `{results['command']}`",
        f"- reference: deepmd-kit {results['versions']['deepmd-kit']} `deepmd.infer.DeepPot` (TensorFlow, .pb); "
        f"minidp {results['versions']['minidp']}",
        f"- model: {results['model']}; data: {results['data']}; {results['nframes']} frames per case", "",
        "## Cases", "", *cases_table(results), "",
        "## Largest absolute errors, minidp - deepmd-kit", "", *errors_table(results, "max_abs"), "",
        "## Largest relative errors, max |diff| / max |deepmd-kit|", "", *errors_table(results, "max_rel"), "",
        "## Disagreements", "", *disagreement_lines(results), "",
        "## Model parameters as minidp reads them, .pb against .dp (largest |difference|)", "",
        *parameter_lines(results), "",
        "## out_bias of each .pb: in the graph, and as read through deepmd-kit's converter", "",
        *out_bias_lines(results), "",
        "## Against the DFT labels", "", *label_lines(results), "",
        "## Plots", "", *[f"- `{p}`" for p in results["plots"]], "",
    ]
    if results["notes"]:
        parts += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(parts)


def _jsonable(obj):
    """NumPy scalars and arrays as Python numbers and lists; inf and nan (not JSON) as strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """report.json and report.md in out, each written whole or not at all."""
    paths = out / "report.json", out / "report.md"
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(markdown(results))
    return paths
