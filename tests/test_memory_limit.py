"""The memory a process may use: the machine's, or its memory cgroup's limit (a container's).

A container sees its host's /proc/meminfo, so a KV cache that fitted the host but not the
container's limit was accepted, and the KV cache's background fill (csrc/core/populate.h) had the
container's out-of-memory killer end the process within 2 s of loading, before any request
(SmolLM2, 16 x 8192 positions: 2.8 GiB under a 1.5 GiB limit). csrc/core/memory_limit.h reads the
cgroup (v1, v2 and hybrid layouts): LLM refuses a cache past the limit with a LimitError, and the
fill stops within an eighth of it.
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


def _memory_cgroup(name: str, limit: int) -> tuple[str, str] | None:
    """A new memory cgroup limited to `limit` bytes: (its directory, the file holding its peak usage),
    or None where this process cannot make one (not root, no writable memory controller)."""
    v1 = "/sys/fs/cgroup/memory"
    try:
        if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
            path = os.path.join(v1, name)
            os.makedirs(path, exist_ok=True)
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
            return path, os.path.join(path, "memory.max_usage_in_bytes")
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            if "memory" not in f.read().split():
                return None
        path = os.path.join("/sys/fs/cgroup", name)
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, "memory.max"), str(limit))
        return path, os.path.join(path, "memory.peak")
    except OSError:
        return None


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
    made = _memory_cgroup(f"pyllm-test-{os.getpid()}", limit)
    if made is None:
        pytest.skip("no memory cgroup can be made here (needs root and a writable memory controller)")
    cgroup, peak_file = made
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
        script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        out = subprocess.run(["/bin/sh", "-c", script, "sh", sys.executable, "-c", code, path, str(past), str(under)],
                             capture_output=True, text=True, timeout=300)
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
