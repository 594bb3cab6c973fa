"""Files as people have them before they are JSON text: gzip is read through, other kinds are named as what they
are (with the command that converts them), and --skip-bad that would skip every record refuses instead."""

import gzip
import json

import pytest

from camelid.data.formats import read_conversations
from camelid.errors import CamelidError
from helpers import shared_file

ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(5)]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_gzip_files_read_as_their_text(tmp_path, layout):
    text = "".join(json.dumps(r) + "\n" for r in ALPACA) if layout == "jsonl" else json.dumps(ALPACA)
    plain, packed = tmp_path / "data.jsonl", tmp_path / "data.jsonl.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    read = read_conversations(packed)
    assert [r.messages for r in read.records] == [r.messages for r in read_conversations(plain).records]
    assert len(read.records) == 5 and not read.skipped


def test_a_gzip_file_cut_short_is_named_damaged(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(("".join(json.dumps(r) + "\n" for r in ALPACA) * 200).encode())[:300])
    with pytest.raises(CamelidError, match=rf"^{path}: a damaged gzip file \(.*\); download or compress it again$"):
        read_conversations(path)


def test_the_hh_rlhf_file_is_not_called_not_utf8():
    """The shared Anthropic HH file is gzip-compressed JSONL: its text is read (its format is another matter)."""
    path = shared_file("preference/hh_rlhf_harmless_base_test.jsonl.gz")
    with pytest.raises(CamelidError) as caught:
        read_conversations(path)
    assert "not UTF-8" not in str(caught.value)


@pytest.mark.parametrize("magic, kind", [
    (b"PAR1\x15\x04", "a Parquet file, which camelid does not read yet; write it as JSONL with: "),
    (b"ARROW1\x00\x00", "an Arrow file, which camelid does not read yet; write it as JSONL with: "),
    (b"\xff\xff\xff\xff\x10\x01", "an Arrow stream \\(a datasets shard\\), which camelid does not read yet"),
    (b"\x28\xb5\x2f\xfd\x00", "a zstd-compressed file, which camelid does not read yet; decompress it"),
])
def test_other_kinds_of_file_are_named(tmp_path, magic, kind):
    path = tmp_path / "data.bin"
    path.write_bytes(magic + b"\x00" * 64)
    with pytest.raises(CamelidError, match=rf"^{path}: {kind}") as caught:
        read_conversations(path, skip_bad=True)
    assert "\n" not in str(caught.value)


def test_a_save_to_disk_folder_is_named(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(CamelidError, match=r"a Hugging Face datasets save_to_disk folder, which camelid does not "
                                           r"read yet; write it as JSONL with: "):
        read_conversations(tmp_path / "ds")


def test_skip_bad_that_would_skip_every_record_refuses(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(CamelidError, match=r"data.jsonl: every one of its 3 records was bad \(the first at "
                                           r".*data.jsonl:1: .*\); is the file in a format camelid reads"):
        read_conversations(path, skip_bad=True)


def test_curate_with_skip_bad_writes_nothing_when_every_record_is_bad(tmp_path):
    from camelid.data.curate import curate

    path, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(CamelidError, match=r"every one of its 3 records was bad"):
        curate(path, out, skip_bad=True)
    assert not out.exists()
