"""Small graphs for structural and numeric tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def mlp(seed: int = 0, k: int = 8, hidden: int = 16, n: int = 8, outlier: float = 0.0) -> ir.Model:
    """x -> RMSNorm (written out) -> MatMul W1 -> Relu -> MatMul W2 -> y, plus x -> MatMul W3 (shares x_norm).

    ``outlier`` scales one input channel of x's norm gamma, giving that
    channel large activations.
    """
    rng = np.random.default_rng(seed)
    gamma = np.ones(k, np.float32)
    gamma[1] += outlier
    inits = [
        _init("gamma", gamma),
        _init("eps", np.array(1e-5, np.float32)),
        _init("two", np.array(2.0, np.float32)),
        _init("one", np.array(1.0, np.float32)),
        _init("w1", rng.standard_normal((k, hidden)).astype(np.float32) * 0.3),
        _init("w2", rng.standard_normal((hidden, n)).astype(np.float32) * 0.3),
        _init("w3", rng.standard_normal((k, n)).astype(np.float32) * 0.3),
        _init("axes", np.array([-1], np.int64)),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="norm/pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="norm/mean"),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="norm/add"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="norm/sqrt"),
        helper.make_node("Div", ["one", "rms"], ["inv"], name="norm/div"),
        helper.make_node("Mul", ["x", "inv"], ["xn0"], name="norm/mul"),
        helper.make_node("Mul", ["xn0", "gamma"], ["xn"], name="norm/gamma"),
        helper.make_node("MatMul", ["xn", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["hr"], name="act"),
        helper.make_node("MatMul", ["hr", "w2"], ["y2"], name="down"),
        helper.make_node("MatMul", ["xn", "w3"], ["y3"], name="side"),
        helper.make_node("Add", ["y2", "y3"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return ir.from_proto(model)


def gemm(transB: int = 1, seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 6) if transB else (6, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=transB)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        [_init("w", w), _init("b", rng.standard_normal(4).astype(np.float32))],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from lowbit.compiler.core.ortsession import session_for

    return session_for(model).run(None, feeds)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def causal_mask_lm(vocab: int = 32, d: int = 8, seed: int = 0) -> ir.Model:
    """input_ids -> embedding, averaged under the causal mask that transformers' torch export builds.

    The mask part copies SmolLM2-135M's export node for node: ``Range`` over ``seq``,
    the packed-sequence detection (position differences != 1, ``CumSum``), and
    ``GatherND`` of every (query, key) pair; the value_info carries the symbolic
    shapes the exporter records. TVM's ONNX importer gives the ``Range`` and the
    dynamic ``Slice`` variables of their own (``range_len_0``, ``s``).
    """
    rng = np.random.default_rng(seed)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, d)).astype(np.float32), "emb"),
        i64("zero", 0), i64("one", 1), i64("v0", [0]), i64("v1", [1]), i64("vm1", [-1]), i64("v2", [2]), i64("v3", [3]),
        i64("ax12", [1, 2]), i64("ax01", [0, 1]), i64("last", -1),
        numpy_helper.from_array(np.array(True), "true"), numpy_helper.from_array(np.array(0.0, np.float32), "fzero"),
        numpy_helper.from_array(np.array(-3.4028234663852886e38, np.float32), "fmin"),
    ]
    N = helper.make_node
    nodes = [
        N("Shape", ["input_ids"], ["b1"], start=0, end=1),
        N("Squeeze", ["b1"], ["b"]),
        N("Shape", ["input_ids"], ["s1"], start=1, end=2),
        N("Squeeze", ["s1"], ["s"]),
        N("Gather", ["emb", "input_ids"], ["x"], axis=0),
        # position ids, and transformers' packed-sequence detection (diff != 1 -> cumsum)
        N("Range", ["zero", "s", "one"], ["pos"]),
        N("Unsqueeze", ["pos", "v0"], ["pos2"]),
        N("Concat", ["b1", "v1"], ["bshape"], axis=0),
        N("Expand", ["pos2", "bshape"], ["pos_b"]),
        N("Slice", ["pos_b", "v0", "v1", "v1", "v1"], ["first"]),
        N("Sub", ["first", "one"], ["first_m1"]),
        N("Concat", ["first_m1", "pos_b"], ["cat"], axis=-1),
        N("Slice", ["cat", "v0", "s1", "vm1", "v1"], ["prev"]),
        N("Add", ["one", "s"], ["s_p1"]),
        N("Reshape", ["s_p1", "vm1"], ["s_p1v"]),
        N("Slice", ["cat", "v1", "s_p1v", "vm1", "v1"], ["cur"]),
        N("Sub", ["cur", "prev"], ["diff"]),
        N("Equal", ["diff", "one"], ["step1"]),
        N("Not", ["step1"], ["new_seq"]),
        N("Cast", ["new_seq"], ["new_seq_i"], to=TensorProto.INT64),
        N("CumSum", ["new_seq_i", "last"], ["seq_idx"]),
        # gather the sequence index of every (query, key) pair, as the torch export does
        N("Range", ["zero", "b", "one"], ["bidx"]),
        N("Unsqueeze", ["bidx", "ax12"], ["bidx3"]),
        N("Unsqueeze", ["bidx3", "v3"], ["bidx4"]),
        N("Unsqueeze", ["pos", "ax01"], ["pos3"]),
        N("Unsqueeze", ["pos3", "v3"], ["q4"]),
        N("Unsqueeze", ["pos3", "v2"], ["k4"]),
        N("Max", ["bidx4", "q4"], ["qmax"]),
        N("Shape", ["qmax"], ["qshape"]),
        N("Expand", ["bidx4", "qshape"], ["qb"]),
        N("Unsqueeze", ["qb", "vm1"], ["qb1"]),
        N("Expand", ["q4", "qshape"], ["qq"]),
        N("Unsqueeze", ["qq", "vm1"], ["qq1"]),
        N("Concat", ["qb1", "qq1"], ["qidx"], axis=-1),
        N("GatherND", ["seq_idx", "qidx"], ["qseq"]),
        N("Max", ["bidx4", "k4"], ["kmax"]),
        N("Shape", ["kmax"], ["kshape"]),
        N("Expand", ["bidx4", "kshape"], ["kb"]),
        N("Unsqueeze", ["kb", "vm1"], ["kb1"]),
        N("Expand", ["k4", "kshape"], ["kk"]),
        N("Unsqueeze", ["kk", "vm1"], ["kk1"]),
        N("Concat", ["kb1", "kk1"], ["kidx"], axis=-1),
        N("GatherND", ["seq_idx", "kidx"], ["kseq"]),
        N("Equal", ["qseq", "kseq"], ["same_seq"]),
        N("And", ["true", "same_seq"], ["m0"]),
        N("GatherND", ["pos_b", "qidx"], ["qpos"]),
        N("GatherND", ["pos_b", "kidx"], ["kpos"]),
        N("LessOrEqual", ["kpos", "qpos"], ["causal"]),
        N("And", ["m0", "causal"], ["allowed"]),
        N("Where", ["allowed", "fzero", "fmin"], ["bias"]),
        # each position averages the embeddings it may attend to
        N("Softmax", ["bias"], ["probs"], axis=-1),
        N("Unsqueeze", ["x", "v1"], ["x4"]),
        N("MatMul", ["probs", "x4"], ["y"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"n{i}_{n.op_type}"
    graph = helper.make_graph(nodes, "causal_mask_lm",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "seq", d])], inits)
    # the shapes the torch exporter records (it names every dimension after the inputs')
    bs, i64t = ["batch", "seq"], TensorProto.INT64
    hints = {"pos": [["seq"], i64t], "pos_b": [bs, i64t], "prev": [bs, i64t], "cur": [bs, i64t], "diff": [bs, i64t],
             "step1": [bs, TensorProto.BOOL], "new_seq": [bs, TensorProto.BOOL], "new_seq_i": [bs, i64t], "seq_idx": [bs, i64t],
             "bidx": [["batch"], i64t], "qseq": [["batch", 1, "seq", 1], i64t], "kseq": [["batch", 1, 1, "seq"], i64t],
             "bias": [["batch", 1, "seq", "seq"], TensorProto.FLOAT]}
    graph.value_info.extend(helper.make_tensor_value_info(k, t, shape) for k, (shape, t) in hints.items())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return ir.from_proto(model)
