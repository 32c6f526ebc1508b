"""TVM backend side by side with ONNX Runtime: the same recipe and plan, two backends, on a real model.

For one model (SmolLM2-135M by default), in one process and one run:

1. export the fp32 ONNX once with lowbit's frontend; every compile starts from this file
   (``lowbit.compile(fp32.onnx, tokenizer=...)``), so the plans are the same;
2. compile each recipe (``w8a8`` by default; ``--recipes w8a8 w4a16``) twice:
   ``--backend onnxruntime`` and ``--backend tvm --target llvm``, timing both; each compile
   measures its artifact against fp32 (perplexity, KL, top-1, greedy generation) as usual;
3. compare the two artifacts of a recipe with each other on the compiles' held-out windows
   (top-1 agreement, KL(ORT || TVM)): the numbers the backends compute for the same plan,
   beside the noise floor of that comparison: ONNX Runtime against itself with the
   embedding table nudged by one part in a million (``nudged_copy``);
4. time one forward pass (batch 1, T=1 and T=128, 2 threads for both runtimes) of fp32 ORT
   and every artifact, interleaved round-robin (``benchmarks.harness.latency_round_robin``).

Usage::

    python -m benchmarks.tvm_backend [--model smollm2-135m] [--recipes w8a8 w4a16] [--out benchmarks/out] [--reuse] [--quick]

SmolLM2-135M builds since ``relax_import.unify_symbolic_vars`` (the attention mask's
``range_len_0``/``s`` variables used to stop the build in Relax's ``VMShapeLower``). The
tuned-vs-untuned kernel comparison (``--tune``) is ``benchmarks/kernels/tvm_tune_matmul.py``.
``--reuse`` keeps the artifacts an earlier run left only if the tree that built them is this one
(the same commit, neither with uncommitted changes: ``benchmarks.harness.check_reuse``).

Writes ``<out>/tvm_backend.json`` and ``.md`` and replaces the section
"## TVM backend: LLVM vs ONNX Runtime" of ``benchmarks/RESULTS.md``; ``--quick`` (fewer
repeats, a smoke run) leaves RESULTS.md alone unless ``--results`` names a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM's CPU thread pool, before TVM is imported

import numpy as np  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    OUT,
    THREADS,
    clear_stamp,
    command_line,
    export_fp32,
    git_state,
    latency_round_robin,
    log,
    machine_info,
    results_target,
    reuse_allowed,
    stamp_artifact,
    table,
    tree_line,
    update_results,
    versions,
    write_json,
)

SECTION = "## TVM backend: LLVM vs ONNX Runtime"
#: relative change of the embedding table for the noise-floor comparison (about 8 float32 ulps)
NUDGE = 1e-6


def compile_both(fp32: Path, adapter, recipe: str, out: Path, reuse: bool = False,
                 tree: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``recipe`` for both backends; with ``reuse``, an artifact an earlier run left is
    kept if the tree that built it is this one (``tree``: this run's at its start)."""
    from lowbit.compiler.driver import compile as lowbit_compile

    result = {}
    for backend in ("onnxruntime", "tvm"):
        folder = out / f"{recipe}-{backend}"
        if reuse and (folder / "manifest.json").is_file() and reuse_allowed(folder, tree):  # an earlier run's artifact
            m = json.loads((folder / "manifest.json").read_text())
            seconds = float(m["compile_seconds"])
        else:
            clear_stamp(folder)
            start = time.perf_counter()
            res = lowbit_compile(str(fp32), folder, recipe=recipe, backend=backend, tokenizer=adapter.tokenizer,
                                 measure_latency=False, progress=False, threads=THREADS, overwrite=True)
            seconds = time.perf_counter() - start
            m = res.manifest
            stamp_artifact(folder, tree)
        acc = m["accuracy"]
        result[backend] = {
            "path": folder,
            "compile_seconds": round(seconds, 1),
            "tvm_build_seconds": (m.get("tvm") or {}).get("compile_seconds"),
            "perplexity": acc.get("perplexity"),
            "perplexity_fp32": acc.get("perplexity_fp32"),
            "perplexity_increase": acc.get("perplexity_increase"),
            "kl_vs_fp32": acc.get("kl"),
            "top1_vs_fp32": acc.get("top1_agreement"),
            "greedy_matching_prefix": (acc.get("generation") or {}).get("matching_prefix"),
            "weight_bytes": m["size"]["weight_bytes"],
            "kernels": (m["notes"].get("lower-tvm") or m["notes"].get("lower-ort") or {}).get("kernels"),
        }
        log(f"  {recipe} {backend}: {seconds:.0f} s, perplexity {acc.get('perplexity'):.4g} "
            f"(fp32 {acc.get('perplexity_fp32'):.4g}), greedy {result[backend]['greedy_matching_prefix']}/32")
    return result


def _compare(ref_run, got_run, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Top-1 agreement, KL(ref || got) and the largest relative logit difference over ``feeds``."""
    from lowbit.compiler.core.evaluate import log_softmax

    agree, kls, diffs = [], [], []
    for feed in feeds:
        ref = ref_run(feed["input_ids"]).astype(np.float64)
        got = got_run(feed["input_ids"]).astype(np.float64)
        agree.append(ref.argmax(-1) == got.argmax(-1))
        lp, lq = log_softmax(ref), log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        diffs.append(np.abs(ref - got).max() / np.abs(ref).max())
    return {"top1_agreement": float(np.concatenate(agree, None).mean()), "kl": float(np.concatenate(kls, None).mean()),
            "max_rel_logit_diff": float(max(diffs)), "windows": len(feeds)}


def nudged_copy(model_path: Path, out: Path, rel: float = NUDGE) -> tuple[Path, str] | None:
    """A copy of the ONNX model whose embedding lookup (the float table, or the int8 table's row
    scales, read by the graph's first ``Gather``) is multiplied by ``1 + rel``: the same plan
    and kernels, with fp32 values moved by about one rounding step. None without such a table."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "Gather":
            continue
        for name in node.input:
            init = inits.get(name)
            if init is not None and init.data_type == onnx.TensorProto.FLOAT:
                a = numpy_helper.to_array(init) * np.float32(1 + rel)
                init.CopyFrom(numpy_helper.from_array(a.astype(np.float32), name))
                out.parent.mkdir(parents=True, exist_ok=True)
                onnx.save(m, str(out), save_as_external_data=True, location=out.name + ".data")
                return out, name
    return None


def backend_agreement(ort_dir: Path, tvm_dir: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """TVM against ONNX Runtime on ``feeds``, and the noise floor: ONNX Runtime against itself with
    the embeddings nudged by ``NUDGE`` (relative). With int8 activations quantized at run time,
    such a nudge flips the rounding of a few activation codes and the flips grow through the
    layers, so two correct runtimes whose fp32 arithmetic differs in the last bits agree no
    better than this floor."""
    from lowbit.backends.tvm.runtime import TVMModel
    from lowbit.compiler.core.ortsession import make_session

    ort_s, tvm_m = make_session(ort_dir / "model.onnx", THREADS), TVMModel(tvm_dir)

    def ort_run(ids):
        return ort_s.run(None, {"input_ids": ids})[0]

    result: dict[str, Any] = _compare(ort_run, lambda ids: tvm_m.run({"input_ids": ids})["logits"], feeds)
    nudged = nudged_copy(ort_dir / "model.onnx", ort_dir.parent / f"{ort_dir.name}-nudged" / "model.onnx")
    if nudged is not None:
        other = make_session(nudged[0], THREADS)
        result["noise_floor"] = _compare(ort_run, lambda ids: other.run(None, {"input_ids": ids})[0], feeds)
        result["noise_floor"]["nudged"] = f"{nudged[1]} x (1 + {NUDGE:g})"
    return result


def markdown(r: dict[str, Any]) -> str:
    command = r.get("command") or ("python -m benchmarks.tvm_backend" + (" --quick" if r["settings"]["quick"] else ""))
    lines = [SECTION, "",
             f"{r['model']}, {r['date']}, {r['machine'].get('cpu')}, {THREADS} threads for both runtimes "
             f"(load average at start {r['loadavg'][0]:.1f}). `{command}`."
             + (f" {tree_line(r['git'])}." if r.get("git") else ""), ""]
    lat = r["latency"]
    fp = {t: lat[t]["fp32"]["ms"] for t in lat}
    rows = [["fp32", "onnxruntime", "–", f"{r['perplexity_fp32']:.4g}", "–", "–", "–", f"{fp['T=1']:.2f}", f"{fp['T=128']:.2f}"]]
    for recipe, both in r["recipes"].items():
        for backend, row in both["compiled"].items():
            key = f"{recipe}-{backend}"
            rows.append([recipe, backend, f"{row['compile_seconds']:.0f}", f"{row['perplexity']:.4g}", f"{row['kl_vs_fp32']:.2e}",
                         f"{row['top1_vs_fp32']:.2%}", f"{row['greedy_matching_prefix']}/32", f"{lat['T=1'][key]['ms']:.2f}",
                         f"{lat['T=128'][key]['ms']:.2f}"])
    lines += table(["recipe", "backend", "compile s", "perplexity (fp32)", "KL vs fp32", "top-1 vs fp32", "greedy match",
                    "T=1 ms", "T=128 ms"], rows)
    lines += ["", "TVM against ONNX Runtime, same plan, held-out windows; the noise floor is ONNX Runtime against "
              f"itself with the embedding table multiplied by 1 + {NUDGE:g} (fp32 values moved by a few ulps, "
              "as between two runtimes' arithmetic):", ""]
    rows = []
    for recipe, both in r["recipes"].items():
        a = both["agreement"]
        rows.append([recipe, "TVM vs ORT", f"{a['top1_agreement']:.2%}", f"{a['kl']:.2e}", f"{a['max_rel_logit_diff']:.2e}"])
        if "noise_floor" in a:
            n = a["noise_floor"]
            rows.append([recipe, "ORT vs ORT nudged", f"{n['top1_agreement']:.2%}", f"{n['kl']:.2e}", f"{n['max_rel_logit_diff']:.2e}"])
    lines += table(["recipe", "compared", "top-1 agreement", "KL", "max relative logit difference"], rows)
    lines += ["", "TVM LLVM kernels, untuned: the int8 GEMMs with lowbit's tiled, parallel CPU schedule "
              "(`backends/tvm/cpu.py`; no VNNI instructions yet, hence the gap to ONNX Runtime's int8 kernels), "
              "the rest with dlight's CPU rules (GEMV, reductions) or TVM's default loops. MetaSchedule tuning "
              "(`--tune N`) is measured per kernel by `benchmarks/kernels/tvm_tune_matmul.py`.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="lowbit model name or path (default smollm2-135m)")
    p.add_argument("--recipes", nargs="+", default=["w8a8"])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true", help="fewer latency repeats (smoke run)")
    p.add_argument("--reuse", action="store_true",
                   help="keep artifacts an earlier run left in OUT/tvm_backend (same export) if this tree built them "
                        "(same commit, no uncommitted changes)")
    p.add_argument("--results", type=Path, help="markdown file whose TVM section to replace (default RESULTS.md; none with --quick)")
    args = p.parse_args(argv)

    from lowbit.backends.tvm.runtime import Session, TVMModel
    from lowbit.compiler.core.ortsession import make_session

    work = args.out / "tvm_backend"
    r: dict[str, Any] = {"model": args.model, "command": command_line(__spec__.name, argv),
                         "date": datetime.date.today().isoformat(), "machine": machine_info(),
                         "versions": versions(extra=("apache-tvm",)), "git": git_state(),
                         "loadavg": os.getloadavg(), "settings": {"quick": args.quick, "threads": THREADS}, "recipes": {}}
    log(f"exporting {args.model}")
    fp32, adapter, export_s = export_fp32(args.model, work / "fp32")
    r["export_seconds"] = round(export_s, 1)
    from lowbit.compiler.core.data import split_text

    split = split_text(adapter.tokenizer, calib_data=None, eval_data=None, calib_samples=32, eval_samples=8, seq_len=128)
    windows = [adapter.make_inputs([w]) for w in split.evaluation]  # the compiles' own held-out windows
    sessions: dict[str, Any] = {"fp32": make_session(fp32, THREADS)}
    for recipe in args.recipes:
        log(f"compiling {recipe} for both backends")
        compiled = compile_both(fp32, adapter, recipe, work, reuse=args.reuse, tree=r["git"])
        agreement = backend_agreement(compiled["onnxruntime"]["path"], compiled["tvm"]["path"], windows)
        log(f"  TVM vs ORT: top-1 {agreement['top1_agreement']:.2%}, KL {agreement['kl']:.2e}")
        r["recipes"][recipe] = {"compiled": compiled, "agreement": agreement}
        r["perplexity_fp32"] = compiled["onnxruntime"]["perplexity_fp32"]
        sessions[f"{recipe}-onnxruntime"] = make_session(compiled["onnxruntime"]["path"] / "model.onnx", THREADS)
        sessions[f"{recipe}-tvm"] = Session(TVMModel(compiled["tvm"]["path"], threads=THREADS))
    feeds = {t: adapter.make_inputs([[1 + (i % 100) for i in range(t)]]) for t in (1, 128)}
    rounds, repeats = (2, {1: 5, 128: 2}) if args.quick else (5, {1: 20, 128: 5})
    log("latency (round robin)")
    r["latency"] = latency_round_robin(sessions, feeds, rounds, repeats)
    stem = "tvm_backend_quick" if args.quick else "tvm_backend"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", r)
    md = markdown(r)
    (args.out / f"{stem}.md").write_text(md)
    results = results_target(args.results, args.quick)
    if results is not None:
        update_results(results, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
