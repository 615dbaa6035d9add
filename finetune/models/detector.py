"""ViTDet-style detection on our backbone, with torchvision's detectors (anchors, matching, sampling
and NMS are torchvision's; Faster R-CNN takes detectron2's losses and RoI pooling by default, as ViTDet
trains, see finetune.models.rcnn_rules).

The last block's map (stride 16) becomes strides 4 / 8 / 16 / 32 (deconv x2 twice, deconv,
identity, max-pool), each projected to ``channels`` by a 1x1 and a 3x3 conv with LayerNorm, and
a stride-64 level by max-pooling the last (ViTDet's simple feature pyramid). Faster R-CNN is the
default; RetinaNet and FCOS are config values.

torchvision passes one image tensor to the backbone, so the modalities travel stacked on the
channel axis (infrared first, then visible) and are split again here. Inputs arrive normalised
and already at the network size: torchvision's transform is set to leave them unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from data_tools.registry import Registry
from finetune.models.backbone import Backbone, BackboneConfig

LEVELS = ("p2", "p3", "p4", "p5", "p6")
BOX_HEADS = ("mlp", "conv")


@dataclass(frozen=True)
class DetHeadConfig:
    detector: str = "faster_rcnn"
    channels: int = 256
    score_threshold: float = 0.05
    detections_per_image: int = 100
    roi_samples_per_image: int = 512  # Faster R-CNN: RoIs sampled per training image (a quarter positive)
    anchor_sizes: list[int] | None = None  # base anchor per level p2..p6; None: the detector's own
    # Faster R-CNN's heads. box_head "mlp": torchvision's two 1024-wide layers; "conv": ViTDet's four
    # 3x3 convs with LayerNorm and one 1024-wide layer (PAD's and IV-tuning's detection use these).
    # rpn_convs: 3x3 convs before the RPN's outputs (ViTDet: 2). None: ViTDet's. The defaults are
    # what runs saved before these settings existed trained with.
    box_head: str | None = "mlp"
    rpn_convs: int | None = 1
    # Faster R-CNN's training rules (finetune.models.rcnn_rules). None: detectron2's, as ViTDet trains
    # (L1, 1000, aligned); the defaults are torchvision's, what runs saved before these existed used.
    box_loss_beta: float | None = 1 / 9  # smooth-L1 beta of the RPN's and the box head's box losses
    rpn_post_nms_train: int | None = 2000  # proposals kept per training image after the RPN's NMS
    aligned_roi_pool: bool | None = False  # detectron2's ROIAlignV2 pooling (else torchvision's)


def _anchor_bases(head: DetHeadConfig, default: tuple[int, ...]) -> tuple[int, ...]:
    sizes = tuple(head.anchor_sizes) if head.anchor_sizes else default
    if len(sizes) != len(LEVELS) or min(sizes) <= 0:
        raise ValueError(f"model.head.anchor_sizes needs {len(LEVELS)} positive sizes (one per level "
                         f"{', '.join(LEVELS)}), got {list(sizes)}")
    return sizes


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over the channels of each position (ViTDet's norm in the pyramid and the box head),
    with detectron2's epsilon, 1e-6 (mmdetection's LN2d for ViTDet has the same)."""

    def __init__(self, channels: int):
        super().__init__(1, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    def __init__(self, backbone: Backbone, channels: int):
        super().__init__()
        self.backbone = backbone
        d = backbone.embed_dim
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2)),
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        dims = (d // 4, d // 2, d, d)
        self.outputs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), LayerNorm2d(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
            for c in dims])
        self.out_channels = channels
        patch = backbone.cfg.encoder.patch_size
        self.strides = tuple(patch * f for f in (0.25, 0.5, 1, 2, 4))  # p2 .. p6

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        modality = self.backbone.cfg.modality
        if modality == "ir":
            return x[:, :1], None
        if modality == "vi":
            return None, x[:, :3]
        return x[:, :1], x[:, 1:4]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        top = self.backbone(*self.split(x))[-1]
        maps = [out(scale(top)) for scale, out in zip(self.scales, self.outputs)]
        maps.append(F.max_pool2d(maps[-1], 1, stride=2))
        return OrderedDict(zip(LEVELS, maps))


# One builder per torchvision detector, by name (``model.head.detector``). ``common``: the
# transform settings every detector shares (our inputs are normalised already).

def _faster_rcnn(pyramid: SimpleFeaturePyramid, num_classes: int, head: DetHeadConfig, common: dict) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    from finetune.models.rcnn_rules import TORCHVISION_BETA, AlignedRoIPool, set_box_loss_beta

    if head.roi_samples_per_image < 1:
        raise ValueError(f"model.head.roi_samples_per_image must be at least 1, got {head.roi_samples_per_image}")
    box_head = head.box_head or "conv"
    rpn_convs = head.rpn_convs or 2
    if box_head not in BOX_HEADS or rpn_convs < 1:
        raise ValueError(f"model.head.box_head must be one of {BOX_HEADS} and rpn_convs at least 1, got "
                         f"{box_head!r}, {rpn_convs}")
    # 8x the level's stride, as torchvision's and ViTDet's FPN Faster R-CNN.
    sizes = tuple((s,) for s in _anchor_bases(head, (32, 64, 128, 256, 512)))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    boxes = {}
    if box_head == "conv":
        box_head = FastRCNNConvFCHead((pyramid.out_channels, 7, 7), [pyramid.out_channels] * 4, [1024],
                                      norm_layer=LayerNorm2d)
        boxes = dict(box_head=box_head, box_predictor=FastRCNNPredictor(1024, num_classes + 1))
    aligned = head.aligned_roi_pool is not False
    names = list(LEVELS[:4])
    pool = AlignedRoIPool(names, pyramid.strides[:4]) if aligned else MultiScaleRoIAlign(names, 7, 2)
    model = FasterRCNN(pyramid, num_classes=None if boxes else num_classes + 1, rpn_anchor_generator=anchors,
                       rpn_head=RPNHead(pyramid.out_channels, anchors.num_anchors_per_location()[0],
                                        conv_depth=rpn_convs),
                       rpn_post_nms_top_n_train=head.rpn_post_nms_train or 1000, box_roi_pool=pool,
                       box_score_thresh=head.score_threshold, box_detections_per_img=head.detections_per_image,
                       box_batch_size_per_image=head.roi_samples_per_image, **boxes, **common)
    beta = 0.0 if head.box_loss_beta is None else head.box_loss_beta
    if beta != TORCHVISION_BETA:
        set_box_loss_beta(model, beta)
    return model


def _retinanet(pyramid: SimpleFeaturePyramid, num_classes: int, head: DetHeadConfig, common: dict) -> nn.Module:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    # RetinaNet's anchors are 4x the level's stride with 3 octave scales (32 on stride 8); our
    # pyramid starts at stride 4, so 16 ... 256: 32 at stride 4 misses small infrared targets.
    bases = _anchor_bases(head, (16, 32, 64, 128, 256))
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in bases)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(pyramid, num_classes=num_classes + 1, anchor_generator=anchors,
                     score_thresh=head.score_threshold, detections_per_img=head.detections_per_image, **common)


def _fcos(pyramid: SimpleFeaturePyramid, num_classes: int, head: DetHeadConfig, common: dict) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(((4,), (8,), (16,), (32,), (64,)), ((1.0,),) * 5)  # one point per location
    return FCOS(pyramid, num_classes=num_classes + 1, anchor_generator=anchors,
                score_thresh=head.score_threshold, detections_per_img=head.detections_per_image, **common)


# model.head.detector: ``build(pyramid, num_classes, head_config, common torchvision arguments)``
DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detector", "detector")
DETECTORS.register("faster_rcnn", _faster_rcnn)
DETECTORS.register("retinanet", _retinanet)
DETECTORS.register("fcos", _fcos)


def _build_torchvision(kind: str, pyramid: SimpleFeaturePyramid, num_classes: int, size: tuple[int, int],
                       head: DetHeadConfig, channels: int) -> nn.Module:
    build = DETECTORS.get(kind)
    common = dict(min_size=min(size), max_size=max(size), image_mean=[0.0] * channels, image_std=[1.0] * channels,
                  size_divisible=1)
    return build(pyramid, num_classes, head, common)


class Detector(nn.Module):
    """Class indices are 0..K-1 outside; torchvision's models get 1..K (0 is background)."""

    backbone_prefix = "model.backbone.backbone."

    def __init__(self, backbone_cfg: BackboneConfig, head: DetHeadConfig, num_classes: int):
        super().__init__()
        pyramid = SimpleFeaturePyramid(Backbone(backbone_cfg), head.channels)
        channels = {"ir": 1, "vi": 3, "both": 4}[backbone_cfg.modality]
        self.model = _build_torchvision(head.detector, pyramid, num_classes, backbone_cfg.encoder.img_size, head,
                                        channels)
        self.num_classes = num_classes
        self.modality = backbone_cfg.modality

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone.backbone

    def trainable_names(self) -> set[str]:
        inner = {f"model.backbone.backbone.{n}" for n in self.backbone.trainable_names()}
        return inner | {n for n, _ in self.named_parameters() if not n.startswith("model.backbone.backbone.")}

    def stack(self, ir: torch.Tensor | None, vi: torch.Tensor | None) -> torch.Tensor:
        """The configured modalities on the channel axis (infrared first)."""
        wanted = {"ir": (ir,), "vi": (vi,), "both": (ir, vi)}[self.modality]
        if any(t is None for t in wanted):
            raise ValueError(f"modality '{self.modality}' needs {'both images' if len(wanted) == 2 else 'that image'}")
        return torch.cat(wanted, dim=1)

    def forward(self, ir: torch.Tensor | None, vi: torch.Tensor | None, targets: list[dict]) -> torch.Tensor:
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        losses = self.model(list(self.stack(ir, vi)), targets)
        return sum(losses.values())

    @torch.no_grad()
    def predict(self, ir: torch.Tensor | None, vi: torch.Tensor | None) -> list[dict]:
        out = self.model(list(self.stack(ir, vi)))
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]
