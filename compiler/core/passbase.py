"""The base class of lowbit's passes and the context they share.

A lowbit pass is an ``onnx_ir`` pass (``InPlacePass``): one method,
``call(model) -> PassResult``, with ``modified`` reported exactly, and its
preconditions in ``requires`` (onnx_ir runs it before ``call``): a missing
plan, statistics or earlier pass is named there, with the pass that provides it.

Options are a frozen dataclass per pass (``Options``, see
``lowbit.compiler.core.options``) whose fields map one-to-one to recipe keys; the
pass takes them as keyword arguments and exposes each as an attribute
(``SmoothActivationsPass(alpha=0.5).alpha``). What a run found and did is a typed
record in the result (``lowbit.compiler.core.results``).

What several passes share (the calibration batches, the statistics the
calibrate pass gathered, the model adapter, the records of the passes run so
far) lives in a ``CompileContext`` the pipeline hands to each pass before
running it. The plan, which must travel with the IR into dumps and the
artifact, is stored on the model itself (``lowbit.compiler.core.plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from lowbit.compiler.core.options import NoOptions, build_options
from lowbit.compiler.core.registry import pass_options
from lowbit.compiler.core.results import LowbitResult, PassRecord, PassResults

PASS_KEY = "lowbit.pass"
LAYER_KEY = "lowbit.layer"
#: a node's debug handle: assigned once after import, and carried by a pass to
#: the node that computes the replacement of a value it rewrote, so the fp32 and
#: the quantized graph can be compared tensor by tensor.
DEBUG_KEY = "lowbit.debug_id"
#: a node's role (``recognize``: "linear", "rmsnorm", ...; ``rotate``: ONLINE_HADAMARD)
ROLE_KEY = "lowbit.role"
#: role of the MatMuls of an online rotation (``rotate``): constant right operands, but not layers
ONLINE_HADAMARD = "online_hadamard"


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
        notes: free-form notes for the manifest, keyed by name, of passes that return no
            typed record (third-party passes); lowbit's passes return records instead.
        results: the typed records of the passes run so far (collected by ``run_pipeline``).
    """

    calibration_batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: Any = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True
    results: PassResults = dataclasses.field(default_factory=PassResults)
    #: the chosen ``core.backend.Backend`` (what a planner may offer); None: ONNX Runtime, the default
    backend: Any = None

    def missing_stats(self, needed_by: str) -> str:
        """Why ``needed_by`` finds no calibration statistics, and which pass gives them."""
        message = f"{needed_by} needs calibration statistics: put a 'calibrate' pass before it"
        cleared = self.results.stats_cleared_by()
        if cleared:
            message += (f" (the '{cleared}' pass cleared them, as every activation changed:"
                        f" a 'calibrate' must follow '{cleared}')")
        return message


class LowbitPass(ir.passes.InPlacePass):
    """An in-place pass that may read the compile context.

    Subclasses set ``name`` (the registry and recipe name) and ``Options`` (a
    frozen options dataclass), and implement ``call``, returning :meth:`result`
    with their record. The constructor takes the options as keywords, checks
    their types and values (an ``OptionError`` naming pass, option and value),
    keeps them in ``config`` and as attributes. Nodes they create are tagged
    with :meth:`tag` so every quantized node can be traced back to the pass (and
    layer) that made it.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    context: CompileContext

    def __init__(self, **options: Any) -> None:
        self.config = build_options(self.name or type(self).__name__, self.Options, options)
        for f in dataclasses.fields(self.config):
            setattr(self, f.name, getattr(self.config, f.name))
        self.context = CompileContext()

    def check_model(self, model: ir.Model) -> None:
        """What this pass can check on the imported model before any pass runs (``Compilation.check_model``:
        a planner's override globs against the layer names), so a bad input fails in seconds rather than
        after calibration. Default: nothing."""

    @staticmethod
    def result(model: ir.Model, modified: bool, record: PassRecord | None = None) -> LowbitResult:
        return LowbitResult(model, modified, record)

    def tag(self, node: ir.Node, layer: str | None = None) -> ir.Node:
        node.metadata_props[PASS_KEY] = type(self).__name__
        if layer is not None:
            node.metadata_props[LAYER_KEY] = layer
        return node

    def options(self) -> dict[str, Any]:
        """The resolved option values of this instance (for the manifest)."""
        fields = dataclasses.fields(self.config)
        if not fields:  # a subclass with keyword-only constructor arguments instead of an Options dataclass
            return {opt.name: getattr(self, opt.name, opt.default) for opt in pass_options(type(self))}
        return {f.name: getattr(self, f.name) for f in fields}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"
