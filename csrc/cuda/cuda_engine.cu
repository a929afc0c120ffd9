// The CUDA engine: the whole decoder stack issued from C++ on one stream, for
// the block the model file describes (ModelConfig; the CPU engine's run_batch
// is the reference order of operations). Every choice the description makes is
// taken here on the host, at load or when enqueueing; the kernels see at most a
// uniform flag, so the LLaMA block runs the same kernels as before.
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

#include "../core/env.h"
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

// A norm's parameters: weight f32 [hidden], and bias f32 [hidden] for LayerNorm (empty for RMSNorm).
struct Norm {
    DeviceBuffer weight, bias;
};

struct Layer {
    Norm attn_norm, ffn_norm;          // before attention, before the FFN
    Norm attn_post_norm, ffn_post_norm;  // of the attention and FFN outputs (post_norms)
    DeviceBuffer q_norm, k_norm;       // f32 [head_dim] (qk_norm)
    StackedLinear qkv;                 // -> [M, q_dim + 2 kv_dim]: q | k | v
    StackedLinear o;                   // -> [M, hidden]
    StackedLinear gate_up;             // -> [M, 2 ffn]: gate | up (gated FFN), or [M, ffn]: up (plain)
    StackedLinear down;                // -> [M, hidden]
    const float* inv_freq = nullptr;   // this layer's RoPE table (rope_theta_local on sliding layers)
    AttentionShaping shaping;          // window, soft-capping, ALiBi slopes
};

class CudaEngine final : public Engine {
public:
    CudaEngine(const TensorTable& t, const ModelConfig& cfg, const std::map<std::string, LinearSpec>& specs,
               int64_t context_length)
        : cfg_(cfg), n_ctx_(context_length) {
        cfg_.validate();
        if (n_ctx_ <= 0) throw std::invalid_argument("context length must be positive");
        if (n_ctx_ > INT32_MAX) throw std::invalid_argument("context length too large");
        if (cfg_.positions == PositionType::Learned && n_ctx_ > cfg_.max_positions)
            throw std::invalid_argument("context length " + std::to_string(n_ctx_) + " exceeds the model's " +
                                        std::to_string(cfg_.max_positions) + " learned positions");
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
    int64_t kv_cache_bytes() const override { return (int64_t)(k_cache_.bytes() + v_cache_.bytes()); }

private:
    static constexpr int64_t kMaxBatch = 512;
    int64_t max_batch() const override { return kMaxBatch; }

    Norm upload_norm(const TensorTable& t, const std::string& name) const {
        const int64_t D = cfg_.hidden_size;
        Norm n;
        n.weight = upload_floats(bind_vector(t, name + ".weight", D), D);
        if (cfg_.norm == NormType::LayerNorm) n.bias = upload_floats(bind_vector(t, name + ".bias", D), D);
        return n;
    }

    // y = the model's norm of x (x and y: f32 [M, hidden], distinct), or x (in place) when y is x.
    void norm(const Norm& n, const float* x, int64_t M, float* y, cudaStream_t s) const {
        const int64_t D = cfg_.hidden_size;
        const float eps = (float)cfg_.norm_eps;
        if (cfg_.norm == NormType::RmsNorm && x != y) rmsnorm(x, n.weight.as<float>(), M, D, eps, y, s);
        else row_norm(x, n.weight.as<float>(), n.bias.as<float>(), M, D, eps, y, false, s);
    }

    // x += the model's norm of h (a post-norm before the residual add).   h, x: f32 [M, hidden]
    void norm_add(const Norm& n, const float* h, int64_t M, float* x, cudaStream_t s) const {
        row_norm(h, n.weight.as<float>(), n.bias.as<float>(), M, cfg_.hidden_size, (float)cfg_.norm_eps, x, true, s);
    }

    void load(const TensorTable& t, const std::map<std::string, LinearSpec>& specs) {
        std::vector<AlignedBytes> expanded;  // int4_asym_dq scales and mins, until they are uploaded
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t q_dim = cfg_.n_heads * hd, kv_dim = cfg_.n_kv_heads * hd;
        const bool gated = cfg_.ffn == FfnType::Gated;
        const WeightView embed = bind_linear(t, specs, "model.embed_tokens", cfg_.vocab_size, D, expanded);
        embed_ = upload_weights({embed});
        if (cfg_.positions == PositionType::Learned) {  // only the rows the context reaches
            const float* table = reinterpret_cast<const float*>(
                t.get("model.embed_positions.weight", DType::F32, {cfg_.max_positions, D}).data);
            position_table_ = upload_floats(table, n_ctx_ * D);
        }
        if (cfg_.embedding_norm) embed_norm_ = upload_norm(t, "model.embed_norm");
        if (cfg_.positions == PositionType::Rope) {
            const std::vector<float> inv_freq = rope_inv_freq(cfg_.rope_dims(), cfg_.rope_theta, cfg_.rope_scaling);
            inv_freq_ = upload_floats(inv_freq.data(), (int64_t)inv_freq.size());
            if (cfg_.rope_theta_local > 0.0) {
                const std::vector<float> local = rope_inv_freq(cfg_.rope_dims(), cfg_.rope_theta_local, {});
                inv_freq_local_ = upload_floats(local.data(), (int64_t)local.size());
            }
        }
        if (cfg_.positions == PositionType::Alibi) {
            const std::vector<float> slopes = alibi_slopes(cfg_.n_heads);
            alibi_ = upload_floats(slopes.data(), (int64_t)slopes.size());
        }
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            Layer layer;
            layer.attn_norm = upload_norm(t, p + "input_layernorm");
            layer.ffn_norm = upload_norm(t, p + "post_attention_layernorm");
            if (cfg_.post_norms) {
                layer.attn_post_norm = upload_norm(t, p + "attn_post_norm");
                layer.ffn_post_norm = upload_norm(t, p + "ffn_post_norm");
            }
            if (cfg_.qk_norm) {
                layer.q_norm = upload_floats(bind_vector(t, p + "self_attn.q_norm.weight", hd), hd);
                layer.k_norm = upload_floats(bind_vector(t, p + "self_attn.k_norm.weight", hd), hd);
            }
            // stacked where the layouts allow; biases (any of them) travel with their rows
            layer.qkv = stack_linears({bind_linear(t, specs, p + "self_attn.q_proj", q_dim, D, expanded),
                                       bind_linear(t, specs, p + "self_attn.k_proj", kv_dim, D, expanded),
                                       bind_linear(t, specs, p + "self_attn.v_proj", kv_dim, D, expanded)});
            layer.o = stack_linears({bind_linear(t, specs, p + "self_attn.o_proj", D, q_dim, expanded)});
            const WeightView up = bind_linear(t, specs, p + "mlp.up_proj", F, D, expanded);
            layer.gate_up = gated ? stack_linears({bind_linear(t, specs, p + "mlp.gate_proj", F, D, expanded), up})
                                  : stack_linears({up});
            layer.down = stack_linears({bind_linear(t, specs, p + "mlp.down_proj", D, F, expanded)});
            const int64_t window = cfg_.window(l);
            const bool local_rope = window > 0 && cfg_.rope_theta_local > 0.0;
            layer.inv_freq = local_rope ? inv_freq_local_.as<float>() : inv_freq_.as<float>();
            layer.shaping.window = window;
            layer.shaping.softcap = (float)cfg_.attn_logit_softcapping;
            layer.shaping.alibi = alibi_.as<float>();
            layers_.push_back(std::move(layer));
        }
        final_norm_ = upload_norm(t, "model.norm");
        if (!cfg_.tie_word_embeddings)
            lm_head_own_ = upload_weights({bind_linear(t, specs, "lm_head", cfg_.vocab_size, D, expanded)});
        lm_head_ = cfg_.tie_word_embeddings ? &embed_ : &lm_head_own_;

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
        gate_up_.resize((size_t)(B * (gated ? 2 : 1) * F) * sizeof(float));
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
        use_graph_ = env_switch("PYLLM_CUDA_GRAPH", true);
        PYLLM_CUDA_CHECK(cudaDeviceSynchronize());
    }

    // Enqueues the whole stack for M rows whose ids and positions are in ids_;
    // the logits of the last row (or of every row) land in `logits_out`.
    void enqueue(int64_t M, bool all_logits, float* logits_out) {
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, q_dim = H * hd, kv_dim = Hkv * hd;
        const int64_t qkv_dim = q_dim + 2 * kv_dim;
        const float eps = (float)cfg_.norm_eps;
        const float scale = cfg_.attention_scale > 0.0 ? (float)cfg_.attention_scale : 1.0f / std::sqrt((float)hd);
        const bool gated = cfg_.ffn == FfnType::Gated;
        const int64_t gate_up_dim = (gated ? 2 : 1) * F, rope_dims = cfg_.rope_dims();
        const int32_t* ids = ids_.as<int32_t>();
        const int32_t* positions = ids + kMaxBatch;
        float *x = x_.as<float>(), *h = h_.as<float>(), *qkv = qkv_.as<float>();
        const AttentionSplit split = M <= kMaxGemvRows ? decode_split_ : AttentionSplit{};
        cudaStream_t s = stream_;

        embedding(embed_, ids, M, x, s);
        if (cfg_.embedding_scale != 1.0 || position_table_.bytes() > 0)
            embedding_finish(x, M, D, (float)cfg_.embedding_scale, position_table_.as<float>(), n_ctx_, positions, s);
        if (cfg_.embedding_norm) norm(embed_norm_, x, M, x, s);
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const Layer& layer = layers_[(size_t)l];
            float* k_layer = k_cache_.as<float>() + l * Hkv * n_ctx_ * hd;
            float* v_layer = v_cache_.as<float>() + l * Hkv * n_ctx_ * hd;
            norm(layer.attn_norm, x, M, h, s);
            layer.qkv.run(h, M, qkv, qkv_dim, false, mm_ws_, s);
            if (cfg_.qk_norm) {
                head_rmsnorm(qkv, qkv_dim, M, H, hd, layer.q_norm.as<float>(), eps, s);
                head_rmsnorm(qkv + q_dim, qkv_dim, M, Hkv, hd, layer.k_norm.as<float>(), eps, s);
            }
            if (layer.inv_freq != nullptr)  // q heads, then k heads
                rope(qkv, qkv_dim, M, H + Hkv, hd, rope_dims, positions, layer.inv_freq, s);
            kv_write(qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim, M, Hkv, hd, positions, k_layer, v_layer, n_ctx_, s);
            attention(qkv, qkv_dim, k_layer, v_layer, M, H, Hkv, hd, n_ctx_, positions, scale, attn_.as<float>(), q_dim,
                      split, attn_ws_, s, layer.shaping);
            if (cfg_.post_norms) {
                layer.o.run(attn_.as<float>(), M, h, D, false, mm_ws_, s);
                norm_add(layer.attn_post_norm, h, M, x, s);
            } else {
                layer.o.run(attn_.as<float>(), M, x, D, true, mm_ws_, s);
            }
            norm(layer.ffn_norm, x, M, h, s);
            layer.gate_up.run(h, M, gate_up_.as<float>(), gate_up_dim, false, mm_ws_, s);
            ffn_activation(cfg_.activation, gated, gate_up_.as<float>(), M, F, act_.as<float>(), s);
            if (cfg_.post_norms) {
                layer.down.run(act_.as<float>(), M, h, D, false, mm_ws_, s);
                norm_add(layer.ffn_post_norm, h, M, x, s);
            } else {
                layer.down.run(act_.as<float>(), M, x, D, true, mm_ws_, s);
            }
        }
        if (logits_out == nullptr) return;
        const int64_t rows = all_logits ? M : 1;
        const float* last = all_logits ? x : x + (M - 1) * D;
        norm(final_norm_, last, rows, h, s);
        linear(*lm_head_, h, rows, logits_out, cfg_.vocab_size, false, mm_ws_, s);
        if (cfg_.final_logit_softcapping > 0.0)
            softcap(logits_out, rows * cfg_.vocab_size, (float)cfg_.final_logit_softcapping, s);
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
    Norm embed_norm_, final_norm_;     // (embedding_norm), before lm_head
    DeviceBuffer inv_freq_, inv_freq_local_;  // f32 [rotary_dim / 2] (RoPE; local: sliding layers' theta)
    DeviceBuffer alibi_;              // f32 [heads] (ALiBi)
    DeviceBuffer position_table_;     // f32 [context_length, hidden] (learned positions)
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
