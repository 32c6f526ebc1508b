"""SmoothActivationsPass: where scales are folded, what is skipped and why, fp32 equivalence, alpha search."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import PassFailedError
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import Verify, run_pipeline
from lowbit.passes.calibrate import CalibratePass
from lowbit.passes.smooth import (
    SmoothActivationsPass,
    group_error,
    quantize_activations,
    smoothing_scales,
)
from tests.graphs import mlp, run

RNG = np.random.default_rng(7)
BATCHES = [{"x": RNG.standard_normal((1, 64, 8)).astype(np.float32)} for _ in range(4)]
HELD_OUT = {"x": RNG.standard_normal((2, 64, 8)).astype(np.float32)}


def _const(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy().copy()


def _smooth(model: ir.Model, batches=BATCHES, **options) -> SmoothActivationsPass:
    context = CompileContext(calibration_batches=batches, progress=False)
    run_pipeline(model, [CalibratePass()], context=context)
    p = SmoothActivationsPass(**options)
    p.context = context
    p.result = p(model)
    return p


def _row_scale(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return np.abs(new).max(axis=1) / np.abs(old).max(axis=1)


def test_mlp_norm_absorbs_the_scale_and_relu_group_is_skipped():
    model = mlp(outlier=50)
    old = {n: _const(model, n) for n in ("gamma", "w1", "w2", "w3")}
    ref = run(mlp(outlier=50), HELD_OUT)[0]
    x_absmax = observe(model, ["xn"], BATCHES, show_progress=False)["xn"].absmax
    p = _smooth(model)
    assert p.result.modified
    notes = p.result.record.to_json()
    up = notes["groups"]["up+side"]
    assert up["via"] == "rmsnorm norm/gamma" and up["input"] == "xn"
    assert notes["groups"]["down"] == {"skipped": "input produced by Relu (act): cannot absorb a per-channel scale"}
    assert (notes["smoothed"], notes["skipped"]) == (1, 1)

    w1, w3, gamma = _const(model, "w1"), _const(model, "w3"), _const(model, "gamma")
    s = _row_scale(w1, old["w1"])
    np.testing.assert_allclose(w1, old["w1"] * s[:, None], rtol=1e-6)  # rows of every linear of the group
    np.testing.assert_allclose(w3, old["w3"] * s[:, None], rtol=1e-6)
    np.testing.assert_allclose(gamma, old["gamma"] / s, rtol=1e-6)  # ... and gamma divided by the same s
    np.testing.assert_array_equal(_const(model, "w2"), old["w2"])  # the skipped group is untouched
    # s is SmoothQuant's formula at the chosen alpha; the outlier channel gets the largest scale
    expected = smoothing_scales(x_absmax, np.abs(np.concatenate([old["w1"], old["w3"]], 1)).max(1), up["alpha"])
    np.testing.assert_allclose(s, expected, rtol=1e-5)
    assert s.argmax() == 1 and 0 < up["alpha"] < 1
    # the statistics of X now describe X / s
    np.testing.assert_allclose(p.context.stats["xn"].absmax, x_absmax / s, rtol=1e-4)
    out = run(model, HELD_OUT)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_searched_alpha_beats_no_smoothing_on_held_out_rows():
    model = mlp(outlier=50)
    w = np.concatenate([_const(model, "w1"), _const(model, "w3")], axis=1)
    x_absmax = observe(model, ["xn"], BATCHES, show_progress=False)["xn"].absmax
    held = session_for(mlp(outlier=50), ["xn"]).run(["xn"], HELD_OUT)[0].reshape(-1, 8)
    up = _smooth(model).result.record.to_json()["groups"]["up+side"]
    assert up["error_after"] < up["error_before"]  # on the calibration sample
    w_absmax = np.abs(w).max(axis=1)
    searched = group_error(held, w, smoothing_scales(x_absmax, w_absmax, up["alpha"]))
    unsmoothed = group_error(held, w, np.ones(8))
    alpha0 = group_error(held, w, smoothing_scales(x_absmax, w_absmax, 0.0))  # SmoothQuant's alpha = 0: s = 1 / max|W|
    assert searched < 0.5 * unsmoothed and searched < alpha0


def test_fixed_alpha_and_per_tensor_search():
    model = mlp(outlier=50)
    p = _smooth(model, alpha=0.5)
    assert p.result.record.to_json()["groups"]["up+side"]["alpha"] == 0.5
    q = _smooth(mlp(outlier=50), act_granularity="per-tensor", alpha_grid=[0.2, 0.5, 0.8])
    rec = q.result.record.to_json()["groups"]["up+side"]
    assert rec["alpha"] in (0.2, 0.5, 0.8) and rec["error_after"] < rec["error_before"]


def test_min_gain_leaves_groups_whose_error_falls_less():
    gain = lambda rec: 1 - rec["error_after"] / rec["error_before"]  # noqa: E731
    rec = _smooth(mlp(outlier=50)).result.record.to_json()["groups"]["up+side"]
    assert 0.5 < gain(rec) < 0.99
    kept = _smooth(mlp(outlier=50), min_gain=0.5).result.record.to_json()["groups"]["up+side"]
    assert kept["alpha"] == rec["alpha"]
    model = mlp(outlier=50)
    w1 = _const(model, "w1").copy()
    skipped = _smooth(model, min_gain=0.99).result.record.to_json()["groups"]["up+side"]
    assert skipped["skipped"].startswith("no alpha lowers the simulated error by 99%")
    np.testing.assert_array_equal(_const(model, "w1"), w1)
    with pytest.raises(ValueError, match="min_gain"):
        SmoothActivationsPass(min_gain=1.0)


def test_other_reader_of_x_skips_the_group_or_gets_the_scale_back():
    def with_extra_reader() -> ir.Model:
        model = mlp(outlier=50)
        xn = next(v for n in model.graph for v in n.outputs if v.name == "xn")
        neg = ir.node("Neg", [xn], name="extra")
        neg.outputs[0].name = "extra_out"
        neg.outputs[0].type, neg.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", "T", 8])
        model.graph.append(neg)
        model.graph.outputs.append(neg.outputs[0])
        return model

    model = with_extra_reader()
    before = ir.to_proto(model).SerializeToString()
    p = _smooth(model)
    assert not p.result.modified
    assert ir.to_proto(model).SerializeToString() == before
    assert p.result.record.to_json()["groups"]["up+side"]["skipped"].startswith("xn is also read by Neg (extra)")

    ref = run(with_extra_reader(), HELD_OUT)
    model = with_extra_reader()
    p = _smooth(model, other_uses="rescale")
    assert p.result.modified
    assert p.result.record.to_json()["groups"]["up+side"]["rescaled_readers"] == ["Neg (extra)"]
    for a, b in zip(run(model, HELD_OUT), ref):
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


def _layernorm_attention_like(seed: int = 0) -> ir.Model:
    """x -> LayerNorm(gamma, beta) -> {fc1 + bias -> Reshape/Transpose/Transpose/Reshape -> fc2, fc3}."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 8)).astype(np.float32) * 0.3
    w1[:, 3] *= 40  # an outlier channel in fc2's input
    gamma = np.linspace(0.5, 2, 8).astype(np.float32)
    gamma[5] = 30.0  # and one in fc1/fc3's input
    init = lambda name, a: numpy_helper.from_array(np.asarray(a), name)
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
            helper.make_node("MatMul", ["ln", "w1"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1/bias"),
            helper.make_node("Reshape", ["h", "split"], ["h4"], name="heads"),
            helper.make_node("Transpose", ["h4"], ["ht"], name="t1", perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", ["ht"], ["hb"], name="t2", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["hb", "merge"], ["h8"], name="merge"),
            helper.make_node("MatMul", ["h8", "w2"], ["y2"], name="fc2"),
            helper.make_node("MatMul", ["ln", "w3"], ["y3"], name="fc3"),
            helper.make_node("Add", ["y2", "y3"], ["y"], name="sum"),
        ],
        "ln_attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8])],
        [
            init("g", gamma),
            init("b", rng.standard_normal(8).astype(np.float32)),
            init("w1", w1),
            init("b1", rng.standard_normal(8).astype(np.float32)),
            init("split", np.array([0, 0, 2, 4], np.int64)),
            init("merge", np.array([0, 0, 8], np.int64)),
            init("w2", rng.standard_normal((8, 8)).astype(np.float32) * 0.3),
            init("w3", rng.standard_normal((8, 8)).astype(np.float32) * 0.3),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def test_layernorm_beta_and_biased_linear_through_reshapes_absorb_scales():
    model = _layernorm_attention_like()
    old = {n: _const(model, n) for n in ("g", "b", "w1", "b1", "w2", "w3")}
    ref = run(_layernorm_attention_like(), HELD_OUT)[0]
    p = _smooth(model, alpha=0.5)
    groups = p.result.record.to_json()["groups"]
    assert groups["fc1+fc3"]["via"] == "layernorm ln"
    assert groups["fc2"]["via"] == "fc1 output columns through Reshape <- Transpose <- Transpose <- Reshape <- Add"
    s13 = _row_scale(_const(model, "w3"), old["w3"])
    np.testing.assert_allclose(_const(model, "g"), old["g"] / s13, rtol=1e-6)
    np.testing.assert_allclose(_const(model, "b"), old["b"] / s13, rtol=1e-6)
    s2 = _row_scale(_const(model, "w2"), old["w2"])
    assert s2.argmax() == 3 and s2[3] > 2
    # fc1's output columns (and bias) carry 1/s2; its rows carry s13
    np.testing.assert_allclose(_const(model, "w1"), old["w1"] * s13[:, None] / s2[None, :], rtol=1e-5)
    np.testing.assert_allclose(_const(model, "b1"), old["b1"] / s2, rtol=1e-6)
    out = run(model, HELD_OUT)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_shared_channels_get_one_scale():
    # two channels of X read the same source column (a KV head repeated for two query heads)
    src = np.array([0, 1, 0, 1])
    s = smoothing_scales(np.array([1.0, 2.0, 9.0, 4.0]), np.array([1.0, 1.0, 1.0, 1.0]), 0.5, src)
    np.testing.assert_allclose(s, [3.0, 2.0, 3.0, 2.0])
    # a dead channel (never active in calibration) keeps s = 1
    assert smoothing_scales(np.array([0.0, 4.0]), np.array([1.0, 1.0]), 1.0).tolist() == [1.0, 4.0]


def test_per_token_activation_quantization_matches_the_lowering():
    x = np.array([[-1.0, 0.5, 3.0], [0.2, 0.4, 0.1]], np.float32)
    q = quantize_activations(x)
    assert np.abs(q - x).max(axis=1)[0] <= 4 / 255 / 2 + 1e-7
    assert q[1, 0] != 0 and np.abs(q[1] - x[1]).max() <= 0.4 / 255 / 2 + 1e-7  # range includes 0


def test_needs_calibration_statistics():
    with pytest.raises(PassFailedError, match="smooth needs calibration statistics: put a 'calibrate' pass before it"):
        run_pipeline(mlp(), [SmoothActivationsPass()], context=CompileContext(calibration_batches=BATCHES))


def test_bad_options():
    with pytest.raises(ValueError, match="act_granularity"):
        SmoothActivationsPass(act_granularity="per-channel")
    with pytest.raises(ValueError, match=r"^pass 'smooth': option 'alpha' = 1.5 must be in \[0, 1\]$"):
        SmoothActivationsPass(alpha=1.5)


# --------------------------------------------------------------------------- real models


def _real(source, *, calib_data=None, calib_samples=8, eval_samples=4, seq_len=128):
    from lowbit.compiler.core.data import split_text
    from lowbit.compiler.frontend import load_source
    from lowbit.passes.canonicalize import CanonicalizePass

    model, adapter = load_source(source)
    run_pipeline(model, [CanonicalizePass()])
    split = split_text(adapter.tokenizer, calib_data=calib_data, eval_data=None, calib_samples=calib_samples,
                       eval_samples=eval_samples, seq_len=seq_len)
    calib = [adapter.make_inputs([w]) for w in split.calibration]
    evals = [adapter.make_inputs([w]) for w in split.evaluation]
    return model, calib, evals


def _outputs(model, feeds):
    session = session_for(model)
    return [session.run(None, f)[0] for f in feeds]


def _smooth_real(model, calib, **options) -> CompileContext:
    context = CompileContext(calibration_batches=calib, progress=False)
    run_pipeline(model, [CalibratePass(), SmoothActivationsPass(**options)], context=context, instruments=[Verify()])
    return context


def _max_rel(outs, refs) -> float:
    rel = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outs, refs))
    print(f"\nmax |smoothed - fp32| / max |fp32| over {len(refs)} held-out windows: {rel:.3g}")
    return rel


def test_stories260k_smoothing_keeps_logits(shared_dir):
    model, calib, evals = _real(shared_dir / "stories260K" / "stories260K.bin",
                                calib_data=shared_dir.parent / "data" / "tinystories.txt")
    ref = _outputs(model, evals)
    context = _smooth_real(model, calib, alpha_grid=[0.3, 0.5, 0.7], max_rows=256)
    notes = context.results.latest("smooth").to_json()
    groups = notes["groups"]
    # every group of the 5 layers + lm_head: norms, v_proj through GQA's repeat, up_proj through SwiGLU
    assert len(groups) == 5 * 4 + 1
    o_proj = groups["model.layers.0.self_attn.o_proj"]
    assert o_proj.get("via", "").startswith("model.layers.0.self_attn.v_proj output columns through Reshape"), o_proj
    assert "Expand" in o_proj["via"]
    down = groups["model.layers.0.mlp.down_proj"]
    assert down.get("via") == "model.layers.0.mlp.up_proj output columns through Mul", down
    assert groups["lm_head"].get("via") == "rmsnorm model.norm"
    assert notes["smoothed"] >= 15  # the rest found no alpha better than none, with the reason recorded
    assert all("via" in g for g in groups.values())
    assert _max_rel(_outputs(model, evals), ref) < 1e-4


@pytest.mark.slow
def test_smollm2_keeps_logits_and_search_helps_the_worst_outlier_group():
    model, calib, evals = _real("smollm2-135m")
    ref = _outputs(model, evals)
    stats = CompileContext(calibration_batches=calib, progress=False)
    run_pipeline(model, [CalibratePass()], context=stats)
    from lowbit.passes.recognize import find_linears, linear_groups

    groups = {g[0].x.name: g for g in linear_groups(find_linears(model.graph)[0])}
    worst = max(groups, key=lambda name: stats.stats[name].outlier_ratio())
    key = "+".join(lin.name for lin in groups[worst])
    weights = {lin.name: lin.weight_array.copy() for lin in groups[worst]}
    held = np.concatenate([r.reshape(-1, r.shape[-1]) for r in
                           (session_for(model, [worst]).run([worst], f)[0] for f in evals)])

    p = SmoothActivationsPass()
    p.context = stats
    result = p(model)
    assert result.modified
    notes = result.record.to_json()
    rec = notes["groups"][key]
    assert "alpha" in rec, rec
    assert _max_rel(_outputs(model, evals), ref) < 1e-4

    old = np.concatenate(list(weights.values()), axis=1)
    new = np.concatenate([lin.weight_array for lin in groups[worst]], axis=1)
    s = _row_scale(new, old)
    searched, unsmoothed = group_error(held, old, s), group_error(held, old, np.ones(len(s)))
    assert searched < unsmoothed
    print(f"\nSmolLM2 {key}: outlier ratio {rec['outlier_ratio']}, alpha {rec['alpha']}, held-out error "
          f"{unsmoothed:.4g} -> {searched:.4g}; smoothed {notes['smoothed']}, skipped {notes['skipped']}")


@pytest.mark.slow
@pytest.mark.parametrize("other_uses", ["skip", "rescale"])
def test_minilm_keeps_embeddings(other_uses):
    model, calib, evals = _real("all-minilm-l6-v2")
    ref = _outputs(model, evals)
    context = _smooth_real(model, calib, other_uses=other_uses)
    groups = context.results.latest("smooth").groups
    dense = groups["encoder.layer.0.attention.output.dense"]
    assert dense.get("via", "").startswith("encoder.layer.0.attention.self.value output columns through"), dense
    qkv = next(g for k, g in groups.items() if k.startswith("encoder.layer.0.attention.self.query"))
    if other_uses == "skip":  # post-LN: the norm's output is also the residual
        assert "is also read by Add" in qkv["skipped"]
    else:
        assert qkv.get("via", qkv.get("skipped", "")).startswith("layernorm"), qkv
    assert "Gelu" in groups["encoder.layer.0.output.dense"]["skipped"]
    assert _max_rel(_outputs(model, evals), ref) < 1e-4
