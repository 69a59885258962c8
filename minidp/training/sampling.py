"""The training systems and how batches are drawn from them, as deepmd-kit draws them
(batch sizes, system probabilities, the per-system frame order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from minidp.checks import FrameError, InputError, number, short
from minidp.io.systems import (
    DEEPMD,
    LMDB,
    Block,
    LazySystem,
    block_types,
    find_systems,
    frame_kinds,
    guess_format,
    lazy_system,
    lmdb_systems,
    read_frames,
    require_labels,
    stored_type_map,
    system_file,
)
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
    # (nf,) True where fparam came from fparam.npy, False where default_fparam stood in (not data: the
    # fparam statistics leave those frames out, as deepmd-kit's do)
    fparam_found: np.ndarray | None = None

    @property
    def nframes(self) -> int:
        return self.coords.shape[0]


def training_systems(path, patterns=None) -> list[Path]:
    """The systems a ``systems`` entry names, found as deepmd-kit finds them
    (:func:`minidp.io.systems.find_systems`: a folder searched for type.raw, an HDF5 file for its
    groups); InputError if there is none, or one is not deepmd/npy or deepmd/hdf5."""
    found = find_systems(path, patterns)
    for p in found or [path]:
        if not found or guess_format(system_file(p)) not in (*DEEPMD, LMDB):
            raise InputError(f"training system {p} is not a deepmd/npy folder (with type.raw) or a deepmd/hdf5 "
                             "file (.h5, .hdf5), nor holds one; convert it first (dpdata)")
    return [Path(p) for p in found]


def data_type_map(paths, ntypes: int | None = None) -> list[str]:
    """The type map of an input without model/type_map, as deepmd-kit takes it from the data: the
    longest type_map.raw of the systems, every other one a prefix of it (InputError naming the system
    if not); without any, the type.raw indices as they are, named Type_0, Type_1, ... (ntypes of them,
    or as many as the data use)."""
    merged: list[str] = []
    for path in paths:
        stored = stored_type_map(path)
        if stored is None:
            continue
        n = min(len(stored), len(merged))
        if stored[:n] != merged[:n]:
            raise InputError(f"system {path}: type_map.raw {stored} disagrees with {merged} of the other systems; "
                             "give model/type_map")
        merged = stored if len(stored) > len(merged) else merged
    if merged:
        return merged
    if ntypes is None:
        ntypes = 1 + max(int(lazy.atom_types.max()) for p in paths for lazy in system_parts(p))
    return [f"Type_{t}" for t in range(ntypes)]


def system_parts(path, type_map=None) -> list[LazySystem]:
    """The LazySystem of a deepmd/npy(/mixed) folder or HDF5 group; those of an LMDB dataset (one per
    row of atom types, in memory: :func:`minidp.io.systems.lmdb_systems`)."""
    if guess_format(system_file(path)) == LMDB:
        return lmdb_systems(path, type_map)
    return [lazy_system(path, type_map, per_frame_types=True)]


def load_systems(paths, type_map, labels=(), numb_fparam: int = 0, numb_aparam: int = 0,
                 default_fparam=None) -> list[System]:
    """Read labelled deepmd/npy, deepmd/npy/mixed or deepmd/hdf5 systems whole, through the reader
    evaluation uses (:func:`minidp.io.systems.lazy_system`, :func:`~minidp.io.systems.read_frames`:
    every number checked finite, naming the file and the frame); types mapped onto type_map. A system
    without type_map.raw takes type_map's names for its type.raw indices (deepmd-kit's rule). A mixed
    system (per-frame types) becomes one System per kind of frame, its padding atoms left out.
    ``labels``: the extra per-atom label files every set must hold, {name: numbers per atom} as
    LossConfig.label_files gives them (:func:`read_atom_labels`); numb_fparam, numb_aparam (and
    default_fparam): the model's parameters to read (:func:`read_params`)."""
    widths = labels if isinstance(labels, dict) else dict.fromkeys(labels, 1)
    systems = []
    for lazy in (lazy for path in paths for lazy in system_parts(path, list(type_map))):
        require_labels(lazy.name, lazy.labels)
        block = read_frames(lazy, 0, lazy.nframes)
        for system in _systems_of(lazy, block, block_types(lazy, block, list(type_map))):
            if widths or numb_fparam or numb_aparam:
                extra = {name: read_atom_labels(lazy, name, system, width) for name, width in widths.items()}
                extra.update(read_params(lazy, system, numb_fparam, numb_aparam, default_fparam))
                system = system._replace(**extra)
            systems.append(system)
    return systems


def _systems_of(lazy: LazySystem, block: Block, types: np.ndarray) -> list[System]:
    """The System of a block of all frames; one per kind of frame for per-frame types (nf, natoms)."""
    labels = block.labels
    if types.ndim == 1:
        return [System(Path(lazy.name), block.coords, block.cells, types, labels["energy"], labels["force"],
                       labels.get("virial"), tuple(zip(lazy.sets, lazy.counts)))]
    kinds = frame_kinds(types, lazy.nframes)
    return [System(Path(f"{lazy.name}[kind {k}]") if len(kinds) > 1 else Path(lazy.name),
                   block.coords[kind.rows][:, kind.atoms], None if block.cells is None else block.cells[kind.rows],
                   kind.types, labels["energy"][kind.rows], labels["force"][kind.rows][:, kind.atoms],
                   None if "virial" not in labels else labels["virial"][kind.rows])
            for k, kind in enumerate(kinds)]


def epoch_steps(epochs: float, paths, setting, sys_probs=None, auto_prob: str = "prob_sys_size") -> int:
    """numb_epoch in steps, as deepmd-kit 3.2 converts it: ceil(epochs * ceil(max_k n_k / p_k)) over the
    systems drawn (p_k > 0), n_k = ceil(frames_k / batch_k) the batches of system k in one pass (its
    torch DataLoader's length) and p_k the probabilities :func:`system_probs` gives those n_k."""
    lazies = [lazy for p in paths for lazy in system_parts(p)]
    sizes = batch_sizes(setting, [s.natoms for s in lazies])
    # (nsystems,)
    nb = np.array([math.ceil(s.nframes / b) for s, b in zip(lazies, sizes)], dtype=float)
    p = system_probs(nb, sys_probs, auto_prob)
    drawn = p > 0
    return int(np.ceil(epochs * np.ceil(np.max(nb[drawn] / p[drawn]))))


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
    deepmd-kit reads them (an absent fparam.npy is the model's default_fparam, when it has one; fparam_found
    says which frames had the file)."""
    out = {}
    if numb_fparam:
        out["fparam"] = read_set_files(lazy, "fparam", system, numb_fparam, "the model's numb_fparam", default_fparam)
        out["fparam_found"] = np.repeat([_set_array(lazy, set_name, "fparam") is not None
                                         for set_name, _ in system.sets], [n for _, n in system.sets])
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
