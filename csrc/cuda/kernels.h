// The CUDA operators the decoder blocks are made of (the block description,
// csrc/engine/engine.h's ModelConfig), as host functions that
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
#include "../kernels/cpu/ops.h"  // Activation
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

// RMSNorm when bias is null, else LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias.
// y = norm(x), or y += norm(x) when accumulate (a post-norm added to the residual).
//   x, y: f32 [M, D] (may be the same rows unless accumulate)   weight, bias: f32 [D]
void row_norm(const float* x, const float* weight, const float* bias, int64_t M, int64_t D, float eps, float* y,
              bool accumulate, cudaStream_t stream);

// RMSNorm of every head in place, over its D values, with one weight for all heads (q/k norms).
//   x: f32 [M, ldx] holding n_heads heads of D values from column 0   weight: f32 [D]
void head_rmsnorm(float* x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D, const float* weight, float eps,
                  cudaStream_t stream);

// The embeddings times scale, plus the learned position rows table[positions[m]] when table is
// given (rows outside the table give NaN; the engine checks positions first).
//   x: f32 [M, D] in place   table: f32 [table_rows, D] or null   positions: int32 [M]
void embedding_finish(float* x, int64_t M, int64_t D, float scale, const float* table, int64_t table_rows,
                      const int32_t* positions, cudaStream_t stream);

// out = silu(gate) * up, with gate and up the two halves of each row of gate_up.
//   gate_up: f32 [M, 2F]   out: f32 [M, F]
void swiglu(const float* gate_up, int64_t M, int64_t F, float* out, cudaStream_t stream);

// The feed-forward activation (same f32 formulas as the CPU's ffn_activation): gated,
// out = act(gate) * up with in = gate | up f32 [M, 2F] (gated SiLU is swiglu); plain,
// out = act(in) with in f32 [M, F].   out: f32 [M, F]
void ffn_activation(Activation act, bool gated, const float* in, int64_t M, int64_t F, float* out,
                    cudaStream_t stream);

// x = cap * tanh(x / cap) in place (logit soft-capping).   x: f32 [n]   cap > 0
void softcap(float* x, int64_t n, float cap, cudaStream_t stream);

// Rotate-half RoPE in place over the first rotary_dim dims of each head: the pair
// (i, i + rotary_dim/2) of every head of row m turns by positions[m] * inv_freq[i]
// (angle and its cosine in f32, like the CPU op); dims from rotary_dim on pass through.
//   x: f32 [M, ldx] holding n_heads heads of D values from column 0
//   positions: int32 [M]   inv_freq: f32 [rotary_dim / 2]   rotary_dim: even, 2..D
void rope(float* x, int64_t ldx, int64_t M, int64_t n_heads, int64_t D, int64_t rotary_dim, const int32_t* positions,
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

// What an attention call adds to plain causal softmax attention (all off by default; the
// CPU's AttentionOptions, with the slopes in device memory).
struct AttentionShaping {
    int64_t window = 0;            // > 0: query at position p sees keys p - window + 1 .. p
    float softcap = 0.0f;          // > 0: scores = softcap * tanh(scores / softcap)
    const float* alibi = nullptr;  // device f32 [n_heads]: scores += slope_h * (key position - query position)
    bool any() const { return window > 0 || softcap > 0.0f || alibi != nullptr; }
};

// Causal attention of M queries at positions[m] (consecutive) over a cache
// already holding their keys and values; query head h reads kv head
// h / (n_heads / n_kv_heads). Scores are (q * scale).k, then the ALiBi term,
// then soft-capping (the CPU's order). D must be a multiple of 4, at most 256.
//   q: f32 [M, ldq] (n_heads heads of D values from column 0)
//   k_cache, v_cache: f32 [n_kv_heads, cache_len, D]   out: f32 [M, ldo]
void attention(const float* q, int64_t ldq, const float* k_cache, const float* v_cache, int64_t M, int64_t n_heads,
               int64_t n_kv_heads, int64_t D, int64_t cache_len, const int32_t* positions, float scale, float* out,
               int64_t ldo, AttentionSplit split, AttentionWorkspace& ws, cudaStream_t stream,
               const AttentionShaping& shaping = {});
constexpr int64_t kMaxAttentionHeadDim = 256;
// Sets up attention for head size D ahead of time (before a graph capture).
void prepare_attention(int64_t D);

// Number of multiprocessors of the current device (cached).
int device_sm_count();

}  // namespace cuda
}  // namespace pyllm
