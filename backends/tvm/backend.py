"""The TVM backend object: ``lower-tvm``, ``lib.so`` + ``params.bin``, and the TVM runtime.

A recipe ends with ``lower-ort`` (ONNX Runtime's kernels). With ``--backend tvm`` the
compile calls :meth:`TVMBackend.prepare_recipe`, which replaces that pass with
``lower-tvm`` (keeping the one option both share, ``token_zero_point``), so one recipe
serves both backends and the plan is the same. :meth:`TVMBackend.check` fails early
when TVM, the target or nvcc is missing, or a tuning flag cannot apply
(:func:`check_tuning`). After the passes, :meth:`TVMBackend.build` compiles the lowered
IR into the artifact folder and returns a session for the compile's verification
against fp32 (None when the target cannot run here: CUDA without a GPU). ``--tune N`` /
``--tune-seq-len`` / ``--tuning-db`` are carried out by the build
(:mod:`lowbit.backends.tvm.tune`).

:meth:`TVMBackend.supports` says which layer plans the ``lowbit.tvm`` kernels run
(:mod:`lowbit.backends.tvm.lower`): int8 activations only with symmetric per-channel
int8 weights (``Int8Linear``); weight-only layers of any granularity and symmetry
(``PackedLinear``). The mixed planner offers only those. Its candidates' bytes are
those of ``lower-tvm``'s layouts; their latencies are not measured (the lowered graph
does not run in ONNX Runtime), so a latency budget is refused for this backend.

This module imports TVM only inside its methods: the registry loads it without TVM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from lowbit.compiler.core.backend import Backend, BackendOptions, Built
from lowbit.compiler.core.errors import InputError

logger = logging.getLogger("lowbit")


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


class TVMBackend(Backend):
    """Apache TVM (LLVM CPU or CUDA): the lowered graph compiled into ``lib.so`` + ``params.bin``."""

    name = "tvm"
    lowering = "lower-tvm"
    options = ("target", "arch", "tune", "tune_seq_lens", "tuning_db")
    measures_latency = False
    needs_lowering = True
    description = "Apache TVM (lib.so + params.bin, run with the TVM runtime; LLVM or CUDA)"

    def check(self, options: BackendOptions) -> None:
        super().check(options)
        check_available(options.target, options.arch)
        check_tuning(options.target, options.tune, options.tune_seq_lens, options.tuning_db)

    def supports(self, layer_plan) -> str | None:
        if layer_plan.weight_bits is None or layer_plan.activation_bits is None:
            return None  # float, or weight-only: PackedLinear takes any granularity and symmetry
        if layer_plan.weight_bits == 8 and layer_plan.group_size is None and layer_plan.symmetric:
            return None  # Int8Linear
        what = (f"{layer_plan.weight_bits}-bit {'per-group' if layer_plan.group_size else 'per-channel'} "
                f"{'symmetric' if layer_plan.symmetric else 'asymmetric'} weights")
        return f"the TVM kernels run int8 activations only with symmetric per-channel int8 weights (not {what})"

    def cost_key(self) -> str:
        # bytes only (no latency), and they depend on lower-tvm's layouts alone: no TVM version needed
        return f"{self.name}-layouts"

    def build(self, model: ir.Model, folder: Path, options: BackendOptions, *, threads: int | None = None) -> Built:
        """Compile ``model`` (after ``lower-tvm``) into ``folder``; a session to verify it with, if it can run here."""
        from lowbit.backends.tvm import build, runtime
        from lowbit.backends.tvm.lower import is_lowered

        if not is_lowered(model):
            logger.info("no lowbit.tvm operator in the graph: nothing was quantized for TVM (float model)")
        result = build.build(model, folder, target=options.target, arch=options.arch, tune_trials=options.tune,
                             tune_seq_lens=options.tune_seq_lens, tuning_db=options.tuning_db)
        info = result.info
        if info["target_kind"] == "cuda":
            import tvm

            if not tvm.cuda(0).exist:
                return Built(info, None, "not measured: the artifact targets CUDA and this machine has no GPU")
        return Built(info, runtime.Session(runtime.TVMModel(folder, meta=info, threads=threads)))

    def load(self, folder: str | Path, *, threads: int | None = None, verify: bool = True):
        from lowbit.backends.tvm.runtime import Artifact

        return Artifact(folder, threads=threads, verify=verify)
