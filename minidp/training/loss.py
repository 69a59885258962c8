r"""deepmd-kit's ``ener`` loss and its exact gradient with respect to every weight.

For a batch of ``nf`` frames of ``N`` atoms with labels :math:`E^*, F^*, W^*`:

.. math::

    L = \frac{p_e}{N} \langle (E - E^*)^2 \rangle
      + p_f \langle (F - F^*)^2 \rangle
      + \frac{p_v}{N} \langle (W - W^*)^2 \rangle,
    \qquad p = p_{limit} + (p_{start} - p_{limit}) \frac{\eta_t}{\eta_0},

where :math:`\langle\cdot\rangle` averages over every number of the batch
(frames; frames x atoms x 3; frames x 9) and the prefactors move with the
learning rate :math:`\eta_t` (deepmd-kit's TensorFlow backend; the energy
term is divided by N once, not twice).

**The gradient.** L depends on the weights :math:`\theta` through E, F and W.
With the cotangents :math:`c = \partial L/\partial E`,
:math:`\mathbf v_k = \partial L/\partial \mathbf F_k`, :math:`V = \partial L/\partial W`
(held fixed), and :math:`F = -\partial E/\partial \mathbf r`,
:math:`W = -\partial E/\partial \varepsilon`,

.. math::

    \frac{dL}{d\theta} = \frac{\partial}{\partial\theta}\Big( c\,E - \dot E \Big),
    \qquad \dot E = \sum_{ij} \mathbf g_{ij} \cdot \delta\mathbf r_{ij},
    \qquad \delta\mathbf r_{ij} = \mathbf v_j - \mathbf v_i + V\,\mathbf r_{ij}:

the force and virial terms are the energy's derivative along one
displacement of the pairs, in which every atom k moves by
:math:`\mathbf v_k` and the cell is strained by V. :math:`\dot E` comes from
forward-mode tangents (``*_jvp`` in :mod:`minidp.training.force_training`, the
training-only second-order step), and one reverse pass through the values and their
tangents gives its gradient: exact second derivatives, no finite
differences, no graph.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei, ng, m2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from minidp.checks import number
from minidp.model import EnergyModel, model_backward, model_forward, pair_forces_virials
from minidp.nn import add_grads, zeros_like_params
from minidp.runtime import default_workers, parallel_map
from minidp.se_e2_a import check_descriptor_inputs
from minidp.training.force_training import weight_gradients


@dataclass(frozen=True)
class LossConfig:
    """deepmd-kit's ``ener`` loss prefactors (its names and defaults)."""

    start_pref_e: float = 0.02  # energy prefactor at the start learning rate
    limit_pref_e: float = 1.0  # ... and as the learning rate goes to zero
    start_pref_f: float = 1000.0  # force prefactor at the start
    limit_pref_f: float = 1.0  # ... at the end
    start_pref_v: float = 0.0  # virial prefactor at the start (0 and 0: no virial term)
    limit_pref_v: float = 0.0  # ... at the end

    def __post_init__(self):
        for name in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v"):
            number(f"loss {name}", getattr(self, name), lo=0.0)


def prefactors(config: LossConfig, lr: float, start_lr: float) -> tuple[float, float, float]:
    """(p_e, p_f, p_v) at learning rate lr: p = limit + (start - limit) lr / start_lr."""
    frac = lr / start_lr
    c = config
    return (c.limit_pref_e + (c.start_pref_e - c.limit_pref_e) * frac,
            c.limit_pref_f + (c.start_pref_f - c.limit_pref_f) * frac,
            c.limit_pref_v + (c.start_pref_v - c.limit_pref_v) * frac)


class Batch(NamedTuple):
    """Frames of one system with their neighbour lists and labels."""

    rij: np.ndarray  # (nf, nloc, nnei, 3) pair displacements, 0 where padded
    nlist: np.ndarray  # (nf, nloc, nnei) neighbour indices, -1 where padded
    atom_types: np.ndarray  # (nloc,)
    energy: np.ndarray  # (nf,) labels
    force: np.ndarray  # (nf, nloc, 3)
    virial: np.ndarray | None  # (nf, 9), or None when the system has no virial labels


class LossValue(NamedTuple):
    """The loss and deepmd-kit's displayed errors for one batch."""

    loss: float  # L
    rmse: float  # sqrt(L), deepmd-kit's "rmse" column
    rmse_e: float  # sqrt(<(E - E*)^2>) / N, eV/atom
    rmse_f: float  # sqrt(<(F - F*)^2>), eV/Angstrom
    rmse_v: float  # sqrt(<(W - W*)^2>) / N, or nan without virial labels


def ener_loss(energy, force, virial, batch: Batch, pref: tuple[float, float, float]):
    """L (module docstring) and its cotangents dL/dE (nf,), dL/dF (nf, nloc, 3), dL/dW (nf, 9).

    The virial term is left out (its cotangent is zero) when p_v is 0 or the
    batch has no virial labels, as deepmd-kit does.
    """
    pe, pf, pv = pref
    nf, natoms = force.shape[:2]
    # (nf,), (nf, nloc, 3)
    dE, dF = energy - batch.energy, force - batch.force
    l2_e, l2_f = np.mean(dE**2), np.mean(dF**2)
    loss = pe / natoms * l2_e + pf * l2_f
    # (nf, 9)
    c_W = np.zeros_like(virial)
    rmse_v = math.nan
    if batch.virial is not None:
        dW = virial - batch.virial
        l2_v = np.mean(dW**2)
        rmse_v = math.sqrt(l2_v) / natoms
        if pv:
            loss += pv / natoms * l2_v
            c_W = 2.0 * pv / natoms * dW / dW.size
    value = LossValue(loss, math.sqrt(loss), math.sqrt(l2_e) / natoms, math.sqrt(l2_f), rmse_v)
    # the mean's 1/size and the square's 2, by the chain rule
    return value, 2.0 * pe / natoms * dE / dE.size, 2.0 * pf * dF / dF.size, c_W


def pair_tangent(v: np.ndarray, V: np.ndarray, rij: np.ndarray, nlist: np.ndarray) -> np.ndarray:
    r"""delta r_ij = v_j - v_i + V r_ij (V as 3x3 per frame), zero on padded slots; (nf, nloc, nnei, 3).

    Atom k moved by v_k moves r_ij = r_j - r_i by v_j - v_i, and the strain
    r -> (1 + V) r moves it by V r_ij, image shifts included.
    """
    nf, nloc, nnei = nlist.shape
    real = nlist >= 0
    # (nf, nloc, nnei, 3)  v_j, gathered frame by frame; padded slots read atom 0 and are zeroed
    vj = np.take_along_axis(v, np.where(real, nlist, 0).reshape(nf, -1, 1), axis=1).reshape(nf, nloc, nnei, 3)
    drij = vj - v[:, :, None, :] + np.einsum("fab,finb->fina", V.reshape(nf, 3, 3), rij)
    drij *= real[..., None]
    return drij


# Fewest centre atoms (times frames) a piece of a training step gets: each piece repeats the padded tails and
# runs the fitting products on fewer rows (on one core two pieces of 96 atoms cost 13% more than one of 192,
# four of 48 23% more), so a many-core machine does not cut a 192-atom frame into slivers.
MIN_PIECE_ATOMS = 48


def centre_chunks(nloc: int, pieces: int) -> list[slice]:
    """The centre atoms 0..nloc-1 cut into at most ``pieces`` near-equal contiguous ranges (none empty)."""
    cuts = np.linspace(0, nloc, min(pieces, nloc) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def loss_and_grad(model: EnergyModel, batch: Batch, pref: tuple[float, float, float], backend: str = "numba",
                  workers: int | None = None):
    """The loss of one batch and dL/dtheta in model.params() layout (math in the module docstring).

    Returns (LossValue, grads, (energy, force, virial) predicted). ``backend``:
    "numpy" or "numba" (the fast path; the reference path has no tangents).
    The backend, the model (not a compressed one) and the batch's nlist are
    checked first (:func:`minidp.se_e2_a.check_descriptor_inputs`).

    The energy is a sum over centre atoms, and so are the pair gradients g and the
    second-order S = c E - E' (sum over pairs ij of centre i): both passes split
    over ranges of centre atoms (of at least MIN_PIECE_ATOMS atoms x frames) that
    ``workers`` threads (default minidp.runtime.default_workers) compute at once, each with one BLAS thread
    (minidp.runtime.parallel_map); only the forces' scatter and the loss, which
    need every centre's g, run between them. The results do not depend on
    ``workers`` beyond round-off (the weight gradients add the ranges' shares).
    """
    check_descriptor_inputs(batch.nlist, model.descriptor, backend, keep=True)
    if model.options():  # the weight gradients (minidp.training.force_training) know the plain fitting only
        raise ValueError(f"training a model with {', '.join(model.options())} is not supported yet")
    types, rij, nlist = batch.atom_types, batch.rij, batch.nlist
    workers = default_workers() if workers is None else workers
    chunks = centre_chunks(types.size, min(workers, max(1, rij.shape[0] * types.size // MIN_PIECE_ATOMS)))

    def forward(c: slice):
        # forward, keeping what the second-order step needs, and the usual backward (minidp.model):
        # (nf, nc), cache, (nf, nc, nnei, 3) g = dE/d r_ij
        E_c, cache = model_forward(rij[:, c], nlist[:, c], types[c], model, backend, keep=True)
        return E_c, cache, model_backward(cache, model, backend)

    parts = parallel_map(forward, chunks, workers)
    # (nf, nloc), (nf, nloc, nnei, 3)
    E_atom = np.concatenate([p[0] for p in parts], axis=1)
    g = np.concatenate([p[2] for p in parts], axis=1)
    # (nf, nloc, 3), (nf, nloc, 9)
    force, atom_virial = pair_forces_virials(g, rij, nlist, backend)
    # (nf,), (nf, 9)
    energy, virial = E_atom.sum(axis=1), atom_virial.sum(axis=1)
    value, c_E, v, V = ener_loss(energy, force, virial, batch, pref)
    # the second-order step (minidp.training.force_training): dS/dtheta of S = c E - E', E' along delta r_ij
    # (nf, nloc, nnei, 3)
    drij = pair_tangent(v, V, rij, nlist)
    shares = parallel_map(lambda k: weight_gradients(model, parts[k][1], c_E, drij[:, chunks[k]], types[chunks[k]],
                                                     backend), range(len(chunks)), workers)
    # every net's gradient in model.params() order, by name: the ranges' shares added; a net with no atoms
    # in the batch gets zeros
    flat = []
    for name, net in model.named_nets():
        found = [share[name] for share in shares if name in share]
        flat += add_grads(found) if found else zeros_like_params(net.params())
    return value, flat, (energy, force, virial)
