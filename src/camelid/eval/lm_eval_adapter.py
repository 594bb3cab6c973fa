"""camelid models in lm-evaluation-harness: the model type `camelid`, on camelid's own forward and `generate`.

Importing this module registers the type (camelid itself never imports lm_eval). From Python:
`lm_eval.simple_evaluate(model=CamelidLM("model.gguf"), tasks=["arc_easy"])`. From the shell, this module runs
lm-eval's own command line with the type registered; that command line passes the device (cuda:0 unless told)
and the batch size (1 unless told) itself:

    python -m camelid.eval.lm_eval_adapter --model camelid --model_args pretrained=MODEL,dtype=float32 \\
        --tasks arc_easy --batch_size 16 --device cpu

Requests are scored as lm-eval's Hugging Face backend (HFLM) scores them, by the same code as `camelid eval`
(camelid.eval.likelihood): a (context, continuation) pair is tokenised by lm-eval itself and cut from the left
to the model's context; `loglikelihood_rolling` uses lm-eval's rolling windows (non-overlapping windows of
`max_length`, the last one full). One difference: where the tokenizer adds BOS by itself (LLaMA), HFLM's
rolling windows score that BOS after the prefix BOS; here the text is scored after one BOS, as `camelid eval
perplexity` scores it.
"""

import json
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from camelid.checkpoint import LoadedModel, load_model
from camelid.errors import CamelidError
from camelid.eval.likelihood import continuation_scores, encode_text, prefix_token, sequence_nll, text_example
from camelid.generate import SamplingParams, generate
from camelid.named_models import DEFAULT_MODEL

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's aliases
SAMPLING_KEYS = {"until", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"}


@register_model("camelid")
class CamelidLM(TemplateLM):
    """A camelid model as an lm-eval LM.

    pretrained: a named model, a GGUF file, an HF directory or a LoRA adapter directory (as `load_model`), or a
        LoadedModel already in memory (then device, dtype and quantize are not used).
    device, dtype, quantize: as `load_model` (defaults: cuda when there is one, float32 on CPU, bfloat16 on CUDA).
    batch_size: sequences per forward pass; lm-eval's "auto" takes the default, 16.
    max_length: the longest sequence run (default: the model's context).
    max_gen_toks: tokens generated when a request does not say (lm-eval's default, 256).
    max_batch_size: accepted because lm-eval passes it; not used.
    """

    def __init__(
        self,
        pretrained: str | LoadedModel = DEFAULT_MODEL,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        quantize: str = "none",
        max_batch_size: int | None = None,
    ):
        super().__init__()
        if isinstance(pretrained, LoadedModel):
            self.loaded = pretrained
        else:
            self.loaded = load_model(pretrained, device=device, dtype=dtype, quantize=quantize)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self._device = self.model.model.embed_tokens.weight.device
        self.batch_size = _batch_size(batch_size)
        limit = self.model.config.max_sequence_length
        if max_length is not None and not 1 <= int(max_length) <= limit:
            raise CamelidError(f"invalid max_length {max_length}: expected 1 to {limit} (the model's context)")
        self._max_length = int(max_length) if max_length is not None else limit
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM needs -----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return encode_text(self.tokenizer, string)
        return self.tokenizer.encode(string, add_special=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        return self.tokenizer.decode(tokens, skip_special=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each ((context, continuation), context tokens, continuation tokens)."""
        pairs = [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
        scores = continuation_scores(
            self.model, pairs, context=self.max_length, batch_size=self.batch_size, progress=not disable_tqdm
        )
        results = [(s.logprob, s.greedy) for s in scores]
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    # -- the rest of LM ------------------------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the prefix token, in lm-eval's rolling windows."""
        texts = [req.args[0] for req in requests]
        examples = [text_example(self.tokenizer, text) for text in texts]
        scores = sequence_nll(
            self.model, examples, context=self.max_length, stride=self.max_length, batch_size=self.batch_size,
            progress=not disable_tqdm,
        )
        results = [-s.nll for s in scores]
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string or end of turn, greedily unless the request samples."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one SamplingParams per group of requests asking the same
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            params = self._sampling(requests[indices[0]].args[1])
            room = self.max_length - params.max_new_tokens
            if room < 1:
                raise CamelidError(
                    f"max_gen_toks {params.max_new_tokens} leaves no room for a prompt in max_length {self.max_length}"
                )
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths together
            for s in range(0, len(order), self.batch_size):
                batch = order[s : s + self.batch_size]
                for i, done in zip(batch, generate(self.model, self.tokenizer, [prompts[i] for i in batch], params)):
                    results[i] = done.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, done.text)
                bar.update(len(batch))
        bar.close()
        return results

    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        """lm-eval's generation arguments as SamplingParams: greedy unless do_sample (or a temperature) asks."""
        kwargs = dict(gen_kwargs)
        unused = set(kwargs) - SAMPLING_KEYS - set(MAX_TOKEN_KEYS)
        if unused:
            log.warning("camelid ignores these generation arguments: %s", ", ".join(sorted(unused)))
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = next((kwargs[k] for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None), self.max_gen_toks)
        do_sample = kwargs.get("do_sample")
        temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
        if do_sample is False:
            temperature = 0.0
        return SamplingParams(
            max_new_tokens=int(max_new),
            temperature=temperature,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            min_p=float(kwargs.get("min_p") or 0.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            seed=kwargs.get("seed"),
            stop=tuple(s for s in until if s),
        )

    # -- chat templates (lm-eval's --apply_chat_template) ---------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.source).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.loaded.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from camelid.chat import chat_template_for

        return chat_template_for(self.loaded).render(chat_history, add_generation_prompt=add_generation_prompt)


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise CamelidError(f"invalid batch_size {value!r}: expected an integer >= 1 or auto") from None
    if size < 1:
        raise CamelidError(f"invalid batch_size {value!r}: expected an integer >= 1 or auto")
    return size


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
