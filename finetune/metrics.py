"""Segmentation metrics from a confusion matrix (summed over ranks before any ratio is taken)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored pixels not counted."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        cm = cm.clone()
        dist.all_reduce(cm)
    return cm


def segmentation_metrics(cm: torch.Tensor, class_names: list[str]) -> dict:
    """mIoU over classes present in the ground truth or the prediction (a class absent from both
    has no IoU and is reported as null), per-class IoU and accuracy, pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(len(class_names))]
    acc = [float(tp[k] / gt[k]) if gt[k] > 0 else None for k in range(len(class_names))]
    valid = [v for v in iou if v is not None]
    total = float(cm.sum())
    return {
        "mIoU": sum(valid) / len(valid) if valid else 0.0,
        "pixel_accuracy": float(tp.sum()) / total if total else 0.0,
        "mean_accuracy": (sum(a for a in acc if a is not None) / max(sum(a is not None for a in acc), 1)),
        "per_class_iou": dict(zip(class_names, iou)),
        "per_class_accuracy": dict(zip(class_names, acc)),
        "pixels": int(total),
    }
