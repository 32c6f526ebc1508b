"""Quantize weights (and static activations) as the plan says, in QDQ form.

For every linear whose plan has integer weights, the fp32 weight ``W[K, N]``
(``y = x @ W``) becomes ``DequantizeLinear(codes, scale[, zero_point])``:

* per channel (plan ``group_size`` none): one scale per output column,
  ``axis=1``, ``scale[N]``;
* per group: one scale per output column and per ``g`` consecutive input
  features, opset-21 blocked form ``axis=0, block_size=g``, ``scale[ceil(K/g), N]``.

Codes are ``int8`` / ``int4`` (symmetric, no zero point) or ``uint8`` / ``uint4``
(asymmetric, zero point of the same type, shaped like the scale); ONNX Runtime
runs all of them on CPU. The grid (:class:`Grid`), with ``w ~ (q - z) * s``:

* symmetric 8-bit: ``q`` in [-127, 127], ``s = clip / 127`` (the int8 GEMM
  lowering's convention);
* symmetric below 8 bits: ``q`` in [-2^(b-1), 2^(b-1) - 1], ``s = clip / (2^(b-1) - 1/2)``
  (GPTQ's symmetric grid: with one level in 16, using all of them matters, and both
  ``+clip`` and ``-clip`` stay within half a step of a level);
* asymmetric: ``q`` in [0, 2^b - 1] over ``[lo, hi] = [min(w, 0), max(w, 0)]``,
  ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)`` (zero stays exact).

``clip`` (or ``lo, hi``) comes from the weight algorithm: ``rtn`` takes the
group's absmax (min / max); ``mse`` shrinks it by the ratio in
``linspace(1, 0.5, mse_grid)`` that minimises the group's squared error (all
groups searched at once); ``gptq`` (``lowbit.passes.gptq``, Frantar et al. 2022,
arXiv 2210.17323) rounds one input feature at a time and spreads each rounding
error over the features not yet quantized, weighted by the inverse Hessian
``H = X^T X`` of the layer's calibration inputs ``X``, which it gathers by running
the graph over the calibration batches (one ``H`` per distinct input tensor, so
Q/K/V share one). A group or channel that is all zero gets ``s = 1`` and is exact.

Static activations (plan ``activations = "static"``) get a
``QuantizeLinear -> DequantizeLinear`` pair (uint8, asymmetric, per tensor)
whose range is the calibrated percentile range of the tensor. Dynamic
activations need nothing here: the lowering quantizes them at run time.

The result is standard ONNX QDQ: backend-neutral, runnable as is (a
simulation of the quantized model), and what every backend lowers from.
(ONNX Runtime 1.32, by default, runs a weight ``DequantizeLinear -> MatMul`` as
``MatMulNBits`` with int8 activations, ``session.qdq_matmulnbits_accuracy_level``
= 4; set it to 0, or disable ``QDQSelectorActionTransformer``, for an exact
weight-only simulation.)
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.errors import CalibrationError, InputError
from lowbit.compiler.core.irutil import add_initializer
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.plan import LayerPlan, read_plan
from lowbit.compiler.core.progress import progress
from lowbit.compiler.core.quantized import QuantizedWeight
from lowbit.compiler.core.results import PassRecord
from lowbit.passes import gptq
from lowbit.passes.recognize import find_linears


@dataclasses.dataclass(frozen=True)
class Grid:
    """The integer grid of ``bits``-bit codes: ``w ~ (q - z) * s``, ``q`` in [qmin, qmax]."""

    bits: int
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -127 if self.bits == 8 else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def half_range(self) -> float:
        """Symmetric: the (real-valued) code that ``clip`` maps to."""
        return 127.0 if self.bits == 8 else 2 ** (self.bits - 1) - 0.5

    def params(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) covering ``[lo, hi]`` (``lo <= 0 <= hi``), elementwise."""
        if self.symmetric:
            clip = np.maximum(-lo, hi)
            scale = np.where(clip > 0, clip / self.half_range, 1.0)
            return scale.astype(np.float32), np.zeros_like(scale, np.float32)
        span = hi - lo
        scale = np.where(span > 0, span / self.qmax, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, self.qmax).astype(np.float32)
        return scale, zero

    def quantize(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Codes (as floats) of ``w`` on the grid ``(scale, zero)`` (broadcast)."""
        return np.clip(np.round(w / scale) + zero, self.qmin, self.qmax)

    def fit(
        self, w: np.ndarray, algorithm: str = "rtn", grid: int = 20, axis: int = -2, importance: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) per slice of ``w`` along ``axis`` (rows of a group: ``[..., g, N]``).

        "rtn": the slice's own range; "mse": that range shrunk by the ratio in
        ``linspace(1, 0.5, grid)`` with the smallest squared error, per slice, each
        element's error weighted by ``importance`` (broadcast against ``w``) when given.
        """
        lo = np.minimum(w.min(axis=axis), 0).astype(np.float32)
        hi = np.maximum(w.max(axis=axis), 0).astype(np.float32)
        scale, zero = self.params(lo, hi)
        if algorithm != "mse":
            return scale, zero
        best = np.full(scale.shape, np.inf, np.float64)
        for ratio in np.linspace(1.0, 0.5, grid):
            s, z = self.params(lo * ratio, hi * ratio)
            se, ze = np.expand_dims(s, axis), np.expand_dims(z, axis)
            err = ((self.quantize(w, se, ze) - ze) * se - w) ** 2
            err = (err if importance is None else err * importance).sum(axis=axis)
            better = err < best
            best[better] = err[better]
            scale[better], zero[better] = s[better], z[better]
        return scale, zero


def group_view(w: np.ndarray, group_size: int | None) -> np.ndarray:
    """``w[K, N]`` -> ``[G, g, N]``, the last group padded with zero rows (exact on every grid)."""
    k, n = w.shape
    g = group_size or k
    groups = -(-k // g)
    if groups * g != k:
        w = np.concatenate([w, np.zeros((groups * g - k, n), w.dtype)])
    return w.reshape(groups, g, n)


def quantize_weight(
    w: np.ndarray,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    algorithm: str = "rtn",
    grid: int = 20,
) -> QuantizedWeight:
    """Quantize ``w[K, N]`` with RTN or MSE clipping, per channel or per group (vectorised)."""
    g = Grid(bits, symmetric)
    wg = group_view(np.asarray(w, np.float32), group_size)
    scale, zero = g.fit(wg, algorithm, grid, axis=1)
    codes = g.quantize(wg, scale[:, None], zero[:, None]).reshape(-1, w.shape[1])[: w.shape[0]]
    return _pack(codes, scale, zero, g, group_size)


def _pack(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid, group_size: int | None) -> QuantizedWeight:
    if grid.symmetric:
        return QuantizedWeight(codes.astype(np.int8), scale.astype(np.float32), None, grid.bits, group_size)
    return QuantizedWeight(codes.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8), grid.bits, group_size)


def quantize_per_channel(
    w: np.ndarray, bits: int = 8, algorithm: str = "rtn", grid: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of ``w[K, N]``: (w_q int8, scale[N])."""
    qw = quantize_weight(w, bits, algorithm=algorithm, grid=grid)
    return qw.codes, qw.scale[0]


def _storage(a: np.ndarray, bits: int) -> np.ndarray:
    """Codes or zero points in their ONNX element type: (u)int8, or (u)int4 for <= 4 bits."""
    if bits > 4:
        return a
    return a.astype(ml_dtypes.int4 if a.dtype.kind == "i" else ml_dtypes.uint4)


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric (scale, zero point) covering [lo, hi] (which must hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero_point)


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsOptions(PassOptions):
    static_percentile: float = option(99.99, "percentile of each sign's values kept by the static activation range.")
    mse_grid: int = option(20, 'clipping ratios tried by the "mse" weight algorithm (and by GPTQ\'s group fits with '
                               "gptq_clip_search).")
    zero_channels: str = option("error", 'an all-zero output channel is "error" (often a broken checkpoint) or '
                                         '"keep" (quantized exactly to 0).')
    gptq_percdamp: float = option(0.01, "GPTQ dampening, as a fraction of the mean Hessian diagonal added to it.")
    gptq_block_size: int = option(128, "GPTQ's lazy-update block (rows of W updated at once).")
    gptq_clip_search: bool = option(True, "GPTQ fits each group's scale by the MSE clipping search (else absmax).")
    gptq_weighted_fit: bool = option(True, "that search weights each input feature's error by its Hessian diagonal "
                                           "(mean x_k^2).")
    gptq_refit_scales: bool = option(True, "after GPTQ, re-solve each column's group scales by least squares on the "
                                           "output error.")
    hessian_memory_mb: float = option(2048, "memory for the Hessian sums gathered at once (more tensors: more passes "
                                            "over the data).")

    def __post_init__(self) -> None:
        self.require(self.zero_channels in ("error", "keep"), "zero_channels", "must be 'error' or 'keep'")
        self.require(0 <= self.gptq_percdamp < 1, "gptq_percdamp", "must be in [0, 1)")
        self.require(self.gptq_block_size >= 1, "gptq_block_size", "must be positive")


@dataclasses.dataclass
class QuantizeWeightsRecord(PassRecord):
    """One row per quantized linear: its plan, weight scales and errors (the manifest's layer table)."""

    section = "layers"
    layers: dict[str, dict] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return self.layers

    def layer_entries(self) -> dict[str, dict]:
        return self.layers


class QuantizeWeightsPass(LowbitPass):
    """Replace planned weights by integer codes + DequantizeLinear; add static activation QDQ.

    In place. Requires a plan (a planner pass); static activations need
    calibration statistics (a ``calibrate`` before it), and layers planned with
    ``gptq`` need calibration batches in the compile context (the driver provides
    them). Options: :class:`QuantizeWeightsOptions`; record:
    :class:`QuantizeWeightsRecord`.
    """

    name = "quantize-weights"
    Options = QuantizeWeightsOptions

    def requires(self, model: ir.Model) -> None:
        plan = read_plan(model)
        if plan is None:
            raise InputError("quantize-weights needs a plan: put a planner pass (e.g. 'plan') before it")
        static = [name for name, lp in plan.layers.items()
                  if lp.weight_bits is not None and lp.activation_bits is not None and lp.activations == "static"]
        if static and not self.context.stats:
            raise InputError(self.context.missing_stats(f"quantize-weights (static activations of {static[0]})"))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = read_plan(model)
        graph = model.graph
        table: dict[str, dict] = {}
        work = []
        for lin in find_linears(graph)[0]:
            lp = plan.layers.get(lin.name)
            if lp is None or lp.weight_bits is None:
                continue
            work.append((lin, lp, self._checked_weight(lin)))
        hessians = self._hessians(model, [(lin, lp) for lin, lp, _ in work])
        last_use = {lin.x.name: i for i, (lin, _, _) in enumerate(work)}
        act_qdq: dict[int, ir.Value] = {}
        items = progress(work, desc="quantizing weights", enabled=self.context.progress and bool(hessians))
        for i, (lin, lp, w) in enumerate(items):
            h = hessians.get(lin.x.name) if lp.weight_algorithm == "gptq" else None
            qw, entry = self._quantize(lin.name, w, lp, h)
            if last_use[lin.x.name] == i:
                hessians.pop(lin.x.name, None)  # K x K float64 each: free them as we go
            self._insert_dq(graph, lin, qw)
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
            entry["input"] = lin.x.name  # the calibration statistics of this tensor describe the layer's input
            table[lin.name] = entry
        return self.result(model, bool(work), QuantizeWeightsRecord(table))

    def _checked_weight(self, lin) -> np.ndarray:
        w = lin.weight_array.astype(np.float32)
        if not np.isfinite(w).all():
            raise InputError(f"layer {lin.name}: weight contains NaN or infinity")
        zero = np.flatnonzero(np.abs(w).max(axis=0) == 0)
        if zero.size and self.zero_channels == "error":
            raise InputError(
                f"layer {lin.name}: {zero.size} output channel(s) of the weight are all zero (first: {zero[0]}); "
                "a broken checkpoint? To quantize them exactly to zero, --set quantize-weights.zero_channels=keep"
            )
        return w

    def _hessians(self, model: ir.Model, layers: list) -> dict[str, np.ndarray]:
        """``X^T X / T`` per distinct input tensor of the layers planned with GPTQ (before any rewrite)."""
        inputs = {lin.x.name: lin.shape[0] for lin, lp in layers if lp.weight_algorithm == "gptq"}
        if not inputs:
            return {}
        if not self.context.calibration_batches:
            first = next(lin.name for lin, lp in layers if lp.weight_algorithm == "gptq")
            raise CalibrationError(
                f"layer {first}: weight_algorithm 'gptq' needs calibration data, and the compile context has none"
            )
        return gptq.collect_hessians(
            model, inputs, self.context.calibration_batches,
            memory_mb=self.hessian_memory_mb, show_progress=self.context.progress,
        )

    def _quantize(self, name: str, w: np.ndarray, lp: LayerPlan, h: np.ndarray | None) -> tuple[QuantizedWeight, dict]:
        grid = Grid(lp.weight_bits, lp.symmetric)
        entry: dict = {
            "precision": lp.precision,
            "weight_bits": lp.weight_bits,
            "granularity": lp.granularity,
            "group_size": lp.group_size,
            "symmetric": lp.symmetric,
            "weight_algorithm": lp.weight_algorithm,
            "shape": list(w.shape),
        }
        if lp.weight_algorithm == "gptq":
            fit_algo = "mse" if self.gptq_clip_search else "rtn"
            res = gptq.gptq_quantize(
                w, h,
                fit=lambda rows, h_diag: grid.fit(rows, fit_algo, self.mse_grid, axis=0,
                                                  importance=h_diag[:, None] if self.gptq_weighted_fit else None),
                quantize=grid.quantize,
                group_size=lp.group_size,
                act_order=lp.act_order,
                percdamp=self.gptq_percdamp,
                block_size=self.gptq_block_size,
                refit=self.gptq_refit_scales,
            )
            qw = _pack(res.codes, res.scale, res.zero, grid, lp.group_size)
            rtn = quantize_weight(w, lp.weight_bits, group_size=lp.group_size, symmetric=lp.symmetric)
            entry["act_order"] = lp.act_order
            entry["gptq"] = {"dead_inputs": res.dead, "damp": res.damp}
            entry["output_rel_error"] = gptq.output_error(w, qw.dequantize(), h)
            entry["output_rel_error_rtn"] = gptq.output_error(w, rtn.dequantize(), h)
        else:
            qw = quantize_weight(w, lp.weight_bits, group_size=lp.group_size, symmetric=lp.symmetric,
                                 algorithm=lp.weight_algorithm, grid=self.mse_grid)
        zero = int((np.abs(w).max(axis=0) == 0).sum())
        if zero:
            entry["zero_channels"] = zero
        scale = qw.scale
        entry["weight_scale"] = {"min": float(scale.min()), "max": float(scale.max()), "mean": float(scale.mean())}
        entry["weight_rel_error"] = float(np.linalg.norm(qw.dequantize() - w) / max(np.linalg.norm(w), 1e-30))
        return qw, entry

    def _insert_dq(self, graph: ir.Graph, lin, qw: QuantizedWeight) -> None:
        """``W`` -> ``DequantizeLinear(codes, scale[, zero_point])`` (per-axis or blocked)."""
        codes_v = add_initializer(graph, f"{lin.name}.weight_q", _storage(qw.codes, qw.bits))
        if qw.group_size is None:
            scale, zero, attrs = qw.scale[0], None if qw.zero_point is None else qw.zero_point[0], {"axis": 1}
        else:
            scale, zero, attrs = qw.scale, qw.zero_point, {"axis": 0, "block_size": qw.group_size}
        inputs = [codes_v, add_initializer(graph, f"{lin.name}.weight_scale", scale)]
        if zero is not None:
            inputs.append(add_initializer(graph, f"{lin.name}.weight_zero_point", _storage(zero, qw.bits)))
        dq = self.tag(ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{lin.name}/weight_dq"), lin.name)
        dq.outputs[0].name = f"{lin.name}.weight_dq"
        graph.insert_before(lin.node, dq)
        lin.node.replace_input_with(1, dq.outputs[0])

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
