"""Numba kernels for the loops NumPy cannot vectorize without large temporaries.

Each kernel has a pure-NumPy twin, written first in the function that calls
it (the ``backend="numpy"`` path), which is the one to read; tests check that
the two agree, and both against the plain reference path of
:mod:`minidp.se_e2_a` (``backend="reference"``). The kernels write into arrays the caller allocates, so no hidden state
and no allocation happens inside them.

Shape symbols: see :mod:`minidp.se_e2_a`; ``nb`` is the number of real
(atom, neighbour) pairs of a block, ``na`` the number of centre atoms.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, fastmath=True)
def segment_contract(G, R, start, Tt):  # pragma: no cover - compiled
    """Tt[a] += sum over rows p of atom a of R[p] G[p]^T  (i.e. T[a] = sum G^T R, transposed).

    G: (nb, ng), R: (nb, 4), start: (na + 1,) row offsets (rows of atom a are
    start[a]:start[a+1]), Tt: (na, 4, ng) accumulated in place. The transposed
    layout keeps the innermost loop over ng contiguous, so it vectorizes.
    """
    ng = G.shape[1]
    for a in range(start.size - 1):
        for p in range(start[a], start[a + 1]):
            for c in range(4):
                Rpc = R[p, c]
                for g in range(ng):
                    Tt[a, c, g] += Rpc * G[p, g]


@njit(nogil=True, cache=True, fastmath=True)
def segment_contract_backward(G, dG_ds, R, start, dTt, dR):  # pragma: no cover - compiled
    """Backward of segment_contract through both of R's paths, for rows p of atom a:

    dR[p, c] = sum_g G[p, g] dT[a, g, c]  +  [c == 0] sum_g (R[p] . dT[a, g]) dG_ds[p, g]

    (the second term is dL/dG pushed through G(s), s = R[p, 0]). dTt: (na, 4, ng),
    dT transposed; dR (nb, 4) is written.
    """
    ng = G.shape[1]
    # the sums start in the arrays' precision: a Python 0.0 would make a float32 kernel add in float64
    # (a conversion per term, and the loop no longer vectorizes); one pass over g reads G[p] and dG_ds[p]
    # once for the five sums
    zero = G.dtype.type(0)
    for a in range(start.size - 1):
        for p in range(start[a], start[a + 1]):
            r0, r1, r2, r3 = R[p, 0], R[p, 1], R[p, 2], R[p, 3]
            d0 = d1 = d2 = d3 = ds = zero
            for g in range(ng):
                t0, t1, t2, t3 = dTt[a, 0, g], dTt[a, 1, g], dTt[a, 2, g], dTt[a, 3, g]
                x = G[p, g]
                d0 += x * t0
                d1 += x * t1
                d2 += x * t2
                d3 += x * t3
                ds += (r0 * t0 + r1 * t1 + r2 * t2 + r3 * t3) * dG_ds[p, g]
            dR[p, 0] = d0 + ds
            dR[p, 1] = d1
            dR[p, 2] = d2
            dR[p, 3] = d3


@njit(nogil=True, cache=True, fastmath=True)
def segment_contract_tangent(G, dG_ds, R, Rdot, start, Tt):  # pragma: no cover - compiled
    """The tangent of segment_contract along R' (force_training.embed_jvp), for rows p of atom a:

    Tt[a, c, g] += R'[p, c] G[p, g] + R[p, c] s'[p] dG_ds[p, g],  s' = R'[p, 0]

    (G moves with s = R[p, 0]: G' = dG/ds s'). Shapes as segment_contract; Rdot (nb, 4).
    """
    ng = G.shape[1]
    for a in range(start.size - 1):
        for p in range(start[a], start[a + 1]):
            sdot = Rdot[p, 0]
            e0, e1, e2, e3 = Rdot[p, 0], Rdot[p, 1], Rdot[p, 2], Rdot[p, 3]
            f0, f1, f2, f3 = R[p, 0] * sdot, R[p, 1] * sdot, R[p, 2] * sdot, R[p, 3] * sdot
            # one pass over g for the four components: G[p] and dG_ds[p] are read once
            for g in range(ng):
                x, y = G[p, g], dG_ds[p, g]
                Tt[a, 0, g] += e0 * x + f0 * y
                Tt[a, 1, g] += e1 * x + f1 * y
                Tt[a, 2, g] += e2 * x + f2 * y
                Tt[a, 3, g] += e3 * x + f3 * y


@njit(nogil=True, cache=True)
def suffix_outer_sums(G, R, P):  # pragma: no cover - compiled
    """se_e2_a.padded_tail_sums in one pass: P[t, k] = P[t, k + 1] + G[t, k]^T R[t, k] from k = n - 1 down,
    P[t, n] = 0: the sums over slots >= k. G (ntypes, n, ng), R (ntypes, n, 4); P (ntypes, n + 1, ng, 4)
    is written. The products and sums in NumPy's order (no fastmath): the same numbers to the bit."""
    nt, n, ng = G.shape
    zero = P.dtype.type(0)
    for t in range(nt):
        for g in range(ng):
            for c in range(4):
                P[t, n, g, c] = zero
        for k in range(n - 1, -1, -1):
            for g in range(ng):
                x = G[t, k, g]
                for c in range(4):
                    P[t, k, g, c] = P[t, k + 1, g, c] + x * R[t, k, c]


@njit(nogil=True, cache=True)
def scatter_pairs(g, rij, nlist, first, F, W):  # pragma: no cover - compiled
    """Forces and atomic virials from pair gradients (see model.pair_forces_virials).

    For centre c (atom first + c) and neighbour j = nlist[f, c, k] >= 0:
    F[f, first + c] += g,  F[f, j] -= g,  W[f, j, 3a + b] -= g_a rij_b.
    """
    nf, nc, nnei = nlist.shape
    for f in range(nf):
        for c in range(nc):
            i = first + c
            for k in range(nnei):
                j = nlist[f, c, k]
                if j < 0:
                    continue
                for a in range(3):
                    ga = g[f, c, k, a]
                    F[f, i, a] += ga
                    F[f, j, a] -= ga
                    for b in range(3):
                        W[f, j, 3 * a + b] -= ga * rij[f, c, k, b]


@njit(nogil=True, cache=True)
def env_matrix(rij, nlist, davg, inv_dstd, rcut_smth, width, protection, R, inv_r, sw, dsw, inv_rp):  # pragma: no cover
    """se_e2_a.env_matrix in one pass: R = (s (1/(r+p), x/(r+p)^2, y/(r+p)^2, z/(r+p)^2) - davg) / dstd.

    davg, inv_dstd: (nloc, nnei, 4) for each centre atom; p = protection;
    R (nf, nloc, nnei, 4) and inv_r, sw, dsw, inv_rp (nf, nloc, nnei) are
    written (inv_rp may be inv_r itself when p = 0: 1/(r + 0) is 1/r to the
    bit); padded slots get zero caches and the row -davg/dstd. width: the switch's rcut - rcut_smth.
    """
    nf, nloc, nnei = nlist.shape
    for f in range(nf):
        for i in range(nloc):
            for k in range(nnei):
                raw0 = raw1 = raw2 = raw3 = 0.0
                u = v = s = ds = 0.0
                if nlist[f, i, k] >= 0:
                    x, y, z = rij[f, i, k, 0], rij[f, i, k, 1], rij[f, i, k, 2]
                    r = np.sqrt(x * x + y * y + z * z)
                    u = 1.0 / r
                    v = 1.0 / (r + protection)
                    t = min(max((r - rcut_smth) / width, 0.0), 1.0)
                    s = t * t * t * (-6.0 * t * t + 15.0 * t - 10.0) + 1.0
                    ds = -30.0 * t * t * (t - 1.0) * (t - 1.0) / width
                    raw0 = s * v
                    sv2 = s * v * v
                    raw1, raw2, raw3 = sv2 * x, sv2 * y, sv2 * z
                inv_r[f, i, k], sw[f, i, k], dsw[f, i, k] = u, s, ds
                inv_rp[f, i, k] = v
                R[f, i, k, 0] = (raw0 - davg[i, k, 0]) * inv_dstd[i, k, 0]
                R[f, i, k, 1] = (raw1 - davg[i, k, 1]) * inv_dstd[i, k, 1]
                R[f, i, k, 2] = (raw2 - davg[i, k, 2]) * inv_dstd[i, k, 2]
                R[f, i, k, 3] = (raw3 - davg[i, k, 3]) * inv_dstd[i, k, 3]


@njit(nogil=True, cache=True)
def env_matrix_backward(dR, rij, inv_r, sw, dsw, row_scale, inv_rp, grad):  # pragma: no cover
    """se_e2_a.env_matrix_backward in one pass (u = 1/r, v = 1/(r+p), row_scale (nloc, nnei, 4) = dR/dR~);
    grad (nf, nloc, nnei, 3) is written."""
    nf, nloc, nnei, _ = rij.shape
    for f in range(nf):
        for i in range(nloc):
            for k in range(nnei):
                u, v, s, ds = inv_r[f, i, k], inv_rp[f, i, k], sw[f, i, k], dsw[f, i, k]
                g0 = dR[f, i, k, 0] * row_scale[i, k, 0]
                g1 = dR[f, i, k, 1] * row_scale[i, k, 1]
                g2 = dR[f, i, k, 2] * row_scale[i, k, 2]
                g3 = dR[f, i, k, 3] * row_scale[i, k, 3]
                x, y, z = rij[f, i, k, 0], rij[f, i, k, 1], rij[f, i, k, 2]
                gx = g1 * x + g2 * y + g3 * z
                coef = g0 * u * v * (ds - s * v) + gx * u * v * v * (ds - 2.0 * s * v)
                sv2 = s * v * v
                grad[f, i, k, 0] = coef * x + sv2 * g1
                grad[f, i, k, 1] = coef * y + sv2 * g2
                grad[f, i, k, 2] = coef * z + sv2 * g3


@njit(nogil=True, cache=True, fastmath=True)
def row_cotangents(Tt, Tdt, R, Rdot, start, Gbar, dGbar):  # pragma: no cover - compiled
    """What each row's G and dG/ds receive from its atom's dL/dT and dL/dT' (se_e2_a.row_cotangents):

    Gbar[p, g] = sum_c Tt[a, c, g] R[p, c] + Tdt[a, c, g] Rdot[p, c]
    dGbar[p, g] = (sum_c Tdt[a, c, g] R[p, c]) Rdot[p, 0]

    Tt, Tdt: (na, 4, ng) transposed; R, Rdot: (nb, 4); Gbar, dGbar (nb, ng) are written.
    """
    ng = Gbar.shape[1]
    for a in range(start.size - 1):
        for p in range(start[a], start[a + 1]):
            r0, r1, r2, r3 = R[p, 0], R[p, 1], R[p, 2], R[p, 3]
            d0, d1, d2, d3 = Rdot[p, 0], Rdot[p, 1], Rdot[p, 2], Rdot[p, 3]
            for g in range(ng):
                t0, t1, t2, t3 = Tt[a, 0, g], Tt[a, 1, g], Tt[a, 2, g], Tt[a, 3, g]
                u0, u1, u2, u3 = Tdt[a, 0, g], Tdt[a, 1, g], Tdt[a, 2, g], Tdt[a, 3, g]
                Gbar[p, g] = t0 * r0 + t1 * r1 + t2 * r2 + t3 * r3 + u0 * d0 + u1 * d1 + u2 * d2 + u3 * d3
                dGbar[p, g] = (u0 * r0 + u1 * r1 + u2 * r2 + u3 * r3) * d0


# ---------------------------------------------------------------------------
# The tanh layer in forward mode, fused (nn.dual_layer / nn.dual_layer_backward)
# ---------------------------------------------------------------------------
# Residual kinds, as nn.residual_kind names them: nothing, y += x, y += [x, x].
RES_NONE, RES_SAME, RES_DOUBLE = 0, 1, 2


@njit(nogil=True, cache=True, fastmath=True)
def tanh_dual(A, TZ, X, TX, idt, kind, Y, TY):  # pragma: no cover - compiled
    """nn.layer_jvp's elementwise lines for tanh, in one pass over the rows:

    y = a idt + res(x),  ty = (1 - a^2) tz idt + res(tx)

    A, TZ (nb, n_out): a = tanh(z) and tz; X, TX (nb, n_in): x and tx; idt (n_out,)
    (ones without a timestep); kind RES_NONE / RES_SAME / RES_DOUBLE; Y, TY
    (nb, n_out) are written. nn.dual_layer passes the halves of its stacked
    arrays: each half is C-contiguous (a strided 3-d view would not vectorize).
    """
    nb, n_out = A.shape
    n_in = X.shape[1]
    # constants in the arrays' precision: a Python 1 would make a float32 kernel compute in float64
    one = A.dtype.type(1)
    for r in range(nb):
        for j in range(n_out):
            a = A[r, j]
            Y[r, j] = a * idt[j]
            TY[r, j] = (one - a * a) * TZ[r, j] * idt[j]
        # the residual: x onto y, once (RES_SAME) or onto each half (RES_DOUBLE)
        for h in range(kind):
            for j in range(n_in):
                Y[r, h * n_in + j] += X[r, j]
                TY[r, h * n_in + j] += TX[r, j]



@njit(nogil=True, cache=True, fastmath=True)
def residual_backward(GY, GX, kind):  # pragma: no cover - compiled
    """nn._residual_backward in one pass: GX[r, j] += GY[r, j] (RES_SAME), or GY[r, j] + GY[r, n_in + j]
    (RES_DOUBLE); nothing for RES_NONE. GY (nb, n_out), GX (nb, n_in), one half of the stacked arrays."""
    nb, n_in = GX.shape
    for r in range(nb):
        for h in range(kind):
            for j in range(n_in):
                GX[r, j] += GY[r, h * n_in + j]

@njit(nogil=True, cache=True, fastmath=True)
def tanh_dual_backward(GY, GTY, A, TZ, idt, GZ, GTZ, gb, gidt):  # pragma: no cover - compiled
    """nn.layer_jvp_backward's elementwise lines for tanh (phi' = 1 - a^2, phi'' = -2 a phi'):

    gtz = gty idt phi',  gz = gy idt phi' + gty idt tz phi'',
    gb += sum_rows gz,  gidt += sum_rows (gy a + gty phi' tz)

    GY, GTY (nb, n_out): gy, gty; A, TZ: a, tz; GZ, GTZ (nb, n_out) are written;
    gb, gidt (n_out,) are accumulated in place. C-contiguous halves, as tanh_dual.
    """
    nb, n_out = A.shape
    # constants in the arrays' precision (see tanh_dual)
    one, two = A.dtype.type(1), A.dtype.type(2)
    for r in range(nb):
        for j in range(n_out):
            a, tz = A[r, j], TZ[r, j]
            gy, gty = GY[r, j], GTY[r, j]
            d1 = one - a * a
            gidt[j] += gy * a + gty * d1 * tz
            gty_a = gty * idt[j]
            gz = (gy * idt[j] - two * a * tz * gty_a) * d1
            GZ[r, j] = gz
            GTZ[r, j] = gty_a * d1
            gb[j] += gz


# ---------------------------------------------------------------------------
# The optimizer's update, fused (optim.Adam.step)
# ---------------------------------------------------------------------------


# error_model numpy: a division by zero gives inf as NumPy's does; Python's check and raise in the loop would
# keep it from vectorizing
@njit(nogil=True, cache=True, error_model="numpy")
def adam_update(P, G, M, V, one_m_beta1, beta2, one_m_beta2, sqrt_bias2, eps, step, l2, shrink):  # pragma: no cover
    """optim.adam_plain's lines in one pass over the elements (1-d arrays, updated in place):

    p *= shrink (AdamW, shrink != 1);  d = g + l2 p (Adam's L2, l2 != 0);
    m += (1 - b1)(d - m);  v = b2 v + (1 - b2) d d;  p -= step m / (sqrt(v) / sqrt_bias2 + eps)

    The scalars are rounded to the arrays' precision first and the operations are NumPy's, in its
    order, with no fastmath (no reassociation, no fused multiply-add): the result is the plain
    NumPy update's to the bit, in float32 as in float64.
    """
    t = P.dtype.type
    c1, b2, c2, sb2, ep, st, lam, sh = (t(one_m_beta1), t(beta2), t(one_m_beta2), t(sqrt_bias2), t(eps), t(step),
                                        t(l2), t(shrink))
    for i in range(P.size):
        p = P[i]
        if shrink != 1.0:
            p = p * sh
        d = G[i]
        if l2 != 0.0:
            d = d + lam * p
        m = M[i]
        m = m + c1 * (d - m)
        v = V[i] * b2
        v = v + c2 * d * d
        M[i], V[i] = m, v
        P[i] = p - st * (m / (np.sqrt(v) / sb2 + ep))


@njit(nogil=True, cache=True)
def pair_tangent(v, V, rij, nlist, drij):  # pragma: no cover - compiled
    """loss.pair_tangent in one pass: drij[f, i, k] = v[f, j] - v[f, i] + V[f] rij[f, i, k] for
    j = nlist[f, i, k] >= 0, else 0. v (nf, nloc, 3), V (nf, 3, 3), rij (nf, nloc, nnei, 3); drij is written."""
    nf, nloc, nnei = nlist.shape
    for f in range(nf):
        for i in range(nloc):
            for k in range(nnei):
                j = nlist[f, i, k]
                for a in range(3):
                    if j < 0:
                        drij[f, i, k, a] = 0.0
                    else:
                        drij[f, i, k, a] = (v[f, j, a] - v[f, i, a] + V[f, a, 0] * rij[f, i, k, 0]
                                            + V[f, a, 1] * rij[f, i, k, 1] + V[f, a, 2] * rij[f, i, k, 2])


@njit(nogil=True, cache=True)
def env_matrix_jvp(drij, rij, inv_r, sw, dsw, row_scale, inv_rp, Rdot):  # pragma: no cover - compiled
    """force_training.env_matrix_jvp in one pass (the transpose of env_matrix_backward's Jacobian):
    R'_0 = d u v (s' - s v),  R'_a = x_a d u v^2 (s' - 2 s v) + s v^2 dx_a, each times row_scale,
    d = x . dx. row_scale (nloc, nnei, 4); Rdot (nf, nloc, nnei, 4) is written."""
    nf, nloc, nnei, _ = rij.shape
    for f in range(nf):
        for i in range(nloc):
            for k in range(nnei):
                u, v, s, ds = inv_r[f, i, k], inv_rp[f, i, k], sw[f, i, k], dsw[f, i, k]
                x, y, z = rij[f, i, k, 0], rij[f, i, k, 1], rij[f, i, k, 2]
                dx, dy, dz = drij[f, i, k, 0], drij[f, i, k, 1], drij[f, i, k, 2]
                d = x * dx + y * dy + z * dz
                c = d * u * v * v * (ds - 2.0 * s * v)
                sv2 = s * v * v
                Rdot[f, i, k, 0] = d * u * v * (ds - s * v) * row_scale[i, k, 0]
                Rdot[f, i, k, 1] = (c * x + sv2 * dx) * row_scale[i, k, 1]
                Rdot[f, i, k, 2] = (c * y + sv2 * dy) * row_scale[i, k, 2]
                Rdot[f, i, k, 3] = (c * z + sv2 * dz) * row_scale[i, k, 3]
