"""Fuse linears that read one tensor into one wider linear (horizontal fusion).

Q/K/V read the same normalised hidden state, and so do gate/up. After weight
quantization each is ``MatMul(x, DequantizeLinear(W_q, s, axis=1))``. When
their plans agree, they become one::

    MatMul(x, DequantizeLinear([W_q1 | W_q2 | W_q3], [s1 | s2 | s3], axis=1)) -> Split(axis=-1)

Concatenating output columns is exact, so the function does not change. A
backend then quantizes ``x`` once and runs one integer GEMM instead of three:
fewer kernel launches, one packing of the activations, and one copy of the
per-token rescaling, which matters most for small models and short sequences.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.compiler.irutil import add_initializer, replace_value
from lowbit.compiler.passbase import DEBUG_KEY, LAYER_KEY, LowbitPass
from lowbit.compiler.plan import read_plan
from lowbit.compiler.registry import register_pass

#: on the Split node: the debug ids of the MatMuls its outputs stand for, in output order
DEBUG_IDS_KEY = "lowbit.debug_ids"


def _per_channel_dq(node: ir.Node):
    """(dq node, W_q, scale) for ``MatMul(x, DequantizeLinear(int8, scale[N], axis=1))``, else None."""
    w = node.inputs[1]
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(w.uses()) != 1:
        return None
    q, s = dq.inputs[0].const_value, dq.inputs[1].const_value
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    axis = dq.attributes.get("axis")
    if q is None or s is None or (zp is not None and zp.const_value is not None and np.any(zp.const_value.numpy())):
        return None
    if len(q.shape) != 2 or len(s.shape) != 1 or (axis.value if axis else 1) not in (1, -1) or "block_size" in dq.attributes:
        return None
    return dq, q.numpy(), s.numpy()


@register_pass
class FuseSharedInputLinearsPass(LowbitPass):
    """Merge per-channel quantized linears that share an input and a plan.

    In place. Precondition: ``quantize-weights`` has run. Linears with different
    plans (precision, activation mode) stay apart.

    Options:
        min_group: fuse groups of at least this many linears.
    """

    name = "fuse-linears"

    def __init__(self, *, min_group: int = 2) -> None:
        super().__init__()
        self.min_group = min_group

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        groups: dict[tuple, list] = {}
        for node in graph:
            if node.op_type != "MatMul" or node.domain != "":
                continue
            found = _per_channel_dq(node)
            if found is None:
                continue
            layer = found[0].metadata_props.get(LAYER_KEY, node.name)
            lp = plan.layers.get(layer) if plan else None
            key = (id(node.inputs[0]), repr(lp and (lp.precision, lp.activations, lp.symmetric)), found[1].dtype.str)
            groups.setdefault(key, []).append((node, layer, *found))
        fused = []
        for members in groups.values():
            if len(members) >= self.min_group:
                self._fuse(graph, members)
                fused.append([m[1] for m in members])
        if fused:
            RemoveUnusedNodesPass()(model)  # the separate weights are gone
        self.context.notes["fuse-linears"] = {"groups": fused}
        return ir.passes.PassResult(model, bool(fused))

    def _fuse(self, graph: ir.Graph, members: list) -> None:
        first, layer = members[0][0], members[0][1]
        w_q = np.concatenate([m[3] for m in members], axis=1)
        scale = np.concatenate([m[4] for m in members], axis=0)
        name = "+".join(m[1] for m in members)
        wq_v = add_initializer(graph, f"{name}.weight_q", w_q)
        s_v = add_initializer(graph, f"{name}.weight_scale", scale)
        dq = self.tag(ir.node("DequantizeLinear", [wq_v, s_v], attributes={"axis": 1}, name=f"{name}/weight_dq"), layer)
        matmul = self.tag(ir.node("MatMul", [first.inputs[0], dq.outputs[0]], name=f"{name}/matmul"), layer)
        sizes = add_initializer(graph, f"{name}.split", np.array([m[3].shape[1] for m in members], np.int64))
        split = self.tag(
            ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(members), name=f"{name}/split"),
            layer,
        )
        ids = [m[0].metadata_props.get(DEBUG_KEY, "") for m in members]
        split.metadata_props[DEBUG_IDS_KEY] = ",".join(ids)
        matmul.metadata_props[DEBUG_KEY] = "+".join(ids)  # carried on by the lowering
        graph.insert_before(first, [dq, matmul, split])
        for (node, *_), out in zip(members, split.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            replace_value(node.outputs[0], out)
        for node, _, old_dq, *_ in members:
            graph.remove([node, old_dq], safe=True)
