"""MetaSchedule tuning on LLVM (``--tune``): database written, reused, tuned kernels run and agree.

One int8 linear (``x[B, T, 64] @ W[64, 32]``, W8A8) tuned at T=4 with one trial: the
smallest real workload. The test is about the mechanism (specialised entry, database,
reuse, dispatch), not the speed of the schedule found.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.tvm.lower import LowerToTVMPass
from lowbit.compiler.core.errors import InputError
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass

tvm = pytest.importorskip("tvm")

from lowbit.backends.tvm import build, tune  # noqa: E402
from lowbit.backends.tvm.runtime import TVMModel  # noqa: E402

K, N, T = 64, 32, 4


def linear() -> ir.Model:
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) * 0.3
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    PlanUniformPass(precision="w8a8")(model)
    QuantizeWeightsPass()(model)
    LowerToTVMPass()(model)
    return model


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Untuned, tuned (1 trial), and tuned again from the first database."""
    root = tmp_path_factory.mktemp("tvm-tune")
    model = linear()
    out = {}
    for name, kw in (("plain", {}), ("tuned", {"tune_trials": 1, "tune_seq_lens": [T]}),
                     ("again", {"tune_trials": 1, "tune_seq_lens": [T], "tuning_db": root / "tuned" / tune.DB_FOLDER})):
        (root / name).mkdir()
        out[name] = (root / name, build.build(model, root / name, **kw).info)
    return out


def test_database_is_written_and_its_kernels_are_built_into_the_entry(builds):
    folder, info = builds["tuned"]
    t = info["tuning"]
    assert t["kernels"] == 1 and t["tuned"] == 1 and t["reused"] == 0 and t["records"] >= 1
    assert all((folder / tune.DB_FOLDER / f).is_file() for f in tune.DB_FILES)
    assert info["entries"] == [{"function": "main_t4", "seq_len": T, "shapes": {"x": [1, T, K]}}]
    # the tuned kernel was timed against dlight's schedule, here, and is built in only where it won
    (name, timed), = t["timed_ms"].items()
    assert "matmul" in name and timed["tuned"] > 0 and timed["default"] > 0
    assert timed["kept"] == ("tuned" if timed["tuned"] < timed["default"] else "default")
    assert t["applied_kernels"] == ([name] if timed["kept"] == "tuned" else [])
    assert "tuning" not in builds["plain"][1]


def test_a_tuned_schedule_slower_than_the_default_is_not_built_in(builds, tmp_path, monkeypatch):
    calls = []

    def timer(lib, args, dev, rounds=3):  # keep_faster times default, tuned, default, tuned...
        calls.append(1)
        return 1.0 if len(calls) % 2 else 2.0

    monkeypatch.setattr(tune, "kernel_ms", timer)
    info = build.build(linear(), tmp_path, tune_trials=0, tune_seq_lens=[T],
                       tuning_db=builds["tuned"][0] / tune.DB_FOLDER).info["tuning"]
    assert [v["kept"] for v in info["timed_ms"].values()] == ["default"] and info["applied_kernels"] == []
    monkeypatch.setattr(tune, "kernel_ms", lambda lib, args, dev, rounds=3: 3.0 - timer(lib, args, dev))
    (tmp_path / "won").mkdir()
    info = build.build(linear(), tmp_path / "won", tune_trials=0, tune_seq_lens=[T],
                       tuning_db=builds["tuned"][0] / tune.DB_FOLDER).info["tuning"]
    assert [v["kept"] for v in info["timed_ms"].values()] == ["tuned"] and len(info["applied_kernels"]) == 1


def test_second_compile_reuses_the_database_without_tuning(builds):
    first, again = builds["tuned"][1]["tuning"], builds["again"][1]["tuning"]
    assert again["tuned"] == 0 and again["reused"] == 1 and again["tuning_seconds"] == 0.0
    assert again["records"] == first["records"]  # nothing was measured
    assert again["timed_ms"].keys() == first["timed_ms"].keys()


def test_tuned_entry_runs_for_its_length_and_matches_the_untuned_artifact(builds):
    plain = TVMModel(builds["plain"][0], meta=builds["plain"][1])
    rng = np.random.default_rng(1)
    for name in ("tuned", "again"):
        model = TVMModel(builds[name][0], meta=builds[name][1])
        for t, entry in ((T, "main_t4"), (T + 3, "main")):
            x = {"x": rng.standard_normal((1, t, K)).astype(np.float32)}
            assert model.entry(x) == entry
            ref = plain.run(x)["y"]
            np.testing.assert_allclose(model.run(x)["y"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        x2 = {"x": rng.standard_normal((2, T, K)).astype(np.float32)}  # batch 2: the dynamic main
        assert model.entry(x2) == "main"


def test_tuning_flags_are_checked(tmp_path, capsys):
    from lowbit.backends.tvm.backend import check_tuning
    from lowbit.compiler.cli import main

    out = tmp_path / "out"
    assert main(["compile", "model.onnx", "-o", str(out), "--tune", "4"]) == 2
    assert "--tune, --tune-seq-len and --tuning-db apply to --backend tvm only" in capsys.readouterr().err
    with pytest.raises(InputError, match="--target llvm only"):
        check_tuning("cuda", 4, None, None)
    with pytest.raises(InputError, match="--tune-seq-len needs --tune N"):
        check_tuning("llvm", 0, [128], None)
    with pytest.raises(InputError, match="expected a number of trials"):
        check_tuning("llvm", -1, None, None)
    not_a_folder = tmp_path / "db.json"
    not_a_folder.write_text(json.dumps({}))
    with pytest.raises(InputError, match="not a folder"):
        check_tuning("llvm", 1, None, not_a_folder)
    assert not out.exists()
