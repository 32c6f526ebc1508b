"""TE definitions of lowbit's quantized-linear building blocks (compiled by TVM).

* :func:`decode_packed`: packed ``uint32`` codes + group scales (+ zero points) ->
  float weight ``W[N, K]``. Emitted as its own PrimFunc (``lowbit_decode_*``) that feeds
  ``R.matmul``; the build pipeline (``lowbit.backends.tvm.build``) fuses it *into* the
  matmul, so the kernel reads the packed words and never writes the float weight.
* :func:`quantize_rows`: ``u = clip(rint(x / s) + z, 0, 255) - 128`` as int8, rounding half
  to even (``nearbyint``) as ONNX ``QuantizeLinear`` does.

:func:`is_int8_gemm_block` recognises the int8 x int8 -> int32 GEMM block that ``Int8Linear``
legalizes to, for the schedules that take it (``cpu``, ``mma``).

Names of the PrimFuncs matter: the decode-matmul fusion pattern recognises the decode
by its name prefix (:data:`DECODE_PREFIX`).
"""

from __future__ import annotations

from tvm import te, tirx

DECODE_PREFIX = "lowbit_decode"


def decode_packed(packed: te.Tensor, scale: te.Tensor, zero: te.Tensor | None, *, bits: int, k: int, group: int) -> te.Tensor:
    """``W[n, k] = (code(n, k) - z(n, k // group)) * scale[n, k // group]`` (float32 ``[N, K]``)."""
    per = 32 // bits
    mask = tirx.const((1 << bits) - 1, "uint32")
    offset = tirx.const(float(1 << (bits - 1)), "float32")
    n = packed.shape[0]

    def f(i, j):
        word = packed[i, j // per]
        code = (word >> (tirx.Cast("uint32", j % per) * tirx.const(bits, "uint32"))) & mask
        z = zero[i, j // group].astype("float32") if zero is not None else offset
        return (code.astype("float32") - z) * scale[i, j // group]

    return te.compute((n, k), f, name="decode")


def quantize_rows(x: te.Tensor, scale: te.Tensor, zero: te.Tensor) -> te.Tensor:
    """int8 ``clip(rint(x / s) + z, 0, 255) - 128``; ``scale`` and ``zero`` (float32) broadcast like ``x[..., :1]``."""
    nd = len(x.shape)

    def at(t: te.Tensor, row: tuple):
        return t[tuple(0 if _is_one(t.shape[i]) else row[i] for i in range(nd))]

    def f(*idx):
        row = idx[:-1] + (0,)
        s, z = at(scale, row), at(zero, row)
        u = tirx.nearbyint(x[idx] / s) + z
        u = tirx.max(tirx.min(u, tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))
        return (u - tirx.const(128.0, "float32")).astype("int8")

    return te.compute(x.shape, f, name="quantize_rows")


def _is_one(dim) -> bool:
    return isinstance(dim, tirx.IntImm) and dim.value == 1


def is_int8_gemm_block(block) -> bool:
    """Whether a TIR block reduces two int8 buffers into one int32 buffer (an int8 GEMM)."""
    reads = [r.source.dtype for r in block.reads]
    return (any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars) and len(block.writes) == 1
            and block.writes[0].source.dtype == "int32" and reads.count("int8") == 2)
