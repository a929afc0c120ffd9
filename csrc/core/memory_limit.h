// How much memory this process may still fill: the system's (/proc/meminfo) and its memory cgroup's
// (a container's limit), whichever is tighter.
//
// Why: a container sees the host's /proc/meminfo, so a KV cache that fits the host but not the
// container's limit looked fine, and filling it in (core/populate.h) had the container's
// out-of-memory killer end the process within seconds of loading, before any request (SmolLM2,
// 16 x 8192 positions: 2.8 GiB of cache under a 1.5 GiB limit; measured 2026-12-02).
//
// Where the limits are (the layouts systemd and container runtimes mount):
// - cgroup v2 (unified): /proc/self/cgroup has "0::/PATH"; ROOT/PATH/memory.max ("max" or bytes) and
//   ROOT/PATH/memory.current, with ROOT /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid systems.
// - cgroup v1: a line "N:CONTROLLERS:/PATH" whose controllers include memory;
//   ROOT/memory/PATH/memory.limit_in_bytes and memory.usage_in_bytes (a huge value means none).
// Every level from the process's cgroup up to the mount's root is read (a parent's limit holds for
// its children too). A container whose cgroup is not namespaced sees its host's PATH while its
// mount's root is its own cgroup: a PATH that is not there is read from the root. Values that
// cannot be read or parsed count as no limit: this only bounds optional work, never refuses any.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace pyllm {

// One number from the start of a small file (a cgroup's memory.max, ...): -1 when the file is
// missing, empty, "max", or does not start with a number.
inline int64_t read_file_number(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (f == nullptr) return -1;
    char text[64] = {0};
    const size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    text[n] = 0;
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    if (end == text || value < 0) return -1;
    return (int64_t)value;
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

// The tightest memory cgroup level of this process: its limit in bytes and that level's usage.
struct CgroupMemory {
    int64_t limit = -1;  // -1: no limit found
    int64_t usage = -1;  // of the level whose limit minus usage is least; -1 when unknown
};

namespace detail {

// Limits above this are "no limit" (cgroup v1 writes 2^63 rounded down to a page).
constexpr int64_t kNoLimit = int64_t(1) << 62;

// Levels ROOT/PATH, ROOT/parent(PATH), ..., ROOT: each one's limit file and usage file.
inline void read_levels(const std::string& root, std::string path, const char* limit_file, const char* usage_file,
                        CgroupMemory& best) {
    while (!path.empty() && path.back() == '/') path.pop_back();
    std::string dir = root + path;
    if (std::FILE* probe = std::fopen((dir + "/" + usage_file).c_str(), "r")) std::fclose(probe);
    else path.clear();  // not namespaced: the host's path, absent from this mount; its root is ours
    for (;;) {
        const int64_t limit = read_file_number(root + path + "/" + limit_file);
        if (limit >= 0 && limit < kNoLimit) {
            const int64_t usage = read_file_number(root + path + "/" + usage_file);
            const int64_t room = limit - (usage < 0 ? 0 : usage);
            const int64_t best_room = best.limit < 0 ? INT64_MAX : best.limit - (best.usage < 0 ? 0 : best.usage);
            if (room < best_room) best = CgroupMemory{limit, usage};
        }
        if (path.empty()) return;
        const size_t slash = path.rfind('/');
        path = slash == std::string::npos ? std::string() : path.substr(0, slash);
    }
}

}  // namespace detail

// proc_cgroup: /proc/self/cgroup's text source; root: where cgroup file systems are mounted
// (parameters so that tests can point them at a made-up tree).
inline CgroupMemory cgroup_memory(const std::string& proc_cgroup = "/proc/self/cgroup",
                                  const std::string& root = "/sys/fs/cgroup") {
    CgroupMemory best;
    std::FILE* f = std::fopen(proc_cgroup.c_str(), "r");
    if (f == nullptr) return best;
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
            detail::read_levels(root, path, "memory.max", "memory.current", best);
            detail::read_levels(root + "/unified", path, "memory.max", "memory.current", best);
            continue;
        }
        size_t at = 0;  // v1: "memory" among the comma-separated controllers
        bool memory = false;
        while (at <= controllers.size()) {
            const size_t comma = controllers.find(',', at);
            const size_t end = comma == std::string::npos ? controllers.size() : comma;
            memory = memory || controllers.compare(at, end - at, "memory") == 0;
            at = end + 1;
        }
        if (memory) detail::read_levels(root + "/memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", best);
    }
    std::fclose(f);
    return best;
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
