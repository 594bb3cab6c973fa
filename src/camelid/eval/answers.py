"""Answers to a question set (FastChat's MT-bench or Vicuna-bench files), for an LLM judge to grade.

A question has one or more turns; the model answers the first, and each later turn is asked in the same
conversation, after the model's own earlier answers. The answers come from a camelid model in this process
(questions batched through `camelid.generate.generate`) or from any OpenAI-compatible endpoint (questions in
flight at once, up to the client's concurrency).

Each question is answered at its category's temperature, FastChat's MT-bench defaults unless overridden:
greedy (0) where there is one right answer (math, coding, reasoning, extraction), a little randomness for
knowledge (stem, humanities: 0.1) and 0.7 for writing, role play and anything else. Sampling draws from the
model's whole distribution at that temperature (no top-k/top-p/min-p), as an OpenAI-style endpoint does by
default, so both backends sample alike. Every request is seeded from `seed`, the question and the turn.

The output is FastChat's answer file, one JSON object a line:

    {"question_id": 81, "answer_id": "...", "model_id": "my-model",
     "choices": [{"index": 0, "turns": ["first answer", "second answer"]}], "tstamp": 1700000000.0}

Each answered question is appended and fsync'ed at once. Running again with the same output resumes: question
ids already in the file are skipped (a line torn by a crash is cut off first, as in `camelid data
selfinstruct`). When every selected question is answered the file is rewritten, all at once, in the order of
the question file, as FastChat sorts its answer files.
"""

import asyncio
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
                     device: str | None = None, dtype=None, progress: bool = True) -> Report:
    """Answer the questions into the FastChat answer file `out`, resuming what `out` holds; returns the report.

    The answers come from exactly one of `model` (a camelid model: a name, GGUF file or HF directory as
    `load_model` takes, or a LoadedModel; `template`, `device` and `dtype` apply to it) or `client` (an
    OpenAI-compatible endpoint; its model name is the one asked for). model_id: the name written into the
    answers (default: the client's model, or the model file's name without .gguf). temperature: one for every
    question instead of the category's (see temperature_for); category_temperatures: per-category overrides of
    FastChat's. 0 is greedy. max_tokens: most tokens per answer turn. seed: seeds every request. question_ids,
    limit: answer only these questions, and only the first `limit` of them. system: a system message before
    the first turn (default none). batch_size: questions generated together by a local model.

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
    done, torn_at = read_appended(out, _is_answer, "an answer record")
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
            def write(question: Question, turns: list[str]) -> None:
                append_json_line(f, {"question_id": question.question_id, "answer_id": uuid.uuid4().hex,
                           "model_id": model_id, "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
                report.written += 1
                bar.update(1)

            if client is not None:
                _answer_with_endpoint(client, todo, write, report, temperatures=temperatures,
                                      max_tokens=max_tokens, seed=seed, system=system)
            else:
                from camelid.checkpoint import LoadedModel, load_model

                if not isinstance(model, LoadedModel):
                    model = load_model(model, device=device, dtype=dtype)
                _answer_locally(model, todo, write, report, temperatures=temperatures, max_tokens=max_tokens,
                                seed=seed, system=system, batch_size=batch_size, template=template)
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
    records, _ = read_appended(out, _is_answer, "an answer record")
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


def _is_answer(value: Any) -> bool:
    return isinstance(value, dict) and "question_id" in value and isinstance(value.get("choices"), list)


def _answer_with_endpoint(client: ChatClient, todo: list[Question], write, report: Report, *,
                          temperatures: dict, max_tokens: int, seed: int, system: str | None) -> None:
    """Every question's turns, one after another within a question, questions concurrently; written as done."""
    usage_before = replace(client.usage)
    cut = 0

    async def answer(question: Question) -> tuple[Question, list[str]]:
        nonlocal cut
        messages = [{"role": "system", "content": system}] if system else []
        turns = []
        for number, text in enumerate(question.turns, 1):
            messages.append({"role": "user", "content": text})
            reply = await client.chat(messages, temperature=temperatures[question.question_id],
                                      max_tokens=max_tokens, seed=request_seed(seed, question.question_id, number))
            cut += reply.finish_reason == "length"
            turns.append(reply.text.strip())
            messages.append({"role": "assistant", "content": turns[-1]})
        return question, turns

    async def run() -> None:
        pending = [asyncio.ensure_future(answer(q)) for q in todo]
        try:
            for next_done in asyncio.as_completed(pending):
                write(*await next_done)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await client.aclose()

    try:
        asyncio.run(run())
    finally:
        used = client.usage.since(usage_before)
        report.facts.update({"backend": client.base_url, "turns_cut_at_max_tokens": cut, "requests": used.requests,
                             "retries": used.retries, "failed_requests": used.failures,
                             "prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
                             "cost_usd": round(used.cost, 6)})


def _answer_locally(loaded, todo: list[Question], write, report: Report, *, temperatures: dict, max_tokens: int,
                    seed: int, system: str | None, batch_size: int, template: str | None) -> None:
    """Batches of questions of one temperature, turn by turn; each batch written when its last turn is done."""
    from camelid.chat import chat_template_for, encode_chat
    from camelid.generate import SamplingParams, generate

    chat_template = chat_template_for(loaded, template)
    # Keep room for an answer when a long second turn must lose the first one (encode_chat drops oldest turns).
    keep = min(max_tokens, loaded.config.max_sequence_length // 2)
    by_temperature: dict[float, list[Question]] = {}
    for question in todo:
        by_temperature.setdefault(temperatures[question.question_id], []).append(question)
    cut = generated = 0
    try:
        for temp, group in by_temperature.items():
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                conversations = [[{"role": "system", "content": system}] if system else [] for _ in batch]
                answers: list[list[str]] = [[] for _ in batch]
                for turn in range(max(len(q.turns) for q in batch)):
                    rows = [i for i, q in enumerate(batch) if turn < len(q.turns)]
                    prompts = []
                    for i in rows:
                        conversations[i].append({"role": "user", "content": batch[i].turns[turn]})
                        prompts.append(encode_chat(loaded, chat_template, conversations[i], keep_tokens=keep))
                    params = SamplingParams(max_new_tokens=max_tokens, temperature=temp, top_k=0, top_p=1.0, min_p=0.0,
                                            seed=request_seed(seed, batch[0].question_id, turn + 1))
                    for i, completion in zip(rows, generate(loaded.model, loaded.tokenizer, prompts, params)):
                        text = completion.text.strip()
                        answers[i].append(text)
                        conversations[i].append({"role": "assistant", "content": text})
                        cut += completion.finish_reason == "length"
                        generated += len(completion.token_ids)
                for question, turns in zip(batch, answers):
                    write(question, turns)
    finally:
        report.facts.update({"backend": f"local {loaded.source}", "turns_cut_at_max_tokens": cut,
                             "completion_tokens": generated})
