"""LLM.create_completion / create_chat_completion / __call__: llama-cpp-python's Llama methods,
answering as `pyllm serve` answers the same request (the server's validation and answer building),
field for field but the id and the time."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

import pyllm
from pyllm.errors import RequestError

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

from test_server import _chat  # noqa: E402
# the server tests' model (tiny, f32, 2048 positions) and live server, one of each for this module
from test_server_api import TIME, WEATHER, _script, _written_calls, live, llm, tool_template  # noqa: E402,F401


def _served(live, path: str, body: dict):
    """The server's answer to body: its JSON, or a streamed one's chunks (without [DONE])."""
    request = urllib.request.Request(live.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e.code}: {e.read()[:500]}") from None
    if not body.get("stream"):
        return json.loads(raw)
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def _cold(llm):
    """Runs something else, so that the next call finds the KV cache as the one before it did
    (usage.prompt_tokens_details.cached_tokens counts the tokens reused from the call before)."""
    llm.generate([7, 8, 9], max_new_tokens=1)


def _same(a, b):
    """a and b (answers, or lists of chunks) but for their ids (a tool call's too) and time; the
    chunks of one answer have one id."""
    def strip(answers):
        answers = answers if isinstance(answers, list) else [answers]
        assert len({x["id"] for x in answers}) == 1
        text = json.dumps([{k: v for k, v in x.items() if k not in ("id", "created")} for x in answers])
        return json.loads(re.sub(r'("tool_calls": \[[^\]]*?"id": )"[^"]*"', r'\1"call"', text))
    return strip(a) == strip(b)


COMPLETIONS = [
    dict(prompt="Paris is", max_tokens=8),
    dict(prompt="The quick brown fox", max_tokens=12, stop=[" the", "o"]),
    dict(prompt="Hello", max_tokens=10, temperature=1.0, seed=7, n=2, top_k=20, top_p=0.9),
    dict(prompt=["Berlin", "café"], max_tokens=4, logprobs=2, echo=True),
    dict(prompt=[5, 6, 7], max_tokens=6, repeat_penalty=1.3, presence_penalty=0.5, logit_bias={"9": -100}),
    dict(prompt="Emoji 😀🎉", max_tokens=9, min_p=0.1, typical_p=0.9, temperature=0.8, seed=3),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("request_", COMPLETIONS, ids=range(len(COMPLETIONS)))
def test_completions_equal_the_server_s(live, llm, request_, stream):
    body = dict(request_, model="tiny", stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    _cold(llm)
    served = _served(live, "/v1/completions", body)
    _cold(llm)
    ours = llm.create_completion(**body)
    if stream:
        ours = list(ours)
        assert all(c["object"] == "text_completion" for c in ours) and ours[-1]["usage"]["completion_tokens"] > 0
    else:
        assert ours["object"] == "text_completion" and ours["id"].startswith("cmpl-")
    assert _same(ours, served), (ours, served)
    _cold(llm)
    assert _same(llm(**body) if not stream else list(llm(**body)), served)  # __call__ is create_completion


CHATS = [
    dict(messages=_chat("Paris is"), max_tokens=8),
    dict(messages=_chat("中文测试"), max_tokens=12, stop="o", logprobs=True, top_logprobs=3),
    dict(messages=_chat("Hello"), max_tokens=10, temperature=1.0, seed=11, n=2, frequency_penalty=0.4),
    dict(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_completion_tokens=5),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("request_", CHATS, ids=range(len(CHATS)))
def test_chat_completions_equal_the_server_s(live, llm, request_, stream):
    body = dict(request_, model="tiny", stream=stream)
    _cold(llm)
    served = _served(live, "/v1/chat/completions", body)
    _cold(llm)
    ours = llm.create_chat_completion(**body)
    if stream:
        ours = list(ours)
        assert ours[0]["object"] == "chat.completion.chunk" and ours[0]["choices"][0]["delta"]["role"] == "assistant"
    else:
        assert ours["object"] == "chat.completion" and ours["choices"][0]["message"]["role"] == "assistant"
    assert _same(ours, served), (ours, served)


def test_tool_calls_equal_the_server_s(live, llm, tool_template, monkeypatch):
    _script(llm, monkeypatch, _written_calls(tool_template, [("get_time", {"zone": "UTC"})]))
    for stream in (False, True):
        body = dict(model="tiny", messages=_chat("Time?"), tools=[WEATHER, TIME], stream=stream)
        _cold(llm)
        served = _served(live, "/v1/chat/completions", body)
        _cold(llm)
        ours = llm.create_chat_completion(**body)
        ours = list(ours) if stream else ours
        assert _same(ours, served), (ours, served)
        finish = ours[-1]["choices"][0] if stream else ours["choices"][0]
        assert finish["finish_reason"] == "tool_calls", ours


def test_the_answer_is_generate_s_text_and_stops_as_it_does(llm):
    text = llm.generate("The quick brown fox", max_new_tokens=12)
    answer = llm.create_completion("The quick brown fox", max_tokens=12)
    assert answer["choices"][0]["text"] == text
    assert answer["usage"]["completion_tokens"] == llm.last_stats.generated_tokens
    stop = text[3:5]
    answer = llm.create_completion("The quick brown fox", max_tokens=12, stop=[stop])
    assert answer["choices"][0] == {"index": 0, "text": text[:text.index(stop)], "logprobs": None,
                                    "finish_reason": "stop"}
    pieces = [c["choices"][0]["text"] for c in llm.create_completion("The quick brown fox", max_tokens=12,
                                                                     stop=stop, stream=True)]
    assert "".join(pieces) == text[:text.index(stop)]
    chat = llm.chat(_chat("Paris is"), max_new_tokens=9)
    assert llm.create_chat_completion(_chat("Paris is"), max_tokens=9)["choices"][0]["message"]["content"] == chat


def test_a_seed_reproduces_the_answer(llm):
    options = dict(max_tokens=16, temperature=1.5, seed=1234)
    first = llm.create_completion("Hello", **options)["choices"][0]["text"]
    assert llm.create_completion("Hello", **options)["choices"][0]["text"] == first
    others = {llm.create_completion("Hello", **dict(options, seed=s))["choices"][0]["text"] for s in range(5)}
    assert len(others) > 1
    chunks = llm.create_completion("Hello", stream=True, **options)
    assert "".join(c["choices"][0]["text"] for c in chunks) == first
    chat = [llm.create_chat_completion(_chat("Hi"), **options)["choices"][0]["message"]["content"] for _ in range(2)]
    assert chat[0] == chat[1]


def test_bad_arguments_raise_the_server_s_error(live, llm):
    """A bad field raises RequestError with the message and param the server answers with (not a
    pydantic traceback); Python values JSON does not have are a TypeError naming the argument."""
    cases = [("/v1/completions", dict(prompt="hi", temperature=5)),
             ("/v1/completions", dict(prompt="hi", max_tokens=0)),
             ("/v1/completions", dict(prompt="hi", suffix="x")),
             ("/v1/completions", dict(prompt="hi", stop=["a"] * 20)),
             ("/v1/completions", dict(prompt="hi", temperature=float("nan"))),
             ("/v1/completions", dict(prompt="word " * 2000, max_tokens=4)),
             ("/v1/completions", dict(prompt="hi", max_tokens=9000)),
             ("/v1/completions", dict(prompt="hi", stream_options={"include_usage": True})),
             ("/v1/chat/completions", dict(messages=[])),
             ("/v1/chat/completions", dict(messages=_chat("hi"), tool_choice="auto")),
             ("/v1/chat/completions", dict(messages=_chat("hi"), top_logprobs=2)),
             ("/v1/chat/completions", dict(messages=[{"role": "robot", "content": "hi"}])),
             ("/v1/chat/completions", dict(messages=_chat("hi"), response_format={"type": "xml"})),
             ("/v1/chat/completions", dict(messages=_chat("hi"), functions=[{"name": "f"}])),
             ("/v1/chat/completions", dict(messages=_chat("hi"), reasoning_effort="high")),
             ("/v1/chat/completions", dict(messages=_chat("hi"), verbosity="low")),
             ("/v1/chat/completions", dict(messages=_chat("hi"), modalities=["text", "audio"])),
             ("/v1/chat/completions", dict(messages=_chat("hi"), service_tier="premium")),
             ("/v1/chat/completions", dict(messages=_chat("hi"), metadata={"k": 5})),
             ("/v1/chat/completions", dict(messages=_chat("hi"), web_search_options={}))]
    for path, body in cases:
        request = urllib.request.Request(live.url + path, data=json.dumps(body, allow_nan=True).encode())
        with pytest.raises(urllib.error.HTTPError) as served:
            urllib.request.urlopen(request, timeout=30)
        error = json.loads(served.value.read())["error"]
        method = llm.create_chat_completion if "messages" in body else llm.create_completion
        with pytest.raises(RequestError) as e:
            method(**body)
        assert (str(e.value), e.value.param, e.value.code, e.value.status) == (
            error["message"], error["param"], error["code"], served.value.code), body
        assert e.value.param is not None and e.value.param.split(".")[0].split("[")[0] in str(e.value), error
    with pytest.raises(RequestError, match="context_length_exceeded|maximum context length"):
        llm.create_completion("hi", max_tokens=9000, stream=True)  # refused at the call, not at the first chunk
    with pytest.raises(TypeError, match="seed: object is not a JSON type"):
        llm.create_completion("hi", seed=object())
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        llm.create_completion("hi", temprature=0.5)
    with pytest.raises(TypeError, match="response_format"):  # llama-cpp-python's grammar, said what to give
        llm.create_chat_completion(_chat("hi"), grammar='root ::= "a"')
    with pytest.raises(TypeError, match="max_tokens"):
        llm.create_completion("hi", max_new_tokens=3)
    with pytest.raises(TypeError):  # keyword-only: llama-cpp-python's second positional is suffix
        llm.create_completion("hi", 5)


def test_every_field_the_server_takes_is_a_keyword_of_the_method():
    """create_chat_completion lacked OpenAI's newer fields the server takes (reasoning_effort,
    verbosity, store, metadata, ...): a request's fields passed as keywords were a TypeError."""
    import inspect

    from pyllm.api_schema import ChatCompletionRequest, CompletionRequest

    for request, method, own in ((ChatCompletionRequest, pyllm.LLM.create_chat_completion, {"messages"}),
                                 (CompletionRequest, pyllm.LLM.create_completion, {"prompt"})):
        keywords = {n for n, p in inspect.signature(inspect.unwrap(method)).parameters.items()
                    if p.kind == p.KEYWORD_ONLY}
        assert set(request.model_fields) - own <= keywords, (method.__name__, set(request.model_fields) - keywords)


def test_openai_s_service_fields_pass_through_as_the_server_takes_them(llm):
    answer = llm.create_chat_completion(_chat("Hi"), max_tokens=3, temperature=0, store=False,
                                        metadata={"team": "a"}, service_tier="auto", prompt_cache_key="k",
                                        safety_identifier="u1", verbosity="medium", modalities=["text"],
                                        prediction={"type": "content", "content": "Hello"})
    assert answer["choices"][0]["message"]["content"] == llm.create_chat_completion(
        _chat("Hi"), max_tokens=3, temperature=0)["choices"][0]["message"]["content"]


def test_numpy_values_are_taken(llm):
    ids = np.array(llm.tokenize("Paris is"), dtype=np.int64)
    answer = llm.create_completion(ids, max_tokens=np.int32(4), seed=np.uint64(3), temperature=np.float32(0.5),
                                   stop=("zz",))
    assert answer["choices"][0]["text"] == llm.create_completion("Paris is", max_tokens=4, seed=3, temperature=0.5,
                                                                 stop="zz")["choices"][0]["text"]


def test_a_stream_closed_early_frees_the_model(llm):
    """Leaving a stream's `for` (or closing it) ends its generation at once: the next call runs,
    in this thread or another, and says what it would have said alone."""
    import threading

    alone = llm.create_completion("Paris is", max_tokens=6)["choices"][0]["text"]
    for make in (lambda: llm.create_completion("Hello", max_tokens=200, stream=True),
                 lambda: llm.create_chat_completion(_chat("Hello"), max_tokens=200, stream=True)):
        for chunk in make():
            if chunk["choices"][0].get("text") or chunk["choices"][0].get("delta", {}).get("content"):
                break
        assert llm._holder is None  # given back when the loop was left
        assert llm.create_completion("Paris is", max_tokens=6)["choices"][0]["text"] == alone
        chunks = make()
        next(chunks)
        next(chunks)
        chunks.close()
        assert llm._holder is None
        out = []
        worker = threading.Thread(target=lambda: out.append(llm.create_completion("Paris is", max_tokens=6)))
        worker.start()
        worker.join(30)
        assert out and out[0]["choices"][0]["text"] == alone


def test_an_llm_that_answered_is_freed_when_deleted(tiny_llama_f32):
    """The methods keep nothing on the LLM that refers back to it: deleting it frees it (its mapped
    file and KV cache) at once, not at the garbage collector's next cycle."""
    import gc
    import weakref

    gc.disable()
    try:
        model = pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=256)
        model.create_completion("Hi", max_tokens=2)
        list(model.create_chat_completion(_chat("Hi"), max_tokens=2, stream=True))
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_missing_extras_are_named(tiny_llama_f32):
    """Without pydantic the methods say what to install, and the server stays refused as a whole
    (pyllm serve's check); without starlette alone the methods still run (they need pydantic only)."""
    import subprocess
    import sys

    script = f"""
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # import fails: the extra is not installed
import pyllm, pyllm.serve as serve
llm = pyllm.LLM({tiny_llama_f32!r}, n_threads=1, context_length=256)
print("server", serve.Starlette is not None)
try:
    print("answer", llm.create_completion("hi", max_tokens=2)["object"])
except RuntimeError as e:
    print("error", e)
"""
    def run(*blocked):
        done = subprocess.run([sys.executable, "-c", script, *blocked], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()
    assert run("pydantic") == ["server False", "error LLM.create_completion and create_chat_completion need pydantic: "
                                               "pip install 'pyllm[serve]'"]
    assert run("starlette") == ["server False", "answer text_completion"]


def test_a_grammar_that_cannot_be_followed_raises_at_the_call_or_from_the_stream(llm):
    """Where the server answers 400 (a grammar that allows no text) the call raises, with the
    server's message; where its stream ends with an error event (a lexer past llguidance's limits
    at a later token) the iterator raises it. The model is free for the next call either way."""
    with pytest.raises(ValueError, match="cannot be followed"):
        llm.create_completion("?", max_tokens=3, stream=True, response_format={"type": "grammar",
                                                                                "grammar": "start: start"})
    huge = {"type": "regex", "regex": "a{1000000}"}
    with pytest.raises(ValueError, match="cannot be followed"):
        llm.create_completion("?", max_tokens=3, response_format=huge)
    with pytest.raises(ValueError, match="cannot be followed"):
        list(llm.create_completion("?", max_tokens=3, stream=True, response_format=huge))
    assert llm._holder is None
    assert llm.create_completion("?", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_completion_top_logprobs_hold_the_sampled_token(llm):
    """OpenAI's legacy completions: "the API will always return the logprob of the sampled token, so
    there may be up to logprobs+1 elements" (llama-cpp-python adds it too). A sampled token outside the
    top N was missing, and logprobs=0 gave {} for every token."""
    for n in (0, 1):
        reply = llm.create_completion("Once upon a time", max_tokens=12, logprobs=n, temperature=2.0, seed=7,
                                      echo=True)
        lp = reply["choices"][0]["logprobs"]
        assert lp["top_logprobs"][0] is None  # the first prompt token has no logprob
        outside = 0
        for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert top[token] == logprob and n <= len(top) <= n + 1, (token, logprob, top)
            outside += len(top) == n + 1
        assert outside > 0  # (at temperature 2 some tokens were not among the top n)
