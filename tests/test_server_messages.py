"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) with the official anthropic
client: the message and its stream equal the chat completion the request asks for; thinking, tool use
and tool results, stop sequences, the API key as x-api-key; refusals in Anthropic's error shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import pyllm

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

from test_server import LiveServer, _request  # noqa: E402
from test_server_api import _script, _written_calls, live, llm, qwen3_template, tool_template  # noqa: E402,F401


def _client(server, **kw):
    return anthropic.Anthropic(base_url=server.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120,
                               **kw)


def _streamed(client, **options):
    """(the final message, the raw events) of a streamed request, checked for the order every
    stream keeps: message_start first, blocks started, delta'd and stopped in index order, then
    message_delta and message_stop."""
    with client.messages.stream(**options) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    started = [e.index for e in events if e.type == "content_block_start"]
    stopped = [e.index for e in events if e.type == "content_block_stop"]
    assert started == stopped == list(range(len(final.content))), kinds
    return final, events


def _blocks(message) -> list[dict]:
    return [block.model_dump(exclude={"id", "citations"}, exclude_none=True) for block in message.content]


def test_a_message_is_the_chat_completion_it_asks_for(live, llm):
    client = _client(live)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is"}]
    expected = llm.chat(messages, max_new_tokens=6, temperature=0)
    # (the client's 2.x API has no temperature, its newest models none; older clients send it)
    options = dict(model="tiny", system="Be brief.", messages=[{"role": "user", "content": "Paris is"}], max_tokens=6,
                   extra_body={"temperature": 0})
    plain = client.messages.create(**options)
    streamed, events = _streamed(client, **options)
    for message in (plain, streamed):
        assert _blocks(message) == [{"type": "text", "text": expected}]
        assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(llm.chat_prompt_ids(messages))
        assert message.usage.output_tokens == 6 and message.role == "assistant" and message.model == "tiny"
        assert message.id.startswith("msg_")
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == expected
    start = events[0].message
    assert start.content == [] and start.stop_reason is None
    assert start.usage.input_tokens + start.usage.cache_read_input_tokens == len(llm.chat_prompt_ids(messages))
    # split as message_delta splits them (it read 36 input and 0 cached against 1 and 35 there)
    end = [e for e in events if e.type == "message_delta"][0].usage
    assert (start.usage.input_tokens, start.usage.cache_read_input_tokens) == (end.input_tokens,
                                                                               end.cache_read_input_tokens), end
    # system as text blocks, content as text blocks: the same prompt
    count = client.messages.count_tokens(model="tiny", system=[{"type": "text", "text": "Be brief."}],
                                         messages=[{"role": "user", "content": [{"type": "text", "text": "Paris is"}]}])
    assert count.input_tokens == len(llm.chat_prompt_ids(
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "Paris is"}]}]))


def test_stop_sequences_and_end_turn(live, llm, monkeypatch):
    _script(llm, monkeypatch, "Hello there. STOP and more")
    client = _client(live)
    options = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
    for message in (client.messages.create(**options), _streamed(client, **options)[0]):
        assert message.content[0].text == "Hello there. STOP and more"
        assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    options["stop_sequences"] = ["NEVER", " STOP"]
    for message in (client.messages.create(**options), _streamed(client, **options)[0]):
        assert message.content[0].text == "Hello there."
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " STOP")


def test_a_think_block_is_a_thinking_block(live, llm, qwen3_template, monkeypatch):
    _script(llm, monkeypatch, "<think>\nThe user greets me. 你好\n</think>\n\nHello!")
    client = _client(live)
    options = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=100)
    plain = client.messages.create(**options)
    streamed, events = _streamed(client, **options)
    for message in (plain, streamed):
        assert _blocks(message) == [{"type": "thinking", "thinking": "The user greets me. 你好", "signature": ""},
                                    {"type": "text", "text": "Hello!"}]
        assert message.stop_reason == "end_turn"
    # thinking disabled reaches the template (Qwen3's enable_thinking), and a thinking block given back
    # is the assistant message's reasoning_content
    off = client.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       thinking={"type": "disabled"})
    assert off.input_tokens == len(llm.chat_prompt_ids([{"role": "user", "content": "Hi"}],
                                                       chat_template_kwargs={"enable_thinking": False}))
    turns = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": [{"type": "thinking", "thinking": "Greet.", "signature": "x"},
                                               {"type": "text", "text": "Hello!"}]},
             {"role": "user", "content": "Again"}]
    count = client.messages.count_tokens(model="tiny", messages=turns)
    assert count.input_tokens == len(llm.chat_prompt_ids([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet."},
        {"role": "user", "content": "Again"}]))
    # a reply cut while thinking (thinking only) sent back in the history: it was refused ("an assistant
    # message needs a content or tool_calls")
    turns[1]["content"] = turns[1]["content"][:1]
    count = client.messages.count_tokens(model="tiny", messages=turns)
    assert count.input_tokens == len(llm.chat_prompt_ids([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "reasoning_content": "Greet."},
        {"role": "user", "content": "Again"}]))


TOOLS = [{"name": "get_weather", "description": "The weather in a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_tool_use_and_tool_results_round_trip(live, llm, tool_template, monkeypatch):
    client = _client(live)
    options = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=400)
    with monkeypatch.context() as patch:
        _script(llm, patch, _written_calls(tool_template, [("get_weather", {"city": "Paris"}),
                                                           ("get_weather", {"city": "Oslo"})]))
        plain = client.messages.create(**options)
        streamed, events = _streamed(client, **options)
    for message in (plain, streamed):
        calls = [b for b in message.content if b.type == "tool_use"]
        assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                      ("get_weather", {"city": "Oslo"})], tool_template
        assert message.stop_reason == "tool_use" and len({c.id for c in calls}) == 2
        # ids pyllm made in Anthropic's form, "toolu_..." (they were "call_..."); a model's own ids (Mistral's
        # 9 characters) as written
        assert not any(c.id.startswith("call_") for c in calls), calls
    partial = [json.loads(e.delta.partial_json) for e in events if e.type == "content_block_delta"
               and e.delta.type == "input_json_delta"]
    assert partial == [{"city": "Paris"}, {"city": "Oslo"}]
    # the calls and their results sent back: the conversation the chat request with tool messages renders
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": [c.model_dump() for c in calls]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id, "content": "Sunny, 21 C"}
                                          for c in calls] + [{"type": "text", "text": "And tomorrow?"}]}]
    count = client.messages.count_tokens(model="tiny", messages=turns, tools=TOOLS)
    chat_calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.input)}}
                  for c in calls]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": chat_calls},
                *[{"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 C"} for c in calls],
                {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}]
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["input_schema"]}} for t in TOOLS]
    assert count.input_tokens == len(llm.chat_prompt_ids(messages, tools=tools))
    # a tool result's text blocks are lines, as a message's text parts (they ran together: "sunny20C")
    blocks = [{"type": "text", "text": "sunny"}, {"type": "text", "text": "20C"}]
    count = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=[
        *turns[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": blocks},
                                                 {"type": "tool_result", "tool_use_id": calls[1].id,
                                                  "content": "x"}]}])
    assert count.input_tokens == len(llm.chat_prompt_ids(
        [*messages[:2], {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny\n20C"},
         {"role": "tool", "tool_call_id": calls[1].id, "content": "x"}], tools=tools))
    # tool_choice any / tool force a call (a grammar), one only with disable_parallel_tool_use
    tools = [dict(TOOLS[0], input_schema={"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                          "required": ["city"]})]
    for choice in ({"type": "any", "disable_parallel_tool_use": True},
                   {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}):
        message = client.messages.create(**dict(options, tools=tools, tool_choice=choice))
        assert [b.type for b in message.content] == ["tool_use"] and message.stop_reason == "tool_use", choice
        assert message.content[0].input["city"] in ("Paris", "Oslo")


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": 5}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"system": [{"type": "image"}]}, "system[0].type"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"thinking": {"type": "maybe"}}, "thinking.type"),
    ({"container": "c1"}, "container"),
    ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop": ["END"]}, "stop"),
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}},
     "tool_choice"),
    # 500s: a tool_choice type that is no string; thinking beside a chat_template_kwargs that is no object
    ({"tool_choice": {"type": ["auto"]}}, "tool_choice.type"),
    ({"thinking": {"type": "enabled"}, "chat_template_kwargs": 5}, "chat_template_kwargs"),
    ({"thinking": {"type": "enabled"}, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    # the chat checks' errors name the turn (a system prompt and tool results are chat messages of their own)
    ({"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": []}]},
     "messages[1].content"),
    # a last assistant turn is a prefill: its tool calls were dropped from the prompt in silence
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}],
      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format"),
    ({"messages": []}, "messages"),  # it read "messages: messages: List should have at least 1 item ..."
])
def test_what_cannot_be_served_is_refused_in_anthropic_s_error_shape(live, fields, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    status, reply = _request(live.url + "/v1/messages", json.dumps(body).encode())
    assert status == 400, reply
    assert reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error", reply
    assert reply["error"]["message"].startswith(param + ":"), reply
    assert not reply["error"]["message"].startswith(f"{param}: {param}:"), reply


def test_the_client_s_errors_and_the_api_key_as_x_api_key(live, llm):
    with pytest.raises(anthropic.BadRequestError) as e:
        _client(live).messages.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert e.value.body["error"]["message"].startswith("max_tokens")
    status, reply = _request(live.url + "/v1/messages", b"[1, 2]")
    assert status == 400 and reply["type"] == "error"
    # refusals outside the handler on its paths come in Anthropic's shape too (they were OpenAI's)
    for method, path, status, kind in (("GET", "/v1/messages", 405, "invalid_request_error"),
                                       ("POST", "/v1/messages/batches", 404, "not_found_error")):
        request = urllib.request.Request(live.url + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        reply = json.loads(e.value.read())
        assert e.value.code == status and reply["type"] == "error" and reply["error"]["type"] == kind, reply
    server = LiveServer(llm, api_key="sekret")
    try:
        reply = _client(server, api_key="sekret").messages.create(model="tiny", max_tokens=2,
                                                                   messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as e:
            _client(server, api_key="wrong").messages.create(model="tiny", max_tokens=2,
                                                             messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
    finally:
        server.stop()


def test_an_error_in_a_stream_is_an_error_event(live, llm, monkeypatch):
    from pyllm.serve import Server

    async def failing(self, *args, **kwargs):
        raise pyllm.errors.PyllmError("the engine failed")
        yield  # an async generator, as the one it stands for

    monkeypatch.setattr(Server, "_pieces", failing)
    with pytest.raises(anthropic.APIStatusError, match="the engine failed") as e:
        with _client(live).messages.stream(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}]) \
                as stream:
            list(stream)
    assert e.value.body["error"]["type"] == "invalid_request_error"  # (its status's type: it was always api_error)


def test_a_last_assistant_turn_is_a_prefill(live, llm):
    """Anthropic's prefill: a last assistant turn's text is where the reply starts (it continues the
    text, which it does not repeat), as LLM.chat(continue_final_message=True) and transformers render it."""
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    expected = llm.chat(turns, continue_final_message=True, max_new_tokens=5, temperature=0)
    prompt = llm.chat_prompt_ids(turns, continue_final_message=True)
    assert llm.tokenizer.decode(prompt).endswith("The colour is")
    client = _client(live)
    for message in (client.messages.create(model="tiny", messages=turns, max_tokens=5, extra_body={"temperature": 0}),
                    _streamed(client, model="tiny", messages=turns, max_tokens=5, extra_body={"temperature": 0})[0]):
        assert _blocks(message) == [{"type": "text", "text": expected}]
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(prompt)


def test_structured_output_with_output_config_and_parse(live):
    """Anthropic's structured outputs (output_config.format, and the client's parse() with a pydantic
    model) are held to the schema; an effort the template does not read is refused naming the field."""
    from typing import Literal

    from pydantic import BaseModel

    class City(BaseModel):  # (the client's schema drops string lengths: no free string, or it runs on)
        size: Literal["big", "small"]
        sunny: bool

    client = _client(live)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    message = client.messages.create(model="tiny", max_tokens=40, messages=[{"role": "user", "content": "A number?"}],
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(message.content[0].text)["n"], int)
    parsed = client.messages.parse(model="tiny", max_tokens=200, messages=[{"role": "user", "content": "A city?"}],
                                   output_format=City)
    assert isinstance(parsed.parsed_output, City)
    for config, param in (({"effort": "high"}, "output_config.effort"),
                          ({"format": {"type": "json_schema"}}, "output_config.format.schema"),
                          ({"format": {"type": "json_schema", "schema": {"type": "bogus"}}}, "output_config.format")):
        status, reply = _request(live.url + "/v1/messages", json.dumps({
            "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "output_config": config}).encode())
        assert status == 400 and reply["error"]["message"].startswith(param), reply


def test_the_anthropic_client_lists_the_models(live):
    page = _client(live).models.list()
    assert [m.id for m in page.data] == ["tiny"] and page.data[0].type == "model"
    assert page.data[0].display_name == "tiny" and page.data[0].created_at.year >= 2024
    assert _client(live).models.retrieve("tiny").id == "tiny"
