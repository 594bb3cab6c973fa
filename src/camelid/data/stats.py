"""What is in a chat dataset: conversations, turns, lengths in characters and in the tokens training will see,
sources and conditions, languages; as a Report, its text, and optionally a histogram of token lengths.

Token counts are made as training makes them: each conversation rendered with the chat template and encoded
without added special tokens, and its learned tokens are the assistant turns' (camelid.examples).
Distributions are summarised by min, mean, median, p90, p99 and max, where pN is the nearest-rank percentile:
the smallest value that N% of the conversations do not exceed.
"""

import math
import statistics
from collections import Counter
from pathlib import Path

from camelid.data.formats import Reading, Skipped, iter_conversations
from camelid.data.languages import detect_languages, language_detector
from camelid.pipeline_report import Report
from camelid.errors import CamelidError

CONTEXT_LENGTHS = (512, 1024, 2048, 4096)
ROLES = ("system", "user", "assistant", "tool")
LANGUAGE_SAMPLE_CHARS = 1000  # the first user turn's opening is enough to tell its language, and much faster


def dataset_stats(
    src: str | Path,
    *,
    tokenizer=None,
    template=None,
    context_lengths=CONTEXT_LENGTHS,
    histogram: str | Path | None = None,
    languages: bool | list[str] = False,
    skip_bad: bool = False,
    reading: Reading | None = None,
) -> Report:
    """Count what is in `src`; the numbers are the report's `facts` (see `stats_text` for a person's view).

    With a `tokenizer` and chat `template` (both or neither), tokens per conversation and how many are longer
    than each of `context_lengths`; `histogram` is then a PNG path for their distribution. `languages`: True
    detects the language of each first user turn among every language lingua knows (its models take seconds to
    load and about 1 GB); a list of ISO 639-1 codes ("en", "fr", ...) limits it to those, which is faster. The
    languages are counted by ISO 639-1 code, "unknown" where none can be told (camelid.data.languages).
    `src` is any data source and `reading` how its records are read (camelid.data.formats). A preference pair
    counts as its prompt and chosen answer, with its rejected answers' lengths apart; a KTO row as its
    conversation, with the labels counted.
    """
    if (tokenizer is None) != (template is None):
        raise CamelidError("token counts need both a tokenizer and a chat template; give both or neither")
    if histogram is not None and tokenizer is None:
        raise CamelidError("the token histogram needs a tokenizer and a chat template; give a model")
    if histogram is not None and not Path(histogram).parent.is_dir():  # found now, not after all the tokenizing
        raise CamelidError(f"{histogram}: there is no directory {Path(histogram).parent} to write it in; create it")
    detector = language_detector(None if languages is True else languages) if languages else None

    report = Report("stats")
    messages_by_role: Counter = Counter()
    chars: dict[str, list[int]] = {role: [] for role in ROLES}
    exchanges, tokens, learned = [], [], []
    system_prompts: Counter = Counter()
    sources: Counter = Counter()
    conditions: Counter = Counter()
    first_turns = []
    formats, kinds, rejected_chars, tool_calls = Counter(), Counter(), [], 0
    for item in iter_conversations(src, skip_bad=skip_bad, reading=reading):
        report.read += 1
        if isinstance(item, Skipped):
            report.drop(item.reason)
            continue
        where, value, messages = item.where, item.extra, item.messages
        formats[item.format] += 1
        kinds[_kind_name(item)] += 1
        if item.rejected is not None:
            rejected_chars.append(len(item.rejected["content"]))
        for m in messages:
            messages_by_role[m["role"]] += 1
            chars[m["role"]].append(len(m["content"]))
            tool_calls += len(m.get("tool_calls") or ())
        exchanges.append(sum(m["role"] == "assistant" for m in messages))
        if messages[0]["role"] == "system":
            system_prompts[messages[0]["content"]] += 1
        if "source" in value:
            sources[str(value["source"])] += 1
        if "condition" in value:
            conditions[str(value["condition"])] += 1
        if detector is not None:
            first_turns.append(next(m["content"] for m in messages if m["role"] == "user")[:LANGUAGE_SAMPLE_CHARS])
        if tokenizer is not None:
            n, n_learned = _token_counts(template, tokenizer, messages, item.tools, where)
            tokens.append(n)
            learned.append(n_learned)

    n = len(exchanges)
    facts = report.facts
    facts["file"] = str(src)
    facts["conversations"] = n
    facts["formats"] = dict(formats.most_common())
    if set(kinds) != {"conversations"}:
        facts["kinds"] = dict(kinds.most_common())
    facts["messages"] = {role: messages_by_role[role] for role in ROLES if role != "tool" or messages_by_role[role]}
    facts["exchanges per conversation"] = summary(exchanges)
    facts["system prompts"] = {"conversations with one": sum(system_prompts.values()), "distinct": len(system_prompts)}
    for key, counts in (("sources", sources), ("conditions", conditions)):
        if counts:  # conversations without the field are counted too, so the numbers add up
            missing = n - sum(counts.values())
            facts[key] = dict(counts.most_common()) | ({"(none)": missing} if missing else {})
    facts["characters per message"] = {role: summary(chars[role]) for role in ROLES if chars[role]}
    if rejected_chars:
        facts["characters per rejected answer"] = summary(rejected_chars)
    if tool_calls:
        facts["tool calls"] = tool_calls
    if tokenizer is not None:
        facts["template"] = template.name or "the model's own"
        facts["tokens per conversation"] = summary(tokens)
        facts["tokens"] = {"all": sum(tokens), "learned": sum(learned)}
        facts["longer than"] = {str(limit): sum(t > limit for t in tokens) for limit in context_lengths}
    if detector is not None:
        facts["languages"] = dict(Counter(detect_languages(detector, first_turns)).most_common())
    if histogram is not None:
        from camelid.plots import length_histogram

        title = f"{Path(str(src)).name}: {n:,} conversations, {sum(tokens):,} tokens"
        length_histogram(tokens, histogram, title=title, marks=context_lengths)
        report.outputs["histogram"] = str(histogram)
    return report.finish()


def _kind_name(record) -> str:
    if record.label is not None:
        return f"KTO {'desirable' if record.label else 'undesirable'}"
    return {"conversation": "conversations", "preference": "preference pairs"}[record.kind]


def summary(values: list[int]) -> dict:
    """min, mean, median, p90, p99, max of `values` (nearest-rank percentiles); {} when there are none."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[math.ceil(p * len(ordered)) - 1]

    median = statistics.median(ordered)
    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 2),
        "median": int(median) if median == int(median) else median,
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def stats_text(report: Report) -> str:
    """The statistics as aligned lines for a person."""
    f = report.facts
    rows: list[tuple[str, str]] = [("file", f["file"])]
    conversations = f"{f['conversations']:,}"
    if report.dropped:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in report.dropped.most_common())
        conversations += f" (skipped {sum(report.dropped.values()):,} bad records: {reasons})"
    rows.append(("conversations", conversations))
    rows.append(("formats", _counts(f["formats"])))
    if "kinds" in f:
        rows.append(("kinds", _counts(f["kinds"])))
    rows.append(("messages", _counts(f["messages"])))
    rows.append(("exchanges per conversation", _summary(f["exchanges per conversation"])))
    system = f["system prompts"]
    rows.append(("with a system prompt", f"{system['conversations with one']:,} ({system['distinct']:,} distinct)"))
    for key in ("sources", "conditions"):
        if key in f:
            rows.append((key, _counts(f[key])))
    for role, values in f["characters per message"].items():
        rows.append((f"characters per {role} message", _summary(values)))
    if "characters per rejected answer" in f:
        rows.append(("characters per rejected answer", _summary(f["characters per rejected answer"])))
    if "tool calls" in f:
        rows.append(("tool calls", f"{f['tool calls']:,}"))
    if "tokens per conversation" in f:
        rows.append(("chat template", f["template"]))
        rows.append(("tokens per conversation", _summary(f["tokens per conversation"])))
        rows.append(("tokens", f"{f['tokens']['all']:,} ({f['tokens']['learned']:,} learned)"))
        total = max(f["conversations"], 1)
        for limit, count in f["longer than"].items():
            rows.append((f"longer than {int(limit):,} tokens", f"{count:,} ({100 * count / total:.1f}%)"))
    if "languages" in f:
        rows.append(("languages (first user turn)", _counts(f["languages"])))
    for name, path in report.outputs.items():
        rows.append((name, path))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _token_counts(template, tokenizer, messages: list[dict], tools, where: str) -> tuple[int, int]:
    from camelid.examples import make_example

    try:
        example = make_example(template, tokenizer, messages, tools)
    except CamelidError as exc:
        raise CamelidError(f"{where}: {exc}") from None
    return len(example.tokens), example.supervised


def _summary(s: dict) -> str:
    return "  ".join(f"{key} {value:,}" for key, value in s.items()) if s else "-"


def _counts(counts: dict) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in counts.items())
