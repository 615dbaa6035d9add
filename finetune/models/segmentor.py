"""Backbone + multi-level neck + a registered decode head (UperNet, SegFormer's decoder; + FCN auxiliary
head), or backbone + a neckless head (the linear probe): training loss and sliding-window inference."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from finetune.models.backbone import Backbone, BackboneConfig
from finetune.models.seg_heads import FCNHead, MultiLevelNeck, get_seg_head


@dataclass(frozen=True)
class SegHeadConfig:
    # a registered head (finetune.models.seg_heads): upernet: neck + UperNet + FCN auxiliary head (PAD, MAE
    # fine-tuning); segformer: neck + SegFormer's all-MLP decoder (IV-tuning's head; its configs have no
    # auxiliary head: aux_weight 0); linear: UNIP's linear probe (the settings below are unused by it)
    type: str = "upernet"
    channels: int = 768  # the decoder's channels (768 for ViT-B, as in MAE / PAD segmentation)
    aux_channels: int = 256
    aux_weight: float = 0.4
    aux_level: int = 2  # the neck level the auxiliary head reads (stride 16)
    dropout: float = 0.1
    class_weight: tuple[float, ...] | None = None  # cross-entropy weights (e.g. rare small targets)


class Segmentor(nn.Module):
    backbone_prefix = "backbone."

    def __init__(self, backbone_cfg: BackboneConfig, head: SegHeadConfig, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.backbone = Backbone(backbone_cfg)
        dim = self.backbone.embed_dim
        levels = len(self.backbone.out_indices)
        decoder = get_seg_head(head.type)
        if decoder.neck:
            self.neck = MultiLevelNeck(dim)
            self.decode_head = decoder.build([dim] * 4, head, num_classes)
            self.aux_head = (FCNHead(dim, head.aux_channels, num_classes, dropout=head.dropout)
                             if head.aux_weight else None)
        else:
            self.neck, self.aux_head = nn.Identity(), None
            self.decode_head = decoder.build([dim] * levels, head, num_classes)
        self.head_cfg = head
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if head.class_weight is not None and len(head.class_weight) != num_classes:
            raise ValueError(f"class_weight has {len(head.class_weight)} values for {num_classes} classes")
        weight = torch.tensor(head.class_weight, dtype=torch.float32) if head.class_weight else None
        self.register_buffer("class_weight", weight, persistent=False)

    def trainable_names(self) -> set[str]:
        backbone = {f"backbone.{n}" for n in self.backbone.trainable_names()}
        return backbone | {n for n, _ in self.named_parameters() if not n.startswith("backbone.")}

    def logits(self, ir: torch.Tensor | None, vi: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        levels = self.neck(self.backbone(ir, vi))
        out = self.decode_head(levels)
        aux = self.aux_head(levels[self.head_cfg.aux_level]) if self.aux_head is not None else None
        return out, aux

    def forward(self, ir: torch.Tensor | None, vi: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (ignore index honoured) on logits upsampled to the label size, + aux x weight."""
        out, aux = self.logits(ir, vi)
        loss = self._ce(out, target)
        if aux is not None:
            loss = loss + self.head_cfg.aux_weight * self._ce(aux, target)
        return loss

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), target, weight=self.class_weight, ignore_index=self.ignore_index)

    @torch.no_grad()
    def predict(self, ir: torch.Tensor | None, vi: torch.Tensor | None) -> torch.Tensor:
        """Class logits at input resolution for one crop-sized input."""
        out, _ = self.logits(ir, vi)
        size = (ir if ir is not None else vi).shape[-2:]
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False).float()


@torch.no_grad()
def slide_stride(stride: int | tuple[int, int] | None, crop: tuple[int, int]) -> tuple[int, int]:
    """``eval.stride`` as (height, width): one number for both, or, unset, 2/3 of the crop
    (mmsegmentation's slide inference)."""
    if not stride:
        return tuple(max(1, 2 * c // 3) for c in crop)
    return (stride, stride) if isinstance(stride, int) else tuple(stride)


def slide_inference(model: Segmentor, ir: torch.Tensor | None, vi: torch.Tensor | None, crop: tuple[int, int],
                    stride: tuple[int, int], windows_per_batch: int, out_size: tuple[int, int] | None = None
                    ) -> torch.Tensor:
    """Class scores (N, K, H, W) for images of any size: crop-sized windows at ``stride`` (the last
    window flush with the border), padded with zeros when the image is smaller than the crop, their
    logits averaged where windows overlap, resized (bilinear) to ``out_size`` when given (the frame's
    own size, when it was rescaled for inference), then the softmax: mmsegmentation's 'slide' mode.
    Windows go through the model ``windows_per_batch`` at a time (mmsegmentation runs one at a time:
    a CPU took 3-4x longer on frames of 36 small windows); eval mode makes the batching invisible."""
    if windows_per_batch < 1:
        raise ValueError(f"eval.windows_per_batch must be at least 1, got {windows_per_batch}")
    ref = ir if ir is not None else vi
    n, _, h, w = ref.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    pad = (lambda t: F.pad(t, (0, pw, 0, ph)) if t is not None else None)
    ir, vi = pad(ir), pad(vi)
    hh, ww = h + ph, w + pw
    ys = list(range(0, max(hh - ch, 0) + 1, stride[0]))
    xs = list(range(0, max(ww - cw, 0) + 1, stride[1]))
    if ys[-1] + ch < hh:
        ys.append(hh - ch)
    if xs[-1] + cw < ww:
        xs.append(ww - cw)
    corners = [(y, x) for y in ys for x in xs]
    scores = torch.zeros(n, model.num_classes, hh, ww, device=ref.device)
    counts = torch.zeros(1, 1, hh, ww, device=ref.device)
    per_batch = max(1, windows_per_batch // n)
    for first in range(0, len(corners), per_batch):
        group = corners[first:first + per_batch]
        cut = (lambda t: torch.cat([t[..., y:y + ch, x:x + cw] for y, x in group]) if t is not None else None)
        out = model.predict(cut(ir), cut(vi))
        for (y, x), window_scores in zip(group, out.split(n)):
            scores[..., y:y + ch, x:x + cw] += window_scores
            counts[..., y:y + ch, x:x + cw] += 1
    logits = (scores / counts)[..., :h, :w]
    if out_size is not None and tuple(out_size) != (h, w):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)
