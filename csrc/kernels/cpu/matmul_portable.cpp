// Portable (any C++17 compiler, any CPU) matmul kernels. This is the fallback
// for CPUs without AVX2 and the model the SIMD variants follow step by step:
// integer dot products per 32-value block, then one float multiply-add per
// block with the weight group's scale (and min) and the activation block's scale.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../../core/numeric.h"
#include "kernels.h"

namespace pyllm {
namespace {

float load_weight(const WeightView& w, int64_t n, int64_t k) {
    switch (w.format) {
        case WeightFormat::F16: return f16_to_f32(static_cast<const uint16_t*>(w.data)[n * w.cols + k]);
        case WeightFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(w.data)[n * w.cols + k]);
        default: return static_cast<const float*>(w.data)[n * w.cols + k];
    }
}

void float_weights(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t K = w.cols, N = w.rows;
    for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t m = 0; m < M; ++m) {
            const float* xr = x + m * K;
            float acc = 0.0f;
            if (w.format == WeightFormat::F32) {
                const float* wr = static_cast<const float*>(w.data) + n * K;
                for (int64_t k = 0; k < K; ++k) acc += wr[k] * xr[k];
            } else {
                for (int64_t k = 0; k < K; ++k) acc += load_weight(w, n, k) * xr[k];
            }
            y[m * N + n] = acc + (w.bias ? w.bias[n] : 0.0f);
        }
    }
}

// Integer dot product of one 32-value weight block with one activation block
// (both int8 terms combined: kResidualRadix * dot(w, hi) + dot(w, lo)).
// Q4 values are the raw nibbles 0..15; offsets are applied by the caller.
int32_t block_dot(const WeightView& w, const uint8_t* wrow, int64_t block, const int8_t* hi, const int8_t* lo) {
    int32_t acc_hi = 0, acc_lo = 0;
    if (w.format == WeightFormat::Q8) {
        const int8_t* wq = reinterpret_cast<const int8_t*>(wrow) + block * kBlock;
        const int64_t len = std::min<int64_t>(kBlock, w.cols - block * kBlock);
        for (int64_t i = 0; i < len; ++i) acc_hi += (int32_t)wq[i] * hi[i], acc_lo += (int32_t)wq[i] * lo[i];
    } else {
        const uint8_t* packed = wrow + block * (kBlock / 2);
        for (int64_t i = 0; i < kBlock / 2; ++i) {
            const int32_t low = packed[i] & 0x0f, high = packed[i] >> 4;
            acc_hi += low * hi[i] + high * hi[i + kBlock / 2];
            acc_lo += low * lo[i] + high * lo[i + kBlock / 2];
        }
    }
    return kResidualRadix * acc_hi + acc_lo;
}

void quant_weights(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t N = w.rows, n_blocks = x.padded_cols / kBlock, n_groups = w.n_groups();
    const int64_t blocks_per_group = w.group_size / kBlock;
    for (int64_t n = n_begin; n < n_end; ++n) {
        const uint8_t* wrow = static_cast<const uint8_t*>(w.data) + n * w.row_bytes();
        const uint16_t* scales = w.scales + n * n_groups;
        for (int64_t m = 0; m < x.rows; ++m) {
            const int8_t* hi = x.hi + m * x.padded_cols;
            const int8_t* lo = x.lo + m * x.padded_cols;
            const float* step = x.step + m * n_blocks;
            const float* xsum = x.sum + m * n_blocks;
            float acc = 0.0f;
            for (int64_t b = 0; b < n_blocks; ++b) {
                const int64_t g = b / blocks_per_group;
                const float scale = f16_to_f32(scales[g]);
                const float dot = (float)block_dot(w, wrow, b, hi + b * kBlock, lo + b * kBlock);
                acc += scale * step[b] * dot;
                if (w.format == WeightFormat::Q4_SYM) acc -= 8.0f * scale * xsum[b];
                if (w.format == WeightFormat::Q4_ASYM) acc += f16_to_f32(w.mins[n * n_groups + g]) * xsum[b];
            }
            y[m * N + n] = acc + (w.bias ? w.bias[n] : 0.0f);
        }
    }
}

}  // namespace

const CpuKernels kPortableKernels = {"portable", float_weights, quant_weights, quantize_rows_portable, false, attend_portable,
                                    swiglu_portable, round_to_f16_portable};

// The largest |x| of x f32 [len], and whether all of x is finite (the absmax is then exact).
static float block_absmax(const float* x, int64_t len, bool& finite) {
    float amax = 0.0f;
    finite = true;
    for (int64_t i = 0; i < len; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
        finite = finite && std::isfinite(x[i]);
    }
    return amax;
}

float outlier_threshold(const float* x, int64_t cols, float outlier_factor) {
    if (outlier_factor <= 0.0f) return 0.0f;
    const int64_t n_blocks = (cols + kBlock - 1) / kBlock;
    float total = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
        bool finite;
        const float amax = block_absmax(x + b * kBlock, std::min<int64_t>(kBlock, cols - b * kBlock), finite);
        if (finite) total += amax;
    }
    return outlier_factor * (total / (float)n_blocks);
}

void quantize_rows_portable(const float* x, int64_t cols, int64_t row_begin, int64_t row_end, const QuantizedRows& out) {
    const int64_t n_blocks = out.padded_cols / kBlock;
    for (int64_t m = row_begin; m < row_end; ++m) {
        const float* xr = x + m * cols;
        int8_t* hi = out.hi + m * out.padded_cols;
        int8_t* lo = out.lo + m * out.padded_cols;
        const float threshold = out.outlier_blocks_only() ? outlier_threshold(xr, cols, out.outlier_factor) : 0.0f;
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t start = b * kBlock, len = std::min<int64_t>(kBlock, cols - start);
            bool finite;
            const float amax = block_absmax(xr + start, len, finite);
            if (!finite) {  // NaN or infinity: codes 0 and a NaN step, so every output of the row is NaN
                std::fill(hi + start, hi + start + kBlock, (int8_t)0);
                std::fill(lo + start, lo + start + kBlock, (int8_t)0);
                out.step[m * n_blocks + b] = out.sum[m * n_blocks + b] = std::numeric_limits<float>::quiet_NaN();
                continue;
            }
            // x = step * (254 * hi + lo): hi = round(x / (254 step)) in [-127, 127] and the
            // remainder, at most 127 steps in magnitude, as lo; one term (terms 1, or a block that is
            // no outlier, weights.h): x = step * lo, step = absmax / 127, hi zero
            bool one_term = out.terms == 1 || !(amax > threshold);
            float step = 0.0f, sum = 0.0f, magnitude = 0.0f;
            const auto codes = [&] {
                const int32_t radix = one_term ? 1 : kResidualRadix;  // steps in absmax / 127
                step = amax / (127.0f * (float)radix);
                // 1 / step in double: in float it overflows for blocks below ~1e-34
                const double inverse = amax > 0.0f ? (127.0 * radix) / (double)amax : 0.0;
                sum = magnitude = 0.0f;
                for (int64_t i = 0; i < kBlock; ++i) {
                    const float units = i < len ? (float)((double)xr[start + i] * inverse) : 0.0f;  // x / step
                    int32_t h = one_term ? 0 : (int32_t)std::nearbyint(units / (float)kResidualRadix);
                    h = std::max(-127, std::min(127, h));
                    int32_t l = (int32_t)std::nearbyint(units - (float)(h * kResidualRadix));
                    l = std::max(-127, std::min(127, l));
                    hi[start + i] = (int8_t)h;
                    lo[start + i] = (int8_t)l;
                    sum += (float)(h * kResidualRadix + l);  // integers below 2^24: exact
                    magnitude += (float)std::abs(h * kResidualRadix + l);
                }
            };
            codes();
            if (one_term && out.outlier_blocks_only() && magnitude < (float)out.min_code_sum && amax > 0.0f) {
                one_term = false;  // a block one value dwarfs: two terms
                codes();
            }
            out.step[m * n_blocks + b] = step;
            out.sum[m * n_blocks + b] = step * sum;
        }
    }
}

}  // namespace pyllm
