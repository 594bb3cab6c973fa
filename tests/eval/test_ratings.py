"""Arena ratings: Elo against the formula by hand, Bradley-Terry against known strengths and against scipy's
optimiser, bootstrap intervals against their stated coverage, and the votes reader, table and pictures."""

import json
import math

import numpy as np
import pytest

from camelid.errors import CamelidError
from camelid.eval.ratings import (
    Battle, ModelRating, Ratings, bradley_terry, compute_ratings, elo_ratings, observed_win_rates,
    predicted_win_rates, ratings_plot, ratings_table, read_battles, win_rate_plot,
)

POINTS_PER_LOGIT = 400 / math.log(10)  # Elo's scale: 400 points for 10x the odds


def simulate(logits, battles: int, rng) -> list[Battle]:
    """Battles between models m0, m1, ... of known Bradley-Terry strengths (natural-log units), pairs uniform.

    Ties come with probability p(1 - p) (p = P(a beats b)), taken half from each side's wins, so a's expected
    share of the win (a tie half) stays exactly p: the half-a-win convention then estimates the true strengths.
    """
    logits = np.asarray(logits)
    n = len(logits)
    a = rng.integers(0, n, battles)
    b = (a + rng.integers(1, n, battles)) % n  # never a itself
    p = 1 / (1 + np.exp(logits[b] - logits[a]))
    tie = p * (1 - p)
    u = rng.random(battles)
    winner = np.where(u < p - tie / 2, "model_a", np.where(u < p + tie / 2, "tie", "model_b"))
    return [Battle(f"m{x}", f"m{y}", w) for x, y, w in zip(a.tolist(), b.tolist(), winner.tolist())]


def fisher_sd(logits, battles: int) -> np.ndarray:
    """Standard deviations (natural-log units) of each strength minus m0's, from the expected Fisher information.

    The half-a-win estimate's true variance is H^-1 J H^-1 with J built from Var(score) = p(1-p) - tie/4,
    at most H's p(1-p): so this H^-1 is, if anything, a little too wide.
    """
    logits = np.asarray(logits)
    n = len(logits)
    per_pair = battles / (n * (n - 1) / 2)
    info = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            p = 1 / (1 + np.exp(logits[j] - logits[i]))
            w = per_pair * p * (1 - p)
            info[i, i] += w
            info[j, j] += w
            info[i, j] -= w
            info[j, i] -= w
    return np.sqrt(np.diag(np.linalg.inv(info[1:, 1:])))  # m0 fixed at 0


TRUE = [0.0, 0.35, 0.7, -0.4, 1.1, -0.9]  # six models, natural-log strengths; m0 is the anchor below


# --- Elo -------------------------------------------------------------------------------------------------------

def test_elo_matches_the_formula_by_hand():
    battles = [Battle("A", "B", "model_a"), Battle("B", "C", "tie"), Battle("A", "C", "model_b")]
    # 1. A beats B at 1000-1000: E_A = 1/2, A += 4 * (1 - 1/2) = 1002, B = 998.
    # 2. B (998) ties C (1000): E_B = 1 / (1 + 10 ** (2 / 400)) = 0.4971218004, B += 4 * (0.5 - E_B).
    # 3. C beats A: E_A = 1 / (1 + 10 ** ((999.9884872017 - 1002) / 400)) = 0.5028947673, A -= 4 * E_A.
    got = elo_ratings(battles)
    assert list(got) == ["A", "B", "C"]
    assert got["A"] == pytest.approx(999.9884209309, abs=1e-9)
    assert got["B"] == pytest.approx(998.0115127983, abs=1e-9)
    assert got["C"] == pytest.approx(1002.0000662708, abs=1e-9)
    # the same with other constants: K=32, scale 200 (E_A = 1/2 still), base e, from 1500
    other = elo_ratings(battles[:1], k=32, scale=200, base=math.e, initial=1500)
    assert other == pytest.approx({"A": 1516.0, "B": 1484.0})


def test_elo_recovers_the_order_of_well_separated_models():
    logits = [-1.2, -0.4, 0.4, 1.2]  # 139 points apart: far beyond online Elo's wander at K=4
    ratings = elo_ratings(simulate(logits, 4000, np.random.default_rng(3)))
    assert sorted(ratings, key=ratings.get) == ["m0", "m1", "m2", "m3"]
    assert sum(ratings.values()) == pytest.approx(4000)  # zero-sum updates keep the mean at `initial`


def test_elo_bootstrap_shuffles_the_order():
    # A wins the first 50, B the last 50: in order B ends ahead, but in a random order neither is, so each
    # interval must straddle 1000. (Resampling without reshuffling would keep B ahead in every round.)
    battles = [Battle("A", "B", "model_a")] * 50 + [Battle("A", "B", "model_b")] * 50
    result = compute_ratings(battles, method="elo", rounds=300, seed=1)
    assert result["B"].rating > 1010 and result["A"].rating < 990
    for model in "AB":
        assert result[model].lower < 1000 < result[model].upper
    anchored = compute_ratings(battles, method="elo", rounds=50, anchor="A", center=1200)
    assert anchored["A"].rating == anchored["A"].lower == anchored["A"].upper == 1200
    assert anchored["B"].rating - 1200 == pytest.approx(result["B"].rating - result["A"].rating)


# --- Bradley-Terry ---------------------------------------------------------------------------------------------

def test_bradley_terry_two_models_in_closed_form():
    # With two models the maximum is where rating difference = 400 log10(wins / losses). A wins 10, B 4, and
    # 4 ties count half each way: 12 against 6, so A is 400 log10(2) = 120.41 points above B, mean 1000.
    battles = [Battle("A", "B", "model_a")] * 10 + [Battle("B", "A", "model_a")] * 4
    battles += [Battle("A", "B", "tie"), Battle("B", "A", "tie (bothbad)")] * 2
    got = bradley_terry(battles, l2=1e-9)
    gap = 400 * math.log10(2)
    assert got["A"] == pytest.approx(1000 + gap / 2, abs=1e-4)
    assert got["B"] == pytest.approx(1000 - gap / 2, abs=1e-4)
    # the default prior moves it by well under a point; an anchor puts B at 1000 exactly
    assert bradley_terry(battles)["A"] == pytest.approx(1000 + gap / 2, abs=0.5)
    assert bradley_terry(battles, anchor="B", l2=1e-9) == pytest.approx({"A": 1000 + gap, "B": 1000}, abs=1e-4)


def test_bradley_terry_matches_scipy_on_the_same_likelihood():
    optimize = pytest.importorskip("scipy.optimize")
    battles = simulate(TRUE, 600, np.random.default_rng(7))
    models = [f"m{i}" for i in range(len(TRUE))]
    a = np.array([models.index(x.model_a) for x in battles])
    b = np.array([models.index(x.model_b) for x in battles])
    s = np.array([{"model_a": 1.0, "model_b": 0.0}.get(x.winner, 0.5) for x in battles])
    l2 = 0.01

    def loss(theta):  # battle by battle, written apart from camelid's aggregated Newton fit
        d = theta[a] - theta[b]
        value = np.sum(s * np.logaddexp(0, -d) + (1 - s) * np.logaddexp(0, d)) + l2 / 2 * theta @ theta
        g = -(s - 1 / (1 + np.exp(-d)))
        return value, np.bincount(a, g, len(models)) - np.bincount(b, g, len(models)) + l2 * theta

    best = optimize.minimize(loss, np.zeros(len(models)), jac=True, method="L-BFGS-B",
                             options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 1000})
    want = 1000 + POINTS_PER_LOGIT * (best.x - best.x.mean())
    got = bradley_terry(battles, l2=l2)
    assert [got[m] for m in models] == pytest.approx(want.tolist(), abs=1e-3)


def test_bradley_terry_recovers_known_strengths():
    n_battles = 4000
    got = bradley_terry(simulate(TRUE, n_battles, np.random.default_rng(11)), anchor="m0")
    models = [f"m{i}" for i in range(len(TRUE))]
    assert sorted(models, key=got.get) == sorted(models, key=lambda m: TRUE[int(m[1:])])
    # Each difference to m0 within 4 standard deviations of its sampling error (from the Fisher information
    # at the truth for this many battles): about 13-14 points each here, so 52-56 points; a wrong scale
    # (e.g. log10 for ln) or tie rule would miss the true 60-190 point gaps by more.
    sd = fisher_sd(TRUE, n_battles) * POINTS_PER_LOGIT
    for i, model in enumerate(models[1:], 1):
        assert got[model] - 1000 == pytest.approx(TRUE[i] * POINTS_PER_LOGIT, abs=4 * sd[i - 1]), model


def test_models_that_never_won_or_never_lost_stay_finite():
    battles = [Battle("A", "B", "model_a"), Battle("A", "B", "model_b")] * 10
    battles += [Battle("C", "A", "model_b"), Battle("B", "C", "model_a")] * 10  # C never wins
    battles += [Battle("D", "A", "model_a"), Battle("D", "C", "model_a")] * 3  # D never loses
    result = compute_ratings(battles, rounds=100)
    for row in result.rows:
        assert all(math.isfinite(x) for x in (row.rating, row.lower, row.upper)), row
    assert result.rows[0].model == "D" and result.rows[-1].model == "C"
    assert result["A"].rating - result["C"].rating > 300  # far below: only the weak prior holds it


def test_bootstrap_intervals_cover_the_truth_at_their_stated_rate():
    # 100 simulated datasets of 1,500 battles, 200 bootstrap rounds each; with m0 as the anchor each interval
    # is one of a difference to m0, which is what battles identify, and the truth is known.
    # 95% intervals: 500 of them (5 per dataset). Were they independent, the share covering would have a
    # standard deviation of sqrt(.95 * .05 / 500) = 1%; intervals of one dataset share data, which widens
    # that to perhaps 1.5-2%, and 200 rounds make the tails a little noisy (slightly short of 95%). So
    # 88%-99% allows 3-4 sd below and 2-3 above, yet fails intervals 1.5x too wide (99.7%) or 0.7x (82%).
    # 50% intervals from the same rounds check the middle: 40%-60%, failing 1.5x too wide (69%) or 0.7x (36%).
    rng = np.random.default_rng(2024)
    truth = {f"m{i}": 1000 + t * POINTS_PER_LOGIT for i, t in enumerate(TRUE)}
    covered = {0.95: [], 0.5: []}
    for dataset in range(100):
        battles = simulate(TRUE, 1500, rng)
        for level, hits in covered.items():
            result = compute_ratings(battles, rounds=200, level=level, seed=dataset, anchor="m0")
            hits += [row.lower <= truth[row.model] <= row.upper for row in result.rows if row.model != "m0"]
    assert 0.88 <= np.mean(covered[0.95]) <= 0.99, np.mean(covered[0.95])
    assert 0.40 <= np.mean(covered[0.5]) <= 0.60, np.mean(covered[0.5])


def test_ratings_result_counts_and_is_seeded():
    battles = [Battle("A", "B", "model_a"), Battle("B", "C", "tie"), Battle("A", "C", "model_b"),
               Battle("C", "B", "tie (bothbad)")]
    one = compute_ratings(battles, rounds=50, seed=5)
    assert compute_ratings(battles, rounds=50, seed=5).to_dict() == one.to_dict()
    assert compute_ratings(battles, rounds=50, seed=6).to_dict() != one.to_dict()
    assert one.samples.shape == (50, 3)
    assert (one["B"].battles, one["B"].wins, one["B"].losses, one["B"].ties) == (3, 0, 1, 2)
    assert (one["C"].battles, one["C"].wins, one["C"].losses, one["C"].ties) == (3, 1, 0, 2)
    assert one["C"].win_rate == pytest.approx(2 / 3)
    assert sum(row.rating for row in one.rows) == pytest.approx(3000)
    json.dumps(one.to_dict())  # JSON-ready
    assert compute_ratings(battles, rounds=0)["A"].lower is None


def test_bad_requests_are_one_line_errors():
    battles = [Battle("A", "B", "model_a")]
    with pytest.raises(CamelidError, match="no battles to rate"):
        compute_ratings([])
    for rate in (compute_ratings, bradley_terry):
        with pytest.raises(CamelidError, match=r"2 groups that never met \(A, B; C, D\)"):
            rate([Battle("A", "B", "model_a"), Battle("C", "D", "tie")])
    with pytest.raises(CamelidError, match="anchor model 'Z' is in no battle; choose one of: A, B"):
        compute_ratings(battles, anchor="Z")
    with pytest.raises(CamelidError, match="unknown rating method 'glicko'"):
        compute_ratings(battles, method="glicko")
    with pytest.raises(CamelidError, match="between 0 and 1"):
        compute_ratings(battles, level=95)
    with pytest.raises(CamelidError, match="K-factor"):
        elo_ratings(battles, k=0)
    with pytest.raises(CamelidError, match="prior strength l2 must be > 0"):
        bradley_terry(battles, l2=0)
    with pytest.raises(CamelidError, match="battle 1: a model against itself"):
        compute_ratings([Battle("A", "B", "tie"), {"model_a": "A", "model_b": "A", "winner": "tie"}])


# --- reading votes ---------------------------------------------------------------------------------------------

def arena_vote(a, b, winner, **extra) -> str:
    """One line as the arena writes it."""
    return json.dumps({"time": "2025-01-01T00:00:00Z", "battle": "x", "model_a": a, "model_b": b,
                       "winner": winner, "conversation_a": [], "conversation_b": [], **extra}) + "\n"


def test_read_battles_reads_the_arena_votes_file(tmp_path):
    votes = tmp_path / "arena-votes.jsonl"
    votes.write_text(arena_vote("A", "B", "model_a") + "\n" + arena_vote("B", "C", "tie (bothbad)"))
    fastchat = tmp_path / "clean_battle.json"  # FastChat publishes battles as one JSON array
    fastchat.write_text(json.dumps([{"model_a": "C", "model_b": "A", "winner": "tie", "anony": True}], indent=1))
    battles, skipped = read_battles([votes, fastchat])
    assert battles == [Battle("A", "B", "model_a"), Battle("B", "C", "tie (bothbad)"), Battle("C", "A", "tie")]
    assert skipped == []
    assert read_battles(str(votes))[0] == battles[:2]


@pytest.mark.parametrize("line, message", [
    ('{"model_a": "A", "model_b": ', "invalid JSON"),
    ('["A", "B", "model_a"]', "not a JSON object"),
    ('{"model_a": "A", "winner": "tie"}', "missing 'model_b'"),
    ('{"model_a": "A", "model_b": 3, "winner": "tie"}', "'model_b' is not a model name"),
    ('{"model_a": "A", "model_b": "B", "winner": "A"}', 'unknown winner (got "A", expected one of "model_a"'),
    ('{"model_a": "A", "model_b": "A", "winner": "tie"}', "a model against itself (A)"),
])
def test_read_battles_names_the_bad_line(tmp_path, line, message):
    votes = tmp_path / "votes.jsonl"
    votes.write_text(arena_vote("A", "B", "model_a") + line + "\n" + arena_vote("A", "B", "tie"))
    with pytest.raises(CamelidError) as caught:
        read_battles([votes])
    text = str(caught.value)
    assert text.startswith(f"{votes}:2: ") and message in text and "--skip-bad" in text and "\n" not in text
    battles, skipped = read_battles([votes], skip_bad=True)
    assert battles == [Battle("A", "B", "model_a"), Battle("A", "B", "tie")]
    assert [where for where, _ in skipped] == [f"{votes}:2"]


def test_read_battles_missing_file(tmp_path):
    with pytest.raises(CamelidError, match="no such file"):
        read_battles([tmp_path / "nope.jsonl"])


# --- table and pictures ----------------------------------------------------------------------------------------

def test_ratings_table_exact():
    battles = [Battle("A", "B", "model_a"), Battle("B", "C", "tie"), Battle("A", "C", "model_b")]
    table = ratings_table(compute_ratings(battles, method="elo", rounds=0))  # 999.99, 998.01, 1002.00 (above)
    assert table == (
        "| rank | model | rating | battles | win rate |\n"
        "|---:|:---|---:|---:|---:|\n"
        "| 1 | C | 1002 | 2 | 75.0% |\n"
        "| 2 | A | 1000 | 2 | 50.0% |\n"
        "| 3 | B | 998 | 2 | 25.0% |\n"
    )


def test_ratings_table_intervals():
    rows = [ModelRating("x|y", 1100.4, 1080.0, 1112.6, 40, 30, 8, 2),
            ModelRating("anchor", 1000.0, 1000.0, 1000.0, 50, 20, 25, 5),
            ModelRating("elo-ish", 950.2, 960.0, 990.0, 10, 1, 9, 0)]  # an interval to one side
    ratings = Ratings("bradley-terry", rows, rounds=100, level=0.9, anchor="anchor", center=1000, scale=400, base=10)
    assert ratings_table(ratings).splitlines()[0] == "| rank | model | rating | 90% CI | battles | win rate |"
    assert ratings_table(ratings).splitlines()[2:] == [
        "| 1 | x\\|y | 1100 | +12/-20 | 40 | 77.5% |",
        "| 2 | anchor | 1000 | +0/-0 | 50 | 45.0% |",
        "| 3 | elo-ish | 950 | +40/+10 | 10 | 10.0% |",
    ]


def test_win_rates():
    rows = [ModelRating("A", 1200.0, None, None, 2, 1, 0, 1), ModelRating("B", 1000.0, None, None, 2, 0, 1, 1)]
    ratings = Ratings("elo", rows, rounds=0, level=0.95, anchor=None, center=1000, scale=400, base=10)
    predicted = predicted_win_rates(ratings)
    assert predicted[0, 1] == pytest.approx(1 / (1 + 10 ** -0.5))
    assert predicted[0, 1] + predicted[1, 0] == pytest.approx(1) and np.isnan(predicted[0, 0])
    rates, counts = observed_win_rates(
        [Battle("A", "B", "model_a"), Battle("B", "A", "tie"), Battle("A", "C", "model_a")], ["A", "B"])
    assert rates[0, 1] == 0.75 and rates[1, 0] == 0.25 and counts.tolist() == [[0, 2], [2, 0]]


def test_pictures_are_png(tmp_path):
    from matplotlib.image import imread

    battles = simulate(TRUE, 300, np.random.default_rng(0))
    result = compute_ratings(battles, rounds=50)
    for path in (ratings_plot(result, tmp_path / "ratings.png"),
                 win_rate_plot(result, tmp_path / "win-rates.png", battles=battles)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert height > 200 and width > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.png", "win-rates.png"]  # no temporary left
