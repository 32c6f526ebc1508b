"""Canonicalize: one normal form for every later pass.

* ``Gemm(x, B, C)`` with a constant ``B`` and ``alpha = beta = 1``,
  ``transA = 0`` becomes ``MatMul(x, B or B^T) + C``, so recognition only has
  to know MatMul;
* ``MatMul(x, Transpose(W))`` with constant ``W`` gets the transposed
  weight as one initializer;
* constant folding, dead-code removal and shape inference (onnxscript's
  optimizer), then a topological sort.

The function computed is unchanged; initializers that were folded keep their
original names where one weight maps to one initializer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass, carry_debug_id


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


@dataclasses.dataclass(frozen=True)
class CanonicalizeOptions(PassOptions):
    fold_constants: bool = option(True, "run onnxscript's constant folding and shape inference.")


class CanonicalizePass(LowbitPass):
    """Rewrite Gemm/transposed weights to ``MatMul(x, W[K, N])``, fold constants.

    In place. Options: :class:`CanonicalizeOptions`.
    """

    name = "canonicalize"
    Options = CanonicalizeOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = _fingerprint(model)
        for node in list(graph):
            if node.op_type == "Gemm" and node.domain == "":
                self._gemm_to_matmul(graph, node)
            elif node.op_type == "MatMul" and node.domain == "":
                self._fold_transposed_weight(graph, node)
        if self.fold_constants:
            onnxscript.optimizer.optimize(model, num_iterations=2, inline=True)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, _fingerprint(model) != before)

    def _gemm_to_matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        x, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if (
            b is None
            or b.const_value is None
            or _attr(node, "transA", 0) != 0
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
        ):
            return
        w = b.const_value.numpy()
        if _attr(node, "transB", 0):
            w = np.ascontiguousarray(w.T)
        weight = b if not _attr(node, "transB", 0) else add_initializer(graph, f"{b.name}.kn", w)
        matmul = ir.node("MatMul", [x, weight], name=f"{node.name}.matmul", metadata_props=dict(node.metadata_props))
        self.tag(matmul)
        graph.insert_before(node, matmul)
        out = matmul.outputs[0]
        if c is not None:
            add = ir.node("Add", [out, c], name=f"{node.name}.bias", metadata_props=dict(node.metadata_props))
            self.tag(add)
            graph.insert_before(node, add)
            out = add.outputs[0]
        out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
        carry_debug_id(node, out)
        replace_value(node.outputs[0], out)
        graph.remove(node, safe=True)

    def _fold_transposed_weight(self, graph: ir.Graph, node: ir.Node) -> None:
        w = node.inputs[1]
        producer = w.producer() if w is not None else None
        if producer is None or producer.op_type != "Transpose" or producer.inputs[0].const_value is None:
            return
        src = producer.inputs[0]
        perm = _attr(producer, "perm", None)
        if len(src.const_value.shape) != 2 or perm not in (None, [1, 0], (1, 0)):
            return
        weight = add_initializer(graph, f"{src.name}.kn", np.ascontiguousarray(src.const_value.numpy().T))
        node.replace_input_with(1, weight)


def _fingerprint(model: ir.Model) -> tuple:
    g = model.graph
    return (
        tuple((n.op_type, tuple(id(v) for v in n.inputs)) for n in g),
        tuple(sorted(g.initializers)),
    )
