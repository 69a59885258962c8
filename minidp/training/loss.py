r"""deepmd-kit's ``ener`` loss and its exact gradient with respect to every weight.

For a batch of ``nf`` frames of ``N`` atoms with labels :math:`E^*, F^*, W^*`:

.. math::

    L = \frac{p_e}{N} \langle (E - E^*)^2 \rangle
      + p_f \langle (F - F^*)^2 \rangle
      + \frac{p_v}{N} \langle (W - W^*)^2 \rangle
      + p_{ae} \langle (E_i - E_i^*)^2 \rangle
      + p_{pf} \langle w_i (F - F^*)^2 \rangle,
    \qquad p = p_{limit} + (p_{start} - p_{limit}) \frac{\eta_t}{\eta_0},

where :math:`\langle\cdot\rangle` averages over every number of the batch
(frames; frames x atoms x 3; frames x 9; frames x atoms) and the prefactors
move with the learning rate :math:`\eta_t` (deepmd-kit's ener loss; the
energy term is divided by N once, twice with ``intensive_ener_virial``).
The optional terms and options, deepmd-kit's names (:func:`ener_loss`):
``ae`` atomic energies against ``atom_ener.npy``; ``pf`` forces weighted by
``atom_pref.npy`` (w_i); ``relative_f`` = nu divides each atom's force error
by :math:`|F^*_i| + \nu` before squaring (force and pf terms);
``enable_atom_ener_coeff`` trains :math:`E = \sum_i c_i E_i` with c from
``atom_ener_coeff.npy``. With the model's ``atom_exclude_types`` the
excluded atoms leave every per-atom mean and N counts the others.

**The gradient.** L depends on the weights :math:`\theta` through the atomic
energies :math:`E_i` (E = sum of them), F and W. With the cotangents
:math:`c_i = \partial L/\partial E_i` (the frame's :math:`\partial L/\partial E`
for every atom, times :math:`c_i` of atom_ener_coeff, plus the ``ae`` term's own),
:math:`\mathbf v_k = \partial L/\partial \mathbf F_k`, :math:`V = \partial L/\partial W`
(held fixed), and :math:`F = -\partial E/\partial \mathbf r`,
:math:`W = -\partial E/\partial \varepsilon`,

.. math::

    \frac{dL}{d\theta} = \frac{\partial}{\partial\theta}\Big( \textstyle\sum_i c_i E_i - \dot E \Big),
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
from functools import partial
from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.checks import InputError, boolean, number
from minidp.model import EnergyModel, FitParams, energy_forces, model_backward, model_forward, pair_forces_virials
from minidp.nn import add_grads, zeros_like_params
from minidp.runtime import Workers, default_workers, parallel_map, worker_count
from minidp.se_e2_a import block_padded_tail, check_descriptor_inputs, tail_blocks
from minidp.training.force_training import weight_gradients


@dataclass(frozen=True)
class LossConfig:
    """deepmd-kit's ``ener`` loss settings (its names and defaults); a term is on when its start or limit is not 0."""

    start_pref_e: float = 0.02  # energy prefactor at the start learning rate
    limit_pref_e: float = 1.0  # ... and as the learning rate goes to zero
    start_pref_f: float = 1000.0  # force prefactor at the start
    limit_pref_f: float = 1.0  # ... at the end
    start_pref_v: float = 0.0  # virial prefactor at the start (0 and 0: no virial term)
    limit_pref_v: float = 0.0  # ... at the end
    start_pref_ae: float = 0.0  # atomic energy prefactor (labels atom_ener.npy)
    limit_pref_ae: float = 0.0
    start_pref_pf: float = 0.0  # atom-weighted force prefactor (weights atom_pref.npy)
    limit_pref_pf: float = 0.0
    relative_f: float | None = None  # nu: each atom's force error divided by (|F*_i| + nu) before squaring
    enable_atom_ener_coeff: bool = False  # E = sum_i c_i E_i with c from atom_ener_coeff.npy
    use_default_pf: bool = False  # a system without atom_pref.npy weighs every atom 1 (instead of no pf term)
    intensive_ener_virial: bool = False  # energy and virial terms divided by N^2 instead of N
    use_huber: bool = False  # Huber's penalty instead of the square (energy, force, virial, atomic energy)
    huber_delta: float | tuple[float, float, float] = 0.01  # its delta: one, or (energy, force, virial)
    f_use_norm: bool = False  # with use_huber or mae: one residual per atom, the norm of its force error
    loss_func: str = "mse"  # "mse" (squares) or "mae" (absolute values)
    start_pref_gf: float = 0.0  # generalized force prefactor (projections drdq.npy of the forces)
    limit_pref_gf: float = 0.0
    numb_generalized_coord: int = 0  # generalized coordinates q: drdq.npy holds dr/dq, natoms x 3 x ngc per frame

    def __post_init__(self):
        for name in PREF_NAMES:
            number(f"loss {name}", getattr(self, name), lo=0.0)
        if self.relative_f is not None:
            # nu = 0 would divide by the norm of a zero label force
            number("loss relative_f", self.relative_f, positive=True)
        for name in ("enable_atom_ener_coeff", "use_default_pf", "intensive_ener_virial", "use_huber", "f_use_norm"):
            boolean(f"loss {name}", getattr(self, name))
        deltas = self.huber_delta if isinstance(self.huber_delta, (list, tuple)) else (self.huber_delta,) * 3
        if len(deltas) != 3:
            raise InputError(f"loss huber_delta {list(deltas)}: expected one number or three (energy, force, virial)")
        object.__setattr__(self, "huber_delta", tuple(number("loss huber_delta", d, positive=True) for d in deltas))
        if isinstance(self.numb_generalized_coord, bool) or not isinstance(self.numb_generalized_coord, int) \
                or self.numb_generalized_coord < (1 if self.has("gf") else 0):
            raise InputError(f"loss numb_generalized_coord {self.numb_generalized_coord!r}: expected an integer "
                             f">= {1 if self.has('gf') else 0}" + (" with start_pref_gf/limit_pref_gf" if self.has("gf") else ""))
        if self.loss_func not in ("mse", "mae"):
            raise InputError(f"loss loss_func {self.loss_func!r}: expected 'mse' or 'mae'")
        if self.f_use_norm and not (self.use_huber or self.loss_func == "mae"):
            raise InputError("loss f_use_norm: true needs use_huber: true or loss_func 'mae'")
        if self.use_huber and (self.has("pf") or self.has("gf") or self.relative_f is not None):
            raise InputError("loss use_huber: true cannot go with start_pref_pf/limit_pref_pf, start_pref_gf or relative_f "
                             "(deepmd-kit refuses them together)")

    def has(self, term: str) -> bool:
        """Whether term ("e", "f", "v", "ae", "pf") is in the loss, as deepmd-kit decides it."""
        return getattr(self, f"start_pref_{term}") != 0.0 or getattr(self, f"limit_pref_{term}") != 0.0

    def label_files(self) -> dict[str, int]:
        """The extra per-atom label files (set.*/NAME.npy) the loss needs, each with its numbers per atom:
        every system must hold them."""
        need = [("atom_ener", 1, self.has("ae")), ("atom_pref", 1, self.has("pf") and not self.use_default_pf),
                ("atom_ener_coeff", 1, self.enable_atom_ener_coeff), ("drdq", 3 * self.numb_generalized_coord,
                                                                      self.has("gf"))]
        return {name: width for name, width, used in need if used}


TERMS = ("e", "f", "v", "ae", "pf", "gf")
PREF_NAMES = tuple(f"{end}_pref_{t}" for t in TERMS for end in ("start", "limit"))


class Prefactors(NamedTuple):
    """What one step's loss needs from the config: each term's prefactor at this learning rate
    (0 for a term that is off) and the two options that change the loss's form."""

    e: float
    f: float
    v: float
    ae: float = 0.0
    pf: float = 0.0
    gf: float = 0.0
    relative_f: float | None = None
    atom_ener_coeff: bool = False
    default_pf: bool = False  # use_default_pf: weights 1 where the batch has no atom_pref
    intensive: bool = False  # intensive_ener_virial: 1/n^2 on the energy and virial terms
    huber: tuple[float, float, float] | None = None  # use_huber: the deltas of energy, force, virial
    f_use_norm: bool = False  # Huber or mae on each atom's force error norm
    mae: bool = False  # loss_func "mae": absolute values instead of squares


def prefactors(config: LossConfig, lr: float, start_lr: float) -> Prefactors:
    """Every term's p = limit + (start - limit) lr / start_lr (deepmd-kit's schedule), with the config's options."""
    frac = lr / start_lr
    # (6,)
    p = [getattr(config, f"limit_pref_{t}") + (getattr(config, f"start_pref_{t}") - getattr(config, f"limit_pref_{t}"))
         * frac for t in TERMS]
    return Prefactors(*p, relative_f=config.relative_f, atom_ener_coeff=config.enable_atom_ener_coeff,
                      default_pf=config.use_default_pf, intensive=config.intensive_ener_virial,
                      huber=config.huber_delta if config.use_huber else None, f_use_norm=config.f_use_norm,
                      mae=config.loss_func == "mae")


class Batch(NamedTuple):
    """Frames of one system with their neighbour lists and labels."""

    rij: np.ndarray  # (nf, nloc, nnei, 3) pair displacements, 0 where padded
    nlist: np.ndarray  # (nf, nloc, nnei) neighbour indices, -1 where padded
    atom_types: np.ndarray  # (nloc,)
    energy: np.ndarray  # (nf,) labels
    force: np.ndarray  # (nf, nloc, 3)
    virial: np.ndarray | None  # (nf, 9), or None when the system has no virial labels
    atom_ener: np.ndarray | None = None  # (nf, nloc) atomic energy labels (atom_ener.npy), or None
    atom_pref: np.ndarray | None = None  # (nf, nloc) per-atom force weights (atom_pref.npy), or None
    atom_ener_coeff: np.ndarray | None = None  # (nf, nloc) c_i of E = sum_i c_i E_i (atom_ener_coeff.npy), or None
    fparam: np.ndarray | None = None  # (nf, nfp) frame parameters (fparam.npy) for a model with numb_fparam
    aparam: np.ndarray | None = None  # (nf, nloc, nap) atomic parameters (aparam.npy) for a model with numb_aparam
    drdq: np.ndarray | None = None  # (nf, nloc * 3 * ngc) dr/dq of the generalized coordinates (drdq.npy), or None


class LossValue(NamedTuple):
    """The loss and deepmd-kit's displayed errors for one batch."""

    loss: float  # L
    rmse: float  # sqrt(L), deepmd-kit's "rmse" column
    rmse_e: float  # sqrt(<(E - E*)^2>) / N, eV/atom
    rmse_f: float  # sqrt(<(F - F*)^2>), eV/Angstrom
    rmse_v: float  # sqrt(<(W - W*)^2>) / N, or nan without virial labels
    rmse_ae: float = math.nan  # sqrt(<(E_i - E_i*)^2>), or nan without the term or its labels
    rmse_pf: float = math.nan  # sqrt(<w_i (F - F*)^2>), or nan without the term or its labels
    # the mean absolute errors deepmd-kit shows with loss_func "mae" (same normalizations)
    mae_e: float = math.nan
    mae_f: float = math.nan
    mae_v: float = math.nan
    mae_ae: float = math.nan
    mae_pf: float = math.nan
    rmse_gf: float = math.nan  # sqrt(<(drdq . (F - F*))^2>) of the generalized forces, or nan


def ener_loss(energy, force, virial, batch: Batch, pref, atom_energy=None, included=None):
    r"""L (module docstring, with every term of deepmd-kit's ener loss) and its cotangents.

    pref: :class:`Prefactors` (a plain (p_e, p_f, p_v) works too). With atomic energies E_i
    (nf, nloc) — needed by the ``ae`` term and ``enable_atom_ener_coeff`` — the terms are, as
    deepmd-kit's dpmodel EnergyLoss computes them:

    .. math::

        E_f = \sum_i c_i E_i \text{ (coeff on; else the model's)},\qquad
        u_{ia} = \frac{F_{ia} - F^*_{ia}}{|F^*_i| + \nu} \text{ (relative\_f } \nu\text{; else } F - F^*),

        L = \frac{p_e}{n}\langle \Delta E^2\rangle + p_f \langle u^2\rangle + \frac{p_v}{n}\langle \Delta W^2\rangle
          + p_{ae}\langle (E_i - E_i^*)^2\rangle + p_{pf}\langle w_i u^2\rangle,

    where n counts the ``included`` atoms (nloc,) bool — those whose type is not in the model's
    atom_exclude_types; all by default — and the per-atom means run over the included atoms only
    (deepmd-kit's model mask). ``use_huber`` puts Huber's penalty on the energy (per atom, dE/n),
    force, virial (dW/n) and atomic energy residuals, ``loss_func`` "mae" the absolute value
    (energy and virial divided by n once), ``f_use_norm`` one residual per atom, |u_i|
    (:func:`penalty`, :func:`frame_term`, :func:`atom_term`); the generalized force term
    ``gf`` is :func:`generalized_force_term`. A term whose labels the batch lacks is left out
    (deepmd-kit's find_* = 0), its RMSE nan. Returns (LossValue, dL/dE, dL/dF (nf, nloc, 3), dL/dW (nf, 9)); dL/dE
    is per frame (nf,), or per atom dL/dE_i (nf, nloc) when the loss reads atomic energies.
    """
    p = Prefactors(*pref)
    nf, natoms = force.shape[:2]
    per_atom = p.atom_ener_coeff or (p.ae != 0.0 and batch.atom_ener is not None)
    if per_atom and atom_energy is None:
        raise ValueError("ener_loss: the atom_ener term and enable_atom_ener_coeff need the atomic energies")
    red = reduction(p, nf, natoms, included)
    de, df, dv = p.huber if p.huber is not None else (None, None, None)
    # (nf, nloc) c_i, 1 without the file (deepmd-kit's default)
    coeff = batch.atom_ener_coeff if p.atom_ener_coeff and batch.atom_ener_coeff is not None else None
    if coeff is not None:
        # (nf,)
        energy = np.sum(coeff * atom_energy, axis=1)
    # (nf,), (nf,)
    dE = energy - batch.energy
    loss, c_E = frame_term(dE, p.e, red, de)
    # (nf, nloc, 1) each atom's 1 / (|F*_i| + nu): the force error relative to the label's size
    scale = 1.0 if p.relative_f is None else 1.0 / (np.linalg.norm(batch.force, axis=-1, keepdims=True) + p.relative_f)
    # (nf, nloc, 3)
    u = (force - batch.force) * scale
    if p.f_use_norm:
        # (nf, nloc, 1) |u_i|, one residual per atom; d|u|/du = u/|u| (0 at 0)
        norm = np.linalg.norm(u, axis=-1, keepdims=True)
        l_f, c_norm = atom_term(norm, p.f, red, df)
        # (nf, nloc, 3) dL/du, pulled back through the scale at the end
        c_u = c_norm * np.divide(u, norm, out=np.zeros_like(u), where=norm > 0)
    else:
        l_f, c_u = atom_term(u, p.f, red, df)
    loss += l_f
    # deepmd-kit's mae_f is the mean the force term takes: of the norms with f_use_norm
    shown = {"mae_f": atom_mean(norm, red) if p.f_use_norm else atom_mean(np.abs(u), red)}
    if p.pf != 0.0 and (batch.atom_pref is not None or p.default_pf):
        # (nf, nloc, 1) deepmd-kit repeats each atom's weight over its three components; 1 by default
        w = batch.atom_pref[..., None] if batch.atom_pref is not None else np.ones((nf, natoms, 1))
        l_pf, c_pf = atom_term(u, p.pf, red, weight=w)
        loss, c_u = loss + l_pf, c_u + c_pf
        shown.update(rmse_pf=math.sqrt(atom_mean(w * u**2, red)), mae_pf=atom_mean(w * np.abs(u), red))
    # (nf, nloc, 3) dL/dF
    c_F = c_u * scale
    if p.gf != 0.0 and batch.drdq is not None:
        l_gf, c_gf, shown["rmse_gf"] = generalized_force_term(force - batch.force, batch.drdq, p.gf, red)
        loss, c_F = loss + l_gf, c_F + c_gf
    if p.ae != 0.0 and batch.atom_ener is not None:
        # (nf, nloc)
        dEi = atom_energy - batch.atom_ener
        l_ae, c_Ei = atom_term(dEi, p.ae, red, de)
        loss += l_ae
        # (nf, nloc) dL/dE_i = dL/dE_f c_i + the atomic term's own
        c_E = c_E[:, None] * (1.0 if coeff is None else coeff) + c_Ei
        shown.update(rmse_ae=math.sqrt(atom_mean(dEi**2, red)), mae_ae=atom_mean(np.abs(dEi), red))
    elif per_atom:
        # (nf, nloc) dL/dE_i = dL/dE_f c_i
        c_E = c_E[:, None] * (1.0 if coeff is None else coeff)
    # (nf, 9)
    c_W = np.zeros_like(virial)
    if batch.virial is not None:
        dW = virial - batch.virial
        shown.update(rmse_v=math.sqrt(np.mean(dW**2)) * red.inv, mae_v=float(np.mean(np.abs(dW))) * red.inv)
        if p.v:
            l_v, c_W = frame_term(dW, p.v, red, dv)
            loss += l_v
    value = LossValue(loss, math.sqrt(loss), math.sqrt(np.mean(dE**2)) * red.inv, math.sqrt(atom_mean(u**2, red)),
                      mae_e=float(np.mean(np.abs(dE))) * red.inv, **{"rmse_v": math.nan, **shown})
    return value, c_E, c_F, c_W


class Reduction(NamedTuple):
    """How a batch's terms are averaged: the penalty, the included atoms and deepmd-kit's factors."""

    mode: str  # "mse", "huber" or "mae" (:func:`penalty`)
    mask: np.ndarray  # (nloc,) 1 for an included atom (not of atom_exclude_types), else 0
    inv: float  # 1/n, n the included atoms of a frame (0 when there are none, as deepmd-kit)
    inv_rows: float  # 1/(nf n): the per-atom means
    inv_k: float  # the mse energy and virial terms' factor: 1/n, or 1/n^2 with intensive_ener_virial


def reduction(p: Prefactors, nf: int, natoms: int, included=None) -> Reduction:
    """The :class:`Reduction` of a batch of nf frames of natoms atoms (``included`` (natoms,) bool or None: all)."""
    # (nloc,)
    m = np.ones(natoms) if included is None else np.asarray(included, dtype=np.float64)
    n = float(m.sum())
    inv = 1.0 / n if n > 0 else 0.0
    mode = "mae" if p.mae else ("huber" if p.huber is not None else "mse")
    return Reduction(mode, m, inv, inv / nf, inv * inv if p.intensive else inv)


def _atom_mask(d: np.ndarray, red: Reduction) -> np.ndarray:
    """The included-atom mask shaped to broadcast over d (nf, nloc, ...)."""
    return red.mask.reshape((1, -1) + (1,) * (d.ndim - 2))


def atom_mean(x: np.ndarray, red: Reduction) -> float:
    """deepmd-kit's masked atom mean of x (nf, nloc[, ncomp]): sum over included atoms / (nf n ncomp)."""
    ncomp = x.shape[2] if x.ndim == 3 else 1
    return float(np.sum(x * _atom_mask(x, red))) * red.inv_rows / ncomp


def atom_term(d: np.ndarray, pref: float, red: Reduction, delta: float | None = None, weight=1.0):
    """A per-atom term pref <w rho(d)> over the included atoms, and its gradient with respect to d (d's shape).

    d: (nf, nloc) or (nf, nloc, ncomp) residuals; weight broadcasts over d (atom_pref's w_i)."""
    rho, drho = penalty(d, red.mode, delta)
    ncomp = d.shape[2] if d.ndim == 3 else 1
    return pref * atom_mean(weight * rho, red), pref * weight * drho * _atom_mask(d, red) * red.inv_rows / ncomp


def frame_term(d: np.ndarray, pref: float, red: Reduction, delta: float | None = None):
    """A frame term (energy (nf,), virial (nf, 9) residuals d): pref/n^k <d^2> (mse, k = 1 or 2 with
    intensive_ener_virial), pref <H(d/n)> (huber), pref/n <|d|> (mae); and its gradient with respect to d."""
    # Huber takes the residual per atom, d/n, and no further factor; mae divides by n once
    r_scale, weight = {"mse": (1.0, red.inv_k), "huber": (red.inv, 1.0), "mae": (1.0, red.inv)}[red.mode]
    rho, drho = penalty(d * r_scale, red.mode, delta)
    return pref * weight * float(np.mean(rho)), pref * weight * drho * r_scale / d.size


def generalized_force_term(dF: np.ndarray, drdq: np.ndarray, pref: float, red: Reduction):
    r"""pref <(sum_k dr_k/dq_g dF_k)^2> over frames and generalized coordinates g (deepmd-kit's gf term:
    plain force errors dF (nf, nloc, 3) of the included atoms, always squared); its gradient dL/dF and
    its RMSE. drdq (nf, nloc * 3 * ngc)."""
    nf, natoms, _ = dF.shape
    # (nf, nloc * 3, ngc), (nf, ngc)
    drdq = drdq.reshape(nf, natoms * 3, -1)
    dq = np.einsum("fkg,fk->fg", drdq, (dF * _atom_mask(dF, red)).reshape(nf, -1))
    l2 = float(np.mean(dq**2))
    # (nf, nloc, 3)
    grad = (2.0 * pref / dq.size * np.einsum("fkg,fg->fk", drdq, dq)).reshape(nf, natoms, 3) * _atom_mask(dF, red)
    return pref * l2, grad, math.sqrt(l2)


def penalty(r: np.ndarray, mode: str, delta: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""rho(r) and rho'(r), elementwise: r^2 and 2r ("mse"), |r| and sign(r) ("mae"), or Huber's ("huber")

    .. math::

        H_\delta(r) = \tfrac12 r^2 \ (|r| \le \delta), \quad \delta(|r| - \tfrac12\delta) \ \text{else};
        \qquad H'_\delta(r) = r \ (|r| \le \delta), \quad \delta\,\mathrm{sign}(r) \ \text{else}.
    """
    if mode == "mse":
        return r * r, 2.0 * r
    if mode == "mae":
        # the kink at 0 takes the subgradient 0, as autograd does
        return np.abs(r), np.sign(r)
    small = np.abs(r) <= delta
    return (np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)),
            np.where(small, r, delta * np.sign(r)))


def included_atoms(model: EnergyModel, atom_types: np.ndarray) -> np.ndarray | None:
    """(nloc,) bool: the atoms whose type is not in the model's atom_exclude_types (None: all of them)."""
    if not model.atom_exclude_types:
        return None
    return ~np.isin(atom_types, model.atom_exclude_types)


def batch_errors(model: EnergyModel, batch: Batch, pref) -> LossValue:
    """The loss and RMSEs of a batch without gradients (validation): the model's prediction, then :func:`ener_loss`."""
    p = energy_forces(batch.rij, batch.nlist, batch.atom_types, model, params=FitParams(batch.fparam, batch.aparam))
    return ener_loss(p.energy, p.force, p.virial, batch, pref, p.atom_energy, included_atoms(model, batch.atom_types))[0]


def shown_terms(config: LossConfig) -> tuple[str, ...]:
    """What lcurve.out shows beyond rmse, e, f (and v): "ae", "pf" when the term is on, and "mae" with
    loss_func "mae" (deepmd-kit then shows mean absolute errors, mae_*, instead of rmse_*)."""
    return tuple(t for t in ("ae", "pf", "gf") if config.has(t)) + (("mae",) if config.loss_func == "mae" else ())


def pair_tangent(v: np.ndarray, V: np.ndarray, rij: np.ndarray, nlist: np.ndarray,
                 backend: str = "numba") -> np.ndarray:
    r"""delta r_ij = v_j - v_i + V r_ij (V as 3x3 per frame), zero on padded slots; (nf, nloc, nnei, 3).

    Atom k moved by v_k moves r_ij = r_j - r_i by v_j - v_i, and the strain
    r -> (1 + V) r moves it by V r_ij, image shifts included. Backend "numba":
    the same in one pass (kernels.pair_tangent; the NumPy lines below take ~1.5 ms a 192-atom frame,
    between the step's two parallel regions).
    """
    nf, nloc, nnei = nlist.shape
    if backend == "numba":
        # (nf, nloc, nnei, 3)
        drij = np.empty(rij.shape, dtype=np.result_type(v, V, rij))
        kernels.pair_tangent(v, V.reshape(nf, 3, 3), rij, nlist, drij)
        return drij
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


# What each distinct atom type in a piece adds to the piece's cost, in atoms (x frames) of work: its fitting
# net runs on fewer rows and its glue is paid once per type. Measured on water (2 workers, 192 atoms, O first;
# per-thread CPU per step, 50 steps, main's contiguous halves): the piece 64 O + 32 H took 6.3 ms (float64)
# and 3.1 ms (float32) more than the piece 96 H, about 8 atoms' work (0.77 and 0.38 ms an atom), while the
# other thread waited.
TYPE_COST_ATOMS = 8


def centre_chunks(atom_types: np.ndarray, pieces: int, nf: int = 1) -> list[slice]:
    """The centre atoms cut into at most ``pieces`` contiguous ranges (none empty) of near-equal cost: the
    pieces run at once, so a step waits for the costliest. A range a..b-1 costs
    nf (b - a) + TYPE_COST_ATOMS x (distinct types in it). Each cut, left to right, makes its piece cost
    what each later piece would if the rest were cut evenly (every later piece holding all the rest's types).
    """
    nloc = atom_types.size
    n = min(pieces, nloc)
    # (ntypes, nloc + 1)  atoms of each type before each position
    before = np.zeros((int(atom_types.max(initial=0)) + 1, nloc + 1), dtype=np.int64)
    before[:, 1:] = np.cumsum(atom_types[None, :] == np.arange(before.shape[0])[:, None], axis=1)
    cuts = [0]
    for k in range(n - 1):
        a, later = cuts[-1], n - k - 1
        # (nb,)  the ends that leave an atom for every later piece
        b = np.arange(a + 1, nloc - later + 1)
        # (nb,) each  this piece's cost, and each later piece's
        cost = nf * (b - a) + TYPE_COST_ATOMS * np.count_nonzero(before[:, b] - before[:, [a]], axis=0)
        rest = nf * (nloc - b) / later + TYPE_COST_ATOMS * np.count_nonzero(before[:, [nloc]] - before[:, b], axis=0)
        cuts.append(int(b[np.argmin(np.abs(cost - rest))]))
    cuts.append(nloc)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


# The model options whose weight gradient is exact (finite-difference tested in tests/test_loss_terms.py);
# any other option in use is refused by refuse_untrainable, the one place that refuses
TRAINABLE = {"exclude_types", "pair_exclude_types", "env_protection", "numb_fparam", "numb_aparam",
             "dim_case_embd", "atom_ener", "atom_exclude_types"}


def model_options(model: EnergyModel) -> list[str]:
    """Every option of the model beyond plain se_e2_a + ener, by deepmd-kit's names (descriptor and fitting)."""
    cfg = model.descriptor.config
    used = [("exclude_types", cfg.exclude_types), ("pair_exclude_types", cfg.pair_exclude_types),
            ("env_protection", cfg.env_protection)]
    return [name for name, value in used if value] + model.options()


def refuse_untrainable(model: EnergyModel) -> None:
    """ValueError (one line) naming the options of the model minidp cannot train yet."""
    bad = [name for name in model_options(model) if name not in TRAINABLE]
    if bad:
        raise ValueError(f"training a model with {', '.join(bad)} is not supported yet")


def centre_params(params: FitParams, c: slice) -> FitParams:
    """The parameters of a range of centre atoms: fparam is per frame, aparam per atom (nf, nloc, nap)."""
    return params if params.aparam is None else params._replace(aparam=params.aparam[:, c])


def loss_and_grad(model: EnergyModel, batch: Batch, pref, backend: str = "numba",
                  workers: int | Workers | None = None):
    """The loss of one batch and dL/dtheta in model.params() layout (math in the module docstring).

    Returns (LossValue, grads, (energy, force, virial) predicted). ``backend``:
    "numpy" or "numba" (the fast path; the reference path has no tangents).
    The backend, the model (not a compressed one) and the batch's nlist are
    checked first (:func:`minidp.se_e2_a.check_descriptor_inputs`).

    The energy is a sum over centre atoms, and so are the pair gradients g and the
    second-order S = c E - E' (sum over pairs ij of centre i): both passes split
    over ranges of centre atoms (:func:`centre_chunks`, of near-equal cost and at least MIN_PIECE_ATOMS
    atoms x frames) that
    ``workers`` threads (a count, default minidp.runtime.default_workers, or the threads a run keeps, a
    minidp.runtime.Workers) compute at once, each with one BLAS thread
    (minidp.runtime.parallel_map); only the forces' scatter and the loss, which
    need every centre's g, run between them. The results do not depend on
    ``workers`` beyond round-off (the weight gradients add the ranges' shares).
    """
    check_descriptor_inputs(batch.nlist, model.descriptor, backend, keep=True)
    refuse_untrainable(model)
    types, rij, nlist = batch.atom_types, batch.rij, batch.nlist
    params = FitParams(batch.fparam, batch.aparam)
    workers = default_workers() if workers is None else workers
    pieces = min(worker_count(workers), max(1, rij.shape[0] * types.size // MIN_PIECE_ATOMS))
    chunks = centre_chunks(types, pieces, rij.shape[0])

    # the embedding's padded tails depend on the weights only: made once (a block per thread), not per piece
    blocks = tail_blocks(model.descriptor)
    tails = dict(zip(blocks, parallel_map(partial(block_padded_tail, model.descriptor, backend=backend), blocks, workers)))

    def forward(c: slice):
        # forward, keeping what the second-order step needs, and the usual backward (minidp.model):
        # (nf, nc), cache, (nf, nc, nnei, 3) g = dE/d r_ij
        E_c, cache = model_forward(rij[:, c], nlist[:, c], types[c], model, backend, keep=True,
                                   params=centre_params(params, c), tails=tails)
        return E_c, cache, model_backward(cache, model, backend)

    parts = parallel_map(forward, chunks, workers)
    # (nf, nloc), (nf, nloc, nnei, 3)
    E_atom = np.concatenate([p[0] for p in parts], axis=1)
    g = np.concatenate([p[2].g for p in parts], axis=1)
    # (nf, nloc, 3), (nf, nloc, 9)
    force, atom_virial = pair_forces_virials(g, rij, nlist, backend)
    # (nf,), (nf, 9)
    energy, virial = E_atom.sum(axis=1), atom_virial.sum(axis=1)
    value, c_E, v, V = ener_loss(energy, force, virial, batch, pref, E_atom, included_atoms(model, types))
    # the second-order step (minidp.training.force_training): dS/dtheta of S = c E - E', E' along delta r_ij
    # (nf, nloc, nnei, 3)
    drij = pair_tangent(v, V, rij, nlist, backend)

    def share(k: int) -> dict:
        c, cache = chunks[k], parts[k][1]
        # c_E: (nf,) per frame, or (nf, nloc) per atom (a loss on atomic energies): the range's own atoms
        return weight_gradients(model, cache.D, cache.descriptor_cache, c_E if c_E.ndim == 1 else c_E[:, c],
                                drij[:, c], types[c], backend, centre_params(params, c),
                                fitting_caches=cache.fitting_caches, fitting_cotangents=parts[k][2].fitting.cotangents)

    shares = parallel_map(share, range(len(chunks)), workers)
    # every net's gradient in model.params() order, by name: the ranges' shares added; a net with no atoms
    # in the batch gets zeros
    flat = []
    for name, net in model.named_nets():
        found = [s[name] for s in shares if name in s]
        flat += add_grads(found) if found else zeros_like_params(net.params())
    return value, flat, (energy, force, virial)
