"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) on the continuous-batching engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from .engine import Engine, Event, QueueFull, Request, SamplingParams

log = logging.getLogger("stablelm.server")
MAX_BODY_BYTES = 1 << 20


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    model_config = {"extra": "ignore"}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_context: int | None = None):
    """The FastAPI app; its engine starts with it and stops on shutdown."""
    from contextlib import asynccontextmanager

    from .metrics import Metrics

    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    engine.on_step = metrics.observe_engine

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.shutdown()

    app = FastAPI(title="stablelm", lifespan=lifespan)
    app.state.engine = engine

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        started = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            response = error(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif api_key and request.url.path.startswith("/v1/") and not _authorized(request, api_key):
            response = error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # a bug must not take the server down
                log.exception("unhandled error")
                response = error(500, f"internal error: {e}", kind="server_error")
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        log.info("%s %s %s %.1fms", request.method, request.url.path, response.status_code,
                 (time.perf_counter() - started) * 1000)
        return response

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error(exc.status, exc.message, exc.param, exc.kind)

    async def parse(request: HTTPRequest, schema: type[BaseModel]):
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param) from None
        if parsed.model not in (None, model_name):
            raise APIError(400, f"unknown model {parsed.model!r}; this server serves {model_name!r}", "model")
        return parsed

    @app.get("/health")
    async def health():
        return {"status": "ok", "batch_size": engine.batch_size, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "stablelm"}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        encoded = [tokenizer.encode(p) for p in prompts]
        params = _params(body, body.max_tokens, body.logprobs)
        return await run(request, "text_completion", encoded, params, body, prompts)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatRequest)
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump() for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, limit, top)
        return await run(request, "chat.completion", [ids], params, body, None)

    def _params(body, max_tokens, logprobs) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens if max_tokens is not None else engine.context,
                              temperature=body.temperature, top_p=body.top_p, n=body.n, stop=body.stop or [],
                              seed=body.seed, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logprobs=logprobs)

    async def run(http: HTTPRequest, kind: str, encoded: list[list[int]], params: SamplingParams, body, prompts):
        for ids in encoded:
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt" if prompts else "messages")
            if len(ids) >= engine.context:
                raise APIError(400, f"the prompt has {len(ids)} tokens; the context is {engine.context}",
                               "prompt" if prompts else "messages")
        if params.n * len(encoded) > engine.max_batch:
            raise APIError(400, f"n x prompts = {params.n * len(encoded)} exceeds the batch size {engine.max_batch}",
                           "n")
        loop = asyncio.get_running_loop()
        queues = []
        requests = []
        for i, ids in enumerate(encoded):
            events: asyncio.Queue = asyncio.Queue()
            req = Request(ids, params, lambda e, q=events: loop.call_soon_threadsafe(q.put_nowait, e))
            queues.append(events)
            requests.append(req)
        try:
            for req in requests:
                engine.submit(req)
        except QueueFull as e:
            for req in requests:
                req.cancel()
            raise APIError(429, str(e), kind="rate_limit_error") from None
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = model_name
        prompt_tokens = sum(len(ids) for ids in encoded)
        metrics.prompt_tokens.inc(prompt_tokens)

        def choice_index(p: int, e: Event) -> int:
            return p * params.n + e.index

        async def events_of_all():
            """(prompt index, event) until every sequence of every prompt has finished."""
            pending = {p: params.n for p in range(len(queues))}
            getters = {p: asyncio.ensure_future(q.get()) for p, q in enumerate(queues)}
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
                                getters[p] = asyncio.ensure_future(queues[p].get())
                            else:
                                del getters[p]
            finally:
                for task in getters.values():
                    task.cancel()

        def observe(first_at: list, started: float):
            if not first_at:
                first_at.append(time.perf_counter())
                metrics.ttft.observe(first_at[0] - started)

        started = time.perf_counter()
        if body.stream:
            async def stream():
                first_at: list = []
                try:
                    if kind == "chat.completion":
                        for i in range(params.n):
                            yield _sse(_chunk(rid, created, name, kind, i, {"role": "assistant", "content": ""}))
                    async for p, event in events_of_all():
                        observe(first_at, started)
                        if event.finish_reason == "error":
                            yield _sse({"error": {"message": event.text, "type": "server_error"}})
                            continue
                        if event.finish_reason:
                            metrics.completion_tokens.inc(event.completion_tokens)
                        delta = {"content": event.text} if kind == "chat.completion" else event.text
                        if event.text or event.token_logprobs or event.finish_reason:
                            yield _sse(_chunk(rid, created, name, kind, choice_index(p, event), delta,
                                              event.finish_reason, _logprobs(kind, event, tokenizer)))
                    yield "data: [DONE]\n\n"
                finally:
                    for req in requests:
                        req.cancel()  # a client that went away stops its generation
                    metrics.latency.observe(time.perf_counter() - started)

            return StreamingResponse(stream(), media_type="text/event-stream")

        texts = {}
        reasons = {}
        lps: dict[int, list] = {}
        completion_tokens = 0
        first_at: list = []
        async for p, event in events_of_all():
            observe(first_at, started)
            i = choice_index(p, event)
            if event.finish_reason == "error":
                raise APIError(500, event.text, kind="server_error")
            texts[i] = texts.get(i, "") + event.text
            lps.setdefault(i, []).extend(event.token_logprobs)
            if event.finish_reason:
                reasons[i] = event.finish_reason
                completion_tokens += event.completion_tokens
        metrics.completion_tokens.inc(completion_tokens)
        metrics.latency.observe(time.perf_counter() - started)
        choices = []
        for i in sorted(texts):
            fake = Event(i, texts[i], lps[i])
            if kind == "text_completion":
                text = (prompts[i // params.n] + texts[i]) if body.echo else texts[i]
                choices.append({"index": i, "text": text, "logprobs": _logprobs(kind, fake, tokenizer),
                                "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": _logprobs(kind, fake, tokenizer), "finish_reason": reasons[i]})
        return {"id": rid, "object": kind, "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def _authorized(request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), api_key.encode())


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk(rid, created, name, kind, index, delta, finish_reason=None, logprobs=None) -> dict:
    if kind == "chat.completion":
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


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


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, dtype: str = "auto",
          quantization: str | None = None, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
          model_name: str | None = None) -> None:
    """Load the model and run the server until interrupted."""
    import uvicorn

    from .auto import AutoModelForCausalLM, AutoTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization=quantization)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    app = create_app(model, tokenizer, model_name or str(model_path), api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, max_context=max_context)
    uvicorn.run(app, host=host, port=port, log_level="warning")
