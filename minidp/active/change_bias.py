r"""Change a model's per-type energy bias from data, as ``dp change-bias`` does.

The model's energy is E = sum_i (e_fit(D_i) + b_(t_i)): the bias b_t of each
type is a constant added to every atom of that type. For frames f with
n_ft atoms of type t, labels E_f and the model's predictions P_f:

- ``change`` (deepmd-kit's change-by-statistic): the shift d minimizing
  sum_f (sum_t n_ft d_t - (E_f - P_f))^2 is added, b <- b + d;
- ``set`` (set-by-statistic): the bias fitted to the labels alone,
  b <- argmin sum_f (sum_t n_ft b_t - E_f)^2;
- ``-b VALUE...``: b <- VALUE, one per type of the model's type map.

Least squares over frames (one row per frame, not per system, as deepmd-kit's
compute_stats_from_redu), solved by minidp.stats.energy_bias with rcond None
(deepmd-kit's default: singular values below machine precision times the
size are dropped). When every frame has the same composition the rows are
proportional and the minimum-norm solution spreads the shift in proportion
to the type counts, as deepmd-kit's does.

``-n NUMB_BATCH`` takes the first NUMB_BATCH frames of each system (0: all).
deepmd-kit's TensorFlow change-bias takes NUMB_BATCH frames of its shuffled
test set, the last set.* folder of each system (its PyTorch path samples
every set): with -n 0 on systems of one set.* folder, the usual case, all
three use the same frames.

deepmd-kit stores the new bias in its ``out_bias`` and leaves the fitting's
``bias_atom_e``; for ``set`` and ``-b`` its total bias is therefore the new
value plus bias_atom_e, which is zero in models deepmd-kit's PyTorch backend
trains (and non-zero in models converted from TensorFlow). minidp keeps one
bias per type, the total, and sets it.

Shape symbols: ``nf`` frames, ``ntypes`` types.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minidp.checks import integer
from minidp.infer import DeepPot
from minidp.io.model_check import check_bias
from minidp.io.outputs import check_output
from minidp.io.serialization import NATIVE_SUFFIXES, model_suffix, read_min_nbor_dist, save_model
from minidp.io.systems import lazy_system, model_types, read_frames, select_params
from minidp.stats import energy_bias


def frame_rows(systems, dp, numb_batch: int = 0):
    """Yield (block, model types (natoms,)) for the first numb_batch frames (0: all) of each system, with
    the frame and atomic parameters the model of DeepPot ``dp`` takes (minidp.io.systems.select_params)."""
    for path in systems:
        lazy = select_params(lazy_system(path), dp)
        if "energy" not in lazy.labels:
            raise ValueError(f"system {path} has no energy labels; change-bias fits the bias to them")
        types = model_types(lazy.atom_names, lazy.atom_types, dp.get_type_map())
        n = lazy.nframes if numb_batch <= 0 else min(numb_batch, lazy.nframes)
        yield read_frames(lazy, 0, n), types


def bias_from_data(dp, systems, mode: str = "change", numb_batch: int = 0) -> np.ndarray:
    """The new bias (ntypes,) of the model of DeepPot ``dp`` (see the module docstring for the modes)."""
    if mode not in ("change", "set"):
        raise ValueError(f"mode must be 'change' or 'set', got {mode!r}")
    ntypes = dp.get_ntypes()
    counts, target = [], []
    for block, types in frame_rows(systems, dp, numb_batch):
        nf = block.coords.shape[0]
        # (nf,)
        energy = block.labels["energy"]
        if mode == "change":
            e, _, _ = dp.eval(block.coords, block.cells, types, fparam=block.fparam, aparam=block.aparam)
            energy = energy - e[:, 0]
        # (nf, ntypes)  atoms of atom_exclude_types have no energy, hence no bias: their columns are 0
        # (as deepmd-kit's fit), and the least-squares bias of those types stays 0
        count = np.bincount(types, minlength=ntypes)
        count[list(dp.model.atom_exclude_types)] = 0
        counts.append(np.tile(count, (nf, 1)))
        target.append(energy)
    # (ntypes,)
    fitted = energy_bias(np.concatenate(target), np.concatenate(counts), rcond=None)
    return dp.model.bias + fitted if mode == "change" else fitted


def change_bias(model_path, output, systems=(), mode: str = "change", numb_batch: int = 0,
                bias_value=None, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Write the model with its new bias to ``output``; returns (old bias, new bias), each (ntypes,).

    ``output`` is checked before any work (minidp.io.outputs.check_output): never an input, never a
    user's file; ``overwrite`` replaces only a model minidp wrote. The new bias obeys the model
    checker's rule (:func:`minidp.io.model_check.check_bias`: finite, within +-MAX_BIAS), given
    (``bias_value``, checked before the model is read) or fitted, so what is written loads."""
    inputs = (model_path, *(systems or ()))
    check_output(output, "model", inputs, overwrite)
    model_suffix(output)
    numb_batch = integer("numb_batch (-n)", numb_batch, lo=0)
    if bias_value is not None:
        given = np.asarray(bias_value) if isinstance(bias_value, (list, tuple)) else bias_value
        bias_value = check_bias("bias_value (-b)", given, int(np.size(given)))
    elif not systems:
        raise ValueError("change-bias needs systems (-s) or bias values (-b)")
    dp = DeepPot(model_path)
    old = dp.model.bias.copy()
    if bias_value is not None:
        if bias_value.size != dp.get_ntypes():
            raise ValueError(f"-b gives {bias_value.size} values; expected one per type of the model's type map "
                             f"{dp.get_type_map()}")
        new = bias_value
    else:
        new = check_bias(f"the {mode} bias fitted to the systems", bias_from_data(dp, systems, mode, numb_batch),
                         dp.get_ntypes())
    dp.model.bias = new
    keep = read_min_nbor_dist(model_path) if Path(str(model_path)).suffix.lower() in NATIVE_SUFFIXES else None
    save_model(output, dp.model, overwrite=overwrite, inputs=inputs, min_nbor_dist=keep)
    return old, new
