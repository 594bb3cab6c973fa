"""Training data at scale: sources to conversations to tokenized examples to rows, through Hugging Face `datasets`.

Nothing holds every conversation in memory. The conversations are written, as they are read, to an Arrow file
(one JSON text per conversation, so that records of every shape fit one column); tokenizing and masking
(camelid.examples) run over it with `datasets.map` in `data_workers` processes, into another Arrow file. Both
are memory-mapped and cached under camelid's cache (`datasets/`): the next run with the same sources (same
size and modification time), reading options, tokenizer, template, `seq_len` and `overflow` finds them and
only plans its rows. Rows are lists of example numbers, packed from the lengths alone; a row's tokens are read
from the Arrow file when a step needs it.

What is learned is as camelid.examples makes it, in the same order: the held-out conversations are a seeded
random share of all of them, the rest are made into examples, and those are packed in that shuffled order.
"""

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from camelid.errors import CamelidError
from camelid.examples import (
    CUT, Example, ExampleStats, Row, fit_example, make_example, one_per_row_indices, pack_indices,
)
from camelid.data.sources import source_stamp
from camelid.files import cache_dir
from camelid.train.recipe import PAIRED
from camelid.train.schedule import held_out_size, shuffled

# The notes of rows that each objective trains on.
LEARNED = {"sft": ("conversation", "preference", "kto"), "dpo": ("preference",), "simpo": ("preference",),
           "orpo": ("preference",), "kto": ("kto",)}
KEPT = ("kept", "truncated")  # the statuses of examples that are trained on
PARALLEL_FROM = 20_000  # conversations from which tokenizing is spread over processes (below, starting them costs more)


def training_rows(cfg, template, tokenizer, log) -> tuple["Rows", "Rows"]:
    """Training and held-out rows of `cfg.data`, read, tokenized and cached as the module docstring says."""
    conversations = _conversation_dataset(cfg, log)
    return _plan_rows(cfg, template, tokenizer, conversations, log)


def rows_of_conversations(cfg, template, tokenizer, conversations: list, log) -> tuple["Rows", "Rows"]:
    """The same for conversations already in memory (lists of messages or {"messages", "tools"}); not cached."""
    import datasets

    table = {"source": [0] * len(conversations), "note": ["conversation"] * len(conversations),
             "conversation": [json.dumps(c if isinstance(c, dict) else {"messages": c}) for c in conversations]}
    return _plan_rows(cfg, template, tokenizer, datasets.Dataset.from_dict(table, features=_conversation_features()),
                 log, cache=False)


# -- conversations -----------------------------------------------------------------------------------------------


def _conversation_features():
    import datasets

    return datasets.Features({"source": datasets.Value("int32"), "note": datasets.Value("string"),
                              "conversation": datasets.Value("string")})


def _conversation_dataset(cfg, log):
    """Every record of every source as a row: which source, what it is (a note: its kind, "undesirable", or
    "skipped: reason"), and the conversation training learns as JSON (None when there is none)."""
    import datasets

    # One JSON text: datasets would take lists in gen_kwargs as shards. The stamps make a changed file a new set.
    spec = json.dumps({"sources": [str(p) for p in cfg.data], "stamps": [source_stamp(p) for p in cfg.data],
                       "code": _code_stamp(),
                       "data_format": cfg.data_format, "columns": list(cfg.columns), "skip_bad": cfg.skip_bad,
                       "objective": cfg.objective})
    try:
        dataset = datasets.Dataset.from_generator(_conversation_rows, gen_kwargs={"spec": spec},
                                                  features=_conversation_features(),
                                                  cache_dir=str(cache_dir() / "datasets"))
    except datasets.exceptions.DatasetGenerationError as exc:
        raise _camelid_cause(exc) from None
    _log_sources(cfg, dataset, log)
    return dataset


def _conversation_rows(spec: str):
    from camelid.data.formats import Reading, Skipped, iter_conversations, parse_columns

    spec = json.loads(spec)
    reading = Reading(spec["data_format"], parse_columns(",".join(spec["columns"])))
    for i, path in enumerate(spec["sources"]):
        for item in iter_conversations(path, skip_bad=spec["skip_bad"], reading=reading):
            if isinstance(item, Skipped):
                yield {"source": i, "note": f"skipped: {item.reason}", "conversation": None}
                continue
            for note, conversation in _learned(item, spec["objective"]):
                text = None if conversation is None else json.dumps(conversation, ensure_ascii=False)
                yield {"source": i, "note": note, "conversation": text}


def _learned(item, objective: str):
    """(note, conversation) for each row a record gives the objective; conversation None when none is learned.

    SFT learns a conversation, a pair's chosen answer and a desirable KTO answer. DPO, SimPO and ORPO learn pairs
    alone. KTO learns labelled answers, and a pair as its two answers, chosen desirable and rejected not (as
    TRL's `unpair_preference_dataset`).
    """
    tools = {"tools": item.tools} if item.tools else {}
    if objective == "sft":
        learned = item.for_sft()
        yield (item.kind, {"messages": learned} | tools) if learned is not None else ("undesirable", None)
    elif objective in PAIRED:
        if item.kind == "preference":
            yield "preference", {"messages": item.messages, "rejected": item.rejected} | tools
        else:
            yield "not a pair", None
    elif item.kind == "kto":
        yield "kto", {"messages": item.messages, "label": item.label} | tools
    elif item.kind == "preference":
        yield "kto", {"messages": item.messages, "label": True} | tools
        yield "kto", {"messages": item.messages[:-1] + [item.rejected], "label": False} | tools
    else:
        yield "not labelled", None


def _code_stamp() -> str:
    """A hash of the code that reads records and makes examples: a change to it is a new cache, with no version
    number to remember to raise."""
    from camelid import chat_template, examples
    from camelid.data import formats, sources

    digest = hashlib.sha256(Path(__file__).read_bytes())
    from camelid.train import preference

    for module in (sources, formats, examples, chat_template, preference):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _log_sources(cfg, dataset, log) -> None:
    counts = Counter(zip(_column(dataset, "source").tolist(), _column(dataset, "note").tolist()))
    for i, path in enumerate(cfg.data):
        notes = {note: n for (source, note), n in counts.items() if source == i}
        skipped = Counter({note.removeprefix("skipped: "): n for note, n in notes.items() if note.startswith("skipped")})
        kept = sum(n for note, n in notes.items() if not note.startswith("skipped"))
        line = f"{path}: {kept:,} records"
        if skipped:
            from camelid.data.formats import skipped_line

            line += f"; {skipped_line(kept, skipped)}"
        line += _kinds_line(notes, cfg.objective)
        log(line)


def _kinds_line(notes: dict, objective: str) -> str:
    """What the objective makes of a source's records, counted (and what it leaves unused, by why)."""
    line = ""
    if objective == "sft":
        if notes.get("preference"):
            line += f"; {notes['preference']:,} preference pairs, trained on their chosen answers"
        if notes.get("kto") or notes.get("undesirable"):
            line += (f"; {notes.get('kto', 0) + notes.get('undesirable', 0):,} KTO rows, trained on the "
                     f"{notes.get('kto', 0):,} desirable answers")
        return line
    if notes.get("preference"):
        line += f"; {notes['preference']:,} preference pairs"
    if notes.get("kto"):
        line += f"; {notes['kto']:,} labelled answers (a pair gives two)"
    for unused in ("not a pair", "not labelled"):
        if notes.get(unused):
            line += f"; {notes[unused]:,} records unused by {objective} ({unused})"
    return line


def _camelid_cause(exc: BaseException) -> BaseException:
    """The CamelidError that datasets wrapped (a bad record, a template that refuses), else the error itself. A
    bad record's fix is said as a recipe key: `camelid train` has no --skip-bad flag."""
    from camelid.data.sources import SKIP_HINT, BadRecord

    cause = exc
    while cause is not None and not isinstance(cause, CamelidError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, BadRecord):
        return CamelidError(str(cause).replace(SKIP_HINT, "fix the record or set skip_bad=true to drop such records"))
    return cause or exc


# -- examples ----------------------------------------------------------------------------------------------------


def _plan_rows(cfg, template, tokenizer, conversations, log, cache: bool = True) -> tuple["Rows", "Rows"]:
    notes = _column(conversations, "note")
    learned = np.flatnonzero(np.isin(notes, LEARNED[cfg.objective]))
    if not len(learned):
        if cfg.objective != "sft":
            what = "preference pairs" if cfg.objective in PAIRED else "answers labelled desirable or not"
            raise CamelidError(f"the data holds no {what} for objective {cfg.objective}; give such data (see "
                               "`camelid data --help`) or use objective sft")
        raise CamelidError("the data holds no usable conversation; check the files given as data")
    examples = _tokenized(conversations, cfg, template, tokenizer, cache)
    order = learned[shuffled(range(len(learned)), cfg.seed)]
    n_eval = held_out_size(len(order), cfg.eval_fraction)
    held_out, train = order[:n_eval], order[n_eval:]
    status, lengths = _column(examples, "status"), _column(examples, "length").astype(np.int64)
    log(f"training data: {_stats(status[train]).summary()}")
    train, held_out = train[np.isin(status[train], KEPT)], held_out[np.isin(status[held_out], KEPT)]
    if not len(train):
        raise CamelidError("no conversation yields anything to learn; check the data and seq_len")
    if cfg.objective != "sft":
        return _plan_pair_rows(cfg, examples, train, held_out, log)
    groups, eval_groups = _groups(cfg, train, lengths, cfg.seq_len), _groups(cfg, held_out, lengths, cfg.seq_len)
    rows, eval_rows = Rows(examples, groups, lengths), Rows(examples, eval_groups, lengths)
    supervised = int(_column(examples, "supervised").astype(np.int64)[train].sum())
    log(f"{len(rows)} training sequences ({int(lengths[train].sum()):,} tokens, {supervised:,} supervised), "
        f"{len(eval_rows)} held out; {'packed' if cfg.packing else 'one example each'}")
    return rows, eval_rows


def _groups(cfg, order: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """The examples of each row: packed up to `budget` tokens, or one per row grouped by length."""
    if cfg.packing:
        return pack_indices(order, lengths, budget)
    return one_per_row_indices(order, lengths, 64 * cfg.micro_batch_size)


def _plan_pair_rows(cfg, examples, train, held_out, log) -> tuple["PairRows", "PairRows"]:
    """Rows of pairs (or of KTO answers, each with the answer of the example before it in training order as its
    KL branch), up to 2 x seq_len tokens each: a prompt, and an answer of up to seq_len tokens after it twice."""
    lengths = _column(examples, "length").astype(np.int64)
    partners = {}
    if cfg.objective == "kto":
        prompt, answer = _column(examples, "prompt_len").astype(np.int64), lengths - _column(examples, "prompt_len")
        for order in (train, held_out):
            if len(order) < 2:
                continue
            for i, j in zip(order.tolist(), np.roll(order, 1).tolist()):
                partners[i] = j
                lengths[i] += 1 + min(int(answer[j]), cfg.seq_len - int(prompt[i]))
    sets = [PairRows(examples, _groups(cfg, order, lengths, 2 * cfg.seq_len), lengths, partners, cfg.seq_len)
            for order in (train, held_out)]
    rows, eval_rows = sets
    if cfg.objective == "kto":
        from camelid.train.preference import check_labels

        check_labels(rows)
        if len(train) < 2:
            raise CamelidError("objective kto needs at least 2 training answers (the KL term pairs each with another)")
    pairs = "pairs" if cfg.objective in PAIRED else "labelled answers"
    log(f"{len(rows)} training rows ({sum(rows.pair_counts()):,} {pairs}, {sum(rows.lengths):,} tokens), "
        f"{len(eval_rows)} held out; {'packed' if cfg.packing else 'one each'}, the prompt once per "
        f"{'pair' if cfg.objective in PAIRED else 'answer and its KL answer'}")
    return rows, eval_rows


def _column(dataset, name: str) -> np.ndarray:
    """A whole column as a numpy array, straight from Arrow (`dataset[name]` formats it row by row: 30 s a
    column of a million rows)."""
    return dataset.data.column(name).to_numpy(zero_copy_only=False)


def _stats(status) -> ExampleStats:
    stats = ExampleStats()
    for value, n in Counter(status).items():
        stats.truncated += n if value in CUT else 0
        if value in KEPT:
            stats.kept += n
        else:
            stats.dropped[value] += n
    return stats


def _tokenized(conversations, cfg, template, tokenizer, cache: bool):
    """Each conversation's tokens and targets as training learns them, with its length, supervised tokens and
    status ("kept", "truncated", or why it was dropped; "" for a row without a conversation)."""
    import datasets

    pref = cfg.preference()
    fingerprint = hashlib.sha256(json.dumps([
        conversations._fingerprint, _code_stamp(), template.source, template.bos_token, template.eos_token, tokenizer.backend.to_str(),
        tokenizer.add_bos, tokenizer.add_eos, cfg.seq_len, cfg.overflow, cfg.objective,
        pref and pref.max_prompt_len,
    ]).encode()).hexdigest()[:32]
    workers = cfg.data_workers or (min(os.cpu_count() or 1, 8) if len(conversations) >= PARALLEL_FROM else None)
    ids = datasets.Sequence(datasets.Value("int32"))
    features = {"tokens": ids, "targets": ids, "length": datasets.Value("int32"),
                "supervised": datasets.Value("int32"), "status": datasets.Value("string")}
    kwargs = {"seq_len": cfg.seq_len, "overflow": cfg.overflow}
    if pref is not None:
        features |= {"prompt_len": datasets.Value("int32"), "branch_tokens": ids, "branch_targets": ids,
                     "label": datasets.Value("int8")}
        kwargs["max_prompt_len"] = pref.max_prompt_len
    try:
        return conversations.map(
            _tokenize_batch if pref is None else _tokenize_pair_batch, batched=True, batch_size=256,
            num_proc=workers if workers and workers > 1 else None,
            fn_kwargs={"tokenizer": tokenizer, "template": (template.source, template.bos_token, template.eos_token,
                                                            template.name)} | kwargs,
            input_columns=["conversation"], remove_columns=conversations.column_names,
            features=datasets.Features(features),
            new_fingerprint=fingerprint, load_from_cache_file=cache, keep_in_memory=not cache,
            desc="tokenizing")
    except Exception as exc:  # a template that refuses (tool calls it does not write) comes wrapped from a worker
        cause = _camelid_cause(exc)
        if cause is exc:
            raise
        raise cause from None


def _tokenize_batch(conversations, tokenizer, template, seq_len, overflow):
    from camelid.chat_template import ChatTemplate

    chat = _template(ChatTemplate, *template)
    out = {"tokens": [], "targets": [], "length": [], "supervised": [], "status": []}
    for text in conversations:
        example, status = Example([], []), ""
        if text is not None:
            conversation = json.loads(text)
            example = make_example(chat, tokenizer, conversation["messages"], conversation.get("tools"))
            example, status = fit_example(example, seq_len, overflow)
            example = example or Example([], [])
        out["tokens"].append(example.tokens)
        out["targets"].append(example.targets)
        out["length"].append(len(example.tokens))
        out["supervised"].append(example.supervised)
        out["status"].append(status)
    return out


def _tokenize_pair_batch(conversations, tokenizer, template, seq_len, overflow, max_prompt_len):
    from camelid.chat_template import ChatTemplate
    from camelid.train.preference import fit_pair_example, make_pair_example

    chat = _template(ChatTemplate, *template)
    names = ("tokens", "targets", "prompt_len", "branch_tokens", "branch_targets", "label")
    out = {name: [] for name in names + ("length", "supervised", "status")}
    for text in conversations:
        example, status = None, ""
        if text is not None:
            example = make_pair_example(chat, tokenizer, json.loads(text))
            if isinstance(example, str):
                example, status = None, example
            else:
                example, status = fit_pair_example(example, seq_len, overflow, max_prompt_len)
        for name in names:
            out[name].append(getattr(example, name) if example else ([] if "tokens" in name or "targets" in name
                                                                      else 0))
        out["length"].append(example.length if example else 0)
        out["supervised"].append(example.supervised if example else 0)
        out["status"].append(status)
    return out


_TEMPLATES: dict = {}


def _template(cls, source, bos, eos, name):
    """The chat template, compiled once per process (a compiled template cannot be sent to a worker)."""
    key = (source, bos, eos, name)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = cls(source, bos_token=bos, eos_token=eos, name=name)
    return _TEMPLATES[key]


# -- rows --------------------------------------------------------------------------------------------------------


class Rows(Sequence):
    """Rows of examples read from the tokenized Arrow file when asked for; `rows[i]` is a camelid Row."""

    def __init__(self, examples, groups: list[list[int]], lengths: np.ndarray):
        self.examples, self.groups = examples, groups
        self.lengths = [int(lengths[g].sum()) for g in groups]  # each row's tokens

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._row(self.groups[i])

    def _row(self, group: list[int]) -> Row:
        part = self.examples[group]
        return Row([t for ts in part["tokens"] for t in ts], [t for ts in part["targets"] for t in ts],
                   [len(ts) for ts in part["tokens"]])


class PairRows(Rows):
    """Rows of preference examples read from the tokenized Arrow file when asked for; `rows[i]` is a
    camelid.train.preference.PairRow. `partners` maps a KTO example to the one whose answer is its KL branch."""

    def __init__(self, examples, groups: list[list[int]], lengths: np.ndarray, partners: dict, seq_len: int):
        super().__init__(examples, groups, lengths)
        self.partners, self.seq_len = partners, seq_len

    def _row(self, group: list[int]):
        from camelid.train.preference import pair_row

        mine = [self._example(k) for k in group]
        others = [self._example(self.partners[k]) if k in self.partners else None for k in group]
        return pair_row(mine, others, self.seq_len)

    def _example(self, k: int):
        from camelid.train.preference import PairExample

        record = self.examples[int(k)]
        return PairExample(record["tokens"], record["targets"], record["prompt_len"], record["branch_tokens"],
                           record["branch_targets"], record["label"])

    def pair_counts(self) -> list[int]:
        return [len(g) for g in self.groups]

    def label_counts(self) -> Counter:
        labels = _column(self.examples, "label")
        return Counter(int(labels[k]) for g in self.groups for k in g)
