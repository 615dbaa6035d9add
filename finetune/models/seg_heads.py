"""Segmentation neck and heads (UperNet, Xiao et al. ECCV 2018; FCN auxiliary head, as in mmsegmentation;
SegFormer's all-MLP decoder, Xie et al. NeurIPS 2021; the linear probe of UNIP, Zhang et al. ICLR 2025),
written here because none of our libraries ships them (torchvision has an FPN but no UperNet;
mmsegmentation is not a dependency). They follow mmsegmentation's UPerHead / FCNHead / SegformerHead
and the MAE / BEiT segmentation neck.

``model.head.type`` names a registered :class:`SegHead`; a new head is one module that calls
:func:`register_seg_head`, imported at the end of this one (as the methods' modules are in methods.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from data_tools.registry import Registry


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class MultiLevelNeck(nn.Module):
    """Four stride-16 ViT maps -> strides 4 / 8 / 16 / 32: deconv x4, deconv x2, identity, max-pool."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(2)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 4:
            raise ValueError(f"the neck takes 4 feature maps, got {len(features)}")
        return [op(f) for op, f in zip((self.up4, self.up2, self.keep, self.down2), features)]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """Pyramid pooling (1, 2, 3, 6) on the coarsest map, FPN top-down fusion, fused 3x3, classifier."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.pools = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1))
                                    for s in pool_scales])
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = [_resize(pool(top), top.shape[2:]) for pool in self.pools]
        laterals = [lat(f) for lat, f in zip(self.laterals, features[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv block and a classifier on one level."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder, the head of IV-tuning's segmentation results: each level to
    ``channels`` by a 1x1 convolution (BatchNorm, ReLU, as mmsegmentation builds it), all upsampled
    to the finest level and concatenated finest first, fused by a 1x1 convolution (BatchNorm, ReLU),
    dropout, classifier. Every operation is per pixel: no pooling, so one frame per step trains."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.levels = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        outs = [level(f) for level, f in zip(self.levels, features)]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class LinearHead(nn.Module):
    """Linear probing as UNIP evaluates a frozen backbone: the stride-16 token maps of the chosen
    blocks (no neck, no normalisation) concatenated, then one 1x1 convolution to the classes. Its
    released configs build it as mmsegmentation's FCNHead with no convolution and no dropout, whose
    classifier starts at N(0, 0.01) with bias 0."""

    def __init__(self, in_channels: list[int], num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(sum(in_channels), num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        return self.classifier(torch.cat([features[0]] + [_resize(f, size) for f in features[1:]], dim=1))


@dataclass(frozen=True)
class SegHead:
    name: str  # model.head.type
    title: str  # how messages name it
    # ``build(in_channels, head_config, num_classes)``: the decode head (head_config: SegHeadConfig)
    build: Callable[[list[int], object, int], nn.Module]
    # True: reads the neck's 4 levels (strides 4 / 8 / 16 / 32) and may have the FCN auxiliary head;
    # False: the stride-16 token maps of any number of blocks as they are, no auxiliary head
    neck: bool = True


SEG_HEADS: Registry[SegHead] = Registry("segmentation head", "segmentation head type")


def register_seg_head(head: SegHead) -> SegHead:
    return SEG_HEADS.register(head.name, head)


def get_seg_head(name: str) -> SegHead:
    return SEG_HEADS.get(name)


register_seg_head(SegHead("upernet", "UperNet",
                          lambda chans, cfg, n: UperHead(chans, cfg.channels, n, dropout=cfg.dropout)))
register_seg_head(SegHead("segformer", "SegFormer's decoder",
                          lambda chans, cfg, n: SegFormerHead(chans, cfg.channels, n, dropout=cfg.dropout)))
register_seg_head(SegHead("linear", "the linear probe", lambda chans, cfg, n: LinearHead(chans, n), neck=False))
