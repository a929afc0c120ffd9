// Weight upload (repacking) and the two matmul paths:
//   GEMV (M <= kMaxGemvRows, decode): one warp per output row, each lane
//     decoding whole 32-value chunks with 128-bit loads, dot products in f32.
//   GEMM (prefill): 64 x 128 output tiles on tensor cores (wmma, f16 inputs,
//     f32 accumulation); each block dequantizes its weight tile to f16 in
//     shared memory, the activations are converted to f16 once per call.
#include <mma.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "chunk.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {

namespace {

int64_t stored_bytes_per_value(WeightFormat f) {
    switch (f) {
        case WeightFormat::F32: return 4;
        case WeightFormat::F16:
        case WeightFormat::BF16: return 2;
        default: return 1;  // int8; int4 rows are handled as half a byte per value
    }
}

}  // namespace

WeightArgs weight_args(const DeviceWeight& w) {
    return WeightArgs{w.format, w.data.as<uint8_t>(), w.scales.as<uint16_t>(), w.mins.as<uint16_t>(),
                      w.bias.as<float>(), w.rows, w.cols, w.padded_cols, w.row_stride,
                      (int32_t)w.group_size, (int32_t)w.n_groups};
}

bool can_stack(const WeightView& a, const WeightView& b) {
    return a.format == b.format && a.cols == b.cols && a.group_size == b.group_size;
}

DeviceWeight upload_weights(const std::vector<WeightView>& parts) {
    if (parts.empty()) throw std::invalid_argument("upload_weights: no weights");
    const WeightView& first = parts[0];
    DeviceWeight d;
    d.format = first.format;
    d.cols = first.cols;
    d.padded_cols = first.padded_cols();
    d.group_size = is_quantized(first.format) ? first.group_size : 0;
    d.n_groups = first.n_groups();
    const bool int4 = first.format == WeightFormat::Q4_SYM || first.format == WeightFormat::Q4_ASYM;
    d.row_stride = int4 ? d.padded_cols / 2 : d.padded_cols * stored_bytes_per_value(first.format);
    bool any_bias = false;
    for (const WeightView& p : parts) {
        validate_weight(p, "weight");
        if (!can_stack(first, p)) throw std::invalid_argument("upload_weights: stacked weights differ in layout");
        d.rows += p.rows;
        any_bias = any_bias || p.bias != nullptr;
    }
    if (d.cols > INT32_MAX || d.rows > INT32_MAX) throw std::invalid_argument("upload_weights: weight too large");

    std::vector<uint8_t> data((size_t)(d.rows * d.row_stride), 0);
    std::vector<uint16_t> scales, mins;
    std::vector<float> bias;
    int64_t row0 = 0;
    for (const WeightView& p : parts) {
        const int64_t src_bytes = p.row_bytes();
        const uint8_t* src = static_cast<const uint8_t*>(p.data);
        for (int64_t r = 0; r < p.rows; ++r)
            std::memcpy(data.data() + (row0 + r) * d.row_stride, src + r * src_bytes, (size_t)src_bytes);
        const int64_t n_scales = p.rows * p.n_groups();
        if (p.scales) scales.insert(scales.end(), p.scales, p.scales + n_scales);
        if (p.mins) mins.insert(mins.end(), p.mins, p.mins + n_scales);
        if (any_bias) {
            if (p.bias) bias.insert(bias.end(), p.bias, p.bias + p.rows);
            else bias.insert(bias.end(), (size_t)p.rows, 0.0f);
        }
        row0 += p.rows;
    }
    d.data.upload(data.data(), data.size());
    if (!scales.empty()) d.scales.upload(scales.data(), scales.size() * sizeof(uint16_t));
    if (!mins.empty()) d.mins.upload(mins.data(), mins.size() * sizeof(uint16_t));
    if (!bias.empty()) d.bias.upload(bias.data(), bias.size() * sizeof(float));
    return d;
}

// --- GEMV ----------------------------------------------------------------------

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

// --- GEMM ----------------------------------------------------------------------

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

    for (int64_t k0 = 0; k0 < Kp; k0 += kTileK) {
        __syncthreads();  // the previous step's tiles are consumed
        // activations: 64 rows x 8 vectors of 8 halves
#pragma unroll
        for (int i = 0; i < kTileM * kTileK / 8 / kGemmThreads; ++i) {
            const int idx = tid + i * kGemmThreads, r = idx / (kTileK / 8), v = idx % (kTileK / 8);
            const int64_t m = m0 + r, k = k0 + v * 8;
            uint4 bits = make_uint4(0, 0, 0, 0);
            if (m < M && k < Kp) bits = *reinterpret_cast<const uint4*>(x16 + m * Kp + k);
            *reinterpret_cast<uint4*>(&t.a[r][v * 8]) = bits;
        }
        // weights: 128 rows x 2 chunks, one chunk per thread, dequantized to f16
        {
            const int r = tid / 2, half_step = tid % 2;
            const int64_t n = n0 + r, c = k0 / kChunk + half_step;
            __half2 vals[kChunk / 2];
            if (n < w.rows && c < n_chunks) {
                float raw[kChunk];
                decode_chunk<F>(w.data + n * w.row_stride, c, raw);
                float scale, min;
                chunk_affine<F>(w, n, c, scale, min);
#pragma unroll
                for (int i = 0; i < kChunk / 2; ++i)
                    vals[i] = __floats2half2_rn(fmaf(raw[2 * i], scale, min), fmaf(raw[2 * i + 1], scale, min));
            } else {
#pragma unroll
                for (int i = 0; i < kChunk / 2; ++i) vals[i] = __float2half2_rn(0.0f);
            }
            uint4* dst = reinterpret_cast<uint4*>(&t.b[r][half_step * kChunk]);
#pragma unroll
            for (int i = 0; i < 4; ++i) memcpy(dst + i, vals + 4 * i, sizeof(uint4));
        }
        __syncthreads();
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

void linear(const DeviceWeight& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate,
            MatmulWorkspace& ws, cudaStream_t stream, MatmulPath path) {
    if (M <= 0) return;
    if (ldy < w.rows) throw std::invalid_argument("linear: output stride smaller than the output width");
    const WeightArgs args = weight_args(w);
    const bool gemv = path == MatmulPath::Gemv || (path == MatmulPath::Auto && M <= kMaxGemvRows);
    dispatch_format(w.format, [&]<WeightFormat F>() {
        if (gemv) launch_gemv<F>(args, x, M, y, ldy, accumulate, stream);
        else launch_gemm<F>(args, x, M, y, ldy, accumulate, ws, stream);
    });
}

}  // namespace cuda
}  // namespace pyllm
