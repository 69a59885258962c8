"""Compressed models: minidp's tabulated embedding against deepmd-kit TF's (`dp --tf compress`).

A section of :mod:`benchmarks.run` (``results["compressed"]``): in the same
run and with the same threads, both compressed water models on

- the throughput input, ``nframes`` frames per eval call (the batch case);
- one frame per call (molecular dynamics: each step waits for the last);
- one frame of replicated boxes per call, 192 to 24,576 atoms (time per atom, peak memory).

The contenders of the first two take turns round after round, as in the
throughput sweep. ``python -m benchmarks.run --compressed-only`` runs this
section alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.report import fmt, ok_rows, status_cell, table

MODES = (("batch", None), ("one frame per call", 1))


def compress_minidp(s, run_process, child_env, log_dir: Path) -> dict:
    """`minidp compress` (default step) of the minidp model into out/model-compressed.dp, once."""
    target = s.out / "model-compressed.dp"
    if target.exists() and target.stat().st_mtime >= s.model_minidp.stat().st_mtime:
        return {"status": "ok (cached)", "path": str(target)}
    cmd = [sys.executable, "-m", "minidp", "compress", "-i", str(s.model_minidp.resolve()), "-o", str(target.resolve())]
    log = log_dir / "minidp-compress.log"
    status = run_process(cmd, child_env(s.threads), log_dir, log, 10 * s.timeout, s.mem_limit)
    return {"status": status, "path": str(target) if status == "ok" else None,
            "message": None if status == "ok" else log.read_text(errors="replace")[-400:]}


def bench(run, s, frames: Path, tf_model: Path, minidp_model: Path, model_spec, timing_row) -> dict:
    """Batch and one-frame rows (interleaved rounds), then the size scaling, both compressed models."""
    contenders = []
    for mode, nf in MODES:
        for name, kind, model in (("tf-compressed", "tf", tf_model), ("minidp-compressed", "minidp", minidp_model)):
            extra = {"nframes": nf or s.nframes, "model": str(model)}
            if nf == 1:  # one short call: repeat it for at least two seconds
                extra["min_seconds"] = 0.3 if s.quick else 2.0
            contenders.append((name, mode, model_spec(s, kind, frames, **extra)))
    raw: list[list[dict]] = [[] for _ in contenders]
    for k in range(s.rounds):
        for (name, mode, spec), got in zip(contenders, raw):
            got.append(run(spec, f"{name} {mode} round {k + 1}/{s.rounds}"))
    from benchmarks.run import merge_rounds

    rows = [timing_row(name, merge_rounds(got), mode=mode) for (name, mode, _), got in zip(contenders, raw)]
    scaling = []
    for reps in s.replicas:
        tag = "x".join(map(str, reps))
        for name, kind, model in (("minidp-compressed", "minidp", minidp_model), ("tf-compressed", "tf", tf_model)):
            spec = model_spec(s, kind, frames, reps=list(reps), model=str(model), min_seconds=0.3 if s.quick else 2.0)
            scaling.append(timing_row(name, run(spec, f"{name} {tag}"), reps=tag))
    return {"throughput": rows, "scaling": scaling, "ratios": ratios(rows, scaling)}


def ratios(rows: list[dict], scaling: list[dict]) -> dict:
    """TF compressed's median (and fastest) time over minidp compressed's, per mode and per size."""
    out = {}
    for mode, _ in MODES:
        tf = [r for r in ok_rows(rows, "tf-compressed") if r["mode"] == mode]
        mini = [r for r in ok_rows(rows, "minidp-compressed") if r["mode"] == mode]
        if tf and mini:
            out[mode] = {"median": tf[0]["ms_per_frame"] / mini[0]["ms_per_frame"],
                         "fastest": tf[0]["ms_per_frame_min"] / mini[0]["ms_per_frame_min"]}
    for mini in ok_rows(scaling, "minidp-compressed"):  # in increasing size
        tf = [r for r in ok_rows(scaling, "tf-compressed") if r["reps"] == mini["reps"]]
        if tf:
            out[f"{mini['natoms']} atoms, one frame"] = {"median": tf[0]["us_per_atom"] / mini["us_per_atom"],
                                                        "fastest": tf[0]["us_per_atom_min"] / mini["us_per_atom_min"]}
    return out


def markdown(results: dict) -> list[str]:
    """The section's tables."""
    c = results.get("compressed")
    if not c:
        return []
    rows = [[r["name"], r["mode"], str(r.get("nframes", "-")), fmt(r.get("ms_per_frame")),
             fmt(r.get("ms_per_frame_min")), fmt(r.get("memory", {}).get("peak_mib"), ".0f"),
             fmt(r.get("cores_used"), ".2f"), status_cell(r)] for r in c["throughput"]]
    scale = [[r["name"], str(r.get("natoms", r["reps"])), fmt(r.get("us_per_atom"), ".2f"),
              fmt(r.get("us_per_atom_min"), ".2f"), fmt(r.get("memory", {}).get("peak_mib"), ".0f"),
              status_cell(r)] for r in c["scaling"]]
    ratio = [[k, fmt(v.get("median"), ".2f"), fmt(v.get("fastest"), ".2f")] for k, v in c["ratios"].items()]
    return (["## Compressed models: minidp compress against dp --tf compress (step 0.01)", ""]
            + table(["implementation", "mode", "frames per call", "ms/frame (median)", "ms/frame (min)", "peak MiB",
                     "cores used", "status"], rows)
            + ["", "One frame of replicated water boxes per call:", ""]
            + table(["implementation", "atoms", "us/atom (median)", "us/atom (min)", "peak MiB", "status"], scale)
            + ["", "minidp compressed's speed-up over TF compressed (TF's time over minidp's, same run):", ""]
            + table(["case", "median", "fastest calls"], ratio) + [""])


def write_outputs(results: dict, out: Path) -> list[Path]:
    """results-compressed.json and .md (``--compressed-only``); returns their paths."""
    import json

    from minidp.io.outputs import atomic_path

    m = results["meta"]
    head = [f"# minidp vs deepmd-kit {m['versions'].get('deepmd-kit')}: compressed models", "",
            (f"`{m['command']}` on {m['date']}: {m['cpu']}, {m['cores']} cores (shared), {m['threads']} threads for "
             f"both; load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end; "
             f"{m['elapsed_s'] / 60:.1f} min. Medians of {m['rounds']} interleaved round(s)."), ""]
    texts = {"results-compressed.json": json.dumps(results, indent=1, default=float),
             "results-compressed.md": "\n".join(head + markdown(results))}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return [out / name for name in texts]
