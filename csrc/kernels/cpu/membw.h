// Read-bandwidth probe: the memory bound that decode speed is measured against.
//
// Decode reads every weight once per token, so the highest tokens/s a machine
// allows is its read bandwidth over the bytes read per token. `pyllm bench`
// measures that bandwidth in the same process, with the same thread pool size,
// as the engine it compares.
#pragma once
#include <cstdint>

#include "../../core/thread_pool.h"

namespace pyllm {

// Streams a buffer of `bytes` (much larger than the last-level cache) `passes`
// times, summing its 64-bit words across the pool's threads, and returns the
// read bandwidth of the fastest pass in GB/s (1e9 bytes per second). The
// buffer is written once before timing, so its pages are resident.
double read_bandwidth_gbps(ThreadPool& pool, int64_t bytes, int passes);

}  // namespace pyllm
