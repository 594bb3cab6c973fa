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
4. `refusal`: an answer matching a refusal pattern: one that declines ("I'm sorry, but I can't assist with
   that") or says that as a model it cannot or does not ("As an AI, I don't have personal opinions"). A
   match inside a character's quoted speech does not count.
5. `tiny response`: a last answer of fewer than `min_response_words` words to a prompt that asks for a long one
   (a line opening with "Explain", "Describe", "Write an essay"..., and no "in one word" or "reply with 'OK'").
   A one-word answer to "Fill in the blank" or "Classify..." is the answer: on Alpaca all 13 answers the rule
   dropped before issue 17 ("fog.", "3", "bird", "google.com") were right, and it now drops none. Only the last
   answer: an earlier short one is usually one the user asked for ("Reply OK if you understand").
6. `exact duplicate`: the same conversation as a kept one, compared with case and whitespace normalised.
7. `near duplicate`: a conversation whose answers and whole text both overlap a kept one's by at least the
   threshold (Jaccard similarity of the sets of distinct words), the whole text measured after the opening
   prompt lines the two share word for word; system messages are left out, since many records share one.

Content rules come first, the cheapest first; duplicates come last, so a record is only ever a duplicate of
one that was kept, and the first of a group of copies is the one kept.

Patterns are Python regular expressions, searched case-insensitively in every assistant turn (only the user
can write "as an AI language model" harmlessly); `^` anchors at the start of the turn.

Near duplicates are found without comparing every pair: each conversation's answers get a MinHash of 128
permutations, an LSH index proposes kept conversations whose answers are likely to be similar (its bands and
rows are chosen so that a pair exactly at the threshold is proposed with probability at least 0.99), and the
exact Jaccard similarities decide. Answers, and the text after the shared opening, rather than the whole text:
every GPTeacher Toolformer prompt opens with the same long tool description, and the whole-text rule dropped
5,558 of its 7,673 records ("Battle of Waterloo" a copy of "French Revolution" at 0.81; of 40 read, 16 were
copies). This rule drops 1,129, and of 40 read 36 were copies; the other 4 are short template answers that
differ in a name or a number ("the square root of 81", "of 196"), too short for word overlap to tell apart.
On Alpaca both rules find no near duplicate (its 13 repeats are exact copies). Word sets, not word n-grams:
measured on hand-written paraphrases (a few words changed, two sentences swapped), 1-word shingles keep such
copies at 0.82-0.99 while 2- and 3-word shingles fall to 0.77 and 0.68, below any useful threshold; distinct
answers on the same topic stay under 0.2. Words are runs of letters and digits, and each Chinese or Japanese
character is a word, since those scripts do not use spaces. Memory: a few kilobytes per kept conversation (its
prompt text and the hashes of its answer words).
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
    Reading,
    Record,
    source_records,
    with_count,
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
_DENIAL = rf"(?:\bnot\b|n{_APOSTROPHE}t\b|\bno\b|\bcannot\b|\bunable\b|\black\b|\blimited\b)"
_I_CANNOT = (rf"(?:I (?:cannot|can{_APOSTROPHE}t|can not|won{_APOSTROPHE}t|will not|(?:will|would) not be able to|"
             rf"(?:won|wouldn){_APOSTROPHE}t be able to)|I(?: am|{_APOSTROPHE}m) (?:unable|not able|not going) to)")
# What an assistant declines to do. A closed list, because "I'm sorry, but I'm unable to come into work today" is
# an excuse the user asked for, and stories are full of "I can't give up" and "I can't help feeling".
_TASK = (
    r"(?:\w+ly )?(?:provide|give(?! up)|generate|create|write|produce|draw|display|show|make(?! it\b| any promise)|"
    r"assist|help(?!\s+(?:but|feeling|thinking|it\b|myself|wondering))|answer|respond|reply|fulfil|fulfill|comply|"
    r"complete|do (?:that|this|so|it)|perform|engage|participate|access|browse|search|open|read|view|play|visit|"
    r"retrieve|fetch|download|send|look up|find|determine|predict|estimate|tell you|confirm|verify|offer|share|"
    r"discuss|summari[sz]e|translate|analy[sz]e|evaluate|review|run|execute|compile|code|implement|design|remember|"
    r"recall|process|identify|recognize|express|physically|recommend(?![^.!?\n]*\benough\b)|support|condone|"
    r"encourage|promote|endorse|facilitate|speculate)\b"
)

# What a model says when it declines, or says that as a model it cannot or does not: both teach a fine-tuned model
# to do the same. A role statement alone ("As an AI assistant, I would assist...") is an answer, not a refusal.
# Measured on tests/fixtures/refusals_held_out.jsonl (69 refusals, 218 answers that say sorry, cannot or "as an
# AI" without refusing; ShareGPT, Anthropic HH, Alpaca, GPTeacher; written before these patterns were measured
# on it): precision 0.91, recall 0.43; the patterns before issue 17 had 0.87 and 0.19. What they miss is mostly
# the terse refusals of HH ("I don't know.", "No.", "I can't advise on that.").
REFUSAL_PATTERNS = (
    rf"\bas an? (?:ai|artificial intelligence|(?:large )?language model|chatbot)\b[^.!?\n]{{0,40}}?,\s*"
    rf"(?:I|my \w+|it is|it{_APOSTROPHE}s|there is|there{_APOSTROPHE}s)\b[^.!?\n]{{0,20}}?{_DENIAL}",
    rf"\bI(?: am|{_APOSTROPHE}m) (?:just|only|merely) an? (?:ai|language model|computer program|chatbot)\b",
    rf"\bI(?: am|{_APOSTROPHE}m) an? (?:[\w-]+ ){{0,3}}?(?:ai|language model|computer program|chatbot)\b"
    rf"[^.!?\n]{{0,30}}?{_DENIAL}",
    rf"\b{_I_CANNOT} {_TASK}",
    r"\bnot (?:possible|appropriate|ethical|feasible) for me to\b",
    rf"\bI (?:do not|don{_APOSTROPHE}t) have (?:the |any |enough )?(?:ability|capability|capacity|personal \w+|"
    rf"opinions|feelings|emotions|beliefs|preferences|a physical|physical|information (?:about|on)|access to "
    rf"(?:the internet|real-time|external|current|up-to-date|live|the web|personal|your|(?:the |that |this |those |"
    rf"these )?(?:articles?|links?|urls?|files?|documents?|papers?|books?|websites?|web ?pages?)\b))",
    r"\bI must (?:respectfully |politely )?decline\b",
    rf"\bI(?: am|{_APOSTROPHE}m) not (?:\w+ )?(?:programmed|designed|allowed|permitted|authorized) to\b",
    rf"\bI(?: am|{_APOSTROPHE}m) not comfortable\b|\bI (?:do not|don{_APOSTROPHE}t) feel comfortable\b",
    rf"\b(?:against|violates?|violating) (?:openai{_APOSTROPHE}s |our |my )(?:content |usage |ethical )?"
    rf"(?:polic(?:y|ies)|guidelines|terms|programming)\b",
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
_QUOTES = re.compile('["\u201c\u201d]')

# A prompt that asks for a long answer: a line that opens with a request to explain, describe, write an essay...
# A one-word answer is tiny only after one of these; after "Fill in the blank" or "Classify..." it is the answer.
_LONG_REQUEST = re.compile(
    r"^[^\w\n]*(?:(?:please|kindly|now|ok|okay|so|can you|could you|would you|will you|i want you to|i need you to|"
    r"i would like you to|i['’]d like you to|help me)[,\s]+)*"
    r"(?:explain|describe|discuss|elaborate|summari[sz]e|outline|compare|analy[sz]e|why|"
    r"how (?:do|does|did|can|could|to|should|would|is|are)|tell me (?:about|more)|write about|"
    r"(?:write|compose|draft|create|generate|produce|give|tell|make)\b(?:\s+\S+){0,4}?\s+(?:essay|stor(?:y|ies)|poem|"
    r"article|paragraph|letter|e-?mail|blog|speech|report|summar(?:y|ies)|description|explanation|review|script|"
    r"dialogue|song|list|plan|outline|proposal|guide|tutorial|recipe|biograph(?:y|ies)|code|program|function|"
    r"overview)s?)\b",
    re.IGNORECASE | re.MULTILINE,
)
# ...unless it also asks for a short one ("in one word", "reply with 'OK'", "limit your response to 'acknowledged'").
_SHORT_REQUEST = re.compile(
    r"\bone[- ]word\b|\b(?:a single|one|1) (?:word|number|letter)\b|\byes or no\b|"
    r"\b(?:reply|replay|respond|response|answer|say)\b[^.\n]{0,30}[\"“'‘]\w+[.!]?[\"”'’]",
    re.IGNORECASE,
)


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
    reading: Reading | None = None,
) -> Report:
    """Write the records of `src` that pass every rule to `out` (JSONL), the report beside it; return it.

    `min_response_words=0` turns off the tiny-response rule, `near_duplicate_threshold=None` the near-duplicate
    one, empty pattern lists the pattern rules. With `write_dropped`, every dropped record goes to
    `OUT.dropped.jsonl` with its rule and what triggered it. `src` is any data source, read as `reading` says
    (camelid.data.formats). Kept records are written in camelid's layout of their kind (Record.to_json: `messages`
    for a conversation, `prompt`/`chosen`/`rejected` for a pair) and keep their other keys (`id`, `source`, ...).
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
    reading = reading or Reading()
    records = source_records(src)
    for where, value in records:
        report.read += 1
        try:
            if isinstance(value, BadRecord):
                raise value
            record = reading.record(value, where)
        except BadRecord as bad:
            if bad.reason in _NO_TEXT:
                rule = "empty response"
            elif skip_bad:
                rule = bad.reason
                unreadable += 1
                first_bad = first_bad or Skipped(where, bad.reason)
            else:
                raise with_count(bad, _count_bad(records, reading))
            drop({"rule": rule, "where": where} | ({"record": value} if isinstance(value, dict) else {}))
            continue

        messages = record.messages
        key = _exact_key(messages + ([record.rejected] if record.rejected else []))
        found = _record_rule(record, failures, refusals, min_response_words, drop_cut_off)
        if found is None and key in exact_seen:
            found = "exact duplicate", {"duplicate_of": exact_seen[key]}
        if found is None and near is not None:  # last: a conversation new to the index is added to it here
            if match := near.check_and_add(len(kept_where), *_prompts_and_answers(messages)):
                found = "near duplicate", {"duplicate_of": kept_where[match[0]], "similarity": round(match[1], 3)}
        if found is None:
            exact_seen[key] = where
            kept_where.append(where)
            kept.append(record.to_json())
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
    """An index of kept conversations that finds the most similar kept one at or above a threshold.

    A pair is alike when their answers are (Jaccard similarity of the answers' word sets) and so are the whole
    conversations, measured after the opening prompt lines the two share word for word: GPTeacher's tool prompts
    all open with the same long tool description, which made "Battle of Waterloo" and "French Revolution" 0.81
    alike. The index holds the answers, so a pair whose answers are alike at the threshold is always proposed."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._lsh = MinHashLSH(num_perm=num_perm, params=(self.bands, self.rows))
        self._template = MinHash(num_perm=num_perm)  # one set of permutations, shared by every MinHash
        self._kept: dict[int, tuple[list[str], np.ndarray]] = {}  # key -> prompt lines, sorted answer word hashes

    def check_and_add(self, key: int, prompts: str, answers: str) -> tuple[int, float] | None:
        """(key, similarity) of the most similar kept conversation at or above the threshold; else keep this one."""
        from datasketch import MinHash

        answer_words = _words(answers)
        if len(answer_words) == 0:
            return None  # nothing to compare; the exact-duplicate rule still applies
        minhash = MinHash(
            num_perm=self.num_perm, hashfunc=int, permutations=self._template.permutations, scheme=self._template.scheme
        )
        minhash.update_batch(answer_words.tolist())
        lines, best = prompts.split("\n"), None
        for candidate in self._lsh.query(minhash):
            kept_lines, kept_answers = self._kept[candidate]
            if _jaccard(answer_words, kept_answers) < self.threshold:
                continue
            prompt, kept_prompt = _after_shared_lines(lines, kept_lines)
            ours, theirs = np.union1d(_words(prompt), answer_words), np.union1d(_words(kept_prompt), kept_answers)
            similarity = _jaccard(ours, theirs)
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = candidate, similarity
        if best is None:
            self._kept[key] = lines, answer_words
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


def _count_bad(records, reading: Reading) -> int:
    """How many of the rest of `records` are bad, for the error about the first."""
    n = 0
    for where, value in records:
        try:
            if isinstance(value, BadRecord):
                raise value
            reading.record(value, where)
        except BadRecord as bad:
            n += bad.reason not in _NO_TEXT
    return n


def _record_rule(record: Record, failures, refusals, min_words, drop_cut_off) -> tuple[str, dict] | None:
    """The first content rule that drops the record. The rules read answers in text: a turn that only calls a
    tool is left out. In a preference pair or KTO row a refusal or a short answer may be the very thing judged
    (HH-RLHF's harmless answers are refusals), so only the empty, failed and cut-off rules apply, to every answer."""
    messages = [m for m in record.messages if not (m.get("tool_calls") and not m["content"].strip())]
    if record.kind == "conversation":
        return _content_rule(messages, failures, refusals, min_words, drop_cut_off)
    answers = messages + ([record.rejected] if record.rejected else [])
    return _content_rule(answers, failures, (), 0, drop_cut_off)


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
    if hit := _search(refusals, answers, outside_quotes=True):
        return "refusal", hit
    if min_words and (n := count_words(answers[-1])) < min_words:
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if (asked := _LONG_REQUEST.search(prompt)) and not _SHORT_REQUEST.search(prompt):
            return "tiny response", {"words": n, "asked": asked.group(0).strip()}
    return None


def _search(patterns: list[re.Pattern], answers: list[str], outside_quotes: bool = False) -> dict | None:
    """The first match in the answers; with `outside_quotes`, not one inside a character's quoted speech."""
    for answer in answers:
        for pattern in patterns:
            for m in pattern.finditer(answer):
                line = answer[answer.rfind("\n", 0, m.start()) + 1 : m.start()]
                if not (outside_quotes and len(_QUOTES.findall(line)) % 2):  # an odd count: a quote is open
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


def _prompts_and_answers(messages: list[dict]) -> tuple[str, str]:
    """The user turns and the assistant turns, each joined; a system message is left out, as many records share one."""
    return tuple("\n".join(m["content"] for m in messages if m["role"] == role) for role in ("user", "assistant"))


def _words(text: str) -> np.ndarray:
    """Sorted hashes of the distinct words of `text`, case folded."""
    return _word_hashes(set(_WORDS.findall(text.casefold())))


def _after_shared_lines(a: list[str], b: list[str]) -> tuple[str, str]:
    """Two prompts without the lines they open with alike (a tool description, a template), keeping one at least."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return "\n".join(a[n:]), "\n".join(b[n:])


def _word_hashes(words: set[str]) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the words (SHA-1, so the same in every run)."""
    hashes = [int.from_bytes(hashlib.sha1(w.encode()).digest()[:4], "little") for w in words]
    return np.unique(np.array(hashes, dtype=np.uint32))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


