"""Fuzz camelid's GGUF loader: seeded random mutations of a real GGUF file's header, each loaded with
camelid.checkpoint.load_model in a worker process that a timeout watches.

    python bench/fuzz_gguf.py                      # 1,000 mutations of SmolLM2-135M-Instruct's GGUF
    python bench/fuzz_gguf.py --count 200 --seed 7 --model other.gguf

A mutation is a byte flipped, a run of 1-16 random bytes, an integer that parsers get wrong (0, 1, 2**31, 2**32,
2**63, 2**64-1, ...) written as 4 or 8 bytes, or the file cut short. Half land anywhere in the header, half in its
counts, model metadata and tensor index: the rest, 98% of the bytes, is the tokenizer's vocabulary and merges. Each
load either succeeds or is refused with a one-line CamelidError; anything else is a defect: a traceback, a message
of several lines, a worker that dies, or a hang (the worker is killed and restarted).

The file is copied once; a trial writes its bytes over the copy and puts the original ones back.
"""

import argparse
import multiprocessing
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

INTERESTING = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
DEFECTS = ("multi-line", "raised", "died", "hung")
SHOWN = 5  # defects printed with their traceback


@dataclass
class Mutation:
    at: int  # a byte offset; for a truncation, the length kept
    data: bytes  # written at `at`; empty for a truncation
    what: str

    def __str__(self) -> str:
        return self.what if not self.data else f"{self.what} at byte {self.at} ({self.data.hex()})"


def random_mutation(rng: random.Random, header: bytes, index: list[int]) -> Mutation:
    at = rng.randrange(len(header)) if rng.random() < 0.5 else rng.choice(index)
    kind = rng.choice(("flip", "bytes", "integer", "truncate"))
    if kind == "flip":
        return Mutation(at, bytes([header[at] ^ rng.randrange(1, 256)]), "byte flipped")
    if kind == "bytes":
        return Mutation(at, rng.randbytes(rng.randint(1, 16)), "random bytes")
    if kind == "integer":
        width = rng.choice((4, 8))
        value = rng.choice(INTERESTING) % (1 << 8 * width)
        return Mutation(at, value.to_bytes(width, "little"), f"integer {value} as {width} bytes")
    end = rng.randrange(len(header) + 4096)
    return Mutation(end, b"", f"truncated to {end} bytes")


def header_layout(path: Path) -> tuple[int, list[int]]:
    """The header's size (where the tensor data begins) and its offsets outside the long arrays (the vocabulary,
    its merges and token types): the counts, the model's metadata and the tensor index."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    index = list(range(24))  # magic, version, counts
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        parts = field.parts if len(field.data) <= 64 else field.parts[:5]  # an array: up to its length
        index += range(field.offset, field.offset + sum(p.nbytes for p in parts))
    return reader.data_offset, index


# -- the worker --------------------------------------------------------------------------------------------------


def worker(conn, memory_gb: float) -> None:
    """Load each path received; answer (outcome, message, peak RSS so far). The address space is capped, so
    that a load wanting tens of GB fails with MemoryError (a defect) instead of swapping the machine to a halt."""
    import torch

    from camelid.checkpoint import load_model
    from camelid.errors import CamelidError

    # One thread: beside other work, torch's spinning OpenMP threads made a load 20x slower, which the timeout
    # would count as a hang; speed is not what this measures.
    torch.set_num_threads(1)
    status = Path("/proc/self/status").read_text().splitlines()
    mapped = int(next(line.split()[1] for line in status if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(memory_gb * 2**30), resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        path = conn.recv()
        try:
            load_model(path, device="cpu")
            kind, message = "loaded", ""
        except CamelidError as exc:
            kind, message = "multi-line" if "\n" in str(exc).strip() else "refused", str(exc)
        except Exception:  # noqa: BLE001 (any other exception is what this looks for)
            kind, message = "raised", traceback.format_exc()
        conn.send((kind, message, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


class Loader:
    """A worker process, restarted after it hangs or dies."""

    def __init__(self, timeout: float, memory_gb: float):
        self.timeout, self.memory_gb, self.proc = timeout, memory_gb, None
        self.start()

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=worker, args=(child, self.memory_gb), daemon=True)
        self.proc.start()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            sys.exit("fuzz_gguf: the worker did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join()

    def load(self, path: Path) -> tuple[str, str, int]:
        self.conn.send(str(path))
        if not self.conn.poll(self.timeout):
            self.stop()
            self.start()
            return "hung", f"no answer in {self.timeout:g} s", 0
        try:
            return self.conn.recv()
        except EOFError:  # it died: a crash in native code, or killed
            self.stop()
            self.start()
            return "died", f"the worker died (exit status {self.proc.exitcode})", 0


def run_trial(loader: Loader, copy: Path, cut: Path, head: bytes, mutation: Mutation) -> tuple[str, str, int]:
    if not mutation.data:
        cut.write_bytes(head[: mutation.at])
        return loader.load(cut)
    with open(copy, "r+b") as f:
        f.seek(mutation.at)
        original = f.read(len(mutation.data))
        f.seek(mutation.at)
        f.write(mutation.data)
    try:
        return loader.load(copy)
    finally:
        with open(copy, "r+b") as f:
            f.seek(mutation.at)
            f.write(original)


# -- the report --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} ({len(names)} logical CPUs)" if names else "unknown"


def report(args, header_size: int, counts: dict, defects: list, highest: tuple, seconds: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # every worker, once reaped
    rows = [("loaded", "loaded"), ("refused", "refused: one-line CamelidError"),
            ("multi-line", "refused, in several lines (defect)"), ("raised", "raised something else (defect)"),
            ("died", "worker died (defect)"), ("hung", f"hung, no answer in {args.timeout:g} s (defect)")]
    print(f"{args.count} header mutations of {args.model.name} ({args.model.stat().st_size / 1e6:.1f} MB, header "
          f"{header_size:,} bytes), seed {args.seed}")
    print(f"CPU: {cpu_name()}\n")
    for kind, label in rows:
        print(f"{label:<40} {counts.get(kind, 0):>6}")
    print(f"\npeak worker RSS: {peak:,.0f} MB (any worker, hung ones too); after a trial at most "
          f"{highest[0] / 2**20:,.0f} MB, first after {highest[1]}")
    print(f"{seconds:.0f} s, {seconds / args.count:.2f} s a trial")
    for number, mutation, kind, message in defects[:SHOWN]:
        # a message of several lines in full, escaped; of a traceback, its end
        shown = [ascii(message)] if kind == "multi-line" else message.strip().splitlines()[-6:]
        print(f"\n#{number} {mutation}: {kind}\n    " + "\n    ".join(shown))


def main() -> int:
    from camelid.named_models import DEFAULT_MODEL, NAMED_MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=NAMED_MODELS[DEFAULT_MODEL].path(),
                   help=f"the GGUF file to mutate (default: {DEFAULT_MODEL}'s, as camelid installs it)")
    p.add_argument("--count", type=int, default=1000, help="mutations to try, one load each (default 1000)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the mutations: the same seed, the same ones (default 0)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds a load may take before it counts as hung and the worker is restarted (default 5)")
    p.add_argument("--memory", type=float, default=8.0, metavar="GB",
                   help="address space a worker may add after importing camelid; a load that needs more raises "
                   "MemoryError, counted as a defect (default 8)")
    args = p.parse_args()
    if args.model is None or not args.model.is_file():
        p.error(f"no GGUF file at {args.model}; pass --model, or install {DEFAULT_MODEL}: "
                f"{NAMED_MODELS[DEFAULT_MODEL].install}")

    header_size, index = header_layout(args.model)
    rng, counts, defects, highest = random.Random(args.seed), {}, [], (0, None)
    with tempfile.TemporaryDirectory(prefix="fuzz_gguf-") as tmp:
        copy, cut = Path(tmp) / "model.gguf", Path(tmp) / "cut.gguf"
        shutil.copyfile(args.model, copy)
        head = copy.read_bytes()[: header_size + 4096]
        loader, start = Loader(args.timeout, args.memory), time.monotonic()
        for number in range(1, args.count + 1):
            mutation = random_mutation(rng, head[:header_size], index)
            kind, message, rss = run_trial(loader, copy, cut, head, mutation)
            if rss > highest[0]:  # the trial that took a worker to its peak
                highest = (rss, f"#{number} ({mutation})")
            counts[kind] = counts.get(kind, 0) + 1
            if kind in DEFECTS:
                defects.append((number, mutation, kind, message))
            if number % 100 == 0 and number < args.count:
                print(f"{number}/{args.count}: {counts}", file=sys.stderr, flush=True)
        loader.stop()
    report(args, header_size, counts, defects, highest, time.monotonic() - start)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
