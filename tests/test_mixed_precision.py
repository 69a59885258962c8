"""training/mixed_precision, deepmd-kit's meaning: the nets' products on inputs and weights rounded to float16
or bfloat16, accumulated and kept in the output precision (float32 master weights).

Checked: the rounding helpers against NumPy's float16 and PyTorch's bfloat16 casts; which layers round
(every embedding layer, the fitting nets' hidden layers, not their output layer); the four forward paths
(value, tangent, jvp, the fused dual path) rounding alike; the water model's energies and forces within
a few unit round-offs of the compute precision of the float32 model's; deepmd-kit's example input
(examples/water/se_e2_a_mixed_prec) parsed key for key; a few training steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.io.serialization import load_model
from minidp.model import predict_frames
from minidp.neighbor import build_neighbor_list
from minidp.nn import (
    dual_net,
    embedding_net,
    fitting_net,
    net_forward,
    net_jvp,
    net_tangent,
    round_to,
    round_to_bfloat16,
    with_compute,
)
from minidp.se_e2_a import SeAConfig
from minidp.training.config import MixedPrecision, parse_input
from minidp.training.loop import train
from minidp.training.loss import Batch, loss_and_grad
from tests.conftest import MODEL_DP, WATER, need, random_model
from tests.test_train import _input, data_dir  # noqa: F401  (data_dir: the module fixture, shared)

# the unit round-off of each compute precision: 2^-(mantissa bits + 1)
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}

# deepmd-kit 3.2's examples/water/se_e2_a_mixed_prec/input.json, key for key (its "_comment" keys left out)
EXAMPLE = {
    "model": {
        "type_map": ["O", "H"],
        "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.50, "rcut": 6.00, "neuron": [25, 50, 100],
                       "resnet_dt": False, "axis_neuron": 16, "type_one_side": True, "seed": 1},
        "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "seed": 1},
    },
    "learning_rate": {"type": "exp", "decay_steps": 5000, "start_lr": 0.001, "stop_lr": 3.51e-8},
    "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
             "start_pref_v": 0, "limit_pref_v": 0},
    "training": {
        "training_data": {"systems": ["../data/data_0/", "../data/data_1/", "../data/data_2/"], "batch_size": "auto"},
        "validation_data": {"systems": ["../data/data_3"], "batch_size": 1, "numb_btch": 3},
        "mixed_precision": {"compute_prec": "float16", "output_prec": "float64"},
        "numb_steps": 1000000, "seed": 10, "disp_file": "lcurve.out", "disp_freq": 100, "save_freq": 1000,
    },
}


# ---------------------------------------------------------------------------
# The rounding
# ---------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e5, 6e-8, 1e-40, 3.4e38, -3.39e38,
           1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float16_rounding_is_numpys_cast_kept_in_the_dtype(dtype):
    x = np.concatenate([np.random.default_rng(0).normal(0, 30, 1000), SPECIAL]).astype(dtype)
    y = round_to(x, "float16")
    assert y.dtype == dtype
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(dtype))
    np.testing.assert_array_equal(round_to(y, "float16"), y)  # a rounded value is its own rounding
    assert round_to(x, None) is x


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=200))
def test_bfloat16_rounding_is_torchs_cast_on_any_float32_bits(bits):
    """Every float32 bit pattern (NaNs, infinities, subnormals, ties) rounds as torch.bfloat16 does."""
    torch = pytest.importorskip("torch")
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_to_bfloat16(x), want)
    assert round_to(x, "bfloat16").dtype == np.float32


def test_bfloat16_rounding_of_float64_goes_through_float32_as_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.random.default_rng(1).normal(0, 30, 1000), SPECIAL, [1e39, -1e39]])
    y = round_to(x, "bfloat16")
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy())
    # ties to even at bit 16: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and goes to 1
    np.testing.assert_array_equal(round_to(np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]), "bfloat16"),
                                  [1.0, 1 + 2.0 ** -6])


def test_an_unknown_compute_precision_is_refused_by_name():
    with pytest.raises(ValueError, match=r"compute precision 'float8' is not supported; expected one of"):
        round_to(np.ones(2), "float8")


# ---------------------------------------------------------------------------
# The nets' compute copy
# ---------------------------------------------------------------------------


def test_with_compute_rounds_every_layer_but_the_fitting_nets_output_layer():
    net = fitting_net(6, (8, 8), 1, resnet_dt=True, dtype=np.float32, seed=2)
    half = with_compute(net, "float16", last=False)
    assert half.layers[-1] is net.layers[-1]
    for layer, master in zip(half.layers[:-1], net.layers[:-1]):
        assert layer.compute == "float16" and master.compute is None
        for key, p in layer.params().items():
            assert p.dtype == np.float32
            np.testing.assert_array_equal(p, p.astype(np.float16))  # representable in float16
            assert not np.array_equal(p, master.params()[key])  # and the master copy is not rounded
    assert all(layer.compute == "bfloat16" for layer in with_compute(net, "bfloat16").layers)


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_every_forward_path_rounds_alike(compute):
    """net_forward, net_jvp, net_tangent and the fused dual path (tanh) give the same rounded values."""
    rng = np.random.default_rng(3)
    for master, last in ((embedding_net((4, 8, 8), 1, resnet_dt=True, dtype=np.float32, seed=1), True),
                         (fitting_net(5, (8, 8), 1, dtype=np.float32, seed=1), False)):
        net = with_compute(master, compute, last)
        # (nb, n_in) each
        x = rng.normal(0, 1, (50, net.n_in)).astype(np.float32)
        tx = rng.normal(0, 1, x.shape).astype(np.float32)
        y, caches = net_forward(net, x)
        yj, tyj, _ = net_jvp(net, x, tx)
        ty, _ = net_tangent(net, caches, tx)
        Y2, _ = dual_net(net, np.stack([x, tx]))
        for a, b in ((y, yj), (ty, tyj), (Y2[0], y), (Y2[1], ty)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        # the rounding is there: the master net's values differ
        assert np.abs(y - net_forward(master, x)[0]).max() > 0


def _water(nframes: int = 2):
    system = need(WATER / "data_3")
    coords = np.load(system / "set.000" / "coord.npy")[:nframes].reshape(nframes, -1, 3).astype(np.float64)
    cells = np.load(system / "set.000" / "box.npy")[:nframes].reshape(nframes, 3, 3).astype(np.float64)
    return coords, cells, np.loadtxt(system / "type.raw", dtype=int)


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_water_model_in_mixed_precision_stays_within_the_compute_round_off(compute):
    """The water model (float32 master weights) on two water frames: its energies and forces with the
    products rounded to ``compute`` are those of the float32 model to a few unit round-offs u of the
    compute precision: forces within 20 u of their RMS (measured: ~10 u, float16 and bfloat16 alike),
    energies within 2 u eV per atom (measured 0.3 u and 0.45 u)."""
    m32 = load_model(need(MODEL_DP)).astype(np.float32)
    coords, cells, types = _water()
    cfg = m32.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    ref = predict_frames(nl.rij, nl.nlist, types, m32)
    got = predict_frames(nl.rij, nl.nlist, types, m32.with_compute(compute))
    u, natoms = UNIT[compute], types.size
    assert np.abs(got.energy - ref.energy).max() / natoms < 2 * u
    f_rms = np.sqrt(np.mean(ref.force ** 2))
    assert np.sqrt(np.mean((got.force - ref.force) ** 2)) < 20 * u * f_rms
    assert np.abs(got.force - ref.force).max() > 0


def test_gradients_of_the_compute_copy_are_the_float32_ones_to_its_round_off():
    """Straight through: the compute copy's gradients, in the master weights' layout and float32, are the
    float32 model's to float16 round-off (each net's gradient within 30 u relative, Frobenius norms)."""
    m32 = random_model(SeAConfig(4.0, 1.0, (16, 16), (4, 8), 3, False, resnet_dt=True), 3,
                       fitting_neuron=(8, 8)).astype(np.float32)
    rng = np.random.default_rng(3)
    coords, cells, types = rng.uniform(0, 5.0, (1, 10, 3)), np.eye(3)[None] * 5.0, np.array([0, 1] * 5)
    nl = build_neighbor_list(coords, cells, types, 4.0, [16, 16])
    batch = Batch(nl.rij, nl.nlist, types, np.array([3.0]), np.ones(coords.shape), None)
    _, g16, _ = loss_and_grad(m32.with_compute("float16"), batch, (0.5, 2.0, 0.0))
    _, g32, _ = loss_and_grad(m32, batch, (0.5, 2.0, 0.0))
    assert [sorted(a) for a in g16] == [sorted(p) for p in m32.params()]
    for a, b in zip(g16, g32):
        for key in b:
            assert a[key].dtype == np.float32
            assert np.linalg.norm(a[key] - b[key]) <= 30 * UNIT["float16"] * np.linalg.norm(b[key])


# ---------------------------------------------------------------------------
# The input, and training
# ---------------------------------------------------------------------------


def test_deepmd_kits_mixed_precision_example_is_read_key_for_key(tmp_path):
    """examples/water/se_e2_a_mixed_prec/input.json, its systems ../data/data_* found next to it: float16
    products, the nets in float64 (output_prec overrides the sections' precision, as deepmd-kit's TF backend;
    deepmd-kit 3.2's TF trainer itself refuses output_prec float64, minidp runs it)."""
    need(WATER / "data_0")
    (tmp_path / "data").symlink_to(WATER.resolve(), target_is_directory=True)
    (tmp_path / "example").mkdir()
    c = parse_input(json.loads(json.dumps(EXAMPLE)), tmp_path / "example")
    assert c.mixed_precision == MixedPrecision("float16", "float64")
    assert c.precision == ("float64", "float64")
    assert c.descriptor.sel == (46, 92) and c.fitting_neuron == (240, 240, 240) and c.numb_steps == 1000000
    assert [p.resolve() for p in c.training.systems] == [(WATER / f"data_{i}").resolve() for i in range(3)]
    # output_prec's default is float32, and it wins over the sections' precision
    d = json.loads(json.dumps(EXAMPLE))
    d["training"]["mixed_precision"] = {"compute_prec": "bfloat16"}
    d["model"]["descriptor"]["precision"] = "float64"
    c = parse_input(d, tmp_path / "example")
    assert c.mixed_precision == MixedPrecision("bfloat16", "float32") and c.precision == ("float32", "float32")


@pytest.mark.parametrize("section, message", [
    ({}, r"input: training/mixed_precision/compute_prec is required"),
    ({"compute_prec": "float32"}, r"compute_prec = 'float32' is not supported; expected one of \['float16', 'bfloat16'\]"),
    ({"compute_prec": "float16", "output_prec": "float16"},
     r"output_prec = 'float16' is not supported; expected one of \['float32', 'float64'\]"),
    ({"compute_prec": 16}, r"compute_prec: expected a non-empty string, got int 16"),
    ({"compute_prec": "float16", "loss_scale": 2}, r"unsupported key\(s\) \['loss_scale'\] in training/mixed_precision"),
    (None, r"input: training/mixed_precision must be a section"),
])
def test_bad_mixed_precision_is_refused_by_name(section, message):
    d = _input()
    d["training"]["mixed_precision"] = section
    with pytest.raises(ValueError, match=message):
        parse_input(d)


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_a_few_mixed_precision_steps_train_the_float32_master_weights(data_dir, tmp_path, compute):  # noqa: F811
    d = _input(numb_steps=3, mixed_precision={"compute_prec": compute})
    result = train(parse_input(d, data_dir), output=tmp_path / "model.dp", workdir=tmp_path, progress=False)
    assert all(np.isfinite(v.loss) for v in result.last.values())
    model = load_model(tmp_path / "model.dp")
    weights = [p for layer in model.params() for p in layer.values()]
    assert {w.dtype for w in weights} == {np.dtype(np.float32)}
    # the updates went to the master weights: they are not all representable in the compute precision
    assert any(not np.array_equal(w, round_to(w, compute)) for w in weights)
