"""Where data comes from: a file, a folder or a Hub name, read record by record as ("where", value) pairs.

What a source may be:
- JSON text: JSONL (one object per line, blank lines ignored) or one JSON array of objects, plain or compressed
  with gzip, zstd, bzip2 or xz (told by the first bytes, not the name). camelid reads these itself, streaming, so that a
  bad record is reported by its line (`data.jsonl:1018`) and the rest of the file is still read: Hugging
  Face `datasets` reads a JSON file as one Arrow table, so one record of another shape fails the whole file
  (the packaged ShareGPT, cut off mid-record, cannot be loaded by it at all) and its errors name no line.
- Everything else through `datasets` (memory-mapped Arrow, cached by `datasets` under HF_DATASETS_CACHE):
  a Parquet, Arrow or CSV file; a `save_to_disk` folder (one dataset or a DatasetDict); a folder in the Hub's
  layout (`data/train-*.parquet`, `train.jsonl`, ...) or of shards; `hf:org/name` from the Hub itself. A
  folder or Hub dataset with several splits takes one as `path:split` (default `train`). Their records are
  named `path:row N` (N from 1), and a column that a row does not fill (None, as Arrow pads a column that
  only some records had) counts as absent.
An archive (zip, 7-Zip, tar) is named as what it is, with what to do instead.
"""

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError

# Reasons that other modules act on: the ShareGPT reader tells a file cut off at its end from one broken in the
# middle.
CUT_INSIDE_RECORD = "file ends inside a record"
CUT_INSIDE_ARRAY = "file ends inside the array"

HUB_PREFIX = "hf:"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".tsv")  # what tells data from plain text
DEFAULT_SPLIT = "train"

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_BZIP2 = b"BZh"
_XZ = b"\xfd7zXZ\x00"
_COMPRESSED = (_GZIP, _ZSTD, _BZIP2, _XZ)
_ARROW_MAGIC = (b"ARROW1", b"\xff\xff\xff\xff")  # an Arrow file; an Arrow stream (how `datasets` writes shards)


SKIP_HINT = "fix the record or pass --skip-bad to drop such records"


class BadRecord(CamelidError):
    """A record that is not valid data. `reason` is short and the same for records alike."""

    def __init__(self, where: str, reason: str, detail: str = "", more: int = 0):
        self.where, self.reason, self.detail = where, reason, detail
        extra = f" ({detail})" if detail else ""
        if more:  # how many bad records follow this one in its source
            extra += f", and {more:,} more bad record{'s' * (more > 1)} after it"
        super().__init__(f"{where}: {reason}{extra}; {SKIP_HINT}")


def source_records(source: str | Path) -> Iterator[tuple[str, Any]]:
    """("where", value) for each record of `source`, in order; a record that cannot be parsed comes as a BadRecord."""
    hub, path, split = _parsed(source)
    if hub is not None:
        yield from _rows(str(source), _load_hub(hub, split))
        return
    if path.is_dir():
        shards = _folder_json_files(path, split)
        if shards is not None:
            for shard in shards:
                yield from json_records(shard)
        else:
            yield from _rows(str(source), _load_folder(path, split))
        return
    if split is not None:
        raise CamelidError(f"{path}: a file has no splits; give ':{split}' only after a folder or a Hub name")
    kind = _file_kind(path)
    if kind == "json":
        yield from json_records(path)
        return
    what, load = _COLUMNAR[kind]
    options = _csv_options(path) if kind == "csv" else {}
    yield from _rows(str(path), _with_datasets(f"{path}: {what}",
                                               lambda d: getattr(d.Dataset, load)(str(path), **options)))


def is_data_source(source: str | Path) -> bool:
    """Whether `source` is data (a Hub name, a folder, `PATH:SPLIT`, a file with a data suffix under any
    compression: data.jsonl.gz) rather than one plain text file."""
    hub, path, _ = _parsed(source)
    return hub is not None or path.is_dir() or _data_suffix(path) in DATA_SUFFIXES


def source_stamp(source: str | Path) -> list:
    """What tells that a source's content changed, without reading it: each file's size and modification time;
    for a Hub dataset, the fingerprint `datasets` gives the version it has (its own cache tells versions apart)."""
    hub, path, split = _parsed(source)
    if hub is not None:
        return [_load_hub(hub, split)._fingerprint]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def source_exists(source: str | Path) -> bool:
    """Whether `source` names a file or folder here (with or without a `:split`), or a Hub dataset (not checked)."""
    hub, path, _ = _parsed(source)
    return hub is not None or path.exists()


def _parsed(source: str | Path) -> tuple[str | None, Path | None, str | None]:
    """(Hub name, None, split) for `hf:org/name[:split]`, else (None, path, split) for `path[:split]`."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        name, split = _name_and_split(text[len(HUB_PREFIX):], exists=lambda name: ":" not in name)
        return name, None, split
    path, split = _name_and_split(text, exists=lambda p: Path(p).exists())
    return None, Path(path), split


def _name_and_split(text: str, exists) -> tuple[str, str | None]:
    """`path:split` -> (path, split) when `path` exists (or is a Hub name) and the whole text does not."""
    if exists(text):
        return text, None
    head, colon, split = text.rpartition(":")
    if colon and head and re.fullmatch(r"[\w.-]+", split) and exists(head):
        return head, split
    return text, None


_COLUMNAR = {  # kind: (what it is, in messages; the datasets.Dataset method that reads it)
    "parquet": ("a Parquet file", "from_parquet"),
    "arrow": ("an Arrow file", "from_file"),
    "csv": ("a CSV file", "from_csv"),
}


def _csv_options(path: Path) -> dict:
    """Every CSV column read as the text written in it: pandas would read "3" as a number, "" as NaN."""
    import csv

    d = _datasets()
    sep = "\t" if _data_suffix(path) == ".tsv" else ","
    try:
        with open_text_bytes(path) as raw:
            header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), delimiter=sep), [])
    except UnicodeDecodeError:
        raise CamelidError(f"{path}: a CSV file whose header is not UTF-8 text; save it as UTF-8") from None
    return {"features": d.Features({name: d.Value("string") for name in header}), "keep_default_na": False,
            "sep": sep}


def is_json_text(source: str | Path) -> bool:
    """Whether `source` is a file that camelid reads as JSON text itself (plain or compressed)."""
    path = Path(source)
    return path.is_file() and _file_kind(path) == "json"


def _file_kind(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except OSError as exc:
        raise CamelidError(f"{path}: cannot read ({exc.strerror})") from None
    if magic.startswith(b"PAR1"):
        return "parquet"
    if magic.startswith(_ARROW_MAGIC):
        return "arrow"
    for prefix, kind in ((b"PK\x03\x04", "a zip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive")):
        if magic.startswith(prefix):
            raise CamelidError(f"{path}: {kind}, which camelid does not read; unpack it and give the data file or "
                               "the folder inside")
    if _is_tar(path):
        raise CamelidError(f"{path}: a tar archive, which camelid does not read; unpack it (tar -xf) and give the "
                           "data file or the folder inside")
    if _data_suffix(path) in (".csv", ".tsv"):  # compressed too: pandas reads data.csv.gz through
        return "csv"
    return "json"


def _is_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)  # reads through gzip, bz2 and xz too
    except OSError:
        return False


def _data_suffix(path: Path) -> str:
    """The suffix that says what the data is, under any compression suffix: data.csv.gz -> .csv."""
    suffixes = [x.lower() for x in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".zst", ".bz2", ".xz"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


# -- through datasets ----------------------------------------------------------------------------------------


def _datasets():
    import datasets  # here: importing it takes a second, which JSON files do not need

    return datasets


def _with_datasets(what, load):
    """`load(datasets)`, its failures one line that starts with `what` (the source, and its kind where known)."""
    d = _datasets()
    try:
        return load(d)
    except CamelidError:
        raise
    except Exception as exc:  # pyarrow and datasets raise many kinds; each is a file it could not read
        message = " ".join(str(exc).split())[:300]
        raise CamelidError(f"{what} that Hugging Face datasets could not read ({type(exc).__name__}: {message}); "
                           "check that it is whole (download it again) and in a layout datasets reads") from None


def _folder_json_files(path: Path, split: str | None) -> list[Path] | None:
    """The files of `split` in a folder whose data files are all JSON text, found by the rules `datasets` uses
    for a folder's splits (train*, test*, data/train-*, ...); None for a folder of other data. camelid reads
    these itself, so that a bad line is named and skipped as in one file."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # no data files, or none it knows: datasets' own error says so below
        return None
    files = [Path(f) for f in splits.get(split or DEFAULT_SPLIT, [])] if split or DEFAULT_SPLIT in splits else (
        [Path(f) for f in next(iter(splits.values()))] if len(splits) == 1 else [])
    everything = [Path(f) for fs in splits.values() for f in fs]
    if not everything or not all(is_json_text(f) for f in everything):
        return None
    if not files:
        raise CamelidError(f"{path}: has no split {split or DEFAULT_SPLIT!r}; its splits are "
                           f"{', '.join(map(str, splits))} (give one as {path}:SPLIT)")
    return files


def _load_folder(path: Path, split: str | None):
    saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    if saved:
        loaded = _with_datasets(f"{path}: a datasets save_to_disk folder", lambda d: d.load_from_disk(str(path)))
    else:
        loaded = _with_datasets(f"{path}: a folder", lambda d: d.load_dataset(str(path)))
    return _one_split(path, loaded, split)


def _load_hub(name: str, split: str | None):
    loaded = _with_datasets(f"{HUB_PREFIX}{name}: a Hub dataset", lambda d: d.load_dataset(name))
    return _one_split(f"{HUB_PREFIX}{name}", loaded, split)


def _one_split(what, loaded, split: str | None):
    d = _datasets()
    if isinstance(loaded, d.Dataset):
        if split is not None:
            raise CamelidError(f"{what}: holds one dataset without splits; drop ':{split}'")
        return loaded
    if split is None and DEFAULT_SPLIT not in loaded and len(loaded) == 1:
        return next(iter(loaded.values()))
    wanted = split or DEFAULT_SPLIT
    if wanted not in loaded:
        raise CamelidError(f"{what}: has no split {wanted!r}; its splits are {', '.join(loaded)} "
                           f"(give one as {what}:SPLIT)")
    return loaded[wanted]


def _rows(name: str, dataset) -> Iterator[tuple[str, Any]]:
    """Each row, read in batches (much faster than one by one), without the columns it leaves empty."""
    n = 0
    for batch in dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            n += 1
            yield f"{name}:row {n}", {c: v for c, v in zip(columns, values) if v is not None}


# -- JSON text -------------------------------------------------------------------------------------------------


def json_records(path) -> Iterator[tuple[str, Any]]:
    """("path:line", parsed object or BadRecord) for each record of a JSONL or JSON-array file, plain, gzip or zstd."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CamelidError(f"{path}: is a directory; give a data file, or a dataset folder that datasets reads") \
            from None
    except OSError as exc:
        raise CamelidError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(_GZIP):
            try:
                with gzip.open(f) as unzipped:
                    yield from _json_values(path, unzipped)
            except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                raise CamelidError(f"{path}: a damaged gzip file ({exc}); download or compress it again") from None
        elif magic.startswith(_ZSTD):
            yield from _zstd_values(path, f)
        elif magic.startswith(_BZIP2) or magic.startswith(_XZ[:4]):
            yield from _stdlib_values(path, f, "bzip2" if magic.startswith(_BZIP2) else "xz")
        else:
            yield from _json_values(path, f)


def _stdlib_values(path: Path, f, kind: str) -> Iterator[tuple[str, Any]]:
    import bz2
    import lzma

    try:
        with (bz2.open(f) if kind == "bzip2" else lzma.open(f)) as unpacked:
            yield from _json_values(path, unpacked)
    except (EOFError, OSError, lzma.LZMAError) as exc:
        raise CamelidError(f"{path}: a damaged {kind} file ({exc}); download or compress it again") from None


def _zstd_values(path: Path, f) -> Iterator[tuple[str, Any]]:
    import io

    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(f) as raw:
            yield from _json_values(path, io.BufferedReader(raw))
    except zstandard.ZstdError as exc:
        raise CamelidError(f"{path}: a damaged zstd file ({exc}); download or compress it again") from None


def is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return any(magic.startswith(m) for m in _COMPRESSED)


def open_text_bytes(path: Path):
    """The file's bytes after decompressing (gzip or zstd), as a binary file object to read forward."""
    f = open(path, "rb")
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(_GZIP):
        return gzip.open(f)
    if magic.startswith(_ZSTD):
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True))
    if magic.startswith(_BZIP2) or magic.startswith(_XZ[:4]):
        import bz2
        import lzma

        return bz2.open(f) if magic.startswith(_BZIP2) else lzma.open(f)
    return f


def _json_values(path: Path, f) -> Iterator[tuple[str, Any]]:
    if first_byte(f) == b"[":
        yield from _array_values(path, f.read())
    else:
        yield from _jsonl_values(path, f)


def first_byte(f) -> bytes:
    """The first byte that is not whitespace (or a UTF-8 byte-order mark); leaves the file at its start.

    A compressed stream cannot seek back cheaply, so the bytes read are kept by peeking where the file allows.
    """
    chunk = f.peek(1 << 16) if hasattr(f, "peek") and not f.seekable() else None
    if chunk is not None:
        stripped = chunk.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        return stripped[:1]
    chunk = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
    while chunk:
        if stripped := chunk.lstrip(b" \t\r\n"):
            f.seek(0)
            return stripped[:1]
        chunk = f.read(1 << 16)
    f.seek(0)
    return b""


def _jsonl_values(path: Path, f) -> Iterator[tuple[str, Any]]:
    for line, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            # Without its newline, so that a line cut short is reported at its end, not at column 1 of the next.
            yield where, json.loads(raw.rstrip(b"\r\n").decode("utf-8-sig" if line == 1 else "utf-8"))
        except UnicodeDecodeError:
            yield where, BadRecord(where, "not UTF-8 text")
        except json.JSONDecodeError as exc:
            yield where, BadRecord(where, "invalid JSON", f"column {exc.colno}: {exc.msg}")


_SPACE = re.compile(r"[ \t\r\n]*")


def _array_values(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """Each element of a JSON array, parsed one at a time so that a broken element is found by its line.

    After a broken element the rest of the array cannot be trusted, so it ends the file as one bad record.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CamelidError(f"{path}:{line}: not UTF-8 text") from None
    del data
    decoder = json.JSONDecoder()
    line, counted = 1, 0  # `line` is the line of offset `counted`; newlines are counted forward only

    def where_at(pos: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return f"{path}:{line}"

    pos = _SPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            where = where_at(pos)
            if pos == len(text):
                yield where, BadRecord(where, CUT_INSIDE_ARRAY, "no closing ]")
                return
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if exc.msg.startswith("Unterminated string") or not text[exc.pos :].strip():
                    yield where, BadRecord(where, CUT_INSIDE_RECORD)
                else:
                    yield where, BadRecord(where, "invalid JSON", f"line {exc.lineno} column {exc.colno}: {exc.msg}")
                return
            yield where, value
            pos = _SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            elif pos < len(text):
                where = where_at(pos)
                yield where, BadRecord(where, "invalid JSON", "expected , or ] between records")
                return
    if text[pos:].strip():
        where = where_at(pos + len(text[pos:]) - len(text[pos:].lstrip()))
        yield where, BadRecord(where, "invalid JSON", "text after the closing ]")
