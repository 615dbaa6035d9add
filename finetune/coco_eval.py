"""COCO box metrics with pycocotools: AP, AP50, AP75, APs/m/l and per-class AP."""
from __future__ import annotations

import contextlib
import io

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_ground_truth(frames: list[dict], class_names: list[str]) -> dict:
    """COCO GT dict from frames {'id', 'name', 'height', 'width', 'boxes' (N, 4 xyxy), 'labels'}."""
    images, annotations = [], []
    for f in frames:
        images.append({"id": f["id"], "file_name": f["name"], "height": f["height"], "width": f["width"]})
        for box, label in zip(np.asarray(f["boxes"]).reshape(-1, 4), f["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": f["id"], "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(image_id: int, boxes, scores, labels) -> list[dict]:
    """COCO result entries (category ids 1..K) for one image's xyxy predictions."""
    out = []
    for box, score, label in zip(np.asarray(boxes).reshape(-1, 4), scores, labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score)})
    return out


def coco_metrics(gt: dict, results: list[dict]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0,
                    "per_class_AP": {c["name"]: 0.0 for c in gt["categories"]}, "detections": 0}
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the entries it gets
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # (iou thresholds, recall points, classes, areas, max dets)
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else None
    return dict(stats, per_class_AP=per_class, detections=len(results))
