"""`pyllm serve`: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
"stream": true; usage and finish_reason "stop"/"length"), GET /v1/models, GET /health.

Policy: the model runs one request at a time; others wait their turn in arrival order (up to
max_queue waiting, then 503). Each request runs in its own thread, so the event loop stays free; a
client that disconnects, mid-stream or while waiting, cancels its generation, which frees the model
within one token. Unset sampling options take the model's generation defaults (greedy when it has
none), as transformers would; the OpenAI "model" field is accepted whatever it names.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import AsyncIterator

from .chat_template import TemplateError

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the installed extras
    Starlette = None

MISSING = "pyllm serve needs the server extra: pip install 'pyllm[serve]' (starlette and uvicorn)"


class RequestError(ValueError):
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"'{key}' must be a {'whole ' if kind is int else ''}number", param=key)
    if low is not None and value < low:
        raise RequestError(f"'{key}' must be >= {low}", param=key)
    return kind(value)


# OpenAI options pyllm does not implement: refused when set to anything but their neutral value
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty")


def sampling_options(body: dict) -> dict:
    """generate() keyword arguments from an OpenAI request body (plus top_k, min_p, repetition_penalty,
    alias repeat_penalty)."""
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
    penalty = _number(body, "repetition_penalty")
    if penalty is None:  # llama.cpp's and llama-cpp-python's servers' name
        penalty = _number(body, "repeat_penalty")
    return dict(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 0),
                top_p=_number(body, "top_p"), top_k=_number(body, "top_k", int, 0), min_p=_number(body, "min_p"),
                repetition_penalty=penalty, seed=_number(body, "seed", int), stop=stop)


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


# -- running a generation off the event loop -----------------------------------------------------

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

    def __init__(self, llm, model_name: str, max_queue: int = 64):
        self.llm = llm
        self.model_name = model_name
        self.max_queue = max_queue
        self.active = 0  # requests running or waiting
        self.created = int(time.time())

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
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error("the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error("the request body must be a JSON object")
        if self.active >= self.max_queue:
            return _error(f"the server is busy ({self.active} requests running or waiting); try again later", 503)
        try:
            stream = self._start(body, chat)
        except RequestError as e:
            return _error(str(e), e.status, e.param)
        except (ValueError, TemplateError) as e:  # a prompt past the context, a template that refused, ...
            return _error(str(e))
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(stream, request, chat, kind, ident, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for piece in self._pieces(stream, request)])
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
            return self.llm.chat(chat_messages(body), stream=True, tools=tools, **options)
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
            async for piece in pieces:
                yield chunk(choice(piece))
        finally:
            await pieces.aclose()  # now, not when garbage collected: a client that left cancels its generation
        yield chunk(choice(finish_reason=stream.stats.finish_reason))
        if include_usage:
            yield chunk(None, _usage(stream.stats))
        yield "data: [DONE]\n\n"

    async def _pieces(self, stream, request: "Request") -> AsyncIterator[str]:
        """The stream's text pieces, produced in a worker thread (counted in self.active while the
        request runs or waits for the model); leaving early cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                stream.cancel()

        def work():
            try:
                for piece in stream:
                    put(("piece", piece))
                put(("end", None))
            except BaseException as e:  # handed to the request's coroutine
                put(("error", e))

        self.active += 1
        watcher = asyncio.ensure_future(_watch_disconnect(request, stream))
        threading.Thread(target=work, name="pyllm-request", daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stream.cancel()  # no-op when finished; otherwise the client left: stop within one token
            watcher.cancel()
            self.active -= 1


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, max_queue: int = 64,
          log_level: str = "info") -> None:
    """Serves llm until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(MISSING) from None
    import os

    name = model_name or os.path.splitext(os.path.basename(llm.path))[0]
    app = Server(llm, name, max_queue).app()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
