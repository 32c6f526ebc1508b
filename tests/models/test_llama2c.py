"""llama2.c checkpoint -> transformers LlamaForCausalLM.

The conversion is checked against an independent numpy implementation of
llama2.c's forward pass (run.c: interleaved-pair RoPE, GQA, SwiGLU), and by
greedy generation of the known TinyStories opening.
"""

import struct

import numpy as np
import pytest
import torch

from lowbit.compiler.core.errors import InputError
from lowbit.models import llama2c
from lowbit.models.llama2c import MAGIC, load_llama2c, read_header, read_weights

EXPECTED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
PROMPT = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395]


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def model(stories):
    return load_llama2c(stories)


def reference_logits(path, tokens):
    """llama2.c's run.c forward pass in float64 numpy, straight from the file's arrays."""
    h, w = read_weights(path)
    T, H, KV, hs = len(tokens), h.n_heads, h.n_kv_heads, h.head_dim
    x = w["token_embedding"][tokens].astype(np.float64)
    ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5) * g

    def rope(v, n):  # rotate pairs (v[2i], v[2i+1]) of every head
        v = v.reshape(T, n, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, n, hs)

    kv_of = np.arange(H) // (H // KV)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(h.n_layers):
        n = rms(x, w["rms_att"][i])
        q, k = rope(n @ w["wq"][i].T, H), rope(n @ w["wk"][i].T, KV)[:, kv_of]
        v = (n @ w["wv"][i].T).reshape(T, KV, hs)[:, kv_of]
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w["wo"][i].T
        n = rms(x, w["rms_ffn"][i])
        g, u = n @ w["w1"][i].T, n @ w["w3"][i].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w["w2"][i].T
    cls = w["token_embedding"] if h.shared_classifier else w["wcls"]
    return rms(x, w["rms_final"]) @ cls.T


def hf_logits(m, tokens):
    with torch.no_grad():
        return m(torch.tensor([tokens]), use_cache=False).logits[0].double().numpy()


def test_header(stories):
    h, offset = read_header(stories)
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)  # fmt: skip
    assert h.shared_classifier and h.version == 0 and offset == 28


def test_config(model):
    c = model.config
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.rms_norm_eps == 1e-5
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 260_032  # README count; the tied matrix once


def test_logits_match_llama2c_reference(model, stories):
    ref = reference_logits(stories, PROMPT)
    got = hf_logits(model, PROMPT)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize(
    "wrong",
    [
        lambda w, n: w,  # no permutation
        lambda w, n: w.reshape(n, 2, -1, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape),  # the inverse
    ],
    ids=["identity", "inverse"],
)
def test_wrong_rope_permutation_is_detected(stories, monkeypatch, wrong):
    """The reference comparison above fails if the q/k rows are not reordered correctly."""
    monkeypatch.setattr(llama2c, "interleaved_to_half_split", wrong)
    ref = reference_logits(stories, PROMPT)
    got = hf_logits(load_llama2c(stories), PROMPT)
    assert np.abs(got - ref).max() > 1e-2 * np.abs(ref).max()


def test_greedy_generation(model, stories):
    ids = [1]
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    tok = llama2c.find_tokenizer(stories, 512)
    assert tok.decode(ids).startswith(EXPECTED)


def _write(path, header: bytes, arrays):
    with open(path, "wb") as f:
        f.write(header)
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def test_version1_file_loads_the_same_model(stories, model, tmp_path):
    h, w = read_weights(stories)
    header = struct.pack("<Ii7iB", MAGIC, 1, 64, 172, 5, 8, 4, 512, 512, 1)
    header += b"\0" * (256 - len(header))
    order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    _write(tmp_path / "v1.bin", header, [w[k] for k in order])
    assert read_header(tmp_path / "v1.bin")[0].version == 1
    v1 = load_llama2c(tmp_path / "v1.bin")
    ref = model.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in v1.state_dict().items())


def test_untied_classifier(stories, tmp_path):
    h, w = read_weights(stories)
    wcls = w["token_embedding"][::-1] * 0.5
    order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
             "freq_cis_real", "freq_cis_imag"]  # fmt: skip
    _write(tmp_path / "untied.bin", struct.pack("<7i", 64, 172, 5, 8, 4, -512, 512), [w[k] for k in order] + [wcls])
    m = load_llama2c(tmp_path / "untied.bin")
    assert not m.config.tie_word_embeddings
    assert np.array_equal(m.lm_head.weight.detach().numpy(), wcls)
    assert np.array_equal(m.model.embed_tokens.weight.detach().numpy(), w["token_embedding"])


def test_bad_files(stories, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", -5, 172, 5, 8, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(InputError, match=r"not a llama2.c checkpoint: header says dim=-5"):
        load_llama2c(bad)
    bad.write_bytes(stories.read_bytes()[:100_000])
    with pytest.raises(InputError, match=r"truncated\): header implies 1056540 bytes, bad.bin has 100000"):
        load_llama2c(bad)
    bad.write_text("hello, this is a text file and not a checkpoint at all\n")
    with pytest.raises(InputError, match=r"not a llama2.c checkpoint"):
        load_llama2c(bad)
    bad.write_bytes(struct.pack("<Ii", MAGIC, 2) + b"\0" * 300)
    with pytest.raises(InputError, match=r"version 2 is not supported"):
        load_llama2c(bad)
