"""Object detection fine-tuning: ``python -m finetune det --config ... --run-dir DIR [key=value ...]``.

Trains a ViTDet-style detector (torchvision Faster R-CNN, RetinaNet or FCOS) with the shared loop,
then evaluates the validation split with pycocotools: ``metrics.json`` (AP, AP50, AP75, APs/m/l,
per-class AP, log-average miss rate MR), ``predictions.json`` (COCO results format, original frame
pixels: before ``data.border_crop``), overlays.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_tools.files import atomic_write_text
from finetune.factory import build_detector, det_dataset
from finetune.data.det import crop_offset, whole_size
from finetune.data.eval_frames import rank_frames
from finetune.runner import FinetuneTask
from pretrain.engine import run
from finetune.schema import DetConfig


def detections_in_frame(pred: dict, scale: float, size: tuple[int, int], crop=(0, 0, 0, 0)) -> dict:
    """A frame's detections (:meth:`DetTask.predict_frame`'s, in the network input's pixels) in its
    file's pixels: scaled back by ``scale``, clipped to the frame of ``size`` (height, width), whose
    padding in the input is no part of it, and those left without area dropped (as detectron2's
    ``detector_postprocess``), then moved by the ``crop`` (top, bottom, left, right) cut off it."""
    height, width = size
    boxes = pred["boxes"] / scale
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep] + crop_offset(crop), "scores": pred["scores"][keep], "labels": pred["labels"][keep]}


class DetTask(FinetuneTask):
    """Object detection: a torchvision detector (Faster R-CNN, RetinaNet or FCOS) over a feature
    pyramid of the backbone's maps; COCO AP by pycocotools."""
    name = "det"
    schema = DetConfig
    best_metric = "AP"

    build_network = staticmethod(build_detector)
    dataset = staticmethod(det_dataset)

    def targets(self, batch: dict, device: torch.device) -> list[dict]:
        return [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]

    @torch.no_grad()
    def evaluate_split(self, model, cfg, dataset, device: torch.device, rank: int, world: int,
                       run_dir: Path, stop_requested: Callable[[], bool] | None = None) -> dict:
        """Predict this rank's frames, gather on rank 0, score with pycocotools. ``stop_requested``:
        asked before each frame (:func:`~finetune.data.eval_frames.rank_frames`)."""
        from finetune.coco_eval import coco_ground_truth, coco_metrics, coco_results
        from finetune.data.det import ScoringLimits, evaluation_truth
        from finetune.overlay import write_det_overlay

        model.eval()
        limits = ScoringLimits.of(cfg)
        indices, samples = rank_frames(dataset, rank, world, int(cfg.data.num_workers), stop_requested)
        frames, results = [], []
        names = list(cfg.data.classes)
        for n, (index, sample) in enumerate(zip(indices, samples)):
            scaled = self.predict_frame(model, cfg, sample, device)
            record = dataset.records[index]
            in_frame = detections_in_frame(scaled, sample["scale"], record.size, record.pair.crop)
            offset = crop_offset(record.pair.crop)  # the truth in the files' pixels too
            height, width = whole_size(record.size, record.pair.crop)
            boxes_scored, labels, ignore = evaluation_truth(record, limits)
            frames.append({"id": index + 1, "name": record.pair.name, "height": height, "width": width,
                           "boxes": boxes_scored + offset, "labels": labels, "ignore": ignore + offset})
            results += coco_results(index + 1, in_frame["boxes"], in_frame["scores"], in_frame["labels"])
            if rank == 0 and n < int(cfg.eval.overlays):
                write_det_overlay(run_dir / "overlays" / f"{record.pair.name}.png", sample, scaled,
                                  {"boxes": sample["boxes"] * sample["scale"], "labels": sample["labels"]}, names,
                                  float(cfg.eval.overlay_score))
        gathered = [(frames, results)]
        if dist.is_initialized() and world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (frames, results))
        frames = sorted((f for fs, _ in gathered for f in fs), key=lambda f: f["id"])
        results = [r for _, rs in gathered for r in rs]
        metrics = coco_metrics(coco_ground_truth(frames, names), results)
        metrics["frames"] = len(frames)
        if rank == 0:
            atomic_write_text(run_dir / "predictions.json", json.dumps(results))
        return metrics

    @staticmethod
    @torch.no_grad()
    def predict_frame(model, cfg, sample: dict, device: torch.device) -> dict:
        """One frame's detections (its network inputs, ``sample``, fitted to the input size): xyxy
        ``boxes`` in the input's pixels, ``scores``, ``labels`` (class indices), as numpy arrays."""
        get = (lambda key: torch.from_numpy(sample[key])[None].to(device) if key in sample else None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision != "fp32"):
            pred = model.predict(get("ir"), get("vi"))[0]
        return {"boxes": pred["boxes"].float().cpu().numpy(), "scores": pred["scores"].float().cpu().numpy(),
                "labels": pred["labels"].cpu().numpy()}

    def describe(self, m: dict) -> str:
        if m["AP"] is None:
            return ("no score: no object to score (every box of these frames is an ignore region or outside "
                    "eval.min_height / eval.max_occlusion / eval.border, or there are none)")
        missed = f", MR {100 * m['MR']:.1f}" if m.get("MR") is not None else ""
        return f"AP {100 * m['AP']:.1f}, AP50 {100 * m['AP50']:.1f}, AP75 {100 * m['AP75']:.1f}{missed}"


def train_det(cfg, run_dir: str | Path, overwrite: bool = False, eval_only: bool = False,
             config_name: str | None = None) -> None:
    """``config_name``: how messages name the config (its file)."""
    run(DetTask(config_name), cfg, run_dir, overwrite, eval_only)
