"""Reading chat datasets (Alpaca, ShareGPT, OpenAI messages, GPT4All) record by record into validated conversations.

A file is JSONL (one object per line, blank lines ignored) or one JSON array of objects (its first
non-whitespace character is `[`), either of them gzip-compressed (`.jsonl.gz`, told by its first bytes). Files of
other kinds (Parquet, Arrow, zstd, zip, a `datasets` save_to_disk folder) are named as what they are, with the
command that converts them. Each record's format is told by its keys, so a file may mix them. Every
conversation comes out as OpenAI-style messages: an optional system message, then user and assistant turns
alternating, ending with the assistant (a leading assistant turn and a trailing user turn are dropped, as
neither can be trained on). A record that cannot be made into one is an error naming its
`path:line`, or, with `skip_bad`, a skipped entry with a short reason.
"""

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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
}
OPENAI_ROLES = ("system", "user", "assistant")

SKIP_HINT = "fix the record or pass --skip-bad to drop such records"

# Reasons that other modules act on: curation counts a message without text as an empty response, and the
# ShareGPT reader tells a file cut off at its end from one broken in the middle.
EMPTY_CONTENT = "empty message content"
MISSING_CONTENT = "missing message content"  # a user or assistant turn's content is null or absent
CUT_INSIDE_RECORD = "file ends inside a record"
CUT_INSIDE_ARRAY = "file ends inside the array"

T = TypeVar("T")


@dataclass
class Record:
    """One conversation and where it came from."""

    messages: list[dict]
    where: str  # "path:line" of the record's first line


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


class BadRecord(CamelidError):
    """A record that is not a valid conversation. `reason` is short and the same for records alike."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        self.where, self.reason, self.detail = where, reason, detail
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{where}: {reason}{extra}; {SKIP_HINT}")


def read_conversations(path, *, skip_bad: bool = False) -> ReadResult:
    """Every conversation in a JSONL or JSON-array file; bad records raise, or are listed when `skip_bad`."""
    result = ReadResult()
    for item in iter_conversations(path, skip_bad=skip_bad):
        (result.skipped if isinstance(item, Skipped) else result.records).append(item)
    return result


def iter_conversations(path, *, skip_bad: bool = False) -> Iterator[Record | Skipped]:
    """The file's records in order, as a `Record` each, or a `Skipped` for a bad one when `skip_bad`."""
    return iter_records(path, lambda value, where: Record(to_messages(value, where), where), skip_bad=skip_bad)


def iter_records(path, convert: Callable[[Any, str], T], *, skip_bad: bool = False) -> Iterator[T | Skipped]:
    """`convert(value, "path:line")` for each record of a JSONL or JSON-array file, in order.

    A record that cannot be read, or that `convert` refuses by raising `BadRecord`, raises; with `skip_bad` it
    comes out as a `Skipped` instead, unless every record of the file is bad: that raises at the end (see
    check_not_all_bad), so that a reader writing atomically writes nothing.
    """
    kept, first_bad, bad_count = 0, None, 0
    for where, value in json_records(path):
        try:
            if isinstance(value, BadRecord):
                raise value
            item = convert(value, where)
            kept += 1
        except BadRecord as bad:
            if not skip_bad:
                raise
            item = Skipped(bad.where, bad.reason)
            first_bad, bad_count = first_bad or item, bad_count + 1
        yield item
    check_not_all_bad(path, kept, bad_count, first_bad)


def check_not_all_bad(path, kept: int, bad: int, first: "Skipped | None") -> None:
    """A one-line error when --skip-bad skipped every record of a file: it is not data in a format camelid reads,
    and going on would write nothing and report success."""
    if bad and not kept:
        raise CamelidError(f"{path}: every one of its {bad} records was bad (the first at {first.where}: "
                           f"{first.reason}); is the file in a format camelid reads (see camelid data --help)?")


def json_records(path) -> Iterator[tuple[str, Any]]:
    """("path:line", parsed object or BadRecord) for each record of a JSONL or JSON-array file."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            raise CamelidError(f"{path}: a Hugging Face datasets save_to_disk folder, which camelid does not read "
                               f"yet; write it as JSONL with: python -c \"import datasets; "
                               f"datasets.load_from_disk('{path}').to_json('{path.name}.jsonl')\"")
        raise CamelidError(f"{path}: is a directory; pass the .jsonl or .json file inside it")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except OSError as exc:
        raise CamelidError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        magic = f.read(8)
        f.seek(0)
        _refuse_other_kinds(path, magic)
        if magic.startswith(_GZIP):
            try:
                with gzip.open(f) as unzipped:
                    yield from _json_values(path, unzipped)
            except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                raise CamelidError(f"{path}: a damaged gzip file ({exc}); download or compress it again") from None
        else:
            yield from _json_values(path, f)


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP


_GZIP = b"\x1f\x8b"
# What a file is by its first bytes, where it is not JSON text: named in the error instead of "not UTF-8".
_OTHER_KINDS = (
    (b"PAR1", "a Parquet file", "Dataset.from_parquet"),
    (b"ARROW1", "an Arrow file", "Dataset.from_file"),
    (b"\xff\xff\xff\xff", "an Arrow stream (a datasets shard)", "Dataset.from_file"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", None),
    (b"PK\x03\x04", "a zip archive", None),
)


def _refuse_other_kinds(path: Path, magic: bytes) -> None:
    for prefix, kind, reader in _OTHER_KINDS:
        if magic.startswith(prefix):
            fix = (f"write it as JSONL with: python -c \"import datasets; datasets.{reader}('{path}')"
                   f".to_json('{path.stem}.jsonl')\"" if reader else "decompress it to a .jsonl or .json file")
            raise CamelidError(f"{path}: {kind}, which camelid does not read yet; {fix}")


def _json_values(path: Path, f) -> Iterator[tuple[str, Any]]:
    if first_byte(f) == b"[":
        yield from _array_values(path, f.read())
    else:
        yield from _jsonl_values(path, f)


def strict_records(path, hint: str) -> Iterator[tuple[str, Any]]:
    """("path:line", parsed object) for each record of a JSONL or JSON-array file, for readers without
    --skip-bad: a record that cannot be read raises a one-line error ending with `hint`."""
    for where, value in json_records(path):
        if isinstance(value, BadRecord):
            detail = f" ({value.detail})" if value.detail else ""
            raise CamelidError(f"{where}: {value.reason}{detail}; {hint}")
        yield where, value


def first_byte(f) -> bytes:
    """The first byte that is not whitespace (or a UTF-8 byte-order mark); leaves the file at its start."""
    chunk = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
    while chunk:
        if stripped := chunk.lstrip(b" \t\r\n"):
            f.seek(0)
            return stripped[:1]
        chunk = f.read(1 << 16)
    f.seek(0)
    return b""


def to_messages(record: Any, where: str) -> list[dict]:
    """One record, in any of the four formats, as validated messages; raises `BadRecord` if it cannot be.

    Alpaca follows FastChat and axolotl: the user turn is the instruction, followed by a blank line and the
    input when there is one; an optional `system` field becomes the system message. GPT4All's released rows
    are `{"prompt", "response"}` (and often `source`): the prompt is the user turn, the response the answer.
    """
    if not isinstance(record, dict):
        raise BadRecord(where, "not a JSON object")
    if "messages" in record:
        pairs = _openai_pairs(record["messages"], where)
    elif "conversations" in record:
        pairs = _sharegpt_pairs(record["conversations"], where)
    elif "instruction" in record or "output" in record:
        pairs = _alpaca_pairs(record, where)
    elif "response" in record:  # told by `response`: `prompt` alone is also a preference pair's key
        pairs = _gpt4all_pairs(record, where)
    else:
        raise BadRecord(
            where, "unknown format", "expected 'messages', 'conversations', 'instruction', or 'prompt' and 'response'"
        )
    return _validated(pairs, where)


def write_jsonl(path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, replacing `path` all at once."""
    write_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _alpaca_pairs(record: dict, where: str) -> list[tuple[str, Any]]:
    for key in ("instruction", "output"):
        if key not in record:
            raise BadRecord(where, f"missing '{key}'")
    instruction, extra = record["instruction"], record.get("input") or ""
    if isinstance(instruction, str) and isinstance(extra, str) and extra:
        instruction = f"{instruction}\n\n{extra}"
    elif not isinstance(extra, str):
        instruction = extra  # reported below as content that is not a string
    pairs = [("user", instruction), ("assistant", record["output"])]
    if record.get("system") is not None:
        pairs.insert(0, ("system", record["system"]))
    return pairs


def _gpt4all_pairs(record: dict, where: str) -> list[tuple[str, Any]]:
    if "prompt" not in record:
        raise BadRecord(where, "missing 'prompt'")
    return [("user", record["prompt"]), ("assistant", record["response"])]


def _sharegpt_pairs(turns: Any, where: str) -> list[tuple[str, Any]]:
    if not isinstance(turns, list):
        raise BadRecord(where, "'conversations' is not a list")
    pairs = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord(where, "message is not an object", f"message {i}")
        name = turn.get("from")
        role = SHAREGPT_ROLES.get(name.lower()) if isinstance(name, str) else None
        if role is None:
            expected = ", ".join(SHAREGPT_ROLES)
            raise BadRecord(where, f"unknown role {name!r}", f"message {i}; expected one of {expected}")
        pairs.append((role, turn.get("value")))
    return pairs


def _openai_pairs(messages: Any, where: str) -> list[tuple[str, Any]]:
    if not isinstance(messages, list):
        raise BadRecord(where, "'messages' is not a list")
    pairs = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadRecord(where, "message is not an object", f"message {i}")
        role, content = message.get("role"), message.get("content")
        if role not in OPENAI_ROLES:
            raise BadRecord(where, f"unknown role {role!r}", f"message {i}; expected one of {', '.join(OPENAI_ROLES)}")
        if isinstance(content, list):
            content = _join_text_parts(content, where, i)
        pairs.append((role, content))
    return pairs


def _join_text_parts(parts: list, where: str, i: int) -> str:
    # Text parts are joined by newlines, as vLLM does when it renders a chat template.
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRecord(where, "content part is not text", f"message {i}: type {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _validated(pairs: list[tuple[str, Any]], where: str) -> list[dict]:
    """System first if at all, then user and assistant alternating, ending with the assistant.

    A leading assistant turn and a trailing user turn are dropped, not errors: neither makes a question
    and answer pair that can be trained on.
    """
    if not pairs:
        raise BadRecord(where, "empty conversation")
    system, turns = None, []
    for i, (role, content) in enumerate(pairs, 1):
        if content is None and role != "system":  # in generated data, a turn whose request failed
            raise BadRecord(where, MISSING_CONTENT, f"message {i}")
        if not isinstance(content, str):
            raise BadRecord(where, "message content is not a string", f"message {i}")
        if role == "system":
            if i != 1:
                raise BadRecord(where, "system message after the first", f"message {i}")
            system = content if content.strip() else None  # an empty system prompt means none
            continue
        if not content.strip():
            raise BadRecord(where, EMPTY_CONTENT, f"message {i}")
        turns.append({"role": role, "content": content})
    if not turns:
        raise BadRecord(where, "empty conversation")
    for before, turn in zip(turns, turns[1:]):
        if turn["role"] == before["role"]:
            raise BadRecord(where, "turns do not alternate user/assistant", f"two {turn['role']} turns in a row")
    if turns[0]["role"] == "assistant":
        # An answer to nothing in the record: in ShareGPT, the tail of a long conversation split into parts.
        # FastChat drops it too ("skip the first one if it is not from human").
        if len(turns) == 1:
            raise BadRecord(where, "no user turn")
        turns.pop(0)
    if turns[-1]["role"] == "user":
        if len(turns) == 1:
            raise BadRecord(where, "no assistant turn")
        turns.pop()  # a last question without its answer teaches nothing
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def _jsonl_values(path: Path, f) -> Iterator[tuple[str, Any]]:
    for line, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            # Without its newline, so that a line cut short is reported at its end, not at column 1 of the next.
            yield where, json.loads(raw.rstrip(b"\r\n").decode("utf-8-sig" if line == 1 else "utf-8"))
        except UnicodeDecodeError:
            yield where, BadRecord(where, "not UTF-8 text")
        except json.JSONDecodeError as exc:
            yield where, BadRecord(where, "invalid JSON", f"column {exc.colno}: {exc.msg}")


_SPACE = re.compile(r"[ \t\r\n]*")


def _array_values(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """Each element of a JSON array, parsed one at a time so that a broken element is found by its line.

    After a broken element the rest of the array cannot be trusted, so it ends the file as one bad record.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CamelidError(f"{path}:{line}: not UTF-8 text") from None
    del data
    decoder = json.JSONDecoder()
    line, counted = 1, 0  # `line` is the line of offset `counted`; newlines are counted forward only

    def where_at(pos: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return f"{path}:{line}"

    pos = _SPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            where = where_at(pos)
            if pos == len(text):
                yield where, BadRecord(where, CUT_INSIDE_ARRAY, "no closing ]")
                return
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if exc.msg.startswith("Unterminated string") or not text[exc.pos :].strip():
                    yield where, BadRecord(where, CUT_INSIDE_RECORD)
                else:
                    yield where, BadRecord(where, "invalid JSON", f"line {exc.lineno} column {exc.colno}: {exc.msg}")
                return
            yield where, value
            pos = _SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            elif pos < len(text):
                where = where_at(pos)
                yield where, BadRecord(where, "invalid JSON", "expected , or ] between records")
                return
    if text[pos:].strip():
        where = where_at(pos + len(text[pos:]) - len(text[pos:].lstrip()))
        yield where, BadRecord(where, "invalid JSON", "text after the closing ]")
