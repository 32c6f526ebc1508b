"""4-bit side by side: fp32 vs ONNX Runtime's MatMulNBits quantizers vs lowbit w4a16 / w4a8 / w8a8.

For each model (stories260K and SmolLM2-135M by default), in one process and one run:

1. export the fp32 ONNX once with lowbit's frontend — every method starts from this file;
2. cut the model's text (TinyStories for stories260K, Python's ``pydoc_data.topics`` prose for
   SmolLM2) into disjoint calibration and held-out windows with
   ``lowbit.compiler.core.data.split_text`` — every method calibrates on the same windows and is
   evaluated on the same held-out windows;
3. quantize it, timing each (wall), all 4-bit methods at the model's judged block size
   (32 for stories260K; 128 for SmolLM2-135M, whose weights came from Q4_1 blocks of 32, so
   4-bit group 32 asymmetric is lossless on it by construction):

   * ``ort-default``, ``ort-rtn``, ``ort-hqq``, ``ort-gptq``:
     ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` with
     ``DefaultWeightOnlyQuantConfig`` (ORT's own block-wise round-to-nearest),
     ``RTNWeightOnlyQuantConfig``, ``HQQWeightOnlyQuantConfig`` and ``GPTQWeightOnlyQuantConfig``
     (calibrated on the calibration windows; its other options at ORT's defaults), symmetric
     except HQQ (which always fits a zero point), all written as ``MatMulNBits`` with
     ``accuracy_level`` 4 (HQQ's quantizer writes none, so it is set on its nodes afterwards);
   * ``ort-default-head``: ORT's default with the output layer (the LM head) left in fp32
     (``nodes_to_exclude``), the peer of lowbit's w4a16, which keeps that layer at 8 bits;
   * ``lowbit-w4a16``, ``lowbit-w4a8``: ``lowbit.compile(fp32.onnx, recipe=...)`` with
     ``plan.group_size`` set to the block size;
   * the w4a8 recipe with its rotation toggled (``fold-norms`` + ``rotate`` taken out, or put in
     after ``canonicalize`` as ``w8a8.toml`` has them): a recipe file written to the output
     folder, so the rotation's effect is measured with everything else equal;
   * ``lowbit-w8a8``;

4. measure every method against fp32 on the held-out windows: perplexity and its increase,
   KL(fp32 || method), top-1 agreement. ``accuracy_level`` 4 quantizes activations to int8
   inside the kernel (per row and block), so the ORT rows measure 4-bit weights *and* int8
   activations, like lowbit ``w4a8``; the same ORT models are also measured with
   ``accuracy_level`` 0 (fp32 compute, the weights unchanged), which is what lowbit ``w4a16``
   (lowered with ``accuracy_level`` 0) compares with;
5. time one forward pass (batch 1, T=1 and T=128, intra_op_num_threads=2) of all methods
   interleaved round-robin, reporting the median of the rounds' medians and the speedup vs fp32;
6. report size on disk and the ratio vs fp32, and PASS/FAIL lines for lowbit's targets.

Usage::

    python -m benchmarks.compare_4bit [--models stories260K smollm2-135m] [--methods ...] [--out benchmarks/out] [--reuse] [--quick]
    python -m benchmarks.compare_4bit --render A.json [B.json ...]   # markdown and RESULTS.md only

Each method's accuracy is measured right after it is quantized and the JSON is written as the run
goes, so a run cut short keeps what it measured; ``--reuse`` starts again from the fp32 export and
the models a stopped run left in ``--out``, each only if the tree that built it is this one (the
same commit, neither with uncommitted changes: ``benchmarks.harness.check_reuse``); any other is
built again.

Writes ``<out>/compare_4bit.json`` and ``.md`` and replaces the section "## 4-bit: lowbit vs ONNX
Runtime's MatMulNBits quantizers" of ``benchmarks/RESULTS.md`` (other sections are kept);
``--quick`` (few samples and repeats, a smoke run) writes ``compare_4bit_quick.*`` and leaves
RESULTS.md alone unless ``--results`` names a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import time
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import OUT as DEFAULT_OUT
from benchmarks.harness import (
    REPO,
    THREADS,
    CaptureWarnings,
    MethodRegistry,
    WindowReader,
    accuracy,
    accuracy_summary,
    clear_stamp,
    e2e_settings,
    export_fp32,
    failed_row,
    finish_record,
    fmt_ms,
    heldout_windows,
    latency_round_robin,
    latency_settings,
    latency_text,
    log,
    onnx_disk_bytes,
    op_counts,
    parse_setting,
    provenance_lines,
    ratio,
    relative_paths,
    render_from,
    results_target,
    reuse_allowed,
    run_record,
    save_progress,
    short_error,
    stamp_artifact,
    table,
    target_line,
    write_json,
    write_outputs,
)

SHARED = REPO.parent / "shared"
SECTION = "## 4-bit: lowbit vs ONNX Runtime's MatMulNBits quantizers"
SEQ_LEN = 128
ACCURACY_LEVEL = 4
WEIGHT_ONLY_PEER = "ort-default@accuracy_level0"  # timed only: ORT default's model with fp32 compute
ORT_METHODS = ["ort-default", "ort-rtn", "ort-hqq", "ort-gptq", "ort-default-head"]
LOWBIT_METHODS = ["lowbit-w4a16", "lowbit-w4a8", "lowbit-w4a8-toggled", "lowbit-w8a8"]

# Per model: where it comes from, its text, the block size 4-bit weights are judged at, and the
# targets (the largest perplexity increase allowed, and whether rotation must at least halve w4a8's).
MODELS: dict[str, dict[str, Any]] = {
    "stories260K": {
        "source": SHARED / "models" / "stories260K" / "stories260K.bin",
        "text": SHARED / "data" / "tinystories.txt",
        "block": 32,
        "title": "stories260K (llama2.c, TinyStories)",
        "max_increase": {"lowbit-w4a16": 0.04, "lowbit-w8a8": 0.003},
        "rotation_halves": False,
        "lowbit_4bit_settings": {},  # the recipes' own symmetry
    },
    "smollm2-135m": {
        "source": "smollm2-135m",
        "text": None,
        "block": 128,
        "title": "SmolLM2-135M",
        "max_increase": {"lowbit-w8a8": 0.02, "lowbit-w4a16": 0.12, "lowbit-w4a8": 0.20},
        "rotation_halves": True,
        "lowbit_4bit_settings": {"plan.symmetric": True},  # judged symmetric, like the peers
    },
}
DEFAULT_MODELS = list(MODELS)


# ---------------------------------------------------------------------------------------
# ONNX Runtime's MatMulNBits quantizers
# ---------------------------------------------------------------------------------------
def set_accuracy_level(src: Path, dst: Path, level: int) -> int:
    """Copy ``src`` to ``dst`` with every MatMulNBits' ``accuracy_level`` set to ``level``
    (a run-time choice of the kernel; the stored weights stay the same). Returns the node count."""
    import onnx

    model = onnx.load(str(src))
    count = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
            count += 1
    onnx.save(model, str(dst))
    return count


def output_layers(fp32: Path) -> list[str]:
    """Node names of the output layers (LM head) of ``fp32``, as lowbit's ``output_precision`` finds them."""
    import onnx_ir as ir

    from lowbit.passes.recognize import find_linears, is_output_linear

    return [lin.node.name for lin in find_linears(ir.load(fp32).graph)[0] if is_output_linear(lin)]


def ort_nbits(algorithm: str, keep_head: bool = False) -> Callable[[Path, Path, dict[str, Any]], dict[str, Any]]:
    """ORT's quantizer with ``algorithm``; ``keep_head``: the output layer left in fp32 (``nodes_to_exclude``),
    the peer of lowbit's w4a16, which keeps it at 8 bits."""

    def run(fp32: Path, folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        mnq.logger.setLevel(logging.WARNING)  # it logs every node at INFO
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "model.onnx"
        block = ctx["block"]
        symmetric = algorithm != "hqq"
        if algorithm == "default":
            config = mnq.DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=4
            )
            call = f"DefaultWeightOnlyQuantConfig(block_size={block}, is_symmetric=True, accuracy_level=4, bits=4)"
        elif algorithm == "rtn":
            config = mnq.RTNWeightOnlyQuantConfig()
            call = "RTNWeightOnlyQuantConfig()"
        elif algorithm == "hqq":
            config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
            call = f"HQQWeightOnlyQuantConfig(block_size={block}, bits=4) (asymmetric: HQQ fits a zero point)"
        elif algorithm == "gptq":
            config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=WindowReader(ctx["calib_feeds"]))
            call = (f"GPTQWeightOnlyQuantConfig(calibration_data_reader=<{len(ctx['calib_feeds'])} calibration windows>) "
                    "(percdamp 0.01, actorder False, mse False, perchannel True: ORT's defaults)")
        else:
            raise ValueError(algorithm)
        exclude = output_layers(fp32) if keep_head else []
        with CaptureWarnings() as cap:
            start = time.perf_counter()
            quant = mnq.MatMulNBitsQuantizer(
                str(fp32), bits=4, block_size=block, is_symmetric=symmetric, accuracy_level=ACCURACY_LEVEL,
                nodes_to_exclude=exclude, algo_config=config,
            )
            quant.process()
            quant.model.save_model_to_file(str(out), False)
            seconds = time.perf_counter() - start
        info: dict[str, Any] = {
            "path": out,
            "quantize_seconds": seconds,
            "call": f"MatMulNBitsQuantizer(fp32, bits=4, block_size={block}, is_symmetric={symmetric}, "
                    f"accuracy_level=4, nodes_to_exclude={exclude}, algo_config={call})",
            "symmetric": symmetric,
            "ort_warnings": cap.messages,
        }
        levels = nbits_accuracy_levels(out)
        if set(levels) != {ACCURACY_LEVEL}:
            # HQQ's quantizer ignores accuracy_level: set it on the nodes it wrote
            set_accuracy_level(out, out, ACCURACY_LEVEL)
            info["accuracy_level_set_afterwards"] = {str(k): v for k, v in levels.items()}
        # the same weights with fp32 compute, for the weight-only accuracy
        acc0 = folder / "accuracy_level0.onnx"
        set_accuracy_level(out, acc0, 0)
        info["path_accuracy_level0"] = acc0
        return info

    return run


def nbits_accuracy_levels(path: Path) -> dict[int, int]:
    """accuracy_level -> number of MatMulNBits nodes with it (absent counts as 0)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: dict[int, int] = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            lvl = next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            out[lvl] = out.get(lvl, 0) + 1
    return out


def zero_point_types(path: Path) -> set[str]:
    """Element types of the MatMulNBits zero points in ``path`` (empty if none or unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a report must not fail on this
        return set()
    types = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer}
    return {types[n.input[3]] for n in model.graph.node
            if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3] in types}


# ---------------------------------------------------------------------------------------
# lowbit
# ---------------------------------------------------------------------------------------
_ROTATION_PASSES = ("fold-norms", "rotate")


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans read the same in TOML


def recipe_toml(data: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for section in ("calibration", "evaluation"):
        if section in data:
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[section].items()]
    for p in data["passes"]:
        lines += ["", "[[passes]]"] + [f"{k} = {_toml_value(v)}" for k, v in p.items()]
    return "\n".join(lines) + "\n"


def rotates(recipe: str) -> bool:
    from lowbit.compiler.core.recipe import builtin_recipes

    data = tomllib.loads(builtin_recipes()[recipe].read_text())
    return any(p.get("pass") == "rotate" for p in data["passes"])


def toggled_rotation_recipe(recipe: str, folder: Path) -> tuple[Path, bool]:
    """A copy of built-in ``recipe`` with the rotation toggled: without ``fold-norms`` and
    ``rotate`` if it has them, else with them after ``canonicalize`` (options as ``w8a8`` has
    them). Returns (path, whether the copy rotates)."""
    from lowbit.compiler.core.recipe import builtin_recipes

    files = builtin_recipes()
    data = tomllib.loads(files[recipe].read_text())
    passes = data["passes"]
    if any(p.get("pass") == "rotate" for p in passes):
        data["passes"] = [p for p in passes if p.get("pass") not in _ROTATION_PASSES]
        data["name"], with_rotation = f"{recipe}-unrotated", False
    else:
        donor = tomllib.loads(files["w8a8"].read_text())["passes"]
        extra = [p for p in donor if p.get("pass") in _ROTATION_PASSES] or [{"pass": p} for p in _ROTATION_PASSES]
        at = next((i + 1 for i, p in enumerate(passes) if p.get("pass") == "canonicalize"), 0)
        data["passes"] = passes[:at] + extra + passes[at:]
        data["name"], with_rotation = f"{recipe}-rotated", True
    data["description"] = f"{recipe} with the residual-stream rotation {'added' if with_rotation else 'removed'}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.toml"
    path.write_text(recipe_toml(data))
    return path, with_rotation


def lowbit_method(recipe: str, *, four_bit: bool, toggle_rotation: bool = False) -> Callable[..., dict[str, Any]]:
    def run(fp32: Path, folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from lowbit.compiler.driver import compile as lowbit_compile

        if folder.exists():
            shutil.rmtree(folder)
        recipe_arg: str | Path = recipe
        with_rotation = rotates(recipe)
        if toggle_rotation:
            recipe_arg, with_rotation = toggled_rotation_recipe(recipe, folder.parent / f"{folder.name}-recipe")
        settings = {"calibration.samples": ctx["calib_samples"], "evaluation.samples": ctx["eval_samples"]}
        if four_bit:
            settings["plan.group_size"] = ctx["block"]  # rotate.learn_group_size follows it (LINKED_OPTIONS)
            settings.update(ctx["lowbit_4bit_settings"])
        settings.update(ctx["lowbit_settings"])
        start = time.perf_counter()
        res = lowbit_compile(
            str(fp32), folder, recipe=recipe_arg, calib_data=ctx["text"], settings=settings,
            tokenizer=ctx["adapter"].tokenizer, measure_latency=False, progress=False, threads=THREADS,
        )
        seconds = time.perf_counter() - start
        m = res.manifest
        return {
            "path": folder / "model.onnx",
            "quantize_seconds": seconds,
            "pipeline_seconds": m.get("compile_seconds"),
            "recipe": str(recipe_arg if isinstance(recipe_arg, str) else os.path.relpath(recipe_arg, REPO)),
            "rotation": with_rotation,
            "pass_names": [p.get("pass") for p in (m.get("recipe") or {}).get("passes", [])],
            "call": f"lowbit.compile(fp32.onnx, out, recipe={recipe_arg if isinstance(recipe_arg, str) else recipe_arg.name!r}, "
                    f"settings={settings})",
            "settings": settings,
            "passes": [{"pass": p.get("pass"), "seconds": p.get("seconds")} for p in m.get("passes", [])],
            "lowbit_own_accuracy": {k: v for k, v in (m.get("accuracy") or {}).items() if k != "generation"},
        }

    return run


#: the quantizers, each ``(fp32 path, output folder, context) -> info``; fp32 itself is the reference
QUANTIZERS = MethodRegistry()
QUANTIZERS.register("ort-default", ort_nbits("default"), label="ORT default (RTN, C++)")
QUANTIZERS.register("ort-rtn", ort_nbits("rtn"), label="ORT RTN")
QUANTIZERS.register("ort-hqq", ort_nbits("hqq"), label="ORT HQQ (asymmetric)")
QUANTIZERS.register("ort-gptq", ort_nbits("gptq"), label="ORT GPTQ")
QUANTIZERS.register("ort-default-head", ort_nbits("default", keep_head=True), label="ORT default, LM head fp32")
QUANTIZERS.register("lowbit-w4a16", lowbit_method("w4a16", four_bit=True), label="lowbit w4a16")
QUANTIZERS.register("lowbit-w4a8", lowbit_method("w4a8", four_bit=True), label="lowbit w4a8")
QUANTIZERS.register("lowbit-w4a8-toggled", lowbit_method("w4a8", four_bit=True, toggle_rotation=True))  # label(): by its rotation
QUANTIZERS.register("lowbit-w8a8", lowbit_method("w8a8", four_bit=False), label="lowbit w8a8")
assert QUANTIZERS.names() == ORT_METHODS + LOWBIT_METHODS
METHODS = ["fp32", *QUANTIZERS]


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
def load_fp32(spec: dict[str, Any], folder: Path, reuse: bool, tree: dict[str, Any] | None = None) -> tuple[Path, Any, float | None]:
    """The shared fp32 export, or with ``reuse`` the one an earlier run left in ``folder`` (the
    adapter, for the tokenizer and inputs, is then loaded without exporting). ``tree``: the
    tree this run started in, for the stamp of a new export (None: leave no stamp)."""
    path = folder / "model.onnx"
    if reuse and path.is_file():
        from lowbit.models import load_model

        adapter = load_model(str(spec["source"]))
        adapter.module = None
        adapter.hf_model = None
        gc.collect()
        return path, adapter, None
    clear_stamp(folder)
    exported = export_fp32(str(spec["source"]), folder)
    if tree is not None:
        stamp_artifact(folder, tree)
    return exported


def reused_method(folder: Path) -> dict[str, Any] | None:
    """What an earlier run left for a method: its info.json, or (ORT) a bare model.onnx, or (lowbit) an artifact."""
    if (folder / "info.json").is_file():
        return json.loads((folder / "info.json").read_text()) | {"reused": True}
    if (folder / "model.onnx").is_file():
        info: dict[str, Any] = {"path": str(folder / "model.onnx"), "quantize_seconds": None, "reused": True}
        if (folder / "accuracy_level0.onnx").is_file():
            info["path_accuracy_level0"] = str(folder / "accuracy_level0.onnx")
        if (folder / "manifest.json").is_file():  # a lowbit artifact: what its manifest records
            m = json.loads((folder / "manifest.json").read_text())
            names = [p.get("pass") for p in m.get("recipe", {}).get("passes", [])]
            info.update(
                pipeline_seconds=m.get("compile_seconds"), recipe=m.get("recipe", {}).get("name"), pass_names=names,
                rotation="rotate" in names, settings={}, lowbit_own_accuracy={
                    k: v for k, v in (m.get("accuracy") or {}).items() if k != "generation"},
            )
        return info
    return None


def bench_model(name: str, root: Path, cfg: dict[str, Any], args: argparse.Namespace, save: Callable[[], None]) -> dict[str, Any]:
    """Quantize with every method, measuring each method's accuracy right after it (so a run
    cut short keeps what it measured; ``save`` writes the JSON so far), then latency of all.
    With ``--reuse``, an export or model an earlier run left is taken only if the tree that
    built it is this one (``check_reuse``); the others are built again."""
    from lowbit.compiler.core import evaluate
    from lowbit.compiler.core.ortsession import make_session

    spec = MODELS[name]
    work = root / "compare_4bit" / name
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    block = spec["block"]
    record: dict[str, Any] = {"name": name, "title": spec["title"], "block": block, "methods": {}}
    args.record_sink[name] = record

    log(f"{name}: fp32 ONNX" + (" (reusing an earlier export if there is one)" if args.reuse else ""))
    reuse_fp32 = args.reuse and (work / "fp32" / "model.onnx").is_file() and reuse_allowed(work / "fp32", args.tree)
    fp32_path, adapter, export_s = load_fp32(spec, work / "fp32", reuse_fp32, args.tree)
    record.update(task=adapter.task, export_seconds=export_s, source=str(spec["source"]))
    fp32_bytes = onnx_disk_bytes(fp32_path)
    log(f"{name}: fp32 ready" + (f", exported in {export_s:.1f} s" if export_s is not None else " (reused)")
        + f" ({fp32_bytes / 1e6:.1f} MB)")

    win = heldout_windows(adapter, spec["text"], cfg, SEQ_LEN)
    calib_feeds, eval_feeds, eval_ids, lat_feeds = win.calib_feeds, win.eval_feeds, win.eval_ids, win.latency_feeds
    record["data"] = win.record

    ctx = {
        "adapter": adapter, "calib_feeds": calib_feeds, "block": block, "text": spec["text"],
        "calib_samples": cfg["calib_samples"], "eval_samples": cfg["eval_samples"],
        "lowbit_settings": dict(args.lowbit_setting or {}), "lowbit_4bit_settings": spec["lowbit_4bit_settings"],
    }

    log(f"{name}: fp32 reference on {len(eval_feeds)} held-out windows")
    ref_out = evaluate.run_batches(make_session(fp32_path, threads=THREADS), eval_feeds)

    def measure(path: Path) -> dict[str, Any]:
        try:
            out = evaluate.run_batches(make_session(path, threads=THREADS), eval_feeds)
            return accuracy(record["task"], ref_out, out, eval_ids)
        except Exception as e:
            return {"error": short_error(e)}

    def finish(method: str, info: dict[str, Any]) -> None:
        """Size, operators and accuracy of a method's model, logged and saved."""
        try:
            info["size_bytes"] = onnx_disk_bytes(Path(info["path"]))
            info["size_ratio"] = info["size_bytes"] / fp32_bytes
            info["ops"] = op_counts(Path(info["path"]))
            info["nbits_accuracy_levels"] = nbits_accuracy_levels(Path(info["path"]))
        except Exception as e:
            info["error"] = f"model: {short_error(e)}"
            return
        info["accuracy"] = (accuracy(record["task"], ref_out, ref_out, eval_ids) if method == "fp32"
                            else measure(Path(info["path"])))
        if "path_accuracy_level0" in info:
            info["accuracy_level0"] = measure(Path(info["path_accuracy_level0"]))
        a, a0 = info["accuracy"], info.get("accuracy_level0", {})
        if "perplexity" in a or "error" in a:
            log(f"  {method}: {accuracy_summary(a)}"
                + (f"; accuracy_level 0: {a0['perplexity_increase']:+.3%}" if "perplexity_increase" in a0 else ""))

    record["methods"]["fp32"] = info = {"path": fp32_path, "quantize_seconds": 0.0,
                                        "call": "lowbit frontend export (shared input of all methods)"}
    finish("fp32", info)
    for method in args.methods:
        folder = work / method
        # a model built from another export, or by another tree, is not this run's to reuse
        info = None
        if args.reuse and folder.is_dir():
            if export_s is not None:
                log(f"not reusing {os.path.relpath(folder, REPO)}: the fp32 export it was built from was built again")
            elif reuse_allowed(folder, args.tree):
                info = reused_method(folder)
        if info is not None:
            info["reused_from_commit"] = args.tree.get("commit")  # check_reuse passed: this clean commit built it
            log(f"{name}: {method}: reusing {os.path.relpath(folder, REPO)}")
        else:
            clear_stamp(folder)
            info = QUANTIZERS.run(method, fp32_path, folder, ctx, prefix=f"{name}: ", print_traceback=True)
            if "error" not in info:
                write_json(folder / "info.json", info)
                stamp_artifact(folder, args.tree)
        record["methods"][method] = info
        if "error" not in info:
            finish(method, info)
        gc.collect()
        save()
    ref_out = None  # free the fp32 logits before the latency runs
    gc.collect()

    sessions = {}
    for method, info in record["methods"].items():
        if "error" in info or "error" in info.get("accuracy", {}):
            continue
        try:
            sessions[method] = make_session(info["path"], threads=THREADS)
        except Exception as e:
            log(f"{name}: {method}: ORT cannot load the model: {short_error(e)}")
    if "ort-default" in sessions:  # ORT's weight-only compute: what lowbit w4a16 (float activations) runs
        sessions[WEIGHT_ONLY_PEER] = make_session(record["methods"]["ort-default"]["path_accuracy_level0"], threads=THREADS)
    reps = cfg["repeats"]
    log(f"{name}: latency, {cfg['rounds']} interleaved rounds x {reps} repeats per method")
    record["latency"] = latency_round_robin(sessions, lat_feeds, cfg["rounds"], reps)
    record["latency_settings"] = latency_settings(cfg["rounds"], reps)
    del sessions
    gc.collect()
    relative_paths(record["methods"], ("path", "path_accuracy_level0"))
    return record


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
LABELS = {"fp32": "fp32", **{m: lbl for m, lbl in QUANTIZERS.labels().items() if m != "lowbit-w4a8-toggled"}}


def current_w4a8() -> list[str]:
    """The pass names of the w4a8 recipe in this tree (read when rendering)."""
    from lowbit.compiler.core.recipe import load_recipe

    return [p.name for p in load_recipe("w4a8").passes]


def shipped_w4a8(rec: dict[str, Any]) -> str:
    """Which of the two measured w4a8 variants has the passes of the w4a8 recipe in this tree."""
    now = current_w4a8()
    for m in ("lowbit-w4a8", "lowbit-w4a8-toggled"):
        if rec["methods"].get(m, {}).get("pass_names") == now:
            return m
    return "lowbit-w4a8"


def plan_symmetric(info: dict[str, Any]) -> bool | None:
    """Whether a lowbit artifact's weights are symmetric, from its manifest's resolved plan options."""
    try:
        m = json.loads((REPO / info["path"]).with_name("manifest.json").read_text())
    except (KeyError, OSError, ValueError):
        return None
    return next((p.get("symmetric") for p in m.get("recipe", {}).get("passes", []) if p.get("pass") == "plan"), None)


def label(rec: dict[str, Any], method: str) -> str:
    info = rec["methods"].get(method, {})
    sym = plan_symmetric(info) if method.startswith("lowbit-w4") else None
    weights = "" if sym is None else (", symmetric" if sym else ", asymmetric")
    if method in ("lowbit-w4a8", "lowbit-w4a8-toggled"):
        if "rotation" not in info:
            return "lowbit w4a8" + (" (rotation toggled)" if method.endswith("toggled") else "")
        rotation = ("rotated (learned)" if _learned_rotation(info) else "rotated") if info["rotation"] else "unrotated"
        return f"lowbit w4a8, {rotation}{weights}" + (
            " (the w4a8 recipe)" if shipped_w4a8(rec) == method else "")
    return LABELS[method] + (f" ({weights.removeprefix(', ')})" if weights else "")


def _learned_rotation(info: dict[str, Any]) -> bool:
    """Whether the artifact's manifest says its rotation was learned (``rotate.learn_steps``) and kept."""
    manifest = Path(info.get("path", "")).parent / "manifest.json"
    if not manifest.is_file():
        return False
    notes = json.loads(manifest.read_text()).get("notes", {}).get("rotate", {})
    return str(notes.get("rotation", "")).endswith(", learned")


def _ppl(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "—"
    if "error" in acc:
        return f"error: {acc['error'][:60]}"
    return f"{acc['perplexity']:.3f} ({acc['perplexity_increase']:+.2%})"


def model_table(rec: dict[str, Any]) -> list[str]:
    head = ["method", "quantize time", "size MB (vs fp32)", "perplexity (increase)", "KL vs fp32", "top-1 agree",
            "perplexity at accuracy_level 0", "T=1 ms (speedup)", "T=128 ms (speedup)"]
    rows: list[list[str] | str] = []
    for m in METHODS:
        info = rec["methods"].get(m)
        if info is None:
            continue
        if "error" in info:
            rows.append(failed_row(label(rec, m), info["error"], len(head)))
            continue
        if m == "fp32":
            qt = f"(export {rec['export_seconds']:.0f} s)" if rec.get("export_seconds") is not None else "(export reused)"
        elif info.get("quantize_seconds") is None:
            qt = "(reused)"
        else:
            qt = f"{info['quantize_seconds']:.1f} s" + (" ¹" if info.get("pipeline_seconds") is not None else "") + (
                " ²" if info.get("reused") else "")
        acc = info.get("accuracy", {})
        row = [label(rec, m), qt, f"{info['size_bytes'] / 1e6:.2f} ({info['size_ratio']:.2f}x)", _ppl(acc)]
        row += [f"{acc['kl']:.4f}", f"{acc['top1_agreement']:.2%}"] if "kl" in acc else ["", ""]
        row.append(_ppl(info.get("accuracy_level0")) if "accuracy_level0" in info else "—")
        lat = rec.get("latency", {})
        row += [fmt_ms(lat.get("T=1", {}).get(m)), fmt_ms(lat.get("T=128", {}).get(m))]
        rows.append(row)
    return table(head, rows)


def _increase(info: dict[str, Any] | None, key: str = "accuracy") -> float | None:
    return ((info or {}).get(key) or {}).get("perplexity_increase")


def ort_best(rec: dict[str, Any], key: str) -> tuple[str, float] | None:
    """(method, perplexity increase) of the ORT method with the lowest increase under ``key``."""
    found = [(m, _increase(rec["methods"].get(m), key)) for m in ORT_METHODS]
    found = [(m, x) for m, x in found if x is not None]
    return min(found, key=lambda t: t[1]) if found else None


def targets(results: dict[str, Any]) -> list[str]:
    """PASS/FAIL lines for the stated targets, from the measured numbers."""
    lines = []
    for rec in results["models"].values():
        if "methods" not in rec:
            continue
        spec = MODELS[rec["name"]]
        name, block = rec["name"], rec["block"]
        for target, limit in spec["max_increase"].items():
            method = shipped_w4a8(rec) if target == "lowbit-w4a8" else target
            x = _increase(rec["methods"].get(method))
            ref_key = "accuracy_level0" if method == "lowbit-w4a16" else "accuracy"
            best = ort_best(rec, ref_key) if method != "lowbit-w8a8" else None
            ref = (f"; best ORT 4-bit configuration: {LABELS[best[0]]} {best[1]:+.2%}"
                   + (" (accuracy_level 0)" if ref_key == "accuracy_level0" else " (accuracy_level 4)")) if best else ""
            what = label(rec, method).removeprefix("lowbit ") + (f", group {block}" if method != "lowbit-w8a8" else "")
            if x is None:
                lines.append(target_line(None, f"{name}: lowbit {what} perplexity not measured (the method failed or was not run)"))
            else:
                lines.append(target_line(x <= limit, f"{name}: lowbit {what} perplexity increase "
                                                     f"{x:+.2%} <= {limit:+.1%}{ref}"))
        if spec["rotation_halves"]:
            rot, unrot = rotation_pair(rec)
            if rot is None or unrot is None:
                lines.append(target_line(None, f"{name}: rotation effect on w4a8 not measured"))
            else:
                lines.append(target_line(rot <= unrot / 2, f"{name}: rotation at least halves w4a8's "
                                                           f"perplexity increase: {rot:+.2%} with rotation vs {unrot:+.2%} without "
                                                           f"(limit {unrot / 2:+.2%})"))
        lat = rec.get("latency", {}).get("T=1", {})
        peers = [(lat[m]["ms"], m) for m in ORT_METHODS if m in lat]
        if peers:
            ms, peer = min(peers)
            for m in ("lowbit-w4a16", shipped_w4a8(rec)):
                if m in lat:
                    x = lat[m]["ms"]
                    spread = (f"; round medians {min(lat[m]['round_medians_ms']):.2f}-{max(lat[m]['round_medians_ms']):.2f} "
                              f"vs {min(lat[peer]['round_medians_ms']):.2f}-{max(lat[peer]['round_medians_ms']):.2f} ms"
                              if lat[m].get("round_medians_ms") and lat[peer].get("round_medians_ms") else "")
                    lines.append(target_line(x <= ms, f"{name}: {label(rec, m)} T=1 "
                                             f"{x:.2f} ms <= the fastest ORT MatMulNBits (accuracy_level 4, block {block}), "
                                             f"{LABELS[peer]} {ms:.2f} ms ({ratio(lat, m, peer):.2f}x{spread})"))
        if "lowbit-w4a16" in lat and WEIGHT_ONLY_PEER in lat:
            x, ms = lat["lowbit-w4a16"]["ms"], lat[WEIGHT_ONLY_PEER]["ms"]
            lines.append(f"(reference, not a target) {name}: {label(rec, 'lowbit-w4a16')} T=1 {x:.2f} ms against ORT's "
                         f"weight-only compute (ORT default at accuracy_level 0, the same weight-only arithmetic) "
                         f"{ms:.2f} ms ({ratio(lat, 'lowbit-w4a16', WEIGHT_ONLY_PEER):.2f}x)")
    return lines


def rotation_pair(rec: dict[str, Any]) -> tuple[float | None, float | None]:
    """(w4a8 perplexity increase with rotation, without), from the recipe and its toggled copy."""
    shipped, toggled = rec["methods"].get("lowbit-w4a8", {}), rec["methods"].get("lowbit-w4a8-toggled", {})
    if "rotation" not in shipped or "rotation" not in toggled:
        return None, None
    a, b = _increase(shipped), _increase(toggled)
    return (a, b) if shipped["rotation"] else (b, a)


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    for rec in results["models"].values():
        if "methods" not in rec:
            continue
        name = rec["name"]
        for m, info in rec["methods"].items():
            if "error" in info:
                out.append(f"- {name} / {label(rec, m)} failed: `{info['error']}`")
        missing = [LABELS.get(m, m) for m in METHODS if m not in rec["methods"] and m != "lowbit-w4a8-toggled"]
        if missing:
            out.append(f"- {name}: not measured: {', '.join(missing)} (left out by the command's `--methods`, "
                       "or the run had not reached them when this was written).")
        counts = []
        fp32_matmuls = rec["methods"].get("fp32", {}).get("ops", {}).get("MatMul", 0)
        for m in METHODS:
            ops = rec["methods"].get(m, {}).get("ops")
            if ops and m != "fp32":
                counts.append(f"{label(rec, m)} {ops.get('MatMulNBits', 0)}")
        if counts:
            out.append(f"- {name}: MatMulNBits nodes per model (the fp32 graph has {fp32_matmuls} MatMul, "
                       "attention's included): " + "; ".join(counts) + ".")
        for m in ORT_METHODS:
            info = rec["methods"].get(m, {})
            a, a0 = info.get("accuracy", {}), info.get("accuracy_level0", {})
            if "perplexity" in a and a.get("perplexity") == a0.get("perplexity") and a.get("kl") == a0.get("kl"):
                zp = zero_point_types(REPO / info["path"]) if "path" in info else set()
                out.append(f"- {name} / {LABELS[m]}: accuracy_level 4 and 0 give identical outputs"
                           + (f" (its zero points are {'/'.join(sorted(zp))}; with them ORT's kernel evidently computes in "
                              "fp32 whatever the accuracy_level)" if zp and zp & {"FLOAT", "FLOAT16"} else "") + ".")
            if "accuracy_level_set_afterwards" in info:
                out.append(f"- {name} / {LABELS[m]}: the quantizer wrote accuracy_level "
                           f"{', '.join(info['accuracy_level_set_afterwards'])}; set to 4 afterwards.")
        for m in LOWBIT_METHODS:
            info = rec["methods"].get(m, {})
            own = info.get("lowbit_own_accuracy") or {}
            if "perplexity_increase" in own:
                out.append(f"- {name} / {label(rec, m)}: recipe `{info['recipe']}`, settings `{json.dumps(info['settings'])}`; "
                           "lowbit's own verification "
                           f"(its manifest, same split): perplexity increase {own['perplexity_increase']:+.2%}, "
                           f"KL {own['kl']:.4f}.")
    return out


def markdown(results: dict[str, Any]) -> str:
    blocks = ", ".join(f"{r['name']} {r['block']}" for r in results["models"].values() if "block" in r)
    lines = [
        SECTION,
        "",
        *provenance_lines(results),
        "",
        "All methods start from the same fp32 ONNX export (lowbit's frontend), calibrate on the same "
        f"{results['settings']['calib_samples']} windows and are measured on the same {results['settings']['eval_samples']} "
        f"held-out windows of {SEQ_LEN} tokens (`lowbit.compiler.core.data.split_text`, 80/20: TinyStories text for stories260K, "
        "Python's `pydoc_data.topics` prose for SmolLM2). 4-bit weights at one block size per model "
        f"({blocks}; SmolLM2's weights came from Q4_1 blocks of 32, so block 32 asymmetric would be lossless on it). "
        "Peers: `MatMulNBitsQuantizer(bits=4, block_size, is_symmetric=True, accuracy_level=4)` with ORT's default, RTN, "
        "HQQ (always asymmetric) and GPTQ (calibrated on the calibration windows, ORT's default options) configs, and "
        "ORT's default with the output layer (the LM head) left in fp32 (`nodes_to_exclude`): the peer of lowbit's "
        "w4a16, which keeps that layer at 8 bits (int8 weights per channel, int8 activations per token). "
        "accuracy_level 4 quantizes activations to int8 inside `MatMulNBits` (per row and block), so the peers' main "
        "accuracy columns are 4-bit weights with int8 activations (compare with lowbit w4a8); the column "
        "\"perplexity at accuracy_level 0\" is the same ORT model run with fp32 compute, i.e. weight-only "
        "(compare with lowbit w4a16, which is lowered with accuracy_level 0; ORT's default is also timed that way, "
        "for the reference line under the targets). lowbit: `recipe=\"w4a16\"` and `\"w4a8\"` "
        "with `plan.group_size` = the block size, the w4a8 recipe with its rotation toggled (a recipe file in the output "
        "folder), and `\"w8a8\"`. ORT's quantizers take MatMul weights only (the embedding table stays fp32); lowbit's "
        "recipes also store a large embedding table as int8 per row (`quantize-embeddings`), hence part of the size gap. "
        + latency_text(results["settings"]) + " Size: model.onnx + external data on disk. "
        "Quantize time: wall time from the fp32 ONNX file.",
        "",
    ]
    for rec in results["models"].values():
        lines.append(f"### {rec.get('title', rec['name'])}")
        lines.append("")
        if "methods" in rec:
            lines += model_table(rec)
            lines.append("")
        if "error" in rec:
            lines += [f"FAILED{' after the rows above' if 'methods' in rec else ''}: `{rec['error']}`", ""]
        elif "latency" not in rec:
            lines += ["(run still going or cut short: latency not measured yet)", ""]
    lines += ["Targets:", ""]
    lines += [f"- {t}" for t in targets(results)]
    lines += ["", "Notes:", ""]
    pipe = ", ".join(
        f"{r['name']} {label(r, k)} {v['pipeline_seconds']:.1f} s"
        for r in results["models"].values() for k, v in r.get("methods", {}).items() if v.get("pipeline_seconds") is not None
    )
    lines.append("- ¹ lowbit's time is the wall time of `lowbit.compile`, which includes its built-in verification against "
                 f"fp32 (held-out accuracy and a 32-token greedy generation); the pass pipeline alone: {pipe}.")
    reused = [v for r in results["models"].values() for v in r.get("methods", {}).values() if v.get("reused")]
    if reused:
        checked = all(v.get("reused_from_commit") for v in reused)  # runs before the reuse rule did not check the tree
        lines.append("- ² quantized by an earlier run of this script on the same fp32 export"
                     + (" and the same clean commit" if checked else "")
                     + " (`--reuse`); its time is that run's. Accuracy and latency are this run's.")
    lines += notes(results)
    lines.append("- Raw numbers (per-round latencies, op counts, the exact quantizer calls, ORT warnings): "
                 "`benchmarks/out/compare_4bit.json`.")
    return "\n".join(lines) + "\n"


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs (e.g. one model each): the models of all, the run details of
    the first, the commands, dates and total time of all; later runs win for a model in two."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    out["models"] = {k: v for r in runs for k, v in r["models"].items()}
    out["command"] = "`; `".join(r["command"] for r in runs)
    out["date"] = " / ".join(r["date"] for r in runs)
    out["total_seconds"] = sum(r.get("total_seconds", 0.0) for r in runs)
    out["load_average_at_end"] = runs[-1].get("load_average_at_end", out.get("load_average_at_end"))
    return out


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS), help="models (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "fp32"], choices=[m for m in METHODS if m != "fp32"],
                   help="methods besides fp32 (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/out)")
    p.add_argument("--quick", action="store_true", help="few samples and repeats: a smoke run")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the fp32 export and the quantized models an earlier run left in --out (their quantize "
                        "time is the earlier run's, or unknown); accuracy and latency are measured again. Only what "
                        "this tree built: the same commit, neither tree with uncommitted changes; the rest is built again")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file whose 4-bit section to replace (default: benchmarks/RESULTS.md; none with --quick)")
    p.add_argument("--lowbit-setting", type=parse_setting, action="append", metavar="PASS.OPTION=VALUE",
                   help="recipe option for every lowbit method (repeatable)")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="measure nothing: re-render the markdown (and the --results section) from JSONs this script wrote "
                        "(several: their models side by side, in the given order)")
    args = p.parse_args(argv)

    if args.render is not None:
        runs = [json.loads(path.read_text()) for path in args.render]
        results = merge_runs(runs)
        render_from(args.render[0], markdown(results), results_target(args.results, results["settings"].get("quick", False)))
        return 0

    cfg = e2e_settings(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = run_record(__spec__.name, argv, cfg | {"seq_len": SEQ_LEN, "threads": THREADS, "quick": args.quick, "accuracy_level": ACCURACY_LEVEL})
    log(f"compare_4bit: {', '.join(args.models)} ({'quick' if args.quick else 'full'} run); "
        f"{results['machine']['cores']} cores, {results['machine']['cpu']}, ORT {results['versions']['onnxruntime']}")
    stem = "compare_4bit_quick" if args.quick else "compare_4bit"
    args.record_sink = results["models"]
    args.tree = results["lowbit_tree"]  # the tree this run started in: the stamp of what it builds

    def save() -> None:
        save_progress(results, args.out / f"{stem}.json")

    for name in args.models:
        try:
            results["models"][name] = bench_model(name, args.out, cfg, args, save)
        except Exception as e:
            log(f"{name}: FAILED: {short_error(e)}")
            traceback.print_exc()
            rec = results["models"].setdefault(name, {"name": name, "title": MODELS[name]["title"]})
            rec.update(error=short_error(e), traceback=traceback.format_exc(limit=8))
        save()
    finish_record(results)
    write_outputs(results, args.out, stem, markdown(results), results_target(args.results, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
