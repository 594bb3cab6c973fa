"""Append-only JSONL (files.read_appended): a file is checked whole before a torn last line is cut off."""

import json

import pytest

from camelid.errors import CamelidError
from camelid.files import RESUME_HINT, read_appended


def is_ours(value) -> bool:
    return isinstance(value, dict) and "key" in value


OURS = [{"key": 1, "text": "one"}, {"key": 2, "text": "two"}]
MESSAGES = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2


def lines(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(lines(OURS) + b'{"key": 3, "te')
    assert read_appended(path, is_ours, "a record") == (OURS, f"{path}:3")
    assert path.read_bytes() == lines(OURS)


def test_a_whole_last_line_gets_its_newline(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(lines(OURS[:1]) + json.dumps(OURS[1]).encode())
    assert read_appended(path, is_ours, "a record") == (OURS, None)
    assert path.read_bytes() == lines(OURS)


def test_a_crash_in_the_first_write_leaves_an_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"key": 1, "te')
    assert read_appended(path, is_ours, "a record") == ([], f"{path}:1")
    assert path.read_bytes() == b""


@pytest.mark.parametrize("tail, line", [
    (json.dumps(MESSAGES[0]).encode(), 1),  # a user's file without its final newline: nothing is torn
    (b"", 1),
    (b'{"messages": [{"role": "us', 1),  # torn or not, the lines before it are not ours
])
def test_a_file_of_something_else_is_left_as_it_was(tmp_path, tail, line):
    path = tmp_path / "train.jsonl"
    data = lines(MESSAGES) + tail
    path.write_bytes(data)
    with pytest.raises(CamelidError) as caught:
        read_appended(path, is_ours, "a record")
    assert str(caught.value) == f"{path}:{line}: not a record; {RESUME_HINT}"
    assert path.read_bytes() == data


@pytest.mark.parametrize("tail", [json.dumps(MESSAGES[0]).encode(), b"some text", b"[1, 2"])
def test_a_last_line_that_is_not_ours_is_refused_not_cut(tmp_path, tail):
    path = tmp_path / "out.jsonl"
    data = lines(OURS) + tail
    path.write_bytes(data)
    with pytest.raises(CamelidError, match=rf"out\.jsonl:3: not a record; {RESUME_HINT}$"):
        read_appended(path, is_ours, "a record")
    assert path.read_bytes() == data


def test_convert_checks_every_line_before_anything_is_cut(tmp_path):
    def convert(raw: bytes, where: str):
        value = json.loads(raw)
        if not is_ours(value):
            raise CamelidError(f"{where}: no key")
        return value["key"]

    path = tmp_path / "out.jsonl"
    data = lines(OURS + MESSAGES[:1]) + b'{"key": 4, "te'
    path.write_bytes(data)
    with pytest.raises(CamelidError, match=r"out\.jsonl:3: no key$"):
        read_appended(path, is_ours, "a record", convert=convert)
    assert path.read_bytes() == data
    path.write_bytes(lines(OURS) + b'{"key": 4, "te')
    assert read_appended(path, is_ours, "a record", convert=convert) == ([1, 2], f"{path}:3")


def test_no_file_and_a_directory(tmp_path):
    assert read_appended(tmp_path / "none.jsonl", is_ours, "a record") == ([], None)
    with pytest.raises(CamelidError, match="is a directory; the output is a JSONL file"):
        read_appended(tmp_path, is_ours, "a record")
