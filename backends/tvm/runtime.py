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

Loading an artifact checks ``lib.so``, ``params.bin`` and the tokenizer against the
sha256 of the manifest's ``files`` table before TVM reads them, and refuses a changed,
missing or unlisted file (``verify=False``, ``lowbit run --no-verify``, skips it; the
check is written here, without the compiler, in 1 MiB chunks). :meth:`TVMModel.run`
refuses inputs longer than the model's context (``manifest["model"]["context_length"]``).

:class:`Artifact` adds the tokenizer and greedy generation (``lowbit run``), with the
same interface as the ONNX Runtime artifact; :class:`Session` looks like an
``onnxruntime.InferenceSession`` so the compiler's evaluation code measures a TVM
artifact as it measures an ORT one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import namedtuple
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
LIB = "lib.so"
PARAMS = "params.bin"
TOKENIZER = "tokenizer"
#: the manifest's "backend" for these artifacts (``TVMBackend.name``)
BACKEND = "tvm"

_IO = namedtuple("_IO", "name shape type")


def _error(message: str) -> Exception:
    """lowbit's InputError (imported only on the error path: the happy path never loads the compiler)."""
    from lowbit.compiler.core.errors import InputError

    return InputError(message)


def reads(name: str) -> bool:
    """The artifact files this runtime reads (what loading verifies): the library, the weights, the tokenizer."""
    return name in (LIB, PARAMS) or name.startswith(f"{TOKENIZER}/")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def check_files(folder: Path, manifest: dict) -> None:
    """Refuse (one line naming the file) a file this runtime reads that is missing, differs from the
    manifest's sha256, or is not listed (as ``lowbit.compiler.core.artifact.check_files``)."""
    table = manifest.get("files")
    problems = [] if isinstance(table, dict) and table else [
        f"{folder / MANIFEST} has no file table (files) to verify the artifact against"]
    table = table if isinstance(table, dict) else {}
    problems += [f"{folder / n} is not listed in {MANIFEST}, so it cannot be verified"
                 for n in (LIB, PARAMS) if table and n not in table]
    for name, info in table.items():
        path = folder / name
        if not reads(name):
            continue
        if not path.is_file():
            problems.append(f"{path} is missing ({MANIFEST} lists it)")
        elif path.stat().st_size != info.get("bytes", path.stat().st_size) or _sha256(path) != info.get("sha256"):
            problems.append(f"{path} does not match its sha256 in {MANIFEST}: the file changed after the compile")
    tok = folder / TOKENIZER
    if table and tok.is_dir():
        problems += [f"{p} is not listed in {MANIFEST}, so it cannot be verified" for p in sorted(tok.rglob("*"))
                     if p.is_file() and p.relative_to(folder).as_posix() not in table]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        from lowbit.compiler.core.artifact import IntegrityError

        raise IntegrityError(f"{problems[0]}{more} (--no-verify skips this check)")


class TVMModel:
    """The compiled graph of a TVM artifact: ``run(feeds) -> outputs`` by name."""

    def __init__(self, folder: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 meta: dict | None = None, verify: bool = True) -> None:
        """``meta``: the manifest's ``tvm`` section, when the manifest is not written yet (the compile's own check).
        ``verify``: check the files against the manifest's sha256 before loading them (not with ``meta``)."""
        self.folder = Path(folder)
        if meta is None:
            path = self.folder / MANIFEST
            if not path.is_file():
                raise _error(f"{folder} is not a lowbit artifact (no {MANIFEST})")
            self.manifest = json.loads(path.read_text())
            if self.manifest.get("backend") != BACKEND:
                raise _error(f"{folder} is a {self.manifest.get('backend', 'onnxruntime')} artifact, not a TVM one")
            if verify:
                check_files(self.folder, self.manifest)
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
        context = (self.manifest.get("model") or {}).get("context_length")
        #: the model's context (positions), if the manifest records it
        self.context_length = context if isinstance(context, int) and context > 0 else None
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
        if self.context_length is not None:
            for name in self.input_names:
                shape = np.shape(feeds[name])
                if len(shape) >= 2 and shape[1] > self.context_length:
                    raise _error(f"input {name!r} has {shape[1]} positions; the model's context is "
                                 f"{self.context_length} tokens")
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

    def __init__(self, folder: str | Path, *, threads: int | None = None, verify: bool = True) -> None:
        self.model = TVMModel(folder, threads=threads, verify=verify)
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

    def generate(self, prompt: str, *, max_new_tokens: int = 32, truncate: bool = False, notify=None) -> str:
        """Greedy continuation of ``prompt`` (prompt included in the returned text).

        A prompt (BOS included) that with ``max_new_tokens`` exceeds the model's context is
        refused, or with ``truncate`` cut to its last tokens; ``notify`` (default: a warning
        logged) receives the note saying so."""
        if self.manifest["model"].get("task") != "causal-lm":
            raise _error(f"{self.folder} holds a {self.manifest['model'].get('task')} model; --prompt needs a language model")
        from lowbit.compiler.core.artifact import fit_context

        tok = self.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None else []
        ids, note = fit_context(bos + tok.encode(prompt), max_new_tokens, self.model.context_length,
                                truncate=truncate, keep_first=len(bos))
        if note:
            if notify is None:
                import logging

                logging.getLogger("lowbit").warning(note)
            else:
                notify(note)
        new = greedy_ids(self.model, ids, max_new_tokens, eos=tok.eos_id)
        return tok.decode(ids[len(bos) :] + new)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run(feeds)

    def run_npz(self, path: str | Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise _error(f"cannot read inputs {path}: {e}") from None
        return self.run(feeds)
