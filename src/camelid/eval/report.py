"""Tables and pictures of LLM-judge results: mean scores of single grading, wins and losses of pairwise judging.

`eval_report(judgment_files, out_dir, questions=...)` reads judgment files of `camelid eval judge` (FastChat's
schemas; single and pairwise records may be mixed, the kind is read from each record) and writes to `out_dir`:

- report.md: per judge model, for single grading the mean score per model, overall and per turn, and per
  category; for pairwise judging each model's wins, losses, ties and win rate (a tie counting half), and its
  win rate per category. Judgments without a verdict are left out of the numbers and shown as parse failures.
- summary.json: the same numbers for programs.
- PNGs: mean scores by category (grouped bars), and win/tie/loss shares per model (stacked bars).

Categories come from the question file, as the judgments do not carry them; without one there are no
per-category tables, and the score plot shows each model's overall mean.
"""

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camelid.data.formats import strict_records
from camelid.errors import CamelidError
from camelid.eval.answers import read_questions
from camelid.eval.judge import PAIR_WINNERS, pair_outcome
from camelid.files import write_atomic
from camelid.plots import save_png

JUDGMENTS_HINT = "expected judgments of `camelid eval judge` (FastChat's single or pairwise judgment JSONL)"
EMPTY = "–"  # a cell without data


@dataclass
class EvalReport:
    markdown: str
    summary: dict  # {"single": {judge: {model: {...}}}, "pairwise": {judge: {model: {...}}}}
    files: dict[str, Path] = field(default_factory=dict)  # what was written: name -> path


# -- reading ---------------------------------------------------------------------------------------------------


def read_judgments(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """The judgment records of one or more files, each checked to be a single or a pairwise judgment."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    records = [_judgment(value, where) for path in paths for where, value in strict_records(path, JUDGMENTS_HINT)]
    if not records:
        raise CamelidError(f"no judgments in {', '.join(map(str, paths))}; {JUDGMENTS_HINT}")
    return records


def _judgment(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise CamelidError(f"{where}: not a JSON object; {JUDGMENTS_HINT}")
    single = ("question_id", "model", "judge", "score", "turn")
    pairwise = ("question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "turn")
    needed = single if "score" in value else pairwise
    if missing := [key for key in needed if key not in value]:
        raise CamelidError(f"{where}: missing {', '.join(map(repr, missing))}; {JUDGMENTS_HINT}")
    if "score" in value and (isinstance(value["score"], bool) or not isinstance(value["score"], int | float)):
        raise CamelidError(f"{where}: 'score' is not a number; {JUDGMENTS_HINT}")
    for key in ("g1_winner", "g2_winner"):
        if key in value and value[key] not in PAIR_WINNERS:
            raise CamelidError(f"{where}: {key} {value[key]!r} is not model_1, model_2, tie or error")
    judge = value["judge"]
    if not (isinstance(judge, list | str) and judge):
        raise CamelidError(f"{where}: 'judge' is not [model, prompt]; {JUDGMENTS_HINT}")
    return value


def _has_verdict(record: dict) -> bool:
    if "score" in record:
        return 1 <= record["score"] <= 10  # FastChat's NO_SCORE (-1) marks a judgment without a rating
    return pair_outcome(record) is not None


def _judge_model(record: dict) -> str:
    judge = record["judge"]
    return judge if isinstance(judge, str) else str(judge[0])


# -- the numbers -----------------------------------------------------------------------------------------------


def single_summary(records: list[dict], categories: dict | None = None) -> dict[str, dict]:
    """model -> {score, turns {turn: mean}, categories {category: mean}, judged, parse_failures}, from single
    judgments; means are over judgments with a rating (None where there is none)."""
    scores: dict[str, list] = defaultdict(list)  # model -> [(turn, category, score)]
    failures: dict[str, int] = defaultdict(int)
    for r in records:
        if not _has_verdict(r):
            failures[r["model"]] += 1
            scores.setdefault(r["model"], [])
        else:
            category = categories.get(r["question_id"]) if categories else None
            scores[r["model"]].append((r["turn"], category, float(r["score"])))
    summary = {}
    for model, rows in scores.items():
        summary[model] = {
            "score": _mean(s for _, _, s in rows),
            "turns": {t: _mean(s for turn, _, s in rows if turn == t) for t in sorted({t for t, _, _ in rows})},
            "categories": {c: _mean(s for _, cat, s in rows if cat == c)
                           for c in _ordered({c for _, c, _ in rows}, categories)},
            "judged": len(rows),
            "parse_failures": failures[model],
        }
    return summary


def pairwise_summary(records: list[dict], categories: dict | None = None) -> dict[str, dict]:
    """model -> {wins, losses, ties, battles, win_rate, categories {category: win rate}, parse_failures}, from
    pairwise judgments: a pair's result is its two orders' verdict, a tie where they disagree (pair_outcome)."""
    outcomes: dict[str, list] = defaultdict(list)  # model -> [(category, 1 | 0.5 | 0)]
    failures: dict[str, int] = defaultdict(int)
    for r in records:
        outcome = pair_outcome(r)
        for model in (r["model_1"], r["model_2"]):
            if outcome is None:
                failures[model] += 1
                outcomes.setdefault(model, [])
                continue
            points = 0.5 if outcome == "tie" else float(r[outcome] == model)
            category = categories.get(r["question_id"]) if categories else None
            outcomes[model].append((category, points))
    summary = {}
    for model, rows in outcomes.items():
        points = [p for _, p in rows]
        summary[model] = {
            "wins": points.count(1.0), "losses": points.count(0.0), "ties": points.count(0.5), "battles": len(rows),
            "win_rate": _mean(points),
            "categories": {c: _mean(p for cat, p in rows if cat == c)
                           for c in _ordered({c for c, _ in rows}, categories)},
            "parse_failures": failures[model],
        }
    return summary


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ordered(found: set, categories: dict | None) -> list[str]:
    """The categories in `found` in the question file's order (None, no category, left out)."""
    order = list(dict.fromkeys(categories.values())) if categories else []
    return [c for c in order if c in found]


# -- the tables ------------------------------------------------------------------------------------------------


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the first column left-aligned, the rest (numbers) right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def single_tables(summary: dict[str, dict]) -> tuple[str, str | None]:
    """The score table (overall, per turn when there are several, judged, parse failures) and the category
    table (None without categories), the best model first."""
    models = sorted(summary, key=lambda m: (-(summary[m]["score"] or 0), m))
    turns = sorted({t for s in summary.values() for t in s["turns"]})
    per_turn = turns if len(turns) > 1 else []
    head = ["model", "score"] + [f"turn {t}" for t in per_turn] + ["judged", "parse failures"]
    rows = [[m, _score(summary[m]["score"])] + [_score(summary[m]["turns"].get(t)) for t in per_turn]
            + [str(summary[m]["judged"]), str(summary[m]["parse_failures"])] for m in models]
    return markdown_table(head, rows), _category_table(summary, models, _score)


def pairwise_tables(summary: dict[str, dict]) -> tuple[str, str | None]:
    """The outcome table (wins, losses, ties, win rate, battles, parse failures) and the win rate per category
    (None without categories), the best model first."""
    models = sorted(summary, key=lambda m: (-(summary[m]["win_rate"] or 0), m))
    head = ["model", "wins", "losses", "ties", "win rate", "battles", "parse failures"]
    rows = [[m] + [str(summary[m][k]) for k in ("wins", "losses", "ties")] + [_percent(summary[m]["win_rate"])]
            + [str(summary[m]["battles"]), str(summary[m]["parse_failures"])] for m in models]
    return markdown_table(head, rows), _category_table(summary, models, _percent)


def _category_table(summary: dict[str, dict], models: list[str], cell) -> str | None:
    categories = list(dict.fromkeys(c for m in models for c in summary[m]["categories"]))
    if not categories:
        return None
    rows = [[m] + [cell(summary[m]["categories"].get(c)) for c in categories] for m in models]
    return markdown_table(["model"] + categories, rows)


def _score(value: float | None) -> str:
    return EMPTY if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return EMPTY if value is None else f"{100 * value:.1f}%"


# -- the pictures ----------------------------------------------------------------------------------------------


def scores_plot(summary: dict[str, dict], path: str | Path, title: str = "mean score by category") -> Path:
    """A PNG of grouped bars: each category's mean score (1-10) per model; each model's overall mean without
    categories."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and changes no pyplot state

    models = sorted(summary, key=lambda m: (-(summary[m]["score"] or 0), m))
    categories = list(dict.fromkeys(c for m in models for c in summary[m]["categories"])) or ["all"]
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(categories))
    fig = Figure(figsize=(max(6.0, 1.1 * len(categories) + 2), 4.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, model in enumerate(models):
        by_category = summary[model]["categories"] or {"all": summary[model]["score"]}
        values = [by_category.get(c) for c in categories]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=model)
    crowded = len(categories) > 6
    ax.set_xticks(x, categories, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean score (1-10)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_png(fig, path)


def outcomes_plot(summary: dict[str, dict], path: str | Path, title: str = "pairwise outcomes") -> Path:
    """A PNG of stacked horizontal bars: each model's share of wins, ties and losses, the best at the top."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    models = sorted(summary, key=lambda m: (summary[m]["win_rate"] or 0, m))  # barh draws the first at the bottom
    fig = Figure(figsize=(7, 1.4 + 0.4 * len(models)), dpi=110, layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(models))
    for key, color in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
        counts = np.array([summary[m][key] for m in models], dtype=float)
        battles = np.array([max(summary[m]["battles"], 1) for m in models], dtype=float)
        share = counts / battles
        bars = ax.barh(models, share, left=left, color=color, label=key)
        ax.bar_label(bars, labels=[f"{int(c)}" if s >= 0.06 else "" for c, s in zip(counts, share)],
                     label_type="center", color="white", fontsize="small")
        left += share
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of battles (counts on the bars)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_png(fig, path)


# -- the report ------------------------------------------------------------------------------------------------


def eval_report(judgments: str | Path | Iterable[str | Path], out_dir: str | Path, *,
                questions: str | Path | None = None) -> EvalReport:
    """Write report.md, summary.json and the plots of `judgments` (files of `camelid eval judge`) to `out_dir`.

    questions: the question file the judgments are of, for the per-category tables and plot.
    """
    paths = [judgments] if isinstance(judgments, str | Path) else list(judgments)
    records = read_judgments(paths)
    categories = {q.question_id: q.category for q in read_questions(questions)} if questions else None
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CamelidError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)  # (kind, judge model) -> records
    for r in records:
        groups["single" if "score" in r else "pairwise", _judge_model(r)].append(r)
    several = len({judge for _, judge in groups}) > 1
    result = EvalReport("", {"single": {}, "pairwise": {}})
    lines = ["# LLM-judge results", "", f"Judgments: {', '.join(f'`{p}`' for p in paths)}."]
    if questions:
        lines.append(f"Categories from `{questions}`.")
    for (kind, judge), group in sorted(groups.items(), key=lambda item: (item[0][0] != "single", item[0][1])):
        suffix = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", judge) if several else ""
        failures = sum(not _has_verdict(r) for r in group)
        if kind == "single":
            summary = single_summary(group, categories)
            table, by_category = single_tables(summary)
            picture = scores_plot(summary, out_dir / f"scores_by_category{suffix}.png",
                                  f"mean score by category, judged by {judge}")
            lines += ["", f"## Single-answer grading, judged by {judge}", "",
                      (f"Mean score from 1 to 10 over {len(group) - failures} judgments with a rating; "
                       f"{failures} of {len(group)} had no rating (parse failures) and are left out."), "", table]
            if by_category:
                lines += ["### Mean score by category", "", by_category]
        else:
            summary = pairwise_summary(group, categories)
            table, by_category = pairwise_tables(summary)
            picture = outcomes_plot(summary, out_dir / f"pairwise_outcomes{suffix}.png",
                                    f"pairwise outcomes, judged by {judge}")
            lines += ["", f"## Pairwise comparison, judged by {judge}", "",
                      (f"Each pair was judged in both orders; where the orders disagree it is a tie. Win rate "
                       f"counts a tie as half a win. {failures} of {len(group)} judgments lacked a verdict in an "
                       "order (parse failures) and are left out."), "", table]
            if by_category:
                lines += ["### Win rate by category", "", by_category]
        lines.append(f"![{picture.stem}]({picture.name})")
        result.summary[kind][judge] = summary
        result.files[picture.stem] = picture
    result.markdown = "\n".join(lines).rstrip("\n") + "\n"
    for name, text in (("report.md", result.markdown),
                       ("summary.json", json.dumps(result.summary, indent=2, ensure_ascii=False) + "\n")):
        write_atomic(out_dir / name, text)
        result.files[name] = out_dir / name
    return result
