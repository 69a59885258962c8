"""deepmd-kit's training input as minidp reads it: learning rates, optimizers, the keys deepmd-kit
accepts (read, ignored in one line or refused in one line), and data as deepmd-kit finds it
(folders searched, no type_map.raw, no type_map, deepmd/npy/mixed, several systems in one HDF5 file)."""

import copy
import json
import shutil

import numpy as np
import pytest

from minidp.cli import main
from minidp.training.config import parse_input
from minidp.training.lcurve import read_lcurve
from minidp.training.loop import train
from minidp.training.sampling import load_systems
from tests.conftest import WATER, need
from tests.test_train import _input, data_dir  # noqa: F401  (fixture)


def _parse(d, base):
    return parse_input(copy.deepcopy(d), base)


# ---------------------------------------------------------------------------
# The learning rate and the optimizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("section, training", [
    ({"type": "exp", "start_lr": 1e-3, "stop_lr_ratio": 1e-2, "decay_steps": 2}, {}),
    ({"type": "cosine", "start_lr": 1e-3, "stop_lr": 1e-5}, {"warmup_steps": 2, "warmup_start_factor": 0.1}),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_phase_ratio": 0.5}, {"warmup_ratio": 0.2}),
])
def test_the_lr_column_is_deepmd_kits_schedule_at_every_step(section, training, data_dir, tmp_path):
    """lcurve.out's lr at every step equals deepmd-kit's schedule (warm-up keys given in training: moved)."""
    dp_lr = pytest.importorskip("deepmd.dpmodel.utils.learning_rate")
    d = _input(6, disp_freq=1, save_freq=6, **training)
    d["learning_rate"] = section
    train(_parse(d, data_dir), None, tmp_path, progress=False)
    lr = read_lcurve(tmp_path / "lcurve.out")["lr"]
    ref = dp_lr.BaseLR(**{**section, **training, "num_steps": 6})
    np.testing.assert_allclose(lr, [float(ref.value(t)) for t in range(7)], rtol=5e-4, atol=0)


def test_optimizer_sections_and_legacy_keys(data_dir):
    d = _input()
    d["optimizer"] = {"type": "AdamW", "adam_beta2": 0.99, "weight_decay": 0.01}
    opt = _parse(d, data_dir).optimizer
    assert (opt.beta2, opt.weight_decay, opt.decoupled_weight_decay) == (0.99, 0.01, True)
    legacy = _input(opt_type="AdamW", adam_beta1=0.8)  # deepmd-kit 3.1's keys in training
    opt = _parse(legacy, data_dir).optimizer
    assert (opt.beta1, opt.weight_decay, opt.decoupled_weight_decay) == (0.8, 0.0, True)
    assert _parse(_input(), data_dir).optimizer.decoupled_weight_decay is False


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(optimizer={"type": "LKF"}), "optimizer.type 'LKF' is not supported"),
    (lambda d: d["training"].update(opt_type="HybridMuon"), "optimizer.type 'HybridMuon' is not supported"),
    (lambda d: (d["training"].update(warmup_steps=2), d["learning_rate"].update(warmup_steps=1)),
     "['warmup_steps'] given in both training and learning_rate"),
    (lambda d: d["training"].update(stop_batch=3), "training gives both numb_steps and its alias stop_batch"),
    (lambda d: d["model"]["fitting_net"].update(dim_case_embd=1),
     "model/fitting_net/dim_case_embd = 1: deepmd-kit sets a case embedding only in multi-task training"),
    (lambda d: d["model"].update(spin={"use_spin": [True, False]}), "model/spin: spin models are out of scope"),
    (lambda d: d["model"]["descriptor"].update(activation_function="swish"), "unknown activation 'swish'"),
    (lambda d: d["training"].update(enable_ema=True), "training/enable_ema = True is not supported"),
    (lambda d: d["training"].update(bogus=1), "unsupported key(s) ['bogus'] in training"),
])
def test_keys_refused_in_one_line(edit, message, data_dir):
    d = _input()
    edit(d)
    with pytest.raises(ValueError) as err:
        _parse(d, data_dir)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_keys_read_with_their_meaning(data_dir):
    d = _input(None)
    del d["training"]["numb_steps"]
    d["training"].update(stop_batch=7, max_ckpt_keep=2, disp_training=False, save_ckpt="ck", tensorboard=True,
                         profiling=False, stat_file="s.hdf5", numb_test=1)
    d["model"]["descriptor"].update(activation_function="gelu", n_axis_neuron=2)
    d["model"]["descriptor"].pop("axis_neuron", None)
    d["model"]["fitting_net"].update(activation_function="silut:2.5", seed=None, trainable=True)
    d["model"]["data_bias_nsample"] = 5
    c = _parse(d, data_dir)
    assert (c.numb_steps, c.max_ckpt_keep, c.disp_training, c.save_ckpt) == (7, 2, False, "ck")
    assert (c.descriptor.activation, c.fitting_activation, c.descriptor.axis_neuron) == ("gelu", "silut:2.5", 2)
    assert c.ignored == ("model/data_bias_nsample", "training/numb_test", "training/profiling",
                         "training/stat_file", "training/tensorboard")


def test_num_epoch_is_converted_as_deepmd_kit_does(data_dir):
    """sys_a 6 frames, sys_b 4, 12 atoms: batch 'auto' = 3 frames, 2 batches each, p = 1/2: 4 batches an epoch."""
    training_utils = pytest.importorskip("deepmd.dpmodel.utils.training_utils")
    d = _input()
    del d["training"]["numb_steps"]
    d["training"]["num_epoch"] = 2.5
    per_epoch = training_utils.compute_total_numb_batch([2, 2], np.array([0.5, 0.5]))
    assert _parse(d, data_dir).numb_steps == int(np.ceil(2.5 * per_epoch)) == 10


def test_ignored_keys_one_line_checkpoints_kept_and_no_curve(data_dir, tmp_path, capsys):
    d = _input(4, save_freq=1, max_ckpt_keep=2, disp_training=False, tensorboard=True, time_training=True)
    for name in ("sys_a", "sys_b"):
        shutil.copytree(data_dir / name, tmp_path / name)
    (tmp_path / "input.json").write_text(json.dumps(d))
    assert main(["train", str(tmp_path / "input.json"), "-o", str(tmp_path / "w" / "m.dp"),
                 "--workdir", str(tmp_path / "w"), "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if "ignoring" in ln] == \
        ["minidp train: ignoring training/tensorboard, training/time_training (deepmd-kit's own machinery)"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["m.dp", "model.ckpt-3.dp", "model.ckpt-3.npz",
                                                                   "model.ckpt-4.dp", "model.ckpt-4.npz"]


def test_a_restart_from_a_kept_checkpoint_is_bit_for_bit(data_dir, tmp_path):
    """AdamW, a cosine schedule with warm-up: the restart from step 2 ends where the whole run ends."""
    d = _input(4, save_freq=2, warmup_steps=1)
    d["learning_rate"] = {"type": "cosine", "start_lr": 1e-3, "stop_lr": 1e-5}
    d["optimizer"] = {"type": "AdamW", "weight_decay": 0.01}
    whole = train(_parse(d, data_dir), None, tmp_path / "a", progress=False).model
    resumed = train(_parse(d, data_dir), None, tmp_path / "b", restart=tmp_path / "a" / "model.ckpt-2",
                    progress=False).model
    for p, q in zip(whole.params(), resumed.params()):
        for k in p:
            assert np.array_equal(p[k], q[k])


# ---------------------------------------------------------------------------
# Data as deepmd-kit finds it
# ---------------------------------------------------------------------------


def test_a_folder_is_searched_for_systems(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir / "sys_a", root / "x" / "sys_a")
    shutil.copytree(data_dir / "sys_b", root / "sys_b")
    d = _input()
    d["training"]["training_data"]["systems"] = "data"
    d["training"]["validation_data"]["systems"] = "data/sys_b"
    assert [p.name for p in _parse(d, tmp_path).training.systems] == ["sys_b", "sys_a"]
    d["training"]["training_data"]["rglob_patterns"] = ["sys_a"]
    assert [p.name for p in _parse(d, tmp_path).training.systems] == ["sys_a"]
    (tmp_path / "empty").mkdir()
    d["training"]["training_data"] = {"systems": "empty"}
    with pytest.raises(ValueError, match=r"training system .*empty is not a deepmd/npy folder \(with type.raw\)"):
        _parse(d, tmp_path)


def test_systems_without_type_map_raw_and_an_input_without_type_map(data_dir, tmp_path):
    for name in ("sys_a", "sys_b"):
        shutil.copytree(data_dir / name, tmp_path / name)
    (tmp_path / "sys_a" / "type_map.raw").unlink()  # type.raw's indices are the input's type_map's
    d = _input(2)
    c = _parse(d, tmp_path)
    a, _ = load_systems(c.training.systems, c.type_map)
    ref = load_systems([data_dir / "sys_a"], ["O", "H"])[0]
    assert np.array_equal(a.atom_types, ref.atom_types) and np.array_equal(a.force, ref.force)
    del d["model"]["type_map"]  # then the systems' type_map.raw name the types
    assert _parse(d, tmp_path).type_map == ("O", "H")
    (tmp_path / "sys_b" / "type_map.raw").unlink()  # and without any, type.raw's indices as they are
    assert _parse(d, tmp_path).type_map == ("Type_0", "Type_1")
    train(_parse(d, tmp_path), None, tmp_path / "w", progress=False)


def _water_parts(dpdata):
    """4 frames of data_0; 4 more with atom 0 made an H (as many atoms, other types); 4 with 16 atoms fewer."""
    s = dpdata.LabeledSystem(str(need(WATER / "data_0")), fmt="deepmd/npy")
    altered = s.sub_system(range(4, 8)).data
    altered["atom_types"] = altered["atom_types"].copy()
    altered["atom_types"][0] = 1
    altered["atom_numbs"] = [63, 129]
    fewer = s.sub_system(range(8, 12)).pick_atom_idx(list(range(60)) + list(range(64, 180)))
    return s.sub_system(range(4)), dpdata.LabeledSystem(data=altered), fewer


def _water_input(systems, numb_steps=2):
    d = _input(numb_steps, disp_freq=1, save_freq=numb_steps)
    d["model"]["descriptor"].update(rcut=3.0, sel=[12, 24])
    d["training"]["training_data"] = {"systems": systems, "batch_size": 1}
    del d["training"]["validation_data"]
    return d


def test_mixed_and_multi_system_hdf5_training_data(tmp_path):
    dpdata = pytest.importorskip("dpdata")
    plain, altered, fewer = _water_parts(dpdata)
    dpdata.MultiSystems(plain, altered).to("deepmd/npy/mixed", str(tmp_path / "mixed"))
    dpdata.MultiSystems(plain, fewer).to("deepmd/hdf5", str(tmp_path / "multi.h5"))
    c = _parse(_water_input(["mixed", "multi.h5"]), tmp_path)
    assert [p.name for p in c.training.systems] == ["192", "O60H116", "O64H128"]
    systems = load_systems(c.training.systems, c.type_map)
    assert [s.nframes for s in systems] == [4, 4, 4, 4] and str(systems[1].path).endswith("192[kind 1]")
    # every frame is one of the parts' (found by its energy), each atom typed as there (found by position)
    frames = {float(e): (x, f, part["atom_types"]) for part in (plain, altered, fewer)
              for x, f, e in zip(part["coords"], part["forces"], part["energies"])}
    for s in systems:
        assert s.coords.shape == (s.nframes, s.atom_types.size, 3) and s.force.shape == s.coords.shape
        for coords, force, energy in zip(s.coords, s.force, s.energy):
            x, f, types = frames[float(energy)]
            atom = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in coords]
            assert np.array_equal(types[atom], s.atom_types) and np.array_equal(f[atom], force)
    train(c, None, tmp_path / "w", progress=False)


def test_other_activations_train_and_are_saved(data_dir, tmp_path):
    """gelu embedding nets, a silut fitting net: trained (their second derivatives in the force loss), saved as such."""
    from minidp.io.serialization import load_model

    d = _input(2)
    d["model"]["descriptor"]["activation_function"] = "gelu"
    d["model"]["fitting_net"]["activation_function"] = "silut:2.5"
    train(_parse(d, data_dir), tmp_path / "m.dp", tmp_path, progress=False)
    model = load_model(tmp_path / "m.dp")
    assert model.descriptor.config.activation == "gelu"
    assert {layer.activation for net in model.fitting for layer in net.layers[:-1]} == {"silut:2.5"}


def _write_lmdb(path, system, type_map):
    """deepmd-kit's LMDB layout: msgpack frames of {type, shape, data} arrays, and __metadata__."""
    lmdb, msgpack = pytest.importorskip("lmdb"), pytest.importorskip("msgpack")

    def enc(a):
        a = np.ascontiguousarray(a)
        return {"type": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}

    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i in range(system.nframes):
            frame = {"atom_types": enc(system.atom_types.astype(np.int32)), "coords": enc(system.coords[i]),
                     "cells": enc(system.cells[i]), "energies": enc(np.float64(system.energy[i])),
                     "forces": enc(system.force[i]), "virials": enc(system.virial[i].reshape(3, 3))}
            txn.put(format(i, "012d").encode(), msgpack.packb(frame))
        meta = {"nframes": system.nframes, "frame_idx_fmt": "012d", "type_map": type_map}
        txn.put(b"__metadata__", msgpack.packb(meta))


def test_an_lmdb_dataset_trains(data_dir, tmp_path):
    """deepmd-kit's LMDB datasets (examples/lmdb_downsample_data) are read whole and trained on."""
    ref = load_systems([data_dir / "sys_a"], ["O", "H"])[0]
    _write_lmdb(tmp_path / "train.lmdb", ref, ["O", "H"])
    d = _input(2)
    d["training"]["training_data"] = {"systems": "train.lmdb", "batch_size": "auto"}
    del d["training"]["validation_data"]
    del d["model"]["type_map"]  # taken from __metadata__
    c = _parse(d, tmp_path)
    assert c.type_map == ("O", "H")
    (s,) = load_systems(c.training.systems, c.type_map)
    for name in ("coords", "cells", "atom_types", "energy", "force", "virial"):
        assert np.array_equal(getattr(s, name), getattr(ref, name)), name
    train(c, None, tmp_path / "w", progress=False)


def test_set_arrays_written_as_one_row_are_read_per_frame(data_dir, tmp_path):
    """deepmd-kit reshapes each array of a set to (nframes, -1): examples/fparam's aparam.npy is (1, nf * natoms)."""
    from minidp.io.systems import lazy_system

    shutil.copytree(data_dir / "sys_a", tmp_path / "sys_a")
    for folder in sorted((tmp_path / "sys_a").glob("set.*")):
        energy = np.load(folder / "energy.npy")
        np.save(folder / "energy.npy", energy.reshape(1, -1))
        np.save(folder / "aparam.npy", np.ones((1, energy.size * 12)))
    assert lazy_system(tmp_path / "sys_a").params == (("aparam", 1),)
    ours, ref = (load_systems([p / "sys_a"], ["O", "H"])[0] for p in (tmp_path, data_dir))
    assert np.array_equal(ours.energy, ref.energy)
