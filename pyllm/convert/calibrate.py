"""Calibration: second moments of every linear layer's input on a small text, from a numpy forward pass.

GPTQ needs, for each matrix W [out, in], the Hessian of its layer-wise squared error,
H = sum over calibration positions of x x^T (x: the matrix's input [in]). Matrices reading the same
input share it: q/k/v (the normalised residual stream before attention), gate/up (before the MLP);
o_proj reads the attention output, down_proj the SwiGLU product.

The forward pass is the LLaMA block in float32 numpy (RMSNorm, rotate-half RoPE through the
engine's own kernels, causal GQA attention, SwiGLU), one sequence at a time; no torch.

The default calibration text needs no download and is disjoint from the perplexity text
(pyllm.perplexity.default_text, Python's documentation topics): the docstrings of a fixed list of
standard-library modules and their public functions and classes.
"""

from __future__ import annotations

import inspect
import sys

import numpy as np

from .. import _core
from ..formats.packed import ModelConfig

CALIBRATION_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                       "functools", "heapq", "http.client", "itertools", "json", "logging", "os", "pathlib",
                       "random", "re", "shutil", "statistics", "string", "subprocess", "textwrap", "threading",
                       "unittest", "urllib.parse", "zipfile")
CALIBRATION_SEQUENCES = 32
CALIBRATION_LENGTH = 512

# input name -> the matrices reading that input
INPUTS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": ("self_attn.o_proj",),
          "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_mid": ("mlp.down_proj",)}


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


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x f32 [M, d], weight [d]."""
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA. q f32 [M, H, D], k/v [M, Hkv, D] -> [M, H * D]."""
    m, heads, dim = q.shape
    group = heads // k.shape[1]
    k = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # [H, D, M]
    v = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # [H, M, D]
    scores = (q.transpose(1, 0, 2) @ k) / np.float32(np.sqrt(dim))  # [H, M, M]
    scores = np.where(np.tril(np.ones((m, m), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v).transpose(1, 0, 2).reshape(m, heads * dim).astype(np.float32)


def layer_forward(h: np.ndarray, p: dict, config: ModelConfig, observe=None) -> np.ndarray:
    """One LLaMA block. h f32 [M, d]; p: this layer's tensors by short name ('self_attn.q_proj', ...
    'input_layernorm'); observe(input_name, x [M, in]) sees every matrix input."""
    m = h.shape[0]
    hd, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    x = rmsnorm(h, p["input_layernorm"], config.rms_norm_eps)
    if observe:
        observe("attn_in", x)
    positions = np.arange(m, dtype=np.int32)
    q = _core.rope((x @ p["self_attn.q_proj"].T).reshape(m, heads, hd), positions, config.rope_theta, config.rope_scaling)
    k = _core.rope((x @ p["self_attn.k_proj"].T).reshape(m, kv, hd), positions, config.rope_theta, config.rope_scaling)
    v = (x @ p["self_attn.v_proj"].T).reshape(m, kv, hd)
    a = attention(q, k, v)
    if observe:
        observe("attn_out", a)
    h = h + a @ p["self_attn.o_proj"].T
    x = rmsnorm(h, p["post_attention_layernorm"], config.rms_norm_eps)
    if observe:
        observe("mlp_in", x)
    mid = _core.swiglu(np.ascontiguousarray(x @ p["mlp.gate_proj"].T), np.ascontiguousarray(x @ p["mlp.up_proj"].T))
    if observe:
        observe("mlp_mid", mid)
    return (h + mid @ p["mlp.down_proj"].T).astype(np.float32)


def load_matrix(load, base: str, shape: tuple[int, int]) -> np.ndarray:
    """load(name) -> array; the matrix `base` as f32, checked against the config's shape."""
    from ..formats.safetensors import FormatError

    w = load(base + ".weight")
    if tuple(w.shape) != tuple(shape):
        raise FormatError(f"'{base}.weight' has shape {list(w.shape)}, config implies {list(shape)}")
    return np.asarray(w, dtype=np.float32)


def layer_tensors(load, config: ModelConfig, i: int) -> dict:
    """Layer i's matrices and norm weights (f32) by short name; load(name) -> array."""
    prefix = f"model.layers.{i}."
    shapes = config.linear_shapes()
    p = {short: load_matrix(load, prefix + short, shapes[prefix + short]) for names in INPUTS.values() for short in names}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        p[norm] = load(prefix + norm + ".weight").reshape(-1).astype(np.float32)
    if config.attention_bias or config.mlp_bias:
        raise ValueError("calibration does not support attention_bias / mlp_bias models")
    return p


def embed(load, windows: list[np.ndarray]) -> list[np.ndarray]:
    table = load("model.embed_tokens.weight")
    return [np.ascontiguousarray(table[ids], dtype=np.float32) for ids in windows]


def layer_hessians(hidden: list[np.ndarray], p: dict, config: ModelConfig) -> tuple[dict, list[np.ndarray]]:
    """Runs every window through one layer: (Hessian f64 [in, in] per input name, the next hidden states).

    Hessians are averaged over positions (H = mean x x^T), so their scale does not depend on the
    amount of text."""
    sums: dict[str, np.ndarray] = {}
    count = 0

    def observe(name, x):  # x f32 [M, in]; products in f32, sums in f64
        sums[name] = sums.get(name, 0) + (x.T @ x).astype(np.float64)

    out = []
    for h in hidden:
        out.append(layer_forward(h, p, config, observe))
        count += h.shape[0]
    return {name: s / count for name, s in sums.items()}, out


def progress_bar(total: int, enabled: bool, desc: str, log=sys.stderr):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, file=log)


class Calibration:
    """Input Hessians of every linear layer of `source`, from one float32 pass over the calibration text.

    Stored as float32 (about 400 MB for SmolLM2-135M); input_hessian(base) gives a matrix's."""

    def __init__(self, source, config: ModelConfig, text: str | None, sequences: int = CALIBRATION_SEQUENCES,
                 length: int = CALIBRATION_LENGTH, progress: bool = True, log=sys.stderr):
        from ..tokenizer import Tokenizer

        spec, blob = source.tokenizer()
        ids = Tokenizer(spec, blob).encode(default_calibration_text() if text is None else text,
                                           add_special_tokens=False)
        self.windows = calibration_windows(ids, min(length, config.max_position_embeddings), sequences,
                                           spec.bos_token_id if spec.add_bos_token else None)
        self.hessians: dict[str, np.ndarray] = {}
        hidden = embed(source.load, self.windows)
        bar = progress_bar(config.num_hidden_layers, progress, f"calibrating on {len(self.windows)} windows", log)
        for i in range(config.num_hidden_layers):
            sums, hidden = layer_hessians(hidden, layer_tensors(source.load, config, i), config)
            for name, h in sums.items():
                self.hessians[f"model.layers.{i}.{name}"] = h.astype(np.float32)
            bar.update(1)
        bar.close()

    def input_name(self, base: str) -> str:
        """base 'model.layers.{i}.self_attn.q_proj' -> its input's name 'model.layers.{i}.attn_in'."""
        prefix, _, short = base.partition(".self_attn.") if ".self_attn." in base else base.partition(".mlp.")
        short = ("self_attn." if ".self_attn." in base else "mlp.") + short
        return prefix + "." + next(n for n, shorts in INPUTS.items() if short in shorts)

    def input_hessian(self, base: str) -> np.ndarray:
        """The Hessian f64 [cols, cols] of matrix `base`'s input."""
        return self.hessians[self.input_name(base)].astype(np.float64)
