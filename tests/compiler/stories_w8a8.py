"""One stories260K compile (recipe ``w8a8-plain``: int8 with no smoothing or rotation, the
setting the error attribution is specified for; with IR dumps and the kept reference), shared
by the diff, explain, inspect and report tests so the suite compiles it once.

Not a conftest: the fixture lives in each test module and calls :func:`compiled`, which
caches per process.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.compiler.cli import main

RECIPE = "w8a8-plain"
_CACHE: dict = {}


def compiled(shared_dir: Path, tmp_path_factory) -> Path:
    """The artifact folder; its IR dumps are in the sibling folder ``dump``."""
    if "artifact" not in _CACHE:
        root = tmp_path_factory.mktemp("stories-w8a8")
        out, dump = root / "art", root / "dump"
        code = main([
            "--quiet", "compile", str(shared_dir / "stories260K" / "stories260K.bin"), "-o", str(out), "--recipe", RECIPE,
            "--calib-data", str(shared_dir.parent / "data" / "tinystories.txt"), "--dump-ir", str(dump),
            "--no-latency", "--keep-reference",
        ])
        assert code == 0
        _CACHE["artifact"] = out
    return _CACHE["artifact"]


def explained(artifact: Path) -> dict:
    """``explain`` results for the shared artifact (default options), computed once."""
    if "explain" not in _CACHE:
        from lowbit.compiler.explain import explain

        _CACHE["explain"] = explain(artifact, progress=False)
    return _CACHE["explain"]
