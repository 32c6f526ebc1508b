"""``lowbit diff``: two consecutive dumps around a known pass list exactly the nodes it changed."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from lowbit.compiler.cli import main
from lowbit.compiler.core.passbase import CompileContext, assign_debug_ids
from lowbit.compiler.core.pipeline import DumpIR, run_pipeline
from lowbit.compiler.diff import diff_dump_folder, diff_models, diff_paths
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recognize import RecognizeStructuresPass
from tests.compiler.custom_passes import InsertIdentityPass
from tests.compiler.stories_w8a8 import compiled
from tests.graphs import mlp

LAYERS = {"up", "down", "side"}


@pytest.fixture(scope="module")
def mlp_dump(tmp_path_factory):
    """mlp through identity-insert, recognize, plan, quantize-weights, dumped after each pass."""
    folder = tmp_path_factory.mktemp("mlp-dump")
    model = mlp()
    assign_debug_ids(model)
    passes = [InsertIdentityPass(label="inserted"), RecognizeStructuresPass(), PlanUniformPass(precision="w8a16"), QuantizeWeightsPass()]
    run_pipeline(model, passes, context=CompileContext(), instruments=[DumpIR(folder)])
    return folder


def test_inserted_node_and_its_rewired_consumers(mlp_dump):
    d = diff_paths([str(mlp_dump), "0", "1"])
    assert [n["name"] for n in d["nodes"]["added"]] == ["inserted"]
    assert d["nodes"]["added"][0]["op"] == "Identity"
    # x fed norm/pow and norm/mul: both now read the Identity's output, nothing else changed
    rewritten = {n["name"]: n for n in d["nodes"]["rewritten"]}
    assert set(rewritten) == {"norm/pow", "norm/mul"}
    assert all(n["changes"] == ["inputs"] and n["inputs_before"][0] == "x" for n in rewritten.values())
    assert d["nodes"]["removed"] == [] and d["initializers"] == {"added": [], "removed": [], "changed": []}
    assert d["by_op"] == {"Identity": {"added": 1, "removed": 0, "rewritten": 0, "metadata": 0},
                          "Mul": {"added": 0, "removed": 0, "rewritten": 1, "metadata": 0},
                          "Pow": {"added": 0, "removed": 0, "rewritten": 1, "metadata": 0}}


def test_metadata_only_and_plan_changes(mlp_dump):
    recognize = diff_paths([str(mlp_dump), "1", "2"])
    assert recognize["summary"]["rewritten"] == 0 and recognize["summary"]["added"] == 0
    tagged = {n["name"] for n in recognize["nodes"]["metadata_changed"]}
    assert LAYERS <= tagged  # linears got their layer tag
    plan = diff_paths([str(mlp_dump), "2", "3"])
    assert plan["summary"]["added"] == plan["summary"]["rewritten"] == 0
    assert plan["model_metadata_changed"] == ["lowbit.plan"]
    assert {(c["layer"], c["before"], c["after"]) for c in plan["plan"]["changes"]} == {(n, "-", "w8a16") for n in LAYERS}


def test_quantize_weights_adds_one_dequantize_per_layer_and_rewires_the_matmuls(mlp_dump):
    d = diff_paths([str(mlp_dump), "3", "4"])
    added = d["nodes"]["added"]
    assert sorted(n["name"] for n in added) == sorted(f"{n}/weight_dq" for n in LAYERS)
    assert {n["op"] for n in added} == {"DequantizeLinear"} and {n["pass"] for n in added} == {"QuantizeWeightsPass"}
    rewritten = d["nodes"]["rewritten"]
    assert {n["name"] for n in rewritten} == LAYERS
    for n in rewritten:
        assert n["op"] == "MatMul" and n["changes"] == ["inputs"]
        assert n["inputs"][1] == f"{n['name']}.weight_dq" and n["inputs_before"][0] == n["inputs"][0]
    assert d["nodes"]["removed"] == []
    inits = d["initializers"]
    assert {i["name"] for i in inits["added"]} == {f"{n}.weight_{k}" for n in LAYERS for k in ("q", "scale")}
    assert {i["dtype"] for i in inits["added"] if i["name"].endswith("_q")} == {"INT8"}


def test_stories_quantize_and_lowering_stages(shared_dir, tmp_path_factory):
    art = compiled(shared_dir, tmp_path_factory)
    dump = art.parent / "dump"
    stages = {r["pass"]: r for r in diff_dump_folder(dump)}
    q = stages["QuantizeWeightsPass"]["stage"]
    d = diff_paths([str(dump), str(q - 1), str(q)])
    plan = json.loads((art / "manifest.json").read_text())["plan"]["layers"]
    assert d["by_op"] == {"DequantizeLinear": {"added": 36, "removed": 0, "rewritten": 0, "metadata": 0},
                          "MatMul": {"added": 0, "removed": 0, "rewritten": 36, "metadata": 0}}
    assert {n["layer"] for n in d["nodes"]["added"]} == set(plan)
    # the lowering replaces each MatMul: matched through the debug id it carried to the new node
    low_stage = stages["LowerToORTPass"]["stage"]
    low = diff_paths([str(dump), str(low_stage - 1), str(low_stage)])
    by_id = [n for n in low["nodes"]["rewritten"] if n["matched_by"] == "debug_id" and n["op_before"] == "MatMul"]
    notes = json.loads((art / "manifest.json").read_text())["notes"]["lower-ort"]
    assert len(by_id) == notes["lowered"] > 0
    assert {n["pass"] for n in by_id} == {"LowerToORTPass"} and "MatMul" not in {n["op"] for n in by_id}
    assert low["by_op"].get("MatMul", {}).get("removed", 0) == 0  # none left unmatched


def test_identical_artifacts_have_no_differences(shared_dir, tmp_path_factory):
    art = compiled(shared_dir, tmp_path_factory)
    model = ir.load(art / "model.onnx")
    d = diff_models(model, ir.load(art / "model.onnx"))
    assert all(v == 0 for k, v in d["summary"].items() if not k.startswith(("nodes_", "initializer_bytes")))


def test_cli_json_table_and_errors(mlp_dump, capsys):
    assert main(["diff", str(mlp_dump), "3", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["added"] == 3 and data["a"]["label"] == "003_PlanUniformPass"
    assert main(["diff", str(mlp_dump / "003_PlanUniformPass.onnx"), str(mlp_dump / "004_QuantizeWeightsPass.onnx")]) == 0
    out = capsys.readouterr().out
    assert "DequantizeLinear" in out and "up/weight_dq" in out
    assert main(["diff", str(mlp_dump)]) == 0
    out = capsys.readouterr().out
    assert "what every pass did" in out and "InsertIdentityPass" in out
    assert main(["diff", str(mlp_dump), "3", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: no stage 9") and err.count("\n") == 1
    assert main(["diff", str(mlp_dump / "nope.onnx"), str(mlp_dump / "000_Input.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
