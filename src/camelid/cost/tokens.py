"""D and S of the FLOP formulas: the token positions a training run puts through the model (`camelid cost`).

D is every token position a run puts through the model, padding included (a padded position costs the same
matmuls), over all its optimizer steps; S is the sum over the rows run of their padded length squared. From a
recipe's data file they are counted exactly as `camelid train` batches it: the same held-out split, examples,
truncation, packing or one-example rows, and the same schedule of steps, processes and micro-batches
(camelid.train.schedule), each micro-batch padded to its longest row. Without the data, counts come from the
command line: examples x tokens per row (padding included; with `packing: false` it defaults to seq_len, every
row padded to the full length as FastChat did, an upper bound for camelid, which pads a micro-batch only to its
longest row), or the total tokens of one epoch.
"""

import math
from dataclasses import dataclass

from camelid.errors import CamelidError
from camelid.train.schedule import Schedule, eval_batches, held_out_size

# What a `camelid cost` user changes when training would refuse the batch.
BATCH_FIX = "training would refuse it: change --count, or override batch_size= or micro_batch_size="


@dataclass
class Tokens:
    """What a run puts through the model: D and S of the formulas, for training and for evaluation."""

    how: list[str]  # how the numbers were obtained, in words, one line each
    rows: int  # training sequences per epoch
    steps: int  # optimizer steps
    batch_size: int  # sequences per step
    processed: int  # D: token positions of all steps, padding included
    squares: int  # S: the sum over the rows run of their padded length squared
    real: int | None = None  # the tokens of D that are not padding (known when counted from the data)
    eval_processed: int = 0  # one pass over the held-out rows, padding included
    eval_squares: int = 0
    evaluations: int = 0  # passes over the held-out rows during the run


def padded(lengths: list[int]) -> tuple[int, int, int]:
    """(real tokens, token positions, sum of squared row lengths) of one micro-batch padded to its longest row."""
    longest = max(lengths)
    return sum(lengths), len(lengths) * longest, len(lengths) * longest * longest


def batched_lengths(lengths: list[int], schedule: Schedule) -> tuple[int, int, int]:
    """(real tokens, D, S) of a run over rows of these lengths, batched into steps and micro-batches by `schedule`."""
    real = processed = squares = 0
    for step in range(schedule.steps):
        ids = schedule.rows_for_step(step)
        for rank in range(schedule.world):
            for part in schedule.micro_batches(ids, rank):
                r, p, s = padded([lengths[i] for i in part])
                real, processed, squares = real + r, processed + p, squares + s
    return real, processed, squares


def tokens_from_data(cfg, world: int, tokenizer: str | None = None) -> Tokens:
    """D and S counted from the recipe's data files, tokenized with the model's (or `tokenizer`'s) tokenizer."""
    from camelid.checkpoint import load_tokenizer_and_template
    from camelid.train.data import training_rows

    spec = tokenizer or cfg.model
    try:
        tok, template = load_tokenizer_and_template(spec, cfg.template)
    except CamelidError as exc:
        if tokenizer:
            raise
        raise CamelidError(
            f"cannot count the tokens of {', '.join(cfg.data)}: the recipe's model is not readable here ({exc}); "
            "give --tokenizer MODEL (one with the same tokenizer), or counts with --examples N"
        ) from None
    said: list[str] = []
    rows, eval_rows = training_rows(cfg, template, tok, said.append)
    schedule = Schedule.plan(cfg, len(rows), world, processes="GPU(s)", fix=BATCH_FIX)
    real, processed, squares = batched_lengths(rows.lengths, schedule)
    eval_processed = eval_squares = 0
    for part in eval_batches(len(eval_rows), cfg.micro_batch_size):
        _, p, s = padded(eval_rows.lengths[part])
        eval_processed, eval_squares = eval_processed + p, eval_squares + s
    template_name = f"the {cfg.template} template" if cfg.template else "its own chat template"
    how = [f"counted from the data as training builds its rows: {spec}'s tokenizer, {template_name}", *said]
    return Tokens(how=how, rows=len(rows), steps=schedule.steps, batch_size=cfg.batch_size, processed=processed,
                  squares=squares, real=real, eval_processed=eval_processed, eval_squares=eval_squares,
                  evaluations=schedule.evaluations if eval_rows else 0)


def tokens_from_counts(cfg, world: int, *, examples=None, tokens_per_example=None, tokens=None) -> Tokens:
    """D and S from counts given on the command line (see the module docstring for the defaults)."""
    if tokens is not None and tokens_per_example is not None:
        raise CamelidError("give --tokens or --tokens-per-example, not both (tokens = examples x tokens per example)")
    for value, flag in ((examples, "--examples"), (tokens_per_example, "--tokens-per-example"), (tokens, "--tokens")):
        if value is not None and not value > 0:
            raise CamelidError(f"{flag} must be above 0, not {value:g}")
    if examples is not None and examples != int(examples):
        raise CamelidError(f"--examples must be a whole number, not {examples:g}")
    how = []
    if examples is not None:
        n = int(examples)
        held_out = held_out_size(n, cfg.eval_fraction)
        train_n = n - held_out
        how.append(f"{n:,} examples (--examples)" + (f", {held_out:,} held out (eval_fraction {cfg.eval_fraction:g})"
                                                      if held_out else ""))
        if tokens is not None:
            tokens_per_example = tokens / n
            how.append(f"{tokens / n:,.1f} tokens per example: --tokens {tokens:,.0f} / --examples")
        elif tokens_per_example is not None:
            how.append(f"{tokens_per_example:,.1f} tokens per example, padding included (--tokens-per-example)")
        elif not cfg.packing:
            tokens_per_example = cfg.seq_len
            how.append(f"every row counted as padded to seq_len {cfg.seq_len}, as FastChat padded (packing is off and "
                       "no --tokens-per-example was given); camelid pads a micro-batch only to its longest row, so "
                       "for camelid this is an upper bound")
        else:
            raise CamelidError(
                "packing is on, so the tokens are the data's own: give --tokens-per-example T (the mean example "
                "length) or --tokens N (the whole data set)"
            )
    elif tokens is not None:
        held_out = 0
        train_n = 0
        how.append(f"{tokens:,.0f} tokens in one pass over the data, padding included (--tokens), as rows of "
                   f"seq_len {cfg.seq_len}")
    else:
        raise CamelidError("no counts given: pass --examples N (and --tokens-per-example T) or --tokens N")
    if tokens_per_example is not None and tokens_per_example > cfg.seq_len:
        raise CamelidError(
            f"{tokens_per_example:,g} tokens per example is more than seq_len {cfg.seq_len}, which training cuts "
            f"rows to; give at most {cfg.seq_len}"
        )
    if examples is not None and not cfg.packing:
        rows, row_len = train_n, tokens_per_example
        eval_rows, eval_len = held_out, tokens_per_example
    else:  # packed, or only a total: rows of (nearly) seq_len tokens
        epoch_tokens = train_n * tokens_per_example if examples is not None else tokens * (1 - cfg.eval_fraction)
        eval_tokens = held_out * tokens_per_example if examples is not None else tokens * cfg.eval_fraction
        rows = math.ceil(epoch_tokens / cfg.seq_len)
        row_len = epoch_tokens / rows if rows else 0
        eval_rows = math.ceil(eval_tokens / cfg.seq_len)
        eval_len = eval_tokens / eval_rows if eval_rows else 0
    schedule = Schedule.plan(cfg, rows, world, processes="GPU(s)", fix=BATCH_FIX)
    processed = schedule.steps * cfg.batch_size * row_len
    return Tokens(how=how, rows=rows, steps=schedule.steps, batch_size=cfg.batch_size, processed=round(processed),
                  squares=round(processed * row_len), eval_processed=round(eval_rows * eval_len),
                  eval_squares=round(eval_rows * eval_len * eval_len),
                  evaluations=schedule.evaluations if eval_rows else 0)
