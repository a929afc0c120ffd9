"""`pyllm serve`: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
"stream": true; usage with its details; system_fingerprint; finish_reason "stop"/"length"/
"tool_calls"), POST /v1/responses (OpenAI's Responses API) and POST /v1/messages,
/v1/messages/count_tokens (Anthropic's Messages API), each run as a chat completion (DIALECTS:
pyllm/responses_api.py, pyllm/anthropic_api.py), GET /v1/models, GET
/v1/models/{id}, POST /tokenize, POST /detokenize, GET /health (each also with a trailing
slash, or "//"). Request fields are declared in
pyllm/api_schema.py (validation lives there); responses are built in pyllm/api_responses.py; tool
calls are parsed by pyllm/tool_calls.py. Completions is the completions logic without HTTP, which
LLM.create_completion and LLM.create_chat_completion call too. Options: an API key (Bearer, compared in constant time),
CORS origins, sampling defaults for fields a request leaves unset, and `Limits` (pyllm.limits.
ServerLimits) on what one request may ask: body size, prompt length, time to send the body, time a
client may leave a stream unread (docs/SECURITY.md).

Policy: with an LLM of n_parallel > 1 (`pyllm serve --parallel N`), a pyllm.scheduler.Scheduler
runs up to N requests (choices) together in one decode loop (continuous batching: a request joins at
the next engine step, long prompts are prefilled in chunks between decode rows, a shared prompt
prefix is computed once and reported as usage.prompt_tokens_details.cached_tokens); with N = 1 the
model runs one request at a time; the choices of one request (n, several prompts) run together as
well. Others wait their turn in arrival order (up to max_queue running or waiting, counted exactly,
and as many bodies being received or parsed, then 503). Everything slow (reading and parsing the
body, validating it, rendering the template, tokenizing, generating, building a large answer) runs
in worker threads, so the event loop, and /health with it, stays free; a client that disconnects,
mid-stream or while waiting, cancels its generation, which frees the model within one token (an
embeddings request: at its next input); a
client that stops reading pauses its generation (PIECES_AHEAD) and, past the send timeout, loses
its place. Every refusal is a 4xx answer with OpenAI's error object; anything else is a 500 and a
log line. Unset sampling options take the model's generation defaults (greedy when it has none), as
transformers would; the OpenAI "model" field is accepted whatever it names, and answers echo it. A
max_tokens the request gives must fit in the context after its prompt (400 context_length_exceeded,
as OpenAI); one left unset runs until the context is full (chat) or for 16 tokens (completions).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import math
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from . import api_responses as responses
from .chat_template import TemplateError, check_template_variables
from .errors import LimitError, PyllmError, RequestError
from .limits import ServerLimits as Limits
from .structured import GrammarError, GrammarInvalid, GrammarUnavailable
from .tokenizer import check_text
from .tool_calls import ToolError

try:  # (pydantic: LLM.create_completion needs it without starlette)
    from . import anthropic_api, responses_api
    from .api_schema import (MAX_LOGPROB_ENTRIES, MAX_PROMPTS, DetokenizeRequest, EmbeddingRequest, TokenizeRequest,
                             parse_request, validate)
except ImportError:  # pragma: no cover - depends on the installed extras
    parse_request = None
try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the installed extras
    Starlette = None
if parse_request is None:  # the server needs both (MISSING)
    Starlette = None

PIECES_AHEAD = 64  # text pieces a generation may run ahead of its client
# threads that start requests which compile a grammar (response_format, tools): llguidance takes seconds on
# a large schema, and in the worker threads every request shares (parsing, rendering, answers) eight such
# requests held up all others (a plain one waited 71 s)
GRAMMAR_WORKERS = 4
MISSING = "pyllm serve needs the server extra: pip install 'pyllm[serve]' (starlette, uvicorn, pydantic)"
log = logging.getLogger("pyllm.serve")


def _error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(message: str, status: int = 400, param: str | None = None) -> "JSONResponse":
    return JSONResponse(_error_body(message, status, param), status_code=status)


def error_info(e: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) for an exception raised while handling a request: the
    request's own fault is 4xx (RequestError with its status and field; any other PyllmError or
    ValueError: bad options, a prompt past the context, a template that refused or ran too long, a
    tool or grammar that cannot be used or followed), anything else 500 and logged."""
    if isinstance(e, RequestError):
        return e.status, _error_body(str(e), e.status, e.param, e.code)
    if isinstance(e, (GrammarUnavailable, GrammarError, GrammarInvalid)):
        return 400, _error_body(str(e), 400, "response_format")
    if isinstance(e, ToolError):
        return 400, _error_body(str(e), 400, e.param)
    if isinstance(e, ValueError):  # PyllmError (TemplateError, LimitError, ...) and LLM's argument checks
        return 400, _error_body(str(e))
    log.error("request failed", exc_info=e)
    return 500, _error_body(f"internal error: {type(e).__name__}: {e}", 500)


def error_response(e: BaseException, dialect: "Dialect | None" = None) -> "JSONResponse":
    """error_info(e) as a response (in the dialect's shape, for one)."""
    status, body = error_info(e)
    headers = {"Retry-After": "1"} if status == 503 else None  # (a busy server: clients' retry waits read it)
    return JSONResponse(dialect.error_body(status, body) if dialect else body, status_code=status, headers=headers)


def _renamed(e: BaseException, dialect: "Dialect", chat: dict | None = None) -> BaseException:
    """A refusal of the chat request's checks (one error_info answers 4xx) as a RequestError naming the
    dialect's field where it named a chat field (chat: the chat request the dialect made, which says
    where each message came from); anything else as it is."""
    if not isinstance(e, (RequestError, ToolError, GrammarUnavailable, GrammarError, GrammarInvalid)):
        return e
    status, body = error_info(e)
    param, message = dialect.rename(body["error"]["param"], body["error"]["message"], chat)
    if param and not message.startswith(param):  # (say a grammar's fault: its message names no field)
        message = f"{param}: {message}"
    return RequestError(message, status, param, body["error"]["code"])


@dataclass(frozen=True)
class Dialect:
    """Another API served on the chat completions path: its request read as a chat request, the chat
    answer or chunks written back in its shapes. One module each, with these functions."""
    chat_body: Callable[[dict], dict]  # its request body -> a chat completions body (RequestError if refused)
    rename: Callable  # an error's (param, message, the chat request it made) naming chat fields -> its fields
    answer: Callable[[dict, dict, list], dict]  # (its body, the chat answer, the streams) -> its answer
    events: Callable  # (its body, model, plan, streams) -> an object with start(), feed(chunk), error(error)
    error_body: Callable[[int, dict], dict]  # (status, OpenAI error object) -> its error object


DIALECTS = {
    # OpenAI's Responses API (POST /v1/responses)
    "responses": Dialect(responses_api.chat_body, responses_api.rename, responses_api.response_object,
                         responses_api.ResponseEvents, responses_api.error_body),
    # Anthropic's Messages API (POST /v1/messages)
    "messages": Dialect(anthropic_api.chat_body, anthropic_api.rename, anthropic_api.message_object,
                        anthropic_api.MessageEvents, anthropic_api.error_body),
} if parse_request is not None else {}  # (without pydantic: no server, MISSING)
DIALECT_PATHS = (("/v1/messages", "messages"), ("/v1/responses", "responses"))  # refusals outside the handlers


def _path_error(path: str, status: int, body: dict) -> dict:
    """An OpenAI error object answered on `path` outside the handlers (401, 404, 405): in the shape of
    the dialect whose path it is (Anthropic's clients read {"type": "error", ...})."""
    for prefix, name in DIALECT_PATHS:
        if (path == prefix or path.startswith(prefix + "/")) and name in DIALECTS:
            return DIALECTS[name].error_body(status, body)
    return body


# -- limits: what one request may ask of the server ----------------------------------------------

class _BadNumber:
    """A number parse_body's parser refuses (what: "the number 1e999, which is too large"): refused once
    its place in the body is known."""

    def __init__(self, what: str):
        self.what = what


def _refuse_constant(name: str) -> _BadNumber:
    return _BadNumber(f"{name}, which is not a JSON number")


def _finite(text: str) -> "float | _BadNumber":
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(f"the number {text[:32]}, which is too large")


def _integer(text: str) -> "int | _BadNumber":
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits():  # past what int() converts (ValueError)
        return _BadNumber(f"an integer of {digits} digits, which is too large")
    return int(text)


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (bytes, UTF-8/16/32 as JSON allows). RequestError (400)
    for anything else: invalid JSON or text, nesting too deep, NaN or Infinity (JSON has neither),
    a number too large for a float or an integer of more digits than Python converts (each of these
    naming the field it is in, as `param`), a string holding a lone surrogate ("\\ud800": JSON's
    escapes allow it, Unicode text does not), a body that is not an object. Valid JSON past a limit
    is refused saying which, not as invalid JSON."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_integer)
    except RecursionError:
        raise RequestError("the request body is nested too deeply (arrays and objects inside one another)") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the request body is not valid JSON") from None
    if isinstance(body, _BadNumber):
        raise RequestError(f"the request body is {body.what}")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body) -> None:
    """Every string (keys too) in parsed JSON is Unicode text, and every number one the parser
    takes (RequestError otherwise, naming the field of a bad number)."""
    todo = [body]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo += value.keys()
            todo += value.values()
        elif isinstance(value, list):
            todo += value
        elif isinstance(value, str) and not value.isascii():
            try:
                check_text(value, "a string in the request body")
            except PyllmError as e:
                raise RequestError(str(e)) from None
        elif isinstance(value, _BadNumber):
            param = _field_of(body, value)
            raise RequestError(f"{param + ': ' if param else ''}the request body contains {value.what}", param=param)


def _field_of(body, target) -> str | None:
    """The field holding target in parsed JSON, as OpenAI's `param` names it ("messages[0].content";
    a key that is not a name ends it: logit_bias's "5" is logit_bias)."""
    todo = [(body, "", True)]
    while todo:
        value, path, named = todo.pop()
        if value is target:
            return path or None
        if isinstance(value, dict):
            for key, item in value.items():
                ok = named and key.isidentifier()
                todo.append((item, (f"{path}.{key}" if path else key) if ok else path, ok))
        elif isinstance(value, list):
            todo += [(item, f"{path}[{i}]" if named else path, named) for i, item in enumerate(value)]
    return None


async def read_body(request: "Request", limits: Limits) -> bytes:
    """The request body's bytes, within limits.max_body_bytes (413; a Content-Length past it is
    refused before reading) and limits.body_timeout (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("invalid Content-Length header")
        if int(declared) > limits.max_body_bytes:
            raise RequestError(f"the request body of {declared} bytes exceeds the limit of {limits.max_body_bytes} "
                               "(pyllm serve --max-body-bytes)", 413)
    chunks, size = [], 0

    async def receive():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(f"the request body exceeds the limit of {limits.max_body_bytes} bytes "
                                   "(pyllm serve --max-body-bytes)", 413)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {limits.body_timeout:g} s "
                           "(pyllm serve --body-timeout)", 408) from None
    except ClientDisconnect:
        raise RequestError("the client went away while sending the request", 499) from None
    return b"".join(chunks)


def check_prompt_length(req, limits: Limits, param: str) -> None:
    """Refuses a request (api_schema) with more prompt text (req.prompt_chars) than
    limits.max_prompt_chars, before anything renders or tokenizes it (RequestError naming param)."""
    n = req.prompt_chars
    if n > limits.max_prompt_chars:
        raise RequestError(f"the prompt has {n} characters; the limit is {limits.max_prompt_chars} "
                           "(pyllm serve --max-prompt-chars)", param=param)


class QueueSlots:
    """Requests running or waiting, counted exactly: take() and release() run on the event loop
    with no await between the test and the count, so simultaneous arrivals cannot pass the limit."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def take(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class SendTimeout(Exception):
    """The client left a response unread for longer than Limits.send_timeout."""


class EventStreamResponse:
    """An ASGI server-sent-event response whose every send must finish within `send_timeout`: a
    client that stops reading fills the socket buffers, its send stalls, and the response ends
    (uvicorn then closes the connection). on_close() runs once, however the response ends, even
    when it never starts.

    The limit is kept by one watchdog timer per response, armed by a send when none is, re-armed
    from the start of the send in progress and let go when none is (a response waiting for its next
    event wakes nothing), rather than by asyncio.wait_for around each send: wait_for makes a task
    per send, 15 us of the event loop's CPU a token (Python 3.11), against ~0.1 us for two time stamps."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], send_timeout: float):
        self.events, self.on_close, self.send_timeout = events, on_close, send_timeout
        self._sending_since: float | None = None  # loop time the send in progress started at
        self._timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None

    def _watch(self) -> None:
        """Cancels the task when its send has been in progress for send_timeout; else re-arms for
        the send in progress, or lets go (the next send arms it)."""
        since = self._sending_since
        if since is None:
            self._watchdog = None
        elif self._loop.time() - since >= self.send_timeout:
            self._timed_out = True
            self._task.cancel()
        else:
            self._watchdog = self._loop.call_at(since + self.send_timeout, self._watch)

    async def _send(self, send, message) -> None:
        self._sending_since = since = self._loop.time()
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(since + self.send_timeout, self._watch)
        try:
            await send(message)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            # Python 3.11+: the watchdog's cancel request is answered here; one made besides it (the
            # server shutting down in the same loop turn) stays a cancel, as asyncio.timeout does.
            # Python 3.9/3.10 cannot tell the two apart (nor could asyncio.wait_for there).
            if hasattr(self._task, "uncancel") and self._task.uncancel() > self._cancelling:
                raise
            raise SendTimeout from None
        finally:
            self._sending_since = None

    async def __call__(self, scope, receive, send) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        self._cancelling = self._task.cancelling() if hasattr(self._task, "cancelling") else 0
        try:
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
            async for event in self.events:
                await self._send(send, {"type": "http.response.body", "body": event.encode(), "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except SendTimeout:
            log.warning("a client left its stream unread for %g s: dropped", self.send_timeout)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            try:
                await self.events.aclose()  # a generation still running is cancelled
            finally:
                self.on_close()


# -- running a generation off the event loop -----------------------------------------------------

async def _watch_disconnect(request: "Request", work) -> None:
    """Cancels work (a generation; anything with cancel()) when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            work.cancel()
            return


class _Cancel:
    """Work in a worker thread that a client leaving ends between its items (an embeddings request's
    inputs): cancel() sets it, check() raises RequestError 499 once set."""

    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise RequestError("the request was cancelled", 499)


def token_piece(piece: bytes) -> str | list[int]:
    """A token's bytes as /tokenize's with_pieces gives them: the text when they are whole UTF-8
    characters, else the byte values (llama.cpp's server)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


def reply_text(tokenizer, ids: list[int], text: str, stopped: bool, keep=frozenset()) -> str:
    """The reply as the tool-call parser reads it: the reply's tokens decoded with the format's tags
    that are special tokens (keep: tool_calls.special_tag_ids; Mistral's [TOOL_CALLS]) and no other
    special token (none is text the client is sent: another one in the content came back as its
    text, '<|im_start|>', and a stream, whose pieces leave it out, lost the text after the calls),
    but only as far as `text`, the text the reply returns. stopped: a stop string ended the reply
    (GenerationStats.stop_string); its last token may then hold text past the reply's end, which is
    no part of it (a call completed there is no call the client was given): the decoding with those
    tags of the longest run of leading tokens whose text the reply holds, then the rest of text.

    A run that ends inside a character of several bytes decodes to U+FFFD where the character is
    cut; that is left out of both decodings (the rest of text holds the character): taken for text
    the reply does not hold, the search stopped short of every later token, a marker among them."""
    ids = [i for i in ids if i in keep or i not in tokenizer.special_ids]
    if not stopped:
        return tokenizer.decode(ids, skip_special_tokens=False)
    low, high = 0, len(ids) + 1  # text starts with that of ids[:low], not with that of ids[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if text.startswith(tokenizer.decode(ids[:mid]).rstrip("\ufffd")):
            low = mid
        else:
            high = mid
    head, special = tokenizer.decode(ids[:low]), tokenizer.decode(ids[:low], skip_special_tokens=False)
    # a cut character ends both decodings (a U+FFFD before a special token that ends them is the reply's)
    cut = min(len(head) - len(head.rstrip("\ufffd")), len(special) - len(special.rstrip("\ufffd")))
    return special[:len(special) - cut] + text[len(head) - cut:]


def tool_finish_reason(finish: str, calls: list, dropped: bool) -> str:
    """A chat reply's finish_reason: with tool calls "tool_calls", but "length" when the token
    limit cut the reply (OpenAI's: the model did not finish; the calls returned are the complete
    ones, an incomplete last one left out) and "stop" when a stop string cut a call short (dropped)."""
    if not calls or finish == "length":
        return finish
    return "stop" if dropped else "tool_calls"


class _ClientGone(Exception):
    """A choice's generation ended cancelled (its client went away): the answer ends with it."""


async def _together(choices: list, most: int) -> AsyncIterator:
    """The items of async generators (a request's choices), as each yields them, with at most `most`
    of them running at once (started in order; most=1: each to its end, in order). The first error,
    _ClientGone too, ends them all (the others are cancelled) and is raised; leaving early ends them too."""
    items: asyncio.Queue = asyncio.Queue(1)  # a generator waits for its item to be taken: the client's pace

    async def run(choice):
        try:
            async for item in choice:
                await items.put(("item", item))
        except Exception as e:
            await items.put(("error", e))
        else:
            await items.put(("end", asyncio.current_task()))
        finally:
            await choice.aclose()  # cancelled while its item waited: its generation ends now

    waiting, running = list(choices), set()
    try:
        while waiting or running:
            while waiting and len(running) < most:
                running.add(asyncio.ensure_future(run(waiting.pop(0))))
            kind, value = await items.get()
            if kind == "error":
                raise value
            if kind == "end":
                running.discard(value)
                continue
            yield value
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _named_sse(event: dict) -> str:
    """A dialect's stream event, named by its type as OpenAI's Responses and Anthropic's streams name theirs."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


_DONE = object()  # the end of a streamed answer's chunks (Server._chunks)


class _Tokens:
    """A TextStream whose iteration yields (piece, the tokens generated since the last piece)."""

    def __init__(self, stream):
        self.stream = stream
        self.stats = stream.stats

    def __iter__(self):
        for piece in self.stream:
            yield piece, self.stream.take_tokens()

    @property
    def cancelled(self):
        return self.stream.cancelled

    def cancel(self):
        self.stream.cancel()

    def close(self):
        self.stream.close()


def _compiles_grammar(req, chat: bool) -> bool:
    """Whether starting req compiles grammars: a response_format other than text, or tools (each
    tool's parameters are checked by compiling them, in every tool_choice mode but "none")."""
    if req.response_format is not None and req.response_format.type != "text":
        return True
    return chat and bool(req.tools) and req.tool_choice != "none"


@dataclass
class _ReplyParts:
    """A chat reply read (Completions._reply_parts): its think block's text (None: none, or not read),
    the content after it as text, the same as the tool-call parser reads it (with the format's
    special tags), and whether the reply was cut (a stop string, the token limit)."""
    reasoning: str | None
    content: str
    tool_text: str
    cut: bool


@dataclass
class _Plan:
    """What one request runs: each prompt (token ids) n times, with these generate() options.
    Choice k answers prompt k // n."""
    chat: bool
    prompts: list[list[int]]
    echo: list[str | None]  # per prompt: the text echoed before the completion (None without echo; it may
    # be "" with echo, a prompt whose tokens have no text, and its tokens' log-probabilities still come)
    n: int
    options: dict
    logprobs: int | None
    tools: object = None  # a tool_calls.ToolFormat when the reply may hold tool calls
    # (reasoning.ThinkTags, whether the prompt opened the block) when a think block is reasoning_content
    reasoning: tuple | None = None
    reasoning_tokens: dict = field(default_factory=dict)  # per choice that thought: its think block's tokens
    echo_logprobs: dict = field(default_factory=dict)  # per prompt, computed once for its n choices
    echo_lock: threading.Lock = field(default_factory=threading.Lock)  # (choices run together)

    @property
    def forced_calls(self) -> bool:
        """Whether the reply is tool calls only (tool_choice "required" or a named function: a grammar)."""
        return self.tools is not None and "grammar" in self.options

    def streams(self, llm) -> list:
        """One TextStream per choice (created now, so that bad options fail before any output)."""
        out = []
        for ids in self.prompts:
            for i in range(self.n):
                options = dict(self.options)
                # n choices differ, reproducibly; -1 (llama.cpp's "random", the request's or a server default)
                # stays unseeded, and a seed + i of -1 (seed -2, choice 1) is generate's 2**64 - 1, not unseeded
                if options.get("seed") not in (None, -1):
                    options["seed"] = (options["seed"] + i) % (1 << 64)
                out.append(llm.generate(ids, stream=True, logprobs=self.logprobs, **options))
        return out


class _ChoiceChunks:
    """The choice objects of one streamed choice's chunks (chat deltas, or completion text), made
    as its text pieces come: opening() before the first, piece() for each, closing() once its
    stream has ended. Text that may be a tool call is held back until it is known not to be one;
    calls come in a chunk of their own at the end."""

    def __init__(self, completions: "Completions", plan: _Plan, index: int, stream):
        from .reasoning import ReasoningStream
        from .tool_calls import ToolCallStream, special_marker_id, special_token_id

        self.completions, self.plan, self.index, self.stream = completions, plan, index, stream
        self.tokenizer = completions.llm.tokenizer
        self.tools = (ToolCallStream(plan.tools, special_marker_id(plan.tools, self.tokenizer))
                      if plan.chat and plan.tools is not None else None)
        self.reasoning = None  # a think block's text goes out as reasoning_content deltas
        if plan.chat and plan.reasoning is not None:
            tags, opened = plan.reasoning
            ids = {tag: special_token_id(tag, self.tokenizer) for tag in (tags.open, tags.close)}
            self.reasoning = ReasoningStream(tags, opened, {t: i for t, i in ids.items() if i is not None},
                                             self.tokenizer.decode)
        self.echo = None if plan.chat else plan.echo[index // plan.n]  # a completion's echoed prompt
        self.all_tokens: list = []
        self.texts: list[str] = []  # the reply's pieces, as generated
        self.waiting: list = []  # tokens of text held back (a possible tool call, a think tag's start)
        self.offsets = responses.TextOffsets()  # where a completion's tokens start in its text

    def _logprobs(self, tokens):
        if self.plan.logprobs is None:
            return None
        if self.plan.chat:
            return responses.chat_logprobs(self.tokenizer, tokens)
        return responses.completion_logprobs(self.tokenizer, tokens, self.offsets)

    def opening(self, echo_logprobs: dict | None = None) -> list[dict]:
        """The chat role, or a completion's echoed prompt (echo_logprobs: Completions._echo_logprobs's)."""
        if self.plan.chat:
            return [responses.chat_delta(self.index, role=True)]
        if self.echo is None:
            return []
        self.offsets = responses.TextOffsets(len(self.echo))
        return [responses.completion_delta(self.index, self.echo, logprobs=echo_logprobs)]

    def piece(self, piece: str, tokens: list) -> list[dict]:
        self.all_tokens += tokens
        self.texts.append(piece)
        ids = [t.id for t in tokens]
        reasoning = ""
        if self.reasoning is not None:
            reasoning, piece = self.reasoning.feed(piece, ids)
        if self.tools is not None and (self.reasoning is None or self.reasoning.in_content):
            piece = self.tools.feed(piece, ids)  # (a call written while thinking is no call)
        if self.tools is not None or self.reasoning is not None:
            if not reasoning and not piece:
                self.waiting += tokens
                return []
            tokens, self.waiting = self.waiting + tokens, []
        if not self.plan.chat:
            return [responses.completion_delta(self.index, piece, logprobs=self._logprobs(tokens))]
        out = []
        if reasoning:
            out.append(responses.chat_delta(self.index, reasoning=reasoning, logprobs=self._logprobs(tokens)))
        if piece or not reasoning:
            out.append(responses.chat_delta(self.index, piece, logprobs=None if reasoning else self._logprobs(tokens)))
        return out

    def closing(self) -> list[dict]:
        """The rest: held-back content, the tool calls, and the finish reason."""
        stream = self.stream
        rest = stream.take_tokens()
        self.all_tokens += rest
        rest = self.waiting + rest
        finish = stream.stats.finish_reason
        out, content, calls = [], "", []
        if self.reasoning is not None:
            reasoning, content = self.reasoning.finish()
            if reasoning:
                out.append(responses.chat_delta(self.index, reasoning=reasoning))
            if self.reasoning.had_reasoning:
                self.completions._count_reasoning(self.plan, self.index, self.all_tokens)
        if self.tools is not None:
            sent = self.tools.feed(content) if content else ""
            parts = self.completions._reply_parts(self.plan, self.all_tokens, "".join(self.texts), stream.stats)
            rest, calls = self.tools.finish(parts.tool_text, cut=parts.cut)
            content = sent + rest
            if content and not calls and self.plan.forced_calls:
                content = ""  # a forced call cut short: its markup is no content
            finish = tool_finish_reason(finish, calls, self.tools.dropped)
        if content:
            out.append(responses.chat_delta(self.index, content))
        if calls:
            out.append(responses.chat_delta(self.index, tool_calls=calls))
        if self.plan.chat:
            out.append(responses.chat_delta(self.index, finish_reason=finish, logprobs=self._logprobs(rest)))
        else:
            out.append(responses.completion_delta(self.index, finish_reason=finish, logprobs=self._logprobs(rest)))
        return out


class Completions:
    """OpenAI's completions for one LLM, without HTTP: a validated request (api_schema) -> its plan
    and streams -> the answer's choices and usage, or its chunks, in OpenAI's shapes
    (api_responses). Server answers HTTP requests with it; LLM.create_completion and
    LLM.create_chat_completion call it directly, so that both answer a request alike.

    defaults: generate() options (temperature, top_p, top_k, min_p, repetition_penalty, seed,
    typical_p, max_new_tokens) for fields a request leaves unset; limits: Limits (pyllm serve's
    flags; their defaults when None), of which this uses the template's (render_limits); model_name:
    what answers name when the request names no model; reasoning_format: where a reply's think block
    goes when the request does not say (llama.cpp's --reasoning-format: "deepseek", the message's
    reasoning_content; "none", left in content: pyllm/reasoning.py)."""

    def __init__(self, llm, model_name: str, defaults: dict | None = None, limits: Limits | None = None,
                 reasoning_format: str = "deepseek"):
        from .reasoning import REASONING_FORMATS

        self.llm = llm
        self.defaults = dict(defaults or {})
        self._check_defaults()
        if reasoning_format not in REASONING_FORMATS:
            raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}; got {reasoning_format!r}")
        self.reasoning_format = reasoning_format
        self.model_name = model_name
        self.limits = limits or Limits()
        self.stopping = False  # end_requests was called

    DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "typical_p", "max_new_tokens")

    def _check_defaults(self) -> None:
        """Refuses, when the server starts, defaults every request would fail on (ValueError naming the
        option: each request was a 400 blaming its client, an unknown name a 500); max_new_tokens -1:
        until the context is full."""
        from .llm import option

        unknown = sorted(set(self.defaults) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"unknown server default(s) {', '.join(unknown)}; they may be: {', '.join(self.DEFAULTS)}")
        limit = self.defaults.get("max_new_tokens")
        if limit is not None and option("the default max_new_tokens", limit, integer=True) < -1:
            raise ValueError(f"the default max_new_tokens must be >= 0, or -1 (until the context is full); got {limit}")
        try:
            self.llm._sampling(*(self.defaults.get(k) for k in self.DEFAULTS[:-1]))
        except ValueError as e:
            raise ValueError(f"a server default: {e}") from None

    def _model_ids(self) -> list[str]:
        """The base model's id, then "BASE:ADAPTER" for each prompt-learning adapter in its file."""
        return [self.model_name] + [f"{self.model_name}:{name}" for name in self.llm.adapters]

    def _no_such_model(self, model: str) -> RequestError:
        """404 for a model this server lacks, with OpenAI's code (clients tell it from a missing route by it)."""
        return RequestError(f"the model {model!r} does not exist (this server has "
                            f"{', '.join(map(repr, self._model_ids()))})", 404, "model", code="model_not_found")

    def _adapter_for(self, model: str | None) -> str:
        """The adapter a request's "model" selects, or "base": "BASE:NAME" names one of the file's adapters
        (404 for a NAME this model lacks), and so does the adapter's own NAME, as vLLM serves a LoRA under
        its name (it ran the base model without a word); any other value (OpenAI clients send whatever
        they were configured with, colons too: "llama3.1:8b", "ft:gpt-4o-mini:org::id") is the base model,
        as is this server's own model name, whatever it holds. A request without "model" (LLM's
        create_completion called without model=) runs the LLM's own adapter (LLM(path, adapter=NAME)),
        as its generate() does."""
        if not model:
            return self.llm.adapter or "base"
        if model == self.model_name:
            return "base"
        if model in self.llm.adapters:
            return model
        if ":" not in model:
            return "base"
        base, _, name = model.rpartition(":")
        if name in self.llm.adapters:
            return name
        if name == "base" or base != self.model_name:
            return "base"
        raise self._no_such_model(model)

    def _refuse_when_stopping(self) -> None:
        if self.stopping:
            raise RequestError("the server is shutting down", 503)

    def start(self, req, chat: bool) -> tuple[_Plan, list]:
        """The plan of a validated request and its TextStreams, one per choice (not started: bad
        options, a prompt past the context, a template that refuses fail here, as ValueError).
        Renders and tokenizes: call it in a worker thread."""
        plan = self._plan(req, chat)
        if not req.stream:
            self._check_answer_size(plan)
        self._refuse_when_stopping()
        try:
            return plan, plan.streams(self.llm)
        except (GrammarError, GrammarInvalid) as e:
            if "grammar" in plan.options:  # a forced tool call's grammar, made of the tools' parameters
                raise RequestError(str(e), param="tools") from None
            raise

    def _check_answer_size(self, plan: _Plan) -> None:
        """Refuses a non-streamed answer that could hold more than MAX_LOGPROB_ENTRIES log-probabilities
        (choices x (echoed prompt + tokens it may generate) x (1 + alternatives)), before it runs."""
        if plan.logprobs is None:
            return
        room = [min(plan.options["max_new_tokens"], self.llm.context_length - len(p)) for p in plan.prompts]
        echoed = [len(p) if echo is not None else 0 for p, echo in zip(plan.prompts, plan.echo)]
        entries = plan.n * sum(max(r, 0) + e for r, e in zip(room, echoed)) * (plan.logprobs + 1)
        if entries > MAX_LOGPROB_ENTRIES:
            raise RequestError(f"this answer could hold {entries} log-probabilities (choices x tokens x (1 + "
                               f"alternatives)); the limit is {MAX_LOGPROB_ENTRIES}: lower max_tokens, n or the "
                               "number of alternatives, or stream the answer", param="max_tokens")

    # -- request -> plan ------------------------------------------------------------------------
    def _plan(self, req, chat: bool) -> _Plan:
        options = {**self._defaults_for(req), **req.generate_options()}
        limit = req.limit if req.limit is not None else self.defaults.get("max_new_tokens")
        if limit is None:
            limit = -1 if chat else 16  # OpenAI: chat until the end, completions 16
        options["max_new_tokens"] = self.llm.context_length if limit == -1 else limit
        options["adapter"] = self._adapter_for(req.model)
        self._check_token_options(options)
        if chat:
            plan = self._chat_plan(req, options)
        else:
            prompts = [self._request_ids(p, f"prompt {k}", "prompt") for k, p in enumerate(req.prompts)]
            # token ids echo as the text of every token, special ones included: the echoed logprobs list
            # them all, and their text_offset counts in this text (as a text prompt echoes "<|im_start|>")
            echo = [(p if isinstance(p, str) else self.llm.detokenize(p, skip_special_tokens=False))
                    if req.echo else None for p in req.prompts]
            plan = _Plan(False, prompts, echo, req.n, options, req.logprobs)
        self._check_fits(plan, options["adapter"], "messages" if chat else "prompt")
        if req.limit is not None and req.limit != -1:
            self._check_limit_fits(plan, options["adapter"], req.limit, chat,
                                   "max_completion_tokens" if chat and req.max_completion_tokens is not None
                                   else "max_tokens")
        return plan

    def _request_ids(self, item, label: str, param: str) -> list[int]:
        """A prompt's or an input's token ids: a text tokenized, or ids checked against the vocabulary
        (RequestError "{label}: ..." naming param for ids out of range, or for no tokens)."""
        from .llm import token_ids

        try:
            ids = self.llm.tokenize(item) if isinstance(item, str) else token_ids(item, self.llm.config.vocab_size)
        except PyllmError as e:
            raise RequestError(f"{label}: {e}", param=param) from None
        if len(ids) == 0:
            raise RequestError(f"{label} is empty: it has no tokens", param=param)
        return [int(i) for i in ids]

    def _check_token_options(self, options: dict) -> None:
        """Token ids in logit_bias and stop_token_ids lie in the vocabulary (RequestError naming the field)."""
        vocab = self.llm.config.vocab_size
        for name in ("logit_bias", "stop_token_ids"):
            bad = [i for i in options.get(name) or () if not 0 <= int(i) < vocab]
            if bad:
                raise RequestError(f"{name}: token ids must lie in [0, {vocab}); got {bad[0]}", param=name)

    def _check_fits(self, plan: _Plan, adapter: str, param: str) -> None:
        """Each prompt leaves room in the context for at least one token (RequestError naming param)."""
        virtual = self.llm.adapters[adapter].virtual_tokens if adapter != "base" else 0
        for ids in plan.prompts:
            if virtual + len(ids) >= self.llm.context_length:
                raise RequestError(f"the prompt has {len(ids)} tokens" + (f" after {virtual} virtual ones" if virtual
                                                                        else "") +
                                   f"; the context holds {self.llm.context_length} (leave room for the reply)",
                                   param=param, code="context_length_exceeded")

    def _check_limit_fits(self, plan: _Plan, adapter: str, limit: int, chat: bool, param: str) -> None:
        """A max_tokens the request gives (not a default) fits in the context after each prompt: OpenAI
        refuses more, in these words and with this code (clients such as LiteLLM and LangChain read them
        as "the context window is exceeded"); it was cut to fit in silence, the reply ending "length"
        short of what was asked."""
        virtual = self.llm.adapters[adapter].virtual_tokens if adapter != "base" else 0
        used = virtual + max(len(ids) for ids in plan.prompts)
        context = self.llm.context_length
        if used + limit > context:
            what = "messages" if chat else "prompt"
            raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{used + limit} tokens ({used} in the {what}, {limit} in the completion). Please "
                               f"reduce the length of the {what} or {param}.", param=param,
                               code="context_length_exceeded")

    def _defaults_for(self, req) -> dict:
        return {k: v for k, v in self.defaults.items() if k != "max_new_tokens"}

    def _chat_plan(self, req, options: dict) -> _Plan:
        from .tool_calls import check_tools, forced_call_grammar, tool_format

        messages = [m.model_dump(exclude_unset=True) for m in req.messages]
        tools = fmt = None
        if req.tools and req.tool_choice != "none":
            tools = [t.model_dump(exclude_unset=True) for t in req.tools]  # as the client sent them
            fmt = tool_format(self.llm.chat_template, [t["function"]["name"] for t in tools], req.parallel_tool_calls)
            check_tools(fmt, tools)  # every mode alike: a forced call's grammar is made of these schemas
            named = req.tool_choice.function.name if hasattr(req.tool_choice, "function") else None
            if req.tool_choice == "required" or named:
                if options.pop("response_format", {"type": "text"})["type"] != "text":  # text: the default, free
                    raise RequestError("a forced tool call and response_format cannot be combined",
                                       param="response_format")
                options["grammar"] = forced_call_grammar(fmt, tools, named, req.parallel_tool_calls,
                                                         self.llm.tokenizer)
        try:
            variables = check_template_variables(req.chat_template_kwargs)
        except TemplateError as e:
            raise RequestError(str(e), param="chat_template_kwargs") from None
        if req.reasoning_effort is not None:  # a template with reasoning levels reads it (gpt-oss's)
            if "reasoning_effort" not in (self.llm.chat_template or ""):
                raise RequestError("reasoning_effort: this model's chat template has no reasoning levels (it does "
                                   "not read reasoning_effort)", param="reasoning_effort", code="unsupported_parameter")
            variables["reasoning_effort"] = req.reasoning_effort
        try:
            prompt = self.llm.chat_prompt_ids(messages, tools=tools, render_limits=self.limits.render_limits(),
                                              chat_template_kwargs=variables, for_generation=True,
                                              add_generation_prompt=req.add_generation_prompt,
                                              continue_final_message=req.continue_final_message)
        except TemplateError as e:  # messages it cannot take (a non-text part), or the template refused them
            raise RequestError(str(e), param="messages") from None
        except LimitError as e:  # a rendering of more characters than the context can hold, before tokenizing
            raise RequestError(str(e), param="messages", code="context_length_exceeded") from None
        options["stop"] = self.llm.chat_stop(options.get("stop"))  # a built-in template's end of turn, as LLM.chat
        return _Plan(True, [prompt], [None], req.n, options, req.top_count, fmt,
                     reasoning=self._reasoning(req, prompt, options,
                                               messages[-1] if req.continue_final_message else None))

    def _reasoning(self, req, prompt: list[int], options: dict, prefill: dict | None = None) -> tuple | None:
        """The plan's reasoning: (the template's think tags, whether the prompt opened the block), or
        None when the reply's think block stays in content (reasoning_format "none", or a template
        without think tags). A reply held to a grammar (response_format, a forced tool call) cannot
        think first, so the prompt's open block is not taken for one. prefill: the message the reply
        continues (continue_final_message), which may open a block it does not close."""
        from .reasoning import think_tags

        tags = think_tags(self.llm.chat_template)
        if (req.reasoning_format or self.reasoning_format) == "none" or tags is None:
            return None
        constrained = "grammar" in options or options.get("response_format", {"type": "text"})["type"] != "text"
        tail = self.llm.detokenize(prompt[-16:], skip_special_tokens=False)
        opened = tail.rstrip().endswith(tags.open)
        if prefill is not None and isinstance(prefill.get("content"), str):
            text = prefill["content"].lstrip()
            opened = opened or (text.startswith(tags.open) and tags.close not in text)
        return tags, not constrained and opened

    # -- plan + generated text -> choices -------------------------------------------------------
    def _reply_parts(self, plan: _Plan, tokens: list, text: str, stats) -> _ReplyParts:
        """A chat reply read for its think block (plan.reasoning) and its tool calls (plan.tools).
        tokens: the reply's TokenLogprob; text: the text it returns. The texts read are reply_text's,
        with the special tokens the readers need (think tags, the format's tool-call tags)."""
        from .reasoning import split
        from .tool_calls import special_tag_ids, special_token_id

        tokenizer = self.llm.tokenizer
        stopped = stats.stop_string is not None
        ids = [t.id for t in tokens]
        think = frozenset()
        if plan.reasoning is not None:
            tags = plan.reasoning[0]
            think = frozenset(i for i in (special_token_id(tags.open, tokenizer), special_token_id(tags.close, tokenizer))
                              if i is not None)

        def read(keep: frozenset) -> tuple[str | None, str]:
            full = reply_text(tokenizer, ids, text, stopped, keep) if keep else text
            if plan.reasoning is None:
                return None, full
            parts = split(full, *plan.reasoning)
            return parts.reasoning, parts.content
        reasoning, content = read(think)
        tool_text = read(think | special_tag_ids(plan.tools, tokenizer))[1] if plan.tools is not None else content
        return _ReplyParts(reasoning, content, tool_text, stopped or stats.finish_reason == "length")

    def _choice(self, plan: _Plan, index: int, text: str, tokens: list, stream) -> dict:
        tokenizer = self.llm.tokenizer
        finish = stream.stats.finish_reason
        if plan.chat:
            calls, reasoning = [], None
            if plan.tools is not None or plan.reasoning is not None:
                parts = self._reply_parts(plan, tokens, text, stream.stats)
                reasoning, text = parts.reasoning, parts.content
            if reasoning is not None:
                self._count_reasoning(plan, index, tokens)
            if plan.tools is not None:
                parsed = plan.tools.split(parts.tool_text, cut=parts.cut)
                calls = parsed.calls
                if calls:
                    text = parsed.content
                elif plan.forced_calls:
                    text = None  # a forced call cut short: its markup is no content (null, as beside calls)
                finish = tool_finish_reason(finish, calls, parsed.dropped)
            logprobs = responses.chat_logprobs(tokenizer, tokens) if plan.logprobs is not None else None
            return responses.chat_choice(index, text if text or not calls else None, finish, logprobs, calls,
                                         reasoning or None)  # (an empty block: none, as streamed)
        echo = plan.echo[index // plan.n]
        logprobs = None
        if plan.logprobs is not None:
            before = self._echo_logprobs(plan, index) if echo is not None else None
            logprobs = responses.merge_completion_logprobs(
                before, responses.completion_logprobs(tokenizer, tokens, len(echo or "")))
        return responses.completion_choice(index, (echo or "") + text, finish, logprobs)

    def _echo_logprobs(self, plan: _Plan, index: int) -> dict:
        """The echoed prompt's tokens with their log-probabilities (the first has none), computed
        once per prompt."""
        prompt = index // plan.n
        with plan.echo_lock:
            if prompt not in plan.echo_logprobs:
                # ("BASE:NAME": its adapter's)
                tokens = self.llm._prompt_logprobs(plan.prompts[prompt], plan.logprobs, plan.options["adapter"])
                plan.echo_logprobs[prompt] = responses.completion_logprobs(self.llm.tokenizer, tokens)
            return plan.echo_logprobs[prompt]

    def _usage(self, plan: _Plan, streams) -> dict:
        """Prompt tokens count once per prompt, as do the cached ones (those of its first choice)."""
        return responses.usage(sum(len(p) for p in plan.prompts), sum(s.stats.generated_tokens for s in streams),
                               sum(s.stats.cached_tokens for s in streams[::plan.n]),
                               sum(plan.reasoning_tokens.values()))

    def _count_reasoning(self, plan: _Plan, index: int, tokens: list) -> None:
        """Records how many of choice index's tokens (TokenLogprob) its think block took
        (reasoning.reasoning_tokens), for usage's reasoning_tokens."""
        from .reasoning import reasoning_tokens
        from .tool_calls import special_token_id

        tokenizer = self.llm.tokenizer
        tags, opened = plan.reasoning
        think = {special_token_id(tags.open, tokenizer), special_token_id(tags.close, tokenizer)}
        kept = [k for k, t in enumerate(tokens) if t.id in think or t.id not in tokenizer.special_ids]
        ids = [tokens[k].id for k in kept]
        count = reasoning_tokens(lambda k: tokenizer.decode(ids[:k], skip_special_tokens=False), len(ids), tags,
                                 opened)
        if count:  # the tokens up to the one that closed the block, special ones between them too
            plan.reasoning_tokens[index] = kept[count - 1] + 1

    # -- answers and chunks -----------------------------------------------------------------------
    def head(self, req, chat: bool) -> dict:
        """The fields an answer, and each chunk of a streamed one, opens with: a new id, the object
        kind, the time, and the model the request named ("BASE:ADAPTER", or whatever name the client
        was configured with, as OpenAI and llama-server answer), else this model's name ("BASE:NAME"
        when the LLM's own adapter runs)."""
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self._answered_model(req.model), "system_fingerprint": self.system_fingerprint}

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's system_fingerprint: what else than the request decides a seeded reply (pyllm's
        version, the model file, the device, the activation and KV cache formats), as a short hash."""
        import hashlib

        from . import __version__

        engine = getattr(self.llm, "engine", None)
        parts = (__version__, getattr(self.llm, "path", ""), getattr(self.llm, "device", ""),
                 getattr(engine, "activation_quant", ""), getattr(engine, "kv_cache", ""))
        return "fp_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:10]

    def _answered_model(self, model: str | None) -> str:
        """The "model" of an answer: the request's, else what ran (this model, or "BASE:NAME" for the
        LLM's own adapter, which a request without "model" runs: _adapter_for)."""
        if model:
            return model
        adapter = self._adapter_for(None)
        return self.model_name if adapter == "base" else f"{self.model_name}:{adapter}"

    def answer(self, head: dict, plan: _Plan, replies: list, streams: list) -> dict:
        """The non-streamed answer (chat.completion or text_completion): replies[k] is (text, tokens)
        of choice k, whose TextStream streams[k] has ended."""
        choices = [self._choice(plan, k, *replies[k], stream) for k, stream in enumerate(streams)]
        return {**head, "choices": choices, "usage": self._usage(plan, streams)}

    def chunk(self, head: dict, plan: _Plan, choice: dict | None, include_usage: bool,
              usage: dict | None = None) -> dict:
        """One chunk of a streamed answer (chat.completion.chunk or text_completion) holding choice
        (none: the usage chunk); with include_usage every chunk has "usage", null but the last's."""
        obj = {**head, "object": "chat.completion.chunk" if plan.chat else "text_completion",
               "choices": [choice] if choice else []}
        if include_usage:
            obj["usage"] = usage
        return obj

    def create(self, body: dict, chat: bool):
        """What LLM.create_completion (chat False) and LLM.create_chat_completion answer a request
        body (its fields, as JSON carries them) with: the answer, or with stream true an iterator of
        its chunks. The choices run one after another in this thread; closing the iterator (or
        leaving a `for` over it) ends the generation and frees the LLM. RequestError (or the
        ValueError generate raises) for a request the server refuses, with the server's message."""
        req = parse_request(body, chat)
        plan, streams = self.start(req, chat)
        head = self.head(req, chat)
        if req.stream:
            return self._iter_chunks(plan, streams, head, req.include_usage)
        replies = []
        try:
            for stream in streams:
                text, tokens = "", []
                for piece, new in _Tokens(stream):
                    text += piece
                    tokens += new
                replies.append((text, tokens + stream.take_tokens()))
        finally:
            for stream in streams:
                stream.close()
        return self.answer(head, plan, replies, streams)

    def _iter_chunks(self, plan: _Plan, streams: list, head: dict, include_usage: bool) -> Iterator[dict]:
        try:
            for index, stream in enumerate(streams):
                made = _ChoiceChunks(self, plan, index, stream)
                before = (self._echo_logprobs(plan, index)
                          if made.echo is not None and plan.logprobs is not None else None)
                for obj in made.opening(before):
                    yield self.chunk(head, plan, obj, include_usage)
                for piece, tokens in _Tokens(stream):
                    for obj in made.piece(piece, tokens):
                        yield self.chunk(head, plan, obj, include_usage)
                for obj in made.closing():
                    yield self.chunk(head, plan, obj, include_usage)
            if include_usage:
                yield self.chunk(head, plan, None, True, self._usage(plan, streams))
        finally:
            for stream in streams:  # left early: the one generating gives the model back now
                stream.close()


class Server(Completions):
    """The routes for one LLM.

    defaults: generate() options (temperature, top_p, top_k, min_p, repetition_penalty, seed,
    typical_p, max_new_tokens) for fields a request leaves unset; api_key: required as "Authorization: Bearer
    <key>" on every route but /health; cors_origins: origins allowed to call from a browser;
    limits: what one request may ask (Limits(): the defaults of `pyllm serve`'s flags);
    max_num_batched_tokens: rows per engine step when llm.n_parallel > 1 (the Scheduler's budget:
    decode rows, then prompt chunks; default limits.DEFAULT_MAX_NUM_BATCHED_TOKENS); reasoning_format:
    Completions'. close() stops the scheduler."""

    def __init__(self, llm, model_name: str, max_queue: int = 64, defaults: dict | None = None,
                 api_key: str | None = None, cors_origins: list[str] | tuple = (), limits: Limits | None = None,
                 max_num_batched_tokens: int | None = None, reasoning_format: str = "deepseek"):
        from .limits import DEFAULT_MAX_NUM_BATCHED_TOKENS
        from .scheduler import Scheduler

        super().__init__(llm, model_name, defaults, limits, reasoning_format)  # (its checks before the scheduler's thread starts)
        # n_parallel > 1: requests run together (close() detaches the scheduler from llm)
        self.scheduler = (Scheduler(llm, max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS)
                          if llm.n_parallel > 1 else None)
        self.slots = QueueSlots(max_queue)
        # request bodies being received or parsed (all POST routes), counted apart from slots: with no bound,
        # bodies sent faster than worker threads parse them waited in memory, 8 MiB each (500 MB for 60)
        self.intake = QueueSlots(max_queue)
        self.api_key = api_key
        self.cors_origins = list(cors_origins)
        self.created = int(time.time())
        self._running: dict = {}  # TextStream -> the thread generating it (_pieces)
        self._running_lock = threading.Lock()
        self.grammar_workers = ThreadPoolExecutor(GRAMMAR_WORKERS, thread_name_prefix="pyllm-serve-grammar")

    def close(self) -> None:
        """Stops the scheduler (its streams end as cancelled); the LLM then runs one call at a time."""
        if self.scheduler is not None:
            self.scheduler.close()
        self.grammar_workers.shutdown(wait=False)

    def end_requests(self) -> None:
        """The server is stopping and its grace period is nearly over: every generation in progress
        ends now (a streamed answer with an error event, another with 503 'the server is shutting
        down') and no request starts; the requests' own ends then finish before the server cuts
        their tasks (uvicorn's timeout_graceful_shutdown), which gave a 500 and a traceback."""
        self.stopping = True
        self.close()
        with self._running_lock:
            running = list(self._running)
        for stream in running:  # the one generating and those waiting for the model
            stream.cancel()

    def wait_for_requests(self, seconds: float) -> None:
        """Waits (at most `seconds`) for the threads still generating: a process that exits while one
        runs in the C++ engine ended with 'terminate called without an active exception'."""
        deadline = time.monotonic() + seconds
        with self._running_lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def _choices_together(self) -> int:
        """How many choices of one request (n, several prompts) generate at once: the scheduler's
        slots (they ran one after another, n=4 taking 4 times as long on 4 idle slots); without a
        scheduler one, as the model runs one stream at a time."""
        return self.llm.n_parallel if self.scheduler is not None else 1

    @property
    def max_queue(self) -> int:
        return self.slots.limit

    @property
    def active(self) -> int:
        """Requests running or waiting."""
        return self.slots.active

    def app(self):
        """The ASGI application: Starlette routes, behind the API key check and CORS when set."""
        if Starlette is None:
            raise RuntimeError(MISSING)
        app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})
        return _with_access_rules(app, self.api_key, self.cors_origins)

    async def _http_error(self, request: "Request", exc: "HTTPException"):
        """Starlette's own refusals (no such route, a method the route does not take) as OpenAI's
        error object, like every other refusal (Starlette answers them in plain text)."""
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += (" (this server has POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, "
                        "/v1/messages/count_tokens, /v1/embeddings, /tokenize, /detokenize; GET /v1/models, /health)")
        return JSONResponse(_path_error(request.url.path, exc.status_code, _error_body(message, exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def _internal_error(self, request: "Request", exc: Exception):
        """A failure no handler turned into an answer (a bug, whatever its type: a 500), as OpenAI's
        error object where Starlette answered in plain text "Internal Server Error" (uvicorn logs it)."""
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    async def health(self, request: "Request"):
        body = {"status": "ok", "requests": self.active}
        if self.scheduler is not None:  # llama.cpp's names
            busy = self.scheduler.busy_slots
            body.update(slots_idle=len(self.scheduler.slots) - busy, slots_processing=busy)
        return JSONResponse(body)

    def _model_card(self, ident: str) -> dict:
        """OpenAI's model object, with Anthropic's fields beside (type, display_name, created_at: the
        anthropic client's models.list reads them)."""
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        card = {"id": ident, "object": "model", "created": self.created, "owned_by": "pyllm",
                "context_length": self.llm.context_length, "type": "model", "display_name": ident,
                "created_at": created_at}
        if ident != self.model_name:
            adapter = self.llm.adapters[ident.rpartition(":")[2]]
            card.update(parent=self.model_name, adapter={"type": adapter.kind, "peft_type": adapter.peft_type,
                                                         "virtual_tokens": adapter.virtual_tokens})
        return card

    async def models(self, request: "Request"):
        ids = self._model_ids()  # (first_id, last_id, has_more: Anthropic's page fields)
        return JSONResponse({"object": "list", "data": [self._model_card(i) for i in ids], "first_id": ids[0],
                             "last_id": ids[-1], "has_more": False})

    async def model(self, request: "Request"):
        if request.path_params["model_id"] not in self._model_ids():
            return error_response(self._no_such_model(request.path_params["model_id"]))
        return JSONResponse(self._model_card(request.path_params["model_id"]))

    async def tokenize(self, request: "Request"):
        """{"content": text, "add_special": true, "parse_special": true, "with_pieces": false} ->
        {"tokens": [...]} (llama.cpp's names; "prompt" and "add_special_tokens" too). parse_special false:
        special-token strings in the content are tokenized as plain text. with_pieces true: each token is
        {"id": id, "piece": its text}, or its bytes as a list of numbers when they are not whole UTF-8
        characters (a byte-level token holding part of one), as llama.cpp's server gives them."""
        return await self._answer(request, self._tokenize)

    def _tokenize(self, raw: bytes) -> dict:
        req = validate(TokenizeRequest, parse_body(raw))
        check_prompt_length(req, self.limits, "content")
        tokens = self.llm.tokenize(req.content, req.add_special, parse_special=req.parse_special)
        listed = [{"id": t, "piece": token_piece(self.llm.tokenizer.token_bytes(t))} for t in tokens] \
            if req.with_pieces else tokens
        return {"tokens": listed, "count": len(tokens), "max_model_len": self.llm.context_length}

    async def embeddings(self, request: "Request"):
        """OpenAI's embeddings: the final hidden state of each input's last token, L2-normalised
        (LLM.embed's default pooling). A client that leaves ends the work at the next input."""
        try:
            req = await self._parse(request, self._parse_embeddings)
        except Exception as e:
            return error_response(e)
        if not self.slots.take():
            return self._busy()
        work = _Cancel()
        watcher = asyncio.ensure_future(_watch_disconnect(request, work))
        try:
            return await asyncio.to_thread(self._embeddings, req, work)
        except Exception as e:
            return error_response(e)
        finally:
            watcher.cancel()
            self.slots.release()

    def _embedding_ids(self, req, adapter: str) -> list[list[int]]:
        """Each input's token ids: not empty, in the vocabulary, within the context after the adapter's
        virtual tokens (RequestError naming "input")."""
        out = []
        virtual = self.llm.adapters[adapter].virtual_tokens if adapter != "base" else 0
        for k, item in enumerate(req.inputs):
            ids = self._request_ids(item, f"input {k}", "input")
            if virtual + len(ids) > self.llm.context_length:
                raise RequestError(f"input {k} has {len(ids)} tokens"
                                   + (f" after {virtual} virtual ones" if virtual else "")
                                   + f"; the context holds {self.llm.context_length}",
                                   param="input", code="context_length_exceeded")
            out.append(ids)
        return out

    def _parse_embeddings(self, raw: bytes):
        req = validate(EmbeddingRequest, parse_body(raw))
        check_prompt_length(req, self.limits, "input")
        if not req.inputs:
            raise RequestError("'input' must not be empty", param="input")
        if len(req.inputs) > MAX_PROMPTS:
            raise RequestError(f"at most {MAX_PROMPTS} inputs per request", param="input")
        hidden = self.llm.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise RequestError(f"this model's embeddings have {hidden} dimensions", param="dimensions")
        return req

    def _embeddings(self, req, work: _Cancel) -> "JSONResponse":
        import base64

        adapter = self._adapter_for(req.model)  # "BASE:NAME": the adapter's, as for completions
        ids = self._embedding_ids(req, adapter)
        vectors = []
        for item in ids:  # one by one: a client that leaves ends the work at the next input, not minutes later
            work.check()
            vectors.append(self.llm.embed([item], adapter=adapter)[0])
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                 if req.encoding_format == "base64" else [float(x) for x in v]}
                for i, v in enumerate(vectors)]
        used = sum(len(i) for i in ids)
        return JSONResponse({"object": "list", "data": data, "model": self._answered_model(req.model),
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def detokenize(self, request: "Request"):
        """{"tokens": [...]} -> {"content": text} (special tokens skipped unless "skip_special": false)."""
        return await self._answer(request, self._detokenize)

    def _detokenize(self, raw: bytes) -> dict:
        req = validate(DetokenizeRequest, parse_body(raw))
        limit = self.limits.max_prompt_chars  # a token is a character or more: as long a text as a prompt may be
        if len(req.tokens) > limit:
            raise RequestError(f"'tokens' holds {len(req.tokens)} ids; the limit is {limit} (--max-prompt-chars)",
                               param="tokens")
        vocab = self.llm.config.vocab_size
        if any(i >= vocab for i in req.tokens):
            raise RequestError(f"'tokens' must be token ids in [0, {vocab})", param="tokens")
        return {"content": self.llm.detokenize(req.tokens, req.skip_special)}

    async def _answer(self, request: "Request", work: Callable[[bytes], dict]):
        """The JSON answer work(body bytes) gives, computed in a worker thread, or the error response."""
        try:
            return await self._parse(request, lambda raw: JSONResponse(work(raw)))
        except Exception as e:
            return error_response(e)

    async def _parse(self, request: "Request", parse: Callable[[bytes], object]):
        """parse(the request's body bytes), in a worker thread, with a place in self.intake while
        the body is received and parsed (RequestError 503 when none is free)."""
        if not self.intake.take():
            raise RequestError(f"the server is busy ({self.intake.active} request bodies being received or read); "
                               "try again later", 503)
        try:
            raw = await read_body(request, self.limits)
            return await asyncio.to_thread(parse, raw)
        finally:
            self.intake.release()

    def _busy(self, dialect: Dialect | None = None) -> "JSONResponse":
        return error_response(RequestError(f"the server is busy ({self.active} requests running or waiting); "
                                           "try again later", 503), dialect)

    async def chat_completions(self, request: "Request"):
        return await self._handle(request, chat=True)

    async def completions(self, request: "Request"):
        return await self._handle(request, chat=False)

    async def responses(self, request: "Request"):
        """OpenAI's Responses API, run as the chat completion it asks for (pyllm/responses_api.py)."""
        return await self._handle(request, chat=True, dialect=DIALECTS["responses"])

    async def messages(self, request: "Request"):
        """Anthropic's Messages API, run as the chat completion it asks for (pyllm/anthropic_api.py)."""
        return await self._handle(request, chat=True, dialect=DIALECTS["messages"])

    async def count_tokens(self, request: "Request"):
        """Anthropic's POST /v1/messages/count_tokens: {"input_tokens": the prompt's tokens}."""
        dialect = DIALECTS["messages"]
        try:
            return await self._parse(request, self._count_tokens)
        except Exception as e:
            return error_response(e, dialect)

    def _count_tokens(self, raw: bytes) -> "JSONResponse":
        dialect = DIALECTS["messages"]
        req, _ = self.parse(raw, True, dialect, anthropic_api.count_tokens_body)
        try:
            return JSONResponse({"input_tokens": len(self._plan(req, True).prompts[0])})
        except Exception as e:  # (the chat plan's errors name chat fields)
            raise _renamed(e, dialect) from None

    async def _handle(self, request: "Request", chat: bool, dialect: Dialect | None = None):
        started = time.perf_counter()
        try:
            parsed = await self._parse(request, lambda raw: self.parse(raw, chat, dialect))
        except Exception as e:
            return error_response(e, dialect)
        req, body = parsed if dialect else (parsed, None)  # body: the dialect's request, as sent
        if not self.slots.take():
            return self._busy(dialect)
        handed_over = False  # whether the streaming response now releases the slot
        try:
            # template rendering, tokenizing and grammar compiling take seconds on a long prompt; a request
            # that compiles a grammar starts in threads of its own (grammar_workers)
            self._refuse_when_stopping()  # (its grammar workers are shut down by then)
            workers = self.grammar_workers if _compiles_grammar(req, chat) else None
            plan, streams = await asyncio.get_running_loop().run_in_executor(workers, self.start, req, chat)
            head = self.head(req, chat)
            if req.stream:
                events = self._events(plan, streams, request, head, req.include_usage, started, dialect, body)
                handed_over = True
                return EventStreamResponse(events, self.slots.release, self.limits.send_timeout)

            async def generate(index, stream):
                text, tokens = "", []
                async for piece, new in self._pieces(_Tokens(stream), request):
                    text += piece
                    tokens += new
                if stream.stats.finish_reason == "cancelled":  # the client went away, or the server stops
                    self._refuse_when_stopping()
                    raise _ClientGone
                yield index, text, tokens + stream.take_tokens()

            replies = {}
            try:
                async for index, text, tokens in _together([generate(i, s) for i, s in enumerate(streams)],
                                                           self._choices_together):
                    replies[index] = text, tokens
            except _ClientGone:
                return error_response(RequestError("the request was cancelled", 499), dialect)
            answer = await asyncio.to_thread(self.answer, head, plan, [replies[k] for k in range(len(streams))],
                                             streams)
            if dialect is not None:
                answer = dialect.answer(body, answer, streams)
            self._log(request, plan, streams, started)
            return await asyncio.to_thread(JSONResponse, answer)  # logprobs of n choices can be megabytes
        except Exception as e:  # (the chat plan's errors name chat fields)
            return error_response(_renamed(e, dialect) if dialect else e, dialect)
        finally:
            if not handed_over:
                self.slots.release()

    def parse(self, raw: bytes, chat: bool, dialect: Dialect | None = None, prepare=None):
        """The validated request (api_schema's ChatCompletionRequest or CompletionRequest) of a body
        (bytes), within the prompt length limit; RequestError otherwise. dialect: the body is its
        request, read as the chat request it asks for (after prepare(body), where given); (that
        request, the body) is returned. Slow on a large body: call it in a worker thread."""
        body = parse_body(raw)
        if dialect is None:
            req = parse_request(body, chat)
        else:
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object", param=None, code="invalid_type")
            chat_request = dialect.chat_body(prepare(body) if prepare else body)  # (its errors name its fields)
            try:
                req = parse_request(chat_request, chat)
                check_prompt_length(req, self.limits, "messages")
            except Exception as e:
                raise _renamed(e, dialect, chat_request) from None
            return req, body
        check_prompt_length(req, self.limits, "messages" if chat else "prompt")
        return req

    def _log(self, request, plan: _Plan, streams, started: float) -> None:
        generated = sum(s.stats.generated_tokens for s in streams)
        decode = sum(s.stats.decode_seconds for s in streams)
        rate = max(0, generated - len(streams)) / decode if decode > 0 else 0.0
        finish = ",".join(sorted({s.stats.finish_reason for s in streams}))
        log.info("%s %s: %d choice(s), %d prompt + %d generated tokens, %.1f t/s decode, %.2f s, %s",
                 request.method, request.url.path, len(streams), sum(len(p) for p in plan.prompts), generated,
                 rate, time.perf_counter() - started, finish)

    # -- streaming ------------------------------------------------------------------------------
    async def _events(self, plan: _Plan, streams, request, head: dict, include_usage: bool, started: float,
                      dialect: Dialect | None = None, body: dict | None = None) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: its chunks, then [DONE]; or, for a dialect's
        request (body), the events its chunks make in the dialect. An error after the headers went
        out becomes an event holding the error object."""
        chunks = self._chunks(plan, streams, request, head, include_usage, started)
        converter = dialect.events(body, head["model"], plan, streams) if dialect is not None else None
        try:
            for event in converter.start() if converter else ():
                yield _named_sse(event)
            async for chunk in chunks:
                if converter is None:
                    yield "data: [DONE]\n\n" if chunk is _DONE else _sse(chunk)
                elif chunk is not _DONE:
                    for event in converter.feed(chunk):
                        yield _named_sse(event)
        except Exception as e:
            status, error = error_info(_renamed(e, dialect) if dialect else e)
            yield _named_sse(converter.error(error, status)) if converter else _sse(error)
        finally:
            await chunks.aclose()  # now, not when garbage collected: a client that left cancels its generation

    async def _chunks(self, plan: _Plan, streams, request, head: dict, include_usage: bool,
                      started: float) -> AsyncIterator[dict]:
        """The chunk objects of a streamed answer, then _DONE once every choice has ended (nothing
        more when a client went away)."""
        def event(choice, usage=None):
            return self.chunk(head, plan, choice, include_usage, usage)

        async def choice(index, stream):
            made = _ChoiceChunks(self, plan, index, stream)
            before = None
            if made.echo is not None and plan.logprobs is not None:
                before = await asyncio.to_thread(self._echo_logprobs, plan, index)
            for obj in made.opening(before):
                yield event(obj)
            pieces = self._pieces(_Tokens(stream), request)
            try:
                async for piece, tokens in pieces:
                    for obj in made.piece(piece, tokens):
                        yield event(obj)
            finally:
                await pieces.aclose()  # now, not when garbage collected: a client that left cancels it
            if stream.stats.finish_reason == "cancelled":  # the client went away, or the server stops
                self._refuse_when_stopping()  # an error event
                raise _ClientGone
            for obj in made.closing():
                yield event(obj)
        try:
            async for item in _together([choice(i, s) for i, s in enumerate(streams)], self._choices_together):
                yield item
        except _ClientGone:
            return
        if include_usage:
            yield event(None, self._usage(plan, streams))
        self._log(request, plan, streams, started)
        yield _DONE

    async def _pieces(self, stream, request: "Request") -> AsyncIterator[str]:
        """The stream's text pieces, produced in a worker thread at most PIECES_AHEAD ahead of the
        client (a client that reads slowly pauses its generation, and a paused stream lets a waiting
        request take the model: llm.PREEMPT_AFTER); leaving early cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        credits = threading.Semaphore(PIECES_AHEAD)

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                stream.cancel()

        def work():
            outcome = ("end", None)
            try:
                for piece in stream:
                    while not credits.acquire(timeout=0.1):
                        if stream.cancelled.is_set():  # the client left while the generation waited for it
                            stream.stats.finish_reason = "cancelled"
                            return
                    put(("piece", piece))
            except BaseException as e:  # handed to the request's coroutine
                outcome = ("error", e)
            finally:
                stream.close()  # gives the model back now, also when cancelled while paused
                with self._running_lock:
                    self._running.pop(stream, None)
                put(outcome)

        self._refuse_when_stopping()  # a later choice of a request (n > 1) the shutdown ended
        thread = threading.Thread(target=work, name="pyllm-request", daemon=True)
        with self._running_lock:
            self._running[stream] = thread
        watcher = asyncio.ensure_future(_watch_disconnect(request, stream))
        thread.start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                credits.release()
                yield value
        finally:
            stream.cancel()  # no-op when finished; otherwise the client left: stop within one token
            watcher.cancel()


def _with_access_rules(app, api_key: str | None, cors_origins: list[str]):
    """app behind the API key check (every path but /health), CORS, and, outermost, paths with a
    trailing slash or "//" taken as their route (_TrailingSlash: "/health/" is /health for the key check too)."""
    if api_key:
        app = _ApiKey(app, api_key)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        class Cors(CORSMiddleware):
            def preflight_response(self, request_headers):
                """Starlette's refusal of a preflight ("Disallowed CORS origin", plain text) as OpenAI's error."""
                response = super().preflight_response(request_headers)
                if response.status_code < 400:
                    return response
                headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
                message = (f"the CORS preflight was refused: {response.body.decode().removeprefix('Disallowed CORS ')} "
                           "not allowed (this server allows the origins of pyllm serve --cors-origin and the methods "
                           "GET, POST, OPTIONS)")
                return JSONResponse(_error_body(message, response.status_code), response.status_code, headers)

        app = Cors(app, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    return _TrailingSlash(app)


class _TrailingSlash:
    """ASGI middleware: a path is its route without a trailing "/" ("/v1/models/", "/health/") and
    with runs of "/" as one ("//v1/chat/completions", as nginx merges them), before every other
    rule. OpenAI-compatible clients given a base URL ending in "/" write paths so; Starlette answered
    a GET of "/v1/models/" as the model "" (404), a POST with a 307 redirect, which clients do not
    follow (or follow dropping the body), and "//v1/..." with a 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path") or ""
        if scope["type"] == "http" and (path.endswith("/") and len(path) > 1 or "//" in path):
            scope = dict(scope, path="/" + "/".join(part for part in path.split("/") if part))
            if scope.get("raw_path"):  # the path as sent (percent-encoded), alike
                scope["raw_path"] = b"/" + b"/".join(part for part in scope["raw_path"].split(b"/") if part)
        await self.app(scope, receive, send)


class _ApiKey:
    """ASGI middleware: requests without "Authorization: Bearer <key>" (or "x-api-key: <key>", as
    Anthropic's clients send it) get 401 (compared in constant time); /health stays open for load
    balancers."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            bearer = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            if not bearer and not hmac.compare_digest(headers.get(b"x-api-key", b"").strip(), self.key):
                body = {"error": {"message": "a valid API key is required (Authorization: Bearer <key>, or "
                                             "x-api-key: <key>)", "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}
                response = JSONResponse(_path_error(scope["path"], 401, body), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_protocol(header_timeout: float, send_timeout: float | None = None) -> type:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers: a connection whose
    next request has not sent all its headers within header_timeout seconds of the connection's
    start, or of its previous response, is closed. uvicorn itself waits for ever (its keep-alive
    timer restarts at every byte), so clients that connect and send nothing, or a byte now and then,
    would each hold a connection, and enough of them every file descriptor the server has. The
    same deadline ends a request body still arriving after its answer (one refused unread).

    send_timeout: a connection whose client leaves the answer unread (the transport's buffer past
    its high-water mark) for this long is aborted, its buffered bytes dropped. uvicorn waits for
    ever, and closing a transport waits for its buffer to drain: a non-streamed answer of megabytes
    (logprobs, embeddings, /detokenize) sent to a client that never reads held its connection and
    its bytes for good, whatever Limits.send_timeout said.

    As HTTP servers do (nginx's lingering close), a connection closed after an answer given before
    its request body was read (413, 401, 408 to a client that sent "Connection: close") ends its
    sending side, then reads and drops the rest of the body until the client closes, for
    header_timeout at most: uvicorn closed it with bytes unread, so the client's kernel got a reset
    and the client an error in place of the answer. A client that shuts down its sending side once
    its request is sent (half-closed) is answered, then the connection closed: uvicorn took it for a
    client gone and cancelled the request. Such a client cannot be told from one that closed its
    socket but by sending it something: it is sent an interim "100 Continue" (HTTP/1.1 clients skip
    it), or an event stream already started a comment line, which a client gone answers with a
    reset, and that ends its request as a disconnect (an HTTP/1.0 one is sent nothing: its reset
    comes with its answer). A request the HTTP parser refuses gets OpenAI's error object saying why
    (uvicorn's answer was plain text, "Invalid HTTP request received.")."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _due = None
        _stalled = None
        _lingering = None  # the timer that ends a lingering close
        _half_closed = None  # the timer of the next look for a reset on a half-closed connection
        _refused = None  # the HTTP parser's error

        def connection_made(self, transport) -> None:
            super().connection_made(_LingeringTransport(transport, self))
            next_event = self.conn.next_event

            def parse():  # keeps the parser's error for send_400_response (uvicorn drops it)
                try:
                    return next_event()
                except h11.RemoteProtocolError as e:
                    self._refused = e
                    raise
            self.conn.next_event = parse
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()
            if self._half_closed is not None and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # the client sends nothing more (a pipelined request it sent is answered)

        def connection_lost(self, exc) -> None:
            for timer in (self._due, self._stalled, self._lingering, self._half_closed):
                if timer is not None:
                    timer.cancel()
            self._stalled = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            error = self._refused
            status = getattr(error, "error_status_hint", 400)
            if status not in http.HTTPStatus.__members__.values():
                status = 400
            body = json.dumps(_error_body(f"invalid HTTP request: {error or msg}", status)).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            reason = http.HTTPStatus(status).phrase.encode()
            for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.linger()  # the rest of what it sent may be on its way: a reset would lose the answer

        def timeout_keep_alive_handler(self) -> None:
            if self._lingering is None:  # a lingering close ends by its own timer (uvicorn's cut it after 5 s)
                super().timeout_keep_alive_handler()

        def data_received(self, data: bytes) -> None:
            if self._lingering is None:
                super().data_received(data)  # else the rest of a body answered unread: dropped

        def eof_received(self):
            cycle = self.cycle
            if (self._lingering is None and cycle is not None and not cycle.response_complete
                    and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)):
                # the whole request came, then the end of the client's input: answered, then closed
                if cycle.scope["http_version"] == "1.1" and not cycle.response_started:
                    self.transport.write(self.conn.send(h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue")))
                    cycle.waiting_for_100_continue = False
                elif cycle.response_started and self.transport.event_stream:
                    # a stream whose headers went out (one waiting for the model sends nothing for a while):
                    # a comment line between two events, which clients skip
                    self.transport.write(self.conn.send(h11.Data(data=b": \n\n")))
                self._look_for_reset()
                return True  # the sending side stays open
            return super().eof_received()  # the transport closes

        def _look_for_reset(self) -> None:
            """Every HALF_CLOSED_POLL s while a half-closed client's request runs: a reset means it is gone."""
            self._half_closed = None
            if self.transport.is_closing():
                return
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.transport.abort()  # the request sees a disconnect, as when the client closes
                return
            self._half_closed = self.loop.call_later(HALF_CLOSED_POLL, self._look_for_reset)

        def linger(self) -> None:
            """Closes the connection of an answer given before its request was read whole, without a
            reset that would lose the answer: the sending side ends, and what comes is dropped until the
            client closes (or header_timeout passes)."""
            if self.cycle is not None:
                self.cycle.body = bytearray()
            inner = self.transport.inner
            self._lingering = self.loop.call_later(header_timeout, inner.close)
            inner.resume_reading()  # uvicorn stops reading once 64 KiB of body wait unread
            if inner.can_write_eof():
                inner.write_eof()

        def pause_writing(self) -> None:
            super().pause_writing()
            if send_timeout is not None and self._stalled is None:
                self._stalled = self.loop.call_later(send_timeout, self._send_due)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None

        def _send_due(self) -> None:
            self._stalled = None
            log.warning("a client left its answer unread for %g s: connection dropped", send_timeout)
            self.transport.abort()

        def _arm(self) -> None:
            if self._due is not None:
                self._due.cancel()
            self._due = self.loop.call_later(header_timeout, self._headers_due)

        def _headers_due(self) -> None:
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                log.warning("a client sent no complete request headers within %g s: connection closed",
                            header_timeout)
                self.transport.close()
            elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
                # answered before its body was all read (413, 408, 401, 404): uvicorn discards the rest for
                # as long as bytes come, so a body of a declared terabyte, or one sent a byte a second,
                # held its connection for ever. It may come for header_timeout after the answer (closing
                # at once, with bytes unread, resets the connection: the client could lose the answer).
                log.warning("a client still sent a request body %g s after its answer: connection closed",
                            header_timeout)
                self.transport.inner.close()

    return Protocol


HALF_CLOSED_POLL = 0.25  # seconds between looks for a reset on a half-closed client's connection


class _LingeringTransport:
    """A transport whose close(), while the client still sends a request body that was answered
    unread, is the protocol's linger() (http_protocol), and which notes whether the response it
    sends is a stream of server-sent events; everything else is the transport's own."""

    def __init__(self, inner, protocol):
        self.inner, self._protocol = inner, protocol
        self.event_stream = False  # whether the response whose headers went out last is server-sent events

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, data) -> None:
        if data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":  # a response's headers (h11 writes them at once)
            self.event_stream = b"\r\ncontent-type: text/event-stream" in bytes(data).lower()
        self.inner.write(data)

    def close(self) -> None:
        import h11

        protocol = self._protocol
        if protocol._lingering is None and not self.inner.is_closing() and protocol.conn.their_state is h11.SEND_BODY:
            protocol.linger()
        else:
            self.inner.close()


def listen(host: str, port: int) -> "socket.socket":
    """A socket bound to host:port as uvicorn binds one (IPv6 when host has a colon, SO_REUSEADDR),
    for serve(): a port out of range is a ValueError, an address in use or not on this machine an
    OSError naming it (uvicorn logs a traceback, or an error and exits with status 3)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"the port must be a number in 0..65535, got {port!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, UnicodeError) as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)
    return sock


def base_url(sock, host: str) -> str:
    """The API's URL for clients of a socket from listen(host, ...): the port it was given (--port 0
    printed ":0", not the one the system chose), an IPv6 address in brackets ("http://::1:8000" was
    no URL), the bound address when host is empty (all interfaces; was "http://:8000")."""
    address, port = sock.getsockname()[:2]
    shown = host or address
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/v1"


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, max_queue: int = 64,
          log_level: str = "info", defaults: dict | None = None, api_key: str | None = None,
          cors_origins: list[str] | tuple = (), limits: Limits | None = None,
          max_num_batched_tokens: int | None = None, sock=None, reasoning_format: str = "deepseek") -> None:
    """Serves llm until interrupted; prints a start-up line (model, context, threads, device, the
    parallel slots and the KV cache's memory) and logs one line per request. The options are Server's;
    sock: a socket from listen(host, port) (made here when None)."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(MISSING) from None
    import os
    import sys

    sock = sock or listen(host, port)

    name = model_name or os.path.splitext(os.path.basename(llm.path))[0]
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.info("pyllm serve: %s (OpenAI-compatible; Ctrl-C stops): model %s (%s), context %d tokens, "
             "%d threads on %s (activations %s)%s", base_url(sock, host), name, llm.path, llm.context_length,
             llm.n_threads, llm.device, llm.engine.activation_quant, ", API key required" if api_key else "")
    kv = llm.kv_cache_bytes
    log.info("KV cache: %d slot(s) x %d tokens (%s), %.1f MiB%s",
             llm.n_parallel, llm.context_length, llm.engine.kv_cache, kv / 2**20,
             "; requests run together (continuous batching)" if llm.n_parallel > 1
             else "; one request at a time (--parallel N runs N together)")
    server = Server(llm, name, max_queue, defaults, api_key, cors_origins, limits, max_num_batched_tokens,
                    reasoning_format)
    grace = server.limits.timeout_graceful_shutdown

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, whose shutdown also ends the generations still running shortly before
        the grace period is over, so that their answers end as answers (Server.end_requests)."""

        async def shutdown(self, sockets=None) -> None:
            def end_requests():  # off the event loop: closing the scheduler waits for its step
                threading.Thread(target=server.end_requests, name="pyllm-shutdown", daemon=True).start()

            asyncio.get_running_loop().call_later(grace - min(1.0, grace / 5), end_requests)
            await super().shutdown(sockets)

    try:
        GracefulServer(uvicorn.Config(server.app(), host=host, port=port, log_level=log_level,
                                      http=http_protocol(server.limits.body_timeout, server.limits.send_timeout),
                                      timeout_graceful_shutdown=grace)).run(sockets=[sock])
    finally:
        server.end_requests()
        server.wait_for_requests(10.0)
        sock.close()
