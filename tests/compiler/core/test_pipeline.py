import onnx
import pytest

from lowbit.compiler.core.errors import PassFailedError
from lowbit.compiler.core.pipeline import DumpIR, PassLog, Verify, run_pipeline
from lowbit.passes import (
    CanonicalizePass,
    PlanUniformPass,
    QuantizeWeightsPass,
    RecognizeStructuresPass,
)
from tests.compiler.custom_passes import BreakGraphPass, InsertIdentityPass
from tests.graphs import mlp


def test_log_and_dump_after_every_pass(tmp_path):
    log = PassLog()
    passes = [CanonicalizePass(), RecognizeStructuresPass(), PlanUniformPass(), QuantizeWeightsPass()]
    run_pipeline(mlp(), passes, instruments=[log, Verify(), DumpIR(tmp_path)])
    assert [e["pass"] for e in log.entries] == [type(p).__name__ for p in passes]
    assert log.entries[-1]["nodes_after"] == log.entries[-1]["nodes_before"] + 3  # three DequantizeLinear
    assert log.entries[3]["options"]["static_percentile"] == 99.99
    names = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert names == ["000_Input.onnx", "001_CanonicalizePass.onnx", "002_RecognizeStructuresPass.onnx",
                     "003_PlanUniformPass.onnx", "004_QuantizeWeightsPass.onnx"]
    last = onnx.load(tmp_path / "004_QuantizeWeightsPass.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in last.graph.node) == 3
    assert "DequantizeLinear" in (tmp_path / "004_QuantizeWeightsPass.txt").read_text()


def test_a_pass_that_breaks_the_graph_is_named():
    with pytest.raises(PassFailedError, match=r"pass BreakGraphPass failed \(after CanonicalizePass, InsertIdentityPass\): the graph is invalid"):
        run_pipeline(mlp(), [CanonicalizePass(), InsertIdentityPass(), BreakGraphPass()], instruments=[Verify()])


def test_a_pass_that_raises_is_named():
    class Boom(InsertIdentityPass):
        def call(self, model):
            raise RuntimeError("kaboom")

    with pytest.raises(PassFailedError, match="pass Boom failed .*RuntimeError: kaboom"):
        run_pipeline(mlp(), [Boom()])


def test_records_are_collected_in_run_order_with_free_form_notes_in_place():
    from lowbit.compiler.core.passbase import CompileContext
    from lowbit.compiler.core.results import manifest_sections
    from lowbit.passes.recognize import RecognizeRecord

    class NotingPass(InsertIdentityPass):  # a third-party pass that writes free-form notes
        def call(self, model):
            self.context.notes["plugin"] = {"saw": len(list(model.graph))}
            return super().call(model)

    noting = NotingPass()
    context = CompileContext()
    noting.context = context  # not a LowbitPass: the pipeline leaves its context alone
    passes = [CanonicalizePass(), RecognizeStructuresPass(), noting, PlanUniformPass(), QuantizeWeightsPass()]
    run_pipeline(mlp(), passes, context=context)
    assert [name for name, _ in context.results] == ["recognize", "plugin", "quantize-weights"]
    assert isinstance(context.results.latest("recognize"), RecognizeRecord)
    sections = manifest_sections(context.results, context.notes)
    assert list(sections["notes"]) == ["plugin"] and set(sections["layers"]) == {"up", "down", "side"}
    assert sections["structure"]["linears"] == 3


def test_a_failed_requires_names_what_is_missing_and_who_provides_it():
    from lowbit.passes.fuse_linears import FuseSharedInputLinearsPass

    with pytest.raises(PassFailedError, match=r"^pass FuseSharedInputLinearsPass failed \(after PlanUniformPass\): "
                                              r"fuse-linears needs quantized weights, and 3 planned layer\(s\) still have "
                                              r"float weights \(e.g. up, planned w8a8\): put 'quantize-weights' before "
                                              r"'fuse-linears'$"):
        run_pipeline(mlp(), [PlanUniformPass(), FuseSharedInputLinearsPass()])
