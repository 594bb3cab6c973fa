"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`, `/metrics`.

Request bodies are validated into pydantic models; anything wrong is a 4xx in OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, naming the parameter. Defaults are OpenAI's (temperature 1,
top_p 1); `top_k`, `min_p` and `repetition_penalty` are extensions, off unless given.
"""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from camelid.checkpoint import LoadedModel
from camelid.errors import CamelidError
from camelid.generate import SamplingParams
from camelid.serve.engine import Engine, GenerationParams, Job, Piece, QueueFull, TokenLogprob

MAX_STOP = 4  # as OpenAI
MAX_N = 8
MAX_TOP_LOGPROBS = 20


@dataclass
class ServedModel:
    """A model the server answers for under `name`: its weights, tokenizer, chat template and engine."""

    name: str
    loaded: LoadedModel
    engine: Engine
    template: Any  # a camelid.chat_template.ChatTemplate, or None when the model has none
    created: int


@dataclass
class ServerLimits:
    max_tokens: int = 4096  # the most any request may ask for
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ------------------------------------------------------------------------------------------------

Float = Annotated[float, Field(allow_inf_nan=False)]


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0, le=2)
    top_p: Float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1 disables
    min_p: Float = Field(0.0, ge=0, le=1)  # extension
    repetition_penalty: Float = Field(1.0, gt=0, le=10)  # extension
    ignore_eos: bool = False  # extension (benchmarks)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's optional parameters may be sent as null (the openai client does): null means the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in ("model", "messages", "prompt")}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's completions default
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream_options: StreamOptions | None = None


# -- the app -------------------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("camelid_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("camelid_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("camelid_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.queue = Gauge("camelid_queue_depth", "Requests waiting for a batch row", ["model"], registry=r)
        self.running = Gauge("camelid_running_sequences", "Batch rows in use", ["model"], registry=r)
        self.latency = Histogram("camelid_request_seconds", "Time from request to last token", ["endpoint"],
                                 registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))


def create_app(models: list[ServedModel], *, api_key: str | None = None, limits: ServerLimits | None = None,
               votes=None) -> FastAPI:
    """The FastAPI app serving `models` (the first is the pages' default); arena votes are appended to `votes`."""
    from camelid.serve.pages import add_pages

    limits = limits or ServerLimits()
    by_name = {m.name: m for m in models}
    metrics = _Metrics()
    app = FastAPI(title="camelid", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = by_name
    app.state.limits = limits
    app.state.metrics = metrics

    # -- errors, size and key ----------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = explain_validation(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    def refusal(scope) -> JSONResponse | None:
        """401 for a missing or wrong key where one is needed, 413 for a declared body over the limit."""
        request = Request(scope)
        if request.url.path.startswith(KEYED_PATHS) and api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return JSONResponse(error_body(f"the body is over {limits.max_body_bytes} bytes",
                                           "invalid_request_error", code="request_too_large"), status_code=413)
        return None

    def guard(inner):
        """Plain ASGI around the app (not BaseHTTPMiddleware, which hides a client's disconnect from handlers):
        refuses early, and counts every answer by endpoint and status."""

        async def app_with_guard(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            endpoint = _endpoint(scope["path"])
            if (response := refusal(scope)) is not None:
                metrics.requests.labels(endpoint, str(response.status_code)).inc()
                return await response(scope, receive, send)

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    metrics.requests.labels(endpoint, str(message["status"])).inc()
                await send(message)

            await inner(scope, receive, counting_send)

        return app_with_guard

    app.add_middleware(lambda inner: guard(inner))

    def _model(name: str) -> ServedModel:
        served = by_name.get(name)
        if served is None:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists the models",
                           param="model", code="model_not_found", type="not_found_error")
        return served

    # -- routes ------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(by_name)}

    @app.get("/metrics")
    async def prometheus():
        for m in models:
            metrics.queue.labels(m.name).set(m.engine.queue_depth)
            metrics.running.labels(m.name).set(m.engine.rows_in_use)
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_card(_model(name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest, limits)
        served = _model(body.model)
        if served.template is None:
            raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions", param="model")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if sum(len(m["content"]) for m in messages) > limits.max_prompt_chars:
            raise APIError(413, f"the messages are over {limits.max_prompt_chars} characters", param="messages")
        try:
            text = served.template.render(messages, add_generation_prompt=True)
        except CamelidError as exc:
            raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from None
        prompt = served.loaded.tokenizer.encode(text, add_special=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        limit_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = _generation(body, max_tokens, 0 if body.logprobs and top is None else top, served, len(prompt),
                             limit_param)
        job = _submit(served, prompt, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse_response(_chat_chunks(served, job, body, include_usage), job)
        return await _chat_response(served, job, body, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest, limits)
        served = _model(body.model)
        prompts = _prompts(body.prompt, served)
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request (a string or a list of token ids)", param="prompt")
        prompt = prompts[0]
        if body.echo and (body.stream or body.logprobs is not None):
            raise APIError(400, "echo is not supported with stream or logprobs", param="echo")
        params = _generation(body, body.max_tokens, body.logprobs, served, len(prompt))
        job = _submit(served, prompt, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse_response(_completion_chunks(served, job, body, include_usage), job)
        return await _completion_response(served, job, body, request)

    def _submit(served: ServedModel, prompt: list[int], params: GenerationParams) -> Job:
        job = submit(served, prompt, params)
        metrics.prompt_tokens.labels(served.name).inc(len(prompt))
        return job

    def _generation(body: _Sampling, max_tokens: int | None, logprobs: int | None, served: ServedModel,
                    prompt_len: int, limit_param: str = "max_tokens") -> GenerationParams:
        room = served.engine.context - prompt_len
        if body.n > served.engine.max_batch:
            raise APIError(400, f"n is {body.n}; this server runs at most {served.engine.max_batch} sequences at "
                           "once", param="n")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"{limit_param} is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param=limit_param)
        if room <= 0:
            where = "messages" if isinstance(body, ChatRequest) else "prompt"
            raise APIError(400, f"the prompt is {prompt_len} tokens but the context is {served.engine.context}; "
                           "shorten it", param=where, code="context_length_exceeded")
        wanted = min(max_tokens or limits.max_tokens, room)
        seed = None if body.seed is None else body.seed % 2**64
        try:
            sampling = SamplingParams(
                max_new_tokens=wanted, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=seed, stop=tuple(body.stop or ()),
                ignore_eos=body.ignore_eos,
            )
        except CamelidError as exc:
            raise APIError(400, str(exc)) from None
        return GenerationParams(sampling, body.presence_penalty, body.frequency_penalty, logprobs, body.n)

    def _prompts(prompt, served: ServedModel) -> list[list[int]]:
        vocab = served.loaded.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                if len(p) > limits.max_prompt_chars:
                    raise APIError(413, f"the prompt is over {limits.max_prompt_chars} characters", param="prompt")
                out.append(served.loaded.tokenizer.encode(p))
            else:
                if any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
                out.append(list(p))
        if not out or any(not p for p in out):
            raise APIError(400, "the prompt is empty", param="prompt")
        return out

    # -- answers -----------------------------------------------------------------------------------------------

    def _token_text(served: ServedModel, token: int) -> str:
        return served.loaded.tokenizer.decode([token])

    def _chat_logprobs(served: ServedModel, items: list[TokenLogprob]) -> dict:
        def entry(token: int, logprob: float) -> dict:
            raw = served.loaded.tokenizer.token_bytes(token)  # may be part of a character
            return {"token": _token_text(served, token), "logprob": logprob, "bytes": list(raw)}

        return {"content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in items
        ]}

    def _completion_logprobs(served: ServedModel, items: list[TokenLogprob], offset: int) -> dict:
        tokens, offsets = [], []
        for t in items:
            offsets.append(offset)
            text = _token_text(served, t.token_id)
            tokens.append(text)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{_token_text(served, i): lp for i, lp in t.top} for t in items],
            "text_offset": offsets,
        }

    async def _collect(job: Job, request: Request) -> list[dict]:
        """Wait for every choice to finish: [{text, logprobs, finish_reason, tokens}] by choice index. A client
        that goes away meanwhile is noticed within half a second and its rows freed."""
        choices = [{"text": "", "logprobs": [], "finish_reason": None, "tokens": 0} for _ in range(job.params.n)]
        look_again = time.monotonic() + 0.5
        try:
            while any(c["finish_reason"] is None for c in choices):
                try:
                    piece = await asyncio.wait_for(job.queue.get(), timeout=0.5)
                except TimeoutError:
                    piece = None
                if time.monotonic() >= look_again:
                    if await request.is_disconnected():
                        break
                    look_again = time.monotonic() + 0.5
                if piece is None:
                    continue
                _check_ended(piece)
                c = choices[piece.choice]
                c["text"] += piece.text
                c["logprobs"] += piece.logprobs
                c["finish_reason"], c["tokens"] = piece.finish_reason, piece.completion_tokens
        finally:
            job.cancel()  # a client gone mid-answer frees its rows
        return choices

    def _usage(job: Job, completion_tokens: int) -> dict:
        n = len(job.prompt)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def _finished(served: ServedModel, job: Job, endpoint: str, tokens: int) -> None:
        metrics.completion_tokens.labels(served.name).inc(tokens)
        metrics.latency.labels(endpoint).observe(time.monotonic() - job.submitted)

    async def _chat_response(served: ServedModel, job: Job, body: ChatRequest, request: Request) -> dict:
        choices = await _collect(job, request)
        tokens = sum(c["tokens"] for c in choices)
        _finished(served, job, "chat", tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "system_fingerprint": None,
            "choices": [{
                "index": i, "message": {"role": "assistant", "content": c["text"]},
                "logprobs": _chat_logprobs(served, c["logprobs"]) if body.logprobs else None,
                "finish_reason": c["finish_reason"],
            } for i, c in enumerate(choices)],
            "usage": _usage(job, tokens),
        }

    async def _completion_response(served: ServedModel, job: Job, body: CompletionRequest,
                                   request: Request) -> dict:
        choices = await _collect(job, request)
        tokens = sum(c["tokens"] for c in choices)
        _finished(served, job, "completions", tokens)
        echo = served.loaded.tokenizer.decode(job.prompt) if body.echo else ""
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "system_fingerprint": None,
            "choices": [{
                "index": i, "text": echo + c["text"],
                "logprobs": None if body.logprobs is None else _completion_logprobs(served, c["logprobs"], len(echo)),
                "finish_reason": c["finish_reason"],
            } for i, c in enumerate(choices)],
            "usage": _usage(job, tokens),
        }

    async def _pieces(job: Job) -> AsyncIterator[Piece]:
        left = job.params.n
        while left:
            piece = await job.queue.get()
            _check_ended(piece)
            left -= piece.finish_reason is not None
            yield piece

    async def _chat_chunks(served: ServedModel, job: Job, body: ChatRequest, include_usage: bool):
        chunk = _chunks("chatcmpl", "chat.completion.chunk", served.name, include_usage)
        for i in range(job.params.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        tokens = [0] * job.params.n
        async for piece in _pieces(job):
            tokens[piece.choice] = piece.completion_tokens
            delta = {"content": piece.text} if piece.text else {}
            logprobs = _chat_logprobs(served, piece.logprobs) if body.logprobs and piece.logprobs else None
            if piece.text or logprobs:
                yield chunk([{"index": piece.choice, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
            if piece.finish_reason:
                yield chunk([{"index": piece.choice, "delta": {}, "logprobs": None,
                              "finish_reason": piece.finish_reason}])
        _finished(served, job, "chat", sum(tokens))
        if include_usage:
            yield chunk([], _usage(job, sum(tokens)))

    async def _completion_chunks(served: ServedModel, job: Job, body: CompletionRequest, include_usage: bool):
        chunk = _chunks("cmpl", "text_completion", served.name, include_usage)
        offsets = [0] * job.params.n
        tokens = [0] * job.params.n
        async for piece in _pieces(job):
            tokens[piece.choice] = piece.completion_tokens
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(served, piece.logprobs, offsets[piece.choice])
            offsets[piece.choice] += len(piece.text)
            yield chunk([{"index": piece.choice, "text": piece.text, "logprobs": logprobs,
                          "finish_reason": piece.finish_reason}])
        _finished(served, job, "completions", sum(tokens))
        if include_usage:
            yield chunk([], _usage(job, sum(tokens)))

    add_pages(app, models, votes)
    return app


async def read_body(request: Request, schema: type[BaseModel], limits: ServerLimits):
    """Read the body within the size limit (also without a Content-Length) and validate it: errors are 4xx."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise APIError(413, f"the body is over {limits.max_body_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return schema.model_validate_json(b"".join(chunks), strict=True)
    except ValidationError as exc:
        message, param = explain_validation(exc.errors())
        raise APIError(400, message, param=param) from None


def submit(served: ServedModel, prompt: list[int], params: GenerationParams, param: str | None = None) -> Job:
    """Queue a request on the model's engine; a full line is 503, a request it refuses 400 (about `param`)."""
    try:
        return served.engine.submit(prompt, params)
    except QueueFull as exc:
        raise APIError(503, str(exc), type="server_overloaded", code="queue_full") from None
    except CamelidError as exc:
        raise APIError(400, str(exc), param=param) from None


def sse_response(events: AsyncIterator[dict], job: Job) -> StreamingResponse:
    """`events` as server-sent events ending in [DONE]; the job is cancelled when the stream ends, however."""

    async def lines():
        try:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as exc:  # the answer broke off after the 200 went out: say so in the stream
                yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away, or we are done: either way the rows are free

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunks(prefix: str, kind: str, model: str, include_usage: bool):
    """A maker of one stream's chunks: same id and time on each; `usage` null but on the last, if asked for."""
    ident, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": ident, "object": kind, "created": created, "model": model, "system_fingerprint": None,
               "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    return chunk


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _check_ended(piece: Piece) -> None:
    """An answer that ended early is an error to the client, not a finish reason OpenAI's clients know."""
    if piece.finish_reason == "error":
        raise APIError(500, "generation failed on the server (its log has the details)", type="server_error")
    if piece.finish_reason == "cancelled":
        raise APIError(503, "the server stopped this request (shutting down)", type="server_overloaded")


def explain_validation(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic's first complaint, and the parameter it is about."""
    first = errors[0]
    # pydantic puts the union branch it tried into the path ("prompt.str", "stop.list[str]"): not a parameter
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if not loc:
        return "the body must be a JSON object", None
    if first.get("type") == "missing":
        return f"missing required parameter {param}", param
    return f"invalid {param}: {first.get('msg', 'invalid value')}", param


KEYED_PATHS = ("/v1/", "/arena/api/")  # what --api-key guards; the pages themselves are public
KNOWN_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/", "/arena"}


def _endpoint(path: str) -> str:
    """The metrics label of a path: itself when known, else its family (bounded, whatever clients send)."""
    if path in KNOWN_PATHS:
        return path
    for family in ("/v1/models/", "/arena/api/", "/static/"):
        if path.startswith(family):
            return family.rstrip("/")
    return "other"


def _model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "camelid",
            "context_length": m.engine.context}
