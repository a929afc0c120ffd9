// The tiled layout of quantized weights (TiledWeight in core/weights.h), made
// at load for the SIMD kernels that read it (matmul_avx2.cpp and
// matmul_avx512.cpp, int4 and int8). Plain C++: the layout is the same
// whichever variant reads it.
//
// Rows in tiles of 16, side by side, so that each 32-bit lane of a vector
// belongs to one row: lane r of a 64-byte vector holds 4 consecutive values
// ("a quad") of row r. Per tile and 32-column block:
//   int8:  8 vectors, vector q = quad q of every row, stored as w ^ 0x80
//          (unsigned bytes; readers take the 128 * sum(x) off)
//   int4:  4 vectors, vector j = quad 2j in the low nibbles and quad 2j + 1 in
//          the high nibbles (raw nibbles 0..15)
// then the scales (and mins) per tile and group, 16 rows side by side, f16.
// Rows past the end of the matrix are zeros (their scales too).
#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace pyllm {

void tile_weight_rows16(const WeightView& w, uint8_t* out, int64_t tile_begin, int64_t tile_end) {
    const TiledLayout t = tiled_layout(w);
    const int64_t n_groups = w.n_groups(), row_bytes = w.row_bytes();
    uint16_t* scales = reinterpret_cast<uint16_t*>(out + t.scales_offset);
    uint16_t* mins = reinterpret_cast<uint16_t*>(out + t.mins_offset);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        uint8_t* tile_data = out + tile * t.blocks * t.block_bytes;
        std::memset(tile_data, 0, (size_t)(t.blocks * t.block_bytes));  // rows past the end stay zero
        std::memset(scales + tile * n_groups * kTileRows, 0, (size_t)(n_groups * kTileRows * 2));
        if (w.format == WeightFormat::Q4_ASYM) std::memset(mins + tile * n_groups * kTileRows, 0, (size_t)(n_groups * kTileRows * 2));
        for (int64_t r = 0; r < kTileRows && tile * kTileRows + r < w.rows; ++r) {
            const int64_t row = tile * kTileRows + r;
            const uint8_t* src = static_cast<const uint8_t*>(w.data) + row * row_bytes;
            for (int64_t b = 0; b < t.blocks; ++b) {
                uint8_t* block = tile_data + b * t.block_bytes + r * 4;  // lane r of each vector
                if (w.format == WeightFormat::Q8) {
                    uint8_t values[kBlock] = {0};  // the last block of a row may be short: zeros
                    std::memcpy(values, src + b * kBlock, (size_t)std::min<int64_t>(kBlock, w.cols - b * kBlock));
                    for (int64_t q = 0; q < 8; ++q)
                        for (int i = 0; i < 4; ++i) block[q * 64 + i] = values[4 * q + i] ^ 0x80;
                } else {
                    // byte i of the packed block: value i (low nibble), value i + 16 (high nibble);
                    // vector j lane bytes: values 8j + i (low) and 8j + 4 + i (high), i < 4
                    uint64_t first, second;  // bytes 0-7 and 8-15
                    std::memcpy(&first, src + b * (kBlock / 2), 8);
                    std::memcpy(&second, src + b * (kBlock / 2) + 8, 8);
                    const uint32_t low = 0x0f0f0f0fu, high = 0xf0f0f0f0u;
                    const uint32_t lanes[4] = {
                        ((uint32_t)first & low) | (((uint32_t)(first >> 32) & low) << 4),
                        ((uint32_t)second & low) | (((uint32_t)(second >> 32) & low) << 4),
                        (((uint32_t)first >> 4) & low) | ((uint32_t)(first >> 32) & high),
                        (((uint32_t)second >> 4) & low) | ((uint32_t)(second >> 32) & high),
                    };
                    for (int j = 0; j < 4; ++j) std::memcpy(block + j * 64, &lanes[j], 4);
                }
            }
            for (int64_t g = 0; g < n_groups; ++g) {
                scales[(tile * n_groups + g) * kTileRows + r] = w.scales[row * n_groups + g];
                if (w.format == WeightFormat::Q4_ASYM) mins[(tile * n_groups + g) * kTileRows + r] = w.mins[row * n_groups + g];
            }
        }
    }
}

void untile_weight_row(const WeightView& w, int64_t row, uint8_t* data, uint16_t* scales, uint16_t* mins) {
    const TiledLayout t = tiled_layout(w);
    const int64_t n_groups = w.n_groups(), tile = row / kTileRows, r = row % kTileRows;
    const uint8_t* tile_data = w.tiled.data + tile * t.blocks * t.block_bytes;
    for (int64_t b = 0; b < t.blocks; ++b) {
        const uint8_t* block = tile_data + b * t.block_bytes + r * 4;  // lane r of each vector
        if (w.format == WeightFormat::Q8) {
            uint8_t values[kBlock];
            for (int64_t q = 0; q < 8; ++q)
                for (int i = 0; i < 4; ++i) values[4 * q + i] = block[q * 64 + i] ^ 0x80;
            std::memcpy(data + b * kBlock, values, (size_t)std::min<int64_t>(kBlock, w.cols - b * kBlock));
        } else {  // tile_weight_rows16's lanes back into the packed bytes
            uint8_t* out = data + b * (kBlock / 2);
            for (int i = 0; i < 4; ++i) {
                const uint8_t l0 = block[i], l1 = block[64 + i], l2 = block[128 + i], l3 = block[192 + i];
                out[i] = (uint8_t)((l0 & 0x0f) | (l2 << 4));
                out[4 + i] = (uint8_t)((l0 >> 4) | (l2 & 0xf0));
                out[8 + i] = (uint8_t)((l1 & 0x0f) | (l3 << 4));
                out[12 + i] = (uint8_t)((l1 >> 4) | (l3 & 0xf0));
            }
        }
    }
    for (int64_t g = 0; g < n_groups; ++g) {
        scales[g] = w.tiled.scales[(tile * n_groups + g) * kTileRows + r];
        if (w.format == WeightFormat::Q4_ASYM) mins[g] = w.tiled.mins[(tile * n_groups + g) * kTileRows + r];
    }
}

void point_tiled(WeightView& w, const uint8_t* buffer) {
    const TiledLayout layout = tiled_layout(w);
    w.tiled.data = buffer;
    w.tiled.scales = reinterpret_cast<const uint16_t*>(buffer + layout.scales_offset);
    w.tiled.mins = w.format == WeightFormat::Q4_ASYM ? reinterpret_cast<const uint16_t*>(buffer + layout.mins_offset)
                                                     : nullptr;
}

}  // namespace pyllm
