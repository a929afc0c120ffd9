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
// f16 caches (f16 converted 16 values at a time); the softmax numerators are
// attention_avx2.cpp's. q8_0 caches (rows of 32-value blocks, not transposed):
//   scores:  4 keys x up to 6 query heads per tile, each key block's 32 codes widened
//            to two float vectors, scaled once and fed to the heads' FMAs; a key's
//            16-lane sums folded and reduced in one order whatever its tile, so its
//            score never depends on where a run of keys starts
//   outputs: up to 2 blocks (64 dims) x up to 6 query heads per tile, each value block
//            scaled once and fed to the heads' FMAs with their probabilities broadcast
// (AVX2's kernel on 8 lanes ran here before: SmolLM2 int4 at depth 4096 over a q8_0 cache,
// Zen 5, 2 threads, 3 alternating pairs: prefill 359-388 -> 430-472 tok/s, decode 167-190
// -> 201-218 tok/s).
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

// ---- q8_0 caches ---------------------------------------------------------------

// 16 q8_0 codes as floats.
inline __m512 load_codes16(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// The sums of a[0..3]'s lanes as [sum a0, sum a1, sum a2, sum a3]: each folded to 8 lanes, then
// pairwise adds in a fixed order.
inline __m128 hsum4_512(const __m512* a) {
    __m256 half[4];
    for (int k = 0; k < 4; ++k)
        half[k] = _mm256_add_ps(_mm512_castps512_ps256(a[k]), _mm512_extractf32x8_ps(a[k], 1));
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
    return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// scores[g][t0 .. t0 + KT) for GH heads over q8_0 key rows.
//   q: f32 [GH, D]   keys: [len, D / 32 blocks] (row_bytes each)   scores: f32 [GH, len]
template <int GH, int KT>
inline void score_q8_tile(const float* q, int64_t D, const uint8_t* keys, int64_t row_bytes, int64_t t0,
                          float* scores, int64_t len) {
    __m512 acc[GH][KT];
    for (int g = 0; g < GH; ++g)
        for (int k = 0; k < KT; ++k) acc[g][k] = _mm512_setzero_ps();
    for (int64_t b = 0; b < D / kQ8Block; ++b)
        for (int k = 0; k < KT; ++k) {
            const uint8_t* block = keys + (t0 + k) * row_bytes + b * kQ8BlockBytes;
            const __m512 d = _mm512_set1_ps(q8_scale(block));
            for (int h = 0; h < 2; ++h) {
                const __m512 key = _mm512_mul_ps(d, load_codes16(block + 2 + 16 * h));
                for (int g = 0; g < GH; ++g)
                    acc[g][k] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + b * kQ8Block + 16 * h), key, acc[g][k]);
            }
        }
    for (int g = 0; g < GH; ++g) {
        float* dst = scores + g * len + t0;
        if constexpr (KT == 4) {
            _mm_storeu_ps(dst, hsum4_512(acc[g]));
        } else {
            for (int k = 0; k < KT; ++k) {  // in hsum4_512's order, as a key of a 4-key tile
                const __m512 same[4] = {acc[g][k], acc[g][k], acc[g][k], acc[g][k]};
                dst[k] = _mm_cvtss_f32(hsum4_512(same));
            }
        }
    }
}

template <int GH>
void score_q8_heads(const float* q, int64_t D, const uint8_t* keys, int64_t row_bytes, int64_t len, float* scores) {
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) score_q8_tile<GH, 4>(q, D, keys, row_bytes, t, scores, len);
    for (; t < len; ++t) score_q8_tile<GH, 1>(q, D, keys, row_bytes, t, scores, len);
}

// out[g][32 b0 .. 32 (b0 + NB)) = sum_t p[g][t] d_tb codes_tb for GH heads, NB blocks from b0.
//   p: f32 [GH, len]   values: [len, D / 32 blocks] (row_bytes each)   out: f32 [GH, D]
template <int GH, int NB>
void output_q8_tile(const float* p, int64_t len, const uint8_t* values, int64_t row_bytes, int64_t D, int64_t b0,
                    float* out) {
    __m512 acc[GH][2 * NB];
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < 2 * NB; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
        const uint8_t* row = values + t * row_bytes + b0 * kQ8BlockBytes;
        __m512 value[2 * NB];
        for (int b = 0; b < NB; ++b) {
            const __m512 d = _mm512_set1_ps(q8_scale(row + b * kQ8BlockBytes));
            for (int h = 0; h < 2; ++h)
                value[2 * b + h] = _mm512_mul_ps(d, load_codes16(row + b * kQ8BlockBytes + 2 + 16 * h));
        }
        for (int g = 0; g < GH; ++g) {
            const __m512 pt = _mm512_set1_ps(p[g * len + t]);
            for (int v = 0; v < 2 * NB; ++v) acc[g][v] = _mm512_fmadd_ps(pt, value[v], acc[g][v]);
        }
    }
    for (int g = 0; g < GH; ++g)
        for (int v = 0; v < 2 * NB; ++v) _mm512_storeu_ps(out + g * D + b0 * kQ8Block + 16 * v, acc[g][v]);
}

template <int GH>
void output_q8_heads(const float* p, int64_t len, const uint8_t* values, int64_t row_bytes, int64_t D, float* out) {
    const int64_t n_blocks = D / kQ8Block;
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) output_q8_tile<GH, 2>(p, len, values, row_bytes, D, b, out);
    for (; b < n_blocks; ++b) output_q8_tile<GH, 1>(p, len, values, row_bytes, D, b, out);
}

void attend_q8_0(const float* q, int64_t group, int64_t D, const uint8_t* keys, const uint8_t* values, int64_t len,
                 const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    const int64_t row_bytes = kv_row_bytes(KvType::Q8_0, D);
    by_heads<6>(group, [&](int64_t g, auto gh) {
        score_q8_heads<decltype(gh)::value>(q + g * D, D, keys, row_bytes, len, scores + g * len);
    });
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) softmax_numerators_avx2(scores + g * len, len, max + g, sum + g);
    by_heads<6>(group, [&](int64_t g, auto gh) {
        output_q8_heads<decltype(gh)::value>(scores + g * len, len, values, row_bytes, D, out + g * D);
    });
}

}  // namespace

void attend_avx512(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                   const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out,
                   float* max, float* sum) {
    if (kv == KvType::Q8_0)
        return attend_q8_0(q, group, D, static_cast<const uint8_t*>(keys_t), static_cast<const uint8_t*>(values), len,
                           shaping, scores, out, max, sum);
    with_kv_type(kv, keys_t, values, [&](auto keys_typed, auto values_typed) {
        attend_typed(q, group, D, keys_typed, key_stride, values_typed, len, shaping, scores, out, max, sum);
    });
}

}  // namespace pyllm
