"""One run per run directory, and no worker outliving its launcher.

Rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the life of the run and writes its
host and PID there. The kernel drops the lock when the holder dies, however it dies, so a stale
lock (a killed run) is recognised by being free, and taken over with a note naming the old holder.
A second launch on a live run is refused with the holder named, before it touches anything.

Launchers start their workers in sessions of their own (torchrun does), so killing a launcher's
process group leaves the workers training; a worker started by a launcher asks the kernel for
SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``): the run stays resumable from its last
checkpoint, and no orphan races the next launch.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # run dir -> open descriptor, kept for the life of the process


class RunDirBusy(RuntimeError):
    pass


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return f"PID {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


def acquire(run_dir: Path) -> str | None:
    """Take the run directory's lock for this process; returns a note when a stale lock was taken
    over. Raises RunDirBusy naming the holder when a live process has it."""
    import fcntl

    key = str(run_dir.resolve())
    if key in _held:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by {_describe(_holder(path))}: one run per run directory. Wait "
                         "for it, stop it (signal its launcher), or use another --run-dir") from None
    previous = _holder(path)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    if previous:
        return f"took over the lock of {run_dir} from {_describe(previous)}, which is no longer running"
    return None


def release(run_dir: Path) -> None:
    fd = _held.pop(str(run_dir.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


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
