// pyllm._core: the C++ kernels and the engine as seen from Python.
//
// Every function checks dtypes, contiguity and shapes of the numpy arrays it is
// given before touching their memory, then releases the GIL for the compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../core/container_limits.h"
#include "../core/numeric.h"
#include "../core/thread_pool.h"
#include "../engine/engine.h"
#include "../kernels/cpu/kernels.h"
#include "../kernels/cpu/membw.h"
#include "../kernels/cpu/ops.h"
#include "common.h"

namespace py = pybind11;
using namespace pyllm;
using namespace pyllm::binding;

namespace {

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
constexpr int kMaxThreads = 1024;  // pyllm.limits.MAX_THREADS

int resolve_threads(int n_threads) {
    if (n_threads < 0) bad("n_threads must be positive");
    if (n_threads > kMaxThreads) bad("n_threads exceeds the limit of " + std::to_string(kMaxThreads));
    return n_threads == 0 ? ThreadPool::default_threads() : n_threads;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllm C++ core: CPU kernels and the decoder engine";

    register_exception_translator();

    m.def(
        "available_kernels",
        [] {
            std::vector<std::string> names;
            for (const CpuKernels* k : available_kernels()) names.emplace_back(k->name);
            return names;
        },
        "Kernel variants this build has and this CPU runs, slowest first (the last is the default).");
    m.def(
        "thread_pool_stress",
        [](int n_threads, int64_t jobs, int64_t max_tasks, int64_t stall_every) {
            if (n_threads < 1 || jobs < 0 || max_tasks < 1 || max_tasks > (1 << 20) || stall_every < 0)
                bad("thread_pool_stress: invalid arguments");
            py::gil_scoped_release release;
            ThreadPool pool(resolve_threads(n_threads));
            std::vector<std::atomic<int>> hits((size_t)max_tasks);
            int64_t wrong = 0;
            for (int64_t j = 0; j < jobs; ++j) {
                const int64_t n = 1 + (j * 7919) % max_tasks;  // sizes vary from 1 task up
                for (int64_t i = 0; i < n; ++i) hits[(size_t)i].store(0, std::memory_order_relaxed);
                pool.parallel_for(n, [&](int64_t i) {
                    // a worker descheduled mid-job: this task stalls while the others go on
                    if (stall_every && (j + i) % stall_every == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
                    hits[(size_t)i].fetch_add(1, std::memory_order_relaxed);
                });
                for (int64_t i = 0; i < n; ++i) wrong += hits[(size_t)i].load() != 1;
            }
            return wrong;
        },
        py::arg("n_threads"), py::arg("jobs"), py::arg("max_tasks"), py::arg("stall_every") = 0,
        "Test hook: runs `jobs` parallel_for jobs of 1..max_tasks tasks on a fresh pool of n_threads, every "
        "stall_every-th task sleeping 0.3 ms; returns the number of tasks not run exactly once (0).");
    m.def("active_kernels", [] { return std::string(active_kernels().name); }, "Name of the kernel variant in use.");
    m.def("select_kernels", [](const std::string& name) { select_kernels(name.c_str()); }, py::arg("name"),
          "Force the kernel variant: one of available_kernels() ('portable', 'avx2', 'avxvnni', 'avx512') or 'auto'.");

    m.def(
        "matmul",
        [](const F32Array& x, const std::string& format, const py::array& data, int64_t cols, int64_t group_size,
           const py::object& scales, const py::object& mins, const py::object& bias, int n_threads, bool tiled,
           const std::string& activation_quant) {
            // x: f32 [M, cols] -> f32 [M, rows]
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, bias);
            ActivationScratch scratch;
            scratch.quant = &activation_quant_named(activation_quant);
            std::vector<AlignedBytes> tiled_storage;
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            if (x.ndim() != 2 || x.shape(1) != cols)
                bad("x must be 2-D with " + std::to_string(cols) + " columns");
            const int64_t M = x.shape(0);
            if (M <= 0) bad("x has no rows");
            py::array_t<float> y({M, w.rows});
            const float* xp = x.data();
            float* yp = y.mutable_data();
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(kp.mutex);
            if (tiled) tile_for_active_kernels(*kp.pool, w, tiled_storage);
            linear(*kp.pool, w, xp, M, yp, scratch);
            return y;
        },
        py::arg("x"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none(), py::arg("bias") = py::none(),
        py::arg("n_threads") = 1, py::arg("tiled") = true, py::arg("activation_quant") = "int8x2",
        "y = x @ W^T (+ bias) for W in any pyllm weight format (tiled: rearranged first, as engines do, when "
        "the active kernels have a tiled layout; activation_quant: 'int8x2', 'int8' or 'int8x2_outliers', the engines' "
        "option).");

    m.def(
        "matmul_group",
        [](const F32Array& x, const py::list& weights, int n_threads, bool tiled, const std::string& activation_quant) {
            // x: f32 [M, cols] -> [f32 [M, rows_i]]: the weights of a group sharing their input (q/k/v,
            // gate/up), run as the engine runs them, in one parallel region
            if (weights.empty()) bad("weights is empty");
            std::vector<WeightView> views;
            for (const py::handle& item : weights) {
                const py::dict d = item.cast<py::dict>();
                auto get = [&](const char* key) { return d.contains(key) ? py::object(d[key]) : py::object(py::none()); };
                views.push_back(weight_view(d["format"].cast<std::string>(), d["data"].cast<py::array>(),
                                            d["cols"].cast<int64_t>(), get("group_size").is_none() ? 0 : d["group_size"].cast<int64_t>(),
                                            get("scales"), get("mins"), get("bias")));
            }
            const int64_t cols = views[0].cols;
            bool quantize = false;
            for (const WeightView& w : views) {
                if (w.cols != cols) bad("the weights of a group must have the same cols");
                quantize = quantize || is_quantized(w.format);
            }
            if (x.ndim() != 2 || x.shape(1) != cols) bad("x must be 2-D with " + std::to_string(cols) + " columns");
            const int64_t M = x.shape(0);
            if (M <= 0) bad("x has no rows");
            ActivationScratch scratch;
            scratch.quant = &activation_quant_named(activation_quant);
            std::vector<AlignedBytes> tiled_storage;
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            std::vector<py::array_t<float>> ys;
            std::vector<LinearOutput> outputs;
            for (const WeightView& w : views) ys.emplace_back(std::vector<py::ssize_t>{M, w.rows});
            for (size_t i = 0; i < views.size(); ++i) outputs.push_back(LinearOutput{&views[i], ys[i].mutable_data()});
            const float* xp = x.data();
            {
                py::gil_scoped_release release;
                std::lock_guard<std::mutex> lock(kp.mutex);
                if (tiled)
                    for (WeightView& w : views) tile_for_active_kernels(*kp.pool, w, tiled_storage);
                const LinearInput in = prepare_linear_input(*kp.pool, xp, M, cols, quantize, scratch);
                linear(*kp.pool, outputs.data(), (int64_t)outputs.size(), in);
            }
            py::list out;
            for (auto& y : ys) out.append(y);
            return out;
        },
        py::arg("x"), py::arg("weights"), py::arg("n_threads") = 1, py::arg("tiled") = true,
        py::arg("activation_quant") = "int8x2",
        "[x @ W_i^T (+ bias_i)] for a group of weights sharing their input, in one parallel region as the engine "
        "runs q/k/v and gate/up; each weight a dict of matmul's weight arguments (format, data, cols, group_size, "
        "scales, mins, bias).");

    m.def(
        "quantize_activations",
        [](const F32Array& x, const std::string& activation_quant) {
            // x: f32 [M, cols] -> hi, lo: int8 [M, padded], step, sum: f32 [M, padded / 32]
            if (x.ndim() != 2 || x.shape(0) <= 0 || x.shape(1) <= 0) bad("x must be 2-D and non-empty");
            const int64_t M = x.shape(0), cols = x.shape(1), padded = round_up(cols, kBlock);
            py::array_t<int8_t> hi({M, padded}), lo({M, padded});
            py::array_t<float> step({M, padded / kBlock}), sum({M, padded / kBlock});
            const ActivationQuant& quant = activation_quant_named(activation_quant);
            const QuantizedRows out{M, padded, hi.mutable_data(), lo.mutable_data(), step.mutable_data(),
                                    sum.mutable_data(), nullptr, quant.terms, quant.outlier_factor, quant.min_code_sum};
            const float* xp = x.data();
            {
                py::gil_scoped_release release;
                active_kernels().quantize_rows(xp, cols, 0, M, out);
            }
            return py::make_tuple(hi, lo, step, sum);
        },
        py::arg("x"), py::arg("activation_quant") = "int8x2",
        "Activations as the quantized-weight kernels read them: (hi, lo, step, sum), x ~ step * (254 hi + lo) "
        "('int8x2'), or x ~ step * lo with hi zero ('int8'), or two terms only in outlier blocks ('int8x2_outliers').");

    m.def(
        "embedding",
        [](const py::array& id_array, const std::string& format, const py::array& data, int64_t cols,
           int64_t group_size, const py::object& scales, const py::object& mins, bool tiled) {
            // ids: int [M] -> f32 [M, cols]
            const I32Array ids = int32_values(id_array, "ids");
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, py::none());
            if (ids.ndim() != 1) bad("ids must be 1-D");
            py::array_t<float> out({(int64_t)ids.shape(0), cols});
            std::vector<AlignedBytes> tiled_storage;
            if (tiled) {
                KernelPool& kp = kernel_pool(1);
                std::lock_guard<std::mutex> lock(kp.mutex);
                tile_for_active_kernels(*kp.pool, w, tiled_storage);
            }
            embedding(w, ids.data(), ids.shape(0), out.mutable_data());
            return out;
        },
        py::arg("ids"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none(), py::arg("tiled") = false,
        "Dequantized rows of an embedding table (tiled: read from the copy the active kernels' matmuls read, "
        "as an engine does for a tied lm_head, where they have one).");

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
        "layernorm",
        [](const F32Array& x, const F32Array& weight, const F32Array& bias, float eps) {
            // x: f32 [M, D], weight, bias: f32 [D]
            if (x.ndim() != 2) bad("x must be 2-D");
            expect_shape(weight, {x.shape(1)}, "weight");
            expect_shape(bias, {x.shape(1)}, "bias");
            py::array_t<float> y({x.shape(0), x.shape(1)});
            const float *xp = x.data(), *wp = weight.data(), *bp = bias.data();
            float* yp = y.mutable_data();
            const int64_t M = x.shape(0), D = x.shape(1);
            py::gil_scoped_release release;
            layernorm(xp, wp, bp, M, D, eps, yp);
            return y;
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));

    m.def(
        "ffn_activation",
        [](const std::string& name, const py::object& gate_obj, const F32Array& up, int n_threads) {
            // gate (or None), up: f32 [...] of one shape -> act(gate) * up, or act(up)
            const Activation act = parse_activation(name);
            F32Array gate;
            if (!gate_obj.is_none()) {
                gate = gate_obj.cast<F32Array>();
                if (gate.ndim() != up.ndim() || !std::equal(gate.shape(), gate.shape() + gate.ndim(), up.shape()))
                    bad("gate and up must have the same shape");
            }
            py::array_t<float> out(std::vector<py::ssize_t>(up.shape(), up.shape() + up.ndim()));
            const float* g = gate_obj.is_none() ? nullptr : gate.data();
            const float* u = up.data();
            float* o = out.mutable_data();
            const int64_t n = up.size();
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(kp.mutex);
            ffn_activation(*kp.pool, act, g, u, n, o);
            return out;
        },
        py::arg("activation"), py::arg("gate"), py::arg("up"), py::arg("n_threads") = 1,
        "The feed-forward activation: act(gate) * up (gate given) or act(up).");

    m.def(
        "alibi_slopes", [](int64_t n_heads) {
            auto s = alibi_slopes(n_heads);
            return py::array_t<float>((py::ssize_t)s.size(), s.data());
        },
        py::arg("n_heads"), "ALiBi slopes f32 [n_heads], as BLOOM computes them.");

    m.def(
        "swiglu",
        [](const F32Array& gate, const F32Array& up, int n_threads) {
            // gate, up: f32 [...] of one shape
            if (gate.ndim() != up.ndim() || !std::equal(gate.shape(), gate.shape() + gate.ndim(), up.shape()))
                bad("gate and up must have the same shape");
            py::array_t<float> out(std::vector<py::ssize_t>(gate.shape(), gate.shape() + gate.ndim()));
            const float *g = gate.data(), *u = up.data();
            float* o = out.mutable_data();
            const int64_t n = gate.size();
            KernelPool& kp = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(kp.mutex);
            swiglu(*kp.pool, g, u, n, o);
            return out;
        },
        py::arg("gate"), py::arg("up"), py::arg("n_threads") = 1);

    m.def(
        "round_to_f16",
        [](const F32Array& x) {
            // x: f32 [...] -> the IEEE f16 bits (uint16) of x rounded to nearest even, by the active kernels
            py::array_t<uint16_t> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
            active_kernels().round_to_f16(x.data(), x.size(), out.mutable_data());
            return out;
        },
        py::arg("x"));

    m.def(
        "rope_inv_freq",
        [](int64_t rotary_dim, double theta, const py::object& scaling) {
            auto f = rope_inv_freq(rotary_dim, theta, parse_rope_scaling(scaling));
            return py::array_t<float>((py::ssize_t)f.size(), f.data());
        },
        py::arg("rotary_dim"), py::arg("theta"), py::arg("scaling") = py::none());

    m.def(
        "rope",
        [](const F32Array& x, const py::array& position_array, double theta, const py::object& scaling,
           int64_t rotary_dim) {
            // x: f32 [M, heads, D], positions: int [M] -> rotated copy of x (first rotary_dim dims; 0: all)
            const I32Array positions = int32_values(position_array, "positions");
            if (x.ndim() != 3) bad("x must be [M, heads, head_dim]");
            expect_shape(positions, {x.shape(0)}, "positions");
            const int64_t D = x.shape(2), R = rotary_dim > 0 ? rotary_dim : D;
            if (R > D || R % 2 != 0) bad("rotary_dim must be even and at most head_dim");
            auto inv_freq = rope_inv_freq(R, theta, parse_rope_scaling(scaling));
            py::array_t<float> y({x.shape(0), x.shape(1), D});
            std::copy_n(x.data(), x.size(), y.mutable_data());
            std::vector<float> cos_sin((size_t)(x.shape(0) * R));
            rope_angles(positions.data(), x.shape(0), inv_freq.data(), R / 2, cos_sin.data());
            rope(y.mutable_data(), x.shape(0), x.shape(1), D, R, cos_sin.data());
            return y;
        },
        py::arg("x"), py::arg("positions"), py::arg("theta"), py::arg("scaling") = py::none(),
        py::arg("rotary_dim") = 0);

    m.def(
        "draw_index",
        [](const py::array_t<double, py::array::c_style | py::array::forcecast>& probs, double u) {
            // probs: f64 [n] -> the first i with (probs[0] + ... + probs[i]) / (probs[0] + ... + probs[n - 1]) > u:
            // numpy's c = cumsum(probs); c /= c[-1]; searchsorted(c, u, side="right"), the same sums in the
            // same order (one running double), so the same index. numpy's cumsum took 0.15 ms over 49152.
            if (probs.ndim() != 1 || probs.shape(0) == 0) bad("probs must be 1-D and not empty");
            const int64_t n = probs.shape(0);
            const double* p = probs.data();
            py::gil_scoped_release release;
            std::vector<double> cumulative((size_t)n);
            double running = 0.0;
            for (int64_t i = 0; i < n; ++i) cumulative[(size_t)i] = running = i == 0 ? p[0] : running + p[i];
            const double total = running;
            int64_t lo = 0, hi = n;  // c[i] / total is non-decreasing: the first index above u
            while (lo < hi) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (cumulative[(size_t)mid] / total > u) hi = mid;
                else lo = mid + 1;
            }
            return lo;
        },
        py::arg("probs"), py::arg("u"),
        "The index numpy's choice(n, p=probs) picks for the uniform draw u: the first whose cumulative sum, "
        "divided by the total, exceeds u (n when none does).");

    m.def(
        "quantize_q8_0",
        [](const F32Array& x) {
            if (x.ndim() != 1 || x.shape(0) % kQ8Block != 0) bad("quantize_q8_0 takes f32 [n], n a multiple of 32");
            py::array_t<uint8_t> out({x.shape(0) / kQ8Block * kQ8BlockBytes});
            quantize_q8_0(x.data(), x.shape(0), out.mutable_data());
            return out;
        },
        py::arg("x"),
        "The KV cache's q8_0 blocks of x (f32 [n], n a multiple of 32): u8 [n / 32 * 34], each block an f16 "
        "scale then 32 int8 codes (llama.cpp's block_q8_0).");

    m.def(
        "attention",
        [](const F32Array& q, const F32Array& k_cache, const F32Array& v_cache, int64_t pos0, float scale,
           int n_threads, const std::string& kv_cache, int64_t window, float softcap, const py::object& alibi) {
            // q: f32 [M, H, D], k_cache/v_cache: f32 [Hkv, S, D]; query m sits at position pos0 + m
            const auto [M, H, D, Hkv, S] = attention_shape(q, k_cache, v_cache, pos0);
            const KvType kv = parse_kv_type(kv_cache);
            if (kv == KvType::Q8_0 && D % kQ8Block != 0) bad("a q8_0 cache needs head_dim a multiple of 32");
            py::array_t<float> out({M, H, D});
            // the cache as the engine keeps it: f32/f16 keys transposed, elements f32 or rounded to
            // f16; q8_0 rows of blocks
            const int64_t row_bytes = kv_row_bytes(kv, D);
            std::vector<uint8_t> keys_t((size_t)(Hkv * S * row_bytes)), values(keys_t.size());
            const float *kp = k_cache.data(), *vp = v_cache.data();
            if (kv == KvType::Q8_0) {
                quantize_q8_0(kp, Hkv * S * D, keys_t.data());
                quantize_q8_0(vp, Hkv * S * D, values.data());
            } else {
                auto put = [&](std::vector<uint8_t>& cache, int64_t index, float value) {
                    if (kv == KvType::F16) reinterpret_cast<uint16_t*>(cache.data())[index] = f32_to_f16(value);
                    else reinterpret_cast<float*>(cache.data())[index] = value;
                };
                for (int64_t h = 0; h < Hkv; ++h)
                    for (int64_t s = 0; s < S; ++s)
                        for (int64_t i = 0; i < D; ++i) {
                            put(keys_t, (h * D + i) * S + s, kp[(h * S + s) * D + i]);
                            put(values, (h * S + s) * D + i, vp[(h * S + s) * D + i]);
                        }
            }
            AttentionOptions options;
            if (window < 0 || !(softcap >= 0.0f)) bad("window and softcap must be >= 0");
            options.window = window;
            options.softcap = softcap;
            F32Array slopes;
            if (!alibi.is_none()) {
                slopes = alibi.cast<F32Array>();
                expect_shape(slopes, {H}, "alibi");
                options.alibi = slopes.data();
            }
            const float* qp = q.data();
            float* op = out.mutable_data();
            KernelPool& pool = kernel_pool(resolve_threads(n_threads));
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(pool.mutex);
            attention(*pool.pool, qp, kv, keys_t.data(), values.data(), M, H, Hkv, D, S, pos0, scale, options, op);
            return out;
        },
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos0"), py::arg("scale"),
        py::arg("n_threads") = 1, py::arg("kv_cache") = "f32", py::arg("window") = 0, py::arg("softcap") = 0.0f,
        py::arg("alibi") = py::none(),
        "Causal attention over a cache (kv_cache: the element type it is kept in, 'f32', 'f16' or 'q8_0'); window > 0: "
        "sliding window of that many keys; softcap > 0: tanh soft-capping of scores; alibi: f32 [H] slopes.");

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

    m.def(
        "cgroup_memory",
        [](const std::string& proc_cgroup, const std::string& root) {
            const CgroupMemory cg = cgroup_memory(proc_cgroup, root);
            auto known = [](int64_t v) { return v < 0 ? py::object(py::none()) : py::object(py::int_(v)); };
            return py::make_tuple(known(cg.limit), known(cg.usage));
        },
        py::arg("proc_cgroup") = "/proc/self/cgroup", py::arg("root") = "/sys/fs/cgroup",
        "(limit, usage) in bytes of this process's tightest memory cgroup level (a container's limit; "
        "core/container_limits.h), None where there is none or it cannot be read.");

    m.def(
        "cgroup_cpu_limit",
        [](const std::string& proc_cgroup, const std::string& root) {
            const int64_t cpus = cgroup_cpu_limit(proc_cgroup, root);
            return cpus < 0 ? py::object(py::none()) : py::object(py::int_(cpus));
        },
        py::arg("proc_cgroup") = "/proc/self/cgroup", py::arg("root") = "/sys/fs/cgroup",
        "CPUs this process's cgroup quota allows (a container's --cpus, rounded up; core/container_limits.h), "
        "None where there is no quota.");
    m.def("default_threads", &ThreadPool::default_threads,
          "Threads used when none are asked for: the CPUs of this process's affinity mask, at most its cgroup's CPU "
          "quota.");

    register_engine_class(m, resolve_threads,
                          [](const ModelDescription& d, int64_t context_length, int n_threads, const std::string& kv_cache,
                             int64_t n_seq) {
                              return make_cpu_engine(d.file, *d.tensors, d.config, d.linears, context_length, n_threads,
                                                     kv_cache, n_seq);
                          });
}
