// CPU matrix-multiply kernels: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).
//
// Each instruction-set variant (portable C++, AVX2+FMA) fills one MatmulKernels
// table; dispatch.cpp picks the table once from what the CPU supports, and the
// tests can force the portable one. A variant computes output columns
// [n_begin, n_end) for all rows, so the caller splits work across threads by n.
#pragma once
#include <cstdint>

#include "../../core/weights.h"

namespace pyllm {

struct MatmulKernels {
    const char* name;
    // F32 / F16 / BF16 weights, float activations.
    //   x: f32 [M, w.cols]   y: f32 [M, w.rows] (only columns [n_begin, n_end) written)
    void (*float_weights)(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end,
                          float* y);
    // Q8 / Q4 weights, activations quantized by quantize_rows.
    //   y: f32 [M, w.rows] (only columns [n_begin, n_end) written)
    void (*quant_weights)(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end,
                          float* y);
};

extern const MatmulKernels kPortableMatmul;
#if defined(PYLLM_HAVE_AVX2)
extern const MatmulKernels kAvx2Matmul;
#endif

// Quantizes rows of x into two int8 terms per value in blocks of 32 (see
// QuantizedRows), zero-padding each row to out.padded_cols.
//   x: f32 [row_end - row_begin rows from row_begin, cols], row stride `cols`
void quantize_rows(const float* x, int64_t cols, int64_t row_begin, int64_t row_end, const QuantizedRows& out);

// The table in use. Chosen at first use: AVX2 when the CPU has AVX2, FMA and
// F16C (and the build has the code), else portable.
const MatmulKernels& active_matmul();
// Forces a variant by name ("portable", "avx2", or "auto"); throws for a
// variant this build or this CPU cannot run.
void select_matmul(const char* name);
// Whether this CPU can run the AVX2 variant.
bool cpu_has_avx2();

}  // namespace pyllm
