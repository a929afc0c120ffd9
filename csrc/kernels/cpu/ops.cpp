#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "../../core/numeric.h"
#include "fast_exp.h"
#include "kernels.h"

namespace pyllm {

QuantizedRows ActivationScratch::prepare(int64_t rows, int64_t padded_cols) {
    const size_t n_blocks = (size_t)(rows * (padded_cols / kBlock));
    if (hi.size() < (size_t)(rows * padded_cols)) hi.resize((size_t)(rows * padded_cols)), lo.resize(hi.size());
    if (step.size() < n_blocks)
        step.resize(n_blocks), sum.resize(n_blocks), code_sums.resize(2 * n_blocks), has_hi.resize(n_blocks);
    QuantizedRows rows_view{rows,           padded_cols,   hi.data(),   lo.data(),          step.data(), sum.data(),
                            code_sums.data(), quant->terms, quant->outlier_factor, quant->min_code_sum, nullptr};
    // has_hi only where blocks may lack hi: with two terms everywhere every block has it (null: the
    // kernels read every hi without a per-block look)
    if (rows_view.outlier_blocks_only()) rows_view.has_hi = has_hi.data();
    return rows_view;
}

const ActivationQuant& activation_quant_named(const std::string& name) {
    std::string names;
    for (const ActivationQuant& q : kActivationQuants) {
        if (name == q.name) return q;
        names += std::string(names.empty() ? "'" : ", '") + q.name + "'";
    }
    throw std::invalid_argument("activation_quant must be one of " + names + ", not '" + name + "'");
}

void tile_for_active_kernels(ThreadPool& pool, WeightView& w, std::vector<AlignedBytes>& storage) {
    const CpuKernels& kernels = active_kernels();
    if (!kernels.reads_tiled || !is_quantized(w.format)) return;
    const TiledLayout layout = tiled_layout(w);
    storage.emplace_back(layout.total);
    uint8_t* out = storage.back().data();
    const int64_t per_task = 64;
    pool.parallel_for((layout.tiles + per_task - 1) / per_task, [&](int64_t i) {
        tile_weight_rows16(w, out, i * per_task, std::min(layout.tiles, (i + 1) * per_task));
    });
    point_tiled(w, out);
}

LinearInput prepare_linear_input(ThreadPool& pool, const float* x, int64_t M, int64_t cols, bool quantize,
                                 ActivationScratch& scratch) {
    LinearInput in{x, M, cols, QuantizedRows{}};
    if (!quantize) return in;
    const CpuKernels& kernels = active_kernels();
    in.quantized = scratch.prepare(M, round_up(cols, kBlock));
    const int64_t row_chunk = 16;
    const QuantizedRows& q = in.quantized;
    const int64_t n_blocks = q.padded_cols / kBlock;
    pool.parallel_for((M + row_chunk - 1) / row_chunk, [&](int64_t i) {
        const int64_t row_end = std::min(M, (i + 1) * row_chunk);
        kernels.quantize_rows(x, cols, i * row_chunk, row_end, q);
        for (int64_t b = i * row_chunk * n_blocks; b < row_end * n_blocks; ++b) {
            int32_t sum_hi = 0, sum_lo = 0;
            uint8_t any_hi = 0;
            for (int64_t k = 0; k < kBlock; ++k) {
                sum_hi += q.hi[b * kBlock + k], sum_lo += q.lo[b * kBlock + k];
                any_hi |= (uint8_t)q.hi[b * kBlock + k];
            }
            q.code_sums[2 * b] = sum_hi;
            q.code_sums[2 * b + 1] = sum_lo;
            if (q.has_hi) q.has_hi[b] = any_hi != 0;
        }
    });
    return in;
}

void linear(ThreadPool& pool, const LinearOutput* outputs, int64_t n_outputs, const LinearInput& in) {
    const CpuKernels& kernels = active_kernels();
    // rows: the group's, each weight's padded to whole 16-row tiles, so that a chunk edge never falls
    // inside a tile (the kernels would give the same bits, but both threads would run that tile)
    int64_t work = 0, rows = 0;
    for (int64_t i = 0; i < n_outputs; ++i) {
        const WeightView& w = *outputs[i].w;
        if (in.cols != w.cols)
            throw std::invalid_argument("linear: input has " + std::to_string(in.cols) + " columns, the weight " +
                                        std::to_string(w.cols));
        if (is_quantized(w.format) && in.quantized.rows != in.M)
            throw std::invalid_argument("linear: a quantized weight needs its input quantized first");
        if (!is_quantized(w.format) && in.M >= kFloatPanelMinRows && n_outputs > 1) {
            // float weights over many rows run on whole panels of each matrix (below)
            for (int64_t j = 0; j < n_outputs; ++j) linear(pool, outputs + j, 1, in);
            return;
        }
        work += w.rows * w.row_bytes() * in.M;
        rows += round_up(w.rows, kTileRows);
    }
    // Chunks of output columns, a multiple of the kernels' tiles of (at most) 16 rows; for float
    // weights over many rows, whole panels of kFloatPanelColumns (a chunk ending in half a panel
    // runs it at half the FMA rate) and about 4 chunks per thread. Otherwise few chunks: each
    // costs two atomic updates of a line every thread writes (~0.3 us between the cores of a
    // 2-core VM, as long as 16 KB of weights take to stream), so one chunk per thread for a small
    // call (under kChunkWork per thread: decode's matrices) and two for a large one (a descheduled
    // worker then delays the call by a quarter, and the caller still runs what no worker started).
    // Measured on SmolLM2 int4, Zen 5, 2 threads, against 8 chunks per thread: decode 280 -> 370
    // tok/s, prefill +5% (2 per thread as fast as 1, 4 and 8 slower).
    constexpr int64_t kChunkWork = 1 << 20;     // weight bytes x activation rows
    constexpr int64_t kMaxChunksPerThread = 2;
    const WeightView& first = *outputs[0].w;
    const bool panels = !is_quantized(first.format) && in.M >= kFloatPanelMinRows;
    const int64_t per_thread = std::clamp<int64_t>(work / (kChunkWork * pool.size()), 1, kMaxChunksPerThread);
    const int64_t chunk = panels
        ? kFloatPanelColumns * (((rows + kFloatPanelColumns - 1) / kFloatPanelColumns + 4 * pool.size() - 1) / (4 * pool.size()))
        : std::max<int64_t>(kTileRows, round_up((rows + per_thread * pool.size() - 1) / (per_thread * pool.size()), kTileRows));
    pool.parallel_for((rows + chunk - 1) / chunk, [&](int64_t c) {
        // the part of each weight inside the group's rows [c * chunk, (c + 1) * chunk)
        int64_t offset = 0;
        for (int64_t i = 0; i < n_outputs; ++i) {
            const WeightView& w = *outputs[i].w;
            const int64_t n_begin = std::max<int64_t>(0, c * chunk - offset);
            const int64_t n_end = std::min(w.rows, (c + 1) * chunk - offset);
            offset += round_up(w.rows, kTileRows);
            if (n_begin >= n_end) continue;
            if (is_quantized(w.format)) kernels.quant_weights(w, in.quantized, n_begin, n_end, outputs[i].y);
            else kernels.float_weights(w, in.x, in.M, n_begin, n_end, outputs[i].y);
        }
    });
}

void linear(ThreadPool& pool, const WeightView& w, const LinearInput& in, float* y) {
    const LinearOutput output{&w, y};
    linear(pool, &output, 1, in);
}

void linear(ThreadPool& pool, const WeightView& w, const float* x, int64_t M, float* y, ActivationScratch& scratch) {
    linear(pool, w, prepare_linear_input(pool, x, M, w.cols, is_quantized(w.format), scratch), y);
}

void embedding(const WeightView& w, const int32_t* ids, int64_t M, float* out) {
    const int64_t D = w.cols, n_groups = w.n_groups();
    // a table tiled for the matmul kernels (a tied lm_head) is read from its tiled copy, one row
    // rebuilt at a time: the file's copy is not resident then and is never touched
    thread_local std::vector<uint8_t> row_data;
    thread_local std::vector<uint16_t> row_scales, row_mins;
    for (int64_t m = 0; m < M; ++m) {
        const int64_t row = ids[m];
        if (row < 0 || row >= w.rows) throw std::out_of_range("token id " + std::to_string(row) + " outside the vocabulary");
        float* o = out + m * D;
        if (w.tiled.data != nullptr) {
            row_data.resize((size_t)w.row_bytes());
            row_scales.resize((size_t)n_groups), row_mins.resize((size_t)n_groups);
            untile_weight_row(w, row, row_data.data(), row_scales.data(), row_mins.data());
            WeightView one = w;
            one.rows = 1, one.data = row_data.data(), one.scales = row_scales.data();
            one.mins = w.format == WeightFormat::Q4_ASYM ? row_mins.data() : nullptr;
            one.tiled = TiledWeight{};
            const int32_t first = 0;
            embedding(one, &first, 1, o);
            continue;
        }
        const uint8_t* raw = static_cast<const uint8_t*>(w.data) + row * w.row_bytes();
        switch (w.format) {
            case WeightFormat::F32:
                std::copy_n(reinterpret_cast<const float*>(raw), D, o);
                break;
            case WeightFormat::F16:
                for (int64_t k = 0; k < D; ++k) o[k] = f16_to_f32(reinterpret_cast<const uint16_t*>(raw)[k]);
                break;
            case WeightFormat::BF16:
                for (int64_t k = 0; k < D; ++k) o[k] = bf16_to_f32(reinterpret_cast<const uint16_t*>(raw)[k]);
                break;
            case WeightFormat::Q8:
                for (int64_t k = 0; k < D; ++k)
                    o[k] = (float)reinterpret_cast<const int8_t*>(raw)[k] *
                           f16_to_f32(w.scales[row * n_groups + k / w.group_size]);
                break;
            case WeightFormat::Q4_SYM:
            case WeightFormat::Q4_ASYM:
                for (int64_t k = 0; k < D; ++k) {
                    const int64_t chunk = k / kBlock, i = k % kBlock;
                    const uint8_t byte = raw[chunk * (kBlock / 2) + (i % (kBlock / 2))];
                    const int q = i < kBlock / 2 ? (byte & 0x0f) : (byte >> 4);
                    const int64_t g = row * n_groups + k / w.group_size;
                    const float scale = f16_to_f32(w.scales[g]);
                    o[k] = w.format == WeightFormat::Q4_SYM ? (float)(q - 8) * scale
                                                            : (float)q * scale + f16_to_f32(w.mins[g]);
                }
                break;
        }
    }
}

namespace {

// sum over i in [0, n) of term(i), kept in kSumLanes interleaved partial sums that are added in a fixed
// order at the end: the compiler vectorises it, where one running sum is a chain of n dependent adds
// (~0.55 us a 576-wide row, SmolLM2's norms 0.4 ms of an 8-sequence decode step). The order depends
// on n only, so a row's bits never depend on the rows beside it.
template <typename Term>
inline float lane_sum(int64_t n, Term term) {
    constexpr int kSumLanes = 16;
    float part[kSumLanes] = {};
    int64_t i = 0;
    for (; i + kSumLanes <= n; i += kSumLanes)
        for (int j = 0; j < kSumLanes; ++j) part[j] += term(i + j);
    for (int j = 0; i + j < n; ++j) part[j] += term(i + j);
    for (int width = kSumLanes / 2; width > 0; width /= 2)  // pairwise
        for (int j = 0; j < width; ++j) part[j] += part[j + width];
    return part[0];
}

}  // namespace

void rmsnorm(const float* x, const float* weight, int64_t M, int64_t D, float eps, float* y) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * D;
        float* yr = y + m * D;
        const float sum_sq = lane_sum(D, [&](int64_t i) { return xr[i] * xr[i]; });
        const float inv = 1.0f / std::sqrt(sum_sq / (float)D + eps);
        for (int64_t i = 0; i < D; ++i) yr[i] = weight[i] * (xr[i] * inv);
    }
}

void layernorm(const float* x, const float* weight, const float* bias, int64_t M, int64_t D, float eps, float* y) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * D;
        float* yr = y + m * D;
        const float mean = lane_sum(D, [&](int64_t i) { return xr[i]; }) / (float)D;
        // two passes: the variance of the centred values (no cancellation)
        const float sum_sq = lane_sum(D, [&](int64_t i) { return (xr[i] - mean) * (xr[i] - mean); });
        const float inv = 1.0f / std::sqrt(sum_sq / (float)D + eps);
        for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mean) * inv * weight[i] + bias[i];
    }
}

namespace {

// Elements per task of an element-wise op over n values on `threads` threads: one task below 4096
// (a task's hand-off costs about what that much work does), else a multiple of the thread count of
// tasks of at most ~4096, 16-aligned. A fixed 4096 gave an 8-sequence decode step's 8 x 1536 values
// three tasks on two threads, one thread doing two.
int64_t elementwise_chunk(int64_t n, int64_t threads) {
    constexpr int64_t kTask = 4096;
    if (n <= kTask || threads <= 1) return kTask;
    const int64_t rounds = (n + kTask * threads - 1) / (kTask * threads), tasks = rounds * threads;
    return ((n + tasks - 1) / tasks + 15) / 16 * 16;
}

}  // namespace

void swiglu(ThreadPool& pool, const float* gate, const float* up, int64_t n, float* out) {
    const CpuKernels& kernels = active_kernels();
    const int64_t chunk = elementwise_chunk(n, pool.size());
    pool.parallel_for((n + chunk - 1) / chunk, [&](int64_t i) {
        const int64_t begin = i * chunk, len = std::min(chunk, n - begin);
        kernels.swiglu(gate + begin, up + begin, len, out + begin);
    });
}

namespace {

// The activations other than SiLU, as torch computes them in float32.
float gelu_tanh(float x) {  // gelu(approximate="tanh"), gelu_new, BLOOM's gelu
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}
float gelu_erf(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f)); }
float relu(float x) { return x > 0.0f ? x : 0.0f; }
float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

void ffn_activation(ThreadPool& pool, Activation act, const float* gate, const float* up, int64_t n, float* out) {
    if (act == Activation::Silu && gate != nullptr) return swiglu(pool, gate, up, n, out);
    float (*fn)(float) = act == Activation::GeluTanh ? gelu_tanh
                         : act == Activation::Gelu   ? gelu_erf
                         : act == Activation::Relu   ? relu
                                                     : silu;
    const int64_t chunk = elementwise_chunk(n, pool.size());
    pool.parallel_for((n + chunk - 1) / chunk, [&](int64_t i) {
        const int64_t begin = i * chunk, end = std::min(n, begin + chunk);
        if (gate != nullptr)
            for (int64_t k = begin; k < end; ++k) out[k] = fn(gate[k]) * up[k];
        else
            for (int64_t k = begin; k < end; ++k) out[k] = fn(up[k]);
    });
}

std::vector<float> rope_inv_freq(int64_t rotary_dim, double theta, const RopeScaling& scaling) {
    if (rotary_dim <= 0 || rotary_dim % 2 != 0) throw std::invalid_argument("rope: rotary dims must be even and positive");
    if (!(theta > 0.0)) throw std::invalid_argument("rope: rope_theta must be positive");
    const int64_t half = rotary_dim / 2;
    std::vector<float> inv_freq((size_t)half);
    for (int64_t i = 0; i < half; ++i) {
        // torch: 1 / base ** (arange(0, dim, 2).float() / dim), all in float32
        const float exponent = (float)(2 * i) / (float)rotary_dim;
        inv_freq[(size_t)i] = 1.0f / std::pow((float)theta, exponent);
    }
    if (scaling.type == "default") return inv_freq;
    if (!(scaling.factor > 0.0)) throw std::invalid_argument("rope_scaling: factor must be positive");
    if (scaling.type == "linear") {
        for (float& f : inv_freq) f = f / (float)scaling.factor;
        return inv_freq;
    }
    if (scaling.type == "llama3") {
        const double low = scaling.low_freq_factor, high = scaling.high_freq_factor;
        const double old_len = scaling.original_max_position_embeddings;
        if (!(high > low)) throw std::invalid_argument("rope_scaling llama3: high_freq_factor must exceed low_freq_factor");
        const double low_freq_wavelen = old_len / low, high_freq_wavelen = old_len / high;
        for (float& f : inv_freq) {
            const double wavelen = 2.0 * M_PI / (double)f;
            double scaled = wavelen > low_freq_wavelen ? (double)f / scaling.factor : (double)f;
            if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
                const double smooth = (old_len / wavelen - low) / (high - low);
                scaled = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled;
            }
            f = (float)scaled;
        }
        return inv_freq;
    }
    throw std::invalid_argument("unsupported rope_scaling type '" + scaling.type + "' (supported: linear, llama3)");
}

void rope_angles(const int32_t* positions, int64_t M, const float* inv_freq, int64_t half, float* cos_sin) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < half; ++i) {
            const float angle = (float)positions[m] * inv_freq[i];
            cos_sin[(m * 2) * half + i] = std::cos(angle);
            cos_sin[(m * 2 + 1) * half + i] = std::sin(angle);
        }
}

void rope(float* x, int64_t M, int64_t n_heads, int64_t D, int64_t rotary_dim, const float* cos_sin) {
    const int64_t half = rotary_dim / 2;
    for (int64_t m = 0; m < M; ++m) {
        const float* cos_m = cos_sin + (m * 2) * half;
        const float* sin_m = cos_m + half;
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + (m * n_heads + h) * D;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * cos_m[i] - b * sin_m[i];
                v[i + half] = b * cos_m[i] + a * sin_m[i];
            }
        }
    }
}

std::vector<float> alibi_slopes(int64_t n_heads) {
    // transformers' build_alibi_tensor: powers of 2^(-8/n) for the largest power of two n <= heads,
    // then every other power of 2^(-4/n) for the remaining heads
    if (n_heads <= 0) throw std::invalid_argument("alibi: head count must be positive");
    int64_t closest = 1;
    while (closest * 2 <= n_heads) closest *= 2;
    const double base = std::pow(2.0, -std::pow(2.0, -(std::log2((double)closest) - 3.0)));
    std::vector<float> slopes;
    for (int64_t i = 1; i <= closest; ++i) slopes.push_back((float)std::pow(base, (double)i));
    if (closest != n_heads) {
        const double extra = std::pow(2.0, -std::pow(2.0, -(std::log2((double)(2 * closest)) - 3.0)));
        for (int64_t i = 0; i < std::min(closest, n_heads - closest); ++i)
            slopes.push_back((float)std::pow(extra, (double)(1 + 2 * i)));
    }
    return slopes;
}

namespace {

// Keys are attended in pieces of kAttentionPiece positions, aligned to absolute positions (0, 256,
// 512, ...): each piece gives a row's head its softmax partials (max m, sum l of exp(s - m), output
// o = sum exp(s - m) v), folded into the row's running (m, l, o) in piece order by fold_piece. Every
// way of running a row (alone or beside other rows and sequences, in a prefill block of any size,
// its keys split among tasks or not, any thread count) computes the same pieces and folds them in
// the same order, so its result is the same bits: a sequence's logits do not depend on how its
// prompt was chunked or on what ran beside it. The folds cost: SmolLM2 int4, 2 threads, Zen 5,
// alternating builds, best of 3 each, attention per token at depth 1000 / 3700: 0.85-0.87 ->
// 0.90-1.16 ms / 2.69-2.85 -> 2.75-3.52 ms, and 512 prompt rows at depth 3500: 405-461 -> 464-509 ms;
// no change at depth 100-200. Pieces of 64 keys cost 1.5-1.6x at depth 3700 (their folds).
constexpr int64_t kAttentionPiece = 256;

// Folds one piece's partials (m_c, l_c, o_c: f32 [D]) into the running (m, l, o: f32 [D]); a piece
// whose every key is masked for the row (m_c = -inf) adds nothing. Only the smaller maximum's side
// is rescaled (the other's factor would be exp(0) = 1), with fast_exp.h's exp. Not inlined: one copy
// of its arithmetic for every caller (on Linux x86-64 the copy for the CPU, AVX-512 or AVX2 + FMA,
// picked once when the module loads: a prefill of 512 rows at depth 3500 folds ~2 million pieces).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define PYLLM_FOLD_CLONES __attribute__((noinline, target_clones("avx512f", "arch=haswell", "default")))
#else
#define PYLLM_FOLD_CLONES __attribute__((noinline))
#endif
PYLLM_FOLD_CLONES void fold_piece(float m_c, float l_c, const float* o_c, int64_t D, float& m, float& l,
                                  float* o) {
    if (m_c == -INFINITY) return;
    if (m == -INFINITY) {  // the first piece
        m = m_c, l = l_c;
        std::copy_n(o_c, D, o);
    } else if (m_c <= m) {
        const float b = exp_nonpositive(m_c - m);
        l += l_c * b;
        for (int64_t i = 0; i < D; ++i) o[i] += o_c[i] * b;
    } else {
        const float a = exp_nonpositive(m - m_c);
        m = m_c;
        l = l * a + l_c;
        for (int64_t i = 0; i < D; ++i) o[i] = o[i] * a + o_c[i];
    }
}

}  // namespace

void attention(ThreadPool& pool, KvType kv_type, const AttentionSpan* spans, int64_t n_spans, int64_t n_heads,
               int64_t n_kv_heads, int64_t D, int64_t cache_len, float scale, const AttentionOptions& options) {
    // Tasks are (span, block of query rows, kv head, key chunk), all spans' tasks in one parallel
    // loop: the query heads sharing a kv head read its keys and values once, together; when a span
    // has few rows (decode), its keys are split into chunks of whole pieces so every thread has work
    // (blocks of one row), each chunk keeping its pieces' partials, folded afterwards. A span's tasks
    // depend only on that span (and the thread count), and its arithmetic on neither (kAttentionPiece).
    if (kv_type == KvType::Q8_0 && D % kQ8Block != 0)
        throw std::invalid_argument("a q8_0 KV cache needs head_dim a multiple of 32, not " + std::to_string(D));
    const CpuKernels& kernels = active_kernels();
    const int64_t group = n_heads / n_kv_heads;
    constexpr int64_t P = kAttentionPiece;
    // keys a query sees: its own position and those before it, back to the window
    const int64_t window = options.window > 0 ? options.window : INT64_MAX;
    const bool shaped = options.alibi != nullptr || options.softcap > 0.0f;
    auto first_key = [&](int64_t position) { return position >= window ? position - window + 1 : 0; };
    // Prefill: up to kRowsPerTask consecutive query rows per task read the keys and values they see
    // once, together (each row's keys past its own position, or before its window, masked). ALiBi,
    // whose term depends on the query's position, and soft-capping keep one row per task.
    constexpr int64_t kRowsPerTask = 4;
    struct Plan {
        int64_t n_chunks, R, blocks, first_task, first_part, pieces;  // first_part: into the partials, in heads;
    };                                                                  // pieces: per row of a split span
    std::vector<Plan> plans((size_t)n_spans);
    int64_t n_tasks = 0, n_parts = 0;
    for (int64_t s = 0; s < n_spans; ++s) {
        const int64_t M = spans[s].M, rows = M * n_kv_heads, last = spans[s].pos0 + M - 1;
        // the most pieces a row of the span touches (its last row's, or a windowed row's)
        const int64_t pieces = last / P - first_key(spans[s].pos0) / P + 1;
        int64_t n_chunks = 1;
        if (rows < 4 * pool.size())
            n_chunks = std::max<int64_t>(1, std::min((4 * pool.size() + rows - 1) / rows, pieces));
        const int64_t R = n_chunks == 1 && !shaped ? std::clamp<int64_t>(rows / (4 * pool.size()), 1, kRowsPerTask) : 1;
        const int64_t blocks = (M + R - 1) / R;
        plans[(size_t)s] = Plan{n_chunks, R, blocks, n_tasks, n_parts, pieces};
        n_tasks += blocks * n_kv_heads * n_chunks;
        if (n_chunks > 1) n_parts += rows * pieces * group;
    }
    // bytes from a cache's start to kv head kv's key t (keys transposed unless q8_0) and to its value row t
    const int64_t row_bytes = kv_row_bytes(kv_type, D);
    auto key_offset = [&](int64_t kv, int64_t t) {
        return kv_type == KvType::Q8_0 ? (kv * cache_len + t) * row_bytes : (kv * D * cache_len + t) * (row_bytes / D);
    };
    // a split span's partials: per (row, kv head, piece from the row's first, head of the group)
    std::vector<float> maxima((size_t)n_parts, -INFINITY), sums((size_t)n_parts), partial_out((size_t)(n_parts * D));

    // What task number `task` reads: its span, block of query rows, kv head, chunk and keys t0 .. t1
    // (t0 at a piece's start; keys before the block's first visible one are masked).
    struct Task {
        int64_t s, m0, block_rows, kv, chunk, position, t0, t1;
    };
    auto locate = [&](int64_t task) {
        // the span this task belongs to: the last whose first task is at or before it
        const int64_t s = std::upper_bound(plans.begin(), plans.end(), task,
                                           [](int64_t t, const Plan& p) { return t < p.first_task; }) - plans.begin() - 1;
        const Plan& plan = plans[(size_t)s];
        const int64_t n_chunks = plan.n_chunks, R = plan.R, local = task - plan.first_task;
        const int64_t block = local / (n_kv_heads * n_chunks), kv = local / n_chunks % n_kv_heads, chunk = local % n_chunks;
        const int64_t m0 = block * R, block_rows = std::min(R, spans[s].M - m0);
        // pieces of the block: from the first row's first visible key to the last row's own
        const int64_t position = spans[s].pos0 + m0, end = position + block_rows;
        const int64_t first_piece = first_key(position) / P, n_pieces = (end - 1) / P - first_piece + 1;
        const int64_t per_chunk = (n_pieces + n_chunks - 1) / n_chunks;
        const int64_t p0 = first_piece + std::min(n_pieces, chunk * per_chunk);
        const int64_t p1 = first_piece + std::min(n_pieces, chunk * per_chunk + per_chunk);
        return Task{s, m0, block_rows, kv, chunk, position, p0 * P, std::min(end, p1 * P)};
    };
    // A decode task's keys and values are a few KiB over D key rows (its neighbouring chunk lies right
    // after them), read cold: task after task waits on the memory's latency. So each thread takes
    // runs of consecutive tasks (kRunsPerThread a thread, of about equal key counts, claimed as the
    // tasks were) and asks for the next task's lines while it computes one, when they are few enough
    // for L1 (a long prefill block's are not). Which thread runs a task never changes its arithmetic.
    // SmolLM2 int4, 8 sequences a step at positions 64-192, 2 threads, Zen 5: attention 1.67-1.70 ->
    // 1.44-1.48 ms a step from the runs alone: until prefetch_rows kept its calls (kernels.h), GCC
    // deleted every prefetch here. With them and the padded cache (kv_cache_stride), best of 5
    // alternating runs on a noisy VM: attention 2.24 -> 1.59 ms and the cache write 0.74 -> 0.44 ms a
    // step at a 4096 context, 2.21 -> 1.51 and 0.44 -> 0.32 at 512; the step 10.9 -> 9.3 and 12.1 -> 8.4.
    constexpr int64_t kRunsPerThread = 2, kPrefetchTaskBytes = 32 << 10;
    const int64_t elem_bytes = kv_type == KvType::Q8_0 ? 0 : row_bytes / D;
    auto prefetch_task = [&](const Task& t) {
        const int64_t len = t.t1 - t.t0;
        if (len <= 0 || 2 * len * row_bytes > kPrefetchTaskBytes) return;
        const uint8_t* keys = static_cast<const uint8_t*>(spans[t.s].k_cache_t) + key_offset(t.kv, t.t0);
        if (kv_type == KvType::Q8_0) prefetch_rows(keys, 1, len * row_bytes, 0);
        else prefetch_rows(keys, D, len * elem_bytes, cache_len * elem_bytes);
        prefetch_rows(static_cast<const uint8_t*>(spans[t.s].v_cache) + (t.kv * cache_len + t.t0) * row_bytes, 1,
                      len * row_bytes, 0);
    };
    std::vector<Task> tasks((size_t)n_tasks);
    std::vector<int64_t> run_starts{0};  // run r: tasks run_starts[r] .. run_starts[r + 1]
    {
        std::vector<int64_t> cost((size_t)n_tasks + 1, 0);  // prefix sums of keys x rows (+ a task's fixed part)
        for (int64_t task = 0; task < n_tasks; ++task) {
            const Task& t = tasks[(size_t)task] = locate(task);
            cost[(size_t)task + 1] = cost[(size_t)task] + std::max<int64_t>(0, t.t1 - t.t0) * t.block_rows + 16;
        }
        const int64_t n_runs = std::min<int64_t>(n_tasks, kRunsPerThread * pool.size());
        for (int64_t r = 1; r < n_runs; ++r) {
            const int64_t at = std::lower_bound(cost.begin(), cost.end(), cost.back() * r / n_runs) - cost.begin();
            if (at > run_starts.back() && at < n_tasks) run_starts.push_back(at);
        }
        run_starts.push_back(n_tasks);
    }

    auto run_task = [&](const Task& here) {
        const int64_t s = here.s, m0 = here.m0, block_rows = here.block_rows, kv = here.kv;
        const AttentionSpan& span = spans[s];
        const Plan& plan = plans[(size_t)s];
        const int64_t heads = block_rows * group, position = here.position;
        thread_local std::vector<float> buffer;
        const int64_t need = heads * (P + 4 * D + 4);
        if ((int64_t)buffer.size() < need) buffer.resize((size_t)need);
        float* q_scaled = buffer.data();                 // [heads, D]
        float* o_piece = q_scaled + heads * D;           // [heads, D]: a piece's partials
        float* max_piece = o_piece + heads * D;          // [heads]
        float* sum_piece = max_piece + heads;            // [heads]
        float* o_run = sum_piece + heads;                // [heads, D]: the fold so far (a block's own)
        float* max_run = o_run + heads * D;              // [heads]
        float* sum_run = max_run + heads;                // [heads]
        float* scores = sum_run + heads;                 // [heads, P]
        std::fill_n(o_run, heads * D, 0.0f);
        std::fill_n(max_run, heads, -INFINITY);
        std::fill_n(sum_run, heads, 0.0f);
        for (int64_t r = 0; r < block_rows; ++r) {
            const float* q_group = span.q + ((m0 + r) * n_heads + kv * group) * D;
            for (int64_t i = 0; i < group * D; ++i) q_scaled[r * group * D + i] = q_group[i] * scale;
        }
        // keys outside a row's view are masked when a piece may hold some: several rows, or a window
        const bool masked = block_rows > 1 || options.window > 0;
        for (int64_t t0 = here.t0; t0 < here.t1; t0 += P) {
            const int64_t len = std::min(P, here.t1 - t0);
            ScoreShaping shaping;
            if (shaped) {
                shaping.alibi = options.alibi ? options.alibi + kv * group : nullptr;
                shaping.first_key = (float)(t0 - position);
                shaping.softcap = options.softcap;
            }
            if (masked) {
                shaping.row_heads = group;
                shaping.last_key = position - t0;
                shaping.window = options.window;
            }
            float *o = o_piece, *max = max_piece, *sum = sum_piece;
            if (plan.n_chunks > 1) {  // one row: the piece's partials are kept for the fold after the loop
                const int64_t piece = t0 / P - first_key(position) / P;
                const int64_t part = plan.first_part + ((m0 * n_kv_heads + kv) * plan.pieces + piece) * group;
                o = partial_out.data() + part * D;
                max = maxima.data() + part;
                sum = sums.data() + part;
            }
            kernels.attend(q_scaled, heads, D, kv_type,
                           static_cast<const uint8_t*>(span.k_cache_t) + key_offset(kv, t0), cache_len,
                           static_cast<const uint8_t*>(span.v_cache) + (kv * cache_len + t0) * row_bytes, len,
                           shaped || masked ? &shaping : nullptr, scores, o, max, sum);
            if (plan.n_chunks > 1) continue;
            for (int64_t h = 0; h < heads; ++h)
                fold_piece(max_piece[h], sum_piece[h], o_piece + h * D, D, max_run[h], sum_run[h], o_run + h * D);
        }
        if (plan.n_chunks > 1) return;
        for (int64_t r = 0; r < block_rows; ++r) {
            float* o = span.out + ((m0 + r) * n_heads + kv * group) * D;
            for (int64_t g = 0; g < group; ++g)
                for (int64_t i = 0; i < D; ++i) o[g * D + i] = o_run[(r * group + g) * D + i] / sum_run[r * group + g];
        }
    };
    pool.parallel_for((int64_t)run_starts.size() - 1, [&](int64_t run) {
        const int64_t begin = run_starts[(size_t)run], end = run_starts[(size_t)run + 1];
        prefetch_task(tasks[(size_t)begin]);
        for (int64_t task = begin; task < end; ++task) {
            if (task + 1 < end) prefetch_task(tasks[(size_t)task + 1]);
            run_task(tasks[(size_t)task]);
        }
    });
    // split spans: each (row, query head)'s pieces folded in order, as a task that ran them all folds them
    std::vector<std::pair<int64_t, int64_t>> folds;  // (span, row * n_heads + query head)
    for (int64_t s = 0; s < n_spans; ++s)
        if (plans[(size_t)s].n_chunks > 1)
            for (int64_t h = 0; h < spans[s].M * n_heads; ++h) folds.emplace_back(s, h);
    pool.parallel_for((int64_t)folds.size(), [&](int64_t f) {
        const auto [s, h] = folds[(size_t)f];
        const Plan& plan = plans[(size_t)s];
        const int64_t m = h / n_heads, kv = h % n_heads / group, g = h % group, position = spans[s].pos0 + m;
        const int64_t n_pieces = position / P - first_key(position) / P + 1, row = m * n_kv_heads + kv;
        float* o = spans[s].out + h * D;
        std::fill_n(o, D, 0.0f);
        float max_run = -INFINITY, sum_run = 0.0f;
        for (int64_t piece = 0; piece < n_pieces; ++piece) {
            const size_t part = (size_t)(plan.first_part + (row * plan.pieces + piece) * group + g);
            fold_piece(maxima[part], sums[part], partial_out.data() + part * D, D, max_run, sum_run, o);
        }
        for (int64_t i = 0; i < D; ++i) o[i] /= sum_run;
    });
}

void attention(ThreadPool& pool, const float* q, KvType kv_type, const void* k_cache_t, const void* v_cache, int64_t M,
               int64_t n_heads, int64_t n_kv_heads, int64_t D, int64_t cache_len, int64_t pos0, float scale,
               const AttentionOptions& options, float* out) {
    const AttentionSpan span{q, k_cache_t, v_cache, M, pos0, out};
    attention(pool, kv_type, &span, 1, n_heads, n_kv_heads, D, cache_len, scale, options);
}

}  // namespace pyllm
