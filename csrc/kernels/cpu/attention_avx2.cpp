// AVX2 + FMA attention kernel (CpuKernels::attend in kernels.h), compiled with
// -mavx2 -mfma and run only when the CPU has them. Same arithmetic as
// attention_portable.cpp, in register tiles:
//   scores:  16 keys x up to 4 query heads per tile (one key load feeds 4 heads)
//   outputs: 32 head dimensions x up to 3 query heads per tile (one value load feeds 3 heads)
// Ragged ends (len or D not a multiple of 8) use masked loads and stores.
// The cache is f32 or f16 (converted 8 values at a time with F16C), or q8_0 rows:
//   scores:  4 keys x up to 3 query heads per tile, each key's codes converted once for
//            the heads, the 4 keys' sums reduced together
//   outputs: one 32-dim block x up to 3 query heads per tile
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fast_exp.h"
#include "kernels.h"

namespace pyllm {
namespace {

// Lanes [0, n) on, the rest off (n in 0..8), for maskload/maskstore.
inline __m256i lane_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 consecutive cache values as floats; load_kv_part: only the first n (n < 8),
// the other lanes 0, nothing read past them.
inline __m256 load_kv8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_kv8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256 load_kv_part(const float* p, int64_t n) { return _mm256_maskload_ps(p, lane_mask(n)); }
inline __m256 load_kv_part(const uint16_t* p, int64_t n) {
    alignas(16) uint16_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) part[i] = p[i];
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)part));
}

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// scores[g][t0 .. t0 + 8 * KV) for GH heads; the last vector holds `tail` keys (8 = full).
//   q: f32 [GH, D]   keys_t: T [D, stride]   scores: f32 [GH, len]
template <int GH, int KV, typename T>
inline void score_tile(const float* q, int64_t D, const T* keys_t, int64_t stride, int64_t t0, int64_t tail,
                       float* scores, int64_t len) {
    const __m256i mask = lane_mask(tail);
    __m256 acc[GH][KV];
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < KV; ++v) acc[g][v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; ++i) {
        const T* row = keys_t + i * stride + t0;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kKeyPrefetchBytes, _MM_HINT_T0);  // kernels.h
        __m256 k[KV];
        for (int v = 0; v < KV; ++v) k[v] = v == KV - 1 && tail < 8 ? load_kv_part(row + 8 * v, tail) : load_kv8(row + 8 * v);
        for (int g = 0; g < GH; ++g) {
            const __m256 qi = _mm256_broadcast_ss(q + g * D + i);
            for (int v = 0; v < KV; ++v) acc[g][v] = _mm256_fmadd_ps(qi, k[v], acc[g][v]);
        }
    }
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < KV; ++v) {
            float* dst = scores + g * len + t0 + 8 * v;
            if (v == KV - 1 && tail < 8) _mm256_maskstore_ps(dst, mask, acc[g][v]);
            else _mm256_storeu_ps(dst, acc[g][v]);
        }
}

template <int GH, typename T>
void score_heads(const float* q, int64_t D, const T* keys_t, int64_t stride, int64_t len, float* scores) {
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) score_tile<GH, 2>(q, D, keys_t, stride, t, 8, scores, len);
    for (; t < len; t += 8) score_tile<GH, 1>(q, D, keys_t, stride, t, std::min<int64_t>(8, len - t), scores, len);
}

// out[g][d0 .. d0 + 8 * DV) = sum_t p[g][t] v_t for GH heads; the last vector holds `tail` dims.
//   p: f32 [GH, len] (row stride len)   values: T [len, D]   out: f32 [GH, D]
template <int GH, int DV, typename T>
inline void output_tile(const float* p, int64_t len, const T* values, int64_t D, int64_t d0, int64_t tail,
                        float* out) {
    const __m256i mask = lane_mask(tail);
    __m256 acc[GH][DV];
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < DV; ++v) acc[g][v] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
        const T* row = values + t * D + d0;
        __m256 val[DV];
        for (int v = 0; v < DV; ++v) val[v] = v == DV - 1 && tail < 8 ? load_kv_part(row + 8 * v, tail) : load_kv8(row + 8 * v);
        for (int g = 0; g < GH; ++g) {
            const __m256 pt = _mm256_broadcast_ss(p + g * len + t);
            for (int v = 0; v < DV; ++v) acc[g][v] = _mm256_fmadd_ps(pt, val[v], acc[g][v]);
        }
    }
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < DV; ++v) {
            float* dst = out + g * D + d0 + 8 * v;
            if (v == DV - 1 && tail < 8) _mm256_maskstore_ps(dst, mask, acc[g][v]);
            else _mm256_storeu_ps(dst, acc[g][v]);
        }
}

template <int GH, typename T>
void output_heads(const float* p, int64_t len, const T* values, int64_t D, float* out) {
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) output_tile<GH, 4>(p, len, values, D, d, 8, out);
    for (; d < D; d += 8) output_tile<GH, 1>(p, len, values, D, d, std::min<int64_t>(8, D - d), out);
}

}  // namespace

void softmax_numerators_avx2(float* s, int64_t len, float* max_out, float* sum_out) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
    float max_score = hmax(vmax);
    for (int64_t r = t; r < len; ++r) max_score = std::max(max_score, s[r]);
    const __m256 m = _mm256_set1_ps(max_score);
    __m256 vsum = _mm256_setzero_ps();
    // full vectors with plain loads and stores (a masked store costs many times a plain one on AMD
    // cores), the tail masked
    // a masked key (score -inf) gives exactly 0 (exp_nonpositive8's floor is e^-87)
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    auto numerators = [&](__m256 scores) {
        return _mm256_andnot_ps(_mm256_cmp_ps(scores, minus_inf, _CMP_EQ_OQ), exp_nonpositive8(_mm256_sub_ps(scores, m)));
    };
    for (t = 0; t + 8 <= len; t += 8) {
        const __m256 e = numerators(_mm256_loadu_ps(s + t));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (t < len) {
        const __m256i mask = lane_mask(len - t);
        const __m256 e = numerators(_mm256_maskload_ps(s + t, mask));
        const __m256 kept = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(s + t, mask, kept);
        vsum = _mm256_add_ps(vsum, kept);
    }
    *max_out = max_score;
    *sum_out = hsum(vsum);
}

namespace {

// 8 q8_0 codes as floats.
inline __m256 load_codes8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// The 4 lanes' sums of a[0..3] as one vector [sum a0, sum a1, sum a2, sum a3].
inline __m128 hsum4(const __m256* a) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// scores[g][t0 .. t0 + KT) for GH heads over q8_0 key rows.
//   q: f32 [GH, D]   keys: [len, D / 32 blocks] (row_bytes each)   scores: f32 [GH, len]
template <int GH, int KT>
inline void score_q8_tile(const float* q, int64_t D, const uint8_t* keys, int64_t row_bytes, int64_t t0,
                          float* scores, int64_t len) {
    __m256 acc[GH][KT];
    for (int g = 0; g < GH; ++g)
        for (int k = 0; k < KT; ++k) acc[g][k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < D / kQ8Block; ++b)
        for (int k = 0; k < KT; ++k) {
            const uint8_t* block = keys + (t0 + k) * row_bytes + b * kQ8BlockBytes;
            const __m256 d = _mm256_set1_ps(q8_scale(block));
            for (int v = 0; v < 4; ++v) {
                const __m256 key = _mm256_mul_ps(d, load_codes8(block + 2 + 8 * v));
                for (int g = 0; g < GH; ++g)
                    acc[g][k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + b * kQ8Block + 8 * v), key, acc[g][k]);
            }
        }
    for (int g = 0; g < GH; ++g) {
        float* dst = scores + g * len + t0;
        if (KT == 4) _mm_storeu_ps(dst, hsum4(acc[g]));
        else
            for (int k = 0; k < KT; ++k) {  // in hsum4's order, so that a key's score never depends on its tile
                const __m256 same[4] = {acc[g][k], acc[g][k], acc[g][k], acc[g][k]};
                dst[k] = _mm_cvtss_f32(hsum4(same));
            }
    }
}

template <int GH>
void score_q8_heads(const float* q, int64_t D, const uint8_t* keys, int64_t row_bytes, int64_t len, float* scores) {
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) score_q8_tile<GH, 4>(q, D, keys, row_bytes, t, scores, len);
    for (; t < len; ++t) score_q8_tile<GH, 1>(q, D, keys, row_bytes, t, scores, len);
}

// out[g][32 b .. 32 b + 32) = sum_t p[g][t] d_tb codes_tb for GH heads, every block b.
//   p: f32 [GH, len]   values: [len, D / 32 blocks] (row_bytes each)   out: f32 [GH, D]
template <int GH>
void output_q8_heads(const float* p, int64_t len, const uint8_t* values, int64_t row_bytes, int64_t D, float* out) {
    for (int64_t b = 0; b < D / kQ8Block; ++b) {
        __m256 acc[GH][4];
        for (int g = 0; g < GH; ++g)
            for (int v = 0; v < 4; ++v) acc[g][v] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {
            const uint8_t* block = values + t * row_bytes + b * kQ8BlockBytes;
            const float d = q8_scale(block);
            __m256 w[GH];
            for (int g = 0; g < GH; ++g) w[g] = _mm256_set1_ps(p[g * len + t] * d);
            for (int v = 0; v < 4; ++v) {
                const __m256 value = load_codes8(block + 2 + 8 * v);
                for (int g = 0; g < GH; ++g) acc[g][v] = _mm256_fmadd_ps(w[g], value, acc[g][v]);
            }
        }
        for (int g = 0; g < GH; ++g)
            for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + g * D + b * kQ8Block + 8 * v, acc[g][v]);
    }
}

void attend_q8_0(const float* q, int64_t group, int64_t D, const uint8_t* keys, const uint8_t* values, int64_t len,
                 const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    const int64_t row_bytes = D / kQ8Block * kQ8BlockBytes;
    by_heads<3>(group, [&](int64_t g, auto gh) {
        score_q8_heads<decltype(gh)::value>(q + g * D, D, keys, row_bytes, len, scores + g * len);
    });
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) softmax_numerators_avx2(scores + g * len, len, max + g, sum + g);
    by_heads<3>(group, [&](int64_t g, auto gh) {
        output_q8_heads<decltype(gh)::value>(scores + g * len, len, values, row_bytes, D, out + g * D);
    });
}

template <typename T>
void attend_typed(const float* q, int64_t group, int64_t D, const T* keys_t, int64_t key_stride, const T* values,
                  int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    by_heads<4>(group, [&](int64_t g, auto gh) {
        score_heads<decltype(gh)::value>(q + g * D, D, keys_t, key_stride, len, scores + g * len);
    });
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) softmax_numerators_avx2(scores + g * len, len, max + g, sum + g);
    by_heads<3>(group, [&](int64_t g, auto gh) {
        output_heads<decltype(gh)::value>(scores + g * len, len, values, D, out + g * D);
    });
}

}  // namespace

void attend_avx2(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                 const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                 float* sum) {
    if (kv == KvType::Q8_0)
        return attend_q8_0(q, group, D, static_cast<const uint8_t*>(keys_t), static_cast<const uint8_t*>(values), len,
                           shaping, scores, out, max, sum);
    with_kv_type(kv, keys_t, values, [&](auto keys_typed, auto values_typed) {
        attend_typed(q, group, D, keys_typed, key_stride, values_typed, len, shaping, scores, out, max, sum);
    });
}

}  // namespace pyllm
