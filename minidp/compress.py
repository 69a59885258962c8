r"""Compressed models: each embedding net replaced by a table of quintic polynomials in s.

deepmd-kit's ``dp compress`` turns every embedding net :math:`\mathcal G(s)`
(one scalar in, ``ng`` features out) into a piecewise polynomial: the s axis
is cut into pieces :math:`[x_n, x_{n+1})` and on each piece

.. math::

    \mathcal G_g(s) \approx \sum_{k=0}^{5} a_{n,g,k}\,(s - x_n)^k ,

the unique quintic that matches the net's value, first and second derivative
at both ends of the piece (a quintic Hermite piece), so the table and its
first two derivatives are continuous everywhere. A network evaluation of
``25 + 25*50 + 50*100`` multiply-adds and 175 tanh per neighbour becomes a
table look-up and ``5 * ng`` multiply-adds.

This module has four parts:

1. **The grid** (:func:`env_mat_range`, :func:`table_grid`), deepmd-kit
   3.2's: from the smallest neighbour distance r_min, the range of s is
   ``[floor(lower), ceil(upper)]`` with lower = -davg/dstd (a neighbour at the
   cutoff) and upper = (s(r_min)/r_min - davg)/dstd (the closest one), both
   taken over the four columns of davg/dstd as deepmd-kit 3.2's
   backend-neutral code does, or over the first alone as its TensorFlow
   backend does (``rule="tf"``); a first table of stride ``step`` covers it, a
   second of stride ``10*step`` runs on to ``extrapolate * upper``. The
   distance comes from the model file, or the training systems (:func:`minidp.training.loop.training_min_nbor_dist`).
2. **The pieces** (:func:`net_derivatives`, :func:`hermite_coefficients`,
   :func:`build_table`): value, dG/ds and d2G/ds2 of the net at the nodes by
   second-order forward mode, and the six coefficients per piece, stored in
   deepmd-kit's ``compress_data`` / ``compress_info`` layout.
3. **The readable tabulated embedding** (:func:`locate`,
   :func:`table_features`, :func:`tabulated_embed`): look up each s, evaluate
   the polynomial and its derivative, contract into T exactly as the exact
   path does; its backward is the exact path's (:func:`minidp.se_e2_a.embed_backward`),
   since it only needs G and dG/ds of each row.
4. **The fused kernels** (:func:`fused_embed`, :func:`fused_embed_backward`,
   Numba kernels at the end): look-up, polynomial and contraction in one
   loop, G never stored; the backward evaluates the polynomial again, which
   costs less than writing G (nb x ng numbers) and reading it back.

A :class:`Compression` is the embedding step of a compressed descriptor
(``SeA.compress``, a :class:`minidp.se_e2_a.TabulatedEmbedding`): its
``embed`` / ``embed_backward`` run part 3 or part 4, and
:func:`minidp.se_e2_a.descriptor_forward` calls them in place of the nets.
This module imports minidp.se_e2_a, never the other way round.

se_e2_a with a type embedding (:mod:`minidp.type_embed`) is compressed the same way: its descriptor
carries the shared net folded per neighbour type (per pair of types without type_one_side), each an
ordinary net of s, and those are what the tables hold (deepmd-kit refuses to compress this model).

Outside the table deepmd-kit 3.2 extends each end linearly (C1): below
``lower`` G(s) = G(lower) + G'(lower)(s - lower), at and beyond ``table_max``
G(s) = G(table_max) + G'(table_max)(s - table_max); the derivative is the
end's slope.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei, ng``); here also
``nspline``: pieces of a table, ``nnode = nspline + 1``: nodes, ``ntab``:
tables of a model, ``nb``: rows (neighbours) looked up at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from numba import njit

from minidp.checks import InputError, InputTypeError, number
from minidp.nn import Net, get_activation, residual_kind
from minidp.se_e2_a import (
    BlockFeatures,
    EmbedPiece,
    SeA,
    SeAConfig,
    embed_backward,
    embed_blocks,
    padded_tail_sums,
    smooth_switch,
    type_slots,
)

# deepmd-kit's defaults for `dp compress`: -s 0.01, -e 5, the second table's
# stride 10 * step, and -f -1 (no overflow check: deepmd-kit only logs it).
DEFAULT_STEP = 0.01
DEFAULT_EXTRAPOLATE = 5.0
DEFAULT_CHECK_FREQUENCY = -1

# The largest tables compress builds: 512 MiB of coefficients for all tables together. The water
# model's two tables take 20 MiB at the default step 0.01 and 200 MiB at 0.001; building and
# writing them needs a few times as much again (the nets' derivatives at every node, the kernels'
# copy, the file in memory: `minidp compress -s 0.001` peaks at 0.75 GB).
MAX_TABLE_BYTES = 2**29

# How far a piece count computed from the stored bounds may sit from a whole number and still
# count as whole: the bounds and strides of a float32 model are rounded to 7 digits
# (16 / float32(0.01) = 1600.00004), while a step that does not divide the table
# (16 / 0.03 = 533.33) is off by a large fraction of a piece.
WHOLE_TOL = 1e-6


# ---------------------------------------------------------------------------
# Tables and their configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One embedding net tabulated (deepmd-kit's compress_data / compress_info of one net).

    Piece n starts at x_n = lower + n*stride0 for n < n_first (the first
    table), at x_n = upper + (n - n_first)*stride1 after it; n_first =
    (upper - lower)/stride0 and the second table's (table_max - upper)/stride1
    pieces are whole numbers (:func:`grid_counts`), and the table holds both.
    On piece n, G_g(s) = sum_k coef[n, g, k] (s - x_n)^k, every coefficient finite.
    """

    coef: np.ndarray  # (nspline, ng, 6) polynomial coefficients, lowest order first
    lower: float  # start of the first table (an integer in deepmd-kit's grid)
    upper: float  # end of the first table, start of the second
    table_max: float  # end of the second table: extrapolate * upper
    stride0: float  # step of the first table
    stride1: float  # step of the second (10 * stride0 in deepmd-kit)
    check_frequency: int = DEFAULT_CHECK_FREQUENCY  # deepmd-kit's overflow-check frequency (-1: never)
    n_first: int = field(init=False, repr=False, compare=False)  # pieces of the first table

    def __post_init__(self):
        coef = np.asarray(self.coef)
        if coef.ndim != 3 or coef.shape[2] != 6 or coef.shape[0] < 1 or coef.dtype.kind != "f":
            raise ValueError(f"table coefficients must be floats of shape (nspline, ng, 6), got {coef.dtype} "
                             f"{coef.shape}")
        n_first, n_second = grid_counts(self.lower, self.upper, self.table_max, self.stride0, self.stride1)
        if coef.shape[0] != n_first + n_second:
            raise ValueError(f"the table has {coef.shape[0]} pieces but its bounds make {n_first + n_second} "
                             f"({n_first} of {self.stride0:g} in [{self.lower:g}, {self.upper:g}), {n_second} of "
                             f"{self.stride1:g} to {self.table_max:g})")
        # (nbad, 3)  a NaN or inf coefficient would be read as a number by every neighbour on its piece
        bad = np.argwhere(~np.isfinite(coef))
        if bad.size:
            piece, g, k = bad[0].tolist()
            raise ValueError(f"table coefficient a_{k} of feature {g} on piece {piece} is {coef[piece, g, k]}; "
                             "expected finite numbers")
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "n_first", n_first)

    @property
    def nspline(self) -> int:
        return self.coef.shape[0]

    @property
    def ng(self) -> int:
        return self.coef.shape[1]

    @property
    def info(self) -> np.ndarray:
        """deepmd-kit's compress_info: (lower, upper, table_max, stride0, stride1, check_frequency)."""
        return np.array([self.lower, self.upper, self.table_max, self.stride0, self.stride1,
                         self.check_frequency], dtype=self.coef.dtype)

    @property
    def data(self) -> np.ndarray:
        """deepmd-kit's compress_data: (nspline, 6 * ng), feature g's coefficients at columns 6g..6g+5."""
        return self.coef.reshape(self.nspline, -1)

    @classmethod
    def from_deepmd(cls, data, info) -> Table:
        """The table deepmd-kit serializes as one (compress_data, compress_info) pair."""
        data, info = np.asarray(data), np.asarray(info).reshape(-1)
        if data.ndim != 2 or data.shape[1] % 6 or info.size != 6:
            raise ValueError(f"compress_data must be (nspline, 6 * ng) and compress_info 6 numbers, "
                             f"got shapes {data.shape} and {info.shape}")
        if not np.isfinite(info).all() or info[5] != np.round(info[5]):
            raise ValueError(f"compress_info must be 6 finite numbers, the last an integer, got {info.tolist()}")
        lower, upper, table_max, stride0, stride1, freq = (float(x) for x in info)
        return cls(data.reshape(data.shape[0], -1, 6), lower, upper, table_max, stride0, stride1, int(freq))


@dataclass(frozen=True)
class Compression:
    """The tables of a compressed se_e2_a descriptor, in deepmd-kit's order.

    With type_one_side one table per neighbour type tj; otherwise one per
    (centre ti, neighbour tj) at index ti + tj * ntypes, as deepmd-kit numbers
    the embedding nets.
    """

    tables: tuple[Table, ...]
    type_one_side: bool
    pad_rows: np.ndarray  # (ntypes, nnei, 4) the rows of padded slots, -davg/dstd (see table_padded_tails)
    sel: tuple[int, ...]  # neighbour slots per type, as the descriptor's
    min_nbor_dist: float | None = None  # the smallest neighbour distance the grid came from, when known
    # built once for the fused kernels: all tables, (ntab, max nspline, 6, ng), each coefficient
    # contiguous over the features so the inner loop vectorizes; (ntab, 7) bounds; and what the
    # padded slots add to T, (ntab, ntypes, max sel + 1, 4, ng) (padded_tails)
    coef_t: np.ndarray = field(init=False, repr=False, compare=False)
    bounds: np.ndarray = field(init=False, repr=False, compare=False)
    padded: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.tables)
        ntypes = n if self.type_one_side else round(np.sqrt(n))
        if n == 0 or (not self.type_one_side and ntypes * ntypes != n):
            raise ValueError(f"{n} tables for type_one_side={self.type_one_side}: expected ntypes "
                             "tables (type_one_side) or ntypes**2")
        if len({t.ng for t in self.tables}) != 1:
            raise ValueError(f"tables have different widths {sorted({t.ng for t in self.tables})}")
        if np.shape(self.pad_rows) != (ntypes, sum(self.sel), 4) or len(self.sel) != ntypes:
            raise ValueError(f"pad_rows of shape {np.shape(self.pad_rows)} and sel {list(self.sel)} do not fit "
                             f"{ntypes} types: expected (ntypes, sum(sel), 4)")
        t0 = self.tables[0]
        # (ntab, max nspline, 6, ng)
        coef_t = np.zeros((n, max(t.nspline for t in self.tables), 6, t0.ng), dtype=t0.coef.dtype)
        for k, t in enumerate(self.tables):
            coef_t[k, : t.nspline] = t.coef.transpose(0, 2, 1)
        # (ntab, 7)  what the kernels' look-up needs of each table
        bounds = np.array([[t.lower, t.upper, t.table_max, t.stride0, t.stride1, t.n_first, t.nspline - 1]
                           for t in self.tables], dtype=np.float64)
        object.__setattr__(self, "coef_t", coef_t)
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "padded", padded_tails(self))

    @property
    def ntypes(self) -> int:
        n = len(self.tables)
        return n if self.type_one_side else round(np.sqrt(n))

    def index(self, ti: int, tj: int) -> int:
        """Which table serves centre type ti and neighbour type tj."""
        return tj if self.type_one_side else ti + tj * self.ntypes

    def table(self, ti: int, tj: int) -> Table:
        return self.tables[self.index(ti, tj)]

    # --- the embedding step of a compressed descriptor (minidp.se_e2_a.TabulatedEmbedding) ---
    def embed(self, R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA,
              backend: str) -> tuple[np.ndarray, list[EmbedPiece] | FusedCache]:
        """T (nf, nloc, ng, 4) from the tables, and what :meth:`embed_backward` needs.

        The readable NumPy path (:func:`tabulated_embed`) for "numpy" and
        "reference" (a table has no plainer form); the fused kernel
        (:func:`fused_embed`) for "numba".
        """
        if backend != "numba":
            return tabulated_embed(R, nlist, atom_types, se, self)
        return fused_embed(R, nlist, atom_types, se.config, self)

    def embed_backward(self, dT: np.ndarray, R: np.ndarray, cache: list[EmbedPiece] | FusedCache, se: SeA,
                       backend: str) -> np.ndarray:
        """dL/dR (nf, nloc, nnei, 4) from dL/dT, the backward of :meth:`embed` on the same backend."""
        if backend != "numba":
            return embed_backward(dT, R, cache, "numpy")
        return fused_embed_backward(dT, R, cache, se.config, self)


def compression(tables, se: SeA, min_nbor_dist: float | None = None) -> Compression:
    """A Compression of se's descriptor from its tables (deepmd-kit's order)."""
    cfg = se.config
    return Compression(tuple(tables), cfg.type_one_side, -se.davg / se.dstd, tuple(cfg.sel), min_nbor_dist)


def _embedding_net(se: SeA, ti: int, tj: int) -> Net:
    """The exact embedding net of centre type ti and neighbour type tj (the one place that knows se.nets)."""
    return se.nets[ti, tj]


# ---------------------------------------------------------------------------
# 1. The grid
# ---------------------------------------------------------------------------


# How deepmd-kit 3.2 reads the range of s off davg/dstd: its TensorFlow backend
# (`dp --tf compress`) from the first column of the first slot; its
# backend-neutral code (`dp --pt compress`, dpmodel's enable_compression) over
# all four columns of the first slot.
RANGE_RULES = ("neutral", "tf")


def env_mat_range(davg: np.ndarray, dstd: np.ndarray, rcut_smth: float, rcut: float,
                  min_nbor_dist: float, rule: str = "neutral") -> tuple[np.ndarray, np.ndarray]:
    r"""Per centre type, the integer range of s the first table must cover (deepmd-kit 3.2's rules).

    .. math::

        \mathrm{lower}_t = \Big\lfloor \min_c \frac{-\mathrm{davg}_{t,0,c}}{\mathrm{dstd}_{t,0,c}} \Big\rfloor,\qquad
        \mathrm{upper}_t = \Big\lceil \max_c \frac{s(r_{min})/r_{min} - \mathrm{davg}_{t,0,c}}
            {\mathrm{dstd}_{t,0,c}} \Big\rceil

    over the columns c of the first neighbour slot: c = 0 alone with
    ``rule="tf"`` (deepmd-kit's TensorFlow backend, whose davg[:, 0] is that
    one number), all four with ``rule="neutral"`` (its backend-neutral code,
    whose davg[:, 0] is the slot's row). The first column alone is the range of
    s (a neighbour at the cutoff, the closest neighbour); taking all four
    widens the water model's first table from [-1, 9] to [-1, 15], which
    changes the tables only where a neighbour is closer than r_min (the second,
    coarser table starts later). Returns lower, upper: (ntypes,) each.
    """
    if rule not in RANGE_RULES:
        raise ValueError(f"range rule must be one of {RANGE_RULES}, got {rule!r}")
    sw, _ = smooth_switch(np.float64(min_nbor_dist), rcut_smth, rcut)
    columns = slice(0, 1) if rule == "tf" else slice(0, 4)
    # (ntypes, 1) or (ntypes, 4)
    lower = np.floor(-davg[:, 0, columns] / dstd[:, 0, columns])
    upper = np.ceil((sw / min_nbor_dist - davg[:, 0, columns]) / dstd[:, 0, columns])
    return lower.min(axis=1), upper.max(axis=1)


def grid_counts(lower: float, upper: float, table_max: float, stride0: float, stride1: float) -> tuple[int, int]:
    r"""The pieces of the two tables, n_first = (upper - lower)/stride0 and n_second = (table_max - upper)/stride1.

    Both must be whole numbers: a piece of the grid is found by
    n = floor((s - x_0)/stride) and evaluated at dx = s - x_n, so a shorter
    last piece would hold a quintic fitted across the wrong width (deepmd-kit
    builds one for a step that does not divide its table, and its G is then
    off by ~1e-3 next to ``upper``). ValueError unless lower < upper <
    table_max and the strides are positive, all finite, and both counts whole
    (to :data:`WHOLE_TOL`, the rounding of a float32 model's bounds).
    """
    bounds = (lower, upper, table_max, stride0, stride1)
    if not np.isfinite(bounds).all():
        raise ValueError(f"table bounds and strides must be finite, got {[float(b) for b in bounds]}")
    if not (lower < upper < table_max):
        raise ValueError(f"table bounds must satisfy lower < upper < table_max, got {lower:g}, {upper:g}, "
                         f"{table_max:g}")
    if not (stride0 > 0 and stride1 > 0):
        raise ValueError(f"table strides must be positive, got {stride0:g} and {stride1:g}")
    counts = []
    for a, b, stride in ((lower, upper, stride0), (upper, table_max, stride1)):
        n = (b - a) / stride
        if not (np.isfinite(n) and abs(n - round(n)) <= WHOLE_TOL * max(n, 1.0)):
            raise ValueError(f"the table [{a:g}, {b:g}) is {n:.6g} pieces of {stride:g}, not a whole number: "
                             "choose a step (and extrapolate) that divide it")
        counts.append(int(round(n)))
    return counts[0], counts[1]


def table_grid(lower: float, upper: float, stride0: float, stride1: float, extrapolate: float,
               dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """The nodes x (nnode,) and piece widths h (nspline,) of deepmd-kit's two tables.

    Nodes lower, lower + stride0, ... below upper, then upper, upper + stride1,
    ... below extrapolate*upper, then extrapolate*upper itself: nspline =
    n_first + n_second pieces (:func:`grid_counts`). Each node is start +
    i*stride as np.arange makes it (deepmd-kit's nodes, to the bit); arange's
    length is cut to the count, since it rounds (16/0.01 may give 1601 nodes).
    """
    table_max = extrapolate * upper
    n_first, n_second = grid_counts(lower, upper, table_max, stride0, stride1)
    # (nnode,)
    x = np.concatenate([np.arange(lower, upper, stride0, dtype=dtype)[:n_first],
                        np.arange(upper, table_max, stride1, dtype=dtype)[:n_second],
                        np.array([table_max], dtype=dtype)])
    # (nspline,)
    h = np.full(n_first + n_second, stride1, dtype=dtype)
    h[:n_first] = stride0
    return x, h


# ---------------------------------------------------------------------------
# 2. The pieces
# ---------------------------------------------------------------------------


def _residual(x: np.ndarray, kind: str) -> np.ndarray | None:
    """What a residual layer adds to its output: x ('same'), [x, x] ('double') or nothing (None)."""
    if kind == "same":
        return x
    if kind == "double":
        return np.concatenate([x, x], axis=1)
    return None


def net_derivatives(net: Net, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""G = net(s), dG/ds and d2G/ds2 for a column of scalars s (nb, 1), by forward mode.

    Layer by layer, with z = xW + b, a = phi(z), y = idt a + res(x) (res: x,
    [x, x] or nothing, as the layer's residual) and dots for d/ds:

    .. math::

        \dot z = \dot x W,\quad \ddot z = \ddot x W,\quad
        \dot a = \phi'(z)\,\dot z,\quad \ddot a = \phi'(z)\,\ddot z + \phi''(z)\,\dot z^2,

        \dot y = \mathrm{idt}\,\dot a + \mathrm{res}(\dot x),\quad
        \ddot y = \mathrm{idt}\,\ddot a + \mathrm{res}(\ddot x),

    from x = s, dx/ds = 1, d2x/ds2 = 0. Returns three (nb, ng), in s's dtype
    (long double gives the correctly rounded table of validation.compress_check).

    Round-off, and why it is deepmd-kit's: a piece's a_3..a_5 are small
    differences of these numbers divided by h^3..h^5, so one ulp in one node's
    derivative moves a_5 by ~1e-8 of itself at h = 0.01 (see
    :func:`hermite_coefficients`). To give deepmd-kit 3.2's own table
    coefficient for coefficient, the arithmetic takes its order: phi' and
    phi'' see the activation recovered from the output, y - res(x) (within an
    ulp of a), not a itself, and the products run phi'' dz dz left to right.
    deepmd-kit leaves idt out of its tables; minidp keeps it, and there
    (resnet_dt nets only) the two tables differ.
    """
    x = s
    # (nb, 1) each: the input's first and second derivative with respect to s
    dx, d2x = np.ones_like(s), np.zeros_like(s)
    for layer in net.layers:
        act, kind = get_activation(layer.activation), residual_kind(layer.n_in, layer.n_out, layer.resnet)
        W = layer.W.astype(s.dtype, copy=False)
        # (nb, n_out) each
        z = x @ W + layer.b.astype(s.dtype, copy=False)
        dz, d2z = dx @ W, d2x @ W
        a = act.f(z)
        res = _residual(x, kind)
        if layer.idt is not None:  # resnet_dt: deepmd-kit has no table to match, the plain chain rule
            y = a * layer.idt if res is None else a * layer.idt + res
        elif res is None:
            y = a
        else:
            y = a + res
            a = y - res  # deepmd-kit's recovered activation (see above)
        d1 = act.grad(z, a)
        d2 = act.grad2(z, a, d1)
        # (nb, n_out) each: the layer's first and second derivative
        dy, d2y = d1 * dz, d1 * d2z + d2 * dz * dz
        if layer.idt is not None:
            dy, d2y = dy * layer.idt, d2y * layer.idt
        if res is not None:
            dy, d2y = dy + _residual(dx, kind), d2y + _residual(d2x, kind)
        x, dx, d2x = y, dy, d2y
    return x, dx, d2x


def hermite_coefficients(v: np.ndarray, d: np.ndarray, d2: np.ndarray, h: np.ndarray) -> np.ndarray:
    r"""The quintic on each piece matching value, slope and curvature at both of its ends.

    On piece n of width h, with p(t) = sum_k a_k t^k, t = s - x_n: p, p', p''
    at t = 0 give a_0 = v_0, a_1 = d_0, a_2 = d2_0 / 2; at t = h, with
    dv = v_1 - v_0, the remaining 3 x 3 system solves to

    .. math::

        a_3 = \frac{20\,dv - (8 d_1 + 12 d_0) h - (3 d2_0 - d2_1) h^2}{2 h^3},\quad
        a_4 = \frac{-30\,dv + (14 d_1 + 16 d_0) h + (3 d2_0 - 2 d2_1) h^2}{2 h^4},\quad
        a_5 = \frac{12\,dv - 6 (d_1 + d_0) h + (d2_1 - d2_0) h^2}{2 h^5}.

    v, d, d2: (nnode, ng) at the nodes; h: (nspline,). Returns (nspline, ng, 6).
    a_3..a_5 are small differences of O(1) terms divided by h^3..h^5: their
    relative round-off is large (1e-8 for a_5 at h = 0.01), but what they add
    to G, a_k h^k, keeps the round-off of the values; to dG/ds, k a_k h^(k-1),
    they add ~1e-12 of it (what separates two tables from differently rounded
    nodes, validation.compress_check).
    """
    n = h.size
    # (nspline, 1)
    h = h[:, None]
    # (nspline, ng) each: left and right ends of every piece
    v0, v1, d0, d1, s0, s1 = v[:n], v[1 : n + 1], d[:n], d[1 : n + 1], d2[:n], d2[1 : n + 1]
    dv = v1 - v0
    # (nspline, ng, 6)
    coef = np.empty(v0.shape + (6,), dtype=v.dtype)
    coef[..., 0], coef[..., 1], coef[..., 2] = v0, d0, 0.5 * s0
    # 1/(2h^k) times the bracket, h^k as repeated products: deepmd-kit's order of operations, so
    # that the rounding, which a_5 magnifies to ~1e-8 of itself, is deepmd-kit's too
    coef[..., 3] = (1 / (2 * h * h * h)) * (20 * dv - (8 * d1 + 12 * d0) * h - (3 * s0 - s1) * h * h)
    coef[..., 4] = (1 / (2 * h * h * h * h)) * (-30 * dv + (14 * d1 + 16 * d0) * h + (3 * s0 - 2 * s1) * h * h)
    coef[..., 5] = (1 / (2 * h * h * h * h * h)) * (12 * dv - 6 * (d1 + d0) * h + (s1 - s0) * h * h)
    return coef


def build_table(net: Net, lower: float, upper: float, step: float = DEFAULT_STEP,
                extrapolate: float = DEFAULT_EXTRAPOLATE, check_frequency: int = DEFAULT_CHECK_FREQUENCY) -> Table:
    """Tabulate one embedding net on deepmd-kit's grid (first stride ``step``, second ``10 * step``)."""
    stride1 = 10 * step
    # (nnode,), (nspline,)
    x, h = table_grid(lower, upper, step, stride1, extrapolate, net.dtype)
    # (nnode, ng) each
    v, d, d2 = net_derivatives(net, x[:, None])
    return Table(hermite_coefficients(v, d, d2, h), float(lower), float(upper), float(extrapolate * upper),
                 float(step), float(stride1), int(check_frequency))


def check_min_nbor_dist(where: str, value, rcut: float) -> float:
    """value as the smallest neighbour distance of a grid: a finite number with 0 < value < rcut.

    At and beyond rcut the switch is 0, so the closest neighbour would sit at
    s = 0 and the first table collapse to [floor(-davg/dstd), 0]. ``where``
    names the value's origin (an option, a file and key) in the error.
    """
    rmin = number(where, value, positive=True)
    if not rmin < rcut:
        raise InputError(f"{where}: {rmin:g} is not below the model's rcut {rcut:g}: the smallest neighbour "
                         "distance must lie within the cutoff")
    return rmin


class TablePlan(NamedTuple):
    """What compress_descriptor will build, known before anything is allocated."""

    keys: list[tuple[int, int]]  # (centre type, neighbour type) of each table, in deepmd-kit's order
    bounds: list[tuple[float, float]]  # (lower, upper) of each table's first part
    nspline: list[int]  # pieces of each table
    nbytes: int  # the coefficients of all tables


def plan_tables(se: SeA, min_nbor_dist: float, step: float, extrapolate: float, rule: str) -> TablePlan:
    """The tables' ranges and sizes (deepmd-kit's grid, :func:`env_mat_range`), checked.

    With type_one_side a neighbour type's table serves every centre type, so
    it spans the union of their ranges (deepmd-kit skips centre types with
    sel 0, as it does). ValueError naming the table when its grid is not
    whole (:func:`grid_counts`), or when all tables would hold more than
    :data:`MAX_TABLE_BYTES`.
    """
    cfg = se.config
    lower, upper = env_mat_range(se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, min_nbor_dist, rule)
    nt = cfg.ntypes
    if cfg.type_one_side:
        used = np.asarray(cfg.sel) > 0
        bounds = [(float(lower[used].min()), float(upper[used].max()))] * nt
        keys = [(0, tj) for tj in range(nt)]
    else:
        keys = [(k % nt, k // nt) for k in range(nt * nt)]
        bounds = [(float(lower[ti]), float(upper[ti])) for ti, _ in keys]
    nspline = []
    for (ti, tj), (lo, up) in zip(keys, bounds):
        try:
            nspline.append(sum(grid_counts(lo, up, extrapolate * up, step, 10 * step)))
        except ValueError as err:
            raise InputError(f"the table of centre type {ti} and neighbour type {tj} (s in [{lo:g}, {up:g}) from "
                             f"min_nbor_dist {min_nbor_dist:g}, then to {extrapolate:g} times that): {err}") from None
    # every coefficient: nspline x ng x 6 numbers of the nets' precision
    nbytes = sum(nspline) * cfg.ng * 6 * np.dtype(_embedding_net(se, *keys[0]).dtype).itemsize
    if nbytes > MAX_TABLE_BYTES:
        raise InputError(f"the tables would hold {sum(nspline):,} pieces ({nbytes / 2**20:,.0f} MiB), above the "
                         f"bound of {MAX_TABLE_BYTES / 2**20:,.0f} MiB: raise the step ({step:g}), lower extrapolate "
                         f"({extrapolate:g}), or check min_nbor_dist ({min_nbor_dist:g})")
    return TablePlan(keys, bounds, nspline, nbytes)


def compress_descriptor(se: SeA, min_nbor_dist: float, step: float = DEFAULT_STEP,
                        extrapolate: float = DEFAULT_EXTRAPOLATE,
                        check_frequency: int = DEFAULT_CHECK_FREQUENCY, rule: str = "neutral") -> SeA:
    """A copy of ``se`` whose embedding nets are tabulated (what `dp compress` does to the descriptor).

    ``rule``: whose range of s (:func:`env_mat_range`): "neutral" gives the
    tables of `dp --pt compress` and dpmodel's enable_compression, "tf" those
    of `dp --tf compress` (to their round-off, validation.compress_check).
    The tables' sizes are known (:func:`plan_tables`) before any is built.
    """
    min_nbor_dist = check_min_nbor_dist("min_nbor_dist", min_nbor_dist, se.config.rcut)
    step = number("step", step, positive=True)
    if not number("extrapolate", extrapolate) > 1:
        raise InputError(f"extrapolate: {extrapolate} is not larger than 1")
    if isinstance(check_frequency, bool) or not isinstance(check_frequency, (int, np.integer)):
        raise InputTypeError(f"check_frequency: expected an integer, got {check_frequency!r}")
    plan = plan_tables(se, min_nbor_dist, step, extrapolate, rule)
    tables = tuple(build_table(_embedding_net(se, ti, tj), lo, up, step, extrapolate, check_frequency)
                   for (ti, tj), (lo, up) in zip(plan.keys, plan.bounds))
    return replace(se, compress=compression(tables, se, min_nbor_dist))


# ---------------------------------------------------------------------------
# 3. The readable tabulated embedding
# ---------------------------------------------------------------------------


def locate(table: Table, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Piece n, offset dx = s - x_n inside it, and overshoot delta beyond the table, for each s (nb,).

    Inside the first table n = floor((s - lower)/stride0); inside the second
    n = n_first + floor((s - upper)/stride1). Below ``lower`` the first piece
    is read at dx = 0 and at and beyond ``table_max`` the last piece at its
    end, each with delta = s - (that end) for the linear extension. n is
    clipped to the table, as deepmd-kit 3.2 does. Returns (nb,) int64, (nb,), (nb,).
    """
    n_first, last = table.n_first, table.nspline - 1
    below, first, second = s < table.lower, s < table.upper, s < table.table_max
    # (nb,)
    n = np.where(below, 0, np.where(first, np.floor((s - table.lower) / table.stride0),
                                    np.where(second, n_first + np.floor((s - table.upper) / table.stride1), last)))
    n = np.clip(n, 0, last).astype(np.int64)
    # (nb,)  each branch measures dx from its own table's nodes, as deepmd-kit's op does
    dx = np.where(below, 0.0, np.where(
        first, s - (n * table.stride0 + table.lower),
        np.where(second, s - ((n - n_first) * table.stride1 + table.upper),
                 table.table_max - ((last - n_first) * table.stride1 + table.upper))))
    delta = np.where(below, s - table.lower, np.where(second, 0.0, s - table.table_max))
    return n, dx, delta


def table_features(table: Table, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""G(s) and dG/ds from the table, for each s (nb,): returns two (nb, ng).

    .. math::

        G = \sum_k a_k\,dx^k + \delta\, G',\qquad G' = \sum_{k \ge 1} k\, a_k\, dx^{k-1}

    (both by Horner's rule; delta = 0 inside the table), with (n, dx, delta) from :func:`locate`.
    """
    n, dx, delta = locate(table, s)
    # (nb, ng, 6)  each row's piece
    a = table.coef[n]
    # (nb, 1)
    t = dx[:, None]
    # (nb, ng), (nb, ng)
    G = a[..., 0] + t * (a[..., 1] + t * (a[..., 2] + t * (a[..., 3] + t * (a[..., 4] + t * a[..., 5]))))
    dG = a[..., 1] + t * (2 * a[..., 2] + t * (3 * a[..., 3] + t * (4 * a[..., 4] + 5 * t * a[..., 5])))
    G += delta[:, None] * dG
    return G, dG


def table_padded_tails(table: Table, R_pad: np.ndarray) -> np.ndarray:
    """:func:`minidp.se_e2_a.padded_tail_sums` with G from the table.

    R_pad (ntypes, n_t, 4): the padded rows -davg/dstd of one neighbour type's
    slots for each centre type. Returns P (ntypes, n_t + 1, ng, 4), P[t, n_t] = 0.
    """
    # (ntypes * n_t, ng)
    G_pad, _ = table_features(table, R_pad[..., 0].reshape(-1))
    return padded_tail_sums(G_pad.reshape(R_pad.shape[:2] + (-1,)), R_pad)


def tabulated_embed(R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, se: SeA,
                    cmp: Compression) -> tuple[np.ndarray, list[EmbedPiece]]:
    r"""T_i = (1/nnei) sum_j G(s_ij)^T R_ij with G from the tables cmp (the plain NumPy version).

    The exact path's loop (:func:`minidp.se_e2_a.embed_blocks`) with the net
    replaced by :func:`table_features`: each real row is looked up, the padded
    slots come from :func:`table_padded_tails`. The pieces hold G and dG/ds of
    every row, so :func:`minidp.se_e2_a.embed_backward` is the backward.
    Returns T (nf, nloc, ng, 4) and the pieces.
    """

    def block(ti: int, tj: int, slots: slice, s: np.ndarray) -> BlockFeatures:
        table = cmp.table(ti, tj)
        # (nb, ng), (nb, ng)
        G, dG_ds = table_features(table, s[:, 0])
        return BlockFeatures(G, dG_ds, table_padded_tails(table, cmp.pad_rows[:, slots]), None)

    return embed_blocks(R, nlist, atom_types, se, block, "numpy")


# ---------------------------------------------------------------------------
# 4. The fused path: look-up and contraction in one Numba loop
# ---------------------------------------------------------------------------


class FusedCache(NamedTuple):
    """What fused_embed_backward needs: which rows are real, and which table each uses."""

    counts: np.ndarray  # (nf, nloc, ntypes) real neighbours per (atom, neighbour type)
    tab_of: np.ndarray  # (nloc, ntypes) the table of each (atom, neighbour type)


def padded_tails(cmp: Compression) -> np.ndarray:
    """P of :func:`table_padded_tails` for every table, in the kernel's layout: (ntab, ntypes, max sel + 1, 4, ng).

    Pt[tab, t, c] is what the padded slots of the table's neighbour type add
    to T of a type-t atom with c real neighbours of that type (rows past
    sel + 1 stay zero). It depends on the model alone: Compression builds it once.
    """
    ntypes = len(cmp.sel)
    # (ntab, ntypes, max sel + 1, 4, ng)
    Pt = np.zeros((len(cmp.tables), ntypes, max(cmp.sel) + 1, 4, cmp.tables[0].ng), dtype=cmp.pad_rows.dtype)
    for tj in range(ntypes):
        for ti in range(ntypes):
            tab = cmp.index(ti, tj)
            P = table_padded_tails(cmp.tables[tab], cmp.pad_rows[:, type_slots(cmp.sel, tj)])
            Pt[tab, :, : cmp.sel[tj] + 1] = P.transpose(0, 1, 3, 2)
    return Pt


def fused_embed(R: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, cfg: SeAConfig,
                cmp: Compression) -> tuple[np.ndarray, FusedCache]:
    """:func:`tabulated_embed` in one Numba kernel: G never stored, T built atom by atom.

    The padded slots take the closed form P[type, count] of
    :func:`table_padded_tails`, built once per model (:func:`padded_tails`).
    Returns T (nf, nloc, ng, 4) and the cache for :func:`fused_embed_backward`.
    """
    nf, nloc, nnei, _ = R.shape
    sec = cfg.sec
    # (nf, nloc, ntypes)
    counts = np.stack([(nlist[:, :, sec[t]: sec[t + 1]] >= 0).sum(axis=-1) for t in range(cfg.ntypes)], axis=-1)
    # (ntypes, ntypes) -> (nloc, ntypes)
    tab_of = np.array([[cmp.index(ti, tj) for tj in range(cfg.ntypes)] for ti in range(cfg.ntypes)])[atom_types]
    # (nf, nloc, 4, ng)  T transposed, as the kernel accumulates it
    Tt = np.zeros((nf, nloc, 4, cfg.ng), dtype=R.dtype)
    tabulated_contract(R, counts, sec, tab_of, atom_types, cmp.coef_t, cmp.bounds, cmp.padded, 1.0 / nnei, Tt)
    return Tt.transpose(0, 1, 3, 2), FusedCache(counts, tab_of)


def fused_embed_backward(dT: np.ndarray, R: np.ndarray, cache: FusedCache, cfg: SeAConfig,
                         cmp: Compression) -> np.ndarray:
    r"""dL/dR (nf, nloc, nnei, 4) from dL/dT: :func:`minidp.se_e2_a.embed_backward` for table rows.

    dL/dR_j = (1/nnei) G_j dL/dT + (dL/ds_j, 0, 0, 0) with dL/ds_j = (1/nnei) sum_g (R_j . dL/dT_g) G'_g(s_j);
    padded slots depend on no position and get zero.
    """
    nnei = R.shape[2]
    # (nf, nloc, 4, ng)
    dTt = np.ascontiguousarray(dT.transpose(0, 1, 3, 2)) / nnei
    # (nf, nloc, nnei, 4)
    dR = np.zeros_like(R)
    tabulated_contract_backward(R, cache.counts, cfg.sec, cache.tab_of, cmp.coef_t, cmp.bounds, dTt, dR)
    return dR


# ---------------------------------------------------------------------------
# Numba kernels of the fused path (the NumPy twins are table_features and tabulated_embed)
# ---------------------------------------------------------------------------


@njit(nogil=True, cache=True, inline="always")
def _locate(s, b):  # pragma: no cover - compiled
    """locate() for one s; b = (lower, upper, table_max, stride0, stride1, n_first, last)."""
    lower, upper, table_max, stride0, stride1 = b[0], b[1], b[2], b[3], b[4]
    n_first, last = int(b[5]), int(b[6])
    if s < lower:
        return 0, 0.0, s - lower
    if s < upper:
        n = min(max(int(np.floor((s - lower) / stride0)), 0), last)
        return n, s - (n * stride0 + lower), 0.0
    if s < table_max:
        n = min(max(n_first + int(np.floor((s - upper) / stride1)), 0), last)
        return n, s - ((n - n_first) * stride1 + upper), 0.0
    return last, table_max - ((last - n_first) * stride1 + upper), s - table_max


@njit(nogil=True, cache=True, inline="always")
def _value(a, g, dx):  # pragma: no cover - compiled
    """G_g = sum_k a[k, g] dx^k by Horner's rule (a: one piece, (6, ng))."""
    return a[0, g] + dx * (a[1, g] + dx * (a[2, g] + dx * (a[3, g] + dx * (a[4, g] + dx * a[5, g]))))


@njit(nogil=True, cache=True, inline="always")
def _slope(a, g, dx):  # pragma: no cover - compiled
    """G'_g = sum_k k a[k, g] dx^(k-1) by Horner's rule."""
    return a[1, g] + dx * (2 * a[2, g] + dx * (3 * a[3, g] + dx * (4 * a[4, g] + dx * 5 * a[5, g])))


@njit(nogil=True, cache=True, fastmath=True)
def tabulated_contract(R, counts, sec, tab_of, atom_types, coef_t, bounds, Pt, scale, Tt):  # pragma: no cover
    """Tt[f, i, c, g] = scale * (sum over the real rows k of atom i of R[f, i, k, c] G_g(R[f, i, k, 0]) + padded).

    G from the table tab_of[i, tj] of the row's neighbour type tj: the piece
    and offset from _locate, the quintic by Horner's rule, plus the linear
    extension delta * G' outside the table. Real rows of type tj are the
    first counts[f, i, tj] slots from sec[tj]; the padded ones add
    Pt[tab, type of i, counts[f, i, tj]] (padded_tails). Tt (nf, nloc, 4, ng), zero on entry.
    """
    nf, nloc, ntypes = counts.shape
    ng = Tt.shape[3]
    for f in range(nf):
        for i in range(nloc):
            for tj in range(ntypes):
                tab = tab_of[i, tj]
                P = Pt[tab, atom_types[i], counts[f, i, tj]]
                for c in range(4):
                    for g in range(ng):
                        Tt[f, i, c, g] += P[c, g]
                for k in range(sec[tj], sec[tj] + counts[f, i, tj]):
                    n, dx, delta = _locate(R[f, i, k, 0], bounds[tab])
                    a = coef_t[tab, n]
                    r0, r1, r2, r3 = R[f, i, k, 0], R[f, i, k, 1], R[f, i, k, 2], R[f, i, k, 3]
                    for g in range(ng):
                        G = _value(a, g, dx)
                        # outside the table (rare), the linear extension; the test does not depend on g,
                        # so the compiler hoists it out of the loop (unswitching), which still vectorizes
                        if delta != 0.0:
                            G += delta * _slope(a, g, dx)
                        Tt[f, i, 0, g] += r0 * G
                        Tt[f, i, 1, g] += r1 * G
                        Tt[f, i, 2, g] += r2 * G
                        Tt[f, i, 3, g] += r3 * G
            for c in range(4):
                for g in range(ng):
                    Tt[f, i, c, g] *= scale


@njit(nogil=True, cache=True, fastmath=True)
def tabulated_contract_backward(R, counts, sec, tab_of, coef_t, bounds, dTt, dR):  # pragma: no cover - compiled
    """Backward of tabulated_contract, for each real row k of atom i (dTt: dL/dT transposed, (nf, nloc, 4, ng)):

    dR[f, i, k, c] = sum_g G_g dTt[c, g]  +  [c == 0] sum_g G'_g sum_c' R[c'] dTt[c', g]

    G and G' are evaluated again from the table; dR (nf, nloc, nnei, 4) is
    written on the real rows only.
    """
    nf, nloc, ntypes = counts.shape
    ng = dTt.shape[3]
    for f in range(nf):
        for i in range(nloc):
            for tj in range(ntypes):
                tab = tab_of[i, tj]
                for k in range(sec[tj], sec[tj] + counts[f, i, tj]):
                    n, dx, delta = _locate(R[f, i, k, 0], bounds[tab])
                    a = coef_t[tab, n]
                    r0, r1, r2, r3 = R[f, i, k, 0], R[f, i, k, 1], R[f, i, k, 2], R[f, i, k, 3]
                    d0 = d1 = d2 = d3 = ds = 0.0
                    for g in range(ng):
                        dG = _slope(a, g, dx)
                        G = _value(a, g, dx) + delta * dG
                        t0, t1, t2, t3 = dTt[f, i, 0, g], dTt[f, i, 1, g], dTt[f, i, 2, g], dTt[f, i, 3, g]
                        d0 += G * t0
                        d1 += G * t1
                        d2 += G * t2
                        d3 += G * t3
                        ds += dG * (r0 * t0 + r1 * t1 + r2 * t2 + r3 * t3)
                    dR[f, i, k, 0] = d0 + ds
                    dR[f, i, k, 1] = d1
                    dR[f, i, k, 2] = d2
                    dR[f, i, k, 3] = d3
