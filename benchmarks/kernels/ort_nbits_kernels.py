"""Which ONNX Runtime CPU kernel should run a 4-bit (or group-wise 8-bit) weight linear?

Candidates, for ``y = x @ W`` at SmolLM2-135M shapes (576x576, 576x1536, 1536x576), T=1
(decode) and T=128 (prefill), 2 threads:

* W4A16: ``com.microsoft.MatMulNBits`` bits=4 with fp32 compute (accuracy_level 0 or 1),
  groups of 32 / 128, symmetric and asymmetric; and ``DequantizeLinear(int4) -> MatMul``
  with ORT's QDQ fusions disabled (what an unfused QDQ graph costs: by default ORT 1.32
  rewrites that pair into MatMulNBits with accuracy_level 4 itself);
* W4A8: MatMulNBits bits=4 ``accuracy_level=4`` (the kernel quantizes activations to int8
  per row and K-block and runs int8 dot products) against the int8 GEMM lowbit uses for
  W8A8 (per-token uint8 activations, ``MatMulIntegerToFloat``) fed with the 4-bit codes
  unpacked to int8: exact for a per-channel 4-bit weight; a group-wise one has to be
  re-quantized to one scale per channel first (its error is in the table);
* group-wise / weight-only 8-bit: MatMulNBits bits=8 at accuracy levels 0 and 4, and the
  per-channel W8A8 pattern for reference.

Every graph holds 8 independent linears (own input, own weight) so per-run overhead is
amortised and weights stream from memory as in a model; timing is paired against the fp32
MatMul (median ratio of adjacent runs, caches flushed before every T=1 run), with
``benchmarks.harness.time_paired`` and the helpers of ``ort_linear_kernels``. Errors: ``||y - x W||_F / ||x W||_F`` against the fp32
weight (total: weight quantization plus kernel) and against the variant's own dequantized
weight (kernel only: what the activation quantization adds).

Usage::

    python -m benchmarks.kernels.ort_nbits_kernels [--out DIR] [--quick] [--threads 2] [--rounds N]

Writes ``ort_nbits_kernels.json`` and ``ort_nbits_kernels.md`` to ``benchmarks/out/``.
"""

from __future__ import annotations

import argparse
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
from benchmarks.kernels.ort_linear_kernels import (  # shared measurement helpers
    kernels_of,
    random_weight,
    realistic_activations,
    rel_err,
)
from lowbit.backends.ort import nbits, qlinear
from lowbit.backends.ort.qlinear import NodeBuilder
from lowbit.compiler.analysis.costs import cpu_model
from lowbit.passes.quantize_weights import QuantizedWeight, _storage, quantize_weight

FLOAT = ir.DataType.FLOAT
SHAPES = [(576, 576), (576, 1536), (1536, 576)]
TOKENS = [1, 128]
N_LINEARS = 8
OPSET = 21


# ---------------------------------------------------------------------------------------
# Patterns: each returns (output value, the dequantized weight it represents)
# ---------------------------------------------------------------------------------------
Pattern = Callable[[NodeBuilder, ir.Value, np.ndarray, dict], tuple[ir.Value, np.ndarray]]


def _qw(w: np.ndarray, cache: dict, bits: int, group: int | None, sym: bool) -> QuantizedWeight:
    key = (bits, group, sym)
    if key not in cache:
        cache[key] = quantize_weight(w, bits, group_size=group, symmetric=sym)
    return cache[key]


def nbits_pattern(bits: int, group: int | None, sym: bool, level: int) -> Pattern:
    def fn(b, x, w, cache):
        qw = _qw(w, cache, bits, group, sym)
        if group is None:  # per channel: the scale repeated in every block
            block = nbits.per_channel_block_size(w.shape[0])
            reps = -(-w.shape[0] // block)
            scale = np.repeat(qw.scale, reps, 0)
            zero = None if qw.zero_point is None else np.repeat(qw.zero_point, reps, 0)
        else:
            block, scale, zero = group, qw.scale, qw.zero_point
        y = nbits.emit_matmul_nbits(b.target, x, qw.codes, scale, zero, bits=bits, block_size=block,
                                    accuracy_level=level, name=b.name)
        return y, qw.dequantize()
    return fn


def dq_matmul_pattern(bits: int, group: int, sym: bool) -> Pattern:
    """Blocked DequantizeLinear -> MatMul (ORT's DQ->MatMulNBits fusion disabled by the session)."""
    def fn(b, x, w, cache):
        qw = _qw(w, cache, bits, group, sym)
        inputs = [b.const("codes", _storage(qw.codes, bits)), b.const("scale", qw.scale)]
        if qw.zero_point is not None:
            inputs.append(b.const("zero", _storage(qw.zero_point, bits)))
        wd = b.op("DequantizeLinear", inputs, {"axis": 0, "block_size": group}, out="w_dq")
        return b.op("MatMul", [x, wd], out="y"), qw.dequantize()
    return fn


def int8_gemm_pattern(bits: int, group: int | None, symmetric_tokens: bool) -> Pattern:
    """Per-token uint8 activations + int8 GEMM on the weight's codes (re-quantized per channel if grouped)."""
    def fn(b, x, w, cache):
        qw = _qw(w, cache, bits, group, True)
        if group is None:
            codes, scale = qw.codes, qw.scale[0]  # int4 codes are valid int8: exact
        else:  # one scale per channel for the GEMM: re-quantize the dequantized 4-bit weight to int8
            re = quantize_weight(qw.dequantize(), 8)
            codes, scale = re.codes, re.scale[0]
        y = qlinear.emit_dynamic_per_token_linear(b.target, x, codes, scale, name=b.name, symmetric=symmetric_tokens)
        return y, (codes.astype(np.float32) * scale)
    return fn


def fp32_pattern(b, x, w, cache):
    return b.op("MatMul", [x, b.const("w", w)], out="y"), w


@dataclasses.dataclass
class Variant:
    name: str
    group: str
    fn: Pattern
    desc: str
    disabled: tuple[str, ...] = ()  # ORT optimizers switched off for this variant


def variants() -> list[Variant]:
    """Rows marked ``*`` are what ``lower-ort`` emits."""
    v = [Variant("fp32", "ref", fp32_pattern, "MatMul fp32")]
    for g in (32, 128):
        v.append(Variant(f"*w4a16_g{g}_sym", "W4A16", nbits_pattern(4, g, True, 0),
                         f"MatMulNBits bits=4 block {g} symmetric, accuracy_level 0 (fp32)"))
        v.append(Variant(f"*w4a16_g{g}_asym", "W4A16", nbits_pattern(4, g, False, 0),
                         f"MatMulNBits bits=4 block {g} asymmetric (packed zero points), accuracy_level 0"))
    v.append(Variant("w4a16_g32_sym_acc1", "W4A16", nbits_pattern(4, 32, True, 1),
                     "MatMulNBits bits=4 block 32 symmetric, accuracy_level 1 (fp32)"))
    v.append(Variant("w4_g32_dq_matmul", "W4A16", dq_matmul_pattern(4, 32, True),
                     "DequantizeLinear(int4, block 32) -> MatMul, ORT QDQ fusions disabled",
                     disabled=("QDQSelectorActionTransformer",)))
    for g in (32, 128):
        v.append(Variant(f"*w4a8_g{g}_sym", "W4A8", nbits_pattern(4, g, True, 4),
                         f"MatMulNBits bits=4 block {g} symmetric, accuracy_level 4 (int8 activations per row and block)"))
    v.append(Variant("*w4a8_g32_asym", "W4A8", nbits_pattern(4, 32, False, 4),
                     "MatMulNBits bits=4 block 32 asymmetric, accuracy_level 4"))
    v.append(Variant("*w4a8_pc_sym", "W4A8", nbits_pattern(4, None, True, 4),
                     "MatMulNBits bits=4 per channel (scale repeated per block of 64), accuracy_level 4"))
    v.append(Variant("w4a8_pc_int8gemm_tok_asym", "W4A8", int8_gemm_pattern(4, None, False),
                     "per-channel 4-bit codes as int8 + per-token uint8 asym + MatMulIntegerToFloat (lowbit w8a8 path)"))
    v.append(Variant("w4a8_pc_int8gemm_tok_sym", "W4A8", int8_gemm_pattern(4, None, True),
                     "per-channel 4-bit codes as int8 + per-token symmetric + MatMulIntegerToFloat"))
    v.append(Variant("w4a8_g32_requant_int8gemm", "W4A8", int8_gemm_pattern(4, 32, False),
                     "4-bit block-32 weight re-quantized to int8 per channel + per-token uint8 asym int8 GEMM"))
    v.append(Variant("w8a16_pc_nbits_acc0", "W8", nbits_pattern(8, None, True, 0),
                     "MatMulNBits bits=8 per channel (block 64), accuracy_level 0"))
    v.append(Variant("w8a16_g128_nbits_acc0", "W8", nbits_pattern(8, 128, True, 0),
                     "MatMulNBits bits=8 block 128, accuracy_level 0"))
    v.append(Variant("w8a8_g128_nbits_acc4", "W8", nbits_pattern(8, 128, True, 4),
                     "MatMulNBits bits=8 block 128, accuracy_level 4"))
    v.append(Variant("w8a8_pc_nbits_acc4", "W8", nbits_pattern(8, None, True, 4),
                     "MatMulNBits bits=8 per channel (block 64), accuracy_level 4"))
    v.append(Variant("*w8a8_pc_tok_asym", "W8", int8_gemm_pattern(8, None, False),
                     "lowbit w8a8: per-channel int8 weight, per-token uint8 asym, MatMulIntegerToFloat"))
    return v


# ---------------------------------------------------------------------------------------
def build_model(variant: Variant, ws: Sequence[np.ndarray], caches: list[dict], k: int):
    inputs = [ir.val(f"x{i}", FLOAT, ["batch", "seq", k]) for i in range(len(ws))]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": OPSET, qlinear.MS_DOMAIN: 1}, name="g")
    outputs, deqs = [], []
    for i, (x, w) in enumerate(zip(inputs, ws)):
        b = NodeBuilder(graph, f"l{i}", "bench", anchor_value=x)
        y, wd = variant.fn(b, x, w, caches[i])
        b.commit()
        y.type = ir.TensorType(FLOAT)
        outputs.append(y)
        deqs.append(wd)
    graph.outputs.extend(outputs)
    graph.sort()
    return ir.to_proto(ir.Model(graph, ir_version=10)), [v.name for v in inputs], deqs


def make_session(model: onnx.ModelProto, threads: int, dump: Path, disabled: Sequence[str]) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.optimized_model_filepath = str(dump)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def run_config(k: int, n: int, t: int, vs: Sequence[Variant], threads: int, rounds: int,
               flush: Callable[[], None] | None) -> list[dict]:
    rng = np.random.default_rng(1000 * k + n)
    outliers = rng.choice(k, size=6, replace=False)
    ws = [random_weight(rng, k, n) for _ in range(N_LINEARS)]
    caches: list[dict] = [{} for _ in ws]
    xs = [realistic_activations(rng, t, k, outliers) for _ in ws]
    refs = [x[0].astype(np.float64) @ w.astype(np.float64) for x, w in zip(xs, ws)]
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in vs:
            row = {"K": k, "N": n, "T": t, "variant": v.name, "group": v.group, "desc": v.desc}
            try:
                model, names, deqs = build_model(v, ws, caches, k)
                dump = Path(tmp) / f"{v.name}.onnx"
                sess = make_session(model, threads, dump, v.disabled)
                feeds = dict(zip(names, xs))
                out = [o.reshape(t, n) for o in sess.run(None, feeds)]
                row["rel_err"] = rel_err(out, refs)
                row["kernel_err"] = rel_err(out, [x[0].astype(np.float64) @ d.astype(np.float64)
                                                  for x, d in zip(xs, deqs)])
                row["weight_only_err"] = rel_err([x[0].astype(np.float64) @ d.astype(np.float64)
                                                  for x, d in zip(xs, deqs)], refs)
                row["kernels"] = kernels_of(dump)
                runs[v.name] = (lambda s=sess, f=feeds: s.run(None, f))
            except Exception as e:  # noqa: BLE001 - a pattern ORT refuses is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    if "fp32" in runs:
        times = time_paired(runs, rounds, "fp32", flush)
        for row in rows:
            row.update(times.get(row["variant"], {}))
    return rows


def to_markdown(rows: Sequence[dict], vs: Sequence[Variant]) -> str:
    configs = sorted({(r["K"], r["N"], r["T"]) for r in rows}, key=lambda c: (c[2], c[0], c[1]))
    by = {(r["variant"], r["K"], r["N"], r["T"]): r for r in rows}
    lines = [("Speedup vs the fp32 MatMul (higher is faster), median of paired runs. Rows marked `*` are "
              "what `lower-ort` emits."), "",
             "| variant | " + " | ".join(f"{k}x{n} T={t}" for k, n, t in configs) + " | error total / kernel (T=128) |",
             "|---|" + "---|" * (len(configs) + 1)]
    for v in vs:
        cells = []
        for c in configs:
            r = by.get((v.name, *c))
            cells.append("refused" if r is None or "error" in r else f"{r.get('speedup', float('nan')):.2f}x")
        errs = [by.get((v.name, k, n, 128)) for k, n, _ in configs]
        errs = [r for r in errs if r is not None and "rel_err" in r]
        err = (f"{max(r['rel_err'] for r in errs):.1e} / {max(r['kernel_err'] for r in errs):.1e}"
               if errs else "-")
        lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {err} |")
    lines += ["", "Kernels ORT runs per linear (optimized graph):", ""]
    seen = set()
    for r in rows:
        key = (r["variant"], r.get("kernels"), r.get("error"))
        if key not in seen:
            seen.add(key)
            lines.append(f"- `{r['variant']}` ({r['desc']}): {r.get('kernels') or r.get('error')}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one shape, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    vs = variants()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = args.rounds or (3 if args.quick else 15)
    start = time.perf_counter()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; timings on a busy machine are noisy", file=sys.stderr)
    flush = CacheFlusher()
    rows: list[dict] = []
    for t in TOKENS:
        for k, n in shapes:
            rows += run_config(k, n, t, vs, args.threads, rounds, flush if t == 1 else None)
            print(f"  done K={k} N={n} T={t} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    md = to_markdown(rows, vs)
    meta = {"loadavg_end": [round(v, 2) for v in os.getloadavg()], "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "threads": args.threads, "linears_per_graph": N_LINEARS, "rounds": rounds,
            "seconds": round(time.perf_counter() - start, 1)}
    prov = {"command": command_line(__spec__.name, argv), "machine": machine_info(), "lowbit_tree": git_state()}
    out = Path(args.out)
    name = "ort_nbits_kernels_quick" if args.quick else "ort_nbits_kernels"
    write_json(out / f"{name}.json", {"meta": meta, "provenance": prov, "rows": rows})
    (out / f"{name}.md").write_text(f"# ORT CPU 4-bit / block-quantized linear kernels\n\n`{prov['command']}`; "
                                    f"{tree_line(prov['lowbit_tree'])}\n\n{json.dumps(meta)}\n\n{md}")
    print(md)
    print(f"wrote {out / name}.json and .md in {meta['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
