// The CPU engine: the decoder the model file describes (ModelConfig), run layer by layer with the
// CPU operators.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

#include "../core/checked.h"
#include "../core/env.h"
#include "../core/populate.h"
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
    need(norm_eps > 0.0, "norm_eps must be positive");
    need(vocab_size < INT32_MAX, "vocabulary too large");
    need(rotary_dim >= 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0, "rotary_dim must be even, 0..head_dim");
    need(std::isfinite(embedding_scale) && embedding_scale > 0.0, "embedding_scale must be positive");
    need(attention_scale >= 0.0 && std::isfinite(attention_scale), "attention_scale must be >= 0");
    need(attn_logit_softcapping >= 0.0 && final_logit_softcapping >= 0.0, "soft-capping values must be >= 0");
    need(rope_theta_local >= 0.0, "rope_theta_local must be >= 0");
    need(sliding_window.empty() || (int64_t)sliding_window.size() == n_layers,
         "sliding_window_per_layer must have one entry per layer");
    for (int64_t w : sliding_window) need(w >= 0, "sliding windows must be >= 0");
    need(positions != PositionType::Learned || max_positions > 0, "learned positions need max_position_embeddings");
    need((int)norm >= 0 && (int)norm <= 1 && (int)positions >= 0 && (int)positions <= 2 && (int)ffn >= 0 &&
             (int)ffn <= 1 && (int)activation >= 0 && (int)activation <= 3,
         "unknown block description value");
}

const float* bind_vector(const TensorTable& t, const std::string& name, int64_t n) {
    return reinterpret_cast<const float*>(t.get(name, DType::F32, {n}).data);
}

// The f16 scales and mins [rows, n_groups] of an int4_asym_dq weight: f16(code * step), rounded to
// nearest even (pyllm.quant.dq_params gives the same bits). A step that is negative, not finite or
// large enough to overflow f16 makes the file invalid.
static void expand_coded_params(const TensorTable& t, const std::string& base, WeightView& w,
                                std::vector<AlignedBytes>& expanded) {
    const int64_t groups = w.n_groups(), rows = w.rows;
    const uint8_t* scale_codes = t.get(base + ".scales", DType::U8, {rows, groups}).data;
    const auto* min_codes = reinterpret_cast<const int8_t*>(t.get(base + ".mins", DType::I8, {rows, groups}).data);
    const auto* steps = reinterpret_cast<const float*>(t.get(base + ".steps", DType::F32, {rows, 2}).data);
    const int64_t n = checked_mul(rows, groups, "scale table");
    expanded.emplace_back(checked_size(checked_mul(n, 4, "scale table"), "scale table"));
    auto* scales = reinterpret_cast<uint16_t*>(expanded.back().data());
    uint16_t* mins = scales + n;
    for (int64_t r = 0; r < rows; ++r) {
        const float scale_step = steps[2 * r], min_step = steps[2 * r + 1];
        if (!(scale_step >= 0.0f && scale_step * 255.0f <= 65504.0f && std::fabs(min_step) * 127.0f <= 65504.0f))
            throw std::invalid_argument("'" + base + ".steps' row " + std::to_string(r) +
                                        " holds a step that is negative, not finite or overflows f16");
        for (int64_t g = 0; g < groups; ++g) {
            scales[r * groups + g] = f32_to_f16((float)scale_codes[r * groups + g] * scale_step);
            mins[r * groups + g] = f32_to_f16((float)min_codes[r * groups + g] * min_step);
        }
    }
    w.scales = scales;
    w.mins = mins;
}

WeightView bind_linear(const TensorTable& t, const std::map<std::string, LinearSpec>& specs, const std::string& base,
                       int64_t rows, int64_t cols, std::vector<AlignedBytes>& expanded) {
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
    if (it->second.coded_params) {
        if (w.format != WeightFormat::Q4_ASYM) throw std::invalid_argument("'" + base + "': coded scales need int4_asym");
        expand_coded_params(t, base, w, expanded);
    } else {
        if (is_quantized(w.format))
            w.scales = reinterpret_cast<const uint16_t*>(t.get(base + ".scales", DType::F16, {rows, w.n_groups()}).data);
        if (w.format == WeightFormat::Q4_ASYM)
            w.mins = reinterpret_cast<const uint16_t*>(t.get(base + ".mins", DType::F16, {rows, w.n_groups()}).data);
    }
    if (t.has(base + ".bias")) w.bias = bind_vector(t, base + ".bias", rows);
    validate_weight(w, base);
    return w;
}

void Engine::forward(const int32_t* tokens, int64_t n, int64_t pos, float* logits, bool all_logits) {
    const int64_t n_ctx = context_length(), vocab = config().vocab_size;
    if (n <= 0) throw std::invalid_argument("forward needs at least one token");
    if (pos < 0 || pos > n_ctx || n > n_ctx - pos)
        throw std::out_of_range(std::to_string(n) + " token(s) from position " + std::to_string(pos) +
                                " exceed the context length " + std::to_string(n_ctx));
    for (int64_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            throw std::out_of_range("token id " + std::to_string(tokens[i]) + " is outside the vocabulary of " +
                                    std::to_string(vocab));
    const ForwardLock lock(*this);
    for (int64_t start = 0; start < n; start += max_batch()) {
        if (start > 0 && between_batches) between_batches();
        const int64_t len = std::min(max_batch(), n - start);
        float* out = nullptr;
        if (all_logits) out = logits + start * vocab;
        else if (start + len == n) out = logits;
        run_batch(tokens + start, len, pos + start, out, all_logits);
    }
}

void Engine::forward_rows(const int32_t* tokens, const int32_t* seq_ids, const int32_t* positions, int64_t n,
                          const int64_t* logit_rows, int64_t n_logits, float* logits, const float* embeds,
                          bool hidden) {
    const int64_t n_ctx = context_length(), sequences = n_seq();
    const int64_t vocab = config().vocab_size, row_width = hidden ? config().hidden_size : vocab;
    if (n <= 0) throw std::invalid_argument("forward_rows needs at least one row");
    if (n_logits < 0 || n_logits > n) throw std::invalid_argument("more logit rows than rows");
    std::vector<Span> spans;
    std::vector<char> seen((size_t)sequences, 0);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t seq = seq_ids[i], pos = positions[i];
        if (embeds == nullptr && (tokens[i] < 0 || tokens[i] >= vocab))
            throw std::out_of_range("token id " + std::to_string(tokens[i]) + " is outside the vocabulary of " +
                                    std::to_string(vocab));
        if (seq < 0 || seq >= sequences)
            throw std::out_of_range("sequence " + std::to_string(seq) + " is not one of the cache's " +
                                    std::to_string(sequences));
        if (pos < 0 || pos >= n_ctx)
            throw std::out_of_range("position " + std::to_string(pos) + " exceeds the context length " +
                                    std::to_string(n_ctx));
        if (!spans.empty() && spans.back().seq == seq) {
            if (pos != spans.back().pos0 + spans.back().rows)
                throw std::invalid_argument("the rows of sequence " + std::to_string(seq) +
                                            " must be at consecutive positions");
            ++spans.back().rows;
            continue;
        }
        if (seen[(size_t)seq]) throw std::invalid_argument("the rows of sequence " + std::to_string(seq) + " must be consecutive");
        seen[(size_t)seq] = 1;
        spans.push_back(Span{seq, i, 1, pos});
    }
    for (int64_t j = 0; j < n_logits; ++j)
        if (logit_rows[j] < 0 || logit_rows[j] >= n || (j > 0 && logit_rows[j] <= logit_rows[j - 1]))
            throw std::invalid_argument("logit rows must be ascending row indices");
    const ForwardLock lock(*this);
    // steps of at most max_batch() rows; a span cut in two continues in the next step
    const int64_t step_rows = max_batch();
    std::vector<Span> step_spans;
    std::vector<int64_t> step_logit_rows;
    int64_t next_logit = 0;
    for (int64_t begin = 0; begin < n; begin += step_rows) {
        if (begin > 0 && between_batches) between_batches();
        const int64_t end = std::min(n, begin + step_rows);
        step_spans.clear();
        for (const Span& sp : spans) {
            const int64_t b = std::max(begin, sp.row_begin), e = std::min(end, sp.row_begin + sp.rows);
            if (b < e) step_spans.push_back(Span{sp.seq, b - begin, e - b, sp.pos0 + (b - sp.row_begin)});
        }
        step_logit_rows.clear();
        const int64_t first_logit = next_logit;
        while (next_logit < n_logits && logit_rows[next_logit] < end) step_logit_rows.push_back(logit_rows[next_logit++] - begin);
        run_spans(tokens + begin, end - begin, step_spans.data(), (int64_t)step_spans.size(), step_logit_rows.data(),
                  (int64_t)step_logit_rows.size(), logits + first_logit * row_width,
                  embeds ? embeds + begin * config().hidden_size : nullptr, hidden);
    }
}

void Engine::set_cache(int64_t seq, int64_t pos0, int64_t n, const float* keys, const float* values) {
    if (seq < 0 || seq >= n_seq())
        throw std::out_of_range("set_cache: sequence " + std::to_string(seq) + " is not one of the cache's " +
                                std::to_string(n_seq()));
    if (n <= 0 || pos0 < 0 || pos0 > context_length() - n)
        throw std::out_of_range("set_cache: " + std::to_string(n) + " position(s) from " + std::to_string(pos0) +
                                " exceed the context length " + std::to_string(context_length()));
    const ForwardLock lock(*this);
    write_cache(seq, pos0, n, keys, values);
}

void Engine::copy_sequence(int64_t src, int64_t dst, int64_t n_positions) {
    if (src < 0 || src >= n_seq() || dst < 0 || dst >= n_seq())
        throw std::out_of_range("copy_sequence: sequences must lie in [0, " + std::to_string(n_seq()) + ")");
    if (n_positions < 0 || n_positions > context_length())
        throw std::out_of_range("copy_sequence: positions exceed the context length");
    const ForwardLock lock(*this);
    if (src != dst && n_positions > 0) copy_cache(src, dst, n_positions);
}

namespace {

// A norm's parameters: weight f32 [D], and bias f32 [D] for LayerNorm (null for RMSNorm).
struct NormWeights {
    const float* weight = nullptr;
    const float* bias = nullptr;
};

struct LayerWeights {
    NormWeights attn_norm;            // before attention
    WeightView q, k, v, o;            // q: [heads*head_dim, hidden], k/v: [kv_heads*head_dim, hidden], o: [hidden, heads*head_dim]
    const float* q_norm = nullptr;    // [head_dim] (qk_norm)
    const float* k_norm = nullptr;    // [head_dim] (qk_norm)
    NormWeights attn_post_norm;       // of the attention output (post_norms)
    NormWeights ffn_norm;             // before the feed-forward block
    WeightView gate, up, down;        // gate (gated FFN only)/up: [ffn, hidden], down: [hidden, ffn]
    NormWeights ffn_post_norm;        // of the feed-forward output (post_norms)
    bool qkv_quantized, gate_up_quantized;  // whether their shared input is quantized once
    int64_t window;                   // keys a query sees (0: all)
    bool local_rope;                  // RoPE with rope_theta_local (sliding layers of Gemma 3)
};

// Wall time per stage of the forward pass, kept only when PYLLM_PROFILE=1 (a clock read costs
// ~20 ns; a decode step has ~300 stages).
class StageClock {
public:
    enum Stage { kEmbed, kNorm, kQkv, kRopeCache, kAttention, kOut, kGateUp, kSwiglu, kDown, kResidual, kLmHead, kCount };
    StageClock() {
        enabled_ = env_switch("PYLLM_PROFILE", false);
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
              const std::string& kv_cache, int64_t n_seq)
        : file_(std::move(file)), cfg_(cfg), n_ctx_(context_length), n_seq_(n_seq), pool_(n_threads) {
        cfg_.validate();
        if (n_ctx_ <= 0) throw std::invalid_argument("context length must be positive");
        if (n_seq_ <= 0) throw std::invalid_argument("the KV cache must hold at least one sequence");
        if (cfg_.positions == PositionType::Learned && n_ctx_ > cfg_.max_positions)
            throw std::invalid_argument("context length " + std::to_string(n_ctx_) + " exceeds the model's " +
                                        std::to_string(cfg_.max_positions) + " learned positions");
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t q_dim = cfg_.n_heads * hd, kv_dim = cfg_.n_kv_heads * hd;
        const bool gated = cfg_.ffn == FfnType::Gated;
        embed_ = bind_linear(t, specs, "model.embed_tokens", cfg_.vocab_size, D, expanded_params_);
        if (cfg_.positions == PositionType::Learned)
            position_table_ = reinterpret_cast<const float*>(
                t.get("model.embed_positions.weight", DType::F32, {cfg_.max_positions, D}).data);
        if (cfg_.embedding_norm) embed_norm_ = bind_norm(t, "model.embed_norm", D);
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            LayerWeights lw;
            lw.attn_norm = bind_norm(t, p + "input_layernorm", D);
            lw.q = bind_linear(t, specs, p + "self_attn.q_proj", q_dim, D, expanded_params_);
            lw.k = bind_linear(t, specs, p + "self_attn.k_proj", kv_dim, D, expanded_params_);
            lw.v = bind_linear(t, specs, p + "self_attn.v_proj", kv_dim, D, expanded_params_);
            lw.o = bind_linear(t, specs, p + "self_attn.o_proj", D, q_dim, expanded_params_);
            if (cfg_.qk_norm) {
                lw.q_norm = bind_vector(t, p + "self_attn.q_norm.weight", hd);
                lw.k_norm = bind_vector(t, p + "self_attn.k_norm.weight", hd);
            }
            lw.ffn_norm = bind_norm(t, p + "post_attention_layernorm", D);
            if (gated) lw.gate = bind_linear(t, specs, p + "mlp.gate_proj", F, D, expanded_params_);
            lw.up = bind_linear(t, specs, p + "mlp.up_proj", F, D, expanded_params_);
            lw.down = bind_linear(t, specs, p + "mlp.down_proj", D, F, expanded_params_);
            if (cfg_.post_norms) {
                lw.attn_post_norm = bind_norm(t, p + "attn_post_norm", D);
                lw.ffn_post_norm = bind_norm(t, p + "ffn_post_norm", D);
            }
            lw.qkv_quantized = is_quantized(lw.q.format) || is_quantized(lw.k.format) || is_quantized(lw.v.format);
            lw.gate_up_quantized = (gated && is_quantized(lw.gate.format)) || is_quantized(lw.up.format);
            lw.window = cfg_.window(l);
            lw.local_rope = lw.window > 0 && cfg_.rope_theta_local > 0.0;
            layers_.push_back(lw);
        }
        final_norm_ = bind_norm(t, "model.norm", D);
        lm_head_ = cfg_.tie_word_embeddings ? embed_ : bind_linear(t, specs, "lm_head", cfg_.vocab_size, D, expanded_params_);
        // quantized matrices rearranged for the kernels that want it (the file stays as it is)
        for (WeightView* w : matrices()) {
            tile_for_active_kernels(pool_, *w, tiled_storage_);
            // the file's copy is read again only if a kernel variant without tiles is chosen later;
            // out of the resident set with it
            if (w->tiled.data != nullptr) release_file_pages(*w);
        }
        // A tied embedding is read from the lm_head's tiled copy where it has one (embedding()), so its
        // file pages stay out of the resident set; untiled, the file's copy is the lm_head itself. An
        // untied table is read a row per token from the file, and the pages each lookup maps in are
        // let go again (release_embedding_rows). Letting go of the whole table after every step
        // instead cost 70-200 us a SmolLM2 decode step (the kernel walks all its pages): 3% of it.
        if (cfg_.tie_word_embeddings) embed_ = lm_head_;
        release_embedding_ = !cfg_.tie_word_embeddings;
        if (cfg_.positions == PositionType::Rope) {
            inv_freq_ = rope_inv_freq(cfg_.rope_dims(), cfg_.rope_theta, cfg_.rope_scaling);
            if (cfg_.rope_theta_local > 0.0) inv_freq_local_ = rope_inv_freq(cfg_.rope_dims(), cfg_.rope_theta_local, {});
        }
        if (cfg_.positions == PositionType::Alibi) alibi_ = alibi_slopes(cfg_.n_heads);
        attention_options_.resize(layers_.size());
        for (size_t l = 0; l < layers_.size(); ++l) {
            attention_options_[l].window = layers_[l].window;
            attention_options_[l].softcap = (float)cfg_.attn_logit_softcapping;
            attention_options_[l].alibi = alibi_.empty() ? nullptr : alibi_.data();
        }

        // KV cache: f16 unless asked otherwise or the model is stored in f32 (a reference run).
        // Pages are touched only as positions are written.
        bool all_f32 = true;
        for (WeightView* w : matrices()) all_f32 = all_f32 && w->format == WeightFormat::F32;
        if (kv_cache == "auto") kv_type_ = all_f32 ? KvType::F32 : KvType::F16;
        else if (kv_cache == "f16" || kv_cache == "f32" || kv_cache == "q8_0") kv_type_ = parse_kv_type(kv_cache);
        else throw std::invalid_argument("kv_cache must be 'auto', 'f16', 'f32' or 'q8_0', not '" + kv_cache + "'");
        if (kv_type_ == KvType::Q8_0 && hd % kQ8Block != 0)
            throw std::invalid_argument("a q8_0 KV cache needs head_dim a multiple of 32 (llama.cpp's block); this "
                                        "model's is " + std::to_string(hd) + ": use kv_cache='f16'");
        // bytes of one position of one kv head, of one layer of one sequence, and of the whole cache
        // (overflow checked: sizes come from files and users)
        row_bytes_ = kv_row_bytes(kv_type_, hd);
        cache_stride_ = kv_cache_stride(kv_type_, n_ctx_);
        layer_bytes_ = checked_product({cfg_.n_kv_heads, cache_stride_, row_bytes_}, "KV cache");
        const int64_t cache_bytes = checked_product({layer_bytes_, cfg_.n_layers, n_seq_}, "KV cache");
        // Huge pages only for a cache that fits the memory left: keys are stored transposed, so a
        // slot's first position touches every 2 MiB page of its keys, and a cache larger than memory
        // (`pyllm run -c 1000000`: 23 GB of SmolLM2 keys and values) became resident at its first token
        // (11.6 GB, 29 s for a 31-token chat). In 4 KiB pages it grows as positions are written.
        const bool huge = cache_bytes <= memory_headroom_bytes() / 2;
        k_cache_.emplace(checked_size(cache_bytes, "KV cache"), huge);
        v_cache_.emplace(checked_size(cache_bytes, "KV cache"), huge);
        {  // huge pages filled in meanwhile, slot by slot (core/populate.h says why); 4 KiB pages as used
            std::vector<BackgroundPopulate::Range> slots;
            const size_t slot_bytes = (size_t)(layer_bytes_ * cfg_.n_layers);
            for (int64_t seq = 0; seq < n_seq_ && k_cache_->huge_pages(); ++seq) {
                slots.push_back({k_layer(seq, 0), slot_bytes});
                slots.push_back({v_layer(seq, 0), slot_bytes});
            }
            populate_.emplace(std::move(slots));
        }
        const int64_t B = kMaxBatch;
        x_.resize((size_t)(B * D));
        h_.resize((size_t)(B * D));
        q_.resize((size_t)(B * q_dim));
        k_.resize((size_t)(B * kv_dim));
        v_.resize((size_t)(B * kv_dim));
        k_encoded_.resize((size_t)(B * cfg_.n_kv_heads * row_bytes_));
        v_encoded_.resize(k_encoded_.size());
        attn_.resize((size_t)(B * q_dim));
        if (gated) gate_.resize((size_t)(B * F));
        up_.resize((size_t)(B * F));
        positions_.resize((size_t)B);
        cos_sin_.resize((size_t)(B * cfg_.rope_dims()));
        if (!inv_freq_local_.empty()) cos_sin_local_.resize(cos_sin_.size());
    }

    const ModelConfig& config() const override { return cfg_; }
    int64_t context_length() const override { return n_ctx_; }
    const char* device() const override { return "cpu"; }
    const char* kv_cache() const override { return kv_type_name(kv_type_); }
    int64_t kv_cache_bytes() const override { return 2 * layer_bytes_ * cfg_.n_layers * n_seq_; }
    bool kv_cache_populated() const override { return populate_->done(); }
    const char* activation_quant() const override { return activation_quant_.load()->name; }
    void apply_activation_quant(const std::string& name) override {  // under ForwardLock
        scratch_.quant = &activation_quant_named(name);
        activation_quant_.store(scratch_.quant);
    }
    int64_t n_seq() const override { return n_seq_; }
    std::vector<std::pair<std::string, double>> profile() const override { return clock_.report(); }
    void set_observer(InputObserver observer) override { observer_ = std::move(observer); }

private:
    static constexpr int64_t kMaxBatch = 256;
    int64_t max_batch() const override { return kMaxBatch; }

    NormWeights bind_norm(const TensorTable& t, const std::string& name, int64_t D) const {
        NormWeights n;
        n.weight = bind_vector(t, name + ".weight", D);
        if (cfg_.norm == NormType::LayerNorm) n.bias = bind_vector(t, name + ".bias", D);
        return n;
    }

    // y = the model's norm of x.   x, y: f32 [M, D] (may alias)
    void norm(const NormWeights& n, const float* x, int64_t M, float* y) const {
        const int64_t D = cfg_.hidden_size;
        if (cfg_.norm == NormType::LayerNorm) layernorm(x, n.weight, n.bias, M, D, (float)cfg_.norm_eps, y);
        else rmsnorm(x, n.weight, M, D, (float)cfg_.norm_eps, y);
    }

    // Every matrix the engine multiplies by (lm_head first).
    std::vector<WeightView*> matrices() {
        std::vector<WeightView*> out{&lm_head_};
        for (LayerWeights& lw : layers_)
            for (WeightView* w : {&lw.q, &lw.k, &lw.v, &lw.o, &lw.gate, &lw.up, &lw.down})
                if (w->data != nullptr) out.push_back(w);
        return out;
    }

    void observe(int64_t layer, int input, const float* x, int64_t M, int64_t cols) const {
        if (observer_) observer_(layer, input, x, M, cols);
    }

    void run_batch(const int32_t* tokens, int64_t M, int64_t pos0, float* logits, bool all_logits) override {
        const Span span{0, 0, M, pos0};
        logit_rows_.clear();
        if (logits != nullptr)
            for (int64_t m = all_logits ? 0 : M - 1; m < M; ++m) logit_rows_.push_back(m);
        run_spans(tokens, M, &span, 1, logit_rows_.data(), (int64_t)logit_rows_.size(), logits, nullptr, false);
    }

    void write_cache(int64_t seq, int64_t pos0, int64_t n, const float* keys, const float* values) override {
        const int64_t hd = cfg_.head_dim, Hkv = cfg_.n_kv_heads;
        std::vector<float> k_rows((size_t)(n * Hkv * hd)), v_rows(k_rows.size());  // [n, kv_heads * head_dim]
        std::vector<uint8_t> k_encoded((size_t)(n * Hkv * row_bytes_)), v_encoded(k_encoded.size());
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            for (int64_t h = 0; h < Hkv; ++h)
                for (int64_t t = 0; t < n; ++t)
                    for (int64_t i = 0; i < hd; ++i) {
                        const int64_t from = ((l * Hkv + h) * n + t) * hd + i;
                        k_rows[(size_t)((t * Hkv + h) * hd + i)] = keys[from];
                        v_rows[(size_t)((t * Hkv + h) * hd + i)] = values[from];
                    }
            encode_kv(k_rows.data(), n, k_encoded.data());
            encode_kv(v_rows.data(), n, v_encoded.data());
            for (int64_t h = 0; h < Hkv; ++h) write_kv(seq, l, h, k_encoded.data(), v_encoded.data(), n, pos0);
        }
    }

    // This sequence's cache of layer l (ops.h attention: keys [kv_heads, head_dim, cache_stride_] transposed for
    // f32/f16, [kv_heads, cache_stride_, row_bytes_] for q8_0; values [kv_heads, cache_stride_, row_bytes_]).
    uint8_t* k_layer(int64_t seq, int64_t l) const { return k_cache_->data() + (seq * cfg_.n_layers + l) * layer_bytes_; }
    uint8_t* v_layer(int64_t seq, int64_t l) const { return v_cache_->data() + (seq * cfg_.n_layers + l) * layer_bytes_; }

    void copy_cache(int64_t src, int64_t dst, int64_t n_positions) override {
        const int64_t hd = cfg_.head_dim, rows = n_positions * row_bytes_;
        for (int64_t l = 0; l < cfg_.n_layers; ++l)
            for (int64_t h = 0; h < cfg_.n_kv_heads; ++h) {
                const int64_t offset = h * cache_stride_ * row_bytes_;  // [kv_heads, cache_stride_, row_bytes_]
                std::memcpy(v_layer(dst, l) + offset, v_layer(src, l) + offset, (size_t)rows);
                if (kv_type_ == KvType::Q8_0) {
                    std::memcpy(k_layer(dst, l) + offset, k_layer(src, l) + offset, (size_t)rows);
                    continue;
                }
                const int64_t element = row_bytes_ / hd;
                for (int64_t i = 0; i < hd; ++i) {  // transposed keys: positions are contiguous per head dim
                    const int64_t key_offset = ((h * hd + i) * cache_stride_) * element;
                    std::memcpy(k_layer(dst, l) + key_offset, k_layer(src, l) + key_offset, (size_t)(n_positions * element));
                }
            }
    }

    void run_spans(const int32_t* tokens, int64_t M, const Span* spans, int64_t n_spans, const int64_t* logit_rows,
                   int64_t n_logits, float* logits, const float* embeds, bool hidden) override {
        const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
        const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, rope_dims = cfg_.rope_dims();
        const float eps = (float)cfg_.norm_eps;
        const float attn_scale =
            cfg_.attention_scale > 0.0 ? (float)cfg_.attention_scale : 1.0f / std::sqrt((float)hd);
        const bool gated = cfg_.ffn == FfnType::Gated;
        float *x = x_.data(), *h = h_.data();
        for (int64_t s = 0; s < n_spans; ++s)
            for (int64_t m = 0; m < spans[s].rows; ++m)
                positions_[(size_t)(spans[s].row_begin + m)] = (int32_t)(spans[s].pos0 + m);
        if (!inv_freq_.empty()) rope_angles(positions_.data(), M, inv_freq_.data(), rope_dims / 2, cos_sin_.data());
        if (!inv_freq_local_.empty())
            rope_angles(positions_.data(), M, inv_freq_local_.data(), rope_dims / 2, cos_sin_local_.data());

        using S = StageClock;
        clock_.time(S::kEmbed, [&] {
            if (embeds != nullptr) {  // transformers' inputs_embeds: the embedding scale is already in them
                std::memcpy(x, embeds, (size_t)(M * D) * sizeof(float));
            } else {
                embedding(embed_, tokens, M, x);
                if (release_embedding_) release_embedding_rows(tokens, M);
                if (cfg_.embedding_scale != 1.0) {
                    const float scale = (float)cfg_.embedding_scale;
                    for (int64_t i = 0; i < M * D; ++i) x[i] *= scale;
                }
            }
            if (position_table_ != nullptr)
                for (int64_t m = 0; m < M; ++m)
                    for (int64_t i = 0; i < D; ++i) x[m * D + i] += position_table_[positions_[(size_t)m] * D + i];
            if (cfg_.embedding_norm) norm(embed_norm_, x, M, x);
        });
        for (int64_t l = 0; l < cfg_.n_layers; ++l) {
            const LayerWeights& lw = layers_[(size_t)l];
            clock_.time(S::kNorm, [&] { norm(lw.attn_norm, x, M, h); });
            observe(l, kAttnIn, h, M, D);
            clock_.time(S::kQkv, [&] {
                const LinearInput in = prepare_linear_input(pool_, h, M, D, lw.qkv_quantized, scratch_);
                const LinearOutput qkv[] = {{&lw.q, q_.data()}, {&lw.k, k_.data()}, {&lw.v, v_.data()}};
                linear(pool_, qkv, 3, in);
            });
            clock_.time(S::kRopeCache, [&] {
                if (lw.q_norm != nullptr) {
                    rmsnorm(q_.data(), lw.q_norm, M * H, hd, eps, q_.data());
                    rmsnorm(k_.data(), lw.k_norm, M * Hkv, hd, eps, k_.data());
                }
                if (!inv_freq_.empty()) {
                    const float* cos_sin = lw.local_rope ? cos_sin_local_.data() : cos_sin_.data();
                    rope(q_.data(), M, H, hd, rope_dims, cos_sin);
                    rope(k_.data(), M, Hkv, hd, rope_dims, cos_sin);
                }
                encode_kv(k_.data(), M, k_encoded_.data());
                encode_kv(v_.data(), M, v_encoded_.data());
                // (span, kv head) tasks: with several sequences on the pool's threads (their transposed
                // keys are 8 x head_dim scattered lines a head: SmolLM2 at 8 sequences a step spent
                // 0.7 ms of a 21 ms step here on one thread); a single span's few on this one
                const auto write = [&](int64_t task) {
                    const Span& sp = spans[task / Hkv];
                    const int64_t first = sp.row_begin * Hkv * row_bytes_;
                    write_kv(sp.seq, l, task % Hkv, k_encoded_.data() + first, v_encoded_.data() + first, sp.rows,
                             sp.pos0);
                };
                if (n_spans > 1) pool_.parallel_for(n_spans * Hkv, write);
                else for (int64_t task = 0; task < n_spans * Hkv; ++task) write(task);
            });
            clock_.time(S::kAttention, [&] {
                attention_spans_.clear();
                for (int64_t s = 0; s < n_spans; ++s) {
                    const Span& sp = spans[s];
                    attention_spans_.push_back(AttentionSpan{q_.data() + sp.row_begin * H * hd, k_layer(sp.seq, l),
                                                             v_layer(sp.seq, l), sp.rows, sp.pos0,
                                                             attn_.data() + sp.row_begin * H * hd});
                }
                attention(pool_, kv_type_, attention_spans_.data(), n_spans, H, Hkv, hd, cache_stride_, attn_scale,
                          attention_options_[(size_t)l]);
            });
            observe(l, kAttnOut, attn_.data(), M, H * hd);
            clock_.time(S::kOut, [&] {
                linear(pool_, lw.o, attn_.data(), M, h, scratch_);
                if (cfg_.post_norms) norm(lw.attn_post_norm, h, M, h);
            });
            clock_.time(S::kResidual, [&] { for (int64_t i = 0; i < M * D; ++i) x[i] += h[i]; });

            clock_.time(S::kNorm, [&] { norm(lw.ffn_norm, x, M, h); });
            observe(l, kMlpIn, h, M, D);
            clock_.time(S::kGateUp, [&] {
                const LinearInput in = prepare_linear_input(pool_, h, M, D, lw.gate_up_quantized, scratch_);
                const LinearOutput gate_up[] = {{&lw.gate, gate_.data()}, {&lw.up, up_.data()}};
                linear(pool_, gated ? gate_up : gate_up + 1, gated ? 2 : 1, in);
            });
            clock_.time(S::kSwiglu, [&] {
                ffn_activation(pool_, cfg_.activation, gated ? gate_.data() : nullptr, up_.data(), M * F, up_.data());
            });
            observe(l, kMlpMid, up_.data(), M, F);
            clock_.time(S::kDown, [&] {
                linear(pool_, lw.down, up_.data(), M, h, scratch_);
                if (cfg_.post_norms) norm(lw.ffn_post_norm, h, M, h);
            });
            clock_.time(S::kResidual, [&] { for (int64_t i = 0; i < M * D; ++i) x[i] += h[i]; });
        }
        if (n_logits == 0) return;
        if (hidden) {  // embeddings: the final norm's output of the wanted rows
            for (int64_t j = 0; j < n_logits; ++j) norm(final_norm_, x + logit_rows[j] * D, 1, logits + j * D);
            return;
        }
        clock_.time(S::kLmHead, [&] {
            // the rows whose logits are wanted, normalised (consecutive rows in place when they are all)
            for (int64_t j = 0; j < n_logits; ++j) norm(final_norm_, x + logit_rows[j] * D, 1, h + j * D);
            linear(pool_, lm_head_, h, n_logits, logits, scratch_);
            if (cfg_.final_logit_softcapping > 0.0) {
                const float cap = (float)cfg_.final_logit_softcapping, inverse = 1.0f / cap;
                for (int64_t i = 0; i < n_logits * cfg_.vocab_size; ++i) logits[i] = cap * std::tanh(logits[i] * inverse);
            }
        });
    }

    std::shared_ptr<MappedFile> file_;  // keeps the weights mapped
    ModelConfig cfg_;
    int64_t n_ctx_;
    int64_t n_seq_;
    int64_t cache_stride_ = 0;  // positions the cache holds per kv head: n_ctx_, padded (kv_cache_stride)
    int64_t layer_bytes_ = 0;  // one layer of one sequence's K (or V) cache
    ThreadPool pool_;
    std::vector<int64_t> logit_rows_;  // run_batch's
    std::vector<AlignedBytes> expanded_params_;  // f16 scales and mins of int4_asym_dq weights (bind_linear)
    WeightView embed_, lm_head_;
    const float* position_table_ = nullptr;  // f32 [max_positions, hidden] (learned positions)
    NormWeights embed_norm_;                 // (embedding_norm)
    bool release_embedding_ = false;  // drop the embedding rows' file pages after each lookup
    std::vector<LayerWeights> layers_;
    NormWeights final_norm_;
    std::vector<float> inv_freq_, inv_freq_local_;  // [rotary_dim / 2] (RoPE; local: sliding layers of Gemma 3)
    std::vector<float> alibi_;                      // [heads] (ALiBi)
    std::vector<AttentionOptions> attention_options_;  // per layer
    InputObserver observer_;
    // w's pages of the mapped file leave the resident set (they come back if read again).
    void release_file_pages(const WeightView& w) const {
        file_->release(w.data, (uint64_t)(w.rows * w.row_bytes()));
        if (w.scales) file_->release(w.scales, (uint64_t)(w.rows * w.n_groups() * 2));
        if (w.mins) file_->release(w.mins, (uint64_t)(w.rows * w.n_groups() * 2));
    }

    // Lets go of the file pages a lookup of ids [M] mapped in: for each row, the 64 KiB around it
    // (what a page fault maps in, fault-around) inside the table, and the same for its scales and mins.
    void release_embedding_rows(const int32_t* ids, int64_t M) const {
        constexpr uint64_t kWindow = 65536;
        auto around = [&](const void* table, uint64_t row_bytes, int64_t row) {
            const uint64_t size = row_bytes * (uint64_t)embed_.rows, at = row_bytes * (uint64_t)row;
            const uint64_t begin = at / kWindow * kWindow, end = std::min(size, (at + row_bytes + kWindow - 1) / kWindow * kWindow);
            file_->release(static_cast<const uint8_t*>(table) + begin, end - begin);
        };
        const uint64_t group_bytes = (uint64_t)embed_.n_groups() * 2;
        for (int64_t m = 0; m < M; ++m) {
            around(embed_.data, (uint64_t)embed_.row_bytes(), ids[m]);
            if (embed_.scales) around(embed_.scales, group_bytes, ids[m]);
            if (embed_.mins) around(embed_.mins, group_bytes, ids[m]);
        }
    }

    // M rows of keys or values in the cache's element type (f32 copied, f16 rounded, q8_0 quantized:
    // head_dim is a multiple of 32 then, so no block spans two heads).
    //   x: f32 [M, kv_heads * head_dim]   out: [M, kv_heads, row_bytes_]
    void encode_kv(const float* x, int64_t M, uint8_t* out) const {
        const int64_t n = M * cfg_.n_kv_heads * cfg_.head_dim;
        if (kv_type_ == KvType::Q8_0) quantize_q8_0(x, n, out);
        else if (kv_type_ == KvType::F16) active_kernels().round_to_f16(x, n, reinterpret_cast<uint16_t*>(out));
        else std::memcpy(out, x, (size_t)n * sizeof(float));
    }

    // Kv head kvh of encoded keys and values of M rows into sequence seq's cache of layer l at positions
    // pos0 .. pos0 + M - 1.   k_new, v_new: [M, kv_heads, row_bytes_] (encode_kv)
    void write_kv(int64_t seq, int64_t l, int64_t kvh, const uint8_t* k_new, const uint8_t* v_new, int64_t M,
                  int64_t pos0) const {
        const int64_t Hkv = cfg_.n_kv_heads;
        uint8_t *k_cache = k_layer(seq, l), *v_cache = v_layer(seq, l);
        for (int64_t m = 0; m < M; ++m) {
            const int64_t to = (kvh * cache_stride_ + pos0 + m) * row_bytes_, from = (m * Hkv + kvh) * row_bytes_;
            std::memcpy(v_cache + to, v_new + from, (size_t)row_bytes_);
            if (kv_type_ == KvType::Q8_0) std::memcpy(k_cache + to, k_new + from, (size_t)row_bytes_);
        }
        if (kv_type_ == KvType::F16)
            transpose_keys(reinterpret_cast<uint16_t*>(k_cache), reinterpret_cast<const uint16_t*>(k_new), kvh, M, pos0);
        if (kv_type_ == KvType::F32)
            transpose_keys(reinterpret_cast<float*>(k_cache), reinterpret_cast<const float*>(k_new), kvh, M, pos0);
    }
    //   k_cache: T [kv_heads, head_dim, cache_stride_]   k_new: T [M, kv_heads * head_dim]; kv head kvh of them
    template <typename T>
    void transpose_keys(T* k_cache, const T* k_new, int64_t kvh, int64_t M, int64_t pos0) const {
        const int64_t hd = cfg_.head_dim, kv_dim = cfg_.n_kv_heads * hd;
        for (int64_t i = 0; i < hd; ++i)  // positions are contiguous
            for (int64_t m = 0; m < M; ++m) k_cache[(kvh * hd + i) * cache_stride_ + pos0 + m] = k_new[m * kv_dim + kvh * hd + i];
    }

    KvType kv_type_ = KvType::F16;
    int64_t row_bytes_ = 0;  // one position of one kv head (kv_row_bytes)
    std::optional<AlignedBytes> k_cache_;  // [n_seq, layers, ...] as k_layer says
    std::optional<AlignedBytes> v_cache_;  // [n_seq, layers, kv_heads, cache_stride_, row_bytes_]
    std::optional<BackgroundPopulate> populate_;  // of k_cache_ and v_cache_: after them, so it stops before they go
    std::vector<float> x_, h_, q_, k_, v_, attn_, gate_, up_;
    std::vector<AttentionSpan> attention_spans_;  // this layer's spans (run_spans), kept to reuse its memory
    std::vector<uint8_t> k_encoded_, v_encoded_;  // [kMaxBatch, kv_heads, row_bytes_]: k_, v_ encoded (encode_kv)
    std::vector<int32_t> positions_;
    std::vector<float> cos_sin_, cos_sin_local_;  // [kMaxBatch, 2, rotary_dim / 2]: this batch's rope angles
    ActivationScratch scratch_;
    std::atomic<const ActivationQuant*> activation_quant_{&kActivationQuants[0]};  // scratch_.quant, for readers
                                                                                 // outside the forward lock
    std::vector<AlignedBytes> tiled_storage_;  // rearranged weights (tile_for_active_kernels)
    StageClock clock_;
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<MappedFile> file, const TensorTable& tensors,
                                        const ModelConfig& config, const std::map<std::string, LinearSpec>& linears,
                                        int64_t context_length, int n_threads, const std::string& kv_cache,
                                        int64_t n_seq) {
    return std::make_unique<CpuEngine>(std::move(file), tensors, config, linears, context_length, n_threads,
                                       kv_cache, n_seq);
}

}  // namespace pyllm
