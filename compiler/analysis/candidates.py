"""The per-layer choices a mixed-precision planner picks from, and one linear lowered as each.

A *candidate* is one way to compile a linear layer: a precision of
``lowbit.compiler.core.plan.PRECISIONS`` with its granularity (per channel, or
groups of 32 / 128 input features) and weight algorithm. The default set is
what the ONNX Runtime lowering (``lowbit.backends.ort.lower``) runs:

=============  ==============================================  =========================================
candidate      weights                                         kernel after ``lower-ort``
=============  ==============================================  =========================================
fp32           float32                                         MatMul
w8a8           int8 per channel, RTN                           MatMulIntegerToFloat, uint8 per token
w8a16          int8 per channel, RTN                           DequantizeLinear -> MatMul (ORT fuses it)
w4a16-g32/128  int4 per group of 32 / 128 (GPTQ by default)    MatMulNBits, fp32 compute
w4a8-g32/128   int4 per group of 32 / 128 (GPTQ by default)    MatMulNBits, int8 activations per block
=============  ==============================================  =========================================

:func:`lower_linear` builds one linear, alone, as a small ONNX model, by the
very passes a compile runs (``quantize-weights`` then ``lower-ort``): the
sensitivity graph embeds these as branches, the cost table times and weighs
them, so what is measured is what the artifact runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.backends.ort.lower import LowerToORTPass
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import LAYER_KEY, CompileContext
from lowbit.compiler.core.plan import PRECISIONS, LayerPlan, Plan, write_plan
from lowbit.compiler.core.registry import resolve_pass
from lowbit.passes.quantize_weights import QuantizeWeightsPass


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to compile a linear: ``precision`` with ``group_size`` (None: per channel)."""

    precision: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} in a candidate (known: {', '.join(PRECISIONS)})")

    @property
    def name(self) -> str:
        return self.precision + (f"-g{self.group_size}" if self.group_size else "")

    @property
    def weight_bits(self) -> int | None:
        return PRECISIONS[self.precision][0]

    @property
    def activation_bits(self) -> int | None:
        return PRECISIONS[self.precision][1]

    def layer_plan(self, *, weight_algorithm_8bit: str = "rtn", weight_algorithm_4bit: str = "gptq",
                   act_order: bool = True, reason: str = "") -> LayerPlan:
        """The plan entry compiling a layer as this candidate (symmetric weights, dynamic activations)."""
        bits = self.weight_bits
        algo = "rtn" if bits is None else (weight_algorithm_8bit if bits >= 8 else weight_algorithm_4bit)
        return LayerPlan(
            precision=self.precision,
            symmetric=True,
            activations="dynamic",
            weight_algorithm=algo,
            group_size=self.group_size,
            act_order=act_order and algo == "gptq",
            reason=reason,
        )

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``"w4a16-g128"`` -> Candidate("w4a16", 128); ``"w8a8"`` -> per channel."""
        precision, sep, group = text.strip().partition("-g")
        try:
            size = int(group) if sep else None
        except ValueError:
            raise InputError(f"candidate {text!r}: expected PRECISION or PRECISION-gGROUP (e.g. w4a16-g128)") from None
        if size is not None:
            LayerPlan(precision="w4a16", group_size=size)  # validates the group size
        return cls(precision, size)


DEFAULT_CANDIDATES: tuple[str, ...] = (
    "fp32", "w8a8", "w8a16", "w4a16-g32", "w4a16-g128", "w4a8-g32", "w4a8-g128",
)


def parse_candidates(names: Sequence[str]) -> list[Candidate]:
    out = [Candidate.parse(n) for n in names]
    if len({c.name for c in out}) != len(out):
        raise InputError(f"candidates listed twice: {', '.join(names)}")
    if not any(c.weight_bits is None for c in out):
        out.insert(0, Candidate("fp32"))  # the reference every sensitivity is measured against
    return out


def lower_linear(
    weight: np.ndarray,
    candidate: Candidate,
    *,
    layer: str,
    input_name: str,
    opset_imports: Mapping[str, int],
    layer_plan: LayerPlan | None = None,
    stats: Mapping[str, Any] | None = None,
    hessian: np.ndarray | None = None,
    lower_options: Mapping[str, Any] | None = None,
    quantize_options: Mapping[str, Any] | None = None,
    quantized: dict | None = None,
    lowering: str = "lower-ort",
) -> ir.Model:
    """``y = x @ weight`` compiled as ``candidate``: a standalone model with input ``input_name``
    (``[batch, seq, K]`` float) and output ``y``.

    The weight is quantized by ``quantize-weights`` and lowered by ``lower-ort`` with
    ``layer_plan`` (default: ``candidate.layer_plan()``); ``stats`` (calibration observers by
    tensor name) give ``lower-ort`` the shared per-token zero point of ``input_name``;
    ``hessian`` (``X^T X / T`` of the layer's input) serves GPTQ. ``quantized``: a dict
    that keeps each quantized weight, so candidates differing only in their kernel (W4A16
    and W4A8 of one group size) quantize once. ``lowering``: the lowering pass by registry
    name (a backend's ``lowering``; another one than ``lower-ort`` may leave a model ORT
    cannot run, whose bytes still count).
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = w.shape
    x = ir.Value(name=input_name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", k]))
    w_v = ir.Value(name=f"{layer}.weight", const_value=ir.tensor(w, name=f"{layer}.weight"),
                   type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]))
    node = ir.node("MatMul", [x, w_v], name=f"{layer}/MatMul")
    node.metadata_props[LAYER_KEY] = layer
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", "seq", n])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w_v], opset_imports=dict(opset_imports), name=layer)
    model = ir.Model(graph, ir_version=10)
    if candidate.weight_bits is None:
        return model
    lp = layer_plan or candidate.layer_plan()
    context = CompileContext(stats=dict(stats or {}), progress=False)
    # W4A16 and W4A8 of one group size share their quantized weight (only the kernel differs)
    key = (layer, lp.weight_bits, lp.group_size, lp.symmetric, lp.weight_algorithm, lp.act_order)
    if quantized is not None and key in quantized:
        model = ir.from_proto(quantized[key])
        write_plan(model, Plan(layers={layer: lp}))
    else:
        write_plan(model, Plan(layers={layer: lp}))
        qw = QuantizeWithHessians({input_name: hessian} if hessian is not None else {}, **dict(quantize_options or {}))
        if lp.weight_algorithm == "gptq" and hessian is None:
            raise InputError(f"layer {layer}: GPTQ needs the Hessian of its input")
        qw.context = context
        qw(model)
        if quantized is not None:
            quantized[key] = ir.to_proto(model)
    lower = (LowerToORTPass if lowering == "lower-ort" else resolve_pass(lowering))(**dict(lower_options or {}))
    lower.context = context
    lower(model)
    # a layer the lowering leaves in QDQ form (w8a16) still holds its float weight: drop it, as
    # the artifact's clean-up does
    RemoveUnusedNodesPass()(model)
    return model


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of ``model`` (what a lowered linear stores)."""
    return int(sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None))


class QuantizeWithHessians(QuantizeWeightsPass):
    """``quantize-weights`` with the GPTQ Hessians handed in (gathered once on the whole model)."""

    def __init__(self, hessians: dict[str, np.ndarray], **options: Any) -> None:
        super().__init__(**options)
        self._given = hessians

    def _hessians(self, model: ir.Model, layers: list) -> dict[str, np.ndarray]:
        return dict(self._given)
