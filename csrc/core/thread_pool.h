// A persistent pool of worker threads for data-parallel loops.
//
// parallel_for hands out task indices [0, n_tasks) through an atomic counter;
// the calling thread works too. Workers spin briefly between jobs (decode
// issues hundreds of small jobs per token, so waking through a condition
// variable each time would cost more than the work) and then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pyllm {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Runs task(i) for every i in [0, n_tasks), spread over all threads, and
    // returns when all are done. Not re-entrant: one job at a time.
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task);

    // Threads to use when the caller did not say: the number of cores.
    static int default_threads();

private:
    void worker_loop();
    void run_tasks();

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_task_{0};
    std::atomic<int> busy_workers_{0};
    std::atomic<bool> stop_{false};
    int64_t n_tasks_ = 0;
    const std::function<void(int64_t)>* task_ = nullptr;
};

}  // namespace pyllm
