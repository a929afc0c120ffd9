// What the two extension modules (pyllm._core, pyllm._cuda) share: checks of
// numpy arguments, weight views over numpy arrays, and the Python-facing
// model that parses a model description and drives an Engine.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../engine/engine.h"

namespace pyllm {
namespace binding {

namespace py = pybind11;

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] inline void bad(const std::string& why) { throw py::value_error(why); }

// Token ids or positions: any integer array whose values fit int32 (no silent
// wrapping of int64 values, no truncation of floats).
inline I32Array int32_values(const py::array& a, const char* name) {
    const char kind = a.dtype().kind();
    if (a.size() > 0 && kind != 'i' && kind != 'u')
        bad(std::string(name) + " must be integers, got dtype " + std::string(py::str(a.dtype())));
    auto out_of_range = [&] { bad(std::string(name) + " has a value that does not fit in 32 bits"); };
    if (kind == 'u' && a.dtype().itemsize() == 8) {
        py::array_t<uint64_t, py::array::c_style | py::array::forcecast> u(a);
        for (py::ssize_t i = 0; i < u.size(); ++i)
            if (u.data()[i] > (uint64_t)INT32_MAX) out_of_range();
    } else if (a.dtype().itemsize() > 4 || (kind == 'u' && a.dtype().itemsize() == 4)) {
        py::array_t<int64_t, py::array::c_style | py::array::forcecast> wide(a);
        for (py::ssize_t i = 0; i < wide.size(); ++i)
            if (wide.data()[i] < INT32_MIN || wide.data()[i] > INT32_MAX) out_of_range();
    }
    return I32Array(a);
}

inline void expect_shape(const py::array& a, std::initializer_list<int64_t> shape, const char* name) {
    std::vector<int64_t> want(shape), got(a.shape(), a.shape() + a.ndim());
    if (want != got) bad(std::string(name) + " has shape " + shape_str(got) + ", expected " + shape_str(want));
}

// Raw weight arrays must already have the exact dtype: reinterpreting or
// silently converting packed integers would give wrong numbers.
template <typename T>
const T* exact(const py::array& a, const char* name) {
    if (!a.dtype().is(py::dtype::of<T>()))
        bad(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + ", expected " +
            std::string(py::str(py::dtype::of<T>())));
    if (!(a.flags() & py::array::c_style)) bad(std::string(name) + " must be C-contiguous");
    return static_cast<const T*>(a.data());
}

inline WeightFormat parse_format(const std::string& name) {
    for (int f = 0; f <= (int)WeightFormat::Q4_ASYM; ++f)
        if (name == format_name((WeightFormat)f)) return (WeightFormat)f;
    bad("unknown weight format '" + name + "' (f32, f16, bf16, int8, int4_sym, int4_asym)");
}

// Builds a checked view of weight arrays; rows come from data, cols is given
// because int4 rows are padded.
inline WeightView weight_view(const std::string& format, const py::array& data, int64_t cols, int64_t group_size,
                       const py::object& scales, const py::object& mins, const py::object& bias) {
    WeightView w;
    w.format = parse_format(format);
    w.cols = cols;
    w.group_size = is_quantized(w.format) ? group_size : 0;
    if (data.ndim() != 2) bad("weight data must be 2-D");
    w.rows = data.shape(0);
    if (w.rows <= 0 || cols <= 0) bad("weight must have positive rows and cols");
    if (is_quantized(w.format) && (group_size <= 0 || group_size % kBlock != 0))
        bad("group size " + std::to_string(group_size) + " is not a positive multiple of 32");
    switch (w.format) {
        case WeightFormat::F32: w.data = exact<float>(data, "weight"); expect_shape(data, {w.rows, cols}, "weight"); break;
        case WeightFormat::F16:
        case WeightFormat::BF16: w.data = exact<uint16_t>(data, "weight"); expect_shape(data, {w.rows, cols}, "weight"); break;
        case WeightFormat::Q8: w.data = exact<int8_t>(data, "weight"); expect_shape(data, {w.rows, cols}, "weight"); break;
        default: w.data = exact<uint8_t>(data, "weight"); expect_shape(data, {w.rows, w.padded_cols() / 2}, "weight"); break;
    }
    if (is_quantized(w.format)) {
        if (scales.is_none()) bad("quantized weight needs scales");
        py::array s = scales.cast<py::array>();
        w.scales = exact<uint16_t>(s, "scales");
        expect_shape(s, {w.rows, w.n_groups()}, "scales");
    }
    if (w.format == WeightFormat::Q4_ASYM) {
        if (mins.is_none()) bad("int4_asym weight needs mins");
        py::array mn = mins.cast<py::array>();
        w.mins = exact<uint16_t>(mn, "mins");
        expect_shape(mn, {w.rows, w.n_groups()}, "mins");
    }
    if (!bias.is_none()) {
        py::array b = bias.cast<py::array>();
        w.bias = exact<float>(b, "bias");
        expect_shape(b, {w.rows}, "bias");
    }
    validate_weight(w, "weight");
    return w;
}

// The feed-forward activations by transformers' hidden_act names, in Activation's order.
constexpr std::initializer_list<const char*> kActivationNames = {"silu", "gelu_pytorch_tanh", "gelu", "relu"};
inline Activation parse_activation(const std::string& name) {
    int32_t i = 0;
    for (const char* known : kActivationNames) {
        if (name == known) return (Activation)i;
        ++i;
    }
    bad("unknown activation '" + name + "' (silu, gelu_pytorch_tanh, gelu, relu)");
}

inline RopeScaling parse_rope_scaling(const py::object& obj) {
    RopeScaling s;
    if (obj.is_none()) return s;
    py::dict d = obj.cast<py::dict>();
    auto get = [&](const char* key, double fallback) { return d.contains(key) ? d[key].cast<double>() : fallback; };
    if (d.contains("rope_type")) s.type = d["rope_type"].cast<std::string>();
    else if (d.contains("type")) s.type = d["type"].cast<std::string>();
    s.factor = get("factor", 1.0);
    s.low_freq_factor = get("low_freq_factor", 1.0);
    s.high_freq_factor = get("high_freq_factor", 4.0);
    s.original_max_position_embeddings = get("original_max_position_embeddings", 8192.0);
    return s;
}

// Sizes of an attention call, checked.   q: f32 [M, H, D]   k_cache, v_cache: f32 [Hkv, S, D];
// query m sits at position pos0 + m.
struct AttentionShape {
    int64_t M, H, D, Hkv, S;
};
inline AttentionShape attention_shape(const F32Array& q, const F32Array& k_cache, const F32Array& v_cache,
                                      int64_t pos0) {
    if (q.ndim() != 3 || k_cache.ndim() != 3) bad("q must be [M, H, D] and caches [Hkv, S, D]");
    const AttentionShape a{q.shape(0), q.shape(1), q.shape(2), k_cache.shape(0), k_cache.shape(1)};
    expect_shape(k_cache, {a.Hkv, a.S, a.D}, "k_cache");
    expect_shape(v_cache, {a.Hkv, a.S, a.D}, "v_cache");
    if (a.Hkv <= 0 || a.H % a.Hkv != 0) bad("query heads must be a multiple of kv heads");
    if (pos0 < 0 || pos0 + a.M > a.S) bad("positions exceed the cache length");
    return a;
}

// The parts of a model description (built by pyllm.formats.packed) an engine needs.
struct ModelDescription {
    std::shared_ptr<MappedFile> file;
    std::unique_ptr<TensorTable> tensors;  // points into *file
    ModelConfig config;
    std::map<std::string, LinearSpec> linears;
};

inline ModelDescription parse_model(const std::string& path, uint64_t data_offset, const py::dict& tensors,
                                    const py::dict& linears, const py::dict& config) {
    ModelDescription d;
    try {
        d.file = std::make_shared<MappedFile>(path);
        d.tensors = std::make_unique<TensorTable>(*d.file, data_offset);
        for (auto item : tensors) {
            const std::string name = item.first.cast<std::string>();
            py::tuple info = item.second.cast<py::tuple>();
            if (info.size() != 4) bad("tensor entry for '" + name + "' must be (dtype, shape, begin, end)");
            const auto begin = info[2].cast<int64_t>(), end = info[3].cast<int64_t>();
            if (begin < 0 || end < 0) bad("tensor '" + name + "' has a negative offset");
            d.tensors->add(name, info[0].cast<std::string>(), info[1].cast<std::vector<int64_t>>(), (uint64_t)begin,
                           (uint64_t)end);
        }
        for (auto item : linears) {
            py::tuple info = item.second.cast<py::tuple>();
            if (info.size() != 2) bad("linear entry must be (format, group_size)");
            const std::string format = info[0].cast<std::string>();
            const bool coded = format == "int4_asym_dq";  // int4_asym with coded scales (LinearSpec)
            d.linears[item.first.cast<std::string>()] =
                LinearSpec{coded ? WeightFormat::Q4_ASYM : parse_format(format), info[1].cast<int64_t>(), coded};
        }
        ModelConfig& cfg = d.config;
        auto get_int = [&](const char* key) {
            if (!config.contains(key)) bad(std::string("model config lacks '") + key + "'");
            return config[key].cast<int64_t>();
        };
        auto get_double = [&](const char* key) {
            if (!config.contains(key)) bad(std::string("model config lacks '") + key + "'");
            return config[key].cast<double>();
        };
        // one of `names` (the enum's values in order) -> its index
        auto get_choice = [&](const char* key, std::initializer_list<const char*> names) {
            const std::string value = config.contains(key) ? config[key].cast<std::string>() : std::string(*names.begin());
            int32_t i = 0;
            for (const char* name : names) {
                if (value == name) return i;
                ++i;
            }
            bad(std::string("model config: unknown ") + key + " '" + value + "'");
        };
        cfg.vocab_size = get_int("vocab_size");
        cfg.hidden_size = get_int("hidden_size");
        cfg.intermediate_size = get_int("intermediate_size");
        cfg.n_layers = get_int("num_hidden_layers");
        cfg.n_heads = get_int("num_attention_heads");
        cfg.n_kv_heads = get_int("num_key_value_heads");
        cfg.head_dim = get_int("head_dim");
        cfg.norm_eps = get_double("norm_eps");
        cfg.rope_theta = get_double("rope_theta");
        cfg.rope_scaling = parse_rope_scaling(config.contains("rope_scaling") ? py::object(config["rope_scaling"])
                                                                              : py::object(py::none()));
        cfg.tie_word_embeddings = config["tie_word_embeddings"].cast<bool>();
        // the block description (pyllm/arch: ModelConfig.engine_config)
        cfg.norm = (NormType)get_choice("norm_type", {"rms_norm", "layer_norm"});
        cfg.embedding_norm = get_int("embedding_norm") != 0;
        cfg.embedding_scale = get_double("embedding_scale");
        cfg.positions = (PositionType)get_choice("position_embedding", {"rope", "alibi", "learned"});
        cfg.rotary_dim = get_int("rotary_dim");
        cfg.rope_theta_local = get_double("rope_theta_local");
        cfg.max_positions = get_int("max_position_embeddings");
        cfg.qk_norm = get_int("qk_norm") != 0;
        cfg.post_norms = get_int("post_norms") != 0;
        cfg.ffn = (FfnType)get_choice("ffn_type", {"gated", "plain"});
        cfg.activation = (Activation)get_choice("hidden_act", kActivationNames);
        cfg.attention_scale = get_double("attention_scale");
        cfg.attn_logit_softcapping = get_double("attn_logit_softcapping");
        cfg.final_logit_softcapping = get_double("final_logit_softcapping");
        if (!config.contains("sliding_window_per_layer")) bad("model config lacks 'sliding_window_per_layer'");
        cfg.sliding_window = config["sliding_window_per_layer"].cast<std::vector<int64_t>>();
    } catch (const py::cast_error& e) {
        bad(std::string("model description has a value of the wrong type or range: ") + e.what());
    }
    return d;
}

// The Python-facing model: the mapped file plus an engine over it.
class PyModel {
public:
    using Factory =
        std::function<std::unique_ptr<Engine>(const ModelDescription&, int64_t context_length, int n_threads,
                                              const std::string& kv_cache, int64_t n_seq)>;

    PyModel(const std::string& path, uint64_t data_offset, const py::dict& tensors, const py::dict& linears,
            const py::dict& config, int64_t context_length, int n_threads, const std::string& kv_cache,
            int64_t n_seq, const Factory& make_engine)
        : n_threads_(n_threads) {
        ModelDescription d = parse_model(path, data_offset, tensors, linears, config);
        file_ = d.file;
        const unsigned long main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
        {
            py::gil_scoped_release release;  // loading (tiling weights) runs beside Python threads
            engine_ = make_engine(d, context_length, n_threads, kv_cache, n_seq);
        }
        // Python runs signal handlers in the main thread only, and only between bytecodes: a call of
        // several batches from the main thread looks for them between its batches (SystemExit from
        // pyllm's SIGTERM handler, KeyboardInterrupt), other threads skip the GIL this takes.
        engine_->between_batches = [main_thread] {
            if (PyThread_get_thread_ident() != main_thread) return;
            py::gil_scoped_acquire gil;
            if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        };
    }

    // Rows of several sequences in one step (Engine::forward_rows): logits f32 [len(logit_rows), vocab].
    py::array_t<float> forward_rows(const py::array& token_array, const py::array& seq_array, const py::array& pos_array,
                                    const py::array& logit_array, bool hidden) {
        const I32Array tokens = int32_values(token_array, "tokens"), seqs = int32_values(seq_array, "seq_ids"),
                       positions = int32_values(pos_array, "positions");
        const I32Array rows = int32_values(logit_array, "logit_rows");  // row indices: no floats truncated
        if (tokens.ndim() != 1 || tokens.shape(0) == 0) bad("tokens must be 1-D and not empty");
        const int64_t n = tokens.shape(0);
        expect_shape(seqs, {n}, "seq_ids");
        expect_shape(positions, {n}, "positions");
        if (rows.ndim() != 1) bad("logit_rows must be 1-D");
        const int64_t n_logits = rows.shape(0);
        const int64_t width = hidden ? engine_->config().hidden_size : engine_->config().vocab_size;
        py::array_t<float> logits({n_logits, width});
        const int32_t *t = tokens.data(), *q = seqs.data(), *p = positions.data();
        const std::vector<int64_t> wide_rows(rows.data(), rows.data() + n_logits);
        const int64_t* r = wide_rows.data();
        float* out = logits.mutable_data();
        {
            py::gil_scoped_release release;
            engine_->forward_rows(t, q, p, n, r, n_logits, out, nullptr, hidden);
        }
        return logits;
    }

    void copy_sequence(int64_t src, int64_t dst, int64_t n_positions) {
        py::gil_scoped_release release;
        engine_->copy_sequence(src, dst, n_positions);
    }

    // Rows whose inputs are embeddings (prompt tuning's virtual tokens) at positions pos0.. of seq; no logits.
    void forward_embeddings(const F32Array& embeds, int64_t seq, int64_t pos0) {
        const int64_t hidden = engine_->config().hidden_size;
        if (embeds.ndim() != 2 || embeds.shape(1) != hidden || embeds.shape(0) == 0)
            bad("embeds must be f32 [n, " + std::to_string(hidden) + "] with n > 0");
        const int64_t n = embeds.shape(0);
        if (pos0 < 0 || pos0 > INT32_MAX - n) bad("positions out of range");
        std::vector<int32_t> tokens((size_t)n, 0), seqs((size_t)n, (int32_t)seq), positions((size_t)n);
        if (seq < 0 || seq > INT32_MAX) bad("sequence out of range");
        for (int64_t i = 0; i < n; ++i) positions[(size_t)i] = (int32_t)(pos0 + i);
        const float* e = embeds.data();
        py::gil_scoped_release release;
        engine_->forward_rows(tokens.data(), seqs.data(), positions.data(), n, nullptr, 0, nullptr, e);
    }

    // keys, values: f32 [layers, kv_heads, n, head_dim] written at positions pos0.. of seq (prefix tuning).
    void set_cache(int64_t seq, int64_t pos0, const F32Array& keys, const F32Array& values) {
        const ModelConfig& c = engine_->config();
        if (keys.ndim() != 4) bad("keys must be f32 [layers, kv_heads, n, head_dim]");
        const int64_t n = keys.shape(2);
        expect_shape(keys, {c.n_layers, c.n_kv_heads, n, c.head_dim}, "keys");
        expect_shape(values, {c.n_layers, c.n_kv_heads, n, c.head_dim}, "values");
        const float *k = keys.data(), *v = values.data();
        py::gil_scoped_release release;
        engine_->set_cache(seq, pos0, n, k, v);
    }

    py::array_t<float> forward(const py::array& token_array, int64_t pos, bool all_logits) {
        const I32Array tokens = int32_values(token_array, "tokens");
        if (tokens.ndim() != 1) bad("tokens must be 1-D");
        const int64_t n = tokens.shape(0);
        if (n == 0) bad("no tokens");
        const int64_t vocab = engine_->config().vocab_size;
        py::array_t<float> logits = all_logits ? py::array_t<float>({n, vocab}) : py::array_t<float>({vocab});
        const int32_t* ids = tokens.data();
        float* out = logits.mutable_data();
        {
            py::gil_scoped_release release;
            engine_->forward(ids, n, pos, out, all_logits);
        }
        return logits;
    }

    // Runs tokens at positions pos.. without computing logits, calling callback(layer, input, x) with a
    // copy of every matrix input x f32 [rows, cols] (input: 0 attention input, 1 attention output,
    // 2 feed-forward input, 3 feed-forward product), in order: calibration statistics.
    void observe_inputs(const py::array& token_array, int64_t pos, const py::function& callback) {
        const I32Array tokens = int32_values(token_array, "tokens");
        if (tokens.ndim() != 1 || tokens.shape(0) == 0) bad("tokens must be 1-D and not empty");
        // The callback's exception stops the forward and is raised again as itself afterwards: SystemExit
        // from a SIGTERM handler stays SystemExit (the CLI exits 143), a ValueError a ValueError.
        std::unique_ptr<py::error_already_set> failure;
        engine_->set_observer([&callback, &failure](int64_t layer, int input, const float* x, int64_t M, int64_t cols) {
            py::gil_scoped_acquire gil;
            try {
                py::array_t<float> copy({M, cols});
                std::copy_n(x, M * cols, copy.mutable_data());
                callback(layer, input, copy);
            } catch (py::error_already_set& e) {
                failure = std::make_unique<py::error_already_set>(std::move(e));
                throw std::runtime_error("observer callback failed");
            }
        });
        struct Detach {
            Engine* engine;
            ~Detach() { engine->set_observer({}); }
        } detach{engine_.get()};
        const int32_t* ids = tokens.data();
        const int64_t n = tokens.shape(0);
        try {
            py::gil_scoped_release release;
            engine_->forward(ids, n, pos, nullptr, false);
        } catch (const std::runtime_error&) {
            if (failure) throw py::error_already_set(std::move(*failure));
            throw;
        }
    }

    int64_t context_length() const { return engine_->context_length(); }
    int64_t n_seq() const { return engine_->n_seq(); }
    int64_t vocab_size() const { return engine_->config().vocab_size; }
    int n_threads() const { return n_threads_; }
    std::string device() const { return engine_->device(); }
    const char* kv_cache() const { return engine_->kv_cache(); }
    int64_t kv_cache_bytes() const { return engine_->kv_cache_bytes(); }
    bool kv_cache_populated() const { return engine_->kv_cache_populated(); }
    std::string activation_quant() const { return engine_->activation_quant(); }
    void set_activation_quant(const std::string& name) {
        py::gil_scoped_release release;  // waits for a running forward
        engine_->set_activation_quant(name);
    }
    py::dict profile() const {
        py::dict out;
        for (const auto& [stage, seconds] : engine_->profile()) out[py::str(stage)] = seconds;
        return out;
    }

private:
    std::shared_ptr<MappedFile> file_;
    std::unique_ptr<Engine> engine_;
    int n_threads_ = 1;
};

// Registers PyModel as module.Engine(path, data_offset, tensors, linears, config,
// context_length, n_threads=0, kv_cache="auto", n_seq=1); `threads` maps the n_threads argument to the count used.
inline void register_engine_class(py::module_& m, std::function<int(int)> threads, PyModel::Factory make_engine) {
    py::class_<PyModel>(m, "Engine", py::module_local())  // both modules register it
        .def(py::init([threads, make_engine](const std::string& path, uint64_t data_offset, const py::dict& tensors,
                                             const py::dict& linears, const py::dict& config, int64_t context_length,
                                             int n_threads, const std::string& kv_cache, int64_t n_seq) {
                 return new PyModel(path, data_offset, tensors, linears, config, context_length, threads(n_threads),
                                    kv_cache, n_seq, make_engine);
             }),
             py::arg("path"), py::arg("data_offset"), py::arg("tensors"), py::arg("linears"), py::arg("config"),
             py::arg("context_length"), py::arg("n_threads") = 0, py::arg("kv_cache") = "auto", py::arg("n_seq") = 1)
        .def("forward_rows", &PyModel::forward_rows, py::arg("tokens"), py::arg("seq_ids"), py::arg("positions"),
             py::arg("logit_rows"), py::arg("hidden") = false,
             "Rows of several sequences in one step: row i is tokens[i] of sequence seq_ids[i] at positions[i] "
             "(a sequence's rows consecutive, at consecutive positions); returns the logits of logit_rows "
             "(ascending row indices): f32 [len(logit_rows), vocab]; hidden=True: their final hidden states "
             "(after the final norm) f32 [len(logit_rows), hidden] instead.")
        .def("copy_sequence", &PyModel::copy_sequence, py::arg("src"), py::arg("dst"), py::arg("n_positions"),
             "Copies the cached keys/values of positions 0 .. n_positions - 1 of sequence src into dst.")
        .def_property_readonly("n_seq", &PyModel::n_seq, "Sequences the KV cache holds.")
        .def("forward_embeddings", &PyModel::forward_embeddings, py::arg("embeds"), py::arg("seq"), py::arg("pos0"),
             "Runs rows whose inputs are the given embeddings (f32 [n, hidden]) at positions pos0.. of sequence seq, "
             "storing their keys and values (prompt tuning's virtual tokens); no logits.")
        .def("set_cache", &PyModel::set_cache, py::arg("seq"), py::arg("pos0"), py::arg("keys"), py::arg("values"),
             "Writes keys and values (f32 [layers, kv_heads, n, head_dim]) into sequence seq's cache at positions "
             "pos0.. (prefix tuning's learned prefix).")
        .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("pos"), py::arg("all_logits") = false,
             "Runs tokens (int32 [n]) at positions pos.. and returns logits: f32 [n, vocab] or [vocab].")
        .def("observe_inputs", &PyModel::observe_inputs, py::arg("tokens"), py::arg("pos"), py::arg("callback"),
             "Runs tokens (int32 [n]) at positions pos.. without logits, calling callback(layer, input, x) with "
             "every matrix input x f32 [rows, cols] (input 0: attention in, 1: attention out, 2: feed-forward in, "
             "3: feed-forward product).")
        .def_property_readonly("context_length", &PyModel::context_length)
        .def_property_readonly("vocab_size", &PyModel::vocab_size)
        .def_property_readonly("n_threads", &PyModel::n_threads)
        .def_property_readonly("device", &PyModel::device)
        .def_property_readonly("kv_cache", [](const PyModel& m) { return std::string(m.kv_cache()); },
                               "The KV cache's element type: 'f16', 'f32' or 'q8_0'.")
        .def_property_readonly("kv_cache_bytes", &PyModel::kv_cache_bytes,
                               "Bytes the KV cache's keys and values take, as allocated (the CPU engine pads "
                               "each kv head's positions: kv_cache_stride in kernels.h).")
        .def_property_readonly("kv_cache_populated", &PyModel::kv_cache_populated,
                               "Whether the KV cache's pages are all resident: the CPU engine fills them in "
                               "with a background thread from its creation, so that a slot's first use does "
                               "not wait on page faults (csrc/core/populate.h).")
        .def_property("activation_quant", &PyModel::activation_quant, &PyModel::set_activation_quant,
                      "How activations are quantized for int4/int8 weights: 'int8x2' (two int8 terms per value, "
                      "the default) or 'int8' (one, as llama.cpp's Q8_0 activations); 'float' on engines that "
                      "multiply with float activations, where setting it raises ValueError.")
        .def("profile", &PyModel::profile,
             "Seconds per forward stage since the engine was made (PYLLM_PROFILE=1), else an empty dict.");
}

// std::out_of_range -> IndexError, std::invalid_argument -> ValueError.
inline void register_exception_translator() {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::out_of_range& e) {
            PyErr_SetString(PyExc_IndexError, e.what());
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });
}

}  // namespace binding
}  // namespace pyllm
