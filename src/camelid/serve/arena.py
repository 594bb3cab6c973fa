"""The chat page (`/`), the blind arena (`/arena`) and the arena's small API (`/arena/api/...`).

The pages are static HTML and JavaScript from `static/`, talking to the OpenAI-compatible API (the chat page) or
to the arena API. In a battle the server picks two models at random and keeps everything that decides the vote
in memory, so the names stay hidden until the vote and the answers logged are the ones the server generated:

    POST /arena/api/battle {"prompt"}          -> {"battle", "models_in_arena"}
    POST /arena/api/answer {"battle", "side"}  -> SSE: data: {"text"} ... data: {"finish_reason"}, data: [DONE]
    POST /arena/api/vote   {"battle", "winner"} -> {"battle", "model_a", "model_b", "winner"}
    GET  /arena/api/models                     -> {"models_in_arena"}

`side` is "a" or "b"; `winner` is one of FastChat's Chatbot Arena values: "model_a", "model_b", "tie",
"tie (bothbad)". Each vote is one JSON line appended to the votes file. The handlers find the arena's battles in
`request.app.state.arena`, and the `limits` beside it.
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

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from camelid.generate import SamplingParams
from camelid.serve.http import read_body, sse_response
from camelid.jobs import GenerationParams, Job
from camelid.serve.protocol import APIError, AnswerRequest, BattleRequest, VoteRequest
from camelid.serve.served_model import ServedModel

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


class Arena:
    """The models that can battle (those with a chat template), the battles still remembered, and the votes file.

    Votes are appended to `votes`, or to `arena-votes.jsonl` in the current directory when it is None (its parent
    directories are made at the first vote).
    """

    def __init__(self, models: list[ServedModel], votes: str | Path | None):
        self.models = [m for m in models if m.template is not None]  # the arena chats, so it needs templates
        self.votes_path = Path(votes if votes is not None else DEFAULT_VOTES).absolute()
        self.battles: collections.OrderedDict[str, Battle] = collections.OrderedDict()
        self.pick = random.Random()  # its own generator, seeded by the OS: the draw is nobody else's business
        self.write_lock = threading.Lock()

    async def start(self, prompt: str) -> Battle:
        """A battle on `prompt` between two models drawn at random (one asked twice when only one can chat)."""
        if not self.models:
            raise APIError(503, "no served model has a chat template, so the arena has nobody to ask",
                           type="server_error", code="no_chat_models")
        a, b = self.pick.sample(self.models, 2) if len(self.models) >= 2 else self.models * 2
        for served in (a, b):
            await _chat_prompt(served, prompt)  # refuse a prompt that does not fit now, not halfway through
        battle = Battle(uuid.uuid4().hex, prompt, {"a": Answer(a), "b": Answer(b)})
        self.battles[battle.id] = battle
        while len(self.battles) > MAX_BATTLES:
            self.battles.popitem(last=False)
        return battle

    def find(self, battle_id: str) -> Battle:
        battle = self.battles.get(battle_id)
        if battle is None:
            raise APIError(404, f"no such battle here (unknown, or forgotten after {MAX_BATTLES} newer ones); "
                           "start a new one", param="battle", type="not_found_error", code="battle_not_found")
        return battle

    def record(self, battle: Battle, winner: str) -> None:
        """Append the vote on a finished battle to the votes file, once."""
        if battle.voted:
            raise APIError(409, "this battle already has its vote", param="battle", code="already_voted")
        if any(s.finish_reason is None for s in battle.sides.values()):
            raise APIError(409, "vote once both answers are complete", param="battle", code="answers_not_finished")
        a, b = battle.sides["a"], battle.sides["b"]
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "battle": battle.id,
            "model_a": a.model.name, "model_b": b.model.name, "winner": winner,
            "conversation_a": [{"role": "user", "content": battle.prompt}, {"role": "assistant", "content": a.text}],
            "conversation_b": [{"role": "user", "content": battle.prompt}, {"role": "assistant", "content": b.text}],
        }
        try:
            append_line(self.votes_path, json.dumps(record, ensure_ascii=False), self.write_lock)
        except OSError as exc:  # the server's disk or folder, not the voter: the vote may be sent again
            raise APIError(500, f"could not record the vote in {self.votes_path}: {exc}", type="server_error",
                           code="votes_not_written") from None
        battle.voted = True  # no await between the check and here: two votes cannot both pass


router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "chat.html", headers=PAGE_HEADERS)


@router.get("/arena", include_in_schema=False)
async def arena_page():
    return FileResponse(STATIC / "arena.html", headers=PAGE_HEADERS)


@router.get("/arena/api/models")
async def arena_count(request: Request):
    return {"models_in_arena": len(request.app.state.arena.models)}


@router.post("/arena/api/battle")
async def new_battle(request: Request):
    arena, limits = request.app.state.arena, request.app.state.limits
    body = await read_body(request, BattleRequest, limits)
    if not body.prompt.strip():
        raise APIError(400, "the prompt is empty", param="prompt")
    limits.check_prompt_chars("prompt", len(body.prompt))
    battle = await arena.start(body.prompt)
    return {"battle": battle.id, "models_in_arena": len(arena.models)}


@router.post("/arena/api/answer")
async def answer(request: Request):
    body = await read_body(request, AnswerRequest, request.app.state.limits)
    battle = request.app.state.arena.find(body.battle)
    side = battle.sides[body.side]
    if side.started:
        raise APIError(409, f"side {body.side!r} of this battle was already asked for; start a new battle",
                       param="side", code="answer_already_requested")
    # Tokenized again rather than kept: a thousand long prompts' token lists would be gigabytes.
    prompt = await _chat_prompt(side.model, battle.prompt)
    room = side.model.engine.context - len(prompt)
    params = GenerationParams(SamplingParams(max_new_tokens=min(ARENA_MAX_TOKENS, room), **ARENA_SAMPLING))
    job = side.model.submit(prompt, params, param="prompt")
    side.started = True
    return sse_response(_answer_events(side, job), [job])  # which frees the row if the person leaves mid-answer


@router.post("/arena/api/vote")
async def vote(request: Request):
    body = await read_body(request, VoteRequest, request.app.state.limits)
    battle = request.app.state.arena.find(body.battle)
    request.app.state.arena.record(battle, body.winner)
    a, b = battle.sides["a"], battle.sides["b"]
    return {"battle": battle.id, "model_a": a.model.name, "model_b": b.model.name, "winner": body.winner}


async def _answer_events(side: Answer, job: Job):
    """The answer's text as it comes, kept on `side` for the vote, then its finish reason."""
    while side.finish_reason is None:
        piece = await job.queue.get()
        side.text += piece.text
        if piece.text:
            yield {"text": piece.text}
        if piece.finish_reason:
            side.finish_reason = piece.finish_reason
            yield {"finish_reason": piece.finish_reason}


async def _chat_prompt(served: ServedModel, prompt: str) -> list[int]:
    return await served.chat_prompt([{"role": "user", "content": prompt}], "prompt")


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
