r"""What NumPy and Numba leave on the table: the ceilings behind issue 25's unmet targets, measured here.

    python -m benchmarks.ceilings [--rows 2048] [--repeats 200]

One thread (BLAS too), at the water model's embedding shapes (n_in -> n_out: 25 -> 50 and 50 -> 100, value
and tangent stacked: 2 x rows), float32 and float64:

1. **products**: an embedding layer's three products, forward X2 W and reverse X2^T GZ2 (the weight gradient)
   and GZ2 W^T (the input's), against the 1000^3 rate: a step made of nothing but such BLAS calls would
   reach these fractions of the GEMM rate, and no more;
2. **elementwise passes**: minidp's fused kernels (kernels.tanh_dual, kernels.tanh_dual_backward) and NumPy's
   tanh on the same arrays, as GB/s of what each reads and writes: they move memory, they hardly compute;
3. **a product written in Numba** (the output row in the inner loop, which LLVM vectorizes, four rows at a
   time) against BLAS at the same shapes: where a kernel fusing the product with tanh would have to start,
   since NumPy has no product with an activation applied on the way out;
4. **float32 tanh**: NumPy's against a rational function z p(z^2) / q(z^2) that Numba vectorizes (libm's
   tanhf, which Numba calls for np.tanh, does not vectorize: the PyPI llvmlite has no vector math library),
   with the minimax coefficients Eigen uses for float32: time, and the error in ulp against float64's tanh by
   range of z, largest and mean. A mean off zero is a bias, and a bias adds up over an embedding's rows:
   the water model's float32 energies with the embedding nets' tanh made either way, against float64's;
5. **a thread wake**: an empty :func:`minidp.runtime.parallel_map` on kept threads, the price of each of a
   training step's parallel regions before any work.

Shape symbols: see :mod:`minidp.se_e2_a`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from benchmarks.measure import cpu_name
from benchmarks.profile import SHARED, gemm_rate
from minidp import DeepPot, kernels
from minidp.io.serialization import load_model
from minidp.runtime import Workers, parallel_map

# (n_in, n_out) of the water model's embedding layers that have a product (the first, 1 -> 25, is a broadcast)
SHAPES = ((25, 50), (50, 100))


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call, in ms."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


# ---------------------------------------------------------------------------
# 1. The products at the embedding's shapes
# ---------------------------------------------------------------------------


def product_rates(rows: int, dtype, repeats: int, peak: float) -> list[str]:
    """Table rows: each layer's forward and reverse products, ms and fraction of ``peak`` GFLOP/s."""
    rng = np.random.default_rng(0)
    out = []
    for n_in, n_out in SHAPES:
        # (2 rows, n_in), (2 rows, n_out), (n_in, n_out)
        X2 = rng.standard_normal((2 * rows, n_in)).astype(dtype)
        GZ2 = rng.standard_normal((2 * rows, n_out)).astype(dtype)
        W = rng.standard_normal((n_in, n_out)).astype(dtype)
        gflop = 2.0 * 2 * rows * n_in * n_out / 1e9
        for name, a, b in (("X2 W", X2, W), ("X2^T GZ2", X2.T, GZ2), ("GZ2 W^T", GZ2, W.T)):
            ms = median_ms(partial(np.matmul, a, b), repeats)
            out.append(f"| {np.dtype(dtype).name} | {n_in} -> {n_out} | {name} | {ms:.3f} "
                       f"| {gflop / ms * 1e3 / peak:.2f} |")
    return out


# ---------------------------------------------------------------------------
# 2. The elementwise passes
# ---------------------------------------------------------------------------


def elementwise_rates(rows: int, dtype, repeats: int) -> list[str]:
    """Table rows: the fused forward and reverse kernels and np.tanh, ms and GB/s of the arrays they touch."""
    rng = np.random.default_rng(1)
    out = []
    for n_in, n_out in SHAPES:
        # (2, rows, n_out) each: a and tz; the output's cotangent; dL/dz and dL/d(tz); y and ty
        AZ2 = rng.uniform(-1, 1, (2, rows, n_out)).astype(dtype)
        G2, GZ2, Y2 = (rng.standard_normal((2, rows, n_out)).astype(dtype) for _ in range(3))
        # (2, rows, n_in)
        X2 = rng.standard_normal((2, rows, n_in)).astype(dtype)
        idt, gb, gidt = (np.full(n_out, 0.1, dtype) for _ in range(3))
        half, inp = AZ2[0].nbytes, X2[0].nbytes
        passes = (
            # the residual y += [x, x] reads x twice and y's halves again
            ("tanh_dual (fused forward)", 6 * half + 2 * inp,
             partial(kernels.tanh_dual, AZ2[0], AZ2[1], X2[0], X2[1], idt, kernels.RES_DOUBLE, Y2[0], Y2[1])),
            ("tanh_dual_backward (fused reverse)", 6 * half,
             partial(kernels.tanh_dual_backward, G2[0], G2[1], AZ2[0], AZ2[1], idt, GZ2[0], GZ2[1], gb, gidt)),
            ("np.tanh (value half)", 2 * half, partial(np.tanh, AZ2[0], out=Y2[0])),
        )
        for name, nbytes, call in passes:
            ms = median_ms(call, repeats)
            out.append(f"| {np.dtype(dtype).name} | {n_in} -> {n_out} | {name} | {ms:.3f} | {nbytes / ms / 1e6:.1f} |")
    return out


# ---------------------------------------------------------------------------
# 3. A product in Numba
# ---------------------------------------------------------------------------


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def loop_product(A, B, C):  # pragma: no cover - compiled
    """C = A B for C-contiguous A (n, K), B (K, m), four rows of C at a time (n a multiple of 4): each B[k, :]
    loaded once for four rows, the inner loop over C's row vectorized."""
    n, K = A.shape
    m = B.shape[1]
    for i in range(0, n, 4):
        C[i:i + 4, :] = 0
        for k in range(K):
            a0, a1, a2, a3 = A[i, k], A[i + 1, k], A[i + 2, k], A[i + 3, k]
            for j in range(m):
                b = B[k, j]
                C[i, j] += a0 * b
                C[i + 1, j] += a1 * b
                C[i + 2, j] += a2 * b
                C[i + 3, j] += a3 * b


def numba_product_rates(rows: int, dtype, repeats: int) -> list[str]:
    """Table rows: X2 W by BLAS and by :func:`loop_product`, ms and GFLOP/s (the two results checked equal)."""
    rng = np.random.default_rng(2)
    out = []
    for n_in, n_out in SHAPES:
        X2 = rng.standard_normal((2 * rows, n_in)).astype(dtype)
        W = rng.standard_normal((n_in, n_out)).astype(dtype)
        # (2 rows, n_out)
        C = np.empty((2 * rows, n_out), dtype)
        loop_product(X2, W, C)
        tol = 100 * np.finfo(dtype).eps * np.abs(X2).sum(axis=1).max() * np.abs(W).max()
        assert np.abs(C - X2 @ W).max() <= tol, "loop_product disagrees with BLAS"
        gflop = 2.0 * 2 * rows * n_in * n_out / 1e9
        blas = median_ms(partial(np.matmul, X2, W, out=C), repeats)
        loop = median_ms(partial(loop_product, X2, W, C), repeats)
        out.append(f"| {np.dtype(dtype).name} | {n_in} -> {n_out} | {gflop / blas * 1e3:.0f} "
                   f"| {gflop / loop * 1e3:.0f} | {blas / loop:.2f} |")
    return out


# ---------------------------------------------------------------------------
# 4. float32 tanh, vectorized by hand
# ---------------------------------------------------------------------------

# z clipped to +-7.905, beyond which tanh is 1 to within the fit's error; p of degree 6 and q of degree 3 in z^2
_CLIP = np.float32(7.90531110763549805)
_P = tuple(np.float32(c) for c in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                   5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                   4.89352455891786e-03))
_Q = tuple(np.float32(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                   4.89352518554385e-03))


# error_model="numpy": Python's division-by-zero check would keep the loop scalar
@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def rational_tanh(z, out):  # pragma: no cover - compiled
    """out = z p(z^2) / q(z^2) for float32 z (1-d), Horner in float32."""
    for i in range(z.size):
        x = min(max(z[i], -_CLIP), _CLIP)
        x2 = x * x
        p = _P[0]
        for c in _P[1:]:
            p = p * x2 + c
        q = _Q[0]
        for c in _Q[1:]:
            q = q * x2 + c
        out[i] = x * p / q


def tanh_errors(values: int = 2_000_001) -> list[str]:
    """Table rows: max and mean error (ulp of the float32 result) of np.tanh and :func:`rational_tanh` in
    float32 against float64's tanh, on evenly spaced z >= 0 (tanh is odd), by range."""
    # (values,)
    z = np.linspace(0.0, 10.0, values).astype(np.float32)
    exact = np.tanh(z.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    rational = np.empty_like(z)
    rational_tanh(z, rational)
    out = []
    for name, got in (("np.tanh", np.tanh(z)), ("rational", rational)):
        # (values,)  signed error in ulp
        err = (got.astype(np.float64) - exact) / ulp
        cells = [f"{np.abs(err[m]).max():.2f} / {err[m].mean():+.3f}"
                 for m in ((z >= lo) & (z < hi) for lo, hi in ((0, 0.5), (0.5, 2), (2, 10)))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def tanh_times(rows: int, repeats: int) -> str:
    """One sentence: ms of np.tanh and of :func:`rational_tanh` on rows x 100 float32 values."""
    z = np.random.default_rng(3).standard_normal(rows * 100).astype(np.float32)
    out = np.empty_like(z)
    rational_tanh(z, out)
    numpy_ms = median_ms(partial(np.tanh, z, out=out), repeats)
    rational_ms = median_ms(partial(rational_tanh, z, out), repeats)
    return f"{z.size} float32 values: np.tanh {numpy_ms:.3f} ms, rational {rational_ms:.3f} ms."


def _tanh_rational_in_float32(z, out=None):
    """np.tanh's call as nn.dual_layer makes it, float32 through :func:`rational_tanh` (others: np.tanh)."""
    if z.dtype != np.float32:
        return _NUMPY_TANH(z, out=out)
    out = np.empty_like(z) if out is None else out
    # (z.size,)
    flat = np.empty(z.size, np.float32)
    rational_tanh(np.ascontiguousarray(z).ravel(), flat)
    out[...] = flat.reshape(z.shape)
    return out


_NUMPY_TANH = np.tanh


def energy_errors(model_path: Path, system: Path, frames: int = 4) -> str:
    """One sentence: max |E32 - E64| (eV) over the first frames of ``system``, the float32 model's
    embedding nets with np.tanh and with :func:`rational_tanh` (np.tanh patched for the call: nn.dual_layer,
    the embedding's fast path, calls it; the fitting nets keep NumPy's)."""
    model = load_model(model_path)
    coords = np.load(system / "set.000" / "coord.npy")[:frames]
    cells = np.load(system / "set.000" / "box.npy")[:frames]
    types = np.loadtxt(system / "type.raw", dtype=int)
    # (frames,) each
    e64 = DeepPot(model).eval(coords, cells, types)[0].ravel()
    e_numpy = DeepPot(model.astype(np.float32)).eval(coords, cells, types)[0].ravel()
    with mock.patch.object(np, "tanh", _tanh_rational_in_float32):
        e_rational = DeepPot(model.astype(np.float32)).eval(coords, cells, types)[0].ravel()
    return (f"{model_path.name} in float32, {len(e64)} frames of {system.name} ({types.size} atoms): "
            f"max |E32 - E64| {np.abs(e_numpy - e64).max():.2e} eV with np.tanh, "
            f"{np.abs(e_rational - e64).max():.2e} eV with the rational tanh in the embedding nets.")


# ---------------------------------------------------------------------------
# 5. A thread wake, and the report
# ---------------------------------------------------------------------------


def wake_us(repeats: int) -> float:
    """Median microseconds of an empty parallel_map over two items on two kept threads."""
    with Workers(2) as workers:
        return median_ms(lambda: parallel_map(len, ["a", "b"], workers), repeats) * 1e3


def report(rows: int, repeats: int) -> str:
    """The five measurements as markdown, on one thread."""
    lines = [(f"Machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; one thread, "
              f"{rows} rows a block (value and tangent stacked: {2 * rows} product rows).")]
    with threadpool_limits(1, user_api="blas"):
        peaks = {dt: gemm_rate(dt, 1) for dt in (np.float32, np.float64)}
        lines += ["", "1. Products (GEMM rate, 1000^3, one thread: " +
                  ", ".join(f"{np.dtype(d).name} {p:.0f} GFLOP/s" for d, p in peaks.items()) + ")", "",
                  "| dtype | layer | product | ms | of GEMM rate |", "|---|---|---|---|---|"]
        lines += [r for dt, p in peaks.items() for r in product_rates(rows, dt, repeats, p)]
        lines += ["", "2. Elementwise passes", "", "| dtype | layer | pass | ms | GB/s |", "|---|---|---|---|---|"]
        lines += [r for dt in peaks for r in elementwise_rates(rows, dt, repeats)]
        lines += ["", "3. X2 W: BLAS against a Numba loop", "",
                  "| dtype | layer | BLAS GFLOP/s | Numba GFLOP/s | Numba / BLAS |", "|---|---|---|---|---|"]
        lines += [r for dt in peaks for r in numba_product_rates(rows, dt, repeats)]
    lines += ["", "4. float32 tanh against float64's: max / mean error in ulp, by range of |z|", "",
              "| tanh | [0, 0.5) | [0.5, 2) | [2, 10) |", "|---|---|---|---|", *tanh_errors(), "",
              tanh_times(rows, repeats), ""]
    model, system = SHARED / "models" / "water-14000.dp", SHARED / "data" / "water" / "data_3"
    if model.is_file() and system.is_dir():
        lines += [energy_errors(model, system), ""]
    lines += [f"5. An empty parallel_map on two kept threads: {wake_us(repeats):.0f} us."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="rows of a block, a multiple of 4 (default 2048, "
                   "minidp's float32 block on a 2 MiB L2)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per measurement (default 200)")
    args = p.parse_args(argv)
    if args.rows < 4 or args.rows % 4:
        p.error(f"--rows must be a positive multiple of 4, got {args.rows}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(report(args.rows, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
