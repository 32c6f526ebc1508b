import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lowbit.passes.quantize_embeddings import QuantizeEmbeddingsPass, quantize_rows
from tests.graphs import ops, run


def embedding_model(rows=300, dim=16, tied=False):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    table[7] = 0.0
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed")]
    out = "h"
    if tied:  # the same table read by a second consumer
        nodes.append(helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head"))
        nodes.insert(0, helper.make_node("Transpose", ["E"], ["Et"], name="tr"))
        out = "logits"
    graph = helper.make_graph(
        nodes, "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "E")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)), table


def test_rows_quantized_and_lookup_close():
    model, table = embedding_model()
    ids = np.array([[0, 7, 299, 5]], np.int64)
    p = QuantizeEmbeddingsPass(min_bytes=0)
    result = p(model)
    assert result.modified
    assert ops(model) == ["Gather", "Cast", "Gather", "Unsqueeze", "Mul"]
    assert model.graph.initializers["E.q"].const_value.dtype == ir.DataType.INT8
    out = run(model, {"ids": ids})[0]
    ref = table[ids]
    scale = np.abs(table).max(axis=1) / 127
    assert (np.abs(out - ref) <= scale[ids][..., None] / 2 + 1e-7).all()
    assert (out[0, 1] == 0).all()  # the all-zero row stays exactly zero
    assert "E" in result.record.to_json()["quantized"]
    assert not QuantizeEmbeddingsPass(min_bytes=0)(model).modified


def test_tied_and_small_tables_are_skipped_with_reasons():
    model, _ = embedding_model(tied=True)
    p = QuantizeEmbeddingsPass(min_bytes=0)
    result = p(model)
    assert not result.modified
    assert result.record.to_json()["skipped"]["E"] == "table is read by other nodes too (tied weights)"
    model, _ = embedding_model(rows=100)
    p = QuantizeEmbeddingsPass(min_bytes=100 * 16 * 4 + 1)
    result = p(model)
    assert not result.modified
    assert result.record.to_json()["skipped"]["E"] == "smaller than 6401 bytes"


def test_quantize_rows_zero_row():
    codes, scale = quantize_rows(np.zeros((2, 4), np.float32))
    assert (codes == 0).all() and (scale == 1).all()
