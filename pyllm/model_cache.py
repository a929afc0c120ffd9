"""Models by path: what `pyllm run/serve/bench/perplexity` and `pyllm.LLM` accept.

    resolve_model("model.pllm")   -> "model.pllm" (opened as it is)
    resolve_model("model.gguf")   -> the cache's "model-<key>.pllm", converted on first use
    resolve_model("./hf-dir")     -> the same for a Hugging Face model directory

A GGUF file or a Hugging Face directory is converted once into the cache directory (beside the
default model, $XDG_CACHE_HOME/pyllm) and reused while the source is unchanged. Each converted
file `<name>-<key>.pllm` has a sidecar `<name>-<key>.json` naming its source; the key hashes the
source's absolute path and the conversion settings, and the sidecar holds the source's fingerprint
(size and modification time of its files), the converter version (with a hash of the converter's
code: converter_revision) and the .pllm's own size: when one differs (the source changed, a pyllm
whose converter changed, a file cut short or replaced), the entry is converted again in place; while
a process converts an entry (or downloads the default model) it holds `<name>-<key>.lock`, and the
others (processes or threads) wait for it and reuse its file; `pyllm rm` refuses an entry whose lock is
held, and removes one a running model has open (the model's mapping keeps the file's data). A split
GGUF model is one entry whichever shard is given, keyed by its first shard and fingerprinted by all of them. `pyllm list` shows the entries, `pyllm rm` removes them. Downloads and
conversions work in locked "pyllm-tmp-PID-*" directories of the cache; one left by a killed process
is removed by the next download, conversion or `pyllm rm` (stale_temporaries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from . import __version__
from .errors import PyllmError
from .formats.gguf_split import split_name, split_parts
from .formats.packed import FORMAT_VERSION
from .formats.safetensors import FormatError, _umask, partial_file, verify_header

# the code and data a conversion runs, relative to the package: sources read (tokenizers, chat
# templates, GGUF types), architectures, file format, quantizers, calibration text
CONVERTER_SOURCES = ("convert", "formats", "arch", "quant.py", "data/calibration")


def converter_revision(package: str | None = None) -> str:
    """A short hash of CONVERTER_SOURCES' bytes (under `package`, default this package's directory).
    Part of CONVERTER_VERSION, so that a conversion cached by a pyllm whose converter has changed
    since is made again: the version string alone stayed "0.1.0" while GGUF tokenizers, RoPE scaling
    and the quantizer were fixed, and a cached file kept the old behaviour in silence."""
    package = package or os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for rel in CONVERTER_SOURCES:
        path = os.path.join(package, rel)
        if not os.path.exists(path):  # (an install without one: the rest still keys the conversions)
            continue
        if os.path.isdir(path):
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                           if not n.endswith((".pyc", ".pyo")) and "__pycache__" not in d)
        else:
            files = [path]
        for name in files:
            digest.update(os.path.relpath(name, package).encode())
            with open(name, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


CONVERTER_VERSION = f"pyllm {__version__}, format {FORMAT_VERSION}, converter {converter_revision()}"
SIDECAR_SUFFIX = ".json"
MODEL_SUFFIX = ".pllm"


def cache_dir() -> str:
    """$XDG_CACHE_HOME/pyllm (default ~/.cache/pyllm): the default model, converted models, chat history.
    A relative $XDG_CACHE_HOME is ignored, as the XDG Base Directory spec says (it made a cache, and a
    conversion of every model, in each directory pyllm was started from)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyllm")


# Work directories in the cache (a download, a conversion's GGUF file): "pyllm-tmp-PID-XXXXXXXX", with a
# LOCK_NAME file the owner holds an flock on for the directory's life. A SIGKILL, an OOM kill or a power
# cut leaves one behind (the default model's download left a ~100 MB "tmpXXXXXXXX" for ever):
# remove_stale_temporaries removes those whose lock no process holds any more.
TEMP_PREFIX = "pyllm-tmp-"
LOCK_NAME = ".lock"
_TEMP_DIR = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-[^/]+$")
_OLD_TEMP_DIR = re.compile(r"tmp[a-z0-9_]{8}$")  # tempfile's names, of earlier pyllm versions: no owner known
OLD_TEMP_AGE = 24 * 3600  # seconds untouched after which such a directory counts as abandoned
# Partial files written beside their target ("NAME.PID.XXXX.partial"; formats.safetensors, write_sidecar)
_PARTIAL = re.compile(r".+\.(\d+)\.[^./]+\.partial$")


def made(directory: str) -> str:
    """directory, created (with its parents) when missing; PyllmError naming it when that fails."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise unwritable(directory, e) from e
    return directory


def unwritable(directory: str, error: OSError) -> PyllmError:
    """The error for a directory pyllm cannot create or write in; in the cache, the way to move it (a
    read-only or missing HOME, as containers have, was a bare "[Errno 2] No such file or directory")."""
    where, cache = os.path.abspath(directory), os.path.abspath(cache_dir())
    reason = "Not a directory" if isinstance(error, FileExistsError) else error.strerror or str(error)  # a file there
    hint = "set XDG_CACHE_HOME to a writable directory"
    if where == cache or cache.startswith(where + os.sep):
        return PyllmError(f"cannot create pyllm's cache {cache} ({hint}): {reason}")
    if where.startswith(cache + os.sep):
        return PyllmError(f"cannot write in {where}, in pyllm's cache ({hint}): {reason}")
    return PyllmError(f"cannot write in {where}: {reason}")


@contextlib.contextmanager
def temporary_directory() -> Iterator[str]:
    """A work directory in the cache, removed when the block ends. It is named with this process's id
    and holds LOCK_NAME, locked (flock) while the directory lives: the lock file is locked under
    another name and renamed into place, so a LOCK_NAME that another process can lock belongs to a
    process that has died (the kernel drops a dead process's locks, whatever killed it)."""
    import fcntl

    try:
        tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=made(cache_dir()))
    except OSError as e:
        raise unwritable(cache_dir(), e) from e
    fd = os.open(os.path.join(tmp, LOCK_NAME + ".new"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(os.path.join(tmp, LOCK_NAME + ".new"), os.path.join(tmp, LOCK_NAME))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _process_lives(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no pid is: kept all the same
        return True
    return True


def _temp_is_stale(path: str, pid: int) -> bool:
    """Whether no live process owns the work directory `path` (named with the id of the process that
    made it): its lock can be taken, or (before the owner put the lock in place) that process is gone."""
    import fcntl

    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return not _process_lives(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: the owner is alive
        return False
    finally:
        os.close(fd)  # (the lock with it: a directory found stale is removed at once)
    return True


def stale_temporaries(directory: str | None = None) -> list[str]:
    """Paths of the work directories and partial files in the cache that no live process owns: left
    by a process that was killed (see temporary_directory), or tempfile-named directories of an older
    pyllm untouched for OLD_TEMP_AGE seconds. Never a cache entry, never what a live process writes."""
    directory = directory or cache_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    stale = []
    for name in names:
        full = os.path.join(directory, name)
        if os.path.islink(full):
            continue
        if os.path.isdir(full):
            if m := _TEMP_DIR.match(name):
                if _temp_is_stale(full, int(m.group(1))):
                    stale.append(full)
            elif _OLD_TEMP_DIR.match(name) and _untouched_for(full, OLD_TEMP_AGE):
                stale.append(full)
        elif (m := _PARTIAL.match(name)) and os.path.isfile(full) and not _process_lives(int(m.group(1))):
            stale.append(full)
        elif _is_stale_lock(full):
            stale.append(full)  # an entry's lock left by a conversion that failed or was killed
    return stale


def _is_stale_lock(path: str) -> bool:
    """Whether path is an entry's lock file without its entry that no process holds."""
    return (path.endswith(LOCK_SUFFIX) and os.path.isfile(path) and not os.path.islink(path)
            and not os.path.exists(path[:-len(LOCK_SUFFIX)] + MODEL_SUFFIX) and _lock_is_free(path))


def _remove_stale_lock(path: str) -> None:
    """Removes the leftover lock file path while holding its lock, as entry_lock expects (it checks, once it
    holds a lock, that its file is still the one at the path): removed after a look that found it free, it
    could be taken meanwhile by a conversion starting, and the next one made a new lock file and converted
    the same entry beside it. Kept when it cannot be taken, or its entry is there now."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(path)) and \
                not os.path.exists(path[:-len(LOCK_SUFFIX)] + MODEL_SUFFIX):
            os.unlink(path)
    except OSError:  # held: in use again
        pass
    finally:
        os.close(fd)


def _lock_is_free(path: str) -> bool:
    """Whether no process holds the flock of the file path (it can be taken, and is let go at once)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def partial_dir(target: str) -> str:
    """A new, empty directory beside target to write target's contents in before it is renamed into
    place: "NAME.PID.XXXX.partial", unique, so that two writers of one target never share it, and
    named with this process's id, so that one left by a killed process is told from one being
    written (remove_stale_partials)."""
    directory = os.path.dirname(os.path.abspath(target))
    try:
        tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(target)}.{os.getpid()}.", suffix=".partial",
                               dir=made(directory))
    except OSError as e:
        raise unwritable(directory, e) from e
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700): give it the mode os.mkdir would
    return tmp


def remove_stale_partials(target: str) -> None:
    """Removes target's partial files and directories ("NAME.PID.XXXX.partial" beside it) whose
    process no longer runs: left by a write that was killed. Those of live processes are kept."""
    directory, base = os.path.split(os.path.abspath(target))
    for name, pid, full in _partials_in(directory):
        if not name.startswith(base + ".") or name.count(".") != base.count(".") + 3:
            continue  # (another target's: "NAME.PID.XXXX.partial" has three dots more than NAME)
        if not _process_lives(pid):
            _remove_entry(full)


def remove_own_partials(directory: str) -> None:
    """Removes the partial files and directories ("NAME.PID.XXXX.partial") in directory that this
    process made: on a failed write's way out, for one a signal left between its creation and the
    `try` that would have removed it."""
    for _, pid, full in _partials_in(directory):
        if pid == os.getpid():
            _remove_entry(full)


def _partials_in(directory: str):
    """(name, the writer's process id, path) of each partial file or directory in directory (not links)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _PARTIAL.match(name)
        full = os.path.join(directory, name)
        if m is not None and not os.path.islink(full):
            yield name, int(m.group(1)), full


def _remove_entry(full: str) -> None:
    if os.path.isdir(full):
        shutil.rmtree(full, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)


def _untouched_for(path: str, seconds: float) -> bool:
    """Whether neither the directory nor any file in it changed in the last `seconds`."""
    limit = time.time() - seconds
    try:
        for root, _, files in os.walk(path):
            if os.stat(root).st_mtime > limit or any(os.lstat(os.path.join(root, f)).st_mtime > limit for f in files):
                return False
    except OSError:
        return False
    return True


def remove_stale_temporaries(log=None) -> int:
    """Removes stale_temporaries() (said on log); returns the bytes freed."""
    freed = 0
    for path in stale_temporaries():
        size = size_of(path)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif path.endswith(LOCK_SUFFIX):
            _remove_stale_lock(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if not os.path.lexists(path):
            freed += size
            if log is not None:
                print(f"pyllm: removed {path}, left by an interrupted download or conversion "
                      f"({size / 1e6:.1f} MB)", file=log)
    return freed


def size_of(path: str) -> int:
    """Bytes of a file, or of the files in a directory (0 when it vanished)."""
    try:
        if not os.path.isdir(path):
            return os.lstat(path).st_size
        return sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(path) for f in files)
    except OSError:
        return 0


def model_kind(path: str) -> str:
    """"pllm", "gguf" or "hf" (a Hugging Face directory). Whatever is not a directory or a GGUF file
    counts as "pllm", whose reader refuses (without opening) what is missing or not a regular file."""
    if os.path.isdir(path):
        from .convert.checkpoint import hub_cache_hint, present

        has_config = present(os.path.join(path, "config.json"))  # (a link to a blob never downloaded: named)
        if not has_config and os.path.isfile(os.path.join(path, "adapter_config.json")):
            # (`pyllm run ADAPTER_DIR` after `pyllm train -o ADAPTER_DIR` said only "not a Hugging Face model
            # directory"): an adapter runs on its base, stored with it in one file
            raise FormatError(f"{path} is a PEFT adapter directory (adapter_config.json), not a model: store it "
                              f"with its base model, `pyllm convert BASE --lora {path} -o tuned.pllm` (LoRA, merged) "
                              f"or `--adapter NAME={path}` (prompt learning, then `pyllm run FILE --adapter NAME`), "
                              "and run that file")
        if not has_config:
            hint = hub_cache_hint(path)
            if hint:
                raise FormatError(hint)
            raise FormatError(f"{path} is not a regular file but a directory without a config.json: not a Hugging "
                              "Face model directory either")
        return "hf"
    if not os.path.isfile(path):  # missing, a FIFO, a device: never opened here (a FIFO would block)
        return "pllm"
    with open(path, "rb") as f:
        magic = f.read(4)
    return "gguf" if magic == b"GGUF" else "pllm"


def model_source(path: str) -> str:
    """The path a source is cached by: a split GGUF model's first shard, whichever shard is named
    (each was an entry of its own, converted again), else path. A later shard is read to be sure it
    is one (its metadata is a few keys): a whole model named like one was taken for its neighbour."""
    first = split_parts(path)[0]
    if first == path or not os.path.isfile(first) or not os.path.isfile(path):
        return path
    try:
        from .convert.gguf_source import open_gguf_reader

        is_shard = "split.count" in open_gguf_reader(path).fields
    except Exception:  # not a readable GGUF file: converting it says why
        return path
    return first if is_shard else path


def source_fingerprint(path: str) -> dict:
    """Sizes and modification times (ns) of a source file (of every shard of a split GGUF model: one
    downloaded again went unseen), or of the files of a source directory."""
    shards = split_parts(path)
    if len(shards) > 1 and shards[0] == path:  # (model_source: a split model is named by its first shard)
        files = {}
        for shard in shards:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(shard)
                files[os.path.basename(shard)] = [st.st_size, st.st_mtime_ns]
        return {"files": files, "size": sum(v[0] for v in files.values())}
    if os.path.isdir(path):
        # subfolders too (by relative path): an index may keep the shards in one ("weights/model-00001-
        # of-00002.safetensors"), and a shard replaced there went unseen, the old conversion reused
        files = {}
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                full = os.path.join(root, name)
                if not name.startswith(".") and os.path.isfile(full):
                    st = os.stat(full)
                    files[os.path.relpath(full, path).replace(os.sep, "/")] = [st.st_size, st.st_mtime_ns]
        return {"files": files, "size": sum(v[0] for v in files.values())}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def entry_fingerprint(source: str, settings: dict) -> dict:
    """source_fingerprint of a cache entry's source, with those of the LoRA adapters merged into it."""
    fingerprint = source_fingerprint(source)
    lora = settings.get("lora")
    if isinstance(lora, list) and lora:
        fingerprint["lora"] = [source_fingerprint(a) for a in lora]
    return fingerprint


def conversion_settings(kind: str, quant: str | None) -> dict:
    """The settings a source is converted with (part of the cache key, and printed)."""
    if quant is not None:
        return {"quant": quant}
    return {"quant": "source formats" if kind == "gguf" else "f16"}


@dataclass
class CacheEntry:
    path: str  # the .pllm file
    size: int  # bytes
    source: str  # where it came from ("" when unknown)
    settings: dict
    stale: bool  # the source changed or vanished since the conversion
    damaged: bool = False  # the .pllm is not the file it was written as (damage_of: its size, its header)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _entry_stem(source: str, settings: dict) -> str:
    base = os.path.basename(os.path.normpath(source))
    stem = base[:-5] if base.lower().endswith(".gguf") else base
    if (shard := split_name(source)) is not None:  # "model", not "model-00001-of-00003"
        stem = os.path.basename(shard[0])
    key = hashlib.sha256(json.dumps([source, settings], sort_keys=True).encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{key}"


def read_sidecar(model_path: str) -> dict | None:
    """The JSON object beside a cached .pllm (source, settings, fingerprint, converter), or None."""
    try:
        with open(model_path[:-len(MODEL_SUFFIX)] + SIDECAR_SUFFIX, encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def damage_of(model_path: str, info: dict | None = None) -> str | None:
    """Why a cached .pllm is not the file its conversion wrote (its size differs from the one the
    sidecar recorded: truncated by a full disk or a copy, emptied, replaced; or its header no longer
    reads or matches its checksum, overwritten in place), or None when it is (or when the sidecar,
    from an older pyllm, recorded no size). The tensors' bytes are not read (`pyllm verify` checks them)."""
    info = read_sidecar(model_path) if info is None else info
    recorded = info.get("pllm_size") if isinstance(info, dict) else None
    if not isinstance(recorded, int):
        return None
    size = os.path.getsize(model_path)
    if size != recorded:
        return f"{size} bytes, {recorded} when it was converted"
    from .formats.packed import PackedModel

    try:  # the header, checked as a load checks it: a file of the right size damaged in place failed every run
        with PackedModel(model_path) as model:
            verify_header(model.file)  # and against its checksum: a flipped digit of the config loaded
    except FormatError as e:
        return str(e).removeprefix(f"{model_path}: ")
    except OSError:  # unreadable (its mode) or gone since: not damage seen here; opening it says why
        return None
    return None


def write_sidecar(model_path: str, info: dict) -> None:
    """Writes the sidecar of a cached .pllm atomically, with the .pllm's size (see damage_of)."""
    info = {**info, "pllm_size": os.path.getsize(model_path)}
    target = model_path[:-len(MODEL_SUFFIX)] + SIDECAR_SUFFIX
    # the mode open() gives, as its .pllm has (a cache shared by a group or prepared by another user
    # could read the model but not a private sidecar, and converted it again)
    fd, tmp = partial_file(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _describe(settings: dict) -> str:
    """"quant f16, lora /a, /b": a list (the LoRA adapters) as its items, not Python's ['/a', '/b']."""
    return ", ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items())


def resolve_model(path: str | os.PathLike, quant: str | None = None, log=None, lora=()) -> str:
    """The .pllm file to open for `path` (a .pllm, a GGUF file or a Hugging Face directory).

    A GGUF file or a directory is converted into the cache on first use (quant: the convert
    command's --quant; None: f16 for a directory, the source's formats for GGUF; lora: PEFT LoRA
    adapter directories merged while converting, as convert's --lora), with the settings and the
    destination printed on log; later calls reuse the file while the source (and the adapters) are
    unchanged. Raises FileNotFoundError for a missing path, FormatError for something that is no model."""
    log = log or sys.stderr
    path = os.fspath(path)
    if not os.path.lexists(path):
        return _cached_by_name(path, quant, lora, log)
    kind = model_kind(path)
    if kind == "pllm":
        if quant is not None:
            raise ValueError(f"{path} is already a .pllm file: --quant applies to GGUF files and model directories")
        if lora:  # its weights are converted already: a LoRA adapter is merged into the float weights
            raise ValueError(f"{path} is already a .pllm file: --lora merges an adapter while converting a model "
                             "directory (give the base model's directory), or `pyllm convert BASE --lora ADAPTER -o "
                             "tuned.pllm`")
        return path
    if lora and kind == "gguf":  # (said after "converting the GGUF file ...", by the converter)
        raise FormatError(f"--lora needs a Hugging Face base directory (the float weights the adapter was trained "
                          f"on); {path} is a GGUF file, whose weights are quantized already")
    if lora:
        from .convert.lora import LoraAdapter

        for adapter in lora:
            LoraAdapter(adapter)  # a missing one, or not a LoRA adapter, named before any conversion
    source = model_source(os.path.abspath(path))
    settings = conversion_settings(kind, quant)
    if lora:  # the adapters are part of the entry: its key, and its fingerprint (retrained: converted again)
        settings["lora"] = [os.path.abspath(a) for a in lora]
    fingerprint = entry_fingerprint(source, settings)
    target = os.path.join(made(cache_dir()), _entry_stem(source, settings) + MODEL_SUFFIX)
    if _reusable(target, source, settings, fingerprint, log):
        return target
    # one conversion of an entry at a time: processes started together (`pyllm serve` workers, a job
    # array) each converted the same model, N times the memory and the time; the others wait, then reuse it
    with entry_lock(target, source, log):
        # looked at again whether or not this one waited: another process or thread may have converted it
        # and let go of the lock between the look above and this lock (each converted it, one after the other)
        if _reusable(target, source, settings, fingerprint, log, quiet=True):
            return target
        _convert_into(target, source, kind, settings, fingerprint, quant, log)
    return target


def _cached_by_name(name: str, quant: str | None, lora, log) -> str:
    """The cache entry a missing path names as `pyllm list` shows it (`pyllm run tiny-1a2b3c4d5e`, as `ollama
    run NAME`); FileNotFoundError saying what a model argument may be otherwise (it was "cannot read llama3:
    No such file or directory")."""
    plain = name.strip() and os.sep not in name and not (os.altsep and os.altsep in name) and "\0" not in name
    wanted = name[:-len(MODEL_SUFFIX)] if name.endswith(MODEL_SUFFIX) else name
    matches = [e for e in list_entries() if e.name[:-len(MODEL_SUFFIX)] == wanted] if plain else []
    if matches and not quant and not lora:
        print(f"pyllm: using {matches[0].path} (the cached {matches[0].name}"
              f"{f', converted from {matches[0].source}' if matches[0].source else ''})", file=log)
        return matches[0].path
    # (worded as the model reader's own "cannot read PATH: No such file or directory")
    raise FileNotFoundError(f"cannot read {name}: No such file or directory (a model is a .pllm file, a GGUF file, a "
                            "Hugging Face model directory" + (" or a cached model's name: `pyllm list`)" if plain else ")"))


def _reusable(target: str, source: str, settings: dict, fingerprint: dict, log, quiet: bool = False) -> bool:
    """Whether the cache entry target holds source's conversion with settings, undamaged (said on log; a
    damaged one only unless quiet: said once, by the look before the lock)."""
    info = read_sidecar(target)
    if (os.path.isfile(target) and info is not None and info.get("fingerprint") == fingerprint
            and info.get("converter") == CONVERTER_VERSION):
        damage = damage_of(target, info)
        if damage is None:
            print(f"pyllm: using {target} (converted from {source}; {_describe(settings)})", file=log)
            return True
        if not quiet:
            print(f"pyllm: the cached {target} is damaged ({damage})", file=log)
    return False


LOCK_SUFFIX = ".lock"  # beside an entry: held (flock) while it is converted


@contextlib.contextmanager
def entry_lock(target: str, source: str, log, doing: str = "converting", keep: bool = True,
               wait: bool = True) -> Iterator[bool]:
    """Holds the lock of cache entry target (a .pllm path; source: what it is made from, and doing: what
    is done to it, for the message): a LOCK_SUFFIX file beside it, kept unless keep is False or the body
    raised and left no entry (a process waiting on a lock file removed meanwhile opens it again: whoever
    removes a lock file removes it while holding it). Yields whether another process (or thread: an flock
    belongs to each open file) held it first; with wait False, raises BlockingIOError instead of waiting.

    The wait has no time bound (a conversion with calibration takes hours), but ends with the holder: the
    kernel drops a dead process's lock, whatever killed it; Ctrl-C stops it (flock returns to run the
    signal's handler)."""
    import fcntl

    path = target[:-len(MODEL_SUFFIX)] + LOCK_SUFFIX
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666 & ~_umask())
        except OSError as e:
            raise unwritable(os.path.dirname(path), e) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                if not waited:
                    print(f"pyllm: another process or thread is {doing} {source} into {target}: waiting for it "
                          "(Ctrl-C stops waiting)", file=log)
                fcntl.flock(fd, fcntl.LOCK_EX)
                waited = True
            # a lock file found free without an entry is removed as a leftover (stale_temporaries): held on
            # a file no longer at `path`, this lock would not keep out a process opening the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:  # (Ctrl-C while waiting)
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    done = False
    try:
        yield waited
        done = True
    finally:
        # a conversion that failed (or was stopped) leaves no entry: its lock file would be taken for an
        # interrupted one's leftover by the next run and `pyllm list`
        if not keep or (not done and not os.path.exists(target)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)  # (the lock with it)


def _convert_into(target: str, source: str, kind: str, settings: dict, fingerprint: dict, quant: str | None,
                  log) -> None:
    """Converts source into the cache entry target (its lock held) and writes its sidecar."""
    from .convert import convert_checkpoint

    remove_stale_temporaries(log)
    what = "GGUF file" if kind == "gguf" else "Hugging Face directory"
    print(f"pyllm: converting the {what} {source} ({_describe(settings)}) into {target}; "
          "later runs reuse it while the source is unchanged (`pyllm list`, `pyllm rm`)", file=log)
    report = convert_checkpoint(source, target, quant=quant, log=log, lora=settings.get("lora", ()))
    # the sidecar first: a log that fails now (a closed pipe) must not leave an entry `pyllm rm` cannot name
    write_sidecar(target, {"source": source, "kind": kind, "settings": settings, "fingerprint": fingerprint,
                           "converter": CONVERTER_VERSION, "converted": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(report.summary(), file=log)


def list_entries() -> list[CacheEntry]:
    """The .pllm files in the cache directory, by name."""
    directory = cache_dir()
    if os.path.lexists(directory) and not os.path.isdir(directory):  # (it listed "no models", exit 0)
        raise NotADirectoryError(f"the cache {directory} is not a directory: move it aside, or set XDG_CACHE_HOME "
                                 "to another place")
    if not os.path.isdir(directory):
        return []
    entries = []
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if not name.endswith(MODEL_SUFFIX) or not os.path.isfile(full):
            continue
        info = read_sidecar(full) or {}  # whatever its JSON holds (edited, from another version): never fatal
        source = info.get("source")
        source = source if isinstance(source, str) else ""
        settings = info.get("settings")
        settings = {str(k): v for k, v in settings.items()} if isinstance(settings, dict) else {}
        stale = False
        if info.get("kind") in ("gguf", "hf"):
            try:
                stale = entry_fingerprint(source, settings) != info.get("fingerprint")
            except (OSError, ValueError, TypeError):  # gone, or no path at all ("", a NUL in it, not a str)
                stale = True
        entries.append(CacheEntry(full, os.path.getsize(full), source, settings, stale,
                                  damage_of(full, info) is not None))
    return entries


def format_entries(entries: list[CacheEntry]) -> str:
    """The table `pyllm list` prints."""
    if not entries:
        return f"(no models in {cache_dir()})"
    width = max(len(e.name) for e in entries)
    lines = [f"{'NAME':<{width}}  {'SIZE':>9}  SOURCE"]
    for e in entries:
        note = " (source changed or gone: converted again on next use)" if e.stale else ""
        if e.damaged:
            note += " (damaged, not the file it was converted to: made again on next use)"
        settings = f" [{_describe(e.settings)}]" if e.settings else ""
        lines.append(f"{e.name:<{width}}  {e.size / 1e6:>6.1f} MB  {e.source or '?'}{settings}{note}")
    lines.append(f"in {cache_dir()}; total {sum(e.size for e in entries) / 1e6:.1f} MB")
    return "\n".join(lines)


def find_entries(name: str) -> list[CacheEntry]:
    """The cache entries `name` names: a plain file name as `pyllm list` shows it (with or without
    .pllm), or the path of a converted source. PyllmError when it names none.

    An empty or blank name names nothing: `pyllm rm "$MODEL"` with MODEL unset used to take the
    working directory's conversions, as abspath("") is the working directory. Only a plain name (no
    separator, not "." or "..") is a file name; a path is compared with the recorded sources as the
    file system resolves both (realpath), so "link/../b" names what the system opens, not the
    lexical "./b"."""
    from .errors import PyllmError

    if not name.strip() or "\0" in name:
        raise PyllmError(f"{name!r} names no cached model: give a file name as `pyllm list` shows it, or the "
                         "path of a converted source")
    plain = name not in (".", "..") and os.sep not in name and not (os.altsep and os.altsep in name)
    wanted = name[:-len(MODEL_SUFFIX)] if name.endswith(MODEL_SUFFIX) else name
    source = os.path.realpath(model_source(name))
    entries = list_entries()
    matches = [e for e in entries if (plain and e.name[:-len(MODEL_SUFFIX)] == wanted)
               or (e.source and os.path.realpath(e.source) == source)]
    if not matches:
        known = ", ".join(e.name for e in entries) or "none"
        raise PyllmError(f"no cached model {name!r} (cached: {known}; `pyllm list` shows them)")
    return matches


def remove_entries(entries: list[CacheEntry]) -> list[str]:
    """Deletes the entries' .pllm files, sidecars and lock files (nothing else); returns the removed .pllm
    paths. Each entry's lock is taken first, without waiting: PyllmError naming an entry another process
    or thread converts or fetches (and nothing removed). Removing its files, and the lock file with them,
    let that process put its file back when done (or fail writing its sidecar), and let the next one make
    a new lock file and convert the entry at the same time. An entry a running model has open is removed
    at once: the model maps its file, whose data the system keeps until it is closed."""
    removed = []
    with contextlib.ExitStack() as locks:
        for e in entries:
            if e.path in removed:  # named twice
                continue
            try:
                locks.enter_context(entry_lock(e.path, e.source, None, keep=False, wait=False))
            except BlockingIOError:
                raise PyllmError(f"{e.name} is being converted or fetched by another process (or thread): "
                                 f"`pyllm rm {e.name}` once it ends") from None
            removed.append(e.path)
        for path in removed:
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path[:-len(MODEL_SUFFIX)] + SIDECAR_SUFFIX)
    return removed


def remove_entry(name: str) -> list[str]:
    """Removes the cache entries named `name` (see find_entries). Returns the removed .pllm paths;
    PyllmError when nothing matches."""
    return remove_entries(find_entries(name))
