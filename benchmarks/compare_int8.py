"""int8 side by side: fp32 vs ONNX Runtime's own quantization tool vs lowbit w8a8, on real models.

For each model (SmolLM2-135M, all-MiniLM-L6-v2 by default), in one process and one run:

1. export the fp32 ONNX once with lowbit's frontend (torch dynamo exporter) — every method
   starts from this same file;
2. cut the default text (Python's ``pydoc_data.topics`` prose) into disjoint calibration and
   held-out windows with ``lowbit.compiler.core.data.split_text`` — every method calibrates on the
   same windows and is evaluated on the same held-out windows;
3. quantize it three ways, timing each (wall):

   * ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic(per_channel=True,
     weight_type=QInt8)`` (int8 weights, activations quantized at run time);
   * ``ort-static-qdq``: ``quantize_static(quant_format=QDQ, per_channel=True)`` with ORT's
     defaults otherwise (MinMax calibration, QInt8 activations and weights, every op type ORT
     knows how to quantize), calibrated on the calibration windows;
   * ``lowbit-w8a8``: ``lowbit.compile(fp32.onnx, recipe="w8a8")`` (the whole pipeline,
     including its own calibration on the same default split and its built-in verification);

4. measure every method against fp32 on the held-out windows: perplexity, relative
   perplexity increase, KL(fp32 || method) and top-1 agreement for causal LMs; embedding
   cosine similarity (mean, min) for encoders;
5. time one forward pass (batch 1, T=1 and T=128, intra_op_num_threads=2) of all methods
   interleaved round-robin (several rounds, the starting method rotating), reporting the
   median of the rounds' medians and the speedup vs fp32;
6. report model size on disk (model.onnx + external data) and the ratio vs fp32.

Usage::

    python -m benchmarks.compare_int8 [--models smollm2-135m all-minilm-l6-v2] [--out benchmarks/out] [--quick]

Writes ``<out>/compare_int8.json`` and ``<out>/compare_int8.md``, and replaces the section
"## int8: lowbit w8a8 vs ONNX Runtime quantization" of ``benchmarks/RESULTS.md`` (other
sections are kept); ``--quick`` (few samples and repeats, a smoke run) writes
``compare_int8_quick.*`` and leaves RESULTS.md alone unless ``--results`` names a file.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.harness import OUT as DEFAULT_OUT
from benchmarks.harness import (
    THREADS,
    CaptureWarnings,
    MethodRegistry,
    WindowReader,
    accuracy,
    accuracy_summary,
    big_model,
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
    run_record,
    save_progress,
    short_error,
    table,
    target_line,
    write_outputs,
)

SECTION = "## int8: lowbit w8a8 vs ONNX Runtime quantization"
DEFAULT_MODELS = ["smollm2-135m", "all-minilm-l6-v2"]
SEQ_LEN = 128
#: the quantizers, each ``(fp32 path, output folder, context) -> info``; fp32 itself is the reference
QUANTIZERS = MethodRegistry()


# ---------------------------------------------------------------------------------------
# Helpers (the ones every benchmark shares are in benchmarks/harness.py)
# ---------------------------------------------------------------------------------------
def activation_scales(path: Path, top: int = 5) -> dict[str, Any]:
    """The largest per-tensor activation scales of a QDQ model (QuantizeLinear on a non-constant input)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in init and n.input[1] in init:
            t = init[n.input[1]]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            scale = numpy_helper.to_array(t)
            if scale.size == 1:
                src = producer.get(n.input[0])
                rows.append((float(scale), n.input[0], src.op_type if src is not None else "graph input"))
    rows.sort(reverse=True)
    return {
        "quantized_activations": len(rows),
        "at_least_1e30": sum(r[0] >= 1e30 for r in rows),
        "top": [{"scale": r[0], "tensor": r[1], "producer": r[2]} for r in rows[:top]],
    }


# ---------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------
@QUANTIZERS.register("ort-dynamic", label="ORT quantize_dynamic")
def ort_dynamic(fp32: Path, folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    with CaptureWarnings() as cap:
        start = time.perf_counter()
        quantize_dynamic(
            str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=big_model(fp32)
        )
        seconds = time.perf_counter() - start
    return {
        "path": out,
        "quantize_seconds": seconds,
        "call": "quantize_dynamic(fp32, out, per_channel=True, weight_type=QuantType.QInt8)",
        "preprocess": "not run (not required; see ort_warnings)" if cap.messages else "not run (not required)",
        "ort_warnings": cap.messages,
    }


@QUANTIZERS.register("ort-static-qdq", label="ORT quantize_static (QDQ)")
def ort_static(fp32: Path, folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    ext = big_model(fp32)
    info: dict[str, Any] = {
        "path": out,
        "call": "quantize_static(fp32, out, reader, quant_format=QuantFormat.QDQ, per_channel=True)",
        "calibration_samples": len(ctx["calib_feeds"]),
    }
    with CaptureWarnings() as cap:
        start = time.perf_counter()
        try:
            quantize_static(
                str(fp32), str(out), WindowReader(ctx["calib_feeds"]),
                quant_format=QuantFormat.QDQ, per_channel=True, use_external_data_format=ext,
            )
            info["preprocess"] = "not run (not required)"
        except Exception as first:  # ORT refused the raw model: pre-process (its documented fix) and retry
            log(f"  quantize_static failed without pre-processing ({short_error(first)}); running quant_pre_process")
            pre = folder / "preprocessed.onnx"
            quant_pre_process(str(fp32), str(pre), save_as_external_data=ext)
            quantize_static(
                str(pre), str(out), WindowReader(ctx["calib_feeds"]),
                quant_format=QuantFormat.QDQ, per_channel=True, use_external_data_format=ext,
            )
            info["preprocess"] = f"required: quantize_static failed on the raw export ({short_error(first)})"
        info["quantize_seconds"] = time.perf_counter() - start
    info["ort_warnings"] = cap.messages
    info["largest_activation_scales"] = activation_scales(out)
    if cap.messages and info["preprocess"].startswith("not run"):
        info["preprocess"] = "not run (not required; ORT only warns, see ort_warnings)"
    return info


@QUANTIZERS.register("lowbit-w8a8", label="lowbit w8a8")
def lowbit_w8a8(fp32: Path, folder: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    from lowbit.compiler.driver import compile as lowbit_compile

    if folder.exists():
        shutil.rmtree(folder)
    settings = ctx["lowbit_settings"]
    if ctx["lowbit_source"] == "name":
        source, kw = ctx["name"], {}
        call = f'lowbit.compile("{ctx["name"]}", out, recipe="w8a8") (includes its own torch export)'
    else:
        source, kw = str(fp32), {"tokenizer": ctx["adapter"].tokenizer}
        call = 'lowbit.compile("fp32/model.onnx", out, recipe="w8a8", tokenizer=<the model\'s tokenizer>)'
    start = time.perf_counter()
    res = lowbit_compile(
        source, folder, recipe="w8a8", settings=settings, measure_latency=False, progress=False, threads=THREADS, **kw
    )
    seconds = time.perf_counter() - start
    m = res.manifest
    return {
        "path": folder / "model.onnx",
        "quantize_seconds": seconds,
        "pipeline_seconds": m.get("compile_seconds"),
        "call": call,
        "settings": settings,
        "passes": [{"pass": p.get("pass"), "seconds": p.get("seconds")} for p in m.get("passes", [])],
        "plan_precisions": dict(collections.Counter(lp["precision"] for lp in ((m.get("plan") or {}).get("layers") or {}).values())),
        "lowbit_own_accuracy": {k: v for k, v in (m.get("accuracy") or {}).items() if k != "generation"},
    }


METHODS = ["fp32", *QUANTIZERS]


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
def bench_model(name: str, root: Path, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.compiler.core.ortsession import make_session

    work = root / "compare_int8" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    record: dict[str, Any] = {"name": name, "methods": {}}

    log(f"{name}: exporting fp32 ONNX (torch dynamo exporter)")
    fp32_path, adapter, export_s = export_fp32(name, work / "fp32")
    task = adapter.task
    record.update(task=task, export_seconds=export_s, inputs=adapter.input_names, outputs=adapter.output_names)
    log(f"{name}: exported in {export_s:.1f} s ({task}, {onnx_disk_bytes(fp32_path) / 1e6:.1f} MB)")

    win = heldout_windows(adapter, None, cfg, SEQ_LEN)
    calib_feeds, eval_feeds, eval_ids, lat_feeds = win.calib_feeds, win.eval_feeds, win.eval_ids, win.latency_feeds
    record["data"] = win.record | {"model_input_length": int(eval_feeds[0]["input_ids"].shape[1])}

    ctx = {
        "name": name, "adapter": adapter, "calib_feeds": calib_feeds,
        "lowbit_source": args.lowbit_source, "lowbit_settings": dict(args.lowbit_setting or {}),
    }
    record["methods"]["fp32"] = {"path": fp32_path, "quantize_seconds": 0.0, "call": "lowbit frontend export (shared input of all methods)"}
    for method in QUANTIZERS:  # keep going when one fails: a failing peer is a result too
        record["methods"][method] = QUANTIZERS.run(method, fp32_path, work / method, ctx, prefix=f"{name}: ")
        gc.collect()

    fp32_bytes = onnx_disk_bytes(fp32_path)
    sessions = {}
    for method, info in record["methods"].items():
        if "error" in info:
            continue
        try:
            info["size_bytes"] = onnx_disk_bytes(info["path"])
            info["size_ratio"] = info["size_bytes"] / fp32_bytes
            info["ops"] = op_counts(info["path"])
            sessions[method] = make_session(info["path"], threads=THREADS)
        except Exception as e:
            log(f"{name}: {method}: ORT cannot load the model: {short_error(e)}")
            info["error"] = f"session: {short_error(e)}"

    # Accuracy on the held-out windows.
    log(f"{name}: accuracy on {len(eval_feeds)} held-out windows")
    from lowbit.compiler.core import evaluate

    ref_out = evaluate.run_batches(sessions["fp32"], eval_feeds)
    for method, sess in sessions.items():
        try:
            out = ref_out if method == "fp32" else evaluate.run_batches(sess, eval_feeds)
            record["methods"][method]["accuracy"] = accuracy(task, ref_out, out, eval_ids)
            del out
        except Exception as e:
            record["methods"][method]["accuracy"] = {"error": short_error(e)}
        acc = record["methods"][method]["accuracy"]
        if "perplexity" in acc or "cosine_mean" in acc:
            log(f"  {method}: {accuracy_summary(acc)}")
        gc.collect()
    del ref_out
    gc.collect()

    # Latency.
    reps = cfg["repeats"]
    log(f"{name}: latency, {cfg['rounds']} interleaved rounds x {reps} repeats per method")
    record["latency"] = latency_round_robin(sessions, lat_feeds, cfg["rounds"], reps)
    record["latency_settings"] = latency_settings(cfg["rounds"], reps)
    del sessions
    gc.collect()
    relative_paths(record["methods"])
    return record


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
LABELS = {"fp32": "fp32", **QUANTIZERS.labels()}
QUANT_OPS = {
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QuantizeLinear",
    "DequantizeLinear", "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized", "QGemm", "DynamicQuantizeLSTM",
}
TITLES = {"smollm2-135m": "SmolLM2-135M (causal LM)", "all-minilm-l6-v2": "all-MiniLM-L6-v2 (encoder)"}


def model_table(rec: dict[str, Any]) -> list[str]:
    lm = rec["task"] == "causal-lm"
    head = ["method", "quantize time", "size MB (vs fp32)"]
    head += ["perplexity (increase)", "KL vs fp32", "top-1 agree"] if lm else ["cosine mean", "cosine min"]
    head += ["T=1 ms (speedup)", "T=128 ms (speedup)"]
    rows: list[list[str] | str] = []
    for m in METHODS:
        info = rec["methods"].get(m)
        if info is None:
            continue
        if "error" in info:
            rows.append(failed_row(LABELS[m], info["error"], len(head)))
            continue
        if m == "fp32":
            qt = f"(export {rec['export_seconds']:.0f} s)"
        elif m == "lowbit-w8a8" and info.get("pipeline_seconds") is not None:
            qt = f"{info['quantize_seconds']:.1f} s ¹"
        else:
            qt = f"{info['quantize_seconds']:.1f} s"
        row = [LABELS[m], qt, f"{info['size_bytes'] / 1e6:.1f} ({info['size_ratio']:.2f}x)"]
        acc = info.get("accuracy", {})
        if "error" in acc:
            row += [f"error: {acc['error'][:60]}"] + [""] * (2 if lm else 1)
        elif lm:
            row += [
                f"{acc['perplexity']:.3f} ({acc['perplexity_increase']:+.2%})",
                f"{acc['kl']:.4f}",
                f"{acc['top1_agreement']:.2%}",
            ]
        else:
            row += [f"{acc['cosine_mean']:.5f}", f"{acc['cosine_min']:.5f}"]
        row += [fmt_ms(rec["latency"]["T=1"].get(m)), fmt_ms(rec["latency"]["T=128"].get(m))]
        rows.append(row)
    return table(head, rows)


def targets(results: dict[str, Any]) -> list[str]:
    """PASS/FAIL lines for the two stated targets, from the measured numbers."""
    lines = []
    lm_recs = [r for r in results["models"].values() if r.get("task") == "causal-lm"]
    for rec in lm_recs:
        lb, dyn = rec["methods"].get("lowbit-w8a8", {}), rec["methods"].get("ort-dynamic", {})
        a, b = lb.get("accuracy", {}), dyn.get("accuracy", {})
        if "perplexity_increase" in a and "perplexity_increase" in b:
            ok = a["perplexity_increase"] <= b["perplexity_increase"] / 5
            lines.append(target_line(
                ok, f"{rec['name']}: lowbit w8a8 perplexity increase "
                f"{a['perplexity_increase']:+.3%} <= 1/5 of ORT quantize_dynamic's {b['perplexity_increase']:+.3%} "
                f"(limit {b['perplexity_increase'] / 5:+.3%})"
            ))
        else:
            lines.append(target_line(None, f"{rec['name']}: perplexity target not measurable (a method failed)"))
    for rec in results["models"].values():
        if "latency" not in rec:
            continue
        lat = rec["latency"]["T=128"]
        faster = ratio(lat, "lowbit-w8a8", "ort-dynamic")
        if faster is not None:
            x, y = lat["lowbit-w8a8"]["ms"], lat["ort-dynamic"]["ms"]
            lines.append(target_line(
                x <= y, f"{rec['name']}: lowbit w8a8 T=128 latency {x:.2f} ms "
                f"<= ORT quantize_dynamic's {y:.2f} ms ({faster:.2f}x)"
            ))
        else:
            lines.append(target_line(None, f"{rec['name']}: T=128 latency target not measurable (a method failed)"))
    return lines


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    for rec in results["models"].values():
        if "methods" not in rec:
            continue
        for m, info in rec["methods"].items():
            if "error" in info:
                out.append(f"- {rec['name']} / {LABELS[m]} failed: `{info['error']}`")
        st = rec["methods"].get("ort-static-qdq", {})
        if "preprocess" in st:
            pre = st["preprocess"].replace("see ort_warnings", "its warning is listed below")
            out.append(f"- {rec['name']} / ORT quantize_static: `quant_pre_process` {pre}.")
        sc = st.get("largest_activation_scales") or {}
        if sc.get("top"):
            t = sc["top"][0]
            line = (f"- {rec['name']} / ORT quantize_static: largest activation scale {t['scale']:.3g} "
                    f"(tensor `{t['tensor']}`, output of {t['producer']}); {sc['at_least_1e30']} of "
                    f"{sc['quantized_activations']} quantized activations have a scale >= 1e30")
            if sc["at_least_1e30"]:
                line += (": MinMax calibration takes the float32-lowest entries of the additive attention mask at face "
                         "value, so in every Add of attention scores and mask the real scores round to zero and "
                         "attention becomes uniform over the unmasked positions")
            out.append(line + ".")
        for m in ("ort-dynamic", "ort-static-qdq"):
            warns = rec["methods"].get(m, {}).get("ort_warnings") or []
            if warns:
                kinds = collections.Counter(re.sub(r"'[^']*'", "'…'", re.sub(r"https?://\S+", "<link>", w)) for w in warns)
                out.append(f"- {rec['name']} / {LABELS[m]} warned: " + "; ".join(
                    f"\"{k.rstrip(' .')}\"" + (f" (x{n})" if n > 1 else "") for k, n in kinds.items()) + ".")
        kernels = []
        for m in METHODS:
            ops = rec["methods"].get(m, {}).get("ops")
            if ops:
                q = [f"{n} {op}" for op, n in ops.items() if op in QUANT_OPS]
                kernels.append(f"{LABELS[m]}: {sum(ops.values())} nodes" + (f" ({', '.join(q)})" if q else ""))
        if kernels:
            out.append(f"- {rec['name']} graphs as saved (before ORT's own fusions): " + "; ".join(kernels) + ".")
        lb = rec["methods"].get("lowbit-w8a8", {})
        own = lb.get("lowbit_own_accuracy") or {}
        if "perplexity_increase" in own:
            out.append(f"- {rec['name']} / lowbit's own verification (its manifest, same held-out split): perplexity increase "
                       f"{own['perplexity_increase']:+.3%}, KL {own['kl']:.4f}, top-1 {own['top1_agreement']:.2%}.")
        elif "cosine_mean" in own:
            out.append(f"- {rec['name']} / lowbit's own verification (its manifest; rows without [CLS]/[SEP]): cosine mean "
                       f"{own['cosine_mean']:.5f}, min {own['cosine_min']:.5f}.")
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        SECTION,
        "",
        *provenance_lines(results),
        "",
        "All methods start from the same fp32 ONNX export (torch dynamo exporter via lowbit's frontend), "
        f"calibrate on the same {results['settings']['calib_samples']} windows and are measured on the same "
        f"{results['settings']['eval_samples']} held-out windows of {SEQ_LEN} tokens (Python's `pydoc_data.topics` prose, "
        "split 80/20 by `lowbit.compiler.core.data.split_text`). Peers: `quantize_dynamic(per_channel=True, "
        "weight_type=QInt8)`; `quantize_static(quant_format=QDQ, per_channel=True)` with ORT's defaults otherwise "
        "(MinMax, QInt8 activations and weights, all op types). lowbit: `recipe=\"w8a8\"` (rotation, smoothing, int8 "
        "per-channel weights, int8 activations quantized at run time per tensor or per token as calibration chose). "
        + latency_text(results["settings"]) + " Size: model.onnx + external data on disk. "
        "Quantize time: wall time of the quantization call, starting from the fp32 ONNX file.",
        "",
    ]
    for rec in results["models"].values():
        lines.append(f"### {TITLES.get(rec['name'], rec['name'])}")
        lines.append("")
        if "error" in rec:
            lines += [f"FAILED: `{rec['error']}`", ""]
            continue
        lines += model_table(rec)
        lines.append("")
    lines.append("Targets:")
    lines.append("")
    lines += [f"- {t}" for t in targets(results)]
    lines.append("")
    lines.append("Notes:")
    lines.append("")
    lines.append(
        "- ¹ lowbit's time is the wall time of `lowbit.compile`, which includes its built-in verification against fp32 "
        "(held-out accuracy and a 32-token greedy generation); the pass pipeline alone (manifest `compile_seconds`): "
        + ", ".join(
            f"{r['name']} {r['methods']['lowbit-w8a8']['pipeline_seconds']:.1f} s"
            for r in results["models"].values()
            if r.get("methods", {}).get("lowbit-w8a8", {}).get("pipeline_seconds") is not None
        )
        + "."
    )
    lines += notes(results)
    lines.append("- Raw numbers (per-round latencies, op counts of each model, ORT warnings): `benchmarks/out/compare_int8.json`.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="lowbit model names (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/out)")
    p.add_argument("--quick", action="store_true", help="few samples and repeats: a smoke run")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file whose int8 section to replace (default: benchmarks/RESULTS.md; none with --quick)")
    p.add_argument("--lowbit-source", choices=["onnx", "name"], default="onnx",
                   help="compile lowbit from the shared fp32 ONNX (default; like the peers) or from the model name "
                        "(its own export, counted in its time)")
    p.add_argument("--lowbit-setting", type=parse_setting, action="append", metavar="PASS.OPTION=VALUE",
                   help="recipe option for lowbit (repeatable)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: re-render the markdown (and the --results section) from a JSON this script wrote")
    args = p.parse_args(argv)

    if args.render is not None:
        results = json.loads(args.render.read_text())
        render_from(args.render, markdown(results), results_target(args.results, results["settings"].get("quick", False)))
        return 0

    cfg = e2e_settings(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = run_record(__spec__.name, argv, cfg | {"seq_len": SEQ_LEN, "threads": THREADS, "quick": args.quick, "lowbit_source": args.lowbit_source})
    log(f"compare_int8: {', '.join(args.models)} ({'quick' if args.quick else 'full'} run); "
        f"{results['machine']['cores']} cores, {results['machine']['cpu']}, ORT {results['versions']['onnxruntime']}")
    stem = "compare_int8_quick" if args.quick else "compare_int8"
    for name in args.models:
        try:
            results["models"][name] = bench_model(name, args.out, cfg, args)
        except Exception as e:
            log(f"{name}: FAILED: {short_error(e)}")
            traceback.print_exc()
            results["models"][name] = {"name": name, "error": short_error(e), "traceback": traceback.format_exc(limit=8)}
        save_progress(results, args.out / f"{stem}.json")
    finish_record(results)
    write_outputs(results, args.out, stem, markdown(results), results_target(args.results, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
