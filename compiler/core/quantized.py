"""Quantized weights as the passes write them and the backends read them.

``quantize-weights`` turns a linear's weight into ``DequantizeLinear(codes, scale[,
zero_point])``; every lowering reads that form back (:func:`planned_linears`) into a
:class:`QuantizedWeight` and rewrites the linear into its own kernels. This module is
the one place that knows the form, so no backend imports a pass or another backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import LAYER_KEY, ONLINE_HADAMARD, ROLE_KEY


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized ``W[K, N]``: ``W ~ (codes - zero_point[group]) * scale[group]``.

    ``codes``: int8 (symmetric) or uint8 (asymmetric) ``[K, N]`` holding ``bits``-bit
    values; ``scale``: float32 ``[G, N]`` with ``G = ceil(K / group_size)`` (1 per
    channel); ``zero_point``: uint8 ``[G, N]`` or None (symmetric).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    group_size: int | None

    @property
    def block(self) -> int:
        """Rows per scale: ``group_size``, or K per channel."""
        return self.group_size or self.codes.shape[0]

    def expand(self, a: np.ndarray) -> np.ndarray:
        """Per-group ``[G, N]`` -> per-element ``[K, N]``."""
        return np.repeat(a, self.block, axis=0)[: self.codes.shape[0]]

    def dequantize(self) -> np.ndarray:
        zero = 0.0 if self.zero_point is None else self.expand(self.zero_point.astype(np.float32))
        return ((self.codes.astype(np.float32) - zero) * self.expand(self.scale)).astype(np.float32)


_BITS = {
    ir.DataType.INT8: 8,
    ir.DataType.UINT8: 8,
    ir.DataType.INT4: 4,
    ir.DataType.UINT4: 4,
}


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _int_array(a: np.ndarray) -> np.ndarray:
    """ml_dtypes int4/uint4 -> int8/uint8 (same values)."""
    if a.dtype == ml_dtypes.int4:
        return a.astype(np.int8)
    if a.dtype == ml_dtypes.uint4:
        return a.astype(np.uint8)
    return a


def weight_dequantize(node: ir.Node) -> tuple[ir.Node, QuantizedWeight] | None:
    """(DequantizeLinear node, weight) if ``node`` is a MatMul on a constant quantized weight.

    Accepts per-channel (``axis`` 1, scale ``[N]``) and blocked (``axis`` 0,
    ``block_size`` g, scale ``[ceil(K/g), N]``) forms with int8/uint8/int4/uint4 codes. Signed
    codes with a non-zero zero point are shifted into the unsigned form.
    """
    w = node.inputs[1]
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    codes_v = dq.inputs[0]
    if codes_v is None or codes_v.const_value is None or codes_v.const_value.dtype not in _BITS:
        return None
    bits = _BITS[codes_v.const_value.dtype]
    codes, scale = _int_array(_const(codes_v)), _const(dq.inputs[1])
    zero = _const(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if scale is None or codes.ndim != 2 or (len(dq.inputs) > 2 and dq.inputs[2] is not None and zero is None):
        return None
    k, n = codes.shape
    axis_attr, block_attr = dq.attributes.get("axis"), dq.attributes.get("block_size")
    axis = axis_attr.value if axis_attr is not None else 1
    block = block_attr.value if block_attr is not None else 0
    if block == 0 and axis in (1, -1) and scale.shape == (n,):
        group, scale = None, scale.reshape(1, n)
    elif block > 0 and axis in (0, -2) and scale.shape == (-(-k // block), n):
        group = block
    else:
        return None
    if zero is not None:
        zero = _int_array(zero).reshape(scale.shape)
        if codes.dtype.kind == "i":
            if not zero.any():
                zero = None
            else:  # signed codes with an offset: the same values as unsigned codes and zero points
                shift = 2 ** (bits - 1)
                codes = (codes.astype(np.int16) + shift).astype(np.uint8)
                zero = (zero.astype(np.int16) + shift).astype(np.uint8)
    elif codes.dtype.kind == "u":
        zero = np.zeros(scale.shape, np.uint8)
    return dq, QuantizedWeight(codes, scale.astype(np.float32), zero, bits, group)


def unquantized_layers(graph: ir.Graph, plan) -> list[str]:
    """Layers ``plan`` gives integer weights whose MatMul still reads a float constant weight.

    Empty once ``quantize-weights`` has run: what a pass that consumes quantized weights
    (fusion, the lowerings) checks in ``requires``. A layer is named as ``recognize`` tags
    it (else by its node's name); the MatMuls of an online rotation are not layers.
    """
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or node.metadata_props.get(ROLE_KEY) == ONLINE_HADAMARD:
            continue
        x, w = node.inputs[0], node.inputs[1]
        const = w.const_value if w is not None else None
        if const is None or len(const.shape) != 2 or not const.dtype.is_floating_point():
            continue
        if x is not None and x.const_value is not None:
            continue
        layer = node.metadata_props.get(LAYER_KEY) or node.name
        lp = plan.layers.get(layer)
        if lp is not None and lp.weight_bits is not None:
            found.append(layer)
    return found


def require_quantized(graph: ir.Graph, plan, pass_name: str) -> None:
    """The ``requires`` of a pass that consumes ``quantize-weights``'s output: a plan, and its weights quantized."""
    if plan is None:
        raise InputError(f"{pass_name} needs a plan: put a planner pass (e.g. 'plan') and 'quantize-weights' before it")
    left = unquantized_layers(graph, plan)
    if left:
        raise InputError(
            f"{pass_name} needs quantized weights, and {len(left)} planned layer(s) still have float weights "
            f"(e.g. {left[0]}, planned {plan.layers[left[0]].precision}): put 'quantize-weights' before '{pass_name}'"
        )


def planned_linears(graph: ir.Graph, plan) -> Iterator[tuple[ir.Node, str, Any, QuantizedWeight]]:
    """``(MatMul, layer name, its LayerPlan, quantized weight)`` for every planned linear of
    ``graph`` whose weight is a quantized constant (a snapshot: the caller may rewrite)."""
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        found = weight_dequantize(node)
        if found is None:
            continue
        dq, qw = found
        layer = dq.metadata_props.get(LAYER_KEY) or node.metadata_props.get(LAYER_KEY, node.name)
        lp = plan.layers.get(layer)
        if lp is not None:
            yield node, layer, lp, qw


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
