"""Lower lowbit's quantized IR (QDQ form + plan) to ONNX Runtime's int8 kernels.

Input: linears whose weight is ``DequantizeLinear(W_q:int8, s, axis=1)`` (from
``quantize-weights``), the plan on the model, and for static activations a
``QuantizeLinear -> DequantizeLinear`` pair on the input. Output, per layer,
the pattern ``benchmarks/ort_linear_kernels.py`` measured fastest (see
``lowbit.backends.ort.qlinear``):

* dynamic activations: per-token uint8 quantization at run time,
  ``MatMulInteger`` (fused by ORT into ``MatMulIntegerToFloat``), the exact
  zero-point correction and the scales;
* static activations: ``QuantizeLinear(uint8) -> com.microsoft.MatMulIntegerToFloat``;
* weight-only layers (no activation bits) keep ``DequantizeLinear -> MatMul``.

Linears reading one tensor (Q/K/V, gate/up) then share one quantization of
it: duplicate constants are merged and common subexpressions eliminated.
The backend only lowers: precision and modes come from the plan.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    RemoveUnusedNodesPass,
)

from lowbit.backends.ort.qlinear import emit_dynamic_per_token_linear, emit_static_linear
from lowbit.compiler.errors import InputError
from lowbit.compiler.irutil import replace_value
from lowbit.compiler.passbase import LAYER_KEY, LowbitPass, carry_debug_id
from lowbit.compiler.plan import read_plan
from lowbit.compiler.registry import register_pass


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def quantized_weight(node: ir.Node) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """(DequantizeLinear node, W_q, scale) if ``node`` is a MatMul on a per-channel int8 weight."""
    w = node.inputs[1]
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    w_q, scale = _const(dq.inputs[0]), _const(dq.inputs[1])
    axis = dq.attributes.get("axis")
    if w_q is None or scale is None or w_q.dtype != np.int8 or w_q.ndim != 2:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and np.any(_const(dq.inputs[2])):
        return None  # asymmetric weights: not lowered here
    if scale.ndim != 1 or (axis.value if axis is not None else 1) not in (1, -1):
        return None
    return dq, w_q, scale


def static_activation(x: ir.Value) -> tuple[ir.Value, float, int] | None:
    """(float input, scale, zero point) if ``x`` is ``DequantizeLinear(QuantizeLinear(x0))`` uint8 per tensor."""
    dq = x.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    s, zp = _const(q.inputs[1]), _const(q.inputs[2]) if len(q.inputs) > 2 else None
    if s is None or zp is None or s.size != 1 or zp.dtype != np.uint8:
        return None
    return q.inputs[0], float(s.reshape(())), int(zp.reshape(()))


@register_pass
class LowerToORTPass(LowbitPass):
    """Rewrite planned W8A8 linears into ONNX Runtime's integer kernels.

    In place. Requires ``quantize-weights`` to have run (QDQ weights) and a plan.

    Options:
        symmetric_tokens: per-token activation scales without zero point (faster, less exact than asymmetric).
    """

    name = "lower-ort"

    def __init__(self, *, symmetric_tokens: bool = False) -> None:
        super().__init__()
        self.symmetric_tokens = symmetric_tokens

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        if plan is None:
            raise InputError("lower-ort needs a plan: put a planner pass and quantize-weights before it")
        if model.graph.opset_imports.get("", 0) < 13:
            raise InputError(f"lower-ort needs default opset >= 13, the model has {model.graph.opset_imports.get('')}")
        graph = model.graph
        lowered = 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            found = quantized_weight(node)
            if found is None:
                continue
            dq, w_q, scale = found
            layer = dq.metadata_props.get(LAYER_KEY) or node.metadata_props.get(LAYER_KEY, node.name)
            lp = plan.layers.get(layer)
            if lp is None or lp.activation_bits is None:
                continue  # weight-only: DequantizeLinear -> MatMul stays
            x = node.inputs[0]
            static = static_activation(x) if lp.activations == "static" else None
            if lp.activations == "static" and static is None:
                raise InputError(f"layer {layer}: plan says static activations but its input has no QuantizeLinear/DequantizeLinear pair")
            name = f"{layer}.lowered"
            if static is not None:
                x0, x_scale, x_zp = static
                y = emit_static_linear(graph, x0, w_q, scale, x_scale, x_zp, name=name,
                                       pass_name=type(self).__name__, insert_before=node)
            else:
                y = emit_dynamic_per_token_linear(graph, x, w_q, scale, name=name, symmetric=self.symmetric_tokens,
                                                  pass_name=type(self).__name__, insert_before=node)
            carry_debug_id(node, y)
            replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
            lowered += 1
        if lowered:
            for n in graph:
                if n.metadata_props.get("lowbit.pass") == type(self).__name__ and LAYER_KEY not in n.metadata_props:
                    n.metadata_props[LAYER_KEY] = n.name.split("/")[0].removesuffix(".lowered")
            RemoveUnusedNodesPass()(model)
            DeduplicateInitializersPass()(model)
            CommonSubexpressionEliminationPass()(model)
            RemoveUnusedNodesPass()(model)
        self.context.notes["lower-ort"] = {"lowered": lowered}
        return ir.passes.PassResult(model, lowered > 0)
