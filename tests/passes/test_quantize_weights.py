import numpy as np
import pytest

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import CompileContext
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import (
    QuantizeWeightsPass,
    activation_qparams,
    quantize_per_channel,
)
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
    result = q(model)
    assert result.modified
    assert ops(model).count("DequantizeLinear") == 2  # up and side; down stays fp32
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert all(n.inputs[0].const_value.dtype.name == "INT8" for n in dq)
    assert all(n.metadata_props["lowbit.pass"] == "QuantizeWeightsPass" for n in dq)
    out = run(model, {"x": X})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.02
    assert set(result.record.layers) == {"up", "side"} and result.record.section == "layers"


def test_static_activations_get_shared_qdq():
    model = mlp()
    plan = PlanUniformPass(activations="static")
    plan.context.stats.update(observe(model, ["xn", "hr"], [{"x": X}], show_progress=False))
    plan(model)
    q = QuantizeWeightsPass()
    q.context = plan.context
    result = q(model)
    assert ops(model).count("QuantizeLinear") == 2  # one for xn (shared by up and side), one for hr
    out = run(model, {"x": X})[0]
    ref = run(mlp(), {"x": X})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05
    assert "act_scale" in result.record.layers["up"]


def test_static_activations_need_calibration_statistics():
    from lowbit.compiler.core.errors import PassFailedError
    from lowbit.compiler.core.pipeline import run_pipeline

    model = mlp()
    plan = PlanUniformPass(activations="static")
    plan.context.stats.update(observe(model, ["xn", "hr"], [{"x": X}], show_progress=False))
    plan(model)  # the plan was made with statistics; this compile context has none
    with pytest.raises(PassFailedError, match=r"quantize-weights \(static activations of down\) needs calibration "
                                              r"statistics: put a 'calibrate' pass before it$"):
        run_pipeline(model, [QuantizeWeightsPass()], context=CompileContext())


def test_needs_a_plan():
    from lowbit.compiler.core.errors import PassFailedError
    from lowbit.compiler.core.pipeline import run_pipeline

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
    assert q(model).record.layers["down"]["zero_channels"] == 1
    ref = run(mlp(), {"x": X})[0]  # channel 3 of "down" contributes 0 now; others stay close
    out = run(model, {"x": X})[0]
    assert np.isfinite(out).all()
    others = [c for c in range(out.shape[-1]) if c != 3]
    assert np.abs(out - ref)[..., others].max() < 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------
# 4-bit and group-wise weights
# ---------------------------------------------------------------------------------------
from lowbit.passes.quantize_weights import Grid, quantize_weight


def _heavy(seed, k=96, n=24):
    return np.random.default_rng(seed).standard_t(3, (k, n)).astype(np.float32)


@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_group_wise_rtn_error_is_at_most_half_a_step(group, symmetric):
    w = _heavy(0)
    w[48:64, 3] = 0.0  # an all-zero group (group 3 for size 16) quantizes exactly
    qw = quantize_weight(w, 4, group_size=group, symmetric=symmetric)
    g = group or w.shape[0]
    assert qw.scale.shape == (-(-96 // g), 24) and qw.codes.shape == w.shape
    assert qw.codes.dtype == (np.int8 if symmetric else np.uint8)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert qw.codes.min() >= lo and qw.codes.max() <= hi
    err = np.abs(qw.dequantize() - w)
    assert (err <= qw.expand(qw.scale) / 2 + 1e-6).all()
    if group == 16:
        assert qw.scale[3, 3] == 1.0 and (qw.dequantize()[48:64, 3] == 0).all()
    # smaller groups: smaller error
    if group == 16:
        coarse = quantize_weight(w, 4, group_size=64, symmetric=symmetric)
        assert np.linalg.norm(qw.dequantize() - w) < np.linalg.norm(coarse.dequantize() - w)


def test_symmetric_4bit_grid_uses_all_sixteen_levels():
    g = Grid(4)
    assert (g.qmin, g.qmax, g.half_range) == (-8, 7, 7.5)
    s, z = g.params(np.array([-1.5]), np.array([0.5]))
    assert np.isclose(s[0], 1.5 / 7.5) and z[0] == 0
    assert Grid(8).qmin == -127 and Grid(8).half_range == 127  # int8 keeps the int8 GEMM's convention


def test_asymmetric_zero_points_cover_the_range_and_keep_zero_exact():
    rng = np.random.default_rng(2)
    w = (rng.random((64, 8)) * 3 + 0.5).astype(np.float32)  # all positive: lo clamps to 0
    w[:, 1] -= 4.0  # all negative
    qw = quantize_weight(w, 4, group_size=32, symmetric=False)
    assert qw.zero_point.dtype == np.uint8 and qw.zero_point.shape == (2, 8)
    assert (qw.zero_point[:, 0] == 0).all() and (qw.zero_point[:, 1] == 15).all()
    assert np.allclose(qw.scale[:, 0], w.reshape(2, 32, 8).max(axis=1)[:, 0] / 15)
    # 0 is a level of every group: (z - z) * s
    assert np.abs(qw.dequantize() - w).max() <= qw.scale.max() / 2 + 1e-6
    sym = quantize_weight(w, 4, group_size=32)
    assert np.linalg.norm(qw.dequantize() - w) < np.linalg.norm(sym.dequantize() - w)  # skewed groups


def test_group_wise_mse_never_worse_than_rtn_and_partial_last_group():
    w = _heavy(4, k=80)  # 80 = 2 groups of 32 + a partial group of 16
    for sym in (True, False):
        rtn = quantize_weight(w, 4, group_size=32, symmetric=sym)
        mse = quantize_weight(w, 4, group_size=32, symmetric=sym, algorithm="mse")
        assert rtn.scale.shape == (3, 24)
        e_r = ((rtn.dequantize() - w) ** 2).reshape(-1)
        e_m = ((mse.dequantize() - w) ** 2).reshape(-1)
        per_group = lambda e: np.add.reduceat(e.reshape(80, 24), [0, 32, 64], axis=0)
        assert (per_group(e_m) <= per_group(e_r) * (1 + 1e-5)).all() and e_m.sum() < 0.97 * e_r.sum()


@pytest.mark.parametrize(("precision", "group", "symmetric", "dtype"), [
    ("w4a16", 16, True, "INT4"), ("w4a16", 16, False, "UINT4"), ("w4a8", None, True, "INT4"),
    ("w8a16", 16, False, "UINT8"), ("w8a8", 16, True, "INT8"),
])
def test_qdq_forms_run_and_match_the_quantized_weights(precision, group, symmetric, dtype):
    model = mlp()
    ref = run(model, {"x": X})[0]
    PlanUniformPass(precision=precision, group_size=group or 0, symmetric=symmetric)(model)
    q = QuantizeWeightsPass()
    result = q(model)
    assert result.modified
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3 and {n.inputs[0].const_value.dtype.name for n in dqs} == {dtype}
    up = next(n for n in dqs if n.name == "up/weight_dq")
    if group:
        assert (up.attributes["axis"].value, up.attributes["block_size"].value) == (0, 16)
        assert tuple(up.inputs[1].shape) == (1, 16)  # K=8 < 16: one partial group
    else:
        assert up.attributes["axis"].value == 1 and tuple(up.inputs[1].shape) == (16,)
    assert (len(up.inputs) == 3) == (not symmetric)
    entry = result.record.layers["up"]
    assert (entry["group_size"], entry["symmetric"], entry["weight_bits"]) == (group, symmetric, int(precision[1]))
    out = run(model, {"x": X})[0]
    bound = 0.2 if precision.startswith("w4") else 0.03
    assert np.abs(out - ref).max() / np.abs(ref).max() < bound
