// Element-wise and per-row operators: embedding lookup (with its scale and
// learned positions), RMSNorm, LayerNorm, per-head q/k RMSNorm, the FFN
// activations, RoPE, the KV-cache write and logit soft-capping. Same formulas and f32 arithmetic as
// csrc/kernels/cpu/ops.cpp (reductions run as trees instead of in order).
#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "chunk.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {

int device_sm_count() {
    static int count = [] {
        int device = 0, sms = 0;
        PYLLM_CUDA_CHECK(cudaGetDevice(&device));
        PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        return sms;
    }();
    return count;
}

namespace {

unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// One block per token; each thread decodes whole chunks of the row.
template <WeightFormat F>
__global__ void embedding_kernel(WeightArgs w, const int32_t* __restrict__ ids, float* __restrict__ out) {
    const int64_t m = blockIdx.x;
    const int64_t row = ids[m];
    float* o = out + m * w.cols;
    if (row < 0 || row >= w.rows) {  // the engine checks ids first; never read outside the table
        for (int64_t k = threadIdx.x; k < w.cols; k += blockDim.x) o[k] = __int_as_float(0x7fc00000);
        return;
    }
    const uint8_t* data = w.data + row * w.row_stride;
    for (int64_t c = threadIdx.x; c < w.padded_cols / kChunk; c += blockDim.x) {
        float raw[kChunk];
        decode_chunk<F>(data, c, raw);
        float scale, min;
        chunk_affine<F>(w, row, c, scale, min);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
            const int64_t k = c * kChunk + i;
            if (k < w.cols) o[k] = F == WeightFormat::Q4_ASYM ? raw[i] * scale + min : raw[i] * scale;
        }
    }
}

constexpr int kRowThreads = 256;

__device__ float block_sum(float v, float* shared /* [32] */) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < n_warps ? shared[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ weight, int64_t D, float eps,
                               float* __restrict__ y) {
    __shared__ float partial[32];
    const float* xr = x + (int64_t)blockIdx.x * D;
    float* yr = y + (int64_t)blockIdx.x * D;
    float sum_sq = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sum_sq = fmaf(xr[i], xr[i], sum_sq);
    sum_sq = block_sum(sum_sq, partial);
    const float inv = 1.0f / sqrtf(sum_sq / (float)D + eps);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = weight[i] * (xr[i] * inv);
}

__global__ void swiglu_kernel(const float* __restrict__ gate_up, int64_t M, int64_t F, float* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * F) return;
    const int64_t m = i / F, f = i % F;
    const float g = gate_up[m * 2 * F + f], u = gate_up[m * 2 * F + F + f];
    out[i] = g / (1.0f + expf(-g)) * u;
}

// RMSNorm (bias null) or LayerNorm (with bias) of row blockIdx.x, as csrc/kernels/cpu/ops.cpp computes
// them (LayerNorm in two passes: mean, then the variance of the centred values); y = norm, or
// y += norm when Add. No __restrict__: x and y may be the same rows (each value is read by the
// thread that writes it, after the reductions).
template <bool Add>
__global__ void row_norm_kernel(const float* x, const float* __restrict__ weight, const float* __restrict__ bias,
                                int64_t D, float eps, float* y) {
    __shared__ float partial_a[32], partial_b[32];  // one per reduction: no reuse hazard between them
    const float* xr = x + (int64_t)blockIdx.x * D;
    float* yr = y + (int64_t)blockIdx.x * D;
    float mean = 0.0f;
    if (bias != nullptr) {
        float sum = 0.0f;
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sum += xr[i];
        mean = block_sum(sum, partial_a) / (float)D;
    }
    float sum_sq = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        const float c = xr[i] - mean;
        sum_sq = fmaf(c, c, sum_sq);
    }
    sum_sq = block_sum(sum_sq, partial_b);
    const float inv = 1.0f / sqrtf(sum_sq / (float)D + eps);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        const float v = bias != nullptr ? (xr[i] - mean) * inv * weight[i] + bias[i] : weight[i] * (xr[i] * inv);
        if (Add) yr[i] += v;
        else yr[i] = v;
    }
}

// RMSNorm of every head in place: block (row m, head h) normalises the D values at x[m * ldx + h * D].
__global__ void head_rmsnorm_kernel(float* x, int64_t ldx, int n_heads, int64_t D, const float* __restrict__ weight,
                                    float eps) {
    __shared__ float partial[32];
    const int64_t m = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
    float* v = x + m * ldx + h * D;
    float sum_sq = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sum_sq = fmaf(v[i], v[i], sum_sq);
    sum_sq = block_sum(sum_sq, partial);
    const float inv = 1.0f / sqrtf(sum_sq / (float)D + eps);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) v[i] = weight[i] * (v[i] * inv);
}

// x[m, i] = x[m, i] * scale (+ table[positions[m], i] when there is a table). One thread per value.
__global__ void embedding_finish_kernel(float* __restrict__ x, int64_t M, int64_t D, float scale,
                                        const float* __restrict__ table, int64_t table_rows,
                                        const int32_t* __restrict__ positions) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * D) return;
    float v = x[i] * scale;
    if (table != nullptr) {
        const int64_t pos = positions[i / D];
        // the engine checks positions against the table first; never read outside it
        v = pos >= 0 && pos < table_rows ? v + table[pos * D + i % D] : __int_as_float(0x7fc00000);
    }
    x[i] = v;
}

// The activations other than gated SiLU, as the CPU computes them in f32 (transformers' names).
template <Activation A>
__device__ float activate(float x) {
    if constexpr (A == Activation::GeluTanh) {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    } else if constexpr (A == Activation::Gelu) {
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    } else if constexpr (A == Activation::Relu) {
        return x > 0.0f ? x : 0.0f;
    } else {
        return x / (1.0f + expf(-x));
    }
}

// Gated: out[m, f] = act(in[m, f]) * in[m, F + f] (in: [M, 2F], gate | up); plain: out = act(in) (in: [M, F]).
template <Activation A, bool Gated>
__global__ void activation_kernel(const float* __restrict__ in, int64_t M, int64_t F, float* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * F) return;
    if (Gated) {
        const int64_t m = i / F, f = i % F;
        out[i] = activate<A>(in[m * 2 * F + f]) * in[m * 2 * F + F + f];
    } else {
        out[i] = activate<A>(in[i]);
    }
}

__global__ void softcap_kernel(float* __restrict__ x, int64_t n, float cap, float inverse) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] * inverse);
}

// One thread per (row, head, pair); dims from rotary_dim on are not touched.
__global__ void rope_kernel(float* __restrict__ x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D,
                            int64_t rotary_dim, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq) {
    const int64_t half = rotary_dim / 2;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * n_heads * half) return;
    const int64_t m = i / (n_heads * half), h = (i / half) % n_heads, p = i % half;
    const float angle = (float)positions[m] * inv_freq[p];
    const float c = cosf(angle), s = sinf(angle);
    float* v = x + m * ldx + h * D;
    const float a = v[p], b = v[p + half];
    v[p] = a * c - b * s;
    v[p + half] = b * c + a * s;
}

// One thread per (row, kv head, value).
__global__ void kv_write_kernel(const float* __restrict__ k, const float* __restrict__ v, int64_t ld, int64_t M,
                                int64_t n_kv_heads, int64_t D, const int32_t* __restrict__ positions,
                                float* __restrict__ k_cache, float* __restrict__ v_cache, int64_t cache_len) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * n_kv_heads * D) return;
    const int64_t m = i / (n_kv_heads * D), h = (i / D) % n_kv_heads, d = i % D;
    const int64_t pos = positions[m];
    if (pos < 0 || pos >= cache_len) return;  // the engine checks positions first
    const int64_t dst = (h * cache_len + pos) * D + d;
    k_cache[dst] = k[m * ld + h * D + d];
    v_cache[dst] = v[m * ld + h * D + d];
}

}  // namespace

void embedding(const DeviceWeight& w, const int32_t* ids, int64_t M, float* out, cudaStream_t stream) {
    if (M <= 0) return;
    const WeightArgs args = weight_args(w);
    dispatch_format(w.format, [&]<WeightFormat F>() {
        embedding_kernel<F><<<(unsigned)M, 128, 0, stream>>>(args, ids, out);
    });
    PYLLM_CUDA_CHECK_LAUNCH("embedding");
}

void rmsnorm(const float* x, const float* weight, int64_t M, int64_t D, float eps, float* y, cudaStream_t stream) {
    if (M <= 0) return;
    rmsnorm_kernel<<<(unsigned)M, kRowThreads, 0, stream>>>(x, weight, D, eps, y);
    PYLLM_CUDA_CHECK_LAUNCH("rmsnorm");
}

void swiglu(const float* gate_up, int64_t M, int64_t F, float* out, cudaStream_t stream) {
    if (M * F <= 0) return;
    swiglu_kernel<<<blocks_for(M * F, 256), 256, 0, stream>>>(gate_up, M, F, out);
    PYLLM_CUDA_CHECK_LAUNCH("swiglu");
}

void row_norm(const float* x, const float* weight, const float* bias, int64_t M, int64_t D, float eps, float* y,
              bool accumulate, cudaStream_t stream) {
    if (M <= 0) return;
    if (accumulate) row_norm_kernel<true><<<(unsigned)M, kRowThreads, 0, stream>>>(x, weight, bias, D, eps, y);
    else row_norm_kernel<false><<<(unsigned)M, kRowThreads, 0, stream>>>(x, weight, bias, D, eps, y);
    PYLLM_CUDA_CHECK_LAUNCH("row_norm");
}

void head_rmsnorm(float* x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D, const float* weight, float eps,
                  cudaStream_t stream) {
    if (M * n_heads <= 0) return;
    if (ldx < n_heads * D) throw std::invalid_argument("head_rmsnorm: row stride smaller than the heads");
    head_rmsnorm_kernel<<<(unsigned)(M * n_heads), 64, 0, stream>>>(x, ldx, (int)n_heads, D, weight, eps);
    PYLLM_CUDA_CHECK_LAUNCH("head_rmsnorm");
}

void embedding_finish(float* x, int64_t M, int64_t D, float scale, const float* table, int64_t table_rows,
                      const int32_t* positions, cudaStream_t stream) {
    if (M * D <= 0) return;
    embedding_finish_kernel<<<blocks_for(M * D, 256), 256, 0, stream>>>(x, M, D, scale, table, table_rows, positions);
    PYLLM_CUDA_CHECK_LAUNCH("embedding_finish");
}

void ffn_activation(Activation act, bool gated, const float* in, int64_t M, int64_t F, float* out,
                    cudaStream_t stream) {
    if (M * F <= 0) return;
    if (gated && act == Activation::Silu) return swiglu(in, M, F, out, stream);
    const unsigned blocks = blocks_for(M * F, 256);
    auto launch = [&](auto tag) {
        constexpr Activation A = decltype(tag)::value;
        if (gated) activation_kernel<A, true><<<blocks, 256, 0, stream>>>(in, M, F, out);
        else activation_kernel<A, false><<<blocks, 256, 0, stream>>>(in, M, F, out);
    };
    switch (act) {
        case Activation::Silu: launch(std::integral_constant<Activation, Activation::Silu>()); break;
        case Activation::GeluTanh: launch(std::integral_constant<Activation, Activation::GeluTanh>()); break;
        case Activation::Gelu: launch(std::integral_constant<Activation, Activation::Gelu>()); break;
        case Activation::Relu: launch(std::integral_constant<Activation, Activation::Relu>()); break;
        default: throw std::invalid_argument("ffn_activation: unknown activation");
    }
    PYLLM_CUDA_CHECK_LAUNCH("ffn_activation");
}

void softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
    if (n <= 0) return;
    if (!(cap > 0.0f)) throw std::invalid_argument("softcap: the cap must be positive");
    softcap_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(x, n, cap, 1.0f / cap);
    PYLLM_CUDA_CHECK_LAUNCH("softcap");
}

void rope(float* x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D, int64_t rotary_dim, const int32_t* positions,
          const float* inv_freq, cudaStream_t stream) {
    if (rotary_dim <= 0 || rotary_dim > D || rotary_dim % 2 != 0)
        throw std::invalid_argument("rope: rotary_dim must be even, 1..head_dim");
    const int64_t n = M * n_heads * (rotary_dim / 2);
    if (n <= 0) return;
    rope_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(x, ldx, M, n_heads, D, rotary_dim, positions, inv_freq);
    PYLLM_CUDA_CHECK_LAUNCH("rope");
}

void kv_write(const float* k, const float* v, int64_t ld, int64_t M, int64_t n_kv_heads, int64_t D,
              const int32_t* positions, float* k_cache, float* v_cache, int64_t cache_len, cudaStream_t stream) {
    const int64_t n = M * n_kv_heads * D;
    if (n <= 0) return;
    kv_write_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(k, v, ld, M, n_kv_heads, D, positions, k_cache, v_cache,
                                                            cache_len);
    PYLLM_CUDA_CHECK_LAUNCH("kv_write");
}

}  // namespace cuda
}  // namespace pyllm
