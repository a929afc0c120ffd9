// The decoder engine: a model's weights (inside a memory-mapped file), its KV
// cache and scratch buffers, and forward() over the whole layer stack.
//
// Engine is the backend seam: the CPU engine lives in cpu_engine.cpp; a CUDA
// engine implements the same interface and is chosen by make_engine's caller.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../core/weights.h"
#include "../kernels/cpu/ops.h"
#include "mapped_file.h"

namespace pyllm {

// The decoder block, as the model file describes it (pyllm/arch/ writes it; docs/FORMAT.md). Every
// choice here is read once at load; the layer loop consults each in one place.
enum class NormType : int32_t { RmsNorm = 0, LayerNorm = 1 };        // LayerNorm: with bias
enum class PositionType : int32_t { Rope = 0, Alibi = 1, Learned = 2 };
enum class FfnType : int32_t { Gated = 0, Plain = 1 };               // act(gate) * up, or act(up)

struct ModelConfig {
    int64_t vocab_size = 0;
    int64_t hidden_size = 0;
    int64_t intermediate_size = 0;
    int64_t n_layers = 0;
    int64_t n_heads = 0;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;
    double norm_eps = 1e-5;
    double rope_theta = 10000.0;
    RopeScaling rope_scaling;
    bool tie_word_embeddings = false;
    // block description (defaults: LLaMA)
    NormType norm = NormType::RmsNorm;
    bool embedding_norm = false;         // a norm right after the embedding (BLOOM)
    double embedding_scale = 1.0;        // embeddings multiplied by it (Gemma: sqrt(hidden))
    PositionType positions = PositionType::Rope;
    int64_t rotary_dim = 0;              // RoPE on the first rotary_dim dims of each head (0: head_dim)
    double rope_theta_local = 0.0;       // sliding-window layers' theta, default scaling (0: rope_theta)
    int64_t max_positions = 0;           // learned positions: rows of the position table
    bool qk_norm = false;                // RMSNorm of each q and k head before RoPE (Qwen3, Gemma 3)
    bool post_norms = false;             // norms of the attention and FFN outputs (Gemma 2/3, GLM-4)
    FfnType ffn = FfnType::Gated;
    Activation activation = Activation::Silu;
    double attention_scale = 0.0;        // scores = q.k * attention_scale (0: 1 / sqrt(head_dim))
    double attn_logit_softcapping = 0.0; // > 0: scores = c * tanh(scores / c) (Gemma 2)
    double final_logit_softcapping = 0.0;
    std::vector<int64_t> sliding_window;  // per layer: keys a query sees (0: all); empty: all layers global
    void validate() const;  // throws std::invalid_argument on impossible values
    int64_t rope_dims() const { return rotary_dim > 0 ? rotary_dim : head_dim; }
    int64_t window(int64_t layer) const { return sliding_window.empty() ? 0 : sliding_window[(size_t)layer]; }
};

// How one linear weight ("model.layers.0.self_attn.q_proj") is stored.
struct LinearSpec {
    WeightFormat format = WeightFormat::F32;
    int64_t group_size = 0;
    // Q4_ASYM stored as "int4_asym_dq": the scales and mins are 8-bit codes (.scales u8, .mins i8
    // [rows, n_groups]) of one f32 step per row each (.steps [rows, 2]); bind_linear expands them to
    // the f16 scales and mins every kernel reads.
    bool coded_params = false;
};

// A model file's tensors as the engines read them, checked before use (dtype, shape,
// byte range; std::invalid_argument naming the tensor otherwise).
//   bind_vector: f32 [n]   bind_linear: `base` ("model.layers.0.self_attn.q_proj") as
//   its LinearSpec says it is stored, [rows, cols] (+ scales, mins, bias); scales and mins that the
//   file holds as codes are expanded into a buffer appended to `expanded` (which must outlive the view)
const float* bind_vector(const TensorTable& t, const std::string& name, int64_t n);
WeightView bind_linear(const TensorTable& t, const std::map<std::string, LinearSpec>& specs, const std::string& base,
                       int64_t rows, int64_t cols, std::vector<AlignedBytes>& expanded);

// Sees the input of every matrix while forward() runs (calibration statistics).
//   layer, input (MatrixInput), x: f32 [M, cols] valid during the call only
enum MatrixInput : int { kAttnIn = 0, kAttnOut = 1, kMlpIn = 2, kMlpMid = 3 };
using InputObserver = std::function<void(int64_t layer, int input, const float* x, int64_t M, int64_t cols)>;

class Engine {
public:
    virtual ~Engine() = default;
    virtual const ModelConfig& config() const = 0;
    virtual int64_t context_length() const = 0;
    virtual const char* device() const = 0;
    virtual const char* kv_cache() const = 0;  // the KV cache's element type: "f16", "f32" or "q8_0"
    virtual int64_t kv_cache_bytes() const = 0;  // what the keys and values of all sequences take, allocated
    // Whether the KV cache's pages are all resident (filled in by a background thread on the CPU,
    // core/populate.h; allocated on the device by the CUDA engine).
    virtual bool kv_cache_populated() const { return true; }
    // Runs tokens at positions pos .. pos + n - 1 (the cache must already hold
    // positions 0 .. pos - 1) and stores their keys and values. Checks the
    // positions and token ids first, then runs batches of at most max_batch().
    //   tokens: int32 [n]
    //   logits: f32 [n, vocab] when all_logits, else f32 [vocab] for the last token
    // Thread-safe: concurrent calls run one after another.
    void forward(const int32_t* tokens, int64_t n, int64_t pos, float* logits, bool all_logits);
    // Sequences the KV cache holds, each with context_length() positions; forward() runs sequence 0.
    virtual int64_t n_seq() const { return 1; }
    // Rows of several sequences in one step (the weights are read once for all of them): row i is
    // token tokens[i] of sequence seq_ids[i] at position positions[i]. A sequence's rows are
    // consecutive, at consecutive positions, and its cache holds its positions before the first.
    // Writes the logits of rows logit_rows (ascending).
    //   tokens, seq_ids, positions: int32 [n]   logit_rows: int64 [n_logits]   logits: f32 [n_logits, vocab]
    // Checks everything first (std::invalid_argument / std::out_of_range); thread-safe like forward().
    // With embeds given, row i's input is embeds[i] instead of the embedding of tokens[i] (prompt tuning's
    // virtual tokens): transformers' inputs_embeds, so the embedding scale (Gemma's, inside its embedding
    // module) is not applied again; learned positions and the embedding norm are.
    //   embeds: f32 [n, hidden] or null
    // With hidden set, the rows' final hidden states (after the final norm, before the output matrix)
    // are written instead of logits: logits is then f32 [n_logits, hidden] (embeddings).
    void forward_rows(const int32_t* tokens, const int32_t* seq_ids, const int32_t* positions, int64_t n,
                      const int64_t* logit_rows, int64_t n_logits, float* logits, const float* embeds = nullptr,
                      bool hidden = false);
    // Called in the calling thread between the batches of one forward() / forward_rows() call, never
    // inside one: the Python module's check for signals, so that a SIGTERM or Ctrl-C waits for one batch
    // (max_batch() rows), not a whole 16k-token prefill (`pyllm bench -p 16000` ran on for minutes). It
    // may throw: the call then ends there, the keys and values of its earlier batches written.
    std::function<void()> between_batches;
    // Writes keys and values straight into sequence seq's cache at positions pos0 .. pos0 + n - 1 of every
    // layer (prefix tuning: a learned prefix is the first positions of the cache; keys as given, no RoPE).
    //   keys, values: f32 [layers, kv_heads, n, head_dim]
    void set_cache(int64_t seq, int64_t pos0, int64_t n, const float* keys, const float* values);
    // Copies the keys and values of positions 0 .. n_positions - 1 of sequence src into sequence dst
    // (a prefix computed once and shared).
    void copy_sequence(int64_t src, int64_t dst, int64_t n_positions);
    // How activations are quantized for int4/int8 weights: "int8x2" (two int8 terms per value in blocks
    // of 32, ~15 bits: the default), "int8" (one term, as llama.cpp's Q8_0 activations: half the
    // integer work of a matmul) or "int8x2_outliers" (two terms only in a row's outlier blocks;
    // ops.h kActivationQuants; docs/QUALITY.md gives their perplexity cost). Engines that multiply
    // with float activations (CUDA) have no choice: their getter says "float" and the setter throws
    // std::invalid_argument. It is chosen before the engine's first use (forward, forward_rows,
    // set_cache, copy_sequence): afterwards the cache holds keys and values computed with the one in
    // force, and a change throws std::invalid_argument.
    virtual const char* activation_quant() const { return "float"; }
    void set_activation_quant(const std::string& name) {
        const ForwardLock lock(*this, /*touches_cache=*/false);
        if (used_ && name != activation_quant())
            throw std::invalid_argument(std::string("activation_quant is chosen before the engine's first use: its "
                                                    "cache holds keys and values computed with '") +
                                        activation_quant() + "'");
        apply_activation_quant(name);
    }
    // Seconds spent in each stage of forward() since the engine was made, when it was made with
    // profiling on (PYLLM_PROFILE=1 in the environment); empty otherwise.
    virtual std::vector<std::pair<std::string, double>> profile() const { return {}; }
    // Installs (or with an empty function removes) the observer of matrix inputs; throws
    // std::invalid_argument where the backend has none.
    virtual void set_observer(InputObserver observer) {
        (void)observer;
        throw std::invalid_argument(std::string("the ") + device() + " engine does not report matrix inputs");
    }

protected:
    // Consecutive rows [row_begin, row_begin + rows) of a step, all of sequence `seq`, at positions pos0 ...
    struct Span {
        int64_t seq, row_begin, rows, pos0;
    };
    // One step of forward_rows(), checked, serialised and cut to at most max_batch() rows by it.
    //   logit_rows: int64 [n_logits], indices into this step's rows   logits: f32 [n_logits, vocab]
    //   embeds: f32 [M, hidden] (the rows' inputs) or null
    //   hidden: write the final hidden states f32 [n_logits, hidden] instead of logits
    virtual void run_spans(const int32_t* tokens, int64_t M, const Span* spans, int64_t n_spans,
                           const int64_t* logit_rows, int64_t n_logits, float* logits, const float* embeds,
                           bool hidden) {
        (void)tokens, (void)M, (void)spans, (void)n_spans, (void)logit_rows, (void)n_logits, (void)logits, (void)embeds,
            (void)hidden;
        throw std::invalid_argument(std::string("the ") + device() + " engine runs one sequence at a time");
    }
    virtual void copy_cache(int64_t src, int64_t dst, int64_t n_positions) {
        (void)src, (void)dst, (void)n_positions;
        throw std::invalid_argument(std::string("the ") + device() + " engine runs one sequence at a time");
    }
    virtual void write_cache(int64_t seq, int64_t pos0, int64_t n, const float* keys, const float* values) {
        (void)seq, (void)pos0, (void)n, (void)keys, (void)values;
        throw std::invalid_argument(std::string("the ") + device() + " engine does not take cache contents");
    }
    // Serialises the engine's calls (forward, forward_rows, set_cache, copy_sequence, set_activation_quant):
    // waits for a running one to end, and throws std::invalid_argument when this thread is running one
    // already (an observer callback calling back into the engine), where waiting would never end. A call
    // that touches the cache marks the engine used (used_).
    class ForwardLock {
    public:
        explicit ForwardLock(Engine& engine, bool touches_cache = true) : engine_(engine) {
            if (engine.forward_owner_.load() == std::this_thread::get_id())
                throw std::invalid_argument("the engine is running a forward in this thread already (a callback "
                                            "cannot call back into the engine)");
            engine.forward_mutex_.lock();
            engine.forward_owner_.store(std::this_thread::get_id());
            engine.used_ = engine.used_ || touches_cache;
        }
        ~ForwardLock() {
            engine_.forward_owner_.store(std::thread::id());
            engine_.forward_mutex_.unlock();
        }
        ForwardLock(const ForwardLock&) = delete;
        ForwardLock& operator=(const ForwardLock&) = delete;

    private:
        Engine& engine_;
    };
    bool used_ = false;  // a call has touched the cache (set under ForwardLock)

    virtual void apply_activation_quant(const std::string& name) {
        throw std::invalid_argument(std::string("the ") + device() + " engine multiplies with float activations: "
                                    "activation_quant '" + name + "' does not apply");
    }
    // One batch of forward(), checked and serialised by it: M <= max_batch() tokens at
    // positions pos0 .. pos0 + M - 1.
    //   logits: f32 [M, vocab] when all_logits, f32 [vocab] (last row) otherwise, or null
    virtual void run_batch(const int32_t* tokens, int64_t M, int64_t pos0, float* logits, bool all_logits) = 0;
    virtual int64_t max_batch() const = 0;

private:
    std::mutex forward_mutex_;
    std::atomic<std::thread::id> forward_owner_{};
};

// kv_cache: the KV cache's element type, "f16", "f32", "q8_0" (llama.cpp's blocks of 32, head_dim a
// multiple of 32) or "auto" (f32 for a model stored in f32, f16 otherwise).
// n_seq: sequences the KV cache holds (forward_rows), each with context_length positions.
std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<MappedFile> file, const TensorTable& tensors,
                                        const ModelConfig& config, const std::map<std::string, LinearSpec>& linears,
                                        int64_t context_length, int n_threads, const std::string& kv_cache,
                                        int64_t n_seq = 1);

}  // namespace pyllm
