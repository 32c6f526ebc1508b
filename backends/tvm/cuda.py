"""CUDA code generation on a machine that may have no GPU: nvcc, fatbin in the library, PTX for inspection.

``tvm.compile`` for CUDA hands the generated source to ``tvm_callback_cuda_compile``
and wraps the binary in a CUDA runtime module, which lives in
``libtvm_runtime_cuda.so``. That library links against the driver (``libcuda.so.1``);
without a driver it cannot load and TVM keeps only CUDA *source* in the module, which
no runtime can launch. So, as a CUDA toolkit's ``stubs/libcuda.so`` does for linking,
:func:`device_compile` loads a stub driver when the real one is absent (every entry
point returns ``CUDA_ERROR_NO_DEVICE``; built once with the C compiler into
``~/.cache/lowbit``), then compiles with ``TVM_CUDA_COMPILE_MODE=nvcc``: nvcc turns the
source into a fatbin for the target's ``sm_XX``, embedded in ``lib.so``, which the TVM
runtime loads on a GPU machine. The CUDA source is kept beside it (``kernels.cu``) for
inspection; :func:`compile_source` compiles it again (PTX or cubin, any arch) for tests
and for checking which instructions the int8 kernels use.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lowbit.compiler.core.errors import InputError

SOURCE = "kernels.cu"
_STUB_SYMBOLS = (  # the driver entry points libtvm_runtime_cuda.so imports
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)
_LOADED = False


def find_nvcc() -> str:
    """Path of nvcc (PATH, then ``$CUDA_HOME/bin``), or an InputError saying what is missing."""
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if found is None and Path(home, "bin", "nvcc").is_file():
        found = str(Path(home, "bin", "nvcc"))
    if found is None:
        raise InputError("--target cuda needs nvcc (the CUDA toolkit) to compile the kernels; none on PATH or in "
                         f"$CUDA_HOME ({home}/bin)")
    return found


def nvcc_version() -> str:
    out = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([0-9.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def _stub_driver() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / "cuda-stub"
    lib = cache / "libcuda.so.1"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise InputError("--target cuda on a machine without a CUDA driver needs a C compiler (cc) to build a stub driver")
    src = "\n".join(f"int {s}(void) {{ return 100; }}" for s in _STUB_SYMBOLS) + "\n"
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        (Path(tmp) / "stub.c").write_text("/* no CUDA driver: every call reports CUDA_ERROR_NO_DEVICE */\n" + src)
        out = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(Path(tmp) / "stub.c")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InputError(f"cannot build the stub CUDA driver: {proc.stderr.strip()[:300]}")
        os.replace(out, lib)
    return lib


def load_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime module support (with a stub driver if needed); True if it had to stub."""
    global _LOADED
    import tvm

    if _LOADED or tvm.get_global_func("ffi.Module.load_from_bytes.cuda", True) is not None:
        _LOADED = True
        return False
    runtime_cuda = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    stubbed = False
    try:
        ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        if "libcuda.so" not in str(e):
            raise InputError(f"cannot load TVM's CUDA runtime ({runtime_cuda.name}): {e}") from None
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_GLOBAL)
        stubbed = True
    _LOADED = True
    return stubbed


@contextlib.contextmanager
def device_compile(target):
    """Context for ``tvm.compile`` to CUDA: runtime loaded, nvcc as the device compiler, ``target`` current."""
    find_nvcc()
    load_cuda_runtime()
    import tvm.support.nvcc  # noqa: F401 - registers tvm_callback_cuda_compile

    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        with target:
            yield
    finally:
        if old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


def cuda_source(ex) -> str:
    """The CUDA C source of an executable's device module."""
    stack = [ex.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        stack.extend(m.imports)
    raise InputError("the compiled module has no CUDA device code")


def export(ex, target, out: Path, lib_name: str) -> dict[str, Any]:
    """Write ``lib_name`` (host code + fatbin) and ``kernels.cu``; facts about the device code for the manifest."""
    LIB = lib_name
    src = cuda_source(ex)
    ex.export_library(str(out / LIB))
    (out / SOURCE).write_text(src)
    lib = (out / LIB).read_bytes()
    return {
        "arch": target.attrs["arch"],
        "nvcc": nvcc_version(),
        "fatbin_embedded": b"\x50\xed\x55\xba" in lib,  # the fatbin header magic 0xBA55ED50
        "kernels": len(kernel_names(src)),
        "files": [SOURCE],
    }


def kernel_names(src: str) -> list[str]:
    """``__global__`` functions of ``src``, each once (the source declares them before defining them)."""
    return list(dict.fromkeys(re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? (\w+)\(', src)))


def kernel_body(src: str, name: str) -> str:
    """The definition of ``__global__`` function ``name`` in ``src`` (empty if absent)."""
    m = re.search(r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? ' + re.escape(name) + r"\([^;{]*\{", src)
    if m is None:
        return ""
    depth, i = 1, m.end()
    while depth and i < len(src):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return src[m.start():i]


def compile_source(src: str, arch: str, fmt: str = "ptx") -> bytes:
    """Compile CUDA source with nvcc for ``arch`` (``sm_80``...) to ``ptx``, ``cubin`` or ``fatbin``."""
    if fmt not in ("ptx", "cubin", "fatbin"):
        raise ValueError(f"fmt must be ptx, cubin or fatbin, not {fmt!r}")
    with tempfile.TemporaryDirectory(prefix="lowbit-nvcc-") as tmp:
        path, out = Path(tmp) / SOURCE, Path(tmp) / f"out.{fmt}"
        path.write_text(src)
        proc = subprocess.run([find_nvcc(), f"-{fmt}", f"-arch={arch}", "-O3", "-w", "-o", str(out), str(path)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InputError(f"nvcc failed for {arch}: {proc.stderr.strip()[-500:]}")
        return out.read_bytes()


def compile_cubin_and_ptx(src: str, arch: str) -> tuple[bytes, str]:
    """One nvcc run for ``arch``: the cubin (ptxas ran) and the PTX it was assembled from."""
    with tempfile.TemporaryDirectory(prefix="lowbit-nvcc-") as tmp:
        path, out = Path(tmp) / SOURCE, Path(tmp) / "out.cubin"
        path.write_text(src)
        keep = Path(tmp) / "keep"
        keep.mkdir()
        proc = subprocess.run([find_nvcc(), "-cubin", f"-arch={arch}", "-O3", "-w", "-keep", f"-keep-dir={keep}",
                               "-o", str(out), str(path)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InputError(f"nvcc failed for {arch}: {proc.stderr.strip()[-500:]}")
        ptx = next(keep.glob("*.ptx"))
        return out.read_bytes(), ptx.read_text()


def ptx_functions(ptx: str) -> dict[str, str]:
    """PTX ``.entry`` name -> its body."""
    out, starts = {}, [(m.start(), m.group(1)) for m in re.finditer(r"\.entry (\w+)\(", ptx)]
    for i, (pos, name) in enumerate(starts):
        out[name] = ptx[pos:starts[i + 1][0] if i + 1 < len(starts) else len(ptx)]
    return out
