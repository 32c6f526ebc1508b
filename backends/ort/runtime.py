"""Load and run an ONNX Runtime artifact (``lowbit run``).

The artifact's ``model.onnx`` is a plain ONNX model: this class only adds
the tokenizer saved beside it and greedy generation. Nothing here imports
the compiler's passes or torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.compiler.core.artifact import MODEL, load_manifest
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.evaluate import greedy
from lowbit.compiler.core.ortsession import make_session


class Artifact:
    """A compiled artifact folder, ready to run."""

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if self.manifest.get("backend", "onnxruntime") != "onnxruntime":
            raise InputError(f"{folder} is a {self.manifest['backend']} artifact, not an ONNX Runtime one")
        self.session = make_session(self.folder / MODEL, threads)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.manifest.get("tokenizer"):
                raise InputError(f"{self.folder} has no tokenizer; run it with --inputs FILE.npz instead")
            from lowbit.compiler.core.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder / "tokenizer")
        return self._tokenizer

    def generate(self, prompt: str, *, max_new_tokens: int = 32) -> str:
        """Greedy continuation of ``prompt`` (prompt included in the returned text)."""
        if self.manifest["model"].get("task") != "causal-lm":
            raise InputError(f"{self.folder} holds a {self.manifest['model'].get('task')} model; --prompt needs a language model")
        tok = self.tokenizer
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
        new = greedy(self.session, ids, max_new_tokens, eos=tok.eos_id)
        return tok.decode(ids[1 if tok.bos_id is not None else 0 :] + new)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [i.name for i in self.session.get_inputs()]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"inputs lack {missing} (the model takes {names})")
        outs = self.session.run(None, {n: feeds[n] for n in names})
        return {o.name: arr for o, arr in zip(self.session.get_outputs(), outs)}

    def run_npz(self, path: str | Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read inputs {path}: {e}") from None
        return self.run(feeds)
