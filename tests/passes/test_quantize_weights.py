import numpy as np
import pytest

from lowbit.compiler.calibration import observe
from lowbit.compiler.errors import InputError
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass, activation_qparams, quantize_per_channel
from tests.graphs import mlp, ops, run

X = np.random.default_rng(3).standard_normal((2, 16, 8)).astype(np.float32)


def test_per_channel_quantization_error_bound_and_zero_channel():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[:, 5] = 0.0
    w_q, s = quantize_per_channel(w)
    assert w_q.dtype == np.int8 and s.shape == (32,)
    assert s[5] == 1.0 and (w_q[:, 5] == 0).all()
    assert np.abs(w_q * s - w).max() <= s.max() / 2 + 1e-7  # half a step
    assert np.abs(w_q).max() == 127


def test_mse_clipping_never_worse_than_rtn():
    w = np.random.default_rng(1).standard_t(3, (256, 16)).astype(np.float32)  # heavy tails
    errs = {}
    for algo in ("rtn", "mse"):
        w_q, s = quantize_per_channel(w, 4, algo)
        errs[algo] = ((w_q * s - w) ** 2).sum(axis=0)
    assert (errs["mse"] <= errs["rtn"] + 1e-6).all() and errs["mse"].sum() < errs["rtn"].sum()


def test_activation_qparams_cover_range():
    s, zp = activation_qparams(-1.0, 3.0)
    assert np.isclose(s, 4 / 255) and zp == 64
    assert activation_qparams(0.0, 0.0) == (np.float32(1.0), np.uint8(0))


def test_weights_become_int8_dequantize_and_function_is_close():
    model = mlp()
    ref = run(model, {"x": X})[0]
    PlanUniformPass(exclude=["down"])(model)
    q = QuantizeWeightsPass()
    assert q(model).modified
    assert ops(model).count("DequantizeLinear") == 2  # up and side; down stays fp32
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert all(n.inputs[0].const_value.dtype.name == "INT8" for n in dq)
    assert all(n.metadata_props["lowbit.pass"] == "QuantizeWeightsPass" for n in dq)
    out = run(model, {"x": X})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.02
    assert set(q.context.notes["layers"]) == {"up", "side"}


def test_static_activations_get_shared_qdq():
    model = mlp()
    plan = PlanUniformPass(activations="static")
    plan.context.stats.update(observe(model, ["xn", "hr"], [{"x": X}], show_progress=False))
    plan(model)
    q = QuantizeWeightsPass()
    q.context = plan.context
    q(model)
    assert ops(model).count("QuantizeLinear") == 2  # one for xn (shared by up and side), one for hr
    out = run(model, {"x": X})[0]
    ref = run(mlp(), {"x": X})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05
    assert "act_scale" in q.context.notes["layers"]["up"]


def test_needs_a_plan():
    from lowbit.compiler.errors import PassFailedError
    from lowbit.compiler.pipeline import run_pipeline

    with pytest.raises(PassFailedError, match=r"pass QuantizeWeightsPass failed \(after nothing\): .*needs a plan"):
        run_pipeline(mlp(), [QuantizeWeightsPass()])


def test_nan_weight_is_an_error():
    model = mlp()
    w = model.graph.initializers["w1"]
    arr = w.const_value.numpy().copy()
    arr[0, 0] = np.nan
    import onnx_ir as ir

    w.const_value = ir.tensor(arr, name="w1")
    PlanUniformPass()(model)
    with pytest.raises(InputError, match="layer up: weight contains NaN"):
        QuantizeWeightsPass()(model)


def test_all_zero_channel_is_an_error_unless_kept():
    import onnx_ir as ir

    model = mlp()
    w = model.graph.initializers["w2"]
    arr = w.const_value.numpy().copy()
    arr[:, 3] = 0.0
    w.const_value = ir.tensor(arr, name="w2")
    PlanUniformPass()(model)
    with pytest.raises(InputError, match=r"layer down: 1 output channel\(s\) of the weight are all zero \(first: 3\)"):
        QuantizeWeightsPass()(model)
    q = QuantizeWeightsPass(zero_channels="keep")
    q(model)
    assert q.context.notes["layers"]["down"]["zero_channels"] == 1
    ref = run(mlp(), {"x": X})[0]  # channel 3 of "down" contributes 0 now; others stay close
    out = run(model, {"x": X})[0]
    assert np.isfinite(out).all()
