"""load_model dispatch and the family adapters (stories260K by default; SmolLM2/MiniLM are slow)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import Llama2cTokenizer
from lowbit.models import adapter_for_module, load_model
from lowbit.models.base import GenericAdapter
from lowbit.models.llama import LlamaAdapter


@pytest.fixture(scope="module")
def stories(shared_dir):
    return load_model(shared_dir / "stories260K" / "stories260K.bin")


def test_llama2c_adapter(stories):
    a = stories
    assert (a.family, a.task, a.name) == ("llama", "causal-lm", "stories260K")
    assert (a.input_names, a.output_names) == (["input_ids"], ["logits"])
    assert a.dynamic_shapes == {"input_ids": {0: "batch", 1: "seq"}}
    assert a.block_names() == [f"model.layers.{i}" for i in range(5)]
    assert len(a.linear_names()) == 5 * 7 + 1 and a.linear_names()[-1] == "lm_head"
    assert a.module.get_submodule("model.layers.0.self_attn.q_proj") is a.hf_model.model.layers[0].self_attn.q_proj
    assert a.tokenizer.encode("Once upon a time") == [403, 407, 261, 378]


def test_module_forward_is_plain_logits(stories):
    x = torch.from_numpy(stories.sample_inputs(2, 8)["input_ids"])
    with torch.no_grad():
        out = stories.module(x)
        ref = stories.hf_model(x).logits
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 512)
    assert torch.equal(out, ref)


def test_inputs(stories):
    s = stories.sample_inputs(3, 8)["input_ids"]
    assert s.shape == (3, 8) and s.dtype == np.int64 and (s[:, 0] == 1).all()
    assert len({tuple(r) for r in s}) == 3  # rows differ
    assert stories.make_inputs([[1, 2, 3], [4, 5, 6]])["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(InputError, match=r"no attention_mask input: sequences must have one length \(got 2..3\)"):
        stories.make_inputs([[1, 2, 3], [4, 5]])
    with pytest.raises(InputError, match="token id 512 outside the vocabulary"):
        stories.make_inputs([[1, 512]])
    with pytest.raises(InputError, match="exceeds max_seq_len 512"):
        stories.make_inputs([[1] * 513])


def test_explicit_tokenizer(shared_dir):
    a = load_model(shared_dir / "stories260K" / "stories260K.bin", tokenizer=shared_dir / "stories260K" / "tok512.bin")
    assert isinstance(a.tokenizer, Llama2cTokenizer)


def test_unsupported_sources(tmp_path, shared_dir):
    with pytest.raises(InputError, match="model source not found"):
        load_model(tmp_path / "nothing.bin")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InputError, match=r"^unsupported architecture 'GPT2LMHeadModel' in config.json \(supported: llama, bert\)$"):
        load_model(tmp_path / "gpt2")
    with pytest.raises(InputError, match="has neither config.json nor a .gguf file"):
        load_model(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="is an ONNX model, not a torch model"):
        load_model(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="unknown model name|model source not found"):
        load_model("gpt-17")


def test_adapter_for_module():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    a = adapter_for_module(net, (torch.randn(2, 4),))
    assert isinstance(a, GenericAdapter) and (a.family, a.task) == ("generic", "generic")
    assert (a.input_names, a.output_names, a.dynamic_shapes) == (["input_0"], ["output"], None)
    assert a.linear_names() == ["0", "2"]
    a = adapter_for_module(net, {"x": np.zeros((2, 4), np.float32)}, dynamic_shapes={"x": {0: "batch"}})
    assert a.input_names == ["x"] and a.example_args()[0].shape == (2, 4)
    with pytest.raises(InputError, match="needs example_inputs"):
        adapter_for_module(net)


def test_adapter_for_hf_module(stories):
    a = adapter_for_module(stories.hf_model, tokenizer=stories.tokenizer)
    assert isinstance(a, LlamaAdapter) and a.block_names() == stories.block_names()


@pytest.mark.slow
def test_smollm2():
    a = load_model("smollm2-135m")
    assert (a.family, a.name, a.hf_model.config.num_hidden_layers) == ("llama", "smollm2-135m", 30)
    assert a.hf_model.lm_head.weight is a.hf_model.model.embed_tokens.weight
    ids = a.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(a.module(torch.tensor([ids]))[0, -1].argmax()))
    assert "Paris" in a.tokenizer.decode(ids[-3:])


@pytest.mark.slow
def test_minilm_embeddings():
    a = load_model("all-minilm-l6-v2")
    assert (a.family, a.task, a.output_names) == ("bert", "encoder", ["embedding"])
    assert a.block_names() == [f"encoder.layer.{i}" for i in range(6)]
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    inputs = a.make_inputs([a.tokenizer.encode(t) for t in texts])
    assert inputs["input_ids"][0, 0] == 101 and inputs["attention_mask"][0].sum() < inputs["input_ids"].shape[1]
    with torch.no_grad():
        emb = a.module(*(torch.from_numpy(inputs[n]) for n in a.input_names)).numpy()
        alone = a.module(*(torch.from_numpy(v) for v in a.make_inputs([a.tokenizer.encode(texts[0])]).values()))
    np.testing.assert_allclose(emb[0], alone[0].numpy(), atol=1e-5)  # padding does not change the embedding
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert e[0] @ e[1] > 0.6 > 0.2 > e[0] @ e[2]
