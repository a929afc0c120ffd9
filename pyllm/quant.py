"""Weight quantizers and dequantizers (numpy): the device-independent formats of docs/FORMAT.md.

A weight W is a float matrix [rows, cols] (rows = output features, cols = input
features). Quantized formats cut every row into groups of `group_size`
consecutive values (the last group may be shorter) and store one f16 scale
(and, for int4_asym, one f16 min) per group:

  int8       q int8 [rows, cols]                 value = q * scale
  int4_sym   q 0..15, packed [rows, Kp / 2]      value = (q - 8) * scale
  int4_asym  q 0..15, packed [rows, Kp / 2]      value = q * scale + min
  int4_asym_dq  as int4_asym, but the scales and mins are themselves 8-bit codes of one f32 step
             per row ("double quantization", as QLoRA calls it; llama.cpp's k-quants do the same
             with 6-bit codes per 256 values): scale = f16(scale_code * steps[row, 0]),
             min = f16(min_code * steps[row, 1]), scale_code u8 0..255, min_code i8 -127..127.
             At group 32: 4.5 bits per weight plus 64 bits per row, against int4_asym's 5.0.

Kp is cols rounded up to 32. Int4 packing works on chunks of 32 values: byte i
of a chunk holds value i in its low nibble and value i + 16 in its high nibble.
Padding nibbles are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_FORMATS = ("int8", "int4_sym", "int4_asym", "int4_asym_dq")
FORMATS = FLOAT_FORMATS + QUANT_FORMATS
GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class PackedWeight:
    """A weight in one of FORMATS. Arrays are exactly what the file stores."""

    format: str
    rows: int
    cols: int
    group_size: int  # 0 for float formats
    data: np.ndarray  # f32 / uint16 (f16, bf16 bits) / int8 / uint8 (int4), see module doc
    scales: np.ndarray | None = None  # float16 [rows, n_groups]
    mins: np.ndarray | None = None  # float16 [rows, n_groups], int4_asym only (int4_asym_dq: i8 codes)
    steps: np.ndarray | None = None  # f32 [rows, 2], int4_asym_dq only: the steps of the scale and min codes

    @property
    def n_groups(self) -> int:
        return -(-self.cols // self.group_size) if self.group_size else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scales, self.mins, self.steps) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.rows * self.cols)


def packed_shapes(fmt: str, rows: int, cols: int, group_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Safetensors dtype and shape of each stored array ('weight', 'scales', 'mins')."""
    n_groups = -(-cols // group_size) if group_size else 0
    padded = -(-cols // BLOCK) * BLOCK
    if fmt == "f32":
        return {"weight": ("F32", (rows, cols))}
    if fmt in ("f16", "bf16"):
        return {"weight": ("F16" if fmt == "f16" else "BF16", (rows, cols))}
    if fmt == "int8":
        return {"weight": ("I8", (rows, cols)), "scales": ("F16", (rows, n_groups))}
    if fmt == "int4_sym":
        return {"weight": ("U8", (rows, padded // 2)), "scales": ("F16", (rows, n_groups))}
    if fmt == "int4_asym":
        return {
            "weight": ("U8", (rows, padded // 2)),
            "scales": ("F16", (rows, n_groups)),
            "mins": ("F16", (rows, n_groups)),
        }
    if fmt == "int4_asym_dq":
        return {
            "weight": ("U8", (rows, padded // 2)),
            "scales": ("U8", (rows, n_groups)),
            "mins": ("I8", (rows, n_groups)),
            "steps": ("F32", (rows, 2)),
        }
    raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")


def layout_name(fmt: str, group: int) -> str:
    """A matrix's layout as reports name it: "int4_asym g64", or "f16" for a format without groups."""
    return f"{fmt} g{group}" if group else fmt


MAX_GROUP_SIZE = 4096  # values per scale; past a row's width a larger group changes nothing but the work


def check_group_size(fmt: str, group_size: int) -> None:
    """ValueError unless group_size is a multiple of 32 in 32 .. MAX_GROUP_SIZE (for a quantized fmt)."""
    if fmt in QUANT_FORMATS and not (0 < group_size <= MAX_GROUP_SIZE and group_size % BLOCK == 0):
        raise ValueError(f"group size {group_size} is not supported: use a multiple of 32 up to {MAX_GROUP_SIZE} "
                         f"(the usual: {', '.join(map(str, GROUP_SIZES))})")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Rounds to nearest even bfloat16; returns the raw uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _grouped(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w [rows, cols] -> (values [rows, n_groups, group_size] padded with NaN, valid mask)."""
    rows, cols = w.shape
    n_groups = -(-cols // group_size)
    padded = np.full((rows, n_groups * group_size), np.nan, dtype=np.float32)
    padded[:, :cols] = w
    g = padded.reshape(rows, n_groups, group_size)
    return g, ~np.isnan(g)


def _safe_divide(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x / scale with zero (or subnormal-free) scales giving 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(scale != 0, x / np.where(scale != 0, scale, 1), 0)
    return np.nan_to_num(out, nan=0.0)


F16_MAX = 65504.0


def _check_f16_range(values: np.ndarray, what: str) -> None:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > F16_MAX:
        raise ValueError(f"{what} reach {peak:.3g}, beyond the float16 range ({F16_MAX:g}): "
                         "this weight cannot be stored in this format")


def _to_f16(values: np.ndarray, what: str) -> np.ndarray:
    _check_f16_range(values, what)
    return values.astype(np.float16)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q uint8 [rows, cols] in 0..15 -> packed uint8 [rows, Kp / 2]."""
    rows, cols = q.shape
    padded = -(-cols // BLOCK) * BLOCK
    full = np.zeros((rows, padded), dtype=np.uint8)
    full[:, :cols] = q
    chunks = full.reshape(rows, padded // BLOCK, BLOCK)
    packed = chunks[:, :, : BLOCK // 2] | (chunks[:, :, BLOCK // 2 :] << 4)
    return np.ascontiguousarray(packed.reshape(rows, padded // 2))


def unpack_int4(packed: np.ndarray, cols: int) -> np.ndarray:
    """packed uint8 [rows, Kp / 2] -> q uint8 [rows, cols]."""
    rows = packed.shape[0]
    chunks = packed.reshape(rows, -1, BLOCK // 2)
    q = np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(rows, -1)
    return q[:, :cols]


# Rows are quantized in slices of about this many values, so the temporaries of
# the quantizer stay a small multiple of 16 MB whatever the matrix size.
SLICE_VALUES = 1 << 22


def row_slices(rows: int, cols: int):
    step = max(1, SLICE_VALUES // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def quantize(w: np.ndarray, fmt: str, group_size: int = 32, search: bool = False,
             importance: np.ndarray | None = None) -> PackedWeight:
    """Quantization of w f32 [rows, cols] into `fmt` (slice by slice of rows).

    search False: round-to-nearest with min/max scales. search True: every group's scale (and
    min) minimise the squared error, weighted per input column by importance f32 [cols] when
    given (see search_group_params); never a larger error than min/max."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape != (w.shape[1],) or not np.isfinite(importance).all() or (importance < 0).any():
            raise ValueError(f"importance must be {w.shape[1]} finite non-negative values")
    slices = row_slices(*w.shape)
    if len(slices) == 1:
        return _quantize_slice(w, fmt, group_size, search, importance)
    parts = [_quantize_slice(w[r0:r1], fmt, group_size, search, importance) for r0, r1 in slices]
    join = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                         else np.concatenate([getattr(p, name) for p in parts]))
    return PackedWeight(fmt, w.shape[0], w.shape[1], parts[0].group_size, join("data"), join("scales"), join("mins"),
                        join("steps"))


def _quantize_slice(w: np.ndarray, fmt: str, group_size: int, search: bool = False,
                    importance: np.ndarray | None = None) -> PackedWeight:
    rows, cols = w.shape
    if fmt == "f32":
        return PackedWeight(fmt, rows, cols, 0, w)
    if fmt == "f16":
        _check_f16_range(w, "weights")
        return PackedWeight(fmt, rows, cols, 0, w.astype(np.float16).view(np.uint16))
    if fmt == "bf16":
        return PackedWeight(fmt, rows, cols, 0, f32_to_bf16_bits(w))
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_group_size(fmt, group_size)
    g, valid = _grouped(w, group_size)
    if search:
        weights = None if importance is None else _grouped(importance[None, :], group_size)[0]
        scales, mins = search_group_params(g, valid, grid_format(fmt), weights)
    else:
        scales, mins = minmax_group_params(g, valid, grid_format(fmt))
    stored = (scales, mins)
    if fmt == "int4_asym_dq":  # round on the grid the codes hold, store the codes
        steps = dq_steps(scales, mins)
        scale_codes, min_codes = dq_codes(scales, mins, steps)
        scales, mins = dq_params(scale_codes, min_codes, steps)
        stored = (scale_codes, min_codes, steps)
    q = group_codes(g, valid, fmt, scales, mins).reshape(rows, -1)[:, :cols]
    if fmt == "int8":
        return PackedWeight(fmt, rows, cols, group_size, np.ascontiguousarray(q), scales)
    return PackedWeight(fmt, rows, cols, group_size, pack_int4(q), *stored)


# Integer range of each format: value = (code - offset) * scale (+ min for int4_asym)
CODE_RANGE = {"int8": (-127, 127), "int4_sym": (0, 15), "int4_asym": (0, 15), "int4_asym_dq": (0, 15)}
CODE_OFFSET = {"int8": 0, "int4_sym": 8, "int4_asym": 0, "int4_asym_dq": 0}


def grid_format(fmt: str) -> str:
    """The format whose (scale, min) grid `fmt` rounds on: int4_asym_dq's is int4_asym's, coded after."""
    return "int4_asym" if fmt == "int4_asym_dq" else fmt


def dq_steps(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """f16 scales, mins [rows, n_groups] -> f32 steps [rows, 2]: the largest scale is code 255, the
    largest |min| code 127 (a row of zeros: step 0)."""
    top_scale = np.max(scales.astype(np.float32), axis=1)
    top_min = np.max(np.abs(mins.astype(np.float32)), axis=1)
    return np.stack([top_scale / 255.0, top_min / 127.0], axis=1).astype(np.float32)


def dq_codes(scales: np.ndarray, mins: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes (u8 scale codes, i8 min codes) [rows, n_groups] of f16 scales, mins on the rows' steps
    f32 [rows, 2]; a positive scale keeps a code of at least 1."""
    s_step, m_step = steps[:, :1], steps[:, 1:]
    s = scales.astype(np.float32)
    scale_codes = np.clip(np.rint(_safe_divide(s, s_step)), 0, 255)
    scale_codes = np.where(s > 0, np.maximum(scale_codes, 1), 0).astype(np.uint8)
    min_codes = np.clip(np.rint(_safe_divide(mins.astype(np.float32), m_step)), -127, 127).astype(np.int8)
    return scale_codes, min_codes


def dq_params(scale_codes: np.ndarray, min_codes: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The f16 scales and mins [rows, n_groups] int4_asym_dq's codes stand for: f16(code * step), rounded
    to nearest even as the engines expand them at load (csrc/engine/cpu_engine.cpp, bind_linear)."""
    steps = np.asarray(steps, dtype=np.float32)
    scales = (scale_codes.astype(np.float32) * steps[:, :1]).astype(np.float16)
    mins = (min_codes.astype(np.float32) * steps[:, 1:]).astype(np.float16)
    return scales, mins


def minmax_group_params(g: np.ndarray, valid: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest scales: g f32 [rows, n_groups, size] (NaN padded) -> f16 scales (, mins) [rows, n_groups].

    int8: absmax / 127; int4_sym: the value of largest magnitude maps to code 0 (-8 * scale);
    int4_asym: min and max map to codes 0 and 15."""
    if fmt == "int8":
        return _to_f16(np.nanmax(np.abs(g), axis=2) / 127.0, "int8 scales"), None
    if fmt == "int4_sym":
        idx = np.nanargmax(np.abs(np.where(valid, g, 0)), axis=2)
        extreme = np.take_along_axis(g, idx[..., None], axis=2)[..., 0]
        return _to_f16(extreme / -8.0, "int4 scales"), None
    lo, hi = np.nanmin(g, axis=2), np.nanmax(g, axis=2)
    return _to_f16((hi - lo) / 15.0, "int4 scales"), _to_f16(lo, "int4 mins")


def group_codes(g: np.ndarray, valid: np.ndarray, fmt: str, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """Nearest codes of g f32 [rows, n_groups, size] on the grid of f16 scales (, mins) [rows, n_groups]."""
    lo, hi = CODE_RANGE[fmt]
    s = scales.astype(np.float32)[..., None]
    shifted = g if mins is None else g - mins.astype(np.float32)[..., None]
    q = np.clip(np.rint(_safe_divide(shifted, s)) + CODE_OFFSET[fmt], lo, hi)
    return np.where(valid, q, 0).astype(np.int8 if fmt == "int8" else np.uint8)


# Shrink factors tried by the search: the grid spans f * (min/max range); f < 1 clips outliers.
SEARCH_FACTORS = (0.75, 0.8, 0.85, 0.9, 0.93, 0.96, 1.0, 1.03)
REFINE_ROUNDS = 2  # alternating code / least-squares steps on the best grid
MARGIN = 1e-5  # a candidate must beat the best by this relative amount (float32 error sums)


def search_group_params(g: np.ndarray, valid: np.ndarray, fmt: str,
                        weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and mins) minimising each group's weighted squared error sum(w * (x - dequant)^2).

    g f32 [rows, n_groups, size] (NaN padded), weights f32 broadcastable to g (None: all 1).
    Candidates: the min/max grid; for each shrink factor in SEARCH_FACTORS, the grid spanning that
    fraction of the range refitted by least squares on its codes; then REFINE_ROUNDS of
    alternating code / fit steps from the best. Errors are measured with the f16-rounded
    parameters actually stored, and a candidate replaces the best only when better by MARGIN, so
    no group ends worse than with min/max."""
    x = np.where(valid, g, 0).astype(np.float32)
    wt = valid.astype(np.float32) if weights is None else np.where(valid, np.broadcast_to(weights, g.shape), 0)
    wt = np.ascontiguousarray(wt, dtype=np.float32)
    best_s, best_m = minmax_group_params(g, valid, fmt)
    best_err = _group_error(x, wt, fmt, best_s, best_m)

    def consider(s, m):
        nonlocal best_s, best_m, best_err
        err = _group_error(x, wt, fmt, s, m)
        better = err < best_err * (1 - MARGIN)
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if m is not None:
            best_m = np.where(better, m, best_m)

    lo, hi = np.nanmin(g, axis=2), np.nanmax(g, axis=2)
    for f in SEARCH_FACTORS:
        if fmt == "int4_asym":
            span = (hi - lo) * f
            start = (_clip_f16(span / 15.0), _clip_f16(lo + 0.5 * ((hi - lo) - span)))
        else:
            start = (_clip_f16(best_s.astype(np.float32) * f), None) if f != 1.0 else (best_s, None)
        consider(*_fit_to_codes(x, wt, fmt, *start))
    for _ in range(REFINE_ROUNDS):
        consider(*_fit_to_codes(x, wt, fmt, best_s, best_m))
    return best_s, best_m


def _grid_codes(x, fmt, s16, m16):
    """Codes minus the format's offset (float32) of x [rows, n_groups, size] on grid (s16, m16) [rows, n_groups]."""
    lo, hi = CODE_RANGE[fmt]
    off = CODE_OFFSET[fmt]
    s = s16.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)[..., None]
    q = x - m16.astype(np.float32)[..., None] if m16 is not None else x.copy()
    q *= inv
    np.rint(q, out=q)
    np.clip(q, lo - off, hi - off, out=q)
    return q


def _fit_to_codes(x, wt, fmt, s16, m16):
    """One alternating step: codes on grid (s16, m16), then the least-squares (s, m) for those codes, as f16."""
    q = _grid_codes(x, fmt, s16, m16)
    wq = wt * q
    sqq, sqx = np.einsum("ijk,ijk->ij", wq, q), np.einsum("ijk,ijk->ij", wq, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt == "int4_asym":
            sw, sq, sx = wt.sum(axis=2), wq.sum(axis=2), np.einsum("ijk,ijk->ij", wt, x)
            det = sw * sqq - sq * sq
            ok = det > 1e-6 * np.maximum(sw * sqq, 1e-30)
            new_s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), s16)
            new_m = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), m16)
            return _clip_f16(new_s), _clip_f16(new_m)
        ok = sqq > 0
        new_s = np.where(ok, sqx / np.where(ok, sqq, 1), s16)
    return _clip_f16(new_s), None


def _clip_f16(v: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(np.asarray(v, dtype=np.float32)), -F16_MAX, F16_MAX).astype(np.float16)


def _group_error(x, wt, fmt, s16, m16) -> np.ndarray:
    """Weighted squared error [rows, n_groups] of x on the grid of f16 (s16, m16) (float32 sums)."""
    d = _grid_codes(x, fmt, s16, m16)
    d *= s16.astype(np.float32)[..., None]
    if m16 is not None:
        d += m16.astype(np.float32)[..., None]
    d -= x
    d *= d
    return np.einsum("ijk,ijk->ij", wt, d)


def dequantize(p: PackedWeight) -> np.ndarray:
    """PackedWeight -> f32 [rows, cols]."""
    if p.format == "f32":
        return np.asarray(p.data, dtype=np.float32)
    if p.format == "f16":
        return np.asarray(p.data).view(np.float16).astype(np.float32)
    if p.format == "bf16":
        return bf16_bits_to_f32(np.asarray(p.data))
    if p.format == "int4_asym_dq":
        p = as_int4_asym(p)
    scales = np.repeat(np.asarray(p.scales).astype(np.float32), p.group_size, axis=1)[:, : p.cols]
    if p.format == "int8":
        return np.asarray(p.data).astype(np.float32) * scales
    q = unpack_int4(np.asarray(p.data), p.cols).astype(np.float32)
    if p.format == "int4_sym":
        return (q - 8.0) * scales
    if p.format == "int4_asym":
        mins = np.repeat(np.asarray(p.mins).astype(np.float32), p.group_size, axis=1)[:, : p.cols]
        return q * scales + mins
    raise ValueError(f"unknown weight format {p.format!r}")


def as_int4_asym(p: PackedWeight) -> PackedWeight:
    """An int4_asym_dq weight as the int4_asym weight the engines compute with (the same codes; the
    scales and mins expanded to f16)."""
    scales, mins = dq_params(np.asarray(p.scales), np.asarray(p.mins), np.asarray(p.steps))
    return PackedWeight("int4_asym", p.rows, p.cols, p.group_size, p.data, scales, mins)


def quantization_nmse(p: PackedWeight, w: np.ndarray) -> float:
    """nmse(dequantize(p), w), computed slice by slice of rows to bound memory."""
    err = ref = 0.0
    for r0, r1 in row_slices(p.rows, p.cols):
        part = PackedWeight(p.format, r1 - r0, p.cols, p.group_size, p.data[r0:r1],
                            None if p.scales is None else p.scales[r0:r1], None if p.mins is None else p.mins[r0:r1],
                            None if p.steps is None else p.steps[r0:r1])
        exact = w[r0:r1].astype(np.float64)
        err += float(np.sum((dequantize(part) - exact) ** 2))
        ref += float(np.sum(exact * exact))
    return err / ref if ref > 0 else err


def nmse(approx: np.ndarray, exact: np.ndarray) -> float:
    """Normalised mean squared error: sum((a - e)^2) / sum(e^2)."""
    exact = np.asarray(exact, dtype=np.float64)
    denom = float(np.sum(exact * exact))
    err = float(np.sum((np.asarray(approx, dtype=np.float64) - exact) ** 2))
    return err / denom if denom > 0 else err


def kernel_args(p: PackedWeight) -> dict:
    """Keyword arguments for pyllm._core.matmul / embedding for this weight."""
    if p.format == "int4_asym_dq":
        p = as_int4_asym(p)
    return {
        "format": p.format,
        "data": p.data,
        "cols": p.cols,
        "group_size": p.group_size,
        "scales": None if p.scales is None else np.ascontiguousarray(p.scales).view(np.uint16),
        "mins": None if p.mins is None else np.ascontiguousarray(p.mins).view(np.uint16),
    }
