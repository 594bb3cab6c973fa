"""Memory and speed of LoRA adapters per request: `camelid serve --adapter` against one merged model per adapter.

Four random adapters of rank 16 on q, k, v, o, gate, up and down of SmolLM2-135M-Instruct (B non-zero, so each
changes the answers) are written as peft adapter directories. Three servers run, one after the other, each in a
process of its own (`camelid serve`, float32, --threads):

  base alone        -m smollm2-135m-instruct
  --adapter         the base and the 4 adapters on one copy of its weights, one engine
  merged (peer)     the base and each adapter merged into a copy of its own (-m NAME=ADAPTER_DIR, 5 models),
                    what serving the adapters cost before --adapter

Each server answers one greedy chat completion per model it serves, all at once (so that the forward passes'
working memory is counted), then its peak resident memory (VmHWM of /proc/PID/status) is read. The goal of issue
20: base + adapters, not one model per adapter; the peak with 4 adapters within base + 4 x an adapter's file
size + 10%. The wall time of those concurrent answers is printed too (--tokens each, ignore_eos).

    python bench/adapters.py [--threads 2] [--tokens 32] [--rank 16]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = "smollm2-135m-instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = 4


def write_adapters(directory: Path, rank: int) -> list[Path]:
    """ADAPTERS random adapters of MODEL, rank `rank` on every linear layer of the blocks, as peft saves them."""
    import torch

    from camelid.checkpoint import load_model
    from camelid.lora import LoRAConfig, apply_lora, save_adapter

    out = []
    for i in range(ADAPTERS):
        model = apply_lora(load_model(MODEL, device="cpu", dtype="float32").model,
                           LoRAConfig(r=rank, alpha=2 * rank, dropout=0, targets=TARGETS))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        out.append(save_adapter(model, directory / f"a{i}", base_model=MODEL))
    return out


def adapter_flags(flag: str, dirs: list[Path]) -> list[str]:
    return [part for i, d in enumerate(dirs) for part in (flag, f"a{i}={d}")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """`camelid serve FLAGS` in a process of its own, once it answers /health."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "camelid", "serve", *flags, "--port", str(port), "--threads", str(args.threads)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited (code {process.returncode}); its error is above")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not answer /health within 600 s")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc: this bench reads Linux's process status")


def measure(args, flags: list[str]) -> tuple[float, float, list[str]]:
    """(peak RSS MiB, seconds for one concurrent answer per served model, the answers) of a server run with FLAGS."""
    import openai

    process, url = serve(args, flags)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
        names = [m.id for m in client.models.list().data]

        def ask(name: str) -> str:
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0, max_tokens=args.tokens, extra_body={"ignore_eos": True})
            return reply.choices[0].message.content

        start = time.perf_counter()
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(ask, names))
        return peak_rss_mib(process.pid), time.perf_counter() - start, answers
    finally:
        process.terminate()
        process.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="tokens each answer generates (default 32)")
    parser.add_argument("--rank", type=int, default=16, help="the adapters' rank (default 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(Path(tmp), args.rank)
        adapter_mib = (dirs[0] / "adapter_model.safetensors").stat().st_size / 2**20
        runs = {
            "base alone": measure(args, ["-m", MODEL]),
            f"--adapter x{ADAPTERS}": measure(args, ["-m", MODEL, *adapter_flags("--adapter", dirs)]),
            f"merged x{ADAPTERS} (peer)": measure(args, ["-m", MODEL, *adapter_flags("-m", dirs)]),
        }
    base = runs["base alone"][0]
    print(f"\n{MODEL}, float32, {args.threads} threads; {ADAPTERS} adapters of rank {args.rank} on "
          f"{', '.join(TARGETS)}: {adapter_mib:.1f} MiB each (adapter_model.safetensors)\n")
    print(f"| server | peak RSS MiB | over the base MiB | / (base + {ADAPTERS} adapters) | answers s (one per model, "
          f"at once) |")
    print("|---|---|---|---|---|")
    for name, (rss, seconds, answers) in runs.items():
        print(f"| {name} ({len(answers)} models) | {rss:.0f} | {rss - base:.0f} | "
              f"{rss / (base + ADAPTERS * adapter_mib):.2f}x | {seconds:.2f} |")
    same = runs[f"--adapter x{ADAPTERS}"][2] == runs[f"merged x{ADAPTERS} (peer)"][2]
    print(f"\n--adapter gave the merged models' answers: {'yes' if same else 'no (float rounding differs)'}")
    limit = 1.1 * (base + ADAPTERS * adapter_mib)
    rss = runs[f"--adapter x{ADAPTERS}"][0]
    print(f"goal: --adapter's peak {rss:.0f} MiB <= (base + {ADAPTERS} x adapter) x 1.1 = {limit:.0f} MiB: "
          f"{'met' if rss <= limit else 'missed'}")


if __name__ == "__main__":
    main()
