"""Answers to a question set (FastChat's MT-bench or Vicuna-bench files), for an LLM judge to grade.

A question has one or more turns; the model answers the first, and each later turn is asked in the same
conversation, after the model's own earlier answers. The answers come from a camelid model in this process
(continuous batching on `camelid serve`'s engine: up to `batch_size` answers decode together, and a finished
one's row takes the next question) or from any OpenAI-compatible endpoint (questions in flight at once, up to the
client's concurrency). Either way, each request is seeded from the run's seed, the question and the turn.

Each question is answered at its category's temperature, FastChat's MT-bench defaults unless overridden:
greedy (0) where there is one right answer (math, coding, reasoning, extraction), a little randomness for
knowledge (stem, humanities: 0.1) and 0.7 for writing, role play and anything else. Sampling draws from the
model's whole distribution at that temperature (no top-k/top-p/min-p), as an OpenAI-style endpoint does by
default, so both backends sample alike.

The output is FastChat's answer file, one JSON object a line:

    {"question_id": 81, "answer_id": "...", "model_id": "my-model",
     "choices": [{"index": 0, "turns": ["first answer", "second answer"]}], "tstamp": 1700000000.0}

Each answered question is appended and fsync'ed at once. Running again with the same output resumes: question
ids already in the file are skipped (a line torn by a crash is cut off first, as in `camelid data
selfinstruct`). When every selected question is answered the file is rewritten, all at once, in the order of
the question file, as FastChat sorts its answer files.
"""

import asyncio
import concurrent.futures
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camelid.client import ChatClient
from camelid.data.formats import strict_records
from camelid.pipeline_report import Report
from camelid.errors import CamelidError
from camelid.files import append_json_line, open_to_append, read_appended, write_atomic

# FastChat's MT-bench temperatures by category (fastchat/llm_judge/common.py); other categories get DEFAULT.
CATEGORY_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,  # FastChat's name for the Arena-Hard category
    "arena-hard": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
MAX_TOKENS = 1024  # FastChat's max_new_token for MT-bench answers
BATCH_SIZE = 8

QUESTIONS_HINT = "expected FastChat's question JSONL: question_id, category, turns (a list of strings)"
ANSWERS_HINT = "expected FastChat's answer JSONL: question_id, model_id, choices [{index, turns}]"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None  # a correct answer per turn, where the question file has one


# -- reading ---------------------------------------------------------------------------------------------------


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a FastChat question file, in file order; a bad record raises, naming `path:line`."""
    path = Path(path)
    questions, seen = [], {}
    for where, value in strict_records(path, QUESTIONS_HINT):
        question = _question(value, where)
        if question.question_id in seen:
            raise CamelidError(f"{where}: question_id {question.question_id!r} again (first at "
                               f"{seen[question.question_id]}); question ids must be unique")
        seen[question.question_id] = where
        questions.append(question)
    if not questions:
        raise CamelidError(f"{path}: no questions in the file; {QUESTIONS_HINT}")
    return questions


def _question(value: Any, where: str) -> Question:
    if not isinstance(value, dict):
        raise CamelidError(f"{where}: not a JSON object; {QUESTIONS_HINT}")
    qid = value.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise CamelidError(f"{where}: 'question_id' is {'missing' if qid is None else 'not a number or string'}; "
                           f"{QUESTIONS_HINT}")
    category = value.get("category", "")
    if not isinstance(category, str):
        raise CamelidError(f"{where}: 'category' is not a string; {QUESTIONS_HINT}")
    turns = value.get("turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise CamelidError(f"{where}: 'turns' is not a non-empty list of strings; {QUESTIONS_HINT}")
    reference = value.get("reference")
    if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
        raise CamelidError(f"{where}: 'reference' is not a list of strings; {QUESTIONS_HINT}")
    return Question(qid, category, tuple(turns), tuple(reference) if reference else None)


def read_answers(paths: str | Path | Iterable[str | Path]) -> dict[str, dict[int | str, list[str]]]:
    """model_id -> question_id -> the answer's turns, from FastChat answer files or directories of them.

    A directory stands for every *.jsonl file in it. The model is the record's `model_id`, not the file's
    name. Two answers of one model to one question raise, naming both places.
    """
    files: list[Path] = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise CamelidError(f"{path}: no .jsonl answer files in the directory")
            files += found
        else:
            files.append(path)
    answers: dict[str, dict[int | str, list[str]]] = {}
    where_of: dict[tuple[str, int | str], str] = {}
    for path in files:
        for where, value in strict_records(path, ANSWERS_HINT):
            model, qid, turns = _answer(value, where)
            if (model, qid) in where_of:
                raise CamelidError(f"{where}: a second answer of {model} to question {qid!r} (the first at "
                                   f"{where_of[model, qid]}); keep one of them")
            where_of[model, qid] = where
            answers.setdefault(model, {})[qid] = turns
    return answers


def _answer(value: Any, where: str) -> tuple[str, int | str, list[str]]:
    if not isinstance(value, dict):
        raise CamelidError(f"{where}: not a JSON object; {ANSWERS_HINT}")
    model, qid = value.get("model_id"), value.get("question_id")
    if not isinstance(model, str) or not model:
        raise CamelidError(f"{where}: 'model_id' is missing or not a string; {ANSWERS_HINT}")
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise CamelidError(f"{where}: 'question_id' is missing or not a number or string; {ANSWERS_HINT}")
    try:
        turns = value["choices"][0]["turns"]
    except (LookupError, TypeError):
        turns = None
    if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
        raise CamelidError(f"{where}: no 'choices[0].turns' list of strings; {ANSWERS_HINT}")
    return model, qid, turns


# -- append-only output that resumes ---------------------------------------------------------------------------


def rewrite_sorted(out: Path, records: list[dict], key: Callable[[dict], Any]) -> None:
    """Replace `out`, all at once, with `records` sorted by `key` (stable), one JSON object a line."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(records, key=key)]
    write_atomic(out, "".join(lines))


def request_seed(seed: int, *parts: Any) -> int:
    """A seed for one request from the run's seed and what identifies the request: stable across runs."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # below 2**31, as some servers want


# -- the run ---------------------------------------------------------------------------------------------------


def temperature_for(category: str, temperature: float | None = None,
                    category_temperatures: Mapping[str, float] | None = None) -> float:
    """The temperature to answer a question of `category` at: `temperature` if given, else the category's own
    (from `category_temperatures`, then CATEGORY_TEMPERATURES), else DEFAULT_TEMPERATURE."""
    if temperature is not None:
        return temperature
    table = {**CATEGORY_TEMPERATURES, **(category_temperatures or {})}
    return table.get(category, DEFAULT_TEMPERATURE)


def parse_category_temperatures(specs: Sequence[str]) -> dict[str, float]:
    """`CATEGORY=T` settings (`--category-temperature writing=0.7`) as {category: temperature}."""
    temperatures = {}
    for spec in specs:
        category, eq, value = spec.partition("=")
        try:
            temperatures[category] = float(value) if eq and category else None
        except ValueError:
            temperatures[category] = None
        if temperatures[category] is None:
            raise CamelidError(f"--category-temperature {spec!r}: give CATEGORY=T, e.g. writing=0.7")
    return temperatures


def generate_answers(questions: str | Path | Sequence[Question], out: str | Path, *, model=None,
                     client: ChatClient | None = None, model_id: str | None = None, temperature: float | None = None,
                     category_temperatures: Mapping[str, float] | None = None, max_tokens: int = MAX_TOKENS,
                     seed: int = 0, question_ids: Iterable[int | str] | None = None, limit: int | None = None,
                     system: str | None = None, batch_size: int = BATCH_SIZE, template: str | None = None,
                     device: str | None = None, dtype=None, strip: bool = True, progress: bool = True) -> Report:
    """Answer the questions into the FastChat answer file `out`, resuming what `out` holds; returns the report.

    The answers come from exactly one of `model` (a camelid model: a name, GGUF file or HF directory as
    `load_model` takes, or a LoadedModel; `template`, `device` and `dtype` apply to it) or `client` (an
    OpenAI-compatible endpoint; its model name is the one asked for). model_id: the name written into the
    answers (default: the client's model, or the model file's name without .gguf). temperature: one for every
    question instead of the category's (see temperature_for); category_temperatures: per-category overrides of
    FastChat's. 0 is greedy. max_tokens: most tokens per answer turn. seed: seeds every request. question_ids,
    limit: answer only these questions, and only the first `limit` of them. system: a system message before
    the first turn (default none). batch_size: questions generated together by a local model. strip: take
    whitespace off each answer's ends, as FastChat does (IFEval scores the text as generated).

    The report (`out`.report.json and .txt) is saved however the run ends. A failed endpoint request raises
    TeacherError after the answers already finished are written; running again resumes.
    """
    if (model is None) == (client is None):
        raise CamelidError("answer with either a local model or an endpoint, not both and not neither")
    for name, value in (("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise CamelidError(f"{name} must be at least 1 (got {value})")
    if limit is not None and limit < 0:
        raise CamelidError(f"--limit must be at least 0 (got {limit})")
    if temperature is not None and not temperature >= 0:
        raise CamelidError(f"--temperature must be at least 0 (got {temperature})")
    for category, value in (category_temperatures or {}).items():
        if not value >= 0:
            raise CamelidError(f"the temperature of category {category} must be at least 0 (got {value})")
    questions = read_questions(questions) if isinstance(questions, str | Path) else list(questions)
    chosen = _choose(questions, question_ids, limit)
    if not model_id:
        source = client.model if client is not None else getattr(model, "source", model)
        model_id = Path(str(source)).name.removesuffix(".gguf")
    out = Path(out)
    report = Report("answers")
    done, torn_at = read_appended(out, is_answer_record, "an answer record")
    if others := {record.get("model_id") for record in done} - {model_id}:
        raise CamelidError(f"{out} holds answers of {', '.join(map(str, others))}, not {model_id}; give each model "
                           "its own output file")
    if torn_at:
        report.facts["torn_line_removed"] = torn_at
    report.facts["model_id"] = model_id
    answered = {record["question_id"] for record in done}
    todo = [q for q in chosen if q.question_id not in answered]
    temperatures = {q.question_id: temperature_for(q.category, temperature, category_temperatures) for q in todo}
    report.read = len(chosen)
    report.facts.update({"questions": len(chosen), "resumed": len(chosen) - len(todo)})
    bar = tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="answers", unit="question",
               file=sys.stderr, dynamic_ncols=True, disable=not progress)
    stopped = None
    try:
        with open_to_append(out) as f:
            def write(question: Question, turns: list[str], finish_reasons: list[str]) -> None:
                append_json_line(f, {"question_id": question.question_id, "answer_id": uuid.uuid4().hex,
                                     "model_id": model_id, "choices": [{"index": 0, "turns": turns}],
                                     "finish_reasons": finish_reasons, "tstamp": time.time()})
                report.written += 1
                bar.update(1)

            if client is not None:
                _answer_with_endpoint(client, todo, write, report, temperatures=temperatures,
                                      max_tokens=max_tokens, seed=seed, system=system, strip=strip)
            else:
                from camelid.checkpoint import LoadedModel, load_model

                if not isinstance(model, LoadedModel):
                    model = load_model(model, device=device, dtype=dtype)
                _answer_locally(model, todo, write, report, temperatures=temperatures, max_tokens=max_tokens,
                                seed=seed, system=system, batch_size=batch_size, template=template, strip=strip)
    except BaseException as exc:
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        raise
    finally:
        bar.close()
        if stopped:
            report.facts["stopped"] = stopped
        report.outputs["answers"] = str(out)
        report.save(out)
    order = {q.question_id: i for i, q in enumerate(questions)}
    records, _ = read_appended(out, is_answer_record, "an answer record")
    rewrite_sorted(out, records, key=lambda r: order.get(r["question_id"], len(order)))
    return report


def _choose(questions: list[Question], question_ids: Iterable[int | str] | None, limit: int | None) -> list[Question]:
    chosen = questions
    if question_ids is not None:
        wanted = {str(q) for q in question_ids}
        chosen = [q for q in questions if str(q.question_id) in wanted]
        if missing := wanted - {str(q.question_id) for q in chosen}:
            raise CamelidError(f"no question with id {', '.join(sorted(missing))} in the question file")
    return chosen[:limit] if limit is not None else chosen


def is_answer_record(value: Any) -> bool:
    """Whether a JSON value looks like a record of FastChat's answer schema."""
    return isinstance(value, dict) and "question_id" in value and isinstance(value.get("choices"), list)


def _answer_all(todo: list[Question], ask, write, *, system: str | None, strip: bool, close=None) -> None:
    """Ask every question's turns one after another within a question, questions concurrently; each question is
    written when its last turn is answered, with why each turn ended ("stop" or "length"). `ask(messages,
    question, turn_number)` is a coroutine giving the answer's text and finish reason; `close`, a coroutine
    function, is awaited at the end, in the same event loop. Inside a running event loop (a notebook) the
    questions are asked from a thread of their own."""

    async def answer(question: Question) -> tuple[Question, list[str], list[str]]:
        messages = [{"role": "system", "content": system}] if system else []
        turns, reasons = [], []
        for number, text in enumerate(question.turns, 1):
            messages.append({"role": "user", "content": text})
            text, reason = await ask(messages, question, number)
            turns.append(text.strip() if strip else text)
            reasons.append(reason)
            messages.append({"role": "assistant", "content": turns[-1]})
        return question, turns, reasons

    async def run() -> None:
        pending = [asyncio.ensure_future(answer(q)) for q in todo]
        try:
            for next_done in asyncio.as_completed(pending):
                write(*await next_done)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if close is not None:
                await close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


def _answer_with_endpoint(client: ChatClient, todo: list[Question], write, report: Report, *,
                          temperatures: dict, max_tokens: int, seed: int, system: str | None, strip: bool) -> None:
    """The questions through an OpenAI-compatible endpoint, up to the client's concurrency at once."""
    usage_before = replace(client.usage)
    cut = 0

    async def ask(messages: list[dict], question: Question, number: int) -> tuple[str, str]:
        nonlocal cut
        reply = await client.chat(messages, temperature=temperatures[question.question_id], max_tokens=max_tokens,
                                  seed=request_seed(seed, question.question_id, number))
        cut += reply.finish_reason == "length"
        return reply.text, reply.finish_reason

    try:
        _answer_all(todo, ask, write, system=system, strip=strip, close=client.aclose)
    finally:
        used = client.usage.since(usage_before)
        report.facts.update({"backend": client.base_url, "turns_cut_at_max_tokens": cut, "requests": used.requests,
                             "retries": used.retries, "failed_requests": used.failures,
                             "prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
                             "cost_usd": round(used.cost, 6)})


def _answer_locally(loaded, todo: list[Question], write, report: Report, *, temperatures: dict, max_tokens: int,
                    seed: int, system: str | None, batch_size: int, template: str | None, strip: bool) -> None:
    """The questions on a camelid model by continuous batching (`camelid serve`'s engine): up to `batch_size`
    answers decode together, and a finished answer's row takes the next request at once, so a long answer does
    not hold up a batch of short ones. Each request is seeded as an endpoint's would be."""
    from camelid.chat import chat_template_for, encode_chat
    from camelid.generate import SamplingParams
    from camelid.engine import BatchingEngine
    from camelid.jobs import GenerationParams

    chat_template = chat_template_for(loaded, template)
    context = loaded.config.max_sequence_length
    # Keep room for an answer when a long later turn must lose the first one (encode_chat drops oldest turns).
    keep = min(max_tokens, context // 2)
    engine = BatchingEngine(loaded, max_batch=batch_size, max_queue=len(todo) + 1,
                            max_len=_cache_length(loaded, chat_template, todo, system, max_tokens))
    cut = generated = 0

    async def ask(messages: list[dict], question: Question, number: int) -> tuple[str, str]:
        nonlocal cut, generated
        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperatures[question.question_id],
                                  top_k=0, top_p=1.0, min_p=0.0, seed=request_seed(seed, question.question_id, number))
        prompt = encode_chat(loaded, chat_template, messages, keep_tokens=keep)
        if len(prompt) + max_tokens > engine.context and engine.context < context:
            raise CamelidError(f"question {question.question_id!r}, turn {number}: {len(prompt)} prompt tokens and "
                               f"{max_tokens} to answer outgrow the {engine.context}-token cache sized for it (a bug)")
        job = engine.submit(prompt, GenerationParams(sampling))
        text = []
        while (piece := await job.queue.get()).finish_reason is None:
            text.append(piece.text)
        if piece.finish_reason not in ("stop", "length"):
            raise CamelidError(f"generating the answer to question {question.question_id!r} failed "
                               f"({piece.finish_reason}" + ("; the error is printed above)" if piece.finish_reason
                                                            == "error" else ")"))
        cut += piece.finish_reason == "length"
        generated += piece.completion_tokens
        return "".join(text) + piece.text, piece.finish_reason

    try:
        _answer_all(todo, ask, write, system=system, strip=strip)
    finally:
        engine.close()
        report.facts.update({"backend": f"local {loaded.source}", "turns_cut_at_max_tokens": cut,
                             "completion_tokens": generated})


def _cache_length(loaded, chat_template, todo: list[Question], system: str | None, max_tokens: int) -> int:
    """KV-cache rows long enough for the longest question's whole conversation, at most the model's context:
    its first prompt, every later turn's text (with room for the template's markers) and every answer."""
    if not todo:
        return 1
    from camelid.chat import encode_chat

    def longest(question: Question) -> int:
        first = [{"role": "system", "content": system}] if system else []
        first.append({"role": "user", "content": question.turns[0]})
        later = sum(len(loaded.tokenizer.encode(t, add_special=False)) + 32 for t in question.turns[1:])
        return len(encode_chat(loaded, chat_template, first)) + later + max_tokens * len(question.turns)

    return min(loaded.config.max_sequence_length, max(longest(q) for q in todo))
