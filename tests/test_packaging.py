"""A wheel built from the tree carries every config, and its CLIs find them when run from outside
the checkout (the defaults and presets resolve inside the installed package)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from data_tools.config import CONFIG_DIR
from tests.conftest import ROOT


def _source_copy(to: Path) -> Path:
    """The files a wheel is built from, copied: setuptools builds in the source tree (``build/``), and
    a module deleted since stayed there and went into the next wheel built from the checkout."""
    to.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, to / name)
    for package in ("data_tools", "pretrain", "finetune", "configs"):
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_a_wheel_holds_the_configs_and_its_cli_runs_outside_the_checkout(tmp_path):
    had_build = (ROOT / "build").exists()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path / "source")), "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "wheel"), "-q"],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (ROOT / "build").exists() == had_build  # the checkout is left as it was
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


def test_data_loader_workers_import_no_model_library():
    """A spawned loader worker imports the modules of the stream and dataset it unpickles; timm and
    torchvision (2.5-3.5 s) came in through a constant and a helper, in every worker of every run."""
    code = ("import sys, pretrain.data, pretrain.engine, finetune.data.stream, finetune.data.det, "
            "finetune.data.seg, finetune.data.eval_frames; print(sorted(m for m in ('timm', 'torchvision', 'deepspeed') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


def test_the_imagenet_normalisation_written_out_is_timms():
    import numpy as np
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from finetune.data.augment import IMAGENET_MEAN, IMAGENET_STD

    np.testing.assert_array_equal(IMAGENET_MEAN, np.array(IMAGENET_DEFAULT_MEAN, np.float32))
    np.testing.assert_array_equal(IMAGENET_STD, np.array(IMAGENET_DEFAULT_STD, np.float32))
