"""The fuzz targets (tools/fuzz/targets.py) on their seed corpus and a few hostile inputs each,
and, where atheris is installed, a short coverage-guided run of every target (seconds)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "fuzz"))

import targets  # noqa: E402


def _corpus(target: str) -> list[bytes]:
    paths = sorted(glob.glob(os.path.join(targets.CORPUS, target, "*")))
    assert paths, f"no seed corpus for {target}"
    return [open(p, "rb").read() for p in paths]


def _mutations(data: bytes) -> list[bytes]:
    """Deterministic damage: truncations, flipped bytes, zeroed and 0xff runs, a huge length."""
    out = [b"", data[:1], data[: len(data) // 2], data[:-1], data + b"\0" * 7]
    for i in range(0, len(data), max(1, len(data) // 40)):
        out.append(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        out.append(data[:i] + b"\xff" * 8 + data[i + 8:])
    out.append(b"\xff" * 8 + data[8:])
    return out


@pytest.mark.parametrize("target", targets.TARGETS)
def test_seed_corpus_and_damaged_seeds_are_handled(target):
    for seed in _corpus(target):
        targets.run(target, seed)
        for damaged in _mutations(seed)[:: 1 if target in ("request", "tokenizer") else 3]:
            targets.run(target, damaged)  # refused with pyllm's error, or accepted: nothing else


def test_gguf_merges_outside_the_vocabulary_are_a_format_error(monkeypatch):
    from pyllm.convert.gguf_source import GGUFSource
    from pyllm.formats.safetensors import FormatError

    source = GGUFSource(os.path.join(targets.CORPUS, "gguf", "tiny-q8.gguf"))
    get = source._get
    monkeypatch.setattr(source, "_get", lambda key, default=None: ["\u0120zz qq"] if key == "tokenizer.ggml.merges"
                        else get(key, default))
    with pytest.raises(FormatError, match="GGUF tokenizer cannot be read.*out of vocabulary"):
        source.tokenizer()


@pytest.mark.parametrize("target", targets.TARGETS)
def test_short_coverage_guided_run(target, tmp_path):
    """A short libFuzzer run from the corpus finds nothing. Seeded: every CI run tries the same
    mutations, so a failure here is reproducible; tools/fuzz.sh runs long, unseeded.

    libFuzzer's memory limit (-rss_limit_mb, 2048 by default) reads the process's *peak* RSS, and
    Linux carries a process's peak across execve from the process that started it: run directly
    from pytest (a few GB with torch loaded) the fuzzer could report "out-of-memory" on any input
    (CI once did, on a 3-byte template whose run used 8 MB). A shell forks it here, so the peak it
    starts from is the shell's."""
    pytest.importorskip("atheris")
    runs = {"gguf": 30, "pllm": 300, "template": 200}.get(target, 2000)
    (tmp_path / "corpus").mkdir()
    fuzzer = [sys.executable, os.path.join(ROOT, "tools", "fuzz", "run.py"), target, f"-runs={runs}", "-seed=1",
              "-timeout=20", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus"),
              os.path.join(targets.CORPUS, target)]
    r = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *fuzzer], capture_output=True, text=True,
                       timeout=300)
    head, tail = r.stderr[:1500], r.stderr[-3000:]  # the head has libFuzzer's reason, the tail the input
    assert r.returncode == 0, head + "\n...\n" + tail if len(r.stderr) > 4500 else r.stderr
    assert "Done" in r.stderr


def test_a_fuzz_run_does_not_start_from_pytest_s_peak_memory(tmp_path):
    """The reason test_short_coverage_guided_run starts the fuzzer through a shell, measured: a
    child started directly inherits this process's peak RSS; one forked by a shell does not."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident, not only reserved
    probe = [sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]
    direct = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    forked = int(subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *probe], capture_output=True, text=True,
                                check=True).stdout)
    del ballast
    assert forked < 200 * 1024, forked  # kB
    if direct < 600 * 1024:
        pytest.skip(f"this kernel does not carry the peak across execve ({direct} kB)")
