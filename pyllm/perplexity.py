"""Perplexity in the manner of llama.cpp's perplexity tool.

The text is tokenized once, as data (special-token strings written in it are plain text, as
llama.cpp's parse_special=false); non-overlapping windows of `ctx` tokens are evaluated in a fresh
context each, and only the second half of each window is scored (every scored token sees at least
ctx/2 tokens of context). When the model adds a BOS token, each window starts with it, as
llama.cpp does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


def default_text() -> str:
    """The text of Python's documentation topics, which every CPython ships (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def leading_tokens(tokenize, text: str, count: int, margin: int = 256) -> list[int]:
    """Ids whose first `count` are tokenize(text)'s: those count alone, from a prefix of text, when a
    prefix holding count + margin tokens is shorter than the text; else all of tokenize(text).

    tokenize: str -> list of ids. Tokens are found from the start of the text, and where a prefix
    ends changes only the last few (the last word's pieces): the `margin` tokens before the cut are
    dropped with it. The prefix is cut at a line end where one is near; it doubles until it holds
    enough. (`pyllm perplexity --text FILE --windows 4` tokenized the whole file first: a 22 MB text
    took 33 s and 4 GB of memory, and Ctrl-C waited for it.)"""
    size = 4 * (count + margin) + 4096  # characters: about a token each 4, for English text
    while size < len(text):
        cut = text.find("\n", size, 2 * size)
        ids = tokenize(text[:cut + 1 if cut >= 0 else size])
        if len(ids) >= count + margin:
            return ids[:count]
        size *= 2
    return tokenize(text)


@dataclass
class PerplexityResult:
    perplexity: float
    windows: int
    ctx: int
    scored_tokens: int
    window_nll: list[float]  # mean negative log-likelihood of each window
    uncertainty: float = 0.0  # standard error of the perplexity (llama.cpp's +/-)
    tokens_per_second: float = 0.0  # tokens evaluated (all of each window) per second of logits_fn

    def line(self) -> str:
        return (f"perplexity {self.perplexity:.4f} ± {self.uncertainty:.4f} over {self.windows} windows of {self.ctx} "
                f"tokens ({self.scored_tokens} scored), {self.tokens_per_second:.1f} tokens/s")


def _exp(x: float) -> float:
    """math.exp, inf past a float's range (a model sure of wrong tokens: mean NLL above ~709.8)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row.   logits: f32 [n, vocab]   targets: int [n]"""
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))
    return log_z - x[np.arange(len(targets)), targets]


def perplexity(logits_fn, tokens: list[int], ctx: int = 512, windows: int | None = None,
               bos_id: int | None = None, progress=None, logits_many=None, batch: int = 1) -> PerplexityResult:
    """logits_fn(ids) -> f32 [len(ids), vocab] in a fresh context (e.g. LLM.logits); or, given
    logits_many(list of windows' ids) -> their logits, `batch` windows at a time (LLM.logits_many: the
    windows of a batch share each engine step).

    The uncertainty is llama.cpp's: the standard error of the mean token negative log-likelihood,
    times the perplexity (exp's first-order propagation)."""
    if ctx < 4:
        raise ValueError("ctx must be at least 4")
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
        raise ValueError(f"windows must be a positive integer (or None for all the text holds), got {windows!r}")
    # (checked with windows, before any work: 2.5 was range()'s "'float' object cannot be interpreted as an
    # integer", "2" a comparison's TypeError)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer (windows evaluated together), got {batch!r}")
    available = len(tokens) // ctx
    if available == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    n = available if windows is None else min(windows, available)
    first = ctx // 2
    window_nll, total, total_sq, count, seconds = [], 0.0, 0.0, 0, 0.0
    for group in range(0, n, batch):
        group_ids = []
        for w in range(group, min(n, group + batch)):
            ids = list(tokens[w * ctx:(w + 1) * ctx])
            if bos_id is not None:
                ids[0] = bos_id
            group_ids.append(ids)
        start = time.perf_counter()
        results = logits_many(group_ids) if logits_many is not None else [logits_fn(ids) for ids in group_ids]
        seconds += time.perf_counter() - start
        for ids, logits in zip(group_ids, results):
            nll = log_softmax_nll(logits[first:ctx - 1], np.asarray(ids[first + 1:ctx]))
            window_nll.append(float(nll.mean()))
            total += float(nll.sum())
            total_sq += float(np.sum(nll * nll))
            count += len(nll)
            if progress is not None:
                progress(len(window_nll), n, _exp(total / count))
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    ppl = _exp(mean)
    uncertainty = ppl * math.sqrt(variance / (count - 1)) if count > 1 else float("nan")
    if ppl == math.inf:
        uncertainty = math.inf  # (not inf * 0)
    return PerplexityResult(ppl, n, ctx, count, window_nll, uncertainty, n * ctx / seconds if seconds > 0 else 0.0)
