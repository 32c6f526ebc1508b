"""Every benchmark script imports and shows ``--help`` when run as a module, and the
repository cites benchmark files by paths that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [f"benchmarks.{n}" for n in benchmarks.E2E] + [f"benchmarks.kernels.{n}" for n in benchmarks.KERNELS]
NEEDS_TVM = {"benchmarks.tvm_backend", "benchmarks.kernels.tvm_tune_matmul"}


def test_every_script_is_listed():
    on_disk = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"__init__", "__main__", "harness"}
    assert on_disk == set(benchmarks.E2E)
    on_disk = {p.stem for p in (REPO / "benchmarks" / "kernels").glob("*.py")} - {"__init__"}
    assert on_disk == set(benchmarks.KERNELS)


@pytest.fixture(scope="module")
def tvm_available() -> bool:
    if importlib.util.find_spec("tvm") is None:
        return False
    try:
        import tvm  # noqa: F401
    except Exception:  # an installed but broken TVM counts as absent
        return False
    return True


@pytest.mark.parametrize("module", SCRIPTS)
def test_help(module, tvm_available):
    if module in NEEDS_TVM and not tvm_available:
        pytest.skip("import tvm fails")
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage: ")
    assert "--out" in p.stdout or "--results" in p.stdout


def test_no_sys_path_hacks():
    for path in (REPO / "benchmarks").rglob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_cited_benchmark_paths_exist():
    """``benchmarks/<...>.py`` in code, docs and recipes names a file that exists (lines that list
    a run's changed files are history, not citations)."""
    cited = re.compile(r"benchmarks/[\w/]+\.py")
    files = [p for d in ("benchmarks", "compiler", "passes", "backends", "models", "lowbit") for p in (REPO / d).rglob("*")
             if p.suffix in (".py", ".md", ".toml") and "out" not in p.relative_to(REPO).parts]
    files += [p for p in REPO.glob("*.md")]
    missing = []
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("lowbit tree:") or "uncommitted changes in" in line:
                continue
            missing += [f"{path.relative_to(REPO)}: {m}" for m in cited.findall(line) if not (REPO / m).is_file()]
    assert not missing
