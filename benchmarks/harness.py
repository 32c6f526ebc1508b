"""The benchmarks' harness: what every side-by-side comparison shares, so they all measure alike.

* **methods**: :class:`MethodRegistry` (name -> the callable that builds or runs a method, with
  its table label, in registration order); :meth:`MethodRegistry.run` keeps going when one
  fails (a failing peer is a result too);
* **settings**: :func:`e2e_settings` (calibration / held-out windows, timing rounds and repeats,
  full or ``--quick``), :func:`heldout_windows` (one split of the text every method shares);
* **timing**: :func:`rotated` and :func:`interleaved_rounds` (methods interleaved round-robin,
  the starting method rotating each round, so machine noise hits all of them alike),
  :func:`summarize_rounds` (median of the round medians, best round, speedup vs fp32),
  :func:`ratio` (one method against a peer), :func:`latency_round_robin` (ORT sessions at
  several sequence lengths), :func:`time_paired` and :class:`CacheFlusher` (kernel level:
  each variant timed back to back with the reference);
* **tables and targets**: :func:`table`, :func:`table_row`, :func:`failed_row`, :func:`fmt_ms`,
  :func:`target_line` (PASS / FAIL / N/A);
* **provenance**: :func:`git_state` (commit, dirty flag, changed files), :func:`versions`,
  :func:`machine_info`, :func:`command_line` (``python -m benchmarks.<name> ...``),
  :func:`run_record` (all of them plus date, load and settings), :func:`provenance_lines`;
* **output**: :func:`jsonable`, :func:`write_json`, :func:`write_outputs` (JSON plus markdown),
  :func:`update_results` (replace one ``## `` section of ``RESULTS.md``, keeping the others),
  :func:`results_target`;
* **reuse**: :func:`stamp_artifact`, :func:`check_reuse`, :func:`reuse_allowed`: an artifact
  built by a benchmark records the tree that built it, and a later ``--reuse`` takes it only
  when that tree and this one are the same commit, both clean;
* **end-to-end helpers**: :func:`export_fp32` (the one fp32 ONNX every method starts from),
  :class:`WindowReader` (ORT calibration reader), :func:`accuracy`, :func:`onnx_disk_bytes`,
  :func:`op_counts`, :func:`big_model`, :class:`CaptureWarnings`, :func:`parse_setting`.

The scripts run as modules from the repository root (``python -m benchmarks.compare_int8``,
``python -m benchmarks.kernels.ort_linear_kernels``) and import this one as
``benchmarks.harness``.
"""

from __future__ import annotations

import collections
import dataclasses
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
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"  # git-ignored
RESULTS_MD = HERE / "RESULTS.md"
THREADS = 2
PROTOBUF_LIMIT = 1_800_000_000  # above this, write the fp32 model with external data
#: the file beside a benchmark's artifact that records the tree that built it
STAMP = "built_by.json"
#: files the benchmarks write themselves: a change to them does not make a tree "changed" for reuse
BENCHMARK_OUTPUTS = ("benchmarks/RESULTS.md",)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., dict[str, Any]]
    label: str


class MethodRegistry(Mapping[str, Method]):
    """The methods of one comparison, by name, in the order they were registered (the order
    they are built, timed and tabulated in)::

        METHODS = MethodRegistry()

        @METHODS.register("ort-dynamic", label="ORT quantize_dynamic")
        def ort_dynamic(fp32, folder, ctx): ...

        METHODS.register("lowbit-w8a8", lowbit_method("w8a8"), label="lowbit w8a8")

    A method's callable returns a dict of what it built and measured (its ``path``,
    ``quantize_seconds``, ...); :meth:`run` calls it and turns an exception into an
    ``{"error", "traceback"}`` entry instead.
    """

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, name: str, fn: Callable[..., dict[str, Any]] | None = None, *, label: str | None = None):
        """Add ``fn`` under ``name`` (a decorator when ``fn`` is left out); names are unique."""

        def add(f: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
            if name in self._methods:
                raise ValueError(f"method {name!r} registered twice")
            self._methods[name] = Method(name, f, label or name)
            return f

        return add if fn is None else add(fn)

    def __getitem__(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise KeyError(f"unknown method {name!r} (known: {', '.join(self._methods)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def names(self) -> list[str]:
        return list(self._methods)

    def labels(self) -> dict[str, str]:
        return {n: m.label for n, m in self._methods.items()}

    def label(self, name: str) -> str:
        return self._methods[name].label if name in self._methods else name

    def run(self, name: str, *args: Any, prefix: str = "", print_traceback: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Build or run method ``name``: its result, or ``{"error", "traceback"}`` if it raised."""
        fn = self[name].fn
        log(f"{prefix}{name}: quantizing")
        start = time.perf_counter()
        try:
            info = fn(*args, **kwargs)
        except Exception as e:  # keep going: a failing method is a result too
            log(f"{prefix}{name}: FAILED: {short_error(e)}")
            if print_traceback:
                traceback.print_exc()
            return {"error": short_error(e), "traceback": traceback.format_exc(limit=6)}
        seconds = info.get("quantize_seconds")
        log(f"{prefix}{name}: done in {seconds if seconds is not None else time.perf_counter() - start:.1f} s")
        return info


# ---------------------------------------------------------------------------------------
# Settings and data
# ---------------------------------------------------------------------------------------
def e2e_settings(quick: bool) -> dict[str, Any]:
    """Windows and timing of an end-to-end comparison: calibration and held-out windows, timing
    rounds, and runs per method per round by sequence length; ``quick``: a smoke run."""
    if quick:
        return {"calib_samples": 4, "eval_samples": 4, "rounds": 2, "repeats": {1: 3, 128: 2}}
    return {"calib_samples": 32, "eval_samples": 16, "rounds": 6, "repeats": {1: 10, 128: 3}}


@dataclasses.dataclass
class Windows:
    """One split of the text that every method calibrates on and is measured on."""

    calib_feeds: list[dict[str, np.ndarray]]
    eval_feeds: list[dict[str, np.ndarray]]
    eval_ids: list[np.ndarray]
    latency_feeds: dict[int, dict[str, np.ndarray]]  # by T: the first held-out window's first T tokens
    record: dict[str, Any]  # what the JSON says about the data


def heldout_windows(adapter: Any, calib_data: Any, cfg: dict[str, Any], seq_len: int,
                    latency_lengths: Sequence[int] = (1, 128)) -> Windows:
    """Disjoint calibration and held-out windows of ``calib_data`` (None: the default text) cut by
    ``lowbit.compiler.core.data.split_text``, as the model's inputs."""
    from lowbit.compiler.core.data import split_text

    split = split_text(
        adapter.tokenizer, calib_data=calib_data, eval_data=None,
        calib_samples=cfg["calib_samples"], eval_samples=cfg["eval_samples"], seq_len=seq_len,
    )
    calib_feeds = [adapter.make_inputs([w]) for w in split.calibration]
    eval_feeds = [adapter.make_inputs([w]) for w in split.evaluation]
    eval_ids = [np.array([w], dtype=np.int64) for w in split.evaluation]
    record = {
        "source": split.source,
        "seq_len": seq_len,
        "calibration_windows": len(split.calibration),
        "evaluation_windows": len(split.evaluation),
        "evaluation_tokens": int(sum(len(w) for w in split.evaluation)),
    }
    full = adapter.make_inputs([split.evaluation[0]])
    lat_feeds = {t: {k: np.ascontiguousarray(v[:, :t]) for k, v in full.items()} for t in latency_lengths}
    return Windows(calib_feeds, eval_feeds, eval_ids, lat_feeds, record)


# ---------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------
def rotated(names: Sequence[str], r: int) -> list[str]:
    """``names`` starting at the ``r``-th (mod their count): the order of round ``r``."""
    names = list(names)
    if not names:
        return []
    k = r % len(names)
    return names[k:] + names[:k]


def interleaved_rounds(names: Sequence[str], rounds: int, measure: Callable[[str], float],
                       rotate: bool = True) -> dict[str, list[float]]:
    """``measure(name)`` for every name in every round, the names interleaved and (``rotate``)
    the starting one rotating each round, so a load change on the machine hits all of them
    alike: per name, one value per round."""
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (rotated(names, r) if rotate else names):
            per[n].append(measure(n))
    return per


def summarize_rounds(per: Mapping[str, Sequence[float]], ref: str | None = "fp32") -> dict[str, dict[str, Any]]:
    """Per name: the median of its round values (``ms``), the best round, the rounds themselves,
    and, when ``ref`` is among the names, the speedup against it (ratio of the medians)."""
    out = {
        n: {"ms": float(np.median(v)), "best_round_ms": float(np.min(v)), "round_medians_ms": [round(x, 3) for x in v]}
        for n, v in per.items()
    }
    base = out.get(ref) if ref is not None else None
    if base:
        for n in out:
            out[n]["speedup"] = base["ms"] / out[n]["ms"]
    return out


def ratio(lat: Mapping[str, Mapping[str, Any]], method: str, peer: str) -> float | None:
    """How many times faster ``method`` is than ``peer`` in one latency table (``peer`` ms over
    ``method`` ms); None when either was not timed."""
    if method not in lat or peer not in lat:
        return None
    return lat[peer]["ms"] / lat[method]["ms"]


def latency_round_robin(
    sessions: dict[str, Any], feeds: dict[int, dict[str, np.ndarray]], rounds: int, repeats: dict[int, int]
) -> dict[str, Any]:
    """Per T: every method's median latency per round (each round the median of ``repeats[T]``
    runs after one warm-up), the methods interleaved round-robin; summarized by
    :func:`summarize_rounds` (speedup against ``fp32``)."""
    from lowbit.compiler.core import evaluate

    names = list(sessions)
    result: dict[str, Any] = {}
    for t, feed in feeds.items():
        per = interleaved_rounds(
            names, rounds, lambda n: evaluate.median_latency(sessions[n], feed, repeats=repeats[t], warmup=1) * 1e3
        )
        result[f"T={t}"] = summarize_rounds(per, ref="fp32")
        log(f"  latency T={t}: " + ", ".join(f"{n} {result[f'T={t}'][n]['ms']:.2f} ms" for n in names))
    return result


def latency_settings(rounds: int, repeats: dict[int, int]) -> dict[str, Any]:
    """What :func:`latency_round_robin` ran, for the JSON."""
    return {"rounds": rounds, "repeats_per_round": repeats, "batch": 1, "intra_op_num_threads": THREADS,
            "statistic": "median over rounds of each round's median"}


def latency_text(settings: dict[str, Any]) -> str:
    """The sentence a report gives on how :func:`latency_round_robin` timed."""
    reps = settings["repeats"]
    return ("Latency: batch 1, intra_op_num_threads=2, ORT_ENABLE_ALL; "
            f"{settings['rounds']} rounds with all methods interleaved (starting method rotated), each round "
            f"the median of {reps.get(1, reps.get('1'))} (T=1) / {reps.get(128, reps.get('128'))} (T=128) runs; "
            "the table shows the median of the round medians and the speedup vs fp32.")


class CacheFlusher:
    """Writes a buffer larger than the last-level cache before each timed run, so that every
    run reads its weights from DRAM, as each layer of a real model does once per token
    (8 linears of SmolLM2 shapes would otherwise sit in a 32 MiB L3 in int8 and partly in
    fp32, which inflates the int8 speedup at T=1)."""

    def __init__(self, mib: int = 96) -> None:
        self.buf = np.ones(mib * 2**20 // 8, dtype=np.float64)  # touch every page now

    def __call__(self) -> None:
        self.buf += 1.0


def time_paired(runs: dict[str, Callable[[], object]], rounds: int, ref: str = "fp32",
                flush: Callable[[], None] | None = None, reps: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Paired timing: in every round, each variant is timed back to back with the fp32
    reference (order alternating between rounds, variants in rotating order); each side of
    a pair is the fastest of ``reps`` runs (a run that lost its time slice is dropped), and
    the speedup is the median over rounds of ``t_ref / t_variant``.

    Why paired: this machine is shared (2 vCPUs, other jobs come and go in bursts of
    seconds; one busy core stalls ORT's 2-thread pool several-fold). Two runs a few
    milliseconds apart see the same load, so their ratio survives bursts that make
    absolute times (and ratios of separately taken medians) swing by 3-5x. The minimum of
    a few runs removes the single runs that were preempted."""
    for fn in runs.values():  # warm-up (first-run allocations, prepacking)
        fn()
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in runs if name != ref}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(ratios)
    for r in range(rounds):
        for name in rotated(names, r):
            t = {}
            for nm in ((ref, name) if r % 2 == 0 else (name, ref)):
                best = float("inf")
                for _ in range(reps):
                    if flush is not None:
                        flush()
                    t0 = clock()
                    runs[nm]()
                    best = min(best, clock() - t0)
                t[nm] = best
            ratios[name].append(t[ref] / t[name])
            times[name].append(t[name])
            times[ref].append(t[ref])
    out = {ref: {"ms": 1e3 * statistics.median(times[ref]), "speedup": 1.0, "speedup_iqr": [1.0, 1.0]}}
    for name, rs in ratios.items():
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0], rs[0], rs[0]]
        out[name] = {"ms": 1e3 * statistics.median(times[name]), "speedup": statistics.median(rs),
                     "speedup_iqr": [q[0], q[2]]}
    return out


# ---------------------------------------------------------------------------------------
# Tables and targets
# ---------------------------------------------------------------------------------------
def table_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(head: Sequence[str], rows: Iterable[Sequence[Any] | str] = ()) -> list[str]:
    """A markdown table: the header, its separator and the rows (a row given as a string is
    taken as already formatted, e.g. a :func:`failed_row`)."""
    lines = [table_row(head), "|" + "---|" * len(head)]
    lines += [r if isinstance(r, str) else table_row(r) for r in rows]
    return lines


def failed_row(label: str, error: str, columns: int) -> str:
    """A table row for a method that failed: its label, the error, the other cells empty."""
    return f"| {label} | FAILED: {error[:120].replace('|', '/')} |" + " |" * (columns - 2)


def fmt_ms(lat: dict[str, Any] | None) -> str:
    """``ms (speedup x)`` of a latency entry, or a dash."""
    if not lat:
        return "—"
    return f"{lat['ms']:.2f} ({lat.get('speedup', float('nan')):.2f}x)"


def target_line(ok: bool | None, text: str) -> str:
    """A target's verdict: ``**PASS** — text``, ``**FAIL** — text``, or (``ok`` None: it could
    not be measured) ``**N/A** — text``."""
    verdict = "N/A" if ok is None else "PASS" if ok else "FAIL"
    return f"**{verdict}** — {text}"


# ---------------------------------------------------------------------------------------
# Provenance: machine, versions, tree, command
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


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    out = {}
    for p in ("lowbit", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "torch", "transformers", "numpy", *extra):
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """The tree a run measures: ``commit`` (short), ``commit_full``, ``dirty`` (uncommitted
    changes to tracked files, or untracked files that git does not ignore), and the changed
    files (``modified_files``, ``untracked_files``). Empty when git cannot tell (no repository,
    no git)."""

    def git(*a: str) -> str:
        p = subprocess.run(["git", *a], cwd=repo or REPO, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise subprocess.SubprocessError(p.stderr.strip())
        return p.stdout

    try:
        full = git("rev-parse", "HEAD").strip()
        short = git("rev-parse", "--short", "HEAD").strip()
        lines = [line for line in git("status", "--porcelain", "--untracked-files=normal").splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return {}
    modified = [line[3:] for line in lines if not line.startswith("??")]
    untracked = [line[3:] for line in lines if line.startswith("??")]
    return {"commit": short, "commit_full": full, "dirty": bool(modified or untracked),
            "modified_files": modified, "untracked_files": untracked}


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How the benchmark was run: ``python -m <module> <arguments>`` (``argv`` None: this
    process's arguments)."""
    if module.endswith(".__main__"):
        module = module.removesuffix(".__main__")
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def run_record(module: str, argv: Sequence[str] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The start of a comparison's results: the command, date, machine, versions, tree, load and
    settings (``module``: the script's module name, ``__spec__.name``)."""
    return {
        "command": command_line(module, argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": versions(),
        "lowbit_tree": git_state(),
        "load_average_at_start": list(os.getloadavg()),
        "settings": settings,
        "models": {},
    }


def finish_record(results: dict[str, Any]) -> dict[str, Any]:
    """Stamp the end of a run on its record: total runtime and load average."""
    results["total_seconds"] = time.perf_counter() - T0
    results["load_average_at_end"] = list(os.getloadavg())
    return results


def save_progress(results: dict[str, Any], path: Path) -> None:
    """Write a run's JSON so far (a run cut short keeps what it measured), with the time so far."""
    results["total_seconds"] = time.perf_counter() - T0
    write_json(path, results)


def tree_line(tree: dict[str, Any]) -> str:
    """``lowbit tree: commit X`` and the changed files, for a report."""
    changed = [*tree.get("modified_files", []), *(f"{f} (untracked)" for f in tree.get("untracked_files", []))]
    return (f"lowbit tree: commit {tree.get('commit', '?')}"
            + (f" + uncommitted changes in {', '.join(changed)}" if changed else ""))


def provenance_lines(results: dict[str, Any]) -> list[str]:
    """The markdown lines saying where a :func:`run_record` result came from (command to total runtime)."""
    m = results["machine"]
    return [
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"ONNX Runtime {results['versions']['onnxruntime']} (CPUExecutionProvider), lowbit {results['versions']['lowbit']}, "
        f"torch {results['versions']['torch']}, Python {m['python']}  ",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m.get('memory_gb', '?')} GB RAM, int8 ISA: {', '.join(m.get('int8_isa', [])) or 'none'}  ",
        f"Machine load (1-min load average, other jobs included) at start / end: "
        f"{results.get('load_average_at_start', [float('nan')])[0]:.1f} / {results.get('load_average_at_end', [float('nan')])[0]:.1f}  ",
        tree_line(results.get("lowbit_tree", {})) + "  ",
        f"Total runtime: {results['total_seconds'] / 60:.1f} min",
    ]


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
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


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2) + "\n")


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


def results_target(results: Path | str | None, quick: bool = False) -> Path | None:
    """The markdown file whose section a run replaces: ``--results`` when given ('' for none),
    else ``benchmarks/RESULTS.md``, except after a ``--quick`` run (none)."""
    if results is not None:
        return Path(results) if str(results) else None
    return None if quick else RESULTS_MD


def write_outputs(results: dict[str, Any], out: Path, stem: str, markdown: str, results_md: Path | None) -> None:
    """``<out>/<stem>.json`` and ``.md``, the markdown's section in ``results_md`` (when given), and
    the markdown on stdout."""
    write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(markdown)
    if results_md is not None:
        update_results(results_md, markdown)
        log(f"updated {results_md}")
    print()
    print(markdown)
    log(f"done in {results['total_seconds'] / 60:.1f} min; wrote {out / (stem + '.json')}")


def render_from(json_path: Path, markdown: str, results_md: Path | None) -> None:
    """``--render``: the markdown of a JSON a run wrote, next to it, and in ``results_md``."""
    (json_path.parent / f"{json_path.stem}.md").write_text(markdown)
    if results_md is not None:
        update_results(results_md, markdown)
    print(markdown)


# ---------------------------------------------------------------------------------------
# Reuse of artifacts: only from the same clean tree
# ---------------------------------------------------------------------------------------
def _changes(tree: dict[str, Any]) -> list[str]:
    """The tree's changed files that could change a build (all but the benchmarks' own outputs)."""
    files = [*tree.get("modified_files", []), *tree.get("untracked_files", [])]
    return [f for f in files if f.split(" -> ")[-1].strip('"') not in BENCHMARK_OUTPUTS]


def stamp_artifact(folder: Path, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record, in ``folder/built_by.json``, the tree that built the artifact in ``folder``:
    its commit and whether it had changes. ``start``: the tree when the run began (a run
    imports code lazily, so a tree that changed between then and now counts as changed)."""
    now = git_state()
    stamp: dict[str, Any] = {**now, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "argv": list(sys.argv)}
    if start is not None and (start.get("commit_full") != now.get("commit_full") or _changes(start) != _changes(now)):
        stamp["dirty"] = True
        stamp["changed_during_run"] = {"at_start": start}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STAMP, stamp)
    return stamp


def clear_stamp(folder: Path) -> None:
    """Forget who built ``folder`` (before building it again: a build that fails leaves no stamp)."""
    (folder / STAMP).unlink(missing_ok=True)


def check_reuse(folder: Path, current: dict[str, Any] | None = None) -> str | None:
    """Why the artifact in ``folder`` must not be reused by this tree, or None when it may: the
    tree that built it (its :func:`stamp_artifact`) and this one (``current``, default
    :func:`git_state`) must be the same commit, neither with changes (the benchmarks' own
    ``RESULTS.md`` aside)."""
    path = folder / STAMP
    if not path.is_file():
        return f"no record of the tree that built it ({STAMP} missing)"
    try:
        built = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{STAMP} unreadable ({short_error(e)})"
    current = git_state() if current is None else current
    if not built.get("commit_full"):
        return "built outside a git tree (commit unknown)"
    if not current.get("commit_full"):
        return "this tree's commit is unknown (git failed)"
    if built.get("changed_during_run"):
        start = built["changed_during_run"].get("at_start") or {}
        return (f"the tree changed while it was built (commit {start.get('commit', '?')}"
                + (" with uncommitted changes" if _changes(start) else "") + f" at the start, {built.get('commit')} at the end)")
    if _changes(built):
        changed = _changes(built)
        return f"built by commit {built.get('commit')} with uncommitted changes ({', '.join(changed[:5])}" + (
            ", ...)" if len(changed) > 5 else ")")
    if built["commit_full"] != current["commit_full"]:
        return f"built by commit {built.get('commit')}, this tree is at {current.get('commit')}"
    if _changes(current):
        changed = _changes(current)
        return f"this tree has uncommitted changes ({', '.join(changed[:5])}" + (", ...)" if len(changed) > 5 else ")")
    return None


def reuse_allowed(folder: Path, current: dict[str, Any] | None = None) -> bool:
    """:func:`check_reuse`, logging the refusal."""
    reason = check_reuse(folder, current)
    if reason is not None:
        log(f"not reusing {_rel(folder)}: {reason}; building it again")
    return reason is None


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------
# End-to-end helpers: models on disk, the shared fp32 export, calibration, accuracy
# ---------------------------------------------------------------------------------------
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


def accuracy(task: str, ref_out: list[np.ndarray], out: list[np.ndarray], eval_ids: list[np.ndarray]) -> dict[str, Any]:
    """Against fp32 on the held-out windows: perplexity, its increase, KL(fp32 || method), top-1
    agreement for causal LMs; cosine similarity of the outputs otherwise."""
    from lowbit.compiler.core import evaluate

    if task == "causal-lm":
        return evaluate.lm_metrics(ref_out, out, eval_ids)
    return evaluate.output_metrics(ref_out, out)


def accuracy_summary(acc: dict[str, Any]) -> str:
    """One log line's worth of an :func:`accuracy` result."""
    if "perplexity" in acc:
        return (f"ppl {acc['perplexity']:.4f} ({acc['perplexity_increase']:+.3%}), KL {acc['kl']:.4g}, "
                f"top-1 {acc['top1_agreement']:.2%}")
    if "cosine_mean" in acc:
        return f"cosine mean {acc['cosine_mean']:.6f}, min {acc['cosine_min']:.6f}"
    if "error" in acc:
        return f"accuracy failed: {acc['error']}"
    return ""


def relative_paths(methods: Mapping[str, dict[str, Any]], keys: Sequence[str] = ("path",)) -> None:
    """The methods' paths made relative to the repository (for the JSON)."""
    for info in methods.values():
        for key in keys:
            if key in info:
                info[key] = os.path.relpath(info[key], REPO)


def parse_setting(text: str) -> tuple[str, Any]:
    """``PASS.OPTION=VALUE`` from the command line; VALUE as JSON when it parses, else a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
