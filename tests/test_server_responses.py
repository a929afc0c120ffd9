"""OpenAI's Responses API (POST /v1/responses) with the official openai client: the answer and its
stream equal the chat completion the request asks for; reasoning, function calls and their outputs,
structured output; what needs stored state is refused naming the field."""

from __future__ import annotations

import json

import pytest

import pyllm

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

from test_server import _chat, _request  # noqa: E402
from test_server_api import _script, _written_calls, live, llm, qwen3_template, tool_template  # noqa: E402,F401


def _events(client, **options):
    """The stream's events, checked for what every stream holds: numbered from 0, created and
    in_progress first, one completed or incomplete last."""
    events = list(client.responses.create(stream=True, **options))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert all(e.type not in ("response.completed", "response.incomplete") for e in events[:-1])
    return events


def _streamed_output(events) -> list[dict]:
    """The output items the stream built: each output_item.done's item, checked against its deltas."""
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in done] == list(range(len(done)))
    for e in done:
        if e.item.type == "message":
            text = "".join(d.delta for d in events if d.type == "response.output_text.delta" and d.item_id == e.item.id)
            assert e.item.content[0].text == text
        elif e.item.type == "reasoning":
            text = "".join(d.delta for d in events
                           if d.type == "response.reasoning_text.delta" and d.item_id == e.item.id)
            assert e.item.content[0].text == text
    return [e.item.model_dump(exclude={"id"}) for e in done]


def _output(response) -> list[dict]:
    return [item.model_dump(exclude={"id"}) for item in response.output]


def test_a_response_is_the_chat_completion_it_asks_for(live, llm):
    client = live.client()
    messages = _chat("Paris is")
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0)
    for stream in (False, True):
        options = dict(model="tiny", instructions="Be brief.", input="Paris is", max_output_tokens=6, temperature=0)
        if stream:
            events = _events(client, **options)
            response, output = events[-1].response, _streamed_output(events)
            assert [e.type for e in events if e.type.startswith("response.output_item")] == [
                "response.output_item.added", "response.output_item.done"]
            assert events[0].response.status == "in_progress" and events[0].response.output == []
        else:
            response = client.responses.create(**options)
            output = _output(response)
        assert response.output_text == chat.choices[0].message.content, stream
        assert output == _output(response), stream
        assert output[0]["type"] == "message" and output[0]["role"] == "assistant"
        assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
        assert output[0]["status"] == "incomplete", stream  # the item the limit cut (it said "completed")
        assert response.usage.input_tokens == chat.usage.prompt_tokens == len(llm.chat_prompt_ids(messages))
        assert response.usage.output_tokens == 6 and response.usage.total_tokens == chat.usage.total_tokens
        assert response.usage.output_tokens_details.reasoning_tokens == 0
        assert (response.model, response.instructions, response.max_output_tokens) == ("tiny", "Be brief.", 6)
        assert response.id.startswith("resp_") and response.object == "response"
    # input items: the same conversation as messages, with input_text and output_text parts
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
             {"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Paris "}, {"type": "input_text", "text": "is"}]}]
    response = client.responses.create(model="tiny", input=items, max_output_tokens=1)
    same = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "is"}]}]
    assert response.usage.input_tokens == len(llm.chat_prompt_ids(same))


def test_a_reply_that_ends_is_completed_and_logprobs_are_kept(live, llm, monkeypatch):
    _script(llm, monkeypatch, "Hello there.")
    client = live.client()
    for stream in (False, True):
        options = dict(model="tiny", input="Hi", max_output_tokens=50, top_logprobs=2)
        if stream:
            events = _events(client, **options)
            response, output = events[-1].response, _streamed_output(events)
            assert output == _output(response)
        else:
            response = client.responses.create(**options)
        assert (response.status, response.incomplete_details) == ("completed", None), stream
        assert response.output[0].status == "completed"
        assert response.output_text == "Hello there."
        logprobs = response.output[0].content[0].logprobs
        assert "".join(t.token for t in logprobs) == "Hello there." and all(len(t.top_logprobs) == 2 for t in logprobs)


def test_a_think_block_is_a_reasoning_item(live, llm, qwen3_template, monkeypatch):
    client = live.client()
    with monkeypatch.context() as patch:
        _script(llm, patch, "<think>\nThe user greets me. 你好\n</think>\n\nHello!")
        for stream in (False, True):
            if stream:
                events = _events(client, model="tiny", input="Hi", max_output_tokens=100, top_logprobs=1)
                response, output = events[-1].response, _streamed_output(events)
                assert output == _output(response)
            else:
                response = client.responses.create(model="tiny", input="Hi", max_output_tokens=100, top_logprobs=1)
            assert [item.type for item in response.output] == ["reasoning", "message"], stream
            assert response.output[0].content[0].text == "The user greets me. 你好"
            assert response.output_text == "Hello!" and response.status == "completed"
            assert response.usage.output_tokens_details.reasoning_tokens > 5
            # the message's logprobs are its own tokens' (not the block's, which were the first delta's)
            assert "".join(t.token for t in response.output[1].content[0].logprobs) == "Hello!", stream
    # an empty block is no reasoning item, streamed or not (it was one only when not streamed)
    _script(llm, monkeypatch, "<think>\n\n</think>\n\nHello!")
    for response in (client.responses.create(model="tiny", input="Hi", max_output_tokens=100),
                     _events(client, model="tiny", input="Hi", max_output_tokens=100)[-1].response):
        assert [item.type for item in response.output] == ["message"] and response.output_text == "Hello!"
        assert response.usage.output_tokens_details.reasoning_tokens > 2
    # a reasoning item given back as input is the next assistant message's reasoning_content
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "Thinking."}]}
    answer = {"role": "assistant", "content": "Hello!"}
    response = client.responses.create(model="tiny", input=[{"role": "user", "content": "Hi"}, reasoning, answer,
                                                           {"role": "user", "content": "Again"}], max_output_tokens=1)
    messages = [{"role": "user", "content": "Hi"}, dict(answer, reasoning_content="Thinking."),
                {"role": "user", "content": "Again"}]
    assert response.usage.input_tokens == len(llm.chat_prompt_ids(messages))


def test_a_reasoning_item_belongs_to_the_next_reply_of_the_model(live, llm):
    """A reasoning item went to the next assistant message whatever came between (a user turn, a tool
    output): the model's thoughts about one question were given to the reply to another. It belongs to
    the assistant output that follows it directly; two in a row are one reply's."""
    def reasoning(text):
        return {"type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}

    items = [{"role": "user", "content": "Q1"}, reasoning("About Q1."), {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": "A2"}, reasoning("One."), reasoning("Two."),
             {"role": "assistant", "content": "A3"}, {"role": "user", "content": "Q4"}]
    response = live.client().responses.create(model="tiny", input=items, max_output_tokens=1)
    messages = [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
                {"role": "assistant", "content": "A3", "reasoning_content": "One.\n\nTwo."},
                {"role": "user", "content": "Q4"}]
    assert response.usage.input_tokens == len(llm.chat_prompt_ids(messages))
    from pyllm.responses_api import chat_body

    made = chat_body({"input": items})["messages"]
    assert [{k: v for k, v in m.items() if k != "pyllm_source"} for m in made] == messages
    assert [m["pyllm_source"] for m in made] == ["input[0]", "input[2]", "input[3]", "input[6]", "input[7]"]


TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_function_calls_and_their_outputs_round_trip(live, llm, tool_template, monkeypatch):
    client = live.client()
    with monkeypatch.context() as patch:
        _script(llm, patch, _written_calls(tool_template, [("get_weather", {"city": "Paris"}),
                                                           ("get_weather", {"city": "Oslo"})]))
        for stream in (False, True):
            if stream:
                events = _events(client, model="tiny", input="Weather?", tools=TOOLS, max_output_tokens=400)
                response, output = events[-1].response, _streamed_output(events)
                assert output == _output(response)
                arguments = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
                assert [json.loads(a) for a in arguments] == [{"city": "Paris"}, {"city": "Oslo"}]
            else:
                response = client.responses.create(model="tiny", input="Weather?", tools=TOOLS, max_output_tokens=400)
            calls = [item for item in response.output if item.type == "function_call"]
            assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                         ("get_weather", {"city": "Oslo"})], stream
            assert response.output_text == "" and response.status == "completed"
            assert len({c.call_id for c in calls}) == 2
    # the calls and their outputs sent back: the conversation the chat request with tool messages renders
    chat_calls = [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]
    items = [{"role": "user", "content": "Weather?"}, *[c.model_dump(exclude={"id", "status"}) for c in calls],
             *[{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 21 C"} for c in calls]]
    response = client.responses.create(model="tiny", input=items, tools=TOOLS, max_output_tokens=1)
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": chat_calls},
                *[{"role": "tool", "tool_call_id": c.call_id, "content": "Sunny, 21 C"} for c in calls]]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                          tools=[{"type": "function", "function": {k: v for k, v in t.items()
                                                                                   if k != "type"}} for t in TOOLS])
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    # a forced call (tool_choice naming the function) is written by the grammar
    tools = [dict(TOOLS[0], parameters={"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                        "required": ["city"]})]
    response = client.responses.create(model="tiny", input="Weather?", tools=tools, max_output_tokens=400,
                                       tool_choice={"type": "function", "name": "get_weather"})
    call = next(item for item in response.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    # a tool the chat checks refuse is named as the Responses request names it
    bad = {"model": "tiny", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "no"}}]}
    status, reply = _request(live.url + "/v1/responses", json.dumps(bad).encode())
    assert (status, reply["error"]["param"]) == (400, "tools[0].parameters"), reply


def test_text_format_json_schema_is_followed(live):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=8)
        sunny: bool

    client = live.client()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "sunny": {"type": "boolean"}},
              "required": ["name", "sunny"], "additionalProperties": False}
    response = client.responses.create(model="tiny", input="A city?", max_output_tokens=200, temperature=1, top_p=0.9,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                        "strict": True}})
    answer = json.loads(response.output_text)
    assert set(answer) == {"name", "sunny"} and isinstance(answer["sunny"], bool)
    assert response.text.format.type == "json_schema"
    parsed = client.responses.parse(model="tiny", input="A city?", max_output_tokens=200, text_format=City)
    assert isinstance(parsed.output_parsed, City)
    response = client.responses.create(model="tiny", input="JSON?", max_output_tokens=20,
                                       text={"format": {"type": "json_object"}})
    assert response.output_text.startswith("{")


@pytest.mark.parametrize("fields, param, code", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"truncation": "auto"}, "truncation", "unsupported_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "unsupported_value"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role", None),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f"}]}, "input[0].arguments",
     "missing_required_parameter"),
    ({"input": 5}, "input", "invalid_type"),
    ({"input": []}, "input", None),
    ({"instructions": ["x"]}, "instructions", "invalid_type"),
    ({"max_output_tokens": 0}, "max_output_tokens", None),
    ({"max_output_tokens": "many"}, "max_output_tokens", None),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name",
     "missing_required_parameter"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", None),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "unsupported_value"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort", None),
    ({"temperature": -1}, "temperature", None),
    ({"tool_choice": "required"}, "tool_choice", None),  # no tools to call
    # chat fields: refused, with the Responses field to give (they were dropped in silence)
    ({"n": 3}, "n", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"max_tokens": 5}, "max_tokens", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "unsupported_parameter"),
    # a reasoning item's text and include were read unchecked (500s)
    ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]}]}, "input[0].content[0].text",
     "invalid_type"),
    ({"input": [{"type": "reasoning", "summary": [{"text": None}]}]}, "input[0].summary[0].text",
     "missing_required_parameter"),
    ({"input": [{"type": "reasoning", "summary": "x"}]}, "input[0].summary", "invalid_type"),
    ({"include": 5}, "include", "invalid_type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output", "invalid_type"),
    # the chat checks' errors named chat fields (tools[0].function.name, verbosity, response_format)
    ({"tools": [{"type": "function", "parameters": {}}]}, "tools[0].name", "missing_required_parameter"),
    ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools[0].strict", None),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function"}}, "tool_choice.name", None),
    ({"text": {"verbosity": "high"}}, "text.verbosity", "unsupported_value"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, "text.format", None),
    ({"input": []}, "input", "empty_array"),  # it read "input: messages: List should have at least 1 item ..."
])
def test_what_cannot_be_served_is_refused_naming_the_field(live, fields, param, code):
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 2, **fields}
    status, reply = _request(live.url + "/v1/responses", json.dumps(body).encode())
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"].startswith(param), reply
    if param == "input":  # the field itself, by its own name only (not the chat request's "messages")
        assert "messages" not in reply["error"]["message"], reply
    if code is not None:
        assert reply["error"]["code"] == code, reply
    status, reply = _request(live.url + "/v1/responses", json.dumps({"model": "tiny"}).encode())
    assert (status, reply["error"]["param"]) == (400, "input")


def test_tool_fields_without_tools_are_taken_as_responses_clients_send_them(live, llm):
    """Chat refuses parallel_tool_calls and tool_choice "auto" without tools; Responses clients send
    them whatever the tools (OpenAI answers them), so they are no fault here."""
    client = live.client()
    expected = llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0)
    for fields in ({"parallel_tool_calls": False}, {"tool_choice": "auto", "tools": []}, {"tool_choice": "none"}):
        response = client.responses.create(model="tiny", input="hi", max_output_tokens=3, temperature=0, **fields)
        assert response.output_text == expected, fields


def test_an_error_in_a_stream_is_an_error_event(live, llm, monkeypatch):
    from pyllm.serve import Server

    async def failing(self, *args, **kwargs):
        raise pyllm.errors.PyllmError("the engine failed")
        yield  # a generator, as the one it stands for

    monkeypatch.setattr(Server, "_pieces", failing)
    with live.client().responses.create(model="tiny", input="hi", max_output_tokens=3, stream=True) as stream:
        events = list(stream)
    assert events[-1].type == "error" and "the engine failed" in events[-1].message
