"""Nothing wrong passes silently: `lowbit run` / `inspect` verify the artifact's files and the model's
context; `lowbit compile` replaces an artifact only with --overwrite, one compile at a time per output,
and cleans what killed compiles left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.compiler.cli import main
from lowbit.compiler.core.errors import InputError
from tests.cli_support import cli_error
from tests.compiler.core.test_artifact import HOLD_LOCK, dead_pid
from tests.compiler.stories_w8a8 import compiled
from tests.graphs import mlp


@pytest.fixture(scope="module")
def built(shared_dir, tmp_path_factory):
    return compiled(shared_dir, tmp_path_factory)


@pytest.fixture
def art(built, tmp_path):
    """A copy of the stories260K artifact, this test's to damage."""
    return shutil.copytree(built, tmp_path / "art")


def _flip_a_weight_byte(model_path):
    """Flip one bit inside the largest initializer's bytes (the file stays a valid model)."""
    proto = onnx.load(str(model_path))
    raw = max((t.raw_data for t in proto.graph.initializer), key=len)
    data = bytearray(model_path.read_bytes())
    at = data.index(raw[:256]) + 128
    data[at] ^= 0x01
    model_path.write_bytes(bytes(data))


PROMPT = ["--prompt", "Once upon a time", "--max-new-tokens", "8"]


def test_run_refuses_a_changed_byte_of_model_onnx_and_no_verify_runs_it(art, capsys):
    assert main(["run", str(art), *PROMPT]) == 0
    capsys.readouterr()
    _flip_a_weight_byte(art / "model.onnx")
    err = cli_error(capsys, ["run", str(art), *PROMPT])
    assert err == (f"lowbit: error: {art / 'model.onnx'} does not match its sha256 in manifest.json: the file "
                   "changed after the compile (--no-verify skips this check)")
    assert main(["run", str(art), *PROMPT, "--no-verify"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_run_refuses_a_missing_file(art, capsys):
    (art / "tokenizer" / "tokenizer.model").unlink()
    err = cli_error(capsys, ["run", str(art), *PROMPT])
    assert err.endswith(f"{art / 'tokenizer' / 'tokenizer.model'} is missing (manifest.json lists it) "
                        "(--no-verify skips this check)")
    (art / "model.onnx").unlink()
    assert "model.onnx is missing (manifest.json lists it) (and 1 more)" in cli_error(capsys, ["run", str(art), *PROMPT])


def test_inspect_warns_about_a_changed_file_and_says_what_it_verified(art, capsys):
    files = len(json.loads((art / "manifest.json").read_text())["files"])
    (art / "explain.json").write_text("{}")  # written later by `lowbit explain`: not the manifest's
    assert main(["inspect", str(art)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.rstrip().endswith(f"all {files} verified against manifest.json's sha256")
    _flip_a_weight_byte(art / "model.onnx")
    assert main(["inspect", str(art)]) == 0  # inspect reads the manifest: it warns, it does not refuse
    out, err = capsys.readouterr()
    assert err == (f"lowbit: warning: {art / 'model.onnx'} does not match its sha256 in manifest.json: the file "
                   "changed after the compile\n")
    assert "1 problem(s) against manifest.json's sha256" in out
    assert main(["inspect", str(art), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"]["context_length"] == 512 and "model.onnx does not match" in err
    assert main(["inspect", str(art), "--no-verify"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.rstrip().endswith("not verified (--no-verify)")


def _long_prompt(shared_dir, chars=12000):
    return (shared_dir.parent / "data" / "tinystories.txt").read_text()[:chars]


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(art, shared_dir, capsys):
    m = json.loads((art / "manifest.json").read_text())
    assert m["model"]["context_length"] == 512  # llama2.c's seq_len
    prompt = _long_prompt(shared_dir)
    from lowbit.compiler.core.tokenizers import load_tokenizer

    n = len(load_tokenizer(art / "tokenizer").encode(prompt))
    assert n > 512
    start = time.perf_counter()
    err = cli_error(capsys, ["run", str(art), "--prompt", prompt])
    assert err == (f"lowbit: error: the prompt is {n} tokens (plus BOS) and 32 new tokens are asked for: {n + 33} "
                   "exceeds the model's context of 512 tokens (shorten the prompt, lower --max-new-tokens, or "
                   "--truncate to keep its last 479 tokens)")
    assert time.perf_counter() - start < 10  # refused before generating
    # prompt plus new tokens: 500 prompt tokens fit alone, not with 32 more
    words = load_tokenizer(art / "tokenizer").decode(load_tokenizer(art / "tokenizer").encode(prompt)[:500])
    assert "exceeds the model's context of 512 tokens" in cli_error(capsys, ["run", str(art), "--prompt", words])
    assert main(["run", str(art), "--prompt", words, "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["run", str(art), "--prompt", prompt, "--truncate", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert err == (f"lowbit: note: prompt truncated to its last 503 of {n} tokens to fit the model's context of 512 "
                   "tokens with 8 new tokens\n")
    assert not out.startswith(prompt[:40]) and out.strip()  # the head was cut
    assert "leave no room" in cli_error(capsys, ["run", str(art), "--prompt", "hi", "--max-new-tokens", "600"])


def test_inputs_longer_than_the_context_are_refused(art, tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "ok.npz", input_ids=np.ones((1, 512), np.int64))
    np.savez(tmp_path / "long.npz", input_ids=np.ones((1, 513), np.int64))
    assert main(["run", str(art), "--inputs", str(tmp_path / "ok.npz")]) == 0
    capsys.readouterr()
    err = cli_error(capsys, ["run", str(art), "--inputs", str(tmp_path / "long.npz")])
    assert err == "lowbit: error: input 'input_ids' has 513 positions; the model's context is 512 tokens"
    err = cli_error(capsys, ["run", str(art), "--inputs", str(tmp_path / "long.npz"), "--truncate"])
    assert err == "lowbit: error: --truncate applies to --prompt (an --inputs array longer than the context is refused)"


# -- compile: --overwrite, the lock, stale temporaries, permissions -------------
def _digest(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_load(monkeypatch):
    """Make the compile's load step (the export) fail loudly: the checks must stop it earlier."""
    import lowbit.compiler.compilation as compilation

    def load_source(*a, **k):
        raise AssertionError("the compile loaded the model")

    monkeypatch.setattr(compilation, "load_source", load_source)


def test_existing_output_without_overwrite_fails_before_any_work_and_is_left_untouched(art, shared_dir, tmp_path,
                                                                                       capsys, no_load):
    before = _digest(art)
    dump = tmp_path / "dump"
    err = cli_error(capsys, ["-q", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(art),
                          "--dump-ir", str(dump), "--no-latency"])
    assert err == f"lowbit: error: output {art} already exists; use --overwrite (overwrite=True) to replace it"
    assert not dump.exists() and _digest(art) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary, no lock file


def test_a_second_compile_into_a_locked_output_fails_at_once_naming_the_first(shared_dir, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        err = cli_error(capsys, ["-q", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(out),
                              "--overwrite"])
        assert time.perf_counter() - start < 2
        assert err == (f"lowbit: error: output {out} is being written by another compile (pid {holder.pid}; lock "
                       f"file {tmp_path / '.out.lock'}); wait for it to finish or choose another output")
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            lowbit.compile(shared_dir / "stories260K" / "stories260K.bin", out, progress=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not out.exists()


@pytest.fixture
def mlp_onnx(tmp_path):
    path = tmp_path / "src" / "mlp.onnx"
    path.parent.mkdir()
    ir.save(mlp(), path)
    return path


def test_compile_replaces_with_overwrite_and_removes_stale_temporaries(mlp_onnx, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the system temp folder, for this test
    parent = tmp_path / "outs"
    parent.mkdir()
    dead = dead_pid()
    stale = [parent / f".out.tmp-{dead}-1a2b3c4d", parent / f".other.tmp-{dead}-5e6f7a8b", parent / f".out.old-{dead}",
             scratch / f"lowbit-ref-{dead}-x1y2z3"]
    live = [parent / f".out.tmp-{os.getppid()}-1a2b3c4d", scratch / f"lowbit-ref-{os.getppid()}-x1y2z3"]
    for p in stale + live:
        p.mkdir()
        (p / "model.onnx").write_bytes(b"half written by a killed compile")
    (parent / ".out.lock").write_text(f"{dead}\n")  # the killed compile's lock file: taken over
    out = parent / "out"
    first = lowbit.compile(mlp_onnx, out, measure_latency=False, progress=False)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    assert sorted(p.name for p in parent.iterdir()) == sorted(["out", live[0].name])
    assert sorted(p.name for p in scratch.iterdir()) == [live[1].name]  # the compile's own ref folder is gone too
    with pytest.raises(InputError, match="already exists; use --overwrite"):
        lowbit.compile(mlp_onnx, out, measure_latency=False, progress=False)
    second = lowbit.compile(mlp_onnx, out, measure_latency=False, progress=False, overwrite=True,
                            settings={"plan.exclude": ["down"]})
    assert first.manifest["created"] <= second.manifest["created"]
    assert json.loads((out / "manifest.json").read_text())["recipe"] == second.manifest["recipe"]
    precision = lambda m: m["plan"]["layers"]["down"]["precision"]  # noqa: E731
    assert precision(first.manifest) == "w8a8" and precision(second.manifest) == "fp32"


def test_what_a_killed_compile_left_is_removed_by_the_next_one(shared_dir, mlp_onnx, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    parent = tmp_path / "outs"
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "-q", "compile",
                             str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(parent / "big"),
                             "--no-latency"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (list(parent.glob(f".big.tmp-{proc.pid}-*")) and list(scratch.glob(f"lowbit-ref-{proc.pid}-*"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the compile never started writing"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup of its own
        proc.wait()
    left = list(parent.glob(".big.tmp-*")) + list(scratch.glob("lowbit-ref-*"))
    assert len(left) == 2 and (parent / ".big.lock").exists()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    lowbit.compile(mlp_onnx, parent / "small", measure_latency=False, progress=False)  # another output, same parent
    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in parent.iterdir()) == [".big.lock", "small"]
    lowbit.compile(mlp_onnx, parent / "big", measure_latency=False, progress=False)  # its lock is taken over
    assert sorted(p.name for p in parent.iterdir()) == ["big", "small"] and list(scratch.glob("lowbit-*")) == []


def test_artifact_permissions_follow_the_umask(mlp_onnx, tmp_path):
    old = os.umask(0o022)
    try:
        result = lowbit.compile(mlp_onnx, tmp_path / "out", measure_latency=False, progress=False)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(result.path) == 0o755
    assert {p.name: mode(p) for p in result.path.iterdir()} == {
        "model.onnx": 0o644, "manifest.json": 0o644, "summary.txt": 0o644}
