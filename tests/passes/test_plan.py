import numpy as np
import onnx_ir as ir
import pytest

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.plan import Plan, read_plan
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


def test_static_activations_need_a_calibrate_before_the_plan():
    from lowbit.compiler.core.errors import PassFailedError
    from lowbit.compiler.core.passbase import CompileContext
    from lowbit.compiler.core.pipeline import run_pipeline

    with pytest.raises(PassFailedError, match=r"plan \(static activation quantization\) needs calibration statistics: "
                                              r"put a 'calibrate' pass before it$"):
        run_pipeline(mlp(), [PlanUniformPass(activations="static")], context=CompileContext())
    model = mlp()
    context = CompileContext(stats=observe(model, ["xn", "hr"], [{"x": np.ones((1, 2, 8), np.float32)}],
                                           show_progress=False))
    run_pipeline(model, [PlanUniformPass(activations="static")], context=context)
    assert {lp.activations for lp in read_plan(model).layers.values()} == {"static"}


def test_plan_json_round_trip():
    model = mlp()
    _, plan = _planned(model, exclude=["side"])
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_one_activation_scale_per_tensor_where_rows_have_similar_ranges():
    from lowbit.compiler.core.calibration import TensorObserver

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


def _with_head(model, bias: bool):
    """``mlp`` followed by an output layer: y -> MatMul (head) [-> Add bias] -> Reshape -> logits."""
    g = model.graph
    y = g.outputs[0]
    w = ir.Value(name="w_head", const_value=ir.tensor(np.ones((8, 4), np.float32)))
    g.register_initializer(w)
    head = ir.node("MatMul", [y, w], name="head")
    nodes, last = [head], head.outputs[0]
    if bias:
        b = ir.Value(name="b_head", const_value=ir.tensor(np.ones(4, np.float32)))
        g.register_initializer(b)
        nodes.append(ir.node("Add", [last, b], name="head/bias"))
        last = nodes[-1].outputs[0]
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([-1, 4], np.int64)))
    g.register_initializer(shape)
    nodes.append(ir.node("Reshape", [last, shape], name="flatten"))
    g.extend(nodes)
    g.outputs[0] = nodes[-1].outputs[0]
    nodes[-1].outputs[0].name = "logits"
    return model


def test_output_layer_gets_its_own_precision():
    for bias in (False, True):
        model = _with_head(mlp(), bias)
        _, plan = _planned(model, precision="w4a16", group_size=16, symmetric=False, output_precision="w8a8")
        assert {k: v.precision for k, v in plan.layers.items()} == {
            "up": "w4a16", "down": "w4a16", "side": "w4a16", "head": "w8a8"
        }
        head, up = plan.layers["head"], plan.layers["up"]
        assert "output layer" in head.reason
        # 8-bit weights: per channel and symmetric, whatever the 4-bit layers use
        assert (head.group_size, head.symmetric) == (None, True) and (up.group_size, up.symmetric) == (16, False)
    # without the option, or when the head's result is used on (here: by a second reader), it is like the rest
    _, plan = _planned(_with_head(mlp(), False), precision="w4a16")
    assert plan.layers["head"].precision == "w4a16"
    model = _with_head(mlp(), False)
    head_out = next(n for n in model.graph if n.name == "head").outputs[0]
    relu = ir.node("Relu", [head_out], name="extra")
    model.graph.append(relu)
    model.graph.outputs.append(relu.outputs[0])
    _, plan = _planned(model, precision="w4a16", output_precision="w8a16")
    assert plan.layers["head"].precision == "w4a16"
    with pytest.raises(InputError, match="unknown precision 'int3'"):
        PlanUniformPass(output_precision="int3")
