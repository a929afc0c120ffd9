"""The Python API: pyllm.LLM opens a .pllm file and generates text with the C++ engine."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import difflib
import functools
import inspect
import os
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .chat_template import (TemplateError, chat_template_origin, check_chat_template, check_template_variables,
                            normalize_messages, placeholder_characters, render_chat, render_continuing,
                            resolve_chat_template, template_stop)
from .formats.packed import PackedModel
from .errors import ContextLengthWarning, LimitError, PyllmError
from .formats.safetensors import FormatError
from .limits import (RenderLimits, check_context_length, check_kv_cache_bytes, check_logits_bytes, check_parallel,
                     check_threads)
from .sampling import LogitsProcessor, Sampler, SamplingParams, check_seed, log_softmax, most_likely
from .tokenizer import StreamDecoder, Tokenizer, check_text
from .tool_calls import ToolError, check_template_reads_tools

DEFAULT_CONTEXT = 4096
# a prompt of more characters than this x the context x the vocabulary's longest token cannot fit (2: room for
# normalizers that shorten text, such as sentencepiece's collapsing of whitespace runs)
PROMPT_CHARS_SLACK = 2
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the call nor the model's generation config says
PREFILL_CHUNK = 64  # prompt tokens per engine call: cancel() is honoured between chunks
# KV cache element types (llama.cpp's names, as its -ctk/-ctv) and the bytes one value takes: q8_0 is
# blocks of 32 values, an f16 scale and 32 int8 codes (34 bytes). "auto": f32 for a model stored in
# f32, else f16 (counted as f16 below).
KV_CACHE_BYTES_PER_VALUE = {"auto": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}


# How the CPU engine quantizes activations for int4/int8 weights (LLM's activation_quant): int8 terms per value
ACTIVATION_QUANTS = ("int8x2", "int8", "int8x2_outliers")


def kv_cache_bytes(config, n_ctx: int, kv_cache: str, n_seq: int = 1) -> int:
    """Bytes of the keys and values of n_seq sequences of n_ctx positions in a KV cache of element
    type kv_cache (a KV_CACHE_BYTES_PER_VALUE key; ValueError otherwise). config: a ModelConfig.
    The values themselves, without the CPU engine's padding: engine_kv_cache_bytes is what an engine
    allocates."""
    if not isinstance(kv_cache, str) or kv_cache not in KV_CACHE_BYTES_PER_VALUE:  # (a list: unhashable)
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_BYTES_PER_VALUE)}, not {kv_cache!r}")
    values = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * n_ctx * n_seq
    return round(values * KV_CACHE_BYTES_PER_VALUE[kv_cache])


def kv_cache_stride(kv_cache: str, n_ctx: int) -> int:
    """Positions the CPU engine's cache holds per kv head for a context of n_ctx (kv_cache_stride in
    csrc/kernels/cpu/kernels.h, mirrored): n_ctx rounded up to whole 64-byte lines of a transposed key
    row (32 f16 or 16 f32 positions a line), one line more when their count is even; q8_0: n_ctx."""
    if kv_cache == "q8_0":
        return n_ctx
    per_line = 32 if kv_cache == "f16" else 16
    lines = -(-n_ctx // per_line)
    return (lines + 1 if lines % 2 == 0 else lines) * per_line


def engine_kv_type(kv_cache: str, linears: dict, tied: bool, device: str = "cpu") -> str:
    """The element type an engine keeps its KV cache in for kv_cache ("auto" resolved as the engine
    resolves it): the CUDA engine's is f32; the CPU engine's "auto" is f32 when every matrix it
    multiplies (the layers' and the output's: the embedding table only when tied to it) is stored in
    f32, else f16. linears: a PackedModel's {base name: (format, group size)}."""
    if device == "cuda":
        return "f32"
    if kv_cache != "auto":
        return kv_cache
    matrices = [fmt for base, (fmt, _) in linears.items() if tied or base != "model.embed_tokens"]
    return "f32" if all(fmt == "f32" for fmt in matrices) else "f16"


def engine_kv_cache_bytes(config, n_ctx: int, kv_cache: str, n_seq: int, linears: dict, device: str = "cpu") -> int:
    """Bytes the KV cache of an engine on `device` takes, as allocated (LLM.kv_cache_bytes after the
    load): its element type (engine_kv_type) and, on the CPU, its padded positions (kv_cache_stride).
    The memory check before loading uses it: the unpadded f16 count missed 1/128 at a 4096 context
    (up to a whole line of positions at short ones), and half of an f32 model's f32 cache."""
    kind = engine_kv_type(kv_cache, linears, config.tie_word_embeddings, device)
    positions = n_ctx if device == "cuda" else kv_cache_stride(kind, n_ctx)
    return kv_cache_bytes(config, positions, kind, n_seq)


# Every LLM not yet garbage collected: closed when the interpreter exits. A call running in a daemon
# thread at exit otherwise took the GIL back from the C++ engine while Python finalized, and CPython
# ended the thread by unwinding through pybind11's frames: 'terminate called without an active
# exception', the process aborted (rc 134, a core dump) instead of exiting.
_OPEN: "weakref.WeakSet[LLM]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for llm in list(_OPEN):
        try:
            llm.close()
        except Exception:  # pragma: no cover - exiting anyway
            pass


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: every open LLM forgets the turns of the others
    (a call running in another thread when the process forked held the engine for ever in the child, whose
    next call waited for it) and its scheduler, whose thread is not there either, and keeps its engine
    (see LLM._forget_other_threads)."""
    me = threading.get_ident()
    for llm in list(_OPEN):
        if getattr(llm, "_turn", None) is not None:  # (one still in __init__ has no turns yet)
            llm._forget_other_threads(me)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# prompt rows whose logits LLM._prompt_logprobs holds at once (100 MB of SmolLM2's f32 logits)
PROMPT_LOGITS_ROWS = 512

# A stream whose consumer has not asked for its next piece for this long, while another call waits
# for the engine, gives the engine up; resumed, it re-reads its context into the KV cache.
PREEMPT_AFTER = 0.25  # seconds
REENTRANT_CALL = ("this LLM was called from inside one of its own running calls (a logits processor calling "
                  "generate, chat, embed or logits?): it would wait for itself; call it from another thread, or "
                  "after that call returns")
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
    "lora_path": "lora", "stop_strings": "stop",  # (transformers' generate(stop_strings=) got "did you mean
    # 'stop_token_ids'?"); llama-cpp-python's Llama.tokenize(text, add_bos, special)
    "add_bos": "add_special_tokens", "special": "parse_special",
}


# Names of transformers' GenerationConfig and llama-cpp-python that generate()/chat() do not take, with
# what to do instead: a "did you mean" by spelling sent min_new_tokens to max_new_tokens and max_length
# (prompt + reply in transformers) to max_tokens (the reply alone), each changing what was asked.
NOT_TAKEN = {
    "max_length": "transformers' max_length counts the prompt's tokens too; give max_new_tokens (the reply's)",
    "min_new_tokens": "a minimum reply length is not supported; a logits processor (logits_processors=) can "
                      "hold the end-of-generation tokens back",
    "num_beams": "beam search is not supported (greedy decoding: temperature=0, or sampling)",
    "echo": "the returned text does not repeat the prompt (llama-cpp-python's echo): prepend it yourself, or call "
            "create_completion(prompt, echo=True), which takes it as llama-cpp-python's does",
    "top_logprobs": "logprobs=N records the N most likely tokens at each position (OpenAI's top_logprobs; "
                    "logprobs=0: the chosen token's own only)",
}
NOT_TAKEN.update(min_length=NOT_TAKEN["min_new_tokens"], min_tokens=NOT_TAKEN["min_new_tokens"],
                 eos_token_id="the model's own end-of-generation tokens always end the reply; stop_token_ids=[...] "
                              "adds others (transformers' eos_token_id replaces them)",
                 pad_token_id="generation pads nothing (each prompt has its own KV sequence); leave it out")
# ... llama-cpp-python's create_completion/create_chat_completion arguments those methods do not take
NOT_TAKEN_BY_CREATE = {
    "grammar": "give response_format={'type': 'grammar', 'grammar': <a Lark or GBNF grammar>} (or a json_schema)",
    "logits_processor": "the OpenAI-shaped methods take a request's fields; give generate(logits_processors=...)",
    "stopping_criteria": "give stop= (strings) or stop_token_ids=",
    "tfs_z": "tail-free sampling is not supported (llama.cpp removed it); min_p or typical_p are near it",
    "mirostat_mode": "mirostat sampling is not supported",
    "max_new_tokens": "these methods take OpenAI's name, max_tokens (generate and chat take max_new_tokens)",
}
NOT_TAKEN_BY_CREATE.update(mirostat_tau=NOT_TAKEN_BY_CREATE["mirostat_mode"],
                           mirostat_eta=NOT_TAKEN_BY_CREATE["mirostat_mode"])
# ... and llama-cpp-python's Llama() arguments LLM() does not take (lora_path was "did you mean 'model_path'?")
NOT_TAKEN_BY_LLM = {
    "n_gpu_layers": "device='cuda' runs the whole model on the GPU (there is no partial offload)",
    "seed": "give seed= to generate() or chat() (each call is seeded on its own)",
    # llama-cpp-python code passes these nearly always (verbose=False above all): each refusal says what to do
    "verbose": "pyllm writes no log while it loads or generates; leave it out",
    "n_batch": "pyllm sizes the chunks a prompt runs in itself; leave it out",
    "n_threads_batch": "n_threads= runs prompts and generation alike",
    "use_mmap": "the model file is always memory-mapped; leave it out",
    "logits_all": "llm.logits(ids) gives every position's logits; leave it out",
    "embedding": "llm.embed(texts) works on any model; leave it out",
    "type_k": "kv_cache= sets the KV cache's type (f16, f32, q8_0), keys and values alike",
    "flash_attn": "pyllm picks its attention kernels itself; leave it out",
}
NOT_TAKEN_BY_LLM.update(n_ubatch=NOT_TAKEN_BY_LLM["n_batch"], type_v=NOT_TAKEN_BY_LLM["type_k"])


def accepts_aliases(method):
    """Lets `method` take ALIASES' names for its own keyword arguments, and turns an unknown keyword into
    a TypeError that suggests the nearest known name."""
    params = inspect.signature(method).parameters
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())

    where = method.__qualname__.replace(".__init__", "")
    not_taken = (NOT_TAKEN if "max_new_tokens" in known else NOT_TAKEN_BY_LLM if "context_length" in known
                 else NOT_TAKEN_BY_CREATE if "max_tokens" in known else {})

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
            elif not open_ended and name in not_taken:
                why = not_taken[name]
                raise TypeError(f"{where}() got an unexpected keyword argument {name!r}: {why}")
            elif not open_ended:
                close = difflib.get_close_matches(name, known + [a for a, t in ALIASES.items() if t in known], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (it takes: {', '.join(known)})"
                raise TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")
        return method(*args, **kwargs)
    return wrapper


def prompt_type_error(prompt) -> Exception:
    """The error for a prompt that is neither text, token ids nor a list of those; for a list, it
    names the first item that is neither a token id nor a prompt, as the first item is."""
    if isinstance(prompt, np.ndarray):  # (a 2-D one, rows of prompts: list(array) is a list of them)
        return TypeError("prompt must be a str or a list of token ids (ints); got an array of "
                         f"{prompt.dtype} {prompt.shape}" + (": give a 1-D array of integers" if prompt.ndim != 1 or
                                                             prompt.dtype.kind not in "iu" else ""))
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return TypeError(f"prompt must be a str or a list of token ids (ints); got {type(prompt).__name__}")
    if isinstance(prompt[0], _PROMPT_TYPES):  # a list of prompts
        i, bad = next((i, p) for i, p in enumerate(prompt) if not isinstance(p, _PROMPT_TYPES))
        return TypeError(f"prompt must be a str, a list of token ids (ints) or a list of those; item {i} of the "
                         f"list of prompts is {type(bad).__name__} {bad!r:.40}")
    i, bad = next((i, p) for i, p in enumerate(prompt) if isinstance(p, bool) or not isinstance(p, (int, np.integer)))
    return TypeError(f"prompt must be a str or a list of token ids (ints); got {type(prompt).__name__} with non-int "
                     f"items: item {i} is {type(bad).__name__} {bad!r:.40}")


# what a list's prompt raises as it generates that names it (a grammar the model cannot follow): that
# prompt ends alone and the others run on (_raise_failed); a caller's processor's own exception comes out
# as itself, its traceback whole, and ends the list
LIST_ITEM_ERRORS = (PyllmError,)


def _raise_failed(failed: dict) -> None:
    """The end of a list whose prompts `failed` ({prompt index: its error}) ended alone while the others
    ran on: the first one's error is raised, its .errors the dict (and, without stream=True, its .texts
    every prompt's text, a failed one's up to its error: LLM._batch)."""
    if not failed:
        return
    first = failed[min(failed)]
    if len(failed) > 1 and hasattr(first, "add_note"):  # (Python 3.11+; .errors says it on any)
        first.add_note(f"and {len(failed) - 1} more: prompts {sorted(failed)[1:]} (see .errors)")
    first.errors = failed
    raise first


@contextlib.contextmanager
def _naming(item: str | None, errors: tuple = (ValueError, TypeError)) -> Iterator[None]:
    """An error about one item of a list (a prompt, a conversation) names it: "prompt 3 of the list: ..."
    (which of 8 prompts was too long was left to guess). None: as it is. errors: the types named."""
    try:
        yield
    except errors as e:
        if item is None:
            raise
        try:
            named = type(e)(f"{item}: {e}")
        except Exception:  # a type that takes other arguments (UnicodeDecodeError): as it is
            named = None
        if named is None:
            raise
        raise named from None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # seconds from the call to the first generated token
    finish_reason: str = ""  # "stop", "length" (max_new_tokens or the context is full), "cancelled", or "error" (a
    # prompt of a list that failed alone: LLM.generate)
    stop_string: str | None = None  # the stop string that ended the reply (llama.cpp's stopping_word)
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
        """llama-cli's stats line; a rate with nothing to time (every prompt token reused from the
        cache, or a single generated token, which prefill gives) reads "-" rather than 0.0."""
        def rate(tokens_per_second: float) -> str:  # 0.0: the property had nothing to time
            return f"{tokens_per_second:.1f}" if tokens_per_second > 0 else "-"

        return (f"[ Prompt: {rate(self.prefill_tokens_per_second)} t/s | "
                f"Generation: {rate(self.decode_tokens_per_second)} t/s ]")


@dataclass
class TokenLogprob:
    """One generated token: its id, log-probability under the model (log_softmax of the raw logits,
    before any sampling option), and the `top` most likely ids with theirs, best first."""
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class _PieceStream:
    """What TextStream and BatchStream share: an iterator over the pieces their generator `_pieces`
    yields; cancel() sets `cancelled`; closed or dropped before its first read, the stats of
    _every_stats() that have no finish_reason yet say "cancelled" (the generator never ran, nor its own
    `finally` that says so)."""

    _pieces: Iterator
    cancelled: threading.Event

    def _every_stats(self) -> list:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        self._never_started()
        self._pieces.close()

    def __del__(self):
        try:
            self._never_started()
        except Exception:  # (at the interpreter's exit: modules already torn down)
            pass

    def _never_started(self) -> None:
        pieces = self._pieces
        if inspect.isgenerator(pieces) and inspect.getgeneratorstate(pieces) == inspect.GEN_CREATED:
            for one in self._every_stats():
                one.finish_reason = one.finish_reason or "cancelled"


class TextStream(_PieceStream):
    """The text pieces of one generate/chat call, as an iterator.

    stats fills in as the pieces come; tokens lists the generated tokens (TokenLogprob, with
    log-probabilities when generate() was given logprobs=), each once its text is out, so that
    they match the text: an end-of-generation token is not listed, nor are the tokens of a stop
    string, from the one whose text begins it on (stats.generated_tokens counts them all).
    take_tokens() gives those added since its last call. cancel() (from any thread) ends the
    generation within one token, or within one prefill chunk; close() stops it from the consuming
    thread.
    """

    def __init__(self, stats: GenerationStats):
        self.stats = stats
        self.cancelled = threading.Event()
        self.tokens: list[TokenLogprob] = []
        self._taken = 0
        self._pieces: Iterator[str] = iter(())

    def take_tokens(self) -> list[TokenLogprob]:
        """The tokens generated since the last call (all of them the first time)."""
        new = self.tokens[self._taken:]
        self._taken += len(new)
        return new

    def _every_stats(self) -> list:
        return [self.stats]


class BatchStream(_PieceStream):
    """generate([...], stream=True): an iterator of (prompt index, text piece). stats[i] and tokens[i] are
    prompt i's GenerationStats and the records of its generated tokens (TokenLogprob), this list's
    whatever is given after it (llm.last_batch_stats / last_batch_tokens are the last list's: another
    thread's list replaces them). cancel() (from any thread) ends this list within one token, or within
    one prefill chunk, whoever holds the engine meanwhile; close() stops it from the consuming thread."""

    def __init__(self, pieces: Iterator[tuple[int, str]], stats: list, tokens: list, cancelled: threading.Event):
        self.stats = stats
        self.tokens = tokens
        self.cancelled = cancelled
        self._pieces = pieces

    def _every_stats(self) -> list:
        return self.stats


class _TokenizerLoader:
    """Parses a model's embedded tokenizer in a thread of its own; result() waits for it."""

    def __init__(self, model: PackedModel):
        self._model, self._tokenizer, self._error = model, None, None
        self._thread = threading.Thread(target=self._load, name="pyllm-tokenizer", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._tokenizer = Tokenizer(self._model.tokenizer, self._model.tokenizer_blob())
        except FormatError as e:
            self._error = FormatError(f"{self._model.path}: the embedded tokenizer cannot be read ({e})")
        except BaseException as e:  # raised in the caller's thread by result()
            self._error = e

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


class _Call:
    """A non-streaming use of the engine (logits()): an owner for the engine's lock. slots: the KV-cache
    sequences it writes (None: any), so that an attached scheduler forgets only those."""

    def __init__(self, slots: frozenset | None = None):
        self.slots = slots

    def cancel(self) -> None:
        pass


class LLM:
    """A loaded model.

    llm = LLM("model.pllm", n_threads=2)                           # device="cuda" runs it on an NVIDIA GPU
    llm.generate("Once upon a time", max_new_tokens=32)           # -> str
    for piece in llm.generate("...", stream=True): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi"}])                  # uses the model's chat template

    chat_template overrides the model's template: a built-in name (chatml, llama2, llama3,
    mistral-instruct, zephyr, gemma, phi3, qwen, alpaca, alpaca-stanford; llama-cpp-python's chat_format
    spellings such as llama-2 too), a Jinja file, or Jinja source.

    kv_cache: the element type of the KV cache (llama.cpp's names): "f16", "f32", "q8_0" or "auto"
    (f32 for a model stored in f32, else f16, which halves the bytes attention reads per token).
    "q8_0" keeps blocks of 32 values as int8 codes with an f16 scale, 0.53x the bytes of f16 (its
    perplexity cost: docs/QUALITY.md); it needs head_dim a multiple of 32 (ValueError otherwise).
    The CUDA engine keeps f32.

    activation_quant: how the CPU engine quantizes activations for int4/int8 weights. "int8x2" (the
    default) keeps two int8 terms per value in blocks of 32 (~15 bits: logits within ~1e-7 NMSE of
    float activations); "int8" keeps one, as llama.cpp does (its Q8_0 activations): the SIMD
    kernels do half the integer work, so prompts and several sequences decoding together run
    1.2-1.5x faster (SmolLM2 int4, Zen 5, AVX-512 / AVX-VNNI / AVX2), with logits 1e-4 to 3e-3
    NMSE from int8x2's and perplexity +0.1-0.5%. Near ties then go the other way: the default
    model answers the README's question as llama.cpp does, wrongly (docs/QUALITY.md,
    docs/BENCHMARKS.md). "int8x2_outliers" keeps two terms only in a row's outlier blocks (absmax
    above 3x the row's mean block absmax, or one value dwarfing the block's others): SmolLM2's
    perplexity within +0.12% of int8x2's on every text, the README's answer kept, 8 sequences a
    step 1.1-1.2x faster (int8: 1.3-1.5x) (docs/QUALITY.md). f16/f32/bf16 weights multiply float
    activations either way; the CUDA
    engine has no such choice (ValueError). It is fixed once the engine has run (ValueError after).

    context_length: 1 .. pyllm.limits.MAX_CONTEXT_LENGTH tokens (default: the model's, at most
    DEFAULT_CONTEXT, 4096; past the model's trained positions a ContextLengthWarning, and LimitError
    for learned positions); n_threads: 1 .. MAX_THREADS (default _core.default_threads(): the CPUs
    this process may run on, at most its container's CPU quota); n_parallel: 1 .. MAX_PARALLEL
    (LimitError, a ValueError, otherwise). verify=True checks every tensor's checksum and the
    header's before loading (FormatError on a mismatch; `pyllm verify` does the same from the
    command line).

    One LLM may be shared between threads: calls run one at a time, in turn. cancel() ends the
    running call from any thread. A stream holds the engine only while its consumer keeps reading:
    one left unread for PREEMPT_AFTER seconds while another call waits (at once if that call is in
    the same thread) gives the engine up, and when read again re-reads its context into the KV
    cache and continues with the same text. close() cancels the running call and always returns.

    With a pyllm.scheduler.Scheduler attached (Scheduler(llm); `pyllm serve --parallel N` does it),
    every single-prompt call from any thread runs in its batch instead: up to n_parallel calls share
    each engine step (continuous batching), each giving the text it gives alone.

    Context policy: a prompt that does not fit the context (leaving room for one new token) is
    refused with ValueError; a reply ends with finish_reason "length" when the context is full.
    Nothing slides or is dropped silently.

    path: a .pllm file, or a GGUF file or Hugging Face directory, converted once into the cache
    (pyllm/model_cache.py; the conversion is reported on stderr). lora (llama-cpp-python's lora_path):
    PEFT LoRA adapter directories merged into a Hugging Face directory as it is converted (`pyllm convert
    --lora`). Names follow transformers;
    llama-cpp-python's are accepted as aliases (n_ctx, model_path, chat_format; max_tokens and
    repeat_penalty in generate/chat), and an unknown keyword raises TypeError naming the nearest one.
    """

    @accepts_aliases
    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, context_length: int | None = None,
                 chat_template: str | None = None, device: str = "cpu", kv_cache: str = "auto",
                 verify: bool = False, n_parallel: int = 1, adapter: str | None = None,
                 activation_quant: str = "int8x2", lora: str | os.PathLike | list | None = None):
        from .model_cache import resolve_model

        if not isinstance(path, (str, os.PathLike)):  # (was "expected str, bytes or os.PathLike object, not int")
            raise TypeError(f"path must be a model file or directory (a str or os.PathLike); got {type(path).__name__}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        if activation_quant not in ACTIVATION_QUANTS:
            raise ValueError(f"activation_quant must be one of {', '.join(ACTIVATION_QUANTS)}, "
                             f"not {activation_quant!r}")
        if device != "cpu" and activation_quant != "int8x2":
            raise ValueError(f"activation_quant {activation_quant!r} applies to the CPU engine; the {device} engine "
                             "multiplies with float activations")
        backend = engine_module(device)
        if n_threads is not None:
            n_threads = check_threads(n_threads)
        if context_length is not None:
            context_length = check_context_length(context_length)
        if isinstance(lora, (str, os.PathLike)):
            lora = [lora]
        if not isinstance(lora, (list, tuple, type(None))) or not all(isinstance(a, (str, os.PathLike))
                                                                      for a in lora or ()):
            raise TypeError("lora must be a LoRA adapter directory or a list of them; got "
                            f"{type(lora).__name__}")
        self.path = resolve_model(path, lora=[os.fspath(a) for a in lora or ()])
        self.model = PackedModel(self.path)
        self.engine = None
        self._forked_mid_step = False  # a forked child's copy of an engine that another thread was running
        self._closing = False  # close() began: no call takes a turn; embed() and logits_many() stop between items
        try:
            self._load(backend, verify, chat_template, context_length, n_threads, kv_cache, n_parallel, device,
                       activation_quant, adapter)
        except BaseException:
            # released now, not when the error (its traceback holds this object) goes: the engine's
            # KV cache is filled in from its creation (1.5 GiB held by an error kept for a log)
            self.engine = None
            self.model.close()
            raise
        self._primed: str | None = None  # the adapter whose virtual positions open slot 0's cache
        self.device = device
        self.n_threads = self.engine.n_threads
        # Who uses the engine: the holder (a TextStream or a _Call), its thread, and since when a
        # holding stream has been waiting for its consumer (None while it computes).
        # `with self._lock`, not `with self._turn`: Condition.__enter__ is Python code, and a Ctrl-C landing in
        # it after the lock was taken left it taken for ever (every other thread's next call waited).
        # Reentrant: a stream its consumer left unfinished gives its turn back (_release) when it is
        # collected, and the cycle collector runs at any allocation, in any thread: one holding this lock
        # (in _acquire, _pause) waited for it for ever
        self._lock = threading.RLock()
        self._turn = threading.Condition(self._lock)
        self._holder = None
        self._holder_thread: int | None = None
        self._holder_frame = None  # the frame of the holder's call (the method that took the turn)
        self._idle_since: float | None = None
        self._preempted: set[int] = set()  # id() of streams that lost the engine while idle
        self._cached: list[int] = []  # tokens whose keys/values the engine's cache holds, from position 0
        self._last_holder = None  # who used the engine last (a scheduler's slots survive only its own turns)
        self._waiting = 0  # calls waiting in _acquire
        # KV-cache sequences written by other holders since the scheduler's last turn (None: any may be)
        self._written: set[int] | None = None
        self._served = 0  # turns given so far
        # A pyllm.scheduler.Scheduler, when attached: single-prompt streams then run in its batch
        self.scheduler = None
        self.last_stats = GenerationStats()
        self.last_batch_stats: list[GenerationStats] = []  # one per prompt of the last list given to generate
        self.last_batch_tokens: list[list[TokenLogprob]] = []  # the same prompts' generated tokens (records)
        _OPEN.add(self)

    def _load(self, backend, verify, chat_template, context_length, n_threads, kv_cache, n_parallel, device,
              activation_quant, adapter) -> None:
        """__init__'s checks of the file and the options, and the engine and tokenizer they make."""
        if verify:
            self.model.verify()
        self.config = self.model.config
        self.chat_template = resolve_chat_template(chat_template) if chat_template else self.model.chat_template
        self.chat_template_origin = chat_template_origin(chat_template, self.path)  # named by its errors
        # a template stored in the file that does not compile (a checkpoint's broken chat_template.jinja):
        # generation works, chat raises this, naming the file and the way out
        self.chat_template_fault = None
        if not chat_template and self.chat_template:
            try:
                check_chat_template(self.chat_template)
            except TemplateError as e:
                self.chat_template_fault = (f"{self.path}: the chat template stored in the model file cannot be "
                                            f"used ({e}); give another with chat_template= (--chat-template on the "
                                            f"command line): a built-in name, a Jinja file or Jinja source")
        n_ctx = context_length or min(self.config.max_position_embeddings, DEFAULT_CONTEXT)
        n_parallel = check_parallel(n_parallel)
        # the options the engines refuse, refused here: what the engine's constructor raises is about the file
        if self.config.position_embedding == "learned" and n_ctx > self.config.max_position_embeddings:
            raise LimitError(f"context_length {n_ctx} exceeds the model's {self.config.max_position_embeddings} "
                             "learned positions")
        if n_ctx > self.config.max_position_embeddings:
            warnings.warn(f"context_length {n_ctx} exceeds the {self.config.max_position_embeddings} tokens the model "
                          "was trained on; positions beyond them give unreliable predictions", ContextLengthWarning,
                          stacklevel=4)
        if device == "cuda" and n_parallel != 1:
            raise ValueError("the CUDA engine holds one sequence (n_parallel=1); run batches on the CPU")
        if device == "cuda" and kv_cache not in ("auto", "f32"):
            raise ValueError(f"the CUDA engine keeps its KV cache in f32 (kv_cache='auto' or 'f32', not {kv_cache!r})")
        if kv_cache == "q8_0" and self.config.head_dim % 32:  # the engine's message blamed the file, in Python's name
            raise ValueError(f"a q8_0 KV cache needs head_dim a multiple of 32 (llama.cpp's block); this model's is "
                             f"{self.config.head_dim}: use f16 (kv_cache='f16', --kv-cache f16)")
        kv_bytes = engine_kv_cache_bytes(self.config, n_ctx, kv_cache, n_parallel, self.model.linears, device)
        check_kv_cache_bytes(kv_bytes, f"{n_parallel} sequence(s) of {n_ctx} positions")
        self.adapters = self.model.adapters  # prompt-learning adapters stored in the file (pyllm/adapters.py)
        self.adapter = self._check_adapter(adapter)  # generate()'s default
        # The tokenizer is parsed in a second thread while the engine loads (both release the GIL).
        tokenizer_loader = _TokenizerLoader(self.model)
        try:
            try:
                # (bytes: a path that is not UTF-8 holds lone surrogates, which pybind11 cannot pass as str)
                self.engine = backend.Engine(os.fsencode(self.path), self.model.file.data_offset,
                                             self.model.engine_tensors(), self.model.linears,
                                             self.model.engine_config(), n_ctx, n_threads or 0, kv_cache, n_parallel)
            except MemoryError:  # std::bad_alloc: an address-space limit (ulimit -v), or the machine's memory
                raise LimitError(f"cannot allocate the engine's memory: {n_parallel} sequence(s) of {n_ctx} positions "
                                 f"need a KV cache of {kv_bytes / 2**30:.2f} GiB beside the model's buffers; lower "
                                 "context_length or n_parallel") from None
            except ValueError as e:
                # the engine checks the file again (tensor ranges, int4_asym_dq steps, the rope scaling type)
                # and refused it with a ValueError that did not name it (PYLLM_KERNELS's: below)
                if isinstance(e, PyllmError) or str(e).startswith("unknown kernel variant"):
                    raise
                raise FormatError(f"{self.path}: {e}") from None
            if device == "cpu":
                self.engine.activation_quant = activation_quant
        except BaseException as e:
            tokenizer_loader.wait()
            forced = os.environ.get("PYLLM_KERNELS")
            if forced and isinstance(e, ValueError) and str(e).startswith("unknown kernel variant"):
                # the engine reads the variable at its first use: its message did not say where the name came from
                raise PyllmError(f"PYLLM_KERNELS={forced!r} in the environment: {e}; unset it for the fastest "
                                 "variant") from None
            raise
        self.tokenizer = tokenizer_loader.result()
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise FormatError(f"{self.path}: tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                              f"{self.config.vocab_size} embeddings")
        return_freed_heap()
        self.context_length = n_ctx
        self.n_parallel = n_parallel

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the engine's KV cache takes, as allocated: n_parallel sequences of context_length positions
        (the CPU engine pads each kv head's positions a little: 1/128 more at a 4096 context, f16)."""
        return self._open_engine().kv_cache_bytes

    def _open_engine(self):
        """The engine; RuntimeError once close() began (a call that took its turn while close() waited
        for the holder got the engine: a thread calling generate() in a loop held close() for ever)."""
        engine = self.engine
        if engine is None or self._closing:
            raise RuntimeError("this LLM is closed")
        if self._forked_mid_step:
            raise RuntimeError("this LLM was running a call in another thread when the process forked: its engine "
                               "cannot be used in the child (open the model again there, or fork between calls)")
        return engine

    def _running_engine(self):
        """The engine for the next step of a call that holds it: RuntimeError only once it is gone (a
        logits processor closed the LLM). A close() from another thread cancels the holder and waits for
        its step; refusing the step once close() began (as _open_engine does for new calls) raised
        "this LLM is closed" in the stream's reader instead of ending it as cancelled."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("this LLM is closed")
        return engine

    # -- tokens --------------------------------------------------------------
    @accepts_aliases
    def tokenize(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text (Tokenizer.encode): parse_special=False reads special-token strings
        written in it ("<|im_end|>") as plain text. llama-cpp-python's add_bos and special are
        aliases of add_special_tokens and parse_special (whose default here is True)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens, parse_special=parse_special)

    def _check_prompt_chars(self, text: str) -> str:
        """text, a prompt to generate from, unless it is too long for the context whatever its tokens:
        more characters than PROMPT_CHARS_SLACK x the context x the vocabulary's longest token (LimitError,
        before tokenizing: a chat template rendering 7 million characters took 16 s and 1.4 GB to
        tokenize, then was refused by its token count)."""
        most = PROMPT_CHARS_SLACK * self.context_length * self.tokenizer.longest_token_chars
        if len(text) > most:
            raise LimitError(f"the prompt has {len(text)} characters, more than the context's {self.context_length} "
                             f"tokens can hold (this vocabulary's longest token has "
                             f"{self.tokenizer.longest_token_chars} characters)")
        return text

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids (a list or 1-D array of ints in [0, vocab_size); PyllmError otherwise)."""
        return self.tokenizer.decode(token_ids(ids, self.config.vocab_size).tolist(),
                                     skip_special_tokens=skip_special_tokens)

    # -- turns at the engine -------------------------------------------------------
    def _acquire(self, owner, gave_up=lambda: False) -> bool:
        """Waits for the engine and makes owner its holder. An idle holding stream is preempted
        (at once when it belongs to this thread, else after PREEMPT_AFTER seconds). Returns whether
        owner was the engine's last user (its KV-cache contents are as it left them). gave_up(): whether
        owner no longer wants its turn (RuntimeError then; checked whenever _turn is notified)."""
        me = threading.get_ident()
        with self._lock:
            self._waiting += 1
            try:
                self._wait_for_turn(me, gave_up)
            finally:
                self._waiting -= 1
            self._holder, self._holder_thread, self._idle_since = owner, me, None
            frame = sys._getframe(1)  # the call that computes while it holds the turn (_holder_abandoned)
            self._holder_frame = frame.f_back if frame.f_code is LLM._resume.__code__ else frame
            self._preempted.discard(id(owner))
            self._served += 1
            if owner is not self.scheduler:
                slots = getattr(owner, "slots", None)
                self._written = None if slots is None or self._written is None else self._written | slots
            kept, self._last_holder = self._last_holder is owner, owner
            return kept

    def _wait_for_turn(self, me: int, gave_up=lambda: False) -> None:
        """Returns (self._turn held by the caller) once the engine is free or its holder may be preempted."""
        timed_out = False
        while True:
            self._open_engine()
            if gave_up():
                raise RuntimeError("gave up waiting for the engine")
            if self._holder is None:
                return
            if self._idle_since is None and (self._holder_thread == me or timed_out) and self._holder_abandoned():
                # its call ended without giving the turn back: a Ctrl-C (or another signal handler's
                # exception) landed between taking and giving it, and every later call waited for ever
                self._preempted.add(id(self._holder))
                self._cached, self._primed, self._last_holder = [], None, None  # its last step may be cut short
                return
            if self._holder_thread == me and self._idle_since is None:
                # the holder is computing in this very thread: this call comes from inside it (a logits
                # processor calling the LLM) and would wait for itself for ever
                raise RuntimeError(REENTRANT_CALL)
            since = self._idle_since  # (read once: a stream collected meanwhile may give its turn back, _lock)
            if since is not None:
                idle = time.monotonic() - since
                if self._holder_thread == me or idle >= PREEMPT_AFTER:
                    self._preempted.add(id(self._holder))
                    return
                timed_out = not self._turn.wait(PREEMPT_AFTER - idle)
            else:
                timed_out = not self._turn.wait(PREEMPT_AFTER)  # the holder may go idle without telling

    def _holder_abandoned(self) -> bool:
        """Whether the computing holder's call is no longer running: its frame (the call that took the
        turn) is not on its thread's stack, or that thread has ended."""
        frame = self._holder_frame
        if frame is None:
            return False
        top = sys._getframe() if self._holder_thread == threading.get_ident() else \
            sys._current_frames().get(self._holder_thread)
        while top is not None:
            if top is frame:
                return False
            top = top.f_back
        return True

    def _forget_other_threads(self, me: int) -> None:
        """In a forked child (_after_fork_in_child): a holder of another thread, which does not exist here,
        gives the engine up (its step may have been half done: the KV cache is not trusted), the lock is
        new (another thread may have held it at the fork), and an attached scheduler, whose thread
        is gone, is detached (calls run one at a time, as without one)."""
        self._lock = threading.RLock()
        self._turn = threading.Condition(self._lock)
        self._waiting = 0
        if self.engine is not None:
            # never destroyed here: its destructor joins its worker threads (and the thread that populates
            # its KV cache), which do not exist in the child, and close() (or the exit, or `del`) hung
            # there for ever (n_threads > 1), segfaulted or aborted. The child's exit returns its memory.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self.engine))
        if self._holder is not None and self._holder_thread != me:
            # computing: the engine's worker threads may have been in the middle of its step, whose end
            # the child's next step waited for for ever (one thread runs its steps alone: it only re-reads)
            self._forked_mid_step = self._idle_since is None and self.n_threads > 1
            self._preempted.add(id(self._holder))
            self._holder = self._holder_thread = self._idle_since = self._holder_frame = None
            self._cached, self._primed, self._last_holder, self._written = [], None, None, None
        if self.scheduler is not None:
            self.scheduler._closed = True
            self.scheduler = None
            self._cached, self._primed, self._last_holder = [], None, None

    def _release(self, owner) -> None:
        with self._lock:
            if self._holder is owner:
                self._holder = self._holder_thread = self._idle_since = self._holder_frame = None
                self._turn.notify_all()
            self._preempted.discard(id(owner))

    def _pause(self, owner) -> None:
        """owner hands a piece to its consumer: it keeps the engine unless someone takes it."""
        with self._lock:
            if self._holder is owner:
                self._idle_since = time.monotonic()

    def _resume(self, owner) -> bool:
        """owner's consumer asks for more: True when it still holds the engine (its KV cache
        intact), False when it was preempted and now holds the engine again."""
        with self._lock:
            if self._holder is owner and id(owner) not in self._preempted:
                self._idle_since, self._holder_thread = None, threading.get_ident()
                return True
        self._acquire(owner)
        return False

    def _check_ids(self, ids, virtual: int = 0) -> np.ndarray:
        """ids as int32, checked: in the vocabulary, not empty, fitting the context after `virtual` tokens
        (an adapter's)."""
        arr = token_ids(ids, self.config.vocab_size)
        if arr.size == 0:
            raise PyllmError("expected a non-empty list of token ids")
        if virtual + arr.size > self.context_length:
            raise ValueError(f"{arr.size} tokens{f' after {virtual} virtual ones' if virtual else ''} exceed the "
                             f"context length of {self.context_length}")
        return arr.astype(np.int32)

    def logits_many(self, sequences: list, logits_to_keep: int = 0, adapter: str | None = None) -> list[np.ndarray]:
        """Logits f32 [rows, vocab] of each token-id list, each in a fresh context, n_parallel at a time
        in one engine step (perplexity's windows). rows: every position's (logits_to_keep 0, the default),
        else the last logits_to_keep positions' only (transformers' logits_to_keep; all of a shorter list).
        adapter: as logits() takes it (default the LLM's). LimitError when the rows of all the lists
        together exceed limits.MAX_LOGITS_BYTES: ask for fewer rows, or fewer sequences at a time."""
        from .adapters import prime

        if not isinstance(sequences, (list, tuple, np.ndarray)) or getattr(sequences, "ndim", 1) == 0:  # (None, np.array(5))
            raise TypeError(f"sequences must be a list of token-id lists; got {type(sequences).__name__}")
        keep = _logits_to_keep(logits_to_keep)
        chosen = self.adapter if adapter is None else self._check_adapter(adapter)
        virtual = self._virtual_tokens(chosen)
        checked = []
        for i, ids in enumerate(sequences):
            with _naming(f"sequence {i} of the list"):
                checked.append(self._check_ids(ids, virtual))
        kept = [min(keep or len(ids), len(ids)) for ids in checked]
        check_logits_bytes(sum(kept), self.config.vocab_size, f"logits of {len(checked)} sequence(s)")
        call = _Call()
        try:  # (taken inside: a Ctrl-C landing right after the turn was taken kept it for ever)
            self._acquire(call)
            self._cached, self._primed = [], None
            results = []
            if self.device != "cpu":  # the CUDA engine holds one sequence and runs no rows of several
                for ids, k in zip(checked, kept):  # (forward_rows raised: `pyllm perplexity --device cuda` failed at once)
                    self._open_engine()
                    out = self.engine.forward(ids, self._prime(chosen), True)
                    results.append(out if k == len(ids) else out[len(ids) - k:].copy())  # (not a view of all)
                return results
            for first in range(0, len(checked), self.n_parallel):
                self._open_engine()  # close() began: stop between items (a corpus held it for minutes)
                group = checked[first:first + self.n_parallel]
                lengths = [len(g) for g in group]
                for seq in range(len(group)) if chosen is not None else ():  # each sequence opens with the adapter
                    prime(self.engine, self.adapters[chosen], seq)
                ends = np.cumsum(lengths)
                rows = np.concatenate([np.arange(end - k, end) for end, k in zip(ends, kept[first:first + len(group)])])
                out = self.engine.forward_rows(np.concatenate(group), np.repeat(np.arange(len(group)), lengths),
                                               np.concatenate([np.arange(virtual, virtual + n) for n in lengths]), rows)
                bounds = np.cumsum([0] + kept[first:first + len(group)])
                results += [out[bounds[i]:bounds[i + 1]] for i in range(len(group))]
            return results
        finally:
            self._release(call)

    def embed(self, texts, pooling: str = "last", normalize: bool = True, adapter: str | None = None) -> np.ndarray:
        """Embeddings f32 [len(texts), hidden] of texts (strings or token-id lists), each in a fresh context:
        the final hidden state (after the final norm) of the last token (pooling "last", the default:
        in a causal model only the last position has read the whole text, as vLLM pools decoder
        models) or the mean over all tokens ("mean"), L2-normalised unless normalize=False.
        adapter: as logits() takes it (default the LLM's): each text follows its virtual tokens, which
        the mean leaves out."""
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        chosen = self.adapter if adapter is None else self._check_adapter(adapter)
        virtual = self._virtual_tokens(chosen)
        items = _embed_inputs(texts)
        listed = not (len(items) == 1 and items[0] is texts)  # (one text given alone: not "text 0 of the list")
        checked = []
        for i, t in enumerate(items):
            with _naming(f"text {i} of the list" if listed else None):
                checked.append(self._check_ids(self.tokenize(t) if isinstance(t, str) else t, virtual))
        out = np.empty((len(checked), self.config.hidden_size), dtype=np.float32)
        call = _Call(frozenset({0}))
        try:  # (taken inside: a Ctrl-C landing right after the turn was taken kept it for ever)
            self._acquire(call)
            self._cached, self._primed = [], None
            since = time.monotonic()
            for i, ids in enumerate(checked):
                self._open_engine()  # close() began: stop between items (a corpus held it for minutes)
                held = time.monotonic() - since
                if held >= PREEMPT_AFTER and self._waiting:  # others (a scheduler's streams) get as long a turn
                    self._release(call)
                    time.sleep(held)
                    self._acquire(call)
                    self._cached, self._primed = [], None
                    since = time.monotonic()
                rows = np.arange(len(ids)) if pooling == "mean" else np.array([len(ids) - 1])
                offset = self._prime(chosen)  # (computed once: the texts rewrite only the positions after it)
                hidden = self.engine.forward_rows(ids, np.zeros(len(ids), np.int32),
                                                  np.arange(offset, offset + len(ids), dtype=np.int32), rows, True)
                out[i] = hidden.mean(axis=0) if pooling == "mean" else hidden[0]
        finally:
            self._release(call)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out

    def logits(self, ids, logits_to_keep: int = 0, adapter: str | None = None) -> np.ndarray:
        """Logits f32 [rows, vocab] in a fresh context: at every position of ids (logits_to_keep 0, the
        default), else at the last logits_to_keep positions only (transformers' logits_to_keep; all of
        a shorter ids). LimitError when rows x vocab x 4 bytes exceed limits.MAX_LOGITS_BYTES.

        adapter: a prompt-learning adapter stored in the file, as generate() takes it (default the LLM's;
        "base": none): ids then follow its virtual tokens, and the logits are those of ids' positions
        (PEFT's model(input_ids).logits without the virtual positions). ValueError when the virtual
        tokens and ids do not fit the context, or for an adapter the file does not have."""
        keep = _logits_to_keep(logits_to_keep)
        chosen = self.adapter if adapter is None else self._check_adapter(adapter)
        arr = self._check_ids(ids, self._virtual_tokens(chosen))
        keep = min(keep or arr.size, arr.size)
        check_logits_bytes(keep, self.config.vocab_size, f"logits of {arr.size} tokens")
        with self._fresh_sequence_0(chosen) as offset:
            if keep == arr.size:
                out = self.engine.forward(arr, offset, True)
            elif self.device != "cpu":  # (the CUDA engine runs no forward_rows)
                out = self.engine.forward(arr, offset, True)[arr.size - keep:].copy()
            else:
                out = self.engine.forward_rows(arr, np.zeros(arr.size, np.int32),
                                               np.arange(offset, offset + arr.size, dtype=np.int32),
                                               np.arange(arr.size - keep, arr.size))
            self._cached = [int(i) for i in arr]
            return out

    @contextlib.contextmanager
    def _fresh_sequence_0(self, adapter: str | None) -> Iterator[int]:
        """A turn at the engine whose calls run sequence 0 (Engine.forward) in a fresh context after
        `adapter`'s virtual positions (kept while the same adapter runs next); yields their count."""
        call = _Call(frozenset({0}))
        try:  # (taken inside: a Ctrl-C landing right after the turn was taken kept it for ever)
            self._acquire(call)
            self._cached = []
            yield self._prime(adapter)
        finally:
            self._release(call)

    def _prompt_logprobs(self, ids: list[int], top: int | None, adapter: str | None = None) -> list[TokenLogprob]:
        """Each token of ids with its log-probability after those before it (the first has none) and its
        `top` most likely alternatives: an echoed prompt's logprobs (pyllm serve, create_completion). The
        prompt runs in a fresh context PROMPT_LOGITS_ROWS rows at a time, each chunk's logits read and
        dropped (the whole prompt's [tokens, vocab] at once took 1.5 GiB for 8192 of SmolLM2's tokens, per
        request). adapter: as logits() takes it."""
        chosen = self.adapter if adapter is None else self._check_adapter(adapter)
        arr = self._check_ids(ids, self._virtual_tokens(chosen))
        tokens = [TokenLogprob(int(arr[0]))]
        with self._fresh_sequence_0(chosen) as offset:
            for start in range(0, arr.size - 1, PROMPT_LOGITS_ROWS):  # (the last token's logits: not needed)
                end = min(start + PROMPT_LOGITS_ROWS, arr.size - 1)
                logits = self.engine.forward(arr[start:end], offset + start, True)  # f32 [end - start, vocab]
                tokens += [_token_logprob(int(arr[k + 1]), logits[k - start], top) for k in range(start, end)]
                self._cached = [int(i) for i in arr[:end]]
        return tokens

    # -- generation ----------------------------------------------------------
    @accepts_aliases
    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                 stop_token_ids: list[int] | None = None, stream: bool = False, *, typical_p: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 logit_bias: dict[int, float] | None = None,
                 logprobs: int | None = None, response_format: dict | None = None, grammar: str | None = None,
                 logits_processors: list[LogitsProcessor] | None = None, adapter: str | None = None,
                 do_sample: bool | None = None):
        """Continues prompt (text, or token ids) and returns the new text, or a TextStream of pieces.

        do_sample (transformers'): False decodes greedily whatever the temperature; True samples, at
        temperature (default the generation config's, else 1.0); None: sampling when temperature > 0.

        adapter: the name of a prompt-learning adapter stored in the file (prompt tuning, P-tuning or
        prefix tuning; "base" or None with no default: none), default the LLM's. Its virtual tokens are
        computed once and kept in the cache while the next calls use the same adapter.

        A list of prompts (texts or token-id lists) is generated together, n_parallel sequences per
        engine step, each exactly as it would be alone (pyllm/batch.py): returns a list of texts, or with
        stream=True a BatchStream of (prompt index, text piece) pairs, whose stats and tokens are its prompts'
        (last_batch_stats and last_batch_tokens: the last list's) and whose cancel() ends it alone. Such a
        stream left unread while another call takes the engine (PREEMPT_AFTER) re-reads its running
        prompts' tokens when read again and goes on with the same texts, as a single prompt's does.
        Structured output holds each prompt of a list to the grammar (each its own grammar state), an
        adapter runs with each (its virtual positions computed once and copied to every slot);
        last_batch_tokens[i] lists prompt i's generated tokens as TokenLogprob records (with logprobs
        when asked, streamed or not), as a single stream's TextStream.tokens; logits processors serve
        every prompt (each called with that prompt's ids), so one with an accept(token) method is
        refused for a list. A prompt of a list that fails as it generates (GrammarError: the model cannot
        follow the grammar) ends alone, its stats' finish_reason "error", and the others run to their end;
        then that error is raised, naming the prompt ("prompt 3 of the list: ..."), with .errors {prompt
        index: error} for every such prompt and, without stream=True, .texts: every prompt's text (a failed
        one's up to its error). A processor's own exception (other than a PyllmError) ends the whole list
        at once.

        Unset options come from the model's generation config (transformers' defaults for a model
        that samples), else greedy and 256 new tokens; max_new_tokens=-1: until the context is full.
        Generation ends at an end-of-generation token
        of the model (every one it declares), a token in stop_token_ids, a stop string (not included
        in the text; a stop string that is a special token's text stops at that token as at that text
        written in ordinary tokens, and one that holds a special token's text among other text matches
        over the token's text where it comes, as transformers' stop_strings do), max_new_tokens,
        the end of the context, or cancel().

        typical_p ((0, 1], 1: off) is transformers' locally typical sampling, after min_p.
        presence_penalty, frequency_penalty ([-2, 2]; None: 0) and logit_bias ({token id: [-100, 100]})
        are OpenAI's. logprobs: None, or how many most likely alternatives to record per token (0: the
        chosen token's own log-probability only; a single prompt needs stream=True); they appear in
        TextStream.tokens (a list's in last_batch_tokens)
        (those of the returned text: not a stop string's tokens, as the text holds none of it).
        Structured output (needs llguidance): response_format as OpenAI's ({"type": "json_object"},
        {"type": "json_schema", "json_schema": {"schema": {...}}}, or pyllm's {"type": "regex", "regex":
        ...} / {"type": "grammar", "grammar": <Lark>}), or grammar=<Lark grammar>. Stop strings apply
        to output held to a grammar too, as llama.cpp's and vLLM's servers apply them: a stop string
        met inside JSON (a '"' or ', ') cuts it into text that does not parse, which is what the
        caller asked for; finish_reason "stop" says so.
        logits_processors: callables (ids so far, scores f64 [vocab]) -> scores, run before the
        built-in processors at every token (pyllm.sampling); one with an accept(token) method is told
        each generated token before the next engine step.
        Raises ValueError for an option out of range, a prompt that does not fit, or a bad grammar;
        structured.GrammarUnavailable (a RuntimeError) when a grammar is asked for and llguidance is
        not installed. TypeError for a prompt of another type."""
        if not _is_batch(prompt):
            if isinstance(prompt, str):
                ids = self.tokenize(self._check_prompt_chars(prompt))
            elif isinstance(prompt, (list, tuple, np.ndarray)) and getattr(prompt, "ndim", 1) == 1 and all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt):
                ids = list(prompt)
            else:
                raise prompt_type_error(prompt)
            if not ids:  # (was PyllmError "expected a non-empty list of token ids", naming no argument)
                raise ValueError("prompt is empty: it has no tokens " + (
                    "(this model's tokenizer adds no BOS token); give some text or token ids" if isinstance(prompt, str)
                    else "(an empty list: neither token ids nor prompts); give some text, token ids or a list of "
                         "prompts"))
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, typical_p, do_sample)
        # None: 0 (off), as every other option's None is its default (a caller forwarding OpenAI's fields
        # with None for the unset ones got "presence_penalty must be a number; got None")
        params.presence_penalty = option("presence_penalty", 0.0 if presence_penalty is None else presence_penalty)
        params.frequency_penalty = option("frequency_penalty", 0.0 if frequency_penalty is None else frequency_penalty)
        if not isinstance(logit_bias, (dict, type(None))):
            raise ValueError(f"logit_bias must be a dict of token id -> bias; got {type(logit_bias).__name__}")
        params.logit_bias = {option("a logit_bias key", k, integer=True): option("a logit_bias value", v)
                             for k, v in (logit_bias or {}).items()}
        params.validate()
        if any(k >= self.config.vocab_size for k in params.logit_bias):
            raise ValueError(f"logit_bias names a token past the vocabulary ({self.config.vocab_size} tokens)")
        if max_new_tokens is None:
            max_new_tokens = int(self.model.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        max_new_tokens = option("max_new_tokens", max_new_tokens, integer=True)
        if max_new_tokens == -1:  # llama.cpp's and llama-cpp-python's "until the end", as the CLI and server take it
            max_new_tokens = self.context_length
        if logprobs is not None:
            option("logprobs", logprobs, integer=True)
        if isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple, type(None))):
            raise ValueError(f"stop must be a string or a list of strings; got {type(stop).__name__}")
        stop, stop_ids = self._stop_tokens(list(stop or []), stop_token_ids)
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if logprobs is not None and not stream and not _is_batch(prompt):  # (a list's are refused below)
            # a str has no room for them: they were computed at every token and dropped in silence
            raise ValueError("logprobs are recorded in the TextStream's tokens: give stream=True (then read "
                             "stream.tokens once the text is read)")
        if logits_processors is not None and (not isinstance(logits_processors, (list, tuple)) or not all(
                callable(p) for p in logits_processors)):
            got = next((p for p in logits_processors if not callable(p)), None) if isinstance(
                logits_processors, (list, tuple)) else logits_processors
            raise TypeError("logits_processors must be a list of callables (ids, scores) -> scores; got "
                            + ("a list holding " if got is not logits_processors else "") + f"{type(got).__name__}")
        processors = list(logits_processors or [])
        chosen = self.adapter if adapter is None else self._check_adapter(adapter)
        if _is_batch(prompt):
            # (refused before a grammar is compiled: seconds for a large schema, or its own error first)
            stateful = next((p for p in processors if callable(getattr(p, "accept", None))), None)
            if stateful is not None:  # one object told the tokens of every prompt in turn would mix them
                raise ValueError(f"a logits processor with an accept(token) method ({type(stateful).__name__}) follows "
                                 "one prompt's tokens, and a list's processors serve every prompt: give a single "
                                 "prompt, or a processor that reads the ids it is called with")
            prompts = []
            for i, p in enumerate(prompt):
                with _naming(f"prompt {i} of the list"):  # (a text that is not Unicode)
                    if isinstance(p, np.ndarray) and p.ndim == 0:  # (len() of it: a bare TypeError)
                        raise PyllmError(f"token ids must be a 1-D list of integers; got an array of {p.dtype} ()")
                    # (an array as it is: list() made a 2-D one's rows "token ids" that "must be integers")
                    prompts.append(self.tokenize(self._check_prompt_chars(p)) if isinstance(p, str) else p
                                   if isinstance(p, np.ndarray) else list(p))
                if len(prompts[-1]) == 0:
                    raise ValueError(f"prompt {i} of the list is empty: it has no tokens (this model's tokenizer "
                                     "adds no BOS token); give some text or token ids")
            first = [self._constraint(response_format, grammar)]  # compiled now: a bad grammar fails the call

            def processors_for(index: int) -> list:  # each prompt its own grammar state, the caller's shared
                constraint = first.pop() if first else self._constraint(response_format, grammar)
                return ([constraint] if constraint is not None else []) + processors

            return self._batch(prompts, max_new_tokens, params, stop, stop_ids, stream, processors_for, chosen,
                               logprobs)
        constraint = self._constraint(response_format, grammar)
        if constraint is not None:
            processors.insert(0, constraint)
        pieces = self._stream(ids, max_new_tokens, params, stop, stop_ids, processors, logprobs, chosen)
        return pieces if stream else "".join(pieces)

    def _check_adapter(self, name: str | None) -> str | None:
        """A valid adapter name (None or "base": the plain model); ValueError listing the file's otherwise."""
        if name is None or name == "base":
            return None
        if not isinstance(name, str) or name not in self.adapters:  # (a list or dict: "unhashable type")
            known = ", ".join(self.adapters) or "none"
            hint = ""
            if isinstance(name, str) and os.path.isfile(os.path.join(name, "adapter_config.json")):
                # a PEFT directory where a stored adapter's name belongs: say how it gets stored
                hint = (f"; {name} is a PEFT adapter directory: store it with `pyllm convert BASE --adapter "
                        f"NAME={name}` (a LoRA adapter: --lora), then select it by NAME")
            raise ValueError(f"{self.path} has no adapter {name!r} (adapters in the file: {known}){hint}")
        return name

    def _virtual_tokens(self, adapter: str | None) -> int:
        """Positions the adapter's virtual tokens take before the real ones (0 for none)."""
        return self.adapters[adapter].virtual_tokens if adapter is not None else 0

    def _prime(self, adapter: str | None) -> int:
        """Makes slot 0's cache open with `adapter`'s virtual positions (computing them when another
        adapter, or none, is there); returns how many positions they take."""
        from .adapters import prime

        if adapter != self._primed:
            self._cached = []
            self._primed = None
            if adapter is not None:
                prime(self.engine, self.adapters[adapter], 0)
            self._primed = adapter
        return self._virtual_tokens(adapter)

    def _stop_tokens(self, stop: list[str], stop_token_ids) -> tuple[list[str], set[int]]:
        """(stop strings, stop ids): a stop string that is a special token's text adds its id (special
        tokens never reach the text) and stays a string (the same text in ordinary tokens)."""
        ids = set()
        if not isinstance(stop_token_ids, (list, tuple, set, frozenset, np.ndarray, type(None))):
            raise ValueError(f"stop_token_ids must be a list of token ids; got {type(stop_token_ids).__name__}")
        for i in stop_token_ids if stop_token_ids is not None else []:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.config.vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {self.config.vocab_size}); got {i!r}")
            ids.add(int(i))
        strings = []
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a string or a list of strings; got {type(s).__name__} {s!r:.40}")
            check_text(s, "a stop string")
            i = self.tokenizer.token_to_id(s) if s else None
            if i is not None and i in self.tokenizer.special_ids:
                ids.add(i)
            # the string too: the same text written in ordinary tokens ("<", "|im", ...) stops the reply, as
            # llama-cpp-python's and vLLM's text matching and transformers' stop_strings stop it
            strings.append(s)
        return strings, ids

    def _constraint(self, response_format: dict | None, grammar: str | None):
        """The grammar processor for response_format / grammar, or None when unconstrained."""
        from . import structured

        text = structured.grammar_from(response_format, grammar)
        if text is None:
            return None
        return structured.GrammarProcessor(self.tokenizer, text, self.config.vocab_size)

    def _batch(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stop: list[str],
               stop_ids: set[int], stream: bool, processors_for=lambda index: [], adapter: str | None = None,
               logprobs: int | None = None):
        """Several prompts together (pyllm/batch.py): a list of texts, or with stream=True a BatchStream of
        (prompt index, text piece); last_batch_stats holds each prompt's GenerationStats, last_batch_tokens
        the records of its tokens (TokenLogprob, with log-probabilities when logprobs is not None).
        processors_for(prompt index): that prompt's logits processors, asked for when it starts;
        adapter: the prompt-learning adapter every prompt runs with (None: none)."""
        from .batch import run_batch

        self._open_engine()  # stream=True: refused at the call, as without it, not at the first read
        checked = []
        virtual = self._virtual_tokens(adapter)
        for i, p in enumerate(prompts):
            if virtual + len(p) >= self.context_length:
                raise ValueError(f"prompt {i} of the list has {len(p)} tokens" + (
                    f" after {virtual} virtual ones" if virtual else "") + f"; the context holds "
                    f"{self.context_length} (leave room for the reply)")
            with _naming(f"prompt {i} of the list"):
                checked.append(self._check_ids(p, virtual))
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, or -1 (until the context is full); got {max_new_tokens}")
        self.last_batch_stats = [GenerationStats(prompt_tokens=len(p), max_new_tokens=max_new_tokens) for p in checked]
        made = iter(self.last_batch_stats)
        self.last_batch_tokens = [[] for _ in checked]
        batch_tokens = self.last_batch_tokens
        run = TextStream(GenerationStats())

        preempted = []

        def lost() -> bool:  # whether the last piece's consumer lost the engine (run_batch re-reads then)
            was = bool(preempted)
            preempted.clear()
            return was

        batch_stats = self.last_batch_stats  # (the attribute is the next list's once another list is given)
        failed: dict = {}  # prompt index -> its error (the others run on; raised once all have ended)

        def pieces():
            try:
                self._acquire(run)  # (inside: a Ctrl-C landing right after the turn was taken kept it for ever)
                batch = run_batch(self, [[int(i) for i in p] for p in checked], max_new_tokens, params, stop,
                                  stop_ids | set(self.tokenizer.eos_ids), lambda n: next(made), run.cancelled.is_set,
                                  lost, processors_for, adapter, logprobs, batch_tokens.__getitem__, failed)
                for index, piece in batch:
                    self._pause(run)
                    try:
                        yield index, piece
                    except GeneratorExit:  # closed by its consumer: the running prompts say "cancelled"
                        batch.close()
                        raise
                    if not self._resume(run):  # preempted while unread: the slots' caches are gone
                        preempted.append(True)
                        self._cached = []
            finally:
                for stats in batch_stats:  # cancelled (or closed) before they began: never started
                    stats.finish_reason = stats.finish_reason or "cancelled"
                self._release(run)
            _raise_failed(failed)

        def one_by_one():
            # the CUDA engine holds one sequence and runs no rows of several (forward_rows raised "the cuda
            # engine runs one sequence at a time" at the list's first step): each prompt runs as it would
            # alone, in turn; cancel() ends the one running (its holder) and the rest. last_stats stays the
            # last single call's, as the batched path leaves it (_run sets it for each prompt)
            previous = self.last_stats
            try:
                for index, ids in enumerate(checked):
                    alone = TextStream(batch_stats[index])
                    alone.tokens, alone.cancelled = batch_tokens[index], run.cancelled  # (BatchStream.cancel())
                    alone._pieces = self._run(ids, max_new_tokens, Sampler(params, processors_for(index),
                                                                           prompt_length=len(ids)), stop,
                                              stop_ids | set(self.tokenizer.eos_ids), alone, logprobs, adapter)
                    try:
                        with _naming(f"prompt {index} of the list", LIST_ITEM_ERRORS):
                            for piece in alone:
                                yield index, piece
                    except LIST_ITEM_ERRORS as e:  # it ends alone, as in run_batch
                        failed[index] = e
                        batch_stats[index].finish_reason = "error"
                    finally:
                        alone.close()
                    if batch_stats[index].finish_reason == "cancelled":
                        break
            finally:
                self.last_stats = previous
                for stats in batch_stats:  # cancelled (or closed) before their turn: never started
                    stats.finish_reason = stats.finish_reason or "cancelled"
            _raise_failed(failed)

        if max_new_tokens == 0:  # nothing to compute, as a single call (_run): no turn at the engine either (an
            # attached scheduler dropped its slots' caches after one)
            for stats in batch_stats:
                stats.finish_reason = "length"
            def pieces():
                yield from ()
        elif self.device != "cpu":
            pieces = one_by_one
        if stream:
            return BatchStream(pieces(), batch_stats, batch_tokens, run.cancelled)
        texts = [""] * len(checked)
        try:
            for index, piece in pieces():
                texts[index] += piece
        except LIST_ITEM_ERRORS as e:
            if getattr(e, "errors", None) is failed:  # (every prompt has ended: their texts go with it)
                e.texts = texts
            raise
        return texts

    @accepts_aliases
    def chat(self, messages: list[dict], stream: bool = False, tools: list[dict] | None = None,
             parse_special_in_content: bool = False, render_limits: RenderLimits | None = None,
             chat_template_kwargs: dict | None = None, continue_final_message: bool = False, **kwargs):
        """Replies to OpenAI-style messages using the chat template (generate's options apply).

        Messages are normalised as the server does (chat_template.normalize_messages): content as
        a string, a list of text parts, or None (an assistant turn that only calls tools). A list of
        conversations is answered together (one reply each, as generate does with a list of prompts).
        parse_special_in_content, render_limits and chat_template_kwargs (more template variables:
        {"enable_thinking": False} turns Qwen3's thinking off) and continue_final_message (the reply
        goes on from the last message's text, a prefill): as chat_prompt_ids. logprobs also takes
        OpenAI's chat form (and llama-cpp-python's create_chat_completion's): logprobs=True with
        top_logprobs=N. The reply is the model's text as written, a think block included (the server and
        create_chat_completion return it apart, as reasoning_content)."""
        for key in ("tool_choice", "parallel_tool_calls"):  # ("LLM.generate() got an unexpected keyword argument")
            if key in kwargs:
                raise TypeError(f"LLM.chat() takes no {key}: it returns the reply's text; create_chat_completion("
                                f"messages, tools=..., {key}=...) forces and parses tool calls")
        options = dict(tools=tools, parse_special_in_content=parse_special_in_content, render_limits=render_limits,
                       chat_template_kwargs=chat_template_kwargs, continue_final_message=continue_final_message)
        response_format = kwargs.get("response_format")
        if continue_final_message and (kwargs.get("grammar") is not None or
                                       isinstance(response_format, dict) and response_format.get("type") != "text"):
            raise ValueError("response_format / grammar cannot be combined with continue_final_message: the grammar "
                             "holds the whole reply, which the last message's text would begin")
        if isinstance(kwargs.get("logprobs"), (bool, np.bool_)) or "top_logprobs" in kwargs:
            # (logprobs=True was "logprobs must be an integer; got True")
            wanted, top = kwargs.pop("logprobs", None), kwargs.pop("top_logprobs", None)
            if top is not None and not wanted:
                raise ValueError("top_logprobs needs logprobs=True (as OpenAI's chat API)")
            kwargs["logprobs"] = (0 if top is None else top) if wanted else None
        kwargs["stop"] = self.chat_stop(kwargs.get("stop"))
        # a list of conversations: its first item is one (a generator's items were taken by the test of
        # each, and generate() was given none of them: "prompt is empty"; a list holding a conversation
        # and something else was read as one conversation, whose message 0 "needs a 'role' string")
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
            _check_tools(tools, self.chat_template)  # (the call's: not one conversation's fault)
            check_template_variables(chat_template_kwargs)
            prompts = []
            for i, conversation in enumerate(messages):
                with _naming(f"conversation {i} of the list"):
                    prompts.append(self.chat_prompt_ids(conversation, **options, for_generation=True))
            return self.generate(prompts, stream=stream, **kwargs)
        ids = self.chat_prompt_ids(messages, **options, for_generation=True)
        return self.generate(ids, stream=stream, **kwargs)

    # -- OpenAI's shapes (llama-cpp-python's Llama.create_completion / create_chat_completion) ---------
    @accepts_aliases
    def create_completion(self, prompt: str | list, *, max_tokens: int | None = None, temperature: float | None = None,
                          top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                          typical_p: float | None = None, repetition_penalty: float | None = None,
                          presence_penalty: float | None = None, frequency_penalty: float | None = None,
                          logit_bias: dict | None = None, seed: int | None = None, stop: str | list[str] | None = None,
                          stop_token_ids: list[int] | None = None, stream: bool = False,
                          stream_options: dict | None = None, logprobs: int | None = None, echo: bool | None = None,
                          n: int | None = None, best_of: int | None = None, suffix: str | None = None,
                          response_format: dict | None = None, model: str | None = None, user: str | None = None):
        """A /v1/completions request, answered as `pyllm serve` answers it (the same validation and
        the same answer, built by the same code: pyllm.serve.Completions), as llama-cpp-python's
        Llama.create_completion answers it; llm(prompt, ...) is this call. The server's bounds on
        what an HTTP client may send (--max-prompt-chars, --max-body-bytes) do not apply.

        The options are the request's fields (OpenAI's, and llama.cpp's top_k, min_p, typical_p,
        stop_token_ids; repeat_penalty is repetition_penalty), with the server's meaning: one left
        None takes the model's generation defaults (greedy when it has none), not llama-cpp-python's
        fixed ones (temperature 0.8, top_p 0.95, top_k 40, ...); max_tokens None is 16 (-1: until
        the context is full); seed -1 is unseeded; logprobs N (0..20) gives each token's
        log-probability and its N most likely alternatives; echo returns the prompt before the text;
        prompt may be a string, token ids, or a list of either (one choice each, n times each);
        model "BASE:ADAPTER" selects a prompt-learning adapter, and the answer names it (left out: the
        LLM's own adapter, LLM(path, adapter=NAME), as generate() runs it).

        Returns a dict: {"id": "cmpl-...", "object": "text_completion", "created": int, "model": str,
        "system_fingerprint": str, "choices": [{"index": int, "text": str, "logprobs": None |
        {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{str: float}], "text_offset":
        [int]}, "finish_reason": "stop" | "length"}], "usage": {"prompt_tokens": int,
        "completion_tokens": int, "total_tokens": int, "prompt_tokens_details": {"cached_tokens": int,
        "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
        "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}}. With stream=True an iterator of chunk
        dicts with the same id, object "text_completion", and one choice each: {"index", "text" (the
        new text), "logprobs", "finish_reason": None but in a choice's last chunk};
        stream_options={"include_usage": True} adds "usage" to every chunk, None but in a last chunk
        with no choices. Choices run one after another; closing the iterator, or leaving a `for`
        over it, ends the generation and frees the model for the next call. An error while it
        generates (a grammar the model cannot follow) is raised by the iterator, where the server
        sends an error event. A generation that cancel() ended says finish_reason "cancelled".

        Raises pyllm.errors.RequestError (a ValueError) for a request the server refuses with a 4xx,
        with the server's message, naming the field in .param (a prompt or max_tokens past the
        context: .code "context_length_exceeded"); ValueError (PyllmError) for a grammar that cannot
        be used; TypeError for an unknown keyword (or one of llama-cpp-python's this does not take,
        saying what to do); RuntimeError without pydantic (pip install 'pyllm[serve]') or, for
        response_format, without llguidance (structured.GrammarUnavailable)."""
        return self._create(locals(), chat=False)

    __call__ = create_completion

    @accepts_aliases
    def create_chat_completion(self, messages: list[dict], *, tools: list[dict] | None = None,
                               tool_choice: str | dict | None = None, parallel_tool_calls: bool | None = None,
                               response_format: dict | None = None, max_tokens: int | None = None,
                               max_completion_tokens: int | None = None, temperature: float | None = None,
                               top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                               typical_p: float | None = None, repetition_penalty: float | None = None,
                               presence_penalty: float | None = None, frequency_penalty: float | None = None,
                               logit_bias: dict | None = None, seed: int | None = None,
                               stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                               stream: bool = False, stream_options: dict | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None, n: int | None = None,
                               model: str | None = None, user: str | None = None, functions: list | None = None,
                               function_call: str | dict | None = None, reasoning_effort: str | None = None,
                               verbosity: str | None = None, modalities: list[str] | None = None,
                               prediction: dict | None = None, store: bool | None = None,
                               metadata: dict | None = None, service_tier: str | None = None,
                               prompt_cache_key: str | None = None, prompt_cache_retention: str | None = None,
                               prompt_cache_options: dict | None = None, safety_identifier: str | None = None,
                               audio: dict | None = None, web_search_options: dict | None = None,
                               moderation: dict | None = None, chat_template_kwargs: dict | None = None,
                               reasoning_format: str | None = None, add_generation_prompt: bool = True,
                               continue_final_message: bool = False):
        """A /v1/chat/completions request, answered as `pyllm serve` answers it (the same
        validation and the same answer, built by the same code: pyllm.serve.Completions), as
        llama-cpp-python's Llama.create_chat_completion answers it.

        messages: OpenAI's ({"role", "content": a string or text parts, "tool_calls", ...}); the
        options are the request's fields with the server's meaning (create_completion's; max_tokens
        None: until the context is full). tools / tool_choice ("none", "auto", "required" or
        {"type": "function", "function": {"name": ...}}; the last two held to a grammar) /
        parallel_tool_calls: OpenAI's function calling, for templates with a tool-call format;
        response_format: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": str,
        "schema": {...}}} (name required, as OpenAI), or pyllm's "regex" / "grammar" types (needs
        llguidance); logprobs=True with
        top_logprobs N: each token's log-probability and its N most likely alternatives.
        functions / function_call (OpenAI's deprecated forms) are refused, saying what to give.
        reasoning_effort goes to a chat template that reads it (gpt-oss's; refused for one that does
        not); OpenAI's other fields (verbosity, modalities, prediction, store, metadata, service_tier,
        prompt_cache_*, safety_identifier, audio, web_search_options, moderation) are checked and
        answered as the server answers them (text output only; the fields that steer OpenAI's own
        services change nothing), so that a request's fields pass through as they are.
        chat_template_kwargs (llama.cpp's and vLLM's): more template variables ({"enable_thinking":
        False} turns Qwen3's thinking off). reasoning_format: "deepseek" (the default) returns a think
        block the reply opens with (<think>...</think>, [THINK]...[/THINK]) as the message's
        reasoning_content apart from its content; "none" leaves it in content (pyllm/reasoning.py).
        continue_final_message=True with add_generation_prompt=False: the reply continues the last
        message's text (an assistant prefill; chat_prompt_ids).

        Returns a dict: {"id": "chatcmpl-...", "object": "chat.completion", "created": int,
        "model": str, "system_fingerprint": str, "choices": [{"index": int, "message": {"role":
        "assistant", "content": str | None, "refusal": None, "reasoning_content": str (only for a
        template with think tags, when the reply thinks), "tool_calls": [{"id", "type": "function",
        "function": {"name", "arguments": str}}] (only when it calls)}, "logprobs": None | {"content":
        [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}, "finish_reason":
        "stop" | "length" | "tool_calls"}], "usage": {...}} (create_completion's). With stream=True an
        iterator of dicts of object "chat.completion.chunk", one choice each: {"index", "delta":
        {"role": "assistant", "content": "", "refusal": None} first, then {"reasoning_content": str} and
        {"content": str} pieces and {"tool_calls": [...]}, "logprobs", "finish_reason": None but in a choice's last chunk};
        stream_options and closing the iterator as create_completion's.

        Raises what create_completion raises; a tool or template error is RequestError naming
        "tools" or "messages" (ToolError, a ValueError, for tools the template cannot call)."""
        return self._create(locals(), chat=True)

    def _create(self, arguments: dict, chat: bool):
        """create_completion's and create_chat_completion's answer to their arguments (locals())."""
        import json

        from . import serve

        if serve.parse_request is None:
            raise RuntimeError("LLM.create_completion and create_chat_completion need pydantic: "
                               "pip install 'pyllm[serve]'")
        fields = {k: v for k, v in arguments.items() if k != "self" and v is not None}
        try:  # the request as JSON carries it, so that it is validated as the server validates a body
            raw = json.dumps(fields, default=_jsonable).encode()
        except (TypeError, ValueError):
            for name, value in fields.items():  # the argument at fault
                try:
                    json.dumps(value, default=_jsonable)
                except (TypeError, ValueError) as e:
                    raise TypeError(f"{name}: {e} (a request field holds JSON's types: str, int, float, bool, "
                                    "None, list, dict)") from None
            raise
        # made per call (microseconds): kept on self, it and self would hold each other, and a deleted LLM
        # its memory (the mapped file, the KV cache) until the garbage collector's next cycle
        completions = serve.Completions(self, os.path.splitext(os.path.basename(self.path))[0])
        return completions.create(serve.parse_body(raw), chat)

    def chat_stop(self, stop):
        """`stop` (None, a string or a list) with the end-of-turn marker of a built-in chat template
        (chat_template.TEMPLATE_STOPS) added; another value is returned as given, for generate to refuse."""
        extra = template_stop(self.chat_template)
        if not extra or not isinstance(stop, (str, list, tuple, type(None))):
            return stop
        given = [stop] if isinstance(stop, str) else list(stop or [])
        return given + [s for s in extra if s not in given]

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None,
                        parse_special_in_content: bool = False, render_limits: RenderLimits | None = None,
                        chat_template_kwargs: dict | None = None, for_generation: bool = False,
                        add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        """Token ids of the rendered chat prompt (with the generation prompt), BOS added as the tokenizer does.

        Every text the caller gives is text: a special token's string (say "<|im_end|>") written in a
        message's content, role, name or tool-call arguments, in a tool's description or schema, or
        in a template variable becomes ordinary tokens, so a user cannot forge the template's markers;
        the template's own markers stay special. parse_special_in_content=True tokenizes the rendered
        prompt as one text, with special-token strings written there parsed as the tokens themselves.
        Without such strings both give the tokens transformers' apply_chat_template gives. render_limits
        bounds the template's time and output (TemplateError past them). chat_template_kwargs: more
        template variables (reasoning_effort=..., enable_thinking=...), as transformers'
        apply_chat_template(**kwargs) (TemplateError for one pyllm sets itself: check_template_variables).
        for_generation=True: a rendered prompt too long for the context whatever its tokens is refused
        before tokenizing (_check_prompt_chars); without it any length is counted (`pyllm run`'s chat
        measures a conversation that outgrows the context).

        add_generation_prompt=False leaves the template's opening of the reply out.
        continue_final_message=True (transformers' apply_chat_template and vLLM's name; an assistant
        prefill, as Anthropic's API takes a final assistant turn) renders the conversation without a
        generation prompt and ends it right after the last message's text, so the reply goes on from
        there (chat_template.render_continuing); TemplateError where the template does not write it."""
        _check_tools(tools, self.chat_template)
        extra = {**check_template_variables(chat_template_kwargs), **({"tools": tools} if tools is not None else {})}
        messages = normalize_messages(messages)
        texts = [] if parse_special_in_content else list(_texts([messages, extra]))
        protected = self.tokenizer.special_tokens_in(texts)
        placeholders = {}
        if protected:
            # each special-token string the caller wrote becomes a placeholder character while the template renders
            placeholders = placeholder_characters(sorted(protected), set("".join(texts)) | set(self.chat_template or ""))
            try:
                messages, extra = _hide_texts([messages, extra], placeholders)
            except RecursionError:
                raise PyllmError("the messages, tools or template variables are nested too deeply (or hold "
                                 "themselves)") from None
        if continue_final_message:
            text = render_continuing(lambda marked: self._render(marked, False, render_limits, **extra), messages)
        else:
            text = self._render(messages, add_generation_prompt, render_limits, **extra)
        if for_generation:
            self._check_prompt_chars(text)
        if placeholders:
            ids = self.tokenizer.encode_with_literal(text, {c: t for t, c in placeholders.items()})
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_id
        if self.tokenizer.spec.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            limits: RenderLimits | None = None, **extra) -> str:
        """The chat template (the model's, or the one LLM(chat_template=) gave) rendered over messages, as
        text: transformers' apply_chat_template(tokenize=False), over the messages as chat() sends them
        (normalize_messages: "developer" is "system", content parts joined, None content ""). extra: more
        template variables (tools=, documents=, ...); limits bound its time and output (RenderLimits()).
        TemplateError for a model without a usable template or a template that fails. chat_prompt_ids
        gives the prompt's token ids."""
        return self._render(normalize_messages(messages), add_generation_prompt, limits, **extra)

    def _render(self, messages: list[dict], add_generation_prompt: bool = True, limits: RenderLimits | None = None,
                **extra) -> str:
        """apply_chat_template over messages already normalized (normalize_messages: not twice, as a
        tool call's arguments '"5"' would be read as JSON twice)."""
        if self.chat_template_fault:
            raise TemplateError(self.chat_template_fault)
        spec = self.tokenizer.spec
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=spec.bos_token or "", eos_token=spec.eos_token or "",
                           unk_token=spec.unk_token or "", pad_token=spec.pad_token or "", limits=limits,
                           origin=self.chat_template_origin, **extra)

    def _sampling(self, temperature, top_k, top_p, min_p, repetition_penalty, seed, typical_p=None,
                  do_sample=None) -> SamplingParams:
        d = self.model.generation
        if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False; got {do_sample!r}")
        samples = bool(d.get("do_sample", False)) if do_sample is None else bool(do_sample)
        if do_sample is not None and not do_sample:
            temperature = 0.0  # transformers' generate(do_sample=False): greedy, the temperature unused
        elif do_sample and temperature is not None and option("temperature", temperature) == 0:
            raise ValueError("do_sample=True samples, and temperature=0 decodes greedily; give a temperature > 0")
        temperature, top_p, min_p, repetition_penalty, typical_p = (
            None if v is None else option(name, v) for name, v in (
                ("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                ("repetition_penalty", repetition_penalty), ("typical_p", typical_p)))
        top_k, seed = (None if v is None else option(name, v, integer=True) for name, v in (("top_k", top_k),
                                                                                        ("seed", seed)))
        check_seed(seed)
        params = SamplingParams(
            temperature=float((d.get("temperature", 1.0) if samples else 0.0) if temperature is None else temperature),
            # the file's own top_k, as its top_p, even when it does not sample (then a caller's temperature > 0
            # samples as transformers' generate(do_sample=True) would); only the default 50 needs do_sample
            # -1 is off as 0 (llama.cpp's and vLLM's spelling; the server's schema takes it too)
            top_k=int(d.get("top_k", 50 if samples else 0) if top_k is None else (0 if top_k == -1 else top_k)),
            top_p=float(d.get("top_p", 1.0) if top_p is None else top_p),
            min_p=float(d.get("min_p", 0.0) if min_p is None else min_p),
            typical_p=float(d.get("typical_p", 1.0) if typical_p is None else typical_p),
            repetition_penalty=float(d.get("repetition_penalty", 1.0) if repetition_penalty is None
                                     else repetition_penalty),
            # -1: unseeded, as llama.cpp; other negative seeds (OpenAI allows any int64) are taken modulo 2**64
            seed=None if seed is None or seed == -1 else int(seed) % (1 << 64),
        )
        params.validate()
        return params

    def cancel(self) -> None:
        """Ends the running generate/chat call (from any thread): within one token, or one prefill chunk."""
        running = self._holder
        if running is not None:
            running.cancel()

    def _stream(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stop: list[str],
                stop_ids: set[int], processors: list, logprobs: int | None, adapter: str | None = None) -> TextStream:
        self._open_engine()  # stream=True: refused at the call, as without it, not at the first read
        prompt = self._check_ids(ids)
        virtual = self._virtual_tokens(adapter)
        if virtual + len(prompt) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens" + (f" after {virtual} virtual ones" if virtual else "")
                             + f"; the context holds {self.context_length} (leave room for the reply)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, or -1 (until the context is full); got {max_new_tokens}")
        stream = TextStream(GenerationStats(prompt_tokens=len(prompt), max_new_tokens=max_new_tokens))
        if max_new_tokens == 0:  # nothing to compute: so it says, read or not (as a list's prompts)
            stream.stats.finish_reason = "length"
        sampler = Sampler(params, processors, prompt_length=len(prompt))
        stop_ids = stop_ids | set(self.tokenizer.eos_ids)
        if self.scheduler is not None:  # runs in the scheduler's batch, beside other streams
            return self.scheduler.stream(stream.stats, [int(i) for i in prompt], max_new_tokens, sampler, stop,
                                         stop_ids, logprobs, adapter)
        stream._pieces = self._run(prompt, max_new_tokens, sampler, stop, stop_ids, stream, logprobs, adapter)
        return stream

    def _prefill(self, ids: list[int], common: int, cancel: threading.Event, offset: int = 0) -> np.ndarray | None:
        """Runs ids[common:] in chunks at positions offset + index (after an adapter's virtual tokens);
        logits f32 [vocab] of the last token, or None when cancelled."""
        self._cached = ids[:common]
        logits = None
        for start in range(common, len(ids), PREFILL_CHUNK):
            if cancel.is_set():
                return None
            chunk = np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int32)
            logits = self._running_engine().forward(chunk, offset + start, False)
            self._cached = ids[:start + len(chunk)]
        return logits

    def _reuse(self, ids: list[int]) -> int:
        """How many leading tokens of ids the KV cache holds already (at most len(ids) - 1)."""
        return min(common_prefix_length(self._cached, ids), len(ids) - 1)

    def _run(self, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler, stop: list[str], stop_ids: set[int],
             stream: TextStream, logprobs: int | None, adapter: str | None = None) -> Iterator[str]:
        stats, cancel = stream.stats, stream.cancelled
        try:
            self._acquire(stream)  # (inside: a Ctrl-C landing right after the turn was taken kept it for ever)
            self.last_stats = stats
            if max_new_tokens == 0:  # (its stats say "length" from the start: _stream)
                return
            # reuse the cached prefix; at least one prompt token must run to give logits
            ids = [int(i) for i in prompt]  # the tokens whose keys/values this call has computed
            start = time.perf_counter()
            offset = self._prime(adapter)  # positions 0 .. offset - 1: the adapter's virtual tokens
            common = self._reuse(ids)
            stats.cached_tokens = common
            logits = self._prefill(ids, common, cancel, offset)
            stats.prefill_seconds = time.perf_counter() - start
            if logits is None:
                stats.finish_reason = "cancelled"
                return
            self._cached = ids  # one list from here on: each new token is appended to both
            text = StopText(StreamDecoder(self.tokenizer, ids), stop, stats)
            limit = min(max_new_tokens, self.context_length - offset - len(ids))
            decode_start = time.perf_counter()
            stats.finish_reason = "length"
            for step in range(limit):
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                token = sampler(logits, ids)
                stats.generated_tokens += 1
                if step == 0:
                    stats.time_to_first_token = time.perf_counter() - start
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    break
                sampler.accept(token)
                piece = text.push(token, _token_logprob(token, logits, logprobs))
                stream.tokens += text.take_tokens()  # those whose text is out (a stop string's never are)
                if text.stopped:
                    stats.finish_reason = "stop"
                    break
                if piece:
                    self._pause(stream)
                    try:
                        yield piece
                    except GeneratorExit:  # closed by its consumer (a `for` left by break): it said "length"
                        stats.finish_reason = "cancelled"  # as a scheduled stream's does
                        raise
                    if not self._resume(stream):  # preempted while its consumer was away: re-read the context
                        offset = self._prime(adapter)
                        if self._prefill(ids, self._reuse(ids), cancel, offset) is None:
                            stats.finish_reason = "cancelled"
                            break
                        self._cached = ids
                if step + 1 < limit:  # (a logits processor may have closed the LLM: RuntimeError, not AttributeError)
                    logits = self._running_engine().forward(np.array([token], dtype=np.int32), offset + len(ids), False)
                    ids.append(token)  # self._cached is ids: the cache holds them all
            rest = text.finish(flush=stats.finish_reason != "cancelled")
            stream.tokens += text.take_tokens()
            if text.stopped:
                stats.finish_reason = "stop"
            stats.decode_seconds = time.perf_counter() - decode_start
            if rest:  # paused like every piece: a consumer that keeps the stream after its last piece
                self._pause(stream)  # (not asking for the end) must not hold the engine from other calls
                yield rest
        except BaseException:
            # cut short by an error (close() while its consumer was away, a logits processor's exception):
            # it said "length", as if it had run to its limit
            stats.finish_reason = "cancelled"
            raise
        finally:
            self._release(stream)

    def __reduce__(self):
        """An LLM holds a mapped file and an engine's threads: not picklable (it said "cannot pickle
        'mmap.mmap' object"). Another process opens the model itself: LLM(path)."""
        raise TypeError(f"an LLM cannot be pickled (it holds the mapped model and the engine); in another "
                        f"process open the model again: pyllm.LLM({self.path!r})")

    def close(self) -> None:
        """Releases the engine and unmaps the file. A running call is cancelled (it ends within one
        token or prefill chunk; embed and logits_many within one item, raising RuntimeError) and
        waited for; a stream left unread loses the engine at once (read
        again, it raises RuntimeError); an attached scheduler ends its streams and stops. Always
        returns; closing twice is a no-op."""
        scheduler = self.scheduler
        if scheduler is not None:  # first: its thread, refused its turn below, then ends quietly
            scheduler._stop()
        with self._lock:
            if self.engine is not None:
                self._closing = True  # calls waiting for their turn give up, the scheduler's thread too
                if self._holder is not None:
                    self._holder.cancel()
                self._turn.notify_all()
        if scheduler is not None:
            # (after the cancel: its thread may have been waiting for the turn of another call, a list read
            # on, and close() waited for the whole list, up to its 30 s join)
            scheduler.close()
        with self._lock:
            if self.engine is None:
                return
            while self._holder is not None and self._idle_since is None and \
                    self._holder_thread != threading.get_ident():
                self._turn.wait(0.05)  # the holder ends its step, then releases or waits for its consumer
            if self._holder is not None:
                self._preempted.add(id(self._holder))
            self._holder = self._holder_thread = self._idle_since = self._holder_frame = None
            self.engine = None
            self.model.close()
            self._turn.notify_all()

    def __enter__(self):
        self._open_engine()  # as a closed file refuses `with`: the block's calls would all fail later
        return self

    def __exit__(self, *exc):
        self.close()


def common_prefix_length(a, b) -> int:
    """Length of the common prefix of two token lists (or 1-D arrays)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def option(name: str, value, integer: bool = False):
    """A numeric option of generate(): value as a float (finite), or an int with integer=True
    (floats and bools refused: they would be truncated in silence); ValueError naming it otherwise."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer; got {value!r:.40}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r:.40}")
    try:
        number = float(value)  # an int past a float's range: OverflowError
    except OverflowError:
        number = float("inf")
    if not np.isfinite(number):
        raise ValueError(f"{name} must be a finite number; got {value!r:.40}")
    return number


def _logits_to_keep(value) -> int:
    """logits_to_keep as an int >= 0 (0: every position's logits); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"logits_to_keep must be a non-negative integer (0 for every position), got {value!r}")
    return int(value)


def token_ids(ids, vocab_size: int) -> np.ndarray:
    """ids (a list, tuple or 1-D integer array of token ids) as int64 [n], each checked to lie in
    [0, vocab_size) before any conversion (an int too large for int64 is out of range, not an
    OverflowError). Raises PyllmError for anything else: floats, bools, strings, nested lists."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
            raise PyllmError(f"token ids must be a 1-D list of integers; got an array of {ids.dtype} {ids.shape}")
        values = ids
    else:
        if not isinstance(ids, (list, tuple)):
            raise PyllmError(f"token ids must be a list of integers; got {type(ids).__name__}")
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
        if bad is not None:
            raise PyllmError(f"token ids must be integers; got {type(bad).__name__} {bad!r:.40}")
        values = ids
    if len(values):
        low, high = min(values), max(values)
        if low < 0 or high >= vocab_size:
            raise PyllmError(f"token ids must lie in [0, {vocab_size}); got {low if low < 0 else high}")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _check_tools(tools, template: str | None) -> None:
    """chat's tools: None or a list of tool dicts (TypeError naming what it got otherwise), each
    naming its function as OpenAI's {"type": "function", "function": {"name": ...}} or transformers'
    flat {"name": ...} do (ToolError otherwise), for a template that reads them (ToolError)."""
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        # the template iterated whatever it was given: a string's characters, a dict's keys, in silence
        got = next((t for t in tools if not isinstance(t, dict)), None) if isinstance(tools, (list, tuple)) else tools
        raise TypeError("tools must be a list of tool dicts ({'type': 'function', 'function': {...}}); got "
                        + ("a list holding " if got is not tools else "") + type(got).__name__)
    for k, tool in enumerate(tools or ()):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolError(f"tools[{k}] names no function: a tool is {{'type': 'function', 'function': {{'name': "
                            f"..., 'description': ..., 'parameters': {{...}}}}}}; got {tool!r:.120}", f"tools[{k}]")
    if tools and template is not None:  # (no template at all: the render's TemplateError says so)
        check_template_reads_tools(template)  # a template that never reads them dropped them in silence


def _embed_inputs(texts) -> list:
    """embed()'s texts as a list of items, each a str or token ids (PyllmError later otherwise): one
    text, one token-id list or 1-D array, or a list, tuple or 2-D array of those. TypeError for
    anything else (None, a number, a dict, a generator), naming what it got."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        return [texts] if texts.ndim == 1 else list(texts) if texts.ndim == 2 else [texts]  # other shapes: refused later
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str, a list of token ids, or a list of those; got {type(texts).__name__}")
    return [texts] if texts and isinstance(texts[0], (int, np.integer)) else list(texts)


def _jsonable(value):
    """json.dumps' default for the NumPy values a request field may hold (token ids, a seed)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not a JSON type")


_PROMPT_TYPES = (str, list, tuple, np.ndarray)  # what one prompt of a list may be


def _is_batch(prompt) -> bool:
    """A list of prompts (texts, token-id lists or arrays), as opposed to one prompt's token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, _PROMPT_TYPES) for p in prompt)


def _token_logprob(token: int, logits: np.ndarray, top: int | None) -> TokenLogprob:
    """The record of one generated token; log-probabilities from the raw logits when top is not None."""
    if top is None:
        return TokenLogprob(token)
    logp = log_softmax(logits)
    best = most_likely(logp, top) if top else []
    return TokenLogprob(token, float(logp[token]), [(int(i), float(logp[i])) for i in best])


def _texts(value):
    """Every string in value (messages, tools, template variables): dict keys and values, list and
    tuple items, at any depth; a container met again (one that holds itself) is read once."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            stack.extend([*v.keys(), *v.values()] if isinstance(v, dict) else v)


def _hide_texts(value, placeholders: dict[str, str]):
    """value with each key of placeholders, in every string _texts finds, replaced by its value.
    RecursionError for nesting deeper than Python's stack (or a container that holds itself)."""
    if isinstance(value, str):
        for token in sorted(placeholders, key=len, reverse=True):
            value = value.replace(token, placeholders[token])
        return value
    if isinstance(value, dict):
        return {_hide_texts(k, placeholders): _hide_texts(v, placeholders) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide_texts(v, placeholders) for v in value]
    return value


class StopText:
    """A stream's text with its stop strings (OpenAI's `stop`) held back: text that may still begin a
    stop string is kept until it cannot. The one place LLM._run, pyllm.batch and pyllm.scheduler
    turn sampled tokens into the pieces they emit.

    push(token, record) -> the text now safe to emit; when a stop string completes, `stopped` is set and the
    text before it is kept for finish(). finish(flush) -> the rest: with flush (not after a stop),
    the decoder's last text first, which may itself complete a stop string.

    The tokens go out with their text: take_tokens() -> the records (push's record, the token id
    without one) of the tokens whose text begins in the text emitted so far, so that a stream pairs
    each piece with the tokens that made it. After a stop, the tokens whose text begins at or past
    the stop string never go out: tokens and log-probabilities match the returned text (llama.cpp's
    server drops a stop word's tokens from its probabilities too), the stop string's tokens as little
    listed as its text is returned. Without a stop, finish() lets every token out."""

    def __init__(self, decoder: StreamDecoder, stop: list[str], stats: "GenerationStats | None" = None):
        self.decoder, self.stop, self.stats = decoder, stop, stats  # stats.stop_string: set by a stop
        self.held = ""
        # Special tokens decode to no text, so a stop string holding one's text ("Hello<|im_end|>",
        # "<|im_start|>user") could never match. Stop strings are matched against `view`: the held text
        # with the text of those special tokens where they came (transformers' stop_strings match over
        # every token's text alike); it never reaches the output. marks: (start in view, length) of each.
        tokenizer = decoder.tokenizer
        self.marked = {}
        for special in tokenizer.special_tokens if any(stop) else ():
            if special and any(special in s for s in stop):
                i = tokenizer.token_to_id(special)
                if i is not None:
                    self.marked[i] = special
        self.view = ""
        self.marks: list[tuple[int, int]] = []
        self.prefixes = _StopPrefixes(stop)  # how much of the held text may begin a stop string
        self.stopped = False
        self.emitted = 0  # characters returned (by push and finish)
        self.pending: list[tuple[int, object]] = []  # (where its text begins, record) of tokens not yet out
        self.out: list = []  # records of tokens out, not yet taken

    def push(self, token: int, record=None) -> str:
        new = self.decoder.push(token)
        self.pending.append((0, token if record is None else record))
        self._place(self.decoder.begins)
        self.held += new
        self.view += new
        if token in self.marked:
            self.marks.append((len(self.view), len(self.marked[token])))
            self.view += self.marked[token]
            new += self.marked[token]
        cut = _find_stop(self.view, self.stop)
        if cut is not None:
            self._stop_at(cut)
            return ""
        safe = len(self.view) - self.prefixes.feed(new)
        for start, n in self.marks:  # a stop string may begin inside a special token's text: keep it whole
            if start < safe < start + n:
                safe = start
        held_safe = self._held_offset(safe)
        piece, self.held = self.held[:held_safe], self.held[held_safe:]
        self.view = self.view[safe:]
        self.marks = [(start - safe, n) for start, n in self.marks if start >= safe]
        self._emit(len(piece))
        return piece

    def _held_offset(self, at: int) -> int:
        """The offset in `held` of `view`[at] (inside a special token's text: where the token is)."""
        offset = at
        for start, n in self.marks:
            if start >= at:
                break
            offset -= min(n, at - start)
        return offset

    def finish(self, flush: bool = True) -> str:
        if flush and not self.stopped:
            last = self.decoder.flush()  # the text decode() gives for the last tokens, held back until now
            self.held += last
            self.view += last
            self._place(self.decoder.begins)
            cut = _find_stop(self.view, self.stop)
            if cut is not None:
                self._stop_at(cut)
        rest, self.held, self.view, self.marks = self.held, "", "", []
        self._emit(len(rest))
        if not self.stopped:
            self.out += [record for _, record in self.pending]
            self.pending = []
        return rest

    def take_tokens(self) -> list:
        """The records of the tokens out since the last call (see the class docstring)."""
        out, self.out = self.out, []
        return out

    def _place(self, begins: list[int]) -> None:
        """Where the text of the last len(begins) tokens begins (StreamDecoder.begins): those still
        pending take it, and the tokens before them begin no later (a token that rewrites the text
        before it, completing a character, makes that text its own too)."""
        n, k = len(self.pending), len(begins)
        for j, begin in enumerate(begins):
            if n - k + j >= 0:
                self.pending[n - k + j] = (begin, self.pending[n - k + j][1])
        if begins:
            self.pending[:max(0, n - k)] = [(min(b, begins[0]), r) for b, r in self.pending[:max(0, n - k)]]

    def _stop_at(self, cut: int) -> None:
        """A stop string begins at view[cut]: the text before it stays held, the tokens from it on are dropped."""
        if self.stats is not None:
            self.stats.stop_string = min((s for s in self.stop if s and self.view.startswith(s, cut)), key=len)
        cut = self._held_offset(cut)
        self.held, self.stopped = self.held[:cut], True
        self.view, self.marks = self.held, []
        end = self.emitted + cut
        self.pending = [(begin, record) for begin, record in self.pending if begin < end]

    def _emit(self, n: int) -> None:
        self.emitted += n
        while self.pending and self.pending[0][0] < self.emitted:
            self.out.append(self.pending.pop(0)[1])


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


class _StopPrefixes:
    """The longest suffix of an append-only text that is a proper prefix of one of the stop strings,
    kept up to date as characters arrive: per stop string the Knuth-Morris-Pratt automaton, its
    failure links computed only as far as a match has reached. A character costs amortized O(1) per
    stop string. (Checking each token's text against every prefix cost O(length^2) a token: 16
    stop strings of 50,000 characters, 0.49 s a token on the thread all streams share.)"""

    def __init__(self, stop: list[str]):
        self.stops = [s for s in stop if s]
        self.links = [[0] for _ in self.stops]  # links[i][k]: KMP failure of stops[i][:k + 1]
        self.matched = [0] * len(self.stops)

    def _link(self, i: int, k: int) -> int:
        """The failure link of stops[i][:k + 1], computed (with those before it) on first use."""
        s, links = self.stops[i], self.links[i]
        while len(links) <= k:
            j, back = len(links), links[-1]
            while back > 0 and s[j] != s[back]:
                back = links[back - 1]
            links.append(back + 1 if s[j] == s[back] else 0)
        return links[k]

    def feed(self, text: str) -> int:
        """Takes the text's next characters; returns the length of its longest suffix that is a
        proper prefix of a stop string (0 when none)."""
        best = 0
        for i, s in enumerate(self.stops):
            m = self.matched[i]
            for c in text:
                while m > 0 and (m == len(s) or s[m] != c):
                    m = self._link(i, m - 1)
                if s[m] == c:
                    m += 1
            self.matched[i] = m
            if m < len(s):
                best = max(best, m)
        return best
