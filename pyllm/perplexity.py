"""Perplexity in the manner of llama.cpp's perplexity tool.

The text is tokenized once, as data (special-token strings written in it are plain text, as
llama.cpp's parse_special=false); non-overlapping windows of `ctx` tokens are evaluated in a fresh
context each, and only the second half of each window is scored (every scored token sees at least
ctx/2 tokens of context). When the model adds a BOS token, each window starts with it, as
llama.cpp does.
"""

from __future__ import annotations

import math
import re
import time
from array import array
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


PIECE_CHARS = 2**20  # characters text_tokens hands the tokenizer at a time
_CUT_CONTEXT = 512  # characters either side of a cut that text_tokens checks


def text_tokens(tokenize, text: str, piece_chars: int | None = None, progress=None) -> array:
    """tokenize(text)'s ids (int32 array), the text handed to tokenize a piece of about piece_chars
    (default PIECE_CHARS) characters at a time: the tokenizers library took ~180 bytes per character of
    a text given whole (a 22 MB file: 4 GB; the 1 GiB a --text file may hold: ~190 GB), and a list of
    Python ints 36 bytes a token. progress(characters done) is called after each piece.

    A piece ends where tokenization is seen to split alike (_CUT_CANDIDATE): the tokens of the
    _CUT_CONTEXT characters either side of the cut, tokenized together, are those of each side
    tokenized alone (byte-level BPE splits there; a tokenizer that marks a text's start, as
    SentencePiece's dummy prefix does, never does, and gets the rest of the text whole)."""
    piece_chars = PIECE_CHARS if piece_chars is None else piece_chars
    ids, pos = array("i"), 0
    while len(text) - pos > 2 * piece_chars:
        cut = _clean_cut(tokenize, text, pos + piece_chars, piece_chars)
        if cut is None:
            break
        ids.extend(tokenize(text[pos:cut]))
        pos = cut
        if progress is not None:
            progress(pos)
    ids.extend(tokenize(text[pos:] if pos else text))
    if progress is not None:
        progress(len(text))
    return ids


# where a piece of text may end (_clean_cut): a line start between two non-blank characters, or a space
# before a non-blank one (GPT-2's split pattern starts a piece at " word", takes a run of line ends at a
# text's end whole, and the last but one alone elsewhere)
_CUT_CANDIDATE = re.compile(r"(?<=\S\n)(?=\S)| (?=\S)")


def _clean_cut(tokenize, text: str, near: int, span: int, tries: int = 64) -> int | None:
    """A position from `near` (within span characters) where tokenize splits text alike (text_tokens),
    or None when the first `tries` candidates (_CUT_CANDIDATE) are not."""
    for _, found in zip(range(tries), _CUT_CANDIDATE.finditer(text, near, near + span)):
        cut = found.start()
        start, end = max(cut - _CUT_CONTEXT, 0), cut + _CUT_CONTEXT  # (both sides' ends are shared)
        if list(tokenize(text[start:end])) == list(tokenize(text[start:cut])) + list(tokenize(text[cut:end])):
            return cut
    return None


@dataclass
class PerplexityResult:
    perplexity: float
    windows: int  # windows scored
    ctx: int
    scored_tokens: int
    window_nll: list[float]  # mean negative log-likelihood of each window
    uncertainty: float = 0.0  # standard error of the perplexity (llama.cpp's +/-)
    tokens_per_second: float = 0.0  # tokens evaluated (all of each window) per second of logits_fn
    interrupted: bool = False  # Ctrl-C stopped it: the windows scored before it (PerplexityInterrupted)

    def line(self) -> str:
        return (f"perplexity {self.perplexity:.4f} ± {self.uncertainty:.4f} over {self.windows} windows of {self.ctx} "
                f"tokens ({self.scored_tokens} scored), {self.tokens_per_second:.1f} tokens/s"
                + (" (interrupted)" if self.interrupted else ""))


class PerplexityInterrupted(KeyboardInterrupt):
    """Ctrl-C during perplexity(): result is that of the windows scored before it (interrupted=True), or
    None when none was. A KeyboardInterrupt, so code that stops on Ctrl-C still does."""

    def __init__(self, result: PerplexityResult | None):
        super().__init__()
        self.result = result


def _exp(x: float) -> float:
    """math.exp, inf past a float's range (a model sure of wrong tokens: mean NLL above ~709.8)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


NLL_BLOCK_ROWS = 64  # rows log_softmax_nll widens to float64 at a time


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row, in float64.   logits: f32 [n, vocab]   targets: int [n]   -> f64 [n]

    Rows are taken NLL_BLOCK_ROWS at a time (each row's value is the same as the whole array's at once):
    the float64 temporaries are a block's (the whole array's took 4 times the f32 logits' memory)."""
    out = np.empty(len(targets), dtype=np.float64)
    for b in range(0, len(targets), NLL_BLOCK_ROWS):
        x = logits[b:b + NLL_BLOCK_ROWS].astype(np.float64)
        peak = x.max(axis=1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))
        out[b:b + len(x)] = log_z - x[np.arange(len(x)), targets[b:b + NLL_BLOCK_ROWS]]
    return out


def scored_rows(ctx: int) -> int:
    """Logit rows a window of ctx tokens needs: its last ctx - ctx // 2 positions' (the last one's is not
    used: no token follows it)."""
    return ctx - ctx // 2


# fewest rows whose logits the engine computes as it does a whole window's: below a few dozen rows its
# matmuls take other paths (csrc/kernels/cpu: float weights under 12-24 rows), whose sums differ in the
# last bits, so a small window asked for its scored rows alone scored differently alone than with others
MIN_KEPT_ROWS = 64


def logits_to_keep(ctx: int) -> int:
    """LLM.logits / LLM.logits_many's logits_to_keep for a window of ctx tokens: its scored rows
    (scored_rows), or 0 (every row, as a whole window's) when they are fewer than MIN_KEPT_ROWS: the
    same bits either way, one window per call or many."""
    return scored_rows(ctx) if scored_rows(ctx) >= MIN_KEPT_ROWS else 0


def perplexity(logits_fn, tokens: list[int], ctx: int = 512, windows: int | None = None,
               bos_id: int | None = None, progress=None, logits_many=None, batch: int = 1) -> PerplexityResult:
    """Perplexity of tokens (ids) by llama.cpp's method, over `windows` windows of ctx tokens (None: all
    the text holds; fewer tokens than one window is a ValueError).

    logits_fn(ids) -> f32 [k, vocab]: the logits of the last k positions of ids, in a fresh context, with
    k >= scored_rows(ctx) (every position's, as LLM.logits gives; or only those scored, as
    functools.partial(LLM.logits, logits_to_keep=logits_to_keep(ctx)) gives, half the memory and output
    work). Or, given logits_many(list of windows' ids) -> their logits the same way, `batch` windows at a
    time (LLM.logits_many: the windows of a batch share each engine step). Each window's logits are
    scored as they arrive and dropped before the next call: memory holds one call's logits at most.

    progress(windows done, windows, perplexity so far) is called after each window. Ctrl-C raises
    PerplexityInterrupted carrying the result of the windows scored before it; a SystemExit (pyllm's
    commands raise one on SIGTERM) passes with that result as its perplexity_result.

    The uncertainty is llama.cpp's: the standard error of the mean token negative log-likelihood,
    times the perplexity (exp's first-order propagation)."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 4:  # (64.0 was range()'s TypeError)
        raise ValueError(f"ctx must be an integer of at least 4 (tokens per window), got {ctx!r}")
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
    keep = scored_rows(ctx)
    sums = _Sums(ctx)
    try:
        for group in range(0, n, batch):
            group_ids = []
            for w in range(group, min(n, group + batch)):
                ids = list(tokens[w * ctx:(w + 1) * ctx])
                if bos_id is not None:
                    ids[0] = bos_id
                group_ids.append(ids)
            start = time.perf_counter()
            results = logits_many(group_ids) if logits_many is not None else [logits_fn(ids) for ids in group_ids]
            sums.seconds += time.perf_counter() - start
            for i, ids in enumerate(group_ids):
                logits, results[i] = results[i], None  # (each window's logits go once scored)
                if len(logits) < keep:
                    raise ValueError(f"the logits of a window of {ctx} tokens have {len(logits)} rows; "
                                     f"scoring needs its last {keep} positions'")
                sums.add(log_softmax_nll(logits[len(logits) - keep:len(logits) - 1], np.asarray(ids[ctx - keep + 1:])))
                del logits
                if progress is not None:
                    progress(len(sums.window_nll), n, _exp(sums.total / sums.count))
            del results  # (held while the next call ran: two steps' logits at once)
    except KeyboardInterrupt:
        raise PerplexityInterrupted(sums.result(interrupted=True) if sums.count else None) from None
    except SystemExit as stop:  # SIGTERM in pyllm's commands (cli._exit_cleanly_on_sigterm): `timeout 1h pyllm ...`
        stop.perplexity_result = sums.result(interrupted=True) if sums.count else None
        raise
    return sums.result()


class _Sums:
    """Running sums of the scored tokens' negative log-likelihoods: what perplexity() keeps."""

    def __init__(self, ctx: int):
        self.ctx, self.window_nll, self.total, self.total_sq, self.count, self.seconds = ctx, [], 0.0, 0.0, 0, 0.0

    def add(self, nll: np.ndarray) -> None:
        self.window_nll.append(float(nll.mean()))
        self.total += float(nll.sum())
        self.total_sq += float(np.sum(nll * nll))
        self.count += len(nll)

    def result(self, interrupted: bool = False) -> PerplexityResult:
        count, n = self.count, len(self.window_nll)
        mean = self.total / count
        variance = max(self.total_sq / count - mean * mean, 0.0)
        ppl = _exp(mean)
        uncertainty = ppl * math.sqrt(variance / (count - 1)) if count > 1 else float("nan")
        if ppl == math.inf:
            uncertainty = math.inf  # (not inf * 0)
        return PerplexityResult(ppl, n, self.ctx, count, list(self.window_nll), uncertainty,
                                n * self.ctx / self.seconds if self.seconds > 0 else 0.0, interrupted)
