// Chooses the matmul variant for this CPU and checks weight descriptions.
#include <atomic>
#include <cstring>
#include <string>

#include "kernels.h"

namespace pyllm {

bool cpu_has_avx2() {
#if defined(PYLLM_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

namespace {
const CpuKernels* best_available() {
#if defined(PYLLM_HAVE_AVX2)
    if (cpu_has_avx2()) return &kAvx2Kernels;
#endif
    return &kPortableKernels;
}
std::atomic<const CpuKernels*> g_active{nullptr};
}  // namespace

const CpuKernels& active_kernels() {
    const CpuKernels* k = g_active.load(std::memory_order_acquire);
    if (k == nullptr) {
        k = best_available();
        g_active.store(k, std::memory_order_release);
    }
    return *k;
}

void select_kernels(const char* name) {
    if (std::strcmp(name, "auto") == 0) {
        g_active.store(best_available());
    } else if (std::strcmp(name, "portable") == 0) {
        g_active.store(&kPortableKernels);
    } else if (std::strcmp(name, "avx2") == 0) {
#if defined(PYLLM_HAVE_AVX2)
        if (!cpu_has_avx2()) throw std::invalid_argument("this CPU lacks AVX2/FMA/F16C");
        g_active.store(&kAvx2Kernels);
#else
        throw std::invalid_argument("this build has no AVX2 kernels");
#endif
    } else {
        throw std::invalid_argument(std::string("unknown kernel variant '") + name + "' (portable, avx2, auto)");
    }
}

void validate_weight(const WeightView& w, const std::string& what) {
    auto fail = [&](const std::string& why) { throw std::invalid_argument(what + ": " + why); };
    if (w.rows <= 0 || w.cols <= 0) fail("rows and cols must be positive");
    if (w.data == nullptr) fail("no data");
    if (is_quantized(w.format)) {
        if (w.group_size <= 0 || w.group_size % kBlock != 0)
            fail("group size " + std::to_string(w.group_size) + " is not a positive multiple of 32");
        if (w.scales == nullptr) fail("quantized weight without scales");
        if (w.format == WeightFormat::Q4_ASYM && w.mins == nullptr) fail("asymmetric int4 weight without mins");
    } else if (w.format != WeightFormat::F32 && w.format != WeightFormat::F16 && w.format != WeightFormat::BF16) {
        fail("unknown weight format " + std::to_string((int)w.format));
    }
}

}  // namespace pyllm
