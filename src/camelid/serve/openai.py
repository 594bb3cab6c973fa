"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`; and `/health`, `/metrics`.

The handlers read the served models (`models`, by name), the `limits` and the `metrics` from `request.app.state`.
Request bodies and errors are in `protocol.py`; answers are OpenAI's shapes, built here as plain dicts.
"""

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from camelid.errors import CamelidError
from camelid.grammar import Grammar, GrammarError, json_object_grammar, json_schema_grammar
from camelid.generate import SamplingParams
from camelid.serve.http import read_body, sse_response
from camelid.jobs import GenerationParams, Job, Piece, TokenLogprob
from camelid.serve.protocol import (MAX_PROMPTS, APIError, ChatRequest, CompletionRequest, SamplingFields,
                                    ServerLimits)
from camelid.serve.served_model import ServedModel
from camelid.serve.tools import (CLOSE, CallStream, ToolUse, call_grammar, check_parameters, read_calls, tool_use,
                                 with_tools)

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
    use = tool_use(body, served.template)
    messages, variables = with_tools([m.as_dict() for m in body.messages], use, served.template)
    limits.check_prompt_chars("messages", sum(len(m["content"]) for m in messages))
    prompt = await served.chat_prompt(messages, "messages", **variables)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top = body.top_logprobs if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    limit_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    params = _generation(body, max_tokens, 0 if body.logprobs and top is None else top, served, len(prompt),
                         limits, limit_param)
    params.grammar = await _response_grammar(served, body) or await _call_grammar(served, use)
    if params.grammar is not None and body.ignore_eos:
        raise APIError(400, "ignore_eos cannot be used with a JSON response_format or a required tool call: the "
                       "answer ends where its grammar does", param="ignore_eos")
    if use is not None and use.choice == "auto" and not use.parallel and use.format == "hermes":
        params.sampling = dataclasses.replace(params.sampling, stop=params.sampling.stop + (CLOSE,))  # one call
    job = _submit(request, served, prompt, params)
    if body.stream:
        return sse_response(_chat_chunks(request, served, job, body, use), [job])
    return await _chat_response(request, served, job, body, use)


@router.post("/v1/completions")
async def completions(request: Request):
    limits = request.app.state.limits
    body = await read_body(request, CompletionRequest, limits)
    served = _served(request, body.model)
    prompts = _prompts(body.prompt, served, limits)
    jobs: list[Job] = []
    try:  # one job per prompt: the engine batches them
        for prompt in prompts:
            params = _generation(body, body.max_tokens, body.logprobs, served, len(prompt), limits)
            if body.echo and body.logprobs is not None:
                params.prompt_logprobs = body.logprobs
            jobs.append(_submit(request, served, prompt, params, "prompt"))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    if body.stream:
        return sse_response(_completion_chunks(request, served, jobs, body), jobs)
    return await _completion_response(request, served, jobs, body)


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


def _submit(request: Request, served: ServedModel, prompt: list[int], params: GenerationParams,
            param: str | None = None) -> Job:
    job = served.submit(prompt, params, param)
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
    return GenerationParams(sampling, body.presence_penalty, body.frequency_penalty, logprobs, body.n,
                            logit_bias=_logit_bias(body.logit_bias, served))


async def _response_grammar(served: ServedModel, body: ChatRequest) -> Grammar | None:
    """The grammar `response_format` asks the answer to follow (None for text), compiled off the event loop."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    tokenizer, vocab = served.loaded.tokenizer, served.loaded.config.vocab_size
    try:
        if fmt.type == "json_object":
            return await asyncio.to_thread(json_object_grammar, tokenizer, vocab)
        spec = fmt.json_schema
        return await asyncio.to_thread(json_schema_grammar, tokenizer, vocab, spec.schema_, strict=bool(spec.strict))
    except GrammarError as exc:
        raise APIError(400, f"response_format.json_schema.schema cannot be enforced: {exc}",
                       param="response_format") from None


async def _call_grammar(served: ServedModel, use: ToolUse | None) -> Grammar | None:
    """With tools, each tool's parameters checked; with a required or named call, the grammar of the calls."""
    if use is None:
        return None
    tokenizer, vocab = served.loaded.tokenizer, served.loaded.config.vocab_size
    await asyncio.to_thread(check_parameters, use, tokenizer, vocab)
    return await asyncio.to_thread(call_grammar, use, tokenizer, vocab)


def _logit_bias(bias: dict[int, float] | None, served: ServedModel) -> dict[int, float] | None:
    vocab = served.loaded.config.vocab_size
    if bias and (outside := next((t for t in bias if t >= vocab), None)) is not None:
        raise APIError(400, f"logit_bias names token {outside}, but token ids are in [0, {vocab})",
                       param="logit_bias")
    return bias or None


def _prompts(prompt, served: ServedModel, limits: ServerLimits) -> list[list[int]]:
    """A completion's prompt (a string, token ids, or a list of either) as lists of token ids."""
    vocab = served.loaded.config.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"the prompt is a list of {len(prompt)} prompts; send at most {MAX_PROMPTS} a request",
                       param="prompt")
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


async def _chat_response(request: Request, served: ServedModel, job: Job, body: ChatRequest,
                         use: ToolUse | None) -> dict:
    choices = await _collect(job, request)
    tokens = sum(c["tokens"] for c in choices)
    request.app.state.metrics.finished(job, "chat")
    out = []
    for i, c in enumerate(choices):
        message = {"role": "assistant", "content": c["text"]}
        if use is not None:
            message["content"], calls = read_calls(c["text"], use)
            message |= {"tool_calls": calls} if calls else {}
        finish = "tool_calls" if message.get("tool_calls") and c["finish_reason"] == "stop" else c["finish_reason"]
        out.append({"index": i, "message": message, "finish_reason": finish,
                    "logprobs": _chat_logprobs(served, c["logprobs"]) if body.logprobs else None})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "system_fingerprint": None, "choices": out, "usage": _usage([job], tokens)}


async def _completion_response(request: Request, served: ServedModel, jobs: list[Job],
                               body: CompletionRequest) -> dict:
    """Every prompt's choices, indexed prompt by prompt (prompt i's choice c is index i * n + c), as OpenAI."""
    answers = await asyncio.gather(*(_collect(job, request) for job in jobs))
    for job in jobs:
        request.app.state.metrics.finished(job, "completions")
    choices = []
    for job, answer in zip(jobs, answers):
        echo, echo_logprobs = _echo(served, job, body)
        for c in answer:
            logprobs = None
            if body.logprobs is not None:
                logprobs = _joined(echo_logprobs, _completion_logprobs(served, c["logprobs"], len(echo)))
            choices.append({"index": len(choices), "text": echo + c["text"], "logprobs": logprobs,
                            "finish_reason": c["finish_reason"]})
    tokens = sum(c["tokens"] for answer in answers for c in answer)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "system_fingerprint": None, "choices": choices, "usage": _usage(jobs, tokens)}


def _echo(served: ServedModel, job: Job, body: CompletionRequest) -> tuple[str, dict | None]:
    """With `echo`, the prompt's text and (asked for with logprobs) its tokens' logprobs: the first token's null,
    as OpenAI and vLLM give it; without, nothing."""
    if not body.echo:
        return "", None
    text = served.loaded.tokenizer.decode(job.prompt)
    if body.logprobs is None:
        return text, None
    first, *rest = job.prompt_logprobs
    assert first is None and len(rest) == len(job.prompt) - 1, "the engine gave no prompt logprobs"
    logprobs = _completion_logprobs(served, rest, len(_token_text(served, job.prompt[0])))
    return text, _joined({"tokens": [_token_text(served, job.prompt[0])], "token_logprobs": [None],
                          "top_logprobs": [None], "text_offset": [0]}, logprobs)


def _joined(first: dict | None, second: dict) -> dict:
    """Two completions `logprobs` objects, one after the other."""
    return second if first is None else {key: first[key] + second[key] for key in second}


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


async def _chat_chunks(request: Request, served: ServedModel, job: Job, body: ChatRequest, use: ToolUse | None):
    """The answer as OpenAI streams it; with tools, each choice's text goes through a CallStream, which holds back
    what may be a call and sends a call as its id and name, then its arguments."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = _chunks("chatcmpl", "chat.completion.chunk", served.name, include_usage)
    for i in range(job.params.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    tokens = [0] * job.params.n
    streams = [CallStream(use) if use is not None else None for _ in range(job.params.n)]
    async for _, piece in _pieces([job]):
        tokens[piece.choice] = piece.completion_tokens
        calls = streams[piece.choice]
        deltas = calls.feed(piece.text) if calls else [{"content": piece.text}] if piece.text else []
        logprobs = _chat_logprobs(served, piece.logprobs) if body.logprobs and piece.logprobs else None
        for delta in deltas or ([{}] if logprobs else []):
            yield chunk([{"index": piece.choice, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
            logprobs = None
        if piece.finish_reason:
            finish, called = piece.finish_reason, False
            if calls:
                last, called = calls.end()
                for delta in last:
                    yield chunk([{"index": piece.choice, "delta": delta, "logprobs": None, "finish_reason": None}])
            finish = "tool_calls" if called and finish == "stop" else finish
            yield chunk([{"index": piece.choice, "delta": {}, "logprobs": None, "finish_reason": finish}])
    request.app.state.metrics.finished(job, "chat")
    if include_usage:
        yield chunk([], _usage([job], sum(tokens)))


async def _completion_chunks(request: Request, served: ServedModel, jobs: list[Job], body: CompletionRequest):
    """Every prompt's choices streamed as they come, indexed as in the answer that is not streamed; with `echo`,
    each choice's first chunk is the prompt."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = _chunks("cmpl", "text_completion", served.name, include_usage)
    n = body.n
    offsets = [0] * (len(jobs) * n)
    tokens = [0] * (len(jobs) * n)
    echoed = [False] * (len(jobs) * n)
    async for i, piece in _pieces(jobs):
        index = i * n + piece.choice
        echo, logprobs = ("", None) if echoed[index] else _echo(served, jobs[i], body)
        echoed[index] = True
        tokens[index] = piece.completion_tokens
        if body.logprobs is not None:
            logprobs = _joined(logprobs, _completion_logprobs(served, piece.logprobs, offsets[index] + len(echo)))
        offsets[index] += len(echo) + len(piece.text)
        yield chunk([{"index": index, "text": echo + piece.text, "logprobs": logprobs,
                      "finish_reason": piece.finish_reason}])
    for job in jobs:
        request.app.state.metrics.finished(job, "completions")
    if include_usage:
        yield chunk([], _usage(jobs, sum(tokens)))


async def _pieces(jobs: list[Job]) -> AsyncIterator[tuple[int, Piece]]:
    """Every job's pieces as they arrive, with the job's index, until all their choices have ended."""
    left = [job.params.n for job in jobs]
    getters = {asyncio.ensure_future(job.queue.get()): i for i, job in enumerate(jobs)}
    try:
        while getters:
            done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = getters.pop(task)
                piece = task.result()
                _check_ended(piece)
                left[i] -= piece.finish_reason is not None
                if left[i]:
                    getters[asyncio.ensure_future(jobs[i].queue.get())] = i
                yield i, piece
    finally:
        for task in getters:
            task.cancel()


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


def _usage(jobs: list[Job], completion_tokens: int) -> dict:
    n = sum(len(job.prompt) for job in jobs)
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
