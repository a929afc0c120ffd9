// AVX-512 VNNI matmul kernel for quantized weights (compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c, run only when the CPU
// has them). Same arithmetic as matmul_portable.cpp, arranged for vpdpbusd:
//
// One 512-bit operand holds an activation block's two int8 terms side by side,
// [hi (32 bytes) | lo (32 bytes)], and the weight block twice, so a single
// vpdpbusd gives dot(w, hi) in lanes 0-7 and dot(w, lo) in lanes 8-15; one
// float multiply-add with [254 * step x 8 | step x 8] * scale folds both terms.
// vpdpbusd multiplies unsigned by signed bytes: int4 nibbles are unsigned
// already; int8 weights are offset by 128 (w ^ 0x80), and the 128 * sum(x)
// this adds is taken off exactly, in integers: the dot starts from
// -vpdpbusd(0x80.., x), computed once per activation block.
//
// Int4 offsets are per group, not per block: sum_k w_k x_k = sum_b scale_g(b)
// dot_b + sum_g shift_g * xsum_g, with shift = min (asym) or -8 scale (sym),
// and xsum_g the activations' sum over the group.
// Register tiles: 8 weight rows x 1 activation row (decode), 4 x 4 (prefill).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "tiling.h"

namespace pyllm {
namespace {

template <WeightFormat F>
inline __m512i load_block(const uint8_t* wrow, int64_t block, int64_t cols) {
    if constexpr (F == WeightFormat::Q8) {
        const int64_t start = block * kBlock, len = std::min<int64_t>(kBlock, cols - start);
        const __m256i q = len == kBlock ? _mm256_loadu_si256((const __m256i*)(wrow + start))
                                        : _mm256_maskz_loadu_epi8((__mmask32)((1ull << len) - 1), wrow + start);
        return _mm512_xor_si512(_mm512_broadcast_i64x4(q), _mm512_set1_epi8((char)0x80));
    } else {
        // 16 packed bytes in all four 128-bit lanes; lanes 1 and 3 shifted to their high nibbles
        const __m512i packed = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(wrow + block * (kBlock / 2))));
        const __m512i nibbles = _mm512_srlv_epi64(packed, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
        return _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0f));
    }
}

// The int4 group offsets' factor: min for asym, -8 scale for sym.
template <WeightFormat F>
inline __m512 group_shift(const WeightView& w, int64_t row, int64_t g, __mmask16 mask) {
    const int64_t at = row * w.n_groups() + g;
    if constexpr (F == WeightFormat::Q4_ASYM) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.mins + at));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.scales + at)), _mm512_set1_ps(-8.0f));
}

// sum_g shift[row, g] * xsum[g]   xsum: f32 [n_groups]
template <WeightFormat F>
inline float offset(const WeightView& w, int64_t row, const float* xsum) {
    if constexpr (F == WeightFormat::Q8) return 0.0f;
    const int64_t n_groups = w.n_groups();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g += 16) {
        const __mmask16 mask = (__mmask16)(n_groups - g >= 16 ? 0xffff : (1u << (n_groups - g)) - 1);
        acc = _mm512_fmadd_ps(group_shift<F>(w, row, g, mask), _mm512_maskz_loadu_ps(mask, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// Per-call inputs shared by all tiles: each row's group scales as floats and each
// activation row's per-group sums.
struct Prepared {
    const float* scales;  // f32 [w.rows, n_groups] for the rows [n_begin, n_end) (row n at n - n_begin)
    const float* xsum;    // f32 [x.rows, n_groups]
    int64_t n_begin;
};

template <WeightFormat F, int NR, int MR>
void quant_tile(const WeightView& w, const QuantizedRows& x, const Prepared& prep, int64_t m0, int64_t n0, float* y) {
    const int64_t N = w.rows, n_blocks = x.padded_cols / kBlock, n_groups = w.n_groups();
    const int64_t blocks_per_group = w.group_size / kBlock, row_bytes = w.row_bytes();
    const __m512 radix = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps((float)kResidualRadix), _mm512_set1_ps(1.0f));
    const uint8_t* wrows[NR];
    const float* scales[NR];
    for (int r = 0; r < NR; ++r) {
        wrows[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * row_bytes;
        scales[r] = prep.scales + (n0 + r - prep.n_begin) * n_groups;
    }
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();

    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t g = b / blocks_per_group;
        __m512i xq[MR], dot_start[MR];
        __m512 xstep[MR];
        for (int m = 0; m < MR; ++m) {
            const int64_t at = (m0 + m) * x.padded_cols + b * kBlock;
            xq[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(x.hi + at))),
                                       _mm256_loadu_si256((const __m256i*)(x.lo + at)), 1);
            xstep[m] = _mm512_mul_ps(radix, _mm512_set1_ps(x.step[(m0 + m) * n_blocks + b]));
            dot_start[m] = _mm512_setzero_si512();
            if constexpr (F == WeightFormat::Q8)  // -128 * sum(x), lane by lane as the dot sums
                dot_start[m] = _mm512_sub_epi32(
                    dot_start[m], _mm512_dpbusd_epi32(dot_start[m], _mm512_set1_epi8((char)0x80), xq[m]));
        }
        for (int r = 0; r < NR; ++r) {
            const __m512i wq = load_block<F>(wrows[r], b, w.cols);
            const __m512 scale = _mm512_set1_ps(scales[r][g]);
            for (int m = 0; m < MR; ++m) {
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(dot_start[m], wq, xq[m]));
                acc[r][m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(xstep[m], scale), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m)
            y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) +
                                       offset<F>(w, n0 + r, prep.xsum + (m0 + m) * n_groups) +
                                       (w.bias ? w.bias[n0 + r] : 0.0f);
}

template <WeightFormat F>
void quant_weights_typed(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t n_groups = w.n_groups(), n_blocks = x.padded_cols / kBlock;
    const int64_t blocks_per_group = w.group_size / kBlock;
    thread_local std::vector<float> scale_buffer, xsum_buffer;
    scale_buffer.resize((size_t)((n_end - n_begin) * n_groups));
    xsum_buffer.assign((size_t)(x.rows * n_groups), 0.0f);
    for (int64_t n = n_begin; n < n_end; ++n)
        for (int64_t g = 0; g < n_groups; g += 16) {
            const __mmask16 mask = (__mmask16)(n_groups - g >= 16 ? 0xffff : (1u << (n_groups - g)) - 1);
            _mm512_mask_storeu_ps(scale_buffer.data() + (n - n_begin) * n_groups + g, mask,
                                  _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.scales + n * n_groups + g)));
        }
    for (int64_t m = 0; m < x.rows; ++m)
        for (int64_t b = 0; b < n_blocks; ++b) xsum_buffer[(size_t)(m * n_groups + b / blocks_per_group)] += x.sum[m * n_blocks + b];
    const Prepared prep{scale_buffer.data(), xsum_buffer.data(), n_begin};
    auto tile = [&](auto nr, auto mr, int64_t m, int64_t n) { quant_tile<F, nr.value, mr.value>(w, x, prep, m, n, y); };
    if (x.rows == 1) tile_over<8, 1>(x.rows, n_begin, n_end, tile);
    else tile_over<4, 4>(x.rows, n_begin, n_end, tile);
}

void quant_weights(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    with_quant_format(w.format, [&](auto f) { quant_weights_typed<f.value>(w, x, n_begin, n_end, y); });
}

}  // namespace

const CpuKernels kAvx512Kernels = {"avx512", float_weights_avx2, quant_weights, quantize_rows_avx2, attend_avx2};

}  // namespace pyllm
