"""Reading and writing the small files of a checkpoint: JSON with one-line errors, atomic replacement."""

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError


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
