// A persistent pool of worker threads for data-parallel loops.
//
// parallel_for hands out task indices [0, n_tasks) through an atomic counter;
// the calling thread works too, and waits only for tasks a worker has actually
// started: a worker that has not woken up yet (the machine busy with other
// programs) holds nobody up, the caller simply runs those tasks itself.
// Workers spin briefly between jobs (decode issues hundreds of small jobs per
// token, so waking through a condition variable each time would cost more than
// the work) and then sleep.
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

    // Threads to use when the caller did not say: the CPUs this process may run on (its affinity
    // mask), at most its cgroup's CPU quota (container_limits.h).
    static int default_threads();

private:
    // One job's description. Consecutive jobs use the two slots in turn; a slot
    // is read like a seqlock (generation before and after), so a worker holding
    // a claim from an old job never runs a task of a newer one.
    struct JobSlot {
        std::atomic<uint64_t> generation{0};
        std::atomic<const std::function<void(int64_t)>*> task{nullptr};
        std::atomic<int64_t> n_tasks{0};
    };

    void worker_loop();
    // Claims task indices and runs them while the claims are valid.
    void work();
    // Runs the task a claim (a value of next_) names; false when the claim is
    // past the end of its job or its job is gone.
    bool run_claim(uint64_t claim);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    JobSlot slots_[2];
    std::atomic<uint64_t> next_{0};  // (generation & 0xffffffff) << 32 | next task index of that job
    std::atomic<int64_t> done_{0};   // tasks of the current job finished
    std::atomic<bool> stop_{false};
    uint64_t generation_ = 0;        // of the latest job (written by the calling thread only)
};

}  // namespace pyllm
