"""Generation against transformers: greedy tokens, batching, each sampling filter, stops and streaming.

Most tests use tiny models with SmolLM2's real tokenizer: a random one (with its transformers twin) and a
"scripted" one whose greedy output is a chosen text. The real SmolLM2 runs only where the test is about it.
"""

import pytest
import torch

from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.generate import SamplingParams, generate, process_logits, sample_next, stream
from camelid.model import Llama

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's
# Every filter off: sampling from the model's own distribution.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from camelid.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def random_twins(seed: int = 0, context: int = 256):
    """A random camelid model with SmolLM2's vocabulary, and the transformers model holding the same weights.

    Weights ten times the usual initial spread make each greedy choice clear-cut (top-2 logit gaps ~1e-3,
    far above float32 rounding), so token-for-token comparisons test the code, not the rounding.
    """
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf(), initializer_range=0.2))
    ours = Llama(config)
    ours.load_state_dict(hf.state_dict())
    return ours.eval(), hf.eval()


@pytest.fixture(scope="module")
def tiny():
    return random_twins()[0]


def scripted_model(script: list[int], end: int) -> Llama:
    """A Llama whose greedy continuation of script[i] is script[i + 1], and of the last token `end`.

    Attention and MLP outputs are zeroed, so each position's final hidden state is its token's embedding:
    script[i] embeds as the i-th unit vector, and lm_head maps that vector to the next token.
    """
    assert len(set(script)) == len(script) <= 64, "the script's tokens must be distinct"
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256,
    )
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.0)
        for i, (tok, nxt) in enumerate(zip(script, script[1:] + [end])):
            model.model.embed_tokens.weight[tok, i] = 1.0
            model.lm_head.weight[nxt, i] = 1.0
    return model


# A script with multi-byte characters that SmolLM2's tokenizer splits over several tokens (the emoji takes three).
SCRIPT_TEXT = "Hi 👋 there! Ünïcødé 日本 costs 5€ - the END"


@pytest.fixture(scope="module")
def script(tokenizer):
    """(model, prompt, the continuation's token ids, its text) of the scripted model; it ends with <|im_end|>."""
    ids = tokenizer.encode(SCRIPT_TEXT, add_special=False)
    assert tokenizer.decode(ids) == SCRIPT_TEXT
    model = scripted_model(ids, end=tokenizer.eos_id)
    return model, ids[:1], ids[1:], tokenizer.decode(ids[1:])


def test_scripted_model_follows_its_script(script, tokenizer):
    model, prompt, ids, text = script
    [out] = generate(model, tokenizer, [prompt], SamplingParams(**GREEDY))
    assert (out.token_ids, out.text, out.finish_reason, out.prompt_tokens) == (ids, text, "stop", 1)
    assert "👋" in text and "日本" in text


# -- greedy decoding against transformers ---------------------------------------------------------------------


def hf_greedy(hf, prompt: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    """transformers' greedy continuation of `prompt`: exactly n tokens, with no end-of-sequence token."""
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=n, repetition_penalty=repetition_penalty, eos_token_id=None, pad_token_id=0,
    )
    hf.generation_config.eos_token_id = None  # else generate() falls back to the model's own
    out = hf.generate(torch.tensor([prompt]), generation_config=config, attention_mask=torch.ones(1, len(prompt)))
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_on_a_random_model(penalty, tokenizer):
    ours, hf = random_twins(seed=1)
    prompts = [[5, 600, 7000, 8, 9], tokenizer.encode("Once upon a time, in a land far away,")]
    params = SamplingParams(**GREEDY, max_new_tokens=24, repetition_penalty=penalty, ignore_eos=True)
    got = [c.token_ids for c in generate(ours, tokenizer, prompts, params)]
    with torch.no_grad():
        expected = [hf_greedy(hf, p, 24, penalty) for p in prompts]
    assert got == expected


@pytest.mark.parametrize("chunk", [512, 4])
def test_batched_greedy_equals_one_by_one(tiny, tokenizer, chunk, monkeypatch):
    """Prompts of different lengths in one batch; with chunk 4 the prompts are prefilled a few tokens at a time,
    so rows end in different chunks."""
    monkeypatch.setattr("camelid.generate.PREFILL_CHUNK", chunk)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 41, 17, 9)]
    for penalty in (1.0, 1.2):  # the penalty's token history is padded per row in a batch
        params = SamplingParams(**GREEDY, max_new_tokens=16, repetition_penalty=penalty, ignore_eos=True)
        batched = generate(tiny, tokenizer, prompts, params)
        alone = [generate(tiny, tokenizer, [p], params)[0] for p in prompts]
        assert [(c.token_ids, c.text, c.finish_reason) for c in batched] == [
            (c.token_ids, c.text, c.finish_reason) for c in alone
        ]


def test_batched_rows_near_the_context_keep_their_own_budget(tokenizer):
    """A short prompt batched with one that nearly fills the context still gets all its new tokens."""
    model, _ = random_twins(context=48)
    prompts = [list(range(100, 140)), list(range(200, 205))]  # 40 and 5 tokens of a 48-token context
    params = SamplingParams(**GREEDY, max_new_tokens=20, ignore_eos=True)
    alone = [generate(model, tokenizer, [p], params)[0] for p in prompts]
    assert [len(c.token_ids) for c in alone] == [8, 20] and {c.finish_reason for c in alone} == {"length"}
    batched = generate(model, tokenizer, prompts, params)
    assert [(c.token_ids, c.finish_reason) for c in batched] == [(c.token_ids, c.finish_reason) for c in alone]


# -- sampling filters against transformers' logits processors -------------------------------------------------


def random_logits(rows: int = 6, vocab: int = 3000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 6.0, rows)[:, None]  # flat to peaked


def history_ids(rows: int = 6, vocab: int = 3000, n: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(1))


def assert_same_filtering(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The same tokens survive (are finite), with equal values."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)], rtol=1e-6, atol=1e-6)


FILTERS = [
    ("repetition_penalty", 1.3, lambda v: transformers.RepetitionPenaltyLogitsProcessor(penalty=v)),
    ("repetition_penalty", 0.7, lambda v: transformers.RepetitionPenaltyLogitsProcessor(penalty=v)),
    ("temperature", 0.6, lambda v: transformers.TemperatureLogitsWarper(v)),
    ("temperature", 1.7, lambda v: transformers.TemperatureLogitsWarper(v)),
    ("top_k", 1, lambda v: transformers.TopKLogitsWarper(v)),
    ("top_k", 40, lambda v: transformers.TopKLogitsWarper(v)),
    ("top_k", 5000, lambda v: transformers.TopKLogitsWarper(v)),
    ("top_p", 0.05, lambda v: transformers.TopPLogitsWarper(v)),
    ("top_p", 0.5, lambda v: transformers.TopPLogitsWarper(v)),
    ("top_p", 0.95, lambda v: transformers.TopPLogitsWarper(v)),
    ("min_p", 0.01, lambda v: transformers.MinPLogitsWarper(v)),
    ("min_p", 0.3, lambda v: transformers.MinPLogitsWarper(v)),
    ("min_p", 1.0, lambda v: transformers.MinPLogitsWarper(v)),
]


@pytest.mark.parametrize("name,value,reference", FILTERS, ids=[f"{n}={v}" for n, v, _ in FILTERS])
def test_each_filter_equals_transformers(name, value, reference):
    logits, history = random_logits(), history_ids()
    got = process_logits(logits, SamplingParams(**{**PLAIN, name: value}), history)
    expected = reference(value)(history, logits.clone())
    assert_same_filtering(got, expected)
    assert torch.isfinite(got).any(-1).all()


@pytest.mark.parametrize("seed", range(3))
def test_all_filters_together_equal_transformers_in_its_order(seed):
    logits, history = random_logits(seed=seed), history_ids()
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.2),
        transformers.TemperatureLogitsWarper(0.8),
        transformers.TopKLogitsWarper(40),
        transformers.TopPLogitsWarper(0.9),
        transformers.MinPLogitsWarper(0.05),
    ])
    assert_same_filtering(process_logits(logits, params, history), chain(history, logits.clone()))


def test_sampling_draws_from_the_filtered_distribution():
    """Draw frequencies match the softmax of the filtered logits (temperature applied, filtered tokens never)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 1.8]])
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.97, min_p=0.0, seed=0)
    expected = process_logits(logits, params, None).softmax(-1)[0]
    draws = sample_next(logits.expand(200_000, -1), params, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).float() / len(draws)
    assert set(draws.unique().tolist()) == set(expected.nonzero().flatten().tolist())
    torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    assert sample_next(logits, SamplingParams(**GREEDY), None, None).tolist() == [0]
    penalised = SamplingParams(**GREEDY, repetition_penalty=1.1)
    assert sample_next(logits, penalised, torch.tensor([[0]]), None).tolist() == [1]


# -- sampling through generate() ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny, tokenizer):
    prompt = tokenizer.encode("The weather today")
    runs = {
        seed: [generate(tiny, tokenizer, [prompt], SamplingParams(**PLAIN, seed=seed, max_new_tokens=12,
                                                                   ignore_eos=True))[0].token_ids
               for _ in range(2)]
        for seed in (1, 2)
    }
    assert runs[1][0] == runs[1][1] and runs[2][0] == runs[2][1]
    assert runs[1][0] != runs[2][0]


def test_unseeded_sampling_leaves_torch_global_rng_alone(tiny, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    generate(tiny, tokenizer, [[1, 2, 3]], SamplingParams(**PLAIN, max_new_tokens=3))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)])
def test_filters_that_keep_one_token_are_greedy(filters, tiny, tokenizer):
    prompts = [tokenizer.encode("A list of fruits:"), [7, 8, 9]]
    greedy = generate(tiny, tokenizer, prompts, SamplingParams(**GREEDY, max_new_tokens=16, ignore_eos=True))
    sampled = generate(
        tiny, tokenizer, prompts,
        SamplingParams(**{**PLAIN, "temperature": 1.5, **filters}, seed=3, max_new_tokens=16, ignore_eos=True),
    )
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]


# -- stops, lengths and streaming -----------------------------------------------------------------------------


def run_both(model, tokenizer, prompt, params):
    """generate()'s completion and the pieces stream() yields for the same request."""
    [completion] = generate(model, tokenizer, [prompt], params)
    return completion, list(stream(model, tokenizer, prompt, params))


def test_end_of_turn_token_stops(script, tokenizer):
    model, prompt, ids, text = script
    out, pieces = run_both(model, tokenizer, prompt, SamplingParams(**GREEDY, max_new_tokens=200))
    assert (out.token_ids, out.text, out.finish_reason) == (ids, text, "stop")  # the stop token is not returned
    assert "".join(pieces) == text


def test_ignore_eos_runs_to_the_length_limit(script, tokenizer):
    model, prompt, ids, _ = script
    params = SamplingParams(**GREEDY, max_new_tokens=len(ids) + 5, ignore_eos=True)
    out = generate(model, tokenizer, [prompt], params)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == len(ids) + 5
    assert out.token_ids[: len(ids) + 1] == ids + [tokenizer.eos_id]


def test_extra_stop_tokens(script, tokenizer):
    model, prompt, ids, _ = script
    out, pieces = run_both(model, tokenizer, prompt, SamplingParams(**GREEDY, stop_token_ids=[ids[6]]))
    assert (out.token_ids, out.finish_reason) == (ids[:6], "stop")
    assert out.text == "".join(pieces) == tokenizer.decode(ids[:6])


@pytest.mark.parametrize("n", [1, 3, 4, 10])
def test_max_new_tokens_gives_length(n, script, tokenizer):
    model, prompt, ids, _ = script
    out, pieces = run_both(model, tokenizer, prompt, SamplingParams(**GREEDY, max_new_tokens=n))
    assert (out.token_ids, out.finish_reason) == (ids[:n], "length")
    # cut inside the emoji (n=3), the text ends in a replacement character, as decoding those tokens does
    assert out.text == "".join(pieces) == tokenizer.decode(ids[:n])


def token_boundary_stop(tokenizer, ids: list[int]) -> str:
    """A stop string made of the end of one ASCII token and the start of the next."""
    for a, b in zip(ids, ids[1:]):
        left, right = tokenizer.decode([a]), tokenizer.decode([b])
        if len(left) >= 3 and len(right) >= 2 and (left + right).isascii():
            return left[-2:] + right[:2]
    raise AssertionError("no pair of ASCII tokens in the script")


@pytest.mark.parametrize(
    "stops",
    [
        ["there"],  # inside one token
        "boundary",  # across two tokens
        ["👋"],  # a character spread over three tokens
        ["日本", "Ün"],  # the earlier of two stops wins
        ["ENDING"],  # never completes: the held-back "END" is released at the end
        ["5€ -"],
    ],
)
def test_stop_strings_cut_before_the_stop(stops, script, tokenizer):
    model, prompt, ids, text = script
    if stops == "boundary":
        stops = [token_boundary_stop(tokenizer, ids)]
    out, pieces = run_both(model, tokenizer, prompt, SamplingParams(**GREEDY, stop=stops))
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        assert (out.text, out.finish_reason) == (text[: min(hits)], "stop")
    else:
        assert (out.text, out.finish_reason) == (text, "stop")  # ended by the end-of-turn token
    assert "".join(pieces) == out.text


def test_streamed_pieces_hold_only_whole_characters(script, tokenizer):
    model, prompt, ids, text = script
    pieces = list(stream(model, tokenizer, prompt, SamplingParams(**GREEDY)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any("👋" in p for p in pieces)
    assert len(pieces) > 10  # streamed, not released at the end


def test_stream_leaves_grad_mode_alone_between_pieces(script, tokenizer):
    """Code run between pieces (the caller's) is not under inference mode, even if the stream is abandoned."""
    model, prompt, _, _ = script
    pieces = stream(model, tokenizer, prompt, SamplingParams(**GREEDY))
    next(pieces)
    assert not torch.is_inference_mode_enabled()
    w = torch.ones(2, requires_grad=True)
    (w * 3).sum().backward()
    assert w.grad.tolist() == [3.0, 3.0]


# -- invalid requests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [("max_new_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
     ("top_p", 1.01), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0), ("stop", [""])],
)
def test_invalid_sampling_values_name_the_parameter(name, value):
    with pytest.raises(CamelidError, match=rf"\b{name}\b"):
        SamplingParams(**{name: value})


def test_prompt_longer_than_the_context_is_refused(tokenizer):
    model, _ = random_twins(context=32)
    for n in (32, 50):
        with pytest.raises(CamelidError, match=rf"prompt is {n} tokens.*context is 32"):
            generate(model, tokenizer, [[5, 6], list(range(10, 10 + n))], SamplingParams(**GREEDY))
    with pytest.raises(CamelidError, match="empty prompt"):
        generate(model, tokenizer, [[]], SamplingParams(**GREEDY))
    out = generate(model, tokenizer, [list(range(10, 41))], SamplingParams(**GREEDY, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (1, "length")  # 31 tokens: room for one more


# -- the real SmolLM2 -----------------------------------------------------------------------------------------

SMOLLM2_PROMPTS = {
    "raw": "The capital of France is",
    "chat": "Write a haiku about the sea.",
    "chat-code": "Write a Python function that reverses a string.",
}
N_NEW = 64


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_model):
    from camelid.chat import chat_template_for, encode_chat

    template = chat_template_for(smollm2_model)
    return {
        name: smollm2_model.tokenizer.encode(text) if name == "raw"
        else encode_chat(smollm2_model, template, [{"role": "user", "content": text}])
        for name, text in SMOLLM2_PROMPTS.items()
    }


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2_model, smollm2_prompts):
    """camelid's greedy continuation of each prompt, run one prompt at a time."""
    params = SamplingParams(**GREEDY, max_new_tokens=N_NEW, ignore_eos=True)
    return {
        name: generate(smollm2_model.model, smollm2_model.tokenizer, [prompt], params)[0]
        for name, prompt in smollm2_prompts.items()
    }


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_gguf, smollm2_prompts, smollm2_greedy):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for name, prompt in smollm2_prompts.items():
            assert smollm2_greedy[name].token_ids == hf_greedy(hf, prompt, N_NEW), name


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_by_one(smollm2_model, smollm2_prompts, smollm2_greedy):
    assert len({len(p) for p in smollm2_prompts.values()}) == len(smollm2_prompts)  # all different lengths
    params = SamplingParams(**GREEDY, max_new_tokens=N_NEW, ignore_eos=True)
    batched = generate(smollm2_model.model, smollm2_model.tokenizer, list(smollm2_prompts.values()), params)
    for name, completion in zip(smollm2_prompts, batched):
        assert completion.token_ids == smollm2_greedy[name].token_ids, name
        assert completion.text == smollm2_greedy[name].text


@pytest.mark.slow
def test_smollm2_streams_its_generated_text(smollm2_model, smollm2_prompts, smollm2_greedy):
    prompt, expected = smollm2_prompts["chat"], smollm2_greedy["chat"]
    params = SamplingParams(**GREEDY, max_new_tokens=N_NEW, ignore_eos=True)
    pieces = list(stream(smollm2_model.model, smollm2_model.tokenizer, prompt, params))
    assert "".join(pieces) == expected.text == smollm2_model.tokenizer.decode(expected.token_ids)


def test_a_completion_says_which_stop_token_ended_it(tiny, tokenizer):
    """The stop token is not part of the answer's tokens but is reported; an answer cut at the limit has none."""
    prompt = [5, 6, 7]
    free = generate(tiny, tokenizer, [prompt], SamplingParams(**GREEDY, max_new_tokens=4, ignore_eos=True))[0]
    assert free.finish_reason == "length" and free.stop_token is None
    third = free.token_ids[2]
    stopped = generate(tiny, tokenizer, [prompt], SamplingParams(**GREEDY, max_new_tokens=4, ignore_eos=True,
                                                                 stop_token_ids=[third]))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_token == third
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(third)]
