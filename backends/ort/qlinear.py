"""W8A8 linear-layer emitters for the ONNX Runtime CPU backend.

Each ``emit_*`` function builds, with onnx_ir, the operator pattern that ORT's CPU execution
provider runs fastest for ``y = x @ W`` with an int8 weight (symmetric, per output channel),
and returns the float output value. The caller then replaces every use of the original MatMul
output with the returned value and removes the MatMul.

The patterns were chosen by measurement (``benchmarks/kernels/ort_linear_kernels.py``; ORT 1.32,
x86-64 with AVX512-VNNI, 2 threads, SmolLM2-135M shapes). What the measurements say:

* Activations must be **uint8**. MLAS on x86 has U8S8 int8 GEMM kernels; int8 activations
  (S8S8) fall back to a slow path (MatMulIntegerToFloat with an int8 A ran ~30x slower than
  fp32 at T=1). QDQ graphs with int8 activations only run fast because ORT's
  ``QDQS8ToU8Transformer`` rewrites an int8 Q/DQ pair to uint8, and it does so only when the
  QuantizeLinear has exactly one consumer; when one quantized activation feeds several
  linears (Q/K/V, gate/up, as ``quantize_static`` writes them) the rewrite is skipped, the
  MatMul QDQ selector refuses int8 activations on x86 (``QDQIsInt8Allowed()`` is false off
  ARM), and the graph runs DequantizeLinear on the full int8 weight on every run plus an fp32
  MatMul: slower than fp32 by one to two orders of magnitude.
* Dynamic per-token: ``QuantizeLinear`` with a runtime per-row scale in *blocked* form (opset
  21, ``axis=-1``, ``block_size=K``, scale shape ``[..., 1]``) quantizes in one pass and needs
  no reshape (elementwise Div/Round/Add/Cast was slower at T=128). The GEMM is
  ``com.microsoft.MatMulIntegerToFloat(q, w_q, s_row[..., 1], w_scale[, zp=128])``: its
  kernel applies ``w_scale`` in the GEMM output stage and the per-row scale in a broadcast
  pass. ORT would produce the same node from standard ``MatMulInteger -> Cast ->
  Mul(Mul(s_row, w_scale))`` (same speed), but that fusion also swallows a following
  ``Add(bias)`` and the kernel then returns ``s_row * (acc * w_scale + bias)``: wrong. So
  the fused node is written directly and a bias stays a separate ``Add``. ORT refuses a
  per-row ``a_zero_point`` in both ``MatMulInteger`` and ``MatMulIntegerToFloat`` ("must be
  a scalar or 1D tensor of size 1"), so the asymmetric variant runs the GEMM without zero
  point and subtracts the exact rank-1 correction ``s_row * zp_row * (w_scale *
  colsum(W_q))`` in float (an int32 correction before the Cast was slower: ORT's int32
  elementwise ops are slow and the fusion is lost).
* Static per-tensor: ``QuantizeLinear(x, s, zp:uint8) -> com.microsoft.MatMulIntegerToFloat``.
  That is the graph ORT itself produces from a uint8 QDQ pattern, emitted directly so that it
  cannot silently fall back to the per-run weight dequantization described above. The
  standard ``MatMulInteger -> Cast -> Mul(constant)`` form is *not* fused (the fusion wants
  the scale to come from a ``Mul`` node, and constant folding removes that node first).

Opsets: blocked ``QuantizeLinear`` needs default-domain opset >= 21. On opset 18-20 graphs the
per-token emitter falls back to a ``[M, K]`` reshape with per-axis ``QuantizeLinear``
(opset >= 13; three extra Reshape nodes, a little slower at T=1). ``com.microsoft`` ops need
``opset_imports["com.microsoft"] = 1`` (see :func:`ensure_opset`); the emitters add it to
the target graph (or the tape's graph) when they use such an op; with a bare tape the caller
adds it. The per-tensor emitter is standard ONNX (opset >= 11).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.tape

__all__ = [
    "DEFAULT_PASS_NAME",
    "MS_DOMAIN",
    "PASS_KEY",
    "NodeBuilder",
    "emit_dynamic_per_tensor_linear",
    "emit_dynamic_per_token_linear",
    "emit_static_linear",
    "ensure_opset",
    "quantize_weight_per_channel",
]

PASS_KEY = "lowbit.pass"
MS_DOMAIN = "com.microsoft"
DEFAULT_PASS_NAME = "lower_ort_w8a8"
#: smallest activation scale; keeps an all-zero row from producing 0/0
SCALE_EPS = np.float32(1e-30)
#: default-domain opset needed for blocked QuantizeLinear
BLOCKED_QUANTIZE_OPSET = 21

Target = ir.Graph | onnx_ir.tape.Tape


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def quantize_weight_per_channel(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of a ``[K, N]`` weight.

    ``scale[n] = max_k |w[k, n]| / (2**(bits-1) - 1)``; ``w_q = clip(rint(w / scale))`` in
    ``[-qmax, qmax]`` (the value -2**(bits-1) is never used). A column that is all zero gets
    scale 1.0 (not an epsilon), so ``w_q`` is exactly 0 and nothing downstream divides by a
    tiny number. Returns ``(w_q int8 [K, N], scale float32 [N])``; 4-bit codes are also
    returned as int8 values in ``[-7, 7]``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or inf")
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    w_q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return w_q, scale


def ensure_opset(target: ir.Model | ir.Graph | onnx_ir.tape.Tape, domain: str = MS_DOMAIN,
                 version: int = 1) -> None:
    """Make sure ``target`` imports ``domain`` (default ``com.microsoft``) at ``version``.

    Adds the import when missing; raises if the domain is imported at a lower version (for
    the default domain that would change the meaning of existing nodes, so it is not bumped
    silently).
    """
    if isinstance(target, onnx_ir.tape.Tape):
        if target.graph_like is None:
            return
        target = target.graph_like  # type: ignore[assignment]
    imports = target.opset_imports
    have = imports.get(domain)
    if have is None:
        imports[domain] = version
    elif have < version:
        raise ValueError(f"graph imports {domain or 'ai.onnx'} opset {have}, need >= {version}")


def _default_opset(target: Target) -> int | None:
    graph = target.graph_like if isinstance(target, onnx_ir.tape.Tape) else target
    if graph is None:
        return None
    return graph.opset_imports.get("")


class NodeBuilder:
    """Creates the nodes and initializers of one emitted pattern.

    ``target`` is an ``ir.Graph`` or an ``onnx_ir.tape.Tape``.

    * Graph: initializers are registered in ``graph.initializers`` at once; nodes are
      collected and inserted by :meth:`commit`, before ``insert_before`` when given,
      otherwise right after the producer of ``anchor_value`` (or at the start of the graph
      when it is a graph input). Both places are topologically valid because the pattern
      depends only on ``anchor_value`` and constants.
    * Tape: nodes and initializers are recorded on the tape (which appends them to its
      ``graph_like`` when it has one); placing them is the tape owner's job.

    Every node gets ``metadata_props[PASS_KEY] = pass_name``; names are ``{name}/{Op}_{i}``
    for nodes, ``{name}.{tag}`` for values and initializers.
    """

    def __init__(
        self,
        target: Target,
        name: str,
        pass_name: str = DEFAULT_PASS_NAME,
        *,
        anchor_value: ir.Value | None = None,
        insert_before: ir.Node | None = None,
    ) -> None:
        if not name:
            raise ValueError("name must be a non-empty string")
        self.target = target
        self.name = name
        self.pass_name = pass_name
        self.anchor_value = anchor_value
        self.insert_before = insert_before
        self.nodes: list[ir.Node] = []
        self._counter = 0
        self._tape = target if isinstance(target, onnx_ir.tape.Tape) else onnx_ir.tape.Tape()

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A named initializer ``{name}.{suffix}`` holding ``array``."""
        arr = np.ascontiguousarray(array)
        vname = f"{self.name}.{suffix}"
        tensor = ir.tensor(arr, name=vname)
        if isinstance(self.target, onnx_ir.tape.Tape):
            return self.target.initializer(tensor, name=vname)
        value = ir.Value(name=vname, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.target.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None],
           attributes: Mapping[str, Any] | None = None, *, domain: str = "",
           out: str | None = None) -> ir.Value:
        """One single-output node; returns its output value (named ``{name}.{out}``)."""
        return self.op_multi(op_type, inputs, (out,), attributes, domain=domain)[0]

    def op_multi(self, op_type: str, inputs: Sequence[ir.Value | None], out: Sequence[str | None],
                 attributes: Mapping[str, Any] | None = None, *, domain: str = "") -> Sequence[ir.Value]:
        self._counter += 1
        i = self._counter
        outputs = [ir.Value(name=f"{self.name}.{tag or f'{op_type.lower()}_{i}_{j}'}")
                   for j, tag in enumerate(out)]
        values = self._tape.op_multi_out(
            op_type,
            list(inputs),
            attributes,
            outputs=outputs,
            domain=domain,
            name=f"{self.name}/{op_type}_{i}",
            metadata_props={PASS_KEY: self.pass_name},
        )
        node = values[0].producer()
        assert node is not None
        self.nodes.append(node)
        if domain:
            ensure_opset(self.target, domain)
        return values

    def commit(self) -> None:
        """Insert the created nodes into the target graph (no-op for a tape)."""
        if isinstance(self.target, onnx_ir.tape.Tape) or not self.nodes:
            return
        graph = self.target
        if self.insert_before is not None:
            graph.insert_before(self.insert_before, self.nodes)
            return
        producer = self.anchor_value.producer() if self.anchor_value is not None else None
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, self.nodes)
        elif len(graph) > 0:
            graph.insert_before(graph[0], self.nodes)
        else:
            graph.extend(self.nodes)


def _check_weight(w_q: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None) -> tuple[int, int]:
    w_q = np.asarray(w_q)
    if w_q.dtype != np.int8 or w_q.ndim != 2:
        raise ValueError(f"w_q must be an int8 [K, N] array, got {w_q.dtype} {w_q.shape}")
    k, n = w_q.shape
    if np.shape(w_scale) != (n,):
        raise ValueError(f"w_scale must have shape ({n},), got {np.shape(w_scale)}")
    if not np.all(np.asarray(w_scale) > 0):
        raise ValueError("w_scale must be positive")
    if bias is not None and np.shape(bias) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {np.shape(bias)}")
    return k, n


def _check_input(x: ir.Value, k: int) -> None:
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.shape is not None:
        last = x.shape[-1] if len(x.shape) else None
        if isinstance(last, int) and last != k:
            raise ValueError(f"x has {last} input features, weight has K={k}")


def _annotate_output(y: ir.Value, x: ir.Value, n: int) -> None:
    y.type = ir.TensorType(ir.DataType.FLOAT)
    if x.shape is not None and len(x.shape) >= 1:
        y.shape = ir.Shape([*x.shape[:-1], n])


def _f32(v: float | np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _scaled_output(b: NodeBuilder, acc: ir.Value, a_scale: ir.Value, w_scale: np.ndarray,
                   bias: np.ndarray | None) -> ir.Value:
    """``Cast(acc) * Mul(a_scale, w_scale) [+ bias]``: the exact shape of ORT's
    MatMulIntegerToFloatFusion (MatMulInteger -> Cast -> Mul <- Mul, then Add(const bias)).
    Only for a *scalar* a_scale (see :func:`emit_dynamic_per_token_linear` for why)."""
    accf = b.op("Cast", [acc], {"to": int(ir.DataType.FLOAT)}, out="acc_f32")
    scale = b.op("Mul", [a_scale, b.const("w_scale", _f32(w_scale))], out="out_scale")
    y = b.op("Mul", [accf, scale], out="y_nobias" if bias is not None else "y")
    if bias is not None:
        y = b.op("Add", [y, b.const("bias", _f32(bias))], out="y")
    return y


# ---------------------------------------------------------------------------------------
# Emitters
# ---------------------------------------------------------------------------------------
def emit_dynamic_per_token_linear(
    target: Target,
    x: ir.Value,
    w_q: np.ndarray,
    w_scale: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    name: str,
    symmetric: bool = False,
    zero_point: int | None = None,
    pass_name: str = DEFAULT_PASS_NAME,
    insert_before: ir.Node | None = None,
    opset: int | None = None,
) -> ir.Value:
    """``y = x @ (w_q * w_scale) [+ bias]`` with x quantized to uint8 per row at run time.

    x: float32 ``[..., K]`` (2-D or 3-D; a row is every leading position). Per row:

    * asymmetric (default): ``lo = min(min_k x, 0)``, ``hi = max(max_k x, 0)``,
      ``s = max((hi - lo) * f32(1/255), 1e-30)``, ``zp = rint(-lo / s)`` (in [0, 255]),
      ``q = clip(rint(x / s) + zp, 0, 255)``,
      ``y = s * w_scale * (q @ w_q) - (s * zp) * (w_scale * colsum(w_q)) [+ bias]``
    * symmetric: ``s = max(max_k |x| * f32(1/127), 1e-30)``, ``q = rint(x / s) + 128``,
      ``y = s * w_scale * ((q - 128) @ w_q) [+ bias]`` (scalar zero point 128 in the GEMM).

    Graph: row statistics (Reduce*, a few [..., 1] ops), one ``QuantizeLinear`` (blocked,
    opset >= 21; per-axis over a ``[M, K]`` reshape below 21), ``com.microsoft.
    MatMulIntegerToFloat(q, w_q, s[..., 1], w_scale[, 128])``, then for asymmetric the
    rank-1 correction (``Mul``, ``Sub``) and a separate ``Add`` for the bias. The int8
    products accumulate exactly in int32; only the float epilogue rounds.

    Why the contrib op is written directly rather than ``MatMulInteger -> Cast -> Mul``
    (which ORT fuses into the same kernel at the same speed): ORT 1.32's fusion also
    absorbs a following ``Add(y, const bias)`` into the kernel's bias input, and with a
    per-row A scale the kernel adds that bias *before* its per-row scaling pass, returning
    ``s_row * (acc * w_scale + bias)``. With the fused node emitted directly, no ``Add``
    can be absorbed, whether it is ours or the model's own bias ``Add`` downstream.

    Constants: ``{name}.w_q``, ``{name}.w_scale``, ``{name}.bias``,
    ``{name}.colsum_w_scale`` (asymmetric; ``w_scale * colsum(w_q)`` in float32), small
    scalars. Adds the ``com.microsoft`` opset import. ``opset`` overrides the default-domain
    opset read from the target graph (it picks the quantization form).
    """
    k, n = _check_weight(w_q, w_scale, bias)
    _check_input(x, k)
    if opset is None:
        opset = _default_opset(target) or BLOCKED_QUANTIZE_OPSET
    b = NodeBuilder(target, name, pass_name, anchor_value=x, insert_before=insert_before)
    axes = b.const("reduce_axes", np.array([-1], np.int64))
    if zero_point is not None:
        # One zero point z for every row, a scale per row: the row's range [lo, hi] must fit
        # [-z s, (255 - z) s]. No per-row zero point, so no correction pass after the GEMM;
        # z is calibrated so that typical rows (whose skew comes from fixed-sign outlier
        # channels) use most of the 256 levels.
        z = int(zero_point)
        if not 1 <= z <= 254:
            raise ValueError(f"zero_point must be in [1, 254], got {zero_point}")
        zero = b.const("zero", _f32(0.0))
        hi = b.op("Max", [b.op("ReduceMax", [x, axes], {"keepdims": 1}, out="x_max_raw"), zero], out="x_max")
        lo = b.op("Min", [b.op("ReduceMin", [x, axes], {"keepdims": 1}, out="x_min_raw"), zero], out="x_min")
        s_hi = b.op("Mul", [hi, b.const("inv_hi", _f32(1 / (255 - z)))], out="x_scale_hi")
        s_lo = b.op("Mul", [lo, b.const("inv_lo", _f32(-1 / z))], out="x_scale_lo")
        s = b.op("Max", [s_hi, s_lo, b.const("scale_eps", _f32(SCALE_EPS))], out="x_scale")
        zp = b.op("Expand", [b.const("zp_row", np.full((1,), z, np.uint8)), b.op("Shape", [s])],
                  out="x_zero_point")
        mm_zp = b.const("mm_zp", np.array(z, np.uint8))
        symmetric = True  # no correction pass below
    elif symmetric:
        amax = b.op("ReduceMax", [b.op("Abs", [x], out="x_abs"), axes], {"keepdims": 1}, out="x_absmax")
        scaled = b.op("Mul", [amax, b.const("inv_qrange", _f32(1 / 127))], out="x_scale_raw")
        s = b.op("Max", [scaled, b.const("scale_eps", _f32(SCALE_EPS))], out="x_scale")
        zp = b.op("Expand", [b.const("zp128", np.full((1,), 128, np.uint8)), b.op("Shape", [s])],
                  out="x_zero_point")
        mm_zp: ir.Value | None = b.const("mm_zp", np.array(128, np.uint8))
    else:
        zero = b.const("zero", _f32(0.0))
        hi = b.op("Max", [b.op("ReduceMax", [x, axes], {"keepdims": 1}, out="x_max_raw"), zero], out="x_max")
        lo = b.op("Min", [b.op("ReduceMin", [x, axes], {"keepdims": 1}, out="x_min_raw"), zero], out="x_min")
        span = b.op("Mul", [b.op("Sub", [hi, lo], out="x_range"), b.const("inv_qrange", _f32(1 / 255))],
                    out="x_scale_raw")
        s = b.op("Max", [span, b.const("scale_eps", _f32(SCALE_EPS))], out="x_scale")
        zp_f = b.op("Round", [b.op("Div", [b.op("Neg", [lo], out="x_min_neg"), s], out="x_zp_raw")],
                    out="x_zp_f32")
        zp = b.op("Cast", [zp_f], {"to": int(ir.DataType.UINT8)}, out="x_zero_point")
        mm_zp = None
    q = _quantize_rows(b, x, s, zp, k, opset)
    # Per-row A scale [..., 1]: the kernel applies the per-column w_scale in the GEMM output
    # stage and the row scale in a broadcast pass afterwards. No bias input (see above).
    mm_inputs: list[ir.Value | None] = [q, b.const("w_q", np.asarray(w_q, np.int8)), s,
                                        b.const("w_scale", _f32(w_scale))]
    if mm_zp is not None:
        mm_inputs.append(mm_zp)
    y = b.op("MatMulIntegerToFloat", mm_inputs, domain=MS_DOMAIN,
             out="y_nobias" if (bias is not None or not symmetric) else "y")
    if not symmetric:
        cs_ws = (np.asarray(w_q, np.int64).sum(axis=0) * np.asarray(w_scale, np.float64)).astype(np.float32)
        row = b.op("Mul", [s, zp_f], out="x_scale_zp")
        corr = b.op("Mul", [row, b.const("colsum_w_scale", cs_ws)], out="zp_correction")
        y = b.op("Sub", [y, corr], out="y_corrected" if bias is not None else "y")
    if bias is not None:
        y = b.op("Add", [y, b.const("bias", _f32(bias))], out="y")
    _annotate_output(y, x, n)
    b.commit()
    return y


def _quantize_rows(b: NodeBuilder, x: ir.Value, s: ir.Value, zp: ir.Value, k: int, opset: int) -> ir.Value:
    """uint8 ``clip(rint(x / s) + zp, 0, 255)`` with ``s``, ``zp`` of shape ``[..., 1]``."""
    if opset >= BLOCKED_QUANTIZE_OPSET:
        return b.op("QuantizeLinear", [x, s, zp], {"axis": -1, "block_size": k}, out="x_q")
    # opset 13-20: per-axis QuantizeLinear over a [M, K] view
    flat = b.const("shape_m", np.array([-1], np.int64))
    x2 = b.op("Reshape", [x, b.const("shape_mk", np.array([-1, k], np.int64))], out="x_2d")
    q2 = b.op("QuantizeLinear", [x2, b.op("Reshape", [s, flat], out="x_scale_1d"),
                                 b.op("Reshape", [zp, flat], out="x_zero_point_1d")],
              {"axis": 0}, out="x_q_2d")
    return b.op("Reshape", [q2, b.op("Shape", [x], out="x_shape")], out="x_q")


def emit_dynamic_per_tensor_linear(
    target: Target,
    x: ir.Value,
    w_q: np.ndarray,
    w_scale: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    name: str,
    pass_name: str = DEFAULT_PASS_NAME,
    insert_before: ir.Node | None = None,
) -> ir.Value:
    """Dynamic per-tensor uint8 activations, as ``quantize_dynamic`` writes it:
    ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(Mul(x_scale, w_scale))``
    (+ ``Add(bias)``), which ORT fuses into ``com.microsoft.DynamicQuantizeMatMul``.
    Standard ONNX (opset >= 11). Fastest dynamic pattern at T=1; coarse for long prompts."""
    k, n = _check_weight(w_q, w_scale, bias)
    _check_input(x, k)
    b = NodeBuilder(target, name, pass_name, anchor_value=x, insert_before=insert_before)
    q, s, zp = b.op_multi("DynamicQuantizeLinear", [x], ("x_q", "x_scale", "x_zero_point"))
    acc = b.op("MatMulInteger", [q, b.const("w_q", np.asarray(w_q, np.int8)), zp], out="acc")
    y = _scaled_output(b, acc, s, w_scale, bias)
    _annotate_output(y, x, n)
    b.commit()
    return y


def emit_static_linear(
    target: Target,
    x: ir.Value,
    w_q: np.ndarray,
    w_scale: np.ndarray,
    x_scale: float,
    x_zero_point: int,
    *,
    bias: np.ndarray | None = None,
    name: str,
    pass_name: str = DEFAULT_PASS_NAME,
    insert_before: ir.Node | None = None,
) -> ir.Value:
    """Static (calibrated) per-tensor uint8 activations:
    ``QuantizeLinear(x, x_scale, x_zero_point:uint8) -> com.microsoft.MatMulIntegerToFloat(
    q, w_q, x_scale, w_scale, x_zero_point, -, bias)``.

    ``y = x_scale * w_scale * ((q - zp) @ w_q) + bias`` with
    ``q = clip(rint(x / x_scale) + zp, 0, 255)``. ``x_zero_point`` is a uint8 value in
    [0, 255] (a signed int8 calibration ``(s, z)`` maps to ``(s, z + 128)``). Adds the
    ``com.microsoft`` opset import to the target graph. Constants: ``{name}.w_q``,
    ``{name}.w_scale``, ``{name}.x_scale``, ``{name}.x_zero_point``, ``{name}.bias``.
    """
    k, n = _check_weight(w_q, w_scale, bias)
    _check_input(x, k)
    if not (np.isfinite(x_scale) and x_scale > 0):
        raise ValueError(f"x_scale must be a positive finite float, got {x_scale}")
    if int(x_zero_point) != x_zero_point or not 0 <= int(x_zero_point) <= 255:
        raise ValueError(f"x_zero_point must be an integer in [0, 255] (uint8), got {x_zero_point}")
    b = NodeBuilder(target, name, pass_name, anchor_value=x, insert_before=insert_before)
    xs = b.const("x_scale", _f32(x_scale))
    xzp = b.const("x_zero_point", np.array(int(x_zero_point), np.uint8))
    q = b.op("QuantizeLinear", [x, xs, xzp], out="x_q")
    inputs: list[ir.Value | None] = [q, b.const("w_q", np.asarray(w_q, np.int8)), xs,
                                     b.const("w_scale", _f32(w_scale)), xzp]
    if bias is not None:
        inputs += [None, b.const("bias", _f32(bias))]
    y = b.op("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, out="y")
    _annotate_output(y, x, n)
    b.commit()
    return y
