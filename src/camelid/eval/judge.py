"""LLM-as-a-judge, as MT-bench does it: a strong model grades answers alone or compares them in pairs.

Three modes, after FastChat's `gen_judgment.py`:

- "single": each answer is rated from 1 to 10; the verdict is `[[rating]]` (e.g. `Rating: [[7]]`, `[[7.5]]`).
- "pairwise-baseline": each model's answer against a baseline model's; "pairwise-all": every pair of models.
  A pair is judged twice, the second time with the answers swapped (A is B), because judges favour a
  position; the verdicts are `[[A]]`, `[[B]]` and `[[C]]` (a tie). When the two orders disagree the pair is a
  tie (FastChat's rule), and when either has no verdict it is a parse failure, left out of the battles.

A question of a category that has one right answer (REFERENCE_CATEGORIES: math, reasoning, coding) is judged
against its `reference` answer where the question file gives one. The second turn of a two-turn question is
judged with the whole dialogue in view: both questions, the assistant's both answers (and both reference
answers), with the judge asked about the second answer only; turns after the second are not judged. So there
are eight prompts, single or pair x plain or reference x first turn or second, written out below; their names
go into each judgment's `judge` field ([judge model, prompt name]) as FastChat's do.

Verdicts are read forgivingly (see parse_rating, parse_pair_verdict); the last verdict in a reply wins, since
the prompts ask for it at the end and a judge that quotes the format or changes its mind does so before. A
reply without a verdict gets one reminder of the format in the same conversation (`reminder=True`); still
without one, the judgment is written with score -1 or winner "error" (FastChat's marks) and counted as a
parse failure.

Outputs, in FastChat's schemas, one JSON object a line, appended as they come and resumed like answer files:
- single: question_id, model, judge, user_prompt, judgment, score, turn, tstamp
- pairwise: question_id, model_1, model_2, g1_winner, g2_winner, judge, g1_user_prompt, g1_judgment,
  g2_user_prompt, g2_judgment, turn, tstamp (winners are "model_1", "model_2", "tie" or "error"; g2's are
  already mapped back from the swapped order)
- pairwise also writes OUT.battles.jsonl, {model_a, model_b, winner, ...} in the arena's vocabulary, which
  `camelid eval ratings` reads.

Every reply is kept in a cache file (by default OUT.cache.jsonl) under a hash of the judge model, the
messages and the sampling parameters, so judging the same answer again, in this output or another, costs
nothing; a cached judgment keeps the time it was first made. Judge sampling is greedy (temperature 0).
"""

import asyncio
import hashlib
import itertools
import json
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camelid.client import ChatClient, TeacherError
from camelid.pipeline_report import Report
from camelid.errors import CamelidError
from camelid.eval.answers import Question, read_answers, read_questions, rewrite_sorted
from camelid.files import append_json_line, open_to_append, read_appended, write_atomic

MODES = ("single", "pairwise-baseline", "pairwise-all")
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # FastChat's categories that need a reference
MAX_TOKENS = 1024  # a judgment is a short assessment and a verdict; a cut one still gets the reminder
ON_ERROR = ("stop", "skip")
NO_SCORE = -1  # FastChat's score for a judgment without a rating
PAIR_WINNERS = ("model_1", "model_2", "tie", "error")


# -- the prompts -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    name: str
    system: str
    user: str  # a str.format template
    verdict: str  # "rating" or "pair"


_RATE = ("\n\nFirst write a short assessment that names the answer's main strengths and flaws. Then end your "
         "reply with a line giving a rating from 1 (useless) to 10 (excellent) in double square brackets, in the "
         "form Rating: [[N]], where N is your rating.")
_CHOOSE = ("\n\nFirst write a short comparison of the two answers. Then end your reply with a line giving your "
           "verdict: [[A]] if assistant A's answer is better, [[B]] if assistant B's answer is better, or [[C]] "
           "if neither is better than the other.")
_QUALITIES = ("whether it is helpful, on topic and correct, whether it shows depth and, where the task invites "
              "it, originality, and whether it is as detailed as the question deserves. Length is no merit in "
              "itself.")
_FAIRLY = (" Do not let the order in which the answers appear, their length or the assistants' names sway you: "
           "judge what they say.")
_CORRECT_FIRST = (" Correctness comes first: check the answer against the reference, point out every mistake "
                  "in its reasoning or result, and rate a wrong result low however well it is presented. Only "
                  "then weigh clarity and helpfulness.")
_CORRECT_FIRST_PAIR = (" Correctness comes first: check each answer against the reference and point out every "
                       "mistake; a correct answer beats a wrong one however well the wrong one is presented.")

_SINGLE_SYSTEM = ("You are an impartial judge of an AI assistant's answers. Below are a user's question and the "
                  "assistant's answer. Decide how well the answer serves the user: " + _QUALITIES)
_SINGLE_REF_SYSTEM = ("You are an impartial judge of an AI assistant's answers. Below are a user's question, a "
                      "reference answer that is known to be correct, and the assistant's answer." + _CORRECT_FIRST)
_SINGLE_TURN2_SYSTEM = ("You are an impartial judge of an AI assistant's answers. Below is a conversation in which a "
                        "user makes two requests, one after the other, and the assistant answers each. Judge only "
                        "the assistant's second answer: how well it serves the user's second request, given "
                        "everything said before it. Consider " + _QUALITIES)
_SINGLE_REF_TURN2_SYSTEM = ("You are an impartial judge of an AI assistant's answers. Below are reference answers, "
                            "known to be correct, to a user's two requests, and then a conversation in which the "
                            "user makes those requests one after the other and the assistant answers each. Judge "
                            "only the assistant's second answer, comparing it with the second reference answer."
                            + _CORRECT_FIRST)
_PAIR_SYSTEM = ("You are an impartial judge comparing two AI assistants. Below are a user's question and the answers "
                "of assistant A and assistant B. Decide which answer serves the user better, considering "
                + _QUALITIES + _FAIRLY)
_PAIR_REF_SYSTEM = ("You are an impartial judge comparing two AI assistants. Below are a user's question, a reference "
                    "answer that is known to be correct, and the answers of assistant A and assistant B. Decide "
                    "which answer serves the user better." + _CORRECT_FIRST_PAIR + _FAIRLY)
_PAIR_TURN2_SYSTEM = ("You are an impartial judge comparing two AI assistants. Below are two conversations: the same "
                      "user makes the same two requests, one after the other, once to assistant A and once to "
                      "assistant B. Judge only the assistants' second answers: which serves the user's second "
                      "request better, given everything said before it? Consider " + _QUALITIES + _FAIRLY)
_PAIR_REF_TURN2_SYSTEM = ("You are an impartial judge comparing two AI assistants. Below are reference answers, known "
                          "to be correct, to a user's two requests, and then two conversations: the user makes those "
                          "requests, one after the other, once to assistant A and once to assistant B. Judge only the "
                          "assistants' second answers, comparing them with the second reference answer."
                          + _CORRECT_FIRST_PAIR + _FAIRLY)

_ASK_RATING = "\n\nAssess the answer, then end with its rating as Rating: [[N]]."
_ASK_RATING_TURN2 = "\n\nAssess the assistant's second answer, then end with its rating as Rating: [[N]]."
_ASK_PAIR = "\n\nCompare the two answers, then end with your verdict: [[A]], [[B]] or [[C]]."
_ASK_PAIR_TURN2 = "\n\nCompare the two second answers, then end with your verdict: [[A]], [[B]] or [[C]]."

_REFERENCES = ("<reference_answers>\n<reference_1>\n{reference_1}\n</reference_1>\n"
               "<reference_2>\n{reference_2}\n</reference_2>\n</reference_answers>\n\n")


def _dialogue(tag: str, answer: str) -> str:
    return (f"<{tag}>\n<user>\n{{question_1}}\n</user>\n<assistant>\n{{{answer}_1}}\n</assistant>\n"
            f"<user>\n{{question_2}}\n</user>\n<assistant>\n{{{answer}_2}}\n</assistant>\n</{tag}>")


PROMPTS = {p.name: p for p in (
    Prompt("camelid-single-v1", _SINGLE_SYSTEM + _RATE,
           "<question>\n{question}\n</question>\n\n<answer>\n{answer}\n</answer>" + _ASK_RATING, "rating"),
    Prompt("camelid-single-ref-v1", _SINGLE_REF_SYSTEM + _RATE,
           "<question>\n{question}\n</question>\n\n<reference_answer>\n{reference}\n</reference_answer>\n\n"
           "<answer>\n{answer}\n</answer>" + _ASK_RATING, "rating"),
    Prompt("camelid-single-turn2-v1", _SINGLE_TURN2_SYSTEM + _RATE,
           _dialogue("conversation", "answer") + _ASK_RATING_TURN2, "rating"),
    Prompt("camelid-single-ref-turn2-v1", _SINGLE_REF_TURN2_SYSTEM + _RATE,
           _REFERENCES + _dialogue("conversation", "answer") + _ASK_RATING_TURN2, "rating"),
    Prompt("camelid-pair-v1", _PAIR_SYSTEM + _CHOOSE,
           "<question>\n{question}\n</question>\n\n<answer_a>\n{answer_a}\n</answer_a>\n\n"
           "<answer_b>\n{answer_b}\n</answer_b>" + _ASK_PAIR, "pair"),
    Prompt("camelid-pair-ref-v1", _PAIR_REF_SYSTEM + _CHOOSE,
           "<question>\n{question}\n</question>\n\n<reference_answer>\n{reference}\n</reference_answer>\n\n"
           "<answer_a>\n{answer_a}\n</answer_a>\n\n<answer_b>\n{answer_b}\n</answer_b>" + _ASK_PAIR, "pair"),
    Prompt("camelid-pair-turn2-v1", _PAIR_TURN2_SYSTEM + _CHOOSE,
           _dialogue("conversation_a", "answer_a") + "\n\n" + _dialogue("conversation_b", "answer_b")
           + _ASK_PAIR_TURN2, "pair"),
    Prompt("camelid-pair-ref-turn2-v1", _PAIR_REF_TURN2_SYSTEM + _CHOOSE,
           _REFERENCES + _dialogue("conversation_a", "answer_a") + "\n\n" + _dialogue("conversation_b", "answer_b")
           + _ASK_PAIR_TURN2, "pair"),
)}

REMINDERS = {
    "rating": ("Your reply has no rating in the required form. Reply with the rating only, an integer from 1 to 10 "
               "in double square brackets, e.g. Rating: [[N]]."),
    "pair": "Your reply has no verdict in the required form. Reply with the verdict only: [[A]], [[B]] or [[C]].",
}
REMINDER_JOIN = "\n\n[reminded of the verdict format]\n\n"  # between a reply and the judge's answer to the reminder


def _reference(question: Question, turn: int, reference_categories) -> tuple[str, ...] | None:
    """The reference turns to show for judging `turn`, or None."""
    ref = question.reference
    if question.category in reference_categories and ref and len(ref) >= turn:
        return ref[:turn]
    return None


def single_messages(question: Question, answer: list[str], turn: int, *,
                    reference_categories=REFERENCE_CATEGORIES) -> tuple[Prompt, list[dict]]:
    """The prompt and messages to rate `answer` (the model's turns) at `turn` (1 or 2) of `question`."""
    ref = _reference(question, turn, reference_categories)
    values = {"question": question.turns[0], "answer": answer[0]}
    if turn == 1:
        prompt = PROMPTS["camelid-single-ref-v1" if ref else "camelid-single-v1"]
        values["reference"] = ref[0] if ref else ""
    else:
        prompt = PROMPTS["camelid-single-ref-turn2-v1" if ref else "camelid-single-turn2-v1"]
        values.update(_two_turns(question, ref))
        values.update(answer_1=answer[0], answer_2=answer[1])
    return prompt, _messages(prompt, values)


def pair_messages(question: Question, answer_a: list[str], answer_b: list[str], turn: int, *,
                  reference_categories=REFERENCE_CATEGORIES) -> tuple[Prompt, list[dict]]:
    """The prompt and messages to compare answers A and B (each the model's turns) at `turn` of `question`."""
    ref = _reference(question, turn, reference_categories)
    values = {"question": question.turns[0], "answer_a": answer_a[0], "answer_b": answer_b[0]}
    if turn == 1:
        prompt = PROMPTS["camelid-pair-ref-v1" if ref else "camelid-pair-v1"]
        values["reference"] = ref[0] if ref else ""
    else:
        prompt = PROMPTS["camelid-pair-ref-turn2-v1" if ref else "camelid-pair-turn2-v1"]
        values.update(_two_turns(question, ref))
        values.update(answer_a_1=answer_a[0], answer_a_2=answer_a[1], answer_b_1=answer_b[0], answer_b_2=answer_b[1])
    return prompt, _messages(prompt, values)


def _two_turns(question: Question, ref) -> dict:
    values = {"question_1": question.turns[0], "question_2": question.turns[1]}
    if ref:
        values.update(reference_1=ref[0], reference_2=ref[1])
    return values


def _messages(prompt: Prompt, values: dict) -> list[dict]:
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user.format(**values)}]


# -- reading verdicts ------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_RATING = re.compile(rf"\[\[\s*{_NUMBER}\s*(?:/\s*10\s*)?\]\]")  # [[7]], [[7.5]], [[ 7 ]], [[7/10]]
# Without double brackets, only after the word "rating": "Rating: [7]", "**Rating:** 7/10", "rating of 7".
_RATING_LABELLED = re.compile(rf"(?i:\brating)\W{{0,6}}(?:is\s+|of\s+)?\[?\s*{_NUMBER}\s*(?:/\s*10)?\s*\]?(?![\d.])")
_PAIR = re.compile(r"\[\[\s*(A|B|C|(?i:tie))\s*\]\]")  # [[A]], [[ B ]], [[C]], [[tie]]
_PAIR_LABELLED = re.compile(r"(?i:verdict)[^\n\[]{0,20}\[\s*(A|B|C)\s*\]")  # "Final verdict: [A]"


def parse_rating(text: str) -> int | float | None:
    """The judge's rating, 1 to 10, or None: the last [[N]] in range, else the last labelled "Rating: N"."""
    for pattern in (_RATING, _RATING_LABELLED):
        ratings = [float(m) for m in pattern.findall(text) if 1 <= float(m) <= 10]
        if ratings:
            return int(ratings[-1]) if ratings[-1].is_integer() else ratings[-1]
    return None


def parse_pair_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the judge's last [[A]] / [[B]] / [[C]] (or "Verdict: [A]"), or None."""
    for pattern in (_PAIR, _PAIR_LABELLED):
        if found := pattern.findall(text):
            last = found[-1].upper()
            return "tie" if last in ("C", "TIE") else last
    return None


def pair_outcome(record: dict) -> str | None:
    """The result of a pairwise judgment: "model_1", "model_2" or "tie" (the orders disagree: a tie), or None
    when either order has no verdict."""
    g1, g2 = record["g1_winner"], record["g2_winner"]
    if "error" in (g1, g2):
        return None
    return g1 if g1 == g2 else "tie"


# -- the cache -------------------------------------------------------------------------------------------------


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """The hash a reply is cached under: the judge model, the messages and the sampling parameters."""
    text = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class _Cache:
    """Replies already paid for: {key, text, finish_reason, prompt_tokens, completion_tokens, tstamp} a line."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None:
            records, _ = read_appended(path, lambda v: isinstance(v, dict) and "key" in v and "text" in v,
                                       "a judge cache record")
            self.entries = {r["key"]: r for r in records}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, f, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        if f is not None:
            append_json_line(f, entry)


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    question: Question
    turn: int
    model_1: str
    model_2: str | None  # None when a single answer is rated


def battles_path(out: str | Path) -> Path:
    """Where the battles of pairwise judgments `out` go: OUT.battles.jsonl beside it (OUT without .jsonl)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".battles.jsonl")


def judge(questions: str | Path | list[Question], answers, out: str | Path, *, client: ChatClient,
          mode: str = "single", baseline: str | None = None, models: list[str] | None = None,
          reference_categories=REFERENCE_CATEGORIES, max_tokens: int = MAX_TOKENS, reminder: bool = True,
          cache: bool | str | Path = True, on_error: str = "stop", progress: bool = True) -> Report:
    """Judge the answers to `questions` with `client`'s model into the judgment file `out`; returns the report.

    answers: FastChat answer files, or directories of them (see read_answers). mode: one of MODES. baseline: the
    model every other is compared with in "pairwise-baseline". models: the models to judge (default: every model
    with answers; in "pairwise-baseline" the baseline is added). reference_categories: the categories judged
    against the question's reference answer. max_tokens: most tokens per judgment (sampling is greedy).
    reminder: ask once more, for the verdict only, when a reply has none. cache: True keeps replies in
    OUT.cache.jsonl, a path keeps them there (share it between runs), False keeps none. on_error: "stop" raises
    the judge's TeacherError after writing what is done; "skip" counts the failed judgment and goes on (running
    again retries it). Running again with the same `out` resumes: judgments there by the same judge model are
    not asked again.

    The report (`out`.report.json and .txt) counts judgments, parse failures, cache hits, tokens and cost.
    """
    if mode not in MODES:
        raise CamelidError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if on_error not in ON_ERROR:
        raise CamelidError(f"--on-error must be one of {', '.join(ON_ERROR)} (got {on_error!r})")
    if max_tokens < 1:
        raise CamelidError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if (mode == "pairwise-baseline") != (baseline is not None):
        raise CamelidError("--baseline is needed with --mode pairwise-baseline, and only there")
    questions = read_questions(questions) if isinstance(questions, str | Path) else list(questions)
    by_model = read_answers(answers)
    models = _models(by_model, mode, baseline, models)
    matches, missing = _matches(questions, by_model, mode, baseline, models)
    out = Path(out)
    if cache is True:
        cache_path = out.with_name(out.name + ".cache.jsonl")
    else:
        cache_path = Path(cache) if cache else None

    report = Report("judge")
    done, torn_at = read_appended(out, _is_judgment, "a judgment record")
    if torn_at:
        report.facts["torn_line_removed"] = torn_at
    finished = {_key(r) for r in done}
    todo = [m for m in matches if _match_key(m, client.model) not in finished]
    report.read = len(matches)
    report.facts.update({"mode": mode, "judge_model": client.model, "resumed": len(matches) - len(todo),
                         "missing_answers": missing})
    counts = dict.fromkeys(("cached_replies", "reminders", "verdicts_after_reminder", "parse_failures",
                            "failed_judgments"), 0)
    usage_before = replace(client.usage)
    bar = tqdm(total=len(matches), initial=len(matches) - len(todo), desc=f"judge ({mode})", unit="judgment",
               file=sys.stderr, dynamic_ncols=True, disable=not progress)
    stopped = None
    try:
        judge_cache = _Cache(cache_path)
        params = {"temperature": 0.0, "max_tokens": max_tokens}
        run = _Run(client, judge_cache, params, by_model, reference_categories, reminder, counts)
        with open_to_append(out) as f, (open_to_append(cache_path) if cache_path else nullcontext()) as cache_file:
            run.cache_file = cache_file
            asyncio.run(run.all(todo, f, bar, report, on_error))
    except BaseException as exc:
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        raise
    finally:
        bar.close()
        used = client.usage.since(usage_before)
        report.facts.update({**counts, "requests": used.requests, "retries": used.retries,
                             "failed_requests": used.failures, "prompt_tokens": used.prompt_tokens,
                             "completion_tokens": used.completion_tokens, "cost_usd": round(used.cost, 6)})
        if used.without_usage:
            report.facts["replies_without_usage"] = used.without_usage
        if stopped:
            report.facts["stopped"] = stopped
        report.outputs["judgments"] = str(out)
        if cache_path:
            report.outputs["cache"] = str(cache_path)
        _finish(out, questions, models, report)
        report.save(out)
    return report


def _models(by_model: dict, mode: str, baseline: str | None, models: list[str] | None) -> list[str]:
    known = sorted(by_model)
    if not known:
        raise CamelidError("no answers in the answer files")
    chosen = list(models) if models else known
    if baseline is not None and baseline not in chosen:
        chosen.append(baseline)
    if unknown := [m for m in chosen if m not in by_model]:
        raise CamelidError(f"no answers of {', '.join(unknown)} in the answer files (they have {', '.join(known)})")
    if mode != "single" and len(chosen) < 2:
        raise CamelidError(f"--mode {mode} needs the answers of at least two models (got only {', '.join(chosen)})")
    return chosen


def _matches(questions: list[Question], by_model: dict, mode: str, baseline: str | None,
             models: list[str]) -> tuple[list[_Match], int]:
    """Every judgment to make, in question order, and how many could not be made for want of an answer (or
    of its second turn) to a question that other models answered."""
    if mode == "single":
        pairs = [(m, None) for m in models]
    elif mode == "pairwise-baseline":
        pairs = [(m, baseline) for m in models if m != baseline]
    else:
        pairs = list(itertools.combinations(models, 2))
    matches, missing = [], 0
    for question in questions:
        if not any(question.question_id in by_model[m] for m in models):
            continue  # a question no model answered (answers of a part of the questions) is not missing
        for model_1, model_2 in pairs:
            answers = [by_model[m].get(question.question_id) for m in (model_1, model_2) if m is not None]
            for turn in range(1, min(len(question.turns), 2) + 1):  # the prompts know two turns, as MT-bench's
                if all(a is not None and len(a) >= turn for a in answers):
                    matches.append(_Match(question, turn, model_1, model_2))
                else:
                    missing += 1
    return matches, missing


def _is_judgment(value: Any) -> bool:
    return isinstance(value, dict) and "question_id" in value and "turn" in value and (
        "score" in value or "g1_winner" in value)


def _key(record: dict) -> tuple:
    models = (record["model"], None) if "score" in record else (record["model_1"], record["model_2"])
    return record["question_id"], *models, record["turn"], record["judge"][0]


def _match_key(match: _Match, judge_model: str) -> tuple:
    return match.question.question_id, match.model_1, match.model_2, match.turn, judge_model


class _Run:
    """One judging run: the requests (through the cache), the verdicts and the records."""

    def __init__(self, client: ChatClient, cache: _Cache, params: dict, by_model: dict, reference_categories,
                 reminder: bool, counts: dict):
        self.client, self.cache, self.params, self.by_model = client, cache, params, by_model
        self.reference_categories, self.reminder, self.counts = reference_categories, reminder, counts
        self.cache_file = None
        self._in_flight: dict[str, asyncio.Task] = {}

    async def all(self, todo: list[_Match], f, bar, report: Report, on_error: str) -> None:
        pending = [asyncio.ensure_future(self.one(match)) for match in todo]
        try:
            for next_done in asyncio.as_completed(pending):
                try:
                    record = await next_done
                except TeacherError:
                    if on_error == "stop":
                        raise
                    self.counts["failed_judgments"] += 1
                    continue
                append_json_line(f, record)
                report.written += 1
                bar.update(1)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.client.aclose()

    async def one(self, match: _Match) -> dict:
        question, turn = match.question, match.turn
        answer_1 = self.by_model[match.model_1][question.question_id]
        if match.model_2 is None:
            prompt, messages = single_messages(question, answer_1, turn,
                                               reference_categories=self.reference_categories)
            score, judgment, tstamp = await self.verdict(prompt, messages)
            return {"question_id": question.question_id, "model": match.model_1,
                    "judge": [self.client.model, prompt.name], "user_prompt": messages[1]["content"],
                    "judgment": judgment,
                    "score": NO_SCORE if score is None else score, "turn": turn, "tstamp": tstamp}
        answer_2 = self.by_model[match.model_2][question.question_id]
        games = []
        for a, b in ((answer_1, answer_2), (answer_2, answer_1)):  # the second game swaps the positions
            prompt, messages = pair_messages(question, a, b, turn, reference_categories=self.reference_categories)
            games.append((prompt, messages, self.verdict(prompt, messages)))
        (g1, j1, t1), (g2, j2, t2) = await asyncio.gather(*(game[2] for game in games))
        g1_map = {"A": "model_1", "B": "model_2", "tie": "tie", None: "error"}
        g2_map = {"A": "model_2", "B": "model_1", "tie": "tie", None: "error"}
        return {"question_id": question.question_id, "model_1": match.model_1, "model_2": match.model_2,
                "g1_winner": g1_map[g1], "g2_winner": g2_map[g2], "judge": [self.client.model, games[0][0].name],
                "g1_user_prompt": games[0][1][1]["content"], "g1_judgment": j1,
                "g2_user_prompt": games[1][1][1]["content"], "g2_judgment": j2, "turn": turn, "tstamp": max(t1, t2)}

    async def verdict(self, prompt: Prompt, messages: list[dict]) -> tuple[Any, str, float]:
        """(the verdict or None, the judgment text, when it was made), with one reminder when there is none."""
        parse = parse_rating if prompt.verdict == "rating" else parse_pair_verdict
        text, tstamp = await self.ask(messages)
        found = parse(text)
        if found is None and self.reminder:
            self.counts["reminders"] += 1
            follow_up = messages + [{"role": "assistant", "content": text},
                                    {"role": "user", "content": REMINDERS[prompt.verdict]}]
            again, tstamp = await self.ask(follow_up)
            found = parse(again)
            text += REMINDER_JOIN + again
            self.counts["verdicts_after_reminder"] += found is not None
        self.counts["parse_failures"] += found is None
        return found, text, tstamp

    async def ask(self, messages: list[dict]) -> tuple[str, float]:
        """The judge's reply to `messages` and when it was made: from the cache, or asked once (requests alike
        in flight at the same time share one)."""
        key = cache_key(self.client.model, messages, self.params)
        if entry := self.cache.get(key):
            self.counts["cached_replies"] += 1
            return entry["text"], entry["tstamp"]
        if key not in self._in_flight:
            self._in_flight[key] = asyncio.ensure_future(self._fetch(key, messages))
        return await self._in_flight[key]

    async def _fetch(self, key: str, messages: list[dict]) -> tuple[str, float]:
        try:
            reply = await self.client.chat(messages, **self.params)
        finally:
            self._in_flight.pop(key, None)
        tstamp = time.time()
        self.cache.put(self.cache_file, {"key": key, "text": reply.text, "finish_reason": reply.finish_reason,
                                         "prompt_tokens": reply.prompt_tokens,
                                         "completion_tokens": reply.completion_tokens, "tstamp": tstamp})
        return reply.text, tstamp


def _finish(out: Path, questions: list[Question], models: list[str], report: Report) -> None:
    """Sort the judgment file (question order, then models, then turn) and write the battles of pairwise ones."""
    records, _ = read_appended(out, _is_judgment, "a judgment record")
    order = {q.question_id: i for i, q in enumerate(questions)}
    rank = {m: i for i, m in enumerate(models)}

    def key(r: dict) -> tuple:
        names = [r["model"]] if "score" in r else [r["model_1"], r["model_2"]]
        return (order.get(r["question_id"], len(order)), [rank.get(n, len(rank)) for n in names], names, r["turn"],
                r["judge"][0])

    rewrite_sorted(out, records, key)
    pairwise = [r for r in records if "g1_winner" in r]
    report.facts["in_file"] = len(records)
    report.facts["in_file_without_verdict"] = sum(
        r.get("score") == NO_SCORE or "error" in (r.get("g1_winner"), r.get("g2_winner")) for r in records)
    if not pairwise:
        return
    battles = []
    for r in sorted(pairwise, key=key):
        if (outcome := pair_outcome(r)) is not None:
            winner = {"model_1": "model_a", "model_2": "model_b", "tie": "tie"}[outcome]
            battles.append({"model_a": r["model_1"], "model_b": r["model_2"], "winner": winner,
                            "question_id": r["question_id"], "turn": r["turn"], "judge": r["judge"][0]})
    path = battles_path(out)
    write_atomic(path, "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in battles))
    report.facts["battles"] = len(battles)
    report.facts["orders_disagree"] = sum(r["g1_winner"] != r["g2_winner"] and pair_outcome(r) is not None
                                          for r in pairwise)
    report.outputs["battles"] = str(path)
