"""``core.progress``: plain lines when stderr is not a terminal (a line every few seconds at most), nothing when quiet."""

from __future__ import annotations

import time

import pytest

from lowbit.compiler.core import progress as P
from lowbit.compiler.core.pipeline import ShowProgress, run_pipeline
from tests.graphs import mlp


@pytest.fixture(autouse=True)
def plain(monkeypatch):
    """Not a terminal (pytest captures stderr), not quiet, whatever an earlier test left."""
    monkeypatch.setattr(P, "_QUIET", False)
    monkeypatch.setattr(P, "on_terminal", lambda: False)


def lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert all(line.startswith(P.PREFIX) for line in err.splitlines()), err
    return [line[len(P.PREFIX):] for line in err.splitlines()]


def test_a_short_loop_is_silent_and_a_long_one_prints_a_line_every_interval(monkeypatch, capsys):
    assert list(P.progress(range(5), desc="calibrating", unit="windows")) == list(range(5))
    assert lines(capsys) == []  # faster than INTERVAL: the enclosing step's line says enough
    monkeypatch.setattr(P, "INTERVAL", 0.05)
    for _ in P.progress(range(4), desc="calibrating", unit="windows"):
        time.sleep(0.06)
    out = lines(capsys)
    assert out[0].startswith("calibrating: 1/4 windows, 0 s, about 0 s left")
    assert out[-1].startswith("calibrating: 4/4 windows") and "left" not in out[-1]
    assert len(out) <= 4


def test_loop_lines_are_throttled(monkeypatch, capsys):
    monkeypatch.setattr(P, "INTERVAL", 0.2)
    start = time.monotonic()
    for _ in P.progress(range(40), desc="smoothing"):
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    assert len(lines(capsys)) <= elapsed / 0.2 + 1  # at most one per INTERVAL, plus the last


def test_a_step_prints_its_line_a_heartbeat_and_its_time(monkeypatch, capsys):
    monkeypatch.setattr(P, "INTERVAL", 0.1)
    monkeypatch.setattr(P, "HEARTBEAT", 1.0)
    with P.step("load smollm2-135m"):
        time.sleep(2.5)
    out = lines(capsys)
    assert out[0] == "load smollm2-135m"
    assert any(line.startswith("load smollm2-135m: still running, ") for line in out[1:-1])
    assert out[-1].startswith("load smollm2-135m: done in ")


def test_a_failed_step_says_no_done(monkeypatch, capsys):
    monkeypatch.setattr(P, "INTERVAL", 0.0)
    with pytest.raises(RuntimeError), P.step("export"):
        raise RuntimeError("boom")
    assert lines(capsys) == ["export"]


def test_quiet_and_disabled_print_nothing(monkeypatch, capsys):
    monkeypatch.setattr(P, "INTERVAL", 0.0)
    P.set_quiet(True)
    try:
        with P.step("load"):
            assert list(P.progress(range(3), desc="calibrating")) == [0, 1, 2]
        P.say("hello")
    finally:
        P.set_quiet(False)
    with P.step("load", enabled=False):
        list(P.progress(range(3), desc="calibrating", enabled=False))
    assert capsys.readouterr().err == ""


def test_the_pipeline_instrument_names_each_pass_in_order(capsys):
    from lowbit.passes import CanonicalizePass, FuseSharedInputLinearsPass

    passes = [CanonicalizePass(), FuseSharedInputLinearsPass()]
    shown = ShowProgress(len(passes))
    run_pipeline(mlp(), passes, instruments=[shown])
    assert lines(capsys) == ["pass 1/2 canonicalize", "pass 2/2 fuse-linears"]


def test_duration():
    assert P.duration(8.4) == "8 s" and P.duration(125) == "2 min 05 s" and P.duration(3720) == "1 h 02 min"
