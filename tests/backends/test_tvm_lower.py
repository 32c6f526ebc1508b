"""lower-tvm and the IR -> Relax translation on small graphs: packing, numerics on LLVM, refusals."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.backends.ort.lower import LowerToORTPass
from lowbit.backends.tvm import ops
from lowbit.backends.tvm.lower import LowerToTVMPass
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.ortsession import session_options
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import causal_mask_lm, mlp

SHAPE = {"k": 64, "hidden": 96, "n": 32}  # "down" has K = 96: 3 groups of 32, and not a multiple of 64


def quantized(precision, group=0, symmetric=True, seed=0):
    model = mlp(seed=seed, **SHAPE)
    PlanUniformPass(precision=precision, group_size=group, symmetric=symmetric)(model)
    QuantizeWeightsPass()(model)
    return model


def inputs(t, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, t, SHAPE["k"])).astype(np.float32)}


def ort_run(model, feeds, *, unfused=False):
    disabled = ["QDQSelectorActionTransformer"] if unfused else []
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), session_options(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    return sess.run(None, feeds)[0]


def test_pack_codes_low_bits_first_and_round_trips():
    codes = np.arange(2 * 11, dtype=np.uint8).reshape(2, 11) % 16  # K = 11: one full word + 3 codes
    packed = ops.pack_codes(codes, 4)
    assert packed.shape == (2, 2) and packed.dtype == np.uint32
    assert packed[0, 0] == sum(int(codes[0, i]) << (4 * i) for i in range(8))
    assert packed[0, 1] == sum(int(codes[0, 8 + i]) << (4 * i) for i in range(3))  # padding codes are zero
    for bits in (4, 8):
        c = np.random.default_rng(bits).integers(0, 2**bits, (7, 100)).astype(np.uint8)
        assert np.array_equal(ops.unpack_codes(ops.pack_codes(c, bits), bits, 100), c)
    with pytest.raises(ValueError, match="unsigned 4-bit"):
        ops.pack_codes(np.full((1, 8), 16, np.uint8), 4)


def test_lowering_rewrites_planned_linears_and_leaves_a_float_graph_alone():
    model = quantized("w4a16", group=32)
    result = LowerToTVMPass()(model)
    assert result.modified
    lowered = [n for n in model.graph if n.domain == ops.DOMAIN]
    assert [n.op_type for n in lowered] == [ops.PACKED_LINEAR] * 3
    assert not any(n.op_type in ("MatMul", "DequantizeLinear") for n in model.graph)
    down = next(n for n in lowered if n.name.startswith("down"))
    assert down.attributes["in_features"].value == 96 and down.attributes["group_size"].value == 32
    assert down.inputs[1].const_value.shape == (SHAPE["n"], 12) and down.inputs[2].const_value.shape == (SHAPE["n"], 3)
    assert model.graph.opset_imports[ops.DOMAIN] == 1
    plain = mlp(**SHAPE)
    PlanUniformPass(precision="fp32")(plain)
    assert not LowerToTVMPass()(plain).modified


def test_w4a8_and_group_wise_int8_activations_are_refused_with_the_layer_named():
    with pytest.raises(InputError, match=r"layer (up|down|side): the TVM lowering runs int8 activations only"):
        LowerToTVMPass()(quantized("w4a8", group=32))


def test_requires_quantized_weights():
    from lowbit.compiler.core.errors import PassFailedError
    from lowbit.compiler.core.pipeline import run_pipeline

    with pytest.raises(PassFailedError, match=r"lower-tvm needs quantized weights, and 3 planned layer\(s\) still have "
                                              r"float weights \(e.g. up, planned w4a16\): put 'quantize-weights' "
                                              r"before 'lower-tvm'$"):
        run_pipeline(mlp(**SHAPE), [PlanUniformPass(precision="w4a16"), LowerToTVMPass()])


def _tvm_outputs(model, feeds_list, target="llvm"):
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from lowbit.backends.tvm.build import relax_pipeline
    from lowbit.backends.tvm.relax_import import to_relax
    from lowbit.backends.tvm.targets import make_target

    mod, _, arrays = to_relax(model)
    tgt = make_target(target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt)), tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in arrays]
    return [vm["main"](tvm.runtime.tensor(f["x"]), *params).numpy() for f in feeds_list]


@pytest.mark.parametrize("group,symmetric", [(32, True), (0, True), (32, False)])
def test_packed_linear_on_llvm_equals_the_qdq_graph(group, symmetric):
    pytest.importorskip("tvm")
    model = quantized("w4a16", group=group, symmetric=symmetric)
    feeds = [inputs(1), inputs(7, seed=2)]
    expected = [ort_run(model, f, unfused=True) for f in feeds]  # DequantizeLinear -> MatMul, as written
    LowerToTVMPass()(model)
    for got, ref in zip(_tvm_outputs(model, feeds), expected):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("zero_point", ["per-token", "symmetric"])
def test_int8_linear_on_llvm_equals_the_ort_lowering(zero_point):
    pytest.importorskip("tvm")
    feeds = [inputs(1), inputs(9, seed=3)]
    ref_model, model = quantized("w8a8"), quantized("w8a8")
    LowerToORTPass(token_zero_point=zero_point)(ref_model)
    LowerToTVMPass(token_zero_point=zero_point)(model)
    kinds = {n.attributes["mode"].value for n in model.graph if n.op_type == ops.INT8_LINEAR}
    assert kinds == {zero_point}
    for got, f in zip(_tvm_outputs(model, feeds), feeds):
        ref = ort_run(ref_model, f)
        # the same integer GEMM: only the float epilogue's rounding order differs
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_int8_linear_with_one_range_per_tensor_equals_the_ort_lowering():
    pytest.importorskip("tvm")
    feeds = [inputs(1), inputs(9, seed=3)]
    models = []
    for _ in range(2):
        model = mlp(seed=0, **SHAPE)
        PlanUniformPass(precision="w8a8", activations="dynamic-tensor")(model)
        QuantizeWeightsPass()(model)
        models.append(model)
    LowerToORTPass()(models[0])
    LowerToTVMPass()(models[1])
    assert {n.attributes["mode"].value for n in models[1].graph if n.op_type == ops.INT8_LINEAR} == {"tensor"}
    for got, f in zip(_tvm_outputs(models[1], feeds), feeds):
        ref = ort_run(models[0], f)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _shape_vars(func) -> set[str]:
    """Names of the symbolic variables in the shapes of ``func``'s bindings."""
    from tvm import relax

    from lowbit.backends.tvm.relax_import import _dims, _free_vars

    names: set[str] = set()

    def visit(e):
        for d in _dims(getattr(e, "ty", None)) or []:
            names.update(v.name for v in _free_vars(d))

    relax.analysis.post_order_visit(func.body, visit)
    return names


def test_causal_mask_shapes_stay_in_the_input_dimensions_and_match_ort():
    """SmolLM2's mask construction: the importer's ``range_len_0`` and the legalized slice's
    ``s``/``s_1`` are replaced by ``batch``/``seq`` (left in, ``FuseTIR`` spread them to tensors
    allocated before they were defined, and ``VMShapeLower`` failed: "has not been computed")."""
    tvm = pytest.importorskip("tvm")
    from lowbit.backends.tvm import build
    from lowbit.backends.tvm.relax_import import symbolic_equalities, to_relax
    from lowbit.backends.tvm.targets import make_target

    model = causal_mask_lm()
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    mod, _, arrays = to_relax(model)
    assert _shape_vars(mod["main"]) == {"batch", "seq"} and not symbolic_equalities(mod["main"])
    tgt = make_target("llvm")
    with tgt:
        passes = list(build._backend_module(tgt).library_dispatch_passes(tgt)) + build.fusion_passes()
        fused = tvm.transform.Sequential(passes)(mod)
    assert _shape_vars(fused["main"]) == {"batch", "seq"}
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=build.relax_pipeline(tgt)), tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in arrays]
    for shape in ((1, 1), (2, 7)):
        ids = np.random.default_rng(shape[1]).integers(0, 32, shape).astype(np.int64)
        got = vm["main"](tvm.runtime.tensor(ids), *params).numpy()
        np.testing.assert_allclose(got, sess.run(None, {"input_ids": ids})[0], rtol=1e-5, atol=1e-6)


def test_unify_symbolic_vars_binds_a_later_variable_to_the_input_dimension():
    pytest.importorskip("tvm")
    from tvm import relax, tirx

    from lowbit.backends.tvm.relax_import import (
        symbolic_equalities,
        unify_symbolic_vars,
    )

    seq, n = tirx.Var("seq", "int64"), tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([seq], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.arange(0, seq, 1, "float32"))
            m = bb.match_cast(r, relax.TensorType([n], "float32"))  # n: a variable of the cast's own
            y = bb.emit_output(relax.op.add(bb.match_cast(m, relax.TensorType([seq], "float32")), x))
        bb.emit_func_output(y)
    mod = bb.get()
    assert [str(v) for v in symbolic_equalities(mod["main"])] == ["n"]
    out = unify_symbolic_vars(mod)
    assert _shape_vars(out["main"]) == {"seq"} and not symbolic_equalities(out["main"])


def test_an_op_neither_lowered_nor_importable_is_an_input_error():
    pytest.importorskip("tvm")
    from lowbit.backends.tvm.relax_import import to_relax

    model = quantized("w8a8")
    LowerToORTPass()(model)  # com.microsoft kernels: ONNX Runtime only
    with pytest.raises(InputError, match=r"cannot compile operator\(s\) .*com\.microsoft::MatMulIntegerToFloat"):
        to_relax(model)


def test_unknown_target_and_misplaced_arch_are_input_errors():
    pytest.importorskip("tvm")
    from lowbit.backends.tvm.targets import make_target

    with pytest.raises(InputError, match="unknown TVM target 'rocm'"):
        make_target("rocm")
    with pytest.raises(InputError, match="--arch applies to --target cuda only"):
        make_target("llvm", "sm_90")
    with pytest.raises(InputError, match="expected sm_XX"):
        make_target("cuda", "hopper")
    assert make_target("cuda", "sm_90").attrs["arch"] == "sm_90"


def test_cli_refuses_tvm_options_without_the_tvm_backend_and_unknown_targets(tmp_path, capsys):
    from lowbit.compiler.cli import main

    out = tmp_path / "out"
    assert main(["compile", "model.onnx", "-o", str(out), "--target", "cuda"]) == 2
    assert "--target and --arch apply to --backend tvm only" in capsys.readouterr().err
    if importlib.util.find_spec("tvm") is not None:
        assert main(["compile", "model.onnx", "-o", str(out), "--backend", "tvm", "--target", "rocm"]) == 2
        assert "unknown TVM target 'rocm'" in capsys.readouterr().err
    assert not out.exists()
