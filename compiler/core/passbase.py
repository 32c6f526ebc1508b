"""The base class of lowbit's passes and the context they share.

A lowbit pass is an ``onnx_ir`` pass (``InPlacePass``): one method,
``call(model) -> PassResult``, with ``modified`` reported exactly. Options are
keyword-only constructor arguments and map one-to-one to recipe keys; the
registry (``lowbit.compiler.core.registry``) introspects them for ``lowbit passes``.

What several passes share (the calibration batches, the statistics the
calibrate pass gathered, the model adapter) lives in a ``CompileContext`` the
pipeline hands to each pass before running it. The plan, which must travel
with the IR into dumps and the artifact, is stored on the model itself
(``lowbit.compiler.core.plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir
from lowbit.compiler.core.registry import pass_options

PASS_KEY = "lowbit.pass"
LAYER_KEY = "lowbit.layer"
#: a node's debug handle: assigned once after import, and carried by a pass to
#: the node that computes the replacement of a value it rewrote, so the fp32 and
#: the quantized graph can be compared tensor by tensor.
DEBUG_KEY = "lowbit.debug_id"


def assign_debug_ids(model: ir.Model) -> int:
    """Give every node without one a debug id (its position in the imported graph)."""
    count = 0
    for i, node in enumerate(model.graph.all_nodes()):
        if DEBUG_KEY not in node.metadata_props:
            node.metadata_props[DEBUG_KEY] = str(i)
            count += 1
    return count


def carry_debug_id(old: ir.Node, new_value: ir.Value) -> None:
    """The producer of ``new_value`` now stands for ``old``'s output."""
    producer = new_value.producer()
    if producer is not None and DEBUG_KEY in old.metadata_props:
        producer.metadata_props[DEBUG_KEY] = old.metadata_props[DEBUG_KEY]


@dataclasses.dataclass
class CompileContext:
    """State shared by the passes of one compile.

    Attributes:
        calibration_batches: input feeds (name -> array) for calibration.
        stats: calibration statistics, keyed by tensor (value) name.
        adapter: the model-family adapter, or None for a bare ONNX model.
        notes: free-form records a pass wants in the manifest, keyed by pass.
    """

    calibration_batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: Any = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True


class LowbitPass(ir.passes.InPlacePass):
    """An in-place pass that may read the compile context.

    Subclasses set ``name`` (the registry and recipe name) and implement
    ``call``. Nodes they create are tagged with :meth:`tag` so every quantized
    node can be traced back to the pass (and layer) that made it.
    """

    name: ClassVar[str] = ""
    context: CompileContext

    def __init__(self) -> None:
        self.context = CompileContext()

    def tag(self, node: ir.Node, layer: str | None = None) -> ir.Node:
        node.metadata_props[PASS_KEY] = type(self).__name__
        if layer is not None:
            node.metadata_props[LAYER_KEY] = layer
        return node

    def options(self) -> dict[str, Any]:
        """The resolved option values of this instance (for the manifest)."""
        return {opt.name: getattr(self, opt.name, opt.default) for opt in pass_options(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"
