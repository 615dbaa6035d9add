"""A run's model rebuilt in one process, without DeepSpeed, from any of its checkpoints: for
exports (pre-training) and predictions on new frames (fine-tuning).

The frozen weights are rebuilt from the run's own config (its init checkpoint, or its seed) and
must match the fingerprint the checkpoint recorded; the trainable weights are the checkpoint's."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from data_tools.config import load_config
from data_tools.files import check_folder_kind
from pretrain.engine.checkpoint import Checkpointer, ResumeError, _weights_only_load, frozen_fingerprint
from pretrain.random_init import rebuilding_trained_run


def run_config(run_dir: Path, kinds: tuple[str, ...]):
    """The resolved config a run of one of ``kinds`` saved (``config.yaml``)."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    check_folder_kind(run_dir, kinds)
    return load_config(run_dir / "config.yaml")


def load_trained(run_dir: str | Path, build: Callable, kinds: tuple[str, ...], tag: str | None = None):
    """(the model of ``run_dir`` in eval mode, the checkpoint tag, the run's config).

    ``build(cfg)`` makes the model with its frozen weights (and ``requires_grad`` on exactly the
    parameters the run trained); ``tag``: a checkpoint folder name (``best``, ``step00000400``),
    by default the newest one that verifies."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, kinds)
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
    with rebuilding_trained_run():  # its frozen weights as it trained with them, said then
        model = build(cfg)
    state = json.loads((ckpt_dir / tag / "state_rank0.json").read_text())
    if frozen_fingerprint(model) != state["frozen"]["fingerprint"]:
        raise ResumeError(f"the frozen weights rebuilt for {run_dir} differ from the checkpoint's reference "
                          f"({state['frozen']['init_checkpoint']}): was the init checkpoint changed?")
    saved = _weights_only_load(str(ckpt_dir / tag / "mp_rank_00_model_states.pt"), map_location="cpu")
    missing, unexpected = model.load_state_dict(saved["module"], strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lacking = sorted(n for n in trained if n in missing)
    if lacking or unexpected:
        raise ResumeError(f"checkpoint {tag} does not match the model: missing {lacking[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval(), tag, cfg
