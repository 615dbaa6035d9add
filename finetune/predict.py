"""A trained run applied to new frames without labels:
``python -m finetune predict RUN_DIR --ir DIR [--vi DIR] --out OUT`` (or ``--packed DIR``: MFNet's
4-channel images, RGB + thermal in one file).

The run's model is rebuilt in one process from its config and a checkpoint (``best`` when the run
kept one, else the newest; the frozen weights are checked against the checkpoint's record), and
each frame goes through the same input normalisation and inference as the run's evaluation:
segmentation by sliding windows of the training input size, detection on the frame fitted to it
(after the run's ``data.border_crop``).

Writes ``OUT/masks/<name>.png`` (segmentation: class indices) or ``OUT/detections.json``
(detection: COCO format, boxes in the frame's pixels), overlays of the first frames, and
``OUT/predict_report.json`` (checkpoint, frames predicted, frames left out and why).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from data_tools.files import atomic_write_text
from data_tools.imageio import write_png
from data_tools.sources import nested_images_note
from finetune.coco_eval import coco_results
from finetune.data.pairs import PairRecord, border_crop, discover, name_suffix, summarise_issues
from finetune.data.seg import read_checked_pair


def frame_pairs(ir: str | None, vi: str | None, packed: str | None = None, name_suffixes: dict | None = None
                ) -> tuple[list[PairRecord], list[dict], int]:
    """Records of the frames in the ``ir`` / ``vi`` folders, paired by name as training pairs them
    (a frame without its partner is an issue; ``name_suffixes``: how the stems of each modality's
    files end after the frame name, as the run's ``data.name_suffixes``), or of the ``packed``
    folder's 4-channel images (the mfnet layout), the issues and the number of names seen."""
    from omegaconf import OmegaConf

    def folder(f):
        return str(Path(f).resolve()) if f else None

    if packed:
        data = {"layout": "mfnet", "dirs": {"image": folder(packed), "label": None}}
    else:
        data = {"layout": "pairs", "dirs": {"ir": folder(ir), "vi": folder(vi), "label": None},
                "name_suffixes": dict(name_suffixes or {})}
    return discover(OmegaConf.create(dict(data, root="/", label_suffix="")), None, need_label=False)


def _task(cfg):
    from finetune.det import DetTask
    from finetune.seg import SegTask

    return DetTask() if "boxes" in cfg.data else SegTask()


def _check_modality(modality: str, given: set[str], detection: bool) -> None:
    """The folders a model of ``modality`` takes, as in training: its own; a segmentation model of
    both infrared, with or without visible (infrared alone is fed to both streams); a detector of
    both stacks the two images, so it takes both."""
    if modality == "both" and detection and given != {"ir", "vi"}:
        raise ValueError("the run's detector takes infrared and visible frames (model.modality=both): "
                         "give --ir and --vi")
    if modality == "both" and "ir" not in given:
        raise ValueError("the run's model takes infrared and visible frames (model.modality=both): give --ir, "
                         "and --vi where there are visible frames")
    if modality != "both" and given != {modality}:
        raise ValueError(f"the run's model takes model.modality={modality} frames only: give --{modality} alone")


def _earlier_files(out: Path, predicted: list[str], overlays: int, detection: bool) -> list[str]:
    """The masks and overlays in ``out`` this run did not write (an earlier predict into the same folder):
    named in the report and said, so that a folder of masks is not taken for this run's alone."""
    wrote = {f"overlays/{name}.png" for name in predicted[:overlays]}
    if not detection:
        wrote |= {f"masks/{name}.png" for name in predicted}
    found = (p.relative_to(out).as_posix() for folder in ("masks", "overlays") for p in (out / folder).glob("*.png"))
    return sorted(rel for rel in found if rel not in wrote)


def predict_run(run_dir: str | Path, out: str | Path, ir: str | None = None, vi: str | None = None,
                tag: str | None = None, overlays: int = 8, device: str | None = None, min_score: float = 0.0,
                packed: str | None = None) -> dict:
    """Predict every frame of the ``ir`` / ``vi`` folders (or of ``packed``'s 4-channel images, which
    hold both) with the run's model; returns the report.
    ``min_score``: detections scoring lower are not written (all the detector keeps by default)."""
    from data_tools.files import FINETUNE_RUNS
    from finetune.data.augment import network_inputs, pad_inputs, whole_frame_intensity
    from finetune.data.det import fit_to_input, whole_size
    from finetune.det import detections_in_frame
    from finetune.factory import intensity_config, ir_normalisation
    from finetune.overlay import write_det_overlay, write_seg_overlay
    from pretrain.engine.trained import load_trained, run_config

    run_dir, out = Path(run_dir), Path(out)
    run_cfg = run_config(run_dir, FINETUNE_RUNS)
    task = _task(run_cfg)
    if packed and (ir or vi):
        raise ValueError("give the frames one way: --packed DIR (4-channel images), or --ir / --vi folders")
    modality = run_cfg.model.modality
    if packed:  # a packed image holds both; a single-modality model reads its own, as in training
        given = {"ir", "vi"} if modality == "both" else {modality}
    else:
        given = {m for m, folder in (("ir", ir), ("vi", vi)) if folder}
    _check_modality(modality, given, "boxes" in run_cfg.data)
    suffixes = {m: name_suffix(run_cfg.data, m) for m in ("ir", "vi")}  # FLIR-aligned: one folder, two suffixes
    records, issues, found = frame_pairs(ir, vi, packed, suffixes)
    if not found:
        given_folders = {"ir": ir, "vi": vi}
        ending = " or ".join(f"{m} files ending in {s!r}" for m, s in suffixes.items() if s and given_folders[m])
        folders = [f for f in (ir, vi, packed) if f]
        raise FileNotFoundError(f"no image files in {' or '.join(folders)}"
                                + (f" ({ending}, as the run's data.name_suffixes)" if ending else "")
                                + nested_images_note(folders))
    if tag is None and (run_dir / "checkpoints" / "best" / "best.json").is_file():
        tag = "best"  # the evaluation's best step, where the run kept one (load_trained verifies it)
    model, tag, cfg = load_trained(run_dir, task.build_network, FINETUNE_RUNS, tag)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    mean, std = ir_normalisation(cfg)
    intensity, classes, detection = intensity_config(cfg), list(cfg.data.classes), "boxes" in cfg.data
    crop = border_crop(cfg.data)  # the frames as the run saw them
    images, detections, predicted = [], [], []
    for record in records:
        frames, problem = read_checked_pair(replace(record, crop=crop))
        if problem:
            issues.append(problem)
            continue
        height, width = next(f.shape[:2] for f in frames.values() if f is not None)
        frames = whole_frame_intensity(frames, intensity)
        if detection:  # as the run's evaluation: the frame fitted to the input size
            frames, scale = fit_to_input(frames, tuple(cfg.model.encoder.img_size))
        sample = dict(network_inputs(frames["ir"], frames["vi"], intensity, mean, std), name=record.name)
        if detection:
            sample = pad_inputs(sample, *cfg.model.encoder.img_size)
        pred = task.predict_frame(model, cfg, sample, dev)
        overlay = out / "overlays" / f"{record.name}.png" if len(predicted) < overlays else None
        if detection:
            file_name = Path(record.ir or record.vi or record.packed).name
            whole_h, whole_w = whole_size((height, width), crop)  # the file's own pixels, before the border crop
            images.append({"id": len(images) + 1, "file_name": file_name, "height": whole_h, "width": whole_w})
            in_frame = detections_in_frame(pred, scale, (height, width), crop)
            kept = coco_results(images[-1]["id"], in_frame["boxes"], in_frame["scores"], in_frame["labels"])
            detections += [d for d in kept if d["score"] >= min_score]
            if overlay:
                write_det_overlay(overlay, sample, pred, None, classes, float(cfg.eval.overlay_score))
        else:
            mask = pred.cpu().numpy().astype(np.uint8 if len(classes) <= 256 else np.uint16)
            (out / "masks").mkdir(parents=True, exist_ok=True)
            write_png(out / "masks" / f"{record.name}.png", mask)
            if overlay:
                write_seg_overlay(overlay, sample, mask, None, int(cfg.data.ignore_index))
        predicted.append(record.name)
    out.mkdir(parents=True, exist_ok=True)
    if detection:
        for k, d in enumerate(detections, 1):
            d["id"] = k
        atomic_write_text(out / "detections.json", json.dumps({
            "images": images, "annotations": detections,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}))
    report = summarise_issues("predict", found, len(predicted), issues)
    report.update(run_dir=str(run_dir), checkpoint=tag, task=task.name, classes=classes, frames=predicted,
                  earlier_files=_earlier_files(out, predicted, overlays, detection))
    atomic_write_text(out / "predict_report.json", json.dumps(report, indent=1))
    return report
