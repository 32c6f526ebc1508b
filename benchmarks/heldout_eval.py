"""Perplexity and KL of finished artifacts on many held-out windows.

The compile benchmarks judge accuracy on the 16 held-out windows every compile
verifies on. Between two close configurations that is noisy: on SmolLM2-135M
the w4a8 perplexity increase of one artifact moved by 2.4 points between those
16 windows and 128. This script measures artifacts that are already built on
more windows of the same held-out text (`lowbit.compiler.data.split_text`, the
split every compile uses) and reports each quarter of the windows separately,
so a difference can be seen to hold across the text or not.

Usage::

    python benchmarks/heldout_eval.py --model smollm2-135m --windows 128 \\
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
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SECTION = "## Held-out check on more windows: {model}"


def measure(path: Path, feeds, ref=None):
    """(per-token NLL [windows, T-1], per-window KL from ``ref`` or the log-probs themselves)."""
    import onnxruntime as ort
    from lowbit.compiler.evaluate import log_softmax

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    nll, other = [], []
    for i, feed in enumerate(feeds):
        logp = log_softmax(session.run(None, feed)[0][0].astype(np.float64))
        ids = feed["input_ids"][0]
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]])
        other.append(logp.astype(np.float32) if ref is None else float((np.exp(ref[i]) * (ref[i] - logp)).sum(-1).mean()))
    return np.array(nll), other


def describe(folder: Path) -> str:
    """The artifact's recipe, with the options of its rotation and plan, from its manifest."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest"
    recipe = json.loads(manifest.read_text()).get("recipe") or {}
    keys = {"rotate": ("seed", "per_head_v", "online_down_proj", "learn_steps", "learn_group_size"),
            "plan": ("precision", "group_size", "symmetric", "weight_algorithm")}
    parts = [f"{p['pass']}: " + ", ".join(f"{k}={p[k]}" for k in keys[p["pass"]] if k in p)
             for p in recipe.get("passes", []) if p.get("pass") in keys]
    return f"recipe `{recipe.get('name', '?')}`" + (f" ({'; '.join(parts)})" if parts else ", unrotated")


def main(argv: list[str] | None = None) -> None:
    from _common import provenance_lines, run_record, write_outputs
    from compare_4bit import MODELS, load_fp32
    from lowbit.compiler.data import split_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), required=True)
    p.add_argument("--fp32", type=Path, required=True, help="the fp32 model.onnx the artifacts were compiled from")
    p.add_argument("--windows", type=int, default=128, help="held-out windows of 128 tokens (default: %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "heldout_eval")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md",
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
    base, ref = measure(fp32, feeds)
    quarter = max(1, len(feeds) // 4)
    rows = []
    for label, folder in named:
        nll, kl = measure(Path(folder) / "model.onnx", feeds, ref)
        rows.append({
            "label": label, "folder": folder,
            "perplexity_increase": math.exp(nll.mean() - base.mean()) - 1, "kl": float(np.mean(kl)),
            "quarters": [math.exp(nll[i:i + quarter].mean() - base[i:i + quarter].mean()) - 1
                         for i in range(0, quarter * 4, quarter)],
        })  # fmt: skip
        print(f"{label}: {rows[-1]['perplexity_increase']:+.2%}, KL {rows[-1]['kl']:.4f}", flush=True)
    record = run_record(__file__, argv, {"model": args.model, "windows": len(feeds), "seq_len": 128,
                                         "text": split.source, "fp32_perplexity": math.exp(base.mean())})
    record["rows"] = rows
    record["load_average_at_end"] = list(os.getloadavg())
    record["total_seconds"] = time.perf_counter() - start
    lines = [SECTION.format(model=args.model), "", *provenance_lines(record), "",
             f"{len(feeds)} held-out windows of 128 tokens ({split.source}), spread evenly over the held-out text as the "
             "compile's 16 verification windows are; "
             f"fp32 perplexity {record['settings']['fp32_perplexity']:.3f}.", "",
             "| artifact | perplexity increase | KL vs fp32 | increase per quarter of the windows |", "|---|---|---|---|"]
    lines += [f"| {r['label']} (`{os.path.relpath(r['folder'])}`) | {r['perplexity_increase']:+.2%} | {r['kl']:.4f} | "
              + " / ".join(f"{q:+.2%}" for q in r["quarters"]) + " |" for r in rows]
    lines += ["", *[f"- {label}: {describe(Path(folder))}" for label, folder in named]]
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(record, args.out, "heldout_eval", "\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
