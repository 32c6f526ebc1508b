"""``lowbit.compile``: source in, verified artifact out.

    source ─► frontend ─► IR ─► recipe's passes (instrumented) ─► backend build ─► artifact/
                                                                                   model files
                                 fp32 reference ─► evaluation ─────────────────► manifest.json

The keywords are gathered into a ``CompileOptions`` and the steps run by a
``Compilation`` (``lowbit.compiler.compilation``), which a tool can also drive step
by step. The fp32 model is kept (as a temporary file) so the artifact can be
measured against it on held-out inputs that calibration never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.compiler.compilation import (  # noqa: F401 - re-exported: what users imported from here
    Compilation,
    CompileData,
    CompileOptions,
    CompileResult,
    load_npz_samples,
)
from lowbit.compiler.core.backend import BackendOptions
from lowbit.compiler.verification import GENERATE_TOKENS, summary_text  # noqa: F401 - re-exported


def compile(  # noqa: A001 - the verb users expect
    source: Any,
    output: str | Path,
    *,
    recipe: str | Path = "w8a8",
    calib_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    dump_ir: str | Path | None = None,
    overrides: Sequence[str] = (),
    settings: dict[str, Any] | None = None,
    max_drop: float | None = None,
    tokenizer: str | Path | None = None,
    example_inputs: dict[str, np.ndarray] | None = None,
    threads: int = 2,
    measure_latency: bool = True,
    progress: bool = True,
    keep_reference: bool = False,
    backend: str = "onnxruntime",
    target: str = "llvm",
    arch: str | None = None,
    tune: int = 0,
    tune_seq_lens: Sequence[int] | None = None,
    tuning_db: str | Path | None = None,
    overwrite: bool = False,
) -> CompileResult:
    """Compile ``source`` (path to .onnx / HF folder / llama2.c .bin, or an nn.Module) into ``output``.

    Args:
        recipe: built-in recipe name or path to a recipe TOML file.
        calib_data / eval_data: text files; by default one built-in text split 80/20.
        dump_ir: folder receiving ``NNN_<Pass>.onnx`` and ``.txt`` after every pass.
        overrides: ``"LAYER_GLOB=PRECISION"`` items for the plan.
        settings: ``{"PASS.OPTION": value}`` changes to the recipe.
        max_drop: fail (no artifact) when the perplexity increase (language models) or
            1 - cosine (other models) exceeds this fraction.
        example_inputs: inputs for an nn.Module source (also used as calibration data
            for models without a tokenizer).
        keep_reference: also write the imported fp32 graph (with its debug ids) as
            ``reference.onnx``, so ``lowbit explain`` need not export the source again.
        backend: a backend name or alias (``lowbit.compiler.core.backend``): "onnxruntime" / "ort"
            (``model.onnx``) or "tvm" (``lib.so`` + ``params.bin``; the recipe's ``lower-ort``
            becomes ``lower-tvm``, see ``lowbit.backends.tvm.backend``).
        target / arch: TVM only: "llvm" or "cuda", and the CUDA architecture (``sm_80``, ``sm_90``...).
        tune / tune_seq_lens / tuning_db: TVM on LLVM only: MetaSchedule trials per quantized
            matmul, the sequence lengths to tune at (default 1 and 128), and a tuning database
            folder to reuse and extend (see ``lowbit.backends.tvm.tune``).
        overwrite: replace an artifact already at ``output``; without it the compile fails, before any
            work, when ``output`` holds one. A second compile into an ``output`` another one is writing
            fails at once (a lock file ``.NAME.lock`` beside it).
    """
    options = CompileOptions(
        recipe=recipe, calib_data=calib_data, eval_data=eval_data, tokenizer=tokenizer, example_inputs=example_inputs,
        dump_ir=dump_ir, overrides=tuple(overrides), settings=settings, max_drop=max_drop, threads=threads,
        measure_latency=measure_latency, progress=progress, keep_reference=keep_reference, backend=backend,
        backend_options=BackendOptions(target=target, arch=arch, tune=tune, tune_seq_lens=tune_seq_lens,
                                       tuning_db=tuning_db),
        overwrite=overwrite,
    )
    return Compilation(source, options).run(output)
