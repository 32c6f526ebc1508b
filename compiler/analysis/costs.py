"""What each candidate costs a linear of a given shape: bytes, and measured latency.

Both come from one small ONNX model per (shape, candidate): the linear alone,
compiled by ``quantize-weights`` and ``lower-ort`` exactly as in an artifact
(:func:`lowbit.compiler.analysis.candidates.lower_linear`, random weights). Its bytes are
the initializers the lowered layer stores (codes, scales, zero points, the
constants of its kernel); its latency is the median wall time of ONNX Runtime
running it on ``[1, T, K]`` inputs with a fixed thread count, minus the time of
the same session running an empty model (the fixed cost of a call, paid once per
model run, not once per layer).

The lowering is the compile's backend's (``Backend.lowering``): bytes are those of
the layouts that backend stores. Latency is measured only for a backend whose
lowered linear runs in ONNX Runtime (``Backend.measures_latency``: ONNX Runtime
itself); for another (TVM) the table holds bytes, and ``ms`` is None.

Results go into a cost table, a JSON file a user can keep and reuse across models
(shapes recur: every Llama of hidden size 576 has the same projections). Entries
are keyed by backend (``Backend.cost_key``: ONNX Runtime with its version), CPU,
threads, T, K, N and candidate: numbers from another machine are never mixed in. Default location:
``~/.cache/lowbit/costs.json`` (``$LOWBIT_CACHE`` moves the folder).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lowbit.compiler.analysis.candidates import Candidate, lower_linear, weight_bytes
from lowbit.compiler.core.backend import Backend, get_backend
from lowbit.compiler.core.calibration import TensorObserver
from lowbit.compiler.core.ortsession import session_for

COST_TABLE_VERSION = 1
BACKEND = "onnxruntime"
#: seconds of timed runs per measurement (at least MIN_REPEATS runs)
TIME_TARGET_S = 0.25
MIN_REPEATS = 5
#: a reused latency whose fresh probe differs by more than this factor marks the table stale
STALE_FACTOR = 1.5


def default_cost_table() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit") / "costs.json"


def device_key(threads: int, kernels: str | None = None) -> str:
    """The machine an entry was measured on: backend (``kernels``, a ``Backend.cost_key``; default
    ONNX Runtime's), versions, CPU model, threads."""
    cpu = cpu_model()
    return f"{kernels or f'{BACKEND}-{ort.__version__}'}|{platform.machine()}|{cpu}|threads={threads}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


class CostTable:
    """Bytes and latency per (shape, candidate, T), measured on demand and kept in ``path``.

    ``path`` None keeps results in memory only. ``opset_imports`` are the model's (the
    lowering's form of quantization depends on the opset). ``backend``: whose lowering is
    weighed and, where it runs in ONNX Runtime, timed (default ONNX Runtime).
    """

    def __init__(self, path: str | Path | None, *, threads: int = 2, opset_imports: dict[str, int] | None = None,
                 backend: Backend | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.threads = threads
        self.backend = get_backend(backend)
        #: whether latencies can be measured (the backend's lowered linears run in ONNX Runtime)
        self.times = self.backend.measures_latency
        self.device = device_key(threads, self.backend.cost_key())
        self.opset_imports = dict(opset_imports or {"": 21})
        self.entries: dict[str, dict[str, Any]] = {}
        self.measured = 0
        self.reused = 0
        #: set when :func:`layer_costs` found the stored latencies stale and measured them again
        self.remeasured: dict[str, Any] | None = None
        self.seconds = 0.0
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == COST_TABLE_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a broken table is measured again

    def _key(self, shape: tuple[int, int], cand: Candidate, seq_len: int) -> str:
        opset = self.opset_imports.get("", 0)
        return f"{self.device}|opset={opset}|T={seq_len}|{shape[0]}x{shape[1]}|{cand.name}"

    def get(self, shape: tuple[int, int], cand: Candidate, seq_len: int, *, latency: bool = True) -> dict[str, Any]:
        """``{"bytes": int, "ms": float | None}`` for a ``shape = (K, N)`` linear as ``cand``."""
        key = self._key(shape, cand, seq_len)
        latency = latency and self.times
        entry = self.entries.get(key)
        if entry is not None and (entry.get("ms") is not None or not latency):
            self.reused += 1
            return entry
        start = time.perf_counter()
        entry = measure_linear(shape, cand, seq_len, threads=self.threads, opset_imports=self.opset_imports,
                               latency=latency, lowering=self.backend.lowering)
        self.seconds += time.perf_counter() - start
        self.measured += 1
        self.entries[key] = entry
        return entry

    def _overhead_key(self, k: int, seq_len: int) -> str:
        return f"{self.device}|T={seq_len}|{k}|overhead"

    def overhead_ms(self, k: int, seq_len: int) -> float:
        """Median time of one ORT call on an Identity model with a ``[1, T, K]`` input."""
        key = self._overhead_key(k, seq_len)
        if key not in self.entries:
            x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, seq_len, k]))
            node = ir.node("Identity", [x])
            node.outputs[0].name = "y"
            graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21})
            session = session_for(ir.Model(graph, ir_version=10), threads=self.threads)
            feed = {"x": np.random.default_rng(0).standard_normal((1, seq_len, k)).astype(np.float32)}
            self.entries[key] = {"ms": _median_ms(session, feed)}
        return float(self.entries[key]["ms"])

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # another compile may have added entries meanwhile: merge, ours win
        merged = {}
        if self.path.is_file():
            try:
                merged = dict(json.loads(self.path.read_text()).get("entries", {}))
            except (OSError, json.JSONDecodeError):
                merged = {}
        merged.update(self.entries)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": COST_TABLE_VERSION, "entries": merged}, indent=0, sort_keys=True))
        tmp.replace(self.path)


def measure_linear(
    shape: tuple[int, int],
    cand: Candidate,
    seq_len: int,
    *,
    threads: int = 2,
    opset_imports: dict[str, int] | None = None,
    latency: bool = True,
    lowering: str = "lower-ort",
) -> dict[str, Any]:
    """Bytes and median latency (ms, call overhead not removed) of one linear lowered by ``lowering``
    (latency: the lowered model must run in ONNX Runtime)."""
    k, n = shape
    rng = np.random.default_rng(k * 7919 + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1, seq_len, k)).astype(np.float32)
    obs = TensorObserver("x")
    obs.update(x)  # gives the per-token kernel its calibrated (shared) zero point, as in a compile
    lp = cand.layer_plan(weight_algorithm_4bit="rtn")  # the algorithm changes values, not bytes or speed
    micro = lower_linear(w, cand, layer="bench", input_name="x", opset_imports=opset_imports or {"": 21},
                         layer_plan=lp, stats={"x": obs}, lowering=lowering)
    entry: dict[str, Any] = {"bytes": weight_bytes(micro), "weights": k * n, "ms": None}
    if latency:
        session = session_for(micro, threads=threads)
        entry["ms"] = _median_ms(session, {"x": x})
    return entry


def _median_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    for _ in range(2):
        session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    once = time.perf_counter() - start
    repeats = int(min(200, max(MIN_REPEATS, TIME_TARGET_S / max(once, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def layer_costs(
    table: CostTable, shapes: Sequence[tuple[int, int]], candidates: Sequence[Candidate], seq_len: int, *,
    latency: bool,
) -> dict[tuple[tuple[int, int], str], dict[str, Any]]:
    """Costs of every (shape, candidate); latency with the call overhead removed (>= 0).

    A table measured on another day can be off as a whole, and not by one factor: under
    load the fp32 GEMMs slow down more than the int8 ones. Before reusing latencies, the
    fp32 entry of the largest shape is timed again; if it moved by more than
    ``STALE_FACTOR``, this model's entries are measured afresh (``table.remeasured``).
    A table whose backend is not timed (``table.times`` False) gives bytes only.
    """
    latency = latency and table.times
    if latency and shapes:
        probe = max(dict.fromkeys(shapes), key=lambda s: s[0] * s[1])
        fp32 = Candidate("fp32")
        old = table.entries.get(table._key(probe, fp32, seq_len), {}).get("ms")
        if old is not None:
            now = measure_linear(probe, fp32, seq_len, threads=table.threads, opset_imports=table.opset_imports)["ms"]
            if not 1 / STALE_FACTOR <= now / old <= STALE_FACTOR:
                table.remeasured = {"probe": f"{probe[0]}x{probe[1]} fp32", "table_ms": old, "now_ms": now}
                for shape in dict.fromkeys(shapes):
                    table.entries.pop(table._overhead_key(shape[0], seq_len), None)
                    for cand in candidates:
                        table.entries.pop(table._key(shape, cand, seq_len), None)
    out = {}
    for shape in dict.fromkeys(shapes):
        over = table.overhead_ms(shape[0], seq_len) if latency else 0.0
        for cand in candidates:
            e = dict(table.get(shape, cand, seq_len, latency=latency))
            if latency:
                e["ms_raw"] = e["ms"]
                e["ms"] = max(float(e["ms"]) - over, 0.0)
            out[(shape, cand.name)] = e
    return out
