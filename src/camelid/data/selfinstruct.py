"""Alpaca's self-instruct: a teacher model writes new tasks from a few examples, and Alpaca's filters keep the good.

Each request shows the teacher a few numbered example tasks (seed tasks written by people, and a third of them
machine-written once there are some) and asks for more in one plain format, which the parser reads forgivingly
(numbering and label variants, markdown bold, chatter around the tasks):

    Task 4
    Instruction: Name three rivers in Africa.
    Input: <noinput>
    Output: The Nile, the Congo and the Niger.
    ###

Every task then passes through the filters in one place, in the order replies arrive, so "unlike everything
kept" includes the tasks kept a moment ago from the same reply. A task is dropped under the first rule it
breaks, each counted in the report: too few or too many words, a word naming what a text model cannot do
(Alpaca's blacklist), "Write a program", a leading punctuation mark or non-ASCII character, an empty output, or a
ROUGE-L F1 of `rouge_threshold` or more against a kept instruction. Replies cut off at max_tokens lose their
last task.

A kept task is appended to the output JSONL and fsync'ed at once, so an interrupted run loses nothing it wrote.
Running again with the same output resumes: the tasks there count towards the target and join the ROUGE-L pool
(a line torn by a crash is cut off first), and the run stops at exactly `target` tasks in the file. The report
of a resumed run carries the earlier runs' totals forward (requests, tokens, cost, drops, why each stopped), so
`total_cost_usd` is what the whole file cost.
"""

import asyncio
import itertools
import json
import math
import random
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from tqdm import tqdm

from camelid.client import ChatClient, Reply, TeacherError
from camelid.data.formats import strict_records
from camelid.pipeline_report import Report, report_paths
from camelid.errors import CamelidError
from camelid.files import RESUME_HINT, append_json_line, open_to_append, read_appended

# Tasks a text-only model cannot do (Alpaca's list), matched as whole words in the instruction.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
MIN_WORDS, MAX_WORDS = 3, 150
NO_INPUT = "<noinput>"
ON_ERROR = ("stop", "skip")
MAX_FAILURES_IN_ROW = 10  # with on_error="skip": a teacher failing this often in a row is down, not unlucky
MAX_BARREN_REPLIES = 25  # replies in a row that keep nothing: the teacher cannot do the task or has run dry

SEED_HINT = ("expected JSONL of self-instruct seed tasks {instruction, instances: [{input, output}]} "
             "or Alpaca records {instruction, input, output}")


@dataclass
class Task:
    instruction: str
    input: str = ""
    output: str = ""


# -- seed tasks ------------------------------------------------------------------------------------------------


def read_seed_tasks(path: str | Path) -> list[Task]:
    """The tasks of a self-instruct seed file (its first instance each, as Alpaca shows them) or of Alpaca records.

    Alpaca records let one run's output seed the next. JSONL, or one JSON array; bad records raise, naming
    `path:line`.
    """
    path = Path(path)
    tasks = [_task_from_record(value, where) for where, value in strict_records(path, SEED_HINT)]
    if not tasks:
        raise CamelidError(f"{path}: no tasks in the file; {SEED_HINT}")
    return tasks


def _task_from_record(value: Any, where: str, hint: str = SEED_HINT) -> Task:
    if not isinstance(value, dict):
        raise CamelidError(f"{where}: not a JSON object; {hint}")
    fields = value
    if "instances" in value:
        instances = value["instances"]
        if not (isinstance(instances, list) and instances and isinstance(instances[0], dict)):
            raise CamelidError(f"{where}: 'instances' is not a non-empty list of {{input, output}} objects; {hint}")
        fields = instances[0]
    instruction, input_, output = value.get("instruction"), fields.get("input"), fields.get("output")
    for name, text in (("instruction", instruction), ("input", "" if input_ is None else input_), ("output", output)):
        if not isinstance(text, str):
            problem = "missing" if text is None else "not a string"
            raise CamelidError(f"{where}: '{name}' is {problem}; {hint}")
    if not instruction.strip():
        raise CamelidError(f"{where}: empty 'instruction'; {hint}")
    input_ = (input_ or "").strip()
    return Task(instruction.strip(), "" if _means_no_input(input_) else input_, output.strip())


# -- the prompt and the parser ---------------------------------------------------------------------------------


def build_prompt(examples: Sequence[Task], count: int) -> str:
    """The request for `count` new tasks, showing `examples` as tasks 1..k; the teacher is to write k+1 onwards."""
    k = len(examples)
    shown = "\n".join(_format_task(number, task) for number, task in enumerate(examples, 1))
    return (
        f"Below are {k} example tasks for an AI assistant. Write {count} new tasks, numbered {k + 1} to {k + count}, "
        "in exactly the same format.\n\n"
        "Guidelines:\n"
        "- Each new task differs from the examples and from the others: vary the verb, the topic and the kind "
        "of task (questions, advice, rewriting, classifying, brainstorming, explaining, solving, summarizing).\n"
        "- The assistant only reads and writes text, so no tasks about pictures, sound, video or the web.\n"
        "- The instruction is one or two sentences in English, a request or a question.\n"
        "- The input is the text the instruction works on. Many tasks need none: then write <noinput>.\n"
        "- The output is a good, complete answer of at most 100 words.\n"
        "- End every task with a line ###.\n\n"
        f"{shown}\n"
    )


def _format_task(number: int, task: Task) -> str:
    return (f"Task {number}\nInstruction: {task.instruction}\nInput: {task.input or NO_INPUT}\n"
            f"Output: {task.output}\n###")


_BOLD = r"(?:\*\*|__)?"
# "Task 4", "Task 4:", "**Task 4.**", "### Task #4", "4.", "4)", "**4.**", each maybe followed by more text.
_MARK = re.compile(
    rf"""^\s*(?:\#+\s*)?{_BOLD}\s*
        (?: (?P<task>task|example)\s*\#?\s*(?P<tn>\d+)\b | (?P<n>\d+)[.)](?!\d) )
        \s*{_BOLD}\s*[.):\-]?\s*{_BOLD}\s*(?P<rest>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)
# "Instruction: ...", "**Input:**", "**Output**: ...", "- instruction: ...", "### Output:"
_LABEL = re.compile(
    rf"^\s*(?:\#+\s*|[-•]\s+)?{_BOLD}\s*(?P<label>instruction|input|output)s?\s*{_BOLD}\s*:"
    rf"\s*{_BOLD}\s*(?P<text>.*)$",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^\s*(?:#{3,}|-{3,}|\*{3,}|={3,})\s*$")


def parse_tasks(text: str, first_number: int = 1) -> list[Task]:
    """The tasks in a teacher's reply, whose first new task is numbered `first_number`.

    A task starts at a "Task N" line, at a numbered line that carries a label ("4. Instruction: ...", though
    Alpaca's "4. Input:" inside task 4 goes on with it) or is followed by one, or at an Instruction label; it
    ends at the next task or at a separator line (### or ---). Text right after a task's number, before any
    label, is its instruction, unless an Instruction label follows (SmolLM2 writes "Task 1: Title" and then
    "Instructions: ..."). A bare "N. text" line starts a task only when N is the number expected next and
    an Input or Output label follows, so numbered lists inside outputs stay where they are. An input of
    <noinput>, None or N/A means no input. Chatter before the first task or after a separator is dropped;
    chatter after the last task without a separator stays in its output (the prompt asks for separators).
    """
    lines = text.splitlines()
    tasks: list[Task] = []
    fields: dict[str, list[str]] | None = None  # the task being read: its fields' lines
    labeled: set[str] = set()  # which of those fields had a label (an unlabeled instruction can be replaced)
    field: str | None = None  # where the next text line goes
    expected = first_number

    def close() -> None:
        nonlocal fields, field
        if fields is not None:
            tasks.append(_draft_task(fields))
        fields, field = None, None
        labeled.clear()

    for i, line in enumerate(lines):
        if _SEPARATOR.match(line):
            close()
            continue
        mark = _MARK.match(line)
        if mark and fields is not None and _numbers_own_label(mark, expected - 1):
            line = mark["rest"]
        elif mark and _opens_task(mark, lines, i, expected, started=bool(tasks) or fields is not None):
            close()
            fields = {}
            expected = int(mark["tn"] or mark["n"]) + 1
            line = mark["rest"]
            if not line.strip():
                continue
        label = _LABEL.match(line)
        if label:
            name = label["label"].lower()
            if fields is None or name in labeled or (name != "output" and "output" in fields) or (
                    name == "instruction" and "input" in fields):
                close()
                fields = {}
            fields[name] = [label["text"]]
            labeled.add(name)
            field = name
        elif fields is not None:
            if field is None:
                if not line.strip():
                    continue
                field = "instruction"
                fields[field] = []
            fields[field].append(line)
    close()
    return tasks


def _numbers_own_label(mark: re.Match, current: int) -> bool:
    """Whether `mark` is Alpaca's "4. Input:", numbering a later label of the task being read (task 4)."""
    label = _LABEL.match(mark["rest"])
    return bool(label) and label["label"].lower() != "instruction" and int(mark["tn"] or mark["n"]) == current


def _opens_task(mark: re.Match, lines: list[str], i: int, expected: int, started: bool) -> bool:
    """Whether numbered line `i` starts a task (see parse_tasks), rather than being a list item in an output."""
    rest = mark["rest"]
    if mark["task"] or _LABEL.match(rest):
        return True
    number = int(mark["n"])
    if number != expected and (started or number != 1):
        return False
    if not rest.strip():
        following = next((line for line in lines[i + 1 :] if line.strip()), "")
        if _LABEL.match(following):
            return True
    return _first_label_after(lines, i) in ("input", "output")


def _first_label_after(lines: list[str], i: int) -> str | None:
    """The first label after line i, if it comes before a separator or another numbered line (in
    "5. Kiwi / 5. Double the number. / Input: 4" only the second "5." has its Input next)."""
    for line in lines[i + 1 :]:
        mark = _MARK.match(line)
        if label := _LABEL.match(line) or (mark and _LABEL.match(mark["rest"])):
            return label["label"].lower()
        if mark or _SEPARATOR.match(line):
            return None
    return None


def _draft_task(fields: dict[str, list[str]]) -> Task:
    def text(name: str) -> str:
        return _clean("\n".join(fields.get(name, [])))

    input_ = text("input")
    return Task(text("instruction"), "" if _means_no_input(input_) else input_, text("output"))


def _clean(text: str) -> str:
    text = text.strip()
    for mark in ("**", "__"):  # an unpaired bold marker left from "**Instruction: ...**"
        if text.count(mark) % 2:
            text = text.removesuffix(mark) if text.endswith(mark) else text.removeprefix(mark)
    return text.strip()


def _means_no_input(text: str) -> bool:
    return re.sub(r"[\s<>()\[\].\"'`*_/-]", "", text.lower()) in {"", "noinput", "none", "na", "nil", "empty"}


# -- the filters -----------------------------------------------------------------------------------------------

_BLACKLISTED = re.compile(r"\b(?:" + "|".join(re.escape(word) for word in BLACKLIST) + r")\b", re.IGNORECASE)


def rule_broken(task: Task) -> str | None:
    """The first of Alpaca's filters that `task` fails, by the rule's name, or None; near-duplicates are apart."""
    instruction = task.instruction
    words = len(instruction.split())
    if not words:  # a numbered heading with nothing under it: what weak teachers write most
        return "no instruction"
    if words < MIN_WORDS:
        return f"instruction under {MIN_WORDS} words"
    if words > MAX_WORDS:
        return f"instruction over {MAX_WORDS} words"
    if _BLACKLISTED.search(instruction):
        return "blacklisted word"
    if instruction.lower().startswith("write a program"):
        return "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with non-ASCII"
    if not task.output.strip():
        return "empty output"
    return None


def rouge_tokens(text: str) -> list[str]:
    """Words as rouge_score makes them (without stemming): lowercase, split at anything but a-z and 0-9."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts: 2 LCS / (len a + len b) over their words."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return 2 * LCSseq.similarity(ta, tb) / (len(ta) + len(tb)) if ta and tb else 0.0


class SimilarityPool:
    """Instructions kept so far, to find the one most like a new instruction by ROUGE-L F1."""

    def __init__(self, texts: Iterable[str] = ()):
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._lengths: list[int] = []
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self.texts.append(text)
        self._tokens.append(tokens)
        self._lengths.append(len(tokens))

    def most_similar(self, text: str) -> tuple[str | None, float]:
        """The kept instruction most like `text` and its ROUGE-L F1; (None, 0.0) when there is nothing to compare."""
        tokens = rouge_tokens(text)
        if not tokens or not self.texts:
            return None, 0.0
        lcs = process.cdist([tokens], self._tokens, scorer=LCSseq.similarity, dtype=np.int32)[0]
        f1 = 2 * lcs / (len(tokens) + np.asarray(self._lengths))
        best = int(np.argmax(f1))
        return self.texts[best], float(f1[best])


# -- the run ---------------------------------------------------------------------------------------------------


def generate_instructions(client: ChatClient, seed_tasks: str | Path | Sequence[Task], out: str | Path, *,
                          target: int, per_request: int = 8, examples_per_prompt: int = 3,
                          rouge_threshold: float = 0.7, on_error: str = "stop", seed: int = 0,
                          temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 1024,
                          progress: bool = True) -> Report:
    """Ask `client`'s model for tasks until the JSONL file `out` holds `target` of them; resumes what `out` has.

    seed_tasks: a seed file (see read_seed_tasks) or tasks already read. per_request: new tasks asked for in
    each request. examples_per_prompt: tasks shown in each request, a third of them (rounded down) from those
    kept once there are some. rouge_threshold: a task whose instruction has a ROUGE-L F1 this high against a kept
    one is a near-duplicate. on_error: "stop" raises the teacher's TeacherError; "skip" counts a request that
    failed for a reason that may pass (its retries ran out) and goes on, until MAX_FAILURES_IN_ROW fail in a row,
    but still stops at once on one that cannot (a bad key, an unknown model, a refused request). seed: picks the
    examples and each request's `seed`.
    temperature, top_p, max_tokens: the teacher's sampling, per request. Alpaca sampled text-davinci-003 at
    temperature 1 and top_p 1; SmolLM2-135M writes gibberish there and usable tasks at 0.7 and 0.9. Eight tasks
    take some 600-900 tokens.

    The report (`out`.report.json and .txt) is saved whether the run ends well or not. Its `read` is the tasks
    parsed from replies and `written` those kept in this run; its dropped counts are tasks, except "request
    failed" and "reply without tasks", which count requests. `requests`, `prompt_tokens`, `cost_usd` and the
    like are this run's; when it resumes an existing `out`, the totals of every run so far are read from the
    report there and carried on: `runs`, `total_requests`, `total_retries`, `total_failed_requests`,
    `total_prompt_tokens`, `total_completion_tokens`, `total_cost_usd`, `total_dropped` (by rule) and
    `earlier_stops` (why each earlier run that stopped early did). The client is closed at the end (it reopens if
    used again).
    """
    for name, value in (("--target", target), ("--per-request", per_request),
                        ("--examples-per-prompt", examples_per_prompt), ("--max-tokens", max_tokens)):
        if value < 1:
            raise CamelidError(f"{name} must be at least 1 (got {value})")
    if not 0 < rouge_threshold <= 1:
        raise CamelidError(f"--rouge-threshold must be above 0 and at most 1 (got {rouge_threshold})")
    if on_error not in ON_ERROR:
        raise CamelidError(f"--on-error must be one of {', '.join(ON_ERROR)} (got {on_error!r})")
    out = Path(out)
    if isinstance(seed_tasks, (str, Path)) and _same_file(out, Path(seed_tasks)):
        raise CamelidError(f"{out} is the seed file; write the new tasks to another file")
    seeds = read_seed_tasks(seed_tasks) if isinstance(seed_tasks, (str, Path)) else list(seed_tasks)
    if not seeds:
        raise CamelidError("no seed tasks: pass a seed file of self-instruct tasks or Alpaca records")
    report = Report("selfinstruct")
    resuming = out.is_file()
    kept = _resume(out, report)
    earlier = _earlier_totals(out, report) if resuming else None
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}

    async def run() -> Report:
        try:
            await _generate(client, seeds, kept, out, report, earlier, target=target, per_request=per_request,
                            examples=examples_per_prompt, rouge_threshold=rouge_threshold, on_error=on_error,
                            rng=random.Random(seed), sampling=sampling, progress=progress)
        finally:
            await client.aclose()
        return report

    return asyncio.run(run())


async def _generate(client: ChatClient, seeds: list[Task], kept: list[Task], out: Path, report: Report,
                    earlier: dict | None, *, target: int, per_request: int, examples: int, rouge_threshold: float,
                    on_error: str, rng: random.Random, sampling: dict, progress: bool) -> None:
    """Keep up to client.concurrency requests in flight and filter their replies as they come, until `target`."""
    resumed = len(kept)
    pool = SimilarityPool(task.instruction for task in seeds + kept)
    usage_before = replace(client.usage)
    pending: dict[asyncio.Task, tuple[int, int]] = {}  # request -> (order sent, the number of its first new task)
    order = itertools.count()
    replies = failures_in_row = barren_in_row = 0
    stopped = None  # why the run ended early, for the report
    bar = tqdm(total=target, initial=min(resumed, target), desc="selfinstruct", unit="task", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    try:
        with open_to_append(out) as f:
            while len(kept) < target:
                wanted = _in_flight_wanted(target - len(kept), report.written, replies, per_request, client)
                for _ in range(wanted - len(pending)):
                    shown = _pick_examples(rng, seeds, kept, examples)
                    first = len(shown) + 1
                    messages = [{"role": "user", "content": build_prompt(shown, per_request)}]
                    params = {**sampling, "stop": [f"Task {first + per_request}"], "seed": rng.randrange(2**31)}
                    pending[asyncio.ensure_future(client.chat(messages, **params))] = (next(order), first)
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for request in sorted(done, key=lambda r: pending[r][0]):
                    _, first = pending.pop(request)
                    if len(kept) >= target:
                        break
                    try:
                        reply = request.result()
                    except TeacherError as exc:
                        if on_error == "stop" or not exc.retryable:
                            raise
                        report.drop("request failed")
                        failures_in_row += 1
                        if failures_in_row >= MAX_FAILURES_IN_ROW:
                            raise TeacherError(f"{failures_in_row} requests in a row failed, the last: {exc}",
                                               retryable=True) from None
                        continue
                    failures_in_row = 0
                    replies += 1
                    written_before = report.written
                    _take(reply, first, f, kept, pool, report, target=target, rouge_threshold=rouge_threshold)
                    bar.update(report.written - written_before)
                    barren_in_row = 0 if report.written > written_before else barren_in_row + 1
                    if barren_in_row >= MAX_BARREN_REPLIES and len(kept) < target:
                        raise CamelidError(
                            f"the teacher's last {barren_in_row} replies gave no task worth keeping (see "
                            f"{out}.report.txt for why); try a stronger teacher or a higher --temperature, "
                            "then run again to resume")
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
        stopped = "interrupted" if interrupted else str(exc) or type(exc).__name__
        raise
    finally:
        for request in pending:
            request.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
        _account(report, client.usage.since(usage_before), seeds=len(seeds), resumed=resumed, target=target,
                 in_file=len(kept))
        if stopped:
            report.facts["stopped"] = stopped
        _add_totals(report, earlier)
        report.outputs["data"] = str(out)
        report.save(out)


def _take(reply: Reply, first: int, f, kept: list[Task], pool: SimilarityPool, report: Report, *, target: int,
          rouge_threshold: float) -> None:
    """Parse one reply and write each of its tasks that passes every filter, until `kept` reaches `target`."""
    tasks = parse_tasks(reply.text, first)
    if not tasks:
        report.drop("reply without tasks")
    report.read += len(tasks)
    if tasks and reply.finish_reason == "length":
        tasks.pop()
        report.drop("cut off at max_tokens")
    for task in tasks:
        if len(kept) >= target:
            report.drop("beyond target")
        elif record := _filtered(task, pool, rouge_threshold, report):
            append_json_line(f, record)
            kept.append(task)
            pool.add(task.instruction)
            report.written += 1


def _filtered(task: Task, pool: SimilarityPool, rouge_threshold: float, report: Report) -> dict | None:
    """The record to write for `task`, or None when a rule drops it (counted in `report`)."""
    if rule := rule_broken(task):
        report.drop(rule)
        return None
    most_similar, score = pool.most_similar(task.instruction)
    if score >= rouge_threshold:
        report.drop("near-duplicate (ROUGE-L)")
        return None
    return {"instruction": task.instruction, "input": task.input, "output": task.output,
            "most_similar": most_similar, "rouge_l": round(score, 4)}


def _pick_examples(rng: random.Random, seeds: list[Task], kept: list[Task], k: int) -> list[Task]:
    """k tasks to show: seed tasks first, then a third of k (rounded down) from those kept, once there are some."""
    machine = min(k // 3, len(kept))
    return rng.sample(seeds, min(k - machine, len(seeds))) + rng.sample(kept, machine)


def _in_flight_wanted(remaining: int, kept: int, replies: int, per_request: int, client: ChatClient) -> int:
    """How many requests to have in flight: enough for the tasks still wanted at the yield seen so far.

    Near the end this sends fewer requests than `concurrency`, so the run does not pay for replies it drops.
    """
    per_reply = kept / replies if replies else per_request
    return max(1, min(client.concurrency, math.ceil(remaining / max(per_reply, 0.25))))


def _account(report: Report, used, *, seeds: int, resumed: int, target: int, in_file: int) -> None:
    report.facts.update({
        "seed_tasks": seeds,
        "target": target,
        "resumed": resumed,
        "in_file": in_file,
        "requests": used.requests,
        "retries": used.retries,
        "failed_requests": used.failures,
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.completion_tokens,
        "cost_usd": round(used.cost, 6),
    })
    if used.without_usage:
        report.facts["replies_without_usage"] = used.without_usage  # their tokens and cost count as 0


# -- the output file -------------------------------------------------------------------------------------------


def _resume(out: Path, report: Report) -> list[Task]:
    """The tasks an earlier run kept in `out`. A last line without its newline (a crash mid-write) is cut off."""
    tasks, torn_at = read_appended(out, _is_record, "a task record", convert=_task_from_line)
    if torn_at:
        report.facts["torn_line_removed"] = torn_at
    return tasks


def _is_record(value: Any) -> bool:
    """Whether `value` has the shape of what this command writes: Alpaca's three strings, not a seed task."""
    return (isinstance(value, dict) and "instances" not in value
            and all(isinstance(value.get(name), str) for name in ("instruction", "input", "output")))


def _task_from_line(raw: bytes, where: str) -> Task:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = f"column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise CamelidError(f"{where}: invalid JSON ({detail})") from None
    if isinstance(value, dict) and "instances" in value:
        raise CamelidError(f"{where}: a seed task ({{instruction, instances}}), not a task record; {RESUME_HINT}")
    if isinstance(value, dict) and not _is_record(value):
        name = next(n for n in ("instruction", "input", "output") if not isinstance(value.get(n), str))
        problem = "missing" if value.get(name) is None else "not a string"
        raise CamelidError(f"{where}: '{name}' is {problem}; {RESUME_HINT}")
    return _task_from_record(value, where, RESUME_HINT)


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` name one file (through links, `..` or a second hard link)."""
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


# -- totals over every run that wrote the file -----------------------------------------------------------------

_TOTALS = ("requests", "retries", "failed_requests", "prompt_tokens", "completion_tokens")


def _earlier_totals(out: Path, report: Report) -> dict | None:
    """The totals of the runs that wrote `out` so far, from the report beside it; None when there is none.

    A report written before totals were kept counts as one run with its own numbers. One that cannot be read
    is noted in `report`, and the totals then start again from this run.
    """
    path = report_paths(out)[0]
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if not (isinstance(saved, dict) and saved.get("pipeline") == "selfinstruct"):
        report.facts["earlier_report_unreadable"] = f"{path}; the totals count from this run"
        return None

    def number(key: str) -> float:
        value = saved.get(f"total_{key}", saved.get(key))
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0

    runs = saved.get("runs")
    runs = runs if isinstance(runs, int) and not isinstance(runs, bool) and runs > 0 else 1
    dropped = saved.get("total_dropped", saved.get("dropped"))
    dropped = {rule: n for rule, n in dropped.items() if isinstance(n, int)} if isinstance(dropped, dict) else {}
    stops = saved.get("earlier_stops")
    stops = dict(stops) if isinstance(stops, dict) else {}
    if isinstance(saved.get("stopped"), str):
        stops[f"run {runs}"] = saved["stopped"]
    return {"runs": runs, **{key: number(key) for key in (*_TOTALS, "cost_usd")}, "dropped": dropped,
            "stops": stops}


def _add_totals(report: Report, earlier: dict | None) -> None:
    """This run's numbers (already in `report`) added to the earlier runs' totals, as report facts."""
    earlier = earlier or {"runs": 0, "dropped": {}, "stops": {}}
    facts = report.facts
    facts["runs"] = earlier["runs"] + 1
    for key in _TOTALS:
        facts[f"total_{key}"] = int(earlier.get(key, 0)) + facts[key]
    facts["total_cost_usd"] = round(earlier.get("cost_usd", 0) + facts["cost_usd"], 6)
    dropped = Counter(earlier["dropped"])
    dropped.update(report.dropped)
    facts["total_dropped"] = dict(dropped.most_common())
    if earlier["stops"]:
        facts["earlier_stops"] = earlier["stops"]
