"""Kernel tests: every pyllm._core kernel against a plain numpy reference.

The references live in tests/reference.py and do not call pyllm code. Errors
are measured as normalised MSE, nmse = sum((a - e)^2) / sum(e^2), like
llama.cpp's test-backend-ops (1e-7 for float ops unless stated otherwise), and,
where a rounding-error bound can be stated, element by element against that
bound, so that a single wrong or unwritten element fails even in a large output.

Notation: u = 2^-24 is the unit roundoff of float32.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pyllm import _core
from pyllm import quant


def _load_reference():
    # Loaded by path so that this works whether or not tests/ is a package.
    path = Path(__file__).resolve().parent / "reference.py"
    spec = importlib.util.spec_from_file_location("_pyllm_kernel_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

U = 2.0**-24
FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_FORMATS = ("int8", "int4_sym", "int4_asym")
ALL_FORMATS = FLOAT_FORMATS + QUANT_FORMATS
AVAILABLE = _core.available_kernels()
HAVE_AVX2 = "avx2" in AVAILABLE

# every variant is tested where this CPU runs it; the others are reported as skipped
VARIANTS = [
    pytest.param(name, id=name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"CPU (or build) lacks {name}"))
    for name in ("portable", "avx2", "avxvnni", "avx512")
]


@pytest.fixture(params=VARIANTS)
def kernels(request):
    """Forces one matmul variant for the test and restores automatic choice."""
    _core.select_kernels(request.param)
    try:
        assert _core.active_kernels() == request.param
        yield request.param
    finally:
        _core.select_kernels("auto")


def poison_heap(nbytes: int) -> None:
    """Best effort at making unwritten output visible: allocate a block of the
    size the kernel's result will have, fill it with NaN bit patterns and free
    it, so the allocator is likely to hand the same memory to the result."""
    a = np.empty(max(int(nbytes), 1), dtype=np.uint8)
    a.fill(0xFF)  # 0xFFFFFFFF is a float32 NaN
    del a


def assert_nmse(got, expected, tol, what=""):
    err = ref.nmse(got, expected)
    assert err < tol, f"{what}: nmse {err:.3e} >= {tol:.1e}"


def assert_within(got, expected, bound, what=""):
    """|got - expected| <= bound element by element (NaN fails)."""
    got = np.asarray(got, dtype=np.float64)
    diff = np.abs(got - expected)
    ok = diff <= bound
    if not ok.all():
        bad = np.argwhere(~ok)
        idx = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {ok.size} elements out of bound; first at {idx}: "
            f"got {got[idx]!r}, expected {expected[idx]!r}, bound {np.broadcast_to(bound, ok.shape)[idx]:.3e}"
        )


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of n float32 roundings."""
    return n * U / (1 - n * U)


# =============================================================================
# matmul
# =============================================================================

# (M, N, K, group). Prefill tiles are 2 weight rows x 4 activation rows, decode
# (M = 1) tiles 4 weight rows (float weights: one row, 64 values a step with AVX-512, 32 then 8 with AVX2); work is split by 16-column chunks and activations
# are quantized in 16-row chunks. Shapes hit every remainder of those, K off the
# 32-block and off the group (576 = 4.5 groups of 128, K < group), and groups of
# 32/64/128.
MATMUL_SHAPES = [
    (1, 1, 31, 32),
    (1, 3, 33, 32),
    (1, 5, 100, 64),  # one 4-row decode tile + 1
    (1, 37, 576, 128),
    (1, 100, 1536, 64),  # 2 column chunks of 64 and 36 rows with 2 threads
    (1, 2, 80, 32),  # float decode: one 64-value step + a whole 16-value tail
    (1, 2, 16, 32),  # float decode: no 64-value step, one unmasked tail
    (2, 1, 100, 128),  # K < group size
    (2, 37, 33, 64),
    (3, 3, 31, 128),
    (3, 4, 576, 32),
    (5, 37, 100, 32),  # one 4-row prefill tile + 1 row
    (5, 1, 1536, 128),
    (17, 3, 576, 64),  # 4 tiles + 1 row; activations quantized in 2 row chunks
    (17, 37, 33, 128),
    (17, 8, 1536, 32),
    (64, 37, 100, 64),
    (64, 1, 576, 128),
    (64, 100, 31, 32),
    (4, 16, 64, 32),  # everything aligned
    (7, 24, 576, 32),  # tiled int: 3 pairs of activation rows + 1, a tile and a half of weight rows
    (8, 37, 576, 32),  # tiled int8, AVX-512: one pass of 8 activation rows (several sequences decoding)
    (13, 24, 100, 64),  # tiled int8, AVX-512: 8 rows + 4 + 1
    (17, 200, 96, 32),  # tiled int, AVX-512 from 16 rows: 13 tiles as pairs (int4) / triples (int8) + one, 8 x 2 rows + 1
]


def _shape_id(shape):
    M, N, K, G = shape
    return f"M{M}-N{N}-K{K}-g{G}"


def grid_activations(rng, M: int, K: int) -> np.ndarray:
    """Activations that per-block int8 quantization represents exactly: in every
    32-block the values are integer multiples k * c (|k| <= 127, c = 2^-5) and
    one of them is +-127 c, so absmax / 127 = c is a power of two and every
    value is a whole number of steps. Any absmax-scaled int8 scheme (one int8
    term, or an int8 term plus an int8 residual) is then lossless up to the
    float rounding of its step, whatever its rounding rule."""
    c = 2.0**-5
    k = np.clip(np.rint(40 * rng.standard_normal((M, K))), -127, 127)
    for start in range(0, K, 32):
        end = min(K, start + 32)
        pos = rng.integers(start, end, size=M)
        k[np.arange(M), pos] = 127 * rng.choice([-1, 1], size=M)
    return (k * c).astype(np.float32)


@functools.lru_cache(maxsize=None)
def matmul_case(fmt: str, M: int, N: int, K: int, G: int):
    """Inputs and reference pieces for one matmul case (cached: shared by the
    variant / bias / thread-count parametrizations). Gaussian activations and
    weights, seeded from the case so each is reproducible, plus grid
    activations (see grid_activations)."""
    rng = np.random.default_rng([M, N, K, G, ALL_FORMATS.index(fmt)])
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x_grid = grid_activations(rng, M, K)
    p = quant.quantize(w, fmt, G if fmt in QUANT_FORMATS else 0)
    args = quant.kernel_args(p)
    g = args["group_size"]
    W = ref.dequant_ref(fmt, args["data"], K, g, args["scales"], args["mins"])
    A = ref.partial_magnitudes_ref(fmt, args["data"], K, g, args["scales"], args["mins"])
    return x, x_grid, bias, args, W, A


def quant_tolerance(K: int, x, A, bias) -> np.ndarray:
    """Float32 error of an integer-dot matmul, per output: a few roundings per
    32-block (block dot to float, scale products, accumulation) plus the final
    reductions, relative to the magnitude of the partial sums (A: |q s|, and
    8|s| / |min| for the int4 offsets, which are accumulated separately)."""
    n_blocks = -(-K // 32)
    return gamma(4 * (n_blocks + 8)) * ref.matmul_abs_bound(x, A, bias)


ACTIVATION_QUANTS = list(ref.ACTIVATION_QUANTS)


def with_outlier_blocks(x: np.ndarray) -> np.ndarray:
    """x with a few blocks 16x louder, as activations' outlier channels are: in two of every three rows,
    one block at a place that moves with the row, so that rows side by side in a kernel's tile differ
    in which blocks keep two int8 terms under "int8x2_outliers" (and the last row has none)."""
    x = np.array(x, dtype=np.float32)
    M, K = x.shape
    n_blocks = -(-K // 32)
    for m in range(M - 1):
        if m % 3 != 2:
            b = (m * 7) % n_blocks
            x[m, 32 * b:32 * b + 32] *= 16.0
    return x


def activation_error_bound(x: np.ndarray, W: np.ndarray, step_fraction: float) -> np.ndarray:
    """Bound on |y - x W^T| when every activation is off by at most step_fraction * absmax of its
    32-value block: sum over blocks of that error times sum_block |W|.   -> [M, N]"""
    (M, K), N = x.shape, W.shape[0]
    n_blocks = -(-K // 32)
    xpad = np.zeros((M, n_blocks * 32)); xpad[:, :K] = np.abs(x)
    Wpad = np.zeros((N, n_blocks * 32)); Wpad[:, :K] = np.abs(W)
    amax = xpad.reshape(M, n_blocks, 32).max(axis=2)
    wsum = Wpad.reshape(N, n_blocks, 32).sum(axis=2)
    return (step_fraction * amax) @ wsum.T


def assert_float_matmul(y, exact, x, A, bias, what):
    """Float weights: the only error is float32 accumulation. A dot product of
    K terms plus the bias is off by at most gamma_{K+1} * sum |x_k w_k| (+|b|)
    (Higham) in any summation order (row tiles split K into 8 lanes, packed
    panels into depth blocks added into y: both only shorten the chains). This
    is a worst case bound holding for every element, so it also catches a
    single skipped or doubled term (error ~ sum / K >> gamma)."""
    K = x.shape[1]
    rel = np.max(np.abs(y - exact) / ref.matmul_abs_bound(x, A, bias))
    assert rel <= gamma(K + 2), f"{what}: max relative error {rel:.3e} > gamma_(K+2) = {gamma(K + 2):.3e}"
    # Random-sign roundings grow like sqrt(K) u: nmse ~ K u^2 ~ 1e-12 at K=1536.
    if y.size >= 32:
        assert_nmse(y, exact, 1e-10, what)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul(kernels, fmt, shape, with_bias, n_threads):
    M, N, K, G = shape  # float formats ignore G
    x, x_grid, bias, args, W, A = matmul_case(fmt, M, N, K, G)
    b = bias if with_bias else None

    poison_heap(4 * M * N)
    y = _core.matmul(x, bias=b, n_threads=n_threads, **args)
    assert y.shape == (M, N) and y.dtype == np.float32
    assert np.isfinite(y).all(), "NaN/inf in the output: an element was not written (or was miscomputed)"

    exact = ref.matmul_ref(x, W, b)  # x @ W^T (+ b) in float64, W decoded from the stored bits
    what = f"{kernels} {fmt} M={M} N={N} K={K} g={G} bias={with_bias} threads={n_threads}"

    if fmt in FLOAT_FORMATS:
        assert_float_matmul(y, exact, x, A, b, what)
        return

    # Quantized weights: the kernel quantizes each 32-block of every activation
    # row with an absmax-scaled int8 code (matmul.h / weights.h QuantizedRows),
    # does integer block dot products and accumulates blocks in float32.
    #
    # (1) Grid activations are quantized losslessly, so the result must equal
    # x @ W^T up to float32 accumulation error, element by element.
    poison_heap(4 * M * N)
    y_grid = _core.matmul(x_grid, bias=b, n_threads=n_threads, **args)
    assert_within(
        y_grid, ref.matmul_ref(x_grid, W, b), quant_tolerance(K, x_grid, A, b), f"{what} grid activations (exact)"
    )

    # (2) Gaussian activations, against x @ W^T: an absmax/127 int8 code is off
    # by at most half a step (absmax_block / 254) per activation, so
    # |y - x W^T| <= sum_blocks absmax/254 * sum_block |W| for every element
    # whatever the data (a finer scheme, e.g. with a residual int8 term, only
    # does better).
    act_bound = activation_error_bound(x, W, 1 / 254.0) * (1 + 1e-6)
    assert_within(y, exact, act_bound + quant_tolerance(K, x, A, b), f"{what} vs x @ dequantize(W)^T")

    # (3) Statistically: a one-term int8 code's rounding error is uniform within
    # +-absmax/254; for gaussian activations absmax of 32 values is ~2.5 sigma,
    # so the relative error variance is (2.5/127)^2 / 12 ~ 3e-5 and so is the
    # expected nmse (measured 1e-5 .. 1.3e-4 over these cases with one term).
    # 5e-4 leaves room for the fluctuation of a few dozen outputs; below 32
    # outputs nmse is dominated by how close to zero a handful of dot products
    # happen to fall, and only the element-wise bounds above are meaningful.
    if y.size >= 32:
        assert_nmse(y, exact, 5e-4, what)


# Float-weight prefill on packed panels (tiling.h panel_matmul): from 12 rows
# (AVX-512) or 24 rows (AVX2) on; tiles of 32 (16) output columns x 12 (6) rows,
# K in depth blocks of at most 256, columns in groups of 4 panels. Shapes on both
# sides of the thresholds and every tile remainder; K off 8/16 and over one depth
# block (257, 600, 1000: 2, 3, 4 blocks); N off the panel, column chunks (16 per
# chunk with 2 threads, so chunks start mid-panel) and one chunk of 144 columns
# (N=1100, 1 thread): a full group and a partial one; panels full, partial, and
# half panels (one-vector tiles) full and partial.
PANEL_SHAPES = [
    (11, 33, 31, 0),
    (12, 17, 257, 0),
    (24, 77, 600, 0),
    (25, 40, 64, 0),
    (67, 77, 600, 0),
    (130, 45, 1000, 0),
    (30, 1100, 40, 0),
    (200, 1, 17, 0),
    (40, 600, 64, 0),  # 18.75 panels: linear() hands out whole panels, the last one partial
]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_matmul_float_prefill_shapes(kernels, fmt, shape, n_threads):
    M, N, K, G = shape
    x, _, bias, args, W, A = matmul_case(fmt, M, N, K, G)
    poison_heap(4 * M * N)
    y = _core.matmul(x, bias=bias, n_threads=n_threads, **args)
    assert y.shape == (M, N) and np.isfinite(y).all(), "NaN/inf in the output: an element was not written"
    what = f"{kernels} {fmt} M={M} N={N} K={K} threads={n_threads}"
    assert_float_matmul(y, ref.matmul_ref(x, W, bias), x, A, bias, what)


@pytest.mark.parametrize(
    "shape", [(1, 37, 576, 128), (17, 37, 100, 64), (5, 3, 1536, 32), (64, 5, 33, 32)], ids=_shape_id
)
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_matmul_two_term_activation_precision(kernels, fmt, shape):
    """The precision weights.h documents for QuantizedRows (two int8 terms,
    x ~= step * (254 hi + lo), step = absmax / (127 * 254)): every activation
    is within half a step (+ float rounding of x / step, < 0.01 step), so
    |y - x W^T| <= sum_blocks 0.51 absmax / 32258 * sum_block |W|. This is
    ~250x tighter than test_matmul's one-term bound and fails if the residual
    term is dropped anywhere (dot product, block sums for the int4 offsets).
    Expected nmse ~ (2.5 / 32258)^2 / 12 ~ 5e-10."""
    M, N, K, G = shape
    x, x_grid, bias, args, W, A = matmul_case(fmt, M, N, K, G)
    y = _core.matmul(x, bias=bias, **args)
    act_bound = activation_error_bound(x, W, 0.51 / (127 * 254))
    exact = ref.matmul_ref(x, W, bias)
    what = f"{kernels} {fmt} {shape}"
    assert_within(y, exact, act_bound + quant_tolerance(K, x, A, bias), what)
    if y.size >= 32:
        assert_nmse(y, exact, 1e-8, what)


@pytest.mark.parametrize("activation_quant", ["int8", "int8x2_outliers"])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_matmul_one_term_activations(kernels, fmt, shape, n_threads, activation_quant):
    """activation_quant="int8" (one int8 term per value, hi zero; the tiled kernels skip hi's
    dot products) and "int8x2_outliers" (two terms only in outlier blocks; the kernels skip hi where
    the rows of a tile have none): the result is the product of the activations as the codes hold
    them, step * (254 hi + lo) from the numpy reference, with the weights, up to float32 accumulation
    error, element by element, on every shape of the sweep (each row count's kernel path), with outlier
    blocks in some rows and not in others. Then, coarser, against x @ W^T: half a step, absmax / 254,
    per activation (test_matmul's bound, which one term reaches: nmse ~3e-5 expected)."""
    M, N, K, G = shape
    x, _, bias, args, W, A = matmul_case(fmt, M, N, K, G)
    x = with_outlier_blocks(x)
    poison_heap(4 * M * N)
    y = _core.matmul(x, bias=bias, n_threads=n_threads, activation_quant=activation_quant, **args)
    assert y.shape == (M, N) and np.isfinite(y).all(), "NaN/inf in the output: an element was not written"
    hi, lo, step, _ = ref.quantize_activations_ref(x, activation_quant)
    if activation_quant == "int8" or (M > 1 and K > 128):  # rows but the last: an outlier block
        assert hi.any() == (activation_quant != "int8")
    codes = 254.0 * hi.astype(np.float64) + lo
    held = (step.astype(np.float64).repeat(32, axis=1) * codes)[:, :K]  # the activations the codes hold
    what = f"{kernels} {fmt} M={M} N={N} K={K} g={G} threads={n_threads} {activation_quant} activations"
    assert_within(y, ref.matmul_ref(held, W, bias), quant_tolerance(K, held, A, bias), what + " vs the codes' product")
    exact = ref.matmul_ref(x, W, bias)
    bound = activation_error_bound(x, W, 1 / 254.0) * (1 + 1e-6) + quant_tolerance(K, x, A, bias)
    assert_within(y, exact, bound, what + " vs x @ dequantize(W)^T")
    if y.size >= 32:
        assert_nmse(y, exact, 5e-4, what)


@pytest.mark.parametrize("activation_quant", ACTIVATION_QUANTS)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul_non_finite_activations(kernels, fmt, activation_quant):
    """A row holding NaN or infinity gives a non-finite output row on every variant (quantized
    weights: all NaN, as its blocks' steps are NaN; float weights: what the float products give), and
    the other rows the bits they get when those values are 0 instead. Row counts of each kernel path
    (1, 5, 8, 17)."""
    for M, N, K in [(1, 37, 100), (5, 37, 100), (8, 37, 576), (17, 200, 96)]:
        x, _, bias, args, W, A = matmul_case(fmt, M, N, K, 32)
        x = x.copy()
        bad = {0: np.nan, M // 2: np.inf, M - 1: -np.inf}
        for row, value in bad.items():
            x[row, (7 * row) % K] = value
        with np.errstate(invalid="ignore", over="ignore"):
            y = _core.matmul(x, bias=bias, activation_quant=activation_quant, n_threads=2, **args)
        clean = _core.matmul(np.where(np.isfinite(x), x, 0), bias=bias, activation_quant=activation_quant,
                             n_threads=2, **args)
        what = f"{kernels} {fmt} {activation_quant} M={M} N={N} K={K}"
        for row in range(M):
            if row in bad:
                assert not np.isfinite(y[row]).any(), f"{what}: row {row} ({bad[row]}) has finite outputs"
                if fmt in QUANT_FORMATS:
                    assert np.isnan(y[row]).all(), f"{what}: row {row}"
            else:
                np.testing.assert_array_equal(y[row], clean[row], err_msg=f"{what}: row {row}")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul_identity_reads_every_weight(kernels, fmt):
    """x = I_K gives y = W^T: each weight element is read on its own, so a
    wrong nibble order, group index or row stride shows up at its position.
    One-hot activation blocks quantize exactly in any absmax-scaled int8 scheme."""
    N, K, G = 37, 100, 64
    rng = np.random.default_rng(7)
    w = rng.standard_normal((N, K)).astype(np.float32)
    args = quant.kernel_args(quant.quantize(w, fmt, G))
    g = args["group_size"]
    W = ref.dequant_ref(fmt, args["data"], K, g, args["scales"], args["mins"])
    A = ref.partial_magnitudes_ref(fmt, args["data"], K, g, args["scales"], args["mins"])
    eye = np.eye(K, dtype=np.float32)
    # prefill (all K rows at once) and decode (one row at a time, first / last / middle)
    y = _core.matmul(eye, **args)
    rows = [_core.matmul(eye[k : k + 1], **args)[0] for k in (0, 31, 32, 63, 64, 99)]
    if fmt in FLOAT_FORMATS:
        np.testing.assert_array_equal(y, W.T.astype(np.float32))  # w*1 + 0s is exact
    else:
        assert_within(y, W.T, gamma(8) * A.T, f"{fmt} prefill")
    for k, row in zip((0, 31, 32, 63, 64, 99), rows):
        assert_within(row, W[:, k], gamma(8) * A[:, k] + 0.0, f"{fmt} decode row {k}")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul_variants_agree(fmt):
    """Every SIMD variant gives the portable numbers up to float summation order."""
    if len(AVAILABLE) == 1:
        pytest.skip("CPU (or build) has only the portable kernels")
    try:
        for M, N, K, G in [(1, 37, 576, 128), (17, 37, 100, 64), (5, 9, 1000, 32)]:
            x, x_grid, bias, args, W, A = matmul_case(fmt, M, N, K, G)
            out = {}
            for v in AVAILABLE:
                _core.select_kernels(v)
                out[v] = _core.matmul(x, bias=bias, **args)
                out[v + " untiled"] = _core.matmul(x, bias=bias, tiled=False, **args)
            # same activation codes, same integer dots: only float rounding differs
            tol = 2 * gamma(4 * (K + 8)) * ref.matmul_abs_bound(x, A, bias)
            for v in out:
                assert_within(out[v], out["portable"].astype(np.float64), tol, f"{fmt} {v} M={M}")
    finally:
        _core.select_kernels("auto")


@pytest.mark.parametrize("activation_quant", ACTIVATION_QUANTS)
@pytest.mark.parametrize("M,K", [(1, 32), (3, 100), (17, 576), (2, 7)])
def test_quantize_activations_bit_exact(kernels, M, K, activation_quant):
    """Every variant's activation codes equal the numpy reference bit for bit: the
    quantized-weight kernels of all variants then read the same integers."""
    rng = np.random.default_rng([M, K])
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[0, : min(K, 32)] *= 1e-36  # a block near the bottom of the float range
    if M > 1:
        x[1, :] = 0.0  # all-zero blocks
    if M > 2:
        x[2, ::5] = 3e35  # huge values
        x[2, 1::7] = 0.5 + rng.integers(-3, 4, x[2, 1::7].shape) / 254.0 * 3e35 / 127  # ties of the rounding
    if M > 16:  # blocks with NaN or infinity (codes 0, step NaN), beside finite ones in the same rows
        x[15, 3], x[16, 40], x[14, K - 1] = np.nan, np.inf, -np.inf
    if K > 64:  # an outlier block (two terms under int8x2_outliers) beside ordinary ones
        x[M - 1, 64:96] *= 8.0
    x[M - 1, min(K, 32) - 1] = 50.0  # a block one value dwarfs (two terms under int8x2_outliers too)
    got = _core.quantize_activations(x, activation_quant)
    expected = ref.quantize_activations_ref(x, activation_quant)
    for name, g, e in zip(("hi", "lo", "step", "sum"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_array_equal(g, e, err_msg=f"{kernels} {activation_quant} {name}")
    # within half a step of x, block by block (where the step is a normal float)
    hi, lo, step, _ = got
    steps = step.repeat(32, axis=1)[:, :K]
    approx = steps * (254.0 * hi[:, :K] + lo[:, :K])
    with np.errstate(invalid="ignore"):
        normal = steps >= np.finfo(np.float32).tiny  # NaN steps (non-finite blocks) compare False
    assert np.all((np.abs(approx - x) <= 0.5 * steps + 4 * U * np.abs(x))[normal])


def test_matmul_f16_special_values(kernels):
    """f16 weights with subnormals, signed zeros and the largest finite value:
    the SIMD path (F16C) and the scalar tail must both decode them exactly."""
    vals = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, 6.1e-5, -1.5e-7, 65504.0, -65504.0, 1.0, 2.0**-14], np.float32)
    K = 35  # 32 through the SIMD loop, 3 through the scalar tail
    w = np.resize(vals, (4, K)).astype(np.float32)
    w[1] = np.roll(w[1], 5)
    bits = w.astype(np.float16).view(np.uint16)
    eye = np.eye(K, dtype=np.float32)
    y = _core.matmul(eye, format="f16", data=bits, cols=K)
    np.testing.assert_array_equal(y, ref.f16_bits_to_f64(bits).T.astype(np.float32))


def test_matmul_int8_extreme_codes(kernels):
    """Stored int8 codes span -128..127 (quantize uses +-127, the format allows
    -128) and activations quantize to +-127: the AVX2 u8 x s8 pair sums
    (2 * 128 * 127 = 32512) must stay below int16 saturation."""
    N, K = 4, 64
    q = np.full((N, K), -128, np.int8)
    q[1] = 127
    q[2, ::2], q[2, 1::2] = -128, 127
    q[3] = np.arange(K) - 64
    scales = np.full((N, 2), 1.0, np.float16).view(np.uint16)
    x = np.full((3, K), -1.0, np.float32)
    x[1] = 1.0
    x[2, ::2], x[2, 1::2] = -1.0, 1.0
    W = q.astype(np.float64)
    for M in (1, 3):  # decode and prefill tiles
        y = _core.matmul(x[:M], format="int8", data=q, cols=K, group_size=32, scales=scales)
        expected = ref.matmul_ref(x[:M], W)  # +-1 activations quantize exactly
        assert_within(y, expected, gamma(32) * ref.matmul_abs_bound(x[:M], W), f"M={M}")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize(
    "magnitude", [1e-30, 1e-34, 1e-36]
)
def test_matmul_tiny_activations(kernels, fmt, magnitude):
    """Activation quantization is scale invariant for normal floats: a block of
    tiny (but normal) activations keeps its relative precision."""
    rng = np.random.default_rng(11)
    x = (magnitude * rng.uniform(0.1, 1.0, size=(2, 64))).astype(np.float32)
    args = quant.kernel_args(quant.quantize(rng.standard_normal((3, 64)).astype(np.float32), fmt, 32))
    W = ref.dequant_ref(fmt, args["data"], 64, 32, args["scales"], args["mins"])
    y = _core.matmul(x, **args)
    # one-term int8 bound (absmax / 254 per activation) is < 1 % of |x| @ |W|
    assert_within(y, ref.matmul_ref(x, W), 1e-2 * ref.matmul_abs_bound(x, W), f"{fmt} |x| ~ {magnitude:g}")


def test_matmul_accepts_any_float_activations():
    """x is converted (forcecast) to contiguous float32; packed weights are not."""
    x, _, bias, args, W, A = matmul_case("int4_asym", 5, 37, 100, 32)
    y = _core.matmul(x, **args)
    np.testing.assert_array_equal(_core.matmul(x.astype(np.float64), **args), y)
    xf = np.asfortranarray(x)
    assert not xf.flags.c_contiguous
    np.testing.assert_array_equal(_core.matmul(xf, **args), y)


@pytest.mark.parametrize("activation_quant", ACTIVATION_QUANTS)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul_same_bits_for_any_split(kernels, fmt, activation_quant):
    """linear (ops.cpp) splits the output rows into one chunk per thread for a small call and two
    for a large one (weight bytes x rows over 1 MiB per thread), and the AVX-512 tiled kernel takes
    several tiles at once from 16 rows: every thread count, so every split, gives the bits of one
    thread, and (integer formats) a row alone the bits it gets among others. Shapes on both sides of
    those lines for 2-4 threads."""
    if activation_quant != "int8x2" and fmt in FLOAT_FORMATS:
        pytest.skip("float weights multiply float activations")
    matmul = functools.partial(_core.matmul, activation_quant=activation_quant)
    for M, N, K in [(1, 100, 1536), (1, 4112, 1024), (5, 2064, 1024), (9, 1040, 512), (17, 1040, 512)]:
        x, _, _, args, _, _ = matmul_case(fmt, M, N, K, 64)
        x = with_outlier_blocks(x)
        one = matmul(x, n_threads=1, **args)
        for n_threads in (2, 3, 4):
            np.testing.assert_array_equal(matmul(x, n_threads=n_threads, **args), one,
                                          err_msg=f"{kernels} {fmt} M={M} N={N} K={K} threads={n_threads}")
        if fmt in QUANT_FORMATS:  # and a row alone gives the bits it gets among others (batched decode)
            for i in {0, M // 2, M - 1}:
                np.testing.assert_array_equal(matmul(x[i:i + 1], n_threads=2, **args)[0], one[i],
                                              err_msg=f"{kernels} {fmt} row {i} of M={M} N={N} K={K} alone")


@pytest.mark.parametrize("activation_quant", ACTIVATION_QUANTS)
@pytest.mark.parametrize("formats", [(f, f, f) for f in ALL_FORMATS] + [("int4_sym", "int8", "f16"), ("f32", "int4_asym", "bf16")])
def test_matmul_group_gives_each_weight_its_own_bits(kernels, formats, activation_quant):
    """The engine runs q/k/v (and gate/up) as one group in one parallel region, the group's rows split
    between the threads as if they were one matrix, so a chunk may end inside one weight and go on in
    the next. Each output must be the bits its weight gives alone, whatever the thread count: sizes
    that are not whole 16-row tiles put chunk edges at every kind of place; mixed formats (one input
    quantized for all, float weights reading the floats), 1-17 rows (17: the float panels)."""
    if activation_quant != "int8x2" and all(f in FLOAT_FORMATS for f in formats):
        pytest.skip("float weights multiply float activations")
    for M, sizes, K in [(1, (100, 37, 37), 256), (1, (576, 192, 192), 576), (5, (1040, 17, 4112), 512), (17, (48, 16, 33), 64)]:
        x = with_outlier_blocks(matmul_case(formats[0], M, 1, K, 64)[0])
        weights = [matmul_case(f, 1, N, K, 64)[3] for f, N in zip(formats, sizes)]
        alone = [_core.matmul(x, n_threads=1, activation_quant=activation_quant, **w) for w in weights]
        for n_threads in (1, 2, 3, 4):
            together = _core.matmul_group(x, weights, n_threads=n_threads, activation_quant=activation_quant)
            for i, (y, ref_y) in enumerate(zip(together, alone)):
                np.testing.assert_array_equal(y, ref_y, err_msg=f"{kernels} {formats} weight {i} of {sizes} M={M} K={K} "
                                                                f"threads={n_threads}")


def test_matmul_group_rejects_bad_groups():
    x, _, _, args, _, _ = matmul_case("int8", 2, 16, 64, 64)
    _, _, _, other, _, _ = matmul_case("int8", 2, 16, 96, 32)
    with pytest.raises(ValueError, match="same cols"):
        _core.matmul_group(x, [args, other])
    with pytest.raises(ValueError, match="empty"):
        _core.matmul_group(x, [])


@pytest.mark.skipif("avxvnni" not in AVAILABLE, reason="CPU (or build) lacks avxvnni")
@pytest.mark.parametrize("activation_quant", ACTIVATION_QUANTS)
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_avxvnni_gives_the_avx2_bits(fmt, activation_quant):
    """The avxvnni variant is the avx2 variant with the tiled block dots on vpdpbusd: the integer
    sums are exact either way, so the bits are the same. Partial tiles and blocks, groups of 32 to
    128, 1-17 rows; Gaussian, grid and saturating activations (every code +-127, the int32 bounds)."""
    cases = [(1, 37, 100, 32), (2, 16, 32, 32), (3, 100, 1000, 128), (9, 33, 4096, 64), (17, 1040, 512, 64)]
    for M, N, K, G in cases:
        x, x_grid, bias, args, _, _ = matmul_case(fmt, M, N, K, G)
        saturating = np.where(np.arange(K) % 3 == 0, -5.0, 5.0).astype(np.float32) * np.ones((M, 1), np.float32)
        for name, acts in [("gaussian", x), ("outliers", with_outlier_blocks(x)), ("grid", x_grid), ("saturating", saturating)]:
            out = {}
            try:
                for variant in ("avx2", "avxvnni"):
                    _core.select_kernels(variant)
                    out[variant] = _core.matmul(acts, bias=bias, n_threads=2, activation_quant=activation_quant, **args)
            finally:
                _core.select_kernels("auto")
            np.testing.assert_array_equal(out["avxvnni"], out["avx2"],
                                          err_msg=f"{fmt} {activation_quant} {name} M={M} N={N} K={K} G={G}")


def test_matmul_default_threads():
    x, _, bias, args, W, A = matmul_case("int8", 17, 37, 100, 64)
    np.testing.assert_array_equal(_core.matmul(x, n_threads=0, **args), _core.matmul(x, n_threads=1, **args))


def test_matmul_zero_activations_and_weights(kernels):
    """All-zero activation blocks (scale 0) and all-zero weight groups give 0, not NaN."""
    M, N, K = 5, 6, 100
    x = np.zeros((M, K), np.float32)
    x[1, 40:] = 1.0  # row 1: first block zero, later ones not
    w = np.ones((N, K), np.float32)
    w[2] = 0.0
    w[3, :64] = 0.0
    for fmt in ALL_FORMATS:
        args = quant.kernel_args(quant.quantize(w, fmt, 32))
        y = _core.matmul(x, **args)
        W = ref.dequant_ref(fmt, args["data"], K, args["group_size"], args["scales"], args["mins"])
        expected = ref.matmul_ref(x, W)
        assert np.isfinite(y).all(), fmt
        assert_within(y, expected, 1e-5 * (1 + np.abs(expected)), fmt)


@pytest.mark.parametrize("name", ["portable", "sse9"])
def test_pyllm_kernels_environment_variable(name):
    """PYLLM_KERNELS picks the variant at first use in a fresh process; an unknown name is an error."""
    import subprocess
    import sys

    code = "from pyllm import _core; print(_core.active_kernels())"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYLLM_KERNELS": name},
                          capture_output=True, text=True, timeout=120)
    if name == "portable":
        assert proc.returncode == 0 and proc.stdout.strip() == "portable", proc.stderr
    else:
        assert proc.returncode != 0 and "unknown kernel variant 'sse9'" in proc.stderr


def test_select_kernels():
    try:
        _core.select_kernels("portable")
        assert _core.active_kernels() == "portable"
        _core.select_kernels("auto")
        assert _core.active_kernels() == AVAILABLE[-1]
        assert AVAILABLE[0] == "portable"
        with pytest.raises(ValueError, match="unknown kernel variant"):
            _core.select_kernels("sse9")
        for name in ("avx2", "avxvnni", "avx512"):
            if name not in AVAILABLE:
                with pytest.raises(ValueError, match="not supported here"):
                    _core.select_kernels(name)
    finally:
        _core.select_kernels("auto")


# --- bad input ----------------------------------------------------------------


def _good(fmt="int4_asym", N=3, K=100, G=64):
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    return np.ones((2, K), np.float32), quant.kernel_args(quant.quantize(w, fmt, G))


def _with(args, **changes):
    out = dict(args)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "fmt, data_dtype",
    [
        ("int8", np.uint8),  # int8 weights given as uint8: would flip signs if reinterpreted
        ("int8", np.int16),
        ("f32", np.float64),  # would be read as garbage if reinterpreted
        ("f16", np.float16),  # raw f16 bits are uint16
        ("bf16", np.int16),
        ("int4_sym", np.int8),
        ("int4_asym", np.uint16),
    ],
)
def test_matmul_rejects_wrong_weight_dtype(fmt, data_dtype):
    x, args = _good(fmt)
    bad = np.asarray(args["data"]).astype(data_dtype)
    with pytest.raises(ValueError, match=r"weight has dtype .*expected"):
        _core.matmul(x, **_with(args, data=bad))


def test_matmul_rejects_wrong_side_array_dtypes():
    x, args = _good("int4_asym")
    with pytest.raises(ValueError, match="scales has dtype"):
        _core.matmul(x, **_with(args, scales=args["scales"].view(np.float16).astype(np.float32)))
    with pytest.raises(ValueError, match="scales has dtype"):
        _core.matmul(x, **_with(args, scales=args["scales"].view(np.float16)))  # f16 values, not bits
    with pytest.raises(ValueError, match="mins has dtype"):
        _core.matmul(x, **_with(args, mins=args["mins"].astype(np.int16)))
    with pytest.raises(ValueError, match="bias has dtype"):
        _core.matmul(x, bias=np.zeros(3, np.float64), **args)


def test_matmul_rejects_wrong_shapes():
    x, args = _good("int4_asym", N=3, K=100, G=64)
    data, scales, mins = args["data"], args["scales"], args["mins"]
    cases = {
        "unpadded int4 rows": _with(args, data=np.ascontiguousarray(data[:, :50])),
        "extra group": _with(args, scales=np.zeros((3, 3), np.uint16)),
        "missing group": _with(args, mins=np.ascontiguousarray(mins[:, :1])),
        "scales rows": _with(args, scales=np.ascontiguousarray(scales[:2])),
        "1-D weight": _with(args, data=data.reshape(-1)),
        "cols too large": _with(args, cols=200),
        "cols zero": _with(args, cols=0),
    }
    for name, kw in cases.items():
        with pytest.raises(ValueError):
            _core.matmul(x, **kw)
            pytest.fail(name)
    with pytest.raises(ValueError, match="columns"):
        _core.matmul(np.ones((2, 99), np.float32), **args)
    with pytest.raises(ValueError):
        _core.matmul(np.ones(100, np.float32), **args)
    with pytest.raises(ValueError, match="no rows"):
        _core.matmul(np.ones((0, 100), np.float32), **args)
    with pytest.raises(ValueError, match="bias has shape"):
        _core.matmul(x, bias=np.zeros(4, np.float32), **args)
    w = np.ones((3, 100), np.float32)
    with pytest.raises(ValueError, match="weight has shape"):
        _core.matmul(x, format="f32", data=w, cols=99)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.matmul(x, format="f32", data=np.ones((100, 3), np.float32).T, cols=100)


def test_matmul_rejects_bad_quant_params():
    x, args = _good("int8", K=100, G=32)
    for g in (48, 0, -32, 16):
        with pytest.raises(ValueError, match="group size"):
            _core.matmul(x, **_with(args, group_size=g))
    with pytest.raises(ValueError, match="needs scales"):
        _core.matmul(x, **_with(args, scales=None))
    _, args4 = _good("int4_asym")
    with pytest.raises(ValueError, match="needs mins"):
        _core.matmul(x, **_with(args4, mins=None))
    with pytest.raises(ValueError, match="unknown weight format"):
        _core.matmul(x, **_with(args, format="int3"))
    # float formats have no groups: the group size is ignored
    w = np.ones((3, 100), np.float32)
    np.testing.assert_array_equal(
        _core.matmul(x, format="f32", data=w, cols=100, group_size=48), _core.matmul(x, format="f32", data=w, cols=100)
    )


def test_matmul_rejects_negative_threads():
    x, args = _good()
    with pytest.raises(ValueError, match="n_threads"):
        _core.matmul(x, n_threads=-1, **args)


# =============================================================================
# embedding
# =============================================================================


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("cols, group", [(33, 32), (100, 64), (576, 128)])
def test_embedding(fmt, cols, group):
    vocab = 11
    w = np.random.default_rng([cols, group]).standard_normal((vocab, cols)).astype(np.float32)
    args = quant.kernel_args(quant.quantize(w, fmt, group))
    g = args["group_size"]
    table = ref.dequant_ref(fmt, args["data"], cols, g, args["scales"], args["mins"])
    A = ref.partial_magnitudes_ref(fmt, args["data"], cols, g, args["scales"], args["mins"])
    ids = np.array([0, 10, 3, 3, 7], np.int32)
    poison_heap(4 * len(ids) * cols)
    out = _core.embedding(ids, **args)
    assert out.shape == (len(ids), cols) and out.dtype == np.float32
    # one float32 product (plus one add for the min): at most 2 roundings
    assert_within(out, table[ids], gamma(2) * A[ids], f"embedding {fmt}")
    assert _core.embedding(np.zeros(0, np.int32), **args).shape == (0, cols)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("vocab, cols, group", [(1, 32, 32), (17, 33, 32), (35, 100, 64), (16, 576, 128)])
def test_embedding_from_the_tiled_copy(kernels, fmt, vocab, cols, group):
    """An engine reads a tied lm_head's embedding rows back from the tiled copy its matmuls use (the
    file's pages are never touched then): every row, partial tiles and blocks, the same floats as
    reading the file's layout; out-of-range ids still refused."""
    w = np.random.default_rng([vocab, cols, group]).standard_normal((vocab, cols)).astype(np.float32)
    args = quant.kernel_args(quant.quantize(w, fmt, group))
    ids = np.concatenate([np.arange(vocab), np.arange(vocab)[::-1]]).astype(np.int32)
    np.testing.assert_array_equal(_core.embedding(ids, tiled=True, **args), _core.embedding(ids, **args))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        _core.embedding(np.array([vocab], np.int32), tiled=True, **args)


def test_embedding_rejects_ids_beyond_int32():
    """ids are not force-cast: an int64 id of 2**32 + 1 must not wrap to row 1, 1.7 must not become 1."""
    args = quant.kernel_args(quant.quantize(np.ones((4, 32), np.float32), "f32"))
    for bad in (np.array([2**32 + 1], np.int64), np.array([-(2**32) + 2], np.int64), np.array([1.7]),
                np.array([2**63], np.uint64)):
        with pytest.raises((IndexError, ValueError)):
            _core.embedding(bad, **args)
    with pytest.raises(ValueError):
        _core.rope(np.ones((1, 1, 4), np.float32), np.array([2**32 + 5], np.int64), 10000.0)
    assert _core.embedding(np.array([3], np.int64), **args).shape == (1, 32)


def test_embedding_rejects_bad_ids():
    args = quant.kernel_args(quant.quantize(np.ones((4, 32), np.float32), "int8", 32))
    for bad in ([4], [-1], [0, 1, 2**31 - 1]):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            _core.embedding(np.array(bad, np.int32), **args)
    with pytest.raises(ValueError, match="1-D"):
        _core.embedding(np.zeros((1, 1), np.int32), **args)


# =============================================================================
# quantization formats (pyllm.quant) and int4 packing
# =============================================================================


@pytest.mark.parametrize("cols", [1, 16, 17, 31, 32, 33, 70])
def test_pack_int4_matches_naive_packer(cols):
    q = np.random.default_rng(cols).integers(0, 16, size=(3, cols), dtype=np.uint8)
    packed = quant.pack_int4(q)
    expected = ref.pack_int4_naive(q)
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-cols // 32) * 16)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(quant.unpack_int4(packed, cols), q)
    np.testing.assert_array_equal(ref.unpack_int4_ref(packed, cols), q)


def test_pack_int4_layout_by_hand():
    q = np.zeros((1, 40), np.uint8)
    q[0, 0], q[0, 16], q[0, 15], q[0, 31], q[0, 32], q[0, 39] = 1, 2, 3, 4, 5, 15
    packed = quant.pack_int4(q)[0]
    assert packed.shape == (32,)
    assert packed[0] == 0x21  # value 0 low nibble, value 16 high nibble
    assert packed[15] == 0x43  # values 15 and 31
    assert packed[16] == 0x05  # second chunk: value 32, its partner 48 is padding
    assert packed[23] == 0x0F  # value 39; padding nibbles are zero
    assert np.count_nonzero(packed) == 4


def _hand_built(fmt):
    """A 2 x 70 weight with group 64 (groups of 64 and 6 values), hand-picked
    q / scales / mins, and the documented value formula."""
    rows, cols, G = 2, 70, 64
    rng = np.random.default_rng(3)
    scales = np.array([[0.5, -0.25], [2.0, 0.125]], np.float16)
    mins = np.array([[-1.0, 3.5], [0.0, -0.75]], np.float16)
    gcol = np.arange(cols) // G
    s = scales.astype(np.float64)[:, gcol]
    mn = mins.astype(np.float64)[:, gcol]
    if fmt == "int8":
        q = rng.integers(-127, 128, size=(rows, cols)).astype(np.int8)
        data, expected = q, q * s
    else:
        q = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
        data = ref.pack_int4_naive(q)
        expected = (q - 8.0) * s if fmt == "int4_sym" else q * s + mn
    p = quant.PackedWeight(fmt, rows, cols, G, data, scales, mins if fmt == "int4_asym" else None)
    return p, expected


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_dequantize_hand_built(fmt):
    p, expected = _hand_built(fmt)
    np.testing.assert_array_equal(quant.dequantize(p), expected.astype(np.float32))
    args = quant.kernel_args(p)
    np.testing.assert_array_equal(ref.dequant_ref(fmt, args["data"], 70, 64, args["scales"], args["mins"]), expected)
    # the C++ kernels read the same layout: embedding rows and matmul by I
    np.testing.assert_array_equal(_core.embedding(np.array([1, 0], np.int32), **args), expected[[1, 0]])
    y = _core.matmul(np.eye(70, dtype=np.float32), **args)
    assert_within(y, expected.T, 1e-6 * (np.abs(expected.T) + 8 * 2.0 + 3.5), f"{fmt} matmul")


# Round-trip error of gaussian weights (measured on 64 x 1536, seed 0:
# int8 2.9e-5 / 3.6e-5 / 4.2e-5 / 4.9e-5 for groups 32 / 64 / 128 / 256,
# int4_sym 7.4e-3 / 9.1e-3 / 1.08e-2 / 1.24e-2, int4_asym 6.1e-3 .. 1.21e-2).
# Rounding to a step s costs s^2/12: int8 s ~ 2.5 sigma / 127 -> ~3e-5;
# int4 s ~ 2.5 sigma / 8 -> ~8e-3. f16 / bf16 rounding is at most 2^-11 / 2^-8
# relative, so nmse <= 2^-22 = 2.4e-7 and 2^-16 = 1.5e-5 for normal numbers.
ROUNDTRIP_NMSE = {
    ("f16", 0): 1e-6,
    ("bf16", 0): 1e-4,
    ("int8", 32): 1e-4, ("int8", 64): 1e-4, ("int8", 128): 1e-4, ("int8", 256): 1e-4,
    ("int4_sym", 32): 1.2e-2, ("int4_sym", 64): 1.5e-2, ("int4_sym", 128): 1.5e-2, ("int4_sym", 256): 2e-2,
    ("int4_asym", 32): 1.2e-2, ("int4_asym", 64): 1.5e-2, ("int4_asym", 128): 1.5e-2, ("int4_asym", 256): 2e-2,
}  # fmt: skip


@functools.lru_cache(maxsize=None)
def _gaussian_weight():
    return np.random.default_rng(0).standard_normal((64, 1536)).astype(np.float32)


@pytest.mark.parametrize("fmt, group", list(ROUNDTRIP_NMSE), ids=[f"{f}-g{g}" for f, g in ROUNDTRIP_NMSE])
def test_quantize_roundtrip_error(fmt, group):
    w = _gaussian_weight()
    p = quant.quantize(w, fmt, group)
    args = quant.kernel_args(p)
    deq = ref.dequant_ref(fmt, args["data"], w.shape[1], p.group_size, args["scales"], args["mins"])
    np.testing.assert_array_equal(quant.dequantize(p), deq.astype(np.float32))
    assert_nmse(deq, w, ROUNDTRIP_NMSE[(fmt, group)], f"{fmt} g={group}")

    # element-wise worst case of round-to-nearest, per group, with the stored
    # (f16-rounded) scale s: int8 |err| <= s/2; int4_sym <= |s| (the extreme
    # maps to q = 0 = -8s exactly, the opposite side can clip at 7s);
    # int4_asym <= s/2 + the f16 rounding of the min (2^-11 |min|).
    err = np.abs(deq - w)
    if fmt == "f16":
        assert (err <= 2.0**-11 * np.abs(w) + 2.0**-25).all()  # + half the subnormal step
    elif fmt == "bf16":
        np.testing.assert_array_equal(deq, ref.round_to_bf16(w))
        assert (err <= 2.0**-8 * np.abs(w)).all()
    else:
        gcol = np.arange(w.shape[1]) // group
        s = np.abs(ref.f16_bits_to_f64(args["scales"]))[:, gcol]
        if fmt == "int8":
            bound = s / 2
        elif fmt == "int4_sym":
            bound = s * (1 + 8 * 2.0**-11)  # the clipped side also carries the scale's f16 rounding
        else:
            bound = s / 2 + 2.0**-11 * np.abs(ref.f16_bits_to_f64(args["mins"]))[:, gcol]
        # (1 + 1e-4): w / s is itself rounded in float32 before round-to-nearest
        assert (err <= bound * (1 + 1e-4)).all(), f"max err/bound {np.max(err / bound):.4f}"


def test_bf16_rounds_to_nearest_even():
    one = 1.0
    vals = np.array(
        [one + 2.0**-8, one + 3 * 2.0**-8, one + 2.0**-8 + 2.0**-20, -(one + 2.0**-8), 3.0e38, 1e-30, 0.0], np.float32
    )
    got = quant.bf16_bits_to_f32(quant.f32_to_bf16_bits(vals)).astype(np.float64)
    np.testing.assert_array_equal(got, ref.round_to_bf16(vals))
    assert got[0] == 1.0 and got[1] == 1.0 + 2.0**-6 and got[2] == 1.0 + 2.0**-7


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_quantize_zero_and_constant_groups(fmt):
    w = np.random.default_rng(1).standard_normal((4, 100)).astype(np.float32)
    w[0] = 0.0  # zero row
    w[1, 32:64] = 0.0  # zero group (group 32)
    w[2, 64:] = 0.0  # zero last, short group
    w[3, :32] = 2.5  # constant group
    p = quant.quantize(w, fmt, 32)
    deq = quant.dequantize(p)
    assert np.isfinite(deq).all()
    if p.scales is not None:
        assert np.isfinite(np.asarray(p.scales, np.float32)).all()
    assert (deq[0] == 0).all() and (deq[1, 32:64] == 0).all() and (deq[2, 64:] == 0).all()
    np.testing.assert_allclose(deq[3, :32], 2.5, rtol=1e-3)
    y = _core.matmul(np.ones((1, 100), np.float32), **quant.kernel_args(p))
    assert np.isfinite(y).all() and y[0, 0] == 0.0


@pytest.mark.parametrize(
    "fmt, magnitude",
    [
        ("int8", 1e5),
        ("int4_sym", 1e5),
        ("f16", 1e5),
        ("int4_asym", 1e5),
        ("int8", 1e7),
        ("int4_sym", 1e6),
    ],
)
@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_quantize_large_finite_weights(fmt, magnitude):
    """Finite weights must either quantize to finite values or be rejected with
    ValueError, never turn into inf / NaN."""
    w = np.full((2, 64), magnitude, np.float32)
    w[:, ::2] = -magnitude
    try:
        p = quant.quantize(w, fmt, 32)
    except ValueError:
        return
    deq = quant.dequantize(p)
    assert np.isfinite(deq).all(), f"{fmt}: {deq[0, :4]}"
    assert_nmse(deq, w, ROUNDTRIP_NMSE[(fmt, 32 if fmt in QUANT_FORMATS else 0)], fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(fmt, bad):
    w = np.ones((2, 64), np.float32)
    w[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        quant.quantize(w, fmt, 32)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("group", [48, 0, -32, 16, 33])
def test_quantize_rejects_bad_group_size(fmt, group):
    with pytest.raises(ValueError, match="group size"):
        quant.quantize(np.ones((2, 64), np.float32), fmt, group)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown weight format"):
        quant.quantize(np.ones((2, 64), np.float32), "int2", 32)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize(np.ones(64, np.float32), "int8", 32)


def test_nmse_helper_matches_definition():
    a, e = np.array([1.0, 2.0, 3.5]), np.array([1.0, 2.5, 3.0])
    assert math.isclose(quant.nmse(a, e), 0.5 / 16.25) and math.isclose(ref.nmse(a, e), 0.5 / 16.25)


# =============================================================================
# rmsnorm, swiglu
# =============================================================================


@pytest.mark.parametrize("M", [1, 13])
@pytest.mark.parametrize("D", [576, 64, 7, 17, 33])  # (the sum of squares runs in 16 lanes: ragged ends)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("magnitude", [1.0, 1e-3], ids=["unit", "tiny"])  # tiny: eps dominates mean(x^2)
def test_rmsnorm(M, D, eps, magnitude):
    rng = np.random.default_rng([M, D])
    x = (rng.standard_normal((M, D)) * magnitude).astype(np.float32)
    weight = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    poison_heap(4 * M * D)
    y = _core.rmsnorm(x, weight, eps)
    expected = ref.rmsnorm_ref(x, weight, eps)
    assert y.shape == (M, D) and y.dtype == np.float32 and np.isfinite(y).all()
    assert_nmse(y, expected, 1e-7, f"rmsnorm M={M} D={D}")
    # sum of squares in float32 (D roundings) + sqrt, divide, 2 products
    assert_within(y, expected, gamma(D + 8) * np.abs(expected), f"rmsnorm M={M} D={D}")
    assert np.array_equal(_core.rmsnorm(x[-1:], weight, eps)[0], y[-1])  # a row's bits: alone or beside others


def test_rmsnorm_zero_row_and_errors():
    x = np.zeros((2, 8), np.float32)
    x[1] = 1.0
    y = _core.rmsnorm(x, np.full(8, 2.0, np.float32), 1e-6)
    assert (y[0] == 0).all()
    np.testing.assert_allclose(y[1], 2.0 / math.sqrt(1 + 1e-6), rtol=1e-6)
    with pytest.raises(ValueError, match="weight has shape"):
        _core.rmsnorm(x, np.ones(7, np.float32), 1e-6)
    with pytest.raises(ValueError, match="2-D"):
        _core.rmsnorm(np.ones(8, np.float32), np.ones(8, np.float32), 1e-6)


# SwiGLU's relative error: e^-|g| (fast_exp.h, at most 2.6e-7 = 4.4 U) enters the
# numerator and, damped by e / (1 + e) <= 1/2, the denominator; add the rounding of
# 1 + e, the division and two products: under 10 U, checked at 12 U.
SWIGLU_RTOL = 12 * U


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (2, 1536), (8, 1536), (3, 4099)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_swiglu(kernels, shape, n_threads):
    rng = np.random.default_rng(len(shape))
    gate = (4 * rng.standard_normal(shape)).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    poison_heap(4 * gate.size)
    out = _core.swiglu(gate, up, n_threads=n_threads)
    expected = ref.swiglu_ref(gate, up)
    assert out.shape == shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert_nmse(out, expected, 1e-7, f"swiglu {shape}")
    assert_within(out, expected, SWIGLU_RTOL * np.abs(expected) + 1e-30, f"swiglu {shape}")


def test_swiglu_extreme_gates(kernels):
    gate = np.array([-1e4, -1000, -100, -89, -88, -20, -1e-30, 0, 1e-30, 20, 88, 100, 1000, 1e4], np.float32)
    up = np.linspace(-2, 3, gate.size).astype(np.float32)
    out = _core.swiglu(gate, up)
    expected = ref.swiglu_ref(gate, up)
    assert np.isfinite(out).all(), out
    # below g = -87 e^g is held at e^-87 ~ 1.6e-38, where the exact value is
    # smaller still: the 1e-30 absolute slack accepts that
    assert_within(out, expected, SWIGLU_RTOL * np.abs(expected) + 1e-30, "swiglu extremes")
    with pytest.raises(ValueError, match="same shape"):
        _core.swiglu(np.ones(4, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        _core.swiglu(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))


@pytest.mark.parametrize("n", [1, 7, 8, 37, 1000])
def test_round_to_f16_matches_numpy(kernels, n):
    """The KV cache's f16 rounding: numpy's float32 -> float16 (round to nearest even), bit for
    bit, on normal values, ties, subnormals, overflow to infinity and signed zeros; NaN stays NaN."""
    rng = np.random.default_rng(n)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65520.0, 65519.996, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8, 1e-8,
                        1 + 2.0**-11, 1 + 3 * 2.0**-11, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([special, (rng.standard_normal(n) * 10.0 ** rng.integers(-9, 6, n)).astype(np.float32)])[:n]
    got = _core.round_to_f16(x)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


# =============================================================================
# rotary embedding
# =============================================================================

ROPE_SCALINGS = {
    "none": None,
    "default": {"rope_type": "default"},
    "linear4": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    # a short original context moves the smoothing band to wavelengths 16..64
    "llama3-short": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    "llama3-legacy-key": {"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                          "original_max_position_embeddings": 256},
}  # fmt: skip


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (128, 500000.0), (96, 1e6), (80, 10000.0), (16, 10000.0)])
def test_rope_inv_freq(head_dim, theta, scaling):
    sc = ROPE_SCALINGS[scaling]
    got = _core.rope_inv_freq(head_dim, theta, sc)
    expected = ref.rope_inv_freq_ref(head_dim, theta, sc)
    assert got.shape == (head_dim // 2,) and got.dtype == np.float32
    # float32 result of a float32 power: a few ulps
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_rope_inv_freq_llama3_branches_exercised():
    """The llama3 cases above really cover all three branches (kept, smoothed,
    divided), and the smoothed ones lie strictly between the other two."""
    for sc, head_dim, theta in [(ROPE_SCALINGS["llama3"], 128, 500000.0), (ROPE_SCALINGS["llama3-short"], 64, 10000.0)]:
        base = ref.rope_inv_freq_ref(head_dim, theta)
        wavelen = 2 * np.pi / base
        old = sc["original_max_position_embeddings"]
        high, low = wavelen < old / sc["high_freq_factor"], wavelen > old / sc["low_freq_factor"]
        mid = ~high & ~low
        assert high.any() and low.any() and mid.any(), (high.sum(), mid.sum(), low.sum())
        got = _core.rope_inv_freq(head_dim, theta, sc).astype(np.float64)
        np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
        np.testing.assert_allclose(got[low], base[low] / sc["factor"], rtol=1e-6)
        assert (got[mid] < base[mid]).all() and (got[mid] > base[mid] / sc["factor"]).all()


def _transformers_inv_freq(head_dim, theta, sc):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    sc = dict(sc or {"rope_type": "default"})
    kind = sc.pop("rope_type", sc.pop("type", "default"))
    base = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072)
    if int(transformers.__version__.split(".")[0]) >= 5:  # theta lives in rope_parameters
        config = LlamaConfig(**base, rope_parameters={"rope_type": kind, "rope_theta": theta, **sc})
    else:
        scaling = None if kind == "default" else {"rope_type": kind, **sc}
        config = LlamaConfig(**base, rope_theta=theta, rope_scaling=scaling)
    if kind == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return inv_freq.double().numpy()


@pytest.mark.parametrize("scaling", ["none", "linear4", "llama3", "llama3-short"])
@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (128, 500000.0), (96, 1e6)])
def test_rope_inv_freq_matches_transformers(head_dim, theta, scaling):
    expected = _transformers_inv_freq(head_dim, theta, ROPE_SCALINGS[scaling])
    got = _core.rope_inv_freq(head_dim, theta, ROPE_SCALINGS[scaling])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_rope_inv_freq_rejects_bad_parameters():
    with pytest.raises(ValueError, match="rotary dims"):
        _core.rope_inv_freq(63, 10000.0)
    with pytest.raises(ValueError, match="rotary dims"):
        _core.rope_inv_freq(0, 10000.0)
    with pytest.raises(ValueError, match="theta"):
        _core.rope_inv_freq(64, 0.0)
    with pytest.raises(ValueError, match="unsupported"):
        _core.rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        _core.rope_inv_freq(64, 10000.0, {"rope_type": "linear", "factor": 0.0})
    with pytest.raises(ValueError, match="high_freq_factor"):
        _core.rope_inv_freq(
            64, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}
        )


@pytest.mark.parametrize("scaling", ["none", "llama3-short"])
@pytest.mark.parametrize("heads", [1, 9])
@pytest.mark.parametrize("D", [64, 16])
def test_rope(D, heads, scaling):
    theta = 10000.0
    sc = ROPE_SCALINGS[scaling]
    positions = np.array([0, 5, 1000, 37, 1], np.int32)
    x = np.random.default_rng([D, heads]).standard_normal((len(positions), heads, D)).astype(np.float32)
    x_before = x.copy()
    inv_freq = ref.rope_inv_freq_ref(D, theta, sc)
    poison_heap(x.nbytes)
    y = _core.rope(x, positions, theta, sc)
    np.testing.assert_array_equal(x, x_before)  # returns a rotated copy
    expected = ref.rope_ref(x, positions, inv_freq)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y[0], x[0])  # position 0: identity
    assert_nmse(y, expected, 1e-7, f"rope D={D} heads={heads}")
    # Element-wise: the angle pos * inv_freq is formed in float32 from a float32
    # inv_freq (a few ulps off), so it is off by ~4u (1 + angle) rad; cos / sin
    # and the two products add a few u of |a| + |b|.
    half = D // 2
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]
    pair = np.abs(x[..., :half]) + np.abs(x[..., half:])  # [M, heads, half]
    bound = (8 * U * (1 + angle))[:, None, :] * pair
    assert_within(y, expected, np.concatenate([bound, bound], axis=-1), f"rope D={D} heads={heads}")


def test_rope_rotate_half_convention_by_hand():
    """D = 4, one head, position 1, theta chosen so inv_freq = [1, 1/100]:
    pairs are (0, 2) and (1, 3), not interleaved (0, 1), (2, 3)."""
    x = np.array([[[1.0, 0.0, 0.0, 0.0]]], np.float32)
    y = _core.rope(x, np.array([1], np.int32), 10000.0)[0, 0]
    np.testing.assert_allclose(y, [math.cos(1), 0, math.sin(1), 0], atol=1e-7)
    x = np.array([[[0.0, 0.0, 0.0, 1.0]]], np.float32)
    y = _core.rope(x, np.array([100], np.int32), 10000.0)[0, 0]
    np.testing.assert_allclose(y, [0, -math.sin(1), 0, math.cos(1)], atol=1e-6)


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads"):
        _core.rope(np.ones((2, 8), np.float32), np.zeros(2, np.int32), 10000.0)
    with pytest.raises(ValueError, match="positions has shape"):
        _core.rope(np.ones((2, 1, 8), np.float32), np.zeros(3, np.int32), 10000.0)
    with pytest.raises(ValueError, match="head_dim"):
        _core.rope(np.ones((2, 1, 7), np.float32), np.zeros(2, np.int32), 10000.0)


# =============================================================================
# attention
# =============================================================================

# (M, H, Hkv, D, cache_len, pos0)
ATTENTION_CASES = [
    (1, 4, 4, 64, 40, 37),  # decode at position 37, MHA; cache longer than used
    (1, 9, 3, 16, 38, 37),  # decode, GQA 3
    (5, 6, 2, 16, 8, 0),  # prefill from 0, GQA 3
    (7, 8, 2, 64, 20, 9),  # prefill continuing at 9, GQA 4
    (16, 4, 1, 32, 16, 0),  # MQA (H/Hkv = 4), cache exactly full
    (1, 3, 1, 16, 1, 0),  # a single key
    (3, 2, 2, 8, 64, 50),
    # few rows and a long cache: keys split into chunks, merged afterwards (decode path)
    (1, 6, 2, 64, 520, 500),  # 2 rows: 4 chunks with 1 thread, 4 with 2
    (1, 9, 3, 64, 700, 650),  # 3 rows, chunks of unequal length (651 keys)
    (2, 4, 1, 32, 300, 257),  # 2 query rows of different lengths, one kv head
    (1, 2, 2, 16, 130, 129),  # chunk boundary exactly at the end
    # SIMD tiles' ragged edges: head_dim not a multiple of 8 or 32, groups of 5 and 8
    # query heads (score tiles of 4 heads, output tiles of 3), key counts off the 8/16 grid
    (1, 5, 1, 36, 90, 86),
    (2, 10, 2, 6, 23, 19),
    (3, 16, 2, 72, 41, 37),
    (1, 8, 1, 40, 17, 16),
    # AVX-512 tiles' edges: 32-key score tiles of up to 12 heads, 64-dim output tiles of up to 6;
    # 13 and 12 query heads per kv head, head_dim 80 (a 64-dim tile and a 16-dim one) and 24, key
    # counts 33 and 47 (a 32-key tile then a ragged 16-key one), 4 rows of 12 heads (prefill tasks)
    (1, 13, 1, 80, 40, 32),
    (1, 12, 1, 24, 50, 46),
    (4, 24, 2, 64, 160, 120),
    (2, 7, 1, 16, 33, 31),
    # q8_0 blocks: 1, 3 and 4 blocks per head, key counts off the 4-key score tile
    (1, 5, 1, 96, 90, 86),
    (3, 7, 7, 32, 41, 37),
    (2, 9, 3, 128, 23, 19),
    (6, 8, 1, 64, 11, 5),
]
KV_CACHES = ["f32", "f16", "q8_0"]


def cached(kv_cache, k, v):
    """Keys and values as the cache holds them: rounded to f16, or quantized to q8_0 and read back
    (the reference's q8_0, not the kernel's); the attention arithmetic is f32 as before."""
    with np.errstate(over="ignore", invalid="ignore"):  # unread "huge"/NaN rows become inf/NaN
        if kv_cache == "f16":
            return tuple(a.astype(np.float16).astype(np.float32) for a in (k, v))
        if kv_cache == "q8_0":
            return tuple(ref.dequantize_q8_0_ref(ref.quantize_q8_0_ref(a), a.shape) for a in (k, v))
    return k, v


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("unused", ["nan", "huge"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "M{}-H{}-kv{}-D{}-S{}-pos{}".format(*c))
def test_attention(case, unused, n_threads, kv_cache, kernels):
    M, H, Hkv, D, S, pos0 = case
    if kv_cache == "q8_0" and D % 32:
        pytest.skip("q8_0 blocks need head_dim a multiple of 32 (test_attention_q8_0_refuses_ragged_heads)")
    rng = np.random.default_rng(list(case))
    q = rng.standard_normal((M, H, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    # rows past the last query's position are not the kernel's to read
    fill = np.nan if unused == "nan" else 3e38
    k[:, pos0 + M :] = fill
    v[:, pos0 + M :] = fill
    scale = 1 / math.sqrt(D)
    poison_heap(q.nbytes)
    out = _core.attention(q, k, v, pos0, scale, n_threads, kv_cache)
    assert out.shape == (M, H, D) and out.dtype == np.float32
    assert np.isfinite(out).all()
    k, v = cached(kv_cache, k, v)
    expected = ref.attention_ref(q, k, v, pos0, scale)
    what = f"attention {case} threads={n_threads} cache {kv_cache}"
    # float32 dots of D terms and sums of <= pos0+M exponentials: relative
    # errors ~1e-6 at worst, nmse ~1e-12 in practice.
    assert_nmse(out, expected, 1e-10, what)
    # the output is a convex combination of value rows: errors are relative to max |v|
    vmax = np.max(np.abs(v[:, : pos0 + M]))
    assert_within(out, expected, 1e-5 * vmax, what)


# sliding windows (shorter and longer than the keys), soft-capping and ALiBi, alone and together,
# through both the one-chunk (prefill) and the split-keys (decode) paths
SHAPED_CASES = [(1, 4, 4, 64, 40, 37), (1, 9, 3, 16, 38, 37), (7, 8, 2, 64, 20, 9), (1, 6, 2, 64, 520, 500),
                (2, 4, 1, 32, 300, 257), (3, 16, 2, 72, 41, 37), (1, 5, 1, 36, 90, 86), (2, 9, 3, 96, 43, 41)]
SHAPINGS = {"window5": dict(window=5), "window64": dict(window=64), "softcap": dict(softcap=2.0),
            "alibi": dict(alibi=True), "all": dict(window=24, softcap=3.0, alibi=True)}


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shaping", list(SHAPINGS))
@pytest.mark.parametrize("case", SHAPED_CASES, ids=lambda c: "M{}-H{}-kv{}-D{}-S{}-pos{}".format(*c))
def test_attention_shaped(case, shaping, n_threads, kv_cache, kernels):
    M, H, Hkv, D, S, pos0 = case
    if kv_cache == "q8_0" and D % 32:
        pytest.skip("q8_0 blocks need head_dim a multiple of 32")
    rng = np.random.default_rng(list(case) + [len(shaping)])
    q = (3 * rng.standard_normal((M, H, D))).astype(np.float32)  # large scores: the softcap matters
    k = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    k[:, pos0 + M:] = v[:, pos0 + M:] = np.nan
    options = dict(SHAPINGS[shaping])
    if options.pop("alibi", False):
        options["alibi"] = ref.alibi_slopes_ref(H).astype(np.float32)
    scale = 1 / math.sqrt(D)
    out = _core.attention(q, k, v, pos0, scale, n_threads, kv_cache, **options)
    assert np.isfinite(out).all()
    k, v = cached(kv_cache, k, v)
    expected = ref.attention_ref(q, k, v, pos0, scale, **options)
    what = f"attention {case} {shaping} threads={n_threads} cache {kv_cache}"
    assert_nmse(out, expected, 1e-10, what)
    assert_within(out, expected, 1e-5 * np.max(np.abs(v[:, : pos0 + M])), what)


def test_attention_q8_0_refuses_ragged_heads():
    q = np.ones((1, 2, 48), np.float32)
    kv = np.ones((1, 4, 48), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.attention(q, kv, kv, 3, 1.0, 1, "q8_0")
    with pytest.raises(ValueError, match="'f16', 'f32' or 'q8_0'"):
        _core.attention(q, kv, kv, 3, 1.0, 1, "q8")


@pytest.mark.parametrize("n", [32, 64, 32 * 37])
def test_quantize_q8_0_matches_reference(n):
    """The KV cache's q8_0 blocks equal the numpy reference (llama.cpp's quantize_row_q8_0_ref) bit
    for bit: random blocks over 15 decades, an all-zero block, constant blocks, codes on exact
    halves (+-0.5, 2.5: away from zero), f16 scale overflow and underflow; and every value read
    back lies within half a step (plus the scale's f16 rounding) of the input."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-9, 6, n // 32).repeat(32)).astype(np.float32)
    x[:32] = 0.0
    if n >= 64:
        x[32:64] = np.float32(-3.25)
    if n > 64:
        x[64:96] = np.arange(-16, 16, dtype=np.float32) * np.float32(0.5)
        x[64] = np.float32(127 * 2.0)  # d = 2: codes of +-0.5 and 2.5 sit on halves
        x[96:128] = np.linspace(-1e6, 1e6, 32, dtype=np.float32)  # d overflows f16
        x[128:160] = np.float32(1e-9)  # d underflows to an f16 subnormal / zero
    got = _core.quantize_q8_0(x)
    want = ref.quantize_q8_0_ref(x).reshape(-1)
    assert got.dtype == np.uint8 and got.shape == (n // 32 * 34,)
    np.testing.assert_array_equal(got, want)
    blocks = got.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    finite = np.isfinite(d) & (d > 0)
    back = ref.dequantize_q8_0_ref(got, (n // 32, 32))
    amax = np.abs(x.reshape(-1, 32)).max(axis=1).astype(np.float64)
    # a step of amax / 127 read back with d rounded to f16 (relative 2^-11), |code| <= 127
    bound = amax / 127 * 0.5 + 127 * np.abs(d - amax / 127) + 1e-30
    err = np.abs(back - x.reshape(-1, 32)).max(axis=1)
    assert (err[finite] <= bound[finite] * (1 + 1e-6)).all()
    assert (blocks[0] == 0).all()  # an all-zero block: d = 0 and codes 0


def test_quantize_q8_0_rejects_ragged_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.quantize_q8_0(np.ones(33, np.float32))


def test_attention_window_hides_old_keys():
    """With a window of 3, the value of a key 3 positions back never reaches the output."""
    q = np.ones((1, 1, 8), np.float32)
    k = np.zeros((1, 10, 8), np.float32)
    v = np.zeros((1, 10, 8), np.float32)
    v[0, 6] = 1000.0  # position 6 is outside the window of a query at 9 (sees 7, 8, 9)
    out = _core.attention(q, k, v, 9, 1.0, 1, "f32", window=3)
    assert np.abs(out).max() == 0.0
    out = _core.attention(q, k, v, 9, 1.0, 1, "f32", window=4)
    assert out.max() == pytest.approx(250.0)


def test_alibi_slopes_match_transformers():
    torch = pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for heads in (1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 48, 112):
        mask = torch.ones(1, 2)
        alibi = bloom.build_alibi_tensor(mask, heads, torch.float32)  # [heads, 1, 2]: slope * position
        expected = alibi[:, 0, 1].numpy()
        np.testing.assert_allclose(_core.alibi_slopes(heads), expected, rtol=1e-6)
        np.testing.assert_allclose(ref.alibi_slopes_ref(heads), expected, rtol=1e-6)


@pytest.mark.parametrize("M,D", [(1, 8), (3, 64), (5, 576), (2, 100), (4, 1)])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_layernorm(M, D, magnitude):
    rng = np.random.default_rng(M * D)
    x = (magnitude * (rng.standard_normal((M, D)) + 2.0)).astype(np.float32)  # an offset: centring matters
    w = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    out = _core.layernorm(x, w, b, 1e-5)
    assert_nmse(out, ref.layernorm_ref(x, w, b, 1e-5), 1e-11, f"layernorm {M}x{D}")


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("n", [1, 7, 4096, 10001])
def test_ffn_activation(activation, gated, n, kernels):
    rng = np.random.default_rng(n)
    gate = (4 * rng.standard_normal(n)).astype(np.float32)
    up = rng.standard_normal(n).astype(np.float32)
    if gated:
        out = _core.ffn_activation(activation, gate, up, 2)
        expected = ref.activation_ref(activation, gate) * up
    else:
        out = _core.ffn_activation(activation, None, gate, 2)
        expected = ref.activation_ref(activation, gate)
    # the SIMD SiLU uses a fast exp (relative error ~1e-6); the others are libm's
    assert_within(out, expected, 2e-6 * np.abs(expected).max() + 1e-30, f"{activation} gated={gated} n={n}")


def test_ffn_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown activation"):
        _core.ffn_activation("swish2", None, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        _core.ffn_activation("relu", np.ones(3, np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("rotary_dim", [8, 16, 24])
def test_rope_partial(rotary_dim):
    rng = np.random.default_rng(rotary_dim)
    x = rng.standard_normal((5, 3, 32)).astype(np.float32)
    positions = np.array([0, 1, 7, 100, 4000])
    out = _core.rope(x, positions, 10000.0, None, rotary_dim)
    expected = ref.rope_ref(x, positions, ref.rope_inv_freq_ref(rotary_dim, 10000.0))
    assert_nmse(out, expected, 1e-9, f"rope rotary_dim={rotary_dim}")  # f32 angles at position 4000
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])  # passed through untouched


def test_attention_is_causal_and_uses_its_kv_head():
    """Query m must ignore keys after its own position; head h reads kv head
    h // (H / Hkv) (grouped, not h % Hkv)."""
    M, H, Hkv, D, S = 3, 4, 2, 8, 3
    q = np.zeros((M, H, D), np.float32)  # equal scores: plain average of the visible values
    k = np.zeros((Hkv, S, D), np.float32)
    v = np.zeros((Hkv, S, D), np.float32)
    v[0, :, 0] = [1.0, 2.0, 6.0]
    v[1, :, 0] = [10.0, 20.0, 60.0]
    out = _core.attention(q, k, v, 0, 1.0, 1)[:, :, 0]
    expected_kv0 = np.array([1.0, 1.5, 3.0])
    np.testing.assert_allclose(out[:, 0], expected_kv0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], expected_kv0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], 10 * expected_kv0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 3], 10 * expected_kv0, rtol=1e-6)


def test_attention_scale_and_large_scores():
    """Scores of several hundred must not overflow exp (max is subtracted)."""
    M, H, D, S = 2, 2, 16, 10
    rng = np.random.default_rng(5)
    q = (30 * rng.standard_normal((M, H, D))).astype(np.float32)
    k = (30 * rng.standard_normal((1, S, D))).astype(np.float32)
    v = rng.standard_normal((1, S, D)).astype(np.float32)
    for scale in (0.3, 1.0 / 4):
        out = _core.attention(q, k, v, 8, scale, 1)
        assert np.isfinite(out).all()
        assert_nmse(out, ref.attention_ref(q, k, v, 8, scale), 1e-10, f"scale {scale}")


def test_attention_rejects_bad_input():
    q = np.ones((2, 4, 8), np.float32)
    kv = np.ones((2, 10, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        _core.attention(np.ones((2, 3, 8), np.float32), kv, kv, 0, 1.0)
    with pytest.raises(ValueError, match="cache length"):
        _core.attention(q, kv, kv, 9, 1.0)
    with pytest.raises(ValueError, match="cache length"):
        _core.attention(q, kv, kv, -1, 1.0)
    with pytest.raises(ValueError, match="v_cache has shape"):
        _core.attention(q, kv, np.ones((2, 9, 8), np.float32), 0, 1.0)
    with pytest.raises(ValueError, match="k_cache has shape"):
        _core.attention(q, np.ones((2, 10, 7), np.float32), kv, 0, 1.0)
    with pytest.raises(ValueError):
        _core.attention(q[0], kv, kv, 0, 1.0)
    with pytest.raises(ValueError, match="n_threads"):
        _core.attention(q, kv, kv, 0, 1.0, -1)
    with pytest.raises(ValueError, match="kv_cache"):
        _core.attention(q, kv, kv, 0, 1.0, 1, "bf16")


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
def test_thread_pool_runs_every_task_once_under_stress(n_threads):
    """Thousands of tiny jobs back to back (the job slots reused over and over), more threads than
    cores (workers descheduled at any point), and tasks that stall mid-job."""
    assert _core.thread_pool_stress(n_threads, jobs=3000, max_tasks=48, stall_every=97) == 0
    assert _core.thread_pool_stress(n_threads, jobs=3000, max_tasks=3) == 0
