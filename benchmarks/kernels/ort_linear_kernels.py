"""Which ONNX operator patterns does ONNX Runtime's CPU provider run fastest for a W8A8 linear?

Builds one graph per candidate pattern (8 independent linears y_i = x_i @ W_i, each with its
own input and its own weight, so per-run overhead is amortised and weights stream from memory
like in a real model), runs it with ORT (CPU EP, ORT_ENABLE_ALL, intra_op_num_threads=2) and
reports:

* speedup = fp32_time / variant_time: the median over rounds of the ratio of two adjacent
  runs (see :func:`benchmarks.harness.time_paired` for why paired),
* relative error ||y - y_fp32||_F / ||y_fp32||_F against the fp32 MatMul on realistic
  activations (normal rows with a per-token magnitude spread and a few ~30x outlier channels),
* the kernels ORT actually runs (op types of the optimized graph).

Usage::

    python -m benchmarks.kernels.ort_linear_kernels [--out DIR] [--quick] [--threads 2]

Writes ``ort_linear_kernels.json`` and ``ort_linear_kernels.md`` to ``benchmarks/out/`` by
default and prints the markdown table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from benchmarks.harness import (
    OUT,
    CacheFlusher,
    command_line,
    git_state,
    machine_info,
    time_paired,
    tree_line,
    write_json,
)
from lowbit.backends.ort import qlinear
from lowbit.backends.ort.qlinear import NodeBuilder
from lowbit.compiler.analysis.costs import cpu_model

FLOAT = ir.DataType.FLOAT
SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # SmolLM2-135M: attn proj, up/gate, down
TOKENS = [1, 128]
N_LINEARS = 8
OPSET = 21


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def realistic_activations(rng: np.random.Generator, t: int, k: int, outlier_idx: np.ndarray) -> np.ndarray:
    """[1, t, k] float32: N(0,1) rows, per-token magnitude spread, ~30x outlier channels."""
    x = rng.standard_normal((t, k)).astype(np.float32)
    x *= np.exp(rng.normal(0.0, 0.5, size=(t, 1))).astype(np.float32)  # token magnitudes
    x[:, outlier_idx] *= 30.0
    return x[None]


def random_weight(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    w *= np.exp(rng.normal(0.0, 0.3, size=(1, n)))  # column spread
    return w.astype(np.float32)


@dataclasses.dataclass
class Layer:
    w: np.ndarray  # fp32 [K, N]
    w_q: np.ndarray  # int8 [K, N]
    w_scale: np.ndarray  # fp32 [N]
    x_scale_u8: float  # static, asymmetric uint8 (calibrated)
    x_zp_u8: int
    x_scale_s8: float  # static, symmetric int8 (calibrated)
    y_scale_u8: float  # static output quantization (QLinearMatMul only)
    y_zp_u8: int
    bias: np.ndarray  # fp32 [N], used by variants with bias=True


def calibrate(calib_x: np.ndarray, w: np.ndarray) -> tuple[float, int, float, float, int]:
    lo, hi = min(float(calib_x.min()), 0.0), max(float(calib_x.max()), 0.0)
    s_u8 = (hi - lo) / 255.0 or 1.0
    zp_u8 = int(np.clip(np.rint(-lo / s_u8), 0, 255))
    s_s8 = max(abs(lo), abs(hi)) / 127.0 or 1.0
    y = calib_x.reshape(-1, calib_x.shape[-1]) @ w
    ylo, yhi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    ys = (yhi - ylo) / 255.0 or 1.0
    yzp = int(np.clip(np.rint(-ylo / ys), 0, 255))
    return s_u8, zp_u8, s_s8, ys, yzp


# ---------------------------------------------------------------------------------------
# Candidate patterns. Each takes (builder, x, layer) and returns the float output value.
# The emitters shipped in lowbit.backends.ort.qlinear are measured as well (rows marked *).
# ---------------------------------------------------------------------------------------
def _u8(v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint8)


def _f(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def p_fp32(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return b.op("MatMul", [x, b.const("w", L.w)])


def p_dyn_tensor_ms(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return b.op("DynamicQuantizeMatMul", [x, b.const("w_q", L.w_q), b.const("w_scale", L.w_scale)],
                domain=qlinear.MS_DOMAIN)


def _row_absmax_scale(b: NodeBuilder, x: ir.Value) -> ir.Value:
    amax = b.op("ReduceMax", [b.op("Abs", [x]), b.const("axes", np.array([-1], np.int64))], {"keepdims": 1})
    return b.op("Max", [b.op("Mul", [amax, b.const("inv127", _f(1 / 127))]), b.const("eps", _f(1e-30))])


def p_tok_sym_ew(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token symmetric, quantized with elementwise ops, standard ONNX MatMulInteger."""
    s = _row_absmax_scale(b, x)
    qf = b.op("Add", [b.op("Round", [b.op("Div", [x, s])]), b.const("c128", _f(128))])
    q = b.op("Cast", [qf], {"to": int(ir.DataType.UINT8)})
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q), b.const("zp", _u8(128))])
    accf = b.op("Cast", [acc], {"to": int(FLOAT)})
    return b.op("Mul", [accf, b.op("Mul", [s, b.const("w_scale", L.w_scale)])])


def _blocked_q_sym(b: NodeBuilder, x: ir.Value, s: ir.Value, k: int) -> ir.Value:
    zp = b.op("Expand", [b.const("zp128", np.full((1,), 128, np.uint8)), b.op("Shape", [s])])
    return b.op("QuantizeLinear", [x, s, zp], {"axis": -1, "block_size": k})


def _fusable_tail(b: NodeBuilder, q: ir.Value, s: ir.Value, L: Layer, zp: ir.Value | None) -> ir.Value:
    """Standard ONNX MatMulInteger -> Cast -> Mul(Mul(s, w_scale)); ORT fuses it into
    com.microsoft.MatMulIntegerToFloat."""
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q)] + ([zp] if zp is not None else []))
    accf = b.op("Cast", [acc], {"to": int(FLOAT)})
    return b.op("Mul", [accf, b.op("Mul", [s, b.const("w_scale", L.w_scale)])])


def p_tok_sym_onnx(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token symmetric, blocked QuantizeLinear + standard MatMulInteger+Cast+Mul."""
    s = _row_absmax_scale(b, x)
    q = _blocked_q_sym(b, x, s, L.w.shape[0])
    return _fusable_tail(b, q, s, L, b.const("zp", _u8(128)))


def p_tok_sym_onnx_bias(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """As p_tok_sym_onnx followed by the linear's bias Add: ORT fuses the Add into
    MatMulIntegerToFloat and scales the bias by the per-row scale (wrong numbers)."""
    return b.op("Add", [p_tok_sym_onnx(b, x, L, cache), b.const("bias", L.bias)])


def p_tok_sym_s8(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token symmetric with int8 activations (no zero point): MatMulInteger S8S8."""
    s = _row_absmax_scale(b, x)
    q = b.op("QuantizeLinear", [x, s], {"axis": -1, "block_size": L.w.shape[0],
                                         "output_dtype": int(ir.DataType.INT8)})
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q)])
    accf = b.op("Cast", [acc], {"to": int(FLOAT)})
    return b.op("Mul", [accf, b.op("Mul", [s, b.const("w_scale", L.w_scale)])])


def _asym_params(b: NodeBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    axes = b.const("axes", np.array([-1], np.int64))
    zero = b.const("zero", _f(0))
    mx = b.op("Max", [b.op("ReduceMax", [x, axes], {"keepdims": 1}), zero])
    mn = b.op("Min", [b.op("ReduceMin", [x, axes], {"keepdims": 1}), zero])
    s = b.op("Max", [b.op("Mul", [b.op("Sub", [mx, mn]), b.const("inv255", _f(1 / 255))]),
                     b.const("eps", _f(1e-30))])
    zpf = b.op("Round", [b.op("Div", [b.op("Neg", [mn]), s])])
    zp = b.op("Cast", [zpf], {"to": int(ir.DataType.UINT8)})
    return s, zpf, zp


def p_tok_asym_ql_int(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token asymmetric: QuantizeLinear, MatMulInteger, int32 zero-point correction."""
    s, _, zp = _asym_params(b, x)
    q = b.op("QuantizeLinear", [x, s, zp], {"axis": -1, "block_size": L.w.shape[0]})
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q)])
    colsum = L.w_q.astype(np.int32).sum(0).astype(np.int32)
    corr = b.op("Mul", [b.op("Cast", [zp], {"to": int(ir.DataType.INT32)}), b.const("colsum", colsum)])
    accf = b.op("Cast", [b.op("Sub", [acc, corr])], {"to": int(FLOAT)})
    return b.op("Mul", [accf, b.op("Mul", [s, b.const("w_scale", L.w_scale)])])


def p_tok_asym_ew_f(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token asymmetric quantized with elementwise ops, float correction."""
    s, zpf, _ = _asym_params(b, x)
    qf = b.op("Clip", [b.op("Add", [b.op("Round", [b.op("Div", [x, s])]), zpf]),
                      b.const("lo", _f(0)), b.const("hi", _f(255))])
    q = b.op("Cast", [qf], {"to": int(ir.DataType.UINT8)})
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q)])
    accf = b.op("Cast", [acc], {"to": int(FLOAT)})
    y1 = b.op("Mul", [accf, b.op("Mul", [s, b.const("w_scale", L.w_scale)])])
    cs_ws = (L.w_q.astype(np.float64).sum(0) * L.w_scale).astype(np.float32)
    corr = b.op("Mul", [b.op("Mul", [s, zpf]), b.const("colsum_w_scale", cs_ws)])
    return b.op("Sub", [y1, corr])


def p_tok_asym_onnx(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Per-token asymmetric, blocked QuantizeLinear + standard MatMulInteger+Cast+Mul, float
    correction."""
    s, zpf, zp = _asym_params(b, x)
    q = b.op("QuantizeLinear", [x, s, zp], {"axis": -1, "block_size": L.w.shape[0]})
    y1 = _fusable_tail(b, q, s, L, None)
    cs_ws = (L.w_q.astype(np.float64).sum(0) * L.w_scale).astype(np.float32)
    corr = b.op("Mul", [b.op("Mul", [s, zpf]), b.const("colsum_w_scale", cs_ws)])
    return b.op("Sub", [y1, corr])


def _qdq(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict, signed: bool) -> ir.Value:
    """QDQ form as quantize_static writes it. Linears that share an input share one
    QuantizeLinear (and its scale), each with its own DequantizeLinear."""
    if "q" in cache:
        q, xs, xzp = cache["q"]
    else:
        if signed:
            xs, xzp = b.const("x_scale", _f(L.x_scale_s8)), b.const("x_zp", np.array(0, np.int8))
        else:
            xs, xzp = b.const("x_scale", _f(L.x_scale_u8)), b.const("x_zp", _u8(L.x_zp_u8))
        q = b.op("QuantizeLinear", [x, xs, xzp])
        cache["q"] = (q, xs, xzp)
    xd = b.op("DequantizeLinear", [q, xs, xzp])
    wd = b.op("DequantizeLinear", [b.const("w_q", L.w_q), b.const("w_scale", L.w_scale),
                                   b.const("w_zp", np.zeros(L.w_scale.shape, np.int8))], {"axis": 1})
    return b.op("MatMul", [xd, wd])


def p_static_qdq_u8(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return _qdq(b, x, L, cache, signed=False)


def p_static_qdq_s8(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return _qdq(b, x, L, cache, signed=True)


def p_static_mmi(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Static per-tensor: QuantizeLinear(u8) + MatMulInteger + Cast + Mul(const x_s*w_s)."""
    q = b.op("QuantizeLinear", [x, b.const("x_scale", _f(L.x_scale_u8)), b.const("x_zp", _u8(L.x_zp_u8))])
    acc = b.op("MatMulInteger", [q, b.const("w_q", L.w_q), b.const("x_zp2", _u8(L.x_zp_u8))])
    accf = b.op("Cast", [acc], {"to": int(FLOAT)})
    return b.op("Mul", [accf, b.const("out_scale", (L.x_scale_u8 * L.w_scale).astype(np.float32))])


def p_static_qlinearmatmul(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    """Static per-tensor with static output quantization: QLinearMatMul + DequantizeLinear."""
    xs, xzp = b.const("x_scale", _f(L.x_scale_u8)), b.const("x_zp", _u8(L.x_zp_u8))
    ys, yzp = b.const("y_scale", _f(L.y_scale_u8)), b.const("y_zp", _u8(L.y_zp_u8))
    q = b.op("QuantizeLinear", [x, xs, xzp])
    yq = b.op("QLinearMatMul", [q, xs, xzp, b.const("w_q", L.w_q), b.const("w_scale", L.w_scale),
                                b.const("w_zp", np.zeros(L.w_scale.shape, np.int8)), ys, yzp])
    return b.op("DequantizeLinear", [yq, ys, yzp])


def p_nbits8(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict, block: int = 64, level: int = 4) -> ir.Value:
    """com.microsoft MatMulNBits bits=8 (per-channel scale replicated per block);
    accuracy_level=4 quantizes activations to int8 per row per K-block inside the kernel."""
    k, n = L.w.shape
    nb = k // block
    wu8 = (L.w_q.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, nb, block)
    scales = np.repeat(L.w_scale[:, None], nb, axis=1).astype(np.float32)
    return b.op("MatMulNBits", [x, b.const("w_nbits", np.ascontiguousarray(wu8)), b.const("scales", scales)],
                {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": level},
                domain=qlinear.MS_DOMAIN)


def p_emit_dyn_tensor(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_tensor_linear(b.target, x, L.w_q, L.w_scale, name=b.name)


def p_emit_tok_sym(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_token_linear(b.target, x, L.w_q, L.w_scale, name=b.name, symmetric=True)


def p_emit_tok_sym_op18(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_token_linear(b.target, x, L.w_q, L.w_scale, name=b.name, symmetric=True,
                                                 opset=18)


def p_emit_tok_sym_bias(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_token_linear(b.target, x, L.w_q, L.w_scale, bias=L.bias, name=b.name,
                                                 symmetric=True)


def p_emit_tok_asym(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_token_linear(b.target, x, L.w_q, L.w_scale, name=b.name)


def p_emit_tok_asym_op18(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_dynamic_per_token_linear(b.target, x, L.w_q, L.w_scale, name=b.name, opset=18)


def p_emit_static(b: NodeBuilder, x: ir.Value, L: Layer, cache: dict) -> ir.Value:
    return qlinear.emit_static_linear(b.target, x, L.w_q, L.w_scale, L.x_scale_u8, L.x_zp_u8, name=b.name)


# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str
    group: str
    fn: Callable[[NodeBuilder, ir.Value, Layer, dict], ir.Value]
    desc: str
    share_input: int = 1  # >1: groups of linears share one quantized input (like Q/K/V)
    bias: bool = False  # the pattern adds Layer.bias (the reference does too)


def variants() -> list[Variant]:
    """Rows marked with a leading ``*`` are built by the shipped emitters."""
    return [
        Variant("fp32", "ref", p_fp32, "MatMul fp32"),
        # A. dynamic per-tensor
        Variant("*dyn_tensor", "A", p_emit_dyn_tensor,
                "emit_dynamic_per_tensor_linear: DynamicQuantizeLinear+MatMulInteger+Cast+Mul (quantize_dynamic form)"),
        Variant("*tok_asym", "B", p_emit_tok_asym,
                "emit_dynamic_per_token_linear: asym, blocked QuantizeLinear, MatMulIntegerToFloat, float correction"),
        Variant("tok_asym_int", "B", p_tok_asym_ql_int, "asym, blocked QuantizeLinear, int32 correction before Cast"),
        Variant("tok_asym_onnx", "B", p_tok_asym_onnx,
                "asym, blocked QuantizeLinear, standard MatMulInteger+Cast+Mul (ORT fuses), float correction"),
        Variant("*tok_sym", "B", p_emit_tok_sym,
                "emit_dynamic_per_token_linear(symmetric): blocked QuantizeLinear + MatMulIntegerToFloat(zp=128)"),
        Variant("*tok_sym_op18", "B", p_emit_tok_sym_op18,
                "emit_dynamic_per_token_linear(symmetric, opset=18): [M,K] reshape + per-axis QuantizeLinear"),
        Variant("*tok_sym+bias", "B", p_emit_tok_sym_bias, "emit_dynamic_per_token_linear(symmetric, bias)",
                bias=True),
        Variant("tok_sym_onnx", "B", p_tok_sym_onnx,
                "sym, blocked QuantizeLinear, standard MatMulInteger(zp=128)+Cast+Mul (ORT fuses)"),
        Variant("tok_sym_onnx+bias", "B", p_tok_sym_onnx_bias,
                "tok_sym_onnx + Add(bias): ORT fuses the Add and scales the bias by the row scale (wrong)",
                bias=True),
        Variant("tok_sym_ew", "B", p_tok_sym_ew, "sym, Div/Round/Add/Cast quantization, MatMulInteger(zp=128)+Cast+Mul"),
        Variant("tok_sym_s8", "B", p_tok_sym_s8, "sym, int8 activations (no zero point), MatMulInteger S8S8"),
        # C. static per-tensor
        Variant("*static", "C", p_emit_static, "emit_static_linear: QuantizeLinear(u8)+com.microsoft MatMulIntegerToFloat"),
        Variant("static_qdq_u8", "C", p_static_qdq_u8, "QDQ, U8 activations"),
        Variant("static_qdq_s8", "C", p_static_qdq_s8, "QDQ, S8 activations (one consumer per Q)"),
        Variant("static_qdq_u8_shared", "C", p_static_qdq_u8, "QDQ, U8 activations, one Q shared by 2 linears",
                share_input=2),
        Variant("static_qdq_s8_shared", "C", p_static_qdq_s8, "QDQ, S8 activations, one Q shared by 2 linears",
                share_input=2),
        Variant("static_mmi", "C", p_static_mmi, "QuantizeLinear(u8)+MatMulInteger+Cast+Mul(const scale)"),
        Variant("static_qlinearmatmul", "C", p_static_qlinearmatmul,
                "QuantizeLinear+QLinearMatMul+DequantizeLinear (static output scale)"),
        # D. for comparison: int8 weights in MatMulNBits, per-row per-64-block int8 activations
        Variant("nbits8_blk64_acc4", "D", p_nbits8,
                "com.microsoft MatMulNBits bits=8 block 64 accuracy_level=4 (dynamic per-row-per-block)"),
    ]


# ---------------------------------------------------------------------------------------
def build_model(variant: Variant, layers: Sequence[Layer], k: int, t: int) -> tuple[onnx.ModelProto, list[str]]:
    n_in = len(layers) // variant.share_input
    # symbolic batch/sequence dims, as in an exported LLM
    inputs = [ir.val(f"x{i}", FLOAT, ["batch", "seq", k]) for i in range(n_in)]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": OPSET, qlinear.MS_DOMAIN: 1}, name=variant.name)
    outputs = []
    caches: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        x = inputs[i // variant.share_input]
        b = NodeBuilder(graph, f"l{i}", "bench", anchor_value=x)
        y = variant.fn(b, x, layer, caches.setdefault(x.name, {}))
        b.commit()
        outputs.append(y)
    graph.outputs.extend(outputs)
    for o in outputs:
        o.type = ir.TensorType(FLOAT)
    graph.sort()
    return ir.to_proto(ir.Model(graph, ir_version=10)), [v.name for v in inputs]


# ---------------------------------------------------------------------------------------
def make_session(model: onnx.ModelProto, threads: int, dump: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if dump is not None:
        so.optimized_model_filepath = str(dump)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernels_of(path: Path) -> str:
    m = onnx.load(str(path))
    counts = collections.Counter(n.op_type for n in m.graph.node)
    per_linear = {op: c / N_LINEARS for op, c in counts.items()}
    return " ".join(f"{op}x{c:g}" if c != 1 else op for op, c in per_linear.items())


def rel_err(ys: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    num = sum(float(np.sum((y.astype(np.float64) - r) ** 2)) for y, r in zip(ys, refs))
    den = sum(float(np.sum(r**2)) for r in refs)
    return float(np.sqrt(num / den))


def run_config(k: int, n: int, t: int, vs: Sequence[Variant], threads: int, rounds: int,
               flush: Callable[[], None] | None = None, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed + 1000 * k + n)
    outliers = rng.choice(k, size=6, replace=False)
    layers = []
    for _ in range(N_LINEARS):
        w = random_weight(rng, k, n)
        w_q, w_scale = qlinear.quantize_weight_per_channel(w)
        calib = realistic_activations(rng, 256, k, outliers)
        s_u8, zp_u8, s_s8, ys, yzp = calibrate(calib, w)
        bias = (0.5 * rng.standard_normal(n)).astype(np.float32)
        layers.append(Layer(w, w_q, w_scale, s_u8, zp_u8, s_s8, ys, yzp, bias))
    xs = [realistic_activations(rng, t, k, outliers) for _ in range(N_LINEARS)]
    refs = [x[0].astype(np.float64) @ L.w.astype(np.float64) for x, L in zip(xs, layers)]
    w8_only = [x[0].astype(np.float64) @ (L.w_q * L.w_scale).astype(np.float64) for x, L in zip(xs, layers)]

    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in vs:
            row = {"K": k, "N": n, "T": t, "variant": v.name, "group": v.group, "desc": v.desc}
            try:
                model, in_names = build_model(v, layers, k, t)
                dump = Path(tmp) / f"{v.name}.onnx"
                sess = make_session(model, threads, dump)
                feeds = {name: xs[i * v.share_input] for i, name in enumerate(in_names)}
                if v.share_input > 1:  # linears in a group share the group's first input
                    x_used = [xs[(i // v.share_input) * v.share_input] for i in range(N_LINEARS)]
                else:
                    x_used = xs
                out = sess.run(None, feeds)
                grefs = [x[0].astype(np.float64) @ L.w.astype(np.float64) + (L.bias if v.bias else 0.0)
                         for x, L in zip(x_used, layers)]
                row["rel_err"] = rel_err([o.reshape(t, n) for o in out], grefs)
                row["kernels"] = kernels_of(dump)
                runs[v.name] = (lambda s=sess, f=feeds: s.run(None, f))
            except Exception as e:  # a pattern ORT refuses is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    if "fp32" in runs:
        times = time_paired(runs, rounds, "fp32", flush)
        for row in rows:
            row.update(times.get(row["variant"], {}))
    for row in rows:
        row["loadavg"] = os.getloadavg()[0]
    rows.append({"K": k, "N": n, "T": t, "variant": "w8_only_numpy", "group": "ref", "loadavg": os.getloadavg()[0],
                 "desc": "numpy x @ dequant(W_q): weight-quantization error alone",
                 "rel_err": rel_err(w8_only, refs)})
    return rows


def to_markdown(rows: Sequence[dict], vs: Sequence[Variant]) -> str:
    configs = sorted({(r["K"], r["N"], r["T"]) for r in rows}, key=lambda c: (c[2], c[0], c[1]))
    by_cfg_load = {(r["K"], r["N"], r["T"]): r.get("loadavg", float("nan")) for r in rows}
    head = "| variant | " + " | ".join(f"{k}x{n} T={t}" for k, n, t in configs) + " |"
    lines = ["Speedup vs fp32 MatMul (higher is faster) / relative error ||y - y_fp32|| / ||y_fp32||.",
             "Rows starting with `*` are built by the shipped emitters (lowbit.backends.ort.qlinear).",
             "`?`: the paired ratios' interquartile range spans more than 1.5x (machine was contended).",
             "Load average at the end of each configuration: "
             + ", ".join(f"{k}x{n} T={t}: {by_cfg_load[(k, n, t)]:.1f}" for k, n, t in configs) + ".", "",
             head, "|---|" + "---|" * len(configs)]
    names = [v.name for v in vs] + ["w8_only_numpy"]
    by = {(r["variant"], r["K"], r["N"], r["T"]): r for r in rows}
    for name in names:
        cells = []
        for c in configs:
            r = by.get((name, *c))
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("refused")
            elif "speedup" in r:
                lo, hi = r["speedup_iqr"]
                noisy = "?" if hi > 1.5 * lo else ""  # paired ratios spread widely: contended
                cells.append(f"{r['speedup']:.2f}x{noisy} / {r['rel_err']:.1e}")
            else:
                cells.append(f"- / {r['rel_err']:.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Kernels ORT runs per linear (optimized graph), errors:", ""]
    seen = set()
    for r in rows:
        key = (r["variant"], r.get("kernels"), r.get("error"))
        if key in seen or r["variant"] == "w8_only_numpy":
            continue
        seen.add(key)
        what = r.get("kernels") or r.get("error")
        lines.append(f"- `{r['variant']}` ({r['desc']}): {what}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repeats (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="sequence lengths T (default 1 128)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="do not flush the caches before each timed run (weights stay in L3)")
    args = ap.parse_args(argv)

    vs = variants()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = args.rounds or (3 if args.quick else 9)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    if load0 > 0.5:
        print(f"warning: load average {load0:.2f} before start; timings on a busy machine are noisy",
              file=sys.stderr)
    flush = None if args.warm_cache else CacheFlusher()
    rows: list[dict] = []
    for t in args.tokens:
        for k, n in shapes:
            # flush only for decode (T=1), which is bound by reading the weights; at T=128 the
            # GEMM is compute-bound and re-reads each weight block from cache anyway
            rows += run_config(k, n, t, vs, args.threads, rounds, flush if t == 1 else None)
            print(f"  done K={k} N={n} T={t} ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)

    md = to_markdown(rows, vs)
    meta = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "onnx_ir": ir.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
            "linears_per_graph": N_LINEARS, "opset": OPSET, "rounds": rounds,
            "cache_flushed_before_each_run_at_T1": flush is not None,
            "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
            "seconds": round(time.perf_counter() - t_start, 1)}
    prov = {"command": command_line(__spec__.name, argv), "machine": machine_info(), "lowbit_tree": git_state()}
    out = Path(args.out)
    write_json(out / "ort_linear_kernels.json", {"meta": meta, "provenance": prov, "rows": rows})
    (out / "ort_linear_kernels.md").write_text(f"# ORT CPU W8A8 linear kernels\n\n`{prov['command']}`; "
                                               f"{tree_line(prov['lowbit_tree'])}\n\n{json.dumps(meta)}\n\n{md}")
    print(md)
    print(f"wrote {out / 'ort_linear_kernels.json'} and .md in {meta['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
