"""Box metrics with pycocotools: COCO AP, AP50, AP75, APs/m/l, per-class AP, and the log-average
miss rate of pedestrian benchmarks (Caltech, KAIST) from the same matching. Ignore regions are COCO
crowd boxes: a detection inside one (its overlap measured over the detection's own area, as in
Dollar et al.'s toolbox) counts neither as a hit nor as a false positive."""
from __future__ import annotations

import contextlib
import io

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# Log-average miss rate: the miss rate at nine false-positives-per-image points evenly spaced in
# log space over [1e-2, 1e0], averaged in log space (Dollar et al., PAMI 2012), at IoU 0.5.
MR_FPPI = np.logspace(-2.0, 0.0, 9)


def coco_ground_truth(frames: list[dict], class_names: list[str]) -> dict:
    """COCO GT dict from frames {'id', 'name', 'height', 'width', 'boxes' (N, 4 xyxy), 'labels',
    optionally 'ignore' (M, 4 xyxy ignore regions, written as crowd boxes of every class)}."""
    images, annotations = [], []

    def add(image_id: int, box, label: int, crowd: int) -> None:
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd})

    for f in frames:
        images.append({"id": f["id"], "file_name": f["name"], "height": f["height"], "width": f["width"]})
        for box, label in zip(np.asarray(f["boxes"]).reshape(-1, 4), f["labels"]):
            add(f["id"], box, int(label), 0)
        for box in np.asarray(f.get("ignore", ())).reshape(-1, 4):
            for label in range(len(class_names)):
                add(f["id"], box, label, 1)
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

    objects = sum(not a["iscrowd"] for a in gt["annotations"])  # scored: ignore regions are not objects
    if not objects:  # pycocotools would give -1: no score is defined, which a number would hide
        nothing = {c["name"]: None for c in gt["categories"]}
        return dict({name: None for name in STAT_NAMES}, per_class_AP=nothing, detections=len(results), MR=None,
                    per_class_MR=dict(nothing), objects=0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        # loadRes cannot take an empty list: with nothing detected, one detection of no area and score 0
        # stands in. It matches nothing, and with no object found moves no figure, so every key (AR,
        # the size ranges, classes without objects: None) is what pycocotools reports otherwise.
        stand_in = [{"image_id": gt["images"][0]["id"], "category_id": gt["categories"][0]["id"],
                     "bbox": [0.0, 0.0, 0.0, 0.0], "score": 0.0}]
        coco_dt = coco_gt.loadRes([dict(r) for r in results] or stand_in)  # loadRes adds keys to the entries
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) if v >= 0 else None for name, v in zip(STAT_NAMES, ev.stats)}  # -1: no object there
    precision = ev.eval["precision"]  # (iou thresholds, recall points, classes, areas, max dets)
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else None
    per_class_mr = {coco_gt.cats[c]["name"]: log_average_miss_rate(ev, k) for k, c in enumerate(ev.params.catIds)}
    rates = [m for m in per_class_mr.values() if m is not None]
    return dict(stats, per_class_AP=per_class, detections=len(results),
                MR=float(np.mean(rates)) if rates else None, per_class_MR=per_class_mr, objects=objects)


def log_average_miss_rate(ev, k: int) -> float | None:
    """Class ``k``'s log-average miss rate (lower is better) from an evaluated ``COCOeval``: its
    detections over all frames by score at IoU 0.5, the area range 'all' and the largest per-frame
    detection count; ignored detections (on ignore regions) left out. None: no object of the class."""
    p = ev.params
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    frames, areas = len(p.imgIds), len(p.areaRng)
    entries = [e for e in ev.evalImgs[k * areas * frames: k * areas * frames + frames]
               if e is not None and e["maxDet"] == p.maxDets[-1]]
    positives = sum(int(np.count_nonzero(~np.asarray(e["gtIgnore"], bool))) for e in entries)
    if positives == 0:
        return None
    scores = np.concatenate([np.asarray(e["dtScores"], float) for e in entries] + [np.zeros(0)])
    hits = np.concatenate([e["dtMatches"][t] > 0 for e in entries] + [np.zeros(0, bool)])
    counted = ~np.concatenate([np.asarray(e["dtIgnore"][t], bool) for e in entries] + [np.zeros(0, bool)])
    order = np.argsort(-scores[counted], kind="mergesort")
    hits = hits[counted][order]
    fppi = np.concatenate([[-np.inf], np.cumsum(~hits) / frames])
    recall = np.concatenate([[0.0], np.cumsum(hits) / positives])
    # the recall reached before the false positives per frame exceed each point
    at = recall[np.searchsorted(fppi, MR_FPPI, side="right") - 1]
    return float(np.exp(np.mean(np.log(np.maximum(1e-10, 1.0 - at)))))
