"""The batching engine against `camelid generate` and the model's own forward pass: chunked prefill, the prompt
prefix cache and prompt logprobs.

Every answer is compared with what `generate` answers for the prompt alone, greedy, token for token; prompt
logprobs with the log-softmax of one forward pass over the whole prompt, without a cache. What the engine ran at
each step (decode steps, prefill chunks) is recorded by wrapping its methods, so "a running stream keeps getting
tokens while a long prompt is prefilled" is counted in steps, not timed.
"""

import asyncio

import pytest
import torch

from camelid.checkpoint import LoadedModel
from camelid.config import ModelConfig
from camelid.engine import BatchingEngine
from camelid.generate import SamplingParams, generate
from camelid.jobs import GenerationParams
from camelid.model import Llama

VOCAB = 49152  # SmolLM2's, whose tokenizer the tiny models use


def tiny_model(seed: int = 0, **config) -> Llama:
    """A random model with SmolLM2's vocabulary; weights of spread 0.2 (as test_generate's) make each greedy choice
    clear-cut, so comparisons test the code, not float32 rounding."""
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                            **config})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Llama(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.2)
    return model.eval()


# Gemma 3's layers: sliding-window attention (a window of 8, far shorter than the prompts) beside global layers,
# local rope, q/k norms, offset norms, GeGLU, scaled embeddings.
GEMMA = dict(model_type="gemma3_text", num_hidden_layers=3, head_dim=16, hidden_act="gelu_pytorch_tanh",
             sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             rope_local_base_freq=10000.0, query_pre_attn_scalar=16)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from camelid.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def loaded(request, tokenizer) -> LoadedModel:
    model = tiny_model() if request.param == "llama" else tiny_model(1, **GEMMA)
    return LoadedModel(model, tokenizer, None, request.param)


def prompts_of(lengths, seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int = 12, ignore_eos: bool = True, **params) -> GenerationParams:
    """Greedy, end-of-turn ignored unless told (a random model may write one early), each token's id reported."""
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return GenerationParams(sampling, logprobs=0, **params)


def alone(loaded, prompt: list[int], max_tokens: int = 12, ignore_eos: bool = True) -> list[int]:
    """What `camelid generate` answers for `prompt` alone: the reference for every answer here."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return generate(loaded.model, loaded.tokenizer, [prompt], params)[0].token_ids


async def answer(job, read=()) -> list[int]:
    """The token ids of a job's one choice, from its pieces (`read`: those already taken off its queue)."""
    pieces = list(read)
    while not pieces or pieces[-1].finish_reason is None:
        pieces.append(await job.queue.get())
    assert pieces[-1].finish_reason in ("length", "stop"), pieces[-1].finish_reason
    return [t.token_id for piece in pieces for t in piece.logprobs]


def record_steps(engine: BatchingEngine) -> list[tuple]:
    """Wrap the engine's decode step and prefill passes to log ("decode", rows fed) and ("prefill", row, tokens)."""
    log = []
    decode, prefill_run = engine._decode, engine._prefill_run

    def logged_decode(logits):
        log.append(("decode", [i for i, s in enumerate(engine.slots) if s is not None and not s.to_prefill]))
        decode(logits)

    def logged_prefill_run(run, logits):
        log.extend(("prefill", row, take) for row, take in run)
        prefill_run(run, logits)

    engine._decode, engine._prefill_run = logged_decode, logged_prefill_run
    return log


@pytest.fixture
def engine_of(loaded):
    """engine_of(**options): a BatchingEngine on the tiny model, closed after the test."""
    engines = []

    def make(**options):
        engines.append(BatchingEngine(loaded, **{"max_batch": 4, "max_len": 512, **options}))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


# -- chunked prefill -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 16, 256])
def test_a_lone_long_prompt_answers_as_generate(loaded, engine_of, chunk):
    prompt = prompts_of([300])[0]
    engine = engine_of(prefill_chunk=chunk, prefix_cache=False)

    async def main():
        return await answer(engine.submit(prompt, greedy()))

    assert asyncio.run(main()) == alone(loaded, prompt)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_mixed_arrivals_answer_as_generate(loaded, engine_of, prefix_cache):
    """Long and short prompts arriving while others run, more of them than rows: each answers as alone."""
    prompts = prompts_of([5, 150, 40, 90, 3, 200, 17])
    engine = engine_of(prefill_chunk=16, max_batch=3, prefix_cache=prefix_cache)
    log = record_steps(engine)

    async def main():
        first = engine.submit(prompts[0], greedy(40))
        head = await first.queue.get()  # it is decoding when the others arrive
        jobs = [engine.submit(p, greedy()) for p in prompts[1:4]]
        await asyncio.sleep(0.05)
        jobs += [engine.submit(p, greedy()) for p in prompts[4:]]
        return await asyncio.gather(answer(first, [head]), *(answer(j) for j in jobs))

    got = asyncio.run(main())
    assert got == [alone(loaded, prompts[0], 40)] + [alone(loaded, p) for p in prompts[1:]]
    assert sum(step[0] == "prefill" for step in log) > 2 * len(prompts)  # the long prompts went in chunks


def test_a_running_stream_decodes_between_the_chunks_of_a_long_prompt(loaded, engine_of):
    short, long = prompts_of([4, 300])
    engine = engine_of(prefill_chunk=32)
    log = record_steps(engine)

    async def main():
        stream = engine.submit(short, greedy(200))
        await stream.queue.get()
        mark = len(log)
        job = engine.submit(long, greedy(4))
        await answer(job)
        await answer(stream)
        return mark

    mark = asyncio.run(main())
    steps = log[mark:]
    chunks = [i for i, step in enumerate(steps) if step[0] == "prefill" and step[1] == 1]
    assert len(chunks) == -(-300 // 32) and all(steps[i][2] <= 32 for i in chunks)
    # before each chunk, in the same step, the stream (row 0) took a decode step
    assert all(steps[i - 1] == ("decode", [0]) for i in chunks)


def test_prompts_arriving_together_are_prefilled_in_one_pass(loaded, engine_of):
    prompts = prompts_of([20, 24, 30, 18])
    engine = engine_of(prefill_chunk=256)
    passes = []
    prefill_run = engine._prefill_run
    engine._prefill_run = lambda run, logits: (passes.append(run), prefill_run(run, logits))

    async def main():
        with engine._wake:  # all four are waiting before the worker looks
            jobs = [engine.submit(p, greedy()) for p in prompts]
        return await asyncio.gather(*(answer(j) for j in jobs))

    assert asyncio.run(main()) == [alone(loaded, p) for p in prompts]
    assert passes[0] == [(0, 20), (1, 24), (2, 30), (3, 18)]


def test_prompts_arriving_beside_a_stream_advance_together_a_chunk_a_step(loaded, engine_of):
    short, *prompts = prompts_of([4, 40, 36, 20])
    engine = engine_of(prefill_chunk=16)
    passes = []
    prefill_run = engine._prefill_run
    engine._prefill_run = lambda run, logits: (passes.append(run), prefill_run(run, logits))

    async def main():
        stream = engine.submit(short, greedy(100))
        head = await stream.queue.get()
        mark = len(passes)
        with engine._wake:
            jobs = [engine.submit(p, greedy()) for p in prompts]
        answers = await asyncio.gather(*(answer(j) for j in jobs))
        await answer(stream, [head])
        return answers, mark

    got, mark = asyncio.run(main())
    assert got == [alone(loaded, p) for p in prompts]
    assert passes[mark:] == [[(1, 16), (2, 16), (3, 16)], [(1, 16), (2, 16), (3, 4)], [(1, 8), (2, 4)]]


# -- the prefix cache ----------------------------------------------------------------------------------------------


def chat_turns(engine, first: list[int], follow_ups: list[list[int]]) -> list[list[int]]:
    """A conversation: each next prompt is the previous prompt, its answer and a follow-up."""
    async def main():
        prompt, answers = first, []
        for more in [None, *follow_ups]:
            if more is not None:
                prompt = prompt + answers[-1] + more
            answers.append(await answer(engine.submit(prompt, greedy())))
        return answers

    return asyncio.run(main())


def test_a_chats_next_turn_reuses_its_history_and_answers_the_same(loaded, engine_of):
    first, *more = prompts_of([120, 30, 25])
    with_cache, without = engine_of(prefill_chunk=16), engine_of(prefill_chunk=16, prefix_cache=False)
    log = record_steps(with_cache)
    got = chat_turns(with_cache, first, more)
    assert got == chat_turns(without, first, more)
    prompt = first
    for answer_ids, follow_up in zip(got, more):  # and each turn is what generate answers for it alone
        prompt = prompt + answer_ids + follow_up
    assert got[-1] == alone(loaded, prompt)
    prefilled = sum(take for kind, *rest in log if kind == "prefill" for take in rest[1:])
    # each turn ran only what the row did not hold: its follow-up and the answer's last token (never fed)
    assert prefilled == 120 + (30 + 1) + (25 + 1)


def test_a_shared_system_prompt_is_reused_by_every_row_that_ran_it(loaded, engine_of):
    system, *questions = prompts_of([100, 10, 12, 9, 11, 8])
    engine = engine_of(prefill_chunk=16)
    log = record_steps(engine)

    async def ask(*qs):
        with engine._wake:  # waiting together: admitted in the same step
            jobs = [engine.submit(system + q, greedy()) for q in qs]
        return await asyncio.gather(*(answer(j) for j in jobs))

    async def main():
        # row 0 runs it; then two at once: one finds it in row 0, one runs it in row 1; then both rows hold it
        return await ask(questions[0]) + await ask(*questions[1:3]) + await ask(*questions[3:])

    assert asyncio.run(main()) == [alone(loaded, system + q) for q in questions]
    prefilled = [take for kind, *rest in log if kind == "prefill" for take in rest[1:]]
    assert prefilled == [10 + 100, 12, 9 + 100, 11, 8]


def test_no_prefix_is_reused_past_the_prompts_last_token(loaded, engine_of):
    """The same prompt twice: the second run still runs its last token, for the logits of its first answer."""
    prompt = prompts_of([40])[0]
    engine = engine_of()
    log = record_steps(engine)

    async def main():
        return [await answer(engine.submit(prompt, greedy())) for _ in range(2)]

    first, second = asyncio.run(main())
    assert first == second == alone(loaded, prompt)
    assert [step for step in log if step[0] == "prefill"][-1] == ("prefill", 0, 1)


# -- prompt logprobs -----------------------------------------------------------------------------------------------


def full_forward_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over the whole prompt, no cache: row i scores token i + 1."""
    with torch.inference_mode():
        return model(torch.tensor([prompt]))[0].float().log_softmax(-1)


@pytest.mark.parametrize("chunk", [0, 16])
def test_prompt_logprobs_are_the_models_and_reuse_no_prefix(loaded, engine_of, chunk):
    prompt = prompts_of([70])[0]
    engine = engine_of(prefill_chunk=chunk)

    async def main():
        stream = engine.submit(prompts_of([6], seed=9)[0], greedy(300))  # decoding throughout: prompts go in chunks
        await stream.queue.get()
        await answer(engine.submit(prompt[:60] + [7] * 5, greedy()))  # a free row now holds the first 60 tokens
        job = engine.submit(prompt, greedy(3, prompt_logprobs=2))
        first = await job.queue.get()
        got = job.prompt_logprobs  # set before the first piece
        await answer(job, [first])
        stream.cancel()
        return got

    got = asyncio.run(main())
    expected = full_forward_logprobs(loaded.model, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i, entry in enumerate(got[1:]):
        assert entry.token_id == prompt[i + 1]
        assert entry.logprob == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-4)
        assert [lp for _, lp in entry.top] == pytest.approx(expected[i].topk(2).values.tolist(), abs=1e-4)
        assert [lp for _, lp in entry.top] == pytest.approx([float(expected[i, t]) for t, _ in entry.top], abs=1e-4)


def test_prompt_logprobs_of_n_choices_are_given_once(loaded, engine_of):
    prompt = prompts_of([20])[0]
    engine = engine_of(prefill_chunk=8)

    async def main():
        job = engine.submit(prompt, GenerationParams(SamplingParams(max_new_tokens=3, seed=1), n=3,
                                                     prompt_logprobs=0))
        ended = 0
        while ended < 3:
            piece = await job.queue.get()
            assert job.prompt_logprobs is not None and len(job.prompt_logprobs) == len(prompt)
            ended += piece.finish_reason is not None
        return job.prompt_logprobs

    got = asyncio.run(main())
    expected = full_forward_logprobs(loaded.model, prompt)
    assert [e.logprob for e in got[1:]] == pytest.approx([float(expected[i, t]) for i, t in enumerate(prompt[1:])],
                                                         abs=1e-4)
    assert all(e.top == [] for e in got[1:])


# -- the real SmolLM2 ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_second_turn_is_the_same_with_the_cache_on_or_off(smollm2_model):
    from camelid.chat import chat_template_for, encode_chat

    template = chat_template_for(smollm2_model)
    history = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]
    question = {"role": "user", "content": "Which of them is the longest?"}

    async def chat(engine):
        first = await answer(engine.submit(encode_chat(smollm2_model, template, history), greedy(60, False)))
        text = smollm2_model.tokenizer.decode(first)
        prompt = encode_chat(smollm2_model, template, [*history, {"role": "assistant", "content": text}, question])
        return first, prompt, await answer(engine.submit(prompt, greedy(30, False)))

    answers = {}
    for cache in (True, False):
        engine = BatchingEngine(smollm2_model, max_batch=2, max_len=1024, prefill_chunk=64, prefix_cache=cache)
        log = record_steps(engine)
        try:
            first, prompt, second = asyncio.run(chat(engine))
        finally:
            engine.close()
        answers[cache] = (first, second)
        prefilled = sum(take for kind, *rest in log if kind == "prefill" for take in rest[1:])
        assert (prefilled < len(prompt)) == cache  # with the cache, the second turn did not run the first again
    assert answers[True] == answers[False]
    assert answers[True][1] == alone(smollm2_model, prompt, 30, ignore_eos=False)
