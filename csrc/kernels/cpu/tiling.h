// Register tiling shared by the SIMD matmul variants: which (weight rows x
// activation rows) tile covers which part of the output.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
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

// Float-weight prefill on packed panels (the SIMD variants' M > 1 path): a
// register tile of Panels::kCols output columns (two vectors) x Panels::kRows
// activation rows broadcasts x[m, k] against the converted weights of each
// vector, so it needs the weights transposed to [k][n] and already in f32.
// Output columns [n_begin, n_end) go in groups of kGroupPanels panels, K in
// depth blocks of at most kMaxDepth (a panel, kMaxDepth * kCols floats, stays
// in L1 while every row tile sweeps it). Per (group, depth block) the weights
// are converted and transposed once (Panels::pack), amortised over all M rows;
// the tiles add each depth block into y, and the bias with the last one. A
// panel of at most kCols / 2 columns (the end of a chunk) uses a one-vector tile.
// Panels provides:
//   pack(w, n0, cols, k0, depth, panel)   panel: f32 [depth, kCols], w[n0 + c, k0 + k] at [k, c],
//                                         columns c >= cols zero
//   tile<Rows, Vectors>(panel, depth, x, K, y, N, cols, first, bias)   Rows in 1..kRows, Vectors 1 or 2
//       x: f32 [Rows, K] from the block's first column   y: f32 [Rows, N] from column n0
//       (only columns [0, cols) written)   bias: f32 [cols] or null
template <typename Panels, int Vectors, std::size_t... R>
constexpr auto panel_tiles(std::index_sequence<R...>) {  // Panels::tile<rows, Vectors>, indexed by rows - 1
    return std::array{&Panels::template tile<(int)R + 1, Vectors>...};
}

template <typename Panels>
void panel_matmul(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    constexpr int64_t kMaxDepth = 256, kGroupPanels = 4, C = Panels::kCols;
    const int64_t K = w.cols, N = w.rows;
    const int64_t depth_blocks = (K + kMaxDepth - 1) / kMaxDepth;
    const int64_t depth_block = (K + depth_blocks - 1) / depth_blocks;
    static constexpr auto rows = std::make_index_sequence<Panels::kRows>{};
    static constexpr std::array tiles = {panel_tiles<Panels, 1>(rows), panel_tiles<Panels, 2>(rows)};
    thread_local std::vector<float> storage;
    storage.resize((size_t)(kGroupPanels * depth_block * C + 16));
    float* panels = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(storage.data()), 64));
    for (int64_t g0 = n_begin; g0 < n_end; g0 += kGroupPanels * C) {
        const int64_t g_end = std::min(n_end, g0 + kGroupPanels * C);
        for (int64_t k0 = 0; k0 < K; k0 += depth_block) {
            const int64_t depth = std::min(depth_block, K - k0);
            const bool first = k0 == 0, last = k0 + depth == K;
            for (int64_t n0 = g0, p = 0; n0 < g_end; n0 += C, ++p)
                Panels::pack(w, n0, std::min(C, g_end - n0), k0, depth, panels + p * depth * C);
            for (int64_t n0 = g0, p = 0; n0 < g_end; n0 += C, ++p) {
                const int64_t cols = std::min(C, g_end - n0);
                const auto& tile = tiles[cols > C / 2 ? 1 : 0];
                const float* bias = last && w.bias ? w.bias + n0 : nullptr;
                for (int64_t m0 = 0; m0 < M; m0 += Panels::kRows)
                    tile[std::min<int64_t>(Panels::kRows, M - m0) - 1](panels + p * depth * C, depth, x + m0 * K + k0,
                                                                        K, y + m0 * N + n0, N, cols, first, bias);
            }
        }
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

// Whether any of x's rows [m0, m0 + rows) has hi codes in block b (QuantizedRows::has_hi; every row
// may have them where has_hi is null). Kernels skip hi's products where none has: the same bits.
inline bool rows_have_hi(const QuantizedRows& x, int64_t m0, int64_t rows, int64_t b) {
    if (x.has_hi == nullptr) return true;
    const int64_t n_blocks = x.padded_cols / kBlock;
    for (int64_t m = m0; m < m0 + rows; ++m)
        if (x.has_hi[m * n_blocks + b]) return true;
    return false;
}

// Calls fn(std::integral_constant<int, T>{}) with x's activation terms (QuantizedRows::terms, 1 or 2),
// for kernels that skip hi's products with one term.
template <class Fn>
void with_activation_terms(const QuantizedRows& x, Fn&& fn) {
    if (x.terms == 1) return fn(std::integral_constant<int, 1>{});
    return fn(std::integral_constant<int, 2>{});
}

}  // namespace pyllm
