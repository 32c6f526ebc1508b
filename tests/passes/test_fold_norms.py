import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import Verify, run_pipeline
from lowbit.passes.fold_norms import FoldNormScalesPass
from tests.graphs import mlp, ops, run
from tests.passes.real_models import fresh, max_rel_diff, outputs, windows

X = np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)


def const(model: ir.Model, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()


def test_gamma_folds_into_both_linears_and_mul_goes():
    model = mlp(outlier=4.0)
    ref = run(model, {"x": X})[0]
    gamma = model.graph.initializers["gamma"].const_value.numpy()
    w1, w2, w3 = (model.graph.initializers[w].const_value.numpy().copy() for w in ("w1", "w2", "w3"))
    p = FoldNormScalesPass()
    result = p(model)
    assert result.modified
    # Expected: the written-out RMSNorm without Mul(gamma); both readers scaled row-wise, down untouched
    assert ops(model) == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "MatMul", "Relu", "MatMul", "MatMul", "Add"]
    up, side = (next(n for n in model.graph if n.name == name) for name in ("up", "side"))
    assert up.inputs[0].name == side.inputs[0].name == "xn0"
    np.testing.assert_array_equal(const(model, "up"), gamma[:, None] * w1)
    np.testing.assert_array_equal(const(model, "side"), gamma[:, None] * w3)
    np.testing.assert_array_equal(const(model, "down"), w2)
    np.testing.assert_allclose(run(model, {"x": X})[0], ref, rtol=1e-5, atol=1e-5)
    assert result.record.to_json() == {"norms_folded": ["norm/gamma"], "scales_folded": [], "skipped": {}}
    again = FoldNormScalesPass()
    again_result = again(model)
    assert not again_result.modified
    assert again_result.record.to_json()["norms_folded"] == []


def test_norm_also_read_by_a_non_linear_is_skipped_with_reason():
    model = mlp(outlier=4.0)
    # the norm output also feeds an Add: folding gamma into the linears would change what the Add sees
    y = model.graph.outputs[0]
    xn = next(n for n in model.graph if n.name == "norm/gamma").outputs[0]
    extra = ir.node("Add", [y, xn], name="extra")
    model.graph.append(extra)
    extra.outputs[0].name, extra.outputs[0].dtype = "y_plus_xn", ir.DataType.FLOAT
    model.graph.outputs[0] = extra.outputs[0]
    before = ops(model)
    ref = run(model, {"x": X})[0]
    p = FoldNormScalesPass()
    result = p(model)
    assert not result.modified
    assert ops(model) == before
    assert result.record.to_json()["skipped"] == {"norm/gamma": "norm output also read by Add (extra)"}
    np.testing.assert_array_equal(run(model, {"x": X})[0], ref)


def layernorm_graph(seed: int = 0, k: int = 6, n: int = 4) -> ir.Model:
    """x -> LayerNormalization(gamma, beta) -> [MatMul w1 + b1, MatMul w2]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((1 + rng.random(k)).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["xn"], name="ln", axis=-1),
        helper.make_node("MatMul", ["xn", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["y1"], name="fc1_bias"),
        helper.make_node("MatMul", ["xn", "w2"], ["y2"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", n]) for y in ("y1", "y2")],
        inits,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def test_layernorm_beta_goes_into_existing_bias_and_a_new_add():
    model = layernorm_graph()
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    ref = run(model, {"x": x})
    init = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    p = FoldNormScalesPass()
    result = p(model)
    assert result.modified
    np.testing.assert_array_equal(const(model, "ln", 1), np.ones(6, np.float32))
    np.testing.assert_array_equal(const(model, "ln", 2), np.zeros(6, np.float32))
    np.testing.assert_allclose(const(model, "fc1"), init["gamma"][:, None] * init["w1"], rtol=1e-6)
    np.testing.assert_allclose(const(model, "fc1_bias"), init["b1"] + init["beta"] @ init["w1"], rtol=1e-5)
    # fc2 had no bias: it gets one, tagged with the pass, and the graph output keeps its name
    bias = next(n for n in model.graph if n.name == "fc2/folded_bias")
    assert bias.metadata_props["lowbit.pass"] == "FoldNormScalesPass"
    assert bias.outputs[0].name == "y2" and bias.outputs[0].is_graph_output()
    np.testing.assert_allclose(bias.inputs[1].const_value.numpy(), init["beta"] @ init["w2"], rtol=1e-5)
    for got, want in zip(run(model, {"x": x}), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not FoldNormScalesPass()(model).modified


def scale_graph() -> ir.Model:
    """Mul(x, s) -> MatMul(w); the same w is an embedding table a Gather reads (tied)."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
            helper.make_node("MatMul", ["xs", "w"], ["y"], name="fc"),
            helper.make_node("Gather", ["w", "ids"], ["e"], name="embed", axis=0),
        ],
        "scale",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", 3]),
        ],
        [
            numpy_helper.from_array(np.array([1.0, 5.0, 0.5, 2.0], np.float32), "s"),
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return ir.from_proto(model)


def test_per_channel_scale_folds_and_tied_weight_is_untied():
    model = scale_graph()
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32), "ids": np.array([0, 3, 1])}
    ref = run(model, feeds)
    w = model.graph.initializers["w"].const_value.numpy().copy()
    p = FoldNormScalesPass()
    result = p(model)
    assert result.modified
    assert ops(model) == ["MatMul", "Gather"]
    fc, embed = list(model.graph)
    assert embed.inputs[0].name == "w" and fc.inputs[1].name != "w"  # the Gather keeps the original table
    np.testing.assert_array_equal(embed.inputs[0].const_value.numpy(), w)
    np.testing.assert_array_equal(fc.inputs[1].const_value.numpy(), np.array([1, 5, 0.5, 2], np.float32)[:, None] * w)
    assert result.record.to_json()["scales_folded"] == ["scale"]
    for got, want in zip(run(model, feeds), ref):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_scale_read_by_a_non_linear_too_is_skipped_with_reason():
    model = scale_graph()
    xs = next(n for n in model.graph if n.name == "scale").outputs[0]
    model.graph.outputs.append(xs)
    p = FoldNormScalesPass()
    result = p(model)
    assert not result.modified
    assert result.record.to_json()["skipped"] == {"scale scale": "scaled output xs is a graph output"}


def test_stale_statistics_of_folded_norm_outputs_are_dropped():
    model = mlp(outlier=4.0)
    context = CompileContext(stats={"xn": object(), "h": object()})
    run_pipeline(model, [FoldNormScalesPass()], context=context, instruments=[Verify()])
    assert set(context.stats) == {"h"}  # the linear's output is unchanged, the norm's is not


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "stories260K" / "stories260K.bin", shared_dir.parent / "data" / "tinystories.txt"


def test_stories260k_logits_unchanged_on_held_out_text(stories):
    source, text = stories
    model, adapter = fresh(source)
    _, evals = windows(adapter, calib=1, evals=4, seq_len=64, text=text)
    ref = outputs(model, evals)
    n_mul = ops(model).count("Mul")
    p = FoldNormScalesPass()
    run_pipeline(model, [p], context=p.context, instruments=[Verify()])
    notes = p.context.results.latest("fold-norms").to_json()  # the record, filed by the pipeline
    assert len(notes["norms_folded"]) == 11 and notes["skipped"] == {}  # 5 x 2 blocks + final norm
    assert ops(model).count("Mul") == n_mul - 11
    assert max_rel_diff(outputs(model, evals), ref) < 1e-4


@pytest.mark.slow
def test_minilm_embedding_unchanged_and_post_norms_skipped():
    model, adapter = fresh("all-minilm-l6-v2", cache=False)
    _, evals = windows(adapter, calib=1, evals=4, seq_len=32)
    ref = outputs(model, evals)
    skipped = FoldNormScalesPass()(model).record.skipped
    # BERT is post-norm: every LayerNorm output feeds the next residual Add as well as linears
    assert len(skipped) == 13 and skipped["embeddings.LayerNorm"].startswith("norm output also read by Add")
    rel = max_rel_diff(outputs(model, evals), ref)
    print(f"all-MiniLM-L6-v2 fold-norms: max rel diff {rel:.2e}")
    assert rel < 1e-4
