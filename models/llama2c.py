"""Read llama2.c checkpoints (`.bin`) into a Hugging Face `LlamaForCausalLM`.

llama2.c (Karpathy) stores a Llama-architecture model as raw little-endian fp32
arrays behind a tiny header. Converting it to the standard `transformers` model
lets the rest of lowbit treat it like any other Llama (one export path, one set
of module names). Two layouts exist:

- legacy (v0): 7 int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len` (negative vocab_size = untied classifier), then
  token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
  freq_cis_real, freq_cis_imag, [wcls]; each per-layer array holds all layers.
- version 1: uint32 magic 0x616b3432 ("ak42"), int32 version, the same 7
  ints, a uint8 shared-classifier flag, zero padding to 256 bytes, then
  rms_att, rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3,
  [wcls]. (Version 2 is Q8_0-quantized and is refused.)

Linear weights are stored as torch stores them, `[out, in]` row-major.

RoPE layout: llama2.c (like Meta's reference code) rotates interleaved pairs
`(x[2i], x[2i+1])` of each head by angle `pos * theta^(-2i/d)`; HF Llama rotates
`(x[i], x[i + d/2])` (`rotate_half`). The same function is obtained by
reordering the output rows of wq and wk within every head so that row `2i+j`
moves to `j*d/2 + i` — exactly HF's `permute()` in
`convert_llama_weights_to_hf.py`: `w.view(h, d//2, 2, n).transpose(1, 2)`.
q·k is invariant under the common reordering, so attention is unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import (
    Llama2cTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

MAGIC = 0x616B3432
V1_HEADER_BYTES = 256


@dataclass(frozen=True)
class Llama2cHeader:
    """The hyper-parameters a llama2.c checkpoint header carries."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every stored array, in file order."""
        L, d, h, kv, V = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        norms = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,))]
        mats = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
                ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d))]  # fmt: skip
        cls = [] if self.shared_classifier else [("wcls", (V, d))]
        if self.version == 1:
            return norms + [("token_embedding", (V, d))] + mats + cls
        half = self.head_dim // 2
        m = dict(mats)
        return [("token_embedding", (V, d)), norms[0], *[(k, m[k]) for k in ("wq", "wk", "wv", "wo")],
                norms[1], *[(k, m[k]) for k in ("w1", "w2", "w3")], norms[2],
                ("freq_cis_real", (self.seq_len, half)), ("freq_cis_imag", (self.seq_len, half)),
                *cls]  # fmt: skip

    def n_floats(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.shapes())


def read_header(path: str | Path) -> tuple[Llama2cHeader, int]:
    """Parse and sanity-check the header; returns it and the byte offset of the weights."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < 28:
        raise InputError(f"not a llama2.c checkpoint: {path} is only {len(head)} bytes")
    (magic,) = struct.unpack_from("<I", head)
    if magic == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise InputError(f"not a llama2.c checkpoint: {path} has a truncated version-1 header")
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise InputError(f"llama2.c checkpoint version {version} is not supported (only 0 and 1: fp32)")
        vals = struct.unpack_from("<7i", head, 8)
        shared, offset = bool(head[36]), V1_HEADER_BYTES
    else:
        vals, version, offset = struct.unpack_from("<7i", head), 0, 28
        shared = vals[5] > 0
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    p = dict(zip(names, vals))
    p["vocab_size"] = abs(p["vocab_size"])
    for k, v in p.items():
        if v <= 0:
            raise InputError(f"not a llama2.c checkpoint: header says {k}={vals[names.index(k)]}")
    if p["dim"] % p["n_heads"] or p["n_heads"] % p["n_kv_heads"] or (p["dim"] // p["n_heads"]) % 2:
        raise InputError(
            f"not a llama2.c checkpoint: header says dim={p['dim']}, n_heads={p['n_heads']}, "
            f"n_kv_heads={p['n_kv_heads']} (need even head size and n_heads % n_kv_heads == 0)"
        )
    hdr = Llama2cHeader(**p, shared_classifier=shared, version=version)
    size, want = path.stat().st_size, offset + 4 * hdr.n_floats()
    if size != want:
        raise InputError(
            f"not a llama2.c checkpoint (or truncated): header implies {want} bytes, {path.name} has {size}"
        )
    return hdr, offset


def read_weights(path: str | Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """All arrays of a llama2.c checkpoint by llama2.c name (fp32 numpy, shaped)."""
    hdr, offset = read_header(path)
    flat = np.fromfile(path, dtype="<f4", offset=offset)
    out, at = {}, 0
    for name, shape in hdr.shapes():
        n = int(np.prod(shape))
        out[name] = flat[at : at + n].reshape(shape)
        at += n
    return hdr, out


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from interleaved-pair RoPE
    (llama2.c, Meta) to half-split RoPE (HF `rotate_half`)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _rope_theta(w: dict[str, np.ndarray], head_dim: int) -> float:
    """RoPE base recovered from the stored frequency table (legacy files), else 10000.

    angle(pos=1, pair i) = theta^(-2i/head_dim), so pair 1 gives theta directly.
    """
    if "freq_cis_real" not in w or head_dim < 4 or w["freq_cis_real"].shape[0] < 2:
        return 10000.0
    angle = float(np.arctan2(w["freq_cis_imag"][1, 1], w["freq_cis_real"][1, 1]))
    if not 0.0 < angle < np.pi:
        return 10000.0
    return float(round(angle ** (-head_dim / 2)))


def load_llama2c(path: str | Path):
    """Build an fp32, eval-mode `transformers.LlamaForCausalLM` from a llama2.c `.bin`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    hdr, w = read_weights(path)
    config = LlamaConfig(
        vocab_size=hdr.vocab_size,
        hidden_size=hdr.dim,
        intermediate_size=hdr.hidden_dim,
        num_hidden_layers=hdr.n_layers,
        num_attention_heads=hdr.n_heads,
        num_key_value_heads=hdr.n_kv_heads,
        max_position_embeddings=hdr.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(w, hdr.head_dim)},
        tie_word_embeddings=hdr.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        use_cache=False,
    )
    sd = {"model.embed_tokens.weight": w["token_embedding"], "model.norm.weight": w["rms_final"]}
    sd["lm_head.weight"] = w["token_embedding"] if hdr.shared_classifier else w["wcls"]
    for i in range(hdr.n_layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": interleaved_to_half_split(w["wq"][i], hdr.n_heads),
            p + "self_attn.k_proj.weight": interleaved_to_half_split(w["wk"][i], hdr.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        }
    with no_init_weights():  # every parameter is loaded below
        model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    model.tie_weights()
    return model


def find_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer that sits next to a llama2.c checkpoint, if any: a SentencePiece
    model (`tokenizer.model`, `tok*.model`) first, else llama2.c's `tokenizer.bin` /
    `tok*.bin`. With several `tok*` candidates, the one whose vocabulary size
    matches the checkpoint wins (llama2.c names them tok<vocab>.*)."""
    folder = Path(path).parent
    for pattern in ("tokenizer.model", "tok*.model", "tokenizer.bin", "tok*.bin"):
        found = sorted(p for p in folder.glob(pattern) if p != Path(path))
        if vocab_size is not None and len(found) > 1:
            found.sort(key=lambda p: p.stem != f"tok{vocab_size}")
        for cand in found:
            tok = SentencePieceTokenizer(cand) if cand.suffix == ".model" else Llama2cTokenizer(cand)
            if vocab_size is None or tok.vocab_size == vocab_size:
                return tok
    return None
