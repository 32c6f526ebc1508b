"""Quantize weights (and static activations) as the plan says, in QDQ form.

For every linear whose plan has integer weights, the fp32 weight ``W[K, N]``
becomes ``DequantizeLinear(W_q, s, axis=1)`` with ``W_q`` int8 and one scale
per output channel (symmetric: ``s_n = clip_n / 127``, ``W_q = round(W / s)``
clipped to [-127, 127]). ``clip_n`` is the channel's absmax (``rtn``) or the
ratio of it that minimises the channel's squared error (``mse``, searched on
a grid). A channel that is all zero gets ``s = 1`` and quantizes exactly.

Static activations (plan ``activations = "static"``) get a
``QuantizeLinear -> DequantizeLinear`` pair (uint8, asymmetric, per tensor)
whose range is the calibrated percentile range of the tensor. Dynamic
activations need nothing here: the lowering computes per-token scales at run
time.

The result is standard ONNX QDQ: backend-neutral, runnable as is (a
simulation of the quantized model), and what every backend lowers from.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.compiler.errors import CalibrationError, InputError
from lowbit.compiler.irutil import add_initializer
from lowbit.compiler.passbase import LowbitPass
from lowbit.compiler.plan import read_plan
from lowbit.compiler.registry import register_pass
from lowbit.passes.recognize import find_linears


def quantize_per_channel(
    w: np.ndarray, bits: int = 8, algorithm: str = "rtn", grid: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of ``w[K, N]``: (w_q int8, scale[N])."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(w).max(axis=0).astype(np.float32)
    clip = absmax.copy()
    if algorithm == "mse":
        best = np.full(w.shape[1], np.inf, np.float32)
        for ratio in np.linspace(1.0, 0.5, grid):
            s = np.where(absmax > 0, absmax * ratio / qmax, 1.0).astype(np.float32)
            err = ((np.clip(np.round(w / s), -qmax, qmax) * s - w) ** 2).sum(axis=0)
            better = err < best
            best[better], clip[better] = err[better], (absmax * ratio)[better]
    scale = np.where(clip > 0, clip / qmax, 1.0).astype(np.float32)
    w_q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
    return w_q, scale


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric (scale, zero point) covering [lo, hi] (which must hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero_point)


@register_pass
class QuantizeWeightsPass(LowbitPass):
    """Replace planned weights by int8 + DequantizeLinear; add static activation QDQ.

    In place. Requires a plan (a planner pass) and, for static activations,
    calibration statistics.

    Options:
        static_percentile: percentile of each sign's values kept by the static activation range.
        mse_grid: clipping ratios tried by the "mse" weight algorithm.
        zero_channels: an all-zero output channel is "error" (often a broken checkpoint) or "keep" (quantized exactly to 0).
    """

    name = "quantize-weights"

    def __init__(self, *, static_percentile: float = 99.99, mse_grid: int = 20, zero_channels: str = "error") -> None:
        super().__init__()
        if zero_channels not in ("error", "keep"):
            raise ValueError(f"zero_channels must be 'error' or 'keep', not {zero_channels!r}")
        self.static_percentile = static_percentile
        self.mse_grid = mse_grid
        self.zero_channels = zero_channels

    def requires(self, model: ir.Model) -> None:
        if read_plan(model) is None:
            raise InputError("quantize-weights needs a plan: put a planner pass (e.g. 'plan') before it")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        table = self.context.notes.setdefault("layers", {})
        act_qdq: dict[int, ir.Value] = {}
        modified = False
        for lin in find_linears(graph)[0]:
            lp = plan.layers.get(lin.name)
            if lp is None or lp.weight_bits is None:
                continue
            w = lin.weight_array.astype(np.float32)
            if not np.isfinite(w).all():
                raise InputError(f"layer {lin.name}: weight contains NaN or infinity")
            zero = np.flatnonzero(np.abs(w).max(axis=0) == 0)
            if zero.size and self.zero_channels == "error":
                raise InputError(
                    f"layer {lin.name}: {zero.size} output channel(s) of the weight are all zero (first: {zero[0]}); "
                    "a broken checkpoint? To quantize them exactly to zero, --set quantize-weights.zero_channels=keep"
                )
            w_q, scale = quantize_per_channel(w, lp.weight_bits, lp.weight_algorithm, self.mse_grid)
            wq_v = add_initializer(graph, f"{lin.name}.weight_q", w_q)
            s_v = add_initializer(graph, f"{lin.name}.weight_scale", scale)
            dq = self.tag(ir.node("DequantizeLinear", [wq_v, s_v], attributes={"axis": 1},
                                  name=f"{lin.name}/weight_dq"), lin.name)
            dq.outputs[0].name = f"{lin.name}.weight_dq"
            graph.insert_before(lin.node, dq)
            lin.node.replace_input_with(1, dq.outputs[0])
            entry = {
                "precision": lp.precision,
                "weight_bits": lp.weight_bits,
                "granularity": lp.granularity,
                "weight_algorithm": lp.weight_algorithm,
                "shape": list(lin.shape),
                "weight_scale": {"min": float(scale.min()), "max": float(scale.max()), "mean": float(scale.mean())},
                "weight_rel_error": float(np.linalg.norm(w_q * scale - w) / max(np.linalg.norm(w), 1e-30)),
            }
            if zero.size:
                entry["zero_channels"] = int(zero.size)
            if lp.activation_bits:
                entry["activations"] = lp.activations
            if lp.activation_bits and lp.activations == "static":
                x_dq = act_qdq.get(id(lin.x))
                if x_dq is None:
                    x_dq = self._static_qdq(graph, lin)
                    act_qdq[id(lin.x)] = x_dq
                lin.node.replace_input_with(0, x_dq)
                q = x_dq.producer().inputs[0].producer()
                entry["act_scale"] = float(q.inputs[1].const_value.numpy())
                entry["act_zero_point"] = int(q.inputs[2].const_value.numpy())
            table[lin.name] = entry
            modified = True
        return ir.passes.PassResult(model, modified)

    def _static_qdq(self, graph: ir.Graph, lin) -> ir.Value:
        obs = self.context.stats.get(lin.x.name)
        if obs is None:
            raise CalibrationError(f"layer {lin.name}: static activations but no calibration statistics for its input")
        scale, zp = activation_qparams(*obs.percentile_range(self.static_percentile))
        base = lin.x.name
        s_v = add_initializer(graph, f"{base}.act_scale", np.array(scale, np.float32))
        z_v = add_initializer(graph, f"{base}.act_zero_point", np.array(zp, np.uint8))
        q = self.tag(ir.node("QuantizeLinear", [lin.x, s_v, z_v], name=f"{base}/act_q"), lin.name)
        dq = self.tag(ir.node("DequantizeLinear", [q.outputs[0], s_v, z_v], name=f"{base}/act_dq"), lin.name)
        q.outputs[0].name, dq.outputs[0].name = f"{base}.q", f"{base}.dq"
        producer = lin.x.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(next(iter(graph)), [q, dq])
        return dq.outputs[0]
