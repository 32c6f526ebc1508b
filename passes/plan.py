"""Plan a uniform precision for every linear, with reasoned exceptions.

The planner is policy only: it decides, per linear layer, the precision,
activation mode and weight algorithm, and writes the plan on the model; it
rewrites nothing. Layers are kept in float when the recipe excludes them by
pattern, or when calibration showed activation outliers beyond
``max_outlier_ratio`` (max / median of the per-channel absmax of the layer's
input): per-token int8 spends its 255 levels on the outlier channel and
rounds the rest to a few levels.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError, OptionError
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.plan import (
    LayerPlan,
    Plan,
    check_override_globs,
    parse_override,
    read_plan,
    write_plan,
)
from lowbit.passes.recognize import find_linears, is_output_linear, layer_name


@dataclasses.dataclass(frozen=True)
class PlanOptions(PassOptions):
    precision: str = option("w8a8", 'precision of every linear: "w8a8", "w8a16", "w4a16", "w4a8" or "fp32".')
    activations: str = option("dynamic", '"dynamic" (per-token scales at run time), "dynamic-tensor" (one scale per '
                                         'tensor at run time) or "static" (calibrated, per tensor).')
    tensor_scale_max_bits: float = option(
        0.0, "with dynamic activations, give a layer one run-time scale per tensor (fewer operators, ORT's "
             "DynamicQuantizeMatMul) when calibration shows that costs its input at most this many bits of "
             "resolution against per-token scales (0: never).")
    weight_algorithm: str = option("rtn", '"rtn" (absmax), "mse" (clipping searched per scale) or "gptq" '
                                          '(needs calibration data).')
    group_size: int = option(0, "weight scales per group of this many input features (a power of two >= 16); "
                                "0: per channel.")
    symmetric: bool = option(True, "symmetric weights (no zero point); false: unsigned codes with zero points.")
    act_order: bool = option(False, "GPTQ: quantize input features in order of decreasing Hessian diagonal.")
    exclude: list[str] | None = option(None, "glob patterns of layer names kept in fp32.")
    max_outlier_ratio: float = option(0.0, "keep a layer in fp32 when its input's outlier ratio exceeds this "
                                           "(0: never).")
    keep_float_top: int = option(0, "keep the N layers with the largest input outlier ratio in fp32 (0: none).")
    output_precision: str = option(
        "", "precision of the output layers (a linear whose result is a graph output, up to reshaping and a "
            'bias: the LM head, a classifier); "": the same as every other layer. With 8-bit weights they are '
            "per channel and symmetric whatever group_size and symmetric say.")
    overrides: list[str] | None = option(None, '"GLOB=PRECISION" items applied last (the CLI\'s --override).')

    def __post_init__(self) -> None:
        # each setting alone, then together, as the plan's LayerPlan checks them
        for name, settings in (("precision", {"precision": self.precision}),
                               ("activations", {"activations": self.activations}),
                               ("weight_algorithm", {"weight_algorithm": self.weight_algorithm}),
                               ("group_size", {"group_size": self.group_size or None})):
            self._check_layer_plan(name, **settings)
        together = "act_order" if self.act_order and self.weight_algorithm != "gptq" else "activations"
        self._check_layer_plan(together, **self._layer_settings(self.precision))
        if self.output_precision:
            self._check_layer_plan("output_precision", precision=self.output_precision)
            self._check_layer_plan("output_precision", **self._layer_settings(self.output_precision))
        self.normalize("exclude", list(self.exclude or []))
        self.normalize("overrides", list(self.overrides or []))
        for item in self.overrides:  # each precision as this plan's settings would give it
            _, precision = parse_override(item)
            try:
                LayerPlan(**self._layer_settings(precision))
            except InputError as e:
                raise InputError(f"--override {item!r}: {e}") from None

    def _layer_settings(self, precision: str) -> dict:
        return {"precision": precision, "activations": self.activations, "weight_algorithm": self.weight_algorithm,
                "group_size": self.group_size or None, "symmetric": self.symmetric, "act_order": self.act_order}

    def _check_layer_plan(self, name: str, **settings) -> None:
        try:
            LayerPlan(**settings)
        except InputError as e:
            raise OptionError(None, name, getattr(self, name), f"is refused: {e}") from None


def planner_layer_names(model: ir.Model) -> set[str] | None:
    """The layer names a planner may see once the recipe's passes ran up to it, read off the imported model.

    Every linear's name (``find_linears``), with those of MatMuls whose weight is computed from constants only
    (constant folding makes it one) and of Gemms with such a weight (``canonicalize`` rewrites them into
    MatMuls named ``<gemm>.matmul`` that keep the Gemm's metadata): a superset, so a glob matching none of
    them matches no planned layer. None when the model has functions (inlined later, under names not known yet)."""
    if model.functions:
        return None
    graph = model.graph
    names = {lin.name for lin in find_linears(graph)[0]}
    constant: set[int] = {id(v) for v in graph.initializers.values() if v.const_value is not None}
    for node in graph:  # in order (the imported graph is sorted): computed from initializers and constants only
        if all(v is None or id(v) in constant or v.const_value is not None for v in node.inputs):
            constant.update(id(v) for v in node.outputs)

    def foldable(value: ir.Value | None) -> bool:
        return value is not None and (value.const_value is not None or id(value) in constant)

    for node in graph:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.inputs) > 1 \
                and foldable(node.inputs[1]):
            w = node.inputs[1]
            fallback = f"{node.name}.matmul" if node.op_type == "Gemm" else (
                node.name or (w.name or "matmul").removesuffix(".weight"))
            names.add(layer_name(node, fallback))
    return names


class PlanUniformPass(LowbitPass):
    """Write a plan giving every linear the same precision (metadata only).

    In place. An existing plan on the model is kept for layers it names
    (so a fed-back plan or an earlier planner wins), new layers are added.
    Static int8 activations need calibration statistics (a ``calibrate``
    before it); ``max_outlier_ratio`` and ``keep_float_top`` read them too.
    Options: :class:`PlanOptions`.
    """

    name = "plan"
    Options = PlanOptions

    def requires(self, model: ir.Model) -> None:
        if self.activations == "static" and not self.context.stats and self.precision == "w8a8":
            raise InputError(self.context.missing_stats("plan (static activation quantization)"))

    def ensures(self, model: ir.Model) -> None:
        if read_plan(model) is None:
            raise InputError("plan wrote no plan on the model")

    def check_model(self, model: ir.Model) -> None:
        """Before any pass runs: every override's glob matches a layer of the imported model."""
        if self.overrides:
            check_override_globs(self.overrides, planner_layer_names(model))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.metadata_props.get("lowbit.plan")
        linears, rejected = find_linears(model.graph)
        if not linears:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:3])
            raise InputError(
                "the model has no quantizable linear layer (no MatMul/Gemm with a constant 2-D float weight)"
                + (f" — {reasons}" if reasons else "")
            )
        plan = read_plan(model) or Plan()
        plan.skipped.update(rejected)
        stats = self.context.stats
        ratios = {
            lin.name: stats[lin.x.name].outlier_ratio() for lin in linears if lin.x.name in stats
        }
        top = set(sorted(ratios, key=ratios.get, reverse=True)[: self.keep_float_top])
        for lin in linears:
            if lin.name in plan.layers:
                continue
            precision, reason, output = self.precision, "uniform", False
            ratio = ratios.get(lin.name)
            if any(fnmatch.fnmatchcase(lin.name, p) for p in self.exclude):
                precision, reason = "fp32", "excluded by the recipe"
            elif lin.name in top:
                precision, reason = "fp32", f"among the {self.keep_float_top} largest input outlier ratios ({ratio:.0f})"
            elif self.max_outlier_ratio and ratio is not None and ratio > self.max_outlier_ratio:
                precision, reason = "fp32", f"input outlier ratio {ratio:.0f} > {self.max_outlier_ratio:g}"
            elif self.output_precision and is_output_linear(lin):
                precision, reason, output = self.output_precision, "output layer (the recipe's output_precision)", True
            lp = self._layer_plan(precision, reason)
            if output and lp.weight_bits == 8:
                # 8-bit weights need no groups or zero points: per channel and symmetric, as the int8 GEMMs take them
                lp = dataclasses.replace(lp, group_size=None, symmetric=True)
            plan.layers[lin.name] = lp
            obs = stats.get(lin.x.name)
            lost = obs.tensor_scale_bits() if obs is not None and self.tensor_scale_max_bits > 0 else None
            if lp.activations == "dynamic" and lp.activation_bits is not None and lost is not None and lost <= self.tensor_scale_max_bits:
                lp.activations = "dynamic-tensor"
                lp.reason = f"{reason}; one activation scale per tensor ({lost:.2f} bits lost)"
        plan.apply_overrides(self.overrides)
        write_plan(model, plan)
        return ir.passes.PassResult(model, model.metadata_props.get("lowbit.plan") != before)

    def _layer_plan(self, precision: str, reason: str) -> LayerPlan:
        return LayerPlan(
            precision=precision,
            activations=self.activations,
            weight_algorithm=self.weight_algorithm,
            group_size=self.group_size or None,
            symmetric=self.symmetric,
            act_order=self.act_order,
            reason=reason,
        )
