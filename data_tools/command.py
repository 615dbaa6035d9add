"""How a command line ends: the user's errors, a full disk, Ctrl-C and a stop signal in one line each
(no traceback: the input, the machine or the user, not a bug), anything else with its traceback. The
one way for the ``data_tools``, ``pretrain`` and ``finetune`` commands (training runs end in the
engine, which says its errors the same way and takes the stop signals itself while it trains)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from data_tools.files import storage_problem

EXIT_REFUSED = 2  # a command line, config or input refused
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C
# SIGHUP: the terminal hung up (an ssh connection dropped); it reaches every process of the
# terminal's jobs, and torchrun passes it on. Taken as a stop request, a training run saves first.
# Unless it was ignored when the process started (``nohup``, a shell's ``trap '' HUP``): the user asked
# the run to outlive its terminal, and it stays ignored, as bash keeps a signal ignored at its start.
# The DeepSpeed launcher ignores it for its own per-node launcher and says so in HANGUP_STOPS_ENV.
HANGUP_STOPS_ENV = "IRPT_HANGUP_STOPS"


_HANGUP_STOPS = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN or os.environ.get(HANGUP_STOPS_ENV) == "1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) + ((signal.SIGHUP,) if _HANGUP_STOPS else ())


def leave_a_hung_up_terminal() -> None:
    """On a stop signal, point stdout / stderr at /dev/null where they are a terminal that hung up
    (an ssh connection dropped): every write to it fails (EIO), and the first line written, a log
    line or the one saying the stop, ended the run with a traceback, before or after it saved. Probed
    with an empty write, so that output to a live terminal, files and pipes stays where it goes."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError as e:
            if e.errno == errno.EIO:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a command writes a folder; the message says what is kept and how to go on (still a
    KeyboardInterrupt to a caller; :func:`run_command` says it in one line)."""


def storage_error_line(e: OSError) -> str | None:
    """The one line for a write that failed on a full disk (quota, read-only mount), or None for
    another error."""
    problem = storage_problem(e)
    if problem is None:
        return None
    return f"error: a write failed ({problem}): free space (or write elsewhere) and run again"


class StopRequests:
    """What a stop signal asks, given the ones before it. A stop reaches a process more than once: the
    terminal's Ctrl-C (or a scheduler's SIGTERM) goes to the whole process group, and run.sh or a
    launcher passes it on, as a SIGTERM, in either order, the second one's handler even running inside
    the first's. Those are one request; only a Ctrl-C after a Ctrl-C is the user wanting out at once.
    (Taken as any stop after a SIGTERM, a Ctrl-C ended a saving run unsaved, now and then.)"""

    FIRST, SECOND_CTRL_C, AGAIN = "first", "second Ctrl-C", "again"

    def __init__(self) -> None:
        self.first: int | None = None  # the signal of the first request
        self.ctrl_c = False

    def take(self, signum: int) -> str:
        """FIRST, SECOND_CTRL_C, or AGAIN (the same request again: to be dropped). Call it before
        anything else in a handler: a signal arriving later runs its handler inside the caller's."""
        verdict = (self.FIRST if self.first is None else
                   self.SECOND_CTRL_C if signum == signal.SIGINT and self.ctrl_c else self.AGAIN)
        self.first = self.first or signum
        self.ctrl_c = self.ctrl_c or signum == signal.SIGINT
        return verdict

    @property
    def signum(self) -> int | None:
        """The request's signal, said as Ctrl-C where one came."""
        return signal.SIGINT if self.ctrl_c else self.first


class _StopAsCtrlC:
    """A SIGTERM (a scheduler's stop, ``docker stop``), SIGUSR1 (a preemption notice) or SIGHUP (the
    terminal hung up) ends a command as Ctrl-C does, through its KeyboardInterrupt path, which keeps
    what it finished (their default action ended it at once; a build's pool workers, which ignore
    them, went on without it). The same request arriving twice is one (:class:`StopRequests`)."""

    def __init__(self) -> None:
        self.requests = StopRequests()

    def __call__(self, signum, frame) -> None:
        verdict = self.requests.take(signum)
        leave_a_hung_up_terminal()
        if verdict != StopRequests.AGAIN:
            raise KeyboardInterrupt


def set_stop_handlers(handler) -> dict:
    """Set ``handler`` for every stop signal; returns the handlers it replaced."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_signals_as_ctrl_c() -> Iterator[_StopAsCtrlC]:
    stop = _StopAsCtrlC()
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's alone
        yield stop
        return
    previous = set_stop_handlers(stop)
    try:
        yield stop
    finally:
        restore_handlers(previous)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                user_errors: tuple[type[Exception], ...] = ()) -> int:
    """``func(args)``'s exit status; ``user_errors`` and a full disk said as ``error: ...`` (2), Ctrl-C
    as ``interrupted`` with what the command says is kept (130), a SIGTERM / SIGUSR1 / SIGHUP the same
    way as ``stopped by SIGTERM`` (the shell's status for it, 143 / 138 / 129)."""
    with _stop_signals_as_ctrl_c() as stop:
        try:
            return func(args)
        except user_errors as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except KeyboardInterrupt as e:
            signum = stop.requests.signum
            ctrl_c = signum in (None, signal.SIGINT)
            what = "interrupted" if ctrl_c else f"stopped by {signal.Signals(signum).name}"
            print(f"{what}{': ' + str(e) if str(e) else ''}", file=sys.stderr)
            return EXIT_INTERRUPTED if ctrl_c else 128 + signum
        except OSError as e:
            if (line := storage_error_line(e)) is None:
                raise
            print(line, file=sys.stderr)
            return EXIT_REFUSED
