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
    from lowbit.compiler.ortsession import session_for

    return session_for(model).run(None, feeds)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]
