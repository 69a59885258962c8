"""Old deepmd-kit TensorFlow graphs (no training script), read by minidp.io.legacy_graph.

The graphs are written here with TensorFlow from small random minidp models, named and wired as deepmd-kit
1.x/2.x froze them (constants read through Identity nodes, x W + b feeding the activation op, the
environment-matrix op carrying rcut/sel as attributes), then read back: the model must evaluate as the
original did. Refusals: a missing node is named, other models are named. deepmd-kit's own fixtures are
used when DEEPMD_INFER_DIR names a folder holding them (deeppot.pbtxt, deeppot-1.pbtxt, sea_012.pbtxt).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minidp import DeepPot
from minidp.checks import InputError
from minidp.io import legacy_graph
from minidp.model import EnergyModel, new_model
from minidp.io.model_check import check_model_dict
from minidp.nn import Layer, residual_kind
from minidp.se_e2_a import SeAConfig, env_matrix
from minidp.io.serialization import model_from_dict
from minidp.training.loop import init_from_model

# activations as a TF graph spells them
TF_ACTIVATIONS = {"tanh": lambda tf: tf.tanh, "relu": lambda tf: tf.nn.relu, "softplus": lambda tf: tf.nn.softplus,
                  "gelu": lambda tf: lambda z: tf.nn.gelu(z, approximate=True)}


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _model(type_one_side=True, activation="tanh", dtype=np.float64, rcut_smth=0.5, seed=0) -> EnergyModel:
    """A small random model TensorFlow's graphs can express: embedding widths 1 -> 2 -> 4 -> 4 ([x, x], [x, x],
    x residuals, idt on them), fitting 12 -> 6 -> 6 (the second layer residual with idt) -> 1."""
    cfg = SeAConfig(4.0, rcut_smth, (12, 16), (2, 4, 4), 3, type_one_side, activation, resnet_dt=True)
    model = new_model(["O", "H"], cfg, (6, 6), seed=seed, dtype=dtype)
    hidden = [layer for _, net in model.descriptor.nets.items() for layer in net.layers]
    for layer in hidden + [layer for net in model.fitting for layer in net.layers[:-1]]:
        layer.activation = activation
    rng = np.random.default_rng(seed)
    model.descriptor.davg[...] = rng.normal(0, 0.1, model.descriptor.davg.shape)
    model.descriptor.dstd[...] = rng.uniform(0.5, 1.5, model.descriptor.dstd.shape)
    model.bias[:] = [-90.0, -180.0]
    return model


def _read(tf, name, value):
    """A frozen variable: the constant, read through an Identity node."""
    return tf.identity(tf.constant(value, name=name), name=name + "/read")


def _layer(tf, x, layer, names, activation):
    """x W + b, the activation, idt, the residual, as deepmd-kit's TF nets build them."""
    matrix, bias, idt = names
    z = tf.add(tf.matmul(x, _read(tf, matrix, layer.W)), _read(tf, bias, layer.b))
    y = activation(z) if layer.activation not in ("linear", "none") else z
    if layer.idt is not None:
        y = y * _read(tf, idt, layer.idt)
    kind = residual_kind(layer.n_in, layer.n_out, layer.resnet)
    return y + x if kind == "same" else y + tf.concat([x, x], 1) if kind == "double" else y


def old_graph(tf, model: EnergyModel, fold_bias: bool = True):
    """The GraphDef deepmd-kit 2.1 would have frozen for ``model`` (without the force/virial gradients).

    fold_bias: the per-type energy bias in final_layer_type_t/bias, as old graphs keep it; else in
    fitting_attr/t_bias_atom_e."""
    se, cfg, nt = model.descriptor, model.descriptor.config, model.ntypes
    dtype = tf.as_dtype(se.davg.dtype)
    act = TF_ACTIVATIONS[cfg.activation](tf)
    graph = tf.Graph()
    with graph.as_default():
        for name, kind in (("t_coord", dtype), ("t_type", tf.int32), ("t_natoms", tf.int32), ("t_box", dtype),
                           ("t_mesh", tf.int32)):
            tf.compat.v1.placeholder(kind, name=name)
        for name, value in (("descrpt_attr/t_avg", se.davg), ("descrpt_attr/t_std", se.dstd)):
            tf.constant(value.reshape(nt, -1), name=name)
        tf.constant(cfg.rcut, tf.float64, name="descrpt_attr/rcut")
        tf.constant(nt, tf.int32, name="descrpt_attr/ntypes")
        for name, value in (("model_attr/tmap", " ".join(model.type_map)), ("model_attr/model_type", "ener"),
                            ("model_attr/model_version", "1.1")):
            tf.constant(value, name=name)
        for key, net in se.nets.items():
            scope, tj = ("filter_type_all" if len(key) == 1 else f"filter_type_{key[0]}"), key[-1]
            x = tf.compat.v1.placeholder(tf.as_dtype(net.dtype), [None, 1], name=f"{scope}/s_{tj}")
            for n, layer in enumerate(net.layers, 1):
                x = _layer(tf, x, layer, [f"{scope}/{v}_{n}_{tj}" for v in ("matrix", "bias", "idt")], act)
        for t, net in enumerate(model.fitting):
            x = tf.compat.v1.placeholder(tf.as_dtype(net.dtype), [None, cfg.dim_out], name=f"descriptor_type_{t}")
            *hidden, final = net.layers
            for k, layer in enumerate(hidden):
                x = _layer(tf, x, layer, [f"layer_{k}_type_{t}/{v}" for v in ("matrix", "bias", "idt")], act)
            bias = final.b + (model.bias[t] if fold_bias else 0)
            final = Layer(final.W, bias.astype(final.b.dtype), None, "linear", False)
            tf.reshape(_layer(tf, x, final, [f"final_layer_type_{t}/{v}" for v in ("matrix", "bias", "")], act),
                       [-1], name=f"atom_energy_type_{t}")
        if not fold_bias:
            tf.constant(model.bias, name="fitting_attr/t_bias_atom_e")
    graph_def = graph.as_graph_def()
    env = graph_def.node.add(name="ProdEnvMatA", op="ProdEnvMatA")
    env.input.extend(["t_coord", "t_type", "t_natoms", "t_box", "t_mesh", "descrpt_attr/t_avg",
                      "descrpt_attr/t_std"])
    env.attr["T"].type = dtype.as_datatype_enum
    for name, value in (("rcut_a", -1.0), ("rcut_r", cfg.rcut), ("rcut_r_smth", cfg.rcut_smth)):
        env.attr[name].f = value  # a float32 attribute
    env.attr["sel_a"].list.i.extend(cfg.sel)
    env.attr["sel_r"].list.i.extend([0] * nt)
    return graph_def


def _write(graph_def, path: Path) -> Path:
    path.write_bytes(graph_def.SerializeToString())
    return path


def _evaluations(model):
    """Energies, forces, virials, atomic energies and virials of two periodic frames and one open one."""
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 6, size=(2, 10, 3))
    types = np.array([0, 1] * 5)
    pot = DeepPot(model)
    return pot.eval(coords, np.tile(np.eye(3) * 6.0, (2, 1, 1)), types, atomic=True) + \
        pot.eval(coords[:1], None, types, atomic=True)


def _model_from_graph(tf, graph_def, tmp_path, name="old.pb") -> EnergyModel:
    data = legacy_graph.read_legacy_graph(_write(graph_def, tmp_path / name))
    check_model_dict(data, name)
    return model_from_dict(data)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("fold_bias", [True, False])
def test_old_graph_evaluates_as_the_model_it_was_written_from(tf, tmp_path, type_one_side, fold_bias):
    model = _model(type_one_side)
    read = _model_from_graph(tf, old_graph(tf, model, fold_bias), tmp_path)
    cfg = read.descriptor.config
    assert (cfg.rcut, cfg.rcut_smth, cfg.sel, cfg.neuron, cfg.axis_neuron, cfg.type_one_side, cfg.resnet_dt) == \
        (4.0, 0.5, (12, 16), (2, 4, 4), 3, type_one_side, True)
    assert read.type_map == ["O", "H"]
    np.testing.assert_array_equal(read.bias, [0.0, 0.0] if fold_bias else model.bias)
    for ours, theirs in zip(_evaluations(read), _evaluations(model)):
        # folding the bias into the final layer's moves round-off only
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * max(1.0, np.abs(theirs).max()))


@pytest.mark.parametrize("activation", ["relu", "softplus", "gelu"])
def test_activation_is_read_from_the_op_that_follows_each_layer(tf, tmp_path, activation):
    model = _model(activation=activation, seed=2)
    read = _model_from_graph(tf, old_graph(tf, model, fold_bias=False), tmp_path)
    # tf.nn.gelu(approximate=True) is several ops: deepmd-kit calls it gelu_tf, the same function as gelu
    expected = "gelu_tf" if activation == "gelu" else activation
    assert {layer.activation for net in read.nets() for layer in net.layers[:-1]} == {expected}
    for ours, theirs in zip(_evaluations(read), _evaluations(model)):
        np.testing.assert_array_equal(ours, theirs)


def test_float32_graph_reads_as_a_float32_model(tf, tmp_path):
    model = _model(dtype=np.float32, seed=3)
    model.bias[:] = model.bias.astype(np.float32)
    read = _model_from_graph(tf, old_graph(tf, model, fold_bias=False), tmp_path)
    # the nets in float32, davg/dstd and the environment matrix in float64, as deepmd-kit's TF float32 graphs
    assert read.fitting[0].dtype == np.float32 and read.descriptor.davg.dtype == np.float64
    for ours, theirs in zip(_evaluations(read), _evaluations(model)):
        np.testing.assert_array_equal(ours, theirs)


def test_cutoffs_are_the_ops_float32_attributes(tf, tmp_path):
    """TensorFlow computes with the op's float32 rcut_smth: 0.3 is 0.30000001192092896 there."""
    data = legacy_graph.read_legacy_graph(_write(old_graph(tf, _model(rcut_smth=0.3)), tmp_path / "m.pb"))
    assert data["model"]["descriptor"]["rcut_smth"] == float(np.float32(0.3)) != 0.3


def test_text_graph_reads_as_the_binary_one(tf, tmp_path):
    from google.protobuf import text_format

    graph_def = old_graph(tf, _model())
    (tmp_path / "m.pbtxt").write_text(text_format.MessageToString(graph_def))
    a = model_from_dict(legacy_graph.read_legacy_graph(tmp_path / "m.pbtxt"))
    b = model_from_dict(legacy_graph.read_legacy_graph(_write(graph_def, tmp_path / "m.pb")))
    for ours, theirs in zip(_evaluations(a), _evaluations(b)):
        np.testing.assert_array_equal(ours, theirs)


def test_load_model_reads_an_old_pb_through_the_serialization_hook(tf, tmp_path):
    """minidp.io.serialization hands a .pb without train_attr/training_script to the reader (needs deepmd-kit,
    whose graph loader registers ProdEnvMatA)."""
    pytest.importorskip("deepmd.tf.utils.graph")
    model = _model(type_one_side=False, seed=4)
    path = _write(old_graph(tf, model), tmp_path / "old.pb")
    for ours, theirs in zip(_evaluations(DeepPot(path).model), _evaluations(model)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * max(1.0, np.abs(theirs).max()))
    graph_def = old_graph(tf, model)
    _node(graph_def, "model_attr/model_type").attr["value"].tensor.string_val[0] = b"dipole"
    with pytest.raises(InputError, match=r"^\S*old-dipole.pb: a 'dipole' model \(model_attr/model_type\)"):
        DeepPot(_write(graph_def, tmp_path / "old-dipole.pb"))


# ---------------------------------------------------------------------------
# Refusals: one line, naming what is missing or what the model is
# ---------------------------------------------------------------------------


def _node(graph_def, name):
    return next(n for n in graph_def.node if n.name == name)


def _drop(name):
    def mutate(graph_def):
        graph_def.node.remove(_node(graph_def, name))
    return mutate


def _copy(source, name, op=None):
    def mutate(graph_def):
        node = graph_def.node.add()
        node.CopyFrom(_node(graph_def, source))
        node.name = name
        node.op = op or node.op
    return mutate


def _set_op(name, op):
    def mutate(graph_def):
        _node(graph_def, name).op = op
    return mutate


def _second_use_of(bias):
    """The net evaluated a second time (as for atom_ener): another x W + b on the same bias."""
    def mutate(graph_def):
        add = next(n for n in graph_def.node if f"{bias}/read" in n.input)
        _copy(add.name, add.name + "_again")(graph_def)
    return mutate


def _model_type(value):
    def mutate(graph_def):
        _node(graph_def, "model_attr/model_type").attr["value"].tensor.string_val[0] = value.encode()
    return mutate


REFUSALS = [
    ("missing davg", _drop("descrpt_attr/t_avg"), r"node descrpt_attr/t_avg \(davg\) is missing"),
    ("missing final layer", _drop("final_layer_type_1/matrix"),
     r"node final_layer_type_1/matrix \(weights of the fitting net of type 1\) is missing"),
    ("missing embedding net", _drop("filter_type_1/matrix_1_0"),
     r"node filter_type_1/matrix_1_0 \(the embedding net of neighbour type 0, centre type 1\) is missing"),
    ("no env op", _drop("ProdEnvMatA"), r"no environment-matrix op"),
    ("se_e2_r", _set_op("ProdEnvMatA", "ProdEnvMatR"), r"the se_e2_r descriptor \(op ProdEnvMatR\)"),
    ("se_atten", _set_op("ProdEnvMatA", "ProdEnvMatAMix"), r"se_atten / DPA-1\) \(op ProdEnvMatAMix\)"),
    ("hybrid", _copy("ProdEnvMatA", "ProdEnvMatA_1"), r"2 environment-matrix ops .*: a hybrid descriptor"),
    ("compressed", _copy("ProdEnvMatA", "TabulateFusionSeA", "TabulateFusionSeA"), r"a compressed graph"),
    ("dipole", _model_type("dipole"), r"a 'dipole' model \(model_attr/model_type\)"),
    ("polar", _model_type("polar"), r"a 'polar' model"),
    ("dos", _model_type("dos"), r"a 'dos' model"),
    ("spin", _copy("descrpt_attr/ntypes", "spin_attr/ntypes_spin"), r"a spin model \(node spin_attr/ntypes_spin\)"),
    ("type embedding, no bias", _copy("layer_0_type_0/matrix", "type_embed_net/matrix_1"),
     r"node type_embed_net/bias_1 \(bias of the type embedding net\) is missing"),
    ("fparam", _copy("descrpt_attr/ntypes", "fitting_attr/dfparam"),
     r"frame or atomic parameters \(fitting_attr/dfparam = 2\)"),
    ("unread weights", _copy("layer_0_type_0/matrix", "layer_0/matrix"), r"node layer_0/matrix is not part"),
    ("net used twice", _second_use_of("layer_0_type_0/bias"),
     r"layer_0_type_0/bias feeds \['AddV2', 'AddV2'\], expected one addition"),
]


@pytest.mark.parametrize("mutate, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_cannot_be_read_is_refused_in_one_line_naming_it(tf, tmp_path, mutate, message):
    graph_def = old_graph(tf, _model(type_one_side=False))
    mutate(graph_def)
    path = _write(graph_def, tmp_path / "old.pb")
    with pytest.raises(InputError) as err:
        legacy_graph.read_legacy_graph(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: ")
    assert len(re.findall(message, str(err.value))) == 1, str(err.value)


def test_a_file_that_is_no_graph_is_refused(tf, tmp_path):
    (tmp_path / "junk.pb").write_bytes(b"\xff\x00 not a graph")
    with pytest.raises(InputError, match=r"junk.pb: not a TensorFlow graph"):
        legacy_graph.read_legacy_graph(tmp_path / "junk.pb")


def test_without_tensorflow_one_line_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    with pytest.raises(ImportError, match=r"^reading TensorFlow graphs needs tensorflow") as err:
        legacy_graph.read_legacy_graph(tmp_path / "old.pb")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# deepmd-kit's own fixtures, when a folder of them is given
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*more neighbours within rcut")  # sea_012's sel [1, 1] is exceeded
@pytest.mark.parametrize("name", ["deeppot", "deeppot-1", "sea_012", "se_e2_a_tebd"])
def test_deepmd_kit_fixtures_give_their_reference_values(tf, name):
    folder = Path(os.environ.get("DEEPMD_INFER_DIR", "/nonexistent"))
    if not (folder / f"{name}.pbtxt").is_file():
        pytest.skip("DEEPMD_INFER_DIR does not name a folder holding deepmd-kit's source/tests/infer fixtures")
    from validation.legacy_graphs import CELLS, REFERENCE, evaluate

    pot = DeepPot(model_from_dict(legacy_graph.read_legacy_graph(folder / f"{name}.pbtxt")))
    results = evaluate(pot)
    for frame in CELLS:
        for q, value in REFERENCE[name, frame].items():
            np.testing.assert_allclose(results[frame][q].reshape(-1), value, rtol=0, atol=1e-10, err_msg=f"{frame} {q}")


# ---------------------------------------------------------------------------
# TensorFlow's switch: rcut_smth and the width rcut - rcut_smth in float32 (SeAConfig.float32_switch)
# ---------------------------------------------------------------------------


def test_the_float32_switch_is_tensorflows_environment_matrix(tf):
    """deepmd-kit's ProdEnvMatA op on neighbours across the switch of rcut 6, rcut_smth 1.8 (where the float32
    width 4.199999809 differs from 4.2) gives minidp's rows with float32_switch to round-off, not without."""
    op_module = pytest.importorskip("deepmd.tf.env").op_module
    d = np.array([1.9, 2.0, 2.7, 3.0, 4.5, 5.5, 5.9])
    n = d.size
    # (1, (n + 1) * 3) atom 0 at the origin, its neighbours along x
    coord = np.zeros((1, (n + 1) * 3))
    coord[0, 3::3] = d
    sel = 10
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        out = op_module.prod_env_mat_a(
            tf.constant(coord), tf.constant(np.zeros((1, n + 1), np.int32)), tf.constant(np.full(3, n + 1, np.int32)),
            tf.constant(np.diag([30.0] * 3).reshape(1, 9)), tf.constant(np.zeros(0, np.int32)),
            tf.constant(np.zeros((1, 4 * sel))), tf.constant(np.ones((1, 4 * sel))),
            rcut_a=-1.0, rcut_r=6.0, rcut_r_smth=1.8, sel_a=[sel], sel_r=[0])
        # (n,) the first column of atom 0's rows: s(r) / r
        want = sess.run(out[0]).reshape(n + 1, sel, 4)[0, :n, 0]
    for flag, tol in ((True, 1e-15), (False, None)):
        cfg = SeAConfig(6.0, 1.8, (sel,), (4,), 2, True, float32_switch=flag)
        rij = np.zeros((1, 1, sel, 3))
        rij[0, 0, :n, 0] = d
        nlist = np.where(np.arange(sel) < n, 1, -1).reshape(1, 1, sel)
        R, _ = env_matrix(rij, nlist, np.zeros(1, int), np.zeros((1, sel, 4)), np.ones((1, sel, 4)), cfg.switch_start,
                          cfg.rcut, "reference", width=cfg.switch_width)
        err = np.abs(R[0, 0, :n, 0] - want).max()
        assert err < 1e-15 if flag else err > 1e-9, (flag, err)


def test_deepmd_kit_fparam_aparam_fixture_gives_its_reference_values(tf, tmp_path):
    """fparam_aparam.pbtxt (a graph with a training script, read through deepmd-kit's converter) against its
    testcase's reference values: to 1e-10 with TensorFlow's float32 switch (1.2e-8 without it)."""
    yaml = pytest.importorskip("yaml")
    folder = Path(os.environ.get("DEEPMD_INFER_DIR", "/nonexistent"))
    if not (folder / "fparam_aparam-testcase.yaml").is_file() or not (folder / "fparam_aparam.pbtxt").is_file():
        pytest.skip("DEEPMD_INFER_DIR does not name a folder holding deepmd-kit's source/tests/infer fixtures")
    pb = tmp_path / "fparam_aparam.pb"
    pb.write_bytes(legacy_graph.read_graph_def(folder / "fparam_aparam.pbtxt").SerializeToString())
    pot = DeepPot(pb)
    assert pot.model.descriptor.config.float32_switch
    for case in yaml.safe_load((folder / "fparam_aparam-testcase.yaml").read_text())["results"]:
        box = None if case["box"] is None else np.reshape(case["box"], (1, 9))
        _, f, _, ae, av = pot.eval(np.reshape(case["coord"], (1, -1)), box, case["atype"], atomic=True,
                                   fparam=case["fparam"], aparam=case["aparam"])
        for name, got in (("atomic_energy", ae), ("force", f), ("atomic_virial", av)):
            np.testing.assert_allclose(got.reshape(-1), np.reshape(case[name], -1), rtol=0, atol=1e-10, err_msg=name)


def test_init_model_from_a_graph_trains_with_the_float64_switch(tf, tmp_path):
    """--init-model from a .pb: the float32 switch is TF's evaluation, not the model's shape (the input's
    descriptor matches), and training goes on in float64 as the saved model computes."""
    model = _model()
    path = _write(old_graph(tf, model), tmp_path / "old.pb")
    assert DeepPot(path).model.descriptor.config.float32_switch
    config = SimpleNamespace(descriptor=model.descriptor.config, type_map=tuple(model.type_map), fitting_neuron=(6, 6),
                             fitting_input=model.fitting_input, atom_ener=(), atom_exclude_types=())
    assert not init_from_model(path, config).descriptor.config.float32_switch
