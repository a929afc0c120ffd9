"""Several sequences in one engine step (issue: many users at once): the multi-sequence KV cache,
Engine.forward_rows, LLM.generate / chat with a list of prompts, shared prefixes, logits_many.

The reference is always the single-sequence path of the same file: batched greedy tokens must be
the same tokens, f32 logits within 1e-5 relative."""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import numpy as np
import pytest

pytest.importorskip("transformers")

import pyllm  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

PROMPTS = ["Paris is the capital of", "def main():", "中文测试：今天", "The quick brown fox", "Emoji 😀",
           "Berlin is", "café naïve", "print('hello"]


@pytest.fixture(scope="module", params=["f32", "int8"])
def model_file(request, tmp_path_factory):
    base = make_tiny_llama(str(tmp_path_factory.mktemp("batch_base")), seed=11, max_position_embeddings=1024)
    out = str(tmp_path_factory.mktemp("batch") / f"{request.param}.pllm")
    convert_checkpoint(base, out, quant=request.param, progress=False)
    return out


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    from families import make_tiny_model

    base = make_tiny_model("gemma2", "softcap_window", str(tmp_path_factory.mktemp("batch_gemma")), seed=5)
    out = str(tmp_path_factory.mktemp("batch_gemma_pllm") / "f32.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False)
    return out


def test_batched_greedy_equals_each_alone(model_file):
    with pyllm.LLM(model_file, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=8) as llm:
        assert llm.generate(PROMPTS, max_new_tokens=24, temperature=0) == expected
        assert all(1 <= s.generated_tokens <= 24 and s.finish_reason in ("stop", "length")
                   for s in llm.last_batch_stats)
        # the single-prompt API keeps working beside it
        assert llm.generate(PROMPTS[2], max_new_tokens=24, temperature=0) == expected[2]


@pytest.mark.parametrize("activation_quant", ["int8", "int8x2_outliers"])
def test_one_term_activations_batch_as_each_alone(model_file, activation_quant):
    """activation_quant="int8" (one int8 term per activation value, the tiled kernels' fast path) and
    "int8x2_outliers" (two terms only in a row's outlier blocks, decided from the row alone):
    batched greedy tokens are each prompt's alone, and a batch's logits each sequence's alone. It
    leaves float weights alone (the same bits) and moves int8 weights' logits by about an int8
    step's rounding, no more."""
    tokens = np.random.default_rng(3).integers(3, 400, 40).astype(np.int32)
    with pyllm.LLM(model_file, n_threads=2, activation_quant=activation_quant) as alone:
        assert alone.engine.activation_quant == activation_quant
        expected = [alone.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS]
        one_term = alone.logits(tokens)
    with pyllm.LLM(model_file, n_threads=2, n_parallel=8, activation_quant=activation_quant) as llm:
        assert llm.generate(PROMPTS, max_new_tokens=24, temperature=0) == expected
        many = llm.logits_many([tokens[:7], tokens, tokens[:30]])
    for a, n in zip(many, (7, 40, 30)):
        with pyllm.LLM(model_file, n_threads=2, activation_quant=activation_quant) as alone:
            b = alone.logits(tokens[:n])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    with pyllm.LLM(model_file, n_threads=2) as two:
        assert two.engine.activation_quant == "int8x2"
        two_term = two.logits(tokens)
    if "f32" in model_file:
        np.testing.assert_array_equal(one_term, two_term)
    else:
        nmse = float(np.mean((one_term - two_term) ** 2) / np.mean(two_term ** 2))
        assert 1e-9 < nmse < 1e-3, nmse


def test_activation_quant_is_checked(model_file):
    for bad in ("int4", "", None, "INT8"):
        with pytest.raises(ValueError, match="activation_quant"):
            pyllm.LLM(model_file, activation_quant=bad)
    with pytest.raises(ValueError, match="activation_quant .* CPU engine"):
        pyllm.LLM(model_file, device="cuda", activation_quant="int8")
    for device in ("gpu", "CPU"):  # the device is checked first, whatever activation_quant says
        with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
            pyllm.LLM(model_file, device=device, activation_quant="int8")
    with pyllm.LLM(model_file, n_threads=1) as llm:
        with pytest.raises(ValueError, match="activation_quant"):
            llm.engine.activation_quant = "int3"
        assert llm.engine.activation_quant == "int8x2"
        llm.engine.activation_quant = "int8"  # before the first use: it may change
        llm.engine.activation_quant = "int8x2"
        llm.generate("Paris is", max_new_tokens=2, temperature=0)
        llm.engine.activation_quant = "int8x2"  # the same: nothing changes
        # afterwards the cache holds keys and values computed with int8x2, and prefixes are reused
        with pytest.raises(ValueError, match="chosen before the engine's first use"):
            llm.engine.activation_quant = "int8"
        assert llm.engine.activation_quant == "int8x2"


def test_a_callback_calling_back_into_the_engine_gets_an_error_not_a_hang(model_file):
    """observe_inputs' callback runs inside a forward: a call back into the engine (which would wait
    for that forward forever) raises instead."""
    with pyllm.LLM(model_file, n_threads=1) as llm:
        calls = [lambda: llm.engine.copy_sequence(0, 0, 1),
                 lambda: llm.engine.forward(np.array([1], np.int32), 0),
                 lambda: setattr(llm.engine, "activation_quant", "int8x2")]
        for call in calls:
            seen = []

            def callback(layer, which, x, call=call):
                if not seen:
                    try:
                        call()
                    except ValueError as e:
                        seen.append(str(e))

            llm.engine.observe_inputs(np.array([5, 6, 7], np.int32), 0, callback)
            assert seen and "running a forward in this thread" in seen[0], seen
        assert llm.generate("Paris is", max_new_tokens=2, temperature=0)  # the engine still works


@pytest.mark.parametrize("error", [KeyError("k"), SystemExit(143), KeyboardInterrupt()])
def test_a_callback_s_exception_comes_out_as_itself(model_file, error):
    """observe_inputs stops at the callback's exception and raises it again, type and all: a SIGTERM
    handler's SystemExit during calibration must end the CLI with 143, not with a RuntimeError."""
    def callback(layer, which, x):
        raise error

    with pyllm.LLM(model_file, n_threads=1) as llm:
        with pytest.raises(type(error)) as caught:
            llm.engine.observe_inputs(np.array([5, 6, 7], np.int32), 0, callback)
        assert caught.value.args == error.args
        assert llm.generate("Paris is", max_new_tokens=2, temperature=0)


def test_batched_greedy_on_a_sliding_window_softcapped_family(gemma_file):
    """Gemma 2 (windows shorter than the sequences, soft-capping): batched equals alone past the window."""
    with pyllm.LLM(gemma_file, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=32, temperature=0) for p in PROMPTS[:4]]
    with pyllm.LLM(gemma_file, n_threads=2, n_parallel=4) as llm:
        assert llm.generate(PROMPTS[:4], max_new_tokens=32, temperature=0) == expected


def test_more_prompts_than_slots_run_in_waves(model_file):
    with pyllm.LLM(model_file, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=8, temperature=0) for p in PROMPTS]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=3) as llm:
        assert llm.generate(PROMPTS, max_new_tokens=8, temperature=0) == expected


def test_seeded_sampling_is_independent_of_the_batch(model_file):
    options = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    with pyllm.LLM(model_file, n_threads=2) as alone:
        expected = [alone.generate(p, **options) for p in PROMPTS[:5]]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=5) as llm:
        assert llm.generate(PROMPTS[:5], **options) == expected


def test_streamed_pieces_and_stop_strings(model_file):
    with pyllm.LLM(model_file, n_threads=2, n_parallel=4) as llm:
        texts = llm.generate(PROMPTS[:4], max_new_tokens=20, temperature=0)
        pieces = [""] * 4
        for index, piece in llm.generate(PROMPTS[:4], max_new_tokens=20, temperature=0, stream=True):
            pieces[index] += piece
        assert pieces == texts
        stop = texts[1][3:6] if len(texts[1]) > 6 else None
        if stop:
            cut = llm.generate(PROMPTS[:4], max_new_tokens=20, temperature=0, stop=[stop])
            assert cut[1] == texts[1][:texts[1].find(stop)]
            assert llm.last_batch_stats[1].finish_reason == "stop"


def test_shared_system_prompt_is_computed_once(model_file):
    """8 requests with the same 300-token prefix: the prefix runs once, in slot 0; the others copy it."""
    with pyllm.LLM(model_file, n_threads=2, n_parallel=8) as llm:
        system = llm.tokenize("Paris is the capital of France. " * 60, add_special_tokens=False)[:300]
        prompts = [system + llm.tokenize(p, add_special_tokens=False) for p in PROMPTS]
        got = llm.generate(prompts, max_new_tokens=6, temperature=0)
        stats = llm.last_batch_stats
        assert [s.cached_tokens for s in stats[1:]] == [300] * 7
        assert all(s.prefill_tokens == s.prompt_tokens - 300 for s in stats[1:])
    with pyllm.LLM(model_file, n_threads=2) as alone:
        assert got == [alone.generate(p, max_new_tokens=6, temperature=0) for p in prompts]


def _counting_prefill(monkeypatch) -> list:
    """Replaces batch._prefill with one that records the prompt rows each call runs."""
    import pyllm.batch

    real, calls = pyllm.batch._prefill, []

    def counted(engine, parts, cancelled, offset=0):
        calls.append(sum(len(ids) - begin for _, ids, begin in parts))
        return real(engine, parts, cancelled, offset)

    monkeypatch.setattr(pyllm.batch, "_prefill", counted)
    return calls


def test_prefixes_shared_by_some_prompts_of_a_wave_are_computed_once(model_file, monkeypatch):
    """Only a prefix shared by every prompt of a wave was computed once: one prompt without the
    system prompt (or two groups with two system prompts) and each prompt computed its own again.
    Now each copies the longest prefix it shares with an earlier prompt of the wave (nested: the
    third shares more with the second than with the first), and every text is the one it gives alone."""
    a, b = list(range(10, 110)), list(range(200, 280))
    prompts = [a + [5, 6], a + [7], b + [8, 9], a + [7, 1, 2] * 4 + [3], [400, 401, 402], b + [8, 9, 10], a + [7, 1, 2, 4]]
    with pyllm.LLM(model_file, n_threads=2, context_length=256) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        options = dict(max_new_tokens=5, temperature=0, logit_bias=ban)
        expected = [alone.generate(p, **options) for p in prompts]
    with pyllm.LLM(model_file, n_threads=2, context_length=256, n_parallel=7) as llm:
        rows = _counting_prefill(monkeypatch)
        assert llm.generate(prompts, **options) == expected
        cached = [s.cached_tokens for s in llm.last_batch_stats]
        assert cached == [0, 100, 0, 101, 0, 82, 103]
        assert sum(rows) == sum(len(p) for p in prompts) - sum(cached)


def test_a_list_with_no_new_tokens_computes_nothing_as_a_single_call(model_file, monkeypatch):
    """max_new_tokens=0: a single call returns at once, computing nothing and keeping its cache; a list
    ran (and copied, with an adapter primed) every prompt of its first wave for nothing, and rewrote
    slot 0, the single calls' cache; then it still took a turn at the engine, after which an attached
    scheduler drops its slots' caches: it takes none now, streamed or not."""
    calls = _counting_prefill(monkeypatch)
    with pyllm.LLM(model_file, n_threads=2, n_parallel=2) as llm:
        held = list(range(10, 40))
        llm.generate(held, max_new_tokens=2)
        turns = []
        acquire = llm._acquire
        monkeypatch.setattr(llm, "_acquire", lambda *a, **k: turns.append(a) or acquire(*a, **k))
        assert llm.generate(PROMPTS[:3], max_new_tokens=0) == ["", "", ""]
        stream = llm.generate(PROMPTS[:3], max_new_tokens=0, stream=True)
        assert list(stream) == [] and [s.finish_reason for s in stream.stats] == ["length"] * 3
        # closed before a read (a `finally: stream.close()`): no error, and "length" as a single stream says
        stream = llm.generate(PROMPTS[:3], max_new_tokens=0, stream=True)
        one = llm.generate(PROMPTS[0], max_new_tokens=0, stream=True)
        stream.close(), one.close()
        assert [s.finish_reason for s in stream.stats] == ["length"] * 3 and one.stats.finish_reason == "length"
        assert calls == [] and turns == []
        monkeypatch.setattr(llm, "_acquire", acquire)
        assert [(s.finish_reason, s.cached_tokens, s.prefill_seconds) for s in llm.last_batch_stats] == \
            [("length", 0, 0.0)] * 3
        llm.generate(held, max_new_tokens=2)
        assert llm.last_stats.cached_tokens == len(held) - 1  # (slot 0 still holds it)


def test_a_later_prompt_copies_the_longest_prefix_any_slot_holds(model_file, monkeypatch):
    """A prompt past n_parallel reused only what its own slot held (the prompt before it there); the
    system prompt it shares with a sequence still running in another slot was computed again."""
    system = list(range(10, 70))
    # the second prompt ends 6 tokens on, at the context's end: the third starts in its slot while
    # the first still runs in slot 0
    prompts = [system + [5], [300] * 250, system + [6, 7]]
    with pyllm.LLM(model_file, n_threads=2, context_length=256) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        options = dict(max_new_tokens=30, temperature=0, logit_bias=ban)
        expected = [alone.generate(p, **options) for p in prompts]
    with pyllm.LLM(model_file, n_threads=2, context_length=256, n_parallel=2) as llm:
        rows = _counting_prefill(monkeypatch)
        assert llm.generate(prompts, **options) == expected
        assert [s.cached_tokens for s in llm.last_batch_stats] == [0, 0, 60]
        assert rows[-1] == len(prompts[2]) - 60
        assert llm.generate(prompts[0], **options) == expected[0]  # slot 0's cache is as the list left it


def test_a_ctrl_c_in_slot_0_s_refill_leaves_no_false_prefix(model_file, monkeypatch):
    """A later prompt taking slot 0 rewrites it past what it shares with the tokens there, and slot 0
    is the single-prompt calls' cache: a Ctrl-C in that prefill left the cache recorded as holding
    the earlier prefix, and the next call reused keys and values of another prompt."""
    import pyllm.batch

    prefix = list(range(20, 60))
    with pyllm.LLM(model_file, n_threads=2, context_length=128, n_parallel=2) as llm:
        ban = {i: -100 for i in llm.tokenizer.eos_ids}
        probe = prefix + [7, 8]
        expected = llm.generate(probe, max_new_tokens=8, temperature=0, logit_bias=ban)
        real = pyllm.batch._prefill

        def interrupted(engine, parts, cancelled, offset=0):
            out = real(engine, parts, cancelled, offset)
            if parts[0][0] == 0 and parts[0][1][:1] == [300]:  # slot 0 rewritten by the third prompt
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(pyllm.batch, "_prefill", interrupted)
        llm.generate(probe, max_new_tokens=8, temperature=0, logit_bias=ban)  # slot 0 holds the prefix
        with pytest.raises(KeyboardInterrupt):  # the first prompt ends at the context's end, 2 tokens on
            llm.generate([prefix + [5] * 85, [9, 10], [300] * 30], max_new_tokens=20, temperature=0, logit_bias=ban)
        assert llm.generate(probe, max_new_tokens=8, temperature=0, logit_bias=ban) == expected


def test_a_ctrl_c_in_slot_0_s_copy_leaves_no_false_prefix(model_file):
    """A later prompt taking slot 0 may copy a prefix another slot holds over what is there: a Ctrl-C
    landing in that copy left slot 0 recorded as holding the earlier prompt's tokens, and the next call
    continuing them reused another prompt's keys and values. The claim now comes before the copy."""
    prefix = list(range(20, 60))
    probe = [9] * 50 + [7, 8]

    class Interrupted:  # the engine, with a Ctrl-C as the copy into slot 0 returns
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def copy_sequence(self, source, slot, n):
            self.engine.copy_sequence(source, slot, n)
            if slot == 0:
                raise KeyboardInterrupt

    def end_first(ids, scores):  # the first prompt ends at once, and the third takes slot 0 (stateless)
        if ids[:50] == [9] * 50 and len(ids) > 50:
            scores[:] = -np.inf
            scores[2] = 0
        return scores

    with pyllm.LLM(model_file, n_threads=2, context_length=128, n_parallel=2) as llm:
        expected = llm.generate(probe, max_new_tokens=8, temperature=0, stop_token_ids=[])
        engine, llm.engine = llm.engine, Interrupted(llm.engine)
        with pytest.raises(KeyboardInterrupt):  # (the third copies the prefix it shares with the second)
            llm.generate([[9] * 50, prefix[:35] + [5] * 5, prefix[:33] + [6] * 3], max_new_tokens=6, temperature=0,
                         logits_processors=[end_first])
        llm.engine = engine
        assert llm.generate(probe, max_new_tokens=8, temperature=0, stop_token_ids=[]) == expected


def test_a_list_reuses_what_slot_0_holds_as_single_calls_do(model_file):
    """Slot 0 reused only the prefix every prompt of a wave shares, so a list run one prompt at a time
    (n_parallel=1, the default) computed its system prompt again for each prompt, where a loop of
    single calls reuses it; and a wave's first prompt continuing an earlier call's tokens computed
    them again. The texts are the same either way (a reused prefix is the same bits)."""
    with pyllm.LLM(model_file, n_threads=2, context_length=512) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        system = alone.tokenize("Paris is the capital of France. " * 40, add_special_tokens=False)[:200]
        prompts = [system + alone.tokenize(p, add_special_tokens=False) for p in PROMPTS[:4]]
        expected = [alone.generate(p, max_new_tokens=6, temperature=0, logit_bias=ban) for p in prompts]
    with pyllm.LLM(model_file, n_threads=2, context_length=512) as llm:
        assert llm.generate(prompts, max_new_tokens=6, temperature=0, logit_bias=ban) == expected
        assert [s.cached_tokens for s in llm.last_batch_stats] == [0, 200, 200, 200]
    with pyllm.LLM(model_file, n_threads=2, context_length=512, n_parallel=2) as llm:
        stream = llm.generate(prompts[0], max_new_tokens=6, temperature=0, logit_bias=ban, stream=True)
        "".join(stream)
        # slot 0 holds the prompt and the 5 tokens fed back (not the last one sampled)
        longer = prompts[0] + [t.id for t in stream.tokens] + [7, 8]
        assert llm.generate([longer, prompts[1]], max_new_tokens=6, temperature=0, logit_bias=ban) == \
            _alone(model_file, [longer, prompts[1]], ban)
        assert [s.cached_tokens for s in llm.last_batch_stats] == [len(prompts[0]) + 5, 200]


def _alone(model_file, prompts, ban):
    with pyllm.LLM(model_file, n_threads=2, context_length=512) as alone:
        return [alone.generate(p, max_new_tokens=6, temperature=0, logit_bias=ban) for p in prompts]


def test_a_preempted_batch_stream_leaves_no_false_prefix_in_the_cache(model_file):
    """A streamed list of prompts left unread while another call in the same thread takes the
    engine re-reads its slots' tokens when read again and goes on (it was cancelled, cut in silence).
    When it was cancelled, its later waves still recorded their shared
    prefix, never computed, as slot 0's cache (and the end of a wave the first prompt's tokens,
    overwritten by the other call): the next generate() reusing that prefix answered from another
    call's keys and values, in silence."""
    with pyllm.LLM(model_file, n_threads=2, n_parallel=2) as llm:
        ban = {i: -100 for i in llm.tokenizer.eos_ids}
        prompts = [[10, 11, 12, 13, 14], [10, 11, 12, 13, 15], [20, 21, 22, 23, 24, 25], [20, 21, 22, 23, 24, 26],
                   [30, 31], [32, 33]]
        probes = [[20, 21, 22, 23, 24, 30, 31], prompts[0] + [40]]
        expected = [llm.generate(p, max_new_tokens=10, temperature=0, logit_bias=ban) for p in probes]
        whole = llm.generate(prompts, max_new_tokens=20, temperature=0, logit_bias=ban)
        for interloper in (lambda: llm.generate([60, 61, 62, 63, 64, 65, 66, 67], max_new_tokens=5, logit_bias=ban),
                           lambda: llm.generate("Paris", max_new_tokens=3, adapter=None),
                           lambda: llm.logits([60, 61, 62]),
                           lambda: llm.generate([[70, 71, 72], [73, 74]], max_new_tokens=4)):
            pieces = llm.generate(prompts, max_new_tokens=20, temperature=0, stream=True, logit_bias=ban)
            stats = llm.last_batch_stats
            texts = [""] * len(prompts)
            for n, (index, piece) in enumerate(pieces):
                texts[index] += piece
                if n in (0, 3, 20):
                    interloper()  # takes the engine (the batch's stream is this thread's, unread)
            # the batch went on where it was, its slots read again: each text whole, as unpreempted
            # (it ended "cancelled", the rest of its text and its later waves lost, in silence)
            assert texts == whole and "cancelled" not in [s.finish_reason for s in stats]
            assert [llm.generate(p, max_new_tokens=10, temperature=0, logit_bias=ban) for p in probes] == expected


def test_batch_stats_tell_a_full_context_from_the_token_limit(model_file):
    """A list's GenerationStats never got the call's max_new_tokens (0), so hit_token_limit was true
    for every prompt that ended by length, a full context included (the REPL's cut notice reads it)."""
    with pyllm.LLM(model_file, n_threads=2, n_parallel=2, context_length=24) as llm:
        ban = {i: -100 for i in llm.tokenizer.eos_ids}
        llm.generate([[10, 11, 12], [20] * 20], max_new_tokens=8, logit_bias=ban)
        short, full = llm.last_batch_stats
        assert short.max_new_tokens == 8 and short.generated_tokens == 8 and short.hit_token_limit
        assert full.finish_reason == "length" and full.generated_tokens == 4 and not full.hit_token_limit


def test_each_prompt_s_timings_are_its_own(model_file):
    """Every prompt of a wave got the wave's decode_seconds, so one that ended after 6 tokens beside
    one generating 200 reported 1/30 of its decode rate; and a later prompt's time_to_first_token
    counted from its own wave's start, not from the call (its wait for a slot left out)."""
    with pyllm.LLM(model_file, n_threads=2, n_parallel=2, context_length=256) as llm:
        ban = {i: -100 for i in llm.tokenizer.eos_ids}
        llm.generate([[5] * 250, [6] * 5, [7] * 5], max_new_tokens=200, temperature=0, logit_bias=ban)
        near_full, long, later = llm.last_batch_stats
    assert (near_full.generated_tokens, long.generated_tokens, later.generated_tokens) == (6, 200, 200)
    assert 0 < near_full.decode_seconds < long.decode_seconds  # (it ran 5 of the 199 decode steps)
    assert later.time_to_first_token > near_full.time_to_first_token + near_full.decode_seconds  # it waited


def test_a_later_prompt_takes_the_first_slot_that_frees(model_file):
    """Prompts past n_parallel ran in waves: each wave began once the whole wave before it had ended,
    so one long reply held the other n_parallel - 1 slots idle (a prompt near the context's end,
    done after 6 tokens, left its slot empty for the 194 steps of its neighbour's reply). A later
    prompt now starts in the first slot that frees, reusing what the slot holds of its tokens (a
    system prompt), and each text is still the one it gives alone."""
    with pyllm.LLM(model_file, n_threads=2, context_length=256) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        system = list(range(10, 60))
        prompts = [system + [5] * 190, system + [6] * 3, system + [7] * 4, system + [8] * 2, [9, 10]]
        options = dict(max_new_tokens=100, temperature=0.8, seed=4, logit_bias=ban)
        expected = [alone.generate(p, **options) for p in prompts]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=2, context_length=256) as llm:
        order, texts = [], [""] * len(prompts)
        for index, piece in llm.generate(prompts, stream=True, **options):
            order.append(index)
            texts[index] += piece
        stats = llm.last_batch_stats
        assert texts == expected
        # prompt 2 began beside prompt 1 once prompt 0 (16 tokens from the end of the context) ended
        assert order.index(2) < len(order) - order[::-1].index(1) - 1
        assert [s.generated_tokens for s in stats] == [16, 100, 100, 100, 100]
        assert [s.cached_tokens for s in stats] == [0, 50, 50, 50, 0]
        assert llm.generate(prompts[3], **options) == expected[3]  # slot 0's cache is as the list left it


def test_an_error_about_one_prompt_of_a_list_names_it(tiny_llama_f32):
    """A list's prompt that did not fit said "200 tokens exceed the context length of 64" (one of 8:
    which?), a bad token id or array in one said nothing of where; a conversation of chat()'s list
    that did not render neither; chat() given a generator of conversations consumed it while
    checking its items and said "prompt is empty"; a list of conversations holding something else
    said its "message 0 needs a 'role' string" (message 0 was a whole conversation). generate([]) blamed
    the tokenizer's BOS token."""
    from pyllm.chat_template import TemplateError
    from pyllm.errors import PyllmError

    with pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2, context_length=64) as llm:
        fine = "Paris is"
        for prompts, error, match in [
                ([fine, "x " * 100, fine], ValueError, "^prompt 1 of the list has 200 tokens; the context holds 64"),
                ([fine, fine, [5] * 64], ValueError, "^prompt 2 of the list has 64 tokens"),
                ([fine, [5, 9999]], PyllmError, r"^prompt 1 of the list: token ids must lie in \[0, 512\); got 9999"),
                ([[5, 6], np.array([[1, 2]])], PyllmError, r"^prompt 1 of the list: token ids must be a 1-D .* \(1, 2\)"),
                ([fine, "\ud800"], PyllmError, "^prompt 1 of the list: .*surrogate"),
                ([fine, None], TypeError, "item 1 of the list of prompts is NoneType None"),
                ([[5, 6], 7], TypeError, "item 1 of the list of prompts is int 7"),
                ([5, "b"], TypeError, "non-int items: item 1 is str 'b'")]:
            with pytest.raises(error, match=match):
                llm.generate(prompts, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"^prompt is empty: it has no tokens \(an empty list: neither"):
            llm.generate([], max_new_tokens=2)  # (was "(this model's tokenizer adds no BOS token)")
        with pytest.raises(PyllmError, match="^sequence 1 of the list: token ids must lie"):
            llm.logits_many([[5, 6], [5, -1]])
        with pytest.raises(PyllmError, match="^text 1 of the list: token ids must lie"):
            llm.embed([[5, 6], [5, -1]])
        with pytest.raises(PyllmError, match="^token ids must lie"):  # one text alone: not "of the list"
            llm.embed([5, -1])

        hello = [{"role": "user", "content": "Hello"}]
        for conversations, error, match in [
                ([hello, []], TemplateError, "^conversation 1 of the list: messages must be a non-empty list"),
                ([hello, hello[0]], TemplateError, "^conversation 1 of the list: messages must be"),
                ([hello, "Hello"], TemplateError, "^conversation 1 of the list: messages must be"),
                ([hello, [{"role": "user", "content": 5}]], TemplateError,
                 "^conversation 1 of the list: message 0: content must be"),
                ((c for c in [hello, hello]), TemplateError, "^messages must be a non-empty list")]:
            with pytest.raises(error, match=match):
                llm.chat(conversations, max_new_tokens=2)
        with pytest.raises(TypeError, match="^tools must be a list"):  # the call's fault, not a conversation's
            llm.chat([hello, hello], tools="f", max_new_tokens=2)
        assert llm.generate([fine, [5, 6]], max_new_tokens=2, temperature=0) == [
            llm.generate(fine, max_new_tokens=2, temperature=0), llm.generate([5, 6], max_new_tokens=2, temperature=0)]


def test_a_scheduler_s_row_budget_is_checked_as_n_parallel_is(tiny_llama_f32):
    """Scheduler(llm, np.int64(64)) said "must be an integer >= n_parallel (2); got 64", and True
    passed as a budget of 1 row (with n_parallel=1)."""
    from pyllm.scheduler import Scheduler

    with pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2, context_length=64) as llm:
        for bad in (True, np.bool_(True), 1, 0, 2.0, "64", None):
            with pytest.raises(ValueError, match="max_num_batched_tokens must be an integer >= n_parallel \\(2\\)"):
                Scheduler(llm, bad)
        assert llm.scheduler is None
        scheduler = Scheduler(llm, np.int64(64))
        try:
            assert scheduler.max_num_batched_tokens == 64 and type(scheduler.max_num_batched_tokens) is int
            assert llm.generate("Paris is", max_new_tokens=3, temperature=0) == \
                llm.generate(["Paris is"], max_new_tokens=3, temperature=0)[0]
        finally:
            scheduler.close()
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=64) as llm:
        with pytest.raises(ValueError, match="max_num_batched_tokens must be an integer >= n_parallel \\(1\\)"):
            Scheduler(llm, True)


class _OneSequenceEngine:
    """The CUDA engine as Python sees it, on the CPU: one sequence, and no rows of several sequences
    (forward_rows and copy_sequence raise as csrc/engine/engine.h's defaults do for it)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward_rows(self, *args, **kwargs):
        raise ValueError("the cuda engine runs one sequence at a time")

    copy_sequence = forward_rows


def test_lists_and_perplexity_run_on_an_engine_of_one_sequence(tiny_llama_f32):
    """The CUDA engine has no forward_rows: generate() and chat() with a list raised "the cuda engine
    runs one sequence at a time" at their first step, and so did logits_many, so `pyllm perplexity
    --device cuda` (one window per step there) failed at once. A list runs each prompt as it would
    run alone, in turn; logits_many one sequence at a time. A Scheduler is refused."""
    from pyllm.perplexity import perplexity

    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=128) as cpu:
        ban = {i: -100 for i in cpu.tokenizer.eos_ids}
        expected = [cpu.generate(p, max_new_tokens=8, temperature=0.7, seed=3, logit_bias=ban) for p in PROMPTS[:3]]
        tokens = cpu.tokenize("The quick brown fox jumps over the lazy dog. " * 30, add_special_tokens=False)
        reference = perplexity(cpu.logits, tokens, ctx=32, windows=3)
    llm = pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=128)
    llm.engine, llm.device = _OneSequenceEngine(llm.engine), "cuda"
    try:
        options = dict(max_new_tokens=8, temperature=0.7, seed=3, logit_bias=ban)
        assert llm.generate(PROMPTS[:3], **options) == expected
        stats = llm.last_batch_stats
        assert [s.generated_tokens for s in stats] == [8] * 3 and {s.finish_reason for s in stats} == {"length"}
        texts = [""] * 3
        for index, piece in llm.generate(PROMPTS[:3], stream=True, **options):
            texts[index] += piece
        assert texts == expected
        pieces = llm.generate(PROMPTS[:3], stream=True, **options)
        next(pieces)
        llm.cancel()  # ends the running prompt and the rest
        assert all(index == 0 for index, _ in pieces)
        assert [s.finish_reason for s in llm.last_batch_stats] == ["cancelled"] * 3
        pieces = llm.generate(PROMPTS[:3], stream=True, **options)
        next(pieces)
        pieces.close()  # closed by its consumer: the engine is free, the prompts not run say so
        assert [s.finish_reason for s in llm.last_batch_stats] == ["cancelled"] * 3
        assert llm.chat([[{"role": "user", "content": p}] for p in PROMPTS[:2]], max_new_tokens=4, temperature=0)
        many = perplexity(llm.logits, tokens, ctx=32, windows=3, logits_many=llm.logits_many, batch=2)
        assert many.window_nll == reference.window_nll
        assert llm.generate(PROMPTS[0], **options) == expected[0]
        from pyllm.scheduler import Scheduler

        with pytest.raises(ValueError, match="the cuda engine runs one sequence at a time: a Scheduler needs the CPU"):
            Scheduler(llm)  # (its streams each failed at their first step)
        assert llm.scheduler is None
    finally:
        llm.close()


def test_chat_with_a_list_of_conversations(model_file):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    with pyllm.LLM(model_file, n_threads=2) as alone:
        expected = [alone.chat(c, max_new_tokens=10, temperature=0) for c in conversations]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=3) as llm:
        assert llm.chat(conversations, max_new_tokens=10, temperature=0) == expected


def test_forward_rows_logits_match_the_single_sequence_path(model_file):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 400, n).astype(np.int32) for n in (5, 17, 300, 9)]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=4) as llm:
        single = [llm.logits(p) for p in prompts]
        many = llm.logits_many(prompts)
    for a, b in zip(many, single):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_a_step_of_many_sequences_at_different_depths_matches_each_alone(model_file):
    # one step: a decode row of each of 4 sequences (depths 5 .. 300: the deeper ones' keys are split
    # in chunks) beside a 40-row prompt chunk of a fifth; every sequence's logits as when it runs alone
    rng = np.random.default_rng(1)
    depths = [5, 130, 300, 70]
    with pyllm.LLM(model_file, n_threads=2, n_parallel=5) as llm:
        engine = llm.engine
        for seq, depth in enumerate(depths):
            engine.forward_rows(rng.integers(3, 400, depth).astype(np.int32), np.full(depth, seq, np.int32),
                                np.arange(depth, dtype=np.int32), np.array([depth - 1]))
        chunk = rng.integers(3, 400, 40).astype(np.int32)
        decode = rng.integers(3, 400, len(depths)).astype(np.int32)
        tokens = np.concatenate([decode[:2], chunk, decode[2:]])
        seq_ids = np.array([0, 1] + [4] * 40 + [2, 3], dtype=np.int32)
        positions = np.array(depths[:2] + list(range(40)) + depths[2:], dtype=np.int32)
        logit_rows = np.array([0, 1, 41, 42, 43])
        together = engine.forward_rows(tokens, seq_ids, positions, logit_rows)
        alone = [engine.forward_rows(tokens[r:r + 1], seq_ids[r:r + 1], positions[r:r + 1], np.array([0]))[0]
                 for r in (0, 1)]
        alone.append(engine.forward_rows(chunk, np.full(40, 4, np.int32), np.arange(40, dtype=np.int32),
                                         np.array([39]))[0])
        alone += [engine.forward_rows(tokens[r:r + 1], seq_ids[r:r + 1], positions[r:r + 1], np.array([0]))[0]
                  for r in (42, 43)]
    for a, b in zip(together, alone):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_forward_rows_and_copy_sequence_refuse_bad_rows(model_file):
    with pyllm.LLM(model_file, n_threads=1, n_parallel=2, context_length=64) as llm:  # noqa: SIM117
        e = llm.engine
        one = np.array([5], np.int32)
        with pytest.raises(IndexError, match="sequence 2"):
            e.forward_rows(one, np.array([2], np.int32), np.array([0], np.int32), np.array([0]))
        with pytest.raises(IndexError, match="position 64"):
            e.forward_rows(one, np.array([0], np.int32), np.array([64], np.int32), np.array([0]))
        with pytest.raises(ValueError, match="consecutive positions"):
            e.forward_rows(np.array([5, 6], np.int32), np.array([0, 0], np.int32), np.array([0, 2], np.int32), np.array([1]))
        with pytest.raises(ValueError, match="must be consecutive"):
            e.forward_rows(np.array([5, 6, 7], np.int32), np.array([0, 1, 0], np.int32), np.array([0, 0, 1], np.int32),
                           np.array([2]))
        with pytest.raises(ValueError, match="ascending"):
            e.forward_rows(np.array([5, 6], np.int32), np.array([0, 0], np.int32), np.array([0, 1], np.int32), np.array([1, 0]))
        with pytest.raises(IndexError, match="copy_sequence"):
            e.copy_sequence(0, 5, 3)
        with pytest.raises(IndexError, match="copy_sequence"):
            e.copy_sequence(0, 1, 65)
        # logit_rows are checked as the other index arrays are: a float is not truncated to a row
        for rows, match in ((np.array([0.7]), "logit_rows must be integers"), (np.array([2**40]), "logit_rows has a value"),
                            (np.array([-1]), "logit rows must be ascending")):
            with pytest.raises((ValueError, IndexError), match=match):
                e.forward_rows(one, np.array([0], np.int32), np.array([0], np.int32), rows)
        # a position near int64's end is named without overflowing while the message is written
        with pytest.raises(IndexError, match="1 token\\(s\\) from position 9223372036854775807 exceed"):
            e.forward(one, 2**63 - 1, False)
    for bad in (0, -1, 10**6, 2.5, True, np.bool_(True), np.float64(2.0)):
        with pytest.raises(ValueError, match="n_parallel"):
            pyllm.LLM(model_file, n_parallel=bad)
    # numpy's integers are integers (as generate's options accept them)
    with pyllm.LLM(model_file, n_threads=np.int32(1), n_parallel=np.int64(2), context_length=np.int64(20)) as llm:
        assert (llm.n_parallel, llm.context_length, llm.n_threads) == (2, 20, 1)
        assert type(llm.n_parallel) is int and type(llm.context_length) is int


def test_kv_caches_larger_than_memory_are_refused(model_file):
    with pytest.raises(ValueError, match="GiB of memory"):
        pyllm.LLM(model_file, n_parallel=256, context_length=2**24)
    with pytest.raises(ValueError, match="exceeds the limit"):
        pyllm.LLM(model_file, n_parallel=2, context_length=2**40)


def test_perplexity_of_batched_windows_equals_one_at_a_time(model_file):
    from pyllm.perplexity import perplexity

    with pyllm.LLM(model_file, n_threads=2, n_parallel=3) as llm:
        tokens = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 80, add_special_tokens=False)
        one = perplexity(llm.logits, tokens, ctx=64, windows=7)
        many = perplexity(llm.logits, tokens, ctx=64, windows=7, logits_many=llm.logits_many, batch=3)
    assert many.windows == one.windows == 7
    np.testing.assert_allclose(many.window_nll, one.window_nll, rtol=1e-5)


def test_perplexity_s_batch_is_checked_and_the_cli_opens_no_slot_past_its_windows(tiny_llama_f32, tmp_path,
                                                                                   monkeypatch, capsys):
    """perplexity(batch=2.5) was range()'s TypeError, batch="2" a comparison's; and `pyllm perplexity
    --windows 2 --parallel 64` opened 64 KV-cache slots (filled in at once: 6 GB for SmolLM2 at
    --ctx 4096) to use 2. The windows' scores are the same bits however many run together."""
    import pyllm.perplexity
    from pyllm import cli

    for batch in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            pyllm.perplexity.perplexity(lambda ids: None, list(range(64)), ctx=16, batch=batch)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    seen, real = [], pyllm.perplexity.perplexity
    monkeypatch.setattr(pyllm.perplexity, "perplexity",
                        lambda fn, tokens, **kw: (seen.append((kw["batch"], r := real(fn, tokens, **kw))), r)[1])
    for parallel, windows, used in (("64", "2", 2), ("3", "5", 3), ("1", "5", 1), ("4", None, 4)):
        argv = ["perplexity", tiny_llama_f32, "-t", "1", "--text", str(text), "-c", "16", "--parallel", parallel]
        assert cli.main(argv + (["--windows", windows] if windows else [])) == 0
        assert seen[-1][0] == used
    assert seen[1][1].window_nll == seen[2][1].window_nll  # 5 windows, 3 at a time or one at a time
    assert seen[1][1].perplexity == seen[2][1].perplexity
    for bad in ("0", "-2"):
        assert cli.main(["perplexity", tiny_llama_f32, "--text", str(text), "--windows", "2", "--parallel", bad]) == 1
        assert f"--parallel {bad}: n_parallel must be a positive integer" in capsys.readouterr().err
    capsys.readouterr()


class _PieceDecoder:
    """A StreamDecoder stand-in: token i gives pieces[i]; flush() gives `tail`."""

    tokenizer = types.SimpleNamespace(special_tokens=[])  # no special tokens for stop strings to name

    def __init__(self, pieces, tail=""):
        self.pieces, self.tail = pieces, tail
        self.emitted, self.begins = 0, []

    def push(self, token):
        self.begins = [self.emitted]
        self.emitted += len(self.pieces[token])
        return self.pieces[token]

    def flush(self):
        self.begins = []
        return self.tail


def test_stop_text_holds_back_what_may_start_a_stop_string():
    from pyllm.llm import StopText

    text = StopText(_PieceDecoder(["Hello", " wor", "ld", "!"]), ["world!"])
    assert text.push(0) == "Hello"
    assert text.push(1) == " "  # "wor" may begin "world!"
    assert text.push(2) == ""
    assert text.push(3) == "" and text.stopped
    assert text.finish() == ""  # nothing before the stop string is left, and no flush after a stop


def _partial_stop_reference(text: str, stop: list[str]) -> int:
    """The longest suffix of text that is a proper prefix of a stop string, by trying every length."""
    return max([n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])], default=0)


def test_stop_prefixes_follow_the_text_as_trying_every_prefix_does():
    """The held-back length (StopText's _StopPrefixes, a KMP automaton per stop string fed each
    token's text) equals the longest suffix of the text so far that begins a stop string, for
    periodic and overlapping stop strings fed in chunks of every size."""
    from pyllm.llm import _StopPrefixes

    rng = np.random.default_rng(7)
    for trial in range(400):
        alphabet = "ab" if trial % 2 else "abc"
        stop = ["".join(rng.choice(list(alphabet), rng.integers(1, 9))) for _ in range(rng.integers(1, 4))]
        if trial % 5 == 0:
            stop.append("")  # ignored, as _find_stop ignores it
        text, prefixes = "", _StopPrefixes(stop)
        while len(text) < 60:
            chunk = "".join(rng.choice(list(alphabet), rng.integers(0, 5)))
            if any(s and s in text + chunk for s in stop):
                break  # StopText stops at a whole stop string
            text += chunk
            assert prefixes.feed(chunk) == _partial_stop_reference(text, stop), (stop, text)


def test_stop_strings_long_and_many_cost_time_linear_in_the_text():
    """16 stop strings of 50,000 characters against text that keeps almost matching them: each
    token cost O(length^2) (0.49 s a token on the thread all streams share, a request could ask for
    it); now the text's characters once each. Work bound checked by time with a wide margin: the
    old check took ~25 s for these 50 tokens."""
    import time

    from pyllm.llm import StopText

    stop = ["a" * 25_000 + "x" + "a" * 25_000] * 15 + ["ab" * 25_000]
    pieces = ["a" * 1000] * 50
    text = StopText(_PieceDecoder(pieces), stop)
    start = time.perf_counter()
    out = "".join(text.push(i) for i in range(50))
    assert time.perf_counter() - start < 2.0
    assert out == "a" * 25_000 and text.held == "a" * 25_000  # held: the first stop strings' a-run


def test_stop_text_finish_flushes_and_finds_a_stop_completed_there():
    from pyllm.llm import StopText

    text = StopText(_PieceDecoder(["abc ", "EN"], tail="D tail"), ["END"])
    assert text.push(0) == "abc " and text.push(1) == ""
    assert text.finish() == "" and text.stopped  # "EN" + flushed "D" completes the stop string
    held = StopText(_PieceDecoder(["ab", "E"], tail="xyz"), ["END"])
    assert held.push(0) == "ab" and held.push(1) == ""
    assert held.finish(flush=False) == "E" and not held.stopped  # cancelled: what was held, no flush
    plain = StopText(_PieceDecoder(["ab", "E"], tail="xyz"), ["END"])
    plain.push(0), plain.push(1)
    assert plain.finish() == "Exyz" and not plain.stopped


def test_stop_text_lets_tokens_out_with_their_text_and_drops_a_stop_strings():
    """take_tokens() gives each token once its text is out; after a stop, the tokens whose text
    begins at or past the stop string never come (a stream listed the token that completed a stop
    string whose text it did not return)."""
    from pyllm.llm import StopText

    text = StopText(_PieceDecoder(["Hello", " wor", "ld", "!", "more"]), ["world!"])
    assert text.push(0, "r0") == "Hello" and text.take_tokens() == ["r0"]
    assert text.push(1, "r1") == " " and text.take_tokens() == ["r1"]  # its text begins with the " " out
    assert text.push(2, "r2") == "" and text.take_tokens() == []  # held: it may be the stop string's
    assert text.push(3, "r3") == "" and text.stopped and text.take_tokens() == []
    assert text.finish() == "" and text.take_tokens() == []  # " wor" began before the stop: r1 stays, r2 r3 go
    inside = StopText(_PieceDecoder(["ab", "cXY", "Z"]), ["XYZ"])  # a token with text on both sides of the cut
    assert inside.push(0) == "ab" and inside.push(1) == "c" and inside.push(2) == "" and inside.stopped
    assert inside.finish() == "" and inside.take_tokens() == [0, 1]  # ids stand in when no record is given
    first = StopText(_PieceDecoder(["", "EN", "D", "x"]), ["END"])  # a token without text, then the stop string
    assert [first.push(i) for i in range(3)] == ["", "", ""] and first.stopped
    assert first.finish() == "" and first.take_tokens() == []
    flushed = StopText(_PieceDecoder(["abc ", "EN"], tail="D tail"), ["END"])
    flushed.push(0), flushed.push(1)
    assert flushed.finish() == "" and flushed.take_tokens() == [0]  # the stop string completed in the flush
    plain = StopText(_PieceDecoder(["ab", "E", ""], tail="xyz"), ["END"])
    assert [plain.push(i) for i in range(3)] == ["ab", "", ""] and plain.take_tokens() == [0]
    assert plain.finish() == "Exyz" and plain.take_tokens() == [1, 2]  # no stop: every token comes out


# -- one sequence's logits, however its rows are run ------------------------------------------------

INVARIANCE_MODELS = [  # (family, case, overrides, KV cache types): plain, sliding window + soft-capping, ALiBi
    ("llama", "gqa", dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024),
     ["f32", "f16", "q8_0"]),  # head_dim 32: q8_0 blocks
    ("mistral", "window24", dict(max_position_embeddings=1024), ["f16"]),
    ("gemma2", "softcap_window", dict(max_position_embeddings=1024), ["f16"]),
    ("bloom", "heads4", {}, ["f32"]),
]


@pytest.fixture(scope="module", params=INVARIANCE_MODELS, ids=lambda m: m[0])
def invariance_model(request, tmp_path_factory):
    from families import make_tiny_model

    family, case, overrides, caches = request.param
    base = make_tiny_model(family, case, str(tmp_path_factory.mktemp(f"inv_{family}")), seed=3, **overrides)
    out = str(tmp_path_factory.mktemp(f"inv_{family}_pllm") / "int8.pllm")
    convert_checkpoint(base, out, quant="int8", progress=False)
    return out, caches


def test_a_sequence_s_logits_are_the_same_bits_however_its_rows_are_run(invariance_model):
    """Attention folds its keys in pieces at fixed positions (ops.cpp kAttentionPiece), so a
    sequence's logits do not depend on how its prompt is chunked (one row at a time, as a decode
    step reads it; 2, 3, 17, 70, 256 or 300 rows; all at once), on the rows of other sequences beside it or on
    the thread count: the same bits. A seeded request's text then never depends on its neighbours,
    a prefix reused from another slot equals the prefix computed afresh, and a stream re-reading its
    tokens after a preemption continues as it would have."""
    path, caches = invariance_model
    # 600 positions: three of attention's 256-key pieces, so that decode rows split them among tasks
    tokens = np.random.default_rng(5).integers(3, 500, 600).astype(np.int32)
    others = np.random.default_rng(6).integers(3, 500, 600).astype(np.int32)
    for kv_cache in caches:
        results = {}
        for n_threads in (1, 2, 3):
            with pyllm.LLM(path, n_threads=n_threads, n_parallel=2, context_length=1024, kv_cache=kv_cache) as llm:
                engine = llm.engine
                for chunk in (600, 1, 2, 3, 17, 70, 256, 300):
                    if n_threads != 2 and chunk not in (600, 1):
                        continue
                    for start in range(0, len(tokens), chunk):
                        rows = tokens[start:start + chunk]
                        n = len(rows)
                        # beside the rows of another sequence, at other positions, every other chunk
                        beside = (start // chunk) % 2 == 1
                        seq = np.zeros(n, np.int32)
                        pos = np.arange(start, start + n, dtype=np.int32)
                        if beside:
                            rows = np.concatenate([others[start:start + 3], rows])
                            seq = np.concatenate([np.ones(len(rows) - n, np.int32), seq])
                            pos = np.concatenate([np.arange(start, start + len(rows) - n, dtype=np.int32), pos])
                        logits = engine.forward_rows(rows, seq, pos, np.array([len(rows) - 1]))[0]
                    results[(n_threads, chunk)] = logits.copy()
        reference = results[(2, 600)]
        assert np.isfinite(reference).all()
        for key, logits in results.items():
            assert np.array_equal(logits, reference), (
                f"{kv_cache} cache, {key[0]} threads, chunks of {key[1]}: max difference "
                f"{np.abs(logits - reference).max():.3g}")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kernel_version() -> tuple[int, ...]:
    """The running kernel's version as numbers ("5.4.0-150-generic" -> (5, 4, 0)): compared as a
    string, "5.4" sorts after "5.14" and "10.1" before it."""
    import re

    return tuple(int(n) for n in re.match(r"[0-9.]*", os.uname().release).group().strip(".").split(".") if n)


def test_kernel_versions_compare_as_numbers(monkeypatch):
    for release, version in [("5.4.0-150-generic", (5, 4, 0)), ("6.18.44-fc-v657", (6, 18, 44)), ("10.1", (10, 1))]:
        monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", release, "", "x86_64")))
        assert _kernel_version() == version
    assert (5, 4, 0) < (5, 14) < (10, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_the_kv_cache_s_pages_are_filled_in_before_first_use(model_file):
    """The CPU engine fills in the KV cache's pages with a background thread (csrc/core/populate.h):
    a fresh slot's first prefill, or a shared prefix copied into it, used to stop on page faults
    (200-460 ms a slot at a 4096 context with huge pages on a 2-core VM). Resident memory grows by
    the cache without a forward call; the results are those of an engine that never populated."""
    if _kernel_version() < (5, 14):  # pragma: no cover - older kernels fault pages in on first use
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    if os.environ.get("PYLLM_HUGE_PAGES") == "0":  # pragma: no cover - the test below is that case
        pytest.skip("PYLLM_HUGE_PAGES=0: the cache is resident as used")
    before = _resident_bytes()
    with pyllm.LLM(model_file, n_threads=1, n_parallel=128, context_length=1024) as llm:  # 34-68 MB
        deadline = time.monotonic() + 120
        while not llm.engine.kv_cache_populated and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.engine.kv_cache_populated
        grown = _resident_bytes() - before
        assert grown >= 0.9 * llm.engine.kv_cache_bytes, (grown, llm.engine.kv_cache_bytes)
        populated = llm.generate(PROMPTS[:4], max_new_tokens=6)
    for _ in range(3):  # closed while the thread still runs: it stops, nothing hangs or crashes
        pyllm.LLM(model_file, n_threads=1, n_parallel=64, context_length=1024).close()
    with pyllm.LLM(model_file, n_threads=1, n_parallel=4, context_length=1024) as llm:
        assert llm.generate(PROMPTS[:4], max_new_tokens=6) == populated  # at once, while it populates


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_without_huge_pages_the_kv_cache_stays_resident_as_used(model_file, off):
    """PYLLM_HUGE_PAGES=0 keeps 4 KiB pages touched only as positions are written (docs/ARCHITECTURE.md):
    nothing is filled in, so n_parallel slots never used cost address space, not memory. (The
    environment is read once a process: a fresh one.)"""
    import subprocess

    code = (
        "import time, pyllm\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * 4096\n"
        "before = rss()\n"
        f"llm = pyllm.LLM({str(model_file)!r}, n_threads=1, n_parallel=128, context_length=2048)\n"
        "deadline = time.monotonic() + 60\n"
        "while not llm.engine.kv_cache_populated and time.monotonic() < deadline: time.sleep(0.01)\n"
        "time.sleep(0.5)\n"
        "print(llm.engine.kv_cache_populated, rss() - before, llm.engine.kv_cache_bytes)\n")
    env = {**os.environ, "PYLLM_HUGE_PAGES": off}  # ("off" and "False" were on: only "0" was off)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    populated, grown, cache = out.stdout.split()
    assert populated == "True"
    assert int(grown) < 0.3 * int(cache), f"{int(grown) >> 20} MiB of a {int(cache) >> 20} MiB cache made resident"


def test_an_llm_whose_construction_fails_lets_its_engine_go_at_once(model_file, monkeypatch):
    """An error after the engine was made (an adapter the file lacks, a tokenizer that cannot be
    read) left the half-made LLM, engine and all, to the error's traceback: an error kept (for a log,
    in a REPL's sys.last_value) held the KV cache, which is filled in from the engine's creation (1.5
    GiB for SmolLM2 at 8 x 8192). The engine and the file are let go before the error is raised; an
    adapter the file lacks is refused before an engine is made."""
    import traceback

    from pyllm.formats.safetensors import FormatError
    from pyllm.llm import _TokenizerLoader

    def half_made(error):
        return [frame.f_locals["self"] for frame, _ in traceback.walk_tb(error.__traceback__)
                if isinstance(frame.f_locals.get("self"), pyllm.LLM)]

    with pytest.raises(ValueError, match="has no adapter 'nope'") as e:
        pyllm.LLM(model_file, n_threads=1, n_parallel=4, context_length=256, adapter="nope")
    assert half_made(e.value) and all(llm.engine is None for llm in half_made(e.value))

    def unreadable(self):
        raise FormatError("the embedded tokenizer cannot be read (test)")
    monkeypatch.setattr(_TokenizerLoader, "result", unreadable)
    with pytest.raises(FormatError, match="cannot be read") as e:
        pyllm.LLM(model_file, n_threads=1, n_parallel=4, context_length=256)
    assert half_made(e.value) and all(llm.engine is None for llm in half_made(e.value))
    monkeypatch.undo()
    with pyllm.LLM(model_file, n_threads=1, context_length=256) as llm:  # the file is still usable
        assert llm.generate(PROMPTS[0], max_new_tokens=2)


def test_a_list_holds_each_prompt_to_the_grammar_as_it_would_be_alone(tiny_llama_f32):
    """Structured output on a list of prompts was refused ("apply to one prompt at a time"): each
    prompt now has its own grammar state and gives what it gives alone (seeded sampling, so the
    grammar's mask decides much of each text); a grammar fails at the call, before any step."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    import json

    from pyllm.structured import GrammarInvalid

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    prompts = PROMPTS[:5]
    with pyllm.LLM(tiny_llama_f32, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=40, temperature=1.0, seed=7, response_format=fmt) for p in prompts]
        yes_no = [alone.generate(p, max_new_tokens=8, temperature=1.0, seed=3, grammar='start: "yes" | "no"')
                  for p in prompts]
    for text in expected:
        jsonschema.validate(json.loads(text), schema)
    with pyllm.LLM(tiny_llama_f32, n_threads=2, n_parallel=3) as llm:  # (more prompts than slots)
        assert llm.generate(prompts, max_new_tokens=40, temperature=1.0, seed=7, response_format=fmt) == expected
        got = [""] * len(prompts)
        for index, piece in llm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3,
                                         grammar='start: "yes" | "no"', stream=True):
            got[index] += piece
        assert got == yes_no
        with pytest.raises(GrammarInvalid, match="unclosed group"):
            llm.generate(prompts, response_format={"type": "regex", "regex": "(("})
        with pytest.raises(ValueError, match="response_format type must be one of"):
            llm.generate(prompts, response_format={"type": "yaml"})
        for no_type in ({}, {"schema": {"type": "object"}}):  # ({} ran unconstrained, in silence)
            with pytest.raises(ValueError, match="response_format needs a 'type'"):
                llm.generate(prompts, response_format=no_type)
        assert len(llm.generate(prompts, max_new_tokens=2, response_format={"type": "text"})) == len(prompts)


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # (cuda: the path that runs a list one prompt at a time)
def test_a_grammar_one_prompt_of_a_list_cannot_follow_ends_that_prompt_alone(tiny_llama_f32, device):
    """A grammar that fails in one prompt of a list (here a processor after it lets a token the grammar
    refuses through) ended the list with "the grammar cannot be followed", leaving which of the prompts
    to guess, and the other prompts' texts were lost; now that prompt ends alone (finish_reason
    "error"), the others run to their end, and the error, naming the prompt, is raised after them
    with .errors and .texts; streamed, the pieces of every prompt come first. Two failing prompts:
    the first is raised, saying there are more. The engine's next calls give what they give alone. A
    caller's processor's own exception still comes out as itself and ends the list
    (test_a_callback_s_exception_comes_out_as_itself)."""
    pytest.importorskip("llguidance")
    from pyllm.errors import PyllmError
    from pyllm.structured import GrammarError

    grammar = "start: /[a-z]{1,10}/"
    with pyllm.LLM(tiny_llama_f32, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=6, temperature=0, grammar=grammar) for p in PROMPTS[:5]]
        targets = [alone.tokenize(p) for p in PROMPTS[:5]]
        digit = alone.tokenize("7", add_special_tokens=False)[0]

    def rogue_in(*which):  # the second token of prompts `which`: a digit
        def rogue(ids, scores):
            if any(ids[:len(targets[k])] == targets[k] and len(ids) == len(targets[k]) + 1 for k in which):
                scores[:] = -np.inf
                scores[digit] = 0
            return scores
        return rogue

    with pyllm.LLM(tiny_llama_f32, n_threads=2, n_parallel=2) as llm:
        llm.device = device
        with pytest.raises(GrammarError, match="^prompt 2 of the list: the grammar cannot be followed") as raised:
            llm.generate(PROMPTS[:5], max_new_tokens=6, temperature=0, grammar=grammar,
                         logits_processors=[rogue_in(2)])
        assert set(raised.value.errors) == {2} and raised.value.errors[2] is raised.value
        texts = raised.value.texts
        assert [texts[i] for i in (0, 1, 3, 4)] == [expected[i] for i in (0, 1, 3, 4)]
        assert len(texts[2]) < len(expected[2]) or texts[2] != expected[2]
        reasons = [s.finish_reason for s in llm.last_batch_stats]
        assert reasons[2] == "error" and "error" not in reasons[:2] + reasons[3:] and "cancelled" not in reasons
        llm.device = "cuda" if device == "cpu" else "cpu"  # the other path: the same texts, the failed one's too
        with pytest.raises(GrammarError) as again:
            llm.generate(PROMPTS[:5], max_new_tokens=6, temperature=0, grammar=grammar,
                         logits_processors=[rogue_in(2)])
        llm.device = device
        assert again.value.texts == texts

        def fails_at_the_second_step(ids, scores):  # every prompt, its first token out (held back, if it is
            if any(ids[:len(t)] == t and len(ids) == len(t) + 1 for t in targets):  # a part of a character)
                raise PyllmError("mine")
            return scores

        failed = {}
        for path in ("cpu", "cuda"):
            llm.device = path
            with pytest.raises(PyllmError, match="^prompt 0 of the list: mine") as raised:
                llm.generate(PROMPTS[:5], max_new_tokens=6, temperature=0, logits_processors=[fails_at_the_second_step])
            failed[path] = (raised.value.texts, sorted(raised.value.errors))
        llm.device = device
        assert failed["cpu"] == failed["cuda"] and failed["cpu"][1] == [0, 1, 2, 3, 4]
        # streamed: every other prompt's pieces, then the error
        stream = llm.generate(PROMPTS[:5], max_new_tokens=6, temperature=0, grammar=grammar,
                              logits_processors=[rogue_in(2)], stream=True)
        streamed = [""] * 5
        with pytest.raises(GrammarError, match="^prompt 2 of the list"):
            for index, piece in stream:
                streamed[index] += piece
        assert [streamed[i] for i in (0, 1, 3, 4)] == [expected[i] for i in (0, 1, 3, 4)]
        assert stream.stats[2].finish_reason == "error"
        # two of them: the first raised, the other named
        with pytest.raises(GrammarError, match=r"^prompt 1 of the list: the grammar cannot") as raised:
            llm.generate(PROMPTS[:5], max_new_tokens=6, temperature=0, grammar=grammar,
                         logits_processors=[rogue_in(1, 3)])
        assert set(raised.value.errors) == {1, 3} and raised.value.errors[1] is raised.value
        if sys.version_info >= (3, 11):
            assert raised.value.__notes__ == ["and 1 more: prompts [3] (see .errors)"]
        assert [raised.value.texts[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
        assert llm.generate(PROMPTS[:4], max_new_tokens=6, temperature=0, grammar=grammar) == expected[:4]
        assert llm.generate(PROMPTS[2], max_new_tokens=6, temperature=0, grammar=grammar) == expected[2]
        # last_stats stays the last single call's on either path (the one-at-a-time path set it to the
        # list's last prompt's)
        single = llm.last_stats
        llm.generate(PROMPTS[:3], max_new_tokens=2, temperature=0)
        assert llm.last_stats is single


def test_a_list_runs_the_callers_stateless_processors_on_each_prompt(tiny_llama_f32):
    """A list's logits processors serve every prompt, each called with that prompt's own ids; one
    with an accept(token) method (state that follows one prompt) is refused."""
    def no_repeat(ids, scores):  # bans the last token: reads only the ids it is given
        scores[ids[-1]] = -np.inf
        return scores

    with pyllm.LLM(tiny_llama_f32, n_threads=2) as alone:
        expected = [alone.generate(p, max_new_tokens=16, temperature=0, logits_processors=[no_repeat])
                    for p in PROMPTS]
        plain = [alone.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS]
    assert expected != plain  # (the processor changes something, or this test proves nothing)
    with pyllm.LLM(tiny_llama_f32, n_threads=2, n_parallel=4) as llm:
        assert llm.generate(PROMPTS, max_new_tokens=16, temperature=0, logits_processors=[no_repeat]) == expected

        class Counting:
            def __call__(self, ids, scores):
                return scores

            def accept(self, token):
                pass

        with pytest.raises(ValueError, match=r"accept\(token\) method \(Counting\) follows one prompt's tokens"):
            llm.generate(PROMPTS, max_new_tokens=2, logits_processors=[Counting()])


def test_a_list_records_each_prompts_tokens_and_logprobs_as_its_stream_would(model_file):
    """logprobs were refused for a list; last_batch_tokens[i] now holds prompt i's token records, as
    TextStream.tokens holds a single stream's: the same ids, log-probabilities (f32: the same logits
    within 1e-5) and alternatives, streamed or not, a stop string's tokens left out as its text is."""
    with pyllm.LLM(model_file, n_threads=2) as alone:
        plain = [alone.generate(p, max_new_tokens=12, temperature=0) for p in PROMPTS]
        stop = [next(t[len(t) // 2] for t in plain if len(t) > 4 and not t[len(t) // 2].isspace())]
        expected = []
        for p in PROMPTS:
            stream = alone.generate(p, max_new_tokens=12, temperature=0, logprobs=3, stream=True, stop=stop)
            text = "".join(stream)
            expected.append((text, stream.tokens))
    assert any(stream_tokens and len(stream_tokens) < 12 for _, stream_tokens in expected)  # (a stop string cut some)
    with pyllm.LLM(model_file, n_threads=2, n_parallel=3) as llm:
        for stream in (False, True):
            got = llm.generate(PROMPTS, max_new_tokens=12, temperature=0, logprobs=3, stop=stop, stream=stream)
            if stream:
                texts = [""] * len(PROMPTS)
                for index, piece in got:
                    texts[index] += piece
            else:
                texts = got
            records = llm.last_batch_tokens
            assert len(records) == len(PROMPTS)
            for i, (text, want) in enumerate(expected):
                assert texts[i] == text
                assert [t.id for t in records[i]] == [t.id for t in want], i
                for a, b in zip(records[i], want):
                    assert a.logprob == pytest.approx(b.logprob, abs=2e-4)
                    assert [k for k, _ in a.top] == [k for k, _ in b.top] and len(a.top) == 3
        llm.generate(PROMPTS[:2], max_new_tokens=3, temperature=0)  # without logprobs: the ids, no log-probabilities
        assert all(len(r) == 3 and all(t.logprob is None for t in r) for r in llm.last_batch_tokens)


def test_a_list_s_stream_keeps_its_own_stats_and_tokens_and_cancels_alone(tiny_llama_f32):
    """llm.last_batch_stats / last_batch_tokens name the last list given, and a list's stream had no records
    of its own: a thread reading its list while another thread's list ran could not tell its prompts' stats
    and tokens from the other's, and could stop it only with llm.cancel(), which ends whichever call holds
    the engine (the other list). A list's stream now has stats, tokens and cancel() of its own, as a
    TextStream has (on the one-prompt-at-a-time path too)."""
    a_prompts, b_prompts = [[10, 11, 12], [13, 14]], [[20, 21, 22, 23], [24, 25], [26, 27]]
    options = dict(max_new_tokens=6, temperature=0)
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        expected = {}
        for name, prompts, logprobs in (("a", a_prompts, 2), ("b", b_prompts, 0)):
            streams = [alone.generate(p, stream=True, logprobs=logprobs, logit_bias=ban, **options) for p in prompts]
            expected[name] = [("".join(s), [(t.id, [i for i, _ in t.top or []]) for t in s.tokens]) for s in streams]
    for device in ("cpu", "cuda"):  # ("cuda": each prompt in turn, as the CUDA engine's lists run)
        with pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2) as llm:
            llm.device = device
            a = llm.generate(a_prompts, stream=True, logprobs=2, logit_bias=ban, **options)
            b = llm.generate(b_prompts, stream=True, logprobs=0, logit_bias=ban, **options)
            assert llm.last_batch_stats is b.stats and llm.last_batch_tokens is b.tokens
            got = {"a": ["", ""], "b": ["", "", ""]}
            streams = {"a": a, "b": b}
            while streams:  # read in turn: each takes the engine from the other (the same thread's: at once)
                for name, stream in list(streams.items()):
                    try:
                        index, piece = next(stream)
                        got[name][index] += piece
                    except StopIteration:
                        del streams[name]
            for name, stream in (("a", a), ("b", b)):
                assert [(text, [(t.id, [i for i, _ in t.top or []]) for t in tokens])
                        for text, tokens in zip(got[name], stream.tokens)] == expected[name], (device, name)
                assert [s.generated_tokens for s in stream.stats] == [6] * len(stream.stats), (device, name)
                assert {s.finish_reason for s in stream.stats} == {"length"}, (device, name)
            # one list cancelled while the other holds the engine: it alone ends
            a = llm.generate(a_prompts, stream=True, logit_bias=ban, **options)
            b = llm.generate(b_prompts, stream=True, logit_bias=ban, **options)
            next(a)
            first = next(b)  # (b holds the engine)
            a.cancel()
            assert len(list(a)) <= 1 and "cancelled" in {s.finish_reason for s in a.stats}, device
            texts = ["", "", ""]
            for index, piece in [first, *b]:
                texts[index] += piece
            assert texts == [text for text, _ in expected["b"]] and {s.finish_reason for s in b.stats} == {"length"}


def _closed_behind_a_list(llm, listed, readers, close) -> float:
    """Starts readers[0] (reading the list `listed`), then, once the list runs, readers[1] (a scheduled
    stream's); calls close() once the scheduler's thread waits for its turn behind the list; returns how
    long close() took, once both readers have ended."""
    readers[0].start()
    while not listed.stats[0].generated_tokens:
        time.sleep(0.01)
    readers[1].start()
    while not llm._waiting:  # the scheduler's thread waits for its turn
        time.sleep(0.01)
    start = time.perf_counter()
    close()
    took = time.perf_counter() - start
    for reader in readers:
        reader.join(60)
    return took


def test_close_with_a_scheduler_attached_cancels_a_list_it_waits_for(tiny_llama_f32):
    """close() stopped an attached scheduler first, waiting for its thread, which waited for its turn at the
    engine behind a list another thread was reading: close() returned once the whole list had run (up to
    the scheduler's 30 s join), the list never cancelled. The list is now cancelled at once; the scheduled
    stream ends "cancelled", the list's reader gets RuntimeError (a closed LLM's stream, as without a
    scheduler) or its end."""
    from pyllm.scheduler import Scheduler

    llm = pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2)
    ban = {i: -100 for i in llm.tokenizer.eos_ids}
    Scheduler(llm)
    ended = {}
    listed = llm.generate([[5, 6, 7]] * 8, stream=True, max_new_tokens=200, logit_bias=ban)
    single = llm.generate([9, 10, 11], stream=True, max_new_tokens=200, logit_bias=ban)

    def read(name, stream, pause):
        try:
            for _ in stream:
                time.sleep(pause)  # (well within PREEMPT_AFTER: the list keeps the engine)
            ended[name] = "end"
        except RuntimeError as e:
            ended[name] = str(e)

    readers = [threading.Thread(target=read, args=("list", listed, 0.02)),
               threading.Thread(target=read, args=("single", single, 0))]
    took = _closed_behind_a_list(llm, listed, readers, llm.close)
    assert took < 2, took
    assert ended == {"list": ended["list"], "single": "end"} and ended["list"] in ("end", "this LLM is closed")
    assert "cancelled" in {s.finish_reason for s in listed.stats} and single.stats.finish_reason == "cancelled"
    assert sum(s.generated_tokens for s in listed.stats) < 8 * 200


def test_a_scheduler_closed_while_its_thread_waits_behind_a_list_stops_at_once(tiny_llama_f32):
    """Scheduler.close() (detaching it, the LLM kept) joined its thread, which waited for its turn at the
    engine behind a list another thread was reading: it returned once the whole list had run, or left
    the thread behind after 30 s. The thread now stops waiting; the list goes on, its texts whole."""
    from pyllm.scheduler import Scheduler

    prompts = [[5, 6, 7]] * 8
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as alone:
        ban = {i: -100 for i in alone.tokenizer.eos_ids}
        expected = [alone.generate(p, max_new_tokens=200, temperature=0, logit_bias=ban) for p in prompts]
    with pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2) as llm:
        scheduler = Scheduler(llm)
        listed = llm.generate(prompts, stream=True, max_new_tokens=200, temperature=0, logit_bias=ban)
        single = llm.generate([9, 10, 11], stream=True, max_new_tokens=200, logit_bias=ban)
        texts, ended = [""] * len(prompts), []

        def read_list():
            for index, piece in listed:
                texts[index] += piece
                time.sleep(0.02)  # (well within PREEMPT_AFTER: the list keeps the engine)

        readers = [threading.Thread(target=read_list), threading.Thread(target=lambda: ended.append(list(single)))]
        took = _closed_behind_a_list(llm, listed, readers, scheduler.close)
        assert took < 2 and not scheduler._thread.is_alive() and llm.scheduler is None, took
        assert single.stats.finish_reason == "cancelled"
        assert texts == expected and {s.finish_reason for s in listed.stats} == {"length"}


def test_a_scheduler_letting_a_waiting_call_in_stops_waiting_when_closed(tiny_llama_f32):
    """The scheduler's thread lets a call waiting for the engine take one turn first, waiting up to a
    second for it; close() (_stop) ended that wait only at its timeout. It ends at once now."""
    from pyllm.scheduler import Scheduler

    with pyllm.LLM(tiny_llama_f32, n_threads=1, n_parallel=2) as llm:
        scheduler = Scheduler(llm)
        with llm._lock:
            llm._waiting += 1  # a caller that waits and has not taken its turn yet
        try:
            waited = threading.Thread(target=scheduler._let_others_in)
            waited.start()
            time.sleep(0.1)
            started = time.monotonic()
            scheduler._stop()
            waited.join(2)
            assert not waited.is_alive() and time.monotonic() - started < 0.5
        finally:
            with llm._lock:
                llm._waiting -= 1
            scheduler.close()


def test_a_stream_closed_or_dropped_before_its_first_read_says_cancelled(tiny_llama_f32):
    """A stream (a list's, or one prompt's) closed or dropped before its first read never ran its
    generator, whose `finally` sets the unfinished prompts' finish_reason: it stayed "". It says
    "cancelled" now, held the engine never, and the next call runs."""
    import gc

    with pyllm.LLM(tiny_llama_f32, n_threads=2, n_parallel=2) as llm:
        expected = llm.generate(PROMPTS[:3], max_new_tokens=3, temperature=0)
        stream = llm.generate(PROMPTS[:3], max_new_tokens=3, temperature=0, stream=True)
        stream.close()
        assert [s.finish_reason for s in stream.stats] == ["cancelled"] * 3
        stream = llm.generate(PROMPTS[:3], max_new_tokens=3, temperature=0, stream=True)
        stats = stream.stats
        del stream
        gc.collect()
        assert [s.finish_reason for s in stats] == ["cancelled"] * 3
        one = llm.generate(PROMPTS[0], max_new_tokens=3, temperature=0, stream=True)
        one.close()
        assert one.stats.finish_reason == "cancelled"
        one = llm.generate(PROMPTS[0], max_new_tokens=3, temperature=0, stream=True)
        single = one.stats
        del one
        gc.collect()
        assert single.finish_reason == "cancelled"
        assert llm.generate(PROMPTS[:3], max_new_tokens=3, temperature=0) == expected
        # read to the end, its own reason stays
        stream = llm.generate(PROMPTS[:3], max_new_tokens=3, temperature=0, stream=True)
        assert sorted(i for i, _ in stream) and stream.close() is None
        assert [s.finish_reason for s in stream.stats] == ["length"] * 3
