"""Calibration: second moments of every linear layer's input on a small text, from pyllm's own engine.

GPTQ needs, for each matrix W [out, in], the Hessian of its layer-wise squared error,
H = sum over calibration positions of x x^T (x: the matrix's input [in]). Matrices reading the same
input share it: q/k/v (the normalised residual stream before attention), gate/up (before the
feed-forward block); o_proj reads the attention output, down_proj the activated product.

The inputs come from the C++ engine (Engine.observe_inputs) running a float32 copy of the model
(written once to a temporary .pllm file) over the calibration windows: the same described forward
pass that serves users, for every architecture in pyllm.arch, no numpy re-implementation.

The built-in calibration set mixes kinds of text and languages, so that the rounding fitted on it
holds on text it has not seen (docs/QUALITY.md measures it on four held-out domains):

  english-prose  pyllm/data/calibration/en.txt: stories, news, a letter, a recipe, history, science
  chinese-prose  pyllm/data/calibration/zh.txt: the same kinds of text in modern Chinese
  chat           pyllm/data/calibration/chat.json: dialogues (English and Chinese) rendered with the
                 model's own chat template (plain "role: text" lines when it has none)
  docstrings     the docstrings of CALIBRATION_MODULES (standard library) and their public members
  code           the source code of CODE_MODULES (standard library)

The bundled files were written for pyllm; the rest comes from the running Python. Windows are taken
from the domains in turn (one window each, round after round) until `sequences` windows are
collected, so every domain is represented even at a few windows. None of it shares a 64-character
span with the evaluation texts (pyllm.eval_texts; tests/test_calibration_set.py).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile

import numpy as np

from ..formats.packed import ModelConfig
from ..progress import progress_bar

CALIBRATION_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                       "functools", "heapq", "http.client", "itertools", "json", "logging", "os", "pathlib",
                       "random", "re", "shutil", "statistics", "string", "subprocess", "textwrap", "threading",
                       "unittest", "urllib.parse", "zipfile")
CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "shlex", "dataclasses", "calendar", "graphlib",
                "colorsys", "statistics")
CALIBRATION_DOMAINS = ("english-prose", "chinese-prose", "chat", "docstrings", "code")
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "calibration")
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


def _bundled(name: str) -> str:
    with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
        return f.read()


def chat_calibration_text(chat_template: str, bos_token: str = "", eos_token: str = "") -> str:
    """The bundled dialogues rendered with `chat_template` (a Jinja chat template; '' or a template that
    fails on them: "role: content" lines), one after the other."""
    import json

    from ..chat_template import TemplateError, render_chat

    dialogues = json.loads(_bundled("chat.json"))
    parts = []
    for dialogue in dialogues:
        messages = [{"role": role, "content": content} for role, content in dialogue]
        try:
            parts.append(render_chat(chat_template, messages, add_generation_prompt=False, bos_token=bos_token,
                                     eos_token=eos_token))
        except TemplateError:  # no template, or one that refuses these roles: plain lines keep the text
            parts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n")
    return "\n".join(parts)


def code_calibration_text() -> str:
    """The source code of CODE_MODULES, one after the other."""
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


def builtin_calibration_texts(chat_template: str = "", bos_token: str = "", eos_token: str = "") -> dict[str, str]:
    """The built-in calibration set: CALIBRATION_DOMAINS name -> text (see the module's docstring)."""
    return {"english-prose": _bundled("en.txt"), "chinese-prose": _bundled("zh.txt"),
            "chat": chat_calibration_text(chat_template, bos_token, eos_token),
            "docstrings": default_calibration_text(), "code": code_calibration_text()}


def interleaved_windows(domains: dict[str, list[int]], length: int, count: int,
                        bos_id: int | None) -> tuple[list[np.ndarray], list[str]]:
    """Windows of up to `length` tokens taken from each domain's token ids in turn (its next window, round
    after round; a domain's last, shorter window counts when it has at least length/4 tokens) until
    `count` windows are taken or every domain is used up. Returns (windows, the domain of each)."""
    per_domain = {}
    for name, ids in domains.items():
        starts = [s for s in range(0, len(ids), length) if len(ids) - s >= max(length // 4, 2)]
        per_domain[name] = [ids[s:s + length] for s in starts]
    windows, names = [], []
    for round_ in range(max((len(v) for v in per_domain.values()), default=0)):
        for name, chunks in per_domain.items():
            if round_ < len(chunks) and len(windows) < count:
                ids = np.array(chunks[round_], dtype=np.int64)
                if bos_id is not None:
                    ids[0] = bos_id
                windows.append(ids)
                names.append(name)
    if not windows:
        raise ValueError("the calibration set has no window of at least a quarter of "
                         f"{length} tokens")
    return windows, names


def encode_prefix(tokenizer, text: str, tokens: int) -> list[int]:
    """The token ids of the shortest prefix of `text` ending at a line break that gives at least `tokens`
    ids (all of `text` when it has fewer): no window needs more, and tokenizing all of a long text
    would cost seconds."""
    limit = 4 * tokens
    while True:
        cut = len(text) if limit >= len(text) else (text.rfind("\n", 0, limit) + 1 or limit)
        ids = tokenizer.encode(text[:cut], add_special_tokens=False)
        if len(ids) >= tokens or cut >= len(text):
            return ids
        limit *= 2


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


def _token_text(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)


def load_matrix(load, base: str, shape: tuple[int, int]) -> np.ndarray:
    """load(name) -> array; the matrix `base` as f32, checked against the config's shape (a mismatch
    named by its file and source tensor when load is a source's method)."""
    from ..formats.safetensors import FormatError
    from .pipeline import where

    w = load(base + ".weight")
    if tuple(w.shape) != tuple(shape):
        source = getattr(load, "__self__", None)
        label = where(source, base + ".weight") if source is not None else f"tensor '{base}.weight'"
        raise FormatError(f"{label} has shape {list(w.shape)}, config implies {list(shape)}")
    return np.asarray(w, dtype=np.float32)


class HessianSums:
    """sum x^T x of every observed matrix input, computed beside the engine's forward pass.

    observe(layer, input_index, x f32 [M, in]) is the Engine.observe_inputs callback: it queues x (the
    engine hands each callback a fresh copy and does not touch it again) and returns, and worker
    threads add x^T x (one BLAS syrk, single-threaded) to that input's sum while the engine runs on
    (its own threads): the forward pass and the products overlap
    instead of taking turns, and the products run where BLAS threads would mostly wait. The products
    are f32, their sums f64 (f32 sums differ by ~4e-7 relative, which is enough to move GPTQ's
    rounding and perplexity by +-0.2% on 8 windows), the Hessians stored f32.
    WORKERS threads, each owning the inputs of every WORKERS-th layer: each input's products are
    single-threaded and added in arrival order by one thread, so the sums are the same bits whatever
    the number of workers. The 1.1B shapes spend 4-5x the forward's time on the products (inputs of
    2048 and 5632 columns): with two workers a 512-token window took 11.7-12.8 s instead of
    17.4-19.5 (the same sums, bit for bit); SmolLM2's windows as fast as with one.
    Use as a context manager around the forward passes; an error of a worker is raised on exit."""

    WORKERS = 2
    QUEUED = 4  # inputs waiting for each worker at most (memory: WORKERS x 4 x M x in floats)

    def __init__(self):
        import queue

        self.sums: dict[str, np.ndarray] = {}
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=self.QUEUED) for _ in range(self.WORKERS)]
        self._error: BaseException | None = None
        self._limits = None
        self._workers: list = []

    def __enter__(self) -> "HessianSums":
        import threading

        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(limits=1, user_api="blas")
        self._workers = [threading.Thread(target=self._work, args=(q,), name=f"pyllm-hessians-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for worker in self._workers:
            worker.start()
        return self

    def observe(self, layer: int, input_index: int, x: np.ndarray) -> None:
        if self._error is not None:
            raise RuntimeError(f"calibration: summing an input's second moments failed: {self._error}")
        self._queues[layer % self.WORKERS].put((f"model.layers.{layer}.{INPUT_NAMES[input_index]}",
                                                np.asarray(x, dtype=np.float32)))

    def _work(self, inputs) -> None:
        while (item := inputs.get()) is not None:
            name, x = item
            try:
                if self._error is None:
                    product = x.T @ x
                    if name in self.sums:
                        self.sums[name] += product  # f64 += f32, converted as it is added
                    else:
                        self.sums[name] = product.astype(np.float64)
            except BaseException as e:  # noqa: BLE001 (kept and raised in the caller's thread)
                self._error = e

    def __exit__(self, *exc) -> None:
        for inputs in self._queues:
            inputs.put(None)
        for worker in self._workers:
            worker.join()
        self._limits.restore_original_limits()
        if self._error is not None and exc[0] is None:
            raise RuntimeError(f"calibration: summing an input's second moments failed: {self._error}") from self._error

    def means(self, count: int) -> dict[str, np.ndarray]:
        """The sums divided by the number of positions observed: the Hessians."""
        return {name: (s / count).astype(np.float32) for name, s in self.sums.items()}


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
        tokenizer = Tokenizer(spec, blob)
        length = min(length, config.max_position_embeddings)
        bos_id = spec.bos_token_id if spec.add_bos_token else None
        if text is None:
            texts = builtin_calibration_texts(source.chat_template(), _token_text(tokenizer, spec.bos_token_id),
                                              _token_text(tokenizer, (spec.eos_token_ids or [None])[0]))
            self.windows, self.domains = interleaved_windows(
                {name: encode_prefix(tokenizer, t, sequences * length) for name, t in texts.items()}, length,
                sequences, bos_id)
        else:
            self.windows = calibration_windows(tokenizer.encode(text, add_special_tokens=False), length, sequences,
                                               bos_id)
            self.domains = ["file"] * len(self.windows)
        sums = HessianSums()
        count = 0
        with tempfile.TemporaryDirectory(prefix="pyllm-calibration-") as tmp:
            path = os.path.join(tmp, "float.pllm")
            write_float_model(source, config, path, progress=progress, log=log)
            model = PackedModel(path)
            try:
                engine = _core.Engine(path, model.file.data_offset, model.engine_tensors(), model.linears,
                                      model.engine_config(), max(len(w) for w in self.windows), 0, "f32")
                bar = progress_bar(len(self.windows), f"calibrating on {len(self.windows)} windows", "window",
                                   progress, log)
                with sums:
                    for window in self.windows:
                        engine.observe_inputs(window.astype(np.int32), 0, sums.observe)
                        count += len(window)
                        bar.update(1)
                bar.close()
                del engine
            finally:
                model.close()
        self.hessians = sums.means(count)

    def domain_counts(self) -> dict[str, int]:
        """Calibration windows per domain (builtin set) or {"file": n} (a text file)."""
        from collections import Counter

        return dict(Counter(self.domains))

    def input_name(self, base: str) -> str:
        """base 'model.layers.{i}.self_attn.q_proj' -> its input's name 'model.layers.{i}.attn_in'."""
        prefix, _, short = base.partition(".self_attn.") if ".self_attn." in base else base.partition(".mlp.")
        short = ("self_attn." if ".self_attn." in base else "mlp.") + short
        return prefix + "." + next(n for n, shorts in INPUTS.items() if short in shorts)

    def input_hessian(self, base: str) -> np.ndarray:
        """The Hessian f64 [cols, cols] of matrix `base`'s input."""
        return self.hessians[self.input_name(base)].astype(np.float64)
