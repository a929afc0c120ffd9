// The avxvnni kernel variant: the avx2 variant with its tiled int4/int8 block dot products on
// AVX-VNNI's 256-bit vpdpbusd (VEX-coded; Intel Alder Lake and later, AMD Zen 5), for CPUs that
// have AVX-VNNI but no AVX-512 (compiled with -mavx2 -mfma -mf16c -mavxvnni, run only when the CPU
// has them). Everything else (float weights, activation quantization, attention, element-wise) is
// the avx2 variant's.
//
// vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the four products to an int32
// lane: one instruction where maddubs + madd (+ add) took three, and no int16 stage. int4 nibbles
// are unsigned already; int8 weights are stored w ^ 0x80 = w + 128 (tiled_weights.cpp), so
// vpdpbusd gives dot(w, x) + 128 * sum(x): each accumulator starts at -128 times the block's sum
// of codes (QuantizedRows::code_sums), as the avx512 variant does. Every sum is an exact int32
// (at most 32 * 255 * 127 per term), so the results are the avx2 variant's, bit for bit.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "tiled_avx2.h"
#include "tiling.h"

namespace pyllm {
namespace {

struct VnniDots {
    // tiled_avx2.h's Dots policy: dot[m][h] = rows [8h, 8h + 8)'s 254 * (w . hi) + (w . lo).
    static constexpr bool kWideQ8 = false;  // vpdpbusd reads the stored int8 weights as they are

    template <WeightFormat F, int MR, int T>
    static inline void block(const uint8_t* wb, const BlockCodes& x, __m256i (*dot)[2]) {
        __m256i dot_hi[MR][2], dot_lo[MR][2];
        for (int m = 0; m < MR; ++m) {
            __m256i start_hi = _mm256_setzero_si256(), start_lo = _mm256_setzero_si256();
            if constexpr (F == WeightFormat::Q8) {  // the offset of w ^ 0x80
                start_hi = _mm256_set1_epi32(-128 * x.code_sums[m * x.sums_stride]);
                start_lo = _mm256_set1_epi32(-128 * x.code_sums[m * x.sums_stride + 1]);
            }
            dot_hi[m][0] = dot_hi[m][1] = start_hi;
            dot_lo[m][0] = dot_lo[m][1] = start_lo;
        }
        const __m256i low = _mm256_set1_epi8(0x0f);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
            __m256i quad[2];  // rows 0-7 and 8-15, 4 values each
            for (int h = 0; h < 2; ++h) {
                if constexpr (F == WeightFormat::Q8) {
                    quad[h] = _mm256_loadu_si256((const __m256i*)(wb + 64 * q + 32 * h));
                } else {  // vector q / 2 of each half: quad q in the low nibbles when q is even, else the high ones
                    const __m256i packed = _mm256_loadu_si256((const __m256i*)(wb + 64 * (q / 2) + 32 * h));
                    quad[h] = _mm256_and_si256(q % 2 ? _mm256_srli_epi16(packed, 4) : packed, low);
                }
            }
#pragma GCC unroll 2
            for (int m = 0; m < MR; ++m) {
                const __m256i xl = x.quad(m, 1, q);
                for (int h = 0; h < 2; ++h) {
                    if constexpr (T == 2) dot_hi[m][h] = _mm256_dpbusd_avx_epi32(dot_hi[m][h], quad[h], x.quad(m, 0, q));
                    dot_lo[m][h] = _mm256_dpbusd_avx_epi32(dot_lo[m][h], quad[h], xl);
                }
            }
        }
        const __m256i radix = _mm256_set1_epi32((int32_t)kResidualRadix);
        for (int m = 0; m < MR; ++m)  // one term: hi is zero, so 254 * 0 + lo's dot
            for (int h = 0; h < 2; ++h)
                dot[m][h] = T == 2 ? _mm256_add_epi32(_mm256_mullo_epi32(dot_hi[m][h], radix), dot_lo[m][h]) : dot_lo[m][h];
    }
};

void quant_weights_avxvnni(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    if (w.tiled.data == nullptr) return quant_weights_avx2(w, x, n_begin, n_end, y);  // as stored: the avx2 kernels
    with_quant_format(w.format, [&](auto f) { tiled_weights_typed<VnniDots, f.value>(w, x, n_begin, n_end, y); });
}

}  // namespace

const CpuKernels kAvxVnniKernels = {"avxvnni", float_weights_avx2, quant_weights_avxvnni, quantize_rows_avx2, true,
                                    attend_avx2, swiglu_avx2, round_to_f16_avx2};

}  // namespace pyllm
