"""One run per run directory: a live holder is named and refused, a dead holder's lock is taken over."""
import subprocess
import sys
import time

import pytest

from pretrain.engine import runlock
from tests.conftest import ROOT


def test_a_live_holder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pretrain.engine import runlock; runlock.acquire(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunDirBusy, match=rf"is in use by PID {holder.pid} on "):
            runlock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    note = runlock.acquire(tmp_path)  # the kernel dropped the dead holder's lock
    try:
        assert note and f"from PID {holder.pid} on" in note and "no longer running" in note
        assert runlock.acquire(tmp_path) is None  # this process holds it already
    finally:
        runlock.release(tmp_path)


@pytest.mark.parametrize("launched", [True, False])
def test_a_launched_worker_dies_with_its_launcher_and_a_shell_child_does_not(tmp_path, launched):
    """The launcher here is a shell that exits 1.5 s after starting the worker. With LOCAL_RANK
    (a launcher's child) the worker is killed with it; without, it outlives its shell (nohup)."""
    mark = tmp_path / "mark"
    script = ("import os, time; from pretrain.engine.runlock import die_with_launcher; die_with_launcher(os.environ); "
              "open(os.environ['MARK'], 'w').write('started'); time.sleep(2); open(os.environ['MARK'], 'w').write('survived')")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MARK": str(mark)}
    if launched:
        env["LOCAL_RANK"] = "0"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" & sleep 1.5', script], env=env, cwd=ROOT, timeout=60)
    time.sleep(2.5)
    assert mark.read_text() == ("started" if launched else "survived")
