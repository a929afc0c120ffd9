// The decoder engine: a model's weights (inside a memory-mapped file), its KV
// cache and scratch buffers, and forward() over the whole layer stack.
//
// Engine is the backend seam: the CPU engine lives in cpu_engine.cpp; a CUDA
// engine implements the same interface and is chosen by make_engine's caller.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../core/weights.h"
#include "../kernels/cpu/ops.h"
#include "mapped_file.h"

namespace pyllm {

struct ModelConfig {
    int64_t vocab_size = 0;
    int64_t hidden_size = 0;
    int64_t intermediate_size = 0;
    int64_t n_layers = 0;
    int64_t n_heads = 0;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;
    double rms_norm_eps = 1e-5;
    double rope_theta = 10000.0;
    RopeScaling rope_scaling;
    bool tie_word_embeddings = false;
    void validate() const;  // throws std::invalid_argument on impossible values
};

// How one linear weight ("model.layers.0.self_attn.q_proj") is stored.
struct LinearSpec {
    WeightFormat format = WeightFormat::F32;
    int64_t group_size = 0;
};

// A model file's tensors as the engines read them, checked before use (dtype, shape,
// byte range; std::invalid_argument naming the tensor otherwise).
//   bind_vector: f32 [n]   bind_linear: `base` ("model.layers.0.self_attn.q_proj") as
//   its LinearSpec says it is stored, [rows, cols] (+ scales, mins, bias)
const float* bind_vector(const TensorTable& t, const std::string& name, int64_t n);
WeightView bind_linear(const TensorTable& t, const std::map<std::string, LinearSpec>& specs, const std::string& base,
                       int64_t rows, int64_t cols);

class Engine {
public:
    virtual ~Engine() = default;
    virtual const ModelConfig& config() const = 0;
    virtual int64_t context_length() const = 0;
    virtual const char* device() const = 0;
    virtual const char* kv_cache() const = 0;  // the KV cache's element type: "f16" or "f32"
    // Runs tokens at positions pos .. pos + n - 1 (the cache must already hold
    // positions 0 .. pos - 1) and stores their keys and values. Checks the
    // positions and token ids first, then runs batches of at most max_batch().
    //   tokens: int32 [n]
    //   logits: f32 [n, vocab] when all_logits, else f32 [vocab] for the last token
    // Thread-safe: concurrent calls run one after another.
    void forward(const int32_t* tokens, int64_t n, int64_t pos, float* logits, bool all_logits);
    // Seconds spent in each stage of forward() since the engine was made, when it was made with
    // profiling on (PYLLM_PROFILE=1 in the environment); empty otherwise.
    virtual std::vector<std::pair<std::string, double>> profile() const { return {}; }

protected:
    // One batch of forward(), checked and serialised by it: M <= max_batch() tokens at
    // positions pos0 .. pos0 + M - 1.
    //   logits: f32 [M, vocab] when all_logits, f32 [vocab] (last row) otherwise, or null
    virtual void run_batch(const int32_t* tokens, int64_t M, int64_t pos0, float* logits, bool all_logits) = 0;
    virtual int64_t max_batch() const = 0;

private:
    std::mutex forward_mutex_;
};

// kv_cache: the KV cache's element type, "f16", "f32" or "auto" (f32 for a model stored
// in f32, f16 otherwise).
std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<MappedFile> file, const TensorTable& tensors,
                                        const ModelConfig& config, const std::map<std::string, LinearSpec>& linears,
                                        int64_t context_length, int n_threads, const std::string& kv_cache);

}  // namespace pyllm
