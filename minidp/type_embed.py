r"""se_e2_a with a model-level type embedding (deepmd-kit TensorFlow's ``type_embedding`` section next to an
se_e2_a descriptor, the ``concat`` way): one embedding net and one fitting net for every type, told the
types apart by a learned vector per type.

The type embedding is a small net on one-hot types, one row per type:

.. math::

    e_t = \mathcal N_{te}(\mathrm{onehot}(t)) \quad (n_e \text{ numbers}),

(deepmd-kit's ``type_embed_net``; its padding row for a "no type" slot is never read by se_e2_a). The
embedding net reads the neighbour's row and type, and the centre's type unless ``type_one_side``:

.. math::

    G_{ij} = \mathcal G([s_{ij}, e_{t_j}]) \quad\text{or}\quad \mathcal G([s_{ij}, e_{t_j}, e_{t_i}]),

where :math:`t_j` is the type of the slot's section of the neighbour list, padded slots too (deepmd-kit's
``nei_type``, so a padded slot goes through the net with its section's type, as in plain se_e2_a). T and
D follow as in :mod:`minidp.se_e2_a`, and one fitting net reads the descriptor with the centre's type
vector right after it (before the frame and atomic parameters, deepmd-kit's order):

.. math::

    E_i = \mathcal F([D_i, e_{t_i}, \hat f, \hat a_i]) + b_{t_i}.

:func:`embed_reference` and :func:`embed_reference_backward` are the embedding step written this way,
every row materialised (``minidp.model.tebd_reference_gradients`` adds the fitting net and the forces).

**The fold (the fast path).** The first layer of a net computes x W + b; with x = [s, e] that is
s W_s + (e W_e + b): for a fixed type the type part is a constant bias. So per neighbour type (per pair
of types without ``type_one_side``) the shared net is an ordinary se_e2_a embedding net of s alone, with
weights W_s and bias b + e_{t_j} W_e (+ e_{t_i} W_c), and per centre type the fitting net is an ordinary
fitting net of [D, f, a] with bias b + e_t W_e (:func:`fold`). The folded model is a plain se_e2_a model,
evaluated by every backend (Numba included) with nothing new; it saves the (nb, n_e) columns of every
row. The values differ from the reference only by the order of a sum (round-off). The fold cannot carry
a first layer that adds its input back (width 1 + n_e or twice that, deepmd-kit's residual rule):
:class:`TypeEmbedding` refuses such nets, and the fitting's first layer never does in deepmd-kit.

deepmd-kit cannot compress this model (``dp compress`` refuses a concatenated type embedding), nor
serialize it (its ``serialize`` raises for se_e2_a with a type embedding). minidp compresses it all the
same: each folded embedding net is a function of s alone, tabulated as any se_e2_a net is
(:func:`minidp.compress.compress_descriptor` on the folded descriptor: one table per neighbour type, or
per pair of types). It saves the model, compressed or not, in its own key of the .dp file
(:mod:`minidp.io.serialization`), which deepmd-kit does not read.

Shape symbols: :mod:`minidp.se_e2_a`, and ``ne``: width of the type embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from minidp.nn import Net, net_backward, net_forward, residual_kind
from minidp.se_e2_a import EmbeddingNets, SeAConfig


@dataclass(frozen=True, eq=False)
class TypeEmbedding:
    """The shared nets of se_e2_a with a type embedding (math in the module docstring), validated.

    ``net`` maps one-hot types (ntypes,) to e_t (ne,); ``embedding`` reads [s, e_j] (1 + ne) with
    ``type_one_side``, else [s, e_j, e_i] (1 + 2 ne); ``fitting`` reads [D, e_i, f, a] and gives one number.
    """

    net: Net  # type embedding net: (ntypes,) one-hot -> (ne,)
    embedding: Net  # shared embedding net: (1 + ne) or (1 + 2 ne) -> (ng,)
    fitting: Net  # shared fitting net: (ng * m2 + ne + width) -> (1,)
    type_one_side: bool

    def __post_init__(self):
        if not isinstance(self.type_one_side, bool):
            raise TypeError(f"TypeEmbedding.type_one_side must be a bool, got {self.type_one_side!r}")
        want = 1 + self.ne * (1 if self.type_one_side else 2)
        if self.embedding.n_in != want:
            raise ValueError(f"the shared embedding net reads {self.embedding.n_in} numbers; expected {want} "
                             f"(s and {1 if self.type_one_side else 2} type vectors of {self.ne})")
        for what, net in (("embedding", self.embedding), ("fitting", self.fitting)):
            first = net.layers[0]
            if residual_kind(first.n_in, first.n_out, first.resnet) != "none":
                raise ValueError(f"the shared {what} net's first layer ({first.n_in} -> {first.n_out}) adds its "
                                 "input back; minidp cannot evaluate that layer per type (see minidp.type_embed)")

    @property
    def ne(self) -> int:
        return self.net.n_out

    @property
    def ntypes(self) -> int:
        return self.net.n_in

    def astype(self, dtype) -> "TypeEmbedding":
        return replace(self, net=self.net.astype(dtype), embedding=self.embedding.astype(dtype),
                       fitting=self.fitting.astype(dtype))


def type_vectors(net: Net) -> np.ndarray:
    """e (ntypes, ne): the type embedding net on the one-hot rows of its ntypes types."""
    # (ntypes, ntypes)
    onehot = np.eye(net.n_in, dtype=net.dtype)
    # (ntypes, ne)
    e, _ = net_forward(net, onehot)
    return e


def _fold_first(net: Net, keep: np.ndarray, extra: np.ndarray) -> Net:
    """The net with its first layer reading only the inputs ``keep``; the others are the constants ``extra``
    at positions ``~keep``, moved into the bias: x W + b = x_keep W_keep + (extra W_rest + b)."""
    first = net.layers[0]
    # (n_out,)
    b = first.b + extra.astype(first.W.dtype) @ first.W[~keep]
    return Net([replace(first, W=np.ascontiguousarray(first.W[keep]), b=b)] + list(net.layers[1:]))


class Folded(NamedTuple):
    """The shared nets folded per type: a plain se_e2_a model's nets (:func:`fold`)."""

    embedding: EmbeddingNets  # nets[ti, tj] of s alone
    fitting: list  # fitting[t] of [D, f, a]


def fold(te: TypeEmbedding, dim: int) -> Folded:
    """Per-type nets equal to the shared ones at each type's vector (module docstring); dim = ng * m2."""
    ntypes = te.ntypes
    # (ntypes, ne)
    e = type_vectors(te.net)
    # the embedding's inputs: s is kept, the type vectors become bias
    keep = np.zeros(te.embedding.n_in, bool)
    keep[0] = True
    if te.type_one_side:
        emb = EmbeddingNets.from_list(ntypes, True, [_fold_first(te.embedding, keep, e[tj]) for tj in range(ntypes)])
    else:
        emb = EmbeddingNets(ntypes, False, {(ti, tj): _fold_first(te.embedding, keep, np.concatenate([e[tj], e[ti]]))
                                            for ti in range(ntypes) for tj in range(ntypes)})
    # the fitting's inputs: [D, e, f, a]; D and the parameters are kept
    keep = np.ones(te.fitting.n_in, bool)
    keep[dim:dim + te.ne] = False
    fitting = [_fold_first(te.fitting, keep, e[t]) for t in range(ntypes)]
    return Folded(emb, fitting)


def fitting_rows(x: np.ndarray, e_centre: np.ndarray, dim: int) -> np.ndarray:
    """[D_i, e_{t_i}, f, a_i] (nf, nc, n_in + ne): the centre's type vector e_centre (nc, ne) put after the
    descriptor part (the first dim numbers) of the fitting rows x (nf, nc, n_in)."""
    nf, nc, _ = x.shape
    # (nf, nc, ne)
    e = np.broadcast_to(e_centre.astype(x.dtype), (nf, nc, e_centre.shape[-1]))
    # (nf, nc, n_in + ne)
    return np.concatenate([x[..., :dim], e, x[..., dim:]], axis=-1)


class TebdCache(NamedTuple):
    """What :func:`embed_reference_backward` needs."""

    R: np.ndarray  # (nf, nc, nnei, 4) the rows
    G: np.ndarray  # (nf, nc, nnei, ng) their features
    net_caches: list  # the shared net's caches, every (frame, atom, slot) one row


def embed_reference(R: np.ndarray, atom_types: np.ndarray, te: TypeEmbedding, cfg: SeAConfig
                    ) -> tuple[np.ndarray, TebdCache]:
    r"""T_i = (1/nnei) sum_j G([s_ij, e_{t_j}(, e_{t_i})])^T R_ij (nf, nc, ng, 4), one shared net for all rows."""
    nf, nc, nnei, _ = R.shape
    # (ntypes, ne)
    e = type_vectors(te.net).astype(R.dtype)
    # (nnei,) the type of each slot's section
    slot_type = np.repeat(np.arange(cfg.ntypes), cfg.sel)
    # (nf, nc, nnei, ne)  the neighbour's type vector in every row
    parts = [R[..., :1], np.broadcast_to(e[slot_type], (nf, nc, nnei, te.ne))]
    if not te.type_one_side:
        # (nf, nc, nnei, ne)  the centre's
        parts.append(np.broadcast_to(e[atom_types][:, None, :], (nf, nc, nnei, te.ne)))
    # (nf * nc * nnei, 1 + ne) or (..., 1 + 2 ne)
    x = np.concatenate(parts, axis=-1).reshape(nf * nc * nnei, -1)
    # (nf * nc * nnei, ng)
    G, caches = net_forward(te.embedding, x)
    # (nf, nc, nnei, ng)
    G = G.reshape(nf, nc, nnei, -1)
    # (nf, nc, ng, 4)
    T = np.einsum("fing,finc->figc", G, R) / nnei
    return T, TebdCache(R, G, caches)


def embed_reference_backward(dT: np.ndarray, cache: TebdCache, te: TypeEmbedding) -> np.ndarray:
    r"""dL/dR (nf, nc, nnei, 4) from dL/dT: dL/dG_ij = R_ij dL/dT_i^T / nnei, dL/dR_ij = G_ij dL/dT_i / nnei
    plus (dL/ds_ij, 0, 0, 0), dL/ds_ij the first column of the net's input gradient (the type vectors are
    constants)."""
    R, G, caches = cache
    nf, nc, nnei, ng = G.shape
    # (nf, nc, nnei, ng)
    dG = np.einsum("figc,finc->fing", dT, R) / nnei
    # (nf, nc, nnei, 4)
    dR = np.einsum("fing,figc->finc", G, dT) / nnei
    # (nf * nc * nnei, n_in)
    dx, _ = net_backward(te.embedding, caches, dG.reshape(-1, ng), param_grads=False)
    dR[..., 0] += dx[:, 0].reshape(nf, nc, nnei)
    return dR
