"""Curating a distilled dataset, as GPT4All did: drop refusals, failed generations, empty, tiny and cut-off
answers, and exact and near duplicates, counting each rule.

The rules run in this order, and a record is counted under the first that drops it:

1. `empty response`: a message whose text is empty, null or missing (the reader refuses these as "empty
   message content", "missing message content" or "missing 'output'"; in distilled data they are almost
   always answers the API never gave), or an answer with no letter or digit.
2. `failed generation`: an answer matching a failure pattern, the text a failed API call or chat page left
   behind ("Rate limit reached...", "An error occurred...", "None").
3. `cut off`: the answers, read in order, end inside an unclosed ``` code block (an odd number of lines
   opening or closing one): the last one hit the length limit. Counting over all the answers keeps a
   conversation whose answer was cut and then finished after "continue". An answer ending mid-sentence is
   not flagged: too many good answers end without a full stop (code, lists, a title).
4. `refusal`: an answer matching a refusal pattern ("As an AI language model", "I'm sorry, but I cannot"...).
5. `tiny response`: a last answer of fewer than `min_response_words` words. Only the last: an earlier short
   answer is usually one the user asked for ("Reply OK if you understand").
6. `exact duplicate`: the same conversation as a kept one, compared with case and whitespace normalised.
7. `near duplicate`: a conversation whose words overlap a kept one's by at least the threshold (Jaccard
   similarity of the two sets of distinct words, system message left out since many records share one).

Content rules come first, the cheapest first; duplicates come last, so a record is only ever a duplicate of
one that was kept, and the first of a group of copies is the one kept.

Patterns are Python regular expressions, searched case-insensitively in every assistant turn (only the user
can write "as an AI language model" harmlessly); `^` anchors at the start of the turn.

Near duplicates are found without comparing every pair: each conversation's word set gets a MinHash of 128
permutations, an LSH index proposes kept conversations likely to be similar (its bands and rows are chosen so
that a pair exactly at the threshold is proposed with probability at least 0.99), and the exact Jaccard
similarity of the word sets decides. Word sets, not word n-grams: measured on hand-written paraphrases (a few
words changed, two sentences swapped), 1-word shingles keep such copies at 0.82-0.99 while 2- and 3-word
shingles fall to 0.77 and 0.68, below any useful threshold; distinct answers on the same topic stay under
0.2. Words are runs of letters and digits, and each Chinese or Japanese character is a word, since those
scripts do not use spaces. Memory: a few kilobytes per kept conversation.
"""

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from camelid.data.formats import (
    EMPTY_CONTENT,
    MISSING_CONTENT,
    BadRecord,
    Skipped,
    check_not_all_bad,
    json_records,
    to_messages,
    write_jsonl,
)
from camelid.pipeline_report import Report
from camelid.errors import CamelidError

RULES = (
    "empty response",
    "failed generation",
    "cut off",
    "refusal",
    "tiny response",
    "exact duplicate",
    "near duplicate",
)

_APOSTROPHE = "['’]"
_CANNOT = rf"(?:cannot|can{_APOSTROPHE}t|can not|am unable to|am not able to|won{_APOSTROPHE}t|will not)"

# What a model says when it declines, or reminds the user that it is a model: both teach a fine-tuned model
# to do the same. Each is narrow enough not to match ordinary answers ("I'm sorry to hear that" is kept).
REFUSAL_PATTERNS = (
    r"\bas an ai language model\b",
    r"\bas a language model\b",
    r"\bas an ai (?:assistant|model|chatbot)\b",
    r"\bas an ai,",
    rf"\bI{_APOSTROPHE}?m (?:sorry|afraid),? but I {_CANNOT}",
    rf"\bI am (?:sorry|afraid),? but I {_CANNOT}",
    rf"\bI apologi[sz]e,? but I {_CANNOT}",
    rf"\bI (?:cannot|can{_APOSTROPHE}t|can not) (?:fulfil|fulfill|comply|assist|provide|generate|create|produce|"
    rf"engage|help with|help you with|answer that|answer this)\b",
    rf"\bI(?: am|{_APOSTROPHE}m) (?:unable|not able) to\b",
    rf"\bI(?: am|{_APOSTROPHE}m) not (?:programmed|designed|allowed|permitted) to\b",
    rf"\bI(?: am|{_APOSTROPHE}m) (?:just|only) an? (?:ai|language model|computer program)\b",
    rf"\bI (?:do not|don{_APOSTROPHE}t) have (?:personal )?(?:opinions|feelings|emotions|beliefs|preferences)\b",
    r"\bI must (?:respectfully )?decline\b",
    r"\bnot appropriate for me to\b",
    rf"\b(?:against|violates?) (?:openai{_APOSTROPHE}s|my) (?:content |usage |use case )?polic(?:y|ies)\b",
    rf"\bmy (?:programming|guidelines) (?:does not|doesn{_APOSTROPHE}t|do not|don{_APOSTROPHE}t|prohibits?)\b",
)

# What a failed API call or chat page leaves in place of an answer. Generic words ("network error") count only
# as the whole answer, and "Error:" only at its start, so that an answer explaining an error is kept.
FAILURE_PATTERNS = (
    r"^\s*(?:error:|error code:|an error occurred\.)",
    r"^\s*(?:network error|internal server error|bad gateway|service unavailable|request timed out|"
    r"something went wrong|load failed)[.!]?\s*$",
    r"^\s*(?:none|null|undefined|nan)\s*$",  # a program's missing value written out as the answer
    r"\brate limit (?:reached|exceeded)\b",
    r"\btoo many requests in (?:1|one) hour\b",
    r"\bthat model is currently overloaded\b",
    r"\bthe server had an error (?:while )?processing your request\b",
    r"\bsomething seems to have gone wrong\b",
    r"\bthere was an error generating a response\b",
    r"\berror in (?:the )?body stream\b",
    r"\bonly one message at a time\b",
    r"\bmaximum context length is \d+ tokens\b",
    r"\byou exceeded your current quota\b",
)

# The reader's reasons for a record with a message that has no text: counted as an empty response, not as bad.
_NO_TEXT = (EMPTY_CONTENT, MISSING_CONTENT, "missing 'output'")

NUM_PERM = 128
LSH_RECALL = 0.99  # the least chance that the index proposes a pair whose similarity is exactly the threshold

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs: a word each
_WORDS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)  # a line that opens or closes a Markdown code block


def curate(
    src: str | Path,
    out: str | Path,
    *,
    refusal_patterns: Sequence[str] = REFUSAL_PATTERNS,
    failure_patterns: Sequence[str] = FAILURE_PATTERNS,
    min_response_words: int = 3,
    near_duplicate_threshold: float | None = 0.8,
    drop_cut_off: bool = True,
    write_dropped: bool = False,
    skip_bad: bool = False,
) -> Report:
    """Write the records of `src` that pass every rule to `out` (JSONL), the report beside it; return it.

    `min_response_words=0` turns off the tiny-response rule, `near_duplicate_threshold=None` the near-duplicate
    one, empty pattern lists the pattern rules. With `write_dropped`, every dropped record goes to
    `OUT.dropped.jsonl` with its rule and what triggered it. Kept records keep their other keys (`id`,
    `source`, ...) beside the `messages`.
    """
    out = Path(out)
    if out.is_dir():
        raise CamelidError(f"{out} is a directory; give a file name for the output")
    if not out.parent.is_dir():
        raise CamelidError(f"{out.parent}: no such directory; create it or choose another output path")
    refusals = _compiled(refusal_patterns, "refusal")
    failures = _compiled(failure_patterns, "failure")
    if not (isinstance(min_response_words, int) and min_response_words >= 0):
        raise CamelidError(f"min_response_words must be a whole number of at least 0, not {min_response_words!r}")
    near = None
    if near_duplicate_threshold is not None:
        if not 0 < near_duplicate_threshold <= 1:
            raise CamelidError(
                f"the near-duplicate threshold must be above 0 and at most 1, not {near_duplicate_threshold}"
            )
        near = NearDuplicates(near_duplicate_threshold)

    report = Report("curate")
    off = {
        "failed generation": not failures,
        "cut off": not drop_cut_off,
        "refusal": not refusals,
        "tiny response": min_response_words == 0,
        "near duplicate": near is None,
    }
    report.facts["rules"] = ", ".join(rule for rule in RULES if not off.get(rule))
    report.facts["patterns"] = {"refusal": len(refusals), "failure": len(failures)}
    report.facts["min response words"] = min_response_words
    if near is not None:
        report.facts["near duplicates"] = {
            "threshold": near.threshold, "permutations": NUM_PERM, "bands": near.bands, "rows": near.rows,
        }

    kept, dropped = [], []

    def drop(entry: dict) -> None:
        report.drop(entry["rule"])
        if write_dropped:  # held only to be written: most of a large file may be dropped
            dropped.append(entry)

    exact_seen: dict[bytes, str] = {}  # normalised conversation -> where the kept copy is
    kept_where: list[str] = []
    unreadable, first_bad = 0, None  # records skipped as unreadable (--skip-bad)
    for where, value in json_records(Path(src)):
        report.read += 1
        try:
            if isinstance(value, BadRecord):
                raise value
            messages = to_messages(value, where)
        except BadRecord as bad:
            if bad.reason in _NO_TEXT:
                rule = "empty response"
            elif skip_bad:
                rule = bad.reason
                unreadable += 1
                first_bad = first_bad or Skipped(where, bad.reason)
            else:
                raise
            drop({"rule": rule, "where": where} | ({"record": value} if isinstance(value, dict) else {}))
            continue

        key = _exact_key(messages)
        found = _content_rule(messages, failures, refusals, min_response_words, drop_cut_off)
        if found is None and key in exact_seen:
            found = "exact duplicate", {"duplicate_of": exact_seen[key]}
        if found is None and near is not None:  # last: a conversation new to the index is added to it here
            if match := near.check_and_add(len(kept_where), _conversation_words(messages)):
                found = "near duplicate", {"duplicate_of": kept_where[match[0]], "similarity": round(match[1], 3)}
        if found is None:
            exact_seen[key] = where
            kept_where.append(where)
            kept.append({"messages": messages} | _extra_keys(value))
        else:
            rule, detail = found
            drop({"rule": rule, "where": where} | detail | {"messages": messages})

    check_not_all_bad(src, report.read - unreadable, unreadable, first_bad)
    write_jsonl(out, kept)
    report.written = len(kept)
    report.outputs["curated"] = str(out)
    if write_dropped:
        side = dropped_path(out)
        write_jsonl(side, dropped)
        report.outputs["dropped"] = str(side)
    report.save(out)
    return report


def dropped_path(out: str | Path) -> Path:
    """Where `curate(..., write_dropped=True)` puts the dropped records of output `out`."""
    out = Path(out)
    return out.with_name(out.name + ".dropped.jsonl")


def read_patterns(path: str | Path) -> list[str]:
    """Regular expressions from a file, one per line; blank lines and lines starting with `#` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CamelidError(f"{path}: cannot read patterns ({exc})") from None
    patterns = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            re.compile(line)
        except re.error as exc:
            raise CamelidError(f"{path}:{n}: not a regular expression ({exc}); fix or remove the line") from None
        patterns.append(line)
    return patterns


def patterns_with(defaults: Sequence[str], path: str | Path | None, *, replace: bool = False) -> tuple[str, ...]:
    """The built-in patterns plus those of the file at `path` (one per line), or only the file's with `replace`."""
    if path is None:
        return tuple(defaults)
    return (() if replace else tuple(defaults)) + tuple(read_patterns(path))


def parse_threshold(text: str) -> float | None:
    """`--near-dup-threshold` as a number, or None (no near-duplicate rule) for none, off or 0."""
    if text in ("none", "off", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise CamelidError(f"--near-dup-threshold: {text!r} is not a number; give e.g. 0.8, or none") from None


def count_words(text: str) -> int:
    """Words as the tiny-response rule counts them: runs of letters and digits; a CJK character is one word."""
    return len(_WORDS.findall(text))


class NearDuplicates:
    """An index of kept conversations' word sets that finds the most similar kept one at or above a threshold."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._lsh = MinHashLSH(num_perm=num_perm, params=(self.bands, self.rows))
        self._template = MinHash(num_perm=num_perm)  # one set of permutations, shared by every MinHash
        self._sets: dict[int, np.ndarray] = {}  # key -> sorted word hashes of a kept conversation

    def check_and_add(self, key: int, words: set[str]) -> tuple[int, float] | None:
        """(key, similarity) of the most similar kept set at or above the threshold; else keep this one as `key`."""
        from datasketch import MinHash

        hashes = _word_hashes(words)
        if len(hashes) == 0:
            return None  # nothing to compare; the exact-duplicate rule still applies
        minhash = MinHash(
            num_perm=self.num_perm, hashfunc=int, permutations=self._template.permutations, scheme=self._template.scheme
        )
        minhash.update_batch(hashes.tolist())
        best = None
        for candidate in self._lsh.query(minhash):
            similarity = _jaccard(hashes, self._sets[candidate])
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = candidate, similarity
        if best is None:
            self._sets[key] = hashes
            self._lsh.insert(key, minhash, check_duplication=False)
        return best


def lsh_bands(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows) for an LSH index: the most rows per band (fewest false candidates) that still propose a
    pair of similarity `threshold` with probability at least `recall`, i.e. 1 - (1 - t^rows)^bands >= recall."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


# -- the rules -------------------------------------------------------------------------------------------------


def _content_rule(messages, failures, refusals, min_words, drop_cut_off) -> tuple[str, dict] | None:
    """The first content rule that drops the conversation, with what triggered it, or None."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if any(not any(c.isalnum() for c in a) for a in answers):
        return "empty response", {}
    if hit := _search(failures, answers):
        return "failed generation", hit
    if drop_cut_off and sum(len(_FENCE.findall(a)) for a in answers) % 2 == 1:
        return "cut off", {}
    if hit := _search(refusals, answers):
        return "refusal", hit
    if min_words and (n := count_words(answers[-1])) < min_words:
        return "tiny response", {"words": n}
    return None


def _search(patterns: list[re.Pattern], answers: list[str]) -> dict | None:
    for answer in answers:
        for pattern in patterns:
            if m := pattern.search(answer):
                return {"pattern": pattern.pattern, "match": m.group(0)}
    return None


def _compiled(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise CamelidError(f"{what} patterns must be a list of regular expressions, not one string")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise CamelidError(f"{what} pattern {p!r} is not a regular expression ({exc}); fix it") from None
    return out


def _exact_key(messages: list[dict]) -> bytes:
    normal = [[m["role"], " ".join(m["content"].casefold().split())] for m in messages]
    return hashlib.blake2b(json.dumps(normal, ensure_ascii=False).encode(), digest_size=16).digest()


def _conversation_words(messages: list[dict]) -> set[str]:
    text = "\n".join(m["content"] for m in messages if m["role"] != "system")
    return set(_WORDS.findall(text.casefold()))


def _word_hashes(words: set[str]) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the words (SHA-1, so the same in every run)."""
    hashes = [int.from_bytes(hashlib.sha1(w.encode()).digest()[:4], "little") for w in words]
    return np.unique(np.array(hashes, dtype=np.uint32))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def _extra_keys(record: dict) -> dict:
    """The record's keys other than those its format's conversation was read from (told as `to_messages` does)."""
    if "messages" in record:
        used = {"messages"}
    elif "conversations" in record:
        used = {"conversations"}
    elif "instruction" in record or "output" in record:
        used = {"instruction", "input", "output", "system"}
    else:
        used = {"prompt", "response"}
    return {k: v for k, v in record.items() if k not in used}
