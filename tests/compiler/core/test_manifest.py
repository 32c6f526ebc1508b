"""The manifest dataclass: JSON keys as the readers know them, plus schema_version."""

from __future__ import annotations

import pytest

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.manifest import SCHEMA_VERSION, Manifest

KEYS = ["lowbit", "created", "source", "model", "backend", "inputs", "outputs", "recipe", "passes", "plan", "layers",
        "structure", "notes", "reproduce", "calibration", "accuracy", "latency", "size", "compile_seconds", "tokenizer",
        "versions"]


def _manifest(**kw) -> Manifest:
    values = {k: {} for k in KEYS} | {"lowbit": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "source": "m.onnx",
                                       "backend": "onnxruntime", "inputs": [], "outputs": [], "passes": [],
                                       "plan": None, "compile_seconds": 1.5, "tokenizer": None,
                                       "model": {"name": "m", "family": None, "task": "generic"}}
    return Manifest(**(values | kw))


def test_json_keys_are_the_readers_plus_schema_version():
    data = _manifest().to_json()
    assert list(data) == ["schema_version", *KEYS]
    assert data["schema_version"] == SCHEMA_VERSION


def test_backend_section_goes_under_the_backend_name_and_files_last():
    data = _manifest(backend="tvm", backend_info={"target": "llvm"}, files={"lib.so": {"bytes": 1}}).to_json()
    assert data["tvm"] == {"target": "llvm"} and list(data)[-2:] == ["tvm", "files"]
    back = Manifest.from_json(data)
    assert back.backend_info == {"target": "llvm"} and back.files == {"lib.so": {"bytes": 1}}
    assert back.to_json() == data


def test_an_older_manifest_reads_as_version_0_and_a_newer_one_is_refused():
    old = _manifest().to_json()
    del old["schema_version"], old["reproduce"]
    m = Manifest.from_json(old)
    assert m.schema_version == 0 and m.reproduce is None and m.backend_info is None
    with pytest.raises(InputError, match="newer than this lowbit reads"):
        Manifest.from_json(old | {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(InputError, match="not a lowbit manifest"):
        Manifest.from_json({"files": {}})
