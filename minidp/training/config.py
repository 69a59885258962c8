"""The training input: deepmd-kit's input.json read key by key into frozen configurations,
every value checked before any data is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidp.active.neighbor_stat import auto_sel, neighbor_stat
from minidp.checks import (
    InputError,
    InputTypeError,
    boolean,
    file_path,
    integer,
    integers,
    is_positive_int,
    names,
    number,
    positive_int,
    short,
    validated,
)
from minidp.se_e2_a import SeAConfig
from minidp.training.loss import LossConfig
from minidp.training.sampling import system_probs

# ---------------------------------------------------------------------------
# 1. The input
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """training_data / validation_data."""

    systems: tuple[Path, ...]  # deepmd/npy folders, resolved against the input file's folder
    batch_size: int | str | tuple[int, ...]  # frames per batch, one per system, or "auto" / "auto:N" (N = 32)
    numb_btch: int = 1  # validation: batches evaluated at each display
    sys_probs: tuple[float, ...] | None = None  # probability of each system (negative: shared by the rest)
    auto_prob: str = "prob_sys_size"  # without sys_probs: prob_uniform, prob_sys_size or prob_sys_size;A:B:P;...

    def __post_init__(self):
        if not self.systems:
            raise ValueError("training data: systems is empty; expected at least one system folder")
        sizes = self.batch_size if isinstance(self.batch_size, tuple) else (self.batch_size,)
        if isinstance(self.batch_size, tuple) and len(sizes) != len(self.systems):
            raise ValueError(f"training data: batch_size lists {len(sizes)} sizes for {len(self.systems)} systems")
        for bs in sizes:
            _batch_size("batch_size", bs)
        positive_int("numb_btch", self.numb_btch)


@dataclass(frozen=True)
class TrainConfig:
    """What a run needs, from deepmd-kit's input.json."""

    type_map: tuple[str, ...]  # element of each atom type
    descriptor: SeAConfig  # the se_e2_a hyper-parameters
    fitting_neuron: tuple[int, ...]  # fitting-net widths
    fitting_resnet_dt: bool  # fitting nets carry a resnet timestep
    model_seed: int  # initial weights
    start_lr: float  # learning rate at step 0
    stop_lr: float  # ... reached at numb_steps
    decay_steps: int  # the rate drops every decay_steps
    loss: LossConfig  # prefactors of the energy, force and virial terms
    training: DataConfig  # training systems
    validation: DataConfig | None  # validation systems, or None
    numb_steps: int  # updates
    seed: int  # batch sampling
    disp_file: str  # learning-curve file
    disp_freq: int  # steps between its lines
    save_freq: int  # steps between checkpoints
    save_ckpt: str  # checkpoint prefix: <save_ckpt>-<step>.dp / .npz
    data_stat_nbatch: int  # batches per system for the statistics

    def __post_init__(self):
        if not isinstance(self.descriptor, SeAConfig) or not isinstance(self.loss, LossConfig):
            raise TypeError("TrainConfig: descriptor must be an SeAConfig and loss a LossConfig")
        if len(self.type_map) != self.descriptor.ntypes or not all(isinstance(t, str) for t in self.type_map):
            raise ValueError(f"type_map must hold one element name per sel entry ({self.descriptor.ntypes}), "
                             f"got {list(self.type_map)!r}")
        for name in ("decay_steps", "numb_steps", "disp_freq", "save_freq", "data_stat_nbatch"):
            positive_int(name, getattr(self, name))
        if not self.fitting_neuron or not all(is_positive_int(n) for n in self.fitting_neuron):
            raise ValueError(f"fitting_net neuron must be a non-empty list of positive integers, "
                             f"got {list(self.fitting_neuron)!r}")
        for name in ("start_lr", "stop_lr"):
            number(f"learning_rate {name}", getattr(self, name), positive=True)
        if self.stop_lr > self.start_lr:
            raise ValueError(f"learning_rate must satisfy 0 < stop_lr <= start_lr, got start_lr={self.start_lr!r} "
                             f"and stop_lr={self.stop_lr!r}")


# What minidp reads of each section; anything else is refused by name.
# Keys starting with "_" are comments, as in deepmd-kit's examples.
KEYS = {
    "": {"model", "learning_rate", "loss", "training"},
    "model": {"type_map", "descriptor", "fitting_net", "data_stat_nbatch"},
    "model/descriptor": {"type", "sel", "rcut", "rcut_smth", "neuron", "axis_neuron", "resnet_dt",
                         "type_one_side", "precision", "seed", "activation_function", "set_davg_zero"},
    "model/fitting_net": {"type", "neuron", "resnet_dt", "precision", "seed", "activation_function"},
    "learning_rate": {"type", "start_lr", "stop_lr", "decay_steps"},
    "loss": {"type", "start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v"},
    "training": {"training_data", "validation_data", "numb_steps", "seed", "disp_file", "disp_freq",
                 "save_freq", "save_ckpt"},
    "training/training_data": {"systems", "batch_size", "sys_probs", "auto_prob", "auto_prob_style"},
    "training/validation_data": {"systems", "batch_size", "numb_btch", "sys_probs", "auto_prob", "auto_prob_style"},
}
# The one value these keys may take.
FIXED = {"model/descriptor/type": ("se_e2_a", "se_a"), "model/fitting_net/type": ("ener",),
         "learning_rate/type": ("exp",), "loss/type": ("ener",), "model/descriptor/precision": ("float64", "default"),
         "model/fitting_net/precision": ("float64", "default"),
         "model/descriptor/activation_function": ("tanh",), "model/fitting_net/activation_function": ("tanh",)}


def _section(d: dict, where: str) -> dict:
    """The section at path ``where``, checked: a dict, no unknown keys, fixed values as allowed."""
    node = d
    for part in [p for p in where.split("/") if p]:
        node = node.get(part)
        if not isinstance(node, dict):
            raise ValueError(f"input: {where} must be a section (a JSON object), got {node!r}")
    unknown = sorted(k for k in node if not k.startswith("_") and k not in KEYS[where])
    if unknown:
        raise ValueError(f"input: unsupported key(s) {unknown} in {where or 'the top level'}; "
                         f"minidp reads {sorted(KEYS[where])}")
    for key, allowed in FIXED.items():
        sec, _, name = key.rpartition("/")
        if sec == where and name in node and node[name] not in allowed:
            raise ValueError(f"input: {key} = {node[name]!r} is not supported; expected one of {list(allowed)}")
    return node


def _value(sec: dict, where: str, key: str, check, default=None, *args):
    """sec[key] checked by ``check`` (minidp.checks: no coercion), named input: <where>/<key>; the
    default (unchecked) when the key is absent, or an error when the default is None."""
    if key not in sec:
        if default is None:
            raise InputError(f"input: {where}/{key} is required")
        return default
    return check(f"input: {where}/{key}", sec[key], *args)


def _text(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise InputTypeError(f"{name}: expected a non-empty string, got {type(value).__name__} {short(value)}")
    return value


def _batch_size(name: str, value) -> int | str:
    """A positive integer, "auto" or "auto:N" with N a positive integer."""
    if isinstance(value, str) and value.startswith("auto"):
        n = value[len("auto:"):] if value.startswith("auto:") else "32" if value == "auto" else ""
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"{name}: {value!r}; expected a positive integer, \"auto\" or \"auto:N\" (N atoms)")
        return value
    return positive_int(name, value)


def _data_config(sec: dict, where: str, base: Path) -> DataConfig:
    systems = sec.get("systems")
    systems = [systems] if isinstance(systems, str) else systems
    if not systems or not isinstance(systems, list) or not all(isinstance(s, str) and s for s in systems):
        raise ValueError(f"input: {where}/systems must be a path or a list of paths, got {short(sec.get('systems'))}")
    bs = sec.get("batch_size", "auto")
    if isinstance(bs, list):
        if len(bs) != len(systems):
            raise ValueError(f"input: {where}/batch_size lists {len(bs)} sizes for {len(systems)} systems")
        bs = tuple(positive_int(f"input: {where}/batch_size[{k}]", b) for k, b in enumerate(bs))
    else:
        bs = _value(sec, where, "batch_size", _batch_size, "auto")
    probs = sec.get("sys_probs")
    if probs is not None:
        if not isinstance(probs, list) or len(probs) != len(systems):
            raise ValueError(f"input: {where}/sys_probs must list one number per system ({len(systems)}), "
                             f"got {short(probs)}")
        probs = tuple(number(f"input: {where}/sys_probs[{k}]", p) for k, p in enumerate(probs))
    style = _value(sec, where, "auto_prob_style", _text, "prob_sys_size")  # deepmd-kit's older name
    auto_prob = _value(sec, where, "auto_prob", _text, style)
    try:
        system_probs(np.ones(len(systems)), probs, auto_prob)  # a bad auto_prob / sys_probs, before any data
    except InputError as err:
        raise InputError(f"input: {where}/{err}") from None
    return DataConfig(tuple(base / s for s in systems), bs, _value(sec, where, "numb_btch", positive_int, 1),
                      probs, auto_prob)


def _descriptor_config(d: dict) -> SeAConfig:
    w = "model/descriptor"
    sel = d.get("sel")
    if isinstance(sel, str):
        raise ValueError(f"input: {w}/sel = {sel!r} is not supported; expected a list of positive integers "
                         "(neighbour slots per type)")
    return validated(f"input: {w}", SeAConfig,
                     rcut=_value(d, w, "rcut", number, None, None, True),
                     rcut_smth=_value(d, w, "rcut_smth", number, 0.5, 0.0),
                     sel=_value(d, w, "sel", integers), neuron=_value(d, w, "neuron", integers, (10, 20, 40)),
                     axis_neuron=_value(d, w, "axis_neuron", positive_int, 4),
                     type_one_side=_value(d, w, "type_one_side", boolean, False),
                     resnet_dt=_value(d, w, "resnet_dt", boolean, False),
                     set_davg_zero=_value(d, w, "set_davg_zero", boolean, False))


def _seed(name: str, value) -> int:
    return 0 if value is None else integer(name, value, 0)


def _auto_sel(desc: dict, model: dict, tr: dict, base: Path) -> list[int]:
    """sel "auto" / "auto:FACTOR": deepmd-kit's rule on the largest neighbour counts of the training systems."""

    try:
        auto_sel(desc["sel"], [])  # a bad spelling is refused before the data are read
    except ValueError as err:
        raise InputError(f"input: model/descriptor/sel: {err}") from None
    if "rcut" not in desc or "type_map" not in model:
        raise ValueError("input: sel 'auto' needs model/descriptor/rcut and model/type_map")
    systems = tr.get("training_data", {}).get("systems")
    systems = [systems] if isinstance(systems, str) else list(systems or [])
    stat = neighbor_stat([base / s for s in systems], float(desc["rcut"]), list(model["type_map"]), progress=False)
    return auto_sel(desc["sel"], stat.max_nbor_size)


def parse_input(d: dict, base: Path = Path(".")) -> TrainConfig:
    """A TrainConfig from deepmd-kit's input dict; relative system paths are taken from ``base``.

    Every value is checked against its key's type and range here, before any data is read: an
    error names the key path and the value; strings are never read as numbers or booleans.
    """
    if not isinstance(d, dict):
        raise InputTypeError(f"input must be a JSON object, got {type(d).__name__}")
    for where in KEYS:
        if where == "training/validation_data" and "validation_data" not in d.get("training", {}):
            continue
        _section(d, where)
    model, tr = d["model"], d["training"]
    desc, fit, lr, loss = model["descriptor"], model["fitting_net"], d["learning_rate"], d["loss"]
    if "type_map" not in model:
        raise ValueError("input: model/type_map is required (the element of each type)")
    type_map = names("input: model/type_map", model["type_map"])
    if isinstance(desc.get("sel"), str):
        desc = {**desc, "sel": _auto_sel(desc, model, tr, base)}
    cfg = _descriptor_config(desc)
    if len(type_map) != cfg.ntypes:
        raise ValueError(f"input: type_map {type_map} has {len(type_map)} types but sel has {cfg.ntypes}")
    if "numb_steps" not in tr:
        raise ValueError("input: training/numb_steps is required")
    _value(fit, "model/fitting_net", "seed", _seed, 0)  # checked, though the model's seed is the descriptor's
    return TrainConfig(
        type_map=tuple(type_map), descriptor=cfg,
        fitting_neuron=_value(fit, "model/fitting_net", "neuron", integers, (120, 120, 120)),
        fitting_resnet_dt=_value(fit, "model/fitting_net", "resnet_dt", boolean, True),
        model_seed=_value(desc, "model/descriptor", "seed", _seed, 0),
        start_lr=_value(lr, "learning_rate", "start_lr", number, 1e-3, None, True),
        stop_lr=_value(lr, "learning_rate", "stop_lr", number, 1e-8, None, True),
        decay_steps=_value(lr, "learning_rate", "decay_steps", positive_int, 5000),
        loss=LossConfig(**{k: _value(loss, "loss", k, number, None, 0.0) for k in loss if k in KEYS["loss"] - {"type"}}),
        training=_data_config(tr["training_data"], "training/training_data", base),
        validation=_data_config(tr["validation_data"], "training/validation_data", base) if "validation_data" in tr else None,
        numb_steps=_value(tr, "training", "numb_steps", positive_int), seed=_value(tr, "training", "seed", _seed, 0),
        disp_file=_value(tr, "training", "disp_file", _text, "lcurve.out"),
        disp_freq=_value(tr, "training", "disp_freq", positive_int, 1000),
        save_freq=_value(tr, "training", "save_freq", positive_int, 1000),
        save_ckpt=_value(tr, "training", "save_ckpt", _text, "model.ckpt"),
        data_stat_nbatch=_value(model, "model", "data_stat_nbatch", positive_int, 10),
    )


def read_input(path) -> TrainConfig:
    """parse_input of a JSON file, its systems relative to the file's folder."""
    path = file_path("input", path, "a JSON file")
    if path.is_dir():
        raise InputError(f"input file {path} is a folder; expected a JSON file (deepmd-kit's input.json)")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"input file {path} is not valid JSON: {err}") from None
    return parse_input(d, path.parent)
