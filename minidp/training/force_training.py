r"""Training on forces: the second-order step of minidp's gradient, apart from inference.

A force is a first derivative of the energy, so a force loss differentiated
with respect to the weights is a second derivative. minidp computes it as
"reverse over forward": for a fixed displacement of the pairs, drij (what
the loss wants the forces to change along, see :mod:`minidp.training.loss`), the
tangents below give the directional derivative of the energy,
E' = sum g . drij; its gradient with respect to the weights is then one more
reverse pass, through both the primal values (R, G, T, D) and their tangents
(R', G', T', D'). R and R' depend on positions only, never on weights, so that
reverse pass stops at the embedding nets.

:func:`weight_gradients` is the whole step; only
:func:`minidp.training.loss.loss_and_grad` calls it, inference never does. It works on the fast path's pieces
(:class:`minidp.se_e2_a.EmbedPiece`, made with ``keep=True``: each carries its
net's :class:`minidp.se_e2_a.NetTrace`). Gradients are keyed by each net's place in the
model: ``("embedding",) + key`` (see :class:`minidp.se_e2_a.EmbeddingNets`)
and ``("fitting", t)``, as :meth:`minidp.model.EnergyModel.named_nets`.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei, ng, m2, nb, na, n_t``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.model import (
    NO_PARAMS,
    EnergyModel,
    FitCache,
    FitParams,
    atomic_energy,
    atomic_energy_backward,
    fitted_groups,
    fitting_input,
    vacuum_rows,
)
from minidp.nn import (
    Net,
    add_grads,
    dual_net_backward,
    net_backward,
    net_forward,
    net_jvp,
    net_tangent,
    stacked_cache,
    zeros_like_params,
)
from minidp.se_e2_a import DescriptorCache, EmbedPiece, EnvCache, contract_backward, sum_rows


def env_matrix_jvp(drij: np.ndarray, cache: EnvCache, backend: str = "numba") -> np.ndarray:
    r"""R' = (dR/d rij) drij, the environment matrix moved along drij.

    The transpose of :func:`~minidp.se_e2_a.env_matrix_backward`'s Jacobian
    (u = 1/r, v = 1/(r + p), d = x . drij):

    .. math::

        \tilde R_0' = d\, u v (s' - s v),\qquad
        \tilde R_a' = x_a\, d\, u v^2 (s' - 2 s v) + s v^2\, \delta x_a,\qquad
        R' = \tilde R' \cdot \mathrm{row\_scale}

    Padded slots have u = v = s = s' = 0: their rows do not move. Returns (nf, nloc, nnei, 4).
    Backend "numba": the same in one pass (kernels.env_matrix_jvp), without the NumPy lines' temporaries.
    """
    rij, u, sw, dsw, v = cache.rij, cache.inv_r, cache.sw, cache.dsw, cache.inv_rp
    if backend == "numba":
        # (nf, nloc, nnei, 4)
        Rdot = np.empty(rij.shape[:3] + (4,), dtype=rij.dtype)
        kernels.env_matrix_jvp(drij, rij, u, sw, dsw, cache.row_scale[0], v, Rdot)
        return Rdot
    # (nf, nloc, nnei)
    d = np.sum(rij * drij, axis=-1)
    # (nf, nloc, nnei, 4)
    Rdot = np.empty(rij.shape[:3] + (4,), dtype=rij.dtype)
    Rdot[..., 0] = d * u * v * (dsw - sw * v)
    Rdot[..., 1:] = (d * u * v * v * (dsw - 2.0 * sw * v))[..., None] * rij + (sw * v * v)[..., None] * drij
    Rdot *= cache.row_scale
    return Rdot


def embed_jvp(Rdot: np.ndarray, pieces: list[EmbedPiece], backend: str = "numba") -> np.ndarray:
    r"""T' = (1/n_nei) sum_j (G'_ij{}^T R_ij + G_ij^T R'_ij), with G' = (dG/ds) s' and s' = R'_ij,0.

    Padded slots do not move (R' = 0), so only real rows contribute. Returns (nf, nloc, ng, 4).
    """
    nf, nloc, nnei, _ = Rdot.shape
    ng, dtype = pieces[0].G.shape[1], pieces[0].G.dtype
    # (nf, nloc, ng, 4)  in the embedding's precision, as T
    Tdot = np.zeros((nf, nloc, ng, 4), dtype=dtype)
    for pc in pieces:
        na, rows = pc.atoms.size, pc.rows
        # (nb, 4)
        Rdot_real = Rdot.reshape(-1, 4)[rows.index].astype(dtype, copy=False)
        if backend != "numba":
            # (nb, ng)
            Gdot = pc.dG_ds * Rdot_real[:, :1]
            # (nf * na, ng, 4)
            Tb = sum_rows(pc.G, Rdot_real, rows.owner, nf * na, backend)
            Tb += sum_rows(Gdot, rows.R_real, rows.owner, nf * na, backend)
        else:
            # Numba: both sums in one pass over the rows, no (nb, ng) G'
            start = np.searchsorted(rows.owner, np.arange(nf * na + 1))
            # (nf * na, 4, ng)  T' transposed, as kernels.segment_contract accumulates T
            Tt = np.zeros((nf * na, 4, ng), dtype=dtype)
            kernels.segment_contract_tangent(pc.G, pc.dG_ds, rows.R_real, Rdot_real, start, Tt)
            Tb = Tt.transpose(0, 2, 1)
        Tdot[:, pc.atoms] += Tb.reshape(nf, na, ng, 4) / nnei
    return Tdot


def contract_jvp(T: np.ndarray, Tdot: np.ndarray, m2: int) -> np.ndarray:
    r"""D' = T' (T^<)^T + T (T'^<)^T, flattened as :func:`~minidp.se_e2_a.contract`. Returns (nf, nloc, ng * m2).

    Its reverse needs no function of its own: D' is bilinear in (T, T'), so
    dL/dT' = contract_backward(dL/dD', T) and it adds contract_backward(dL/dD', T') to dL/dT.
    """
    nf, nloc, ng, _ = T.shape
    # (nf, nloc, ng, m2)
    Ddot = Tdot @ np.swapaxes(T[:, :, :m2], -1, -2) + T @ np.swapaxes(Tdot[:, :, :m2], -1, -2)
    return Ddot.reshape(nf, nloc, ng * m2)


def row_cotangents(Tbar, Tdotbar, R_real, Rdot_real, owner, backend, out=None) -> tuple[np.ndarray, np.ndarray]:
    r"""dL/dG and dL/d(dG/ds) of each real row p of atom o (the transpose of T and T' = sum_rows ...):

    .. math::

        \bar G_p = \bar T_o R_p + \bar T'_o R'_p, \qquad
        \overline{(dG/ds)}_p = (\bar T'_o R_p)\, s'_p,\quad s'_p = R'_{p,0}.

    Tbar, Tdotbar: (n_owner, ng, 4); returns two (nb, ng), the halves of ``out``
    (2, nb, ng) when given (the stacked cotangent nn.dual_net_backward takes).
    """
    # (2, nb, ng)  dL/dG and dL/d(dG/ds)
    out = np.empty((2, R_real.shape[0], Tbar.shape[1]), dtype=Tbar.dtype) if out is None else out
    Gbar, dGbar = out[0], out[1]
    if backend != "numba":
        # (nb, ng, 4), (nb, ng, 4)  each row's atom's bars
        Tb, Tdb = Tbar[owner], Tdotbar[owner]
        Gbar[:] = np.einsum("pgc,pc->pg", Tb, R_real) + np.einsum("pgc,pc->pg", Tdb, Rdot_real)
        dGbar[:] = np.einsum("pgc,pc->pg", Tdb, R_real) * Rdot_real[:, :1]
        return Gbar, dGbar
    # Numba: no (nb, ng, 4) gathers; the kernel reads the bars as (n_owner, 4, ng) (no copy when Tbar and
    # Tdotbar are already views of such arrays, as embed_param_backward passes them)
    start = np.searchsorted(owner, np.arange(Tbar.shape[0] + 1))
    kernels.row_cotangents(np.ascontiguousarray(np.swapaxes(Tbar, -1, -2)),
                           np.ascontiguousarray(np.swapaxes(Tdotbar, -1, -2)), R_real, Rdot_real, start, Gbar, dGbar)
    return Gbar, dGbar


def padded_tail_backward(Tbar: np.ndarray, pc: EmbedPiece, atom_types: np.ndarray) -> np.ndarray:
    r"""dL/dG of the padded rows of :func:`minidp.se_e2_a.padded_tail_sums`: (ntypes * n_t, ng).

    Padded slot k of centre type t adds G(s_tk)^T R_tk to every atom of type
    t with at most k real neighbours, so that row receives
    :math:`\bar G_{tk} = (\sum_{i:\, t_i = t,\, c_i \le k} \bar T_i) R_{tk}`:
    the atoms' dL/dT summed by (type, count), then cumulated over counts.
    """
    R_pad, count = pc.trace.R_pad, pc.rows.count
    ntypes, n_t, _ = R_pad.shape
    nf, na = count.shape
    # (nf * na,) each atom's (type, count) bin
    key = (atom_types[pc.atoms][None, :] * (n_t + 1) + count).reshape(-1)
    # (ntypes * (n_t + 1), ng * 4)  dL/dT summed per bin
    flat = Tbar.reshape(nf * na, -1)
    S = np.zeros(((n_t + 1) * ntypes, flat.shape[1]), dtype=Tbar.dtype)
    # np.add.at(S, key, flat), as sums of runs of the rows sorted by bin (add.at takes ~1 ms a frame here)
    # (nf * na,)
    order = np.argsort(key, kind="stable")
    bins, first = np.unique(key[order], return_index=True)
    S[bins] = np.add.reduceat(flat[order], first, axis=0)
    # (ntypes, n_t, ng, 4)  Q[t, k] = sum over counts c <= k
    Q = np.cumsum(S.reshape(ntypes, n_t + 1, -1, 4), axis=1)[:, :n_t]
    # (ntypes * n_t, ng)
    return np.einsum("tkgc,tkc->tkg", Q, R_pad).reshape(ntypes * n_t, -1)


def embed_param_backward(
    Tbar: np.ndarray, Tdotbar: np.ndarray, Rdot: np.ndarray, pieces: list[EmbedPiece],
    atom_types: np.ndarray, backend: str = "numba",
) -> dict[tuple, list[dict[str, np.ndarray]]]:
    r"""The embedding nets' weight gradients from dL/dT and dL/dT' (pieces made with ``keep``).

    Each real row receives its :func:`row_cotangents` (with T's 1/n_nei folded
    into the bars), which nn.dual_net_backward pushes through the net (G and
    dG/ds are its output and tangent), row block by row block; padded rows get :func:`padded_tail_backward`.
    Returns {("embedding",) + key: per-layer gradients}, summed over the row blocks
    and the pieces a net serves (a net shared by every centre type, type_one_side,
    has one key): each net's gradient is accumulated in place, block after block.
    """
    nf, nloc, nnei, _ = Rdot.shape
    grads: dict[tuple, list] = {}
    for pc in pieces:
        if pc.atoms.size == 0:  # a centre type absent from the batch: its nets get no gradient here
            continue
        ng, dtype = Tbar.shape[2], pc.G.dtype
        # (nf * na, ng, 4) each: dL/dT and dL/dT' of the piece's atoms, in the embedding's precision, as views
        # of (nf * na, 4, ng) arrays: the layout kernels.row_cotangents reads, laid out once here (row_cotangents
        # then copies nothing) rather than at every row block
        Tb, Tdb = (np.ascontiguousarray(np.swapaxes((X[:, pc.atoms] / nnei).reshape(-1, ng, 4), -1, -2),
                                        dtype=dtype).swapaxes(-1, -2) for X in (Tbar, Tdotbar))
        rows, trace = pc.rows, pc.trace
        net_grads = grads.setdefault(("embedding",) + trace.key, zeros_like_params(trace.net.params()))
        # (nb, 4)
        Rdot_real = Rdot.reshape(-1, 4)[rows.index].astype(dtype, copy=False)
        # (2, nblk, ng): dL/dG and dL/d(dG/ds) of one row block, stacked as the dual numbers they are the
        # bars of; made block by block into one buffer, which stays in cache for the block's reverse
        # (all the rows' at once were written to memory and read back: 2 nb ng numbers, 13.6 MB a
        # 192-atom frame in float32)
        buf = np.empty((2, max((b.stop - b.start for b, _ in trace.row_caches), default=0), ng), dtype=dtype)
        for blk, caches in trace.row_caches:
            GB2 = buf[:, :blk.stop - blk.start]
            row_cotangents(Tb, Tdb, rows.R_real[blk], Rdot_real[blk], rows.owner[blk], backend, out=GB2)
            dual_net_backward(trace.net, caches, GB2, net_grads, input_grads=False)
        # the padded rows: through net_forward's caches, no tangent
        Gbar_pad = padded_tail_backward(Tbar[:, pc.atoms] / nnei, pc, atom_types).astype(dtype, copy=False)
        _, pad_grads = net_backward(trace.net, trace.pad_caches, Gbar_pad)
        for total, g in zip(net_grads, pad_grads):
            for k, v in g.items():
                total[k] += v
    return grads


class FitJvpCache(NamedTuple):
    """One atom type's block of the fitting step with tangents."""

    t: int  # the atom type
    atoms: np.ndarray  # (na,) atoms of this type
    net: Net  # its fitting net
    net_caches: list  # net_jvp's layer caches on x_i
    vacuum_caches: list | None  # net_forward's caches on x_i^0 (atom_ener), or None


def atomic_energy_jvp(
    D: np.ndarray, Ddot: np.ndarray, atom_types: np.ndarray, model: EnergyModel, params: FitParams = NO_PARAMS,
) -> tuple[np.ndarray, np.ndarray, list[FitJvpCache]]:
    r"""E_i and its tangent E'_i = (dF_{t_i}/dx_i) x'_i, for training on forces; (nf, nloc) each, and caches.

    x_i = [D_i, f, a_i, c] (:func:`minidp.model.fitting_input`): only D moves with the atoms, so
    x'_i = [D'_i, 0, 0, 0]. The atom_ener term -F_t(x_i^0) has no D in it: no tangent, but it
    depends on the weights (its caches are kept). Atoms of atom_exclude_types have E_i = E'_i = 0.
    """
    nf, nloc, dim = D.shape
    # (nf, nloc, dim + width), (nf, nloc, dim + width)
    x = fitting_input(D, model.fitting_input, params)
    xdot = Ddot if x is D else np.concatenate([Ddot, np.zeros(x.shape[:2] + (x.shape[2] - dim,), D.dtype)], axis=-1)
    # (nf, nloc), (nf, nloc)
    E_atom = np.zeros((nf, nloc), dtype=D.dtype)
    Edot = np.zeros_like(E_atom)
    caches = []
    vacuum = model.vacuum
    for t, atoms, net in fitted_groups(atom_types, model):
        # (nb, dim + width) each, in the net's precision (float32 nets: deepmd-kit's precision)
        x_t, xdot_t = (a[:, atoms].reshape(-1, x.shape[-1]).astype(net.dtype, copy=False) for a in (x, xdot))
        # (nb, 1), (nb, 1)
        y, ty, net_caches = net_jvp(net, x_t, xdot_t)
        vacuum_caches = None
        if vacuum[t]:
            # (nb, 1): the isolated atom's output, its caches kept (the term depends on the weights)
            y0, vacuum_caches = net_forward(net, vacuum_rows(x_t, dim))
            y = y - y0
        E_atom[:, atoms] = y.reshape(nf, atoms.size) + model.bias[t]
        Edot[:, atoms] = ty.reshape(nf, atoms.size)
        caches.append(FitJvpCache(t, atoms, net, net_caches, vacuum_caches))
    return E_atom, Edot, caches


def atomic_energy_tangent(Ddot: np.ndarray, caches: list[FitCache], model: EnergyModel
                          ) -> tuple[np.ndarray, list[FitJvpCache]]:
    """E'_i = (dF_{t_i}/dx_i) x'_i (nf, nloc), as :func:`atomic_energy_jvp`, for fitting nets already run
    forward (model.atomic_energy's caches): the value pass is not repeated (nn.net_tangent), which
    saves one of the step's eight passes through the fitting nets. x'_i = [D'_i, 0]: the tangent of
    the parameters' columns is zero. The atom_ener term's caches (no tangent) are made here, as
    atomic_energy_jvp makes them. Returns E' and the caches atomic_energy_param_backward takes."""
    nf, nloc, dim = Ddot.shape
    # (nf, nloc)
    Edot = np.zeros((nf, nloc), dtype=Ddot.dtype)
    jcaches = []
    vacuum = model.vacuum
    for t, atoms, net, net_caches in caches:
        # (nb, dim + width)  the first layer's input x_t, as atomic_energy gave it
        x_t = net_caches[0].x
        xdot_t = np.zeros_like(x_t)
        xdot_t[:, :dim] = Ddot[:, atoms].reshape(-1, dim)
        # (nb, 1)
        ty, jc = net_tangent(net, net_caches, xdot_t)
        Edot[:, atoms] = ty.reshape(nf, atoms.size)
        # the isolated atom's output: its caches kept (the term depends on the weights)
        vacuum_caches = net_forward(net, vacuum_rows(x_t, dim))[1] if vacuum[t] else None
        jcaches.append(FitJvpCache(t, atoms, net, jc, vacuum_caches))
    return Edot, jcaches


def atomic_energy_param_backward(
    gE: np.ndarray, caches: list[FitJvpCache], cotangents: list, dim: int
) -> tuple[np.ndarray, np.ndarray, dict[tuple, list]]:
    """Reverse through atomic_energy_jvp for S = sum_i gE_i E_i - E': from dL/dE_i = gE (nf, nloc) and
    dL/dE'_i = -1 to dL/dD, dL/dD' (nf, nloc, ng * m2) and the fitting nets' weight gradients
    {("fitting", t): per-layer grads}.

    dL/dE'_i = -1 is minus the seed of the forces' backward (dE/dE_i = 1), so the tangent half of this
    reverse is minus that backward's chain: ``cotangents``, model.atomic_energy_backward's per-layer
    dE/dx_l for each cache, gives it (nn.dual_net_backward's ``gtx``) and dL/dD' = -dE/dD; only the
    value half's products are made. Only the descriptor's part of dL/dx and dL/dx' is kept (the
    parameters are data); the atom_ener term adds its own weight gradient, from dL/dE_i through -F_t(x_i^0)."""
    nf, nloc = gE.shape
    # (nf, nloc, ng * m2), (nf, nloc, ng * m2)  in the fitting nets' precision, as D
    dtype = caches[0].net.dtype if caches else gE.dtype
    Dbar = np.zeros((nf, nloc, dim), dtype=dtype)
    Ddotbar = np.zeros_like(Dbar)
    grads = {}
    for (t, atoms, net, net_caches, vacuum_caches), H in zip(caches, cotangents):
        # (nb, 1) each; the loss's float64 cotangents rounded to the net's precision
        gE_t = gE[:, atoms].reshape(-1, 1).astype(net.dtype, copy=False)
        # (2, nb, 1)  dL/dy, dL/d(ty) = -1
        G2 = np.stack([gE_t, np.full_like(gE_t, -1.0)])
        # (2, nb, dim + width): dL/dx and dL/dx', the layers' reverse on stacked dual numbers (nn.stacked_cache)
        GX2, g = dual_net_backward(net, [stacked_cache(layer, c) for layer, c in zip(net.layers, net_caches)],
                                   G2, gtx=[-h for h in H])
        gx, gtx = GX2[0], GX2[1]
        if vacuum_caches is not None:
            g = add_grads([g, net_backward(net, vacuum_caches, -gE_t)[1]])
        grads[("fitting", t)] = g
        Dbar[:, atoms] = gx[:, :dim].reshape(nf, atoms.size, dim)
        Ddotbar[:, atoms] = gtx[:, :dim].reshape(nf, atoms.size, dim)
    return Dbar, Ddotbar, grads


def weight_gradients(
    model: EnergyModel, D: np.ndarray, dcache: DescriptorCache, c_E: np.ndarray, drij: np.ndarray,
    atom_types: np.ndarray, backend: str = "numba", params: FitParams = NO_PARAMS,
    fitting_caches: list[FitCache] | None = None, fitting_cotangents: list | None = None,
) -> dict[tuple, list[dict[str, np.ndarray]]]:
    r"""dS/dtheta of S = sum_fi c_fi E_fi - E' (c_fi = c_f for all atoms of a frame), E' = sum_ij g_ij . drij (see :mod:`minidp.training.loss`), by net name.

    D (nf, nloc, ng * m2) and dcache from se_e2_a.descriptor_forward(..., keep=True);
    params: the batch's fparam/aparam (the fitting nets read them);
    c_E (nf,) = dL/dE of each frame, or (nf, nloc) = dL/dE_i of each atom (a loss on atomic energies,
    or on E = sum_i c_i E_i); drij (nf, nloc, nnei, 3) the pairs' displacement;
    fitting_caches: model.atomic_energy's caches of this D (the forward the loss ran), else it runs here;
    fitting_cotangents: model.atomic_energy_backward's per-layer cotangents on those caches (the forces'
    backward the loss ran; its ``cotangents``), else that backward runs here.
    Tangents forward (R', T', D', E'), then one reverse pass through values
    and tangents, from the fitting nets down to the embedding nets' weights.
    """
    m2 = model.descriptor.config.axis_neuron
    # (nf, nloc, nnei, 4), (nf, nloc, ng, 4), (nf, nloc, ng * m2)
    Rdot = env_matrix_jvp(drij, dcache.env, backend)
    Tdot = embed_jvp(Rdot, dcache.pieces, backend)
    Ddot = contract_jvp(dcache.T, Tdot, m2)
    if fitting_caches is None:
        fitting_caches, fitting_cotangents = atomic_energy(D, atom_types, model, params)[1], None
    if fitting_cotangents is None:
        fitting_cotangents = atomic_energy_backward(np.ones(D.shape[:2], D.dtype), fitting_caches, D.shape[-1]).cotangents
    # (nf, nloc): E'_i, and the caches with the tangent
    Edot, jcaches = atomic_energy_tangent(Ddot, fitting_caches, model)
    # (nf, nloc) dS/dE_i = c of its frame (or the atom's own c_i); dS/dE'_i = -1
    gE = np.broadcast_to(c_E[:, None] if c_E.ndim == 1 else c_E, Edot.shape)
    # (nf, nloc, ng * m2) each
    Dbar, Ddotbar, grads = atomic_energy_param_backward(gE, jcaches, fitting_cotangents, D.shape[-1])
    # (nf, nloc, ng, 4) each: D' is bilinear in (T, T'), so T receives from both D and D'
    Tbar = contract_backward(Dbar, dcache.T, m2) + contract_backward(Ddotbar, Tdot, m2)
    Tdotbar = contract_backward(Ddotbar, dcache.T, m2)
    grads.update(embed_param_backward(Tbar, Tdotbar, Rdot, dcache.pieces, atom_types, backend))
    return grads
