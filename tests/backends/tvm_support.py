"""Shared by the TVM backend tests: one torch export of stories260K per test process.

The driver's export of the llama2.c checkpoint is the slow, backend-independent part of
every compile; the frontend has its own tests. These tests compile the same checkpoint
several times (two backends, two recipes, two targets), so the compile's load step
(``lowbit.compiler.compilation``) is handed a fresh
copy of one export (``tests.passes.real_models.fresh``) instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@contextlib.contextmanager
def exported_once():
    import lowbit.compiler.compilation as compilation
    from tests.passes.real_models import fresh

    original = compilation.load_source

    def load(source, *, tokenizer=None, **kw):
        if tokenizer is None and not kw and isinstance(source, (str, Path)) and str(source).endswith(".bin"):
            return fresh(source)
        return original(source, tokenizer=tokenizer, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compilation, "load_source", load)
        yield
