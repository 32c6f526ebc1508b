"""lowbit's benchmarks: side-by-side measurements against fp32 and peers (see README.md).

Run from the repository root as modules, e.g. ``python -m benchmarks.compare_int8 --quick``:

* end to end, here: ``compare_int8``, ``compare_4bit``, ``mixed_smollm2``, ``heldout_eval``,
  ``explain_smollm2``, ``tvm_backend``;
* kernel micro-benchmarks, in :mod:`benchmarks.kernels`: ``ort_linear_kernels``,
  ``ort_nbits_kernels``, ``tvm_tune_matmul``;
* what they share (method registry, interleaved timing, tables, provenance, output, the
  RESULTS.md section writer, the reuse rule): :mod:`benchmarks.harness`.
"""

#: the end-to-end comparisons (``benchmarks.<name>``)
E2E = ("compare_int8", "compare_4bit", "mixed_smollm2", "heldout_eval", "explain_smollm2", "tvm_backend")
#: the kernel micro-benchmarks (``benchmarks.kernels.<name>``)
KERNELS = ("ort_linear_kernels", "ort_nbits_kernels", "tvm_tune_matmul")
