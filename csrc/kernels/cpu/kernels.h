// The CPU kernels that come in instruction-set variants: matrix multiply
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), the inner step of attention, and
// element-wise SwiGLU and f16 rounding.
//
// Each variant (portable C++, AVX2+FMA, AVX-VNNI, AVX-512 VNNI) fills one CpuKernels table;
// dispatch.cpp picks the table once from what the CPU supports, and the tests
// can force the portable one. A matmul computes output columns
// [n_begin, n_end) for all rows, so the caller splits work across threads by n.
// The thread-level structure around them lives once, in ops.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "../../core/numeric.h"
#include "../../core/weights.h"

namespace pyllm {

// Element type of a KV cache: f32, IEEE f16 (half the bytes each decode step reads), or
// llama.cpp's q8_0 (blocks of 32 values along the head dimension: an f16 scale d and 32 int8
// codes, value = d * code; 34 bytes per 32 values, 0.53x f16).
//
// Layouts of one kv head's cache of n_ctx positions (ops.h attention):
//   f32 / f16: keys transposed [D, n_ctx] (scoring a query is a multiply-add over positions),
//              values [n_ctx, D]
//   q8_0:      keys and values both [n_ctx, D / 32 blocks] (a block spans one position's head
//              dimensions, as in llama.cpp; head_dim must be a multiple of 32)
enum class KvType { F32, F16, Q8_0 };
constexpr int64_t kQ8Block = 32;                    // values per q8_0 block
constexpr int64_t kQ8BlockBytes = 2 + kQ8Block;     // f16 scale + 32 int8 codes
// Bytes of one position's D values of one kv head.
inline int64_t kv_row_bytes(KvType kv, int64_t D) {
    return kv == KvType::Q8_0 ? D / kQ8Block * kQ8BlockBytes : D * (kv == KvType::F16 ? 2 : 4);
}
// Positions an engine's cache holds per kv head for a context of n_ctx: n_ctx padded so that a
// transposed key row (f32 / f16) spans an odd number of 64-byte lines. Decode reads the head_dim
// key rows of a kv head side by side; at a power-of-two stride (a 4096 context: 8 KiB rows) they
// all fall in one L1 set (and a few L2 sets) and evict one another, at an odd line count they
// spread over every set. Cost: 1/128 more memory at a 4096 context (f16). q8_0 keys are read
// position by position (contiguous): no padding. Padded and unpadded engines alternating in one
// process (SmolLM2 int4, f16 cache, 2 threads, Zen 5, medians of 6-8): one sequence decoding at
// depth 3800 of a 4096 context 145 -> 167 tok/s, at depth 4096 of 4608 154 -> 183; 8 sequences a
// step at a 4096 context 10.75 -> 9.68 ms; at a 512 context no change.
inline int64_t kv_cache_stride(KvType kv, int64_t n_ctx) {
    if (kv == KvType::Q8_0) return n_ctx;
    const int64_t per_line = kv == KvType::F16 ? 32 : 16;  // positions in 64 bytes
    const int64_t lines = (n_ctx + per_line - 1) / per_line;
    return (lines % 2 == 0 ? lines + 1 : lines) * per_line;
}
// llama.cpp's names: "f32", "f16", "q8_0" (std::invalid_argument for another).
inline const char* kv_type_name(KvType kv) { return kv == KvType::Q8_0 ? "q8_0" : kv == KvType::F16 ? "f16" : "f32"; }
inline KvType parse_kv_type(const std::string& name) {
    for (KvType kv : {KvType::F32, KvType::F16, KvType::Q8_0})
        if (name == kv_type_name(kv)) return kv;
    throw std::invalid_argument("kv_cache must be 'f16', 'f32' or 'q8_0', not '" + name + "'");
}
// Calls fn(keys, values) with an f32 or f16 cache's pointers typed: const float* or const uint16_t* (f16 bits).
template <typename Fn>
void with_kv_type(KvType kv, const void* keys, const void* values, Fn&& fn) {
    if (kv == KvType::F16) fn(static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values));
    else fn(static_cast<const float*>(keys), static_cast<const float*>(values));
}
// Calls fn(g, std::integral_constant<int, GH>()) for consecutive runs [g, g + GH) of n query heads,
// GH at most Max: the SIMD attention kernels' register tiles are sized at compile time.
template <int N, typename Fn>
void with_head_count(int64_t n, Fn&& fn) {
    if constexpr (N == 1) fn(std::integral_constant<int, 1>());
    else if (n == N) fn(std::integral_constant<int, N>());
    else with_head_count<N - 1>(n, fn);
}
template <int Max, typename Fn>
void by_heads(int64_t n, Fn&& fn) {
    for (int64_t g = 0; g < n;) {
        const int64_t gh = std::min<int64_t>(Max, n - g);
        with_head_count<Max>(gh, [&](auto count) { fn(g, count); });
        g += gh;
    }
}
// How far ahead the SIMD attention kernels prefetch each transposed key row they read: D rows are
// read side by side, more streams than the hardware prefetcher follows (past the last key it is a
// hint to nowhere, never a fault).
constexpr int64_t kKeyPrefetchBytes = 512;
// How far ahead of what they read the tiled int4/int8 kernels (first pass over a tile) and the
// AVX-512 float decode prefetch the weights (a hint: past the buffer's end it touches nothing).
// 2048 was measured on an AVX2-only Zen 3; on Zen 5 (AVX-512, 2 threads, alternating builds) 4096 decoded the 1.1B
// shapes' int4 8% faster than 2048 (8192 no faster) and SmolLM2 int4 9% faster than no prefetch;
// the AVX2 kernel on that Zen 5 ran as fast with 4096 as with 2048.
constexpr int64_t kWeightPrefetchBytes = 4096;
// Prefetches the `bytes` that lie kWeightPrefetchBytes past p, line by line, into L1 (prefetcht0).
inline void prefetch_weights_ahead(const void* p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64)
        __builtin_prefetch(static_cast<const char*>(p) + kWeightPrefetchBytes + line, 0, 3);
}
// Prefetches n_rows rows of row_bytes each, stride bytes apart, line by line, into L1 (prefetcht0;
// a hint: nothing is read). The empty volatile asm keeps the calls: GCC 12 takes __builtin_prefetch
// for an operation without side effects, so a function that only prefetches (attention's
// prefetch_task in ops.cpp) was found const and every call to it deleted.
inline void prefetch_rows(const void* p, int64_t n_rows, int64_t row_bytes, int64_t stride) {
    const char* base = static_cast<const char*>(p);
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(base + r * stride + line, 0, 3);
    asm volatile("" : : "r"(base));
}
// q8_0 blocks of n values (n a multiple of 32), as llama.cpp's quantize_row_q8_0_ref: per block
// d = max|x| / 127, codes round(x / d) (half away from zero; 0 for an all-zero block), d stored
// as f16. Non-finite input gives non-finite scales (never read back as finite values).
//   x: f32 [n]   out: n / 32 blocks of kQ8BlockBytes bytes
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);
// The scale d of the q8_0 block at `block` (its first two bytes, f16): one F16C instruction in the
// files compiled with it, f16_to_f32 elsewhere (the same value). static: each file keeps its own
// copy, so a portable file never links to the F16C one.
static inline float q8_scale(const uint8_t* block) {
    uint16_t bits;
    std::memcpy(&bits, block, 2);
#if defined(__F16C__)
    return _cvtsh_ss(bits);
#else
    return f16_to_f32(bits);
#endif
}

// Changes to one attention task's raw scores before the softmax (ops.h AttentionOptions, cut per task).
struct ScoreShaping {
    const float* alibi = nullptr;  // f32 [group] slopes, or null: scores[g][t] += alibi[g] * (first_key + t)
    float first_key = 0.0f;        // position of key 0 minus the query's position (<= 0)
    float softcap = 0.0f;          // > 0: scores = softcap * tanh(scores / softcap), after the ALiBi term
    // Several consecutive query rows in one task (prefill; ops.cpp attention): with row_heads > 0, heads
    // [r * row_heads, (r + 1) * row_heads) are the query whose own key is key last_key + r; it sees keys
    // last_key + r - window + 1 (window > 0; else key 0) .. last_key + r, the others' scores become -inf
    // (last_key + r < 0: none of the keys).
    int64_t row_heads = 0, last_key = 0, window = 0;
};

// Applies `shaping` to scores f32 [group, len] in place; the same for every kernel variant.
void shape_scores(const ScoreShaping& shaping, int64_t group, int64_t len, float* scores);

// Float-weight prefill (from kFloatPanelMinRows rows) runs on packed panels of output columns
// (tiling.h panel_matmul): linear() hands each thread whole panels of the widest variant's
// width (AVX-512's 32 columns; AVX2's 16 divide it).
constexpr int64_t kFloatPanelColumns = 32, kFloatPanelMinRows = 12;

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
    //   q: f32 [group, D] (scale applied)   scores: scratch f32 [group, len]
    //   f32 / f16: keys_t: kv [D, key_stride], first key at column 0   values: kv [len, D]
    //   q8_0: keys_t, values: [len, D / 32 blocks] (key_stride unused; D a multiple of 32)
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
void quant_weights_avx2(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y);
void attend_avx2(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                 const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out, float* max,
                 float* sum);
void swiglu_avx2(const float* gate, const float* up, int64_t n, float* out);
void round_to_f16_avx2(const float* x, int64_t n, uint16_t* out);
// One head's scores s f32 [len] -> exp(s - max) in place; *max_out = max, *sum_out = the sum.
void softmax_numerators_avx2(float* s, int64_t len, float* max_out, float* sum_out);
#endif
#if defined(PYLLM_HAVE_AVXVNNI)
extern const CpuKernels kAvxVnniKernels;  // avx2 with the tiled int4/int8 dots on 256-bit vpdpbusd
#endif
#if defined(PYLLM_HAVE_AVX512)
extern const CpuKernels kAvx512Kernels;  // VNNI integer dots, AVX-512 float prefill and attention
void attend_avx512(const float* q, int64_t group, int64_t D, KvType kv, const void* keys_t, int64_t key_stride,
                   const void* values, int64_t len, const ScoreShaping* shaping, float* scores, float* out,
                   float* max, float* sum);
#endif


// The tiled layout (tiled_weights.cpp): tiles [tile_begin, tile_end) of w into
// `out`, and w.tiled pointed into a filled buffer.
void tile_weight_rows16(const WeightView& w, uint8_t* out, int64_t tile_begin, int64_t tile_end);
// Its inverse for one row: the row's bytes as the file stores them (w.row_bytes()), its scales and
// (Q4_ASYM) mins (f16 [w.n_groups()]), read back from w.tiled.
void untile_weight_row(const WeightView& w, int64_t row, uint8_t* data, uint16_t* scales, uint16_t* mins);
void point_tiled(WeightView& w, const uint8_t* buffer);

// The table in use. Chosen at first use: the variant named by the environment
// variable PYLLM_KERNELS if set (as select_kernels), else the last of available_kernels().
const CpuKernels& active_kernels();
// Forces a variant by name (one of available_kernels(), or "auto"); throws for
// a variant this build or this CPU cannot run.
void select_kernels(const char* name);
// The variants this build has and this CPU can run, slowest first: "portable",
// then "avx2" (AVX2 + FMA + F16C), "avxvnni" (and AVX-VNNI), "avx512" (AVX-512 F/BW/VL + VNNI, and AVX2).
std::vector<const CpuKernels*> available_kernels();

}  // namespace pyllm
