"""One process at a time per output folder: a run directory, a shard build.

The holder keeps an exclusive ``flock`` on ``FOLDER/.lock`` for its life and writes its host and
PID there. The kernel drops the lock when the holder dies, however it dies, so a stale lock (a
killed process) is recognised by being free, and taken over with a note naming the old holder.
A second process on a live folder is refused with the holder named, before it touches anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"

_held: dict[str, int | None] = {}  # folder -> open descriptor (None: no locks there), kept for the process's life


class FolderBusy(RuntimeError):
    pass


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())  # an empty file (let go) is no JSON: {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return f"PID {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


def acquire(folder: Path, busy: str) -> str | None:
    """Take the folder's lock for this process; returns a note when a stale lock was taken over.
    Raises FolderBusy naming the holder (and ``busy``: what to do) when a live process has it."""
    import fcntl

    key = str(folder.resolve())
    if key in _held:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{folder} is in use by {_describe(_holder(path))}: {busy}") from None
    except OSError as e:  # a file system that keeps no locks: Lustre without -o flock, NFS without its
        os.close(fd)      # lock daemon, FUSE mounts of object stores. Their users still build and train.
        _held[key] = None
        return (f"{folder} is on a file system without file locks ({e.strerror or e}): a second process "
                f"writing it at the same time is not refused ({busy.split('.')[0]}: keep to it yourself)")
    previous = _holder(path)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    if previous:
        return f"took over the lock of {folder} from {_describe(previous)}, which is no longer running"
    return None


@contextlib.contextmanager
def holding(folder: Path, busy: str, error: type[Exception] = FolderBusy):
    """The lock of ``folder`` for a ``with`` block (:func:`acquire`, :func:`release`); a live holder
    raises ``error`` naming it, a stale lock taken over is noted on stderr."""
    try:
        note = acquire(folder, busy)
    except FolderBusy as e:
        raise error(str(e)) from None
    if note:
        print(f"note: {note}", file=sys.stderr)
    try:
        yield
    finally:
        release(folder)


def holder_if_busy(folder: Path) -> str | None:
    """Who holds ``folder``'s lock now (for a reader: "a build is writing it"), or None; writes
    nothing, so it works on a read-only folder. Not held by this process's own ``acquire``."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    if str(Path(folder).resolve()) in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:  # a shared lock is refused only while a holder has the exclusive one
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_holder(path))
    except OSError:  # a file system without locks: no holder can be told
        return None
    finally:
        os.close(fd)  # drops the probe's shared lock at once
    return None


def release(folder: Path) -> None:
    fd = _held.pop(str(folder.resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # a holder that let go is not named to the next one, as a killed one is
        os.close(fd)  # closing the descriptor drops the flock


def release_all() -> None:
    """Let go of every lock this process holds: for a process about to leave by ``os._exit``, which
    skips the ``with`` blocks that would (a run that ended is not named to the next as a killed one)."""
    for key in list(_held):
        release(Path(key))
