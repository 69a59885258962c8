"""minidp train: deepmd-kit's input, statistics, the loop, lcurve, checkpoints and resume, export."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from minidp import DeepPot
from minidp.cli import main
from minidp.model import new_model
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import load_model
from minidp.stats import energy_bias, env_stats, raw_env_sums
from minidp.training.sampling import Sampler, batch_size, load_systems
from minidp.training.lcurve import lcurve_columns, read_lcurve
from minidp.training.config import parse_input, read_input
from minidp.training.loop import train
from tests.conftest import WATER, need

SMALL = SeAConfig(4.0, 0.5, (10, 20), (4, 8), 2, True)


def _water_frames(rng, nframes: int, nmol: int = 4, side: float = 6.0):
    """Random frames of nmol water molecules in a cubic box (O first, then H)."""
    frames = []
    for _ in range(nframes):
        centres = (np.stack(np.meshgrid(*[np.arange(2)] * 3), -1).reshape(-1, 3)[:nmol] + 0.25) * side / 2
        centres = centres + rng.normal(0, 0.2, centres.shape)
        h1 = centres + rng.normal([0.96, 0, 0], 0.05)
        h2 = centres + rng.normal([-0.24, 0.93, 0], 0.05)
        frames.append(np.concatenate([centres, h1, h2]))
    return np.array(frames)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two small water systems labelled by a random "teacher" model; the first spread over two set.* folders."""
    import dpdata

    root = tmp_path_factory.mktemp("data")
    teacher = new_model(["O", "H"], SMALL, (8, 8), seed=11)
    rng = np.random.default_rng(0)
    types = np.array([0] * 4 + [1] * 8)
    for name, nframes, set_size in (("sys_a", 6, 3), ("sys_b", 4, 10)):
        coords, cells = _water_frames(rng, nframes), np.tile(np.eye(3) * 6.0, (nframes, 1, 1))
        e, f, v = DeepPot(teacher).eval(coords, cells, types)
        data = {"atom_names": ["O", "H"], "atom_numbs": [4, 8], "atom_types": types, "orig": np.zeros(3),
                "cells": cells, "coords": coords, "energies": e.ravel(), "forces": f,
                "virials": v.reshape(nframes, 3, 3), "nopbc": False}
        dpdata.LabeledSystem(data=data).to("deepmd/npy", str(root / name), set_size=set_size)
    return root


def _input(numb_steps=6, **training) -> dict:
    d = {
        "model": {"type_map": ["O", "H"],
                  "descriptor": {"type": "se_e2_a", "sel": list(SMALL.sel), "rcut": SMALL.rcut, "rcut_smth": 0.5,
                                 "neuron": [4, 8], "axis_neuron": 2, "type_one_side": True, "seed": 1, "_note": "x"},
                  "fitting_net": {"neuron": [8, 8], "resnet_dt": True, "seed": 1}},
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 2},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0.5, "limit_pref_v": 0.5},
        "training": {"training_data": {"systems": ["sys_a", "sys_b"], "batch_size": "auto"},
                     "validation_data": {"systems": ["sys_b"], "batch_size": 1, "numb_btch": 2},
                     "numb_steps": numb_steps, "seed": 3, "disp_file": "lcurve.out", "disp_freq": 2, "save_freq": 3},
    }
    d["training"].update(training)
    return d


# ---------------------------------------------------------------------------
# The input
# ---------------------------------------------------------------------------


def test_the_water_input_is_read_as_deepmd_kit_means_it():
    """../shared/models/input.json: se_e2_a, its sizes, systems relative to the file's folder."""
    path = need(WATER.parent.parent / "models" / "input.json")
    c = read_input(path)
    assert c.descriptor.sel == (46, 92) and c.descriptor.neuron == (25, 50, 100) and c.descriptor.axis_neuron == 16
    assert c.fitting_neuron == (240, 240, 240) and c.fitting_resnet_dt and c.descriptor.type_one_side
    assert (c.lr.start_lr, c.lr.stop_lr, c.lr.decay_steps, c.numb_steps) == (1e-3, 3.51e-8, 5000, 14000)
    assert c.loss.start_pref_f == 1000 and c.loss.limit_pref_e == 1
    assert [p.resolve() for p in c.training.systems] == [(WATER / f"data_{i}").resolve() for i in range(3)]
    assert c.validation.numb_btch == 3 and c.training.batch_size == "auto"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["loss"].update(limit_pref_h=1.0), r"loss/limit_pref_h = 1.0: minidp does not train the hessian term"),
    (lambda d: d["training"].update(mixed_prec={}), r"unsupported key\(s\) \['mixed_prec'\] in training"),
    (lambda d: d.update(nvnmd={}), r"unsupported key\(s\) \['nvnmd'\] in the top level"),
    (lambda d: d["model"].update(type_embedding={"neuron": [2, 4, 8]}),
     r"model/type_embedding: minidp evaluates and compresses se_e2_a with a type embedding but does not train it"),
    (lambda d: d["model"]["descriptor"].update(type="se_e2_r"), r"model/descriptor/type = 'se_e2_r' is not supported"),
    (lambda d: d["learning_rate"].update(type="step"), r"input: learning_rate.type 'step' is not supported"),
    (lambda d: d["model"]["fitting_net"].update(precision="float16"), r"precision = 'float16' is not supported"),
    (lambda d: d["training"].pop("numb_steps"), r"training/numb_steps is required"),
    (lambda d: d["training"]["training_data"].update(batch_size=0), r"batch_size must be a positive integer"),
    (lambda d: d["model"].update(type_map=["O"]), r"type_map \['O'\] has 1 types but sel has 2"),
    (lambda d: d["model"]["descriptor"].pop("rcut"), r"input: model/descriptor/rcut is required"),
    (lambda d: d.pop("loss"), r"input: loss must be a section"),
])
def test_unsupported_or_bad_input_is_refused_by_name(edit, message):
    d = _input()
    edit(d)
    with pytest.raises(ValueError, match=message):
        parse_input(d)


def test_batch_size_auto_gives_at_least_32_atoms():
    assert batch_size("auto", 192) == 1 and batch_size("auto", 12) == 3 and batch_size("auto:100", 12) == 9
    assert batch_size(4, 192) == 4


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def test_env_stats_follow_deepmd_kits_formula(data_dir):
    """davg/dstd from the pooled raw rows, padded slots counted as zeros, by hand."""
    from minidp.neighbor import build_neighbor_list
    from minidp.se_e2_a import env_matrix

    s = load_systems([data_dir / "sys_b"], ["O", "H"])[0]
    davg, dstd = env_stats(raw_env_sums(s.coords, s.cells, s.atom_types, SMALL), SMALL)
    assert davg.shape == dstd.shape == (2, SMALL.nnei, 4)
    nl = build_neighbor_list(s.coords, s.cells, s.atom_types, SMALL.rcut, list(SMALL.sel))
    R, _ = env_matrix(nl.rij, nl.nlist, s.atom_types, np.zeros((2, SMALL.nnei, 4)), np.ones((2, SMALL.nnei, 4)),
                      SMALL.rcut_smth, SMALL.rcut, backend="numpy")
    for t in range(2):
        rows = R[:, s.atom_types == t].reshape(-1, 4)
        np.testing.assert_allclose(davg[t, :, 0], rows[:, 0].mean())
        np.testing.assert_allclose(dstd[t, :, 0], rows[:, 0].std())
        a = rows[:, 1:].reshape(-1)
        np.testing.assert_allclose(dstd[t, :, 1], np.sqrt(np.mean(a * a) - np.mean(a) ** 2))
        assert (davg[t, :, 1:] == 0).all()


def test_env_stats_agree_with_the_deepmd_trained_water_model():
    """Statistics of data_0..2 against those deepmd-kit stored in water-14000.dp (it sampled other frames: 1%)."""
    from tests.conftest import MODEL_DP

    ref = load_model(need(MODEL_DP)).descriptor
    cfg = ref.config
    systems = load_systems([need(WATER / f"data_{i}") for i in range(3)], ["O", "H"])
    sums = sum(raw_env_sums(s.coords[:10], s.cells[:10], s.atom_types, cfg) for s in systems)
    davg, dstd = env_stats(sums, cfg)
    np.testing.assert_allclose(davg, ref.davg, rtol=1e-2, atol=1e-6)
    np.testing.assert_allclose(dstd, ref.dstd, rtol=1e-2)


def test_energy_bias_is_the_least_squares_solution():
    counts = np.array([[2, 1], [1, 3], [4, 4]])
    b = np.array([-3.0, -0.5])
    np.testing.assert_allclose(energy_bias(counts @ b, counts), b, rtol=1e-12)
    # one composition: the minimum-norm solution, proportional to the counts
    one = energy_bias(np.array([-10.0]), np.array([[1, 2]]))
    np.testing.assert_allclose(one, np.array([1, 2]) * -10.0 / 5.0)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def test_sampler_draws_every_frame_once_per_pass(data_dir):
    systems = load_systems([data_dir / "sys_a"], ["O", "H"])
    s = Sampler(systems, 2, seed=0)
    frames = np.concatenate([s.next()[1] for _ in range(3)])
    assert sorted(frames) == list(range(6))


def test_training_writes_lcurve_checkpoints_plot_and_model(data_dir, tmp_path):
    config = parse_input(_input(6), data_dir)
    result = train(config, tmp_path / "model.dp", tmp_path, progress=False)
    curve = read_lcurve(tmp_path / "lcurve.out")
    assert list(curve) == lcurve_columns(True, True)
    np.testing.assert_array_equal(curve["step"], [0, 2, 4, 6])
    assert curve["lr"][0] == 1e-3 and np.all(np.diff(curve["lr"]) < 0)
    assert np.isfinite(result.seconds_per_step) and result.last["val"].rmse_f == pytest.approx(curve["rmse_f_val"][-1], rel=1e-4)
    for f in ("model.ckpt-3.dp", "model.ckpt-3.npz", "model.ckpt-6.dp", "lcurve.png", "model.dp"):
        assert (tmp_path / f).is_file(), f
    # the loss went down from the untrained model
    assert curve["rmse_trn"][-1] < curve["rmse_trn"][0]
    # the exported model is the trained one
    coords = _water_frames(np.random.default_rng(5), 1)
    cells = np.eye(3)[None] * 6.0
    types = np.array([0] * 4 + [1] * 8)
    a = DeepPot(result.model).eval(coords, cells, types)
    b = DeepPot(tmp_path / "model.dp").eval(coords, cells, types)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_restart_continues_exactly(data_dir, tmp_path):
    """6 steps straight, or 3 steps then a restart from the step-3 checkpoint: the same weights and curve."""
    config = parse_input(_input(6), data_dir)
    straight = train(config, None, tmp_path / "a", progress=False).model
    # the same run, stopped by hand after its step-3 checkpoint: rerun to 6 from that checkpoint
    resumed = train(config, None, tmp_path / "b", restart=tmp_path / "a" / "model.ckpt-3", progress=False).model
    for p, q in zip(straight.params(), resumed.params()):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    # the lcurve of a restart in a fresh folder starts at the checkpoint's step
    assert read_lcurve(tmp_path / "b" / "lcurve.out")["step"][0] == 4
    # in the run's own folder, behind its step-6 checkpoint: refused, or (--overwrite) the lines after
    # the checkpoint are replaced, not repeated
    before = (tmp_path / "a" / "lcurve.out").read_text()
    with pytest.raises(ValueError, match=r"holds checkpoints after step 3 \(model.ckpt-6\)"):
        train(config, None, tmp_path / "a", restart=tmp_path / "a" / "model.ckpt-3", progress=False)
    assert (tmp_path / "a" / "lcurve.out").read_text() == before
    train(config, None, tmp_path / "a", restart=tmp_path / "a" / "model.ckpt-3", progress=False, overwrite=True)
    assert (tmp_path / "a" / "lcurve.out").read_text() == before


def test_restart_from_a_missing_checkpoint_names_it(data_dir, tmp_path):
    config = parse_input(_input(6), data_dir)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*model.ckpt-9: .*model.ckpt-9.dp does not exist"):
        train(config, None, tmp_path, restart=tmp_path / "model.ckpt-9", progress=False)


def test_cli_train_end_to_end(data_dir, tmp_path, capsys):
    path = tmp_path / "input.json"
    d = _input(4)
    d["training"]["training_data"]["systems"] = [str(data_dir / "sys_a"), str(data_dir / "sys_b")]
    d["training"]["validation_data"]["systems"] = [str(data_dir / "sys_b")]
    path.write_text(json.dumps(d))
    assert main(["train", str(path), "-o", str(tmp_path / "m.yaml"), "--workdir", str(tmp_path), "-q"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert load_model(tmp_path / "m.yaml").type_map == ["O", "H"]


def test_cli_train_refuses_unknown_keys_in_one_line(tmp_path, capsys):
    path = tmp_path / "input.json"
    d = _input()
    d["training"]["tensorboard_bogus"] = True
    path.write_text(json.dumps(d))
    assert main(["train", str(path), "-o", str(tmp_path / "m.dp")]) == 2
    assert "unsupported key(s) ['tensorboard_bogus'] in training" in capsys.readouterr().err
    assert not (tmp_path / "m.dp").exists()


def test_trained_model_runs_in_deepmd_kit_after_convert_backend(data_dir, tmp_path):
    """minidp train -> model.yaml -> `dp convert-backend model.yaml model.pb` -> deepmd-kit's DeepPot: 1e-10."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    config = parse_input(_input(3), data_dir)
    model = train(config, tmp_path / "model.yaml", tmp_path, progress=False).model
    r = subprocess.run(["dp", "convert-backend", str(tmp_path / "model.yaml"), str(tmp_path / "model.pb")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    coords = _water_frames(np.random.default_rng(7), 2)
    cells = np.tile(np.eye(3) * 6.0, (2, 1, 1))
    types = np.array([0] * 4 + [1] * 8)
    ref = deepmd_infer.DeepPot(str(tmp_path / "model.pb")).eval(coords, cells, types, atomic=True)
    ours = DeepPot(model).eval(coords, cells, types, atomic=True)
    for x, y in zip(ours, ref):
        assert np.abs(x - y).max() <= 1e-10


def test_an_unwritable_model_suffix_is_refused_before_training(data_dir, tmp_path):
    config = parse_input(_input(6), data_dir)
    with pytest.raises(ValueError, match=r"cannot write '.pb' models; expected one of"):
        train(config, tmp_path / "model.pb", tmp_path, progress=False)
    assert not (tmp_path / "lcurve.out").exists()


def test_restart_with_another_model_shape_is_refused(data_dir, tmp_path):
    config = parse_input(_input(3), data_dir)
    train(config, None, tmp_path, progress=False)
    d = _input(6)
    d["model"]["descriptor"]["neuron"] = [4, 4]
    with pytest.raises(ValueError, match=r"checkpoint .* does not match the input: model/descriptor/neuron \(4, 4\) \(checkpoint: \(4, 8\)\)"):
        train(parse_input(d, data_dir), None, tmp_path / "b", restart=tmp_path / "model.ckpt-3", progress=False)
