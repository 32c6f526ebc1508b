"""Lower lowbit's quantized IR (QDQ form + plan) to the ``lowbit.tvm`` operators.

Input, as for ``lower-ort``: linears whose weight is ``DequantizeLinear(codes, scale[,
zero_point])`` (``quantize-weights``: per channel ``axis=1`` or blocked ``axis=0,
block_size=g``; int8/uint8/int4/uint4 codes), the plan on the model, and for static
activations a ``QuantizeLinear -> DequantizeLinear`` pair on the input. Output, per
planned layer (see :mod:`lowbit.backends.tvm.ops` for the operators' exact meaning):

* W8A8, symmetric per-channel int8 weights, dynamic (per token or per tensor) or static activations ->
  ``Int8Linear``: weights ``[N, K]`` int8, the activation codes' zero point folded
  into an int32 column-sum correction; the activation quantization scheme is the one
  ``lower-ort`` uses (option ``token_zero_point``), so both backends compute the same
  numbers for the same plan;
* 4-bit weights without activation bits (W4A16), and 8-bit weight-only (W8A16), per
  group or per channel, symmetric or not -> ``PackedLinear``: codes packed eight (four)
  to a ``uint32`` along K, scales (and zero points) ``[N, G]``; TVM decodes them inside
  the GEMV/GEMM kernel (``lowbit.backends.tvm.kernels``).

Everything else (norms, attention, rotary embedding, the quantized embedding lookup) is
standard ONNX and stays; ``relax_import`` hands it to TVM's ONNX importer. A planned
layer the TVM kernels cannot run (W4A8, int8 activations with group-wise or asymmetric
weights) is an :class:`~lowbit.compiler.core.errors.InputError` naming the layer, rather
than a silently float layer. The backend only lowers: precision and modes come from
the plan; the pass is numpy only and needs no TVM.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.backends.tvm import ops
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass, carry_debug_id
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.quantized import (
    QuantizedWeight,
    planned_linears,
    require_quantized,
    static_activation,
)
from lowbit.compiler.core.results import LoweringRecord


def is_lowered(model: ir.Model) -> bool:
    """Whether ``model`` holds ``lowbit.tvm`` operators (``lower-tvm`` has run)."""
    return any(n.domain == ops.DOMAIN for n in model.graph)


@dataclasses.dataclass(frozen=True)
class LowerTVMOptions(PassOptions):
    token_zero_point: str = option(
        "shared", 'zero point of per-token int8 activations: "shared" (one per tensor, calibrated from the rows\' '
                  'ranges), "per-token" (exact range of every row) or "symmetric" (128); as lower-ort\'s option of '
                  "the same name.")

    def __post_init__(self) -> None:
        self.require(self.token_zero_point in ("shared", "per-token", "symmetric"), "token_zero_point",
                     "must be 'shared', 'per-token' or 'symmetric'")


class LowerToTVMPass(LowbitPass):
    """Rewrite planned quantized linears into the ``lowbit.tvm`` operators TVM compiles.

    In place. Requires a plan and ``quantize-weights`` to have run (QDQ weights). The
    result is no longer runnable by ONNX Runtime: the TVM backend
    (``lowbit compile --backend tvm``) builds it. Options: :class:`LowerTVMOptions`;
    record: :class:`~lowbit.compiler.core.results.LoweringRecord`.
    """

    name = "lower-tvm"
    Options = LowerTVMOptions

    def requires(self, model: ir.Model) -> None:
        require_quantized(model.graph, read_plan(model), self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        by_layer: dict[str, str] = {}
        kernels: dict[str, int] = {}
        for node, layer, lp, qw in planned_linears(graph, plan):
            y, kernel = self._lower(graph, node, layer, lp, qw)
            y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
            carry_debug_id(node, y)
            replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
            kernels[kernel] = kernels.get(kernel, 0) + 1
            by_layer[layer] = kernel
        lowered = sum(kernels.values())
        if lowered:
            graph.opset_imports[ops.DOMAIN] = 1
            model.opset_imports[ops.DOMAIN] = 1
            RemoveUnusedNodesPass()(model)
        return self.result(model, lowered > 0, LoweringRecord(lowered, kernels, by_layer))

    def _lower(self, graph: ir.Graph, node: ir.Node, layer: str, lp, qw: QuantizedWeight) -> tuple[ir.Value, str]:
        x = node.inputs[0]
        a8 = lp.activation_bits is not None
        per_channel_sym = qw.group_size is None and qw.zero_point is None
        if a8 and not (per_channel_sym and qw.bits == 8):
            raise InputError(
                f"layer {layer}: the TVM lowering runs int8 activations only with symmetric per-channel int8 weights "
                f"(got {lp.precision}, {qw.bits}-bit {'per-group' if qw.group_size else 'per-channel'} "
                f"{'asymmetric' if qw.zero_point is not None else 'symmetric'}); use w8a8 or w4a16, or --backend onnxruntime"
            )
        if a8:
            return self._int8_linear(graph, node, layer, lp, x, qw)
        return self._packed_linear(graph, node, layer, x, qw)

    def _attrs_for_activations(self, layer: str, lp, x: ir.Value) -> tuple[ir.Value, dict]:
        if lp.activations == "static":
            static = static_activation(x)
            if static is None:
                raise InputError(f"layer {layer}: plan says static activations but its input has no QuantizeLinear/DequantizeLinear pair")
            x0, scale, zp = static
            return x0, {"mode": "static", "scale": float(scale), "zero_point": int(zp)}
        if lp.activations == "dynamic-tensor":  # one range for the whole tensor, at run time
            return x, {"mode": "tensor", "zero_point": 0}
        if self.token_zero_point == "symmetric":
            return x, {"mode": "symmetric", "zero_point": 128}
        obs = self.context.stats.get(x.name)
        z = obs.shared_zero_point() if obs is not None and self.token_zero_point == "shared" else None
        if z is None:  # no calibration rows: exact per-token zero points
            return x, {"mode": "per-token", "zero_point": 0}
        return x, {"mode": "shared", "zero_point": int(z)}

    def _int8_linear(self, graph, node, layer, lp, x, qw: QuantizedWeight) -> tuple[ir.Value, str]:
        x_in, attrs = self._attrs_for_activations(layer, lp, x)
        w_q = np.ascontiguousarray(qw.codes.astype(np.int8).T)  # [N, K]
        colsum = w_q.astype(np.int32).sum(axis=1).astype(np.int32)
        inputs = [
            x_in,
            add_initializer(graph, f"{layer}.w_q", w_q),
            add_initializer(graph, f"{layer}.w_scale", qw.scale[0].astype(np.float32)),
            add_initializer(graph, f"{layer}.colsum", colsum),
        ]
        new = ir.node(ops.INT8_LINEAR, inputs, attributes=attrs, domain=ops.DOMAIN, name=f"{layer}.lowered")
        self.tag(new, layer)
        graph.insert_before(node, new)
        return new.outputs[0], f"Int8Linear({attrs['mode']})"

    def _packed_linear(self, graph, node, layer, x, qw: QuantizedWeight) -> tuple[ir.Value, str]:
        k = qw.codes.shape[0]
        codes = qw.codes.astype(np.int16)
        if qw.zero_point is None:  # symmetric: signed codes stored offset by 2^(bits-1)
            codes = codes + (1 << (qw.bits - 1))
        packed = ops.pack_codes(np.ascontiguousarray(codes.T.astype(np.uint8)), qw.bits)
        inputs = [
            x,
            add_initializer(graph, f"{layer}.w_packed", packed),
            add_initializer(graph, f"{layer}.w_scale", np.ascontiguousarray(qw.scale.T.astype(np.float32))),
        ]
        if qw.zero_point is not None:
            inputs.append(add_initializer(graph, f"{layer}.w_zero_point", np.ascontiguousarray(qw.zero_point.T.astype(np.uint8))))
        attrs = {"bits": qw.bits, "group_size": qw.block, "in_features": k}
        new = ir.node(ops.PACKED_LINEAR, inputs, attributes=attrs, domain=ops.DOMAIN, name=f"{layer}.lowered")
        self.tag(new, layer)
        graph.insert_before(node, new)
        return new.outputs[0], f"PackedLinear(bits={qw.bits}, group={qw.group_size or 'channel'})"
