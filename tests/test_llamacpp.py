"""`--backend llamacpp`: SmolLM2's GGUF on llama.cpp with camelid's tokenizer, template, sampling and server.

Greedy answers are checked against llama-cpp-python's own greedy decoding of the same prompt ids, stop strings
and token limits against the rule both backends follow, llama.cpp's logits against camelid's teacher-forced at
every position of fixed texts (never where two free-running greedy texts part: that depends on the CPU), the
server with the official `openai` client, and the commands as a user runs them. A fresh run is the reference everywhere: the
backend reuses llama.cpp's KV cache across prompts, and must give the answers a fresh run gives.
"""

import asyncio
import json
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from helpers import live_server, run_camelid, serve_command

from camelid.chat import chat_template_for, encode_chat
from camelid.cli import main
from camelid.generate import Completion, SamplingParams
from camelid.generate import generate as camelid_generate
from camelid.generate import stream as camelid_stream

FOX = "The quick brown fox"  # both backends: " with a quick brown bear.\n\nThe original sentence is a" (39 tokens)
QUESTIONS = ["What is 2 + 2?", "Say hello in Spanish.", "Name a primary color.", "What is the capital of France?"]
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def backend(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    from camelid.llamacpp import load_llamacpp

    model = load_llamacpp(smollm2_gguf, threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """llama-cpp-python on its own: the same file and context, no camelid in between."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=4096, n_threads=1, n_threads_batch=1, verbose=False)
    yield llm
    llm.close()


def chat_ids(model, question: str) -> list[int]:
    return encode_chat(model, chat_template_for(model), [{"role": "user", "content": question}])


def ours(backend, prompt: list[int], max_tokens: int, **sampling):
    from camelid.llamacpp import generate

    params = SamplingParams(max_new_tokens=max_tokens, **{**GREEDY, **sampling})
    return generate(backend.model, backend.tokenizer, [prompt], params)[0]


def llama_cpp_greedy(reference, prompt: list[int], max_tokens: int, stop_ids) -> tuple[list[int], str]:
    """llama-cpp-python's own greedy decoding from a fresh state: (answer ids, finish reason)."""
    reference.reset()
    out = []
    for token in reference.generate(prompt, temp=0.0):
        if token in stop_ids:
            return out, "stop"
        out.append(token)
        if len(out) == max_tokens:
            return out, "length"


# -- the library ---------------------------------------------------------------------------------------------------


@pytest.mark.llamacpp
def test_prompt_ids_are_camelids_and_are_what_llama_cpp_runs(backend, smollm2_model):
    for question in QUESTIONS[:2]:
        prompt = chat_ids(backend, question)
        assert prompt == chat_ids(smollm2_model, question)
        ours(backend, prompt, 2)
        assert backend.model.input_ids[: len(prompt)].tolist() == prompt  # the tokens in llama.cpp's cache
    text = "Camels store fat, not water, in their humps."
    assert backend.tokenizer.encode(text) == smollm2_model.tokenizer.encode(text)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["chat", "text"])
def test_greedy_equals_llama_cpps_own_greedy(backend, reference, kind):
    prompts = [chat_ids(backend, q) for q in QUESTIONS] if kind == "chat" else [
        backend.tokenizer.encode(t) for t in (FOX, "Once upon a time", "def fibonacci(n):")]
    for prompt in prompts + prompts[:1]:  # again, with other prompts' tokens in the cache: the same answer
        expected, finish = llama_cpp_greedy(reference, prompt, 32, backend.tokenizer.stop_ids)
        got = ours(backend, prompt, 32)
        assert (got.token_ids, got.finish_reason) == (expected, finish)
        assert got.text == backend.tokenizer.decode(expected)


@pytest.mark.llamacpp
def test_the_cache_kept_between_chat_turns_changes_no_answer(backend):
    """The second turn reuses the first turn's prompt in llama.cpp's cache and must answer as a fresh run."""
    template = chat_template_for(backend)
    messages = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        prompt = encode_chat(backend, template, messages)
        held = backend.model.n_tokens
        reused = ours(backend, prompt, 24)
        backend.model.reset()
        fresh = ours(backend, prompt, 24)
        assert (reused.text, reused.token_ids) == (fresh.text, fresh.token_ids)
        messages.append({"role": "assistant", "content": reused.text})
    assert held > 80  # the last turn did find the earlier ones in the cache


@pytest.mark.llamacpp
def test_sampling_is_camelids_and_seeded(backend):
    prompt = backend.tokenizer.encode(FOX)
    greedy = ours(backend, prompt, 12)
    # top_k 1, or min_p 1, leave only the likeliest token whatever the temperature
    assert ours(backend, prompt, 12, temperature=1.5, top_k=1, seed=3).token_ids == greedy.token_ids
    assert ours(backend, prompt, 12, temperature=1.5, top_k=0, top_p=1.0, min_p=1.0, seed=3).token_ids == (
        greedy.token_ids)
    sampled = [ours(backend, prompt, 12, temperature=1.2, top_k=40, top_p=0.95, seed=s).text for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1] and len(set(sampled)) > 1
    penalised = ours(backend, prompt, 24, repetition_penalty=1.5)
    assert penalised.token_ids != ours(backend, prompt, 24).token_ids  # the greedy answer repeats " quick brown"


# top-p and min-p both cut the tail, so each case makes a different one the stricter
@pytest.mark.parametrize("tails", [dict(top_p=0.95, min_p=0.1), dict(top_p=0.9, min_p=0.05)], ids=str)
def test_top_k_shortcut_samples_camelids_distribution(tails):
    """With top_k, only the k candidates go through temperature, top-p and min-p: the distribution must be the
    one process_logits gives over the whole vocabulary."""
    from camelid.generate import process_logits
    from camelid.llamacpp import _sample

    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(0)) * 0.3
    logits[0, :7] = torch.tensor([6.0, 5.6, 5.5, 5.0, 4.2, 3.6, 3.0])
    # the penalty moves tokens 1 and 3 down, top-k drops token 6, top-p or min-p tokens 3 and 5
    params = SamplingParams(temperature=0.9, top_k=6, repetition_penalty=1.3, **tails)
    history = torch.tensor([[1, 3, 4000]])
    want = process_logits(logits, params, history).softmax(-1)[0]
    assert want.nonzero().squeeze(-1).tolist() == [0, 1, 2, 4]
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([_sample(logits, params, history, generator) for _ in range(5000)])
    seen = torch.bincount(draws, minlength=logits.shape[-1]).float() / len(draws)
    assert (seen - want).abs().max() < 0.02, (seen[:7], want[:7])


def cut_at_stops(tokenizer, ids: list[int], stops, prompt_tokens: int, finish: str) -> Completion:
    """What an OpenAI-style server answers for a free-running sequence `ids`: it ends at the first token whose
    text holds a stop string, and the text is cut before that string; otherwise it is all of `ids`."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return Completion(text[: min(hits)], ids[:n], "stop", prompt_tokens)
    return Completion(tokenizer.decode(ids), ids, finish, prompt_tokens)


@pytest.mark.llamacpp
@pytest.mark.parametrize("limits", [
    dict(max_tokens=6),  # "length"
    dict(stop=("bear",)),
    dict(stop=("\n", "quick")),  # the earlier in the text cuts
    dict(stop=("k br",)),  # spans two tokens
    dict(stop=("sentence is",), max_tokens=32),
], ids=str)
def test_stop_strings_and_max_tokens_cut_each_backends_own_greedy_text(backend, reference, smollm2_model, limits):
    """Both backends cut at stop strings and token limits by the same rule, each on its own greedy text.

    The two texts are not compared with each other: llama.cpp's Q4_1 kernels and camelid's float32 part where two
    logits are close, and where that happens depends on the CPU's instruction set."""
    from camelid.llamacpp import generate, stream

    max_tokens, stops = limits.get("max_tokens", 16), limits.get("stop", ())
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=stops)
    prompt = backend.tokenizer.encode(FOX)
    free, finish = llama_cpp_greedy(reference, prompt, max_tokens, backend.tokenizer.stop_ids)
    want = cut_at_stops(backend.tokenizer, free, stops, len(prompt), finish)
    assert generate(backend.model, backend.tokenizer, [prompt], params)[0] == want
    assert "".join(stream(backend.model, backend.tokenizer, prompt, params)) == want.text

    model, tokenizer = smollm2_model.model, smollm2_model.tokenizer
    ours_free = camelid_generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=max_tokens, **GREEDY))[0]
    want = cut_at_stops(tokenizer, ours_free.token_ids, stops, len(prompt), ours_free.finish_reason)
    assert camelid_generate(model, tokenizer, [prompt], params)[0] == want
    assert "".join(camelid_stream(model, tokenizer, prompt, params)) == want.text


@pytest.mark.llamacpp
def test_teacher_forced_next_tokens_agree_with_camelids_backend(smollm2_gguf, backend, smollm2_model):
    """Different kernels on the same weights, compared where it is defined on any CPU: at every position of fixed
    texts (chat prompts with written answers, plain text), llama.cpp's logits against camelid's float32 ones.

    llama.cpp's Q4_1 dot products round the activations to 8 bits; camelid dequantizes the weights to float32. The
    top-1 tokens may differ only where camelid's own two best logits are close."""
    import llama_cpp

    answers = ["2 + 2 equals 4.", "¡Hola! Hello in Spanish is \"hola\".", "Red is a primary color.",
               "The capital of France is Paris, on the Seine."]
    texts = [chat_ids(backend, q) + backend.tokenizer.encode(a) for q, a in zip(QUESTIONS, answers)] + [
        backend.tokenizer.encode(t) for t in (
            FOX + " jumps over the lazy dog. The dog does not move; it has seen foxes before.",
            "Once upon a time, in a village by the sea, there lived an old fisherman and his three daughters.",
            "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n")]
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    agree = total = 0
    try:
        for ids in texts:
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
            with torch.no_grad():
                mine = smollm2_model.model(torch.tensor([ids]))[0].float()
            assert torch.corrcoef(torch.stack([theirs.flatten(), mine.flatten()]))[0, 1] > 0.995
            top_theirs, top_mine = theirs.argmax(-1), mine.argmax(-1)
            agree += int((top_theirs == top_mine).sum())
            total += len(ids)
            # where the two pick different tokens, camelid's logit for llama.cpp's pick is within a hair of its best
            gap = mine.max(-1).values - mine.gather(-1, top_theirs[:, None])[:, 0]
            assert gap.max() < 1.0, gap.max()
    finally:
        llm.close()
    print(f"teacher-forced top-1 agreement with llama.cpp: {agree} of {total} positions")
    assert total > 150 and agree >= 0.9 * total, (agree, total)


@pytest.mark.llamacpp
def test_threads_and_context_reach_llama_cpp(smollm2_gguf):
    import llama_cpp

    from camelid.errors import CamelidError
    from camelid.llamacpp import load_llamacpp

    model = load_llamacpp(smollm2_gguf, threads=2, n_ctx=100)
    assert llama_cpp.llama_n_threads(model.model.ctx) == llama_cpp.llama_n_threads_batch(model.model.ctx) == 2
    assert model.model.n_ctx() == model.config.max_sequence_length == 256  # llama.cpp's rounding up
    model.close()
    model = load_llamacpp(smollm2_gguf)
    assert llama_cpp.llama_n_threads(model.model.ctx) == torch.get_num_threads()  # camelid's own default
    assert model.model.n_ctx() == 4096  # SmolLM2's 8K, capped as `camelid serve` caps its cache
    model.close()
    model = load_llamacpp(smollm2_gguf, threads=1, n_ctx=256)
    try:
        long = model.tokenizer.encode("camel " * 256)[:256]
        with pytest.raises(CamelidError, match="the prompt is 256 tokens but the context is 256"):
            ours(model, long, 4)
        cut = ours(model, long[:250], 16, ignore_eos=True)  # at the context's end
        assert (cut.finish_reason, len(cut.token_ids)) == ("length", 6)
    finally:
        model.close()
    with pytest.raises(CamelidError, match="context 9000 is out of range for SmolLM2"):
        load_llamacpp(smollm2_gguf, n_ctx=9000)


# -- the commands --------------------------------------------------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_generate_command_prints_the_librarys_answer(backend, chat):
    prompt = chat_ids(backend, QUESTIONS[0]) if chat else backend.tokenizer.encode(FOX)
    expected = ours(backend, prompt, 16)
    done = run_camelid("generate", "--backend", "llamacpp", "--threads", "1", "-p", QUESTIONS[0] if chat else FOX,
                       "-n", "16", "-t", "0", *(["--chat"] if chat else []))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == expected.text + "\n"


@pytest.mark.llamacpp
def test_chat_command_answers_each_turn_as_the_library(backend):
    template = chat_template_for(backend)
    messages, answers = [], []
    for question in QUESTIONS[:2]:
        messages.append({"role": "user", "content": question})
        answers.append(ours(backend, encode_chat(backend, template, messages), 32).text)
        messages.append({"role": "assistant", "content": answers[-1]})
    done = run_camelid("chat", "--backend", "llamacpp", "--threads", "1", "-t", "0", "-n", "32",
                       stdin="".join(q + "\n" for q in QUESTIONS[:2]))
    assert (done.returncode, done.stderr) == (0, "")
    header, rest = done.stdout.split("\n", 1)
    assert header.startswith("camelid chat with SmolLM2-135M-Instruct")
    assert rest == "".join(f">>> {a}\n" for a in answers) + ">>> \n"


@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
def test_a_model_directory_is_refused_with_the_way_to_a_gguf_file(tiny_chat_dir, verb, capsys):
    args = [verb, "--backend", "llamacpp", "-m", str(tiny_chat_dir)] + (["-p", "hi"] if verb == "generate" else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("camelid: error: ")
    assert "runs GGUF files only" in err and f"`camelid export gguf {tiny_chat_dir} OUT.gguf`" in err


@pytest.mark.parametrize("args, flag", [
    (["generate", "-p", "hi", "--quantize", "f16"], "--quantize"),
    (["generate", "-p", "hi", "--device", "cpu"], "--device"),
    (["chat", "--dtype", "float32"], "--dtype"),
    (["serve", "--quantize", "f16"], "--quantize"),
    (["serve", "--device", "cuda"], "--device"),
    (["serve", "--prefill-chunk", "64"], "--prefill-chunk"),
    (["serve", "--no-prefix-cache"], "--no-prefix-cache"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_flags_that_do_not_apply_to_llama_cpp_are_refused(args, flag, capsys):
    assert main([*args, "--backend", "llamacpp"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"camelid: error: {flag} does not apply to --backend llamacpp")


def test_bad_threads_are_one_line(capsys):
    assert main(["generate", "-p", "hi", "--threads", "0"]) == 1
    assert capsys.readouterr().err == "camelid: error: --threads must be at least 1, not 0\n"


def test_without_llama_cpp_python_the_error_names_the_extra(smollm2_gguf, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed: importing it fails
    assert main(["generate", "--backend", "llamacpp", "-p", "hi"]) == 1
    assert capsys.readouterr().err == (
        "camelid: error: --backend llamacpp needs llama-cpp-python: pip install 'camelid[llamacpp]'\n")


# -- the server ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("fastapi")
    from camelid.serve.server import load_served_models

    models = load_served_models([f"smollm2={smollm2_gguf}"], backend="llamacpp", threads=1, max_batch=4,
                                max_queue=8)
    yield models[0]
    models[0].engine.close()
    models[0].loaded.close()


@pytest.fixture(scope="module")
def server(served):
    with live_server([served]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.llamacpp
@pytest.mark.parametrize("max_tokens", [16, 4])  # the answer to "What is 2 + 2?" ends after 11 tokens
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_served_chat_equals_the_library(client, backend, streamed, max_tokens):
    prompt = chat_ids(backend, QUESTIONS[0])
    expected = ours(backend, prompt, max_tokens)
    assert expected.finish_reason == ("stop" if max_tokens == 16 else "length")
    kw = dict(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
              max_tokens=max_tokens)
    if streamed:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1 and chunks[-1].choices == []
        finish, usage = finish[0], chunks[-1].usage
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # it came in pieces
    else:
        answer = client.chat.completions.create(**kw)
        text, finish, usage = answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage
    assert (text, finish) == (expected.text, expected.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(expected.token_ids))


@pytest.mark.llamacpp
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_served_completion_with_stop_equals_the_library(client, backend, streamed):
    prompt = backend.tokenizer.encode(FOX)
    expected = ours(backend, prompt, 24, stop=("sentence",))
    assert expected.finish_reason == "stop"
    kw = dict(model="smollm2", prompt=FOX, temperature=0, max_tokens=24, stop="sentence")
    if streamed:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = client.completions.create(**kw)
        text, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert answer.usage.completion_tokens == len(expected.token_ids)
    assert (text, finish) == (expected.text, "stop")


@pytest.mark.llamacpp
def test_served_logprobs_are_llama_cpps(client, backend, reference):
    import llama_cpp

    answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    items = answer.choices[0].logprobs.content
    prompt = chat_ids(backend, QUESTIONS[0])
    ids = ours(backend, prompt, 6).token_ids
    assert len(items) == len(ids) == 6
    reference.reset()
    reference.eval(prompt)
    for item, token in zip(items, ids):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(reference.ctx, -1), shape=(reference.n_vocab(),))
        logp = torch.from_numpy(logits.copy()).log_softmax(-1)
        assert item.token == backend.tokenizer.decode([token])
        assert item.logprob == pytest.approx(float(logp[token]), abs=1e-5)
        best = logp.topk(3)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert [t.token for t in item.top_logprobs] == [backend.tokenizer.decode([i]) for i in best.indices.tolist()]
        reference.eval([token])


@pytest.mark.llamacpp
def test_prompt_logprobs_are_refused_by_name(served):
    from camelid.errors import CamelidError
    from camelid.jobs import GenerationParams

    async def submit():
        served.engine.submit([1, 2, 3], GenerationParams(SamplingParams(), prompt_logprobs=1))

    with pytest.raises(CamelidError, match="^echo with logprobs is not supported on the llama.cpp backend; use "
                                           "--backend camelid$"):
        asyncio.run(submit())
    assert served.engine.queue_depth == 0


@pytest.mark.llamacpp
def test_logit_bias_json_schemas_and_required_tool_calls_on_llama_cpp(client):
    """The same token rules as camelid's engine, applied to llama.cpp's logits."""
    jsonschema = pytest.importorskip("jsonschema")
    ask = [{"role": "user", "content": "Name a city as JSON."}]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
              "additionalProperties": False}
    answer = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=40,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "c", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    tool = {"type": "function", "function": {"name": "find", "parameters": schema}}
    called = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=60,
                                            tools=[tool], tool_choice="required", parallel_tool_calls=False)
    assert called.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(called.choices[0].message.tool_calls[0].function.arguments), schema)
    forced = client.completions.create(model="smollm2", prompt=FOX, temperature=0, max_tokens=3, logit_bias={"504": 100})
    assert forced.choices[0].text == "TheTheThe"


@pytest.mark.llamacpp
def test_served_n_choices_are_seeded(client):
    kw = dict(model="smollm2", prompt=FOX, max_tokens=8, n=2, seed=11, temperature=1.0)
    first = [c.text for c in client.completions.create(**kw).choices]
    assert first == [c.text for c in client.completions.create(**kw).choices]
    assert first[0] != first[1]


@pytest.mark.llamacpp
def test_concurrent_requests_all_complete_in_turn(served, server, backend):
    """Eight clients at once: answered one at a time (one row, the rest waiting), each as the library answers."""
    openai = pytest.importorskip("openai")
    prompts = [("chat", q) for q in QUESTIONS] + [("text", t) for t in (FOX, "Once upon a time")]
    expected = [ours(backend, chat_ids(backend, p) if kind == "chat" else backend.tokenizer.encode(p), 10).text
                for kind, p in prompts]

    async def one(c, j: int):
        kind, prompt = prompts[j % len(prompts)]
        kw = dict(model="smollm2", temperature=0, max_tokens=10)
        if kind == "chat":
            answer = await c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
            return answer.choices[0].message.content
        stream = await c.completions.create(prompt=prompt, stream=True, **kw)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def everyone():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, j) for j in range(8)))

    seen = {"rows": 0, "queue": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen["rows"] = max(seen["rows"], served.engine.rows_in_use)
            seen["queue"] = max(seen["queue"], served.engine.queue_depth)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(everyone())
    finally:
        done.set()
        watcher.join()
    assert results == [expected[j % len(prompts)] for j in range(8)]
    assert seen["rows"] == 1 and seen["queue"] >= 1
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "models": ["smollm2"]}
    metrics = httpx.get(f"{server}/metrics").text
    assert 'camelid_running_sequences{model="smollm2"} 0.0' in metrics
    assert 'camelid_queue_depth{model="smollm2"} 0.0' in metrics


@pytest.mark.llamacpp
def test_clients_that_give_up_free_the_engine(served, client, server):
    """A stream closed after two pieces, and a whole answer given up while it waited: neither runs on."""
    engine = served.engine
    before = engine.generated_tokens
    long = dict(model="smollm2", prompt="Hello", temperature=0, max_tokens=400, extra_body={"ignore_eos": True})
    running = client.completions.create(stream=True, **long)
    pieces = iter(running)
    next(pieces), next(pieces)
    body = {"model": "smollm2", "prompt": "Hello", "temperature": 0, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # it waits behind the stream, then its client leaves
        httpx.post(f"{server}/v1/completions", json=body, timeout=1)
    running.close()
    deadline = time.monotonic() + 5
    while (engine.rows_in_use, engine.queue_depth) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (engine.rows_in_use, engine.queue_depth) == (0, 0)
    assert engine.generated_tokens - before < 400  # both together made less than one whole answer
    answer = client.completions.create(model="smollm2", prompt=FOX, temperature=0, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.llamacpp
def test_serve_command_answers_the_openai_client(backend, smollm2_gguf):
    openai = pytest.importorskip("openai")
    expected = ours(backend, chat_ids(backend, QUESTIONS[0]), 16).text
    args = ["--backend", "llamacpp", "--threads", "1", "-m", f"smollm2={smollm2_gguf}"]
    with serve_command(args, {"CAMELID_API_KEY": ""}) as (server, url):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            messages = [{"role": "user", "content": QUESTIONS[0]}]
            whole = c.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16)
            streamed = c.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16,
                                                 stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert whole.choices[0].message.content == text == expected
    assert f"serving smollm2 at {url}" in server.stderr.read()
