"""Continuous batching: concurrent requests share the decode steps of one model.

One worker thread owns the model and a KV cache of `max_batch` rows. Between decode steps it admits waiting
requests into free rows and frees the rows of requests that finished or were cancelled, so a request joins or
leaves the running batch without waiting for the others. Each decode step feeds one token for rows 0..n-1, where
n - 1 is the highest row decoding: a new request takes the lowest free row (unless the prefix cache, below, finds
a better one), so a lone request decodes exactly as `camelid generate` does (a batch of one).

Chunked prefill: an admitted prompt is not run whole before the next decode step, which froze every running
stream for as long as a long prompt took. After its decode step, each step runs the next `prefill_chunk` tokens
(at most) of every prompt being prefilled, in one forward pass for prompts in adjacent rows: a prompt advances by a
chunk a step as a decoding row advances by a token, and a burst of short prompts is not made to queue behind one
another. A row is sampled only once its whole prompt is in the cache. With no row decoding there is no stream to
keep pace with: a step runs generate.PREFILL_CHUNK prompt tokens, oldest request first, as `generate` does.

Prefix cache: each row remembers the tokens its cache holds (prompt and fed answer) after its request ends. A new
request takes the free row that shares the longest prefix with its prompt and prefills only the rest: a chat's
next turn finds its earlier turns, a shared system prompt is found in any free row that ran it. Rows are reused in
place rather than copied between rows: no copy, and what a row holds stays until a request is admitted into it.
The cache keeps every position (sliding windows are masks over it), and the reused keys sit at the positions
they were computed at, so the answer is the same as without the cache. At least the prompt's last token is run,
for its logits; a request that asks for the prompt's logprobs reuses nothing, since it needs every position's.
A row's keys and values depend on the adapter that computed them, so a row is reused only by the same adapter.

Adapters per request (camelid.adapters): a model may carry LoRA adapters beside its base weights, and each request
names one (GenerationParams.adapter, 0: the base). Rows of different adapters share every forward pass: before
each, `adapter_rows` tells the model's adapter layers which adapter each row of the pass uses.

Results travel to the asyncio side as `Piece`s on each job's queue, put there thread-safely. `BatchingEngine`
implements `camelid.jobs.Engine`, the interface `camelid serve`'s routes and `camelid eval answers` use.
"""

import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch import Tensor

from camelid.adapters import adapter_rows
from camelid.checkpoint import LoadedModel
from camelid.errors import CamelidError
from camelid.generate import PREFILL_CHUNK, DecodedText, process_logits
from camelid.native import torch_single_threaded
from camelid.jobs import Job, JobQueue, Piece, TokenLogprob, TokenRules, token_logprob

# Prompt tokens of each prompt being prefilled that a step runs while rows decode. A stream's gap between tokens is
# then its decode step plus this prefill pass. Measured on SmolLM2-135M, float32, 1 thread: a decode step 59 ms; a
# pass of 16 prompt tokens 122 ms, 32 162 ms, 48 198 ms, 256 710 ms (a pass costs the weights' reading, as a
# decode step does, plus ~3 ms a token). The goal is a gap under 4x the stream's pace: 16 gives ~3.1x,
# with room for a busy machine (32, ~3.7x, measured 3.3x to 5.1x in bench/serve.py), where 256 gave 11x. The cost
# is the prompt's own prefill while others decode, ~130 tok/s instead of ~360 (alone it goes PREFILL_CHUNK a pass).
PREFILL_BUDGET = 16


@dataclass
class _Slot:
    """A choice being decoded in one cache row."""

    job: Job
    choice: int
    budget: int
    generator: torch.Generator
    text: DecodedText
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is held back
    rules: TokenRules = field(init=False)  # logit_bias, penalties, grammar
    last: int = 0  # the token to feed next
    to_prefill: list[int] = field(default_factory=list)  # prompt tokens not in the cache yet

    def __post_init__(self):
        self.rules = TokenRules(self.job.params)


class BatchingEngine(JobQueue):
    """Generates for many requests at once on one model; `submit` from the asyncio side, `close` to stop.

    `prefill_chunk`: prompt tokens a step runs beside the decoding rows (0: prompts run whole before the next
    decode step, as before chunked prefill); `prefix_cache`: reuse what rows hold of earlier requests (module doc).
    """

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int = PREFILL_BUDGET, prefix_cache: bool = True):
        if prefill_chunk < 0:
            raise CamelidError(f"prefill_chunk must be at least 0 (0: whole prompts), not {prefill_chunk}")
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.cache = self.model.new_cache(max_batch, max_len)
        super().__init__(context=self.cache.max_len, max_batch=max_batch, max_queue=max_queue)
        self.device = self.model.model.embed_tokens.weight.device
        self.slots: list[_Slot | None] = [None] * max_batch
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        self.held: list[list[int]] = [[] for _ in range(max_batch)]  # the tokens each row's cache holds, in order
        self.held_by = [0] * max_batch  # the adapter that computed what each row holds
        self._start_worker("camelid-engine")

    # -- the asyncio side --------------------------------------------------------------------------------------

    @property
    def rows_in_use(self) -> int:
        return sum(s is not None for s in self.slots)

    def close(self) -> None:
        """Stop the worker; requests still running or waiting end as "cancelled"."""
        self._stop_worker()
        for slot in self.slots:
            if slot is not None:
                self._end(slot, "cancelled")
        self.slots = [None] * self.max_batch

    # -- the worker thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        logits = torch.empty(self.max_batch, self.model.config.vocab_size, device=self.device)
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not any(self.slots):
                    self._wake.wait()
                if self._closed:
                    return
            try:
                with torch.inference_mode(), torch_single_threaded(self.model):
                    self._drop_cancelled()
                    self._admit()
                    if any(self.slots):
                        self._sample_and_emit(logits)
                        self._decode(logits)
                        self._prefill(logits)
            except Exception:  # a bug, or out of memory, in a batched step: end the requests in it, keep serving
                traceback.print_exc(file=sys.stderr)
                self.held = [[] for _ in self.slots]  # what a failed step left in the cache is unknown
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._end(slot, "error")
                        self.slots[i] = None

    def _drop_cancelled(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.job.cancelled:
                self._end(slot, "cancelled")
                self.slots[i] = None

    @staticmethod
    def _end(slot: _Slot, reason: str) -> None:
        """Tell whoever still listens that this choice ended early ("cancelled", or "error" for a bug)."""
        slot.job.put(Piece(slot.choice, "", [], reason, len(slot.text.ids)))

    def _admit(self) -> None:
        """Move waiting jobs into free rows (all of a job's choices, or it waits); later steps prefill them."""
        while True:
            with self._wake:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    job.end(range(job.params.n))
                    continue
                free = [i for i, s in enumerate(self.slots) if s is None]
                if len(free) < job.params.n:
                    return
                self.waiting.popleft()
            budget = min(job.params.sampling.max_new_tokens, self.context - len(job.prompt))
            for choice in range(job.params.n):
                row, reused = self._pick_row(job, free)
                free.remove(row)
                self.cache.lengths[row] = reused
                del self.held[row][reused:]
                self.held_by[row] = job.params.adapter
                slot = _Slot(job, choice, budget, self._generator(job, choice), DecodedText(len(job.prompt)))
                slot.to_prefill = job.prompt[reused:]
                self.slots[row] = slot

    def _generator(self, job: Job, choice: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        seed = job.params.sampling.seed
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed((seed + choice) % 2**64)  # n choices from one seed: different, repeatable
        return generator

    def _pick_row(self, job: Job, free: list[int]) -> tuple[int, int]:
        """The free row for one of `job`'s choices, and how many prompt tokens its cache holds already: with the
        prefix cache, the row sharing the longest prefix with the prompt (the lowest of equals), else the lowest."""
        if not self.prefix_cache or job.params.prompt_logprobs is not None:  # those need every position's logits
            return free[0], 0
        most = len(job.prompt) - 1  # the last prompt token is always run: its logits pick the first answer token
        shared = [min(_shared_prefix(self.held[row], job.prompt), most) if self.held_by[row] == job.params.adapter
                  else 0 for row in free]
        best = shared.index(max(shared))
        return free[best], shared[best]

    def _sample_and_emit(self, logits: Tensor) -> None:
        for row, slot in enumerate(self.slots):
            if slot is None or slot.to_prefill:  # a row still prefilling has no logits to sample from yet
                continue
            try:
                self._sample_row(row, slot, logits)
            except Exception:  # a bug in this request's sampling: end it alone, keep the others going
                traceback.print_exc(file=sys.stderr)
                self._end(slot, "error")
                self.slots[row] = None

    def _sample_row(self, row: int, slot: _Slot, logits: Tensor) -> None:
        stop_ids = self.tokenizer.stop_ids
        params = slot.job.params
        sampling = params.sampling
        raw = logits[row : row + 1].float()
        shaped = slot.rules.shape(raw)
        history = None
        if sampling.repetition_penalty != 1.0:
            history = torch.tensor([slot.job.prompt + slot.text.ids], device=self.device)
        shaped = process_logits(shaped, sampling, history)
        if sampling.temperature == 0:
            token = int(shaped.argmax(-1))
        else:
            token = int(torch.multinomial(shaped.softmax(-1), 1, generator=slot.generator))
        finish = None
        if token in stop_ids and not sampling.ignore_eos:
            finish = "stop"  # the end-of-turn token is not part of the answer
        else:
            if params.logprobs is not None:
                slot.pending.append(token_logprob(raw[0], token, params.logprobs))
            slot.rules.took(token)
            self._generated(params)
            finish = slot.text.add(token, self.tokenizer, sampling.stop)
            if finish is None and len(slot.text.ids) >= slot.budget:
                finish = "length"
        new = slot.text.release(sampling.stop, final=finish is not None)
        if new or finish:
            pieces, slot.pending = slot.pending, []
            slot.job.put(Piece(slot.choice, new, pieces, finish, len(slot.text.ids)))
        slot.last = token
        if finish:
            self.slots[row] = None

    def _decode(self, logits: Tensor) -> None:
        """One token for every decoding row (rows up to the highest decoding; the others are fed but not advanced:
        what that writes lies past their length, where it is overwritten before anything reads it)."""
        decoding = [s is not None and not s.to_prefill for s in self.slots]
        n = max((i + 1 for i, d in enumerate(decoding) if d), default=0)
        if n == 0:
            return
        feed = torch.tensor([[s.last if d else 0] for s, d in zip(self.slots[:n], decoding)], device=self.device)
        live = torch.tensor(decoding[:n], device=self.device, dtype=torch.long)
        with adapter_rows(self.model, self._adapters(range(n))):
            hidden = self.model.hidden(feed, self.cache.rows(0, n), valid=live)
        logits[:n] = self.model.lm_head(hidden[:, -1])
        for row in range(n):
            if decoding[row]:
                self.held[row].append(self.slots[row].last)

    def _prefill(self, logits: Tensor) -> None:
        """Run the next prompt tokens of the rows being prefilled (every one of them when prefill_chunk is 0); a row
        whose prompt is done gets its logits, sampled at the next step."""
        while True:
            for run in self._runs(self._prefill_plan()):
                self._prefill_run(run, logits)
            if self.prefill_chunk or not any(s is not None and s.to_prefill for s in self.slots):
                return

    def _prefill_plan(self) -> list[tuple[int, int]]:
        """(row, tokens) to prefill now, in row order. While rows decode, each prompt advances by up to
        prefill_chunk tokens, as each decoding row advances by one. Else (or with prefill_chunk 0) the oldest
        requests' prompts go first, PREFILL_CHUNK tokens in all, the size of `generate`'s prefill passes."""
        rows = [i for i, s in enumerate(self.slots) if s is not None and s.to_prefill]
        if self.prefill_chunk and any(s is not None and not s.to_prefill for s in self.slots):
            return [(row, min(len(self.slots[row].to_prefill), self.prefill_chunk)) for row in rows]
        rows.sort(key=lambda i: (self.slots[i].job.submitted, self.slots[i].choice))
        left = PREFILL_CHUNK
        plan = []
        for row in rows:
            take = min(len(self.slots[row].to_prefill), left)
            if take == 0:
                break
            plan.append((row, take))
            left -= take
        return sorted(plan)

    def _runs(self, plan: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """`plan` in groups of adjacent rows, each run as one forward pass padded to its longest chunk; a row starts
        a group of its own where padding would more than double its group's work or write past the cache's end."""
        runs: list[list[tuple[int, int]]] = []
        for row, take in plan:
            grown = runs[-1] + [(row, take)] if runs and runs[-1][-1][0] == row - 1 else None
            width = max(t for _, t in grown) if grown else 0
            if grown and width * len(grown) <= 2 * sum(t for _, t in grown) and all(
                int(self.cache.lengths[r]) + width <= self.cache.max_len for r, _ in grown
            ):
                runs[-1] = grown
            else:
                runs.append([(row, take)])
        return runs

    def _prefill_run(self, run: list[tuple[int, int]], logits: Tensor) -> None:
        """Run the next `take` prompt tokens of each (row, take) of `run` (adjacent rows) in one forward pass."""
        first, width = run[0][0], max(take for _, take in run)
        feed = torch.zeros(len(run), width, dtype=torch.long)
        for i, (row, take) in enumerate(run):
            feed[i, :take] = torch.tensor(self.slots[row].to_prefill[:take])
        valid = torch.tensor([take for _, take in run], device=self.device)
        with adapter_rows(self.model, self._adapters(row for row, _ in run)):
            hidden = self.model.hidden(feed.to(self.device), self.cache.rows(first, first + len(run)), valid=valid)
        for i, (row, take) in enumerate(run):
            slot = self.slots[row]
            if slot.choice == 0 and slot.job.params.prompt_logprobs is not None:
                self._prompt_logprobs(slot.job, len(self.held[row]), hidden[i, :take])
            self.held[row] += slot.to_prefill[:take]
            slot.to_prefill = slot.to_prefill[take:]
            if not slot.to_prefill:
                logits[row] = self.model.lm_head(hidden[i, take - 1])

    def _adapters(self, rows) -> list[int]:
        """The adapter each of `rows` uses (the base for a row fed but not advanced)."""
        return [0 if self.slots[row] is None else self.slots[row].job.params.adapter for row in rows]

    def _prompt_logprobs(self, job: Job, start: int, hidden: Tensor) -> None:
        """Extend the job's prompt logprobs by those that the hidden states of positions start.. score: each
        position's logits score the prompt token after it (the first prompt token has none)."""
        if job.prompt_logprobs is None:
            job.prompt_logprobs = [None]
        targets = job.prompt[start + 1 : start + 1 + len(hidden)]
        for s in range(0, len(targets), PREFILL_CHUNK):  # bounds the [positions, vocab] logits held at once
            part = self.model.lm_head(hidden[s : s + PREFILL_CHUNK]).float()
            job.prompt_logprobs += [token_logprob(logits, token, job.params.prompt_logprobs)
                                    for logits, token in zip(part, targets[s : s + PREFILL_CHUNK])]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` start with in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

