// Register tiling shared by the SIMD matmul variants: which (weight rows x
// activation rows) tile covers which part of the output.
#pragma once
#include <cstdint>
#include <type_traits>

#include "../../core/weights.h"

namespace pyllm {

// Covers rows [0, M) x columns [n_begin, n_end) with NR x MR tiles and
// narrower tiles at the edges.
template <int NR, int MR, typename Tile>
void tile_over(int64_t M, int64_t n_begin, int64_t n_end, Tile&& tile) {
    int64_t n = n_begin;
    for (; n + NR <= n_end; n += NR) {
        int64_t m = 0;
        for (; m + MR <= M; m += MR) tile(std::integral_constant<int, NR>{}, std::integral_constant<int, MR>{}, m, n);
        for (; m < M; ++m) tile(std::integral_constant<int, NR>{}, std::integral_constant<int, 1>{}, m, n);
    }
    for (; n < n_end; ++n) {
        int64_t m = 0;
        for (; m + MR <= M; m += MR) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, MR>{}, m, n);
        for (; m < M; ++m) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}, m, n);
    }
}

// Calls fn(std::integral_constant<WeightFormat, F>{}) with F the quantized format f
// (Q8, Q4_SYM or Q4_ASYM), so kernels can be templates on the format.
template <typename Fn>
void with_quant_format(WeightFormat f, Fn&& fn) {
    switch (f) {
        case WeightFormat::Q8: return fn(std::integral_constant<WeightFormat, WeightFormat::Q8>{});
        case WeightFormat::Q4_SYM: return fn(std::integral_constant<WeightFormat, WeightFormat::Q4_SYM>{});
        default: return fn(std::integral_constant<WeightFormat, WeightFormat::Q4_ASYM>{});
    }
}

}  // namespace pyllm
