"""``lowbit.compile``: source in, verified artifact out.

    source ─► frontend ─► IR ─► recipe's passes (instrumented) ─► artifact/
                                                                  model.onnx
                                 fp32 reference ─► evaluation ─► manifest.json

The fp32 model is kept (as a temporary file) so the artifact can be measured
against it on held-out inputs that calibration never saw.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from lowbit.compiler.core import evaluate
from lowbit.compiler.core.artifact import MODEL, ArtifactWriter
from lowbit.compiler.core.data import CALIB_FRACTION, split_text
from lowbit.compiler.core.errors import AccuracyError, InputError
from lowbit.compiler.core.ortsession import make_session
from lowbit.compiler.core.passbase import CompileContext, assign_debug_ids
from lowbit.compiler.core.pipeline import DumpIR, PassLog, Verify, run_pipeline
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.recipe import load_recipe
from lowbit.compiler.core.tokenizers import save_tokenizer
from lowbit.compiler.frontend import load_source

logger = logging.getLogger("lowbit")
GENERATE_TOKENS = 32
BACKENDS = ("onnxruntime", "tvm")


@dataclasses.dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def accuracy(self) -> dict[str, Any]:
        return self.manifest["accuracy"]


def compile(  # noqa: A001 - the verb users expect
    source: Any,
    output: str | Path,
    *,
    recipe: str | Path = "w8a8",
    calib_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    dump_ir: str | Path | None = None,
    overrides: Sequence[str] = (),
    settings: dict[str, Any] | None = None,
    max_drop: float | None = None,
    tokenizer: str | Path | None = None,
    example_inputs: dict[str, np.ndarray] | None = None,
    threads: int = 2,
    measure_latency: bool = True,
    progress: bool = True,
    keep_reference: bool = False,
    backend: str = "onnxruntime",
    target: str = "llvm",
    arch: str | None = None,
    tune: int = 0,
    tune_seq_lens: Sequence[int] | None = None,
    tuning_db: str | Path | None = None,
) -> CompileResult:
    """Compile ``source`` (path to .onnx / HF folder / llama2.c .bin, or an nn.Module) into ``output``.

    Args:
        recipe: built-in recipe name or path to a recipe TOML file.
        calib_data / eval_data: text files; by default one built-in text split 80/20.
        dump_ir: folder receiving ``NNN_<Pass>.onnx`` and ``.txt`` after every pass.
        overrides: ``"LAYER_GLOB=PRECISION"`` items for the plan.
        settings: ``{"PASS.OPTION": value}`` changes to the recipe.
        max_drop: fail (no artifact) when the perplexity increase (language models) or
            1 - cosine (other models) exceeds this fraction.
        example_inputs: inputs for an nn.Module source (also used as calibration data
            for models without a tokenizer).
        keep_reference: also write the imported fp32 graph (with its debug ids) as
            ``reference.onnx``, so ``lowbit explain`` need not export the source again.
        backend: "onnxruntime" (``model.onnx``) or "tvm" (``lib.so`` + ``params.bin``; the recipe's
            ``lower-ort`` becomes ``lower-tvm``, see ``lowbit.backends.tvm.artifact``).
        target / arch: TVM only: "llvm" or "cuda", and the CUDA architecture (``sm_80``, ``sm_90``...).
        tune / tune_seq_lens / tuning_db: TVM on LLVM only: MetaSchedule trials per quantized
            matmul, the sequence lengths to tune at (default 1 and 128), and a tuning database
            folder to reuse and extend (see ``lowbit.backends.tvm.tune``).
    """
    start = time.perf_counter()
    recipe_obj = load_recipe(recipe)
    for key, value in (settings or {}).items():
        recipe_obj.set_option(key, value)
    if overrides:
        planners = list(dict.fromkeys(p.name for p in recipe_obj.passes if p.name in ("plan", "plan-mixed")))
        if not planners:
            raise InputError(f"--override needs a 'plan' pass, recipe {recipe_obj.name!r} has none")
        for planner in planners:
            recipe_obj.set_option(f"{planner}.overrides", list(overrides))
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "tvm":
        from lowbit.backends.tvm import artifact as tvm_artifact

        tvm_artifact.check_available(target, arch)
        tvm_artifact.check_tuning(target, tune, tune_seq_lens, tuning_db)
        tvm_artifact.prepare_recipe(recipe_obj)
    elif arch or target != "llvm":
        raise InputError("--target and --arch apply to --backend tvm only")
    elif tune or tune_seq_lens or tuning_db is not None:
        raise InputError("--tune, --tune-seq-len and --tuning-db apply to --backend tvm only")
    passes = recipe_obj.build()

    with ArtifactWriter(output) as writer, tempfile.TemporaryDirectory(prefix="lowbit-ref-") as tmp:
        extra = {"example_inputs": example_inputs} if example_inputs is not None else {}
        model, adapter = load_source(source, tokenizer=tokenizer, **extra)
        assign_debug_ids(model)
        ref_path = Path(tmp) / "reference.onnx"
        ir.save(model, ref_path, external_data="reference.onnx.data", size_threshold_bytes=1024)
        if keep_reference:
            for f in Path(tmp).iterdir():
                shutil.copyfile(f, writer.path / f.name)
        fp32_bytes = _weight_bytes(model)

        data = _prepare_data(model, adapter, recipe_obj, calib_data, eval_data, example_inputs)
        context = CompileContext(calibration_batches=data["calibration"], adapter=adapter, progress=progress)
        log = PassLog()
        instruments = [log, Verify()]
        if dump_ir:
            instruments.append(DumpIR(dump_ir))
        model = run_pipeline(model, passes, context=context, instruments=instruments)
        backend_info, art_note = None, None
        if backend == "tvm":
            built = tvm_artifact.build_artifact(model, writer.path, target=target, arch=arch, threads=threads,
                                                tune=tune, tune_seq_lens=tune_seq_lens, tuning_db=tuning_db)
            backend_info, art_note = built.info, built.note
        else:
            writer.save_model(model)
        compile_seconds = time.perf_counter() - start

        ref = make_session(ref_path, threads)
        art = built.session if backend == "tvm" else make_session(writer.path / MODEL, threads)
        accuracy = _measure(ref, art, adapter, data) if art is not None else {"note": art_note}
        latency = _latency(ref, art, adapter, data, model) if measure_latency and art is not None else {}
        tokenizer_info = save_tokenizer(adapter.tokenizer, writer.path / "tokenizer") if adapter is not None and adapter.tokenizer else None

        manifest = {
            "lowbit": _version("lowbit"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": str(source) if not hasattr(source, "forward") else type(source).__name__,
            "model": {
                "name": getattr(adapter, "name", Path(str(source)).stem),
                "family": getattr(adapter, "family", None),
                "task": getattr(adapter, "task", "generic"),
            },
            "backend": backend,
            "inputs": [_io(v) for v in model.graph.inputs],
            "outputs": [_io(v) for v in model.graph.outputs],
            "recipe": recipe_obj.resolved(),
            "passes": log.entries,
            "plan": (read_plan(model).to_json() if read_plan(model) else None),
            "layers": context.notes.get("layers", {}),
            "structure": context.notes.get("recognize", {}),
            # what other passes recorded (smoothing alphas, rotation, ...), for inspect and report
            "notes": {k: v for k, v in context.notes.items() if k not in ("layers", "recognize")},
            # what `lowbit explain` needs to replay this compile
            "reproduce": {
                "source": _abspath(source),
                "calib_data": _abspath(calib_data),
                "eval_data": _abspath(eval_data),
                "tokenizer": _abspath(tokenizer),
            },
            "calibration": {
                "source": data["source"],
                "samples": len(data["calibration"]),
                "tokens": data["calib_tokens"],
                "seq_len": recipe_obj.calibration["seq_len"],
                "activations": {k: v.summary() for k, v in context.stats.items()},
            },
            "accuracy": accuracy,
            "latency": latency,
            "size": {
                "fp32_weight_bytes": fp32_bytes,
                "weight_bytes": _weight_bytes(model),
                "ratio": _weight_bytes(model) / max(fp32_bytes, 1),
            },
            "compile_seconds": round(compile_seconds, 2),
            "tokenizer": tokenizer_info,
            "versions": {p: _version(p) for p in ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "torch", "numpy")}
            | {"python": platform.python_version()},
        }
        if backend_info is not None:
            manifest["tvm"] = backend_info
        _check_drop(accuracy, max_drop)
        out = writer.commit(manifest, summary_text(manifest))
    return CompileResult(out, manifest)


def _abspath(value: Any) -> str | None:
    """An existing path made absolute (a compile may be explained from another folder); other values as text."""
    if not isinstance(value, (str, Path)):
        return None  # a module or tokenizer object: nothing a later process could reload
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def _prepare_data(model, adapter, recipe, calib_data, eval_data, example_inputs) -> dict[str, Any]:
    cal, ev = recipe.calibration, recipe.evaluation
    if str(calib_data or "").endswith(".npz"):
        feeds = load_npz_samples(calib_data)
        if eval_data:
            calib, evals = feeds, load_npz_samples(eval_data)
        else:
            cut = max(1, int(len(feeds) * CALIB_FRACTION))
            calib, evals = feeds[:cut], feeds[cut:]
        return _feeds_data(str(calib_data), calib, evals)
    if adapter is not None and adapter.tokenizer is not None:
        split = split_text(
            adapter.tokenizer,
            calib_data=calib_data,
            eval_data=eval_data,
            calib_samples=int(cal["samples"]),
            eval_samples=int(ev["samples"]),
            seq_len=int(cal["seq_len"]),
        )
        return {
            "source": split.source,
            "calibration": [adapter.make_inputs([w]) for w in split.calibration],
            "evaluation": [adapter.make_inputs([w]) for w in split.evaluation],
            "eval_ids": [np.array([w]) for w in split.evaluation],
            "calib_tokens": sum(len(w) for w in split.calibration),
            "eval_tokens": sum(len(w) for w in split.evaluation),
        }
    if calib_data:
        raise InputError("text --calib-data needs a tokenizer and this model has none: give --tokenizer, or an .npz of inputs")
    feeds = _synthetic_feeds(model, example_inputs, int(cal["samples"]) + int(ev["samples"]))
    n_cal = int(cal["samples"])
    return _feeds_data("example inputs" if example_inputs else "synthetic (random inputs)", feeds[:n_cal], feeds[n_cal:])


def _feeds_data(source: str, calib: list, evals: list) -> dict[str, Any]:
    return {"source": source, "calibration": calib, "evaluation": evals, "eval_ids": None, "calib_tokens": 0, "eval_tokens": 0}


def load_npz_samples(path: str | Path) -> list[dict[str, np.ndarray]]:
    """An .npz of arrays ``[N, ...]`` by input name -> N feeds (each keeps a batch axis of 1)."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read input arrays {path}: {e}") from None
    counts = {len(a) for a in arrays.values() if a.ndim}
    if len(counts) != 1:
        raise InputError(f"{path}: arrays must share their first (sample) dimension, got {sorted(counts)}")
    n = counts.pop()
    return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]


def _synthetic_feeds(model: ir.Model, example: dict[str, np.ndarray] | None, count: int) -> list[dict[str, np.ndarray]]:
    """Inputs for a model without a tokenizer: perturbed examples, or random data of the input types."""
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
                feed[v.name] = (np.ones if "mask" in v.name else lambda s, dtype: rng.integers(0, 100, s).astype(dtype))(shape, dtype=dtype)
            else:
                feed[v.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _measure(ref, art, adapter, data) -> dict[str, Any]:
    feeds = data["evaluation"]
    if not feeds:
        return {"note": "no evaluation data"}
    ref_out = evaluate.run_batches(ref, feeds)
    art_out = evaluate.run_batches(art, feeds)
    task = getattr(adapter, "task", "generic")
    result: dict[str, Any] = {"samples": len(feeds), "tokens": data["eval_tokens"], "source": data["source"]}
    if task == "causal-lm":
        result.update(evaluate.lm_metrics(ref_out, art_out, data["eval_ids"]))
        bos = adapter.tokenizer.bos_id
        prompt = [bos] if bos is not None else data["eval_ids"][0][0, :4].tolist()
        g_ref = evaluate.greedy(ref, prompt, GENERATE_TOKENS)
        g_art = evaluate.greedy(art, prompt, GENERATE_TOKENS)
        same = next((i for i, (a, b) in enumerate(zip(g_ref, g_art)) if a != b), len(g_ref))
        result["generation"] = {
            "prompt_tokens": prompt,
            "tokens": GENERATE_TOKENS,
            "matching_prefix": same,
            "fp32_text": adapter.tokenizer.decode(g_ref),
            "text": adapter.tokenizer.decode(g_art),
        }
    else:
        result.update(evaluate.output_metrics(ref_out, art_out))
    return result


def _latency(ref, art, adapter, data, model) -> dict[str, Any]:
    feeds = {}
    source = data["evaluation"] or data["calibration"]
    if getattr(adapter, "task", None) in ("causal-lm", "encoder"):
        for t in (1, 128):
            ids = [[1 + (i % 100) for i in range(t)]]
            feeds[f"T={t}"] = adapter.make_inputs(ids)
    else:
        feeds["example"] = source[0]
    out = evaluate.latency_comparison(ref, art, feeds, repeats=15)
    out["threads"] = ref.get_session_options().intra_op_num_threads
    return out


def _check_drop(accuracy: dict[str, Any], max_drop: float | None) -> None:
    if max_drop is None:
        return
    if "perplexity_increase" in accuracy:
        drop, what = accuracy["perplexity_increase"], "perplexity increase"
    elif "cosine_mean" in accuracy:
        drop, what = 1.0 - accuracy["cosine_mean"], "1 - cosine similarity"
    else:
        raise InputError("--max-drop needs evaluation data, and this compile has none")
    if drop > max_drop:
        raise AccuracyError(f"{what} {drop:.2%} exceeds --max-drop {max_drop:.2%}; no artifact written")


def _io(v: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
    return {"name": v.name, "shape": shape, "dtype": v.dtype.name if v.dtype is not None else None}


def _weight_bytes(model: ir.Model) -> int:
    return int(sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def summary_text(m: dict[str, Any]) -> str:
    """A few human lines: what was compiled, how it measures against fp32."""
    acc, lat, size = m["accuracy"], m.get("latency") or {}, m["size"]
    plan = m.get("plan") or {"layers": {}}
    counts: dict[str, int] = {}
    for lp in plan["layers"].values():
        counts[lp["precision"]] = counts.get(lp["precision"], 0) + 1
    lines = [
        f"lowbit {m['lowbit']} — {m['model']['name']} ({m['model']['task']}), recipe {m['recipe']['name']}, backend {m['backend']}",
        "layers: " + (", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "none planned"),
        f"weights: {size['weight_bytes'] / 1e6:.2f} MB ({size['ratio']:.2f}x of fp32 {size['fp32_weight_bytes'] / 1e6:.2f} MB)",
    ]
    if "perplexity" in acc:
        lines.append(
            f"accuracy on {acc['samples']} held-out samples ({acc['tokens']} tokens): perplexity {acc['perplexity']:.4g} "
            f"vs fp32 {acc['perplexity_fp32']:.4g} ({acc['perplexity_increase']:+.2%}), KL {acc['kl']:.2e}, "
            f"top-1 agreement {acc['top1_agreement']:.2%}"
        )
        gen = acc.get("generation")
        if gen:
            lines.append(f"greedy generation: {gen['matching_prefix']}/{gen['tokens']} tokens match fp32")
    elif "cosine_mean" in acc:
        lines.append(f"accuracy on {acc['samples']} held-out samples: cosine vs fp32 mean {acc['cosine_mean']:.5f}, min {acc['cosine_min']:.5f}")
    elif acc.get("note"):
        lines.append(f"accuracy: {acc['note']}")
    for label, row in lat.items():
        if isinstance(row, dict):
            lines.append(f"latency {label}: {row['ms']:.2f} ms vs fp32 {row['fp32_ms']:.2f} ms ({row['speedup']:.2f}x)")
    lines.append(f"compiled in {m['compile_seconds']:.1f} s")
    return "\n".join(lines) + "\n"
