"""plan-mixed (compiler/analysis/plan_mixed.py) on the trained stories260K: budgets, overrides, errors, --plan.

The pass runs on the model as the ``mixed`` recipe hands it over (canonicalized, norms
folded, rotated, calibrated). Most tests offer three candidates, RTN weights and one
calibration batch to stay fast; the sensitivities are still measured, not mocked.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.compiler.analysis.plan_mixed import NOTES_KEY, PlanMixedPrecisionPass
from lowbit.compiler.cli import main
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import run_pipeline
from lowbit.compiler.core.plan import read_plan
from lowbit.compiler.core.recipe import load_recipe
from lowbit.passes.recognize import find_linears
from tests.passes.real_models import fresh, windows

FAST = {
    "candidates": ["fp32", "w8a8", "w4a16-g32"],
    "samples": 1,
    "weight_algorithm_4bit": "rtn",
    "measure_latency": False,
    "pareto_points": 0,
}


@pytest.fixture(scope="module")
def calibrated(shared_dir, tmp_path_factory):
    """The stories260K graph just before the planner, serialized, and its compile context."""
    model, adapter = fresh(shared_dir / "stories260K" / "stories260K.bin")
    calib, _ = windows(adapter, calib=2, evals=1, seq_len=64, text=shared_dir.parent / "data" / "tinystories.txt")
    recipe = load_recipe("mixed")
    upto = [p.name for p in recipe.passes].index("plan-mixed")
    context = CompileContext(calibration_batches=calib, adapter=adapter, progress=False)
    model = run_pipeline(model, recipe.build()[:upto], context=context)
    return ir.to_proto(model).SerializeToString(), context, tmp_path_factory.mktemp("mixed-cache")


def plan_with(calibrated, **options):
    """(model, plan, notes) after plan-mixed with FAST options updated by ``options``."""
    data, context, cache = calibrated
    model = ir.from_proto(onnx.load_from_string(data))
    opts = {**FAST, "cost_table": str(cache / "costs.json"), **options}
    p = PlanMixedPrecisionPass(**opts)
    p.context = dataclasses.replace(context, notes={})
    result = p(model)
    assert result.modified
    return model, read_plan(model), p.context.notes[NOTES_KEY]


@pytest.fixture(autouse=True)
def private_cache(calibrated, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(calibrated[2]))


def _bits(plan, model) -> float:
    """Average bits per linear weight, from the plan's own per-layer costs."""
    shapes = {lin.name: lin.shape for lin in find_linears(model.graph)[0]}
    nbytes = sum(lp.cost["bytes"] for lp in plan.layers.values())
    return 8 * nbytes / sum(k * n for k, n in shapes.values())


def test_bits_budget_is_honoured_and_spent_on_the_sensitive_layers(calibrated):
    model, plan, notes = plan_with(calibrated, budget="6bits")
    assert set(plan.layers) == {lin.name for lin in find_linears(model.graph)[0]}
    achieved = notes["achieved"]["bits_per_weight"]
    assert achieved <= 6.0 + 1e-9 and _bits(plan, model) == pytest.approx(achieved)
    precisions = {lp.precision for lp in plan.layers.values()}
    assert {"w8a8", "w4a16"} <= precisions  # a real mix at this budget
    # every 4-bit layer is one whose 4-bit sensitivity is no larger than that of some 8-bit layer's
    # cheapest alternative would be: the solver spent the 8-bit budget where 4 bits hurt most
    table = notes["table"]
    four = [n for n, lp in plan.layers.items() if lp.precision == "w4a16"]
    eight = [n for n, lp in plan.layers.items() if lp.precision == "w8a8"]
    gain = lambda n: table[n]["w4a16-g32"]["metric"] - table[n]["w8a8"]["metric"]
    assert np.median([gain(n) for n in eight]) > np.median([gain(n) for n in four])
    # per-layer records: precision, granularity, group size, activations, algorithm, sensitivity, cost
    lp = plan.layers[four[0]].to_json()
    assert lp["granularity"] == "per-group" and lp["group_size"] == 32 and lp["weight_algorithm"] == "rtn"
    assert lp["sensitivity"]["kl"] == pytest.approx(table[four[0]]["w4a16-g32"]["metric"])
    assert lp["cost"]["bits_per_weight"] > 4.0 and lp["reason"].startswith("mixed")
    # the plan as a whole is measured; with layers interacting it differs, but not by orders
    assert notes["measured_calibration"]["metric"] == pytest.approx(notes["predicted"]["metric"], rel=0.5)


def test_bytes_budget_is_honoured_by_the_lowered_model(calibrated):
    # a budget between all-4-bit and all-8-bit; the artifact's weights, once quantized and lowered, fit it
    budget = 330_000
    model, _, notes = plan_with(calibrated, budget=f"{budget}B")
    assert notes["achieved"]["weight_bytes"] <= budget
    context = calibrated[1]
    tail = load_recipe("mixed")
    names = [p.name for p in tail.passes]
    rest = tail.build()[names.index("plan-mixed") + 1:]
    lowered = run_pipeline(model, rest, context=dataclasses.replace(context, notes={}))
    stored = sum(v.const_value.nbytes for v in lowered.graph.initializers.values() if v.const_value is not None)
    assert stored <= budget
    assert stored == pytest.approx(notes["achieved"]["weight_bytes"], rel=0.03)


def test_override_is_honoured(calibrated):
    # three fp32 layers take 9 bits per weight on average already: 10 bits leaves the rest to allocate
    _, plan, notes = plan_with(calibrated, budget="10bits",
                               overrides=["model.layers.0.mlp.*=fp32", "lm_head=w8a8"])
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert plan.layers[name].precision == "fp32"
        assert plan.layers[name].reason == "override model.layers.0.mlp.*=fp32"
    assert plan.layers["lm_head"].precision == "w8a8"
    assert notes["pinned"]["lm_head"] == "w8a8"
    assert notes["achieved"]["bits_per_weight"] <= 10.0 + 1e-9  # the others pay for the pinned fp32 layers
    assert "w4a16" in {lp.precision for lp in plan.layers.values()}


def test_override_to_a_group_size_outside_the_candidates(calibrated):
    _, plan, _ = plan_with(calibrated, budget="7bits", overrides=["lm_head=w4a8-g128"])
    lp = plan.layers["lm_head"]
    assert (lp.precision, lp.group_size) == ("w4a8", 128)
    assert lp.sensitivity["kl"] > 0  # measured, though not among the offered candidates


def test_infeasible_budget_names_the_nearest_feasible_one(calibrated):
    with pytest.raises(InputError) as e:
        plan_with(calibrated, budget="3bits")
    msg = str(e.value)
    assert "budget 3 bits per linear weight cannot be met" in msg
    nearest = float(msg.split("nearest feasible budget is ")[1].split(" bits")[0])
    assert nearest == pytest.approx(5.0, abs=0.2)  # every layer in 4 bits with a scale per 32 weights
    # and that budget is feasible
    _, _, notes = plan_with(calibrated, budget=f"{nearest + 0.001}bits")
    assert notes["counts"] == {"w4a16-g32": 36}


def test_infeasible_latency_budget(calibrated):
    with pytest.raises(InputError, match=r"latency budget 0\.\d+x of fp32 .* cannot be met.*nearest feasible latency budget is"):
        plan_with(calibrated, budget_latency="0.01x", measure_latency=True)


def test_latency_budget_is_honoured_by_the_prediction(calibrated):
    # stories260K is too small for int kernels to beat fp32 at 128 tokens; a budget above 1x
    # still has to trade: the slowest candidates are kept out where they cost most
    _, plan, notes = plan_with(calibrated, budget_latency="1.05x", measure_latency=True, latency_seq_len=32)
    lat = notes["latency"]
    assert lat["fp32_model_ms"] > 0 and lat["seq_len"] == 32
    # the non-linear part is measured (linears stubbed out); the micro-benchmarks are scaled to the rest
    assert 0 < lat["other_ms"] < lat["fp32_model_ms"] and lat["micro_benchmark_scale"] > 0
    fp32_linears = sum(row["fp32"]["ms"] for row in notes["table"].values())
    assert fp32_linears == pytest.approx(lat["fp32_model_ms"] - lat["other_ms"])
    ratio = notes["achieved"]["predicted_latency_ratio"]
    assert ratio <= 1.05 + 1e-9
    total = lat["other_ms"] + sum(lp.cost["latency_ms"] for lp in plan.layers.values())
    assert total / lat["fp32_model_ms"] == pytest.approx(ratio)
    assert all(lp.cost["seq_len"] == 32 for lp in plan.layers.values())


def test_accuracy_target_gives_the_smallest_plan_meeting_it(calibrated):
    _, plan, notes = plan_with(calibrated, max_kl=0.01)
    assert notes["mode"] == "target"
    assert notes["predicted"]["metric"] <= 0.01
    table = notes["table"]
    # the cheapest plan (all 4-bit) would exceed the target, so the answer is a real trade-off
    assert sum(row["w4a16-g32"]["metric"] for row in table.values()) > 0.01
    assert 0 < notes["counts"].get("w4a16-g32", 0) < len(plan.layers)


def test_perplexity_target_counts_each_layers_nll_change(calibrated):
    _, plan, notes = plan_with(calibrated, max_ppl_increase="1%")
    table = notes["table"]
    chosen = {name: f"{lp.precision}-g{lp.group_size}" if lp.group_size else lp.precision
              for name, lp in plan.layers.items()}
    spent = sum(max(table[name][c]["dnll"], 0.0) for name, c in chosen.items())
    assert spent <= np.log1p(0.01) + 1e-12
    assert any(c != "fp32" for c in chosen.values())


@pytest.mark.parametrize("options, fragment", [
    ({"budget": "5parsecs"}, "unknown unit"),
    ({"budget": "6bits", "max_kl": 0.1}, "does not combine"),
    ({"max_kl": 0.1, "max_ppl_increase": "2%"}, "one accuracy target"),
    ({"candidates": ["w4a16-g24"]}, "power of two"),
    ({"budget_latency": "0.5x", "measure_latency": False}, "needs measured latencies"),
    ({"sensitivity": "guessed"}, "'exact' or 'scaled'"),
])
def test_bad_options_fail_early(options, fragment):
    with pytest.raises(InputError, match=fragment):
        PlanMixedPrecisionPass(**options)


def test_plan_file_round_trip_skips_the_analysis(calibrated, tmp_path):
    _, plan, _ = plan_with(calibrated, budget="6bits")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": plan.to_json()}))  # the shape of a manifest
    _, plan2, notes = plan_with(calibrated, plan_file=str(path))
    assert notes["analysis"] == "skipped (--plan)"
    assert plan2.to_json() == plan.to_json()
    # a plan for another model is refused
    broken = plan.to_json()
    broken["layers"].pop("lm_head")
    path.write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"does not fit this model: no entry for 1 layer\(s\), e.g. \['lm_head'\]"):
        plan_with(calibrated, plan_file=str(path))


def test_sensitivities_are_cached(calibrated):
    plan_with(calibrated, budget="6bits", cache=True)
    _, _, notes = plan_with(calibrated, budget="7bits", cache=True)
    assert notes["sensitivity"]["runs"] == 0 and notes["sensitivity"]["cached"] == 36 * 3


def test_scaled_sensitivity_runs_once_per_layer_and_ranks_like_the_exact_one(calibrated):
    from scipy.stats import spearmanr

    cands = ["fp32", "w8a8", "w4a16-g32", "w4a16-g128"]
    _, _, exact = plan_with(calibrated, budget="6bits", candidates=cands, cache=False)
    _, _, scaled = plan_with(calibrated, budget="6bits", candidates=cands, cache=False, sensitivity="scaled")
    assert scaled["sensitivity"]["method"] == "scaled" and scaled["sensitivity"]["runs"] == 36
    assert exact["sensitivity"]["runs"] == 36 * 3
    pairs = [(layer, c) for layer, row in exact["table"].items() for c in row if c != "fp32"]
    e = [exact["table"][layer][c]["metric"] for layer, c in pairs]
    s = [scaled["table"][layer][c]["metric"] for layer, c in pairs]
    # each layer's anchor (its largest local error: a 4-bit candidate) is measured, not scaled
    anchors = [(layer, c) for layer, c in pairs if scaled["table"][layer][c]["metric"] == exact["table"][layer][c]["metric"]]
    assert len(anchors) >= 36 and all(c.startswith("w4") for _, c in anchors)
    assert spearmanr(e, s).statistic > 0.8
    assert scaled["achieved"]["bits_per_weight"] <= 6.0


def test_compile_with_budget_and_plan_round_trip(shared_dir, tmp_path, calibrated, capsys):
    """The CLI end to end: --budget, --override, the plan in the manifest, `inspect`, then --plan."""
    model = str(shared_dir / "stories260K" / "stories260K.bin")
    text = str(shared_dir.parent / "data" / "tinystories.txt")
    common = ["--quiet", "compile", model, "--recipe", "mixed", "--calib-data", text, "--no-latency",
              "--set", "calibration.samples=4", "--set", "evaluation.samples=2",
              "--set", "plan-mixed.samples=1", "--set", "plan-mixed.pareto_points=2",
              "--set", "plan-mixed.weight_algorithm_4bit=rtn", "--set", "plan-mixed.measure_latency=false",
              "--set", 'plan-mixed.candidates=["fp32", "w8a8", "w4a16-g32"]',
              "--set", f'plan-mixed.cost_table="{tmp_path / "costs.json"}"']
    first = tmp_path / "first"
    assert main([*common, "-o", str(first), "--budget", "9.5bits", "--override", "lm_head=fp32"]) == 0
    m = json.loads((first / "manifest.json").read_text())
    layers = m["plan"]["layers"]
    assert layers["lm_head"]["precision"] == "fp32"
    assert all({"sensitivity", "cost", "granularity", "group_size", "activations", "weight_algorithm"} <= set(lp)
               for lp in layers.values())
    notes = m["notes"]["plan-mixed"]
    assert notes["achieved"]["bits_per_weight"] <= 9.5 and len(notes["pareto"]) == 2
    capsys.readouterr()
    assert main(["inspect", str(first)]) == 0
    out = capsys.readouterr().out
    assert "mixed precision" in out and "9.5bits" in out
    # the report plots predicted against measured error over the Pareto plans, and tabulates them
    assert main(["report", str(first), "--no-explain"]) == 0
    page = (first / "report.html").read_text()
    section = page[page.index("Mixed precision: Pareto curve"):]
    assert section.split("</p>", 1)[1].lstrip().startswith('<img alt="plot" src="data:image/png;base64,')
    assert "KL predicted" in section and "ppl measured" in section
    # fed back: same plan, no analysis
    second = tmp_path / "second"
    assert main([*common, "-o", str(second), "--plan", str(first / "manifest.json")]) == 0
    m2 = json.loads((second / "manifest.json").read_text())
    assert m2["plan"] == m["plan"]
    assert m2["notes"]["plan-mixed"]["analysis"] == "skipped (--plan)"
    assert m2["accuracy"]["kl"] == pytest.approx(m["accuracy"]["kl"], rel=1e-6)
    # an infeasible budget: exit status 2 and the nearest feasible budget
    assert main([*common, "-o", str(tmp_path / "third"), "--budget", "2bits"]) == 2
    assert "nearest feasible budget is" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()
    # a budget for a recipe without the planner
    assert main(["compile", model, "-o", str(tmp_path / "fourth"), "--budget", "5bits"]) == 2
    assert "--budget needs a recipe with a plan-mixed pass (--recipe mixed); recipe 'w8a8' has none" in capsys.readouterr().err


def test_a_model_without_a_tokenizer_is_planned_on_its_outputs(tmp_path):
    """No language model: the sensitivity is 1 - cosine of the output; ``modified`` is exact."""
    from tests.graphs import mlp

    model = mlp(k=32, hidden=64, n=32)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(2)]
    opts = {**FAST, "cost_table": str(tmp_path / "costs.json"), "cache": False, "pareto_points": 2}
    p = PlanMixedPrecisionPass(budget="9bits", **opts)
    p.context = CompileContext(calibration_batches=feeds, progress=False)
    assert p(model).modified
    notes = p.context.notes[NOTES_KEY]
    plan = read_plan(model)
    assert notes["metric"] == "1-cosine" and set(plan.layers) == {"up", "down", "side"}
    assert notes["achieved"]["bits_per_weight"] <= 9.0 and len(notes["pareto"]) == 2
    assert all("1-cosine" in lp.sensitivity for lp in plan.layers.values())
    # the same plan fed back leaves the model as it was
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    again = PlanMixedPrecisionPass(plan_file=str(path))
    again.context = CompileContext(progress=False)
    assert not again(model).modified
