// The two matmul paths behind linear() (kernels.h), one translation unit each.
//   x: f32 [M, w.cols]   y: f32 [M, ldy]; y (+)= x @ W^T + bias
#pragma once
#include "kernels.h"

namespace pyllm {
namespace cuda {

// One warp per output row; any M (in blocks of kMaxGemvRows rows).
void gemv(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate, cudaStream_t stream);
// Tensor cores on f16 copies of x and of the weight tiles, f32 accumulation.
void gemm(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate, MatmulWorkspace& ws,
          cudaStream_t stream);

}  // namespace cuda
}  // namespace pyllm
