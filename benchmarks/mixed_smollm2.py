"""Mixed precision on SmolLM2-135M: measured sensitivity + ILP against uniform 4-bit and random plans.

What it does, in one process:

1. export SmolLM2-135M once and run the ``mixed`` recipe up to its planner (canonicalize,
   fold-norms, rotate, recognize, calibrate) on the default text's calibration windows;
2. run ``plan-mixed`` at ``--budget 5.0bits``: the sensitivity analysis (every linear x every
   candidate, timed), the cost table and the ILP, with ``pareto_points`` more budgets solved;
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

Usage::

    python benchmarks/mixed_smollm2.py [--out benchmarks/out/mixed_smollm2] [--latency 0.6] [--scaling 10 20]

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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SECTION = "## Mixed precision: SmolLM2-135M"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(model_name: str, layers: int | None, calib: int, evals: int, seq_len: int):
    """(model at the planner, compile context, held-out feeds, held-out ids, seconds)."""
    from lowbit.compiler.data import split_text
    from lowbit.compiler.frontend import load_source
    from lowbit.compiler.passbase import CompileContext, assign_debug_ids
    from lowbit.compiler.pipeline import run_pipeline
    from lowbit.compiler.recipe import load_recipe
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
    import lowbit.compiler.sensitivity as sens_mod
    from lowbit.compiler.plan import read_plan
    from lowbit.passes.plan_mixed import NOTES_KEY, PlanMixedPrecisionPass

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


def evaluate(graph, scorer, feeds, choice) -> dict[str, float]:
    s = scorer.score(graph.run(feeds, np.asarray(choice, np.int64)))
    return {"kl": s["metric"], "ppl_increase": math.expm1(s["dnll"]), "dnll": s["dnll"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "mixed_smollm2")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (the recipe's 32)")
    ap.add_argument("--evals", type=int, default=16, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="calibration windows the sensitivities are measured on")
    ap.add_argument("--budgets", type=float, nargs="+", default=[5.0, 6.0])
    ap.add_argument("--candidates", nargs="+", default=None, help="plan-mixed candidates (default: the recipe's)")
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--pareto", type=int, default=6)
    ap.add_argument("--latency", type=float, default=None, help="also compile under --budget-latency this fraction")
    ap.add_argument("--scaling", type=int, nargs="*", default=[], help="truncated layer counts to time the analysis on")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section to replace ('': none)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOWBIT_CACHE", str(args.out / "cache"))
    out_json = args.out / "mixed_smollm2.json"
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=1, default=float) + "\n")

    _log("export + recipe up to the planner")
    model, context, evals, prep_s = prepare(args.model, None, args.calib, args.evals, args.seq_len)
    res["prepare_seconds"] = prep_s
    options = {"budget": f"{args.budgets[0]}bits", "samples": args.samples, "pareto_points": args.pareto,
               "cost_table": str(args.out / "costs.json"), "measure_latency": args.latency is not None}
    if args.candidates:
        options["candidates"] = args.candidates
    _log(f"plan-mixed {options}")
    plan, notes, graph, plan_s = run_planner(model, context, options)
    res["analysis"] = {"planner_seconds": plan_s, "timings": notes["timings"], "sensitivity": notes["sensitivity"],
                       "layers": len(plan.layers), "load_average_after": os.getloadavg()}
    save()

    from lowbit.compiler import allocate
    from lowbit.compiler.sensitivity import Scorer, reference_outputs

    layers = [lay.name for lay in graph.layers]
    cands, S, B, allowed = matrices(notes, layers)
    weights = np.array([lay.shape[0] * lay.shape[1] for lay in graph.layers], float)
    bits = B * 8 / weights.sum()
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
        res["latency"] = latency_check(args, notes)
        save()
    if args.scaling:
        res["scaling"] = [{"layers": len(layers), "analysis_seconds": notes["timings"]["analysis"],
                           "sensitivity_runs": notes["sensitivity"]["runs"]}]
        for n in args.scaling:
            _log(f"scaling: {n} layers")
            m2, c2, _, _ = prepare(args.model, n, args.calib, 1, args.seq_len)
            _, n2, g2, _ = run_planner(m2, c2, {**options, "pareto_points": 0, "cache": False, "measure_latency": False})
            res["scaling"].append({"layers": n, "analysis_seconds": n2["timings"]["analysis"],
                                   "sensitivity_runs": n2["sensitivity"]["runs"]})
            del m2, c2, g2
            save()
    if args.results:
        write_section(Path(args.results), markdown(res))
    _log(f"wrote {out_json}")
    return 0


def latency_check(args, notes) -> dict[str, Any]:
    """Compile under --budget-latency (the sensitivities are cached) and measure the artifact."""
    from lowbit.compiler.driver import compile as lowbit_compile

    out = args.out / "latency_artifact"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = lowbit_compile(args.model, out, recipe="mixed", progress=False,
                            settings={"plan-mixed.budget_latency": f"{args.latency}x", "plan-mixed.samples": args.samples,
                                      "plan-mixed.pareto_points": 0,
                                      "plan-mixed.cost_table": str(args.out / "costs.json")})
    m = result.manifest
    n = m["notes"]["plan-mixed"]
    t = f"T={n['latency']['seq_len']}"
    lat = m["latency"].get(t, {})
    measured = lat.get("ms", float("nan")) / lat.get("fp32_ms", float("nan"))
    return {"budget": args.latency, "predicted_ratio": n["achieved"].get("predicted_latency_ratio"),
            "measured_ratio": measured, "measured": lat, "within_10_percent": bool(measured <= args.latency * 1.1),
            "accuracy": m["accuracy"], "counts": n["counts"]}


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.2%}"


def markdown(res: dict[str, Any]) -> str:
    a = res.get("analysis", {})
    t = a.get("timings", {})
    st = res["settings"]
    cmd = (f"python benchmarks/mixed_smollm2.py --samples {st['samples']} --calib {st['calib']} --evals {st['evals']}"
           + (f" --candidates {' '.join(st['candidates'])}" if st.get("candidates") else ""))
    lines = [SECTION, "",
             f"`{cmd}` ({res['date']}; {res['machine']['cpus']} CPUs, load average at start "
             f"{res['machine']['load_average_at_start'][0]:.1f} — the machine is shared). Sizes are average bits per "
             "linear weight **with scales and zero points** (stored bytes x 8 / weights). KL and perplexity are measured "
             f"on {res['settings']['evals']} held-out windows of {res['settings']['seq_len']} tokens that the planner "
             "never saw, in the planner's ONNX Runtime session (the kernels `lower-ort` emits, each layer switched by an "
             "input); sensitivities on the first "
             f"{res['settings']['samples']} calibration windows.", ""]
    if a:
        lines += [f"Sensitivity analysis: {a['layers']} linears x {a['sensitivity']['candidates']} candidates, "
                  f"{a['sensitivity']['runs']} runs: {t.get('analysis', 0):.0f} s in all (GPTQ Hessians "
                  f"{t.get('hessians', 0):.0f} s, building the candidate branches {t.get('build_graph', 0):.0f} s, runs "
                  f"{t.get('sensitivity_runs', 0):.0f} s = {a['sensitivity'].get('seconds_per_run') or 0:.2f} s each); "
                  f"planner total {a['planner_seconds']:.0f} s; load average when it ended "
                  f"{(a.get('load_average_after') or [float('nan')])[0]:.1f} on {res['machine']['cpus']} CPUs. Target: 15 min (900 s): "
                  f"{'PASS' if t.get('analysis', 1e9) <= 900 else 'FAIL'}.", ""]
    for row in res.get("budgets", []):
        b = row["budget_bits"]
        lines += [f"**{b:g} bits per linear weight**", "",
                  "| plan | bits/weight | KL | perplexity increase |", "|---|---|---|---|"]
        m = row["mixed"]
        lines.append(f"| mixed (ILP) | {m['bits']:.3f} | {m['kl']:.4g} | {_pct(m['ppl_increase'])} |")
        for k, v in row.items():
            if k.startswith("uniform"):
                lines.append(f"| {k} | {v['bits']:.3f} | {v['kl']:.4g} | {_pct(v['ppl_increase'])} |")
        for i, r in enumerate(row.get("random", [])):
            lines.append(f"| random {i + 1} | {r['bits']:.3f} | {r['kl']:.4g} | {_pct(r['ppl_increase'])} |")
        uni = [v for k, v in row.items() if k.startswith("uniform")]
        best = row.get("best_random")
        beats_uni = all(m["ppl_increase"] < u["ppl_increase"] for u in uni) if uni else None
        beats_rand = best is not None and m["ppl_increase"] < best["ppl_increase"]
        lines += ["", f"mixed counts: {m['counts']}. Beats uniform 4-bit at the same or smaller size: "
                      f"{'PASS' if beats_uni else 'FAIL' if beats_uni is not None else 'n/a'}; beats the best of "
                      f"{len(row.get('random', []))} random plans: {'PASS' if beats_rand else 'FAIL'}.", ""]
    if res.get("pareto"):
        lines += ["Predicted (sum of per-layer sensitivities) vs measured KL over the Pareto plans:", "",
                  "| bits/weight | predicted KL | measured KL (calibration) | measured KL (held-out) | perplexity increase |",
                  "|---|---|---|---|---|"]
        for p in res["pareto"]:
            lines.append(f"| {p['bits']:.3f} | {p['predicted_kl']:.4g} | {p['measured_kl_calibration']:.4g} | {p['kl']:.4g} | {_pct(p['ppl_increase'])} |")
        rho = res.get("spearman_predicted_vs_heldout")
        if rho is not None:
            lines += ["", f"Spearman rank correlation, predicted vs held-out measured KL: {rho:.3f} "
                          f"({'PASS' if rho >= 0.8 else 'FAIL'} against 0.8); vs calibration measured: "
                          f"{res.get('spearman_predicted_vs_calibration', float('nan')):.3f}.", ""]
    if res.get("latency"):
        lat = res["latency"]
        lines += [f"Latency budget {lat['budget']}x of fp32: predicted {lat['predicted_ratio']:.3f}x, the artifact measured "
                  f"{lat['measured_ratio']:.3f}x ({'PASS' if lat['within_10_percent'] else 'FAIL'}: within 10%).", ""]
    else:
        lines += ["Latency budget: not measured in this run (`--latency 0.6` compiles and times an artifact).", ""]
    if not res.get("scaling"):
        lines += ["Scaling of the analysis with depth: not measured in this run (`--scaling 10 20`).", ""]
    if res.get("scaling"):
        lines += ["| layers | analysis seconds | runs |", "|---|---|---|"]
        for s in sorted(res["scaling"], key=lambda s: s["layers"]):
            lines.append(f"| {s['layers']} | {s['analysis_seconds']:.0f} | {s['sensitivity_runs']} |")
        lines.append("")
    lines.append(f"- Raw numbers: `{Path(res['settings']['out']).relative_to(HERE.parent) if Path(res['settings']['out']).is_relative_to(HERE.parent) else res['settings']['out']}/mixed_smollm2.json`.")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping the others."""
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
