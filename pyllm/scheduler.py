"""Continuous batching: one thread owns the engine and runs every active stream in one decode loop.

`pyllm serve --parallel N` attaches a Scheduler to its LLM (opened with n_parallel=N). Every
single-prompt stream (LLM.generate/chat, streamed or not, from any thread) then becomes a sequence
in one of the engine's N KV-cache slots, and each engine step (one Engine.forward_rows call) runs:
  1. one row for each decoding sequence (the token it sampled last), then
  2. prompt rows of the sequences still prefilling, oldest first, while the step's budget lasts
     (max_num_batched_tokens rows in all: vLLM's name; llama.cpp's n_batch; at most
     PREFILL_BESIDE_DECODE of them prompt rows while some sequence decodes), so that a long prompt
     is prefilled in chunks between decode rows and the running streams never stall for long.
A request joins at the next step when a slot is free; the others wait in arrival order (the server
bounds how many: its max_queue). Each sequence samples with its own Sampler (its seed, penalties,
grammar), stop strings, stop ids, limits and logprobs, exactly as LLM._run does for one stream, so
a seeded request gives the same text whatever runs beside it. A sequence whose grammar mask (computed
in a worker thread during the step) is not there when its logits are keeps them and is sampled at a
later step: a slow grammar delays only its own stream.

Freed when: a stream that finishes, or whose consumer cancels or closes it (a client that
disconnects), leaves its slot at the start of the next step. A slot keeps the keys/values it
computed after its sequence leaves: a later request whose prompt starts with the same tokens (a
system prompt) reuses them, from its own slot or by copying them from another slot
(Engine.copy_sequence); a request arriving while another sequence is still prefilling the prefix
they share waits for it, so N requests with one system prompt compute it once. Reused tokens are
GenerationStats.cached_tokens (OpenAI's usage.prompt_tokens_details.cached_tokens).

A sequence whose consumer lets PIECES_AHEAD pieces pile up unread is skipped (paused) until they
are read; paused for PREEMPT_AFTER seconds while a request waits for a slot, it gives its slot up
(as LLM's streams give the engine up) and, read again, queues for a slot before the requests that
came after it and re-reads its tokens (reusing what a slot still holds). Other users of the LLM (embeddings, logits, a list given to generate)
take the engine between steps (LLM._acquire, in turn); they overwrite slots, so after such a turn
the caches of the slots they wrote (embeddings and logits: slot 0; others: every slot) are dropped
and the sequences there re-read their tokens (chunked as a prompt). A long embeddings call gives
the engine back for as long as it held it, every PREEMPT_AFTER seconds while others wait.
"""

from __future__ import annotations

import collections
import logging
import numbers
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .limits import DEFAULT_MAX_NUM_BATCHED_TOKENS
from .llm import (PREEMPT_AFTER, REENTRANT_CALL, GenerationStats, StopText, TextStream, _token_logprob,
                  common_prefix_length)
from .tokenizer import StreamDecoder

PIECES_AHEAD = 16  # unread pieces after which a sequence pauses
WAIT_FOR_PREFIX = 16  # a new request waits for another's prefill when that gives it this many more tokens
POLL = 0.02  # seconds between checks for resumed or cancelled streams while nothing runs
# Prompt rows of a step that also decodes: a step's time grows with its rows, and every decoding
# stream waits for the whole step. SmolLM2 int4, 8 streams of 64 tokens after ~57-token prompts,
# 2 threads (Zen 4): with the 256-row budget the steps that took 4 newcomers' prompts at once ran
# 200-225 ms against 12-15 for a decode step (ITL p99 173 ms, p50 14.9); 64 rows: p99 65 ms, p50
# 13.8, the same total time (prefill runs ~1000 tok/s at 64 rows as at 256). Alone, a prompt still
# takes the whole budget per step.
PREFILL_BESIDE_DECODE = 64
STEP_LOG = 512  # steps (and finished streams' stats) remembered: Scheduler.recent_steps, recent_finished
log = logging.getLogger("pyllm.scheduler")


@dataclass
class Step:
    """One engine step: rows[i] = (sequence number, rows it ran, whether they were prompt rows);
    paused: the numbers of the ready sequences it skipped because their readers fell PIECES_AHEAD behind."""
    rows: list[tuple[int, int, bool]]
    paused: list[int] = field(default_factory=list)


@dataclass
class _Slot:
    """One KV-cache sequence of the engine."""
    index: int
    adapter: str | None = None  # the adapter whose virtual positions open its cache
    cached: list[int] = field(default_factory=list)  # tokens with valid keys/values, after the virtual positions
    seq: "_Sequence | None" = None
    last_used: int = 0

    def valid(self) -> list[int]:
        """The tokens whose keys/values this slot holds now."""
        return self.seq.ids[:self.seq.computed] if self.seq is not None else self.cached


class _Sequence(TextStream):
    """A stream run by a Scheduler; iterating it submits it (a stream never read takes no slot)."""

    def __init__(self, scheduler: "Scheduler", number: int, stats: GenerationStats, ids: list[int], limit: int,
                 sampler, stop: list[str], stop_ids: set[int], logprobs: int | None, adapter: str | None):
        super().__init__(stats)
        self.scheduler, self.number = scheduler, number
        self.ids = ids  # the prompt, then each sampled token fed back
        self.limit = limit  # tokens it may generate
        self.sampler, self.stop_ids, self.logprobs, self.adapter = sampler, stop_ids, logprobs, adapter
        self.text = StopText(StreamDecoder(scheduler.llm.tokenizer, ids), stop, stats)  # what it emits
        self.offset = scheduler.llm.adapters[adapter].virtual_tokens if adapter is not None else 0
        self.slot: _Slot | None = None
        self.computed = 0  # leading ids whose keys/values the slot holds
        self.ready = False  # prefix reuse and adapter done: its rows may run
        self.first_prepare = True
        self.new_tokens: list = []  # tokens generated since the last piece sent
        self.outbox: queue.Queue = queue.Queue()
        self.submitted = self.admitted = self.first_token_at = 0.0
        self.paused_since: float | None = None  # when its reader last fell PIECES_AHEAD behind
        # its last logits, kept while its grammar's mask for them is still being computed (_sample_or_hold)
        self.held: np.ndarray | None = None
        self._pieces = self._consume()

    def _consume(self):
        if threading.current_thread() is self.scheduler._thread:  # from a logits processor the loop runs
            raise RuntimeError(REENTRANT_CALL)  # (it would wait on its outbox for the loop that is waiting)
        self.submitted = time.perf_counter()
        self.scheduler.llm.last_stats = self.stats  # as LLM._run sets it when a call starts
        self.scheduler._submit(self)
        try:
            while True:
                kind, value, tokens = self.outbox.get()
                self.tokens += tokens
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()  # no-op once finished; closed early: the slot is freed at the next step

    def cancel(self) -> None:
        self.cancelled.set()
        self.scheduler._wake()

    def send(self, kind: str, value=None) -> None:
        self.outbox.put((kind, value, self.new_tokens))
        self.new_tokens = []

    @property
    def paused(self) -> bool:
        return self.outbox.qsize() >= PIECES_AHEAD


class Scheduler:
    """Runs the single-prompt streams of `llm` together (continuous batching over its n_parallel
    slots); attaches itself as llm.scheduler until close(). max_num_batched_tokens: rows per engine
    step (decode rows first, then prompt chunks), at least llm.n_parallel. ValueError otherwise, or
    when llm already has a scheduler."""

    def __init__(self, llm, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS):
        if llm.scheduler is not None:
            raise ValueError("this LLM already has a scheduler")
        if llm.device != "cpu":  # (every stream failed at its first step: "runs one sequence at a time")
            raise ValueError(f"the {llm.device} engine runs one sequence at a time: a Scheduler needs the CPU engine")
        # numpy's integers are integers (as n_parallel's); a bool is not (True passed as 1)
        if isinstance(max_num_batched_tokens, (bool, np.bool_)) or not isinstance(max_num_batched_tokens, numbers.Integral) \
                or max_num_batched_tokens < llm.n_parallel:
            raise ValueError(f"max_num_batched_tokens must be an integer >= n_parallel ({llm.n_parallel}); "
                             f"got {max_num_batched_tokens!r}")
        self.llm = llm
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.slots = [_Slot(i) for i in range(llm.n_parallel)]
        self.recent_steps: collections.deque[Step] = collections.deque(maxlen=STEP_LOG)
        self.recent_finished: collections.deque[GenerationStats] = collections.deque(maxlen=STEP_LOG)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._parked: list[_Sequence] = []  # preempted while paused: they queue again once read
        self._cond = threading.Condition()
        self._closed = False
        self._numbers = 0
        self._steps = 0
        llm.scheduler = self
        self._thread = threading.Thread(target=self._loop, name="pyllm-scheduler", daemon=True)
        self._thread.start()

    # -- what other threads call ------------------------------------------------------------------
    def stream(self, stats: GenerationStats, ids: list[int], max_new_tokens: int, sampler, stop: list[str],
               stop_ids: set[int], logprobs: int | None, adapter: str | None) -> TextStream:
        """A stream of ids' continuation (LLM._stream has checked the arguments and that it fits)."""
        offset = self.llm.adapters[adapter].virtual_tokens if adapter is not None else 0
        limit = min(max_new_tokens, self.llm.context_length - offset - len(ids))
        with self._cond:
            self._numbers += 1
            number = self._numbers
        return _Sequence(self, number, stats, ids, limit, sampler, stop, stop_ids, logprobs, adapter)

    @property
    def busy_slots(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def cancel(self) -> None:
        """Cancels every running and waiting stream (LLM.cancel while a step holds the engine)."""
        for seq in list(self._waiting) + self._parked + [s.seq for s in self.slots if s.seq is not None]:
            seq.cancelled.set()
        self._wake()

    def close(self) -> None:
        """Ends every stream (finish_reason "cancelled"), stops the thread and detaches from the LLM."""
        self._stop()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for seq in list(self._waiting) + self._parked + [s.seq for s in self.slots if s.seq is not None]:
            seq.stats.finish_reason = "cancelled"
            seq.send("end")
        self._waiting.clear()
        self._parked.clear()
        for slot in self.slots:
            slot.seq = None
        if self.llm.scheduler is self:
            self.llm.scheduler = None

    def _stop(self) -> None:
        """Tells the thread to stop after its step (close() ends the streams); waiting for its turn at the
        engine (behind a list another thread reads), it stops waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self.llm._lock:  # (see LLM._lock)
            self.llm._turn.notify_all()

    def _submit(self, seq: _Sequence) -> None:
        if seq.limit <= 0:
            seq.stats.finish_reason = "length"
            seq.send("end")
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("this LLM's scheduler is closed")
            self._waiting.append(seq)
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the scheduler's thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._has_work():
                    self._cond.wait(POLL if self._parked or any(s.seq is not None for s in self.slots) else None)
                if self._closed:
                    return
            try:
                self._step()
            # a fault of the engine: every running stream gets it, the loop goes on. BaseException too:
            # this thread never gets a signal, so a KeyboardInterrupt here came from a caller's code (a
            # logits processor), and a loop that ended on it left every stream waiting for ever
            except BaseException as e:  # noqa: B036
                if self._closed:  # (the LLM closing: its waiting turn refused) close() ends the streams, "cancelled"
                    return
                log.error("scheduler step failed", exc_info=e)
                for slot in self.slots:
                    if slot.seq is not None:
                        self._finish(slot.seq, None, error=e)
                    slot.cached, slot.adapter = [], None

    def _has_work(self) -> bool:
        """Whether a step has something to do (notes since when each running sequence is paused)."""
        active = [s.seq for s in self.slots if s.seq is not None]
        now = time.monotonic()
        for seq in active:
            seq.paused_since = (seq.paused_since or now) if seq.paused else None
        # a sequence waiting for its grammar's mask has nothing to run (when_ready wakes the loop)
        if any(s.cancelled.is_set() or not (s.paused or _held(s)) for s in active + self._parked) or \
                any(s.cancelled.is_set() for s in self._waiting):
            return True
        return bool(self._waiting) and (len(active) < len(self.slots) or
                                        any(now - (s.paused_since or now) >= PREEMPT_AFTER for s in active))

    def _step(self) -> None:
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancelled.is_set():
                self._finish(slot.seq, "cancelled")
        self._sample_held()
        self._admit()
        if not any(s.seq is not None for s in self.slots):
            return
        self._let_others_in()
        llm = self.llm
        try:
            # (inside: an exception right after the turn was taken kept it for ever). close() stops the wait:
            # it waited for the call holding the engine (a list read on), up to its 30 s join
            kept = llm._acquire(self, lambda: self._closed)
            llm._cached, llm._primed = [], None  # the single-stream path must not reuse slot 0
            written, llm._written = llm._written, set()
            if not kept:
                self._forget(written)
            self._prepare()
            batch = self._compose()
            if not batch:
                return
            tokens, seq_ids, positions, wanted, plan, paused = batch
            logits = llm.engine.forward_rows(np.array(tokens, dtype=np.int32), np.array(seq_ids, dtype=np.int32),
                                             np.array(positions, dtype=np.int32), np.array(wanted, dtype=np.int64))
        finally:
            llm._release(self)
        self._steps += 1
        self.recent_steps.append(Step([(s.number, n, prompt) for s, n, prompt, _ in plan], paused))
        for seq, n, _, row in plan:
            seq.computed += n
            if row is not None:
                self._sample_or_hold(seq, logits[row])
        self._sample_held()  # masks that came while the step ran

    def _sample_or_hold(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Samples seq's next token, or, while its grammar's mask is still being computed (llguidance,
        in a worker thread), keeps the logits and goes on: the other sequences are sampled and run
        their next steps meanwhile, instead of all waiting for one grammar's mask. A held sequence is
        sampled by a later step (_sample_held) from the same logits, with its own sampler: its text is
        the one it gives alone."""
        pending = _masks_pending(seq)
        if pending:
            seq.held = np.array(logits, copy=True)  # the engine reuses its output buffer
            for processor in pending:
                processor.when_ready(self._wake)
            return
        seq.held = None
        try:
            self._sample(seq, logits)
        # this request's fault (a grammar that allows nothing, a logits processor that raises, even
        # KeyboardInterrupt or SystemExit): only it ends, its consumer raises the error in its own
        # thread as LLM._run would (the loop must not die: every other stream would wait for ever)
        except BaseException as e:  # noqa: B036
            self._finish(seq, None, error=e)

    def _sample_held(self) -> None:
        """Samples the held sequences whose masks are there now."""
        for slot in self.slots:
            seq = slot.seq
            if seq is None or seq.held is None or _masks_pending(seq):
                continue
            logits, seq.held = seq.held, None
            if seq.ready and seq.computed == len(seq.ids):  # (else its cache was lost: re-read, it gets them again)
                self._sample_or_hold(seq, logits)

    def _admit(self) -> None:
        """Gives free slots to waiting requests, in arrival order: the free slot whose cache shares
        the longest prefix with the prompt, else one other than slot 0 (which embeddings and logits
        calls write), else the one unused longest. A sequence paused for PREEMPT_AFTER seconds gives
        its slot up to a waiting one."""
        now = time.monotonic()
        with self._cond:
            for seq in [s for s in self._parked if s.cancelled.is_set() or not s.paused]:
                self._parked.remove(seq)  # read again (or gone): queues before those that came after it
                self._waiting.appendleft(seq)
            self._waiting = collections.deque(sorted(self._waiting, key=lambda q: q.number))
            for seq in [s for s in self._waiting if s.cancelled.is_set()]:  # left while waiting: its place goes now
                self._waiting.remove(seq)
                seq.stats.finish_reason = "cancelled"
                seq.send("end")
            while self._waiting:
                free = [s for s in self.slots if s.seq is None]
                if not free:
                    idle = [s.seq for s in self.slots if s.seq.paused and s.seq.paused_since is not None and
                            now - s.seq.paused_since >= PREEMPT_AFTER]
                    if not idle:
                        return
                    self._park(min(idle, key=lambda q: q.paused_since))
                    continue
                seq = self._waiting.popleft()
                # slot 0 last among equals: embeddings and logits calls write it between steps
                slot = max(free, key=lambda s: (common_prefix_length(seq.ids, s.cached) if s.adapter == seq.adapter
                                                else -1, s.index != 0, -s.last_used))
                slot.seq, seq.slot = seq, slot
                seq.admitted = seq.admitted or time.perf_counter()
                slot.last_used = self._steps

    def _park(self, seq: _Sequence) -> None:
        """Takes a paused sequence out of its slot (which keeps its keys/values as a prefix)."""
        slot = seq.slot
        slot.cached, slot.seq, slot.last_used = seq.ids[:seq.computed] if seq.ready else [], None, self._steps
        seq.slot, seq.ready, seq.computed, seq.paused_since, seq.held = None, False, 0, None, None
        self._parked.append(seq)

    def _let_others_in(self) -> None:
        """Another caller waits for the engine (embeddings, logits): let it have one turn first (not once
        close() began: _stop wakes this wait)."""
        turn = self.llm._turn
        with self.llm._lock:  # (see LLM._lock)
            if self.llm._waiting:
                served = self.llm._served
                turn.wait_for(lambda: self.llm._served != served or not self.llm._waiting or self.llm.engine is None
                              or self._closed, timeout=1.0)

    def _forget(self, written: set[int] | None = None) -> None:
        """Someone else used the engine: the slots it wrote (written; None: any) cannot be trusted."""
        for slot in self.slots:
            if written is not None and slot.index not in written:
                continue
            slot.cached, slot.adapter = [], None
            if slot.seq is not None:  # (held logits too: its re-read gives them again)
                slot.seq.computed, slot.seq.ready, slot.seq.held = 0, False, None

    def _prepare(self) -> None:
        """Readies newly admitted sequences: the adapter's virtual positions, and the longest prefix of
        the prompt any slot holds (its own, or copied from another); a sequence waits while another
        one's prefill will soon hold a longer shared prefix."""
        from .adapters import prime

        engine = self.llm.engine
        for slot in self.slots:
            seq = slot.seq
            if seq is None or seq.ready:
                continue
            most = len(seq.ids) - 1  # at least one row must run to give logits
            others = [s for s in self.slots if s is not slot and s.adapter == seq.adapter and
                      (s.seq is None or s.seq.ready)]
            have, source = (common_prefix_length(seq.ids, slot.cached) if slot.adapter == seq.adapter else 0), None
            for other in others:
                n = common_prefix_length(seq.ids, other.valid())
                if n > have:
                    have, source = n, other
            have = min(have, most)
            soon = max([min(common_prefix_length(seq.ids, o.seq.ids), most) for o in others
                        if o.seq is not None and o.seq.computed < len(o.seq.ids)], default=0)
            if soon >= have + WAIT_FOR_PREFIX:
                continue  # computed once, by the other sequence; copied when it is there
            if source is not None:  # the same adapter's virtual positions come with the tokens
                engine.copy_sequence(source.index, slot.index, seq.offset + have)
            elif slot.adapter != seq.adapter and seq.adapter is not None:
                prime(engine, self.llm.adapters[seq.adapter], slot.index)
            slot.adapter = seq.adapter
            seq.computed, seq.ready = have, True
            if seq.first_prepare:  # not when re-reading its tokens after another caller's turn
                seq.stats.cached_tokens, seq.first_prepare = have, False

    def _compose(self):
        """The rows of the next step: (tokens, seq_ids, positions, logit rows, plan, paused) with plan
        [(sequence, rows, prompt rows?, its logits row or None)] and paused the numbers of the ready
        sequences skipped (their readers are behind), or None when nothing can run."""
        ready = sorted((s.seq for s in self.slots if s.seq is not None and s.seq.ready), key=lambda q: q.number)
        held = [q.paused for q in ready]  # read once: a reader may catch up meanwhile
        active = [q for q, p in zip(ready, held) if not p]
        paused = [q.number for q, p in zip(ready, held) if p]
        decode = [q for q in active if len(q.ids) - q.computed == 1]
        prefill = [q for q in active if len(q.ids) - q.computed > 1]
        budget = self.max_num_batched_tokens - len(decode)
        if decode:
            budget = min(budget, PREFILL_BESIDE_DECODE)
        tokens, seq_ids, positions, wanted, plan = [], [], [], [], []
        for q in decode + prefill:
            n = 1 if q in decode else min(len(q.ids) - q.computed, budget)
            if n <= 0:
                break
            if q not in decode:
                budget -= n
            start = q.computed
            tokens += q.ids[start:start + n]
            seq_ids += [q.slot.index] * n
            positions += range(q.offset + start, q.offset + start + n)
            row = None
            if start + n == len(q.ids):
                row = len(wanted)
                wanted.append(len(tokens) - 1)
            plan.append((q, n, q not in decode, row))
        if not tokens:
            return None
        return tokens, seq_ids, positions, wanted, plan, paused

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> None:
        """The sequence's next token from its logits: as LLM._run, one token."""
        stats = seq.stats
        token = seq.sampler(logits, seq.ids)
        stats.generated_tokens += 1
        if stats.generated_tokens == 1:
            seq.first_token_at = time.perf_counter()
            stats.time_to_first_token = seq.first_token_at - seq.submitted
            stats.prefill_seconds = seq.first_token_at - seq.admitted
        if token in seq.stop_ids:  # the text held back so far still comes out
            self._finish(seq, "stop")
            return
        seq.sampler.accept(token)
        piece = seq.text.push(token, _token_logprob(token, logits, seq.logprobs))
        seq.new_tokens += seq.text.take_tokens()  # those whose text is out (a stop string's never are)
        if seq.text.stopped:
            self._finish(seq, "stop")
            return
        if piece:
            seq.send("piece", piece)
        if stats.generated_tokens >= seq.limit:
            self._finish(seq, "length")
        else:
            seq.ids.append(token)

    def _finish(self, seq: _Sequence, reason: str | None, error: BaseException | None = None):
        """Ends seq (reason: its finish_reason; or error, handed to its consumer) and frees its slot,
        whose cache keeps the tokens computed."""
        stats = seq.stats
        if error is None:
            rest = seq.text.finish(flush=reason != "cancelled")
            seq.new_tokens += seq.text.take_tokens()
            if seq.text.stopped:
                reason = "stop"
            stats.finish_reason = reason
            if seq.first_token_at:
                stats.decode_seconds = time.perf_counter() - seq.first_token_at
            if rest and reason != "cancelled":
                seq.send("piece", rest)
            seq.send("end")
        else:  # cut short: its stats must not keep the "" of a stream that never ended
            stats.finish_reason = "cancelled"
            seq.send("error", error)
        self.recent_finished.append(stats)
        slot = seq.slot
        if slot is not None:
            slot.cached, slot.seq = (seq.ids[:seq.computed] if seq.ready else []), None
            slot.last_used = self._steps
            seq.slot = None


def _masks_pending(seq: _Sequence) -> list:
    """The processors of seq (grammars) whose mask for its next token is still being computed."""
    return [p for p in seq.sampler.processors if getattr(p, "when_ready", None) is not None and not p.ready()]


def _held(seq: _Sequence) -> bool:
    """Whether seq waits for its grammar's mask before it can be sampled (nothing to run until then)."""
    return seq.held is not None and bool(_masks_pending(seq))
