r"""The se_e2_a descriptor (DeepPot-SE, Zhang et al., NeurIPS 2018), forward and backward.

Read this module top to bottom. It first gives the **reference path**: the
descriptor exactly as the paper writes it, every array materialised, each
backward right below its forward (``backend="reference"``). Then the **fast
path** the other backends run, trick by trick, each saying what it saves and
tested against the reference (tests/test_reference.py).

The descriptor of atom i is built in four steps:

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
3. **Embedding** :func:`embed_reference`: an embedding net per (centre type,
   neighbour type) maps the first column :math:`s_{ij} = R_{ij,0}` to ``ng``
   features :math:`G_{ij} = \mathcal G(s_{ij})`, and contracts them with the rows,

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
- ``nnei``: neighbour slots per atom, ``sum(sel)``; ``n_t``: the slots of one neighbour type
- ``ng``: width of the embedding nets' last layer (M1 in the paper)
- ``m2``: ``axis_neuron`` (M2 in the paper)
- ``nb``: rows pushed through a net at once; ``na``: centre atoms of a group
- ``ntypes``: number of atom types
- ``nc``: centre atoms of a chunk (all the atoms of a frame, or a big frame's
  share, :mod:`minidp.infer`); ``ntouched``: the atoms a chunk's pairs touch

Padded neighbour slots (``nlist == -1``) have ``rij = 0``. Their raw row is
zero, but after normalization it is ``-davg/dstd``, which is *not* zero, and
deepmd-kit feeds it through the embedding net like any other row; minidp does
the same so that the two agree to round-off. Their gradient to ``rij`` is zero.

Options, deepmd-kit's names (:class:`SeAConfig`), all applied before the
embedding (:func:`descriptor_forward`), so every backend and a compressed
model's tables see them alike:

- ``env_protection`` p: the rows are s(r) (1/(r+p), x/(r+p)^2, ...), the
  switch still of r (:func:`env_matrix`);
- ``exclude_types``: the normalized row of a real neighbour of an excluded
  pair of types is 0, so the pair adds G(0) 0 = 0 to T; padded slots keep
  -davg/dstd (deepmd-kit's backend-neutral code never excludes an empty
  slot, its TensorFlow graph does: see :func:`env_matrix`);
- the model's ``pair_exclude_types``: those neighbours leave the neighbour
  list, their slots become padding (:func:`drop_excluded_pairs`);
- ``set_davg_zero``: training's statistics leave davg at zero (minidp.stats);
- ``float32_switch`` (minidp's, set for TensorFlow graphs): the switch's r_s and its width
  r_c - r_s in float32, as TensorFlow's op computes them (:attr:`SeAConfig.switch_width`).

Backends: ``"reference"`` (this module's first half, plain NumPy),
``"numpy"`` (the fast path's tricks in NumPy) and ``"numba"`` (the same
tricks with the loops compiled, :mod:`minidp.kernels`). Inputs are checked
once, at the public boundary (:class:`minidp.infer.DeepPot`,
:func:`minidp.model.energy_forces`, :func:`compute_descriptor`, all through
:func:`check_descriptor_inputs`); the functions here trust what they are
given. Training on forces adds tangents and a second reverse pass:
:mod:`minidp.training.force_training`. A compressed model (``SeA.compress``, see
:mod:`minidp.compress`) brings its own embedding step, which
:func:`descriptor_forward` calls through :class:`TabulatedEmbedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import numpy as np

from minidp import kernels
from minidp.checks import check_backend, integers, number
from minidp.nn import Net, dual_net, get_activation, net_backward, net_forward
from minidp.runtime import l2_cache_bytes

# ---------------------------------------------------------------------------
# Configuration and parameters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeAConfig:
    """Hyper-parameters of an se_e2_a descriptor (deepmd-kit's names), validated on creation.

    Raises ValueError naming the field, its value and what was expected (a
    model file's loader adds where it read them): rcut > 0, 0 <= rcut_smth < rcut,
    sel and neuron non-empty lists of positive integers, 1 <= axis_neuron <= ng,
    a known activation, booleans for the flags. A wrong type is a bad value
    here too: these come from files more often than from code.
    """

    rcut: float  # cutoff radius (Angstrom): neighbours farther away are ignored
    rcut_smth: float  # the switch s(r) starts to fall from 1/r here
    sel: tuple[int, ...]  # neighbour slots kept per neighbour type
    neuron: tuple[int, ...]  # embedding-net widths; ng = neuron[-1]
    axis_neuron: int  # m2: rows of T kept as the "axis" block of D
    type_one_side: bool  # True: one net per neighbour type; False: per (centre, neighbour) pair
    activation: str = "tanh"  # activation of the embedding nets
    resnet_dt: bool = False  # embedding nets carry a resnet timestep
    # pairs of types (ti, tj), either order, whose real neighbours' rows are zeroed (deepmd-kit's
    # descriptor exclude_types): they add nothing to T; padded slots keep their rows (env_matrix)
    exclude_types: tuple[tuple[int, int], ...] = ()
    env_protection: float = 0.0  # p >= 0 in the rows s(r) (1/(r+p), x/(r+p)^2, ...) (env_matrix)
    set_davg_zero: bool = False  # training's statistics leave davg at zero (minidp.stats); no effect on evaluation
    # the model's pair_exclude_types (deepmd-kit keeps them at the model level): those neighbours are
    # taken out of the neighbour list before the descriptor reads it, their slots become padding
    pair_exclude_types: tuple[tuple[int, int], ...] = ()
    # the switch as TensorFlow's environment-matrix op (a .pb model) computes it: rcut_smth and the width
    # rcut - rcut_smth in float32 (switch_start, switch_width); the neighbour cutoff stays rcut
    float32_switch: bool = False

    def __post_init__(self):
        # Checked (deepmd-kit's rules, _canonical_fields at the end of this module) and stored in
        # one canonical form (floats, tuples of int, bools), so that equal configurations compare
        # equal whatever the file or call spelled them as. A frozen dataclass sets its fields only
        # through object.__setattr__: done here, once, before anyone can see the object.
        for name, value in _canonical_fields(self).items():
            object.__setattr__(self, name, value)

    @property
    def ntypes(self) -> int:
        return len(self.sel)

    @property
    def nnei(self) -> int:
        return int(sum(self.sel))

    @property
    def sec(self) -> np.ndarray:
        """Slot boundaries per neighbour type: type t owns slots sec[t]:sec[t+1]."""
        return type_sections(self.sel)

    def slots(self, tj: int) -> slice:
        """The neighbour slots of neighbour type tj."""
        return type_slots(self.sel, tj)

    @property
    def ng(self) -> int:
        return int(self.neuron[-1])

    @property
    def switch_start(self) -> float:
        """r_s of :func:`smooth_switch`: rcut_smth, rounded to float32 with ``float32_switch``."""
        return float(np.float32(self.rcut_smth)) if self.float32_switch else self.rcut_smth

    @property
    def switch_width(self) -> float:
        """rcut - rcut_smth, the width of the switch (:func:`smooth_switch`); with ``float32_switch`` as
        TensorFlow's op computes it: float32(rcut) - float32(rcut_smth) rounded to float32. For rcut = 6,
        rcut_smth = 1.8 that is 4.199999809..., not 4.2: the rows of neighbours between rcut_smth and rcut
        then differ by up to 1e-8 from the float64 difference's."""
        if self.float32_switch:
            return float(np.float32(self.rcut) - np.float32(self.rcut_smth))
        return self.rcut - self.rcut_smth

    @property
    def dim_out(self) -> int:
        """Length of D per atom: ng * m2."""
        return self.ng * self.axis_neuron


def type_sections(sel) -> np.ndarray:
    """Slot boundaries sec (ntypes + 1,) of the sel layout: neighbour type t owns slots sec[t]:sec[t+1]."""
    return np.concatenate([[0], np.cumsum(sel)]).astype(int)


def type_slots(sel, tj: int) -> slice:
    """The neighbour slots of neighbour type tj in the sel layout, sec[tj]:sec[tj+1]."""
    sec = type_sections(sel)
    return slice(int(sec[tj]), int(sec[tj + 1]))


@runtime_checkable
class TabulatedEmbedding(Protocol):
    """What ``SeA.compress`` is: an embedding step of its own that replaces the nets
    (:class:`minidp.compress.Compression`, the nets tabulated by ``dp compress``).

    ``embed`` gives T (nf, nloc, ng, 4) from the rows R (nf, nloc, nnei, 4),
    as :func:`embed` does, and what its backward needs; ``embed_backward``
    gives dL/dR (nf, nloc, nnei, 4) from dL/dT and that cache.
    :func:`descriptor_forward` and :func:`descriptor_backward` call them,
    so this module never imports the module that implements them.
    """

    def embed(self, R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA,
              backend: str) -> tuple[np.ndarray, object]: ...

    def embed_backward(self, dT: np.ndarray, R: np.ndarray, cache: object, se: SeA,
                       backend: str) -> np.ndarray: ...


@dataclass
class SeA:
    """Parameters of an se_e2_a descriptor."""

    config: SeAConfig
    davg: np.ndarray  # (ntypes, nnei, 4) mean of the environment-matrix rows, per centre type
    dstd: np.ndarray  # (ntypes, nnei, 4) their standard deviation
    nets: EmbeddingNets  # nets[ti, tj]: embedding net for centre type ti, neighbour type tj (end of module)
    compress: TabulatedEmbedding | None = None  # the nets tabulated (dp compress, minidp.compress), or None

    def __post_init__(self):
        if not isinstance(self.nets, EmbeddingNets):  # a table nets[ti][tj], as lists
            self.nets = EmbeddingNets.from_table(self.config.ntypes, self.config.type_one_side, self.nets)
        if self.compress is not None and not isinstance(self.compress, TabulatedEmbedding):
            raise TypeError(f"SeA.compress must provide embed and embed_backward (a minidp.compress.Compression), "
                            f"got {type(self.compress).__name__}")

    @property
    def dtype(self) -> np.dtype:
        """The embedding nets' precision (deepmd-kit's descriptor ``precision``): the fast path computes
        G, dG/ds, T and D in it; the environment matrix and its backward stay float64."""
        return self.nets.items()[0][1].dtype

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


def smooth_switch(r: np.ndarray, rcut_smth: float, rcut: float, width: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    r"""The switch s(r) and its derivative ds/dr; ``width`` stands for r_c - r_s when given
    (:attr:`SeAConfig.switch_width`: TensorFlow's float32 width).

    .. math::

        u = \frac{r - r_s}{r_c - r_s},\qquad
        s = \begin{cases} 1 & r < r_s \\ u^3(-6u^2 + 15u - 10) + 1 & r_s \le r < r_c \\
            0 & r \ge r_c \end{cases},\qquad
        \frac{ds}{dr} = \frac{-30 u^2 (u - 1)^2}{r_c - r_s}

    s, ds/dr and d^2s/dr^2 are continuous at both ends, so energies and forces
    stay smooth as neighbours enter and leave the cutoff sphere.
    """
    width = rcut - rcut_smth if width is None else width
    u = np.clip((r - rcut_smth) / width, 0.0, 1.0)
    sw = u**3 * (-6.0 * u**2 + 15.0 * u - 10.0) + 1.0
    dsw = -30.0 * u**2 * (u - 1.0) ** 2 / width
    return sw, dsw


class EnvCache(NamedTuple):
    """What env_matrix_backward needs."""

    rij: np.ndarray  # (nf, nloc, nnei, 3) displacements, zero where padded
    inv_r: np.ndarray  # (nf, nloc, nnei) 1/r, zero where padded
    sw: np.ndarray  # (nf, nloc, nnei) switch s(r), zero where padded
    dsw: np.ndarray  # (nf, nloc, nnei) ds/dr, zero where padded
    row_scale: np.ndarray  # (1, nloc, nnei, 4) dR/dR~: 1/dstd of the row's centre type, 0 where the pair is excluded
    inv_rp: np.ndarray  # (nf, nloc, nnei) 1/(r + p), zero where padded; the inv_r array itself when p = 0


def exclusion_mask(atom_types: np.ndarray, pairs, sel) -> np.ndarray:
    """Which slots of each centre atom belong to an excluded pair of types: (nloc, nnei) bool.

    Slot k of atom i is in type t's section of the sel layout, so the pair is
    (t_i, t), in either order (deepmd-kit excludes both). A padded slot of such
    a section is marked too; the callers decide what that means for it.
    """
    ntypes = len(sel)
    # (ntypes, ntypes) symmetric
    table = np.zeros((ntypes, ntypes), dtype=bool)
    for ti, tj in pairs:
        table[ti, tj] = table[tj, ti] = True
    # (nnei,) the neighbour type of each slot
    slot_type = np.repeat(np.arange(ntypes), sel)
    return table[atom_types][:, slot_type]


class Neighbors(NamedTuple):
    """A neighbour list in the sel layout, and the displacements of its pairs."""

    nlist: np.ndarray  # (nf, nloc, nnei) neighbour indices, -1 for padding
    rij: np.ndarray  # (nf, nloc, nnei, 3) r_j - r_i, zero where padded


def drop_excluded_pairs(nlist: np.ndarray, rij: np.ndarray, atom_types: np.ndarray, cfg: SeAConfig) -> Neighbors:
    """The neighbour list without the pairs of cfg.pair_exclude_types: their slots become padding.

    deepmd-kit's model-level pair_exclude_types, which rewrite the list where
    it is built. A pair of types fills a whole section of the sel layout (the
    centre's type and the section's), so a section is emptied as a whole and
    the layout (real neighbours first, :func:`check_nlist_layout`) is kept.
    Unlike :func:`env_matrix`'s exclusion, the slots are then padding, whose
    row -davg/dstd goes through the net as every padded slot's does.
    Returns new arrays: nlist with -1 and rij with 0 in the dropped slots.
    """
    # (nloc, nnei)
    dropped = exclusion_mask(atom_types, cfg.pair_exclude_types, cfg.sel)
    return Neighbors(np.where(dropped, -1, nlist), np.where(dropped[..., None], 0.0, rij))


def env_matrix(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, davg: np.ndarray,
    dstd: np.ndarray, rcut_smth: float, rcut: float, backend: str = "numba", *,
    protection: float = 0.0, excluded: np.ndarray | None = None, width: float | None = None,
) -> tuple[np.ndarray, EnvCache]:
    r"""The normalized environment matrix R (nf, nloc, nnei, 4) (math in the module docstring).

    R_ij = (s(r) (1/(r+p), x/(r+p)^2, y/(r+p)^2, z/(r+p)^2) - davg[t_i, j]) / dstd[t_i, j]

    with p = ``protection`` (deepmd-kit's env_protection, 0 by default) and s
    the switch of r itself. ``excluded`` (nloc, nnei) bool, from
    :func:`exclusion_mask` (deepmd-kit's descriptor exclude_types): a real
    neighbour's row there is R_ij = 0, a constant (its pair adds G(0) 0 = 0
    to T and gets no gradient); a padded slot keeps -davg/dstd, as
    deepmd-kit's backend-neutral code (dpmodel) has it: it never excludes an
    empty slot. Its TensorFlow graph zeroes the whole (centre type, neighbour
    type) section instead, empty slots too; with type_one_side the two differ
    (without it the section's net is zeroed when deepmd-kit saves the model,
    and mostly gives G = 0). The TF way is the physical one: here an
    excluded neighbour still takes a padded slot's G^T R away, so the energy
    counts the excluded neighbours inside rcut and steps when one crosses it.
    minidp follows dpmodel, the reference deepmd-kit defines.
    """
    # (nloc, nnei, 4)  per-atom statistics, chosen by the centre atom's type
    inv_dstd = 1.0 / dstd[atom_types]
    if backend != "numba":
        mask = nlist >= 0
        # (nf, nloc, nnei)  |r_ij|; padded slots get r = 1 so 1/r stays finite
        # (their rows are masked to zero below; 1/0 would poison the gradient)
        r = np.where(mask, np.linalg.norm(rij, axis=-1), 1.0)
        # (nf, nloc, nnei)  1/r, and 1/(r + p) (the same array when p = 0)
        inv_r = np.where(mask, 1.0 / r, 0.0)
        inv_rp = inv_r if protection == 0 else np.where(mask, 1.0 / (r + protection), 0.0)
        sw, dsw = smooth_switch(r, rcut_smth, rcut, width)
        sw, dsw = sw * mask, dsw * mask
        # (nf, nloc, nnei, 4)  the raw rows s (1/(r+p), rij/(r+p)^2)
        R_raw = np.concatenate([(sw * inv_rp)[..., None], (sw * inv_rp**2)[..., None] * rij], axis=-1)
        # (nf, nloc, nnei, 4)
        R = (R_raw - davg[atom_types]) * inv_dstd
    else:
        # Numba: the same in one pass, without the temporaries (kernels.env_matrix)
        # (nf, nloc, nnei, 4), and (nf, nloc, nnei) each for 1/r, s, ds/dr and 1/(r + p)
        R = np.empty(rij.shape[:3] + (4,))
        inv_r, sw, dsw = (np.empty(rij.shape[:3]) for _ in range(3))
        inv_rp = inv_r if protection == 0 else np.empty(rij.shape[:3])
        kernels.env_matrix(rij, nlist, davg[atom_types], inv_dstd, rcut_smth,
                           rcut - rcut_smth if width is None else width, protection, R, inv_r, sw, dsw, inv_rp)
    if excluded is None:
        return R, EnvCache(rij, inv_r, sw, dsw, inv_dstd[None], inv_rp)
    # (nf, nloc, nnei)  the excluded pairs' real rows; padded slots are never excluded
    R[excluded & (nlist >= 0)] = 0.0
    # (1, nloc, nnei, 4)  a constant row has no gradient
    return R, EnvCache(rij, inv_r, sw, dsw, (inv_dstd * ~excluded[..., None])[None], inv_rp)


def env_matrix_backward(dR: np.ndarray, cache: EnvCache, backend: str = "numba") -> np.ndarray:
    r"""dL/d r_ij (nf, nloc, nnei, 3) from dL/dR.

    With u = 1/r, v = 1/(r+p), R~_0 = s v and R~_a = s v^2 x_a (a = x, y, z),
    and dr/dx_b = x_b u:

    .. math::

        \frac{\partial \tilde R_0}{\partial x_b} = x_b u v (s' - s v),\qquad
        \frac{\partial \tilde R_a}{\partial x_b} = x_a x_b u v^2 (s' - 2 s v) + s v^2 \delta_{ab},

    so dL/dx_b = g_0 x_b u v (s' - s v) + (g . x) x_b u v^2 (s' - 2 s v) + g_b s v^2,
    where g = dL/dR~ = dL/dR * row_scale (1/dstd, or 0 for an excluded pair).
    With p = 0, v = u. Padded slots have s = s' = u = v = 0: no gradient.
    """
    rij, u, sw, dsw, row_scale, v = cache
    if backend != "numba":
        # (nf, nloc, nnei, 4)  through the normalization
        g = dR * row_scale
        # (nf, nloc, nnei)  g . x over the three vector components
        g_dot_x = np.sum(g[..., 1:] * rij, axis=-1)
        # (nf, nloc, nnei)  the coefficient of x_b in dL/dx_b
        uv = u * v
        coef = g[..., 0] * uv * (dsw - sw * v) + g_dot_x * uv * v * (dsw - 2.0 * sw * v)
        # (nf, nloc, nnei, 3)
        return coef[..., None] * rij + (sw * v * v)[..., None] * g[..., 1:]
    # Numba: the same in one pass (kernels.env_matrix_backward)
    # (nf, nloc, nnei, 3)
    grad = np.empty_like(rij)
    kernels.env_matrix_backward(dR, rij, u, sw, dsw, row_scale[0], v, grad)
    return grad


# ---------------------------------------------------------------------------
# Step 3, reference: every slot through its net, G materialised
# ---------------------------------------------------------------------------


class ReferenceBlock(NamedTuple):
    """One (centre type, neighbour type) block of the reference embedding."""

    atoms: np.ndarray  # (na,) centre atoms of the type
    slots: slice  # the neighbour slots of the neighbour type
    net: Net  # the block's embedding net
    net_caches: list  # its nn.net_forward caches


class ReferenceCache(NamedTuple):
    """What embed_reference_backward needs."""

    R: np.ndarray  # (nf, nloc, nnei, 4) the rows
    G: np.ndarray  # (nf, nloc, nnei, ng) their embedding features
    blocks: list[ReferenceBlock]  # one per (centre type, neighbour type)


def embed_reference(R: np.ndarray, atom_types: np.ndarray, se: SeA) -> tuple[np.ndarray, ReferenceCache]:
    r"""T_i = (1/nnei) sum_j G(s_ij)^T R_ij with G = nets[t_i, t_j] applied to s_ij = R_ij,0.

    Every slot, padded ones included (their row is -davg/dstd), goes through
    the net of its (centre type, neighbour type). Returns T (nf, nloc, ng, 4).
    """
    nf, nloc, nnei, _ = R.shape
    cfg = se.config
    # (nf, nloc, nnei, ng)
    G = np.empty((nf, nloc, nnei, cfg.ng), dtype=R.dtype)
    blocks = []
    for ti in range(cfg.ntypes):
        atoms = np.flatnonzero(atom_types == ti)
        for tj in range(cfg.ntypes):
            slots = cfg.slots(tj)
            # (nf * na * n_t, 1)  every (frame, atom, slot) is one row
            s = R[:, atoms, slots, :1].reshape(-1, 1)
            # (nf * na * n_t, ng)
            Gb, caches = net_forward(se.nets[ti, tj], s)
            G[:, atoms, slots] = Gb.reshape(nf, atoms.size, cfg.sel[tj], cfg.ng)
            blocks.append(ReferenceBlock(atoms, slots, se.nets[ti, tj], caches))
    # (nf, nloc, ng, 4)
    T = np.einsum("fing,finc->figc", G, R) / nnei
    return T, ReferenceCache(R, G, blocks)


def embed_reference_backward(dT: np.ndarray, cache: ReferenceCache) -> np.ndarray:
    r"""dL/dR (nf, nloc, nnei, 4) from dL/dT, through both places R enters T:

    .. math::

        \frac{\partial L}{\partial G_{ij}} = \frac{1}{n_{nei}} R_{ij} \frac{\partial L}{\partial T_i}^{\top},
        \qquad
        \frac{\partial L}{\partial R_{ij}} = \frac{1}{n_{nei}} G_{ij} \frac{\partial L}{\partial T_i}
        + \Big(\frac{\partial L}{\partial s_{ij}}, 0, 0, 0\Big),

    where dL/ds_ij comes from dL/dG_ij through the net, by nn.net_backward.
    """
    R, G, blocks = cache
    nf, nloc, nnei, _ = R.shape
    # (nf, nloc, nnei, ng)
    dG = np.einsum("figc,finc->fing", dT, R) / nnei
    # (nf, nloc, nnei, 4)  the direct path
    dR = np.einsum("fing,figc->finc", G, dT) / nnei
    for atoms, slots, net, caches in blocks:
        # (nf * na * n_t, 1)  dL/ds, through the net
        ds, _ = net_backward(net, caches, dG[:, atoms, slots].reshape(-1, G.shape[-1]), param_grads=False)
        dR[:, atoms, slots, :1] += ds.reshape(nf, atoms.size, slots.stop - slots.start, 1)
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
    r"""dL/dT (nf, nloc, ng, 4) from dL/dD: T appears in D twice, as itself and as its first m2 rows.

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
# The whole descriptor, on any backend
# ---------------------------------------------------------------------------


class DescriptorCache(NamedTuple):
    """What descriptor_backward needs: each step's cache. The embedding step that ran (one of three)
    fills its own field; the other two stay None."""

    env: EnvCache
    R: np.ndarray  # (nf, nloc, nnei, 4) normalized environment matrix
    T: np.ndarray  # (nf, nloc, ng, 4)
    reference: ReferenceCache | None  # backend "reference": G of every slot (embed_reference)
    pieces: list[EmbedPiece] | None  # the fast path: one piece per (centre group, neighbour type) (embed)
    tables: object | None  # a compressed model: what its TabulatedEmbedding.embed returned for its backward


def descriptor_forward(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA, backend: str = "numba",
    keep: bool = False, tails: dict[tuple[int, int], PaddedTail] | None = None,
) -> tuple[np.ndarray, DescriptorCache]:
    """D (nf, nloc, ng * m2) from the neighbour displacements: env matrix, embed, contract.

    ``backend``: "reference" (:func:`embed_reference`), "numpy" or "numba"
    (the fast path, :func:`embed`; same results to round-off); a compressed
    model's tables bring their own step (``se.compress.embed``). ``keep``
    keeps the fast path's net caches for training (minidp.training.force_training);
    ``tails``: the padded tails already made (see :func:`embed`; the nets' fast path only).
    The configuration's options enter before the embedding: the model's
    pair_exclude_types rewrite the neighbour list (:func:`drop_excluded_pairs`),
    exclude_types and env_protection shape the rows (:func:`env_matrix`); the
    embedding steps see nothing but rows and the list.
    Trusts its input (:func:`compute_descriptor` checks it first).
    """
    cfg = se.config
    if cfg.pair_exclude_types:  # the model's exclusions: those neighbours leave the list
        nlist, rij = drop_excluded_pairs(nlist, rij, atom_types, cfg)
    # (nloc, nnei) the descriptor's own exclusions, or None
    excluded = exclusion_mask(atom_types, cfg.exclude_types, cfg.sel) if cfg.exclude_types else None
    R, env = env_matrix(rij, nlist, atom_types, se.davg, se.dstd, cfg.switch_start, cfg.rcut, backend,
                        protection=cfg.env_protection, excluded=excluded, width=cfg.switch_width)
    reference = pieces = tables = None
    if se.compress is not None:  # a compressed model: the nets' tables replace the nets
        T, tables = se.compress.embed(R, nlist, atom_types, se, backend)
    elif backend == "reference":
        T, reference = embed_reference(R, atom_types, se)
    else:
        T, pieces = embed(R, nlist, atom_types, se, backend, keep, tails)
    D = contract(T, cfg.axis_neuron)
    return D, DescriptorCache(env, R, T, reference, pieces, tables)


def descriptor_backward(dD: np.ndarray, cache: DescriptorCache, se: SeA, backend: str = "numba") -> np.ndarray:
    """dL/d rij (nf, nloc, nnei, 3) from dL/dD: the three backwards in reverse order."""
    dT = contract_backward(dD, cache.T, se.config.axis_neuron)
    if se.compress is not None:
        dR = se.compress.embed_backward(dT, cache.R, cache.tables, se, backend)
    elif backend == "reference":
        dR = embed_reference_backward(dT, cache.reference)
    else:
        dR = embed_backward(dT, cache.R, cache.pieces, backend)
    return env_matrix_backward(dR, cache.env, backend)


def check_nlist_layout(nlist: np.ndarray, cfg: SeAConfig) -> None:
    """ValueError unless nlist (nf, nloc, nnei) has sum(sel) slots per atom and, in each neighbour
    type's section, its real neighbours first and the padding (-1) after them.

    The fast path relies on that order (the padded slots' table P[type, count]
    and the packing): a hand-made nlist with a -1 between neighbours would
    otherwise give a wrong T silently. build_neighbor_list writes this layout.
    """
    if nlist.ndim != 3 or nlist.shape[-1] != cfg.nnei:
        raise ValueError(f"nlist has shape {nlist.shape}; expected (nf, nloc, {cfg.nnei}), sum(sel) slots per atom")
    # (nf, nloc, nnei)
    real = nlist >= 0
    # (nf, nloc, nnei - 1)  a real neighbour right after a padded slot...
    gap = real[..., 1:] & ~real[..., :-1]
    # ...of the same section (a section may well start after the previous one's padding)
    gap[..., cfg.sec[1:-1] - 1] = False
    if gap.any():
        raise ValueError("nlist: padded slots (-1) must come after the real neighbours in each type's section, "
                         "as build_neighbor_list writes them")


def check_descriptor_inputs(nlist: np.ndarray, se: SeA, backend, keep: bool = False) -> str:
    """The public entries' checks, once (ValueError naming the value): a known backend, nlist in the
    sel layout (:func:`check_nlist_layout`), and with ``keep`` (training) a model with nets and a
    backend with tangents. Returns the backend."""
    check_backend(backend)
    if keep and se.compress is not None:
        raise ValueError("a compressed model cannot be trained; train the model it was compressed from")
    if keep and backend == "reference":
        raise ValueError("keep=True (training) needs backend 'numpy' or 'numba', got 'reference'")
    check_nlist_layout(nlist, se.config)
    return backend


def compute_descriptor(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA, backend: str = "numba",
    keep: bool = False,
) -> tuple[np.ndarray, DescriptorCache]:
    """:func:`descriptor_forward` for a caller with its own neighbour list: its inputs checked first
    (:func:`check_descriptor_inputs`). Returns D (nf, nloc, ng * m2) and the cache."""
    check_descriptor_inputs(nlist, se, backend, keep)
    return descriptor_forward(rij, nlist, atom_types, se, backend, keep)


# ---------------------------------------------------------------------------
# Step 3, fast path: what the reference computes, with less work
# ---------------------------------------------------------------------------
#
# The reference pushes every slot of every atom through a net and keeps G,
# (nf, nloc, nnei, ng), and every layer's caches for the backward. The fast
# path (backend "numpy" or "numba") gives the same T and dL/dR with three
# tricks, each tested against the reference (tests/test_reference.py):
#
# 1. Packing (pack_rows): only real neighbours' rows go through the nets,
#    packed contiguously per (frame, atom) ("owner"); on the water model 35%
#    of the slots are padding.
# 2. Padded tails (padded_tail_sums): a padded slot's row -davg/dstd depends
#    on the centre type and the slot only, and padding comes last, so what the
#    padded slots add to T is a table P[type, count] of a few hundred rows.
# 3. Forward-mode dG/ds (embedding_features): the net's input is a scalar, so
#    one tangent pass gives dG/ds with G; the backward to the positions then
#    needs dL/ds = sum_g dL/dG_g dG_g/ds and no layer caches (less memory,
#    and blocks of row_block() rows stay in cache). The nets run on stacked dual
#    numbers [s; 1] (nn.dual_net: one product per layer, tanh's lines fused).
# Numba then fuses the loops over rows (kernels.segment_contract ...).


class PackedRows(NamedTuple):
    """One (centre group, neighbour type) block's real rows, packed (trick 1 above)."""

    real: np.ndarray  # (nf, na, n_t) True where the slot holds a real neighbour
    count: np.ndarray  # (nf, na) real neighbours per atom
    R_real: np.ndarray  # (nb, 4) the real rows, the rows of one atom contiguous
    owner: np.ndarray  # (nb,) the (frame, atom) of the block, f * na + a, each row belongs to
    index: np.ndarray  # (nb,) each row's place among the nf * nloc * nnei rows of R (gather and scatter)


class NetTrace(NamedTuple):
    """What training's reverse pass to one block's net weights needs (:func:`embed` with ``keep``)."""

    key: tuple  # the net's key in se.nets (see EmbeddingNets)
    net: Net  # the block's embedding net
    row_caches: list  # (row slice, nn.dual_net caches) per row block of embedding_features
    R_pad: np.ndarray  # (ntypes, n_t, 4) the padded slots' rows -davg/dstd
    pad_caches: list  # the nn.net_forward caches of those rows (net_padded_tails)


class BlockFeatures(NamedTuple):
    """What a source of features (the nets: :func:`embed`; the tables: minidp.compress) gives
    :func:`embed_blocks` for one (centre group, neighbour type) block."""

    G: np.ndarray  # (nb, ng) embedding features G(s) of the real rows
    dG_ds: np.ndarray  # (nb, ng) their derivatives dG/ds
    P: np.ndarray  # (ntypes, n_t + 1, ng, 4) what the padded slots add to T (padded_tail_sums)
    trace: NetTrace | None  # training only (the nets with keep), else None


class EmbedPiece(NamedTuple):
    """One (centre group, neighbour type) block of the fast embedding step."""

    atoms: np.ndarray  # (na,) centre atoms of the group
    slots: slice  # the neighbour slots of this neighbour type
    rows: PackedRows  # its real rows, packed
    G: np.ndarray  # (nb, ng) embedding features G(s) of the real rows
    dG_ds: np.ndarray  # (nb, ng) their derivatives dG/ds
    trace: NetTrace | None  # training only, else None


# One core's L2 cache, read once (minidp.runtime.l2_cache_bytes; 1 MiB where the machine does not say)
L2_BYTES = l2_cache_bytes()


def row_block(n_out: int, dtype) -> int:
    """Rows pushed through an embedding net at once: the power of two whose widest layer's block (value
    and tangent stacked, 2 x rows x n_out numbers) fills at most the core's L2 cache (L2_BYTES), at least 64.

    Small enough that a layer's arrays stay in cache, large enough that NumPy's per-call overhead does not
    matter. With a 1 MiB L2 (AMD Zen 4, where earlier sessions set 512) the rule gives float64 those 512
    rows. Measured on water (ng = 100) with 2 MiB (Intel Xeon, AVX-512), against 512 rows: 1024 in float64
    made the training step 5% faster and DeepPot calls 0-9%; 2048 in float32 11% and 12-22% (float32 blocks
    of 512 rows filled a quarter of the cache).
    """
    rows = L2_BYTES // (2 * n_out * np.dtype(dtype).itemsize)
    return max(64, 1 << (max(1, rows).bit_length() - 1))


def embedding_features(net: Net, s: np.ndarray, keep: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """G = net(s) and dG/ds for a column of scalars s (nb, 1), block by block.

    The net's input is a scalar, so forward-mode differentiation (nn.net_jvp
    with ds = 1) gives the whole derivative dG/ds in the same pass; the
    backward to the positions then needs no layer caches, only
    dL/ds = sum_g dL/dG_g dG_g/ds. Training needs the gradient with respect
    to the weights of both G and dG/ds: ``keep=True`` also returns each
    block's caches, (row slice, caches), for nn.dual_net_backward. The net
    runs on stacked dual numbers (nn.dual_net: one product per layer, none
    for the first, tanh's lines fused); G and dG/ds come back as the two
    halves of one (2, nb, ng) array.
    """
    nb = s.shape[0]
    # (2, nb, ng)  G and dG/ds: each block's last layer writes its rows here
    GG = np.empty((2, nb, net.n_out), dtype=s.dtype)
    kept = []
    rows = row_block(net.n_out, s.dtype)
    for b0 in range(0, nb, rows):
        blk = slice(b0, min(b0 + rows, nb))
        # (2, nblk, 1)  s and its tangent ds/ds = 1
        S2 = np.empty((2, blk.stop - blk.start, 1), dtype=s.dtype)
        S2[0], S2[1] = s[blk], 1
        _, caches = dual_net(net, S2, keep, out=GG[:, blk])
        if keep:
            kept.append((blk, caches))
    return GG[0], GG[1], kept


def padded_tail_sums(G_pad: np.ndarray, R_pad: np.ndarray, backend: str = "numba") -> np.ndarray:
    r"""What the padded slots add to T: P[t, k] = sum_{slot >= k} G(s_t,slot)^T R_t,slot.

    A padded slot's row is zero before normalization, so after it the row is
    R = -davg[t, slot] / dstd[t, slot], known from the centre type t alone.
    Neighbours are sorted with the padding last, so an atom of type t with c
    real neighbours of this type receives exactly P[t, c] from its padded
    slots: a few hundred rows through the net (or the table) replace the
    thousands of padded rows of a frame (35% of the water model's slots).
    R_pad (ntypes, n_t, 4): one neighbour type's padded rows for each centre
    type; G_pad (ntypes, n_t, ng): their features. Returns P (ntypes, n_t + 1,
    ng, 4), with P[t, n_t] = 0.
    """
    ntypes, n_t, ng = G_pad.shape
    # (ntypes, n_t + 1, ng, 4)
    P = np.zeros((ntypes, n_t + 1, ng, 4), dtype=np.result_type(G_pad, R_pad))
    if backend != "numba":
        # (ntypes, n_t, ng, 4)  each padded slot's G^T R
        GR = G_pad[..., None] * R_pad[:, :, None, :]
        # sums from slot k to the end
        P[:, :-1] = np.cumsum(GR[:, ::-1], axis=1)[:, ::-1]
        return P
    # Numba: one pass, no temporaries (the NumPy lines took 0.17-0.63 ms a block here, the kernel
    # 0.015-0.033; a training step pays it for every block)
    kernels.suffix_outer_sums(G_pad, R_pad.astype(P.dtype, copy=False), P)
    return P


def net_padded_tails(net: Net, davg: np.ndarray, dstd: np.ndarray, slots: slice, backend: str = "numba"
                     ) -> tuple[np.ndarray, np.ndarray, list]:
    """:func:`padded_tail_sums` with G from the net: returns P (ntypes, n_t + 1, ng, 4), the padded
    rows R_pad (ntypes, n_t, 4) and the net's caches (for training's reverse pass)."""
    # (ntypes, n_t, 4)  in the net's precision, as the real rows (embed_blocks)
    R_pad = (-davg[:, slots] / dstd[:, slots]).astype(net.dtype)
    # (ntypes * n_t, ng)
    G_pad, caches = net_forward(net, R_pad[..., :1].reshape(-1, 1))
    return padded_tail_sums(G_pad.reshape(R_pad.shape[:2] + (-1,)), R_pad, backend), R_pad, caches


class PaddedTail(NamedTuple):
    """One (centre group, neighbour type) block's padded tails (:func:`net_padded_tails`)."""

    P: np.ndarray  # (ntypes, n_t + 1, ng, 4) what the padded slots add to T
    R_pad: np.ndarray  # (ntypes, n_t, 4) the padded rows
    caches: list  # the nn.net_forward caches of those rows


def tail_blocks(se: SeA) -> list[tuple[int, int]]:
    """The blocks (ti, tj) :func:`embed` asks padded tails for, whatever the atoms: one centre group (ti = 0)
    with ``type_one_side``, else every centre type; every neighbour type (SeA.center_groups)."""
    groups = (0,) if se.config.type_one_side else range(se.config.ntypes)
    return [(ti, tj) for ti in groups for tj in range(se.config.ntypes)]


def block_padded_tail(se: SeA, block: tuple[int, int], backend: str = "numba") -> PaddedTail:
    """:func:`net_padded_tails` of block (ti, tj): its net, its neighbour type's slots."""
    ti, tj = block
    return PaddedTail(*net_padded_tails(se.nets[ti, tj], se.davg, se.dstd, se.config.slots(tj), backend))


def sum_rows(G, R_real, owner, n_owner, backend) -> np.ndarray:
    """T[o] = sum over the rows p owned by o of G[p]^T R[p]; returns (n_owner, ng, 4)."""
    if backend != "numba":
        # (n_owner, ng, 4)
        T = np.zeros((n_owner, G.shape[1], 4), dtype=G.dtype)
        # each row's outer product (nb, ng, 4), added onto its owner
        np.add.at(T, owner, G[:, :, None] * R_real[:, None, :])
        return T
    # Numba: no (nb, ng, 4) temporary
    start = np.searchsorted(owner, np.arange(n_owner + 1))
    # (n_owner, 4, ng)  the kernel accumulates T transposed (see kernels.py)
    Tt = np.zeros((n_owner, 4, G.shape[1]), dtype=G.dtype)
    kernels.segment_contract(G, R_real, start, Tt)
    return Tt.transpose(0, 2, 1)


def sum_rows_backward(dT, G, dG_ds, R_real, owner, backend) -> np.ndarray:
    r"""dL/dR[p] for each real row p of owner o, through both paths of T = sum G^T R:

    dL/dR[p] = G[p] dT[o]  +  (dL/ds[p], 0, 0, 0),   dL/ds[p] = sum_g (R[p] . dT[o, g]) dG_g/ds[p]

    Returns (nb, 4).
    """
    # (nb, 4)
    dR_real = np.empty_like(R_real)
    if backend != "numba":
        # (nb, ng, 4) each row's owner's gradient
        dT_rows = dT[owner]
        dR_real[:] = np.einsum("pg,pgc->pc", G, dT_rows)
        # (nb, ng)  dL/dG
        dG = np.einsum("pgc,pc->pg", dT_rows, R_real)
        dR_real[:, 0] += np.sum(dG * dG_ds, axis=1)
        return dR_real
    # Numba: no (nb, ng, 4) gather
    start = np.searchsorted(owner, np.arange(dT.shape[0] + 1))
    kernels.segment_contract_backward(G, dG_ds, R_real, start, np.ascontiguousarray(dT.transpose(0, 2, 1)), dR_real)
    return dR_real


def pack_rows(R: np.ndarray, nlist: np.ndarray, atoms: np.ndarray, slots: slice, dtype=None) -> PackedRows:
    """The real rows of the centre atoms ``atoms`` in the neighbour slots ``slots``, packed (in ``dtype``,
    default R's: the embedding's precision, see SeA.dtype).

    A section holds its real neighbours first (:func:`check_nlist_layout`), so
    an atom's ``count`` real neighbours fill its first ``count`` slots.
    """
    nf, nloc, nnei, _ = R.shape
    # (nf, na, n_t)
    real = nlist[:, atoms, slots] >= 0
    # (nf, na)
    count = real.sum(axis=-1)
    # (nb,) each: frame, atom of the block and slot of the section of every real row, in R's order
    f, a, k = np.nonzero(real)
    # (nb,)  where the row sits among R's rows: one gather here, and the backward's one scatter back
    index = (f * nloc + atoms[a]) * nnei + (slots.start + k)
    # (nb, 4), (nb,)
    R_real = R.reshape(-1, 4)[index].astype(dtype or R.dtype, copy=False)
    owner = f * atoms.size + a
    return PackedRows(real, count, R_real, owner, index)


def embed_blocks(
    R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA,
    block: Callable[[int, int, slice, np.ndarray], BlockFeatures], backend: str = "numba",
) -> tuple[np.ndarray, list[EmbedPiece]]:
    r"""T_i = (1/nnei) sum_j G(s_ij)^T R_ij, block by block (centre group, neighbour type), G from ``block``.

    The fast path's loop: each block's real rows are packed (trick 1), their
    features come from ``block(ti, tj, slots, s)`` for the column s (nb, 1),
    a :class:`BlockFeatures` whose P is what the padded slots add (trick 2).
    :func:`embed` passes the nets; minidp.compress its tables.
    Returns T (nf, nloc, ng, 4) and the pieces the backward needs.

    Precision: R (float64) is rounded to the nets' precision (SeA.dtype) as its
    rows are packed, and G, T and what follows are computed in it (deepmd-kit's
    TensorFlow backend casts the environment matrix as its filter starts).
    """
    nf, nloc, nnei, _ = R.shape
    cfg = se.config
    # (nf, nloc, ng, 4)
    T = np.zeros((nf, nloc, cfg.ng, 4), dtype=se.dtype)
    pieces = []
    for atoms, ti in se.center_groups(atom_types):
        na = atoms.size
        for tj in range(cfg.ntypes):
            slots = cfg.slots(tj)
            rows = pack_rows(R, nlist, atoms, slots, se.dtype)
            feats = block(ti, tj, slots, rows.R_real[:, :1])
            # (nf * na, ng, 4)
            Tb = sum_rows(feats.G, rows.R_real, rows.owner, nf * na, backend)
            Tb += feats.P[atom_types[atoms], rows.count].reshape(Tb.shape)
            T[:, atoms] += Tb.reshape(nf, na, cfg.ng, 4) / nnei
            pieces.append(EmbedPiece(atoms, slots, rows, feats.G, feats.dG_ds, feats.trace))
    return T, pieces


def embed(
    R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA, backend: str = "numba",
    keep: bool = False, tails: dict[tuple[int, int], PaddedTail] | None = None,
) -> tuple[np.ndarray, list[EmbedPiece]]:
    r"""T_i = (1/nnei) sum_j G(s_ij)^T R_ij, as :func:`embed_reference`, by the fast path's tricks.

    Only real neighbours go through the net (forward mode gives dG/ds too,
    trick 3); what the padded slots add comes from :func:`net_padded_tails`.
    Returns T (nf, nloc, ng, 4) and the pieces the backward needs (with the
    nets' caches when ``keep``: training). ``tails``: the blocks' padded tails already made
    ({(ti, tj): :func:`block_padded_tail`}; they depend on the weights only, so a training step split
    over pieces of atoms makes them once for all pieces), else made here.
    """

    def block(ti: int, tj: int, slots: slice, s: np.ndarray) -> BlockFeatures:
        net = se.nets[ti, tj]
        G, dG_ds, row_caches = embedding_features(net, s, keep)
        P, R_pad, pad_caches = block_padded_tail(se, (ti, tj), backend) if tails is None else tails[ti, tj]
        trace = NetTrace(se.nets.key(ti, tj), net, row_caches, R_pad, pad_caches) if keep else None
        return BlockFeatures(G, dG_ds, P, trace)

    return embed_blocks(R, nlist, atom_types, se, block, backend)


def embed_backward(dT: np.ndarray, R: np.ndarray, pieces: list[EmbedPiece], backend: str = "numba") -> np.ndarray:
    r"""dL/dR (nf, nloc, nnei, 4) from dL/dT, for the real neighbours (padded rows depend on no position).

    The formula of :func:`embed_reference_backward`, with dL/ds from the
    forward-mode dG/ds instead of a backward through the net.
    """
    nf, nloc, nnei, _ = R.shape
    # (nf, nloc, nnei, 4)  zero on padded slots
    dR = np.zeros_like(R)
    for pc in pieces:
        # (nf * na, ng, 4)
        dTb = (dT[:, pc.atoms] / nnei).reshape(-1, dT.shape[2], 4)
        # (nb, 4), each row back to its place in R (and to float64)
        dR.reshape(-1, 4)[pc.rows.index] = sum_rows_backward(dTb, pc.G, pc.dG_ds, pc.rows.R_real, pc.rows.owner,
                                                              backend)
    return dR


# ---------------------------------------------------------------------------
# Checking and indexing the parameters
# ---------------------------------------------------------------------------


def _canonical_fields(cfg: SeAConfig) -> dict:
    """SeAConfig's fields checked (its docstring lists the rules) and in canonical form: floats,
    tuples of int, bools. Pure: SeAConfig.__post_init__ stores what it returns."""
    rcut, rcut_smth = number("se_e2_a rcut", cfg.rcut), number("se_e2_a rcut_smth", cfg.rcut_smth)
    if rcut <= 0:
        raise ValueError(f"se_e2_a rcut must be positive, got {cfg.rcut!r}")
    # deepmd-kit refuses rcut_smth > rcut; at rcut_smth == rcut the switch would be a
    # step (1/(rcut - rcut_smth) in ds/dr): the forces would be NaN, so minidp refuses it too
    if not 0 <= rcut_smth < rcut:
        raise ValueError(f"se_e2_a rcut_smth must satisfy 0 <= rcut_smth < rcut, got rcut_smth={cfg.rcut_smth!r} "
                         f"and rcut={cfg.rcut!r}")
    sel, neuron = integers("se_e2_a sel", cfg.sel), integers("se_e2_a neuron", cfg.neuron)
    m2 = cfg.axis_neuron
    if isinstance(m2, bool) or not isinstance(m2, (int, np.integer)) or not 1 <= m2 <= neuron[-1]:
        raise ValueError(f"se_e2_a axis_neuron must be an integer in 1..neuron[-1] = {neuron[-1]}, got {m2!r}")
    for flag in ("type_one_side", "resnet_dt", "set_davg_zero", "float32_switch"):
        if not isinstance(getattr(cfg, flag), (bool, np.bool_)):
            raise ValueError(f"se_e2_a {flag} must be true or false, got {getattr(cfg, flag)!r}")
    if not isinstance(cfg.activation, str):
        raise ValueError(f"se_e2_a activation must be the name of an activation, got {cfg.activation!r}")
    try:
        get_activation(cfg.activation)  # deepmd-kit's names, "silut:T" and "custom_silu:T" with a threshold
    except ValueError as err:
        raise ValueError(f"se_e2_a activation: {err}") from None
    # p < 0 would put a pole at r = -p inside the cutoff sphere
    protection = number("se_e2_a env_protection", cfg.env_protection, lo=0.0)
    return {"rcut": rcut, "rcut_smth": rcut_smth, "sel": sel, "neuron": neuron, "axis_neuron": int(m2),
            "type_one_side": bool(cfg.type_one_side), "activation": cfg.activation,
            "resnet_dt": bool(cfg.resnet_dt),
            "exclude_types": _type_pairs("exclude_types", cfg.exclude_types, len(sel)),
            "env_protection": protection, "set_davg_zero": bool(cfg.set_davg_zero),
            "float32_switch": bool(cfg.float32_switch),
            "pair_exclude_types": _type_pairs("pair_exclude_types", cfg.pair_exclude_types, len(sel))}


def _type_pairs(name: str, pairs, ntypes: int) -> tuple[tuple[int, int], ...]:
    """Pairs of types [ti, tj] in 0..ntypes-1, in canonical form: each pair sorted, sorted, once.

    An exclusion is symmetric (deepmd-kit adds both orders), so [[1, 0]] and [[0, 1], [1, 0]] are one set.
    """
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise ValueError(f"se_e2_a {name} must be a list of pairs of types, got {pairs!r}")
    out = set()
    for pair in pairs:
        ok = (not isinstance(pair, (str, bytes)) and hasattr(pair, "__len__") and len(pair) == 2
              and all(not isinstance(t, bool) and isinstance(t, (int, np.integer)) and 0 <= t < ntypes
                      for t in pair))
        if not ok:
            raise ValueError(f"se_e2_a {name}: {pair!r} is not a pair of types in 0..{ntypes - 1}")
        out.add((int(min(pair)), int(max(pair))))
    return tuple(sorted(out))


class EmbeddingNets:
    """The embedding nets, one per (centre type ti, neighbour type tj): ``nets[ti, tj]``.

    With ``type_one_side`` there is one net per neighbour type, shared by all
    centre types: it is stored once, under the key ``(tj,)``, and
    ``nets[ti, tj]`` returns it for every ti. Otherwise each net is stored
    under ``(ti, tj)``. :meth:`items` lists each stored net once, in that key
    order (deepmd-kit's NetworkCollection with ndim 1 or 2); gradients are
    keyed the same way, so the sharing is explicit, not a matter of which
    Python objects happen to be reused. ``nets[ti]`` is the read-only row
    (nets[ti, 0], ..., nets[ti, ntypes - 1]).
    """

    def __init__(self, ntypes: int, type_one_side: bool, nets: dict):
        self.ntypes, self.type_one_side = int(ntypes), bool(type_one_side)
        want = self.keys()
        if sorted(nets) != want:
            raise ValueError(f"embedding nets: expected keys {want}, got {sorted(nets)}")
        self._nets = {k: nets[k] for k in want}

    @classmethod
    def from_list(cls, ntypes: int, type_one_side: bool, nets: list) -> "EmbeddingNets":
        """From a list of nets in :meth:`keys` order."""
        keys = [(tj,) for tj in range(ntypes)] if type_one_side else [(ti, tj) for ti in range(ntypes)
                                                                        for tj in range(ntypes)]
        if len(nets) != len(keys):
            raise ValueError(f"embedding nets: expected {len(keys)} nets, got {len(nets)}")
        return cls(ntypes, type_one_side, dict(zip(keys, nets)))

    @classmethod
    def from_table(cls, ntypes: int, type_one_side: bool, table) -> "EmbeddingNets":
        """From a table ``table[ti][tj]``; with ``type_one_side`` its rows must hold the same nets."""
        if len(table) != ntypes or any(len(row) != ntypes for row in table):
            raise ValueError(f"embedding nets: expected a {ntypes} x {ntypes} table of nets")
        if type_one_side:
            if any(table[ti][tj] is not table[0][tj] for ti in range(ntypes) for tj in range(ntypes)):
                raise ValueError("embedding nets: with type_one_side every centre type must use the same net "
                                 "per neighbour type (one stored net, shared)")
            return cls.from_list(ntypes, True, list(table[0]))
        return cls(ntypes, False, {(ti, tj): table[ti][tj] for ti in range(ntypes) for tj in range(ntypes)})

    def keys(self) -> list[tuple[int, ...]]:
        ntypes = self.ntypes
        return ([(tj,) for tj in range(ntypes)] if self.type_one_side
                else [(ti, tj) for ti in range(ntypes) for tj in range(ntypes)])

    def key(self, ti: int, tj: int) -> tuple[int, ...]:
        """Where the net of centre type ti and neighbour type tj is stored."""
        if not (0 <= ti < self.ntypes and 0 <= tj < self.ntypes):
            raise IndexError(f"embedding net ({ti}, {tj}) is outside types 0..{self.ntypes - 1}")
        return (tj,) if self.type_one_side else (ti, tj)

    def items(self) -> list[tuple[tuple[int, ...], Net]]:
        """(key, net) for each stored net once, in key order."""
        return list(self._nets.items())

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self._nets[self.key(*index)]
        return tuple(self[index, tj] for tj in range(self.ntypes))

    def __setitem__(self, index: tuple[int, int], net: Net) -> None:
        self._nets[self.key(*index)] = net

    def __len__(self) -> int:
        return len(self._nets)

    def __repr__(self) -> str:
        return f"EmbeddingNets(ntypes={self.ntypes}, type_one_side={self.type_one_side}, keys={self.keys()})"
