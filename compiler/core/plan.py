"""The quantization plan: per layer, what to do (policy, no rewriting).

A planner pass writes the plan; quantize and lower passes consume it; a
backend only lowers. The plan is plain data, validated on construction,
serialised as JSON into the model's ``metadata_props`` (so it travels with
every IR dump) and into the artifact's manifest. A user can edit it
(``--override``) or feed one back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Any

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError

PLAN_KEY = "lowbit.plan"

#: precision name -> (weight bits, activation bits); None means float.
PRECISIONS: dict[str, tuple[int | None, int | None]] = {
    "fp32": (None, None),
    "w8a8": (8, 8),
    "w8a16": (8, None),
    "w4a16": (4, None),
    "w4a8": (4, 8),
}
ACTIVATION_MODES = ("dynamic", "dynamic-tensor", "static")
WEIGHT_ALGORITHMS = ("rtn", "mse", "gptq")
GRANULARITIES = ("per-channel", "per-group")


@dataclasses.dataclass
class LayerPlan:
    """What happens to one linear layer.

    Attributes:
        precision: a key of ``PRECISIONS`` ("fp32", "w8a8", "w8a16", "w4a16", "w4a8").
        symmetric: symmetric weights (signed codes, no zero point); False gives
            unsigned codes with a zero point per scale.
        activations: "dynamic" (computed at run time: per token for int8 weights,
            per row and K-block inside ORT's 4-bit kernel for w4a8), "dynamic-tensor"
            (one scale for the whole tensor, computed at run time: fewer operators,
            as accurate as per token where the rows have similar ranges; int8 weights
            only, 4-bit kernels quantize per row and block whatever this says) or
            "static" (per tensor, calibrated); ignored without activation quantization.
        weight_algorithm: "rtn" (round to nearest at absmax), "mse" (clipping ratio
            searched per scale to minimise the weight's squared error) or "gptq"
            (error-compensating rounding against calibration inputs, Frantar et al.).
        reason: why this precision was chosen (shown by ``lowbit inspect``).
        group_size: None for one scale per output channel; otherwise one scale (and
            zero point) per output channel and per ``group_size`` consecutive input
            features (rows of ``W[K, N]``). A power of two >= 16: the block sizes
            ORT's ``MatMulNBits`` (and every int4 GEMM kernel we know) takes.
        act_order: GPTQ only: quantize input features in order of decreasing
            Hessian diagonal (groups stay contiguous in the original order).
        sensitivity: set by a mixed-precision planner: the final-output error measured
            with this layer alone in this precision (``{"kl": ..., "dnll": ...}``).
        cost: set by a mixed-precision planner: this layer's measured cost in this
            precision (``{"bytes": ..., "bits_per_weight": ..., "latency_ms": ...}``).

    ``granularity`` ("per-channel" or "per-group") is derived from ``group_size``;
    it is written to JSON for readers, and accepted (checked) when read back.
    """

    precision: str = "w8a8"
    symmetric: bool = True
    activations: str = "dynamic"
    weight_algorithm: str = "rtn"
    reason: str = ""
    group_size: int | None = None
    act_order: bool = False
    sensitivity: dict[str, float] | None = None
    cost: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})")
        if self.activations not in ACTIVATION_MODES:
            raise InputError(f"unknown activation mode {self.activations!r} (known: {', '.join(ACTIVATION_MODES)})")
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise InputError(
                f"unknown weight algorithm {self.weight_algorithm!r} (known: {', '.join(WEIGHT_ALGORITHMS)})"
            )
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 16 or g & (g - 1)):
            raise InputError(f"group_size must be a power of two >= 16 (or none for per-channel), got {g!r}")
        if self.act_order and self.weight_algorithm != "gptq":
            raise InputError(f"act_order needs weight_algorithm 'gptq', not {self.weight_algorithm!r}")
        if self.weight_bits is None:
            return  # float: the weight options do not apply (an override may make it float)
        if self.activation_bits is not None and self.activations == "static" and (
            self.weight_bits != 8 or g is not None or not self.symmetric
        ):
            raise InputError(
                f"{self.precision} with static activations needs symmetric per-channel int8 weights "
                "(the static int8 GEMM has one weight scale per output channel and no weight zero point); "
                "use dynamic activations"
            )

    @property
    def granularity(self) -> str:
        return "per-channel" if self.group_size is None else "per-group"

    @property
    def weight_bits(self) -> int | None:
        return PRECISIONS[self.precision][0]

    @property
    def activation_bits(self) -> int | None:
        return PRECISIONS[self.precision][1]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self) | {"granularity": self.granularity}
        for key in ("sensitivity", "cost"):  # only a measuring planner sets them
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerPlan:
        data = dict(data)
        granularity = data.pop("granularity", None)
        if "group_size" in data and data["group_size"] == 0:
            data["group_size"] = None  # recipes and TOML have no null: 0 means per-channel
        lp = cls(**data)
        if granularity is not None and granularity != lp.granularity:
            if granularity not in GRANULARITIES:
                raise InputError(f"unsupported granularity {granularity!r} (supported: {', '.join(GRANULARITIES)})")
            raise InputError(f"granularity {granularity!r} contradicts group_size {lp.group_size!r}")
        return lp


@dataclasses.dataclass
class Plan:
    """Per-layer decisions plus the reasons layers were left alone."""

    layers: dict[str, LayerPlan] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": {k: v.to_json() for k, v in self.layers.items()},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        try:
            layers = {k: LayerPlan.from_json(v) for k, v in data.get("layers", {}).items()}
        except TypeError as e:
            raise InputError(f"invalid plan: {e}") from e
        return cls(layers=layers, skipped=dict(data.get("skipped", {})))

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``"GLOB=precision"`` overrides (``model.layers.*.mlp.down_proj=fp32``)."""
        for item in overrides:
            pattern, precision = parse_override(item)
            hits = [name for name in self.layers if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise InputError(f"--override {item!r}: no layer matches {pattern!r}")
            for name in hits:
                self.layers[name] = dataclasses.replace(
                    self.layers[name], precision=precision, reason=f"override {item}"
                )


def parse_override(item: Any, *, groups: bool = False) -> tuple[str, str]:
    """``"GLOB=PRECISION"`` -> ``(glob, precision)``, refusing what no layer could take: no ``=``, an empty glob,
    an unknown precision (``w3a8``). ``groups``: PRECISION may end in ``-gGROUP`` (the mixed planner's
    candidates), returned as written."""
    if not isinstance(item, str):
        raise InputError(f"--override {item!r}: expected a string LAYER_GLOB=PRECISION")
    pattern, sep, precision = item.partition("=")
    pattern, precision = pattern.strip(), precision.strip()
    if not sep or not pattern:
        raise InputError(f"--override {item!r}: expected LAYER_GLOB=PRECISION, e.g. 'model.layers.*.mlp.down_proj=fp32'")
    base = precision.partition("-g")[0] if groups else precision
    if base not in PRECISIONS:
        group = ", each optionally with -gGROUP" if groups else ""
        raise InputError(f"--override {item!r}: unknown precision {precision!r} (known: {', '.join(PRECISIONS)}{group})")
    return pattern, precision


def check_override_globs(overrides: list[str], names: set[str] | None, *, groups: bool = False) -> None:
    """Raise an ``InputError`` for the first override whose glob matches none of ``names`` (the layer
    names a planner will see; None: not known, nothing checked)."""
    if names is None:
        return
    for item in overrides:
        pattern, _ = parse_override(item, groups=groups)
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            some = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            raise InputError(f"--override {item!r}: no layer matches {pattern!r}"
                             + (f" (the model's {len(names)} layers: {some})" if names else " (the model has no layers)"))


def read_plan(model: ir.Model) -> Plan | None:
    raw = model.metadata_props.get(PLAN_KEY)
    return Plan.from_json(json.loads(raw)) if raw else None


def write_plan(model: ir.Model, plan: Plan) -> None:
    model.metadata_props[PLAN_KEY] = json.dumps(plan.to_json(), sort_keys=True)
