"""The request bodies `pyllm serve` accepts, declared once with pydantic (as vLLM does).

OpenAI's names, defaults and ranges (the API reference of /v1/chat/completions and
/v1/completions; llama.cpp's /tokenize and /detokenize); llama.cpp's names accepted as aliases where they differ (repeat_penalty,
n_predict, ...); unknown fields ignored, as OpenAI does; an explicit null means the field's default;
seed -1 means unseeded (llama.cpp); NaN and infinite numbers are refused; values are not converted
from another JSON type (strict mode: "5" is not an integer, true not a number, 2.0 not an integer,
1 not a boolean; an integer is a number), as OpenAI refuses them. Anything else is refused with
RequestError, which names the field in `param` as OpenAI's error object does.

Extensions beyond OpenAI: top_k, min_p, typical_p, repetition_penalty, stop_token_ids, response_format
types "regex" and "grammar" (a Lark grammar, llguidance's dialect), up to MAX_STOP stop strings (OpenAI: 4),
logprobs up to 20 on /v1/completions (OpenAI: 5), logit_bias of any number of tokens (OpenAI: 300), "."
in function names, and llama.cpp's and vLLM's chat_template_kwargs and reasoning_format on
/v1/chat/completions.

OpenAI fields that only steer OpenAI's own services (store, metadata, service_tier, prompt_cache_key,
prompt_cache_retention, prompt_cache_options, safety_identifier, user, prediction) are checked as OpenAI
types them, then ignored: the reply is what it would be without them. Those asking for what pyllm cannot
give (audio output, web search, moderation, a verbosity other than "medium", a reasoning_effort the chat
template does not read) are refused with code "unsupported_parameter" or "unsupported_value", as are the
fields of the other endpoint (echo on /v1/chat/completions, max_completion_tokens on /v1/completions, ...),
which were ignored in silence. Each error carries OpenAI's `code` ("invalid_type", "missing_required_parameter",
"integer_above_max_value", "invalid_value", "invalid_parameter_combination", ...).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, field_validator, model_validator)

from .errors import RequestError
from .sampling import MIN_REPETITION_PENALTY

MAX_STOP = 16  # stop strings per request
MAX_CHOICES = 128  # n (OpenAI's limit)
MAX_PROMPTS = 2048  # prompts in one completion request (OpenAI's limit for a list of inputs), and their choices
# messages in one chat request, content parts and tool calls in one message, tools: each becomes Python objects of about
# 1 KB while validated and rendered (a 7 MiB body of 480,000 empty messages took 700 MB)
MAX_MESSAGES = 16384
MAX_CONTENT_PARTS = 256
MAX_TOOL_CALLS = 256
MAX_TOOLS = 128  # OpenAI's limit
# log-probabilities (each chosen token's and its alternatives) one non-streamed answer may hold: about
# 600 bytes each while the answer is built, 55 bytes each in its JSON (n=128 x 4096 tokens x 21 would
# be 7 GB from a 200-byte request)
MAX_LOGPROB_ENTRIES = 2**19


class _FieldError(ValueError):
    """Raised by a check across fields, to name the field at fault (and OpenAI's error code)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def _unsupported(param: str, message: str) -> _FieldError:
    return _FieldError(param, message, "unsupported_parameter")


def _refuse_fields(data: Any, names: tuple[str, ...], where: str, instead: dict[str, str]) -> None:
    """Refuses, in a request body (before validation), the fields of `names` it gives (not null): those
    of the other endpoint (OpenAI refuses them as unrecognized; ignored, what the client meant was lost)."""
    for name in names if isinstance(data, dict) else ():
        if data.get(name) is not None:
            hint = f"; give {instead[name]}" if name in instead else ""
            raise _unsupported(name, f"is not a field of {where}{hint}")


class _Body(BaseModel):
    """Unknown fields are ignored; an explicit null is the field's default; a field given under two of
    its names (max_tokens and n_predict) is refused (pydantic took the first, the other dropped in silence)."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        for field in cls.model_fields.values():
            names = getattr(field.validation_alias, "choices", ())
            given = [name for name in names if name in data]
            if len(given) > 1:
                raise _FieldError(given[0], f"{' and '.join(repr(n) for n in given)} name the same option: give one",
                                  "invalid_parameter_combination")
        return data


class StreamOptions(_Body):
    include_usage: bool = False


def _name(dots: bool):
    """OpenAI's names of a response format and of a function: "a-z, A-Z, 0-9, or contain underscores and
    dashes, with a maximum length of 64" (pyllm takes "." in function names too: gpt-oss's "browser.search")."""
    pattern = r"[A-Za-z0-9_.-]{1,64}" if dots else r"[A-Za-z0-9_-]{1,64}"

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"must be 1 to 64 of a-z, A-Z, 0-9, underscores and dashes{', dots' if dots else ''} "
                             f"(got {value[:80]!r})")
        return value
    return Annotated[StrictStr, AfterValidator(check)]


class JsonSchemaFormat(_Body):
    """OpenAI's json_schema: name required (it was taken missing, or any string); schema optional
    (any JSON value then)."""
    name: _name(dots=False)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]  # (required, as OpenAI's)
    json_schema: JsonSchemaFormat | None = None
    # type "json_object": a JSON schema the object follows (llama.cpp's server and llama-cpp-python take it so)
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    regex: str | None = None  # type "regex"
    grammar: str | None = None  # type "grammar": Lark

    @model_validator(mode="after")
    def _has_its_field(self):
        needed = {"json_schema": self.json_schema, "regex": self.regex, "grammar": self.grammar}
        if self.type in needed and not needed[self.type]:
            raise _FieldError(f"response_format.{self.type}", f"type {self.type!r} needs this field")
        for name in ("json_schema", "regex", "grammar"):  # with another type it was ignored: free text, another format
            if getattr(self, name) is not None and self.type != name:
                raise _FieldError(f"response_format.{name}", f"is taken with type {name!r} only; with type "
                                                             f"{self.type!r} it would be ignored")
        if self.schema_ is not None and self.type != "json_object":  # it was ignored: free text, or another schema
            instead = "json_schema.schema" if self.type == "json_schema" else "type 'json_object'"
            raise _FieldError("response_format.schema", f"is taken with type 'json_object' only (llama.cpp's form); "
                                                        f"with type {self.type!r} it would be ignored: give {instead}")
        return self

    def as_dict(self) -> dict:
        """The form generate(response_format=...) takes."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "json_object" and self.schema_ is not None:
            out["schema"] = self.schema_
        elif self.type == "json_schema":
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_,
                                  "strict": self.json_schema.strict}
        elif self.type in ("regex", "grammar"):
            out[self.type] = getattr(self, self.type)
        return out


Metadata = Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
                     Field(max_length=16)]  # OpenAI: 16 pairs, keys of 64 characters at most, values of 512


class PredictionContent(_Body):
    """OpenAI's predicted output: taken and ignored (pyllm does not speculate; the reply is the same)."""
    type: Literal["content"]
    content: Union[StrictStr, Annotated[list[dict[str, Any]], Field(min_length=1)]]


class FunctionDefinition(_Body):
    name: _name(dots=True)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ToolCallFunction(_Body):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    arguments: Union[StrictStr, dict[str, Any]]  # OpenAI's JSON text; an object too, as templates take it


class ToolCall(_Body):
    """A call in an assistant message, as OpenAI requires it: id, type "function", function's name and
    arguments (a call without them reached the template, which failed on it or rendered it without)."""
    model_config = ConfigDict(extra="allow")
    id: StrictStr
    type: Literal["function"]
    function: ToolCallFunction


class Message(BaseModel):
    """One chat message; keys beyond these (name, tool_call_id, ...) pass through to the template."""
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # an empty list is refused, as OpenAI does ("empty array", param messages[k].content / .tool_calls)
    content: Union[StrictStr, Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_CONTENT_PARTS)],
                   None] = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOL_CALLS)] | None = None
    name: StrictStr | None = None  # strings the template renders: another type was rendered as its text
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _has_content(self):
        # OpenAI: "Missing required parameter: 'messages[k].content'"; an assistant message may hold tool
        # calls in its place (and a "function" message is the deprecated form, refused by the template)
        if self.content is None and self.role in ("system", "developer", "user", "tool"):
            raise _FieldError("content", f"a {self.role} message needs a content")
        if self.content is None and self.role == "assistant" and not self.tool_calls:
            raise _FieldError("content", "an assistant message needs a content or tool_calls")
        if self.role == "tool" and self.tool_call_id is None:  # OpenAI: "Missing required parameter"
            raise _FieldError("tool_call_id", "a tool message needs the tool_call_id of the call it answers",
                              "missing_required_parameter")
        for j, part in enumerate(self.content if isinstance(self.content, list) else ()):
            # as the chat template refuses them (pyllm.chat_template), naming the part as OpenAI does
            if part.get("type") != "text":  # OpenAI's other kinds: unsupported here; anything else: invalid
                known = part.get("type") in ("image_url", "input_audio", "file", "refusal")
                raise _FieldError(f"content[{j}].type", f"only text content parts are supported (got "
                                                        f"{part.get('type')!r:.40})",
                                  "unsupported_value" if known else "invalid_value")
            if not isinstance(part.get("text"), str):
                raise _FieldError(f"content[{j}].text", f"a text content part needs a 'text' string (got "
                                                        f"{part.get('text')!r:.40})")
        return self


def _logit_bias_key(key: str) -> int:
    if not re.fullmatch(r"\d{1,9}", str(key)):
        raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
    return int(key)


# pyllm's and llama.cpp's chat request fields beyond OpenAI's Responses and Anthropic's Messages
# fields: those dialects (pyllm/responses_api.py, pyllm/anthropic_api.py) pass them on to chat
EXTENSIONS = ("top_k", "min_p", "typical_p", "repetition_penalty", "repeat_penalty", "presence_penalty",
              "frequency_penalty", "logit_bias", "seed", "stop_token_ids", "chat_template_kwargs", "reasoning_format")


class _Sampling(_Body):
    """The fields both endpoints share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=-1, validation_alias=AliasChoices("max_tokens", "n_predict"))
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # (float bounds: a decimal_* error code)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 / 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)  # llama.cpp's name; 1: off
    repetition_penalty: float | None = Field(None, ge=float(MIN_REPETITION_PENALTY), validation_alias=AliasChoices(
        "repetition_penalty", "repeat_penalty"))
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # 64 bits, as OpenAI's int64 or llama.cpp's uint64: past them generate's modulo 2**64 made 2**64 seed 0
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)], None] = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:  # as OpenAI refuses them
            raise _FieldError("stream_options", "is only allowed when 'stream' is true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        if not value:
            return value
        out, keys = {}, {}
        for key, bias in value.items():
            token = _logit_bias_key(key)
            if token in keys:  # "5" and "05": one of the two biases was dropped in silence
                raise ValueError(f"token {token} is named twice ({keys[token]!r} and {key!r})")
            keys[token], out[str(token)] = key, bias
        return out

    def generate_options(self) -> dict:
        """LLM.generate keyword arguments (unset ones left out: the server's and model's defaults apply)."""
        out = dict(temperature=self.temperature, top_p=self.top_p, min_p=self.min_p, typical_p=self.typical_p,
                   repetition_penalty=self.repetition_penalty,
                   top_k=None if self.top_k is None else max(self.top_k, 0),
                   seed=self.seed,  # -1 (unseeded, as generate takes it) kept: it overrides a server's default seed
                   stop=[self.stop] if isinstance(self.stop, str) else self.stop,
                   stop_token_ids=self.stop_token_ids, presence_penalty=self.presence_penalty,
                   frequency_penalty=self.frequency_penalty,
                   logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                   response_format=self.response_format.as_dict() if self.response_format else None)
        return {k: v for k, v in out.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # an empty list is refused, as OpenAI does ("[] is too short - 'tools'"): leave tools out for none
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    functions: Any = None  # OpenAI's deprecated forms of tools and tool_choice: refused, not ignored
    function_call: Any = None
    # OpenAI's fields for its own services: checked, then ignored (module docstring)
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: Annotated[str, Field(max_length=128)] | None = None
    prediction: PredictionContent | None = None
    # what pyllm gives in part: text output; a reasoning_effort the chat template reads
    modalities: list[Literal["text", "audio"]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    # llama.cpp's and vLLM's: more chat template variables ({"enable_thinking": false} for Qwen3), and
    # where a reply's think block goes ("deepseek": reasoning_content; "none": left in content)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: Literal["deepseek", "none"] | None = None
    # vLLM's (transformers' apply_chat_template arguments): the template's opening of the reply, or the
    # reply continuing the last message's text (an assistant prefill)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    # what pyllm cannot give: refused when given
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None

    @model_validator(mode="before")
    @classmethod
    def _chat_fields_only(cls, data: Any) -> Any:
        _refuse_fields(data, ("prompt", "echo", "best_of", "suffix"), "/v1/chat/completions",
                       {"prompt": "messages", "echo": "the messages you sent"})
        return data

    @model_validator(mode="after")
    def _consistent(self):
        for name, what in (("audio", "audio output"), ("web_search_options", "web search"),
                           ("moderation", "moderation")):
            if getattr(self, name) is not None:
                raise _unsupported(name, f"pyllm serve has no {what}")
        if self.modalities and "audio" in self.modalities:
            raise _FieldError("modalities", "pyllm serve answers in text only: give [\"text\"]", "unsupported_value")
        if self.verbosity not in (None, "medium"):
            raise _FieldError("verbosity", "this model has one verbosity, \"medium\"", "unsupported_value")
        if "max_tokens" in self.model_fields_set and "max_completion_tokens" in self.model_fields_set:
            raise _FieldError("max_tokens", "Setting 'max_tokens' (or n_predict) and 'max_completion_tokens' at the "
                                            "same time is not supported: give max_completion_tokens",
                              "invalid_parameter_combination")  # OpenAI's 400, in its words
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, old) is not None:
                raise _FieldError(old, f"is OpenAI's deprecated form of {new}, which pyllm does not take: give "
                                       f"{new} (tools: [{{'type': 'function', 'function': {{...}}}}])")
        if "top_logprobs" in self.model_fields_set and not self.logprobs:  # 0 too, as OpenAI refuses it
            raise _FieldError("top_logprobs", "needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt:  # vLLM's 400
            raise _FieldError("continue_final_message", "cannot be true with add_generation_prompt true (the "
                              "default): give add_generation_prompt false", "invalid_parameter_combination")
        if self.continue_final_message:  # (as /v1/messages refuses a prefill with output_config.format)
            forced = ("response_format" if self.response_format is not None and self.response_format.type != "text"
                      else "tool_choice" if self.tools and (self.tool_choice == "required" or
                                                            isinstance(self.tool_choice, NamedToolChoice)) else None)
            if forced:
                raise _FieldError(forced, "cannot be combined with a prefill (continue_final_message: a last assistant "
                                  "turn the reply continues): its grammar holds the whole reply, which the prefill "
                                  "would begin", "invalid_parameter_combination")
        if self.max_tokens == 0:  # a reply of nothing (OpenAI: "Expected a value >= 1"); -1 is llama.cpp's no limit
            raise _FieldError("max_tokens", "must be at least 1 (or -1: until the context is full)")
        for name in ("tool_choice", "parallel_tool_calls"):  # OpenAI's 400 (in its words), "none" too: a client
            # that sends them has tools in mind, and dropping them in silence hid that its tools went missing
            if name in self.model_fields_set and not self.tools:
                raise _FieldError(name, f"'{name}' is only allowed when 'tools' are specified")
        first: dict[str, int] = {}
        for k, tool in enumerate(self.tools or []):  # a call names its function: two of a name are ambiguous
            j = first.setdefault(tool.function.name, k)
            if j != k:
                raise _FieldError(f"tools[{k}].function.name", f"{tool.function.name!r} is also tools[{j}]'s name; "
                                  "function names must be unique (a call names the function it calls)")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise _FieldError("tool_choice", f"names {self.tool_choice.function.name!r}, which is not in tools")
        return self

    @property
    def limit(self) -> int | None:
        """max_completion_tokens, else max_tokens; None when unset (the server's default, else until
        the context is full); -1: until the context is full."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_count(self) -> int | None:
        """generate(logprobs=...): None, or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def prompt_chars(self) -> int:
        """Characters of what the template may render: message text, all messages together (text
        parts of a list content too), every other string or number of a message but its role (name,
        tool calls, reasoning, ...), and the tools when they are used."""
        n = 0
        for m in self.messages:
            if isinstance(m.content, str):
                n += len(m.content)
            elif isinstance(m.content, list):
                n += sum(len(p["text"]) for p in m.content if isinstance(p.get("text"), str))
            calls = [c.model_dump() for c in m.tool_calls or ()]
            n += _text_chars([calls, m.name, m.tool_call_id]) + _text_chars(m.model_extra)
        if self.tools and self.tool_choice != "none":
            n += sum(_text_chars(t.model_dump(exclude_unset=True)) for t in self.tools)
        return n + _text_chars(self.chat_template_kwargs)


def _text_chars(value) -> int:
    """Characters of the strings (keys too) and numbers in parsed JSON."""
    n, todo = 0, [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, dict):
            todo += v.keys()
            todo += v.values()
        elif isinstance(v, list):
            todo += v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            n += len(str(v))
    return n


Prompt = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _completion_fields_only(cls, data: Any) -> Any:
        _refuse_fields(data, ("messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                              "parallel_tool_calls", "functions", "function_call", "modalities", "audio",
                              "reasoning_effort", "prediction", "web_search_options", "verbosity", "moderation",
                              "chat_template_kwargs", "reasoning_format", "add_generation_prompt",
                              "continue_final_message"),
                       "/v1/completions",
                       {"messages": "prompt (or POST /v1/chat/completions)", "max_completion_tokens": "max_tokens",
                        "top_logprobs": "logprobs: N"})
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        def ids(v):
            return isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        ok = (isinstance(value, str) or (isinstance(value, list) and value and (
            all(isinstance(p, str) for p in value) or ids(value) or all(ids(p) for p in value))))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids, or a list of lists of "
                             "token ids (none of them empty)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.suffix:
            raise _FieldError("suffix", "insertion (suffix) is not supported")
        if self.max_tokens == 0 and not self.echo:  # with echo: the prompt scored, as OpenAI's legacy API did
            raise _FieldError("max_tokens", "must be at least 1 (0 only with echo, to score the prompt; -1: until "
                                            "the context is full)")
        if self.best_of is not None and self.best_of != self.n:
            raise _FieldError("best_of", "best_of other than n is not supported")
        if len(self.prompts) > MAX_PROMPTS:
            raise _FieldError("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(self.prompts)}")
        if len(self.prompts) * self.n > MAX_PROMPTS:  # each choice is a stream made before any runs
            raise _FieldError("n", f"{len(self.prompts)} prompts x n={self.n} make {len(self.prompts) * self.n} "
                                   f"choices; at most {MAX_PROMPTS} in one request")
        return self

    @property
    def limit(self) -> int | None:
        """max_tokens; None when unset (the server's default, else OpenAI's 16); -1: until the context is full."""
        return self.max_tokens

    @property
    def prompt_chars(self) -> int:
        """Characters of prompt text, all prompts together (a token id counts as one)."""
        return sum(len(p) for p in self.prompts)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(_Body):
    """POST /tokenize: llama.cpp's names ("prompt" and "add_special_tokens" too)."""
    content: StrictStr = Field(validation_alias=AliasChoices("content", "prompt"))
    add_special: StrictBool = Field(True, validation_alias=AliasChoices("add_special", "add_special_tokens"))
    # false: special-token strings written in content ("<|im_end|>") are plain text, as llama.cpp's parse_special
    parse_special: StrictBool = True
    # true: each token as {"id", "piece"}, the piece a string, or its bytes when they are not whole UTF-8 (llama.cpp)
    with_pieces: StrictBool = False

    @property
    def prompt_chars(self) -> int:
        return len(self.content)


class EmbeddingRequest(_Body):
    """POST /v1/embeddings: OpenAI's fields. input: a text, a list of texts, token ids or lists of them."""
    input: Union[StrictStr, list[StrictStr], list[Annotated[StrictInt, Field(ge=0)]],
                 list[list[Annotated[StrictInt, Field(ge=0)]]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None

    @property
    def inputs(self) -> list:
        """The inputs as a list: texts or token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)

    @property
    def prompt_chars(self) -> int:
        return sum(len(t) if isinstance(t, str) else len(t) for t in self.inputs)


class DetokenizeRequest(_Body):
    """POST /detokenize: special tokens skipped unless skip_special is false."""
    tokens: list[Annotated[StrictInt, Field(ge=0)]]
    skip_special: StrictBool = True


def parse_request(body: Any, chat: bool) -> ChatCompletionRequest | CompletionRequest:
    """The validated completion request; RequestError naming the first bad field otherwise."""
    return validate(ChatCompletionRequest if chat else CompletionRequest, body)


def validate(model: type[_Body], body: Any) -> Any:
    """body (parsed JSON) validated as model, one of the request classes above; RequestError
    naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _request_error(e) from None


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|literal.*|constrained-.*|json-or-python.*)"
                        r"(\[.*)?$", re.IGNORECASE)


def _param(loc: tuple) -> str | None:
    """The request field an error's location names (OpenAI's `param`: "messages[0].content")."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(globals().get(item), type) and issubclass(globals()[item], BaseModel):
            continue  # the union branch that is one of these models (tool_choice's NamedToolChoice): its fields follow
        elif _TYPE_TAGS.match(item) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            break  # pydantic names the union branch it tried; the field is what came before
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


SOURCE_KEY = "pyllm_source"  # in a message a dialect made: the field of its request it came from (ignored here)


def renamed_field(param: str | None, message: str, names: tuple, chat: dict | None = None) -> tuple[str | None, str]:
    """(param, message) of an error naming a chat request field, for another API read into a chat
    request (pyllm/responses_api.py, pyllm/anthropic_api.py): the field it came from. names:
    (pattern, its field, whether paths below map one to one) rows, the first matching a prefix of
    param wins (the pattern's groups may be used in its field: "tools[\\1]"); where paths below do not
    map one to one (messages made from input items), the error names the field as a whole and its
    message keeps the chat path ("input: messages[2].content: ..."), unless chat (the chat request
    the dialect made) names the message's source (SOURCE_KEY): then the error names that field.
    Each row's pattern matches a prefix of param."""
    if not param:
        return param, message
    found = re.match(r"messages\[(\d+)\]", param)
    messages = (chat or {}).get("messages")
    if found and isinstance(messages, list) and int(found.group(1)) < len(messages) \
            and isinstance(messages[int(found.group(1))], dict) and messages[int(found.group(1))].get(SOURCE_KEY):
        source, rest = messages[int(found.group(1))][SOURCE_KEY], param[found.end():]
        renamed = source + rest if rest.startswith(".content") and "content" not in source else source
        detail = message[len(param):].lstrip(": ") if message.startswith(param) else message
        return renamed, f"{renamed}: {detail}"
    for pattern, name, same_paths in names:
        found = re.match(f"(?:{pattern})(?=$|[.\\[])", param)
        if found is None:
            continue
        if not same_paths:
            if found.end() == len(param) and message.startswith(param):  # the field itself: its name, once
                return found.expand(name), found.expand(name) + message[len(param):]
            return found.expand(name), f"{found.expand(name)}: {message}"
        renamed = found.expand(name) + param[found.end():]
        return renamed, renamed + message[len(param):] if message.startswith(param) else message
    return param, message


def _request_error(error: ValidationError) -> RequestError:
    errors = error.errors(include_url=False)
    first = errors[0]
    param = _param(first["loc"])

    def other_type(e) -> bool:  # a union's branch of another JSON type than the value's (a dict is no literal);
        # a wrong type deeper in a branch is the value's own fault
        kind = e["type"]
        return (_param(e["loc"]) == param
                and (kind.endswith("_type") or (kind == "literal_error" and not isinstance(e.get("input"), str))))
    if other_type(first):  # a branch of the right type says what is wrong with the value itself
        first = next((e for e in errors[1:] if not other_type(e) and e["type"] != "none_required"
                      and (_param(e["loc"]) or "").startswith(param or "")), first)
        param = _param(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):  # its param is the field's own ("response_format.regex") or its model's
        # ("content[0].type" in messages[k])
        param = cause.param if not param else f"{param}.{cause.param.removeprefix(param.rsplit('.', 1)[-1] + '.')}"
    message = re.sub(r" or instance of \w+", "", first["msg"].removeprefix("Value error, "))  # (no class names)
    if first["type"] == "missing":
        message = "is required"
    elif first["type"] in _BOUNDS:  # pydantic prints a float bound in full: 1e-250 was 250 digits
        key, words = _BOUNDS[first["type"]]
        message = f"Input should be {words} {first['ctx'][key]:.6g}"
    code = cause.code if isinstance(cause, _FieldError) else _error_code(first)
    return RequestError(f"{param}: {message}" if param else message, param=param, code=code)


# pydantic's comparison errors: the ctx key holding the bound, and the words before it
_BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "greater than or equal to"),
           "less_than": ("lt", "less than"), "less_than_equal": ("le", "less than or equal to")}


def _error_code(error: dict) -> str:
    """OpenAI's error code for a pydantic error ("invalid_type", "integer_above_max_value", ...)."""
    kind, value = error["type"], error.get("input")
    # the field's kind, by its bound's type (float fields have float bounds): 0 for a float is a decimal
    bound = (error.get("ctx") or {}).get(_BOUNDS[kind][0]) if kind in _BOUNDS else None
    number = ("decimal" if isinstance(bound, float) else "integer") if bound is not None else (
        "integer" if isinstance(value, int) else "decimal")
    sized = "string" if isinstance(value, str) else "object" if isinstance(value, dict) else "array"
    if kind == "missing":
        return "missing_required_parameter"
    if kind in ("greater_than", "greater_than_equal"):
        return f"{number}_below_min_value"
    if kind in ("less_than", "less_than_equal"):
        return f"{number}_above_max_value"
    if kind in ("too_long", "string_too_long"):
        return f"{sized}_above_max_length"
    if kind in ("too_short", "string_too_short"):
        return "empty_array" if value == [] else f"{sized}_below_min_length"
    if kind.endswith("_type") or kind in ("model_attributes_type", "int_from_float", "finite_number"):
        return "invalid_type"
    return "invalid_value"
