"""Hostile model files, each built here at test time from the tiny model: camelid must refuse every one with a
one-line CamelidError within seconds and without a traceback, a hang or a memory blow-up — through load_model,
`camelid generate`, `chat`, `export` and `serve`. Loads and renders run in a worker process watched with a
timeout, so that a regression which hangs fails its test instead of hanging pytest.
"""

import json
import os
import pickle
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from helpers import TINY_CHAT, run_camelid, serve_command

LIMIT_S = 5.0  # the bound on every refusal
CLI_S = 10.0  # the same, plus starting a Python with torch
HANG_S = 15.0  # a worker silent this long is taken as hung and killed
GB = 1 << 30

# -- GGUF v3 as editable parts -----------------------------------------------------------------------------------

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
UINT32, STRING = 4, 8
ALIGN = 32  # general.alignment's default; camelid's export sets no other


def encode(vtype: int, value) -> bytes:
    if vtype == STRING:
        return struct.pack("<Q", len(value.encode())) + value.encode()
    return struct.pack("<" + SCALARS[vtype], value)


def value_end(blob: bytes, pos: int, vtype: int) -> int:
    """Where the metadata value of type `vtype` starting at `pos` ends."""
    if vtype in SCALARS:
        return pos + struct.calcsize(SCALARS[vtype])
    if vtype == STRING:
        return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]
    item, n = struct.unpack_from("<IQ", blob, pos)  # an array
    if item in SCALARS:
        return pos + 12 + n * struct.calcsize(SCALARS[item])
    pos += 12
    for _ in range(n):
        pos = value_end(blob, pos, item)
    return pos


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: innermost first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class RawGGUF:
    """A GGUF file as parts to edit and write back, any field set to anything: metadata as (key, value type, the
    value's bytes), the tensor index, the data section; n_kv and n_tensors None for the true counts."""

    kvs: list[tuple[str, int, bytes]]
    tensors: list[Tensor]
    data: bytes
    magic: bytes = b"GGUF"
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None

    @classmethod
    def read(cls, blob: bytes) -> "RawGGUF":
        _, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        pos, kvs, tensors = 24, [], []
        for _ in range(n_kv):
            end = value_end(blob, pos, STRING)
            key, (vtype,) = blob[pos + 8 : end].decode(), struct.unpack_from("<I", blob, end)
            pos = value_end(blob, end + 4, vtype)
            kvs.append((key, vtype, blob[end + 4 : pos]))
        for _ in range(n_tensors):
            end = value_end(blob, pos, STRING)
            (n_dims,) = struct.unpack_from("<I", blob, end)
            *dims, ggml_type, offset = struct.unpack_from(f"<{n_dims}QIQ", blob, end + 4)
            tensors.append(Tensor(blob[pos + 8 : end].decode(), dims, ggml_type, offset))
            pos = end + 4 + 8 * n_dims + 12
        return cls(kvs, tensors, blob[-(-pos // ALIGN) * ALIGN :])

    def to_bytes(self) -> bytes:
        counts = (len(self.tensors) if self.n_tensors is None else self.n_tensors,
                  len(self.kvs) if self.n_kv is None else self.n_kv)
        parts = [self.magic, struct.pack("<IQQ", self.version, *counts)]
        for key, vtype, value in self.kvs:
            parts += [encode(STRING, key), struct.pack("<I", vtype), value]
        for t in self.tensors:
            parts += [encode(STRING, t.name), struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.ggml_type,
                                                          t.offset)]
        header = b"".join(parts)
        return header + bytes(-len(header) % ALIGN) + self.data

    def set(self, key: str, vtype: int, value: bytes) -> None:
        """Set metadata `key` (added if the file lacks it) to the encoded `value` of type `vtype`."""
        keys = [k for k, _, _ in self.kvs]
        entry = (key, vtype, value)
        if key in keys:
            self.kvs[keys.index(key)] = entry
        else:
            self.kvs.append(entry)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def index_offsets(g: RawGGUF, header_size: int) -> list[int]:
    """The header's offsets outside the tokenizer's long arrays (98% of its bytes): its counts, the model's
    metadata and the tensor index, which a loader must check before it allocates anything."""
    offsets, pos = list(range(24)), 24
    for key, _, value in g.kvs:
        size = 12 + len(key.encode()) + len(value)
        offsets += range(pos, pos + (size if len(value) < 4096 else size - len(value) + 12))
        pos += size
    return offsets + list(range(pos, header_size))


# -- the hostile GGUFs: name -> (edit of the tiny model's file, words the error must contain) ---------------------


def kv(key, vtype, value):
    return lambda g: g.set(key, vtype, encode(vtype, value))


def tensor(name, **fields):
    return lambda g: vars(g.tensor(name)).update(fields)


def header(**fields):
    return lambda g: vars(g).update(fields)


def duplicate_key(g):
    g.kvs.append(next(entry for entry in g.kvs if entry[0] == "llama.context_length"))


def duplicate_tensor(g):  # a second output_norm.weight with data of its own, so nothing else is wrong
    g.tensors.append(replace(g.tensor("output_norm.weight"), offset=len(g.data)))
    g.data += bytes(128)


def unaligned(g):  # room after the last tensor, so that moving it 4 bytes neither overlaps nor runs past the end
    g.data += bytes(ALIGN)
    g.tensor("output_norm.weight").offset += 4


def overlap(g):
    g.tensor("blk.0.attn_k.weight").offset = g.tensor("blk.0.attn_q.weight").offset


VOCAB = TINY_CHAT.vocab_size
GGUF_CASES = {
    "block_count=2**31": (kv("llama.block_count", UINT32, 2**31), ["block_count"]),
    "block_count=0": (kv("llama.block_count", UINT32, 0), ["block_count"]),
    "head_count=0": (kv("llama.attention.head_count", UINT32, 0), ["head_count"]),
    "embedding_length-a-string": (kv("llama.embedding_length", STRING, "32"), ["embedding_length"]),
    "rms_epsilon=abc": (kv("llama.attention.layer_norm_rms_epsilon", STRING, "abc"), ["layer_norm_rms_epsilon"]),
    "bos_token_id=vocab_size": (kv("tokenizer.ggml.bos_token_id", UINT32, VOCAB), ["bos_token_id"]),
    "eos_token_id=2**32-1": (kv("tokenizer.ggml.eos_token_id", UINT32, 2**32 - 1), ["eos_token_id"]),
    "duplicated-key": (duplicate_key, ["llama.context_length"]),
    "string-length-2**63": (lambda g: g.set("general.name", STRING, struct.pack("<Q", 2**63) + b"tiny"), []),
    "tensor-of-0-dims": (tensor("output_norm.weight", dims=[]), ["output_norm.weight"]),
    "a-dim-of-0": (tensor("token_embd.weight", dims=[32, 0]), ["token_embd.weight"]),
    "dims=[2**64-1]": (tensor("token_embd.weight", dims=[2**64 - 1]), ["token_embd.weight"]),
    "dims=[2**32,2**32]": (tensor("token_embd.weight", dims=[2**32, 2**32]), ["token_embd.weight"]),
    "5-dims": (tensor("token_embd.weight", dims=[32, VOCAB, 1, 1, 1]), ["token_embd.weight"]),
    "ggml-type-999": (tensor("blk.0.attn_q.weight", ggml_type=999), ["blk.0.attn_q.weight"]),
    "offset-past-the-end": (tensor("output_norm.weight", offset=1 << 30), ["output_norm.weight"]),
    "offset-not-aligned": (unaligned, ["output_norm.weight"]),
    "overlapping-tensors": (overlap, ["overlap"]),
    "duplicated-tensor-name": (duplicate_tensor, ["output_norm.weight"]),
    "n_kv=2**63": (header(n_kv=2**63), []),
    "n_tensors=2**63": (header(n_tensors=2**63), []),
    "wrong-magic": (header(magic=b"GGUX"), ["GGUF"]),
    "version-1": (header(version=1), ["version"]),
    "version-99": (header(version=99), ["version"]),
}


# -- a worker process to load and render in -----------------------------------------------------------------------

# Answers each request line ({"load": path} or {"render": template source}) with one JSON line: outcome, message,
# seconds, and how far the peak resident size of it or of a child it waited for (a template renderer) grew.
WORKER = """
import json, os, resource, sys, time, traceback
from camelid.checkpoint import load_model
from camelid.chat_template import ChatTemplate
from camelid.errors import CamelidError

replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what camelid prints goes to stderr, not into the replies

def peaks():
    return [resource.getrusage(who).ru_maxrss * 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

print("ready", file=replies, flush=True)
for line in sys.stdin:
    request, before, start = json.loads(line), peaks(), time.monotonic()
    try:
        if "load" in request:
            load_model(request["load"], device="cpu", dtype="float32")
        else:
            ChatTemplate(request["render"]).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        outcome = ["loaded", ""]
    except CamelidError as exc:
        outcome = ["refused", str(exc)]
    except BaseException:
        outcome = ["crashed", traceback.format_exc()]
    grown = max(after - b for after, b in zip(peaks(), before))
    print(json.dumps([*outcome, time.monotonic() - start, grown]), file=replies, flush=True)
"""
Outcome = namedtuple("Outcome", "kind message seconds grown")


class Worker:
    """WORKER, started on first use and again after it hangs, dies or reaches a memory peak."""

    proc = None

    def call(self, **request) -> Outcome:
        if self.proc is None:
            # one torch thread, as in conftest.py: spinning OpenMP threads beside other work slow a load 20x
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert self._reply(120) == "ready\n", "the worker did not start"
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self._reply(HANG_S)
        if not line:
            self.stop()
            problem = ("hung", f"no answer in {HANG_S} s") if line is None else ("died", "the worker died")
            return Outcome(*problem, HANG_S, 0)
        outcome = Outcome(*json.loads(line))
        if outcome.grown > GB // 4:  # so that the next call's growth is measured from a low peak
            self.stop()
        return outcome

    def _reply(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its children (template renderers) too
            self.proc.wait()
            self.proc = None


def assert_refused(outcome: Outcome, *words: str) -> None:
    """A one-line CamelidError containing `words`, within LIMIT_S, the peak memory up by less than 1 GB."""
    kind, message, seconds, grown = outcome
    assert kind == "refused", f"{kind}: {message}"
    assert message.strip() and "\n" not in message, f"not one line: {message!r}"
    assert all(word in message for word in words), f"{words} not in: {message}"
    assert seconds < LIMIT_S, f"refused after {seconds:.1f} s"
    assert grown < GB, f"peak memory grew by {grown / 2**20:.0f} MB"


def assert_cli_refused(result: subprocess.CompletedProcess, seconds: float, *words: str) -> None:
    """A non-zero exit within CLI_S whose stderr ends in one `camelid: error:` line containing `words`."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = (result.stderr.strip().splitlines() or [""])[-1]
    assert last.startswith("camelid: error:") and all(word in last for word in words), result.stderr[-3000:]
    assert seconds < CLI_S, f"exited after {seconds:.1f} s"


def timed_camelid(*args, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    return run_camelid(*args, timeout=60, **kwargs), time.monotonic() - start


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_chat_dir, tmp_path_factory) -> Path:
    """tiny_chat_dir exported as an f32 GGUF (8 MB), the file every hostile GGUF here is made from."""
    from camelid.export import export_gguf

    return export_gguf(tiny_chat_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", type="f32", progress=False)


def hostile_gguf(tiny_gguf: Path, case: str, out: Path) -> Path:
    g = RawGGUF.read(tiny_gguf.read_bytes())
    GGUF_CASES[case][0](g)
    (out / "hostile.gguf").write_bytes(g.to_bytes())
    return out / "hostile.gguf"


# -- GGUF files ------------------------------------------------------------------------------------------------


def test_the_raw_writer_round_trips_the_tiny_gguf_which_loads(tiny_gguf, worker):
    blob = tiny_gguf.read_bytes()
    assert RawGGUF.read(blob).to_bytes() == blob
    assert worker.call(load=str(tiny_gguf)).kind == "loaded"


@pytest.mark.parametrize("case", GGUF_CASES)
def test_a_hostile_gguf_is_refused_in_one_line(case, tiny_gguf, tmp_path, worker):
    assert_refused(worker.call(load=str(hostile_gguf(tiny_gguf, case, tmp_path))), *GGUF_CASES[case][1])


@pytest.mark.parametrize("seed", range(10))
def test_a_truncated_gguf_is_refused_in_one_line(seed, tiny_gguf, tmp_path, worker):
    blob = tiny_gguf.read_bytes()
    header_size = len(blob) - len(RawGGUF.read(blob).data)
    end = random.Random(seed).randrange(header_size if seed % 2 == 0 else len(blob))  # odd seeds: anywhere
    (tmp_path / "cut.gguf").write_bytes(blob[:end])
    assert_refused(worker.call(load=str(tmp_path / "cut.gguf")))


@pytest.mark.slow
def test_random_byte_flips_in_the_header_never_raise_anything_else_or_hang(tiny_gguf, tmp_path, worker):
    blob = tiny_gguf.read_bytes()
    g = RawGGUF.read(blob)
    header_size = len(blob) - len(g.data)
    index = index_offsets(g, header_size)
    path, rng, outcomes, defects = tmp_path / "flipped.gguf", random.Random(0), {}, []
    shutil.copy(tiny_gguf, path)
    for trial in range(200):
        at = rng.randrange(header_size) if trial % 2 else rng.choice(index)
        flipped = blob[at] ^ rng.randrange(1, 256)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([flipped]))
        outcome = worker.call(load=str(path))
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(blob[at : at + 1])
        outcomes[outcome.kind] = outcomes.get(outcome.kind, 0) + 1
        if outcome.kind != "loaded" and (outcome.kind != "refused" or "\n" in outcome.message):
            defects.append(f"byte {at} = {flipped}: {outcome.kind}: {outcome.message.strip().splitlines()[-1:]}")
    assert not defects, f"{outcomes}; {len(defects)} defects, the first: " + "\n".join(defects[:5])


CLI_GGUF_CASES = ["block_count=2**31", "head_count=0", "dims=[2**32,2**32]", "overlapping-tensors", "wrong-magic",
                  "bos_token_id=vocab_size"]


@pytest.mark.parametrize("case", CLI_GGUF_CASES)
def test_generate_refuses_a_hostile_gguf_in_one_line(case, tiny_gguf, tmp_path):
    path = hostile_gguf(tiny_gguf, case, tmp_path)
    assert_cli_refused(*timed_camelid("generate", "-m", path, "-p", "hi", "-n", "4", "-t", "0"), *GGUF_CASES[case][1])


@pytest.mark.parametrize("kind, case", [("gguf", "block_count=2**31"), ("hf", "dims=[2**64-1]"),
                                        ("gguf", "overlapping-tensors")])
def test_export_refuses_a_hostile_gguf_and_writes_nothing(kind, case, tiny_gguf, tmp_path):
    path = hostile_gguf(tiny_gguf, case, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result, seconds = timed_camelid("export", kind, path, out / ("model.gguf" if kind == "gguf" else "model"))
    assert_cli_refused(result, seconds, *GGUF_CASES[case][1])
    assert not list(out.iterdir())


# -- Hugging Face directories ------------------------------------------------------------------------------------


def config(**changes):
    def edit(d: Path):
        path = d / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def shard_outside(d: Path):  # valid weights, so a loader that does not check would load them
    from safetensors import safe_open

    outside = d.parents[1] / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    shutil.move(d / "model.safetensors", outside)
    with safe_open(outside, "pt") as f:
        weight_map = dict.fromkeys(f.keys(), "../../elsewhere/model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def symlink_outside(d: Path):
    shutil.move(d / "model.safetensors", d.parents[1] / "outside.safetensors")
    (d / "model.safetensors").symlink_to(d.parents[1] / "outside.safetensors")


def safetensors_header(first_bytes: bytes):
    def edit(d: Path):
        (d / "model.safetensors").write_bytes(first_bytes + (d / "model.safetensors").read_bytes()[len(first_bytes):])
    return edit


HF_CASES = {
    "num_hidden_layers=10**9": (config(num_hidden_layers=10**9), ["num_hidden_layers"]),
    "head_dim=-64": (config(head_dim=-64), ["head_dim"]),
    "rms_norm_eps=x": (config(rms_norm_eps="x"), ["rms_norm_eps"]),
    "rope_theta=x": (config(rope_theta="x"), ["rope_theta"]),
    "hidden_size=0": (config(hidden_size=0), ["hidden_size"]),
    "shard-outside-the-directory": (shard_outside, ["elsewhere"]),
    "symlink-outside-the-directory": (symlink_outside, ["model.safetensors"]),
    "safetensors-header-length-2**62": (safetensors_header(struct.pack("<Q", 2**62)), ["model.safetensors"]),
    "safetensors-header-not-json": (safetensors_header(struct.pack("<Q", 16) + b"this isn't JSON"),
                                    ["model.safetensors"]),
}


@pytest.fixture
def tiny_copy(tiny_chat_dir, tmp_path) -> Path:
    """A copy of tiny_chat_dir two levels down in tmp_path, to edit."""
    return Path(shutil.copytree(tiny_chat_dir, tmp_path / "models" / "tiny"))


def test_the_tiny_directory_loads_as_copied(tiny_copy, worker):
    assert worker.call(load=str(tiny_copy)).kind == "loaded"


@pytest.mark.parametrize("case", HF_CASES)
def test_a_hostile_hf_directory_is_refused_in_one_line(case, tiny_copy, worker):
    HF_CASES[case][0](tiny_copy)
    assert_refused(worker.call(load=str(tiny_copy)), *HF_CASES[case][1])


@pytest.mark.parametrize("case", ["num_hidden_layers=10**9", "shard-outside-the-directory"])
def test_generate_refuses_a_hostile_hf_directory_in_one_line(case, tiny_copy):
    HF_CASES[case][0](tiny_copy)
    result, seconds = timed_camelid("generate", "-m", tiny_copy, "-p", "hi", "-n", "4", "-t", "0")
    assert_cli_refused(result, seconds, *HF_CASES[case][1])


class Trap:
    """Unpickled, this makes the directory `path`: proof that a pickle was opened."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_weights_are_refused_unopened(tiny_copy, worker):
    (tiny_copy / "model.safetensors").unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(tiny_copy.parent / "unpickled")))
    assert_refused(worker.call(load=str(tiny_copy)), "pytorch_model.bin")
    assert not (tiny_copy.parent / "unpickled").exists()


# -- chat templates ------------------------------------------------------------------------------------------------

BOMBS = {
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "center-method": "{{ 'x'.center(50000000) }}",
    "center-filter-folded-when-compiled": "{{ 'x'|center(300000000) }}",
    "silent-nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}


@pytest.fixture
def bomb_dir(tiny_copy, request) -> Path:
    """tiny_copy with the bomb template named by the test's `bomb` parameter (nested loops if it has none)."""
    (tiny_copy / "chat_template.jinja").write_text(BOMBS[getattr(request, "param", "nested-loops")])
    return tiny_copy


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_bomb_template_is_refused_in_one_line(bomb, worker):
    assert_refused(worker.call(render=BOMBS[bomb]), "template")


@pytest.mark.parametrize("bomb_dir", BOMBS, indirect=True)
def test_generate_chat_refuses_a_bomb_template_in_one_line(bomb_dir):
    assert_cli_refused(*timed_camelid("generate", "-m", bomb_dir, "--chat", "-p", "hi", "-n", "2"), "template")


def test_chat_answers_a_bomb_template_with_an_error_line(bomb_dir):
    result, seconds = timed_camelid("chat", "-m", bomb_dir, "-n", "2", stdin="hi\n")
    assert "Traceback" not in result.stderr and seconds < CLI_S, result.stderr[-3000:]
    # the turn ends in an error line (after the `>>> ` prompt) and the conversation goes on
    assert any("error: chat template" in line for line in result.stdout.splitlines()), result.stdout


def test_serve_answers_health_while_a_bomb_renders_and_the_bomb_with_400(bomb_dir, tmp_path):
    import httpx

    chat = {"model": "bomb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serve_command(["-m", f"bomb={bomb_dir}", "--votes", str(tmp_path / "votes.jsonl")]) as (server, url), \
            httpx.Client(base_url=url, timeout=10) as client, ThreadPoolExecutor(1) as pool:
        try:
            start = time.monotonic()
            bomb = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat, timeout=60)
            waits = []
            while not bomb.done():
                before = time.monotonic()
                assert client.get("/health").status_code == 200
                waits.append(time.monotonic() - before)
                time.sleep(0.05)
            answered = time.monotonic() - start
            reply = bomb.result()
            assert reply.status_code == 400 and "template" in reply.json()["error"]["message"], reply.text
            assert answered < LIMIT_S and waits and max(waits) < 0.1, (answered, waits)
            after = client.post("/v1/completions", json={"model": "bomb", "prompt": "hi", "max_tokens": 2})
            assert after.status_code == 200, after.text
        finally:
            server.kill()  # a server stuck in a render may not stop on SIGTERM; the bomb's request ends with it
