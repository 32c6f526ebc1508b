"""Schedule and compile the Relax module; write the library, its parameters and metadata.

Pipeline (one ``tvm.transform.Pass`` handed to ``tvm.compile``)::

    FuseTransposeMatmul          x @ permute_dims(W) -> one NT matmul (weights are [N, K])
    LegalizeOps                  Relax ops -> TIR PrimFuncs
    LowbitUnifySymbolicVars      the legalized shape functions' variables -> batch/seq (relax_import)
    AnnotateTIROpPattern, FoldConstant
    FuseDecodeMatmul             lowbit_decode_* feeding a matmul -> one kernel (FuseOpsByPattern + FuseTIR)
    AnnotateTIROpPattern, FuseOps, FuseTIR      elementwise prologues/epilogues
    LowbitApplyTuningDatabase    --tune / --tuning-db only: MetaSchedule's records (lowbit.backends.tvm.tune)
    dlight                       default schedules for what is left
    + the target's dataflow-lowering and finalisation passes (TVM's own lists)

The default fusion would leave the 4-bit decode as a separate kernel writing the whole
float weight; matching ``call_tir(decode) -> call_tir(matmul)`` and fusing the pair makes
the matmul (a GEMV at one token) read the packed words directly.

dlight rules: LLVM gets the CPU GEMV and reduction rules; CUDA the GPU rules
(LowBatchGEMV, Matmul, GEMV, Reduction, GeneralReduction, Fallback). dlight has no CPU
matmul rule: on LLVM the int8 GEMMs get :mod:`lowbit.backends.tvm.cpu`'s tiled, parallel
schedule instead (``default_schedule``).

int8 GEMMs on CUDA (``LowbitInt8GemmSchedule``, before dlight): the tensor-core path of
dlight's Matmul rule fails for int8 in TVM 0.27 (software-pipeline injection,
``GetWmmaFragmentSize``), so each PrimFunc holding an int8 x int8 -> int32 NT matmul
(W8A8 linears, with their fused correction/rescale epilogue) is scheduled by
:mod:`lowbit.backends.tvm.mma` instead: ``mma.sync.m16n8k32`` s8 tensor cores with
``ldmatrix`` and ``cp.async`` (sm_80 and newer; ``K % 32 == 0``, ``N % 16 == 0``), marked
``tirx.is_scheduled``. Where that schedule does not apply (older arch, shape, structure)
or fails, the function is marked ``dlight.do_not_tensorize`` and dlight's SIMT Matmul
schedule runs it; nvcc compiles that to ``dp4a``. ``info["int8_kernels"]`` lists which
kernels got which (``{"mma": [...], "dp4a": [...]}``). The ``cp.async`` copies need
``PassContext(config={"tirx.use_async_copy": True})`` around ``tvm.compile``
(:func:`_device_context`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

from lowbit.backends.tvm import kernels, mma, targets
from lowbit.backends.tvm.relax_import import to_relax, unify_symbolic_vars
from lowbit.backends.tvm.schedule import default_schedule, dlight_rules  # noqa: F401 - build.default_schedule is public
from lowbit.compiler.core.errors import InputError

logger = logging.getLogger("lowbit")
LIB = "lib.so"
PARAMS = "params.bin"


@dataclasses.dataclass
class BuildResult:
    """What the build wrote and measured, for the manifest."""

    files: list[str]
    info: dict[str, Any]
    executable: Any = None
    params: list[np.ndarray] | None = None


# --------------------------------------------------------------------------------------
# Fusion of the 4-bit decode into its matmul
# --------------------------------------------------------------------------------------
def _callee(call) -> str:
    gv = call.args[0] if isinstance(call, relax.Call) and call.args else None
    return gv.name_hint if isinstance(gv, tvm.ir.GlobalVar) else ""


def _decode_matmul_pattern(n_aux: int):
    decode = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard() for _ in range(n_aux)]),
                                     add_constraint=False)
    matmul = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard(), decode]), add_constraint=False)

    def check(ctx) -> bool:
        d, m = ctx.annotated_expr["decode"], ctx.annotated_expr["matmul"]
        return _callee(d).startswith(kernels.DECODE_PREFIX) and "matmul" in _callee(m)

    return ("lowbit.decode_matmul", matmul, {"decode": decode, "matmul": matmul}, check)


def fuse_decode_matmul() -> tvm.transform.Pass:
    """Fuse each ``lowbit_decode_*`` PrimFunc into the matmul that reads its output."""
    return tvm.transform.Sequential([
        relax.transform.FuseOpsByPattern([_decode_matmul_pattern(2), _decode_matmul_pattern(3)],
                                         bind_constants=False, annotate_codegen=False),
        relax.transform.FuseTIR(),
    ], name="FuseDecodeMatmul")


def _int8_gemm_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """GPU: int8 GEMM PrimFuncs onto tensor cores where :mod:`~lowbit.backends.tvm.mma` applies
    (``tirx.is_scheduled``), the other int8 PrimFuncs kept off dlight's tensor-core path
    (``dlight.do_not_tensorize``: dp4a SIMT code). Records the split in :data:`INT8_KERNELS`."""
    use_mma = mma.supports(target)

    @tvm.transform.module_pass(opt_level=0, name="LowbitInt8GemmSchedule")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(mod.functions, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(mod.functions)
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or 'int8"' not in func.script():
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            if mma.is_int8_gemm(func):
                scheduled = _try_mma(gv.name_hint, func, target) if use_mma else None
                if scheduled is not None:
                    out[gv] = scheduled.with_attr("tirx.is_scheduled", True)
                    INT8_KERNELS["mma"].append(gv.name_hint)
                    continue
                INT8_KERNELS["dp4a"].append(gv.name_hint)
            out[gv] = func.with_attr("dlight.do_not_tensorize", True)
        return out

    return _apply


def _try_mma(name: str, func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """``func`` on tensor cores, lowered once through TIR's pipeline as a check; None (logged) if
    the schedule does not apply or fails: the caller falls back to dp4a."""
    try:
        reason = mma.why_not(func)
        if reason is not None:
            logger.info("int8 GEMM %s stays on dp4a: %s", name, reason)
            return None
        scheduled = mma.schedule_int8_gemm(func)
        if scheduled is None:
            return None
        _check_lowering(scheduled, target)
    except Exception as e:  # noqa: BLE001 - a schedule or lowering error: this kernel falls back, the build goes on
        logger.info("int8 GEMM %s: tensor-core schedule failed, dp4a instead: %s", name,
                    (str(e).strip().splitlines() or [type(e).__name__])[-1][:200])
        return None
    return scheduled


def _check_lowering(func: tirx.PrimFunc, target: tvm.target.Target) -> None:
    """Run ``func`` through the device-side TIR lowering (software pipeline, async copies,
    vectorization...) that ``tvm.compile`` will apply later, so that its errors show here."""
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.tirx.transform.BindTarget(target.with_host(target.host or "llvm"))(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    _, device = split_host_device_mods(pipeline(mod))
    for device_mod in device.values():
        finalize_device()(device_mod)


#: int8 GEMM PrimFuncs of the last CUDA build, by schedule (see :func:`_int8_gemm_schedule`)
INT8_KERNELS: dict[str, list[str]] = {"mma": [], "dp4a": []}


def fusion_passes() -> list:
    """Relax -> fused TIR, before any scheduling."""
    return [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        unify_symbolic_vars,
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        fuse_decode_matmul(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def relax_pipeline(target: tvm.target.Target, *, tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """The whole Relax pipeline for ``target`` (see the module docstring); ``tuned``: a pass that
    gives kernels their tuned schedules (``tune.apply_database``), run before dlight."""
    backend = _backend_module(target)

    @tvm.transform.module_pass(opt_level=0, name="LowbitTVMPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = list(backend.library_dispatch_passes(target)) + fusion_passes()
            if target.kind.name == "cuda":
                passes.append(_int8_gemm_schedule(target))
            if tuned is not None:
                passes.append(tuned)
            passes.append(_default_schedule(target))
            passes += list(backend.dataflow_lower_passes(target)) + list(backend.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _default_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """:func:`default_schedule` for every PrimFunc not scheduled yet: a function dlight cannot
    even open (TVM 0.27's schedule state rejects some fused functions as ill-formed) keeps
    its unscheduled loops instead of failing the build; such functions are logged and
    counted in ``UNSCHEDULED``."""

    @tvm.transform.module_pass(opt_level=0, name="LowbitDefaultSchedule")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            try:
                out[gv] = default_schedule(func, target)
            except Exception as e:  # noqa: BLE001 - TVM raises InternalError, ValueError...; the build goes on
                logger.info("no default schedule for %s: %s", gv.name_hint, str(e).strip().splitlines()[-1][:200])
                UNSCHEDULED.append(gv.name_hint)
        return out

    return _apply


#: PrimFuncs of the last build that dlight could not schedule (see :func:`_default_schedule`)
UNSCHEDULED: list[str] = []


def _backend_module(target: tvm.target.Target):
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline
    else:
        from tvm.relax.backend.cpu_generic import pipeline
    return pipeline


# --------------------------------------------------------------------------------------
# Build + export
# --------------------------------------------------------------------------------------
def build(
    model: ir.Model,
    out_dir: str | os.PathLike,
    *,
    target: str = "llvm",
    arch: str | None = None,
    tune_trials: int = 0,
    tune_seq_lens: list[int] | tuple[int, ...] | None = None,
    tuning_db: str | os.PathLike | None = None,
) -> BuildResult:
    """Compile the lowered ``model`` for ``target`` into ``out_dir`` (``lib.so``, ``params.bin``).

    ``tune_trials`` > 0 or a ``tuning_db``: specialise ``main`` to batch 1 and each of
    ``tune_seq_lens`` (``main_t{L}``), tune their quantized matmuls with MetaSchedule
    (``tune_trials`` trials each, only those ``tuning_db`` has no record for) and build
    them with the tuned schedules; the database is written to ``out_dir/tuning`` (see
    :mod:`lowbit.backends.tvm.tune`).
    """
    out = Path(out_dir)
    tgt = targets.make_target(target, arch)
    info: dict[str, Any] = {"target": targets.describe(tgt), "target_kind": tgt.kind.name}
    t0 = time.perf_counter()
    mod, names, arrays = to_relax(model)
    info["import_seconds"] = round(time.perf_counter() - t0, 3)
    files = [LIB, PARAMS]
    tuned_pass, applied = None, []
    if tune_trials or tuning_db is not None:
        from lowbit.backends.tvm import tune

        if tgt.kind.name != "llvm":
            raise InputError("--tune and --tuning-db apply to --target llvm only (CUDA kernels use dlight's GPU rules)")
        lens = sorted({int(n) for n in (tune_seq_lens or tune.DEFAULT_SEQ_LENS)})
        mod, entries = tune.specialise(mod, lens)
        folder = out / tune.DB_FOLDER
        back = tune.seed_database(folder, tuning_db)
        with warnings_quiet(), tgt:
            fused = tvm.transform.Sequential(list(_backend_module(tgt).library_dispatch_passes(tgt)) + fusion_passes())(mod)
            info["tuning"] = tune.tune(fused, tgt, folder, int(tune_trials))
            winners, info["tuning"]["timed_ms"] = tune.keep_faster(fused, tgt, folder)
        tune.write_back(folder, back)
        info["tuning"].update({"seq_lens": lens, "database": tune.DB_FOLDER,
                               "source_database": str(Path(tuning_db).resolve()) if tuning_db is not None else None})
        inputs = [v.name for v in model.graph.inputs]
        info["entries"] = [e | {"shapes": dict(zip(inputs, e["shapes"]))} for e in entries]
        tuned_pass = tune.apply_database(folder, tgt, applied, winners)
        files += [f"{tune.DB_FOLDER}/{n}" for n in tune.DB_FILES if (folder / n).is_file()]
    t2 = time.perf_counter()
    UNSCHEDULED.clear()
    for kind in INT8_KERNELS.values():
        kind.clear()
    with warnings_quiet(), _device_context(tgt):
        ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt, tuned=tuned_pass))
    info["compile_seconds"] = round(time.perf_counter() - t2, 3)
    info["unscheduled_kernels"] = list(UNSCHEDULED)
    if tgt.kind.name == "cuda":
        info["int8_kernels"] = {kind: sorted(names) for kind, names in INT8_KERNELS.items()}
    if "tuning" in info:
        info["tuning"]["applied_kernels"] = sorted(applied)
    if tgt.kind.name == "cuda":
        from lowbit.backends.tvm import cuda

        info["cuda"] = cuda.export(ex, tgt, out, LIB)
        files += info["cuda"]["files"]
    else:
        ex.export_library(str(out / LIB))
    tvm.runtime.save_param_dict_to_file({n: tvm.runtime.tensor(a) for n, a in zip(names, arrays)}, str(out / PARAMS))
    info["params"] = names
    info["inputs"] = [v.name for v in model.graph.inputs]
    info["outputs"] = [v.name for v in model.graph.outputs]
    return BuildResult(files=files, info=info, executable=ex, params=arrays)


def _device_context(target: tvm.target.Target):
    """CUDA: :func:`cuda.device_compile` plus the pass configuration the tensor-core kernels
    need (``tirx.use_async_copy``: their pipelined global -> shared copies become ``cp.async``)."""
    if target.kind.name != "cuda":
        return contextlib.nullcontext()
    from lowbit.backends.tvm import cuda

    stack = contextlib.ExitStack()
    stack.enter_context(cuda.device_compile(target))
    cur = tvm.transform.PassContext.current()
    stack.enter_context(tvm.transform.PassContext(
        opt_level=cur.opt_level, required_pass=list(cur.required_pass), disabled_pass=list(cur.disabled_pass),
        instruments=list(cur.instruments), config={**dict(cur.config), **mma.PASS_CONFIG}))
    return stack


class warnings_quiet:
    """TVM prints Python warnings from its importer and pattern matcher; keep the CLI readable."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
