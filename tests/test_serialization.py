"""Reading and writing deepmd-kit's model serialization; refusing what minidp does not support."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest

from minidp import DeepPot
from minidp.model import new_model
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import load_model, model_from_dict, read_model_dict, save_model
from tests.conftest import MODEL_DP, need


def _random_model(type_one_side=True, seed=0):
    model = new_model(["O", "H"], SeAConfig(4.0, 0.5, (10, 20), (4, 8), 2, type_one_side), (8, 8), seed=seed)
    rng = np.random.default_rng(seed)
    model.descriptor.davg[...] = rng.normal(0, 0.1, model.descriptor.davg.shape)
    model.descriptor.dstd[...] = rng.uniform(0.5, 1.5, model.descriptor.dstd.shape)
    model.bias[:] = [-90.0, -180.0]
    return model


def _frames(seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 6, size=(2, 12, 3))
    return coords, np.tile(np.eye(3) * 6.0, (2, 1, 1)), np.array([0, 1] * 6)


@pytest.mark.parametrize("suffix", [".dp", ".yaml", ".json"])
@pytest.mark.parametrize("type_one_side", [True, False])
def test_save_then_load_gives_the_same_numbers(tmp_path, suffix, type_one_side):
    model = _random_model(type_one_side)
    save_model(tmp_path / f"m{suffix}", model)
    coords, cells, types = _frames()
    a = DeepPot(model).eval(coords, cells, types, atomic=True)
    b = DeepPot(tmp_path / f"m{suffix}").eval(coords, cells, types, atomic=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_exported_model_runs_in_deepmd_kit(tmp_path):
    """minidp's .dp -> `dp convert-backend` -> .pb -> deepmd-kit's DeepPot agrees to 1e-10."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    model = _random_model(type_one_side=False, seed=4)
    save_model(tmp_path / "m.dp", model)
    r = subprocess.run(["dp", "convert-backend", str(tmp_path / "m.dp"), str(tmp_path / "m.pb")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    coords, cells, types = _frames(1)
    ref = deepmd_infer.DeepPot(str(tmp_path / "m.pb")).eval(coords, cells, types, atomic=True)
    ours = DeepPot(model).eval(coords, cells, types, atomic=True)
    for x, y in zip(ours, ref):
        assert np.abs(x - y).max() <= 1e-10


@pytest.fixture(scope="module")
def water_dict():
    return read_model_dict(need(MODEL_DP))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["descriptor"].update(type="se_e2_r"), r"descriptor type = 'se_e2_r'"),
    (lambda m: m["fitting"].update(type="dipole"), r"fitting type = 'dipole'"),
    (lambda m: m["descriptor"].update(spin={"use_spin": [True, False]}), r"spin = \{'use_spin'"),
    (lambda m: m["fitting"].update(mixed_types=True), r"mixed_types = True"),
    (lambda m: m.update(type="zbl"), r"model type = 'zbl'"),
    (lambda m: m["descriptor"]["embeddings"]["networks"][0]["layers"][0].update(activation_function="swish"),
     r"unknown activation 'swish'"),
])
def test_unsupported_models_are_refused_by_name(water_dict, edit, message):
    data = copy.deepcopy(water_dict)
    edit(data["model"])
    with pytest.raises(ValueError, match=message):
        model_from_dict(data)


def test_pb_without_deepmd_kit_names_the_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_deepmd(name, *args, **kwargs):
        if name.startswith("deepmd"):
            raise ImportError("No module named 'deepmd'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepmd)
    (tmp_path / "m.pb").write_bytes(b"x")
    with pytest.raises(ImportError, match=r"needs deepmd-kit .*dp convert-backend m.pb m.dp"):
        load_model(tmp_path / "m.pb")


def test_more_neighbours_than_sel_warns():
    model = new_model(["O", "H"], SeAConfig(4.0, 0.5, (2, 2), (4, 8), 2, True), (8, 8), seed=1)
    coords, cells, types = _frames()
    with pytest.warns(UserWarning, match=r"\d+ \(frame, atom, neighbour type\) sections have more neighbours.*sel = \[2, 2\]"):
        DeepPot(model).eval(coords, cells, types)
