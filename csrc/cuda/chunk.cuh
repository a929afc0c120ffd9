// Device-side decoding of one 32-value chunk of a repacked weight row (see
// DeviceWeight): the unit every weight kernel works in. A chunk never spans
// two quantization groups, because group sizes are multiples of 32.
//
// value[i] = raw[i] * scale + min, where decode_chunk gives raw (float formats:
// the value itself; int8: q; int4_sym: q - 8; int4_asym: q) and chunk_affine
// gives scale and min (1 and 0 for float formats, min 0 unless int4_asym).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels.h"

namespace pyllm {
namespace cuda {

constexpr int kChunk = 32;

// A byte b of `word` (0..3) as an exact float: 0x4B0000bb is 2^23 + b.
__device__ __forceinline__ float byte_as_float_plus_2p23(uint32_t word, int b) {
    return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u + (uint32_t)b));
}

// The stored bits of one chunk: 16 bytes (int4), 32 (int8), 64 (f16, bf16), 128 (f32).
template <WeightFormat F>
struct ChunkBits {
    static constexpr int kVectors = F == WeightFormat::F32                                ? 8
                                    : (F == WeightFormat::F16 || F == WeightFormat::BF16) ? 4
                                    : F == WeightFormat::Q8                               ? 2
                                                                                          : 1;
    uint4 v[kVectors];
};

template <WeightFormat F>
__device__ __forceinline__ ChunkBits<F> load_chunk(const uint8_t* __restrict__ row, int64_t chunk) {
    ChunkBits<F> bits;
    const uint4* p = reinterpret_cast<const uint4*>(row) + chunk * ChunkBits<F>::kVectors;
#pragma unroll
    for (int i = 0; i < ChunkBits<F>::kVectors; ++i) bits.v[i] = __ldg(p + i);
    return bits;
}

template <WeightFormat F>
__device__ __forceinline__ void decode_bits(const ChunkBits<F>& bits, float (&raw)[kChunk]) {
    if constexpr (F == WeightFormat::Q4_SYM || F == WeightFormat::Q4_ASYM) {
        // 16 bytes: byte i holds value i (low nibble) and value i + 16 (high nibble)
        const uint32_t words[4] = {bits.v[0].x, bits.v[0].y, bits.v[0].z, bits.v[0].w};
        constexpr float bias = F == WeightFormat::Q4_SYM ? 8388616.0f : 8388608.0f;  // 2^23 (+ 8)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t lo = words[j] & 0x0F0F0F0Fu, hi = (words[j] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                raw[4 * j + b] = byte_as_float_plus_2p23(lo, b) - bias;
                raw[16 + 4 * j + b] = byte_as_float_plus_2p23(hi, b) - bias;
            }
        }
    } else if constexpr (F == WeightFormat::Q8) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t words[4] = {bits.v[h].x, bits.v[h].y, bits.v[h].z, bits.v[h].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t biased = words[j] ^ 0x80808080u;  // int8 q -> q + 128 as unsigned bytes
#pragma unroll
                for (int b = 0; b < 4; ++b) raw[16 * h + 4 * j + b] = byte_as_float_plus_2p23(biased, b) - 8388736.0f;
            }
        }
    } else if constexpr (F == WeightFormat::F16 || F == WeightFormat::BF16) {
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const uint32_t words[4] = {bits.v[h].x, bits.v[h].y, bits.v[h].z, bits.v[h].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if constexpr (F == WeightFormat::F16) {
                    __half2 pair;
                    memcpy(&pair, &words[j], 4);
                    const float2 f = __half22float2(pair);
                    raw[8 * h + 2 * j] = f.x;
                    raw[8 * h + 2 * j + 1] = f.y;
                } else {  // bfloat16 is the top half of a float
                    raw[8 * h + 2 * j] = __uint_as_float(words[j] << 16);
                    raw[8 * h + 2 * j + 1] = __uint_as_float(words[j] & 0xFFFF0000u);
                }
            }
        }
    } else {  // F32
#pragma unroll
        for (int h = 0; h < 8; ++h) {
            raw[4 * h] = __uint_as_float(bits.v[h].x);
            raw[4 * h + 1] = __uint_as_float(bits.v[h].y);
            raw[4 * h + 2] = __uint_as_float(bits.v[h].z);
            raw[4 * h + 3] = __uint_as_float(bits.v[h].w);
        }
    }
}

template <WeightFormat F>
__device__ __forceinline__ void decode_chunk(const uint8_t* __restrict__ row, int64_t chunk, float (&raw)[kChunk]) {
    decode_bits<F>(load_chunk<F>(row, chunk), raw);
}

__device__ __forceinline__ float f16_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

template <WeightFormat F>
__device__ __forceinline__ void chunk_affine(const WeightArgs& w, int64_t row, int64_t chunk, float& scale, float& min) {
    scale = 1.0f;
    min = 0.0f;
    if constexpr (F == WeightFormat::Q8 || F == WeightFormat::Q4_SYM || F == WeightFormat::Q4_ASYM) {
        const int64_t g = row * w.n_groups + chunk * kChunk / w.group_size;
        scale = f16_bits_to_float(__ldg(w.scales + g));
        if constexpr (F == WeightFormat::Q4_ASYM) min = f16_bits_to_float(__ldg(w.mins + g));
    }
}

// Calls body.template operator()<F>() with F the run-time format as a constant.
template <typename Body>
void dispatch_format(WeightFormat f, Body&& body) {
    switch (f) {
        case WeightFormat::F32: body.template operator()<WeightFormat::F32>(); break;
        case WeightFormat::F16: body.template operator()<WeightFormat::F16>(); break;
        case WeightFormat::BF16: body.template operator()<WeightFormat::BF16>(); break;
        case WeightFormat::Q8: body.template operator()<WeightFormat::Q8>(); break;
        case WeightFormat::Q4_SYM: body.template operator()<WeightFormat::Q4_SYM>(); break;
        case WeightFormat::Q4_ASYM: body.template operator()<WeightFormat::Q4_ASYM>(); break;
    }
}

}  // namespace cuda
}  // namespace pyllm
