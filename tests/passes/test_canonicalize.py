import numpy as np
import pytest

from lowbit.passes.canonicalize import CanonicalizePass
from tests.graphs import gemm, mlp, ops, run


@pytest.mark.parametrize("transB", [0, 1])
def test_gemm_becomes_matmul_plus_bias_and_keeps_function(transB):
    model = gemm(transB)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    before = run(model, {"x": x})[0]
    result = CanonicalizePass()(model)
    assert result.modified
    assert ops(model) == ["MatMul", "Add"]
    w = model.graph.node(0).inputs[1]
    assert w.const_value is not None and tuple(w.const_value.shape) == (6, 4)
    np.testing.assert_allclose(run(model, {"x": x})[0], before, rtol=1e-5, atol=1e-6)
    assert model.graph.outputs[0].name == "y"


def test_canonical_graph_is_left_alone():
    model = mlp()
    CanonicalizePass()(model)
    assert not CanonicalizePass()(model).modified
