"""One run per run directory, and no worker outliving its launcher.

Rank 0 holds the run directory's lock (``data_tools.dirlock``: ``RUN_DIR/.lock``, its host and
PID inside) for the life of the run; a second launch on a live run is refused with the holder
named, before it touches anything, and a killed run's lock is taken over with a note.

Launchers start their workers in sessions of their own (torchrun does), so killing a launcher's
process group leaves the workers training; a worker started by a launcher asks the kernel for
SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``): the run stays resumable from its last
checkpoint, and no orphan races the next launch.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from pathlib import Path

from data_tools import dirlock
from data_tools.dirlock import LOCK_NAME, FolderBusy, release, release_all  # noqa: F401 (the engine's names)


def acquire(run_dir: Path) -> str | None:
    """Take the run directory's lock (``dirlock.acquire``): a note when a killed run's was taken over."""
    return dirlock.acquire(run_dir, "one run per run directory. Wait for it, stop it (signal its launcher), or "
                                    "use another --run-dir")


def die_with_launcher(env: dict) -> None:
    """SIGKILL this process when the process that launched it dies (Linux). Only under a
    launcher (torchrun, the DeepSpeed launcher: they set LOCAL_RANK): a process started from a
    shell must survive its shell (nohup, tmux)."""
    if "LOCAL_RANK" not in env or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # the launcher died before the request took effect
        os._exit(1)
