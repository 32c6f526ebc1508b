"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: `../shared` next to the repository; $LOWBIT_SHARED names another folder (a missing one
#: makes the tests use their own copy: LOWBIT_SHARED=/nonexistent checks a fresh clone's run)
SHARED = Path(os.environ.get("LOWBIT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
#: the tests' own copy, laid out like `shared/models` (see tests/data/README.md)
TEST_DATA = Path(__file__).resolve().parent / "data"


def _has_stories(models: Path) -> bool:
    return (models / "stories260K" / "stories260K.bin").is_file() and (
        models.parent / "data" / "tinystories.txt"
    ).is_file()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The folder of real models: `../shared/models` when it holds stories260K, else `tests/data`.

    Tests read `shared_dir / "stories260K" / ...` and `shared_dir.parent / "data" / "tinystories.txt"`;
    `tests/data` answers both (its parent's `data` is itself)."""
    for models in (SHARED / "models", TEST_DATA):
        if _has_stories(models):
            return models
    pytest.skip(f"stories260K not found in {SHARED / 'models'} or {TEST_DATA}")
