r"""Floating-point operations per frame, counted from the model's sizes and the real neighbour counts.

Only the matrix-product-like work is counted, two FLOPs per multiply-add
(a dense layer with ``n_in`` inputs and ``n_out`` outputs costs
:math:`2\,n_{in} n_{out}` per row); activations, the environment matrix and
the force scatter are left out, so the achieved GFLOP/s are a lower bound of
the arithmetic done. What each implementation computes:

- **minidp**: only real neighbours go through the embedding net, in forward
  mode (value and dG/ds together: two matmuls per layer, :math:`2E` with
  :math:`E = \sum_l 2 n_{in,l} n_{out,l}`), and no backward through the net;
  the sum :math:`T = \sum_j G^\top R` costs :math:`8\,ng` per row forward and
  :math:`16\,ng + 2\,ng` backward (dL/dR, dL/dG, dL/ds).
- **tf** (deepmd-kit's frozen graph): every one of the ``sel`` slots, padding
  included, goes through the net forward and back (input gradients only:
  the weights are constants), :math:`2E` per slot; the sum :math:`8\,ng`
  forward and :math:`16\,ng` backward per slot.
- **tf-compressed** (``dp compress``): the net is a table of quintic
  polynomials, fused with the sum; its kernel stops at the first padded slot
  of each type section, so the rows are the real ones plus one per section.
- all three: :math:`D = T T^{<\top}` costs :math:`8\,ng\,m_2` per atom forward
  and twice that backward; the fitting net :math:`F = \sum_l 2 n_{in,l}
  n_{out,l}` forward and as much backward (input gradients only).

Shape symbols: ``nf``, ``nloc``, ``nnei``, ``ng``, ``m2``, ``ntypes`` as in
:mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

import numpy as np

from minidp.model import EnergyModel
from minidp.nn import Net

# A compressed embedding row, per feature g: the quintic's value by Horner's
# rule (5 multiply-adds) and its derivative (4), the fused sum G^T R (4
# multiply-adds forward), dL/dR and dL/dG (4 each) and dL/ds (1) backward.
TABLE_FLOPS_PER_FEATURE = 2 * (5 + 4)
TABLE_SUM_FLOPS_PER_FEATURE = 2 * (4 + 4 + 4 + 1)


def matmul_flops(net: Net) -> int:
    r""":math:`\sum_l 2\,n_{in,l}\,n_{out,l}`: FLOPs of one row through the net's matrix products."""
    return sum(2 * layer.n_in * layer.n_out for layer in net.layers)


def neighbour_counts(nlist: np.ndarray, atom_types: np.ndarray, sec) -> np.ndarray:
    r"""counts[t_i, t_j]: real neighbours of type t_j around atoms of type t_i, per frame.

    .. math::  c_{t_i t_j} = \frac{1}{n_f} \sum_{f} \sum_{i:\,t(i) = t_i} \#\{\text{real slots of section } t_j\}

    nlist (nf, nloc, nnei) with -1 for padding; sec: slot boundaries per type.
    Returns (ntypes, ntypes) float.
    """
    ntypes = len(sec) - 1
    # (nloc, ntypes)  real neighbours per atom and section, averaged over frames
    per_atom = np.stack([(nlist[:, :, sec[t]:sec[t + 1]] >= 0).mean(axis=0).sum(axis=-1) for t in range(ntypes)], -1)
    # (ntypes, ntypes)
    return np.stack([per_atom[atom_types == t].sum(axis=0) for t in range(ntypes)])


def flops_per_frame(model: EnergyModel, counts: np.ndarray, atoms_per_type: np.ndarray) -> dict[str, dict[str, float]]:
    """FLOPs of one frame's energy, forces and virial (the module docstring's counts), by part.

    counts (ntypes, ntypes) from :func:`neighbour_counts`; atoms_per_type
    (ntypes,) atoms of each type in the frame. Returns, for "minidp", "tf"
    and "tf-compressed", {"embedding", "contraction", "fitting", "total"}.
    """
    se, cfg = model.descriptor, model.descriptor.config
    ng, m2, nt = cfg.ng, cfg.axis_neuron, cfg.ntypes
    atoms_per_type = np.asarray(atoms_per_type, dtype=float)
    # (ntypes, ntypes)  slots, padding included, and one row pass of each embedding net
    slots = atoms_per_type[:, None] * np.asarray(cfg.sel, dtype=float)[None, :]
    emb = np.array([[matmul_flops(se.nets[ti, tj]) for tj in range(nt)] for ti in range(nt)], dtype=float)
    real, natoms = float(counts.sum()), float(atoms_per_type.sum())
    # D = T T<^T forward, and its two products backward
    contract_d = 3 * 8 * ng * m2 * natoms
    fitting = sum(2 * matmul_flops(model.fitting[t]) * atoms_per_type[t] for t in range(nt))
    table_rows = real + natoms * nt
    parts = {
        "minidp": (float((2 * emb * counts).sum()), (8 + 16 + 2) * ng * real + contract_d),
        "tf": (float((2 * emb * slots).sum()), (8 + 16) * ng * float(slots.sum()) + contract_d),
        "tf-compressed": (TABLE_FLOPS_PER_FEATURE * ng * table_rows,
                          TABLE_SUM_FLOPS_PER_FEATURE * ng * table_rows + contract_d),
    }
    return {name: {"embedding": e, "contraction": c, "fitting": float(fitting), "total": e + c + float(fitting)}
            for name, (e, c) in parts.items()}


def training_flops(model: EnergyModel, counts: np.ndarray, atoms_per_type: np.ndarray) -> dict[str, float]:
    r"""FLOPs of one training step on one frame (energy and force loss, exact second derivatives), by part.

    With :math:`E` one embedding row's matmul FLOPs, :math:`F` one fitting row's
    (:func:`matmul_flops`), n real rows and N atoms (padded-tail rows left out: a
    few hundred per net):

    - ``embedding forward``: value and tangent dG/ds of every real row, :math:`2E n`;
    - ``embedding backward``: the reverse of both to the weights, two products per layer
      for each of value and tangent (W-gradient, input gradient), :math:`4E n`;
    - ``fitting``: forward, backward to D (forces), the tangent pass (the value reused from
      the forward) and the reverse of value and tangent to the weights: :math:`(1 + 1 + 1 + 4) F N`;
    - ``sums``: T = sum G^T R forward (8 ng per row), its backward (18 ng), the tangent
      T' (16 ng) and the rows' cotangents (25 ng);
    - ``contraction``: D = T T<^T (8 ng m2 per atom), its backward (16), its tangent (16),
      and the second-order reverse through both (48).

    counts, atoms_per_type as :func:`flops_per_frame`. Returns the parts and "total".
    """
    se, cfg = model.descriptor, model.descriptor.config
    ng, m2, nt = cfg.ng, cfg.axis_neuron, cfg.ntypes
    atoms_per_type = np.asarray(atoms_per_type, dtype=float)
    emb = np.array([[matmul_flops(se.nets[ti, tj]) for tj in range(nt)] for ti in range(nt)], dtype=float)
    real, natoms = float(counts.sum()), float(atoms_per_type.sum())
    fit = float(sum(matmul_flops(model.fitting[t]) * atoms_per_type[t] for t in range(nt)))
    parts = {"embedding forward": float((2 * emb * counts).sum()),
             "embedding backward": float((4 * emb * counts).sum()),
             "fitting": 7 * fit,
             "sums": (8 + 18 + 16 + 25) * ng * real,
             "contraction": (8 + 16 + 16 + 48) * ng * m2 * natoms}
    return {**parts, "total": sum(parts.values())}
