"""The sensitivity graph (compiler/analysis/sensitivity.py) on stories260K: its branches are the artifact's kernels."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.backends.ort.lower import LowerToORTPass
from lowbit.compiler.analysis import sensitivity as S
from lowbit.compiler.analysis.candidates import Candidate, parse_candidates
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import run_pipeline
from lowbit.compiler.core.recipe import load_recipe
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from tests.passes.real_models import fresh, outputs, windows

CANDS = parse_candidates(["fp32", "w8a8", "w4a16-g32", "w4a8-g128"])


def _plan(c: Candidate, layer: str):
    return c.layer_plan(weight_algorithm_4bit="mse")


@pytest.fixture(scope="module")
def setup(shared_dir):
    model, adapter = fresh(shared_dir / "stories260K" / "stories260K.bin")
    calib, _ = windows(adapter, calib=2, evals=1, seq_len=48, text=shared_dir.parent / "data" / "tinystories.txt")
    recipe = load_recipe("mixed")
    upto = [p.name for p in recipe.passes].index("plan-mixed")
    context = CompileContext(calibration_batches=calib, adapter=adapter, progress=False)
    model = run_pipeline(model, recipe.build()[:upto], context=context)
    graph = S.SensitivityGraph(model, CANDS, layer_plan=_plan, stats=context.stats, threads=1, show_progress=False)
    return model, context, graph, calib


def test_all_fp32_choice_is_the_model(setup):
    model, _, graph, calib = setup
    got = graph.run(calib, graph.choice({}))
    ref = outputs(model, calib)
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) < 1e-4
    assert len(graph.layers) == 36 and {S.CHOICE_INPUT, S.START_INPUT} <= {i.name for i in graph.session.get_inputs()}


@pytest.mark.parametrize("layer", [0, 17, 35])
def test_a_run_from_a_layer_segment_is_the_full_run(setup, layer):
    """Starting at a layer's segment, with the prefix's values fed, gives the full run's outputs."""
    _, _, graph, calib = setup
    assert graph.segment_of == sorted(graph.segment_of) and len(set(graph.segment_of)) == 36  # one cut per layer
    name = graph.layers[layer].name
    assignment = {name: "w4a8-g128"}
    start = graph.start_of(assignment)
    assert start == graph.segment_of[layer] > 0
    frontier = graph.frontier(calib)
    full = graph.run(calib, graph.choice(assignment))
    part = graph.run(calib, graph.choice(assignment), start=start, frontier=frontier)
    assert max(float(np.abs(f - p).max()) for f, p in zip(full, part)) < 1e-5
    # the prefix really is skipped: with the frontier of other data, the output is that data's
    other = graph.frontier([{k: np.roll(v, 1, axis=-1) for k, v in b.items()} for b in calib])
    moved = graph.run(calib, graph.choice(assignment), start=start, frontier=other)
    assert max(float(np.abs(f - m).max()) for f, m in zip(full, moved)) > 1e-2
    with pytest.raises(ValueError, match="frontier"):
        graph.run(calib, graph.choice(assignment), start=start)


@pytest.mark.parametrize("cand", ["w8a8", "w4a8-g128"])
def test_uniform_choice_is_what_quantize_and_lower_compile(setup, cand):
    """Every layer switched to one candidate gives the outputs of the compile's own passes."""
    model, context, graph, calib = setup
    c = Candidate.parse(cand)
    lp = _plan(c, "")
    compiled = run_pipeline(
        ir.from_proto(ir.to_proto(model)),
        [PlanUniformPass(precision=lp.precision, group_size=lp.group_size or 0, weight_algorithm=lp.weight_algorithm),
         QuantizeWeightsPass(), LowerToORTPass()],
        context=dataclasses.replace(context, notes={}),
    )
    ref = outputs(compiled, calib)
    got = graph.run(calib, graph.choice({lay.name: cand for lay in graph.layers}))
    scale = max(float(np.abs(r).max()) for r in ref)
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) < 1e-4 * scale


def test_measure_and_cache(setup, tmp_path):
    model, _, graph, calib = setup
    ids = [b["input_ids"] for b in calib]
    scorer = S.Scorer(S.reference_outputs(graph, calib), ids)
    pairs = [(lay.name, c.name) for lay in graph.layers[:3] for c in CANDS]
    key = S.fingerprint(model, calib, {"t": 1})
    cache = S.SensitivityCache(tmp_path, key)
    values, rec = S.measure(graph, calib, scorer, pairs, cache=cache, show_progress=False)
    assert rec["runs"] == 9 and rec["cached"] == 3  # fp32 is 0 by definition, never run
    for (_, cand), v in values.items():
        assert (v["metric"] == 0.0) == (cand == "fp32")
    # 4-bit hurts more than 8-bit, layer by layer
    for lay in graph.layers[:3]:
        assert values[(lay.name, "w4a16-g32")]["metric"] > values[(lay.name, "w8a8")]["metric"] > 0
    again, rec2 = S.measure(graph, calib, scorer, pairs, cache=S.SensitivityCache(tmp_path, key), show_progress=False)
    assert rec2["runs"] == 0 and again == values
    # another key (other weights, data or options) starts afresh
    assert S.SensitivityCache(tmp_path, S.fingerprint(model, calib, {"t": 2})).entries == {}
    assert S.fingerprint(model, calib[:1], {"t": 1}) != key


def test_scorer_is_kl_and_nll_change_by_definition():
    """The scorer's closed form equals KL(p_ref || p_q) and the NLL change computed from log-softmaxes."""
    from lowbit.compiler.core.evaluate import log_softmax

    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((2, 6, 50)).astype(np.float32) * 4 for _ in range(2)]
    ids = [rng.integers(0, 50, (2, 6)) for _ in range(2)]
    q = [r + rng.standard_normal(r.shape).astype(np.float32) * 0.1 for r in ref]
    got = S.Scorer(ref, ids).score(q)
    kl = nll = 0.0
    for r, x, t in zip(ref, q, ids):
        lr, lq = log_softmax(r), log_softmax(x)
        kl += float((np.exp(lr) * (lr - lq)).sum())
        nll += float(np.take_along_axis((lr - lq)[:, :-1], t[:, 1:, None], -1).sum())  # row i predicts token i+1
    assert got["metric"] == pytest.approx(kl / 24, rel=1e-5)
    assert got["dnll"] == pytest.approx(nll / 20, rel=1e-5)
    assert S.Scorer(ref, ids).score(ref)["metric"] == pytest.approx(0.0, abs=1e-9)
