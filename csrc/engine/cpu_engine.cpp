// The CPU engine: a LLaMA decoder run layer by layer with the CPU operators.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "../core/checked.h"
#include "engine.h"

namespace pyllm {

void ModelConfig::validate() const {
    auto need = [](bool ok, const char* what) {
        if (!ok) throw std::invalid_argument(std::string("model config: ") + what);
    };
    need(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 && n_layers > 0, "sizes must be positive");
    need(n_heads > 0 && n_kv_heads > 0, "head counts must be positive");
    need(n_heads % n_kv_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads");
    need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even and positive");
    need(rms_norm_eps > 0.0, "rms_norm_eps must be positive");
    need(vocab_size < INT32_MAX, "vocabulary too large");
}

const float* bind_vector(const TensorTable& t, const std::string& name, int64_t n) {
    return reinterpret_cast<const float*>(t.get(name, DType::F32, {n}).data);
}

WeightView bind_linear(const TensorTable& t, const std::map<std::string, LinearSpec>& specs, const std::string& base,
                       int64_t rows, int64_t cols) {
    auto it = specs.find(base);
    if (it == specs.end()) throw std::invalid_argument("model file has no quantization entry for '" + base + "'");
    WeightView w;
    w.format = it->second.format;
    w.group_size = is_quantized(w.format) ? it->second.group_size : 0;
    w.rows = rows;
    w.cols = cols;
    if (is_quantized(w.format) && (w.group_size <= 0 || w.group_size % kBlock != 0))
        throw std::invalid_argument("'" + base + "': group size " + std::to_string(w.group_size) +
                                    " is not a positive multiple of 32");
    const std::string weight = base + ".weight";
    switch (w.format) {
        case WeightFormat::F32: w.data = t.get(weight, DType::F32, {rows, cols}).data; break;
        case WeightFormat::F16: w.data = t.get(weight, DType::F16, {rows, cols}).data; break;
        case WeightFormat::BF16: w.data = t.get(weight, DType::BF16, {rows, cols}).data; break;
        case WeightFormat::Q8: w.data = t.get(weight, DType::I8, {rows, cols}).data; break;
        case WeightFormat::Q4_SYM:
        case WeightFormat::Q4_ASYM: w.data = t.get(weight, DType::U8, {rows, w.padded_cols() / 2}).data; break;
        default: throw std::invalid_argument("'" + base + "': unknown weight format");
    }
    if (is_quantized(w.format))
        w.scales = reinterpret_cast<const uint16_t*>(t.get(base + ".scales", DType::F16, {rows, w.n_groups()}).data);
    if (w.format == WeightFormat::Q4_ASYM)
        w.mins = reinterpret_cast<const uint16_t*>(t.get(base + ".mins", DType::F16, {rows, w.n_groups()}).data);
    if (t.has(base + ".bias")) w.bias = bind_vector(t, base + ".bias", rows);
    validate_weight(w, base);
    return w;
}

void Engine::forward(const int32_t* tokens, int64_t n, int64_t pos, float* logits, bool all_logits) {
    const int64_t n_ctx = context_length(), vocab = config().vocab_size;
    if (n <= 0) throw std::invalid_argument("forward needs at least one token");
    if (pos < 0 || pos > n_ctx || n > n_ctx - pos)
        throw std::out_of_range("positions " + std::to_string(pos) + ".." + std::to_string(pos + n - 1) +
                                " exceed the context length " + std::to_string(n_ctx));
    for (int64_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            throw std::out_of_range("token id " + std::to_string(tokens[i]) + " is outside the vocabulary of " +
                                    std::to_string(vocab));
    std::lock_guard<std::mutex> lock(forward_mutex_);
    for (int64_t start = 0; start < n; start += max_batch()) {
        const int64_t len = std::min(max_batch(), n - start);
        float* out = nullptr;
        if (all_logits) out = logits + start * vocab;
        else if (start + len == n) out = logits;
        run_batch(tokens + start, len, pos + start, out, all_logits);
    }
}

namespace {

struct LayerWeights {
    const float* attn_norm;  // [hidden]
    WeightView q, k, v, o;   // q: [heads*head_dim, hidden], k/v: [kv_heads*head_dim, hidden], o: [hidden, heads*head_dim]
    const float* ffn_norm;   // [hidden]
    WeightView gate, up, down;  // gate/up: [ffn, hidden], down: [hidden, ffn]
    bool qkv_quantized, gate_up_quantized;  // whether their shared input is quantized once
};

// Wall time per stage of the forward pass, kept only when PYLLM_PROFILE=1 (a clock read costs
// ~20 ns; a decode step has ~300 stages).
class StageClock {
public:
    enum Stage { kEmbed, kNorm, kQkv, kRopeCache, kAttention, kOut, kGateUp, kSwiglu, kDown, kResidual, kLmHead, kCount };
    StageClock() {
        const char* flag = std::getenv("PYLLM_PROFILE");
        enabled_ = flag != nullptr && flag[0] != '\0' && flag[0] != '0';
    }
    // Runs fn and charges its wall time to `stage`.
    template <typename Fn>
    void time(Stage stage, Fn&& fn) {
        if (!enabled_) return fn();
        const auto start = std::chrono::steady_clock::now();
        fn();
        seconds_[stage] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    std::vector<std::pair<std::string, double>> report() const {
        if (!enabled_) return {};
        static const char* names[kCount] = {"embedding", "rmsnorm", "qkv_proj", "rope_cache_write", "attention",
                                            "o_proj", "gate_up_proj", "swiglu", "down_proj", "residual", "lm_head"};
        std::vector<std::pair<std::string, double>> out;
        for (int i = 0; i < kCount; ++i) out.emplace_back(names[i], seconds_[i]);
        return out;
    }

private:
    bool enabled_ = false;
    double seconds_[kCount] = {};
};

class CpuEngine final : public Engine {
public:
    CpuEngine(std::shared_ptr<MappedFile> file, const TensorTable& t, const ModelConfig& cfg,
              const std::map<std::string, LinearSpec>& specs, int64_t context_length, int n_threads,
              const std::string& kv_cache)
        : file_(std::move(file)), cfg_(cfg), n_ctx_(context_length), pool_(n_threads) {
        cfg_.validate();
        if (n_ctx_ <= 0) throw std::invalid_argument("context length must be positive");
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size;
        const int64_t q_dim = cfg_.n_heads * cfg_.head_dim, kv_dim = cfg_.n_kv_heads * cfg_.head_dim;
        embed_ = bind_linear(t, specs, "model.embed_tokens", cfg_.vocab_size, D);
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            LayerWeights lw;
            lw.attn_norm = bind_vector(t, p + "input_layernorm.weight", D);
            lw.q = bind_linear(t, specs, p + "self_attn.q_proj", q_dim, D);
            lw.k = bind_linear(t, specs, p + "self_attn.k_proj", kv_dim, D);
            lw.v = bind_linear(t, specs, p + "self_attn.v_proj", kv_dim, D);
            lw.o = bind_linear(t, specs, p + "self_attn.o_proj", D, q_dim);
            lw.ffn_norm = bind_vector(t, p + "post_attention_layernorm.weight", D);
            lw.gate = bind_linear(t, specs, p + "mlp.gate_proj", F, D);
            lw.up = bind_linear(t, specs, p + "mlp.up_proj", F, D);
            lw.down = bind_linear(t, specs, p + "mlp.down_proj", D, F);
            lw.qkv_quantized = is_quantized(lw.q.format) || is_quantized(lw.k.format) || is_quantized(lw.v.format);
            lw.gate_up_quantized = is_quantized(lw.gate.format) || is_quantized(lw.up.format);
            layers_.push_back(lw);
        }
        final_norm_ = bind_vector(t, "model.norm.weight", D);
        lm_head_ = cfg_.tie_word_embeddings ? embed_ : bind_linear(t, specs, "lm_head", cfg_.vocab_size, D);
        // quantized matrices rearranged for the kernels that want it (the file stays as it is)
        std::vector<WeightView*> matrices{&lm_head_};
        for (LayerWeights& lw : layers_)
            for (WeightView* w : {&lw.q, &lw.k, &lw.v, &lw.o, &lw.gate, &lw.up, &lw.down}) matrices.push_back(w);
        for (WeightView* w : matrices) {
            tile_for_active_kernels(pool_, *w, tiled_storage_);
            // the file's copy is read again only if another kernel variant is chosen later (embedding
            // rows of a tied lm_head come back page by page); out of the resident set with it
            if (w->tiled.data != nullptr) release_file_pages(*w);
        }
        // the embedding table is read a row per token; unless its file copy is also the lm_head,
        // the pages those reads map in (the kernel maps up to 64 KB around each) are let go again
        release_embedding_ = !(lm_head_.data == embed_.data && lm_head_.tiled.data == nullptr);
        inv_freq_ = rope_inv_freq(cfg_.head_dim, cfg_.rope_theta, cfg_.rope_scaling);

        // KV cache: f16 unless asked otherwise or the model is stored in f32 (a reference run).
        // Pages are touched only as positions are written.
        bool all_f32 = lm_head_.format == WeightFormat::F32;
        for (const LayerWeights& lw : layers_)
            for (const WeightView* w : {&lw.q, &lw.k, &lw.v, &lw.o, &lw.gate, &lw.up, &lw.down})
                all_f32 = all_f32 && w->format == WeightFormat::F32;
        if (kv_cache == "f16") kv_type_ = KvType::F16;
        else if (kv_cache == "f32") kv_type_ = KvType::F32;
        else if (kv_cache == "auto") kv_type_ = all_f32 ? KvType::F32 : KvType::F16;
        else throw std::invalid_argument("kv_cache must be 'auto', 'f16' or 'f32', not '" + kv_cache + "'");
        const int64_t cache_bytes = checked_product(
            {cfg_.n_layers, cfg_.n_kv_heads, n_ctx_, cfg_.head_dim, (int64_t)kv_bytes(kv_type_)}, "KV cache");
        k_cache_.reset(new uint8_t[checked_size(cache_bytes, "KV cache")]);
        v_cache_.reset(new uint8_t[checked_size(cache_bytes, "KV cache")]);
        const int64_t B = kMaxBatch;
        x_.resize((size_t)(B * D));
        h_.resize((size_t)(B * D));
        q_.resize((size_t)(B * q_dim));
        k_.resize((size_t)(B * kv_dim));
        v_.resize((size_t)(B * kv_dim));
        if (kv_type_ == KvType::F16) k16_.resize(k_.size()), v16_.resize(v_.size());
        attn_.resize((size_t)(B * q_dim));
        gate_.resize((size_t)(B * F));
        up_.resize((size_t)(B * F));
        positions_.resize((size_t)B);
        cos_sin_.resize((size_t)(B * cfg_.head_dim));
    }

    const ModelConfig& config() const override { return cfg_; }
    int64_t context_length() const override { return n_ctx_; }
    const char* device() const override { return "cpu"; }
    const char* kv_cache() const override { return kv_type_ == KvType::F16 ? "f16" : "f32"; }
    std::vector<std::pair<std::string, double>> profile() const override { return clock_.report(); }

private:
    static constexpr int64_t kMaxBatch = 256;
    int64_t max_batch() const override { return kMaxBatch; }

    void run_batch(const int32_t* tokens, int64_t M, int64_t pos0, float* logits, bool all_logits) override {
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, kv_dim = Hkv * hd;
        const float eps = (float)cfg_.rms_norm_eps, attn_scale = 1.0f / std::sqrt((float)hd);
        float *x = x_.data(), *h = h_.data();
        for (int64_t m = 0; m < M; ++m) positions_[(size_t)m] = (int32_t)(pos0 + m);
        rope_angles(positions_.data(), M, inv_freq_.data(), hd / 2, cos_sin_.data());

        using S = StageClock;
        clock_.time(S::kEmbed, [&] {
            embedding(embed_, tokens, M, x);
            if (release_embedding_) release_file_pages(embed_);
        });
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const LayerWeights& lw = layers_[(size_t)l];
            clock_.time(S::kNorm, [&] { rmsnorm(x, lw.attn_norm, M, D, eps, h); });
            clock_.time(S::kQkv, [&] {
                const LinearInput in = prepare_linear_input(pool_, h, M, D, lw.qkv_quantized, scratch_);
                linear(pool_, lw.q, in, q_.data());
                linear(pool_, lw.k, in, k_.data());
                linear(pool_, lw.v, in, v_.data());
            });
            // cache layout per layer: keys [kv_heads, head_dim, n_ctx] (transposed), values [kv_heads, n_ctx, head_dim]
            const int64_t layer_bytes = Hkv * n_ctx_ * hd * kv_bytes(kv_type_);
            uint8_t* k_layer = k_cache_.get() + l * layer_bytes;
            uint8_t* v_layer = v_cache_.get() + l * layer_bytes;
            clock_.time(S::kRopeCache, [&] {
                rope(q_.data(), M, H, hd, cos_sin_.data());
                rope(k_.data(), M, Hkv, hd, cos_sin_.data());
                if (kv_type_ == KvType::F16) {
                    const CpuKernels& kernels = active_kernels();
                    kernels.round_to_f16(k_.data(), M * kv_dim, k16_.data());
                    kernels.round_to_f16(v_.data(), M * kv_dim, v16_.data());
                    write_kv(reinterpret_cast<uint16_t*>(k_layer), reinterpret_cast<uint16_t*>(v_layer), k16_.data(),
                             v16_.data(), M, pos0);
                } else {
                    write_kv(reinterpret_cast<float*>(k_layer), reinterpret_cast<float*>(v_layer), k_.data(), v_.data(),
                             M, pos0);
                }
            });
            clock_.time(S::kAttention, [&] {
                attention(pool_, q_.data(), kv_type_, k_layer, v_layer, M, H, Hkv, hd, n_ctx_, pos0, attn_scale,
                          attn_.data());
            });
            clock_.time(S::kOut, [&] { linear(pool_, lw.o, attn_.data(), M, h, scratch_); });
            clock_.time(S::kResidual, [&] { for (int64_t i = 0; i < M * D; ++i) x[i] += h[i]; });

            clock_.time(S::kNorm, [&] { rmsnorm(x, lw.ffn_norm, M, D, eps, h); });
            clock_.time(S::kGateUp, [&] {
                const LinearInput in = prepare_linear_input(pool_, h, M, D, lw.gate_up_quantized, scratch_);
                linear(pool_, lw.gate, in, gate_.data());
                linear(pool_, lw.up, in, up_.data());
            });
            clock_.time(S::kSwiglu, [&] { swiglu(pool_, gate_.data(), up_.data(), M * F, gate_.data()); });
            clock_.time(S::kDown, [&] { linear(pool_, lw.down, gate_.data(), M, h, scratch_); });
            clock_.time(S::kResidual, [&] { for (int64_t i = 0; i < M * D; ++i) x[i] += h[i]; });
        }
        if (logits == nullptr) return;
        clock_.time(S::kLmHead, [&] {
            if (all_logits) {
                rmsnorm(x, final_norm_, M, D, eps, h);
                linear(pool_, lm_head_, h, M, logits, scratch_);
            } else {
                rmsnorm(x + (M - 1) * D, final_norm_, 1, D, eps, h);
                linear(pool_, lm_head_, h, 1, logits, scratch_);
            }
        });
    }

    std::shared_ptr<MappedFile> file_;  // keeps the weights mapped
    ModelConfig cfg_;
    int64_t n_ctx_;
    ThreadPool pool_;
    WeightView embed_, lm_head_;
    bool release_embedding_ = false;  // drop the embedding rows' file pages after each lookup
    std::vector<LayerWeights> layers_;
    const float* final_norm_ = nullptr;
    std::vector<float> inv_freq_;
    // w's pages of the mapped file leave the resident set (they come back if read again).
    void release_file_pages(const WeightView& w) const {
        file_->release(w.data, (uint64_t)(w.rows * w.row_bytes()));
        if (w.scales) file_->release(w.scales, (uint64_t)(w.rows * w.n_groups() * 2));
        if (w.mins) file_->release(w.mins, (uint64_t)(w.rows * w.n_groups() * 2));
    }

    // This batch's keys and values into one layer's cache at positions pos0 .. pos0 + M - 1.
    //   k_cache: T [kv_heads, head_dim, n_ctx] (transposed)   v_cache: T [kv_heads, n_ctx, head_dim]
    //   k_new, v_new: T [M, kv_heads * head_dim]
    template <typename T>
    void write_kv(T* k_cache, T* v_cache, const T* k_new, const T* v_new, int64_t M, int64_t pos0) const {
        const int64_t hd = cfg_.head_dim, Hkv = cfg_.n_kv_heads, kv_dim = Hkv * hd;
        for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
            for (int64_t i = 0; i < hd; ++i)  // transposed: positions are contiguous
                for (int64_t m = 0; m < M; ++m) k_cache[(kvh * hd + i) * n_ctx_ + pos0 + m] = k_new[m * kv_dim + kvh * hd + i];
            for (int64_t m = 0; m < M; ++m)
                std::memcpy(v_cache + (kvh * n_ctx_ + pos0 + m) * hd, v_new + m * kv_dim + kvh * hd, (size_t)hd * sizeof(T));
        }
    }

    KvType kv_type_ = KvType::F16;
    std::unique_ptr<uint8_t[]> k_cache_;  // kv_type_ [layers, kv_heads, head_dim, n_ctx] (transposed)
    std::unique_ptr<uint8_t[]> v_cache_;  // kv_type_ [layers, kv_heads, n_ctx, head_dim]
    std::vector<float> x_, h_, q_, k_, v_, attn_, gate_, up_;
    std::vector<uint16_t> k16_, v16_;  // [kMaxBatch, kv_heads * head_dim]: k_, v_ rounded for an f16 cache
    std::vector<int32_t> positions_;
    std::vector<float> cos_sin_;  // [kMaxBatch, 2, head_dim / 2]: this batch's rope angles (rope_angles)
    ActivationScratch scratch_;
    std::vector<AlignedBytes> tiled_storage_;  // rearranged weights (tile_for_active_kernels)
    StageClock clock_;
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<MappedFile> file, const TensorTable& tensors,
                                        const ModelConfig& config, const std::map<std::string, LinearSpec>& linears,
                                        int64_t context_length, int n_threads, const std::string& kv_cache) {
    return std::make_unique<CpuEngine>(std::move(file), tensors, config, linears, context_length, n_threads,
                                       kv_cache);
}

}  // namespace pyllm
