// Portable element-wise kernels (CpuKernels::swiglu, round_to_f16 in kernels.h):
// plain C++ that compilers vectorize, the reference for the SIMD variants.
#include <cmath>

#include "../../core/numeric.h"
#include "fast_exp.h"
#include "kernels.h"

namespace pyllm {

// silu(g) = g * sigmoid(g) with sigmoid in the overflow-free form: e = e^-|g|,
// sigmoid = 1 / (1 + e) for g >= 0 and e / (1 + e) below.
void swiglu_portable(const float* gate, const float* up, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        const float e = exp_nonpositive(-std::fabs(g));
        const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
        out[i] = g * sigmoid * up[i];
    }
}

void round_to_f16_portable(const float* x, int64_t n, uint16_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_f16(x[i]);
}

}  // namespace pyllm
