// What this process may use of the machine: the memory it may still fill and the CPUs it may run on,
// as the system and its cgroup (a container's limits) allow, whichever is tighter.
//
// Why: a container sees its host's /proc/meminfo and its host's CPU count.
// - Memory: a KV cache that fitted the host but not the container's limit was accepted, and filling
//   it in (core/populate.h) had the container's out-of-memory killer end the process within 2 s of
//   loading, before any request (SmolLM2, 16 x 8192 positions: 2.8 GiB under a 1.5 GiB limit).
// - CPUs: the default thread count was the host's CPU count, whatever the process's CPU affinity
//   (taskset, docker --cpuset-cpus) or CPU quota (docker --cpus: a cgroup's cpu.max), so a container
//   given 2 CPUs of a 64-CPU host ran 64 threads whose spinning spent its quota in a few
//   milliseconds of every period and then stalled for the rest.
//
// Where the limits are (the layouts systemd and container runtimes mount):
// - cgroup v2 (unified): /proc/self/cgroup has "0::/PATH"; ROOT/PATH holds memory.max and
//   memory.high ("max" or bytes; the lower counts), memory.current and cpu.max ("QUOTA PERIOD" or
//   "max PERIOD"), with ROOT /sys/fs/cgroup,
//   or /sys/fs/cgroup/unified on hybrid systems.
// - cgroup v1: a line "N:CONTROLLERS:/PATH"; ROOT/memory/PATH holds memory.limit_in_bytes and
//   memory.usage_in_bytes (a huge value means none), ROOT/cpu/PATH (or cpu,cpuacct) holds
//   cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us.
// Every level from the process's cgroup up to the mount's root is read (a parent's limit holds for
// its children too). A container whose cgroup is not namespaced sees its host's PATH while its
// mount's root is its own cgroup: a PATH that is not there is read from the root. Values that
// cannot be read or parsed count as no limit: these bound optional work and defaults, never refuse.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <thread>

#include <sys/stat.h>

#if defined(__linux__)
#include <sched.h>
#endif

namespace pyllm {

// The numbers at the start of a small file (a cgroup's memory.max, cpu.max, ...): how many of
// `count` were read (a missing file, "max" or text that is no number stops the reading).
inline int read_file_numbers(const std::string& path, int64_t* values, int count) {
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (f == nullptr) return 0;
    char text[128] = {0};
    const size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    text[n] = 0;
    const char* at = text;
    int read = 0;
    for (; read < count; ++read) {
        char* end = nullptr;
        errno = 0;
        const long long value = std::strtoll(at, &end, 10);
        if (end == at || errno == ERANGE) break;
        values[read] = (int64_t)value;
        at = end;
    }
    return read;
}

// One non-negative number from the start of a small file; -1 when there is none.
inline int64_t read_file_number(const std::string& path) {
    int64_t value = -1;
    return read_file_numbers(path, &value, 1) == 1 && value >= 0 ? value : -1;
}

// A "Name:   N kB" line of /proc/meminfo (or `path`), in bytes; -1 when it cannot be read.
inline int64_t meminfo_bytes(const char* name, const char* path = "/proc/meminfo") {
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr) return -1;
    char line[256];
    long long kib = -1;
    const size_t n = std::strlen(name);
    while (std::fgets(line, sizeof line, f) != nullptr)
        if (std::strncmp(line, name, n) == 0) {
            kib = std::strtoll(line + n, nullptr, 10);
            break;
        }
    std::fclose(f);
    return kib < 0 || kib > INT64_MAX / 1024 ? -1 : (int64_t)kib * 1024;
}

namespace detail {

// Calls visit(directory) for ROOT/PATH, ROOT/parent(PATH), ..., ROOT. `probe`: a file every level
// of this controller has; where ROOT/PATH lacks it, PATH is the host's (not namespaced): ROOT only.
template <class Visit>
void for_each_level(const std::string& root, std::string path, const char* probe, Visit&& visit) {
    while (!path.empty() && path.back() == '/') path.pop_back();
    if (std::FILE* f = std::fopen((root + path + "/" + probe).c_str(), "r")) std::fclose(f);
    else path.clear();
    for (;;) {
        visit(root + path);
        if (path.empty()) return;
        const size_t slash = path.rfind('/');
        path = slash == std::string::npos ? std::string() : path.substr(0, slash);
    }
}

// Calls visit(directory, v2) for every level of every cgroup hierarchy of this process that holds
// `controller`: v2's (under ROOT and ROOT/unified) and v1's whose controllers list includes it
// (mounted at ROOT/<one of v1_mounts>, each a comma-separated directory name).
template <class Visit>
void for_each_cgroup(const std::string& proc_cgroup, const std::string& root, const char* controller,
                     std::initializer_list<const char*> v1_mounts, const char* v2_probe, const char* v1_probe,
                     Visit&& visit) {
    std::FILE* f = std::fopen(proc_cgroup.c_str(), "r");
    if (f == nullptr) return;
    char line[4096];
    while (std::fgets(line, sizeof line, f) != nullptr) {
        std::string text(line);
        while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
        const size_t first = text.find(':'), second = first == std::string::npos ? first : text.find(':', first + 1);
        if (second == std::string::npos) continue;
        const std::string hierarchy = text.substr(0, first), controllers = text.substr(first + 1, second - first - 1);
        const std::string path = text.substr(second + 1);
        if (path.empty() || path[0] != '/') continue;
        if (hierarchy == "0" && controllers.empty()) {  // v2: pure, or the unified part of a hybrid
            for (const char* base : {"", "/unified"})
                for_each_level(root + base, path, v2_probe, [&](const std::string& dir) { visit(dir, true); });
            continue;
        }
        bool listed = false;  // v1: `controller` among the comma-separated controllers
        for (size_t at = 0; at <= controllers.size();) {
            const size_t comma = controllers.find(',', at);
            const size_t end = comma == std::string::npos ? controllers.size() : comma;
            listed = listed || controllers.compare(at, end - at, controller) == 0;
            at = end + 1;
        }
        if (!listed) continue;
        for (const char* mount : v1_mounts) {
            const std::string base = root + "/" + mount;
            struct stat info;
            if (::stat(base.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
                for_each_level(base, path, v1_probe, [&](const std::string& dir) { visit(dir, false); });
                break;
            }
        }
    }
    std::fclose(f);
}

// Limits above this are "no limit" (cgroup v1 writes 2^63 rounded down to a page).
constexpr int64_t kNoLimit = int64_t(1) << 62;

}  // namespace detail

// The tightest memory cgroup level of this process: its limit in bytes and that level's usage.
struct CgroupMemory {
    int64_t limit = -1;  // -1: no limit found
    int64_t usage = -1;  // of the level whose limit minus usage is least; -1 when unknown
};

// proc_cgroup: /proc/self/cgroup's text source; root: where cgroup file systems are mounted
// (parameters so that tests can point them at a made-up tree).
inline CgroupMemory cgroup_memory(const std::string& proc_cgroup = "/proc/self/cgroup",
                                  const std::string& root = "/sys/fs/cgroup") {
    CgroupMemory best;
    detail::for_each_cgroup(
        proc_cgroup, root, "memory", {"memory"}, "memory.current", "memory.usage_in_bytes",
        [&](const std::string& dir, bool v2) {
            int64_t limit = read_file_number(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"));
            if (v2) {  // memory.high: past it the kernel throttles the group and reclaims hard
                const int64_t high = read_file_number(dir + "/memory.high");
                if (high >= 0 && (limit < 0 || high < limit)) limit = high;
            }
            if (limit < 0 || limit >= detail::kNoLimit) return;
            const int64_t usage = read_file_number(dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes"));
            const int64_t room = limit - (usage < 0 ? 0 : usage);
            const int64_t best_room = best.limit < 0 ? INT64_MAX : best.limit - (best.usage < 0 ? 0 : best.usage);
            if (room < best_room) best = CgroupMemory{limit, usage};
        });
    return best;
}

// The CPUs this process's cgroup quota allows (the least over its levels: quota / period, rounded
// up), or -1 where there is no quota. Arguments as cgroup_memory's.
inline int64_t cgroup_cpu_limit(const std::string& proc_cgroup = "/proc/self/cgroup",
                                const std::string& root = "/sys/fs/cgroup") {
    int64_t best = -1;
    detail::for_each_cgroup(
        proc_cgroup, root, "cpu", {"cpu", "cpu,cpuacct", "cpuacct,cpu"}, "cpu.max", "cpu.cfs_period_us",
        [&](const std::string& dir, bool v2) {
            int64_t quota = -1, period = -1;
            if (v2) {
                int64_t both[2];
                if (read_file_numbers(dir + "/cpu.max", both, 2) != 2) return;  // "max PERIOD": none
                quota = both[0], period = both[1];
            } else {
                quota = read_file_number(dir + "/cpu.cfs_quota_us");  // -1: none
                period = read_file_number(dir + "/cpu.cfs_period_us");
            }
            if (quota <= 0 || period <= 0 || quota >= detail::kNoLimit) return;
            const int64_t cpus = quota / period + (quota % period != 0);
            if (best < 0 || cpus < best) best = cpus;
        });
    return best;
}

// The CPUs this process may run on (its affinity mask: taskset, a container's cpuset), or the
// machine's count where the mask cannot be read.
inline int affinity_cpus() {
#if defined(__linux__)
    for (int n_cpus = 1024; n_cpus <= (1 << 16); n_cpus *= 4) {  // masks of machines past 1024 CPUs too
        cpu_set_t* set = CPU_ALLOC(n_cpus);
        if (set == nullptr) break;
        const size_t size = CPU_ALLOC_SIZE(n_cpus);
        CPU_ZERO_S(size, set);
        const int got = ::sched_getaffinity(0, size, set);
        const int count = got == 0 ? CPU_COUNT_S(size, set) : 0;
        CPU_FREE(set);
        if (got == 0 && count > 0) return count;
        if (got != 0 && errno != EINVAL) break;  // EINVAL: the mask is larger than this set
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : (int)n;
}

// Threads worth running: the CPUs of the affinity mask, no more than the cgroup's CPU quota allows.
inline int available_cpus() {
    const int cpus = affinity_cpus();
    const int64_t quota = cgroup_cpu_limit();
    return quota > 0 && quota < cpus ? (int)quota : cpus;
}

// Bytes this process may still fill before it comes within an eighth of a limit: the system's
// (MemAvailable minus an eighth of MemTotal) or its memory cgroup's (limit minus usage minus an
// eighth of the limit), whichever is less; INT64_MAX when neither can be read.
inline int64_t memory_headroom_bytes() {
    int64_t headroom = INT64_MAX;
    const int64_t total = meminfo_bytes("MemTotal:"), available = meminfo_bytes("MemAvailable:");
    if (total > 0 && available >= 0) headroom = available - total / 8;
    const CgroupMemory cg = cgroup_memory();
    if (cg.limit >= 0) {
        const int64_t room = cg.limit - (cg.usage < 0 ? 0 : cg.usage) - cg.limit / 8;
        if (room < headroom) headroom = room;
    }
    return headroom;
}

}  // namespace pyllm
