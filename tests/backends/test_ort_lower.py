"""Lowering to ONNX Runtime: MatMulNBits packing, kernel choice per plan, and the end-to-end 4-bit recipes."""

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.backends.ort import nbits
from lowbit.backends.ort.lower import LowerToORTPass, nbits_layout
from lowbit.compiler.core.ortsession import session_options
from lowbit.compiler.core.quantized import QuantizedWeight, weight_dequantize
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass, quantize_weight
from tests.graphs import mlp, ops

SHAPE = {"k": 64, "hidden": 96, "n": 32}  # "down" has K = 96: 3 groups of 32, per-channel blocks of 32


def session(model: ir.Model, *, unfused: bool = False) -> ort.InferenceSession:
    """``unfused``: ORT's QDQ fusions off, so DequantizeLinear -> MatMul runs as written (an
    independent reference: ORT would otherwise turn it into MatMulNBits itself)."""
    disabled = ["QDQSelectorActionTransformer"] if unfused else []
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), session_options(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def quantized(precision, group, symmetric, seed=0):
    model = mlp(seed=seed, **SHAPE)
    PlanUniformPass(precision=precision, group_size=group, symmetric=symmetric)(model)
    QuantizeWeightsPass()(model)
    return model


def inputs(t, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, t, SHAPE["k"])).astype(np.float32)}


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------
def test_packing_layout_low_nibble_first_per_column_and_block():
    codes = np.arange(40, dtype=np.uint8).reshape(20, 2) % 16  # K=20, N=2: one full block of 16 + 4 rows
    packed = nbits.pack_codes(codes, 4, 16)
    assert packed.shape == (2, 2, 8) and packed.dtype == np.uint8
    col0 = codes[:, 0]
    assert packed[0, 0, 0] == col0[0] | (col0[1] << 4) and packed[0, 0, 7] == col0[14] | (col0[15] << 4)
    assert packed[0, 1, 1] == col0[18] | (col0[19] << 4) and (packed[0, 1, 2:] == 0).all()  # padding
    for bits in (4, 8):
        c = np.random.default_rng(bits).integers(0, 2**bits, (100, 7)).astype(np.uint8)
        assert np.array_equal(nbits.unpack_codes(nbits.pack_codes(c, bits, 32), bits, 100), c)
    # zero points: a column's blocks start on a byte boundary, low nibble first
    zp = np.array([[1, 4], [2, 5], [3, 6]], np.uint8)  # [k_blocks=3, N=2]
    assert nbits.pack_zero_points(zp, 4).tolist() == [0x21, 0x03, 0x54, 0x06]
    assert nbits.pack_zero_points(zp, 8).tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="codes must lie in"):
        nbits.pack_codes(np.full((16, 1), 16, np.uint8), 4, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        nbits.pack_codes(codes, 4, 24)


def test_per_channel_and_odd_group_layouts_are_exact():
    assert [nbits.per_channel_block_size(k) for k in (576, 1536, 96, 100)] == [64, 128, 32, 128]
    w = np.random.default_rng(0).standard_normal((96, 5)).astype(np.float32)
    for qw in (quantize_weight(w, 4), quantize_weight(w, 4, symmetric=False),
               QuantizedWeight(*_groups_of_48(w), 4, 48)):
        block, scale, zero = nbits_layout(qw)
        expanded = QuantizedWeight(qw.codes, scale, zero, 4, block)
        assert np.array_equal(expanded.dequantize(), qw.dequantize())
    assert nbits_layout(QuantizedWeight(*_groups_of_48(w, 24), 4, 24)) is None  # 24 = 8 * 3: no block


def _groups_of_48(w, g=48):
    from lowbit.passes.quantize_weights import group_view

    wg = group_view(w, g)
    scale = np.abs(wg).max(axis=1) / 7.5
    codes = np.clip(np.round(wg / scale[:, None]), -8, 7).reshape(-1, w.shape[1])[: len(w)].astype(np.int8)
    return codes, scale.astype(np.float32), None


# ---------------------------------------------------------------------------------------
# Lowering
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 0])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("t", [1, 7])
def test_w4a16_matmulnbits_equals_the_qdq_graph(group, symmetric, t):
    model = quantized("w4a16", group, symmetric)
    feeds = inputs(t)
    ref = session(model, unfused=True).run(None, feeds)[0]
    lower = LowerToORTPass()
    result = lower(model)
    assert result.modified
    assert ops(model).count("MatMulNBits") == 3 and "DequantizeLinear" not in ops(model)
    node = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.metadata_props["lowbit.layer"] == "down")
    attrs = {k: v.value for k, v in node.attributes.items()}
    assert attrs == {"K": 96, "N": 32, "bits": 4, "block_size": 32, "accuracy_level": 0}
    assert (len(node.inputs) == 4) == (not symmetric)  # zero points only when asymmetric
    out = session(model).run(None, feeds)[0]
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    kernels = result.record.kernels
    assert sum(kernels.values()) == 3 and all(k.startswith("MatMulNBits(bits=4") for k in kernels)


def test_w4a8_uses_int8_compute_and_stays_close():
    model = quantized("w4a8", 32, True)
    feeds = inputs(7)
    ref = session(model, unfused=True).run(None, feeds)[0]
    LowerToORTPass()(model)
    levels = {n.attributes["accuracy_level"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}
    out = session(model).run(None, feeds)[0]
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 1e-5 < err < 0.03  # int8 activations: not exact, close


def test_w4a8_int8_gemm_option_takes_per_channel_symmetric_weights():
    model = quantized("w4a8", 0, True)
    feeds = inputs(7)
    ref = session(model, unfused=True).run(None, feeds)[0]
    lower = LowerToORTPass(w4a8_kernel="int8-gemm")
    lower(model)
    assert ops(model).count("MatMulIntegerToFloat") == 3 and "MatMulNBits" not in ops(model)
    out = session(model).run(None, feeds)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05
    grouped = quantized("w4a8", 32, True)
    LowerToORTPass(w4a8_kernel="int8-gemm")(grouped)  # group-wise: no per-channel int8 form, stays on MatMulNBits
    assert ops(grouped).count("MatMulNBits") == 3


def test_8bit_weights_pick_their_kernel_by_form():
    per_channel = quantized("w8a8", 0, True)
    LowerToORTPass()(per_channel)
    assert ops(per_channel).count("MatMulIntegerToFloat") == 3 and "MatMulNBits" not in ops(per_channel)
    grouped = quantized("w8a8", 32, False)
    feeds = inputs(3)
    ref = session(grouped, unfused=True).run(None, feeds)[0]
    LowerToORTPass()(grouped)
    nodes = [n for n in grouped.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and {(n.attributes["bits"].value, n.attributes["accuracy_level"].value) for n in nodes} == {(8, 4)}
    out = session(grouped).run(None, feeds)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.03
    weight_only = quantized("w8a16", 32, True)
    result = LowerToORTPass()(weight_only)
    assert not result.modified
    assert ops(weight_only).count("DequantizeLinear") == 3
    assert set(result.record.kept_qdq) == {"up", "down", "side"} and result.record.layer_kernels() == {}


def test_weight_dequantize_reads_every_qdq_form():
    for precision, group, sym in (("w4a16", 32, True), ("w4a16", 0, False), ("w8a8", 0, True), ("w8a16", 16, False)):
        model = quantized(precision, group, sym)
        mm = next(n for n in model.graph if n.op_type == "MatMul" and n.name == "down")
        dq, qw = weight_dequantize(mm)
        assert dq.op_type == "DequantizeLinear"
        assert (qw.bits, qw.group_size, qw.zero_point is None) == (int(precision[1]), group or None, sym)
        w = mlp(**SHAPE).graph.initializers["w2"].const_value.numpy()
        assert np.abs(qw.dequantize() - w).max() <= qw.scale.max()  # it is the same weight
    assert weight_dequantize(next(n for n in mlp().graph if n.op_type == "MatMul")) is None


def test_nothing_to_lower_is_not_a_modification():
    model = mlp(**SHAPE)
    PlanUniformPass(precision="fp32")(model)
    QuantizeWeightsPass()(model)
    assert not LowerToORTPass()(model).modified
    with pytest.raises(ValueError, match="w4a8_kernel"):
        LowerToORTPass(w4a8_kernel="fast")


def test_requires_a_plan_and_quantized_weights():
    from lowbit.compiler.core.errors import PassFailedError
    from lowbit.compiler.core.pipeline import run_pipeline

    with pytest.raises(PassFailedError, match=r"lower-ort needs a plan: put a planner pass \(e.g. 'plan'\) and "
                                              r"'quantize-weights' before it$"):
        run_pipeline(mlp(**SHAPE), [LowerToORTPass()])
    # a plan alone would lower nothing and leave the model float: quantize-weights is named
    with pytest.raises(PassFailedError, match=r"lower-ort needs quantized weights, and 2 planned layer\(s\) still have "
                                              r"float weights \(e.g. up, planned w4a16\): put 'quantize-weights' "
                                              r"before 'lower-ort'$"):
        run_pipeline(mlp(**SHAPE), [PlanUniformPass(precision="w4a16", overrides=["down=fp32"]), LowerToORTPass()])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w4a16", "w4a8"])
def test_stories260k_4bit_recipes_end_to_end(shared_dir, tmp_path, recipe):
    import lowbit

    result = lowbit.compile(shared_dir / "stories260K" / "stories260K.bin", tmp_path / recipe, recipe=recipe,
                            calib_data=shared_dir.parent / "data" / "tinystories.txt", measure_latency=False,
                            progress=False)
    m = json.loads((result.path / "manifest.json").read_text())
    acc = m["accuracy"]
    print(f"{recipe}: perplexity +{acc['perplexity_increase']:.2%}, KL {acc['kl']:.4f}, top-1 {acc['top1_agreement']:.3f}")
    assert acc["perplexity_increase"] < 0.15 and acc["top1_agreement"] > 0.75
    precisions = {name: lp["precision"] for name, lp in m["plan"]["layers"].items()}
    # w4a16 keeps the output layer (the LM head) at 8 bits
    assert precisions.pop("lm_head") == ("w8a8" if recipe == "w4a16" else recipe)
    assert set(precisions.values()) == {recipe}
    if recipe == "w4a16":
        assert m["layers"]["lm_head"]["kernel"].startswith("MatMulIntegerToFloat")
    kernels = {v["kernel"] for name, v in m["layers"].items() if name != "lm_head"}
    assert kernels == {f"MatMulNBits(bits=4, block={b}, accuracy_level={4 if recipe == 'w4a8' else 0})" for b in (64, 128)} \
        or all(k.startswith("MatMulNBits(bits=4") for k in kernels)
    assert all(v["output_rel_error"] < v["output_rel_error_rtn"] for v in m["layers"].values())
    assert m["size"]["ratio"] < 0.4


def test_dynamic_tensor_activations_run_as_dynamic_quantize_matmul(tmp_path):
    """A plan entry "dynamic-tensor" lowers to the quantize_dynamic form, which ORT fuses into
    DynamicQuantizeMatMul; the result is the per-tensor uint8 quantization of x times the int8 weight."""
    model = quantized("w8a8", 0, True)
    feeds = inputs(5)
    plan_model = mlp(**SHAPE)
    PlanUniformPass(activations="dynamic-tensor")(plan_model)
    model.metadata_props["lowbit.plan"] = plan_model.metadata_props["lowbit.plan"]
    w = {n.name: weight_dequantize(n)[1] for n in model.graph if n.op_type == "MatMul" and weight_dequantize(n)}
    LowerToORTPass()(model)
    assert ops(model).count("DynamicQuantizeLinear") == 2 and ops(model).count("MatMulInteger") == 3  # up/side share x
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]
    import onnx

    # ORT's kernels: one DynamicQuantizeMatMul per single-reader input; a shared input is quantized
    # once (DynamicQuantizeLinear) for two MatMulIntegerToFloat with scalar scales; no row statistics
    run = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert run.count("DynamicQuantizeMatMul") == 1 and run.count("DynamicQuantizeLinear") == 1
    assert run.count("MatMulIntegerToFloat") == 2 and not {"ReduceMax", "ReduceMin", "QuantizeLinear"} & set(run)
    # reference: numpy per-tensor asymmetric uint8 quantization of each linear's input
    def qlin(x, qw):
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = np.float32((hi - lo) / 255)
        zp = np.clip(np.round(-lo / s), 0, 255)
        q = np.clip(np.round(x / s) + zp, 0, 255)
        return (q - zp) * s @ (qw.codes.astype(np.float32) * qw.scale)
    x = feeds["x"]
    xn = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
    h = np.maximum(qlin(xn, w["up"]), 0)
    ref = qlin(h, w["down"]) + qlin(xn, w["side"])
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-3
