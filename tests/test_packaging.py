"""A wheel built from the tree carries every config, and its CLIs find them when run from outside
the checkout (the defaults and presets resolve inside the installed package)."""
import os
import subprocess
import sys
import zipfile

from data_tools.config import CONFIG_DIR
from tests.conftest import ROOT


def test_a_wheel_holds_the_configs_and_its_cli_runs_outside_the_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("irpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"irpt_configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel), "-q"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import data_tools.config as c; print(c.CONFIG_DIR)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "irpt_configs"), where.stdout + where.stderr
    params = subprocess.run([sys.executable, "-m", "finetune", "params", "model.method=mona", "model.modality=ir"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # the default config, from the wheel
    assert params.returncode == 0 and '"trainable_backbone": 2684928' in params.stdout, params.stderr[-3000:]
    preset = subprocess.run([sys.executable, "-m", "finetune", "check", "--config",
                             str(site / "irpt_configs" / "finetune" / "presets" / "mfnet.yaml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert preset.returncode == 2 and "data.root is not set" in preset.stderr  # its _base_ resolved, schema passed
