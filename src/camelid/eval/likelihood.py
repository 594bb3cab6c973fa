"""Likelihood evaluation: the perplexity of texts and conversations, and multiple-choice accuracy.

Both score tokens the way lm-evaluation-harness does, so that a number here is the number lm-eval reports
through camelid's adapter (camelid.eval.lm_eval_adapter), and the tests hold them equal:

- A plain text is scored after one prefix token, BOS (or EOS for a vocabulary without one), as lm-eval's
  `loglikelihood_rolling`; every token of the text is predicted. A conversation is rendered with the chat
  template as for training (camelid.examples.make_example) and only its assistant tokens are scored.
- A sequence longer than `context` is scored in windows of at most `context` tokens. The first window
  predicts the first `context` tokens; each further window ends `stride` tokens later (the last one at the
  end) and holds the `context` tokens before its end, so every token is scored exactly once, after at least
  `context - stride + 1` tokens of history, or all the tokens before it when there are fewer. With `stride ==
  context` these are exactly lm-eval's rolling windows.
- A multiple-choice question is scored as lm-eval's `multiple_choice` tasks: the prompt
  "Question: {question}\\nAnswer:" followed by " " + choice, tokenised as lm-eval tokenises a (context,
  continuation) pair, each choice scored by the summed log-probability of its tokens. `acc` takes the likeliest
  choice; `acc_norm` divides each sum by the choice's length first (lm-eval's `acc_norm`: its characters).
"""

import contextlib
import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from camelid.chat import chat_template_for
from camelid.checkpoint import LoadedModel
from camelid.data.formats import BadRecord, Reading, Record, Skipped, iter_records
from camelid.data.sources import is_data_source
from camelid.errors import CamelidError
from camelid.model import IGNORE, Llama
from camelid.examples import make_example
from camelid.eval import NORMALISATIONS, PROMPT  # defined there, free of torch, for the command line's help

DELIMITER = " "  # lm-eval's default target_delimiter
LOGIT_CHUNK = 256  # positions projected to the vocabulary at a time (bounds memory for large vocabularies)


# -- scoring spans of tokens -------------------------------------------------------------------------------------


class Span(NamedTuple):
    """What to read from one input row: targets[i] is the token predicted at position start + i (IGNORE: none)."""

    row: int
    start: int
    targets: list[int]


class SpanScore(NamedTuple):
    logprob: float  # summed log-probability of the span's targets
    greedy: bool  # every target is the likeliest token at its position
    tokens: int  # targets scored


@torch.inference_mode()
def score_spans(
    model: Llama, rows: Sequence[list[int]], spans: Sequence[Span], *, batch_size: int = 8, progress: bool = False,
    desc: str = "scoring",
) -> list[SpanScore]:
    """Log-probabilities of `spans` of target tokens, running each input row once (causal, right-padded batches).

    Rows are batched longest first and, among equal lengths, by their tokens, so the same rows always meet in
    the same batches whatever order they are given in: a score does not depend on what else is scored with it.
    The progress bar counts the rows' tokens and moves after each decoder layer of a batch's forward pass and
    each chunk of its logits, not once a batch: one batch of long windows can take minutes on a CPU.
    """
    if batch_size < 1:
        raise CamelidError(f"invalid batch size {batch_size}: expected an integer >= 1")
    device = model.model.embed_tokens.weight.device
    by_row: list[list[int]] = [[] for _ in rows]
    for i, span in enumerate(spans):
        by_row[span.row].append(i)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), rows[r]))
    logprob = torch.zeros(len(spans), dtype=torch.float64)
    misses = torch.zeros(len(spans), dtype=torch.long)
    counts = torch.zeros(len(spans), dtype=torch.long)
    layers = len(model.model.layers)
    with tqdm(total=sum(len(r) for r in rows), desc=desc, unit="token", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            where_b, where_pos, targets, owner = _batch_targets(batch, by_row, spans)
            parts = layers + math.ceil(len(targets) / LOGIT_CHUNK)  # the batch's share of the bar, in steps
            step = _share_out(bar, sum(len(rows[r]) for r in batch), parts)
            if targets:
                tokens = torch.zeros(len(batch), len(rows[batch[0]]), dtype=torch.long)
                for b, r in enumerate(batch):
                    tokens[b, : len(rows[r])] = torch.tensor(rows[r])
                # Right padding needs no mask: under causal attention a real token never sees the padding after it.
                with _after_each_layer(model, step):
                    hidden = model.hidden(tokens.to(device))
                step(upto=layers)  # camelid's int8 kernels run all the layers in one call, unseen by the hooks
                where = torch.tensor(where_b, device=device), torch.tensor(where_pos, device=device)
                picked = hidden[where]  # [N, hidden]
                targets_t = torch.tensor(targets, device=device)
                owner_t = torch.tensor(owner)
                for s in range(0, len(targets), LOGIT_CHUNK):
                    logits = model.lm_head(picked[s : s + LOGIT_CHUNK]).float()  # the softmax in float32 at least
                    t = targets_t[s : s + LOGIT_CHUNK]
                    lp = logits.log_softmax(-1).gather(1, t[:, None]).squeeze(1)
                    miss = logits.argmax(-1) != t
                    who = owner_t[s : s + LOGIT_CHUNK]
                    logprob.index_add_(0, who, lp.double().cpu())
                    misses.index_add_(0, who, miss.long().cpu())
                    counts.index_add_(0, who, torch.ones(len(who), dtype=torch.long))
                    step()
            step(upto=parts)
    return [SpanScore(lp, m == 0, n) for lp, m, n in zip(logprob.tolist(), misses.tolist(), counts.tolist())]


def _batch_targets(batch: list[int], by_row: list[list[int]], spans: Sequence[Span]):
    """Where a batch's spans read: (batch row, position, target token, span index), one list of each."""
    where_b, where_pos, targets, owner = [], [], [], []
    for b, r in enumerate(batch):
        for i in by_row[r]:
            span = spans[i]
            for j, target in enumerate(span.targets):
                if target != IGNORE:
                    where_b.append(b)
                    where_pos.append(span.start + j)
                    targets.append(target)
                    owner.append(i)
    return where_b, where_pos, targets, owner


def _share_out(bar, amount: int, parts: int):
    """A function that moves `bar` on by `amount` in `parts` near-equal steps: one step a call, or up to step
    `upto`; never past the last."""
    done = 0

    def step(upto: int | None = None) -> None:
        nonlocal done
        new = min(parts, done + 1 if upto is None else max(done, upto))
        bar.update(amount * new // parts - amount * done // parts)
        done = new

    return step


@contextlib.contextmanager
def _after_each_layer(model: Llama, call):
    """Call `call()` after each decoder layer's forward pass while the block runs."""
    hooks = [layer.register_forward_hook(lambda *_: call()) for layer in model.model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# -- tokenising as lm-eval does ----------------------------------------------------------------------------------


def prefix_token(tokenizer) -> int | None:
    """The token a text is scored after: BOS, or EOS for a vocabulary without BOS (lm-eval's prefix_token_id)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokens of `text` with the tokenizer's own special tokens (BOS where the model adds one), unless the text
    already starts with the prefix token's text (lm-eval's tok_encode for a causal model)."""
    prefix = prefix_token(tokenizer)
    written = prefix is not None and text.startswith(tokenizer.decode([prefix]))
    return tokenizer.encode(text, add_special=not written)


def encode_continuations(tokenizer, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The context's tokens (encoded once) and each continuation's, split as lm-eval splits a pair.

    Whitespace ending the context is moved to the front of each continuation; a continuation's tokens are
    those of context + continuation after as many tokens as the context alone has.
    """
    kept = context.rstrip()
    if not kept:
        raise ValueError("the context must hold more than whitespace")
    moved = context[len(kept) :]
    context_ids = encode_text(tokenizer, kept)
    return context_ids, [encode_text(tokenizer, kept + moved + c)[len(context_ids) :] for c in continuations]


def continuation_scores(
    model: Llama, pairs: Sequence[tuple[list[int], list[int]]], *, context: int | None = None, batch_size: int = 16,
    progress: bool = False,
) -> list[SpanScore]:
    """The log-probability of each continuation's tokens after its context's, and whether greedy decoding makes it.

    Each pair runs as one row, context + continuation less its last token, cut from the left to `context`
    tokens (default: the model's context) when longer, as lm-eval does. Pairs with the same row (one-token
    continuations of one context) share a single run.
    """
    window = context or model.config.max_sequence_length
    rows: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    spans = []
    for context_ids, cont_ids in pairs:
        if not context_ids or not cont_ids:
            raise ValueError("a pair needs at least one context token and one continuation token")
        if len(cont_ids) > window:
            raise CamelidError(f"a continuation of {len(cont_ids)} tokens does not fit the context of {window}")
        row = (context_ids + cont_ids)[-(window + 1) :][:-1]
        r = index.setdefault(tuple(row), len(rows))
        if r == len(rows):
            rows.append(row)
        spans.append(Span(r, len(row) - len(cont_ids), cont_ids))
    return score_spans(model, rows, spans, batch_size=batch_size, progress=progress, desc="choices")


# -- perplexity --------------------------------------------------------------------------------------------------


@dataclass
class TextScore:
    tokens: int  # tokens scored
    nll: float  # their summed negative log-likelihood, in nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


@dataclass
class PerplexityResult:
    tokens: int  # tokens scored, all texts together
    nll: float  # their summed negative log-likelihood, in nats
    ppl: float  # exp(nll / tokens)
    per_text: list[TextScore]
    context: int
    stride: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token: the training loss's measure."""
        return self.nll / self.tokens


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, first, end) over positions 0..n-1: run positions start..end-1, score first..end-1.

    Every position is scored once; each window after the first ends `stride` later (the last at n) and starts
    `context` before its end.
    """
    if n <= 0:
        return []
    end = min(context, n)
    out = [(0, 0, end)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((max(0, new_end - context), end, new_end))
        end = new_end
    return out


def text_example(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokens and targets (the next token at each position, IGNORE after the last) of a plain text."""
    prefix = prefix_token(tokenizer)
    ids = tokenizer.encode(text, add_special=False)
    tokens = ([prefix] if prefix is not None else []) + ids
    return tokens, tokens[1:] + [IGNORE]


def sequence_nll(
    model: Llama, examples: Sequence[tuple[list[int], list[int]]], *, context: int, stride: int,
    batch_size: int = 8, progress: bool = False,
) -> list[TextScore]:
    """Summed NLL of the targets of each (tokens, targets) example, in sliding windows (see `windows`)."""
    rows, spans, owner = [], [], []
    for k, (tokens, targets) in enumerate(examples):
        scored = [i for i, t in enumerate(targets) if t != IGNORE]
        n = scored[-1] + 1 if scored else 0
        for start, first, end in windows(n, context, stride):
            if any(t != IGNORE for t in targets[first:end]):
                spans.append(Span(len(rows), first - start, targets[first:end]))
                rows.append(tokens[start:end])
                owner.append(k)
    scores = score_spans(model, rows, spans, batch_size=batch_size, progress=progress, desc="perplexity")
    out = [TextScore(0, 0.0) for _ in examples]
    for k, score in zip(owner, scores):
        out[k].tokens += score.tokens
        out[k].nll -= score.logprob
    return out


def perplexity(
    loaded: LoadedModel,
    texts: Sequence[str | list[dict]],
    *,
    template: str | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the model on `texts`: plain strings (every token scored) or conversations as messages
    (only the assistant tokens, rendered with the chat template as for training).

    template: a built-in chat template's name for the conversations; None uses the model's own.
    context: the most tokens in one forward pass, i.e. of history for a token (default: the model's context).
    stride: how far each further window moves (default context // 2): every token gets at least
        context - stride + 1 tokens of history. stride == context is lm-eval's rolling windows: faster, but the
        tokens just after each window's start see little history.
    batch_size: windows per forward pass.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = model.config.max_sequence_length
    context = limit if context is None else context
    if not 1 <= context <= limit:
        raise CamelidError(f"invalid context {context}: expected 1 to {limit} (the model's context)")
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise CamelidError(f"invalid stride {stride}: expected 1 to the context, {context}")
    chat = None  # the template, made when the first conversation comes
    examples = []
    for text in texts:
        if isinstance(text, str):
            examples.append(text_example(tokenizer, text))
        else:  # messages, or {"messages", "tools"}
            chat = chat or chat_template_for(loaded, template)
            messages, tools = (text["messages"], text.get("tools")) if isinstance(text, dict) else (text, None)
            example = make_example(chat, tokenizer, messages, tools)
            examples.append((example.tokens, example.targets))
    per_text = sequence_nll(model, examples, context=context, stride=stride, batch_size=batch_size, progress=progress)
    tokens = sum(s.tokens for s in per_text)
    if tokens == 0:
        raise CamelidError("nothing to score: the texts are empty or the conversations have no assistant answer")
    nll = sum(s.nll for s in per_text)
    return PerplexityResult(tokens, nll, math.exp(nll / tokens), per_text, context, stride)


def read_texts(path, *, skip_bad: bool = False, reading: Reading | None = None) -> tuple[list, list[Skipped]]:
    """The texts of a source for `perplexity`, and the records skipped (with `skip_bad`).

    A data source (JSON/JSONL, Parquet, a datasets folder, ...: camelid.data.sources) holds records with a
    `text` string (a plain text) or a conversation in any format camelid trains on, read as `reading` says and
    scored as training learns it (its assistant turns; a pair's chosen answer; a KTO row's answer only when it
    is desirable); a source may mix them. A file of any other suffix is one plain text, whole.
    """
    if not is_data_source(path):
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CamelidError(f"{path}: no such file") from None
        except UnicodeDecodeError:
            raise CamelidError(f"{path}: not UTF-8 text") from None
        if not text.strip():
            raise CamelidError(f"{path}: the file is empty; nothing to score")
        return [text], []
    reading = reading or Reading()
    texts: list = []
    skipped: list[Skipped] = []
    undesirable = 0
    for item in iter_records(path, functools.partial(_text_or_record, reading), skip_bad=skip_bad):
        if isinstance(item, Skipped):
            skipped.append(item)
        elif isinstance(item, str):
            texts.append(item)
        elif item.for_sft() is None:
            undesirable += 1
        else:
            texts.append({"messages": item.messages, "tools": item.tools} if item.tools else item.messages)
    if undesirable:
        print(f"camelid: {path}: left out {undesirable:,} KTO answers labelled undesirable, as training does",
              file=sys.stderr)
    if not texts:
        raise CamelidError(f"{path}: no text or conversation to score")
    return texts, skipped


def _text_or_record(reading: Reading, value, where: str) -> str | Record:
    if isinstance(value, dict) and "text" in value and reading.format is None:
        if not isinstance(value["text"], str):
            raise BadRecord(where, "'text' is not a string")
        if not value["text"].strip():
            raise BadRecord(where, "empty text")
        return value["text"]
    return reading.record(value, where)


# -- multiple choice ---------------------------------------------------------------------------------------------


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int  # index of the right choice
    where: str = ""  # "path:line", for messages


@dataclass
class ChoiceScore:
    answer: int
    logprobs: list[float]  # per choice: summed log-probability of its tokens after the prompt
    lengths: list[float]  # per choice: what acc_norm divides by
    greedy: list[bool]  # per choice: greedy decoding would produce it

    @property
    def pred(self) -> int:
        return _argmax(self.logprobs)

    @property
    def pred_norm(self) -> int:
        return _argmax([lp / n for lp, n in zip(self.logprobs, self.lengths)])


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    acc_stderr: float  # standard error of the mean, as lm-eval reports it
    acc_norm_stderr: float
    normalise: str
    per_question: list[ChoiceScore] = field(repr=False)

    @property
    def questions(self) -> int:
        return len(self.per_question)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


def _stderr(values: list[float]) -> float:
    """lm-eval's mean_stderr: the sample standard deviation over sqrt(n)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def check_question(record, where: str) -> Question:
    """A `{"question", "choices", "answer"}` record as a Question; `answer` is an index or the right choice's
    text. Raises BadRecord naming what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(where, "not a JSON object")
    for key in ("question", "choices", "answer"):
        if key not in record:
            raise BadRecord(where, f"missing '{key}'", "expected question, choices and answer")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise BadRecord(where, "'question' is not a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRecord(where, "'choices' is not a list of two or more")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRecord(where, "a choice is not a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise BadRecord(where, "'answer' is neither an index nor a choice's text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise BadRecord(where, "'answer' index out of range", f"{answer} for {len(choices)} choices, from 0")
        return Question(question, choices, answer, where)
    matches = [i for i, c in enumerate(choices) if c == answer]
    if len(matches) != 1:
        reason = "'answer' is not one of the choices" if not matches else "'answer' matches several choices"
        raise BadRecord(where, reason, f"{answer!r}")
    return Question(question, choices, matches[0], where)


def read_questions(path, *, skip_bad: bool = False) -> tuple[list[Question], list[Skipped]]:
    """The multiple-choice questions of a JSONL (or JSON array) file, and the records skipped (with `skip_bad`)."""
    questions, skipped = [], []
    for item in iter_records(path, check_question, skip_bad=skip_bad):
        (skipped if isinstance(item, Skipped) else questions).append(item)
    if not questions:
        raise CamelidError(f"{path}: no questions")
    return questions, skipped


def choice_accuracy(
    loaded: LoadedModel,
    questions: Sequence[Question | dict],
    *,
    normalise: str = "chars",
    prompt: str = PROMPT,
    batch_size: int = 16,
    progress: bool = True,
) -> ChoiceResult:
    """Accuracy on multiple-choice questions, scored as lm-eval scores a `multiple_choice` task.

    normalise: what acc_norm divides a choice's log-probability by: "chars", its length in characters (lm-eval's
        acc_norm); "bytes", in UTF-8 bytes (lm-eval's acc_bytes); "tokens", its tokens; "none" (acc_norm = acc).
    prompt: the text before the choice; "{question}" is replaced by the question. The choice follows after a
        space.
    batch_size: prompt + choice sequences per forward pass.
    """
    if normalise not in NORMALISATIONS:
        raise CamelidError(f"unknown normalisation {normalise!r}; choose one of: {', '.join(NORMALISATIONS)}")
    if "{question}" not in prompt:
        raise CamelidError(f"the prompt {prompt!r} has no {{question}} placeholder; add one where the question goes")
    checked = [q if isinstance(q, Question) else check_question(q, f"question {i}") for i, q in enumerate(questions, 1)]
    if not checked:
        raise CamelidError("no questions to score")
    tokenizer = loaded.tokenizer
    pairs, token_counts = [], []
    for q in checked:
        context_ids, conts = encode_continuations(
            tokenizer, prompt.replace("{question}", q.question), [DELIMITER + c for c in q.choices]
        )
        for choice, cont in zip(q.choices, conts):
            if not cont:
                raise CamelidError(f"{q.where}: choice {choice!r} adds no token to the prompt; reword the choice")
            pairs.append((context_ids, cont))
            token_counts.append(len(cont))
    scores = continuation_scores(loaded.model, pairs, batch_size=batch_size, progress=progress)
    per_question, k = [], 0
    for q in checked:
        n = len(q.choices)
        lengths = {
            "chars": [float(len(c)) for c in q.choices],
            "bytes": [float(len(c.encode("utf-8"))) for c in q.choices],
            "tokens": [float(t) for t in token_counts[k : k + n]],
            "none": [1.0] * n,
        }[normalise]
        got = scores[k : k + n]
        per_question.append(ChoiceScore(q.answer, [s.logprob for s in got], lengths, [s.greedy for s in got]))
        k += n
    hits = [float(s.pred == s.answer) for s in per_question]
    hits_norm = [float(s.pred_norm == s.answer) for s in per_question]
    return ChoiceResult(
        acc=sum(hits) / len(hits),
        acc_norm=sum(hits_norm) / len(hits_norm),
        acc_stderr=_stderr(hits),
        acc_norm_stderr=_stderr(hits_norm),
        normalise=normalise,
        per_question=per_question,
    )
