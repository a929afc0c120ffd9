"""What API clients expect from `pyllm serve`, with the official openai client: logprobs, n choices,
several prompts, echo, penalties and logit_bias, stop tokens, structured output, tool calls, and the
server surface (model card, tokenize, API key, CORS)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import pyllm

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

from test_server import LiveServer, _chat, _get, _request  # noqa: E402

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")


@pytest.fixture(scope="module")
def llm(tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=2048) as model:
        yield model


@pytest.fixture(scope="module")
def live(llm):
    server = LiveServer(llm)
    yield server
    server.stop()


def _post_json(live, path: str, body: dict):
    """(status, parsed JSON) of a POST of body to the live server."""
    return _request(live.url + path, json.dumps(body).encode())


def _log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logprobs_at(llm, prompt_ids, generated_ids):
    """log_softmax of pyllm's own logits at the positions that produced generated_ids."""
    return _log_softmax(llm.logits(list(prompt_ids) + list(generated_ids))[len(prompt_ids) - 1:-1])


# -- logprobs ----------------------------------------------------------------------------------

def test_chat_logprobs_equal_log_softmax_of_the_logits(live, llm):
    client = live.client()
    reply = client.chat.completions.create(model="tiny", messages=_chat("Paris is"), max_tokens=6, temperature=1.0,
                                           seed=3, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    ids = _generated_ids(llm.chat(_chat("Paris is"), max_new_tokens=6, temperature=1.0, seed=3, stream=True))
    assert [bytes(c.bytes) for c in content] == [llm.tokenizer.token_bytes(i) for i in ids]
    expected = _logprobs_at(llm, llm.chat_prompt_ids(_chat("Paris is")), ids)
    for row, entry, token in zip(expected, content, ids):
        assert abs(entry.logprob - row[token]) < 1e-5
        assert len(entry.top_logprobs) == 3
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(row)[::-1][:3], atol=1e-5)
    # streamed: the same tokens and values, spread over the chunks
    chunks = list(client.chat.completions.create(model="tiny", messages=_chat("Paris is"), max_tokens=6,
                                                 temperature=1.0, seed=3, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # (within float noise: a reused prompt cache runs other batch shapes than a fresh prefill)
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=1e-5)


def _generated_ids(stream) -> list[int]:
    """The ids a Python API stream generated (the same seed gives the server's)."""
    "".join(stream)
    return [t.id for t in stream.tokens]


def test_completion_logprobs_and_echo(live, llm):
    client = live.client()
    prompt = "The quick brown fox"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, logprobs=2, echo=True)
    choice = reply.choices[0]
    generated = llm.generate(prompt, max_new_tokens=5)
    assert choice.text == prompt + generated
    ids = llm.tokenize(prompt)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 5
    expected_prompt = _log_softmax(llm.logits(ids))
    for k in range(1, len(ids)):
        assert abs(lp.token_logprobs[k] - expected_prompt[k - 1][ids[k]]) < 1e-5
    out = _generated_ids(llm.generate(prompt, max_new_tokens=5, stream=True))
    for k, row in enumerate(_logprobs_at(llm, ids, out)):
        assert abs(lp.token_logprobs[len(ids) + k] - row[out[k]]) < 1e-5
        assert len(lp.top_logprobs[len(ids) + k]) == 2
        assert lp.top_logprobs[len(ids) + k][lp.tokens[len(ids) + k]] == lp.token_logprobs[len(ids) + k]
    assert lp.text_offset[len(ids)] == len(prompt)
    # streamed with echo: the prompt first, then the completion
    pieces = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == prompt + generated


def test_text_offset_counts_characters_split_across_tokens_once(live, llm):
    """text_offset counted each token's own text, so a character split over three byte tokens counted
    three U+FFFD: every later offset pointed past its token (21 for a token at 11). Streamed, offsets
    restarted at each chunk's text and differed again. Now a token starts where the complete
    characters before it end, streamed or not (one TextOffsets per choice across its chunks)."""
    from pyllm.api_responses import TextOffsets, completion_logprobs
    from pyllm.llm import TokenLogprob

    def byte_token(b: bytes) -> int:
        return next(i for i in range(llm.tokenizer.vocab_size) if llm.tokenizer.token_bytes(i) == b)

    a, x = "\u30a2".encode(), llm.tokenize("x", add_special_tokens=False)
    ids = [byte_token(a[:1]), byte_token(a[1:2]), byte_token(a[2:])] + x + [byte_token(a[:1])] + x
    text = "\u30a2x\ufffdx"  # (a character left incomplete: one U+FFFD)
    assert llm.detokenize(ids) == text
    tokens = [TokenLogprob(i, -1.0, []) for i in ids]
    expected = [0, 0, 0, 1, 2, 3]
    assert completion_logprobs(llm.tokenizer, tokens)["text_offset"] == expected
    for cut in range(len(ids) + 1):  # a stream's chunks: one TextOffsets across them
        offsets = TextOffsets(5)
        chunks = [completion_logprobs(llm.tokenizer, part, offsets)["text_offset"] for part in (tokens[:cut],
                                                                                                tokens[cut:])]
        assert chunks[0] + chunks[1] == [5 + o for o in expected], cut
    # the server, echoing the prompt ids, streamed and not
    client = live.client()
    for prompt in (ids, "\u30a2x \u4e2d\u6587 \U0001f600!"):
        kw = dict(model="tiny", prompt=prompt, max_tokens=8, logprobs=1, echo=True, temperature=0)
        whole = client.completions.create(**kw).choices[0]
        echoed = text if prompt is ids else prompt
        n = len(ids) if prompt is ids else len(llm.tokenize(prompt))
        assert whole.text.startswith(echoed) and whole.logprobs.text_offset[n] == len(echoed)
        assert all(whole.text.startswith(t, o) for t, o in zip(whole.logprobs.tokens[:n], whole.logprobs.text_offset)
                   if "\ufffd" not in t)
        streamed = [o for chunk in client.completions.create(stream=True, **kw) for c in chunk.choices
                    for o in (c.logprobs.text_offset if c.logprobs else [])]
        assert streamed == whole.logprobs.text_offset


def test_echo_of_a_prompt_of_special_tokens_keeps_its_logprobs(live, llm):
    """echo=true with logprobs of a prompt made only of special tokens (or of ids without text) dropped
    the prompt's log-probabilities: the echo was decided by its text, which skipped special tokens,
    so it was "" and taken for no echo. Token ids now echo the text of every token, special ones
    included, so that text_offset counts in the returned text; a prompt without any text still
    echoes its tokens' log-probabilities."""
    client = live.client()
    start, end = (llm.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    silent = llm.tokenizer.vocab_size  # an id of the model's vocabulary past the tokenizer's: no text
    assert silent < llm.config.vocab_size
    marks = "<|im_start|><|im_end|>"
    for prompt, echoed in (([start, end], marks), (marks, marks),
                           ([start, silent, start], "<|im_start|><|im_start|>"), ([silent, silent], "")):
        ids = prompt if isinstance(prompt, list) else llm.tokenize(prompt)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=1, echo=True,
                                          temperature=0)
        choice = reply.choices[0]
        generated = llm.generate(ids, max_new_tokens=3, temperature=0)
        assert choice.text == echoed + generated, prompt
        lp = choice.logprobs
        expected = _log_softmax(llm.logits(ids))
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) >= len(ids), prompt
        for k in range(1, len(ids)):
            assert abs(lp.token_logprobs[k] - expected[k - 1][ids[k]]) < 1e-5, prompt
        assert "".join(lp.tokens[:len(ids)]) == echoed
        assert [echoed.startswith(t, o) for t, o in zip(lp.tokens[:len(ids)], lp.text_offset)] == [True] * len(ids)
        assert lp.text_offset[len(ids):len(ids) + 1] in ([], [len(echoed)])
        # streamed: the echo chunk carries the same log-probabilities
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=1, echo=True,
                                                temperature=0, stream=True))
        first = chunks[0].choices[0]
        assert first.text == echoed and first.logprobs.token_logprobs == lp.token_logprobs[:len(ids)], prompt
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_echoed_logprobs_are_computed_once_per_prompt(live, llm, monkeypatch):
    """n choices of one prompt share its echoed log-probabilities: one forward pass over the
    prompt, not n (a request for n=128 must not run the prompt 128 times)."""
    calls = []
    computed = llm._prompt_logprobs
    monkeypatch.setattr(llm, "_prompt_logprobs", lambda ids, *a: calls.append(len(ids)) or computed(ids, *a))
    reply = live.client().completions.create(model="tiny", prompt=["The quick brown fox", "Paris"], max_tokens=2,
                                             logprobs=1, echo=True, n=3)
    assert len(reply.choices) == 6 and calls == [len(llm.tokenize("The quick brown fox")), len(llm.tokenize("Paris"))]
    first = [c.logprobs.token_logprobs[:len(llm.tokenize("Paris"))] for c in reply.choices[3:]]
    assert first[0] == first[1] == first[2]


def test_echoed_logprobs_of_a_long_prompt_hold_a_chunk_of_logits_at_a_time(llm, monkeypatch):
    """An echoed prompt's logprobs took the whole prompt's logits at once (1.5 GiB for 8192 of SmolLM2's
    tokens, per request); they are computed PROMPT_LOGITS_ROWS rows at a time and equal what the whole
    prompt's logits give (to float32 rounding: rows per step change the bits of a float model's logits)."""
    import pyllm.llm as llm_module
    from pyllm.llm import _token_logprob

    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 6)
    whole = llm.logits(ids)
    expected = [_token_logprob(ids[k], whole[k - 1], 3) for k in range(1, len(ids))]
    shapes = []
    forward = llm.engine.forward
    monkeypatch.setattr(llm_module, "PROMPT_LOGITS_ROWS", 7)
    monkeypatch.setattr(llm, "engine", type("Spy", (), {"forward": lambda self, *a: shapes.append(len(a[0])) or
                                                        forward(*a), "__getattr__": lambda self, n:
                                                        getattr(forward.__self__, n)})())
    got = llm._prompt_logprobs(ids, 3)
    monkeypatch.undo()
    assert got[0].id == ids[0] and got[0].logprob is None and len(got) == len(ids)
    assert max(shapes) == 7 and sum(shapes) == len(ids) - 1
    for g, e in zip(got[1:], expected):
        assert g.id == e.id and abs(g.logprob - e.logprob) < 1e-4
        assert [i for i, _ in g.top] == [i for i, _ in e.top] or abs(g.top[0][1] - g.top[1][1]) < 1e-4
    assert llm._cached == ids[:-1]  # slot 0 holds what ran: the next call reuses it


def test_too_many_prompts_are_refused(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model="tiny", prompt=["a"] * 2049, max_tokens=1)
    assert e.value.param == "prompt" and "2048" in str(e.value)


def test_too_many_choices_in_all_are_refused(live, llm, monkeypatch):
    """2048 prompts x n=128 made 262,144 streams (2 GB, 31 s) from a 50 KB request before any
    token: prompts x n is bounded by the same 2048, refused before any stream is made."""
    calls = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model="tiny", prompt=["a"] * 2048, n=128, max_tokens=1)
    assert e.value.param == "n" and "262144 choices" in str(e.value) and calls == []
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        live.client().completions.create(model="tiny", prompt=["a"] * 17, n=128, max_tokens=1)
    reply = live.client().completions.create(model="tiny", prompt=["a"] * 16, n=128, max_tokens=1)
    assert len(reply.choices) == 2048


def test_answers_too_large_to_build_are_refused_before_they_run(live, llm, monkeypatch):
    """A 200-byte request for n=128 choices of a full context with 20 alternatives per token would
    make the server build about 7 GB of log-probabilities for one non-streamed answer: refused
    before generating (400 naming max_tokens), by the choices x tokens x (1 + alternatives) it could
    hold, echoed prompts included; within the limit, or streamed, the same options are answered."""
    from pyllm.api_schema import MAX_LOGPROB_ENTRIES

    calls = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_chat("hi"), n=128, logprobs=True, top_logprobs=20)
    assert e.value.param == "max_tokens" and str(MAX_LOGPROB_ENTRIES) in str(e.value)
    with pytest.raises(openai.BadRequestError, match="log-probabilities"):
        client.completions.create(model="tiny", prompt=["a"] * 64, n=10, max_tokens=2000, logprobs=5)
    prompt = [5, 6, 7] * 630
    with pytest.raises(openai.BadRequestError, match="log-probabilities"):  # the echoed prompt counts too
        client.completions.create(model="tiny", prompt=prompt, n=20, max_tokens=1, logprobs=20, echo=True)
    assert calls == []  # refused before any generation started
    reply = client.chat.completions.create(model="tiny", messages=_chat("hi"), n=2, max_tokens=3, logprobs=True,
                                           top_logprobs=20)
    assert len(reply.choices) == 2 and len(reply.choices[0].logprobs.content[0].top_logprobs) == 20
    chunks = list(client.completions.create(model="tiny", prompt=prompt[:50], n=20, max_tokens=1, logprobs=20,
                                            echo=True, stream=True))
    assert len({c.choices[0].index for c in chunks if c.choices}) == 20


# -- several choices and prompts -----------------------------------------------------------------

def test_n_choices_streamed_and_not(live, llm):
    client = live.client()
    reply = client.chat.completions.create(model="tiny", messages=_chat("Once"), max_tokens=8, n=3,
                                           temperature=1.2, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # seeds seed, seed+1, seed+2
    for i, text in enumerate(texts):
        assert text == llm.chat(_chat("Once"), max_new_tokens=8, temperature=1.2, seed=11 + i)
    chunks = list(client.chat.completions.create(model="tiny", messages=_chat("Once"), max_tokens=8, n=3,
                                                 temperature=1.2, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_n_choices_of_an_unseeded_default_stay_unseeded_and_seed_minus_two_is_seeded(llm):
    """`pyllm serve --seed -1` (llama.cpp's "random"): choice k was seeded with -1 + k, so choices 1.. of
    every request were the same texts (seeds 0, 1, ...); a request's seed -2 gave choice 1 seed -1, unseeded."""
    server = LiveServer(llm, defaults={"seed": -1})
    try:
        client = server.client()
        ask = dict(model="tiny", prompt="Once", max_tokens=8, temperature=1.0)
        seeded = [llm.generate("Once", max_new_tokens=8, temperature=1.0, seed=s) for s in (0, 1)]
        for _ in range(2):
            texts = [c.text for c in client.completions.create(n=3, **ask).choices]
            assert texts[1:] != seeded
        texts = [c.text for c in client.completions.create(n=2, seed=-2, **ask).choices]
        assert texts == [llm.generate("Once", max_new_tokens=8, temperature=1.0, seed=s) for s in (-2, 2**64 - 1)]
    finally:
        server.stop()


def test_a_request_s_seed_minus_one_is_unseeded_beside_a_server_default_seed(llm):
    """seed -1 (llama.cpp's "random") was dropped as if unset, so `pyllm serve --seed 5` answered it with
    seed 5: the same text each time. It is unseeded; a request without a seed still takes the default."""
    server = LiveServer(llm, defaults={"seed": 5, "temperature": 1.0})
    try:
        client = server.client()
        seeded = llm.generate("Once", max_new_tokens=8, temperature=1.0, seed=5)
        assert client.completions.create(model="tiny", prompt="Once", max_tokens=8).choices[0].text == seeded
        texts = [client.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=-1).choices[0].text
                 for _ in range(3)]
        assert texts != [seeded] * 3 and len(set(texts)) > 1
    finally:
        server.stop()


def test_several_prompts_in_every_form(live, llm):
    client = live.client()
    prompts = ["Paris is", "Berlin"]
    expected = [llm.generate(p, max_new_tokens=4) for p in prompts]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=4)
    assert [c.text for c in reply.choices] == expected
    ids = [llm.tokenize(p) for p in prompts]
    assert [c.text for c in client.completions.create(model="tiny", prompt=ids, max_tokens=4).choices] == expected
    assert client.completions.create(model="tiny", prompt=ids[0], max_tokens=4).choices[0].text == expected[0]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert reply.usage.prompt_tokens == sum(len(i) for i in ids)


def test_penalties_and_logit_bias_match_the_python_api(live, llm):
    client = live.client()
    options = dict(presence_penalty=1.5, frequency_penalty=1.0)
    top = int(np.argmax(llm.logits(llm.tokenize("a a a a"))[-1]))
    expected = llm.generate("a a a a", max_new_tokens=10, logit_bias={top: -100.0}, **options)
    reply = client.completions.create(model="tiny", prompt="a a a a", max_tokens=10, logit_bias={str(top): -100},
                                      **options)
    assert reply.choices[0].text == expected != llm.generate("a a a a", max_new_tokens=10)


def test_a_repetition_penalty_that_overflows_the_scores_is_refused_before_any_token(live, llm):
    """repetition_penalty 1e-320 passed every check, then overflowed the first seen token's score: a
    streamed reply sent tokens and then an error event, a non-streamed one a 400 with param null."""
    client = live.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="a a a", max_tokens=5, stream=stream,
                                      extra_body={"repetition_penalty": 1e-320})
        assert e.value.body["param"] == "repetition_penalty", e.value.body
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number >= 1e-250"):
        llm.generate("a a a", max_new_tokens=5, repetition_penalty=1e-320, stream=True)
    smallest = client.completions.create(model="tiny", prompt="a a a", max_tokens=5,
                                         extra_body={"repetition_penalty": 1e-250})
    assert smallest.choices[0].text == llm.generate("a a a", max_new_tokens=5, repetition_penalty=1e-250)


def test_typical_p_is_sampled_as_transformers_and_taken_by_the_server(live, llm):
    """typical_p (llama.cpp's field, transformers' TypicalLogitsWarper) was not an option: the server
    dropped it in silence, as an unknown field, and sampled from the whole distribution."""
    client = live.client()
    ask = dict(max_new_tokens=12, temperature=1.0, seed=5)
    texts = {p: llm.generate("Once", typical_p=p, **ask) for p in (0.2, 1.0)}
    assert texts[0.2] != texts[1.0] == llm.generate("Once", **ask)
    assert llm.generate(["Once", "Paris"], typical_p=0.2, **ask)[0] == texts[0.2]
    reply = client.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=5,
                                      extra_body={"typical_p": 0.2})
    assert reply.choices[0].text == texts[0.2]
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Once", max_tokens=1, extra_body={"typical_p": bad})
        assert e.value.body["param"] == "typical_p", (bad, e.value.body)
        with pytest.raises(ValueError, match="typical_p"):
            llm.generate("Once", max_new_tokens=1, typical_p=bad)


def test_stop_token_ids_and_special_stop_strings(live, llm):
    client = live.client()
    end = llm.tokenizer.token_to_id("<|im_end|>")
    reply = client.completions.create(model="tiny", prompt="Paris", max_tokens=8, logit_bias={str(end): 100},
                                      stop=["<|im_end|>"])
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1
    other = llm.tokenizer.token_to_id("<|im_start|>")
    reply = client.completions.create(model="tiny", prompt="Paris", max_tokens=8, logit_bias={str(other): 100},
                                      extra_body={"stop_token_ids": [other]})
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1


def test_a_builtin_chat_template_s_end_of_turn_stops_served_chats(live, llm, monkeypatch):
    """As LLM.chat: a chat request to a server whose --chat-template is a built-in one stops at that
    template's end of turn (llama3: <|eot_id|>), beside the request's own stop strings; completions do not."""
    from pyllm.chat_template import BUILTIN_TEMPLATES

    client, seen, real = live.client(), [], llm.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stop"))
        return real(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", spy)
    monkeypatch.setattr(llm, "chat_template", BUILTIN_TEMPLATES["llama3"])
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                   stop=["zzz"])
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert seen == [["zzz", "<|eot_id|>"], ["<|eot_id|>"], None]


def test_logprobs_stop_with_the_text_a_stop_string_cuts(live, llm):
    """The logprobs of a reply cut by a stop string listed the token that completed it (and those
    holding only its text), streamed and not: now they are the tokens whose text the returned text
    holds, in both modes, for completions and chat."""
    client = live.client()
    prompt, ban = "The quick brown fox", {str(i): -100 for i in llm.tokenizer.eos_ids}
    stream = llm.generate(prompt, max_new_tokens=12, temperature=0, logit_bias={int(k): v for k, v in ban.items()},
                          stream=True)
    full = "".join(stream)
    ids = [t.id for t in stream.tokens]
    begins = [len(llm.detokenize(ids[:k])) for k in range(len(ids))]
    # a stop string that begins a token (that token on is dropped), and one that begins inside a token
    k = next(k for k in range(1, len(ids)) if begins[k] < len(full) and full.find(full[begins[k]:]) == begins[k])
    inside = next(c for c in range(1, len(full)) if c not in begins and full.find(full[c:]) == c)
    for stop in (full[begins[k]:], full[inside:]):
        text = full[:full.find(stop)]
        kept = [i for i, b in zip(ids, begins) if b < len(text)]
        expected = [llm.tokenizer.token_bytes(i).decode("utf-8", "replace") for i in kept]
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logit_bias=ban,
                                          stop=[stop], logprobs=1)
        assert reply.choices[0].text == text and reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].logprobs.tokens == expected, stop
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                logit_bias=ban, stop=[stop], logprobs=1, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == expected
        chat = dict(model="tiny", messages=_chat(prompt), max_tokens=12, temperature=0, logit_bias=ban,
                    logprobs=True)
        whole = client.chat.completions.create(**chat).choices[0].message.content
        chat_stop = whole[len(whole) // 2:]
        chat_text = whole[:whole.find(chat_stop)]
        reply = client.chat.completions.create(**chat, stop=[chat_stop]).choices[0]
        assert reply.message.content == chat_text
        local = llm.chat(_chat(prompt), max_new_tokens=12, temperature=0,
                         logit_bias={int(k): v for k, v in ban.items()}, stop=[chat_stop], stream=True)
        assert "".join(local) == chat_text  # its tokens are those of the text (test_api.py checks the API's)
        assert [bytes(e.bytes) for e in reply.logprobs.content] == \
            [llm.tokenizer.token_bytes(t.id) for t in local.tokens]
        assert len(local.tokens) < local.stats.generated_tokens
        chunks = list(client.chat.completions.create(**chat, stop=[chat_stop], stream=True))
        assert [e.token for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content] == [e.token for e in reply.logprobs.content]


# -- structured output ---------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                   "verified": {"type": "boolean"}},
                  "required": ["age", "verified"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


def test_json_schema_output_validates_on_sampled_runs(live):
    jsonschema = pytest.importorskip("jsonschema")
    client = live.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        reply = client.chat.completions.create(model="tiny", messages=_chat("a pet"), max_tokens=200,
                                               temperature=1.0, seed=seed, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=_chat("a pet"), max_tokens=200, temperature=1.0,
                                            seed=99, response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)


def test_a_grammar_is_compiled_once_for_all_choices_and_prompts(live, monkeypatch):
    """Each choice compiled its grammar again: n=128 choices of a schema of 10,000 properties took two
    minutes and 4 GB before the first token (2048 prompts x n: half an hour, 64 GB). A compiled grammar
    is now copied for each choice, each prompt and the next requests with the same grammar; each copy
    follows its own choice (a seeded request gives what it gave compiled alone)."""
    jsonschema = pytest.importorskip("jsonschema")
    llguidance = pytest.importorskip("llguidance")
    compiled = []

    class Counting:  # llguidance.LLMatcher, counting the matchers compiled
        def __init__(self, real):
            self.real = real

        def __call__(self, *args, **kwargs):
            compiled.append(args[1])
            return self.real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.real, name)

    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20)},
              "required": ["p0", "p1"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "many", "schema": schema}}
    client = live.client()
    alone = [client.chat.completions.create(model="tiny", messages=_chat("json"), max_tokens=40, temperature=1.0,
                                            seed=5 + k, response_format=fmt).choices[0].message.content
             for k in range(3)]
    monkeypatch.setattr(llguidance, "LLMatcher", Counting(llguidance.LLMatcher))
    reply = client.chat.completions.create(model="tiny", messages=_chat("json"), max_tokens=40, temperature=1.0,
                                           seed=5, n=3, response_format=fmt)
    assert [c.message.content for c in reply.choices] == alone
    lark = 'start: "a" /[0-9]{3}/ | "b" /[xyz]+/'
    reply = client.completions.create(model="tiny", prompt=["one", "two"], n=3, max_tokens=8, temperature=1.0,
                                      seed=1, extra_body={"response_format": {"type": "grammar", "grammar": lark}})
    assert len(reply.choices) == 6 and all(re.fullmatch("a[0-9]{3}|b[xyz]+", c.text) for c in reply.choices
                                           if c.finish_reason == "stop")
    assert len(compiled) == 1, f"{len(compiled)} compiles"  # the schema's were kept: the grammar's only
    for c in alone:
        if c.endswith("}"):
            jsonschema.validate(json.loads(c), schema)


def test_requests_compiling_grammars_do_not_hold_up_the_others(live, monkeypatch):
    """Grammars were compiled in the worker threads every request shares (parsing bodies, rendering,
    answers): as many requests with slow grammars as there are such threads (eight schemas of 10,000
    properties) held up every other request (a plain one waited 71 s). They start in threads of their
    own now: a plain request is answered while every grammar thread is busy."""
    import threading

    from pyllm import serve, structured

    release, entered = threading.Event(), []
    compile_matcher = structured._matcher

    def slow(*args):  # a compile that takes until release (at most a minute)
        entered.append(1)
        release.wait(60)
        return compile_matcher(*args)

    monkeypatch.setattr(structured, "_matcher", slow)
    client = live.client()
    shared = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default worker threads
    replies = []

    def ask(k):
        replies.append(client.completions.create(model="tiny", prompt=f"{k}", max_tokens=1,
                                                 extra_body={"response_format": {"type": "json_object"}}))

    asking = [threading.Thread(target=ask, args=(k,)) for k in range(shared + 1)]
    try:
        for t in asking:
            t.start()
        deadline = time.time() + 30
        while len(entered) < min(serve.GRAMMAR_WORKERS, shared) and time.time() < deadline:
            time.sleep(0.02)
        started = time.time()
        plain = client.with_options(timeout=10).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert plain.usage.completion_tokens == 2 and time.time() - started < 10
    finally:
        release.set()
        for t in asking:
            t.join(60)
    assert len(replies) == shared + 1 and all(r.choices[0].text.startswith("{") for r in replies)


def test_json_object_regex_and_grammar(live):
    client = live.client()
    reply = client.chat.completions.create(model="tiny", messages=_chat("json"), max_tokens=60, temperature=1.0,
                                           seed=1, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")
    reply = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=2,
                                      extra_body={"response_format": {"type": "regex", "regex": "[A-Z]{3}-[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", reply.choices[0].text)
    lark = 'start: answer\nanswer: "yes" | "no" | "maybe"'
    reply = client.completions.create(model="tiny", prompt="?", max_tokens=20, temperature=1.0, seed=3,
                                      extra_body={"response_format": {"type": "grammar", "grammar": lark}})
    assert reply.choices[0].text in ("yes", "no", "maybe")
    with pytest.raises(openai.BadRequestError, match="grammar"):
        client.completions.create(model="tiny", prompt="?", max_tokens=5,
                                  extra_body={"response_format": {"type": "grammar", "grammar": "start: ("}})


def test_a_json_object_s_schema_is_followed(live, llm):
    """response_format {"type": "json_object", "schema": {...}} (llama.cpp's server's and
    llama-cpp-python's form) gave any JSON object, the schema ignored in silence. The object follows
    it, from the server, create_chat_completion and generate; a schema beside another type, which
    would be ignored, is refused naming response_format.schema."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    form = {"type": "json_object", "schema": schema}
    reply = live.client().chat.completions.create(model="tiny", messages=_chat("json"), max_tokens=60,
                                                  temperature=1.0, seed=1, response_format=form)
    assert json.loads(reply.choices[0].message.content)["city"] in ("Paris", "Rome"), reply
    answer = llm.create_chat_completion(_chat("json"), max_tokens=60, temperature=1.0, seed=1, response_format=form)
    assert answer["choices"][0]["message"]["content"] == reply.choices[0].message.content
    assert json.loads(llm.generate("json:", max_new_tokens=60, response_format=form))["city"] in ("Paris", "Rome")
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for form in ({"type": "text", "schema": schema}, dict(json_schema, schema=schema),
                 {"type": "regex", "regex": "a", "schema": schema}):
        with pytest.raises(openai.BadRequestError) as e:
            live.client().chat.completions.create(model="tiny", messages=_chat("json"), max_tokens=5,
                                                  response_format=form)
        assert e.value.param == "response_format.schema" and "json_object" in e.value.message, e.value.message
        with pytest.raises(ValueError, match="schema is taken with type 'json_object' only"):
            llm.generate("json:", max_new_tokens=5, response_format=form)


UNFOLLOWABLE = [{"type": "grammar", "grammar": "start: start"},  # a rule that only calls itself: no text at all
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}]  # the same as a schema


def test_grammars_that_cannot_be_followed_are_the_requests_fault(live, llm):
    """A grammar llguidance compiles but that allows no text fails before any output: 400 naming
    response_format, streamed or not (it was a 500 with llguidance's parser dump); one whose lexer
    grows past llguidance's limits at a later token is a 400 too, or the stream's error event. The
    server serves on."""
    client = live.client()
    for fmt in UNFOLLOWABLE:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="tiny", prompt="?", max_tokens=3, stream=stream,
                                          extra_body={"response_format": fmt})
            assert e.value.param == "response_format" and "cannot be followed" in str(e.value), fmt
        with pytest.raises(openai.BadRequestError, match="cannot be followed"):
            client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=3, response_format=fmt)
    huge = {"type": "regex", "regex": "a{1000000}"}
    with pytest.raises(openai.BadRequestError, match="cannot be followed"):
        client.completions.create(model="tiny", prompt="?", max_tokens=3, extra_body={"response_format": huge})
    with pytest.raises(openai.APIError, match="cannot be followed"):
        list(client.completions.create(model="tiny", prompt="?", max_tokens=3, stream=True,
                                       extra_body={"response_format": huge}))
    assert client.completions.create(model="tiny", prompt="?", max_tokens=2).usage.completion_tokens == 2
    assert _get(live.url + "/health")["requests"] == 0


def test_grammars_llguidance_refuses_name_response_format_or_tools(live, llm):
    """A grammar, regex or JSON schema llguidance cannot compile was a 400 with param null, and the
    schema true or false was refused with llguidance's "Expecting object schema to apply options";
    each is a 400 naming response_format (tools, for a forced call whose parameters are the fault),
    the schema true allows any JSON value, as {} does."""
    client = live.client()
    bad = [{"type": "regex", "regex": "("}, {"type": "grammar", "grammar": "garbage"},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}]
    for fmt in bad:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=3, stream=stream,
                                               response_format=fmt)
            assert e.value.param == "response_format" and "not valid" in str(e.value), (fmt, e.value)
    anything = {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}
    reply = client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=40, response_format=anything)
    assert reply.choices[0].message.content is not None
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        odd = {"type": "function", "function": {"name": "odd", "parameters": {"type": "nonsense"}}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=3, tools=[odd],
                                           tool_choice="required")
        assert e.value.param == "tools[0].function.parameters" and "Invalid type" in str(e.value), e.value
    finally:
        llm.chat_template = old
    assert _get(live.url + "/health")["requests"] == 0


def test_invalid_tool_parameters_are_refused_in_every_tool_choice_mode(live, llm, tool_template):
    """A tool whose parameters no call can meet ({"type": "nonsense"}, a $ref to nowhere, a string
    for arguments) was refused (400) when a call was forced, its grammar made of them, but taken in
    tool_choice "auto" (or unset): the model was offered a tool no valid call reaches. Every mode
    now refuses it, param naming the tool's field, streamed or not."""
    client = live.client()
    for parameters, says in (({"type": "nonsense"}, "Invalid type"), ({"$ref": "#/nowhere"}, "'/nowhere'"),
                             ({"type": "string"}, "unsatisfiable")):
        odd = {"type": "function", "function": {"name": "odd", "parameters": parameters}}
        for choice in (None, "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
            for stream in (False, True):
                extra = {} if choice is None else {"tool_choice": choice}
                with pytest.raises(openai.BadRequestError) as e:
                    client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=3, stream=stream,
                                                   tools=[TIME, odd], **extra)
                assert e.value.param == "tools[1].function.parameters", (parameters, choice, e.value)
                assert "'odd'" in str(e.value) and says in str(e.value), (parameters, choice, e.value)
    # tool_choice "none" uses no tools: nothing to refuse
    unused = {"type": "function", "function": {"name": "odd", "parameters": {"type": "nonsense"}}}
    client.chat.completions.create(model="tiny", messages=_chat("?"), max_tokens=2, tool_choice="none",
                                   tools=[TIME, unused])
    assert _get(live.url + "/health")["requests"] == 0


def test_tool_schemas_with_keywords_llguidance_lacks_are_taken(live, llm, tool_template):
    """A tool whose parameters use a keyword llguidance does not implement (propertyNames: zod records,
    MCP tools) made the whole request a 400, whatever tool_choice said. The keyword is ignored, as
    llama.cpp's and vLLM's grammars ignore it: auto takes the tool, a forced call is still the
    schema's shape."""
    tools = [{"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"labels": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                                                    "additionalProperties": False}},
        "required": ["labels"], "additionalProperties": False}}}]
    client = live.client()
    for choice in ("auto", "required"):
        reply = client.chat.completions.create(model="tiny", messages=_chat("Tag it"), tools=tools, tool_choice=choice,
                                               max_tokens=200)
        if choice == "required":
            calls = reply.choices[0].message.tool_calls
            assert calls and all((c.function.name, json.loads(c.function.arguments)) == ("tag", {"labels": {}})
                                 for c in calls), tool_template


def test_grammars_that_cannot_be_followed_from_python(llm):
    from pyllm.errors import PyllmError

    pytest.importorskip("llguidance")
    for fmt in UNFOLLOWABLE:
        with pytest.raises(PyllmError, match="cannot be followed"):
            llm.generate("?", max_new_tokens=3, response_format=fmt, stream=True)  # refused before streaming
    with pytest.raises(PyllmError, match="cannot be followed"):
        llm.generate("?", max_new_tokens=3, grammar="start: a\na: a")


COLORS = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
    "type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                "minItems": 2, "maxItems": 3}},
    "required": ["colors"], "additionalProperties": False}}}


def test_stop_strings_cut_output_held_to_a_grammar_as_they_cut_free_text(live, llm):
    """A stop string applies to grammar-held output too (llama.cpp's and vLLM's servers cut it so;
    ignoring the caller's `stop` there would drop a value silently): met inside JSON, it cuts the
    reply there with finish_reason "stop", streamed or not, from Python and through the server; a
    forced tool call it cuts is no call, its text the content."""
    pytest.importorskip("llguidance")
    whole = llm.generate("Colors:", max_new_tokens=60, response_format=COLORS)
    pytest.importorskip("jsonschema").validate(json.loads(whole), COLORS["json_schema"]["schema"])
    for stop in (['"'], [", "], ["red", "green", "blue"]):
        cut = whole[:min(whole.find(s) for s in stop if s in whole)]
        assert llm.generate("Colors:", max_new_tokens=60, response_format=COLORS, stop=stop) == cut
        assert llm.last_stats.finish_reason == "stop" and llm.last_stats.stop_string in stop
        assert "".join(llm.generate("Colors:", max_new_tokens=60, response_format=COLORS, stop=stop,
                                    stream=True)) == cut
    client = live.client()
    for stream in (False, True):
        content, calls, finish = _reply(client, stream, model="tiny", messages=_chat("Colors?"), max_tokens=60,
                                        response_format=COLORS, stop=['"'])
        assert (finish, calls) == ("stop", []) and '"' not in (content or "")
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        for stream in (False, True):
            content, calls, finish = _reply(client, stream, model="tiny", messages=_chat("Weather?"),
                                            tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=80, stop=['"'])
            assert (calls, finish) == ([], "stop") and '"' not in (content or ""), (stream, content)
    finally:
        llm.chat_template = old


# -- tool calls ----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(params=["qwen2.5-base", "llama-3.1-json-tools", "mistral-v3-tools", "mistral-args-tools"])
def tool_template(request, llm):
    with open(os.path.join(TEMPLATES, request.param + ".jinja"), encoding="utf-8") as f:
        old, llm.chat_template = llm.chat_template, f.read()
    yield request.param
    llm.chat_template = old


def _script(llm, monkeypatch, text):
    """Makes the model write text (its tokens, then end-of-sequence) in every generation the server
    starts, with a logits processor: unlike a grammar, one that leaves stop strings their effect.
    text may be token ids (to write a special token)."""
    ids = llm.tokenize(text, add_special_tokens=False) if isinstance(text, str) else list(text)
    generate = llm.generate

    def scripted(prompt, **options):
        written = []

        def force(seq, scores):
            target = ids[len(written)] if len(written) < len(ids) else llm.tokenizer.eos_ids[0]
            written.append(target)
            out = np.full_like(scores, -np.inf)
            out[target] = 0.0
            return out
        return generate(prompt, logits_processors=[force], **options)
    monkeypatch.setattr(llm, "generate", scripted)


def _reply(client, stream, **options):
    """(content, [(name, arguments)], finish_reason) of one choice, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**options).choices[0]
        return (choice.message.content, [(c.function.name, json.loads(c.function.arguments))
                                         for c in choice.message.tool_calls or []], choice.finish_reason)
    chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [(d.function.name, json.loads(d.function.arguments))
             for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return content or None, calls, finish[0]


def _written_call(template, name, arguments):
    key = "parameters" if template.startswith("llama") else "arguments"
    return json.dumps({"name": name, key: arguments}, separators=(", ", ": "))


def _written_calls(template, calls):
    """The text a model writes for calls in template's format."""
    if template == "mistral-args-tools":  # [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}, one after another
        return "".join(f"[TOOL_CALLS]{name}[CALL_ID]abcDEF12{k}[ARGS]{json.dumps(args)}"
                       for k, (name, args) in enumerate(calls))
    texts = [_written_call(template, name, args) for name, args in calls]
    if template.startswith("qwen"):
        return "\n".join(f"<tool_call>\n{t}\n</tool_call>" for t in texts)
    if template.startswith("mistral"):
        return "[TOOL_CALLS] [" + ", ".join(texts) + "]"
    return "; ".join(texts)


def test_calls_are_parsed_only_from_the_text_returned(live, llm, tool_template, monkeypatch):
    """The parser read the reply's tokens, which hold the stop string that ended it: a call the
    stop string completed ('... {}}' cut at '}}') came back as tool_calls although the text
    returned holds no complete call. Calls are parsed from the returned text only."""
    written = _written_calls(tool_template, [("get_time", {})])
    _script(llm, monkeypatch, written)
    stop = {"mistral-v3-tools": "}]", "mistral-args-tools": "{}"}.get(tool_template, "}}")
    returned = written[:written.index(stop)]
    for stream in (False, True):
        content, calls, finish = _reply(live.client(), stream, model="tiny", messages=_chat("time?"),
                                        tools=[WEATHER, TIME], max_tokens=100, stop=[stop])
        assert (content, calls, finish) == (returned, [], "stop"), (stream, content, calls)
    # without the stop string, the same reply is a call
    for stream in (False, True):
        assert _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                      max_tokens=100)[1:] == ([("get_time", {})], "tool_calls")


def test_parallel_calls_cut_by_max_tokens_keep_the_complete_ones(live, llm, tool_template, monkeypatch):
    """Parallel calls (forced with tool_choice "required", or in auto mode) cut by max_tokens inside
    a later call lost every call, the complete ones too (the reply was text, the forced calls'
    JSON as content). The complete calls come back, the incomplete one is left out, and
    finish_reason is "length" (OpenAI's for a reply the token limit cut), streamed or not; a stop
    string that cuts a call short (auto mode) gives the complete ones with finish_reason "stop"."""
    calls = [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "CET"})]
    written = _written_calls(tool_template, calls)
    _script(llm, monkeypatch, written)
    ids = llm.tokenize(written, add_special_tokens=False)
    inside = written.rindex('"zone"')  # in the third call
    limit = next(k for k in range(len(ids)) if len(llm.tokenizer.decode(ids[:k])) > inside)
    options = dict(model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME], max_tokens=limit)
    for choice in ({"tool_choice": "required"}, {}):
        for stream in (False, True):
            assert _reply(live.client(), stream, **choice, **options) == (None, calls[:2], "length"), (choice, stream)
    options.update(max_tokens=len(ids) + 1, stop=['"CET"'])
    for stream in (False, True):
        assert _reply(live.client(), stream, **options) == (None, calls[:2], "stop"), stream


def test_a_forced_call_cut_before_its_end_is_no_content(live, llm, tool_template, monkeypatch):
    """A forced tool call (tool_choice "required" or a named function) that max_tokens cut before
    its first call was complete came back as content holding the format's raw markup
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro'): a client shows it as the
    assistant's text. A forced reply is calls only: content null, no calls, finish_reason "length",
    streamed or not."""
    written = _written_calls(tool_template, [("get_weather", {"city": "Rome", "days": 2})])
    _script(llm, monkeypatch, written)
    ids = llm.tokenize(written, add_special_tokens=False)
    inside = written.index('"Rome"')
    limit = next(k for k in range(len(ids)) if len(llm.tokenizer.decode(ids[:k])) > inside)
    options = dict(model="tiny", messages=_chat("weather?"), tools=[WEATHER, TIME], max_tokens=limit)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for stream in (False, True):
            reply = _reply(live.client(), stream, tool_choice=choice, **options)
            assert reply == (None, [], "length"), (choice, stream)


def test_text_around_calls_is_the_same_content_in_every_format_and_mode(live, llm, tool_template, monkeypatch):
    """Text before and after the calls came back differently per format (Hermes dropped the text
    after its calls, Mistral and Llama 3 made the whole reply text, Llama 3 dropped the text before
    <|python_tag|>) and per mode (a stream sent the whitespace before a call). Each format now gives
    the text before the calls, then the text after them, the same streamed or not."""
    calls = [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "days": 2})]
    written = _written_calls(tool_template, calls)
    if tool_template.startswith("llama"):
        written = "<|python_tag|>" + written
    _script(llm, monkeypatch, "Let me check. \n" + written + "\n\nBack soon.")
    for stream in (False, True):
        assert _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                      max_tokens=200) == ("Let me check.\nBack soon.", calls, "tool_calls"), stream


def test_special_tokens_in_the_text_around_calls_do_not_change_content(live, llm, tool_template, monkeypatch):
    """A special token in the text before a call (here <|im_start|>): the stream sent the text before
    the call without it (streamed pieces leave special tokens out), then found the parsed content,
    read from the reply decoded with its special tokens, not starting with what it had sent, and sent
    nothing more: the text after the calls was lost, and the reply not streamed held the special
    token. Content leaves out special tokens other than the format's own, streamed or not."""
    calls = [("get_time", {"zone": "UTC"})]
    written = _written_calls(tool_template, calls)
    if tool_template.startswith("llama"):
        written = "<|python_tag|>" + written
    _script(llm, monkeypatch, "Let me<|im_start|> check. \n" + written + "\n\nBack<|im_start|> soon.")
    for stream in (False, True):
        assert _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                      max_tokens=200) == ("Let me check.\nBack soon.", calls, "tool_calls"), stream


def test_reply_text_keeps_special_tokens_and_ends_where_the_text_does(llm):
    from pyllm.serve import reply_text

    special = llm.tokenizer.token_to_id("<|im_start|>")
    assert special in llm.tokenizer.special_ids
    ids = llm.tokenize("Sure.", False) + [special] + llm.tokenize(' [{"a": 1}]STOP and more', False)
    assert reply_text(llm.tokenizer, ids, 'Sure. [{"a": 1}]', True, {special}) == 'Sure.<|im_start|> [{"a": 1}]'
    whole = llm.tokenizer.decode(ids)
    assert reply_text(llm.tokenizer, ids, whole, False, {special}) == llm.tokenizer.decode(ids, skip_special_tokens=False)
    # a special token that is not the marker is no text of the reply
    assert reply_text(llm.tokenizer, ids, 'Sure. [{"a": 1}]', True) == 'Sure. [{"a": 1}]'
    assert reply_text(llm.tokenizer, ids, whole, False) == whole
    # the stream's tokens end with the returned text (a stop string's tokens are dropped): stopped all the same
    kept = llm.tokenize("Sure.", False) + [special] + llm.tokenize(' [{"a": 1}]', False)
    assert reply_text(llm.tokenizer, kept, 'Sure. [{"a": 1}]', True, {special}) == 'Sure.<|im_start|> [{"a": 1}]'


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stats_name_the_stop_string_that_ended_the_reply(llm, stream):
    """GenerationStats.stop_string (llama.cpp's stopping_word): the stop string that ended the reply,
    None when it ended otherwise; the server's tool-call parser reads it, as a stop string's tokens
    no longer come with the reply's."""
    reply = llm.generate("Once upon a time", max_new_tokens=12, stream=stream)
    text = "".join(reply) if stream else reply
    word = next(w for w in text.split() if len(w) > 2)
    out = llm.generate("Once upon a time", max_new_tokens=12, stop=["zzzq", word], stream=stream)
    stats = ("".join(out), out.stats)[1] if stream else llm.last_stats
    assert stats.stop_string == word and stats.finish_reason == "stop"
    unstopped = llm.generate("Once upon a time", max_new_tokens=12, stream=stream)
    stats = ("".join(unstopped), unstopped.stats)[1] if stream else llm.last_stats
    assert stats.stop_string is None


def test_reply_text_keeps_a_special_token_after_characters_split_across_tokens(llm):
    """A character of several bytes split across tokens decodes, cut inside, to U+FFFD: the search
    for the tokens the returned text holds took such a cut for the end of that text and stopped
    before a marker that followed (Mistral's special [TOOL_CALLS]), so a reply a stop string cut
    lost its calls (they came back as content)."""
    from pyllm.serve import reply_text

    special = llm.tokenizer.token_to_id("<|im_start|>")
    for n in range(1, 9):
        for after in ("", " x", " x x x"):
            before = "Sure " + "😀" * n
            ids = llm.tokenize(before, False) + [special] + llm.tokenize(' [{"a": 1}]' + after + "STOP more", False)
            text = before + ' [{"a": 1}]' + after
            assert reply_text(llm.tokenizer, ids, text, True, {special}) == before + '<|im_start|> [{"a": 1}]' + after, (
                n, after)


def test_calls_after_split_characters_survive_a_stop_string(live, llm, monkeypatch):
    """The same, through the server: a Mistral reply (its marker a special token; the tiny
    tokenizer's <|im_start|> stands in for [TOOL_CALLS]) with emoji before its call, cut by a stop
    string after the call, came back as content with no call."""
    from pyllm.tool_calls import Mistral

    monkeypatch.setattr(Mistral, "marker", "<|im_start|>")
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "mistral-v3-tools.jinja")).read()
    try:
        special = llm.tokenizer.token_to_id("<|im_start|>")
        for n in (3, 24, 30):  # the search's first halving lands inside the emoji from about 22 of them
            call = " [" + _written_call("mistral", "get_time", {}) + "] STOP more"
            with monkeypatch.context() as patch:
                _script(llm, patch, llm.tokenize("Sure " + "😀" * n, False) + [special] + llm.tokenize(call, False))
                for stream in (False, True):
                    got = _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                                 max_tokens=300, stop=["STOP"])
                    assert got == ("Sure " + "😀" * n, [("get_time", {})], "tool_calls"), (n, stream, got)
    finally:
        llm.chat_template = old


def test_special_tokens_in_the_content_of_a_reply_with_calls_are_no_text(live, llm, monkeypatch):
    """The parser read the reply decoded with every special token, not only the marker: a special
    token in the text around the calls (one that is no marker) came back as its text in the content
    ('Hi<|im_start|> there'), and a stream, whose pieces leave it out, then lost the text after the
    calls (its content no longer began with what was sent). Only the marker is kept."""
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        special = llm.tokenizer.token_to_id("<|im_start|>")
        written = " there " + _written_calls("qwen", [("get_time", {})]) + " Bye."
        _script(llm, monkeypatch, llm.tokenize("Hi", False) + [special] + llm.tokenize(written, False))
        for stream in (False, True):
            assert _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                          max_tokens=100) == ("Hi there\nBye.", [("get_time", {})], "tool_calls"), stream
    finally:
        llm.chat_template = old


def test_special_tool_call_tags_are_read_whichever_they_are(live, llm, monkeypatch):
    """A format's tags that are special tokens are read: Hermes's closing tag as well as its marker
    (the tiny tokenizer's <|im_start|> stands in for a special </tool_call>), parallel calls too."""
    from pyllm.tool_calls import Hermes, special_tag_ids

    monkeypatch.setattr(Hermes, "end", "<|im_start|>")
    special = llm.tokenizer.token_to_id("<|im_start|>")
    assert special_tag_ids(Hermes(), llm.tokenizer) == {special}
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        ids = []
        for name in ("get_time", "get_time"):
            ids += llm.tokenize("<tool_call>\n" + _written_call("qwen", name, {}) + "\n", False) + [special]
        _script(llm, monkeypatch, ids + llm.tokenize(" Done.", False))
        for stream in (False, True):
            assert _reply(live.client(), stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                          max_tokens=100) == ("Done.", [("get_time", {})] * 2, "tool_calls"), stream
    finally:
        llm.chat_template = old


def test_forced_tool_calls_round_trip(live, llm, tool_template):
    client = live.client()
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    pytest.importorskip("jsonschema").validate(arguments, schema)
    # a named function
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
    # streamed: tool_calls deltas, finish_reason tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                                 stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name,
                                                                          call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the result fed back through the template
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    reply = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER, TIME], max_tokens=4)
    assert reply.usage.prompt_tokens == len(llm.chat_prompt_ids(follow, tools=[WEATHER, TIME]))
    rendered = llm.apply_chat_template(pyllm.chat_template.normalize_messages(follow), tools=[WEATHER, TIME])
    assert "sunny, 21 C" in rendered and call.function.name in rendered


def test_streamed_calls_whose_marker_is_a_special_token_are_not_content(live, llm, monkeypatch):
    """Mistral's [TOOL_CALLS] is a special token: streamed pieces leave it out, so the stream never
    saw the marker and sent the call's JSON as content, then the same call again as tool_calls (the
    answer not streamed had content null). The marker is now seen among the piece's tokens. The
    tiny tokenizer has no [TOOL_CALLS]: its special <|im_start|> stands in for it."""
    from pyllm.tool_calls import Mistral

    monkeypatch.setattr(Mistral, "marker", "<|im_start|>")
    assert llm.tokenizer.token_to_id("<|im_start|>") in llm.tokenizer.special_ids
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "mistral-v3-tools.jinja")).read()
    try:
        client = live.client()
        messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
        for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
            options = dict(model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=80,
                           parallel_tool_calls=False, seed=1, temperature=1.0)
            whole = client.chat.completions.create(**options).choices[0]
            assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole
            chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
            assert content == "", content
            assert [(d.function.name, d.function.arguments) for d in calls] == [
                (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    finally:
        llm.chat_template = old


def test_mistral_args_calls_whose_tags_are_special_tokens(live, llm, monkeypatch):
    """Mistral's tokenizers have [TOOL_CALLS] and [ARGS] as special tokens (the tiny tokenizer's
    <|im_start|> and <|endoftext|> stand in for them): the reply the parser reads keeps both, the
    stream holds back from the marker on, and a forced call writes them as tokens, streamed or not."""
    from pyllm.tool_calls import MistralArgs

    monkeypatch.setattr(MistralArgs, "marker", "<|im_start|>")
    monkeypatch.setattr(MistralArgs, "args_tag", "<|endoftext|>")
    marker, args = (llm.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|endoftext|>"))
    assert {marker, args} <= llm.tokenizer.special_ids and args not in llm.tokenizer.eos_ids
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "mistral-args-tools.jinja")).read()
    try:
        client = live.client()
        ids = llm.tokenize("Sure.", False)
        for name, arguments in (("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "days": 2})):
            ids += [marker] + llm.tokenize(f"{name}[CALL_ID]abcDEF123", False) + [args]
            ids += llm.tokenize(json.dumps(arguments), False)
        with monkeypatch.context() as patch:
            _script(llm, patch, ids + llm.tokenize(" Done.", False))
            for stream in (False, True):
                assert _reply(client, stream, model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                              max_tokens=200) == ("Sure.\nDone.", [("get_time", {"zone": "UTC"}), (
                                  "get_weather", {"city": "Rome", "days": 2})], "tool_calls"), stream
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            options = dict(model="tiny", messages=_chat("Time?"), tools=[WEATHER, TIME], tool_choice=choice,
                           parallel_tool_calls=False, max_tokens=80, seed=3, temperature=1.0)
            whole = client.chat.completions.create(**options).choices[0]
            assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole
            content, calls, finish = _reply(client, True, **options)
            assert (content, finish) == (None, "tool_calls")
            assert calls == [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    finally:
        llm.chat_template = old


def test_parallel_tool_calls_false_returns_one_call(live, llm, tool_template):
    """In auto mode nothing held the model to one call: parallel_tool_calls false returned all it
    wrote (here two, written under a grammar). OpenAI's API gives at most one, the first."""
    key = "parameters" if tool_template.startswith("llama") else "arguments"
    call = lambda name, args: json.dumps({"name": name, key: args}, separators=(", ", ": "))  # noqa: E731
    first, second = call("get_time", {"zone": "UTC"}), call("get_weather", {"city": "Rome", "days": 2})
    text = {"qwen2.5-base": f"<tool_call>\n{first}\n</tool_call>\n<tool_call>\n{second}\n</tool_call>",
            "mistral-v3-tools": f"[TOOL_CALLS] [{first}, {second}]",
            "mistral-args-tools": _written_calls("mistral-args-tools", [("get_time", {"zone": "UTC"}),
                                                                        ("get_weather", {"city": "Rome", "days": 2})]),
            "llama-3.1-json-tools": f"{first}; {second}"}[tool_template]
    options = dict(model="tiny", messages=_chat("Time and weather?"), tools=[WEATHER, TIME], max_tokens=600,
                   response_format={"type": "grammar", "grammar": f"start: {json.dumps(text)}"})
    for parallel, names in ((True, ["get_time", "get_weather"]), (False, ["get_time"])):
        choice = live.client().chat.completions.create(parallel_tool_calls=parallel, **options).choices[0]
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == names
        chunks = [c for c in live.client().chat.completions.create(parallel_tool_calls=parallel, stream=True,
                                                                    **options) if c.choices]
        assert [d.function.name for c in chunks for d in (c.choices[0].delta.tool_calls or [])] == names


def test_forced_tool_calls_take_response_format_text(live, llm):
    """response_format {"type": "text"} (the default; some clients always send it) with a forced
    tool call was refused as "a forced tool call and response_format cannot be combined"; a
    format that constrains the reply still is."""
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        client = live.client()
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            for stream in (False, True):
                reply = client.chat.completions.create(model="tiny", messages=_chat("Time?"), tools=[WEATHER, TIME],
                                                       tool_choice=choice, parallel_tool_calls=False, max_tokens=80,
                                                       response_format={"type": "text"}, stream=stream)
                chunks = list(reply) if stream else [reply]
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                assert finish == ["tool_calls"], (choice, stream, chunks[-1])
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=_chat("Time?"), tools=[WEATHER, TIME],
                                               tool_choice=choice, max_tokens=8,
                                               response_format={"type": "json_object"})
            assert e.value.param == "response_format"
    finally:
        llm.chat_template = old


def test_tools_with_a_template_without_tool_support_are_refused(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_chat("hi"), tools=[WEATHER], max_tokens=4)
    assert e.value.param == "tools" and "does not support tools" in str(e.value)
    # tool_choice "none": the tools are not used, so no refusal
    client.chat.completions.create(model="tiny", messages=_chat("hi"), tools=[WEATHER], tool_choice="none",
                                   max_tokens=2)


# -- server surface ------------------------------------------------------------------------------

def test_model_card_tokenize_detokenize(live, llm):
    client = live.client()
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")

    def post(path, body):
        request = urllib.request.Request(live.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    tokens = post("/tokenize", {"content": "Paris is 中文"})["tokens"]
    assert tokens == llm.tokenize("Paris is 中文")
    assert post("/tokenize", {"content": "Paris", "add_special": False})["tokens"] == llm.tokenize("Paris", False)
    # parse_special (llama.cpp's field) was ignored: a special token's string was always the special token
    marked = "<|im_end|>Paris"
    special = post("/tokenize", {"content": marked})["tokens"]
    assert llm.tokenizer.token_to_id("<|im_end|>") in special and special == llm.tokenize(marked)
    plain = post("/tokenize", {"content": marked, "parse_special": False})["tokens"]
    assert plain == llm.tokenize(marked, parse_special=False) and llm.tokenizer.token_to_id("<|im_end|>") not in plain
    assert post("/tokenize", {"content": marked, "parse_special": True})["tokens"] == special
    assert post("/tokenize", {"content": marked, "parse_special": None})["tokens"] == special  # null: the default
    for bad in ("no", 0, "false"):  # a wrong type is refused, naming the field, not read as either
        with pytest.raises(urllib.error.HTTPError) as e:
            post("/tokenize", {"content": marked, "parse_special": bad})
        assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "parse_special"
    # with_pieces (llama.cpp's): {"id", "piece"}, the piece's bytes as numbers where they split a character
    pieces = post("/tokenize", {"content": "Paris is 中文 😀", "with_pieces": True})
    emoji = llm.tokenize("Paris is 中文 😀")
    assert [t["id"] for t in pieces["tokens"]] == emoji and pieces["count"] == len(emoji)
    joined = b"".join(t["piece"].encode() if isinstance(t["piece"], str) else bytes(t["piece"])
                      for t in pieces["tokens"])
    assert joined.decode() == llm.detokenize(emoji)
    split = [t for t in pieces["tokens"] if not isinstance(t["piece"], str)]  # the emoji's bytes, byte-level
    assert split and all(all(0 <= b < 256 for b in t["piece"]) for t in split)
    assert any(isinstance(t["piece"], str) and t["piece"] for t in pieces["tokens"])
    assert post("/tokenize", {"content": "Paris", "with_pieces": False})["tokens"] == llm.tokenize("Paris")
    with pytest.raises(urllib.error.HTTPError) as e:
        post("/tokenize", {"content": "Paris", "with_pieces": "yes"})
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "with_pieces"
    assert post("/detokenize", {"tokens": tokens})["content"] == llm.detokenize(tokens)
    with pytest.raises(urllib.error.HTTPError) as e:
        post("/detokenize", {"tokens": [10 ** 9]})
    assert e.value.code == 400



def test_unknown_routes_and_methods_get_openai_errors(live):
    """A path the server does not have, or a method its route does not take, is answered with
    OpenAI's error object like every other refusal (Starlette answered in plain text)."""
    for method, path, status in [("POST", "/v1/audio/speech", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("GET", "/nothing/here", 404)]:
        request = urllib.request.Request(live.url + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        reply = json.loads(e.value.read())
        assert e.value.code == status and path in reply["error"]["message"], reply
        assert reply["error"]["type"] == "invalid_request_error"
        assert (e.value.headers.get("allow") is not None) == (status == 405)  # the methods it takes
    with pytest.raises(openai.NotFoundError, match="/v1/chat/completions"):
        live.client().images.generate(prompt="hi")


def test_every_route_takes_a_trailing_slash(live, llm):
    """GET /v1/models/ and every other route written with a trailing slash, or with "//" (as
    OpenAI-compatible clients given a base URL ending in "/" build them) was refused: /v1/models/ as
    the model "", a POST with a 307 redirect that clients do not follow (one that does may drop the
    body), "//v1/models" with a 404. Each is its route, answered as without the slash; a path that
    is no route stays a 404."""
    assert _get(live.url + "/v1/models/") == _get(live.url + "/v1/models")
    assert _get(live.url + "/v1/models/tiny/")["id"] == "tiny"
    assert _get(live.url + "/health/")["status"] == "ok"
    for path, body in [("/v1/completions/", {"prompt": "Paris is", "max_tokens": 3}),
                       ("/v1/chat/completions/", {"messages": _chat("hi"), "max_tokens": 3}),
                       ("/v1/embeddings/", {"input": "hi"}), ("/tokenize/", {"content": "hi"}),
                       ("/detokenize/", {"tokens": [5, 6]})]:
        status, reply = _post_json(live, path, body)
        assert status == 200 and "error" not in reply, (path, reply)
        assert _post_json(live, path.rstrip("/"), body)[1].keys() == reply.keys()
    client = openai.OpenAI(base_url=live.url + "/v1/", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = llm.generate("Paris is", max_new_tokens=4)
    assert client.completions.create(model="tiny", prompt="Paris is", max_tokens=4).choices[0].text == expected
    # runs of "/" are one, as nginx merges them (a base URL "http://host/" joined with "/v1/...")
    assert _get(live.url + "//v1/models//") == _get(live.url + "/v1/models")
    assert _post_json(live, "//v1//completions", {"prompt": "Paris is", "max_tokens": 4})[1]["choices"][0]["text"] \
        == expected
    for path in ("/v1/nothing/", "/v1/models/nothing/", "//"):
        status, reply = _request(live.url + path, None)
        assert status == 404 and reply["error"]["type"] == "invalid_request_error", (path, reply)


def test_a_failure_outside_the_request_handlers_is_an_openai_error(live, monkeypatch):
    """A route that fails outside the handlers' own error handling (here /v1/models, made to raise)
    was answered by Starlette in plain text ("Internal Server Error"); it is OpenAI's error object,
    a 500 of type server_error naming the failure, as the handlers' own 500s are."""
    def broken():
        raise RuntimeError("the model list is broken")
    monkeypatch.setattr(live.api, "_model_ids", broken)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(live.url + "/v1/models", timeout=10)
    assert e.value.code == 500 and e.value.headers["content-type"] == "application/json"
    error = json.loads(e.value.read())["error"]
    assert error["type"] == "server_error" and "the model list is broken" in error["message"], error


def test_api_key_and_cors(llm):
    server = LiveServer(llm, api_key="s3cret", cors_origins=["http://app.example"])
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=1).usage.completion_tokens == 1
        for path in ("/health", "/health/"):  # open for load balancers
            with urllib.request.urlopen(server.url + path, timeout=5) as r:
                assert r.status == 200
        with pytest.raises(openai.AuthenticationError):  # a trailing slash is the route, behind the key too
            openai.OpenAI(base_url=server.url + "/v1/", api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=server.url + "/v1/", api_key="s3cret",
                                            max_retries=0).models.list().data] == ["tiny"]
        preflight = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        with urllib.request.urlopen(preflight, timeout=5) as r:
            assert r.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        server.stop()


def test_refused_cors_preflights_get_openai_errors(llm):
    """A CORS preflight from an origin not allowed, or for a method the server does not take, was
    refused in plain text ("Disallowed CORS origin"); it is OpenAI's error object, saying which flag
    allows origins."""
    server = LiveServer(llm, cors_origins=["http://app.example"])
    try:
        for origin, method, what in (("http://evil.example", "POST", "origin"),
                                     ("http://app.example", "PUT", "method")):
            preflight = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": method})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(preflight, timeout=5)
            assert e.value.code == 400 and e.value.headers["content-type"] == "application/json"
            error = json.loads(e.value.read())["error"]
            assert what in error["message"] and "--cors-origin" in error["message"], error
    finally:
        server.stop()


def test_auto_tool_choice_parses_what_the_model_writes(live, llm):
    """tool_choice auto: a reply holding a call in the template's format becomes tool_calls (the
    reply is steered here with a regex, as a model would write it), text before it is content."""
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen2.5-base.jinja")).read()
    try:
        written = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
        steer = {"type": "regex", "regex": re.escape(written)}
        client = live.client()
        reply = client.chat.completions.create(model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                                               max_tokens=300, response_format=steer)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_time", {"zone": "CET"})]
        chunks = list(client.chat.completions.create(model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                                                     max_tokens=300, response_format=steer, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content.strip() == "Checking." and "<tool_call>" not in content
        calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.function.name for d in calls] == ["get_time"]
        # a plain reply stays plain
        plain = client.chat.completions.create(model="tiny", messages=_chat("time?"), tools=[WEATHER, TIME],
                                               max_tokens=300, response_format={"type": "regex", "regex": "It is noon"})
        assert plain.choices[0].message.content == "It is noon" and not plain.choices[0].message.tool_calls
    finally:
        llm.chat_template = old


@pytest.mark.parametrize("template, written", [
    ("llama-3.1-json-tools", '{"name": "Bob", "age": 3}'),
    ("llama-3.1-json-tools", '{"name": "set_alarm", "parameters": {"at": "7:00"}}'),
    ("qwen2.5-base", 'Sure.\n<tool_call>\n{"name": "set_alarm", "arguments": {}}\n</tool_call>')])
def test_replies_naming_undeclared_functions_stay_content(live, llm, template, written):
    """tool_choice auto with a Llama 3 template: a JSON answer {"name": "Bob", "age": 3} came back
    as a call to a function "Bob" (arguments {}, "age" lost, finish_reason tool_calls); a call to a
    function the request did not declare is the reply's text, streamed or not."""
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, template + ".jinja")).read()
    try:
        steer = {"type": "regex", "regex": re.escape(written)}
        client = live.client()
        reply = client.chat.completions.create(model="tiny", messages=_chat("a person?"), tools=[WEATHER, TIME],
                                               max_tokens=300, response_format=steer)
        choice = reply.choices[0]
        assert choice.message.content == written and not choice.message.tool_calls, choice
        assert choice.finish_reason != "tool_calls"
        chunks = list(client.chat.completions.create(model="tiny", messages=_chat("a person?"), tools=[WEATHER, TIME],
                                                     max_tokens=300, response_format=steer, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == written
        assert not [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    finally:
        llm.chat_template = old


def test_model_names_with_colons_are_the_base_model(live, llm):
    """"model" is accepted whatever it names, but one with a colon was taken for "BASE:ADAPTER" and
    refused (404): an Ollama-style "llama3.1:8b", a fine-tune's "ft:gpt-4o-mini:org::id", and a server's
    own --model-name "tiny:v1" (the id its /v1/models lists). Only BASE:NAME of this model with a NAME
    it lacks is a 404."""
    expected = live.client().completions.create(model="tiny", prompt="Paris is", max_tokens=4).choices[0].text
    for model in ("llama3.1:8b", "ft:gpt-4o-mini:org::id", "x:", ":", "tiny:base"):
        reply = live.client().completions.create(model=model, prompt="Paris is", max_tokens=4)
        assert reply.choices[0].text == expected, model
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="tiny:nope", prompt="hi", max_tokens=2)
    server = LiveServer(llm, name="tiny:v1")
    try:
        client = server.client()
        (card,) = client.models.list().data
        reply = client.completions.create(model=card.id, prompt="Paris is", max_tokens=4)
        assert card.id == "tiny:v1" and reply.choices[0].text == expected
        reply = client.chat.completions.create(model=card.id, messages=_chat("hi"), max_tokens=2)
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny:v1:nope", prompt="hi", max_tokens=2)
    finally:
        server.stop()


def test_answers_name_the_model_the_client_asked_for(live):
    """Answers and stream chunks named the server's model whatever the request's "model" was
    ("BASE:ADAPTER" answered as BASE, "gpt-4o" as "tiny"); they echo it, as OpenAI and llama-server
    do (embeddings did already), and name the server's model when the request names none."""
    client = live.client()
    for model in ("tiny", "gpt-4o", "llama3.1:8b"):
        assert client.completions.create(model=model, prompt="hi", max_tokens=1).model == model
        assert client.chat.completions.create(model=model, messages=_chat("hi"), max_tokens=1).model == model
        chunks = list(client.chat.completions.create(model=model, messages=_chat("hi"), max_tokens=2, stream=True))
        assert {c.model for c in chunks} == {model}
        chunks = list(client.completions.create(model=model, prompt="hi", max_tokens=2, stream=True))
        assert {c.model for c in chunks} == {model}
        assert client.embeddings.create(model=model, input="hi").model == model
    status, reply = _post_json(live, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 200 and reply["model"] == "tiny"


def test_max_tokens_past_the_context_is_refused_as_openai_does(live, llm):
    """max_tokens larger than what the prompt leaves of the context was cut to fit in silence (a
    reply ended "length" well short of what was asked, with no word why); OpenAI refuses it (400
    "This model's maximum context length is N tokens. However, you requested ...", code
    context_length_exceeded), and so does the server now, on both endpoints, streamed or not, naming
    the field given. A request that leaves max_tokens unset (or -1) still runs until the context is full."""
    context = llm.context_length
    prompt = "The quick brown fox"
    used = len(llm.tokenize(prompt))
    chat_used = len(llm.chat_prompt_ids(_chat(prompt)))
    cases = [("/v1/completions", {"prompt": prompt, "max_tokens": context - used + 1}, "max_tokens", used),
             ("/v1/completions", {"prompt": ["hi", prompt], "max_tokens": context - used + 1}, "max_tokens", used),
             ("/v1/chat/completions", {"messages": _chat(prompt), "max_tokens": context - chat_used + 1}, "max_tokens",
              chat_used),
             ("/v1/chat/completions", {"messages": _chat(prompt), "max_completion_tokens": context},
              "max_completion_tokens", chat_used)]
    for path, body, param, tokens in cases:
        for stream in (False, True):
            status, reply = _post_json(live, path, {**body, "stream": stream})
            assert status == 400, (path, body, reply)
            error = reply["error"]
            assert error["param"] == param and error["code"] == "context_length_exceeded", error
            assert f"maximum context length is {context} tokens" in error["message"], error
            assert f"{tokens} in the" in error["message"], error
    # what fits is taken
    status, reply = _post_json(live, "/v1/completions", {"prompt": prompt, "max_tokens": context - used,
                                                          "stop_token_ids": list(range(llm.config.vocab_size))})
    assert status == 200, reply


def test_errors_carry_openai_s_codes(live, llm):
    """A model this server lacks (a route's 404 and a request's) and an input past the context had
    code null; they carry OpenAI's codes, model_not_found and context_length_exceeded, which
    clients (LiteLLM, LangChain) read to tell such errors apart."""
    client = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="tiny:nope", prompt="hi", max_tokens=1)
    assert e.value.code == "model_not_found"
    for call in (lambda: client.embeddings.create(model="tiny", input=[[5] * (llm.context_length + 1)]),
                 lambda: client.completions.create(model="tiny", prompt=[5] * llm.context_length, max_tokens=1)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.code == "context_length_exceeded", e.value


def test_embeddings_endpoint_with_the_openai_client(live, llm):
    import base64

    import numpy as np

    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    reply = client.embeddings.create(model="tiny", input=["Paris", "def main():"])
    assert [d.index for d in reply.data] == [0, 1] and reply.usage.prompt_tokens > 0
    expected = llm.embed(["Paris", "def main():"])
    np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, atol=1e-6)
    raw = client.embeddings.with_raw_response.create(model="tiny", input="Paris", encoding_format="base64")
    packed = raw.http_response.json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(packed), "<f4"), expected[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="Paris", dimensions=3)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input=[])


# -- every request field, as OpenAI's API reference types it ----------------------------------------

_HI = [{"role": "user", "content": "hi"}]
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_BASE = {"chat": {"messages": _HI}, "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}
_LIMITS = ("max_tokens", "max_completion_tokens", "n_predict")
_OK = None  # accepted: 200


def _schema(**fields):
    return {"response_format": {"type": "json_schema", "json_schema": fields}}


# (endpoint, fields beside the endpoint's minimal body, the param a 400 names (None: 200), OpenAI's code or None)
FIELD_CASES = [
    # sampling: types and OpenAI's ranges, on both endpoints; null is the default
    *[(e, f, p, c) for e in ("chat", "completions") for f, p, c in [
        ({}, _OK, None), ({"temperature": 0}, _OK, None), ({"temperature": 2}, _OK, None),
        ({"temperature": None}, _OK, None),
        ({"temperature": 2.01}, "temperature", "decimal_above_max_value"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"temperature": "1"}, "temperature", "invalid_type"),
        # an integer given for a float field: the field's kind names the code (was integer_below_min_value)
        ({"temperature": 3}, "temperature", "decimal_above_max_value"),
        ({"repeat_penalty": 0}, "repeat_penalty", "decimal_below_min_value"),
        ({"typical_p": 0}, "typical_p", "decimal_below_min_value"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "decimal_above_max_value"),
        ({"top_p": 1}, _OK, None), ({"top_p": 1.01}, "top_p", "decimal_above_max_value"),
        ({"top_p": True}, "top_p", "invalid_type"),
        ({"n": 1}, _OK, None), ({"n": 0}, "n", "integer_below_min_value"), ({"n": 129}, "n", "integer_above_max_value"),
        ({"n": 1.0}, "n", "invalid_type"),
        ({"presence_penalty": -2}, _OK, None),
        ({"presence_penalty": 2.01}, "presence_penalty", "decimal_above_max_value"),
        ({"frequency_penalty": -2.01}, "frequency_penalty", "decimal_below_min_value"),
        ({"frequency_penalty": "0"}, "frequency_penalty", "invalid_type"),
        ({"logit_bias": {"5": -100, "6": 100}}, _OK, None),
        ({"logit_bias": {"5": 100.5}}, "logit_bias", "decimal_above_max_value"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "invalid_value"), ({"logit_bias": [1]}, "logit_bias", "invalid_type"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", None),  # past the vocabulary
        ({"stop": "a"}, _OK, None), ({"stop": ["a", "b", "c", "d"]}, _OK, None),
        ({"stop": ["s"] * 16}, _OK, None),  # pyllm takes 16 (OpenAI 4)
        ({"stop": ["s"] * 17}, "stop", "array_above_max_length"), ({"stop": 5}, "stop", "invalid_type"),
        ({"stop": [1]}, "stop", "invalid_type"),
        ({"seed": -1}, _OK, None), ({"seed": 2**63 - 1}, _OK, None), ({"seed": "1"}, "seed", "invalid_type"),
        ({"seed": 1.5}, "seed", "invalid_type"), ({"seed": 2**64}, "seed", "integer_above_max_value"),
        ({"user": "u1"}, _OK, None), ({"user": 5}, "user", "invalid_type"),
        ({"model": 5}, "model", "invalid_type"), ({"some_future_field": {"x": 1}}, _OK, None),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"include_usage": True}}, _OK, None),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": -2}, "max_tokens", "integer_below_min_value"),
        ({"max_tokens": "5"}, "max_tokens", "invalid_type"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"response_format": {}}, "response_format.type", "missing_required_parameter"),  # (ran as free text)
        # json_schema: name required, OpenAI's characters and length; strict, description and schema typed
        (_schema(schema={"type": "object"}), "response_format.json_schema.name", "missing_required_parameter"),
        (_schema(name="a b"), "response_format.json_schema.name", "invalid_value"),
        (_schema(name="a.b"), "response_format.json_schema.name", "invalid_value"),
        (_schema(name="n" * 65), "response_format.json_schema.name", "invalid_value"),
        (_schema(name=5), "response_format.json_schema.name", "invalid_type"),
        (_schema(name="n" * 64, description="d", strict=True, schema={"type": "string", "maxLength": 3}), _OK, None),
        (_schema(name="x-y_1"), _OK, None),
        (_schema(name="x", strict="yes"), "response_format.json_schema.strict", "invalid_type"),
        (_schema(name="x", description=5), "response_format.json_schema.description", "invalid_type"),
        (_schema(name="x", schema=[1]), "response_format.json_schema.schema", "invalid_type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_value"),
        # a format's field beside another type was ignored: free text where a schema was meant
        ({"response_format": {"type": "text", "json_schema": {"name": "x"}}}, "response_format.json_schema",
         "invalid_value"),
        ({"response_format": {"type": "json_object", "regex": "a+"}}, "response_format.regex", "invalid_value"),
    ]],
    # chat only
    ("chat", {"max_completion_tokens": 1}, _OK, None),
    ("chat", {"max_tokens": None, "max_completion_tokens": 1}, _OK, None),
    # both limits: OpenAI refuses them ("Setting 'max_tokens' and 'max_completion_tokens' at the same time is not
    # supported", code invalid_parameter_combination); max_completion_tokens won in silence
    ("chat", {"max_tokens": 5, "max_completion_tokens": 1}, "max_tokens", "invalid_parameter_combination"),
    ("chat", {"max_tokens": 1, "max_completion_tokens": 1}, "max_tokens", "invalid_parameter_combination"),
    ("chat", {"n_predict": 1, "max_completion_tokens": 1}, "max_tokens", "invalid_parameter_combination"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens", "integer_below_min_value"),
    # one option under two of its names (llama.cpp's and OpenAI's): the first was taken, the other dropped
    *[(e, f, p, "invalid_parameter_combination") for e in ("chat", "completions") for f, p in [
        ({"max_tokens": 1, "n_predict": 7}, "max_tokens"),
        ({"repetition_penalty": 1.1, "repeat_penalty": 1.3}, "repetition_penalty")]],
    ("chat", {"logprobs": True, "top_logprobs": 20}, _OK, None), ("chat", {"logprobs": 1}, "logprobs", "invalid_type"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("chat", {"messages": []}, "messages", "empty_array"), ("chat", {"messages": "hi"}, "messages", "invalid_type"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, _OK, None),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name", "invalid_type"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, _OK, None),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", None),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a"}}]}]},
     "messages[0].content[0].type", "unsupported_value"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                          "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0].type", "unsupported_value"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "video", "text": "hi"}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ("chat", {"messages": [*_HI, {"role": "assistant", "content": None, "tool_calls": [_CALL]},
                           {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}, _OK, None),
    # a tool message answers a call: OpenAI requires its tool_call_id
    ("chat", {"messages": [*_HI, {"role": "assistant", "content": None, "tool_calls": [_CALL]},
                           {"role": "tool", "content": "ok"}]},
     "messages[2].tool_call_id", "missing_required_parameter"),
    # an assistant's tool calls, as OpenAI requires them (they reached the template, which failed or dropped parts)
    *[("chat", {"messages": [*_HI, {"role": "assistant", "tool_calls": [call]}, *_HI]}, param, code)
      for call, param, code in [
          ({**_CALL, "function": {"name": "f", "arguments": {"a": 1}}}, _OK, None),  # an object, as templates take it
          ({k: v for k, v in _CALL.items() if k != "id"}, "messages[1].tool_calls[0].id", "missing_required_parameter"),
          ({**_CALL, "type": "tool"}, "messages[1].tool_calls[0].type", "invalid_value"),
          ({**_CALL, "function": {"name": "f"}}, "messages[1].tool_calls[0].function.arguments",
           "missing_required_parameter"),
          ({**_CALL, "function": {"name": "f", "arguments": 5}}, "messages[1].tool_calls[0].function.arguments",
           "invalid_type"),
          ("f", "messages[1].tool_calls[0]", "invalid_type")]],
    ("chat", {"tools": [_TOOL], "tool_choice": "none"}, _OK, None), ("chat", {"tools": []}, "tools", "empty_array"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "invalid_value"),
    ("chat", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "invalid_value"),
    ("chat", {"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters", "invalid_type"),
    ("chat", {"tools": [_TOOL], "tool_choice": "always"}, "tool_choice", "invalid_value"),
    # a named choice's own fault, not "should be 'none', 'auto' or 'required'" (the union's string branch)
    ("chat", {"tools": [_TOOL], "tool_choice": {"type": "function"}}, "tool_choice.function",
     "missing_required_parameter"),
    ("chat", {"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": 5}}},
     "tool_choice.function.name", "invalid_type"),
    ("chat", {"tools": [_TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto"}}},
     "tool_choice.type", "invalid_value"),
    ("chat", {"tools": [_TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_type"),
    ("chat", {"functions": [{"name": "f"}]}, "functions", "invalid_value"),
    # OpenAI's fields for its own services: typed, then ignored
    ("chat", {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "prompt_cache_key": "k",
              "safety_identifier": "s", "prediction": {"type": "content", "content": "hi"}}, _OK, None),
    ("chat", {"store": "yes"}, "store", "invalid_type"), ("chat", {"metadata": {"k": 1}}, "metadata.k", "invalid_type"),
    ("chat", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_length"),
    ("chat", {"metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
    ("chat", {"service_tier": "gold"}, "service_tier", "invalid_value"),
    ("chat", {"safety_identifier": "s" * 129}, "safety_identifier", "string_above_max_length"),
    ("chat", {"prediction": {"type": "guess", "content": "hi"}}, "prediction.type", "invalid_value"),
    ("chat", {"prediction": {"type": "content"}}, "prediction.content", "missing_required_parameter"),
    # what pyllm cannot give is refused, not ignored
    ("chat", {"modalities": ["text"]}, _OK, None), ("chat", {"verbosity": "medium"}, _OK, None),
    ("chat", {"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ("chat", {"modalities": ["video"]}, "modalities[0]", "invalid_value"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ("chat", {"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ("chat", {"verbosity": "low"}, "verbosity", "unsupported_value"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),  # the template has no levels
    ("chat", {"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_value"),
    # the other endpoint's fields were ignored in silence
    ("chat", {"echo": True}, "echo", "unsupported_parameter"),
    ("chat", {"suffix": "x"}, "suffix", "unsupported_parameter"),
    ("chat", {"best_of": 2}, "best_of", "unsupported_parameter"),
    ("completions", {"max_completion_tokens": 3}, "max_completion_tokens", "unsupported_parameter"),
    ("completions", {"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ("completions", {"tools": [_TOOL]}, "tools", "unsupported_parameter"),
    ("completions", {"messages": _HI}, "messages", "unsupported_parameter"),
    ("completions", {"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ("completions", {"verbosity": "low"}, "verbosity", "unsupported_parameter"),
    # completions only
    ("completions", {"prompt": [1, 2]}, _OK, None), ("completions", {"prompt": [[1, 2], [3]]}, _OK, None),
    ("completions", {"prompt": ["a", "b"]}, _OK, None), ("completions", {"prompt": []}, "prompt", None),
    ("completions", {"prompt": [[]]}, "prompt", None), ("completions", {"prompt": [True]}, "prompt", None),
    ("completions", {"prompt": 5}, "prompt", None), ("completions", {"prompt": ["a", [1]]}, "prompt", None),
    ("completions", {"logprobs": 5}, _OK, None),
    ("completions", {"logprobs": 21}, "logprobs", "integer_above_max_value"),
    ("completions", {"logprobs": True}, "logprobs", "invalid_type"),
    ("completions", {"echo": "y"}, "echo", "invalid_type"), ("completions", {"best_of": 2}, "best_of", "invalid_value"),
    ("completions", {"suffix": "x"}, "suffix", "invalid_value"),
    ("completions", {"max_tokens": 0, "echo": True}, _OK, None),
    # embeddings: a text, texts, token ids or lists of them; float or base64; this model's dimensions
    ("embeddings", {"input": ["a", "b"]}, _OK, None), ("embeddings", {"input": [1, 2]}, _OK, None),
    ("embeddings", {"input": [[1, 2], [3]]}, _OK, None), ("embeddings", {"input": "hi", "user": "u"}, _OK, None),
    ("embeddings", {"encoding_format": "base64"}, _OK, None), ("embeddings", {"encoding_format": "float"}, _OK, None),
    ("embeddings", {"input": []}, "input", None), ("embeddings", {"input": [[]]}, "input", None),
    ("embeddings", {"input": ""}, "input", None), ("embeddings", {"input": [""]}, "input", None),
    ("embeddings", {"input": [-1]}, "input", "integer_below_min_value"),
    ("embeddings", {"input": ["a", [1]]}, "input", "invalid_type"),
    ("embeddings", {"input": 5}, "input", "invalid_type"),
    ("embeddings", {"input": [99999999]}, "input", None),
    ("embeddings", {"encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ("embeddings", {"dimensions": 0}, "dimensions", "integer_below_min_value"),
    ("embeddings", {"dimensions": "5"}, "dimensions", "invalid_type"),
    ("embeddings", {"dimensions": 3}, "dimensions", None),
    ("embeddings", {"user": 5}, "user", "invalid_type"), ("embeddings", {"model": 5}, "model", "invalid_type"),
]


@pytest.mark.parametrize("endpoint, fields, param, code", FIELD_CASES,
                         ids=[f"{e}-{json.dumps(f)[:60]}" for e, f, _, _ in FIELD_CASES])
def test_every_request_field_is_checked_as_openai_types_it(live, endpoint, fields, param, code):
    """One row per field and fault, after OpenAI's API reference: a value OpenAI takes is answered
    (200), a wrong type, a value out of range, a field of the other endpoint or one asking for what
    pyllm cannot give is a 400 with OpenAI's error object naming the field (param) and its code;
    never a 500, never taken in silence."""
    body = {**_BASE[endpoint], **fields}
    if endpoint != "embeddings" and not any(k in fields for k in _LIMITS):
        body["max_tokens"] = 1
    path = f"/v1/{endpoint}" if endpoint != "chat" else "/v1/chat/completions"
    if param is _OK and body.get("stream"):
        with urllib.request.urlopen(urllib.request.Request(live.url + path, data=json.dumps(body).encode()),
                                    timeout=60) as r:
            assert r.status == 200 and r.read().endswith(b"data: [DONE]\n\n")
        return
    status, reply = _post_json(live, path, body)
    if param is _OK:
        assert status == 200, reply
        return
    assert status == 400, (body, reply)
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert isinstance(error["message"], str) and param.split("[")[0].split(".")[0] in error["message"], error
    if code is not None:
        assert error["code"] == code, (body, error)


def test_answers_have_openai_s_fields(live):
    """The answers' shapes, as OpenAI's reference gives them: system_fingerprint in every answer and
    chunk, usage with prompt_tokens_details and completion_tokens_details (they lacked the latter and
    system_fingerprint), the message's and the logprobs' refusal (null), and with
    stream_options.include_usage a usage of null in each chunk but a last one with no choices and the usage."""
    client = live.client()
    usage_keys = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                  "completion_tokens_details"}
    status, reply = _post_json(live, "/v1/chat/completions", {"messages": _HI, "max_tokens": 3, "logprobs": True})
    assert status == 200
    assert set(reply) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert set(reply["choices"][0]["message"]) == {"role", "content", "refusal"}
    assert set(reply["choices"][0]["logprobs"]) == {"content", "refusal"}
    assert set(reply["usage"]) == usage_keys and reply["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    chat = client.chat.completions.create(model="tiny", messages=_HI, max_tokens=3)
    fingerprint = chat.system_fingerprint
    assert fingerprint.startswith("fp_") and chat.choices[0].message.refusal is None
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens_details.reasoning_tokens == 0
    text = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert text.system_fingerprint == fingerprint and text.usage.prompt_tokens_details.cached_tokens >= 0
    for stream in (client.chat.completions.create(model="tiny", messages=_HI, max_tokens=3, n=2, stream=True,
                                                  stream_options={"include_usage": True}),
                   client.completions.create(model="tiny", prompt="hi", max_tokens=3, n=2, stream=True,
                                             stream_options={"include_usage": True})):
        chunks = list(stream)
        assert len({c.id for c in chunks}) == 1 and {c.system_fingerprint for c in chunks} == {fingerprint}
        *body, last = chunks
        assert all(c.usage is None and len(c.choices) == 1 for c in body)
        assert last.choices == [] and last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
        assert last.usage.completion_tokens_details.rejected_prediction_tokens == 0
        finished = [(c.choices[0].index, c.choices[0].finish_reason) for c in body if c.choices[0].finish_reason]
        assert sorted(i for i, _ in finished) == [0, 1] and {r for _, r in finished} <= {"stop", "length"}
    first = next(iter(client.chat.completions.create(model="tiny", messages=_HI, max_tokens=2, stream=True)))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.refusal is None


def test_reasoning_effort_reaches_a_template_that_reads_it(live, llm):
    """reasoning_effort was ignored in silence: a chat template that reads it (gpt-oss's) renders it;
    one that does not gets a 400 naming it (FIELD_CASES), as OpenAI answers for a model without reasoning."""
    template = ("{{ 'Reasoning: ' ~ (reasoning_effort or 'none') ~ '\\n' }}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    old, llm.chat_template = llm.chat_template, template
    try:
        for effort in ("low", "xhigh"):
            reply = live.client().chat.completions.create(model="tiny", messages=_HI, max_tokens=1,
                                                          reasoning_effort=effort)
            expected = llm.chat_prompt_ids(_HI, chat_template_kwargs={"reasoning_effort": effort})
            assert reply.usage.prompt_tokens == len(expected) != len(llm.chat_prompt_ids(_HI)), effort
    finally:
        llm.chat_template = old


def test_the_openai_client_s_structured_output_and_refusals(live):
    """What the official client sends: parse() with a pydantic model (a json_schema with a name,
    strict) is answered and parsed; the two faults of the table as the client sees them: a json_schema
    without a name, max_tokens with max_completion_tokens (OpenAI's 400s, which pyllm answered)."""
    from typing import Literal

    from pydantic import BaseModel

    class Color(BaseModel):
        color: Literal["red", "blue"]

    client = live.client()
    reply = client.chat.completions.parse(model="tiny", messages=_HI, max_tokens=40, response_format=Color)
    assert reply.choices[0].message.parsed.color in ("red", "blue"), reply
    for options, param, code in (
            (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
             "response_format.json_schema.name", "missing_required_parameter"),
            (dict(max_tokens=4, max_completion_tokens=4), "max_tokens", "invalid_parameter_combination")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=_HI, **{"max_tokens": 1, **options})
        assert (e.value.param, e.value.code, e.value.status_code) == (param, code, 400), e.value


# -- reasoning: a think block as reasoning_content -------------------------------------------------

def _thinking_reply(client, stream, **options):
    """(reasoning_content, content, finish_reason) of one choice, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**options).choices[0]
        return getattr(choice.message, "reasoning_content", None), choice.message.content, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return ("".join(r for r in reasoning if r) if any(r is not None for r in reasoning) else None), content, finish[0]


@pytest.fixture
def qwen3_template(llm):
    old, llm.chat_template = llm.chat_template, open(os.path.join(TEMPLATES, "qwen3-0.6b.jinja")).read()
    yield
    llm.chat_template = old


def test_a_think_block_is_reasoning_content(live, llm, qwen3_template, monkeypatch):
    """A reply opening with <think>...</think> (Qwen3, DeepSeek-R1, SmolLM3) came back whole as
    content; as llama.cpp's server does by default (and vLLM with a reasoning parser), the block is
    the message's reasoning_content and content is the answer after it, streamed or not; with
    reasoning_format "none" (the request's, or --reasoning-format) it stays in content."""
    reply = "<think>\nThe user greets me. 你好 😀\n</think>\n\nHello! How can I help?"
    client = live.client()
    with monkeypatch.context() as patch:
        _script(llm, patch, reply)
        for stream in (False, True):
            got = _thinking_reply(client, stream, model="tiny", messages=_chat("Hi"), max_tokens=200)
            assert got == ("The user greets me. 你好 😀", "Hello! How can I help?", "stop"), stream
            got = _thinking_reply(client, stream, model="tiny", messages=_chat("Hi"), max_tokens=200,
                                  extra_body={"reasoning_format": "none"})
            assert got == (None, reply, "stop"), stream
        # usage counts the block's tokens (its tags too) as reasoning_tokens, streamed or not
        ids = llm.tokenize(reply, add_special_tokens=False)
        block = next(k for k in range(len(ids) + 1) if "</think>" in llm.tokenizer.decode(ids[:k]))
        assert 10 < block < len(ids) - 3
        usage = client.chat.completions.create(model="tiny", messages=_chat("Hi"), max_tokens=200).usage
        assert usage.completion_tokens_details.reasoning_tokens == block
        chunks = list(client.chat.completions.create(model="tiny", messages=_chat("Hi"), max_tokens=200, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == block
        usage = client.chat.completions.create(model="tiny", messages=_chat("Hi"), max_tokens=200,
                                               extra_body={"reasoning_format": "none"}).usage
        assert usage.completion_tokens_details.reasoning_tokens == 0
        # cut by max_tokens inside the block: all of it is reasoning, content empty
        inside = next(k for k in range(len(ids)) if "greets" in llm.tokenizer.decode(ids[:k]))
        for stream in (False, True):
            got = _thinking_reply(client, stream, model="tiny", messages=_chat("Hi"), max_tokens=inside)
            assert got[0].startswith("The user greets") and got[1:] == ("", "length"), (stream, got)
        usage = client.chat.completions.create(model="tiny", messages=_chat("Hi"), max_tokens=inside, n=2).usage
        assert usage.completion_tokens_details.reasoning_tokens == 2 * inside == usage.completion_tokens
    # a reply without a block: no reasoning_content
    _script(llm, monkeypatch, "  Just <think> an answer.")
    for stream in (False, True):
        assert _thinking_reply(client, stream, model="tiny", messages=_chat("Hi"),
                               max_tokens=200) == (None, "  Just <think> an answer.", "stop"), stream


def test_the_server_default_reasoning_format_none_keeps_the_block_in_content(llm, qwen3_template, monkeypatch):
    from pyllm.serve import Completions

    _script(llm, monkeypatch, "<think>x</think>y")
    body = {"messages": _chat("Hi"), "max_tokens": 50}
    message = Completions(llm, "tiny", reasoning_format="none").create(body, chat=True)["choices"][0]["message"]
    assert message["content"] == "<think>x</think>y" and "reasoning_content" not in message
    message = llm.create_chat_completion(**body)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("x", "y")
    with pytest.raises(ValueError, match="reasoning_format"):
        Completions(llm, "tiny", reasoning_format="raw")


def test_chat_template_kwargs_reach_the_template(live, llm, qwen3_template, monkeypatch):
    """chat_template_kwargs (llama.cpp's and vLLM's field: {"enable_thinking": false} turns Qwen3's
    thinking off) was ignored in silence. It reaches the template, in the server, create_chat_completion
    and LLM.chat; a variable pyllm sets itself is refused, naming the field."""
    client = live.client()
    messages = _chat("Hi")
    off = llm.chat_prompt_ids(messages, chat_template_kwargs={"enable_thinking": False})
    assert llm.tokenizer.decode(off).endswith("<think>\n\n</think>\n\n")
    assert len(off) > len(llm.chat_prompt_ids(messages))
    for kwargs, expected in (({"enable_thinking": False}, len(off)), ({}, len(llm.chat_prompt_ids(messages)))):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                               extra_body={"chat_template_kwargs": kwargs})
        assert reply.usage.prompt_tokens == expected
        answer = llm.create_chat_completion(messages=messages, max_tokens=1, chat_template_kwargs=kwargs)
        assert answer["usage"]["prompt_tokens"] == expected
    _script(llm, monkeypatch, "Hello")
    assert llm.chat(messages, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=5) == "Hello"
    for bad in ({"messages": []}, {"add_generation_prompt": False}, {"tools": []}, {"bos_token": "x"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                           extra_body={"chat_template_kwargs": bad})
        assert e.value.body["param"] == "chat_template_kwargs" and repr(next(iter(bad))) in e.value.body["message"]
        with pytest.raises(pyllm.chat_template.TemplateError, match="chat_template_kwargs"):
            llm.chat(messages, chat_template_kwargs=bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, extra_body={"chat_template_kwargs": [1]})
    assert e.value.body["param"] == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError) as e:  # a chat field on /v1/completions: refused, not ignored
        client.completions.create(model="tiny", prompt="Hi", extra_body={"chat_template_kwargs": {}})
    assert e.value.body["param"] == "chat_template_kwargs"


def test_a_block_the_prompt_opens_is_reasoning(live, llm, monkeypatch):
    """Templates that open the block for the model (DeepSeek-R1's, Qwen3-thinking's: the generation
    prompt ends with <think>) get replies that start inside it, with no opening tag: everything up to
    </think> is reasoning. A reply held to a grammar (response_format) cannot think first: it is content."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    old, llm.chat_template = llm.chat_template, template
    try:
        client = live.client()
        with monkeypatch.context() as patch:
            _script(llm, patch, "Two and two.\n</think>\n\n4")
            for stream in (False, True):
                assert _thinking_reply(client, stream, model="tiny", messages=_chat("2+2?"),
                                       max_tokens=100) == ("Two and two.", "4", "stop"), stream
        with monkeypatch.context() as patch:  # a prefill that opens the block: the reply goes on inside it
            _script(llm, patch, " and two.\n</think>\n\n4")
            prefill = [*_chat("2+2?"), {"role": "assistant", "content": "<think>\nTwo"}]
            for stream in (False, True):
                assert _thinking_reply(client, stream, model="tiny", messages=prefill, max_tokens=100,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False}
                                       ) == ("and two.", "4", "stop"), stream
        with monkeypatch.context() as patch:  # the model writes the opening tag again: dropped, as vLLM does
            _script(llm, patch, "<think>\nTwo and two.\n</think>\n\n4")
            for stream in (False, True):
                assert _thinking_reply(client, stream, model="tiny", messages=_chat("2+2?"),
                                       max_tokens=100) == ("Two and two.", "4", "stop"), stream
        for stream in (False, True):
            got = _thinking_reply(client, stream, model="tiny", messages=_chat("2+2?"), max_tokens=20,
                                  response_format={"type": "json_object"})
            assert got[0] is None and got[1].startswith("{"), (stream, got)
    finally:
        llm.chat_template = old


def test_tool_calls_written_while_thinking_are_no_calls(live, llm, qwen3_template, monkeypatch):
    """A model that mentions a call in its think block ("I could write <tool_call>...") made that a
    call; only calls in the content after the block are calls."""
    fake = _written_calls("qwen", [("get_weather", {"city": "Paris", "days": 1})])
    real = _written_calls("qwen", [("get_time", {"zone": "UTC"})])
    _script(llm, monkeypatch, f"<think>\nI could call {fake} but time is better.\n</think>\n\nChecking.\n{real}")
    client = live.client()
    for stream in (False, True):
        options = dict(model="tiny", messages=_chat("Time?"), tools=[WEATHER, TIME], max_tokens=300)
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [(d.function.name, json.loads(d.function.arguments))
                     for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][0]
        else:
            choice = client.chat.completions.create(**options).choices[0]
            reasoning, content = choice.message.reasoning_content, choice.message.content
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
            finish = choice.finish_reason
        assert reasoning == f"I could call {fake} but time is better.", (stream, reasoning)
        assert (content, calls, finish) == ("Checking.", [("get_time", {"zone": "UTC"})], "tool_calls"), stream


def test_continue_final_message_and_add_generation_prompt(live, llm):
    """vLLM's fields (transformers' apply_chat_template arguments): continue_final_message makes the
    reply continue the last message's text (an assistant prefill), add_generation_prompt false leaves
    the template's opening of the reply out; both true is vLLM's 400, and /v1/completions refuses them."""
    client = live.client()
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    prefilled = llm.chat_prompt_ids(turns, continue_final_message=True)
    assert llm.tokenizer.decode(prefilled).endswith("The colour is") and len(prefilled) < len(
        llm.chat_prompt_ids(turns))
    expected = llm.chat(turns, continue_final_message=True, max_new_tokens=5, temperature=0)
    reply = client.chat.completions.create(model="tiny", messages=turns, max_tokens=5, temperature=0,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == len(prefilled)
    answer = llm.create_chat_completion(turns, max_tokens=5, temperature=0, continue_final_message=True,
                                        add_generation_prompt=False)
    assert answer["choices"][0]["message"]["content"] == expected
    reply = client.chat.completions.create(model="tiny", messages=turns[:1], max_tokens=1,
                                           extra_body={"add_generation_prompt": False})
    assert reply.usage.prompt_tokens == len(llm.chat_prompt_ids(turns[:1], add_generation_prompt=False)) < len(
        llm.chat_prompt_ids(turns[:1]))
    for body, param in (({"continue_final_message": True}, "continue_final_message"),
                        ({"add_generation_prompt": "yes"}, "add_generation_prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=turns, max_tokens=1, extra_body=body)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hi", extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"
    # a grammar holds the whole reply: continued after a prefill '{"a": ' it began the JSON again
    # ('{"a": {"a": 1, ...}'), so a structured output or a forced tool call with a prefill is refused,
    # as /v1/messages refuses output_config.format with a prefill
    prefill = [{"role": "user", "content": "Give JSON."}, {"role": "assistant", "content": '{"a": '}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    for fields, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"response_format": schema}, "response_format"),
                          ({"tools": [tool], "tool_choice": "required"}, "tool_choice"),
                          ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
                           "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=prefill, max_tokens=4, **fields,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False})
        assert e.value.body["param"] == param and "continue_final_message" in e.value.body["message"], e.value.body
    for options in ({"response_format": {"type": "json_object"}}, {"grammar": 'start: "x"'}):
        with pytest.raises(ValueError, match="cannot be combined with continue_final_message"):
            llm.chat(prefill, continue_final_message=True, max_new_tokens=2, **options)
