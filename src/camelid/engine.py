"""Continuous batching: concurrent requests share the decode steps of one model.

One worker thread owns the model and a KV cache of `max_batch` rows. Between decode steps it admits waiting
requests into free rows (prefilling each prompt on its own row) and frees the rows of requests that finished
or were cancelled, so a request joins or leaves the running batch without waiting for the others. Each decode
step feeds one token for rows 0..n-1, where n - 1 is the highest row in use: new requests take the lowest free
row, so a lone request decodes exactly as `camelid generate` does (a batch of one).

Results travel to the asyncio side as `Piece`s on each job's queue, put there thread-safely. `BatchingEngine`
implements `camelid.jobs.Engine`, the interface `camelid serve`'s routes and `camelid eval answers` use.
"""

import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch import Tensor

from camelid.checkpoint import LoadedModel
from camelid.generate import DecodedText, prefill, process_logits
from camelid.native import torch_single_threaded
from camelid.jobs import Job, JobQueue, Piece, TokenLogprob, token_logprob


@dataclass
class _Slot:
    """A choice being decoded in one cache row."""

    job: Job
    choice: int
    budget: int
    generator: torch.Generator
    text: DecodedText
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is held back
    counts: dict[int, int] = field(default_factory=dict)  # output token -> times generated (penalties)
    last: int = 0  # the token to feed next


class BatchingEngine(JobQueue):
    """Generates for many requests at once on one model; `submit` from the asyncio side, `close` to stop."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.cache = self.model.new_cache(max_batch, max_len)
        super().__init__(context=self.cache.max_len, max_batch=max_batch, max_queue=max_queue)
        self.device = self.model.model.embed_tokens.weight.device
        self.slots: list[_Slot | None] = [None] * max_batch
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
                    self._admit(logits)
                    if any(self.slots):
                        self._sample_and_emit(logits)
                        self._decode(logits)
            except Exception:  # a bug, or out of memory, in a batched step: end the requests in it, keep serving
                traceback.print_exc(file=sys.stderr)
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

    def _admit(self, logits: Tensor) -> None:
        """Move waiting jobs into free rows (all of a job's choices, or it waits), prefilling each row."""
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
            for choice, row in enumerate(free[: job.params.n]):
                generator = torch.Generator(device=self.device)
                seed = job.params.sampling.seed
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed((seed + choice) % 2**64)  # n choices from one seed: different, repeatable
                self.cache.lengths[row] = 0
                logits[row] = prefill(self.model, self.cache.rows(row, row + 1), [job.prompt])[0]
                self.slots[row] = _Slot(job, choice, budget, generator, DecodedText(len(job.prompt)))

    def _sample_and_emit(self, logits: Tensor) -> None:
        for row, slot in enumerate(self.slots):
            if slot is None:
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
        shaped = raw
        if slot.counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(slot.counts), device=self.device)
            counts = torch.tensor(list(slot.counts.values()), device=self.device, dtype=raw.dtype)
            shaped = raw.clone()
            shaped[0, ids] -= params.presence_penalty + params.frequency_penalty * counts
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
            slot.counts[token] = slot.counts.get(token, 0) + 1
            self.generated_tokens += 1
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
        """One token for every row in use (rows up to the highest in use; empty ones are fed but not advanced)."""
        n = max((i + 1 for i, s in enumerate(self.slots) if s is not None), default=0)
        if n == 0:
            return
        feed = torch.tensor([[s.last if s else 0] for s in self.slots[:n]], device=self.device)
        live = torch.tensor([s is not None for s in self.slots[:n]], device=self.device, dtype=torch.long)
        hidden = self.model.hidden(feed, self.cache.rows(0, n), valid=live)
        logits[:n] = self.model.lm_head(hidden[:, -1])

