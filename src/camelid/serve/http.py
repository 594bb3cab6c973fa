"""What every route shares over HTTP: reading a body, the key and size guard, server-sent events, error
responses in OpenAI's shape, and the Prometheus metrics."""

import hmac
import json
import time
import zlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from camelid.jobs import Job
from camelid.serve.protocol import APIError, ServerLimits, error_body, explain_validation

# what --api-key guards; the pages themselves are public
KEYED_PATHS = ("/v1/", "/arena/api/", "/tokenize", "/detokenize", "/tokenizer_info")
KNOWN_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/", "/arena",
               "/tokenize", "/detokenize", "/tokenizer_info"}


ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: Request, schema: type[BaseModel], limits: ServerLimits):
    """Read the body within the size limit (also without a Content-Length; a gzip or deflate body is decoded,
    and held to the limit once decoded) and validate it: errors are 4xx."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *ENCODINGS):
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or a plain body",
                       code="unsupported_content_encoding")
    decoder = zlib.decompressobj(ENCODINGS[encoding]) if encoding in ENCODINGS else None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            if decoder is not None:
                chunk = _decoded(decoder, chunk, limits.max_body_bytes - size + 1, encoding)
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"the body is over {limits.max_body_bytes} bytes"
                               + (" once decoded" if decoder else ""), code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-body: one access-log line, no traceback
        raise APIError(400, "the client disconnected before sending the whole body", code="client_disconnected") \
            from None
    if decoder is not None and not decoder.eof:
        raise APIError(400, f"the {encoding} body ends before its end", code="invalid_content_encoding")
    try:
        return schema.model_validate_json(b"".join(chunks), strict=True)
    except ValidationError as exc:
        message, param = explain_validation(exc.errors())
        raise APIError(400, message, param=param) from None


def _decoded(decoder, chunk: bytes, room: int, encoding: str) -> bytes:
    """`chunk` decompressed, at most `room` bytes of it (more would be over the limit anyway: a zip bomb stops
    here); a body that is not what its encoding says is a 400."""
    try:
        return decoder.decompress(chunk, max(room, 1))
    except zlib.error:
        raise APIError(400, f"the body is not valid {encoding}", code="invalid_content_encoding") from None


def sse_response(events: AsyncIterator[dict], jobs: list[Job]) -> StreamingResponse:
    """`events` as server-sent events ending in [DONE]; the jobs are cancelled when the stream ends, however."""

    async def lines():
        try:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as exc:  # the answer broke off after the 200 went out: say so in the stream
                yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:  # the client went away, or we are done: either way the rows are free
                job.cancel()

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- errors --------------------------------------------------------------------------------------------------------


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = explain_validation(exc.errors())
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path, wrong method) in OpenAI's shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)


EXCEPTION_HANDLERS = {APIError: api_error, RequestValidationError: invalid_request, StarletteHTTPException: http_error}


# -- the guard -----------------------------------------------------------------------------------------------------


class Guard:
    """Plain ASGI around the app (not BaseHTTPMiddleware, which hides a client's disconnect from handlers):
    refuses early, and counts every answer by endpoint and status."""

    def __init__(self, app, *, api_key: str | None, limits: ServerLimits, metrics: "Metrics"):
        self.app, self.api_key, self.limits, self.metrics = app, api_key, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope["path"])
        if (response := self.refusal(Request(scope))) is not None:
            self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

    def refusal(self, request: Request) -> JSONResponse | None:
        """401 for a missing or wrong key where one is needed, 413 for a declared body over the limit."""
        if request.url.path.startswith(KEYED_PATHS) and self.api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return JSONResponse(error_body(f"the body is over {self.limits.max_body_bytes} bytes",
                                           "invalid_request_error", code="request_too_large"), status_code=413)
        return None


def endpoint_label(path: str) -> str:
    """The metrics label of a path: itself when known, else its family (bounded, whatever clients send)."""
    if path in KNOWN_PATHS:
        return path
    for family in ("/v1/models/", "/arena/api/", "/static/"):
        if path.startswith(family):
            return family.rstrip("/")
    return "other"


# -- metrics -------------------------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process count apart)."""

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
        self._counted: dict[str, int] = {}  # the engines' generated_tokens when /metrics last read them

    def finished(self, job: Job, endpoint: str) -> None:
        """Record the time from a request's submission to its last token."""
        self.latency.labels(endpoint).observe(time.monotonic() - job.submitted)

    def exposition(self, models) -> str:
        """Prometheus' text format, with the engines' queue and rows read now. Adapters share their base's engine
        (camelid.adapters), whose queue and rows are given once, under the base's name (adapter 0)."""
        for m in models:
            if m.adapter == 0:
                self.queue.labels(m.name).set(m.engine.queue_depth)
                self.running.labels(m.name).set(m.engine.rows_in_use)
            # every token the engine generated for this model, those of answers cut short by their client included
            generated = m.engine.generated_by_adapter.get(m.adapter, 0)
            self.completion_tokens.labels(m.name).inc(generated - self._counted.get(m.name, 0))
            self._counted[m.name] = generated
        return generate_latest(self.registry).decode()
