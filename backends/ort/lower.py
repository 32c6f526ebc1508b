"""Lower lowbit's quantized IR (QDQ form + plan) to ONNX Runtime's integer kernels.

Input: linears whose weight is ``DequantizeLinear(codes, scale[, zero_point])``
(from ``quantize-weights``: per channel ``axis=1``, or blocked ``axis=0,
block_size=g``; int8/uint8/int4/uint4 codes), the plan on the model, and for
static activations a ``QuantizeLinear -> DequantizeLinear`` pair on the input.
Output, per layer, the pattern measured fastest (``benchmarks/kernels/ort_linear_kernels.py``
for int8, ``benchmarks/kernels/ort_nbits_kernels.py`` for 4-bit; see
``lowbit.backends.ort.qlinear`` and ``lowbit.backends.ort.nbits``):

* int8 per-channel symmetric weights with int8 activations (W8A8):
  dynamic: per-token uint8 quantization at run time and
  ``com.microsoft.MatMulIntegerToFloat`` with the exact zero-point correction;
  dynamic-tensor: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul``, which ORT
  fuses into ``com.microsoft.DynamicQuantizeMatMul`` (one scale for the tensor);
  static: ``QuantizeLinear(uint8) -> com.microsoft.MatMulIntegerToFloat``;
* 4-bit weights (W4A16, W4A8), per group or per channel, symmetric or not:
  ``com.microsoft.MatMulNBits`` (packed 4-bit weights, block = group size; a
  per-channel weight repeats its scale in every block), ``accuracy_level`` 0
  (fp32 compute) without activation bits, 4 (int8 activations per row and
  K-block, quantized inside the kernel) with 8 activation bits;
* 8-bit weights that are group-wise or asymmetric, with int8 activations:
  ``MatMulNBits`` bits=8, ``accuracy_level`` 4;
* 8-bit weight-only layers (W8A16) keep ``DequantizeLinear -> MatMul``.
  ORT 1.32 itself rewrites that pair into ``MatMulNBits`` bits=8 at the session's
  ``session.qdq_matmulnbits_accuracy_level`` (default 4, int8 activations); the
  fp32-compute alternative (bits=8, accuracy_level 0) ran 30-100x *slower* than
  the fp32 MatMul at T=1 and 2x slower at T=128 (``ort_nbits_kernels.py``,
  ``w8a16_*_nbits_acc0``), so it is not written.

W4A8 by measurement (``ort_nbits_kernels.py``: 2 threads, SmolLM2-135M shapes,
speedup over the fp32 MatMul): ``MatMulNBits`` at accuracy_level 4 ran 1.9-3.4x at
T=1 and 0.9-1.6x at T=128, adding 1.2e-2 (block 32) to 2.3e-2 (block 128) relative
error for its activation quantization; the int8 GEMM (4-bit codes stored as int8,
per-token uint8 activations, ``MatMulIntegerToFloat``) 1.2-1.9x at T=1 and 2.5-3.1x at
T=128, adding 4.3e-2, with twice the weight bytes, and exact only for per-channel
weights. Decoding, where 4-bit weights pay, takes ``MatMulNBits`` (the default);
``w4a8_kernel="int8-gemm"`` picks the other for prefill-heavy use.

Linears reading one tensor (Q/K/V, gate/up) then share one quantization of it
(int8 path): duplicate constants are merged and common subexpressions
eliminated. The backend only lowers: precision and modes come from the plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    RemoveUnusedNodesPass,
)

from lowbit.backends.ort import nbits
from lowbit.backends.ort.qlinear import (
    emit_dynamic_per_tensor_linear,
    emit_dynamic_per_token_linear,
    emit_static_linear,
)
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.irutil import replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LAYER_KEY, LowbitPass, carry_debug_id
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.quantized import (
    QuantizedWeight,
    planned_linears,
    require_quantized,
    static_activation,
)
from lowbit.compiler.core.results import LoweringRecord


def nbits_layout(qw: QuantizedWeight) -> tuple[int, np.ndarray, np.ndarray | None] | None:
    """(MatMulNBits block size, scale, zero point per block) for ``qw``, or None.

    A group of ``g`` becomes blocks of the largest power of two >= 16 dividing ``g`` (``g``
    itself for the power-of-two groups the plan allows), a channel blocks of
    :func:`nbits.per_channel_block_size`; scales and zero points repeat per block, so the
    weight is represented exactly.
    """
    k = qw.codes.shape[0]
    if qw.group_size is None:
        block = nbits.per_channel_block_size(k)
    else:
        block = qw.group_size & -qw.group_size  # largest power of two dividing g
        if block < 16:
            return None
        block = min(block, qw.group_size)
    reps = qw.block // block if qw.group_size is not None else -(-k // block)
    blocks = -(-k // block)
    scale = np.repeat(qw.scale, reps, axis=0)[:blocks]
    zero = None if qw.zero_point is None else np.repeat(qw.zero_point, reps, axis=0)[:blocks]
    return block, scale, zero


@dataclasses.dataclass(frozen=True)
class LowerORTOptions(PassOptions):
    token_zero_point: str = option(
        "shared", 'zero point of per-token activations: "shared" (one per tensor, calibrated from the rows\' ranges: '
                  'no correction pass after the GEMM), "per-token" (exact range of every row, plus a correction '
                  'pass), or "symmetric" (128).')
    weight_only_accuracy_level: int = option(
        nbits.ACCURACY_FP32, "MatMulNBits accuracy_level for 4-bit weight-only layers (0/1 fp32, 4 int8 "
                             "activations: faster prefill, not W4A16).")
    w4a8_kernel: str = option(
        "nbits", '"nbits" (MatMulNBits, int8 activations per row and block: fastest at T=1, most exact) or '
                 '"int8-gemm" (per-channel symmetric 4-bit codes stored as int8 with per-token activations: ~2x '
                 'faster at T=128, twice the weight bytes; other 4-bit weights stay on "nbits").')

    def __post_init__(self) -> None:
        self.require(self.weight_only_accuracy_level in (0, 1, 2, 3, 4), "weight_only_accuracy_level", "must be 0-4")
        self.require(self.w4a8_kernel in ("nbits", "int8-gemm"), "w4a8_kernel", "must be 'nbits' or 'int8-gemm'")
        self.require(self.token_zero_point in ("shared", "per-token", "symmetric"), "token_zero_point",
                     "must be 'shared', 'per-token' or 'symmetric'")


@dataclasses.dataclass
class LowerORTRecord(LoweringRecord):
    """Layers lowered, per kernel; layers kept in QDQ form, with the reason."""

    kept_qdq: dict[str, str] = dataclasses.field(default_factory=dict)


class LowerToORTPass(LowbitPass):
    """Rewrite planned quantized linears into ONNX Runtime's integer kernels.

    In place. Requires a plan and ``quantize-weights`` to have run (QDQ
    weights), and default opset >= 13. Options: :class:`LowerORTOptions`;
    record: :class:`LowerORTRecord`.
    """

    name = "lower-ort"
    Options = LowerORTOptions

    def requires(self, model: ir.Model) -> None:
        require_quantized(model.graph, read_plan(model), self.name)
        if model.graph.opset_imports.get("", 0) < 13:
            raise InputError(f"lower-ort needs default opset >= 13, the model has {model.graph.opset_imports.get('')}")

    def _token_zero_point(self, x: ir.Value) -> dict:
        if self.token_zero_point == "symmetric":
            return {"symmetric": True}
        obs = self.context.stats.get(x.name)
        z = obs.shared_zero_point() if obs is not None and self.token_zero_point == "shared" else None
        return {"zero_point": z} if z is not None else {}  # no calibration rows: exact per-token zero points

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        by_layer: dict[str, str] = {}
        kernels: dict[str, int] = {}
        kept: dict[str, str] = {}
        for node, layer, lp, qw in planned_linears(graph, plan):
            y, kernel = self._lower(graph, node, layer, lp, qw)
            if y is None:
                kept[layer] = kernel
                continue
            carry_debug_id(node, y)
            replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
            kernels[kernel] = kernels.get(kernel, 0) + 1
            by_layer[layer] = kernel
        lowered = sum(kernels.values())
        if lowered:
            for n in graph:
                if n.metadata_props.get("lowbit.pass") == type(self).__name__ and LAYER_KEY not in n.metadata_props:
                    n.metadata_props[LAYER_KEY] = n.name.split("/")[0].removesuffix(".lowered")
            RemoveUnusedNodesPass()(model)
            DeduplicateInitializersPass()(model)
            CommonSubexpressionEliminationPass()(model)
            RemoveUnusedNodesPass()(model)
        return self.result(model, lowered > 0, LowerORTRecord(lowered, kernels, by_layer, kept))

    def _lower(self, graph: ir.Graph, node: ir.Node, layer: str, lp, qw: QuantizedWeight) -> tuple[ir.Value | None, str]:
        """The lowered output and a kernel label; (None, reason) when the QDQ pair stays."""
        x = node.inputs[0]
        name = f"{layer}.lowered"
        emit = {"pass_name": type(self).__name__, "insert_before": node, "name": name}
        a8 = lp.activation_bits is not None
        per_channel_sym = qw.group_size is None and qw.zero_point is None
        int8_gemm = per_channel_sym and (qw.bits == 8 or (qw.bits == 4 and self.w4a8_kernel == "int8-gemm"))
        if lp.activations == "static" and a8:
            static = static_activation(x)
            if static is None:
                raise InputError(f"layer {layer}: plan says static activations but its input has no QuantizeLinear/DequantizeLinear pair")
            if not (per_channel_sym and qw.bits == 8):
                raise InputError(f"layer {layer}: static activations need a symmetric per-channel int8 weight, "
                                 f"got {qw.bits}-bit {'per-group' if qw.group_size else 'per-channel'} "
                                 f"{'asymmetric' if qw.zero_point is not None else 'symmetric'}")
            x0, x_scale, x_zp = static
            return emit_static_linear(graph, x0, qw.codes, qw.scale[0], x_scale, x_zp, **emit), "MatMulIntegerToFloat(static)"
        if a8 and int8_gemm and lp.activations == "dynamic-tensor":
            y = emit_dynamic_per_tensor_linear(graph, x, qw.codes, qw.scale[0], **emit)
            return y, "DynamicQuantizeMatMul(per-tensor)"
        if a8 and int8_gemm:
            y = emit_dynamic_per_token_linear(graph, x, qw.codes, qw.scale[0], **self._token_zero_point(x), **emit)
            return y, "MatMulIntegerToFloat(per-token)"
        if qw.bits == 8 and not a8:
            return None, "8-bit weight-only: DequantizeLinear -> MatMul (ORT fuses it)"
        layout = nbits_layout(qw)
        if layout is None:
            return None, f"group size {qw.group_size} has no power-of-two block >= 16 for MatMulNBits"
        block, scale, zero = layout
        level = nbits.ACCURACY_INT8 if a8 else self.weight_only_accuracy_level
        y = nbits.emit_matmul_nbits(graph, x, qw.codes, scale, zero, bits=qw.bits, block_size=block,
                                    accuracy_level=level, **emit)
        return y, f"MatMulNBits(bits={qw.bits}, block={block}, accuracy_level={level})"
