"""Weights for a fine-tuning backbone: a separate step from building it (model code reads no files).

``backbone_for(cfg)`` resolves what the checkpoint says about the architecture (an export's
encoder and adapters, the adapter settings of a PAD release, read from its tensors), builds the
backbone from that config alone, then loads the weights into it:
- an export of ``python -m pretrain export`` (its JSON rebuilds encoder and adapters);
- a method's authors' own format, through the hooks it registers (``pad``: PAD's release, its
  adapters rebuilt from the weights; ``ivtuning``: the authors' ``ViT_prompt``, backbone and prompts);
- an official MAE, timm ``.pth`` / ``.safetensors`` or our MAE checkpoint into the encoder;
- nothing: random init, with a warning.
"""
from __future__ import annotations

import dataclasses

from finetune.models.backbone import Backbone, BackboneConfig
from finetune.models.methods import get_method
from pretrain.weights import LoadReport


def resolve(cfg: BackboneConfig) -> BackboneConfig:
    """``cfg`` with the architecture its checkpoint implies (reads the checkpoint's JSON or tensors)."""
    from pretrain.weights import adapter_names, exported_encoder_config, is_exported_backbone, read_backbone_meta

    path, method = cfg.checkpoint, get_method(cfg.method)
    if path and is_exported_backbone(path):
        meta = read_backbone_meta(path)
        if method.needs_adapter and method.needs_adapter not in adapter_names(meta):
            raise ValueError(f"method {method.name!r} fine-tunes an export with {method.needs_adapter} adapters; "
                             f"{path} has adapters {adapter_names(meta)}")
        carried = tuple((a["name"], a["settings"]) for a in meta["adapters"])
        return dataclasses.replace(cfg, encoder=exported_encoder_config(meta, cfg.encoder.img_size),
                                   carried_adapters=carried)
    return method.resolve_release(cfg) if method.resolve_release else cfg


def load_weights(backbone: Backbone, cfg: BackboneConfig) -> LoadReport | None:
    """Load ``cfg.checkpoint`` into a backbone built from ``resolve(cfg)``; the report, or None
    without a checkpoint."""
    from pretrain.random_init import warn_random_init
    from pretrain.weights import is_exported_backbone, load_exported_into, load_into_encoder

    path = cfg.checkpoint
    if not path:
        warn_random_init(f"method '{cfg.method}' without a checkpoint: the backbone starts from random init")
        return None
    if is_exported_backbone(path):
        return load_exported_into(backbone.encoder, path)
    release = get_method(cfg.method).load_release
    report = release(backbone, cfg) if release else None
    if report is not None:
        return report
    unused = tuple(p[len("encoder."):] for p in backbone.unused_prefixes)  # names inside the encoder
    return load_into_encoder(backbone.encoder, path, cfg.allow_missing, unused=unused)


def backbone_for(cfg: BackboneConfig) -> Backbone:
    """Resolve, build, load: the backbone a config names, with its weights."""
    resolved = resolve(cfg)
    backbone = Backbone(resolved)
    backbone.load_report = load_weights(backbone, resolved)
    return backbone
