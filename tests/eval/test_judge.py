"""camelid eval judge: the prompts of every mode, verdict parsing, both orders and ties, the cache, resume,
retries and cost, and battles that `camelid eval ratings` reads; all against a fake judge on loopback."""

import json
import re
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher, completion, error, in_order, prompt_words
from helpers import read_jsonl, shared_file

from camelid.client import ChatClient, TeacherError
from camelid.errors import CamelidError
from camelid.eval.answers import Question, read_questions
from camelid.eval.judge import (
    PROMPTS,
    REMINDER_JOIN,
    REMINDERS,
    battles_path,
    cache_key,
    judge,
    pair_messages,
    parse_pair_verdict,
    parse_rating,
    single_messages,
)
from camelid.eval.ratings import read_battles

STRENGTH = {"alpha": 8, "beta": 5, "gamma": 3}  # the fake judge's rating of each model; the stronger wins pairs
SINGLE_KEYS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
PAIR_KEYS = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment",
             "g2_user_prompt", "g2_judgment", "turn", "tstamp"}


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    """Two real MT-bench questions: 81 (writing, no reference) and 111 (math, a reference for both turns)."""
    chosen = [q for q in read_questions(shared_file("mt_bench_question.jsonl")) if q.question_id in (81, 111)]
    assert [q.category for q in chosen] == ["writing", "math"] and chosen[1].reference
    return chosen


def answer_text(model: str, qid: int, turn: int) -> str:
    return f"{model} says {qid}.{turn}"


@pytest.fixture
def answers(tmp_path) -> Path:
    """A directory of answer files for alpha, beta and gamma (one file each, named unlike the models)."""
    folder = tmp_path / "answers"
    folder.mkdir()
    for n, model in enumerate(STRENGTH):
        lines = [json.dumps({"question_id": qid, "answer_id": f"{model}{qid}", "model_id": model, "tstamp": 0.0,
                             "choices": [{"index": 0, "turns": [answer_text(model, qid, t) for t in (1, 2)]}]})
                 for qid in (81, 111)]
        (folder / f"file{n}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def models_in_order(text: str) -> list[str]:
    """The models whose answers appear in `text`, in order of first appearance."""
    return sorted((m for m in STRENGTH if m in text), key=text.index)


def fair_judge(body: dict, index: int):
    """Rates a single answer by its model's strength; in a pair, picks the stronger model wherever it stands."""
    user = body["messages"][1]["content"]
    shown = models_in_order(user)
    if len(shown) == 1:
        return completion(f"The answer is fine.\nRating: [[{STRENGTH[shown[0]]}]]")
    a, b = shown
    return completion(f"Both try.\n[[{'A' if STRENGTH[a] > STRENGTH[b] else 'B'}]]")


def client_for(fake: FakeTeacher, **options) -> ChatClient:
    return ChatClient(fake.base_url, "judge-model", **({"retries": 0, "backoff": 0.001} | options))


def block(text: str, tag: str) -> str:
    return re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)[1]


# -- prompts ---------------------------------------------------------------------------------------------------


def test_single_prompts_show_the_question_the_answer_and_a_reference_only_where_needed(tmp_path, questions, answers):
    out = tmp_path / "single.jsonl"
    with FakeTeacher(fair_judge) as fake:
        report = judge(questions, answers, out, client=client_for(fake), models=["alpha"], progress=False)
    writing, math = questions
    by_prompt = {r["messages"][1]["content"]: r for r in fake.requests}
    judgments = {(r["question_id"], r["turn"]): r for r in read_jsonl(out)}
    assert sorted(judgments) == [(81, 1), (81, 2), (111, 1), (111, 2)] and len(fake.requests) == 4

    for (qid, turn), record in judgments.items():
        assert set(record) == SINGLE_KEYS
        assert record["model"] == "alpha" and record["score"] == 8
        assert record["judgment"] == "The answer is fine.\nRating: [[8]]"
        request = by_prompt[record["user_prompt"]]
        assert request["temperature"] == 0.0 and request["max_tokens"] == 1024 and request["model"] == "judge-model"
        assert request["messages"][0] == {"role": "system", "content": PROMPTS[record["judge"][1]].system}
        assert record["judge"][0] == "judge-model"

    first = judgments[81, 1]
    assert first["judge"][1] == "camelid-single-v1"
    assert block(first["user_prompt"], "question") == writing.turns[0]
    assert block(first["user_prompt"], "answer") == answer_text("alpha", 81, 1)
    assert writing.turns[1] not in first["user_prompt"] and "81.2" not in first["user_prompt"]
    assert "reference" not in first["user_prompt"]

    math_1 = judgments[111, 1]
    assert math_1["judge"][1] == "camelid-single-ref-v1"
    assert block(math_1["user_prompt"], "reference_answer") == math.reference[0]
    assert block(math_1["user_prompt"], "answer") == answer_text("alpha", 111, 1)
    assert math.reference[1] not in math_1["user_prompt"]

    for qid, name in ((81, "camelid-single-turn2-v1"), (111, "camelid-single-ref-turn2-v1")):
        second = judgments[qid, 2]
        question = writing if qid == 81 else math
        assert second["judge"][1] == name
        dialogue = block(second["user_prompt"], "conversation")
        assert dialogue == (f"<user>\n{question.turns[0]}\n</user>\n<assistant>\n{answer_text('alpha', qid, 1)}\n"
                            f"</assistant>\n<user>\n{question.turns[1]}\n</user>\n<assistant>\n"
                            f"{answer_text('alpha', qid, 2)}\n</assistant>")
        assert "second answer" in second["user_prompt"] and "second answer" in PROMPTS[name].system
    assert "reference" not in judgments[81, 2]["user_prompt"]
    assert block(judgments[111, 2]["user_prompt"], "reference_1") == math.reference[0]
    assert block(judgments[111, 2]["user_prompt"], "reference_2") == math.reference[1]
    assert report.read == 4 and report.written == 4 and report.facts["parse_failures"] == 0


def test_pairs_are_judged_in_both_orders_with_the_answers_swapped(tmp_path, questions, answers):
    out = tmp_path / "pair.jsonl"
    with FakeTeacher(fair_judge) as fake:
        report = judge(questions, answers, out, client=client_for(fake), mode="pairwise-baseline", baseline="beta",
                       models=["gamma", "alpha"], progress=False)
    judgments = read_jsonl(out)
    # in question order, then in the order the models were given, then by turn
    assert [(r["question_id"], r["model_1"], r["model_2"], r["turn"]) for r in judgments] == [
        (81, "gamma", "beta", 1), (81, "gamma", "beta", 2), (81, "alpha", "beta", 1), (81, "alpha", "beta", 2),
        (111, "gamma", "beta", 1), (111, "gamma", "beta", 2), (111, "alpha", "beta", 1), (111, "alpha", "beta", 2)]
    assert len(fake.requests) == 16
    asked = {r["messages"][1]["content"] for r in fake.requests}
    for r in judgments:
        assert set(r) == PAIR_KEYS and {r["g1_user_prompt"], r["g2_user_prompt"]} <= asked
        m1, m2, qid, turn = r["model_1"], r["model_2"], r["question_id"], r["turn"]
        if turn == 1:
            assert block(r["g1_user_prompt"], "answer_a") == answer_text(m1, qid, 1)
            assert block(r["g1_user_prompt"], "answer_b") == answer_text(m2, qid, 1)
            assert block(r["g2_user_prompt"], "answer_a") == answer_text(m2, qid, 1)
            assert block(r["g2_user_prompt"], "answer_b") == answer_text(m1, qid, 1)
        else:
            for game, (a, b) in (("g1", (m1, m2)), ("g2", (m2, m1))):
                prompt = r[f"{game}_user_prompt"]
                for tag, model in (("conversation_a", a), ("conversation_b", b)):
                    dialogue = block(prompt, tag)
                    assert answer_text(model, qid, 1) in dialogue and answer_text(model, qid, 2) in dialogue
        assert r["g1_user_prompt"].count("<reference_answer") == r["g2_user_prompt"].count("<reference_answer") == (
            0 if qid == 81 else 1)
        name = "camelid-pair" + ("-ref" if qid == 111 else "") + ("-turn2" if turn == 2 else "") + "-v1"
        assert r["judge"] == ["judge-model", name]
        expected = "model_1" if m1 == "alpha" else "model_2"  # the fair judge agrees with itself in both orders
        assert (r["g1_winner"], r["g2_winner"]) == (expected, expected)
        assert r["g1_judgment"].startswith("Both try.")
    assert report.facts["battles"] == 8 and report.facts["orders_disagree"] == 0

    battles, skipped = read_battles(battles_path(out))
    assert skipped == [] and battles_path(out) == tmp_path / "pair.battles.jsonl"
    assert [(b.model_a, b.model_b, b.winner) for b in battles] == (
        [("gamma", "beta", "model_b")] * 2 + [("alpha", "beta", "model_a")] * 2) * 2


def test_a_judge_that_always_picks_the_first_answer_gives_ties(tmp_path, questions, answers):
    out = tmp_path / "pair.jsonl"
    with FakeTeacher(lambda body, index: completion("A is better. [[A]]")) as fake:
        report = judge(questions, answers, out, client=client_for(fake), mode="pairwise-all", progress=False)
    judgments = read_jsonl(out)
    assert {(r["model_1"], r["model_2"]) for r in judgments} == {("alpha", "beta"), ("alpha", "gamma"),
                                                                ("beta", "gamma")}
    assert len(judgments) == 12 and len(fake.requests) == 24
    assert all((r["g1_winner"], r["g2_winner"]) == ("model_1", "model_2") for r in judgments)
    battles, _ = read_battles(battles_path(out))
    assert len(battles) == 12 and {b.winner for b in battles} == {"tie"}
    assert report.facts["orders_disagree"] == 12


def test_all_pairs_of_a_fair_judge_rank_the_models(tmp_path, questions, answers):
    from camelid.eval.ratings import compute_ratings

    out = tmp_path / "pair.jsonl"
    with FakeTeacher(fair_judge) as fake:
        judge(questions, answers, out, client=client_for(fake), mode="pairwise-all", progress=False)
    battles, _ = read_battles(battles_path(out))
    wins = {(b.model_a, b.model_b): b.winner for b in battles}
    assert wins == {("alpha", "beta"): "model_a", ("alpha", "gamma"): "model_a", ("beta", "gamma"): "model_a"}
    ratings = compute_ratings(battles, rounds=0)
    assert [row.model for row in ratings.rows] == ["alpha", "beta", "gamma"]


def test_references_are_shown_only_for_the_categories_that_need_them():
    """Question 131 (extraction) has a reference in MT-bench, but FastChat judges extraction without one."""
    extraction = next(q for q in read_questions(shared_file("mt_bench_question.jsonl")) if q.question_id == 131)
    assert extraction.category == "extraction" and extraction.reference
    for turn in (1, 2):
        prompt, messages = single_messages(extraction, ["x", "y"], turn)
        assert "-ref" not in prompt.name and extraction.reference[0] not in messages[1]["content"]
        prompt, messages = pair_messages(extraction, ["x", "y"], ["z", "w"], turn)
        assert "-ref" not in prompt.name and "<reference" not in messages[1]["content"]
        prompt, messages = single_messages(extraction, ["x", "y"], turn, reference_categories=("extraction",))
        assert "-ref" in prompt.name and extraction.reference[0] in messages[1]["content"]
    coding_without = Question(5, "coding", ("Write fizzbuzz.", "In C."))  # a needing category, but no reference
    assert single_messages(coding_without, ["x", "y"], 2)[0].name == "camelid-single-turn2-v1"


def test_pair_messages_swap_exactly_the_answers():
    question = Question(1, "writing", ("Say hi.",))
    _, first = pair_messages(question, ["hello"], ["hey"], 1)
    _, second = pair_messages(question, ["hey"], ["hello"], 1)
    assert first[0] == second[0]
    assert first[1]["content"].replace("hello", "@").replace("hey", "hello").replace("@", "hey") == second[1]["content"]


# -- verdicts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rating", [
    ("Good answer.\nRating: [[7]]", 7),
    ("Rating: [[7.5]]", 7.5),
    ("[[ 9 ]]", 9),
    ("Rating: [[6/10]]", 6),
    ("**Rating:** [[10]]", 10),
    ("Rating: [[N]] is the format. Accurate and clear.\nRating: [[8]]", 8),
    ("At first I thought [[3]], but on reflection: Rating: [[6]]", 6),  # the last verdict wins
    ("Rating: [4]", 4),  # single brackets after the word "rating"
    ("**Rating**: 5/10", 5),
    ("Rating: [[11]]", None),  # out of range
    ("Rating: [[0]]", None),
    ("[[8]] then [[12]]", 8),  # the last one in range
    ("This answer is a solid 7 out of 10.", None),  # no verdict in the asked form
    ("Rating: [[seven]]", None),
    ("See reference [1] and [[A]].", None),
    ("", None),
])
def test_ratings_are_read_forgivingly(text, rating):
    found = parse_rating(text)
    assert found == rating and type(found) is type(rating)


@pytest.mark.parametrize("text, verdict", [
    ("A explains more.\n[[A]]", "A"),
    ("[[B]]", "B"),
    ("They are equal. [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ("[[ A ]]", "A"),
    ("The format is [[A]], [[B]] or [[C]]. B is clearer.\n\n[[B]]", "B"),  # the last verdict wins
    ("Final verdict: [A]", "A"),
    ("Assistant A is better.", None),
    ("[[D]]", None),
    ("[[a]]", None),
    ("", None),
])
def test_pair_verdicts_are_read_forgivingly(text, verdict):
    assert parse_pair_verdict(text) == verdict


def test_a_reply_without_a_verdict_gets_one_reminder(tmp_path, questions, answers):
    def forgetful(body, index):
        """The first turn's judgment gives its rating when reminded, the second's never does."""
        second_turn = "<conversation>" in body["messages"][1]["content"]
        if body["messages"][-1]["role"] == "user" and len(body["messages"]) > 2:  # the reminder
            return completion("Still no idea." if second_turn else "[[6]]")
        return completion("No idea." if second_turn else "Nice answer, I like it.")

    out = tmp_path / "single.jsonl"
    with FakeTeacher(forgetful) as fake:
        report = judge(questions[:1], answers, out, client=client_for(fake), models=["alpha"], progress=False)
    assert len(fake.requests) == 4
    first_turn = [r["messages"] for r in fake.requests if "<conversation>" not in r["messages"][1]["content"]]
    asked, reminded = sorted(first_turn, key=len)
    assert reminded[:2] == asked
    assert reminded[2:] == [{"role": "assistant", "content": "Nice answer, I like it."},
                            {"role": "user", "content": REMINDERS["rating"]}]
    first, second = read_jsonl(out)
    assert first["score"] == 6 and first["judgment"] == "Nice answer, I like it." + REMINDER_JOIN + "[[6]]"
    assert second["score"] == -1 and second["judgment"] == "No idea." + REMINDER_JOIN + "Still no idea."
    facts = report.facts
    assert (facts["reminders"], facts["verdicts_after_reminder"], facts["parse_failures"]) == (2, 1, 1)
    assert facts["in_file_without_verdict"] == 1


def test_without_reminders_a_missing_verdict_is_a_parse_failure(tmp_path, questions, answers):
    out = tmp_path / "pair.jsonl"
    with FakeTeacher(lambda body, index: completion("Hard to say.")) as fake:
        report = judge(questions[:1], answers, out, client=client_for(fake), mode="pairwise-baseline",
                       baseline="beta", models=["alpha"], reminder=False, progress=False)
    assert len(fake.requests) == 4  # two turns, two orders, no reminders
    assert all((r["g1_winner"], r["g2_winner"]) == ("error", "error") for r in read_jsonl(out))
    assert report.facts["parse_failures"] == 4 and report.facts["battles"] == 0
    assert read_battles(battles_path(out)) == ([], [])


# -- cache, resume, retries, cost ------------------------------------------------------------------------------


def test_the_cache_answers_a_second_run_without_a_request(tmp_path, questions, answers):
    shared = tmp_path / "judge-cache.jsonl"
    with FakeTeacher(fair_judge) as fake:
        judge(questions, answers, tmp_path / "one.jsonl", client=client_for(fake), mode="pairwise-all", cache=shared,
              progress=False)
        asked = len(fake.requests)
        report = judge(questions, answers, tmp_path / "two.jsonl", client=client_for(fake), mode="pairwise-all",
                       cache=shared, progress=False)
    assert asked == 24 and len(fake.requests) == asked
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "two.battles.jsonl").read_bytes() == (tmp_path / "one.battles.jsonl").read_bytes()
    assert report.facts["cached_replies"] == 24 and report.facts["requests"] == 0 and report.facts["cost_usd"] == 0


def test_the_default_cache_lives_beside_the_output_and_keys_on_the_sampling(tmp_path, questions, answers):
    out = tmp_path / "single.jsonl"
    with FakeTeacher(fair_judge) as fake:
        judge(questions, answers, out, client=client_for(fake), progress=False)
        before = out.read_bytes()
        out.unlink()
        judge(questions, answers, out, client=client_for(fake), progress=False)
        assert len(fake.requests) == 12 and out.read_bytes() == before
        cache = read_jsonl(tmp_path / "single.jsonl.cache.jsonl")
        assert len(cache) == 12
        key = cache_key("judge-model", fake.requests[0]["messages"], {"temperature": 0.0, "max_tokens": 1024})
        assert key in {entry["key"] for entry in cache}
        judge(questions, answers, tmp_path / "longer.jsonl", client=client_for(fake), max_tokens=2048, progress=False)
        assert len(fake.requests) == 24  # other sampling, another judgment
        judge(questions, answers, tmp_path / "uncached.jsonl", client=client_for(fake), cache=False, progress=False)
        assert len(fake.requests) == 36 and not (tmp_path / "uncached.jsonl.cache.jsonl").exists()


def test_identical_requests_in_flight_are_sent_once(tmp_path, questions):
    folder = tmp_path / "answers"
    folder.mkdir()
    for model in ("twin-1", "twin-2"):
        record = {"question_id": 81, "model_id": model, "choices": [{"index": 0, "turns": ["Same.", "Same again."]}]}
        (folder / f"{model}.jsonl").write_text(json.dumps(record) + "\n")
    with FakeTeacher(lambda body, index: completion("[[5]]", delay=0.05)) as fake:
        judge(questions[:1], folder, tmp_path / "out.jsonl", client=client_for(fake, concurrency=4), progress=False)
    assert len(fake.requests) == 2  # one per turn, for both models
    assert [(r["model"], r["turn"], r["score"]) for r in read_jsonl(tmp_path / "out.jsonl")] == [
        ("twin-1", 1, 5), ("twin-1", 2, 5), ("twin-2", 1, 5), ("twin-2", 2, 5)]


def test_a_stopped_run_resumes_without_asking_again(tmp_path, questions, answers):
    out = tmp_path / "single.jsonl"

    def breaks_on_gamma(body, index):
        return error(500) if "gamma" in body["messages"][1]["content"] else fair_judge(body, index)

    with FakeTeacher(breaks_on_gamma) as fake, pytest.raises(TeacherError, match="HTTP 500"):
        judge(questions, answers, out, client=client_for(fake, concurrency=1), cache=False, progress=False)
    done = {(r["question_id"], r["model"], r["turn"]) for r in read_jsonl(out)}
    assert done and all(model != "gamma" for _, model, _ in done)
    with FakeTeacher(fair_judge) as fake:
        report = judge(questions, answers, out, client=client_for(fake), cache=False, progress=False)
    assert len(fake.requests) == 12 - len(done) and report.facts["resumed"] == len(done)
    final = read_jsonl(out)
    assert len(final) == 12 and len({(r["question_id"], r["model"], r["turn"]) for r in final}) == 12
    assert [r["score"] for r in final if r["question_id"] == 81 and r["turn"] == 1] == [8, 5, 3]


def test_skip_goes_on_past_a_failed_judgment(tmp_path, questions, answers):
    def refuses_gamma(body, index):
        return error(400, "too long") if "gamma" in body["messages"][1]["content"] else fair_judge(body, index)

    with FakeTeacher(refuses_gamma) as fake:
        report = judge(questions, answers, tmp_path / "s.jsonl", client=client_for(fake), on_error="skip",
                       progress=False)
    assert report.facts["failed_judgments"] == 4 and report.written == 8
    assert {r["model"] for r in read_jsonl(tmp_path / "s.jsonl")} == {"alpha", "beta"}


def test_retries_then_success_and_the_cost_of_every_request(tmp_path, questions, answers):
    script = in_order(error(429, retry_after=0), error(500), completion("Rating: [[4]] fine"))
    with FakeTeacher(script) as fake:
        client = client_for(fake, retries=2, concurrency=1, price_in=2.0, price_out=10.0)
        report = judge(questions[:1], answers, tmp_path / "s.jsonl", client=client, models=["beta"], progress=False)
    assert [r["score"] for r in read_jsonl(tmp_path / "s.jsonl")] == [4, 4]
    assert len(fake.requests) == 4 and report.facts["retries"] == 2 and report.facts["requests"] == 2
    answered = fake.requests[2:]
    prompt_tokens = sum(prompt_words(r) for r in answered)
    assert report.facts["prompt_tokens"] == prompt_tokens and report.facts["completion_tokens"] == 2 * 3
    assert report.facts["cost_usd"] == round((prompt_tokens * 2.0 + 6 * 10.0) / 1e6, 6) > 0
    saved = json.loads((tmp_path / "s.jsonl.report.json").read_text())
    assert saved["cost_usd"] == report.facts["cost_usd"] and saved["pipeline"] == "judge"


def test_requests_run_concurrently_up_to_the_client_limit(tmp_path, questions, answers):
    with FakeTeacher(lambda body, index: completion("[[5]]", delay=0.1)) as fake:
        judge(questions, answers, tmp_path / "s.jsonl", client=client_for(fake, concurrency=3), progress=False)
    assert fake.max_in_flight == 3 and len(fake.requests) == 12


# -- what is judged and what is refused ------------------------------------------------------------------------


def test_missing_answers_are_counted_and_unanswered_questions_left_out(tmp_path, questions):
    folder = tmp_path / "answers"
    folder.mkdir()
    rows = [{"question_id": 81, "model_id": "short", "choices": [{"index": 0, "turns": ["Only one turn."]}]},
            {"question_id": 81, "model_id": "full", "choices": [{"index": 0, "turns": ["One.", "Two."]}]}]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeTeacher(lambda body, index: completion("[[5]]")) as fake:
        report = judge(questions, folder, tmp_path / "s.jsonl", client=client_for(fake), progress=False)
    assert [(r["question_id"], r["model"], r["turn"]) for r in read_jsonl(tmp_path / "s.jsonl")] == [
        (81, "full", 1), (81, "full", 2), (81, "short", 1)]  # nobody answered 111: not asked, not missing
    assert report.facts["missing_answers"] == 1  # short's second turn
    with FakeTeacher(lambda body, index: completion("[[5]]")) as fake:
        report = judge(questions, folder, tmp_path / "p.jsonl", client=client_for(fake), mode="pairwise-all",
                       progress=False)
    assert [(r["model_1"], r["model_2"], r["turn"]) for r in read_jsonl(tmp_path / "p.jsonl")] == [("full", "short", 1)]
    assert report.facts["missing_answers"] == 1


@pytest.mark.parametrize("options, message", [
    ({"mode": "pairs"}, "--mode must be one of single, pairwise-baseline, pairwise-all"),
    ({"mode": "pairwise-baseline"}, "--baseline is needed with --mode pairwise-baseline"),
    ({"baseline": "beta"}, "--baseline is needed with --mode pairwise-baseline, and only there"),
    ({"models": ["delta"]}, "no answers of delta in the answer files"),
    ({"mode": "pairwise-all", "models": ["alpha"]}, "needs the answers of at least two models (got only alpha)"),
    ({"on_error": "ignore"}, "--on-error must be one of stop, skip"),
])
def test_bad_options_are_refused(tmp_path, questions, answers, options, message):
    with FakeTeacher(fair_judge) as fake, pytest.raises(CamelidError, match=re.escape(message)):
        judge(questions, answers, tmp_path / "s.jsonl", client=client_for(fake), progress=False, **options)
    assert fake.requests == []
