"""The request bodies `pyllm serve` accepts, declared once with pydantic (as vLLM does).

OpenAI's names, defaults and ranges (the API reference of /v1/chat/completions and
/v1/completions; llama.cpp's /tokenize and /detokenize); llama.cpp's names accepted as aliases where they differ (repeat_penalty,
n_predict, ...); unknown fields ignored, as OpenAI does; an explicit null means the field's default;
seed -1 means unseeded (llama.cpp); NaN and infinite numbers are refused; values are not converted
from another JSON type (strict mode: "5" is not an integer, true not a number, 2.0 not an integer,
1 not a boolean; an integer is a number), as OpenAI refuses them. Anything else is refused with
RequestError, which names the field in `param` as OpenAI's error object does.

Extensions beyond OpenAI: top_k, min_p, typical_p, repetition_penalty, stop_token_ids, and response_format
types "regex" and "grammar" (a Lark grammar, llguidance's dialect).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from .errors import RequestError
from .sampling import MIN_REPETITION_PENALTY

MAX_STOP = 16  # stop strings per request
MAX_CHOICES = 128  # n (OpenAI's limit)
MAX_PROMPTS = 2048  # prompts in one completion request (OpenAI's limit for a list of inputs), and their choices
# messages in one chat request, content parts in one message, tools: each becomes Python objects of about
# 1 KB while validated and rendered (a 7 MiB body of 480,000 empty messages took 700 MB)
MAX_MESSAGES = 16384
MAX_CONTENT_PARTS = 256
MAX_TOOLS = 128  # OpenAI's limit
# log-probabilities (each chosen token's and its alternatives) one non-streamed answer may hold: about
# 600 bytes each while the answer is built, 55 bytes each in its JSON (n=128 x 4096 tokens x 21 would
# be 7 GB from a 200-byte request)
MAX_LOGPROB_ENTRIES = 2**19


class _FieldError(ValueError):
    """Raised by a check across fields, to name the field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    """Unknown fields are ignored; an explicit null is the field's default."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"] = "text"
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


class FunctionDefinition(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
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


class Message(BaseModel):
    """One chat message; keys beyond these (name, tool_call_id, ...) pass through to the template."""
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # an empty list is refused, as OpenAI does ("empty array", param messages[k].content / .tool_calls)
    content: Union[StrictStr, Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_CONTENT_PARTS)],
                   None] = None
    tool_calls: Annotated[list[dict[str, Any]], Field(min_length=1)] | None = None
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
        for j, part in enumerate(self.content if isinstance(self.content, list) else ()):
            # as the chat template refuses them (pyllm.chat_template), naming the part as OpenAI does
            if part.get("type") != "text":
                raise _FieldError(f"content[{j}].type", f"only text content parts are supported (got "
                                                        f"{part.get('type')!r:.40})")
            if not isinstance(part.get("text"), str):
                raise _FieldError(f"content[{j}].text", f"a text content part needs a 'text' string (got "
                                                        f"{part.get('text')!r:.40})")
        return self


def _logit_bias_key(key: str) -> int:
    if not re.fullmatch(r"\d{1,9}", str(key)):
        raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
    return int(key)


class _Sampling(_Body):
    """The fields both endpoints share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=-1, validation_alias=AliasChoices("max_tokens", "n_predict"))
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 / 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)  # llama.cpp's name; 1: off
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, validation_alias=AliasChoices(
        "repetition_penalty", "repeat_penalty"))
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
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

    @model_validator(mode="after")
    def _consistent(self):
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, old) is not None:
                raise _FieldError(old, f"is OpenAI's deprecated form of {new}, which pyllm does not take: give "
                                       f"{new} (tools: [{{'type': 'function', 'function': {{...}}}}])")
        if "top_logprobs" in self.model_fields_set and not self.logprobs:  # 0 too, as OpenAI refuses it
            raise _FieldError("top_logprobs", "needs logprobs: true")
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
            n += _text_chars([m.tool_calls, m.name, m.tool_call_id]) + _text_chars(m.model_extra)
        if self.tools and self.tool_choice != "none":
            n += sum(_text_chars(t.model_dump(exclude_unset=True)) for t in self.tools)
        return n


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
    """POST /tokenize: llama.cpp's names ("prompt" and "add_special_tokens" too; its with_pieces is not taken)."""
    content: StrictStr = Field(validation_alias=AliasChoices("content", "prompt"))
    add_special: StrictBool = Field(True, validation_alias=AliasChoices("add_special", "add_special_tokens"))
    # false: special-token strings written in content ("<|im_end|>") are plain text, as llama.cpp's parse_special
    parse_special: StrictBool = True

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
        elif _TYPE_TAGS.match(item) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            break  # pydantic names the union branch it tried; the field is what came before
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _request_error(error: ValidationError) -> RequestError:
    errors = error.errors(include_url=False)
    first = errors[0]
    param = _param(first["loc"])
    if first["type"].endswith("_type"):  # a union's first branch of another type: a branch of the right type
        first = next((e for e in errors[1:] if not e["type"].endswith("_type") and e["type"] != "none_required"
                      and _param(e["loc"]) == param), first)  # says what is wrong with the value itself
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):  # its param is the field's own ("response_format.regex") or its model's
        # ("content[0].type" in messages[k])
        param = cause.param if not param else f"{param}.{cause.param.removeprefix(param.rsplit('.', 1)[-1] + '.')}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required"
    return RequestError(f"{param}: {message}" if param else message, param=param)
