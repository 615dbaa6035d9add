"""How a command line ends: the user's errors, a full disk and Ctrl-C in one line each (no
traceback: the input, the machine or the user, not a bug), anything else with its traceback. The
one way for the ``data_tools``, ``pretrain`` and ``finetune`` commands (training runs end in the
engine, which says its errors the same way)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from data_tools.files import storage_problem

EXIT_REFUSED = 2  # a command line, config or input refused
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C


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


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                user_errors: tuple[type[Exception], ...] = ()) -> int:
    """``func(args)``'s exit status; ``user_errors`` and a full disk said as ``error: ...`` (2), Ctrl-C
    as ``interrupted`` with what the command says is kept (130)."""
    try:
        return func(args)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if (line := storage_error_line(e)) is None:
            raise
        print(line, file=sys.stderr)
        return EXIT_REFUSED
