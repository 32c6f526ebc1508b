"""benchmarks.harness: tables, RESULTS.md sections, provenance, the reuse rule, the method
registry and the order of interleaved timing. Fast: no model is exported or compiled."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.harness import MethodRegistry


# ---------------------------------------------------------------------------------------
# Tables and targets
# ---------------------------------------------------------------------------------------
def test_table_header_separator_and_rows():
    lines = harness.table(["method", "ms"], [["fp32", "1.00"], ["int8", 2]])
    assert lines == ["| method | ms |", "|---|---|", "| fp32 | 1.00 |", "| int8 | 2 |"]


def test_table_keeps_preformatted_rows():
    failed = harness.failed_row("ORT", "RuntimeError: a | b" + "x" * 200, 4)
    lines = harness.table(["a", "b", "c", "d"], [failed, ["1", "2", "3", "4"]])
    assert lines[2] == failed
    assert failed.startswith("| ORT | FAILED: RuntimeError: a / b")  # a pipe would split the cell
    assert failed.endswith(" | |")
    assert failed.count("|") == 5  # as many cells as the header
    assert len(failed) < 150  # the error is cut


def test_fmt_ms_and_target_line():
    assert harness.fmt_ms({"ms": 1.234, "speedup": 2.0}) == "1.23 (2.00x)"
    assert harness.fmt_ms(None) == "—"
    assert harness.fmt_ms({"ms": 1.0}) == "1.00 (nanx)"
    assert harness.target_line(True, "x") == "**PASS** — x"
    assert harness.target_line(False, "x") == "**FAIL** — x"
    assert harness.target_line(None, "x") == "**N/A** — x"


# ---------------------------------------------------------------------------------------
# RESULTS.md sections
# ---------------------------------------------------------------------------------------
RESULTS = """# Benchmark results

## int8: lowbit vs ORT

old int8 text

| a | b |
|---|---|

## TVM backend: LLVM vs ONNX Runtime

tvm backend text

## TVM: tuned kernel

old tuned text
"""


def test_update_results_replaces_one_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    harness.update_results(path, "## TVM: tuned kernel\n\nnew tuned text\n")
    harness.update_results(path, "## int8: lowbit vs ORT\n\nnew int8 text\n")
    text = path.read_text()
    assert "old" not in text
    assert text.index("new int8 text") < text.index("tvm backend text") < text.index("new tuned text")  # order kept
    assert "tvm backend text" in text  # a heading that shares a prefix is another section
    assert text.count("## ") == 3
    assert text.endswith("new tuned text\n")
    assert "\n\n\n" not in text


def test_update_results_appends_a_new_section_and_creates_the_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    harness.update_results(path, "## Held-out check\n\nrows\n")
    text = path.read_text()
    assert text.startswith(RESULTS.rstrip("\n"))
    assert text.endswith("\n\n## Held-out check\n\nrows\n")

    fresh = tmp_path / "new.md"
    harness.update_results(fresh, "## One\n\ntext\n")
    assert fresh.read_text() == "# Benchmark results\n\n## One\n\ntext\n"


def test_update_results_is_idempotent(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    harness.update_results(path, "## TVM backend: LLVM vs ONNX Runtime\n\nsame\n")
    once = path.read_text()
    harness.update_results(path, "## TVM backend: LLVM vs ONNX Runtime\n\nsame\n")
    assert path.read_text() == once


def test_results_target(tmp_path):
    assert harness.results_target(None) == harness.RESULTS_MD
    assert harness.results_target(None, quick=True) is None
    assert harness.results_target(tmp_path / "x.md", quick=True) == tmp_path / "x.md"
    assert harness.results_target("") is None  # '' on the command line: no section written
    assert harness.RESULTS_MD == harness.REPO / "benchmarks" / "RESULTS.md"


def test_write_outputs_json_markdown_and_section(tmp_path, capsys):
    import numpy as np

    results = {"total_seconds": 60.0, "value": np.float32(1.5), "path": Path("a/b"), "rounds": (1, 2)}
    md = "## Section\n\n| a |\n|---|\n| 1 |\n"
    target = tmp_path / "RESULTS.md"
    harness.write_outputs(results, tmp_path, "stem", md, target)
    assert json.loads((tmp_path / "stem.json").read_text()) == {"total_seconds": 60.0, "value": 1.5, "path": "a/b",
                                                                "rounds": [1, 2]}
    assert (tmp_path / "stem.md").read_text() == md
    assert "## Section" in target.read_text()
    assert "| 1 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "a.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("out/\n")
    _git(root, "add", "a.py", ".gitignore")
    _git(root, "commit", "-q", "-m", "one")
    return root


def test_git_state_clean_modified_untracked(repo):
    state = harness.git_state(repo)
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert state["commit_full"] == head and head.startswith(state["commit"])
    assert state["dirty"] is False and state["modified_files"] == [] and state["untracked_files"] == []

    (repo / "out").mkdir()
    (repo / "out" / "artifact.onnx").write_text("ignored")  # ignored files do not count
    assert harness.git_state(repo)["dirty"] is False

    (repo / "new.py").write_text("y = 2\n")
    state = harness.git_state(repo)
    assert state["dirty"] is True and state["untracked_files"] == ["new.py"] and state["modified_files"] == []

    (repo / "new.py").unlink()
    (repo / "a.py").write_text("x = 2\n")
    state = harness.git_state(repo)
    assert state["dirty"] is True and state["modified_files"] == ["a.py"]


def test_git_state_outside_a_repository(tmp_path):
    (tmp_path / "plain").mkdir()
    assert harness.git_state(tmp_path / "plain") == {}


def test_command_line_is_the_module_invocation():
    assert harness.command_line("benchmarks.compare_int8", ["--quick", "--models", "a b"]) == \
        "python -m benchmarks.compare_int8 --quick --models 'a b'"
    assert harness.command_line("benchmarks.kernels.ort_linear_kernels", []) == \
        "python -m benchmarks.kernels.ort_linear_kernels"


def test_run_record_and_provenance_lines(monkeypatch):
    tree = {"commit": "abc1234", "commit_full": "abc1234" + "0" * 33, "dirty": True,
            "modified_files": ["passes/plan.py"], "untracked_files": ["notes.txt"]}
    monkeypatch.setattr(harness, "git_state", lambda repo=None: tree)
    record = harness.run_record("benchmarks.compare_4bit", ["--quick"], {"rounds": 2})
    assert record["command"] == "python -m benchmarks.compare_4bit --quick"
    assert record["settings"] == {"rounds": 2} and record["models"] == {}
    assert record["lowbit_tree"] == tree
    assert {"cores", "cpu", "python"} <= set(record["machine"])
    assert {"lowbit", "onnxruntime", "numpy"} <= set(record["versions"])
    assert len(record["load_average_at_start"]) == 3
    harness.finish_record(record)
    lines = harness.provenance_lines(record)
    assert lines[0] == "Command: `python -m benchmarks.compare_4bit --quick`  "
    tree_line = next(line for line in lines if line.startswith("lowbit tree:"))
    assert tree_line == "lowbit tree: commit abc1234 + uncommitted changes in passes/plan.py, notes.txt (untracked)  "
    assert lines[-1].startswith("Total runtime: ")


def test_provenance_lines_of_an_old_record_without_untracked_files():
    record = {"command": "python benchmarks/compare_int8.py", "date": "d", "total_seconds": 60.0,
              "versions": {"onnxruntime": "1", "lowbit": "0.1", "torch": "2"},
              "machine": {"python": "3.11", "cores": 2, "cpu": "c"}, "lowbit_tree": {"commit": "76e1414", "modified_files": []}}
    lines = harness.provenance_lines(record)
    assert "lowbit tree: commit 76e1414  " in lines


# ---------------------------------------------------------------------------------------
# Reuse: only an artifact the same clean commit built
# ---------------------------------------------------------------------------------------
def tree(commit: str = "a" * 40, modified: tuple[str, ...] = (), untracked: tuple[str, ...] = ()) -> dict:
    return {"commit": commit[:7], "commit_full": commit, "dirty": bool(modified or untracked),
            "modified_files": list(modified), "untracked_files": list(untracked)}


@pytest.fixture
def built(tmp_path, monkeypatch):
    """An artifact folder stamped by a build in tree ``state`` (a function: state -> folder)."""

    def build(state: dict, start: dict | None = None) -> Path:
        folder = tmp_path / "artifact"
        folder.mkdir(exist_ok=True)
        (folder / "model.onnx").write_text("model")
        monkeypatch.setattr(harness, "git_state", lambda repo=None: state)
        harness.stamp_artifact(folder, start)
        return folder

    return build


def test_reuse_by_the_same_clean_commit(built):
    folder = built(tree())
    stamp = json.loads((folder / harness.STAMP).read_text())
    assert stamp["commit_full"] == "a" * 40 and stamp["dirty"] is False
    assert harness.check_reuse(folder, tree()) is None
    assert harness.reuse_allowed(folder, tree())


def test_reuse_refused_from_another_commit(built):
    folder = built(tree("b" * 40))
    reason = harness.check_reuse(folder, tree("a" * 40))
    assert reason == "built by commit bbbbbbb, this tree is at aaaaaaa"


def test_reuse_refused_when_the_building_tree_was_dirty(built):
    folder = built(tree(modified=("passes/plan.py",)))
    assert json.loads((folder / harness.STAMP).read_text())["dirty"] is True
    reason = harness.check_reuse(folder, tree(modified=("passes/plan.py",)))  # even by the same dirty tree
    assert reason is not None and "uncommitted changes" in reason and "passes/plan.py" in reason
    folder = built(tree(untracked=("passes/new_pass.py",)))
    assert "passes/new_pass.py" in harness.check_reuse(folder, tree())


def test_reuse_refused_when_this_tree_is_dirty(built):
    folder = built(tree())
    reason = harness.check_reuse(folder, tree(modified=("compiler/driver.py",)))
    assert reason == "this tree has uncommitted changes (compiler/driver.py)"
    assert harness.check_reuse(folder, tree(untracked=("x.py",))) is not None


def test_reuse_ignores_the_benchmarks_own_results_file(built):
    folder = built(tree(modified=("benchmarks/RESULTS.md",)))
    assert harness.check_reuse(folder, tree(modified=("benchmarks/RESULTS.md",))) is None


def test_reuse_refused_when_the_tree_changed_during_the_build(built):
    folder = built(tree(), start=tree("c" * 40))
    stamp = json.loads((folder / harness.STAMP).read_text())
    assert stamp["dirty"] is True and stamp["changed_during_run"]["at_start"]["commit_full"] == "c" * 40
    assert harness.check_reuse(folder, tree()) == "the tree changed while it was built (commit ccccccc at the start, aaaaaaa at the end)"
    folder = built(tree(), start=tree(modified=("passes/rotate.py",)))
    assert "with uncommitted changes at the start" in harness.check_reuse(folder, tree())


def test_reuse_refused_without_a_stamp_or_without_git(tmp_path, built, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_text("model")
    assert "missing" in harness.check_reuse(bare, tree())
    assert not harness.reuse_allowed(bare, tree())
    assert "not reusing" in capsys.readouterr().out

    (bare / harness.STAMP).write_text("{not json")
    assert "unreadable" in harness.check_reuse(bare, tree())

    folder = built({})  # built where git could not tell the commit
    assert "outside a git tree" in harness.check_reuse(folder, tree())
    folder = built(tree())
    assert "unknown" in harness.check_reuse(folder, {})


def test_clear_stamp_forgets_the_builder(built):
    folder = built(tree())
    harness.clear_stamp(folder)
    assert not (folder / harness.STAMP).exists()
    harness.clear_stamp(folder)  # nothing to clear: fine
    assert harness.check_reuse(folder, tree()) is not None


# ---------------------------------------------------------------------------------------
# Method registry
# ---------------------------------------------------------------------------------------
def test_registry_order_labels_and_lookup():
    reg = MethodRegistry()

    @reg.register("ort-dynamic", label="ORT quantize_dynamic")
    def ort(x):
        return {"path": x, "quantize_seconds": 0.5}

    returned = reg.register("lowbit-w8a8", lambda x: {"path": x * 2})
    assert callable(returned)
    assert reg.names() == list(reg) == ["ort-dynamic", "lowbit-w8a8"]
    assert len(reg) == 2 and "ort-dynamic" in reg and "fp32" not in reg
    assert reg.labels() == {"ort-dynamic": "ORT quantize_dynamic", "lowbit-w8a8": "lowbit-w8a8"}
    assert reg.label("fp32") == "fp32"
    assert reg["ort-dynamic"].fn is ort
    with pytest.raises(ValueError, match="twice"):
        reg.register("ort-dynamic", ort)
    with pytest.raises(KeyError, match="unknown method 'nope'.*ort-dynamic, lowbit-w8a8"):
        reg["nope"]
    assert reg.run("ort-dynamic", 3, prefix="m: ") == {"path": 3, "quantize_seconds": 0.5}
    assert reg.run("lowbit-w8a8", x=4) == {"path": 8}


def test_registry_run_turns_a_failure_into_a_result(capsys):
    reg = MethodRegistry()

    @reg.register("broken")
    def broken():
        raise RuntimeError("ORT refused the model\nsecond line")

    info = reg.run("broken", prefix="stories260K: ")
    assert info["error"] == "RuntimeError: ORT refused the model"
    assert "Traceback" in info["traceback"]
    assert "stories260K: broken: FAILED" in capsys.readouterr().out


def test_compare_scripts_register_the_methods_they_always_had():
    from benchmarks import compare_4bit, compare_int8

    assert compare_int8.METHODS == ["fp32", "ort-dynamic", "ort-static-qdq", "lowbit-w8a8"]
    assert compare_int8.LABELS["ort-static-qdq"] == "ORT quantize_static (QDQ)"
    assert compare_4bit.METHODS == ["fp32", "ort-default", "ort-rtn", "ort-hqq", "ort-gptq", "ort-default-head",
                                    "lowbit-w4a16", "lowbit-w4a8", "lowbit-w4a8-toggled", "lowbit-w8a8"]
    assert "lowbit-w4a8-toggled" not in compare_4bit.LABELS  # labelled by its rotation instead
    assert harness.e2e_settings(False) == {"calib_samples": 32, "eval_samples": 16, "rounds": 6, "repeats": {1: 10, 128: 3}}
    assert harness.e2e_settings(True) == {"calib_samples": 4, "eval_samples": 4, "rounds": 2, "repeats": {1: 3, 128: 2}}


# ---------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------
def test_rotated():
    assert harness.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert harness.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert harness.rotated([], 3) == []


def test_interleaved_rounds_rotate_the_starting_method():
    calls = []
    per = harness.interleaved_rounds(["fp32", "a", "b"], 4, lambda n: calls.append(n) or float(len(calls)))
    assert calls == ["fp32", "a", "b", "a", "b", "fp32", "b", "fp32", "a", "fp32", "a", "b"]
    assert per == {"fp32": [1.0, 6.0, 8.0, 10.0], "a": [2.0, 4.0, 9.0, 11.0], "b": [3.0, 5.0, 7.0, 12.0]}
    calls.clear()
    harness.interleaved_rounds(["x", "y"], 2, lambda n: calls.append(n) or 0.0, rotate=False)
    assert calls == ["x", "y", "x", "y"]


def test_summarize_rounds_medians_and_ratios():
    lat = harness.summarize_rounds({"fp32": [10.0, 12.0, 30.0], "int8": [5.0, 4.0, 6.0]})
    assert lat["fp32"] == {"ms": 12.0, "best_round_ms": 10.0, "round_medians_ms": [10.0, 12.0, 30.0], "speedup": 1.0}
    assert lat["int8"]["ms"] == 5.0 and lat["int8"]["best_round_ms"] == 4.0 and lat["int8"]["speedup"] == 12.0 / 5.0
    assert harness.ratio(lat, "int8", "fp32") == 12.0 / 5.0
    assert harness.ratio(lat, "fp32", "int8") == 5.0 / 12.0
    assert harness.ratio(lat, "int8", "missing") is None
    no_ref = harness.summarize_rounds({"a": [1.0], "b": [2.0]})
    assert "speedup" not in no_ref["a"]


def test_latency_round_robin_interleaves_sessions(monkeypatch):
    from lowbit.compiler.core import evaluate

    ms = {"fp32": 0.004, "lowbit": 0.001, "ort": 0.002}
    calls = []

    def fake_latency(session, feed, repeats, warmup):
        calls.append((session, len(feed["input_ids"]), repeats, warmup))
        return ms[session]

    monkeypatch.setattr(evaluate, "median_latency", fake_latency)
    sessions = {name: name for name in ms}
    feeds = {1: {"input_ids": [0]}, 128: {"input_ids": [0] * 128}}
    lat = harness.latency_round_robin(sessions, feeds, rounds=3, repeats={1: 5, 128: 2})
    assert [c[0] for c in calls[:9]] == ["fp32", "lowbit", "ort", "lowbit", "ort", "fp32", "ort", "fp32", "lowbit"]
    assert {(c[1], c[2]) for c in calls} == {(1, 5), (128, 2)} and all(c[3] == 1 for c in calls)
    assert lat["T=1"]["lowbit"]["ms"] == pytest.approx(1.0) and lat["T=128"]["lowbit"]["speedup"] == pytest.approx(4.0)
    assert harness.ratio(lat["T=1"], "lowbit", "ort") == pytest.approx(2.0)
    assert harness.latency_settings(3, {1: 5})["intra_op_num_threads"] == harness.THREADS


def test_time_paired_pairs_each_variant_with_the_reference():
    now = [0.0]
    cost = {"fp32": 4.0, "a": 2.0, "b": 1.0}
    calls = []

    def runner(name):
        def run():
            calls.append(name)
            now[0] += cost[name]
        return run

    flushes = []
    out = harness.time_paired({n: runner(n) for n in cost}, rounds=3, flush=lambda: flushes.append(1), reps=2,
                              clock=lambda: now[0])
    timed = calls[6:]  # after two warm-up runs each
    pairs = [tuple(dict.fromkeys(timed[i:i + 4])) for i in range(0, len(timed), 4)]
    # round 0: reference first, variants a then b; round 1: variant first, b then a; round 2: reference first, a, b
    assert pairs == [("fp32", "a"), ("fp32", "b"), ("b", "fp32"), ("a", "fp32"), ("fp32", "a"), ("fp32", "b")]
    assert len(flushes) == len(timed)
    assert out["fp32"]["speedup"] == 1.0 and out["fp32"]["ms"] == 4000.0
    assert out["a"]["speedup"] == 2.0 and out["b"]["speedup"] == 4.0 and out["b"]["speedup_iqr"] == [4.0, 4.0]
