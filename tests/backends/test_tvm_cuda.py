"""CUDA code generation without a GPU: nvcc for sm_80 and sm_90, what the quantized kernels compile to.

No test here launches a kernel (that needs a GPU: see the ``gpu`` marker); they check
the generated code: the int8 GEMMs whose shapes allow it compile to tensor-core
``mma.sync ... m16n8k32 ... .s8.s8`` and the others to ``dp4a``, as the build info
records, a 4-bit GEMV is one kernel that reads the packed words (no separate decode
writing a float weight), and the fatbin nvcc built is inside ``lib.so``.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc (CUDA toolkit) not installed", allow_module_level=True)

from lowbit.backends.tvm import build, cuda  # noqa: E402
from lowbit.backends.tvm.lower import LowerToTVMPass  # noqa: E402
from lowbit.compiler.cli import main  # noqa: E402
from tests.backends.test_tvm_lower import SHAPE, quantized  # noqa: E402
from tests.backends.tvm_support import exported_once  # noqa: E402

MMA_S8 = "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"


def decode_kernels(src: str) -> list[str]:
    return [n for n in cuda.kernel_names(src) if "decode" in n]


def int8_gemms(src: str) -> list[str]:
    """Kernels that multiply int8 codes: a matmul whose body reads ``signed char`` tiles."""
    return [n for n in cuda.kernel_names(src) if "matmul" in n and "signed char" in cuda.kernel_body(src, n)]


def assert_int8_schedules(src: str, int8_kernels: dict, ptx: str) -> None:
    """Each int8 GEMM kernel is listed once, under "mma" or "dp4a", and its PTX (from ``src``) uses that."""
    listed = {f"{name}_kernel": kind for kind, names in int8_kernels.items() for name in names}
    assert sorted(listed) == sorted(int8_gemms(src))
    funcs = cuda.ptx_functions(ptx)
    for name, kind in listed.items():
        if kind == "mma":  # tensor cores: 16x8x32 int8 products per instruction, operands by ldmatrix
            mmas = re.findall(r"mma\.sync\.aligned\.[\w.]+", funcs[name])
            assert mmas and set(mmas) == {MMA_S8}, (name, set(mmas))
            assert "ldmatrix" in funcs[name] and "dp4a" not in funcs[name], name
        else:  # SIMT: dp4a (4 int8 products per instruction)
            assert "dp4a.s32.s32" in funcs[name], name
            assert "mma." not in funcs[name], name


@pytest.fixture(scope="module")
def stories(shared_dir, tmp_path_factory):
    """stories260K w8a8 and w4a16 compiled for CUDA sm_90 through the command line (small calibration)."""
    root = tmp_path_factory.mktemp("tvm-cuda")
    out = {}
    for recipe in ("w8a8", "w4a16"):
        folder = root / recipe
        with exported_once():
            assert main(["--quiet", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(folder),
                         "--recipe", recipe, "--backend", "tvm", "--target", "cuda", "--arch", "sm_90", "--no-latency",
                         "--set", "calibration.samples=4", "--set", "evaluation.samples=2"]) == 0
        out[recipe] = folder
    return out


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_stories_cuda_artifact_embeds_nvcc_output_and_compiles_for_sm80_and_sm90(stories, recipe):
    folder = stories[recipe]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["backend"] == "tvm" and m["tvm"]["target"] == "cuda -arch=sm_90"
    assert m["tvm"]["cuda"]["fatbin_embedded"] and m["tvm"]["cuda"]["arch"] == "sm_90"
    assert "GPU" in m["accuracy"]["note"]  # no GPU here: not measured, and the manifest says so
    src = (folder / cuda.SOURCE).read_text()
    if recipe == "w8a8":
        gemms = int8_gemms(src)
        assert len(gemms) >= 5  # qkv, o, gate/up, down, LM head shapes
    else:
        # every decode is fused into its matmul: no kernel only decodes
        decodes = decode_kernels(src)
        assert decodes and all("matmul" in n for n in decodes)
    # sm_90: nvcc built the fatbin inside lib.so; sm_80: the same source through nvcc and ptxas here
    cubin, ptx = cuda.compile_cubin_and_ptx(src, "sm_80")
    assert cubin[:4] == b"\x7fELF" and ".target sm_80" in ptx
    if recipe == "w8a8":
        # dim-64 projections and the 512-wide LM head: tensor cores; hidden 172 (gate/up N, down K): dp4a
        kernels = m["tvm"]["int8_kernels"]
        assert len(kernels["mma"]) >= 2 and len(kernels["dp4a"]) >= 2, kernels
        assert_int8_schedules(src, kernels, ptx)


def w8a8_mlp(k: int, hidden: int, n: int) -> ir.Model:
    """up [k -> hidden], relu, down [hidden -> n], + side [k -> n]; W8A8, activations [B, T, k] (symbolic)."""
    from lowbit.passes.plan import PlanUniformPass
    from lowbit.passes.quantize_weights import QuantizeWeightsPass

    from tests.graphs import mlp

    model = mlp(seed=0, k=k, hidden=hidden, n=n)
    PlanUniformPass(precision="w8a8")(model)
    QuantizeWeightsPass()(model)
    LowerToTVMPass()(model)
    return model


@pytest.fixture(scope="module", params=[128, 172], ids=["hidden128", "hidden172"])
def int8_mlp(request, tmp_path_factory):
    """The W8A8 MLP (k = n = 64) compiled for sm_80: hidden 128 fits the tensor-core schedule everywhere;
    hidden 172 makes up's N and down's K fit neither N % 16 nor K % 32."""
    out = tmp_path_factory.mktemp(f"int8-{request.param}")
    result = build.build(w8a8_mlp(64, request.param, 64), out, target="cuda", arch="sm_80")
    return request.param, (out / cuda.SOURCE).read_text(), result.info


def _by_layer(src: str, names: list[str]) -> list[str]:
    """The layers (up, down, side) whose weight the kernels of PrimFuncs ``names`` read."""
    layers = []
    for name in names:
        signature = cuda.kernel_body(src, f"{name}_kernel").split("{")[0]
        layers += [layer for layer in ("up", "down", "side") if f"_{layer}_w_q_ptr" in signature]
    return sorted(layers)


def test_int8_gemms_take_tensor_cores_where_k_and_n_allow(int8_mlp):
    hidden, src, info = int8_mlp
    kernels = info["int8_kernels"]
    if hidden == 128:  # K 64/128/64, N 128/64/64: all on mma
        assert _by_layer(src, kernels["mma"]) == ["down", "side", "up"] and kernels["dp4a"] == []
    else:  # up: N = 172 (not a multiple of 16), down: K = 172 (not a multiple of 32)
        assert _by_layer(src, kernels["mma"]) == ["side"]
        assert _by_layer(src, kernels["dp4a"]) == ["down", "up"]
    assert info["unscheduled_kernels"] == []
    ptx = cuda.compile_source(src, "sm_80", "ptx").decode()
    assert ".target sm_80" in ptx
    assert_int8_schedules(src, kernels, ptx)
    funcs = cuda.ptx_functions(ptx)
    for name in kernels["mma"]:
        assert "cp.async" in funcs[f"{name}_kernel"]  # the weight tiles: asynchronous copies (tirx.use_async_copy)


def test_int8_tensor_core_kernels_build_for_sm90(int8_mlp):
    _, src, info = int8_mlp
    fatbin = cuda.compile_source(src, "sm_90", "fatbin")
    assert fatbin[:4] == b"\x50\xed\x55\xba"
    ptx = cuda.compile_source(src, "sm_90", "ptx").decode()
    funcs = cuda.ptx_functions(ptx)
    assert all(MMA_S8 in funcs[f"{name}_kernel"] for name in info["int8_kernels"]["mma"])


def test_tensor_core_schedule_needs_cuda_sm80():
    from lowbit.backends.tvm import mma

    assert not mma.supports(tvm.target.Target({"kind": "cuda", "arch": "sm_75"}))
    assert mma.supports(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))
    assert mma.supports(tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}))
    assert not mma.supports(tvm.target.Target("llvm"))


def _fused(model, target):
    from lowbit.backends.tvm.relax_import import to_relax

    mod, _, _ = to_relax(model)
    with target:
        passes = list(build._backend_module(target).library_dispatch_passes(target)) + build.fusion_passes()
        return tvm.transform.Sequential(passes)(mod)


def test_a_failing_tensor_core_schedule_falls_back_to_dp4a(monkeypatch, caplog):
    from lowbit.backends.tvm import mma

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    fused = _fused(w8a8_mlp(64, 128, 64), target)

    def broken(func):
        raise tvm.error.InternalError("tensorize failed")

    monkeypatch.setattr(mma, "schedule_int8_gemm", broken)
    for kind in build.INT8_KERNELS.values():
        kind.clear()
    with caplog.at_level("INFO", logger="lowbit"), target:
        out = build._int8_gemm_schedule(target)(fused)
    assert build.INT8_KERNELS["mma"] == [] and len(build.INT8_KERNELS["dp4a"]) == 3
    assert "tensor-core schedule failed, dp4a instead: tensorize failed" in caplog.text
    for name in build.INT8_KERNELS["dp4a"]:
        attrs = out[name].attrs
        assert "dlight.do_not_tensorize" in attrs and "tirx.is_scheduled" not in attrs


@pytest.fixture(scope="module")
def gemv_w4(tmp_path_factory):
    """A 4-bit (groups of 32) linear stack at one token, compiled for sm_90: the decoding case."""
    model = quantized("w4a16", group=32)
    model.graph.inputs[0].shape = ir.Shape([1, 1, SHAPE["k"]])
    LowerToTVMPass()(model)
    out = tmp_path_factory.mktemp("gemv")
    result = build.build(model, out, target="cuda", arch="sm_90")
    return out, result


def test_4bit_gemv_is_one_fused_kernel_reading_packed_words(gemv_w4):
    out, result = gemv_w4
    src = (out / cuda.SOURCE).read_text()
    decodes = decode_kernels(src)
    assert len(decodes) == 3 and all("matmul" in n for n in decodes)  # up, down, side: one kernel each
    for name in decodes:
        body = cuda.kernel_body(src, name)
        signature = body[: body.index("{")]
        params = re.findall(r"(\w+)\* __restrict__ (\w+)", signature)
        # reads the packed words and the group scales: no float [N, K] weight is passed in (and no kernel
        # writes one: there is no decode-only kernel)
        assert [name for kind, name in params if kind == "uint"] == [n for _, n in params if n.endswith("w_packed_ptr")]
        assert len([1 for kind, _ in params if kind == "uint"]) == 1
        kinds = [kind for kind, _ in params]
        # output, activation, scales (+ the other operand of a fused epilogue such as the residual add)
        assert kinds.count("uint") == 1 and kinds.count("float") in (3, 4) and len(kinds) in (4, 5), params
        assert any(n.endswith("w_scale_ptr") for _, n in params)
    assert not any(n.startswith("lowbit_decode") for n in cuda.kernel_names(src))
    assert result.info["cuda"]["fatbin_embedded"]
    ptx = cuda.compile_source(src, "sm_80", "ptx").decode()
    assert all(n in cuda.ptx_functions(ptx) for n in decodes)


def test_cuda_without_nvcc_is_an_input_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code = main(["compile", "model.onnx", "-o", str(tmp_path / "out"), "--backend", "tvm", "--target", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--target cuda needs nvcc" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_stories_cuda_artifact_runs_on_a_gpu(stories):
    from lowbit.backends.tvm.runtime import TVMModel

    model = TVMModel(stories["w8a8"])
    logits = model.run({"input_ids": np.array([[1, 403, 407]], np.int64)})["logits"]
    assert logits.shape == (1, 3, 512) and np.isfinite(logits).all()
