"""Mixing datasets into one training file, as Koala did: each source by weight or by count, with provenance.

A source is a file of conversations (any format camelid reads) with a name and either a weight or a count:

- Weights are relative: the `total` output examples are split in proportion to them, rounded by largest
  remainder so the shares add up to `total` exactly. Without `total`, it is the largest total for which no
  weighted source has to be repeated.
- A count takes exactly that many examples from its source.
- Both may be mixed: the counts are taken first and the weights split what is left of `total` (without
  `total`: the counts plus the largest weighted total that needs no repeat).

Within a source, a share no larger than the source is a seeded random subset. A larger share takes every
record once per whole pass and a random subset of the records for the part of a pass left over, so every
record appears before any appears twice, and no record appears twice more often than another. Everything is
seeded: the same sources, shares and seed give the same file. The output is shuffled.

Preference data becomes conditioned examples (Koala, after Chain of Hindsight, Liu et al. 2023): a record with
`chosen` and `rejected` answers gives two examples, the chosen answer under the system message "a helpful
answer" and the rejected one under "an unhelpful answer". The marker is a system message (put before an
existing one, on its own line) because training learns only the assistant turns: the model reads the
condition but is never trained to write it, and at inference `--system "a helpful answer"` asks for the good
kind. Pairs are read in every preference layout of camelid.data.formats, Anthropic's HH-RLHF transcripts (the
data Koala used) among them; a KTO row (one answer labelled desirable or not) becomes one example under the
marker its label names. A preference source's share counts examples, two per pair; both examples of a pair
are taken together, except that an odd share keeps one example, drawn at random, of the last pair taken.

Each output record is `{"messages": [...], "source": NAME}` (NAME replacing any `source` the record had), plus
`"condition": "helpful" | "unhelpful"` on conditioned examples, the record's `tools` and its own `id` when it
had them; training ignores `source`, `condition` and `id`. Everything is read before anything is written, so
`out` may be an input.
"""

import math
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from camelid.data.sources import HUB_PREFIX
from camelid.data.formats import BadRecord, Reading, Record, Skipped, iter_records, to_record, write_jsonl
from camelid.pipeline_report import Report
from camelid.errors import CamelidError

HELPFUL = "a helpful answer"
UNHELPFUL = "an unhelpful answer"



@dataclass
class MixSource:
    """One input of a mix: a file, the name its records carry as `source`, and a weight or a count."""

    path: str | Path
    name: str
    weight: float | None = None  # relative share of the total; weights need not add up to 1
    count: int | None = None  # exactly this many examples

    @classmethod
    def parse(cls, spec: str) -> "MixSource":
        """A source as `camelid data mix` takes it: NAME=PATH[:weight=W | :count=N], or PATH[:W].

        NAME defaults to the file's stem; a bare `:W` is a weight and no suffix is a weight of 1. Text before the
        first `=` that holds a `/` is part of a path, not a name.
        """
        name, has_name, rest = spec.partition("=")
        if not has_name or not name or "/" in name:
            name, rest = "", spec
        path, colon, share = rest.rpartition(":")
        if not (colon and path):
            return cls(rest, name or _source_name(rest), weight=1.0)
        key, has_key, value = share.partition("=")
        if not has_key:
            split = not share.replace(".", "", 1).isdigit() and (Path(path).is_dir() or rest.startswith(HUB_PREFIX))
            if split:  # `folder:test`, `hf:org/name` or `hf:org/name:test`: a split or a Hub name, not a weight
                return cls(rest, name or _source_name(rest), weight=1.0)
            key, value = "weight", share
        try:
            number = float(value) if key == "weight" else int(value)
        except ValueError:
            number = None
        if key not in ("weight", "count") or number is None:
            raise CamelidError(f"source {spec!r}: after the last ':' give weight=W, count=N or a weight "
                               "(e.g. alpaca=alpaca.jsonl:weight=0.3)")
        name = name or _source_name(path)
        return cls(path, name, weight=number) if key == "weight" else cls(path, name, count=number)


def _source_name(path: str) -> str:
    """A source's default name: its file's stem, or a Hub dataset's name (hf:org/name:split -> name)."""
    if path.startswith(HUB_PREFIX):
        return path[len(HUB_PREFIX):].split(":")[0].rsplit("/", 1)[-1]
    return Path(path).stem


def mix_datasets(
    sources: list[MixSource],
    out: str | Path,
    *,
    total: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    helpful: str = HELPFUL,
    unhelpful: str = UNHELPFUL,
    reading: Reading | None = None,
) -> Report:
    """Write the mixture of `sources` to `out` (JSONL) and its report beside it; return the report.

    `total` is the number of examples to write (see the module docstring for its default); `helpful` and
    `unhelpful` are the system-message markers given to preference pairs; `reading` forces every source's
    format or renames its columns (camelid.data.formats.Reading).
    """
    _check_sources(sources, total)
    _check_markers(helpful, unhelpful)
    _check_output(Path(out))
    report = Report("mix")
    report.facts["seed"] = seed
    pools = [_read_source(source, report, skip_bad, reading or Reading(), helpful, unhelpful) for source in sources]
    shares = _shares(sources, pools, total)

    records: list[dict] = []
    for source, pool, share in zip(sources, pools, shares):
        # One generator per source, seeded by its name: adding a source does not change what another gives.
        taken = _take(pool, share, random.Random(f"{seed}:{source.name}"))
        records += taken
        facts = report.facts[f"source {source.name}"]
        facts["taken"] = len(taken)
        facts["repeats"] = max(0, share - pool.examples)
        if pool.preference:
            facts["helpful"] = sum(r["condition"] == "helpful" for r in taken)
            facts["unhelpful"] = sum(r["condition"] == "unhelpful" for r in taken)
    random.Random(seed).shuffle(records)
    write_jsonl(out, records)
    report.written = len(records)
    report.outputs["mix"] = str(out)
    report.save(out)
    return report


def split_by_weight(total: int, weights: list) -> list[int]:
    """`total` split in proportion to `weights`, each share the floor or ceiling of its exact quota.

    Largest remainder (Hamilton's method): the floors first, then one more to the largest remainders, the
    earlier source first on a tie. Weights are read as the decimals they print as, so 0.3 is exactly 3/10.
    """
    exact = [Fraction(str(w)) for w in weights]
    whole = sum(exact)
    quotas = [total * w / whole for w in exact]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (shares[i] - quotas[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def condition_preference(record: dict, where: str, *, helpful: str = HELPFUL, unhelpful: str = UNHELPFUL):
    """A preference record as its two conditioned conversations, (helpful, unhelpful); raises `BadRecord`.

    Any preference layout camelid reads (camelid.data.formats): TRL's prompt/chosen/rejected with strings or
    messages, whole conversations that differ only in their last assistant turn, HH-RLHF transcripts,
    LLaMA-Factory's layouts. An optional `system` string is the system message when the prompt has none.
    """
    pair = to_record(record, where)
    if pair.kind != "preference":
        raise BadRecord(where, "not a preference record", f"read as {pair.format}")
    rejected = pair.messages[:-1] + [pair.rejected]
    return _conditioned(pair.messages, helpful), _conditioned(rejected, unhelpful)


# -- reading a source ------------------------------------------------------------------------------------------


@dataclass
class _Pool:
    """A source's usable records: units of one example (plain) or two (a helpful and unhelpful pair)."""

    units: list[tuple[dict, ...]]
    preference: bool

    @property
    def examples(self) -> int:
        return len(self.units) * (2 if self.preference else 1)


def _read_source(source: MixSource, report: Report, skip_bad: bool, reading: Reading, helpful: str,
                 unhelpful: str) -> _Pool:
    units, first = [], None  # first: (where, kind) of the first record, which sets the source's kind
    read, dropped = 0, Counter()
    markers = {"helpful": helpful, "unhelpful": unhelpful}
    for item in iter_records(source.path, reading.record, skip_bad=skip_bad):
        read += 1
        if isinstance(item, Skipped):
            dropped[item.reason] += 1
            continue
        first = first or (item.where, item.kind)
        if item.kind != first[1]:
            raise CamelidError(
                f"{item.where}: source {source.name!r} mixes {_KINDS[item.kind]} records with {_KINDS[first[1]]} "
                f"ones (such as {first[0]}); give each kind as its own source"
            )
        if item.kind == "preference":
            if item.messages[-1] == item.rejected:
                dropped["chosen equals rejected"] += 1
                continue
            pair = (item.messages, item.messages[:-1] + [item.rejected])
            units.append(tuple(_output(_conditioned(m, markers[c]), source.name, item, c)
                               for m, c in zip(pair, ("helpful", "unhelpful"))))
        elif item.kind == "kto":  # one judged answer: conditioned by its label
            condition = "helpful" if item.label else "unhelpful"
            units.append((_output(_conditioned(item.messages, markers[condition]), source.name, item, condition),))
        else:
            units.append((_output(item.messages, source.name, item),))
    if not units:
        raise CamelidError(f"{source.path}: source {source.name!r} has no usable record; check the file")
    report.read += read
    for reason, n in dropped.items():
        report.drop(reason, n)
    kind = first[1]
    pool = _Pool(units, preference=kind == "preference")
    facts = {"path": str(source.path)}
    facts |= {"weight": source.weight} if source.weight is not None else {"count": source.count}
    facts |= {"kind": {"conversation": "plain"}.get(kind, kind), "read": read}
    facts |= {"pairs" if pool.preference else "usable": len(units)}
    if dropped:
        facts["dropped"] = dict(dropped)
    report.facts[f"source {source.name}"] = facts
    return pool


_KINDS = {"conversation": "plain", "preference": "preference (chosen/rejected)", "kto": "KTO (labelled)"}


def _output(messages: list[dict], name: str, record: Record, condition: str | None = None) -> dict:
    out = {"messages": messages, "source": name}
    if record.tools:
        out["tools"] = record.tools
    if condition:
        out["condition"] = condition
    if "id" in record.extra:
        out["id"] = record.extra["id"]
    return out


def _conditioned(messages: list[dict], marker: str) -> list[dict]:
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{marker}\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": marker}] + messages


# -- shares and sampling ---------------------------------------------------------------------------------------


def _check_sources(sources: list[MixSource], total: int | None) -> None:
    if not sources:
        raise CamelidError("no source to mix; give at least one")
    names = set()
    for s in sources:
        if not s.name:
            raise CamelidError(f"source {s.path} has no name; name every source")
        if s.name in names:
            raise CamelidError(f"two sources are named {s.name!r}; give each source its own name")
        names.add(s.name)
        if (s.weight is None) == (s.count is None):
            raise CamelidError(f"source {s.name!r}: give a weight or a count (one of them, not both)")
        if s.weight is not None and not (
            isinstance(s.weight, int | float) and not isinstance(s.weight, bool) and math.isfinite(s.weight)
            and s.weight > 0
        ):
            raise CamelidError(f"source {s.name!r}: weight must be a positive number, not {s.weight!r}")
        if s.count is not None and not (isinstance(s.count, int) and not isinstance(s.count, bool) and s.count > 0):
            raise CamelidError(f"source {s.name!r}: count must be a positive whole number, not {s.count!r}")
    if total is not None and not (isinstance(total, int) and not isinstance(total, bool) and total > 0):
        raise CamelidError(f"total must be a positive whole number, not {total!r}")
    counted = sum(s.count for s in sources if s.count is not None)
    if total is not None and all(s.count is not None for s in sources) and total != counted:
        raise CamelidError(
            f"total {total} differs from the sources' counts, which add up to {counted}; "
            "drop the total or give some sources weights"
        )
    if total is not None and any(s.weight is not None for s in sources) and total <= counted:
        raise CamelidError(
            f"total {total} leaves nothing for the weighted sources after the counts ({counted}); raise the total"
        )


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise CamelidError(f"{out} is a directory; give a file name for the output")
    if not out.parent.is_dir():
        raise CamelidError(f"{out.parent}: no such directory; create it or choose another output path")


def _check_markers(helpful: str, unhelpful: str) -> None:
    if not (isinstance(helpful, str) and helpful.strip() and isinstance(unhelpful, str) and unhelpful.strip()):
        raise CamelidError("the helpful and unhelpful markers must be non-empty text")
    if helpful == unhelpful:
        raise CamelidError(f"the helpful and unhelpful markers are both {helpful!r}; they must differ")


def _shares(sources: list[MixSource], pools: list[_Pool], total: int | None) -> list[int]:
    """How many examples each source gives."""
    shares = [s.count for s in sources]
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted:
        weights = [sources[i].weight for i in weighted]
        if total is None:
            rest = _largest_total(weights, [pools[i].examples for i in weighted])
        else:
            rest = total - sum(s.count for s in sources if s.count is not None)
        for i, share in zip(weighted, split_by_weight(rest, weights)):
            shares[i] = share
    return shares


def _largest_total(weights: list, sizes: list[int]) -> int:
    """The largest total whose split gives no source more than it holds.

    Every quota within its source's size is a sufficient start; rounding may still allow a little more.
    """
    exact = [Fraction(str(w)) for w in weights]
    whole = sum(exact)
    t = min(math.floor(n * whole / w) for n, w in zip(sizes, exact))
    while all(s <= n for s, n in zip(split_by_weight(t + 1, weights), sizes)):
        t += 1
    return t


def _take(pool: _Pool, share: int, rng: random.Random) -> list[dict]:
    """`share` examples of the pool: whole passes over its units, then a random subset for the rest."""
    per_unit = 2 if pool.preference else 1
    n_units = -(-share // per_unit)
    passes, rest = divmod(n_units, len(pool.units))
    order = list(range(len(pool.units))) * passes + rng.sample(range(len(pool.units)), rest)
    out = [example for i in order for example in pool.units[i]]
    if len(out) > share:  # an odd share of pairs: keep one side, at random, of the last pair
        out.pop(len(out) - 1 - rng.randrange(2))
    return out
