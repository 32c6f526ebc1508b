"""Typed pass records and the manifest sections assembled from them."""

import dataclasses

from lowbit.backends.ort.lower import LowerORTRecord
from lowbit.compiler.core.results import (
    FreeformRecord,
    PassRecord,
    PassResults,
    internal,
    manifest_sections,
)
from lowbit.passes.calibrate import CalibrateRecord
from lowbit.passes.fuse_linears import FuseLinearsRecord
from lowbit.passes.quantize_weights import QuantizeWeightsRecord
from lowbit.passes.recognize import RecognizeRecord
from lowbit.passes.rotate import RotateRecord


def _results(*entries) -> PassResults:
    results = PassResults()
    for name, record in entries:
        results.add(name, record)
    return results


def test_layer_table_joins_quantized_layers_fused_groups_and_kernels():
    quantized = QuantizeWeightsRecord({"q": {"precision": "w8a8"}, "k": {"precision": "w8a8"}, "down": {"precision": "w8a8"}})
    results = _results(
        ("recognize", RecognizeRecord(3, 1, [["q", "k"]], {"attn": "both inputs are constant"})),
        ("quantize-weights", quantized),
        ("fuse-linears", FuseLinearsRecord([["q", "k"]])),
        ("lower-ort", LowerORTRecord(2, {"A": 1, "B": 1}, by_layer={"q": "A", "down": "B"})),
    )
    sections = manifest_sections(results)
    assert sections["layers"] == {
        "q": {"precision": "w8a8", "fused_with": ["q", "k"], "kernel": "A"},
        "k": {"precision": "w8a8", "fused_with": ["q", "k"], "kernel": "A"},  # one kernel runs the group
        "down": {"precision": "w8a8", "kernel": "B"},
    }
    assert sections["structure"] == {"linears": 3, "norms": 1, "groups": [["q", "k"]],
                                     "rejected": {"attn": "both inputs are constant"}}
    assert sections["notes"] == {"fuse-linears": {"groups": [["q", "k"]]},
                                 "lower-ort": {"lowered": 2, "kernels": {"A": 1, "B": 1}, "kept_qdq": {}}}
    assert quantized.layers["q"] == {"precision": "w8a8"}  # no pass's record is changed by another's facts


def test_facts_apply_to_the_layers_known_when_their_pass_ran():
    # a fusion recorded before the layers were quantized names nothing in the table (as before)
    results = _results(("fuse-linears", FuseLinearsRecord([["a", "b"]])),
                       ("quantize-weights", QuantizeWeightsRecord({"a": {}, "b": {}})))
    assert manifest_sections(results)["layers"] == {"a": {}, "b": {}}


def test_notes_keep_the_first_run_place_and_the_last_run_record():
    results = _results(("calibrate", CalibrateRecord(1, 2, 3)), ("rotate", RotateRecord(["n"], width=8, rotation="r")),
                       ("calibrate", CalibrateRecord(4, 5, 6)))
    notes = manifest_sections(results)["notes"]
    assert list(notes) == ["calibrate", "rotate"] and notes["calibrate"] == {"batches": 4, "tensors": 5, "tokens": 6}
    assert results.latest(CalibrateRecord).batches == 4 and results.latest("rotate").width == 8
    assert results.latest("smooth") is None


def test_stats_cleared_by_names_the_pass_whose_record_says_so():
    assert _results(("rotate", RotateRecord(["n"], refused="LayerNorm"))).stats_cleared_by() is None
    assert _results(("rotate", RotateRecord(["n"], width=8))).stats_cleared_by() == "rotate"


def test_internal_fields_stay_out_of_the_manifest_and_free_form_notes_are_kept():
    @dataclasses.dataclass
    class Custom(PassRecord):
        shown: int
        hidden: int = internal(default=0)

    notes = {"plugin": {"x": 1}, "late": 2}
    results = _results(("custom", Custom(1, 2)), ("plugin", FreeformRecord(notes, "plugin")))
    assert manifest_sections(results, notes)["notes"] == {"custom": {"shown": 1}, "plugin": {"x": 1}, "late": 2}
