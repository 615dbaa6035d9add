"""``train.precision=bf16``: DeepSpeed holds the weights in bf16 (fp32 master copies in the
optimiser). It casts no inputs and, from 0.18, no buffers: images are cast by the tasks and the
whole model (BatchNorm statistics included) before the engine is built. Detection refuses it."""
import json

import cv2
import numpy as np
import pytest
import torch

from data_tools.config import CONFIG_DIR, load_config
from data_tools.synth import SynthConfig, write_corpus
from tests.conftest import ROOT, run_finetune_cli

TINY = CONFIG_DIR / "pretrain" / "tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_tools.build import build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.sources import load_sources

    root = tmp_path_factory.mktemp("bf16")
    write_corpus(root / "synth", SynthConfig(num_images=8, width=160, height=128))
    build_shards(load_sources(root / "synth" / "sources.yaml"), load_config(DEFAULT_BUILD_CONFIG), root / "shards",
                 progress=False)
    return root


def _module_states(run_dir) -> dict:
    (tag,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")][-1:]
    return torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def test_pretraining_in_bf16_trains_previews_and_exports(corpus, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    common = dict(cwd=ROOT, capture_output=True, text=True, timeout=600)
    res = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", str(TINY), "--run-dir", str(run_dir),
                          f"data.shards=[{{path: {corpus / 'shards'}}}]", "train.precision=bf16", "train.epochs=1",
                          "train.preview_every_steps=1"], **common)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    previews = sorted((run_dir / "previews").glob("*.png"))
    assert len(previews) == 2 and cv2.imread(str(previews[-1])).std() > 0
    states = _module_states(run_dir)
    assert {t.dtype for t in states.values() if t.is_floating_point()} == {torch.bfloat16}
    # AdamW counts the 2 steps trained, not the one DeepSpeed's bf16 optimiser takes as it wraps it
    (tag,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")][-1:]
    adamw = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["optimizer"]["optimizer_state_dict"]
    assert max(float(s["step"]) for s in adamw["state"].values()) == 2
    res = subprocess.run([sys.executable, "-m", "pretrain", "export", str(run_dir), "--out", str(tmp_path / "b.pth")],
                         **common)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = torch.load(tmp_path / "b.pth", weights_only=True)
    blocks = {k: v for k, v in exported.items() if k.startswith("blocks.0.")}
    assert blocks and all(v.dtype == torch.float32 for v in blocks.values())


def test_segmentation_in_bf16_trains_and_evaluates_with_batchnorm(corpus, tmp_path):
    run_dir = tmp_path / "seg"
    res = run_finetune_cli("seg", run_dir, CONFIG_DIR / "finetune" / "seg_tiny.yaml", f"data.root={corpus / 'synth'}",
                           "train.precision=bf16", "train.steps=3", "eval.overlays=0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["frames"] == 8 and 0 <= metrics["mIoU"] <= 1
    states = _module_states(run_dir)
    running = [k for k in states if k.endswith("running_mean")]
    assert running and all(states[k].dtype == torch.bfloat16 for k in running)


def test_detection_refuses_bf16_weights_before_the_run_starts(corpus, tmp_path, capsys):
    from finetune.cli import main as finetune_main

    config = str(CONFIG_DIR / "finetune" / "det_tiny.yaml")
    args = ["--config", config, f"data.root={corpus / 'synth'}", f"data.boxes.path={corpus / 'synth' / 'labels'}",
            "train.precision=bf16"]
    assert finetune_main(["check", *args]) == 2
    assert "train.precision=bf16 holds the weights in bf16, and detection's boxes" in capsys.readouterr().err
    assert finetune_main(["det", "--run-dir", str(tmp_path / "det"), *args]) == 2
    assert "use train.precision=bf16_autocast" in capsys.readouterr().err
    assert not (tmp_path / "det").exists()
