"""Models and datasets from a fine-tuning config, shared by the CLI commands and the trainers."""
from __future__ import annotations

from pathlib import Path

import torch

from data_tools.config import to_container
from data_tools.transforms import IR_MEAN, IR_STD, IntensityConfig
from finetune.data.augment import AugmentConfig
from finetune.models.backbone import BackboneConfig, backbone_config_from_dict
from finetune.weights import load_weights, resolve


def backbone_config(cfg) -> BackboneConfig:
    m = to_container(cfg.model)
    d = {k: m[k] for k in ("method", "modality", "encoder", "out_indices", "mona", "ivtuning")}
    later = ("rel_pos_bias", "layer_scale", "window_size", "global_blocks", "decomposed_rel_pos")
    d.update({k: m[k] for k in later if k in m})  # absent from earlier runs' configs
    return backbone_config_from_dict(dict(d, checkpoint=cfg.init.checkpoint, allow_missing=bool(cfg.init.allow_missing),
                                           pad_scale=cfg.init.pad_scale))


def build_segmentor(cfg, device: str | torch.device = "cpu"):
    from finetune.models.segmentor import SegHeadConfig, Segmentor

    head = to_container(cfg.model.head)
    if head.get("class_weight") is not None:
        head["class_weight"] = tuple(float(w) for w in head["class_weight"])
    backbone_cfg = resolve(backbone_config(cfg))
    with torch.device(device):
        model = Segmentor(backbone_cfg, SegHeadConfig(**head), num_classes=len(cfg.data.classes),
                          ignore_index=int(cfg.data.ignore_index))
    return _with_weights(model, backbone_cfg, device)


def _with_weights(model, backbone_cfg: BackboneConfig, device):
    """Load the backbone's weights (a separate step from building; none on the meta device, which
    only reports shapes)."""
    if torch.device(device).type != "meta":
        model.backbone.load_report = load_weights(model.backbone, backbone_cfg)
    return model


def augment_config(cfg) -> AugmentConfig:
    a = to_container(cfg.data.augment)
    return AugmentConfig(**dict(a, ratio_range=tuple(a["ratio_range"])))


def img_scale(cfg) -> tuple[int, int] | None:
    """``data.img_scale``: the (long, short) size segmentation frames are rescaled to fit, in training
    (times the random ratio) and evaluation; None: the frames' own size."""
    scale = cfg.data.get("img_scale")
    return (int(scale[0]), int(scale[1])) if scale else None


def intensity_config(cfg) -> IntensityConfig:
    i = to_container(cfg.data.intensity)
    return IntensityConfig(**dict(i, percentiles=tuple(i["percentiles"])))


def recorded_input(cfg) -> dict | None:
    """How the backbone's pre-training normalised its input, as its export records it (None: not
    an export, or one written before exports recorded it)."""
    from pretrain.backbone_meta import is_exported_backbone, read_backbone_meta

    path = cfg.init.checkpoint
    return read_backbone_meta(path)["input"] if path and is_exported_backbone(path) else None


def ir_normalisation(cfg) -> tuple[float, float]:
    """The infrared (mean, std) the backbone was pre-trained with; PAD's without a record."""
    recorded = recorded_input(cfg)
    return (float(recorded["mean"]), float(recorded["std"])) if recorded else (IR_MEAN, IR_STD)


def intensity_rule_mismatch(cfg) -> str | None:
    """A warning when ``data.intensity`` scales 16-bit frames unlike the backbone's pre-training."""
    recorded = recorded_input(cfg)
    if recorded is None or recorded["intensity"] == to_container(cfg.data.intensity):
        return None
    return (f"warning: {cfg.init.checkpoint} was pre-trained with the 16-bit rule {recorded['intensity']}, "
            f"data.intensity is {to_container(cfg.data.intensity)}: 16-bit frames will be scaled differently")


def split_list(data, split: str) -> str | None:
    """The split list file of 'train' or 'val' (val falls back to the training list)."""
    return data.train_split if split == "train" else (data.val_split or data.train_split)


def data_for_split(cfg, split: str):
    """``cfg.data`` as one split ('train' or 'val') reads it: ``{split}`` in the folder names,
    split lists and box path becomes ``data.split_dirs[split]`` (datasets published as
    ``train/ir``, ``test/ir``, ...), the validation split's boxes are ``data.val_boxes`` where
    given, and a relative box path is taken from ``data.root``."""
    from omegaconf import OmegaConf

    d = to_container(cfg.data)
    apart = d.get("val_boxes") or {}
    if split == "val" and apart.get("path"):
        d["boxes"] = {"format": apart.get("format") or d["boxes"]["format"], "path": apart["path"]}
    folder = (d.get("split_dirs") or {}).get(split)

    def fill(value, key):
        if not isinstance(value, str) or "{split}" not in value:
            return value
        if folder is None:
            raise ValueError(f"data.{key} is {value!r}, but data.split_dirs.{split} is not set")
        return value.replace("{split}", folder)

    d["dirs"] = {k: fill(v, f"dirs.{k}") for k, v in d["dirs"].items()}
    for key in ("train_split", "val_split"):
        d[key] = fill(d[key], key)
    if d.get("boxes") and d["boxes"].get("path"):
        path = Path(fill(d["boxes"]["path"], "boxes.path"))
        d["boxes"]["path"] = str(path if path.is_absolute() or d["root"] is None else Path(d["root"]) / path)
    return OmegaConf.create(d)


def seg_spec(cfg):
    """The segmentation data settings of a config (classes, crops, augmentation, normalisation)."""
    from finetune.data.seg import SegDataSpec

    mean, std = ir_normalisation(cfg)
    return SegDataSpec(num_classes=len(cfg.data.classes), ignore_index=int(cfg.data.ignore_index),
                       binary_labels=bool(cfg.data.binary_labels), crop_size=tuple(cfg.model.encoder.img_size),
                       img_scale=img_scale(cfg), augment=augment_config(cfg), intensity=intensity_config(cfg),
                       ir_mean=mean, ir_std=std)


def seg_dataset(cfg, split: str):
    """The validated dataset of a split ('train' or 'val') and its issues and frame count."""
    from finetune.data.pairs import discover
    from finetune.data.seg import SegDataset

    data = data_for_split(cfg, split)
    records, issues, found = discover(data, split_list(data, split))
    dataset, more = SegDataset(records, seg_spec(cfg)).validated()
    return dataset, issues + more, found


def parameter_report(model) -> dict:
    """The parameter report of a segmentor or detector: ``backbone`` = encoder + method modules."""
    from pretrain.params import component
    from pretrain.params import parameter_report as report

    prefix = model.backbone_prefix

    def component_of(name: str) -> str:
        if name.startswith(prefix + "encoder."):
            return "backbone." + component(name[len(prefix):])
        if name.startswith(prefix):
            return "backbone." + name[len(prefix):].split(".")[0]
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "model" else parts[0]  # torchvision: model.rpn, model.roi_heads

    return report(model, model.trainable_names(), component_of, parts=("backbone", "head"), backbone_prefix=prefix)


def build_detector(cfg, device: str | torch.device = "cpu"):
    from finetune.models.detector import DetHeadConfig, Detector

    backbone_cfg = resolve(backbone_config(cfg))
    with torch.device(device):
        model = Detector(backbone_cfg, DetHeadConfig(**to_container(cfg.model.head)), num_classes=len(cfg.data.classes))
    return _with_weights(model, backbone_cfg, device)


def det_dataset(cfg, split: str):
    """The dataset of a split with its boxes read under the documented rules, its issues and frame count."""
    from finetune.data.classes import label_id_names
    from finetune.data.det import DetDataset, DetDataSpec, build_records
    from finetune.data.pairs import discover, name_suffix, split_names

    a = to_container(cfg.data.augment)
    mean, std = ir_normalisation(cfg)
    spec = DetDataSpec(classes=tuple(cfg.data.classes), input_size=tuple(cfg.model.encoder.img_size),
                       scale_range=tuple(a["scale_range"]), hflip=float(a["hflip"]),
                       photometric=bool(a["photometric"]), intensity=intensity_config(cfg),
                       ir_mean=mean, ir_std=std)
    data = data_for_split(cfg, split)
    split_file = split_list(data, split)
    pairs, issues, found = discover(data, split_file, need_label=False)
    records, more = build_records(pairs, data.boxes, spec.classes, split_names(data, split_file),
                                  name_suffix(data, "ir"), tuple(data.get("ignore_classes") or ()),
                                  label_id_names(data), dict(data.get("class_aliases") or {}))
    return DetDataset(records, spec), issues + more, found
