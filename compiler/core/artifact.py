"""Write an artifact directory atomically, and read it back.

The artifact is built in a temporary sibling of the output folder and
renamed into place only when everything (model, manifest, summary) is
written; an exception or Ctrl-C removes the temporary folder, so a failed or
interrupted compile never leaves a half-written artifact, and an older
artifact at the same path survives until the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError

MANIFEST = "manifest.json"
MODEL = "model.onnx"
SUMMARY = "summary.txt"
EXTERNAL_DATA_THRESHOLD = 512 << 20  # keep models below this in one file


class ArtifactWriter:
    """Context manager giving a temporary folder that becomes ``out`` on success."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out).absolute()
        self.tmp: Path | None = None

    def __enter__(self) -> ArtifactWriter:
        parent = self.out.parent
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output {self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST).exists():
            raise InputError(f"output {self.out} exists, is not empty and is not a lowbit artifact; refusing to replace it")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=parent))
        except OSError as e:
            raise InputError(f"cannot write output {self.out}: {e.strerror or e}") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def path(self) -> Path:
        assert self.tmp is not None
        return self.tmp

    def save_model(self, model: ir.Model) -> None:
        save_model(model, self.path)

    def commit(self, manifest: dict[str, Any], summary: str) -> Path:
        """Write summary and manifest (with file hashes), then move into place."""
        (self.path / SUMMARY).write_text(summary)
        manifest["files"] = file_table(self.path)
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        os.replace(self.path, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out


def save_model(model: ir.Model, folder: Path) -> Path:
    """Write ``model`` as ``folder/model.onnx`` (weights in ``model.onnx.data`` past ``EXTERNAL_DATA_THRESHOLD``)."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path = Path(folder) / MODEL
    if size > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{MODEL}.data")
    else:
        ir.save(model, path)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def load_manifest(artifact: str | os.PathLike) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise InputError(f"{artifact} is not a lowbit artifact (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def verify_files(artifact: str | os.PathLike) -> list[str]:
    """Files whose sha256 differs from the manifest (empty: intact)."""
    folder = Path(artifact)
    manifest = load_manifest(folder)
    bad = []
    for name, info in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file() or sha256(p) != info["sha256"]:
            bad.append(name)
    return bad
