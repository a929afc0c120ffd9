"""The Python API: pyllm.LLM opens a .pllm file and generates text with the C++ engine."""

from __future__ import annotations

import ctypes
import difflib
import functools
import inspect
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .chat_template import render_chat, resolve_chat_template
from .formats.packed import PackedModel
from .formats.safetensors import FormatError
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_CONTEXT = 4096
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the call nor the model's generation config says
PREFILL_CHUNK = 64  # prompt tokens per engine call: cancel() is honoured between chunks
DEVICES = ("cpu", "cuda")


def engine_module(device: str):
    """The extension module that runs models on `device`: pyllm._core (cpu) or
    pyllm._cuda (cuda, a separate module so that the CPU build never needs CUDA)."""
    if device == "cpu":
        from . import _core

        return _core
    if device == "cuda":
        try:
            from . import _cuda
        except ImportError:
            raise RuntimeError("device='cuda': this pyllm was built without its CUDA backend (install it where "
                               "a CUDA toolkit is found, or force it with PYLLM_CUDA=ON)") from None
        if _cuda.device_count() == 0:
            raise RuntimeError("device='cuda': no CUDA device is available (no NVIDIA GPU or driver)")
        return _cuda
    raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")


# llama-cpp-python's (and OpenAI's) names, accepted for transformers' names in LLM() and generate()/chat()
ALIASES = {
    "n_ctx": "context_length", "max_tokens": "max_new_tokens", "repeat_penalty": "repetition_penalty",
    "model_path": "path", "chat_format": "chat_template", "max_completion_tokens": "max_new_tokens",
}


def accepts_aliases(method):
    """Lets `method` take ALIASES' names for its own keyword arguments, and turns an unknown keyword into
    a TypeError that suggests the nearest known name."""
    params = inspect.signature(method).parameters
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())

    where = method.__qualname__.replace(".__init__", "")

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        for name in list(kwargs):
            if name in known:
                continue
            target = ALIASES.get(name)
            if target in known:
                if target in kwargs:
                    raise TypeError(f"{where}() got both {target!r} and its alias {name!r}")
                kwargs[target] = kwargs.pop(name)
            elif not open_ended:
                close = difflib.get_close_matches(name, known + [a for a, t in ALIASES.items() if t in known], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (it takes: {', '.join(known)})"
                raise TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")
        return method(*args, **kwargs)
    return wrapper


def prompt_type_error(prompt) -> Exception:
    """The error for a prompt that is neither text nor token ids (lists of prompts land here until
    batched generation exists)."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return TypeError(f"a list of {len(prompt)} prompts: lists of prompts are not supported yet; call generate() "
                         "once per prompt")
    return TypeError(f"prompt must be a str or a list of token ids (ints); got {type(prompt).__name__}"
                     + (" with non-int items" if isinstance(prompt, (list, tuple)) else ""))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # seconds from the call to the first generated token
    finish_reason: str = ""  # "stop", "length" (max_new_tokens or the context is full) or "cancelled"
    max_new_tokens: int = 0  # the call's limit

    @property
    def hit_token_limit(self) -> bool:
        """The reply ended because it reached max_new_tokens (rather than a full context)."""
        return self.finish_reason == "length" and self.generated_tokens >= self.max_new_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the engine ran (those not reused from the KV cache)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes out of prefill
        n = max(0, self.generated_tokens - 1)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def line(self) -> str:
        return (f"[ Prompt: {self.prefill_tokens_per_second:.1f} t/s | "
                f"Generation: {self.decode_tokens_per_second:.1f} t/s ]")


class TextStream:
    """The text pieces of one generate/chat call, as an iterator.

    stats fills in as the pieces come; cancel() (from any thread) ends the generation within one
    token, or within one prefill chunk; close() stops it from the consuming thread.
    """

    def __init__(self, stats: GenerationStats):
        self.stats = stats
        self.cancelled = threading.Event()
        self._pieces: Iterator[str] = iter(())

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        self._pieces.close()


class _TokenizerLoader:
    """Parses a model's embedded tokenizer in a thread of its own; result() waits for it."""

    def __init__(self, model: PackedModel):
        self._model, self._tokenizer, self._error = model, None, None
        self._thread = threading.Thread(target=self._load, name="pyllm-tokenizer", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._tokenizer = Tokenizer(self._model.tokenizer, self._model.tokenizer_blob())
        except Exception as e:  # the tokenizers / sentencepiece libraries raise plain Exceptions
            self._error = FormatError(f"{self._model.path}: the embedded tokenizer cannot be read ({e})")

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Tokenizer:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._tokenizer


def return_freed_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim): parsing a tokenizer
    leaves tens of MB of freed but resident memory behind. Elsewhere a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LLM:
    """A loaded model.

    llm = LLM("model.pllm", n_threads=2)                           # device="cuda" runs it on an NVIDIA GPU
    llm.generate("Once upon a time", max_new_tokens=32)           # -> str
    for piece in llm.generate("...", stream=True): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi"}])                  # uses the model's chat template

    chat_template overrides the model's template: a built-in name (chatml, llama2, alpaca,
    alpaca-stanford), a Jinja file, or Jinja source.

    kv_cache: the element type of the KV cache, "f16", "f32" or "auto" (f32 for a model stored in
    f32, else f16, which halves the bytes attention reads per token; the CUDA engine keeps f32).

    One LLM may be shared between threads: calls run one at a time, in turn. cancel() ends the
    running call from any thread.

    Context policy: a prompt that does not fit the context (leaving room for one new token) is
    refused with ValueError; a reply ends with finish_reason "length" when the context is full.
    Nothing slides or is dropped silently.

    path: a .pllm file, or a GGUF file or Hugging Face directory, converted once into the cache
    (pyllm/model_cache.py; the conversion is reported on stderr). Names follow transformers;
    llama-cpp-python's are accepted as aliases (n_ctx, model_path, chat_format; max_tokens and
    repeat_penalty in generate/chat), and an unknown keyword raises TypeError naming the nearest one.
    """

    @accepts_aliases
    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, context_length: int | None = None,
                 chat_template: str | None = None, device: str = "cpu", kv_cache: str = "auto"):
        from .model_cache import resolve_model

        backend = engine_module(device)
        self.path = resolve_model(path)
        self.model = PackedModel(self.path)
        self.config = self.model.config
        self.chat_template = resolve_chat_template(chat_template) if chat_template else self.model.chat_template
        n_ctx = context_length or min(self.config.max_position_embeddings, DEFAULT_CONTEXT)
        if n_ctx <= 0:
            raise ValueError("context_length must be positive")
        # The tokenizer is parsed in a second thread while the engine loads (both release the GIL).
        tokenizer_loader = _TokenizerLoader(self.model)
        try:
            self.engine = backend.Engine(self.path, self.model.file.data_offset, self.model.engine_tensors(),
                                       self.model.linears, self.model.engine_config(), n_ctx, n_threads or 0,
                                       kv_cache)
        except BaseException:
            tokenizer_loader.wait()
            raise
        self.tokenizer = tokenizer_loader.result()
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"{self.path}: tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{self.config.vocab_size} embeddings")
        return_freed_heap()
        self.context_length = n_ctx
        self.device = device
        self.n_threads = self.engine.n_threads
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._running: TextStream | None = None  # the call that holds the engine
        self._cached: list[int] = []  # tokens whose keys/values the engine's cache holds, from position 0
        self.last_stats = GenerationStats()

    # -- tokens --------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- exclusive use of the engine --------------------------------------------
    def _acquire(self) -> None:
        if self.engine is None:
            raise RuntimeError("this LLM is closed")
        if self._owner == threading.get_ident():
            raise RuntimeError("this LLM is already generating in this thread (finish or close that stream first)")
        self._lock.acquire()
        if self.engine is None:  # closed while this call waited
            self._lock.release()
            raise RuntimeError("this LLM is closed")
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("expected a non-empty list of token ids")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if arr.size > self.context_length:
            raise ValueError(f"{arr.size} tokens exceed the context length of {self.context_length}")
        return arr.astype(np.int32)

    def logits(self, ids) -> np.ndarray:
        """Logits f32 [len(ids), vocab] at every position of ids, in a fresh context."""
        arr = self._check_ids(ids)
        self._acquire()
        try:
            self._cached = []
            out = self.engine.forward(arr, 0, True)
            self._cached = [int(i) for i in arr]
            return out
        finally:
            self._release()

    # -- generation ----------------------------------------------------------
    @accepts_aliases
    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                 stop_token_ids: list[int] | None = None, stream: bool = False):
        """Continues prompt (text, or token ids) and returns the new text, or a TextStream of pieces.

        Unset options come from the model's generation config (transformers' defaults for a model
        that samples), else greedy and 256 new tokens. Generation ends at an end-of-sequence token of
        the model, a token in stop_token_ids, a stop string (not included in the text),
        max_new_tokens, the end of the context, or cancel().

        Raises TypeError for a prompt of another type (a list of prompts: not supported yet),
        ValueError for bad token ids, a prompt that fills the context, or bad sampling options."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt):
            ids = list(prompt)
        else:
            raise prompt_type_error(prompt)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        if max_new_tokens is None:
            max_new_tokens = int(self.model.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if isinstance(stop, str):
            stop = [stop]
        pieces = self._stream(ids, max_new_tokens, params, list(stop or []), set(stop_token_ids or []))
        return pieces if stream else "".join(pieces)

    @accepts_aliases
    def chat(self, messages: list[dict], stream: bool = False, tools: list[dict] | None = None, **kwargs):
        """Replies to OpenAI-style messages using the chat template (generate's options and their
        aliases apply)."""
        ids = self.chat_prompt_ids(messages, tools=tools)
        return self.generate(ids, stream=stream, **kwargs)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered chat prompt (with the generation prompt), BOS added as the tokenizer does."""
        extra = {"tools": tools} if tools is not None else {}
        ids = self.tokenizer.encode(self.apply_chat_template(messages, **extra), add_special_tokens=False)
        bos = self.tokenizer.bos_id
        if self.tokenizer.spec.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        spec = self.tokenizer.spec
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=spec.bos_token or "", eos_token=spec.eos_token or "",
                           unk_token=spec.unk_token or "", pad_token=spec.pad_token or "", **extra)

    def _sampling(self, temperature, top_k, top_p, min_p, repetition_penalty, seed) -> SamplingParams:
        d = self.model.generation
        samples = bool(d.get("do_sample", False))
        params = SamplingParams(
            temperature=float((d.get("temperature", 1.0) if samples else 0.0) if temperature is None else temperature),
            top_k=int((d.get("top_k", 50) if samples else 0) if top_k is None else top_k),
            top_p=float(d.get("top_p", 1.0) if top_p is None else top_p),
            min_p=float(d.get("min_p", 0.0) if min_p is None else min_p),
            repetition_penalty=float(d.get("repetition_penalty", 1.0) if repetition_penalty is None
                                     else repetition_penalty),
            seed=seed,
        )
        params.validate()
        return params

    def cancel(self) -> None:
        """Ends the running generate/chat call (from any thread): within one token, or one prefill chunk."""
        running = self._running
        if running is not None:
            running.cancel()

    def _stream(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stop: list[str],
                stop_ids: set[int]) -> TextStream:
        prompt = self._check_ids(ids)
        if len(prompt) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.context_length} "
                             "(leave room for the reply)")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        stream = TextStream(GenerationStats(prompt_tokens=len(prompt), max_new_tokens=max_new_tokens))
        stream._pieces = self._run(prompt, max_new_tokens, Sampler(params), stop,
                                   stop_ids | set(self.tokenizer.eos_ids), stream)
        return stream

    def _prefill(self, ids: list[int], common: int, cancel: threading.Event) -> np.ndarray | None:
        """Runs ids[common:] in chunks; logits f32 [vocab] of the last token, or None when cancelled."""
        self._cached = ids[:common]
        logits = None
        for start in range(common, len(ids), PREFILL_CHUNK):
            if cancel.is_set():
                return None
            chunk = np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int32)
            logits = self.engine.forward(chunk, start, False)
            self._cached = ids[:start + len(chunk)]
        return logits

    def _run(self, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler, stop: list[str], stop_ids: set[int],
             stream: TextStream) -> Iterator[str]:
        self._acquire()
        self._running = stream
        stats, cancel = stream.stats, stream.cancelled
        try:
            self.last_stats = stats
            if max_new_tokens == 0:
                stats.finish_reason = "length"
                return
            # reuse the cached prefix; at least one prompt token must run to give logits
            ids = [int(i) for i in prompt]
            common = 0
            for a, b in zip(self._cached, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)
            stats.cached_tokens = common
            start = time.perf_counter()
            logits = self._prefill(ids, common, cancel)
            stats.prefill_seconds = time.perf_counter() - start
            if logits is None:
                stats.finish_reason = "cancelled"
                return
            decoder = StreamDecoder(self.tokenizer, ids)
            limit = min(max_new_tokens, self.context_length - len(ids))
            held = ""  # text withheld because it may be the start of a stop string
            decode_start = time.perf_counter()
            stats.finish_reason = "length"
            for step in range(limit):
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                token = sampler(logits, self._cached)
                stats.generated_tokens += 1
                if step == 0:
                    stats.time_to_first_token = time.perf_counter() - start
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    break
                held += decoder.push(token)
                cut = _find_stop(held, stop)
                if cut is not None:
                    held = held[:cut]
                    stats.finish_reason = "stop"
                    break
                safe = len(held) - _partial_stop_len(held, stop)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
                if step + 1 < limit:
                    logits = self.engine.forward(np.array([token], dtype=np.int32), len(self._cached), False)
                    self._cached.append(token)
            else:
                held += decoder.flush()
            stats.decode_seconds = time.perf_counter() - decode_start
            if held:
                yield held
        finally:
            self._running = None
            self._release()

    def close(self) -> None:
        """Releases the engine and unmaps the file (waits for a running call to finish; cancel() it first)."""
        if self.engine is None:
            return
        if self._owner == threading.get_ident() and self._running is not None:
            self._running.close()  # this thread's unfinished stream
        with self._lock:
            self.engine = None
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
