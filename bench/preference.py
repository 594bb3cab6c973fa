"""LoRA DPO speed and memory of one model (SmolLM2-135M-Instruct by default): camelid vs TRL + peft.

Both train the same LoRA (r 16, alpha 16, dropout 0.05 on every linear layer) with DPO (beta 0.1) on the same
float32 weights and the same batches of Anthropic HH-RLHF pairs (../shared/data/preference), tokenized once by
camelid with the model's chat template: TRL is handed exactly the prompt and answer tokens camelid trains on.
Both read the reference log-probs from a cache computed before the timed steps (camelid always does; TRL does
with `precompute_ref_log_probs`, its cheaper setting: without it each step costs one more forward pass).
TRL's DPOTrainer runs each pair as two padded sequences, the prompt in each; camelid runs the prompt once and
both answers after it. The work is counted the same for both, as TRL's sequences: tokens/s is (prompt + chosen
+ prompt + rejected) per second. Each contender runs in a process of its own (peak memory as bench/train.py
measures it: the rise during the training steps over what the loaded model and data held).

    python bench/preference.py [--model NAME|PATH] [--threads 2] [--steps 4] [--warmup 1] [--batch-size 4]
                               [--seq-len 512] [--max-prompt-len 384] [--rounds 1] [--only camelid|trl]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from train import PeakRSS, cpu_ticks, transformers_model  # bench/train.py: the same accounting and model

from camelid.named_models import DEFAULT_MODEL

CONTENDERS = ("camelid", "trl")
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
TARGETS_MIN_SPEED, TARGETS_MAX_MEMORY = 1.0, 0.6  # the goals: tok/s >= 1.0x TRL's, memory <= 0.6x


def pair_examples(loaded, template, n: int, seq_len: int, max_prompt_len: int):
    """The first `n` usable HH-RLHF pairs of the file, as camelid trains on them."""
    from camelid.data.formats import iter_conversations
    from camelid.train.preference import fit_pair_example, make_pair_example

    examples = []
    for record in iter_conversations(str(HH), skip_bad=True):
        if not hasattr(record, "rejected") or record.rejected is None:
            continue
        example = make_pair_example(template, loaded.tokenizer, {"messages": record.messages,
                                                                 "rejected": record.rejected})
        if isinstance(example, str):
            continue
        example, _ = fit_pair_example(example, seq_len, "truncate", max_prompt_len)
        if example is not None:
            examples.append(example)
        if len(examples) == n:
            return examples
    raise SystemExit(f"{HH} holds only {len(examples)} usable pairs")


def trl_pieces(example) -> dict:
    """TRL's prompt, chosen and rejected ids of a camelid example (each answer as far as its mask)."""
    from camelid.model import IGNORE

    p = example.prompt_len
    end = max(j for j, t in enumerate(example.targets) if t != IGNORE) + 1
    other = max(j for j, t in enumerate(example.branch_targets) if t != IGNORE) + 1
    return {"prompt_ids": example.tokens[:p], "chosen_ids": example.tokens[p : end + 1],
            "rejected_ids": example.branch_tokens[1 : other + 1]}


def sequence_tokens(example) -> int:
    piece = trl_pieces(example)
    return 2 * len(piece["prompt_ids"]) + len(piece["chosen_ids"]) + len(piece["rejected_ids"])


# -- the contenders ------------------------------------------------------------------------------------------------


def camelid_steps(loaded, batches, args):
    from camelid.lora import LoRAConfig, adapters_disabled, apply_lora
    from camelid.train.loop import release_freed_memory, release_memory_during_forward
    from camelid.train.preference import answer_log_probs, collate_pairs, micro_batch_terms, pair_row, step_totals
    from camelid.train.recipe import Preference

    model = apply_lora(loaded.model, LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                                                targets=("all-linear",)))
    release_memory_during_forward(model.model.layers, torch.device("cpu"))
    pref = Preference("dpo", beta=args.beta)
    prepared = []
    for examples in batches:  # the reference cache, before the timed steps
        rows = [pair_row([ex], [None], args.seq_len) for ex in examples]
        batch = collate_pairs(rows)
        model.eval()
        with torch.no_grad(), adapters_disabled(model):
            reference, _ = answer_log_probs(model, batch)
        prepared.append((batch, reference, step_totals(rows)))
    model.train()

    def step(i):
        batch, reference, totals = prepared[i]
        terms = micro_batch_terms(pref, model, batch, reference, totals, world=1)
        terms.loss.backward()
        release_freed_memory(torch.device("cpu"))
        return float(terms.loss), terms.sums["logps/chosen"][0] / terms.sums["logps/chosen"][1]

    return model, step, {}


def trl_steps(loaded, batches, args):
    import peft
    import transformers
    import trl
    from datasets import Dataset

    transformers.logging.set_verbosity_error()
    hf = transformers_model(loaded)
    lora = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, lora)
    backend = loaded.tokenizer.backend
    # (TRL tokenizes a placeholder dataset at start; the timed batches are camelid's tokens)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=backend.id_to_token(0),
                                                     eos_token=backend.id_to_token(0))
    dummy = Dataset.from_list([{"prompt": "Hi", "chosen": " there", "rejected": " no"}] * 2)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "camelid-bench-trl"
    trainer = trl.DPOTrainer(model=model, processing_class=tokenizer, train_dataset=dummy,
                             args=trl.DPOConfig(output_dir=str(out), report_to="none", use_cpu=True, beta=args.beta,
                                                loss_type=["sigmoid"], per_device_train_batch_size=args.batch_size))
    if "ref" in model.peft_config:  # the reference is the base with the adapter off, as camelid's
        model.delete_adapter("ref")
    prepared = []
    model.eval()
    for examples in batches:  # the reference cache, before the timed steps
        inputs = trainer.data_collator([trl_pieces(ex) for ex in examples])
        chosen, rejected = trainer.compute_ref_log_probs(model, inputs)
        prepared.append(inputs | {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
    trainer.precompute_ref_logps = True
    model.train()

    def step(i):
        loss = trainer._compute_loss(model, prepared[i], return_outputs=False)
        loss.backward()
        return float(loss), trainer._metrics["train"]["logps/chosen"][-1]

    return model, step, {"versions": f"trl {trl.__version__}, transformers {transformers.__version__}, "
                                     f"peft {peft.__version__}", "attention": hf.config._attn_implementation}


def train(args) -> dict:
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    template = chat_template_for(loaded)
    n = args.warmup + args.steps
    examples = pair_examples(loaded, template, n * args.batch_size, args.seq_len, args.max_prompt_len)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    model, step, info = (camelid_steps if args.worker == "camelid" else trl_steps)(loaded, batches, args)
    del loaded
    gc.collect()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.0)
    memory = PeakRSS()
    losses, logps, seconds = [], [], []
    for i in range(n):
        if i == args.warmup:
            busy_start, ours_start = cpu_ticks()
        start = time.perf_counter()
        loss, chosen = step(i)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        logps.append(chosen)
    peak_kb, lifetime_kb = memory.stop()
    busy, ours = (now - then for now, then in zip(cpu_ticks(), (busy_start, ours_start)))
    measured = seconds[args.warmup :]
    tokens = sum(sequence_tokens(ex) for batch in batches[args.warmup :] for ex in batch)
    return {
        "contender": args.worker, "tokens_per_second": tokens / sum(measured),
        "pairs_per_second": args.steps * args.batch_size / sum(measured),
        "median_step_s": statistics.median(measured), "step_s": [round(s, 2) for s in seconds],
        "others_cpu": max(0.0, (busy - ours) / os.sysconf("SC_CLK_TCK") / sum(measured) / os.cpu_count()),
        "peak_rss_mb": lifetime_kb / 1024, "training_peak_mb": (peak_kb - memory.start_kb) / 1024,
        "memory_method": memory.method, "losses": losses, "first_logps_chosen": logps[0],
        "trainable": sum(p.numel() for p in trainable),
        "lengths": [sequence_tokens(ex) for ex in examples], **info,
    }


# -- the run -------------------------------------------------------------------------------------------------------


def run_contender(name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model,
               "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--max-prompt-len", str(args.max_prompt_len), "--r", str(args.r), "--alpha", str(args.alpha),
               "--dropout", str(args.dropout), "--beta", str(args.beta)]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, stdout=subprocess.PIPE,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the {name} worker failed (exit {done.returncode}); its error is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    flags = set()
    name = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} CPUs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a named model, GGUF or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for each contender (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="most tokens of prompt + answer (default 512)")
    parser.add_argument("--max-prompt-len", type=int, default=384, help="a longer prompt keeps its end (default 384)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    parser.add_argument("--rounds", type=int, default=1, help="run the contenders in turn this many times, keep each "
                        "one's fastest (default 1)")
    parser.add_argument("--only", choices=CONTENDERS, help="run one contender alone (no ratios)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train(args)))
        return 0
    rounds = {name: [] for name in ([args.only] if args.only else CONTENDERS)}
    for _ in range(args.rounds):
        for name, runs in rounds.items():
            runs.append(run_contender(name, args))
    results = {name: max(runs, key=lambda r: r["tokens_per_second"]) for name, runs in rounds.items()}
    first = next(iter(results.values()))
    print(f"\n{args.model}: LoRA r={args.r} alpha={args.alpha:g} on every linear layer, DPO beta {args.beta:g}, "
          f"float32, {args.threads} threads, torch {torch.__version__}; {cpu_name()}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps of {args.batch_size} HH-RLHF pairs; pair lengths (as two "
          f"sequences) {min(first['lengths'])}..{max(first['lengths'])} tokens; reference log-probs cached")
    if "trl" in results:
        print(f"TRL: {results['trl']['versions']}, attention {results['trl']['attention']}, each pair as two "
              "padded sequences")
    print("\n| contender | tok/s | pairs/s | step s (median) | peak RSS MB | training peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['pairs_per_second']:.2f} | {r['median_step_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['training_peak_mb']:.0f} |")
    for name, r in results.items():
        print(f"- {name}: steps {r['step_s']} s, {r['trainable']:,} trainable parameters, losses "
              f"{[round(x, 4) for x in r['losses']]}; other processes used {r['others_cpu']:.0%} of the CPUs")
    if len(results) == 2:
        c, t = results["camelid"], results["trl"]
        diff = abs(c["first_logps_chosen"] - t["first_logps_chosen"])
        print(f"\nchosen answers' log-prob before the first update: camelid {c['first_logps_chosen']:.4f}, TRL "
              f"{t['first_logps_chosen']:.4f} ({'agree' if diff < 1e-3 else 'DISAGREE: not the same work'})")
        speed, memory = c["tokens_per_second"] / t["tokens_per_second"], c["training_peak_mb"] / t["training_peak_mb"]
        print(f"camelid relative to TRL + peft: tok/s {speed:.2f}x (target >= {TARGETS_MIN_SPEED:.1f}x: "
              f"{'met' if speed >= TARGETS_MIN_SPEED else 'not met'}), training memory {memory:.2f}x (target <= "
              f"{TARGETS_MAX_MEMORY:.1f}x: {'met' if memory <= TARGETS_MAX_MEMORY else 'not met'}), peak RSS "
              f"{c['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
