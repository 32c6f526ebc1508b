"""Frontend: torch -> ONNX export (stories260K) and .onnx loading with clear errors."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.frontend import (
    export_to_onnx,
    linear_module_name,
    load_onnx,
    load_source,
)
from lowbit.models import load_model


def ort_session(model: ir.Model, path) -> ort.InferenceSession:
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_out(adapter, inputs):
    with torch.no_grad():
        return adapter.module(*(torch.from_numpy(inputs[n]) for n in adapter.input_names)).numpy()


@pytest.fixture(scope="module")
def exported(shared_dir, tmp_path_factory):
    adapter = load_model(shared_dir / "stories260K" / "stories260K.bin")
    model = export_to_onnx(adapter)
    path = tmp_path_factory.mktemp("stories") / "stories260K.onnx"
    return adapter, model, ort_session(model, path), path


def test_signature_and_opset(exported):
    _, model, _, _ = exported
    assert model.opset_imports[""] >= 21
    (x,), (y,) = model.graph.inputs, model.graph.outputs
    assert x.name == "input_ids" and x.dtype == ir.DataType.INT64 and str(x.shape) == "[batch,seq]"
    assert y.name == "logits" and str(y.shape) == "[batch,seq,512]"
    assert model.metadata_props["lowbit.family"] == "llama"


@pytest.mark.parametrize("batch,seq", [(2, 8), (1, 1), (3, 17)])
def test_logits_match_torch(exported, batch, seq):
    adapter, _, sess, _ = exported
    inputs = adapter.sample_inputs(batch, seq)
    (got,) = sess.run(None, inputs)
    ref = torch_out(adapter, inputs)
    assert got.shape == (batch, seq, 512)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_every_linear_is_a_matmul_with_constant_weight(exported):
    adapter, model, _, _ = exported
    found = {linear_module_name(n): n for n in model.graph if linear_module_name(n)}
    assert set(found) == set(adapter.linear_names())
    for name, node in found.items():
        w = node.inputs[1]
        assert node.op_type == "MatMul" and w.is_initializer() and w.const_value is not None, name
        assert w.name == f"{name}.weight_t"
        torch_w = adapter.module.get_submodule(name).weight.detach().numpy()
        np.testing.assert_array_equal(w.const_value.numpy(), torch_w.T)
    assert not [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].is_initializer()]


def test_load_onnx_round_trip(exported):
    adapter, model, _, path = exported
    loaded = load_onnx(path)
    assert len(loaded.graph) == len(model.graph)
    assert {linear_module_name(n) for n in loaded.graph} - {None} == set(adapter.linear_names())
    m, a = load_source(path)
    assert a is None and len(m.graph) == len(model.graph)
    m, a = load_source(path, tokenizer=adapter.tokenizer)
    assert (a.family, a.task, a.input_names) == ("llama", "causal-lm", ["input_ids"]) and a.module is None
    assert a.make_inputs([[1, 2, 3]])["input_ids"].shape == (1, 3)


def test_load_onnx_errors(exported, tmp_path):
    _, model, _, path = exported
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"^corrupt or truncated ONNX file: .*cut.onnx"):
        load_onnx(tmp_path / "cut.onnx")
    (tmp_path / "notes.onnx").write_text("these are my notes, not a model\n")
    with pytest.raises(InputError, match=r"^not an ONNX model: .*notes.onnx"):
        load_onnx(tmp_path / "notes.onnx")
    with pytest.raises(InputError, match="ONNX file not found"):
        load_onnx(tmp_path / "absent.onnx")
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    ir.save(model, ext, external_data="model.onnx.data", size_threshold_bytes=0)
    assert load_onnx(ext).graph.initializers["lm_head.weight_t"].const_value.numpy().shape == (64, 512)
    (ext.parent / "model.onnx.data").rename(ext.parent / "moved.data")
    with pytest.raises(InputError, match=r"missing external data file 'model.onnx.data' for initializer"):
        load_onnx(ext)


class EmbedProject(nn.Module):
    """An output named like the exporter's internal `embedding` value."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_generic_module_and_output_name_collision(tmp_path):
    torch.manual_seed(0)
    net = EmbedProject().eval()
    ids = torch.randint(0, 16, (2, 5))
    model, adapter = load_source(
        net, example_inputs={"ids": ids}, output_names=["embedding"], dynamic_shapes={"ids": {0: "batch", 1: "seq"}}
    )
    assert adapter.family == "generic"
    assert [linear_module_name(n) for n in model.graph if linear_module_name(n)] == ["proj"]
    sess = ort_session(model, tmp_path / "generic.onnx")  # ORT rejects duplicate value names
    x = torch.randint(0, 16, (3, 7))
    (got,) = sess.run(None, {"ids": x.numpy()})
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "all-minilm-l6-v2"])
def test_export_real_models(name, tmp_path):
    model, adapter = load_source(name)
    found = {linear_module_name(n): n for n in model.graph if linear_module_name(n)}
    assert set(found) == set(adapter.linear_names()) - {"pooler.dense"}  # the pooler is unused
    assert all(n.inputs[1].const_value is not None for n in found.values())
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in [(2, 9), (1, 1 if adapter.task == "causal-lm" else 3)]:
        inputs = adapter.sample_inputs(batch, seq)
        (got,) = sess.run(None, inputs)
        ref = torch_out(adapter, inputs)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
