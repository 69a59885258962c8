"""Reading deepmd-kit models into minidp's :class:`~minidp.model.EnergyModel`.

deepmd-kit 3 describes every model in one backend-neutral nested dict
(``dp convert-backend`` writes it): ``model.descriptor``, ``model.fitting``,
per-layer ``@variables`` holding the weights ``w`` (n_in, n_out), ``b`` and
the resnet timestep ``idt``. On disk it comes in three spellings:

- ``.dp`` (HDF5): the dict as JSON in the file's ``json`` attribute, each
  array replaced by the name of an HDF5 dataset;
- ``.yaml`` / ``.yml`` and ``.json``: the dict itself, each array written as
  ``{"@class": "np.ndarray", "dtype": ..., "value": nested lists}``.

``.pb`` (TensorFlow) and ``.pth`` (PyTorch) models are turned into the same
dict by deepmd-kit's own converters, so those need deepmd-kit installed; the
three files above need nothing but h5py and PyYAML.

Only the se_e2_a (``se_a``) descriptor with an ``ener`` fitting is supported,
with the fitting's frame and atomic parameters (``numb_fparam``,
``numb_aparam``, their statistics, ``default_fparam``,
``use_aparam_as_mask``), ``dim_case_embd``, ``atom_ener`` and the model's
``atom_exclude_types``; anything else is refused with an error that names it.

se_e2_a with a model-level type embedding (:mod:`minidp.type_embed`) has no
form in deepmd-kit's dict (its TF ``serialize`` refuses it): minidp reads it
from the TensorFlow graph's constants (:mod:`minidp.io.legacy_graph`) and
writes it in its own spelling: one shared embedding net (``in_dim`` 1 + ne or
1 + 2 ne), one shared fitting net (``mixed_types`` true) and the type
embedding net under ``model.minidp_type_embedding``. Compressed, the descriptor's
``compress`` entry holds the tables of the folded nets (one per neighbour type,
or per pair of types), in deepmd-kit's layout. deepmd-kit cannot read such a
file back, compressed or not.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import yaml

from minidp import __version__
from minidp.checks import InputError, file_path
from minidp.compress import Table, compression
from minidp.io import legacy_graph
from minidp.io.model_check import FLOAT32_SWITCH_KEY, TEBD_KEY, check_model_dict, min_nbor_dist
from minidp.io.outputs import safe_output
from minidp.model import EnergyModel, FittingInput, model_with_type_embedding
from minidp.nn import Layer, Net, get_activation
from minidp.se_e2_a import EmbeddingNets, SeA, SeAConfig, exclusion_mask
from minidp.type_embed import TypeEmbedding

NATIVE_SUFFIXES = (".dp", ".yaml", ".yml", ".json")
CONVERTED_SUFFIXES = (".pb", ".pth")


# ---------------------------------------------------------------------------
# Files -> model dict
# ---------------------------------------------------------------------------


def _decode_arrays(obj):
    """Replace every {"@class": "np.ndarray", ...} node by the array it describes."""
    if isinstance(obj, dict):
        if obj.get("@class") == "np.ndarray":
            return np.asarray(obj["value"], dtype=np.dtype(obj["dtype"]))
        return {k: _decode_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_arrays(v) for v in obj]
    return obj


def _read_hdf5(path: Path) -> dict:
    """A .dp file: JSON in the 'json' attribute, arrays as datasets named inside '@variables'."""
    with h5py.File(path, "r") as f:
        if "json" not in f.attrs:
            raise InputError(f"{path}: HDF5 file has no 'json' attribute; not a deepmd-kit .dp model")
        tree = json.loads(f.attrs["json"])

        def fetch(node, in_variables=False):
            if isinstance(node, dict):
                return {k: fetch(v, in_variables or k == "@variables") for k, v in node.items()}
            if isinstance(node, list):
                return [fetch(v, in_variables) for v in node]
            if in_variables and isinstance(node, str):
                return f[node][()]
            return node

        return fetch(tree)


def _read_converted(path: Path) -> dict:
    """A .pb or .pth file, serialized to the neutral dict by deepmd-kit itself."""
    try:
        from deepmd.backend.backend import Backend
    except ImportError as err:
        raise ImportError(
            f"reading {path.suffix} models needs deepmd-kit (pip install 'minidp[ref]'), "
            f"which is not installed ({err}); convert the model with "
            f"`dp convert-backend {path.name} {path.stem}.dp` and load the .dp file instead"
        ) from None
    import zipfile

    if path.suffix.lower() == ".pth" and not zipfile.is_zipfile(path):
        # torch.save and TorchScript both write zip archives; anything else fails deep inside deepmd-kit
        raise InputError(f"{path} is not a PyTorch model (not a zip archive as torch.save writes)")
    graph = None
    if path.suffix.lower() == ".pb":
        from deepmd.tf.utils.graph import load_graph_def

        graph, graph_def = load_graph_def(str(path))
        _refuse_compressed_pb(path, graph_def)
        # old graphs (no train_attr/training_script) and se_e2_a with a type embedding, which deepmd-kit's
        # converter cannot read: minidp.io.legacy_graph
        if not legacy_graph.has_training_script(graph_def) or legacy_graph.has_type_embedding(graph_def):
            return legacy_graph.legacy_model_dict(graph_def, str(path))
    backend = Backend.detect_backend_by_model(str(path))
    data = backend().serialize_hook(str(path))
    if graph is not None:
        _restore_pb_out_bias(graph, data)
        # the graph computes its switch in float32 (SeAConfig.float32_switch); the converter's dict does not say so
        data["model"]["descriptor"][FLOAT32_SWITCH_KEY] = True
    return data


def _refuse_compressed_pb(path: Path, graph_def) -> None:
    """InputError for a `dp --tf compress`ed graph: deepmd-kit 3.2 serializes it without its
    embedding nets (and without its tables), so nothing minidp could evaluate would come out."""
    if any(node.op.startswith("TabulateFusion") for node in graph_def.node):
        raise InputError(f"{path} is a compressed TensorFlow graph (`dp --tf compress`), which deepmd-kit cannot "
                         "convert: load the model it was compressed from, and compress it with `minidp compress "
                         "-i MODEL.pb` (the tables of `dp --tf compress`)")


# deepmd-kit 3.2 writes a .pb's output bias under the first name but its
# reader looks for the second, finds nothing and silently uses zero: every
# atomic energy would then lack out_bias[type] (forces would not notice).
_PB_OUT_BIAS = ("model_attr/model_attr/t_out_bias", "model_attr/t_out_bias")


def _restore_pb_out_bias(graph, data: dict) -> None:
    """Put the out_bias the TensorFlow graph holds back into the converted model dict."""
    from deepmd.tf.utils.errors import GraphWithoutTensorError
    from deepmd.tf.utils.graph import get_tensor_by_name_from_graph

    for name in _PB_OUT_BIAS:
        try:
            value = np.asarray(get_tensor_by_name_from_graph(graph, name))
        except GraphWithoutTensorError:
            continue
        variables = data["model"].setdefault("@variables", {})
        ntypes = len(data["model"]["type_map"])
        variables["out_bias"] = value.reshape(-1, ntypes, 1)[:1]
        return


def read_model_dict(path) -> dict:
    """The deepmd-kit model dict stored in ``path`` (.dp, .yaml, .yml, .json, .pb, .pth)."""
    path = file_path("model", path, f"a path to a {'/'.join(NATIVE_SUFFIXES + CONVERTED_SUFFIXES)} file")
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"model {path} is a folder; expected a model file ({', '.join(NATIVE_SUFFIXES + CONVERTED_SUFFIXES)})")
    if suffix not in NATIVE_SUFFIXES + CONVERTED_SUFFIXES:
        raise ValueError(
            f"unknown model file type {path.suffix!r} for {path}; "
            f"expected one of {NATIVE_SUFFIXES + CONVERTED_SUFFIXES}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"model file {path} is empty")
    try:
        if suffix == ".dp":
            data = _read_hdf5(path)
        elif suffix in (".yaml", ".yml"):
            data = _decode_arrays(yaml.safe_load(path.read_text()))
        elif suffix == ".json":
            data = _decode_arrays(json.loads(path.read_text()))
        else:
            data = _read_converted(path)
    except (InputError, FileNotFoundError):
        raise
    except ImportError as err:
        if "needs deepmd-kit" in str(err):
            raise
        raise ValueError(f"cannot read model file {path}: {type(err).__name__}: {err}") from None
    except Exception as err:  # h5py, yaml, json and TensorFlow each raise their own kinds
        raise ValueError(f"cannot read model file {path}: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path} holds no deepmd-kit model (no 'model' key at the top level)")
    return data


# ---------------------------------------------------------------------------
# Model dict -> EnergyModel
# ---------------------------------------------------------------------------


def _refuse(what: str, value, path: str) -> None:
    raise ValueError(f"unsupported model: {what} = {value!r} (at {path}); minidp supports "
                     "se_e2_a descriptors with an 'ener' fitting and no extras")


def _require(d: dict, key: str, allowed, path: str) -> None:
    """Refuse the model unless d[key] (if present) is one of the allowed values."""
    value = d.get(key)
    ok = value in allowed if not isinstance(value, np.ndarray) else value.size == 0
    if not ok:
        _refuse(key, value, path)


def _net_from_dict(d: dict) -> Net:
    """One EmbeddingNetwork / FittingNetwork dict -> Net."""
    layers = []
    for ld in d["layers"]:
        v = ld["@variables"]
        activation = ld.get("activation_function", "tanh")
        get_activation(activation)  # fails early, naming an unknown activation
        b = v.get("b")
        W = np.asarray(v["w"])
        layers.append(Layer(
            W=W,
            b=np.zeros(W.shape[1], W.dtype) if b is None else np.asarray(b).reshape(-1),
            idt=None if v.get("idt") is None else np.asarray(v["idt"]).reshape(-1),
            activation=activation,
            resnet=bool(ld.get("resnet", False)),
        ))
    return Net(layers)


def _config_from_dict(d: dict, ntypes: int, pair_exclude_types=()) -> SeAConfig:
    """The se_e2_a descriptor's configuration; the model's pair_exclude_types go with it."""
    where = "model.descriptor"
    if d.get("type") not in ("se_e2_a", "se_a"):
        _refuse("descriptor type", d.get("type"), where)
    _require(d, "spin", (None,), where)
    if d.get("env_mat", {}).get("use_exp_switch", False):
        _refuse("env_mat.use_exp_switch", True, where)
    cfg = SeAConfig(
        rcut=float(d["rcut"]), rcut_smth=float(d["rcut_smth"]),
        sel=tuple(int(s) for s in d["sel"]), neuron=tuple(int(n) for n in d["neuron"]),
        axis_neuron=int(d["axis_neuron"]), type_one_side=bool(d.get("type_one_side", True)),
        activation=d.get("activation_function", "tanh"), resnet_dt=bool(d.get("resnet_dt", False)),
        exclude_types=tuple(map(tuple, d.get("exclude_types") or ())),
        env_protection=float(d.get("env_protection") or 0.0), set_davg_zero=bool(d.get("set_davg_zero", False)),
        pair_exclude_types=tuple(map(tuple, pair_exclude_types)),
        float32_switch=bool(d.get(FLOAT32_SWITCH_KEY, False)),
    )
    if cfg.ntypes != ntypes:
        raise ValueError(f"{where}: sel has {cfg.ntypes} types but the type map has {ntypes}")
    return cfg


def _stats_from_dict(d: dict, cfg: SeAConfig) -> tuple[np.ndarray, np.ndarray]:
    """davg, dstd (ntypes, nnei, 4) of model.descriptor."""
    v = d["@variables"]
    davg, dstd = np.asarray(v["davg"]), np.asarray(v["dstd"])
    if davg.shape != (cfg.ntypes, cfg.nnei, 4):
        raise ValueError(f"model.descriptor: davg has shape {davg.shape}, expected {(cfg.ntypes, cfg.nnei, 4)}")
    return davg, dstd


def _descriptor_from_dict(d: dict, ntypes: int, pair_exclude_types=()) -> SeA:
    """The se_e2_a descriptor; the model's pair_exclude_types go with it (SeAConfig.pair_exclude_types)."""
    where = "model.descriptor"
    cfg = _config_from_dict(d, ntypes, pair_exclude_types)
    nets = [_net_from_dict(n) for n in d["embeddings"]["networks"]]
    # deepmd-kit numbers the nets of a (centre ti, neighbour tj) pair ti + tj * ntypes
    want = ntypes if cfg.type_one_side else ntypes * ntypes
    if len(nets) != want:
        raise ValueError(f"{where}: {len(nets)} embedding nets, expected {want}")
    if cfg.type_one_side:
        table = EmbeddingNets.from_list(ntypes, True, nets)
    else:
        table = EmbeddingNets(ntypes, False, {(ti, tj): nets[ti + tj * ntypes] for ti in range(ntypes)
                                              for tj in range(ntypes)})
    se = SeA(cfg, *_stats_from_dict(d, cfg), table)
    se.compress = _compression_from_dict(d.get("compress"), se, where)
    return se


def _compression_from_dict(c, se: SeA, where: str):
    """The tables of a compressed descriptor (@version 3's "compress" entry), or None."""
    if c is None or c is False:
        return None

    cfg = se.config
    try:
        v = c["@variables"]
        tables = tuple(_table_from_deepmd(data, info, k, se) for k, (data, info)
                       in enumerate(zip(v["compress_data"], v["compress_info"], strict=True)))
        result = compression(tables, se)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}.compress: not deepmd-kit's compress_data/compress_info tables ({err})") from None
    if tables[0].ng != cfg.ng:
        raise ValueError(f"{where}.compress: tables of width {tables[0].ng} do not fit neuron {list(cfg.neuron)}")
    return result


def _table_from_deepmd(data, info, k: int, se: SeA) -> Table:
    """Table k of deepmd-kit's compress_data/compress_info; an empty one (an excluded pair's) as the zero table.

    deepmd-kit's tabulation skips the net of an excluded pair of types (of a
    neighbour type excluded with every centre type, with type_one_side) when
    its exclude_types are tuples, and its compressed path then skips that
    block, padded slots included: the zero function does the same.
    """
    if np.size(data) or np.size(info):
        return Table.from_deepmd(data, info)
    cfg = se.config
    ntypes = cfg.ntypes
    # (ntypes, ntypes) excluded[ti, tj]
    excluded = exclusion_mask(np.arange(ntypes), cfg.exclude_types, [1] * ntypes)
    skipped = excluded[:, k].all() if cfg.type_one_side else excluded[k % ntypes, k // ntypes]
    if not skipped:
        raise ValueError(f"table {k} is empty but its pair of types is not in exclude_types")
    # the zero function on the smallest whole grid Table accepts: one piece on [0, 1), one on [1, 2)
    return Table(np.zeros((2, cfg.ng, 6), dtype=se.davg.dtype), 0.0, 1.0, 2.0, 1.0, 1.0)


def _fitting_input_from_dict(d: dict) -> FittingInput:
    """The fitting's inputs besides the descriptor (model_check has checked their shapes)."""
    v = d["@variables"]
    nfp, nap, nce = (int(d.get(k) or 0) for k in ("numb_fparam", "numb_aparam", "dim_case_embd"))
    mask = bool(d.get("use_aparam_as_mask", False))

    def vector(name: str, n: int, default: float) -> np.ndarray:
        # a TensorFlow graph with use_aparam_as_mask keeps no aparam statistics: its zeros and ones
        value = v.get(name) if n else None
        return np.full(n, default) if value is None else np.asarray(value, dtype=np.float64).reshape(n)

    default = None
    if d.get("default_fparam") is not None:
        # deepmd-kit's dpmodel evaluates with the stored default_fparam_tensor (model_check: they agree)
        stored = v.get("default_fparam_tensor")
        default = np.asarray(d["default_fparam"] if stored is None else stored, dtype=np.float64).reshape(nfp)
    return FittingInput(vector("fparam_avg", nfp, 0.0), vector("fparam_inv_std", nfp, 1.0),
                        vector("aparam_avg", nap, 0.0), vector("aparam_inv_std", nap, 1.0), default, mask,
                        vector("case_embd", nce, 0.0))


def _fitting_from_dict(d: dict, ntypes: int, shared: bool = False
                       ) -> tuple[list[Net], np.ndarray, FittingInput, tuple]:
    """model.fitting: the nets, bias_atom_e (ntypes,), the nets' extra inputs and atom_ener.
    ``shared``: one net for all types (se_e2_a with a type embedding)."""
    where = "model.fitting"
    if d.get("type") != "ener":
        _refuse("fitting type", d.get("type"), where)
    for key, allowed in (("mixed_types", (shared, None)), ("spin", (None,)), ("dim_out", (1, None)),
                         ("layer_name", (None,))):
        _require(d, key, allowed, where)
    nets = [_net_from_dict(n) for n in d["nets"]["networks"]]
    if len(nets) != (1 if shared else ntypes):
        raise ValueError(f"{where}: {len(nets)} fitting nets for {ntypes} types")
    bias = np.asarray(d["@variables"]["bias_atom_e"]).reshape(ntypes)
    return nets, bias, _fitting_input_from_dict(d), tuple(d.get("atom_ener") or ())


def model_from_dict(data: dict) -> EnergyModel:
    """Build an EnergyModel from deepmd-kit's serialized model dict (with or without the file wrapper)."""
    m = data.get("model", data)
    if m.get("type", "standard") != "standard":
        _refuse("model type", m.get("type"), "model")
    if "type_embedding" in m or m["descriptor"].get("type_embedding") is not None:
        _refuse("type_embedding", "present", "model")
    type_map = list(m["type_map"])
    ntypes = len(type_map)
    if m.get(TEBD_KEY) is not None:  # se_e2_a with a type embedding (minidp.type_embed): shared nets
        return _tebd_model_from_dict(data, m)
    se = _descriptor_from_dict(m["descriptor"], ntypes, m.get("pair_exclude_types") or ())
    se = replace(se, compress=_with_file_min_nbor_dist(se.compress, data, m))
    fitting, bias, fitting_input, atom_ener = _fitting_from_dict(m["fitting"], ntypes)
    bias, options = _model_options(data, m, bias, fitting_input, atom_ener)
    return EnergyModel(type_map, se, fitting, bias, **options)


def _with_file_min_nbor_dist(compress, data: dict, m: dict):
    """The tables with the file's smallest neighbour distance (kept on save), or None without tables."""
    if compress is None or data is m:
        return compress
    return replace(compress, min_nbor_dist=min_nbor_dist(data))


def _model_options(data: dict, m: dict, bias: np.ndarray, fitting_input: FittingInput, atom_ener: tuple
                   ) -> tuple[np.ndarray, dict]:
    """The bias (bias_atom_e plus the atomic model's out_bias) and EnergyModel's other fields."""
    out_bias = (m.get("@variables") or {}).get("out_bias")  # null is no @variables, as the checker reads it
    if out_bias is not None:
        # the atomic model's output bias, (n_outputs, ntypes, 1): the energy's is row 0
        bias = bias + np.asarray(out_bias)[0].reshape(bias.size)
    # deepmd-kit's dpmodel gives the fitting the model's atom_exclude_types (its own copy is overwritten)
    script = data.get("model_def_script") if data is not m else None
    return bias, {"fitting_input": fitting_input, "atom_ener": atom_ener,
                  "atom_exclude_types": tuple(m.get("atom_exclude_types") or ()),
                  "model_def_script": dict(script or {})}


def _tebd_model_from_dict(data: dict, m: dict) -> EnergyModel:
    """se_e2_a with a type embedding, from minidp's key for it (minidp.type_embed): one shared
    embedding net, one shared fitting net and the type embedding net; compressed, the tables of the
    folded nets in deepmd-kit's layout (one per neighbour type, or per pair of types)."""
    d, ntypes = m["descriptor"], len(m["type_map"])
    if d.get("exclude_types") or m.get("pair_exclude_types"):
        _refuse("exclude_types or pair_exclude_types with a type embedding", "present", "model.descriptor")
    cfg = _config_from_dict(d, ntypes)
    fitting, bias, fitting_input, atom_ener = _fitting_from_dict(m["fitting"], ntypes, shared=True)
    te = TypeEmbedding(_net_from_dict(m[TEBD_KEY]["network"]), _net_from_dict(d["embeddings"]["networks"][0]),
                       fitting[0], cfg.type_one_side)
    bias, options = _model_options(data, m, bias, fitting_input, atom_ener)
    model = model_with_type_embedding(list(m["type_map"]), cfg, *_stats_from_dict(d, cfg), te, bias, **options)
    compress = _compression_from_dict(d.get("compress"), model.descriptor, "model.descriptor")
    if compress is None:
        return model
    return replace(model, descriptor=replace(model.descriptor, compress=_with_file_min_nbor_dist(compress, data, m)))


def load_model(path) -> EnergyModel:
    """Read a deepmd-kit se_e2_a energy model from a file (see the module docstring).

    Every value minidp reads is checked first (:func:`minidp.io.model_check.check_model_dict`)."""

    data = read_model_dict(path)
    check_model_dict(data, str(path))
    try:
        return model_from_dict(data)
    except ValueError as err:  # a feature minidp does not support, refused by name
        raise InputError(f"{path}: {err}") from None


def read_min_nbor_dist(path) -> float | None:
    """The smallest neighbour distance stored with a model file, or None
    (:func:`minidp.io.model_check.min_nbor_dist`, the one reader of it)."""
    return min_nbor_dist(read_model_dict(path), str(path))


# ---------------------------------------------------------------------------
# EnergyModel -> model dict -> file (the reverse, for models minidp makes)
# ---------------------------------------------------------------------------


def _net_to_dict(net: Net, kind: str, in_dim: int, neuron, resnet_dt: bool) -> dict:
    layers = [{
        "@class": "Layer", "@version": 2, "bias": True, "use_timestep": layer.idt is not None,
        "activation_function": layer.activation, "resnet": layer.resnet,
        "precision": np.dtype(layer.W.dtype).name, "trainable": True,
        "@variables": {"w": layer.W, "b": layer.b, "idt": layer.idt},
    } for layer in net.layers]
    d = {"@class": kind, "@version": 2 if kind == "EmbeddingNetwork" else 1, "in_dim": in_dim,
         "neuron": list(neuron), "activation_function": net.layers[0].activation,
         "resnet_dt": resnet_dt, "precision": np.dtype(net.dtype).name, "layers": layers}
    if kind == "EmbeddingNetwork":
        d["bias"] = True
    else:
        d.update(out_dim=net.n_out, bias_out=True)
    return d


def model_to_dict(model: EnergyModel) -> dict:
    """deepmd-kit's serialized dict (as `dp convert-backend` reads it) for an EnergyModel.

    The whole constant bias goes to the fitting's bias_atom_e; the atomic
    model's out_bias is zero.
    """
    se, cfg, nt = model.descriptor, model.descriptor.config, model.ntypes
    precision = np.dtype(model.fitting[0].dtype).name
    te = model.type_embedding
    if te is not None:  # the shared nets, not the folded ones (minidp.type_embed)
        emb = [te.embedding]
    elif cfg.type_one_side:
        emb = [se.nets[0, tj] for tj in range(nt)]
    else:  # deepmd-kit's order: index ti + tj * ntypes
        emb = [se.nets[k % nt, k // nt] for k in range(nt * nt)]
    descriptor = {
        "@class": "Descriptor", "type": "se_e2_a", "@version": 2, "rcut": cfg.rcut,
        "rcut_smth": cfg.rcut_smth, "sel": list(cfg.sel), "neuron": list(cfg.neuron),
        "axis_neuron": cfg.axis_neuron, "resnet_dt": cfg.resnet_dt, "trainable": True,
        "type_one_side": cfg.type_one_side, "exclude_types": [list(p) for p in cfg.exclude_types],
        "env_protection": cfg.env_protection, "set_davg_zero": cfg.set_davg_zero,
        "activation_function": cfg.activation, "precision": precision,
        "embeddings": {"@class": "NetworkCollection", "@version": 1, "ndim": 1 if cfg.type_one_side else 2,
                       "ntypes": nt, "network_type": "embedding_network",
                       "networks": [_net_to_dict(n, "EmbeddingNetwork", n.n_in, cfg.neuron, cfg.resnet_dt)
                                    for n in emb]},
        "env_mat": {"rcut": cfg.rcut, "rcut_smth": cfg.rcut_smth, "protection": cfg.env_protection,
                    "use_exp_switch": False},
        "@variables": {"davg": se.davg, "dstd": se.dstd}, "type_map": list(model.type_map), "spin": None,
    }
    if se.compress is not None:  # deepmd-kit 3.2 writes a compressed se_e2_a at @version 3
        descriptor["@version"] = 3
        descriptor["compress"] = {"@variables": {"compress_data": [t.data for t in se.compress.tables],
                                                 "compress_info": [t.info for t in se.compress.tables]}}
    hidden = [layer.n_out for layer in model.fitting[0].layers[:-1]]
    resnet_dt = any(layer.idt is not None for layer in model.fitting[0].layers)
    spec = model.fitting_input
    fit_nets = model.fitting if te is None else [te.fitting]

    def stat(value: np.ndarray):  # deepmd-kit writes null for a parameter the model does not have
        return value.astype(precision) if value.size else None

    fitting = {
        "@class": "Fitting", "type": "ener", "@version": 4, "var_name": "energy", "ntypes": nt,
        "dim_descrpt": cfg.dim_out, "mixed_types": te is not None, "dim_out": 1, "neuron": hidden,
        "resnet_dt": resnet_dt, "numb_fparam": spec.numb_fparam, "numb_aparam": spec.numb_aparam,
        "dim_case_embd": spec.dim_case_embd,
        "default_fparam": None if spec.default_fparam is None else spec.default_fparam.tolist(),
        "rcond": None, "tot_ener_zero": False, "trainable": [True] * (len(hidden) + 1),
        "atom_ener": list(model.atom_ener), "activation_function": model.fitting[0].layers[0].activation,
        "precision": precision, "layer_name": None, "use_aparam_as_mask": spec.use_aparam_as_mask, "spin": None,
        "exclude_types": list(model.atom_exclude_types),
        "nets": {"@class": "NetworkCollection", "@version": 1, "ndim": 1, "ntypes": nt,
                 "network_type": "fitting_network",
                 "networks": [_net_to_dict(n, "FittingNetwork", n.n_in, hidden, resnet_dt)
                              for n in fit_nets]},
        "@variables": {"bias_atom_e": model.bias.reshape(nt, 1), "fparam_avg": stat(spec.fparam_avg),
                       "fparam_inv_std": stat(spec.fparam_inv_std), "aparam_avg": stat(spec.aparam_avg),
                       "aparam_inv_std": stat(spec.aparam_inv_std), "case_embd": stat(spec.case_embd)},
        "type_map": list(model.type_map),
    }
    if spec.default_fparam is not None:
        fitting["@variables"]["default_fparam_tensor"] = spec.default_fparam.astype(precision)
    extra = {}
    if te is not None:  # minidp's own key: deepmd-kit cannot read this model back (module docstring)
        extra[TEBD_KEY] = {"@class": "TypeEmbedNet", "ntypes": nt, "neuron": [layer.n_out for layer in te.net.layers],
                           "activation_function": te.net.layers[0].activation,
                           "network": _net_to_dict(te.net, "EmbeddingNetwork", nt,
                                                   [layer.n_out for layer in te.net.layers],
                                                   any(layer.idt is not None for layer in te.net.layers))}
    return extra | {
        "@class": "Model", "type": "standard", "@version": 2, "type_map": list(model.type_map),
        "descriptor": descriptor, "fitting": fitting, "atom_exclude_types": list(model.atom_exclude_types),
        "pair_exclude_types": [list(p) for p in cfg.pair_exclude_types],
        "rcond": None, "preset_out_bias": None,
        "@variables": {"out_bias": np.zeros((1, nt, 1), precision), "out_std": np.ones((1, nt, 1), precision)},
    }


def _encode_arrays(obj):
    """The YAML/JSON spelling: every array as {"@class": "np.ndarray", "dtype", "value"}."""
    if isinstance(obj, np.ndarray):
        return {"@class": "np.ndarray", "@is_variable": True, "@version": 1,
                "dtype": obj.dtype.name, "value": obj.tolist()}
    if isinstance(obj, dict):
        return {k: _encode_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_arrays(v) for v in obj]
    if isinstance(obj, np.generic):  # numpy scalars: YAML cannot write them
        return obj.item()
    return obj


def model_suffix(path) -> str:
    """The suffix of a model file minidp can write (.dp, .yaml, .yml, .json), lower-case; ValueError
    otherwise (the writers ask first, before any work)."""
    suffix = Path(path).suffix.lower()
    if suffix not in NATIVE_SUFFIXES:
        raise InputError(f"cannot write {Path(path).suffix!r} models ({path}); expected one of {NATIVE_SUFFIXES}")
    return suffix


def save_model(path, model: EnergyModel, overwrite: bool = False, inputs=(), min_nbor_dist: float | None = None
               ) -> None:
    """Write an EnergyModel as deepmd-kit's .dp (HDF5), .yaml/.yml or .json, atomically.

    An existing file is replaced only with ``overwrite`` and only if it is a
    model minidp wrote (:func:`minidp.io.outputs.safe_output`). min_nbor_dist (the
    data's smallest neighbour distance, minidp.active.neighbor_stat) goes where
    deepmd-kit keeps it, the file's top-level @variables: model compression
    reads it there.

    What is written must load: the dict passes :func:`minidp.io.model_check.check_model_dict`
    first (a NaN weight or bias is refused here, not by the next reader). The
    file is made in memory and written in one call, so that a full disk is an
    OSError from that write, naming the file, with nothing left behind.
    """
    path = Path(path)
    suffix = model_suffix(path)
    data = {"software": "minidp", "version": __version__, "model": model_to_dict(model),
            "model_def_script": model.model_def_script, "@variables": {}}
    if min_nbor_dist is None and model.descriptor.compress is not None:
        min_nbor_dist = model.descriptor.compress.min_nbor_dist  # a compressed model keeps its own
    if min_nbor_dist is not None:
        data["@variables"]["min_nbor_dist"] = np.array(float(min_nbor_dist))  # a dataset, as deepmd-kit writes it
    check_model_dict(data, f"not writing {path}")
    payload = model_bytes(data, suffix)
    with safe_output(path, "model", inputs, overwrite) as tmp:
        try:
            tmp.write_bytes(payload)
        except OSError as err:
            raise OSError(err.errno, f"cannot write the model {path}: {err.strerror or err}") from None


def model_bytes(data: dict, suffix: str) -> bytes:
    """The file's content for a model dict: HDF5 for .dp, else the YAML/JSON spelling (UTF-8)."""
    if suffix == ".dp":
        return _hdf5_bytes(data)
    if suffix == ".json":
        return json.dumps(_encode_arrays(data)).encode()
    return yaml.safe_dump(_encode_arrays(data)).encode()


def _hdf5_bytes(data: dict) -> bytes:
    """A .dp file in memory: arrays as datasets variable_0000, ...; the dict naming them, as JSON in attribute 'json'.

    HDF5 buffers its metadata and writes it when the file closes: on a real
    file, a full disk then fails inside h5py's close (a RuntimeError, and
    HDF5's library state can crash the interpreter afterwards). In memory
    (a BytesIO) it cannot fail that way; the bytes are written by save_model.
    """
    counter = iter(range(10**9))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:

        def store(node):
            if isinstance(node, np.ndarray):
                return f.create_dataset(f"variable_{next(counter):04d}", data=node).name
            if isinstance(node, dict):
                return {k: store(v) for k, v in node.items()}
            if isinstance(node, list):
                return [store(v) for v in node]
            return node.item() if isinstance(node, np.generic) else node

        f.attrs["json"] = json.dumps(store(data), separators=(",", ":"))
    return buffer.getvalue()
