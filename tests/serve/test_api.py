"""`camelid serve` against the official `openai` client: answers equal `camelid generate`'s, under load too.

The greedy text, token counts and logprobs of the live server are checked against camelid's own `generate` and
the model's logits computed directly. Hostile input is sent with httpx: hundreds of malformed requests, each of
which must get a 4xx in OpenAI's error shape, after which the server still answers correctly.
"""

import asyncio
import concurrent.futures
import json
import threading
import time

import httpx
import pytest
import torch
from helpers import live_server

from camelid.chat import chat_template_for, encode_chat
from camelid.generate import SamplingParams, generate

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]  # SmolLM2: "The capital of France is Paris."
FOX = "The quick brown fox"  # SmolLM2 continues " with a quick brown bear.\n\nThe original sentence is..."


def by_name(models, name: str):
    return next(m for m in models if m.name == name)


def chat_prompt(loaded, messages: list[dict]) -> list[int]:
    return encode_chat(loaded, chat_template_for(loaded), messages)


def reference(loaded, prompt: list[int], max_tokens: int, **sampling):
    """What `camelid generate` answers alone for `prompt`, greedy unless told otherwise."""
    params = SamplingParams(max_new_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    return generate(loaded.model, loaded.tokenizer, [prompt], params)[0]


def logprobs_of(loaded, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits (no cache) at each answer token's step, [len(answer), vocab]."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + answer]))[0, len(prompt) - 1 : len(prompt) + len(answer) - 1]
    return logits.float().log_softmax(-1)


@pytest.fixture(scope="module")
def server(served_models):
    with live_server(served_models) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def stream_chat(client, **kw) -> tuple[str, str, object, list]:
    """(text, finish_reason, usage, chunks) of a streamed chat completion with one choice."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finish[0], chunks[-1].usage, chunks


def stream_completion(client, **kw) -> tuple[str, str, object, list]:
    """The same for a completion."""
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finish[0], chunks[-1].usage, chunks


def completion_logprobs(client, streamed: bool, **kw) -> tuple[str, list, list, list, list]:
    """(text, tokens, token_logprobs, top_logprobs, text_offset) of a completion with one choice, whole or
    gathered from its stream."""
    if not streamed:
        choice = client.completions.create(**kw).choices[0]
        lp = choice.logprobs
        return choice.text, lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    text, tokens, token_logprobs, top, offsets = "", [], [], [], []
    for c in client.completions.create(stream=True, **kw):
        if c.choices:
            text += c.choices[0].text
            if lp := c.choices[0].logprobs:
                tokens, token_logprobs = tokens + lp.tokens, token_logprobs + lp.token_logprobs
                top, offsets = top + lp.top_logprobs, offsets + lp.text_offset
    return text, tokens, token_logprobs, top, offsets


# -- answers equal camelid generate's ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [16, 4])  # SmolLM2 ends its answer after 7 tokens: "stop", then "length"
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_chat_greedy_equals_generate(client, served_models, streamed, max_tokens):
    loaded = by_name(served_models, "smollm2").loaded
    prompt = chat_prompt(loaded, CAPITAL)
    expected = reference(loaded, prompt, max_tokens)
    assert expected.finish_reason == ("stop" if max_tokens == 16 else "length")
    kw = dict(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=max_tokens)
    if streamed:
        text, finish, usage, _ = stream_chat(client, **kw)
    else:
        answer = client.chat.completions.create(**kw)
        assert answer.object == "chat.completion" and answer.model == "smollm2" and len(answer.choices) == 1
        assert answer.choices[0].message.role == "assistant"
        text, finish, usage = answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage
    assert text == expected.text
    assert finish == expected.finish_reason
    assert usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == len(prompt) + len(expected.token_ids)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_completion_greedy_equals_generate(client, served_models, streamed):
    loaded = by_name(served_models, "smollm2").loaded
    prompt = loaded.tokenizer.encode(FOX)
    expected = reference(loaded, prompt, 12)
    assert expected.finish_reason == "length"
    kw = dict(model="smollm2", prompt=FOX, temperature=0, max_tokens=12)
    if streamed:
        text, finish, usage, chunks = stream_completion(client, **kw)
        assert sum(bool(c.choices and c.choices[0].text) for c in chunks) > 1  # it did arrive in pieces
    else:
        answer = client.completions.create(**kw)
        assert answer.object == "text_completion" and answer.model == "smollm2"
        text, finish, usage = answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
    assert text == expected.text
    assert finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 12)


def test_completion_of_token_ids_equals_generate(client, served_models):
    loaded = by_name(served_models, "smollm2").loaded
    prompt = loaded.tokenizer.encode(FOX)
    answer = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=5)
    assert answer.choices[0].text == reference(loaded, prompt, 5).text
    assert answer.usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
# of two stops the earlier in the text cuts; "k br" spans two tokens (" quick", " brown")
@pytest.mark.parametrize("stop", [" brown", ["bear", "quick"], "\n", "k br"])
def test_stop_strings_cut_the_completion(client, served_models, streamed, stop):
    loaded = by_name(served_models, "smollm2").loaded
    full = reference(loaded, loaded.tokenizer.encode(FOX), 8).text  # " with a quick brown bear.\n\n"
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(full.index(s) for s in stops)
    kw = dict(model="smollm2", prompt=FOX, temperature=0, max_tokens=8, stop=stop)
    if streamed:
        text, finish, _, _ = stream_completion(client, **kw)
    else:
        choice = client.completions.create(**kw).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (full[:cut], "stop")


def test_stop_string_cuts_the_chat_answer(client):
    kw = dict(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=16, stop=["Paris", "Lyon"])
    choice = client.chat.completions.create(**kw).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("The capital of France is ", "stop")
    text, finish, _, _ = stream_chat(client, **kw)
    assert (text, finish) == ("The capital of France is ", "stop")


# -- logprobs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_are_the_models(client, served_models, streamed):
    loaded = by_name(served_models, "smollm2").loaded
    tok = loaded.tokenizer
    prompt = chat_prompt(loaded, CAPITAL)
    expected = reference(loaded, prompt, 6)
    logp = logprobs_of(loaded, prompt, expected.token_ids)
    kw = dict(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5)
    if streamed:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 6
    for step, (entry, token) in enumerate(zip(content, expected.token_ids)):
        assert entry.token == tok.decode([token])
        assert entry.logprob == pytest.approx(float(logp[step, token]), abs=1e-3)
        assert len(entry.top_logprobs) == 5
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        best = torch.topk(logp[step], 5)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert values == pytest.approx(best.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the likeliest
        assert entry.top_logprobs[0].logprob == entry.logprob


def test_chat_logprobs_without_top(client):
    choice = client.chat.completions.create(model="tiny", messages=CAPITAL, temperature=0, max_tokens=3,
                                            logprobs=True).choices[0]
    assert len(choice.logprobs.content) == 3
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in choice.logprobs.content)
    plain = client.chat.completions.create(model="tiny", messages=CAPITAL, temperature=0, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_chat_logprob_bytes_rebuild_the_text(client):
    # OpenAI: `bytes` lets a client rebuild characters that span tokens. SmolLM2 writes this Japanese byte by byte.
    messages = [{"role": "user", "content": "How do you say 'thank you' in Japanese? Answer in Japanese script only."}]
    choice = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=7,
                                            logprobs=True).choices[0]
    assert any(e.token == "\ufffd" for e in choice.logprobs.content)  # the case this is about
    rebuilt = b"".join(bytes(e.bytes) for e in choice.logprobs.content)
    assert rebuilt.decode("utf-8") == choice.message.content


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_are_the_models(client, served_models, streamed):
    loaded = by_name(served_models, "smollm2").loaded
    tok = loaded.tokenizer
    prompt = tok.encode(FOX)
    expected = reference(loaded, prompt, 6)
    logp = logprobs_of(loaded, prompt, expected.token_ids)
    kw = dict(model="smollm2", prompt=FOX, temperature=0, max_tokens=6, logprobs=3)
    text, tokens, token_logprobs, top, offsets = completion_logprobs(client, streamed, **kw)
    assert text == expected.text
    assert tokens == [tok.decode([t]) for t in expected.token_ids]
    assert "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for step, token in enumerate(expected.token_ids):
        assert token_logprobs[step] == pytest.approx(float(logp[step, token]), abs=1e-3)
        best = torch.topk(logp[step], 3)
        assert list(top[step]) == [tok.decode([i]) for i in best.indices.tolist()]  # in order, best first
        assert list(top[step].values()) == pytest.approx(best.values.tolist(), abs=1e-3)
        assert max(top[step].values()) == token_logprobs[step]  # greedy picks the likeliest


# -- sampling ------------------------------------------------------------------------------------------------------


def test_seed_repeats_a_sampled_answer(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="Once upon a time", temperature=1, max_tokens=12,
                                         seed=seed).choices[0].text

    first = sample(1234)
    assert first and sample(1234) == first
    # the tiny random model's next-token distribution is nearly flat over 49152 tokens: two seeds all but never agree
    assert sample(1) != sample(2)
    chat = dict(model="tiny", messages=CAPITAL, temperature=1, max_tokens=8, seed=99)
    assert client.chat.completions.create(**chat).choices[0].message.content == stream_chat(client, **chat)[0]


def test_n_choices(client):
    kw = dict(model="tiny", messages=CAPITAL, temperature=1, max_tokens=6, n=2, seed=7)
    answer = client.chat.completions.create(**kw)
    assert [c.index for c in answer.choices] == [0, 1]
    texts = [c.message.content for c in answer.choices]
    assert texts[0] != texts[1]  # one seed, two different (repeatable) choices
    assert answer.usage.completion_tokens == 12  # the tiny model never says end-of-turn in 6 tokens
    streamed = ["", ""]
    finishes = [None, None]
    for c in client.chat.completions.create(stream=True, **kw):
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert streamed == texts and finishes == ["length", "length"]

    completion = client.completions.create(model="tiny", prompt="Hello", temperature=1, max_tokens=4, n=2, seed=7)
    assert sorted(c.index for c in completion.choices) == [0, 1]


@pytest.mark.parametrize(("presence", "frequency"), [(2.0, 0.0), (0.0, 1.0)])
def test_penalties_apply_to_the_answer_so_far(client, served_models, presence, frequency):
    loaded = by_name(served_models, "smollm2").loaded
    prompt_text = "I like cats. I like cats. I like cats."
    prompt = loaded.tokenizer.encode(prompt_text)
    plain = client.completions.create(model="smollm2", prompt=prompt_text, temperature=0, max_tokens=8)
    assert plain.choices[0].text == " I'm a cat. I'm a"  # unpenalised, SmolLM2 repeats itself
    answer = client.completions.create(model="smollm2", prompt=prompt_text, temperature=0, max_tokens=8,
                                       presence_penalty=presence, frequency_penalty=frequency)
    # OpenAI's rule, by hand: logit - presence * (count > 0) - frequency * count, over the tokens generated so far
    ids, counts = [], {}
    with torch.inference_mode():
        for _ in range(8):
            logits = loaded.model(torch.tensor([prompt + ids]))[0, -1].float()
            for token, count in counts.items():
                logits[token] -= presence + frequency * count
            token = int(logits.argmax())
            if token in loaded.tokenizer.stop_ids:
                break
            ids.append(token)
            counts[token] = counts.get(token, 0) + 1
    assert answer.choices[0].text == loaded.tokenizer.decode(ids)
    assert answer.choices[0].text != plain.choices[0].text


# -- the other endpoints -------------------------------------------------------------------------------------------


def test_models_health_and_errors_through_the_client(client, server):
    assert [m.id for m in client.models.list().data] == ["smollm2", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=CAPITAL)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", temperature=3)
    assert caught.value.param == "temperature" and "temperature" in caught.value.message
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_null_means_the_default(client):
    answer = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=None, top_p=None,
                                       n=None, presence_penalty=None, frequency_penalty=None, seed=None, stop=None)
    assert answer.choices[0].finish_reason == "length"


def test_max_completion_tokens_limit(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=CAPITAL, max_completion_tokens=10**6)
    assert caught.value.param == "max_completion_tokens"


def _samples(metrics_text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics_text) for s in family.samples}


def test_metrics_count_requests_and_tokens(served_models):
    with live_server(served_models) as url:  # a fresh app: its counters start at zero
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        before = _samples(httpx.get(f"{url}/metrics").text)
        whole = c.completions.create(model="tiny", prompt="Hello there", temperature=0, max_tokens=5)
        _, _, streamed, _ = stream_chat(c, model="tiny", messages=CAPITAL, temperature=0, max_tokens=3)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="Hello", max_tokens=0)
        after = _samples(httpx.get(f"{url}/metrics").text)
    requests = "camelid_requests_total"

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew((requests, (("endpoint", "/v1/completions"), ("status", "200")))) == 1
    assert grew((requests, (("endpoint", "/v1/chat/completions"), ("status", "200")))) == 1
    assert grew((requests, (("endpoint", "/v1/completions"), ("status", "400")))) == 1
    assert grew(("camelid_prompt_tokens_total", (("model", "tiny"),))) == (
        whole.usage.prompt_tokens + streamed.prompt_tokens)
    assert grew(("camelid_completion_tokens_total", (("model", "tiny"),))) == (
        whole.usage.completion_tokens + streamed.completion_tokens) > 0
    assert ("camelid_queue_depth", (("model", "smollm2"),)) in after
    assert ("camelid_running_sequences", (("model", "tiny"),)) in after


# -- logit_bias ----------------------------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(client, served_models):
    loaded = by_name(served_models, "smollm2").loaded
    prompt = chat_prompt(loaded, CAPITAL)
    first = reference(loaded, prompt, 1).token_ids[0]  # "The"
    kw = dict(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=3, logprobs=True)
    banned = client.chat.completions.create(logit_bias={str(first): -100}, **kw).choices[0]
    with torch.inference_mode():
        second_best = int(torch.topk(loaded.model(torch.tensor([prompt]))[0, -1], 2).indices[1])
    assert banned.logprobs.content[0].token == loaded.tokenizer.decode([second_best])
    # the model's own logprob is reported, not the biased one
    forced_token = loaded.tokenizer.encode(" Paris", add_special=False)[0]
    forced = client.chat.completions.create(logit_bias={str(forced_token): 100}, **kw).choices[0]
    assert [e.token for e in forced.logprobs.content] == [" Paris"] * 3  # exclusive selection, every step
    sampled = client.chat.completions.create(**{**kw, "temperature": 1.5, "seed": 3},
                                             logit_bias={str(forced_token): 100, "504": 100})
    assert {e.token for e in sampled.choices[0].logprobs.content} <= {" Paris", loaded.tokenizer.decode([504])}
    fox = loaded.tokenizer.encode(FOX)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([fox]))[0, -1].float()
    gap = float(logits.max() - logits[forced_token])  # a finite bias is added to the logit, exactly
    for bias, first_token in [(gap + 0.05, " Paris"), (gap - 0.05, loaded.tokenizer.decode(reference(loaded, fox, 1).token_ids))]:
        nudged = client.completions.create(model="smollm2", prompt=fox, temperature=0, max_tokens=1,
                                           logit_bias={str(forced_token): bias})
        assert nudged.choices[0].text == first_token


def logprobs_of_prompt(loaded, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over the prompt itself, [len(prompt) - 1, vocab]: row i predicts token
    i + 1."""
    with torch.inference_mode():
        return loaded.model(torch.tensor([prompt]))[0, :-1].float().log_softmax(-1)


# -- echo, logprobs and lists of prompts (lm-eval's local-completions) ----------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_echo_with_logprobs_gives_the_prompts_logprobs(client, served_models, streamed):
    loaded = by_name(served_models, "smollm2").loaded
    tok = loaded.tokenizer
    prompt = tok.encode(FOX)
    expected = reference(loaded, prompt, 1)
    logp = logprobs_of_prompt(loaded, prompt + expected.token_ids)
    kw = dict(model="smollm2", prompt=prompt, temperature=0, max_tokens=1, logprobs=2, echo=True)
    text, tokens, token_logprobs, top, offsets = completion_logprobs(client, streamed, **kw)
    everything = prompt + expected.token_ids
    assert text == tok.decode(prompt) + expected.text
    assert tokens == [tok.decode([t]) for t in everything]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert token_logprobs[0] is None and top[0] is None  # nothing predicts the first token (OpenAI, vLLM)
    for i, token in enumerate(everything[1:], start=1):
        assert token_logprobs[i] == pytest.approx(float(logp[i - 1, token]), abs=1e-3)
        best = torch.topk(logp[i - 1], 2)
        assert list(top[i].values()) == pytest.approx(best.values.tolist(), abs=1e-3)


def test_a_list_of_prompts_is_answered_as_each_alone(client, served_models):
    loaded = by_name(served_models, "smollm2").loaded
    texts = [FOX, "Once upon a time", "1, 2, 3,"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    expected = [reference(loaded, p, 5).text for p in prompts]
    for prompt in (texts, prompts):
        answer = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=5)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert [c.text for c in answer.choices] == expected
        assert answer.usage.prompt_tokens == sum(map(len, prompts))
        assert answer.usage.completion_tokens == 15
    two = client.completions.create(model="smollm2", prompt=texts[:2], temperature=0, max_tokens=5, n=2)
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [expected[0]] * 2 + [expected[1]] * 2
    streamed = [""] * 3
    finishes = [None] * 3
    for chunk in client.completions.create(model="smollm2", prompt=texts, temperature=0, max_tokens=5, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert streamed == expected and finishes == ["length"] * 3


# -- /tokenize, /detokenize, /tokenizer_info --------------------------------------------------------------------


def test_tokenizer_endpoints_in_vllm_and_llama_cpp_shapes(server, served_models):
    tok = by_name(served_models, "smollm2").loaded.tokenizer
    with httpx.Client(base_url=server, timeout=60) as http:
        vllm = http.post("/tokenize", json={"model": "smollm2", "prompt": FOX}).json()
        assert vllm["tokens"] == tok.encode(FOX) and vllm["count"] == len(vllm["tokens"])
        assert vllm["max_model_len"] == by_name(served_models, "smollm2").engine.context
        plain = http.post("/tokenize", json={"model": "smollm2", "prompt": "<|im_end|>", "add_special_tokens": False})
        assert plain.json()["tokens"] == [tok.encode("<|im_end|>", add_special=False)[0]]  # a special token parsed
        llama = http.post("/tokenize", json={"model": "smollm2", "content": FOX, "with_pieces": True}).json()
        assert [t["id"] for t in llama["tokens"]] == tok.encode(FOX, add_special=False)
        assert "".join(t["piece"] for t in llama["tokens"]) == FOX
        chat = http.post("/tokenize", json={"model": "smollm2", "messages": CAPITAL}).json()
        assert chat["tokens"] == chat_prompt(by_name(served_models, "smollm2").loaded, CAPITAL)
        back = http.post("/detokenize", json={"model": "smollm2", "tokens": vllm["tokens"]}).json()
        assert back["prompt"] == back["content"] == tok.decode(vllm["tokens"])
        info = http.get("/tokenizer_info", params={"model": "smollm2"}).json()
        assert info["eos_token"] == tok.eos_token and "im_start" in info["chat_template"]
        assert http.post("/tokenize", json={"prompt": FOX}).json() == vllm  # no model: the first served
        for path, body, param in [("/tokenize", {"model": "smollm2"}, None),
                                  ("/tokenize", {"model": "smollm2", "prompt": "a", "content": "b"}, None),
                                  ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
                                  ("/tokenize", {"model": "smollm2", "prompt": 5}, "prompt"),
                                  ("/detokenize", {"model": "smollm2", "tokens": [49152]}, "tokens"),
                                  ("/detokenize", {"model": "smollm2", "tokens": "1 2"}, "tokens")]:
            response = http.post(path, json=body)
            assert what_is_wrong(response, param, None) is None, (path, body, response.text)


# -- structured outputs --------------------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_response_format_json_schema_and_json_object(client, streamed):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Reply with a JSON object: a person's name, age and pets."}]
    formats = [({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
               ({"type": "json_object"}, {"type": "object"})]
    for response_format, schema in formats:
        kw = dict(model="smollm2", messages=messages, temperature=0, max_tokens=120, response_format=response_format)
        if streamed:
            text, finish, _, _ = stream_chat(client, **kw)
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_a_json_answer_is_one_row_of_a_batch_among_free_ones(client, served_models):
    jsonschema = pytest.importorskip("jsonschema")
    loaded = by_name(served_models, "smollm2").loaded
    free = dict(model="smollm2", prompt=FOX, temperature=0, max_tokens=30)
    constrained = dict(model="smollm2", messages=[{"role": "user", "content": "A person, as JSON."}], temperature=0.8,
                       seed=5, max_tokens=150,
                       response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        frees = [pool.submit(client.completions.create, **free) for _ in range(2)]
        jsons = [pool.submit(client.chat.completions.create, **constrained) for _ in range(2)]
        expected = reference(loaded, loaded.tokenizer.encode(FOX), 30).text
        assert [f.result().choices[0].text for f in frees] == [expected] * 2
        for j in jsons:
            jsonschema.validate(json.loads(j.result().choices[0].message.content), PERSON)


def test_metrics_count_the_tokens_of_a_stream_its_client_dropped(served_models):
    engine = by_name(served_models, "tiny").engine
    with live_server(served_models) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        before = _samples(httpx.get(f"{url}/metrics").text)
        stream = c.completions.create(model="tiny", prompt="Hello", max_tokens=1000, stream=True,
                                      extra_body={"ignore_eos": True})
        received = sum(1 for _, _ in zip(range(5), stream))
        assert received == 5
        stream.close()  # the client goes away mid-answer
        deadline = time.monotonic() + 10
        while engine.rows_in_use and time.monotonic() < deadline:
            time.sleep(0.05)
        after = _samples(httpx.get(f"{url}/metrics").text)
    key = ("camelid_completion_tokens_total", (("model", "tiny"),))
    assert 5 <= after[key] - before.get(key, 0) < 1000  # counted though no usage was ever sent


# -- many clients at once --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_streams_with_disconnects(served_models, server):
    """32 streaming clients at once, 8 of which hang up early: every finished answer equals `camelid generate`'s
    alone, and the rows of those that hung up are freed (they asked for 400 tokens: held, they would stay busy)."""
    served = by_name(served_models, "smollm2")
    loaded, engine = served.loaded, served.engine
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish."]
    texts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "The three laws of robotics"]
    prompts = [("chat", [{"role": "user", "content": q}]) for q in questions] + [("text", t) for t in texts]
    ids = [chat_prompt(loaded, p) if kind == "chat" else loaded.tokenizer.encode(p) for kind, p in prompts]
    max_tokens = 10
    expected = [reference(loaded, p, max_tokens) for p in ids]

    async def one(client, j: int):
        kind, prompt = prompts[j % len(prompts)]
        hang_up = j >= 24  # one of each prompt
        kw = dict(model="smollm2", temperature=0, stream=True, stream_options={"include_usage": True},
                  max_tokens=400 if hang_up else max_tokens, extra_body={"ignore_eos": True} if hang_up else None)
        if kind == "chat":
            stream = await client.chat.completions.create(messages=prompt, **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        text, finish, usage, pieces = "", None, None, 0
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                piece = c.delta.content if kind == "chat" else c.text
                text += piece or ""
                pieces += bool(piece)
                finish = c.finish_reason or finish
            if hang_up and pieces == 2:
                await stream.close()
                return None
        return text, finish, usage

    async def everyone():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, j) for j in range(32)))

    busiest = 0

    def watch():
        nonlocal busiest
        while not done.is_set():
            busiest = max(busiest, engine.rows_in_use)
            time.sleep(0.01)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(everyone())
    finally:
        done.set()
        watcher.join()
    assert busiest == engine.max_batch  # the answers were decoded in full batches, not one by one
    assert results[24:] == [None] * 8  # they hung up
    wrong = []
    for j, result in enumerate(results[:24]):
        want = expected[j % len(prompts)]
        text, finish, usage = result
        if (text, finish, usage.prompt_tokens, usage.completion_tokens) != (
                want.text, want.finish_reason, len(ids[j % len(prompts)]), len(want.token_ids)):
            wrong.append(f"{prompts[j % len(prompts)]}: {text!r} ({finish}, {usage}), expected {want.text!r} "
                         f"({want.finish_reason}, {len(want.token_ids)} tokens)")
    assert not wrong, "\n".join(wrong)

    deadline = time.monotonic() + 10
    while (engine.rows_in_use, engine.queue_depth) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (engine.rows_in_use, engine.queue_depth) == (0, 0)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as c:
        again = c.chat.completions.create(model="smollm2", messages=prompts[0][1], temperature=0, max_tokens=10)
    assert again.choices[0].message.content == expected[0].text


def test_abandoned_whole_answer_frees_its_row(served_models, server):
    engine = by_name(served_models, "smollm2").engine
    body = {"model": "smollm2", "prompt": "Hello", "temperature": 0, "max_tokens": 400, "ignore_eos": True}
    try:
        with pytest.raises(httpx.TimeoutException):  # 400 tokens take SmolLM2 well over 3 s on CPU
            httpx.post(f"{server}/v1/completions", json=body, timeout=1)
        deadline = time.monotonic() + 2
        while engine.rows_in_use and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.rows_in_use == 0
    finally:  # free the row if the server did not, so that the tests after this one run at full speed
        for slot in engine.slots:
            if slot is not None:
                slot.job.cancel()


def test_full_queue_answers_503(served_models):
    """One row and room for one waiting request: a third request is refused with 503, in OpenAI's shape."""
    from camelid.engine import BatchingEngine
    from camelid.serve.served_model import ServedModel

    # SmolLM2 decodes slowly enough on CPU that a 400-token answer still holds the row when the third one comes
    smollm2 = by_name(served_models, "smollm2")
    engine = BatchingEngine(smollm2.loaded, max_batch=1, max_queue=1, max_len=512)
    try:
        with live_server([ServedModel("smollm2", smollm2.loaded, engine, smollm2.template, 0)]) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            long = dict(model="smollm2", prompt="Hello", temperature=0, max_tokens=400, stream=True,
                        extra_body={"ignore_eos": True})
            running = c.completions.create(**long)
            next(iter(running))  # it has the row
            waiting = c.completions.create(**long)  # answered once queued
            assert (engine.rows_in_use, engine.queue_depth) == (1, 1)
            with pytest.raises(openai.APIStatusError) as caught:
                c.completions.create(model="smollm2", prompt="Hello", max_tokens=1)
            assert caught.value.status_code == 503
            error = caught.value.response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["code"] == "queue_full"
            with pytest.raises(openai.BadRequestError) as caught:  # more choices than rows can never run
                c.completions.create(model="smollm2", prompt="Hello", max_tokens=1, n=2)
            assert caught.value.param == "n"
            running.close()
            waiting.close()
            deadline = time.monotonic() + 10
            while (engine.rows_in_use, engine.queue_depth) != (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (engine.rows_in_use, engine.queue_depth) == (0, 0)
            answer = c.completions.create(model="smollm2", prompt=FOX, temperature=0, max_tokens=5)
            assert answer.choices[0].text == reference(smollm2.loaded, smollm2.loaded.tokenizer.encode(FOX), 5).text
    finally:
        engine.close()


# -- hostile input -------------------------------------------------------------------------------------------------

KEY = "sk-camelid-test"
SMALL = dict(max_tokens=64, max_body_bytes=32 * 1024, max_prompt_chars=8000)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
NAN, INF = float("nan"), float("inf")  # json.dumps writes these as the non-JSON tokens NaN and Infinity

NOT_A_NUMBER = ["1", True, [], {}, [0.5]]  # (null is allowed: it means the default)
NOT_AN_INT = ["1", True, [], {}, 1.5, [1]]
NOT_A_BOOL = ["true", 1, 0, [], {}]
HUGE = [NAN, INF, -INF, 1e308, -1e308]
NOT_TEXT = [5, 1.5, True, {}, [], None]
BAD_FIELDS = {  # both endpoints: field -> values that must be refused
    "model": [5, True, None, [], {}, ["tiny"], "", "nope", "TINY", "tiny ", "../tiny", "tiny\u0000"],
    "max_tokens": [0, -1, SMALL["max_tokens"] + 1, 10**30, -(10**30), 2**63, *NOT_AN_INT, *HUGE],
    "temperature": [-0.01, 2.01, -1, 10**30, *NOT_A_NUMBER, *HUGE],
    "top_p": [0, -0.5, 1.01, 10**30, *NOT_A_NUMBER, *HUGE],
    "n": [0, -1, 9, 10**30, *NOT_AN_INT, *HUGE],
    "stream": NOT_A_BOOL,
    "stop": [["a", "b", "c", "d", "e"], "", [""], ["ok", ""], [1], ["a", 5], [None], [["a"]], 5, 1.5, True, {}],
    "seed": [2**64, -(2**63) - 1, 10**30, -(10**30), *NOT_AN_INT, *HUGE],
    "presence_penalty": [-2.01, 2.01, 10**30, *NOT_A_NUMBER, *HUGE],
    "frequency_penalty": [-2.01, 2.01, -(10**30), *NOT_A_NUMBER, *HUGE],
    "top_k": [-2, -(10**30), *NOT_AN_INT, *HUGE],
    "min_p": [-0.01, 1.01, *NOT_A_NUMBER, *HUGE],
    "repetition_penalty": [0, -1, 10.01, *NOT_A_NUMBER, *HUGE],
    "ignore_eos": NOT_A_BOOL,
    "stream_options": ["x", 1, True, [], {"include_usage": "yes"}, {"include_usage": 1}],
}
BAD_CHAT_FIELDS = {
    "messages": [
        *NOT_TEXT, "hi", ["hi"], [None], [5], [[]], [{}], [{"content": "hi"}],
        *([{"role": role, "content": "hi"}] for role in ["tool", "function", "User", "", "bot", 5, None]),
        [{"role": "tool", "content": "18 C", "tool_call_id": ""}], [{"role": "user", "content": "hi", "tool_call_id": "1"}],
        *([{"role": "assistant", "tool_calls": calls}] for calls in [
            "x", [5], [{}], [{"id": "1"}], [{"id": "1", "type": "function", "function": {"name": "f"}}],
            [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
            [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
            [{"id": "", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            [{"id": "1", "type": "retrieval", "function": {"name": "f", "arguments": "{}"}}],
        ]),
        *([{"role": "user", "content": content}] for content in [
            5, True, {}, ["hi"], [None], [{"type": "text"}], [{"type": "text", "text": 5}], [{"text": "hi"}],
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
            [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            [{"type": "text", "text": "hi"}, {"type": "file", "file": {"file_id": "file-1"}}],
            "1 " * 1500,  # 3,000 tokens: past the tiny model's context of 1,024
            "x" * (SMALL["max_prompt_chars"] + 1),
        ]),
    ],
    # OpenAI fields camelid does not implement: refused by name, never ignored
    "functions": [[{"name": "f", "parameters": {}}]],
    "function_call": ["auto", {"name": "f"}],
    "response_format": [
        "json", 5, ["json_object"], {}, {"type": "xml"}, {"type": "json_schema"}, {"type": "JSON_OBJECT"},
        {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, {"type": "text", "extra": 1},
        *({"type": "json_schema", "json_schema": spec} for spec in [
            {"schema": {}}, {"name": "has space", "schema": {}}, {"name": "x" * 65, "schema": {}}, {"name": 5},
            {"name": "x", "schema": 5}, {"name": "x", "schema": "object"}, {"name": "x", "schema": False},
            {"name": "x", "schema": {"type": "strin"}}, {"name": "x", "schema": {"not": {"type": "string"}}},
            {"name": "x", "schema": {"type": "array", "uniqueItems": True}}, {"name": "x", "schema": {}, "strict": 1},
            {"name": "x", "schema": {"type": "string", "format": "foo"}, "strict": True},
            {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
            {"name": "x", "schema": {}, "unknown": 1},
            {"name": "x", "schema": json.loads('{"items": ' * 70 + "{}" + "}" * 70)},  # 70 levels deep
        ]),
    ],
    "tools": [
        "x", 5, {}, [None], [5], [{}], [{"type": "function"}], [{"type": "retrieval", "function": {"name": "f"}}],
        [{"type": "function", "function": {}}], [{"type": "function", "function": {"name": "has space"}}],
        [{"type": "function", "function": {"name": "f" * 65}}], [{"type": "function", "function": {"name": 5}}],
        [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
        [{"type": "function", "function": {"name": "f", "parameters": json.loads('{"items": ' * 70 + "{}" + "}" * 70)}}],
        [{"type": "function", "function": {"name": "f"}}] * 2, [{"type": "function", "function": {"name": "f"}}] * 129,
    ],
    "tool_choice": ["sometimes", 5, "REQUIRED", {"type": "function"}, {"type": "function", "function": {"name": "f"}},
                    {"function": {"name": "f"}}, "required"],  # no tools given: a name or required is wrong
    "parallel_tool_calls": NOT_A_BOOL,
    "logit_bias": [
        "x", 5, [1], {"abc": 1}, {"-1": 5}, {"1.5": 1}, {"": 1}, {"1": 101}, {"1": -100.5}, {"1": "x"},
        {"1": None}, {"1": [1]}, {"49152": 1}, {"99999999999999999999": -100}, {str(i): 1 for i in range(1025)},
    ],
    "audio": [{"voice": "alloy", "format": "wav"}],
    "modalities": [["text", "audio"]],
    "prediction": [{"type": "content", "content": "hi"}],
    "reasoning_effort": ["low"],
    "max_completion_tokens": [0, -1, *NOT_AN_INT, *HUGE],  # over the limit: see test_max_completion_tokens_limit
    "logprobs": [5, *NOT_A_BOOL],
    "top_logprobs": [-1, 21, 10**30, *NOT_AN_INT, *HUGE],  # sent with logprobs: true
}
BAD_COMPLETION_FIELDS = {
    "prompt": [
        *NOT_TEXT, "", [""], [[]], ["a", ""], [[1], []], [49152], [-1], [10**30], [1.5], [True], [None], [[49152]],
        [1, "a"], ["a", 1], [[1, "a"]], [[[1]]], [{}], [1] * 1024, "x" * (SMALL["max_prompt_chars"] + 1),
        ["a"] * 65, [[1]] * 65, ["a", [1] * 1024],
    ],
    "logprobs": [-1, 21, 10**30, *NOT_AN_INT, *HUGE],
    "echo": NOT_A_BOOL,
    "suffix": ["the end"],
    "best_of": [2],
    "logit_bias": [{"abc": 1}, {"1": 101}, {"49152": 1}],
}
NOT_JSON = [
    b"", b" ", b"{", b"}", b'{"model": "tiny"', b'{"model": tiny}', b"{'model': 'tiny'}", b'{"model": "tiny",}',
    b'{"model": "tiny" "prompt": "hi"}', b'{"model": "tiny"} trailing', b'{"model": "\xff"}', b"\xff\xfe{\x00}\x00",
    b'{"prompt": "\\ud800"}', b'{"model": "\\x41"}', b'{"model": "\\u12"}', b'{"model": "a\x01"}', b"\x00",
    b'{"max_tokens": 01}', b'{"max_tokens": 1.}', b'{"max_tokens": .5}', b'{"max_tokens": +1}', b'{"n": 0x10}',
    b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}", b"nul", b"[1, 2",
]
NOT_AN_OBJECT = [b"[]", b"[{}]", b'"hi"', b"null", b"1", b"-1.5", b"true", b"NaN", b"Infinity"]
DEEP = [
    b'{"model": "tiny", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "tiny", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
    b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
]
WRONG_KEYS = [None, "", "Bearer", "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Bearer {KEY.upper()}",
              f"Basic {KEY}", KEY, f"Token {KEY}"]


def bad_requests() -> list[tuple[str, str, str, object, dict, str | None, int | None]]:
    """(label, method, path, body (a dict as JSON, or bytes as they are), headers, param at fault, status)."""
    cases = []
    auth = {"Authorization": f"Bearer {KEY}"}
    for path, base, fields in [("/v1/chat/completions", CHAT, BAD_CHAT_FIELDS),
                               ("/v1/completions", COMPLETION, BAD_COMPLETION_FIELDS)]:
        for field, values in {**BAD_FIELDS, **fields}.items():
            for value in values:
                extra = {"logprobs": True} if field == "top_logprobs" else {}
                body = {**base, **extra, field: value}
                cases.append((f"{field}={value!r:.60}", "POST", path, body, auth, field, None))
        for field in ("model", "messages" if "messages" in base else "prompt"):
            cases.append((f"no {field}", "POST", path, {k: v for k, v in base.items() if k != field}, auth, field, 400))
        for body in NOT_JSON + NOT_AN_OBJECT + [b"{}"]:
            cases.append((f"body {body[:40]!r}", "POST", path, body, auth, None, 400))
        for body in DEEP:
            cases.append((f"nested {body[:40]!r}", "POST", path, body, auth, None, 400))
        big = json.dumps({**base, "padding": "x" * SMALL["max_body_bytes"]}).encode()
        cases.append(("oversized body", "POST", path, big, auth, None, 413))
        cases.append(("oversized chunked body", "POST", path, iter([big[:1000], big[1000:]]), auth, None, 413))
        cases.append(("1 MB chunked body", "POST", path, (b" " * 65536 for _ in range(16)), auth, None, 413))
        for key in WRONG_KEYS:
            headers = {} if key is None else {"Authorization": key}
            cases.append((f"key {key!r}", "POST", path, base, headers, None, 401))
    for key in WRONG_KEYS:
        headers = {} if key is None else {"Authorization": key}
        cases.append((f"key {key!r}", "GET", "/v1/models", None, headers, None, 401))
    cases += [
        ("top_logprobs without logprobs", "POST", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, auth,
         "top_logprobs", 400),
        ("ignore_eos with a JSON answer", "POST", "/v1/chat/completions",
         {**CHAT, "ignore_eos": True, "response_format": {"type": "json_object"}}, auth, "ignore_eos", 400),
        ("unknown model card", "GET", "/v1/models/nope", None, auth, "model", 404),
        ("unknown endpoint", "POST", "/v1/embeddings", {"model": "tiny", "input": "hi"}, auth, None, 404),
        ("misspelt endpoint", "POST", "/v1/chat/completion", CHAT, auth, None, 404),
        ("GET a POST endpoint", "GET", "/v1/chat/completions", None, auth, None, 405),
        ("PUT", "PUT", "/v1/completions", COMPLETION, auth, None, 405),
        ("DELETE a model", "DELETE", "/v1/models/tiny", None, auth, None, 405),
    ]
    return cases


def what_is_wrong(response: httpx.Response, param: str | None, status: int | None) -> str | None:
    """Why `response` is not a proper refusal (None when it is one)."""
    if not 400 <= response.status_code < 500 or (status is not None and response.status_code != status):
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not OpenAI's error shape: {response.text[:200]}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {error!r:.200}"
    if not isinstance(error["message"], str) or not error["message"].strip() or not error["type"]:
        return f"no message or type: {error!r:.200}"
    if param is not None and (error["param"] or "").split(".")[0] != param:
        return f"param {error['param']!r}, expected {param!r} ({error['message']})"
    return None


def test_hostile_requests_get_4xx_in_openai_shape(served_models):
    from camelid.serve.protocol import ServerLimits

    cases = bad_requests()
    assert len(cases) >= 200
    with live_server(served_models, api_key=KEY, limits=ServerLimits(**SMALL)) as url:
        wrong = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for label, method, path, body, headers, param, status in cases:
                content = body if isinstance(body, bytes) or hasattr(body, "__next__") else None
                data = None if content is not None or body is None else json.dumps(body).encode()
                response = http.request(method, path, content=content if content is not None else data,
                                        headers={"Content-Type": "application/json", **headers})
                problem = what_is_wrong(response, param, status)
                if problem:
                    wrong.append(f"{method} {path} {label}: {problem}")
        assert not wrong, f"{len(wrong)} of {len(cases)} bad requests were not refused properly:\n" + "\n".join(wrong)

        # still serving, and right
        tiny = by_name(served_models, "tiny").loaded
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
            answer = c.chat.completions.create(model="tiny", messages=CAPITAL, temperature=0, max_tokens=8)
        assert answer.choices[0].message.content == reference(tiny, chat_prompt(tiny, CAPITAL), 8).text
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


EXTREME_BUT_VALID = [  # each a valid request: it must get an answer (or a 4xx), whatever the numbers do
    {"temperature": 2, "top_p": 1e-30}, {"temperature": 2, "min_p": 1.0}, {"top_k": 10**30}, {"top_k": -1},
    {"top_k": 1, "temperature": 2}, {"repetition_penalty": 10}, {"repetition_penalty": 10, "temperature": 2},
    {"seed": -(2**63)}, {"seed": 2**64 - 1}, {"presence_penalty": -2, "frequency_penalty": -2},
    {"presence_penalty": 2, "frequency_penalty": 2, "temperature": 0}, {"logprobs": 20, "n": 8},
    {"stop": ["\u0000", "\U0001f600", "x" * 1000, "\ufffd"]}, {"prompt": "\u0000\u202e\U0001f600\ufeff\r\n"},
    {"prompt": [0]}, {"prompt": [49151]}, {"prompt": "<|im_end|><|im_start|>system\n"}, {"echo": True, "logprobs": 0},
    {"max_tokens": 1000, "ignore_eos": True},
]
# valid numbers that overflow (or underflow to 0 in) float32 once applied to the logits
OVERFLOWING = [{"temperature": 1e-308}, {"temperature": 5e-324}, {"temperature": 1, "repetition_penalty": 1e-300},
               {"temperature": 1, "top_p": 1e-300}]


def answers_properly(response: httpx.Response) -> str | None:
    """Why `response` to a valid request is neither a proper answer nor a proper refusal (None when it is)."""
    if response.status_code != 200:
        return what_is_wrong(response, None, None)
    finishes = [c["finish_reason"] for c in response.json()["choices"]]
    if any(f not in ("stop", "length") for f in finishes):
        return f"finish_reason {finishes}"
    return None


def test_extreme_valid_values_get_answers(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        wrong = [f"{extra}: {problem}" for extra in EXTREME_BUT_VALID
                 if (problem := answers_properly(http.post("/v1/completions", json={**COMPLETION, **extra})))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("extra", OVERFLOWING, ids=str)
def test_overflowing_sampling_values_get_answers(server, extra):
    response = httpx.post(f"{server}/v1/completions", json={**COMPLETION, **extra}, timeout=60)
    assert answers_properly(response) is None


def test_one_failing_request_leaves_the_others_alone(client, served_models):
    loaded = by_name(served_models, "tiny").loaded
    long = dict(model="tiny", prompt="Hello", temperature=0, max_tokens=1000, extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **long)
    chunks = iter(stream)
    text = next(chunks).choices[0].text  # decoding now
    client.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=1e-308)
    finish = None
    for chunk in chunks:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert text == reference(loaded, loaded.tokenizer.encode("Hello"), 1000, ignore_eos=True).text


# -- fields not implemented, encodings, disconnects -----------------------------------------------------------------


def test_an_unimplemented_field_is_refused_by_name_and_one_that_asks_nothing_is_answered(client):
    for kwargs, param in [({"extra_body": {"audio": {"voice": "alloy"}}}, "audio"),
                          ({"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=CAPITAL, max_tokens=2, **kwargs)
        assert caught.value.param == param
        assert f"{param} is not supported by this server" in caught.value.message
    answer = client.chat.completions.create(model="tiny", messages=CAPITAL, max_tokens=2, tools=[], tool_choice="none",
                                            response_format={"type": "text"}, logit_bias={}, temperature=0,
                                            modalities=["text"])
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, suffix="the end")
    assert caught.value.param == "suffix"


def test_an_image_part_is_refused_as_text_only(client):
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": image}], max_tokens=2)
    assert "this model reads text only (a image_url part)" in caught.value.message
    assert caught.value.param.startswith("messages.0")


def test_compressed_bodies_are_decoded_within_the_limit(served_models):
    import gzip
    import zlib

    from camelid.serve.protocol import ServerLimits

    body = json.dumps({**COMPLETION, "prompt": FOX, "temperature": 0, "max_tokens": 4}).encode()
    deflated = zlib.compress(body)
    bomb = gzip.compress(json.dumps({**COMPLETION, "padding": " " * (4 * SMALL["max_body_bytes"])}).encode())
    with live_server(served_models, limits=ServerLimits(**SMALL)) as url, httpx.Client(base_url=url, timeout=60) as http:
        def post(content, encoding):
            headers = {"Content-Type": "application/json"} | ({"Content-Encoding": encoding} if encoding else {})
            return http.post("/v1/completions", content=content, headers=headers)

        plain = post(body, None).json()["choices"][0]["text"]
        assert post(gzip.compress(body), "gzip").json()["choices"][0]["text"] == plain
        assert post(deflated, "deflate").json()["choices"][0]["text"] == plain
        assert len(bomb) < SMALL["max_body_bytes"]  # small on the wire, over the limit once decoded
        for content, encoding, status, words in [
            (body, "br", 415, "Content-Encoding 'br' is not supported"), (bomb, "gzip", 413, "once decoded"),
            (b"not gzip at all", "gzip", 400, "not valid gzip"), (gzip.compress(body)[:-12], "gzip", 400, "ends before"),
        ]:
            response = post(content, encoding)
            assert response.status_code == status and words in response.json()["error"]["message"], response.text


def test_a_client_gone_mid_body_is_a_4xx_not_a_traceback():
    import asyncio

    from starlette.requests import Request

    from camelid.serve.http import read_body
    from camelid.serve.protocol import APIError, CompletionRequest, ServerLimits

    messages = iter([{"type": "http.request", "body": b'{"model": "ti', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/v1/completions"}, receive)
    with pytest.raises(APIError) as caught:
        asyncio.run(read_body(request, CompletionRequest, ServerLimits()))
    assert caught.value.code == "client_disconnected"  # starlette's ClientDisconnect, caught inside read_body
