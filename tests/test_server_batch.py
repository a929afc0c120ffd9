"""`pyllm serve --parallel N` (continuous batching, pyllm/scheduler.py) against the official openai
client, on live servers on 127.0.0.1.

The reference is always the same file run one request at a time (an LLM with n_parallel=1, or a
server over it): under concurrency every answer must be the one it gives alone."""

from __future__ import annotations

import collections
import gc
import os
import threading
import time

import numpy as np
import pytest

import pyllm

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

from pyllm.convert import convert_checkpoint  # noqa: E402

from conftest import TRAINING_TEXT, make_tiny_llama  # noqa: E402
from test_server import LiveServer, _get  # noqa: E402

PROMPTS = ["Paris is the capital of", "def main():", "中文测试：今天", "The quick brown fox", "Emoji 😀",
           "Berlin is", "café naïve", "print('hello"]
CONTEXT = 1024


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("serve_batch_base")), seed=11,
                           max_position_embeddings=CONTEXT)


def _convert(base, tmp_path_factory, quant: str) -> str:
    out = str(tmp_path_factory.mktemp("serve_batch") / f"{quant}.pllm")
    convert_checkpoint(base, out, quant=quant, progress=False)
    return out


@pytest.fixture(scope="module")
def f32_file(base, tmp_path_factory):
    return _convert(base, tmp_path_factory, "f32")


@pytest.fixture(scope="module")
def alone(f32_file):
    """The reference: the same file, one request at a time."""
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT) as llm:
        yield llm


@pytest.fixture(scope="module")
def batched(f32_file):
    """A server running 4 requests together with 32 rows per step (so prompts are chunked)."""
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=4) as llm:
        server = LiveServer(llm, max_num_batched_tokens=32)
        yield server
        server.stop()


def _no_eos(llm) -> dict:
    """logit_bias that bans the model's end tokens: replies run to max_tokens."""
    return {str(i): -100 for i in llm.tokenizer.eos_ids}


def _together(work, items) -> list:
    """work(item) for every item at once, each in a thread; the results in order (errors raised)."""
    results, errors = [None] * len(items), []

    def run(i):
        try:
            results[i] = work(items[i])
        except Exception as e:  # pragma: no cover - raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def _idle(server, timeout: float = 10.0) -> dict:
    """/health once no request runs or waits and every slot is free (fails after timeout)."""
    deadline = time.time() + timeout
    while True:
        health = _get(server.url + "/health")
        if health["requests"] == 0 and health["slots_processing"] == 0:
            return health
        assert time.time() < deadline, f"the server did not go idle: {health}"
        time.sleep(0.02)


@pytest.mark.parametrize("quant", ["f32", "int8"])
def test_greedy_answers_under_concurrency_equal_the_sequential_ones(base, tmp_path_factory, quant):
    path = _convert(base, tmp_path_factory, quant)
    with pyllm.LLM(path, n_threads=1, context_length=CONTEXT) as one:
        expected = [one.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS]
        chats = [[{"role": "user", "content": p}] for p in PROMPTS]
        expected_chat = [one.chat(m, max_new_tokens=24, temperature=0) for m in chats]
    with pyllm.LLM(path, n_threads=1, context_length=CONTEXT, n_parallel=4) as llm:
        server = LiveServer(llm, max_num_batched_tokens=16)
        try:
            client = server.client()

            def complete(i):  # half stream, half not; 8 requests on 4 slots: some wait their turn
                if i % 2:
                    chunks = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=24, temperature=0,
                                                       stream=True)
                    return "".join(c.choices[0].text for c in chunks if c.choices)
                return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=24,
                                                 temperature=0).choices[0].text

            assert _together(complete, list(range(8))) == expected
            chat = _together(lambda m: client.chat.completions.create(model="tiny", messages=m, max_tokens=24,
                                                                      temperature=0).choices[0].message.content, chats)
            assert chat == expected_chat
            assert max(len(s.rows) for s in server.api.scheduler.recent_steps) > 1  # they did run together
            _idle(server)
        finally:
            server.stop()


def test_seeded_sampling_does_not_depend_on_its_neighbours(batched, alone):
    client = batched.client()
    ask = dict(model="tiny", max_tokens=24, temperature=1.0, top_p=0.95)
    expected = alone.generate(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    by_itself = client.completions.create(prompt=PROMPTS[0], seed=1234, **ask).choices[0].text
    assert by_itself == expected
    # the same request beside seven others that sample with their own seeds, twice
    for round_seed in (1, 2):
        answers = _together(lambda i: client.completions.create(prompt=PROMPTS[i], seed=1234 if i == 0 else round_seed + i,
                                                                **ask).choices[0].text, list(range(8)))
        assert answers[0] == expected
        assert answers[1:] == [alone.generate(PROMPTS[i], max_new_tokens=24, temperature=1.0, top_p=0.95,
                                              seed=round_seed + i) for i in range(1, 8)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the process's memory from /proc")
def test_sixteen_streams_half_disconnecting_three_rounds(batched, alone):
    """Survivors get their exact answers, leavers are cancelled (each stopped long before the ~1000
    tokens it asked for, the whole context), every slot is free after each round, and memory stays
    flat."""
    client = batched.client()
    scheduler = batched.api.scheduler
    ban = _no_eos(alone)
    expected = {i: alone.generate(PROMPTS[i % 8], max_new_tokens=40, temperature=0,
                                  logit_bias={int(k): v for k, v in ban.items()}) for i in range(0, 16, 2)}

    def stream(i):
        leaves = i % 2 == 1
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=1000 if leaves else 40,
                                           temperature=0, logit_bias=ban, stream=True)
        text = ""
        for n, c in enumerate(chunks):
            text += c.choices[0].text if c.choices else ""
            if leaves and n == 2:
                chunks.close()  # the client goes away mid-stream
                return None
        return text

    rss = []
    for _ in range(3):
        before = {id(f) for f in scheduler.recent_finished}
        answers = _together(stream, list(range(16)))
        assert {i: answers[i] for i in range(0, 16, 2)} == expected
        assert all(answers[i] is None for i in range(1, 16, 2))
        _idle(batched)
        finished = [f for f in scheduler.recent_finished if id(f) not in before]
        left = [f for f in finished if f.finish_reason == "cancelled"]
        assert len(left) == 8 and all(f.generated_tokens < 1000 for f in left), left
        assert sorted(f.generated_tokens for f in finished if f.finish_reason == "length") == [40] * 8
        gc.collect()
        rss.append(_rss())
    assert rss[2] - rss[0] < 16 * 2**20, f"memory grew from {rss[0] / 2**20:.1f} to {rss[2] / 2**20:.1f} MiB"


def test_a_shared_system_prompt_is_computed_once(f32_file, alone):
    system = "You answer in one line. " + " ".join(TRAINING_TEXT * 2) + " Paris is the capital of France."
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in PROMPTS]
    ids = [alone.chat_prompt_ids(m) for m in chats]
    shared = min(next((k for k, (a, b) in enumerate(zip(x, ids[0])) if a != b), len(x)) for x in ids[1:])
    assert shared >= 300, "the test needs a ~300-token shared prefix"
    expected = [alone.chat(m, max_new_tokens=8, temperature=0) for m in chats]
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=8) as llm:
        server = LiveServer(llm)
        try:
            client = server.client()
            replies = _together(lambda m: client.chat.completions.create(model="tiny", messages=m, max_tokens=8,
                                                                         temperature=0), chats)
        finally:
            server.stop()
    assert [r.choices[0].message.content for r in replies] == expected
    prompt = [r.usage.prompt_tokens for r in replies]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert prompt == [len(i) for i in ids]
    # the prefix once, each request's own tokens once: the other seven copied it
    assert sum(p - c for p, c in zip(prompt, cached)) == shared + sum(len(i) - shared for i in ids)
    assert sorted(cached) == [0] + [shared] * 7


def test_a_request_that_cannot_fit_gets_400_and_the_others_go_on(batched, alone):
    client = batched.client()
    ban = _no_eos(alone)
    running = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=64, temperature=0,
                                        logit_bias=ban, stream=True)
    first = next(iter(running))
    too_long = " ".join(TRAINING_TEXT * 20)
    assert len(alone.tokenize(too_long)) > CONTEXT
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=too_long, max_tokens=4)
    assert "context" in str(refused.value) and str(CONTEXT) in str(refused.value)
    rest = first.choices[0].text + "".join(c.choices[0].text for c in running if c.choices)
    assert rest == alone.generate(PROMPTS[0], max_new_tokens=64, temperature=0,
                                  logit_bias={int(k): v for k, v in ban.items()})
    _idle(batched)


def test_a_temperature_whose_scores_overflow_neither_fails_nor_takes_down_the_others(batched, alone):
    """temperature 1e-310 (valid: 0 <= t <= 2) made the sampler draw a token past the vocabulary, which
    the shared engine step refused: every stream running beside it ended with a 500 error event. Now
    it is greedy (its limit), and the stream beside it goes on."""
    client = batched.client()
    ban = _no_eos(alone)
    running = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=64, temperature=0,
                                        logit_bias=ban, stream=True)
    first = next(iter(running))
    for tiny in (1e-310, 5e-324):
        answer = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=tiny)
        assert answer.choices[0].text == alone.generate(PROMPTS[1], max_new_tokens=8, temperature=0)
    rest = first.choices[0].text + "".join(c.choices[0].text for c in running if c.choices)
    assert rest == alone.generate(PROMPTS[0], max_new_tokens=64, temperature=0,
                                  logit_bias={int(k): v for k, v in ban.items()})
    _idle(batched)


def test_a_long_prompt_is_prefilled_between_the_running_streams_steps(batched, alone):
    """Chunked prefill: while a 600-token prompt is read, every engine step still gives each running
    stream its token (observed in the scheduler's step log, not by timing)."""
    client = batched.client()
    scheduler = batched.api.scheduler
    ban = _no_eos(alone)
    streamed = 600  # tokens: the two streams still run when the long prompt's last chunk does
    started = threading.Barrier(3)
    texts = {}

    def stream(i):
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=streamed, temperature=0,
                                           logit_bias=ban, stream=True)
        text = ""
        for n, c in enumerate(chunks):
            text += c.choices[0].text if c.choices else ""
            if n == 3:
                started.wait(timeout=60)
        texts[i] = text

    readers = [threading.Thread(target=stream, args=(i,), daemon=True) for i in (1, 2)]
    for t in readers:
        t.start()
    started.wait(timeout=60)  # both stream
    long_prompt = " ".join(TRAINING_TEXT * 5)
    n_long = len(alone.tokenize(long_prompt))
    assert n_long >= 600
    reply = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2, temperature=0)
    steps = list(scheduler.recent_steps)  # now, while the long prompt's steps are among the last STEP_LOG
    reused = reply.usage.prompt_tokens_details.cached_tokens  # a slot may hold its first tokens already
    for t in readers:
        t.join(timeout=120)
    assert reply.choices[0].text == alone.generate(long_prompt, max_new_tokens=2, temperature=0)
    prompt_rows: dict[int, int] = {}
    for step in steps:
        for number, rows, prompt in step.rows:
            if prompt:
                prompt_rows[number] = prompt_rows.get(number, 0) + rows
    long_number = max(prompt_rows, key=prompt_rows.get)
    assert prompt_rows[long_number] == n_long - reused
    chunked = [s for s in steps if any(n == long_number and prompt for n, _, prompt in s.rows)]
    assert len(chunked) >= (n_long - reused) // 32
    streams = {n for s in chunked for n, _, prompt in s.rows if not prompt}.union(*(s.paused for s in chunked))
    assert len(streams) == 2
    for step in chunked:
        decoding = {n for n, rows, prompt in step.rows if not prompt and rows == 1}
        # each stream got its token in this step, unless its reader had fallen behind (backpressure
        # on a busy machine: the scheduler skips it, whatever else runs)
        assert decoding | (set(step.paused) & streams) == streams, step
        assert sum(rows for _, rows, _ in step.rows) <= 32
    assert any(len({n for n, _, prompt in s.rows if not prompt}) == 2 for s in chunked)  # they did run together
    for i in (1, 2):
        assert texts[i] == alone.generate(PROMPTS[i], max_new_tokens=streamed, temperature=0,
                                          logit_bias={int(k): v for k, v in ban.items()})
    _idle(batched)


def test_every_request_option_gives_the_answer_it_gives_alone(batched, alone):
    """Stop strings, logprobs, echo, penalties, logit_bias, n choices with a seed, structured output:
    the batched server answers as a server running one request at a time."""
    single = LiveServer(alone)
    try:
        requests = [
            ("completions", dict(prompt=PROMPTS[0], max_tokens=12, stop=[" "], temperature=0)),
            ("completions", dict(prompt=PROMPTS[1], max_tokens=6, logprobs=3, echo=True, temperature=0)),
            ("completions", dict(prompt=PROMPTS[2], max_tokens=10, presence_penalty=1.5, frequency_penalty=0.5,
                                 temperature=0)),
            ("completions", dict(prompt=PROMPTS[3], max_tokens=10, n=3, seed=9, temperature=0.9)),
            ("chat", dict(messages=[{"role": "user", "content": PROMPTS[4]}], max_tokens=8, logprobs=True,
                          top_logprobs=2, temperature=0)),
            ("chat", dict(messages=[{"role": "user", "content": PROMPTS[5]}], max_tokens=8, temperature=0,
                          logit_bias={"5": 100})),
        ]
        try:
            import llguidance  # noqa: F401
            requests.append(("chat", dict(messages=[{"role": "user", "content": "JSON"}], max_tokens=24,
                                          temperature=0, response_format={"type": "json_object"})))
        except ImportError:  # pragma: no cover - the serve extra brings it
            pass

        def ask(server, kind, options):
            client = server.client()
            call = client.completions.create if kind == "completions" else client.chat.completions.create
            reply = call(model="tiny", **options).model_dump()
            reply.pop("id"), reply.pop("created")
            reply["usage"].pop("prompt_tokens_details")  # what each server's slots happened to hold
            return reply

        expected = [ask(single, kind, options) for kind, options in requests]
    finally:
        single.stop()
    _assert_same(_together(lambda r: ask(batched, *r), requests), expected)
    _idle(batched)


def test_the_choices_of_one_request_generate_together(batched, alone):
    """n choices (and several prompts) of one request ran one after another, one slot busy and the
    others idle (n=4 on 4 slots took 4 times as long): they generate together, streamed ones
    interleaving their chunks as OpenAI's do, each choice the text it gives alone."""
    client = batched.client()
    options = dict(model="tiny", prompt=PROMPTS[3], max_tokens=300, n=4, seed=5, temperature=0.9,
                   logit_bias=_no_eos(alone))
    single = LiveServer(alone)
    try:
        expected = [c.text for c in single.client().completions.create(**options).choices]
    finally:
        single.stop()
    busy, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            busy.add(_get(batched.url + "/health")["slots_processing"])
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reply = client.completions.create(**options)
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **options) if c.choices]
    finally:
        done.set()
        watcher.join()
    assert [c.text for c in reply.choices] == expected
    assert ["".join(c.text for c in chunks if c.index == k) for k in range(4)] == expected
    order = [c.index for c in chunks]
    assert order != sorted(order)  # interleaved
    assert max(busy) > 1, busy
    _idle(batched)


def _assert_same(got, expected, where="reply"):
    """got == expected, but floats (logprobs) within 1e-5 relative: a row's f32 logits may differ in
    the last bits with the number of rows in its step (the float kernels pack panels for many rows)."""
    if isinstance(expected, float) and isinstance(got, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    elif isinstance(expected, dict) and isinstance(got, dict):
        assert got.keys() == expected.keys(), where
        for k in expected:
            _assert_same(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


def test_health_reports_the_slots_and_the_cli_prints_the_kv_cache(batched, f32_file):
    health = _idle(batched)
    assert health["slots_idle"] == 4 and health["slots_processing"] == 0
    from pyllm.cli import build_parser

    args = build_parser().parse_args(["serve", f32_file, "--parallel", "2", "--max-num-batched-tokens", "1"])
    from pyllm.cli import cmd_serve

    with pytest.raises(ValueError, match="--max-num-batched-tokens"):
        cmd_serve(args)


def test_other_users_of_the_engine_take_turns_between_steps(f32_file, alone):
    """Embeddings and logits calls while streams run in the scheduler: they get the engine between
    steps, the streams re-read their tokens and still give the answers they give alone; close()
    ends a running stream as cancelled and the LLM goes back to one call at a time."""
    from pyllm.scheduler import Scheduler

    ban = {i: -100 for i in alone.tokenizer.eos_ids}
    expected = [alone.generate(p, max_new_tokens=60, temperature=0, logit_bias=ban) for p in PROMPTS[:3]]
    embedding = alone.embed(["Berlin is"])
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=4) as llm:
        scheduler = Scheduler(llm, 16)
        with pytest.raises(ValueError, match="already has a scheduler"):
            Scheduler(llm)
        streams = [llm.generate(p, max_new_tokens=60, temperature=0, logit_bias=ban, stream=True) for p in PROMPTS[:3]]
        texts = [next(s) for s in streams]  # all three running
        for _ in range(3):
            assert (llm.embed(["Berlin is"]) == embedding).all()
            assert llm.logits(llm.tokenize("Paris")).shape[0] == len(llm.tokenize("Paris"))
        texts = [t + "".join(s) for t, s in zip(texts, streams)]
        assert texts == expected
        assert [s.stats.finish_reason for s in streams] == ["length"] * 3
        running = llm.generate(PROMPTS[3], max_new_tokens=500, temperature=0, logit_bias=ban, stream=True)
        next(running)
        scheduler.close()
        list(running)
        assert running.stats.finish_reason == "cancelled" and llm.scheduler is None
        assert llm.generate(PROMPTS[0], max_new_tokens=60, temperature=0, logit_bias=ban) == expected[0]


def test_a_slow_grammar_mask_holds_up_only_its_own_stream(f32_file, alone, monkeypatch):
    """The scheduler sampled every sequence of a step in turn, and a grammar's sampler waits for its
    mask (llguidance, computed in a worker thread while the step runs): a mask slower than a step held
    up every other stream, each step. A sequence whose mask is not there now keeps its logits and is
    sampled when it comes; the others go on. Here one mask takes as long as the test wants: the plain
    stream runs to its end meanwhile, and both texts are the ones they give alone."""
    pytest.importorskip("llguidance")
    from pyllm import structured
    from pyllm.scheduler import Scheduler

    ban = {i: -100 for i in alone.tokenizer.eos_ids}
    plain_options = dict(max_new_tokens=40, temperature=0.9, seed=7, logit_bias=ban)
    messages = [{"role": "user", "content": "JSON"}]
    json_options = dict(max_new_tokens=16, temperature=0.9, seed=3, response_format={"type": "json_object"})
    expected_plain = alone.generate(PROMPTS[0], **plain_options)
    expected_json = alone.chat(messages, **json_options)

    gate, timed_out = threading.Event(), threading.Event()
    advance = structured.GrammarProcessor._advance

    def slow_advance(self, token):  # the mask for the constrained stream's second token waits for the gate
        if not gate.wait(20):
            timed_out.set()  # (and the rest goes on: a failure, not a hang)
            gate.set()
        advance(self, token)

    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=2) as llm:
        scheduler = Scheduler(llm, 16)
        monkeypatch.setattr(structured.GrammarProcessor, "_advance", slow_advance)
        constrained, got = llm.chat(messages, stream=True, **json_options), []
        reader = threading.Thread(target=lambda: got.append("".join(constrained)), daemon=True)
        reader.start()
        deadline = time.time() + 30
        while constrained.stats.generated_tokens < 1:  # its first token (the first mask is made at once)
            assert time.time() < deadline, "the constrained stream did not start"
            time.sleep(0.01)
        plain = "".join(llm.generate(PROMPTS[0], stream=True, **plain_options))
        assert not timed_out.is_set(), "the plain stream waited for the other stream's grammar"
        assert constrained.stats.generated_tokens == 1  # held: its mask is not there
        gate.set()
        reader.join(timeout=60)
        scheduler.close()
    assert plain == expected_plain and got == [expected_json]


def test_prompt_rows_beside_decoding_streams_are_capped(f32_file, alone, monkeypatch):
    """A step's time grows with its rows and every decoding stream waits for the whole step: with the
    whole max_num_batched_tokens budget for newcomers' prompts, SmolLM2's 8 streams stalled 200-225 ms
    (13 ms a decode step) whenever prompts arrived. A step that decodes takes at most
    PREFILL_BESIDE_DECODE prompt rows; a prompt with nothing decoding still takes the whole budget; the
    answers are those given alone."""
    import pyllm.scheduler as scheduler_module
    from pyllm.scheduler import Scheduler

    monkeypatch.setattr(scheduler_module, "PREFILL_BESIDE_DECODE", 4)
    ban = {i: -100 for i in alone.tokenizer.eos_ids}
    long_prompt, other = " ".join(PROMPTS), " ".join(reversed(PROMPTS))  # tens of tokens, nothing shared
    expected = [alone.generate(p, max_new_tokens=n, temperature=0, logit_bias=ban)
                for p, n in ((long_prompt, 600), (other, 40))]
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=4) as llm:
        scheduler = Scheduler(llm, 32)
        scheduler.recent_steps = collections.deque()  # every step
        try:
            first = llm.generate(long_prompt, max_new_tokens=600, temperature=0, logit_bias=ban, stream=True)
            texts = [next(first), ""]  # its prompt read alone, the first steps its own
            reader = threading.Thread(target=lambda: texts.__setitem__(0, texts[0] + "".join(first)), daemon=True)
            reader.start()  # read as it comes: it decodes in every step (a stream read late pauses)
            second = llm.generate(other, max_new_tokens=40, temperature=0, logit_bias=ban, stream=True)
            texts[1] = "".join(second)
            reader.join(timeout=120)
            steps = list(scheduler.recent_steps)
        finally:
            scheduler.close()
    assert texts == expected
    assert len(alone.tokenize(long_prompt)) > 32 and len(alone.tokenize(other)) > 8
    assert steps[0].rows == [(steps[0].rows[0][0], 32 - 0, True)]  # alone: the whole budget
    beside = [step for step in steps if any(not prompt for _, _, prompt in step.rows)]
    prompt_rows = [sum(n for _, n, prompt in step.rows if prompt) for step in beside]
    assert max(prompt_rows) == 4 and sum(prompt_rows) >= 1, prompt_rows


class _EngineLog:
    """The engine of an LLM, recording in order which kind of call each forward_rows was: 'embed' (the
    final hidden states) or 'step' (logits: the scheduler's streams)."""

    def __init__(self, engine):
        self._engine, self.calls, self.embedding = engine, [], threading.Event()

    def forward_rows(self, *args):
        self.calls.append("embed" if len(args) > 4 and args[4] else "step")
        if self.calls[-1] == "embed":
            self.embedding.set()
        return self._engine.forward_rows(*args)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_a_long_embeddings_call_does_not_freeze_the_running_streams(f32_file, alone):
    """An embeddings call of many inputs held the engine until its last input: every running stream
    stopped for its whole length (/v1/embeddings of 60,000 tokens froze SmolLM2's streams for 152 s).
    It gives the engine back for as long as it held it while streams wait; the streams go on during
    it, keep their slots' caches (it writes slot 0, which the scheduler gives out last) and every
    answer is still the one given alone. Judged by the order of the engine's calls, not by the gaps
    between pieces on the clock (a loaded machine stretched one to 1.5 s of a 4 s call)."""
    from pyllm.scheduler import Scheduler

    ban = {i: -100 for i in alone.tokenizer.eos_ids}
    expected = [alone.generate(p, max_new_tokens=900, temperature=0, logit_bias=ban) for p in PROMPTS[:3]]
    text = "The quick brown fox jumps over the lazy dog. " * 8
    start = time.monotonic()
    alone.embed([text] * 32)
    inputs = [text] * max(64, int(32 * 4.0 / max(time.monotonic() - start, 1e-3)))  # about 4 s of embeddings
    with pyllm.LLM(f32_file, n_threads=1, context_length=CONTEXT, n_parallel=4) as llm:
        scheduler = Scheduler(llm, 16)
        try:
            streams = [llm.generate(p, max_new_tokens=900, temperature=0, logit_bias=ban, stream=True)
                       for p in PROMPTS[:3]]
            texts = [next(s) for s in streams]  # all three running, their prompts read
            scheduler.recent_steps = collections.deque()  # every step from now on
            log = llm.engine = _EngineLog(llm.engine)

            def read(k):
                # from the embeddings call's first input on: until then each stream stops PIECES_AHEAD
                # pieces ahead of its reader (the inputs' tokenization let them end before it began)
                log.embedding.wait(60)
                for piece in streams[k]:
                    texts[k] += piece

            readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(3)]
            for r in readers:
                r.start()
            vectors = llm.embed(inputs)
            for r in readers:
                r.join(timeout=120)
            llm.engine = log._engine
            assert texts == expected
            assert np.allclose(vectors[:2], alone.embed(inputs[:2]), atol=1e-6)
            # the embeddings wrote slot 0 only, where no stream was: none re-read its tokens
            assert not [rows for step in scheduler.recent_steps for rows in step.rows if rows[2]]
            # the streams (900 tokens) ran to their end during the embeddings call (thousands of inputs),
            # which gave them turns while they ran (how soon a turn comes depends on the streams' readers
            # being scheduled: on a loaded machine the first came after two thirds of the inputs)
            calls = "".join("e" if c == "embed" else "s" for c in log.calls)
            assert calls.count("e") == len(inputs)
            assert calls.index("e") < calls.rindex("s") < calls.rindex("e"), \
                "the streams waited for the embeddings call to end"
        finally:
            scheduler.close()


def test_a_client_that_leaves_while_waiting_for_a_slot_gives_its_place_up_at_once(batched, alone):
    client = batched.client()
    ban = _no_eos(alone)
    running = [client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=900, temperature=0,
                                         logit_bias=ban, stream=True) for i in range(4)]
    for r in running:
        next(iter(r))  # all four slots busy
    waiting = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=8, stream=True)
    deadline = time.time() + 10
    while batched.api.scheduler.waiting != 1:
        assert time.time() < deadline
        time.sleep(0.01)
    waiting.close()
    while _get(batched.url + "/health")["requests"] != 4:
        assert time.time() < deadline, "the waiting request kept its place"
        time.sleep(0.01)
    assert batched.api.scheduler.waiting == 0 and batched.api.scheduler.busy_slots == 4
    for r in running:
        r.close()
    _idle(batched)


def test_streams_left_unread_give_their_slots_to_waiting_requests(batched, alone):
    """Four clients stop reading (their streams pause): a fifth request still gets a slot, and the
    four, read again, continue with the exact text (re-reading their tokens)."""
    client = batched.client()
    ban = _no_eos(alone)
    idle = [client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=300, temperature=0,
                                      logit_bias=ban, stream=True) for i in range(4)]
    texts = [next(iter(r)).choices[0].text for r in idle]  # then nobody reads
    start = time.time()
    reply = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=8, temperature=0)
    assert reply.choices[0].text == alone.generate(PROMPTS[5], max_new_tokens=8, temperature=0)
    assert time.time() - start < 30
    texts = [t + "".join(c.choices[0].text for c in r if c.choices) for t, r in zip(texts, idle)]
    assert texts == [alone.generate(PROMPTS[i], max_new_tokens=300, temperature=0,
                                    logit_bias={int(k): v for k, v in ban.items()}) for i in range(4)]
    _idle(batched)


def test_responses_run_together_and_equal_the_sequential_ones(batched, alone):
    """/v1/responses on the batching server: 4 streamed and 4 whole responses at once give, greedy, the
    text each prompt gives alone."""
    client = batched.client()
    no_eos = {int(token): bias for token, bias in _no_eos(alone).items()}
    expected = [alone.chat([{"role": "user", "content": p}], max_new_tokens=12, temperature=0, logit_bias=no_eos)
                for p in PROMPTS]

    def respond(k):
        options = dict(model="tiny", input=PROMPTS[k % len(PROMPTS)], max_output_tokens=12, temperature=0,
                       extra_body={"logit_bias": _no_eos(alone)})
        if k < len(PROMPTS):
            return client.responses.create(**options).output_text
        events = list(client.responses.create(stream=True, **options))
        assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 12
        return "".join(e.delta for e in events if e.type == "response.output_text.delta")

    assert _together(respond, list(range(2 * len(PROMPTS)))) == expected * 2
    _idle(batched)
