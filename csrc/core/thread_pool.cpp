#include "thread_pool.h"

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

inline void spin_pause(int spins) {
    if (spins % kSpinsBeforeYield == kSpinsBeforeYield - 1) std::this_thread::yield();
    else PYLLM_PAUSE();
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

int ThreadPool::default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : (int)n;
}

void ThreadPool::run_tasks() {
    for (;;) {
        int64_t i = next_task_.fetch_add(1, std::memory_order_relaxed);
        if (i >= n_tasks_) break;
        (*task_)(i);
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) task(i);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        task_ = &task;
        n_tasks_ = n_tasks;
        next_task_.store(0);
        busy_workers_.store((int)workers_.size());
        generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_tasks();
    for (int spins = 0; busy_workers_.load(std::memory_order_acquire) != 0; ++spins) spin_pause(spins);
    task_ = nullptr;
}

void ThreadPool::worker_loop() {
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen && spins < kSpinIterations) {
            spin_pause(spins++);
        }
        if (generation_.load(std::memory_order_acquire) == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load() != seen; });
        }
        seen = generation_.load(std::memory_order_acquire);
        if (stop_.load()) return;
        run_tasks();
        busy_workers_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

}  // namespace pyllm
