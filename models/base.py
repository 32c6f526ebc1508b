"""Model adapters: what the compiler needs to know about a model family.

The compiler works on one ONNX graph; what it cannot read off that graph comes
from an adapter: which torch module to export and with which input/output
names and dynamic axes, how to turn token ids into model inputs (padding and
masks for encoders, special tokens), a tokenizer, and the names of the
transformer blocks. Families (`llama.py`, `bert.py`) subclass `ModelAdapter`;
`lowbit.models.adapter_for_module` wraps any other `nn.Module` as a "generic" model.

Module names. Export wrappers (`CausalLMLogits`, `MeanPooledEmbedding`)
register the Hugging Face model's *children* as their own and keep the HF model
itself unregistered, so every module name in `adapter.module` — and in the
ONNX exporter's `pkg.torch.onnx.name_scopes` node metadata — equals the HF
state-dict name ("model.layers.0.self_attn.q_proj", "encoder.layer.0...").
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import Tokenizer

# A few sentences of plain English, only to give sample inputs real token
# statistics (not calibration or evaluation data).
SAMPLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She liked to read books in the garden "
    "with her old dog. One day the sun was warm and the birds sang, so they walked to the river. "
    "The water was cold and clear, and Lily laughed when the dog jumped in after a stick."
)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def one_line(e: BaseException) -> str:
    """An exception's message on one line: its first non-empty line (a library's may span many)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


#: the pickled weight files ``from_pretrained`` opens (the index names the shards)
PICKLED_WEIGHTS = "pytorch_model.bin"
PICKLED_INDEX = "pytorch_model.bin.index.json"


def safe_weights(folder) -> dict[str, Any]:
    """``from_pretrained`` keywords that never run code from a checkpoint.

    A folder with ``.safetensors`` weights is loaded from them only (``use_safetensors``: a ``.bin``
    beside them is never opened). Otherwise every pickled weight file ``from_pretrained`` would open
    is first read with ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain
    containers only: a pickle that would call anything else (``os.system``, ``open``) is refused
    with an ``InputError`` before transformers sees it."""
    import json
    import re
    import warnings
    import zipfile
    from pathlib import Path

    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return {"use_safetensors": True}
    files = [folder / PICKLED_WEIGHTS] if (folder / PICKLED_WEIGHTS).is_file() else []
    if (folder / PICKLED_INDEX).is_file():
        try:
            shards = json.loads((folder / PICKLED_INDEX).read_text())["weight_map"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"cannot read {folder / PICKLED_INDEX}: {type(e).__name__}: {e}") from None
        for name in sorted(set(map(str, shards))):
            shard = folder / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not shard.is_file():
                raise InputError(f"{PICKLED_INDEX} in {folder} names a shard {name!r} that is not a file in the folder")
            files.append(shard)
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Detected pickle protocol 4...": the error below says enough
                torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all refused
            text = str(e)
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            why = (f"its pickle calls {found.group(1).rstrip('.,')}" if found
                   else f"the weights-only unpickler refused it: {refused.group(1).strip()}" if refused
                   else f"{type(e).__name__}: {one_line(e)}")
            raise InputError(f"{f.name} in {folder} is not a plain weights file ({why}): refused, lowbit never runs "
                             "code from a checkpoint (save the weights as safetensors)") from None
    return {"use_safetensors": False}


class _HFExportModule(nn.Module):
    """Base of export wrappers around a Hugging Face model.

    The HF model's children become this module's children (same names, same
    parameter objects); the HF model is kept outside the module tree so its own
    `forward` does the work without adding a name prefix.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self.__dict__["hf"] = hf_model
        self.train(hf_model.training)


class CausalLMLogits(_HFExportModule):
    """`forward(input_ids[B, T]) -> logits[B, T, V]`: a causal LM without KV cache."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


class MeanPooledEmbedding(_HFExportModule):
    """`forward(input_ids, attention_mask) -> embedding[B, H]`: the encoder's last
    hidden state averaged over unmasked tokens (sentence-transformers' mean
    pooling, without normalization)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def repeated_blocks(module: nn.Module) -> list[str]:
    """Names of the transformer blocks: the items of the largest `nn.ModuleList`
    (`model.layers` in Llama, `encoder.layer` in BERT)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (best is None or len(m) > best[0]):
            best = (len(m), name, m)
    if best is None:
        return []
    _, name, lst = best
    return [f"{name}.{i}" if name else str(i) for i in range(len(lst))]


class ModelAdapter:
    """One loaded model with what the compiler needs around it.

    Attributes: `family` ("llama", "bert", "generic", "onnx"), `task`
    ("causal-lm", "encoder", "generic"), `name` (short, for reports),
    `module` (eval-mode nn.Module to export, or None for an `.onnx` input),
    `input_names`, `output_names`, `tokenizer` (or None), `hf_model` (the
    underlying transformers model, if any), `vocab_size`, `max_seq_len`,
    `source` (where it was loaded from).

    `make_inputs` takes sequences as given (no BOS added): rows must have one
    length unless the model has an `attention_mask` input, in which case they
    are right-padded with the tokenizer's pad id (else 0) and masked.
    """

    family = "generic"
    task = "generic"

    def __init__(
        self,
        module: nn.Module | None,
        *,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        tokenizer: Tokenizer | None = None,
        hf_model: nn.Module | None = None,
        vocab_size: int | None = None,
        max_seq_len: int | None = None,
        source: str | None = None,
    ):
        self.module = module.eval() if module is not None else None
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.tokenizer = tokenizer
        self.hf_model = hf_model
        self.vocab_size = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
        self.max_seq_len = max_seq_len
        self.source = source

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, task={self.task!r}, "
            f"inputs={self.input_names}, outputs={self.output_names}, tokenizer={self.tokenizer!r})"
        )

    @property
    def dynamic_shapes(self) -> dict[str, dict[int, str]] | None:
        """Per input, the dynamic axes by name (what `torch.onnx.export` takes)."""
        return {n: {0: "batch", 1: "seq"} for n in self.input_names}

    # -- inputs -------------------------------------------------------------

    def make_inputs(self, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """A batch of token sequences as model inputs (int64 numpy arrays)."""
        rows = [list(map(int, r)) for r in token_ids]
        if not rows or min(map(len, rows)) == 0:
            raise InputError(f"{self.name}: make_inputs needs at least one non-empty token sequence")
        extra = [n for n in self.input_names if n not in ("input_ids", "attention_mask")]
        if extra or self.input_names[0] != "input_ids":
            raise InputError(f"{self.name}: cannot build inputs {self.input_names} from token ids")
        if self.vocab_size is not None:
            bad = [t for r in rows for t in r if not 0 <= t < self.vocab_size]
            if bad:
                raise InputError(f"{self.name}: token id {bad[0]} outside the vocabulary (size {self.vocab_size})")
        lengths = [len(r) for r in rows]
        if self.max_seq_len is not None and max(lengths) > self.max_seq_len:
            raise InputError(f"{self.name}: sequence of {max(lengths)} tokens exceeds max_seq_len {self.max_seq_len}")
        if "attention_mask" not in self.input_names:
            if len(set(lengths)) != 1:
                raise InputError(
                    f"{self.name} has no attention_mask input: sequences must have one length "
                    f"(got {min(lengths)}..{max(lengths)})"
                )
            return {"input_ids": np.asarray(rows, dtype=np.int64)}
        T = max(lengths)
        pad = getattr(self.tokenizer, "pad_id", None) or 0
        ids = np.full((len(rows), T), pad, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def _text_rows(self, batch: int, length: int) -> list[list[int]]:
        """`batch` rows of `length` ids of real text (different offsets per row), or
        seeded random ids when there is no tokenizer."""
        if length <= 0:
            return [[] for _ in range(batch)]
        if self.tokenizer is None:
            if self.vocab_size is None:
                raise InputError(f"{self.name}: no tokenizer and no vocabulary size to draw sample ids from")
            rng = np.random.default_rng(0)
            return rng.integers(0, self.vocab_size, size=(batch, length)).tolist()
        stream = self.tokenizer.encode(SAMPLE_TEXT)
        need = length + 7 * batch
        stream = (stream * (need // len(stream) + 1))[:need]
        return [stream[7 * b : 7 * b + length] for b in range(batch)]

    def sample_inputs(self, batch: int = 1, seq: int = 8) -> dict[str, np.ndarray]:
        """Inputs of exactly [batch, seq] built from real tokens where possible."""
        return self.make_inputs(self._text_rows(batch, seq))

    def example_args(self, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
        """`sample_inputs` as torch tensors in `input_names` order (for tracing)."""
        inputs = self.sample_inputs(batch, seq)
        return tuple(torch.from_numpy(inputs[n]) for n in self.input_names)

    # -- structure ----------------------------------------------------------

    def block_names(self) -> list[str]:
        """Module names of the transformer blocks, in execution order."""
        return repeated_blocks(self.module) if self.module is not None else []

    def linear_names(self) -> list[str]:
        """Module names of every `nn.Linear` (the layers quantization acts on)."""
        if self.module is None:
            return []
        return [n for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]


class GenericAdapter(ModelAdapter):
    """A user-provided `nn.Module` of unknown family, exported with the example
    inputs it came with. Shapes are static unless `dynamic_shapes` is given."""

    def __init__(self, module, *, example_inputs: dict[str, np.ndarray], dynamic_shapes=None, **kw):
        super().__init__(module, input_names=list(example_inputs), **kw)
        self._examples = example_inputs
        self._dynamic = dynamic_shapes

    @property
    def dynamic_shapes(self):
        return self._dynamic

    def sample_inputs(self, batch: int = 1, seq: int = 8) -> dict[str, np.ndarray]:
        """The example inputs given at construction (their shapes, whatever `batch`/`seq` say)."""
        return dict(self._examples)

    def example_args(self, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
        return tuple(torch.as_tensor(self._examples[n]) for n in self.input_names)


def _count_outputs(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    raise InputError(
        f"module returns {type(out).__name__}; wrap it so that forward returns a tensor or a tuple of tensors"
    )
