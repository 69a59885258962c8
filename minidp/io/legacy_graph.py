r"""deepmd-kit's old TensorFlow graphs: an se_e2_a energy model read from a frozen graph's constants.

``dp freeze`` writes a model as a TensorFlow graph (``.pb``) in which every trained array is a constant
node. Graphs frozen by deepmd-kit 2.2 and later also carry the training input (``train_attr/training_script``),
from which deepmd-kit's converter rebuilds the model; older graphs (deepmd-kit 0.12 to 2.1) carry none, and
that converter fails on them. The model is still all there, under fixed node names. This module reads it
into the model dict deepmd-kit's converter writes for newer graphs (``model.descriptor``, ``model.fitting``,
see :mod:`minidp.io.serialization`), so an old graph is checked and built like every other model file.

Where each part of the model sits (ti centre type, tj neighbour type, layers l = 1..len(neuron) of an
embedding net, k = 0..len(fitting neuron)-1 of a fitting net):

=================  ===========================================================  ============================
quantity           graphs 1.0 to 2.x                                            graphs 0.12
=================  ===========================================================  ============================
rcut, rcut_smth,   attributes ``rcut_r``, ``rcut_r_smth``, ``sel_a`` of the     of ``DescrptNorot``
sel                environment-matrix op (``ProdEnvMatA``, ``DescrptSeA``)
ntypes             ``len(sel_a)``, checked against ``descrpt_attr/ntypes``      ``t_ntypes``
davg, dstd         ``descrpt_attr/t_avg``, ``descrpt_attr/t_std``,              ``t_avg``, ``t_std``
                   (ntypes, 4 nnei)
embedding nets     ``filter_type_all/{matrix,bias,idt}_l_tj`` (one net per      ``DS_layer_type_ti/..._l_tj``
                   neighbour type) or ``filter_type_ti/..._l_tj`` (per pair)
fitting nets       ``layer_k_type_t/{matrix,bias,idt}``,                        the same
                   ``final_layer_type_t/{matrix,bias}``
bias_atom_e        ``fitting_attr/t_bias_atom_e``; absent from old graphs,      absent (0)
                   which fold it into ``final_layer_type_t/bias`` (then 0)
type_map           ``model_attr/tmap``, names separated by spaces               absent
type embedding     ``type_embed_net/{matrix,bias,idt}_l`` on one-hot types,     absent
                   one shared ``filter_type_all/..._l`` and one fitting net
                   ``layer_k``, ``final_layer`` (no type suffix)
=================  ===========================================================  ============================

se_e2_a with a type embedding (:mod:`minidp.type_embed`) is read here even from graphs that carry a
training script: deepmd-kit's converter refuses it (it has no serialized form for it). Its type
embedding net goes to minidp's own key ``model.minidp_type_embedding``, which deepmd-kit does not read.

What the graph does not name is read from its structure: the widths from the weights' shapes,
``axis_neuron`` = (fitting input width) / neuron[-1], ``type_one_side`` from the embedding scope, the
precision from the weights' dtype, and each layer's activation from the op its pre-activation x W + b feeds
(``Tanh``, ``Relu``, ``GeluCustom``, ...). Residual connections follow TensorFlow's rules, which are not
quite the NumPy backend's: an embedding layer adds its input back when its width equals (x) or doubles
([x, x]) the input's, scaled by ``idt`` only there; a fitting layer k >= 1 does so only when the widths are
equal; the first and the final fitting layers never do.

The cutoffs are the op's attributes, which TensorFlow stores as float32: a graph trained with
rcut_smth = 5.8 computes with 5.800000190734863, and so does minidp (to agree with the graph to 1e-10, not
to 1e-8); the op also takes the switch's width rcut - rcut_smth in float32, which minidp follows with
``SeAConfig.float32_switch`` (set for every .pb, this reader's and deepmd-kit's converter's). A graph
without a type map (0.12, or ``model_attr/tmap`` empty) gets the names type_0, type_1, ...

Everything else is refused in one line naming it: other model types (``model_attr/model_type`` dipole,
polar, dos, ...), other descriptors (by their op: se_e2_r, se_atten, se_a_mask, se_a_ef, loc_frame,
hybrids), spin, DPLR modifiers, pair tables, compressed graphs, a type embedding net without a bias
(``use_tebd_bias`` false), frame and atomic parameters; a node the model needs and the graph lacks;
and any weight-like constant (``matrix``, ``bias``, ``idt``) the reader did not use, so that no part of
a model is silently dropped.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp.checks import InputError
from minidp.io.model_check import FLOAT32_SWITCH_KEY, TEBD_KEY
from minidp.nn import residual_kind

# the environment-matrix ops of se_e2_a: 2.x, 1.x, and 0.12 graphs
SE_A_OPS = ("ProdEnvMatA", "DescrptSeA", "DescrptNorot")

# ops of deepmd-kit's TF graphs that make a model something else, with the thing they make
OTHER_OPS = {
    "ProdEnvMatR": "the se_e2_r descriptor", "DescrptSeR": "the se_e2_r descriptor",
    "ProdEnvMatAMix": "a mixed-type descriptor (se_atten / DPA-1)",
    "DescrptSeAMask": "the se_a_mask descriptor",
    "DescrptSeAEf": "the se_a_ef descriptor", "DescrptSeAEfPara": "the se_a_ef descriptor",
    "DescrptSeAEfVert": "the se_a_ef descriptor", "Descrpt": "the loc_frame descriptor",
    "ProdEnvMatANvnmdQuantize": "an NVNMD (quantized) model", "ProdEnvMatAMixNvnmdQuantize": "an NVNMD model",
    "MapAparam": "a descriptor fed atomic parameters (se_a_ebd)", "DprcPairwiseIdx": "a pairwise DPRc model",
    "PairTab": "a pair table added to the model (use_srtab)", "SoftMinSwitch": "a pair table (use_srtab)",
    "EwaldRecp": "a DPLR model (long-range electrostatics)",
    "TabulateFusionSeA": "a compressed graph (dp compress)", "TabulateFusion": "a compressed graph (dp compress)",
}

# node-name prefixes that make a model something else
OTHER_NODES = {
    "spin_attr/": "a spin model",
    "modifier_attr/": "a model with a modifier (DPLR)",
}
# the type embedding net's scope (se_e2_a with a type embedding, minidp.type_embed)
TEBD_SCOPE = "type_embed_net"

# the activation an op applied to x W + b stands for (deepmd-kit's names); GeluCustom is deepmd-kit's own op
ACTIVATION_OPS = {"Tanh": "tanh", "Relu": "relu", "Relu6": "relu6", "Softplus": "softplus",
                  "Sigmoid": "sigmoid", "GeluCustom": "gelu", "Gelu": "gelu"}
# activations TensorFlow spells as several ops, by the ops x W + b feeds
COMPOSITE_ACTIVATIONS = {frozenset({"AddV2", "Mul", "Pow"}): "gelu_tf",  # tf.nn.gelu(approximate=True)
                         frozenset({"Mul", "Sigmoid"}): "silu"}  # x * sigmoid(x)
# ops that can take x W + b of a layer without an activation
LINEAR_USERS = frozenset({"Reshape", "Add", "AddV2", "Sub"})

# a trained array's name: the reader must have used every one of these
WEIGHT_NAME = re.compile(r"(^|/)(matrix|bias|idt)(_\d+)*$")
GRADIENT_SCOPE = re.compile(r"^gradients(_\d+)?/")


# ---------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------


def _tensorflow():
    """The tensorflow module. Imported here, not at the top: it is an optional dependency, needed only
    for TensorFlow graphs (and importing it takes seconds)."""
    try:
        import tensorflow
    except ImportError as err:
        raise ImportError(f"reading TensorFlow graphs needs tensorflow (pip install tensorflow), "
                          f"which is not installed ({err})") from None
    return tensorflow


def read_graph_def(path):
    """The GraphDef in a frozen TensorFlow graph: binary (.pb) or text (.pbtxt, deepmd-kit's test fixtures)."""
    tf = _tensorflow()
    from google.protobuf import message, text_format  # protobuf comes with tensorflow

    path = Path(path)
    graph_def = tf.compat.v1.GraphDef()
    try:
        if path.suffix.lower() == ".pbtxt":
            text_format.Merge(path.read_text(), graph_def)
        else:
            graph_def.ParseFromString(path.read_bytes())
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a TensorFlow graph ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return graph_def


def has_type_embedding(graph_def) -> bool:
    """Whether the graph is se_e2_a with a type embedding, which deepmd-kit's converter refuses."""
    return any(node.name == f"{TEBD_SCOPE}/matrix_1" for node in graph_def.node)


def has_training_script(graph_def) -> bool:
    """Whether the graph carries its training input (deepmd-kit >= 2.2): then deepmd-kit's converter reads it."""
    return any(node.name == "train_attr/training_script" for node in graph_def.node)


class Graph(NamedTuple):
    """A frozen graph indexed for reading; the nodes of the force and virial gradients are left out."""

    source: str  # the file, for messages
    nodes: dict  # name -> NodeDef
    users: dict  # name -> the NodeDefs that take that node as an input
    consts: dict  # name -> np.ndarray, the value of each Const node


def index_graph(graph_def, source: str) -> Graph:
    """Nodes by name, their users, and every constant's value (see :class:`Graph`)."""
    tf = _tensorflow()
    nodes = {n.name: n for n in graph_def.node if not GRADIENT_SCOPE.match(n.name)}
    users: dict[str, list] = {}
    for node in nodes.values():
        for name in node.input:  # "^name" is a control input, "name:1" an op's second output
            users.setdefault(name.lstrip("^").split(":")[0], []).append(node)
    consts = {name: tf.make_ndarray(n.attr["value"].tensor) for name, n in nodes.items() if n.op == "Const"}
    return Graph(str(source), nodes, users, consts)


def _refuse(g: Graph, what: str) -> None:
    raise InputError(f"{g.source}: {what}; minidp reads se_e2_a energy models only")


def _const(g: Graph, name: str, what: str) -> np.ndarray:
    """The value of constant ``name``, or InputError naming it and what it holds."""
    if name not in g.consts:
        raise InputError(f"{g.source}: node {name} ({what}) is missing from the graph")
    return g.consts[name]


def _first(g: Graph, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` the graph holds as a constant, or None."""
    return next((name for name in names if name in g.consts), None)


def _users(g: Graph, name: str) -> list:
    """The nodes that use node ``name``, looking through Identity nodes (a frozen variable's "read")."""
    found = []
    for node in g.users.get(name, []):
        found.extend(_users(g, node.name) if node.op == "Identity" else [node])
    return found


def _scalar(value: np.ndarray):
    """A constant's single value as a Python object (bytes decoded)."""
    item = np.asarray(value).reshape(-1)[0]  # strings come as an object array of bytes
    return item.decode() if isinstance(item, bytes) else item.item()


# ---------------------------------------------------------------------------
# What the graph is: refusals, the environment-matrix op, the type map
# ---------------------------------------------------------------------------


def refuse_other_models(g: Graph) -> None:
    """InputError naming the first thing that makes the graph other than an se_e2_a energy model."""
    model_type = g.consts.get("model_attr/model_type")
    if model_type is not None and _scalar(model_type) != "ener":
        _refuse(g, f"a {_scalar(model_type)!r} model (model_attr/model_type)")
    for node in g.nodes.values():
        if node.op in OTHER_OPS or node.op.startswith("TabulateFusion"):
            _refuse(g, f"{OTHER_OPS.get(node.op, 'a compressed graph (dp compress)')} (op {node.op})")
    se_t = sorted(n for n in g.consts if re.fullmatch(r"filter_type_all/matrix_\d+_\d+_\d+", n))
    if se_t:
        _refuse(g, f"the se_e3 descriptor (node {se_t[0]})")
    if "modifier_attr/type" in g.consts:
        _refuse(g, f"a model with a {_scalar(g.consts['modifier_attr/type'])!r} modifier (DPLR, modifier_attr/type)")
    for prefix, what in OTHER_NODES.items():
        # a weight names the part best (spin_attr/...); any node will do
        found = sorted(name for name in g.consts if name.startswith(prefix) and WEIGHT_NAME.search(name)) or sorted(
            name for name in g.nodes if name.startswith(prefix))
        if found:
            _refuse(g, f"{what} (node {found[0]})")
    for name in ("fitting_attr/dfparam", "fitting_attr/daparam"):
        if name in g.consts and int(_scalar(g.consts[name])) != 0:
            raise InputError(f"{g.source}: frame or atomic parameters ({name} = {_scalar(g.consts[name])}) are "
                             "not read from old TensorFlow graphs yet")


class EnvOp(NamedTuple):
    """The environment-matrix op's attributes: what the graph computes with."""

    rcut: float  # rcut_r (float32 in the graph)
    rcut_smth: float  # rcut_r_smth (float32 in the graph)
    sel: tuple[int, ...]  # sel_a: neighbour slots per type


def env_op(g: Graph) -> EnvOp:
    """The one se_e2_a environment-matrix op's cutoffs and sel (InputError if none, or several: a hybrid)."""
    ops = [n for n in g.nodes.values() if n.op in SE_A_OPS]
    if not ops:
        _refuse(g, f"no environment-matrix op ({', '.join(SE_A_OPS)}): not a deepmd-kit se_e2_a graph")
    if len(ops) > 1:
        _refuse(g, f"{len(ops)} environment-matrix ops ({', '.join(n.name for n in ops)}): a hybrid descriptor")
    attr = ops[0].attr
    sel_r = list(attr["sel_r"].list.i)
    if any(sel_r) or attr["rcut_a"].f >= 0:
        _refuse(g, f"op {ops[0].name} with sel_r {sel_r} and rcut_a {attr['rcut_a'].f} (a radial part)")
    return EnvOp(float(attr["rcut_r"].f), float(attr["rcut_r_smth"].f), tuple(int(s) for s in attr["sel_a"].list.i))


def type_map_of(g: Graph, ntypes: int) -> list[str]:
    """model_attr/tmap split at spaces; type_0, type_1, ... when the graph names no types."""
    names = str(_scalar(g.consts["model_attr/tmap"])).split() if "model_attr/tmap" in g.consts else []
    if not names:
        return [f"type_{t}" for t in range(ntypes)]
    if len(names) != ntypes:
        raise InputError(f"{g.source}: model_attr/tmap names {len(names)} types {names}, but the descriptor's "
                         f"sel has {ntypes}")
    return names


# ---------------------------------------------------------------------------
# Layers and nets
# ---------------------------------------------------------------------------


def activation_of(g: Graph, bias: str) -> str:
    """The activation of the layer whose bias is node ``bias``: what its x W + b feeds ("linear": nothing)."""
    adds = _users(g, bias)
    if len(adds) != 1 or adds[0].op not in ("Add", "AddV2", "BiasAdd"):
        raise InputError(f"{g.source}: {bias} feeds {sorted(n.op for n in adds)}, expected one addition x W + b "
                         "(a net evaluated more than once, as for atom_ener, is not read)")
    ops = frozenset(n.op for n in _users(g, adds[0].name))
    if len(ops) == 1 and next(iter(ops)) in ACTIVATION_OPS:
        return ACTIVATION_OPS[next(iter(ops))]
    if ops in COMPOSITE_ACTIVATIONS:
        return COMPOSITE_ACTIVATIONS[ops]
    if ops <= LINEAR_USERS:
        return "linear"
    raise InputError(f"{g.source}: cannot tell the activation of the layer with bias {bias}: "
                     f"x W + b feeds the ops {sorted(ops)}")


class GraphLayer(NamedTuple):
    """One dense layer as the graph holds it."""

    W: np.ndarray  # (n_in, n_out)
    b: np.ndarray  # (n_out,)
    idt: np.ndarray | None  # (n_out,) or None
    activation: str
    names: tuple[str, ...]  # the constants read


def read_layer(g: Graph, matrix: str, bias: str, idt: str, what: str) -> GraphLayer:
    """The layer with weights ``matrix``, bias ``bias`` and (if present) timestep ``idt``."""
    W = _const(g, matrix, f"weights of {what}")
    if W.ndim != 2 or "Cast" in {n.op for n in _users(g, matrix)}:
        raise InputError(f"{g.source}: {matrix} has shape {W.shape} or is cast before use; expected 2-d "
                         "weights used as stored (mixed-precision graphs are not read)")
    # (n_out,) both: old graphs store them as (1, n_out)
    b = _const(g, bias, f"bias of {what}").reshape(-1)
    t = g.consts[idt].reshape(-1) if idt in g.consts else None
    for name, v in ((bias, b), (idt, t)):
        if v is not None and v.shape != (W.shape[1],):
            raise InputError(f"{g.source}: {name} has {v.size} numbers, expected {W.shape[1]} (as {matrix})")
    names = (matrix, bias) + ((idt,) if t is not None else ())
    return GraphLayer(W, b, t, activation_of(g, bias), names)


def layer_dict(layer: GraphLayer, activation: str, resnet: bool, use_idt: bool) -> dict:
    """deepmd-kit's serialized Layer (as its converter writes it) for one graph layer."""
    idt = layer.idt if use_idt else None
    return {"@class": "Layer", "@version": 2, "bias": True, "use_timestep": idt is not None,
            "activation_function": activation, "resnet": resnet, "precision": layer.W.dtype.name,
            "trainable": True, "@variables": {"w": layer.W, "b": layer.b, "idt": idt}}


def one_activation(g: Graph, layers: list[GraphLayer], what: str) -> str:
    """The activation all ``layers`` share (minidp keeps one per net kind), or InputError."""
    found = sorted({layer.activation for layer in layers})
    if len(found) != 1:
        raise InputError(f"{g.source}: the {what} layers use different activations {found}; expected one")
    return found[0]


def numbered_net(g: Graph, prefix: str, suffix: str, what: str) -> list[GraphLayer]:
    """The layers {prefix}/matrix_n{suffix}, n = 1, 2, ... (with bias_n, idt_n) of an embedding-like net."""
    depth = next(n for n in itertools.count(1) if f"{prefix}/matrix_{n}{suffix}" not in g.consts) - 1
    return [read_layer(g, f"{prefix}/matrix_{n}{suffix}", f"{prefix}/bias_{n}{suffix}", f"{prefix}/idt_{n}{suffix}",
                       what) for n in range(1, depth + 1)]


def embedding_nets(g: Graph, ntypes: int) -> tuple[bool, list[list[GraphLayer]]]:
    """(type_one_side, nets): one net per neighbour type tj, or per pair in deepmd-kit's order ti + tj * ntypes."""
    scopes = {"filter_type_all": True, "filter_type_0": False, "DS_layer_type_0": False}
    scope = next((s for s in scopes if f"{s}/matrix_1_0" in g.consts), None)
    if scope is None:
        raise InputError(f"{g.source}: no embedding net: none of {', '.join(s + '/matrix_1_0' for s in scopes)} "
                         "is in the graph")
    one_side = scopes[scope]
    pairs = [(None, tj) for tj in range(ntypes)] if one_side else [(k % ntypes, k // ntypes)
                                                                   for k in range(ntypes * ntypes)]
    nets = []
    for ti, tj in pairs:
        prefix = scope if ti is None else scope[:-1] + str(ti)
        what = f"the embedding net of neighbour type {tj}" + ("" if ti is None else f", centre type {ti}")
        if f"{prefix}/matrix_1_{tj}" not in g.consts:  # TensorFlow builds no net for an excluded pair
            raise InputError(f"{g.source}: node {prefix}/matrix_1_{tj} ({what}) is missing from the graph "
                             "(an excluded pair, exclude_types, is not read from old graphs)")
        nets.append(numbered_net(g, prefix, f"_{tj}", what))
    return one_side, nets


def shared_embedding_net(g: Graph, ne: int) -> tuple[bool, list[list[GraphLayer]]]:
    """(type_one_side, [net]) of se_e2_a with a type embedding: one net filter_type_all/matrix_n reading
    [s, e_j] (1 + ne numbers, type_one_side) or [s, e_j, e_i] (1 + 2 ne)."""
    net = numbered_net(g, "filter_type_all", "", "the shared embedding net")
    if not net or net[0].W.shape[0] not in (1 + ne, 1 + 2 * ne):
        raise InputError(f"{g.source}: the shared embedding net filter_type_all/matrix_1 has shape "
                         f"{None if not net else net[0].W.shape}; expected ({1 + ne} or {1 + 2 * ne}, n) for a type "
                         f"embedding of {ne}")
    return net[0].W.shape[0] == 1 + ne, [net]


def fitting_nets(g: Graph, suffixes: list[str]) -> list[list[GraphLayer]]:
    """One fitting net per suffix ("_type_t" per atom type, or "" for the net all types share):
    hidden layers layer_k{suffix}, then final_layer{suffix}."""
    nets = []
    for suffix in suffixes:
        depth = next(k for k in itertools.count() if f"layer_{k}{suffix}/matrix" not in g.consts)
        scopes = [f"layer_{k}{suffix}" for k in range(depth)] + [f"final_layer{suffix}"]
        what = f"the fitting net of type {suffix.rsplit('_', 1)[-1]}" if suffix else "the shared fitting net"
        nets.append([read_layer(g, f"{s}/matrix", f"{s}/bias", f"{s}/idt", what) for s in scopes])
    return nets


def widths(g: Graph, nets: list[list[GraphLayer]], n_in: int | None, what: str) -> list[int]:
    """The output widths the nets share (input width n_in, if given), or InputError."""
    found = {tuple(layer.W.shape[1] for layer in net) for net in nets}
    inputs = {net[0].W.shape[0] for net in nets}
    if len(found) != 1 or len(inputs) != 1 or (n_in is not None and inputs != {n_in}):
        raise InputError(f"{g.source}: the {what} nets have widths {sorted(found)} from inputs {sorted(inputs)}; "
                         f"expected the same widths for all" + ("" if n_in is None else f", from input {n_in}"))
    return list(found.pop())


# ---------------------------------------------------------------------------
# The model dict, as deepmd-kit's converter writes it
# ---------------------------------------------------------------------------


def embedding_dict(net: list[GraphLayer], activation: str) -> dict:
    """An EmbeddingNetwork: every layer activated; TensorFlow adds the input back where the width equals or
    doubles it, and scales by idt only on those layers (an idt elsewhere is unused, so left out)."""
    layers = [layer_dict(layer, activation, True, residual_kind(*layer.W.shape, True) != "none") for layer in net]
    return {"@class": "EmbeddingNetwork", "@version": 2, "in_dim": int(net[0].W.shape[0]),
            "neuron": [gl.W.shape[1] for gl in net],
            "activation_function": activation, "resnet_dt": any(d["use_timestep"] for d in layers), "bias": True,
            "precision": net[0].W.dtype.name, "layers": layers}


def fitting_dict_net(g: Graph, net: list[GraphLayer], activation: str) -> dict:
    """A FittingNetwork: hidden layer k adds its input back only when k >= 1 and the widths are equal
    (TensorFlow's rule); the final layer is linear."""
    *hidden, final = net
    if final.activation != "linear" or final.W.shape[1] != 1:
        raise InputError(f"{g.source}: {final.names[0]} has shape {final.W.shape} and activation "
                         f"{final.activation!r}; expected a linear final layer to one energy")
    layers = [layer_dict(layer, activation, k >= 1 and layer.W.shape[0] == layer.W.shape[1], True)
              for k, layer in enumerate(hidden)] + [layer_dict(final, "none", False, False)]
    return {"@class": "FittingNetwork", "@version": 1, "in_dim": net[0].W.shape[0], "out_dim": 1,
            "neuron": [gl.W.shape[1] for gl in hidden], "activation_function": activation,
            "resnet_dt": any(d["use_timestep"] for d in layers), "precision": final.W.dtype.name,
            "bias_out": True, "layers": layers}


def descriptor_dict(g: Graph, env: EnvOp, type_map: list[str], ne: int = 0) -> tuple[dict, set]:
    """model.descriptor (se_e2_a) and the names of the constants read for it; ne > 0: the width of the
    model's type embedding (one shared embedding net, minidp.type_embed)."""
    ntypes, nnei = len(env.sel), sum(env.sel)
    declared = _first(g, ("descrpt_attr/ntypes", "t_ntypes"))
    if declared is not None and int(_scalar(g.consts[declared])) != ntypes:
        raise InputError(f"{g.source}: {declared} = {_scalar(g.consts[declared])}, but sel {list(env.sel)} has "
                         f"{ntypes} types")
    one_side, nets = shared_embedding_net(g, ne) if ne else embedding_nets(g, ntypes)
    neuron = widths(g, nets, None if ne else 1, "embedding")
    activation = one_activation(g, [layer for net in nets for layer in net], "embedding")
    read = {name for net in nets for layer in net for name in layer.names}
    stats = {}
    for key, names in (("davg", ("descrpt_attr/t_avg", "t_avg")), ("dstd", ("descrpt_attr/t_std", "t_std"))):
        name = _first(g, names) or names[0]
        value = _const(g, name, key)
        if value.size != ntypes * nnei * 4:
            raise InputError(f"{g.source}: {name} has shape {value.shape}, expected ({ntypes}, {4 * nnei}) "
                             f"(ntypes, 4 * sum(sel {list(env.sel)}))")
        # (ntypes, nnei, 4)
        stats[key] = value.reshape(ntypes, nnei, 4)
        read.add(name)
    emb = [embedding_dict(net, activation) for net in nets]
    d = {"@class": "Descriptor", "type": "se_e2_a", "@version": 2, "rcut": env.rcut, "rcut_smth": env.rcut_smth,
         "sel": list(env.sel), "neuron": neuron, "axis_neuron": axis_neuron_of(g, neuron[-1], ne),
         "resnet_dt": any(e["resnet_dt"] for e in emb), "trainable": True, "type_one_side": one_side,
         "exclude_types": [], "env_protection": 0.0, "set_davg_zero": False, "activation_function": activation,
         "precision": nets[0][0].W.dtype.name,
         "embeddings": {"@class": "NetworkCollection", "@version": 1, "ndim": 1 if one_side else 2,
                        "ntypes": ntypes, "network_type": "embedding_network", "networks": emb},
         "env_mat": {"rcut": env.rcut, "rcut_smth": env.rcut_smth, "protection": 0.0, "use_exp_switch": False},
         "@variables": stats, "type_map": type_map, "spin": None, FLOAT32_SWITCH_KEY: True}
    return d, read


def fitting_dict(g: Graph, type_map: list[str], dim_descrpt: int, ne: int = 0) -> tuple[dict, set]:
    """model.fitting (ener) and the names of the constants read for it. The per-type energy bias is
    fitting_attr/t_bias_atom_e when the graph has it; old graphs fold it into the final layer's bias.
    ne > 0: one net shared by all types, reading [D, e_t] (minidp.type_embed)."""
    ntypes = len(type_map)
    nets = fitting_nets(g, [""] if ne else [f"_type_{t}" for t in range(ntypes)])
    hidden = widths(g, nets, dim_descrpt + ne, "fitting")[:-1]
    # without hidden layers no activation is used: tanh is deepmd-kit's default
    activation = one_activation(g, [layer for net in nets for layer in net[:-1]], "fitting") if hidden else "tanh"
    bias = g.consts.get("fitting_attr/t_bias_atom_e")
    bias_atom_e = np.zeros((ntypes, 1), nets[0][0].W.dtype) if bias is None else bias.reshape(ntypes, 1)
    networks = [fitting_dict_net(g, net, activation) for net in nets]
    d = {"@class": "Fitting", "type": "ener", "@version": 4, "var_name": "energy", "ntypes": ntypes,
         "dim_descrpt": dim_descrpt, "mixed_types": bool(ne), "dim_out": 1, "neuron": hidden,
         "resnet_dt": any(n["resnet_dt"] for n in networks), "numb_fparam": 0, "numb_aparam": 0,
         "dim_case_embd": 0, "default_fparam": None, "rcond": None, "tot_ener_zero": False,
         "trainable": [True] * (len(hidden) + 1), "atom_ener": [], "activation_function": activation,
         "precision": nets[0][0].W.dtype.name, "layer_name": None, "use_aparam_as_mask": False, "spin": None,
         "exclude_types": [],
         "nets": {"@class": "NetworkCollection", "@version": 1, "ndim": 1, "ntypes": ntypes,
                  "network_type": "fitting_network", "networks": networks},
         "@variables": {"bias_atom_e": bias_atom_e, "fparam_avg": None, "fparam_inv_std": None,
                        "aparam_avg": None, "aparam_inv_std": None, "case_embd": None},
         "type_map": type_map}
    return d, {name for net in nets for layer in net for name in layer.names}


def axis_neuron_of(g: Graph, ng: int, ne: int = 0) -> int:
    """axis_neuron m2 = (the fitting nets' input width, less the type embedding's ne) / ng: the descriptor
    has ng * m2 numbers."""
    suffix = "" if ne else "_type_0"
    matrix = f"layer_0{suffix}/matrix" if f"layer_0{suffix}/matrix" in g.consts else f"final_layer{suffix}/matrix"
    n_in = _const(g, matrix, "weights of the fitting net of type 0").shape[0] - ne
    if n_in % ng:
        raise InputError(f"{g.source}: {matrix} takes {n_in} inputs, not a multiple of the embedding width "
                         f"{ng} (an se_e2_a descriptor has neuron[-1] * axis_neuron numbers)")
    return n_in // ng


def type_embedding_dict(g: Graph, ntypes: int) -> tuple[dict | None, set]:
    """minidp's entry for the type embedding net (``type_embed_net/matrix_n``, on one-hot types) and the
    names read; (None, set()) when the graph has none. deepmd-kit has no serialized form for it."""
    if f"{TEBD_SCOPE}/matrix_1" not in g.consts:
        return None, set()
    net = numbered_net(g, TEBD_SCOPE, "", "the type embedding net")
    if net[0].W.shape[0] != ntypes:
        raise InputError(f"{g.source}: {TEBD_SCOPE}/matrix_1 has shape {net[0].W.shape}; expected ({ntypes}, n) "
                         "(one-hot types in; an electronic-configuration type embedding is not read)")
    activation = one_activation(g, net, "type embedding")
    d = {"@class": "TypeEmbedNet", "ntypes": ntypes, "neuron": [gl.W.shape[1] for gl in net],
         "activation_function": activation, "network": embedding_dict(net, activation)}
    return d, {name for layer in net for name in layer.names}


def legacy_model_dict(graph_def, source: str) -> dict:
    """The model dict deepmd-kit's converter would write (``{"model": {...}}``) for a frozen se_e2_a energy
    graph, read from its constants and op attributes (see the module docstring); InputError in one line,
    naming it, for anything else or anything missing."""
    g = index_graph(graph_def, source)
    refuse_other_models(g)
    env = env_op(g)
    type_map = type_map_of(g, len(env.sel))
    tebd, read_tebd = type_embedding_dict(g, len(type_map))
    ne = tebd["neuron"][-1] if tebd else 0
    descriptor, read = descriptor_dict(g, env, type_map, ne)
    fitting, read_fitting = fitting_dict(g, type_map, descriptor["neuron"][-1] * descriptor["axis_neuron"], ne)
    unread = sorted(name for name in g.consts
                    if WEIGHT_NAME.search(name) and name not in read | read_fitting | read_tebd)
    if unread:
        _refuse(g, f"node {unread[0]}{f' (and {len(unread) - 1} more)' if len(unread) > 1 else ''} is not part "
                   "of an se_e2_a model as minidp reads it")
    ntypes = len(type_map)
    out_bias = next((v for k, v in sorted(g.consts.items()) if k.endswith("/t_out_bias")), None)
    model = {"@class": "Model", "type": "standard", "@version": 2, "type_map": type_map,
             "descriptor": descriptor, "fitting": fitting, "atom_exclude_types": [], "pair_exclude_types": [],
             "rcond": None, "preset_out_bias": None,
             "@variables": {"out_bias": None if out_bias is None else out_bias.reshape(-1, ntypes, 1)[:1]}}
    if tebd:
        model[TEBD_KEY] = tebd
    variables = {}
    if "train_attr/min_nbor_dist" in g.consts:
        variables["min_nbor_dist"] = np.asarray(g.consts["train_attr/min_nbor_dist"], dtype=np.float64)
    return {"backend": "TensorFlow", "model": model, "model_def_script": {}, "@variables": variables}


def read_legacy_graph(path) -> dict:
    """:func:`legacy_model_dict` of the graph in a .pb or .pbtxt file."""
    return legacy_model_dict(read_graph_def(path), str(path))
