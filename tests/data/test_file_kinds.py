"""Sources as people have them: JSON text plain, gzip or zstd; Parquet, Arrow, CSV; save_to_disk folders, Hub-layout
folders with splits, folders of shards, `hf:` names; damaged files named as what they are; --skip-bad that would
skip every record refuses; the first bad record's error counts the others; --columns and --format."""

import gzip
import json

import datasets
import pytest
import zstandard

from camelid.data.formats import Reading, parse_columns, read_conversations
from camelid.errors import CamelidError
from helpers import shared_file

ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(5)]
EXPECTED = [[{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}] for i in range(5)]


def messages_of(source, **kwargs) -> list:
    return [r.messages for r in read_conversations(source, **kwargs).records]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
@pytest.mark.parametrize("compress", [gzip.compress, lambda b: zstandard.ZstdCompressor().compress(b)])
def test_compressed_json_reads_as_its_text(tmp_path, layout, compress):
    text = "".join(json.dumps(r) + "\n" for r in ALPACA) if layout == "jsonl" else json.dumps(ALPACA, indent=1)
    path = tmp_path / "data.jsonl.packed"  # told by its bytes, not its name
    path.write_bytes(compress(text.encode()))
    read = read_conversations(path)
    assert [r.messages for r in read.records] == EXPECTED and not read.skipped
    if layout == "jsonl":  # lines are counted in the decompressed text
        assert [r.where for r in read.records] == [f"{path}:{n}" for n in range(1, 6)]


@pytest.mark.parametrize("suffix, damage", [
    (".gz", lambda packed: packed[:300]),  # cut short
    (".zst", lambda packed: packed[:20] + b"\xff" * 40 + packed[60:]),  # bytes overwritten
])
def test_a_damaged_compressed_file_is_named_as_what_it_is(tmp_path, suffix, damage):
    text = ("".join(json.dumps(r) + "\n" for r in ALPACA) * 200).encode()
    packed = gzip.compress(text) if suffix == ".gz" else zstandard.ZstdCompressor().compress(text)
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(damage(packed))
    kind = "gzip" if suffix == ".gz" else "zstd"
    with pytest.raises(CamelidError, match=rf"^{path}: a damaged {kind} file \(.*\); download or compress it again$"):
        read_conversations(path)


def test_parquet_arrow_and_csv_files(tmp_path):
    ds = datasets.Dataset.from_list(ALPACA)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    shard = next(saved.glob("*.arrow"))  # an Arrow stream, as datasets writes its shards
    for source in (tmp_path / "d.parquet", tmp_path / "d.csv", shard, saved):
        read = read_conversations(source)
        assert [r.messages for r in read.records] == EXPECTED, source
        assert read.records[2].where == f"{source}:row 3"


def test_a_columnar_row_leaves_out_the_columns_it_does_not_fill(tmp_path):
    """Arrow gives every row every column, None where a record had none: None is read as absent, so a source
    mixing formats (here Alpaca rows and OpenAI rows) is read record by record as JSON is."""
    rows = [{"instruction": "Hi", "output": "Hello", "messages": None},
            {"instruction": None, "output": None, "messages": [{"role": "user", "content": "2+2?"},
                                                                {"role": "assistant", "content": "4"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mixed.parquet"))
    read = read_conversations(tmp_path / "mixed.parquet")
    assert [r.format for r in read.records] == ["alpaca", "openai"]
    assert read.records[1].messages[1] == {"role": "assistant", "content": "4"}


def hub_folder(tmp_path):
    """A dataset folder in the Hub's layout: data/{split}-0000N-of-0000M.parquet."""
    folder = tmp_path / "org__name"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ALPACA[:3]).to_parquet(str(folder / "data" / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(ALPACA[3:4]).to_parquet(str(folder / "data" / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(ALPACA[4:]).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def test_a_hub_layout_folder_reads_its_splits(tmp_path):
    folder = hub_folder(tmp_path)
    assert messages_of(folder) == EXPECTED[:4]  # train by default, its shards in order
    assert messages_of(f"{folder}:train") == EXPECTED[:4]
    assert messages_of(f"{folder}:test") == EXPECTED[4:]
    with pytest.raises(CamelidError, match=rf"^{folder}: has no split 'validation'; its splits are train, test"):
        read_conversations(f"{folder}:validation")


def test_a_save_to_disk_dataset_dict_and_a_folder_of_shards(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:2]),
                               "test": datasets.Dataset.from_list(ALPACA[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert messages_of(tmp_path / "dd") == EXPECTED[:2]
    assert messages_of(f"{tmp_path / 'dd'}:test") == EXPECTED[2:]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(5):
        (shards / f"part-{i}.jsonl").write_text(json.dumps(ALPACA[i]) + "\n")
    assert sorted(m[0]["content"] for m in messages_of(shards)) == [f"Say {i}." for i in range(5)]


def test_hf_names_load_through_datasets(tmp_path, monkeypatch):
    """The Hub is not reachable here: `hf:org/name` must reach datasets.load_dataset with that name, and what it
    returns (here the same layout from a local folder) is read like the folder."""
    folder = hub_folder(tmp_path)
    real = datasets.load_dataset
    asked = []

    def load_dataset(name, *args, **kwargs):
        asked.append(name)
        return real(str(folder), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert messages_of("hf:org/name") == EXPECTED[:4]
    assert messages_of("hf:org/name:test") == EXPECTED[4:]
    assert asked == ["org/name", "org/name"]


@pytest.mark.parametrize("magic, kind", [
    (b"PAR1\x15\x04", "a Parquet file that Hugging Face datasets could not read"),
    (b"ARROW1\x00\x00", "an Arrow file that Hugging Face datasets could not read"),
    (b"\xff\xff\xff\xff\x10\x01", "an Arrow file that Hugging Face datasets could not read"),
    (b"PK\x03\x04", "a zip archive, which camelid does not read; unpack it"),
])
def test_damaged_files_of_other_kinds_are_named_never_not_utf8(tmp_path, magic, kind):
    path = tmp_path / "data.bin"
    path.write_bytes(magic + b"\x00" * 64)
    with pytest.raises(CamelidError, match=rf"^{path}: {kind}") as caught:
        read_conversations(path, skip_bad=True)
    assert "\n" not in str(caught.value) and "UTF-8" not in str(caught.value)


def test_a_folder_datasets_cannot_read_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamelidError, match=rf"^{tmp_path / 'empty'}: a folder that Hugging Face datasets could not "
                                           r"read \(") as caught:
        read_conversations(tmp_path / "empty")
    assert "\n" not in str(caught.value)


def test_the_hh_rlhf_file_reads_as_preference_pairs():
    """The shared Anthropic HH file (gzip JSONL, whole transcripts) once read as 'not UTF-8'."""
    path = shared_file("preference/hh_rlhf_harmless_base_test.jsonl.gz")
    with pytest.raises(CamelidError, match=rf"^{path}:87: empty message content \(in 'chosen': message 4\), and 12 "
                                           "more bad records after it; fix the record or pass --skip-bad"):
        read_conversations(path)  # line 87's chosen answer is empty; 9 other pairs have two human turns in a row
    read = read_conversations(path, skip_bad=True)
    assert len(read.records) == 2299
    assert read.skipped_by_reason() == {"turns do not alternate user/assistant": 9, "empty message content": 4}
    assert {r.format for r in read.records} == {"hh-rlhf"}
    pair = read.records[0]
    assert pair.kind == "preference" and pair.rejected["role"] == "assistant"
    assert pair.messages[-1] != pair.rejected and pair.messages[0]["role"] == "user"


def test_skip_bad_that_would_skip_every_record_refuses(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(CamelidError, match=r"data.jsonl: every one of its 3 records was bad \(the first at "
                                           r".*data.jsonl:1: unknown format\); is it in a format camelid reads"):
        read_conversations(path, skip_bad=True)


def test_curate_with_skip_bad_writes_nothing_when_every_record_is_bad(tmp_path):
    from camelid.data.curate import curate

    path, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(CamelidError, match=r"every one of its 3 records was bad"):
        curate(path, out, skip_bad=True)
    assert not out.exists()


def test_the_first_bad_record_says_how_many_follow(tmp_path):
    path = tmp_path / "data.jsonl"
    records = ALPACA[:2] + [{"instruction": "x", "output": ""}] * 3 + ALPACA[2:] + [{"instruction": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(CamelidError) as caught:
        read_conversations(path)
    assert str(caught.value) == (f"{path}:3: empty message content (message 2), and 3 more bad records after it; "
                                 "fix the record or pass --skip-bad to drop such records")
    read = read_conversations(path, skip_bad=True)
    assert read.summary() == "5 records; skipped 4 of 9: 3 empty message content, 1 missing 'output'"


def test_columns_rename_and_format_forces(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Say {i}.", "answer": f"{i}."}) + "\n" for i in range(5)))
    columns = parse_columns("instruction=question,output=answer")
    assert columns == {"instruction": "question", "output": "answer"}
    assert messages_of(path, reading=Reading(columns=columns)) == EXPECTED
    with pytest.raises(CamelidError, match=r":1: no column 'query' \(named in --columns; the record has question, "
                                           r"answer\)"):
        read_conversations(path, reading=Reading(columns={"instruction": "query", "output": "answer"}))
    # A GPT4All-looking record forced as Alpaca needs Alpaca's keys.
    gpt = tmp_path / "g.jsonl"
    gpt.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    assert read_conversations(gpt).records[0].format == "gpt4all"
    with pytest.raises(CamelidError, match=r":1: missing 'instruction' \(format alpaca\)"):
        read_conversations(gpt, reading=Reading(format="alpaca"))
    with pytest.raises(CamelidError, match=r"unknown data format 'alpacca'; the formats: sharegpt-preference, "):
        Reading(format="alpacca")
    with pytest.raises(CamelidError, match=r"--columns 'instruction': give KEY=COLUMN pairs"):
        parse_columns("instruction")


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_bzip2_and_xz_json_read_as_their_text(tmp_path, suffix):
    import bz2
    import lzma

    text = "".join(json.dumps(r) + "\n" for r in ALPACA).encode()
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(bz2.compress(text) if suffix == ".bz2" else lzma.compress(text))
    assert messages_of(path) == EXPECTED


def test_a_tar_archive_is_named_not_read_as_text(tmp_path):
    import tarfile

    inner = tmp_path / "data.jsonl"
    inner.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tar:
        tar.add(inner, arcname="data.jsonl")
    with pytest.raises(CamelidError, match=r"data.tar.gz: a tar archive, which camelid does not read; unpack it"):
        read_conversations(tmp_path / "data.tar.gz", skip_bad=True)


def test_compressed_csv_and_a_csv_that_is_not_utf8(tmp_path):
    ds = datasets.Dataset.from_list(ALPACA)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress((tmp_path / "d.csv").read_bytes()))
    assert messages_of(tmp_path / "d.csv.gz") == EXPECTED
    (tmp_path / "latin.csv").write_bytes("instruction,output\nCaf\xe9?,Oui.\n".encode("latin-1"))
    with pytest.raises(CamelidError, match=r"latin.csv: a CSV file whose header is not UTF-8|latin.csv: a CSV file "
                                           r"that Hugging Face datasets could not read"):
        read_conversations(tmp_path / "latin.csv")


def test_a_folder_of_json_shards_is_read_line_by_line_with_its_splits(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:3]))
    (folder / "train-1.jsonl").write_text(json.dumps(ALPACA[3]) + "\n{broken\n")
    (folder / "test.jsonl").write_text(json.dumps(ALPACA[4]) + "\n")
    with pytest.raises(CamelidError, match=rf"^{folder / 'train-1.jsonl'}:2: invalid JSON"):
        read_conversations(folder)
    read = read_conversations(folder, skip_bad=True)
    assert [r.messages for r in read.records] == EXPECTED[:4] and read.skipped[0].where == f"{folder}/train-1.jsonl:2"
    assert messages_of(f"{folder}:test") == EXPECTED[4:]


def test_perplexity_texts_and_mix_take_folders_and_hub_names(tmp_path, monkeypatch):
    from camelid.data.mix import MixSource
    from camelid.eval.likelihood import read_texts

    folder = hub_folder(tmp_path)
    texts, _ = read_texts(f"{folder}:test")
    assert texts == EXPECTED[4:]
    assert MixSource.parse("hf:org/name:test") == MixSource("hf:org/name:test", "name", weight=1.0)
    assert MixSource.parse("a=hf:org/name:2") == MixSource("hf:org/name", "a", weight=2.0)
    assert MixSource.parse(f"t={folder}:test:count=1") == MixSource(f"{folder}:test", "t", count=1)
