// The CPU operators the decoder blocks are made of (docs/ARCHITECTURE.md: the block description). Shapes are row-major; M is the
// number of token rows processed together.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../../core/thread_pool.h"
#include "../../core/weights.h"
#include "kernels.h"

namespace pyllm {

// The engines' activation_quant options (LLM(activation_quant=...)): how QuantizedRows are made.
struct ActivationQuant {
    const char* name;
    int32_t terms;         // QuantizedRows::terms
    float outlier_factor;  // QuantizedRows::outlier_factor
    int32_t min_code_sum;  // QuantizedRows::min_code_sum
};
// "int8x2": two terms in every block; "int8": one term (llama.cpp's Q8_0 activations);
// "int8x2_outliers": two terms in a row's loud blocks (absmax above 3x the row's mean block absmax)
// and peaky ones (one-term codes summing below 512 in magnitude), one elsewhere (weights.h).
// Measured (docs/QUALITY.md: SmolLM2, 24 windows of 512 on each of four texts, against int8x2):
// int8 +0.35% perplexity on average, +0.56% on the worst text; int8x2_outliers +0.05% / +0.08%,
// loud blocks alone +0.16% / +0.32%.
inline constexpr ActivationQuant kActivationQuants[] = {
    {"int8x2", 2, 0.0f, 0}, {"int8", 1, 0.0f, 0}, {"int8x2_outliers", 2, 3.0f, 512}};
// The option of that name; std::invalid_argument for any other.
const ActivationQuant& activation_quant_named(const std::string& name);

// Reusable buffers for int8-quantized activations (grows, never shrinks).
struct ActivationScratch {
    std::vector<int8_t> hi, lo;
    std::vector<float> step, sum;
    std::vector<int32_t> code_sums;
    std::vector<uint8_t> has_hi;
    const ActivationQuant* quant = &kActivationQuants[0];  // how prepare()'s rows are quantized
    QuantizedRows prepare(int64_t rows, int64_t padded_cols);
};

// When the active kernels read w faster rearranged (CpuKernels::reads_tiled), adds w's rearranged copy to `storage` and points
// w.tiled into it; otherwise leaves w as it is.
void tile_for_active_kernels(ThreadPool& pool, WeightView& w, std::vector<AlignedBytes>& storage);

// The input of one or more linear layers, quantized once for all of them when
// any reads quantized activations (q/k/v share their input, and so do gate/up).
struct LinearInput {
    const float* x = nullptr;  // f32 [M, cols]
    int64_t M = 0;
    int64_t cols = 0;
    QuantizedRows quantized;   // rows == M when filled, else empty
};

// Prepares x f32 [M, cols] for linear layers; `quantize` when any of them has a quantized
// weight. The result points into `scratch` until its next use.
LinearInput prepare_linear_input(ThreadPool& pool, const float* x, int64_t M, int64_t cols, bool quantize,
                                 ActivationScratch& scratch);

// One linear layer of a group that shares its input.   y: f32 [M, w->rows]
struct LinearOutput {
    const WeightView* w;
    float* y;
};

// y_i = x @ W_i^T + bias_i for every output of the group, in one parallel region: the group's rows
// are split between the threads as if the weights were one matrix (q/k/v, gate/up), so a decode
// step waits at one barrier where it waited at three, and small matrices (SmolLM2's k and v, 192
// rows) are not split in two. A row's result is the same bits as alone. Measured on a Zen 4, 2 threads,
// interleaved in one process against three and two regions: SmolLM2 int4 decode step -5% / -9% (two
// runs), int8 -4%, f16 and the 1.1B shapes' int4 within +-1%, 8 sequences a step -1%.
//   in.x: f32 [in.M, cols]
void linear(ThreadPool& pool, const LinearOutput* outputs, int64_t n_outputs, const LinearInput& in);

// y = x @ W^T + bias.   in.x: f32 [in.M, w.cols]   y: f32 [in.M, w.rows]
void linear(ThreadPool& pool, const WeightView& w, const LinearInput& in, float* y);

// The same for a single layer: prepare, then multiply.   x: f32 [M, w.cols]   y: f32 [M, w.rows]
void linear(ThreadPool& pool, const WeightView& w, const float* x, int64_t M, float* y, ActivationScratch& scratch);

// Dequantizes rows `ids` of a [vocab, dim] table.   out: f32 [M, w.cols]
void embedding(const WeightView& w, const int32_t* ids, int64_t M, float* out);

// y = x / sqrt(mean(x^2) + eps) * weight.   x, y: f32 [M, D] (may alias)   weight: f32 [D]
void rmsnorm(const float* x, const float* weight, int64_t M, int64_t D, float eps, float* y);

// y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias (torch.nn.LayerNorm).
//   x, y: f32 [M, D] (may alias)   weight, bias: f32 [D]
void layernorm(const float* x, const float* weight, const float* bias, int64_t M, int64_t D, float eps, float* y);

// out = silu(gate) * up, across the pool.   gate, up, out: f32 [n]
void swiglu(ThreadPool& pool, const float* gate, const float* up, int64_t n, float* out);

// The feed-forward activations, by transformers' hidden_act names: silu, gelu_pytorch_tanh (also
// gelu_new, BLOOM's gelu), gelu (erf), relu.
enum class Activation : int32_t { Silu = 0, GeluTanh = 1, Gelu = 2, Relu = 3 };

// out = act(gate) * up when gate is given (gated FFN), else out = act(up); across the pool
// (SiLU-gated through the kernel table's swiglu).   gate (or null), up, out: f32 [n] (out may alias either)
void ffn_activation(ThreadPool& pool, Activation act, const float* gate, const float* up, int64_t n, float* out);

struct RopeScaling {
    std::string type = "default";  // "default", "linear" or "llama3"
    double factor = 1.0;
    double low_freq_factor = 1.0;                 // llama3
    double high_freq_factor = 4.0;                // llama3
    double original_max_position_embeddings = 8192;  // llama3
};

// Inverse frequencies of rotary embedding over the first rotary_dim dims of a head, as
// transformers computes them (partial_rotary_factor: rotary_dim = head_dim * factor).   -> f32 [rotary_dim / 2]
std::vector<float> rope_inv_freq(int64_t rotary_dim, double theta, const RopeScaling& scaling);

// The cosines and sines of the angles positions[m] * inv_freq[i], computed
// once per batch and shared by every layer's queries and keys.
//   positions: int32 [M]   inv_freq: f32 [half]   cos_sin: f32 [M, 2, half] (cos, then sin)
void rope_angles(const int32_t* positions, int64_t M, const float* inv_freq, int64_t half, float* cos_sin);

// Rotates x in place in the rotate-half convention over the first rotary_dim dims of each head:
// the pair (i, i + rotary_dim/2) of every head of row m turns by the angle whose cos/sin are
// cos_sin[m, :, i]; dims from rotary_dim on pass through. (GLM's interleaved pairs are turned
// into this convention by the converter, which permutes q/k rows.)
//   x: f32 [M, n_heads, D]   cos_sin: f32 [M, 2, rotary_dim / 2] (rope_angles)
void rope(float* x, int64_t M, int64_t n_heads, int64_t D, int64_t rotary_dim, const float* cos_sin);

// ALiBi slopes of n_heads heads, as BLOOM computes them (build_alibi_tensor).   -> f32 [n_heads]
std::vector<float> alibi_slopes(int64_t n_heads);

// What an attention call adds to plain causal softmax attention (all off by default).
struct AttentionOptions {
    int64_t window = 0;            // > 0: query at position p sees keys p - window + 1 .. p (sliding window)
    float softcap = 0.0f;          // > 0: scores = softcap * tanh(scores / softcap) (Gemma 2)
    const float* alibi = nullptr;  // f32 [n_heads]: scores += slope_h * (key position - query position)
};

// Causal attention of M new queries at positions pos0 .. pos0 + M - 1 over a
// cache already holding their keys and values; query head h reads kv head
// h / (n_heads / n_kv_heads). The cache's elements are kv_type (kernels.h KvType);
// f32 and f16 keys are cached transposed so that scoring one query against all
// keys is a contiguous multiply-add over positions. scale multiplies q.k.
//   q: f32 [M, n_heads, D]   out: f32 [M, n_heads, D]
//   f32 / f16: k_cache_t: kv [n_kv_heads, D, cache_len]   v_cache: kv [n_kv_heads, cache_len, D]
//   q8_0: k_cache_t, v_cache: [n_kv_heads, cache_len, D / 32 blocks] (D a multiple of 32)
void attention(ThreadPool& pool, const float* q, KvType kv_type, const void* k_cache_t, const void* v_cache, int64_t M,
               int64_t n_heads, int64_t n_kv_heads, int64_t D, int64_t cache_len, int64_t pos0, float scale,
               const AttentionOptions& options, float* out);

// The same over several sequences' rows at once (one parallel loop over all their tasks; each
// span's result is what attention() gives it alone), for a batch step of many sequences.
struct AttentionSpan {
    const float* q;         // f32 [M, n_heads, D]
    const void* k_cache_t;  // this sequence's keys, laid out as above
    const void* v_cache;    // this sequence's values, laid out as above
    int64_t M, pos0;        // its new queries and the position of the first
    float* out;             // f32 [M, n_heads, D]
};
void attention(ThreadPool& pool, KvType kv_type, const AttentionSpan* spans, int64_t n_spans, int64_t n_heads,
               int64_t n_kv_heads, int64_t D, int64_t cache_len, float scale, const AttentionOptions& options);

}  // namespace pyllm
