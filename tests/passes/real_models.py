"""Real models for the numerics passes' equivalence tests, exported once per test run.

The torch export is the slow part (seconds for stories260K, minutes for
SmolLM2), so the exported ONNX is kept as serialized bytes and every caller
gets a fresh, independent ``onnx_ir.Model`` to rewrite.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.compiler.core.data import split_text
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.frontend import load_source


@functools.lru_cache(maxsize=None)
def _exported(source: str):
    model, adapter = load_source(source)
    return ir.to_proto(model).SerializeToString(), adapter


def fresh(source: str | Path, *, cache: bool = True):
    """``(model, adapter)``: a private copy of the exported fp32 model (``cache=False``
    for large models used once, which should not stay in memory)."""
    if not cache:
        return load_source(str(source))
    data, adapter = _exported(str(source))
    return ir.from_proto(onnx.load_from_string(data)), adapter


def windows(adapter, *, calib: int, evals: int, seq_len: int, text: Path | None = None):
    """Calibration and held-out evaluation batches: disjoint token windows of ``text``
    (default: the built-in pydoc prose), one calibration window per batch."""
    split = split_text(
        adapter.tokenizer,
        calib_data=text,
        eval_data=None,
        calib_samples=calib,
        eval_samples=evals,
        seq_len=seq_len,
    )
    return [adapter.make_inputs([w]) for w in split.calibration], [adapter.make_inputs(split.evaluation)]


def outputs(model: ir.Model, batches) -> list[np.ndarray]:
    session = session_for(model)
    return [session.run(None, feed)[0] for feed in batches]


def max_rel_diff(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """max |got - ref| / max |ref| over all batches."""
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) / max(float(np.abs(r).max()) for r in ref)
