// The CUDA operators a LLaMA decoder is made of, as host functions that
// enqueue kernels on a stream. All pointers are device pointers; activations
// are f32, row-major, with the row strides given (ld*, in elements).
//
// Positions live in device memory (int32 [M], consecutive) so that a captured
// decode graph stays valid from one token to the next.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../core/weights.h"
#include "device.h"

namespace pyllm {
namespace cuda {

// A weight uploaded once and repacked for the kernels: every row is padded
// with zeros to padded_cols = round_up(cols, 32) values, so that a row is a
// whole number of 32-value chunks and every chunk starts on a 16-byte
// boundary (int4 rows already are; int8 and float rows are padded). Scales and
// mins keep the file's f16 [rows, n_groups] layout, bias is f32 [rows].
// Weights of one format and group size may be stacked along rows (q/k/v,
// gate/up) into one DeviceWeight.
struct DeviceWeight {
    WeightFormat format = WeightFormat::F32;
    int64_t rows = 0, cols = 0, padded_cols = 0, group_size = 0, n_groups = 0;
    int64_t row_stride = 0;  // bytes of one padded row of data
    DeviceBuffer data, scales, mins, bias;
};

// Raw pointers and sizes of a DeviceWeight, passed to kernels by value.
struct WeightArgs {
    WeightFormat format;
    const uint8_t* data;
    const uint16_t* scales;  // f16 [rows, n_groups] or null
    const uint16_t* mins;    // f16 [rows, n_groups] or null
    const float* bias;       // f32 [rows] or null
    int64_t rows, cols, padded_cols, row_stride;
    int32_t group_size, n_groups;
};
WeightArgs weight_args(const DeviceWeight& w);

// Repacks and uploads weights that share format, cols and group size, stacked
// in this order along rows. A bias missing on some of them counts as zeros.
DeviceWeight upload_weights(const std::vector<WeightView>& parts);
bool can_stack(const WeightView& a, const WeightView& b);

// Scratch of the float matmul path, grown on demand (never during graph capture).
struct MatmulWorkspace {
    DeviceBuffer x_f16;  // f16 [M, padded_cols]
};

// Rows up to this many take the GEMV kernels; more take the tensor-core GEMM.
constexpr int64_t kMaxGemvRows = 8;
enum class MatmulPath { Auto, Gemv, Gemm };

// y = x @ W^T + bias, or y += x @ W^T + bias when accumulate.
//   x: f32 [M, w.cols] (row stride w.cols)   y: f32 [M, ldy] (the first w.rows columns written)
void linear(const DeviceWeight& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate,
            MatmulWorkspace& ws, cudaStream_t stream, MatmulPath path = MatmulPath::Auto);

// Dequantized rows `ids` of a [vocab, dim] table.   ids: int32 [M]   out: f32 [M, w.cols]
void embedding(const DeviceWeight& w, const int32_t* ids, int64_t M, float* out, cudaStream_t stream);

// y = x / sqrt(mean(x^2) + eps) * weight.   x, y: f32 [M, D]   weight: f32 [D]
void rmsnorm(const float* x, const float* weight, int64_t M, int64_t D, float eps, float* y, cudaStream_t stream);

// out = silu(gate) * up, with gate and up the two halves of each row of gate_up.
//   gate_up: f32 [M, 2F]   out: f32 [M, F]
void swiglu(const float* gate_up, int64_t M, int64_t F, float* out, cudaStream_t stream);

// Rotate-half RoPE in place: the pair (i, i + D/2) of every head of row m turns
// by positions[m] * inv_freq[i] (angle and its cosine in f32, like the CPU op).
//   x: f32 [M, ldx] holding n_heads heads of D values from column 0
//   positions: int32 [M]   inv_freq: f32 [D / 2]
void rope(float* x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D, const int32_t* positions,
          const float* inv_freq, cudaStream_t stream);

// Stores the keys and values of M new rows at cache rows positions[m].
//   k, v: f32 [M, ld] holding n_kv_heads heads of D values from column 0
//   k_cache, v_cache: f32 [n_kv_heads, cache_len, D]
void kv_write(const float* k, const float* v, int64_t ld, int64_t M, int64_t n_kv_heads, int64_t D,
              const int32_t* positions, float* k_cache, float* v_cache, int64_t cache_len, cudaStream_t stream);

// Scratch of the split attention path.
struct AttentionWorkspace {
    DeviceBuffer partial_stats;  // f32 [M, n_heads, n_splits, 2]: running max and sum
    DeviceBuffer partial_out;    // f32 [M, n_heads, n_splits, D]: unnormalised outputs
};

// How keys are split across blocks: n_splits pieces of split_len keys (a
// multiple of the key tile). n_splits == 1: no split, no merge.
struct AttentionSplit {
    int32_t n_splits = 1;
    int32_t split_len = 0;
};
// The split a decode step uses: enough blocks to fill the device for any
// position up to cache_len (fixed, so that one captured graph serves every step).
AttentionSplit decode_split(int64_t n_heads, int64_t cache_len);

// Causal attention of M queries at positions[m] (consecutive) over a cache
// already holding their keys and values; query head h reads kv head
// h / (n_heads / n_kv_heads). D must be a multiple of 4, at most 256.
//   q: f32 [M, ldq] (n_heads heads of D values from column 0)
//   k_cache, v_cache: f32 [n_kv_heads, cache_len, D]   out: f32 [M, ldo]
void attention(const float* q, int64_t ldq, const float* k_cache, const float* v_cache, int64_t M, int64_t n_heads,
               int64_t n_kv_heads, int64_t D, int64_t cache_len, const int32_t* positions, float scale, float* out,
               int64_t ldo, AttentionSplit split, AttentionWorkspace& ws, cudaStream_t stream);
constexpr int64_t kMaxAttentionHeadDim = 256;
// Sets up attention for head size D ahead of time (before a graph capture).
void prepare_attention(int64_t D);

// Number of multiprocessors of the current device (cached).
int device_sm_count();

}  // namespace cuda
}  // namespace pyllm
