"""MetaSchedule tuning of the quantized matmuls, at static sequence lengths (``--tune N``).

MetaSchedule searches schedules for one static workload; every linear of a language model
has a dynamic row count (``batch * seq``). So tuning is per *length*:

1. :func:`specialise`: for each length ``L`` of ``--tune-seq-len`` (default 1 and 128),
   ``main`` is copied as ``main_t{L}`` with the inputs' symbolic dimensions bound
   (``relax.transform.BindSymbolicVars``: axis 0 -> 1, axis 1 -> ``L``). The Relax VM
   exports these functions beside ``main``; the runtime (:mod:`.runtime`) calls
   ``main_t{L}`` when the input is ``[1, L]`` and ``main`` otherwise.
2. :func:`tuning_tasks`: after lowbit's fusion (``build.fusion_passes``), the PrimFuncs
   of the specialised functions that are quantized matmuls (``matmul`` in the name, an
   ``int8`` or packed ``uint32`` operand, static shapes), one per distinct workload.
3. :func:`tune`: the tasks the database has no record for are tuned with
   ``ms.tune_tir`` (``N`` trials each) into a JSON database (``tuning/`` in the
   artifact); a database given with ``--tuning-db DIR`` is copied in first, so a
   second compile of the same shapes tunes nothing, and gets the new records back.
4. :func:`keep_faster`: each kernel with a record is built twice, with its best tuned
   schedule and with the default (dlight) one, and timed here; the tuned schedule is
   kept only where it is faster (a short search can lose to the default).
5. :func:`apply_database`: in the build pipeline, between fusion and dlight, every
   PrimFunc whose tuned schedule was kept gets it (and ``tirx.is_scheduled``, so
   dlight leaves it alone); the others keep dlight's default schedules.

The dynamic ``main`` is compiled as before (its kernels cannot match a static record).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from lowbit.backends.tvm.schedule import default_schedule as build_default
from lowbit.compiler.core.errors import InputError

logger = logging.getLogger("lowbit")
DEFAULT_SEQ_LENS = (1, 128)
DB_FOLDER = "tuning"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
#: seconds MetaSchedule's builder and runner may take for one candidate
BUILD_TIMEOUT = 300
#: operand dtypes that make a matmul "quantized" (int8 activations/weights, packed 4/8-bit codes)
QUANTIZED_DTYPES = ("int8", "uint32")


def entry_name(seq_len: int) -> str:
    return f"main_t{seq_len}"


# --------------------------------------------------------------------------------------
# Specialised entry functions
# --------------------------------------------------------------------------------------
def specialise(mod: tvm.IRModule, seq_lens: list[int]) -> tuple[tvm.IRModule, list[dict[str, Any]]]:
    """``mod`` with ``main_t{L}`` (batch 1, sequence ``L``) added for every ``L``; and the entries
    for the manifest: ``[{"function": "main_t128", "seq_len": 128, "shapes": [[1, 128]]}]`` (one
    shape per input, in order)."""
    main = mod["main"]
    n_in = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else len(main.params)
    inputs = main.params[:n_in]
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(dict(mod.functions))
    entries = []
    for length in seq_lens:
        binding: dict = {}
        shapes: list[list[int]] = []
        for p in inputs:
            ty = p.ty
            if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
                raise InputError(f"--tune: input {p.name} has no known rank; only inputs [batch, seq, ...] can be tuned")
            dims = []
            for axis, d in enumerate(ty.shape.values):
                if isinstance(d, tirx.IntImm):
                    dims.append(int(d))
                elif isinstance(d, tirx.Var) and axis in (0, 1):
                    value = 1 if axis == 0 else int(length)
                    if d in binding and int(binding[d]) != value:
                        raise InputError(f"--tune: dimension {d.name} of input {p.name} is both batch and sequence")
                    binding[d] = value
                    dims.append(value)
                else:
                    raise InputError(f"--tune: input {p.name} has a symbolic dimension {d} at axis {axis}; "
                                     "only [batch, seq, ...] inputs can be specialised to a sequence length")
            shapes.append(dims)
        name = entry_name(length)
        # fresh variables: the VM functions of one module must not share bindings (single-site assignment)
        fresh = relax.utils.copy_with_new_vars(main)
        binding = {v.name: value for v, value in binding.items()}  # by name: the copy may have new variables
        bound = relax.transform.BindSymbolicVars(binding, "main")(tvm.IRModule({"main": fresh}))["main"]
        out[name] = bound.with_attr("global_symbol", name)
        entries.append({"function": name, "seq_len": int(length), "shapes": shapes})
    return out, entries


# --------------------------------------------------------------------------------------
# Tasks, tuning, database
# --------------------------------------------------------------------------------------
def _static(func: tirx.PrimFunc) -> bool:
    """Only buffer parameters, all of static shape (a symbolic length is a scalar parameter or a shape variable)."""
    return all(isinstance(p.ty, tirx.BufferType) and all(isinstance(d, tirx.IntImm) for d in p.shape)
               for p in func.params)


def is_quantized_matmul(name: str, func: tirx.PrimFunc) -> bool:
    """A fused kernel around an int8 GEMM or a packed-weight decode-matmul, with static shapes."""
    return ("matmul" in name and _static(func)
            and any(str(p.dtype) in QUANTIZED_DTYPES for p in func.params))


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func.without_attr("global_symbol"))


def tuning_tasks(fused: tvm.IRModule) -> list[tuple[str, tirx.PrimFunc]]:
    """``(name, PrimFunc)`` of the distinct quantized-matmul workloads of the fused module."""
    import tvm_ffi

    tasks: list[tuple[str, tirx.PrimFunc]] = []
    for gv, func in sorted(fused.functions.items(), key=lambda kv: kv[0].name_hint):
        if isinstance(func, tirx.PrimFunc) and is_quantized_matmul(gv.name_hint, func):
            wl = _workload(func)
            if not any(tvm_ffi.structural_equal(wl, _workload(f)) for _, f in tasks):
                tasks.append((gv.name_hint, func))
    return tasks


def open_database(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)


def best_schedule(db, func: tirx.PrimFunc, target: tvm.target.Target):
    """The database's best schedule of ``func`` (a ``Schedule``), or None."""
    return db.query_schedule(_workload(func), target, workload_name="main")


def seed_database(folder: Path, source: str | Path | None) -> Path | None:
    """Copy the records of ``--tuning-db`` (a database folder, or an artifact holding ``tuning/``)
    into ``folder``; the folder new records should be copied back to (None for an artifact)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is None:
        return None
    src = Path(source)
    if (src / "manifest.json").is_file() or (src / DB_FOLDER / DB_FILES[0]).is_file():
        src, back = src / DB_FOLDER, None  # an artifact: read its records, never write into it
    else:
        back = src
    if src.exists() and not src.is_dir():
        raise InputError(f"--tuning-db {source}: not a folder")
    for name in DB_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    return back


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with the ``num-cores`` MetaSchedule's CPU search needs (this machine's CPUs)."""
    return tvm.target.Target({"kind": target.kind.name, "num-cores": max(1, os.cpu_count() or 1)})


def tune(fused: tvm.IRModule, target: tvm.target.Target, folder: Path, trials: int, *,
         seed: int = 0) -> dict[str, Any]:
    """Tune the quantized matmuls of ``fused`` that ``folder``'s database lacks (``trials`` each)."""
    from tvm.s_tir import meta_schedule as ms

    target = tuning_target(target)
    db = open_database(folder)
    tasks = tuning_tasks(fused)
    missing = [(n, f) for n, f in tasks if best_schedule(db, f, target) is None]
    info: dict[str, Any] = {"kernels": len(tasks), "reused": len(tasks) - len(missing), "tuned": 0, "trials": trials,
                            "tuning_seconds": 0.0,
                            # MetaSchedule's learned cost model needs xgboost; without it, random ranking
                            "cost_model": "xgb" if importlib.util.find_spec("xgboost") else "random"}
    if trials > 0 and missing:
        t0 = time.perf_counter()
        logger.info("tuning %d kernel(s), %d trials each: %s", len(missing), trials, [n for n, _ in missing])
        with tempfile.TemporaryDirectory(prefix="lowbit-ms-") as logs:
            ms.tune_tir(tvm.IRModule({n: f.without_attr("global_symbol") for n, f in missing}), target, logs,
                        max_trials_global=trials * len(missing), max_trials_per_task=trials,
                        num_trials_per_iter=min(trials, 64), database=db, seed=seed, num_tuning_cores=1,
                        cost_model=info["cost_model"],
                        # generous limits: a fresh worker imports TVM before its first build (slow on a loaded machine)
                        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT),
                        runner=ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT))
        info["tuned"] = len(missing)
        info["tuning_seconds"] = round(time.perf_counter() - t0, 2)
    info["records"] = len(db.get_all_tuning_records())
    return info


def kernel_inputs(func: tirx.PrimFunc, dev, seed: int = 0) -> list:
    """Random tensors for every buffer parameter of ``func`` (integers in [-100, 100) for integer types)."""
    rng = np.random.default_rng(seed)
    out = []
    for prm in func.params:
        shape, dtype = [int(d) for d in prm.shape], str(prm.dtype)
        data = rng.integers(-100, 100, shape) if "int" in dtype else rng.standard_normal(shape)
        out.append(tvm.runtime.tensor(data.astype(dtype), dev))
    return out


def build_kernel(func: tirx.PrimFunc, target: tvm.target.Target):
    """``func`` (scheduled or not) compiled alone, callable as ``"main"``."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target).mod


def kernel_ms(lib, args, dev, rounds: int = 3) -> float:
    """Median milliseconds of ``lib["main"](*args)`` over ``rounds`` timings of at least 50 ms each."""
    f = lib.time_evaluator("main", dev, number=5, repeat=1, min_repeat_ms=50)
    return float(np.median([f(*args).mean for _ in range(rounds)])) * 1e3


def default_schedule(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """``func`` as the build schedules it without a record (``build.default_schedule``)."""
    with target:
        return build_default(func, target)


def keep_faster(fused: tvm.IRModule, target: tvm.target.Target, folder: Path) -> tuple[list, dict[str, Any]]:
    """Time each tuned kernel against its default schedule, here; the workloads whose tuned schedule
    wins (for :func:`apply_database`), and the timings by kernel name."""
    db = open_database(folder)
    tt = tuning_target(target)
    dev = tvm.cpu()
    winners, timings = [], {}
    for name, func in tuning_tasks(fused):
        sch = best_schedule(db, func, tt)
        if sch is None:
            continue
        libs = {"default": build_kernel(default_schedule(func, target), target),
                "tuned": build_kernel(sch.mod["main"], target)}
        args = kernel_inputs(func, dev)
        ms = {k: [] for k in libs}
        for _ in range(3):  # interleaved: a change of load hits both
            for k, lib in libs.items():
                ms[k].append(kernel_ms(lib, args, dev, rounds=1))
        row = {k: round(float(np.median(v)), 4) for k, v in ms.items()}
        row["kept"] = "tuned" if row["tuned"] < row["default"] else "default"
        timings[name] = row
        if row["kept"] == "tuned":
            winners.append(_workload(func))
    return winners, timings


def apply_database(folder: Path, target: tvm.target.Target, applied: list[str],
                   winners: list | None = None) -> tvm.transform.Pass:
    """Give every PrimFunc that the database has a record for its best schedule (names into ``applied``);
    with ``winners`` (:func:`keep_faster`), only those workloads."""
    import tvm_ffi

    @tvm.transform.module_pass(opt_level=0, name="LowbitApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        db = open_database(folder)
        tt = tuning_target(target)
        out = mod
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or not _static(func):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            if winners is not None and not any(tvm_ffi.structural_equal(_workload(func), w) for w in winners):
                continue
            sch = best_schedule(db, func, tt)
            if sch is None:
                continue
            new = sch.mod["main"].without_attr("global_symbol")  # the workload's "main", not this kernel's
            if func.attrs is not None and "global_symbol" in func.attrs:
                new = new.with_attr("global_symbol", func.attrs["global_symbol"])
            out[gv] = new.with_attr("tirx.is_scheduled", True)
            applied.append(gv.name_hint)
        return out

    return _apply


def write_back(folder: Path, dest: Path | None) -> None:
    """Copy the database (with the new records) back to the ``--tuning-db`` folder."""
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in DB_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dest / name)
