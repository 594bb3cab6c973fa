"""Ratings from battles (arena votes, pairwise judgements): Bradley-Terry or online Elo, with bootstrap intervals.

A battle is one comparison of two models: `model_a`, `model_b` and the `winner`, one of FastChat's Chatbot Arena
values "model_a", "model_b", "tie", "tie (bothbad)". Both kinds of tie count alike: half a win each way.

Ratings are on the Elo scale: a gap of `scale` points (400) means the stronger model wins `base` (10) times as
often as it loses, that is P(i beats j) = 1 / (1 + base ** ((R_j - R_i) / scale)). Two ways to get them:

- Bradley-Terry (the default, as the Chatbot Arena leaderboard since late 2023): the ratings that make the
  battles most likely, all at once, so the order of the battles does not matter.
- Online Elo (the early Arena): every model starts at `center` and moves by `k` times the surprise after each
  battle, in the order given. The result depends on that order; with K=4 it moves slowly.

Intervals come from the bootstrap: the battles are resampled with replacement `rounds` times and refitted, and
the interval is the middle `level` of the refitted ratings. For Elo each resample comes in a random order (as
in the Arena's notebook), so its interval spans both sampling and order, and need not surround the in-order value.

Only differences between ratings are identified by battles; the level is a convention. Without an `anchor` the
mean rating is `center`; with one, the anchor model is put at `center` and every interval is that of the
model's difference to the anchor (the anchor's own is then zero wide).
"""

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from camelid.data.formats import BadRecord, Skipped, iter_records  # the same JSONL / JSON-array reading
from camelid.errors import CamelidError
from camelid.plots import save_png

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCORE_A = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}  # model_a's share of the win
METHODS = ("bradley-terry", "elo")


class Battle(NamedTuple):
    model_a: str
    model_b: str
    winner: str  # one of WINNERS


@dataclass(frozen=True)
class ModelRating:
    model: str
    rating: float
    lower: float | None  # the interval's ends; None without bootstrap rounds
    upper: float | None
    battles: int
    wins: int
    losses: int
    ties: int  # both kinds of tie

    @property
    def win_rate(self) -> float:
        """The share of its battles the model won, a tie counting half."""
        return (self.wins + 0.5 * self.ties) / self.battles


@dataclass(frozen=True)
class Ratings:
    method: str  # one of METHODS
    rows: list[ModelRating]  # the best first
    rounds: int  # bootstrap rounds behind lower and upper (0: none)
    level: float  # the intervals' coverage, e.g. 0.95
    anchor: str | None  # the model put at `center`, or None when the mean is
    center: float
    scale: float
    base: float
    # The bootstrap ratings, one row per round, columns in the order of `rows`; None without rounds.
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, model: str) -> ModelRating:
        for row in self.rows:
            if row.model == model:
                return row
        raise KeyError(model)

    def to_dict(self) -> dict:
        """Everything but the samples, as JSON-ready values."""
        return {
            "method": self.method, "rounds": self.rounds, "level": self.level, "anchor": self.anchor,
            "center": self.center, "scale": self.scale, "base": self.base,
            "models": [{**vars(row), "win_rate": row.win_rate} for row in self.rows],
        }


# --- reading ---------------------------------------------------------------------------------------------------

def read_battles(paths: str | Path | Iterable[str | Path], *, skip_bad: bool = False
                 ) -> tuple[list[Battle], list[Skipped]]:
    """The battles in JSONL files (or JSON arrays of battles, as FastChat publishes), in file order.

    Each record needs `model_a`, `model_b` (two different names) and a `winner` from WINNERS; other fields are
    ignored. A bad record raises a one-line error naming its `path:line`; with `skip_bad` it is left out and
    listed in the second value instead.
    """
    battles, skipped = [], []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        for item in iter_records(path, _battle, skip_bad=skip_bad):
            (skipped if isinstance(item, Skipped) else battles).append(item)
    return battles, skipped


def _battle(record, where: str) -> Battle:
    if not isinstance(record, Mapping):
        raise BadRecord(where, "not a JSON object")
    for key in ("model_a", "model_b", "winner"):
        if key not in record:
            raise BadRecord(where, f"missing '{key}'")
    for key in ("model_a", "model_b"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise BadRecord(where, f"'{key}' is not a model name", f"got {json.dumps(record[key])}")
    winner = record["winner"]
    if not isinstance(winner, str) or winner not in SCORE_A:
        expected = ", ".join(json.dumps(w) for w in WINNERS)
        raise BadRecord(where, "unknown winner", f"got {json.dumps(winner)}, expected one of {expected}")
    if record["model_a"] == record["model_b"]:
        raise BadRecord(where, "a model against itself", record["model_a"])
    return Battle(record["model_a"], record["model_b"], winner)


class _Encoded(NamedTuple):
    models: list[str]  # in order of first appearance
    a: np.ndarray  # (battles,) index of model_a
    b: np.ndarray  # (battles,) index of model_b
    score: np.ndarray  # (battles,) model_a's share of the win: 1, 0 or 0.5


def _encode(battles: Iterable[Battle | Mapping]) -> _Encoded:
    """Battles as index arrays, each checked (they may come from Python rather than from read_battles)."""
    index: dict[str, int] = {}
    a, b, score = [], [], []
    for i, battle in enumerate(battles):
        if isinstance(battle, Battle):
            battle = battle._asdict()
        try:
            battle = _battle(battle, f"battle {i}")
        except BadRecord as bad:  # not from a file, so without the file's --skip-bad hint
            raise CamelidError(f"{bad.where}: {bad.reason}" + (f" ({bad.detail})" if bad.detail else "")) from None
        a.append(index.setdefault(battle.model_a, len(index)))
        b.append(index.setdefault(battle.model_b, len(index)))
        score.append(SCORE_A[battle.winner])
    if not a:
        raise CamelidError("no battles to rate; give a votes file with at least one valid battle")
    return _Encoded(list(index), np.array(a), np.array(b), np.array(score))


# --- online Elo ------------------------------------------------------------------------------------------------

def elo_ratings(battles: Iterable[Battle | Mapping], *, k: float = 4.0, scale: float = 400.0, base: float = 10.0,
                initial: float = 1000.0) -> dict[str, float]:
    """Online Elo over the battles in the order given: each model starts at `initial`; after each battle

        E_a = 1 / (1 + base ** ((R_b - R_a) / scale)),  R_a += k * (S_a - E_a),  R_b -= k * (S_a - E_a)

    with S_a = 1 if model_a won, 0 if model_b won, 1/2 for a tie. The defaults are the Chatbot Arena notebook's.
    Returns {model: rating} in order of first appearance.
    """
    _check_scale(k=k, scale=scale, base=base)
    enc = _encode(battles)
    ratings = _elo(enc, [np.arange(len(enc.a))[:, None]], 1, k=k, scale=scale, base=base, initial=initial)[0]
    return dict(zip(enc.models, ratings.tolist()))


def _elo(enc: _Encoded, orders: Iterable[np.ndarray], rounds: int, *, k, scale, base, initial) -> np.ndarray:
    """Online Elo in many orders at once: `orders` are consecutive blocks (steps, rounds) of battle indices,
    column r of them being round r's sequence of battles.

    Returns (rounds, models). Rounds run side by side, so the Python loop is over steps only.
    """
    n = len(enc.models)
    ratings = np.full(rounds * n, float(initial))  # flat: round r's model i is at r * n + i
    offset = np.arange(rounds) * n
    for battle in (row for block in orders for row in block):
        ia, ib = offset + enc.a[battle], offset + enc.b[battle]
        expected_a = 1.0 / (1.0 + base ** ((ratings[ib] - ratings[ia]) / scale))
        change = k * (enc.score[battle] - expected_a)
        ratings[ia] += change  # ia (and ib) are distinct across rounds, so plain fancy-index updates are exact
        ratings[ib] -= change
    return ratings.reshape(rounds, n)


# --- Bradley-Terry ---------------------------------------------------------------------------------------------

def bradley_terry(battles: Iterable[Battle | Mapping], *, scale: float = 400.0, base: float = 10.0,
                  center: float = 1000.0, anchor: str | None = None, l2: float = 0.01) -> dict[str, float]:
    """Bradley-Terry ratings by maximum likelihood: the ratings under which the battles are most likely.

    The model is P(i beats j) = 1 / (1 + base ** ((R_j - R_i) / scale)); a tie counts as half a win for each
    side. (FastChat's fit doubles every battle and makes a tie one win each way: the same counts times two, so
    the same maximum.) A weak Gaussian prior, `l2` / 2 * sum(theta ** 2) on the natural-log strengths theta,
    keeps a model that never won (or never lost) finite instead of running off to minus (plus) infinity; with
    0.01 (a prior spread of 10 logits, about 1,700 points) it moves ordinary ratings by a small fraction of a
    point. The mean rating is `center`, or the `anchor` model's is. Returns {model: rating}, first-seen order.
    """
    _check_scale(scale=scale, base=base, l2=l2)
    enc = _encode(battles)
    anchor_index = _anchor_index(enc.models, anchor)
    pairs = _Pairs(enc)
    _check_connected(enc.models, pairs)
    theta = _fit_bt(pairs, pairs.counts[None], len(enc.models), l2)
    ratings = _bt_points(theta, anchor_index, scale=scale, base=base, center=center)[0]
    return dict(zip(enc.models, ratings.tolist()))


class _Pairs:
    """The battles counted by pair of models and outcome: all Bradley-Terry needs, and a fast bootstrap."""

    def __init__(self, enc: _Encoded):
        lo, hi = np.minimum(enc.a, enc.b), np.maximum(enc.a, enc.b)
        score_lo = np.where(enc.a == lo, enc.score, 1.0 - enc.score)  # the lower index's share of the win
        outcome = np.where(score_lo == 1.0, 0, np.where(score_lo == 0.0, 1, 2))  # lo won, hi won, tie
        keys, pair = np.unique(lo * len(enc.models) + hi, return_inverse=True)
        self.i, self.j = keys // len(enc.models), keys % len(enc.models)  # (pairs,) with i < j
        self.battles = len(enc.a)
        # counts[3 * p + o]: how many battles of pair p ended in outcome o
        self.counts = np.bincount(3 * pair.ravel() + outcome, minlength=3 * len(keys))

    def wins(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(wins of i over j, wins of j over i) per pair, a tie half each, from counts of shape (rounds, 3P)."""
        c = counts.reshape(len(counts), -1, 3)
        return c[..., 0] + 0.5 * c[..., 2], c[..., 1] + 0.5 * c[..., 2]


def _fit_bt(pairs: _Pairs, counts: np.ndarray, n: int, l2: float, max_iter: int = 100) -> np.ndarray:
    """Natural-log strengths (rounds, n) that minimise, for each round of `counts` (rounds, 3P) at once,

        loss(theta) = -sum_pairs [w_ij log sigmoid(theta_i - theta_j) + w_ji log sigmoid(theta_j - theta_i)]
                      + l2 / 2 * sum(theta ** 2)

    by Newton's method with a backtracking line search. The loss is strictly convex (l2 > 0), so this converges
    to the one minimum, quadratically near it; the prior also centres it (at the minimum, sum(theta) = 0).
    """
    wins_ij, wins_ji = pairs.wins(counts)
    total = wins_ij + wins_ji
    rounds = len(counts)
    i, j, diag = pairs.i, pairs.j, np.arange(n)

    def loss(theta):
        d = theta[:, i] - theta[:, j]
        return (wins_ij * np.logaddexp(0, -d) + wins_ji * np.logaddexp(0, d)).sum(1) + 0.5 * l2 * (theta**2).sum(1)

    theta = np.zeros((rounds, n))
    current = loss(theta)
    square = np.zeros((rounds, n, n))
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (theta[:, i] - theta[:, j])))  # sigmoid, without overflow
        # gradient: sum over j of (total_ij * p_ij - wins_ij), antisymmetric in i and j; built in an n x n square
        # rather than with an incidence matrix, so a round costs n^2, not pairs * n
        square.fill(0.0)
        square[:, i, j] = total * p - wins_ij
        grad = square.sum(2) - square.sum(1) + l2 * theta
        # Hessian: the weighted graph Laplacian of the pairs, weights total * p * (1 - p), plus l2 on the diagonal
        square.fill(0.0)
        square[:, i, j] = square[:, j, i] = -total * p * (1.0 - p)
        square[:, diag, diag] = -square.sum(2) + l2
        step = np.linalg.solve(square, grad[..., None])[..., 0]
        decrease = (grad * step).sum(1)  # the Newton decrement squared: >= 0 as the Hessian is positive definite
        t = np.ones(rounds)
        for _ in range(60):  # halve the step, per round, until the loss falls enough (Armijo)
            trial = theta - t[:, None] * step
            new = loss(trial)
            enough = new <= current - 0.25 * t * decrease + 1e-12 * np.abs(current)  # slack: rounding in the sum
            if enough.all():
                break
            t = np.where(enough, t, 0.5 * t)
        theta, current = trial, new
        if np.abs(step).max() < 1e-9:  # logits; 2e-7 rating points
            return theta
    raise RuntimeError(f"Bradley-Terry fit did not converge in {max_iter} Newton steps")


def _bt_points(theta, anchor_index, *, scale, base, center) -> np.ndarray:
    """Natural-log strengths as rating points: scale / ln(base) points per logit, the mean or anchor at center."""
    ref = theta.mean(1, keepdims=True) if anchor_index is None else theta[:, [anchor_index]]
    return center + scale / math.log(base) * (theta - ref)


def _check_connected(models: list[str], pairs: _Pairs) -> None:
    """Models in groups that never met have no common scale: refuse rather than print numbers that mean nothing."""
    parent = list(range(len(models)))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in zip(pairs.i.tolist(), pairs.j.tolist()):
        parent[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for x, model in enumerate(models):
        groups.setdefault(root(x), []).append(model)
    if len(groups) > 1:
        shown = "; ".join(", ".join(g[:3]) + (", ..." if len(g) > 3 else "") for g in groups.values())
        raise CamelidError(f"the battles split the models into {len(groups)} groups that never met ({shown}); "
                           "ratings across groups cannot be compared: add battles between the groups")


# --- both, with intervals --------------------------------------------------------------------------------------

def compute_ratings(battles: Iterable[Battle | Mapping], *, method: str = "bradley-terry", rounds: int = 1000,
                    level: float = 0.95, seed: int = 0, anchor: str | None = None, center: float = 1000.0,
                    k: float = 4.0, scale: float = 400.0, base: float = 10.0, l2: float = 0.01) -> Ratings:
    """Ratings of every model in the battles, with `level` bootstrap intervals from `rounds` resamples.

    `method` is "bradley-terry" (see `bradley_terry`, which `l2` is for) or "elo" (see `elo_ratings`, which `k`
    is for; its rating is the in-order one, its interval from shuffled resamples). `seed` makes the resamples
    repeatable. `rounds=0` gives ratings without intervals.
    """
    if method not in METHODS:
        raise CamelidError(f"unknown rating method {method!r}; choose one of: {', '.join(METHODS)}")
    if not isinstance(rounds, int) or rounds < 0:
        raise CamelidError(f"bootstrap rounds must be a whole number >= 0 (0 for no intervals), not {rounds}")
    if not 0 < level < 1:
        raise CamelidError(f"interval level must be between 0 and 1 (0.95 for 95%), not {level}")
    _check_scale(k=k, scale=scale, base=base, l2=l2)
    enc = _encode(battles)
    n = len(enc.models)
    anchor_index = _anchor_index(enc.models, anchor)
    rng = np.random.default_rng(seed)

    if method == "elo":
        def shift(r):  # Elo is zero-sum, so the mean is `center` already; an anchor moves everyone
            return r if anchor_index is None else r - r[:, [anchor_index]] + center

        elo = {"k": k, "scale": scale, "base": base, "initial": center}
        point = shift(_elo(enc, [np.arange(len(enc.a))[:, None]], 1, **elo))[0]
        samples = None
        if rounds:
            # Each round is len(battles) draws with replacement, taken in the order drawn: so a random order too.
            # They are drawn a block of steps at a time, so memory does not grow with battles times rounds.
            steps = len(enc.a)
            block = max(1, 1_000_000 // rounds)
            orders = (rng.integers(0, steps, size=(min(block, steps - start), rounds))
                      for start in range(0, steps, block))
            samples = shift(_elo(enc, orders, rounds, **elo))
    else:
        pairs = _Pairs(enc)
        _check_connected(enc.models, pairs)
        points = {"scale": scale, "base": base, "center": center}
        point = _bt_points(_fit_bt(pairs, pairs.counts[None], n, l2), anchor_index, **points)[0]
        samples = None
        if rounds:
            # Resampling battles with replacement only changes how many of each (pair, outcome) there are, and
            # those counts are multinomial: draw them directly, then fit all rounds at once. Memory per chunk
            # of rounds is chunk * n^2 floats.
            chunk = max(1, 2_000_000 // (n * n))
            share = pairs.counts / pairs.battles
            parts = []
            for start in range(0, rounds, chunk):
                counts = rng.multinomial(pairs.battles, share, size=min(chunk, rounds - start))
                parts.append(_bt_points(_fit_bt(pairs, counts, n, l2), anchor_index, **points))
            samples = np.concatenate(parts)

    lower = upper = [None] * n
    if samples is not None:
        lower, upper = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0).tolist()
    wins, losses, ties, played = _records(enc)
    ranked = sorted(range(n), key=lambda x: (-point[x], enc.models[x]))
    rows = [ModelRating(model=enc.models[x], rating=float(point[x]), lower=lower[x], upper=upper[x],
                        battles=int(played[x]), wins=int(wins[x]), losses=int(losses[x]), ties=int(ties[x]))
            for x in ranked]
    return Ratings(method=method, rows=rows, rounds=rounds, level=level, anchor=anchor, center=center,
                   scale=scale, base=base, samples=None if samples is None else samples[:, ranked])


def _records(enc: _Encoded):
    """Per model: (wins, losses, ties, battles)."""
    n = len(enc.models)
    a_won, b_won, tie = enc.score == 1.0, enc.score == 0.0, enc.score == 0.5
    wins = np.bincount(enc.a[a_won], minlength=n) + np.bincount(enc.b[b_won], minlength=n)
    losses = np.bincount(enc.a[b_won], minlength=n) + np.bincount(enc.b[a_won], minlength=n)
    ties = np.bincount(enc.a[tie], minlength=n) + np.bincount(enc.b[tie], minlength=n)
    return wins, losses, ties, wins + losses + ties


def _anchor_index(models: list[str], anchor: str | None) -> int | None:
    if anchor is None:
        return None
    if anchor not in models:
        raise CamelidError(f"anchor model {anchor!r} is in no battle; choose one of: {', '.join(sorted(models))}")
    return models.index(anchor)


def _check_scale(*, scale: float, base: float, k: float = 1.0, l2: float = 1.0) -> None:
    if not scale > 0:
        raise CamelidError(f"the rating scale must be > 0 points (400 is Elo's), not {scale}")
    if not base > 1:
        raise CamelidError(f"the rating base must be > 1 (10 is Elo's), not {base}")
    if not k > 0:
        raise CamelidError(f"the Elo K-factor must be > 0 (4 is the Chatbot Arena's), not {k}")
    if not l2 > 0:
        raise CamelidError(f"the Bradley-Terry prior strength l2 must be > 0 (it keeps unbeaten models finite), "
                           f"not {l2}")


# --- win rates -------------------------------------------------------------------------------------------------

def predicted_win_rates(ratings: Ratings) -> np.ndarray:
    """P(row model beats column model) from the ratings, rows and columns in the order of `ratings.rows`."""
    r = np.array([row.rating for row in ratings.rows])
    rates = 1.0 / (1.0 + ratings.base ** ((r[None, :] - r[:, None]) / ratings.scale))
    np.fill_diagonal(rates, np.nan)
    return rates


def observed_win_rates(battles: Iterable[Battle | Mapping], models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(share of its battles against the column model that the row model won, a tie half; number of battles).

    Rows and columns follow `models`; a pair that never met has rate NaN. Battles of other models are ignored.
    """
    enc = _encode(battles)
    where = {m: i for i, m in enumerate(models)}
    to_given = np.array([where.get(m, -1) for m in enc.models])
    a, b = to_given[enc.a], to_given[enc.b]
    keep = (a >= 0) & (b >= 0)
    a, b, score = a[keep], b[keep], enc.score[keep]
    n = len(models)
    won, count = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(won, (a, b), score)
    np.add.at(won, (b, a), 1.0 - score)
    np.add.at(count, (a, b), 1)
    np.add.at(count, (b, a), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, won / count, np.nan), count.astype(int)


# --- output ----------------------------------------------------------------------------------------------------

def ratings_table(ratings: Ratings) -> str:
    """A Markdown table, best first: rank, model, rating, the interval as +up/-down, battles, win rate.

    Without bootstrap rounds the interval column is left out. Win rate counts a tie as half a win.
    """
    with_ci = ratings.rounds > 0
    head = ["rank", "model", "rating"] + [f"{ratings.level * 100:g}% CI"] * with_ci + ["battles", "win rate"]
    align = ["---:", ":---", "---:"] + ["---:"] * with_ci + ["---:", "---:"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for rank, row in enumerate(ratings.rows, 1):
        cells = [str(rank), row.model.replace("|", "\\|"), f"{row.rating:.0f}"]
        if with_ci:
            up, down = round(row.upper - row.rating), round(row.rating - row.lower)
            # An Elo interval can lie to one side of the in-order rating: then both ends show their true sign.
            cells.append(f"{up:+d}/" + (f"-{down}" if down >= 0 else f"+{-down}"))
        cells += [str(row.battles), f"{100 * row.win_rate:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _method_name(ratings: Ratings) -> str:
    return {"bradley-terry": "Bradley-Terry", "elo": "online Elo"}[ratings.method]


def ratings_plot(ratings: Ratings, path: str | Path, title: str | None = None) -> Path:
    """A PNG of each model's rating (a point) and interval (a bar), the best at the top; written atomically."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and changes no pyplot state

    rows = ratings.rows
    y = np.arange(len(rows))[::-1]
    fig = Figure(figsize=(7, 1.4 + 0.32 * len(rows)), dpi=110, layout="constrained")
    ax = fig.subplots()
    if ratings.rounds:
        ax.hlines(y, [r.lower for r in rows], [r.upper for r in rows], color="tab:blue", linewidth=2.5, alpha=0.6,
                  label=f"{ratings.level * 100:g}% interval ({ratings.rounds} bootstrap rounds)")
    ax.plot([r.rating for r in rows], y, "o", color="tab:blue", label="rating")
    ax.set_yticks(y, [r.model for r in rows])
    ax.axvline(ratings.center, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"rating ({ratings.scale:g} points = {ratings.base:g}x the odds of winning)")
    anchor = f", {ratings.anchor} at {ratings.center:g}" if ratings.anchor else f", mean {ratings.center:g}"
    ax.set_title(title or f"{_method_name(ratings)} ratings{anchor}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_png(fig, path)


def win_rate_plot(ratings: Ratings, path: str | Path, *, battles: Iterable[Battle | Mapping] | None = None,
                  title: str | None = None) -> Path:
    """A heatmap PNG of P(row beats column) predicted by the ratings and, given the battles, the observed rates.

    Models are in rating order; cells carry percentages while there are at most 15 models.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    models = [row.model for row in ratings.rows]
    panels = [("predicted by the ratings", predicted_win_rates(ratings))]
    if battles is not None:
        panels.append(("observed (grey: never met)", observed_win_rates(battles, models)[0]))
    n = len(models)
    side = 1.6 + 0.45 * n
    fig = Figure(figsize=(side * len(panels) + 1.2, side), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, rates) in zip(axes, panels):
        image = ax.imshow(rates, cmap=colormaps["RdBu"].with_extremes(bad="0.85"), vmin=0, vmax=1)
        ax.set_xticks(range(n), models, rotation=45, ha="right")
        ax.set_yticks(range(n), models)
        ax.set_xlabel("opponent")
        ax.set_title(name, fontsize="medium")
        if n <= 15:
            for r in range(n):
                for c in range(n):
                    if not np.isnan(rates[r, c]):
                        ax.text(c, r, f"{100 * rates[r, c]:.0f}", ha="center", va="center", fontsize="small",
                                color="white" if abs(rates[r, c] - 0.5) > 0.3 else "black")
    axes[0].set_ylabel("model")
    fig.colorbar(image, ax=list(axes), label="P(model beats opponent)", shrink=0.8)
    fig.suptitle(title or f"win rates, {_method_name(ratings)}")
    return save_png(fig, path)
