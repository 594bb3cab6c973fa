"""The chat page (`/`), the blind arena (`/arena`) and the arena's small API (`/arena/api/...`).

The pages are static HTML and JavaScript from `static/`, talking to the OpenAI-compatible API (the chat page) or
to the arena API. In a battle the server picks two models at random and keeps everything that decides the vote
in memory, so the names stay hidden until the vote and the answers logged are the ones the server generated:

    POST /arena/api/battle {"prompt"}          -> {"battle", "models_in_arena"}
    POST /arena/api/answer {"battle", "side"}  -> SSE: data: {"text"} ... data: {"finish_reason"}, data: [DONE]
    POST /arena/api/vote   {"battle", "winner"} -> {"battle", "model_a", "model_b", "winner"}
    GET  /arena/api/models                     -> {"models_in_arena"}

`side` is "a" or "b"; `winner` is one of FastChat's Chatbot Arena values: "model_a", "model_b", "tie",
"tie (bothbad)". Each vote is one JSON line appended to the votes file.
"""

import collections
import json
import os
import random
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from camelid.errors import CamelidError
from camelid.generate import SamplingParams
from camelid.serve.api import APIError, ServedModel, read_body, sse_response, submit
from camelid.serve.engine import GenerationParams

STATIC = Path(__file__).parent / "static"
DEFAULT_VOTES = "arena-votes.jsonl"
MAX_BATTLES = 1000  # battles kept in memory; older ones are forgotten (and can no longer be voted on)
ARENA_MAX_TOKENS = 512
# Sampled, not greedy, as the Chatbot Arena does: a blind vote compares what each model typically says.
ARENA_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0}

# The pages load only their own files; model output can never bring in a script or a remote resource.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "Cache-Control": "no-cache",
}


class BattleRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    battle: str
    side: Literal["a", "b"]


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    battle: str
    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]


@dataclass
class Answer:
    model: ServedModel
    text: str = ""
    started: bool = False
    finish_reason: str | None = None  # set once the whole answer is generated


@dataclass
class Battle:
    id: str
    prompt: str
    sides: dict[str, Answer]  # "a", "b"
    voted: bool = False


def add_pages(app: FastAPI, models: list[ServedModel], votes: str | Path | None) -> None:
    """Serve the chat page at `/` and the arena at `/arena` on `app`.

    Arena votes are appended to `votes`, or to `arena-votes.jsonl` in the current directory when it is None
    (its parent directories are made at the first vote). The app's API key, if any, guards the arena API as it
    guards `/v1`.
    """
    votes_path = Path(votes if votes is not None else DEFAULT_VOTES).absolute()
    arena_models = [m for m in models if m.template is not None]  # the arena chats, so it needs templates
    battles: collections.OrderedDict[str, Battle] = collections.OrderedDict()
    pick = random.Random()  # its own generator, seeded by the OS: the draw is nobody else's business
    write_lock = threading.Lock()
    limits = app.state.limits

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "chat.html", headers=PAGE_HEADERS)

    @app.get("/arena", include_in_schema=False)
    async def arena_page():
        return FileResponse(STATIC / "arena.html", headers=PAGE_HEADERS)

    def find(battle_id: str) -> Battle:
        battle = battles.get(battle_id)
        if battle is None:
            raise APIError(404, f"no such battle here (unknown, or forgotten after {MAX_BATTLES} newer ones); "
                           "start a new one", param="battle", type="not_found_error", code="battle_not_found")
        return battle

    @app.get("/arena/api/models")
    async def arena_count():
        return {"models_in_arena": len(arena_models)}

    @app.post("/arena/api/battle")
    async def new_battle(request: Request):
        body = await read_body(request, BattleRequest, limits)
        if not body.prompt.strip():
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(body.prompt) > limits.max_prompt_chars:
            raise APIError(413, f"the prompt is over {limits.max_prompt_chars} characters", param="prompt")
        if not arena_models:
            raise APIError(503, "no served model has a chat template, so the arena has nobody to ask",
                           type="server_error", code="no_chat_models")
        # Two different models when there are two; with one, both sides ask it (the page says so).
        a, b = pick.sample(arena_models, 2) if len(arena_models) >= 2 else arena_models * 2
        for served in (a, b):
            chat_prompt(served, body.prompt)  # refuse a prompt that does not fit now, not halfway through
        battle = Battle(uuid.uuid4().hex, body.prompt, {"a": Answer(a), "b": Answer(b)})
        battles[battle.id] = battle
        while len(battles) > MAX_BATTLES:
            battles.popitem(last=False)
        return {"battle": battle.id, "models_in_arena": len(arena_models)}

    @app.post("/arena/api/answer")
    async def answer(request: Request):
        body = await read_body(request, AnswerRequest, limits)
        battle = find(body.battle)
        side = battle.sides[body.side]
        if side.started:
            raise APIError(409, f"side {body.side!r} of this battle was already asked for; start a new battle",
                           param="side", code="answer_already_requested")
        # Tokenized again rather than kept: a thousand long prompts' token lists would be gigabytes.
        prompt = chat_prompt(side.model, battle.prompt)
        engine = side.model.engine
        params = GenerationParams(SamplingParams(max_new_tokens=min(ARENA_MAX_TOKENS, engine.context - len(prompt)),
                                                 **ARENA_SAMPLING))
        job = submit(side.model, prompt, params, param="prompt")
        side.started = True

        async def events():
            while side.finish_reason is None:
                piece = await job.queue.get()
                side.text += piece.text
                if piece.text:
                    yield {"text": piece.text}
                if piece.finish_reason:
                    side.finish_reason = piece.finish_reason
                    yield {"finish_reason": piece.finish_reason}

        return sse_response(events(), job)  # which frees the row if the person leaves mid-answer

    @app.post("/arena/api/vote")
    async def vote(request: Request):
        body = await read_body(request, VoteRequest, limits)
        battle = find(body.battle)
        if battle.voted:
            raise APIError(409, "this battle already has its vote", param="battle", code="already_voted")
        if any(s.finish_reason is None for s in battle.sides.values()):
            raise APIError(409, "vote once both answers are complete", param="battle", code="answers_not_finished")
        a, b = battle.sides["a"], battle.sides["b"]
        record = {
            "time": _now(), "battle": battle.id, "model_a": a.model.name, "model_b": b.model.name,
            "winner": body.winner,
            "conversation_a": [{"role": "user", "content": battle.prompt}, {"role": "assistant", "content": a.text}],
            "conversation_b": [{"role": "user", "content": battle.prompt}, {"role": "assistant", "content": b.text}],
        }
        try:
            append_line(votes_path, json.dumps(record, ensure_ascii=False), write_lock)
        except OSError as exc:  # the server's disk or folder, not the voter: the vote may be sent again
            raise APIError(500, f"could not record the vote in {votes_path}: {exc}", type="server_error",
                           code="votes_not_written") from None
        battle.voted = True  # no await between the check and here: two votes cannot both pass
        return {"battle": battle.id, "model_a": a.model.name, "model_b": b.model.name, "winner": body.winner}


def chat_prompt(served: ServedModel, prompt: str) -> list[int]:
    """A one-turn chat, rendered with the model's template, as token ids; 400 if it does not fit."""
    try:
        text = served.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    except CamelidError as exc:
        raise APIError(400, f"the chat template refused this prompt: {exc}", param="prompt") from None
    ids = served.loaded.tokenizer.encode(text, add_special=False)
    if len(ids) >= served.engine.context:
        raise APIError(400, f"the prompt is {len(ids)} tokens but a model in the arena has a context of "
                       f"{served.engine.context}; shorten it", param="prompt", code="context_length_exceeded")
    return ids


def append_line(path: Path, line: str, lock: threading.Lock) -> None:
    """Append `line` and a newline with one write to a file opened for appending, so lines never interleave."""
    data = (line + "\n").encode()
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    if written != len(data):  # a full disk; the line is cut, and the person should hear it was not counted
        raise OSError(f"only {written} of {len(data)} bytes of the vote reached {path}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
