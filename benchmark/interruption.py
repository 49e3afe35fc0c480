"""Interruption is not failure: SIGINT (Ctrl-C), SIGTERM (``kill``, ``scancel``, preemption) and
SIGUSR2 (submitit's time-limit and preemption signal) stop a run between two statements of its
main thread, as a :class:`RunInterrupted` exception.

The exception unwinds the trial in flight before its record is written, so that trial is simply
not recorded and runs again on resume; every trial already recorded stays. On its way out it
passes through the attack's isolation layer, which ends the attack's worker. Whoever started the
run decides what the interruption means: ``leakbench run`` exits with 128 + the signal number; a
sweep job hands the signal on to submitit, which requeues the job on SIGUSR2 (see
:mod:`leakbench.sweep.launch`).

Only the first signal raises: a second Ctrl-C while the run unwinds is ignored, so that the
clean-up (ending workers, closing records) is never cut short.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class RunInterrupted(BaseException):  # noqa: N818 (an interruption, like KeyboardInterrupt)
    """A signal stopped the run; the trial in flight was dropped, not recorded.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on its way out (an
    attack's, a trial's) may take it for a failure of the code it passes through.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal."""
        return 128 + self.signum


_received: list[int] = []  # the signal of the interruption under way, once one has come
# The signals the current run takes: those not ignored when it began (``nohup``, ``cmd &`` in a
# script: an ignored SIGINT stays ignored, as Python itself leaves it).
_taken: list[int] = list(INTERRUPTING_SIGNALS)


def _raise(signum: int, frame: FrameType | None) -> None:
    if _received:  # the run is already unwinding: let it finish doing so
        return
    _received.append(signum)
    raise RunInterrupted(signum)


def received() -> int | None:
    """The signal that interrupted the current run, if one did."""
    return _received[0] if _received else None


def take_signals() -> None:
    """(Re-)install the handlers that raise :class:`RunInterrupted`.

    Lightning installs its own SIGTERM handler for each ``Trainer.test`` (it broadcasts to the
    other ranks from inside the handler, which can deadlock a rank blocked in a barrier); the
    evaluator calls this when a test starts, and Lightning restores ours when it ends.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in _taken:
            signal.signal(signum, _raise)


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, the interrupting signals raise :class:`RunInterrupted` in the main
    thread; the handlers found on entry are restored on exit (also by the interruption)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only reach the main thread; a run in another thread is not ours to stop
        return
    previous: dict[int, Callable[..., Any] | int | None] = {
        signum: signal.getsignal(signum) for signum in INTERRUPTING_SIGNALS
    }
    _received.clear()
    _taken[:] = [signum for signum, handler in previous.items() if handler != signal.SIG_IGN]
    take_signals()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, parents first (Linux' /proc; none where there is none)."""
    children: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(word) for word in path.read_text().split()]
        except OSError:
            continue  # the thread or the process ended meanwhile
    return [p for child in children for p in (child, *_descendants(child))]


def end_process(code: int) -> None:
    """End this process and every process below it, at once, with exit status ``code``.

    For a process whose run was interrupted and has closed its records: Python's teardown of
    torch's thousands of modules takes seconds on a busy machine, here and in the attack's fork
    server alike, so it is skipped, and what it would have ended (workers, the fork server) is
    killed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(code & 0xFF)
