"""``lowbit explain``: tensors matched by debug id, per-layer SQNR, pass bisect, measured promotions."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from rich.console import Console

from lowbit.backends.ort.lower import LowerToORTPass
from lowbit.compiler.cli import main
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import DEBUG_KEY, CompileContext, assign_debug_ids
from lowbit.compiler.core.pipeline import run_pipeline
from lowbit.compiler.diff import diff_paths
from lowbit.compiler.explain import (
    MASK_FP32,
    MASK_WO,
    batched,
    build_explain_graph,
    explain,
    finish_explain_graph,
    glob_escape,
    load_explain,
    render,
    reproduction_args,
    sqnr_db,
)
from lowbit.passes.calibrate import CalibratePass
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recognize import RecognizeStructuresPass
from tests.compiler.stories_w8a8 import RECIPE, compiled, explained
from tests.graphs import mlp


def test_sqnr_and_glob_escape():
    assert sqnr_db(1.0, 0.01) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    assert glob_escape("blocks[0].attn*") == "blocks[[]0].attn[*]"


def test_batched_stacks_equal_shapes_up_to_a_token_budget():
    feeds = [{"input_ids": np.full((1, 4), i)} for i in range(5)] + [{"input_ids": np.zeros((1, 3), np.int64)}]
    out = batched(feeds, max_tokens=8)
    assert [b["input_ids"].shape for b in out] == [(2, 4), (2, 4), (1, 4), (1, 3)]
    assert out[1]["input_ids"][:, 0].tolist() == [2, 3]


def test_reproduction_args_of_a_manifest_without_a_record():
    old = {"source": "m.bin", "calibration": {"source": "/d/calib.txt | eval: /d/eval.txt"}}
    assert reproduction_args(old) == {"source": "m.bin", "calib_data": "/d/calib.txt", "eval_data": "/d/eval.txt", "tokenizer": None}
    builtin = {"source": "m.bin", "calibration": {"source": "builtin:pydoc_data.topics"}}
    assert reproduction_args(builtin)["calib_data"] is None


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    # graph optimizations off: ONNX Runtime fuses DequantizeLinear -> MatMul pairs into its
    # MatMulNBits kernel (int8 activations at its default accuracy level) depending on the
    # surrounding graph, which would blur the comparison of the paths themselves
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_explain_graph_masks_select_quantized_fp32_and_weight_only_paths():
    """All masks 0: the lowered model exactly; fp32 masks 1: the fp32 model; weight-only masks 1: the QDQ stage."""
    rng = np.random.default_rng(0)
    model = mlp(outlier=6.0)
    assign_debug_ids(model)
    feeds = [{"x": rng.standard_normal((1, 16, 8)).astype(np.float32)} for _ in range(4)]
    x = {"x": rng.standard_normal((2, 16, 8)).astype(np.float32)}
    fp32_out = _run(model, x)
    fp32_w = {n.metadata_props[DEBUG_KEY]: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMul"}
    ctx = CompileContext(calibration_batches=feeds, progress=False)
    run_pipeline(model, [RecognizeStructuresPass(), CalibratePass(), PlanUniformPass(precision="w8a8"), QuantizeWeightsPass()], context=ctx)
    qdq_out = _run(model, x)
    eg = ir.from_proto(ir.to_proto(model))
    run_pipeline(model, [LowerToORTPass()], context=ctx)
    lowered_out = _run(model, x)

    layers = build_explain_graph(eg, fp32_w, weight_only=True)
    run_pipeline(eg, [LowerToORTPass()], context=ctx)
    finish_explain_graph(eg)
    assert [lay.name for lay in layers] == ["up", "down", "side"]
    assert {lay.weight_only for lay in layers} == {"w8a16"}
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    run = lambda f, w: _run(eg, {**x, MASK_FP32: f, MASK_WO: w})  # noqa: E731
    np.testing.assert_array_equal(run(zero, zero), lowered_out)
    np.testing.assert_allclose(run(one, zero), fp32_out, atol=1e-5)
    np.testing.assert_allclose(run(zero, one), qdq_out, atol=1e-5)
    assert np.abs(lowered_out - fp32_out).max() > 1e-2 and np.abs(lowered_out - qdq_out).max() > 1e-3
    # one layer promoted: only the layers downstream of it move
    down_only = run(np.array([0, 1, 0], np.float32), zero)
    assert 0 < np.abs(down_only - fp32_out).max() < np.abs(lowered_out - fp32_out).max()


@pytest.fixture(scope="module")
def artifact(shared_dir, tmp_path_factory):
    return compiled(shared_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def result(artifact):
    return explained(artifact)


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact / "manifest.json").read_text())


def test_replay_reproduces_the_artifact_and_matches_layers_by_debug_id(result, manifest):
    rep = result["reproduced"]
    assert rep["exact"]
    assert rep["artifact_metric"] == pytest.approx(manifest["accuracy"]["kl"], rel=1e-5)
    assert rep["explain_graph_metric"] == pytest.approx(rep["artifact_metric"], rel=1e-5)
    assert len(result["layers"]) == 36 == len(manifest["plan"]["layers"])
    assert all(r["matched_by_debug_id"] for r in result["layers"])


def test_bisect_names_the_quantizing_passes(result):
    stages = {s["pass"]: s for s in result["bisect"]}
    for name in ("CanonicalizePass", "RecognizeStructuresPass", "CalibratePass", "PlanUniformPass"):
        assert stages[name]["metric"] < 1e-9  # metadata and analysis passes keep the fp32 function
    assert stages["QuantizeWeightsPass"]["delta"] > 1e-4  # weight-only QDQ stage, run as it is
    assert stages["LowerToORTPass"]["delta"] > 0  # adds the per-token activation quantization
    assert result["bisect_max"]["pass"] in ("QuantizeWeightsPass", "LowerToORTPass")
    assert result["bisect"][-1]["metric"] == pytest.approx(result["reproduced"]["artifact_metric"], rel=1e-5)


def test_per_layer_sqnr(result):
    rows = sorted(result["layers"], key=lambda r: r["order"])
    assert all(20 < r["sqnr_local_db"] < 80 for r in rows)
    # nothing quantized upstream of the first linear: cumulative == local
    assert rows[0]["sqnr_cumulative_db"] == pytest.approx(rows[0]["sqnr_local_db"], abs=0.05)
    assert np.mean([r["sqnr_cumulative_db"] for r in rows]) < np.mean([r["sqnr_local_db"] for r in rows]) - 3
    assert result["depth"]["largest_drop"]["block"].startswith("model.layers.")
    assert result["floor_metric"] < 1e-9  # stories260K's embedding stays float: all-fp32 linears = fp32


def test_attribution_ranks_the_outlier_inputs_first(result, manifest):
    """Done-when (a): the layers whose inputs have the largest activation outliers are in the top 5."""
    acts = manifest["calibration"]["activations"]
    ratio = {name: acts[info["input"]]["outlier_ratio"] for name, info in manifest["layers"].items()}
    by_outliers = sorted(ratio, key=ratio.get, reverse=True)
    assert by_outliers[0] == "model.layers.0.mlp.down_proj" and ratio[by_outliers[0]] > 2 * ratio[by_outliers[5]]
    top5 = result["attribution"][:5]
    assert by_outliers[0] in top5, (by_outliers[:5], top5)
    assert len(set(by_outliers[:5]) & set(top5)) >= 3, (by_outliers[:5], top5)
    assert "lm_head" in result["candidates"]  # writes the logits: always measured


def test_suggested_overrides_lower_the_recompiled_kl(result, manifest, artifact, shared_dir, tmp_path):
    """Done-when (a): recompiling with the 3 suggested --override strings lowers the measured KL."""
    sugg = result["suggested_overrides"]
    assert len(sugg) == 3 and all("=" in s for s in sugg)
    assert result["metric_with_suggestions"] < result["reproduced"]["artifact_metric"]
    out = tmp_path / "overridden"
    args = ["--quiet", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(out), "--no-latency", "--recipe", RECIPE,
            "--calib-data", str(shared_dir.parent / "data" / "tinystories.txt")]
    for s in sugg:
        args += ["--override", s]
    assert main(args) == 0
    after = json.loads((out / "manifest.json").read_text())
    assert after["accuracy"]["kl"] < manifest["accuracy"]["kl"]
    # the explain graph predicted exactly this compile
    assert after["accuracy"]["kl"] == pytest.approx(result["metric_with_suggestions"], rel=1e-3)
    changed = {k: v["precision"] for k, v in after["plan"]["layers"].items() if v["precision"] != "w8a8"}
    assert changed == {s["layer"]: s["precision"] for s in result["suggestions"]}
    # and `lowbit diff` of the two artifacts shows exactly those precision changes
    d = diff_paths([str(artifact), str(out)])
    assert {(c["layer"], c["before"], c["after"]) for c in d["plan"]["changes"]} == {
        (s["layer"], "w8a8", s["precision"]) for s in result["suggestions"]}


def test_results_saved_and_rendered(result, artifact):
    saved = load_explain(artifact)
    assert saved["suggested_overrides"] == result["suggested_overrides"]
    buf = io.StringIO()
    render(saved, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "pass-by-pass bisect" in text and "LowerToORTPass" in text
    assert f'--override "{result["suggested_overrides"][0]}"' in text


def test_missing_source_is_a_clear_error(artifact, tmp_path):
    art = tmp_path / "moved"
    art.mkdir()
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(artifact / name, art / name)
    m = json.loads((art / "manifest.json").read_text())
    m["reproduce"]["source"] = str(tmp_path / "gone.bin")
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="give it with --source"):
        explain(art, progress=False)
    assert main(["explain", str(art)]) == 2
