"""Smoke tests of benchmarks/: its functions run on tiny inputs and write their outputs.

Speed is judged by ``python -m benchmarks.run``, never here: nothing below asserts a time.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

import minidp.training.force_training
from benchmarks import ceilings, flops, measure, profile, report, run
from minidp.neighbor import build_neighbor_list
from minidp.io.serialization import load_model
from tests.conftest import MODEL_DP, MODEL_PB, WATER, need


def test_replicate_keeps_every_environment(water_frames):
    coords, cells, types = water_frames
    xyz0, cell0 = coords[0].reshape(-1, 3).astype(float), cells[0].reshape(3, 3).astype(float)
    xyz, cell, big_types = measure.replicate(xyz0, cell0, types, (2, 1, 1))
    assert xyz.shape == (384, 3) and big_types.shape == (384,)
    np.testing.assert_allclose(cell, cell0 * [[2], [1], [1]])
    small = build_neighbor_list(xyz0[None], cell0[None], types, 6.0, [46, 92])
    big = build_neighbor_list(xyz[None], cell[None], big_types, 6.0, [46, 92])
    # each copy's atoms see as many neighbours of each kind as the originals
    np.testing.assert_array_equal((big.nlist[0] >= 0).sum(-1), np.tile((small.nlist[0] >= 0).sum(-1), 2))


def test_replicate_rejects_bad_reps():
    with pytest.raises(ValueError, match=r"reps must be three positive integers, got \[0, 1, 1\]"):
        measure.replicate(np.zeros((1, 3)), np.eye(3), np.zeros(1, int), (0, 1, 1))


def test_time_calls_repeats_and_caps():
    assert len(measure.time_calls(lambda: None, repeats=3)) == 3
    assert len(measure.time_calls(lambda: None, repeats=1, min_seconds=60.0, max_calls=5)) == 5
    assert len(measure.time_calls(lambda: None, repeats=100, max_seconds=0.0)) == 1


def test_flops_of_the_water_model(water_dp, water_frames):
    coords, cells, types = water_frames
    cfg = water_dp.model.descriptor.config
    nl = build_neighbor_list(coords[:1].reshape(1, -1, 3), cells[:1].reshape(1, 3, 3), types, cfg.rcut, cfg.sel)
    counts = flops.neighbour_counts(nl.nlist, types, cfg.sec)
    assert counts.shape == (2, 2) and counts.sum() == (nl.nlist >= 0).sum()
    per = flops.flops_per_frame(water_dp.model, counts, np.bincount(types))
    fit = sum(2 * flops.matmul_flops(water_dp.model.fitting[t]) * n for t, n in enumerate(np.bincount(types)))
    for name in ("minidp", "tf", "tf-compressed"):
        assert per[name]["fitting"] == fit
        assert per[name]["total"] == pytest.approx(sum(per[name][k] for k in ("embedding", "contraction", "fitting")))
    # minidp skips the padded slots, TF does not
    assert per["minidp"]["embedding"] < per["tf"]["embedding"]


def test_parse_args_names_bad_values(tmp_path):
    with pytest.raises(ValueError, match="--model .*nope.pb must be an existing"):
        run.parse_args(["--model", str(tmp_path / "nope.pb")])
    need(MODEL_PB)
    with pytest.raises(ValueError, match="--threads must be positive, got 0"):
        run.parse_args(["--model", str(MODEL_PB), "--data", str(need(WATER / "data_3")), "--threads", "0"])
    base = ["--model", str(MODEL_PB), "--data", str(WATER / "data_3")]
    with pytest.raises(ValueError, match="--train-steps must be 0 .* got -1"):
        run.parse_args(base + ["--train-steps", "-1"])
    with pytest.raises(ValueError, match="--shared .*nowhere has no models/input.json"):
        run.parse_args(base + ["--shared", str(tmp_path / "nowhere")])
    s = run.parse_args(base + ["--quick", "--load", "--no-pt"])
    assert s.load and not s.pt and s.train_steps == 20
    assert run.parse_args(base + ["--train-steps", "0", "--shared", str(tmp_path)]).train_steps is None


def test_watchdog_kills_on_time_and_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("the watchdog reads resident memory from /proc")
    env = run.child_env(1)
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert run.run_process(sleep, env, tmp_path, tmp_path / "a.log", 0.5, 1 << 40).startswith("timeout")
    hog = [sys.executable, "-c", "import numpy, time; a = numpy.ones(50_000_000); time.sleep(30)"]
    assert run.run_process(hog, env, tmp_path, tmp_path / "b.log", 60, 100 << 20).startswith("memory")
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    assert run.run_process(fail, env, tmp_path, tmp_path / "c.log", 60, 1 << 40) == "failed (exit 3)"


def tiny_settings(tmp_path) -> run.Settings:
    s = run.settings(need(MODEL_PB), need(WATER / "data_3"), tmp_path, threads=1, quick=True, mem_limit_gib=4.0)
    return replace(s, nframes=2, budget_frames=2, repeats=1, chunk_sizes=(192,), budgets=(64 * run.MIB,),
                   replicas=((1, 1, 1),), large_replicas=(1, 1, 2), model_minidp=need(MODEL_DP),
                   dgemm_shapes=((64, 64, 64),), train_steps=None)


def test_a_measurement_runs_in_its_own_process(tmp_path):
    s = tiny_settings(tmp_path)
    frames = tmp_path / "frames.npz"
    run.prepare_frames(s, load_model(s.model_minidp), frames)
    runner = run.Runner(s, tmp_path, tqdm(disable=True))
    r = runner(run.model_spec(s, "minidp", frames, nframes=2, batch_size=192), "minidp")
    assert r["status"] == "ok", r.get("log")
    assert r["natoms"] == 192 and len(r["times"]) >= 1 and r["peak"] >= r["rss_base"] > 0


def in_process(spec: dict, label: str, timeout: float | None = None) -> dict:
    """The Runner's contract without a subprocess (memory figures are then the test process's)."""
    if spec["kind"] == "dgemm":
        return {**measure.measure_dgemm(spec), "status": "ok"}
    if spec["kind"] == "tf":
        pytest.importorskip("deepmd.infer")
    return {**measure.measure_model(spec), "status": "ok"}


def test_all_sections_and_outputs_on_tiny_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "compress_model", lambda s: {"status": "skipped in tests", "path": None})
    # deepmd-kit's PyTorch backend cannot run: one line says why, the run goes on without its rows
    monkeypatch.setattr(run.deepmd_pt, "e3nn_installed", lambda: False)
    results = run.run_all(replace(tiny_settings(tmp_path), pt=True), run=in_process)
    err = capsys.readouterr().err
    assert "deepmd-kit PyTorch rows skipped: " in err and ("e3nn" in err or "not installed" in err)
    assert [r["name"] for r in results["one_frame"]] == ["tf", "minidp"]
    assert results["one_frame"][1]["gflops"] > 0 and results["throughput"][1]["fraction_of_gemm"] > 0
    paths = report.write_outputs(results, tmp_path)
    assert sorted(p.name for p in paths) == ["memory.png", "results.json", "results.md", "throughput.png",
                                             "time_per_atom.png"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved["throughput"]] == ["ok", "ok"]
    assert saved["large"]["natoms"] == 384 and saved["throughput"][1]["speedup_vs_tf"] > 0
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Targets", "## Summary", "## Throughput", "## One frame per call", "## Memory budgets",
                    "## Size scaling", "## Large frame", "## FLOPs"):
        assert heading in text
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths if p.suffix == ".png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or temporary files left


def test_compressed_section_on_tiny_inputs(tmp_path):
    """benchmarks.compressed: both contenders in both modes, the size scaling, the ratios and the tables."""
    import dataclasses

    from benchmarks import compressed
    from minidp.compress import compress_descriptor
    from minidp.io.serialization import save_model

    s = replace(tiny_settings(tmp_path), rounds=1)
    model = load_model(s.model_minidp)
    small = tmp_path / "c.dp"
    save_model(small, dataclasses.replace(model, descriptor=compress_descriptor(model.descriptor, 0.9, 0.1)))
    frames = tmp_path / "frames.npz"
    run.prepare_frames(s, model, frames)
    # the plain .pb stands in for deepmd-kit's compressed one: the section only times what it is given
    section = compressed.bench(in_process, s, frames, s.model_pb, small, run.model_spec, run.timing_row)
    assert [r["status"] for r in section["throughput"]] == ["ok"] * 4
    assert set(section["ratios"]) == {"batch", "one frame per call", "192 atoms, one frame"}
    text = "\n".join(compressed.markdown({"compressed": section}))
    assert "minidp compress against dp --tf compress" in text and "one frame per call" in text


def test_ensemble_stage_shares_bound_the_ratio():
    """The ensemble benchmark's stage breakdown: the shared fraction and the 4 - 3f bound it gives."""
    need(MODEL_DP)
    from benchmarks.bench_ensemble import stage_shares

    shares = stage_shares(MODEL_DP.parents[1], nframes=1, repeats=1)
    assert set(shares["seconds"]) == {"neighbour_list", "env_matrix_and_packing", "whole_model"}
    assert 0 < shares["shared_fraction"] < 1
    assert shares["ratio_bound"] == pytest.approx(4 - 3 * shares["shared_fraction"])


def test_float32_rows_beside_float64(tmp_path, monkeypatch):
    """--float32: the float32 .dp is made, minidp and TF rows on it appear with the sgemm peak, their speed-up
    and FLOP rows. The float64 .pb stands in for the converted float32 one (dp convert-backend takes ~20 s)."""
    monkeypatch.setattr(run, "compress_model", lambda s: {"status": "skipped in tests", "path": None})
    s = replace(tiny_settings(tmp_path), float32=True)

    def fake_float32(settings, model):
        dp32 = settings.out / "model-float32.dp"
        run.save_model(dp32, model.astype(np.float32), overwrite=dp32.exists())
        return {"status": "ok (test)", "dp": str(dp32), "pb": str(settings.model_pb)}

    monkeypatch.setattr(run, "make_float32_models", fake_float32)
    results = run.run_all(s, run=in_process)
    names = [r["name"] for r in results["throughput"]]
    assert names[-2:] == ["tf-float32", "minidp-float32"] and all(r["status"] == "ok" for r in results["throughput"])
    assert load_model(tmp_path / "model-float32.dp").fitting[0].dtype == np.float32
    assert results["sgemm"]["peak_gflops"] > 0 and results["throughput"][-1]["speedup_vs_tf_float32"] > 0
    assert results["flops"]["achieved"]["minidp-float32"]["fraction_of_peak"] > 0
    text = report.markdown(results)
    assert "minidp-float32" in text and "x TF float32" in text and "sgemm" in text


def test_training_flops_of_the_water_model(water_dp, water_frames):
    """The step's parts: the embedding reverse is twice its forward, the fitting seven passes."""
    coords, cells, types = water_frames
    cfg = water_dp.model.descriptor.config
    nl = build_neighbor_list(coords[:1].reshape(1, -1, 3), cells[:1].reshape(1, 3, 3), types, cfg.rcut, cfg.sel)
    counts = flops.neighbour_counts(nl.nlist, types, cfg.sec)
    t = flops.training_flops(water_dp.model, counts, np.bincount(types))
    per = flops.flops_per_frame(water_dp.model, counts, np.bincount(types))
    assert t["embedding backward"] == 2 * t["embedding forward"] == 2 * per["minidp"]["embedding"]
    assert t["fitting"] == pytest.approx(3.5 * per["minidp"]["fitting"])
    assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))


def test_profile_prints_every_workload(capsys):
    """benchmarks.profile on one step: the tables of the training step, the exact evaluation and DeepPot;
    the timing wrappers are gone afterwards."""
    original = minidp.training.force_training.embed_jvp
    assert profile.main(["--model", str(need(MODEL_DP)), "--data", str(need(WATER / "data_3")), "--steps", "1",
                         "--threads", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for heading in ("### training step (1 frame), the stages on one core", "### exact evaluation", "### DeepPot.eval"):
        assert heading in out
    assert "| embedding nets: value + tangent |" in out and "unattributed" in out
    assert minidp.training.force_training.embed_jvp is original


def test_ceilings_print_every_measurement(capsys):
    """benchmarks.ceilings on tiny blocks: its five sections (the energies when ../shared has the water model),
    np.tanh put back after the energies' patch; bad arguments named."""
    assert ceilings.main(["--rows", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for heading in ("1. Products", "2. Elementwise passes", "3. X2 W: BLAS against a Numba loop", "4. float32 tanh",
                    "5. An empty parallel_map"):
        assert heading in out
    assert out.count("| float32 | 50 -> 100 |") == 6 + 1  # three products, three passes; one Numba row
    if MODEL_DP.is_file() and (WATER / "data_3").is_dir():
        assert "with the rational tanh in the embedding nets" in out
    assert np.tanh is ceilings._NUMPY_TANH
    for argv in (["--rows", "6"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            ceilings.main(argv)


def test_rational_tanh_stays_within_a_few_ulp():
    """The vectorizable float32 tanh the ceilings measure: odd, within [-1, 1] and 6 ulp of float64's tanh,
    beyond the clip too (its bias, not its largest error, is what the ceilings report)."""
    z = np.linspace(-12.0, 12.0, 100_001).astype(np.float32)
    got = np.empty_like(z)
    ceilings.rational_tanh(z, got)
    exact = np.tanh(z.astype(np.float64))
    assert np.max(np.abs(got - exact) / np.spacing(exact.astype(np.float32))) <= 6
    np.testing.assert_array_equal(got, -got[::-1])
    assert np.all(np.abs(got) <= 1)


# ---------------------------------------------------------------------------
# The PyTorch, training and --load parts of benchmarks.run, and the summary table (no deepmd-kit needed)
# ---------------------------------------------------------------------------


def timing(name: str, ms: float, loaded_ms: float | None = None, **extra) -> dict:
    """A finished timing row as benchmarks.run.timing_row makes it (the fields the report reads)."""
    row = {"name": name, **extra, "status": "ok", "ms_per_frame": ms, "ms_per_frame_min": 0.9 * ms,
           "frames_per_s": 1e3 / ms, "cores_used": 1.0, "memory": {}}
    if loaded_ms is not None:
        row["loaded"] = timing(name, loaded_ms, **extra)
    return row


def fixture_results() -> dict:
    """A run's results: batch and one-frame rows of minidp, TF and PT (loaded twins too), training rows."""
    thr = [timing("tf", 60.0, 90.0), timing("pt", 80.0, 120.0),
           timing("minidp", 20.0, 40.0, requested=192, gflops=45.0, fraction_of_gemm=0.6),
           timing("minidp", 25.0, 50.0, requested=960)]
    one = [timing("tf", 70.0, 100.0, mode=run.ONE_FRAME), timing("pt", 90.0, 150.0, mode=run.ONE_FRAME),
           timing("minidp", 35.0, 70.0, mode=run.ONE_FRAME, gflops=25.0, fraction_of_gemm=0.33)]
    for group in (thr, one):
        run.add_speedups(group)
        run.add_speedups([r["loaded"] for r in group])
    steps = [{"name": n, "precision": p, "status": "ok", "seconds_per_step": t, "seconds_per_step_min": t,
              "steps_per_s": 1 / t, "wall_s": 30.0} for n, p, t in
             (("dp --tf", "float64", 0.14), ("minidp", "float64", 0.07), ("dp --pt", "float64", 0.2),
              ("dp --tf", "float32", 0.1), ("minidp", "float32", 0.04))]
    steps.append({"name": "dp --pt", "precision": "float32", "status": "failed (exit 1)", "log": "no e3nn"})
    meta = {"cpu": "Test CPU", "cores": 2, "threads": 2, "loadavg_start": [0.1, 0, 0], "loadavg_end": [0.2, 0, 0],
            "versions": {"deepmd-kit": "3.2.0", "numpy": "2.4"}, "date": "2026-12-06 09:00:00", "quick": False,
            "nframes": 40}
    return {"meta": meta, "throughput": thr, "one_frame": one, "dgemm": {"peak_gflops": 75.0},
            "sgemm": {"peak_gflops": 150.0}, "training": {"steps": 300, "disp_freq": 100, "rows": steps}}


def test_summary_table_of_paths_and_contenders(tmp_path, capsys):
    """One Markdown table: each path's times, minidp's speed-ups over TF and PT (idle and loaded), its GFLOP/s;
    the machine line with the load averages and the GEMM peaks; `python -m benchmarks.report results.json`
    prints it with the load table."""
    results = fixture_results()
    from benchmarks import training

    training.add_speedups(results["training"]["rows"])
    text = "\n".join(report.summary_md(results))
    assert ("| exact float64, 40 frames per call | ms/frame | 20.0 | 60.0 | 3.00 | 80.0 | 4.00 | 45.0 | 0.60 | "
            "2.25 | 3.00 |") in text
    assert "| exact float64, one frame per call | ms/frame | 35.0 | 70.0 | 2.00 | 90.0 | 2.57 | 25.0 | 0.33 |" in text
    assert "| training float64 (300 steps) | s/step | 0.0700 | 0.1400 | 2.00 | 0.2000 | 2.86 |" in text
    assert "| training float32 (300 steps) | s/step | 0.0400 | 0.1000 | 2.50 | - | - |" in text
    assert "Test CPU" in text and "load average 0.1 at the start" in text and "dgemm 75.0 GFLOP/s" in text
    load = "\n".join(report.load_md(results))
    # minidp doubles under load, TF 1.5x: the speed-up over TF falls from 3.00 to 2.25
    assert "| exact float64, 40 frames per call | minidp | 20 | 40 | 2.00 | 3.00 | 2.25 | 4.00 | 3.00 |" in load
    assert "| exact float64, 40 frames per call | deepmd-kit TF | 60 | 90 | 1.50 |" in load
    train = "\n".join(report.training_md(results))
    assert "| minidp | float64 | 0.0700 |" in train and "dp --pt float32: failed (exit 1): no e3nn" in train
    assert "GFLOP/s" in train
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report.main([str(tmp_path / "results.json")]) == 0
    assert capsys.readouterr().out.startswith("## Summary")


def test_loaded_twins_travel_through_rounds():
    """--load: each round's loaded result is merged like the idle ones and becomes the row's "loaded"."""
    def result(seconds):
        return {"status": "ok", "times": [seconds], "nframes": 2, "natoms": 192, "peak": 2, "peak_setup": 1,
                "rss_load": 1, "rss_base": 1, "energy_per_atom": -1.0, "warmup_s": 0.1, "cores_used": 1.0}

    rounds = [{**result(1.0), "loaded": result(3.0)}, {**result(1.2), "loaded": result(2.0)}]
    row = run.timing_row("minidp", run.merge_rounds(rounds), mode=run.ONE_FRAME)
    assert row["calls"] == 2 and row["loaded"]["calls"] == 2
    assert row["loaded"]["ms_per_frame"] == pytest.approx(1e3 * 2.5 / 2) and row["loaded"]["mode"] == run.ONE_FRAME


def test_busy_neighbour_is_started_and_killed():
    if not Path("/proc/self").exists():
        pytest.skip("reads the process table from /proc")
    with run.busy_neighbour() as pid:
        assert Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    with run.busy_neighbour(False) as pid:
        assert pid is None


def test_step_times_from_each_programs_output():
    from benchmarks import training
    from validation.train_compare import average_training_time

    assert training.seconds_per_step("minidp", "trained 300 steps, 0.0712 s/step; last line: ...") == 0.0712
    tf_log = "DEEPMD INFO    average training time: 0.1410 s/batch (exclude first 100 batches)\n"
    pt_log = "DEEPMD INFO    average training time: 1.1110 s/batch (2 batches excluded)\n"
    assert training.seconds_per_step("dp --tf", tf_log) == 0.141 == average_training_time(tf_log)
    assert training.seconds_per_step("dp --pt", pt_log) == 1.111
    assert training.seconds_per_step("minidp", "Traceback ...") is None
    assert training.display_frequency(300) == 100 and training.display_frequency(20) == 6
    d = training.training_input(need(MODEL_PB).parents[1], 20, "float32")
    assert d["model"]["descriptor"]["precision"] == d["model"]["fitting_net"]["precision"] == "float32"
    assert d["training"]["numb_steps"] == 20 and d["training"]["disp_freq"] == 6


def test_training_section_rounds_and_speedups(tmp_path, monkeypatch):
    """Every program in both precisions, idle and loaded, each in a folder of its own with the input; a run
    that prints no step time is a failed row."""
    from benchmarks import training

    calls = []

    def fake_run(cmd, env, cwd, log, timeout, mem_limit):
        calls.append((cmd, json.loads((cwd / "input.json").read_text())["model"]["descriptor"]["precision"]))
        text = {"minidp": "trained 6 steps, 0.05 s/step", "--tf": "average training time: 0.1 s/batch",
                "--pt": "nothing"}
        log.write_text(next(v for k, v in text.items() if k in cmd))
        return "ok"

    monkeypatch.setattr(training, "run_process", fake_run)
    monkeypatch.setattr(training, "dp_command", lambda: "dp")
    s = replace(tiny_settings(tmp_path), rounds=2, train_steps=6, load=True)
    section = training.bench(s, need(MODEL_PB).parents[1], tmp_path, "/copy", tqdm(disable=True))
    assert len(calls) == training.runs_planned(s, "/copy") == 2 * 2 * 3 * 2
    rows = {(r["name"], r["precision"]): r for r in section["rows"]}
    mini = rows[("minidp", "float32")]
    assert mini["seconds_per_step"] == 0.05 and mini["speedup_vs_dp_tf"] == pytest.approx(2.0)
    assert mini["loaded"]["speedup_vs_dp_tf"] == pytest.approx(2.0) and "speedup_vs_dp_pt" not in mini
    assert rows[("dp --pt", "float64")]["status"] == "failed (no time per step in the output)"


def test_pytorch_copy_leaves_out_the_op_library(tmp_path, monkeypatch):
    """benchmarks.deepmd_pt: the package copied once without libdeepmd_op_pt.so, reused, remade when the
    package is newer; without e3nn, skipped with the reason."""
    from benchmarks import deepmd_pt

    pkg = tmp_path / "site" / "deepmd"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lib" / deepmd_pt.OP_LIBRARY).write_bytes(b"\0")
    (pkg / "lib" / "libdeepmd_op.so").write_bytes(b"\0")
    monkeypatch.setattr(deepmd_pt, "installed_deepmd", lambda: pkg)
    monkeypatch.setattr(deepmd_pt, "e3nn_installed", lambda: True)
    out = tmp_path / "out"
    first = deepmd_pt.package_copy(out)
    copy = out / deepmd_pt.COPY_DIR / "deepmd"
    assert first == {"status": "ok", "pythonpath": str(copy.parent.resolve())}
    assert (copy / "lib" / "libdeepmd_op.so").exists() and not (copy / "lib" / deepmd_pt.OP_LIBRARY).exists()
    assert deepmd_pt.package_copy(out)["status"] == "ok (cached)"
    os.utime(pkg / "__init__.py", (copy.stat().st_mtime + 10,) * 2)
    assert deepmd_pt.package_copy(out)["status"] == "ok"
    assert [p.name for p in copy.parent.iterdir()] == ["deepmd"]  # no staging folder left
    monkeypatch.setattr(deepmd_pt, "e3nn_installed", lambda: False)
    skipped = deepmd_pt.package_copy(tmp_path / "other")
    assert skipped["pythonpath"] is None and "e3nn" in skipped["status"]


def test_minidp_training_rows_get_a_flop_rate(water_dp, water_frames):
    """flops_section: minidp's training rows get benchmarks.flops.training_flops of one frame over their s/step,
    against the dgemm peak (float64) or the sgemm peak (float32); deepmd-kit's rows get none."""
    coords, cells, types = water_frames
    frames = {"coords": coords[:1].reshape(1, -1, 3), "cells": cells[:1].reshape(1, 3, 3), "atom_types": types}
    rows = [{"name": n, "precision": p, "status": "ok", "seconds_per_step": 0.1}
            for n, p in (("minidp", "float64"), ("minidp", "float32"), ("dp --tf", "float64"))]
    results = {"meta": {"nframes": 1}, "dgemm": {"peak_gflops": 50.0}, "sgemm": {"peak_gflops": 100.0},
               "throughput": [], "one_frame": [], "training": {"rows": rows}}
    run.flops_section(water_dp.model, frames, results)
    cfg = water_dp.model.descriptor.config
    nl = build_neighbor_list(frames["coords"], frames["cells"], types, cfg.rcut, cfg.sel)
    step = flops.training_flops(water_dp.model, flops.neighbour_counts(nl.nlist, types, cfg.sec), np.bincount(types))
    assert rows[0]["gflops"] == pytest.approx(step["total"] / 0.1 / 1e9) == rows[1]["gflops"]
    assert rows[0]["fraction_of_gemm"] == pytest.approx(2 * rows[1]["fraction_of_gemm"])
    assert "gflops" not in rows[2]
