"""The TVM Backend object: what it supports (and that lower-tvm agrees), its costs, the mixed planner on it.

The first tests need no TVM (``supports``, ``lower-tvm`` and the cost table are numpy
only); the end-to-end compile of the ``mixed`` recipe for TVM's LLVM target does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.compiler.analysis.candidates import Candidate, lower_linear
from lowbit.compiler.analysis.costs import CostTable, layer_costs
from lowbit.compiler.analysis.plan_mixed import NOTES_KEY, PlanMixedPrecisionPass
from lowbit.compiler.core.backend import get_backend
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.plan import LayerPlan, read_plan
from tests.graphs import mlp

PLANS = {
    "w8a8": LayerPlan(precision="w8a8"),
    "w8a8-static": LayerPlan(precision="w8a8", activations="static"),
    "w8a8-g32": LayerPlan(precision="w8a8", group_size=32),
    "w8a8-asym": LayerPlan(precision="w8a8", symmetric=False),
    "w8a16": LayerPlan(precision="w8a16"),
    "w4a16-g32": LayerPlan(precision="w4a16", group_size=32),
    "w4a16-g32-asym": LayerPlan(precision="w4a16", group_size=32, symmetric=False),
    "w4a8-g32": LayerPlan(precision="w4a8", group_size=32),
    "w4a8": LayerPlan(precision="w4a8"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_supports_says_what_lower_tvm_refuses(name):
    """A layer plan ``supports`` accepts is lowered by lower-tvm; one it refuses fails there too."""
    lp = PLANS[name]
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    reason = get_backend("tvm").supports(lp)
    lower = lambda: lower_linear(w, Candidate(lp.precision, lp.group_size), layer="l", input_name="x",  # noqa: E731
                                 opset_imports={"": 21}, layer_plan=lp, lowering="lower-tvm")
    if lp.activations == "static":
        return  # a static plan needs a calibrated QuantizeLinear pair on the input: checked by supports only
    if reason is None:
        model = lower()
        assert any(n.domain == "lowbit.tvm" for n in model.graph)
    else:
        with pytest.raises(Exception, match="int8 activations only with symmetric per-channel int8 weights"):
            lower()


def test_cost_table_weighs_the_tvm_layouts_and_times_nothing(tmp_path):
    cands = [Candidate("fp32"), Candidate("w8a8"), Candidate("w4a16", 32)]
    tvm = CostTable(tmp_path / "costs.json", threads=1, backend="tvm")
    costs = layer_costs(tvm, [(64, 32)], cands, 4, latency=True)
    assert not tvm.times and all(e["ms"] is None for e in costs.values())
    assert costs[((64, 32), "fp32")]["bytes"] == 64 * 32 * 4
    # Int8Linear: int8 [N, K] codes + a float scale and an int32 column sum per output
    assert costs[((64, 32), "w8a8")]["bytes"] == 64 * 32 + 32 * 4 + 32 * 4
    # PackedLinear: eight 4-bit codes per uint32 + a float scale per (output, group)
    assert costs[((64, 32), "w4a16-g32")]["bytes"] == 64 * 32 // 2 + 32 * 2 * 4
    tvm.save()
    keys = list(json.loads((tmp_path / "costs.json").read_text())["entries"])
    assert keys and all(k.startswith("tvm-layouts|") for k in keys)
    ort = CostTable(None, threads=1, backend="ort")
    assert ort.times and ort.device.startswith("onnxruntime-")


def _planner(backend: str, **options):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(2)]
    opts = {"candidates": ["fp32", "w8a8", "w4a16-g32", "w4a8-g32"], "samples": 1, "weight_algorithm_4bit": "rtn",
            "pareto_points": 0, "cache": False, "measure_latency": False} | options
    p = PlanMixedPrecisionPass(**opts)
    p.context = CompileContext(calibration_batches=feeds, progress=False, backend=get_backend(backend))
    return p


def test_the_planner_offers_only_what_the_backend_runs(tmp_path):
    model = mlp(k=32, hidden=64, n=32)
    p = _planner("tvm", budget="6bits", cost_table=str(tmp_path / "costs.json"))
    assert p(model).modified
    notes = p.context.notes[NOTES_KEY]
    assert notes["backend"]["name"] == "tvm" and list(notes["backend"]["dropped"]) == ["w4a8-g32"]
    assert "lower-tvm" in notes["backend"]["costs"] and "w4a8-g32" not in notes["candidates"]
    assert {lp.precision for lp in read_plan(model).layers.values()} <= {"fp32", "w8a8", "w4a16"}
    # ONNX Runtime keeps every candidate
    p = _planner("onnxruntime", budget="6bits", cost_table=str(tmp_path / "costs.json"))
    p(mlp(k=32, hidden=64, n=32))
    notes = p.context.notes[NOTES_KEY]
    assert notes["backend"]["name"] == "onnxruntime" and notes["backend"]["dropped"] == {}
    assert "w4a8-g32" in notes["candidates"] and "lower-ort" in notes["backend"]["costs"]


@pytest.mark.parametrize("options, fragment", [
    ({"budget_latency": "0.5x", "measure_latency": True}, "--budget-latency: the planner times only kernels"),
    ({"overrides": ["up=w4a8-g32"]}, "layer up pinned to w4a8-g32 .*--backend tvm cannot run it"),
])
def test_the_planner_refuses_what_the_backend_cannot_do(tmp_path, options, fragment):
    p = _planner("tvm", cost_table=str(tmp_path / "costs.json"), **options)
    with pytest.raises(Exception, match=fragment):
        p(mlp(k=32, hidden=64, n=32))


def test_mixed_recipe_compiles_for_tvm_llvm(shared_dir, tmp_path):
    """``--recipe mixed --budget 6bits --backend tvm``: the plan has no W4A8 layer, the artifact runs."""
    pytest.importorskip("tvm")
    from lowbit.compiler.cli import main

    out = tmp_path / "mixed-tvm"
    argv = ["--quiet", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(out),
            "--recipe", "mixed", "--budget", "6bits", "--backend", "tvm", "--no-latency",
            "--calib-data", str(shared_dir.parent / "data" / "tinystories.txt"),
            "--set", "plan-mixed.pareto_points=0", "--set", f'plan-mixed.cost_table="{tmp_path / "costs.json"}"']
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "tvm" and m["tvm"]["target"] == "llvm" and "lib.so" in m["files"]
    notes = m["notes"]["plan-mixed"]
    assert notes["backend"]["name"] == "tvm" and set(notes["backend"]["dropped"]) == {"w4a8-g32", "w4a8-g128"}
    assert notes["achieved"]["bits_per_weight"] <= 6.0
    assert all(lp["precision"] != "w4a8" for lp in m["plan"]["layers"].values())
    assert m["accuracy"]["perplexity_increase"] < 0.2 and m["accuracy"]["top1_agreement"] > 0.6
    kernels = m["notes"]["lower-tvm"]["kernels"]  # fused Q/K/V and gate/up of one precision are one kernel
    assert kernels and all(k.startswith(("PackedLinear(", "Int8Linear(")) for k in kernels)
    art = get_backend(m["backend"]).load(out)
    assert art.generate("Once upon a time", max_new_tokens=4).startswith("Once upon a time")
