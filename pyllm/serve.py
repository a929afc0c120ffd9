"""`pyllm serve`: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
"stream": true; usage and finish_reason "stop"/"length"), GET /v1/models, GET /health.

Policy: the model runs one request at a time; others wait their turn in arrival order (up to
max_queue running or waiting, counted exactly, then 503). Everything slow (parsing the body,
rendering the template, tokenizing, generating) runs in worker threads, so the event loop, and
/health with it, stays free; a client that disconnects, mid-stream or while waiting, cancels its
generation, which frees the model within one token. `Limits` bounds what one request may ask (body
size, prompt length, time to send the body, time a client may leave a stream unread; docs/SECURITY.md). Unset sampling options take the model's generation defaults (greedy when it has
none), as transformers would; the OpenAI "model" field is accepted whatever it names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from typing import AsyncIterator, Callable

from .chat_template import TemplateError
from .errors import PyllmError
from .limits import ServerLimits as Limits

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the installed extras
    Starlette = None

PIECES_AHEAD = 64  # text pieces a generation may run ahead of its client
MISSING = "pyllm serve needs the server extra: pip install 'pyllm[serve]' (starlette and uvicorn)"


class RequestError(PyllmError):
    """A request the server refuses (HTTP 400, or the status given)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _error(message: str, status: int = 400, param: str | None = None) -> "JSONResponse":
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# -- request bodies -> generate() options --------------------------------------------------------

def _number(body: dict, key: str, kind=float, low=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            kind is int and value != int(value)):
        raise RequestError(f"'{key}' must be a {'whole ' if kind is int else ''}number", param=key)
    if low is not None and value < low:
        raise RequestError(f"'{key}' must be >= {low}", param=key)
    return kind(value)


# OpenAI options pyllm does not implement: refused when set to anything but their neutral value
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty")


def sampling_options(body: dict) -> dict:
    """generate() keyword arguments from an OpenAI request body (plus top_k, min_p, repetition_penalty)."""
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    if body.get("best_of", 1) not in (None, 1):
        raise RequestError("only best_of=1 is supported", param="best_of")
    for key in UNSUPPORTED:
        if body.get(key):
            raise RequestError(f"'{key}' is not supported by pyllm serve", param=key)
    response_format = body.get("response_format") or {}
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise RequestError("only the text response format is supported", param="response_format")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    max_tokens = _number(body, "max_completion_tokens", int, 0)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 0)
    return dict(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 0),
                top_p=_number(body, "top_p"), top_k=_number(body, "top_k", int, 0), min_p=_number(body, "min_p"),
                repetition_penalty=_number(body, "repetition_penalty"), seed=_number(body, "seed", int), stop=stop)


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages with text content (a string or a list of text parts) as plain strings."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role'", param="messages")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError("only text content parts are supported", param="messages")
            m["content"] = "".join(p.get("text", "") for p in content)
        elif content is None:
            m["content"] = ""
        elif not isinstance(content, str):
            raise RequestError("message content must be a string or a list of text parts", param="messages")
        out.append(m)
    return out


# -- limits: what one request may ask of the server ----------------------------------------------

def _refuse_constant(name: str):
    raise RequestError(f"the request body contains {name}, which is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (NaN and Infinity refused, as JSON itself does)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def read_body(request: "Request", limits: Limits) -> dict:
    """Reads and parses a request body within limits.max_body_bytes and limits.body_timeout."""
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
        raise RequestError(f"the request body did not arrive within {limits.body_timeout:g} s", 408) from None
    return await asyncio.to_thread(parse_body, b"".join(chunks))


def check_prompt_length(body: dict, chat: bool, limits: Limits) -> None:
    """Refuses prompt text longer than limits.max_prompt_chars before anything tokenizes it."""
    if chat:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        texts = [c for c in contents if isinstance(c, str)]
        texts += [p.get("text") for c in contents if isinstance(c, list) for p in c
                  if isinstance(p, dict) and isinstance(p.get("text"), str)]
        n = sum(len(t) for t in texts)
    else:
        prompt = body.get("prompt")
        n = len(prompt) if isinstance(prompt, (str, list)) else 0
        if isinstance(prompt, list):
            n = sum(len(p) if isinstance(p, str) else 1 for p in prompt)
    if n > limits.max_prompt_chars:
        raise RequestError(f"the prompt has {n} characters; the limit is {limits.max_prompt_chars} "
                           "(pyllm serve --max-prompt-chars)", param="messages" if chat else "prompt")


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


def error_response(e: BaseException) -> "JSONResponse":
    """The OpenAI-style error answer for an exception raised while handling a request: the
    request's own fault (a PyllmError or ValueError: bad options, a prompt past the context, a
    template that refused) is 4xx, anything else 500."""
    if isinstance(e, RequestError):
        return _error(str(e), e.status, e.param)
    if isinstance(e, ValueError):  # PyllmError and the ValueErrors of LLM's argument checks
        return _error(str(e))
    logging.getLogger("pyllm.serve").error("request failed", exc_info=e)
    return _error(f"internal error: {type(e).__name__}: {e}", 500)


class SendTimeout(Exception):
    """The client left a response unread for longer than Limits.send_timeout."""


class EventStreamResponse:
    """An ASGI server-sent-event response whose every send must finish within `send_timeout`: a
    client that stops reading fills the socket buffers, its send stalls, and the response ends
    (uvicorn then closes the connection). on_close() runs once, however the response ends, even
    when it never starts."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], send_timeout: float):
        self.events, self.on_close, self.send_timeout = events, on_close, send_timeout

    async def _send(self, send, message) -> None:
        try:
            await asyncio.wait_for(send(message), self.send_timeout)
        except asyncio.TimeoutError:
            raise SendTimeout from None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
            async for event in self.events:
                await self._send(send, {"type": "http.response.body", "body": event.encode(), "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except SendTimeout:
            logging.getLogger("pyllm.serve").warning(
                "a client left its stream unread for %g s: dropped", self.send_timeout)
        finally:
            try:
                await self.events.aclose()  # a generation still running is cancelled
            finally:
                self.on_close()


# -- running a generation off the event loop
async def _watch_disconnect(request: "Request", stream) -> None:
    """Cancels the generation when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The routes for one LLM."""

    def __init__(self, llm, model_name: str, max_queue: int = 64, limits: Limits | None = None):
        self.llm = llm
        self.model_name = model_name
        self.limits = limits or Limits()
        self.slots = QueueSlots(max_queue)
        self.created = int(time.time())

    @property
    def max_queue(self) -> int:
        return self.slots.limit

    @property
    def active(self) -> int:
        """Requests running or waiting."""
        return self.slots.active

    def app(self) -> "Starlette":
        if Starlette is None:
            raise RuntimeError(MISSING)
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    async def health(self, request: "Request"):
        return JSONResponse({"status": "ok", "requests": self.active})

    async def models(self, request: "Request"):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pyllm"}]})

    async def chat_completions(self, request: "Request"):
        return await self._handle(request, chat=True)

    async def completions(self, request: "Request"):
        return await self._handle(request, chat=False)

    async def _handle(self, request: "Request", chat: bool):
        try:
            body = await read_body(request, self.limits)
            check_prompt_length(body, chat, self.limits)
        except RequestError as e:
            return error_response(e)
        if not self.slots.take():
            return _error(f"the server is busy ({self.active} requests running or waiting); try again later", 503)
        handed_over = False  # whether the streaming response now releases the slot
        try:
            # template rendering and tokenizing take seconds on a long prompt: not on the event loop
            stream = await asyncio.to_thread(self._start, body, chat)
            kind = "chat.completion" if chat else "text_completion"
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                events = self._events(stream, request, chat, kind, ident, created, include_usage)
                handed_over = True
                return EventStreamResponse(events, self.slots.release, self.limits.send_timeout)
            text = "".join([piece async for piece in self._pieces(stream, request)])
        except Exception as e:
            return error_response(e)
        finally:
            if not handed_over:
                self.slots.release()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = stream.stats.finish_reason
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": self.model_name,
                             "choices": [choice], "usage": _usage(stream.stats)})

    def _start(self, body: dict, chat: bool):
        options = sampling_options(body)
        if chat:
            tools = body.get("tools")
            return self.llm.chat(chat_messages(body), stream=True, tools=tools,
                                 render_limits=self.limits.render_limits(), **options)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
            return self.llm.generate(prompt, stream=True, **options)  # token ids
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        return self.llm.generate(prompt, stream=True, **options)

    async def _events(self, stream, request, chat, kind, ident, created, include_usage) -> AsyncIterator[str]:
        def chunk(choice, usage=None):
            obj = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                   "model": self.model_name, "choices": [choice] if choice else []}
            if include_usage:
                obj["usage"] = usage
            return _sse(obj)

        def choice(text=None, finish_reason=None, role=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        if chat:
            yield chunk(choice(role=True))
        pieces = self._pieces(stream, request)
        try:
            try:
                async for piece in pieces:
                    yield chunk(choice(piece))
            finally:
                await pieces.aclose()  # now, not when garbage collected: a client that left cancels its generation
        except Exception as e:  # the headers are sent: the error goes into the stream
            yield _sse(json.loads(error_response(e).body))
            return
        yield chunk(choice(finish_reason=stream.stats.finish_reason))
        if include_usage:
            yield chunk(None, _usage(stream.stats))
        yield "data: [DONE]\n\n"

    async def _pieces(self, stream, request: "Request") -> AsyncIterator[str]:
        """The stream's text pieces, produced in a worker thread at most PIECES_AHEAD ahead of the
        client (a client that reads slowly pauses its generation, and a paused stream lets a waiting
        request take the model: LLM.PREEMPT_AFTER); leaving early cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        credits = threading.Semaphore(PIECES_AHEAD)

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                stream.cancel()

        def work():
            try:
                for piece in stream:
                    while not credits.acquire(timeout=0.1):
                        if stream.cancelled.is_set():
                            return
                    put(("piece", piece))
                put(("end", None))
            except BaseException as e:  # handed to the request's coroutine
                put(("error", e))
            finally:
                stream.close()  # gives the model back now, also when cancelled while paused

        watcher = asyncio.ensure_future(_watch_disconnect(request, stream))
        threading.Thread(target=work, name="pyllm-request", daemon=True).start()
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


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, max_queue: int = 64,
          log_level: str = "info", limits: Limits | None = None) -> None:
    """Serves llm until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(MISSING) from None
    import os

    name = model_name or os.path.splitext(os.path.basename(llm.path))[0]
    app = Server(llm, name, max_queue, limits).app()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
