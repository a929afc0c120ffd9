"""GPTQ: error-compensating rounding on pyllm's group grids (Frantar et al., 2022).

For W [rows, cols] and the Hessian H = mean x x^T of its inputs [cols, cols], columns are rounded
left to right; the rounding error of column j, divided by U[j, j], is spread over the columns not
yet rounded in proportion to row j of U, the upper Cholesky factor of H^-1. This minimises the
layer's output error ||(W - Q) X||^2 greedily instead of the weight error.

Group grids: when column j starts a group, that group's scale (and min) are chosen by the scale
search (pyllm.quant.search_group_params) on the group's current, already error-updated values,
weighted by diag(H); every column of the group is then rounded on that grid. The stored layout is
exactly pyllm's int8 / int4_sym / int4_asym / int4_asym_dq. For int4_asym_dq the grid found is
moved to the nearest one its 8-bit codes can hold, on steps fixed per row before the columns are
rounded (from the scale search on the original weights: pyllm.quant.dq_steps).

Columns are processed in blocks of BLOCK_COLUMNS with the error of a block applied to the later
columns in one matrix product (the "lazy batch" form), and inside a block the same again per group:
each column updates only the rest of its group, each group the rest of its block. That gives the
same result as updating every later column after each column, which is what
tests/test_quant_quality.py checks against a column-by-column loop.
"""

from __future__ import annotations

import numpy as np

from ..quant import (CODE_OFFSET, CODE_RANGE, PackedWeight, check_group_size, dq_codes, dq_params, grid_format,
                     pack_int4, quantize, search_group_params)
from .workers import forked_map, shared

BLOCK_COLUMNS = 128
# Fraction of mean(diag(H)) added to H's diagonal. Chosen on held-out text, not on the calibration
# text (docs/QUALITY.md, 2026-11-30): 0.1 against GPTQ's usual 0.01 lowered the default int4 file's
# mean change over python-docs, english-prose and chinese-prose (8 windows each) on SmolLM2
# (+5.13% -> +4.61%) and its rotated twins (seed 0: +11.60% -> +10.28%, seed 1: +11.07% -> +10.55%);
# the worst domain fell on two of the three (seed 1's Chinese rose, +13.60% -> +16.35%);
# 0.03 was not better (mean over the three models +8.96% against +8.48%), 1.0 was worse on SmolLM2
# (+5.18%). A stronger damping pulls the fit towards plain rounding, i.e. fits the calibration
# text's correlations less.
DAMPING = 0.1


def inverse_hessian_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h [cols, cols] -> (U f64 upper Cholesky factor of (H + damping)^-1, i.e. H^-1 = U^T U [cols, cols],
    dead columns mask [cols]).

    One Cholesky factorisation of the reversed matrix: J H J = L L^T (J reverses the order) gives
    H = V V^T with V = J L J upper triangular, so H^-1 = V^-T V^-1 and U = V^-1 = J L^-1 J.
    Dead columns (no input energy) get a unit diagonal; their weights are irrelevant to the output.
    Float64: in float32 the factor differs in the 7th digit, enough to flip ~0.1% of the codes and
    move perplexity by +-0.2% (SmolLM2, 8 windows per domain)."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(lower_triangular_inverse(lower)[::-1, ::-1]), dead


def lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """L^-1 of a lower triangular L [n, n] by blocks: inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]],
    so that the n^3/3 multiply-adds are matrix products (numpy has no trtri; np.linalg.inv spends
    8/3 n^3 on a general LU solve)."""
    n = lower.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    half = n // 2
    a_inv = lower_triangular_inverse(lower[:half, :half])
    d_inv = lower_triangular_inverse(lower[half:, half:])
    out = np.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = d_inv
    out[half:, :half] = -(d_inv @ (lower[half:, :half] @ a_inv))
    return out


def quantize_column(w: np.ndarray, fmt: str, scale: np.ndarray, min_: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """w f32 [rows] on the grid scale (, min) f32 [rows] -> (codes [rows], dequantized f32 [rows])."""
    lo, hi = CODE_RANGE[fmt]
    shifted = w if min_ is None else w - min_
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale != 0, np.rint(shifted / np.where(scale != 0, scale, 1)), 0) + CODE_OFFSET[fmt]
    np.clip(q, lo, hi, out=q)
    deq = (q - CODE_OFFSET[fmt]) * scale
    if min_ is not None:
        deq += min_
    return q, deq


def gptq_quantize(w: np.ndarray, h: np.ndarray, fmt: str, group_size: int, factor=None) -> PackedWeight:
    """GPTQ of w f32 [rows, cols] with Hessian h [cols, cols] into `fmt` (int8, int4_sym, int4_asym, int4_asym_dq).

    factor: inverse_hessian_factor(h) when already computed (matrices sharing an input).
    Float64 error propagation (see inverse_hessian_factor), f32 rounding; the block's working columns are kept
    column-major so that each column's update of the columns after it is one contiguous rank-1 update."""
    check_group_size(fmt, group_size)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian is {h.shape}, expected {(cols, cols)}")
    u, dead = factor if factor is not None else inverse_hessian_factor(h)
    importance = np.diag(h).astype(np.float32)
    work = np.array(w, dtype=np.float64)
    work[:, dead] = 0.0
    n_groups = -(-cols // group_size)
    codes = np.zeros((rows, cols), dtype=np.int16)
    scales = np.zeros((rows, n_groups), dtype=np.float16)
    grid = grid_format(fmt)
    mins = np.zeros((rows, n_groups), dtype=np.float16) if grid == "int4_asym" else None
    steps = None
    if fmt == "int4_asym_dq":  # the rows' code steps, from the grids of the weights before any update
        steps = quantize(w, fmt, group_size, search=True, importance=importance).steps
        scale_codes = np.zeros((rows, n_groups), dtype=np.uint8)
        min_codes = np.zeros((rows, n_groups), dtype=np.int8)
    block = max(BLOCK_COLUMNS // group_size, 1) * group_size  # groups never straddle blocks
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        cols_t = np.array(work[:, b0:b1].T)  # [block, rows]: column j of the block is row j - b0
        errors_t = np.zeros((b1 - b0, rows))
        for g0 in range(b0, b1, group_size):
            g1, gi = min(b1, g0 + group_size), g0 // group_size
            group = cols_t[g0 - b0:g1 - b0].T.astype(np.float32)[:, None, :]  # [rows, 1, size]
            s, m = search_group_params(group, np.ones(group.shape, bool), grid, importance[None, None, g0:g1])
            if steps is not None:
                s_codes, m_codes = dq_codes(s, m, steps)
                scale_codes[:, gi], min_codes[:, gi] = s_codes[:, 0], m_codes[:, 0]
                s, m = dq_params(s_codes, m_codes, steps)
            scales[:, gi] = s[:, 0]
            scale = s[:, 0].astype(np.float32)
            min_ = None
            if mins is not None:
                mins[:, gi] = m[:, 0]
                min_ = m[:, 0].astype(np.float32)
            for j in range(g0, g1):  # rank-1 updates within the group only
                column = cols_t[j - b0]
                q, deq = quantize_column(column.astype(np.float32), fmt, scale, min_)  # rounding in f32
                codes[:, j] = q
                err = (column - deq) / u[j, j]
                cols_t[j - b0 + 1:g1 - b0] -= u[j, j + 1:g1, None] * err
                errors_t[j - b0] = err
            # the group's errors reach the rest of the block in one product
            cols_t[g1 - b0:] -= u[g0:g1, g1:b1].T @ errors_t[g0 - b0:g1 - b0]
        work[:, b1:] -= errors_t.T @ u[b0:b1, b1:]
    if fmt == "int8":
        return PackedWeight(fmt, rows, cols, group_size, codes.astype(np.int8), scales)
    stored = (scales, mins) if steps is None else (scale_codes, min_codes, steps)
    return PackedWeight(fmt, rows, cols, group_size, pack_int4(codes.astype(np.uint8)), *stored)


def _gptq_task(bases: list[str]) -> dict:
    """GPTQ of matrices sharing one input (q/k/v or gate/up share one inverse Hessian factor)."""
    job = shared()
    h = job["calibration"].input_hessian(bases[0])  # f64 [cols, cols]
    factor = inverse_hessian_factor(h)
    return {base: gptq_quantize(job["load"](base), h, *job["formats"][base], factor) for base in bases}


def gptq_model(load, calibration, formats: dict[str, tuple[str, int]], progress: bool = True, log=None,
               processes: int | None = None) -> dict:
    """GPTQ of every matrix in `formats` (base -> (fmt, group)); load(base) -> f32 [rows, cols];
    calibration.input_hessian(base) -> [cols, cols]. Returns base -> PackedWeight.

    One task per input (its matrices share the inverse Hessian factor), run in `processes` forked
    workers (pyllm/convert/workers.py; default: the CPU count) that inherit the loaded source and
    the Hessians."""
    from ..progress import progress_bar

    by_input: dict[str, list[str]] = {}
    for base in formats:
        by_input.setdefault(calibration.input_name(base), []).append(base)
    done: dict = {}
    bar = progress_bar(len(formats), "GPTQ", "matrix", progress, log)
    try:
        for result in forked_map(_gptq_task, by_input.values(),
                                 dict(load=load, calibration=calibration, formats=formats), processes):
            done.update(result)
            bar.update(len(result))
    finally:
        bar.close()
    return {base: done[base] for base in formats}
