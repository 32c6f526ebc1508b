"""The ONNX Runtime backend object: ``lower-ort``, ``model.onnx``, and :class:`~lowbit.backends.ort.runtime.Artifact`.

Every precision of the plan runs in ONNX Runtime (``lowbit.backends.ort.lower``), so
:meth:`supports` refuses nothing, and a lowered candidate linear is itself an ONNX
model: the mixed planner times it with ORT (``measures_latency``).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from lowbit.compiler.core.artifact import save_model
from lowbit.compiler.core.backend import Backend, BackendOptions, Built
from lowbit.compiler.core.ortsession import make_session


class ORTBackend(Backend):
    """ONNX Runtime (CPU): an ONNX model of ORT's integer / 4-bit kernels, ``model.onnx``."""

    name = "onnxruntime"
    aliases = ("ort",)
    lowering = "lower-ort"
    options = ()
    measures_latency = True
    description = "ONNX Runtime (model.onnx; int8 and 4-bit CPU kernels)"

    def cost_key(self) -> str:
        # the cost table's entries have been keyed so from the start: kept, so they are reused
        return f"{self.name}-{ort.__version__}"

    def build(self, model: ir.Model, folder: Path, options: BackendOptions, *, threads: int | None = None) -> Built:
        path = save_model(model, folder)
        return Built(None, make_session(path, threads))

    def load(self, folder: str | Path, *, threads: int | None = None, verify: bool = True):
        from lowbit.backends.ort.runtime import Artifact

        return Artifact(folder, threads=threads, verify=verify)
