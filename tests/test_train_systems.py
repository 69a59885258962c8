"""Training on several systems: sampling probabilities and batch sizes as deepmd-kit's, sel "auto", --init-model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from minidp import DeepPot
from minidp.model import new_model
from minidp.io.serialization import load_model, read_min_nbor_dist
from minidp.training.sampling import Sampler, batch_sizes, load_systems, numb_batches, system_probs
from minidp.training.loop import init_from_model, train
from minidp.training.config import parse_input
from tests.test_train import SMALL, _input, _water_frames


@pytest.fixture(scope="module")
def systems_dir(tmp_path_factory):
    """A 4-molecule water box over two set.* folders, a second box, and an open 2-molecule cluster (another size)."""
    import dpdata

    root = tmp_path_factory.mktemp("systems")
    teacher = new_model(["O", "H"], SMALL, (8, 8), seed=11)
    rng = np.random.default_rng(0)
    for name, nframes, set_size, nmol, pbc in (("box_a", 7, 4, 4, True), ("box_b", 3, 10, 4, True),
                                               ("cluster", 5, 10, 2, False)):
        types = np.array([0] * nmol + [1] * 2 * nmol)
        coords = _water_frames(rng, nframes, nmol)
        cells = np.tile(np.eye(3) * 6.0, (nframes, 1, 1))
        e, f, v = DeepPot(teacher).eval(coords, cells if pbc else None, types)
        data = {"atom_names": ["O", "H"], "atom_numbs": [nmol, 2 * nmol], "atom_types": types, "orig": np.zeros(3),
                "cells": cells, "coords": coords, "energies": e.ravel(), "forces": f,
                "virials": v.reshape(nframes, 3, 3), "nopbc": not pbc}
        dpdata.LabeledSystem(data=data).to("deepmd/npy", str(root / name), set_size=set_size)
    return root


@pytest.mark.parametrize("sys_probs, auto_prob", [
    (None, "prob_uniform"), (None, "prob_sys_size"), (None, "prob_sys_size;0:1:0.3;1:4:0.7"),
    (None, "prob_sys_size;0:2:1;2:4:3"), ([0.5, -1, 0.2, -1], None), ([0.1, 0.2, 0.3, 0.4], None)])
def test_probabilities_are_deepmd_kits(sys_probs, auto_prob):
    """The same numbers as deepmd-kit's DeepmdDataSystem.set_sys_probs for the same batches and input."""
    pytest.importorskip("deepmd")
    from deepmd.utils.data_system import DeepmdDataSystem

    nbatches = [7, 3, 12, 1]
    theirs = SimpleNamespace(nsystems=4, nbatches=nbatches, get_nsystems=lambda: 4)
    DeepmdDataSystem.set_sys_probs(theirs, sys_probs, auto_prob or "prob_sys_size")
    ours = system_probs(nbatches, sys_probs, auto_prob or "prob_sys_size")
    np.testing.assert_allclose(ours, theirs.sys_probs, rtol=1e-15, atol=1e-15)


def test_batch_sizes_and_batches_are_deepmd_kits():
    pytest.importorskip("deepmd")
    from deepmd.utils.data_system import DeepmdDataSystem

    natoms = [12, 6, 192, 33]
    for rule in (1, 32, 64, 100):
        fake = SimpleNamespace(data_systems=[SimpleNamespace(get_natoms=lambda n=n: n) for n in natoms])
        assert batch_sizes(f"auto:{rule}", natoms) == DeepmdDataSystem._make_auto_bs(fake, rule)
    assert batch_sizes("auto", natoms) == batch_sizes("auto:32", natoms)
    assert batch_sizes((1, 2, 3, 4), natoms) == [1, 2, 3, 4]
    assert numb_batches([4, 3], 2) == 3 and numb_batches([1], 5) == 1  # floor per set, at least 1 each


def test_bad_probabilities_are_named():
    with pytest.raises(ValueError, match="auto_prob 'prob_size': expected prob_uniform, prob_sys_size or"):
        system_probs([1, 2], None, "prob_size")
    with pytest.raises(ValueError, match=r"sys_probs \[0.7, 0.6\] sum to more than 1"):
        system_probs([1, 2], [0.7, 0.6])
    with pytest.raises(ValueError, match="block '0:1' is not start:end:weight"):
        system_probs([1, 2], None, "prob_sys_size;0:1")


@pytest.mark.parametrize("auto_prob, message", [
    ("prob_sys_size;0:0:1", "block '0:0:1' is empty; expected 0 <= start < end <= 3"),
    ("prob_sys_size;2:1:1", "block '2:1:1' is empty"),
    ("prob_sys_size;0:4:1", "block '0:4:1' runs outside the systems 0..2"),
    ("prob_sys_size;-1:2:1", "block '-1:2:1' runs outside the systems 0..2"),
    ("prob_sys_size;0:2:1;1:3:1", "blocks 0:2 and 1:3 overlap"),
    ("prob_sys_size;0:x:1", "block '0:x:1' is not start:end:weight"),
    ("prob_sys_size;0:1.5:1", "block '0:1.5:1' is not start:end:weight"),
    ("prob_sys_size;0:1:1;", "block '' is not start:end:weight"),
    ("prob_sys_size;0:1:-0.5", "block '0:1:-0.5': weight: -0.5 is below 0.0"),
    ("prob_sys_size;0:1:inf", "block '0:1:inf': weight: inf is not finite"),
    ("prob_sys_size;0:1:0;1:3:0", "every block has weight 0"),
    ("prob_sys_sizes", "expected prob_uniform, prob_sys_size or prob_sys_size;start:end:weight"),
])
def test_malformed_auto_prob_is_refused_with_the_input(auto_prob, message, tmp_path, capsys):
    """'prob_sys_size;0:0:1' was a numpy error after every system was read: now refused by the input's
    check, naming auto_prob, before any data is read (the systems named do not even exist)."""
    import json

    from minidp.cli import main

    d = _input(numb_steps=2)
    d["training"]["training_data"] = {"systems": ["none_a", "none_b", "none_c"], "auto_prob": auto_prob}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(d))
    assert main(["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "w"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minidp train: error: input: training/training_data/auto_prob "
                                               f"{auto_prob!r}: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.json"]


def test_auto_prob_blocks_leave_out_the_systems_they_do_not_name():
    """deepmd-kit's rule: systems in no block are never drawn; each block shares its weight by batches."""
    np.testing.assert_allclose(system_probs([2, 1, 5], None, "prob_sys_size;0:2:3;2:3:0"), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(system_probs([2, 1, 5], None, "prob_sys_size;1:3:1"), [0, 1 / 6, 5 / 6])


def test_sampler_uses_set_batches(systems_dir):
    """box_a: 7 frames in sets of 4 + 3; batch 2: 2 + 1 batches; box_b 3 // 2 = 1; cluster (6 atoms) 5 // 6 -> 1."""
    systems = load_systems([systems_dir / n for n in ("box_a", "box_b", "cluster")], ["O", "H"])
    s = Sampler(systems, (2, 2, 6), seed=0)
    np.testing.assert_allclose(s.prob, [3 / 5, 1 / 5, 1 / 5])
    drawn = np.bincount([s.next()[0] for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(drawn, s.prob, atol=0.03)


def test_train_many_systems_auto_sel_and_init_model(systems_dir, tmp_path):
    """Three systems of two sizes, sys_probs, a batch_size list, sel "auto:1.2"; then --init-model from the result."""
    from minidp.active.neighbor_stat import auto_sel, neighbor_stat

    d = _input(numb_steps=2)
    d["model"]["descriptor"]["sel"] = "auto:1.2"
    d["training"]["training_data"] = {"systems": ["box_a", "box_b", "cluster"], "batch_size": [2, 1, 1],
                                      "sys_probs": [0.5, -1, 0.25]}
    d["training"]["validation_data"] = {"systems": ["cluster"], "batch_size": 1}
    config = parse_input(d, systems_dir)
    stat = neighbor_stat([systems_dir / n for n in ("box_a", "box_b", "cluster")], SMALL.rcut, ["O", "H"])
    assert list(config.descriptor.sel) == auto_sel("auto:1.2", stat.max_nbor_size)
    result = train(config, tmp_path / "m.dp", tmp_path / "run", progress=False)
    assert abs(read_min_nbor_dist(tmp_path / "m.dp") - stat.min_nbor_dist) < 1e-12
    first = load_model(tmp_path / "m.dp")
    start = init_from_model(tmp_path / "m.dp", config)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(start.params(), result.model.params()) for k in a)
    np.testing.assert_array_equal(start.bias, result.model.bias)
    again = train(config, None, tmp_path / "run2", progress=False, init_model=tmp_path / "m.dp")
    assert np.isfinite(again.last["trn"].rmse_f)
    with pytest.raises(ValueError, match="--init-model .* is a model of another shape"):
        d2 = _input(numb_steps=1)
        d2["training"]["training_data"]["systems"] = ["box_a"]
        d2["training"]["validation_data"]["systems"] = ["box_b"]
        train(parse_input(d2, systems_dir), None, tmp_path / "run3", progress=False, init_model=tmp_path / "m.dp")
    assert first.type_map == ["O", "H"]
