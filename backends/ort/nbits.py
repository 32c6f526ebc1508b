"""Block-quantized weight linears for ONNX Runtime: ``com.microsoft.MatMulNBits``.

``MatMulNBits(A, B, scales[, zero_points])`` computes ``Y = A @ dequant(B)`` with a weight
quantized in blocks of ``block_size`` consecutive input features (along K), one scale and
optional zero point per (output column, block). The layout, read from ORT's contrib-op spec
and ``onnxruntime/quantization/matmul_nbits_quantizer.py``, and checked here to float
rounding against a NumPy reference (``tests/backends/test_ort_lower.py``):

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``, ``k_blocks = ceil(K / block_size)``:
  the weight *transposed* (one row per output column), K padded to ``k_blocks * block_size``;
  codes are unsigned and packed low bits first (4-bit: element ``2j`` in the low nibble of
  byte ``j``, ``2j + 1`` in the high nibble; 8-bit: one byte each).
* ``scales``: float ``[N, k_blocks]`` (``[N * k_blocks]`` is accepted too).
* ``zero_points``: uint8, per column ``ceil(k_blocks * bits / 8)`` bytes packed the same way
  (a column's zero points start on a byte boundary), flattened to ``[N * that]``. Absent, the
  zero point is ``2**(bits-1)`` (8 for 4-bit): symmetric signed codes ``q`` are stored as
  ``q + 2**(bits-1)`` and need no zero-point input.
* ``W[k, n] = (code - zero_point) * scale`` for the block holding ``k``.
* Attributes ``K``, ``N``, ``bits`` (2, 4, 8), ``block_size`` (a power of two >= 16; ORT
  1.32's CPU kernel ran every one from 16 to 1024, and ``K`` need not be a multiple),
  ``accuracy_level``: the compute type on CPU, 0 (unset) and 1 = fp32, 4 = int8. At level 4
  MLAS quantizes ``A`` at run time to int8, symmetric, one scale per row per K-block, and runs
  an int8 dot-product kernel (VNNI where present): that is W4A8 with activations quantized more
  finely than per token.

A per-channel weight (one scale per output column) is a block weight whose scales repeat
along K: :func:`per_channel_block_size` picks the block, exactly.

Beware (ORT 1.32): ORT's graph optimizer itself rewrites ``DequantizeLinear(int4/uint4/int8/
uint8 constant, axis 0 blocked or axis 1 per channel) -> MatMul`` into ``MatMulNBits`` with
``accuracy_level`` taken from the session option ``session.qdq_matmulnbits_accuracy_level``,
default **4**: a QDQ weight-only graph runs with int8 activations unless the session says
otherwise. The lowering therefore writes ``MatMulNBits`` explicitly, with the accuracy level
the plan implies.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.backends.ort.qlinear import DEFAULT_PASS_NAME, MS_DOMAIN, NodeBuilder, Target

__all__ = [
    "ACCURACY_FP32",
    "ACCURACY_INT8",
    "emit_matmul_nbits",
    "pack_codes",
    "pack_zero_points",
    "per_channel_block_size",
    "unpack_codes",
]

ACCURACY_FP32 = 0  # "unset": fp32 compute on CPU (the same kernels as level 1)
ACCURACY_INT8 = 4  # activations quantized to int8 per row and block, int8 compute
SUPPORTED_BITS = (2, 4, 8)


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")


def per_channel_block_size(k: int, largest: int = 128) -> int:
    """The block size for a per-channel weight with ``k`` input features.

    The largest power of two in [16, ``largest``] dividing ``k`` (its scales repeat in every
    block, so the weight is represented exactly); ``largest`` when none divides (the last
    block is padded, which is also exact). Blocks are capped because at accuracy level 4 the
    activations are quantized per block: smaller blocks, finer activation scales.
    """
    _check_block(largest)
    bs = largest
    while bs >= 16:
        if k % bs == 0:
            return bs
        bs //= 2
    return largest


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes ``[K, N]`` (values in [0, 2**bits)) -> MatMulNBits ``B`` uint8 ``[N, k_blocks, blob]``.

    Padding rows (K up to a whole number of blocks) get code 0; the kernel never multiplies
    them with anything (A has K columns).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    _check_block(block_size)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    k, n = codes.shape
    kb = -(-k // block_size)
    padded = np.zeros((kb * block_size, n), np.uint8)
    padded[:k] = codes
    per = 8 // bits  # codes per byte
    c = padded.T.reshape(n, kb, block_size // per, per)
    packed = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):  # low bits first
        packed |= (c[..., j] << (bits * j)).astype(np.uint8)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[N, k_blocks, blob]`` -> codes ``[K, N]``."""
    n = packed.shape[0]
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    c = np.stack(parts, axis=-1).reshape(n, -1)
    return np.ascontiguousarray(c[:, :k].T.astype(np.uint8))


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned zero points ``[k_blocks, N]`` -> MatMulNBits uint8 ``[N * ceil(k_blocks * bits / 8)]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    z = np.asarray(zero_points)
    kb, n = z.shape
    per = 8 // bits
    padded = np.zeros((n, -(-kb // per) * per), np.uint8)
    padded[:, :kb] = z.T
    c = padded.reshape(n, -1, per)
    packed = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        packed |= (c[..., j] << (bits * j)).astype(np.uint8)
    return packed.reshape(-1)


def emit_matmul_nbits(
    target: Target,
    x: ir.Value,
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    *,
    bits: int,
    block_size: int,
    accuracy_level: int = ACCURACY_FP32,
    name: str,
    pass_name: str = DEFAULT_PASS_NAME,
    insert_before: ir.Node | None = None,
) -> ir.Value:
    """``y = x @ W`` with ``W[k, n] = (codes[k, n] - zero_point[b, n]) * scale[b, n]``, ``b = k // block_size``.

    ``codes``: ``[K, N]`` signed (int8 values in [-2**(bits-1), 2**(bits-1)), symmetric,
    ``zero_point`` None) or unsigned (uint8 values in [0, 2**bits), with ``zero_point`` uint8
    ``[k_blocks, N]``). ``scale``: float ``[k_blocks, N]``. Signed codes are shifted by
    ``2**(bits-1)`` into the kernel's unsigned codes and the zero-point input is left out
    (its default is that shift). Constants: ``{name}.B``, ``{name}.scales``,
    ``{name}.zero_points``. Adds the ``com.microsoft`` opset import.
    """
    codes = np.asarray(codes)
    k, n = codes.shape
    kb = -(-k // block_size)
    scale = np.asarray(scale, np.float32)
    if scale.shape != (kb, n):
        raise ValueError(f"scale must be [{kb}, {n}] for K={k}, block {block_size}; got {scale.shape}")
    if zero_point is None:
        if codes.dtype.kind != "i":
            raise ValueError("symmetric MatMulNBits weights need signed codes (no zero point given)")
        unsigned = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    else:
        unsigned = codes
        if np.asarray(zero_point).shape != (kb, n):
            raise ValueError(f"zero_point must be [{kb}, {n}], got {np.asarray(zero_point).shape}")
    b = NodeBuilder(target, name, pass_name, anchor_value=x, insert_before=insert_before)
    inputs: list[ir.Value | None] = [
        x,
        b.const("B", pack_codes(unsigned, bits, block_size)),
        b.const("scales", np.ascontiguousarray(scale.T)),
    ]
    if zero_point is not None:
        inputs.append(b.const("zero_points", pack_zero_points(zero_point, bits)))
    y = b.op(
        "MatMulNBits",
        inputs,
        {"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level},
        domain=MS_DOMAIN,
        out="y",
    )
    y.type = ir.TensorType(ir.DataType.FLOAT)
    if x.shape is not None:
        y.shape = ir.Shape([*x.shape[:-1], n])
    b.commit()
    return y
