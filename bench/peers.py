"""camelid against llama.cpp and transformers on one model: one Markdown table, one run, one machine.

The model is SmolLM2-135M-Instruct unless --model names another: a named model (`camelid models`, e.g.
gemma3-270m), a GGUF file, or an HF directory (then llama.cpp, which reads GGUF only, is left out). Each engine
runs in a process of its own (so its peak memory is its own), one after the other, on the same prompt (real
text in the model's own tokenizer's tokens) and thread count:

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

Above the table: the model (its family, layers and vocabulary), the CPU and the instruction sets the engines
use on it. What an engine refuses for this model (a model with no chat template and no built-in for its family
cannot be trained on chat rows; float32 that will not fit the machine's memory) is a row or cell of "n/a" with
the engine's own one-line reason below the table, not a crash. Below that: camelid's ratios against the issues'
targets (batch-1 decode >= 0.6x llama.cpp's, batch-8 aggregate >= 2x llama.cpp's single stream, load <= 1 s;
prefill >= 1x and peak memory <= 1.15x llama.cpp's on the same file).

    python bench/peers.py [--model NAME|PATH] [--threads 2] [--quantize f16 int8] [--skip-transformers]
                          [--skip-training]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.named_models import DEFAULT_MODEL, NAMED_MODELS

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import inference  # noqa: E402  (bench/inference.py: the prompt and the batch-1 measurements)

BATCH = 8
# /proc/cpuinfo's flags -> the vector instructions they stand for that matter to these engines' kernels
VECTOR_FLAGS = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512F",
                "avx512bw": "AVX-512BW", "avx512_vnni": "AVX-512 VNNI", "avx512_bf16": "AVX-512 BF16",
                "avx512_fp16": "AVX-512 FP16", "amx_tile": "AMX", "asimd": "NEON", "sve": "SVE"}


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
    import llama_cpp

    load_s, prefill, decode1 = inference.bench_llamacpp(path, prompt, args.decode_tokens, args.repeats, args.threads)
    features = llama_cpp.llama_print_system_info().decode()  # "CPU : SSE3 = 1 | AVX2 = 1 | ..."
    built = [f.split("=")[0].split(":")[-1].strip() for f in features.split("|") if f.strip().endswith("= 1")]
    return {"load_s": load_s, "prefill": prefill, "decode1": decode1, "decode8": None, "built_with": built}


def transformers_worker(args, path, prompt) -> dict:
    model, load_s = inference.load_transformers(path)
    _, prefill, decode1 = inference.bench_transformers(path, prompt, args.decode_tokens, args.repeats, model=model)
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
    """One engine's measurements, or {"unavailable": camelid's one-line reason} where it refuses the model."""
    from camelid.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    prompt = inference.build_prompt(load_tokenizer(path), args.prompt_tokens)  # no weights: the engine's memory
    try:
        result = WORKERS[args.worker](args, path, prompt)
    except CamelidError as exc:  # e.g. a model that will not fit: a cell of the table, not a crash
        return {"unavailable": str(exc)}
    return {**result, "peak_mb": peak_mb()}


def subprocess_json(command: list[str], threads: int) -> dict:
    """The worker's last line of output, a JSON object. A worker that crashed is {"unavailable": ..., "crashed":
    true}, so that the other engines' rows are still shown; the run then exits 1, since a crash is a bug, not a
    refusal (its traceback is on stderr above)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        return {"unavailable": f"its worker crashed (exit {done.returncode}); the traceback is in the output above",
                "crashed": True}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(engine: str, args, path: Path, quantize: str | None = None) -> dict:
    print(f"measuring {engine}{f' ({quantize})' if quantize else ''} ...", file=sys.stderr, flush=True)
    command = [sys.executable, __file__, "--worker", engine, "--model", str(path), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats), *(["--kind", quantize] if quantize else [])]
    return subprocess_json(command, args.threads)


def measure_training(contender: str, args, path: Path) -> dict:
    print(f"training {contender} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(BENCH / "train.py"), "--worker", contender, "--model", str(path),
               "--threads", str(args.threads), "--steps", str(args.train_steps)]
    return subprocess_json(command, args.threads)


def describe_model(spec: str, path: Path) -> str:
    """The model as the table's heading names it: its name, family, size and vocabulary, and the file."""
    from camelid.checkpoint import config_from_gguf
    from camelid.config import ModelConfig
    from camelid.gguf_file import GGUFFile

    config = ModelConfig.load(path) if path.is_dir() else config_from_gguf(GGUFFile(path))
    named = NAMED_MODELS.get(str(spec).lower())
    name = named.description.split(",")[0] if named else path.name
    published = inference.gguf_quantization(path)
    stored = f"the {published} GGUF {path.name}" if published else f"the HF directory {path}"
    return (f"{name}: {config.model_type}, {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{config.vocab_size:,}-token vocabulary; {stored}")


def describe_cpu() -> str:
    """This machine's CPU and the vector instructions it has that the engines' kernels use."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last CPU's; all are alike here
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    vector = ", ".join(name for flag, name in VECTOR_FLAGS.items() if flag in flags) or "unknown"
    from camelid import native

    return (f"{model}, {os.cpu_count()} CPUs; vector instructions: {vector}. PyTorch's CPU kernels run at its "
            f"{torch.backends.cpu.get_cpu_capability()} level; camelid's int8/int4 kernels on their "
            f"{native.chosen_isa()} path (of {', '.join(native.available_isas())})")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, all CPUs together; those of this process and its finished
    workers): from their difference over a run, how much of the machine other processes took meanwhile."""
    ours = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:  # not Linux: unknown, counted as ours
        return ours, ours
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ours


def cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def print_table(rows: dict, training: dict) -> None:
    print("| engine | load s | prefill tok/s | decode b1 tok/s | decode b8 tok/s | LoRA train tok/s | peak MB "
          "(inference / training) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        train = training.get(name)
        trained = train is not None and "unavailable" not in train
        lora = "n/a" if train and not trained else cell(train and train["tokens_per_second"], ".0f")
        if "unavailable" in r:
            print(f"| {name} | n/a | n/a | n/a | n/a | {lora} | n/a |")
            continue
        memory = f"{r['peak_mb']:,.0f}" + (f" / {train['peak_rss_mb']:,.0f}" if trained else "")
        print(f"| {name} | {r['load_s']:.2f} | {r['prefill']:.0f} | {r['decode1']:.1f} | {cell(r['decode8'], '.1f')} "
              f"| {lora} | {memory} |")
    refused = [(name, r["unavailable"]) for name, r in rows.items() if "unavailable" in r]
    refused += [(f"{name} (LoRA training)", t["unavailable"]) for name, t in training.items() if "unavailable" in t]
    if refused:
        print("\nn/a: not measured, and why")
        for name, why in refused:
            print(f"- {name}: {why}")


def print_targets(rows: dict, training: dict, llama_name: str | None) -> None:
    llama = rows.get(llama_name) if llama_name else None
    if llama is None or "unavailable" in llama:
        why = "it was not measured" if llama_name else "llama.cpp reads GGUF files only"
        print(f"\nno ratios to llama.cpp: {why}")
    else:
        print(f"\ncamelid against the targets (llama.cpp's batch-1 decode: {llama['decode1']:.1f} tok/s)")
        for name, r in rows.items():
            if not name.startswith("camelid") or "unavailable" in r:
                continue
            b1, b8 = r["decode1"] / llama["decode1"], r["decode8"] / llama["decode1"]
            print(f"- {name}: prefill {r['prefill'] / llama['prefill']:.2f}x llama.cpp's, peak memory "
                  f"{r['peak_mb'] / llama['peak_mb']:.2f}x its, batch-1 decode {b1:.2f}x (issue 22's targets on the "
                  "same file: prefill >= 1x, memory <= 1.15x, int4's decode >= 1.5x llama.cpp's Q4_0)")
            print(f"- {name}: batch-1 decode {b1:.2f}x llama.cpp's (target 0.6x: {'met' if b1 >= 0.6 else 'not met'}); "
                  f"batch-8 aggregate {b8:.2f}x its single stream (target 2x: {'met' if b8 >= 2 else 'not met'}); "
                  f"load {r['load_s']:.2f} s (target 1 s: {'met' if r['load_s'] <= 1 else 'not met'})")
    trained = {name: t for name, t in training.items() if "unavailable" not in t}
    if len(trained) == 2:
        ours, theirs = trained["camelid, float32"], trained["transformers, float32"]
        diff = abs(ours["first_loss"] - theirs["first_loss"])
        print(f"- LoRA training: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x transformers + peft's "
              f"speed, {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x its peak memory; the losses before the "
              f"first update differ by {diff:.1e} ({'agree' if diff < 1e-4 else 'DISAGREE: not the same training'}; "
              f"rows rendered with the chat template: {ours['template']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a named model, a GGUF file or an HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="prefill prompt length (default 500)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens decoded per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept (default 3)")
    parser.add_argument("--quantize", nargs="*", default=["f16", "int8"], choices=["f16", "int8", "int4"],
                        help="camelid's quantized kinds to measure besides float32 (default: f16 int8)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed LoRA training steps (default 3)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers (slow to load)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the LoRA training column")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)  # the worker's one quantization
    args = parser.parse_args()
    if args.prompt_tokens < 16 * BATCH:
        parser.error(f"--prompt-tokens must be at least {16 * BATCH}: the batch-8 prompts are 16 tokens of it each")
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    from camelid.checkpoint import resolve_model_path

    try:
        path = resolve_model_path(args.model).resolve()
        about = describe_model(args.model, path)
    except CamelidError as exc:
        raise SystemExit(f"error: {exc}") from None
    if {"int8", "int4"} & set(args.quantize):
        from camelid import native

        try:
            native.library()  # built once per machine (and per version of native.c); loads then only open it
        except CamelidError:
            pass  # no compiler: the int8 worker says so in the table
    start, busy_start = time.perf_counter(), cpu_seconds()
    rows = {"camelid, float32": measure("camelid", args, path)}
    for kind in args.quantize:
        rows[f"camelid, --quantize {kind}"] = measure("camelid", args, path, kind)
    stored = inference.gguf_quantization(path)
    named = args.model.lower() in NAMED_MODELS  # a model camelid names is its published file
    llama_name = f"llama.cpp, the {'published ' if named else ''}{stored} file" if stored else None
    if llama_name:
        rows[llama_name] = measure("llamacpp", args, path)
    if not args.skip_transformers:
        rows["transformers, float32"] = measure("transformers", args, path)
    training = {}
    if not args.skip_training:
        training = {"camelid, float32": measure_training("camelid", args, path)}
        if not args.skip_transformers:
            training["transformers, float32"] = measure_training("peft", args, path)
    (busy, ours), wall = (now - then for now, then in zip(cpu_seconds(), busy_start)), time.perf_counter() - start
    others = max(0.0, (busy - ours) / (wall * os.cpu_count()))

    print(f"\n{about}")
    print(f"{args.threads} threads, {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per "
          f"sequence, best of {args.repeats}; torch {torch.__version__}; {wall / 60:.1f} minutes, during which other "
          f"processes kept {others:.0%} of the machine's CPUs busy (a quiet machine: ~0%)")
    print(f"CPU: {describe_cpu()}" + (f"; llama.cpp built with {' '.join(rows[llama_name]['built_with'])}"
                                      if llama_name and "built_with" in rows[llama_name] else "") + "\n")
    print_table(rows, training)
    print_targets(rows, training, llama_name)
    return 1 if any(r.get("crashed") for r in [*rows.values(), *training.values()]) else 0


if __name__ == "__main__":
    sys.exit(main())
