"""Anthropic's Messages API (POST /v1/messages, POST /v1/messages/count_tokens) on the chat completions
path, as llama.cpp's server and ollama serve it (what Claude Code and the `anthropic` client speak): a
request is read into a chat completions request (chat_body), run as one, and its answer or its chunks
are written back as a Message (message_object) or Messages stream events (MessageEvents). The shapes
follow Anthropic's API reference (docs.anthropic.com, "Messages" and "Streaming Messages").

Taken: `model`, `max_tokens` (required, as Anthropic requires it), `messages` (user and assistant turns;
content a string or blocks: text, tool_use, tool_result, thinking; redacted_thinking blocks are
dropped, their text being encrypted for Anthropic's models), `system` (a string or text blocks),
`stop_sequences`, `temperature`, `top_p`, `top_k`, `stream`, `tools` (custom tools: name,
description, input_schema), `tool_choice` (auto, any, tool, none; disable_parallel_tool_use),
`thinking` (enabled / disabled: the template's enable_thinking, as Qwen3's reads it), `output_config`
(format: structured output held to a JSON schema; effort: the template's reasoning_effort), `metadata` and
`service_tier` (nothing is stored), and pyllm's sampling extensions (api_schema.EXTENSIONS). Refused,
naming the field: images and documents, Anthropic's own tools (bash, text editor, web search, ...),
`container`, `mcp_servers`.

A last assistant turn is a prefill: the reply continues its text (without it).

Output: a `thinking` block (a think block: pyllm/reasoning.py; its signature is empty, there being
nothing to sign), a `text` block, and a `tool_use` block per tool call, in that order; stop_reason
end_turn, max_tokens, stop_sequence (with the stop_sequence that ended the reply) or tool_use.
Usage: input_tokens are the prompt tokens computed for this request, cache_read_input_tokens those
whose KV cache was reused (their sum is the prompt).
"""

from __future__ import annotations

import json
import uuid

from .api_schema import EXTENSIONS, SOURCE_KEY, renamed_field
from .errors import RequestError

SAME_FIELDS = ("model", "temperature", "top_p", "top_k", "stream", *EXTENSIONS)
REFUSED = (("container", "pyllm runs no code containers: leave it out"),
           ("mcp_servers", "pyllm connects to no MCP servers: give their tools as tools"))
# OpenAI chat fields a Messages request names otherwise, or has not (refused, not dropped in silence)
CHAT_FIELDS = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "n": None, "logprobs": None,
               "top_logprobs": None, "response_format": None, "stream_options": None, "functions": "tools",
               "function_call": "tool_choice", "reasoning_effort": "thinking"}
# Anthropic's error types by HTTP status (its API reference, "Errors")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "request_too_large", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
# chat request fields and the Messages fields they come from, for errors the chat checks raise
# (api_schema.renamed_field): chat's messages[k] is not turn k (system, tool results are messages there)
MESSAGES_NAMES = ((r"stop", "stop_sequences", True), (r"tools\[(\d+)\]\.function\.parameters", r"tools[\1].input_schema", True),
                  (r"tools\[(\d+)\]\.function", r"tools[\1]", True), (r"tool_choice\.function", "tool_choice", True),
                  (r"response_format(\.json_schema)?", "output_config.format", True),
                  (r"reasoning_effort", "output_config.effort", True), (r"messages", "messages", False))


def _refuse(param: str, message: str, code: str = "unsupported_parameter") -> RequestError:
    return RequestError(f"{param}: {message}", param=param, code=code)


def _invalid(param: str, message: str, code: str = "invalid_type") -> RequestError:
    return RequestError(f"{param}: {message}", param=param, code=code)


def chat_body(body: dict) -> dict:
    """The chat completions request (a body for api_schema.parse_request) a Messages request asks for;
    RequestError naming the Messages field for what is refused or malformed."""
    for name, why in REFUSED:
        if body.get(name) is not None:
            raise _refuse(name, why)
    for name, instead in CHAT_FIELDS.items():
        if name in body:
            raise _refuse(name, f"is an OpenAI chat field: give {instead} on /v1/messages" if instead else
                          "is an OpenAI chat field /v1/messages has not")
    for name in ("max_tokens", "messages"):
        if body.get(name) is None:
            raise RequestError(f"{name}: a Messages request needs {name}", param=name,
                               code="missing_required_parameter")
    if not isinstance(body["max_tokens"], int) or isinstance(body["max_tokens"], bool) or body["max_tokens"] < 1:
        raise _invalid("max_tokens", f"must be an integer of at least 1 (got {body['max_tokens']!r:.40})")
    chat = {name: body[name] for name in SAME_FIELDS if body.get(name) is not None}
    chat["max_tokens"] = body["max_tokens"]
    if body.get("temperature") is not None and not 0 <= _number(body["temperature"], "temperature") <= 1:
        raise _invalid("temperature", f"must be between 0 and 1 (got {body['temperature']!r:.40})", "invalid_value")
    messages = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text(body["system"], "system"), SOURCE_KEY: "system"})
    messages += _messages(body["messages"])
    chat["messages"] = messages
    if messages and messages[-1]["role"] == "assistant":  # a prefill: the reply goes on from its text
        _check_prefill(messages[-1])
        chat["add_generation_prompt"], chat["continue_final_message"] = False, True
    if body.get("stop_sequences") is not None:
        chat["stop"] = _list(body["stop_sequences"], "stop_sequences")
    if body.get("tools"):
        chat["tools"] = [_tool(tool, k) for k, tool in enumerate(_list(body["tools"], "tools"))]
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            raise _invalid("thinking.type", f"must be enabled, disabled or adaptive (got {kind!r:.40})", "invalid_value")
        kwargs = chat.get("chat_template_kwargs")
        if kwargs is None or isinstance(kwargs, dict):  # (anything else: refused by chat's check, naming it)
            chat["chat_template_kwargs"] = {"enable_thinking": kind != "disabled", **(kwargs or {})}
    if body.get("output_config") is not None:
        _output_config(body["output_config"], chat)
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # the last event carries the usage
    return chat


def _check_prefill(final: dict) -> None:
    """A last assistant turn is a prefill the reply continues: text (and thinking) only. (A structured
    output or a forced tool call beside it is refused by the chat request's own check, named
    output_config.format / tool_choice.)"""
    where = final[SOURCE_KEY]
    if final.get("tool_calls"):
        raise _invalid(f"{where}.content", "a last assistant turn is a prefill the reply continues: its tool_use "
                       "blocks need their tool_result blocks in a user turn after it", "invalid_value")


def _output_config(config, chat: dict) -> None:
    """output_config: format (structured outputs: {"type": "json_schema", "schema": {...}}, a
    response_format held to the schema) and effort (reasoning_effort, for a template that reads it)."""
    if not isinstance(config, dict):
        raise _invalid("output_config", "must be an object")
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise _invalid("output_config.format.type", "must be json_schema", "invalid_value")
        if not isinstance(fmt.get("schema"), dict):
            raise _invalid("output_config.format.schema", "must be a JSON schema (an object)",
                           "missing_required_parameter" if fmt.get("schema") is None else "invalid_type")
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
    if config.get("effort") is not None:
        chat["reasoning_effort"] = config["effort"]


def _number(value, param: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(param, f"must be a number (got {value!r:.40})")
    return value


def _list(value, param: str) -> list:
    if not isinstance(value, list):
        raise _invalid(param, "must be an array")
    return value


def _text(content, where: str) -> str | list:
    """A system prompt or tool result: a string, or text blocks (chat's text parts)."""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(_list(content, where)):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            code = "unsupported_value" if kind in ("image", "document", "search_result") else "invalid_value"
            raise _invalid(f"{where}[{j}].type", f"pyllm takes text blocks here (got {kind!r:.40})", code)
        parts.append({"type": "text", "text": _string(block, "text", f"{where}[{j}]")})
    return parts


def _string(block: dict, key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise _invalid(f"{where}.{key}", "must be a string", "missing_required_parameter" if value is None
                       else "invalid_type")
    return value


def _messages(turns) -> list[dict]:
    """Chat messages of the Messages turns: a user turn's tool_result blocks are tool messages (before
    its other blocks, a user message); an assistant turn's thinking is its reasoning_content, its
    tool_use blocks its tool_calls."""
    messages: list[dict] = []
    for k, turn in enumerate(_list(turns, "messages")):
        where = f"messages[{k}]"
        if not isinstance(turn, dict):
            raise _invalid(where, "must be an object with role and content")
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise _invalid(f"{where}.role", f"must be user or assistant (got {role!r:.40})", "invalid_value")
        content = turn.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content, SOURCE_KEY: where})
            continue
        blocks = _list(content, f"{where}.content")
        if role == "user":
            messages += _user_turn(blocks, where)
        else:
            messages.append(_assistant_turn(blocks, where))
    return messages


def _kind(block, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise _invalid(f"{where}.type", "every content block needs a type", "missing_required_parameter")
    if kind in ("image", "document", "search_result", "container_upload"):
        raise _invalid(f"{where}.type", f"pyllm takes text only (got {kind!r})", "unsupported_value")
    return kind


def _user_turn(blocks: list, turn: str) -> list[dict]:
    results, parts = [], []
    where = f"{turn}.content"
    for j, block in enumerate(blocks):
        kind = _kind(block, f"{where}[{j}]")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", f"{where}[{j}]")})
        elif kind == "tool_result":
            output = block.get("content", "")
            text = output if isinstance(output, str) else _text(output, f"{where}[{j}].content")
            if isinstance(text, list):
                text = "\n".join(part["text"] for part in text)  # (as a message's text parts are joined)
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", f"{where}[{j}]"),
                            "content": text, SOURCE_KEY: f"{where}[{j}]"})
        else:
            raise _invalid(f"{where}[{j}].type", f"a user turn takes text and tool_result blocks (got {kind!r:.40})",
                           "invalid_value")
    return results + ([{"role": "user", "content": parts, SOURCE_KEY: turn}] if parts or not results else [])


def _assistant_turn(blocks: list, turn: str) -> dict:
    message: dict = {"role": "assistant", "content": None, SOURCE_KEY: turn}
    texts, calls, thoughts = [], [], []
    where = f"{turn}.content"
    for j, block in enumerate(blocks):
        kind = _kind(block, f"{where}[{j}]")
        if kind == "text":
            texts.append(_string(block, "text", f"{where}[{j}]"))
        elif kind == "thinking":
            thoughts.append(_string(block, "thinking", f"{where}[{j}]"))
        elif kind == "redacted_thinking":
            continue  # encrypted for Anthropic's models: no text to give this one
        elif kind == "tool_use":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise _invalid(f"{where}[{j}].input", "must be an object")
            calls.append({"id": _string(block, "id", f"{where}[{j}]"), "type": "function",
                          "function": {"name": _string(block, "name", f"{where}[{j}]"),
                                       "arguments": json.dumps(arguments, ensure_ascii=False)}})
        else:
            raise _invalid(f"{where}[{j}].type", "an assistant turn takes text, thinking and tool_use blocks "
                           f"(got {kind!r:.40})", "invalid_value")
    if texts or not calls:  # (a reply cut while thinking has no text: "", as it came back)
        message["content"] = "".join(texts)
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    return message


def _tool(tool, k: int) -> dict:
    """A custom tool ({"name", "description", "input_schema"}) in chat's form."""
    where = f"tools[{k}]"
    if not isinstance(tool, dict):
        raise _invalid(where, "must be an object")
    if tool.get("type") not in (None, "custom"):
        raise _invalid(f"{where}.type", f"pyllm runs custom tools only (got {tool['type']!r:.40}: Anthropic's own "
                       "tools run at Anthropic)", "unsupported_value")
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice, chat: dict) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(kind, str):
        raise _invalid("tool_choice.type", f"must be auto, any, tool or none (got {kind!r:.40})")
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind in modes:
        mode = modes[kind]
    elif kind == "tool":
        mode = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise _invalid("tool_choice.type", f"must be auto, any, tool or none (got {kind!r:.40})", "invalid_value")
    if "tools" in chat:  # chat refuses a tool_choice without tools, Anthropic does not for auto and none
        chat["tool_choice"] = mode
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    elif kind in ("any", "tool"):
        raise _invalid("tool_choice", f"{kind!r} needs tools to call", "invalid_value")


def rename(param: str | None, message: str, chat: dict | None = None) -> tuple[str | None, str]:
    """An error's (param, message) naming the Messages field its chat field came from (chat: the
    chat request chat_body made, whose messages say which turn or block each came from)."""
    return renamed_field(param, message, MESSAGES_NAMES, chat)


def error_body(status: int, error: dict) -> dict:
    """An OpenAI error object ({"error": {"message", ...}}) as Anthropic's ({"type": "error", "error":
    {"type", "message"}})."""
    inner = error.get("error", error)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": inner.get("message")}}


# -- the answer ---------------------------------------------------------------------------------------

def stop_reason(finish_reason: str, stop_string: str | None) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if stop_string else "end_turn"


def usage(chat_usage: dict) -> dict:
    """Chat's usage object in Anthropic's names."""
    cached = chat_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "output_tokens": chat_usage["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def message_shell(model: str, input_tokens: int = 0) -> dict:
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}


def _tool_use(call: dict) -> dict:
    """A chat tool call as a tool_use block; an id pyllm made ("call_" + hex) in Anthropic's form,
    "toolu_" + hex (a model's own id, which its template may check, stays as it is)."""
    call_id = call["id"]
    if call_id.startswith("call_"):
        call_id = "toolu_" + call_id.removeprefix("call_")
    return {"type": "tool_use", "id": call_id, "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"] or "{}")}


def message_object(body: dict, answer: dict, streams) -> dict:
    """The Message of a Messages request (body) whose chat answer (one choice) is `answer`; streams:
    its one TextStream (the stop string that ended it)."""
    choice = answer["choices"][0]
    message = choice["message"]
    out = message_shell(answer["model"])
    if message.get("reasoning_content") is not None:
        out["content"].append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        out["content"].append({"type": "text", "text": message["content"]})
    out["content"] += [_tool_use(call) for call in message.get("tool_calls") or ()]
    stop_string = streams[0].stats.stop_string
    out["stop_reason"] = stop_reason(choice["finish_reason"], stop_string)
    out["stop_sequence"] = stop_string if out["stop_reason"] == "stop_sequence" else None
    out["usage"] = usage(answer["usage"])
    return out


class MessageEvents:
    """Messages stream events from a streamed chat answer's chunks (one choice, usage included):
    feed(chunk) returns the events it makes, in order. Content blocks open and close as the deltas go
    from reasoning to text to tool calls; the last chunk (usage) ends the stream with message_delta
    and message_stop."""

    def __init__(self, body: dict, model: str, plan, streams):
        self.streams = streams
        self.message = message_shell(model, len(plan.prompts[0]))
        self.index = -1  # the content block being written, or the last written
        self.open: str | None = None  # its type while open
        self.finish_reason = "stop"
        self.started = False

    def start(self) -> list[dict]:
        return []  # message_start waits for the first chunk that follows the prompt's run (feed)

    def _message_start(self) -> list[dict]:
        """message_start, its usage split as message_delta's: the prompt tokens a cache held are known
        once the prompt ran (it said 32 input and 0 cached where message_delta said 1 and 31)."""
        self.started = True
        usage = self.message["usage"]
        cached = min(self.streams[0].stats.cached_tokens, usage["input_tokens"])
        usage["input_tokens"], usage["cache_read_input_tokens"] = usage["input_tokens"] - cached, cached
        return [{"type": "message_start", "message": self.message}, {"type": "ping"}]

    def feed(self, chunk: dict) -> list[dict]:
        events: list[dict] = []
        if not self.started:
            if not chunk.get("usage") and not any(
                    (c.get("delta") or {}).keys() - {"role"} or c.get("finish_reason") for c in chunk.get("choices") or ()):
                return []  # the opening chunk (the role), sent before the prompt runs
            events += self._message_start()
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._delta("thinking", {"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                events += self._delta("text", {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or ():
                events += self._close()
                block = _tool_use(call)
                self.index += 1
                events += [{"type": "content_block_start", "index": self.index, "content_block": dict(block, input={})},
                           {"type": "content_block_delta", "index": self.index,
                            "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}},
                           {"type": "content_block_stop", "index": self.index}]
            if choice.get("finish_reason"):
                events += self._close()
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            events += self._close()
            stop_string = self.streams[0].stats.stop_string
            reason = stop_reason(self.finish_reason, stop_string)
            events += [{"type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": stop_string if reason == "stop_sequence"
                                  else None}, "usage": usage(chunk["usage"])},
                       {"type": "message_stop"}]
        return events

    def error(self, error: dict, status: int = 500) -> dict:
        """The stream's error event, from an OpenAI error object ({"error": {...}}) of that HTTP status."""
        return error_body(status, error)

    def _delta(self, kind: str, delta: dict) -> list[dict]:
        events = []
        if self.open != kind:
            events += self._close()
            self.index += 1
            self.open = kind
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            events.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return events + [{"type": "content_block_delta", "index": self.index, "delta": delta}]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":  # Anthropic's stream signs a thinking block before its stop
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "signature_delta", "signature": ""}})
        self.open = None
        return events + [{"type": "content_block_stop", "index": self.index}]


def count_tokens_body(body: dict) -> dict:
    """The Messages request a count_tokens body (no max_tokens, no stream) stands for."""
    return {**body, "max_tokens": 1, "stream": False}

