"""Run an in-memory IR model in ONNX Runtime.

Models are saved to a temporary folder (external data for large weights, so
protobuf's 2 GB limit never bites) and loaded from there; extra intermediate
tensors can be exposed as outputs for calibration and debugging.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def make_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def session_for(
    model: ir.Model, extra_outputs: Sequence[str] = (), threads: int | None = None
) -> ort.InferenceSession:
    """An ORT session over ``model``, with ``extra_outputs`` (value names) exposed."""
    values = {v.name: v for v in _all_values(model.graph)}
    added = []
    for name in extra_outputs:
        if name in {o.name for o in model.graph.outputs}:
            continue
        value = values[name]
        model.graph.outputs.append(value)
        added.append(value)
    try:
        with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
            return make_session(path, threads)
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
