// Register tiling shared by the SIMD matmul variants: which (weight rows x
// activation rows) tile covers which part of the output.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

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

// The activations' sum over each weight group (int4 offsets are per group):
// out[m, g] = sum of x.sum over the blocks of group g.   out: f32 [x.rows, n_groups]
inline void group_sums(const QuantizedRows& x, int64_t group_size, int64_t n_groups, std::vector<float>& out) {
    const int64_t n_blocks = x.padded_cols / kBlock, blocks_per_group = group_size / kBlock;
    out.assign((size_t)(x.rows * n_groups), 0.0f);
    for (int64_t m = 0; m < x.rows; ++m)
        for (int64_t b = 0; b < n_blocks; ++b) out[(size_t)(m * n_groups + b / blocks_per_group)] += x.sum[m * n_blocks + b];
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
