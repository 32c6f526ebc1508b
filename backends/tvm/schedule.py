"""The schedule a kernel gets without a tuning record: on LLVM an int8 GEMM gets
:func:`lowbit.backends.tvm.cpu.schedule_int8_gemm`, everything else dlight's rules.
Shared by the build and by tuning (which times tuned kernels against these)."""

from __future__ import annotations

import tvm
from tvm import tirx

from lowbit.backends.tvm import cpu


def dlight_rules(target: tvm.target.Target) -> list:
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        return [dl.gpu.LowBatchGEMV(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    return [dl.cpu.GEMV(), dl.cpu.Reduction()]


def default_schedule(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """One PrimFunc as the build schedules it without a tuning record: on LLVM an int8 GEMM
    gets :func:`lowbit.backends.tvm.cpu.schedule_int8_gemm`, everything else dlight's rules
    (call under ``with target``)."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "llvm":
        scheduled = cpu.schedule_int8_gemm(func)
        if scheduled is not None:
            return scheduled
    gv = tvm.ir.GlobalVar("main")
    return dl.ApplyDefaultSchedule(*dlight_rules(target))(tvm.IRModule({gv: func}))[gv]
