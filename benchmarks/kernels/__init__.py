"""Kernel micro-benchmarks: one operator pattern or kernel at a time, apart from whole models.

``python -m benchmarks.kernels.ort_linear_kernels`` (W8A8 linear patterns on ONNX Runtime),
``python -m benchmarks.kernels.ort_nbits_kernels`` (4-bit and group-wise 8-bit linears),
``python -m benchmarks.kernels.tvm_tune_matmul`` (one fused W8A8 kernel on TVM, tuned vs default).
"""
