"""The plan data structure: precisions, group sizes, symmetry, GPTQ options; validation and JSON."""

import json

import pytest

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.plan import LayerPlan, Plan, read_plan, write_plan
from lowbit.passes.plan import PlanUniformPass
from tests.graphs import mlp


def test_four_bit_precisions_and_derived_granularity():
    lp = LayerPlan(precision="w4a16", group_size=32, weight_algorithm="gptq", act_order=True, symmetric=False)
    assert (lp.weight_bits, lp.activation_bits, lp.granularity) == (4, None, "per-group")
    assert LayerPlan(precision="w4a8").activation_bits == 8
    assert LayerPlan(precision="w4a8").granularity == "per-channel"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 48}, "group_size must be a power of two >= 16"),
        ({"group_size": 8}, "group_size must be a power of two >= 16"),
        ({"group_size": True}, "group_size must be a power of two >= 16"),
        ({"weight_algorithm": "awq"}, "unknown weight algorithm 'awq'"),
        ({"act_order": True}, "act_order needs weight_algorithm 'gptq', not 'rtn'"),
        ({"precision": "w4a8", "activations": "static"}, "w4a8 with static activations needs symmetric per-channel int8"),
        ({"precision": "w8a8", "activations": "static", "group_size": 64}, "static activations needs symmetric per-channel"),
        ({"precision": "w8a8", "activations": "static", "symmetric": False}, "static activations needs symmetric per-channel"),
        ({"precision": "w3a16"}, "unknown precision 'w3a16'"),
    ],
)
def test_invalid_combinations_name_the_cause(kwargs, message):
    with pytest.raises(InputError, match=message):
        LayerPlan(**kwargs)


def test_float_layers_ignore_weight_options():
    # an override to fp32 keeps the recipe's group size and activation mode: no error
    assert LayerPlan(precision="fp32", activations="static", group_size=32).weight_bits is None


def test_json_round_trip_with_new_fields():
    plan = Plan(layers={
        "a": LayerPlan(precision="w4a16", group_size=128, weight_algorithm="gptq", act_order=True),
        "b": LayerPlan(precision="w8a8", symmetric=False, reason="why"),
    }, skipped={"c": "no weight"})
    data = json.loads(json.dumps(plan.to_json()))
    assert data["layers"]["a"]["granularity"] == "per-group" and data["layers"]["b"]["granularity"] == "per-channel"
    assert Plan.from_json(data) == plan


def test_old_plans_without_new_fields_still_load():
    old = {"layers": {"up": {"precision": "w8a8", "granularity": "per-channel", "symmetric": True,
                             "activations": "dynamic", "weight_algorithm": "rtn", "reason": "uniform"}},
           "skipped": {}}
    lp = Plan.from_json(old).layers["up"]
    assert (lp.group_size, lp.act_order, lp.granularity) == (None, False, "per-channel")


def test_json_contradictions_and_unknown_keys_are_errors():
    with pytest.raises(InputError, match="granularity 'per-channel' contradicts group_size 32"):
        Plan.from_json({"layers": {"x": {"precision": "w4a16", "granularity": "per-channel", "group_size": 32}}})
    with pytest.raises(InputError, match="unsupported granularity 'per-tensor'"):
        Plan.from_json({"layers": {"x": {"granularity": "per-tensor"}}})
    with pytest.raises(InputError, match="invalid plan"):
        Plan.from_json({"layers": {"x": {"bits": 4}}})
    # a recipe-style 0 means per channel
    assert Plan.from_json({"layers": {"x": {"group_size": 0}}}).layers["x"].group_size is None


def test_planner_passes_the_new_options_through():
    model = mlp()
    PlanUniformPass(precision="w4a16", group_size=32, symmetric=False, weight_algorithm="gptq", act_order=True)(model)
    plan = read_plan(model)
    assert {(lp.precision, lp.group_size, lp.symmetric, lp.act_order) for lp in plan.layers.values()} == {
        ("w4a16", 32, False, True)
    }
    write_plan(model, plan)
    assert read_plan(model) == plan
    with pytest.raises(InputError, match="group_size must be a power of two"):
        PlanUniformPass(precision="w4a16", group_size=100)
