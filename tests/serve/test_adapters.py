"""`camelid serve --adapter`: LoRA adapters answering on one copy of the base, as each answers merged on its own.

Every adapter here has random, non-zero B (a new adapter's B is zero, which would make it the base), and they
differ in rank, alpha and targets. The reference for each is `camelid generate -m ADAPTER`'s path: the adapter
directory loaded by `load_model`, which merges it into its own copy of the base.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from helpers import live_server

from camelid.adapters import MultiLoRALinear
from camelid.chat import chat_template_for, encode_chat
from camelid.checkpoint import load_model, save_model
from camelid.errors import CamelidError
from camelid.generate import SamplingParams, generate
from camelid.lora import LoRAConfig, apply_lora, save_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTIONS = ["Name three camels, please", "Why is the sky blue?"]
TOKENS = 24


@pytest.fixture(scope="module")
def base_dir(tiny_chat_dir, tmp_path_factory):
    """The tiny random model with weights scaled up (as conftest's `chatty`: else it answers only newlines)."""
    loaded = load_model(tiny_chat_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim == 2:
                p.mul_(15)
    return save_model(loaded, tmp_path_factory.mktemp("adapters") / "base")


def make_adapter(base, out, seed: int, config: LoRAConfig, **save):
    """An adapter of `base` with random A and B, saved as peft saves it, naming `base` as its base; `save`:
    save_adapter's tokenizer and chat_template."""
    model = apply_lora(load_model(base, device="cpu", dtype="float32").model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return save_adapter(model, out, base_model=str(base), **save)


@pytest.fixture(scope="module")
def adapter_dirs(base_dir):
    """Two adapters of other ranks, alphas and targets; the first carries the base's tokenizer and a chat template
    of its own (a system line before the base's), which it must chat with."""
    base = load_model(base_dir, device="cpu")
    template = "{{ '<|im_start|>system\nYou are adapter one.<|im_end|>\n' }}" + base.chat_template
    return {
        "one": make_adapter(base_dir, base_dir.parent / "one", 1, LoRAConfig(r=4, alpha=8, dropout=0),
                            tokenizer=base.tokenizer, chat_template=template),
        "two": make_adapter(base_dir, base_dir.parent / "two", 2,
                            LoRAConfig(r=8, alpha=32, dropout=0, targets=("k_proj", "o_proj", "up_proj", "down_proj"))),
    }


@pytest.fixture(scope="module")
def served(base_dir, adapter_dirs):
    from camelid.serve.server import load_served_models

    models = load_served_models([f"base={base_dir}"], adapters=[f"{n}={p}" for n, p in adapter_dirs.items()],
                                device="cpu", dtype="float32", max_batch=8)
    yield models
    models[0].engine.close()


@pytest.fixture(scope="module")
def client(served):
    with live_server(served) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def expected(base_dir, adapter_dirs):
    """{(model, question): the greedy answer of that model loaded alone (an adapter merged into its base)}."""
    answers = {}
    for name, path in {"base": base_dir, **adapter_dirs}.items():
        loaded = load_model(path, device="cpu", dtype="float32")
        for question in QUESTIONS:
            prompt = encode_chat(loaded, chat_template_for(loaded), [{"role": "user", "content": question}])
            params = SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True)
            answers[name, question] = generate(loaded.model, loaded.tokenizer, [prompt], params)[0].text
    return answers


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=TOKENS, extra_body={"ignore_eos": True})
    return reply.choices[0].message.content


def record_passes(engine, wait_for: int):
    """Spy on the engine's forward passes: (rows, tokens per row, adapters in the pass) each. The first pass waits
    until `wait_for` requests are in the engine, so that they are admitted together and decode side by side."""
    passes, model = [], engine.model
    hidden = model.hidden

    def spy(tokens, cache=None, **kw):
        deadline = time.monotonic() + 10
        while not passes and len(engine.waiting) + engine.rows_in_use < wait_for and time.monotonic() < deadline:
            time.sleep(0.05)
        layer = next(m for m in model.modules() if isinstance(m, MultiLoRALinear))
        passes.append((tokens.shape[0], tokens.shape[1], {index for index, _ in layer.groups}))
        return hidden(tokens, cache, **kw)

    model.hidden = spy
    return passes


def test_adapters_and_base_answer_concurrently_as_each_alone(client, served, expected):
    assert [m.id for m in client.models.list().data] == ["base", "one", "two"]
    assert len({id(m.loaded.model) for m in served}) == 1 and len({id(m.engine) for m in served}) == 1
    assert len({expected[name, QUESTIONS[0]] for name in ("base", "one", "two")}) == 3  # the adapters change answers
    asks = [(name, q) for name in ("base", "one", "two") for q in QUESTIONS]
    engine = served[0].engine
    passes = record_passes(engine, len(asks))
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(lambda a: ask(client, *a), asks))
    finally:
        del engine.model.hidden
    assert answers == [expected[a] for a in asks]
    # Decode steps (one token a row) ran rows of the base and of both adapters in one forward pass.
    assert any(t == 1 and rows >= 3 and adapters == {1, 2} for rows, t, adapters in passes), passes


def test_a_row_is_not_reused_across_adapters(base_dir, adapter_dirs, expected):
    """The prefix cache keeps which adapter computed a row: with one row, which then always holds the last
    prompt, the same prompt through another adapter is prefilled again, so its answer is that adapter's own."""
    from camelid.serve.server import load_served_models

    models = load_served_models([f"base={base_dir}"], adapters=[f"{n}={p}" for n, p in adapter_dirs.items()],
                                device="cpu", dtype="float32", max_batch=1)
    try:
        with live_server(models) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            for name in ("one", "base", "two", "two", "one"):
                assert ask(client, name, QUESTIONS[0]) == expected[name, QUESTIONS[0]], name
    finally:
        models[0].engine.close()


def test_metrics_count_each_adapters_tokens(served):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def completion_tokens(url: str) -> dict:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        return {s.labels["model"]: s.value for family in families for s in family.samples
                if s.name == "camelid_completion_tokens_total"}

    with live_server(served) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        before = completion_tokens(url)
        for name in ("one", "two", "two"):
            ask(client, name, QUESTIONS[1])
        after = completion_tokens(url)
    assert {name: after[name] - before.get(name, 0) for name in after} == {"base": 0, "one": TOKENS, "two": 2 * TOKENS}


def tensor_bytes(modules) -> int:
    """Bytes of the distinct parameters and buffers of `modules` (a tensor shared by several counted once)."""
    tensors = {t.data_ptr(): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_memory_is_the_base_and_the_adapters(base_dir, tmp_path):
    from safetensors.torch import load_file

    from camelid.serve.server import load_served_models

    config = LoRAConfig(r=8, alpha=16, dropout=0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"))
    dirs = [make_adapter(base_dir, tmp_path / f"a{i}", i, config) for i in range(4)]
    adapter = sum(t.numel() * t.element_size() for t in load_file(dirs[0] / "adapter_model.safetensors").values())
    base = tensor_bytes([load_model(base_dir, device="cpu", dtype="float32").model])
    models = load_served_models([f"base={base_dir}"], adapters=[f"a{i}={d}" for i, d in enumerate(dirs)],
                                device="cpu", dtype="float32", max_batch=2)
    models[0].engine.close()
    served = tensor_bytes([m.loaded.model for m in models])
    assert len(models) == 5
    assert base + 4 * adapter <= served <= 1.1 * (base + 4 * adapter), (served, base, adapter)


def test_an_adapter_of_another_base_is_refused_by_name(base_dir, tmp_path):
    from camelid.checkpoint import write_model_files
    from camelid.model import Llama
    from camelid.serve.server import load_served_models

    loaded = load_model(base_dir, device="cpu", dtype="float32")
    wider = Llama(replace(loaded.config, hidden_size=48))
    other = write_model_files(wider.config, wider.state_dict(), tmp_path / "other", tokenizer=loaded.tokenizer,
                              chat_template=None)
    adapter = make_adapter(other, tmp_path / "wide", 0, LoRAConfig(dropout=0))
    with pytest.raises(CamelidError, match=r"^--adapter wide: .* has shape \(8, 48\), this model needs \(8, 32\); "
                                           r"was the adapter trained on another base model\?$"):
        load_served_models([f"base={base_dir}"], adapters=[f"wide={adapter}"], device="cpu", dtype="float32")


def test_an_adapter_with_another_vocabulary_is_refused_by_name(base_dir, tmp_path):
    import json

    from camelid.serve.server import load_served_models

    adapter = make_adapter(base_dir, tmp_path / "vocab", 0, LoRAConfig(dropout=0),
                           tokenizer=load_model(base_dir, device="cpu").tokenizer)
    tokenizer = json.loads((adapter / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size and shapes, other ids
    (adapter / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CamelidError, match=r"^--adapter v: .*vocab carries a vocabulary other than the served "
                                           r"base's; serve it on its own base \(-m .*vocab\)$"):
        load_served_models([f"base={base_dir}"], adapters=[f"v={adapter}"], device="cpu", dtype="float32")


def test_help_documents_the_flag():
    done = subprocess.run([sys.executable, "-m", "camelid", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert "--adapter NAME=PATH" in done.stdout and "repeatable" in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "nopath"], "bad --adapter 'nopath': give NAME=PATH (the name requests use as their model)"),
    (["--adapter", "=x"], "bad --adapter '=x': give NAME=PATH (the name requests use as their model)"),
    (["-m", "b=x", "--adapter", "b=y"], "two models are served as 'b'; give the adapter another NAME"),
    (["--adapter", "a=x", "--adapter", "a=y"], "two models are served as 'a'; give the adapter another NAME"),
    (["--adapter", "a=x", "--quantize", "int8"], ("--adapter needs a float base, not --quantize int8; leave out "
     "--quantize (or serve an adapter merged into its base alone: -m PATH --quantize int8)")),
    (["--adapter", "a=x", "--backend", "llamacpp"], ("--adapter is for camelid's backend; leave out --backend "
     "llamacpp (or serve an adapter merged into its base alone: -m PATH)")),
    (["-m", "x", "-m", "y", "--adapter", "a=z"], ("--adapter serves adapters on one base model, but 2 models are "
     "given; give one -m")),
])
def test_bad_adapter_flags_are_one_line(flags, message):
    done = subprocess.run([sys.executable, "-m", "camelid", "serve", *flags], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"camelid: error: {message}"
