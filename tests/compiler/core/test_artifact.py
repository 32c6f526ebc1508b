"""core/artifact.py: atomic, exclusive writing (overwrite, lock, stale temporaries, umask) and verified reading."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from lowbit.compiler.core.artifact import (
    ArtifactWriter,
    IntegrityError,
    OutputLock,
    check_files,
    check_output,
    check_positions,
    file_problems,
    fit_context,
    pid_alive,
    remove_stale_temporaries,
    scratch_prefix,
    sha256,
    verify_files,
)
from lowbit.compiler.core.errors import InputError


def _write(out, files=None, **kw):
    """An artifact at ``out`` holding ``files`` (name -> bytes), committed by ArtifactWriter."""
    files = files if files is not None else {"model.onnx": b"model bytes", "tokenizer/tokenizer.model": b"tok"}
    with ArtifactWriter(out, **kw) as w:
        for name, data in files.items():
            (w.path / name).parent.mkdir(parents=True, exist_ok=True)
            (w.path / name).write_bytes(data)
        return w.commit({"backend": "onnxruntime", "model": {"task": "generic"}}, "summary\n")


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


# -- verification --------------------------------------------------------------
def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path):
    import hashlib

    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_intact_artifact_passes_and_one_changed_byte_is_refused_naming_the_file(tmp_path):
    out = _write(tmp_path / "art")
    check_files(out)
    assert file_problems(out) == [] and verify_files(out) == []
    data = bytearray((out / "model.onnx").read_bytes())
    data[3] ^= 0x01  # same size, one bit
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        check_files(out)
    msg = str(e.value)
    assert msg == (f"{out / 'model.onnx'} does not match its sha256 in manifest.json: the file changed after the "
                   "compile (--no-verify skips this check)")
    assert "\n" not in msg and isinstance(e.value, InputError)  # the CLI prints it as one line, exit 2
    assert verify_files(out) == ["model.onnx"]
    # a check limited to the files a loader reads ignores the others
    check_files(out, select=lambda n: n.startswith("tokenizer/"))


def test_missing_listed_file_unlisted_file_and_no_file_table_are_refused(tmp_path):
    out = _write(tmp_path / "art")
    (out / "tokenizer" / "tokenizer.model").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer/tokenizer.model is missing \(manifest.json lists it\)"):
        check_files(out)
    out = _write(tmp_path / "art2")
    (out / "model.onnx.data").write_bytes(b"injected weights")
    with pytest.raises(IntegrityError, match=r"model.onnx.data is not listed in manifest.json, so it cannot be verified"):
        check_files(out)
    check_files(out, select=lambda n: n == "model.onnx")  # a loader that does not read it
    with pytest.raises(IntegrityError, match="lib.so is not listed"):
        check_files(out, select=lambda n: n == "model.onnx", required=("lib.so",))
    m = json.loads((out / "manifest.json").read_text())
    del m["files"]
    with pytest.raises(IntegrityError, match="has no file table"):
        check_files(out, m)


def test_two_problems_are_reported_as_one_line(tmp_path):
    out = _write(tmp_path / "art")
    (out / "model.onnx").write_bytes(b"other")
    (out / "tokenizer" / "tokenizer.model").unlink()
    with pytest.raises(IntegrityError, match=r"model.onnx does not match .* \(and 1 more\) \(--no-verify"):
        check_files(out)
    assert len(file_problems(out)) == 2


def test_verifying_a_135m_int8_model_takes_a_fraction_of_a_second(tmp_path):
    """Hashing is OpenSSL's SHA-256 in 1 MiB chunks (650 MB: about 0.5 s of CPU with SHA extensions).
    CPU time is measured: wall time on a loaded machine is noise."""
    path = tmp_path / "big"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(160))
    start = time.process_time()
    sha256(path)
    assert time.process_time() - start < 0.5  # about 0.12 s with SHA extensions, 0.35 s without


# -- context ---------------------------------------------------------------------
def test_prompt_plus_new_tokens_over_the_context_is_refused_or_truncated():
    ids = [1] + list(range(10, 30))  # BOS + 20 tokens
    assert fit_context(ids, 4, 32, keep_first=1) == (ids, None)
    assert fit_context(ids, 4, None, keep_first=1) == (ids, None)  # no context known: as given
    assert fit_context(ids, 11, 32, keep_first=1) == (ids, None)  # exactly the context
    with pytest.raises(InputError) as e:
        fit_context(ids, 12, 32, keep_first=1)
    assert str(e.value) == ("the prompt is 20 tokens (plus BOS) and 12 new tokens are asked for: 33 exceeds the "
                            "model's context of 32 tokens (shorten the prompt, lower --max-new-tokens, or --truncate "
                            "to keep its last 19 tokens)")
    kept, note = fit_context(ids, 12, 32, truncate=True, keep_first=1)
    assert kept == [1] + list(range(11, 30)) and len(kept) + 12 == 32
    assert note == "prompt truncated to its last 19 of 20 tokens to fit the model's context of 32 tokens with 12 new tokens"
    with pytest.raises(InputError, match="32 new tokens leave no room for a prompt in the model's context of 32"):
        fit_context(ids, 32, 32, truncate=True, keep_first=1)
    with pytest.raises(InputError, match="max new tokens must be 0 or more, got -1"):
        fit_context(ids, -1, 32)


def test_inputs_longer_than_the_context_are_refused():
    m = {"model": {"context_length": 8}, "inputs": [{"name": "input_ids", "shape": ["batch", "seq"]},
                                                     {"name": "scale", "shape": [1, 64]}]}
    check_positions({"input_ids": np.zeros((1, 8), np.int64), "scale": np.zeros((1, 64))}, m)  # static axis: not positions
    with pytest.raises(InputError, match="input 'input_ids' has 9 positions; the model's context is 8 tokens"):
        check_positions({"input_ids": np.zeros((1, 9), np.int64)}, m)
    check_positions({"input_ids": np.zeros((1, 9), np.int64)}, {"model": {}, "inputs": m["inputs"]})  # unknown


# -- writing: overwrite, lock, stale temporaries, permissions --------------------
def test_existing_artifact_is_replaced_only_with_overwrite(tmp_path):
    out = _write(tmp_path / "art")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(InputError) as e:
        _write(out, {"model.onnx": b"new"})
    assert str(e.value) == f"output {out} already exists; use --overwrite (overwrite=True) to replace it"
    with pytest.raises(InputError, match="already exists"):
        check_output(out)
    assert (out / "manifest.json").read_bytes() == before and (out / "model.onnx").read_bytes() == b"model bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary, no lock left
    _write(out, {"model.onnx": b"new"}, overwrite=True)
    assert (out / "model.onnx").read_bytes() == b"new" and not (out / "tokenizer").exists()
    check_output(out, overwrite=True)
    (tmp_path / "empty").mkdir()  # an empty folder is no artifact: nothing to replace
    check_output(tmp_path / "empty")
    _write(tmp_path / "empty")


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lowbit.compiler.core.artifact import OutputLock
    lock = OutputLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    lock.release()
""")


def test_a_second_writer_fails_at_once_naming_the_first_ones_pid(tmp_path):
    out = tmp_path / "art"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        for attempt in (lambda: check_output(out), lambda: _write(out)):
            with pytest.raises(InputError) as e:
                attempt()
            assert str(e.value) == (f"output {out} is being written by another compile (pid {holder.pid}; lock file "
                                    f"{tmp_path / '.art.lock'}); wait for it to finish or choose another output")
        assert time.perf_counter() - start < 1
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / ".art.lock").exists()  # the holder removed it
    _write(out)  # free again


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "art"
    (tmp_path / ".art.lock").write_text(f"{dead_pid()}\n")  # a killed compile's file, its flock gone with it
    _write(out)
    assert (out / "model.onnx").is_file() and not (tmp_path / ".art.lock").exists()


def test_the_lock_is_held_while_writing_and_released_after_a_failure(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), ArtifactWriter(out) as w:
        assert int((tmp_path / ".art.lock").read_text()) == os.getpid()
        with pytest.raises(InputError, match=f"another compile \\(pid {os.getpid()};"):
            OutputLock(out).acquire()
        assert w.path.name.startswith(f".art.tmp-{os.getpid()}-")
        raise RuntimeError("a pass failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary, no lock


def test_stale_temporaries_of_dead_compiles_are_removed_live_ones_kept(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".other.tmp-{dead}-abcd1234", tmp_path / f".art.old-{dead}"]
    kept = [tmp_path / f".other.tmp-{alive}-abcd1234", tmp_path / ".x.tmp-k2j4h5g6",  # a live pid; no pid (older lowbit)
            tmp_path / f"plain.tmp-{dead}-abcd"]  # not a hidden temporary
    for p in stale + kept:
        p.mkdir()
        (p / "model.onnx").write_bytes(b"half written")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / f"lowbit-ref-{dead}-q1w2e3").mkdir()
    (scratch / f"lowbit-ref-{alive}-q1w2e3").mkdir()
    (scratch / f"lowbit-explain-{dead}-q1w2e3").mkdir()  # not a compile's
    removed = remove_stale_temporaries(tmp_path, scratch)
    assert sorted(removed) == sorted(stale + [scratch / f"lowbit-ref-{dead}-q1w2e3"])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert sorted(p.name for p in scratch.iterdir()) == [f"lowbit-explain-{dead}-q1w2e3", f"lowbit-ref-{alive}-q1w2e3"]


def test_a_temporary_whose_output_is_locked_is_kept_whatever_its_pid(tmp_path):
    """A compile on another machine sharing the folder has a pid that means nothing here: its lock decides."""
    dead = dead_pid()
    theirs, ours = tmp_path / f".theirs.tmp-{dead}-1a2b3c4d", tmp_path / f".art.tmp-{dead}-1a2b3c4d"
    theirs.mkdir()
    ours.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "theirs")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    lock = OutputLock(tmp_path / "art")
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock.acquire()
        assert remove_stale_temporaries(tmp_path, tmp_path / "none") == []  # both outputs are locked
        assert remove_stale_temporaries(tmp_path, tmp_path / "none", own="art") == [ours]  # ours: our lock
        assert theirs.exists()
    finally:
        lock.release()
        holder.stdin.close()
        holder.wait(timeout=30)
    assert remove_stale_temporaries(tmp_path, tmp_path / "none") == [theirs]


def test_the_next_write_removes_a_stale_temporary_beside_it(tmp_path):
    stale = tmp_path / f".art.tmp-{dead_pid()}-0a1b2c3d"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    _write(tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_scratch_folders_name_their_process_and_a_live_ones_is_kept(tmp_path):
    assert scratch_prefix("ref") == f"lowbit-ref-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=scratch_prefix("ref"), dir=tmp_path) as tmp:
        assert remove_stale_temporaries(tmp_path / "parent", tmp_path) == []
        assert os.path.isdir(tmp)


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_permissions_follow_the_umask(tmp_path, umask, folder, file):
    old = os.umask(umask)
    try:
        out = _write(tmp_path / "art")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(out) == folder and mode(out / "tokenizer") == folder
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {file}
