"""Float32 models (deepmd-kit's ``precision: float32``): where they compute in float32, and how close they stay.

The nets, G, dG/ds, T, D, the fitting nets and their backward run in float32; the positions, the
environment matrix and its backward, the forces' and virials' scatter, the bias, the energy sums and the
loss stay float64, as in deepmd-kit's TensorFlow backend. Checked: the dtypes along the way; energies,
forces and virials against deepmd-kit TF on the same float32 model, within deepmd-kit's own float32
spread (its float32 graph against its float64 graph of the same weights); training gradients against
float64 ones of the same weights, to float32 round-off.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from minidp import DeepPot
from minidp.training.loss import Batch, loss_and_grad
from minidp.model import model_forward, new_model, predict_frames
from minidp.neighbor import build_neighbor_list
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import load_model, save_model
from tests.conftest import MODEL_DP, WATER, need, random_model

F32 = np.dtype(np.float32)


def _small(seed: int = 3):
    """A small two-type model in float32, the same weights in float64, and a frame of 10 atoms."""
    m32 = random_model(SeAConfig(4.0, 1.0, (16, 16), (4, 8), 3, False, resnet_dt=True), seed,
                       fitting_neuron=(8, 8)).astype(np.float32)
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 5.0, (1, 10, 3))
    cells = np.eye(3)[None] * 5.0
    types = np.array([0, 1] * 5)
    return m32, m32.astype(np.float64), coords, cells, types


def test_astype_casts_the_nets_only():
    m32, m64, *_ = _small()
    assert {p.dtype for d in m32.params() for p in d.values()} == {F32}
    assert m32.descriptor.dtype == F32 and m64.descriptor.dtype == np.float64
    assert m32.descriptor.davg.dtype == m32.descriptor.dstd.dtype == m32.bias.dtype == np.float64


def test_float32_model_computes_in_float32_and_returns_float64():
    m32, m64, coords, cells, types = _small()
    cfg = m32.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    E, cache = model_forward(nl.rij, nl.nlist, types, m32, keep=True)
    assert cache.D.dtype == cache.descriptor_cache.T.dtype == F32
    assert all(pc.G.dtype == pc.dG_ds.dtype == pc.rows.R_real.dtype == F32 for pc in cache.descriptor_cache.pieces)
    assert cache.descriptor_cache.R.dtype == E.dtype == np.float64
    p32, p64 = predict_frames(nl.rij, nl.nlist, types, m32), predict_frames(nl.rij, nl.nlist, types, m64)
    assert all(x.dtype == np.float64 for x in p32)
    # float32 round-off of terms of size ~1 (energies of a few eV, forces ~1)
    for a, b in zip(p32, p64):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _water_batch(model, offset: float):
    """One water frame with labels moved away from the model's prediction (by ``offset`` eV and random
    forces): the loss's cotangents are then not small differences of float32 numbers."""
    system = need(WATER / "data_3")
    coords = np.load(system / "set.000" / "coord.npy")[:1].reshape(1, -1, 3).astype(np.float64)
    cells = np.load(system / "set.000" / "box.npy")[:1].reshape(1, 3, 3).astype(np.float64)
    types = np.loadtxt(system / "type.raw", dtype=int)
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    rng = np.random.default_rng(0)
    energy = np.load(system / "set.000" / "energy.npy")[:1] + offset
    return Batch(nl.rij, nl.nlist, types, energy, rng.normal(0, 1, coords.shape), rng.normal(0, 1, (1, 9)))


@pytest.mark.parametrize("workers", [1, 2])
def test_float32_training_gradients_agree_with_float64_to_round_off(workers):
    """Every gradient of the water model in float32 against the float64 gradient of the same weights:
    float32 throughout (the gradients too, for float32 Adam), within 3e-5 relative (~250 float32
    roundings: sums over 17,000 rows; measured up to 6e-6)."""
    m32 = load_model(need(MODEL_DP)).astype(np.float32)
    m64 = m32.astype(np.float64)
    batch = _water_batch(m64, 50.0)
    pref = (0.02, 1000.0, 0.5)
    v32, g32, pred32 = loss_and_grad(m32, batch, pref, workers=workers)
    v64, g64, pred64 = loss_and_grad(m64, batch, pref, workers=workers)
    assert v32.loss == pytest.approx(v64.loss, rel=1e-6)
    assert all(x.dtype == np.float64 for x in pred32)
    for a, b in zip(g32, g64):
        assert a.keys() == b.keys()
        for k in b:
            assert a[k].dtype == F32
            assert np.linalg.norm(a[k] - b[k]) <= 3e-5 * np.linalg.norm(b[k]), k


# The deepmd-kit side, in a process of its own (TensorFlow): both .dp files to .pb, each evaluated.
_DEEPMD = """
import sys
import numpy as np
from deepmd.entrypoints.convert_backend import convert_backend
from deepmd.infer import DeepPot
folder = sys.argv[1]
frames = np.load(folder + "/frames.npz")
out = {}
for name in ("m32", "m64"):
    convert_backend(INPUT=f"{folder}/{name}.dp", OUTPUT=f"{folder}/{name}.pb")
    e, f, v = DeepPot(f"{folder}/{name}.pb").eval(frames["coords"], frames["cells"], frames["types"])
    out.update({f"{name}_e": e, f"{name}_f": f, f"{name}_v": v})
np.savez(folder + "/tf.npz", **out)
"""


@pytest.mark.slow
def test_float32_model_agrees_with_deepmd_kit_tf_within_its_own_spread(water_frames, tmp_path):
    """minidp on the float32 water model against deepmd-kit TF on the same .dp converted to .pb: each of
    energy, forces and virial within twice TF's own float32 error (its float32 graph against its
    float64 graph of the same weights, measured 3e-5 eV, 3e-6 eV/A, 5e-5 eV). The float64 conversion
    of the same weights agrees with minidp's float64 to 1e-10."""
    pytest.importorskip("deepmd.infer")
    coords, cells, types = water_frames
    m32 = load_model(need(MODEL_DP)).astype(np.float32)
    save_model(tmp_path / "m32.dp", m32)
    save_model(tmp_path / "m64.dp", m32.astype(np.float64))
    np.savez(tmp_path / "frames.npz", coords=coords.astype(np.float64), cells=cells.astype(np.float64), types=types)
    r = subprocess.run([sys.executable, "-c", _DEEPMD, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    tf = np.load(tmp_path / "tf.npz")
    ours32 = DeepPot(m32).eval(coords, cells, types)
    ours64 = DeepPot(m32.astype(np.float64)).eval(coords, cells, types)
    for k, q in enumerate("efv"):
        spread = np.abs(tf[f"m32_{q}"] - tf[f"m64_{q}"]).max()
        assert 0 < spread < 1e-3, q
        assert np.abs(ours32[k] - tf[f"m32_{q}"]).max() <= 2 * spread, q
        assert np.abs(ours64[k] - tf[f"m64_{q}"]).max() <= 1e-10, q


@pytest.mark.parametrize("dtype, fitting_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_mixed_precisions_train_each_net_in_its_own(dtype, fitting_dtype):
    """deepmd-kit sets the descriptor's and the fitting net's precision apart: each net computes and gets its
    gradient in its own, and the gradients agree with an all-float64 model of the same weights."""
    cfg = SeAConfig(4.0, 1.0, (16, 16), (4, 8), 3, True, resnet_dt=True)
    mixed = new_model(["A", "B"], cfg, (8, 8), seed=5, dtype=dtype, fitting_dtype=fitting_dtype)
    assert mixed.descriptor.dtype == dtype and mixed.fitting[0].dtype == fitting_dtype
    ref = mixed.astype(np.float64)
    _, _, coords, cells, types = _small()
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    batch = Batch(nl.rij, nl.nlist, types, np.array([3.0]), np.ones(coords.shape), None)
    _, g, pred = loss_and_grad(mixed, batch, (0.5, 2.0, 0.0))
    _, g64, pred64 = loss_and_grad(ref, batch, (0.5, 2.0, 0.0))
    for name, net in mixed.named_nets():
        assert net.dtype == (dtype if name[0] == "embedding" else fitting_dtype)
    layers = [(net.dtype, p) for _, net in mixed.named_nets() for p in net.params()]
    for (want, _), a, b in zip(layers, g, g64):
        for key in b:
            assert a[key].dtype == want
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4 * np.abs(b[key]).max())
    for a, b in zip(pred, pred64):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
