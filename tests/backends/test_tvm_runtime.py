"""The TVM runtime refuses what it must not run: changed or missing files (sha256 of the manifest),
prompts and inputs longer than the model's context; it still loads without the compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tvm")

from lowbit.backends.tvm.runtime import Artifact, TVMModel  # noqa: E402
from lowbit.compiler.cli import main  # noqa: E402
from lowbit.compiler.core.artifact import IntegrityError  # noqa: E402
from lowbit.compiler.core.errors import InputError  # noqa: E402
from tests.backends.tvm_support import exported_once  # noqa: E402
from tests.cli_support import cli_error


@pytest.fixture(scope="module")
def tvm_art(shared_dir, tmp_path_factory):
    """stories260K w8a8 for TVM on LLVM (small calibration, no latency)."""
    out = tmp_path_factory.mktemp("tvm-runtime") / "art"
    with exported_once():
        assert main(["--quiet", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(out),
                     "--backend", "tvm", "--no-latency", "--set", "calibration.samples=4",
                     "--set", "evaluation.samples=2"]) == 0
    return out


@pytest.fixture
def art(tvm_art, tmp_path):
    import shutil

    return shutil.copytree(tvm_art, tmp_path / "art")


PROMPT = ["--prompt", "Once upon a time", "--max-new-tokens", "8"]


def test_changed_params_are_refused_and_no_verify_loads_them(art, capsys):
    params = art / "params.bin"
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0x01
    params.write_bytes(bytes(data))
    err = cli_error(capsys, ["run", str(art), *PROMPT])
    assert err == (f"lowbit: error: {params} does not match its sha256 in manifest.json: the file changed after "
                   "the compile (--no-verify skips this check)")
    with pytest.raises(IntegrityError, match="params.bin does not match"):
        TVMModel(art)
    assert main(["run", str(art), *PROMPT, "--no-verify"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
    TVMModel(art, verify=False)


def test_missing_library_and_unlisted_tokenizer_file_are_refused(art, capsys):
    (art / "tokenizer" / "tokenizer.json").write_text("{}")  # a file the tokenizer loader might prefer
    assert "tokenizer.json is not listed in manifest.json" in cli_error(capsys, ["run", str(art), *PROMPT])
    (art / "tokenizer" / "tokenizer.json").unlink()
    (art / "lib.so").unlink()
    err = cli_error(capsys, ["run", str(art), *PROMPT])
    assert err.endswith(f"{art / 'lib.so'} is missing (manifest.json lists it) (--no-verify skips this check)")
    m = json.loads((art / "manifest.json").read_text())
    del m["files"]["params.bin"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="params.bin is not listed in manifest.json"):
        Artifact(art)


def test_context_is_enforced_for_prompts_and_inputs(tvm_art, shared_dir, capsys):
    m = json.loads((tvm_art / "manifest.json").read_text())
    assert m["model"]["context_length"] == 512
    prompt = (shared_dir.parent / "data" / "tinystories.txt").read_text()[:12000]
    assert "exceeds the model's context of 512 tokens" in cli_error(capsys, ["run", str(tvm_art), "--prompt", prompt])
    assert main(["run", str(tvm_art), "--prompt", prompt, "--truncate", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("lowbit: note: prompt truncated to its last 507 of ") and out.strip()
    model = TVMModel(tvm_art)
    assert model.context_length == 512
    with pytest.raises(InputError, match="input 'input_ids' has 513 positions; the model's context is 512 tokens"):
        model.run({"input_ids": np.ones((1, 513), np.int64)})


RUNTIME_ONLY = textwrap.dedent("""
    import os, sys
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    from lowbit.backends.tvm.runtime import TVMModel
    TVMModel(sys.argv[1])  # verified
    print(sorted(m for m in sys.modules if m == "lowbit.compiler" or m.startswith("lowbit.compiler.")))
""")


def test_verification_needs_no_compiler(tvm_art):
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(tvm_art)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
