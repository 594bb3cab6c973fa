"""Load time, prefill and greedy decode speed of SmolLM2-135M-Instruct: camelid vs llama.cpp vs transformers.

All three run in this process, one after the other, on the same GGUF file, the same prompt and the same number
of threads; the table gives tokens per second and camelid's ratio to each peer.

    python bench/inference.py [--threads 2] [--prompt-tokens 500] [--decode-tokens 128] [--skip-transformers]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks.jsonl"


def build_prompt(tokenizer, n_tokens: int) -> list[int]:
    """About `n_tokens` of real text: Alpaca's seed instructions, one after another."""
    lines = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    text = "\n".join(f"{t['instruction']} {t['instances'][0]['output']}" for t in lines)
    return tokenizer.encode(text, add_special=False)[:n_tokens]


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


def bench_transformers(path, prompt, n_decode, repeats):
    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - start
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
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="prefill prompt length (default 500)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens to decode (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers (slow to load)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp")
    parser.add_argument("--quantize", choices=["f16", "int8"], help="also measure camelid with this weight quantization")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from camelid.checkpoint import load_model
    from camelid.named_models import DEFAULT_MODEL, named_model_path

    path = named_model_path(DEFAULT_MODEL)
    prompt = build_prompt(load_model(path, device="cpu").tokenizer, args.prompt_tokens)
    rows = {"camelid (fp32)": bench_camelid(path, prompt, args.decode_tokens, args.repeats)}
    if args.quantize:
        rows[f"camelid ({args.quantize})"] = bench_camelid(path, prompt, args.decode_tokens, args.repeats, args.quantize)
    if not args.skip_llamacpp:
        rows["llama.cpp (Q4_1)"] = bench_llamacpp(path, prompt, args.decode_tokens, args.repeats, args.threads)
    if not args.skip_transformers:
        rows["transformers (fp32)"] = bench_transformers(path, prompt, args.decode_tokens, args.repeats)

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, prompt {len(prompt)} tokens, "
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
