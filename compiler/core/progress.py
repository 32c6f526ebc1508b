"""Progress that stays out of the way: bars on a terminal, a plain line now and then in logs, nothing with ``--quiet``.

Two kinds of progress, both on stderr (stdout keeps only results):

* :func:`progress` wraps a loop (``for x in progress(items, desc="calibrating", unit="windows")``);
* :func:`step` wraps a step without a loop (``with step("pass 3/10 rotate"): ...``).

On a terminal, steps and loops are transient tqdm bars (a step's shows its elapsed
time, ticking); they vanish when done. When stderr is not a terminal (a pipe, a log,
CI) they are plain lines, ``[lowbit] pass 3/10 rotate``, ``[lowbit] calibrating:
16/32 windows, 8 s, about 8 s left``: a step's line when it starts (and how long it
took, if it took a while), a loop's line at most every :data:`INTERVAL` seconds, and a
``still running`` line from the innermost step when nothing was printed for
:data:`HEARTBEAT` seconds. ``set_quiet(True)`` (``--quiet``) silences all of it;
``enabled=False`` silences one call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
PREFIX = "[lowbit] "
#: plain mode: seconds between two lines of one loop, and a step shorter than this prints no "done" line
INTERVAL = 5.0
#: plain mode: the innermost step says it is still running after this long without a line
HEARTBEAT = 30.0

_QUIET = False
_lock = threading.RLock()
_last_line = 0.0  # time.monotonic() of the last plain line
_steps: list[object] = []  # the steps running, innermost last


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def active(enabled: bool = True) -> bool:
    """Whether progress is shown at all (not ``--quiet``, not disabled by the caller)."""
    return enabled and not _QUIET


def on_terminal() -> bool:
    """Bars (stderr is a terminal) or plain lines (a pipe, a file, a notebook)."""
    try:
        return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0", "false", "False")
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def duration(seconds: float) -> str:
    """``8 s``, ``2 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def say(message: str, *, enabled: bool = True) -> None:
    """One line (``[lowbit] message``) on stderr, terminal or not; between bars on a terminal."""
    if not active(enabled):
        return
    if on_terminal():
        _tqdm().write(PREFIX + message, file=sys.stderr)
    else:
        _line(message)


def _tqdm() -> Any:
    """tqdm, imported when a bar is first shown: tqdm reads its ``TQDM_*`` settings from the environment when
    imported, so the CLI can still turn third parties' bars off (``TQDM_DISABLE``) after importing this module."""
    from tqdm.auto import tqdm

    return tqdm


def _line(message: str) -> None:
    global _last_line
    with _lock:
        try:
            print(PREFIX + message, file=sys.stderr, flush=True)
        except (ValueError, OSError):  # stderr closed
            pass
        _last_line = time.monotonic()


# ---------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------
def progress(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None,
             unit: str = "") -> Iterable[T]:
    """``items``, showing how far the loop got: a bar on a terminal, a line every few seconds otherwise."""
    if not active(enabled):
        return items
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if on_terminal():
        return _tqdm()(items, desc=desc, total=total, unit=f" {unit}" if unit else "it", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
    return _plain_loop(items, desc, total, unit)


def _plain_loop(items: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    printed = False
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= INTERVAL and (total is None or done < total):
            _line(_loop_text(desc, done, total, unit, now - start))
            last, printed = now, True
    if printed:  # a loop that said where it was says it finished; a short one stays silent
        _line(_loop_text(desc, done, total, unit, time.monotonic() - start))


def _loop_text(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    unit = f" {unit}" if unit else ""
    if total is None:
        return f"{desc}: {done}{unit}, {duration(elapsed)}"
    text = f"{desc}: {done}/{total}{unit}, {duration(elapsed)}"
    if 0 < done < total:
        text += f", about {duration(elapsed * (total - done) / done)} left"
    return text


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
class Step:
    """A running step (:func:`step`); usable as a context manager, or with :meth:`begin` and :meth:`end`."""

    def __init__(self, desc: str, *, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = active(enabled)
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._bar = None
        self._thread: threading.Thread | None = None
        self._terminal = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def begin(self) -> Step:
        if not self.enabled or self._thread is not None:
            return self
        self.start = time.monotonic()
        self._terminal = on_terminal()
        if self._terminal:
            self._bar = _tqdm()(total=None, desc=self.desc, bar_format="{desc} ({elapsed})", leave=False,
                             file=sys.stderr, dynamic_ncols=True)
            target = self._tick_terminal
        else:
            _line(self.desc)
            target = self._tick_plain
        with _lock:
            _steps.append(self)
        self._thread = threading.Thread(target=target, name=f"lowbit-progress: {self.desc}", daemon=True)
        self._thread.start()
        return self

    def end(self, ok: bool = True) -> None:
        """Stop showing the step; in logs, say how long it took if it took a while (and did not fail)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with _lock:
            if self in _steps:
                _steps.remove(self)
        if self._terminal:
            self._bar.close()
        elif ok and self.elapsed() >= INTERVAL:
            _line(f"{self.desc}: done in {duration(self.elapsed())}")

    def __enter__(self) -> Step:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(ok=exc_type is None)

    def _tick_terminal(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):  # a bar closed under us: nothing to show
                self._bar.refresh()

    def _tick_plain(self) -> None:
        while not self._stop.wait(1.0):
            with _lock:
                innermost = bool(_steps) and _steps[-1] is self
                quiet_for = time.monotonic() - _last_line
            if innermost and quiet_for >= HEARTBEAT:
                _line(f"{self.desc}: still running, {duration(self.elapsed())}")


def step(desc: str, *, enabled: bool = True) -> Step:
    """Show that ``desc`` is running (``with step("load"): ...``): a transient bar with its elapsed time on a
    terminal; otherwise its line now, ``still running`` lines while it stays silent, and its time when it took
    a while."""
    return Step(desc, enabled=enabled)
