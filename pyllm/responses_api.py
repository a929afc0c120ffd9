"""OpenAI's Responses API (POST /v1/responses) on the chat completions path: a request is read into a
chat completions request (chat_body), run as one, and its answer or its chunks are written back as a
Response object (response_object) or Responses stream events (ResponseEvents). llama.cpp's server
and vLLM serve it the same way.

Taken: `input` (a string, or items: messages with input_text / output_text parts, function_call and
function_call_output items, reasoning items), `instructions`, `max_output_tokens`, `temperature`,
`top_p`, `tools` (function tools), `tool_choice`, `parallel_tool_calls`, `text.format` (text,
json_object, json_schema), `reasoning.effort` (for a template that reads it), `top_logprobs`,
`stream`, OpenAI's bookkeeping fields (`metadata`, `user`, `store`, ...: nothing is stored), and
pyllm's chat extensions (top_k, min_p, seed, stop, chat_template_kwargs, ...). Refused, naming the
field: what needs stored responses (`previous_response_id`, `conversation`, `item_reference`
items, `background`), prompt templates (`prompt`), hosted tools (web search, file search, ...),
truncation "auto", images and files.

Output: a `reasoning` item (a think block: pyllm/reasoning.py), a `message` item with one
`output_text` part, and a `function_call` item per tool call, in that order; status "incomplete"
with incomplete_details.reason "max_output_tokens" when the token limit cut the reply.
"""

from __future__ import annotations

import copy
import json
import time
import uuid

from .api_schema import EXTENSIONS, SOURCE_KEY, renamed_field
from .errors import RequestError

# the request fields a chat completions request takes under the same name and meaning
SAME_FIELDS = ("model", "temperature", "top_p", "stream", "user", "metadata", "store", "service_tier",
               "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "stop", *EXTENSIONS)
# fields that need what pyllm does not keep or have: (field, why)
REFUSED = (("previous_response_id", "pyllm stores no responses: send the whole conversation in input"),
           ("conversation", "pyllm stores no conversations: send the whole conversation in input"),
           ("prompt", "pyllm has no stored prompt templates: send the instructions and input"),
           ("max_tool_calls", "pyllm does not bound the calls of a reply: leave it out"))
# chat completions fields a Responses request names otherwise, or has not (refused: they would be
# dropped in silence, a request for 3 choices or JSON answered with one plain text)
CHAT_FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format", "reasoning_effort": "reasoning.effort", "verbosity": "text.verbosity",
               "logprobs": "top_logprobs", "functions": "tools", "function_call": "tool_choice", "n": None,
               "stream_options": None, "prompt_logprobs": None, "echo": None}
MESSAGE_ROLES = ("user", "system", "developer", "assistant")


def _refuse(param: str, message: str, code: str = "unsupported_parameter") -> RequestError:
    return RequestError(f"{param}: {message}", param=param, code=code)


def chat_body(body: dict) -> dict:
    """The chat completions request (a body for api_schema.parse_request) a Responses request asks
    for; RequestError naming the Responses field for what is refused or malformed. The chat request's
    own checks then apply (its errors name the chat field: messages[k] is input item k, or k + 1 after
    instructions)."""
    for name, why in REFUSED:
        if body.get(name) is not None:
            raise _refuse(name, why)
    for name, instead in CHAT_FIELDS.items():
        if name in body:
            raise _refuse(name, f"is a chat completions field: give {instead} on /v1/responses" if instead else
                          "is a chat completions field /v1/responses has not (one request, one output)")
    if body.get("background"):
        raise _refuse("background", "pyllm runs no background responses: leave background false")
    if body.get("truncation") not in (None, "disabled"):
        raise _refuse("truncation", "pyllm does not drop input to fit the context: give 'disabled' (the default)",
                      "unsupported_value")
    if "input" not in body:
        raise RequestError("input: a Responses request needs input", param="input", code="missing_required_parameter")
    chat = {name: body[name] for name in SAME_FIELDS if body.get(name) is not None}
    messages = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise RequestError("instructions: must be a string", param="instructions", code="invalid_type")
        messages.append({"role": "system", "content": body["instructions"], SOURCE_KEY: "instructions"})
    messages += _messages(body["input"])
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_tool(tool, k) for k, tool in enumerate(_list(body["tools"], "tools"))]
    # chat refuses these without tools, Responses does not (its clients send them whatever the tools)
    if body.get("parallel_tool_calls") is not None and (body.get("tools") or not isinstance(body["parallel_tool_calls"], bool)):
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("tool_choice") is not None and (body.get("tools") or body["tool_choice"] not in ("auto", "none")):
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise RequestError("text: must be an object ({\"format\": {...}})", param="text", code="invalid_type")
        if text.get("format") is not None:
            chat["response_format"] = _response_format(text["format"])
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise RequestError("reasoning: must be an object ({\"effort\": ...})", param="reasoning",
                               code="invalid_type")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    if body.get("top_logprobs") is not None:
        chat["logprobs"], chat["top_logprobs"] = True, body["top_logprobs"]
    elif "message.output_text.logprobs" in _list(body.get("include") or [], "include"):
        chat["logprobs"] = True
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # the last event carries the usage
    return chat


# chat request fields and the Responses fields they come from, for errors the chat checks raise
# (api_schema.renamed_field): (pattern, Responses field, whether paths below map one to one)
RESPONSES_NAMES = ((r"max_completion_tokens", "max_output_tokens", True),
                   (r"response_format(\.json_schema)?", "text.format", True),
                   (r"reasoning_effort", "reasoning.effort", True), (r"verbosity", "text.verbosity", True),
                   (r"tools\[(\d+)\]\.function", r"tools[\1]", True), (r"tool_choice\.function", "tool_choice", True),
                   (r"messages", "input", False))


def rename(param: str | None, message: str, chat: dict | None = None) -> tuple[str | None, str]:
    """An error's (param, message) naming the Responses field its chat field came from (chat: the
    chat request chat_body made, whose messages say which input item each came from)."""
    return renamed_field(param, message, RESPONSES_NAMES, chat)


def _list(value, param: str) -> list:
    if not isinstance(value, list):
        raise RequestError(f"{param}: must be an array", param=param, code="invalid_type")
    return value


def _messages(items) -> list[dict]:
    """Chat messages of a Responses input: a string is one user message; items are messages,
    function calls (an assistant message's tool_calls, consecutive ones together), function call
    outputs (tool messages) and reasoning items (the next assistant message's reasoning_content)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items, SOURCE_KEY: "input"}]
    messages: list[dict] = []
    reasoning = None  # a reasoning item's text, for the assistant message that follows it
    for k, item in enumerate(_list(items, "input")):
        where = f"input[{k}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where}: must be an object (a message or an item)", param=where, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise RequestError(f"{where}.role: must be one of {', '.join(MESSAGE_ROLES)} (got {role!r:.40})",
                                   param=f"{where}.role")
            message = {"role": role, "content": _content(item.get("content"), f"{where}.content"), SOURCE_KEY: where}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"] = reasoning
            reasoning = None  # (a reasoning item before another turn belongs to no reply of the model)
            messages.append(message)
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)  # calls of one reply, and the text before them
            else:
                message = {"role": "assistant", "content": None, "tool_calls": [call], SOURCE_KEY: where}
                if reasoning is not None:
                    message["reasoning_content"], reasoning = reasoning, None
                messages.append(message)
        elif kind == "function_call_output":
            output, reasoning = item.get("output"), None
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": output if isinstance(output, str) else _content(output, f"{where}.output"),
                             SOURCE_KEY: where})
        elif kind == "reasoning":
            key = "content" if item.get("content") else "summary"
            text = "".join(_string(part, "text", f"{where}.{key}[{j}]") if isinstance(part, dict) else
                           _string({}, "text", f"{where}.{key}[{j}]")
                           for j, part in enumerate(_list(item.get(key) or [], f"{where}.{key}")))
            reasoning = text if reasoning is None else reasoning + "\n\n" + text  # one reply's reasoning items
        elif kind == "item_reference":
            raise _refuse(f"{where}.type", "pyllm stores no items to refer to: send the item itself", "unsupported_value")
        else:
            raise RequestError(f"{where}.type: pyllm takes message, function_call, function_call_output and reasoning "
                               f"items (got {kind!r:.40})", param=f"{where}.type", code="unsupported_value")
    return messages


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise RequestError(f"{where}.{key}: must be a string", param=f"{where}.{key}",
                           code="missing_required_parameter" if value is None else "invalid_type")
    return value


def _content(content, where: str):
    """A message's content as chat takes it: a string, or its text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: must be a string or an array of content parts", param=where, code="invalid_type")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}].text: must be a string", param=f"{where}[{j}].text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("input_image", "input_file", "input_audio", "refusal"):
            raise RequestError(f"{where}[{j}].type: pyllm takes text only (got {kind!r})", param=f"{where}[{j}].type",
                               code="unsupported_value")
        else:
            raise RequestError(f"{where}[{j}].type: must be input_text or output_text (got {kind!r:.40})",
                               param=f"{where}[{j}].type")
    return parts


def _tool(tool, k: int) -> dict:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) in chat's form."""
    where = f"tools[{k}]"
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise RequestError(f"{where}.type: pyllm runs function tools only (got {kind!r:.40}: hosted tools such as "
                           "web search run at OpenAI)", param=f"{where}.type", code="unsupported_value")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise RequestError(f"tool_choice: must be none, auto, required or {{\"type\": \"function\", \"name\": ...}} "
                       f"(got {kind!r:.40})", param="tool_choice", code="unsupported_value")


def _response_format(fmt) -> dict:
    """text.format in chat's response_format: json_schema's name, schema, strict and description sit
    in the format itself here, under "json_schema" there."""
    if not isinstance(fmt, dict):
        raise RequestError("text.format: must be an object", param="text.format", code="invalid_type")
    if fmt.get("type") == "json_schema":
        inner = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": inner}
    return fmt


# -- the answer ---------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_shell(body: dict, model: str, status: str = "in_progress") -> dict:
    """A Response object without output or usage: what the request asked, echoed as OpenAI does (a
    null or absent field as its default; temperature and top_p null where the request left them to
    the server's or the model's defaults)."""
    def given(name, default):
        return default if body.get(name) is None else body[name]

    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None, "model": model, "output": [],
            "parallel_tool_calls": given("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": {"effort": reasoning.get("effort"), "summary": None}, "service_tier": "default",
            "store": False, "temperature": body.get("temperature"),
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
            "tool_choice": given("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_logprobs": given("top_logprobs", 0), "top_p": body.get("top_p"), "truncation": "disabled",
            "usage": None, "user": body.get("user"), "metadata": body.get("metadata") or {}}


def usage(chat_usage: dict) -> dict:
    """Chat's usage object in the Responses API's names."""
    details = chat_usage.get("completion_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
            "total_tokens": chat_usage["total_tokens"]}


def _finish(response: dict, finish_reason: str) -> dict:
    if finish_reason == "length":  # the item the limit cut is incomplete too, as OpenAI marks it
        response["status"], response["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        if response["output"]:
            response["output"][-1]["status"] = "incomplete"
    else:
        response["status"] = "completed"
    return response


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, logprobs: list | None, status: str = "completed", item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": [output_text(text, logprobs)]}


def output_text(text: str, logprobs: list | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def call_item(call: dict, status: str = "completed", arguments: str | None = None) -> dict:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call item."""
    return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}


def covering(entries: list | None, text: str, last: bool = False) -> list:
    """The logprobs entries (chat's, with each token's bytes) of the tokens that make `text` among
    them: the shortest run that holds its first occurrence (last: its last), leaving out tokens of a
    think block before it or a tool call's markup after it. All of them where the text is not found
    whole (a character split across tokens outside the run)."""
    if not entries or not text:
        return list(entries or [])
    data = [bytes(e["bytes"]) if e.get("bytes") is not None else e["token"].encode() for e in entries]
    joined, target = b"".join(data), text.encode()
    at = joined.rfind(target) if last else joined.find(target)
    if at < 0:
        return list(entries)
    start = stop = None
    position = 0
    for k, piece in enumerate(data):
        if start is None and position + len(piece) > at:
            start = k
        position += len(piece)
        if position >= at + len(target):
            stop = k + 1
            break
    return list(entries[start:stop])


def response_object(body: dict, answer: dict, streams=None) -> dict:
    """The Response of a Responses request (body) whose chat answer (one choice) is `answer`."""
    choice = answer["choices"][0]
    message = choice["message"]
    response = response_shell(body, answer["model"])
    output = response["output"]
    if message.get("reasoning_content") is not None:
        output.append(reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        entries = (choice.get("logprobs") or {}).get("content") or []
        thought = (answer["usage"].get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        output.append(message_item(message["content"], covering(entries[thought:], message["content"])))
    output += [call_item(call) for call in message.get("tool_calls") or ()]
    response["usage"] = usage(answer["usage"])
    return _finish(response, choice["finish_reason"])


class ResponseEvents:
    """Responses stream events from a streamed chat answer's chunks (one choice, usage included):
    feed(chunk) returns the events it makes, in order, numbered by sequence_number. The output items
    open and close as the chunks' deltas go from reasoning to content to tool calls; the last chunk
    (usage) ends the stream with response.completed (or response.incomplete)."""

    def __init__(self, body: dict, model: str, plan=None, streams=None):
        self.body = body
        self.response = response_shell(body, model)
        self.sequence = 0
        self.open: dict | None = None  # the output item being written: {"item", "index", "text", "logprobs"}
        self.finish_reason = "stop"

    def start(self) -> list[dict]:
        return [self._event("response.created", response=copy.deepcopy(self.response)),
                self._event("response.in_progress", response=copy.deepcopy(self.response))]

    def feed(self, chunk: dict) -> list[dict]:
        events: list[dict] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._text("reasoning", delta["reasoning_content"], None)
            logprobs = (choice.get("logprobs") or {}).get("content")
            if delta.get("content"):
                events += self._text("message", delta["content"], logprobs)
            elif logprobs and self.open is not None and self.open["item"]["type"] == "message":
                self.open["logprobs"] += logprobs  # the last tokens' (the finishing chunk carries them)
            for call in delta.get("tool_calls") or ():
                events += self._close()
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]  # (first: the item it closes was cut by "length")
                events += self._close()
        if chunk.get("usage"):
            events += self._close()
            self.response["usage"] = usage(chunk["usage"])
            _finish(self.response, self.finish_reason)
            kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
            events.append(self._event(kind, response=self.response))
        return events

    def error(self, error: dict, status: int = 500) -> dict:
        """The stream's error event, from an OpenAI error object ({"error": {...}})."""
        inner = error.get("error", error)
        return self._event("error", code=inner.get("code"), message=inner.get("message"), param=inner.get("param"))

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _text(self, kind: str, text: str, logprobs: list | None) -> list[dict]:
        """A delta of the reasoning or of the message, opening its item (and closing another) first."""
        events = []
        if self.open is None or self.open["item"]["type"] != kind:
            events += self._close()
            index = len(self.response["output"])
            if kind == "reasoning":
                item = reasoning_item("", "in_progress")
                item["content"] = []
            else:
                item = message_item("", None, "in_progress")
                item["content"] = []
            self.open = {"item": item, "index": index, "text": [], "logprobs": []}
            self.response["output"].append(item)
            events.append(self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item)))
            if kind == "message":
                events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                          content_index=0, part=output_text("", None)))
        self.open["text"].append(text)
        where = dict(item_id=self.open["item"]["id"], output_index=self.open["index"], content_index=0)
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", **where, delta=text)]
        logprobs = covering(logprobs, text, last=True)  # (a think block's held tags came with the first delta)
        self.open["logprobs"] += logprobs
        return events + [self._event("response.output_text.delta", **where, delta=text, logprobs=logprobs)]

    def _close(self) -> list[dict]:
        """The events that end the open item (none when none is open)."""
        if self.open is None:
            return []
        opened, self.open = self.open, None
        item, index, text = opened["item"], opened["index"], "".join(opened["text"])
        where = dict(item_id=item["id"], output_index=index, content_index=0)
        status = "incomplete" if self.finish_reason == "length" else "completed"
        if item["type"] == "reasoning":
            item.update(reasoning_item(text, status, item_id=item["id"]))
            events = [self._event("response.reasoning_text.done", **where, text=text)]
        else:
            opened["logprobs"] = covering(opened["logprobs"], text)  # (not a call's markup the last chunk's hold)
            item.update(message_item(text, opened["logprobs"], status, item_id=item["id"]))
            part = item["content"][0]
            events = [self._event("response.output_text.done", **where, text=text, logprobs=opened["logprobs"]),
                      self._event("response.content_part.done", **where, part=part)]
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def _call(self, call: dict) -> list[dict]:
        index = len(self.response["output"])
        item = call_item(call)
        self.response["output"].append(item)
        started = dict(item, arguments="", status="in_progress")
        where = dict(item_id=item["id"], output_index=index)
        return [self._event("response.output_item.added", output_index=index, item=started),
                self._event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                self._event("response.function_call_arguments.done", **where, name=item["name"],
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item)]



def error_body(status: int, error: dict) -> dict:
    """An error answer: OpenAI's object, as the chat path makes it."""
    return error
