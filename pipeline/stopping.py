"""How a command stops on a signal: SIGTERM is an exception, as Ctrl-C is.

Python turns SIGINT (Ctrl-C) into KeyboardInterrupt, so a command interrupted at the keyboard
runs its finally blocks: fold locks released, fold processes stopped, the exit line of the
run's log.txt written. SIGTERM -- what `kill`, `docker stop`, SLURM's time limit and torchrun
(stopping its workers) send -- ends a Python process on the spot by default, with
none of that. `stop_on_signals()`, around every CLI command, makes SIGTERM raise
`errors.Terminated` (a KeyboardInterrupt), so both take the same paths; the CLI prints
`stopped_line` and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

Once a command is stopping, a further SIGTERM is ignored: a fold process under SLURM or a
process-group kill gets the group's SIGTERM and then its parent's, and the second must not
break off the cleanup the first started. A further Ctrl-C still raises, as Python's own
handler does. A process forked from this one (a DataLoader worker) keeps the default actions:
SIGTERM ends it on the spot, as before.

`stop_with_parent()`: a fold process asks Linux to send it SIGTERM when the process that
started it dies, however it died (a SIGKILLed parent runs no cleanup of its own).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading

from pipeline.errors import Terminated

# Set by a parent in its fold processes' environment: the pid they stop with (stop_with_parent).
PARENT_PID_ENV = "PIPELINE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _StopHandler:
    """SIGTERM -> Terminated and SIGINT -> KeyboardInterrupt in the process that installed it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stopping = False

    def __call__(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked child inherited the handler: the default action
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGTERM and self.stopping:
            return  # already stopping: let the cleanup under way finish
        self.stopping = True
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM raises Terminated (see the module docstring); the previous
    handlers come back after it. SIGINT is taken over only from Python's default handler, and a
    signal this process was started with ignored (nohup) stays ignored. Only the main thread
    can set handlers: elsewhere (an embedding program's worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _StopHandler()
    saved: dict[int, object] = {}
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (None, signal.SIG_IGN):  # None: a handler set outside Python, kept
        saved[signal.SIGTERM] = previous
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        saved[signal.SIGINT] = previous
    try:
        for signum in saved:
            signal.signal(signum, handler)
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def signal_of(exc: KeyboardInterrupt) -> signal.Signals:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's status for a process ended by the signal: 128 + its number (130, 143)."""
    return 128 + int(signal_of(exc))


def stopped_line(exc: KeyboardInterrupt, argv: list[str], *, fold_process: bool = False) -> str:
    """The one line a command stopped by a signal prints: which signal, during which command,
    and the command that goes on from where it stopped (the same one: complete folds and stages
    are skipped, a fold resumes from its last.pt; with --restart or --force it redoes their work)."""
    signum = signal_of(exc)
    what = f"{'terminated' if signum == signal.SIGTERM else 'interrupted'} ({signum.name})"
    if fold_process:
        return f"{what}: a fold process; the command that started it resumes the fold"
    verb = "rerun with" if {"--restart", "--force"} & set(argv) else "resume with"
    return f"{what} during {argv[0] if argv else 'start-up'}; {verb}: python -m pipeline {shlex.join(argv)}"


def stop_with_parent() -> None:
    """Have Linux send this process SIGTERM when the process that started it dies (prctl
    PR_SET_PDEATHSIG), when that parent named itself in PARENT_PID_ENV: a fold process whose
    parent was SIGKILLed stops too (as Terminated: its line, exit 143, its last.pt kept). The
    signal follows the parent *thread* that started this process: train_folds starts each fold
    process from a pool thread that lives until the process ends. Elsewhere (macOS, no libc) a
    no-op. A parent already gone before the prctl (no signal would ever come) is Terminated now."""
    expected = os.environ.get(PARENT_PID_ENV, "")
    if not expected.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):
        raise Terminated()
