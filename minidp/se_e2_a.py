r"""The se_e2_a descriptor (DeepPot-SE, Zhang et al., NeurIPS 2018), forward and backward.

The descriptor of atom i is built in four steps, each a pair of functions
(forward, then its backward right below):

1. **Neighbour list** (:mod:`minidp.neighbor`): for every atom i the
   displacement :math:`\mathbf r_{ij} = \mathbf r_j - \mathbf r_i` to each
   neighbour j within ``rcut``, type by type, nearest first, padded to ``sel``.
2. **Environment matrix** :func:`env_matrix`: one row per neighbour,

   .. math::

       \tilde R_{ij} = s(r_{ij})\,\Big(\frac{1}{r_{ij}},
           \frac{x_{ij}}{r_{ij}^2}, \frac{y_{ij}}{r_{ij}^2}, \frac{z_{ij}}{r_{ij}^2}\Big),
       \qquad R_{ij} = (\tilde R_{ij} - \mathrm{davg}) / \mathrm{dstd},

   with the smooth switch :math:`s(r)` (:func:`smooth_switch`) taking the
   row to zero at ``rcut``.
3. **Embedding** :func:`embed`: an embedding net per neighbour type maps the
   first column :math:`s_{ij} = R_{ij,0}` to ``ng`` features
   :math:`G_{ij} = \mathcal G(s_{ij})`, and contracts them with the rows,

   .. math::

       T_i = \frac{1}{n_{nei}} \sum_j G_{ij}^{\top} R_{ij} \quad (ng \times 4).

4. **Contraction** :func:`contract`: the symmetric, rotation-invariant
   descriptor :math:`D_i = T_i\, T_i^{<\top}` where :math:`T^{<}` is the first
   ``m2`` rows of :math:`T` (``axis_neuron``); ``D_i`` has ``ng * m2`` numbers
   (1600 for the water model).

Shape symbols, shared by the whole package:

- ``nf``: frames evaluated together
- ``nloc``: atoms of a frame (the "local" atoms whose energies we compute)
- ``nall``: local atoms plus periodic images; minidp never materialises image
  atoms (each pair carries its own displacement ``rij``), so it only appears
  where deepmd-kit's layout is discussed
- ``nnei``: neighbour slots per atom, ``sum(sel)``
- ``ng``: width of the embedding nets' last layer (M1 in the paper)
- ``m2``: ``axis_neuron`` (M2 in the paper)
- ``nb``: rows pushed through a net at once
- ``ntypes``: number of atom types

Padded neighbour slots (``nlist == -1``) have ``rij = 0``. Their raw row is
zero, but after normalization it is ``-davg/dstd``, which is *not* zero, and
deepmd-kit feeds it through the embedding net like any other row; minidp does
the same so that the two agree to round-off. Their gradient to ``rij`` is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.nn import Net, add_grads, net_backward, net_forward, net_jvp, net_jvp_backward


@dataclass(frozen=True)
class SeAConfig:
    """Hyper-parameters of an se_e2_a descriptor (deepmd-kit's names)."""

    rcut: float  # cutoff radius (Angstrom): neighbours farther away are ignored
    rcut_smth: float  # the switch s(r) starts to fall from 1/r here
    sel: tuple[int, ...]  # neighbour slots kept per neighbour type
    neuron: tuple[int, ...]  # embedding-net widths; ng = neuron[-1]
    axis_neuron: int  # m2: rows of T kept as the "axis" block of D
    type_one_side: bool  # True: one net per neighbour type; False: per (centre, neighbour) pair
    activation: str = "tanh"  # activation of the embedding nets
    resnet_dt: bool = False  # embedding nets carry a resnet timestep

    @property
    def ntypes(self) -> int:
        return len(self.sel)

    @property
    def nnei(self) -> int:
        return int(sum(self.sel))

    @property
    def sec(self) -> np.ndarray:
        """Slot boundaries per neighbour type: type t owns slots sec[t]:sec[t+1]."""
        return np.concatenate([[0], np.cumsum(self.sel)]).astype(int)

    @property
    def ng(self) -> int:
        return int(self.neuron[-1])

    @property
    def dim_out(self) -> int:
        """Length of D per atom: ng * m2."""
        return self.ng * self.axis_neuron


@dataclass
class SeA:
    """Parameters of an se_e2_a descriptor."""

    config: SeAConfig
    davg: np.ndarray  # (ntypes, nnei, 4) mean of the environment-matrix rows, per centre type
    dstd: np.ndarray  # (ntypes, nnei, 4) their standard deviation
    nets: list[list[Net]]  # nets[ti][tj]: embedding net for centre type ti, neighbour type tj
    # (with type_one_side, nets[ti][tj] is the same Net for every ti)
    compress: object | None = None  # minidp.compress.Compression: the nets tabulated (dp compress), or None

    def center_groups(self, atom_types: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Atoms that share embedding nets: (indices, centre type) per group.

        With ``type_one_side`` every atom uses the same nets, so all atoms form
        one group (and are pushed through each net in one batch); otherwise
        there is one group per centre type.
        """
        if self.config.type_one_side:
            return [(np.arange(len(atom_types)), 0)]
        return [(np.flatnonzero(atom_types == ti), ti) for ti in range(self.config.ntypes)]


# ---------------------------------------------------------------------------
# Step 2: the smooth switch and the environment matrix
# ---------------------------------------------------------------------------


def smooth_switch(r: np.ndarray, rcut_smth: float, rcut: float) -> tuple[np.ndarray, np.ndarray]:
    r"""The switch s(r) and its derivative ds/dr.

    .. math::

        u = \frac{r - r_s}{r_c - r_s},\qquad
        s = \begin{cases} 1 & r < r_s \\ u^3(-6u^2 + 15u - 10) + 1 & r_s \le r < r_c \\
            0 & r \ge r_c \end{cases},\qquad
        \frac{ds}{dr} = \frac{-30 u^2 (u - 1)^2}{r_c - r_s}

    s, ds/dr and d^2s/dr^2 are continuous at both ends, so energies and forces
    stay smooth as neighbours enter and leave the cutoff sphere.
    """
    u = np.clip((r - rcut_smth) / (rcut - rcut_smth), 0.0, 1.0)
    sw = u**3 * (-6.0 * u**2 + 15.0 * u - 10.0) + 1.0
    dsw = -30.0 * u**2 * (u - 1.0) ** 2 / (rcut - rcut_smth)
    return sw, dsw


class EnvCache(NamedTuple):
    """What env_matrix_backward needs."""

    rij: np.ndarray  # (nf, nloc, nnei, 3) displacements, zero where padded
    inv_r: np.ndarray  # (nf, nloc, nnei) 1/r, zero where padded
    sw: np.ndarray  # (nf, nloc, nnei) switch s(r), zero where padded
    dsw: np.ndarray  # (nf, nloc, nnei) ds/dr, zero where padded
    inv_dstd: np.ndarray  # (nf or 1, nloc, nnei, 4) 1/dstd of each row's centre type


def env_matrix(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, davg: np.ndarray,
    dstd: np.ndarray, rcut_smth: float, rcut: float, backend: str = "numba",
) -> tuple[np.ndarray, EnvCache]:
    r"""The normalized environment matrix R (math in the module docstring).

    R_ij = (s(r) (1/r, x/r^2, y/r^2, z/r^2) - davg[t_i, j]) / dstd[t_i, j]
    """
    # (nloc, nnei, 4)  per-atom statistics, chosen by the centre atom's type
    inv_dstd = 1.0 / dstd[atom_types]
    if backend == "numba":
        # (nf, nloc, nnei, 4), and (nf, nloc, nnei) each for 1/r, s, ds/dr
        R = np.empty(rij.shape[:3] + (4,))
        inv_r, sw, dsw = (np.empty(rij.shape[:3]) for _ in range(3))
        kernels.env_matrix(rij, nlist, davg[atom_types], inv_dstd, rcut_smth, rcut, R, inv_r, sw, dsw)
        return R, EnvCache(rij, inv_r, sw, dsw, inv_dstd[None])
    mask = nlist >= 0
    # (nf, nloc, nnei)  |r_ij|; padded slots get r = 1 so 1/r stays finite
    # (their rows are masked to zero below; 1/0 would poison the gradient)
    r = np.where(mask, np.linalg.norm(rij, axis=-1), 1.0)
    # (nf, nloc, nnei)
    inv_r = np.where(mask, 1.0 / r, 0.0)
    sw, dsw = smooth_switch(r, rcut_smth, rcut)
    sw, dsw = sw * mask, dsw * mask
    # (nf, nloc, nnei, 4)  the raw rows s (1/r, rij/r^2)
    R_raw = np.concatenate([(sw * inv_r)[..., None], (sw * inv_r**2)[..., None] * rij], axis=-1)
    # (nf, nloc, nnei, 4)
    R = (R_raw - davg[atom_types]) * inv_dstd
    return R, EnvCache(rij, inv_r, sw, dsw, inv_dstd[None])


def env_matrix_backward(dR: np.ndarray, cache: EnvCache, backend: str = "numba") -> np.ndarray:
    r"""dL/d r_ij from dL/dR.

    With u = 1/r, R~_0 = s u and R~_a = s u^2 x_a (a = x, y, z):

    .. math::

        \frac{\partial \tilde R_0}{\partial x_b} = x_b u^2 (s' - s u),\qquad
        \frac{\partial \tilde R_a}{\partial x_b} = x_a x_b u^3 (s' - 2 s u) + s u^2 \delta_{ab},

    so dL/dx_b = g_0 x_b u^2 (s' - s u) + (g . x) x_b u^3 (s' - 2 s u) + g_b s u^2,
    where g = dL/dR~ = dL/dR / dstd.  Padded slots have s = s' = u = 0: no gradient.
    """
    rij, u, sw, dsw, inv_dstd = cache
    if backend == "numba":
        # (nf, nloc, nnei, 3)
        grad = np.empty_like(rij)
        kernels.env_matrix_backward(dR, rij, u, sw, dsw, inv_dstd[0], grad)
        return grad
    # (nf, nloc, nnei, 4)  through the normalization
    g = dR * inv_dstd
    # (nf, nloc, nnei)  g . x over the three vector components
    g_dot_x = np.sum(g[..., 1:] * rij, axis=-1)
    # (nf, nloc, nnei)  the coefficient of x_b in dL/dx_b
    coef = g[..., 0] * u**2 * (dsw - sw * u) + g_dot_x * u**3 * (dsw - 2.0 * sw * u)
    # (nf, nloc, nnei, 3)
    return coef[..., None] * rij + (sw * u**2)[..., None] * g[..., 1:]


# ---------------------------------------------------------------------------
# Step 3: the embedding nets and the sum over neighbours
# ---------------------------------------------------------------------------


class EmbedPiece(NamedTuple):
    """One (centre group, neighbour type) block of the embedding step."""

    atoms: np.ndarray  # (na,) centre atoms of the group
    slots: slice  # the neighbour slots of this neighbour type
    real: np.ndarray  # (nf, na, n_t) True where the slot holds a real neighbour
    owner: np.ndarray  # (nb,) which (frame, atom) of the block, f * na + a, each real row belongs to
    R_real: np.ndarray  # (nb, 4) the real rows, packed (the rows of one atom are contiguous)
    G: np.ndarray  # (nb, ng) embedding features G(s) of the real rows
    dG_ds: np.ndarray  # (nb, ng) their derivatives dG/ds
    net: Net  # the embedding net of this block
    count: np.ndarray  # (nf, na) real neighbours of this type per atom
    net_caches: list  # training only (else empty): (row slice, nn.net_jvp caches) per row block
    pad_caches: tuple | None  # training only: (R_pad, nn.net_forward caches) of padded_tail_sums


# Rows pushed through an embedding net at once: small enough that every
# layer's arrays stay in the CPU's L2 cache (1024 rows x 100 features x 8 bytes
# is 800 kB), large enough that NumPy's per-call overhead does not matter.
ROW_BLOCK = 1024


def embedding_features(net: Net, s: np.ndarray, keep: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """G = net(s) and dG/ds for a column of scalars s (nb, 1), block by block.

    The net's input is a scalar, so forward-mode differentiation (nn.net_jvp
    with ds = 1) gives the whole derivative dG/ds in the same pass; the
    backward to the positions then needs no layer caches, only
    dL/ds = sum_g dL/dG_g dG_g/ds. Training needs the gradient with respect
    to the weights of both G and dG/ds: ``keep=True`` also returns each
    block's caches, (row slice, caches), for nn.net_jvp_backward.
    """
    nb = s.shape[0]
    # (nb, ng), (nb, ng)
    G = np.empty((nb, net.n_out), dtype=s.dtype)
    dG_ds = np.empty_like(G)
    ones = np.ones((min(nb, ROW_BLOCK), 1), dtype=s.dtype)
    kept = []
    for b0 in range(0, nb, ROW_BLOCK):
        blk = slice(b0, min(b0 + ROW_BLOCK, nb))
        G[blk], dG_ds[blk], caches = net_jvp(net, s[blk], ones[: blk.stop - blk.start])
        if keep:
            kept.append((blk, caches))
    return G, dG_ds, kept


def padded_tail_sums(net: Net, davg: np.ndarray, dstd: np.ndarray, slots: slice) -> tuple[np.ndarray, tuple]:
    r"""What the padded slots add to T: P[t, k] = sum_{slot >= k} G(s_t,slot)^T R_t,slot.

    A padded slot's row is zero before normalization, so after it the row is
    R = -davg[t, slot] / dstd[t, slot], known from the centre type t alone.
    Neighbours are sorted with the padding last, so an atom of type t with c
    real neighbours of this type receives exactly P[t, c] from its padded
    slots: a few hundred rows through the net replace the thousands of padded
    rows of a frame (35% of the water model's slots). Returns P
    (ntypes, n_t + 1, ng, 4), with P[t, n_t] = 0, and (R_pad, the net's
    caches) for training's :func:`embed_param_backward`.
    """
    # (ntypes, n_t, 4)
    R_pad = -davg[:, slots] / dstd[:, slots]
    # (ntypes * n_t, ng)
    G_pad, caches = net_forward(net, R_pad[..., :1].reshape(-1, 1))
    # (ntypes, n_t, ng, 4)  each padded slot's G^T R
    GR = G_pad.reshape(R_pad.shape[:2] + (-1, 1)) * R_pad[:, :, None, :]
    # (ntypes, n_t + 1, ng, 4)  sums from slot k to the end
    P = np.zeros((GR.shape[0], GR.shape[1] + 1) + GR.shape[2:], dtype=GR.dtype)
    P[:, :-1] = np.cumsum(GR[:, ::-1], axis=1)[:, ::-1]
    return P, (R_pad, caches)


def sum_rows(G, R_real, owner, n_owner, backend) -> np.ndarray:
    """T[o] = sum over the rows p owned by o of G[p]^T R[p]; returns (n_owner, ng, 4)."""
    if backend == "numba":
        start = np.searchsorted(owner, np.arange(n_owner + 1))
        # (n_owner, 4, ng)  the kernel accumulates T transposed (see kernels.py)
        Tt = np.zeros((n_owner, 4, G.shape[1]), dtype=G.dtype)
        kernels.segment_contract(G, R_real, start, Tt)
        return Tt.transpose(0, 2, 1)
    # (n_owner, ng, 4)
    T = np.zeros((n_owner, G.shape[1], 4), dtype=G.dtype)
    # (nb, ng, 4) each row's outer product, added onto its owner
    np.add.at(T, owner, G[:, :, None] * R_real[:, None, :])
    return T


def sum_rows_backward(dT, G, dG_ds, R_real, owner, backend) -> np.ndarray:
    r"""dL/dR[p] for each real row p of owner o, through both paths of T = sum G^T R:

    dL/dR[p] = G[p] dT[o]  +  (dL/ds[p], 0, 0, 0),   dL/ds[p] = sum_g (R[p] . dT[o, g]) dG_g/ds[p]

    Returns (nb, 4).
    """
    # (nb, 4)
    dR_real = np.empty_like(R_real)
    if backend == "numba":
        start = np.searchsorted(owner, np.arange(dT.shape[0] + 1))
        kernels.segment_contract_backward(G, dG_ds, R_real, start, np.ascontiguousarray(dT.transpose(0, 2, 1)), dR_real)
    else:
        # (nb, ng, 4) each row's owner's gradient
        dT_rows = dT[owner]
        dR_real[:] = np.einsum("pg,pgc->pc", G, dT_rows)
        # (nb, ng)  dL/dG
        dG = np.einsum("pgc,pc->pg", dT_rows, R_real)
        dR_real[:, 0] += np.sum(dG * dG_ds, axis=1)
    return dR_real


def embed(
    R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA, backend: str = "numba",
    keep: bool = False,
) -> tuple[np.ndarray, list[EmbedPiece]]:
    r"""T_i = (1/nnei) sum_j G(s_ij)^T R_ij, with s_ij = R_ij,0 (one net per neighbour type).

    Only real neighbours go through the net; what the padded slots add comes
    from :func:`padded_tail_sums`. Returns T (nf, nloc, ng, 4) and the pieces
    the backward needs (with the nets' caches when ``keep``: training).
    """
    nf, nloc, nnei, _ = R.shape
    cfg = se.config
    # (nf, nloc, ng, 4)
    T = np.zeros((nf, nloc, cfg.ng, 4), dtype=R.dtype)
    pieces = []
    for atoms, ti in se.center_groups(atom_types):
        na = atoms.size
        for tj in range(cfg.ntypes):
            slots = slice(cfg.sec[tj], cfg.sec[tj + 1])
            net = se.nets[ti][tj]
            # (nf, na, n_t)
            real = nlist[:, atoms, slots] >= 0
            # (nf, na)  real neighbours per atom: they fill the first slots
            count = real.sum(axis=-1)
            assert (real == (np.arange(real.shape[-1]) < count[..., None])).all(), "padding must come last"
            # (nb, 4) the real rows, packed; (nb,) the (frame, atom) each belongs to
            R_real = R[:, atoms, slots][real]
            owner = np.repeat(np.arange(nf * na), count.reshape(-1))
            # (nb, ng), (nb, ng): each real neighbour is one row through the net
            G, dG_ds, net_caches = embedding_features(net, R_real[:, :1], keep)
            # (nf * na, ng, 4)
            Tb = sum_rows(G, R_real, owner, nf * na, backend)
            P, pad_caches = padded_tail_sums(net, se.davg, se.dstd, slots)
            Tb += P[atom_types[atoms], count].reshape(Tb.shape)
            T[:, atoms] += Tb.reshape(nf, na, cfg.ng, 4) / nnei
            pieces.append(EmbedPiece(atoms, slots, real, owner, R_real, G, dG_ds, net, count, net_caches,
                                     pad_caches if keep else None))
    return T, pieces


def embed_backward(dT: np.ndarray, R: np.ndarray, pieces: list[EmbedPiece], backend: str = "numba") -> np.ndarray:
    r"""dL/dR from dL/dT, for the real neighbours (padded rows depend on no position).

    T depends on R_ij twice, directly and through s_ij = R_ij,0 inside G:

    .. math::

        \frac{\partial L}{\partial R_{ij}} = \frac{1}{n_{nei}} G_{ij}\,\frac{\partial L}{\partial T_i}
        + \Big(\frac{\partial L}{\partial s_{ij}}, 0, 0, 0\Big),\qquad
        \frac{\partial L}{\partial G_{ij}} = \frac{1}{n_{nei}} \frac{\partial L}{\partial T_i} R_{ij}^{\top}
    """
    nf, nloc, nnei, _ = R.shape
    # (nf, nloc, nnei, 4)  zero on padded slots
    dR = np.zeros_like(R)
    for pc in pieces:
        # (nf * na, ng, 4)
        dTb = (dT[:, pc.atoms] / nnei).reshape(-1, dT.shape[2], 4)
        # (nb, 4)
        dR_real = sum_rows_backward(dTb, pc.G, pc.dG_ds, pc.R_real, pc.owner, backend)
        # (nf, na, n_t, 4)
        dRb = np.zeros(pc.real.shape + (4,), dtype=R.dtype)
        dRb[pc.real] = dR_real
        dR[:, pc.atoms, pc.slots] = dRb
    return dR


# ---------------------------------------------------------------------------
# Step 4: the contraction D = T T<^T
# ---------------------------------------------------------------------------


def contract(T: np.ndarray, m2: int) -> np.ndarray:
    r"""D_i = T_i (T_i^<)^T, flattened: D[..., a*m2 + b] = sum_c T[a, c] T[b, c], b < m2.

    Returns D (nf, nloc, ng * m2). The cache the backward needs is T itself.
    """
    nf, nloc, ng, _ = T.shape
    # (nf, nloc, ng, m2)
    D = T @ np.swapaxes(T[:, :, :m2], -1, -2)
    return D.reshape(nf, nloc, ng * m2)


def contract_backward(dD: np.ndarray, T: np.ndarray, m2: int) -> np.ndarray:
    r"""dL/dT from dL/dD: T appears in D twice, as itself and as its first m2 rows.

    .. math::

        \frac{\partial L}{\partial T_{ac}} = \sum_{b<m_2} \frac{\partial L}{\partial D_{ab}} T_{bc}
        + [a < m_2] \sum_{b} \frac{\partial L}{\partial D_{ba}} T_{bc}
    """
    nf, nloc, ng, _ = T.shape
    # (nf, nloc, ng, m2)
    dD = dD.reshape(nf, nloc, ng, m2)
    # (nf, nloc, ng, 4)
    dT = dD @ T[:, :, :m2]
    dT[:, :, :m2] += np.swapaxes(dD, -1, -2) @ T
    return dT


# ---------------------------------------------------------------------------
# The whole descriptor
# ---------------------------------------------------------------------------


class DescriptorCache(NamedTuple):
    """What descriptor_backward needs."""

    env: EnvCache
    R: np.ndarray  # (nf, nloc, nnei, 4) normalized environment matrix
    pieces: list  # EmbedPiece per (centre group, neighbour type)
    T: np.ndarray  # (nf, nloc, ng, 4)


def descriptor(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA, backend: str = "numba",
    keep: bool = False,
) -> tuple[np.ndarray, DescriptorCache]:
    """D (nf, nloc, ng * m2) from the neighbour displacements: env matrix, embed, contract.

    ``backend`` picks the Numba kernels or their NumPy twins (same results);
    ``keep`` keeps the embedding nets' caches for training.
    """
    if se.compress is not None:  # a compressed model: the nets' tables replace the nets
        from minidp import compress

        if keep:
            raise ValueError("a compressed model cannot be trained; train the model it was compressed from")
        return compress.descriptor(rij, nlist, atom_types, se, backend)
    cfg = se.config
    R, env = env_matrix(rij, nlist, atom_types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend)
    T, pieces = embed(R, nlist, atom_types, se, backend, keep)
    D = contract(T, cfg.axis_neuron)
    return D, DescriptorCache(env, R, pieces, T)


def descriptor_backward(dD: np.ndarray, cache: DescriptorCache, se: SeA, backend: str = "numba") -> np.ndarray:
    """dL/d rij (nf, nloc, nnei, 3) from dL/dD: the three backwards in reverse order."""
    if se.compress is not None:
        from minidp import compress

        return compress.descriptor_backward(dD, cache, se, backend)
    dT = contract_backward(dD, cache.T, se.config.axis_neuron)
    dR = embed_backward(dT, cache.R, cache.pieces, backend)
    return env_matrix_backward(dR, cache.env, backend)


# ---------------------------------------------------------------------------
# Training on forces: tangents along a displacement, and the weights' gradients
# ---------------------------------------------------------------------------
#
# A force is a first derivative of the energy, so a force loss differentiated
# with respect to the weights is a second derivative. minidp computes it as
# "reverse over forward": for a fixed displacement of the pairs, drij (what
# the loss wants the forces to change along, see minidp.loss), the tangents
# below give the directional derivative of the energy, E' = sum g . drij; its
# gradient with respect to the weights is then one more reverse pass, through
# both the primal values (R, G, T, D) and their tangents (R', G', T', D').
# R and R' depend on positions only, never on weights, so that reverse pass
# stops at the embedding nets.


def env_matrix_jvp(drij: np.ndarray, cache: EnvCache) -> np.ndarray:
    r"""R' = (dR/d rij) drij, the environment matrix moved along drij.

    The transpose of :func:`env_matrix_backward`'s Jacobian (u = 1/r, d = x . drij):

    .. math::

        \tilde R_0' = d\, u^2 (s' - s u),\qquad
        \tilde R_a' = x_a\, d\, u^3 (s' - 2 s u) + s u^2\, \delta x_a,\qquad R' = \tilde R' / \mathrm{dstd}

    Padded slots have u = s = s' = 0: their rows do not move. Returns (nf, nloc, nnei, 4).
    """
    rij, u, sw, dsw, inv_dstd = cache
    # (nf, nloc, nnei)
    d = np.sum(rij * drij, axis=-1)
    # (nf, nloc, nnei, 4)
    Rdot = np.empty(rij.shape[:3] + (4,), dtype=rij.dtype)
    Rdot[..., 0] = d * u**2 * (dsw - sw * u)
    Rdot[..., 1:] = (d * u**3 * (dsw - 2.0 * sw * u))[..., None] * rij + (sw * u**2)[..., None] * drij
    Rdot *= inv_dstd
    return Rdot


def embed_jvp(Rdot: np.ndarray, pieces: list[EmbedPiece], backend: str = "numba") -> np.ndarray:
    r"""T' = (1/n_nei) sum_j (G'_ij{}^T R_ij + G_ij^T R'_ij), with G' = (dG/ds) s' and s' = R'_ij,0.

    Padded slots do not move (R' = 0), so only real rows contribute. Returns (nf, nloc, ng, 4).
    """
    nf, nloc, nnei, _ = Rdot.shape
    ng = pieces[0].G.shape[1]
    # (nf, nloc, ng, 4)
    Tdot = np.zeros((nf, nloc, ng, 4), dtype=Rdot.dtype)
    for pc in pieces:
        na = pc.atoms.size
        # (nb, 4)
        Rdot_real = Rdot[:, pc.atoms, pc.slots][pc.real]
        # (nb, ng)
        Gdot = pc.dG_ds * Rdot_real[:, :1]
        # (nf * na, ng, 4)
        Tb = sum_rows(pc.G, Rdot_real, pc.owner, nf * na, backend)
        Tb += sum_rows(Gdot, pc.R_real, pc.owner, nf * na, backend)
        Tdot[:, pc.atoms] += Tb.reshape(nf, na, ng, 4) / nnei
    return Tdot


def contract_jvp(T: np.ndarray, Tdot: np.ndarray, m2: int) -> np.ndarray:
    r"""D' = T' (T^<)^T + T (T'^<)^T, flattened as :func:`contract`. Returns (nf, nloc, ng * m2).

    Its reverse needs no function of its own: D' is bilinear in (T, T'), so
    dL/dT' = contract_backward(dL/dD', T) and it adds contract_backward(dL/dD', T') to dL/dT.
    """
    nf, nloc, ng, _ = T.shape
    # (nf, nloc, ng, m2)
    Ddot = Tdot @ np.swapaxes(T[:, :, :m2], -1, -2) + T @ np.swapaxes(Tdot[:, :, :m2], -1, -2)
    return Ddot.reshape(nf, nloc, ng * m2)


def row_cotangents(Tbar, Tdotbar, R_real, Rdot_real, owner, backend) -> tuple[np.ndarray, np.ndarray]:
    r"""dL/dG and dL/d(dG/ds) of each real row p of atom o (the transpose of T and T' = sum_rows ...):

    .. math::

        \bar G_p = \bar T_o R_p + \bar T'_o R'_p, \qquad
        \overline{(dG/ds)}_p = (\bar T'_o R_p)\, s'_p,\quad s'_p = R'_{p,0}.

    Tbar, Tdotbar: (n_owner, ng, 4); returns two (nb, ng).
    """
    if backend == "numba":
        start = np.searchsorted(owner, np.arange(Tbar.shape[0] + 1))
        # (nb, ng), (nb, ng)
        Gbar = np.empty((R_real.shape[0], Tbar.shape[1]), dtype=R_real.dtype)
        dGbar = np.empty_like(Gbar)
        kernels.row_cotangents(np.ascontiguousarray(np.swapaxes(Tbar, -1, -2)),
                               np.ascontiguousarray(np.swapaxes(Tdotbar, -1, -2)), R_real, Rdot_real, start, Gbar, dGbar)
        return Gbar, dGbar
    # (nb, ng, 4), (nb, ng, 4)  each row's atom's bars
    Tb, Tdb = Tbar[owner], Tdotbar[owner]
    # (nb, ng), (nb, ng)
    Gbar = np.einsum("pgc,pc->pg", Tb, R_real) + np.einsum("pgc,pc->pg", Tdb, Rdot_real)
    dGbar = np.einsum("pgc,pc->pg", Tdb, R_real) * Rdot_real[:, :1]
    return Gbar, dGbar


def padded_tail_backward(Tbar: np.ndarray, pc: EmbedPiece, atom_types: np.ndarray) -> np.ndarray:
    r"""dL/dG of the padded rows of :func:`padded_tail_sums`: (ntypes * n_t, ng).

    Padded slot k of centre type t adds G(s_tk)^T R_tk to every atom of type
    t with at most k real neighbours, so that row receives
    :math:`\bar G_{tk} = (\sum_{i:\, t_i = t,\, c_i \le k} \bar T_i) R_{tk}`:
    the atoms' dL/dT summed by (type, count), then cumulated over counts.
    """
    R_pad, _ = pc.pad_caches
    ntypes, n_t, _ = R_pad.shape
    nf, na = pc.count.shape
    # (nf * na,) each atom's (type, count) bin
    key = (atom_types[pc.atoms][None, :] * (n_t + 1) + pc.count).reshape(-1)
    # (ntypes * (n_t + 1), ng * 4)  dL/dT summed per bin
    flat = Tbar.reshape(nf * na, -1)
    S = np.zeros(((n_t + 1) * ntypes, flat.shape[1]), dtype=Tbar.dtype)
    np.add.at(S, key, flat)
    # (ntypes, n_t, ng, 4)  Q[t, k] = sum over counts c <= k
    Q = np.cumsum(S.reshape(ntypes, n_t + 1, -1, 4), axis=1)[:, :n_t]
    # (ntypes * n_t, ng)
    return np.einsum("tkgc,tkc->tkg", Q, R_pad).reshape(ntypes * n_t, -1)


def embed_param_backward(
    Tbar: np.ndarray, Tdotbar: np.ndarray, Rdot: np.ndarray, pieces: list[EmbedPiece],
    atom_types: np.ndarray, backend: str = "numba",
) -> dict[int, list[dict[str, np.ndarray]]]:
    r"""The embedding nets' weight gradients from dL/dT and dL/dT' (pieces made with ``keep``).

    Each real row receives its :func:`row_cotangents` (with T's 1/n_nei folded
    into the bars), which nn.net_jvp_backward pushes through the net (G and
    dG/ds are its output and tangent); padded rows get :func:`padded_tail_backward`.
    Returns {id(net): per-layer gradients}, summed over the pieces a net serves.
    """
    nf, nloc, nnei, _ = Rdot.shape
    grads: dict[int, list] = {}
    for pc in pieces:
        if pc.atoms.size == 0:  # a centre type absent from the batch: its nets get no gradient here
            continue
        ng = Tbar.shape[2]
        # (nf * na, ng, 4) each: dL/dT and dL/dT' of the piece's atoms
        Tb = (Tbar[:, pc.atoms] / nnei).reshape(-1, ng, 4)
        Tdb = (Tdotbar[:, pc.atoms] / nnei).reshape(-1, ng, 4)
        # (nb, 4)
        Rdot_real = Rdot[:, pc.atoms, pc.slots][pc.real]
        # (nb, ng), (nb, ng): dL/dG and dL/d(dG/ds) of the real rows
        Gbar, dGbar = row_cotangents(Tb, Tdb, pc.R_real, Rdot_real, pc.owner, backend)
        net_grads = [_net_grads(pc.net, caches, Gbar[blk], dGbar[blk]) for blk, caches in pc.net_caches]
        # the padded rows: through net_forward's caches, no tangent
        _, pad_caches = pc.pad_caches
        Gbar_pad = padded_tail_backward(Tbar[:, pc.atoms] / nnei, pc, atom_types)
        _, pad_grads = net_backward(pc.net, pad_caches, Gbar_pad)
        net_grads.append(pad_grads)
        if id(pc.net) in grads:
            net_grads.append(grads[id(pc.net)])
        grads[id(pc.net)] = add_grads(net_grads)
    return grads


def _net_grads(net: Net, caches: list, gy: np.ndarray, gty: np.ndarray) -> list[dict[str, np.ndarray]]:
    """A net's weight gradients only (its input, s, is data)."""
    return net_jvp_backward(net, caches, gy, gty, input_grads=False)[2]
