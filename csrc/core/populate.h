// Fills in the pages of memory ranges in a background thread, so that their first use does not
// stop to fault them in.
//
// Why: AlignedBytes asks for transparent huge pages, so a page faults in 2 MiB at a time, and where
// the kernel must compact memory to find 2 MiB (its default for madvised memory, defrag=madvise)
// one fault took ~8 ms on a 2-core VM (2026-12-02): the first prefill of a fresh KV-cache slot at a
// 4096 context paid 200-450 ms (its transposed keys touch every page of the slot's keys at once),
// and copying a 40-token shared prefix into a fresh slot (Engine::copy_sequence) 460 ms instead of
// 21 ms, on the serving loop's thread, stalling every stream.
//
// How: madvise(MADV_POPULATE_WRITE) (Linux 5.14) over each range in turn, one 2 MiB page per call (the
// call holds the process's memory-map lock for reading: a thread mapping or unmapping memory, as a
// large malloc does, waits at most one page's fault). It leaves the contents as they are, so the
// engine may write the same pages meanwhile. The thread runs at the lowest priority (nice 19: compute
// threads come first), stops between calls when destroyed, and stops for good when it comes within
// an eighth of the memory it may fill: the system's (MemAvailable against MemTotal) or its memory
// cgroup's, a container's limit (core/container_limits.h): filling in a cache that does not fit would
// only bring the out-of-memory killer sooner than its use would (or at once, in a container). Where the call is
// missing (older kernels, other systems) nothing happens: pages fault in on first use, as before.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#include "container_limits.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyllm {

class BackgroundPopulate {
public:
    struct Range {
        uint8_t* data;
        size_t bytes;
    };

    // ranges: populated in this order (each rounded out to whole pages)
    explicit BackgroundPopulate(std::vector<Range> ranges) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
        thread_ = std::thread([this, ranges = std::move(ranges)] {
            ::setpriority(PRIO_PROCESS, (id_t)::syscall(SYS_gettid), 19);  // this thread only (Linux)
            const uintptr_t page = (uintptr_t)::sysconf(_SC_PAGESIZE);
            int64_t calls = 0;
            for (const Range& r : ranges) {
                uintptr_t at = (uintptr_t)r.data & ~(page - 1);
                const uintptr_t end = ((uintptr_t)r.data + r.bytes + page - 1) & ~(page - 1);
                while (at < end && !stop_.load(std::memory_order_relaxed)) {
                    if (calls++ % kCallsPerMemoryCheck == 0 &&
                        memory_headroom_bytes() < kCallsPerMemoryCheck * (int64_t)kChunk) {
                        done_.store(true);  // memory is short: the rest faults in as it is used
                        return;
                    }
                    const uintptr_t len = end - at < kChunk ? end - at : kChunk;
                    if (::madvise((void*)at, (size_t)len, MADV_POPULATE_WRITE) != 0) {  // EINVAL: not supported
                        done_.store(true);
                        return;
                    }
                    at += len;
                }
            }
            done_.store(true);
        });
#else
        (void)ranges;
        done_.store(true);
#endif
    }
    BackgroundPopulate(const BackgroundPopulate&) = delete;
    BackgroundPopulate& operator=(const BackgroundPopulate&) = delete;
    ~BackgroundPopulate() {
        stop_.store(true);
        if (thread_.joinable()) thread_.join();
    }

    // Every range populated, or given up (the call unsupported).
    bool done() const { return done_.load(); }

private:
    static constexpr uintptr_t kChunk = uintptr_t(2) << 20;  // bytes per call: one huge page
    static constexpr int64_t kCallsPerMemoryCheck = 16;      // the headroom read every 32 MiB

    std::atomic<bool> stop_{false}, done_{false};
    std::thread thread_;
};

}  // namespace pyllm
