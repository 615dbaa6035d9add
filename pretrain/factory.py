"""Model construction from a config, shared by the CLI commands and the trainer."""
from __future__ import annotations


import torch

from data_tools.config import to_container


def build_model_from_config(cfg, device: str | torch.device = "cpu"):
    from pretrain.models.mae import build_mae

    with torch.device(device):
        return build_mae(to_container(cfg)["model"])


def initialise_from_config(model, cfg):
    """Load ``init.checkpoint`` as the paradigm asks: pad / continual start from it (random init,
    with a warning, when none is given); scratch refuses one. Returns the LoadReport or None."""
    from pretrain.random_init import warn_random_init
    from pretrain.weights import load_into_mae

    checkpoint = cfg.init.checkpoint
    if cfg.model.paradigm == "scratch":
        if checkpoint:
            raise ValueError("paradigm 'scratch' trains from random init: unset init.checkpoint")
        return None
    if not checkpoint:
        warn_random_init(f"paradigm '{cfg.model.paradigm}' without init.checkpoint: the encoder starts "
                         "from random init (PAD expects the ImageNet MAE weights)")
        return None
    return load_into_mae(model, checkpoint, allow_missing=bool(cfg.init.allow_missing))
