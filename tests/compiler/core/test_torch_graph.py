import numpy as np
import pytest
import torch

from lowbit.compiler.core.torch_graph import UnsupportedOpError, graph_params, run_graph
from tests.graphs import mlp, run
from tests.passes.real_models import fresh, outputs, windows


def test_small_graph_matches_onnx_runtime_and_backpropagates_to_a_weight():
    model = mlp(seed=3, outlier=5.0)
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    (ref,) = run(model, {"x": x})
    params = graph_params(model.graph)
    params["w1"] = params["w1"].clone().requires_grad_()
    (got,) = run_graph(model.graph, {"x": x}, params)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert params["w1"].grad is not None and float(params["w1"].grad.abs().sum()) > 0


def test_stories260k_logits_match_onnx_runtime(shared_dir):
    """The real exported graph: rotary embeddings, causal mask, GQA, norms, tied LM head."""
    model, adapter = fresh(shared_dir / "stories260K" / "stories260K.bin")
    _, evals = windows(adapter, calib=1, evals=2, seq_len=32, text=shared_dir.parent / "data" / "tinystories.txt")
    (ref,) = outputs(model, evals)
    with torch.no_grad():
        (got,) = run_graph(model.graph, evals[0], graph_params(model.graph))
    assert float(np.abs(got.numpy() - ref).max()) / float(np.abs(ref).max()) < 1e-5


def test_unsupported_operator_is_named():
    model = mlp()
    node = next(n for n in model.graph if n.op_type == "Relu")
    node.op_type = "Einsum"
    with pytest.raises(UnsupportedOpError, match=r"node '.*': operator ai.onnx::Einsum is not supported"):
        run_graph(model.graph, {"x": np.zeros((1, 2, 8), np.float32)}, graph_params(model.graph))
    node.op_type, node.domain = "Relu", "com.example"
    with pytest.raises(UnsupportedOpError, match="com.example::Relu"):
        run_graph(model.graph, {"x": np.zeros((1, 2, 8), np.float32)}, graph_params(model.graph))
