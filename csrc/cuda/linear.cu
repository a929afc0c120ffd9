// Weight upload (repacking) and linear(), which picks a matmul path:
// gemv.cu for a few rows (decode), gemm.cu otherwise (prefill).
#include <algorithm>
#include <cstring>
#include <string>

#include "matmul_paths.h"

namespace pyllm {
namespace cuda {

namespace {

int64_t stored_bytes_per_value(WeightFormat f) {
    switch (f) {
        case WeightFormat::F32: return 4;
        case WeightFormat::F16:
        case WeightFormat::BF16: return 2;
        default: return 1;  // int8; int4 rows are handled as half a byte per value
    }
}

}  // namespace

WeightArgs weight_args(const DeviceWeight& w) {
    return WeightArgs{w.format, w.data.as<uint8_t>(), w.scales.as<uint16_t>(), w.mins.as<uint16_t>(),
                      w.bias.as<float>(), w.rows, w.cols, w.padded_cols, w.row_stride,
                      (int32_t)w.group_size, (int32_t)w.n_groups};
}

bool can_stack(const WeightView& a, const WeightView& b) {
    return a.format == b.format && a.cols == b.cols && a.group_size == b.group_size;
}

DeviceWeight upload_weights(const std::vector<WeightView>& parts) {
    if (parts.empty()) throw std::invalid_argument("upload_weights: no weights");
    const WeightView& first = parts[0];
    DeviceWeight d;
    d.format = first.format;
    d.cols = first.cols;
    d.padded_cols = first.padded_cols();
    d.group_size = is_quantized(first.format) ? first.group_size : 0;
    d.n_groups = first.n_groups();
    const bool int4 = first.format == WeightFormat::Q4_SYM || first.format == WeightFormat::Q4_ASYM;
    d.row_stride = int4 ? d.padded_cols / 2 : d.padded_cols * stored_bytes_per_value(first.format);
    bool any_bias = false;
    for (const WeightView& p : parts) {
        validate_weight(p, "weight");
        if (!can_stack(first, p)) throw std::invalid_argument("upload_weights: stacked weights differ in layout");
        d.rows += p.rows;
        any_bias = any_bias || p.bias != nullptr;
    }
    if (d.cols > INT32_MAX || d.rows > INT32_MAX) throw std::invalid_argument("upload_weights: weight too large");

    std::vector<uint8_t> data((size_t)(d.rows * d.row_stride), 0);
    std::vector<uint16_t> scales, mins;
    std::vector<float> bias;
    int64_t row0 = 0;
    for (const WeightView& p : parts) {
        const int64_t src_bytes = p.row_bytes();
        const uint8_t* src = static_cast<const uint8_t*>(p.data);
        for (int64_t r = 0; r < p.rows; ++r)
            std::memcpy(data.data() + (row0 + r) * d.row_stride, src + r * src_bytes, (size_t)src_bytes);
        const int64_t n_scales = p.rows * p.n_groups();
        if (p.scales) scales.insert(scales.end(), p.scales, p.scales + n_scales);
        if (p.mins) mins.insert(mins.end(), p.mins, p.mins + n_scales);
        if (any_bias) {
            if (p.bias) bias.insert(bias.end(), p.bias, p.bias + p.rows);
            else bias.insert(bias.end(), (size_t)p.rows, 0.0f);
        }
        row0 += p.rows;
    }
    d.data.upload(data.data(), data.size());
    if (!scales.empty()) d.scales.upload(scales.data(), scales.size() * sizeof(uint16_t));
    if (!mins.empty()) d.mins.upload(mins.data(), mins.size() * sizeof(uint16_t));
    if (!bias.empty()) d.bias.upload(bias.data(), bias.size() * sizeof(float));
    return d;
}

void linear(const DeviceWeight& w, const float* x, int64_t M, float* y, int64_t ldy, bool accumulate,
            MatmulWorkspace& ws, cudaStream_t stream, MatmulPath path) {
    if (M <= 0) return;
    if (ldy < w.rows) throw std::invalid_argument("linear: output stride smaller than the output width");
    const WeightArgs args = weight_args(w);
    const bool use_gemv = path == MatmulPath::Gemv || (path == MatmulPath::Auto && M <= kMaxGemvRows);
    if (use_gemv) gemv(args, x, M, y, ldy, accumulate, stream);
    else gemm(args, x, M, y, ldy, accumulate, ws, stream);
}

}  // namespace cuda
}  // namespace pyllm
