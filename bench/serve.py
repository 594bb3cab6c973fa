"""Serving throughput of SmolLM2-135M-Instruct: `camelid serve` under concurrent streams vs llama.cpp's one stream.

camelid's server runs in a process of its own (the library function `camelid serve` calls, with --threads torch
threads), so that the clients do not share its interpreter; the clients are the official `openai` client, one
thread each, all released at once, each asking a different Vicuna-bench question (one per category) for a
streamed chat completion: greedy, `ignore_eos`, exactly --max-tokens tokens. For each number of streams:

  aggregate tok/s   all streams' completion tokens (from the usage chunk) / wall time from the first request
                    sent to the last stream finished; prefill, HTTP and queueing included
  first token s     time from a request sent to its first streamed text (median over the streams)
  decode tok/s      one stream's tokens after its first / time from its first text to its last (median)

llama.cpp (llama-cpp-python) runs in this process while the server sits idle, on the same GGUF, the same thread
count and the same prompt tokens as camelid's first stream, through its streamed `create_completion`, greedy, with
the stop tokens banned so that it too generates exactly --max-tokens tokens. Each round measures every contender
in turn; the best round of each is kept.

Chunked prefill (part "chunked"), on a server with the default --prefill-chunk and on one with --prefill-chunk 0
(each prompt whole before the next decode step), one after the other:

  stream gap        a greedy stream runs; after its 16th token a ~2,000-token prompt (a numbered list of the
                    Vicuna-bench questions) arrives as a completion of one token: the stream's median gap between
                    tokens before it arrived, and its longest gap while the prompt was prefilled (goal: < 4x)
  8 arrivals        8 streamed chat completions sent at once (as above, 16 tokens each): first-token latency

Prompt prefix cache (part "prefix"), on a server with the cache and one with --no-prefix-cache: a chat whose first
turn is a ~1,000-token user message (the question list again) and a 48-token answer; the time to the first token
of its second turn (goal: >= 5x faster with the cache), and whether both servers gave the same answers. Every round
starts its long prompts with the round's number, so that no round finds the one before it in the cache.

    python bench/serve.py [--threads 2] [--max-tokens 128] [--streams 1,4,8] [--rounds 2] [--port 0]
                          [--parts throughput,chunked,prefix]
"""

import argparse
import concurrent.futures
import contextlib
import functools
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

MODEL = "smollm2-135m-instruct"
QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna_bench_question.jsonl"
TARGET_SCALING = 3.0  # the goal: aggregate tok/s with 8 streams >= 3.0x one stream's
TARGET_STALL = 4.0  # the goal: a stream's longest gap while a long prompt is prefilled < 4x its median gap
TARGET_PREFIX = 5.0  # the goal: a chat's second turn reaches its first token >= 5x sooner with the cache
PARTS = ("throughput", "chunked", "prefix")


# -- the server process --------------------------------------------------------------------------------------------


def run_server(args) -> None:
    import torch

    from camelid.serve.server import serve

    torch.set_num_threads(args.threads)
    serve([MODEL], host="127.0.0.1", port=args.port, max_batch=args.max_batch, device="cpu", dtype="float32",
          prefill_chunk=args.prefill_chunk, prefix_cache=not args.no_prefix_cache,
          log=lambda line: print(line, file=sys.stderr, flush=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """The camelid server in a process of its own, once it answers /health; `options`: `camelid serve`'s flags."""
    import httpx

    command = [sys.executable, os.path.abspath(__file__), "--server", "--port", str(port),
               "--threads", str(args.threads), "--max-batch", str(args.max_batch), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the camelid server exited (code {process.returncode}) before answering; "
                             "its error is above")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the camelid server did not answer /health on port {port} within 120 s")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- CPU use -------------------------------------------------------------------------------------------------------


def cpu_ticks(server_pid: int) -> tuple[int, int, int]:
    """(busy ticks of the whole machine, all CPUs; ticks of the server process; ticks of this process)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])

    def process_ticks(pid) -> int:
        with open(f"/proc/{pid}/stat") as f:
            utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
        return utime + stime

    return user + nice + system + irq + softirq + steal, process_ticks(server_pid), process_ticks("self")


def cpu_use(before: tuple[int, int, int], after: tuple[int, int, int], seconds: float) -> dict:
    """CPU cores kept busy on average between two cpu_ticks(): by the server, this process, and everything else."""
    busy, server, ours = (b - a for a, b in zip(before, after))
    ticks = seconds * os.sysconf("SC_CLK_TCK")
    return {"server": server / ticks, "this process": ours / ticks, "others": max(0, busy - server - ours) / ticks}


class RowsInUse:
    """The server's `camelid_running_sequences` gauge, read from /metrics every 0.25 s: the largest value seen."""

    def __init__(self, base_url: str):
        import httpx

        self._client = httpx.Client(base_url=base_url, timeout=5)
        self.largest, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.25):
            text = self._client.get("/metrics").text
            for value in re.findall(r"^camelid_running_sequences\{[^}]*\} (\S+)$", text, re.MULTILINE):
                self.largest = max(self.largest, int(float(value)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._client.close()
        return self.largest


# -- the measurements ----------------------------------------------------------------------------------------------


@dataclass
class Stream:
    sent: float
    first: float  # first text
    last: float  # last text
    done: float  # the stream closed
    tokens: int
    prompt_tokens: int
    text: str

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else float("nan")


@dataclass
class Run:
    streams: list[Stream]
    rows_in_use: int | None = None  # camelid only
    cpu: dict | None = None  # cores used on average: server, client, other processes

    @property
    def wall(self) -> float:
        return max(s.done for s in self.streams) - min(s.sent for s in self.streams)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall

    @property
    def first_token_s(self) -> float:
        return statistics.median(s.first - s.sent for s in self.streams)

    @property
    def decode_tps(self) -> float:
        return statistics.median(s.decode_tps for s in self.streams)


def camelid_streams(base_url: str, server_pid: int, questions: list[str], max_tokens: int) -> Run:
    """len(questions) streamed chat completions at once, one thread each."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    go = threading.Barrier(len(questions) + 1)

    def one(question: str) -> Stream:
        go.wait()
        sent = time.perf_counter()
        first = last = None
        text, usage = [], None
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or now
                last = now
                text.append(chunk.choices[0].delta.content)
        done = time.perf_counter()
        if usage is None or first is None:
            raise RuntimeError("a stream ended without text or without a usage chunk")
        return Stream(sent, first, last, done, usage.completion_tokens, usage.prompt_tokens, "".join(text))

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        futures = [pool.submit(one, q) for q in questions]
        rows = RowsInUse(base_url)
        before = cpu_ticks(server_pid)
        go.wait()  # all requests go out together
        concurrent.futures.wait(futures)
        after = cpu_ticks(server_pid)
        largest = rows.stop()
    client.close()
    results = [f.result() for f in futures]  # a failed stream raises its error here
    run = Run(results, rows_in_use=largest)
    run.cpu = cpu_use(before, after, run.wall)
    return run


def prompt_tokens(question: str) -> tuple[list[int], frozenset[int]]:
    """The prompt tokens camelid's server makes of one user message (its chat template, no added BOS/EOS),
    and the model's stop tokens."""
    from camelid.chat_template import ChatTemplate
    from camelid.gguf_file import GGUFFile
    from camelid.named_models import named_model_path
    from camelid.tokenizer import tokenizer_from_gguf

    metadata = GGUFFile(named_model_path(MODEL)).metadata
    tokenizer = tokenizer_from_gguf(metadata)
    template = ChatTemplate(metadata["tokenizer.chat_template"], bos_token=tokenizer.bos_token,
                            eos_token=tokenizer.eos_token)
    text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special=False), tokenizer.stop_ids


def llamacpp_stream(llm, prompt: list[int], stop_ids, max_tokens: int) -> Run:
    import llama_cpp
    import numpy as np

    banned = np.array(sorted(stop_ids))
    sampled = 0

    # Bans the stop tokens (what `logit_bias` would do: llama-cpp-python 0.3.36 drops both a logit_bias and a
    # logits_processor given together) and counts the calls, one per sampled token: the exact number generated.
    def ignore_eos(_ids, scores):
        nonlocal sampled
        sampled += 1
        scores[banned] = -np.inf
        return scores

    llm.reset()  # no reuse of the previous round's prompt from the cache
    sent = time.perf_counter()
    first = last = None
    text = []
    for chunk in llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                       stream=True, logits_processor=llama_cpp.LogitsProcessorList([ignore_eos])):
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first = first or now
            last = now
            text.append(chunk["choices"][0]["text"])
    done = time.perf_counter()
    return Run([Stream(sent, first, last, done, sampled, len(prompt), "".join(text))])


# -- chunked prefill and the prefix cache ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(args, options: tuple[str, ...] = ()):
    """A camelid server with `camelid serve`'s `options`: (its base URL, its process id), stopped afterwards."""
    port = args.port or free_port()
    print(f"starting the camelid server {' '.join(options)} on port {port} ...", file=sys.stderr, flush=True)
    server = start_server(args, port, options)
    try:
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        stop_server(server)


@functools.cache
def tokenizer():
    from camelid.named_models import named_model_path
    from camelid.tokenizer import load_tokenizer

    return load_tokenizer(named_model_path(MODEL))


def question_list(rows: list[dict], tokens: int, heading: str) -> str:
    """`heading` and a numbered list of Vicuna-bench questions (from the first again if they run out), about
    `tokens` tokens long."""
    lines, total = [heading], len(tokenizer().encode(heading))
    while total < tokens:
        line = f"{len(lines)}. {rows[(len(lines) - 1) % len(rows)]['turns'][0]}"
        lines.append(line)
        total += len(tokenizer().encode(line)) + 1  # and the newline
    return "\n".join(lines)


@dataclass
class Stall:
    median_gap: float  # the stream's gap between tokens before the long prompt arrived
    longest_gap: float  # its longest gap while the long prompt was prefilled
    long_first_token: float  # the long prompt's time to its one token
    prompt_tokens: int

    @property
    def ratio(self) -> float:
        return self.longest_gap / self.median_gap


def stall(base_url: str, question: str, long_prompt: str) -> Stall:
    """A greedy stream is running when `long_prompt` arrives (after the stream's 16th token): how its pace held."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    times, running, answered = [], threading.Event(), threading.Event()

    def stream():  # until its first token after the long prompt was answered (its client then hangs up)
        with client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=1000, temperature=0,
                stream=True, extra_body={"ignore_eos": True}) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
                    if len(times) == 16:
                        running.set()
                    if answered.is_set():
                        return

    thread = threading.Thread(target=stream)
    thread.start()
    if not running.wait(600):
        raise RuntimeError("the running stream did not reach 16 tokens")
    sent = time.perf_counter()
    usage = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1, temperature=0).usage
    done = time.perf_counter()
    answered.set()
    thread.join()
    client.close()
    if times[-1] <= done:
        raise RuntimeError("the stream ended before the long prompt was answered: give it more tokens")
    gaps = list(itertools.pairwise(times))
    return Stall(statistics.median(b - a for a, b in gaps if b <= sent),
                 max(b - a for a, b in gaps if b > sent and a < done), done - sent, usage.prompt_tokens)


def chunked_prefill(args, rows: list[dict]) -> None:
    """A stream's pace while a ~2,000-token prompt is prefilled, and 8 arrivals at once, chunked and not."""
    questions = [rows[10 * i]["turns"][0] for i in range(8)]
    servers = {"chunked (default)": (), "whole prompts (--prefill-chunk 0)": ("--prefill-chunk", "0")}
    stalls, arrivals = {}, {}
    for label, options in servers.items():
        with running_server(args, options) as (base_url, pid):
            camelid_streams(base_url, pid, questions[:1], 8)  # warm-up
            stalls[label], arrivals[label] = [], []
            for r in range(args.rounds):
                print(f"round {r + 1}: {label}: a long prompt beside a stream, 8 arrivals ...", file=sys.stderr,
                      flush=True)
                heading = f"Round {r + 1}. Which of these questions is the hardest to answer well?"
                stalls[label].append(stall(base_url, questions[0], question_list(rows, 2000, heading)))
                arrivals[label].append(camelid_streams(base_url, pid, questions, 16))
    print(f"\nChunked prefill: a greedy stream runs when a {stalls[label][0].prompt_tokens}-token prompt arrives; "
          "8 streamed chats (16 tokens each) sent at once")
    print("| prefill | stream's median gap s | longest gap while the prompt is prefilled s | longest / median | "
          "long prompt's first token s | 8 arrivals: first token s, median | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in servers:
        st = min(stalls[label], key=lambda x: x.ratio)
        run = min(arrivals[label], key=lambda x: x.first_token_s)
        print(f"| {label} | {st.median_gap:.3f} | {st.longest_gap:.3f} | {st.ratio:.1f}x | {st.long_first_token:.2f} "
              f"| {run.first_token_s:.2f} | {max(s.first - s.sent for s in run.streams):.2f} |")
    ratio = min(x.ratio for x in stalls["chunked (default)"])
    print(f"- chunked: longest gap / median gap {ratio:.1f}x (target < {TARGET_STALL:.0f}x: "
          f"{'met' if ratio < TARGET_STALL else 'not met'}); rounds: "
          f"{ {label: [round(x.ratio, 1) for x in xs] for label, xs in stalls.items()} }")


def chat_second_turn(base_url: str, history: str) -> tuple[float, int, str, str]:
    """A chat: `history` as the first user message, a 48-token answer at most, then a question about them.
    (The second turn's time to its first token, its prompt tokens, the first answer, the second.)"""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": history}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Which of them would you answer first, and why?"}]
    sent = time.perf_counter()
    ttft, text, usage = None, [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - sent
            text.append(chunk.choices[0].delta.content)
    client.close()
    return ttft, usage.prompt_tokens, first.choices[0].message.content, "".join(text)


def prefix_cache(args, rows: list[dict]) -> None:
    """A chat's second turn after a ~1,000-token first one, with the prompt prefix cache and without."""
    servers = {"on (default)": (), "off (--no-prefix-cache)": ("--no-prefix-cache",)}
    turns = {}
    for label, options in servers.items():
        with running_server(args, options) as (base_url, _):
            chat_second_turn(base_url, "Say hello.")  # warm-up
            turns[label] = []
            for r in range(args.rounds):
                print(f"round {r + 1}: prefix cache {label}: a chat's second turn ...", file=sys.stderr, flush=True)
                heading = f"Round {r + 1}. Here are questions people asked an assistant. Which are about science?"
                turns[label].append(chat_second_turn(base_url, question_list(rows, 1000, heading)))
    on, off = (min(t[0] for t in turns[label]) for label in servers)
    print(f"\nPrompt prefix cache: a chat's second turn ({turns[label][0][1]} prompt tokens, the first turn's "
          "~1,000 among them), streamed, 32 tokens at most")
    print("| prefix cache | second turn's first token s (best) | rounds |")
    print("|---|---:|---|")
    for label in servers:
        print(f"| {label} | {min(t[0] for t in turns[label]):.3f} | {[round(t[0], 3) for t in turns[label]]} |")
    same = [t[2:] for t in turns["on (default)"]] == [t[2:] for t in turns["off (--no-prefix-cache)"]]
    print(f"- second turn's first token, cache off / on: {off / on:.1f}x (target >= {TARGET_PREFIX:.0f}x: "
          f"{'met' if off / on >= TARGET_PREFIX else 'not met'})")
    print(f"- both answers of every round are {'the same' if same else 'NOT the same'} with the cache on and off"
          + ("" if same else f": {json.dumps(turns)[:600]}"))


# -- the run -------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def throughput(args, counts: list[int], questions: list[str]) -> None:
    """Concurrent streams against llama.cpp's one (the table described at the top)."""
    from camelid.named_models import named_model_path

    gguf = named_model_path(MODEL)
    prompt, stop_ids = prompt_tokens(questions[0])
    llm = None
    if not args.skip_llamacpp:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        llamacpp_stream(llm, prompt, stop_ids, 8)  # warm-up

    port = args.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    print(f"starting the camelid server on port {port} ...", file=sys.stderr, flush=True)
    server = start_server(args, port)
    measured = {n: [] for n in counts}
    if llm is not None:
        measured["llama.cpp"] = []
    try:
        camelid_streams(base_url, server.pid, questions[:1], 8)  # warm-up
        for r in range(args.rounds):
            for n in counts:
                print(f"round {r + 1}: camelid, {n} stream(s) ...", file=sys.stderr, flush=True)
                measured[n].append(camelid_streams(base_url, server.pid, questions[:n], args.max_tokens))
            if llm is not None:
                print(f"round {r + 1}: llama.cpp ...", file=sys.stderr, flush=True)
                before = cpu_ticks(server.pid)
                run = llamacpp_stream(llm, prompt, stop_ids, args.max_tokens)
                run.cpu = cpu_use(before, cpu_ticks(server.pid), run.wall)
                measured["llama.cpp"].append(run)
    finally:
        stop_server(server)
    best = {key: max(runs, key=lambda run: run.aggregate_tps) for key, runs in measured.items()}

    short = [s for run in best.values() for s in run.streams if s.tokens != args.max_tokens]
    print(f"\nSmolLM2-135M-Instruct ({gguf.name}), {args.max_tokens} greedy tokens a stream (end-of-turn ignored), "
          f"{args.threads} threads, {os.cpu_count()} CPUs ({cpu_name()}), best of {args.rounds} round(s)")
    print(f"camelid {version('camelid')} (float32, max batch {args.max_batch}), torch {version('torch')}, "
          f"llama-cpp-python {version('llama_cpp_python')}, openai {version('openai')}, uvicorn {version('uvicorn')}")
    print(f"prompts: Vicuna-bench questions in SmolLM2's chat template, "
          f"{min(s.prompt_tokens for run in best.values() for s in run.streams)}.."
          f"{max(s.prompt_tokens for run in best.values() for s in run.streams)} tokens; llama.cpp gets the first "
          f"stream's {len(prompt)} prompt tokens\n")
    print("| engine | streams | tokens | wall s | aggregate tok/s | first token s (median) | decode tok/s a stream "
          "(median) | batch rows in use (max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, run in best.items():
        name, n = ("llama.cpp (Q4_1)", 1) if key == "llama.cpp" else ("camelid serve", key)
        rows_seen = "" if run.rows_in_use is None else str(run.rows_in_use)
        print(f"| {name} | {n} | {run.tokens} | {run.wall:.2f} | {run.aggregate_tps:.1f} | {run.first_token_s:.3f} | "
              f"{run.decode_tps:.1f} | {rows_seen} |")
    print()
    for n in counts:
        c = best[n].cpu
        print(f"- camelid, {n} stream(s): CPU cores busy on average: server {c['server']:.2f}, clients "
              f"{c['this process']:.2f}, other processes {c['others']:.2f}; first token s by stream "
              f"{[round(s.first - s.sent, 2) for s in best[n].streams]}")
        if args.rounds > 1:
            print(f"  rounds: aggregate tok/s {[round(r.aggregate_tps, 1) for r in measured[n]]}")
    if llm is not None:
        c = best["llama.cpp"].cpu
        print(f"- llama.cpp: CPU cores busy on average: llama.cpp {c['this process']:.2f}, the idle server "
              f"{c['server']:.2f}, other processes {c['others']:.2f}")
        if args.rounds > 1:
            print(f"  rounds: tok/s {[round(r.aggregate_tps, 1) for r in measured['llama.cpp']]}")
    if short:
        print(f"WARNING: {len(short)} stream(s) generated other than {args.max_tokens} tokens "
              f"({sorted({s.tokens for s in short})}): ignore_eos was not honoured")
    texts = {n: best[n].streams[0].text for n in counts}
    same = len(set(texts.values())) == 1
    print(f"- the first question's greedy answer from camelid is {'the same' if same else 'NOT the same'} "
          f"at every number of streams" + ("" if same else f": {json.dumps({n: t[:80] for n, t in texts.items()})}"))

    print("\nratios")
    one = best[counts[0]] if counts[0] == 1 else None
    if one is not None:
        for n in counts[1:]:
            ratio = best[n].aggregate_tps / one.aggregate_tps
            target = (f" (target >= {TARGET_SCALING:.1f}x: {'met' if ratio >= TARGET_SCALING else 'not met'})"
                      if n == 8 else "")
            print(f"- camelid aggregate tok/s, {n} streams / 1 stream: {ratio:.2f}x{target}")
    if llm is not None:
        peer = best["llama.cpp"]
        if one is not None:
            print(f"- camelid 1 stream vs llama.cpp 1 stream (above 1: camelid is faster): aggregate "
                  f"{one.aggregate_tps / peer.aggregate_tps:.2f}x, decode {one.decode_tps / peer.decode_tps:.2f}x, "
                  f"first token {peer.first_token_s / one.first_token_s:.2f}x")
        top = counts[-1]
        print(f"- camelid {top} streams' aggregate vs llama.cpp 1 stream: "
              f"{best[top].aggregate_tps / peer.aggregate_tps:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the camelid server, and llama.cpp's threads (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="tokens every stream generates, end-of-turn ignored (default 128)")
    parser.add_argument("--streams", default="1,4,8",
                        help="comma-separated numbers of concurrent camelid streams to measure (default 1,4,8; "
                             "at most 8, one question per Vicuna-bench category)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure every contender in turn this many times and keep each one's best (default 2)")
    parser.add_argument("--port", type=int, default=0, help="the camelid server's port (default 0: a free one)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp (no ratio to it)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to measure, comma-separated (default {','.join(PARTS)}; see the top)")
    parser.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefill-chunk", type=int, help=argparse.SUPPRESS)  # the server's --prefill-chunk
    parser.add_argument("--no-prefix-cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=8, help=argparse.SUPPRESS)  # `camelid serve`'s
    args = parser.parse_args()

    if args.server:
        run_server(args)
        return 0

    try:
        counts = sorted({int(n) for n in args.streams.split(",")})
    except ValueError:
        raise SystemExit(f"--streams {args.streams!r}: give numbers separated by commas, e.g. 1,4,8") from None
    if not counts or counts[0] < 1 or counts[-1] > 8:
        raise SystemExit(f"--streams {args.streams!r}: each number must be 1..8")
    if args.max_tokens < 2:
        raise SystemExit("--max-tokens must be at least 2 (decode speed is measured after the first token)")
    # One question from each of Vicuna-bench's 8 categories (10 questions each, in order).
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    questions = [rows[10 * i]["turns"][0] for i in range(8)]

    parts = [part for part in args.parts.split(",") if part]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts {args.parts!r}: name some of {', '.join(PARTS)}, separated by commas")
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, {os.cpu_count()} CPUs ({cpu_name()}), camelid "
          f"{version('camelid')} (float32, max batch {args.max_batch}), torch {version('torch')}, openai "
          f"{version('openai')}, best of {args.rounds} round(s)")
    if "throughput" in parts:
        throughput(args, counts, questions)
    if "chunked" in parts:
        chunked_prefill(args, rows)
    if "prefix" in parts:
        prefix_cache(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
