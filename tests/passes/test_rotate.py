import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import InputError, LowbitError, PassFailedError
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import Verify, run_pipeline
from lowbit.passes.recognize import find_linears
from lowbit.passes.rotate import (
    RotateResidualStreamPass,
    Rotation,
    RotationError,
    hadamard_like,
    online_factors,
)
from tests.graphs import mlp, run
from tests.passes.real_models import fresh, max_rel_diff, outputs, windows


@pytest.mark.parametrize("d", [64, 576, 172, 12, 7])
def test_randomized_hadamard_is_orthogonal_and_flat(d):
    q = hadamard_like(d, np.random.default_rng(0), random_signs=True).dense()
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    if d == 64:  # a power of two: a true (signed) Hadamard matrix, every entry ±1/8
        np.testing.assert_allclose(np.abs(q), 1 / 8)
    # seeded: the same seed gives the same matrix, another seed another
    np.testing.assert_array_equal(q, hadamard_like(d, np.random.default_rng(0), random_signs=True).dense())
    assert not np.allclose(q, hadamard_like(d, np.random.default_rng(1), random_signs=True).dense())


@pytest.mark.parametrize("n,sizes", [(1536, (24, 64)), (172, (43, 4)), (512, (16, 32)), (1024, (32, 32))])
def test_online_factors_are_small_and_orthogonal(n, sizes):
    a, b = online_factors(n, np.random.default_rng(0))
    assert (a.shape[0], b.shape[0]) == sizes
    h = np.kron(a, b)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    # x (A ⊗ B) is Aᵀ V B on x viewed as V [a, b]: the two MatMuls the graph runs
    x = np.random.default_rng(1).standard_normal((3, n))
    v = x.reshape(3, *sizes)
    np.testing.assert_allclose((a.T @ v @ b).reshape(3, n), x @ h, atol=1e-12)


def test_rotation_applies_identity_blocks_per_head():
    h = hadamard_like(8, np.random.default_rng(0), random_signs=True).dense()
    w = np.random.default_rng(1).standard_normal((24, 5))
    block = np.kron(np.eye(3), h)
    r = Rotation([3, h])
    np.testing.assert_allclose(r.apply(w.T), w.T @ block, atol=1e-12)
    np.testing.assert_allclose(r.apply_t_left(w), block.T @ w, atol=1e-12)


def tiny_lm(d=8, hidden=12, vocab=16, *, layernorm=False, extra_reader=False, seed=0) -> ir.Model:
    """ids -> Gather(E) -> RMSNorm(g1) -> up -> Relu -> down + b -> Add -> RMSNorm(g2) -> head -> logits."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = {
        "E": rng.standard_normal((vocab, d)).astype(f),
        "g1": (0.5 + rng.random(d)).astype(f),
        "g2": (0.5 + rng.random(d)).astype(f),
        "w_up": rng.standard_normal((d, hidden)).astype(f) * 0.5,
        "w_down": rng.standard_normal((hidden, d)).astype(f) * 0.5,
        "b_down": rng.standard_normal(d).astype(f),
        "w_head": rng.standard_normal((d, vocab)).astype(f),
        "beta": np.zeros(d, f),
        "two": np.array(2.0, f),
        "eps": np.array(1e-5, f),
        "axes": np.array([-1], np.int64),
    }

    def rmsnorm(x, g, tag):
        return [
            helper.make_node("Pow", [x, "two"], [f"{tag}_sq"], name=f"{tag}/pow"),
            helper.make_node("ReduceMean", [f"{tag}_sq", "axes"], [f"{tag}_ms"], name=f"{tag}/mean"),
            helper.make_node("Add", [f"{tag}_ms", "eps"], [f"{tag}_mse"], name=f"{tag}/add"),
            helper.make_node("Sqrt", [f"{tag}_mse"], [f"{tag}_rms"], name=f"{tag}/sqrt"),
            helper.make_node("Reciprocal", [f"{tag}_rms"], [f"{tag}_inv"], name=f"{tag}/rsqrt"),
            helper.make_node("Mul", [x, f"{tag}_inv"], [f"{tag}_n"], name=f"{tag}/mul"),
            helper.make_node("Mul", [g, f"{tag}_n"], [f"{tag}_out"], name=f"{tag}/gamma"),
        ]

    norm1 = (
        [helper.make_node("LayerNormalization", ["h0", "g1", "beta"], ["n1_out"], name="n1", axis=-1)]
        if layernorm
        else rmsnorm("h0", "g1", "n1")
    )
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed", axis=0),
        *norm1,
        helper.make_node("MatMul", ["n1_out", "w_up"], ["up"], name="up"),
        helper.make_node("Relu", ["up"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w_down"], ["down"], name="down"),
        helper.make_node("Add", ["down", "b_down"], ["down_b"], name="down/bias"),
        helper.make_node("Add", ["h0", "down_b"], ["h1"], name="residual"),
        *rmsnorm("h1", "g2", "n2"),
        helper.make_node("MatMul", ["n2_out", "w_head"], ["logits"], name="head"),
    ]
    outputs_ = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", vocab])]
    if extra_reader:  # a Relu reading the stream: it would see rotated values
        nodes.append(helper.make_node("Relu", ["h1"], ["h1_relu"], name="peek"))
        outputs_.append(helper.make_tensor_value_info("h1_relu", TensorProto.FLOAT, ["B", "T", d]))
    graph = helper.make_graph(
        nodes,
        "tiny_lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        outputs_,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


IDS = {"ids": np.random.default_rng(5).integers(0, 16, (2, 7)).astype(np.int64)}


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy().astype(np.float64) for k, v in model.graph.initializers.items()}


def test_tiny_lm_weights_absorb_q_and_function_is_kept():
    model = tiny_lm()
    ref = run(model, IDS)[0]
    w = weights(model)
    p = RotateResidualStreamPass(seed=3)
    result = p(model)
    assert result.modified and result.record.clears_stats
    q = hadamard_like(8, np.random.default_rng(3), random_signs=True).dense()
    got = {n.name: n for n in model.graph}
    # Expected: E Q; readers Qᵀ diag(g) W; writer W Q and bias b Q; gamma Muls gone
    np.testing.assert_allclose(got["embed"].inputs[0].const_value.numpy(), w["E"] @ q, atol=1e-6)
    for reader, g, w_in in (("up", "g1", "w_up"), ("head", "g2", "w_head")):
        want = q.T @ (w[g][:, None] * w[w_in])
        np.testing.assert_allclose(got[reader].inputs[1].const_value.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(got["down"].inputs[1].const_value.numpy(), w["w_down"] @ q, atol=1e-6)
    np.testing.assert_allclose(got["down/bias"].inputs[1].const_value.numpy(), w["b_down"] @ q, atol=1e-6)
    assert "n1/gamma" not in got and "n2/gamma" not in got
    notes = result.record.to_json()
    assert notes["readers"] == ["up", "head"] and notes["writers"] == ["down"] and notes["embeddings"] == ["embed"]
    assert notes["norms_folded"] == ["n1/gamma", "n2/gamma"]
    np.testing.assert_allclose(run(model, IDS)[0], ref, rtol=1e-5, atol=1e-5)


def test_online_down_proj_inserts_two_small_matmuls_and_one_transpose():
    model = tiny_lm()
    ref = run(model, IDS)[0]
    context = CompileContext(stats={"act": object()})
    p = RotateResidualStreamPass(online_down_proj=True)
    run_pipeline(model, [p], context=context, instruments=[Verify()])
    down = next(n for n in model.graph if n.name == "down")
    chain = [n for n in model.graph if n.name.startswith("down/online_hadamard")]
    # 12 = 3 x 4: x (A ⊗ B) permuted = ((V B)ᵀ A) flattened; the permutation is in down's rows
    assert [n.op_type for n in chain] == ["Reshape", "MatMul", "Transpose", "MatMul", "Reshape"]
    linears, rejected = find_linears(model.graph)
    assert [lin.name for lin in linears] == ["up", "down", "head"]  # the transform's MatMuls are not layers
    assert rejected["down/online_hadamard/right"].startswith("online Hadamard")
    assert chain[0].inputs[0].name == "act" and down.inputs[0] is chain[-1].outputs[0]
    assert all(n.metadata_props["lowbit.pass"] == "RotateResidualStreamPass" for n in chain)
    assert context.results.latest("rotate").online_down_proj == {"down": "3x3 ⊗ 4x4"}
    assert context.stats == {}  # every activation changed: statistics are stale
    np.testing.assert_allclose(run(model, IDS)[0], ref, rtol=1e-5, atol=1e-5)


def test_a_calibrate_must_follow_rotate_before_statistics_are_read():
    from lowbit.passes.calibrate import CalibratePass
    from lowbit.passes.plan import PlanUniformPass
    from lowbit.passes.smooth import SmoothActivationsPass

    def context():
        return CompileContext(calibration_batches=[IDS], progress=False)

    cleared = r"needs calibration statistics: put a 'calibrate' pass before it \(the 'rotate' pass cleared them, " \
              r"as every activation changed: a 'calibrate' must follow 'rotate'\)$"
    with pytest.raises(PassFailedError, match=r"pass SmoothActivationsPass failed \(after CalibratePass, "
                                              r"RotateResidualStreamPass\): smooth " + cleared):
        run_pipeline(tiny_lm(), [CalibratePass(), RotateResidualStreamPass(), SmoothActivationsPass()], context=context())
    with pytest.raises(PassFailedError, match=r"plan \(static activation quantization\) " + cleared):
        run_pipeline(tiny_lm(), [CalibratePass(), RotateResidualStreamPass(), PlanUniformPass(activations="static")],
                     context=context())
    ok = context()
    run_pipeline(tiny_lm(), [RotateResidualStreamPass(), CalibratePass(), SmoothActivationsPass(alpha=0.5)], context=ok)
    assert [name for name, _ in ok.results] == ["rotate", "calibrate", "smooth"] and ok.stats


def test_extra_reader_of_the_stream_is_refused_naming_the_node():
    model = tiny_lm(extra_reader=True)
    with pytest.raises(RotationError, match=r"Relu node peek reads the residual stream \(h1\)"):
        RotateResidualStreamPass()(model)
    # in a pipeline the error names the pass
    with pytest.raises(PassFailedError, match="pass RotateResidualStreamPass failed"):
        run_pipeline(tiny_lm(extra_reader=True), [RotateResidualStreamPass()])


def test_layernorm_is_refused_and_non_strict_skips_with_the_reason():
    model = tiny_lm(layernorm=True)
    before = weights(model)
    p = RotateResidualStreamPass(strict=False)
    result = p(model)
    refused = result.record.refused
    assert not result.record.clears_stats  # nothing rotated: the statistics of unfolded tensors still hold
    assert refused.startswith("n1 is a LayerNorm on the residual stream: its mean subtraction does not commute")
    # the LayerNorm's gamma was folded (function-preserving); nothing was rotated
    assert result.modified and result.record.to_json() == {"norms_folded": ["n1", "n2/gamma"], "refused": refused}
    np.testing.assert_array_equal(weights(model)["E"], before["E"])


def test_graph_without_an_embedding_is_refused():
    # mlp(): the norm reads the graph input x, so rotating would change the model's inputs
    with pytest.raises(RotationError, match="reads graph input x"):
        RotateResidualStreamPass()(mlp())
    assert issubclass(RotationError, LowbitError)


def test_per_head_v_without_attention_is_refused():
    with pytest.raises(RotationError, match="per_head_v: no attention value path"):
        RotateResidualStreamPass(per_head_v=True)(tiny_lm())


@pytest.mark.parametrize("options, message", [
    ({"learn_steps": -1}, "option 'learn_steps' = -1 must be >= 0"),
    ({"learn_batch": 0}, "option 'learn_batch' = 0 must be >= 1"),
    ({"learn_bits": 3}, "option 'learn_bits' = 3 must be 4 or 8"),
    ({"learn_group_size": -32}, "option 'learn_group_size' = -32 must be >= 0"),
    ({"learn_objective": "mse"}, "option 'learn_objective' = 'mse' must be 'kl' or 'incoherence'"),
])  # fmt: skip
def test_bad_learning_options_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        RotateResidualStreamPass(**options)


def test_learning_without_calibration_data_is_refused():
    with pytest.raises(InputError, match="learn_steps needs calibration data"):
        RotateResidualStreamPass(learn_steps=5, learn_objective="kl")(tiny_lm())


@pytest.fixture(scope="module")
def stories(shared_dir):
    source = shared_dir / "stories260K" / "stories260K.bin"
    model, adapter = fresh(source)
    calib, evals = windows(adapter, calib=8, evals=4, seq_len=64, text=shared_dir.parent / "data" / "tinystories.txt")
    return source, calib, evals, outputs(model, evals)


def test_stories260k_fold_and_rotate_keep_logits(stories):
    source, _, evals, ref = stories
    model, _ = fresh(source)
    p = RotateResidualStreamPass(seed=1, per_head_v=True, online_down_proj=True)
    run_pipeline(model, [p], context=p.context, instruments=[Verify()])
    notes = p.context.results.latest("rotate").to_json()
    assert len(notes["norms_folded"]) == 11 and len(notes["readers"]) == 5 * 5 + 1 and len(notes["writers"]) == 10
    assert set(notes["per_head_v"].values()) == {8} and len(notes["per_head_v"]) == 5 * 2  # v_proj and o_proj
    assert set(notes["online_down_proj"].values()) == {"43x43 ⊗ 4x4"}
    assert notes["rotation"] == "randomized Hadamard D·H_64"
    assert max_rel_diff(outputs(model, evals), ref) < 1e-4


def outlier_ratios(model: ir.Model, batches) -> dict[str, float]:
    """max/median of per-channel absmax at the inputs of q/k/v (shared) and down_proj, per layer."""
    linears, _ = find_linears(model.graph)
    wanted = {lin.name: lin.x.name for lin in linears if lin.name.endswith(("q_proj", "down_proj"))}
    stats = observe(model, wanted.values(), batches, show_progress=False)
    return {name: stats[x].outlier_ratio() for name, x in wanted.items()}


def test_rotation_reduces_activation_outliers_on_stories260k(stories):
    source, calib, _, _ = stories
    model, _ = fresh(source)
    before = outlier_ratios(model, calib)
    RotateResidualStreamPass(online_down_proj=True)(model)
    after = outlier_ratios(model, calib)
    for kind in ("q_proj", "down_proj"):
        b = np.array([v for k, v in before.items() if k.endswith(kind)])
        a = np.array([after[k] for k in before if k.endswith(kind)])
        assert len(a) == 5 and (a < b).all() and np.median(a) < 0.8 * np.median(b), (kind, b, a)


@pytest.mark.slow
def test_smollm2_fold_and_rotate_keep_logits_and_spread_down_proj_outliers():
    from lowbit.passes.fold_norms import FoldNormScalesPass

    model, adapter = fresh("smollm2-135m", cache=False)
    calib, evals = windows(adapter, calib=4, evals=2, seq_len=64)
    ref = outputs(model, evals)
    before = outlier_ratios(model, calib)
    FoldNormScalesPass()(model)
    fold_rel = max_rel_diff(outputs(model, evals), ref)
    p = RotateResidualStreamPass(per_head_v=True, online_down_proj=True)
    p(model)
    rot_rel = max_rel_diff(outputs(model, evals), ref)
    after = outlier_ratios(model, calib)
    downs = [k for k in before if k.endswith("down_proj")]
    worst = max(downs, key=before.get)
    print(f"SmolLM2-135M: fold max rel diff {fold_rel:.2e}, fold+rotate {rot_rel:.2e}")
    print(f"down_proj outlier ratio, median over layers: {np.median([before[k] for k in downs]):.1f} -> "
          f"{np.median([after[k] for k in downs]):.1f}; worst layer {worst}: {before[worst]:.1f} -> {after[worst]:.1f}")
    qs = [k for k in before if k.endswith("q_proj")]
    print(f"q/k/v input outlier ratio, median: {np.median([before[k] for k in qs]):.1f} -> "
          f"{np.median([after[k] for k in qs]):.1f}")
    assert fold_rel < 1e-4 and rot_rel < 1e-4
    assert np.median([after[k] for k in downs]) < 0.5 * np.median([before[k] for k in downs])
    assert after[worst] < 0.2 * before[worst]
