// Portable attention kernel (see CpuKernels::attend in kernels.h): plain C++
// that compilers vectorize, the reference for the SIMD variants; and the q8_0
// quantizer of the KV cache (one for every variant: a few hundred values per token).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../../core/numeric.h"
#include "fast_exp.h"
#include "kernels.h"

namespace pyllm {

namespace {

inline float kv_value(const float* p, int64_t i) { return p[i]; }
inline float kv_value(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }

// Shaping, then each head's softmax numerators exp(s - max) in place, its max and their sum.
//   scores: f32 [group, len]   max, sum: f32 [group]
void shape_and_exp(const ScoreShaping* shaping, int64_t group, int64_t len, float* scores, float* max, float* sum) {
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * len;
        float max_score = -INFINITY;
        for (int64_t t = 0; t < len; ++t) max_score = std::max(max_score, sg[t]);
        float total = 0.0f;
        // a masked key (score -inf) gives exactly 0 (exp_nonpositive's floor is e^-87)
        for (int64_t t = 0; t < len; ++t) sg[t] = sg[t] == -INFINITY ? 0.0f : exp_nonpositive(sg[t] - max_score);
        for (int64_t t = 0; t < len; ++t) total += sg[t];
        max[g] = max_score;
        sum[g] = total;
    }
}

//   keys_t: T [D, key_stride]   values: T [len, D]
template <typename T>
void attend_typed(const float* q, int64_t group, int64_t D, const T* keys_t, int64_t key_stride, const T* values,
                  int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    // scores[g][t] = q_g . k_t, one head dimension at a time (vectorizes over t)
    std::fill_n(scores, group * len, 0.0f);
    for (int64_t i = 0; i < D; ++i) {
        const T* key_row = keys_t + i * key_stride;
        for (int64_t g = 0; g < group; ++g) {
            const float qi = q[g * D + i];
            float* sg = scores + g * len;
            for (int64_t t = 0; t < len; ++t) sg[t] += qi * kv_value(key_row, t);
        }
    }
    shape_and_exp(shaping, group, len, scores, max, sum);
    std::fill_n(out, group * D, 0.0f);
    for (int64_t t = 0; t < len; ++t) {
        const T* vt = values + t * D;
        for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t];
            float* o = out + g * D;
            for (int64_t i = 0; i < D; ++i) o[i] += p * kv_value(vt, i);
        }
    }
}

// The same over a q8_0 cache: a key's score is sum over its blocks of d * (q . codes).
//   keys, values: [len, D / 32 blocks of kQ8BlockBytes]
void attend_q8_0(const float* q, int64_t group, int64_t D, const uint8_t* keys, const uint8_t* values, int64_t len,
                 const ScoreShaping* shaping, float* scores, float* out, float* max, float* sum) {
    const int64_t blocks = D / kQ8Block, row_bytes = blocks * kQ8BlockBytes;
    for (int64_t t = 0; t < len; ++t)
        for (int64_t g = 0; g < group; ++g) {
            float score = 0.0f;
            for (int64_t b = 0; b < blocks; ++b) {
                const uint8_t* block = keys + t * row_bytes + b * kQ8BlockBytes;
                const int8_t* codes = reinterpret_cast<const int8_t*>(block + 2);
                const float* qb = q + g * D + b * kQ8Block;
                float dot = 0.0f;
                for (int64_t j = 0; j < kQ8Block; ++j) dot += qb[j] * (float)codes[j];
                score += q8_scale(block) * dot;
            }
            scores[g * len + t] = score;
        }
    shape_and_exp(shaping, group, len, scores, max, sum);
    std::fill_n(out, group * D, 0.0f);
    for (int64_t t = 0; t < len; ++t)
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t* block = values + t * row_bytes + b * kQ8BlockBytes;
            const int8_t* codes = reinterpret_cast<const int8_t*>(block + 2);
            const float d = q8_scale(block);
            for (int64_t g = 0; g < group; ++g) {
                const float w = scores[g * len + t] * d;
                float* o = out + g * D + b * kQ8Block;
                for (int64_t j = 0; j < kQ8Block; ++j) o[j] += w * (float)codes[j];
            }
        }
}

}  // namespace

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
    for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const float* xb = x + b * kQ8Block;
        uint8_t* block = out + b * kQ8BlockBytes;
        float amax = 0.0f;
        for (int64_t j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t d16 = f32_to_f16(d);
        std::memcpy(block, &d16, 2);
        for (int64_t j = 0; j < kQ8Block; ++j) block[2 + j] = (uint8_t)(int8_t)std::lround(xb[j] * inverse);
    }
}

void shape_scores(const ScoreShaping& shaping, int64_t group, int64_t len, float* scores) {
    if (shaping.alibi)
        for (int64_t g = 0; g < group; ++g)
            for (int64_t t = 0; t < len; ++t) scores[g * len + t] += shaping.alibi[g] * (shaping.first_key + (float)t);
    if (shaping.softcap > 0.0f) {
        const float inverse = 1.0f / shaping.softcap;
        for (int64_t i = 0; i < group * len; ++i) scores[i] = shaping.softcap * std::tanh(scores[i] * inverse);
    }
    if (shaping.row_heads > 0)
        for (int64_t g = 0; g < group; ++g) {
            const int64_t last = shaping.last_key + g / shaping.row_heads;
            const int64_t first = shaping.window > 0 ? std::max<int64_t>(0, last - shaping.window + 1) : 0;
            // (a row whose own key comes before the first key, last < 0, sees none of them)
            std::fill(scores + g * len, scores + g * len + std::clamp<int64_t>(first, 0, len), -INFINITY);
            const int64_t after = std::max<int64_t>(last + 1, 0);
            if (after < len) std::fill(scores + g * len + after, scores + (g + 1) * len, -INFINITY);
        }
}

void attend_portable(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
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
