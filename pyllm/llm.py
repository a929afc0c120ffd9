"""The Python API: pyllm.LLM opens a .pllm file and generates text with the C++ engine."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .chat_template import render_chat, resolve_chat_template
from .formats.packed import PackedModel
from .formats.safetensors import FormatError
from .limits import RenderLimits, check_context_length, check_threads
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_CONTEXT = 4096
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the call nor the model's generation config says
PREFILL_CHUNK = 64  # prompt tokens per engine call: cancel() is honoured between chunks
# A stream whose consumer has not asked for its next piece for this long, while another call waits
# for the engine, gives the engine up; resumed, it re-reads its context into the KV cache.
PREEMPT_AFTER = 0.25  # seconds
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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # seconds from the call to the first generated token
    finish_reason: str = ""  # "stop", "length" (max_new_tokens or the context is full) or "cancelled"

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
    """A non-streaming use of the engine (logits()): an owner for the engine's lock."""

    def cancel(self) -> None:
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

    context_length: 1 .. pyllm.limits.MAX_CONTEXT_LENGTH tokens; n_threads: 1 .. MAX_THREADS
    (LimitError, a ValueError, otherwise). verify=True checks every tensor's checksum before
    loading (FormatError on a mismatch; `pyllm verify` does the same from the command line).

    One LLM may be shared between threads: calls run one at a time, in turn. cancel() ends the
    running call from any thread. A stream holds the engine only while its consumer keeps reading:
    one left unread for PREEMPT_AFTER seconds while another call waits (at once if that call is in
    the same thread) gives the engine up, and when read again re-reads its context into the KV
    cache and continues with the same text. close() cancels the running call and always returns.

    Context policy: a prompt that does not fit the context (leaving room for one new token) is
    refused with ValueError; a reply ends with finish_reason "length" when the context is full.
    Nothing slides or is dropped silently.
    """

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, context_length: int | None = None,
                 chat_template: str | None = None, device: str = "cpu", kv_cache: str = "auto",
                 verify: bool = False):
        backend = engine_module(device)
        if n_threads is not None:
            check_threads(n_threads)
        if context_length is not None:
            check_context_length(context_length)
        self.path = os.fspath(path)
        self.model = PackedModel(self.path)
        if verify:
            self.model.verify()
        self.config = self.model.config
        self.chat_template = resolve_chat_template(chat_template) if chat_template else self.model.chat_template
        n_ctx = context_length or min(self.config.max_position_embeddings, DEFAULT_CONTEXT)
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
        # Who uses the engine: the holder (a TextStream or a _Call), its thread, and since when a
        # holding stream has been waiting for its consumer (None while it computes).
        self._turn = threading.Condition()
        self._holder = None
        self._holder_thread: int | None = None
        self._idle_since: float | None = None
        self._preempted: set[int] = set()  # id() of streams that lost the engine while idle
        self._cached: list[int] = []  # tokens whose keys/values the engine's cache holds, from position 0
        self.last_stats = GenerationStats()

    # -- tokens --------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- turns at the engine -------------------------------------------------------
    def _acquire(self, owner) -> None:
        """Waits for the engine and makes owner its holder. An idle holding stream is preempted
        (at once when it belongs to this thread, else after PREEMPT_AFTER seconds)."""
        me = threading.get_ident()
        with self._turn:
            while True:
                if self.engine is None:
                    raise RuntimeError("this LLM is closed")
                if self._holder is None:
                    break
                if self._idle_since is not None:
                    idle = time.monotonic() - self._idle_since
                    if self._holder_thread == me or idle >= PREEMPT_AFTER:
                        self._preempted.add(id(self._holder))
                        break
                    self._turn.wait(PREEMPT_AFTER - idle)
                else:
                    self._turn.wait(PREEMPT_AFTER)  # the holder may go idle without telling
            self._holder, self._holder_thread, self._idle_since = owner, me, None
            self._preempted.discard(id(owner))

    def _release(self, owner) -> None:
        with self._turn:
            if self._holder is owner:
                self._holder = self._holder_thread = self._idle_since = None
                self._turn.notify_all()
            self._preempted.discard(id(owner))

    def _pause(self, owner) -> None:
        """owner hands a piece to its consumer: it keeps the engine unless someone takes it."""
        with self._turn:
            if self._holder is owner:
                self._idle_since = time.monotonic()

    def _resume(self, owner) -> bool:
        """owner's consumer asks for more: True when it still holds the engine (its KV cache
        intact), False when it was preempted and now holds the engine again."""
        with self._turn:
            if self._holder is owner and id(owner) not in self._preempted:
                self._idle_since, self._holder_thread = None, threading.get_ident()
                return True
        self._acquire(owner)
        return False

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
        call = _Call()
        self._acquire(call)
        try:
            self._cached = []
            out = self.engine.forward(arr, 0, True)
            self._cached = [int(i) for i in arr]
            return out
        finally:
            self._release(call)

    # -- generation ----------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                 stop_token_ids: list[int] | None = None, stream: bool = False):
        """Continues prompt (text, or token ids) and returns the new text, or a TextStream of pieces.

        Unset options come from the model's generation config (transformers' defaults for a model
        that samples), else greedy and 256 new tokens. Generation ends at an end-of-sequence token of
        the model, a token in stop_token_ids, a stop string (not included in the text),
        max_new_tokens, the end of the context, or cancel()."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        if max_new_tokens is None:
            max_new_tokens = int(self.model.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if isinstance(stop, str):
            stop = [stop]
        pieces = self._stream(ids, max_new_tokens, params, list(stop or []), set(stop_token_ids or []))
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], stream: bool = False, tools: list[dict] | None = None,
             parse_special_in_content: bool = False, render_limits: RenderLimits | None = None, **kwargs):
        """Replies to OpenAI-style messages using the chat template (generate's options apply).
        parse_special_in_content and render_limits: as chat_prompt_ids."""
        ids = self.chat_prompt_ids(messages, tools=tools, parse_special_in_content=parse_special_in_content,
                                   render_limits=render_limits)
        return self.generate(ids, stream=stream, **kwargs)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None,
                        parse_special_in_content: bool = False, render_limits: RenderLimits | None = None) -> list[int]:
        """Token ids of the rendered chat prompt (with the generation prompt), BOS added as the tokenizer does.

        Message content is text: a special token's string written in it (say "<|im_end|>") becomes
        ordinary tokens, so a user cannot forge the template's markers; the template's own markers
        stay special. parse_special_in_content=True tokenizes the rendered prompt as one text, with
        special-token strings in content parsed as the tokens themselves. Without such strings in
        the content both give the tokens transformers' apply_chat_template gives. render_limits
        bounds the template's time and output (TemplateError past them)."""
        extra = {"tools": tools} if tools is not None else {}
        if parse_special_in_content:
            protected = {}
        else:
            protected = self.tokenizer.special_tokens_in(_contents(messages))
        if not protected:
            text = self.apply_chat_template(messages, limits=render_limits, **extra)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            # each special-token string in content becomes a placeholder character while the template renders
            used = set("".join(_contents(messages))) | set(self.chat_template or "")
            free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
            placeholders = {token: next(free) for token in protected}
            hidden = [_replace_content(m, placeholders) for m in messages]
            text = self.apply_chat_template(hidden, limits=render_limits, **extra)
            ids = self.tokenizer.encode_with_literal(text, {c: t for t, c in placeholders.items()})
        bos = self.tokenizer.bos_id
        if self.tokenizer.spec.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            limits: RenderLimits | None = None, **extra) -> str:
        spec = self.tokenizer.spec
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=spec.bos_token or "", eos_token=spec.eos_token or "",
                           unk_token=spec.unk_token or "", pad_token=spec.pad_token or "", limits=limits, **extra)

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
        running = self._holder
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
        stream = TextStream(GenerationStats(prompt_tokens=len(prompt)))
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

    def _reuse(self, ids: list[int]) -> int:
        """How many leading tokens of ids the KV cache holds already (at most len(ids) - 1)."""
        common = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            common += 1
        return min(common, len(ids) - 1)

    def _run(self, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler, stop: list[str], stop_ids: set[int],
             stream: TextStream) -> Iterator[str]:
        self._acquire(stream)
        stats, cancel = stream.stats, stream.cancelled
        try:
            self.last_stats = stats
            if max_new_tokens == 0:
                stats.finish_reason = "length"
                return
            # reuse the cached prefix; at least one prompt token must run to give logits
            ids = [int(i) for i in prompt]  # the tokens whose keys/values this call has computed
            common = self._reuse(ids)
            stats.cached_tokens = common
            start = time.perf_counter()
            logits = self._prefill(ids, common, cancel)
            stats.prefill_seconds = time.perf_counter() - start
            if logits is None:
                stats.finish_reason = "cancelled"
                return
            self._cached = ids  # one list from here on: each new token is appended to both
            decoder = StreamDecoder(self.tokenizer, ids)
            limit = min(max_new_tokens, self.context_length - len(ids))
            held = ""  # text withheld because it may be the start of a stop string
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
                held += decoder.push(token)
                cut = _find_stop(held, stop)
                if cut is not None:
                    held = held[:cut]
                    stats.finish_reason = "stop"
                    break
                safe = len(held) - _partial_stop_len(held, stop)
                if safe > 0:
                    self._pause(stream)
                    yield held[:safe]
                    held = held[safe:]
                    if not self._resume(stream):  # preempted while its consumer was away: re-read the context
                        if self._prefill(ids, self._reuse(ids), cancel) is None:
                            stats.finish_reason = "cancelled"
                            break
                        self._cached = ids
                if step + 1 < limit:
                    logits = self.engine.forward(np.array([token], dtype=np.int32), len(ids), False)
                    ids.append(token)  # self._cached is ids: the cache holds them all
            else:
                held += decoder.flush()
            stats.decode_seconds = time.perf_counter() - decode_start
            if held:
                yield held
        finally:
            self._release(stream)

    def close(self) -> None:
        """Releases the engine and unmaps the file. A running call is cancelled (it ends within one
        token or prefill chunk) and waited for; a stream left unread loses the engine at once (read
        again, it raises RuntimeError). Always returns; closing twice is a no-op."""
        with self._turn:
            if self.engine is None:
                return
            if self._holder is not None:
                self._holder.cancel()
            while self._holder is not None and self._idle_since is None and \
                    self._holder_thread != threading.get_ident():
                self._turn.wait(0.05)  # the holder ends its step, then releases or waits for its consumer
            if self._holder is not None:
                self._preempted.add(id(self._holder))
            self._holder = self._holder_thread = self._idle_since = None
            self.engine = None
            self.model.close()
            self._turn.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _contents(messages) -> list[str]:
    """The text content of OpenAI-style messages (strings, and the text of content parts)."""
    out = []
    for m in messages if isinstance(messages, (list, tuple)) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def _replace_content(message, placeholders: dict[str, str]):
    """message with each key of placeholders in its text content replaced by its value."""
    if not isinstance(message, dict):
        return message

    def hide(text: str) -> str:
        for token in sorted(placeholders, key=len, reverse=True):
            text = text.replace(token, placeholders[token])
        return text

    content = message.get("content")
    if isinstance(content, str):
        return dict(message, content=hide(content))
    if isinstance(content, list):
        parts = [dict(p, text=hide(p["text"])) if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                 for p in content]
        return dict(message, content=parts)
    return message


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
