"""Calibrate: observe the inputs of every linear on calibration data.

Runs the current graph in ONNX Runtime over the compile's calibration
batches and stores one ``TensorObserver`` per linear input in the compile
context (``context.stats``, keyed by tensor name). Later passes read those
statistics: the planner (outlier ratios), static activation quantization
(clipping ranges), smoothing (per-channel absmax).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import CalibrationError
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.results import PassRecord
from lowbit.passes.recognize import find_linears


@dataclasses.dataclass(frozen=True)
class CalibrateOptions(PassOptions):
    max_batches: int = option(0, "use at most this many calibration batches (0: all).")


@dataclasses.dataclass
class CalibrateRecord(PassRecord):
    """How much data the statistics in ``context.stats`` were gathered on."""

    batches: int
    tensors: int
    tokens: int


class CalibratePass(LowbitPass):
    """Collect activation statistics of linear inputs (analysis only).

    In place; never modifies the graph. Requires calibration batches in the
    compile context (``--calib-data`` or the built-in text). Options:
    :class:`CalibrateOptions`; record: :class:`CalibrateRecord`.
    """

    name = "calibrate"
    Options = CalibrateOptions

    def requires(self, model: ir.Model) -> None:
        if not self.context.calibration_batches:
            raise CalibrationError("calibrate needs calibration data, and the compile context has none "
                                   "(no calibration batches: the calibration text gave no samples?)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        linears, _ = find_linears(model.graph)
        batches = self.context.calibration_batches
        if self.max_batches:
            batches = batches[: self.max_batches]
        tensors = [lin.x.name for lin in linears]
        stats = observe(model, tensors, batches, show_progress=self.context.progress)
        self.context.stats.update(stats)
        tokens = int(sum(b[next(iter(b))].size for b in batches)) if batches else 0
        return self.result(model, False, CalibrateRecord(len(batches), len(stats), tokens))
