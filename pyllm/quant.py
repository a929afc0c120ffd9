"""Weight quantizers and dequantizers (numpy): the device-independent formats of docs/FORMAT.md.

A weight W is a float matrix [rows, cols] (rows = output features, cols = input
features). Quantized formats cut every row into groups of `group_size`
consecutive values (the last group may be shorter) and store one f16 scale
(and, for int4_asym, one f16 min) per group:

  int8       q int8 [rows, cols]                 value = q * scale
  int4_sym   q 0..15, packed [rows, Kp / 2]      value = (q - 8) * scale
  int4_asym  q 0..15, packed [rows, Kp / 2]      value = q * scale + min

Kp is cols rounded up to 32. Int4 packing works on chunks of 32 values: byte i
of a chunk holds value i in its low nibble and value i + 16 in its high nibble.
Padding nibbles are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_FORMATS = ("int8", "int4_sym", "int4_asym")
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
    mins: np.ndarray | None = None  # float16 [rows, n_groups], int4_asym only

    @property
    def n_groups(self) -> int:
        return -(-self.cols // self.group_size) if self.group_size else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scales, self.mins) if a is not None)

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
    raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")


def check_group_size(fmt: str, group_size: int) -> None:
    if fmt in QUANT_FORMATS and (group_size <= 0 or group_size % BLOCK != 0):
        raise ValueError(f"group size {group_size} is not supported: use a positive multiple of 32 ({GROUP_SIZES})")


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


def quantize(w: np.ndarray, fmt: str, group_size: int = 32) -> PackedWeight:
    """Round-to-nearest quantization of w f32 [rows, cols] into `fmt` (slice by slice of rows)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    slices = row_slices(*w.shape)
    if len(slices) == 1:
        return _quantize_slice(w, fmt, group_size)
    parts = [_quantize_slice(w[r0:r1], fmt, group_size) for r0, r1 in slices]
    join = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                         else np.concatenate([getattr(p, name) for p in parts]))
    return PackedWeight(fmt, w.shape[0], w.shape[1], parts[0].group_size, join("data"), join("scales"), join("mins"))


def _quantize_slice(w: np.ndarray, fmt: str, group_size: int) -> PackedWeight:
    rows, cols = w.shape
    if fmt == "f32":
        return PackedWeight(fmt, rows, cols, 0, w)
    if fmt == "f16":
        _check_f16_range(w, "weights")
        return PackedWeight(fmt, rows, cols, 0, w.astype(np.float16).view(np.uint16))
    if fmt == "bf16":
        return PackedWeight(fmt, rows, cols, 0, f32_to_bf16_bits(w))
    check_group_size(fmt, group_size)
    g, valid = _grouped(w, group_size)
    if fmt == "int8":
        amax = np.nanmax(np.abs(g), axis=2)
        scales = _to_f16(amax / 127.0, "int8 scales")
        q = np.clip(np.rint(_safe_divide(g, scales.astype(np.float32)[..., None])), -127, 127)
        q = np.where(valid, q, 0).reshape(rows, -1)[:, :cols].astype(np.int8)
        return PackedWeight(fmt, rows, cols, group_size, np.ascontiguousarray(q), scales)
    if fmt == "int4_sym":
        # the value of largest magnitude maps to q = 0, i.e. -8 * scale
        idx = np.nanargmax(np.abs(np.where(valid, g, 0)), axis=2)
        extreme = np.take_along_axis(g, idx[..., None], axis=2)[..., 0]
        scales = _to_f16(extreme / -8.0, "int4 scales")
        q = np.clip(np.rint(_safe_divide(g, scales.astype(np.float32)[..., None])) + 8, 0, 15)
        q = np.where(valid, q, 0).reshape(rows, -1)[:, :cols].astype(np.uint8)
        return PackedWeight(fmt, rows, cols, group_size, pack_int4(q), scales)
    if fmt == "int4_asym":
        lo = np.nanmin(g, axis=2)
        hi = np.nanmax(g, axis=2)
        scales = _to_f16((hi - lo) / 15.0, "int4 scales")
        mins = _to_f16(lo, "int4 mins")
        q = np.clip(np.rint(_safe_divide(g - mins.astype(np.float32)[..., None], scales.astype(np.float32)[..., None])), 0, 15)
        q = np.where(valid, q, 0).reshape(rows, -1)[:, :cols].astype(np.uint8)
        return PackedWeight(fmt, rows, cols, group_size, pack_int4(q), scales, mins)
    raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")


def dequantize(p: PackedWeight) -> np.ndarray:
    """PackedWeight -> f32 [rows, cols]."""
    if p.format == "f32":
        return np.asarray(p.data, dtype=np.float32)
    if p.format == "f16":
        return np.asarray(p.data).view(np.float16).astype(np.float32)
    if p.format == "bf16":
        return bf16_bits_to_f32(np.asarray(p.data))
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


def quantization_nmse(p: PackedWeight, w: np.ndarray) -> float:
    """nmse(dequantize(p), w), computed slice by slice of rows to bound memory."""
    err = ref = 0.0
    for r0, r1 in row_slices(p.rows, p.cols):
        part = PackedWeight(p.format, r1 - r0, p.cols, p.group_size, p.data[r0:r1],
                            None if p.scales is None else p.scales[r0:r1], None if p.mins is None else p.mins[r0:r1])
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
    return {
        "format": p.format,
        "data": p.data,
        "cols": p.cols,
        "group_size": p.group_size,
        "scales": None if p.scales is None else np.ascontiguousarray(p.scales).view(np.uint16),
        "mins": None if p.mins is None else np.ascontiguousarray(p.mins).view(np.uint16),
    }
