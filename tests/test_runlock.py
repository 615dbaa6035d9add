"""One run per run directory: a live holder is named and refused, a dead holder's lock is taken over."""
import subprocess
import sys
import time

import pytest

from pretrain.engine import runlock
from tests.conftest import ROOT, alive, folder_locked_by_another_process


def test_a_live_holder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    with folder_locked_by_another_process(tmp_path) as pid:
        with pytest.raises(runlock.FolderBusy, match=rf"is in use by PID {pid} on "):
            runlock.acquire(tmp_path)
    note = runlock.acquire(tmp_path)  # the kernel dropped the dead holder's lock
    try:
        assert note and f"from PID {pid} on" in note and "no longer running" in note
        assert runlock.acquire(tmp_path) is None  # this process holds it already
    finally:
        runlock.release(tmp_path)


@pytest.mark.parametrize("launched", [True, False])
def test_a_launched_worker_dies_with_its_launcher_and_a_shell_child_does_not(tmp_path, launched):
    """The launcher here is a shell that exits as soon as its worker has started (a fixed delay
    failed on a loaded machine: the worker's imports outlasted it). With LOCAL_RANK (a launcher's
    child) the worker is killed with it; without, it outlives its shell (nohup) and finishes."""
    mark = tmp_path / "mark"
    script = ("import os, time; from pretrain.engine.runlock import die_with_launcher; die_with_launcher(os.environ); "
              "open(os.environ['MARK'], 'w').write(f'started {os.getpid()}'); time.sleep(2); "
              "open(os.environ['MARK'], 'w').write('survived')")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MARK": str(mark)}
    if launched:
        env["LOCAL_RANK"] = "0"
    wait_started = 'i=0; while [ ! -s "$MARK" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" & {wait_started}', script], env=env, cwd=ROOT, timeout=90)
    text = mark.read_text()
    assert text.startswith("started ")
    pid = int(text.split()[1])
    deadline = time.monotonic() + 60
    if launched:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid) and mark.read_text() == text  # killed with its launcher, before its 2 s
    else:
        while mark.read_text() != "survived" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.read_text() == "survived"


def test_a_second_build_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two builds into one output folder (a pipeline started twice) wrote the same shard names."""
    import cv2
    import numpy as np

    from data_tools.cli import main as data_main

    frames, out = tmp_path / "frames", tmp_path / "shards"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (96, 128), np.uint8))
    build = ["build", "--source", f"cam={frames}", "--out", str(out)]
    with folder_locked_by_another_process(out) as pid:
        assert data_main(build) == 2
        assert f"{out} is in use by PID {pid} on " in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert data_main(build) == 0
    assert f"took over the lock of {out} from PID {pid}" in capsys.readouterr().err
    assert data_main(build) == 0  # the build let go of it when it ended
    assert "note: took over" not in capsys.readouterr().err


def test_a_file_system_without_locks_is_said_and_the_build_and_its_readers_go_on(tmp_path, monkeypatch, capsys):
    """flock fails with ENOSYS on Lustre mounted without -o flock (ENOLCK on NFS without its lock
    daemon, and on FUSE mounts of object stores): the build, a run's start and every reader of a
    shard folder ended in a traceback there. Now the lock is skipped with a note saying so."""
    import errno
    import fcntl

    import cv2
    import numpy as np

    from data_tools import dirlock
    from data_tools.cli import main as data_main

    frames, out = tmp_path / "frames", tmp_path / "shards"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (96, 128), np.uint8))

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert data_main(["build", "--source", f"cam={frames}", "--out", str(out)]) == 0
    assert (f"note: {out} is on a file system without file locks (Function not implemented): a second process "
            "writing it at the same time is not refused (one build per output folder: keep to it yourself)"
            in capsys.readouterr().err)
    assert data_main(["verify", str(out)]) == 0  # a reader asks whether a build is writing it
    assert dirlock.holder_if_busy(out) is None
    note = runlock.acquire(tmp_path / "run")
    try:
        assert "without file locks" in note and "one run per run directory: keep to it yourself" in note
        assert runlock.acquire(tmp_path / "run") is None  # taken (as far as it can be) once
    finally:
        runlock.release(tmp_path / "run")
    assert str((tmp_path / "run").resolve()) not in dirlock._held


def test_the_lock_file_always_names_its_holder_and_leaks_nothing(tmp_path):
    """The lock file of a folder: whatever an earlier holder (or another tool) left in it, the next
    holder's record reads back whole; a refusal keeps no descriptor open; a holder that cannot be
    read is 'an unknown process'; this process's own lock is no other's."""
    import json
    import os

    from data_tools import dirlock

    lock = tmp_path / dirlock.LOCK_NAME
    lock.write_text(json.dumps({"host": "an-old-node-with-a-long-name" * 4, "pid": 1, "started": "then"}))
    note = dirlock.acquire(tmp_path, "")
    try:
        assert "took over the lock" in note and "PID 1 on an-old-node" in note
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # no tail of the longer record left
        assert dirlock.holder_if_busy(tmp_path) is None  # its own lock: no other writer
    finally:
        dirlock.release(tmp_path)
    assert lock.read_text() == ""  # let go: not named to the next one
    for garbage in ("", "not json", "\udcff"):
        lock.write_text(garbage, errors="surrogateescape")
        assert dirlock.acquire(tmp_path, "") is None  # nothing to name: no note, no crash
        dirlock.release(tmp_path)
    with folder_locked_by_another_process(tmp_path):
        lock.write_text("written over by another tool")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(dirlock.FolderBusy, match="is in use by an unknown process: wait"):
                dirlock.acquire(tmp_path, "wait")
        assert len(os.listdir("/proc/self/fd")) == before
        assert dirlock.holder_if_busy(tmp_path) == "an unknown process"


def test_release_all_lets_go_of_every_folder_this_process_holds(tmp_path):
    from data_tools import dirlock

    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        dirlock.acquire(folder, "")
    dirlock.release_all()
    assert not any(str(f.resolve()) in dirlock._held for f in folders)
    for folder in folders:
        assert (folder / dirlock.LOCK_NAME).read_text() == ""
        with folder_locked_by_another_process(folder):  # free: another process takes it at once
            assert dirlock.holder_if_busy(folder).startswith("PID ")
