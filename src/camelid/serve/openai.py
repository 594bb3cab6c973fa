"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`; and `/health`, `/metrics`.

The handlers read the served models (`models`, by name), the `limits` and the `metrics` from `request.app.state`.
Request bodies and errors are in `protocol.py`; answers are OpenAI's shapes, built here as plain dicts.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from camelid.errors import CamelidError
from camelid.generate import SamplingParams
from camelid.serve.http import read_body, sse_response
from camelid.jobs import GenerationParams, Job, Piece, TokenLogprob
from camelid.serve.protocol import APIError, ChatRequest, CompletionRequest, SamplingFields, ServerLimits
from camelid.serve.served_model import ServedModel

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "models": list(request.app.state.models)}


@router.get("/metrics")
async def prometheus(request: Request):
    text = request.app.state.metrics.exposition(request.app.state.models.values())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(m) for m in request.app.state.models.values()]}


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str):
    return _model_card(_served(request, name))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    limits = request.app.state.limits
    body = await read_body(request, ChatRequest, limits)
    served = _served(request, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    limits.check_prompt_chars("messages", sum(len(m["content"]) for m in messages))
    prompt = served.chat_prompt(messages, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top = body.top_logprobs if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    limit_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    params = _generation(body, max_tokens, 0 if body.logprobs and top is None else top, served, len(prompt),
                         limits, limit_param)
    job = _submit(request, served, prompt, params)
    if body.stream:
        return sse_response(_chat_chunks(request, served, job, body), job)
    return await _chat_response(request, served, job, body)


@router.post("/v1/completions")
async def completions(request: Request):
    limits = request.app.state.limits
    body = await read_body(request, CompletionRequest, limits)
    served = _served(request, body.model)
    prompts = _prompts(body.prompt, served, limits)
    if len(prompts) != 1:
        raise APIError(400, "give one prompt per request (a string or a list of token ids)", param="prompt")
    prompt = prompts[0]
    if body.echo and (body.stream or body.logprobs is not None):
        raise APIError(400, "echo is not supported with stream or logprobs", param="echo")
    params = _generation(body, body.max_tokens, body.logprobs, served, len(prompt), limits)
    job = _submit(request, served, prompt, params)
    if body.stream:
        return sse_response(_completion_chunks(request, served, job, body), job)
    return await _completion_response(request, served, job, body)


# -- requests ------------------------------------------------------------------------------------------------------


def _served(request: Request, name: str) -> ServedModel:
    served = request.app.state.models.get(name)
    if served is None:
        raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists the models",
                       param="model", code="model_not_found", type="not_found_error")
    return served


def _model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "camelid",
            "context_length": m.engine.context}


def _submit(request: Request, served: ServedModel, prompt: list[int], params: GenerationParams) -> Job:
    job = served.submit(prompt, params)
    request.app.state.metrics.prompt_tokens.labels(served.name).inc(len(prompt))
    return job


def _generation(body: SamplingFields, max_tokens: int | None, logprobs: int | None, served: ServedModel,
                prompt_len: int, limits: ServerLimits, limit_param: str = "max_tokens") -> GenerationParams:
    """The request's sampling within the server's limits and the room the prompt leaves in the context."""
    room = served.engine.context - prompt_len
    if body.n > served.engine.max_batch:
        raise APIError(400, f"n is {body.n}; this server runs at most {served.engine.max_batch} sequences at once",
                       param="n")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"{limit_param} is {max_tokens}; this server allows at most {limits.max_tokens}",
                       param=limit_param)
    if room <= 0:  # a chat prompt was checked already, by ServedModel.chat_prompt
        raise APIError(400, f"the prompt is {prompt_len} tokens but the context is {served.engine.context}; "
                       "shorten it", param="prompt", code="context_length_exceeded")
    seed = None if body.seed is None else body.seed % 2**64
    try:
        sampling = SamplingParams(
            max_new_tokens=min(max_tokens or limits.max_tokens, room), temperature=body.temperature,
            top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
            seed=seed, stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos,
        )
    except CamelidError as exc:
        raise APIError(400, str(exc)) from None
    return GenerationParams(sampling, body.presence_penalty, body.frequency_penalty, logprobs, body.n)


def _prompts(prompt, served: ServedModel, limits: ServerLimits) -> list[list[int]]:
    """A completion's prompt (a string, token ids, or a list of either) as lists of token ids."""
    vocab = served.loaded.config.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            limits.check_prompt_chars("prompt", len(p))
            out.append(served.loaded.tokenizer.encode(p))
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append(list(p))
    if not out or any(not p for p in out):
        raise APIError(400, "the prompt is empty", param="prompt")
    return out


# -- whole answers -------------------------------------------------------------------------------------------------


async def _chat_response(request: Request, served: ServedModel, job: Job, body: ChatRequest) -> dict:
    choices = await _collect(job, request)
    tokens = sum(c["tokens"] for c in choices)
    request.app.state.metrics.finished(served.name, job, "chat", tokens)
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


async def _completion_response(request: Request, served: ServedModel, job: Job, body: CompletionRequest) -> dict:
    choices = await _collect(job, request)
    tokens = sum(c["tokens"] for c in choices)
    request.app.state.metrics.finished(served.name, job, "completions", tokens)
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


# -- streamed answers ----------------------------------------------------------------------------------------------


async def _chat_chunks(request: Request, served: ServedModel, job: Job, body: ChatRequest):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
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
            yield chunk([{"index": piece.choice, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}])
    request.app.state.metrics.finished(served.name, job, "chat", sum(tokens))
    if include_usage:
        yield chunk([], _usage(job, sum(tokens)))


async def _completion_chunks(request: Request, served: ServedModel, job: Job, body: CompletionRequest):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
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
    request.app.state.metrics.finished(served.name, job, "completions", sum(tokens))
    if include_usage:
        yield chunk([], _usage(job, sum(tokens)))


async def _pieces(job: Job) -> AsyncIterator[Piece]:
    left = job.params.n
    while left:
        piece = await job.queue.get()
        _check_ended(piece)
        left -= piece.finish_reason is not None
        yield piece


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


# -- parts of answers ----------------------------------------------------------------------------------------------


def _check_ended(piece: Piece) -> None:
    """An answer that ended early is an error to the client, not a finish reason OpenAI's clients know."""
    if piece.finish_reason == "error":
        raise APIError(500, "generation failed on the server (its log has the details)", type="server_error")
    if piece.finish_reason == "cancelled":
        raise APIError(503, "the server stopped this request (shutting down)", type="server_overloaded")


def _usage(job: Job, completion_tokens: int) -> dict:
    n = len(job.prompt)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}


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
