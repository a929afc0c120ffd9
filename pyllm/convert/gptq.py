"""GPTQ: error-compensating rounding on pyllm's group grids (Frantar et al., 2022).

For W [rows, cols] and the Hessian H = mean x x^T of its inputs [cols, cols], columns are rounded
left to right; the rounding error of column j, divided by U[j, j], is spread over the columns not
yet rounded in proportion to row j of U, the upper Cholesky factor of H^-1. This minimises the
layer's output error ||(W - Q) X||^2 greedily instead of the weight error.

Group grids: when column j starts a group, that group's scale (and min) are chosen by the scale
search (pyllm.quant.search_group_params) on the group's current, already error-updated values,
weighted by diag(H); every column of the group is then rounded on that grid. The stored layout is
exactly pyllm's int8 / int4_sym / int4_asym.

Columns are processed in blocks of BLOCK_COLUMNS with the error of a block applied to the later
columns in one matrix product (the "lazy batch" form); that gives the same result as updating after
every column, which is what tests/test_quant_quality.py checks against a column-by-column loop.
"""

from __future__ import annotations

import numpy as np

from ..quant import (CODE_OFFSET, CODE_RANGE, PackedWeight, check_group_size, pack_int4, search_group_params)

BLOCK_COLUMNS = 128
DAMPING = 0.01  # fraction of mean(diag(H)) added to the diagonal


def inverse_hessian_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h [cols, cols] -> (U upper Cholesky factor of (H + damping)^-1, i.e. H^-1 = U^T U [cols, cols],
    dead columns mask [cols]).

    One Cholesky factorisation of the reversed matrix: J H J = L L^T (J reverses the order) gives
    H = V V^T with V = J L J upper triangular, so H^-1 = V^-T V^-1 and U = V^-1 = J L^-1 J.
    Dead columns (no input energy) get a unit diagonal; their weights are irrelevant to the output."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1]), dead


def quantize_column(w: np.ndarray, fmt: str, scale: np.ndarray, min_: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """w f32 [rows] on the grid scale (, min) f16 [rows] -> (codes [rows], dequantized f32 [rows])."""
    lo, hi = CODE_RANGE[fmt]
    s = scale.astype(np.float32)
    shifted = w if min_ is None else w - min_.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s != 0, np.rint(shifted / np.where(s != 0, s, 1)), 0) + CODE_OFFSET[fmt]
    q = np.clip(q, lo, hi)
    deq = (q - CODE_OFFSET[fmt]).astype(np.float32) * s
    if min_ is not None:
        deq = deq + min_.astype(np.float32)
    return q, deq


def gptq_quantize(w: np.ndarray, h: np.ndarray, fmt: str, group_size: int, factor=None) -> PackedWeight:
    """GPTQ of w f32 [rows, cols] with Hessian h [cols, cols] into `fmt` (int8, int4_sym, int4_asym).

    factor: inverse_hessian_factor(h) when already computed (matrices sharing an input)."""
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
    mins = np.zeros((rows, n_groups), dtype=np.float16) if fmt == "int4_asym" else None
    block = max(BLOCK_COLUMNS // group_size, 1) * group_size  # groups never straddle blocks
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        errors = np.zeros((rows, b1 - b0))
        for j in range(b0, b1):
            if (j - b0) % group_size == 0:
                gi, g1 = j // group_size, min(cols, j + group_size)
                group = work[:, j:g1].astype(np.float32)[:, None, :]
                s, m = search_group_params(group, np.ones(group.shape, bool), fmt, importance[None, None, j:g1])
                scales[:, gi] = s[:, 0]
                if mins is not None:
                    mins[:, gi] = m[:, 0]
            gi = j // group_size
            q, deq = quantize_column(work[:, j].astype(np.float32), fmt, scales[:, gi],
                                     None if mins is None else mins[:, gi])
            codes[:, j] = q
            err = (work[:, j] - deq) / u[j, j]
            work[:, j:b1] -= np.outer(err, u[j, j:b1])
            errors[:, j - b0] = err
        work[:, b1:] -= errors @ u[b0:b1, b1:]
    if fmt == "int8":
        return PackedWeight(fmt, rows, cols, group_size, codes.astype(np.int8), scales)
    return PackedWeight(fmt, rows, cols, group_size, pack_int4(codes.astype(np.uint8)), scales, mins)


def gptq_model(load, calibration, formats: dict[str, tuple[str, int]], progress: bool = True, log=None) -> dict:
    """GPTQ of every matrix in `formats` (base -> (fmt, group)); load(base) -> f32 [rows, cols];
    calibration.input_hessian(base) -> [cols, cols]. Returns base -> PackedWeight."""
    import sys

    from tqdm import tqdm

    done, factors = {}, {}
    for base in tqdm(formats, desc="GPTQ", unit="matrix", disable=not progress, file=log or sys.stderr):
        fmt, group = formats[base]
        h = calibration.input_hessian(base)
        key = calibration.input_name(base)
        if key not in factors:  # q/k/v and gate/up share their input
            factors = {key: inverse_hessian_factor(h)}
        done[base] = gptq_quantize(load(base), h, fmt, group, factors[key])
    return done
