"""Shared code of the side-by-side benchmarks (``compare_int8.py``, ``compare_4bit.py``, ...).

What every end-to-end comparison needs, so the scripts measure the same way:

* the record of where a number came from: :func:`machine_info`, :func:`versions`,
  :func:`git_state`, the load average (``os.getloadavg``) taken by the caller;
* one fp32 ONNX export that every method starts from (:func:`export_fp32`);
* ORT calibration over fixed windows (:class:`WindowReader`);
* model size on disk and operator counts (:func:`onnx_disk_bytes`, :func:`op_counts`);
* accuracy against fp32 (:func:`accuracy`) and latency with the methods interleaved
  round-robin (:func:`latency_round_robin`);
* JSON and markdown output: :func:`jsonable`, :func:`update_results` (replaces one
  ``## `` section of ``RESULTS.md``, keeping the others).

The scripts run as ``python benchmarks/<script>.py``, so this module is imported as
``_common`` (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import collections
import datetime
import gc
import importlib.metadata
import io
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THREADS = 2
PROTOBUF_LIMIT = 1_800_000_000  # above this, write the fp32 model with external data

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Machine, versions, tree
# ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        fields: dict[str, str] = {}
        for line in cpuinfo.splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                fields.setdefault(k, v)
        model = fields.get("model name", platform.processor() or "unknown")
        fam, mod = fields.get("cpu family"), fields.get("model")
        info["cpu"] = f"{model} (family {fam}, model {mod})" if fam and mod else model
        flags = set(fields.get("flags", "").split())
        info["int8_isa"] = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gb"] = round(int(mem) / 1024**2, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def versions() -> dict[str, str | None]:
    out = {}
    for p in ("lowbit", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "torch", "transformers", "numpy"):
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict[str, Any]:
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout

    try:
        dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
        return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified_files": dirty}
    except (OSError, subprocess.SubprocessError):
        return {}


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


class CaptureWarnings:
    """Collect the distinct log warnings ORT's quantization tools emit (they log on the root logger)."""

    def __enter__(self) -> CaptureWarnings:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.WARNING)
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self.handler)

    @property
    def messages(self) -> list[str]:
        lines = [line.strip() for line in self.stream.getvalue().splitlines() if line.strip()]
        return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------
# Models on disk
# ---------------------------------------------------------------------------------------
def onnx_disk_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX model: the .onnx file plus every external data file it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path.resolve()}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes can hold external data too
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                files.add((path.parent / loc).resolve())
    return int(sum(f.stat().st_size for f in files if f.exists()))


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def big_model(fp32: Path) -> bool:
    return onnx_disk_bytes(fp32) > PROTOBUF_LIMIT


def export_fp32(source: str, folder: Path) -> tuple[Path, Any, float]:
    """Export ``source`` (a lowbit model name or path) once with lowbit's frontend:
    (path of the fp32 ``model.onnx``, the adapter without its torch module, seconds)."""
    import onnx_ir as ir
    from lowbit.compiler.frontend import load_source

    start = time.perf_counter()
    model_ir, adapter = load_source(source)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    weight_bytes = sum(v.const_value.nbytes for v in model_ir.graph.initializers.values() if v.const_value is not None)
    if weight_bytes > PROTOBUF_LIMIT:
        ir.save(model_ir, path, external_data="model.onnx.data")
    else:
        # One self-contained file: lowbit.compile on an .onnx input with external data writes an
        # artifact that still points at the source's data file for the initializers it leaves
        # untouched (e.g. MiniLM's embeddings), so keep the shared fp32 file inline.
        ir.save(model_ir, path)
    seconds = time.perf_counter() - start
    del model_ir
    # The torch module is not needed any more (the adapter keeps tokenizer and make_inputs).
    adapter.module = None
    adapter.hf_model = None
    gc.collect()
    return path, adapter, seconds


class WindowReader:
    """ORT CalibrationDataReader over a fixed list of feeds (``get_next`` for ``quantize_static``,
    iteration for the quantizers that loop over the reader, such as MatMulNBits' GPTQ)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0

    def __iter__(self) -> WindowReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.feeds)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
def accuracy(task: str, ref_out: list[np.ndarray], out: list[np.ndarray], eval_ids: list[np.ndarray]) -> dict[str, Any]:
    """Against fp32 on the held-out windows: perplexity, its increase, KL(fp32 || method), top-1
    agreement for causal LMs; cosine similarity of the outputs otherwise."""
    from lowbit.compiler.core import evaluate

    if task == "causal-lm":
        return evaluate.lm_metrics(ref_out, out, eval_ids)
    return evaluate.output_metrics(ref_out, out)


def latency_round_robin(
    sessions: dict[str, Any], feeds: dict[int, dict[str, np.ndarray]], rounds: int, repeats: dict[int, int]
) -> dict[str, Any]:
    """Per T: every method's median latency per round; the methods run interleaved, the
    starting method rotating each round, so machine noise hits all of them alike."""
    from lowbit.compiler.core import evaluate

    names = list(sessions)
    result: dict[str, Any] = {}
    for t, feed in feeds.items():
        per: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                per[n].append(evaluate.median_latency(sessions[n], feed, repeats=repeats[t], warmup=1) * 1e3)
        result[f"T={t}"] = {
            n: {"ms": float(np.median(v)), "best_round_ms": float(np.min(v)), "round_medians_ms": [round(x, 3) for x in v]}
            for n, v in per.items()
        }
        base = result[f"T={t}"].get("fp32")
        for n in names:
            if base:
                result[f"T={t}"][n]["speedup"] = base["ms"] / result[f"T={t}"][n]["ms"]
        log(f"  latency T={t}: " + ", ".join(f"{n} {result[f'T={t}'][n]['ms']:.2f} ms" for n in names))
    return result


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def run_record(script: str, argv: list[str] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The start of a comparison's results: the command, date, machine, versions, tree, load and settings."""
    rel = os.path.relpath(Path(script).resolve(), Path.cwd())
    return {
        "command": shlex.join(["python", rel, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": versions(),
        "lowbit_tree": git_state(),
        "load_average_at_start": list(os.getloadavg()),
        "settings": settings,
        "models": {},
    }


def provenance_lines(results: dict[str, Any]) -> list[str]:
    """The markdown lines saying where a :func:`run_record` result came from (command to total runtime)."""
    m = results["machine"]
    tree = results.get("lowbit_tree", {})
    return [
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"ONNX Runtime {results['versions']['onnxruntime']} (CPUExecutionProvider), lowbit {results['versions']['lowbit']}, "
        f"torch {results['versions']['torch']}, Python {m['python']}  ",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m.get('memory_gb', '?')} GB RAM, int8 ISA: {', '.join(m.get('int8_isa', [])) or 'none'}  ",
        f"Machine load (1-min load average, other jobs included) at start / end: "
        f"{results.get('load_average_at_start', [float('nan')])[0]:.1f} / {results.get('load_average_at_end', [float('nan')])[0]:.1f}  ",
        f"lowbit tree: commit {tree.get('commit', '?')}"
        + (f" + uncommitted changes in {', '.join(tree['modified_files'])}" if tree.get("modified_files") else "")
        + "  ",
        f"Total runtime: {results['total_seconds'] / 60:.1f} min",
    ]


def fmt_ms(lat: dict[str, Any] | None) -> str:
    """``ms (speedup x)`` of a latency entry, or a dash."""
    if not lat:
        return "—"
    return f"{lat['ms']:.2f} ({lat.get('speedup', float('nan')):.2f}x)"


def update_results(path: Path, section: str) -> None:
    """Replace the section of ``path`` whose heading is ``section``'s first line (up to the
    next ``## `` heading), or append it; other sections are kept."""
    heading = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\s*$.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def write_outputs(results: dict[str, Any], out: Path, stem: str, markdown: str, results_md: Path | None) -> None:
    """``<out>/<stem>.json`` and ``.md``, the markdown's section in ``results_md`` (when given), and
    the markdown on stdout."""
    (out / f"{stem}.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    if results_md is not None:
        update_results(results_md, markdown)
        log(f"updated {results_md}")
    print()
    print(markdown)
    log(f"done in {results['total_seconds'] / 60:.1f} min; wrote {out / (stem + '.json')}")


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def parse_setting(text: str) -> tuple[str, Any]:
    """``PASS.OPTION=VALUE`` from the command line; VALUE as JSON when it parses, else a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
