"""One compile, step by step: :class:`Compilation`.

    source ─► load ─► IR (fp32, debug ids) + adapter ─► data ─► context ─► passes ─► build ─► verify ─► artifact/
                 └─► reference.onnx (fp32, kept in a temporary folder) ─────────────────────┘

:meth:`Compilation.run` does every step; ``lowbit.compile`` (``driver.compile``) is a
thin wrapper over it. Each step is a method that leaves its result on the object,
so a tool can run only some of them: ``lowbit explain`` replays a compile from its
manifest with ``load``, ``prepare_data`` and ``make_context`` and runs the passes
with its own instruments.

1. :meth:`~Compilation.configure`: the recipe (``--set`` settings, ``--override``
   items for the planners) and the backend (``core.backend``): its flags checked,
   the recipe's lowering made the backend's, the passes instantiated (every option
   checked) and the data files read (``check_input_files``) before anything is loaded;
2. :meth:`~Compilation.load`: the source imported into ``onnx_ir`` with its adapter,
   debug ids given, and the fp32 reference saved beside (the artifact is measured
   against it on held-out inputs that calibration never saw); then
   :meth:`~Compilation.check_model`: what only the model can tell (``--override`` globs
   against its layer names), before the first pass runs;
3. :meth:`~Compilation.prepare_data`: calibration and evaluation feeds (:class:`CompileData`):
   text split by the tokenizer, an ``.npz`` of inputs, or synthetic inputs;
4. :meth:`~Compilation.make_context`: the ``CompileContext`` the passes share;
5. :meth:`~Compilation.run_passes`: the recipe's passes with instruments (pass log,
   verification, IR dumps, progress: ``pass i/n NAME``);
6. :meth:`~Compilation.build`: the backend writes the artifact's model files and gives
   a session to verify with;
7. :meth:`~Compilation.verify`: accuracy and latency against fp32 (``compiler.verification``);
8. :meth:`~Compilation.manifest`: the ``core.manifest.Manifest`` written with the files.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import platform
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.artifact import ArtifactWriter, check_output, scratch_prefix
from lowbit.compiler.core.backend import Backend, BackendOptions, Built, get_backend
from lowbit.compiler.core.data import CALIB_FRACTION, read_text, split_text
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.manifest import Manifest
from lowbit.compiler.core.ortsession import make_session
from lowbit.compiler.core.passbase import CompileContext, assign_debug_ids
from lowbit.compiler.core.pipeline import DumpIR, PassLog, ShowProgress, Verify, run_pipeline
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.progress import say, step
from lowbit.compiler.core.recipe import Recipe, load_recipe
from lowbit.compiler.core.results import manifest_sections
from lowbit.compiler.core.tokenizers import save_tokenizer
from lowbit.compiler.frontend import load_source
from lowbit.compiler.verification import (
    check_drop,
    measure_accuracy,
    measure_latency,
    summary_text,
)

REFERENCE = "reference.onnx"


@dataclasses.dataclass
class CompileOptions:
    """Everything a compile takes besides its source and output (``lowbit.compile``'s keywords).

    Attributes:
        recipe: built-in recipe name, recipe TOML path, or a ``Recipe``.
        calib_data / eval_data: text files (or ``.npz`` of inputs); by default one built-in text split 80/20.
        tokenizer: tokenizer file or folder, when the model has none beside it.
        example_inputs: inputs for an ``nn.Module`` source (also calibration data without a tokenizer).
        dump_ir: folder receiving ``NNN_<Pass>.onnx`` and ``.txt`` after every pass.
        overrides: ``"LAYER_GLOB=PRECISION"`` items for the plan.
        settings: ``{"PASS.OPTION": value}`` changes to the recipe.
        max_drop: fail (no artifact) past this perplexity increase (or 1 - cosine).
        threads: ONNX Runtime threads for evaluation and timing.
        measure_latency: time the artifact against fp32.
        progress: progress bars.
        keep_reference: also write the imported fp32 graph as ``reference.onnx``.
        backend: a backend name or alias (``core.backend``), or a ``Backend``.
        backend_options: the backend's flags (target, arch, tuning).
        overwrite: replace an existing artifact at the output (else the compile fails before any work).
    """

    recipe: str | Path | Recipe = "w8a8"
    calib_data: str | Path | None = None
    eval_data: str | Path | None = None
    tokenizer: Any = None
    example_inputs: dict[str, np.ndarray] | None = None
    dump_ir: str | Path | None = None
    overrides: Sequence[str] = ()
    settings: dict[str, Any] | None = None
    max_drop: float | None = None
    threads: int = 2
    measure_latency: bool = True
    progress: bool = True
    keep_reference: bool = False
    backend: str | Backend = "onnxruntime"
    backend_options: BackendOptions = dataclasses.field(default_factory=BackendOptions)
    overwrite: bool = False


@dataclasses.dataclass
class CompileData:
    """Calibration and held-out evaluation feeds (input name -> array), and where they came from."""

    source: str
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]
    eval_ids: list[np.ndarray] | None = None  # token ids of each evaluation feed (language models)
    calib_tokens: int = 0
    eval_tokens: int = 0


@dataclasses.dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def accuracy(self) -> dict[str, Any]:
        return self.manifest["accuracy"]


class Compilation:
    """One compile of ``source`` under ``options`` (see the module docstring for the steps)."""

    def __init__(self, source: Any, options: CompileOptions | None = None) -> None:
        self.source = source
        self.options = options or CompileOptions()
        self.backend: Backend = get_backend(self.options.backend)
        self.recipe: Recipe | None = self.options.recipe if isinstance(self.options.recipe, Recipe) else None
        self.passes: list | None = None
        self.model: ir.Model | None = None
        self.adapter: Any = None
        self.reference_path: Path | None = None
        self.fp32_weight_bytes = 0
        self.data: CompileData | None = None
        self.context: CompileContext | None = None
        self.log: PassLog | None = None
        self.built: Built | None = None

    # -- the steps ----------------------------------------------------------
    def configure(self) -> list:
        """Recipe with settings and overrides, backend checked and its lowering in the recipe; the passes."""
        o = self.options
        recipe = self.recipe or load_recipe(o.recipe)
        for key, value in (o.settings or {}).items():
            recipe.set_option(key, value)
        if o.overrides:
            planners = list(dict.fromkeys(p.name for p in recipe.passes if p.name in ("plan", "plan-mixed")))
            if not planners:
                raise InputError(f"--override needs a 'plan' pass, recipe {recipe.name!r} has none")
            for planner in planners:
                recipe.set_option(f"{planner}.overrides", list(o.overrides))
        self.backend.check(o.backend_options)
        self.backend.prepare_recipe(recipe)
        self.recipe = recipe
        self.passes = recipe.build()
        check_input_files(o)
        return self.passes

    def check_model(self) -> None:
        """Right after ``load``, before the first pass: what only the imported model can tell (the planners'
        ``--override`` globs against its layer names), each pass's ``check_model``, up to the first pass not
        lowbit's own (what it does to the graph is not known)."""
        for p in self.passes if self.passes is not None else self._recipe().build():
            if not type(p).__module__.startswith("lowbit."):
                break
            check = getattr(p, "check_model", None)
            if check is not None:
                check(self.model)

    def load(self, workdir: str | Path) -> tuple[ir.Model, Any]:
        """Import the source (fp32 IR with debug ids, and its adapter); save the reference copy into ``workdir``."""
        o = self.options
        extra = {"example_inputs": o.example_inputs} if o.example_inputs is not None else {}
        with step(f"load {_label(self.source)} (import, export to ONNX)", enabled=o.progress):
            model, adapter = load_source(self.source, tokenizer=o.tokenizer, **extra)
            assign_debug_ids(model)
            self.reference_path = Path(workdir) / REFERENCE
            ir.save(model, self.reference_path, external_data=f"{REFERENCE}.data", size_threshold_bytes=1024)
        self.model, self.adapter = model, adapter
        self.fp32_weight_bytes = weight_bytes(model)
        return model, adapter

    def prepare_data(self) -> CompileData:
        """Calibration and evaluation feeds, as the recipe's ``[calibration]`` / ``[evaluation]`` ask."""
        o = self.options
        with step("data: calibration and held-out evaluation samples", enabled=o.progress):
            self.data = prepare_data(self.model, self.adapter, self._recipe(), o.calib_data, o.eval_data,
                                     o.example_inputs)
        return self.data

    def make_context(self) -> CompileContext:
        """The state the passes share: calibration feeds, adapter, backend."""
        self.context = CompileContext(calibration_batches=self.data.calibration, adapter=self.adapter,
                                      progress=self.options.progress, backend=self.backend)
        return self.context

    def run_passes(self, instruments: Sequence | None = None) -> ir.Model:
        """Run the recipe's passes on the model; default instruments: pass log, verification, IR dumps."""
        passes = self.passes if self.passes is not None else self._recipe().build()
        shown = ShowProgress(len(passes), enabled=self.options.progress)
        if instruments is None:
            self.log = PassLog()
            instruments = [self.log, Verify()] + ([DumpIR(self.options.dump_ir)] if self.options.dump_ir else [])
        try:
            self.model = run_pipeline(self.model, passes, context=self.context, instruments=[*instruments, shown])
        finally:
            shown.close(ok=False)  # a failed pass: its step ends without a "done" line
        return self.model

    def build(self, folder: str | Path) -> Built:
        """The backend writes the artifact's model files into ``folder``."""
        with step(f"build: {self.backend.name} artifact", enabled=self.options.progress):
            self.built = self.backend.build(self.model, Path(folder), self.options.backend_options,
                                            threads=self.options.threads)
        return self.built

    def verify(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Accuracy and latency of the built artifact against the fp32 reference."""
        o, art = self.options, self.built.session
        ref = make_session(self.reference_path, o.threads)
        accuracy = (measure_accuracy(ref, art, self.adapter, self.data, progress=o.progress) if art is not None
                    else {"note": self.built.note})
        latency = (measure_latency(ref, art, self.adapter, self.data, progress=o.progress)
                   if o.measure_latency and art is not None else {})
        return accuracy, latency

    def pass_records(self) -> dict[str, Any]:
        """The manifest's ``layers``, ``structure`` and ``notes``: the passes' typed records (smoothing
        alphas, rotation, ..., for inspect and report), assembled by ``core.results``."""
        return manifest_sections(self.context.results, self.context.notes)

    def manifest(self, *, accuracy: dict[str, Any], latency: dict[str, Any], compile_seconds: float,
                 tokenizer: dict[str, Any] | None = None) -> Manifest:
        """The artifact's manifest (``files`` are added when it is committed)."""
        source, adapter, model, o = self.source, self.adapter, self.model, self.options
        plan = read_plan(model)
        size = weight_bytes(model)
        return Manifest(
            lowbit=_version("lowbit"),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=str(source) if not hasattr(source, "forward") else type(source).__name__,
            model={
                "name": getattr(adapter, "name", Path(str(source)).stem),
                "family": getattr(adapter, "family", None),
                "task": getattr(adapter, "task", "generic"),
                "context_length": getattr(adapter, "max_seq_len", None),  # positions; None: not known
            },
            backend=self.backend.name,
            inputs=[_io(v) for v in model.graph.inputs],
            outputs=[_io(v) for v in model.graph.outputs],
            recipe=self._recipe().resolved(),
            passes=self.log.entries if self.log is not None else [],
            plan=plan.to_json() if plan else None,
            **self.pass_records(),
            # what `lowbit explain` needs to replay this compile
            reproduce={
                "source": _abspath(source),
                "calib_data": _abspath(o.calib_data),
                "eval_data": _abspath(o.eval_data),
                "tokenizer": _abspath(o.tokenizer),
            },
            calibration={
                "source": self.data.source,
                "samples": len(self.data.calibration),
                "tokens": self.data.calib_tokens,
                "seq_len": self._recipe().calibration["seq_len"],
                "activations": {k: v.summary() for k, v in self.context.stats.items()},
            },
            accuracy=accuracy,
            latency=latency,
            size={"fp32_weight_bytes": self.fp32_weight_bytes, "weight_bytes": size,
                  "ratio": size / max(self.fp32_weight_bytes, 1)},
            compile_seconds=round(compile_seconds, 2),
            tokenizer=tokenizer,
            versions={p: _version(p) for p in ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "torch", "numpy")}
            | {"python": platform.python_version()},
            backend_info=self.built.info if self.built is not None else None,
        )

    # -- all of them ----------------------------------------------------------
    def run(self, output: str | Path) -> CompileResult:
        """Every step: the verified artifact in ``output`` (written atomically), or an error and nothing."""
        start = time.perf_counter()
        check_output(output, overwrite=self.options.overwrite)  # before any work: exists, locked, not ours
        self.configure()
        say(f"recipe {self._recipe().name} ({len(self.passes)} passes), backend {self.backend.name}",
            enabled=self.options.progress)
        with ArtifactWriter(output, overwrite=self.options.overwrite) as writer, \
                tempfile.TemporaryDirectory(prefix=scratch_prefix("ref")) as tmp:
            self.load(tmp)
            self.check_model()
            if self.options.keep_reference:
                for f in Path(tmp).iterdir():
                    shutil.copyfile(f, writer.path / f.name)
            self.prepare_data()
            self.make_context()
            self.run_passes()
            self.build(writer.path)
            compile_seconds = time.perf_counter() - start
            accuracy, latency = self.verify()
            tok = self.adapter.tokenizer if self.adapter is not None else None
            tokenizer_info = save_tokenizer(tok, writer.path / "tokenizer") if tok else None
            manifest = self.manifest(accuracy=accuracy, latency=latency, compile_seconds=compile_seconds,
                                     tokenizer=tokenizer_info).to_json()
            check_drop(accuracy, self.options.max_drop)
            out = writer.commit(manifest, summary_text(manifest))
        return CompileResult(out, manifest)

    def _recipe(self) -> Recipe:
        if self.recipe is None:
            self.recipe = load_recipe(self.options.recipe)
        return self.recipe


# ---------------------------------------------------------------------------
# The data step
# ---------------------------------------------------------------------------
def prepare_data(model, adapter, recipe, calib_data, eval_data, example_inputs) -> CompileData:
    """Calibration and evaluation feeds: an ``.npz`` of inputs, text through the adapter's tokenizer,
    or (no tokenizer) perturbed example inputs or random inputs of the model's input types."""
    cal, ev = recipe.calibration, recipe.evaluation
    if str(calib_data or "").endswith(".npz"):
        feeds = load_npz_samples(calib_data)
        if eval_data:
            calib, evals = feeds, load_npz_samples(eval_data, "evaluation")
        else:
            cut = max(1, int(len(feeds) * CALIB_FRACTION))
            calib, evals = feeds[:cut], feeds[cut:]
        for path, part in ((calib_data, calib), (eval_data or calib_data, evals)):
            missing = [v.name for v in model.graph.inputs if part and v.name not in part[0]]
            if missing:
                raise InputError(f"{path}: no array for the model's input(s) {missing} (arrays: {sorted(part[0])})")
        lm = getattr(adapter, "task", None) == "causal-lm" and all("input_ids" in f for f in evals)
        return CompileData(str(calib_data), calib, evals, eval_ids=[f["input_ids"] for f in evals] if lm else None)
    if adapter is not None and adapter.tokenizer is not None:
        split = split_text(
            adapter.tokenizer,
            calib_data=calib_data,
            eval_data=eval_data,
            calib_samples=int(cal["samples"]),
            eval_samples=int(ev["samples"]),
            seq_len=int(cal["seq_len"]),
        )
        return CompileData(
            source=split.source,
            calibration=[adapter.make_inputs([w]) for w in split.calibration],
            evaluation=[adapter.make_inputs([w]) for w in split.evaluation],
            eval_ids=[np.array([w]) for w in split.evaluation],
            calib_tokens=sum(len(w) for w in split.calibration),
            eval_tokens=sum(len(w) for w in split.evaluation),
        )
    if calib_data:
        raise InputError("text --calib-data needs a tokenizer and this model has none: give --tokenizer, or an .npz of inputs")
    lm = getattr(adapter, "task", None) == "causal-lm"
    if lm and example_inputs is None:  # random token ids would calibrate (and verify) on noise
        raise InputError(f"{adapter.name} is a language model and no tokenizer was found with it: give --tokenizer, "
                         "or --calib-data FILE.npz of input_ids")
    feeds = synthetic_feeds(model, example_inputs, int(cal["samples"]) + int(ev["samples"]),
                            vocab_size=getattr(adapter, "vocab_size", None))
    n_cal = int(cal["samples"])
    evals = feeds[n_cal:]
    ids = [f["input_ids"] for f in evals] if lm and all("input_ids" in f for f in evals) else None
    return CompileData("example inputs" if example_inputs else "synthetic (random inputs)", feeds[:n_cal], evals,
                       eval_ids=ids)


def check_input_files(options: CompileOptions) -> None:
    """The files a compile reads besides the model, checked before it is loaded: data files readable (text:
    UTF-8, not empty, not binary; ``.npz``: arrays of one sample count, finite), ``--dump-ir`` a folder."""
    for flag, role, path in (("--calib-data", "calibration", options.calib_data),
                             ("--eval-data", "evaluation", options.eval_data)):
        if isinstance(path, (str, Path)):
            load_npz_samples(path, role) if str(path).endswith(".npz") else read_text(path, flag)
    if options.dump_ir is not None and Path(options.dump_ir).exists() and not Path(options.dump_ir).is_dir():
        raise InputError(f"--dump-ir {options.dump_ir}: exists and is not a folder")


def load_npz_samples(path: str | Path, role: str = "calibration") -> list[dict[str, np.ndarray]]:
    """An .npz of arrays ``[N, ...]`` by input name -> N feeds (each keeps a batch axis of 1)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read input arrays {path}: {type(e).__name__}: {e}") from None
    except AttributeError:  # np.load gave one array (an .npy saved under another name), not an archive
        raise InputError(f"cannot read input arrays {path}: not an .npz archive of arrays by input name") from None
    counts = {len(a) for a in arrays.values() if a.ndim}
    if len(counts) != 1:
        raise InputError(f"{path}: arrays must share their first (sample) dimension, got {sorted(counts)}")
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            i = int(np.argwhere(~np.isfinite(a))[0][0]) if a.ndim else 0
            what = "NaN" if np.isnan(a).any() else "infinity"
            raise InputError(f"{path}: {role} batch {i}: input {k!r} contains {what}")
    n = counts.pop()
    return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]


def synthetic_feeds(model: ir.Model, example: dict[str, np.ndarray] | None, count: int,
                    vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Inputs for a model without a tokenizer: perturbed examples, or random data of the input types
    (integers below ``vocab_size``, when the adapter knows it: token ids the embedding has rows for)."""
    high = min(100, vocab_size) if vocab_size else 100
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(count):
        feed = {}
        for v in model.graph.inputs:
            if example is not None and v.name in example:
                base = np.asarray(example[v.name])
                feed[v.name] = base + rng.normal(0, 0.1, base.shape).astype(base.dtype) if base.dtype.kind == "f" else base
                continue
            shape = [d if isinstance(d, int) else (1 if i == 0 else 16) for i, d in enumerate(v.shape or [])]
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            if np.issubdtype(dtype, np.integer):
                feed[v.name] = (np.ones if "mask" in v.name else lambda s, dtype: rng.integers(0, high, s).astype(dtype))(shape, dtype=dtype)
            else:
                feed[v.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def _label(source: Any) -> str:
    """A source as a progress line names it: a path or name as given, a module by its class."""
    return type(source).__name__ if hasattr(source, "forward") else str(source)


def _abspath(value: Any) -> str | None:
    """An existing path made absolute (a compile may be explained from another folder); other values as text."""
    if not isinstance(value, (str, Path)):
        return None  # a module or tokenizer object: nothing a later process could reload
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def _io(v: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
    return {"name": v.name, "shape": shape, "dtype": v.dtype.name if v.dtype is not None else None}


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of ``model``."""
    return int(sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
