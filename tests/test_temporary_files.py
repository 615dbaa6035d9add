"""The tests' own hygiene: what the processes they launch leave in the temporary folder stays in
pytest's folder (a killed process cannot remove its files, and torchrun never removes its folder)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def test_launched_processes_write_their_temporary_files_under_pytests_folder(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    said = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp(prefix='torchelastic_'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert Path(said).is_dir() and Path(said).is_relative_to(base)
    assert Path(tempfile.gettempdir()).is_relative_to(base) and Path(os.environ["TMPDIR"]).is_relative_to(base)
