"""Load and run a TVM artifact with the TVM *runtime* alone.

An artifact compiled with ``--backend tvm`` holds ``lib.so`` (the Relax VM executable
and its kernels), ``params.bin`` (the weights, TVM's parameter format) and
``manifest.json`` (``manifest["tvm"]["params"]`` gives their order after the inputs).
This module imports neither ``lowbit.compiler`` nor TVM's compiler: set
``TVM_USE_RUNTIME_LIB=1`` before importing TVM and only ``libtvm_runtime`` is loaded::

    import os; os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    from lowbit.backends.tvm.runtime import TVMModel
    model = TVMModel("out/")                      # lib.so + params.bin + manifest.json
    logits = model.run({"input_ids": ids})["logits"]

Without lowbit at all, the same takes four calls (what :class:`TVMModel` does)::

    import json, tvm
    from tvm.runtime.vm import VirtualMachine
    m = json.load(open("out/manifest.json"))["tvm"]
    vm = VirtualMachine(tvm.runtime.load_module("out/lib.so"), tvm.cpu())
    p = tvm.runtime.load_param_dict_from_file("out/params.bin")
    logits = vm["main"](tvm.runtime.tensor(ids), *[p[n] for n in m["params"]]).numpy()

An artifact compiled with ``--tune`` also has ``main_t{L}`` functions, specialised to
batch 1 and sequence length ``L`` and built with MetaSchedule-tuned matmuls
(``manifest["tvm"]["entries"]`` gives their input shapes); :meth:`TVMModel.run` calls
the one whose shapes the inputs have, and ``main`` for any other shape.

:class:`Artifact` adds the tokenizer and greedy generation (``lowbit run``), with the
same interface as the ONNX Runtime artifact; :class:`Session` looks like an
``onnxruntime.InferenceSession`` so the compiler's evaluation code measures a TVM
artifact as it measures an ORT one.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
LIB = "lib.so"
PARAMS = "params.bin"
#: the manifest's "backend" for these artifacts (``TVMBackend.name``)
BACKEND = "tvm"

_IO = namedtuple("_IO", "name shape type")


def _error(message: str) -> Exception:
    """lowbit's InputError (imported only on the error path: the happy path never loads the compiler)."""
    from lowbit.compiler.core.errors import InputError

    return InputError(message)


class TVMModel:
    """The compiled graph of a TVM artifact: ``run(feeds) -> outputs`` by name."""

    def __init__(self, folder: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 meta: dict | None = None) -> None:
        """``meta``: the manifest's ``tvm`` section, when the manifest is not written yet (the compile's own check)."""
        self.folder = Path(folder)
        if meta is None:
            path = self.folder / MANIFEST
            if not path.is_file():
                raise _error(f"{folder} is not a lowbit artifact (no {MANIFEST})")
            self.manifest = json.loads(path.read_text())
            if self.manifest.get("backend") != BACKEND:
                raise _error(f"{folder} is a {self.manifest.get('backend', 'onnxruntime')} artifact, not a TVM one")
        else:
            self.manifest = {"backend": BACKEND, BACKEND: meta}
        meta = self.manifest[BACKEND]
        import tvm
        from tvm.runtime.vm import VirtualMachine

        kind = device or ("cuda" if meta.get("target_kind") == "cuda" else "cpu")
        self.device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        if kind == "cuda" and not self.device.exist:
            raise _error(f"{folder} was compiled for {meta.get('target')} and this machine has no CUDA GPU")
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        lib = tvm.runtime.load_module(str(self.folder / LIB))
        self.vm = VirtualMachine(lib, self.device)
        params = tvm.runtime.load_param_dict_from_file(str(self.folder / PARAMS))
        self.params = [params[n].copyto(self.device) if kind == "cuda" else params[n] for n in meta["params"]]
        self.input_names = list(meta["inputs"])
        self.output_names = list(meta["outputs"])
        #: tuned entry functions (``--tune``): input shapes -> function name
        self.entries = {tuple(tuple(e["shapes"][n]) for n in self.input_names): e["function"]
                        for e in meta.get("entries", [])}
        self._tvm = tvm

    def entry(self, feeds: dict[str, np.ndarray]) -> str:
        """The function that runs ``feeds``: the tuned ``main_t{L}`` whose static shapes they have, else ``main``."""
        return self.entries.get(tuple(tuple(np.shape(feeds[n])) for n in self.input_names), "main")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise _error(f"inputs lack {missing} (the model takes {self.input_names})")
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), self.device) for n in self.input_names]
        out = self.vm[self.entry(feeds)](*args, *self.params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}


class Session:
    """An ``onnxruntime.InferenceSession`` look-alike over a :class:`TVMModel` (for evaluation code)."""

    def __init__(self, model: TVMModel) -> None:
        self.model = model
        shapes = {i["name"]: i for i in model.manifest.get("inputs", [])}
        self._inputs = [_IO(n, shapes.get(n, {}).get("shape"), shapes.get(n, {}).get("dtype")) for n in model.input_names]
        self._outputs = [_IO(n, None, None) for n in model.output_names]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.model.run(feeds)
        return [result[n] for n in (output_names or self.model.output_names)]


def greedy_ids(model: TVMModel, prompt: list[int], steps: int, eos: int | None = None) -> list[int]:
    """Greedy decoding without a cache (the whole sequence each step); the new tokens."""
    ids = list(prompt)
    name = model.input_names[0]
    new: list[int] = []
    for _ in range(steps):
        logits = model.run({name: np.array([ids], dtype=np.int64)})[model.output_names[0]]
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return new


class Artifact:
    """A TVM artifact folder, ready to run: the ``lowbit run`` interface of the ORT artifact."""

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        self.model = TVMModel(folder, threads=threads)
        self.folder = self.model.folder
        self.manifest = self.model.manifest
        self.session = Session(self.model)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.manifest.get("tokenizer"):
                raise _error(f"{self.folder} has no tokenizer; run it with --inputs FILE.npz instead")
            from lowbit.compiler.core.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder / "tokenizer")
        return self._tokenizer

    def generate(self, prompt: str, *, max_new_tokens: int = 32) -> str:
        """Greedy continuation of ``prompt`` (prompt included in the returned text)."""
        if self.manifest["model"].get("task") != "causal-lm":
            raise _error(f"{self.folder} holds a {self.manifest['model'].get('task')} model; --prompt needs a language model")
        tok = self.tokenizer
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
        new = greedy_ids(self.model, ids, max_new_tokens, eos=tok.eos_id)
        return tok.decode(ids[1 if tok.bos_id is not None else 0 :] + new)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run(feeds)

    def run_npz(self, path: str | Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise _error(f"cannot read inputs {path}: {e}") from None
        return self.run(feeds)
