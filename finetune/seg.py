"""Semantic segmentation fine-tuning: ``python -m finetune seg --config ... --run-dir DIR [key=value ...]``.

Trains with the shared loop (DeepSpeed, checkpoints, exact resume, JSONL / TensorBoard), then
evaluates the validation split by sliding-window inference: ``metrics.json`` (mIoU, per-class
IoU, pixel accuracy from a confusion matrix summed over ranks), overlay PNGs, data reports.
Re-running the same command resumes training, or re-evaluates a finished run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from finetune.factory import build_segmentor, seg_dataset
from finetune.data.eval_frames import rank_frames
from finetune.runner import FinetuneTask
from pretrain.engine import run
from finetune.schema import SegConfig


class SegTask(FinetuneTask):
    """Semantic segmentation: a UperNet-style head over the backbone's maps; mIoU by sliding-window inference."""
    name = "seg"
    schema = SegConfig
    best_metric = "mIoU"

    build_network = staticmethod(build_segmentor)
    dataset = staticmethod(seg_dataset)

    def targets(self, batch: dict, device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate_split(self, model, cfg, dataset, device: torch.device, rank: int, world: int,
                       run_dir: Path, stop_requested: Callable[[], bool] | None = None) -> dict:
        """Sliding-window inference on this rank's share of the frames; the confusion matrix is summed
        over ranks. Rank 0 writes overlays of its first ``eval.overlays`` frames. ``stop_requested``:
        asked before each frame (:func:`~finetune.data.eval_frames.rank_frames`)."""
        from finetune.metrics import confusion_matrix, reduce_confusion, segmentation_metrics
        from finetune.overlay import write_seg_overlay

        model.eval()
        k, ignore = len(cfg.data.classes), int(cfg.data.ignore_index)
        indices, samples = rank_frames(dataset, rank, world, int(cfg.data.num_workers), stop_requested)
        cm = torch.zeros(k, k, dtype=torch.int64, device=device)
        for n, sample in enumerate(samples):
            pred = self.predict_frame(model, cfg, sample, device)
            label = torch.from_numpy(sample["label"]).to(device)
            cm += confusion_matrix(pred, label, k, ignore)
            if rank == 0 and n < int(cfg.eval.overlays):
                write_seg_overlay(run_dir / "overlays" / f"{sample['name']}.png", sample, pred.cpu().numpy(),
                                  label.cpu().numpy(), ignore)
        cm = reduce_confusion(cm)
        frames = torch.tensor([len(indices)], device=device)
        if dist.is_initialized():
            dist.all_reduce(frames)
        metrics = segmentation_metrics(cm.cpu(), list(cfg.data.classes))
        metrics["frames"] = int(frames.item())
        metrics["confusion_matrix"] = cm.cpu().tolist()
        return metrics

    @staticmethod
    @torch.no_grad()
    def predict_frame(model, cfg, sample: dict, device: torch.device) -> torch.Tensor:
        """(H, W) class indices of one frame (its network inputs, ``sample``) by sliding-window
        inference over windows of the training input size, on the frame rescaled to fit
        ``data.img_scale`` (where set) and scored back at its own size, as mmsegmentation tests."""
        from torch.nn import functional as F

        from finetune.data.augment import scale_factor, scaled_size
        from finetune.factory import img_scale
        from finetune.models.segmentor import slide_inference, slide_stride

        crop = tuple(cfg.model.encoder.img_size)
        stride = slide_stride(cfg.eval.stride, crop)
        size = next(sample[k].shape[-2:] for k in ("ir", "vi") if k in sample)
        scaled = scaled_size(*size, scale_factor(*size, 1.0, img_scale(cfg)))

        def get(key):
            if key not in sample:
                return None
            x = torch.from_numpy(sample[key])[None].to(device)
            # bilinear on the normalised input: the resize of the frame before its (affine) normalisation
            return F.interpolate(x, size=scaled, mode="bilinear", align_corners=False) if scaled != size else x

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision != "fp32"):
            scores = slide_inference(model, get("ir"), get("vi"), crop, stride, int(cfg.eval.windows_per_batch),
                                     out_size=size)
        return scores.argmax(dim=1)[0]

    def describe(self, m: dict) -> str:
        return f"mIoU {100 * m['mIoU']:.2f}, pixel accuracy {100 * m['pixel_accuracy']:.2f}"


def train_seg(cfg, run_dir: str | Path, overwrite: bool = False, eval_only: bool = False,
             config_name: str | None = None) -> None:
    """``config_name``: how messages name the config (its file)."""
    run(SegTask(config_name), cfg, run_dir, overwrite, eval_only)
