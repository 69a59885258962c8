r"""Training an se_e2_a energy model from deepmd-kit's input.json, every gradient by hand.

The story of one run (:func:`train`):

1. **Input** (:func:`parse_input`): deepmd-kit's training input, the
   se_e2_a + ``ener`` subset; any other key is refused by name.
2. **Data** (:func:`load_systems`): deepmd/npy systems read through dpdata,
   their element names mapped onto the model's ``type_map``.
3. **Statistics** (:mod:`minidp.stats`): davg/dstd of the environment matrix
   and the per-type energy bias, from ``data_stat_nbatch`` batches per system.
4. **Steps**: a batch of frames from one system (systems drawn in proportion
   to their frames, frames in a shuffled order); the loss and its exact
   gradient (:func:`minidp.loss.loss_and_grad`); one Adam update at the
   learning rate of deepmd-kit's ``exp`` schedule,
   :math:`\eta_t = \eta_0 r^{\lfloor t/s \rfloor}` (:func:`minidp.optim.exp_decay`).
5. **Record**: every ``disp_freq`` steps a line of ``lcurve.out`` in
   deepmd-kit's columns; every ``save_freq`` steps a checkpoint
   (model ``.dp`` + optimizer and sampler state ``.npz``) that ``restart``
   resumes exactly; at the end the model in deepmd-kit's serialization and
   a plot of the learning curve. Every file goes through
   :func:`minidp.data.safe_output`, and :func:`plan_outputs` refuses, before
   any data is read, a run that would write over another run's files; a
   restart that disagrees with its checkpoint is refused by name.

Step t reports the errors of the weights before its update, so the line of
step 0 is the untrained model and the last line (t = numb_steps) the final one.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp.checks import (InputError, InputTypeError, boolean, integer, integers, is_positive_int, names, number,
                           positive_int, short, validated)
from minidp.data import check_output, model_types, read_system, safe_output
from minidp.loss import Batch, LossConfig, LossValue, ener_loss, loss_and_grad, prefactors
from minidp.model import EnergyModel, energy_forces, new_model
from minidp.neighbor import build_neighbor_list
from minidp.optim import Adam, exp_decay
from minidp.runtime import keep_freed_memory
from minidp.se_e2_a import SeAConfig
from minidp.serialization import NATIVE_SUFFIXES, load_model, save_model
from minidp.stats import energy_bias, env_stats, raw_env_sums

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
        if not (isinstance(self.start_lr, (int, float)) and isinstance(self.stop_lr, (int, float))
                and 0 < self.stop_lr <= self.start_lr and math.isfinite(self.start_lr)):
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
    auto_prob = _value(sec, where, "auto_prob", _text, sec.get("auto_prob_style", "prob_sys_size"))
    system_probs(np.ones(len(systems)), probs, auto_prob)  # refuses a bad auto_prob / sys_probs now
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
    from minidp.neighbor_stat import auto_sel, neighbor_stat

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"input file {path} is not valid JSON: {err}") from None
    return parse_input(d, path.parent)


# ---------------------------------------------------------------------------
# 2. The data
# ---------------------------------------------------------------------------


class System(NamedTuple):
    """One labelled system, in float64 whatever the files hold (coordinates are often float32)."""

    path: Path  # where it was read from
    coords: np.ndarray  # (nf, nloc, 3)
    cells: np.ndarray | None  # (nf, 3, 3), or None without periodic boundaries
    atom_types: np.ndarray  # (nloc,) in the model's type_map
    energy: np.ndarray  # (nf,)
    force: np.ndarray  # (nf, nloc, 3)
    virial: np.ndarray | None  # (nf, 9), or None without virial labels

    @property
    def nframes(self) -> int:
        return self.coords.shape[0]


def load_systems(paths, type_map) -> list[System]:
    """Read labelled systems through dpdata (all their set.* folders); types mapped onto type_map."""
    systems = []
    for path in paths:
        s = read_system(path)
        if "energies" not in s.data or "forces" not in s.data:
            raise ValueError(f"system {path} has no energy and force labels: it cannot be trained on")
        nf = s.get_nframes()
        cells = None if s.nopbc else s["cells"].astype(np.float64)
        virial = s["virials"].reshape(nf, 9).astype(np.float64) if "virials" in s.data else None
        systems.append(System(Path(path), s["coords"].astype(np.float64), cells,
                              model_types(s["atom_names"], s["atom_types"], list(type_map)),
                              s["energies"].astype(np.float64).reshape(nf), s["forces"].astype(np.float64), virial))
    return systems


def batch_size(setting: int | str, natoms: int) -> int:
    """Frames per batch: an integer as is; "auto:N" enough frames for N atoms ("auto": N = 32)."""
    if isinstance(setting, int):
        return setting
    target = 32 if setting == "auto" else int(setting.partition(":")[2])
    return max(1, math.ceil(target / natoms))


def batch_sizes(setting: int | str | tuple[int, ...], natoms: list[int]) -> list[int]:
    """Frames per batch of each system: a list as given, else :func:`batch_size` of each."""
    if isinstance(setting, (tuple, list)):
        if len(setting) != len(natoms):
            raise ValueError(f"batch_size lists {len(setting)} sizes for {len(natoms)} systems")
        return [int(b) for b in setting]
    return [batch_size(setting, n) for n in natoms]


def numb_batches(set_frames: list[int], size: int) -> int:
    """deepmd-kit's batches in a system: floor(frames / size) per set.* folder, at least 1 each, summed."""
    return sum(max(1, n // size) for n in set_frames)


def system_probs(nbatches, sys_probs=None, auto_prob: str = "prob_sys_size") -> np.ndarray:
    r"""The probability of drawing each system, as deepmd-kit's DeepmdDataSystem.set_sys_probs.

    - sys_probs given: p_k as given where p_k >= 0; the rest 1 - sum of those,
      shared by the other systems in proportion to their batches nb_k;
    - prob_uniform: 1 / nsystems each;
    - prob_sys_size: p_k = nb_k / sum nb;
    - prob_sys_size;A:B:P;C:D:Q;...: the blocks of systems A..B-1, C..D-1, ...
      get P / (P + Q + ...), Q / (...), shared in each block by its batches.
    """
    nb = np.asarray(nbatches, dtype=float)
    if sys_probs is not None:
        p = np.asarray(sys_probs, dtype=float)
        given = p >= 0
        rest = 1.0 - p[given].sum()
        if rest < -1e-8:
            raise ValueError(f"sys_probs {list(sys_probs)} sum to more than 1")
        if not np.isclose(rest, 0.0):
            if not (~given).any():
                raise ValueError(f"sys_probs {list(sys_probs)} sum to {1 - rest:g}, not 1")
            return np.where(given, p, rest * nb * ~given / np.sum(nb * ~given))
        return np.where(given, p, 0.0)
    if auto_prob == "prob_uniform":
        return np.full(nb.size, 1.0 / nb.size)
    if auto_prob == "prob_sys_size":
        auto_prob = f"prob_sys_size;0:{nb.size}:1.0"
    if not auto_prob.startswith("prob_sys_size;"):
        raise ValueError(f"auto_prob must be prob_uniform, prob_sys_size or prob_sys_size;A:B:P;..., got {auto_prob!r}")
    try:
        blocks = [(int(a), int(b), float(w)) for a, b, w in (x.split(":") for x in auto_prob.split(";")[1:])]
    except ValueError:
        raise ValueError(f"auto_prob {auto_prob!r}: each block must be start:end:weight") from None
    weights = np.array([w for _, _, w in blocks])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"auto_prob {auto_prob!r}: block weights must be >= 0, and not all 0")
    p = np.zeros(nb.size)
    for (a, b, _), w in zip(blocks, weights / weights.sum()):
        p[a:b] = nb[a:b] / nb[a:b].sum() * w
    return p


def _set_frames(system: System) -> list[int]:
    """Frames of each set.* folder of a deepmd/npy system (one count for other formats)."""
    sets = sorted(system.path.glob("set.*")) if system.path.is_dir() else []
    counts = [np.load(p / "coord.npy", mmap_mode="r").shape[0] for p in sets if (p / "coord.npy").is_file()]
    return counts if sum(counts) == system.nframes else [system.nframes]


def make_batch(system: System, frames: np.ndarray, cfg: SeAConfig) -> Batch:
    """The neighbour list and labels of some frames of a system."""
    cells = None if system.cells is None else system.cells[frames]
    nl = build_neighbor_list(system.coords[frames], cells, system.atom_types, cfg.rcut, list(cfg.sel))
    virial = None if system.virial is None else system.virial[frames]
    return Batch(nl.rij, nl.nlist, system.atom_types, system.energy[frames], system.force[frames], virial)


class Sampler:
    """Batches drawn as deepmd-kit draws them: a system with the probabilities of
    :func:`system_probs` (by default in proportion to its batches), then the
    next frames of its shuffled order (reshuffled when used up).

    Its whole state (the generator's, each order and position) goes into checkpoints.
    """

    def __init__(self, systems: list[System], setting, seed: int, sys_probs=None, auto_prob: str = "prob_sys_size"):
        self.sizes = batch_sizes(setting, [s.atom_types.size for s in systems])
        nbatches = [numb_batches(_set_frames(s), size) for s, size in zip(systems, self.sizes)]
        self.prob = system_probs(nbatches, sys_probs, auto_prob)
        self.rng = np.random.default_rng(seed)
        self.orders = [self.rng.permutation(s.nframes) for s in systems]
        self.pos = [0] * len(systems)

    def next(self) -> tuple[int, np.ndarray]:
        """(system index, frame indices) of the next batch."""
        k = int(self.rng.choice(len(self.prob), p=self.prob))
        n = min(self.sizes[k], self.orders[k].size)
        if self.pos[k] + n > self.orders[k].size:
            self.orders[k], self.pos[k] = self.rng.permutation(self.orders[k].size), 0
        frames = self.orders[k][self.pos[k]:self.pos[k] + n]
        self.pos[k] += n
        return k, frames

    def state(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state), "pos": np.array(self.pos),
                **{f"order_{k}": o for k, o in enumerate(self.orders)}}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = json.loads(str(state["rng"]))
        self.pos = [int(p) for p in state["pos"]]
        self.orders = [np.asarray(state[f"order_{k}"]) for k in range(len(self.orders))]


# ---------------------------------------------------------------------------
# 3. A fresh model with the data's statistics
# ---------------------------------------------------------------------------


# The statistics draw their frames from a generator of their own, derived
# from the training seed: drawing them from the sampler's would shift every
# batch of the run by how many frames the statistics happened to need.
STATS_STREAM = 1


def stats_rng(seed: int) -> np.random.Generator:
    """The statistics' generator: seeded by (seed, STATS_STREAM), independent of the batch sampler's."""
    return np.random.default_rng([seed, STATS_STREAM])


def initial_model(config: TrainConfig, systems: list[System], sampler: Sampler) -> EnergyModel:
    """new_model, then davg/dstd and the energy bias from data_stat_nbatch batches per system.

    The frames are drawn by :func:`stats_rng`; the sampler gives the batch sizes only and is not advanced.
    """
    cfg = config.descriptor
    model = new_model(list(config.type_map), cfg, config.fitting_neuron, config.fitting_resnet_dt, config.model_seed)
    sums = np.zeros((cfg.ntypes, 5))
    mean_energy, counts = [], []
    rng = stats_rng(config.seed)
    for k, s in enumerate(systems):
        n = min(s.nframes, config.data_stat_nbatch * sampler.sizes[k])
        frames = np.sort(rng.choice(s.nframes, n, replace=False))
        sums += raw_env_sums(s.coords[frames], None if s.cells is None else s.cells[frames], s.atom_types, cfg)
        mean_energy.append(s.energy[frames].mean())
        counts.append(np.bincount(s.atom_types, minlength=cfg.ntypes))
    model.descriptor.davg, model.descriptor.dstd = env_stats(sums, cfg)
    model.bias = energy_bias(np.array(mean_energy), np.array(counts))
    return model


# ---------------------------------------------------------------------------
# 4. Recording: the learning curve and checkpoints
# ---------------------------------------------------------------------------


def lcurve_columns(validation: bool, virial: bool) -> list[str]:
    """deepmd-kit's lcurve.out columns (validation first, then training, per quantity)."""
    quantities = ["", "_e", "_f"] + (["_v"] if virial else [])
    sets = ["val", "trn"] if validation else ["trn"]
    return ["step"] + [f"rmse{q}_{s}" for q in quantities for s in sets] + ["lr"]


def lcurve_line(step: int, errors: dict[str, LossValue], lr: float, virial: bool) -> str:
    """One line of lcurve.out: errors maps "val"/"trn" to that set's LossValue."""
    fields = ["rmse", "rmse_e", "rmse_f"] + (["rmse_v"] if virial else [])
    values = [getattr(errors[s], f) for f in fields for s in ("val", "trn") if s in errors]
    return f"{step:7d}" + "".join(f" {v:12.4e}" for v in values) + f" {lr:12.4e}\n"


def kept_lcurve(path: Path, step: int) -> str:
    """The lines of an existing lcurve.out before ``step`` (a run resumed from step's checkpoint
    writes the others again); ValueError unless it is a learning curve minidp wrote."""
    text = path.read_text()
    if not text.startswith("# step"):
        raise ValueError(f"{path} is not a learning curve (no '# step ...' header); refusing to append to it")
    lines = text.splitlines(keepends=True)
    return "".join(ln for ln in lines if ln.startswith("#") or (ln.split() and int(ln.split()[0]) < step))


def write_lcurve_line(path: Path, line: str, head: str | None = None, replace: bool = False) -> None:
    """Append a line to lcurve.out; with ``head`` (the header, or the kept lines of a resumed curve)
    write head + line as a whole new file instead, atomically (``replace``: onto an existing curve).

    The first line of a run goes the second way: a run that fails before it leaves no header-only
    file, and a run killed later leaves whole lines (each is one small write)."""
    if head is not None:
        with safe_output(path, "lcurve", overwrite=replace) as tmp:
            tmp.write_text(head + line)
        return
    with open(path, "a") as fh:
        fh.write(line)


def read_lcurve(path) -> dict[str, np.ndarray]:
    """An lcurve.out (minidp's or deepmd-kit's) as {column: values}; names from the '#' header."""
    path = Path(path)
    names = path.read_text().splitlines()[0].lstrip("#").split()
    data = np.atleast_2d(np.loadtxt(path))
    return {name: data[:, k] for k, name in enumerate(names)}


def plot_lcurves(curves: dict[str, Path], out: Path) -> Path:
    """Energy and force RMSE against the step, one line style per curve and set (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidp.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (label, path), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        c = read_lcurve(path)
        for ax, q, unit in ((axes[0], "e", "eV/atom"), (axes[1], "f", "eV/Å")):
            for s, style in (("trn", ":"), ("val", "-")):
                if f"rmse_{q}_{s}" in c:
                    ax.semilogy(c["step"], c[f"rmse_{q}_{s}"], style, color=color, label=f"{label} {s}")
            ax.set(xlabel="step", ylabel=f"RMSE ({unit})", title={"e": "energy", "f": "forces"}[q])
    axes[1].legend()
    return save_figure(fig, out)


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """<path>.dp and <path>.npz (appended: a stem such as model.ckpt-1000 has dots of its own)."""
    return path.parent / f"{path.name}.dp", path.parent / f"{path.name}.npz"


def save_checkpoint(stem: Path, step: int, model: EnergyModel, opt: Adam, samplers: dict[str, Sampler],
                    data: str = "", overwrite: bool = False) -> Path:
    """<stem>-<step>.dp (the model) and <stem>-<step>.npz (Adam's moments, step, sampler states and
    ``data``, the fingerprint of the training data), each written atomically, the .npz last: a
    checkpoint is complete when both exist. A lone .dp (a run killed between the two) is replaced."""
    path = stem.parent / f"{stem.name}-{step}"
    dp_file, npz_file = checkpoint_files(path)
    save_model(dp_file, model, overwrite=overwrite or not npz_file.exists())
    state = {"step": np.array(step), "adam_t": np.array(opt.t), "data": np.array(data)}
    for i, (m, v) in enumerate(zip(opt.m, opt.v)):
        state.update({f"m_{i}_{k}": a for k, a in m.items()})
        state.update({f"v_{i}_{k}": a for k, a in v.items()})
    for name, sampler in samplers.items():
        state.update({f"{name}_{k}": a for k, a in sampler.state().items()})
    with safe_output(npz_file, "checkpoint", overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **state)
    return path


def _checkpoint_path(path) -> Path:
    """<stem>-<step> from itself, its .dp or its .npz."""
    path = Path(path)
    return path.parent / path.name.removesuffix(".dp").removesuffix(".npz")


def load_checkpoint_state(path) -> dict:
    """The .npz half of a checkpoint (step, optimizer and sampler states); ValueError if it is
    missing, empty, truncated or lacks a key."""
    path = _checkpoint_path(path)
    dp_file, npz_file = checkpoint_files(path)
    for need in (dp_file, npz_file):
        if not need.is_file():
            raise FileNotFoundError(f"checkpoint {path}: {need} does not exist")
    try:
        with np.load(npz_file) as z:
            state = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile, numpy and OS errors alike: a damaged file
        raise ValueError(f"checkpoint {path}: {npz_file} is empty, truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    missing = [k for k in ("step", "adam_t") if k not in state]
    if missing or state["step"].shape != () or state["step"].dtype.kind not in "iu":
        raise ValueError(f"checkpoint {path}: {npz_file} lacks {missing or 'an integer step'}; not a minidp checkpoint")
    return state


def load_checkpoint(path) -> tuple[EnergyModel, dict]:
    """The model and state of a checkpoint, given as <stem>-<step>, or its .dp or .npz."""
    path = _checkpoint_path(path)
    state = load_checkpoint_state(path)
    try:
        model = load_model(checkpoint_files(path)[0])
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from None
    return model, state


def restore_optimizer(opt: Adam, state: dict) -> None:
    """Adam's moments and step count from a checkpoint's state (ValueError if one is missing or misshapen)."""
    opt.t = int(state["adam_t"])
    for i, (m, v) in enumerate(zip(opt.m, opt.v)):
        for k in m:
            for kind, moments in (("m", m), ("v", v)):
                saved = state.get(f"{kind}_{i}_{k}")
                if saved is None or saved.shape != moments[k].shape:
                    raise ValueError(f"checkpoint: optimizer state {kind}_{i}_{k} is missing or has shape "
                                     f"{None if saved is None else saved.shape}, expected {moments[k].shape}")
                moments[k][...] = saved


# ---------------------------------------------------------------------------
# 5. The run
# ---------------------------------------------------------------------------


def evaluate(model: EnergyModel, batches: list[Batch], pref) -> LossValue:
    """Errors over some batches, each batch's RMSEs weighted by its atoms (deepmd-kit's average)."""
    values, weights = [], []
    for b in batches:
        p = energy_forces(b.rij, b.nlist, b.atom_types, model)
        values.append(ener_loss(p.energy, p.force, p.virial, b, pref)[0])
        weights.append(b.atom_types.size)
    return LossValue(*np.average(np.array(values), axis=0, weights=weights))


def validation_errors(model: EnergyModel, systems: list[System], sampler: Sampler, config: TrainConfig, pref) -> LossValue:
    """The errors on the next numb_btch validation batches (deepmd-kit draws new ones at every display)."""
    draws = [sampler.next() for _ in range(config.validation.numb_btch)]
    return evaluate(model, [make_batch(systems[k], frames, config.descriptor) for k, frames in draws], pref)


class TrainResult(NamedTuple):
    model: EnergyModel  # the trained model
    seconds_per_step: float  # mean wall time of a training step (batch, loss, gradient, update) after the first 10
    step_seconds: np.ndarray  # (steps,) each step's wall time, displays and checkpoints excluded
    last: dict[str, LossValue]  # the errors of the last lcurve line, by set ("trn", "val")


def data_fingerprint(systems: list[System]) -> str:
    """A digest of the systems' coordinates and labels, in order: a restart on other data is refused."""
    import hashlib

    digest = hashlib.sha256()
    for s in systems:
        for a in (s.coords, s.energy, s.force):
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def checkpoint_mismatch(model: EnergyModel, config: TrainConfig) -> list[str]:
    """What the input says that the checkpoint's model disagrees with, key by key ([] if nothing)."""
    from dataclasses import fields

    diffs = []
    if tuple(model.type_map) != config.type_map:
        diffs.append(f"model/type_map {list(config.type_map)} (checkpoint: {list(model.type_map)})")
    saved, wanted = model.descriptor.config, config.descriptor
    diffs += [f"model/descriptor/{f.name} {getattr(wanted, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
              for f in fields(saved) if getattr(saved, f.name) != getattr(wanted, f.name)]
    widths = tuple(layer.n_out for layer in model.fitting[0].layers[:-1])
    if widths != tuple(config.fitting_neuron):
        diffs.append(f"model/fitting_net/neuron {list(config.fitting_neuron)} (checkpoint: {list(widths)})")
    elif not diffs:
        fresh = new_model(list(config.type_map), wanted, config.fitting_neuron, config.fitting_resnet_dt, 0)
        if [{k: a.shape for k, a in p.items()} for p in fresh.params()] != \
                [{k: a.shape for k, a in p.items()} for p in model.params()]:
            diffs.append(f"model/fitting_net/resnet_dt {config.fitting_resnet_dt} "
                         f"(the checkpoint's nets were made with {not config.fitting_resnet_dt})")
    return diffs


def _restore(model: EnergyModel, state: dict, config: TrainConfig, samplers: dict, data: str, restart) -> int:
    """Check a checkpoint against the input and the data, restore the samplers; its step."""
    diffs = checkpoint_mismatch(model, config)
    if "data" in state and str(state["data"]) not in ("", data):
        diffs.append("the training data (systems, frames or labels changed since the checkpoint)")
    if diffs:
        raise ValueError(f"checkpoint {restart} does not match the input: " + "; ".join(diffs))
    for name, sampler in samplers.items():
        try:
            sampler.restore({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "_")})
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"checkpoint {restart}: its {name} sampler state is missing or damaged "
                             f"({type(err).__name__}: {err})") from None
    return int(state["step"])


def training_min_nbor_dist(systems: list[System], cfg: SeAConfig, frames_per_block: int = 64) -> float:
    """The smallest neighbour distance of the training data (minidp.neighbor_stat, within rcut), which
    the saved model keeps for compression."""
    from minidp.neighbor_stat import stat_blocks

    blocks = ((s.coords[i:i + frames_per_block], None if s.cells is None else s.cells[i:i + frames_per_block],
               s.atom_types) for s in systems for i in range(0, s.nframes, frames_per_block))
    return stat_blocks(blocks, cfg.rcut, cfg.ntypes).min_nbor_dist


def init_from_model(path, config: TrainConfig) -> EnergyModel:
    """--init-model: a trained model's weights, statistics and bias as the starting point (step 0)."""
    model = load_model(path)
    if model.descriptor.config != config.descriptor or tuple(model.type_map) != config.type_map:
        raise ValueError(f"--init-model {path} is a model of another shape than the input describes: "
                         f"{model.type_map} {model.descriptor.config} vs {list(config.type_map)} {config.descriptor}")
    hidden = tuple(layer.n_out for layer in model.fitting[0].layers[:-1])
    if hidden != config.fitting_neuron:
        raise ValueError(f"--init-model {path} has fitting widths {list(hidden)}; the input asks for "
                         f"{list(config.fitting_neuron)}")
    return model


def _setup(config: TrainConfig, restart, init_model=None):
    """Systems, samplers, model and optimizer: fresh (or from init_model), or as a checkpoint left them."""
    train_sys = load_systems(config.training.systems, config.type_map)
    val_sys = load_systems(config.validation.systems, config.type_map) if config.validation else []
    samplers = {"trn": Sampler(train_sys, config.training.batch_size, config.seed, config.training.sys_probs,
                               config.training.auto_prob)}
    if val_sys:
        samplers["val"] = Sampler(val_sys, config.validation.batch_size, config.seed + 1,
                                  config.validation.sys_probs, config.validation.auto_prob)
    data = data_fingerprint(train_sys)
    if restart is None:
        fresh = init_model is None
        model = initial_model(config, train_sys, samplers["trn"]) if fresh else init_from_model(init_model, config)
        step = 0
    else:
        model, state = load_checkpoint(restart)
        step = _restore(model, state, config, samplers, data, restart)
    opt = Adam(model.params())
    if restart is not None:
        restore_optimizer(opt, state)
    return train_sys, val_sys, samplers, model, opt, step, data


class OutputPlan(NamedTuple):
    """Where a run writes, checked before any data is read (:func:`plan_outputs`)."""

    lcurve: Path  # workdir/disp_file
    head: str  # what lcurve.out starts with: the header, or the kept lines of a resumed curve
    replace_lcurve: bool  # the first write replaces an existing lcurve.out
    inputs: tuple[Path, ...]  # the training and validation systems: no output may touch them


def _later_checkpoints(stem: Path, step: int) -> list[str]:
    """Complete checkpoints <stem>-<k> in stem's folder with k > step (a run that went further)."""
    later = []
    for npz in stem.parent.glob(f"{stem.name}-*.npz"):
        k = npz.name[len(stem.name) + 1:-len(".npz")]
        if k.isdigit() and int(k) > step and checkpoint_files(npz.with_suffix(""))[0].exists():
            later.append((int(k), npz.with_suffix("").name))
    return [name for _, name in sorted(later)]


def plan_outputs(config: TrainConfig, output, workdir: Path, restart, start: int, overwrite: bool) -> OutputPlan:
    """Refuse, before any data is read, a run that would write over anything but its own outputs.

    A fresh run refuses an existing lcurve.out, lcurve.png, checkpoint or model unless ``overwrite``
    (and then only minidp's own files of that kind). A restart continues its curve (dropping the
    lines after its checkpoint: a killed run's tail) but refuses to go back behind a later complete
    checkpoint (a finished or longer run: its lines, checkpoints and model would be lost) unless
    ``overwrite``; restarting into a new ``workdir`` keeps everything. It also refuses a numb_steps
    below the checkpoint's step.
    """
    n = config.numb_steps
    if start > n:
        raise ValueError(f"checkpoint {restart} is at step {start}, beyond numb_steps {n}: nothing to train "
                         f"(give --numb-steps of at least {start}, or restart from an earlier checkpoint)")
    inputs = tuple(config.training.systems) + (tuple(config.validation.systems) if config.validation else ())
    stem = workdir / config.save_ckpt
    later = _later_checkpoints(stem, start) if restart is not None else []
    if later and not overwrite:
        raise ValueError(f"{workdir} holds checkpoints after step {start} ({', '.join(later)}): restarting there "
                         "would replace them, their lines of the learning curve and the model; restart "
                         "into a new --workdir, or give --overwrite")
    keep = restart is not None
    if output is not None:
        check_output(output, "model", inputs + checkpoint_files(_checkpoint_path(restart)) if keep else inputs,
                     overwrite)
    for t in range(start + 1, n + 1):
        if t % config.save_freq == 0 or t == n:
            dp_file, npz_file = checkpoint_files(stem.parent / f"{stem.name}-{t}")
            check_output(dp_file, "model", inputs, overwrite or not npz_file.exists())
            check_output(npz_file, "checkpoint", inputs, overwrite)
    check_output(workdir / "lcurve.png", "png", inputs, overwrite or keep)
    lcurve = workdir / config.disp_file
    virial = config.loss.start_pref_v > 0 or config.loss.limit_pref_v > 0
    if keep and lcurve.exists():
        check_output(lcurve, "lcurve", inputs, True)
        kept = kept_lcurve(lcurve, start)
        own = _checkpoint_path(restart).parent.resolve() == workdir.resolve()
        if not own and not overwrite and kept != lcurve.read_text():
            # dropping lines is resuming only for the run the checkpoint belongs to
            raise ValueError(f"{lcurve} holds lines after step {start} of a run the checkpoint {restart} is not "
                             "from; restart into a new --workdir, or give --overwrite")
        return OutputPlan(lcurve, kept, True, inputs)
    check_output(lcurve, "lcurve", inputs, overwrite)
    head = "# " + " ".join(lcurve_columns(config.validation is not None, virial)) + "\n"
    return OutputPlan(lcurve, head, overwrite, inputs)


def train(config: TrainConfig, output=None, workdir=".", restart=None, progress: bool = True,
          overwrite: bool = False, init_model=None) -> TrainResult:
    """Train (module docstring); lcurve.out, checkpoints and lcurve.png go to workdir, the model to output
    (with the training data's smallest neighbour distance). ``init_model``: start from that model.

    Nothing a user made is written over (:func:`plan_outputs`); ``overwrite`` replaces minidp's own
    outputs of an earlier run."""
    import time

    from tqdm import tqdm

    if output is not None and Path(output).suffix.lower() not in NATIVE_SUFFIXES:
        # refused now, not after hours of training
        raise ValueError(f"cannot write {Path(output).suffix!r} models; expected one of {NATIVE_SUFFIXES}")
    workdir = Path(workdir)
    begin = 0 if restart is None else int(load_checkpoint_state(restart)["step"])
    plan = plan_outputs(config, output, workdir, restart, begin, overwrite)
    keep_freed_memory()
    train_sys, val_sys, samplers, model, opt, start, data = _setup(config, restart, init_model)
    cfg, n = config.descriptor, config.numb_steps
    virial = config.loss.start_pref_v > 0 or config.loss.limit_pref_v > 0
    head = plan.head
    times, last = [], {}
    bar = tqdm(total=n, initial=start, disable=not progress, unit="step", desc="training")
    for step in range(start, n + 1):
        # a checkpoint holds the state at the top of a step: resuming from it repeats nothing
        if step > start and (step % config.save_freq == 0 or step == n):
            save_checkpoint(workdir / config.save_ckpt, step, model, opt, samplers, data, overwrite)
        lr = exp_decay(step, config.start_lr, config.stop_lr, config.decay_steps, n)
        pref = prefactors(config.loss, lr, config.start_lr)
        t0 = time.perf_counter()
        k, frames = samplers["trn"].next()
        value, grads, _ = loss_and_grad(model, make_batch(train_sys[k], frames, cfg), pref)
        elapsed = time.perf_counter() - t0
        if step % config.disp_freq == 0 or step == n:
            # training and validation errors of the same weights, those before this step's update
            last = {"trn": value}
            if val_sys:
                last["val"] = validation_errors(model, val_sys, samplers["val"], config, pref)
            write_lcurve_line(plan.lcurve, lcurve_line(step, last, lr, virial), head, plan.replace_lcurve)
            head = None
            bar.set_postfix(rmse_e=f"{value.rmse_e:.2e}", rmse_f=f"{value.rmse_f:.2e}", lr=f"{lr:.1e}")
        if step < n:
            t0 = time.perf_counter()
            opt.step(grads, lr)
            times.append(elapsed + time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    if output is not None:
        save_model(output, model, overwrite=overwrite, inputs=plan.inputs,
                   min_nbor_dist=training_min_nbor_dist(train_sys, cfg))
    plot_lcurves({"minidp": plan.lcurve}, workdir / "lcurve.png")
    return TrainResult(model, float(np.mean(times[10:] or times or [math.nan])), np.array(times), last)
