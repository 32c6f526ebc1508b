"""GPTQ: error-compensating rounding, its Hessians, and its use by quantize-weights."""

import numpy as np
import pytest

from lowbit.compiler.core.errors import CalibrationError
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.passbase import CompileContext
from lowbit.passes import gptq
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import (
    Grid,
    QuantizeWeightsPass,
    _pack,
    quantize_weight,
)
from lowbit.passes.recognize import find_linears
from tests.graphs import mlp
from tests.passes.real_models import fresh, windows


def correlated(seed=0, t=512, k=64, n=24):
    """Inputs with correlated features and uneven magnitudes, as real activations have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k))
    x *= np.exp(rng.normal(0, 0.7, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    return x.astype(np.float32), w


def run_gptq(w, h, grid, group, **kw):
    res = gptq.gptq_quantize(w, h, fit=lambda rows, hd: grid.fit(rows, "rtn", axis=0), quantize=grid.quantize,
                             group_size=group, **kw)
    return res, _pack(res.codes, res.scale, res.zero, grid, group)


def out_err(x, w, w_q):
    return float(np.linalg.norm(x @ w - x @ w_q))


@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_below_rtn(group, symmetric):
    x, w = correlated()
    h = x.T.astype(np.float64) @ x / len(x)
    grid = Grid(4, symmetric)
    _, qw = run_gptq(w, h, grid, group)
    rtn = quantize_weight(w, 4, group_size=group, symmetric=symmetric)
    assert qw.scale.shape == rtn.scale.shape and qw.codes.dtype == rtn.codes.dtype
    assert grid.qmin <= qw.codes.min() and qw.codes.max() <= grid.qmax
    assert out_err(x, w, qw.dequantize()) < 0.8 * out_err(x, w, rtn.dequantize())
    # the Hessian form of the error agrees with the explicit one
    rel = out_err(x, w, qw.dequantize()) / np.linalg.norm(x @ w)
    assert np.isclose(gptq.output_error(w, qw.dequantize(), h), rel, rtol=1e-4)


def test_uncorrelated_unit_inputs_reduce_gptq_to_rtn():
    """H = I: the inverse Hessian is diagonal, no error is propagated, GPTQ rounds to nearest."""
    w = correlated()[1]
    grid = Grid(4)
    _, qw = run_gptq(w, np.eye(64), grid, 16)
    rtn = quantize_weight(w, 4, group_size=16)
    assert np.allclose(qw.scale, rtn.scale)
    # the same rounding (a tie at exactly half a step may go either way in float32 vs float64)
    assert np.allclose(np.abs(qw.dequantize() - w), np.abs(rtn.dequantize() - w), atol=1e-6)
    assert (qw.codes != rtn.codes).mean() < 0.01


def test_dead_inputs_get_zero_weight():
    x, w = correlated(1)
    x[:, [3, 17]] = 0.0
    h = x.T.astype(np.float64) @ x
    res, qw = run_gptq(w, h, Grid(4), 16)
    assert res.dead == 2
    assert (qw.dequantize()[[3, 17]] == 0).all()
    assert out_err(x, w, qw.dequantize()) < out_err(x, w, quantize_weight(w, 4, group_size=16).dequantize())


def test_act_order_keeps_static_groups_and_beats_rtn():
    x, w = correlated(2)
    h = x.T.astype(np.float64) @ x
    grid = Grid(4, False)
    _, qw = run_gptq(w, h, grid, 16, act_order=True)
    rtn = quantize_weight(w, 4, group_size=16, symmetric=False)
    # static groups: every group's grid is fitted on the original weight, in the original order
    assert np.array_equal(qw.scale, rtn.scale) and np.array_equal(qw.zero_point, rtn.zero_point)
    assert out_err(x, w, qw.dequantize()) < 0.8 * out_err(x, w, rtn.dequantize())
    plain = run_gptq(w, h, grid, 16)[1]
    assert not np.array_equal(plain.codes, qw.codes)  # the order changed the rounding


def test_singular_hessian_is_dampened():
    x, w = correlated(3, t=8)  # rank 8 < K = 64
    h = x.T.astype(np.float64) @ x
    res, qw = run_gptq(w, h, Grid(4), 16)
    assert np.isfinite(qw.dequantize()).all() and res.damp >= 0.01


def test_collect_hessians_matches_numpy_in_any_chunking():
    model = mlp()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 5 + i, 8)).astype(np.float32)} for i in range(3)]
    xs = [session_for(model, ["xn", "hr"]).run(["xn", "hr"], b) for b in batches]
    for mem in (1e-6, 2048):  # one tensor per pass over the data, or all at once
        hs = gptq.collect_hessians(model, {"xn": 8, "hr": 16}, batches, memory_mb=mem, show_progress=False)
        for i, name in enumerate(("xn", "hr")):
            rows = np.concatenate([x[i].reshape(-1, x[i].shape[-1]) for x in xs]).astype(np.float64)
            assert np.allclose(hs[name], rows.T @ rows / len(rows), rtol=1e-5)
    with pytest.raises(CalibrationError, match="GPTQ needs calibration data"):
        gptq.collect_hessians(model, {"xn": 8}, [])


def test_pass_needs_calibration_batches_for_gptq():
    model = mlp()
    PlanUniformPass(precision="w4a16", weight_algorithm="gptq", group_size=16)(model)
    with pytest.raises(CalibrationError, match="layer up: weight_algorithm 'gptq' needs calibration data"):
        QuantizeWeightsPass()(model)


def test_stories260k_gptq_beats_rtn_on_every_linear(shared_dir):
    """Acceptance: at 4 bits, group 32, GPTQ's ||X W - X W_q||_F on the calibration inputs is
    below round-to-nearest's for every linear of a trained model."""
    model, adapter = fresh(shared_dir / "stories260K" / "stories260K.bin")
    calib, _ = windows(adapter, calib=16, evals=1, seq_len=128, text=shared_dir.parent / "data" / "tinystories.txt")
    linears = find_linears(model.graph)[0]
    weights = {lin.name: lin.weight_array.astype(np.float32) for lin in linears}
    inputs = sorted({lin.x.name for lin in linears})
    session = session_for(model, inputs)
    acts = [session.run(inputs, feed) for feed in calib]
    xs = {name: np.concatenate([a[i].reshape(-1, a[i].shape[-1]) for a in acts]) for i, name in enumerate(inputs)}
    x_of = {lin.name: xs[lin.x.name] for lin in linears}

    PlanUniformPass(precision="w4a16", group_size=32, weight_algorithm="gptq")(model)
    q = QuantizeWeightsPass()
    q.context = CompileContext(calibration_batches=calib, progress=False)
    table = q(model).record.layers
    dq = {n.metadata_props["lowbit.layer"]: n for n in model.graph if n.op_type == "DequantizeLinear"}
    assert len(dq) == len(linears) == 36
    ratios = {}
    for name, w in weights.items():
        node = dq[name]
        codes = node.inputs[0].const_value.numpy().astype(np.float32)
        w_q = codes * np.repeat(node.inputs[1].const_value.numpy(), 32, axis=0)[: w.shape[0]]
        rtn = quantize_weight(w, 4, group_size=32).dequantize()
        x = x_of[name]
        ratios[name] = out_err(x, w, w_q) / out_err(x, w, rtn)
        note = table[name]
        assert note["output_rel_error"] < note["output_rel_error_rtn"]
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] < 1.0, f"GPTQ worse than RTN on {worst}: {ratios[worst]:.3f}"
    assert np.mean(list(ratios.values())) < 0.9


def test_refit_scales_is_the_least_squares_optimum_for_the_codes():
    x, w = correlated(4)
    h = x.T.astype(np.float64) @ x
    for sym in (True, False):
        grid = Grid(4, sym)
        res, qw = run_gptq(w, h, grid, 16)
        refit = gptq.refit_scales(w, res.codes, res.scale, res.zero, h, 16)
        better = _pack(res.codes, refit, res.zero, grid, 16).dequantize()
        e0, e1 = out_err(x, w, qw.dequantize()), out_err(x, w, better)
        assert e1 < 0.97 * e0
        # any perturbation of the refitted scales is worse
        bumped = refit.copy()
        bumped[1, 3] *= 1.01
        assert out_err(x, w, _pack(res.codes, bumped, res.zero, grid, 16).dequantize()) > e1
        refitted = run_gptq(w, h, grid, 16, refit=True)[1]
        assert np.allclose(refitted.scale, refit)
