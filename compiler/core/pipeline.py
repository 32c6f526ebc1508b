"""Run a list of passes with instruments.

Everything optional about running passes is an instrument here, never code
inside a pass (as in TVM's ``PassInstrument``):

* ``PassLog``: wall time, ``modified``, node counts before/after, per pass
  (the manifest's per-pass log);
* ``Verify``: the ONNX checker and strict shape inference after each pass
  that modified the graph, so a pass that breaks the graph is named;
* ``DumpIR``: ``NNN_<PassName>.onnx`` plus a text form after every pass;
* ``ShowProgress``: which pass runs, ``pass 3/10 rotate`` (``core.progress``: a bar on
  a terminal, a line in logs).

``run_pipeline`` turns any failure into a ``PassFailedError`` naming the pass
and the passes that ran before it (a failed ``requires`` says what is missing
and which pass provides it), and collects each pass's typed record into the
compile context (``context.results``), in run order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnx_ir as ir

from lowbit.compiler.core.errors import LowbitError, PassFailedError
from lowbit.compiler.core.passbase import CompileContext, LowbitPass
from lowbit.compiler.core.progress import Step, step
from lowbit.compiler.core.results import FreeformRecord

logger = logging.getLogger("lowbit")


def pass_name(pass_: Any) -> str:
    return type(pass_).__name__


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


class Instrument:
    """Hooks around every pass. Subclasses override what they need."""

    def before(self, index: int, pass_: Any, model: ir.Model) -> None:
        pass

    def after(self, index: int, pass_: Any, model: ir.Model, modified: bool, seconds: float) -> None:
        pass


class PassLog(Instrument):
    """Records name, options, wall time, modified and node counts per pass."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._before = 0

    def before(self, index, pass_, model):
        self._before = count_nodes(model)

    def after(self, index, pass_, model, modified, seconds):
        entry = {
            "index": index,
            "pass": pass_name(pass_),
            "seconds": round(seconds, 4),
            "modified": bool(modified),
            "nodes_before": self._before,
            "nodes_after": count_nodes(model),
        }
        if isinstance(pass_, LowbitPass):
            entry["options"] = _jsonable(pass_.options())
        self.entries.append(entry)


class Verify(Instrument):
    """ONNX checker + strict shape inference after each modifying pass."""

    def after(self, index, pass_, model, modified, seconds):
        if modified:
            verify_model(model)


def verify_model(model: ir.Model) -> None:
    """Raise ValueError if the model is not a valid ONNX model."""
    proto = ir.to_proto(model)
    # Large models hold initializers in memory; check the graph without them.
    try:
        onnx.checker.check_model(proto, full_check=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"the graph is invalid: {str(e).strip().splitlines()[0]}") from e


class DumpIR(Instrument):
    """Write the IR after every pass as ``NNN_<Pass>.onnx`` and ``NNN_<Pass>.txt``."""

    def __init__(self, directory: str | Path, start: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.start = start

    def dump(self, index: int, label: str, model: ir.Model) -> Path:
        stem = self.directory / f"{index:03d}_{label}"
        ir.save(model, stem.with_suffix(".onnx"), external_data=f"{stem.name}.onnx.data", size_threshold_bytes=1 << 20)
        stem.with_suffix(".txt").write_text(ir.to_onnx_text(model, exclude_initializers=True))
        return stem.with_suffix(".onnx")

    def before(self, index, pass_, model):
        if index == 0:
            self.dump(self.start, "Input", model)

    def after(self, index, pass_, model, modified, seconds):
        self.dump(self.start + index + 1, pass_name(pass_), model)


class ShowProgress(Instrument):
    """``pass i/n NAME`` while each pass runs (``core.progress.step``); ``close()`` ends a pass that failed."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self._open: Step | None = None

    def before(self, index, pass_, model):
        self.close(ok=False)
        label = getattr(pass_, "name", "") or pass_name(pass_)
        self._open = step(f"pass {index + 1}/{self.total} {label}", enabled=self.enabled).begin()

    def after(self, index, pass_, model, modified, seconds):
        self.close()

    def close(self, ok: bool = True) -> None:
        if self._open is not None:
            self._open.end(ok)
            self._open = None


def run_pipeline(
    model: ir.Model,
    passes: Sequence[Any],
    *,
    context: CompileContext | None = None,
    instruments: Sequence[Instrument] = (),
) -> ir.Model:
    """Run ``passes`` in order on ``model``; returns the resulting model."""
    done: list[str] = []
    for index, pass_ in enumerate(passes):
        name = pass_name(pass_)
        if isinstance(pass_, LowbitPass) and context is not None:
            pass_.context = context
        for inst in instruments:
            inst.before(index, pass_, model)
        logger.info("running %s", name)
        start = time.perf_counter()
        try:
            result = pass_(model)
            model, modified = result.model, result.modified
        except LowbitError as e:
            if isinstance(e, PassFailedError):
                raise
            raise PassFailedError(name, done, str(e)) from e
        except Exception as e:
            cause = e.__cause__ if isinstance(e, ir.passes.InvariantError) and e.__cause__ else e
            if isinstance(cause, LowbitError):  # a requires/ensures check: its message says what is missing
                raise PassFailedError(name, done, str(cause)) from e
            raise PassFailedError(name, done, f"{type(cause).__name__}: {cause}") from e
        seconds = time.perf_counter() - start
        if context is not None:
            _collect(context, pass_, getattr(result, "record", None))
        try:
            for inst in instruments:
                inst.after(index, pass_, model, modified, seconds)
        except ValueError as e:
            raise PassFailedError(name, done, str(e)) from e
        done.append(name)
    return model


def _collect(context: CompileContext, pass_: Any, record: Any) -> None:
    """File ``pass_``'s record under its name; give new free-form notes their place in the run order."""
    if record is not None:
        context.results.add(getattr(pass_, "name", "") or pass_name(pass_), record)
    placed = {r.key for _, r in context.results if isinstance(r, FreeformRecord)}
    for key in context.notes:
        if key not in placed:
            context.results.add(key, FreeformRecord(context.notes, key))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
