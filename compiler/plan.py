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

from lowbit.compiler.errors import InputError

PLAN_KEY = "lowbit.plan"

#: precision name -> (weight bits, activation bits); None means float.
PRECISIONS: dict[str, tuple[int | None, int | None]] = {
    "fp32": (None, None),
    "w8a8": (8, 8),
    "w8a16": (8, None),
}
ACTIVATION_MODES = ("dynamic", "static")
WEIGHT_ALGORITHMS = ("rtn", "mse")


@dataclasses.dataclass
class LayerPlan:
    """What happens to one linear layer.

    Attributes:
        precision: a key of ``PRECISIONS`` ("fp32", "w8a8", "w8a16").
        granularity: of weight scales: "per-channel" (per output column).
        symmetric: symmetric weight quantization (zero point 0).
        activations: "dynamic" (per token, computed at run time) or "static"
            (per tensor, calibrated); ignored without activation quantization.
        weight_algorithm: "rtn" (round to nearest at absmax) or "mse"
            (clipping ratio searched to minimise weight MSE).
        reason: why this precision was chosen (shown by ``lowbit inspect``).
    """

    precision: str = "w8a8"
    granularity: str = "per-channel"
    symmetric: bool = True
    activations: str = "dynamic"
    weight_algorithm: str = "rtn"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})")
        if self.activations not in ACTIVATION_MODES:
            raise InputError(f"unknown activation mode {self.activations!r} (known: {', '.join(ACTIVATION_MODES)})")
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise InputError(
                f"unknown weight algorithm {self.weight_algorithm!r} (known: {', '.join(WEIGHT_ALGORITHMS)})"
            )
        if self.granularity != "per-channel":
            raise InputError(f"unsupported granularity {self.granularity!r} (supported: per-channel)")

    @property
    def weight_bits(self) -> int | None:
        return PRECISIONS[self.precision][0]

    @property
    def activation_bits(self) -> int | None:
        return PRECISIONS[self.precision][1]


@dataclasses.dataclass
class Plan:
    """Per-layer decisions plus the reasons layers were left alone."""

    layers: dict[str, LayerPlan] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        try:
            layers = {k: LayerPlan(**v) for k, v in data.get("layers", {}).items()}
        except TypeError as e:
            raise InputError(f"invalid plan: {e}") from e
        return cls(layers=layers, skipped=dict(data.get("skipped", {})))

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``"GLOB=precision"`` overrides (``model.layers.*.mlp.down_proj=fp32``)."""
        for item in overrides:
            pattern, sep, precision = item.partition("=")
            if not sep:
                raise InputError(f"--override {item!r}: expected LAYER_GLOB=PRECISION")
            hits = [name for name in self.layers if fnmatch.fnmatchcase(name, pattern.strip())]
            if not hits:
                raise InputError(f"--override {item!r}: no layer matches {pattern.strip()!r}")
            for name in hits:
                self.layers[name] = dataclasses.replace(
                    self.layers[name], precision=precision.strip(), reason=f"override {item}"
                )


def read_plan(model: ir.Model) -> Plan | None:
    raw = model.metadata_props.get(PLAN_KEY)
    return Plan.from_json(json.loads(raw)) if raw else None


def write_plan(model: ir.Model, plan: Plan) -> None:
    model.metadata_props[PLAN_KEY] = json.dumps(plan.to_json(), sort_keys=True)
