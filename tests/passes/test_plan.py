import numpy as np
import pytest

from lowbit.compiler.calibration import observe
from lowbit.compiler.errors import InputError
from lowbit.compiler.plan import Plan, read_plan
from lowbit.passes.plan import PlanUniformPass
from tests.graphs import mlp


def _planned(model, **opts):
    p = PlanUniformPass(**opts)
    return p(model), read_plan(model)


def test_uniform_plan_and_exclusion_reason():
    model = mlp()
    result, plan = _planned(model, exclude=["down"])
    assert result.modified
    assert {k: v.precision for k, v in plan.layers.items()} == {"up": "w8a8", "down": "fp32", "side": "w8a8"}
    assert plan.layers["down"].reason == "excluded by the recipe"
    assert not PlanUniformPass(exclude=["down"])(model).modified  # same plan again


def test_outlier_layers_kept_in_float():
    model = mlp(outlier=200.0)
    p = PlanUniformPass(keep_float_top=1)
    x = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
    p.context.stats.update(observe(model, ["xn", "hr"], [{"x": x}], show_progress=False))
    p(model)
    plan = read_plan(model)
    # up and side read the outlier tensor; one of them is kept, with the ratio in the reason
    kept = [k for k, v in plan.layers.items() if v.precision == "fp32"]
    assert kept and kept[0] in ("up", "side")
    assert "outlier ratio" in plan.layers[kept[0]].reason


def test_overrides_and_their_errors():
    model = mlp()
    _, plan = _planned(model, overrides=["d*=fp32"])
    assert plan.layers["down"].precision == "fp32" and plan.layers["down"].reason == "override d*=fp32"
    with pytest.raises(InputError, match="no layer matches 'nothing'"):
        PlanUniformPass(overrides=["nothing=fp32"])(mlp())
    with pytest.raises(InputError, match="unknown precision 'int3'"):
        PlanUniformPass(overrides=["up=int3"])(mlp())


def test_no_quantizable_linear_is_an_error():
    model = mlp()
    for n in [n for n in model.graph if n.op_type == "MatMul"]:
        n.inputs[1].const_value = None  # weights become graph-computed: nothing to quantize
    with pytest.raises(InputError, match="no quantizable linear"):
        PlanUniformPass()(model)


def test_plan_json_round_trip():
    model = mlp()
    _, plan = _planned(model, exclude=["side"])
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_one_activation_scale_per_tensor_where_rows_have_similar_ranges():
    from lowbit.compiler.calibration import TensorObserver

    rng = np.random.default_rng(0)
    similar, spread = TensorObserver("xn"), TensorObserver("hr")
    rows = rng.standard_normal((1, 32, 8)).astype(np.float32)
    similar.update(rows / np.abs(rows).max(axis=-1, keepdims=True))  # every row reaches +-1
    spread.update(rows * np.exp(np.linspace(0, 4, 32, dtype=np.float32))[None, :, None])  # row ranges grow 55x
    assert similar.tensor_scale_bits() < 0.6 < 2 < spread.tensor_scale_bits()
    p = PlanUniformPass(tensor_scale_max_bits=1.0)
    p.context.stats.update({"xn": similar, "hr": spread})
    model = mlp()
    p(model)
    plan = read_plan(model)
    modes = {k: v.activations for k, v in plan.layers.items()}
    assert modes == {"up": "dynamic-tensor", "side": "dynamic-tensor", "down": "dynamic"}
    assert "one activation scale per tensor (0." in plan.layers["up"].reason
    # off by default, and never for layers without activation quantization
    for opts in ({}, {"precision": "w8a16", "tensor_scale_max_bits": 1.0}):
        q, model = PlanUniformPass(**opts), mlp()
        q.context.stats.update({"xn": similar, "hr": spread})
        q(model)
        assert {v.activations for v in read_plan(model).layers.values()} == {"dynamic"}
