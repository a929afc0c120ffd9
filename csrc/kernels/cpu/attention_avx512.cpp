// AVX-512 attention kernel (CpuKernels::attend in kernels.h), compiled with
// -mavx512f -mavx512bw -mavx512vl and run only when the CPU has them. The same
// arithmetic as attention_avx2.cpp (each score a sum over the head dimensions in
// order, each output a sum over the keys in order), in wider register tiles:
//   scores:  32 keys (2 vectors) x up to 12 query heads per tile, 24 accumulators:
//            two key loads feed 24 FMAs, the query value an FMA's broadcast operand
//   outputs: 64 head dimensions (4 vectors) x up to 6 query heads per tile, 24 accumulators
// (AVX2 has 16 registers: 16 keys x 4 heads and 32 dims x 3 heads, 8 and 12
// accumulators, too few FMAs in flight to hide their latency.) Ragged ends (key
// counts, head_dim not a multiple of 16) use masked loads and stores. f32 and
// f16 caches (f16 converted 16 values at a time); q8_0 caches and the softmax
// numerators are attention_avx2.cpp's.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace pyllm {
namespace {

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

// 16 consecutive cache values as floats; load16_part: only the lanes of `mask`, the others 0,
// nothing read past them.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load16_part(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16_part(const uint16_t* p, __mmask16 mask) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// scores[g][t0 .. t0 + 16 * KV) for GH heads; the last vector holds `tail` keys (16 = full).
//   q: f32 [GH, D]   keys_t: T [D, stride]   scores: f32 [GH, len]
template <int GH, int KV, typename T>
inline void score_tile(const float* q, int64_t D, const T* keys_t, int64_t stride, int64_t t0, int64_t tail,
                       float* scores, int64_t len) {
    const __mmask16 mask = first_lanes(tail);
    __m512 acc[GH][KV];
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < KV; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; ++i) {
        const T* row = keys_t + i * stride + t0;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kKeyPrefetchBytes, _MM_HINT_T0);  // kernels.h
        __m512 k[KV];
        for (int v = 0; v < KV; ++v) k[v] = v == KV - 1 && tail < 16 ? load16_part(row + 16 * v, mask) : load16(row + 16 * v);
        for (int g = 0; g < GH; ++g) {
            const __m512 qi = _mm512_set1_ps(q[g * D + i]);
            for (int v = 0; v < KV; ++v) acc[g][v] = _mm512_fmadd_ps(qi, k[v], acc[g][v]);
        }
    }
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < KV; ++v) {
            float* dst = scores + g * len + t0 + 16 * v;
            if (v == KV - 1 && tail < 16) _mm512_mask_storeu_ps(dst, mask, acc[g][v]);
            else _mm512_storeu_ps(dst, acc[g][v]);
        }
}

template <int GH, typename T>
void score_heads(const float* q, int64_t D, const T* keys_t, int64_t stride, int64_t len, float* scores) {
    int64_t t = 0;
    for (; t + 32 <= len; t += 32) score_tile<GH, 2>(q, D, keys_t, stride, t, 16, scores, len);
    for (; t < len; t += 16) score_tile<GH, 1>(q, D, keys_t, stride, t, std::min<int64_t>(16, len - t), scores, len);
}

// out[g][d0 .. d0 + 16 * DV) = sum_t p[g][t] v_t for GH heads; the last vector holds `tail` dims.
//   p: f32 [GH, len] (row stride len)   values: T [len, D]   out: f32 [GH, D]
template <int GH, int DV, typename T>
inline void output_tile(const float* p, int64_t len, const T* values, int64_t D, int64_t d0, int64_t tail,
                        float* out) {
    const __mmask16 mask = first_lanes(tail);
    __m512 acc[GH][DV];
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
        const T* row = values + t * D + d0;
        __m512 val[DV];
        for (int v = 0; v < DV; ++v) val[v] = v == DV - 1 && tail < 16 ? load16_part(row + 16 * v, mask) : load16(row + 16 * v);
        for (int g = 0; g < GH; ++g) {
            const __m512 pt = _mm512_set1_ps(p[g * len + t]);
            for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_fmadd_ps(pt, val[v], acc[g][v]);
        }
    }
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < DV; ++v) {
            float* dst = out + g * D + d0 + 16 * v;
            if (v == DV - 1 && tail < 16) _mm512_mask_storeu_ps(dst, mask, acc[g][v]);
            else _mm512_storeu_ps(dst, acc[g][v]);
        }
}

template <int GH, typename T>
void output_heads(const float* p, int64_t len, const T* values, int64_t D, float* out) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) output_tile<GH, 4>(p, len, values, D, d, 16, out);
    for (; d < D; d += 16) output_tile<GH, 1>(p, len, values, D, d, std::min<int64_t>(16, D - d), out);
}

template <typename T>
void attend_typed(const float* q, int64_t group, int64_t D, const T* keys_t, int64_t key_stride, const T* values,
                  int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    by_heads<12>(group, [&](int64_t g, auto gh) {
        score_heads<decltype(gh)::value>(q + g * D, D, keys_t, key_stride, len, scores + g * len);
    });
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) softmax_numerators_avx2(scores + g * len, len, max + g, sum + g);
    by_heads<6>(group, [&](int64_t g, auto gh) {
        output_heads<decltype(gh)::value>(scores + g * len, len, values, D, out + g * D);
    });
}

}  // namespace

void attend_avx512(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                   const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out,
                   float* max, float* sum) {
    if (kv == KvType::Q8_0)
        return attend_avx2(q, group, D, kv, keys_t, key_stride, values, len, shaping, scores, out, max, sum);
    with_kv_type(kv, keys_t, values, [&](auto keys_typed, auto values_typed) {
        attend_typed(q, group, D, keys_typed, key_stride, values_typed, len, shaping, scores, out, max, sum);
    });
}

}  // namespace pyllm
