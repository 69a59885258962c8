r"""Data statistics that start a training: how deepmd-kit normalizes the environment
matrix and sets the per-type energy bias.

**Environment matrix.** For each centre type t, over every neighbour slot of
every atom of that type in the sampled frames (padded slots included, as
zero rows), with the raw rows :math:`\tilde R = s(r)(1/r, x/r^2, y/r^2, z/r^2)`:

.. math::

    \mathrm{davg}_t = (\langle \tilde R_0 \rangle, 0, 0, 0), \qquad
    \mathrm{dstd}_t = (\sigma(\tilde R_0), \sigma_a, \sigma_a, \sigma_a),\quad
    \sigma_a^2 = \tfrac13 \textstyle\sum_{a=1}^3 \langle \tilde R_a^2 \rangle - \langle \tilde R_a \rangle^2

(the three vector columns share one pooled mean and spread, so rotations
cannot change the normalization), the same for every slot. The rows are the
model's own: with ``env_protection``, and 0 for the pairs of
``exclude_types`` and ``pair_exclude_types`` (still counted, as padding is). A spread below
1e-2 is raised to 1e-2 and a type with no atoms gets 1/rcut, as deepmd-kit does.
With ``set_davg_zero`` davg stays zero (dstd is measured all the same).

**Energy bias.** The per-type atomic energy b solving, in the least-squares
sense, :math:`\sum_t n_{s,t}\, b_t = \bar E_s` over the systems s (mean
energy per system, atoms of each type per system), with small singular
values cut at ``rcond`` (1e-3). Systems of one composition make the problem
rank one; the minimum-norm solution spreads the energy over the types.

**Frame and atomic parameters** (``fparam``, ``aparam``). Per column, over
every sampled frame (fparam) or every sampled atom (aparam) of every system:
n, the sum and the sum of squares; then :math:`\bar x = \Sigma x / n` and
:math:`\sigma = \sqrt{\max(\Sigma x^2/n - \bar x^2, 0)}`, raised to the
protection (``data_stat_protect``, 1e-2) when below it; the model keeps
:math:`\bar x` and :math:`1/\sigma`. A column with nothing sampled gets 0 and
0.1, as deepmd-kit's StatItem.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei``); ``nfp, nap``
the numbers of frame and atomic parameters.
"""

from __future__ import annotations

import numpy as np

from minidp.neighbor import build_neighbor_list
from minidp.se_e2_a import SeAConfig, drop_excluded_pairs, env_matrix, exclusion_mask

# deepmd-kit's floor for a spread: a column that barely varies is not blown up
MIN_STD = 1e-2


def raw_env_sums(coords, cells, atom_types, cfg: SeAConfig) -> np.ndarray:
    """Sums over one system's frames, per centre type: (ntypes, 5) = (sum R0, sum R0^2, sum Ra, sum Ra^2, rows).

    The vector columns' sums are pooled and divided by 3, counting each slot once.
    """
    nl = build_neighbor_list(coords, cells, atom_types, cfg.rcut, list(cfg.sel))
    nlist, rij = nl.nlist, nl.rij
    if cfg.pair_exclude_types:  # the model's exclusions empty their slots, as the model's forward does
        nlist, rij = drop_excluded_pairs(nlist, rij, atom_types, cfg)
    excluded = exclusion_mask(atom_types, cfg.exclude_types, cfg.sel) if cfg.exclude_types else None
    # davg = 0, dstd = 1: the raw rows
    zeros, ones = np.zeros((cfg.ntypes, cfg.nnei, 4)), np.ones((cfg.ntypes, cfg.nnei, 4))
    # (nf, nloc, nnei, 4)  with env_protection, excluded pairs' rows 0 (still counted, as deepmd-kit's stats)
    R, _ = env_matrix(rij, nlist, atom_types, zeros, ones, cfg.switch_start, cfg.rcut,
                      protection=cfg.env_protection, excluded=excluded, width=cfg.switch_width)
    # (ntypes, 5)
    sums = np.zeros((cfg.ntypes, 5))
    for t in range(cfg.ntypes):
        # (rows, 4)
        rows = R[:, atom_types == t].reshape(-1, 4)
        r, a = rows[:, 0], rows[:, 1:]
        sums[t] = (r.sum(), (r * r).sum(), a.sum() / 3.0, (a * a).sum() / 3.0, rows.shape[0])
    return sums


def _spread(sum2: float, total: float, n: float, rcut: float) -> float:
    """sqrt(<x^2> - <x>^2), floored at MIN_STD; 1/rcut where there is nothing to measure."""
    if n == 0:
        return 1.0 / rcut
    return max(float(np.sqrt(max(sum2 / n - (total / n) ** 2, 0.0))), MIN_STD)


def env_stats(sums: np.ndarray, cfg: SeAConfig) -> tuple[np.ndarray, np.ndarray]:
    """davg, dstd (ntypes, nnei, 4) from raw_env_sums added over the systems (module docstring);
    davg = 0 with cfg.set_davg_zero."""
    # (ntypes, nnei, 4), (ntypes, nnei, 4)
    davg = np.zeros((cfg.ntypes, cfg.nnei, 4))
    dstd = np.ones((cfg.ntypes, cfg.nnei, 4))
    for t, (r, r2, a, a2, n) in enumerate(sums):
        davg[t, :, 0] = 0.0 if cfg.set_davg_zero else r / (n + 1e-15)
        dstd[t, :, 0] = _spread(r2, r, n, cfg.rcut)
        dstd[t, :, 1:] = _spread(a2, a, n, cfg.rcut)
    return davg, dstd


def type_counts(atom_types: np.ndarray, ntypes: int, atom_exclude_types=()) -> np.ndarray:
    """(ntypes,) atoms of each type, the row of the energy bias's least squares; the model's
    atom_exclude_types count 0 (their atoms have no energy), as deepmd-kit's bias statistics."""
    # (ntypes,)
    counts = np.bincount(atom_types, minlength=ntypes).astype(np.float64)
    counts[list(atom_exclude_types)] = 0.0
    return counts


def energy_bias(mean_energy: np.ndarray, type_counts: np.ndarray, rcond: float = 1e-3) -> np.ndarray:
    """b (ntypes,) minimizing sum_s (sum_t n_st b_t - E_s)^2 (module docstring).

    mean_energy: (nsys,) mean frame energy of each system; type_counts: (nsys, ntypes).
    """
    bias, *_ = np.linalg.lstsq(np.asarray(type_counts, float), np.asarray(mean_energy, float), rcond=rcond)
    return bias


def param_sums(values: np.ndarray, width: int) -> np.ndarray:
    """(width, 3) = (n, sum x, sum x^2) per column of values reshaped to (-1, width): fparam (nf, nfp)
    with width nfp, aparam (nf, nloc, nap) with width nap (deepmd-kit's stat file layout)."""
    # (rows, width)
    x = np.asarray(values, dtype=np.float64).reshape(-1, width)
    # (width, 3)
    return np.stack([np.full(width, float(x.shape[0])), x.sum(axis=0), (x * x).sum(axis=0)], axis=1)


def param_stats(sums: np.ndarray, protection: float = MIN_STD) -> tuple[np.ndarray, np.ndarray]:
    """(avg, inv_std) (width,) each from param_sums added over the systems (module docstring)."""
    n, total, total2 = sums[:, 0], sums[:, 1], sums[:, 2]
    # (width,) each; n = 0: avg 0 and std 0.1 (deepmd-kit's defaults), not a division by zero
    safe = np.where(n > 0, n, 1.0)
    avg = np.where(n > 0, total / safe, 0.0)
    std = np.sqrt(np.maximum(total2 / safe - (total / safe) ** 2, 0.0))
    std = np.where(n > 0, np.where(std < protection, protection, std), 0.1)
    return avg, 1.0 / std
