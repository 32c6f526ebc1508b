"""Write an artifact directory atomically and exclusively, and read it back verified.

Writing (:class:`ArtifactWriter`): the artifact is built in a temporary sibling of
the output folder (``.OUT.tmp-<pid>-<random>``) and renamed into place only when
everything (model, manifest, summary) is written; an exception or Ctrl-C removes
the temporary folder, so a failed or interrupted compile never leaves a
half-written artifact, and an older artifact at the same path survives until the
new one is complete. Besides:

* an existing artifact is replaced only with ``overwrite=True`` (``--overwrite``),
  checked before any work is done;
* a lock file beside the output (``.OUT.lock``, ``fcntl.flock``) makes a second
  compile into the same folder fail at once, naming the first one's pid; the kernel
  drops the lock of a process that dies, so a stale lock file is simply taken over;
* temporaries that killed compiles left behind (``.NAME.tmp-<pid>-*`` and
  ``.NAME.old-<pid>`` in the output's parent, ``lowbit-ref-<pid>-*`` in the system
  temporary folder) are removed by the next compile, when their pid is dead;
* folders and files get the permissions a plain ``mkdir`` / ``open`` gives under
  the umask (``tempfile.mkdtemp`` would make the artifact folder 0700).

Reading (:func:`check_files`): every loader of an artifact (``lowbit run``, the
backends' runtimes) compares the files it reads with the sha256 the manifest
holds, and refuses a file that is missing, changed, or not listed. Hashing runs
in 1 MiB chunks at the speed of OpenSSL's SHA-256 (about 0.5 s of CPU for 650 MB
on a 2020s x86 core with SHA extensions).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError

MANIFEST = "manifest.json"
MODEL = "model.onnx"
SUMMARY = "summary.txt"
TOKENIZER = "tokenizer"
EXTERNAL_DATA_THRESHOLD = 512 << 20  # keep models below this in one file
CHUNK = 1 << 20  # bytes read at a time when hashing
#: scratch folders a compile makes in the system temporary folder (``scratch_prefix``)
SCRATCH_KINDS = ("ref",)


class IntegrityError(InputError):
    """A file an artifact's manifest lists is missing, changed since the compile, or not listed."""


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
class ArtifactWriter:
    """Context manager giving a temporary folder that becomes ``out`` on :meth:`commit`.

    ``overwrite``: replace an existing artifact at ``out`` (else entering fails before any work).
    Entering also takes the output's lock and removes stale temporaries of dead compiles.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self._lock: OutputLock | None = None

    def __enter__(self) -> ArtifactWriter:
        parent = self.out.parent
        self._check_kind()
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write output {self.out}: {e.strerror or e}") from None
        self._lock = OutputLock(self.out)
        self._lock.acquire()
        try:
            self._check_replace()
            remove_stale_temporaries(parent, own=self.out.name)
            self.tmp = _make_dir(parent, f".{self.out.name}.tmp-{os.getpid()}-")
        except BaseException:
            self._lock.release()
            raise
        return self

    def _check_kind(self) -> None:
        """``out`` is absent, or a folder that is empty or holds an artifact."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output {self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST).exists():
            raise InputError(f"output {self.out} exists, is not empty and is not a lowbit artifact; refusing to replace it")

    def _check_replace(self) -> None:
        """An existing artifact (an empty folder is none) is replaced only with ``overwrite``."""
        if self.overwrite or not self.out.is_dir() or not any(self.out.iterdir()):
            return
        raise InputError(f"output {self.out} already exists; use --overwrite (overwrite=True) to replace it")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.release()

    @property
    def path(self) -> Path:
        assert self.tmp is not None
        return self.tmp

    def save_model(self, model: ir.Model) -> None:
        save_model(model, self.path)

    def commit(self, manifest: dict[str, Any], summary: str) -> Path:
        """Write summary and manifest (with file hashes), then move into place."""
        (self.path / SUMMARY).write_text(summary)
        manifest["files"] = file_table(self.path)
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        self._check_replace()  # something other than a lowbit compile may have made it meanwhile
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        os.replace(self.path, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out


def check_output(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Fail at once, before a compile does any work, where :class:`ArtifactWriter` would: an output
    that is a file or a non-artifact folder, an output another compile is writing (its lock is
    held), or an existing artifact without ``overwrite``."""
    writer = ArtifactWriter(out, overwrite=overwrite)
    writer._check_kind()
    if writer.out.parent.is_dir():
        lock = OutputLock(writer.out)
        lock.acquire()
        lock.release()
    writer._check_replace()


def _make_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/prefix<random>`` with the umask's permissions (not mkdtemp's 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"cannot write into {parent}: {e.strerror or e}") from None
        return path
    raise InputError(f"cannot make a temporary folder in {parent}")


class OutputLock:
    """``.OUT.lock`` beside ``out``, held with ``fcntl.flock`` for the whole compile.

    The file holds the holder's pid, for the error a second compile prints. The
    kernel releases the lock when its process dies, so the lock file of a killed
    compile is taken over by the next one; the holder removes the file on release.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(f".{out.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise InputError(f"cannot write output {self.out}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise InputError(f"cannot lock output {self.out}: {e.strerror or e}") from None
                who = f"pid {holder}" if holder else "another process"
                raise InputError(f"output {self.out} is being written by another compile ({who}; lock file "
                                 f"{self.path}); wait for it to finish or choose another output") from None
            # a holder that released unlinked the file we opened: lock the one at the path now
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    if pid <= 0:
        return True  # not a pid we can judge: leave its files alone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_prefix(kind: str) -> str:
    """Prefix of a compile's scratch folder in the system temp folder: ``lowbit-<kind>-<pid>-``
    (the pid lets a later compile remove it if this process is killed)."""
    return f"lowbit-{kind}-{os.getpid()}-"


_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<tmp>\d+)-.+|old-(?P<old>\d+))$")
_SCRATCH = re.compile(rf"^lowbit-(?:{'|'.join(SCRATCH_KINDS)})-(?P<pid>\d+)-.+$")


def remove_stale_temporaries(parent: Path, scratch: Path | None = None, *, own: str | None = None) -> list[Path]:
    """Remove what killed compiles left: ``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>`` folders in
    ``parent`` and ``lowbit-ref-<pid>-*`` folders in ``scratch`` (default: the system temporary
    folder), each only when it is this user's and its pid is dead. A sibling is also kept while
    NAME's lock is held (a compile on another machine sharing the folder has a pid unknown
    here), unless NAME is ``own``, the output whose lock the caller holds. The folders removed."""
    removed = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for folder, pattern in ((Path(parent), _SIBLING), (Path(scratch or tempfile.gettempdir()), _SCRATCH)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = pattern.match(entry.name)
            if not match:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.is_dir(follow_symlinks=False) or (uid is not None and st.st_uid != uid):
                continue
            groups = match.groupdict()
            pid = int(groups.get("pid") or groups.get("tmp") or groups.get("old"))
            if pid_alive(pid):
                continue
            name = groups.get("name")
            if name is not None and name != own and _locked(Path(folder) / f".{name}.lock"):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _locked(path: Path) -> bool:
    """Whether some process holds the lock file ``path`` (checked without creating or removing it)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep what it guards
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def save_model(model: ir.Model, folder: Path) -> Path:
    """Write ``model`` as ``folder/model.onnx`` (weights in ``model.onnx.data`` past ``EXTERNAL_DATA_THRESHOLD``)."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path = Path(folder) / MODEL
    if size > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{MODEL}.data")
    else:
        ir.save(model, path)
    return path


def sha256(path: Path) -> str:
    """The file's SHA-256, read in ``CHUNK`` (1 MiB) pieces into one buffer."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def load_manifest(artifact: str | os.PathLike) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise InputError(f"{artifact} is not a lowbit artifact (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def file_problems(folder: str | os.PathLike, manifest: dict[str, Any] | None = None,
                  select: Callable[[str], bool] | None = None, required: Iterable[str] = ()) -> list[str]:
    """What is wrong with the files of ``folder`` against its manifest's ``files`` table: one
    message per file that is missing, differs from its recorded size or sha256, or (among those
    ``select`` picks) is on disk but not listed. ``select``: the file names (relative, with ``/``)
    to check, default all; ``required``: names that must be listed. Empty: intact."""
    folder = Path(folder)
    manifest = load_manifest(folder) if manifest is None else manifest
    table = manifest.get("files")
    if not isinstance(table, dict) or not table:
        return [f"{folder / MANIFEST} has no file table (files) to verify the artifact against"]
    select = select or (lambda name: True)
    problems = [f"{folder / name} is not listed in {MANIFEST}, so it cannot be verified"
                for name in required if name not in table]
    for name, info in table.items():
        if not select(name):
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing ({MANIFEST} lists it)")
        elif path.stat().st_size != info.get("bytes", path.stat().st_size) or sha256(path) != info.get("sha256"):
            problems.append(f"{path} does not match its sha256 in {MANIFEST}: the file changed after the compile")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MANIFEST and name not in table and select(name) and name not in required:
            problems.append(f"{path} is not listed in {MANIFEST}, so it cannot be verified")
    return problems


def check_files(folder: str | os.PathLike, manifest: dict[str, Any] | None = None,
                select: Callable[[str], bool] | None = None, required: Iterable[str] = ()) -> None:
    """Raise :class:`IntegrityError` (one line, naming the file) on the first of :func:`file_problems`."""
    problems = file_problems(folder, manifest, select, required)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(f"{problems[0]}{more} (--no-verify skips this check)")


def verify_files(artifact: str | os.PathLike) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing (empty: intact)."""
    folder = Path(artifact)
    manifest = load_manifest(folder)
    bad = []
    for name, info in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file() or sha256(p) != info["sha256"]:
            bad.append(name)
    return bad


def context_length(manifest: dict[str, Any]) -> int | None:
    """The model's context (positions) as the manifest records it (``model.context_length``), or None."""
    value = (manifest.get("model") or {}).get("context_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_context(ids: list[int], max_new_tokens: int, context: int | None, *, truncate: bool = False,
                keep_first: int = 0) -> tuple[list[int], str | None]:
    """The prompt ``ids`` fitted to a generation of ``max_new_tokens`` in ``context`` positions.

    A prompt whose length plus ``max_new_tokens`` exceeds the context is refused
    (:class:`InputError` naming both numbers) unless ``truncate``: then its last tokens are kept
    (after its first ``keep_first``, the BOS) and the note returned says so. ``context`` None:
    no limit known, ``ids`` as given."""
    if max_new_tokens < 0:
        raise InputError(f"max new tokens must be 0 or more, got {max_new_tokens}")
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, None
    room = context - max_new_tokens - keep_first
    if room < 1:
        raise InputError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of "
                         f"{context} tokens; lower --max-new-tokens")
    n = len(ids) - keep_first
    if not truncate:
        plus = " (plus BOS)" if keep_first else ""
        raise InputError(f"the prompt is {n} tokens{plus} and {max_new_tokens} new tokens are asked for: "
                         f"{len(ids) + max_new_tokens} exceeds the model's context of {context} tokens (shorten the "
                         f"prompt, lower --max-new-tokens, or --truncate to keep its last {room} tokens)")
    kept = ids[:keep_first] + ids[len(ids) - room:]
    return kept, (f"prompt truncated to its last {room} of {n} tokens to fit the model's context of {context} "
                  f"tokens with {max_new_tokens} new tokens")


def check_positions(feeds: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse inputs longer than the model's context: any input whose recorded shape has a
    symbolic sequence axis (axis 1, e.g. ``["batch", "seq"]``) and more positions than it."""
    context = context_length(manifest)
    if context is None:
        return
    for spec in manifest.get("inputs") or []:
        shape = spec.get("shape") or []
        value = feeds.get(spec.get("name"))
        positions = value.shape[1] if value is not None and len(getattr(value, "shape", ())) >= 2 else 0
        if len(shape) >= 2 and isinstance(shape[1], str) and positions > context:
            raise InputError(f"input {spec['name']!r} has {positions} positions; the model's context is {context} tokens")
