"""How `camelid train` turns rows into optimizer steps and micro-batches, written once for training and the cost.

Every step's data is a function of (seed, step) alone: each epoch shuffles the rows with seed + 1 + epoch and
step s takes the next `batch_size` of them, wrapping around at the epoch's end. Process r of `world` takes every
world-th row of a step, in micro-batches of `micro_batch_size`; gradient accumulation makes up the rest. The
held-out rows are evaluated every `eval_every` steps and at the end, `micro_batch_size` rows at a time.
`camelid.cost` counts a run's tokens by walking this same schedule.
"""

import functools
import math
import random
from dataclasses import dataclass

from camelid.errors import CamelidError


def shuffled(items, seed: int) -> list:
    """`items` in a random order fixed by `seed` (the same on every process and every run)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def held_out_size(conversations: int, eval_fraction: float) -> int:
    """How many of the conversations are held out: a share of them, at least one when any share is asked for."""
    return round(conversations * eval_fraction) or (1 if eval_fraction else 0)


def check_batch_size(cfg, world: int, processes: str = "process(es)", fix: str | None = None) -> None:
    """Refuse a batch that `world` processes cannot split into whole micro-batches (`processes` names them, `fix`
    says what the caller's user can change)."""
    if cfg.batch_size % (world * cfg.micro_batch_size):
        fix = fix or f"make batch_size a multiple of {world * cfg.micro_batch_size} or change micro_batch_size"
        raise CamelidError(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size} x {world} "
            f"{processes}; {fix}"
        )


def eval_batches(rows: int, micro_batch_size: int) -> list[slice]:
    """The held-out rows' micro-batches, in order (every process evaluates all of them)."""
    return [slice(s, min(s + micro_batch_size, rows)) for s in range(0, rows, micro_batch_size)]


@functools.lru_cache(maxsize=2)
def _order(rows: int, seed: int) -> tuple[int, ...]:
    # One shuffle per epoch, however many steps of it are asked for (counting a large data set's cost walks them all).
    return tuple(shuffled(range(rows), seed))


@dataclass(frozen=True)
class Schedule:
    """The steps of a run over `rows` training rows by `world` processes, with a TrainConfig's batching."""

    rows: int
    batch_size: int  # rows a step, all processes together
    micro_batch_size: int  # rows a forward pass in each process
    world: int
    seed: int
    steps: int  # optimizer steps of the whole run
    eval_every: int = 0  # steps between evaluations; 0 = only at the end

    @classmethod
    def plan(cls, cfg, rows: int, world: int = 1, processes: str = "process(es)", fix: str | None = None
             ) -> "Schedule":
        """The schedule `cfg` gives `rows` rows on `world` processes, or the refusal training gives before step 1
        (`processes` and `fix` as check_batch_size's)."""
        check_batch_size(cfg, world, processes, fix)
        if rows < cfg.batch_size:
            raise CamelidError(
                f"the data makes {rows} training sequences, fewer than one batch ({cfg.batch_size}); "
                "lower batch_size or add data"
            )
        steps = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(rows / cfg.batch_size))
        return cls(rows=rows, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, world=world,
                   seed=cfg.seed, steps=steps, eval_every=cfg.eval_every)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def accumulate(self) -> int:
        """Micro-batches a process runs each step."""
        return self.batch_size // (self.world * self.micro_batch_size)

    def rows_for_step(self, step: int) -> list[int]:
        """The row indices of optimizer step `step`, all processes together; wraps around at an epoch's end."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = _order(self.rows, self.seed + 1 + epoch)
        return [order[(i * self.batch_size + j) % self.rows] for j in range(self.batch_size)]

    def micro_batches(self, ids: list[int], rank: int) -> list[list[int]]:
        """Process `rank`'s micro-batches of a step's row indices `ids`: every world-th row, in order."""
        mine = ids[rank :: self.world]
        size = self.micro_batch_size
        return [mine[k * size : (k + 1) * size] for k in range(self.accumulate)]

    def evaluates_after(self, step: int) -> bool:
        """Whether the held-out rows are evaluated after step `step` (counted from 0)."""
        done = step + 1
        return bool(self.eval_every and done % self.eval_every == 0) or done == self.steps

    @property
    def evaluations(self) -> int:
        """Evaluations over the whole run (when there are held-out rows)."""
        return sum(self.evaluates_after(step) for step in range(self.steps))
