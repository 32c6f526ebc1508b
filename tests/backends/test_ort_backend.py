"""The ONNX Runtime Backend object: build writes model.onnx and a session, load gives the runtime artifact."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from lowbit.backends.ort.runtime import Artifact
from lowbit.compiler.core.backend import BackendOptions, get_backend
from tests.graphs import mlp


def test_build_writes_model_onnx_and_a_session_to_verify_with(tmp_path):
    backend = get_backend("ort")
    model = mlp()
    built = backend.build(model, tmp_path, BackendOptions(), threads=1)
    assert built.info is None and built.note is None  # nothing for the manifest besides model.onnx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # the same bytes a plain save writes
    ir.save(model, tmp_path / "plain.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    (y,) = built.session.run(None, {"x": x})
    assert y.shape == (1, 4, 8)


def test_load_gives_the_runtime_artifact(tmp_path):
    backend = get_backend("onnxruntime")
    backend.build(mlp(), tmp_path, BackendOptions())
    (tmp_path / "manifest.json").write_text(json.dumps({"backend": backend.name, "model": {"task": "generic"}}))
    art = backend.load(tmp_path, threads=1)
    assert isinstance(art, Artifact)
    x = np.zeros((1, 2, 8), np.float32)
    assert art.run({"x": x})["y"].shape == (1, 2, 8)
