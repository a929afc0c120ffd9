"""What a process may use: the machine's memory and CPUs, or its cgroup's limits (a container's).

A container sees its host's /proc/meminfo and CPU count. A KV cache that fitted the host but not the
container's memory limit was accepted, and the KV cache's background fill (csrc/core/populate.h)
had the container's out-of-memory killer end the process within 2 s of loading, before any request
(SmolLM2, 16 x 8192 positions: 2.8 GiB under a 1.5 GiB limit); and the default thread count was
the host's CPU count, whatever the affinity mask (taskset) or CPU quota (docker --cpus).
csrc/core/container_limits.h reads the cgroup (v1, v2 and hybrid layouts) and the affinity mask:
LLM refuses a cache past the memory limit with a LimitError, the fill stops within an eighth of
it, and the default thread count is the CPUs the process may use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import pyllm  # noqa: E402
from pyllm import _core  # noqa: E402
from pyllm.limits import memory_limit  # noqa: E402

GiB = 1 << 30


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_the_tightest_cgroup_level_is_read_from_each_layout(tmp_path):
    root, proc = tmp_path / "fs", tmp_path / "cgroup"

    def read(lines: str):
        _write(proc, lines)
        return _core.cgroup_memory(str(proc), str(root))

    # v1: the process's own level has no limit (2^63 rounded to a page), its parent has
    huge = str((1 << 63) - 4096)
    _write(root / "memory/box/app/memory.limit_in_bytes", huge)
    _write(root / "memory/box/app/memory.usage_in_bytes", str(GiB))
    _write(root / "memory/box/memory.limit_in_bytes", str(2 * GiB))
    _write(root / "memory/box/memory.usage_in_bytes", str(GiB + 5))
    _write(root / "memory/memory.limit_in_bytes", huge)
    assert read("12:pids:/box/app\n4:memory:/box/app\n1:name=systemd:/box/app\n") == (2 * GiB, GiB + 5)
    assert read("4:cpu,memory,blkio:/box/app\n") == (2 * GiB, GiB + 5)  # controllers mounted together
    assert read("4:memoryx:/box/app\n3:cpu:/box/app\n") == (None, None)  # no memory controller line

    # v1, not namespaced: the host's path is absent from this mount, whose root is the container's cgroup
    _write(root / "memory/memory.limit_in_bytes", str(3 * GiB))
    _write(root / "memory/memory.usage_in_bytes", str(GiB))
    assert read("4:memory:/docker/0123abcd\n") == (3 * GiB, GiB)

    # v2: "max" is no limit; the tightest room (limit - usage) wins, not the smallest limit
    _write(root / "a/memory.max", str(4 * GiB))
    _write(root / "a/memory.current", str(3 * GiB + 512))
    _write(root / "a/b/memory.max", "max\n")
    _write(root / "a/b/memory.current", str(GiB))
    _write(root / "a/b/c/memory.max", str(2 * GiB))
    _write(root / "a/b/c/memory.current", str(GiB // 2))
    assert read("0::/a/b/c\n") == (4 * GiB, 3 * GiB + 512)
    _write(root / "a/b/c/memory.high", str(GiB // 2 + 100))  # memory.high below memory.max counts
    assert read("0::/a/b/c\n") == (GiB // 2 + 100, GiB // 2)
    _write(root / "a/b/c/memory.high", "max\n")
    # hybrid: v2's unified tree under ROOT/unified, beside v1's controllers
    _write(root / "unified/svc/memory.max", str(GiB))
    _write(root / "unified/svc/memory.current", str(GiB // 4))
    assert read("4:memory:/\n0::/svc\n") == (GiB, GiB // 4)


def test_unreadable_or_odd_cgroup_files_mean_no_limit(tmp_path):
    root, proc = tmp_path / "fs", tmp_path / "cgroup"
    assert _core.cgroup_memory(str(tmp_path / "missing"), str(root)) == (None, None)
    for text in ("", "garbage\n", "0:\n", "::\n", "0::relative\n", "4:memory\n", "x" * 10000 + "\n", "\0\0\0"):
        _write(proc, text)
        assert _core.cgroup_memory(str(proc), str(root)) == (None, None), text
    for limit in ("", "max", "-5", "abc", "99999999999999999999999"):
        _write(root / "memory/memory.limit_in_bytes", limit)
        _write(proc, "4:memory:/\n")
        assert _core.cgroup_memory(str(proc), str(root)) == (None, None), limit
    _write(root / "memory/memory.limit_in_bytes", str(GiB))  # a limit whose usage cannot be read
    assert _core.cgroup_memory(str(proc), str(root)) == (GiB, None)


def test_memory_limit_is_the_machine_s_or_the_cgroup_s_whichever_is_less(monkeypatch):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(_core, "cgroup_memory", lambda: (None, None))
    assert memory_limit() == physical
    monkeypatch.setattr(_core, "cgroup_memory", lambda: (GiB, 5))
    assert memory_limit() == min(GiB, physical)
    monkeypatch.setattr(_core, "cgroup_memory", lambda: (physical * 2, 5))
    assert memory_limit() == physical


def test_the_cpu_quota_is_read_from_each_layout(tmp_path):
    root, proc = tmp_path / "fs", tmp_path / "cgroup"

    def read(lines: str):
        _write(proc, lines)
        return _core.cgroup_cpu_limit(str(proc), str(root))

    # v1, mounted as cpu,cpuacct: the least quota over the levels, rounded up to whole CPUs
    for level, quota in (("", "-1"), ("/box", "250000"), ("/box/app", "-1")):
        _write(root / f"cpu,cpuacct{level}/cpu.cfs_quota_us", quota)
        _write(root / f"cpu,cpuacct{level}/cpu.cfs_period_us", "100000")
    assert read("3:cpu,cpuacct:/box/app\n") == 3
    _write(root / "cpu,cpuacct/box/app/cpu.cfs_quota_us", "100000")
    assert read("3:cpuacct,cpu:/box/app\n") == 1
    assert read("3:cpuacct:/box/app\n4:memory:/box/app\n") is None  # no cpu controller line
    assert read("3:cpu,cpuacct:/docker/0123abcd\n") is None  # not namespaced: the root, which has none
    # v2: "max PERIOD" is no quota
    _write(root / "a/cpu.max", "max 100000\n")
    _write(root / "a/b/cpu.max", "150000 100000\n")
    assert read("0::/a/b\n") == 2
    assert read("0::/a\n") is None
    for text in ("", "max", "150000", "abc 100000", "0 100000", "-5 100000", "100000 0", "9" * 30 + " 100000"):
        _write(root / "a/b/cpu.max", text)
        assert read("0::/a/b\n") is None, text


def test_the_default_thread_count_follows_the_affinity_mask():
    """taskset -c 0 (or a container's cpuset) ran as many threads as the machine has CPUs."""
    code = ("import os, pyllm\n"
            "from pyllm import _core\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "print(_core.default_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
    quota = _core.cgroup_cpu_limit()
    assert _core.default_threads() == min(len(os.sched_getaffinity(0)), quota or 1 << 30)


def _cgroup(controller: str, name: str, settings: dict[str, str]) -> tuple[str, bool] | None:
    """A new cgroup with `controller` (memory or cpu) and its settings (v1 file name: value; v2 names
    are derived): (its directory, whether it is v1), or None where this process cannot make one
    (not root, no writable controller)."""
    v1 = {"memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu"}[controller]
    v2_names = {"memory.limit_in_bytes": "memory.max"}
    try:
        if os.path.isdir(v1) and os.listdir(v1):
            path = os.path.join(v1, name)
            os.makedirs(path, exist_ok=True)
            for file, value in settings.items():
                _write(os.path.join(path, file), value)
            return path, True
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            if controller not in f.read().split():
                return None
        path = os.path.join("/sys/fs/cgroup", name)
        os.makedirs(path, exist_ok=True)
        if controller == "cpu":
            _write(os.path.join(path, "cpu.max"), f"{settings['cpu.cfs_quota_us']} {settings['cpu.cfs_period_us']}")
        for file, value in settings.items():
            if file in v2_names:
                _write(os.path.join(path, v2_names[file]), value)
        return path, False
    except OSError:
        return None


def _run_in(cgroup: str, args: list[str]) -> subprocess.CompletedProcess:
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    return subprocess.run(["/bin/sh", "-c", script, "sh", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_in_a_container_the_default_threads_are_its_cpu_quota():
    """docker --cpus 1 on a machine of several CPUs: one thread by default, not one per host CPU."""
    made = _cgroup("cpu", f"pyllm-test-cpu-{os.getpid()}", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"})
    if made is None:
        pytest.skip("no cpu cgroup can be made here (needs root and a writable cpu controller)")
    try:
        out = _run_in(made[0], [sys.executable, "-c", "from pyllm import _core; print(_core.cgroup_cpu_limit(), "
                                                      "_core.default_threads())"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "1"]
    finally:
        try:
            os.rmdir(made[0])
        except OSError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_in_a_container_a_cache_past_its_limit_is_refused_and_the_fill_stops_short(tmp_path):
    """Under a 512 MiB cgroup: a KV cache past the limit is a LimitError naming it (it was accepted,
    and the background fill brought the OOM killer); one just under it (which with the process
    itself does not fit) loads, its fill stops within an eighth of the limit, and it generates."""
    from conftest import make_tiny_llama

    from pyllm.convert import convert_checkpoint
    from pyllm.formats.packed import PackedModel
    from pyllm.llm import engine_kv_cache_bytes

    limit = 512 << 20
    made = _cgroup("memory", f"pyllm-test-{os.getpid()}", {"memory.limit_in_bytes": str(limit)})
    if made is None:
        pytest.skip("no memory cgroup can be made here (needs root and a writable memory controller)")
    cgroup, peak_file = made[0], os.path.join(made[0], "memory.max_usage_in_bytes" if made[1] else "memory.peak")
    try:
        base = make_tiny_llama(str(tmp_path / "base"), seed=2, max_position_embeddings=1 << 16)
        path = str(tmp_path / "m.pllm")
        convert_checkpoint(base, path, quant="int8", progress=False)
        with PackedModel(path) as m:
            config, linears = m.config, m.linears

        def context_for(fraction: float) -> int:  # 256 sequences whose cache is `fraction` of the limit
            per_position = engine_kv_cache_bytes(config, 4096, "auto", 256, linears) / 4096
            return int(fraction * limit / per_position)

        past, under = context_for(1.2), context_for(0.95)
        code = (
            "import sys, time, pyllm\n"
            "from pyllm.errors import LimitError\n"
            "path, past, under = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
            "try:\n"
            "    pyllm.LLM(path, n_threads=1, n_parallel=256, context_length=past)\n"
            "    print('loaded past the limit')\n"
            "except LimitError as e:\n"
            "    print('refused:', e)\n"
            "llm = pyllm.LLM(path, n_threads=1, n_parallel=256, context_length=under)\n"
            "deadline = time.monotonic() + 120\n"
            "while not llm.engine.kv_cache_populated and time.monotonic() < deadline: time.sleep(0.01)\n"
            "print('populated', llm.engine.kv_cache_populated)\n"
            "print('generated', len(llm.generate('Hello', max_new_tokens=4)) > 0)\n")
        out = _run_in(cgroup, [sys.executable, "-c", code, path, str(past), str(under)])
        assert out.returncode == 0, f"rc {out.returncode} (-9: the OOM killer): {out.stdout} {out.stderr[-2000:]}"
        lines = out.stdout.splitlines()
        assert lines[0].startswith("refused:") and "container's limit" in lines[0] and "0.5 GiB" in lines[0], lines
        assert lines[1:] == ["populated True", "generated True"], out.stdout
        with open(peak_file) as f:
            assert int(f.read()) < limit
    finally:
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
