// The prefill matmul (GEMM): 64 x 128 output tiles on tensor cores (wmma, f16
// inputs, f32 accumulation); each block dequantizes its weight tile to f16 in
// shared memory, the activations are converted to f16 once per call.
#include <mma.h>

#include "chunk.cuh"
#include "matmul_paths.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kTileM = 64, kTileN = 128, kTileK = 64;  // kTileK: two chunks
constexpr int kGemmThreads = 256;                       // 8 warps: 2 (M) x 4 (N), 32 x 32 each
constexpr int kSmemPad = 8;                             // halves of padding per shared row
constexpr int kOutPad = 4;

// x: f32 [M, K] -> f16 [M, Kp], zero beyond K.
__global__ void to_f16_padded_kernel(const float* __restrict__ x, int64_t M, int64_t K, int64_t Kp,
                                     __half* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * Kp) return;
    const int64_t m = i / Kp, k = i % Kp;
    out[i] = __float2half_rn(k < K ? x[m * K + k] : 0.0f);
}

// x16: f16 [M, Kp]   y: f32 [M, ldy]
template <WeightFormat F>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(WeightArgs w, const __half* __restrict__ x16, int M, float* __restrict__ y, int64_t ldy, bool accumulate) {
    using namespace nvcuda;
    constexpr int lda = kTileK + kSmemPad, ldc = kTileN + kOutPad;
    struct Tiles {
        __half a[kTileM][lda];  // activations [m][k]
        __half b[kTileN][lda];  // weights [n][k]: the K x N operand, column-major
    };
    constexpr size_t kTileBytes = sizeof(Tiles), kOutBytes = sizeof(float) * kTileM * ldc;
    __shared__ __align__(128) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
    Tiles& t = *reinterpret_cast<Tiles*>(smem);
    float* out_tile = reinterpret_cast<float*>(smem);  // [kTileM][ldc], after the main loop

    const int tid = threadIdx.x, warp = tid >> 5;
    const int warp_m = warp / 4, warp_n = warp % 4;
    const int64_t m0 = (int64_t)blockIdx.y * kTileM, n0 = (int64_t)blockIdx.x * kTileN;
    const int64_t Kp = w.padded_cols, n_chunks = Kp / kChunk;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    // Each step's global loads are issued into registers before the previous
    // step's tensor-core work, then decoded into shared memory after it.
    constexpr int kAVectors = kTileM * kTileK / 8 / kGemmThreads;  // 8-half vectors of activations per thread
    uint4 a_next[kAVectors];
    ChunkBits<F> b_next;
    float scale_next = 0.0f, min_next = 0.0f;
    const int b_row = tid / 2, b_half = tid % 2;  // this thread's weight chunk within the tile
    const int64_t b_n = n0 + b_row;
    auto load_step = [&](int64_t k0) {
#pragma unroll
        for (int i = 0; i < kAVectors; ++i) {
            const int idx = tid + i * kGemmThreads, r = idx / (kTileK / 8), v = idx % (kTileK / 8);
            const int64_t m = m0 + r, k = k0 + v * 8;
            a_next[i] = m < M && k < Kp ? *reinterpret_cast<const uint4*>(x16 + m * Kp + k) : make_uint4(0, 0, 0, 0);
        }
        const int64_t c = k0 / kChunk + b_half;
        if (b_n < w.rows && c < n_chunks) {
            b_next = load_chunk<F>(w.data + b_n * w.row_stride, c);
            chunk_affine<F>(w, b_n, c, scale_next, min_next);
        } else {
#pragma unroll
            for (int i = 0; i < ChunkBits<F>::kVectors; ++i) b_next.v[i] = make_uint4(0, 0, 0, 0);
            scale_next = min_next = 0.0f;  // decodes to zeros whatever the format
        }
    };

    load_step(0);
    for (int64_t k0 = 0; k0 < Kp; k0 += kTileK) {
        __syncthreads();  // the previous step's tiles are consumed
#pragma unroll
        for (int i = 0; i < kAVectors; ++i) {
            const int idx = tid + i * kGemmThreads, r = idx / (kTileK / 8), v = idx % (kTileK / 8);
            *reinterpret_cast<uint4*>(&t.a[r][v * 8]) = a_next[i];
        }
        {
            float raw[kChunk];
            decode_bits<F>(b_next, raw);
            __half2 vals[kChunk / 2];
#pragma unroll
            for (int i = 0; i < kChunk / 2; ++i)
                vals[i] = __floats2half2_rn(fmaf(raw[2 * i], scale_next, min_next),
                                            fmaf(raw[2 * i + 1], scale_next, min_next));
            uint4* dst = reinterpret_cast<uint4*>(&t.b[b_row][b_half * kChunk]);
#pragma unroll
            for (int i = 0; i < 4; ++i) memcpy(dst + i, vals + 4 * i, sizeof(uint4));
        }
        __syncthreads();
        if (k0 + kTileK < Kp) load_step(k0 + kTileK);
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &t.a[warp_m * 32 + i * 16][kk], lda);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &t.b[warp_n * 32 + j * 16][kk], lda);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    __syncthreads();  // the tiles' memory becomes the output tile
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(out_tile + (warp_m * 32 + i * 16) * ldc + warp_n * 32 + j * 16, acc[i][j], ldc,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < kTileM * kTileN; idx += kGemmThreads) {
        const int r = idx / kTileN, col = idx % kTileN;
        const int64_t m = m0 + r, n = n0 + col;
        if (m >= M || n >= w.rows) continue;
        float* out = y + m * ldy + n;
        *out = (accumulate ? *out : 0.0f) + out_tile[r * ldc + col] + (w.bias ? w.bias[n] : 0.0f);
    }
}

template <WeightFormat F>
void launch_gemm(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate,
                 MatmulWorkspace& ws, cudaStream_t stream) {
    const int64_t Kp = w.padded_cols;
    ws.x_f16.reserve((size_t)(M * Kp) * sizeof(__half));
    __half* x16 = ws.x_f16.as<__half>();
    const int64_t n_values = M * Kp;
    to_f16_padded_kernel<<<(unsigned)((n_values + 255) / 256), 256, 0, stream>>>(x, M, w.cols, Kp, x16);
    PYLLM_CUDA_CHECK_LAUNCH("to_f16_padded");
    if (M > INT32_MAX / 2) throw std::invalid_argument("linear: too many rows");
    const dim3 grid((unsigned)((w.rows + kTileN - 1) / kTileN), (unsigned)((M + kTileM - 1) / kTileM));
    gemm_kernel<F><<<grid, kGemmThreads, 0, stream>>>(w, x16, (int)M, y, ldy, accumulate);
    PYLLM_CUDA_CHECK_LAUNCH("gemm");
}

}  // namespace

void gemm(const WeightArgs& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate, MatmulWorkspace& ws,
          cudaStream_t stream) {
    dispatch_format(w.format, [&]<WeightFormat F>() { launch_gemm<F>(w, x, M, y, ldy, accumulate, ws, stream); });
}

}  // namespace cuda
}  // namespace pyllm
