// The CUDA engine: the whole decoder stack issued from C++ on one stream.
// Activations are f32; the KV cache is f32 [layers, kv_heads, n_ctx, head_dim]
// for keys and for values. Single-token steps replay a CUDA graph captured on
// the first one (positions and token ids live in device memory, and the
// decode attention split depends only on the cache length), unless the
// environment sets PYLLM_CUDA_GRAPH=0 or the capture fails (then eagerly).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "../kernels/cpu/ops.h"
#include "cuda_engine.h"
#include "kernels.h"

namespace pyllm {

int cuda_device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver / no device" error
        return 0;
    }
    return count;
}

namespace {

// The CUDA kernels implement the LLaMA block (RMSNorm, full RoPE, gated SiLU, plain causal attention);
// other block descriptions are refused by name rather than run wrongly.
void refuse_unsupported_blocks(const ModelConfig& c) {
    std::vector<std::string> missing;
    if (c.norm != NormType::RmsNorm) missing.push_back("LayerNorm");
    if (c.embedding_norm) missing.push_back("embedding norm");
    if (c.embedding_scale != 1.0) missing.push_back("embedding scale");
    if (c.positions != PositionType::Rope) missing.push_back(c.positions == PositionType::Alibi ? "ALiBi" : "learned positions");
    if (c.rope_dims() != c.head_dim) missing.push_back("partial rotary embedding");
    if (c.qk_norm) missing.push_back("q/k norms");
    if (c.post_norms) missing.push_back("post-attention/post-FFN norms");
    if (c.ffn != FfnType::Gated || c.activation != Activation::Silu) missing.push_back("feed-forward other than gated SiLU");
    if (c.attention_scale > 0.0) missing.push_back("query_pre_attn_scalar");
    if (c.attn_logit_softcapping > 0.0 || c.final_logit_softcapping > 0.0) missing.push_back("logit soft-capping");
    for (int64_t w : c.sliding_window)
        if (w > 0) { missing.push_back("sliding-window attention"); break; }
    if (missing.empty()) return;
    std::string list;
    for (const std::string& m : missing) list += (list.empty() ? "" : ", ") + m;
    throw std::invalid_argument("the CUDA engine does not implement this model's " + list + " yet; run it with device='cpu'");
}


using namespace cuda;

// Linear weights of one layer input, stacked into as few uploads as their
// layouts allow; part i writes output columns [offset_i, offset_i + rows_i).
struct StackedLinear {
    std::vector<DeviceWeight> parts;
    std::vector<int64_t> offsets;

    void run(const float* x, int64_t M, float* y, int64_t ldy, bool accumulate, MatmulWorkspace& ws,
             cudaStream_t s) const {
        for (size_t i = 0; i < parts.size(); ++i) linear(parts[i], x, M, y + offsets[i], ldy, accumulate, ws, s);
    }
};

StackedLinear stack_linears(const std::vector<WeightView>& views) {
    StackedLinear out;
    int64_t offset = 0;
    size_t begin = 0;
    while (begin < views.size()) {
        size_t end = begin + 1;
        while (end < views.size() && can_stack(views[begin], views[end])) ++end;
        out.parts.push_back(upload_weights(std::vector<WeightView>(views.begin() + begin, views.begin() + end)));
        out.offsets.push_back(offset);
        for (size_t i = begin; i < end; ++i) offset += views[i].rows;
        begin = end;
    }
    return out;
}

DeviceBuffer upload_floats(const float* host, int64_t n) {
    DeviceBuffer b;
    b.upload(host, (size_t)n * sizeof(float));
    return b;
}

struct Layer {
    DeviceBuffer attn_norm, ffn_norm;  // f32 [hidden]
    StackedLinear qkv;                 // -> [M, q_dim + 2 kv_dim]: q | k | v
    StackedLinear o;                   // -> [M, hidden]
    StackedLinear gate_up;             // -> [M, 2 ffn]: gate | up
    StackedLinear down;                // -> [M, hidden]
};

class CudaEngine final : public Engine {
public:
    CudaEngine(const TensorTable& t, const ModelConfig& cfg, const std::map<std::string, LinearSpec>& specs,
               int64_t context_length)
        : cfg_(cfg), n_ctx_(context_length) {
        cfg_.validate();
        refuse_unsupported_blocks(cfg_);
        if (n_ctx_ <= 0) throw std::invalid_argument("context length must be positive");
        if (n_ctx_ > INT32_MAX) throw std::invalid_argument("context length too large");
        if (cfg_.head_dim % 4 != 0 || cfg_.head_dim > kMaxAttentionHeadDim)
            throw std::invalid_argument("the CUDA engine needs head_dim a multiple of 4 and at most 256, got " +
                                        std::to_string(cfg_.head_dim));
        if (cuda_device_count() == 0) throw std::runtime_error("no CUDA device is available");
        PYLLM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        try {
            load(t, specs);
        } catch (...) {
            cudaStreamDestroy(stream_);
            throw;
        }
    }

    ~CudaEngine() override {
        if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
        if (stream_) cudaStreamDestroy(stream_);
        if (host_ids_) cudaFreeHost(host_ids_);
    }

    const ModelConfig& config() const override { return cfg_; }
    int64_t context_length() const override { return n_ctx_; }
    const char* device() const override { return "cuda"; }
    const char* kv_cache() const override { return "f32"; }

private:
    static constexpr int64_t kMaxBatch = 512;
    int64_t max_batch() const override { return kMaxBatch; }

    void load(const TensorTable& t, const std::map<std::string, LinearSpec>& specs) {
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size;
        const int64_t q_dim = cfg_.n_heads * cfg_.head_dim, kv_dim = cfg_.n_kv_heads * cfg_.head_dim;
        const WeightView embed = bind_linear(t, specs, "model.embed_tokens", cfg_.vocab_size, D);
        embed_ = upload_weights({embed});
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            Layer layer;
            layer.attn_norm = upload_floats(bind_vector(t, p + "input_layernorm.weight", D), D);
            layer.ffn_norm = upload_floats(bind_vector(t, p + "post_attention_layernorm.weight", D), D);
            layer.qkv = stack_linears({bind_linear(t, specs, p + "self_attn.q_proj", q_dim, D),
                                       bind_linear(t, specs, p + "self_attn.k_proj", kv_dim, D),
                                       bind_linear(t, specs, p + "self_attn.v_proj", kv_dim, D)});
            layer.o = stack_linears({bind_linear(t, specs, p + "self_attn.o_proj", D, q_dim)});
            layer.gate_up = stack_linears({bind_linear(t, specs, p + "mlp.gate_proj", F, D),
                                           bind_linear(t, specs, p + "mlp.up_proj", F, D)});
            layer.down = stack_linears({bind_linear(t, specs, p + "mlp.down_proj", D, F)});
            layers_.push_back(std::move(layer));
        }
        final_norm_ = upload_floats(bind_vector(t, "model.norm.weight", D), D);
        if (!cfg_.tie_word_embeddings)
            lm_head_own_ = upload_weights({bind_linear(t, specs, "lm_head", cfg_.vocab_size, D)});
        lm_head_ = cfg_.tie_word_embeddings ? &embed_ : &lm_head_own_;
        const std::vector<float> inv_freq = rope_inv_freq(cfg_.head_dim, cfg_.rope_theta, cfg_.rope_scaling);
        inv_freq_ = upload_floats(inv_freq.data(), (int64_t)inv_freq.size());

        const size_t cache_floats = (size_t)(cfg_.n_layers * cfg_.n_kv_heads * n_ctx_ * cfg_.head_dim);
        k_cache_.resize(cache_floats * sizeof(float));
        v_cache_.resize(cache_floats * sizeof(float));
        PYLLM_CUDA_CHECK(cudaMemset(k_cache_.as<void>(), 0, k_cache_.bytes()));
        PYLLM_CUDA_CHECK(cudaMemset(v_cache_.as<void>(), 0, v_cache_.bytes()));

        const int64_t B = kMaxBatch, qkv_dim = q_dim + 2 * kv_dim;
        x_.resize((size_t)(B * D) * sizeof(float));
        h_.resize((size_t)(B * D) * sizeof(float));
        qkv_.resize((size_t)(B * qkv_dim) * sizeof(float));
        attn_.resize((size_t)(B * q_dim) * sizeof(float));
        gate_up_.resize((size_t)(B * 2 * F) * sizeof(float));
        act_.resize((size_t)(B * F) * sizeof(float));
        logits_.resize((size_t)cfg_.vocab_size * sizeof(float));
        ids_.resize((size_t)(2 * B) * sizeof(int32_t));  // token ids, then positions
        PYLLM_CUDA_CHECK(cudaMallocHost(&host_ids_, (size_t)(2 * B) * sizeof(int32_t)));
        decode_split_ = decode_split(cfg_.n_heads, n_ctx_);
        prepare_attention(cfg_.head_dim);
        // the decode path's scratch is allocated before any graph capture
        attn_ws_.partial_stats.reserve((size_t)(kMaxGemvRows * cfg_.n_heads * decode_split_.n_splits * 2) * sizeof(float));
        attn_ws_.partial_out.reserve(
            (size_t)(kMaxGemvRows * cfg_.n_heads * decode_split_.n_splits * cfg_.head_dim) * sizeof(float));
        const char* graph_env = std::getenv("PYLLM_CUDA_GRAPH");
        use_graph_ = !(graph_env && std::string(graph_env) == "0");
        PYLLM_CUDA_CHECK(cudaDeviceSynchronize());
    }

    // Enqueues the whole stack for M rows whose ids and positions are in ids_;
    // the logits of the last row (or of every row) land in `logits_out`.
    void enqueue(int64_t M, bool all_logits, float* logits_out) {
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, q_dim = H * hd, kv_dim = Hkv * hd;
        const int64_t qkv_dim = q_dim + 2 * kv_dim;
        const float eps = (float)cfg_.norm_eps, scale = 1.0f / std::sqrt((float)hd);
        const int32_t* ids = ids_.as<int32_t>();
        const int32_t* positions = ids + kMaxBatch;
        float *x = x_.as<float>(), *h = h_.as<float>(), *qkv = qkv_.as<float>();
        const AttentionSplit split = M <= kMaxGemvRows ? decode_split_ : AttentionSplit{};
        cudaStream_t s = stream_;

        embedding(embed_, ids, M, x, s);
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const Layer& layer = layers_[(size_t)l];
            float* k_layer = k_cache_.as<float>() + l * Hkv * n_ctx_ * hd;
            float* v_layer = v_cache_.as<float>() + l * Hkv * n_ctx_ * hd;
            rmsnorm(x, layer.attn_norm.as<float>(), M, D, eps, h, s);
            layer.qkv.run(h, M, qkv, qkv_dim, false, mm_ws_, s);
            rope(qkv, qkv_dim, M, H + Hkv, hd, positions, inv_freq_.as<float>(), s);  // q heads, then k heads
            kv_write(qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim, M, Hkv, hd, positions, k_layer, v_layer, n_ctx_, s);
            attention(qkv, qkv_dim, k_layer, v_layer, M, H, Hkv, hd, n_ctx_, positions, scale, attn_.as<float>(), q_dim,
                      split, attn_ws_, s);
            layer.o.run(attn_.as<float>(), M, x, D, true, mm_ws_, s);
            rmsnorm(x, layer.ffn_norm.as<float>(), M, D, eps, h, s);
            layer.gate_up.run(h, M, gate_up_.as<float>(), 2 * F, false, mm_ws_, s);
            swiglu(gate_up_.as<float>(), M, F, act_.as<float>(), s);
            layer.down.run(act_.as<float>(), M, x, D, true, mm_ws_, s);
        }
        if (logits_out == nullptr) return;
        const int64_t rows = all_logits ? M : 1;
        const float* last = all_logits ? x : x + (M - 1) * D;
        rmsnorm(last, final_norm_.as<float>(), rows, D, eps, h, s);
        linear(*lm_head_, h, rows, logits_out, cfg_.vocab_size, false, mm_ws_, s);
    }

    void run_batch(const int32_t* tokens, int64_t M, int64_t pos0, float* logits, bool all_logits) override {
        std::memcpy(host_ids_, tokens, (size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; ++m) host_ids_[kMaxBatch + m] = (int32_t)(pos0 + m);
        PYLLM_CUDA_CHECK(cudaMemcpyAsync(ids_.as<int32_t>(), host_ids_, (size_t)M * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream_));
        PYLLM_CUDA_CHECK(cudaMemcpyAsync(ids_.as<int32_t>() + kMaxBatch, host_ids_ + kMaxBatch,
                                         (size_t)M * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
        float* device_logits = logits_.as<float>();
        if (logits && all_logits && M > 1) {
            all_logits_.reserve((size_t)(M * cfg_.vocab_size) * sizeof(float));
            device_logits = all_logits_.as<float>();
        }
        bool done = false;
        if (M == 1 && use_graph_) {
            try {
                run_decode_graph();  // logits of the single row in logits_
                done = true;
            } catch (const std::runtime_error&) {
                use_graph_ = false;  // capture or instantiation refused: run eagerly from now on
                cudaGetLastError();
            }
        }
        if (!done) enqueue(M, all_logits, logits ? device_logits : nullptr);
        if (logits) {
            const int64_t rows = all_logits ? M : 1;
            PYLLM_CUDA_CHECK(cudaMemcpyAsync(logits, device_logits, (size_t)(rows * cfg_.vocab_size) * sizeof(float),
                                             cudaMemcpyDeviceToHost, stream_));
        }
        PYLLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    void run_decode_graph() {
        if (!graph_exec_) {
            cudaGraph_t graph = nullptr;
            PYLLM_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
            try {
                enqueue(1, false, logits_.as<float>());
            } catch (...) {
                cudaStreamEndCapture(stream_, &graph);
                if (graph) cudaGraphDestroy(graph);
                cudaGetLastError();
                throw;
            }
            PYLLM_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
            const cudaError_t err = cudaGraphInstantiate(&graph_exec_, graph, 0);
            cudaGraphDestroy(graph);
            if (err != cudaSuccess) {
                graph_exec_ = nullptr;
                throw_cuda_error(err, "cudaGraphInstantiate", __FILE__, __LINE__);
            }
        }
        PYLLM_CUDA_CHECK(cudaGraphLaunch(graph_exec_, stream_));
    }

    ModelConfig cfg_;
    int64_t n_ctx_;
    cudaStream_t stream_ = nullptr;
    DeviceWeight embed_, lm_head_own_;
    const DeviceWeight* lm_head_ = nullptr;
    std::vector<Layer> layers_;
    DeviceBuffer final_norm_, inv_freq_;
    DeviceBuffer k_cache_, v_cache_;  // f32 [layers, kv_heads, n_ctx, head_dim]
    DeviceBuffer x_, h_, qkv_, attn_, gate_up_, act_, logits_, all_logits_;
    DeviceBuffer ids_;              // int32 [2, kMaxBatch]: token ids, positions
    int32_t* host_ids_ = nullptr;   // pinned mirror of ids_
    MatmulWorkspace mm_ws_;
    AttentionWorkspace attn_ws_;
    AttentionSplit decode_split_;
    bool use_graph_ = true;
    cudaGraphExec_t graph_exec_ = nullptr;
};

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const TensorTable& tensors, const ModelConfig& config,
                                         const std::map<std::string, LinearSpec>& linears, int64_t context_length) {
    return std::make_unique<CudaEngine>(tensors, config, linears, context_length);
}

}  // namespace pyllm
