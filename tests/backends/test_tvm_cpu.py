"""The LLVM schedule of int8 GEMMs (lowbit.backends.tvm.cpu): it applies, and it computes what the loops did."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

from lowbit.backends.tvm import build, cpu, tune  # noqa: E402
from lowbit.backends.tvm.lower import LowerToTVMPass  # noqa: E402
from lowbit.backends.tvm.relax_import import to_relax  # noqa: E402
from lowbit.passes.plan import PlanUniformPass  # noqa: E402
from lowbit.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from tests.graphs import mlp  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm"})


def int8_gemm_funcs(k: int, hidden: int, n: int, tokens: int) -> dict:
    """The fused int8 GEMM PrimFuncs of a W8A8 MLP (up [k -> hidden], down [hidden -> n], side [k -> n])."""
    model = mlp(seed=0, k=k, hidden=hidden, n=n)
    model.graph.inputs[0].shape = ir.Shape([1, tokens, k])
    PlanUniformPass(precision="w8a8")(model)
    QuantizeWeightsPass()(model)
    LowerToTVMPass()(model)
    mod, _, _ = to_relax(model)
    with TARGET:
        fused = tvm.transform.Sequential(list(build._backend_module(TARGET).library_dispatch_passes(TARGET))
                                         + build.fusion_passes())(mod)
    return {gv.name_hint: f for gv, f in fused.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint and 'int8"' in f.script()}


@pytest.mark.parametrize("hidden", [96, 172])  # down's K: a multiple of 32, and ragged
def test_int8_gemm_schedule_applies_and_is_exact(hidden):
    funcs = int8_gemm_funcs(64, hidden, 48, tokens=13)  # 13 rows: the row tiles of 8 are ragged too
    assert len(funcs) == 3
    dev = tvm.cpu()
    for name, func in funcs.items():
        scheduled = cpu.schedule_int8_gemm(func)
        assert scheduled is not None, name
        assert "tirx.is_scheduled" in scheduled.attrs
        script = scheduled.script()
        assert "T.parallel" in script, name
        args = tune.kernel_inputs(func, dev)
        ref = [a.numpy() for a in args]
        tune.build_kernel(func, TARGET)["main"](*args)
        want = args[-1].numpy().copy()
        args = [tvm.runtime.tensor(a, dev) for a in ref]
        tune.build_kernel(scheduled, TARGET)["main"](*args)
        np.testing.assert_array_equal(args[-1].numpy(), want, err_msg=name)


def test_the_build_uses_it_on_llvm_and_leaves_other_functions_to_dlight():
    funcs = int8_gemm_funcs(64, 96, 48, tokens=4)
    func = next(iter(funcs.values()))
    with TARGET:
        assert build.default_schedule(func, TARGET).script() == cpu.schedule_int8_gemm(func).script()
    assert tune.default_schedule(func, TARGET).script() == cpu.schedule_int8_gemm(func).script()
    # a float matmul is not an int8 GEMM: no schedule from here
    a = tvm.te.placeholder((4, 32), "float32", name="a")
    w = tvm.te.placeholder((16, 32), "float32", name="w")
    kk = tvm.te.reduce_axis((0, 32), name="k")
    c = tvm.te.compute((4, 16), lambda i, j: tvm.te.sum(a[i, kk] * w[j, kk], axis=kk), name="c")
    assert cpu.schedule_int8_gemm(tvm.te.create_prim_func([a, w, c])) is None
