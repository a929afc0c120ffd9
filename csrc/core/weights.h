// How a 2-D weight matrix is laid out in memory, in every format pyllm stores.
//
// A WeightView never owns memory: it points into the memory-mapped model file
// (or into numpy arrays when a kernel is called from Python). The layout is
// the device-independent one documented in docs/FORMAT.md; a backend may
// repack it at load, the CPU kernels use it as is.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <sys/mman.h>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "env.h"

namespace pyllm {

// Width of one quantization block of activations and of one int4 nibble chunk.
constexpr int64_t kBlock = 32;

enum class WeightFormat : int32_t {
    F32 = 0,      // float      [rows, cols]
    F16 = 1,      // uint16     [rows, cols] IEEE half
    BF16 = 2,     // uint16     [rows, cols] bfloat16
    Q8 = 3,       // int8       [rows, cols], value = q * scale[group]
    Q4_SYM = 4,   // uint8      [rows, padded_cols/2], value = (q - 8) * scale[group]
    Q4_ASYM = 5,  // uint8      [rows, padded_cols/2], value = q * scale[group] + min[group]
};

static inline const char* format_name(WeightFormat f) {
    switch (f) {
        case WeightFormat::F32: return "f32";
        case WeightFormat::F16: return "f16";
        case WeightFormat::BF16: return "bf16";
        case WeightFormat::Q8: return "int8";
        case WeightFormat::Q4_SYM: return "int4_sym";
        case WeightFormat::Q4_ASYM: return "int4_asym";
    }
    return "unknown";
}

static inline bool is_quantized(WeightFormat f) {
    return f == WeightFormat::Q8 || f == WeightFormat::Q4_SYM || f == WeightFormat::Q4_ASYM;
}

static inline int64_t round_up(int64_t value, int64_t multiple) {
    return (value + multiple - 1) / multiple * multiple;
}

// A quantized weight rearranged at load for a kernel variant that reads 16 rows
// at once (matmul_avx512.cpp documents the layout). Optional: kernels that do
// not know it read WeightView::data, which always stays valid.
struct TiledWeight {
    const uint8_t* data = nullptr;     // [ceil(rows / 16), padded_cols / 32, bytes of 16 row-blocks]
    const uint16_t* scales = nullptr;  // f16 [ceil(rows / 16), n_groups, 16]
    const uint16_t* mins = nullptr;    // f16 [ceil(rows / 16), n_groups, 16], Q4_ASYM only
};
constexpr int64_t kTileRows = 16;

// Int4 packing: each row is cut into chunks of 32 values; a chunk is 16 bytes,
// byte i holding value i in its low nibble and value i + 16 in its high nibble.
// The last chunk of a row is padded with zero nibbles up to 32 values.
struct WeightView {
    WeightFormat format = WeightFormat::F32;
    int64_t rows = 0;          // N: output features
    int64_t cols = 0;          // K: input features
    int64_t group_size = 0;    // quantized formats: values per scale (a multiple of 32)
    const void* data = nullptr;        // see WeightFormat
    const uint16_t* scales = nullptr;  // f16 [rows, n_groups()]
    const uint16_t* mins = nullptr;    // f16 [rows, n_groups()], Q4_ASYM only
    const float* bias = nullptr;       // f32 [rows] or null
    TiledWeight tiled;                 // optional rearranged copy (see TiledWeight)

    int64_t n_groups() const { return group_size > 0 ? (cols + group_size - 1) / group_size : 0; }
    int64_t padded_cols() const { return round_up(cols, kBlock); }
    // Bytes of `data` one row takes.
    int64_t row_bytes() const {
        switch (format) {
            case WeightFormat::F32: return cols * 4;
            case WeightFormat::F16:
            case WeightFormat::BF16: return cols * 2;
            case WeightFormat::Q8: return cols;
            case WeightFormat::Q4_SYM:
            case WeightFormat::Q4_ASYM: return padded_cols() / 2;
        }
        return 0;
    }
};

// Throws std::invalid_argument unless the view describes a usable weight
// (positive sizes, a legal group size, every pointer the format needs).
void validate_weight(const WeightView& w, const std::string& what);

// Activations quantized for the integer dot products, in blocks of 32, as two
// int8 terms: x ~= step * (kResidualRadix * hi + lo). hi is the usual absmax
// int8 code (step * kResidualRadix = absmax / 127) and lo the int8 code of what
// hi leaves over, so a block keeps ~15 bits where one int8 term keeps 8: one
// int8 term adds ~2e-3 NMSE to the logits of a 30-layer model, two terms ~1e-7.
// Rows are padded with zeros to padded_cols. A block holding NaN or infinity gets codes 0 and a NaN
// step and sum, so every output of its row is NaN on every kernel variant (as float math would give).
//
// With terms == 1 (an engine's activation_quant "int8": llama.cpp's Q8_0 activations with an f32
// step) a block keeps one int8 term: lo = round(x / step), step = absmax / 127, and hi is all zero,
// so every kernel that reads both terms gives the same bits as one that skips hi (the tiled kernels
// do: half the vpdpbusd / maddubs work).
//
// With terms == 2 and outlier_factor > 0 (activation_quant "int8x2_outliers") only a row's outlier
// blocks keep two terms: a block whose absmax exceeds outlier_factor times the mean absmax of the
// row's finite blocks (a loud block), or whose one-term codes sum below min_code_sum in magnitude (a
// block one value dwarfs, whose other values one term rounds away); the others one term as above
// (hi zero). Per row and from the row's values alone, so a row's codes never depend on the rows
// beside it. has_hi marks the blocks whose hi is not all zero; the tiled kernels skip hi's products
// for the others (the same bits).
constexpr int32_t kResidualRadix = 254;

struct QuantizedRows {
    int64_t rows = 0;
    int64_t padded_cols = 0;
    int8_t* hi = nullptr;    // [rows, padded_cols]
    int8_t* lo = nullptr;    // [rows, padded_cols]
    float* step = nullptr;   // [rows, padded_cols / 32]
    float* sum = nullptr;    // [rows, padded_cols / 32], sum of the block's quantized values
    int32_t* code_sums = nullptr;  // [rows, padded_cols / 32, 2]: sums of the block's hi and lo codes
                                   // (filled by prepare_linear_input; read by the tiled int8 kernel)
    int32_t terms = 2;             // 2: x ~ step * (254 hi + lo); 1: x ~ step * lo, hi zero
    float outlier_factor = 0.0f;   // terms 2: > 0 keeps two terms only in outlier blocks (above)
    int32_t min_code_sum = 0;      // with outlier_factor > 0: and in blocks whose one-term codes sum below it
    uint8_t* has_hi = nullptr;     // [rows, padded_cols / 32]: 1 where the block's hi codes are not all
                                   // zero (filled by prepare_linear_input; read by the tiled kernels);
                                   // null unless outlier_blocks_only(): every block may have hi
    // Whether only outlier blocks keep two terms (above), the others one.
    bool outlier_blocks_only() const { return terms == 2 && outlier_factor > 0.0f; }
};

// The absmax above which a block of row x f32 [cols] keeps two terms under outlier_factor:
// outlier_factor * (sum of the finite blocks' absmax, in block order, in float) / (blocks),
// the same float on every kernel variant. 0 when outlier_factor is 0 (every nonzero block).
float outlier_threshold(const float* x, int64_t cols, float outlier_factor);

// Heap bytes aligned to 64 (tiled weights are read with aligned vector loads).
// Buffers of 4 MiB and more are aligned to 2 MiB and asked for transparent huge
// pages (madvise; a no-op where the kernel does not do them): the matmuls and the
// attention stream through them, and with 4 KiB pages every 4 KiB costs a TLB
// walk and stops the hardware prefetcher at the page's end. The price: memory is
// committed 2 MiB at a time (a KV cache slot becomes resident on its first use).
// PYLLM_HUGE_PAGES=0 in the environment (read once) asks for none, allow_huge false neither.
class AlignedBytes {
public:
    static constexpr size_t kHugePage = size_t(2) << 20;
    explicit AlignedBytes(size_t n, bool allow_huge = true) : ptr_(nullptr, &std::free) {
        const bool huge = allow_huge && n >= 2 * kHugePage;
        const size_t align = huge ? kHugePage : 64;
        const size_t size = (size_t)round_up((int64_t)(n ? n : 1), (int64_t)align);
        ptr_.reset(static_cast<uint8_t*>(std::aligned_alloc(align, size)));
        if (!ptr_) throw std::bad_alloc();
        huge_ = huge && huge_pages_wanted();
        if (huge_) advise_huge_pages(ptr_.get(), size);
    }
    uint8_t* data() const { return ptr_.get(); }
    bool huge_pages() const { return huge_; }  // asked for transparent huge pages

private:
    static bool huge_pages_wanted() {
        static const bool wanted = [] {
            return env_switch("PYLLM_HUGE_PAGES", true);
        }();
        return wanted;
    }
    static void advise_huge_pages(void* p, size_t size) {
#ifdef MADV_HUGEPAGE
        ::madvise(p, size, MADV_HUGEPAGE);  // advice: failure is harmless
#else
        (void)p, (void)size;
#endif
    }
    std::unique_ptr<uint8_t, decltype(&std::free)> ptr_;
    bool huge_ = false;
};

// Where the parts of a TiledWeight sit in one buffer (each part 64-byte aligned).
struct TiledLayout {
    int64_t tiles = 0, blocks = 0, block_bytes = 0;  // block_bytes: one block of 16 rows
    size_t scales_offset = 0, mins_offset = 0, total = 0;
};

static inline TiledLayout tiled_layout(const WeightView& w) {
    TiledLayout t;
    t.tiles = (w.rows + kTileRows - 1) / kTileRows;
    t.blocks = w.padded_cols() / kBlock;
    t.block_bytes = kTileRows * kBlock / (w.format == WeightFormat::Q8 ? 1 : 2);
    const size_t data = (size_t)(t.tiles * t.blocks * t.block_bytes);
    const size_t scales = (size_t)(t.tiles * w.n_groups() * kTileRows * 2);
    t.scales_offset = (size_t)round_up((int64_t)data, 64);
    t.mins_offset = (size_t)round_up((int64_t)(t.scales_offset + scales), 64);
    t.total = t.mins_offset + (w.format == WeightFormat::Q4_ASYM ? scales : 0);
    return t;
}

}  // namespace pyllm
