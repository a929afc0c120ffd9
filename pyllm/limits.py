"""Every explicit limit on the work one input may cause, in one place (docs/SECURITY.md lists them
with the way to raise each).

- the context length and thread count an LLM accepts (MAX_CONTEXT_LENGTH, MAX_THREADS); the
  C++ engine checks its own sizes again with overflow-checked arithmetic (csrc/core/checked.h);
- a chat template's output size and render time (RenderLimits: chat_template.render_chat);
- what one HTTP request may ask of `pyllm serve` (ServerLimits: body size, prompt length, time to
  send the body, time a client may leave its reply unread).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from .errors import LimitError

MAX_CONTEXT_LENGTH = 1 << 24  # tokens; far past any model's positions (the KV cache would need TBs)
MAX_THREADS = 1024
MAX_PARALLEL = 256  # sequences one LLM's KV cache may hold
# bytes of a prompt piped to `pyllm run` (`yes | pyllm run` read until memory ran out): 4 bytes for each
# position of a 16M-token context, far past what a model's context holds
MAX_STDIN_BYTES = 64 * 2**20
# bytes of a chat template (a checkpoint's chat_template.jinja or tokenizer_config.json entry, a GGUF
# file's, --chat-template FILE): released templates take 1-20 KB, and jinja2 compiles one at ~10 s and
# 700 MB per MiB (a 1 MiB bound let a model file cost that at every load)
MAX_CHAT_TEMPLATE_BYTES = 256 * 2**10
# lists, tuples, dicts and namespaces a chat template builds inside one another: Python's own recursion limit
# (repr, ==, tojson refuse deeper values), and far below the ~150,000 at which hash() of a nested tuple,
# which recurses in C unchecked, overflows a thread's 8 MiB stack (a crash, not an error)
MAX_TEMPLATE_NESTING = 1000
# characters (and list, tuple and dict elements) a chat template rendering may build in all, as a multiple of its
# output limit (RenderLimits.max_output_chars): each value is bounded by that limit, but values kept under many
# names, in the frames of a recursive macro or in a list a filter builds from a map (range(100000)|map('center',
# 8000000)|list) were each within it and 5 GB together. A value that replaces a namespace attribute no longer
# held elsewhere gives its predecessor's size back (an accumulating `ns.text = ns.text ~ part` costs its length,
# not the sum of its lengths); released templates build 3-6 times their output (trim, +, split of each message)
MAX_TEMPLATE_WORK = 8
# characters sliced while finding the BPE merges a SentencePiece vocabulary implies (every split of a piece into two
# pieces: convert.checkpoint.every_two_token_splits): about the sum of its pieces' squared lengths, some 2 * 10**7 for
# 256,000 pieces of ~7 characters (Gemma's); the pieces "a" * k for every k to 3,000, a 4.5 MB vocabulary, had 9 GB
MAX_MERGE_SPLIT_CHARS = 2**28
# how many times longer a tokenizer.json normalizer or decoder may make a text (tokenizer.check_growth): Unicode's
# NFKC makes one character 18 at most, a sentencepiece normalization map about as many; a Replace of "a" by 10,000
# characters made a 20,000-character prompt 3 GB inside the tokenizers library, which aborts when an allocation fails
MAX_TOKENIZER_GROWTH = 64
# seconds a LoRA adapter's rank_pattern / alpha_pattern (regular expressions from adapter_config.json, matched
# against its module names as PEFT matches them) may take: one key such as "(.|.)*x" backtracks for hours on a
# 31-character module name, and Python's re cannot be interrupted from another thread, so keys other than
# plain names are matched in a child process stopped past this (convert.lora.match_patterns)
MAX_ADAPTER_PATTERN_SECONDS = 10.0
# pyllm serve --parallel: requests generated together (each a KV-cache slot of the whole context), and
# rows per engine step (decode rows, then prompt chunks: pyllm/scheduler.py)
DEFAULT_PARALLEL = 4
# bytes of logits one call returns (LLM.logits, LLM.logits_many: rows x vocab x 4): 8192 rows of SmolLM2's 49,152
# entries take 1.5 GiB, 4096 of Qwen2's 151,936 2.3 GiB; perplexity asks for the rows it scores, one step at a time
MAX_LOGITS_BYTES = 4 * 2**30
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256


def _positive_int(name: str, value, most: int | None = None) -> int:
    """value as a Python int: any integer type (numpy's too), not bool, positive, at most `most`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise LimitError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:
        raise LimitError(f"{name} {value} exceeds the limit of {most}")
    return int(value)


def _positive_seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise LimitError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_context_length(value) -> int:
    """value as a context length in tokens: a positive int up to MAX_CONTEXT_LENGTH (LimitError otherwise)."""
    return _positive_int("context_length", value, MAX_CONTEXT_LENGTH)


def memory_limit() -> int | None:
    """Bytes of memory this process may use: the machine's, or its memory cgroup's limit where that is
    less (a container's: its /proc/meminfo shows the host's; csrc/core/container_limits.h reads the
    cgroup); None on systems that report neither."""
    from . import _core

    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = None
    cgroup_limit, _ = _core.cgroup_memory()
    known = [v for v in (physical, cgroup_limit) if v is not None]
    return min(known) if known else None


def check_kv_cache_bytes(nbytes: int, what: str) -> int:
    """A KV cache of nbytes must fit in the memory this process may use (memory_limit: LimitError naming
    both sizes otherwise); where no limit is reported, nothing is checked here (the allocation fails)."""
    limit = memory_limit()
    if limit is None:
        return nbytes
    if nbytes > limit:
        raise LimitError(f"{what} needs a KV cache of {nbytes / 2**30:.1f} GiB; this process may use "
                         f"{limit / 2**30:.1f} GiB of memory (the machine's, or its container's limit): "
                         "lower context_length or n_parallel")
    return nbytes


def check_logits_bytes(rows: int, vocab: int, what: str) -> int:
    """Bytes of rows x vocab f32 logits, at most MAX_LOGITS_BYTES (LimitError naming both sizes otherwise)."""
    nbytes = rows * vocab * 4
    if nbytes > MAX_LOGITS_BYTES:
        raise LimitError(f"{what}: {rows} rows of {vocab} logits take {nbytes:,} bytes, past the limit of "
                         f"{MAX_LOGITS_BYTES:,} (pyllm.limits.MAX_LOGITS_BYTES): ask for fewer rows (logits_to_keep), "
                         "or give fewer or shorter sequences")
    return nbytes


def check_parallel(value) -> int:
    """value as n_parallel (sequences in the KV cache): a positive int up to MAX_PARALLEL (LimitError otherwise)."""
    return _positive_int("n_parallel", value, MAX_PARALLEL)


def check_threads(value) -> int:
    """value as a thread count: a positive int up to MAX_THREADS (LimitError otherwise)."""
    return _positive_int("n_threads", value, MAX_THREADS)


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one chat template rendering (TemplateError past them).

    max_output_chars: characters of rendered text (and of any string or list the template builds
        with * or +); seconds: wall time of the rendering."""

    max_output_chars: int = 8 * 2**20
    seconds: float = 10.0

    def __post_init__(self):
        _positive_int("max_output_chars", self.max_output_chars)
        _positive_seconds("seconds", self.seconds)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request to `pyllm serve` (its flags of the same names).

    max_body_bytes: request body size (413 past it; Content-Length is checked before reading).
    max_prompt_chars: characters of prompt text: a completion's prompt, or all chat message
        contents together with the messages' other fields and the tools (400 past it); tokens are
        bounded by the context length too.
    body_timeout: seconds to receive the whole body (408 past it), and for a connection to send
        its next request's headers (from its start or its previous response; closed past it).
    send_timeout: seconds a client may leave a response unread (its socket buffers full) before
        the server drops the connection, cancels the generation and frees its queue place.
    template_timeout: seconds the chat template may take to render one request's messages (400 past it).
    timeout_graceful_shutdown: seconds the requests in progress may take to finish once the server is
        asked to stop (SIGTERM, Ctrl-C; uvicorn's option of this name); those still running are then
        ended (a stream stops without its [DONE]). Without a bound a stream of thousands of tokens
        held the process for minutes, past a process manager's patience (docker stop: 10 s, then SIGKILL).
    """

    max_body_bytes: int = 8 * 2**20
    max_prompt_chars: int = 2**20
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    template_timeout: float = RenderLimits.seconds
    timeout_graceful_shutdown: float = 5.0

    def __post_init__(self):
        _positive_int("max_body_bytes", self.max_body_bytes)
        _positive_int("max_prompt_chars", self.max_prompt_chars)
        _positive_seconds("body_timeout", self.body_timeout)
        _positive_seconds("send_timeout", self.send_timeout)
        _positive_seconds("template_timeout", self.template_timeout)
        _positive_seconds("timeout_graceful_shutdown", self.timeout_graceful_shutdown)

    def render_limits(self) -> RenderLimits:
        """Template limits that let every prompt this server accepts render (with room for the template's text)."""
        chars = max(RenderLimits.max_output_chars, 2 * self.max_prompt_chars + 65536)
        return RenderLimits(chars, self.template_timeout)
