"""The benchmark's results as JSON, a Markdown table (quoted by the README) and PNG plots.

Everything here reads the results dict of :func:`benchmarks.run.run_all`;
nothing is measured. Files are written whole under a temporary name and
then renamed (:func:`minidp.io.outputs.atomic_path`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minidp.io.figures import save_figure
from minidp.io.outputs import atomic_path

MIB = 1 << 20

# ---------------------------------------------------------------------------
# The targets of the issue, from the measured numbers
# ---------------------------------------------------------------------------


def ok_rows(rows: list[dict], name: str | None = None) -> list[dict]:
    """The finished rows (of one implementation when ``name`` is given)."""
    return [r for r in rows if r["status"] == "ok" and (name is None or r["name"] == name)]


def in_flight_bytes_per_atom(row: dict) -> float | None:
    """Measured peak over the baseline per centre atom of the chunks running at once (workers of them)."""
    busy = min(row["workers"], row["n_chunks"]) * row["chunk_atoms"]
    return row["memory"]["over_base_mib"] * MIB / busy if busy else None


def flatness(rows: list[dict], key: str = "us_per_atom") -> dict | None:
    r"""Spread of time per atom over sizes: max |t / median(t) - 1| and max(t) / min(t), t = row[key]."""
    t = np.array([r[key] for r in rows])
    if t.size < 2:
        return None
    med = float(np.median(t))
    return {"max_dev_from_median": float(np.abs(t / med - 1).max()), "max_over_min": float(t.max() / t.min()),
            "natoms": [r["natoms"] for r in rows]}


def targets(results: dict) -> list[dict]:
    """The issue's four targets: what was measured and whether it is met (reported, never asserted)."""
    out = []
    mini = ok_rows(results["throughput"], "minidp")
    speed = [r["speedup_vs_tf"] for r in mini if "speedup_vs_tf" in r]
    if speed:
        best = max(mini, key=lambda r: r.get("speedup_vs_tf", 0))
        fastest = max(r["speedup_best_vs_tf"] for r in mini)
        out.append({"target": "192-atom frames: minidp >= 2x deepmd-kit TF throughput (stretch 3x)",
                    "measured": f"medians: {min(speed):.2f}x to {max(speed):.2f}x over the chunk sizes, best "
                                f"{best['speedup_vs_tf']:.2f}x at batch_size {best['requested']}; fastest calls: "
                                f"up to {fastest:.2f}x",
                    "met": "stretch" if max(speed) >= 3 else ("yes" if max(speed) >= 2 else "no")})
    budgets = ok_rows(results["budgets"])
    if budgets:
        ratios = [r["over_base_vs_budget"] for r in budgets]
        out.append({"target": "peak memory within the budget (+-10%), any number of frames",
                    "measured": ", ".join(f"{r['budget_mib']:.0f} MiB: {r['over_base_vs_budget']:.2f}" for r in budgets)
                                + " (peak over baseline / budget)",
                    "met": "yes" if all(0.9 <= x <= 1.1 for x in ratios)
                    else ("under budget" if max(ratios) <= 1.1 else "no")})
    large = results.get("large")
    if large:
        met = large["status"] == "ok" and large["memory"]["over_base_mib"] * MIB <= 1.1 * large["budget_mib"] * MIB
        measured = (f"{large['natoms']} atoms: {large['call_s']:.1f} s, peak over baseline "
                    f"{large['memory']['over_base_mib']:.0f} MiB, absolute {large['memory']['peak_mib']:.0f} MiB"
                    if large["status"] == "ok" else large["status"])
        out.append({"target": "a 100,000-atom frame runs in a 2 GiB budget", "measured": measured,
                    "met": "yes" if met else "no"})
    flat = flatness(ok_rows(results["scaling"], "minidp"))
    if flat:
        fast = flatness(ok_rows(results["scaling"], "minidp"), "us_per_atom_min")
        out.append({"target": "time per atom flat (+-20%) from 192 to 24,576 atoms",
                    "measured": f"medians: max deviation from their median {100 * flat['max_dev_from_median']:.0f}%,"
                                f" max/min {flat['max_over_min']:.2f}; fastest calls: "
                                f"{100 * fast['max_dev_from_median']:.0f}%, {fast['max_over_min']:.2f} "
                                f"({min(flat['natoms'])}-{max(flat['natoms'])} atoms)",
                    "met": "yes" if flat["max_dev_from_median"] <= 0.2 else "no"})
    return out


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    """x formatted, or ``none`` when it is missing."""
    return none if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def status_cell(row: dict) -> str:
    """Empty for a finished measurement, else why it did not finish."""
    return "" if row["status"] == "ok" else row["status"]


THROUGHPUT_HEADER = ["implementation", "batch_size (chunk atoms)", "ms/frame (median)", "ms/frame (min)", "frames/s",
                     "x TF", "x TF (fastest calls)", "x TF compressed", "x TF float32", "x PT", "x PT float32",
                     "GFLOP/s", "/ gemm peak", "peak MiB", "peak - load MiB", "peak - base MiB", "KiB/atom in flight",
                     "cores used", "status"]
THROUGHPUT_CAPTION = (
    "x TF: TF's median ms/frame over minidp's (same run, same threads); (fastest calls): the same ratio of the "
    "fastest calls, less sensitive to other users of the machine. peak - load: over the memory right after loading "
    "model and frames; peak - base: over the memory after the tiny warm-up that compiles the kernels (the figure a "
    "budget bounds). KiB/atom in flight: peak - base per centre atom of the chunks running at once; "
    "minidp.infer.bytes_per_atom estimates {estimate} KiB. cores used: CPU time over wall time of the timed calls "
    "(below {threads} when other work shares the machine). x PT: the same against deepmd-kit's PyTorch backend. "
    "GFLOP/s: benchmarks/flops.py's count for minidp over the median time; / gemm peak: of the dgemm peak (sgemm "
    "for float32)."
)


def throughput_md(results: dict) -> list[str]:
    """Section 2-3 table: ms/frame, frames/s, speed-ups over TF, memory, per implementation and chunk size."""
    rows = []
    for r in results["throughput"]:
        ok, m = r["status"] == "ok", r.get("memory", {})
        chunk = f"{r['requested']} ({r['chunk_atoms']})" if "requested" in r and ok else str(r.get("requested", "-"))
        in_flight = in_flight_bytes_per_atom(r) / 1024 if ok and r["name"] == "minidp" else None
        rows.append([r["name"], chunk, fmt(r.get("ms_per_frame")), fmt(r.get("ms_per_frame_min")),
                     fmt(r.get("frames_per_s")), fmt(r.get("speedup_vs_tf"), ".2f"),
                     fmt(r.get("speedup_best_vs_tf"), ".2f"), fmt(r.get("speedup_vs_tf_compressed"), ".2f"),
                     fmt(r.get("speedup_vs_tf_float32"), ".2f"), fmt(r.get("speedup_vs_pt"), ".2f"),
                     fmt(r.get("speedup_vs_pt_float32"), ".2f"), fmt(r.get("gflops")),
                     fmt(r.get("fraction_of_gemm"), ".2f"), fmt(m.get("peak_mib"), ".0f"),
                     fmt(m.get("over_load_mib"), ".0f"),
                     fmt(m.get("over_base_mib"), ".0f"), fmt(in_flight, ".0f"), fmt(r.get("cores_used"), ".2f"),
                     status_cell(r)])
    meta = results["meta"]
    estimate = next((r["bytes_per_atom"] / 1024 for r in ok_rows(results["throughput"], "minidp")), None)
    caption = THROUGHPUT_CAPTION.format(estimate=fmt(estimate, ".0f"), threads=meta["threads"])
    return ([f"## Throughput: {meta['nframes']} frames of {results['flops']['natoms']} atoms per eval call", ""]
            + table(THROUGHPUT_HEADER, rows) + ["", caption, ""])


# ---------------------------------------------------------------------------
# The summary: one table of paths x contenders, for README / docs
# ---------------------------------------------------------------------------

CONTENDERS = ("minidp", "tf", "pt")  # the summary's columns: minidp, deepmd-kit TensorFlow, deepmd-kit PyTorch


def fastest(rows: list[dict], name: str, key: str = "ms_per_frame") -> dict | None:
    """The finished row of ``name`` with the smallest median (minidp's best batch_size), None if none."""
    ok = ok_rows(rows, name)
    return min(ok, key=lambda r: r[key]) if ok else None


def summary_paths(results: dict) -> list[dict]:
    """Each path the run measured: {"path", "unit", "key" (the time field), "rows" {contender: row}}."""
    thr, one, c = results.get("throughput", []), results.get("one_frame", []), results.get("compressed") or {}
    nf = results["meta"]["nframes"]
    paths = [
        (f"exact float64, {nf} frames per call", thr, {"minidp": "minidp", "tf": "tf", "pt": "pt"}),
        ("exact float64, one frame per call", one, {"minidp": "minidp", "tf": "tf", "pt": "pt"}),
        (f"exact float32, {nf} frames per call", thr, {k: f"{k}-float32" for k in CONTENDERS}),
    ]
    for mode in ("batch", "one frame per call"):
        rows = [r for r in c.get("throughput", []) if r.get("mode") == mode]
        paths.append((f"compressed, {mode}", rows, {"minidp": "minidp-compressed", "tf": "tf-compressed"}))
    out = [{"path": label, "unit": "ms/frame", "key": "ms_per_frame",
            "rows": {k: fastest(rows, name) for k, name in names.items()}} for label, rows, names in paths]
    tr = results.get("training") or {}
    for precision in ("float64", "float32"):
        rows = [r for r in tr.get("rows", []) if r["precision"] == precision]
        out.append({"path": f"training {precision} ({tr.get('steps')} steps)", "unit": "s/step",
                    "key": "seconds_per_step",
                    "rows": {k: fastest(rows, name, "seconds_per_step")
                             for k, name in (("minidp", "minidp"), ("tf", "dp --tf"), ("pt", "dp --pt"))}})
    return [p for p in out if p["rows"].get("minidp") and any(p["rows"].get(k) for k in ("tf", "pt"))]


def ratio(path: dict, ref: str, loaded: bool = False) -> float | None:
    """deepmd-kit's (``ref``) median time over minidp's on a path (of the loaded twins when ``loaded``)."""
    rows = [path["rows"].get(k) for k in ("minidp", ref)]
    if loaded:
        rows = [r.get("loaded") if r else None for r in rows]
    if not all(r and r["status"] == "ok" for r in rows):
        return None
    return rows[1][path["key"]] / rows[0][path["key"]]


def machine_line(results: dict) -> str:
    """Machine, versions, threads, load averages and GEMM peaks: what the numbers were measured on."""
    m = results["meta"]
    rates = ", ".join(f"{g} {fmt(results.get(g, {}).get('peak_gflops'))} GFLOP/s" for g in ("dgemm", "sgemm")
                      if results.get(g))
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads for every program; load average "
            f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end; GEMM peaks: "
            f"{rates or '-'}; deepmd-kit {m['versions'].get('deepmd-kit')}, numpy {m['versions'].get('numpy')}, "
            f"{m['date']}{' (--quick)' if m['quick'] else ''}.")


def summary_md(results: dict) -> list[str]:
    """The one table to quote: every path x minidp / deepmd-kit TF / deepmd-kit PT, times, minidp's speed-ups,
    its GFLOP/s and fraction of the GEMM peak (with ``--load``: the speed-ups with a busy process beside)."""
    paths = summary_paths(results)
    if not paths:
        return []
    loaded = any(r.get("loaded") for p in paths for r in p["rows"].values() if r)
    header = ["path", "unit", "minidp", "deepmd-kit TF", "x TF", "deepmd-kit PT", "x PT", "minidp GFLOP/s",
              "/ gemm peak"] + (["x TF loaded", "x PT loaded"] if loaded else [])
    rows = []
    for p in paths:
        cell = {k: (r or {}).get(p["key"]) for k, r in p["rows"].items()}
        spec = ".1f" if p["unit"] == "ms/frame" else ".4f"
        mini = p["rows"]["minidp"]
        rows.append([p["path"], p["unit"], fmt(cell.get("minidp"), spec), fmt(cell.get("tf"), spec),
                     fmt(ratio(p, "tf"), ".2f"), fmt(cell.get("pt"), spec), fmt(ratio(p, "pt"), ".2f"),
                     fmt(mini.get("gflops")), fmt(mini.get("fraction_of_gemm"), ".2f")]
                    + ([fmt(ratio(p, "tf", True), ".2f"), fmt(ratio(p, "pt", True), ".2f")] if loaded else []))
    return (["## Summary", ""] + table(header, rows)
            + ["", (f"Medians; x: deepmd-kit's time over minidp's (same run, interleaved); minidp's best "
                    f"batch_size. {machine_line(results)}"), ""])


def load_md(results: dict) -> list[str]:
    """--load: every contender's time idle and with a busy process beside it, its slowdown, and minidp's
    speed-ups idle and loaded (they hold when minidp slows down no more than deepmd-kit)."""
    rows = []
    for p in summary_paths(results):
        for k, r in p["rows"].items():
            twin = (r or {}).get("loaded")
            if not twin or r["status"] != "ok" or twin["status"] != "ok":
                continue
            speed = [fmt(ratio(p, ref, loaded), ".2f") if k == "minidp" else "" for ref in ("tf", "pt")
                     for loaded in (False, True)]
            rows.append([p["path"], {"minidp": "minidp", "tf": "deepmd-kit TF", "pt": "deepmd-kit PT"}[k],
                         fmt(r[p["key"]], ".4g"), fmt(twin[p["key"]], ".4g"), fmt(twin[p["key"]] / r[p["key"]], ".2f")]
                        + speed)
    if not rows:
        return []
    return (["## Under load: each measurement again with a single-threaded busy process beside it", ""]
            + table(["path", "contender", "idle", "loaded", "loaded / idle", "x TF idle", "x TF loaded", "x PT idle",
                     "x PT loaded"], rows)
            + ["", ("Times in each path's unit (summary table). minidp's speed-ups hold under load when its "
                    "loaded / idle is no larger than deepmd-kit's."), ""])


def one_frame_md(results: dict) -> list[str]:
    """One frame per call (MD's case): ms per call of each contender, minidp's speed-ups and FLOP rate."""
    rows = [[r["name"], fmt(r.get("ms_per_frame")), fmt(r.get("ms_per_frame_min")), fmt(r.get("speedup_vs_tf"), ".2f"),
             fmt(r.get("speedup_vs_pt"), ".2f"), fmt(r.get("gflops")), fmt(r.get("fraction_of_gemm"), ".2f"),
             fmt(r.get("cores_used"), ".2f"), status_cell(r)] for r in results.get("one_frame", [])]
    if not rows:
        return []
    return (["## One frame per call (each call waits for the last, as in MD)", ""]
            + table(["implementation", "ms/call (median)", "ms/call (min)", "x TF", "x PT", "GFLOP/s", "/ gemm peak",
                     "cores used", "status"], rows) + [""])


def training_md(results: dict) -> list[str]:
    """Seconds per training step of each program and precision, minidp's speed-ups (each program's own
    figure after its warm-up)."""
    tr = results.get("training")
    if not tr:
        return []
    rows = [[r["name"], r["precision"], fmt(r.get("seconds_per_step"), ".4f"),
             fmt(r.get("seconds_per_step_min"), ".4f"),
             fmt(r.get("steps_per_s"), ".2f"), fmt(r.get("speedup_vs_dp_tf"), ".2f"),
             fmt(r.get("speedup_vs_dp_pt"), ".2f"), fmt(r.get("gflops")), fmt(r.get("fraction_of_gemm"), ".2f"),
             fmt(r.get("wall_s")), status_cell(r)] for r in tr["rows"]]
    return ([f"## Training: {tr['steps']} steps on the water input (disp_freq {tr['disp_freq']})", ""]
            + table(["program", "precision", "s/step (median of rounds)", "s/step (min)", "steps/s",
                     "x dp --tf train", "x dp --pt train", "GFLOP/s", "/ gemm peak", "wall s", "status"], rows)
            + ["", ("s/step as each program prints it after its warm-up: deepmd-kit's \"average training time\" "
                    "(the first display interval left out), minidp train's mean after its first 10 steps. "
                    "x: deepmd-kit's s/step over minidp's, same precision, same run. GFLOP/s: "
                    "benchmarks.flops.training_flops of one frame of --data (a step of the water input) over "
                    "minidp's s/step; / gemm peak: of the dgemm (float64) or sgemm (float32) peak."), ""]
            + notes_of(tr["rows"], "training"))


def notes_of(rows: list[dict], section: str) -> list[str]:
    """One line per failed row of a section, with its log's tail."""
    return [f"- {section} {r['name']} {r.get('precision', r.get('mode', ''))}: {r['status']}: "
            + r["log"].replace("\n", " / ")[-400:] for r in rows if r["status"] != "ok" and r.get("log")]


def budgets_md(results: dict) -> list[str]:
    """Memory-budget table: measured peak over the baseline, and its ratio to the budget."""
    rows = [[fmt(r["budget_mib"], ".0f"), str(r.get("batch_size", "-")), str(r.get("chunk_atoms", "-")),
             fmt(r.get("memory", {}).get("over_base_mib"), ".0f"), fmt(r.get("over_base_vs_budget"), ".2f"),
             fmt(r.get("memory", {}).get("over_load_mib"), ".0f"), fmt(r.get("memory", {}).get("peak_mib"), ".0f"),
             fmt(r.get("ms_per_frame")), status_cell(r)] for r in results["budgets"]]
    return ([f"## Memory budgets: {results['meta']['budget_frames']} frames per eval call", ""]
            + table(["memory_budget MiB", "batch_size", "chunk atoms", "peak - base MiB", "/ budget",
                     "peak - load MiB", "peak MiB", "ms/frame", "status"], rows) + [""])


def scaling_md(results: dict) -> list[str]:
    """Size-scaling table: us/atom of both implementations per system size, and minidp's ratio to its smallest."""
    by = {}
    for r in results["scaling"]:
        by.setdefault(r["reps"], {})[r["name"]] = r
    base = next((r["us_per_atom"] for r in ok_rows(results["scaling"], "minidp")), None)
    rows = []
    for reps, pair in by.items():
        m, t = pair.get("minidp", {}), pair.get("tf", {})
        natoms = m.get("natoms") or t.get("natoms")
        speed = t["us_per_atom"] / m["us_per_atom"] if "us_per_atom" in m and "us_per_atom" in t else None
        ml, tl = m.get("loaded", {}), t.get("loaded", {})  # --load: the loaded twins
        loaded = tl["us_per_atom"] / ml["us_per_atom"] if "us_per_atom" in ml and "us_per_atom" in tl else None
        rows.append([str(natoms or "-"), reps, fmt(m.get("us_per_atom")), fmt(m.get("us_per_atom_min")),
                     fmt(t.get("us_per_atom")), fmt(t.get("us_per_atom_min")), fmt(speed, ".2f"), fmt(loaded, ".2f"),
                     fmt(m["us_per_atom"] / base if base and "us_per_atom" in m else None, ".2f"),
                     fmt(m.get("memory", {}).get("peak_mib"), ".0f"), fmt(t.get("memory", {}).get("peak_mib"), ".0f"),
                     fmt(m.get("cores_used"), ".2f"), fmt(t.get("cores_used"), ".2f"),
                     "; ".join(f"{k}: {v['status']}" for k, v in pair.items() if v["status"] != "ok")])
    return (["## Size scaling: one frame of replicated water boxes per eval call", ""]
            + table(["atoms", "replicas", "minidp us/atom", "(fastest)", "TF us/atom", "(fastest)", "x TF",
                     "x TF loaded", "minidp / smallest",
                     "minidp peak MiB", "TF peak MiB", "minidp cores used", "TF cores used", "status"], rows) + [""])


def large_md(results: dict) -> list[str]:
    """The > 100,000-atom frame in one paragraph."""
    r = results.get("large")
    if not r:
        return []
    if r["status"] != "ok":
        return ["## Large frame", "", f"{r.get('reps')}: {r['status']}", ""]
    m = r["memory"]
    return ["## Large frame", "",
            f"{r['natoms']} atoms ({r['reps']} boxes), memory_budget {r['budget_mib']:.0f} MiB (batch_size "
            f"{r['batch_size']}): {r['call_s']:.1f} s per eval ({r['us_per_atom']:.1f} us/atom, median of "
            f"{r['calls']}), peak - base {m['over_base_mib']:.0f} MiB ({r['over_base_vs_budget']:.2f} of the budget), "
            f"peak - load {m['over_load_mib']:.0f} MiB, absolute peak {m['peak_mib']:.0f} MiB. Each chunk builds "
            "the neighbour list of its own centre atoms.", ""]


def flops_md(results: dict) -> list[str]:
    """FLOPs per frame by part, achieved GFLOP/s = FLOPs / (best ms/frame), their fraction of the dgemm peak."""
    f = results["flops"]
    rows = []
    # the float32 rows count their float64 twin's FLOPs; their fraction is of the sgemm peak
    # deepmd-kit's PyTorch rows count TF's FLOPs (every sel slot through the nets)
    named = list(f["per_frame"].items()) + [(n, f["per_frame"]["tf"]) for n in ("pt",) if n in f["achieved"]] + [
        (f"{n}-float32", f["per_frame"]["tf" if n == "pt" else n]) for n in ("minidp", "tf", "pt")
        if f"{n}-float32" in f["achieved"]]
    for name, parts in named:
        a = f["achieved"].get(name, {})
        rows.append([name] + [fmt(parts[k] / 1e6, ".0f") for k in ("embedding", "contraction", "fitting", "total")]
                    + [fmt(a.get("ms_per_frame")), fmt(a.get("gflops")), fmt(a.get("fraction_of_peak"), ".2f")])
    dg_rows = [[gemm, " x ".join(map(str, d["shape"])), str(d["threads"]), fmt(d["gflops"])]
               for gemm in ("dgemm", "sgemm") for d in results.get(gemm, {}).get("rows", [])]
    return ([f"## FLOPs per frame ({f['natoms']} atoms, {f['real_neighbours_per_atom']:.1f} real neighbours per atom "
             f"of {f['slots_per_atom']} slots)", ""]
            + table(["implementation", "embedding MFLOP", "contraction MFLOP", "fitting MFLOP", "total MFLOP",
                     "best ms/frame", "GFLOP/s", "/ gemm peak"], rows)
            + ["", "Matrix-product FLOPs only (benchmarks/flops.py); the compressed model's table is counted as "
                   "polynomial arithmetic. The fraction is of the dgemm peak (float64 rows) or the sgemm peak "
                   "(float32 rows); NumPy matmul:", ""]
            + table(["gemm", "m x k x n", "BLAS threads", "GFLOP/s"], dg_rows) + [""])


def notes_md(results: dict) -> list[str]:
    """Failures with their logs, the compression status, and whether the energies agree."""
    lines = ["## Notes", "", f"- dp compress: {results['compress']['status']}"
             + (f" ({results['compress'].get('message')})" if results["compress"].get("message") else "")]
    e = {r["name"]: r["energy_per_atom"] for r in results["throughput"] if r["status"] == "ok"}
    if "tf" in e and "minidp" in e:
        lines.append(f"- energy per atom of the first frame, minidp - TF: {e['minidp'] - e['tf']:.2e} eV"
                     + (f"; compressed TF - TF: {e['tf-compressed'] - e['tf']:.2e} eV" if "tf-compressed" in e else "")
                     + (f"; PyTorch - TF: {e['pt'] - e['tf']:.2e} eV" if "pt" in e else ""))
    f32 = results.get("float32_models")
    if f32:
        lines.append(f"- float32 model (the .dp's nets rounded to float32): {f32['status']}"
                     + (f" ({f32['message']})" if f32.get("message") else ""))
    if "tf-float32" in e and "minidp-float32" in e:
        lines.append(f"- float32, energy per atom of the first frame: minidp - TF "
                     f"{e['minidp-float32'] - e['tf-float32']:.2e} eV; TF float32 - TF float64 "
                     f"{e['tf-float32'] - e['tf']:.2e} eV")
    rows = ok_rows(results["scaling"]) + ([results["large"]] if results.get("large", {}).get("status") == "ok" else [])
    if rows:
        e = [r["energy_per_atom"] for r in rows]
        lines.append(f"- energy per atom of the replicated boxes, both implementations, all sizes: spread "
                     f"{max(e) - min(e):.1e} eV (replicas keep every environment, so it should be round-off)")
    pt = results.get("pt")
    if pt:
        lines.append(f"- deepmd-kit PyTorch backend (a copy of the package without its operator library, "
                     f"benchmarks/deepmd_pt.py): {pt['status']}" + (f" ({pt['message']})" if pt.get("message") else ""))
    for section in ("throughput", "one_frame", "budgets", "scaling"):
        for r in results.get(section, []):
            if r["status"] != "ok" and r.get("log"):
                lines.append(f"- {section} {r['name']} {r.get('reps', r.get('requested', ''))}: {r['status']}: "
                             + r["log"].replace("\n", " / ")[-400:])
    return lines + [""]


def markdown(results: dict) -> str:
    """The whole report: machine, targets, then one table per section."""
    m = results["meta"]
    backends = "TensorFlow and PyTorch" if ok_rows(results["throughput"], "pt") else "TensorFlow"
    head = [f"# minidp vs deepmd-kit {m['versions'].get('deepmd-kit')} ({backends})", "",
            f"`{m['command']}` on {m['date']}: {m['cpu']}, {m['cores']} cores (shared), {m['threads']} threads "
            f"for both; load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end; "
            f"{m['elapsed_s'] / 60:.1f} min{' (--quick)' if m['quick'] else ''}. Medians of "
            f"{m['rounds']} interleaved round(s) of at least {m['repeats']} timed calls, after a warm-up call.", "",
            "## Targets", ""]
    tg = table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]] for t in targets(results)])
    return "\n".join(head + tg + [""] + summary_md(results) + load_md(results) + throughput_md(results)
                     + one_frame_md(results) + training_md(results) + budgets_md(results) + scaling_md(results)
                     + large_md(results) + compressed_md(results) + flops_md(results) + notes_md(results))


def compressed_md(results: dict) -> list[str]:
    from benchmarks.compressed import markdown as section

    return section(results)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def plot_throughput(ax, results: dict) -> None:
    """Frames/s of minidp against batch_size, with TF (and compressed TF) as horizontal lines."""
    from matplotlib.ticker import NullFormatter

    mini = ok_rows(results["throughput"], "minidp")
    ax.plot([r["requested"] for r in mini], [r["frames_per_s"] for r in mini], "o-", label="minidp")
    for name, style in (("tf", "--"), ("tf-compressed", ":")):
        for r in ok_rows(results["throughput"], name):
            ax.axhline(r["frames_per_s"], ls=style, color="k", label=f"deepmd-kit {name}")
    ax.set_xscale("log")
    ax.set_xticks([r["requested"] for r in mini], [f"{r['requested']}\n({r['chunk_atoms']})" for r in mini])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("minidp batch_size (largest chunk's centre atoms)")
    ax.set_ylabel("frames / s")
    ax.set_ylim(bottom=0)
    ax.legend()


def plot_scaling(ax, results: dict) -> None:
    """Time per atom against atoms per frame, both implementations, with minidp's +-20% band."""
    from matplotlib.ticker import NullFormatter

    for name, style in (("minidp", "o-"), ("tf", "s--")):
        rows = ok_rows(results["scaling"], name)
        ax.plot([r["natoms"] for r in rows], [r["us_per_atom"] for r in rows], style,
                label="minidp" if name == "minidp" else "deepmd-kit TF")
    mini = ok_rows(results["scaling"], "minidp")
    if mini:
        med = float(np.median([r["us_per_atom"] for r in mini]))
        ax.axhspan(0.8 * med, 1.2 * med, color="C0", alpha=0.1, label="minidp median +-20%")
    ax.set_xscale("log")
    sizes = sorted({r["natoms"] for r in ok_rows(results["scaling"])})
    ax.set_xticks(sizes, [str(n) for n in sizes], rotation=45)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("atoms per frame")
    ax.set_ylabel("us / atom (one frame per call)")
    ax.legend()


def plot_memory(ax, results: dict) -> None:
    """Measured peak over the baseline against the budget (budgets, large frame) and against
    minidp's own estimate (workers + 1) * chunk atoms * bytes_per_atom (chunk-size sweep)."""
    pts = [(r["budget_mib"], r["memory"]["over_base_mib"]) for r in ok_rows(results["budgets"])]
    if pts:
        ax.plot(*zip(*pts), "o", label="memory_budget")
    large = results.get("large")
    if large and large["status"] == "ok":
        ax.plot([large["budget_mib"]], [large["memory"]["over_base_mib"]], "*", ms=12,
                label=f"{large['natoms']}-atom frame")
    est = [((r["workers"] + 1) * r["chunk_atoms"] * r["bytes_per_atom"] / MIB, r["memory"]["over_base_mib"])
           for r in ok_rows(results["throughput"], "minidp")]
    if est:
        ax.plot(*zip(*est), "^", label="batch_size sweep (x: minidp's estimate)")
    values = [v for p in pts + est for v in p] + ([large["budget_mib"]] if large and large["status"] == "ok" else [])
    x = np.array([0.8 * min(values, default=1.0), 1.2 * max(values, default=1.0)])
    ax.plot(x, x, "k-", lw=0.8, label="measured = budget")
    ax.fill_between(x, 0.9 * x, 1.1 * x, color="k", alpha=0.1, label="+-10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("budget MiB")
    ax.set_ylabel("peak - base MiB (measured)")
    ax.legend(fontsize=8)


def plots(results: dict, out: Path) -> list[Path]:
    """throughput.png, time_per_atom.png, memory.png (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("throughput", plot_throughput), ("time_per_atom", plot_scaling), ("memory", plot_memory)):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax, results)
        ax.grid(True, which="both", alpha=0.3)
        written.append(save_figure(fig, out / f"{name}.png"))
    return written


def write_outputs(results: dict, out: Path) -> list[Path]:
    """results.json, results.md and the plots in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "targets": targets(results)}
    texts = {"results.json": json.dumps(results, indent=1, default=float), "results.md": markdown(results)}
    written = []
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    return written + plots(results, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report OUT/results.json``: print the summary table (and, after ``--load``,
    the load table) of a finished run, to paste into README.md or docs/."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    try:
        results = json.loads(Path(args[0]).read_text())
    except (OSError, ValueError) as err:
        print(f"error: {args[0]}: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_md(results) + load_md(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
