"""`camelid data ...` and `camelid eval ...` as a user runs them: the installed console script in a subprocess.

The libraries behind each verb have their own tests; these check that the flags reach them, that the output
and report land where the help says, and that mistakes are one line and a non-zero exit.
"""

import json
import subprocess
from pathlib import Path

from fake_teacher import FakeTeacher, completion
from helpers import CAMELID, FIXTURES, run_camelid, shared_file, write_jsonl

from camelid.data.formats import read_conversations


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error: "), result.stderr
    return lines[0]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_selfinstruct_writes_the_teachers_tasks_and_its_report(tmp_path):
    SEED_TASKS = shared_file("seed_tasks.jsonl")
    tasks = [
        ("Describe the picture in detail.", "<noinput>", "It shows a cat."),  # a blacklisted word
        ("Name three primary colours.", "<noinput>", "Red, yellow and blue."),
        ("Suggest a name for the bakery described.", "Two sisters bake rye bread.", "Sisters' Rye."),
    ]
    reply = "\n".join(f"Task {i}\nInstruction: {a}\nInput: {b}\nOutput: {c}\n###" for i, (a, b, c) in
                      enumerate(tasks, 4))
    out = tmp_path / "tasks.jsonl"
    with FakeTeacher(lambda body, index: completion(reply)) as teacher:
        result = run_camelid("data", "selfinstruct", "--teacher", teacher.base_url, "--seed-tasks", SEED_TASKS,
                             "-o", out, "--target", 2, "--concurrency", 1, "--temperature", 0.5, "--no-progress",
                             "--price-in", 1.0)
        sent = teacher.requests[0]
    assert result.returncode == 0, result.stderr
    assert sent["temperature"] == 0.5 and sent["model"] == "smollm2-135m-instruct"
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["instruction"], r["input"], r["output"]) for r in written] == [
        ("Name three primary colours.", "", "Red, yellow and blue."),
        ("Suggest a name for the bakery described.", "Two sisters bake rye bread.", "Sisters' Rye."),
    ]
    report = json.loads(out.with_name("tasks.jsonl.report.json").read_text())
    assert report["written"] == 2 and report["dropped"]["blacklisted word"] == 1
    assert "selfinstruct: read 3, wrote 2" in result.stdout


def test_selfinstruct_with_no_teacher_says_how_to_start_one(tmp_path):
    SEED_TASKS = shared_file("seed_tasks.jsonl")
    result = run_camelid("data", "selfinstruct", "--teacher", "http://127.0.0.1:9/v1", "--seed-tasks", SEED_TASKS,
                         "-o", tmp_path / "t.jsonl", "--target", 1, "--retries", 0, "--no-progress")
    assert "camelid serve" in one_error_line(result)


def test_mix_takes_sources_by_count_and_conditions_preference_pairs(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [chat(f"question {i}?", f"answer {i}.") for i in range(6)])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"ask {i}?", "chosen": f"good answer {i}.", "rejected": f"bad answer {i}."} for i in range(3)
    ])
    out = tmp_path / "mix.jsonl"
    result = run_camelid("data", "mix", f"plain={plain}:count=4", f"hh={prefs}:count=6", "-o", out)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["source"] for r in records) == ["hh"] * 6 + ["plain"] * 4
    systems = {r["messages"][0]["content"] for r in records if r["source"] == "hh"}
    assert systems == {"a helpful answer", "an unhelpful answer"}
    assert len(read_conversations(out).records) == 10  # training reads it
    line = one_error_line(run_camelid("data", "mix", f"plain={plain}:count=many", "-o", tmp_path / "bad.jsonl"))
    assert line == (f"camelid: error: source 'plain={plain}:count=many': after the last ':' give weight=W, count=N "
                    "or a weight (e.g. alpaca=alpaca.jsonl:weight=0.3)")


def test_curate_reports_rules_and_writes_what_was_dropped(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        chat("What is the capital of France?", "The capital of France is Paris, on the Seine."),
        chat("Tell me a secret.", "As an AI language model, I cannot share secrets."),
        chat("What is the capital of France?", "The capital of France is Paris, on the Seine."),
        chat("Write an essay about the sea.", "Waves."),
    ])
    out = tmp_path / "out.jsonl"
    result = run_camelid("data", "curate", src, "-o", out, "--write-dropped")
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 1
    report = json.loads(out.with_name("out.jsonl.report.json").read_text())
    assert report["dropped"] == {"refusal": 1, "exact duplicate": 1, "tiny response": 1}
    assert len(out.with_name("out.jsonl.dropped.jsonl").read_text().splitlines()) == 3


def test_stats_counts_tokens_with_the_models_tokenizer(tmp_path, smollm2_gguf):
    from camelid.checkpoint import load_tokenizer_and_template

    records = [chat("Hello there, how are you?", "Fine, thanks."), chat("Name a colour.", "Blue.")]
    src = write_jsonl(tmp_path / "d.jsonl", records)
    png = tmp_path / "h.png"
    result = run_camelid("data", "stats", src, "-m", smollm2_gguf, "--histogram", png, "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    tokenizer, template = load_tokenizer_and_template(smollm2_gguf)
    lengths = sorted(len(tokenizer.encode(template.render(r["messages"]), add_special=False)) for r in records)
    assert facts["conversations"] == 2
    assert json.dumps(facts).count(str(lengths[-1])) >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sharegpt_cut_off_file_needs_recover(tmp_path):
    good = {"id": "a_0", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}
    src = tmp_path / "sg.json"
    src.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good)[:30])
    out = tmp_path / "out"
    line = one_error_line(run_camelid("data", "sharegpt", src, "-o", out, "--no-progress"))
    assert "--recover" in line and "1 complete record" in line
    assert not out.exists()
    result = run_camelid("data", "sharegpt", src, "-o", out, "--recover", "--test-fraction", 0, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert len((out / "train.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "report.json").read_text())["recovered"] == 1


def test_eval_ratings_prints_the_table(tmp_path):
    votes = write_jsonl(tmp_path / "votes.jsonl", [{"model_a": "x", "model_b": "y", "winner": "model_a"}] * 8
                        + [{"model_a": "x", "model_b": "y", "winner": "model_b"}] * 2)
    png = tmp_path / "r.png"
    result = run_camelid("eval", "ratings", votes, "--rounds", 50, "--plot", png)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "x" in rows[0] and "y" in rows[1]
    assert png.is_file()
    assert "bad.jsonl:1: missing 'model_b'" in one_error_line(run_camelid("eval", "ratings", src_missing_field(tmp_path)))


def src_missing_field(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [{"model_a": "x", "winner": "tie"}])


def test_eval_choice_on_the_tiny_model(tmp_path, tiny_chat_dir):
    data = FIXTURES / "choice_questions.jsonl"
    result = run_camelid("eval", "choice", data, "-m", tiny_chat_dir, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "22 questions"


def test_eval_answers_judge_and_report_end_to_end(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now about snow."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2+2?"], "reference": ["4"]},
    ])
    answers = tmp_path / "answers" / "m.jsonl"
    answers.parent.mkdir()
    with FakeTeacher(lambda body, index: completion(f"answer {index}")) as endpoint:
        result = run_camelid("eval", "answers", questions, "-o", answers, "--endpoint", endpoint.base_url,
                             "--endpoint-model", "m", "--no-progress")
        temperatures = sorted(body["temperature"] for body in endpoint.requests)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["question_id"], r["model_id"], len(r["choices"][0]["turns"])) for r in records] == [(1, "m", 2),
                                                                                                  (2, "m", 1)]
    assert temperatures == [0.0, 0.7, 0.7]  # math greedy, writing 0.7 for both turns

    judgments = tmp_path / "judgments.jsonl"
    with FakeTeacher(lambda body, index: completion("Fine work. Rating: [[7]]")) as judge:
        result = run_camelid("eval", "judge", questions, answers.parent, "-o", judgments, "--judge", judge.base_url,
                             "--judge-model", "j", "--no-progress")
        prompts = [body["messages"][-1]["content"] for body in judge.requests]
    assert result.returncode == 0, result.stderr
    assert len(prompts) == 3 and sum("<reference_answer>" in p for p in prompts) == 1
    scores = [json.loads(line)["score"] for line in judgments.read_text().splitlines()]
    assert scores == [7.0, 7.0, 7.0]

    result = run_camelid("eval", "report", judgments, "-o", tmp_path / "report", "--questions", questions)
    assert result.returncode == 0, result.stderr
    assert "| m |" in result.stdout and "7.00" in result.stdout
    assert (tmp_path / "report" / "scores_by_category.png").is_file()


def test_killing_selfinstruct_keeps_the_tasks_and_saves_the_report(tmp_path):
    import signal
    import time

    SEED_TASKS = shared_file("seed_tasks.jsonl")
    good = "Task 4\nInstruction: List two uses of a paperclip.\nInput: <noinput>\nOutput: Holding paper; a hook.\n###"

    def respond(body, index):
        return completion(good, delay=0 if index == 0 else 60)  # the first reply at once, then a hang

    out = tmp_path / "tasks.jsonl"
    with FakeTeacher(respond) as teacher:
        proc = subprocess.Popen([str(CAMELID), "data", "selfinstruct", "--teacher", teacher.base_url, "--seed-tasks",
                                 str(SEED_TASKS), "-o", str(out), "--target", "5", "--concurrency", "1", "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(teacher.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert [json.loads(line)["instruction"] for line in out.read_text().splitlines()] == [
        "List two uses of a paperclip."]
    assert json.loads(out.with_name("tasks.jsonl.report.json").read_text())["stopped"] == "interrupted"


def test_data_verbs_read_a_datasets_folder_split_with_renamed_columns(tmp_path):
    import datasets

    rows = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}, the sum of {i} and {i}."} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "qa"))
    source = f"{tmp_path / 'qa'}:test"
    result = run_camelid("data", "stats", source, "--columns", "instruction=question,output=answer", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["conversations"] == 2 and facts["formats"] == {"alpaca": 2}
    out = tmp_path / "curated.jsonl"
    result = run_camelid("data", "curate", source, "-o", out, "--columns", "instruction=question,output=answer")
    assert result.returncode == 0, result.stderr
    assert [r.messages[0]["content"] for r in read_conversations(out).records] == ["What is 4 + 4?", "What is 5 + 5?"]
    # Without the mapping every record is of no format camelid knows: the first is named, with the count after it.
    result = run_camelid("data", "stats", source)
    assert one_error_line(result) == (
        f"camelid: error: {source}:row 1: unknown format (keys answer, question; give --format (sharegpt-preference, "
        "alpaca-preference, hh-rlhf, preference, ultrafeedback, kto, openai, sharegpt, alpaca, gpt4all) or --columns "
        "KEY=COLUMN), and 1 more bad record after it; fix the record or pass --skip-bad to drop such records")
