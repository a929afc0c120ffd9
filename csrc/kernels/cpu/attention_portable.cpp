// Portable attention kernel (see CpuKernels::attend in kernels.h): plain C++
// that compilers vectorize, the reference for the SIMD variants.
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
    if (shaping) shape_scores(*shaping, group, len, scores);
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * len;
        float max_score = -INFINITY;
        for (int64_t t = 0; t < len; ++t) max_score = std::max(max_score, sg[t]);
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) sg[t] = exp_nonpositive(sg[t] - max_score);
        for (int64_t t = 0; t < len; ++t) total += sg[t];
        max[g] = max_score;
        sum[g] = total;
    }
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

}  // namespace

void shape_scores(const ScoreShaping& shaping, int64_t group, int64_t len, float* scores) {
    if (shaping.alibi)
        for (int64_t g = 0; g < group; ++g)
            for (int64_t t = 0; t < len; ++t) scores[g * len + t] += shaping.alibi[g] * (shaping.first_key + (float)t);
    if (shaping.softcap > 0.0f) {
        const float inverse = 1.0f / shaping.softcap;
        for (int64_t i = 0; i < group * len; ++i) scores[i] = shaping.softcap * std::tanh(scores[i] * inverse);
    }
}

void attend_portable(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                     const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                 float* sum) {
    with_kv_type(kv, keys_t, values, [&](auto keys_typed, auto values_typed) {
        attend_typed(q, group, D, keys_typed, key_stride, values_typed, len, shaping, scores, out, max, sum);
    });
}

}  // namespace pyllm
