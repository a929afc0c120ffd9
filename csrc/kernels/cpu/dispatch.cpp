// Chooses the kernel variant for this CPU and checks weight descriptions.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace pyllm {

namespace {

bool cpu_supports(std::initializer_list<const char*> features) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();
    for (const char* f : features) {
        // __builtin_cpu_supports needs literal names: test the ones the variants use
        const std::string name = f;
        bool has = false;
        if (name == "avx2") has = __builtin_cpu_supports("avx2");
        else if (name == "fma") has = __builtin_cpu_supports("fma");
        else if (name == "f16c") has = __builtin_cpu_supports("f16c");
        else if (name == "avx512f") has = __builtin_cpu_supports("avx512f");
        else if (name == "avx512bw") has = __builtin_cpu_supports("avx512bw");
        else if (name == "avx512vl") has = __builtin_cpu_supports("avx512vl");
        else if (name == "avx512vnni") has = __builtin_cpu_supports("avx512vnni");
        else if (name == "avxvnni") has = __builtin_cpu_supports("avxvnni");
        if (!has) return false;
    }
    return true;
#else
    (void)features;
    return false;
#endif
}

std::atomic<const CpuKernels*> g_active{nullptr};

}  // namespace

std::vector<const CpuKernels*> available_kernels() {
    std::vector<const CpuKernels*> out{&kPortableKernels};
#if defined(PYLLM_HAVE_AVX2)
    const bool avx2 = cpu_supports({"avx2", "fma", "f16c"});
    if (avx2) out.push_back(&kAvx2Kernels);
#if defined(PYLLM_HAVE_AVXVNNI)
    if (avx2 && cpu_supports({"avxvnni"})) out.push_back(&kAvxVnniKernels);
#endif
#if defined(PYLLM_HAVE_AVX512)
    if (avx2 && cpu_supports({"avx512f", "avx512bw", "avx512vl", "avx512vnni"})) out.push_back(&kAvx512Kernels);
#endif
#endif
    return out;
}

const CpuKernels& active_kernels() {
    const CpuKernels* k = g_active.load(std::memory_order_acquire);
    if (k == nullptr) {
        const char* forced = std::getenv("PYLLM_KERNELS");
        if (forced != nullptr && forced[0] != '\0') select_kernels(forced);  // throws for a name it cannot run
        else g_active.store(available_kernels().back(), std::memory_order_release);
        k = g_active.load(std::memory_order_acquire);
    }
    return *k;
}

void select_kernels(const char* name) {
    const std::vector<const CpuKernels*> variants = available_kernels();
    if (std::strcmp(name, "auto") == 0) {
        g_active.store(variants.back());
        return;
    }
    std::string names;
    for (const CpuKernels* k : variants) {
        if (std::strcmp(name, k->name) == 0) {
            g_active.store(k);
            return;
        }
        names += std::string(names.empty() ? "" : ", ") + k->name;
    }
    throw std::invalid_argument(std::string("unknown kernel variant '") + name + "' or not supported here (available: " +
                                names + ", auto)");
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
