"""Fuse linears that read one tensor into one wider linear (horizontal fusion).

Q/K/V read the same normalised hidden state, and so do gate/up. After weight
quantization each is ``MatMul(x, DequantizeLinear(W_q, s, axis=1))`` (per
channel) or ``DequantizeLinear(W_q, s, z, axis=0, block_size=g)`` (4-bit groups).
When their plans agree, they become one::

    MatMul(x, DequantizeLinear([W_q1 | W_q2 | W_q3], [s1 | s2 | s3], ...)) -> Split(axis=-1)

(zero points concatenated like the scales). Concatenating output columns is
exact, so the function does not change. A backend then quantizes ``x`` once and
runs one integer GEMM (or one ``MatMulNBits``) instead of three:
fewer kernel launches, one packing of the activations, and one copy of the
per-token rescaling, which matters most for small models and short sequences.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import DEBUG_KEY, LAYER_KEY, LowbitPass
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.quantized import require_quantized
from lowbit.compiler.core.results import PassRecord

#: on the Split node: the debug ids of the MatMuls its outputs stand for, in output order
DEBUG_IDS_KEY = "lowbit.debug_ids"


@dataclasses.dataclass
class _Weight:
    """A linear's ``DequantizeLinear`` weight: codes ``[K, N]``, scale ``[N]`` (per channel) or
    ``[G, N]`` (blocks of ``block`` input features), zero point like the scale or None."""

    dq: ir.Node
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    block: int | None


def _dq_weight(node: ir.Node) -> _Weight | None:
    """The quantized weight of ``MatMul(x, DequantizeLinear(codes, scale[, zero_point]))``: per channel
    (``axis`` 1, no zero point or a zero one) or blocked (``axis`` 0, ``block_size``); else None."""
    w = node.inputs[1]
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(w.uses()) != 1:
        return None
    q, s = dq.inputs[0].const_value, dq.inputs[1].const_value
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if q is None or s is None or len(q.shape) != 2 or (zp is not None and zp.const_value is None):
        return None
    zero = zp.const_value.numpy() if zp is not None else None
    axis = dq.attributes.get("axis")
    axis = axis.value if axis is not None else 1
    block = dq.attributes.get("block_size")
    block = block.value if block is not None else 0
    if block == 0 and axis in (1, -1) and len(s.shape) == 1:
        if zero is not None and np.any(zero):
            return None
        return _Weight(dq, q.numpy(), s.numpy(), None, None)
    if block > 0 and axis in (0, -2) and len(s.shape) == 2 and (zero is None or zero.shape == tuple(s.shape)):
        return _Weight(dq, q.numpy(), s.numpy(), zero, block)
    return None


@dataclasses.dataclass(frozen=True)
class FuseLinearsOptions(PassOptions):
    min_group: int = option(2, "fuse groups of at least this many linears.")


@dataclasses.dataclass
class FuseLinearsRecord(PassRecord):
    """The layers fused into one linear, one list per group (the manifest's ``fused_with``)."""

    groups: list[list[str]]

    def fused_groups(self) -> list[list[str]]:
        return self.groups


class FuseSharedInputLinearsPass(LowbitPass):
    """Merge quantized linears (per channel, or in blocks of input features) that share an input and a plan.

    In place. Requires ``quantize-weights`` to have run (every planned integer
    weight quantized). Linears with different plans (precision, activation
    mode) stay apart. Options: :class:`FuseLinearsOptions`; record:
    :class:`FuseLinearsRecord`.
    """

    name = "fuse-linears"
    Options = FuseLinearsOptions

    def requires(self, model: ir.Model) -> None:
        plan = read_plan(model)
        if plan is not None:  # without a plan, quantized weights (if any) are fused as they are
            require_quantized(model.graph, plan, self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        groups: dict[tuple, list] = {}
        for node in graph:
            if node.op_type != "MatMul" or node.domain != "":
                continue
            found = _dq_weight(node)
            if found is None:
                continue
            layer = found.dq.metadata_props.get(LAYER_KEY, node.name)
            lp = plan.layers.get(layer) if plan else None
            key = (id(node.inputs[0]), repr(lp and (lp.precision, lp.activations, lp.symmetric, lp.group_size)),
                   found.codes.dtype.str, found.block, found.zero is not None)
            groups.setdefault(key, []).append((node, layer, found))
        fused = []
        for members in groups.values():
            if len(members) >= self.min_group:
                self._fuse(graph, members)
                fused.append([m[1] for m in members])
        if fused:
            RemoveUnusedNodesPass()(model)  # the separate weights are gone
        return self.result(model, bool(fused), FuseLinearsRecord(fused))

    def _fuse(self, graph: ir.Graph, members: list) -> None:
        first, layer = members[0][0], members[0][1]
        weights = [m[2] for m in members]
        block = weights[0].block
        name = "+".join(m[1] for m in members)
        inputs = [
            add_initializer(graph, f"{name}.weight_q", np.concatenate([w.codes for w in weights], axis=1)),
            add_initializer(graph, f"{name}.weight_scale", np.concatenate([w.scale for w in weights], axis=-1)),
        ]
        if weights[0].zero is not None:
            inputs.append(add_initializer(graph, f"{name}.weight_zero_point", np.concatenate([w.zero for w in weights], axis=1)))
        attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
        dq = self.tag(ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}/weight_dq"), layer)
        matmul = self.tag(ir.node("MatMul", [first.inputs[0], dq.outputs[0]], name=f"{name}/matmul"), layer)
        sizes = add_initializer(graph, f"{name}.split", np.array([w.codes.shape[1] for w in weights], np.int64))
        split = self.tag(
            ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(members), name=f"{name}/split"),
            layer,
        )
        ids = [m[0].metadata_props.get(DEBUG_KEY, "") for m in members]
        split.metadata_props[DEBUG_IDS_KEY] = ",".join(ids)
        matmul.metadata_props[DEBUG_KEY] = "+".join(ids)  # carried on by the lowering
        graph.insert_before(first, [dq, matmul, split])
        for (node, _, _), out in zip(members, split.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            replace_value(node.outputs[0], out)
        for node, _, w in members:
            graph.remove([node, w.dq], safe=True)
