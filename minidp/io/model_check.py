r"""Checking a deepmd-kit model dict before minidp builds anything from it.

:func:`minidp.io.serialization.load_model` reads every format (.dp, .yaml,
.json; .pb/.pth after deepmd-kit's conversion) into one nested dict and hands
it to :func:`check_model_dict` first. Every key minidp reads is checked there,
once: presence, type (a bool is a bool, a width an int), shape (each array
against ntypes, nnei and the neuron widths) and finiteness (no NaN/inf in a
weight, bias, davg or dstd; dstd > 0, since the environment matrix is divided
by it; a bias within +-MAX_BIAS). A compressed model's tables are checked as
closely (:func:`check_compress`: finite, shapes from compress_info, bounds
ordered), and so is the file's min_nbor_dist (:func:`min_nbor_dist`, the one
reader of it). The first problem is raised, naming the file and the key path:

    water.dp: model.descriptor.@variables.dstd: shape (2, 138, 1), expected (2, 138, 4)

as :class:`~minidp.checks.InputError` (a ValueError), or
:class:`~minidp.checks.InputTypeError` (also a TypeError) for a value of the
wrong type. Keys minidp does not read are not looked at. The value-range rules
of the descriptor (rcut_smth < rcut, axis_neuron <= ng, ...) belong to
:class:`~minidp.se_e2_a.SeAConfig`; its ValueError is passed on here with the
file and key path in front, not written twice; so are the tables' rules, from
:class:`~minidp.compress.Table`.

Shape symbols (see :mod:`minidp.se_e2_a`): ``ntypes``, ``nnei`` (sum of sel),
``ng`` (neuron[-1]), ``m2`` (axis_neuron); a net's layer k maps n_{k-1} to n_k.
"""

from __future__ import annotations

import numpy as np

from minidp.checks import InputError, InputTypeError, boolean, integer, integers, names, number, short, validated
from minidp.compress import Table, grid_counts
from minidp.nn import get_activation
from minidp.se_e2_a import SeAConfig

# where minidp's model files keep the type embedding net of se_e2_a with a type embedding (minidp.type_embed):
# deepmd-kit has no serialized form for that model, so the key is minidp's own
TEBD_KEY = "minidp_type_embedding"
# set by minidp's readers of TensorFlow graphs in model.descriptor (SeAConfig.float32_switch): never written to a file
FLOAT32_SWITCH_KEY = "minidp_float32_switch"

# The largest per-atom energy bias a model may carry (in its energy unit, eV for deepmd-kit). An
# energy is a sum of per-atom terms in float64 (16 digits): next to a bias of 1e10 the fitted part
# keeps 1e-6 of resolution, what a force field needs; beyond, it is lost to round-off, and
# 1e307 per atom overflows the sum. Real biases are -1e1..-1e5 eV (all-electron heavy atoms).
MAX_BIAS = 1e10


# ---------------------------------------------------------------------------
# One value at a key path
# ---------------------------------------------------------------------------


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputTypeError(f"{where}: expected a mapping, got {type(value).__name__} {short(value)}")
    return value


def _key(d: dict, key: str, where: str):
    """d[key], or InputError naming the missing key."""
    if key not in _mapping(d, where):
        raise InputError(f"{where}.{key}: missing")
    return d[key]


def _array(value, where: str, shape: tuple, positive: bool = False) -> np.ndarray:
    """A real array of the given shape, finite everywhere (and > 0 if ``positive``)."""
    arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if arr is None or arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise InputTypeError(f"{where}: expected an array of numbers, got {type(value).__name__} {short(value)}")
    if arr.shape != shape:
        raise InputError(f"{where}: shape {arr.shape}, expected {shape}")
    bad = np.argwhere(~np.isfinite(arr) | ((arr <= 0) if positive else False))
    if bad.size:
        index = tuple(bad[0].tolist())
        raise InputError(f"{where}: {arr[index]} at index {index}; expected "
                         f"{'positive ' if positive else ''}finite numbers")
    return arr


def _vector(value, where: str, n: int) -> np.ndarray:
    """n numbers as an array of shape (n,) or (n, 1) / (1, n) (deepmd-kit stores both), finite."""
    shape = np.shape(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    ok = shape is not None and int(np.prod(shape)) == n and len(shape) in (1, 2)
    return _array(value, where, shape if ok else (n,)).reshape(n)


def _optional(d: dict, key: str, check, where: str, *args):
    """check(d[key]) when the key is present and not None."""
    return None if d.get(key) is None else check(f"{where}.{key}", d[key], *args)


def _one_of(value, where: str, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{where}: {short(value)} is not supported; minidp reads {' or '.join(map(repr, allowed))}")


def _activation(where: str, value) -> None:

    if not isinstance(value, str):
        raise InputTypeError(f"{where}: expected the name of an activation, got {short(value)}")
    try:
        get_activation(value)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


def _type_pairs(where: str, value, ntypes: int) -> tuple[tuple[int, int], ...]:
    """A list of pairs [ti, tj] of types in 0..ntypes-1 (exclude_types, pair_exclude_types)."""
    if not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{where}: expected a list of pairs of types, got {type(value).__name__} {short(value)}")
    for k, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError(f"{where}[{k}]: {short(pair)} is not a pair of types [ti, tj]")
        for t in pair:
            integer(f"{where}[{k}]", t, 0)
            if t >= ntypes:
                raise InputError(f"{where}[{k}]: type {t} is not a type of model.type_map (0..{ntypes - 1})")
    return tuple(tuple(int(t) for t in pair) for pair in value)


# ---------------------------------------------------------------------------
# Nets, descriptor, fitting, model
# ---------------------------------------------------------------------------


def check_net(net, where: str, n_in: int, widths: tuple[int, ...]) -> None:
    """A Net dict: one layer per width; layer k's w (n_{k-1}, n_k), b and idt (n_k,), all finite."""
    layers = _key(net, "layers", where)
    if not isinstance(layers, list) or len(layers) != len(widths):
        n = len(layers) if isinstance(layers, list) else short(layers)
        raise InputError(f"{where}.layers: {n} layers, expected {len(widths)} (widths {list(widths)})")
    for k, (layer, n_out) in enumerate(zip(layers, widths)):
        lw = f"{where}.layers[{k}]"
        v = _mapping(_key(layer, "@variables", lw), f"{lw}.@variables")
        _array(_key(v, "w", f"{lw}.@variables"), f"{lw}.@variables.w", (n_in, n_out))
        # a layer says whether it has a bias and a timestep: one missing or unasked for is a damaged file
        for name, flag, default in (("b", "bias", True), ("idt", "use_timestep", None)):
            wanted = _optional(layer, flag, boolean, lw)
            wanted = default if wanted is None else wanted
            if wanted is not None and (v.get(name) is not None) != wanted:
                raise InputError(f"{lw}.@variables.{name}: {'missing' if wanted else 'present'} "
                                 f"but the layer's {flag} is {str(wanted).lower()}")
            if v.get(name) is not None:
                _vector(v[name], f"{lw}.@variables.{name}", n_out)
        # deepmd-kit writes both for every layer; a default would silently change the net
        _activation(f"{lw}.activation_function", _key(layer, "activation_function", lw))
        boolean(f"{lw}.resnet", _key(layer, "resnet", lw))
        n_in = n_out


def check_descriptor(d, ntypes: int, pair_exclude_types=(), ne: int = 0) -> SeAConfig:
    """model.descriptor: its hyper-parameters (SeAConfig's own rules), nets and davg/dstd; the model's
    pair_exclude_types (checked by the caller) go into the configuration with them. ne > 0: the model's
    type embedding width, and one shared net reads [s, e_j] or [s, e_j, e_i] (minidp.type_embed)."""
    where = "model.descriptor"
    _one_of(_key(d, "type", where), f"{where}.type", ("se_e2_a", "se_a"))
    kwargs = {name: _optional(d, key, check, where) for name, key, check in (
        ("type_one_side", "type_one_side", boolean), ("resnet_dt", "resnet_dt", boolean),
        ("set_davg_zero", "set_davg_zero", boolean))}
    exclude_types = _optional(d, "exclude_types", _type_pairs, where, ntypes) or ()
    env_protection = _optional(d, "env_protection", number, where) or 0.0
    _optional(d, "activation_function", _activation, where)
    if "env_mat" in d:
        _optional(_mapping(d["env_mat"], f"{where}.env_mat"), "use_exp_switch", boolean, f"{where}.env_mat")
    cfg = validated(
        where, SeAConfig,
        rcut=number(f"{where}.rcut", _key(d, "rcut", where)),
        rcut_smth=number(f"{where}.rcut_smth", _key(d, "rcut_smth", where)),
        sel=integers(f"{where}.sel", _key(d, "sel", where), ntypes, "one per type of model.type_map"),
        neuron=integers(f"{where}.neuron", _key(d, "neuron", where)),
        axis_neuron=integer(f"{where}.axis_neuron", _key(d, "axis_neuron", where)),
        type_one_side=True if kwargs["type_one_side"] is None else kwargs["type_one_side"],
        activation=d.get("activation_function", "tanh"), resnet_dt=bool(kwargs["resnet_dt"]),
        exclude_types=exclude_types, env_protection=env_protection, set_davg_zero=bool(kwargs["set_davg_zero"]),
        pair_exclude_types=pair_exclude_types)
    nets = _key(_key(d, "embeddings", where), "networks", f"{where}.embeddings")
    expected = 1 if ne else ntypes if cfg.type_one_side else ntypes * ntypes
    if not isinstance(nets, list) or len(nets) != expected:
        raise InputError(f"{where}.embeddings.networks: {len(nets) if isinstance(nets, list) else short(nets)} nets, "
                         f"expected {expected} (one per "
                         f"{'model' if ne else 'type' if cfg.type_one_side else 'pair of types'})")
    n_in = 1 + ne * (1 if cfg.type_one_side else 2)
    for k, net in enumerate(nets):
        check_net(net, f"{where}.embeddings.networks[{k}]", n_in, cfg.neuron)
    v = _key(d, "@variables", where)
    # (ntypes, nnei, 4) both; dstd divides the environment matrix: zero or negative is never right
    _array(_key(v, "davg", f"{where}.@variables"), f"{where}.@variables.davg", (ntypes, cfg.nnei, 4))
    _array(_key(v, "dstd", f"{where}.@variables"), f"{where}.@variables.dstd", (ntypes, cfg.nnei, 4), positive=True)
    if d.get("compress") is not None and d.get("compress") is not False:
        check_compress(d["compress"], cfg, ntypes)
    return cfg


def check_compress(c, cfg: SeAConfig, ntypes: int) -> None:
    """model.descriptor.compress: one table per embedding net (per neighbour type with type_one_side, else per
    pair of types; with a type embedding, per folded net), in deepmd-kit's layout.

    compress_info[k] (6,): lower < upper < table_max, strides > 0, whole grids
    (:func:`minidp.compress.grid_counts`), an integer check frequency; compress_data[k]
    (nspline, 6 * ng) with nspline the pieces compress_info[k] makes, every coefficient
    finite. The rules are :class:`minidp.compress.Table`'s, prefixed with the key.
    """
    where = "model.descriptor.compress.@variables"
    v = _mapping(_key(_mapping(c, "model.descriptor.compress"), "@variables", "model.descriptor.compress"), where)
    expected = ntypes if cfg.type_one_side else ntypes * ntypes
    lists = [_key(v, name, where) for name in ("compress_data", "compress_info")]
    for name, value in zip(("compress_data", "compress_info"), lists):
        if not isinstance(value, list) or len(value) != expected:
            n = len(value) if isinstance(value, list) else short(value)
            raise InputError(f"{where}.{name}: {n} tables, expected {expected} (one per "
                             f"{'neighbour type' if cfg.type_one_side else 'pair of types'})")
    for k, (data, info) in enumerate(zip(*lists)):
        iw, dw = f"{where}.compress_info[{k}]", f"{where}.compress_data[{k}]"
        if np.size(data) == 0:  # deepmd-kit skips an excluded pair's net; compress.Compression checks the pair
            continue
        info = _vector(info, iw, 6)
        # (nspline, 6 * ng): the rows the bounds make
        n_first, n_second = validated(iw, grid_counts, lower=info[0], upper=info[1], table_max=info[2],
                                      stride0=info[3], stride1=info[4])
        _array(data, dw, (n_first + n_second, 6 * cfg.ng))
        validated(iw, Table.from_deepmd, data=data, info=info)


def check_bias(where: str, value, ntypes: int) -> np.ndarray:
    """ntypes per-atom energy biases (ntypes,): finite, within +-MAX_BIAS (see there)."""
    bias = _vector(value, where, ntypes)
    bad = np.flatnonzero(np.abs(bias) > MAX_BIAS)
    if bad.size:
        raise InputError(f"{where}: {bias[bad[0]]:g} at index {int(bad[0])} is beyond +-{MAX_BIAS:g}; expected a "
                         "per-atom energy")
    return bias


def min_nbor_dist(data, source: str = "the model file") -> float | None:
    """The smallest neighbour distance a model file carries, or None: the one reader of it.

    deepmd-kit writes it in the file's top-level @variables (a number, or an
    array of one); it must be a finite positive number. InputError or
    InputTypeError names ``source`` (the file) and the key.
    """
    where = f"{source}: @variables.min_nbor_dist"
    v = data.get("@variables") if isinstance(data, dict) else None
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InputTypeError(f"{source}: @variables: expected a mapping, got {type(v).__name__} {short(v)}")
    value = v.get("min_nbor_dist")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    elif isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return None if value is None else number(where, value, positive=True)


def _type_list(where: str, value, ntypes: int) -> list[int]:
    """A list of atom types in 0..ntypes-1 (atom_exclude_types)."""
    if not isinstance(value, list):
        raise InputTypeError(f"{where}: expected a list of atom types, got {type(value).__name__} {short(value)}")
    types = [integer(f"{where}[{k}]", t, lo=0) for k, t in enumerate(value)]
    if any(t >= ntypes for t in types):
        raise InputError(f"{where}: type {max(types)} is not among the {ntypes} types of model.type_map")
    return types


def _atom_ener(where: str, value) -> None:
    """deepmd-kit's atom_ener: a list of numbers or nulls (only which entries are null matters here)."""
    if not isinstance(value, list):
        raise InputTypeError(f"{where}: expected a list of numbers or nulls, got {type(value).__name__} "
                             f"{short(value)}")
    for k, e in enumerate(value):
        if e is not None:
            number(f"{where}[{k}]", e)


# the key that says how many numbers each array of the fitting's @variables holds
_WHY = {"fparam_avg": "numb_fparam", "fparam_inv_std": "numb_fparam", "aparam_avg": "numb_aparam",
        "aparam_inv_std": "numb_aparam", "case_embd": "dim_case_embd"}


def check_fitting_inputs(d: dict, where: str) -> int:
    """numb_fparam, numb_aparam, dim_case_embd, default_fparam, use_aparam_as_mask and the arrays they
    need in @variables: the numbers the nets read besides the descriptor (the width returned)."""
    nfp, nap, nce = (0 if d.get(k) is None else integer(f"{where}.{k}", d[k], lo=0)
                     for k in ("numb_fparam", "numb_aparam", "dim_case_embd"))
    mask = bool(_optional(d, "use_aparam_as_mask", boolean, where))
    v = _mapping(_key(d, "@variables", where), f"{where}.@variables")
    # a TensorFlow graph with use_aparam_as_mask keeps no aparam statistics (it needs none)
    for name, n, required in (("fparam_avg", nfp, True), ("fparam_inv_std", nfp, True),
                              ("aparam_avg", nap, not mask), ("aparam_inv_std", nap, not mask),
                              ("case_embd", nce, True)):
        if n and v.get(name) is not None:
            _vector(v[name], f"{where}.@variables.{name}", n)
        elif n and required:
            raise InputError(f"{where}.@variables.{name}: missing; expected {n} numbers "
                             f"({_WHY[name]} is {n})")
    if d.get("default_fparam") is not None:
        default = _vector(d["default_fparam"], f"{where}.default_fparam", nfp)
        stored = v.get("default_fparam_tensor")
        if stored is not None and not np.array_equal(_vector(stored, f"{where}.@variables.default_fparam_tensor",
                                                             nfp), default):
            raise InputError(f"{where}.@variables.default_fparam_tensor: {np.ravel(stored).tolist()} differs "
                             f"from {where}.default_fparam {default.tolist()}")
    _optional(d, "atom_ener", _atom_ener, where)
    return nfp + (0 if mask else nap) + nce


def check_fitting(d, ntypes: int, dim_descrpt: int, ne: int = 0) -> None:
    """model.fitting: an energy fitting, one net per type from dim_descrpt (ng * m2) plus the frame and
    atomic parameters and the case embedding (:func:`check_fitting_inputs`) to 1, the bias. ne > 0: one
    net for all types, reading the type embedding's ne numbers too."""
    where = "model.fitting"
    _one_of(_key(d, "type", where), f"{where}.type", ("ener",))
    if "var_name" in d:
        _one_of(d["var_name"], f"{where}.var_name", ("energy",))
    _optional(d, "resnet_dt", boolean, where)
    if d.get("dim_descrpt") is not None and integer(f"{where}.dim_descrpt", d["dim_descrpt"]) != dim_descrpt:
        raise InputError(f"{where}.dim_descrpt: {d['dim_descrpt']}, expected {dim_descrpt} "
                         "(the descriptor's neuron[-1] * axis_neuron)")
    n_in = dim_descrpt + ne + check_fitting_inputs(d, where)
    nets = _key(_key(d, "nets", where), "networks", f"{where}.nets")
    if not isinstance(nets, list) or len(nets) != (1 if ne else ntypes):
        raise InputError(f"{where}.nets.networks: {len(nets) if isinstance(nets, list) else short(nets)} nets, "
                         f"expected {1 if ne else ntypes} (one per {'model' if ne else 'type of model.type_map'})")
    # the hidden widths: deepmd-kit writes them as fitting.neuron (the nets are checked against them)
    hidden = integers(f"{where}.neuron", _key(d, "neuron", where)) if d.get("neuron") != [] else ()
    for k, net in enumerate(nets):
        nw = f"{where}.nets.networks[{k}]"
        check_net(net, nw, n_in, hidden + (1,))
    v = _key(d, "@variables", where)
    check_bias(f"{where}.@variables.bias_atom_e", _key(v, "bias_atom_e", f"{where}.@variables"), ntypes)


def check_type_embedding(d, ntypes: int) -> int:
    """model.minidp_type_embedding (minidp's own key, minidp.type_embed): a net from ntypes one-hot numbers
    to ne; returns ne, or 0 when the model has none."""
    if d is None:
        return 0
    where = f"model.{TEBD_KEY}"
    d = _mapping(d, where)
    neuron = integers(f"{where}.neuron", _key(d, "neuron", where))
    _optional(d, "activation_function", _activation, where)
    check_net(_key(d, "network", where), f"{where}.network", ntypes, neuron)
    return neuron[-1]


def check_model_dict(data, source: str) -> None:
    """Raise InputError / InputTypeError ("<source>: <key path>: <problem>") unless ``data`` holds an
    se_e2_a energy model minidp can build, every value it reads of the right type, shape and finite."""
    try:
        m = _key(_mapping(data, "the file"), "model", "the file")
        m = _mapping(m, "model")
        type_map = names("model.type_map", _key(m, "type_map", "model"))
        pair_exclude_types = _optional(m, "pair_exclude_types", _type_pairs, "model", len(type_map)) or ()
        ne = check_type_embedding(m.get(TEBD_KEY), len(type_map))
        cfg = check_descriptor(_key(m, "descriptor", "model"), len(type_map), pair_exclude_types, ne)
        check_fitting(_key(m, "fitting", "model"), len(type_map), cfg.dim_out, ne)
        _optional(m, "atom_exclude_types", _type_list, "model", len(type_map))
        v = m.get("@variables") or {}
        if _mapping(v, "model.@variables").get("out_bias") is not None:
            # (noutputs, ntypes, 1): the energy's row is the first
            rows = np.shape(v["out_bias"])[0] if np.ndim(v["out_bias"]) == 3 else 1
            out_bias = _array(v["out_bias"], "model.@variables.out_bias", (rows, len(type_map), 1))
            check_bias("model.@variables.out_bias[0]", out_bias[0], len(type_map))
    except InputTypeError as err:
        raise InputTypeError(f"{source}: {err}") from None
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    min_nbor_dist(data, source)
