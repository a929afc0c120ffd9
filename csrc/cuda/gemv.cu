// The decode matmul (GEMV, M <= kMaxGemvRows): one warp per output row, each
// lane decoding whole 32-value chunks with 128-bit loads, dot products in f32.
#include <algorithm>

#include "chunk.cuh"
#include "matmul_paths.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kGemvWarps = 4;  // output rows per block

// x: f32 [M, K]   y: f32 [M, ldy]; rows m < M (M <= MT) of y get column n.
template <WeightFormat F, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(WeightArgs w, const float* __restrict__ x, int M, float* __restrict__ y, int64_t ldy, bool accumulate) {
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
    if (n >= w.rows) return;
    const int64_t K = w.cols;
    const bool full_chunks = K % kChunk == 0;  // then every x chunk is 32 aligned floats
    const uint8_t* row = w.data + n * w.row_stride;
    const int64_t n_chunks = w.padded_cols / kChunk;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

#pragma unroll 2
    for (int64_t c = lane; c < n_chunks; c += 32) {
        float raw[kChunk];
        decode_chunk<F>(row, c, raw);
        float scale, min;
        chunk_affine<F>(w, n, c, scale, min);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m >= M) break;
            const float* xc = x + (int64_t)m * K + c * kChunk;
            float dot = 0.0f, x_sum = 0.0f;
            if (full_chunks) {
#pragma unroll
                for (int j = 0; j < kChunk / 4; ++j) {
                    const float4 xv = __ldg(reinterpret_cast<const float4*>(xc) + j);
                    dot = fmaf(raw[4 * j], xv.x, dot);
                    dot = fmaf(raw[4 * j + 1], xv.y, dot);
                    dot = fmaf(raw[4 * j + 2], xv.z, dot);
                    dot = fmaf(raw[4 * j + 3], xv.w, dot);
                    if constexpr (F == WeightFormat::Q4_ASYM) x_sum += (xv.x + xv.y) + (xv.z + xv.w);
                }
            } else {
                const int64_t valid = K - c * kChunk;  // values of this chunk inside the row
#pragma unroll
                for (int i = 0; i < kChunk; ++i) {
                    const float xv = i < valid ? __ldg(xc + i) : 0.0f;
                    dot = fmaf(raw[i], xv, dot);
                    if constexpr (F == WeightFormat::Q4_ASYM) x_sum += xv;
                }
            }
            acc[m] = fmaf(scale, dot, acc[m]);
            if constexpr (F == WeightFormat::Q4_ASYM) acc[m] = fmaf(min, x_sum, acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        float v = acc[m];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        acc[m] = v;
    }
    if (lane == 0) {
        const float b = w.bias ? w.bias[n] : 0.0f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m >= M) break;
            float* out = y + (int64_t)m * ldy + n;
            *out = (accumulate ? *out : 0.0f) + acc[m] + b;
        }
    }
}

template <WeightFormat F>
void launch_gemv(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate,
                 cudaStream_t stream) {
    const dim3 grid((unsigned)((w.rows + kGemvWarps - 1) / kGemvWarps)), block(kGemvWarps * 32);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvRows) {
        const int rows = (int)std::min<int64_t>(kMaxGemvRows, M - m0);
        const float* xs = x + m0 * w.cols;
        float* ys = y + m0 * ldy;
        if (rows == 1) gemv_kernel<F, 1><<<grid, block, 0, stream>>>(w, xs, rows, ys, ldy, accumulate);
        else if (rows == 2) gemv_kernel<F, 2><<<grid, block, 0, stream>>>(w, xs, rows, ys, ldy, accumulate);
        else if (rows <= 4) gemv_kernel<F, 4><<<grid, block, 0, stream>>>(w, xs, rows, ys, ldy, accumulate);
        else gemv_kernel<F, 8><<<grid, block, 0, stream>>>(w, xs, rows, ys, ldy, accumulate);
        PYLLM_CUDA_CHECK_LAUNCH("gemv");
    }
}

}  // namespace

void gemv(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
    dispatch_format(w.format, [&]<WeightFormat F>() { launch_gemv<F>(w, x, M, y, ldy, accumulate, stream); });
}

}  // namespace cuda
}  // namespace pyllm
