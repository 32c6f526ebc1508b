"""One quantized matmul on TVM/LLVM: MetaSchedule-tuned (``--tune``) against the untuned default.

The kernel is what ``lowbit compile --backend tvm --tune N`` tunes: the fused int8 linear
(int8 x int8 -> int32 GEMM + zero-point correction + float rescale) of a W8A8 layer,
specialised to batch 1 and ``--seq-len`` rows, SmolLM2-135M's MLP up projection by default
(K=576, N=1536). Both versions are built from the same fused PrimFunc: the untuned one
with the backend's default schedule (dlight's CPU rules, which leave a multi-row GEMM
as plain loops), the tuned one with the best record MetaSchedule found in ``--trials``
trials. Each is timed with TVM's ``time_evaluator``, interleaved, median of rounds.

Usage::

    python -m benchmarks.kernels.tvm_tune_matmul [--k 576] [--n 1536] [--seq-len 128] [--trials 16] [--out benchmarks/out]

Writes ``<out>/tvm_tune_matmul.json`` and ``.md`` and replaces the section "## TVM:
MetaSchedule-tuned kernel vs the default schedule" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    OUT,
    RESULTS_MD,
    command_line,
    git_state,
    interleaved_rounds,
    results_target,
    table,
    tree_line,
    write_outputs,
)

SECTION = "## TVM: MetaSchedule-tuned kernel vs the default schedule"


def fused_kernel(k: int, n: int, seq_len: int):
    """The fused int8-linear PrimFunc of a one-layer W8A8 model at ``[1, seq_len, k]``."""
    import onnx_ir as ir
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.backends.tvm import build, targets, tune
    from lowbit.backends.tvm.lower import LowerToTVMPass
    from lowbit.backends.tvm.relax_import import to_relax
    from lowbit.passes.plan import PlanUniformPass
    from lowbit.passes.quantize_weights import QuantizeWeightsPass

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="up")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    PlanUniformPass(precision="w8a8")(model)
    QuantizeWeightsPass()(model)
    LowerToTVMPass()(model)
    mod, _, _ = to_relax(model)
    mod, _ = tune.specialise(mod, [seq_len])
    tgt = targets.make_target("llvm")
    with tgt:
        fused = tvm.transform.Sequential(list(build._backend_module(tgt).library_dispatch_passes(tgt))
                                         + build.fusion_passes())(mod)
    (name, func), = tune.tuning_tasks(fused)
    return name, func, fused, tgt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--results", default=str(RESULTS_MD), help="markdown file whose section to replace ('': none)")
    args = p.parse_args(argv)
    start = time.perf_counter()

    import tvm

    from lowbit.backends.tvm import tune

    name, func, fused, tgt = fused_kernel(args.k, args.n, args.seq_len)
    untuned = tune.default_schedule(func, tgt)
    with tempfile.TemporaryDirectory(prefix="lowbit-tune-bench-") as work:
        t0 = time.perf_counter()
        info = tune.tune(fused, tgt, Path(work), args.trials)
        tune_s = time.perf_counter() - t0
        db = tune.open_database(Path(work))
        sch = tune.best_schedule(db, func, tune.tuning_target(tgt))
    if sch is None:
        print("MetaSchedule found no valid schedule", file=sys.stderr)
        return 1
    dev = tvm.cpu()
    libs = {"untuned": tune.build_kernel(untuned, tgt), "tuned": tune.build_kernel(sch.mod["main"], tgt)}
    args_ = tune.kernel_inputs(func, dev)
    outs = {}
    for k, lib in libs.items():
        lib["main"](*args_)
        outs[k] = args_[-1].numpy().copy()
    same = bool(np.allclose(outs["tuned"], outs["untuned"], rtol=1e-5, atol=1e-5 * np.abs(outs["untuned"]).max()))
    # interleaved, so a load change on the machine hits both (untuned first in every round)
    ms = interleaved_rounds(list(libs), args.rounds, lambda k: tune.kernel_ms(libs[k], args_, dev, rounds=1), rotate=False)
    r = {"command": command_line(__spec__.name, argv), "lowbit_tree": git_state(),"kernel": name, "shape": {"rows": args.seq_len, "k": args.k, "n": args.n}, "trials": args.trials,
         "tuning_seconds": round(tune_s, 1), "cost_model": info["cost_model"],
         "untuned_ms": float(np.median(ms["untuned"])), "tuned_ms": float(np.median(ms["tuned"])),
         "outputs_match": same, "threads": os.environ.get("TVM_NUM_THREADS"), "loadavg": os.getloadavg()}
    r["speedup"] = r["untuned_ms"] / r["tuned_ms"]
    r["total_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(r, args.out, "tvm_tune_matmul", markdown(r, args), results_target(args.results))
    return 0


def markdown(r: dict, args) -> str:
    sh = r["shape"]
    return "\n".join([
        SECTION, "",
        f"`python -m benchmarks.kernels.tvm_tune_matmul --trials {r['trials']} --seq-len {sh['rows']} --k {sh['k']} --n {sh['n']}` "
        f"(TVM_NUM_THREADS={r['threads']}, load average {r['loadavg'][0]:.1f}; cost model: {r['cost_model']}"
        + (f"; {tree_line(r['lowbit_tree'])}" if r.get("lowbit_tree") else "") + "). "
        f"One fused W8A8 linear kernel ({sh['rows']} x {sh['k']} -> {sh['n']}), MetaSchedule-tuned against the "
        "default (dlight) schedule, timed interleaved with TVM's time_evaluator.", "",
        *table(["kernel", "trials", "tuning s", "untuned ms", "tuned ms", "speedup", "outputs match"],
               [[f"`{r['kernel']}`", r["trials"], f"{r['tuning_seconds']:.0f}", f"{r['untuned_ms']:.3f}", f"{r['tuned_ms']:.3f}",
                 f"{r['speedup']:.2f}x", r["outputs_match"]]]), "",
        "A compile keeps a tuned schedule only where it measures faster than the default "
        "(`tune.keep_faster`; the manifest's `tvm.tuning.timed_ms`).", ""])


if __name__ == "__main__":
    sys.exit(main())
