// The AVX2 tiled int4/int8 matmul over weights tiled at load (tiled_weights.cpp), shared by the
// avx2 variant (matmul_avx2.cpp: maddubs block dots) and the avxvnni variant (matmul_avxvnni.cpp:
// 256-bit vpdpbusd). Included only by translation units compiled for AVX2 (+ FMA, F16C); its
// contents live in an unnamed namespace, so each variant keeps its own copy, built with its flags.
//
// A block dot policy Dots supplies, for one 32-value block of a tile (16 weight rows) and MR
// activation rows, the exact integer dot[m][h] = rows [8h, 8h + 8)'s int32 254 * (w . hi) + (w . lo):
//   static void block<F, MR, T>(const uint8_t* wb, const BlockCodes& x, __m256i (*dot)[2])
//   wb: the block's bytes   x: the MR rows' codes of the block (below)
//   T: QuantizedRows::terms; with 1, hi is zero and a policy may skip its products (the same bits)
// and says whether it reads int8 weights against the codes joined in int16 (kWideQ8: 254 hi + lo).
// Integer sums are exact, so every policy gives the same bits.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "tiling.h"

namespace pyllm {
namespace {

// A 256-bit vector is half a tile vector: 8 rows, 4 values each (a "quad" per row), and a
// block of 32 values is 8 quad vectors per half. Both halves of a tile are multiplied in
// one pass, so each broadcast activation quad meets 16 weight rows, and each unpacked quad
// vector meets MR activation rows and both int8 terms (hi, lo) while it is in a register.
// The two terms meet in int32 as 254 * hi + lo (below 2^31: at most 32 * 128 * 127 * 255) and
// go to float once: the same rounding as adding them in float with one fma (every partial sum is
// an integer below 2^24).
// Against one half at a time with a block's 8 quads held in registers (Zen 3, one thread,
// SmolLM2's int4 shapes, 8 activation rows): ~78 instead of ~100 instructions and 6-8
// instead of 8-11 ns per 8 weight rows x 32 values x activation row.

// Cache blocking of tiled_weights_typed: the activation codes of one chunk of rows take half
// of a 32 KiB L1, the tiles of one run half of a 512 KiB L2.
constexpr int64_t kTiledChunkBytes = 16384, kTiledRunBytes = 262144;

// The activation codes of one block for MR rows, as a block dot policy reads them.
struct BlockCodes {
    const int8_t* hi;          // int8 [MR][stride]: the block's 32 hi codes first
    ptrdiff_t lo_offset;       // lo codes at hi + lo_offset
    int64_t stride;
    const int32_t* code_sums;  // int32 [MR][sums_stride]: the block's (sum of hi, sum of lo) first
    int64_t sums_stride;
    const int16_t* wide;       // int16 [MR][stride]: 254 hi + lo (|.| <= 32385), block first; Dots::kWideQ8 and int8 only

    // The 4 codes of quad q of row m's hi (term 0) or lo (term 1), in every 32-bit lane.
    __m256i quad(int m, int term, int q) const {
        int32_t four;
        std::memcpy(&four, hi + m * stride + (term ? lo_offset : 0) + 4 * q, 4);
        return _mm256_set1_epi32(four);
    }
};

// Keeps v's chain of adds in program order: GCC otherwise re-associates integer sums into
// trees that compute every product first and spill most of them (found in objdump).
inline void in_order(__m256i& v) { __asm__("" : "+x"(v)); }

// Rows [tile * 16, tile * 16 + 16), activation rows [m0, m0 + MR).
//   xsum: f32 [x.rows, n_groups], the activations' sum over each group (int4)
//   wide: int16 [x.rows, x.padded_cols], 254 hi + lo (int8 with Dots::kWideQ8), else null
//   (noinline: one symbol per instance in profiles and objdump)
template <class Dots, WeightFormat F, int MR, int T>
__attribute__((noinline)) void tiled_tile(const WeightView& w, const TiledLayout& t, const QuantizedRows& x,
                                          const float* xsum, const int16_t* wide, int64_t m0, int64_t tile, int64_t n_begin,
                                          int64_t n_end, float* y) {
    const int64_t n_groups = w.n_groups(), n_blocks = t.blocks, blocks_per_group = w.group_size / kBlock;
    const uint8_t* wt = w.tiled.data + tile * n_blocks * t.block_bytes;
    // The first pass over a tile (the first activation rows) prefetches the weights
    // kWeightPrefetchBytes ahead, into the next tile at its end; the later passes find them cached.
    // Decode on an AVX2-only Zen 3 (SmolLM2, 2 threads, 4-5 alternating pairs): int4 72 -> 81,
    // int8 50 -> 58 tok/s; its hardware prefetcher alone left the weight loads waiting.
    const bool prefetch = m0 == 0;
    // the int4 groups' offsets (shift or min times the group's activation sum) are added
    // into the same accumulators as the products
    __m256 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t at = (tile * n_groups + g) * kTileRows;
        __m256 scale[2];
        for (int h = 0; h < 2; ++h) {
            scale[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.tiled.scales + at + 8 * h)));
            if constexpr (F != WeightFormat::Q8) {
                const __m256 shift = F == WeightFormat::Q4_ASYM
                                         ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.tiled.mins + at + 8 * h)))
                                         : _mm256_mul_ps(scale[h], _mm256_set1_ps(-8.0f));
                for (int m = 0; m < MR; ++m)
                    acc[m][h] = _mm256_fmadd_ps(shift, _mm256_set1_ps(xsum[(m0 + m) * n_groups + g]), acc[m][h]);
            }
        }
        const int64_t b_end = std::min(n_blocks, (g + 1) * blocks_per_group);
        for (int64_t b = g * blocks_per_group; b < b_end; ++b) {
            const uint8_t* wb = wt + b * t.block_bytes;
            if (prefetch) prefetch_weights_ahead(wb, t.block_bytes);
            __m256i dot[MR][2];
            const int64_t first = m0 * x.padded_cols + b * kBlock;
            const BlockCodes codes{x.hi + first, x.lo - x.hi, x.padded_cols, x.code_sums + (m0 * n_blocks + b) * 2,
                                   n_blocks * 2, wide ? wide + first : nullptr};
            if (T == 2 && rows_have_hi(x, m0, MR, b)) Dots::template block<F, MR, T>(wb, codes, dot);
            else Dots::template block<F, MR, 1>(wb, codes, dot);  // hi all zero here: the same bits
            for (int m = 0; m < MR; ++m) {
                const __m256 step = _mm256_set1_ps(x.step[(m0 + m) * n_blocks + b]);
                for (int h = 0; h < 2; ++h)
                    acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][h]), _mm256_mul_ps(scale[h], step), acc[m][h]);
            }
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int h = 0; h < 2; ++h) {
        const int64_t row0 = tile * kTileRows + 8 * h;
        const int64_t first = std::max<int64_t>(0, n_begin - row0), last = std::min<int64_t>(8, n_end - row0);
        if (last <= first) continue;
        const __m256i keep = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)last), lane),
                                              _mm256_cmpgt_epi32(lane, _mm256_set1_epi32((int)first - 1)));
        for (int m = 0; m < MR; ++m) {
            const __m256 out = w.bias ? _mm256_add_ps(acc[m][h], _mm256_maskload_ps(w.bias + row0, keep)) : acc[m][h];
            _mm256_maskstore_ps(y + (m0 + m) * w.rows + row0, keep, out);
        }
    }
}

template <class Dots, WeightFormat F, int T>
void tiled_weights_terms(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    const TiledLayout t = tiled_layout(w);
    const int64_t n_groups = w.n_groups();
    thread_local std::vector<float> xsum;
    thread_local std::vector<int16_t> wide;
    if constexpr (F != WeightFormat::Q8) group_sums(x, w.group_size, n_groups, xsum);
    if constexpr (F == WeightFormat::Q8 && Dots::kWideQ8) {
        wide.resize((size_t)(x.rows * x.padded_cols));
        for (int64_t i = 0; i < x.rows * x.padded_cols; ++i)
            wide[(size_t)i] = (int16_t)(kResidualRadix * x.hi[i] + x.lo[i]);
    }
    const int16_t* wide_codes = F == WeightFormat::Q8 && Dots::kWideQ8 ? wide.data() : nullptr;
    // Cache blocking: tiles go in runs whose weights stay in L2, activation rows in chunks whose
    // codes (hi and lo) stay in L1 while every tile of the run passes over them.
    const int64_t chunk = std::clamp<int64_t>(kTiledChunkBytes / (2 * x.padded_cols) / 2 * 2, 2, 16);
    const int64_t run = std::max<int64_t>(1, kTiledRunBytes / (t.blocks * t.block_bytes));
    const int64_t first_tile = n_begin / kTileRows, end_tile = (n_end + kTileRows - 1) / kTileRows;
    for (int64_t run_begin = first_tile; run_begin < end_tile; run_begin += run) {
        const int64_t run_end = std::min(end_tile, run_begin + run);
        for (int64_t m_begin = 0; m_begin < x.rows; m_begin += chunk) {
            const int64_t m_end = std::min(x.rows, m_begin + chunk);
            for (int64_t tile = run_begin; tile < run_end; ++tile) {
                int64_t m = m_begin;
                for (; m + 2 <= m_end; m += 2)
                    tiled_tile<Dots, F, 2, T>(w, t, x, xsum.data(), wide_codes, m, tile, n_begin, n_end, y);
                if (m < m_end) tiled_tile<Dots, F, 1, T>(w, t, x, xsum.data(), wide_codes, m, tile, n_begin, n_end, y);
            }
        }
    }
}

template <class Dots, WeightFormat F>
void tiled_weights_typed(const WeightView& w, const QuantizedRows& x, int64_t n_begin, int64_t n_end, float* y) {
    with_activation_terms(x, [&](auto terms) { tiled_weights_terms<Dots, F, terms.value>(w, x, n_begin, n_end, y); });
}

}  // namespace
}  // namespace pyllm
