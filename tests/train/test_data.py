"""Training data through datasets: the cache is hit by a second run and missed when a file or a setting changes,
the rows are those of the same conversations in memory, errors arrive as camelid's one-line errors, and the
tokenizing workers give what one process gives."""

import json
import os

import pytest

import camelid.train.data as train_data
from camelid.errors import CamelidError
from camelid.train.data import rows_of_conversations, training_rows
from camelid.train.recipe import TrainConfig


def chats(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(offset, offset + n)]


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats(40)))
    return path


def counted_tokenizing(monkeypatch) -> list:
    calls = []
    real = train_data.make_example

    def make_example(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(train_data, "make_example", make_example)
    return calls


def as_lists(rows) -> list:
    return [(r.tokens, r.targets, r.lengths) for r in rows]


def test_a_second_run_hits_the_cache_and_a_change_misses_it(data, monkeypatch, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    cfg = TrainConfig(model="unused", data=[str(data)], out="unused", seq_len=128, eval_fraction=0.1)
    calls = counted_tokenizing(monkeypatch)
    first = training_rows(cfg, template, tokenizer, lambda line: None)
    assert len(calls) == 40
    again = training_rows(cfg, template, tokenizer, lambda line: None)
    assert len(calls) == 40  # nothing tokenized: the cached Arrow file was read
    assert as_lists(again[0]) == as_lists(first[0]) and as_lists(again[1]) == as_lists(first[1])
    # The same conversations in memory give the same rows.
    memory = rows_of_conversations(cfg, template, tokenizer, [c["messages"] for c in chats(40)], lambda line: None)
    assert as_lists(memory[0]) == as_lists(first[0]) and len(calls) == 80  # (memory is not cached)
    # Another seq_len, or the file rewritten, is tokenized again.
    training_rows(TrainConfig(model="u", data=[str(data)], out="u", seq_len=64), template, tokenizer, print)
    assert len(calls) == 120
    data.write_text("".join(json.dumps(c) + "\n" for c in chats(30, offset=5)))
    os.utime(data, ns=(1, 1))
    rows, _ = training_rows(TrainConfig(model="u", data=[str(data)], out="u", seq_len=128), template, tokenizer,
                            print)
    assert len(calls) == 150 and "What is 5 plus 5?" in tokenizer.decode(rows[0].tokens + [
        t for r in rows for t in r.tokens])


def test_workers_give_what_one_process_gives(data, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    one = training_rows(TrainConfig(model="u", data=[str(data)], out="u", seq_len=128, data_workers=1), template,
                        tokenizer, lambda line: None)
    two = rows_of_conversations(TrainConfig(model="u", data=[str(data)], out="u", seq_len=128, data_workers=2),
                                template, tokenizer, [c["messages"] for c in chats(40)], lambda line: None)
    assert as_lists(one[0]) == as_lists(two[0])


def test_errors_are_camelids_one_line_errors(data, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    bad = data.with_name("bad.jsonl")
    bad.write_text(data.read_text() + json.dumps({"question": "x"}) + "\n")
    cfg = TrainConfig(model="u", data=[str(bad)], out="u", seq_len=128)
    with pytest.raises(CamelidError, match=rf"^{bad}:41: unknown format"):
        training_rows(cfg, template, tokenizer, lambda line: None)
    lines = []
    training_rows(TrainConfig(model="u", data=[str(bad)], out="u", seq_len=128, skip_bad=True), template, tokenizer,
                  lines.append)
    assert lines[0] == f"{bad}: 40 records; skipped 1 of 41: 1 unknown format"
