"""CUDA code generation without a GPU: nvcc for sm_80 and sm_90, what the quantized kernels compile to.

No test here launches a kernel (that needs a GPU: see the ``gpu`` marker); they check
the generated code: the int8 GEMMs compile to ``dp4a``, a 4-bit GEMV is one kernel that
reads the packed words (no separate decode writing a float weight), and the fatbin nvcc
built is inside ``lib.so``.
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

def decode_kernels(src: str) -> list[str]:
    return [n for n in cuda.kernel_names(src) if "decode" in n]


def int8_gemms(src: str) -> list[str]:
    """Kernels that multiply int8 codes: a matmul whose body reads ``signed char`` tiles."""
    return [n for n in cuda.kernel_names(src) if "matmul" in n and "signed char" in cuda.kernel_body(src, n)]


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
    funcs = cuda.ptx_functions(ptx)
    if recipe == "w8a8":
        # the int8 GEMMs run on dp4a (4 int8 products per instruction), not on tensor cores
        for name in int8_gemms(src):
            assert "dp4a.s32.s32" in funcs[name], name
            assert "mma." not in funcs[name]


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
