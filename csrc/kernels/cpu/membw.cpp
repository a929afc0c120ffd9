#include "membw.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <vector>

namespace pyllm {

namespace {
constexpr int64_t kChunkWords = (1 << 20) / 8;  // 1 MiB per task

// Four independent sums so the loads are not serialised on one add chain; the
// compiler vectorises the integer adds at any x86-64 level.
uint64_t sum_words(const uint64_t* p, int64_t n) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    for (; i < n; ++i) s0 += p[i];
    return s0 + s1 + s2 + s3;
}
}  // namespace

double read_bandwidth_gbps(ThreadPool& pool, int64_t bytes, int passes) {
    if (bytes < (int64_t)(kChunkWords * 8) || passes < 1)
        throw std::invalid_argument("the bandwidth probe needs at least 1 MiB and one pass");
    const int64_t n_chunks = bytes / (kChunkWords * 8);
    const int64_t n_words = n_chunks * kChunkWords;
    std::unique_ptr<uint64_t[]> buffer(new uint64_t[(size_t)n_words]);
    uint64_t* words = buffer.get();
    // first touch from the pool, as the engine's threads would find the weights
    pool.parallel_for(n_chunks, [&](int64_t c) {
        for (int64_t i = c * kChunkWords; i < (c + 1) * kChunkWords; ++i) words[i] = (uint64_t)i * 2654435761u;
    });
    std::vector<uint64_t> sums((size_t)n_chunks);
    double best_seconds = 1e300;
    uint64_t check = 0;
    for (int pass = 0; pass < passes; ++pass) {
        const auto start = std::chrono::steady_clock::now();
        pool.parallel_for(n_chunks, [&](int64_t c) { sums[(size_t)c] = sum_words(words + c * kChunkWords, kChunkWords); });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best_seconds = std::min(best_seconds, seconds);
        for (uint64_t s : sums) check += s;
    }
    // the sums feed a value the caller cannot see but the compiler cannot drop
    static volatile uint64_t sink;
    sink = check;
    return (double)(n_words * 8) / best_seconds / 1e9;
}

}  // namespace pyllm
