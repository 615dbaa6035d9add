"""Faster R-CNN as detectron2 trains it for ViTDet (PAD's and IV-tuning's detection), on torchvision's
modules.

The two libraries agree on anchors, matching, sampling, box coding and NMS and differ in three places:

- box regression loss: detectron2 L1 (smooth-L1 with beta 0) in the RPN and in the box head;
  torchvision smooth L1 with beta 1/9, fixed inside both losses, so the two loss steps are
  re-implemented here with the beta as a setting (same sampling, same normalisation);
- RoI pooling: detectron2's ROIAlignV2 (half-pixel aligned, sampling points adapted to the box);
  torchvision's MultiScaleRoIAlign has no ``aligned`` flag (unaligned, 2 x 2 points per bin);
- proposals kept per training image after the RPN's NMS: 1000 vs 2000 (a torchvision argument).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align

TORCHVISION_BETA = 1 / 9


def rpn_losses(rpn: RegionProposalNetwork, objectness: torch.Tensor, deltas: torch.Tensor, labels: list[torch.Tensor],
               targets: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness BCE over the sampled anchors; box loss summed over the positive ones and divided by
    the number sampled (both libraries' normalisation)."""
    positive, negative = (torch.where(torch.cat(s))[0] for s in rpn.fg_bg_sampler(labels))
    sampled = torch.cat([positive, negative])
    labels, targets = torch.cat(labels), torch.cat(targets)
    box = F.smooth_l1_loss(deltas[positive], targets[positive], beta=beta, reduction="sum") / sampled.numel()
    return F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled]), box


def box_head_losses(class_logits: torch.Tensor, deltas: torch.Tensor, labels: list[torch.Tensor],
                    targets: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the sampled RoIs; the box loss of each foreground RoI's own class, summed and
    divided by the number of sampled RoIs."""
    labels, targets = torch.cat(labels), torch.cat(targets)
    foreground = torch.where(labels > 0)[0]
    per_class = deltas.reshape(len(labels), -1, 4)
    box = F.smooth_l1_loss(per_class[foreground, labels[foreground]], targets[foreground], beta=beta,
                           reduction="sum") / labels.numel()
    return F.cross_entropy(class_logits, labels), box


class BetaRPN(RegionProposalNetwork):
    box_loss_beta = TORCHVISION_BETA

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        return rpn_losses(self, objectness, pred_bbox_deltas, labels, regression_targets, self.box_loss_beta)


class BetaRoIHeads(RoIHeads):
    box_loss_beta = TORCHVISION_BETA

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.has_mask() or self.keypoint_roi_pool is not None:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, deltas = self.box_predictor(pooled)
        classifier, box = box_head_losses(class_logits, deltas, labels, regression_targets, self.box_loss_beta)
        return [], {"loss_classifier": classifier, "loss_box_reg": box}


def set_box_loss_beta(faster_rcnn: nn.Module, beta: float) -> None:
    """Give a built torchvision Faster R-CNN this smooth-L1 beta in both box losses (0: L1). Only the
    loss step changes, so the built RPN and RoI heads are re-classed, not rebuilt: every setting and
    parameter they hold stays as built."""
    faster_rcnn.rpn.__class__ = BetaRPN
    faster_rcnn.roi_heads.__class__ = BetaRoIHeads
    faster_rcnn.rpn.box_loss_beta = faster_rcnn.roi_heads.box_loss_beta = float(beta)


class AlignedRoIPool(MultiScaleRoIAlign):
    """detectron2's ROIAlignV2 pooler: each box pooled from one level, the level chosen from the box's
    size (224 px on stride 16, one level per octave), with half-pixel-aligned RoIAlign and sampling
    points adapted to the box (``sampling_ratio`` 0). ``strides``: the levels' strides, finest first.
    A MultiScaleRoIAlign only in type, which torchvision's FasterRCNN requires of its pooler; the levels
    follow detectron2's rule rather than torchvision's LevelMapper (its epsilon sits outside the log)."""

    def __init__(self, featmap_names: list[str], strides: tuple[float, ...], output_size: int = 7,
                 sampling_ratio: int = 0):
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=224, canonical_level=4)
        if len(strides) != len(featmap_names):
            raise ValueError(f"one stride per level: {len(featmap_names)} levels, strides {list(strides)}")
        self.strides = tuple(strides)
        self.min_level = round(math.log2(strides[0]))

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        sizes = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_scale + 1e-8))
        return level.clamp(self.min_level, self.min_level + len(self.strides) - 1).long() - self.min_level

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(rois)
        first = x[self.featmap_names[0]]
        out = first.new_zeros(len(rois), first.shape[1], *self.output_size)
        for i, (name, stride) in enumerate(zip(self.featmap_names, self.strides)):
            at = torch.where(levels == i)[0]
            pooled = roi_align(x[name], rois[at], self.output_size, spatial_scale=1 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[at] = pooled.to(out.dtype)
        return out
