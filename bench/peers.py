"""camelid against llama.cpp and transformers on SmolLM2-135M-Instruct: one Markdown table, one run, one machine.

Each engine runs in a process of its own (so its peak memory is its own), one after the other, on the same
prompt and thread count:

  load s        from nothing in memory to a model ready to run (the GGUF file for camelid and llama.cpp; for
                transformers the same file through `gguf_file=`, dequantized). camelid's int8 kernels are
                built before the workers start, as llama.cpp was built when it was installed: building them
                is a one-time cost of ~2 s per machine, not a cost of each load
  prefill       tokens per second over a prompt of --prompt-tokens
  decode b1     greedy tokens per second of one sequence
  decode b8     greedy tokens per second of 8 sequences decoded together, all 8 counted (llama-cpp-python's
                `Llama` decodes one sequence at a time, so it has none)
  LoRA train    training tokens per second, LoRA r=8 on q/v, 4 x 512-token ShareGPT rows (bench/train.py's
                workers: camelid against transformers + peft)
  peak MB       the process's resident high-water mark (for training: bench/train.py's whole worker)

Below the table: camelid's ratios against the issue's targets (batch-1 decode >= 0.6x llama.cpp's, batch-8
aggregate >= 2x llama.cpp's single stream, load <= 1 s).

    python bench/peers.py [--threads 2] [--quantize int8] [--skip-transformers] [--skip-training]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import inference  # noqa: E402  (bench/inference.py: the prompt and the batch-1 measurements)

BATCH = 8


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_prompts(prompt: list[int]) -> list[list[int]]:
    """8 different prompts of 16 tokens each, from the same real text."""
    return [prompt[16 * i : 16 * (i + 1)] for i in range(BATCH)]


def camelid_worker(args, path, prompt) -> dict:
    from camelid.checkpoint import load_model
    from camelid.generate import SamplingParams, _generate, prefill

    start = time.perf_counter()
    loaded = load_model(path, device="cpu", quantize=args.kind or "none")
    load_s = time.perf_counter() - start
    model = loaded.model

    def prefill_once():
        with torch.inference_mode():
            prefill(model, model.new_cache(1, len(prompt) + 1), [prompt])

    def decode(prompts: list[list[int]]) -> float:
        params = SamplingParams(max_new_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
        stamps = []
        for _ in _generate(model, loaded.tokenizer, prompts, params, []):
            stamps.append(time.perf_counter())
        return len(prompts) * (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return {"load_s": load_s, "prefill": len(prompt) / inference.best_of(prefill_once, args.repeats),
            "decode1": max(decode([prompt[:16]]) for _ in range(args.repeats)),
            "decode8": max(decode(batch_prompts(prompt)) for _ in range(args.repeats))}


def llamacpp_worker(args, path, prompt) -> dict:
    load_s, prefill, decode1 = inference.bench_llamacpp(path, prompt, args.decode_tokens, args.repeats, args.threads)
    return {"load_s": load_s, "prefill": prefill, "decode1": decode1, "decode8": None}


def transformers_worker(args, path, prompt) -> dict:
    import transformers

    load_s, prefill, decode1 = inference.bench_transformers(path, prompt, args.decode_tokens, args.repeats)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor(batch_prompts(prompt))  # equal lengths: no padding needed

    def decode8() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False)
            return BATCH * args.decode_tokens / (time.perf_counter() - start)

    return {"load_s": load_s, "prefill": prefill, "decode1": decode1,
            "decode8": max(decode8() for _ in range(args.repeats))}


WORKERS = {"camelid": camelid_worker, "llamacpp": llamacpp_worker, "transformers": transformers_worker}


def run_worker(args) -> dict:
    from camelid.checkpoint import load_tokenizer_and_template
    from camelid.named_models import DEFAULT_MODEL, named_model_path

    torch.set_num_threads(args.threads)
    path = named_model_path(DEFAULT_MODEL)
    tokenizer, _ = load_tokenizer_and_template(path)  # the tokenizer alone: the engines' memory is their own
    prompt = inference.build_prompt(tokenizer, args.prompt_tokens)
    result = WORKERS[args.worker](args, path, prompt)
    return {**result, "peak_mb": peak_mb()}


def subprocess_json(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[1:3])} failed (exit {done.returncode}); its error is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(engine: str, args, quantize: str | None = None) -> dict:
    print(f"measuring {engine}{f' ({quantize})' if quantize else ''} ...", file=sys.stderr, flush=True)
    command = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats), *(["--kind", quantize] if quantize else [])]
    return subprocess_json(command, args.threads)


def measure_training(contender: str, args) -> dict:
    print(f"training {contender} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(BENCH / "train.py"), "--worker", contender, "--threads", str(args.threads),
               "--steps", str(args.train_steps)]
    return subprocess_json(command, args.threads)


def cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="prefill prompt length (default 500)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens decoded per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept (default 3)")
    parser.add_argument("--quantize", nargs="*", default=["f16", "int8"], choices=["f16", "int8"],
                        help="camelid's quantized kinds to measure besides float32 (default: f16 int8)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed LoRA training steps (default 3)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers (slow to load)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the LoRA training column")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)  # the worker's one quantization
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    if "int8" in args.quantize:
        from camelid import native

        native.library()  # built once per machine (and per version of native.c); loads then only open it
    rows = {"camelid, float32": measure("camelid", args)}
    for kind in args.quantize:
        rows[f"camelid, --quantize {kind}"] = measure("camelid", args, kind)
    rows["llama.cpp, the published Q4_1 file"] = measure("llamacpp", args)
    if not args.skip_transformers:
        rows["transformers, float32"] = measure("transformers", args)
    training = {}
    if not args.skip_training:
        training = {"camelid, float32": measure_training("camelid", args)}
        if not args.skip_transformers:
            training["transformers, float32"] = measure_training("peft", args)

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.decode_tokens} "
          f"greedy tokens per sequence, best of {args.repeats}; torch {torch.__version__}\n")
    print("| engine | load s | prefill tok/s | decode b1 tok/s | decode b8 tok/s | LoRA train tok/s | peak MB "
          "(inference / training) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        train = training.get(name)
        memory = f"{r['peak_mb']:,.0f}" + (f" / {train['peak_rss_mb']:,.0f}" if train else "")
        print(f"| {name} | {r['load_s']:.2f} | {r['prefill']:.0f} | {r['decode1']:.1f} | {cell(r['decode8'], '.1f')} "
              f"| {cell(train and train['tokens_per_second'], '.0f')} | {memory} |")

    llama = rows["llama.cpp, the published Q4_1 file"]
    print("\ncamelid against the targets (llama.cpp's batch-1 decode: "
          f"{llama['decode1']:.1f} tok/s)")
    for name, r in rows.items():
        if not name.startswith("camelid"):
            continue
        b1, b8 = r["decode1"] / llama["decode1"], r["decode8"] / llama["decode1"]
        print(f"- {name}: batch-1 decode {b1:.2f}x llama.cpp's (target 0.6x: {'met' if b1 >= 0.6 else 'not met'}); "
              f"batch-8 aggregate {b8:.2f}x its single stream (target 2x: {'met' if b8 >= 2 else 'not met'}); "
              f"load {r['load_s']:.2f} s (target 1 s: {'met' if r['load_s'] <= 1 else 'not met'})")
    if len(training) == 2:
        ours, theirs = training["camelid, float32"], training["transformers, float32"]
        print(f"- LoRA training: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x transformers + peft's "
              f"speed, {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x its peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
