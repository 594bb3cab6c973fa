"""The formats chat data comes in, one registry that every verb reads through, and the records they become.

A source (a file, folder or Hub name: camelid.data.sources) gives records; each record's format is told by its
keys (so a file may mix them), or forced with `format=` (`--format`). `columns=` (`--columns`) first renames
a file's top-level keys to the ones a format reads (`{"instruction": "question"}` reads `question` as the
instruction). A record becomes a `Record`: OpenAI-style messages (an optional system message, then user and
assistant turns alternating, ending with the assistant; `tool` messages answer an assistant's `tool_calls`),
plus the rejected answer of a preference pair or the label of a KTO row, the tools it may call, and its other
keys. A leading assistant turn and trailing user or tool turns are dropped, as none can be trained on. A record
that cannot be made into one is an error naming its `path:line` (or `path:row N`), or, with `skip_bad`, a
skipped entry with a short reason.

The formats, in the order they are told apart:

| name | keys | kind |
|---|---|---|
| sharegpt-preference | conversations, chosen, rejected ({from, value} each): LLaMA-Factory | preference |
| alpaca-preference | instruction, chosen, rejected (strings): LLaMA-Factory | preference |
| hh-rlhf | chosen, rejected: whole "Human: / Assistant:" transcripts (Anthropic HH-RLHF) | preference |
| preference | prompt (string or messages), chosen, rejected (strings or messages): TRL, UltraFeedback | preference |
| ultrafeedback | instruction, completions ({response, overall_score}): openbmb/UltraFeedback | preference |
| kto | messages or prompt + completion, with a boolean label: TRL, LLaMA-Factory | kto |
| openai | messages ({role, content, tool_calls}), tools | conversation |
| sharegpt | conversations ({from, value}; roles human/gpt/system/function_call/observation/...), tools | conversation |
| alpaca | instruction, input, output, system, history | conversation |
| gpt4all | prompt, response | conversation |
"""

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from camelid.data.sources import (  # noqa: F401  (re-exported: the reader's names for the verbs)
    CUT_INSIDE_ARRAY,
    CUT_INSIDE_RECORD,
    SKIP_HINT,
    BadRecord,
    json_records,
    source_records,
)
from camelid.errors import CamelidError
from camelid.files import write_atomic

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory (Glaive): the assistant's call, a JSON {name, arguments}
    "observation": "tool",  # LLaMA-Factory: what the tool returned
    "tool": "tool",
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")

# Reasons that other modules act on: curation counts a message without text as an empty response.
EMPTY_CONTENT = "empty message content"
MISSING_CONTENT = "missing message content"  # a user or assistant turn's content is null or absent

T = TypeVar("T")


@dataclass
class Record:
    """One record as camelid uses it, and where it came from.

    `messages` is the conversation; for a preference pair it ends with the chosen answer and `rejected` is the
    other answer to the same prompt; for a KTO row it ends with the judged answer and `label` is its verdict.
    """

    messages: list[dict]
    where: str  # "path:line" of the record's first line, or "path:row N"
    format: str = "openai"
    rejected: dict | None = None
    label: bool | None = None
    tools: list | None = None
    extra: dict = field(default_factory=dict)  # the record's keys that its format does not read (id, source, ...)

    @property
    def kind(self) -> str:
        return "preference" if self.rejected is not None else "kto" if self.label is not None else "conversation"

    def for_sft(self) -> list[dict] | None:
        """What supervised training learns from it: the conversation, a pair's chosen answer, a KTO row's answer
        when it is desirable (None when not)."""
        return None if self.label is False else self.messages

    def to_json(self) -> dict:
        """The record in the layout camelid writes, which TRL reads too: `messages` (and `tools`) for a
        conversation, `prompt`/`chosen`/`rejected` for a pair, `prompt`/`completion`/`label` for a KTO row."""
        if self.kind == "conversation":
            out = {"messages": self.messages} | ({"tools": self.tools} if self.tools else {})
        elif self.kind == "preference":
            out = {"prompt": self.messages[:-1], "chosen": self.messages[-1:], "rejected": [self.rejected]}
        else:
            out = {"prompt": self.messages[:-1], "completion": self.messages[-1:], "label": self.label}
        if self.tools and self.kind != "conversation":
            out["tools"] = self.tools
        return out | self.extra


class Skipped(NamedTuple):
    """A record dropped by `skip_bad`: where it starts and the short reason."""

    where: str
    reason: str


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        """How many records were dropped for each reason, the commonest first."""
        return dict(Counter(reason for _, reason in self.skipped).most_common())

    def summary(self) -> str:
        """"998 records" or "998 records; skipped 2 of 1,000: 1 invalid JSON, 1 empty message content"."""
        line = f"{len(self.records):,} records"
        if self.skipped:
            line += f"; {skipped_line(len(self.records), Counter(self.skipped_by_reason()))}"
        return line


# -- reading -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """How to read a source's records: a forced format (None: told by each record's keys), and column renames
    {camelid key: the file's key}."""

    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise CamelidError(f"unknown data format {self.format!r}; the formats: {', '.join(FORMATS)}")

    def record(self, value: Any, where: str) -> Record:
        return to_record(value, where, self)


def read_conversations(path, *, skip_bad: bool = False, reading: Reading | None = None) -> ReadResult:
    """Every record of a source; bad records raise, or are listed when `skip_bad`."""
    result = ReadResult()
    for item in iter_conversations(path, skip_bad=skip_bad, reading=reading):
        (result.skipped if isinstance(item, Skipped) else result.records).append(item)
    return result


def iter_conversations(path, *, skip_bad: bool = False, reading: Reading | None = None) -> Iterator[Record | Skipped]:
    """The source's records in order, as a `Record` each, or a `Skipped` for a bad one when `skip_bad`."""
    return iter_records(path, (reading or Reading()).record, skip_bad=skip_bad)


def iter_records(path, convert: Callable[[Any, str], T], *, skip_bad: bool = False) -> Iterator[T | Skipped]:
    """`convert(value, "path:line")` for each record of a source, in order.

    A record that cannot be read, or that `convert` refuses by raising `BadRecord`, raises, after the rest of the
    source is read to say how many more are bad. With `skip_bad` it comes out as a `Skipped` instead, unless
    every record is bad: that raises at the end (see check_not_all_bad), so that a reader writing atomically
    writes nothing.
    """
    kept, skipped, first_bad = 0, Counter(), None
    for where, value in source_records(path):
        try:
            if isinstance(value, BadRecord):
                raise value
            item = convert(value, where)
            kept += 1
        except BadRecord as bad:
            if first_bad is None:
                first_bad = bad
            skipped[bad.reason] += 1
            if not skip_bad:
                continue  # counted, to say how many follow the first
            item = Skipped(bad.where, bad.reason)
        if first_bad is None or skip_bad:
            yield item
    if first_bad is not None and not skip_bad:
        raise with_count(first_bad, sum(skipped.values()) - 1)
    check_not_all_bad(path, kept, sum(skipped.values()), first_bad)


def skipped_line(kept: int, skipped: Counter) -> str:
    """"skipped 2 of 1,000: 1 invalid JSON, 1 empty message content"."""
    n = sum(skipped.values())
    reasons = ", ".join(f"{count:,} {reason}" for reason, count in skipped.most_common())
    return f"skipped {n:,} of {kept + n:,}: {reasons}"


def with_count(bad: BadRecord, more: int) -> BadRecord:
    """The first bad record's error, saying how many more bad records follow it."""
    return BadRecord(bad.where, bad.reason, bad.detail, more) if more else bad


def check_not_all_bad(path, kept: int, bad: int, first) -> None:
    """A one-line error when --skip-bad skipped every record of a source: it is not data in a format camelid
    reads, and going on would write nothing and report success."""
    if bad and not kept:
        raise CamelidError(f"{path}: every one of its {bad:,} records was bad (the first at {first.where}: "
                           f"{first.reason}); is it in a format camelid reads? give --format or --columns (recipe "
                           "keys data_format, columns)")


def strict_records(path, hint: str) -> Iterator[tuple[str, Any]]:
    """("path:line", parsed object) for each record of a source, for readers without --skip-bad: a record that
    cannot be read raises a one-line error ending with `hint`."""
    for where, value in source_records(path):
        if isinstance(value, BadRecord):
            detail = f" ({value.detail})" if value.detail else ""
            raise CamelidError(f"{where}: {value.reason}{detail}; {hint}")
        yield where, value


def write_jsonl(path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, replacing `path` all at once."""
    write_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`instruction=question,output=answer` (camelid's key = the file's) as a dict; a dict is checked as is."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.partition("=")[::2] for p in spec.split(","))
    columns = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if not ours or not theirs:
            raise CamelidError(f"--columns {spec!r}: give KEY=COLUMN pairs separated by commas, e.g. "
                               "instruction=question,output=answer")
        columns[ours] = theirs
    return columns


# -- telling formats apart -------------------------------------------------------------------------------------


def to_record(value: Any, where: str, reading: Reading = Reading()) -> Record:
    """One record, in any registered format, as a validated `Record`; raises `BadRecord` if it cannot be."""
    if not isinstance(value, dict):
        raise BadRecord(where, "not a JSON object")
    if reading.columns:
        value = _renamed(value, reading.columns, where)
    name = reading.format or detect_format(value)
    if name is None:
        raise BadRecord(where, "unknown format", f"keys {', '.join(sorted(value)[:8]) or 'none'}; give --format "
                                                 f"({', '.join(FORMATS)}) or --columns KEY=COLUMN")
    spec = FORMATS[name]
    for key in spec.needs:
        if key not in value:
            raise BadRecord(where, f"missing '{key}'", f"format {name}")
    record = spec.read(value, where)
    record.format = name
    record.extra = {k: v for k, v in value.items() if k not in spec.reads}
    return record


def to_messages(value: Any, where: str) -> list[dict]:
    """A record's conversation (see `Record.messages`)."""
    return to_record(value, where).messages


def detect_format(value: dict) -> str | None:
    """The name of the first format whose test the record passes, None when none does."""
    return next((name for name, spec in FORMATS.items() if spec.detect(value)), None)


def _renamed(value: dict, columns: dict[str, str], where: str) -> dict:
    missing = [theirs for theirs in columns.values() if theirs not in value]
    if missing:
        raise BadRecord(where, f"no column '{missing[0]}'", f"named in --columns; the record has {', '.join(value)}")
    renamed = {k: v for k, v in value.items() if k not in columns.values()}
    return renamed | {ours: value[theirs] for ours, theirs in columns.items()}


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict], bool]
    read: Callable[[dict, str], Record]
    needs: tuple[str, ...]  # keys it cannot do without
    reads: tuple[str, ...]  # every key it takes; the others are the record's extra keys
    about: str  # its keys and where it comes from, for --help


def _has(*keys):
    return lambda value: all(k in value for k in keys)


def _is_transcript(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip().startswith("Human:")


# -- conversations ---------------------------------------------------------------------------------------------


def _openai(value: dict, where: str) -> Record:
    return Record(_validated(_openai_turns(value["messages"], where, "messages"), where), where,
                  tools=_tools(value, where))


def _sharegpt(value: dict, where: str) -> Record:
    turns = _system_first(value, _sharegpt_turns(value["conversations"], where))  # LLaMA-Factory's `system`
    return Record(_validated(turns, where), where, tools=_tools(value, where))


def _alpaca(value: dict, where: str) -> Record:
    return Record(_validated(_alpaca_prompt(value, where) + [_turn("assistant", value["output"])], where), where)


def _gpt4all(value: dict, where: str) -> Record:
    return Record(_validated([_turn("user", value["prompt"]), _turn("assistant", value["response"])], where), where)


def _alpaca_prompt(value: dict, where: str) -> list[dict]:
    """Alpaca follows FastChat and axolotl: the instruction, then a blank line and the input when there is one;
    `system` becomes the system message; LLaMA-Factory's `history` ([question, answer] pairs) comes before."""
    instruction, extra = value["instruction"], value.get("input") or ""
    if isinstance(instruction, str) and isinstance(extra, str) and extra:
        instruction = f"{instruction}\n\n{extra}"
    elif not isinstance(extra, str):
        instruction = extra  # reported later as content that is not a string
    turns = [_turn("system", value["system"])] if value.get("system") is not None else []
    history = value.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise BadRecord(where, "'history' is not a list of [question, answer] pairs")
    for question, answer in history:
        turns += [_turn("user", question), _turn("assistant", answer)]
    return turns + [_turn("user", instruction)]


def _turn(role: str, content: Any) -> dict:
    return {"role": role, "content": content}


def _openai_turns(messages: Any, where: str, key: str) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRecord(where, f"'{key}' is not a list")
    turns = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadRecord(where, "message is not an object", f"message {i}")
        role, content = message.get("role"), message.get("content")
        if role not in OPENAI_ROLES:
            raise BadRecord(where, f"unknown role {role!r}", f"message {i}; expected one of {', '.join(OPENAI_ROLES)}")
        if isinstance(content, list):
            content = _join_text_parts(content, where, i)
        turn = _turn(role, content)
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = _tool_calls(message["tool_calls"], where, i)
        if role == "tool":
            turn |= {k: message[k] for k in ("tool_call_id", "name") if message.get(k) is not None}
        turns.append(turn)
    return turns


def _sharegpt_turns(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list):
        raise BadRecord(where, "'conversations' is not a list")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord(where, "message is not an object", f"message {i}")
        name = turn.get("from")
        role = SHAREGPT_ROLES.get(name.lower()) if isinstance(name, str) else None
        if role is None:
            expected = ", ".join(SHAREGPT_ROLES)
            raise BadRecord(where, f"unknown role {name!r}", f"message {i}; expected one of {expected}")
        if name.lower() == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(turn.get("value"), where, i)})
        else:
            out.append(_turn(role, turn.get("value")))
    return out


def _tool_calls(calls: Any, where: str, i: int) -> list[dict]:
    """Calls as OpenAI writes them ({type, function: {name, arguments}}), from that or LLaMA-Factory's JSON text
    ({name, arguments}, one or a list). Arguments become a dict, which chat templates expect (most write it with
    `tojson`; a JSON string would be quoted twice)."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise BadRecord(where, "tool call is not JSON", f"message {i}") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRecord(where, "tool call without a function name", f"message {i}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise BadRecord(where, "tool call arguments are not JSON", f"message {i}") from None
        if not isinstance(arguments, dict):
            raise BadRecord(where, "tool call arguments are not a JSON object", f"message {i}")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(value: dict, where: str) -> list | None:
    tools = value.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRecord(where, "'tools' is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord(where, "'tools' is not a list of function schemas")
    return tools or None


def _join_text_parts(parts: list, where: str, i: int) -> str:
    # Text parts are joined by newlines, as vLLM does when it renders a chat template.
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRecord(where, "content part is not text", f"message {i}: type {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _validated(turns: list[dict], where: str) -> list[dict]:
    """System first if at all, then user and assistant alternating, ending with the assistant.

    Tool results answer the assistant turn that called the tools, so they take the user's side of the
    alternation, after such a turn only. A leading assistant turn and trailing user or tool turns are dropped,
    not errors: none makes a question and answer pair that can be trained on.
    """
    if not turns:
        raise BadRecord(where, "empty conversation")
    system, out = None, []
    for i, turn in enumerate(turns, 1):
        role, content = turn["role"], turn["content"]
        calls = turn.get("tool_calls")
        if content is None and calls:
            turn["content"] = content = ""
        if content is None and role != "system":  # in generated data, a turn whose request failed
            raise BadRecord(where, MISSING_CONTENT, f"message {i}")
        if not isinstance(content, str):
            raise BadRecord(where, "message content is not a string", f"message {i}")
        if role == "system":
            if i != 1:
                raise BadRecord(where, "system message after the first", f"message {i}")
            system = content if content.strip() else None  # an empty system prompt means none
            continue
        if not content.strip() and not calls:
            raise BadRecord(where, EMPTY_CONTENT, f"message {i}")
        out.append(turn)
    if not out:
        raise BadRecord(where, "empty conversation")
    _check_order(out, where)
    while out and out[0]["role"] != "user":
        # An answer to nothing in the record: in ShareGPT, the tail of a long conversation split into parts.
        # FastChat drops it too ("skip the first one if it is not from human").
        out.pop(0)
    while out and out[-1]["role"] != "assistant":
        out.pop()  # a last question without its answer teaches nothing
    if not any(t["role"] == "user" for t in turns):
        raise BadRecord(where, "no user turn")
    if not out:
        raise BadRecord(where, "no assistant turn")
    return ([{"role": "system", "content": system}] if system is not None else []) + out


def _check_order(turns: list[dict], where: str) -> None:
    for before, turn in zip(turns, turns[1:]):
        if turn["role"] == "tool":
            if not (before["role"] == "tool" or before.get("tool_calls")):
                raise BadRecord(where, "tool result without a tool call before it")
        elif before.get("tool_calls"):
            raise BadRecord(where, "tool call without its result", f"a {turn['role']} turn follows it")
        elif turn["role"] == before["role"] or {turn["role"], before["role"]} == {"user", "tool"}:
            raise BadRecord(where, "turns do not alternate user/assistant", f"two {turn['role']} turns in a row")


# -- preferences -----------------------------------------------------------------------------------------------


def _pair(prompt: list[dict], chosen: Any, rejected: Any, where: str, tools=None) -> Record:
    """A pair from its prompt turns and two answers (strings or assistant messages), validated as conversations."""
    answers = []
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(answer, str):
            answer = [_turn("assistant", answer)]
        elif isinstance(answer, dict):
            answer = _openai_turns([answer], where, key) if "role" in answer else _sharegpt_turns([answer], where)
        elif not isinstance(answer, list):
            raise BadRecord(where, f"'{key}' is not a string or a list of messages")
        else:
            answer = _openai_turns(answer, where, key)
        try:
            answers.append(_validated([dict(t) for t in prompt] + answer, where))
        except BadRecord as bad:
            raise BadRecord(where, bad.reason, f"in '{key}'" + (f": {bad.detail}" if bad.detail else "")) from None
    chosen, rejected = answers
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(where, "'chosen' and 'rejected' do not share the prompt",
                        "they may differ only in the last answer")
    return Record(chosen, where, rejected=rejected[-1], tools=tools)


def _system_first(value: dict, prompt: list[dict]) -> list[dict]:
    system = value.get("system")
    if isinstance(system, str) and not (prompt and prompt[0].get("role") == "system"):
        return [_turn("system", system)] + prompt
    return prompt


def _preference(value: dict, where: str) -> Record:
    """TRL's layout: `prompt` a string or messages, or absent when `chosen` and `rejected` are whole conversations
    (UltraFeedback binarized, whose `messages` copies `chosen`)."""
    prompt = value.get("prompt")
    whole = all(isinstance(value[k], list) and any(isinstance(m, dict) and m.get("role") not in ("assistant", None)
                                                   for m in value[k]) for k in ("chosen", "rejected"))
    if whole:  # the prompt is inside the answers; one given beside them must be theirs
        first = next((m.get("content") for m in value["chosen"] if isinstance(m, dict) and m.get("role") == "user"),
                     None)
        if isinstance(prompt, str) and prompt != first or isinstance(prompt, list) and \
                prompt != value["chosen"][:len(prompt)]:
            raise BadRecord(where, "'prompt' is not how 'chosen' begins")
        prompt = []
    elif prompt is None:
        raise BadRecord(where, "preference record without 'prompt'",
                        "give 'prompt' with string answers, or 'chosen' and 'rejected' as whole conversations")
    elif isinstance(prompt, str):
        prompt = [_turn("user", prompt)]
    else:
        prompt = _openai_turns(prompt, where, "prompt")
    return _pair(_system_first(value, prompt), value["chosen"], value["rejected"], where, _tools(value, where))


def _hh_rlhf(value: dict, where: str) -> Record:
    """Anthropic's HH-RLHF: `chosen` and `rejected` are whole transcripts that differ in the last answer."""
    return _pair([], _hh_transcript(value["chosen"], "chosen", where), _hh_transcript(value["rejected"], "rejected",
                                                                                          where), where)


_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_transcript(text: Any, key: str, where: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.lstrip()) if isinstance(text, str) else []
    if len(parts) < 3 or parts[0].strip():  # no marker, or text before the first: not a transcript
        raise BadRecord(where, "preference record without 'prompt'",
                        f"'{key}' is a string but not a transcript of 'Human:' and 'Assistant:' turns as in HH-RLHF; "
                        "give 'prompt' with string answers")
    return [_turn(_HH_ROLES[name], turn.strip()) for name, turn in zip(parts[1::2], parts[2::2])]


def _sharegpt_preference(value: dict, where: str) -> Record:
    prompt = _system_first(value, _sharegpt_turns(value["conversations"], where))
    return _pair(prompt, value["chosen"], value["rejected"], where, _tools(value, where))


def _alpaca_preference(value: dict, where: str) -> Record:
    return _pair(_alpaca_prompt(value, where), value["chosen"], value["rejected"], where)


def _ultrafeedback(value: dict, where: str) -> Record:
    """openbmb/UltraFeedback: completions scored by GPT-4. As the binarized set and TRL's script do, the best
    `overall_score` is chosen; of the rest, the lowest is rejected (deterministic, where they draw one at random)."""
    if not isinstance(value["completions"], list):
        raise BadRecord(where, "'completions' is not a list")
    scored = [c for c in value["completions"] if isinstance(c, dict) and isinstance(c.get("response"), str)
              and isinstance(c.get("overall_score"), (int, float))]
    if len(scored) < 2:
        raise BadRecord(where, "fewer than two scored completions")
    ranked = sorted(scored, key=lambda c: -c["overall_score"])
    if ranked[0]["overall_score"] == ranked[-1]["overall_score"]:
        raise BadRecord(where, "every completion has the same score")
    prompt = [_turn("user", value["instruction"])]
    return _pair(prompt, ranked[0]["response"], ranked[-1]["response"], where)


def _kto(value: dict, where: str) -> Record:
    """A judged answer: `messages` ending with it (LLaMA-Factory) or `prompt` + `completion` (TRL), and `label`."""
    label = value["label"]
    if not isinstance(label, bool):
        raise BadRecord(where, "'label' is not true or false")
    if "messages" in value:
        messages = _validated(_openai_turns(value["messages"], where, "messages"), where)
    else:
        for key in ("prompt", "completion"):
            if key not in value:
                raise BadRecord(where, f"missing '{key}'", "a KTO row has 'messages', or 'prompt' and 'completion'")
        prompt = value["prompt"]
        prompt = [_turn("user", prompt)] if isinstance(prompt, str) else _openai_turns(prompt, where, "prompt")
        completion = value["completion"]
        completion = [_turn("assistant", completion)] if isinstance(completion, str) else \
            _openai_turns(completion, where, "completion")
        messages = _validated(_system_first(value, prompt) + completion, where)
    return Record(messages, where, label=label, tools=_tools(value, where))


# In the order formats are told apart: the first whose `detect` a record passes is its format.
FORMATS: dict[str, Format] = {
    "sharegpt-preference": Format(
        _has("conversations", "chosen", "rejected"), _sharegpt_preference,
        needs=("conversations", "chosen", "rejected"),
        reads=("conversations", "chosen", "rejected", "system", "tools"),
        about="conversations + chosen/rejected messages, LLaMA-Factory"),
    "alpaca-preference": Format(
        _has("instruction", "chosen", "rejected"), _alpaca_preference,
        needs=("instruction", "chosen", "rejected"),
        reads=("instruction", "input", "chosen", "rejected", "system", "history"),
        about="instruction + chosen/rejected strings, LLaMA-Factory"),
    "hh-rlhf": Format(
        lambda v: "prompt" not in v and _is_transcript(v.get("chosen")), _hh_rlhf,
        needs=("chosen", "rejected"), reads=("chosen", "rejected"),
        about="chosen/rejected Human:/Assistant: transcripts, Anthropic HH-RLHF"),
    "preference": Format(
        _has("chosen", "rejected"), _preference,
        needs=("chosen", "rejected"),
        reads=("prompt", "chosen", "rejected", "system", "tools", "messages", "score_chosen", "score_rejected"),
        about="prompt + chosen/rejected strings or messages, TRL and UltraFeedback binarized"),
    "ultrafeedback": Format(
        _has("instruction", "completions"), _ultrafeedback,
        needs=("instruction", "completions"), reads=("instruction", "completions"),
        about="instruction + scored completions, openbmb/UltraFeedback"),
    "kto": Format(
        lambda v: isinstance(v.get("label"), bool) and ("messages" in v or "completion" in v), _kto,
        needs=("label",), reads=("messages", "prompt", "completion", "label", "system", "tools"),
        about="messages or prompt + completion, with a true/false label"),
    "openai": Format(
        _has("messages"), _openai, needs=("messages",), reads=("messages", "tools"),
        about="messages with roles system/user/assistant/tool, tool_calls, tools"),
    "sharegpt": Format(
        _has("conversations"), _sharegpt, needs=("conversations",), reads=("conversations", "system", "tools"),
        about="conversations of from/value, function_call and observation turns too, tools"),
    "alpaca": Format(
        lambda v: "instruction" in v or "output" in v, _alpaca,
        needs=("instruction", "output"), reads=("instruction", "input", "output", "system", "history"),
        about="instruction, input, output, system, history"),
    "gpt4all": Format(  # told by `response`: `prompt` alone is also a preference pair's key
        _has("response"), _gpt4all, needs=("prompt", "response"), reads=("prompt", "response"),
        about="prompt, response"),
}
