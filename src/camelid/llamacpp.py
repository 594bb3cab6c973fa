"""The llama.cpp backend: a GGUF file run by llama-cpp-python, with everything around the logits camelid's own.

llama.cpp computes the logits; camelid tokenizes (its tokenizer and chat template, so the prompt ids are the ones
camelid's model would get), samples, cuts at stop strings and releases streamed text (`DecodedText`).

Sampling happens in camelid, from llama.cpp's logits, rather than in llama.cpp's sampler chain: the two do not
compute the same distribution. llama.cpp applies top-k, top-p and min-p before the temperature and penalises
repeats in the last 64 tokens only; camelid follows transformers (temperature first) and penalises the whole
context. Greedy decoding is the argmax of llama.cpp's own logits, so it equals llama.cpp's greedy output.

`load_llamacpp` gives a `LlamaCppModel`, which stands where a `LoadedModel` does for chat and serving;
`generate` and `stream` take the same arguments as `camelid.generate`'s.
"""

import dataclasses
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.generate import Completion, DecodedText, SamplingParams, process_logits

INSTALL = "pip install 'camelid[llamacpp]'"
# llama.cpp allocates the KV cache for the whole context up front; camelid's server caps it the same way.
DEFAULT_CONTEXT = 4096


@dataclass
class LlamaCppModel:
    """A GGUF model on llama.cpp with camelid's tokenizer and chat template (usable where a LoadedModel is)."""

    model: Any  # a llama_cpp.Llama; its KV cache keeps the last prompt, for the next one to reuse
    tokenizer: "Tokenizer"  # noqa: F821 (camelid.tokenizer.Tokenizer)
    chat_template: str | None
    source: Path
    config: ModelConfig  # the file's, with max_position_embeddings cut to the context llama.cpp was given
    threads: int

    def close(self) -> None:
        self.model.close()


def load_llamacpp(spec: str | Path, *, n_ctx: int | None = None, threads: int | None = None) -> LlamaCppModel:
    """Load a GGUF model (a name from `camelid models` or a .gguf file) on llama.cpp.

    `n_ctx` is the context in tokens, prompt and answer together (default: the model's own, at most 4096);
    `threads` is llama.cpp's thread count for prompts and decoding (default: torch's, as camelid's own backend).
    Sampling runs in torch, on [vocab] tensors: while llama.cpp's threads use the cores, torch's extra threads only
    wait for them, so `camelid` gives torch one thread with this backend (`torch.set_num_threads(1)`).
    """
    from camelid.checkpoint import config_from_gguf, resolve_model_path
    from camelid.gguf_file import GGUFFile
    from camelid.tokenizer import tokenizer_from_gguf

    path = resolve_model_path(spec)
    if path.is_dir():
        raise CamelidError(
            f"{spec} is a model directory; --backend llamacpp runs GGUF files only: write one with "
            f"`camelid export gguf {spec} OUT.gguf` first, or use --backend camelid"
        )
    try:
        import llama_cpp
    except ImportError:
        raise CamelidError(f"--backend llamacpp needs llama-cpp-python: {INSTALL}") from None
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    tokenizer = tokenizer_from_gguf(gguf.metadata)
    n_ctx = n_ctx or min(config.max_sequence_length, DEFAULT_CONTEXT)
    if not 1 < n_ctx <= config.max_sequence_length:
        raise CamelidError(f"context {n_ctx} is out of range for {path.name}: give 2 to {config.max_sequence_length}")
    if threads is not None and threads < 1:
        raise CamelidError(f"threads must be at least 1, not {threads}")
    threads = threads or torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    if llm.n_vocab() != config.vocab_size:
        raise CamelidError(f"{path.name}: llama.cpp reads {llm.n_vocab()} tokens, camelid {config.vocab_size}")
    context = min(llm.n_ctx(), config.max_sequence_length)  # llama.cpp rounds n_ctx up to a multiple of 256
    return LlamaCppModel(
        model=llm, tokenizer=tokenizer, chat_template=gguf.metadata.get("tokenizer.chat_template") or None,
        source=path, config=dataclasses.replace(config, max_position_embeddings=context), threads=threads,
    )


@dataclass
class Step:
    """One decoded token of an answer."""

    token: int | None  # the token added to the answer; None when the step ended on an end-of-turn token
    logits: Tensor  # llama.cpp's logits [vocab] the token was drawn from, before any penalty
    text: str  # new answer text that is safe to show
    finish_reason: str | None  # "stop", "length" or None
    tokens: int  # the answer's tokens so far


def steps(llm, tokenizer, prompt: list[int], params: SamplingParams, rules=None) -> Iterator[Step]:
    """Decode one prompt (token ids) on a llama_cpp.Llama, a token per step. `rules` (a camelid.jobs.TokenRules:
    a request's logit_bias, penalties and grammar, as camelid's server applies them) shape each step's logits."""
    if not prompt:
        raise CamelidError("empty prompt: give at least one token of input")
    context = llm.n_ctx()
    if len(prompt) >= context:
        raise CamelidError(f"the prompt is {len(prompt)} tokens but the context is {context}; shorten the prompt")
    budget = min(params.max_new_tokens, context - len(prompt))
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.stop_ids))
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()  # this generator only; torch's global RNG is left alone
    else:
        generator.manual_seed(params.seed)
    text = DecodedText(len(prompt))
    try:
        _evaluate_prompt(llm, prompt)
        while True:
            raw = _last_logits(llm)
            shaped = raw[None] if rules is None else rules.shape(raw[None].float())
            history = torch.tensor([prompt + text.ids]) if params.repetition_penalty != 1.0 else None
            token = _sample(shaped, params, history, generator)
            if token in stop_ids:
                kept, finish = None, "stop"  # the end-of-turn token is not part of the answer
            else:
                kept, finish = token, text.add(token, tokenizer, params.stop)
                if rules is not None:
                    rules.took(token)
                if finish is None and len(text.ids) >= budget:
                    finish = "length"
            yield Step(kept, raw, text.release(params.stop, final=finish is not None), finish, len(text.ids))
            if finish:
                return
            llm.eval([token])
    finally:
        # Only the prompt stays in the cache for the next prompt to reuse: see _evaluate_prompt.
        llm.n_tokens = min(llm.n_tokens, len(prompt))


def stream(llm, tokenizer, prompt: list[int], params: SamplingParams) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece (as `camelid.generate.stream`, on llama.cpp)."""
    with closing(steps(llm, tokenizer, prompt, params)) as decoding:
        for step in decoding:
            if step.text:
                yield step.text


def generate(llm, tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    """Complete every prompt, one after another (as `camelid.generate.generate`, on llama.cpp)."""
    out = []
    for prompt in prompts:
        text, ids, finish = "", [], None
        for step in steps(llm, tokenizer, prompt, params):
            text += step.text
            ids += [] if step.token is None else [step.token]
            finish = step.finish_reason
        out.append(Completion(text=text, token_ids=ids, finish_reason=finish, prompt_tokens=len(prompt)))
    return out


def _evaluate_prompt(llm, prompt: list[int]) -> None:
    """Run the prompt into llama.cpp's KV cache, keeping what the cache holds of the same tokens (a shared system
    prompt, the earlier turns of a chat), so that the answer is the one a fresh run gives.

    llama.cpp computes a batch of one token (a decode step) with other kernels than a batch of several, and the
    results differ in the last digits, enough to change a greedy choice now and then. So the cache keeps only
    tokens that were evaluated as part of a prompt (`steps` drops the answer's), and no batch here is of one
    token unless the prompt is: the rows of a multi-token batch do not depend on each other or on its size.
    """
    held = llm.input_ids[: llm.n_tokens].tolist()
    keep = 0
    for a, b in zip(held, prompt[: len(prompt) - 2]):  # at least the last two run, for the logits
        if a != b:
            break
        keep += 1
    llm.n_tokens = keep  # Llama.eval drops the cache from position n_tokens on before it runs the rest
    rest = prompt[keep:]
    chunks = [rest[i : i + llm.n_batch] for i in range(0, len(rest), llm.n_batch)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [chunks[-2][:-1], chunks[-2][-1:] + chunks[-1]]
    for chunk in chunks:
        llm.eval(chunk)


def _last_logits(llm) -> Tensor:
    """The logits [vocab] after the last token evaluated (llama-cpp-python keeps them only with logits_all)."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy())


def _sample(logits: Tensor, params: SamplingParams, history: Tensor | None, generator: torch.Generator) -> int:
    """The next token from logits [1, vocab], by camelid's `process_logits`."""
    if params.temperature == 0:
        return int(process_logits(logits, params, history).argmax(-1))
    if 0 < params.top_k < logits.shape[-1]:
        # Only the top-k candidates (ties at the k-th included, as process_logits keeps them) go through
        # temperature, top-p and min-p: the same distribution, without sorting the whole vocabulary for top-p on
        # every token (7 ms for SmolLM2's 49K logits on one core, against ~25 ms for llama.cpp's step).
        penalised = process_logits(logits, dataclasses.replace(params, temperature=0), history)
        kth = torch.topk(penalised, params.top_k).values[:, -1:]
        ids = (penalised[0] >= kth[0]).nonzero().squeeze(-1)
        rest = dataclasses.replace(params, top_k=0, repetition_penalty=1.0)
        shaped = process_logits(penalised[:, ids], rest, None)
        return int(ids[torch.multinomial(shaped.softmax(-1), 1, generator=generator)])
    shaped = process_logits(logits, params, history)
    return int(torch.multinomial(shaped.softmax(-1), 1, generator=generator))
