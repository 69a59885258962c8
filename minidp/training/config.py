"""The training input: deepmd-kit's input.json read key by key into frozen configurations,
every value checked before any data is read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields, replace
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
from minidp.model import FittingInput
from minidp.nn import COMPUTE_PRECISIONS, get_activation
from minidp.optim import AdamConfig, LRSchedule, adam_config, lr_schedule
from minidp.se_e2_a import SeAConfig
from minidp.training.loss import LossConfig
from minidp.training.sampling import (
    data_type_map,
    epoch_steps,
    system_probs,
    training_systems,
)

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
    rglob_patterns: tuple[str, ...] | None = None  # the glob patterns a folder is searched with (None: every folder)

    def __post_init__(self):
        if not self.systems:
            raise ValueError("training data: systems is empty; expected at least one system folder")
        sizes = self.batch_size if isinstance(self.batch_size, tuple) else (self.batch_size,)
        if isinstance(self.batch_size, tuple) and len(sizes) != len(self.systems):
            raise ValueError(f"training data: batch_size lists {len(sizes)} sizes for {len(self.systems)} systems")
        if self.sys_probs is not None and len(self.sys_probs) != len(self.systems):
            raise ValueError(f"training data: sys_probs lists {len(self.sys_probs)} probabilities for "
                             f"{len(self.systems)} systems")
        for bs in sizes:
            _batch_size("batch_size", bs)
        positive_int("numb_btch", self.numb_btch)


@dataclass(frozen=True)
class MixedPrecision:
    """training/mixed_precision, deepmd-kit's meaning: the nets' weights (the master copy the optimizer
    updates) and their outputs in ``output_prec``; their products on inputs and weights rounded to
    ``compute_prec`` (docs/training.md "Mixed precision"; minidp.nn.with_compute).

    deepmd-kit 3.2's TF trainer accepts output_prec float32 only; minidp also runs float64 (its
    water example asks for it), where the products accumulate in float64.
    """

    compute_prec: str  # float16 or bfloat16
    output_prec: str = "float32"  # float32 or float64

    def __post_init__(self):
        if self.compute_prec not in COMPUTE_PRECISIONS:
            raise InputError(f"input: training/mixed_precision/compute_prec = {short(self.compute_prec)} is not "
                             f"supported; expected one of {list(COMPUTE_PRECISIONS)}")
        if self.output_prec not in OUTPUT_PRECISIONS:
            raise InputError(f"input: training/mixed_precision/output_prec = {short(self.output_prec)} is not "
                             f"supported; expected one of {list(OUTPUT_PRECISIONS)}")


@dataclass(frozen=True)
class TrainConfig:
    """What a run needs, from deepmd-kit's input.json."""

    type_map: tuple[str, ...]  # element of each atom type
    descriptor: SeAConfig  # the se_e2_a hyper-parameters
    fitting_neuron: tuple[int, ...]  # fitting-net widths
    fitting_resnet_dt: bool  # fitting nets carry a resnet timestep
    model_seed: int  # initial weights
    lr: LRSchedule  # learning_rate: the rate of every step (exp, cosine or wsd, with its warm-up)
    optimizer: AdamConfig  # optimizer: Adam or AdamW and their parameters
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
    fitting_activation: str = "tanh"  # activation of the fitting nets' hidden layers
    precision: tuple[str, str] = ("float64", "float64")  # the embedding nets' and the fitting nets' (deepmd-kit's)
    max_ckpt_keep: int = 5  # periodic checkpoints kept (older ones minidp wrote are deleted); 0 keeps all
    disp_training: bool = True  # print the learning-curve lines while training
    ignored: tuple[str, ...] = ()  # deepmd-kit keys given that minidp ignores (IGNORED), named once per run
    # the fitting nets' inputs beyond the descriptor: numb_fparam, numb_aparam, default_fparam,
    # use_aparam_as_mask (fresh statistics: averages 0, inverse spreads 1, until the data's replace them)
    fitting_input: FittingInput = field(default_factory=FittingInput)
    atom_ener: tuple[float | None, ...] = ()  # fitting_net/atom_ener: types whose isolated atom's output is subtracted
    atom_exclude_types: tuple[int, ...] = ()  # model/atom_exclude_types: atoms of these types have no energy
    mixed_precision: MixedPrecision | None = None  # training/mixed_precision (the nets in its output_prec)

    def __post_init__(self):
        if not isinstance(self.descriptor, SeAConfig) or not isinstance(self.loss, LossConfig):
            raise TypeError("TrainConfig: descriptor must be an SeAConfig and loss a LossConfig")
        if not isinstance(self.fitting_input, FittingInput):
            raise TypeError("TrainConfig: fitting_input must be a FittingInput")
        if len(self.atom_ener) > self.descriptor.ntypes:
            raise ValueError(f"input: model/fitting_net/atom_ener lists {len(self.atom_ener)} entries for "
                             f"{self.descriptor.ntypes} types; expected at most one per type")
        bad = [t for t in self.atom_exclude_types if not 0 <= t < self.descriptor.ntypes]
        if bad:
            raise ValueError(f"input: model/atom_exclude_types {list(self.atom_exclude_types)}: types {bad} are not "
                             f"in 0..{self.descriptor.ntypes - 1}")
        if len(self.type_map) != self.descriptor.ntypes or not all(isinstance(t, str) for t in self.type_map):
            raise ValueError(f"type_map must hold one element name per sel entry ({self.descriptor.ntypes}), "
                             f"got {list(self.type_map)!r}")
        if not isinstance(self.lr, LRSchedule) or not isinstance(self.optimizer, AdamConfig):
            raise TypeError("TrainConfig: lr must be an LRSchedule and optimizer an AdamConfig")
        if self.lr.num_steps != self.numb_steps:
            raise ValueError(f"TrainConfig: the learning rate runs {self.lr.num_steps} steps, training {self.numb_steps}")
        for name in ("numb_steps", "disp_freq", "save_freq", "data_stat_nbatch"):
            positive_int(name, getattr(self, name))
        mp = self.mixed_precision
        if mp is not None and self.precision != (mp.output_prec, mp.output_prec):
            raise ValueError(f"TrainConfig: with mixed_precision the nets are in its output_prec {mp.output_prec}, "
                             f"got precision {list(self.precision)}")
        if not self.fitting_neuron or not all(is_positive_int(n) for n in self.fitting_neuron):
            raise ValueError(f"fitting_net neuron must be a non-empty list of positive integers, "
                             f"got {list(self.fitting_neuron)!r}")


# What minidp reads of each section (and deepmd-kit's keys it accepts as ignored, IGNORED);
# anything else is refused by name. Keys starting with "_" are comments, as in deepmd-kit's examples.
# The loss keys are LossConfig's fields: the loss module says which terms it trains.
KEYS = {
    "": {"model", "learning_rate", "loss", "training", "optimizer"},
    "model": {"type_map", "descriptor", "fitting_net", "data_stat_nbatch", "data_stat_protect", "type",
              "pair_exclude_types", "atom_exclude_types", "preset_out_bias", "model_branch_alias", "info",
              "bridging_method"},
    "model/descriptor": {"type", "sel", "rcut", "rcut_smth", "neuron", "axis_neuron", "resnet_dt",
                         "type_one_side", "precision", "seed", "activation_function", "set_davg_zero",
                         "trainable", "exclude_types", "env_protection"},
    "model/fitting_net": {"type", "neuron", "resnet_dt", "precision", "seed", "activation_function", "trainable",
                          "numb_fparam", "numb_aparam", "atom_ener", "rcond", "default_fparam", "dim_case_embd",
                          "use_aparam_as_mask"},
    "loss": {"type", "start_pref_h", "limit_pref_h"} | {f.name for f in fields(LossConfig)},
    "training": {"training_data", "validation_data", "numb_steps", "numb_epoch", "seed", "disp_file", "disp_freq",
                 "save_freq", "save_ckpt", "max_ckpt_keep", "disp_training", "change_bias_after_training",
                 "ckpt_keep_ratio", "enable_ema", "gradient_max_norm", "mixed_precision"},
    "training/mixed_precision": {"compute_prec", "output_prec"},
    "training/training_data": {"systems", "batch_size", "sys_probs", "auto_prob", "auto_prob_style", "rglob_patterns",
                               "min_pair_dist"},
    "training/validation_data": {"systems", "batch_size", "numb_btch", "sys_probs", "auto_prob", "auto_prob_style",
                                 "rglob_patterns"},
}
# the sections of training that may be absent
OPTIONAL_SECTIONS = ("training/validation_data", "training/mixed_precision")
# deepmd-kit's keys that steer only its own machinery (logging, profiling, caches, parallel runs):
# accepted, and named in one line at the start of a run (TrainConfig.ignored)
IGNORED = {
    "model": {"data_bias_nsample"},
    "training": {"tensorboard", "tensorboard_log_dir", "tensorboard_freq", "profiling", "profiling_file",
                 "enable_profiler", "time_training", "stat_file", "stat_file_mode", "save_dir", "disp_avg",
                 "acc_freq", "zero_stage", "neighbor_graph_method", "enable_compile", "enable_tf32", "numb_test",
                 "ema_decay", "ema_ckpt_keep"},
}
# deepmd-kit's other spellings of a key (its argcheck aliases)
ALIASES = {
    "model/descriptor": {"n_axis_neuron": "axis_neuron"},
    "model/fitting_net": {"n_neuron": "neuron"},
    "training": {"stop_batch": "numb_steps", "num_step": "numb_steps", "num_steps": "numb_steps",
                 "numb_step": "numb_steps", "num_epoch": "numb_epoch", "num_epochs": "numb_epoch",
                 "numb_epochs": "numb_epoch"},
    "training/training_data": {"sys_weights": "sys_probs"},
    "training/validation_data": {"sys_weights": "sys_probs", "numb_batch": "numb_btch"},
}
# The values these keys may take (deepmd-kit's default first): minidp has no other
# the nets' precisions minidp runs (deepmd-kit's "default" is float64)
PRECISIONS = ("float64", "default", "float32")
# mixed_precision's output precisions (deepmd-kit's TF trainer: float32 only; see MixedPrecision)
OUTPUT_PRECISIONS = ("float32", "float64")
FIXED = {"model/descriptor/type": ("se_e2_a", "se_a"), "model/fitting_net/type": ("ener",),
         "loss/type": ("ener",), "model/descriptor/precision": PRECISIONS,
         "model/fitting_net/precision": PRECISIONS, "model/type": ("standard",),
         "model/descriptor/trainable": (True,), "model/fitting_net/trainable": (True,),
         "model/fitting_net/rcond": (None,),
         "model/data_stat_protect": (0.01, 1e-2), "model/preset_out_bias": (None,), "model/model_branch_alias": ([],),
         "model/info": ({},), "model/bridging_method": ("None",),
         "training/change_bias_after_training": (False,), "training/ckpt_keep_ratio": (None,),
         "training/enable_ema": (False,), "training/gradient_max_norm": (None,),
         "training/training_data/min_pair_dist": (0.0, 0)}
# deepmd-kit's keys minidp reads but does not train, each with the value that means "off" (accepted) and why
NOT_TRAINED = {
    "model/fitting_net/dim_case_embd": (0, ("deepmd-kit sets a case embedding only in multi-task training, "
                                            "which minidp does not do")),
    "loss/start_pref_h": (0, "minidp does not train the hessian term"),
    "loss/limit_pref_h": (0, "minidp does not train the hessian term"),
}
# deepmd-kit 3.1's optimizer keys in training, moved into the optimizer section (training's win);
# and its warm-up keys in training, moved into learning_rate (refused when in both)
LEGACY_OPTIMIZER = ("opt_type", "kf_blocksize", "kf_start_pref_e", "kf_limit_pref_e", "kf_start_pref_f",
                    "kf_limit_pref_f", "weight_decay", "momentum", "muon_momentum", "adam_beta1", "adam_beta2",
                    "lr_adjust", "lr_adjust_coeff", "muon_2d_only", "min_2d_dim")
WARMUP = ("warmup_steps", "warmup_ratio", "warmup_start_factor")


def _node(d: dict, where: str):
    """The value at path ``where`` (None if a part is missing or not a section)."""
    for part in [p for p in where.split("/") if p]:
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _resolve_aliases(d: dict) -> None:
    """Rename deepmd-kit's aliases to the keys minidp reads; two spellings of one key are refused."""
    for where, aliases in ALIASES.items():
        sec = _node(d, where)
        if not isinstance(sec, dict):
            continue
        for alias, key in aliases.items():
            if alias in sec:
                if key in sec:
                    raise InputError(f"input: {where} gives both {key} and its alias {alias}; expected one")
                sec[key] = sec.pop(alias)


def deepmd_compat(d: dict) -> dict:
    """A copy of the input as deepmd-kit rewrites it before its check (utils/compat.py): aliases
    resolved, training's warm-up keys moved into learning_rate and its legacy optimizer keys
    (opt_type -> type) into the optimizer section; a model with ``spin`` or a ``type_embedding`` refused."""
    d = copy.deepcopy(d)
    if isinstance(d.get("model"), dict) and "spin" in d["model"]:
        raise InputError("input: model/spin: spin models are out of scope for minidp (se_e2_a energy models only)")
    if isinstance(d.get("model"), dict) and "type_embedding" in d["model"]:
        # (minidp reads and evaluates such a model, TF's se_a_ebd_v2, by folding its shared nets per type)
        raise InputError("input: model/type_embedding: minidp evaluates and compresses se_e2_a with a type "
                         "embedding but does not train it; expected no type_embedding section")
    _resolve_aliases(d)
    tr, lr = d.get("training"), d.get("learning_rate")
    if not isinstance(tr, dict):
        return d
    warm = [k for k in WARMUP if k in tr]
    if warm and isinstance(lr, dict):
        both = [k for k in warm if k in lr]
        if both:
            raise InputError(f"input: {both} given in both training and learning_rate; give the warm-up in "
                             "learning_rate only")
        lr.update({k: tr.pop(k) for k in warm})
    legacy = {k: tr.pop(k) for k in LEGACY_OPTIMIZER if k in tr}
    if legacy:
        if "opt_type" in legacy:
            legacy["type"] = legacy.pop("opt_type")
        opt = d.get("optimizer", {})
        d["optimizer"] = {**opt, **legacy} if isinstance(opt, dict) else opt
    return d


def _section(d: dict, where: str) -> dict:
    """The section at path ``where``, checked: a dict, no unknown keys, fixed values as allowed."""
    node = d
    for part in [p for p in where.split("/") if p]:
        node = node.get(part)
        if not isinstance(node, dict):
            raise ValueError(f"input: {where} must be a section (a JSON object), got {node!r}")
    known = KEYS[where] | IGNORED.get(where, set())
    unknown = sorted(k for k in node if not k.startswith("_") and k not in known)
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
    patterns = sec.get("rglob_patterns")
    if patterns is not None and (not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns)):
        raise InputError(f"input: {where}/rglob_patterns must be a list of glob patterns, got {short(patterns)}")
    return DataConfig(tuple(base / s for s in systems), bs, _value(sec, where, "numb_btch", positive_int, 1),
                      probs, auto_prob, None if patterns is None else tuple(patterns))


def _found(data: DataConfig | None) -> DataConfig | None:
    """The data with its systems found as deepmd-kit finds them (:func:`training_systems`): each
    path a system, or a folder / HDF5 file searched for the systems below it."""
    if data is None:
        return None
    found = [p for path in data.systems for p in training_systems(path, data.rglob_patterns)]
    return replace(data, systems=tuple(found))


def _descriptor_config(d: dict, model: dict) -> SeAConfig:
    """The descriptor's configuration from model/descriptor, with the model's pair_exclude_types
    (SeAConfig holds them: they act on the neighbour list the descriptor reads)."""
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
                     set_davg_zero=_value(d, w, "set_davg_zero", boolean, False),
                     activation=_value(d, w, "activation_function", _activation, "tanh"),
                     env_protection=_value(d, w, "env_protection", number, 0.0, 0.0),
                     # pairs of types: SeAConfig checks them against sel, naming the key
                     exclude_types=d.get("exclude_types", []),
                     pair_exclude_types=model.get("pair_exclude_types", []))


def _seed(name: str, value) -> int:
    return 0 if value is None else integer(name, value, 0)


def _auto_sel(desc: dict, type_map: list[str], systems: tuple[Path, ...]) -> list[int]:
    """sel "auto" / "auto:FACTOR": deepmd-kit's rule on the largest neighbour counts of the training systems."""
    if "rcut" not in desc:
        raise ValueError("input: sel 'auto' needs model/descriptor/rcut")
    stat = neighbor_stat(list(systems), float(desc["rcut"]), type_map, progress=False)
    return auto_sel(desc["sel"], stat.max_nbor_size)


def _check_sections(d: dict) -> None:
    """Every section a JSON object with known keys and allowed fixed values; the options minidp does
    not train refused by name, with the reason (NOT_TRAINED)."""
    if not isinstance(d, dict):
        raise InputTypeError(f"input must be a JSON object, got {type(d).__name__}")
    for where in KEYS:
        if where in OPTIONAL_SECTIONS and where.rpartition("/")[2] not in d.get("training", {}):
            continue
        _section(d, where)
    for key, (off, why) in NOT_TRAINED.items():
        value = _node(d, key)
        if value is not None and value != off:
            raise InputError(f"input: {key} = {short(value)}: {why}; expected {off!r}")


def _ignored(d: dict) -> tuple[str, ...]:
    """The keys of IGNORED the input gives, as section/key."""
    return tuple(sorted(f"{w}/{k}" for w, keys in IGNORED.items() for k in keys if k in (_node(d, w) or {})))


def _activation(name: str, value) -> str:
    """An activation name nn knows (the force loss has its second derivative)."""
    try:
        get_activation(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: {err}") from None
    return value


def _uncommented(sec: dict) -> dict:
    return {k: v for k, v in sec.items() if not k.startswith("_")}


def _schedules(d: dict, numb_steps: int) -> tuple[LRSchedule, AdamConfig]:
    """The learning_rate and optimizer sections through minidp.optim (their keys checked there)."""
    lr, opt = d.get("learning_rate"), d.get("optimizer", {})
    # comments ("_" keys) dropped, as deepmd-kit does
    lr, opt = (_uncommented(s) if isinstance(s, dict) else s for s in (lr, opt))
    try:
        return lr_schedule(lr, numb_steps), adam_config(opt)
    except (TypeError, ValueError) as err:
        raise InputError(f"input: {err}") from None


def _run_length(tr: dict) -> tuple[int | None, float | None]:
    """(numb_steps (stop_batch), None) or (None, numb_epoch): exactly one of them, checked."""
    if ("numb_steps" in tr) == ("numb_epoch" in tr):
        raise InputError("input: training/numb_steps is required (or numb_epoch instead; not both)")
    if "numb_steps" in tr:
        return _value(tr, "training", "numb_steps", positive_int), None
    return None, _value(tr, "training", "numb_epoch", number, None, None, True)


def _numb_steps(length: tuple[int | None, float | None], data: DataConfig) -> int:
    """numb_steps, or numb_epoch converted to steps as deepmd-kit 3.2 does (:func:`epoch_steps`)."""
    steps, epochs = length
    if steps is not None:
        return steps
    return epoch_steps(epochs, data.systems, data.batch_size, data.sys_probs, data.auto_prob)


def _model_types(type_map: list[str] | None, desc: dict, data: DataConfig) -> list[str]:
    """model/type_map, or (absent) the systems' type_map.raw as deepmd-kit merges them
    (:func:`minidp.training.sampling.data_type_map`)."""
    if type_map is not None:
        return type_map
    ntypes = len(desc["sel"]) if isinstance(desc.get("sel"), list) else None
    return data_type_map(data.systems, ntypes)


def _fitting_keys(fit: dict) -> dict:
    """TrainConfig's fitting fields from model/fitting_net."""
    w = "model/fitting_net"
    _value(fit, w, "seed", _seed, 0)  # checked, though the model's seed is the descriptor's
    return dict(fitting_neuron=_value(fit, w, "neuron", integers, (120, 120, 120)),
                fitting_resnet_dt=_value(fit, w, "resnet_dt", boolean, True),
                fitting_activation=_value(fit, w, "activation_function", _activation, "tanh"))


def _fitting_options(model: dict, fit: dict) -> dict:
    """TrainConfig's fitting_input (numb_fparam, numb_aparam, default_fparam, use_aparam_as_mask),
    atom_ener and atom_exclude_types, each checked by name."""
    w = "model/fitting_net"
    nfp, nap = (_value(fit, w, key, integer, 0, 0) for key in ("numb_fparam", "numb_aparam"))
    default = fit.get("default_fparam")
    if default is not None and (not isinstance(default, list) or len(default) != nfp):
        raise InputError(f"input: {w}/default_fparam = {short(default)}: expected a list of {nfp} numbers "
                         "(numb_fparam)")
    spec = validated(f"input: {w}", FittingInput, fparam_avg=np.zeros(nfp), fparam_inv_std=np.ones(nfp),
                     aparam_avg=np.zeros(nap), aparam_inv_std=np.ones(nap),
                     default_fparam=None if default is None else [number(f"input: {w}/default_fparam[{k}]", v)
                                                                  for k, v in enumerate(default)],
                     use_aparam_as_mask=_value(fit, w, "use_aparam_as_mask", boolean, False))
    atom_ener = fit.get("atom_ener", [])
    if not isinstance(atom_ener, list):
        raise InputTypeError(f"input: {w}/atom_ener: expected a list of numbers or null (one per type), "
                             f"got {short(atom_ener)}")
    excluded = model.get("atom_exclude_types", [])
    if not isinstance(excluded, list):
        raise InputTypeError(f"input: model/atom_exclude_types: expected a list of types, got {short(excluded)}")
    return dict(fitting_input=spec,
                atom_ener=tuple(None if e is None else number(f"input: {w}/atom_ener[{k}]", e)
                                for k, e in enumerate(atom_ener)),
                atom_exclude_types=tuple(sorted({integer(f"input: model/atom_exclude_types[{k}]", t, 0)
                                                 for k, t in enumerate(excluded)})))


def _precisions(desc: dict, fit: dict, mixed: MixedPrecision | None) -> tuple[str, str]:
    """The nets' precisions, deepmd-kit's meaning: "float32" runs the embedding or fitting nets in float32
    (positions, the environment matrix, the sums and the loss stay float64); "default" is float64.
    With mixed_precision both are its output_prec, whatever the sections say (deepmd-kit's TF backend)."""
    if mixed is not None:
        return (mixed.output_prec, mixed.output_prec)
    return tuple("float32" if sec.get("precision") == "float32" else "float64" for sec in (desc, fit))


def _mixed_precision(tr: dict) -> MixedPrecision | None:
    """training/mixed_precision (absent: None); compute_prec is required, as in deepmd-kit's schema."""
    sec = tr.get("mixed_precision")
    if sec is None:
        return None
    w = "training/mixed_precision"
    return MixedPrecision(_value(sec, w, "compute_prec", _text), _value(sec, w, "output_prec", _text, "float32"))


def _run_keys(model: dict, desc: dict, tr: dict) -> dict:
    """TrainConfig's seeds, statistics and bookkeeping fields."""
    t = "training"
    return dict(model_seed=_value(desc, "model/descriptor", "seed", _seed, 0), seed=_value(tr, t, "seed", _seed, 0),
                disp_file=_value(tr, t, "disp_file", _text, "lcurve.out"),
                disp_freq=_value(tr, t, "disp_freq", positive_int, 1000),
                save_freq=_value(tr, t, "save_freq", positive_int, 1000),
                save_ckpt=_value(tr, t, "save_ckpt", _text, "model.ckpt"),
                data_stat_nbatch=_value(model, "model", "data_stat_nbatch", positive_int, 10),
                max_ckpt_keep=_value(tr, t, "max_ckpt_keep", integer, 5, 0),
                disp_training=_value(tr, t, "disp_training", boolean, True))


def _check_ntypes(type_map: list[str], cfg: SeAConfig) -> None:
    if len(type_map) != cfg.ntypes:
        raise ValueError(f"input: type_map {type_map} has {len(type_map)} types but sel has {cfg.ntypes}")


def parse_input(d: dict, base: Path = Path(".")) -> TrainConfig:
    """A TrainConfig from deepmd-kit's input dict; relative system paths are taken from ``base``.

    The input is first rewritten as deepmd-kit rewrites it (:func:`deepmd_compat`); every value is
    then checked against its key's type and range, before any data is read: an error names the key
    path and the value; strings are never read as numbers or booleans. Then the systems are found
    (folders searched as deepmd-kit searches them), which numb_epoch, sel "auto" and a missing
    type_map need.
    """
    d = deepmd_compat(d) if isinstance(d, dict) else d
    _check_sections(d)
    model, tr = d["model"], d["training"]
    desc, fit, loss = model["descriptor"], model["fitting_net"], d["loss"]
    if isinstance(desc.get("sel"), str):
        try:
            auto_sel(desc["sel"], [])  # a bad spelling is refused before the data are read
        except ValueError as err:
            raise InputError(f"input: model/descriptor/sel: {err}") from None
    mixed = _mixed_precision(tr)
    fitting = {**_fitting_keys(fit), **_fitting_options(model, fit), "precision": _precisions(desc, fit, mixed),
               "mixed_precision": mixed}
    # LossConfig checks its own values (numbers, flags, huber_delta, loss_func); the message names the key
    losses = validated("input", LossConfig, **{f.name: loss[f.name] for f in fields(LossConfig) if f.name in loss})
    training = _data_config(tr["training_data"], "training/training_data", base)
    validation = _data_config(tr["validation_data"], "training/validation_data", base) if "validation_data" in tr else None
    length = _run_length(tr)
    schedules = _schedules(d, length[0]) if length[0] is not None else None  # numb_epoch: once the data is found
    given_map = names("input: model/type_map", model["type_map"]) if "type_map" in model else None
    cfg = None if isinstance(desc.get("sel"), str) else _descriptor_config(desc, model)
    if cfg is not None and given_map is not None:
        _check_ntypes(given_map, cfg)
    run = _run_keys(model, desc, tr)
    # then the data: found as deepmd-kit finds it, read only for numb_epoch, a missing type_map, sel "auto"
    training, validation = _found(training), _found(validation)
    numb_steps = _numb_steps(length, training)
    lr, optimizer = schedules or _schedules(d, numb_steps)
    type_map = _model_types(given_map, desc, training)
    if cfg is None:
        cfg = _descriptor_config({**desc, "sel": _auto_sel(desc, type_map, training.systems)}, model)
    _check_ntypes(type_map, cfg)
    return TrainConfig(type_map=tuple(type_map), descriptor=cfg, lr=lr, optimizer=optimizer, loss=losses,
                       training=training, validation=validation, numb_steps=numb_steps, ignored=_ignored(d),
                       **fitting, **run)


def with_numb_steps(config: TrainConfig, numb_steps) -> TrainConfig:
    """The run made numb_steps long (--numb-steps), its learning-rate schedule with it; checked as the
    schedule checks its length (a warm-up longer than the run is refused)."""
    n = positive_int("--numb-steps", numb_steps)
    try:
        return replace(config, numb_steps=n, lr=replace(config.lr, num_steps=n))
    except (TypeError, ValueError) as err:
        raise InputError(f"--numb-steps {n}: {err}") from None


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
