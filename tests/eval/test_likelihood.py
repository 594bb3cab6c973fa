"""Perplexity and multiple-choice scores against transformers: the same model's log-softmax, token by token."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import FIXTURES

from camelid.errors import CamelidError
from camelid.eval.likelihood import (
    PROMPT,
    choice_accuracy,
    encode_continuations,
    perplexity,
    read_questions,
    read_texts,
    windows,
)
from camelid.model import IGNORE

transformers = pytest.importorskip("transformers")

QUESTIONS = FIXTURES / "choice_questions.jsonl"
TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. Their wool "
    "is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions. "
    "When using a pack, they can carry about 25 to 30% of their body weight for 8 to 13 km."
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is a llama?"},
    {"role": "assistant", "content": "A llama is a domesticated South American camelid."},
    {"role": "user", "content": "Can it carry things?"},
    {"role": "assistant", "content": "Yes, about a quarter of its body weight."},
]


@pytest.fixture(scope="module")
def hf_tiny(tiny_chat_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_chat_dir)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for `ids`, [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def text_ids(hf_tokenizer, text: str) -> list[int]:
    """The tokens camelid scores a text as: BOS, then the text, tokenised by transformers."""
    return [hf_tokenizer.bos_token_id] + hf_tokenizer(text, add_special_tokens=False).input_ids


# -- windows -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context,stride", [(1, 1), (5, 1), (5, 2), (5, 5), (8, 3), (16, 16)])
def test_windows_score_each_position_once_with_its_history(context, stride):
    for n in range(40):
        spans = windows(n, context, stride)
        scored = [p for _, first, end in spans for p in range(first, end)]
        assert scored == list(range(n))
        for k, (start, first, end) in enumerate(spans):
            assert end - start <= context
            if k:
                assert first - start >= min(context - stride, first)  # history before the first scored position
                assert start == max(0, end - context)  # every window is as full as it can be
        assert not spans or spans[-1][2] == n


# -- perplexity against transformers -----------------------------------------------------------------------------


def test_short_text_is_the_sum_of_log_softmax(tiny_chat_loaded, hf_tiny):
    hf, hf_tok = hf_tiny
    ids = text_ids(hf_tok, "Llamas are social animals and live with others as a herd.")
    lp = hf_logprobs(hf, ids)
    expected = -sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    result = perplexity(tiny_chat_loaded, ["Llamas are social animals and live with others as a herd."], progress=False)
    assert result.tokens == len(ids) - 1  # every token of the text, the first after BOS
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected / result.tokens), rel=1e-5)
    assert result.per_text[0].nll == result.nll


def test_sliding_window_equals_the_transformers_recipe(tiny_chat_loaded, hf_tiny):
    """The perplexity guide of transformers (windows of context + 1 tokens moved by `stride`, labels masked
    to the tokens not scored before), on a length where its last window is as full as camelid's."""
    hf, hf_tok = hf_tiny
    ids = text_ids(hf_tok, TEXT)
    n, stride = len(ids), 16
    context = n - 1 - 4 * stride
    assert context > stride
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context + 1, n)
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(window, labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        nll += loss * scored
        count += scored
        prev_end = end
        if end == n:
            break
    result = perplexity(tiny_chat_loaded, [TEXT], context=context, stride=stride, progress=False)
    assert len(windows(n - 1, context, stride)) == 5
    assert result.tokens == count == n - 1
    assert result.nll == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("context,stride", [(40, 16), (40, 40), (23, 7)])
def test_every_token_gets_the_history_documented(tiny_chat_loaded, hf_tiny, context, stride):
    """Token by token, with transformers: windows end at context, context + stride, ... and at the end; a token
    is predicted from the `context` tokens before its window's end (all before it, when fewer)."""
    hf, hf_tok = hf_tiny
    ids = text_ids(hf_tok, TEXT[:300])
    n = len(ids) - 1  # positions that predict a token
    ends = [min(context, n)]
    while ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    expected = 0.0
    for p in range(n):
        end = next(e for e in ends if e > p)
        history = ids[max(0, end - context) : p + 1]
        expected -= hf_logprobs(hf, history)[-1, ids[p + 1]].item()
    result = perplexity(tiny_chat_loaded, [TEXT[:300]], context=context, stride=stride, progress=False)
    assert result.tokens == n
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_conversation_scores_its_assistant_tokens_as_training_does(tiny_chat_loaded, hf_tiny):
    from camelid.chat import chat_template_for
    from camelid.examples import make_example

    hf, _ = hf_tiny
    example = make_example(chat_template_for(tiny_chat_loaded), tiny_chat_loaded.tokenizer, CONVERSATION)
    lp = hf_logprobs(hf, example.tokens)
    expected = -sum(lp[i, t].item() for i, t in enumerate(example.targets) if t != IGNORE)
    result = perplexity(tiny_chat_loaded, [CONVERSATION], progress=False)
    assert result.tokens == example.supervised < len(example.tokens) // 2
    assert result.nll == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # the training loss of the same example, summed
        loss = tiny_chat_loaded.model(torch.tensor([example.tokens]), targets=torch.tensor([example.targets])).item()
    assert result.nll == pytest.approx(loss, rel=1e-5)
    # in windows shorter than the conversation, the same tokens are scored
    assert perplexity(tiny_chat_loaded, [CONVERSATION], context=12, stride=5, progress=False).tokens == result.tokens


def test_texts_batched_together_score_as_alone(tiny_chat_loaded):
    texts = [TEXT, TEXT[:50], "Short.", TEXT[100:], CONVERSATION]
    together = perplexity(tiny_chat_loaded, texts, context=48, stride=20, batch_size=8, progress=False)
    alone = [perplexity(tiny_chat_loaded, [t], context=48, stride=20, batch_size=1, progress=False) for t in texts]
    for got, want in zip(together.per_text, alone):
        assert got.tokens == want.tokens
        assert got.nll == pytest.approx(want.nll, rel=1e-5)
    assert together.nll == pytest.approx(sum(a.nll for a in alone), rel=1e-5)
    assert together.tokens == sum(a.tokens for a in alone)


def test_progress_moves_inside_a_batch_and_changes_no_score(tiny_chat_loaded, monkeypatch):
    """One batch of windows moves the bar after each decoder layer and each chunk of logits, so the bar moves
    during the forward pass (a big batch ran 303 s without a tick, issue 17), and the scores stay the same."""
    import io

    from tqdm import tqdm

    from camelid.eval import likelihood

    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "file": io.StringIO()})
            self.moves = []
            bars.append(self)

        def update(self, n=1):
            self.moves.append(n)
            return super().update(n)

    monkeypatch.setattr(likelihood, "tqdm", Recorded)
    model, tokenizer = tiny_chat_loaded.model, tiny_chat_loaded.tokenizer
    texts = [TEXT * 4, TEXT]  # one window each, in one batch, with more targets than one chunk of logits
    targets = sum(len(tokenizer.encode(t, add_special=False)) for t in texts)
    assert targets > likelihood.LOGIT_CHUNK
    at_the_head = []  # where the bar stood when the forward pass ended and the logits began
    hook = model.lm_head.register_forward_pre_hook(lambda *_: at_the_head.append(bars[0].n))
    try:
        shown = perplexity(tiny_chat_loaded, texts, batch_size=8, progress=True)
    finally:
        hook.remove()
    bar = bars[0]
    assert bar.total == bar.n == shown.tokens  # the positions run: in a plain text, one per token scored
    chunks = -(-targets // likelihood.LOGIT_CHUNK)
    assert len([m for m in bar.moves if m > 0]) == len(model.model.layers) + chunks
    assert 0 < at_the_head[0] < bar.total

    quiet = perplexity(tiny_chat_loaded, texts, batch_size=8, progress=False)
    assert (shown.nll, shown.tokens) == (quiet.nll, quiet.tokens)
    assert [(s.nll, s.tokens) for s in shown.per_text] == [(s.nll, s.tokens) for s in quiet.per_text]


def test_perplexity_rejects_bad_settings(tiny_chat_loaded):
    with pytest.raises(CamelidError, match="invalid context 5000: expected 1 to 1024"):
        perplexity(tiny_chat_loaded, [TEXT], context=5000, progress=False)
    with pytest.raises(CamelidError, match="invalid stride 65"):
        perplexity(tiny_chat_loaded, [TEXT], context=64, stride=65, progress=False)
    with pytest.raises(CamelidError, match="nothing to score"):
        perplexity(tiny_chat_loaded, [""], progress=False)
    with pytest.raises(CamelidError, match="unknown chat template"):
        perplexity(tiny_chat_loaded, [CONVERSATION], template="nope", progress=False)


# -- reading texts -----------------------------------------------------------------------------------------------


def test_read_texts(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("line one\nline two\n")
    assert read_texts(txt) == (["line one\nline two\n"], [])
    data = tmp_path / "mixed.jsonl"
    records = [{"text": "plain"}, {"messages": CONVERSATION}, {"instruction": "Say hi", "output": "Hi!"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts, skipped = read_texts(data)
    assert texts[0] == "plain" and texts[1] == CONVERSATION and skipped == []
    assert texts[2] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]

    data.write_text('{"text": "fine"}\n{"text": 3}\n{"text": "  "}\n')
    with pytest.raises(CamelidError, match=r"mixed.jsonl:2: 'text' is not a string"):
        read_texts(data)
    texts, skipped = read_texts(data, skip_bad=True)
    assert texts == ["fine"] and [s.reason for s in skipped] == ["'text' is not a string", "empty text"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(CamelidError, match="empty.txt: the file is empty"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(CamelidError, match="no such file"):
        read_texts(tmp_path / "missing.txt")


# -- multiple choice ---------------------------------------------------------------------------------------------


def reference_choice_scores(hf, hf_tok, question: str, choices: list[str]) -> list[tuple[float, bool]]:
    """lm-eval's recipe with transformers: the continuation's tokens are those of prompt + " " + choice after as
    many as the prompt alone has; the row is prompt + continuation less its last token."""
    context = PROMPT.replace("{question}", question)
    ctx = hf_tok(context).input_ids
    out = []
    for choice in choices:
        cont = hf_tok(context + " " + choice).input_ids[len(ctx) :]
        lp = hf_logprobs(hf, ctx + cont[:-1])[len(ctx) - 1 :]
        logprob = sum(lp[j, t].item() for j, t in enumerate(cont))
        out.append((logprob, all(lp[j].argmax().item() == t for j, t in enumerate(cont))))
    return out


def test_choice_scores_equal_transformers(tiny_chat_loaded, hf_tiny):
    hf, hf_tok = hf_tiny
    questions, _ = read_questions(QUESTIONS)
    questions = questions[:8]
    result = choice_accuracy(tiny_chat_loaded, questions, batch_size=5, progress=False)
    hits = hits_norm = 0
    for q, got in zip(questions, result.per_question):
        expected = reference_choice_scores(hf, hf_tok, q.question, q.choices)
        assert got.logprobs == pytest.approx([lp for lp, _ in expected], abs=1e-4)
        assert got.greedy == [g for _, g in expected]
        lls = [lp for lp, _ in expected]
        hits += max(range(len(lls)), key=lls.__getitem__) == q.answer
        hits_norm += max(range(len(lls)), key=lambda i: lls[i] / len(q.choices[i])) == q.answer
    assert result.questions == 8
    assert result.acc == hits / 8 and result.acc_norm == hits_norm / 8
    p = result.acc
    assert result.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) * 8 / 7 / 8))


def test_batch_size_does_not_change_choice_scores(tiny_chat_loaded):
    questions, _ = read_questions(QUESTIONS)
    one = choice_accuracy(tiny_chat_loaded, questions[:6], batch_size=1, progress=False)
    many = choice_accuracy(tiny_chat_loaded, questions[:6], batch_size=64, progress=False)
    for a, b in zip(one.per_question, many.per_question):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_normalisations(tiny_chat_loaded):
    q = {"question": "Which is a drink?", "choices": ["café", "stone", "a very long answer indeed"], "answer": "café"}
    results = {n: choice_accuracy(tiny_chat_loaded, [q], normalise=n, progress=False) for n in ("chars", "bytes", "tokens", "none")}
    assert results["chars"].per_question[0].lengths == [4.0, 5.0, 25.0]
    assert results["bytes"].per_question[0].lengths == [5.0, 5.0, 25.0]  # é is two bytes
    context = PROMPT.replace("{question}", q["question"])
    _, conts = encode_continuations(tiny_chat_loaded.tokenizer, context, [" " + c for c in q["choices"]])
    assert results["tokens"].per_question[0].lengths == [float(len(c)) for c in conts]
    for r in results.values():
        s = r.per_question[0]
        assert s.logprobs == results["chars"].per_question[0].logprobs
        assert s.pred_norm == max(range(3), key=lambda i: s.logprobs[i] / s.lengths[i])
    assert results["none"].acc_norm == results["none"].acc
    with pytest.raises(CamelidError, match="unknown normalisation 'words'"):
        choice_accuracy(tiny_chat_loaded, [q], normalise="words", progress=False)


def test_context_and_continuation_split_as_lm_eval(tiny_chat_loaded, hf_tiny):
    """Trailing whitespace of the prompt moves to the continuation; the continuation is the rest of the whole."""
    _, hf_tok = hf_tiny
    pairs = [("Answer: ", "yes"), ("Answer:\n\n", " 42"), ("Q: 12", "34"), ("naïve", " café"), ("A", " \t B")]
    for context, cont in pairs:
        kept = context.rstrip()
        whole = hf_tok(context + cont).input_ids
        ctx_ids, (cont_ids,) = encode_continuations(tiny_chat_loaded.tokenizer, context, [cont])
        assert ctx_ids == hf_tok(kept).input_ids
        assert cont_ids == whole[len(ctx_ids) :]


def test_answer_as_index_or_text(tiny_chat_loaded):
    by_index = {"question": "What do bees make?", "choices": ["milk", "honey"], "answer": 1}
    by_text = {**by_index, "answer": "honey"}
    a, b = (choice_accuracy(tiny_chat_loaded, [q], progress=False) for q in (by_index, by_text))
    assert a.per_question[0].answer == b.per_question[0].answer == 1
    assert a.per_question[0].logprobs == b.per_question[0].logprobs


@pytest.mark.parametrize(
    "record,message",
    [
        ({"question": "Q?", "choices": ["a", "b"]}, "missing 'answer'"),
        ({"question": "Q?", "choices": ["a"], "answer": 0}, "'choices' is not a list of two or more"),
        ({"question": "Q?", "choices": ["a", ""], "answer": 0}, "a choice is not a non-empty string"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, r"'answer' index out of range \(2 for 2 choices"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": "c"}, "'answer' is not one of the choices"),
        ({"question": "Q?", "choices": ["a", "a"], "answer": "a"}, "'answer' matches several choices"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": True}, "'answer' is neither an index nor a choice"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "'question' is not a non-empty string"),
        (["Q?", "a", "b"], "not a JSON object"),
    ],
)
def test_bad_questions_are_named(tmp_path, record, message):
    path = tmp_path / "q.jsonl"
    good = {"question": "Q?", "choices": ["a", "b"], "answer": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(CamelidError, match=rf"q.jsonl:2: {message}"):
        read_questions(path)
    questions, skipped = read_questions(path, skip_bad=True)
    assert len(questions) == 1 and skipped[0].where.endswith("q.jsonl:2")


def test_choice_rejects_a_prompt_without_the_question(tiny_chat_loaded):
    with pytest.raises(CamelidError, match="no {question} placeholder"):
        choice_accuracy(tiny_chat_loaded, [{"question": "Q?", "choices": ["a", "b"], "answer": 1}], prompt="A:", progress=False)


def test_importing_camelid_does_not_import_lm_eval():
    code = "import sys, camelid.cli, camelid.eval.likelihood; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
