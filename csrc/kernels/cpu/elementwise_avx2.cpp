// AVX2 + FMA + F16C element-wise kernels (CpuKernels::swiglu, round_to_f16 in
// kernels.h), compiled with -mavx2 -mfma -mf16c: elementwise_portable.cpp's
// arithmetic on 8 lanes, the ragged ends with masked loads and stores.
#include <immintrin.h>

#include <algorithm>

#include "fast_exp.h"
#include "kernels.h"

namespace pyllm {

void swiglu_avx2(const float* gate, const float* up, int64_t n, float* out) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(8, n - i)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 g = _mm256_maskload_ps(gate + i, mask);
        const __m256 e = exp_nonpositive8(_mm256_or_ps(g, sign));  // e^-|g|
        const __m256 numerator = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
        const __m256 sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
        _mm256_maskstore_ps(out + i, mask, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_maskload_ps(up + i, mask)));
    }
}

// vcvtps2ph rounds to nearest even like f32_to_f16; NaNs stay NaN (their payload may differ).
void round_to_f16_avx2(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) out[i] = (uint16_t)_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

}  // namespace pyllm
