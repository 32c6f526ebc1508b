import numpy as np

from lowbit.compiler.core.passbase import CompileContext, assign_debug_ids
from lowbit.compiler.core.pipeline import Verify, run_pipeline
from lowbit.compiler.core.results import manifest_sections
from lowbit.passes.fuse_linears import DEBUG_IDS_KEY, FuseSharedInputLinearsPass
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import mlp, ops, run

X = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)


def exact(model):
    """Run without ORT's graph optimizations (which rewrite QDQ weights into int8 kernels)."""
    import onnx_ir as ir
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts).run(None, {"x": X})[0]


def quantized(**plan):
    model = mlp()
    assign_debug_ids(model)
    run_pipeline(model, [PlanUniformPass(**plan), QuantizeWeightsPass()], instruments=[Verify()])
    return model


def test_shared_input_linears_become_one_exactly():
    model = quantized()
    before = exact(model)
    ids = [n.metadata_props["lowbit.debug_id"] for n in model.graph if n.name in ("up", "side")]
    p = FuseSharedInputLinearsPass()
    run_pipeline(model, [p], context=p.context, instruments=[Verify()])
    assert ops(model).count("MatMul") == 2 and ops(model).count("Split") == 1  # (up+side) and down
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.metadata_props[DEBUG_IDS_KEY] == ",".join(ids)
    assert p.context.results.latest("fuse-linears").to_json() == {"groups": [["up", "side"]]}
    np.testing.assert_array_equal(exact(model), before)
    assert not any(name.startswith(("up.", "side.")) for name in model.graph.initializers)
    assert not FuseSharedInputLinearsPass()(model).modified


def test_different_plans_stay_apart():
    model = quantized(overrides=["side=w8a16"])
    assert not FuseSharedInputLinearsPass()(model).modified
    assert ops(model).count("MatMul") == 3


def test_fused_graph_lowers_to_one_integer_matmul():
    from lowbit.backends.ort.lower import LowerToORTPass

    model = quantized()
    ref = run(mlp(), {"x": X})[0]
    run_pipeline(model, [FuseSharedInputLinearsPass(), LowerToORTPass()], context=CompileContext(), instruments=[Verify()])
    assert sum(op in ("MatMulInteger", "MatMulIntegerToFloat") for op in ops(model)) == 2
    assert np.abs(run(model, {"x": X})[0] - ref).max() / np.abs(ref).max() < 0.02


def test_4bit_group_wise_linears_with_zero_points_fuse_and_lower_to_one_matmul_nbits():
    from lowbit.backends.ort.lower import LowerToORTPass

    model = quantized(precision="w4a16", group_size=16, symmetric=False)
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert all(n.attributes["block_size"].value == 16 and len(n.inputs) == 3 for n in dqs)  # scales and zero points
    before = exact(model)
    run_pipeline(model, [FuseSharedInputLinearsPass()], instruments=[Verify()])
    assert ops(model).count("MatMul") == 2 and ops(model).count("Split") == 1
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.startswith("up+side"))
    assert dq.attributes["block_size"].value == 16 and dq.inputs[2].const_value.shape == dq.inputs[1].const_value.shape
    np.testing.assert_array_equal(exact(model), before)
    run_pipeline(model, [LowerToORTPass()], context=CompileContext(), instruments=[Verify()])
    assert ops(model).count("MatMulNBits") == 2
    ref = run(mlp(), {"x": X})[0]
    assert np.abs(run(model, {"x": X})[0] - ref).max() / np.abs(ref).max() < 0.1


def test_every_fused_layer_records_the_kernel_it_runs_on():
    from lowbit.backends.ort.lower import LowerToORTPass

    model, context = mlp(), CompileContext()
    run_pipeline(model, [PlanUniformPass(precision="w4a8", group_size=16), QuantizeWeightsPass(),
                         FuseSharedInputLinearsPass(), LowerToORTPass()], context=context)
    table = manifest_sections(context.results)["layers"]
    assert table["up"]["fused_with"] == table["side"]["fused_with"] == ["up", "side"] and "fused_with" not in table["down"]
    assert table["up"]["kernel"] == table["side"]["kernel"] == table["down"]["kernel"] == "MatMulNBits(bits=4, block=16, accuracy_level=4)"
