"""The ``lowbit.tvm`` operators: quantized linears in the layouts TVM's kernels read.

``lower-tvm`` rewrites each planned ``MatMul(x, DequantizeLinear(codes, scale[, zero]))``
into one of two nodes of the ``lowbit.tvm`` domain; ``lowbit.backends.tvm.relax_import``
turns each into Relax (lowbit's own kernels, never TVM's ONNX importer). Their meaning:

``Int8Linear(x[..., K], w_q[N, K]:int8, w_scale[N], colsum[N]:int32)`` (W8A8)
    activations quantized per row at run time (or per tensor, static) to uint8 codes
    ``u = clip(rint(x / s) + z, 0, 255)``, held as int8 ``a = u - 128``; one int8 x int8 ->
    int32 GEMM; the zero point leaves the exact rank-1 correction
    ``acc - (z - 128) * colsum(w_q)``; ``y = float(acc') * w_scale * s``. Attribute
    ``mode`` picks ``(s, z)`` exactly as ONNX Runtime's lowering does (so both backends
    compute the same numbers):

    * ``shared``: one calibrated zero point ``z`` for every row, ``s = max(hi / (255 - z),
      -lo / z, eps)`` with ``lo = min(min_k x, 0)``, ``hi = max(max_k x, 0)``;
    * ``per-token``: ``s = max((hi - lo) / 255, eps)``, ``z = rint(-lo / s)`` per row;
    * ``symmetric``: ``s = max(max_k |x| / 127, eps)``, ``z = 128``;
    * ``tensor``: one range for the whole tensor at run time (ONNX ``DynamicQuantizeLinear``):
      ``s = max((hi - lo) / 255, eps)``, ``z = rint(-lo / s)`` over all elements (plan
      activations ``dynamic-tensor``);
    * ``static``: calibrated per-tensor ``s`` (attribute ``scale``) and ``z``.

``PackedLinear(x[..., K], packed[N, ceil(K / E)]:uint32, scale[N, G][, zero[N, G]:uint8])``
    (W4A16, W8A16): ``E = 32 / bits`` codes per word, code ``k`` of row ``n`` in bits
    ``bits * (k % E)`` of word ``k // E``; ``W[n, k] = (code - z) * scale[n, k // g]`` with
    ``z = zero[n, k // g]``, or ``2^(bits-1)`` for symmetric codes (stored offset by it);
    ``y = x @ W^T``. Attributes ``bits``, ``group_size`` (``g``; K per channel),
    ``in_features`` (K).

Weights are stored ``[N, K]`` (an output channel's input features contiguous): a GEMV
then streams each row once, and the int8 dot product runs along contiguous bytes.
This module is numpy only: the pass that uses it runs without TVM installed.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "lowbit.tvm"
INT8_LINEAR = "Int8Linear"
PACKED_LINEAR = "PackedLinear"
#: smallest activation scale; keeps an all-zero row from producing 0/0 (as ONNX Runtime's lowering)
SCALE_EPS = 1e-30
TOKEN_MODES = ("shared", "per-token", "symmetric", "tensor", "static")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``[N, K]`` (values < 2^bits) -> ``uint32 [N, ceil(K / E)]``, ``E = 32 // bits``.

    Padding codes are 0; the kernels never read them (they stop at ``K``).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    per = 32 // bits
    n, k = codes.shape
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= (1 << bits):
        raise ValueError(f"codes must be unsigned {bits}-bit values")
    words = -(-k // per)
    padded = np.zeros((n, words * per), np.uint32)
    padded[:, :k] = codes
    lanes = padded.reshape(n, words, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    return np.bitwise_or.reduce(lanes << shifts, axis=2).astype(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``uint32 [N, W]`` -> ``uint8 [N, k]``."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    lanes = (packed[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return lanes.reshape(packed.shape[0], -1)[:, :k].astype(np.uint8)
