r"""Checking a deepmd-kit model dict before minidp builds anything from it.

:func:`minidp.serialization.load_model` reads every format (.dp, .yaml,
.json; .pb/.pth after deepmd-kit's conversion) into one nested dict and hands
it to :func:`check_model_dict` first. Every key minidp reads is checked there,
once: presence, type (a bool is a bool, a width an int), shape (each array
against ntypes, nnei and the neuron widths) and finiteness (no NaN/inf in a
weight, bias, davg or dstd; dstd > 0, since the environment matrix is divided
by it). The first problem is raised, naming the file and the key path:

    water.dp: model.descriptor.@variables.dstd: shape (2, 138, 1), expected (2, 138, 4)

as :class:`~minidp.checks.InputError` (a ValueError), or
:class:`~minidp.checks.InputTypeError` (also a TypeError) for a value of the
wrong type. Keys minidp does not read are not looked at. The value-range rules
of the descriptor (rcut_smth < rcut, axis_neuron <= ng, ...) belong to
:class:`~minidp.se_e2_a.SeAConfig`; its ValueError is passed on here with the
file and key path in front, not written twice.

Shape symbols (see :mod:`minidp.se_e2_a`): ``ntypes``, ``nnei`` (sum of sel),
``ng`` (neuron[-1]), ``m2`` (axis_neuron); a net's layer k maps n_{k-1} to n_k.
"""

from __future__ import annotations

import numpy as np

from minidp.checks import (InputError, InputTypeError, boolean, integer, integers, names, number, short,
                           validated)
from minidp.se_e2_a import SeAConfig


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
    from minidp.nn import get_activation

    if not isinstance(value, str):
        raise InputTypeError(f"{where}: expected the name of an activation, got {short(value)}")
    try:
        get_activation(value)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


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


def check_descriptor(d, ntypes: int) -> SeAConfig:
    """model.descriptor: its hyper-parameters (SeAConfig's own rules), nets and davg/dstd."""
    where = "model.descriptor"
    _one_of(_key(d, "type", where), f"{where}.type", ("se_e2_a", "se_a"))
    kwargs = {name: _optional(d, key, check, where) for name, key, check in (
        ("type_one_side", "type_one_side", boolean), ("resnet_dt", "resnet_dt", boolean))}
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
        activation=d.get("activation_function", "tanh"), resnet_dt=bool(kwargs["resnet_dt"]))
    nets = _key(_key(d, "embeddings", where), "networks", f"{where}.embeddings")
    expected = ntypes if cfg.type_one_side else ntypes * ntypes
    if not isinstance(nets, list) or len(nets) != expected:
        raise InputError(f"{where}.embeddings.networks: {len(nets) if isinstance(nets, list) else short(nets)} nets, "
                         f"expected {expected} (one per {'type' if cfg.type_one_side else 'pair of types'})")
    for k, net in enumerate(nets):
        check_net(net, f"{where}.embeddings.networks[{k}]", 1, cfg.neuron)
    v = _key(d, "@variables", where)
    # (ntypes, nnei, 4) both; dstd divides the environment matrix: zero or negative is never right
    _array(_key(v, "davg", f"{where}.@variables"), f"{where}.@variables.davg", (ntypes, cfg.nnei, 4))
    _array(_key(v, "dstd", f"{where}.@variables"), f"{where}.@variables.dstd", (ntypes, cfg.nnei, 4), positive=True)
    return cfg


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


def check_fitting(d, ntypes: int, dim_descrpt: int) -> None:
    """model.fitting: an energy fitting, one net per type from dim_descrpt (ng * m2) plus the frame and
    atomic parameters and the case embedding (:func:`check_fitting_inputs`) to 1, the bias."""
    where = "model.fitting"
    _one_of(_key(d, "type", where), f"{where}.type", ("ener",))
    if "var_name" in d:
        _one_of(d["var_name"], f"{where}.var_name", ("energy",))
    _optional(d, "resnet_dt", boolean, where)
    if d.get("dim_descrpt") is not None and integer(f"{where}.dim_descrpt", d["dim_descrpt"]) != dim_descrpt:
        raise InputError(f"{where}.dim_descrpt: {d['dim_descrpt']}, expected {dim_descrpt} "
                         "(the descriptor's neuron[-1] * axis_neuron)")
    n_in = dim_descrpt + check_fitting_inputs(d, where)
    nets = _key(_key(d, "nets", where), "networks", f"{where}.nets")
    if not isinstance(nets, list) or len(nets) != ntypes:
        raise InputError(f"{where}.nets.networks: {len(nets) if isinstance(nets, list) else short(nets)} nets, "
                         f"expected {ntypes} (one per type of model.type_map)")
    # the hidden widths: deepmd-kit writes them as fitting.neuron (the nets are checked against them)
    hidden = integers(f"{where}.neuron", _key(d, "neuron", where)) if d.get("neuron") != [] else ()
    for k, net in enumerate(nets):
        nw = f"{where}.nets.networks[{k}]"
        check_net(net, nw, n_in, hidden + (1,))
    v = _key(d, "@variables", where)
    bias = _key(v, "bias_atom_e", f"{where}.@variables")
    _vector(bias, f"{where}.@variables.bias_atom_e", ntypes)


def check_model_dict(data, source: str) -> None:
    """Raise InputError / InputTypeError ("<source>: <key path>: <problem>") unless ``data`` holds an
    se_e2_a energy model minidp can build, every value it reads of the right type, shape and finite."""
    try:
        m = _key(_mapping(data, "the file"), "model", "the file")
        m = _mapping(m, "model")
        type_map = names("model.type_map", _key(m, "type_map", "model"))
        cfg = check_descriptor(_key(m, "descriptor", "model"), len(type_map))
        check_fitting(_key(m, "fitting", "model"), len(type_map), cfg.dim_out)
        _optional(m, "atom_exclude_types", _type_list, "model", len(type_map))
        v = m.get("@variables") or {}
        if _mapping(v, "model.@variables").get("out_bias") is not None:
            # (noutputs, ntypes, 1): the energy's row is the first
            rows = np.shape(v["out_bias"])[0] if np.ndim(v["out_bias"]) == 3 else 1
            _array(v["out_bias"], "model.@variables.out_bias", (rows, len(type_map), 1))
    except InputTypeError as err:
        raise InputTypeError(f"{source}: {err}") from None
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
