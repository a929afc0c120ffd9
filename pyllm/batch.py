"""Several prompts generated together: one engine step serves every active sequence.

On a CPU, decoding is bound by reading the weights, so a step over 8 sequences' rows costs little
more than a step over one (Engine.forward_rows multiplies all rows by each matrix in one pass). The
engine's KV cache holds `n_parallel` sequences (slots, each with the full context: see
docs/ARCHITECTURE.md); a prompt beyond that starts in the first slot that frees, beside the others
still generating.

Each prompt is generated exactly as it would be alone: its own sampler (seeded with the same seed),
stop strings, end-of-sequence ids and limits. Prefixes are computed once: each of the first n_parallel
prompts copies the longest prefix it shares with an earlier one of them (a system prompt, shared by all
or by some) from that one's slot once it is there (wave_sources); a later prompt copies the longest
prefix any slot holds of its tokens. Copied tokens count as cached_tokens. Slot 0 is also the
single-prompt calls' cache: what it holds of the first prompt (an earlier call's tokens) is reused, as a
single call reuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .llm import LIST_ITEM_ERRORS, StopText, _naming, _token_logprob, common_prefix_length
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
    tokens: list  # the records (llm.TokenLogprob) of the generated tokens whose text is out
    done: bool = False
    generated: int = 0
    last_token: int | None = None  # sampled, not yet run through the engine
    lost: bool = False  # its slot was rewritten by another call's turn and read again
    held: bool = True  # its slot holds its ids' keys/values (not once another call's turn rewrote it after it ended)
    decode_start: float = 0.0


def _common(held: list[int], ids: list[int]) -> int:
    """How many leading tokens of ids a cache holding `held` has (at most len(ids) - 1: one must run)."""
    return min(common_prefix_length(held, ids), len(ids) - 1)


def wave_sources(prompts: list[list[int]]) -> list[tuple[int | None, int]]:
    """For each prompt of a wave, (source, n): the earlier prompt it shares the longest prefix with
    (the first such) and the n tokens it copies from it, leaving it at least one token of its own;
    (None, 0) where it shares nothing with an earlier one. Sources come first, so every prompt's
    prefix is computed once, in the first prompt that has it."""
    sources: list[tuple[int | None, int]] = []
    for i, ids in enumerate(prompts):
        best: tuple[int | None, int] = (None, 0)
        for j in range(i):
            n = _common(prompts[j], ids)
            if n > best[1]:
                best = (j, n)
        sources.append(best)
    return sources


def run_batch(llm, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stop: list[str],
              stop_ids: set[int], stats_factory, cancelled, lost=lambda: False,
              processors_for=lambda index: [], adapter: str | None = None, logprobs: int | None = None,
              tokens_for=lambda index: [], failed: dict | None = None) -> Iterator[tuple[int, str]]:
    """Generates every prompt (token ids); yields (prompt index, text piece) as pieces become final.
    processors_for(prompt index) -> the logits processors of that prompt's Sampler (a grammar's state
    is its own: a fresh one each), called when the prompt starts. adapter: a prompt-learning adapter
    of llm's file for every prompt (None: the base model): each slot opens with its virtual positions
    (computed once, in slot 0, and copied), and the prompts' tokens follow them. tokens_for(prompt
    index) -> the list that receives the records of its generated tokens (llm.TokenLogprob, with
    log-probabilities and `logprobs` alternatives when logprobs is not None) as their text comes out.

    llm: a pyllm.LLM whose lock the caller holds. stats_factory(prompt_tokens) -> GenerationStats of
    one prompt (filled in as it runs). cancelled(): whether to stop (checked between steps). lost():
    whether another call had the engine while a piece was out (the caller's stream was preempted):
    the running sequences then re-read their tokens into their slots (their logits too: the same
    bits however rows are run) and go on with the same text, as a single stream does. max_new_tokens
    is at least 1 (LLM._batch answers 0 without a turn at the engine).

    A prompt that fails as it generates (LIST_ITEM_ERRORS: a grammar the model cannot follow) ends
    alone, its finish_reason "error", its error (naming it: "prompt 3 of the list: ...") put in
    failed[index]; the others run on (without `failed`, the error ends the list)."""
    engine = llm.engine
    slots = engine.n_seq
    if adapter is not None:
        offset = llm._prime(adapter)  # slot 0 (what it holds after them is kept when they are the same)
        _spread(llm, 0, range(1, min(slots, len(prompts))), adapter)
    else:
        offset = 0
        if llm._primed is not None:  # slot 0 opens with an adapter's virtual tokens: not a prefix of these prompts
            llm._cached, llm._primed = [], None
    seqs: list[_Sequence] = []
    try:
        yield from _run_all(llm, engine, slots, prompts, max_new_tokens, params, stop, stop_ids, stats_factory,
                            cancelled, lost, processors_for, adapter, offset, logprobs, tokens_for, seqs,
                            time.perf_counter(), failed)
    # closed by the consumer, or an error (close() while the consumer was away): the prompts still
    # running did not end by length
    except BaseException:
        for s in seqs:
            if not s.done:
                s.stats.finish_reason, s.done = "cancelled", True
        raise


def _run_all(llm, engine, slots, prompts, max_new_tokens, params, stop, stop_ids, stats_factory, cancelled, lost,
             processors_for, adapter, offset: int, logprobs, tokens_for, seqs: list,
             called: float, failed: dict | None) -> Iterator[tuple[int, str]]:
    """run_batch: the first `slots` prompts together (the prefixes they share computed once),
    then each later prompt in the first slot that frees (it waited for the whole wave before it:
    one long reply held n_parallel - 1 slots idle), reusing the longest prefix of its tokens that
    slot or another holds (a system prompt). seqs[slot] is the sequence in each slot. Each prompt's time_to_first_token counts
    from `called`, its decode_seconds from the end of its prefill until it ends. Every slot's tokens
    sit after `offset` virtual positions (the adapter's)."""
    wave = prompts[:slots]

    def sequence(index: int, slot: int) -> _Sequence:
        p = prompts[index]
        stats = stats_factory(len(p))
        return _Sequence(index, slot, list(p), Sampler(params, processors_for(index), prompt_length=len(p)),
                         StopText(StreamDecoder(llm.tokenizer, list(p)), stop, stats),
                         min(max_new_tokens, llm.context_length - offset - len(p)), stats, tokens_for(index))

    seqs[:] = [sequence(i, i) for i in range(len(wave))]
    start = time.perf_counter()
    rows = _prefill_wave(llm, engine, seqs, cancelled, offset)
    if rows is None:
        for s in seqs:
            s.stats.finish_reason = "cancelled"
        return
    prefill_seconds = time.perf_counter() - start
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
                # what the slot holds of its tokens (the sequence before it: a system prompt they share),
                # or a longer prefix another slot holds, copied
                own = _common(before.ids if before.held else [], s.ids)
                other = max((k for k in range(len(seqs)) if k != slot and seqs[k].held),
                            key=lambda k: _common(seqs[k].ids, s.ids), default=None)
                copied = _common(seqs[other].ids, s.ids) if other is not None else 0
                if slot == 0:  # the single-prompt calls' cache: it is rewritten past what they share, which it
                    # says first (a Ctrl-C in the copy or the prefill left the earlier claim, and the next call
                    # reused keys that were not there)
                    llm._cached = [] if before.lost else s.ids[:own]
                if copied > own:
                    engine.copy_sequence(other, slot, offset + copied)  # (the adapter's virtual positions with it)
                elif adapter is not None and not before.held:  # another call's turn rewrote the slot (_reread),
                    _open(llm, slot, adapter)  # the virtual positions too: the prompt followed the other's
                if slot == 0:
                    llm._primed = adapter  # (copied after a _reread, which forgot them, the positions are its)
                s.stats.cached_tokens = max(own, copied)
                before = s
                begin = time.perf_counter()
                out = _prefill(engine, [(slot, s.ids, s.stats.cached_tokens)], cancelled, offset)
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
            try:
                with _naming(f"prompt {s.index} of the list", LIST_ITEM_ERRORS):  # (a grammar it cannot follow)
                    token = s.sampler(rows[s.slot], s.ids)
            except LIST_ITEM_ERRORS as e:
                if failed is None:
                    raise
                failed[s.index] = e
                s.stats.finish_reason, s.done = "error", True
                continue
            s.generated += 1
            s.stats.generated_tokens += 1
            if s.generated == 1:
                s.stats.time_to_first_token = time.perf_counter() - called
            if token in stop_ids:
                s.stats.finish_reason, s.done = "stop", True
                continue
            s.sampler.accept(token)
            piece = s.text.push(token, _token_logprob(token, rows[s.slot], logprobs))
            s.tokens += s.text.take_tokens()  # those whose text is out (a stop string's never are)
            if s.text.stopped:
                s.stats.finish_reason, s.done = "stop", True
                continue
            if piece:
                yield s.index, piece
                if lost() and not _reread(llm, seqs, rows, cancelled, adapter, offset):
                    return
            if s.generated >= s.limit:
                s.done = True
            else:
                s.last_token = token
        running = [s for s in active if not s.done]
        for s in active:
            if s.done:
                s.stats.decode_seconds = time.perf_counter() - s.decode_start
                # (a failed one's held bytes are dropped, as a single prompt's when it raises)
                rest = s.text.finish(flush=s.stats.finish_reason not in ("cancelled", "error"))
                s.tokens += s.text.take_tokens()
                if s.text.stopped:  # (not a failed one's: finish without flush searches no stop string)
                    s.stats.finish_reason = "stop"
                if rest:
                    yield s.index, rest
                    if lost() and not _reread(llm, seqs, rows, cancelled, adapter, offset):
                        return
        if running:
            out = engine.forward_rows(np.array([s.last_token for s in running], dtype=np.int32),
                                      np.array([s.slot for s in running], dtype=np.int32),
                                      np.array([offset + len(s.ids) for s in running], dtype=np.int32),
                                      np.arange(len(running)))
            for i, s in enumerate(running):
                s.ids.append(s.last_token)
                rows[s.slot] = out[i]
    # slot 0 is the single-sequence path's cache; cancelled, it may have been preempted (LLM._batch):
    # another call's tokens are there then
    llm._cached = [] if cancelled() or seqs[0].lost or not seqs[0].held else seqs[0].ids


def _prefill_wave(llm, engine, seqs: list[_Sequence], cancelled, offset: int) -> dict | None:
    """Prefills the wave's prompts (seqs[i] in slot i) in rounds, each one _prefill call: a prompt
    whose source (wave_sources) holds the prefix it shares copies it (its cached_tokens) and is then
    ready; a ready prompt runs to the next point a waiting prompt copies from it, else to its end.
    Slot 0 starts from what it holds of its prompt (an earlier call's tokens). The logits f32
    [vocab] of each prompt's last row by slot, or None if cancelled (slot 0 then holds what
    llm._cached says)."""
    prompts = [s.ids for s in seqs]
    sources = wave_sources(prompts)
    reuse = llm._reuse(prompts[0])
    computed = [reuse] + [0] * (len(seqs) - 1)
    ready = [True] + [source is None for source, _ in sources[1:]]
    seqs[0].stats.cached_tokens = reuse
    llm._cached = list(prompts[0][:reuse])  # slot 0 is rewritten past these
    rows: dict = {}
    while True:
        for i, (source, n) in enumerate(sources):
            if not ready[i] and ready[source] and computed[source] >= n:
                engine.copy_sequence(source, i, offset + n)
                computed[i], ready[i] = n, True
                seqs[i].stats.cached_tokens = n
        ends = []
        for i in range(len(seqs)):
            if ready[i] and computed[i] < len(prompts[i]):
                waiting = [n for k, (source, n) in enumerate(sources) if source == i and not ready[k] and n > computed[i]]
                ends.append((i, min(waiting, default=len(prompts[i]))))
        if not ends:
            return rows
        logits = _prefill(engine, [(i, prompts[i][:end], computed[i]) for i, end in ends], cancelled, offset)
        if logits is None:
            return None
        for (i, end), row in zip(ends, logits):
            computed[i] = end
            if end == len(prompts[i]):
                rows[i] = row
        llm._cached = list(prompts[0][:computed[0]])


def _reread(llm, seqs: list[_Sequence], rows: dict, cancelled, adapter, offset: int) -> bool:
    """After another call's turn: the tokens of the running sequences (the prompt and those
    fed back) run again in their slots, after the adapter's virtual positions, and their logits
    replace rows (the engine's output buffer they were read from is overwritten too). False when
    cancelled meanwhile (each then says so)."""
    llm._cached, llm._primed = [], None  # slot 0 is rewritten (another adapter's virtual tokens may be there)
    for s in seqs:
        s.lost = True  # the end of the list must not record slot 0 as holding its tokens
        # (an ended one's slot is not read again: a later prompt must not reuse it, and opens it again)
        s.held = s.held and not s.done
    running = [s for s in seqs if not s.done]
    if adapter is not None and running:  # computed in one slot, copied to the others
        _open(llm, running[0].slot, adapter)
        _spread(llm, running[0].slot, [s.slot for s in running[1:]], adapter)
    logits = _prefill(llm.engine, [(s.slot, s.ids, 0) for s in running], cancelled, offset) if running else None
    if running and logits is None:
        for s in running:
            s.stats.finish_reason, s.done = "cancelled", True
        return False
    for i, s in enumerate(running):
        rows[s.slot] = logits[i]
    return True


def _open(llm, slot: int, adapter: str) -> None:
    """Writes the adapter's virtual positions into slot again (another call's turn rewrote them); slot
    0's record (llm._primed) says so, or the next call without the adapter reused tokens after them."""
    from .adapters import prime

    prime(llm.engine, llm.adapters[adapter], slot)
    if slot == 0:
        llm._primed = adapter


def _spread(llm, source: int, slots, adapter: str) -> None:
    """Copies the adapter's virtual positions from slot `source` into each of `slots`; slot 0's record
    (llm._primed) says so when it is one of them."""
    for slot in slots:
        llm.engine.copy_sequence(source, slot, llm._virtual_tokens(adapter))
        if slot == 0:
            llm._primed = adapter


def _prefill(engine, parts: list[tuple[int, list[int], int]], cancelled, offset: int = 0) -> np.ndarray | None:
    """Runs ids[start:] of each (slot, ids, start) in steps of PREFILL_ROWS rows, token i at position
    offset + i; the logits f32 [len(parts), vocab] of each part's last row (None if cancelled, or if no
    part has rows)."""
    tokens, seq_ids, positions, last_rows = [], [], [], []
    for slot, ids, begin in parts:
        tokens += ids[begin:]
        seq_ids += [slot] * (len(ids) - begin)
        positions += list(range(offset + begin, offset + len(ids)))
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
