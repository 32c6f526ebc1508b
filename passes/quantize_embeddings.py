"""Quantize embedding tables to int8, one scale per row (weight-only).

An embedding lookup ``Gather(E[V, D], ids)`` becomes::

    Gather(E_q[V, D]:int8, ids) -> Cast(float) -> Mul(Unsqueeze(Gather(s[V], ids), -1))

with ``s_v = max_d |E[v, d]| / 127`` and ``E_q = round(E / s)``. Only the
gathered rows are dequantized at run time (B x T x D values), so the cost is
negligible, while the table (often the largest single tensor of a small
language model: 49152 x 576 in SmolLM2) shrinks fourfold. An all-zero row gets
``s = 1`` and stays exactly zero.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass, carry_debug_id
from lowbit.compiler.core.results import PassRecord


def quantize_rows(table: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization of ``table[V, D]``: (int8 codes, scale[V])."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(table).max(axis=1).astype(np.float32)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.round(table / scale[:, None]), -qmax, qmax).astype(np.int8)
    return codes, scale


@dataclasses.dataclass(frozen=True)
class QuantizeEmbeddingsOptions(PassOptions):
    min_bytes: int = option(1 << 20, "leave smaller tables in float (they do not matter for size; every error counts).")


@dataclasses.dataclass
class QuantizeEmbeddingsRecord(PassRecord):
    quantized: dict[str, dict] = dataclasses.field(default_factory=dict)  # table -> shape, relative error
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # table -> why it stays float


class QuantizeEmbeddingsPass(LowbitPass):
    """Store Gather-ed embedding tables as int8 with per-row scales.

    In place. Acts on ``Gather`` (axis 0) whose data is a constant float 2-D
    initializer read by nothing else; others are skipped with a reason (its
    record: :class:`QuantizeEmbeddingsRecord`). Options:
    :class:`QuantizeEmbeddingsOptions`.
    """

    name = "quantize-embeddings"
    Options = QuantizeEmbeddingsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        record = QuantizeEmbeddingsRecord()
        modified = False
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "":
                continue
            table, ids = node.inputs[0], node.inputs[1]
            reason = self._reason(node, table)
            if reason:
                if table is not None and table.const_value is not None:
                    record.skipped[table.name] = reason
                continue
            arr = table.const_value.numpy().astype(np.float32)
            codes, scale = quantize_rows(arr)
            base = table.name
            codes_v = add_initializer(graph, f"{base}.q", codes)
            scale_v = add_initializer(graph, f"{base}.row_scale", scale)
            axes = add_initializer(graph, f"{base}.unsqueeze_axes", np.array([-1], np.int64))
            g_codes = ir.node("Gather", [codes_v, ids], attributes={"axis": 0}, name=f"{node.name}/codes")
            cast = ir.node("Cast", [g_codes.outputs[0]], attributes={"to": int(ir.DataType.FLOAT)}, name=f"{node.name}/cast")
            g_scale = ir.node("Gather", [scale_v, ids], attributes={"axis": 0}, name=f"{node.name}/scales")
            unsq = ir.node("Unsqueeze", [g_scale.outputs[0], axes], name=f"{node.name}/unsqueeze")
            mul = ir.node("Mul", [cast.outputs[0], unsq.outputs[0]], name=f"{node.name}/dequant")
            new_nodes = [g_codes, cast, g_scale, unsq, mul]
            for n in new_nodes:
                self.tag(n, base)
            graph.insert_before(node, new_nodes)
            out = mul.outputs[0]
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            carry_debug_id(node, out)
            replace_value(node.outputs[0], out)
            graph.remove(node, safe=True)
            record.quantized[base] = {
                "shape": list(arr.shape),
                "rel_error": float(np.linalg.norm(codes * scale[:, None] - arr) / max(np.linalg.norm(arr), 1e-30)),
            }
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return self.result(model, modified, record)

    def _reason(self, node: ir.Node, table: ir.Value | None) -> str | None:
        if table is None or table.const_value is None:
            return "table is not a constant initializer"
        if len(table.const_value.shape) != 2 or not table.const_value.dtype.is_floating_point():
            return "table is not a 2-D float tensor"
        axis = node.attributes.get("axis")
        if axis is not None and axis.value != 0:
            return f"Gather on axis {axis.value}"
        if len(table.uses()) != 1:
            return "table is read by other nodes too (tied weights)"
        if table.const_value.nbytes < self.min_bytes:
            return f"smaller than {self.min_bytes} bytes"
        return None
