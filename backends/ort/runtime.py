"""Load and run an ONNX Runtime artifact (``lowbit run``).

The artifact's ``model.onnx`` is a plain ONNX model: this class only adds
the tokenizer saved beside it and greedy generation. Nothing here imports
the compiler's passes or torch.

Loading checks the files it reads (``model.onnx``, its external data, the
tokenizer) against the sha256 the manifest holds and refuses a changed, missing
or unlisted one (``verify=False``, ``lowbit run --no-verify``, skips that).
Generation and :meth:`Artifact.run` refuse more positions than the model's
context (``manifest["model"]["context_length"]``; unknown for artifacts of an
older lowbit and of ONNX sources, then nothing is checked).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lowbit.compiler.core.artifact import (
    MODEL,
    TOKENIZER,
    check_files,
    check_positions,
    context_length,
    fit_context,
    load_manifest,
)
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.evaluate import greedy
from lowbit.compiler.core.ortsession import make_session


class Artifact:
    """A compiled artifact folder, ready to run."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, verify: bool = True) -> None:
        """``verify``: check the files this reads against the manifest's sha256 first (refuse a mismatch)."""
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if self.manifest.get("backend", "onnxruntime") != "onnxruntime":
            raise InputError(f"{folder} is a {self.manifest['backend']} artifact, not an ONNX Runtime one")
        if verify:
            check_files(self.folder, self.manifest, select=reads, required=(MODEL,))
        self.context_length = context_length(self.manifest)
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

    def generate(self, prompt: str, *, max_new_tokens: int = 32, truncate: bool = False,
                 notify: Callable[[str], None] | None = None) -> str:
        """Greedy continuation of ``prompt`` (prompt included in the returned text).

        A prompt (BOS included) that with ``max_new_tokens`` exceeds the model's context is
        refused, or with ``truncate`` cut to its last tokens; ``notify`` (default: a warning
        logged) receives the note saying so."""
        if self.manifest["model"].get("task") != "causal-lm":
            raise InputError(f"{self.folder} holds a {self.manifest['model'].get('task')} model; --prompt needs a language model")
        tok = self.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None else []
        ids, note = fit_context(bos + tok.encode(prompt), max_new_tokens, self.context_length, truncate=truncate,
                                keep_first=len(bos))
        if note:
            (notify or _log_warning)(note)
        new = greedy(self.session, ids, max_new_tokens, eos=tok.eos_id)
        return tok.decode(ids[len(bos) :] + new)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_positions(feeds, self.manifest)
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


def reads(name: str) -> bool:
    """The artifact files this runtime reads (what loading verifies): the model, its external data, the tokenizer."""
    return name == MODEL or name.startswith((f"{MODEL}.", f"{TOKENIZER}/"))


def _log_warning(note: str) -> None:
    import logging

    logging.getLogger("lowbit").warning(note)
