"""What a caller hands an engine and gets back, and the interface every engine implements.

A caller (a route of `camelid serve`, or `camelid eval answers` answering locally) submits a prompt with its
`GenerationParams` and gets a `Job`; the engine's worker thread puts the answer on the job's queue as `Piece`s.
`Engine` is the interface callers rely on; camelid's batching engine (`engine.py`) and llama.cpp's
(`serve/llamacpp_engine.py`) implement it on `JobQueue`, the waiting line and worker thread they share.
"""

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.generate import SamplingParams


class QueueFull(CamelidError):
    """The engine's waiting line is full; the server answers 503."""


@dataclass
class GenerationParams:
    """What one request asks for: sampling, OpenAI's penalties, logprobs, and how many choices."""

    sampling: SamplingParams
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k likeliest
    n: int = 1
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit; -100 bans, 100 forces
    grammar: object | None = None  # a camelid.grammar.Grammar the answer must follow (structured outputs, tools)
    prompt_logprobs: int | None = None  # as logprobs, for the prompt's tokens (echo); the first has none
    adapter: int = 0  # which of the model's LoRA adapters answers (camelid.adapters); 0: the base


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest tokens and their logprobs, best first


def token_logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """The model's own log-probabilities (before penalties and temperature) of `token` and the `top` likeliest."""
    logp = logits.log_softmax(-1)
    best = logp.topk(top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprob(token, float(logp[token]), pairs)


class TokenRules:
    """One choice's rules for its next token, beyond sampling: the request's logit_bias, OpenAI's presence and
    frequency penalties on the tokens the choice generated, and the grammar its answer must follow."""

    def __init__(self, params: GenerationParams):
        self.params = params
        self.counts: dict[int, int] = {}  # output token -> times generated (penalties)
        self.matcher = None if params.grammar is None else params.grammar.matcher()
        bias = params.logit_bias or {}
        self._bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self._bias = torch.tensor(list(bias.values()), dtype=torch.float32)

    def shape(self, raw: Tensor) -> Tensor:
        """The float logits [1, vocab] with the bias, the penalties and the grammar's mask applied (`raw` itself
        when there is nothing to apply)."""
        shaped = raw
        if len(self._bias_ids):
            shaped = apply_logit_bias(shaped, self._bias_ids.to(raw.device), self._bias.to(raw.device))
        p = self.params
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=raw.device)
            counts = torch.tensor(list(self.counts.values()), device=raw.device, dtype=raw.dtype)
            shaped = shaped.clone() if shaped is raw else shaped
            shaped[0, ids] -= p.presence_penalty + p.frequency_penalty * counts
        if self.matcher is not None:
            shaped = self.matcher.mask(shaped)
        return shaped

    def took(self, token: int) -> None:
        """`token` was generated (not a stop token)."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None:
            self.matcher.accept(token)


def apply_logit_bias(logits: Tensor, ids: Tensor, bias: Tensor) -> Tensor:
    """`logits` [1, vocab] with `bias` added at `ids`, as OpenAI documents logit_bias: -100 bans a token (-inf
    here, exactly), and 100 selects exclusively (only the tokens biased by 100 remain)."""
    out = logits.clone()
    out[0, ids] += bias
    out[0, ids[bias <= -100]] = float("-inf")
    forced = ids[bias >= 100]
    if len(forced):
        only = torch.full_like(out, float("-inf"))
        only[0, forced] = out[0, forced]
        out = only
    return out


@dataclass
class Piece:
    """New output of one choice: text safe to show, the tokens behind it, and why it ended (or None)."""

    choice: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    completion_tokens: int  # the choice's tokens so far


class Job:
    """A submitted request: its pieces arrive on `queue`; `cancel()` frees its rows at the next step."""

    def __init__(self, prompt: list[int], params: GenerationParams, loop: asyncio.AbstractEventLoop):
        self.prompt, self.params = prompt, params
        self.queue: asyncio.Queue[Piece] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.monotonic()
        # with params.prompt_logprobs: one per prompt token, the first None; set before the first piece is put
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._loop = loop

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, piece: Piece) -> None:
        """Hand `piece` to the asyncio side (called from an engine's worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, piece)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True

    def end(self, choices, reason: str = "cancelled") -> None:
        """Tell whoever still listens that these choices ended with nothing more ("cancelled", or "error")."""
        for choice in choices:
            self.put(Piece(choice, "", [], reason, 0))


class Engine(Protocol):
    """What the routes need of an engine: its sizes, `submit` from the asyncio side, and `close` to stop."""

    context: int  # prompt and answer together, in tokens
    max_batch: int  # the most choices one request may ask for
    generated_tokens: int
    generated_by_adapter: dict[int, int]  # generated_tokens by GenerationParams.adapter

    @property
    def queue_depth(self) -> int: ...

    @property
    def rows_in_use(self) -> int: ...

    def submit(self, prompt: list[int], params: GenerationParams) -> Job: ...

    def close(self) -> None: ...


class JobQueue:
    """What both engines share: the line of waiting jobs, checked and queued from the asyncio side, and the start
    and stop of the worker thread (the engine's `_run`) that takes them off it.

    `n_limit` says what bounds a request's `n`.
    """

    n_limit = "sequences at once"

    def __init__(self, *, context: int, max_batch: int, max_queue: int):
        self.context, self.max_batch, self.max_queue = context, max_batch, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.generated_tokens = 0
        self.generated_by_adapter: collections.Counter[int] = collections.Counter()
        self._wake = threading.Condition()  # the worker waits on it for work, or for the close
        self._closed = False

    def _start_worker(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _stop_worker(self) -> None:
        """Stop the worker thread; the requests still waiting end as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for job in self.waiting:
            job.end(range(job.params.n))
        self.waiting.clear()

    def submit(self, prompt: list[int], params: GenerationParams) -> Job:
        """Queue a request; refuses one that cannot fit the context, and any once `max_queue` are waiting."""
        if not prompt:
            raise CamelidError("the prompt is empty: give at least one token of input")
        if len(prompt) >= self.context:
            raise CamelidError(
                f"the prompt is {len(prompt)} tokens but the context is {self.context}; shorten the prompt"
            )
        if params.n > self.max_batch:
            raise CamelidError(f"n is {params.n} but this server runs at most {self.max_batch} {self.n_limit}")
        job = Job(prompt, params, asyncio.get_running_loop())
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({len(self.waiting)} requests waiting); try again shortly")
            self.waiting.append(job)
            self._wake.notify()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def _generated(self, params: GenerationParams) -> None:
        """Count a token generated for a request (the worker thread's; /metrics reads the counts)."""
        self.generated_tokens += 1
        self.generated_by_adapter[params.adapter] += 1
