#include "thread_pool.h"

#include "container_limits.h"

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYLLM_PAUSE() _mm_pause()
#else
#define PYLLM_PAUSE() std::this_thread::yield()
#endif

namespace pyllm {

namespace {
constexpr int kSpinIterations = 1 << 16;
// While waiting, give the core away every so often: when the machine has more runnable threads
// than cores, a pure spin would keep the thread we wait for from running at all.
constexpr int kSpinsBeforeYield = 256;
constexpr uint64_t kWriting = ~0ull;  // a slot's generation while it is being rewritten

inline void spin_pause(int spins) {
    if (spins % kSpinsBeforeYield == kSpinsBeforeYield - 1) std::this_thread::yield();
    else PYLLM_PAUSE();
}

inline uint64_t claim_generation(uint64_t claim) { return claim >> 32; }
inline int64_t claim_index(uint64_t claim) { return (int64_t)(claim & 0xffffffffull); }
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        next_.fetch_add(1ull << 32);  // a new generation: spinning workers look up
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

int ThreadPool::default_threads() { return available_cpus(); }

bool ThreadPool::run_claim(uint64_t claim) {
    const uint64_t generation = claim_generation(claim);
    const JobSlot& slot = slots_[generation & 1];
    if ((slot.generation.load(std::memory_order_acquire) & 0xffffffffull) != generation) return false;
    const std::function<void(int64_t)>* task = slot.task.load(std::memory_order_relaxed);
    const int64_t n_tasks = slot.n_tasks.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((slot.generation.load(std::memory_order_relaxed) & 0xffffffffull) != generation) return false;
    if (claim_index(claim) >= n_tasks) return false;
    (*task)(claim_index(claim));
    done_.fetch_add(1, std::memory_order_acq_rel);
    return true;
}

void ThreadPool::work() {
    while (run_claim(next_.fetch_add(1, std::memory_order_acq_rel))) {
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) task(i);
        return;
    }
    // Every claim of the previous job has run (done_ reached its count), so only
    // claims that will fail validation can still be in flight.
    ++generation_;
    if ((generation_ & 0xffffffffull) == 0xffffffffull) ++generation_;  // that value marks a slot in rewrite
    const uint64_t generation = generation_ & 0xffffffffull;
    JobSlot& slot = slots_[generation & 1];
    slot.generation.store(kWriting, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    slot.task.store(&task, std::memory_order_relaxed);
    slot.n_tasks.store(n_tasks, std::memory_order_relaxed);
    slot.generation.store(generation, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(mutex_);  // sleeping workers check next_ under the lock
        next_.store(generation << 32, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    // what is left are tasks other threads have started
    for (int spins = 0; done_.load(std::memory_order_acquire) < n_tasks; ++spins) spin_pause(spins);
}

void ThreadPool::worker_loop() {
    // next_ held generation 0 when the pool was made: a thread that starts late still sees any job
    // published (or the destructor's bump) since then as new.
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (claim_generation(next_.load(std::memory_order_acquire)) == seen && spins < kSpinIterations)
            spin_pause(spins++);
        if (claim_generation(next_.load(std::memory_order_acquire)) == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return stop_.load() || claim_generation(next_.load()) != seen; });
        }
        if (stop_.load()) return;
        seen = claim_generation(next_.load(std::memory_order_acquire));
        work();
    }
}

}  // namespace pyllm
