"""Perplexity and KL of finished artifacts on many held-out windows.

The compile benchmarks judge accuracy on the 16 held-out windows every compile
verifies on. Between two close configurations that is noisy: on SmolLM2-135M
the w4a8 perplexity increase of one artifact moved by 2.4 points between those
16 windows and 128. This script measures artifacts that are already built on
more windows of the same held-out text (`lowbit.compiler.core.data.split_text`, the
split every compile uses) and reports each quarter of the windows separately,
so a difference can be seen to hold across the text or not.

Usage::

    python -m benchmarks.heldout_eval --model smollm2-135m --windows 128 \\
        --fp32 benchmarks/out/smol/compare_4bit/smollm2-135m/fp32/model.onnx \\
        unrotated=benchmarks/out/smol/compare_4bit/smollm2-135m/lowbit-w4a8-toggled \\
        learned=benchmarks/out/smol/compare_4bit/smollm2-135m/lowbit-w4a8

Writes ``<out>/heldout_eval.json`` and ``.md`` (default out: ``benchmarks/out/heldout_eval``)
and replaces the section "## Held-out check on more windows: MODEL" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    OUT,
    RESULTS_MD,
    provenance_lines,
    run_record,
    table,
    write_outputs,
)

SECTION = "## Held-out check on more windows: {model}"


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quarter_metrics(path: Path, quarters, ref) -> list[dict[str, float]]:
    """``lm_metrics`` against fp32 (``ref``: its logits per quarter) for each quarter of the windows,
    one quarter's logits in memory at a time."""
    from lowbit.compiler.core.evaluate import lm_metrics, run_batches

    s = session(path)
    return [lm_metrics(r, run_batches(s, feeds), [f["input_ids"] for f in feeds]) for feeds, r in zip(quarters, ref)]


def pooled(parts: list[dict[str, float]]) -> dict[str, float]:
    """Perplexity increase and KL over all windows from the quarters' (weighted by their positions;
    every window has the same length, so positions and predicted tokens are proportional)."""
    w = np.array([p["positions"] for p in parts], float)

    def mean_log(key: str) -> float:
        return float(np.dot(w, np.log([p[key] for p in parts])) / w.sum())

    return {"perplexity_increase": math.exp(mean_log("perplexity") - mean_log("perplexity_fp32")) - 1,
            "kl": float(np.dot(w, [p["kl"] for p in parts]) / w.sum()),
            "perplexity_fp32": math.exp(mean_log("perplexity_fp32"))}


def describe(folder: Path) -> str:
    """The artifact's recipe, with its calibration windows and the options of its rotation and plan,
    from its manifest."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest"
    recipe = json.loads(manifest.read_text()).get("recipe") or {}
    keys = {"rotate": ("seed", "per_head_v", "online_down_proj", "learn_steps", "learn_objective", "learn_group_size"),
            "plan": ("precision", "group_size", "symmetric", "weight_algorithm")}
    parts = [f"{p['pass']}: " + ", ".join(f"{k}={p[k]}" for k in keys[p["pass"]] if k in p)
             for p in recipe.get("passes", []) if p.get("pass") in keys]
    samples = (recipe.get("calibration") or {}).get("samples")
    calib = f", {samples} calibration windows" if samples else ""
    return f"recipe `{recipe.get('name', '?')}`{calib}" + (f" ({'; '.join(parts)})" if parts else ", unrotated")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.compare_4bit import MODELS, load_fp32
    from lowbit.compiler.core.data import split_text
    from lowbit.compiler.core.evaluate import run_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), required=True)
    p.add_argument("--fp32", type=Path, required=True, help="the fp32 model.onnx the artifacts were compiled from")
    p.add_argument("--windows", type=int, default=128, help="held-out windows of 128 tokens (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT / "heldout_eval")
    p.add_argument("--results", type=Path, default=RESULTS_MD,
                   help="markdown file whose section for this model to replace (default: %(default)s)")
    p.add_argument("artifacts", nargs="+", metavar="LABEL=FOLDER", help="artifact folders (with model.onnx)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    named = [a.rsplit("=", 1) for a in args.artifacts]  # the label may hold "=", the folder not
    if any(len(n) != 2 for n in named):
        p.error("artifacts are given as LABEL=FOLDER")
    missing = [folder for _, folder in named if not (Path(folder) / "model.onnx").is_file()]
    if missing:
        p.error(f"no model.onnx in {', '.join(missing)}")
    spec = MODELS[args.model]
    fp32, adapter, _ = load_fp32(spec, args.fp32.parent, True)
    split = split_text(adapter.tokenizer, calib_data=spec["text"], eval_data=None, calib_samples=32,
                       eval_samples=args.windows, seq_len=128)
    feeds = [{"input_ids": adapter.make_inputs([w])["input_ids"]} for w in split.evaluation]
    size = -(-len(feeds) // 4)
    quarters = [feeds[i:i + size] for i in range(0, len(feeds), size)]
    fp32_session = session(fp32)
    ref = [run_batches(fp32_session, q) for q in quarters]
    rows = []
    for label, folder in named:
        parts = quarter_metrics(Path(folder) / "model.onnx", quarters, ref)
        rows.append({"label": label, "folder": folder, **pooled(parts),
                     "quarters": [p["perplexity_increase"] for p in parts]})
        print(f"{label}: {rows[-1]['perplexity_increase']:+.2%}, KL {rows[-1]['kl']:.4f}", flush=True)
    record = run_record(__spec__.name, argv, {"model": args.model, "windows": len(feeds), "seq_len": 128,
                                         "text": split.source, "fp32_perplexity": rows[0]["perplexity_fp32"]})
    record["rows"] = rows
    record["load_average_at_end"] = list(os.getloadavg())
    record["total_seconds"] = time.perf_counter() - start
    lines = [SECTION.format(model=args.model), "", *provenance_lines(record), "",
             f"{len(feeds)} held-out windows of 128 tokens ({split.source}), spread evenly over the held-out text as the "
             "compile's 16 verification windows are; "
             f"fp32 perplexity {record['settings']['fp32_perplexity']:.3f}.", ""]
    lines += table(["artifact", "perplexity increase", "KL vs fp32", "increase per quarter of the windows"],
                   [[f"{r['label']} (`{os.path.relpath(r['folder'])}`)", f"{r['perplexity_increase']:+.2%}", f"{r['kl']:.4f}",
                     " / ".join(f"{q:+.2%}" for q in r["quarters"])] for r in rows])
    lines += ["", *[f"- {label}: {describe(Path(folder))}" for label, folder in named]]
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(record, args.out, "heldout_eval", "\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
