"""The server's engine for `--backend llamacpp`: `camelid.jobs.Engine`, the engine interface, on llama.cpp.

llama-cpp-python's `Llama` runs one sequence, so one worker thread answers the requests one at a time, first
come first served, and the `n` choices of a request one after another. A request waiting in line, or being
answered, that its client gave up on is dropped before its next token. The prompt reuses what llama.cpp's KV
cache still holds of the previous request (a shared system prompt, the earlier turns of a chat).
Sampling, penalties, stop strings and logprobs are camelid's, from llama.cpp's logits (see camelid.llamacpp).
"""

import dataclasses
import sys
import traceback
from contextlib import closing

from camelid.errors import CamelidError
from camelid.llamacpp import LlamaCppModel, steps
from camelid.jobs import GenerationParams, Job, JobQueue, Piece, TokenRules, token_logprob


class LlamaCppEngine(JobQueue):
    """Answers requests one at a time on a llama.cpp model; `submit` from the asyncio side, `close` to stop.

    `max_batch` only bounds a request's `n` here (its choices run one after another).
    """

    n_limit = "sequences a request"

    def __init__(self, loaded: LlamaCppModel, *, max_batch: int = 8, max_queue: int = 64):
        super().__init__(context=loaded.config.max_sequence_length, max_batch=max_batch, max_queue=max_queue)
        self.loaded = loaded
        self.llm, self.tokenizer = loaded.model, loaded.tokenizer
        self.running: Job | None = None
        self._start_worker("camelid-llamacpp")

    # -- the asyncio side --------------------------------------------------------------------------------------

    @property
    def rows_in_use(self) -> int:
        return int(self.running is not None)

    def submit(self, prompt: list[int], params: GenerationParams) -> Job:
        if params.prompt_logprobs is not None:  # llama-cpp-python keeps only the last position's logits
            raise CamelidError("echo with logprobs is not supported on the llama.cpp backend; use --backend camelid")
        return super().submit(prompt, params)

    def close(self) -> None:
        """Stop the worker; requests still running or waiting end as "cancelled". The model stays loaded."""
        self._stop_worker()

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
                        job.end(range(choice, job.params.n))
                        break
                    try:
                        self._answer(job, choice)
                    except Exception:  # a bug, or llama.cpp failing: end this choice, keep serving
                        traceback.print_exc(file=sys.stderr)
                        job.end([choice], "error")
            finally:
                self.running = None

    def _answer(self, job: Job, choice: int) -> None:
        params = job.params
        sampling = params.sampling
        if sampling.seed is not None and choice:  # n choices from one seed: different, repeatable
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + choice) % 2**64)
        pending = []  # logprobs of tokens whose text is held back
        decoding = steps(self.llm, self.tokenizer, job.prompt, sampling, TokenRules(params))
        with closing(decoding):
            for step in decoding:
                if job.cancelled or self._closed:
                    job.put(Piece(choice, "", [], "cancelled", step.tokens))
                    return
                if step.token is not None:
                    self._generated(params)
                    if params.logprobs is not None:
                        pending.append(token_logprob(step.logits, step.token, params.logprobs))
                if step.text or step.finish_reason:
                    job.put(Piece(choice, step.text, pending, step.finish_reason, step.tokens))
                    pending = []
