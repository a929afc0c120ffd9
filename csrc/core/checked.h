// Overflow-checked size arithmetic for byte counts computed from untrusted numbers (a model file's
// shapes, a requested context length): a product or sum that does not fit throws
// std::length_error (Python: ValueError) with a message naming what was being sized, instead of
// wrapping around into a small buffer that later writes run past.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

namespace pyllm {

// a * b for non-negative a, b; throws when negative or when the product exceeds INT64_MAX.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
    int64_t out = 0;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out))
        throw std::length_error(std::string(what) + ": size " + std::to_string(a) + " x " + std::to_string(b) +
                                " is negative or overflows");
    return out;
}

// The product of non-negative factors, checked at every step.
inline int64_t checked_product(std::initializer_list<int64_t> factors, const char* what) {
    int64_t out = 1;
    for (int64_t f : factors) out = checked_mul(out, f, what);
    return out;
}

// n as a size_t for an allocation; throws when it cannot be one.
inline size_t checked_size(int64_t n, const char* what) {
    if (n < 0 || (uint64_t)n > (uint64_t)std::numeric_limits<size_t>::max() / 2)
        throw std::length_error(std::string(what) + ": " + std::to_string(n) + " bytes cannot be allocated");
    return (size_t)n;
}

}  // namespace pyllm
