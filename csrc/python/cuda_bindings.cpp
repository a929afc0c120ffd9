// pyllm._cuda: the CUDA engine, and every CUDA kernel on numpy arrays (for the
// tests). Kernel functions upload their inputs, fill the device output with
// NaN bit patterns first (so an element a kernel fails to write shows up),
// run the kernel on the default stream and download the result.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cuda/cuda_engine.h"
#include "../cuda/kernels.h"
#include "../kernels/cpu/ops.h"
#include "common.h"

namespace py = pybind11;
using namespace pyllm;
using namespace pyllm::binding;
using pyllm::cuda::DeviceBuffer;

namespace {

void require_device() {
    if (cuda_device_count() == 0) throw std::runtime_error("no CUDA device is available");
}

template <typename T>
DeviceBuffer to_device(const T* host, int64_t n) {
    DeviceBuffer b;
    b.upload(host, (size_t)n * sizeof(T));
    return b;
}

// An f32 device buffer of n values, every byte 0xFF (a NaN pattern).
DeviceBuffer poisoned(int64_t n) {
    DeviceBuffer b((size_t)std::max<int64_t>(n, 1) * sizeof(float));
    PYLLM_CUDA_CHECK(cudaMemset(b.as<void>(), 0xFF, b.bytes()));
    return b;
}

py::array_t<float> to_host(const DeviceBuffer& b, std::vector<py::ssize_t> shape) {
    PYLLM_CUDA_CHECK(cudaDeviceSynchronize());
    py::array_t<float> out(shape);
    PYLLM_CUDA_CHECK(cudaMemcpy(out.mutable_data(), b.as<void>(), (size_t)out.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
    return out;
}

cuda::MatmulPath parse_path(const std::string& name) {
    if (name == "auto") return cuda::MatmulPath::Auto;
    if (name == "gemv") return cuda::MatmulPath::Gemv;
    if (name == "gemm") return cuda::MatmulPath::Gemm;
    bad("path must be 'auto', 'gemv' or 'gemm'");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "pyllm CUDA backend: kernels and the decoder engine on an NVIDIA GPU";
    register_exception_translator();

    m.def("device_count", &cuda_device_count, "Number of usable CUDA devices (0 without driver or GPU).");
    m.attr("MAX_GEMV_ROWS") = cuda::kMaxGemvRows;  // batches of up to this many rows take the GEMV path
    m.def(
        "device_name",
        [] {
            require_device();
            int device = 0;
            PYLLM_CUDA_CHECK(cudaGetDevice(&device));
            cudaDeviceProp prop;
            PYLLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
            return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
        },
        "Name and compute capability of the current device.");

    register_engine_class(m, [](int) { return 1; },
                          [](const ModelDescription& d, int64_t context_length, int, const std::string& kv_cache,
                             int64_t n_seq) {
                              if (n_seq != 1)
                                  bad("the CUDA engine holds one sequence (n_parallel=1); run batches on the CPU");
                              if (kv_cache != "auto" && kv_cache != "f32")
                                  bad("the CUDA engine keeps its KV cache in f32 (kv_cache='auto' or 'f32', not '" +
                                      kv_cache + "')");
                              return make_cuda_engine(*d.tensors, d.config, d.linears, context_length);
                          });

    m.def(
        "matmul",
        [](const F32Array& x, const std::string& format, const py::array& data, int64_t cols, int64_t group_size,
           const py::object& scales, const py::object& mins, const py::object& bias, const std::string& path,
           bool accumulate_onto_y, const py::object& y0) {
            // x: f32 [M, cols] -> f32 [M, rows] (+ y0 f32 [M, rows] when accumulating)
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, bias);
            if (x.ndim() != 2 || x.shape(1) != cols) bad("x must be 2-D with " + std::to_string(cols) + " columns");
            const int64_t M = x.shape(0);
            if (M <= 0) bad("x has no rows");
            const cuda::MatmulPath p = parse_path(path);
            require_device();
            cuda::DeviceWeight dw = cuda::upload_weights({w});
            DeviceBuffer dx = to_device(x.data(), x.size());
            DeviceBuffer dy = poisoned(M * w.rows);
            if (accumulate_onto_y) {
                F32Array start = y0.cast<F32Array>();
                expect_shape(start, {M, w.rows}, "y0");
                dy.upload(start.data(), (size_t)start.size() * sizeof(float));
            }
            cuda::MatmulWorkspace ws;
            cuda::linear(dw, dx.as<float>(), M, dy.as<float>(), w.rows, accumulate_onto_y, ws, nullptr, p);
            return to_host(dy, {M, w.rows});
        },
        py::arg("x"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none(), py::arg("bias") = py::none(),
        py::arg("path") = "auto", py::arg("accumulate") = false, py::arg("y0") = py::none(),
        "y = x @ W^T (+ bias) (+ y0) on the GPU; path 'gemv', 'gemm' or 'auto' (by row count).");

    m.def(
        "embedding",
        [](const py::array& id_array, const std::string& format, const py::array& data, int64_t cols,
           int64_t group_size, const py::object& scales, const py::object& mins) {
            // ids: int [M] -> f32 [M, cols]
            const I32Array ids = int32_values(id_array, "ids");
            WeightView w = weight_view(format, data, cols, group_size, scales, mins, py::none());
            if (ids.ndim() != 1) bad("ids must be 1-D");
            const int64_t M = ids.shape(0);
            for (int64_t i = 0; i < M; ++i)
                if (ids.data()[i] < 0 || ids.data()[i] >= w.rows) throw std::out_of_range("id outside the table");
            require_device();
            cuda::DeviceWeight dw = cuda::upload_weights({w});
            DeviceBuffer dids = to_device(ids.data(), M);
            DeviceBuffer out = poisoned(M * cols);
            cuda::embedding(dw, dids.as<int32_t>(), M, out.as<float>(), nullptr);
            return to_host(out, {M, cols});
        },
        py::arg("ids"), py::arg("format"), py::arg("data"), py::arg("cols"), py::arg("group_size") = 0,
        py::arg("scales") = py::none(), py::arg("mins") = py::none());

    m.def(
        "rmsnorm",
        [](const F32Array& x, const F32Array& weight, float eps) {
            // x: f32 [M, D], weight: f32 [D]
            if (x.ndim() != 2) bad("x must be 2-D");
            expect_shape(weight, {x.shape(1)}, "weight");
            const int64_t M = x.shape(0), D = x.shape(1);
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size()), dw = to_device(weight.data(), D), dy = poisoned(M * D);
            cuda::rmsnorm(dx.as<float>(), dw.as<float>(), M, D, eps, dy.as<float>(), nullptr);
            return to_host(dy, {M, D});
        },
        py::arg("x"), py::arg("weight"), py::arg("eps"));

    m.def(
        "swiglu",
        [](const F32Array& gate, const F32Array& up) {
            // gate, up: f32 [M, F] -> f32 [M, F]
            if (gate.ndim() != 2) bad("gate must be 2-D");
            expect_shape(up, {gate.shape(0), gate.shape(1)}, "up");
            const int64_t M = gate.shape(0), F = gate.shape(1);
            std::vector<float> gate_up((size_t)(2 * M * F));  // the engine's layout: [M, gate | up]
            for (int64_t r = 0; r < M; ++r) {
                std::copy_n(gate.data() + r * F, F, gate_up.begin() + 2 * r * F);
                std::copy_n(up.data() + r * F, F, gate_up.begin() + 2 * r * F + F);
            }
            require_device();
            DeviceBuffer dgu = to_device(gate_up.data(), 2 * M * F), out = poisoned(M * F);
            cuda::swiglu(dgu.as<float>(), M, F, out.as<float>(), nullptr);
            return to_host(out, {M, F});
        },
        py::arg("gate"), py::arg("up"));

    m.def(
        "row_norm",
        [](const F32Array& x, const F32Array& weight, const py::object& bias_obj, float eps, const py::object& y0_obj) {
            // x: f32 [M, D], weight (bias or None): f32 [D] -> LayerNorm (bias given) or RMSNorm of x,
            // plus y0 f32 [M, D] when given (the accumulate path)
            if (x.ndim() != 2) bad("x must be 2-D");
            const int64_t M = x.shape(0), D = x.shape(1);
            expect_shape(weight, {D}, "weight");
            F32Array bias, y0;
            if (!bias_obj.is_none()) {
                bias = bias_obj.cast<F32Array>();
                expect_shape(bias, {D}, "bias");
            }
            if (!y0_obj.is_none()) {
                y0 = y0_obj.cast<F32Array>();
                expect_shape(y0, {M, D}, "y0");
            }
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size()), dw = to_device(weight.data(), D), db;
            if (!bias_obj.is_none()) db = to_device(bias.data(), D);
            DeviceBuffer dy = y0_obj.is_none() ? poisoned(M * D) : to_device(y0.data(), M * D);
            cuda::row_norm(dx.as<float>(), dw.as<float>(), db.as<float>(), M, D, eps, dy.as<float>(),
                           !y0_obj.is_none(), nullptr);
            return to_host(dy, {M, D});
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y0") = py::none());

    m.def(
        "head_rmsnorm",
        [](const F32Array& x, const F32Array& weight, float eps) {
            // x: f32 [M, heads, D], weight: f32 [D] -> every head RMS-normalised
            if (x.ndim() != 3) bad("x must be [M, heads, head_dim]");
            const int64_t M = x.shape(0), H = x.shape(1), D = x.shape(2);
            expect_shape(weight, {D}, "weight");
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size()), dw = to_device(weight.data(), D);
            cuda::head_rmsnorm(dx.as<float>(), H * D, M, H, D, dw.as<float>(), eps, nullptr);
            return to_host(dx, {M, H, D});
        },
        py::arg("x"), py::arg("weight"), py::arg("eps"));

    m.def(
        "ffn_activation",
        [](const std::string& name, const py::object& gate_obj, const F32Array& up) {
            // gate (or None), up: f32 [M, F] -> act(gate) * up (the engine's gate | up rows), or act(up)
            const Activation act = parse_activation(name);
            if (up.ndim() != 2) bad("up must be 2-D");
            const int64_t M = up.shape(0), F = up.shape(1);
            const bool gated = !gate_obj.is_none();
            std::vector<float> in((size_t)((gated ? 2 : 1) * M * F));
            if (gated) {
                const F32Array gate = gate_obj.cast<F32Array>();
                expect_shape(gate, {M, F}, "gate");
                for (int64_t r = 0; r < M; ++r) {
                    std::copy_n(gate.data() + r * F, F, in.begin() + 2 * r * F);
                    std::copy_n(up.data() + r * F, F, in.begin() + 2 * r * F + F);
                }
            } else {
                std::copy_n(up.data(), M * F, in.begin());
            }
            require_device();
            DeviceBuffer din = to_device(in.data(), (int64_t)in.size()), out = poisoned(M * F);
            cuda::ffn_activation(act, gated, din.as<float>(), M, F, out.as<float>(), nullptr);
            return to_host(out, {M, F});
        },
        py::arg("activation"), py::arg("gate"), py::arg("up"));

    m.def(
        "softcap",
        [](const F32Array& x, float cap) {
            // x: f32 [n] -> cap * tanh(x / cap)
            if (x.ndim() != 1) bad("x must be 1-D");
            if (!(cap > 0.0f)) bad("cap must be positive");
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size());
            cuda::softcap(dx.as<float>(), x.size(), cap, nullptr);
            return to_host(dx, {x.shape(0)});
        },
        py::arg("x"), py::arg("cap"));

    m.def(
        "embedding_finish",
        [](const F32Array& x, float scale, const py::object& table_obj, const py::array& position_array) {
            // x: f32 [M, D] -> x * scale (+ table[positions[m]], table f32 [rows, D])
            if (x.ndim() != 2) bad("x must be 2-D");
            const int64_t M = x.shape(0), D = x.shape(1);
            const I32Array positions = int32_values(position_array, "positions");
            expect_shape(positions, {M}, "positions");
            F32Array table;
            int64_t rows = 0;
            if (!table_obj.is_none()) {
                table = table_obj.cast<F32Array>();
                if (table.ndim() != 2 || table.shape(1) != D) bad("table must be [rows, D]");
                rows = table.shape(0);
            }
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size()), dpos = to_device(positions.data(), M), dt;
            if (rows > 0) dt = to_device(table.data(), table.size());
            cuda::embedding_finish(dx.as<float>(), M, D, scale, dt.as<float>(), rows, dpos.as<int32_t>(), nullptr);
            return to_host(dx, {M, D});
        },
        py::arg("x"), py::arg("scale"), py::arg("table"), py::arg("positions"));

    m.def(
        "rope",
        [](const F32Array& x, const py::array& position_array, double theta, const py::object& scaling,
           int64_t rotary_dim) {
            // x: f32 [M, heads, D], positions: int [M] -> rotated copy of x (first rotary_dim dims; 0: all)
            const I32Array positions = int32_values(position_array, "positions");
            if (x.ndim() != 3) bad("x must be [M, heads, head_dim]");
            expect_shape(positions, {x.shape(0)}, "positions");
            const int64_t M = x.shape(0), H = x.shape(1), D = x.shape(2), R = rotary_dim > 0 ? rotary_dim : D;
            if (R > D || R % 2 != 0) bad("rotary_dim must be even and at most head_dim");
            const std::vector<float> inv_freq = rope_inv_freq(R, theta, parse_rope_scaling(scaling));
            require_device();
            DeviceBuffer dx = to_device(x.data(), x.size()), dpos = to_device(positions.data(), M),
                         dfreq = to_device(inv_freq.data(), (int64_t)inv_freq.size());
            cuda::rope(dx.as<float>(), H * D, M, H, D, R, dpos.as<int32_t>(), dfreq.as<float>(), nullptr);
            return to_host(dx, {M, H, D});
        },
        py::arg("x"), py::arg("positions"), py::arg("theta"), py::arg("scaling") = py::none(),
        py::arg("rotary_dim") = 0);

    m.def(
        "kv_write",
        [](const F32Array& k, const F32Array& v, const py::array& position_array, int64_t cache_len) {
            // k, v: f32 [M, Hkv, D] -> (k_cache, v_cache): f32 [Hkv, cache_len, D], NaN where not written
            const I32Array positions = int32_values(position_array, "positions");
            if (k.ndim() != 3) bad("k must be [M, kv_heads, head_dim]");
            const int64_t M = k.shape(0), Hkv = k.shape(1), D = k.shape(2);
            expect_shape(v, {M, Hkv, D}, "v");
            expect_shape(positions, {M}, "positions");
            for (int64_t i = 0; i < M; ++i)
                if (positions.data()[i] < 0 || positions.data()[i] >= cache_len) bad("position outside the cache");
            require_device();
            DeviceBuffer dk = to_device(k.data(), k.size()), dv = to_device(v.data(), v.size()),
                         dpos = to_device(positions.data(), M);
            DeviceBuffer kc = poisoned(Hkv * cache_len * D), vc = poisoned(Hkv * cache_len * D);
            cuda::kv_write(dk.as<float>(), dv.as<float>(), Hkv * D, M, Hkv, D, dpos.as<int32_t>(), kc.as<float>(),
                           vc.as<float>(), cache_len, nullptr);
            return py::make_tuple(to_host(kc, {Hkv, cache_len, D}), to_host(vc, {Hkv, cache_len, D}));
        },
        py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("cache_len"));

    m.def(
        "attention",
        [](const F32Array& q, const F32Array& k_cache, const F32Array& v_cache, int64_t pos0, float scale,
           int n_splits, int64_t window, float softcap, const py::object& alibi) {
            // q: f32 [M, H, D], k_cache/v_cache: f32 [Hkv, S, D]; query m sits at position pos0 + m.
            // n_splits: 0 = the engine's choice for this row count, 1 = no split, > 1 = that many pieces
            const auto [M, H, D, Hkv, S] = attention_shape(q, k_cache, v_cache, pos0);
            if (n_splits < 0) bad("n_splits must be >= 0");
            if (window < 0 || !(softcap >= 0.0f)) bad("window and softcap must be >= 0");
            F32Array slopes;
            if (!alibi.is_none()) {
                slopes = alibi.cast<F32Array>();
                expect_shape(slopes, {H}, "alibi");
            }
            require_device();
            cuda::AttentionSplit split;
            if (n_splits == 0 && M <= cuda::kMaxGemvRows) split = cuda::decode_split(H, S);
            else if (n_splits > 1) {
                const int64_t tiles = (pos0 + M + 31) / 32;
                const int64_t per = std::max<int64_t>(1, (tiles + n_splits - 1) / n_splits);
                split.split_len = (int32_t)(per * 32);
                split.n_splits = (int32_t)((tiles + per - 1) / per);
            }
            std::vector<int32_t> positions((size_t)M);
            for (int64_t m = 0; m < M; ++m) positions[(size_t)m] = (int32_t)(pos0 + m);
            DeviceBuffer dq = to_device(q.data(), q.size()), dk = to_device(k_cache.data(), k_cache.size()),
                         dv = to_device(v_cache.data(), v_cache.size()), dpos = to_device(positions.data(), M);
            DeviceBuffer out = poisoned(M * H * D), dslopes;
            cuda::AttentionShaping shaping;
            shaping.window = window;
            shaping.softcap = softcap;
            if (!alibi.is_none()) {
                dslopes = to_device(slopes.data(), H);
                shaping.alibi = dslopes.as<float>();
            }
            cuda::AttentionWorkspace ws;
            cuda::attention(dq.as<float>(), H * D, dk.as<float>(), dv.as<float>(), M, H, Hkv, D, S,
                            dpos.as<int32_t>(), scale, out.as<float>(), H * D, split, ws, nullptr, shaping);
            return to_host(out, {M, H, D});
        },
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos0"), py::arg("scale"),
        py::arg("n_splits") = 0, py::arg("window") = 0, py::arg("softcap") = 0.0f, py::arg("alibi") = py::none());
}
