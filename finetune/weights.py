"""Weights for a fine-tuning backbone: a separate step from building it (model code reads no files).

``backbone_for(cfg)`` resolves what the checkpoint says about the architecture (an export's
encoder and adapters, the adapter settings of a PAD release, read from its tensors), builds the
backbone from that config alone, then loads the weights into it:
- an export of ``python -m pretrain export`` (its JSON rebuilds encoder and adapters);
- PAD's own release (method ``pad``: its adapters are rebuilt from the weights);
- the IV-tuning authors' ``ViT_prompt`` weights (method ``ivtuning``: backbone and prompts);
- an official MAE, timm ``.pth`` / ``.safetensors`` or our MAE checkpoint into the encoder;
- nothing: random init, with a warning.
"""
from __future__ import annotations

import dataclasses
import sys

from finetune.models.backbone import Backbone, BackboneConfig
from pretrain.weights import LoadReport


def resolve(cfg: BackboneConfig) -> BackboneConfig:
    """``cfg`` with the architecture its checkpoint implies (reads the checkpoint's JSON or tensors)."""
    from pretrain.weights import (adapter_names, exported_encoder_config, has_pad_author_keys, is_exported_backbone,
                                  pad_config_from_state, read_backbone_meta, read_state_dict)

    path = cfg.checkpoint
    if path and is_exported_backbone(path):
        meta = read_backbone_meta(path)
        if cfg.method == "pad" and "pad" not in adapter_names(meta):
            raise ValueError(f"method 'pad' fine-tunes a PAD export; {path} has adapters {adapter_names(meta)}")
        carried = tuple((a["name"], a["settings"]) for a in meta["adapters"])
        return dataclasses.replace(cfg, encoder=exported_encoder_config(meta, cfg.encoder.img_size),
                                   carried_adapters=carried)
    if cfg.method == "pad":  # PAD's own release: its adapters come from its tensors
        sd = read_state_dict(path) if path else {}
        if not has_pad_author_keys(sd):
            raise ValueError("method 'pad' needs init.checkpoint = a backbone exported by `python -m pretrain export` "
                             "or a PAD pre-training checkpoint")
        settings = dataclasses.asdict(pad_config_from_state(sd, cfg.pad_scale))
        return dataclasses.replace(cfg, carried_adapters=(("pad", settings),))
    return cfg


def load_weights(backbone: Backbone, cfg: BackboneConfig) -> LoadReport | None:
    """Load ``cfg.checkpoint`` into a backbone built from ``resolve(cfg)``; the report, or None
    without a checkpoint."""
    from finetune.models.ivtuning import is_vit_prompt_state, load_vit_prompt_state
    from pretrain.weights import is_exported_backbone, load_exported_into, load_into_encoder, read_state_dict

    path = cfg.checkpoint
    if not path:
        print(f"warning: method '{cfg.method}' without a checkpoint: the backbone starts from random init",
              file=sys.stderr)
        return None
    if is_exported_backbone(path):
        return load_exported_into(backbone.encoder, path)
    if cfg.method == "ivtuning":
        sd = read_state_dict(path)
        if is_vit_prompt_state(sd):  # the authors' IV-tuning ViT: backbone and prompts in one file
            return load_vit_prompt_state(backbone, sd, path, cfg.allow_missing)
    return load_into_encoder(backbone.encoder, path, cfg.allow_missing)


def backbone_for(cfg: BackboneConfig) -> Backbone:
    """Resolve, build, load: the backbone a config names, with its weights."""
    resolved = resolve(cfg)
    backbone = Backbone(resolved)
    backbone.load_report = load_weights(backbone, resolved)
    return backbone
