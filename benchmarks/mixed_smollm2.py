"""Mixed precision on SmolLM2-135M: measured sensitivity + ILP against uniform 4-bit and random plans.

What it does, in one process:

1. export SmolLM2-135M once and run the ``mixed`` recipe up to its planner (canonicalize,
   fold-norms, rotate, recognize, calibrate) on the default text's calibration windows;
2. run ``plan-mixed`` at ``--budget 5.0bits``: the sensitivity analysis (timed; ``--sensitivity
   scaled``, the default: one exact run per linear, its other candidates scaled by their local
   output errors; ``exact``: one run per linear and candidate), the cost table and the ILP, with
   ``pareto_points`` more budgets solved; with ``scaled``, every ``--validate-every``-th linear
   is also measured exactly and the two compared;
3. with the planner's own ONNX Runtime session (every linear switchable between the kernels
   the artifact runs) measure, on **held-out** windows the planner never saw, for budgets of
   5.0 and 6.0 bits per linear weight (scales included):

   * the mixed plan (ILP on the measured sensitivities);
   * uniform 4-bit at the same or a smaller size: W4A16 with groups of 128 (4.25 bits) and of
     32 (5.0 bits), GPTQ as in the planner;
   * 5 random plans meeting the same budget (layers visited in random order, each given a
     random candidate that leaves the rest feasible);

   reporting KL from fp32 and perplexity;
4. predicted (summed sensitivities) against measured (whole plan, held-out) KL over the Pareto
   plans: Spearman rank correlation;
5. optionally (``--latency 0.6``) compile an artifact under ``--budget-latency`` and compare
   the latency the driver measures with the budget;
6. optionally (``--scaling 10 20``) the analysis time on SmolLM2 truncated to 10, 20 layers
   (the full model gives the 30-layer point).

``--only latency`` / ``--only scaling`` redo step 5 or 6 alone (e.g. on a quieter machine)
and merge it into the earlier run's JSON and section.

Usage::

    python -m benchmarks.mixed_smollm2 [--out benchmarks/out/mixed_smollm2] [--latency 0.6] [--scaling 10 20]
    python -m benchmarks.mixed_smollm2 --only scaling --scaling 30

Writes ``<out>/mixed_smollm2.json`` (after every stage, so a long run keeps what it measured)
and replaces the section "## Mixed precision: SmolLM2-135M" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    OUT,
    REPO,
    RESULTS_MD,
    git_state,
    results_target,
    table,
    tree_line,
    update_results,
)

SECTION = "## Mixed precision: SmolLM2-135M"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(model_name: str, layers: int | None, calib: int, evals: int, seq_len: int):
    """(model at the planner, compile context, held-out feeds, held-out ids, seconds)."""
    from lowbit.compiler.core.data import split_text
    from lowbit.compiler.core.passbase import CompileContext, assign_debug_ids
    from lowbit.compiler.core.pipeline import run_pipeline
    from lowbit.compiler.core.recipe import load_recipe
    from lowbit.compiler.frontend import load_source
    from lowbit.models import load_model
    from lowbit.models.llama import LlamaAdapter

    start = time.perf_counter()
    adapter = load_model(model_name)
    if layers is not None:
        hf = adapter.hf_model
        hf.model.layers = hf.model.layers[:layers]
        hf.config.num_hidden_layers = layers
        if getattr(hf.config, "layer_types", None):
            hf.config.layer_types = hf.config.layer_types[:layers]
        adapter = LlamaAdapter(hf, name=f"{model_name}-{layers}l", tokenizer=adapter.tokenizer)
    model, adapter = load_source(adapter)
    assign_debug_ids(model)
    split = split_text(adapter.tokenizer, calib_data=None, eval_data=None, calib_samples=calib,
                       eval_samples=evals, seq_len=seq_len)
    cal = [adapter.make_inputs([w]) for w in split.calibration]
    ev = [adapter.make_inputs([w]) for w in split.evaluation]
    recipe = load_recipe("mixed")
    upto = [p.name for p in recipe.passes].index("plan-mixed")
    context = CompileContext(calibration_batches=cal, adapter=adapter, progress=False)
    model = run_pipeline(model, recipe.build()[:upto], context=context)
    return model, context, ev, time.perf_counter() - start


def run_planner(model, context, options: dict[str, Any]):
    """plan-mixed on ``model``; returns (plan, notes, the session it built, seconds)."""
    import lowbit.compiler.analysis.sensitivity as sens_mod
    from lowbit.compiler.analysis.plan_mixed import NOTES_KEY, PlanMixedPrecisionPass
    from lowbit.compiler.core.plan import read_plan

    built = []
    original = sens_mod.SensitivityGraph

    class Keep(original):  # keep the planner's session: every plan below is measured in it
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    sens_mod.SensitivityGraph = Keep
    try:
        p = PlanMixedPrecisionPass(**options)
        p.context = dataclasses.replace(context, notes={})
        start = time.perf_counter()
        p(model)
        seconds = time.perf_counter() - start
    finally:
        sens_mod.SensitivityGraph = original
    return read_plan(model), p.context.notes[NOTES_KEY], built[-1], seconds


def matrices(notes: dict[str, Any], layers: list[str]):
    cands = notes["candidates"]
    table = notes["table"]
    S = np.array([[table[l].get(c, {}).get("metric", np.inf) for c in cands] for l in layers])
    B = np.array([[table[l].get(c, {}).get("bytes", np.inf) for c in cands] for l in layers])
    allowed = np.isfinite(S) & np.isfinite(B)
    return cands, np.where(allowed, S, 0.0), np.where(allowed, B, 0.0), allowed


def random_plan(rng, bits: np.ndarray, allowed: np.ndarray, budget: float) -> np.ndarray:
    """Layers in random order, each a random candidate that leaves the others (at their cheapest) feasible."""
    L, C = bits.shape
    cheapest = np.where(allowed, bits, np.inf).min(axis=1)
    choice = np.argmin(np.where(allowed, bits, np.inf), axis=1)
    spent = float(cheapest.sum())
    for i in rng.permutation(L):
        options = [j for j in range(C) if allowed[i, j] and spent - cheapest[i] + bits[i, j] <= budget]
        j = int(rng.choice(options))
        spent += bits[i, j] - bits[i, choice[i]]
        choice[i] = j
    return choice


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def validate(graph, context, notes, args) -> dict[str, Any]:
    """Exact (one run per layer and candidate) against scaled sensitivities on every Nth layer."""
    from lowbit.compiler.analysis.sensitivity import Scorer, measure, reference_outputs
    from lowbit.compiler.core.data import batched

    batches = batched(context.calibration_batches[: args.samples], 2048)
    scorer = Scorer(reference_outputs(graph, batches), [b["input_ids"] for b in batches])
    layers = [lay.name for lay in graph.layers][:: args.validate_every]
    table = notes["table"]
    pairs = [(layer, c) for layer in layers for c in table[layer] if c != "fp32"]
    exact, record = measure(graph, batches, scorer, pairs, show_progress=False)
    e = [exact[p]["metric"] for p in pairs]
    sc = [table[layer][c]["metric"] for layer, c in pairs]
    # within a layer, the order of its candidates (what the solver trades against bytes)
    within = [spearman([exact[(layer, c)]["metric"] for c in table[layer] if c != "fp32"],
                       [table[layer][c]["metric"] for c in table[layer] if c != "fp32"]) for layer in layers]
    return {"layers": len(layers), "pairs": len(pairs), "spearman": spearman(e, sc),
            "median_ratio_scaled_to_exact": float(np.median(np.array(sc) / np.maximum(e, 1e-12))),
            "within_layer_spearman_median": float(np.nanmedian(within)), "exact_record": record,
            "values": [{"layer": layer, "candidate": c, "exact": exact[(layer, c)]["metric"],
                        "scaled": table[layer][c]["metric"]} for layer, c in pairs]}


def evaluate(graph, scorer, feeds, choice) -> dict[str, float]:
    s = scorer.score(graph.run(feeds, np.asarray(choice, np.int64)))
    return {"kl": s["metric"], "ppl_increase": math.expm1(s["dnll"]), "dnll": s["dnll"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=OUT / "mixed_smollm2")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (the recipe's 32)")
    ap.add_argument("--evals", type=int, default=16, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="calibration windows the sensitivities are measured on")
    ap.add_argument("--sensitivity", choices=["exact", "scaled"], default="scaled",
                    help="plan-mixed.sensitivity: one run per (layer, candidate), or one per layer scaled by local errors")
    ap.add_argument("--validate-every", type=int, default=5,
                    help="with --sensitivity scaled: measure every Nth layer exactly too, and compare (0: no)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[5.0, 6.0])
    ap.add_argument("--candidates", nargs="+", default=None, help="plan-mixed candidates (default: the recipe's)")
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--pareto", type=int, default=6)
    ap.add_argument("--latency", type=float, default=None, help="also compile under --budget-latency this fraction")
    ap.add_argument("--scaling", type=int, nargs="*", default=[], help="truncated layer counts to time the analysis on")
    ap.add_argument("--results", default=str(RESULTS_MD), help="markdown file whose section to replace ('': none)")
    ap.add_argument("--only", choices=["latency", "scaling"],
                    help="only the --latency check or the --scaling runs, merged into an earlier run's JSON and section")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "mixed_smollm2.json"
    if args.only:
        res = json.loads(out_json.read_text())
        if args.only == "latency":
            if args.latency is None:
                ap.error("--only latency needs --latency X")
            os.environ.setdefault("LOWBIT_CACHE", str(args.out / "cache"))  # the earlier run's sensitivities
            res["settings"]["latency"] = args.latency
            res["latency"] = latency_check(args)
        else:
            if not args.scaling:
                ap.error("--only scaling needs --scaling N [N ...]")
            options = {"budget": f"{args.budgets[0]}bits", "samples": args.samples, "sensitivity": args.sensitivity,
                       "cost_table": str(args.out / "costs.json"), **({"candidates": args.candidates} if args.candidates else {})}
            done = {s["layers"]: s for s in res.get("scaling", [])}
            done.update({s["layers"]: s for s in scaling(args, options)})
            res["scaling"] = sorted(done.values(), key=lambda s: s["layers"])
            res["settings"]["scaling"] = sorted(done)
        out_json.write_text(json.dumps(res, indent=1, default=float) + "\n")
        write_section(results_target(args.results), markdown(res))
        return 0
    if "LOWBIT_CACHE" not in os.environ:  # a fresh cache: the analysis is timed, not read back
        shutil.rmtree(args.out / "cache", ignore_errors=True)
        os.environ["LOWBIT_CACHE"] = str(args.out / "cache")
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "python": platform.python_version()},
        "lowbit_tree": git_state(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=1, default=float) + "\n")

    _log("export + recipe up to the planner")
    model, context, evals, prep_s = prepare(args.model, None, args.calib, args.evals, args.seq_len)
    res["prepare_seconds"] = prep_s
    options = {"budget": f"{args.budgets[0]}bits", "samples": args.samples, "pareto_points": args.pareto,
               "sensitivity": args.sensitivity,
               "cost_table": str(args.out / "costs.json"), "measure_latency": args.latency is not None}
    if args.candidates:
        options["candidates"] = args.candidates
    _log(f"plan-mixed {options}")
    plan, notes, graph, plan_s = run_planner(model, context, options)
    res["analysis"] = {"planner_seconds": plan_s, "timings": notes["timings"], "sensitivity": notes["sensitivity"],
                       "layers": len(plan.layers), "load_average_after": os.getloadavg()}
    save()

    from lowbit.compiler.analysis import allocate
    from lowbit.compiler.analysis.sensitivity import Scorer, reference_outputs

    layers = [lay.name for lay in graph.layers]
    cands, S, B, allowed = matrices(notes, layers)
    weights = np.array([lay.shape[0] * lay.shape[1] for lay in graph.layers], float)
    bits = B * 8 / weights.sum()
    if args.sensitivity == "scaled" and args.validate_every:
        _log(f"exact sensitivities of every {args.validate_every}th layer, against the scaled ones")
        res["validation"] = validate(graph, context, notes, args)
        save()

    _log("held-out reference")
    scorer = Scorer(reference_outputs(graph, evals), [f["input_ids"] for f in evals])
    rows = []
    rng = np.random.default_rng(0)
    for budget in args.budgets:
        con = allocate.Constraint("budget", bits, budget)
        mixed = allocate.solve(S, allowed, [con])
        entry = {"budget_bits": budget, "mixed": {"bits": allocate.total(bits, mixed), "predicted_kl": allocate.total(S, mixed),
                                                  **evaluate(graph, scorer, evals, mixed),
                                                  "counts": {c: int((mixed == j).sum()) for j, c in enumerate(cands) if (mixed == j).any()}}}
        for name in ("w4a16-g128", "w4a16-g32"):
            j = cands.index(name)
            uni = np.full(len(layers), j)
            if allocate.total(bits, uni) <= budget + 1e-9:
                entry[f"uniform {name}"] = {"bits": allocate.total(bits, uni), **evaluate(graph, scorer, evals, uni)}
        rand = []
        for _ in range(args.random):
            ch = random_plan(rng, bits, allowed, budget)
            rand.append({"bits": allocate.total(bits, ch), "predicted_kl": allocate.total(S, ch), **evaluate(graph, scorer, evals, ch)})
        entry["random"] = rand
        entry["best_random"] = min(rand, key=lambda r: r["ppl_increase"]) if rand else None
        rows.append(entry)
        res["budgets"] = rows
        save()
        _log(f"budget {budget}: mixed {entry['mixed']['ppl_increase']:+.2%}")

    # predicted vs measured (held-out) over the planner's Pareto plans, re-solved here
    pareto = []
    for p in notes["pareto"]:
        ch = allocate.solve(S, allowed, [allocate.Constraint("budget", bits, p["bits_per_weight"] * (1 + 1e-9))])
        pareto.append({"bits": allocate.total(bits, ch), "predicted_kl": allocate.total(S, ch),
                       "measured_kl_calibration": p["measured"], **evaluate(graph, scorer, evals, ch)})
    res["pareto"] = pareto
    if len(pareto) >= 3:
        res["spearman_predicted_vs_heldout"] = spearman([p["predicted_kl"] for p in pareto], [p["kl"] for p in pareto])
        res["spearman_predicted_vs_calibration"] = spearman([p["predicted_kl"] for p in pareto],
                                                            [p["measured_kl_calibration"] for p in pareto])
    save()
    del graph, scorer

    if args.latency is not None:
        res["latency"] = latency_check(args)
        save()
    if args.scaling:
        depth = 1 + max(int(m.group(1)) for m in map(re.compile(r"\.layers\.(\d+)\.").search, layers) if m)
        res["scaling"] = [{"layers": depth, "linears": len(layers), "analysis_seconds": notes["timings"]["analysis"],
                           "sensitivity_runs": notes["sensitivity"]["runs"]}]
        for row in scaling(args, options):
            res["scaling"].append(row)
            save()
    write_section(results_target(args.results), markdown(res))
    _log(f"wrote {out_json}")
    return 0


def scaling(args, options):
    """The analysis on SmolLM2 truncated to each of ``--scaling`` decoder layers (a row each, as they finish)."""
    for n in args.scaling:
        _log(f"scaling: {n} layers")
        m2, c2, _, _ = prepare(args.model, n, args.calib, 1, args.seq_len)
        _, n2, g2, _ = run_planner(m2, c2, {**options, "pareto_points": 0, "cache": False, "measure_latency": False})
        yield {"layers": n, "linears": len(g2.layers), "analysis_seconds": n2["timings"]["analysis"],
               "sensitivity_runs": n2["sensitivity"]["runs"], "timings": n2["timings"],
               "load_average_after": os.getloadavg()}
        del m2, c2, g2


def latency_check(args) -> dict[str, Any]:
    """Compile under --budget-latency (the sensitivities are cached) and measure the artifact."""
    from lowbit.compiler.driver import compile as lowbit_compile

    out = args.out / "latency_artifact"
    if out.exists():
        shutil.rmtree(out)
    result = lowbit_compile(args.model, out, recipe="mixed", progress=False,
                            settings={"plan-mixed.budget_latency": f"{args.latency}x", "plan-mixed.samples": args.samples,
                                      "plan-mixed.sensitivity": args.sensitivity,
                                      "plan-mixed.pareto_points": 0,
                                      "plan-mixed.cost_table": str(args.out / "costs.json")})
    m = result.manifest
    n = m["notes"]["plan-mixed"]
    t = f"T={n['latency']['seq_len']}"
    lat = m["latency"].get(t, {})
    measured = lat.get("ms", float("nan")) / lat.get("fp32_ms", float("nan"))
    return {"budget": args.latency, "predicted_ratio": n["achieved"].get("predicted_latency_ratio"),
            "measured_ratio": measured, "measured": lat, "within_10_percent": bool(measured <= args.latency * 1.1),
            "accuracy": m["accuracy"], "counts": n["counts"], "planner_latency": n["latency"]}


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.2%}"


def markdown(res: dict[str, Any]) -> str:
    a = res.get("analysis", {})
    t = a.get("timings", {})
    st = res["settings"]
    cmd = (f"python -m benchmarks.mixed_smollm2 --samples {st['samples']} --calib {st['calib']} --evals {st['evals']}"
           f" --sensitivity {st.get('sensitivity', 'exact')}"
           + (f" --latency {st['latency']}" if st.get("latency") is not None else "")
           + (f" --scaling {' '.join(map(str, st['scaling']))}" if st.get("scaling") else "")
           + (f" --candidates {' '.join(st['candidates'])}" if st.get("candidates") else ""))
    lines = [SECTION, "",
             f"`{cmd}` ({res['date']}; {res['machine']['cpus']} CPUs, load average at start "
             f"{res['machine']['load_average_at_start'][0]:.1f} — the machine is shared). Sizes are average bits per "
             "linear weight **with scales and zero points** (stored bytes x 8 / weights). KL and perplexity are measured "
             f"on {res['settings']['evals']} held-out windows of {res['settings']['seq_len']} tokens that the planner "
             "never saw, in the planner's ONNX Runtime session (the kernels `lower-ort` emits, each layer switched by an "
             "input); sensitivities on the first "
             f"{res['settings']['samples']} calibration windows."
             + (f" {tree_line(res['lowbit_tree'])}." if res.get("lowbit_tree") else ""), ""]
    if a:
        method = a["sensitivity"].get("method", "exact")
        lines += [f"Sensitivity analysis ({method}: "
                  + ("one run per layer and candidate" if method == "exact" else
                     "one exact run per layer, its other candidates scaled by their local output errors")
                  + f"): {a['layers']} linears x {a['sensitivity']['candidates']} candidates, "
                  f"{a['sensitivity']['runs']} runs: {t.get('analysis', 0):.0f} s in all (GPTQ Hessians "
                  f"{t.get('hessians', 0):.0f} s, building the candidate branches {t.get('build_graph', 0):.0f} s, runs "
                  f"{t.get('sensitivity_runs', 0):.0f} s = {a['sensitivity'].get('seconds_per_run') or 0:.2f} s each); "
                  f"planner total {a['planner_seconds']:.0f} s; load average when it ended "
                  f"{(a.get('load_average_after') or [float('nan')])[0]:.1f} on {res['machine']['cpus']} CPUs. Target: 15 min (900 s): "
                  f"{'PASS' if t.get('analysis', 1e9) <= 900 else 'FAIL'}.", ""]
    v = res.get("validation")
    if v:
        r = v["exact_record"]
        lines += [f"Scaled against exact sensitivities on every {st['validate_every']}th linear ({v['layers']} layers, "
                  f"{v['pairs']} (layer, candidate) pairs, {r['runs']} exact runs of {r['seconds_per_run']:.2f} s each): "
                  f"Spearman {v['spearman']:.3f} over all pairs, median within a layer {v['within_layer_spearman_median']:.3f}; "
                  f"median scaled/exact ratio {v['median_ratio_scaled_to_exact']:.2f}.", ""]
    for row in res.get("budgets", []):
        b = row["budget_bits"]
        m = row["mixed"]
        plans = [("mixed (ILP)", m), *((k, v) for k, v in row.items() if k.startswith("uniform")),
                 *((f"random {i + 1}", r) for i, r in enumerate(row.get("random", [])))]
        lines += [f"**{b:g} bits per linear weight**", ""]
        lines += table(["plan", "bits/weight", "KL", "perplexity increase"],
                       [[k, f"{v['bits']:.3f}", f"{v['kl']:.4g}", _pct(v["ppl_increase"])] for k, v in plans])
        uni = [v for k, v in row.items() if k.startswith("uniform")]
        best = row.get("best_random")
        beats_uni = all(m["ppl_increase"] < u["ppl_increase"] for u in uni) if uni else None
        beats_rand = best is not None and m["ppl_increase"] < best["ppl_increase"]
        beats_uni_kl = all(m["kl"] < u["kl"] for u in uni) if uni else None
        lines += ["", f"mixed counts: {m['counts']}. Beats uniform 4-bit at the same or smaller size in perplexity: "
                      f"{'PASS' if beats_uni else 'FAIL' if beats_uni is not None else 'n/a'} (in KL, the planner's "
                      f"objective: {'PASS' if beats_uni_kl else 'FAIL' if beats_uni_kl is not None else 'n/a'}); "
                      "beats the best of "
                      f"{len(row.get('random', []))} random plans: {'PASS' if beats_rand else 'FAIL'}.", ""]
    if res.get("pareto"):
        lines += ["Predicted (sum of per-layer sensitivities) vs measured KL over the Pareto plans:", ""]
        lines += table(["bits/weight", "predicted KL", "measured KL (calibration)", "measured KL (held-out)", "perplexity increase"],
                       [[f"{p['bits']:.3f}", f"{p['predicted_kl']:.4g}", f"{p['measured_kl_calibration']:.4g}", f"{p['kl']:.4g}",
                         _pct(p["ppl_increase"])] for p in res["pareto"]])
        rho = res.get("spearman_predicted_vs_heldout")
        if rho is not None:
            lines += ["", f"Spearman rank correlation, predicted vs held-out measured KL: {rho:.3f} "
                          f"({'PASS' if rho >= 0.8 else 'FAIL'} against 0.8); vs calibration measured: "
                          f"{res.get('spearman_predicted_vs_calibration', float('nan')):.3f}.", ""]
    if res.get("latency"):
        lat = res["latency"]
        pl = lat.get("planner_latency") or {}
        lines += [f"Latency budget {lat['budget']}x of fp32 (T={pl.get('seq_len', 128)}): predicted {lat['predicted_ratio']:.3f}x, "
                  f"the artifact measured {lat['measured_ratio']:.3f}x "
                  f"({lat['measured']['ms']:.1f} vs {lat['measured']['fp32_ms']:.1f} ms; "
                  f"{'PASS' if lat['within_10_percent'] else 'FAIL'}: within 10%); plan {lat['counts']}, perplexity "
                  f"{_pct(lat['accuracy'].get('perplexity_increase'))}."
                  + (f" Micro-benchmarks scaled by {pl['micro_benchmark_scale']:.2f} to the model's measured fp32 "
                     f"linear time." if "micro_benchmark_scale" in pl else ""), ""]
    else:
        lines += ["Latency budget: not measured in this run (`--latency 0.6` compiles and times an artifact).", ""]
    if not res.get("scaling"):
        lines += ["Scaling of the analysis with depth: not measured in this run (`--scaling 10 20`).", ""]
    if res.get("scaling"):
        lines += ["Analysis time against depth (SmolLM2 truncated to its first layers):", "",
                  "| decoder layers | linears | analysis seconds | seconds per linear | runs | load average after |",
                  "|---|---|---|---|---|---|"]
        for s in sorted(res["scaling"], key=lambda s: s["layers"]):
            load = s.get("load_average_after")
            lines.append(f"| {s['layers']} | {s.get('linears', '-')} | {s['analysis_seconds']:.0f} | "
                         f"{s['analysis_seconds'] / s['linears'] if s.get('linears') else float('nan'):.2f} | "
                         f"{s['sensitivity_runs']} | " + (f"{load[0]:.1f} |" if load else "- |"))
        lines.append("")
    lines.append(f"- Raw numbers: `{Path(res['settings']['out']).relative_to(REPO) if Path(res['settings']['out']).is_relative_to(REPO) else res['settings']['out']}/mixed_smollm2.json`.")
    return "\n".join(lines) + "\n"


def write_section(path: Path | None, text: str) -> None:
    """Replace (or append) this benchmark's section of ``path`` (RESULTS.md; None: none), keeping the others."""
    if path is not None:
        update_results(path, text)


if __name__ == "__main__":
    sys.exit(main())
