"""Export a run's backbone from any of its checkpoints, without a distributed set-up."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from data_tools.config import load_config, to_container
from pretrain.engine import Checkpointer, ResumeError, frozen_fingerprint
from pretrain.factory import build_model_from_config, initialise_from_config
from pretrain.weights import export_backbone


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(the run's MAE with its frozen weights rebuilt (and verified) and its trainable weights
    loaded, the checkpoint tag, the run's config)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir = run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir)
    if tag is None:
        if not ckpt.has_checkpoints():
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
        tag, skipped = ckpt.choose()  # the newest verified one
        for why in skipped:
            print(f"warning: checkpoint skipped: {why}", file=sys.stderr)
    elif (problem := ckpt.problem(tag)) is not None:
        raise ResumeError(f"checkpoint {tag}: {problem}")
    if cfg.train.zero_stage == 3:
        raise ResumeError("ZeRO stage 3 partitions the weights: consolidate with DeepSpeed's zero_to_fp32.py first")
    torch.manual_seed(int(cfg.train.seed))  # frozen weights of a random-init run come from the seed
    model = build_model_from_config(cfg)
    initialise_from_config(model, cfg)
    state = json.loads((ckpt_dir / tag / "state_rank0.json").read_text())
    if frozen_fingerprint(model) != state["frozen"]["fingerprint"]:
        raise ResumeError(f"the frozen weights rebuilt for {run_dir} differ from the checkpoint's reference "
                          f"({state['frozen']['init_checkpoint']}): was the init checkpoint changed?")
    saved = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(saved["module"], strict=False)
    trainable = model.trainable_names()
    lacking = sorted(n for n in trainable if n in missing)
    if lacking or unexpected:
        raise ResumeError(f"checkpoint {tag} does not match the model: missing {lacking[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), tag, cfg


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None):
    model, _, cfg = load_run_model(run_dir, tag)
    d = cfg.data
    input_norm = {"mean": float(d.mean), "std": float(d.std), "intensity": to_container(d.intensity)}
    return export_backbone(model, out, input_norm)
