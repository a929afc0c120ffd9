"""`pyllm serve`: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
"stream": true; usage; finish_reason "stop"/"length"/"tool_calls"), GET /v1/models, GET
/v1/models/{id}, POST /tokenize, POST /detokenize, GET /health. Request fields are declared in
pyllm/api_schema.py (validation lives there); responses are built in pyllm/api_responses.py; tool
calls are parsed by pyllm/tool_calls.py. Options: an API key (Bearer, compared in constant time),
CORS origins, sampling defaults for fields a request leaves unset.

Policy: the model runs one request at a time; others wait their turn in arrival order (up to
max_queue waiting, then 503). Each request runs in its own thread, so the event loop stays free; a
client that disconnects, mid-stream or while waiting, cancels its generation, which frees the model
within one token. Unset sampling options take the model's generation defaults (greedy when it has
none), as transformers would; the OpenAI "model" field is accepted whatever it names.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from . import api_responses as responses
from .chat_template import TemplateError
from .structured import GrammarUnavailable
from .tool_calls import ToolError

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from .api_schema import RequestError, parse_request
except ImportError:  # pragma: no cover - depends on the installed extras
    Starlette = None

MISSING = "pyllm serve needs the server extra: pip install 'pyllm[serve]' (starlette, uvicorn, pydantic)"
log = logging.getLogger("pyllm.serve")


def _error(message: str, status: int = 400, param: str | None = None) -> "JSONResponse":
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# -- running a generation off the event loop -----------------------------------------------------

async def _watch_disconnect(request: "Request", stream) -> None:
    """Cancels the generation when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Tokens:
    """A TextStream whose iteration yields (piece, the tokens generated since the last piece)."""

    def __init__(self, stream):
        self.stream = stream
        self.stats = stream.stats

    def __iter__(self):
        for piece in self.stream:
            yield piece, self.stream.take_tokens()

    def cancel(self):
        self.stream.cancel()


@dataclass
class _Plan:
    """What one request runs: each prompt (token ids) n times, with these generate() options.
    Choice k answers prompt k // n."""
    chat: bool
    prompts: list[list[int]]
    echo: list[str]  # per prompt: the text echoed before the completion ("" without echo)
    n: int
    options: dict
    logprobs: int | None
    tools: object = None  # a tool_calls.ToolFormat when the reply may hold tool calls

    def streams(self, llm) -> list:
        """One TextStream per choice (created now, so that bad options fail before any output)."""
        out = []
        for ids in self.prompts:
            for i in range(self.n):
                options = dict(self.options)
                if options.get("seed") is not None:
                    options["seed"] += i  # n choices differ, reproducibly
                out.append(llm.generate(ids, stream=True, logprobs=self.logprobs, **options))
        return out


class Server:
    """The routes for one LLM.

    defaults: generate() options (temperature, top_p, top_k, min_p, repetition_penalty, seed,
    max_new_tokens) for fields a request leaves unset; api_key: required as "Authorization: Bearer
    <key>" on every route but /health; cors_origins: origins allowed to call from a browser."""

    def __init__(self, llm, model_name: str, max_queue: int = 64, defaults: dict | None = None,
                 api_key: str | None = None, cors_origins: list[str] | tuple = ()):
        self.llm = llm
        self.model_name = model_name
        self.max_queue = max_queue
        self.defaults = dict(defaults or {})
        self.api_key = api_key
        self.cors_origins = list(cors_origins)
        self.active = 0  # requests running or waiting
        self.created = int(time.time())

    def app(self):
        """The ASGI application: Starlette routes, behind the API key check and CORS when set."""
        if Starlette is None:
            raise RuntimeError(MISSING)
        app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ])
        return _with_access_rules(app, self.api_key, self.cors_origins)

    async def health(self, request: "Request"):
        return JSONResponse({"status": "ok", "requests": self.active})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pyllm",
                "context_length": self.llm.context_length}

    async def models(self, request: "Request"):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: "Request"):
        if request.path_params["model_id"] != self.model_name:
            return _error(f"the model {request.path_params['model_id']!r} does not exist (this server has "
                          f"{self.model_name!r})", 404, "model")
        return JSONResponse(self._model_card())

    async def tokenize(self, request: "Request"):
        """{"content": text, "add_special": true} -> {"tokens": [...]} (llama.cpp's names; "prompt" and
        "add_special_tokens" too)."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            return body
        text = body.get("content", body.get("prompt"))
        add = body.get("add_special", body.get("add_special_tokens", True))
        if not isinstance(text, str) or not isinstance(add, bool):
            return _error("'content' must be a string (and 'add_special' true or false)", param="content")
        tokens = await asyncio.to_thread(self.llm.tokenize, text, add)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.llm.context_length})

    async def detokenize(self, request: "Request"):
        """{"tokens": [...]} -> {"content": text} (special tokens skipped unless "skip_special": false)."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            return body
        tokens, skip = body.get("tokens"), body.get("skip_special", True)
        vocab = self.llm.config.vocab_size
        if not (isinstance(tokens, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                 for i in tokens)) or not isinstance(skip, bool):
            return _error(f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return JSONResponse({"content": await asyncio.to_thread(self.llm.detokenize, tokens, skip)})

    async def chat_completions(self, request: "Request"):
        return await self._handle(request, chat=True)

    async def completions(self, request: "Request"):
        return await self._handle(request, chat=False)

    async def _handle(self, request: "Request", chat: bool):
        body = await _json_body(request)
        if not isinstance(body, dict):
            return body
        started = time.perf_counter()
        try:
            req = parse_request(body, chat)
        except RequestError as e:
            return _error(str(e), e.status, e.param)
        if self.active >= self.max_queue:
            return _error(f"the server is busy ({self.active} requests running or waiting); try again later", 503)
        try:
            plan = self._plan(req, chat)
            streams = plan.streams(self.llm)
        except RequestError as e:
            return _error(str(e), e.status, e.param)
        except GrammarUnavailable as e:
            return _error(str(e), 400, "response_format")
        except ToolError as e:
            return _error(str(e), 400, "tools")
        except (ValueError, TemplateError) as e:  # a prompt past the context, a template that refused, ...
            return _error(str(e))
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "object": kind, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            events = self._events(plan, streams, request, head, req.include_usage, started)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = []
        for index, stream in enumerate(streams):
            text, tokens = "", []
            async for piece, new in self._pieces(_Tokens(stream), request):
                text += piece
                tokens += new
            if stream.stats.finish_reason == "cancelled":  # the client went away
                return _error("the request was cancelled", 499)
            tokens += stream.take_tokens()
            choices.append(await self._choice(plan, index, text, tokens, stream))
        self._log(request, plan, streams, started)
        return JSONResponse({**head, "choices": choices, "usage": self._usage(plan, streams)})

    # -- request -> plan ------------------------------------------------------------------------
    def _plan(self, req, chat: bool) -> _Plan:
        options = {**self._defaults_for(req), **req.generate_options()}
        limit = req.limit if req.limit is not None else self.defaults.get("max_new_tokens")
        if limit is None:
            limit = -1 if chat else 16  # OpenAI: chat until the end, completions 16
        options["max_new_tokens"] = self.llm.context_length if limit == -1 else limit
        if chat:
            return self._chat_plan(req, options)
        prompts = [self.llm.tokenize(p) if isinstance(p, str) else list(p) for p in req.prompts]
        echo = [(p if isinstance(p, str) else self.llm.detokenize(p)) if req.echo else "" for p in req.prompts]
        return _Plan(False, prompts, echo, req.n, options, req.logprobs)

    def _defaults_for(self, req) -> dict:
        return {k: v for k, v in self.defaults.items() if k != "max_new_tokens"}

    def _chat_plan(self, req, options: dict) -> _Plan:
        from .tool_calls import forced_call_grammar, tool_format

        messages = [m.model_dump(exclude_unset=True) for m in req.messages]
        tools = fmt = None
        if req.tools and req.tool_choice != "none":
            tools = [t.model_dump(exclude_unset=True) for t in req.tools]  # as the client sent them
            fmt = tool_format(self.llm.chat_template)
            named = req.tool_choice.function.name if hasattr(req.tool_choice, "function") else None
            if req.tool_choice == "required" or named:
                if "response_format" in options:
                    raise RequestError("a forced tool call and response_format cannot be combined",
                                       param="response_format")
                options["grammar"] = forced_call_grammar(fmt, tools, named, req.parallel_tool_calls,
                                                         self.llm.tokenizer)
        prompt = self.llm.chat_prompt_ids(messages, tools=tools)
        return _Plan(True, [prompt], [""], req.n, options, req.top_count, fmt)

    # -- plan + generated text -> choices -------------------------------------------------------
    async def _choice(self, plan: _Plan, index: int, text: str, tokens: list, stream) -> dict:
        tokenizer = self.llm.tokenizer
        finish = stream.stats.finish_reason
        if plan.chat:
            calls = []
            if plan.tools is not None:
                full = tokenizer.decode([t.id for t in tokens], skip_special_tokens=False)
                content, calls = plan.tools.parse(full)
                if calls:
                    text, finish = content, "tool_calls"
            logprobs = responses.chat_logprobs(tokenizer, tokens) if plan.logprobs is not None else None
            return responses.chat_choice(index, text if text or not calls else None, finish, logprobs, calls)
        echo = plan.echo[index // plan.n]
        logprobs = None
        if plan.logprobs is not None:
            before = await self._echo_logprobs(plan, index) if echo else None
            logprobs = responses.merge_completion_logprobs(
                before, responses.completion_logprobs(tokenizer, tokens, len(echo)))
        return responses.completion_choice(index, echo + text, finish, logprobs)

    async def _echo_logprobs(self, plan: _Plan, index: int) -> dict:
        """The echoed prompt's tokens with their log-probabilities (the first has none)."""
        from .llm import TokenLogprob
        from .sampling import log_softmax

        ids = plan.prompts[index // plan.n]
        logp = log_softmax(await asyncio.to_thread(self.llm.logits, ids))
        top = plan.logprobs
        tokens = [TokenLogprob(ids[0])]
        for k in range(1, len(ids)):
            row = logp[k - 1]
            best = row.argsort()[::-1][:top] if top else []
            tokens.append(TokenLogprob(ids[k], float(row[ids[k]]), [(int(i), float(row[i])) for i in best]))
        return responses.completion_logprobs(self.llm.tokenizer, tokens)

    def _usage(self, plan: _Plan, streams) -> dict:
        return responses.usage(sum(len(p) for p in plan.prompts), sum(s.stats.generated_tokens for s in streams))

    def _log(self, request, plan: _Plan, streams, started: float) -> None:
        generated = sum(s.stats.generated_tokens for s in streams)
        decode = sum(s.stats.decode_seconds for s in streams)
        rate = max(0, generated - len(streams)) / decode if decode > 0 else 0.0
        finish = ",".join(sorted({s.stats.finish_reason for s in streams}))
        log.info("%s %s: %d choice(s), %d prompt + %d generated tokens, %.1f t/s decode, %.2f s, %s",
                 request.method, request.url.path, len(streams), sum(len(p) for p in plan.prompts), generated,
                 rate, time.perf_counter() - started, finish)

    # -- streaming ------------------------------------------------------------------------------
    async def _events(self, plan: _Plan, streams, request, head: dict, include_usage: bool,
                      started: float) -> AsyncIterator[str]:
        from .tool_calls import ToolCallStream

        chunk_kind = {**head, "object": "chat.completion.chunk" if plan.chat else "text_completion"}
        tokenizer = self.llm.tokenizer

        def chunk(choice, usage=None):
            obj = {**chunk_kind, "choices": [choice] if choice else []}
            if include_usage:
                obj["usage"] = usage
            return _sse(obj)

        def logprobs(tokens, offset=0):
            if plan.logprobs is None:
                return None
            if plan.chat:
                return responses.chat_logprobs(tokenizer, tokens)
            return responses.completion_logprobs(tokenizer, tokens, offset)

        for index, stream in enumerate(streams):
            tools = ToolCallStream(plan.tools) if plan.chat and plan.tools is not None else None
            all_tokens, sent = [], 0
            if plan.chat:
                yield chunk(responses.chat_delta(index, role=True))
            else:
                echo = plan.echo[index // plan.n]
                if echo:
                    before = await self._echo_logprobs(plan, index) if plan.logprobs is not None else None
                    yield chunk(responses.completion_delta(index, echo, logprobs=before))
                    sent = len(echo)
            pieces = self._pieces(_Tokens(stream), request)
            waiting: list = []  # tokens of text held back as a possible tool call
            try:
                async for piece, tokens in pieces:
                    all_tokens += tokens
                    if tools is not None:
                        piece = tools.feed(piece)
                        if not piece:
                            waiting += tokens
                            continue
                        tokens, waiting = waiting + tokens, []
                    if plan.chat:
                        yield chunk(responses.chat_delta(index, piece, logprobs=logprobs(tokens)))
                    else:
                        yield chunk(responses.completion_delta(index, piece, logprobs=logprobs(tokens, sent)))
                        sent += len(piece)
            finally:
                await pieces.aclose()  # now, not when garbage collected: a client that left cancels its generation
            if stream.stats.finish_reason == "cancelled":
                return
            rest = stream.take_tokens()
            all_tokens += rest
            rest = waiting + rest
            finish = stream.stats.finish_reason
            if tools is not None:
                full = tokenizer.decode([t.id for t in all_tokens], skip_special_tokens=False)
                content, calls = tools.finish(full)
                if content:
                    yield chunk(responses.chat_delta(index, content))
                if calls:
                    yield chunk(responses.chat_delta(index, tool_calls=calls))
                    finish = "tool_calls"
                yield chunk(responses.chat_delta(index, finish_reason=finish, logprobs=logprobs(rest)))
            elif plan.chat:
                yield chunk(responses.chat_delta(index, finish_reason=finish, logprobs=logprobs(rest)))
            else:
                yield chunk(responses.completion_delta(index, finish_reason=finish, logprobs=logprobs(rest, sent)))
        if include_usage:
            yield chunk(None, self._usage(plan, streams))
        self._log(request, plan, streams, started)
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


async def _json_body(request: "Request"):
    """The parsed JSON body, or the error response to return."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error("the request body is not valid JSON")


def _with_access_rules(app, api_key: str | None, cors_origins: list[str]):
    """app behind the API key check (every path but /health) and, outermost, CORS."""
    if api_key:
        app = _ApiKey(app, api_key)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["*"])
    return app


class _ApiKey:
    """ASGI middleware: requests without "Authorization: Bearer <key>" get 401 (compared in
    constant time); /health stays open for load balancers."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = JSONResponse({"error": {"message": "a valid API key is required (Authorization: Bearer "
                                                   "<key>)", "type": "invalid_request_error", "param": None,
                                                   "code": "invalid_api_key"}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, max_queue: int = 64,
          log_level: str = "info", defaults: dict | None = None, api_key: str | None = None,
          cors_origins: list[str] | tuple = ()) -> None:
    """Serves llm until interrupted; prints a start-up line (model, context, threads, device) and
    logs one line per request."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(MISSING) from None
    import os
    import sys

    name = model_name or os.path.splitext(os.path.basename(llm.path))[0]
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.info("pyllm serve: http://%s:%d/v1 (OpenAI-compatible; Ctrl-C stops): model %s (%s), context %d tokens, "
             "%d threads on %s%s", host, port, name, llm.path, llm.context_length, llm.n_threads, llm.device,
             ", API key required" if api_key else "")
    app = Server(llm, name, max_queue, defaults, api_key, cors_origins).app()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
