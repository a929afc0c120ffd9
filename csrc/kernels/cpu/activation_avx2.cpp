// AVX2 + FMA SwiGLU kernel (CpuKernels::swiglu in kernels.h), compiled with
// -mavx2 -mfma: activation_portable.cpp's arithmetic on 8 lanes, the ragged
// end with masked loads and stores.
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

}  // namespace pyllm
