"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) on the continuous-batching engine.

Layers, outside in: `GuardedH11` (uvicorn's HTTP/1.1 protocol with a header deadline and a connection
cap), `guard` (Host, API key, content type, metrics, one error shape), the routes (parse -> tokenize
off the event loop -> `generate`), and the engine thread. Every client mistake is a 4xx in OpenAI's
error shape; a failure inside one request ends that request alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, Field, ValidationError, field_validator
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..generation.sampling import MAX_SEED, MIN_TEMPERATURE
from .engine import Engine, Event, QueueFull, Request, SamplingParams

log = logging.getLogger("stablelm.server")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Limits:
    """What one client may cost the server."""

    max_body_bytes: int = 1 << 20
    request_timeout: float = 10.0  # seconds to send the request headers, and again the body
    max_connections: int = 256  # open connections; more are closed at once
    disconnect_poll: float = 0.25  # seconds between checks that a non-streaming client is still there
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # Host header names; () = any


# -- request schemas ---------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # Extensions that vLLM and llama.cpp's server accept too.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    # vLLM's: requests share cached prompt blocks only with requests of the same salt (and API key).
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)

    model_config = {"extra": "ignore"}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


# -- the app -----------------------------------------------------------------------------------
class Service:
    """What the routes share: the engine, the tokenizer, the metrics and the limits."""

    def __init__(self, tokenizer, model_name: str, api_key: str | list[str] | None, limits: Limits, engine: Engine):
        from .metrics import Metrics

        self.tokenizer, self.model_name, self.limits = tokenizer, model_name, limits
        self.api_keys = tuple([api_key] if isinstance(api_key, str) else api_key or ())
        if not all(isinstance(k, str) and k and k.isprintable() for k in self.api_keys):
            raise ValueError("an API key must be a non-empty line of printable characters")
        self.engine = engine
        self.metrics = Metrics()
        engine.on_step = self.metrics.observe_engine


def create_app(model, tokenizer, model_name: str, api_key: str | list[str] | None = None, max_batch: int = 8,
               max_queue: int = 64, max_context: int | None = None, kv_cache_memory: int | None = None,
               limits: Limits | None = None, prefill_chunk: int | str | None = "auto", prefix_caching: bool = True):
    """The FastAPI app; its engine starts with it and stops (ending every open request) on shutdown.

    api_key: one key or several; each key is a party with a prefix cache of its own."""
    from contextlib import asynccontextmanager

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                    kv_cache_memory=kv_cache_memory, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching)
    service = Service(tokenizer, model_name, api_key, limits or Limits(), engine)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.shutdown()

    # The interactive docs load scripts from a CDN: off. The schema stays (behind the key, if any).
    app = FastAPI(title="stablelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service, app.state.engine = service, engine
    _add_guard(app, service)
    _add_routes(app, service)
    _publish_request_schemas(app, (CompletionRequest, ChatRequest))
    return app


def _add_guard(app: FastAPI, service: Service) -> None:
    app.add_middleware(Guard, service=service, routes=app.router)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)


class Guard:
    """Plain ASGI middleware (not BaseHTTPMiddleware, whose receive hides client disconnects): refuses what
    `_refuse` refuses, turns an unhandled error into a JSON 500, and counts and logs every request."""

    def __init__(self, app, service: Service, routes):
        self.app, self.service, self.routes = app, service, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request = HTTPRequest(scope)
        status = {"code": 500, "sent": False}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        # who sends it, once: the guard checks the key, the routes pick the prefix-cache namespace
        scope.setdefault("state", {})["party"] = _party(request, self.service)
        refusal = _refuse(request, self.service)
        try:
            await (refusal or self.app)(scope, receive, send_and_note)
        except Exception as e:  # a bug must not take the server down
            log.exception("unhandled error")
            if not status["sent"]:
                await error_response(500, f"internal error: {type(e).__name__}", kind="server_error")(
                    scope, receive, send_and_note)
        self.service.metrics.requests.labels(_route_label(self.routes, scope), str(status["code"])).inc()
        log.info("%s %s %s %.1fms", request.method, request.url.path, status["code"],
                 (time.perf_counter() - started) * 1000)


def _refuse(request: HTTPRequest, service: Service):
    """The response that refuses `request` before any route runs, or None."""
    limits = service.limits
    host = _host_name(request.headers.get("host", ""))
    if limits.allowed_hosts and host not in limits.allowed_hosts:
        return error_response(421, f"Host {host!r} is not served here (a web page cannot drive this server; "
                                   "add names with --allowed-host)", kind="invalid_request_error")
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
        return error_response(413, f"request body over {limits.max_body_bytes} bytes")
    public = request.url.path == "/health"
    if not public and request.scope["state"]["party"] is None:
        return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                              kind="authentication_error")
    if request.method == "POST":
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error_response(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    return None


def _add_routes(app: FastAPI, service: Service) -> None:
    engine, tokenizer = service.engine, service.tokenizer

    @app.get("/health")
    async def health():
        return {"status": "ok", "batch_size": engine.batch_size, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "stablelm"}]}

    @app.post("/v1/completions", openapi_extra=_request_body(CompletionRequest))
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionRequest, service)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        encoded = await asyncio.to_thread(lambda: [tokenizer.encode(p) for p in prompts])
        return await generate(request, service, "text_completion", encoded, _params(body, body.max_tokens,
                                                                                       body.logprobs), body, prompts)

    @app.post("/v1/chat/completions", openapi_extra=_request_body(ChatRequest))
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatRequest, service)
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                          return_dict=False)
        except TemplateError as e:  # the template refused this conversation (e.g. the order of roles)
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await generate(request, service, "chat.completion", [ids], _params(body, limit, top), body, None)

    def _params(body, max_tokens, logprobs) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens if max_tokens is not None else engine.context,
                              temperature=body.temperature, top_p=body.top_p, n=body.n, stop=body.stop or [],
                              seed=body.seed, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logprobs=logprobs, top_k=body.top_k,
                              min_p=body.min_p, repetition_penalty=body.repetition_penalty)


def _request_body(schema: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of a route that parses its body itself (to bound its size and time)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}}


def _publish_request_schemas(app: FastAPI, schemas: tuple[type[BaseModel], ...]) -> None:
    """Put the request models (and what they refer to) in the OpenAPI document's components, so clients and
    schema-driven fuzzers see the bodies the routes accept."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


# -- reading a request ---------------------------------------------------------------------------
async def read_body(request: HTTPRequest, limits: Limits) -> bytes:
    """The body, counted as it arrives (chunked bodies too): 413 past the limit, 408 if it is too slow."""
    chunks, size = [], 0

    async def receive():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), limits.request_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body took longer than {limits.request_timeout:g} s") from None
    return b"".join(chunks)


async def parse(request: HTTPRequest, schema: type[BaseModel], service: Service):
    body = await read_body(request, service.limits)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # incl. over-long integers and nesting too deep to parse
        raise APIError(400, f"invalid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds a string that is not valid Unicode (a lone surrogate such as "
                            "\\ud800)") from None
    try:
        parsed = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}", param) from None
    if parsed.model not in (None, service.model_name):
        raise APIError(400, f"unknown model {parsed.model!r}; this server serves {service.model_name!r}", "model")
    return parsed


# -- running a request ---------------------------------------------------------------------------
async def generate(http: HTTPRequest, service: Service, kind: str, encoded: list[list[int]],
                   params: SamplingParams, body, prompts):
    engine, metrics = service.engine, service.metrics
    param = "prompt" if prompts else "messages"
    for ids in encoded:
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if len(ids) >= engine.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context is {engine.context}", param)
    if params.n * len(encoded) > engine.max_batch:
        raise APIError(400, f"n x prompts = {params.n * len(encoded)} exceeds the batch size {engine.max_batch}",
                       "n")
    call = _Call(kind, service.model_name, params, encoded)
    loop = asyncio.get_running_loop()
    namespace = cache_namespace(http.scope["state"]["party"], body.cache_salt)
    for ids, events in zip(encoded, call.queues):
        call.requests.append(Request(ids, params, lambda e, q=events: loop.call_soon_threadsafe(q.put_nowait, e),
                                     namespace))
    try:
        for req in call.requests:
            engine.submit(req)
    except QueueFull as e:
        call.cancel()
        raise APIError(429, str(e), kind="rate_limit_error") from None
    except ValueError as e:
        call.cancel()
        raise APIError(400, str(e)) from None
    metrics.prompt_tokens.inc(call.prompt_tokens)
    if body.stream:
        return StreamingResponse(_stream(call, service), media_type="text/event-stream")
    return await _complete(http, call, service, body, prompts)


class _Call:
    """One HTTP request's engine requests (a prompt each) and their event queues."""

    def __init__(self, kind: str, model_name: str, params: SamplingParams, encoded: list[list[int]]):
        self.kind, self.model_name, self.params = kind, model_name, params
        self.queues = [asyncio.Queue() for _ in encoded]
        self.requests: list[Request] = []
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = sum(len(ids) for ids in encoded)
        self.started = time.perf_counter()
        self.first_at: float | None = None

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()

    def choice(self, prompt: int, event: Event) -> int:
        return prompt * self.params.n + event.index

    def chunk(self, index: int, delta, finish_reason=None, logprobs=None) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_name, "choices": [choice]}
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": [choice]}

    async def events(self):
        """(prompt index, event) until every sequence of every prompt has finished."""
        pending = {p: self.params.n for p in range(len(self.queues))}
        getters = {p: asyncio.ensure_future(q.get()) for p, q in enumerate(self.queues)}
        try:
            while getters:
                done, _ = await asyncio.wait(getters.values(), return_when=asyncio.FIRST_COMPLETED)
                for p, task in list(getters.items()):
                    if task in done:
                        event = task.result()
                        yield p, event
                        if event.finish_reason is not None:
                            pending[p] -= 1
                        if pending[p]:
                            getters[p] = asyncio.ensure_future(self.queues[p].get())
                        else:
                            del getters[p]
        finally:
            for task in getters.values():
                task.cancel()

    def observe_first(self, metrics) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            metrics.ttft.observe(self.first_at - self.started)


async def _stream(call: _Call, service: Service):
    metrics, tokenizer = service.metrics, service.tokenizer
    finished = False
    try:
        if call.kind == "chat.completion":
            for i in range(call.params.n):
                yield _sse(call.chunk(i, {"role": "assistant", "content": ""}))
        async for p, event in call.events():
            call.observe_first(metrics)
            if event.finish_reason == "error":
                yield _sse({"error": {"message": event.text, "type": "server_error"}})
                continue
            if event.finish_reason:
                metrics.completion_tokens.inc(event.completion_tokens)
            delta = {"content": event.text} if call.kind == "chat.completion" else event.text
            if event.text or event.token_logprobs or event.finish_reason:
                yield _sse(call.chunk(call.choice(p, event), delta, event.finish_reason,
                                      _logprobs(call.kind, event, tokenizer)))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        call.cancel()  # a client that went away stops its generation
        if not finished:
            metrics.cancelled.inc()
        metrics.latency.observe(time.perf_counter() - call.started)


async def _complete(http: HTTPRequest, call: _Call, service: Service, body, prompts):
    """Collect every event, then answer; a client that goes away meanwhile cancels the generation."""
    collect = asyncio.ensure_future(_collect(call, service))
    watcher = asyncio.ensure_future(_wait_for_disconnect(http, service.limits.disconnect_poll))
    try:
        done, _ = await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        call.cancel()  # no-op for finished sequences
    if collect not in done:
        collect.cancel()
        service.metrics.cancelled.inc()
        log.info("client of %s went away; generation cancelled", call.id)
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    texts, reasons, lps, completion_tokens = collect.result()
    service.metrics.completion_tokens.inc(completion_tokens)
    service.metrics.latency.observe(time.perf_counter() - call.started)
    choices = []
    for i in sorted(texts):
        fake = Event(i, texts[i], lps[i])
        logprobs = _logprobs(call.kind, fake, service.tokenizer)
        if call.kind == "text_completion":
            text = (prompts[i // call.params.n] + texts[i]) if body.echo else texts[i]
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reasons[i]})
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": logprobs, "finish_reason": reasons[i]})
    usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": call.prompt_tokens + completion_tokens}
    return {"id": call.id, "object": call.kind, "created": call.created, "model": call.model_name,
            "choices": choices, "usage": usage}


async def _collect(call: _Call, service: Service):
    """(texts, finish reasons, logprobs, completion tokens) of every choice, once all have finished."""
    texts, reasons, lps, completion_tokens = {}, {}, {}, 0
    async for p, event in call.events():
        call.observe_first(service.metrics)
        i = call.choice(p, event)
        if event.finish_reason == "error":
            raise APIError(500, event.text, kind="server_error")
        texts[i] = texts.get(i, "") + event.text
        lps.setdefault(i, []).extend(event.token_logprobs)
        if event.finish_reason:
            reasons[i] = event.finish_reason
            completion_tokens += event.completion_tokens
    return texts, reasons, lps, completion_tokens


async def _wait_for_disconnect(http: HTTPRequest, every: float) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(every)


# -- helpers -------------------------------------------------------------------------------------
def _route_label(router, scope) -> str:
    """The route template a request matched ("/v1/completions"), or "unmatched": metric labels stay bounded."""
    from starlette.routing import Match

    route = scope.get("route")
    if route is None:  # refused before routing: find the route it was meant for
        route = next((r for r in router.routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", "unmatched")


def _party(request, service: Service) -> bytes | None:
    """Who sends `request`: the digest of its API key (b"" when the server has none), None for a wrong key.
    Every key is compared, so the time taken does not say which one matched."""
    if not service.api_keys:
        return b""
    header = request.headers.get("authorization", "")
    token = (header[7:] if header.lower().startswith("bearer ") else "").encode()
    matched = [key for key in service.api_keys if hmac.compare_digest(token, key.encode())]
    return hashlib.blake2b(matched[0].encode(), digest_size=16).digest() if matched else None


def cache_namespace(party: bytes, salt: str | None) -> bytes:
    """The prefix-cache namespace of a request: its party's, and within it its cache_salt's (vLLM's field)."""
    if salt is None:
        return party
    return party + b"\0salt\0" + salt.encode()


def _host_name(host: str) -> str:
    """The name in a Host header, without the port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _logprobs(kind: str, event: Event, tokenizer):
    """OpenAI's logprobs objects: completions (parallel lists) or chat (content entries)."""
    if not event.token_logprobs:
        return None
    tokens = [tokenizer.decode([e["token_id"]]) for e in event.token_logprobs]
    if kind == "text_completion":
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in event.token_logprobs],
                "top_logprobs": [_first_per_text(tokenizer, e["top"]) for e in event.token_logprobs],
                "text_offset": []}
    return {"content": [{"token": tok, "logprob": e["logprob"], "bytes": list(tok.encode("utf-8")),
                         "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v,
                                           "bytes": list(tokenizer.decode([t]).encode("utf-8"))} for t, v in e["top"]]}
                        for tok, e in zip(tokens, event.token_logprobs)]}


def _first_per_text(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob}; tokens that decode alike keep the likeliest one's value."""
    out: dict[str, float] = {}
    for token_id, value in top:
        out.setdefault(tokenizer.decode([token_id]), value)
    return out


# -- the process ---------------------------------------------------------------------------------
class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus: request headers must arrive within `header_timeout` seconds of
    the connection (or of the previous response), and past `max_connections` open connections the oldest
    one without a request in flight is closed (a slowloris cannot crowd out real clients)."""

    header_timeout = 10.0
    max_connections = 256

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = None
        self.opened = time.monotonic()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections if c is not self and c._waiting_for_request()]
            victim = min(idle, key=lambda c: c.opened) if idle else self
            log.warning("%d connections open (limit %d): closing %s", len(self.connections), self.max_connections,
                        "the oldest idle one" if idle else "the new one")
            victim.transport.close()
            if victim is self:
                return
        self._arm()

    def _waiting_for_request(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        if self._waiting_for_request():
            self.transport.close()  # no complete request head in time (slowloris)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)


def allowed_hosts(host: str, extra: list[str] | None) -> tuple[str, ...]:
    """Host names to accept: bound to a loopback address, only loopback names (DNS rebinding); else any,
    unless names are given."""
    names = tuple(h.lower() for h in extra or ())
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if loopback:
        return LOOPBACK_NAMES + names
    return names


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, api_key: str | list[str] | None = None, dtype: str = "auto",
          quantization: str | None = None, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
          model_name: str | None = None, kv_cache_memory: int | None = None, prefill_chunk: int | str | None = "auto",
          prefix_caching: bool = True, request_timeout: float = 10.0,
          allowed_host: list[str] | None = None, max_connections: int = 256, adapter: str | None = None,
          tp: int | None = None) -> None:
    """Load the model and run the server until interrupted (SIGINT / SIGTERM).

    tp: split the model over this many processes (started here, or by torchrun); rank 0 serves HTTP and the
    others follow its engine."""
    import uvicorn

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..models import parallel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if tp is not None and tp > 1 and parallel.world_from_environment() == 1:
        _listen(host, port).close()  # a port in use is an error now, not in one of the processes
        parallel.check_before_launch(model_path, tp)
        options = dict(host=host, port=port, api_key=api_key, dtype=dtype, quantization=quantization,
                       max_batch=max_batch, max_queue=max_queue, max_context=max_context, model_name=model_name,
                       kv_cache_memory=kv_cache_memory, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching,
                       request_timeout=request_timeout, allowed_host=allowed_host,
                       max_connections=max_connections, adapter=adapter, tp=tp)
        parallel.launch(tp, serve, model_path, **options)
        return
    leader = int(os.environ.get("RANK", "0")) == 0
    # Take the port first: a port in use is a one-line error before minutes of loading.
    sock = _listen(host, port) if leader else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization=quantization, adapter=adapter,
                                                 tp="auto" if tp is not None else None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not leader:  # rank 0 says when to stop (a Ctrl-C reaches every process of the terminal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
               kv_cache_memory=kv_cache_memory, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching).follow()
        return
    limits = Limits(request_timeout=request_timeout, max_connections=max_connections,
                    allowed_hosts=allowed_hosts(host, allowed_host))
    app = create_app(model, tokenizer, model_name or str(model_path), api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, max_context=max_context, kv_cache_memory=kv_cache_memory, limits=limits,
                     prefill_chunk=prefill_chunk, prefix_caching=prefix_caching)
    engine = app.state.engine
    protocol = type("Guarded", (GuardedH11,), {"header_timeout": request_timeout, "max_connections": max_connections})
    shown = f"[{host}]" if ":" in host else host
    log.info("KV cache: %d blocks of %d tokens (budget %.2f GiB), up to %d sequences of up to %d tokens",
             engine.pool.num_blocks, engine.pool.block_size, engine.kv_cache_memory / 2**30, max_batch, engine.context)
    config = uvicorn.Config(app, log_level="warning", http=protocol, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    engine.on_failure = lambda why: setattr(server, "should_exit", True)  # a lost rank: exit, not 429 forever
    sock.listen(2048)  # connections from now on wait in the backlog until uvicorn accepts them
    print(f"stablelm serve: ready on http://{shown}:{port}/v1 (model {model_name or model_path})", flush=True)
    server.run(sockets=[sock])
    if engine.failure:
        raise RuntimeError(f"the server stopped: {engine.failure}")


def _listen(host: str, port: int):
    """A socket bound to host:port, or an OSError that says why not."""
    import socket

    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on accepted connections (else Nagle adds 40 ms a reply).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                      f"{' (another server is using the port? pick one with --port)' if e.errno == 98 else ''}") \
            from None
    return sock
