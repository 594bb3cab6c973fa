"""Shared fixtures: the real SmolLM2 and Gemma 3 GGUFs, real ShareGPT texts, and markers for optional references."""

import json
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
        pytest.skip(f"SmolLM2 GGUF not installed ({NAMED_MODELS[DEFAULT_MODEL].install})")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M GGUF (base model; SentencePiece vocabulary of 262,144 tokens, many user-defined)."""
    model = NAMED_MODELS["gemma3-270m"]
    path = model.path()
    if path is None:
        pytest.skip(f"Gemma 3 270M GGUF not installed ({model.install})")
    return path


@pytest.fixture(scope="module")
def smollm2_model(smollm2_gguf):
    """The real SmolLM2 as camelid loads it by default: float32 weights dequantized from its GGUF (a LoadedModel)."""
    from camelid.checkpoint import load_model

    return load_model(smollm2_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def family_tok(smollm2_gguf):
    """SmolLM2's tokenizer with the special tokens of the Gemma, Llama 3 and Phi-3 formats added (tests/helpers.py)."""
    from helpers import family_tokenizer

    return family_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_tokenizer_and_template(smollm2_gguf):
    """SmolLM2's tokenizer and its own chat template, without the weights: (Tokenizer, ChatTemplate)."""
    from camelid.checkpoint import load_tokenizer_and_template

    return load_tokenizer_and_template(smollm2_gguf)


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
def tiny_chat_dir(tmp_path_factory, smollm2_gguf) -> Path:
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


@pytest.fixture(scope="module")
def tiny_chat_loaded(tiny_chat_dir):
    """tiny_chat_dir loaded (a LoadedModel)."""
    from camelid.checkpoint import load_model

    return load_model(tiny_chat_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def chatty(tiny_chat_dir):
    """The tiny random model with its weights scaled up 15x: greedy decoding of the model as saved writes only
    newlines whatever the prompt, which would make every answer "" and hide a mixed-up batch."""
    import torch

    from camelid.checkpoint import load_model

    loaded = load_model(tiny_chat_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim == 2:
                p.mul_(15)
    return loaded


@pytest.fixture(scope="session")
def served_models(smollm2_gguf, tiny_chat_dir):
    """Two models behind one engine each: the real SmolLM2 as "smollm2" and a tiny random one as "tiny"."""
    pytest.importorskip("fastapi")
    from camelid.serve.server import load_served_models

    models = load_served_models([f"smollm2={smollm2_gguf}", f"tiny={tiny_chat_dir}"], device="cpu",
                                dtype="float32", max_batch=8, max_queue=64)
    yield models
    for m in models:
        m.engine.close()


# -- what was skipped ---------------------------------------------------------------------------------------------

FULL_RUN = ("for the full run: .ci/run (installs Chromium and tmux, then runs `make test`), or `apt-get install "
            "chromium tmux` and keep ../shared/data beside the checkout")


def pytest_terminal_summary(terminalreporter):
    """End every run with what was skipped and why, grouped by reason, and how to run the rest."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    deselected = len(terminalreporter.stats.get("deselected", []))
    if not reasons and not deselected:
        return
    terminalreporter.section("what this run left out")
    for reason, n in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{n:>5} skipped: {reason}")
    if deselected:
        terminalreporter.write_line(f"{deselected:>5} deselected (by -m or -k; `make test` runs every test)")
    if reasons:
        terminalreporter.write_line(FULL_RUN)


@pytest.fixture(scope="module")
def tuned_adapter(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2 after three LoRA steps on the identity set at a high learning rate: enough to change its answers."""
    from camelid.data.identity import identity_conversations
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    directory = tmp_path_factory.mktemp("tuned")
    data = directory / "identity.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations()))
    cfg = build_config({"model": DEFAULT_MODEL, "data": [str(data)], "out": str(directory / "run"), "seq_len": 256,
                        "batch_size": 4, "micro_batch_size": 4, "max_steps": 3, "lr": 3e-3, "warmup_ratio": 0.0,
                        "seed": 3})
    return train(cfg, progress=False, log=lambda message: None).model_dir
