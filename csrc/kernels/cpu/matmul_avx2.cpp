// AVX2 + FMA + F16C matmul kernels (compiled with -mavx2 -mfma -mf16c, run
// only when the CPU has them). Same arithmetic as matmul_portable.cpp, in
// register tiles: NR weight rows x MR activation rows share every load.
//   decode (M = 1):  4 weight rows x 1 activation row (float weights: one row
//                    at a time, float_rows_decode)
//   prefill:         2 weight rows x 4 activation rows
// Float weights from kPanelMinRows rows on go through packed panels instead
// (tiling.h panel_matmul): 16 output columns (2 vectors) x 6 activation rows,
// 12 accumulators, each depth step 2 panel loads, 6 broadcasts and 12 FMAs
// (8 columns x 6 rows where a chunk ends in a half panel).
// Integer blocks use maddubs (u8 x s8 -> s16 pairs) then madd (-> s32), once
// per int8 term of the activations (see QuantizedRows).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../../core/numeric.h"
#include "kernels.h"
#include "tiled_avx2.h"
#include "tiling.h"

namespace pyllm {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <WeightFormat F>
inline __m256 load8(const void* base, int64_t index) {
    if constexpr (F == WeightFormat::F32) {
        return _mm256_loadu_ps(static_cast<const float*>(base) + index);
    } else if constexpr (F == WeightFormat::F16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(base) + index)));
    } else {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(base) + index)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
}

template <WeightFormat F>
inline float load1(const void* base, int64_t index) {
    if constexpr (F == WeightFormat::F32) return static_cast<const float*>(base)[index];
    else if constexpr (F == WeightFormat::F16) return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
    else return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
}

template <WeightFormat F, int NR, int MR>
void float_tile(const WeightView& w, const float* x, int64_t m0, int64_t n0, float* y) {
    const int64_t K = w.cols, N = w.rows;
    __m256 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[MR];
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
        for (int r = 0; r < NR; ++r) {
            const __m256 wv = load8<F>(w.data, (n0 + r) * K + k);
            for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int m = 0; m < MR; ++m) {
            float sum = hsum(acc[r][m]);
            for (int64_t kk = k; kk < K; ++kk) sum += load1<F>(w.data, (n0 + r) * K + kk) * x[(m0 + m) * K + kk];
            y[(m0 + m) * N + n0 + r] = sum + (w.bias ? w.bias[n0 + r] : 0.0f);
        }
    }
}

// Decode (one activation row): weight rows one at a time, 32 values a step into 4 accumulators
// (as matmul_avx512.cpp's float_rows_decode), then 8-value steps and a scalar tail. On an AVX2-only
// Zen 3 this decoded SmolLM2 f16 at 38 tok/s against 26 for 4-row tiles (2 threads, 5 alternating
// pairs): one weight stream per core instead of four.
//   x: f32 [w.cols]   y: f32 [w.rows] (only [n_begin, n_end) written)
template <WeightFormat F>
void float_rows_decode(const WeightView& w, const float* x, int64_t n_begin, int64_t n_end, float* y) {
    constexpr int kChains = 4;
    const int64_t K = w.cols;
    for (int64_t n = n_begin; n < n_end; ++n) {
        __m256 acc[kChains];
        for (int c = 0; c < kChains; ++c) acc[c] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 * kChains <= K; k += 8 * kChains)
            for (int c = 0; c < kChains; ++c)
                acc[c] = _mm256_fmadd_ps(load8<F>(w.data, n * K + k + 8 * c), _mm256_loadu_ps(x + k + 8 * c), acc[c]);
        for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(load8<F>(w.data, n * K + k), _mm256_loadu_ps(x + k), acc[0]);
        float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for (; k < K; ++k) sum += load1<F>(w.data, n * K + k) * x[k];
        y[n] = sum + (w.bias ? w.bias[n] : 0.0f);
    }
}

template <WeightFormat F>
void float_weights_typed(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    auto tile = [&](auto nr, auto mr, int64_t m, int64_t n) { float_tile<F, nr.value, mr.value>(w, x, m, n, y); };
    if (M == 1) return float_rows_decode<F>(w, x, n_begin, n_end, y);
    else tile_over<2, 4>(M, n_begin, n_end, tile);
}

// In place: r[i] lane j -> r[j] lane i.
inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: pairs of rows interleaved
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // u[4g + j], lane L: rows 4g..4g+3 of column 4L + j
        u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
        u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

// Lanes [0, n) all ones: a maskload / maskstore mask.
inline __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::clamp<int64_t>(n, 0, 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <WeightFormat F>
struct Avx2Panels {
    static constexpr int64_t kCols = 16, kRows = 6;

    static void pack(const WeightView& w, int64_t n0, int64_t cols, int64_t k0, int64_t depth, float* panel) {
        for (int64_t k = 0; k < depth; k += 8) {
            const int64_t steps = std::min<int64_t>(8, depth - k);
            for (int h = 0; h < 2; ++h) {
                __m256 r[8];
                for (int i = 0; i < 8; ++i) {
                    const int64_t c = 8 * h + i, at = (n0 + c) * w.cols + k0 + k;
                    if (c >= cols) {
                        r[i] = _mm256_setzero_ps();
                    } else if (steps == 8) {
                        r[i] = load8<F>(w.data, at);
                    } else {
                        alignas(32) float tail[8] = {0};
                        for (int64_t s = 0; s < steps; ++s) tail[s] = load1<F>(w.data, at + s);
                        r[i] = _mm256_load_ps(tail);
                    }
                }
                transpose8(r);
                for (int64_t i = 0; i < steps; ++i) _mm256_store_ps(panel + (k + i) * 16 + 8 * h, r[i]);
            }
        }
    }

    // A register tile of Rows activation rows x 8 * Vectors output columns over one depth block.
    template <int Rows, int Vectors>
    static void tile(const float* panel, int64_t depth, const float* x, int64_t K, float* y, int64_t N, int64_t cols,
                     bool first, const float* bias) {
        const bool full = cols == 8 * Vectors;
        const __m256i mask[2] = {first_lanes(cols), first_lanes(cols - 8)};
        auto load = [&](const float* p, int h) { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask[h]); };
        __m256 acc[Rows][Vectors];
        for (int m = 0; m < Rows; ++m)
            for (int h = 0; h < Vectors; ++h) acc[m][h] = first ? _mm256_setzero_ps() : load(y + m * N + 8 * h, h);
        for (int64_t k = 0; k < depth; ++k) {
            __m256 wv[Vectors];
            for (int h = 0; h < Vectors; ++h) wv[h] = _mm256_load_ps(panel + 16 * k + 8 * h);
            for (int m = 0; m < Rows; ++m) {
                const __m256 xv = _mm256_broadcast_ss(x + m * K + k);
                for (int h = 0; h < Vectors; ++h) acc[m][h] = _mm256_fmadd_ps(wv[h], xv, acc[m][h]);
            }
        }
        // unrolled: a loop over the tile here made GCC keep acc in memory and store every
        // accumulator after every FMA of the loop above (half the FMA rate)
#pragma GCC unroll 2
        for (int h = 0; h < Vectors; ++h) {
            const __m256 b = bias ? load(bias + 8 * h, h) : _mm256_setzero_ps();
#pragma GCC unroll 8
            for (int m = 0; m < Rows; ++m) {
                float* out = y + m * N + 8 * h;
                const __m256 v = _mm256_add_ps(acc[m][h], b);
                if (full) _mm256_storeu_ps(out, v);
                else _mm256_maskstore_ps(out, mask[h], v);
            }
        }
    }
};

// Below this many rows packing does not pay: the row tiles read the weights directly
// (measured crossover 16-32 rows on an AVX-512 Xeon, f16 576 x 576 .. 1536).
constexpr int64_t kPanelMinRows = 24;

}  // namespace

void float_weight_rows_avx2(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    switch (w.format) {
        case WeightFormat::F32: return float_weights_typed<WeightFormat::F32>(w, x, M, n_begin, n_end, y);
        case WeightFormat::F16: return float_weights_typed<WeightFormat::F16>(w, x, M, n_begin, n_end, y);
        default: return float_weights_typed<WeightFormat::BF16>(w, x, M, n_begin, n_end, y);
    }
}

void float_weights_avx2(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    if (M < kPanelMinRows) return float_weight_rows_avx2(w, x, M, n_begin, n_end, y);
    switch (w.format) {
        case WeightFormat::F32: return panel_matmul<Avx2Panels<WeightFormat::F32>>(w, x, M, n_begin, n_end, y);
        case WeightFormat::F16: return panel_matmul<Avx2Panels<WeightFormat::F16>>(w, x, M, n_begin, n_end, y);
        default: return panel_matmul<Avx2Panels<WeightFormat::BF16>>(w, x, M, n_begin, n_end, y);
    }
}

namespace {

// One 32-value weight block as 32 bytes ready for maddubs, and the activation
// block adjusted to match (int8 weights: sign trick).
template <WeightFormat F>
inline __m256i load_block(const uint8_t* wrow, int64_t block, int64_t cols) {
    if constexpr (F == WeightFormat::Q8) {
        const int64_t start = block * kBlock;
        if (start + kBlock <= cols) return _mm256_loadu_si256((const __m256i*)(wrow + start));
        alignas(32) int8_t tail[kBlock] = {0};
        std::memcpy(tail, wrow + start, (size_t)(cols - start));
        return _mm256_load_si256((const __m256i*)tail);
    } else {
        // the 16 bytes in both lanes; the upper lane shifted right by 4 bits (per 64-bit
        // element: each byte's high nibble lands in its low nibble), then masked
        const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wrow + block * (kBlock / 2))));
        const __m256i shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
        return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f));
    }
}

// kResidualRadix * dot(w, hi) + dot(w, lo) as 8 int32 partial sums. maddubs
// multiplies u8 by s8 and sums pairs into s16: int4 nibbles are unsigned
// already, int8 weights use |w| * (x * sign(w)). The s16 pair sums are at most
// 2 * 128 * 127, so scaling them by 254 in madd stays well inside int32.
template <WeightFormat F>
inline __m256i block_dot(__m256i wq, __m256i hi, __m256i lo) {
    const __m256i radix = _mm256_set1_epi16((int16_t)kResidualRadix), ones = _mm256_set1_epi16(1);
    if constexpr (F == WeightFormat::Q8) {
        const __m256i magnitude = _mm256_sign_epi8(wq, wq);
        hi = _mm256_sign_epi8(hi, wq);
        lo = _mm256_sign_epi8(lo, wq);
        wq = magnitude;
    }
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wq, hi), radix),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wq, lo), ones));
}

template <WeightFormat F, int NR, int MR>
void quant_tile(const WeightView& w, const QuantizedRows& x, int64_t m0, int64_t n0, float* y) {
    const int64_t N = w.rows, n_blocks = x.padded_cols / kBlock, n_groups = w.n_groups();
    const int64_t blocks_per_group = w.group_size / kBlock;
    const int64_t row_bytes = w.row_bytes();
    const uint8_t* wrows[NR];
    for (int r = 0; r < NR; ++r) wrows[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * row_bytes;

    __m256 acc[NR][MR];
    float offset[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps(), offset[r][m] = 0.0f;

    for (int64_t g = 0; g < n_groups; ++g) {
        float scale[NR], shift[NR];
        for (int r = 0; r < NR; ++r) {  // F16C conversions: the portable f16_to_f32 is branchy
            scale[r] = _cvtsh_ss(w.scales[(n0 + r) * n_groups + g]);
            if constexpr (F == WeightFormat::Q4_SYM) shift[r] = -8.0f * scale[r];
            if constexpr (F == WeightFormat::Q4_ASYM) shift[r] = _cvtsh_ss(w.mins[(n0 + r) * n_groups + g]);
        }
        const int64_t b_end = std::min(n_blocks, (g + 1) * blocks_per_group);
        for (int64_t b = g * blocks_per_group; b < b_end; ++b) {
            __m256i xhi[MR], xlo[MR];
            float xs[MR];
            for (int m = 0; m < MR; ++m) {
                xhi[m] = _mm256_loadu_si256((const __m256i*)(x.hi + (m0 + m) * x.padded_cols + b * kBlock));
                xlo[m] = _mm256_loadu_si256((const __m256i*)(x.lo + (m0 + m) * x.padded_cols + b * kBlock));
                xs[m] = x.step[(m0 + m) * n_blocks + b];
            }
            for (int r = 0; r < NR; ++r) {
                const __m256i wq = load_block<F>(wrows[r], b, w.cols);
                for (int m = 0; m < MR; ++m) {
                    const __m256 dot = _mm256_cvtepi32_ps(block_dot<F>(wq, xhi[m], xlo[m]));
                    acc[r][m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(scale[r] * xs[m]), acc[r][m]);
                    if constexpr (F != WeightFormat::Q8)
                        offset[r][m] += shift[r] * x.sum[(m0 + m) * n_blocks + b];
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m)
            y[(m0 + m) * N + n0 + r] = hsum(acc[r][m]) + offset[r][m] + (w.bias ? w.bias[n0 + r] : 0.0f);
}


// ---- weights tiled at load: tiled_avx2.h's tile loop with these block dots (its Dots policy).
// int4: maddubs products of a nibble (<= 15) and an int8 code (|c| <= 127) pair into at most
// 3810, so the 8 quads of a block add up in int16 (<= 30480) before one madd to int32.
// int8: maddubs cannot take the stored weights (w ^ 0x80 = w + 128, up to 255) against codes up
// to 127 (pairs would saturate int16), and the sign trick (|w| * (x * sign(w))) costs two signs,
// two maddubs and two madds per quad, row and half. Instead the weights widen to int16 (u = w + 128,
// vpmovzxbw) and meet the two terms joined in int16 (254 hi + lo, |.| <= 32385) in one madd:
// pairs of at most 2 * 255 * 32385 into int32 lanes, 16 per lane a block (< 2^31); subtracting
// 128 * (254 sum(hi) + sum(lo)) leaves the exact dot.
struct MaddubsDots {
    static constexpr bool kWideQ8 = true;

    template <WeightFormat F, int MR, int T>
    static inline void block(const uint8_t* wb, const BlockCodes& x, __m256i (*dot)[2]) {
        if constexpr (F == WeightFormat::Q8) {  // the joined codes (kWideQ8): the same work with one term
            // acc[m][h][part]: rows 4 part .. 4 part + 3 of half h, two int32 lanes a row
            __m256i acc[MR][2][2];
            for (int m = 0; m < MR; ++m)
                for (int h = 0; h < 2; ++h) acc[m][h][0] = acc[m][h][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) {
                __m256i u[2][2];  // 4 rows x 4 values, int16
                for (int h = 0; h < 2; ++h)
                    for (int part = 0; part < 2; ++part)
                        u[h][part] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wb + 64 * q + 32 * h + 16 * part)));
#pragma GCC unroll 2
                for (int m = 0; m < MR; ++m) {
                    int64_t four;  // the joined codes of quad q of row m, in every 64-bit element
                    std::memcpy(&four, x.wide + m * x.stride + 4 * q, 8);
                    const __m256i xq = _mm256_set1_epi64x(four);
                    for (int h = 0; h < 2; ++h)
                        for (int part = 0; part < 2; ++part) {
                            acc[m][h][part] = _mm256_add_epi32(acc[m][h][part], _mm256_madd_epi16(u[h][part], xq));
                            in_order(acc[m][h][part]);
                        }
                }
            }
            for (int m = 0; m < MR; ++m) {
                const int32_t* sums = x.code_sums + m * x.sums_stride;
                const __m256i offset = _mm256_set1_epi32(128 * ((int32_t)kResidualRadix * sums[0] + sums[1]));
                for (int h = 0; h < 2; ++h) {
                    // lanes of hadd: rows 0 1 4 5 | 2 3 6 7 -> 0..7
                    const __m256i rows = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][h][0], acc[m][h][1]),
                                                                  _MM_SHUFFLE(3, 1, 2, 0));
                    dot[m][h] = _mm256_sub_epi32(rows, offset);
                }
            }
        } else {
            const __m256i ones = _mm256_set1_epi16(1), radix = _mm256_set1_epi16((int16_t)kResidualRadix);
            const __m256i low = _mm256_set1_epi8(0x0f);
            __m256i sum_hi[MR][2], sum_lo[MR][2];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                const __m256i packed0 = _mm256_loadu_si256((const __m256i*)(wb + 64 * j));
                const __m256i packed1 = _mm256_loadu_si256((const __m256i*)(wb + 64 * j + 32));
#pragma GCC unroll 2
                for (int nibble = 0; nibble < 2; ++nibble) {
                    const int q = 2 * j + nibble;
                    const __m256i w0 = _mm256_and_si256(nibble ? _mm256_srli_epi16(packed0, 4) : packed0, low);
                    const __m256i w1 = _mm256_and_si256(nibble ? _mm256_srli_epi16(packed1, 4) : packed1, low);
#pragma GCC unroll 2
                    for (int m = 0; m < MR; ++m) {
                        const __m256i xl = x.quad(m, 1, q);
                        const __m256i p_lo[2] = {_mm256_maddubs_epi16(w0, xl), _mm256_maddubs_epi16(w1, xl)};
                        for (int h = 0; h < 2; ++h) {
                            sum_lo[m][h] = q == 0 ? p_lo[h] : _mm256_add_epi16(sum_lo[m][h], p_lo[h]);
                            in_order(sum_lo[m][h]);
                        }
                        if constexpr (T == 2) {
                            const __m256i xh = x.quad(m, 0, q);
                            const __m256i p_hi[2] = {_mm256_maddubs_epi16(w0, xh), _mm256_maddubs_epi16(w1, xh)};
                            for (int h = 0; h < 2; ++h) {
                                sum_hi[m][h] = q == 0 ? p_hi[h] : _mm256_add_epi16(sum_hi[m][h], p_hi[h]);
                                in_order(sum_hi[m][h]);
                            }
                        }
                    }
                }
            }
            for (int m = 0; m < MR; ++m)  // one term: hi is zero, so 254 * 0 + lo's dot
                for (int h = 0; h < 2; ++h)
                    dot[m][h] = T == 2 ? _mm256_add_epi32(_mm256_madd_epi16(sum_hi[m][h], radix), _mm256_madd_epi16(sum_lo[m][h], ones))
                                       : _mm256_madd_epi16(sum_lo[m][h], ones);
        }
    }
};

template <WeightFormat F>
void quant_weights_typed(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    auto tile = [&](auto nr, auto mr, int64_t m, int64_t n) { quant_tile<F, nr.value, mr.value>(w, x, m, n, y); };
    if (x.rows == 1) tile_over<4, 1>(x.rows, n_begin, n_end, tile);
    else tile_over<2, 4>(x.rows, n_begin, n_end, tile);
}

}  // namespace

void quant_weights_avx2(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    with_quant_format(w.format, [&](auto f) {
        if (w.tiled.data != nullptr) return tiled_weights_typed<MaddubsDots, f.value>(w, x, n_begin, n_end, y);
        quant_weights_typed<f.value>(w, x, n_begin, n_end, y);
    });
}

// the steps of quantize_rows_portable, 8 values at a time (the float -> double -> float products and
// round-half-even keep the codes bit for bit)
void quantize_rows_avx2(const float* x, int64_t cols, int64_t row_begin, int64_t row_end, const QuantizedRows& out) {
    const int64_t n_blocks = out.padded_cols / kBlock;
    const __m256 radix = _mm256_set1_ps((float)kResidualRadix), limit = _mm256_set1_ps(127.0f);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Loads block b of row xr into v; its absmax, or NaN where it holds NaN or infinity (|v| > FLT_MAX,
    // unordered for NaN: as quantize_rows_portable).
    const auto load_block = [&](const float* xr, int64_t b, __m256* v) {
        const int64_t start = b * kBlock;
        __m256 amax = _mm256_setzero_ps();
        int non_finite = 0;
        for (int j = 0; j < 4; ++j) {
            const int64_t left = cols - start - 8 * j;
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::clamp<int64_t>(left, 0, 8)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            v[j] = _mm256_maskload_ps(xr + start + 8 * j, mask);
            const __m256 magnitude = _mm256_and_ps(v[j], abs_mask);
            amax = _mm256_max_ps(amax, magnitude);
            non_finite |= _mm256_movemask_ps(_mm256_cmp_ps(magnitude, largest, _CMP_NLE_UQ));
        }
        if (non_finite) return std::numeric_limits<float>::quiet_NaN();
        __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
        return _mm_cvtss_f32(_mm_max_ss(a4, _mm_movehdup_ps(a4)));
    };
    const bool outliers = out.outlier_blocks_only();
    for (int64_t m = row_begin; m < row_end; ++m) {
        const float* xr = x + m * cols;
        float threshold = 0.0f;  // outlier_threshold's float: the same sum of the same exact maxima
        if (outliers) {
            float total = 0.0f;
            __m256 v[4];
            for (int64_t b = 0; b < n_blocks; ++b) {
                const float block_max = load_block(xr, b, v);
                if (block_max == block_max) total += block_max;  // finite blocks only
            }
            threshold = out.outlier_factor * (total / (float)n_blocks);
        }
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t start = b * kBlock;
            __m256 v[4];
            const float block_max = load_block(xr, b, v);
            if (block_max != block_max) {  // codes 0, step and sum NaN
                std::memset(out.hi + m * out.padded_cols + start, 0, kBlock);
                std::memset(out.lo + m * out.padded_cols + start, 0, kBlock);
                out.step[m * n_blocks + b] = out.sum[m * n_blocks + b] = std::numeric_limits<float>::quiet_NaN();
                continue;
            }
            // the block's codes, one term or two; returns the sum of the codes (254 hi + lo) and of
            // their magnitudes (integers below 2^24: exact in float in any order)
            __m256i hi[4], lo[4];
            const auto codes = [&](bool one_term) {
                const double units_per_max = one_term ? 127.0 : 127.0 * kResidualRadix;
                const __m256d inverse = _mm256_set1_pd(block_max > 0.0f ? units_per_max / (double)block_max : 0.0);
                __m256 total = _mm256_setzero_ps(), magnitude = _mm256_setzero_ps();
                for (int j = 0; j < 4; ++j) {
                    const __m128 lower = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v[j])), inverse));
                    const __m128 upper = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v[j], 1)), inverse));
                    const __m256 units = _mm256_insertf128_ps(_mm256_castps128_ps256(lower), upper, 1);
                    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                    __m256 h = one_term ? _mm256_setzero_ps() : _mm256_round_ps(_mm256_div_ps(units, radix), nearest);
                    h = _mm256_max_ps(_mm256_min_ps(h, limit), _mm256_sub_ps(_mm256_setzero_ps(), limit));
                    __m256 l = _mm256_round_ps(_mm256_sub_ps(units, _mm256_mul_ps(h, radix)), nearest);
                    l = _mm256_max_ps(_mm256_min_ps(l, limit), _mm256_sub_ps(_mm256_setzero_ps(), limit));
                    const __m256 code = _mm256_fmadd_ps(h, radix, l);
                    total = _mm256_add_ps(total, code);
                    magnitude = _mm256_add_ps(magnitude, _mm256_and_ps(code, abs_mask));
                    hi[j] = _mm256_cvtps_epi32(h);
                    lo[j] = _mm256_cvtps_epi32(l);
                }
                return std::make_pair(hsum(total), hsum(magnitude));
            };
            bool one_term = out.terms == 1 || !(block_max > threshold);  // hi zero
            auto [code_total, code_magnitude] = codes(one_term);
            if (one_term && outliers && code_magnitude < (float)out.min_code_sum && block_max > 0.0f) {
                one_term = false;  // a block one value dwarfs: two terms (weights.h)
                std::tie(code_total, code_magnitude) = codes(false);
            }
            auto pack = [&](const __m256i* q) {
                const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                return _mm256_permutevar8x32_epi32(bytes, order);
            };
            _mm256_storeu_si256((__m256i*)(out.hi + m * out.padded_cols + start), pack(hi));
            _mm256_storeu_si256((__m256i*)(out.lo + m * out.padded_cols + start), pack(lo));
            const float step = one_term ? block_max / 127.0f : block_max / (127.0f * (float)kResidualRadix);
            out.step[m * n_blocks + b] = step;
            out.sum[m * n_blocks + b] = step * code_total;
        }
    }
}

const CpuKernels kAvx2Kernels = {"avx2", float_weights_avx2, quant_weights_avx2, quantize_rows_avx2, true, attend_avx2,
                                swiglu_avx2, round_to_f16_avx2};

}  // namespace pyllm
