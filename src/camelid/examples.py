"""Conversations to training sequences: render with a chat template, mask to the assistant turns, pack.

A training example is the conversation's tokens and, at each position, the next token to learn or IGNORE.
Only the assistant turns are learned: the content and the end-of-turn marker the template writes after it
(spans come from the template itself, see camelid.chat_template.assistant_spans).

Packing is the default: short examples are laid end to end in rows of `seq_len` tokens, each example keeping
its own positions (0, 1, ...) and attending only within itself, so a packed row computes exactly what the
examples would alone. It wastes no compute on padding, which on a CPU is all of the cost; padding one
example per row, grouped by length, is the alternative (`packing: false`).
"""

from collections import Counter
from dataclasses import dataclass, field

import torch

from camelid.chat_template import ChatTemplate, assistant_spans
from camelid.model import IGNORE

OVERFLOW_RULES = ("truncate", "drop")


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


def make_example(template: ChatTemplate, tokenizer, messages: list[dict]) -> Example:
    """Tokens of the rendered conversation with targets on exactly the assistant turns."""
    tokens = tokenizer.encode(template.render(messages), add_special=False)
    targets = [IGNORE] * len(tokens)
    for start, end in assistant_spans(template, messages, tokenizer):
        # the token at position j is predicted at position j - 1
        for j in range(max(start, 1), end):
            targets[j - 1] = tokens[j]
    return Example(tokens, targets)


def make_examples(
    template: ChatTemplate, tokenizer, conversations, seq_len: int, overflow: str = "truncate"
) -> tuple[list[Example], ExampleStats]:
    """Examples for many conversations; over-long ones are cut to `seq_len` (or dropped, `overflow="drop"`).

    An example left with nothing to learn (an empty answer, or every answer beyond the cut) is dropped.
    """
    if overflow not in OVERFLOW_RULES:
        raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, not {overflow!r}")
    stats = ExampleStats()
    examples = []
    for messages in conversations:
        example = make_example(template, tokenizer, messages)
        cut = len(example.tokens) > seq_len
        if cut:
            if overflow == "drop":
                stats.dropped["longer than the sequence length"] += 1
                continue
            example = Example(example.tokens[:seq_len], example.targets[:seq_len])
            example.targets[-1] = IGNORE  # its target lies beyond the cut
            stats.truncated += 1
        if example.supervised == 0:
            stats.dropped["no answer within the sequence length" if cut else "nothing to learn"] += 1
            continue
        examples.append(example)
        stats.kept += 1
    return examples, stats


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
    rows: list[Row] = []
    for ex in examples:
        if not rows or len(rows[-1].tokens) + len(ex.tokens) > seq_len:
            rows.append(Row([], [], []))
        row = rows[-1]
        row.tokens += ex.tokens
        row.targets += ex.targets
        row.lengths.append(len(ex.tokens))
    return rows


def one_per_row(examples: list[Example], group: int) -> list[Row]:
    """One example per row, ordered so that rows of similar length meet in a batch (less padding).

    Examples are sorted by length within windows of `group` consecutive examples; the windows keep the
    shuffled order, so batches still mix the data.
    """
    rows = [Row(ex.tokens, ex.targets, [len(ex.tokens)]) for ex in examples]
    ordered = []
    for s in range(0, len(rows), group):
        ordered += sorted(rows[s : s + group], key=lambda r: len(r.tokens))
    return ordered


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
