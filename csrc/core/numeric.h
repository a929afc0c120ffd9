// Scalar number formats shared by every kernel: IEEE half and bfloat16.
//
// Everything here is `static inline` on purpose: this header is included both
// by translation units built for the baseline ISA and by those built with
// -mavx2, and internal linkage keeps the linker from merging an AVX2-compiled
// copy into the portable path.
#pragma once
#include <cstdint>
#include <cstring>

namespace pyllm {

static inline float f32_from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t bits_from_f32(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

// IEEE 754 binary16 -> binary32, exact for every input (normals, subnormals,
// infinities, NaN).
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        // zero or subnormal: mantissa * 2^-24
        float magnitude = (float)mantissa * (1.0f / 16777216.0f);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return f32_from_bits(sign | 0x7f800000u | (mantissa << 13));
    return f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// binary32 -> binary16 with round-to-nearest-even (what numpy's astype does).
static inline uint16_t f32_to_f16(float f) {
    const uint32_t x = bits_from_f32(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to infinity
    if (abs < 0x38800000u) {
        // result is subnormal or zero: round abs / 2^-24 to an integer
        const float scaled = f32_from_bits(abs) * 16777216.0f;
        uint32_t q = (uint32_t)scaled;
        const float rest = scaled - (float)q;
        if (rest > 0.5f || (rest == 0.5f && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    const uint32_t mantissa_rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return (uint16_t)(sign | ((mantissa_rounded - 0x38000000u) >> 13));
}

static inline float bf16_to_f32(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

}  // namespace pyllm
