"""Reading and writing the small files of a checkpoint: JSON with one-line errors, atomic replacement."""

import json
import os
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
