"""Models and datasets from a fine-tuning config, shared by the CLI commands and the trainers."""
from __future__ import annotations

import torch

from data_tools.config import to_container
from data_tools.transforms import IntensityConfig
from finetune.data.augment import AugmentConfig
from finetune.models.backbone import BackboneConfig, backbone_config_from_dict


def backbone_config(cfg) -> BackboneConfig:
    m = to_container(cfg.model)
    d = {k: m[k] for k in ("method", "modality", "encoder", "out_indices", "mona", "ivtuning")}
    return backbone_config_from_dict(dict(d, checkpoint=cfg.init.checkpoint, allow_missing=bool(cfg.init.allow_missing)))


def build_segmentor(cfg, device: str | torch.device = "cpu"):
    from finetune.models.segmentor import SegHeadConfig, Segmentor

    head = to_container(cfg.model.head)
    if head.get("class_weight") is not None:
        head["class_weight"] = tuple(float(w) for w in head["class_weight"])
    with torch.device(device):
        return Segmentor(backbone_config(cfg), SegHeadConfig(**head),
                         num_classes=len(cfg.data.classes), ignore_index=int(cfg.data.ignore_index))


def augment_config(cfg) -> AugmentConfig:
    a = to_container(cfg.data.augment)
    return AugmentConfig(**dict(a, ratio_range=tuple(a["ratio_range"])))


def intensity_config(cfg) -> IntensityConfig:
    i = to_container(cfg.data.intensity)
    return IntensityConfig(**dict(i, percentiles=tuple(i["percentiles"])))


def seg_dataset(cfg, split: str):
    """The validated dataset of a split ('train' or 'val') and its issues and frame count."""
    from finetune.data.pairs import discover
    from finetune.data.seg import SegDataset, SegDataSpec

    spec = SegDataSpec(num_classes=len(cfg.data.classes), ignore_index=int(cfg.data.ignore_index),
                       binary_labels=bool(cfg.data.binary_labels), crop_size=tuple(cfg.model.encoder.img_size),
                       augment=augment_config(cfg), intensity=intensity_config(cfg))
    split_file = cfg.data.train_split if split == "train" else (cfg.data.val_split or cfg.data.train_split)
    records, issues, found = discover(cfg.data, split_file)
    dataset, more = SegDataset(records, spec).validated()
    return dataset, issues + more, found


def backbone_component(name: str) -> str:
    """Report group of a fine-tuning model's parameter."""
    from pretrain.params import component

    if name.startswith("backbone.encoder."):
        return "backbone." + component(name[len("backbone."):])
    if name.startswith("backbone."):
        return "backbone." + name.split(".")[1]
    return name.split(".")[0]


def parameter_report(model) -> dict:
    from pretrain.params import parameter_report as report

    return report(model, model.trainable_names(), backbone_component, parts=("backbone", "head"),
                  backbone_prefix="backbone.")
