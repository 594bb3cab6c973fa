"""The per-token cost of constrained decoding: llguidance against xgrammar, on the vocabularies of named models.

For each model's tokenizer (SmolLM2: 49,152 tokens; Gemma 3: 262,144) and each JSON schema below, both engines
compile the schema, then walk one valid answer token by token (the answer as the model's tokenizer writes it),
computing the next-token mask before each token and accepting it after. Printed per engine and vocabulary:

  compile ms      schema to a ready matcher (reading the vocabulary is done once per server: printed apart)
  mask us/token   mean time to compute one token's mask, and its 99th percentile
  accept us/token mean time to advance the matcher by one token

camelid serves with the faster engine's mask on the worker thread between decode steps, so the mask time adds
to every constrained row's step (a decode step of SmolLM2 int8 on 2 cores is ~20-50 ms).

    python bench/grammar.py [--models smollm2-135m-instruct,gemma3-270m] [--repeat 3]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from preference import cpu_name  # noqa: E402  (bench/preference.py: the CPU and its instruction sets)

SCHEMAS = {
    "flat object": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested, arrays, enum": (
        {"type": "object", "properties": {
            "city": {"type": "string"},
            "days": {"type": "array", "items": {"type": "object", "properties": {
                "day": {"type": "string", "enum": ["mon", "tue", "wed"]},
                "temps": {"type": "array", "items": {"type": "number"}}}, "required": ["day", "temps"]}}},
         "required": ["city", "days"]},
        {"city": "Lima", "days": [{"day": "mon", "temps": [18.5, 21]}, {"day": "tue", "temps": [17, 19.25]}]},
    ),
    "any JSON object": ({"type": "object"}, {"answer": "yes", "confidence": 0.9, "tags": ["a", "b"]}),
}


def vocabulary(tokenizer, size: int) -> list[bytes]:
    return [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(size)]


def llguidance_tokenizer(tokenizer, size: int):
    import llguidance

    class Wrapped:  # what llguidance.TokenizerWrapper reads
        eos_token_id = min(tokenizer.stop_ids)
        bos_token_id = None
        tokens = vocabulary(tokenizer, size)
        special_token_ids = sorted(tokenizer.stop_ids)

        def __call__(self, text):
            return tokenizer.encode(text.decode() if isinstance(text, bytes) else text, add_special=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=size,
                                  eos_token=sorted(tokenizer.stop_ids))


def llguidance_walk(ll_tok, size: int, schema: dict, answer: list[int]) -> dict:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    matcher = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    compiled = time.perf_counter() - start
    mask = llguidance.torch.allocate_token_bitmask(1, size)
    return walk(answer, compiled, lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask), mask,
                matcher.consume_token)


def xgrammar_tokenizer(tokenizer, size: int):
    import xgrammar

    info = xgrammar.TokenizerInfo(vocabulary(tokenizer, size), vocab_size=size,
                                  stop_token_ids=sorted(tokenizer.stop_ids))
    return xgrammar.GrammarCompiler(info, cache_enabled=False)


def xgrammar_walk(compiler, size: int, schema: dict, answer: list[int]) -> dict:
    import xgrammar

    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
    compiled = time.perf_counter() - start
    mask = xgrammar.allocate_token_bitmask(1, size)
    return walk(answer, compiled, lambda: matcher.fill_next_token_bitmask(mask), mask, matcher.accept_token)


def walk(answer: list[int], compiled: float, fill, mask, accept) -> dict:
    """Mask, check and accept each token of `answer`, timing the mask and the accept."""
    masks, accepts = [], []
    for token in answer:
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        assert mask[0, token // 32] >> (token % 32) & 1, "the engine refused a token of a valid answer"
        assert accept(token)
        accepts.append(time.perf_counter() - t1)
        masks.append(t1 - t0)
    return {"compile": compiled, "mask": masks, "accept": accepts}


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m",
                        help="comma-separated models (named models or paths) whose tokenizers to measure on")
    parser.add_argument("--repeat", type=int, default=3, help="walks of each answer; the best mean is kept")
    args = parser.parse_args()
    from camelid.checkpoint import load_tokenizer_and_template

    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    print(f"{'model':24} {'vocab':>7} {'schema':22} {'engine':11} {'compile ms':>10} {'mask us/tok':>11} "
          f"{'p99 us':>8} {'accept us':>9}")
    for spec in args.models.split(","):
        tokenizer, _ = load_tokenizer_and_template(spec)
        size = tokenizer.vocab_size
        engines = {}
        for engine, setup, walker in (("llguidance", llguidance_tokenizer, llguidance_walk),
                                      ("xgrammar", xgrammar_tokenizer, xgrammar_walk)):
            start = time.perf_counter()
            engines[engine] = (setup(tokenizer, size), walker)
            print(f"{spec}: {engine} reads the {size:,}-token vocabulary in {time.perf_counter() - start:.1f} s",
                  flush=True)
        for label, (schema, value) in SCHEMAS.items():
            answer = tokenizer.encode(json.dumps(value), add_special=False)
            for engine, (prepared, walker) in engines.items():
                runs = [walker(prepared, size, schema, answer) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: statistics.mean(r["mask"]))
                print(f"{spec:24} {size:>7} {label:22} {engine:11} {best['compile'] * 1e3:>10.1f} "
                      f"{statistics.mean(best['mask']) * 1e6:>11.0f} {p99(best['mask']) * 1e6:>8.0f} "
                      f"{statistics.mean(best['accept']) * 1e6:>9.0f}", flush=True)

if __name__ == "__main__":
    main()
