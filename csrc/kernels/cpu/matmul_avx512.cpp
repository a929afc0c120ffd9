







// AVX-512 VNNI matmul kernel for quantized weights (compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c, run only when the CPU
// has them). Same arithmetic as matmul_portable.cpp, arranged for vpdpbusd:
//
// One 512-bit operand holds an activation block's two int8 terms side by side,
// [hi (32 bytes) | lo (32 bytes)], and the weight block twice, so a single
// vpdpbusd gives dot(w, hi) in lanes 0-7 and dot(w, lo) in lanes 8-15; one
// float multiply-add with [254 * step x 8 | step x 8] * scale folds both terms.
// vpdpbusd multiplies unsigned by signed bytes: int4 nibbles are unsigned
// already; int8 weights are offset by 128 (w ^ 0x80), and the 128 * sum(x)
// this adds is taken off exactly, in integers: the dot starts from
// -vpdpbusd(0x80.., x), computed once per activation block.
//
// Int4 offsets are per group, not per block: sum_k w_k x_k = sum_b scale_g(b)
// dot_b + sum_g shift_g * xsum_g, with shift = min (asym) or -8 scale (sym),
// and xsum_g the activations' sum over the group.
// Register tiles: 8 weight rows x 1 activation row (decode), 4 x 4 (prefill).
//
// Float weights (F32 / F16 / BF16): decode (M = 1) one weight row at a time
// (float_rows_decode), 2-11 rows as AVX2's row tiles; prefill on packed
// panels (tiling.h panel_matmul): a tile of 32 output columns (2 vectors) x 12
// activation rows holds 24 accumulators, and each depth step is 2 panel loads,
// 12 broadcasts of x and 24 FMAs (16 columns x 12 rows where a chunk ends in a
// half panel, e.g. the chunks of 48 columns a 576-wide output is split into).
//
// Faster still, weights tiled at load (tiled_weights.cpp: 16 rows side by side,
// each 32-bit lane of a 64-byte vector holding 4 consecutive values of one row).
// A block then costs 16 vpdpbusd (8 quads x 2 activation terms, each quad's 4
// activation bytes broadcast to all lanes; 8 with one term, QuantizedRows::terms)
// for 16 rows, and the float work (convert, scale, accumulate) is done once for
// 16 rows instead of per row.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "tiling.h"

namespace pyllm {
namespace {

template <WeightFormat F>
inline __m512i load_block(const uint8_t* wrow, int64_t block, int64_t cols) {
    if constexpr (F == WeightFormat::Q8) {
        const int64_t start = block * kBlock, len = std::min<int64_t>(kBlock, cols - start);
        const __m256i q = len == kBlock ? _mm256_loadu_si256((const __m256i*)(wrow + start))
                                        : _mm256_maskz_loadu_epi8((__mmask32)((1ull << len) - 1), wrow + start);
        return _mm512_xor_si512(_mm512_broadcast_i64x4(q), _mm512_set1_epi8((char)0x80));
    } else {
        // 16 packed bytes in all four 128-bit lanes; lanes 1 and 3 shifted to their high nibbles
        const __m512i packed = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(wrow + block * (kBlock / 2))));
        const __m512i nibbles = _mm512_srlv_epi64(packed, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
        return _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0f));
    }
}

// The int4 group offsets' factor: min for asym, -8 scale for sym.
template <WeightFormat F>
inline __m512 group_shift(const WeightView& w, int64_t row, int64_t g, __mmask16 mask) {
    const int64_t at = row * w.n_groups() + g;
    if constexpr (F == WeightFormat::Q4_ASYM) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.mins + at));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.scales + at)), _mm512_set1_ps(-8.0f));
}

// sum_g shift[row, g] * xsum[g]   xsum: f32 [n_groups]
template <WeightFormat F>
inline float offset(const WeightView& w, int64_t row, const float* xsum) {
    if constexpr (F == WeightFormat::Q8) return 0.0f;
    const int64_t n_groups = w.n_groups();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g += 16) {
        const __mmask16 mask = (__mmask16)(n_groups - g >= 16 ? 0xffff : (1u << (n_groups - g)) - 1);
        acc = _mm512_fmadd_ps(group_shift<F>(w, row, g, mask), _mm512_maskz_loadu_ps(mask, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// Per-call inputs shared by all tiles: each row's group scales as floats and each
// activation row's per-group sums.
struct Prepared {
    const float* scales;  // f32 [w.rows, n_groups] for the rows [n_begin, n_end) (row n at n - n_begin)
    const float* xsum;    // f32 [x.rows, n_groups]
    int64_t n_begin;
};

template <WeightFormat F, int NR, int MR>
void quant_tile(const WeightView& w, const QuantizedRows& x, const Prepared& prep, int64_t m0, int64_t n0, float* y) {
    const int64_t N = w.rows, n_blocks = x.padded_cols / kBlock, n_groups = w.n_groups();
    const int64_t blocks_per_group = w.group_size / kBlock, row_bytes = w.row_bytes();
    const __m512 radix = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps((float)kResidualRadix), _mm512_set1_ps(1.0f));
    const uint8_t* wrows[NR];
    const float* scales[NR];
    for (int r = 0; r < NR; ++r) {
        wrows[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * row_bytes;
        scales[r] = prep.scales + (n0 + r - prep.n_begin) * n_groups;
    }
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();

    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t g = b / blocks_per_group;
        __m512i xq[MR], dot_start[MR];
        __m512 xstep[MR];
        for (int m = 0; m < MR; ++m) {
            const int64_t at = (m0 + m) * x.padded_cols + b * kBlock;
            xq[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(x.hi + at))),
                                       _mm256_loadu_si256((const __m256i*)(x.lo + at)), 1);
            xstep[m] = _mm512_mul_ps(radix, _mm512_set1_ps(x.step[(m0 + m) * n_blocks + b]));
            dot_start[m] = _mm512_setzero_si512();
            if constexpr (F == WeightFormat::Q8)  // -128 * sum(x), lane by lane as the dot sums
                dot_start[m] = _mm512_sub_epi32(
                    dot_start[m], _mm512_dpbusd_epi32(dot_start[m], _mm512_set1_epi8((char)0x80), xq[m]));
        }
        for (int r = 0; r < NR; ++r) {
            const __m512i wq = load_block<F>(wrows[r], b, w.cols);
            const __m512 scale = _mm512_set1_ps(scales[r][g]);
            for (int m = 0; m < MR; ++m) {
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(dot_start[m], wq, xq[m]));
                acc[r][m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(xstep[m], scale), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m)
            y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) +
                                       offset<F>(w, n0 + r, prep.xsum + (m0 + m) * n_groups) +
                                       (w.bias ? w.bias[n0 + r] : 0.0f);
}


// ---- tiled weights --------------------------------------------------------------

// Several tiles at once (tiled_tiles) for calls of at least kMultiMinRows activation rows (prefill):
// register tiles of kMultiRows rows x multi_tiles<F> tiles. Microbenchmark, one Zen 5 core, 3072 x 576
// from cache, 8 and 64 rows, us, against the one-tile kernel's 4 rows x 1 tile: int4 2 x 2 75.6 / 617
// against 102.9 / 809; int8 2 x 3 80 / 596 against 100.6 / 806; 1 x 2, 1 x 4, 2 x 4, 3 x 2 and 4 x 2
// slower. SmolLM2 prefill (2 threads, alternating builds): int4 1825 -> 2192, int8 1779 -> 2320
// tok/s; the 1.1B shapes' int4 225 -> 303. Below 16 rows (decoding several sequences) the one-tile
// kernel measured faster inside the engine (8 rows: 6.7 against 7.2 ms a step; 4 rows from DRAM, 32
// against 44 us for 3072 x 576), though not in the microbenchmark at 8 rows from cache.
constexpr int kMultiRows = 2, kMultiMinRows = 16;
template <WeightFormat F>
constexpr int multi_tiles() { return F == WeightFormat::Q8 ? 3 : 2; }

// Per-call activation facts the tiled kernel needs besides the codes.
struct TiledPrep {
    const float* xsum;       // f32 [x.rows, n_groups]: sum of the activations over each group (int4)
    const int32_t* code_sums;  // int32 [x.rows, n_blocks, 2]: sums of the hi / lo codes per block (int8)
};

// Rows [tile * 16, tile * 16 + 16) x activation rows [m0, m0 + MR), written where inside [n_begin, n_end).
// T: the activation terms (QuantizedRows::terms); with one, hi is zero and its dot products are skipped,
// and the result is the same bits as T = 2 gives on those rows (0 * 254 + lo's dot, exact in float).
template <WeightFormat F, int MR, int T>
void tiled_tile(const WeightView& w, const TiledLayout& t, const QuantizedRows& x, const TiledPrep& prep, int64_t m0,
                int64_t tile, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t n_groups = w.n_groups(), n_blocks = t.blocks, blocks_per_group = w.group_size / kBlock;
    const uint8_t* wt = w.tiled.data + tile * n_blocks * t.block_bytes;
    const bool prefetch = m0 == 0;  // the first pass over a tile, as the AVX2 kernel
    const __m512 radix = _mm512_set1_ps((float)kResidualRadix);
    __m512 acc[MR], off[MR];
    for (int m = 0; m < MR; ++m) acc[m] = off[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t at = (tile * n_groups + g) * kTileRows;
        const __m512 scale = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(w.tiled.scales + at)));
        if constexpr (F != WeightFormat::Q8) {
            const __m512 shift = F == WeightFormat::Q4_ASYM
                                     ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(w.tiled.mins + at)))
                                     : _mm512_mul_ps(scale, _mm512_set1_ps(-8.0f));
            for (int m = 0; m < MR; ++m)
                off[m] = _mm512_fmadd_ps(shift, _mm512_set1_ps(prep.xsum[(m0 + m) * n_groups + g]), off[m]);
        }
        const int64_t b_end = std::min(n_blocks, (g + 1) * blocks_per_group);
        for (int64_t b = g * blocks_per_group; b < b_end; ++b) {
            const uint8_t* wb = wt + b * t.block_bytes;
            if (prefetch) prefetch_weights_ahead(wb, t.block_bytes);
            __m512i quads[8];
            if constexpr (F == WeightFormat::Q8) {
                for (int q = 0; q < 8; ++q) quads[q] = _mm512_load_si512(wb + 64 * q);
            } else {
                const __m512i low = _mm512_set1_epi8(0x0f);
                for (int j = 0; j < 4; ++j) {
                    const __m512i packed = _mm512_load_si512(wb + 64 * j);
                    quads[2 * j] = _mm512_and_si512(packed, low);
                    quads[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                }
            }
            // with_hi false: the MR rows' hi codes of the block are all zero, and their products are
            // skipped (0 * 254 + lo's dot: the same bits). One branch per block and tile: deciding per
            // row cost the one-term rows ~20% (SmolLM2, 8 sequences a step, Zen 4)
            const auto block_rows = [&](auto with_hi) {
                for (int m = 0; m < MR; ++m) {
                    const int8_t* hi = x.hi + (m0 + m) * x.padded_cols + b * kBlock;
                    const int8_t* lo = x.lo + (m0 + m) * x.padded_cols + b * kBlock;
                    // one row: two chains per term, so the adds overlap; several rows: their chains
                    // overlap already, and one chain per term saves the adds that join two (3072 x 576
                    // int4 from cache, one Zen 5 core: 8 rows 102-107 -> 95-99 us, 4 rows 52-54 -> 48-49;
                    // one row 3% slower with one chain). Integer sums: the same bits either way.
                    constexpr int kChains = MR == 1 ? 2 : 1;
                    __m512i dot_hi[kChains], dot_lo[kChains];
                    for (int c = 0; c < kChains; ++c) dot_hi[c] = dot_lo[c] = _mm512_setzero_si512();
                    if constexpr (F == WeightFormat::Q8) {
                        const int32_t* sums = prep.code_sums + ((m0 + m) * n_blocks + b) * 2;
                        dot_hi[0] = _mm512_set1_epi32(-128 * sums[0]);  // the offset of w ^ 0x80
                        dot_lo[0] = _mm512_set1_epi32(-128 * sums[1]);
                    }
                    for (int q = 0; q < 8; ++q) {
                        int32_t h, l;
                        std::memcpy(&l, lo + 4 * q, 4);
                        if constexpr (with_hi.value) {
                            std::memcpy(&h, hi + 4 * q, 4);
                            dot_hi[q % kChains] = _mm512_dpbusd_epi32(dot_hi[q % kChains], quads[q], _mm512_set1_epi32(h));
                        }
                        dot_lo[q % kChains] = _mm512_dpbusd_epi32(dot_lo[q % kChains], quads[q], _mm512_set1_epi32(l));
                    }
                    if constexpr (kChains == 2) {
                        dot_hi[0] = _mm512_add_epi32(dot_hi[0], dot_hi[1]);
                        dot_lo[0] = _mm512_add_epi32(dot_lo[0], dot_lo[1]);
                    }
                    const __m512 both = with_hi.value ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi[0]), radix,
                                                                        _mm512_cvtepi32_ps(dot_lo[0]))
                                                      : _mm512_cvtepi32_ps(dot_lo[0]);
                    const __m512 factor = _mm512_mul_ps(scale, _mm512_set1_ps(x.step[(m0 + m) * n_blocks + b]));
                    acc[m] = _mm512_fmadd_ps(both, factor, acc[m]);
                }
            };
            if (T == 2 && rows_have_hi(x, m0, MR, b)) block_rows(std::true_type{});
            else block_rows(std::false_type{});
        }
    }
    const int64_t row0 = tile * kTileRows;
    const int64_t lo_row = std::max(n_begin, row0), hi_row = std::min(n_end, row0 + kTileRows);
    const __mmask16 keep = (__mmask16)(((1u << (hi_row - row0)) - 1) & ~((1u << (lo_row - row0)) - 1));
    for (int m = 0; m < MR; ++m) {
        __m512 out = _mm512_add_ps(acc[m], off[m]);
        if (w.bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(keep, w.bias + row0));
        _mm512_mask_storeu_ps(y + (m0 + m) * w.rows + row0, keep, out);
    }
}

// NT tiles (rows [tile * 16, (tile + NT) * 16)) x activation rows [m0, m0 + MR): each activation
// quad broadcast feeds NT tiles' vpdpbusd (the one-tile kernel issues a broadcast per vpdpbusd, and
// the broadcasts, not the dot products, limited it). Each output is the same float operations in
// the same order as tiled_tile's (integer block dots, one multiply-add per block, the int4 offsets
// summed apart and added last), so a row's bits never depend on which kernel ran it: not on the
// rows beside it in the batch, nor on the thread count. tiled_tile stays for fewer rows: run as
// tiled_tiles<F, MR, 1> instead, SmolLM2 int8 decode lost 15% (its quads held across the rows and
// two dot chains per term suit one row). The NT tiles lie inside the matrix; rows outside
// [n_begin, n_end) are not written.
template <WeightFormat F, int MR, int NT, int T>
void tiled_tiles(const WeightView& w, const TiledLayout& t, const QuantizedRows& x, const TiledPrep& prep, int64_t m0,
                int64_t tile, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t n_groups = w.n_groups(), n_blocks = t.blocks, blocks_per_group = w.group_size / kBlock;
    const int64_t tile_bytes = n_blocks * t.block_bytes;
    const uint8_t* wt = w.tiled.data + tile * tile_bytes;
    const __m512 radix = _mm512_set1_ps((float)kResidualRadix);
    __m512 acc[NT][MR], off[NT][MR];  // kept apart (and added last) as in tiled_tile: the same bits
    for (int n = 0; n < NT; ++n)
        for (int m = 0; m < MR; ++m) acc[n][m] = off[n][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        __m512 scale[NT];
        for (int n = 0; n < NT; ++n) {
            const int64_t at = ((tile + n) * n_groups + g) * kTileRows;
            scale[n] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(w.tiled.scales + at)));
            if constexpr (F != WeightFormat::Q8) {
                const __m512 shift = F == WeightFormat::Q4_ASYM
                                         ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(w.tiled.mins + at)))
                                         : _mm512_mul_ps(scale[n], _mm512_set1_ps(-8.0f));
                for (int m = 0; m < MR; ++m)
                    off[n][m] = _mm512_fmadd_ps(shift, _mm512_set1_ps(prep.xsum[(m0 + m) * n_groups + g]), off[n][m]);
            }
        }
        const int64_t b_end = std::min(n_blocks, (g + 1) * blocks_per_group);
        for (int64_t b = g * blocks_per_group; b < b_end; ++b) {
            __m512i dot_hi[NT][MR], dot_lo[NT][MR];
            for (int m = 0; m < MR; ++m) {
                __m512i start_hi = _mm512_setzero_si512(), start_lo = _mm512_setzero_si512();
                if constexpr (F == WeightFormat::Q8) {
                    const int32_t* sums = prep.code_sums + ((m0 + m) * n_blocks + b) * 2;
                    start_hi = _mm512_set1_epi32(-128 * sums[0]);  // the offset of w ^ 0x80
                    start_lo = _mm512_set1_epi32(-128 * sums[1]);
                }
                for (int n = 0; n < NT; ++n) dot_hi[n][m] = start_hi, dot_lo[n][m] = start_lo;
            }
            if (m0 == 0)  // the first pass over the tiles, as tiled_tile
                for (int n = 0; n < NT; ++n) prefetch_weights_ahead(wt + n * tile_bytes + b * t.block_bytes, t.block_bytes);
            const int8_t* hi = x.hi + m0 * x.padded_cols + b * kBlock;
            const int8_t* lo = x.lo + m0 * x.padded_cols + b * kBlock;
            // with_hi false: the MR rows' hi codes of the block are all zero, and their products are
            // skipped (0 * 254 + lo's dot: the same bits)
            const auto block_dots = [&](auto with_hi) {
                for (int q = 0; q < 8; ++q) {
                    __m512i quad[NT];
                    for (int n = 0; n < NT; ++n) {
                        const uint8_t* wb = wt + n * tile_bytes + b * t.block_bytes;
                        if constexpr (F == WeightFormat::Q8) {
                            quad[n] = _mm512_load_si512(wb + 64 * q);
                        } else {  // vector q / 2: quad q in the low nibbles when q is even, else the high ones
                            const __m512i packed = _mm512_load_si512(wb + 64 * (q / 2));
                            quad[n] = _mm512_and_si512(q % 2 ? _mm512_srli_epi16(packed, 4) : packed, _mm512_set1_epi8(0x0f));
                        }
                    }
                    for (int m = 0; m < MR; ++m) {
                        int32_t h, l;
                        std::memcpy(&l, lo + m * x.padded_cols + 4 * q, 4);
                        const __m512i lv = _mm512_set1_epi32(l);
                        if constexpr (with_hi.value) {  // each tile's hi and lo products side by side
                            std::memcpy(&h, hi + m * x.padded_cols + 4 * q, 4);
                            const __m512i hv = _mm512_set1_epi32(h);
                            for (int n = 0; n < NT; ++n) {
                                dot_hi[n][m] = _mm512_dpbusd_epi32(dot_hi[n][m], quad[n], hv);
                                dot_lo[n][m] = _mm512_dpbusd_epi32(dot_lo[n][m], quad[n], lv);
                            }
                        } else {
                            for (int n = 0; n < NT; ++n) dot_lo[n][m] = _mm512_dpbusd_epi32(dot_lo[n][m], quad[n], lv);
                        }
                    }
                }
                for (int m = 0; m < MR; ++m) {
                    const __m512 step = _mm512_set1_ps(x.step[(m0 + m) * n_blocks + b]);
                    for (int n = 0; n < NT; ++n) {
                        const __m512 both = with_hi.value ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi[n][m]), radix,
                                                                            _mm512_cvtepi32_ps(dot_lo[n][m]))
                                                          : _mm512_cvtepi32_ps(dot_lo[n][m]);
                        acc[n][m] = _mm512_fmadd_ps(both, _mm512_mul_ps(scale[n], step), acc[n][m]);
                    }
                }
            };
            if (T == 2 && rows_have_hi(x, m0, MR, b)) block_dots(std::true_type{});
            else block_dots(std::false_type{});
        }
    }
    for (int n = 0; n < NT; ++n) {
        const int64_t row0 = (tile + n) * kTileRows;
        const int64_t lo_row = std::max(n_begin, row0), hi_row = std::min(n_end, row0 + kTileRows);
        if (hi_row <= lo_row) continue;
        const __mmask16 keep = (__mmask16)(((1u << (hi_row - row0)) - 1) & ~((1u << (lo_row - row0)) - 1));
        for (int m = 0; m < MR; ++m) {
            __m512 out = _mm512_add_ps(acc[n][m], off[n][m]);
            if (w.bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(keep, w.bias + row0));
            _mm512_mask_storeu_ps(y + (m0 + m) * w.rows + row0, keep, out);
        }
    }
}

template <WeightFormat F, int T>
void tiled_weights_terms(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    const TiledLayout t = tiled_layout(w);
    const int64_t n_groups = w.n_groups();
    thread_local std::vector<float> xsum;
    if constexpr (F != WeightFormat::Q8) group_sums(x, w.group_size, n_groups, xsum);
    const TiledPrep prep{xsum.data(), x.code_sums};
    int64_t tile = n_begin / kTileRows;
    constexpr int NT = multi_tiles<F>();
    if (x.rows >= kMultiMinRows)
        for (; (tile + NT - 1) * kTileRows < n_end; tile += NT) {
            int64_t m = 0;
            for (; m + kMultiRows <= x.rows; m += kMultiRows) tiled_tiles<F, kMultiRows, NT, T>(w, t, x, prep, m, tile, n_begin, n_end, y);
            for (; m < x.rows; ++m) tiled_tiles<F, 1, NT, T>(w, t, x, prep, m, tile, n_begin, n_end, y);
        }
    for (; tile * kTileRows < n_end; ++tile) {
        int64_t m = 0;
        // int8 with 8-15 rows (several sequences decoding): 8 rows a pass read each tile's quads once
        // instead of twice. SmolLM2 int8 at 8 sequences a step (2 threads, Zen 5, alternating runs):
        // matrices 7.1-7.2 -> 5.3-6.1 ms; the int8 lm_head of int4 files 1.05-1.09 -> 0.89-0.93 ms.
        // int4 (its quads unpacked from nibbles) measured no faster with 8 rows (gate/up +4%).
        if constexpr (F == WeightFormat::Q8)
            for (; m + 8 <= x.rows; m += 8) tiled_tile<F, 8, T>(w, t, x, prep, m, tile, n_begin, n_end, y);
        for (; m + 4 <= x.rows; m += 4) tiled_tile<F, 4, T>(w, t, x, prep, m, tile, n_begin, n_end, y);
        for (; m < x.rows; ++m) tiled_tile<F, 1, T>(w, t, x, prep, m, tile, n_begin, n_end, y);
    }
}

template <WeightFormat F>
void tiled_weights_typed(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    with_activation_terms(x, [&](auto terms) { tiled_weights_terms<F, terms.value>(w, x, n_begin, n_end, y); });
}

template <WeightFormat F>
void quant_weights_typed(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    const int64_t n_groups = w.n_groups(), n_blocks = x.padded_cols / kBlock;
    const int64_t blocks_per_group = w.group_size / kBlock;
    thread_local std::vector<float> scale_buffer, xsum_buffer;
    scale_buffer.resize((size_t)((n_end - n_begin) * n_groups));
    xsum_buffer.assign((size_t)(x.rows * n_groups), 0.0f);
    for (int64_t n = n_begin; n < n_end; ++n)
        for (int64_t g = 0; g < n_groups; g += 16) {
            const __mmask16 mask = (__mmask16)(n_groups - g >= 16 ? 0xffff : (1u << (n_groups - g)) - 1);
            _mm512_mask_storeu_ps(scale_buffer.data() + (n - n_begin) * n_groups + g, mask,
                                  _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.scales + n * n_groups + g)));
        }
    for (int64_t m = 0; m < x.rows; ++m)
        for (int64_t b = 0; b < n_blocks; ++b) xsum_buffer[(size_t)(m * n_groups + b / blocks_per_group)] += x.sum[m * n_blocks + b];
    const Prepared prep{scale_buffer.data(), xsum_buffer.data(), n_begin};
    auto tile = [&](auto nr, auto mr, int64_t m, int64_t n) { quant_tile<F, nr.value, mr.value>(w, x, prep, m, n, y); };
    if (x.rows == 1) tile_over<8, 1>(x.rows, n_begin, n_end, tile);
    else tile_over<4, 4>(x.rows, n_begin, n_end, tile);
}

void quant_weights(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    with_quant_format(w.format, [&](auto f) {
        if (w.tiled.data != nullptr) tiled_weights_typed<f.value>(w, x, n_begin, n_end, y);
        else quant_weights_typed<f.value>(w, x, n_begin, n_end, y);
    });
}


// ---- float weights, prefill: packed panels ------------------------------------

// 16 values of w.data from `index` as f32, lanes outside `mask` zero.
template <WeightFormat F>
inline __m512 load16(const void* base, int64_t index, __mmask16 mask) {
    if constexpr (F == WeightFormat::F32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + index);
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + index);
    if constexpr (F == WeightFormat::F16) return _mm512_cvtph_ps(bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// In place: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // u[4g + j], lane L: rows 4g..4g+3 of column 4L + j
        u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
    }
    for (int j = 0; j < 4; ++j) {  // column 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j]
        const __m512 even01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), odd01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
        const __m512 even23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
        const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_f32x4(even01, even23, 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(even01, even23, 0xdd);
        r[4 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0xdd);
    }
}

inline __mmask16 first_lanes(int64_t n) { return (__mmask16)(n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1); }

template <WeightFormat F>
struct Avx512Panels {
    static constexpr int64_t kCols = 32, kRows = 12;

    static void pack(const WeightView& w, int64_t n0, int64_t cols, int64_t k0, int64_t depth, float* panel) {
        for (int64_t k = 0; k < depth; k += 16) {
            const int64_t steps = std::min<int64_t>(16, depth - k);
            for (int h = 0; h < 2; ++h) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t c = 16 * h + i;
                    r[i] = c < cols ? load16<F>(w.data, (n0 + c) * w.cols + k0 + k, first_lanes(steps)) : _mm512_setzero_ps();
                }
                transpose16(r);
                for (int64_t i = 0; i < steps; ++i) _mm512_store_ps(panel + (k + i) * 32 + 16 * h, r[i]);
            }
        }
    }

    // A register tile of Rows activation rows x 16 * Vectors output columns over one depth block.
    template <int Rows, int Vectors>
    static void tile(const float* panel, int64_t depth, const float* x, int64_t K, float* y, int64_t N, int64_t cols,
                     bool first, const float* bias) {
        const __mmask16 mask[2] = {first_lanes(cols), first_lanes(cols - 16)};
        __m512 acc[Rows][Vectors];
        for (int m = 0; m < Rows; ++m)
            for (int h = 0; h < Vectors; ++h)
                acc[m][h] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[h], y + m * N + 16 * h);
        for (int64_t k = 0; k < depth; ++k) {
            __m512 wv[Vectors];
            for (int h = 0; h < Vectors; ++h) wv[h] = _mm512_load_ps(panel + 32 * k + 16 * h);
            for (int m = 0; m < Rows; ++m) {
                const __m512 xv = _mm512_set1_ps(x[m * K + k]);
                for (int h = 0; h < Vectors; ++h) acc[m][h] = _mm512_fmadd_ps(wv[h], xv, acc[m][h]);
            }
        }
        for (int h = 0; h < Vectors; ++h) {
            const __m512 b = bias ? _mm512_maskz_loadu_ps(mask[h], bias + 16 * h) : _mm512_setzero_ps();
            for (int m = 0; m < Rows; ++m) _mm512_mask_storeu_ps(y + m * N + 16 * h, mask[h], _mm512_add_ps(acc[m][h], b));
        }
    }
};

// Below kFloatPanelMinRows rows packing does not pay: the AVX2 row tiles read the weights
// directly (measured crossover 8-12 rows, f16 576 x 576 .. 1536).
static_assert(Avx512Panels<WeightFormat::F32>::kCols == kFloatPanelColumns);

// ---- float weights, decode (one activation row) ------------------------------------------

// Weight rows one at a time, each read front to back, 64 values a step into 4 independent
// accumulators (the FMA latency hidden inside the row), the tail masked: y[n] = w[n] . x + bias.
// One row at a time is what the memory system streams best: SmolLM2 f16 decode read 13 GB/s with
// 4 rows interleaved (the AVX2 row tiles this replaced), 25 GB/s with this (Zen 4, 2 threads;
// 2 or 4 rows interleaved with AVX-512 measured as slow as the AVX2 tiles). The weights are
// prefetched kWeightPrefetchBytes ahead: SmolLM2 f16 decode +5-13% on Zen 5 (8 of 9 pairs).
//   x: f32 [w.cols]   y: f32 [w.rows] (only [n_begin, n_end) written)
template <WeightFormat F>
void float_rows_decode(const WeightView& w, const float* x, int64_t n_begin, int64_t n_end, float* y) {
    constexpr int kChains = 4;
    constexpr int64_t kValueBytes = F == WeightFormat::F32 ? 4 : 2;
    const char* base = static_cast<const char*>(w.data);
    const int64_t K = w.cols;
    for (int64_t n = n_begin; n < n_end; ++n) {
        __m512 acc[kChains];
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 * kChains <= K; k += 16 * kChains) {
            prefetch_weights_ahead(base + (n * K + k) * kValueBytes, 16 * kChains * kValueBytes);
            for (int c = 0; c < kChains; ++c)
                acc[c] = _mm512_fmadd_ps(load16<F>(w.data, n * K + k + 16 * c, 0xffff), _mm512_loadu_ps(x + k + 16 * c),
                                         acc[c]);
        }
        for (; k < K; k += 16) {
            const __mmask16 mask = first_lanes(K - k);
            acc[0] = _mm512_fmadd_ps(load16<F>(w.data, n * K + k, mask), _mm512_maskz_loadu_ps(mask, x + k), acc[0]);
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        y[n] = _mm512_reduce_add_ps(sum) + (w.bias ? w.bias[n] : 0.0f);
    }
}

void float_weights_avx512(const WeightView& w, const float* x, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
    if (M == 1) {
        switch (w.format) {
            case WeightFormat::F32: return float_rows_decode<WeightFormat::F32>(w, x, n_begin, n_end, y);
            case WeightFormat::F16: return float_rows_decode<WeightFormat::F16>(w, x, n_begin, n_end, y);
            default: return float_rows_decode<WeightFormat::BF16>(w, x, n_begin, n_end, y);
        }
    }
    if (M < kFloatPanelMinRows) return float_weight_rows_avx2(w, x, M, n_begin, n_end, y);
    switch (w.format) {
        case WeightFormat::F32: return panel_matmul<Avx512Panels<WeightFormat::F32>>(w, x, M, n_begin, n_end, y);
        case WeightFormat::F16: return panel_matmul<Avx512Panels<WeightFormat::F16>>(w, x, M, n_begin, n_end, y);
        default: return panel_matmul<Avx512Panels<WeightFormat::BF16>>(w, x, M, n_begin, n_end, y);
    }
}

}  // namespace

const CpuKernels kAvx512Kernels = {"avx512", float_weights_avx512, quant_weights, quantize_rows_avx2, true,
                                  attend_avx512, swiglu_avx2, round_to_f16_avx2};

}  // namespace pyllm
