"""Typed pass results: what each run of a pass found and did, for later passes and the manifest.

A lowbit pass returns a :class:`LowbitResult`: onnx_ir's ``PassResult`` (model,
modified) plus ``record``, a dataclass of the pass's own (:class:`PassRecord`).
``run_pipeline`` collects the records, in run order, into the compile context's
:class:`PassResults`; a pass reads another's facts there
(``context.results.latest(CalibrateRecord)``) and never changes another pass's
record. :func:`manifest_sections` assembles the manifest's ``layers``, ``structure``
and ``notes`` from them.

The per-layer table is built from three kinds of facts, each owned by one pass:
the quantized layers (``quantize-weights``: :meth:`PassRecord.layer_entries`), the
groups fused into one kernel (``fuse-linears``: :meth:`PassRecord.fused_groups`) and
the kernel a lowering gave each layer it lowered (:meth:`PassRecord.layer_kernels`;
one kernel runs every member of a fused group).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import onnx_ir as ir

R = TypeVar("R")


@dataclasses.dataclass
class PassRecord:
    """Base of the typed records passes return.

    ``to_json()`` is what the manifest shows: by default every field, in order, except
    those marked ``metadata={"internal": True}``.
    """

    #: where the manifest shows the record: "notes" (under the pass's name), "structure", or
    #: "layers" (merged into the per-layer table, see :meth:`layer_entries`)
    section: ClassVar[str] = "notes"

    def to_json(self) -> Any:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    def layer_entries(self) -> dict[str, dict[str, Any]]:
        """Per-layer rows this run adds to the manifest's layer table."""
        return {}

    def fused_groups(self) -> list[list[str]]:
        """Groups of layers this run fused into one linear."""
        return []

    def layer_kernels(self) -> dict[str, str]:
        """Layer -> the kernel this run lowered it to (a fused group: under its first member)."""
        return {}

    @property
    def clears_stats(self) -> bool:
        """Whether this run made every calibration statistic stale (a ``calibrate`` must follow)."""
        return False


#: metadata of a record field left out of the manifest: ``dataclasses.field(metadata=INTERNAL)``
INTERNAL = {"internal": True}


def internal(**kwargs: Any) -> Any:
    """A record field left out of the manifest."""
    return dataclasses.field(metadata=INTERNAL, **kwargs)


@dataclasses.dataclass
class LowbitResult(ir.passes.PassResult):
    """``PassResult`` with the pass's typed record (None: nothing to record)."""

    record: PassRecord | None = None


@dataclasses.dataclass
class LoweringRecord(PassRecord):
    """A lowering's run: layers lowered, per kernel (and, internally, the kernel of each layer)."""

    lowered: int
    kernels: dict[str, int]
    by_layer: dict[str, str] = internal(default_factory=dict)  # layer (a fused group's first) -> kernel

    def layer_kernels(self) -> dict[str, str]:
        return self.by_layer


@dataclasses.dataclass
class FreeformRecord(PassRecord):
    """A note a pass without a typed record wrote into ``context.notes`` (third-party passes)."""

    notes: dict[str, Any] = dataclasses.field(metadata=INTERNAL)
    key: str = dataclasses.field(default="", metadata=INTERNAL)

    def to_json(self) -> Any:
        return self.notes[self.key]


@dataclasses.dataclass
class PassResults:
    """The records of the passes run so far, in run order, each under its pass's name."""

    entries: list[tuple[str, PassRecord]] = dataclasses.field(default_factory=list)

    def add(self, name: str, record: PassRecord) -> None:
        self.entries.append((name, record))

    def __iter__(self) -> Iterator[tuple[str, PassRecord]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def latest(self, kind: type[R] | str) -> R | None:
        """The last record of type ``kind`` (or of the pass named ``kind``); None if that pass has not run."""
        for name, record in reversed(self.entries):
            if (name == kind) if isinstance(kind, str) else isinstance(record, kind):
                return record
        return None

    def stats_cleared_by(self) -> str | None:
        """The pass that last made every calibration statistic stale, if one did."""
        return next((name for name, record in reversed(self.entries) if record.clears_stats), None)


def manifest_sections(results: PassResults, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``layers``, ``structure`` and ``notes`` from the passes' records.

    ``layers``: one row per quantized linear (``quantize-weights``), with ``fused_with``
    (``fuse-linears``) and ``kernel`` (the lowering), replayed in run order so a fact
    applies to the layers known when its pass ran; ``structure``: what ``recognize``
    found; ``notes``: every other record under its pass's name (a pass that ran twice:
    its last record, where the first stood). ``notes`` given: free-form notes of passes
    without typed records that the pipeline did not place (appended).
    """
    table: dict[str, dict[str, Any]] = {}
    structure: Any = {}
    out: dict[str, Any] = {}
    for name, record in results:
        for layer, entry in record.layer_entries().items():
            table[layer] = dict(entry)  # a copy: the record stays as its pass made it
        for group in record.fused_groups():
            for member in group:
                if member in table:
                    table[member]["fused_with"] = group
        for layer, kernel in record.layer_kernels().items():
            for member in table.get(layer, {}).get("fused_with", [layer]):
                if member in table:
                    table[member]["kernel"] = kernel
        if record.section == "structure":
            structure = record.to_json()
        elif record.section == "notes":
            out[name] = record.to_json()
    for key, value in (notes or {}).items():
        out.setdefault(key, value)
    return {"layers": table, "structure": structure, "notes": out}
