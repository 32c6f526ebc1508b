"""BERT-family encoders as sentence-embedding models.

The exported function is what sentence-transformers computes for models such
as all-MiniLM-L6-v2 before its optional normalization:
`forward(input_ids, attention_mask) -> mean over unmasked tokens of the last
hidden state` ([B, H]). Accuracy of a quantized encoder is then judged by the
cosine similarity of these embeddings against fp32.

Inputs follow BERT's convention: `make_inputs` wraps each sequence in
[CLS] ... [SEP] (unless it already starts with [CLS]), right-pads with [PAD]
and sets the mask. Blocks are "encoder.layer.<i>"; the pooler is not part of
the exported function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import HFTokenizer, Tokenizer
from lowbit.models.base import MeanPooledEmbedding, ModelAdapter, one_line, quiet_transformers, safe_weights

MODEL_TYPES = frozenset({"bert"})


class BertAdapter(ModelAdapter):
    """A `transformers` BERT encoder (`BertModel`); `forward(input_ids, attention_mask) -> embedding`."""

    family = "bert"
    task = "encoder"

    def __init__(self, hf_model, *, name: str, tokenizer: Tokenizer | None = None, source: str | None = None):
        hf_model = hf_model.float().eval()
        hf_model.set_attn_implementation("eager")
        cfg = hf_model.config
        super().__init__(
            MeanPooledEmbedding(hf_model),
            name=name,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            tokenizer=tokenizer,
            hf_model=hf_model,
            vocab_size=cfg.vocab_size,
            max_seq_len=cfg.max_position_embeddings,
            source=source,
        )
        self.cls_id = getattr(tokenizer, "cls_id", None)
        self.sep_id = getattr(tokenizer, "sep_id", None)

    def _wrap(self, row: Sequence[int]) -> list[int]:
        row = list(row)
        if self.cls_id is None or self.sep_id is None or (row and row[0] == self.cls_id):
            return row
        return [self.cls_id, *row, self.sep_id]

    def make_inputs(self, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """[CLS] ids [SEP] per row, right-padded, with the attention mask."""
        return super().make_inputs([self._wrap(r) for r in token_ids])

    def sample_inputs(self, batch: int = 1, seq: int = 8) -> dict[str, np.ndarray]:
        """[batch, seq] inputs; row b holds seq - b tokens (specials included, at
        least one text token) so that padding and the mask are exercised."""
        n_special = 2 if self.cls_id is not None and self.sep_id is not None else 0
        if seq <= n_special:
            raise InputError(f"{self.name}: seq must exceed {n_special} ([CLS] and [SEP])")
        rows = self._text_rows(batch, seq - n_special)
        rows = [r[: max(len(r) - b, 1)] for b, r in enumerate(rows)]
        return self.make_inputs(rows)


def load_hf_bert(folder: str | Path, *, tokenizer: Tokenizer | None = None, name: str | None = None) -> BertAdapter:
    """A Hugging Face BERT checkpoint folder, loaded with `AutoModel` (no task head)."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(
                str(folder), dtype=torch.float32, attn_implementation="eager", local_files_only=True,
                **safe_weights(folder),
            )
    except InputError:
        raise
    except Exception as e:  # OSError, ValueError, a corrupt safetensors file, mismatched shapes...
        raise InputError(f"cannot load a BERT checkpoint from {folder}: {one_line(e)}") from None
    if tokenizer is None and any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt")):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    return BertAdapter(model, name=name or folder.name, tokenizer=tokenizer, source=str(folder))
