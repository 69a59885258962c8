"""The training systems and how batches are drawn from them, as deepmd-kit draws them
(batch sizes, system probabilities, the per-system frame order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp.checks import FrameError, InputError, number, short
from minidp.io.systems import guess_format, lazy_system, model_types, read_system
from minidp.neighbor import build_neighbor_list
from minidp.se_e2_a import SeAConfig
from minidp.training.loss import Batch

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
    sets: tuple[tuple[str, int], ...] = ()  # (set.* name, its frames), in order
    # per-atom labels of the loss's extra terms (minidp.training.loss.LossConfig.label_files), None unless asked for
    atom_ener: np.ndarray | None = None  # (nf, nloc) atom_ener.npy
    atom_pref: np.ndarray | None = None  # (nf, nloc) atom_pref.npy
    atom_ener_coeff: np.ndarray | None = None  # (nf, nloc) atom_ener_coeff.npy
    drdq: np.ndarray | None = None  # (nf, nloc * 3 * ngc) drdq.npy
    fparam: np.ndarray | None = None  # (nf, nfp) fparam.npy, for a model with numb_fparam
    aparam: np.ndarray | None = None  # (nf, nloc, nap) aparam.npy, for a model with numb_aparam

    @property
    def nframes(self) -> int:
        return self.coords.shape[0]


# What deepmd-kit trains on; other formats are converted first (dpdata)
TRAINING_FORMATS = ("deepmd/npy", "deepmd/hdf5")
# The file each per-frame array of a System is read from
def load_systems(paths, type_map, labels=(), numb_fparam: int = 0, numb_aparam: int = 0,
                 default_fparam=None) -> list[System]:
    """Read labelled deepmd/npy (or deepmd/hdf5) systems through dpdata, all their set.* folders;
    types mapped onto type_map. The reader checks every value finite, naming the system and the frame
    (:func:`minidp.io.systems.read_system`): a NaN label would train every weight to NaN.
    ``labels``: the extra per-atom label files every set must hold, {name: numbers per atom} as
    LossConfig.label_files gives them (a tuple of names: one number each) (:func:`read_atom_labels`);
    numb_fparam, numb_aparam (and default_fparam): the model's parameters to read (:func:`read_params`)."""
    systems = []
    for path in paths:
        fmt = guess_format(Path(path))
        if Path(path).exists() and fmt not in TRAINING_FORMATS:
            raise InputError(f"training system {path} is not a deepmd/npy folder (with type.raw) or a deepmd/hdf5 "
                             "file (.h5, .hdf5); convert it first (dpdata)")
        lazy = lazy_system(path)  # the set.* folders and their frames
        s = read_system(path, fmt)
        if "energies" not in s.data or "forces" not in s.data:
            raise ValueError(f"system {path} has no energy and force labels: it cannot be trained on")
        nf = s.get_nframes()
        cells = None if s.nopbc else s["cells"].astype(np.float64)
        virial = s["virials"].reshape(nf, 9).astype(np.float64) if "virials" in s.data else None
        sets = tuple(zip(lazy.sets, lazy.counts)) if lazy.nframes == nf else (("", nf),)
        system = System(Path(path), s["coords"].astype(np.float64), cells,
                        model_types(s["atom_names"], s["atom_types"], list(type_map)),
                        s["energies"].astype(np.float64).reshape(nf), s["forces"].astype(np.float64), virial, sets)
        widths = labels if isinstance(labels, dict) else dict.fromkeys(labels, 1)
        extra = {name: read_atom_labels(lazy, name, system, width) for name, width in widths.items()}
        extra.update(read_params(lazy, system, numb_fparam, numb_aparam, default_fparam))
        systems.append(system._replace(**extra))
    return systems


# the extra per-atom label files and the loss keys that ask for them (for the error message)
ATOM_LABELS = {"atom_ener": "start_pref_ae/limit_pref_ae", "atom_pref": "start_pref_pf/limit_pref_pf",
               "atom_ener_coeff": "enable_atom_ener_coeff", "drdq": "start_pref_gf/limit_pref_gf"}


def read_atom_labels(lazy, name: str, system: System, width: int = 1) -> np.ndarray:
    """set.*/NAME.npy of every set of a system, ``width`` numbers per atom: (nf, nloc * width) float64
    (:func:`read_set_files`)."""
    values = read_set_files(lazy, name, system, system.atom_types.size * width, f"the loss's {ATOM_LABELS[name]}")
    return values.reshape(system.nframes, -1)


def read_params(lazy, system: System, numb_fparam: int, numb_aparam: int, default_fparam=None) -> dict:
    """The model's fparam (nf, nfp) from set.*/fparam.npy and aparam (nf, nloc, nap) from aparam.npy, as
    deepmd-kit reads them (an absent fparam.npy is the model's default_fparam, when it has one)."""
    out = {}
    if numb_fparam:
        out["fparam"] = read_set_files(lazy, "fparam", system, numb_fparam, "the model's numb_fparam", default_fparam)
    if numb_aparam:
        nloc = system.atom_types.size
        out["aparam"] = read_set_files(lazy, "aparam", system, nloc * numb_aparam,
                                       "the model's numb_aparam").reshape(system.nframes, nloc, numb_aparam)
    return out


def read_set_files(lazy, name: str, system: System, width: int, needed_by: str, default=None) -> np.ndarray:
    """set.*/NAME.npy of every set of a system, ``width`` numbers per frame (any shape of that size):
    (nf, width) float64, in frame order; a set without the file gets ``default`` (width,) in every frame.

    deepmd-kit requires the file of a term or input that is on: ValueError naming the file when a
    set lacks it (and there is no default), holds another size, or a value that is not finite.
    """
    if not system.sets or system.sets[0][0] == "":
        raise ValueError(f"system {system.path}: {name}.npy is read from set.* folders; this system has none")
    parts = []
    for set_name, count in system.sets:
        where = f"{system.path}/{set_name}/{name}.npy"
        values = _set_array(lazy, set_name, name)
        if values is None and default is not None:
            values = np.tile(np.asarray(default, dtype=np.float64), count)
        if values is None:
            raise ValueError(f"{where} is missing; {needed_by} needs it in every set")
        if values.size != count * width:
            raise ValueError(f"{where} holds {values.size} numbers; expected {count} frames x {width}")
        # (count, width)
        values = np.asarray(values, dtype=np.float64).reshape(count, width)
        if not np.isfinite(values).all():
            frame = int(np.argwhere(~np.isfinite(values))[0, 0])
            raise ValueError(f"{where}: frame {frame} holds a value that is not finite")
        parts.append(values)
    return np.concatenate(parts)


def _set_array(lazy, set_name: str, name: str) -> np.ndarray | None:
    """set_name/name.npy of a deepmd/npy folder or a deepmd/hdf5 group, or None when absent."""
    if lazy.group is None:
        file = lazy.path / set_name / f"{name}.npy"
        return np.load(file) if file.exists() else None
    import h5py  # optional: only deepmd/hdf5 systems need it

    with h5py.File(lazy.path, "r") as f:
        g = f[lazy.group] if lazy.group else f
        key = f"{set_name}/{name}.npy"
        return g[key][()] if key in g else None


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


AUTO_PROB = "prob_uniform, prob_sys_size or prob_sys_size;start:end:weight;... (deepmd-kit's auto_prob)"


def auto_prob_blocks(auto_prob: str, nsystems: int) -> list[tuple[int, int, float]]:
    """The blocks (start, end, weight) of "prob_sys_size;start:end:weight;...": systems start..end-1
    drawn with probability weight / (sum of the weights). InputError naming auto_prob unless every block
    is two integers 0 <= start < end <= nsystems and a finite weight >= 0, no two blocks share a system,
    and the weights are not all 0. ("prob_sys_size" is the one block 0:nsystems:1.)"""
    if auto_prob == "prob_sys_size":
        return [(0, nsystems, 1.0)]
    if not isinstance(auto_prob, str) or not auto_prob.startswith("prob_sys_size;"):
        raise InputError(f"auto_prob {short(auto_prob)}: expected {AUTO_PROB}")
    blocks = []
    for text in auto_prob.split(";")[1:]:
        parts = text.split(":")
        try:
            if len(parts) != 3:
                raise ValueError(text)
            a, b, w = int(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise InputError(f"auto_prob {auto_prob!r}: block {text!r} is not start:end:weight (two integers "
                             "and a number)") from None
        if not 0 <= a < b <= nsystems:
            what = "is empty" if a >= b else f"runs outside the systems 0..{nsystems - 1}"
            raise InputError(f"auto_prob {auto_prob!r}: block {text!r} {what}; expected 0 <= start < end <= "
                             f"{nsystems} (the number of systems)")
        blocks.append((a, b, number(f"auto_prob {auto_prob!r}: block {text!r}: weight", w, lo=0.0)))
    for (a0, b0, _), (a1, b1, _) in zip(sorted(blocks), sorted(blocks)[1:]):
        if a1 < b0:
            raise InputError(f"auto_prob {auto_prob!r}: blocks {a0}:{b0} and {a1}:{b1} overlap; expected each "
                             "system in one block at most")
    if sum(w for _, _, w in blocks) <= 0:
        raise InputError(f"auto_prob {auto_prob!r}: every block has weight 0; expected one weight above 0")
    return blocks


def system_probs(nbatches, sys_probs=None, auto_prob: str = "prob_sys_size") -> np.ndarray:
    r"""The probability of drawing each system, as deepmd-kit's DeepmdDataSystem.set_sys_probs.

    - sys_probs given: p_k as given where p_k >= 0; the rest 1 - sum of those,
      shared by the other systems in proportion to their batches nb_k;
    - prob_uniform: 1 / nsystems each;
    - prob_sys_size: p_k = nb_k / sum nb;
    - prob_sys_size;A:B:P;C:D:Q;...: the blocks of systems A..B-1, C..D-1, ...
      get P / (P + Q + ...), Q / (...), shared in each block by its batches
      (:func:`auto_prob_blocks`; systems in no block are not drawn).
    """
    nb = np.asarray(nbatches, dtype=float)
    if sys_probs is not None:
        p = np.asarray(sys_probs, dtype=float)
        given = p >= 0
        rest = 1.0 - p[given].sum()
        if rest < -1e-8:
            raise InputError(f"sys_probs {list(sys_probs)} sum to more than 1")
        if not np.isclose(rest, 0.0):
            if not (~given).any():
                raise InputError(f"sys_probs {list(sys_probs)} sum to {1 - rest:g}, not 1")
            return np.where(given, p, rest * nb * ~given / np.sum(nb * ~given))
        return np.where(given, p, 0.0)
    if auto_prob == "prob_uniform":
        return np.full(nb.size, 1.0 / nb.size)
    blocks = auto_prob_blocks(auto_prob, nb.size)
    total = sum(w for _, _, w in blocks)
    # (nsystems,)
    p = np.zeros(nb.size)
    for a, b, w in blocks:
        p[a:b] = nb[a:b] / nb[a:b].sum() * (w / total)
    return p


def _set_frames(system: System) -> list[int]:
    """Frames of each set.* folder of a system (one count if they are not known)."""
    return [n for _, n in system.sets] or [system.nframes]


def in_system(err: FrameError, system: System, frames: np.ndarray) -> FrameError:
    """An error about frame k of ``frames`` (a batch, a sample) as one about frame frames[k] of the system."""
    return FrameError(int(frames[err.frame]), f"system {system.path}: {err.message}")


def make_batch(system: System, frames: np.ndarray, cfg: SeAConfig) -> Batch:
    """The neighbour list and labels of some frames of a system."""
    cells = None if system.cells is None else system.cells[frames]
    try:
        nl = build_neighbor_list(system.coords[frames], cells, system.atom_types, cfg.rcut, list(cfg.sel))
    except FrameError as err:
        raise in_system(err, system, frames) from None
    virial = None if system.virial is None else system.virial[frames]
    extra = {k: None if getattr(system, k) is None else getattr(system, k)[frames]
             for k in (*ATOM_LABELS, "fparam", "aparam")}
    return Batch(nl.rij, nl.nlist, system.atom_types, system.energy[frames], system.force[frames], virial, **extra)


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
                **{f"order_{k}": o.copy() for k, o in enumerate(self.orders)}}

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
