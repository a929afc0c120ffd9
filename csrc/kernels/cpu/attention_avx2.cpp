// AVX2 + FMA attention kernel (CpuKernels::attend in kernels.h), compiled with
// -mavx2 -mfma and run only when the CPU has them. Same arithmetic as
// attention_portable.cpp, in register tiles:
//   scores:  16 keys x up to 4 query heads per tile (one key load feeds 4 heads)
//   outputs: 32 head dimensions x up to 3 query heads per tile (one value load feeds 3 heads)
// Ragged ends (len or D not a multiple of 8) use masked loads and stores.
// The cache is f32 or f16 (converted 8 values at a time with F16C).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

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

// Softmax numerators of one head's scores in place; returns (max, sum).
void exp_scores(float* s, int64_t len, float* max_out, float* sum_out) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
    float max_score = hmax(vmax);
    for (int64_t r = t; r < len; ++r) max_score = std::max(max_score, s[r]);
    const __m256 m = _mm256_set1_ps(max_score);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t < len; t += 8) {
        const int64_t n = std::min<int64_t>(8, len - t);
        const __m256i mask = lane_mask(n);
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(s + t, mask), m));
        const __m256 kept = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(s + t, mask, kept);
        vsum = _mm256_add_ps(vsum, kept);
    }
    *max_out = max_score;
    *sum_out = hsum(vsum);
}


template <typename T>
void attend_typed(const float* q, int64_t group, int64_t D, const T* keys_t, int64_t key_stride, const T* values,
                  int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    for (int64_t g = 0; g < group;) {
        const int64_t gh = std::min<int64_t>(4, group - g);
        const float* qg = q + g * D;
        float* sg = scores + g * len;
        switch (gh) {
            case 4: score_heads<4>(qg, D, keys_t, key_stride, len, sg); break;
            case 3: score_heads<3>(qg, D, keys_t, key_stride, len, sg); break;
            case 2: score_heads<2>(qg, D, keys_t, key_stride, len, sg); break;
            default: score_heads<1>(qg, D, keys_t, key_stride, len, sg); break;
        }
        g += gh;
    }
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) exp_scores(scores + g * len, len, max + g, sum + g);
    for (int64_t g = 0; g < group;) {
        const int64_t gh = std::min<int64_t>(3, group - g);
        const float* pg = scores + g * len;
        float* og = out + g * D;
        switch (gh) {
            case 3: output_heads<3>(pg, len, values, D, og); break;
            case 2: output_heads<2>(pg, len, values, D, og); break;
            default: output_heads<1>(pg, len, values, D, og); break;
        }
        g += gh;
    }
}

}  // namespace

void attend_avx2(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                 const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                 float* sum) {
    with_kv_type(kv, keys_t, values, [&](auto keys_typed, auto values_typed) {
        attend_typed(q, group, D, keys_typed, key_stride, values_typed, len, shaping, scores, out, max, sum);
    });
}

}  // namespace pyllm
