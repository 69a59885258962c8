"""Smoke tests of benchmarks/: its functions run on tiny inputs and write their outputs.

Speed is judged by ``python -m benchmarks.run``, never here: nothing below asserts a time.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

import minidp.training.force_training
from benchmarks import flops, measure, profile, report, run
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


def test_all_sections_and_outputs_on_tiny_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "compress_model", lambda s: {"status": "skipped in tests", "path": None})
    results = run.run_all(tiny_settings(tmp_path), run=in_process)
    paths = report.write_outputs(results, tmp_path)
    assert sorted(p.name for p in paths) == ["memory.png", "results.json", "results.md", "throughput.png",
                                             "time_per_atom.png"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved["throughput"]] == ["ok", "ok"]
    assert saved["large"]["natoms"] == 384 and saved["throughput"][1]["speedup_vs_tf"] > 0
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Targets", "## Throughput", "## Memory budgets", "## Size scaling", "## Large frame", "## FLOPs"):
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
