"""Reading and writing small files: JSON with one-line errors, atomic replacement, and append-only JSONL that
resumes after a crash."""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError


def cache_dir() -> Path:
    """camelid's cache (compiled kernels, installed models): $CAMELID_CACHE, else $XDG_CACHE_HOME/camelid, else
    ~/.cache/camelid."""
    if os.environ.get("CAMELID_CACHE"):
        return Path(os.environ["CAMELID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "camelid"


def read_json(path: Path, what: str = "JSON") -> Any:
    """Parse a JSON file, or raise a one-line error naming the file and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CamelidError(f"{path}: not valid {what} ({exc})") from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` all at once: readers see the old file or the new one, never half of one.

    The temporary file is opened like any other (not with mkstemp), so it gets the usual permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Put directory `new` at `out`; an existing `out` is moved aside first and removed only afterwards."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False):
    """Yield a fresh directory to fill; when the block ends without error it becomes `out`, all at once.

    An existing non-empty `out` is refused unless `overwrite`; on any error the partial directory is removed
    and `out` is left as it was. The directory is made with mkdir, so it gets the user's usual permissions.
    """
    out = Path(out)
    if out.exists() and not (overwrite and out.is_dir()) and (not out.is_dir() or any(out.iterdir())):
        raise CamelidError(f"{out} already exists; choose a new directory or remove it first")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise CamelidError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CamelidError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- append-only JSONL: one fsync'ed line per result, so an interrupted run resumes --------------------------

RESUME_HINT = "not a file this command wrote; choose another output file or fix the line"


def open_to_append(path: Path):
    """`path` opened to append text to (its directory made first), or a one-line error saying why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise CamelidError(f"cannot write {path}: {exc.strerror or exc}") from None


def append_json_line(f, record: dict) -> None:
    """One record as one line, on disk before the next is made: a crash can tear at most the line being written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_appended(path: Path, is_record: Callable[[Any], bool], what: str, *,
                  convert: Callable[[bytes, str], Any] | None = None) -> tuple[list, str | None]:
    """The records an earlier run appended to `path` ([] when there is no file), and where a torn line was cut.

    Every line is checked before the file is touched: one that is not a record (`is_record` of its JSON) raises,
    naming the line as not `what`, since the file is not one this command wrote. `convert(line, "path:line")`,
    when given, makes each line into the record instead, raising its own error for a line that is not one.
    Only then is a last line without its newline (a crash mid-write) seen to: a whole record gets its newline,
    and a torn one (the start of a JSON object, not yet valid JSON) is cut off. Anything else there raises too.
    """
    if path.is_dir():
        raise CamelidError(f"{path}: is a directory; the output is a JSONL file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        raise CamelidError(f"{path}: cannot read ({exc.strerror})") from None

    def record(raw: bytes, line: int) -> Any:
        if convert is not None:
            return convert(raw, f"{path}:{line}")
        value = _loads(raw)
        if not is_record(value):
            raise CamelidError(f"{path}:{line}: not {what}; {RESUME_HINT}")
        return value

    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    records = [record(raw, line) for line, raw in enumerate(lines, 1) if raw.strip()]
    torn, last = data[len(complete):], len(lines) + 1
    if not torn.strip():
        if torn:
            os.truncate(path, len(complete))  # spaces after the last newline: nothing to keep
        return records, None
    if _loads(torn) is not None or not torn.lstrip().startswith(b"{"):
        # Not a torn write: no prefix of a JSON object is valid JSON, and these files hold objects. Whole or
        # foreign, the line is checked like any other.
        records.append(record(torn, last))
        with open(path, "ab") as f:
            f.write(b"\n")
        return records, None
    os.truncate(path, len(complete))
    return records, f"{path}:{last}"


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
