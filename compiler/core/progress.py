"""Progress bars that stay out of the way (``--quiet``, pipes, CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def progress(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    if _QUIET or not enabled:
        return items
    # disable=None: bars only on a terminal, never in logs or pipes
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
