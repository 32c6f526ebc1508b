"""The TVM side of ``lowbit.compile``: recipe lowering swap, build into the artifact, evaluation session.

A recipe ends with ``lower-ort`` (ONNX Runtime's kernels). With ``--backend tvm`` the
driver calls :func:`prepare_recipe`, which replaces that pass with ``lower-tvm``
(keeping the one option both share, ``token_zero_point``), so one recipe serves both
backends and the plan is the same. After the passes, :func:`build_artifact` compiles
the lowered IR into the artifact folder and returns a session for the driver's
verification against fp32 (None when the target cannot run here: CUDA without a GPU).
``--tune N`` / ``--tune-seq-len`` / ``--tuning-db`` are checked here (:func:`check_tuning`)
and carried out by the build (:mod:`lowbit.backends.tvm.tune`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import onnx_ir as ir
from lowbit.compiler.core.errors import InputError

logger = logging.getLogger("lowbit")
#: lower-ort options that lower-tvm also has (same meaning)
_SHARED_OPTIONS = ("token_zero_point",)


def prepare_recipe(recipe) -> None:
    """Replace the recipe's ``lower-ort`` pass by ``lower-tvm`` (in place); error if it lowers nothing."""
    from lowbit.compiler.core.recipe import PassSpec

    names = [p.name for p in recipe.passes]
    if "lower-tvm" in names:
        return
    if "lower-ort" not in names:
        raise InputError(f"recipe {recipe.name!r} has no lowering pass (lower-ort or lower-tvm) for --backend tvm to replace")
    for i, spec in enumerate(recipe.passes):
        if spec.name == "lower-ort":
            dropped = sorted(set(spec.options) - set(_SHARED_OPTIONS))
            if dropped:
                logger.info("--backend tvm: lower-ort options %s have no TVM counterpart and are ignored", dropped)
            recipe.passes[i] = PassSpec("lower-tvm", {k: v for k, v in spec.options.items() if k in _SHARED_OPTIONS})


@dataclasses.dataclass
class Built:
    info: dict[str, Any]
    session: Any  # a runtime.Session, or None when the target cannot run on this machine
    note: str | None = None


def check_available(target: str, arch: str | None) -> None:
    """Fail early (before the passes run) when TVM, the target, or nvcc is missing."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise InputError("--backend tvm needs TVM: pip install 'lowbit[tvm]'") from None
    from lowbit.backends.tvm import targets

    targets.make_target(target, arch)
    if target == "cuda":
        from lowbit.backends.tvm import cuda

        cuda.find_nvcc()


def check_tuning(target: str, tune: int, seq_lens, tuning_db) -> None:
    """Fail early on tuning flags that cannot apply: ``--tune`` on CUDA, negative trials or lengths."""
    if not (tune or seq_lens or tuning_db is not None):
        return
    if target != "llvm":
        raise InputError("--tune, --tune-seq-len and --tuning-db apply to --target llvm only "
                         "(CUDA kernels use dlight's GPU rules)")
    if tune < 0:
        raise InputError(f"--tune {tune}: expected a number of trials per kernel (0: apply --tuning-db only)")
    if seq_lens and not tune and tuning_db is None:
        raise InputError("--tune-seq-len needs --tune N (or --tuning-db DIR)")
    if seq_lens and any(int(n) < 1 for n in seq_lens):
        raise InputError(f"--tune-seq-len {list(seq_lens)}: lengths must be positive")
    if tuning_db is not None and Path(tuning_db).exists() and not Path(tuning_db).is_dir():
        raise InputError(f"--tuning-db {tuning_db}: not a folder")


def build_artifact(
    model: ir.Model,
    folder: Path,
    *,
    target: str = "llvm",
    arch: str | None = None,
    threads: int | None = None,
    tune: int = 0,
    tune_seq_lens=None,
    tuning_db=None,
) -> Built:
    """Compile ``model`` (after ``lower-tvm``) into ``folder``; a session to verify it with, if it can run here.

    ``tune`` / ``tune_seq_lens`` / ``tuning_db``: MetaSchedule tuning (:mod:`lowbit.backends.tvm.tune`)."""
    from lowbit.backends.tvm import build, runtime
    from lowbit.backends.tvm.lower import is_lowered

    if not is_lowered(model):
        logger.info("no lowbit.tvm operator in the graph: nothing was quantized for TVM (float model)")
    result = build.build(model, folder, target=target, arch=arch, tune_trials=tune, tune_seq_lens=tune_seq_lens,
                         tuning_db=tuning_db)
    info = result.info
    if info["target_kind"] == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            return Built(info, None, "not measured: the artifact targets CUDA and this machine has no GPU")
    return Built(info, runtime.Session(runtime.TVMModel(folder, meta=info, threads=threads)))
