"""Plain numpy reference implementations for the kernel tests.

Nothing here imports pyllm: every formula is written out again from the format
description (csrc/core/weights.h, pyllm/quant.py module doc) and from the
definitions in transformers, so that a shared mistake cannot hide in both the
code under test and its reference. Everything computes in float64 unless a step
is defined to happen in another precision.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 32


def nmse(approx, exact) -> float:
    """Normalised mean squared error sum((a - e)^2) / sum(e^2), in float64."""
    a = np.asarray(approx, dtype=np.float64)
    e = np.asarray(exact, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = float(np.sum(e * e))
    err = float(np.sum((a - e) ** 2))
    return err / denom if denom > 0 else err


# --- number formats ----------------------------------------------------------


def f16_bits_to_f64(bits) -> np.ndarray:
    """IEEE binary16 bits -> value, decoded field by field (not via np.float16)."""
    b = np.asarray(bits, dtype=np.uint16).astype(np.int64)
    sign = np.where(b & 0x8000, -1.0, 1.0)
    exponent = (b >> 10) & 0x1F
    mantissa = (b & 0x3FF).astype(np.float64)
    normal = (1.0 + mantissa / 1024.0) * np.exp2(exponent.astype(np.float64) - 15.0)
    subnormal = mantissa * 2.0**-24
    with np.errstate(invalid="ignore"):
        special = np.where(mantissa == 0, np.inf, np.nan)
    value = np.where(exponent == 0, subnormal, np.where(exponent == 31, special, normal))
    return sign * value


def bf16_bits_to_f64(bits) -> np.ndarray:
    """bfloat16 bits are the top half of a float32."""
    b = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(np.float32).astype(np.float64)


def round_to_bf16(x) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float64 values.
    Normal numbers only (bf16 subnormals would keep fewer bits)."""
    v = np.asarray(x, dtype=np.float32).astype(np.float64)
    m, e = np.frexp(v)  # v = m * 2^e with 0.5 <= |m| < 1; bf16 keeps 8 significant bits
    out = np.ldexp(np.rint(m * 256.0), e - 8)  # np.rint rounds ties to even
    return np.where(np.isfinite(v) & (v != 0), out, v)


# --- int4 packing and dequantization (docs: weights.h "Int4 packing") --------


def pack_int4_naive(q) -> np.ndarray:
    """q: ints 0..15 [rows, cols] -> uint8 [rows, Kp/2], one element at a time.

    Each row is cut into chunks of 32 values; byte i of a chunk holds value i
    in its low nibble and value i + 16 in its high nibble; the last chunk is
    padded with zero nibbles.
    """
    q = np.asarray(q)
    rows, cols = q.shape
    kp = -(-cols // BLOCK) * BLOCK
    out = np.zeros((rows, kp // 2), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            v = int(q[r, c])
            assert 0 <= v <= 15
            chunk, i = divmod(c, BLOCK)
            byte = chunk * (BLOCK // 2) + (i % (BLOCK // 2))
            if i < BLOCK // 2:
                out[r, byte] |= v
            else:
                out[r, byte] |= v << 4
    return out


def unpack_int4_ref(packed, cols: int) -> np.ndarray:
    """packed uint8 [rows, Kp/2] -> nibbles int64 [rows, cols], by index arithmetic:
    value c lives in byte (c // 32) * 16 + c % 16, high nibble when c % 32 >= 16."""
    packed = np.asarray(packed, dtype=np.uint8)
    c = np.arange(cols)
    byte = (c // BLOCK) * (BLOCK // 2) + (c % (BLOCK // 2))
    shift = np.where(c % BLOCK >= BLOCK // 2, 4, 0)
    return (packed[:, byte].astype(np.int64) >> shift) & 0x0F


def _per_column(group_values, group_size: int, cols: int) -> np.ndarray:
    """[rows, n_groups] -> [rows, cols]: column k takes group k // group_size."""
    g = np.arange(cols) // group_size
    return np.asarray(group_values)[:, g]


def dequant_ref(fmt: str, data, cols: int, group_size: int = 0, scales=None, mins=None) -> np.ndarray:
    """Raw stored arrays -> float64 [rows, cols], from the documented formulas.

    scales / mins are the stored f16 bit patterns (uint16) or float16 arrays.
    """
    data = np.asarray(data)
    if fmt == "f32":
        assert data.dtype == np.float32
        return data.astype(np.float64)
    if fmt == "f16":
        return f16_bits_to_f64(data.view(np.uint16))
    if fmt == "bf16":
        return bf16_bits_to_f64(data.view(np.uint16))
    s = _per_column(f16_bits_to_f64(np.asarray(scales).view(np.uint16)), group_size, cols)
    if fmt == "int8":
        return data.view(np.int8).astype(np.float64) * s
    q = unpack_int4_ref(data, cols).astype(np.float64)
    if fmt == "int4_sym":
        return (q - 8.0) * s
    if fmt == "int4_asym":
        mn = _per_column(f16_bits_to_f64(np.asarray(mins).view(np.uint16)), group_size, cols)
        return q * s + mn
    raise ValueError(fmt)


def partial_magnitudes_ref(fmt: str, data, cols: int, group_size: int = 0, scales=None, mins=None) -> np.ndarray:
    """float64 [rows, cols]: the magnitude of what an integer kernel adds up per
    weight element before the offsets cancel. int8: |q s|; int4_sym: (q + 8)|s|
    (the nibble part and the -8 offset are summed separately); int4_asym:
    |q s| + |min|. Float formats: |w|. Rounding errors scale with these."""
    if fmt in ("f32", "f16", "bf16"):
        return np.abs(dequant_ref(fmt, data, cols))
    s = np.abs(_per_column(f16_bits_to_f64(np.asarray(scales).view(np.uint16)), group_size, cols))
    if fmt == "int8":
        return np.abs(np.asarray(data).view(np.int8).astype(np.float64)) * s
    q = unpack_int4_ref(data, cols).astype(np.float64)
    if fmt == "int4_sym":
        return (q + 8.0) * s
    mn = np.abs(_per_column(f16_bits_to_f64(np.asarray(mins).view(np.uint16)), group_size, cols))
    return q * s + mn


# --- matmul ------------------------------------------------------------------


# activation_quant -> (int8 terms, outlier factor, min code sum): ops.h kActivationQuants
ACTIVATION_QUANTS = {"int8x2": (2, 0.0, 0), "int8": (1, 0.0, 0), "int8x2_outliers": (2, 3.0, 512)}


def quantize_activations_ref(x, activation_quant: str = "int8x2"):
    """Int8 activation codes per block of 32 (QuantizedRows): "int8x2" two terms, x ~ step * (254 hi + lo);
    "int8" one term, x ~ step * lo with hi zero; "int8x2_outliers" two terms in a row's blocks whose
    absmax exceeds 3 x T, with T the row's finite blocks' absmax summed in block order in float32 and
    divided by the number of blocks (weights.h outlier_threshold), and in the nonzero blocks whose
    one-term codes sum below 512 in magnitude; one term in the others.

    x f32 [M, K] -> hi, lo int8 [M, P], step, sum f32 [M, P / 32] with P = K rounded up to 32.
    A block holding NaN or infinity gets codes 0 and a NaN step and sum. Otherwise the C++ steps
    exactly, with R = 254 for two terms and 1 for one: units = f32(f64(x) * f64(127 R /
    absmax)), hi = clamp(rint(units / 254)) (two terms) else 0, lo = clamp(rint(units - 254 hi)), both to
    [-127, 127]; step = absmax / (127 R); sum = step * sum(254 hi + lo).
    """
    terms, factor, min_code_sum = ACTIVATION_QUANTS[activation_quant]
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    P = -(-K // 32) * 32
    blocks = np.zeros((M, P), np.float32)
    blocks[:, :K] = x
    blocks = blocks.reshape(M, P // 32, 32)
    amax = np.abs(blocks).max(axis=2)  # f32 [M, P / 32]
    bad = ~np.isfinite(blocks).all(axis=2)  # a block holding NaN or infinity
    if terms == 1:
        two_terms = np.zeros(amax.shape, bool)
    elif factor == 0:
        two_terms = amax > 0
    else:
        total = np.cumsum(np.where(bad, np.float32(0), amax), axis=1, dtype=np.float32)[:, -1]  # in block order
        threshold = np.float32(factor) * (total / np.float32(P // 32))
        two_terms = amax > threshold[:, None]

    def units_for(two):  # x / step, f32 [M, P / 32, 32]
        radix = np.where(two, 254.0, 1.0)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inverse = np.where(amax[:, :, None] > 0, (127.0 * radix) / amax[:, :, None].astype(np.float64), 0.0)
            return (blocks.astype(np.float64) * inverse).astype(np.float32)

    if min_code_sum:  # blocks one value dwarfs: their one-term codes sum below min_code_sum
        one_term_codes = np.clip(np.rint(units_for(np.zeros(amax.shape, bool))), -127, 127)
        two_terms |= (np.abs(one_term_codes).sum(axis=2) < min_code_sum) & (amax > 0) & ~bad
    units = units_for(two_terms)
    radix = np.where(two_terms, 254.0, 1.0)[:, :, None]
    hi = np.where(two_terms[:, :, None], np.clip(np.rint(units / np.float32(254)), -127, 127), 0).astype(np.float32)
    lo = np.clip(np.rint(units - hi * np.float32(254)), -127, 127).astype(np.float32)
    step = (amax / (np.float32(127) * radix[:, :, 0].astype(np.float32))).astype(np.float32)
    # a block holding NaN or infinity: codes 0, step and sum NaN (every output of its row is NaN)
    hi[bad], lo[bad], step[bad] = 0, 0, np.nan
    total = (hi * 254 + lo).sum(axis=2, dtype=np.float64).astype(np.float32)  # exact integers
    return (hi.astype(np.int8).reshape(M, P), lo.astype(np.int8).reshape(M, P), step,
            (step * total).astype(np.float32))


def matmul_ref(x, w, bias=None) -> np.ndarray:
    """x [M, K] @ w[N, K]^T + bias, float64."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y


def matmul_abs_bound(x, w, bias=None) -> np.ndarray:
    """|x| @ |w|^T + |bias|: the scale of the rounding error of each output (a
    dot product's error is bounded by eps_K * sum |x_k w_k|), used to turn
    absolute errors into per-element relative ones that stay meaningful when an
    output happens to be near zero."""
    y = np.abs(np.asarray(x, dtype=np.float64)) @ np.abs(np.asarray(w, dtype=np.float64)).T
    if bias is not None:
        y = y + np.abs(np.asarray(bias, dtype=np.float64))
    return y


# --- elementwise ops ---------------------------------------------------------


def rmsnorm_ref(x, weight, eps: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * np.asarray(weight, dtype=np.float64)


def swiglu_ref(gate, up) -> np.ndarray:
    g = np.asarray(gate, dtype=np.float64)
    # silu(g) = g * sigmoid(g), sigmoid written in the overflow-free form
    sig = np.where(g >= 0, 1.0 / (1.0 + np.exp(-np.abs(g))), np.exp(-np.abs(g)) / (1.0 + np.exp(-np.abs(g))))
    return g * sig * np.asarray(up, dtype=np.float64)


def layernorm_ref(x, weight, bias, eps: float) -> np.ndarray:
    """torch.nn.LayerNorm: (x - mean) / sqrt(biased variance + eps) * weight + bias."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)


def activation_ref(name: str, x) -> np.ndarray:
    """transformers' ACT2FN entries: silu, gelu_pytorch_tanh (= gelu_new), gelu (erf), relu."""
    x = np.asarray(x, dtype=np.float64)
    if name == "silu":
        return swiglu_ref(x, np.ones_like(x))
    if name == "gelu_pytorch_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    assert name == "relu", name
    return np.maximum(x, 0.0)


# --- rotary embedding --------------------------------------------------------


def rope_inv_freq_ref(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """transformers' inverse frequencies, re-derived.

    Default: 1 / theta ** (arange(0, D, 2) / D); the exponent is formed in
    float32 like torch does (arange(...).float() / dim), the power in float64.
    linear: divided by factor. llama3 (transformers _compute_llama3_parameters):
      wavelen = 2 pi / inv_freq
      wavelen > old_len / low            -> inv_freq / factor
      wavelen < old_len / high           -> inv_freq
      otherwise, smooth = (old_len / wavelen - low) / (high - low)
                 -> (1 - smooth) * inv_freq / factor + smooth * inv_freq
    """
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = 1.0 / np.power(np.float64(np.float32(theta)), exponent.astype(np.float64))
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    assert kind == "llama3", kind
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    out = np.empty_like(inv)
    for i, f in enumerate(inv):
        wavelen = 2.0 * math.pi / f
        if wavelen < old_len / high:
            out[i] = f
        elif wavelen > old_len / low:
            out[i] = f / factor
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out[i] = (1.0 - smooth) * f / factor + smooth * f
    return out


def rope_ref(x, positions, inv_freq) -> np.ndarray:
    """Rotate-half over the first R = 2 * len(inv_freq) dims of each head: pair (i, i + R/2) turns by
    pos * inv_freq[i]; dims from R on pass through (partial rotary embedding)."""
    x = np.asarray(x, dtype=np.float64)
    M, H, D = x.shape
    half = len(inv_freq)
    out = x.copy()
    for m in range(M):
        angle = float(positions[m]) * np.asarray(inv_freq, dtype=np.float64)
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[m, :, :half], x[m, :, half:2 * half]
        out[m, :, :half] = a * c - b * s
        out[m, :, half:2 * half] = b * c + a * s
    return out


def alibi_slopes_ref(heads: int) -> np.ndarray:
    """ALiBi slopes (Press et al.; BLOOM's build_alibi_tensor): for the largest power of two n <= heads,
    2^(-8 k / n) for k = 1..n; the remaining heads take every other slope of 2n heads, 2^(-4 (2k-1) / n)."""
    n = 1 << (heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * (2 * k - 1) / n) for k in range(1, min(n, heads - n) + 1)]
    return np.array(slopes)


def quantize_q8_0_ref(x) -> np.ndarray:
    """llama.cpp's q8_0 (quantize_row_q8_0_ref) of float32 values, in blocks of 32: d = max|x| / 127
    and codes round(x * (1 / d)) (halves away from zero; 0 where d = 0), each product and quotient
    in float32 as the C code does; d stored as f16. -> u8 [blocks, 34]: d's two bytes, then the codes."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, BLOCK)
    d = np.abs(x).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = (x * inverse[:, None]).astype(np.float64)  # float32 products, exact in float64
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    out = np.empty((x.shape[0], 2 + BLOCK), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = codes.astype(np.int8).view(np.uint8)
    return out


def dequantize_q8_0_ref(blocks, shape) -> np.ndarray:
    """q8_0 blocks (u8 [blocks, 34]) -> float64 values d * code, reshaped to shape."""
    b = np.asarray(blocks, dtype=np.uint8).reshape(-1, 2 + BLOCK)
    d = f16_bits_to_f64(b[:, :2].copy().view(np.uint16)[:, 0])
    return (d[:, None] * b[:, 2:].view(np.int8).astype(np.float64)).reshape(shape)


# --- attention ---------------------------------------------------------------


def attention_ref(q, k_cache, v_cache, pos0: int, scale: float, window: int = 0, softcap: float = 0.0,
                  alibi=None) -> np.ndarray:
    """Causal GQA: query m (position p = pos0 + m), head h reads kv head h // (H / Hkv)
    and keys 0 .. p, or p - window + 1 .. p with a sliding window. Scores q.k * scale, plus
    alibi[h] * (key position - p) with ALiBi, then softcap * tanh(score / softcap) with soft-capping.
    Only those cache rows are touched."""
    q = np.asarray(q, dtype=np.float64)
    M, H, D = q.shape
    Hkv = k_cache.shape[0]
    group = H // Hkv
    out = np.zeros((M, H, D), dtype=np.float64)
    for m in range(M):
        position = pos0 + m
        first = max(0, position - window + 1) if window > 0 else 0
        for h in range(H):
            kv = h // group
            keys = np.asarray(k_cache[kv, first:position + 1], dtype=np.float64)
            values = np.asarray(v_cache[kv, first:position + 1], dtype=np.float64)
            scores = keys @ q[m, h] * scale
            if alibi is not None:
                scores = scores + float(alibi[h]) * (np.arange(first, position + 1) - position)
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[m, h] = p @ values
    return out
