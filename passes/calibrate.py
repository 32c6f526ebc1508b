"""Calibrate: observe the inputs of every linear on calibration data.

Runs the current graph in ONNX Runtime over the compile's calibration
batches and stores one ``TensorObserver`` per linear input in the compile
context (``context.stats``, keyed by tensor name). Later passes read those
statistics: the planner (outlier ratios), static activation quantization
(clipping ranges), smoothing (per-channel absmax).
"""

from __future__ import annotations

import onnx_ir as ir
from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.passes.recognize import find_linears


class CalibratePass(LowbitPass):
    """Collect activation statistics of linear inputs (analysis only).

    In place; never modifies the graph. Precondition: the compile context
    holds calibration batches (``--calib-data`` or the built-in text).

    Options:
        max_batches: use at most this many calibration batches (0: all).
    """

    name = "calibrate"

    def __init__(self, *, max_batches: int = 0) -> None:
        super().__init__()
        self.max_batches = max_batches

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        linears, _ = find_linears(model.graph)
        batches = self.context.calibration_batches
        if self.max_batches:
            batches = batches[: self.max_batches]
        tensors = [lin.x.name for lin in linears]
        stats = observe(model, tensors, batches, show_progress=self.context.progress)
        self.context.stats.update(stats)
        self.context.notes["calibrate"] = {
            "batches": len(batches),
            "tensors": len(stats),
            "tokens": int(sum(b[next(iter(b))].size for b in batches)) if batches else 0,
        }
        return ir.passes.PassResult(model, False)
