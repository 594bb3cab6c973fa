"""The lm-evaluation-harness adapter: equal to lm-eval's own Hugging Face backend on the same model, and lm-eval
runs of a local multiple-choice task equal to `camelid eval choice`."""

import json

import pytest
import torch
from helpers import FIXTURES, lm_eval_task

from camelid.checkpoint import load_model
from camelid.eval.likelihood import choice_accuracy, encode_continuations, perplexity, read_questions, windows
from camelid.generate import SamplingParams, generate

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance

from camelid.eval.lm_eval_adapter import CamelidLM

QUESTIONS = FIXTURES / "choice_questions.jsonl"
TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. Their wool "
    "is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions."
)
def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_windows_are_lm_evals_rolling_windows():
    """With stride == context, camelid's windows are lm-eval's: the same inputs predicting the same tokens."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for context in range(1, 13):
        for n in range(1, 60):
            tokens = list(range(100, 100 + n))
            theirs = [
                ((ctx + cont)[-(context + 1) :][:-1], cont)
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, -1, context, 1))
            ]
            seq = [-1] + tokens  # the prefix token, then the text
            ours = [(seq[start:end], seq[first + 1 : end + 1]) for start, first, end in windows(n, context, context)]
            assert ours == theirs, (context, n)


@pytest.fixture(scope="module")
def hflm(tiny_chat_dir):
    """lm-eval's own Hugging Face backend on the tiny model, with a short context so that windows and cuts show."""
    from lm_eval.models.huggingface import HFLM

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=48, device="cpu")


def test_pairs_split_as_lm_eval_splits_them(tiny_chat_loaded):
    lm = CamelidLM(tiny_chat_loaded)
    pairs = [("Question: Why?\nAnswer:", " because"), ("Answer: ", "yes"), ("x\n\n", " 42"), ("naïve", " café")]
    for context, cont in pairs:
        context_ids, (cont_ids,) = encode_continuations(tiny_chat_loaded.tokenizer, context, [cont])
        assert lm._encode_pair(context, cont) == (context_ids, cont_ids)


def test_tokens_as_lm_eval_for_a_tokenizer_that_adds_bos(tiny_chat_dir, hflm, tmp_path):
    """BOS is added unless the text already starts with it written out (a chat-templated context)."""
    import shutil

    from lm_eval.models.huggingface import HFLM

    from camelid.eval.likelihood import encode_text
    from camelid.tokenizer import load_tokenizer

    directory = tmp_path / "bos"
    shutil.copytree(tiny_chat_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ours = load_tokenizer(directory)
    ours.save(directory)  # its tokenizer.json now adds BOS itself, which transformers follows
    theirs = HFLM(pretrained=hflm.model, tokenizer=transformers.AutoTokenizer.from_pretrained(directory), device="cpu")
    for text in ["Hello there", "<|im_start|>user\nHi<|im_end|>\n", " <|im_start|>"]:
        assert encode_text(ours, text) == theirs.tok_encode(text)
    assert encode_text(ours, "Hello")[0] == ours.bos_id and ours.add_bos


def test_adapter_equals_lm_evals_hf_backend(tiny_chat_loaded, hflm):
    lm = CamelidLM(tiny_chat_loaded, batch_size=3, max_length=48)
    pairs = [
        ("Question: What do bees make?\nAnswer:", " honey"),
        ("Question: What do bees make?\nAnswer:", " milk and more milk"),
        ("", "An empty context is scored after BOS."),
        ("Trailing space ", "moves"),
        ("word " * 60, " a context cut from the left"),  # longer than max_length
    ]
    ours = lm.loglikelihood([request("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    theirs = hflm.loglikelihood([request("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)

    texts = [TEXT, "Short."]  # TEXT spans several windows of 48 tokens
    ours = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    theirs = hflm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-5)

    greedy = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    asks = [
        request("generate_until", "Question: What do bees make?\nAnswer:", greedy),
        request("generate_until", "Llamas are", {"until": "zzz", "max_gen_toks": 5}),
    ]
    assert lm.generate_until(asks, disable_tqdm=True) == hflm.generate_until(asks, disable_tqdm=True)


@pytest.mark.slow
def test_lm_eval_multiple_choice_equals_camelid_eval_choice(smollm2_gguf, tmp_path):
    """A local task in lm-eval's own format, run by lm-eval on the adapter: its acc and acc_norm are exactly
    `camelid eval choice`'s on the same questions; rolling log-likelihood is perplexity's; generation is greedy
    camelid generation cut at the stop string."""
    from lm_eval.tasks import TaskManager

    loaded = load_model(smollm2_gguf, device="cpu", dtype="float32")
    questions, _ = read_questions(QUESTIONS)
    data = tmp_path / "questions.jsonl"  # answers as indices: a JSON column must have one type
    rows = [{"question": q.question, "choices": q.choices, "answer": q.answer} for q in questions]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "camelid_choice_test.yaml").write_text(lm_eval_task("camelid_choice_test", data, tmp_path / "cache"))

    lm = CamelidLM(loaded, batch_size=16)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # indexing lm-eval's own tasks takes 20 s
    out = lm_eval.simple_evaluate(model=lm, tasks=["camelid_choice_test"], task_manager=manager)
    got = out["results"]["camelid_choice_test"]
    expected = choice_accuracy(loaded, questions, batch_size=16, progress=False)
    assert expected.questions == len(questions) == 22
    assert got["acc,none"] == expected.acc
    assert got["acc_norm,none"] == expected.acc_norm
    assert got["acc_stderr,none"] == pytest.approx(expected.acc_stderr, rel=1e-12)
    # a real model, right well above chance (1/4), and the two measures disagreeing on some questions
    assert expected.acc > 0.45 and any(s.pred != s.pred_norm for s in expected.per_question)

    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)], disable_tqdm=True)
    ppl = perplexity(loaded, [TEXT], context=32, stride=32, progress=False)  # windows show at 32 tokens
    [short] = CamelidLM(loaded, max_length=32).loglikelihood_rolling(
        [request("loglikelihood_rolling", TEXT)], disable_tqdm=True
    )
    assert short == pytest.approx(-ppl.nll, rel=1e-6)
    assert rolling == pytest.approx(-perplexity(loaded, [TEXT], stride=8192, progress=False).nll, rel=1e-6)
    assert rolling > short  # full history predicts better than windows of 32

    prompt = "The capital of France is"
    ask = request("generate_until", prompt, {"until": ["."], "max_gen_toks": 24, "do_sample": False})
    [text] = lm.generate_until([ask], disable_tqdm=True)
    ids = loaded.tokenizer.encode(prompt)
    [free] = generate(loaded.model, loaded.tokenizer, [ids], SamplingParams(max_new_tokens=24, temperature=0))
    params = SamplingParams(max_new_tokens=24, temperature=0, stop=["."])
    [cut] = generate(loaded.model, loaded.tokenizer, [ids], params)
    assert "." in free.text and text == cut.text == free.text[: free.text.index(".")]
