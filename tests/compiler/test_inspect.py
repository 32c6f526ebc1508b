"""``lowbit inspect --layers`` (and ``--errors``): one row per linear with everything known about it."""

from __future__ import annotations

import json

import pytest

import lowbit.compiler.explain as explain_mod
from lowbit.compiler.cli import main
from lowbit.compiler.inspect import _rotation, _rotation_summary, _smoothing, layer_rows
from tests.compiler.stories_w8a8 import compiled, explained


@pytest.fixture(scope="module")
def artifact(shared_dir, tmp_path_factory):
    return compiled(shared_dir, tmp_path_factory)


def test_layer_rows_from_the_manifest(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    rows = layer_rows(m)
    assert len(rows) == 36 and rows[0]["layer"] == "model.layers.0.self_attn.q_proj" and rows[-1]["layer"] == "lm_head"
    down = next(r for r in rows if r["layer"] == "model.layers.0.mlp.down_proj")
    acts = m["calibration"]["activations"]
    # the quantize pass recorded each layer's input, so the calibration summary is the layer's own
    assert down["input"] == m["layers"][down["layer"]]["input"]
    assert down["input_outlier_ratio"] == acts[down["input"]]["outlier_ratio"] == max(r["input_outlier_ratio"] for r in rows)
    assert down["precision"] == "w8a8" and down["granularity"] == "per-channel" and down["weight_algorithm"] == "rtn"
    assert down["sqnr_local_db"] is None and down["error_contribution"] is None  # explain has not run


def test_layers_table_with_explain_results(artifact, capsys):
    result = explained(artifact)
    assert main(["inspect", str(artifact), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in out and "local SQNR" in out and "5.95" in out
    assert main(["inspect", str(artifact), "--layers", "--json"]) == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)}
    measured = {r["name"]: r for r in result["layers"]}
    assert rows["lm_head"]["error_contribution"] == pytest.approx(measured["lm_head"]["contribution"])
    assert rows["lm_head"]["sqnr_local_db"] == pytest.approx(measured["lm_head"]["sqnr_local_db"])


def test_smoothing_and_rotation_notes():
    notes = {
        "smooth": {"groups": {"a.q+a.k+a.v": {"alpha": 0.45, "input": "x"}, "a.down": {"skipped": "no calibration statistics"}}},
        "rotate": {"readers": ["a.q", "a.k"], "writers": ["a.o"], "online_down_proj": {"a.down": "2x86 ⊗ 86x2"}},
    }
    assert _smoothing(notes) == {"a.q": "α=0.45", "a.k": "α=0.45", "a.v": "α=0.45", "a.down": "skipped"}
    assert _rotation(notes) == {"a.q": "in", "a.k": "in", "a.o": "out", "a.down": "online"}
    assert _rotation({"rotate": {"refused": "no norm", "readers": ["a.q"]}}) == {}
    m = {"plan": {"layers": {"a.q": {"precision": "w8a8", "granularity": "per-channel", "weight_algorithm": "rtn"}}},
         "layers": {}, "notes": notes, "calibration": {"activations": {}}}
    row = layer_rows(m)[0]
    assert (row["smoothing"], row["rotation"], row["input_outlier_ratio"]) == ("α=0.45", "in", None)


def test_rotation_summary_says_which_rotation_and_what_learning_did():
    assert _rotation_summary({}) == ""
    assert _rotation_summary({"rotate": {"refused": "LayerNorm at n1"}}) == "rotation: none (LayerNorm at n1)"
    learned = {"steps": 200, "bits": 4, "group_size": 128, "fake_quant_kl_start": 1.2528, "fake_quant_kl_learned": 0.6396,
               "kept": "learned"}
    line = _rotation_summary({"rotate": {"rotation": "randomized Hadamard D·H_64, learned", "width": 64, "seed": 0,
                                         "learned": learned}})
    assert line.startswith("rotation of the 64-wide residual stream: randomized Hadamard D·H_64, learned (seed 0); ")
    assert "200 steps, 4-bit weights, group 128" in line and "1.253 -> 0.6396, kept the learned" in line
    incoherent = {"objective": "incoherence", "steps": 400, "kurtosis_start": 3.7319, "kurtosis_learned": 3.1366,
                  "kept": "learned"}
    line = _rotation_summary({"rotate": {"rotation": "randomized Hadamard D·H_64, learned", "width": 64, "seed": 0,
                                         "learned": incoherent}})
    assert line.endswith("; learning (400 steps, weight incoherence): mean kurtosis of the rotated weights "
                         "3.732 -> 3.137, kept the learned")


def test_inspect_errors_runs_explain(artifact, monkeypatch, capsys):
    saved = explained(artifact)
    seen = {}

    def fake(path, **kw):
        seen.update(kw, path=path)
        return saved

    monkeypatch.setattr(explain_mod, "explain", fake)
    assert main(["inspect", str(artifact), "--errors", "--samples", "4", "--candidates", "5"]) == 0
    assert seen["path"] == str(artifact) and seen["samples"] == 4 and seen["candidates"] == 5
    assert "pass-by-pass bisect" in capsys.readouterr().out


def test_inspect_shows_fp32_and_artifact_greedy_texts(artifact, capsys):
    gen = json.loads((artifact / "manifest.json").read_text())["accuracy"]["generation"]
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "greedy text after 'Once upon a time'" in out and "tokens as fp32" in out
    assert "fp32's text" in out and "artifact's text" in out
    words = " ".join(out.split())  # the table may wrap a text over lines
    assert " ".join(gen["fp32_text"].split()[:6]) in words and " ".join(gen["text"].split()[:6]) in words
