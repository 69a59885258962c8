r"""Model deviation of an ensemble, with ``dp model-devi``'s definitions and file.

Active learning (DP-GEN and its kin) trains several models that differ only in
their seeds and labels the configurations where they disagree. For ``nm``
models predicting, for one frame of ``natoms`` atoms, forces F^k_i, virials
W^k and energies E^k (k = 1..nm), with <x> = (1/nm) sum_k x^k and the
population standard deviation std(x) = sqrt(<x^2> - <x>^2) (divisor nm, as
NumPy's default and deepmd-kit):

- force, per atom:  eps_f,i = || std_k(F^k_i) ||, the norm over x, y, z of the
  per-component std; the file holds max_i, min_i and the mean over i;
- virial, per atom: eps_v,c = std_k(W^k_c / natoms) for each of the 9
  components c; the file holds max_c, min_c and the root mean square
  sqrt((1/9) sum_c eps_v,c^2) (deepmd-kit writes it as ``avg_devi_v``);
- energy, per atom: eps_e = std_k(E^k / natoms) (``devi_e``).

Options, as deepmd-kit defines them:

- ``relative=L`` (force): eps_f,i / (|| <F_i> || + L);
- ``relative_v=L`` (virial): eps_v,c / (|<W_c / natoms>| + L), component by
  component, the definition of deepmd-kit's C++ ``compute_relative_std`` (its
  LAMMPS pair style). deepmd-kit 3.2's Python ``dp model-devi --relative_v``
  divides by the norm of the 9-vector instead, and its broadcasting fails on
  more than one frame; minidp follows the C++;
- ``real_error``: the reference (labels) replaces the ensemble mean: std
  becomes the RMS over models of (x^k - x_ref), and with ``relative`` the
  magnitude is that of the reference force (|| F_ref,i ||).

The public API (engineer i13's LAMMPS ensemble imports it):

- :func:`force_deviation` (nm, nf, natoms, 3) -> (nf, natoms) eps_f,i;
- :func:`virial_deviation` (nm, nf, 9), natoms -> (nf, 9) eps_v,c;
- :func:`energy_deviation` (nm, nf), natoms -> (nf,) eps_e;
- :func:`deviation_columns` -> (nf, 7 [+ natoms]) the file's columns after the step;
- :func:`header`, :func:`format_rows`, :func:`write_model_devi`: deepmd-kit's
  header lines (``# <system>`` then ``# step max_devi_v ...``) and number
  formats (``%12d`` step, ``%19.6e`` columns, no delimiter); deepmd-kit
  appends to an existing file, and so does :func:`write_model_devi`;
- :class:`Ensemble`: several models evaluated together; the models sharing
  rcut and sel share one neighbour list per chunk. ``Ensemble(models).eval(coords,
  cells, types, relative=..., relative_v=..., real=..., atomic=...)`` returns an
  :class:`EnsembleResult` (energy (nm, nf), force (nm, nf, natoms, 3), virial
  (nm, nf, 9), devi (nf, 7 [+ natoms])); ``predict`` the first three only;
- :func:`expand_systems` and :func:`system_deviations`: the command's systems
  (folders searched for type.raw, HDF5 files for their groups) and one
  system's steps and columns, read block by block from disk (frames of
  deepmd/npy/mixed per-frame types evaluated one kind at a time).

Shape symbols: ``nm`` models, ``nf`` frames, ``natoms`` atoms per frame.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp.checks import number, positive_int, real_array
from minidp.infer import DeepPot
from minidp.io.outputs import safe_output
from minidp.io.systems import (
    Block,
    LazySystem,
    block_types,
    by_kind,
    find_systems,
    iter_blocks,
    lazy_system,
    select_params,
)

# ---------------------------------------------------------------------------
# The deviations: small pure functions
# ---------------------------------------------------------------------------


def _spread(values: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """std over the models (axis 0), or with a reference the RMS over models of (value - reference)."""
    if reference is None:
        return np.std(values, axis=0)
    return np.sqrt(np.mean(np.square(values - reference), axis=0))


def force_deviation(forces, relative: float | None = None, real_forces=None) -> np.ndarray:
    r"""eps_f,i = || std_k F^k_i ||, (nm, nf, natoms, 3) -> (nf, natoms).

    relative=L divides by || <F_i> || + L (|| F_ref,i || + L with real_forces);
    real_forces (nf, natoms, 3) turns the std into the RMS error against them.
    """
    F = real_array("forces", forces)
    if F.ndim != 4 or F.shape[-1] != 3:
        raise ValueError(f"forces must have shape (nmodels, nframes, natoms, 3), got {F.shape}")
    # (nf, natoms, 3) or None
    ref = None if real_forces is None else real_array("real_forces", real_forces).reshape(F.shape[1:])
    # (nf, natoms)
    eps = np.linalg.norm(_spread(F, ref), axis=-1)
    if relative is not None:
        relative = number("relative", relative, lo=0.0)
        # (nf, natoms)
        magnitude = np.linalg.norm(F.mean(axis=0) if ref is None else ref, axis=-1)
        eps = eps / (magnitude + relative)
    return eps


def virial_deviation(virials, natoms: int, relative_v: float | None = None, real_virials=None) -> np.ndarray:
    r"""eps_v,c = std_k (W^k_c / natoms), (nm, nf, 9) -> (nf, 9).

    relative_v=L divides each component by |<W_c / natoms>| + L (the C++
    compute_relative_std; |W_ref,c / natoms| + L with real_virials (nf, 9)).
    """
    W = real_array("virials", virials)
    if W.ndim != 3 or W.shape[-1] != 9:
        raise ValueError(f"virials must have shape (nmodels, nframes, 9), got {W.shape}")
    natoms = positive_int("natoms", natoms)
    # (nm, nf, 9)
    w = W / natoms
    # (nf, 9)
    ref = None if real_virials is None else real_array("real_virials", real_virials).reshape(W.shape[1:]) / natoms
    # (nf, 9)
    eps = _spread(w, ref)
    if relative_v is not None:
        relative_v = number("relative_v", relative_v, lo=0.0)
        eps = eps / (np.abs(w.mean(axis=0) if ref is None else ref) + relative_v)
    return eps


def energy_deviation(energies, natoms: int, real_energies=None) -> np.ndarray:
    r"""eps_e = std_k (E^k / natoms), (nm, nf) (or (nm, nf, 1)) -> (nf,); RMS error with real_energies (nf,)."""
    E = real_array("energies", energies)
    if E.ndim == 3 and E.shape[-1] == 1:
        E = E[..., 0]
    if E.ndim != 2:
        raise ValueError(f"energies must have shape (nmodels, nframes), got {E.shape}")
    natoms = positive_int("natoms", natoms)
    # (nf,) or None
    ref = None if real_energies is None else real_array("real_energies", real_energies).reshape(-1) / natoms
    return _spread(E / natoms, ref)


def deviation_columns(energies, forces, virials, *, relative: float | None = None,
                      relative_v: float | None = None, real: dict | None = None,
                      atomic: bool = False) -> np.ndarray:
    """The columns of model_devi.out after the step, (nf, 7) or (nf, 7 + natoms) with atomic.

    max/min/RMS of eps_v,c over c; max/min/mean of eps_f,i over i; eps_e;
    then eps_f,i of every atom with ``atomic``. ``real``: the labels
    {"energy": (nf,), "force": (nf, natoms, 3), "virial": (nf, 9)} for the RMS errors.
    """
    real = real or {}
    natoms = np.shape(forces)[2]
    # (nf, 9), (nf, natoms), (nf,)
    ev = virial_deviation(virials, natoms, relative_v, real.get("virial"))
    ef = force_deviation(forces, relative, real.get("force"))
    ee = energy_deviation(energies, natoms, real.get("energy"))
    cols = [ev.max(axis=1), ev.min(axis=1), np.sqrt(np.mean(ev**2, axis=1)),
            ef.max(axis=1), ef.min(axis=1), ef.mean(axis=1), ee]
    # (nf, 7)
    out = np.stack(cols, axis=1)
    return np.concatenate([out, ef], axis=1) if atomic else out


# ---------------------------------------------------------------------------
# deepmd-kit's file
# ---------------------------------------------------------------------------

COLUMNS = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e")


def header(system: str = "", atomic: bool = False) -> str:
    """The two comment lines deepmd-kit writes above a block: '# <system>' and the column names."""
    names = f"{'step':10s}" + "".join(f"{c:19s}" for c in COLUMNS)
    if atomic:
        names += f"{'atm_devi_f(N)':19s}"
    return f"# {system}\n# {names}\n"


def format_rows(steps, columns) -> str:
    """Rows as deepmd-kit prints them: the step as %12d, each column as %19.6e, no separator."""
    cols = np.asarray(columns, dtype=float)
    return "".join(f"{int(s):12d}" + "".join(f"{x:19.6e}" for x in row) + "\n" for s, row in zip(steps, cols))


def write_model_devi(path, blocks, atomic: bool = False, inputs=()) -> None:
    """Append one block per system: [(system name, steps (nf,), columns (nf, 7 [+ natoms])), ...].

    deepmd-kit opens the file in append mode, so a second run adds blocks
    after the first; minidp appends only to a file that already is a model
    deviation file (anything else is refused, minidp.io.outputs.check_output). The
    old text and the new go to a temporary file moved onto ``path`` when
    complete (minidp.io.outputs.safe_output): a failure leaves the file as it was.
    """
    text = "".join(header(name, atomic) + format_rows(steps, cols) for name, steps, cols in blocks)
    path = Path(path)
    before = path.read_text() if path.is_file() else ""
    with safe_output(path, "model_devi", inputs, overwrite=True) as tmp:
        tmp.write_text(before + text)


# ---------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------


class EnsembleResult(NamedTuple):
    """Each model's predictions and the deviation columns."""

    energy: np.ndarray  # (nm, nf)
    force: np.ndarray  # (nm, nf, natoms, 3)
    virial: np.ndarray  # (nm, nf, 9)
    devi: np.ndarray  # (nf, 7) or (nf, 7 + natoms): the columns of model_devi.out after the step


class Ensemble:
    """Several models evaluated on the same frames, as ``dp model-devi`` does.

    ``models``: model files or :class:`minidp.DeepPot` objects (the keyword
    options build the DeepPots of files). All must have the same type map.
    Models with the same rcut and sel form a group: each chunk's neighbour
    list is built once and serves the whole group
    (:meth:`minidp.infer.DeepPot.iter_eval_shared`), so an ensemble of 4 costs
    less than 4 evaluations.
    """

    def __init__(self, models, **deeppot_options):

        models = list(models)
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
        self.pots = [m if isinstance(m, DeepPot) else DeepPot(m, **deeppot_options) for m in models]
        first = self.pots[0]
        for dp in self.pots[1:]:
            if dp.get_type_map() != first.get_type_map():
                raise ValueError(f"models {first.model_file} (type map {first.get_type_map()}) and "
                                 f"{dp.model_file} (type map {dp.get_type_map()}) have different type maps")
            dims, first_dims = (dp.get_dim_fparam(), dp.get_dim_aparam()), (first.get_dim_fparam(),
                                                                             first.get_dim_aparam())
            if dims != first_dims:  # one fparam/aparam array serves every model
                raise ValueError(f"models {first.model_file} (numb_fparam, numb_aparam = {first_dims}) and "
                                 f"{dp.model_file} ({dims}) take different frame or atomic parameters")
        groups: dict[tuple, list[int]] = {}
        for k, dp in enumerate(self.pots):
            groups.setdefault((dp.get_rcut(), tuple(dp.get_sel())), []).append(k)
        self.groups = list(groups.values())  # model indices sharing one neighbour list

    def get_type_map(self) -> list[str]:
        return self.pots[0].get_type_map()

    def get_dim_fparam(self) -> int:
        return self.pots[0].get_dim_fparam()

    def get_dim_aparam(self) -> int:
        return self.pots[0].get_dim_aparam()

    def has_default_fparam(self) -> bool:
        """True when every model has a default_fparam (fparam may then be left out)."""
        return all(dp.has_default_fparam() for dp in self.pots)

    def predict(self, coords, cells, atom_types, fparam=None, aparam=None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Energies (nm, nf), forces (nm, nf, natoms, 3), virials (nm, nf, 9) of every model
        (fparam and aparam as minidp.DeepPot.eval takes them)."""
        nm = len(self.pots)
        E, F, W = {}, {}, {}  # model index -> [(frame slice, values)]
        for group in self.groups:
            # the smallest chunks of the group lead: its models run one after another on each chunk
            lead = min(group, key=lambda k: self.pots[k].batch_size)
            order = [lead] + [k for k in group if k != lead]
            others = [self.pots[k] for k in order[1:]]
            for fs, predictions in self.pots[lead].iter_eval_shared(coords, cells, atom_types, others, fparam, aparam):
                for k, p in zip(order, predictions):
                    E.setdefault(k, []).append((fs, p.energy))
                    F.setdefault(k, []).append((fs, p.force))
                    W.setdefault(k, []).append((fs, p.virial))
        # (nm, nf), (nm, nf, natoms, 3), (nm, nf, 9): the slices of each model cover its frames in order
        return tuple(np.stack([np.concatenate([v for _, v in parts[k]]) for k in range(nm)]) for parts in (E, F, W))

    def eval(self, coords, cells, atom_types, *, relative: float | None = None, relative_v: float | None = None,
             real: dict | None = None, atomic: bool = False, fparam=None, aparam=None) -> EnsembleResult:
        """Every model's predictions and the deviation columns (see :func:`deviation_columns`)."""
        E, F, W = self.predict(coords, cells, atom_types, fparam, aparam)
        devi = deviation_columns(E, F, W, relative=relative, relative_v=relative_v, real=real, atomic=atomic)
        return EnsembleResult(E, F, W, devi)


# ---------------------------------------------------------------------------
# dp model-devi: systems in, model_devi.out out
# ---------------------------------------------------------------------------


def expand_systems(roots) -> list[str]:
    """The systems under each root, as deepmd-kit's -s expands them (:func:`minidp.io.systems.find_systems`:
    folders searched for type.raw, HDF5 files for groups holding one; any other file as given)."""
    found = [system for root in roots for system in find_systems(root)]
    if not found:
        raise ValueError(f"no system (a folder or HDF5 group with type.raw) under {[str(r) for r in roots]}")
    return found


def system_deviations(ensemble: Ensemble, path, *, frequency: int = 1, real_error: bool = False,
                      frames_per_block: int = 256, **options) -> tuple[np.ndarray, np.ndarray]:
    """Steps (nf,) and deviation columns of one system (a :class:`minidp.io.systems.LazySystem`, or a
    deepmd/npy, deepmd/npy/mixed or deepmd/hdf5 path), read block by block.

    ``options``: relative, relative_v, atomic of :func:`deviation_columns`.
    With ``real_error`` the system's labels replace the ensemble mean.
    Frames of per-frame types are evaluated one kind at a time; a padding atom's column is 0.
    """
    system = path if isinstance(path, LazySystem) else lazy_system(path, per_frame_types=True)
    system = select_params(system, ensemble)
    frequency = positive_int("frequency", frequency)
    missing = [k for k in ("energy", "force", "virial") if k not in system.labels]
    if real_error and missing:
        # deepmd-kit reads absent labels as zeros; so does minidp, but says so
        print(f"warning: {system.name} has no {', '.join(missing)} labels: --real_error compares with zeros",
              file=sys.stderr)
    parts = [block_deviations(ensemble, block, block_types(system, block, ensemble.get_type_map()), real_error,
                              **options)
             for block in iter_blocks(system, frames_per_block, labels=real_error)]
    devi = np.concatenate(parts)
    return np.arange(len(devi)) * frequency, devi


def block_deviations(ensemble: Ensemble, block: Block, atom_types: np.ndarray, real_error: bool = False,
                     atomic: bool = False, **options) -> np.ndarray:
    """The deviation columns (nf, 7 [+ natoms]) of a block's frames, each kind of frame apart
    (atom_types (natoms,) or per frame (nf, natoms), minidp.io.systems.by_kind)."""
    nf, natoms = block.coords.shape[:2]
    # energy (nf,), force (nf, natoms, 3), virial (nf, 9): zeros where the system has no label
    zeros = {"energy": np.zeros(nf), "force": np.zeros_like(block.coords), "virial": np.zeros((nf, 9))}
    labels = {**zeros, **block.labels}
    # (nf, 7 [+ natoms])
    devi = np.zeros((nf, 7 + (natoms if atomic else 0)))
    for kind, (E, F, W) in by_kind(block, atom_types, ensemble.predict):
        real = None
        if real_error:
            real = {"energy": labels["energy"][kind.rows], "force": labels["force"][np.ix_(kind.rows, kind.atoms)],
                    "virial": labels["virial"][kind.rows]}
        columns = deviation_columns(E, F, W, real=real, atomic=atomic, **options)
        devi[kind.rows, :7] = columns[:, :7]
        if atomic:
            devi[np.ix_(kind.rows, 7 + kind.atoms)] = columns[:, 7:]
    return devi
