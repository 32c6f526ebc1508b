"""Targets the TVM backend compiles for, from the command line's ``--target`` and ``--arch``."""

from __future__ import annotations

import tvm

from lowbit.compiler.core.errors import InputError

TARGETS = ("llvm", "cuda")
CUDA_ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")


def make_target(kind: str, arch: str | None = None) -> tvm.target.Target:
    """``llvm`` (the host CPU) or ``cuda`` with an ``sm_XX`` architecture (default sm_80)."""
    if kind not in TARGETS:
        raise InputError(f"unknown TVM target {kind!r} (known: {', '.join(TARGETS)})")
    if kind == "llvm":
        if arch is not None:
            raise InputError("--arch applies to --target cuda only")
        return tvm.target.Target({"kind": "llvm"})
    arch = arch or "sm_80"
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise InputError(f"--arch {arch!r}: expected sm_XX, e.g. {', '.join(CUDA_ARCHES)}")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def describe(target: tvm.target.Target) -> str:
    """``llvm`` or ``cuda -arch=sm_90`` (for the manifest)."""
    if target.kind.name == "cuda":
        return f"cuda -arch={target.attrs['arch']}"
    return target.kind.name
