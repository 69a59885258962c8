r"""Evaluating deepmd-kit and minidp on the same frames, and how far apart they are.

Both ``DeepPot`` classes share one interface, so one function evaluates either.
The compared quantities (``QUANTITIES``), per frame group:

- ``e/atom`` (nf,): :math:`E / N`; ``v/atom`` (nf, 9): :math:`W / N`;
- ``f`` (nf, natoms, 3), ``ae`` (nf, natoms), ``av`` (nf, natoms, 9);
- ``D`` (nf, natoms, ng * m2): the descriptor, from ``eval_descriptor``.

For each quantity :func:`max_errors` gives the largest absolute difference
:math:`\max |a - b|` over every entry of every group, where it is, and the
relative error :math:`\max |a - b| / \max |b|` (normwise: entrywise ratios
blow up on entries that are zero to round-off, such as most descriptor
columns of a lone atom).

Shape symbols: ``nf`` frames, ``natoms`` atoms per frame, ``ng``, ``m2`` as in :mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minidp.infer import Frames
from minidp.model import EnergyModel
from minidp.io.figures import rmse_mae

QUANTITIES = ("e/atom", "f", "v/atom", "ae", "av", "D")
# index names of each quantity's axes after the frame axis
AXES = {"e/atom": (), "f": ("atom", "component"), "v/atom": ("component",),
        "ae": ("atom",), "av": ("atom", "component"), "D": ("atom", "component")}


def evaluate(pot, frames: Frames, descriptor: bool = True) -> dict[str, np.ndarray]:
    """All of QUANTITIES for one frame group, from deepmd-kit's or minidp's DeepPot (shapes in the module docstring)."""
    nf, natoms, _ = frames.coords.shape
    coords = frames.coords.reshape(nf, natoms * 3)
    cells = None if frames.cells is None else frames.cells.reshape(nf, 9)
    e, f, v, ae, av = pot.eval(coords, cells, frames.atom_types, atomic=True)
    out = {"e/atom": e[:, 0] / natoms, "f": f, "v/atom": v / natoms, "ae": ae[..., 0], "av": av}
    if descriptor:
        out["D"] = pot.eval_descriptor(coords, cells, frames.atom_types)
    return out


@dataclass(frozen=True)
class Error:
    """How far one quantity is from the reference, over all groups of a case."""

    max_abs: float  # max |ours - reference|
    max_rel: float  # max_abs / max |reference| (0 when both are 0)
    where: dict  # group, frame and atom / component of max_abs; atom_type and both values there

    def to_dict(self) -> dict:
        return asdict(self)


def _locate(q: str, g: int, idx: tuple, types: np.ndarray, ours: np.ndarray, ref: np.ndarray) -> dict:
    where = {"group": g, "frame": int(idx[0])}
    where.update({name: int(i) for name, i in zip(AXES[q], idx[1:])})
    if "atom" in where:
        where["atom_type"] = int(types[where["atom"]])
    where.update(minidp=float(ours[idx]), reference=float(ref[idx]))
    return where


def max_errors(ours: list[dict], ref: list[dict], groups: tuple[Frames, ...]) -> dict[str, Error]:
    """Per quantity, the largest error over all groups and where it is (see the module docstring)."""
    errors = {}
    for q in (q for q in QUANTITIES if q in ref[0]):
        worst, where, scale = -1.0, {}, 0.0
        for g, (a, b) in enumerate(zip(ours, ref)):
            if b[q].size == 0:
                continue
            # (nf, ...) as the quantity
            diff = np.abs(a[q] - b[q])
            idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
            scale = max(scale, float(np.abs(b[q]).max()))
            if diff[idx] > worst:
                worst, where = float(diff[idx]), _locate(q, g, idx, groups[g].atom_types, a[q], b[q])
        rel = worst / scale if scale > 0 else (0.0 if worst == 0 else np.inf)
        errors[q] = Error(worst, rel, where)
    return errors


def type_offsets(ours: list[dict], ref: list[dict], groups: tuple[Frames, ...], ntypes: int) -> list[dict]:
    """Per atom type: mean and spread (max - min) of ae_minidp - ae_reference over all atoms of that type.

    A spread at round-off with a mean well above it is a per-type constant
    shift of the atomic energy: a bias that one side has and the other lacks.
    """
    diffs = [[] for _ in range(ntypes)]
    for a, b, frames in zip(ours, ref, groups):
        # (nf, natoms)
        d = a["ae"] - b["ae"]
        for t in range(ntypes):
            diffs[t].append(d[:, frames.atom_types == t].ravel())
    rows = []
    for t in range(ntypes):
        d = np.concatenate(diffs[t])
        if d.size:
            rows.append({"atom_type": t, "atoms": int(d.size), "mean": float(d.mean()),
                         "spread": float(d.max() - d.min())})
    return rows


# ---------------------------------------------------------------------------
# The two loaded models, parameter by parameter
# ---------------------------------------------------------------------------


def model_arrays(model: EnergyModel) -> dict[str, list[np.ndarray]]:
    """A model's parameters in five groups: davg, dstd, embedding and fitting nets (W, b, idt), bias."""
    se = model.descriptor

    def net_arrays(net):
        return [x for layer in net.layers for x in (layer.W, layer.b, layer.idt) if x is not None]

    return {
        "davg": [se.davg], "dstd": [se.dstd],
        "embedding": [x for _, net in se.nets.items() for x in net_arrays(net)],
        "fitting": [x for net in model.fitting for x in net_arrays(net)],
        "bias": [model.bias],
    }


def parameter_differences(a: EnergyModel, b: EnergyModel) -> dict[str, float]:
    """Largest |a - b| in each parameter group (inf where the shapes differ)."""
    out = {}
    for (name, xs), ys in zip(model_arrays(a).items(), model_arrays(b).values()):
        if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
            out[name] = np.inf
        else:
            out[name] = max((float(np.abs(x - y).max(initial=0.0)) for x, y in zip(xs, ys)), default=0.0)
    return out


OUT_BIAS_NAMES = ("model_attr/t_out_bias", "model_attr/model_attr/t_out_bias")


def pb_out_bias(path) -> dict:
    """The atomic model's out_bias of a .pb, as its TF graph holds it and as deepmd-kit's converter reads it.

    deepmd-kit 3.2's reader looks for the first of OUT_BIAS_NAMES; its graphs
    store the second. Returns {"model", "graph": {tensor name: values},
    "converter": values or None}.
    """
    from deepmd.tf.utils.graph import get_tensor_by_name_from_graph, load_graph_def
    from deepmd.tf.utils.errors import GraphWithoutTensorError

    from minidp.io.serialization import read_model_dict

    graph, _ = load_graph_def(str(path))
    found = {}
    for name in OUT_BIAS_NAMES:
        try:
            found[name] = np.ravel(get_tensor_by_name_from_graph(graph, name)).tolist()
        except GraphWithoutTensorError:
            continue
    converted = read_model_dict(path)["model"].get("@variables", {}).get("out_bias")
    return {"model": str(path), "graph": found,
            "converter": None if converted is None else np.ravel(converted).tolist()}


# ---------------------------------------------------------------------------
# Against the labels: dp test's figures
# ---------------------------------------------------------------------------


def label_errors(pot, frames: Frames, labels: dict) -> tuple[dict, dict]:
    """RMSE of energy per atom, force and virial per atom (if labelled) against the labels, as dp test.

    labels: energy (nf,), force (nf, natoms, 3), optional virial (nf, 9).
    Returns (RMSEs, predictions energy/force/virial for the parity plots).
    """
    nf, natoms, _ = frames.coords.shape
    cells = None if frames.cells is None else frames.cells.reshape(nf, 9)
    e, f, v = pot.eval(frames.coords.reshape(nf, -1), cells, frames.atom_types)
    predicted = {"energy": e[:, 0], "force": f, "virial": v}
    rmse = {"energy_per_atom": rmse_mae(e[:, 0], labels["energy"])[0] / natoms,
            "force": rmse_mae(f, labels["force"])[0]}
    if "virial" in labels:
        rmse["virial_per_atom"] = rmse_mae(v, labels["virial"])[0] / natoms
    return rmse, predicted
