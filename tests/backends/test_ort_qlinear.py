"""Tests for lowbit.backends.ort.qlinear: each emitter is run in ONNX Runtime and compared with
a numpy model of the exact same integer arithmetic (tight) and with fp32 (loose)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.tape
import onnxruntime as ort
import pytest

from lowbit.backends.ort import qlinear

K, N = 64, 48
FLOAT = ir.DataType.FLOAT


# ---------------------------------------------------------------------------------------
# numpy references (same formulas, float32 where the graph computes in float32, exact ints)
# ---------------------------------------------------------------------------------------
def ref_per_token(x, w_q, w_scale, bias=None, symmetric=False):
    x = np.asarray(x, np.float32)
    eps = np.float32(1e-30)
    if symmetric:
        amax = np.abs(x).max(axis=-1, keepdims=True)
        s = np.maximum(amax * np.float32(1 / 127), eps).astype(np.float32)
        zp = np.full_like(s, 128.0)
    else:
        hi = np.maximum(x.max(axis=-1, keepdims=True), np.float32(0))
        lo = np.minimum(x.min(axis=-1, keepdims=True), np.float32(0))
        s = np.maximum((hi - lo) * np.float32(1 / 255), eps).astype(np.float32)
        zp = np.rint(-lo / s).astype(np.float32)
    q = np.clip(np.rint(x / s) + zp, 0, 255)
    acc = (q.astype(np.int64) - zp.astype(np.int64)) @ w_q.astype(np.int64)  # exact
    y = acc.astype(np.float64) * s.astype(np.float64) * w_scale.astype(np.float64)
    if bias is not None:
        y = y + bias
    return y, q, s, zp


def ref_static(x, w_q, w_scale, x_scale, x_zp, bias=None):
    x = np.asarray(x, np.float32)
    q = np.clip(np.rint(x / np.float32(x_scale)) + x_zp, 0, 255)
    acc = (q.astype(np.int64) - x_zp) @ w_q.astype(np.int64)
    y = acc.astype(np.float64) * np.float64(np.float32(x_scale)) * w_scale.astype(np.float64)
    return y if bias is None else y + bias


def ref_dynamic_per_tensor(x, w_q, w_scale, bias=None):
    """ONNX DynamicQuantizeLinear: uint8, range extended to include 0."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    zp = np.clip(np.rint(-np.float32(lo) / s), 0, 255)
    q = np.clip(np.rint(x / s) + zp, 0, 255)
    acc = (q.astype(np.int64) - int(zp)) @ w_q.astype(np.int64)
    y = acc.astype(np.float64) * np.float64(s) * w_scale.astype(np.float64)
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def activations(rng, shape, outliers=True):
    """Normal activations with a per-row magnitude spread, an offset (so asymmetric zero
    points differ from 128) and a few ~30x outlier channels."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.exp(rng.normal(0, 0.5, size=(*shape[:-1], 1))).astype(np.float32)
    x += np.float32(0.7)
    if outliers:
        x[..., [3, 17]] *= 30.0
    return x


def weights(rng, k=K, n=N):
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    w_q, w_scale = qlinear.quantize_weight_per_channel(w)
    return w, w_q, w_scale


def build(emit, x_shape, opset=21):
    x = ir.val("x", FLOAT, x_shape)
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="g")
    y = emit(graph, x)
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, dump=None):
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if dump is not None:
        so.optimized_model_filepath = str(dump)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, x, **kw):
    return session(model, **kw).run(None, {"x": x})[0]


def assert_exact(y, ref):
    """Integer math identical; only float32 epilogue rounding allowed."""
    y = y.astype(np.float64)
    tol = 2e-6 * np.abs(ref).max() + 1e-6 * np.abs(ref)
    assert np.all(np.isfinite(y))
    bad = np.abs(y - ref) > tol
    assert not bad.any(), f"{bad.sum()} elements off, max abs diff {np.abs(y - ref).max():.3g}"


def rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


OPT_LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL]


# ---------------------------------------------------------------------------------------
# quantize_weight_per_channel
# ---------------------------------------------------------------------------------------
def test_quantize_weight_per_channel_symmetric():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w_q, s = qlinear.quantize_weight_per_channel(w)
    assert w_q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (N,)
    np.testing.assert_allclose(s, np.abs(w).max(0) / 127, rtol=1e-6)
    assert np.abs(w_q).max() == 127 and w_q.min() >= -127
    assert np.all(np.abs(w_q * s - w) <= s / 2 + 1e-7)


def test_quantize_weight_zero_column_gets_scale_one():
    w = np.ones((K, N), np.float32)
    w[:, 5] = 0.0
    w_q, s = qlinear.quantize_weight_per_channel(w)
    assert s[5] == 1.0 and np.all(w_q[:, 5] == 0)
    assert np.all(np.isfinite(s))


def test_quantize_weight_4bit_range():
    rng = np.random.default_rng(1)
    w_q, s = qlinear.quantize_weight_per_channel(rng.standard_normal((K, N)), bits=4)
    assert w_q.min() >= -7 and w_q.max() == 7


# ---------------------------------------------------------------------------------------
# dynamic per-token
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("x_shape", [(5, K), (2, 7, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("level", OPT_LEVELS, ids=["opt_all", "opt_none"])
def test_per_token_matches_integer_reference(symmetric, x_shape, with_bias, level):
    rng = np.random.default_rng(2)
    w, w_q, w_scale = weights(rng)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    x = activations(rng, x_shape)
    model = build(lambda g, v: qlinear.emit_dynamic_per_token_linear(
        g, v, w_q, w_scale, bias=bias, name="lin", symmetric=symmetric), x_shape)
    y = run(model, x, level=level)
    assert y.shape == (*x_shape[:-1], N)
    ref, *_ = ref_per_token(x, w_q, w_scale, bias, symmetric)
    assert_exact(y, ref)
    # loose sanity bound against the unquantized linear (outliers make it coarse)
    y32 = x.astype(np.float64) @ w + (0 if bias is None else bias)
    assert rel_err(y, y32) < 0.1


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_per_token_accuracy_without_outliers(symmetric):
    rng = np.random.default_rng(3)
    w, w_q, w_scale = weights(rng)
    x = activations(rng, (16, K), outliers=False)
    model = build(lambda g, v: qlinear.emit_dynamic_per_token_linear(
        g, v, w_q, w_scale, name="lin", symmetric=symmetric), x.shape)
    assert rel_err(run(model, x), x.astype(np.float64) @ w) < 0.02


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_per_token_opset18_fallback_same_numbers(symmetric):
    rng = np.random.default_rng(4)
    _, w_q, w_scale = weights(rng)
    x = activations(rng, (2, 5, K))
    emit = lambda g, v: qlinear.emit_dynamic_per_token_linear(  # noqa: E731
        g, v, w_q, w_scale, name="lin", symmetric=symmetric)
    m18 = build(emit, x.shape, opset=18)
    assert not any(n.op_type == "QuantizeLinear" and "block_size" in n.attributes for n in m18.graph)
    y18 = run(m18, x)
    ref, *_ = ref_per_token(x, w_q, w_scale, symmetric=symmetric)
    assert_exact(y18, ref)
    np.testing.assert_array_equal(y18, run(build(emit, x.shape, opset=21), x))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_per_token_symbolic_dims_and_zero_row(symmetric):
    rng = np.random.default_rng(5)
    _, w_q, w_scale = weights(rng)
    bias = rng.standard_normal(N).astype(np.float32)
    model = build(lambda g, v: qlinear.emit_dynamic_per_token_linear(
        g, v, w_q, w_scale, bias=bias, name="lin", symmetric=symmetric), ["batch", "seq", K])
    sess = session(model)
    for t in (1, 9):
        x = activations(rng, (2, t, K))
        x[1, 0, :] = 0.0  # an all-zero row (padding) must give exactly the bias
        y = sess.run(None, {"x": x})[0]
        ref, *_ = ref_per_token(x, w_q, w_scale, bias, symmetric)
        assert_exact(y, ref)
        np.testing.assert_array_equal(y[1, 0], bias)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_per_token_zero_weight_column(symmetric):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    w[:, 7] = 0.0
    w_q, w_scale = qlinear.quantize_weight_per_channel(w)
    x = activations(rng, (3, K))
    model = build(lambda g, v: qlinear.emit_dynamic_per_token_linear(
        g, v, w_q, w_scale, name="lin", symmetric=symmetric), x.shape)
    y = run(model, x)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:, 7], 0.0)
    ref, *_ = ref_per_token(x, w_q, w_scale, symmetric=symmetric)
    assert_exact(y, ref)


def test_asymmetric_zero_point_correction_is_applied():
    """Fails if the  - s * zp * w_scale * colsum(W_q)  term were dropped."""
    rng = np.random.default_rng(7)
    _, w_q, w_scale = weights(rng)
    w_q[:, :8] = np.abs(w_q[:, :8])  # columns with a large colsum make the term big
    x = activations(rng, (6, K))
    model = build(lambda g, v: qlinear.emit_dynamic_per_token_linear(g, v, w_q, w_scale, name="lin"), x.shape)
    y = run(model, x)
    ref, q, s, zp = ref_per_token(x, w_q, w_scale)
    assert np.all((zp > 0) & (zp < 255)) and len(np.unique(zp)) > 1  # per-row zero points
    no_correction = (q.astype(np.int64) @ w_q.astype(np.int64)) * s.astype(np.float64) * w_scale
    assert rel_err(no_correction, ref) > 0.5
    assert_exact(y, ref)


def test_per_token_kernel_and_downstream_bias_add(tmp_path):
    """ORT must run the int8 kernel (no MatMulInteger left), and neither our bias nor a
    model's own bias Add after the linear may be absorbed into it: ORT 1.32 scales an
    absorbed bias by the per-row activation scale."""
    rng = np.random.default_rng(8)
    _, w_q, w_scale = weights(rng)
    bias = rng.standard_normal(N).astype(np.float32)
    for symmetric in (False, True):
        def emit(g, v):
            y = qlinear.emit_dynamic_per_token_linear(g, v, w_q, w_scale, bias=bias, name="lin",
                                                      symmetric=symmetric)
            z = ir.node("Add", [y, g.initializers.get("model_bias") or _init(g, "model_bias", bias)])
            g.append(z)
            z.outputs[0].type = ir.TensorType(FLOAT)
            z.outputs[0].shape = y.shape
            return z.outputs[0]

        model = build(emit, ["batch", "seq", K])
        dump = tmp_path / f"opt_{symmetric}.onnx"
        x = activations(rng, (2, 5, K))
        y = session(model, dump=dump).run(None, {"x": x})[0]
        ref, *_ = ref_per_token(x, w_q, w_scale, bias, symmetric)
        assert_exact(y, ref + bias)
        nodes = onnx.load(str(dump)).graph.node
        ops = [n.op_type for n in nodes]
        assert "MatMulIntegerToFloat" in ops and "MatMulInteger" not in ops, ops
        fused = next(n for n in nodes if n.op_type == "MatMulIntegerToFloat")
        assert len(fused.input) < 7 or not fused.input[6]


def _init(graph, name, array):
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(FLOAT),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


# ---------------------------------------------------------------------------------------
# dynamic per-tensor
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(5, K), (2, 7, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_dynamic_per_tensor_matches_integer_reference(x_shape, with_bias, tmp_path):
    rng = np.random.default_rng(9)
    w, w_q, w_scale = weights(rng)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    x = activations(rng, x_shape)
    model = build(lambda g, v: qlinear.emit_dynamic_per_tensor_linear(
        g, v, w_q, w_scale, bias=bias, name="lin"), x_shape)
    dump = tmp_path / "opt.onnx"
    y = session(model, dump=dump).run(None, {"x": x})[0]
    assert_exact(y, ref_dynamic_per_tensor(x, w_q, w_scale, bias))
    assert [n.op_type for n in onnx.load(str(dump)).graph.node] == ["DynamicQuantizeMatMul"]


# ---------------------------------------------------------------------------------------
# static
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(5, K), (2, 7, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_static_matches_integer_reference(x_shape, with_bias):
    rng = np.random.default_rng(10)
    w, w_q, w_scale = weights(rng)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    calib = activations(rng, (64, K), outliers=False)
    lo, hi = min(calib.min(), 0.0), max(calib.max(), 0.0)
    x_scale = float((hi - lo) / 255)
    x_zp = int(np.rint(-lo / x_scale))
    x = activations(rng, x_shape, outliers=False)
    x.reshape(-1, K)[0, 0] = 1e4  # beyond the calibrated range: saturates to 255
    model = build(lambda g, v: qlinear.emit_static_linear(
        g, v, w_q, w_scale, x_scale, x_zp, bias=bias, name="lin"), x_shape)
    assert model.opset_imports[qlinear.MS_DOMAIN] == 1
    y = run(model, x)
    ref = ref_static(x, w_q, w_scale, x_scale, x_zp, bias)
    assert_exact(y, ref)
    inside = x.copy()
    inside.reshape(-1, K)[0, 0] = 0.0
    y32 = inside.astype(np.float64) @ w + (0 if bias is None else bias)
    assert rel_err(run(model, inside), y32) < 0.05


def test_static_zero_weight_column_and_validation():
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    w[:, 0] = 0.0
    w_q, w_scale = qlinear.quantize_weight_per_channel(w)
    x = activations(rng, (4, K), outliers=False)
    model = build(lambda g, v: qlinear.emit_static_linear(g, v, w_q, w_scale, 0.05, 100, name="lin"), x.shape)
    y = run(model, x)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    assert_exact(y, ref_static(x, w_q, w_scale, 0.05, 100))
    for bad in (dict(x_scale=0.0, x_zero_point=0), dict(x_scale=0.1, x_zero_point=-1),
                dict(x_scale=0.1, x_zero_point=256)):
        with pytest.raises(ValueError):
            build(lambda g, v: qlinear.emit_static_linear(g, v, w_q, w_scale, name="lin", **bad), x.shape)


# ---------------------------------------------------------------------------------------
# graph plumbing: names, metadata, placement, tape
# ---------------------------------------------------------------------------------------
EMITTERS = {
    "per_token": lambda g, v, w_q, s, **kw: qlinear.emit_dynamic_per_token_linear(g, v, w_q, s, **kw),
    "per_token_sym": lambda g, v, w_q, s, **kw: qlinear.emit_dynamic_per_token_linear(
        g, v, w_q, s, symmetric=True, **kw),
    "per_tensor": lambda g, v, w_q, s, **kw: qlinear.emit_dynamic_per_tensor_linear(g, v, w_q, s, **kw),
    "static": lambda g, v, w_q, s, **kw: qlinear.emit_static_linear(g, v, w_q, s, 0.05, 128, **kw),
}


@pytest.mark.parametrize("kind", list(EMITTERS))
def test_names_metadata_and_initializers(kind):
    rng = np.random.default_rng(12)
    _, w_q, w_scale = weights(rng)
    model = build(lambda g, v: EMITTERS[kind](g, v, w_q, w_scale, bias=np.zeros(N, np.float32),
                                              name="blk0.q_proj", pass_name="my_pass"), [2, 3, K])
    graph = model.graph
    assert len(graph) > 0
    for node in graph:
        assert node.metadata_props.get(qlinear.PASS_KEY) == "my_pass"
        assert node.name.startswith("blk0.q_proj/")
    inits = graph.initializers
    np.testing.assert_array_equal(inits["blk0.q_proj.w_q"].const_value.numpy(), w_q)
    np.testing.assert_array_equal(inits["blk0.q_proj.w_scale"].const_value.numpy(), w_scale)
    assert "blk0.q_proj.bias" in inits
    assert all(name.startswith("blk0.q_proj.") for name in inits)
    y = graph.outputs[0]
    assert y.dtype == FLOAT and list(y.shape) == [2, 3, N]


def test_replaces_matmul_inside_existing_graph():
    """The caller's workflow: emit next to a MatMul, reroute its uses, remove it."""
    rng = np.random.default_rng(13)
    w, w_q, w_scale = weights(rng)
    x_in = ir.val("x", FLOAT, ["batch", "seq", K])
    tape = onnx_ir.tape.Tape()
    h = tape.op("Relu", [x_in])
    w_init = tape.initializer(ir.tensor(w, name="W"))
    mm = tape.op("MatMul", [h, w_init])
    out = tape.op("Add", [mm, tape.initializer(ir.tensor(np.ones(N, np.float32), name="b"))])
    out2 = tape.op("Neg", [x_in])  # a later node that does not depend on the linear
    for v, last in ((out, N), (out2, K)):
        v.type, v.shape = ir.TensorType(FLOAT), ir.Shape(["batch", "seq", last])
    graph = ir.Graph([x_in], [out, out2], nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 21}, name="g")
    matmul_node = mm.producer()
    y = qlinear.emit_dynamic_per_token_linear(graph, h, w_q, w_scale, name="lin", symmetric=True)
    mm.replace_all_uses_with(y)
    graph.remove(matmul_node, safe=True)
    # also one emitted directly from a graph input (inserted at the start of the graph)
    y2 = qlinear.emit_static_linear(graph, x_in, w_q, w_scale, 0.1, 128, name="lin_in")
    graph.outputs.append(y2)
    order = list(graph)
    assert order.index(h.producer()) < order.index(y.producer()) < order.index(out.producer())
    assert order.index(y2.producer()) < order.index(out2.producer())
    x = activations(rng, (1, 4, K))
    sess = session(ir.Model(graph, ir_version=10))
    got, _, got2 = sess.run(None, {"x": x})
    ref, *_ = ref_per_token(np.maximum(x, 0), w_q, w_scale, symmetric=True)
    assert_exact(got, ref + 1.0)
    assert_exact(got2, ref_static(x, w_q, w_scale, 0.1, 128))


def test_tape_target_records_nodes_and_initializers():
    rng = np.random.default_rng(14)
    _, w_q, w_scale = weights(rng)
    x = ir.val("x", FLOAT, [3, K])
    tape = onnx_ir.tape.Tape()
    y = qlinear.emit_static_linear(tape, x, w_q, w_scale, 0.05, 128, name="lin")
    assert {v.name for v in tape.initializers} >= {"lin.w_q", "lin.w_scale", "lin.x_scale"}
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 21}, name="g")
    qlinear.ensure_opset(graph)
    xv = activations(rng, (3, K), outliers=False)
    got = session(ir.Model(graph, ir_version=10)).run(None, {"x": xv})[0]
    assert_exact(got, ref_static(xv, w_q, w_scale, 0.05, 128))


def test_ensure_opset():
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18}, name="g")
    qlinear.ensure_opset(graph)
    assert graph.opset_imports[qlinear.MS_DOMAIN] == 1
    qlinear.ensure_opset(graph)  # idempotent
    with pytest.raises(ValueError):
        qlinear.ensure_opset(graph, "", 21)


def test_rejects_bad_inputs():
    rng = np.random.default_rng(15)
    _, w_q, w_scale = weights(rng)
    with pytest.raises(ValueError, match="K="):
        build(lambda g, v: qlinear.emit_dynamic_per_token_linear(g, v, w_q, w_scale, name="l"), [2, K + 1])
    with pytest.raises(ValueError, match="int8"):
        build(lambda g, v: qlinear.emit_dynamic_per_token_linear(
            g, v, w_q.astype(np.int32), w_scale, name="l"), [2, K])
    with pytest.raises(ValueError, match="w_scale"):
        build(lambda g, v: qlinear.emit_dynamic_per_token_linear(g, v, w_q, w_scale[:-1], name="l"), [2, K])
