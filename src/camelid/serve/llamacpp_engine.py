"""The server's engine for `--backend llamacpp`: the interface of `camelid.serve.engine.Engine` on llama.cpp.

llama-cpp-python's `Llama` runs one sequence, so one worker thread answers the requests one at a time, first
come first served, and the `n` choices of a request one after another. A request waiting in line, or being
answered, that its client gave up on is dropped before its next token. The prompt reuses what llama.cpp's KV
cache still holds of the previous request (a shared system prompt, the earlier turns of a chat).
Sampling, penalties, stop strings and logprobs are camelid's, from llama.cpp's logits (see camelid.llamacpp).
"""

import collections
import dataclasses
import sys
import threading
import traceback
from contextlib import closing

from camelid.llamacpp import LlamaCppModel, steps
from camelid.serve.engine import Job, JobQueue, Piece, _logprob


class LlamaCppEngine(JobQueue):
    """Answers requests one at a time on a llama.cpp model; `submit` from the asyncio side, `close` to stop.

    `max_batch` only bounds a request's `n` here (its choices run one after another).
    """

    n_limit = "sequences a request"

    def __init__(self, loaded: LlamaCppModel, *, max_batch: int = 8, max_queue: int = 64):
        self.loaded = loaded
        self.llm, self.tokenizer = loaded.model, loaded.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = loaded.config.max_sequence_length
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.generated_tokens = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="camelid-llamacpp", daemon=True)
        self._thread.start()

    # -- the asyncio side --------------------------------------------------------------------------------------

    @property
    def rows_in_use(self) -> int:
        return int(self.running is not None)

    def close(self) -> None:
        """Stop the worker; requests still running or waiting end as "cancelled". The model stays loaded."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for job in self.waiting:
            _cancel(job, range(job.params.n))
        self.waiting.clear()

    # -- the worker thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting:
                    self._wake.wait()
                if self._closed:
                    return
                job = self.running = self.waiting.popleft()
            try:
                for choice in range(job.params.n):
                    if job.cancelled or self._closed:
                        _cancel(job, range(choice, job.params.n))
                        break
                    try:
                        self._answer(job, choice)
                    except Exception:  # a bug, or llama.cpp failing: end this choice, keep serving
                        traceback.print_exc(file=sys.stderr)
                        job._put(Piece(choice, "", [], "error", 0))
            finally:
                self.running = None

    def _answer(self, job: Job, choice: int) -> None:
        params = job.params
        sampling = params.sampling
        if sampling.seed is not None and choice:  # n choices from one seed: different, repeatable
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + choice) % 2**64)
        pending = []  # logprobs of tokens whose text is held back
        decoding = steps(self.llm, self.tokenizer, job.prompt, sampling, presence_penalty=params.presence_penalty,
                         frequency_penalty=params.frequency_penalty)
        with closing(decoding):
            for step in decoding:
                if job.cancelled or self._closed:
                    job._put(Piece(choice, "", [], "cancelled", step.tokens))
                    return
                if step.token is not None:
                    self.generated_tokens += 1
                    if params.logprobs is not None:
                        pending.append(_logprob(step.logits, step.token, params.logprobs))
                if step.text or step.finish_reason:
                    job._put(Piece(choice, step.text, pending, step.finish_reason, step.tokens))
                    pending = []


def _cancel(job: Job, choices) -> None:
    for choice in choices:
        job._put(Piece(choice, "", [], "cancelled", 0))
