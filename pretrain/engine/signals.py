"""Stop requests: SIGTERM / SIGUSR1 (preemption notices), SIGHUP (the terminal hung up) and a first
Ctrl-C (SIGINT) ask the run to save and stop; a second Ctrl-C stops at once. Loader workers ignore them."""
from __future__ import annotations

import contextlib
import multiprocessing.resource_tracker
import os
import signal
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from data_tools.command import (STOP_SIGNALS, StopRequests, leave_a_hung_up_terminal, restore_handlers,
                                set_stop_handlers)


class StopSignals:
    """Stop signals set a flag; the loop saves and stops at the end of the step, once every rank
    agrees (an all-reduce, so no rank is left waiting in a collective). A second Ctrl-C raises
    KeyboardInterrupt (the user wants out now, unsaved); a Ctrl-C's SIGINT and the SIGTERM passed on
    for it are one request (:class:`StopRequests`). ``restore`` puts the previous handlers back (after
    the loop, a signal is no longer a request to save)."""

    def __init__(self, announce: bool = True):
        self.requests = StopRequests()
        self.announce = announce
        self._previous = set_stop_handlers(self._handler)

    @property
    def requested(self) -> bool:
        return self.requests.first is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.requests.signum is None else signal.Signals(self.requests.signum).name

    def _handler(self, signum, frame) -> None:
        verdict = self.requests.take(signum)
        leave_a_hung_up_terminal()
        if verdict == StopRequests.SECOND_CTRL_C:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self.announce:  # os.write: a print could re-enter a write the signal interrupted
            os.write(2, b"\nCtrl-C: saving at the end of this step (an evaluation under way stops), then "
                        b"stopping (Ctrl-C again stops at once, without saving)\n")

    def any_rank_requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        restore_handlers(self._previous)


class EvaluationStopped(Exception):
    """A stop request ended an evaluation part-way; the run saves its step and stops, and the
    resumed run evaluates that step first."""


def stop_polling(frames: Iterable, polls: int, requested: Callable[[], bool] | None) -> Iterator:
    """``frames``, asking ``requested()`` before each of the first ``polls``. Every rank must ask the
    same number of times (``requested`` is a collective), so ``polls`` is the smallest share of frames
    any rank has. A preemption notice gives a grace period of tens of seconds, shorter than an
    evaluation of a large validation split: the run stops within a frame instead."""
    for n, frame in enumerate(frames):
        if requested is not None and n < polls and requested():
            raise EvaluationStopped
        yield frame


def ignore_preemption_signals(_worker_id: int) -> None:
    """Runs in each loader worker after PyTorch installed its own SIGTERM handler (which re-raises
    SIGTERM from any sender but the parent): the training process handles the stop signals (Ctrl-C
    in a terminal reaches the whole process group)."""
    set_stop_handlers(signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_held():
    """Loader workers spawned inside are born with the stop signals blocked (a thread's signal mask
    survives fork and exec), so a Ctrl-C or SIGTERM in the seconds before ``ignore_preemption_signals``
    runs in them cannot kill them (which would read as a worker that died of memory); it stays pending
    there until that discards it. The spawn itself can take seconds: each worker is handed the pickled
    dataset through a pipe, and one larger than the pipe's buffer (a long frame list) waits for the
    worker to import and read it (measured: 1.4 s a worker for 1 MB, one after the other). Held back
    here too, a stop request arriving meanwhile is taken once the workers are started; ignored
    instead (SIG_IGN, also inherited), it was lost, and a preemption notice in that window ended the
    run unsaved at the grace period's end."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Python's resource tracker, a process started with the first one spawned, must be born with
        # them blocked too (a preemption notice to the process group killed it, and its restart
        # printed a traceback for each name the first one had tracked); once started, it unblocks
        # SIGINT and SIGTERM in this thread (its own block, lifted, not restored): blocked again.
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
