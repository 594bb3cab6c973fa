"""camelid eval answers: FastChat question files, answers from a fake endpoint and from a tiny local model, resume."""

import json

import pytest
from fake_teacher import FakeTeacher, completion, error
from helpers import read_jsonl, shared_file

from camelid.client import ChatClient, TeacherError
from camelid.errors import CamelidError
from camelid.eval.answers import (
    CATEGORY_TEMPERATURES,
    Question,
    generate_answers,
    read_answers,
    read_questions,
    temperature_for,
)


QUESTIONS = [
    Question(1, "writing", ("Write a haiku about rain.", "Now make it about snow.")),
    Question(2, "math", ("What is 2 + 3?", "And times 4?"), ("5", "20")),
    Question(3, "stem", ("Why is the sky blue?",)),
    Question(4, "generic", ("How can I sleep better?",)),
]


def echo(body: dict, index: int):
    """Answers every request with "re: " and the last user message, so a test can tell the answers apart."""
    return completion("  re: " + body["messages"][-1]["content"] + "\n")


def client_for(fake: FakeTeacher, **options) -> ChatClient:
    return ChatClient(fake.base_url, "fake-model", **({"retries": 0, "backoff": 0.001} | options))


# -- question and answer files ---------------------------------------------------------------------------------


def test_the_shared_question_files():
    mt = read_questions(shared_file("mt_bench_question.jsonl"))
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    assert [q.question_id for q in mt] == list(range(81, 161))
    math = [q for q in mt if q.category == "math"]
    assert len(math) == 10 and all(q.reference and len(q.reference) == 2 for q in math)
    assert mt[0].reference is None and mt[0].category == "writing"
    vicuna = read_questions(shared_file("vicuna_bench_question.jsonl"))
    assert len(vicuna) == 80 and all(len(q.turns) == 1 for q in vicuna)


@pytest.mark.parametrize("text, message", [
    ('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2, "turns": "b"}\n',
     "q.jsonl:2: 'turns' is not a non-empty list of strings;"),
    ('{"category": "x", "turns": ["a"]}\n', "q.jsonl:1: 'question_id' is missing;"),
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', "q.jsonl:2: question_id 1 again"),
    ('{"question_id": 1, "turns": ["a"], "reference": "x"}\n', "q.jsonl:1: 'reference' is not a list of strings;"),
    ('{"question_id": 1, "turns": ["a"]\n', "q.jsonl:1: invalid JSON"),
    ("\n", "q.jsonl: no questions in the file;"),
])
def test_bad_question_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(CamelidError) as caught:
        read_questions(path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")
    assert "\n" not in str(caught.value)


def test_answers_are_read_by_model_id_and_duplicates_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"question_id": 1, "model_id": "m1", "choices": [{"index": 0, "turns": ["x", "y"]}]}) + "\n")
    (tmp_path / "named-otherwise.jsonl").write_text(
        json.dumps({"question_id": 1, "model_id": "m2", "choices": [{"index": 0, "turns": ["z"]}]}) + "\n")
    assert read_answers(tmp_path) == {"m1": {1: ["x", "y"]}, "m2": {1: ["z"]}}
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"question_id": 1, "model_id": "m1", "choices": [{"index": 0, "turns": ["w"]}]}) + "\n")
    first = r"\(the first at .*/a\.jsonl:1\)"
    with pytest.raises(CamelidError, match=r"b\.jsonl:1: a second answer of m1 to question 1 " + first):
        read_answers(tmp_path)


# -- temperatures ----------------------------------------------------------------------------------------------


def test_temperatures_are_fastchats_by_category_unless_overridden():
    assert CATEGORY_TEMPERATURES == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                                     "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
                                     "arena-hard": 0.0}
    assert temperature_for("stem") == 0.1 and temperature_for("generic") == 0.7
    assert temperature_for("stem", category_temperatures={"stem": 0.3}) == 0.3
    assert temperature_for("math", category_temperatures={"stem": 0.3}) == 0.0
    assert temperature_for("math", 0.5, {"math": 0.2}) == 0.5


# -- from an endpoint ------------------------------------------------------------------------------------------


def test_endpoint_answers_in_fastchats_schema_with_the_first_answer_in_the_second_request(tmp_path):
    out = tmp_path / "answers" / "fake.jsonl"
    with FakeTeacher(echo) as fake:
        report = generate_answers(QUESTIONS, out, client=client_for(fake, concurrency=3), max_tokens=77, seed=5,
                                  progress=False)
    answers = read_jsonl(out)
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4]  # rewritten in question order at the end
    for answer, question in zip(answers, QUESTIONS):
        # FastChat's keys, and why each turn ended (which FastChat's readers ignore)
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "finish_reasons"}
        assert answer["model_id"] == "fake-model" and isinstance(answer["tstamp"], float)
        assert answer["finish_reasons"] == ["stop"] * len(question.turns)
        assert answer["choices"] == [{"index": 0, "turns": ["re: " + t for t in question.turns]}]
    assert len({a["answer_id"] for a in answers}) == 4

    assert len(fake.requests) == 6
    by_first = {r["messages"][0]["content"]: r for r in fake.requests if len(r["messages"]) == 1}
    second = [r for r in fake.requests if len(r["messages"]) == 3]
    assert {r["messages"][0]["content"] for r in second} == {"Write a haiku about rain.", "What is 2 + 3?"}
    for r in second:
        q1 = r["messages"][0]["content"]
        assert r["messages"][1] == {"role": "assistant", "content": "re: " + q1}  # stripped, as it was written
        assert r["messages"][2]["role"] == "user"
    temperatures = {r["messages"][0]["content"]: r["temperature"] for r in fake.requests}
    assert temperatures == {"Write a haiku about rain.": 0.7, "What is 2 + 3?": 0.0, "Why is the sky blue?": 0.1,
                            "How can I sleep better?": 0.7}
    assert all(r["max_tokens"] == 77 for r in fake.requests)
    assert by_first["What is 2 + 3?"]["seed"] != by_first["Why is the sky blue?"]["seed"]
    assert report.written == 4 and report.facts["requests"] == 6 and report.facts["resumed"] == 0
    assert json.loads((tmp_path / "answers" / "fake.jsonl.report.json").read_text())["written"] == 4


def test_the_same_seed_sends_the_same_seeds_and_overrides_apply(tmp_path):
    seeds = []
    for run in range(2):
        with FakeTeacher(echo) as fake:
            generate_answers(QUESTIONS[:2], tmp_path / f"{run}.jsonl", client=client_for(fake), seed=1,
                             category_temperatures={"writing": 0.2}, system="Be brief.", model_id="mine",
                             progress=False)
        seeds.append(sorted((r["messages"][1]["content"], r["seed"]) for r in fake.requests))
        assert {r["temperature"] for r in fake.requests} == {0.2, 0.0}
        assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in fake.requests)
    assert seeds[0] == seeds[1]
    assert {r["model_id"] for r in read_jsonl(tmp_path / "0.jsonl")} == {"mine"}


def test_one_temperature_for_all_and_a_selection_of_questions(tmp_path):
    with FakeTeacher(echo) as fake:
        generate_answers(QUESTIONS, tmp_path / "a.jsonl", client=client_for(fake), temperature=0.0,
                         question_ids=["4", 2, 3], limit=2, progress=False)
    assert [a["question_id"] for a in read_jsonl(tmp_path / "a.jsonl")] == [2, 3]
    assert {r["temperature"] for r in fake.requests} == {0.0}
    with pytest.raises(CamelidError, match="no question with id 99"):
        generate_answers(QUESTIONS, tmp_path / "b.jsonl", client=client_for(fake), question_ids=[99], progress=False)


def test_resume_skips_answered_questions_and_cuts_a_torn_line(tmp_path):
    out = tmp_path / "a.jsonl"
    done = {"question_id": 2, "answer_id": "x", "model_id": "fake-model",
            "choices": [{"index": 0, "turns": ["earlier", "answers"]}], "tstamp": 1.0}
    out.write_text(json.dumps(done) + "\n" + '{"question_id": 3, "answer_id": "y", "model_id": "fa')
    with FakeTeacher(echo) as fake:
        report = generate_answers(QUESTIONS, out, client=client_for(fake), progress=False)
    asked = {r["messages"][0]["content"] for r in fake.requests}
    assert "What is 2 + 3?" not in asked and len(fake.requests) == 4  # questions 1 (two turns), 3 and 4
    answers = read_jsonl(out)
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4]
    assert answers[1] == done
    assert report.facts["resumed"] == 1 and report.facts["torn_line_removed"] == f"{out}:2"

    with FakeTeacher(echo) as again:
        report = generate_answers(QUESTIONS, out, client=client_for(again), progress=False)
    assert again.requests == [] and report.written == 0 and read_jsonl(out) == answers


def test_a_failed_endpoint_keeps_what_was_answered_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "a.jsonl"

    def flaky(body, index):
        return error(500) if "sky" in body["messages"][-1]["content"] else echo(body, index)

    with FakeTeacher(flaky) as fake, pytest.raises(TeacherError, match="HTTP 500"):
        generate_answers(QUESTIONS, out, client=client_for(fake, concurrency=1), progress=False)
    kept = {a["question_id"] for a in read_jsonl(out)}
    assert 3 not in kept and kept <= {1, 2, 4}
    assert "HTTP 500" in json.loads(out.with_name("a.jsonl.report.json").read_text())["stopped"]
    with FakeTeacher(echo) as fake:
        generate_answers(QUESTIONS, out, client=client_for(fake), progress=False)
    assert [a["question_id"] for a in read_jsonl(out)] == [1, 2, 3, 4]
    assert not any(r["messages"][0]["content"] in {QUESTIONS[i - 1].turns[0] for i in kept} for r in fake.requests)


def test_one_backend_exactly(tmp_path):
    with pytest.raises(CamelidError, match="either a local model or an endpoint"):
        generate_answers(QUESTIONS, tmp_path / "a.jsonl", progress=False)


def test_a_file_of_another_models_answers_is_not_resumed(tmp_path):
    out = tmp_path / "a.jsonl"
    with FakeTeacher(echo) as fake:
        generate_answers(QUESTIONS[:1], out, client=client_for(fake), progress=False)
        with pytest.raises(CamelidError, match="a.jsonl holds answers of fake-model, not other; give each model"):
            generate_answers(QUESTIONS, out, client=client_for(fake), model_id="other", progress=False)
    assert len(fake.requests) == 2


def test_a_file_of_something_else_is_not_resumed(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"instruction": "x", "output": "y"}\n')
    with FakeTeacher(echo) as fake, pytest.raises(CamelidError, match=r"a\.jsonl:1: not an answer record"):
        generate_answers(QUESTIONS, out, client=client_for(fake), progress=False)


# -- from a local model ----------------------------------------------------------------------------------------


def test_greedy_local_answers_equal_generate_turn_by_turn(tmp_path, chatty):
    from camelid.chat import chat_template_for, encode_chat
    from camelid.generate import SamplingParams, generate

    questions = [Question(10, "math", ("What is 2 + 3? Answer in one word.", "And times 4?")),
                 Question(11, "coding", ("Write a Python function that reverses a list.",)),
                 Question(12, "reasoning", ("Tom is taller than Ann. Who is shorter?", "Why?"))]
    out = tmp_path / "local.jsonl"
    report = generate_answers(questions, out, model=chatty, max_tokens=6, batch_size=2, progress=False)
    answers = read_jsonl(out)
    assert [a["model_id"] for a in answers] == ["base"] * 3  # the model directory's name
    assert report.facts["completion_tokens"] == 5 * 6 and report.facts["turns_cut_at_max_tokens"] == 5

    template = chat_template_for(chatty)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    texts = []
    for question, answer in zip(questions, answers):
        conversation, expected = [], []
        for turn in question.turns:  # one question at a time, unbatched
            conversation.append({"role": "user", "content": turn})
            prompt = encode_chat(chatty, template, conversation)
            expected.append(generate(chatty.model, chatty.tokenizer, [prompt], greedy)[0].text.strip())
            conversation.append({"role": "assistant", "content": expected[-1]})
        assert answer["choices"] == [{"index": 0, "turns": expected}]
        texts += expected
    assert all(texts) and len(set(texts)) == len(texts)  # the test could see answers swapped between questions


def test_a_local_model_by_path_resumes_too(tmp_path, tiny_chat_dir):
    out = tmp_path / "local.jsonl"
    questions = [Question(1, "writing", ("Hi!",)), Question(2, "math", ("1 + 1?",))]
    generate_answers(questions[:1], out, model=str(tiny_chat_dir), max_tokens=2, progress=False)
    report = generate_answers(questions, out, model=str(tiny_chat_dir), max_tokens=2, progress=False)
    assert [(a["question_id"], a["model_id"]) for a in read_jsonl(out)] == [(1, "base"), (2, "base")]
    assert report.written == 1 and report.facts["resumed"] == 1


def test_sampled_local_answers_follow_the_seed(tmp_path, chatty):
    questions = [Question(1, "writing", ("Tell me a story about a cat.",))]
    turns = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_answers(questions, tmp_path / f"{name}.jsonl", model=chatty, max_tokens=8, seed=seed,
                         progress=False)
        turns.append(read_jsonl(tmp_path / f"{name}.jsonl")[0]["choices"][0]["turns"])
    assert turns[0] == turns[1] and turns[0] != turns[2]


def test_category_temperatures_are_category_equals_number():
    from camelid.eval.answers import parse_category_temperatures

    assert parse_category_temperatures(["writing=0.7", "math=0", "writing=0.9"]) == {"writing": 0.9, "math": 0.0}
    for bad in ("writing", "=0.7", "writing=warm"):
        with pytest.raises(CamelidError, match=rf"^--category-temperature '{bad}': give CATEGORY=T, e\.g\. writing=0\.7$"):
            parse_category_temperatures([bad])
