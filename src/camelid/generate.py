"""Text generation: prefill the prompt into the KV cache, then decode one token at a time.

`generate` runs a batch of prompts of different lengths together (greedy results equal one-by-one runs);
`stream` yields the text of one prompt as it is produced. Sampling follows transformers' order of logit
processors: repetition penalty, temperature, top-k, top-p, min-p.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.native import torch_single_threaded

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds attention memory for long prompts


@dataclass
class SamplingParams:
    """How to pick each next token: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 disable those.

    The defaults are llama.cpp's.
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()  # generation ends before the first of these strings (which is not returned)
    stop_token_ids: Sequence[int] = ()  # besides the tokenizer's own end-of-turn tokens
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, "a number >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1 disables it)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise CamelidError(f"invalid {name} {getattr(self, name)!r}: expected {expected}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise CamelidError("invalid stop: stop strings must not be empty")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"
    prompt_tokens: int
    stop_token: int | None = None  # the stop token that ended it (not part of token_ids), if one did


class DecodedText:
    """The text of one sequence being generated: its tokens, their text, and how much has been handed out."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token that ended the sequence, if one did

    def add(self, token: int, tokenizer, stops: Sequence[str]) -> str | None:
        """Append a generated token; "stop" when the text now holds a stop string (cut before it), else None."""
        self.ids.append(token)
        self.text = tokenizer.decode(self.ids)
        hit = min((self.text.find(s) for s in stops if s in self.text), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return "stop"
        return None

    def release(self, stops: Sequence[str], final: bool) -> str:
        """The new text that is safe to hand out: no half-decoded character, no possible stop prefix."""
        text = self.text
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence; the next token completes it
                text = text.rstrip("\ufffd")
            held = max((len(s) - 1 for s in stops), default=0)
            text = text[: max(len(text) - held, self.emitted)]
        new = text[self.emitted :]
        self.emitted = len(text)
        return new


def process_logits(logits: Tensor, params: SamplingParams, history: Tensor | None) -> Tensor:
    """The float logits [B, vocab] that the next token is drawn from: repetition penalty, then (when sampling)
    temperature, top-k, top-p and min-p; tokens a filter removes are -inf. `history` [B, n] holds each row's
    tokens so far (None: no penalty)."""
    logits = logits.float()
    finite = torch.finfo(logits.dtype).max
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen.clamp(-finite, finite))  # a tiny penalty must not make inf
    if params.temperature == 0:
        return logits
    scaled = logits / params.temperature
    if not scaled.isfinite().all():  # a tiny temperature overflowed: shift the largest to 0 first (same softmax)
        tiny = max(params.temperature, torch.finfo(logits.dtype).tiny)  # not 0 in float32
        scaled = (logits - logits.max(-1, keepdim=True).values) / tiny
    logits = scaled
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and always the likeliest token (a top_p below float32's range would drop them all)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(logits: Tensor, params: SamplingParams, history: Tensor | None, generator) -> Tensor:
    """Next token ids [B] from float logits [B, vocab]; `history` [B, n] holds each row's tokens so far."""
    logits = process_logits(logits, params, history)
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _generate(
    model: Llama, tokenizer, prompts: list[list[int]], params: SamplingParams, rows: list[DecodedText]
) -> Iterator[list[tuple[int, str, str | None]]]:
    """Decode a batch into `rows`; yield, after every step, (row, new text, finish reason or None) per live row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CamelidError("empty prompt: give at least one token of input")
    context = model.config.max_sequence_length
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise CamelidError(
            f"the prompt is {longest} tokens but the model's context is {context}; shorten the prompt"
        )
    # each row's own budget: a short prompt batched with a long one still gets all its new tokens
    budgets = [min(params.max_new_tokens, context - len(p)) for p in prompts]
    device = model.model.embed_tokens.weight.device
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.stop_ids))
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # a fresh random seed for this generator only; torch's global RNG is left alone
    else:
        generator.manual_seed(params.seed)
    rows[:] = [DecodedText(len(p)) for p in prompts]

    # Inference mode is entered around each step, never across a `yield`: the caller's code between pieces (and
    # after an abandoned stream) runs in its own grad mode.
    with torch.inference_mode(), torch_single_threaded(model):
        cache = model.new_cache(len(prompts), max(len(p) + b for p, b in zip(prompts, budgets)))
        logits = prefill(model, cache, prompts)

    for _ in range(max(budgets)):
        with torch.inference_mode(), torch_single_threaded(model):
            hist = None
            if params.repetition_penalty != 1.0:
                # each row's prompt and output, right-padded with its last token (penalising twice is a no-op)
                seqs = [p + r.ids for p, r in zip(prompts, rows)]
                width = max(len(q) for q in seqs)
                hist = torch.tensor([q + q[-1:] * (width - len(q)) for q in seqs], device=device)
            next_ids = sample_next(logits, params, hist, generator).tolist()
        events = []
        for i, (row, tok) in enumerate(zip(rows, next_ids)):
            if row.finish_reason:
                continue
            if tok in stop_ids:
                row.finish_reason, row.stop_token = "stop", tok
            else:
                row.finish_reason = row.add(tok, tokenizer, params.stop)
                if row.finish_reason is None and len(row.ids) == budgets[i]:
                    row.finish_reason = "length"
            events.append((i, row.release(params.stop, final=row.finish_reason is not None), row.finish_reason))
        yield events
        if all(r.finish_reason for r in rows):
            return
        with torch.inference_mode(), torch_single_threaded(model):
            feed = torch.tensor([[t] for t in next_ids], device=device)
            live = torch.tensor([r.finish_reason is None for r in rows], device=device)
            # finished rows are fed but not advanced, so they never outgrow their budget's share of the cache
            logits = model.lm_head(model.hidden(feed, cache, valid=live.long())[:, -1])


def prefill(model: Llama, cache, prompts: list[list[int]]) -> Tensor:
    """Run the prompts into `cache` (row i from its current length); each row's logits after its last prompt
    token [B, vocab]."""
    B, longest = len(prompts), max(len(p) for p in prompts)
    device = model.model.embed_tokens.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    padded = torch.zeros(B, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    padded = padded.to(device)
    last_hidden = torch.empty(B, model.config.hidden_size, device=device, dtype=model.model.embed_tokens.weight.dtype)
    for start in range(0, longest, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, longest)
        valid = (lengths - start).clamp(0, end - start)
        h = model.hidden(padded[:, start:end], cache, valid=valid)
        ends_here = (lengths > start) & (lengths <= end)
        idx = ends_here.nonzero().squeeze(-1)
        last_hidden[idx] = h[idx, lengths[idx] - 1 - start]
    return model.lm_head(last_hidden)


@torch.inference_mode()
def generate(model: Llama, tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    """Complete every prompt (token ids) in one batch."""
    rows: list[DecodedText] = []
    texts = [""] * len(prompts)
    for events in _generate(model, tokenizer, prompts, params, rows):
        for i, new, _ in events:
            texts[i] += new
    return [
        Completion(text=t, token_ids=r.ids, finish_reason=r.finish_reason, prompt_tokens=r.prompt_len,
                   stop_token=r.stop_token)
        for t, r in zip(texts, rows)
    ]


def stream(model: Llama, tokenizer, prompt: list[int], params: SamplingParams) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece as it is generated."""
    for events in _generate(model, tokenizer, [prompt], params, []):
        for _, new, _ in events:
            if new:
                yield new
