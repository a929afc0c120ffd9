"""Several prompts generated together: one engine step serves every active sequence.

On a CPU, decoding is bound by reading the weights, so a step over 8 sequences' rows costs little
more than a step over one (Engine.forward_rows multiplies all rows by each matrix in one pass). The
engine's KV cache holds `n_parallel` sequences (slots, each with the full context: see
docs/ARCHITECTURE.md); a prompt beyond that starts in the first slot that frees, beside the others
still generating.

Each prompt is generated exactly as it would be alone: its own sampler (seeded with the same seed),
stop strings, end-of-sequence ids and limits. A prefix shared by every prompt of the first n_parallel
(a system prompt) is computed once in slot 0 and copied to the others; a later prompt reuses what its
slot holds of its tokens (the one before it there: that system prompt). Reused tokens count as
cached_tokens. Slot 0 is also the single-prompt calls' cache: what it holds of the first prompt (an
earlier call's tokens) is reused, as a single call reuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .llm import StopText
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder

PREFILL_ROWS = 256  # prompt rows per engine step (cancel() is honoured between steps)


@dataclass
class _Sequence:
    """One prompt's state while it runs."""

    index: int  # position in the caller's list
    slot: int  # KV-cache sequence
    ids: list[int]  # prompt, then the generated tokens that were fed back
    sampler: Sampler
    text: StopText  # what it emits
    limit: int  # tokens it may still generate
    stats: object
    done: bool = False
    generated: int = 0
    last_token: int | None = None  # sampled, not yet run through the engine
    lost: bool = False  # its slot was rewritten by another call's turn and read again
    held: bool = True  # its slot holds its ids' keys/values (not once another call's turn rewrote it after it ended)
    decode_start: float = 0.0


def _common(held: list[int], ids: list[int]) -> int:
    """How many leading tokens of ids a cache holding `held` has (at most len(ids) - 1: one must run)."""
    n = 0
    for a, b in zip(held, ids[:len(ids) - 1]):
        if a != b:
            break
        n += 1
    return n


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest prefix every prompt shares, leaving each at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(max(n, 0)):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return max(n, 0)


def run_batch(llm, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stop: list[str],
              stop_ids: set[int], stats_factory, cancelled, lost=lambda: False) -> Iterator[tuple[int, str]]:
    """Generates every prompt (token ids); yields (prompt index, text piece) as pieces become final.

    llm: a pyllm.LLM whose lock the caller holds. stats_factory(prompt_tokens) -> GenerationStats of
    one prompt (filled in as it runs). cancelled(): whether to stop (checked between steps). lost():
    whether another call had the engine while a piece was out (the caller's stream was preempted):
    the running sequences then re-read their tokens into their slots (their logits too: the same
    bits however rows are run) and go on with the same text, as a single stream does."""
    engine = llm.engine
    slots = engine.n_seq
    if llm._primed is not None:  # slot 0 opens with an adapter's virtual tokens: not a prefix of these prompts
        llm._cached, llm._primed = [], None
    seqs: list[_Sequence] = []
    try:
        yield from _run_all(llm, engine, slots, prompts, max_new_tokens, params, stop, stop_ids, stats_factory,
                          cancelled, lost, seqs, time.perf_counter())
    # closed by the consumer, or an error (close() while the consumer was away): the prompts still
    # running did not end by length
    except BaseException:
        for s in seqs:
            if not s.done:
                s.stats.finish_reason, s.done = "cancelled", True
        raise


def _run_all(llm, engine, slots, prompts, max_new_tokens, params, stop, stop_ids, stats_factory, cancelled, lost,
           seqs: list, called: float) -> Iterator[tuple[int, str]]:
    """run_batch: the first `slots` prompts together (their shared prefix computed once),
    then each later prompt in the first slot that frees (it waited for the whole wave before it:
    one long reply held n_parallel - 1 slots idle), reusing what that slot holds of its tokens (a
    system prompt). seqs[slot] is the sequence in each slot. Each prompt's time_to_first_token counts
    from `called`, its decode_seconds from the end of its prefill until it ends."""
    wave = prompts[:slots]

    def sequence(index: int, slot: int) -> _Sequence:
        p = prompts[index]
        stats = stats_factory(len(p))
        return _Sequence(index, slot, list(p), Sampler(params, prompt_length=len(p)),
                         StopText(StreamDecoder(llm.tokenizer, list(p)), stop, stats),
                         min(max_new_tokens, llm.context_length - len(p)), stats)

    seqs[:] = [sequence(i, i) for i in range(len(wave))]
    start = time.perf_counter()
    shared = common_prefix(wave) if len(wave) > 1 else 0
    # slot 0's cache may already hold a prefix of its prompt (an earlier call's): what matches is reused,
    # past the shared prefix too (only the shared prefix was: a list run one prompt at a time,
    # n_parallel=1, computed its system prompt again for each, where single calls reuse it)
    reuse = llm._reuse(wave[0])
    llm._cached = []  # slot 0 is rewritten from here: it holds what is set below once that has run
    _prefill(engine, [(0, wave[0][:shared], min(reuse, shared))], cancelled)
    if cancelled():  # the prefix may not have run (nor another user's turn left slot 0 alone): nothing kept
        for s in seqs:
            s.stats.finish_reason = "cancelled"
        return
    for s in seqs[1:]:
        engine.copy_sequence(0, s.slot, shared)
    for s in seqs:
        s.stats.cached_tokens = shared if s.slot > 0 else reuse
    llm._cached = list(wave[0][:max(shared, reuse)])
    logits = _prefill(engine, [(s.slot, s.ids, max(shared, reuse) if s.slot == 0 else shared) for s in seqs],
                      cancelled)
    if logits is None:
        for s in seqs:
            s.stats.finish_reason = "cancelled"
        return
    prefill_seconds = time.perf_counter() - start
    rows = {s.slot: logits[i] for i, s in enumerate(seqs)}
    for s in seqs:
        s.stats.prefill_seconds = prefill_seconds
        s.stats.finish_reason = "length"
        s.decode_start = time.perf_counter()
        if s.limit <= 0:
            s.done = True
    following = len(wave)  # the next prompt to start
    while True:
        now = time.perf_counter()
        for s in seqs:  # (those cut short by cancel() keep their time so far)
            if not s.done:
                s.stats.decode_seconds = now - s.decode_start
        if cancelled():
            for s in seqs:
                if not s.done:
                    s.stats.finish_reason, s.done = "cancelled", True
            break
        for slot, before in enumerate(seqs):  # a free slot takes the next prompt
            while seqs[slot].done and following < len(prompts):
                s = seqs[slot] = sequence(following, slot)
                following += 1
                s.stats.finish_reason, s.decode_start = "length", time.perf_counter()
                if s.limit <= 0:  # (as a single call, it computes nothing: the slot holds `before`'s tokens)
                    s.done, s.held = True, False
                    continue
                # what the slot holds of its tokens (the sequence before it: a system prompt they share)
                s.stats.cached_tokens = _common(before.ids if before.held else [], s.ids)
                if slot == 0:  # the single-prompt calls' cache: it is rewritten past what they share (a Ctrl-C
                    # in its prefill left the earlier claim, and the next call reused keys that were not there)
                    llm._cached = [] if before.lost else s.ids[:s.stats.cached_tokens]
                before = s
                begin = time.perf_counter()
                out = _prefill(engine, [(slot, s.ids, s.stats.cached_tokens)], cancelled)
                if out is None:  # cancelled: it and the prompts after it say so (LLM._batch)
                    s.stats.finish_reason, s.done = "cancelled", True
                    break
                rows[slot] = out[0]
                s.stats.prefill_seconds = time.perf_counter() - begin
                s.decode_start = time.perf_counter()
        active = [s for s in seqs if not s.done]
        if not active:
            break
        for s in active:
            token = s.sampler(rows[s.slot], s.ids)
            s.generated += 1
            s.stats.generated_tokens += 1
            if s.generated == 1:
                s.stats.time_to_first_token = time.perf_counter() - called
            if token in stop_ids:
                s.stats.finish_reason, s.done = "stop", True
                continue
            piece = s.text.push(token)
            if s.text.stopped:
                s.stats.finish_reason, s.done = "stop", True
                continue
            if piece:
                yield s.index, piece
                if lost() and not _reread(llm, seqs, rows, cancelled):
                    return
            if s.generated >= s.limit:
                s.done = True
            else:
                s.last_token = token
        running = [s for s in active if not s.done]
        for s in active:
            if s.done:
                s.stats.decode_seconds = time.perf_counter() - s.decode_start
                rest = s.text.finish(flush=s.stats.finish_reason != "cancelled")
                if s.text.stopped:
                    s.stats.finish_reason = "stop"
                if rest:
                    yield s.index, rest
                    if lost() and not _reread(llm, seqs, rows, cancelled):
                        return
        if running:
            out = engine.forward_rows(np.array([s.last_token for s in running], dtype=np.int32),
                                      np.array([s.slot for s in running], dtype=np.int32),
                                      np.array([len(s.ids) for s in running], dtype=np.int32),
                                      np.arange(len(running)))
            for i, s in enumerate(running):
                s.ids.append(s.last_token)
                rows[s.slot] = out[i]
    # slot 0 is the single-sequence path's cache; cancelled, it may have been preempted (LLM._batch):
    # another call's tokens are there then
    llm._cached = [] if cancelled() or seqs[0].lost or not seqs[0].held else seqs[0].ids


def _reread(llm, seqs: list[_Sequence], rows: dict, cancelled) -> bool:
    """After another call's turn: the tokens of the running sequences (the prompt and those
    fed back) run again in their slots, and their logits replace rows (the engine's output buffer
    they were read from is overwritten too). False when cancelled meanwhile (each then says so)."""
    llm._cached, llm._primed = [], None  # slot 0 is rewritten (an adapter's virtual tokens may be there)
    for s in seqs:
        s.lost = True  # the end of the list must not record slot 0 as holding its tokens
        s.held = s.held and not s.done  # (an ended one's slot is not read again: a later prompt must not reuse it)
    running = [s for s in seqs if not s.done]
    logits = _prefill(llm.engine, [(s.slot, s.ids, 0) for s in running], cancelled) if running else None
    if running and logits is None:
        for s in running:
            s.stats.finish_reason, s.done = "cancelled", True
        return False
    for i, s in enumerate(running):
        rows[s.slot] = logits[i]
    return True


def _prefill(engine, parts: list[tuple[int, list[int], int]], cancelled) -> np.ndarray | None:
    """Runs ids[start:] of each (slot, ids, start) in steps of PREFILL_ROWS rows; the logits f32
    [len(parts), vocab] of each part's last row (None if cancelled, or if no part has rows)."""
    tokens, seq_ids, positions, last_rows = [], [], [], []
    for slot, ids, begin in parts:
        tokens += ids[begin:]
        seq_ids += [slot] * (len(ids) - begin)
        positions += list(range(begin, len(ids)))
        last_rows.append(len(tokens) - 1)
    if not tokens:
        return None
    logits = []
    for step in range(0, len(tokens), PREFILL_ROWS):
        if cancelled():
            return None
        end = min(len(tokens), step + PREFILL_ROWS)
        wanted = [r for r in last_rows if step <= r < end]
        out = engine.forward_rows(np.array(tokens[step:end], dtype=np.int32), np.array(seq_ids[step:end], dtype=np.int32),
                                  np.array(positions[step:end], dtype=np.int32), np.array(wanted, dtype=np.int64) - step)
        logits.extend(out)
    return np.array(logits) if len(logits) == len(parts) else None
