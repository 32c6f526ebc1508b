"""Error attribution on a real LLM: does ``lowbit explain`` find the layers that matter?

SmolLM2-135M has real activation outliers (down_proj inputs with a few channels far above
the rest). With smoothing and rotation off (recipe ``w8a8-plain``: int8 weights per channel,
int8 activations per token) nothing spreads them, so the question is whether the attribution
finds them by itself. This script:

1. compiles SmolLM2-135M with ``--recipe`` (default ``w8a8-plain``; keeping ``reference.onnx``
   so explain need not export again);
2. runs ``lowbit explain`` on it: pass-by-pass bisect, per-layer SQNR, and the measured KL
   contribution of the candidate layers (lowest local SQNR, plus lm_head);
3. checks whether explain's top 5 holds the down_proj layers whose inputs have the largest
   calibrated absmax;
4. recompiles with the 3 suggested ``--override`` strings and compares the manifests' KL
   (before, predicted by explain, after).

Usage::

    python -m benchmarks.explain_smollm2 [--recipe w8a8-plain] [--out benchmarks/out/explain_smollm2] [--samples 8] [--candidates 12] [--reuse] [--quick]
    python -m benchmarks.explain_smollm2 --render benchmarks/out/explain_smollm2/explain_smollm2.json   # markdown only

``--reuse`` takes the artifact an earlier run left in ``--out`` only if the tree that built it is
this one (the same commit, neither with uncommitted changes: ``benchmarks.harness.check_reuse``).

Writes ``<out>/explain_smollm2.json`` and ``.md`` and replaces the section
"## explain: error attribution on SmolLM2-135M" of ``benchmarks/RESULTS.md`` (other
sections are kept; ``--quick`` leaves RESULTS.md alone). About 35 minutes on a 2-core machine
under a load average of 5 (two compiles of SmolLM2, about 5 minutes each; explain 15 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    OUT,
    clear_stamp,
    command_line,
    git_state,
    results_target,
    reuse_allowed,
    stamp_artifact,
    tree_line,
    update_results,
    versions,
)

SECTION = "## explain: error attribution on SmolLM2-135M"
MODEL = "smollm2-135m"


def _kl(art: Path) -> dict[str, Any]:
    acc = json.loads((art / "manifest.json").read_text())["accuracy"]
    return {k: acc.get(k) for k in ("kl", "perplexity", "perplexity_fp32", "perplexity_increase", "top1_agreement")}


def run(args) -> dict[str, Any]:
    from lowbit.compiler.driver import compile
    from lowbit.compiler.explain import explain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"calibration.samples": 8, "evaluation.samples": 4} if args.quick else {}
    art = out / args.recipe
    times: dict[str, float] = {}
    if not (args.reuse and (art / "manifest.json").is_file() and reuse_allowed(art, args.tree)):
        clear_stamp(art)
        t = time.perf_counter()
        compile(MODEL, art, recipe=args.recipe, settings=settings, measure_latency=False, keep_reference=True, progress=False,
                overwrite=True)
        times["compile_s"] = time.perf_counter() - t
        stamp_artifact(art, args.tree)
    manifest = json.loads((art / "manifest.json").read_text())

    # the down_proj layers with the largest calibrated input absmax (the outlier-heavy inputs):
    # their promotion is measured whatever their local SQNR, so the question gets a measured answer
    acts = manifest["calibration"]["activations"]
    absmax = {name: acts[info["input"]]["absmax_max"] for name, info in manifest["layers"].items() if info.get("input") in acts}
    ratio = {name: acts[info["input"]]["outlier_ratio"] for name, info in manifest["layers"].items() if info.get("input") in acts}
    downs = sorted((n for n in absmax if n.endswith("down_proj")), key=absmax.get, reverse=True)

    t = time.perf_counter()
    e = explain(art, samples=args.samples, candidates=args.candidates, measure=downs[:5], progress=False)
    times["explain_s"] = time.perf_counter() - t
    top5 = e["attribution"][:5]
    rows = {r["name"]: r for r in e["layers"]}

    after = out / f"{args.recipe}-overridden"
    t = time.perf_counter()
    compile(MODEL, after, recipe=args.recipe, settings=settings, overrides=e["suggested_overrides"], measure_latency=False, progress=False,
            overwrite=True)
    times["recompile_s"] = time.perf_counter() - t

    # the two compiles must differ by the overrides only (the repository may change in between)
    recipe_after = json.loads((after / "manifest.json").read_text())["recipe"]
    strip = lambda rec: [{k: v for k, v in p.items() if k != "overrides"} for p in rec["passes"]]  # noqa: E731
    same_recipe = strip(recipe_after) == strip(manifest["recipe"])
    return {
        "same_recipe": same_recipe,
        "recipe": manifest["recipe"]["name"],
        "recipe_passes": [p["pass"] for p in manifest["recipe"]["passes"]],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "versions": versions() | {"python": platform.python_version()},
        "machine": {"cores": os.cpu_count(), "load_start": args.load_start, "load_end": os.getloadavg()[0]},
        "lowbit_tree": args.tree,
        "settings": {"samples": e["samples"], "candidates": args.candidates, "quick": args.quick},
        "times": times,
        "explain_seconds": e["seconds"],
        "reproduced": e["reproduced"],
        "bisect": [{k: s.get(k) for k in ("index", "pass", "modified", "metric", "delta")} for s in e["bisect"]],
        "bisect_max": e["bisect_max"],
        "layers": len(e["layers"]),
        "candidates": e["candidates"],
        "attribution_top10": [
            {"layer": n, "contribution": rows[n]["contribution"], "sqnr_local_db": rows[n]["sqnr_local_db"],
             "input_absmax": absmax.get(n), "input_outlier_ratio": ratio.get(n)}
            for n in e["attribution"][:10]
        ],
        "down_proj_by_input_absmax": [
            {"layer": n, "input_absmax": absmax[n], "input_outlier_ratio": ratio[n], "in_top5": n in top5,
             "rank": rows[n].get("rank"), "contribution": rows[n].get("contribution"), "sqnr_local_db": rows[n]["sqnr_local_db"]}
            for n in downs[:5]
        ],
        "depth": {"largest_drop": e["depth"].get("largest_drop"), "most_local_error": e["depth"].get("most_local_error")},
        "suggestions": e["suggestions"],
        "kl_before": _kl(art),
        "kl_explain_windows": e["base_metric"],
        "kl_predicted": e["metric_with_suggestions"],
        "explain_timings": e.get("timings"),
        "kl_after": _kl(after),
    }


def render(r: dict[str, Any]) -> str:
    f = lambda v, fmt=".4g": "-" if v is None else format(v, fmt)  # noqa: E731
    b, a = r["kl_before"], r["kl_after"]
    lines = [
        SECTION,
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"ONNX Runtime {r['versions']['onnxruntime']}, torch {r['versions']['torch']}, Python {r['versions']['python']}; "
        f"{r['machine']['cores']} cores, load average {f(r['machine']['load_start'], '.1f')} / {f(r['machine']['load_end'], '.1f')} (start / end)  ",
        "Times: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in r["times"].items()) + "  ",
        *([tree_line(r["lowbit_tree"]) + "  "] if "lowbit_tree" in r else []),
        "",
        f"SmolLM2-135M, `recipe=\"{r.get('recipe', 'w8a8')}\"` (passes: {', '.join(r['recipe_passes'])}). "
        f"`lowbit explain` on {r['settings']['samples']} held-out windows of 128 tokens; promotions measured for "
        f"{len(r['candidates'])} of {r['layers']} linears (the {r['settings']['candidates']} with the lowest local SQNR, lm_head, "
        "and the 5 down_proj layers with the largest input absmax). "
        f"The replayed compile {'reproduces the artifact exactly' if r['reproduced']['exact'] else 'DIFFERS from the artifact'} "
        f"(max |Δlogit| {r['reproduced']['max_abs_output_diff']:.2g}).",
        "",
        f"Pass that moved the output most: **{r['bisect_max']['pass']}** (KL {r['bisect_max']['delta']:+.4g}). "
        + "Bisect: " + ", ".join(f"{s['pass']} {f(s['metric'], '.3g')}" for s in r["bisect"] if s["modified"]) + ".",
        "",
        "Top of the attribution (share of the final KL removed by promoting the layer alone to fp32):",
        "",
        "| rank | layer | contribution | local SQNR dB | input absmax | input outlier ratio |",
        "|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(r["attribution_top10"], 1):
        lines.append(f"| {i} | {t['layer']} | {t['contribution']:.1%} | {f(t['sqnr_local_db'], '.1f')} | {f(t['input_absmax'], '.3g')} | {f(t['input_outlier_ratio'], '.0f')} |")
    lines += [
        "",
        "down_proj layers with the largest calibrated input absmax:",
        "",
        "| layer | input absmax | outlier ratio | local SQNR dB | contribution | explain rank | in top 5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in r["down_proj_by_input_absmax"]:
        share = "-" if d["contribution"] is None else f"{d['contribution']:.1%}"
        lines.append(f"| {d['layer']} | {d['input_absmax']:.3g} | {d['input_outlier_ratio']:.0f} | {f(d['sqnr_local_db'], '.1f')} | "
                     f"{share} | {d['rank'] or '-'} | {'yes' if d['in_top5'] else 'no'} |")
    downs = r["down_proj_by_input_absmax"]
    first, top3 = downs[0], sum(d["in_top5"] for d in downs[:3])
    lines += [
        "",
        f"{'PASS' if first['in_top5'] else 'FAIL'}: the down_proj layer with the largest input absmax ({first['layer']}) is in the top 5 "
        f"(rank {first['rank'] or '-'}); {top3} of the 3 with the largest input absmax are.",
        "",
        "Suggested overrides (largest KL reduction per byte added; w8a16 adds none and ranks by its gain): "
        + ", ".join(f"`--override \"{s['override']}\"`" for s in r["suggestions"]) + ".",
        "",
        "| | KL vs fp32 | perplexity (fp32 " + f(b["perplexity_fp32"], ".4g") + ") | top-1 agreement |",
        "|---|---|---|---|",
        f"| {r.get('recipe', 'w8a8')} | {f(b['kl'])} | {f(b['perplexity'])} ({b['perplexity_increase']:+.2%}) | {b['top1_agreement']:.2%} |",
        f"| explain, on its {r['settings']['samples']} windows: {r.get('recipe', 'w8a8')} → with the 3 overrides | {f(r['kl_explain_windows'])} → {f(r['kl_predicted'])} "
        f"({r['kl_predicted'] / r['kl_explain_windows'] - 1:+.1%}) | | |",
        f"| {r.get('recipe', 'w8a8')} recompiled with the 3 overrides | {f(a['kl'])} | {f(a['perplexity'])} ({a['perplexity_increase']:+.2%}) | {a['top1_agreement']:.2%} |",
        "",
        ("" if r["same_recipe"] else "INVALID COMPARISON: the recipe changed between the two compiles. ")
        + f"{'PASS' if a['kl'] < b['kl'] else 'FAIL'}: the overrides lower the measured KL "
        f"({a['kl'] / b['kl'] - 1:+.1%} relative). Explain measures on its {r['settings']['samples']} windows "
        "(and picks the overrides there), the manifests on the compile's 16.",
        "",
        "- Raw numbers: `benchmarks/out/explain_smollm2/explain_smollm2.json`; per-layer details in the artifact's `explain.json`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w8a8-plain", help="recipe to compile and explain (default w8a8-plain: no smoothing or rotation)")
    p.add_argument("--out", default=str(OUT / "explain_smollm2"))
    p.add_argument("--samples", type=int, default=8, help="held-out windows explain measures on (default 8)")
    p.add_argument("--candidates", type=int, default=12, help="layers whose promotion is measured (default 12)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the artifact in --out if it is there and this tree built it (same commit, no uncommitted changes)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer samples; RESULTS.md untouched")
    p.add_argument("--results", type=Path, help="markdown file whose section to replace (default benchmarks/RESULTS.md)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render the markdown from a JSON this script wrote")
    args = p.parse_args(argv)
    args.load_start = os.getloadavg()[0]
    args.command = command_line(__spec__.name, argv)
    args.tree = git_state()
    if args.quick:
        args.samples, args.candidates = 2, 4
    r = json.loads(args.render.read_text()) if args.render else run(args)
    out = Path(args.out)
    (out / "explain_smollm2.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    md = render(r)
    (out / "explain_smollm2.md").write_text(md)
    print(md)
    target = results_target(args.results, args.quick)
    if target is not None:
        update_results(target, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
