"""An artifact's ``manifest.json`` as a dataclass, with a schema version.

The compile builds a :class:`Manifest` and writes ``to_json()``; the readers
(``lowbit inspect``, ``report``, ``diff``, ``explain``, the backends' runtimes) read the
JSON as a plain dict (``core.artifact.load_manifest``), so a manifest of an older
lowbit, without ``schema_version``, reads as before. Its keys are the field names,
``schema_version`` first, except two:

* ``backend_info`` is written under the backend's name (``"tvm": {...}``: what the
  backend's runtime needs to load the artifact), and left out when None;
* ``files`` (name -> bytes and sha256) is added by ``ArtifactWriter.commit`` when the
  artifact's files are all written.

``SCHEMA_VERSION`` counts changes a reader must know about (a key renamed, removed,
or changing meaning); keys added alongside do not change it. Version 0 is every
manifest written before the field existed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowbit.compiler.core.errors import InputError

SCHEMA_VERSION = 1


@dataclasses.dataclass
class Manifest:
    """What an artifact holds, how it was made, and how it measures against fp32.

    Attributes:
        lowbit: the lowbit version that compiled it.
        created: ISO 8601 time (UTC) of the compile.
        source: what was compiled (a path, or an ``nn.Module``'s class name).
        model: ``{"name", "family", "task", "context_length"}`` from the model adapter (the context:
            the most positions the model takes, None when unknown; not in manifests before it was added).
        backend: the backend's name (``Backend.name``; ``lowbit run`` loads it by this name).
        inputs / outputs: ``{"name", "shape", "dtype"}`` of the compiled graph's inputs and outputs.
        recipe: the recipe resolved (every pass option, defaults included).
        passes: the pass log (name, modified, seconds, ... per pass).
        plan: the quantization plan (``core.plan.Plan.to_json()``), or None.
        layers / structure / notes: what the passes recorded (per layer, recognized
            structures, the rest by pass).
        reproduce: source, data files and tokenizer, absolute, for ``lowbit explain``.
        calibration: data source, samples, tokens, sequence length, activation summaries.
        accuracy / latency: measured against fp32 on held-out inputs.
        size: weight bytes of fp32 and of the artifact, and their ratio.
        compile_seconds: wall time of the compile up to the built artifact.
        tokenizer: what ``save_tokenizer`` wrote beside the model, or None.
        versions: versions of the packages that made the artifact, and Python's.
        backend_info: the backend's section (see the module docstring), or None.
        files: set when the artifact is committed: name -> ``{"bytes", "sha256"}``.
        schema_version: :data:`SCHEMA_VERSION` of the writer.
    """

    lowbit: str | None
    created: str
    source: str
    model: dict[str, Any]
    backend: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    recipe: dict[str, Any]
    passes: list[dict[str, Any]]
    plan: dict[str, Any] | None
    layers: dict[str, Any]
    structure: dict[str, Any]
    notes: dict[str, Any]
    reproduce: dict[str, Any]
    calibration: dict[str, Any]
    accuracy: dict[str, Any]
    latency: dict[str, Any]
    size: dict[str, Any]
    compile_seconds: float
    tokenizer: dict[str, Any] | None
    versions: dict[str, Any]
    backend_info: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (keys as the module docstring says)."""
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.name in ("schema_version", "backend_info", "files"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.backend_info is not None:
            out[self.backend] = self.backend_info
        if self.files is not None:
            out["files"] = self.files
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest read back (version 0, without ``schema_version``, included)."""
        version = int(data.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise InputError(f"manifest schema version {version} is newer than this lowbit reads "
                             f"({SCHEMA_VERSION}): update lowbit")
        if not isinstance(data.get("backend"), str) or not isinstance(data.get("model"), dict):
            raise InputError("not a lowbit manifest (no backend or model)")
        names = {f.name for f in dataclasses.fields(cls)} - {"backend_info", "schema_version"}
        fields = {n: data.get(n) for n in names}  # a key an older lowbit did not write reads as None
        return cls(**fields, backend_info=data.get(data["backend"]), schema_version=version)
