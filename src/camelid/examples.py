"""Conversations to training sequences: render with a chat template, mask to the assistant turns, pack.

A training example is the conversation's tokens and, at each position, the next token to learn or IGNORE.
Only the assistant turns are learned: the content and the end-of-turn marker the template writes after it
(spans come from the template itself, see camelid.chat_template.assistant_spans).

Packing is the default: short examples are laid end to end in rows of `seq_len` tokens, each example keeping
its own positions (0, 1, ...) and attending only within itself, so a packed row computes exactly what the
examples would alone. It wastes no compute on padding, which on a CPU is all of the cost; padding one
example per row, grouped by length, is the alternative (`packing: false`).
"""

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from camelid.chat_template import ChatTemplate, assistant_spans
from camelid.errors import CamelidError
from camelid.model import IGNORE

OVERFLOW_RULES = ("truncate", "drop")
NO_ANSWER_LEFT = "no answer within the sequence length"
CUT = ("truncated", NO_ANSWER_LEFT)  # the statuses of examples that were cut to the sequence length


@dataclass
class Example:
    tokens: list[int]
    targets: list[int]  # targets[i] is the token to predict after tokens[i], or IGNORE

    @property
    def supervised(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class ExampleStats:
    """What happened to each conversation on the way to examples, for the run's report."""

    kept: int = 0
    truncated: int = 0  # longer than seq_len, cut to it (rule `truncate`)
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        parts = [f"{self.kept} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        parts += [f"{n} dropped ({reason})" for reason, n in self.dropped.most_common()]
        return ", ".join(parts)


def make_example(template: ChatTemplate, tokenizer, messages: list[dict], tools: list | None = None,
                 last_only: bool = False) -> Example:
    """Tokens of the rendered conversation with targets on exactly the assistant turns (`last_only`: the last
    one, the answer that preference tuning judges).

    `tools` are the function schemas the conversation may call, given to the template as transformers does.
    """
    extra = {"tools": tools} if tools else {}
    text = template.render(messages, **extra)
    check_tools_written(template, messages, tools, text)
    tokens = tokenizer.encode(text, add_special=False)
    targets = [IGNORE] * len(tokens)
    spans = assistant_spans(template, messages, tokenizer, **extra)
    for start, end in spans[-1:] if last_only else spans:
        # the token at position j is predicted at position j - 1
        for j in range(max(start, 1), end):
            targets[j - 1] = tokens[j]
    return Example(tokens, targets)


def check_tools_written(template: ChatTemplate, messages: list[dict], tools: list | None, text: str) -> None:
    """A one-line error when the template leaves out a tool call, a tool's result or the tools: most templates
    that predate tool calling (ChatML, Alpaca, the built-ins) write nothing for them, and training on such text
    would teach answers to calls the model never sees."""
    names = [call["function"]["name"] for m in messages for call in m.get("tool_calls") or ()]
    results = [m["content"].strip()[:60] for m in messages if m["role"] == "tool"]
    schemas = [t["function"] if isinstance(t.get("function"), dict) else t for t in tools or ()]
    schemas = [t.get("name") for t in schemas]
    # A result may be written as it is or as a JSON string (Llama 3.1's template writes `content | tojson`).
    missing = next((f"the tool call {n!r}" for n in names if n not in text), None) or \
        next((f"the tool result {r!r}" for r in results if r not in text and json.dumps(r)[1:-1] not in text),
             None) or \
        next((f"the tool {n!r}" for n in schemas if isinstance(n, str) and n not in text), None)
    if missing:
        raise CamelidError(f"chat template {template._label()} does not write tool calls ({missing} is not in its "
                           "text); use a model whose own template writes them (Qwen2.5, Llama 3.1, SmolLM3, ...)")


def make_examples(
    template: ChatTemplate, tokenizer, conversations, seq_len: int, overflow: str = "truncate"
) -> tuple[list[Example], ExampleStats]:
    """Examples for many conversations; over-long ones are cut to `seq_len` (or dropped, `overflow="drop"`).

    A conversation is a list of messages, or `{"messages": [...], "tools": [...]}` when it may call tools.
    An example left with nothing to learn (an empty answer, or every answer beyond the cut) is dropped.
    """
    if overflow not in OVERFLOW_RULES:
        raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, not {overflow!r}")
    stats = ExampleStats()
    examples = []
    for conversation in conversations:
        if isinstance(conversation, dict):
            example = make_example(template, tokenizer, conversation["messages"], conversation.get("tools"))
        else:
            example = make_example(template, tokenizer, conversation)
        example, status = fit_example(example, seq_len, overflow)
        stats.truncated += status in CUT  # every cut is counted, also one then dropped for having no answer left
        if example is None:
            stats.dropped[status] += 1
            continue
        examples.append(example)
        stats.kept += 1
    return examples, stats


def fit_example(example: Example, seq_len: int, overflow: str) -> tuple[Example | None, str]:
    """The example as training takes it, and what happened: "kept", "truncated" (cut to `seq_len`), or None and
    why it was dropped (longer than `seq_len` with `overflow="drop"`, or nothing left to learn)."""
    if overflow not in OVERFLOW_RULES:
        raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, not {overflow!r}")
    cut = len(example.tokens) > seq_len
    if cut:
        if overflow == "drop":
            return None, "longer than the sequence length"
        example = Example(example.tokens[:seq_len], example.targets[:seq_len])
        example.targets[-1] = IGNORE  # its target lies beyond the cut
    if example.supervised == 0:
        return None, NO_ANSWER_LEFT if cut else "nothing to learn"
    return example, "truncated" if cut else "kept"


@dataclass
class Row:
    """One training sequence: one example, or several packed end to end."""

    tokens: list[int]
    targets: list[int]
    lengths: list[int]  # the length of each example in the row, in order

    @property
    def supervised(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Lay examples end to end, in order, starting a new row when the next one does not fit."""
    lengths = np.array([len(ex.tokens) for ex in examples], dtype=np.int64)
    return [_row([examples[i] for i in group]) for group in pack_indices(np.arange(len(examples)), lengths, seq_len)]


def one_per_row(examples: list[Example], group: int) -> list[Row]:
    """One example per row, ordered so that rows of similar length meet in a batch (less padding).

    Examples are sorted by length within windows of `group` consecutive examples; the windows keep the
    shuffled order, so batches still mix the data.
    """
    lengths = np.array([len(ex.tokens) for ex in examples], dtype=np.int64)
    return [_row([examples[i] for i in g]) for g in one_per_row_indices(np.arange(len(examples)), lengths, group)]


def pack_indices(examples: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """`pack` on example numbers (`lengths[i]` the length of example i): the numbers of each row's examples."""
    groups: list[list[int]] = []
    used = seq_len + 1
    for i, n in zip(examples.tolist(), lengths[examples].tolist()):
        if used + n > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def one_per_row_indices(examples: np.ndarray, lengths: np.ndarray, group: int) -> list[list[int]]:
    """`one_per_row` on example numbers."""
    ordered = []
    for s in range(0, len(examples), group):
        ordered += sorted(examples[s : s + group].tolist(), key=lambda i: lengths[i])
    return [[i] for i in ordered]


def _row(examples: list[Example]) -> Row:
    return Row([t for ex in examples for t in ex.tokens], [t for ex in examples for t in ex.targets],
               [len(ex.tokens) for ex in examples])


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T], IGNORE at padding and unsupervised positions
    positions: torch.Tensor  # [B, T], restarting at 0 for every packed example
    mask: torch.Tensor | None  # [B, T, T] True = may attend; None when plain causal attention is exact

    def to(self, device) -> "Batch":
        mask = None if self.mask is None else self.mask.to(device)
        return Batch(self.tokens.to(device), self.targets.to(device), self.positions.to(device), mask)

    @property
    def supervised(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate(rows: list[Row], pad_id: int = 0) -> Batch:
    """Rows right-padded to the longest; a block-diagonal causal mask when any row holds several examples."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which example each position belongs to
    for b, row in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n] = torch.tensor(row.tokens)
        targets[b, :n] = torch.tensor(row.targets)
        start = 0
        for i, length in enumerate(row.lengths):
            positions[b, start : start + length] = torch.arange(length)
            segment[b, start : start + length] = i
            start += length
        positions[b, n:] = torch.arange(T - n)  # padding: harmless positions, never trained on
        segment[b, n:] = len(row.lengths)
    mask = None
    if any(len(r.lengths) > 1 for r in rows):
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (segment[:, :, None] == segment[:, None, :]) & causal  # [B, T, T]
    return Batch(tokens, targets, positions, mask)
