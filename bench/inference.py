"""Load time, prefill and greedy decode speed of one model: camelid vs llama.cpp vs transformers.

All three run in this process, one after the other, on the same model file, the same prompt (the model's own
tokenizer's tokens) and the same number of threads; the table gives tokens per second and camelid's ratio to
each peer. `--model` is a named model (`camelid models`), a GGUF file or an HF directory (llama.cpp needs GGUF).

    python bench/inference.py [--model NAME|PATH] [--threads 2] [--prompt-tokens 500] [--decode-tokens 128]
                              [--quantize f16|int8] [--skip-transformers] [--skip-llamacpp]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from camelid.named_models import DEFAULT_MODEL

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks.jsonl"


def build_prompt(tokenizer, n_tokens: int) -> list[int]:
    """About `n_tokens` of real text, Alpaca's seed instructions one after another, as the model's own tokenizer
    encodes a document: BOS first where it adds one (Gemma), none where it does not (SmolLM2). The whole text is
    13,776 tokens in SmolLM2's 49,152-token vocabulary, 13,440 in Gemma 3's 262,144."""
    lines = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    text = "\n".join(f"{t['instruction']} {t['instances'][0]['output']}" for t in lines)
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"the seed tasks make only {len(ids)} tokens in this tokenizer; ask for fewer --prompt-tokens")
    return ids[:n_tokens]


def gguf_quantization(path: Path) -> str | None:
    """The quantization a GGUF file was published in (its general.file_type: Q4_1, Q4_K_M, ...); None for an HF
    directory."""
    import gguf

    from camelid.gguf_file import GGUFFile

    if path.is_dir():
        return None
    file_type = GGUFFile(path).metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "GGUF"
    except ValueError:
        return f"file type {file_type}"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_camelid(path, prompt, n_decode, repeats, quantize=None):
    from camelid.checkpoint import load_model
    from camelid.generate import SamplingParams, _generate

    start = time.perf_counter()
    loaded = load_model(path, device="cpu", quantize=quantize or "none")
    load_s = time.perf_counter() - start
    model = loaded.model

    def prefill():
        with torch.inference_mode():
            cache = model.new_cache(1, len(prompt) + 1)
            model.lm_head(model.hidden(torch.tensor([prompt]), cache)[:, -1])

    prefill_s = best_of(prefill, repeats)

    def decode():
        params = SamplingParams(max_new_tokens=n_decode, temperature=0, ignore_eos=True)
        stamps = []
        with torch.inference_mode():
            for _ in _generate(model, loaded.tokenizer, [prompt[:16]], params, []):
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode_tps = max(decode() for _ in range(repeats))
    return load_s, len(prompt) / prefill_s, decode_tps


def bench_llamacpp(path, prompt, n_decode, repeats, threads):
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - start

    def prefill():
        llm.reset()
        llm.eval(prompt)

    prefill_s = best_of(prefill, repeats)

    def decode():
        llm.reset()
        llm.eval(prompt[:16])
        start = time.perf_counter()
        for _ in range(n_decode):
            # llm.scores is filled only with logits_all=True; the last logits come straight from llama.cpp
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])
        return n_decode / (time.perf_counter() - start)

    decode_tps = max(decode() for _ in range(repeats))
    return load_s, len(prompt) / prefill_s, decode_tps


def load_transformers(path: Path):
    """(transformers' model of `path` in float32, seconds it took): an HF directory as it is, a GGUF file through
    `gguf_file=`, dequantized."""
    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    where = {"pretrained_model_name_or_path": path} if path.is_dir() else \
        {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    return model.eval(), time.perf_counter() - start


def bench_transformers(path, prompt, n_decode, repeats, model=None):
    """(load s, prefill tok/s, decode tok/s); a `model` already loaded is used as it is (load s: None)."""
    load_s = None
    if model is None:
        model, load_s = load_transformers(path)
    ids = torch.tensor([prompt])

    def prefill():
        with torch.inference_mode():
            model(ids, logits_to_keep=1)

    prefill_s = best_of(prefill, repeats)
    short = ids[:, :16]

    def decode():
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(short, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
            return n_decode / (time.perf_counter() - start)

    decode_tps = max(decode() for _ in range(repeats))
    return load_s, len(prompt) / prefill_s, decode_tps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a named model, a GGUF file or an HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="prefill prompt length (default 500)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens to decode (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers (slow to load)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp")
    parser.add_argument("--quantize", choices=["f16", "int8", "int4"],
                        help="also measure camelid with this weight quantization")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from camelid.checkpoint import resolve_model_path
    from camelid.errors import CamelidError
    from camelid.tokenizer import load_tokenizer

    try:
        path = resolve_model_path(args.model)
        prompt = build_prompt(load_tokenizer(path), args.prompt_tokens)
        rows = {"camelid (fp32)": bench_camelid(path, prompt, args.decode_tokens, args.repeats)}
        if args.quantize:
            rows[f"camelid ({args.quantize})"] = bench_camelid(path, prompt, args.decode_tokens, args.repeats,
                                                              args.quantize)
    except CamelidError as exc:  # an unknown model, or a quantization this model's family does not have
        raise SystemExit(f"error: {exc}") from None
    published = gguf_quantization(path)
    if not args.skip_llamacpp and published:
        rows[f"llama.cpp ({published})"] = bench_llamacpp(path, prompt, args.decode_tokens, args.repeats, args.threads)
    if not args.skip_transformers:
        rows["transformers (fp32)"] = bench_transformers(path, prompt, args.decode_tokens, args.repeats)

    print(f"\n{path.name}, {args.threads} threads, prompt {len(prompt)} tokens, "
          f"decode {args.decode_tokens} tokens, torch {torch.__version__}\n")
    print("| engine | load s | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|---:|")
    for name, (load_s, prefill, decode) in rows.items():
        print(f"| {name} | {load_s:.2f} | {prefill:.0f} | {decode:.1f} |")
    print()
    print("camelid's speed relative to each peer (above 1: camelid is faster)")
    for name, theirs in rows.items():
        if name.startswith("camelid"):
            continue
        for cam_name, cam in rows.items():
            if cam_name.startswith("camelid"):
                print(f"- {cam_name} vs {name}: load {theirs[0] / cam[0]:.2f}x, prefill {cam[1] / theirs[1]:.2f}x, "
                      f"decode {cam[2] / theirs[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
