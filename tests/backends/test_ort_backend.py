"""The ONNX Runtime Backend object: build writes model.onnx and a session, load gives the runtime artifact."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.backends.ort.runtime import Artifact
from lowbit.compiler.core.artifact import IntegrityError, file_table
from lowbit.compiler.core.backend import BackendOptions, get_backend
from lowbit.compiler.core.errors import InputError
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


def _artifact(folder, **model):
    """A built mlp with a manifest (and its file table, as a compile writes it)."""
    backend = get_backend("onnxruntime")
    backend.build(mlp(), folder, BackendOptions())
    manifest = {"backend": backend.name, "model": {"task": "generic", **model},
                "inputs": [{"name": "x", "shape": ["B", "T", 8], "dtype": "FLOAT"}], "files": file_table(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return backend


def test_load_gives_the_runtime_artifact(tmp_path):
    backend = _artifact(tmp_path)
    art = backend.load(tmp_path, threads=1)
    assert isinstance(art, Artifact)
    x = np.zeros((1, 2, 8), np.float32)
    assert art.run({"x": x})["y"].shape == (1, 2, 8)


def test_load_refuses_a_changed_missing_or_unlisted_model_file_unless_told_not_to_verify(tmp_path):
    backend = _artifact(tmp_path)
    model = tmp_path / "model.onnx"
    original = model.read_bytes()
    data = bytearray(original)
    weights = data.index(np.float32(mlp().graph.initializers["w1"].const_value.numpy()[0, 0]).tobytes())
    data[weights : weights + 4] = np.float32(1e6).tobytes()  # a weight, the file still a valid model
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model.onnx does not match its sha256 in manifest.json"):
        backend.load(tmp_path)
    art = backend.load(tmp_path, verify=False)  # runs the changed model
    assert np.abs(art.run({"x": np.ones((1, 2, 8), np.float32)})["y"]).max() > 1e3
    model.write_bytes(original)
    Artifact(tmp_path)
    (tmp_path / "model.onnx.data").write_bytes(b"weights beside the model")  # what ORT would read too
    with pytest.raises(IntegrityError, match=r"model.onnx.data is not listed in manifest.json"):
        Artifact(tmp_path)
    model.unlink()
    with pytest.raises(IntegrityError, match=r"model.onnx is missing \(manifest.json lists it\)"):
        Artifact(tmp_path)


def test_run_refuses_more_positions_than_the_context(tmp_path):
    art = _artifact(tmp_path, context_length=4).load(tmp_path)
    assert art.run({"x": np.zeros((1, 4, 8), np.float32)})["y"].shape == (1, 4, 8)
    with pytest.raises(InputError, match="input 'x' has 5 positions; the model's context is 4 tokens"):
        art.run({"x": np.zeros((1, 5, 8), np.float32)})
