"""Calibration: second moments of every linear layer's input on a small text, from pyllm's own engine.

GPTQ needs, for each matrix W [out, in], the Hessian of its layer-wise squared error,
H = sum over calibration positions of x x^T (x: the matrix's input [in]). Matrices reading the same
input share it: q/k/v (the normalised residual stream before attention), gate/up (before the
feed-forward block); o_proj reads the attention output, down_proj the activated product.

The inputs come from the C++ engine (Engine.observe_inputs) running a float32 copy of the model
(written once to a temporary .pllm file) over the calibration windows: the same described forward
pass that serves users, for every architecture in pyllm.arch, no numpy re-implementation.

The default calibration text needs no download and is disjoint from the perplexity text
(pyllm.perplexity.default_text, Python's documentation topics): the docstrings of a fixed list of
standard-library modules and their public functions and classes.
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile

import numpy as np

from ..formats.packed import ModelConfig

CALIBRATION_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                       "functools", "heapq", "http.client", "itertools", "json", "logging", "os", "pathlib",
                       "random", "re", "shutil", "statistics", "string", "subprocess", "textwrap", "threading",
                       "unittest", "urllib.parse", "zipfile")
CALIBRATION_SEQUENCES = 32
CALIBRATION_LENGTH = 512

# input name -> the matrices reading that input, in the engine's order of inputs (observe_inputs)
INPUTS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": ("self_attn.o_proj",),
          "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_mid": ("mlp.down_proj",)}
INPUT_NAMES = tuple(INPUTS)


def default_calibration_text() -> str:
    """Docstrings of CALIBRATION_MODULES (module, then public members in name order)."""
    import importlib

    parts = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc and getattr(getattr(module, attr), "__module__", None) == module.__name__:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def calibration_windows(token_ids: list[int], length: int, count: int, bos_id: int | None) -> list[np.ndarray]:
    """Up to `count` consecutive windows of `length` tokens (BOS first when the model uses one)."""
    windows = []
    for start in range(0, len(token_ids) - length + 1, length):
        ids = np.array(token_ids[start:start + length], dtype=np.int64)
        if bos_id is not None:
            ids[0] = bos_id
        windows.append(ids)
        if len(windows) == count:
            break
    if not windows:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens, fewer than one window of {length}")
    return windows


def load_matrix(load, base: str, shape: tuple[int, int]) -> np.ndarray:
    """load(name) -> array; the matrix `base` as f32, checked against the config's shape."""
    from ..formats.safetensors import FormatError

    w = load(base + ".weight")
    if tuple(w.shape) != tuple(shape):
        raise FormatError(f"'{base}.weight' has shape {list(w.shape)}, config implies {list(shape)}")
    return np.asarray(w, dtype=np.float32)


def progress_bar(total: int, enabled: bool, desc: str, log=sys.stderr, unit: str = "layer"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=log)


class Calibration:
    """Input Hessians of every linear layer of `source`, from one float32 pass over the calibration text.

    source: a conversion source under pyllm's tensor names. Stored as float32 (about 400 MB for
    SmolLM2-135M); input_hessian(base) gives a matrix's."""

    def __init__(self, source, config: ModelConfig, text: str | None, sequences: int = CALIBRATION_SEQUENCES,
                 length: int = CALIBRATION_LENGTH, progress: bool = True, log=sys.stderr):
        from .. import _core
        from ..formats.packed import PackedModel
        from ..tokenizer import Tokenizer
        from .pipeline import write_float_model

        spec, blob = source.tokenizer()
        ids = Tokenizer(spec, blob).encode(default_calibration_text() if text is None else text,
                                           add_special_tokens=False)
        self.windows = calibration_windows(ids, min(length, config.max_position_embeddings), sequences,
                                           spec.bos_token_id if spec.add_bos_token else None)
        sums: dict[str, np.ndarray] = {}
        count = 0

        def observe(layer: int, input_index: int, x: np.ndarray) -> None:  # x f32 [M, in]
            # one BLAS syrk per window (x.T @ x of one buffer), summed in f32: each window's product
            # is already a sum over its positions, so the f32 sum of up to a few hundred windows
            # loses no more than the products do (relative 1e-6, measured against f64 sums)
            name = f"model.layers.{layer}.{INPUT_NAMES[input_index]}"
            if name in sums:
                sums[name] += x.T @ x
            else:
                sums[name] = x.T @ x

        with tempfile.TemporaryDirectory(prefix="pyllm-calibration-") as tmp:
            path = os.path.join(tmp, "float.pllm")
            write_float_model(source, config, path, progress=progress, log=log)
            model = PackedModel(path)
            try:
                engine = _core.Engine(path, model.file.data_offset, model.engine_tensors(), model.linears,
                                      model.engine_config(), max(len(w) for w in self.windows), 0, "f32")
                bar = progress_bar(len(self.windows), progress, f"calibrating on {len(self.windows)} windows", log,
                                   unit="window")
                for window in self.windows:
                    engine.observe_inputs(window.astype(np.int32), 0, observe)
                    count += len(window)
                    bar.update(1)
                bar.close()
                del engine
            finally:
                model.close()
        for s in sums.values():
            s /= count
        self.hessians = sums

    def input_name(self, base: str) -> str:
        """base 'model.layers.{i}.self_attn.q_proj' -> its input's name 'model.layers.{i}.attn_in'."""
        prefix, _, short = base.partition(".self_attn.") if ".self_attn." in base else base.partition(".mlp.")
        short = ("self_attn." if ".self_attn." in base else "mlp.") + short
        return prefix + "." + next(n for n, shorts in INPUTS.items() if short in shorts)

    def input_hessian(self, base: str, dtype=np.float64) -> np.ndarray:
        """The Hessian [cols, cols] of matrix `base`'s input, as `dtype` (float32: the stored array, not a copy)."""
        return self.hessians[self.input_name(base)].astype(dtype, copy=False)
