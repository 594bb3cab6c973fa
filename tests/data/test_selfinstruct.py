"""camelid data selfinstruct: seed files, the teacher's format, Alpaca's filters, and whole runs with a fake teacher."""

import json
import re
from pathlib import Path

import pytest
from fake_teacher import FakeTeacher, completion, error, in_order, prompt_words, slow
from helpers import read_jsonl, shared_file

from camelid.client import ChatClient, TeacherError
from camelid.data.selfinstruct import (
    SimilarityPool,
    Task,
    build_prompt,
    generate_instructions,
    parse_tasks,
    read_seed_tasks,
    rouge_l,
    rule_broken,
)
from camelid.errors import CamelidError


SEEDS = [
    Task("Give three reasons to learn a second language.", "", "Travel, work and a sharper memory."),
    Task("Translate the sentence into Spanish.", "Good morning", "Buenos días."),
    Task("Is the following number prime or composite?", "21", "Composite, since 21 = 3 x 7."),
    Task("Suggest a healthy snack for the afternoon.", "", "An apple with peanut butter."),
]

# Tasks a teacher might write, each unlike the others and the seeds (checked in test_the_good_tasks_are_distinct).
GOOD = [
    Task("Suggest a name for a bakery that sells only bread.", "", "Crumb and Crust."),
    Task("Convert the temperature from Celsius to Fahrenheit.", "25 degrees Celsius", "77 degrees Fahrenheit."),
    Task("Explain why the sky looks blue during the day.", "", "Air scatters blue light more than red light."),
    Task("Classify this animal as a mammal, bird or reptile.", "Penguin", "Bird."),
    Task("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    Task("List three tips for sleeping better at night.", "", "1. Keep a schedule.\n2. Avoid screens.\n3. Stay cool."),
    Task("Give a synonym for the given word.", "happy", "Joyful."),
    Task("Summarize the story of Romeo and Juliet in one sentence.", "", "Two young lovers from feuding families die."),
    Task("Count the vowels in the word below.", "banana", "3"),
    Task("Recommend a board game for a family with young kids.", "", "Ticket to Ride: First Journey."),
    Task("What is the opposite of the following adjective?", "ancient", "Modern."),
    Task("Compose a haiku about the first snow of winter.", "", "White silence falls\nover fields\nthe year rests."),
]


def task_text(number: int, task: Task) -> str:
    input_ = task.input or "<noinput>"
    return f"Task {number}\nInstruction: {task.instruction}\nInput: {input_}\nOutput: {task.output}\n###"


def reply(*tasks: Task, first: int = 4) -> str:
    return "\n".join(task_text(n, task) for n, task in enumerate(tasks, first))


def kept(path: Path) -> list[Task]:
    return [Task(r["instruction"], r["input"], r["output"]) for r in read_jsonl(path)]


def run(fake: FakeTeacher, out: Path, *, seeds=SEEDS, concurrency: int = 1, retries: int = 0, **options):
    client = ChatClient(fake.base_url, "teacher", concurrency=concurrency, retries=retries, backoff=0.001,
                        price_in=1.0, price_out=3.0)
    options = {"target": 6, "progress": False} | options
    return generate_instructions(client, seeds, out, **options), client


# -- seed tasks ------------------------------------------------------------------------------------------------


def test_the_shared_seed_file_reads_as_175_tasks():
    tasks = read_seed_tasks(shared_file("seed_tasks.jsonl"))
    assert len(tasks) == 175
    assert tasks[1] == Task("What is the relation between the given pairs?", "Night : Day :: Right : Left",
                            "The relation between the given pairs is that they are opposites.")
    assert tasks[0].input == "" and tasks[0].output.startswith("Yes, you can have 1 oatmeal banana protein shake")


def test_alpaca_records_seed_too(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "Add the numbers.", "input": "2, 3", "output": "5", "rouge_l": 0.2}\n\n'
                    '{"instruction": "Say hello.", "output": "Hello!"}\n'
                    '{"instruction": "Name a color.", "input": "<noinput>", "output": "Red."}\n')
    assert read_seed_tasks(path) == [Task("Add the numbers.", "2, 3", "5"), Task("Say hello.", "", "Hello!"),
                                     Task("Name a color.", "", "Red.")]
    path.write_text(json.dumps([{"instruction": "Say hello.", "input": "", "output": "Hello!"}]))
    assert read_seed_tasks(path) == [Task("Say hello.", "", "Hello!")]


@pytest.mark.parametrize("text, message", [
    ('{"instruction": "Fine.", "output": "ok"}\n{"instruction": "Broken", \n',
     "seeds.jsonl:2: invalid JSON (column 27: Expecting property name enclosed in double quotes)"),
    ('["not an object"]', "seeds.jsonl:1: not a JSON object;"),
    ('{"id": "seed_task_0", "instances": [{"input": "", "output": "x"}]}\n',
     "seeds.jsonl:1: 'instruction' is missing;"),
    ('{"instruction": "Do it.", "instances": []}\n', "seeds.jsonl:1: 'instances' is not a non-empty list"),
    ('{"instruction": "Do it.", "instances": [{"input": 3, "output": "x"}]}\n',
     "seeds.jsonl:1: 'input' is not a string;"),
    ('{"instruction": "  ", "output": "x"}\n', "seeds.jsonl:1: empty 'instruction';"),
    ("\n\n", "seeds.jsonl: no tasks in the file;"),
])
def test_bad_seed_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text(text)
    with pytest.raises(CamelidError) as caught:
        read_seed_tasks(path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")
    assert "\n" not in str(caught.value)


def test_a_missing_seed_file(tmp_path):
    with pytest.raises(CamelidError, match=r"nope\.jsonl: no such file$"):
        read_seed_tasks(tmp_path / "nope.jsonl")


# -- the prompt and the parser ---------------------------------------------------------------------------------


def test_the_prompt_shows_numbered_examples_and_asks_for_the_next_numbers():
    prompt = build_prompt(SEEDS[:3], 8)
    assert "Write 8 new tasks, numbered 4 to 11" in prompt
    assert prompt.endswith(reply(*SEEDS[:3], first=1) + "\n")
    assert "Input: <noinput>" in prompt and "Input: Good morning" in prompt


def test_a_well_formed_reply_parses_exactly():
    assert parse_tasks(reply(*GOOD[:4]), 4) == GOOD[:4]


VARIANTS = {
    "alpaca numbering": (
        ("4. Instruction: Name a fruit.\n4. Input: <noinput>\n4. Output: Apple.\n\n"
         "5. Instruction: Double the number.\n5. Input: 4\n5. Output: 8"),
        [Task("Name a fruit.", "", "Apple."), Task("Double the number.", "4", "8")]),
    "parenthesis numbering": (
        "4) Instruction: Name a fruit.\nInput: None\nOutput: Apple.\n5) Instruction: Double it.\nInput: 4\nOutput: 8",
        [Task("Name a fruit.", "", "Apple."), Task("Double it.", "4", "8")]),
    "instruction on the task line": (
        "Task 4: Name a fruit.\nInput: N/A\nOutput: Apple.\n\nTask 5 - Double the number.\nOutput: 8",
        [Task("Name a fruit.", "", "Apple."), Task("Double the number.", "", "8")]),
    "bold and cases": (
        ("**Task 4**\n**Instruction:** Name a fruit.\n**INPUT**: <No Input>\n**output:** Apple.\n"
         "### Task 5\n__Instruction__: Double it.\ninput: 4\nOUTPUT: 8"),
        [Task("Name a fruit.", "", "Apple."), Task("Double it.", "4", "8")]),
    "bare numbers": (
        "4.\nInstruction: Name a fruit.\nOutput: Apple.\n5.\nInstruction: Double it.\nInput: (none)\nOutput: 8",
        [Task("Name a fruit.", "", "Apple."), Task("Double it.", "", "8")]),
    "no numbers at all": (
        "Instruction: Name a fruit.\nOutput: Apple.\n\nInstruction: Double it.\nInput: 4\nOutput: 8",
        [Task("Name a fruit.", "", "Apple."), Task("Double it.", "4", "8")]),
    "chatter around": (
        ("Sure! Here are two new tasks.\n\nTask 4\nInstruction: Name a fruit.\nInput: <noinput>\nOutput: Apple.\n###\n"
         "Task 5\nInstruction: Double it.\nInput: 4\nOutput: 8\n###\nI hope these tasks are useful!"),
        [Task("Name a fruit.", "", "Apple."), Task("Double it.", "4", "8")]),
    "numbered lists inside outputs": (
        ("Task 4\nInstruction: List three fruits.\nInput: <noinput>\nOutput:\n1. Apple\n2. Pear\n3. Plum\n"
         "4. Fig\n5. Kiwi\n"
         "5. Double the number.\nInput: 4\nOutput: 8"),
        [Task("List three fruits.", "", "1. Apple\n2. Pear\n3. Plum\n4. Fig\n5. Kiwi"),
         Task("Double the number.", "4", "8")]),
    "restarted numbering": (
        "1. Name a fruit.\nInput: <noinput>\nOutput: Apple.\n2. Double the number.\nInput: 4\nOutput: 8",
        [Task("Name a fruit.", "", "Apple."), Task("Double the number.", "4", "8")]),
    "as SmolLM2-135M writes": (  # from a real reply: a title on the task line, "Instructions:", restarted numbers
        ("Task 1: Verify if the claim is true.\nInstructions: Verify if the user is satisfied.\n"
         "Input: I don't believe it.\nOutput: Dissatisfied.\n\nTask 2: Find the misspelling.\n"
         "Instructions: Find the misspelled word.\nOutput: Today's\n\nThese are only examples."),
        [Task("Verify if the user is satisfied.", "I don't believe it.", "Dissatisfied."),
         Task("Find the misspelled word.", "", "Today's\n\nThese are only examples.")]),
    "multi-line fields": (
        "Task 4\nInstruction:\nFix the grammar.\nInput:\nhe go\nto school\nOutput:\nHe goes\nto school.\n",
        [Task("Fix the grammar.", "he go\nto school", "He goes\nto school.")]),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_parse_variants(name):
    text, tasks = VARIANTS[name]
    assert parse_tasks(text, 4) == tasks


@pytest.mark.parametrize("text", ["", "I am sorry, I cannot do that.", "4.5 kg of flour\n12) maybe",
                                  "<html>upstream error</html>", "###\n---\n"])
def test_garbage_gives_no_tasks(text):
    assert parse_tasks(text, 4) == []


def test_a_cut_off_reply_still_parses_its_last_task():
    """Only the run knows the reply was cut (finish_reason "length"); it drops the last task, tested below."""
    text = reply(*GOOD[:2]) + "\nTask 6\nInstruction: Explain how a rainbow"
    assert parse_tasks(text, 4) == [*GOOD[:2], Task("Explain how a rainbow")]


# -- the filters -----------------------------------------------------------------------------------------------


def good(instruction: str, output: str = "An answer.") -> Task:
    return Task(instruction, "", output)


@pytest.mark.parametrize("task, rule", [
    (good("Name two."), "instruction under 3 words"),
    (good(""), "no instruction"),
    (good("Name two oceans."), None),
    (good("Describe " + "very " * 149 + "slowly."), "instruction over 150 words"),
    (good("Describe " + "very " * 148 + "slowly."), None),
    (good("Describe the picture of a sunset."), "blacklisted word"),
    (good("Tell me how to go to the station."), "blacklisted word"),
    (good("Plot the sales of last year."), "blacklisted word"),
    (good("Create a FLOWCHART for making tea."), "blacklisted word"),
    (good("Describe the imagery in this poem."), None),  # "image" only inside a word
    (good("Summarize the plotline of the novel."), None),
    (good("Explain what a user profile is."), None),
    (good("Write a program that prints ten primes."), "starts with 'Write a program'"),
    (good("Write a poem about programs."), None),
    (good("Write a Python function that adds numbers."), None),
    (good('"Hello" is a greeting; explain its origin.'), "starts with punctuation"),
    (good("- Give three tips for cooking rice."), "starts with punctuation"),
    (good("Quote this sentence properly please."), None),
    (good("Ébauchez a note to a neighbour."), "starts with non-ASCII"),
    (good("¿Qué hora es? Translate this."), "starts with non-ASCII"),
    (good("Explain the word café to a child."), None),
    (good("Tell me a joke about penguins.", ""), "empty output"),
    (good("Tell me a joke about penguins.", "  \n"), "empty output"),
    (good("Tell me how many legs a penguin has.", "2"), None),
    (good("Draw.", ""), "instruction under 3 words"),  # the first rule broken is the one counted
])
def test_filter_rules(task, rule):
    assert rule_broken(task) == rule


def reference_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def reference_rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 from a plain dynamic-programming LCS."""
    x, y = reference_tokens(a), reference_tokens(b)
    if not x or not y:
        return 0.0
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(len(x)):
        for j in range(len(y)):
            table[i + 1][j + 1] = table[i][j] + 1 if x[i] == y[j] else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    precision, recall = lcs / len(y), lcs / len(x)
    return 2 * precision * recall / (precision + recall) if lcs else 0.0


PAIRS = [
    ("Give three reasons to learn a language.", "Give three reasons to learn a second language today."),
    ("What is the capital of France?", "what IS the capital of france"),
    ("Sort the list in ascending order.", "Order the list: sort it, ascending!"),
    ("the cat the cat the cat", "cat the dog the cat"),
    ("Explain photosynthesis.", "Name three rivers in Africa."),
    ("Ünïcode-only wörds here", "unicode only words here"),
    ("!!!", "Anything at all."),
    ("a b c d e f g", "g f e d c b a"),
]


@pytest.mark.parametrize("a, b", PAIRS)
def test_rouge_l_equals_a_dynamic_programming_reference(a, b):
    assert rouge_l(a, b) == pytest.approx(reference_rouge_l(a, b), abs=1e-12)


def test_rouge_l_equals_rouge_score():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    for a, b in PAIRS:
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)


def test_the_pool_finds_the_most_similar_instruction():
    pool = SimilarityPool(b for _, b in PAIRS)
    for query, _ in PAIRS[:5]:
        best = max(pool.texts, key=lambda text: reference_rouge_l(query, text))
        text, score = pool.most_similar(query)
        assert (text, score) == (best, pytest.approx(reference_rouge_l(query, best), abs=1e-12))
    assert SimilarityPool().most_similar("anything here") == (None, 0.0)
    assert pool.most_similar("???") == (None, 0.0)


def test_the_good_tasks_are_distinct():
    """The end-to-end tests count on every GOOD task being kept: none is near another or a seed."""
    texts = [t.instruction for t in SEEDS + GOOD]
    assert max(rouge_l(a, b) for i, a in enumerate(texts) for b in texts[i + 1 :]) < 0.5
    assert all(rule_broken(task) is None for task in GOOD)


# -- whole runs ------------------------------------------------------------------------------------------------

NEAR_SEED = Task("Give three good reasons to learn a second language.", "", "Fun.")  # ~0.93 against SEEDS[0]
NEAR_GOOD0 = Task("Suggest a good name for a bakery that sells only bread.", "", "Loaf Story.")  # ~0.95 to GOOD[0]
BREAKING = [  # one task breaking each rule, in the order of the rules
    Task("Be brief.", "", "Ok."),
    Task("Describe " + "very " * 150 + "slowly.", "", "Ok."),
    Task("Describe the picture of a sunset over the sea.", "", "Orange."),
    Task("Write a program that prints the first ten primes.", "", "print(...)"),
    Task('"Hello" is a greeting; explain where it comes from.', "", "Old English."),
    Task("Ébauchez a short note to a neighbour.", "", "Bonjour."),
    Task("Tell me a joke about penguins.", "", ""),
]
EVERY_RULE = {
    "instruction under 3 words": 1, "instruction over 150 words": 1, "blacklisted word": 1,
    "starts with 'Write a program'": 1, "starts with punctuation": 1, "starts with non-ASCII": 1, "empty output": 1,
}


def test_a_run_keeps_exactly_the_good_tasks_and_counts_every_rule(tmp_path):
    replies = [
        completion("Here you go!\n\n" + reply(GOOD[0], *BREAKING[:4], NEAR_SEED, GOOD[1], *BREAKING[4:], NEAR_GOOD0)),
        completion("I'm sorry, I can only chat."),
        completion(reply(GOOD[2], GOOD[3]) + "\nTask 6\nInstruction: Explain how a rainbow forms.\nInput: <noinput>\n"
                   "Output: Sunlight bends in raindrops and", "length"),
        completion(reply(GOOD[4], GOOD[5], GOOD[6], GOOD[7])),
    ]
    out = tmp_path / "data" / "selfinstruct.jsonl"
    with FakeTeacher(in_order(*replies)) as fake:
        report, _client = run(fake, out, target=6, per_request=5)
    assert kept(out) == GOOD[:6]
    assert report.dropped == {**EVERY_RULE, "near-duplicate (ROUGE-L)": 2, "reply without tasks": 1,
                              "cut off at max_tokens": 1, "beyond target": 2}
    assert (report.read, report.written) == (11 + 0 + 3 + 4, 6)
    first = read_jsonl(out)[0]
    assert first["most_similar"] == SEEDS[3].instruction  # "Suggest a healthy snack..."
    assert first["rouge_l"] == round(reference_rouge_l(GOOD[0].instruction, SEEDS[3].instruction), 4)

    assert len(fake.requests) == 4
    prompt_tokens = sum(prompt_words(body) for body in fake.requests)
    completion_tokens = sum(r.body["usage"]["completion_tokens"] for r in replies)
    facts = report.facts
    assert {k: facts[k] for k in ("seed_tasks", "target", "resumed", "in_file", "requests", "retries",
                                  "failed_requests", "prompt_tokens", "completion_tokens")} == {
        "seed_tasks": 4, "target": 6, "resumed": 0, "in_file": 6, "requests": 4, "retries": 0, "failed_requests": 0,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    assert facts["cost_usd"] == round((prompt_tokens * 1.0 + completion_tokens * 3.0) / 1e6, 6)
    saved = json.loads(out.with_name("selfinstruct.jsonl.report.json").read_text())
    assert saved["written"] == 6 and saved["dropped"]["near-duplicate (ROUGE-L)"] == 2
    assert "near-duplicate (ROUGE-L)" in out.with_name("selfinstruct.jsonl.report.txt").read_text()


def test_prompts_show_seed_tasks_then_machine_tasks(tmp_path):
    replies = [completion(reply(GOOD[0], GOOD[1])), completion(reply(GOOD[2])), completion(reply(GOOD[3]))]
    with FakeTeacher(in_order(*replies)) as fake:
        run(fake, tmp_path / "out.jsonl", target=4, per_request=2, seed=7, temperature=0.9, top_p=0.8,
            max_tokens=300)
    prompts = [body["messages"][0]["content"] for body in fake.requests]
    shown_seeds = [sum(t.instruction in p for t in SEEDS) for p in prompts]
    shown_kept = [sum(t.instruction in p for t in GOOD) for p in prompts]
    assert (shown_seeds, shown_kept) == ([3, 2, 2], [0, 1, 1])
    assert prompts[1].count("Instruction: ") == 3 and "Write 2 new tasks, numbered 4 to 5" in prompts[1]
    body = fake.requests[0]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (
        "teacher", 0.9, 0.8, 300, ["Task 6"])
    assert len({b["seed"] for b in fake.requests}) == 3


def test_the_same_seed_sends_the_same_prompts(tmp_path):
    def prompts(out):
        with FakeTeacher(in_order(completion(reply(GOOD[0])), completion(reply(GOOD[1])))) as fake:
            run(fake, out, target=2, seed=3)
        return [body["messages"][0]["content"] for body in fake.requests]

    assert prompts(tmp_path / "a.jsonl") == prompts(tmp_path / "b.jsonl")


def test_duplicates_within_one_reply_are_caught(tmp_path):
    twin = Task("Explain why the sky looks so blue during the day.", "", "Scattering.")
    with FakeTeacher(in_order(completion(reply(GOOD[2], twin, GOOD[4])))) as fake:
        report, _ = run(fake, tmp_path / "out.jsonl", target=2)
    assert kept(tmp_path / "out.jsonl") == [GOOD[2], GOOD[4]]
    assert report.dropped == {"near-duplicate (ROUGE-L)": 1}


def test_a_lower_threshold_drops_more(tmp_path):
    loose = Task("Explain why the grass looks green in the summer.", "", "Chlorophyll.")  # 0.56 to GOOD[2]
    assert 0.5 < rouge_l(loose.instruction, GOOD[2].instruction) < 0.7
    for threshold, expected in ((0.7, [GOOD[2], loose]), (0.5, [GOOD[2], GOOD[3]])):
        out = tmp_path / f"{threshold}.jsonl"
        with FakeTeacher(in_order(completion(reply(GOOD[2], loose, GOOD[3])))) as fake:
            run(fake, out, target=2, rouge_threshold=threshold)
        assert kept(out) == expected


def test_a_similarity_of_exactly_the_threshold_is_a_near_duplicate(tmp_path):
    edge = Task("Suggest a name for a shop that sells fresh fish.", "", "Hook, Line and Sinker.")
    assert rouge_l(edge.instruction, GOOD[0].instruction) == 0.7  # 2 * 7 / (10 + 10)
    for threshold, expected in ((0.7, [GOOD[0], GOOD[2]]), (0.71, [GOOD[0], edge])):
        out = tmp_path / f"{threshold}.jsonl"
        with FakeTeacher(in_order(completion(reply(GOOD[0], edge, GOOD[2])))) as fake:
            run(fake, out, target=2, rouge_threshold=threshold)
        assert kept(out) == expected
    assert read_jsonl(out)[1]["most_similar"] == GOOD[0].instruction and read_jsonl(out)[1]["rouge_l"] == 0.7


def test_requests_run_concurrently_up_to_the_client_limit(tmp_path):
    def respond(body, index):
        return slow(completion(reply(GOOD[index % len(GOOD)])), 0.1)

    with FakeTeacher(respond) as fake:
        report, _ = run(fake, tmp_path / "out.jsonl", target=8, concurrency=4)
    instructions = [t.instruction for t in kept(tmp_path / "out.jsonl")]
    assert len(instructions) == 8 == len(set(instructions)) and report.written == 8
    assert fake.max_in_flight == 4


# -- stopping and resuming -------------------------------------------------------------------------------------


def test_a_failed_run_resumes_without_losing_or_repeating_anything(tmp_path):
    out = tmp_path / "out.jsonl"
    first = in_order(completion(reply(GOOD[0], GOOD[1])), completion(reply(GOOD[2], GOOD[3])), error(500, "boom"))
    with FakeTeacher(first) as fake, pytest.raises(TeacherError, match=r"HTTP 500 \(boom\)"):
        run(fake, out, target=6)
    before = out.read_bytes()
    assert kept(out) == GOOD[:4]
    saved = json.loads(out.with_name("out.jsonl.report.json").read_text())
    assert saved["written"] == 4 and "HTTP 500 (boom)" in saved["stopped"]

    again = in_order(completion(reply(GOOD[1], GOOD[4], GOOD[0], GOOD[5], GOOD[6])))  # two repeat the first run
    with FakeTeacher(again) as fake:
        report, _ = run(fake, out, target=6)
    assert out.read_bytes().startswith(before)
    assert kept(out) == GOOD[:6]
    assert report.dropped == {"near-duplicate (ROUGE-L)": 2, "beyond target": 1}
    assert (report.written, report.facts["resumed"], report.facts["in_file"]) == (2, 4, 6)
    assert sum(t.instruction in fake.requests[0]["messages"][0]["content"] for t in GOOD[:4]) == 1  # shown again


def test_a_torn_last_line_is_cut_off_and_reported(tmp_path):
    out = tmp_path / "out.jsonl"
    with FakeTeacher(in_order(completion(reply(GOOD[0], GOOD[1])))) as fake:
        run(fake, out, target=2)
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"instruction": "Half writ')
    with FakeTeacher(in_order(completion(reply(GOOD[1], GOOD[2], GOOD[3])))) as fake:
        report, _ = run(fake, out, target=3)
    assert out.read_bytes().startswith(whole)
    assert kept(out) == GOOD[:3]
    assert report.facts["torn_line_removed"] == f"{out}:3"
    assert report.dropped == {"near-duplicate (ROUGE-L)": 1, "beyond target": 1}


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    line = json.dumps({"instruction": GOOD[0].instruction, "input": "", "output": GOOD[0].output})
    out.write_text(line)
    with FakeTeacher(in_order(completion(reply(GOOD[0], GOOD[1])))) as fake:
        report, _ = run(fake, out, target=2)
    assert out.read_text().startswith(line + "\n")
    assert kept(out) == GOOD[:2] and "torn_line_removed" not in report.facts


def test_a_file_already_at_target_asks_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with FakeTeacher(in_order(completion(reply(GOOD[0], GOOD[1], GOOD[2])))) as fake:
        run(fake, out, target=3)
    before = out.read_bytes()
    with FakeTeacher(in_order(completion(reply(GOOD[4])))) as fake:
        report, _ = run(fake, out, target=2)
    assert fake.requests == [] and out.read_bytes() == before
    assert (report.written, report.facts["resumed"], report.facts["requests"]) == (0, 3, 0)


def test_totals_carry_over_every_run_that_wrote_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    saved = out.with_name("out.jsonl.report.json")
    first = in_order(completion(reply(GOOD[0], NEAR_SEED)), completion(reply(GOOD[1])), error(500, "boom"))
    with FakeTeacher(first) as fake, pytest.raises(TeacherError):
        run(fake, out, target=6)
    one = json.loads(saved.read_text())
    assert (one["runs"], one["requests"], one["total_requests"], one["failed_requests"]) == (1, 3, 3, 1)
    assert one["total_cost_usd"] == one["cost_usd"] > 0 and one["total_dropped"] == {"near-duplicate (ROUGE-L)": 1}

    with FakeTeacher(in_order(completion(reply(GOOD[2], BREAKING[0], GOOD[3], GOOD[4], GOOD[5])))) as fake:
        report, _ = run(fake, out, target=6)
    two = report.facts
    assert (two["runs"], two["requests"], two["total_requests"], two["total_failed_requests"]) == (2, 1, 4, 1)
    for key in ("prompt_tokens", "completion_tokens"):
        assert two[f"total_{key}"] == one[key] + two[key]
    assert two["total_cost_usd"] == pytest.approx(one["cost_usd"] + two["cost_usd"], abs=2e-6)
    assert two["total_cost_usd"] == round((two["total_prompt_tokens"] + 3 * two["total_completion_tokens"]) / 1e6, 6)
    assert two["total_dropped"] == {"near-duplicate (ROUGE-L)": 1, "instruction under 3 words": 1}
    assert two["earlier_stops"] == {"run 1": one["stopped"]} and "HTTP 500 (boom)" in one["stopped"]
    assert "stopped" not in two and json.loads(saved.read_text())["total_requests"] == 4

    with FakeTeacher(in_order(completion("never asked"))) as fake:
        report, _ = run(fake, out, target=6)
    three = report.facts
    assert (three["runs"], three["requests"], three["total_requests"]) == (3, 0, 4)
    assert three["total_cost_usd"] == two["total_cost_usd"] and three["earlier_stops"] == {"run 1": one["stopped"]}

    out.unlink()  # starting over: a report without its data file is not carried on
    with FakeTeacher(in_order(completion(reply(GOOD[0])))) as fake:
        report, _ = run(fake, out, target=1)
    assert (report.facts["runs"], report.facts["total_requests"]) == (1, 1) and "earlier_stops" not in report.facts


def test_an_unreadable_earlier_report_is_noted_and_the_totals_start_again(tmp_path):
    out = tmp_path / "out.jsonl"
    with FakeTeacher(in_order(completion(reply(GOOD[0])))) as fake:
        run(fake, out, target=1)
    saved = out.with_name("out.jsonl.report.json")
    saved.write_text("{not json")
    with FakeTeacher(in_order(completion(reply(GOOD[1])))) as fake:
        report, _ = run(fake, out, target=2)
    assert (report.facts["runs"], report.facts["total_requests"]) == (1, 1)
    assert report.facts["earlier_report_unreadable"] == f"{saved}; the totals count from this run"


def test_a_users_file_without_its_final_newline_is_refused_and_left_whole(tmp_path):
    out = tmp_path / "train.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    data = (json.dumps(chat) + "\n" + json.dumps(chat)).encode()
    out.write_bytes(data)
    with pytest.raises(CamelidError) as caught:
        generate_instructions(ChatClient("http://127.0.0.1:1/v1", "m", retries=0), SEEDS, out, target=5,
                              progress=False)
    assert str(caught.value).startswith(f"{out}:1: 'instruction' is missing; not a file this command wrote;")
    assert out.read_bytes() == data


def test_a_seed_file_as_output_is_refused(tmp_path):
    seeds = tmp_path / "seed_tasks.jsonl"
    data = shared_file("seed_tasks.jsonl").read_bytes()
    seeds.write_bytes(data)
    client = ChatClient("http://127.0.0.1:1/v1", "m", retries=0)
    with pytest.raises(CamelidError) as caught:
        generate_instructions(client, SEEDS, seeds, target=200, progress=False)
    assert str(caught.value).startswith(f"{seeds}:1: a seed task ({{instruction, instances}}), not a task record; "
                                        "not a file this command wrote;")
    assert seeds.read_bytes() == data

    alpaca = tmp_path / "alpaca.jsonl"  # one run's output seeding the next: its records are ours in shape
    alpaca.write_text("".join(json.dumps({"instruction": t.instruction, "input": t.input, "output": t.output}) + "\n"
                              for t in SEEDS))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(alpaca)
    for out in (alpaca, tmp_path / "sub" / ".." / "alpaca.jsonl", tmp_path / "link.jsonl"):
        with pytest.raises(CamelidError) as caught:
            generate_instructions(client, alpaca, out, target=10, progress=False)
        assert str(caught.value) == f"{out} is the seed file; write the new tasks to another file"
    assert len(alpaca.read_text().splitlines()) == len(SEEDS)


def test_an_output_that_is_not_ours_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\nnot json\n{"x": 1}\n')
    with pytest.raises(CamelidError, match=rf"^{re.escape(str(out))}:2: invalid JSON \(column 1: Expecting value\)$"):
        generate_instructions(ChatClient("http://127.0.0.1:1/v1", "m"), SEEDS, out, target=5, progress=False)


# -- failures --------------------------------------------------------------------------------------------------


def test_skip_counts_failed_requests_and_goes_on(tmp_path):
    script = in_order(error(500), completion(reply(GOOD[0], GOOD[1])), error(429), completion(reply(GOOD[2], GOOD[3])))
    with FakeTeacher(script) as fake:
        report, _ = run(fake, tmp_path / "out.jsonl", target=4, on_error="skip")
    assert kept(tmp_path / "out.jsonl") == GOOD[:4]
    assert report.dropped == {"request failed": 2}
    assert (report.facts["requests"], report.facts["failed_requests"]) == (4, 2)


def test_skip_gives_up_after_ten_failures_in_a_row(tmp_path):
    script = in_order(completion(reply(GOOD[0])), error(503, "overloaded"))
    with FakeTeacher(script) as fake, pytest.raises(TeacherError) as caught:
        run(fake, tmp_path / "out.jsonl", target=4, on_error="skip", retries=1)
    assert len(fake.requests) == 1 + 10 * 2
    assert str(caught.value).startswith(f"10 requests in a row failed, the last: {fake.base_url}/chat/completions: "
                                        "HTTP 503 (overloaded) after 2 tries;")
    assert kept(tmp_path / "out.jsonl") == GOOD[:1]


@pytest.mark.parametrize("status, fix", [(401, "check --api-key"), (404, "ends in /v1"), (400, "check the parameters")])
def test_skip_still_stops_at_once_when_asking_again_cannot_help(tmp_path, status, fix):
    script = in_order(completion(reply(GOOD[0])), error(status, "no"))
    with FakeTeacher(script) as fake, pytest.raises(TeacherError) as caught:
        run(fake, tmp_path / "out.jsonl", target=4, on_error="skip", retries=3)
    assert len(fake.requests) == 2
    assert str(caught.value).startswith(f"{fake.base_url}/chat/completions: HTTP {status} (no); ")
    assert fix in str(caught.value)
    saved = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert saved["stopped"] == str(caught.value) and "request failed" not in saved["dropped"]


def test_a_teacher_that_never_writes_a_task_ends_the_run(tmp_path):
    with FakeTeacher(in_order(completion("<p>hello</p>"), completion("Hello! How can I help you today?"))) as fake:
        with pytest.raises(CamelidError, match=r"^the teacher's last 25 replies gave no task worth keeping"):
            run(fake, tmp_path / "out.jsonl", target=2)
    assert len(fake.requests) == 25
    saved = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert saved["dropped"] == {"reply without tasks": 25} and saved["requests"] == 25


def test_a_dead_teacher_says_to_start_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=0)
    with pytest.raises(TeacherError, match=r"is the server running\? start it with `camelid serve`"):
        generate_instructions(client, SEEDS, tmp_path / "out.jsonl", target=3, progress=False)
    assert (tmp_path / "out.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["failed_requests"] == 1


@pytest.mark.parametrize("options, message", [
    ({"target": 0}, "--target must be at least 1 (got 0)"),
    ({"per_request": 0}, "--per-request must be at least 1 (got 0)"),
    ({"rouge_threshold": 0.0}, "--rouge-threshold must be above 0 and at most 1 (got 0.0)"),
    ({"rouge_threshold": 1.5}, "--rouge-threshold must be above 0 and at most 1 (got 1.5)"),
    ({"on_error": "retry"}, "--on-error must be one of stop, skip (got 'retry')"),
    ({"seed_tasks": []}, "no seed tasks: pass a seed file of self-instruct tasks or Alpaca records"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    options = {"seed_tasks": SEEDS, "target": 3, "progress": False} | options
    with pytest.raises(CamelidError) as caught:
        generate_instructions(ChatClient("http://127.0.0.1:1/v1", "m"), out=tmp_path / "out.jsonl", **options)
    assert str(caught.value) == message
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unknown_seed_file(tmp_path):
    with pytest.raises(CamelidError, match=r"missing\.jsonl: no such file$"):
        generate_instructions(ChatClient("http://127.0.0.1:1/v1", "m"), tmp_path / "missing.jsonl",
                              tmp_path / "out.jsonl", target=3, progress=False)
