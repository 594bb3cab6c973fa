"""Preference data from camelid's own verdicts: `camelid data pairs` closes the loop from judging to training.

Three kinds of input, told by their keys:
- arena votes (`camelid serve --votes`): model_a, model_b, winner, conversation_a, conversation_b. Each vote
  holds both conversations, so nothing else is needed.
- battles of pairwise judgments (`eval judge --mode pairwise-*` writes OUT.battles.jsonl): model_a, model_b,
  winner, question_id, turn. The conversations are rebuilt from the question file and the answer files the
  judge read (`--questions`, `--answers`).
- single-answer judgments (`eval judge --mode single`): question_id, model, score, turn; with the same files.

A decisive verdict makes a pair (prompt, chosen, rejected: TRL's layout, messages each) and, with `--kto`, two
labelled answers (winner desirable, loser not). A tie has no chosen answer: it is dropped, or with
`ties="keep"` its two answers go to the KTO file as desirable; `tie (bothbad)` likewise as undesirable with
`both_bad="keep"`. A single judgment's answer is desirable from score `good` up, undesirable up to `bad`, and
dropped between them. A pair needs one prompt: a second-turn verdict compares two conversations that already
differ in their first answers, so it makes KTO rows but no pair. Everything dropped is counted, by why.

This reads eval's files and writes data, so it lives in eval/ (data/ comes before eval/ in the layers) while
the verb is `camelid data pairs`.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from camelid.data.formats import strict_records
from camelid.errors import CamelidError
from camelid.files import write_atomic

HINT = "give arena votes, judge battles (OUT.battles.jsonl) or single judgments of `camelid eval judge`"
DECISIVE = {"model_a": ("a", "b"), "model_b": ("b", "a")}
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


@dataclass
class PairsReport:
    pairs: int = 0
    kto: int = 0
    read: Counter = field(default_factory=Counter)  # records read, by kind
    dropped: Counter = field(default_factory=Counter)  # why

    def text(self) -> str:
        read = ", ".join(f"{n:,} {kind}" for kind, n in self.read.items())
        lines = [f"read {read}", f"wrote {self.pairs:,} pairs" + (f" and {self.kto:,} labelled answers (KTO)"
                                                                    if self.kto else "")]
        lines += [f"  dropped {n:,}: {why}" for why, n in self.dropped.most_common()]
        return "\n".join(lines)


def make_pairs(inputs: list[str | Path], out: str | Path | None, *, kto_out: str | Path | None = None,
               questions: str | Path | None = None, answers: list[str | Path] = (), ties: str = "drop",
               both_bad: str = "drop", good: float = 7.0, bad: float = 4.0) -> PairsReport:
    """Write the pairs of `inputs` to `out` and, with `kto_out`, their labelled answers; see the docstring."""
    if out is None and kto_out is None:
        raise CamelidError("nothing to write; give --out for pairs and/or --kto for labelled answers")
    for name, value in (("ties", ties), ("both_bad", both_bad)):
        if value not in ("drop", "keep"):
            raise CamelidError(f"{name} must be drop or keep, not {value!r}")
        if value == "keep" and kto_out is None:
            raise CamelidError(f"keeping {name.replace('_', '-')} writes their answers as KTO rows; give --kto FILE")
    if not bad < good:
        raise CamelidError(f"--bad ({bad}) must be below --good ({good})")
    report, pairs, labelled = PairsReport(), [], []
    conversations = _Conversations(questions, answers)
    for where, record in _verdicts(inputs):
        kind = _kind(record, where)
        report.read[kind] += 1
        if kind == "single judgments":
            labelled += _judged(record, conversations, good, bad, report, where)
            continue
        sides = _sides(record, kind, conversations, report, where)
        if sides is None:
            continue
        winner = record["winner"]
        unusable = _unusable(sides)
        if unusable:
            report.dropped[unusable] += 1
        elif winner in DECISIVE:
            first, second = DECISIVE[winner]
            pair = _pair(sides[first], sides[second], record, first, second, report)
            if pair is not None:
                pairs.append(pair)
            labelled += [_labelled(sides[first], True, record[f"model_{first}"]),
                         _labelled(sides[second], False, record[f"model_{second}"])]
        elif (winner == "tie" and ties == "keep") or (winner == "tie (bothbad)" and both_bad == "keep"):
            labelled += [_labelled(sides[s], winner == "tie", record[f"model_{s}"]) for s in "ab"]
        else:
            report.dropped["a tie" if winner == "tie" else "both answers bad (tie (bothbad))"] += 1
    if out is not None:
        _write(Path(out), pairs)
        report.pairs = len(pairs)
    if kto_out is not None:
        _write(Path(kto_out), labelled)
        report.kto = len(labelled)
    return report


def _verdicts(inputs):
    for path in inputs:
        yield from strict_records(path, HINT)


def _kind(record, where: str) -> str:
    if not isinstance(record, dict):
        raise CamelidError(f"{where}: not a JSON object; {HINT}")
    if "score" in record and "model" in record:
        return "single judgments"
    if "winner" in record and "model_a" in record:
        if record["winner"] not in WINNERS:
            raise CamelidError(f"{where}: winner {record['winner']!r} is not one of {', '.join(WINNERS)}")
        return "votes" if "conversation_a" in record else "battles"
    raise CamelidError(f"{where}: neither a vote, a battle nor a single judgment; {HINT}")


class _Conversations:
    """The conversation a model had on a question up to a turn, from the question and answer files."""

    def __init__(self, questions, answers):
        self.questions = self.answers = None
        if questions is not None:
            from camelid.eval.answers import read_answers, read_questions

            self.questions = {q.question_id: q for q in read_questions(questions)}
            self.answers = read_answers(list(answers)) if answers else {}

    def of(self, model: str, question_id, turn: int, where: str) -> list[dict] | str:
        """The messages through the answer of `turn` (1-based), or why there are none."""
        if self.questions is None:
            raise CamelidError(f"{where}: battles and single judgments name their answers by question; give "
                               "--questions and --answers (the files `eval judge` read)")
        question = self.questions.get(question_id)
        if question is None:
            return "the question is not in --questions"
        answer = self.answers.get(model, {}).get(question_id)
        if answer is None:
            return "no answer of the model in --answers"
        if not isinstance(turn, int) or not 1 <= turn <= min(len(question.turns), len(answer)):
            return "the turn is not in the question and its answer"
        messages = []
        for q, a in zip(question.turns[:turn], answer[:turn]):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages


def _sides(record, kind: str, conversations: _Conversations, report: PairsReport, where: str):
    """The two conversations of a vote or battle, {"a": messages, "b": messages}, or None (counted)."""
    if kind == "votes":
        sides = {s: record[f"conversation_{s}"] for s in "ab"}
        if not all(isinstance(c, list) and c and isinstance(c[-1], dict) for c in sides.values()):
            raise CamelidError(f"{where}: conversation_a and conversation_b must be lists of messages")
        return sides
    sides = {s: conversations.of(record[f"model_{s}"], record.get("question_id"), record.get("turn", 1), where)
             for s in "ab"}
    missing = next((v for v in sides.values() if isinstance(v, str)), None)
    if missing:
        report.dropped[missing] += 1
        return None
    return sides


def _pair(chosen: list[dict], rejected: list[dict], record, first: str, second: str,
          report: PairsReport) -> dict | None:
    if chosen[:-1] != rejected[:-1]:
        report.dropped["a later turn (the conversations differ before the judged answer): KTO rows only"] += 1
        return None
    extra = {k: record[k] for k in ("question_id", "battle", "judge") if k in record}
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:],
            "chosen_model": record[f"model_{first}"], "rejected_model": record[f"model_{second}"]} | extra


def _unusable(sides: dict) -> str | None:
    """Why a verdict on these two answers teaches nothing (an empty answer, the same answer twice), or None."""
    answers = [sides[s][-1].get("content") for s in "ab"]
    if not all(isinstance(a, str) and a.strip() for a in answers):
        return "an empty answer"
    if answers[0] == answers[1] and sides["a"][:-1] == sides["b"][:-1]:
        return "both answers the same"
    return None


def _labelled(messages: list[dict], label: bool, model: str) -> dict:
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": label, "model": model}


def _judged(record, conversations: _Conversations, good: float, bad: float, report: PairsReport,
            where: str) -> list[dict]:
    score = record.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or score < 0:
        report.dropped["no verdict (score -1)"] += 1
        return []
    if bad < score < good:
        report.dropped[f"a score between --bad {bad:g} and --good {good:g}"] += 1
        return []
    messages = conversations.of(record["model"], record.get("question_id"), record.get("turn", 1), where)
    if isinstance(messages, str):
        report.dropped[messages] += 1
        return []
    return [_labelled(messages, score >= good, record["model"])]


def _write(path: Path, records: list[dict]) -> None:
    import json

    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
