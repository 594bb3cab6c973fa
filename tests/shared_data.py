"""The seed tasks and question sets shared by the projects here: `../shared/data` from the project root.

A test that needs one of them is skipped, not failed, where the directory is not beside the checkout.
"""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {SHARED_DATA}")
    return path
