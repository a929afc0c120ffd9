// The CPU kernels that come in instruction-set variants: matrix multiply
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), the inner step of attention, and
// element-wise SwiGLU and f16 rounding.
//
// Each variant (portable C++, AVX2+FMA, AVX-512 VNNI) fills one CpuKernels table;
// dispatch.cpp picks the table once from what the CPU supports, and the tests
// can force the portable one. A matmul computes output columns
// [n_begin, n_end) for all rows, so the caller splits work across threads by n.
// The thread-level structure around them lives once, in ops.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "../../core/weights.h"

namespace pyllm {

// Element type of a KV cache: f32, or IEEE f16 (half the bytes each decode step reads).
enum class KvType { F32, F16 };
inline int64_t kv_bytes(KvType kv) { return kv == KvType::F16 ? 2 : 4; }
// Calls fn(keys, values) with the cache pointers typed: const float* or const uint16_t* (f16 bits).
template <typename Fn>
void with_kv_type(KvType kv, const void* keys, const void* values, Fn&& fn) {
    if (kv == KvType::F16) fn(static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values));
    else fn(static_cast<const float*>(keys), static_cast<const float*>(values));
}

// Changes to one attention task's raw scores before the softmax (ops.h AttentionOptions, cut per task).
struct ScoreShaping {
    const float* alibi = nullptr;  // f32 [group] slopes, or null: scores[g][t] += alibi[g] * (first_key + t)
    float first_key = 0.0f;        // position of key 0 minus the query's position (<= 0)
    float softcap = 0.0f;          // > 0: scores = softcap * tanh(scores / softcap), after the ALiBi term
};

// Applies `shaping` to scores f32 [group, len] in place; the same for every kernel variant.
void shape_scores(const ScoreShaping& shaping, int64_t group, int64_t len, float* scores);

struct CpuKernels {
    const char* name;
    // F32 / F16 / BF16 weights, float activations.
    //   x: f32 [M, w.cols]   y: f32 [M, w.rows] (only columns [n_begin, n_end) written)
    void (*float_weights)(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end,
                          float* y);
    // Q8 / Q4 weights, activations quantized by quantize_rows.
    //   y: f32 [M, w.rows] (only columns [n_begin, n_end) written)
    void (*quant_weights)(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end,
                          float* y);
    // Quantizes rows [row_begin, row_end) of x into two int8 terms per value in
    // blocks of 32 (see QuantizedRows), zero-padding each row to out.padded_cols.
    // Every variant gives the same codes as the portable one, bit for bit.
    //   x: f32 [rows, cols] (row stride cols)
    void (*quantize_rows)(const float* x, int64_t cols, int64_t row_begin, int64_t row_end, const QuantizedRows& out);
    // Whether quant_weights reads int8/int4 weights tiled at load
    // (tiled_weights.cpp), which is faster, or straight from the file.
    bool reads_tiled;
    // One attention task: `group` query heads sharing a kv head against `len`
    // consecutive keys. Writes each head's maximum score, the sum of
    // exp(score - max) and the unnormalised output sum_t exp(score_t - max) v_t.
    //   q: f32 [group, D] (scale applied)   keys_t: kv [D, key_stride], first key at column 0
    //   values: kv [len, D]   scores: scratch f32 [group, len]
    //   out: f32 [group, D]   max, sum: f32 [group]   shaping: null, or applied to the scores first
    void (*attend)(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                   const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                   float* sum);
    // out = silu(gate) * up, element by element.   gate, up, out: f32 [n]
    void (*swiglu)(const float* gate, const float* up, int64_t n, float* out);
    // IEEE f16 bits of x rounded to nearest even (f32_to_f16 in numeric.h).   x: f32 [n]   out: u16 [n]
    void (*round_to_f16)(const float* x, int64_t n, uint16_t* out);
};

void quantize_rows_portable(const float* x, int64_t cols, int64_t row_begin, int64_t row_end,
                            const QuantizedRows& out);
void attend_portable(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                     const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out,
                     float* max, float* sum);
void swiglu_portable(const float* gate, const float* up, int64_t n, float* out);
void round_to_f16_portable(const float* x, int64_t n, uint16_t* out);

extern const CpuKernels kPortableKernels;
#if defined(PYLLM_HAVE_AVX2)
extern const CpuKernels kAvx2Kernels;
void float_weights_avx2(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y);
// float_weights without packing: register tiles reading the weights as stored (decode, few rows)
void float_weight_rows_avx2(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y);
void quantize_rows_avx2(const float* x, int64_t cols, int64_t row_begin, int64_t row_end, const QuantizedRows& out);
void attend_avx2(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                 const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                 float* sum);
void swiglu_avx2(const float* gate, const float* up, int64_t n, float* out);
void round_to_f16_avx2(const float* x, int64_t n, uint16_t* out);
#endif
#if defined(PYLLM_HAVE_AVX512)
extern const CpuKernels kAvx512Kernels;  // VNNI integer dots, AVX-512 float prefill; attention as AVX2
#endif


// The tiled layout (tiled_weights.cpp): tiles [tile_begin, tile_end) of w into
// `out`, and w.tiled pointed into a filled buffer.
void tile_weight_rows16(const WeightView& w, uint8_t* out, int64_t tile_begin, int64_t tile_end);
void point_tiled(WeightView& w, const uint8_t* buffer);

// The table in use. Chosen at first use: the variant named by the environment
// variable PYLLM_KERNELS if set (as select_kernels), else the last of available_kernels().
const CpuKernels& active_kernels();
// Forces a variant by name (one of available_kernels(), or "auto"); throws for
// a variant this build or this CPU cannot run.
void select_kernels(const char* name);
// The variants this build has and this CPU can run, slowest first: "portable",
// then "avx2" (AVX2 + FMA + F16C), then "avx512" (AVX-512 F/BW/VL + VNNI, and AVX2).
std::vector<const CpuKernels*> available_kernels();

}  // namespace pyllm
