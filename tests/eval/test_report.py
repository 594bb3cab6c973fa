"""camelid eval report: exact tables from crafted judgments, valid PNGs, and answers -> judge -> report end to end."""

import json
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher, completion
from PIL import Image
from helpers import shared_file, write_jsonl

from camelid.client import ChatClient
from camelid.errors import CamelidError
from camelid.eval.answers import generate_answers
from camelid.eval.report import eval_report, read_judgments

QUESTIONS = [{"question_id": 1, "category": "writing", "turns": ["Write.", "Again."]},
             {"question_id": 2, "category": "math", "turns": ["2+2?", "3+3?"], "reference": ["4", "6"]}]


def single(model: str, qid: int, turn: int, score, judge: str = "gpt-4") -> dict:
    return {"question_id": qid, "model": model, "judge": [judge, "camelid-single-v1"], "user_prompt": "...",
            "judgment": "...", "score": score, "turn": turn, "tstamp": 0.0}


def pair(m1: str, m2: str, qid: int, turn: int, g1: str, g2: str) -> dict:
    return {"question_id": qid, "model_1": m1, "model_2": m2, "g1_winner": g1, "g2_winner": g2,
            "judge": ["gpt-4", "camelid-pair-v1"], "g1_user_prompt": "...", "g1_judgment": "...",
            "g2_user_prompt": "...", "g2_judgment": "...", "turn": turn, "tstamp": 0.0}


SINGLE = [single("alpha", 1, 1, 8), single("alpha", 1, 2, 6), single("alpha", 2, 1, 9), single("alpha", 2, 2, -1),
          single("beta", 1, 1, 5), single("beta", 1, 2, 4), single("beta", 2, 1, 3), single("beta", 2, 2, 2.0)]
PAIRWISE = [
    pair("alpha", "beta", 1, 1, "model_1", "model_1"),  # alpha wins
    pair("alpha", "beta", 1, 2, "model_1", "model_2"),  # the orders disagree: a tie
    pair("alpha", "beta", 2, 1, "model_2", "model_2"),  # beta wins
    pair("alpha", "beta", 2, 2, "error", "model_1"),  # no verdict in one order: a parse failure
    pair("alpha", "gamma", 1, 1, "tie", "tie"),
    pair("beta", "gamma", 2, 1, "model_1", "model_1"),  # beta wins
]

SINGLE_TABLE = """\
| model | score | turn 1 | turn 2 | judged | parse failures |
|:---|---:|---:|---:|---:|---:|
| alpha | 7.67 | 8.50 | 6.00 | 3 | 1 |
| beta | 3.50 | 4.00 | 3.00 | 4 | 0 |
"""
SINGLE_BY_CATEGORY = """\
| model | writing | math |
|:---|---:|---:|
| alpha | 7.00 | 9.00 |
| beta | 4.50 | 2.50 |
"""
PAIRWISE_TABLE = """\
| model | wins | losses | ties | win rate | battles | parse failures |
|:---|---:|---:|---:|---:|---:|---:|
| beta | 2 | 1 | 1 | 62.5% | 4 | 1 |
| alpha | 1 | 1 | 2 | 50.0% | 4 | 1 |
| gamma | 0 | 1 | 1 | 25.0% | 2 | 0 |
"""
PAIRWISE_BY_CATEGORY = """\
| model | writing | math |
|:---|---:|---:|
| beta | 25.0% | 100.0% |
| alpha | 66.7% | 0.0% |
| gamma | 50.0% | 0.0% |
"""


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 150
        image.verify()
    with Image.open(path) as image:  # not one flat colour: something was drawn
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path, Path]:
    return (write_jsonl(tmp_path / "q.jsonl", QUESTIONS), write_jsonl(tmp_path / "single.jsonl", SINGLE),
            write_jsonl(tmp_path / "pair.jsonl", PAIRWISE))


def test_exact_tables_and_valid_pictures(tmp_path, files):
    questions, single_file, pair_file = files
    report = eval_report([single_file, pair_file], tmp_path / "report", questions=questions)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown == report.markdown
    single_part, pair_part = markdown.split("## Pairwise comparison, judged by gpt-4")
    assert "## Single-answer grading, judged by gpt-4" in single_part
    assert "over 7 judgments with a rating; 1 of 8 had no rating (parse failures)" in single_part
    assert "\n" + SINGLE_TABLE + "\n### Mean score by category\n\n" + SINGLE_BY_CATEGORY in single_part
    assert "1 of 6 judgments lacked a verdict in an order (parse failures)" in pair_part
    assert "\n" + PAIRWISE_TABLE + "\n### Win rate by category\n\n" + PAIRWISE_BY_CATEGORY in pair_part
    assert "![scores_by_category](scores_by_category.png)" in single_part
    assert "![pairwise_outcomes](pairwise_outcomes.png)" in pair_part

    for name in ("scores_by_category.png", "pairwise_outcomes.png"):
        assert_png(tmp_path / "report" / name)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["single"]["gpt-4"]["alpha"]["turns"] == {"1": 8.5, "2": 6.0}
    assert summary["pairwise"]["gpt-4"]["gamma"] == {"wins": 0, "losses": 1, "ties": 1, "battles": 2, "win_rate": 0.25,
                                                     "categories": {"writing": 0.5, "math": 0.0},
                                                     "parse_failures": 0}
    assert set(report.files) == {"scores_by_category", "pairwise_outcomes", "report.md", "summary.json"}


def test_without_questions_there_are_no_category_tables(tmp_path, files):
    _, single_file, _ = files
    report = eval_report(single_file, tmp_path / "r")
    assert SINGLE_TABLE in report.markdown and "by category" not in report.markdown.replace(
        "scores_by_category", "")
    assert_png(tmp_path / "r" / "scores_by_category.png")


def test_single_turn_judgments_have_no_turn_columns_and_each_judge_its_own_section(tmp_path):
    rows = [single("alpha", 1, 1, 7), single("beta", 1, 1, 9), single("alpha", 1, 1, 3, judge="other/judge")]
    report = eval_report(write_jsonl(tmp_path / "j.jsonl", rows), tmp_path / "r")
    assert "| model | score | judged | parse failures |\n|:---|---:|---:|---:|\n| beta | 9.00 | 1 | 0 |\n" \
           "| alpha | 7.00 | 1 | 0 |\n" in report.markdown
    assert "judged by other/judge" in report.markdown and "| alpha | 3.00 | 1 | 0 |" in report.markdown
    for judge in ("gpt-4", "other-judge"):
        assert_png(tmp_path / "r" / f"scores_by_category-{judge}.png")


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 1, "model": "a", "judge": ["j", "p"], "score": "high", "turn": 1}', "'score' is not a number"),
    ('{"question_id": 1, "model_1": "a", "judge": ["j", "p"], "turn": 1}', "missing 'model_2', 'g1_winner'"),
    (json.dumps({"question_id": 1, "model_1": "a", "model_2": "b", "g1_winner": "A", "g2_winner": "tie",
                 "judge": ["j", "p"], "turn": 1}), "g1_winner 'A' is not model_1, model_2, tie or error"),
    ('{"question_id": 1,', "invalid JSON"),
])
def test_bad_judgment_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "j.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CamelidError, match=f"j.jsonl:1: {message}"):
        read_judgments(path)


def test_answers_judge_and_report_end_to_end(tmp_path):
    """Two models answer two Vicuna questions through a fake endpoint; a fake judge prefers longer answers."""
    from camelid.eval.judge import battles_path, judge
    from camelid.eval.ratings import read_battles

    questions = tmp_path / "q.jsonl"
    vicuna = shared_file("vicuna_bench_question.jsonl").read_text().splitlines()
    shared = [json.loads(line) for line in vicuna]
    write_jsonl(questions, [q for q in shared if q["question_id"] in (1, 71)])
    for model, words in (("terse", 2), ("wordy", 9)):
        with FakeTeacher(lambda body, index, words=words: completion(" ".join(["word"] * words))) as fake:
            generate_answers(questions, tmp_path / "answers" / f"{model}.jsonl",
                             client=ChatClient(fake.base_url, model, retries=0), progress=False)

    def longer_wins(body, index):
        text = body["messages"][1]["content"]
        a = text.split("<answer_a>")[1].split("</answer_a>")[0]
        b = text.split("<answer_b>")[1].split("</answer_b>")[0]
        return completion("[[A]]" if len(a) > len(b) else "[[B]]")

    out = tmp_path / "judgments" / "pair.jsonl"
    with FakeTeacher(longer_wins) as fake:
        judge(questions, tmp_path / "answers", out, client=ChatClient(fake.base_url, "judge", retries=0),
              mode="pairwise-all", progress=False)
    assert [b.winner for b in read_battles(battles_path(out))[0]] == ["model_b", "model_b"]  # terse vs wordy
    report = eval_report(out, tmp_path / "report", questions=questions)
    assert "| wordy | 2 | 0 | 0 | 100.0% | 2 | 0 |\n| terse | 0 | 2 | 0 | 0.0% | 2 | 0 |" in report.markdown
    assert "| model | generic | writing |" in report.markdown
    assert_png(tmp_path / "report" / "pairwise_outcomes.png")
