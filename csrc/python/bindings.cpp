// pyllm._core: the C++ kernels and the engine as seen from Python.
//
// Every function checks dtypes, contiguity and shapes of the numpy arrays it is
// given before touching their memory, then releases the GIL for the compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "../core/thread_pool.h"
#include "../engine/engine.h"
#include "../kernels/cpu/matmul.h"
#include "../kernels/cpu/membw.h"
#include "../kernels/cpu/ops.h"

namespace py = pybind11;
using namespace pyllm;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] void bad(const std::string& why) { throw py::value_error(why); }

// Token ids or positions: any integer array whose values fit int32 (no silent
// wrapping of int64 values, no truncation of floats).
I32Array int32_values(const py::array& a, const char* name) {
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

void expect_shape(const py::array& a, std::initializer_list<int64_t> shape, const char* name) {
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

WeightFormat parse_format(const std::string& name) {
    for (int f = 0; f <= (int)WeightFormat::Q4_ASYM; ++f)
        if (name == format_name((WeightFormat)f)) return (WeightFormat)f;
    bad("unknown weight format '" + name + "' (f32, f16, bf16, int8, int4_sym, int4_asym)");
}

// Builds a checked view of weight arrays; rows come from data, cols is given
// because int4 rows are padded.
WeightView weight_view(const std::string& format, const py::array& data, int64_t cols, int64_t group_size,
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

// Thread pools for the standalone kernels, one per thread count, each used by
// one call at a time.
struct KernelPool {
    std::mutex mutex;
    std::unique_ptr<ThreadPool> pool;
};
KernelPool& kernel_pool(int n_threads) {
    static std::mutex registry_mutex;
    static std::map<int, std::unique_ptr<KernelPool>> pools;
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& slot = pools[n_threads];
    if (!slot) {
        slot = std::make_unique<KernelPool>();
        slot->pool = std::make_unique<ThreadPool>(n_threads);
    }
    return *slot;
}
int resolve_threads(int n_threads) {
    if (n_threads < 0) bad("n_threads must be positive");
    return n_threads == 0 ? ThreadPool::default_threads() : n_threads;
}

RopeScaling parse_rope_scaling(const py::object& obj) {
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

// The Python-facing model: the mapped file plus an engine over it.
class PyModel {
public:
    PyModel(const std::string& path, uint64_t data_offset, const py::dict& tensors, const py::dict& linears,
            const py::dict& config, int64_t context_length, int n_threads) {
        try {
            build(path, data_offset, tensors, linears, config, context_length, n_threads);
        } catch (const py::cast_error& e) {
            bad(std::string("model description has a value of the wrong type or range: ") + e.what());
        }
    }

    void build(const std::string& path, uint64_t data_offset, const py::dict& tensors, const py::dict& linears,
               const py::dict& config, int64_t context_length, int n_threads) {
        file_ = std::make_shared<MappedFile>(path);
        TensorTable table(*file_, data_offset);
        for (auto item : tensors) {
            const std::string name = item.first.cast<std::string>();
            py::tuple info = item.second.cast<py::tuple>();
            if (info.size() != 4) bad("tensor entry for '" + name + "' must be (dtype, shape, begin, end)");
            const auto begin = info[2].cast<int64_t>(), end = info[3].cast<int64_t>();
            if (begin < 0 || end < 0) bad("tensor '" + name + "' has a negative offset");
            table.add(name, info[0].cast<std::string>(), info[1].cast<std::vector<int64_t>>(), (uint64_t)begin,
                      (uint64_t)end);
        }
        std::map<std::string, LinearSpec> specs;
        for (auto item : linears) {
            py::tuple info = item.second.cast<py::tuple>();
            if (info.size() != 2) bad("linear entry must be (format, group_size)");
            specs[item.first.cast<std::string>()] =
                LinearSpec{parse_format(info[0].cast<std::string>()), info[1].cast<int64_t>()};
        }
        ModelConfig cfg;
        auto get_int = [&](const char* key) {
            if (!config.contains(key)) bad(std::string("model config lacks '") + key + "'");
            return config[key].cast<int64_t>();
        };
        cfg.vocab_size = get_int("vocab_size");
        cfg.hidden_size = get_int("hidden_size");
        cfg.intermediate_size = get_int("intermediate_size");
        cfg.n_layers = get_int("num_hidden_layers");
        cfg.n_heads = get_int("num_attention_heads");
        cfg.n_kv_heads = get_int("num_key_value_heads");
        cfg.head_dim = get_int("head_dim");
        cfg.rms_norm_eps = config["rms_norm_eps"].cast<double>();
        cfg.rope_theta = config["rope_theta"].cast<double>();
        cfg.rope_scaling = parse_rope_scaling(config.contains("rope_scaling") ? py::object(config["rope_scaling"])
                                                                              : py::object(py::none()));
        cfg.tie_word_embeddings = config["tie_word_embeddings"].cast<bool>();
        n_threads_ = resolve_threads(n_threads);
        engine_ = make_cpu_engine(file_, table, cfg, specs, context_length, n_threads_);
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

    int64_t context_length() const { return engine_->context_length(); }
    int64_t vocab_size() const { return engine_->config().vocab_size; }
    int n_threads() const { return n_threads_; }
    std::string device() const { return engine_->device(); }

private:
    std::shared_ptr<MappedFile> file_;
    std::unique_ptr<Engine> engine_;
    int n_threads_ = 1;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllm C++ core: CPU kernels and the decoder engine";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::out_of_range& e) {
            PyErr_SetString(PyExc_IndexError, e.what());
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    m.def("cpu_has_avx2", &cpu_has_avx2, "Whether this CPU can run the AVX2/FMA/F16C kernels.");
    m.def("active_kernels", [] { return std::string(active_matmul().name); }, "Name of the matmul variant in use.");
    m.def("select_kernels", [](const std::string& name) { select_matmul(name.c_str()); }, py::arg("name"),
          "Force the matmul variant: 'portable', 'avx2' or 'auto'.");

    m.def(
        "matmul",
        [](const F32Array& x, const std::string& format, const py::array& data, int64_t cols, int64_t group_size,
           const py::object& scales, const py::object& mins, const py::object& bias, int n_threads) {
            // x: f32 [M, cols] -> f32 [M, rows]
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, bias);
            if (x.ndim() != 2 || x.shape(1) != cols)
                bad("x must be 2-D with " + std::to_string(cols) + " columns");
            const int64_t M = x.shape(0);
            if (M <= 0) bad("x has no rows");
            py::array_t<float> y({M, w.rows});
            const float* xp = x.data();
            float* yp = y.mutable_data();
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(kp.mutex);
            ActivationScratch scratch;
            linear(*kp.pool, w, xp, M, yp, scratch);
            return y;
        },
        py::arg("x"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none(), py::arg("bias") = py::none(),
        py::arg("n_threads") = 1, "y = x @ W^T (+ bias) for W in any pyllm weight format.");

    m.def(
        "embedding",
        [](const py::array& id_array, const std::string& format, const py::array& data, int64_t cols,
           int64_t group_size, const py::object& scales, const py::object& mins) {
            // ids: int [M] -> f32 [M, cols]
            const I32Array ids = int32_values(id_array, "ids");
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, py::none());
            if (ids.ndim() != 1) bad("ids must be 1-D");
            py::array_t<float> out({(int64_t)ids.shape(0), cols});
            embedding(w, ids.data(), ids.shape(0), out.mutable_data());
            return out;
        },
        py::arg("ids"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none(), "Dequantized rows of an embedding table.");

    m.def(
        "rmsnorm",
        [](const F32Array& x, const F32Array& weight, float eps) {
            // x: f32 [M, D], weight: f32 [D]
            if (x.ndim() != 2) bad("x must be 2-D");
            expect_shape(weight, {x.shape(1)}, "weight");
            py::array_t<float> y({x.shape(0), x.shape(1)});
            const float *xp = x.data(), *wp = weight.data();
            float* yp = y.mutable_data();
            const int64_t M = x.shape(0), D = x.shape(1);
            py::gil_scoped_release release;
            rmsnorm(xp, wp, M, D, eps, yp);
            return y;
        },
        py::arg("x"), py::arg("weight"), py::arg("eps"));

    m.def(
        "swiglu",
        [](const F32Array& gate, const F32Array& up) {
            // gate, up: f32 [...] of one shape
            if (gate.ndim() != up.ndim() || !std::equal(gate.shape(), gate.shape() + gate.ndim(), up.shape()))
                bad("gate and up must have the same shape");
            py::array_t<float> out(std::vector<py::ssize_t>(gate.shape(), gate.shape() + gate.ndim()));
            swiglu(gate.data(), up.data(), gate.size(), out.mutable_data());
            return out;
        },
        py::arg("gate"), py::arg("up"));

    m.def(
        "rope_inv_freq",
        [](int64_t head_dim, double theta, const py::object& scaling) {
            auto f = rope_inv_freq(head_dim, theta, parse_rope_scaling(scaling));
            return py::array_t<float>((py::ssize_t)f.size(), f.data());
        },
        py::arg("head_dim"), py::arg("theta"), py::arg("scaling") = py::none());

    m.def(
        "rope",
        [](const F32Array& x, const py::array& position_array, double theta, const py::object& scaling) {
            // x: f32 [M, heads, D], positions: int [M] -> rotated copy of x
            const I32Array positions = int32_values(position_array, "positions");
            if (x.ndim() != 3) bad("x must be [M, heads, head_dim]");
            expect_shape(positions, {x.shape(0)}, "positions");
            auto inv_freq = rope_inv_freq(x.shape(2), theta, parse_rope_scaling(scaling));
            py::array_t<float> y({x.shape(0), x.shape(1), x.shape(2)});
            std::copy_n(x.data(), x.size(), y.mutable_data());
            rope(y.mutable_data(), x.shape(0), x.shape(1), x.shape(2), positions.data(), inv_freq.data());
            return y;
        },
        py::arg("x"), py::arg("positions"), py::arg("theta"), py::arg("scaling") = py::none());

    m.def(
        "attention",
        [](const F32Array& q, const F32Array& k_cache, const F32Array& v_cache, int64_t pos0, float scale,
           int n_threads) {
            // q: f32 [M, H, D], k_cache/v_cache: f32 [Hkv, S, D]; query m sits at position pos0 + m
            if (q.ndim() != 3 || k_cache.ndim() != 3) bad("q must be [M, H, D] and caches [Hkv, S, D]");
            const int64_t M = q.shape(0), H = q.shape(1), D = q.shape(2), Hkv = k_cache.shape(0), S = k_cache.shape(1);
            expect_shape(k_cache, {Hkv, S, D}, "k_cache");
            expect_shape(v_cache, {Hkv, S, D}, "v_cache");
            if (Hkv <= 0 || H % Hkv != 0) bad("query heads must be a multiple of kv heads");
            if (pos0 < 0 || pos0 + M > S) bad("positions exceed the cache length");
            py::array_t<float> out({M, H, D});
            // the kernel reads keys transposed, as the engine caches them
            std::vector<float> keys_t((size_t)(Hkv * D * S));
            const float* kp = k_cache.data();
            for (int64_t h = 0; h < Hkv; ++h)
                for (int64_t s = 0; s < S; ++s)
                    for (int64_t i = 0; i < D; ++i) keys_t[(size_t)((h * D + i) * S + s)] = kp[(h * S + s) * D + i];
            const float *qp = q.data(), *vp = v_cache.data();
            float* op = out.mutable_data();
            KernelPool& pool = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(pool.mutex);
            attention(*pool.pool, qp, keys_t.data(), vp, M, H, Hkv, D, S, pos0, scale, op);
            return out;
        },
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos0"), py::arg("scale"),
        py::arg("n_threads") = 1);

    m.def(
        "read_bandwidth",
        [](int n_threads, int64_t bytes, int passes) {
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(kp.mutex);
            return read_bandwidth_gbps(*kp.pool, bytes, passes);
        },
        py::arg("n_threads") = 0, py::arg("bytes") = int64_t(1) << 30, py::arg("passes") = 5,
        "Read bandwidth in GB/s: the fastest of `passes` sums over a buffer of `bytes`, on n_threads threads.");

    py::class_<PyModel>(m, "Engine")
        .def(py::init<const std::string&, uint64_t, const py::dict&, const py::dict&, const py::dict&, int64_t, int>(),
             py::arg("path"), py::arg("data_offset"), py::arg("tensors"), py::arg("linears"), py::arg("config"),
             py::arg("context_length"), py::arg("n_threads") = 0)
        .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("pos"), py::arg("all_logits") = false,
             "Runs tokens (int32 [n]) at positions pos.. and returns logits: f32 [n, vocab] or [vocab].")
        .def_property_readonly("context_length", &PyModel::context_length)
        .def_property_readonly("vocab_size", &PyModel::vocab_size)
        .def_property_readonly("n_threads", &PyModel::n_threads)
        .def_property_readonly("device", &PyModel::device);
}
