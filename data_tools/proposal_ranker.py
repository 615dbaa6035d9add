"""``thermal_blobs_fitted``: thermal-blob candidates ranked by a model fitted to one camera.

The hand-made ranking of ``thermal_blobs`` (ring contrast x size) is the same for every camera,
and where it fails is camera-specific: on daytime driving frames a sky-to-treeline band
out-contrasts a small car, and a blob box that takes in the warm road under a car outranks the
box on the car. A user with a few dozen labelled frames of their own camera can fit the ranking
to it: ``python -m data_tools proposals-fit`` labels every candidate box of those frames by
whether it finds an object (IoU >= 0.5 with a labelled box), fits a logistic regression on a
few dozen box features (the hand score, the box-vs-ring contrast at three ring widths in both
views, the spread inside and around it, size, shape, position in the frame, edge contact, edge
strength) and writes it as a small JSON file; ``proposals.method=thermal_blobs_fitted
proposals.ranker=FILE`` then ranks the same candidates by it, before the same non-maximum
suppression and cap. Candidates, suppression and cap are those of ``thermal_blobs``, so only the
order changes. The file holds numbers only: loading it runs no code.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from tqdm import tqdm

from data_tools.files import atomic_write_text
from data_tools.proposals import (
    ProposalConfig,
    box_iou,
    grey_frame,
    integral_images,
    ranked_boxes,
    register_method,
    ring_statistics,
    thermal_blob_candidates,
)

FORMAT = "thermal-blob-ranker"
VERSION = 1
RINGS = (0.1, 0.25, 0.5)  # ring width around a box, share of its sides
VIEWS = ("linear", "equalized")
FEATURES = (
    ["log_score"]
    + [f"{view}_ring{ring}_{stat}" for view in VIEWS for ring in RINGS
       for stat in ("contrast", "polarity", "inside_std", "ring_std")]
    + ["log_area_share", "log_aspect", "centre_y", "centre_x_offset", "touches_top", "touches_bottom",
       "touches_side", "edge_strength"]
)
# The candidate settings a ranker is tied to: other candidates or scores are another population.
CANDIDATE_KEYS = ("min_region_pixels", "min_side", "max_aspect", "blob_sides", "blob_backgrounds",
                  "blob_thresholds", "blob_closings", "blob_merge_gap", "blob_views", "blob_size_power",
                  "blob_texture_weight")
# Settings that rankers fitted before they existed were fitted under.
EARLIER_DEFAULTS = {"blob_texture_weight": 0.0}
HIT_IOU = 0.5


class RankerError(ValueError):
    pass


# --- features -----------------------------------------------------------------------------------

def box_features(grey: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) features of candidate boxes (frame pixels) of a grey uint8 frame."""
    h, w = grey.shape
    boxes = boxes.astype(np.float64)
    equalized = cv2.equalizeHist(grey)
    columns = [np.log(np.maximum(scores, 1e-9))]
    for view in (grey, equalized):
        spread = float(view.std()) + 1e-6
        integrals = integral_images(view, squares=True)
        for ring in RINGS:
            diff, std_in, std_ring = ring_statistics(integrals, boxes, ring)
            columns += [np.abs(diff) / spread, np.sign(diff), std_in / spread, std_ring / spread]
    smooth = cv2.GaussianBlur(equalized, (0, 0), 1.5)
    gx, gy = cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    # numpy, not cv2.magnitude: the latter's last bits changed from call to call with the same
    # input (its SIMD path seems to follow the arrays' memory alignment), and a fit must repeat.
    gradient = np.sqrt(gx * gx + gy * gy)
    # Edges inside the box beyond those of its thin ring, against the frame's mean edge strength.
    edges, _, _ = ring_statistics(integral_images(gradient), boxes, RINGS[0])
    x, y, bw, bh = boxes.T
    columns += [
        np.log(bw * bh / (w * h)), np.log(bw / bh), (y + bh / 2) / h, np.abs((x + bw / 2) / w - 0.5),
        (y <= 1).astype(float), (y + bh >= h - 1).astype(float), ((x <= 1) | (x + bw >= w - 1)).astype(float),
        edges / (float(gradient.mean()) + 1e-6),
    ]
    return np.stack(columns, axis=1)


# --- fitting ------------------------------------------------------------------------------------

@dataclass
class FrameCandidates:
    """One labelled frame's candidate boxes with their hand scores, features and hit labels."""
    boxes: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    hits: np.ndarray  # IoU >= 0.5 with a labelled box
    objects: np.ndarray
    in_fit: np.ndarray  # the candidates the fit learns from: all but those on an ignore region that hit no object


def _hits(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Which of ``boxes`` overlap one of ``targets`` with IoU >= HIT_IOU."""
    if not len(boxes) or not len(targets):
        return np.zeros(len(boxes), bool)
    return box_iou(boxes, targets).max(axis=1) >= HIT_IOU


def frame_candidates(frames: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     cfg: ProposalConfig) -> list[FrameCandidates]:
    """The candidates of (grey uint8 frame, labelled boxes, ignore regions) triples, frame by frame
    (a bar on a terminal, as proposals-eval's: a thousand frames take about a minute). A candidate
    on an ignore region (a crowd, a difficult object) is neither a hit nor a miss: the fit leaves it
    out, as a detector's training does."""
    tables = []
    for grey, objects, ignored in tqdm(frames, unit="frame", disable=not sys.stderr.isatty(), leave=False):
        boxes, scores = thermal_blob_candidates(grey, cfg)
        features = box_features(grey, boxes, scores) if len(boxes) else np.zeros((0, len(FEATURES)))
        hits = _hits(boxes, objects)
        tables.append(FrameCandidates(boxes, scores, features, hits, objects, hits | ~_hits(boxes, ignored)))
    if not tables:
        raise RankerError("no labelled frames in these sources (proposals-fit needs boxes or masks)")
    if not any(len(t.boxes) for t in tables):
        raise RankerError(f"no candidate boxes on the {len(tables)} labelled frames: nothing to fit")
    return tables


def labelled_grey_frames(sources, min_object_side: int = 40, every: int = 1, offset: int = 0,
                         unreadable: list | None = None, find_overlays: bool = True):
    """(grey uint8 frame, labelled boxes, ignore regions) of the labelled frames of ``sources``, read
    as ``build`` and ``proposals-eval`` read them, the source's overlay filled in: what
    ``frame_candidates`` takes (unreadable frames, overlays: as
    :func:`~data_tools.proposal_eval.labelled_frames`)."""
    from data_tools.overlay import fill_overlay
    from data_tools.proposal_eval import labelled_frames
    from data_tools.transforms import to_uint8

    for frame in labelled_frames(sources, min_object_side, every, offset, unreadable, find_overlays):
        yield grey_frame(fill_overlay(to_uint8(frame.image), frame.overlay)), frame.boxes, frame.ignored


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 100) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression by Newton's method on standardised
    features. Ours rather than scikit-learn's (not a dependency of the project): about forty
    features, deterministic, and a dozen Newton steps."""
    z = np.hstack([x, np.ones((len(x), 1))])
    positive = float(y.mean())
    if positive in (0.0, 1.0):
        raise RankerError("the candidates are all hits or all misses: label more frames with objects")
    weight = np.where(y, 0.5 / positive, 0.5 / (1 - positive)) / len(y)
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    w = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        gradient = z.T @ (weight * (p - y)) + penalty * w
        hessian = (z * (weight * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def fit_weights(tables: list[FrameCandidates], l2: float) -> dict:
    """Standardisation and logistic weights fitted on the candidates of ``tables``."""
    x = np.concatenate([t.features[t.in_fit] for t in tables])
    y = np.concatenate([t.hits[t.in_fit] for t in tables]).astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    weights, bias = fit_logistic((x - mean) / scale, y, l2)
    return {"mean": mean.tolist(), "scale": scale.tolist(), "weights": weights.tolist(), "bias": bias}


def objects_found(table: FrameCandidates, scores: np.ndarray, cfg: ProposalConfig) -> int:
    if len(table.objects) == 0 or len(table.boxes) == 0:
        return 0
    kept = ranked_boxes(table.boxes, scores, cfg)
    return int((box_iou(kept, table.objects).max(axis=0) >= HIT_IOU).sum())


def cross_validate(tables: list[FrameCandidates], cfg: ProposalConfig, l2: float, folds: int) -> dict:
    """Objects found at the cap by the hand ranking and by a ranking fitted without them, each frame
    held out once (frame i in fold i % folds). With few labelled frames a fitted ranking can lose to
    the hand one (on MSRS, fitted on 10 frames, it did on most random halves), so proposals-fit says
    which wins on the user's own frames before they build with it."""
    folds = min(folds, len(tables))
    result = {"folds": folds, "frames": len(tables), "objects": int(sum(len(t.objects) for t in tables))}
    if folds < 2:
        return {**result, "skipped": "needs at least 2 labelled frames"}
    hand = fitted = 0
    for fold in range(folds):
        held_out = tables[fold::folds]
        try:
            ranker = Ranker(fit_weights([t for i, t in enumerate(tables) if i % folds != fold], l2), "fold")
        except RankerError as e:
            return {**result, "skipped": f"fold {fold}: {e}"}
        hand += sum(objects_found(t, t.scores, cfg) for t in held_out)
        fitted += sum(objects_found(t, ranker.score(t.features), cfg) for t in held_out)
    return {**result, "found": {"thermal_blobs": hand, "thermal_blobs_fitted": fitted}}


def fitted_wins(cross_validation: dict) -> bool:
    """Whether a cross-validation found more objects with the fitted ranking than the hand one."""
    found = cross_validation.get("found")
    return found is not None and found["thermal_blobs_fitted"] > found["thermal_blobs"]


def fit_ranker(frames: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], cfg: ProposalConfig, l2: float = 0.01,
               sources: list[str] | None = None, folds: int = 5) -> dict:
    """A ranker (the JSON-ready dict ``save_ranker`` writes) fitted on (grey frame, boxes, ignore
    regions) triples (:func:`labelled_grey_frames`),
    with the cross-validated comparison against the hand ranking (``folds`` = 0: none)."""
    if not l2 > 0:
        raise RankerError(f"l2 must be > 0, got {l2}")
    if folds < 0 or folds == 1:
        raise RankerError(f"folds must be 0 (no cross-validation) or at least 2, got {folds}")
    tables = frame_candidates(frames, cfg)
    hits = sum(int(t.hits.sum()) for t in tables)
    fitted_on = {"frames": len(tables), "objects": int(sum(len(t.objects) for t in tables)),
                 "candidates": int(sum(len(t.boxes) for t in tables)), "hits": hits,
                 "left_out_on_ignore_regions": int(sum((~t.in_fit).sum() for t in tables)), "sources": sources or []}
    if folds:
        fitted_on["cross_validation"] = cross_validate(tables, cfg, l2, folds)
    return {
        "format": FORMAT, "version": VERSION, "features": list(FEATURES), **fit_weights(tables, l2),
        "candidates": _candidate_settings(cfg), "l2": l2, "fitted_on": fitted_on,
    }


def _candidate_settings(cfg: ProposalConfig) -> dict:
    settings = asdict(cfg)
    return {k: json.loads(json.dumps(settings[k])) for k in CANDIDATE_KEYS}


# --- file ---------------------------------------------------------------------------------------

def save_ranker(ranker: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(ranker, indent=1) + "\n")


class Ranker:
    def __init__(self, data: dict, source: str):
        self.data = data
        self.mean = np.asarray(data["mean"], np.float64)
        self.scale = np.asarray(data["scale"], np.float64)
        self.weights = np.asarray(data["weights"], np.float64)
        self.bias = float(data["bias"])
        self.source = source

    def score(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def check_candidates(self, cfg: ProposalConfig) -> None:
        ours = _candidate_settings(cfg)
        theirs = {**EARLIER_DEFAULTS, **self.data["candidates"]}
        differ = sorted(k for k in CANDIDATE_KEYS if ours[k] != theirs.get(k))
        if differ:
            shown = ", ".join(f"proposals.{k}={theirs.get(k)} (now {ours[k]})" for k in differ)
            raise RankerError(f"{self.source}: fitted on other candidates: {shown}; fit it again or use those settings")


def _bad(path, why: str) -> RankerError:
    return RankerError(f"{path}: not a usable proposal ranker: {why}")


def parse_ranker(text: str, source: str = "ranker") -> Ranker:
    """A ranker from its JSON text, every field checked (numbers only: nothing in it runs)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(source, f"invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(source, f"expected a JSON object with \"format\": \"{FORMAT}\" (written by proposals-fit)")
    if data.get("version") != VERSION:
        raise _bad(source, f"version {data.get('version')!r}, this code reads version {VERSION}")
    if data.get("features") != list(FEATURES):
        raise _bad(source, "its feature list differs from this code's: fit it again with this version")
    for key in ("mean", "scale", "weights"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) != len(FEATURES) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise _bad(source, f"{key!r} must be {len(FEATURES)} finite numbers")
    if any(v <= 0 for v in data["scale"]):
        raise _bad(source, "'scale' must be positive")
    bias = data.get("bias")
    if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
        raise _bad(source, "'bias' must be a finite number")
    if not isinstance(data.get("candidates"), dict):
        raise _bad(source, "'candidates' (the candidate settings it was fitted with) is missing")
    return Ranker(data, source)


@lru_cache(maxsize=8)
def _load_cached(path: str, modified_ns: int, size: int) -> Ranker:
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise _bad(path, "not text (an image or an archive?); proposals-fit writes a JSON file") from None
    return parse_ranker(text, path)


def load_ranker(path: str | Path) -> Ranker:
    """The ranker in ``path``, read and checked once per process and version of the file (every
    frame's config asks for it; a stat, not a read, tells a rewritten file)."""
    path = Path(path)
    if path.is_dir():
        raise RankerError(f"proposals.ranker: {path} is a folder; name the JSON file proposals-fit wrote in it")
    if not path.is_file():
        raise RankerError(f"proposals.ranker: no such file {path} (fit one with python -m data_tools proposals-fit)")
    stat = path.stat()
    return _load_cached(str(path), stat.st_mtime_ns, stat.st_size)


# --- the method ---------------------------------------------------------------------------------

def fitted_proposals(image_u8: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """``thermal_blobs`` candidates, ranked by the fitted model, suppressed and capped."""
    ranker = load_ranker(cfg.ranker)
    grey = grey_frame(image_u8)
    boxes, scores = thermal_blob_candidates(grey, cfg)
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int32)
    return ranked_boxes(boxes, ranker.score(box_features(grey, boxes, scores)), cfg)


def _check_config(cfg: ProposalConfig) -> None:
    if not cfg.ranker:
        raise ValueError("proposals.method=thermal_blobs_fitted needs proposals.ranker=FILE "
                         "(fit one on labelled frames with python -m data_tools proposals-fit)")
    load_ranker(cfg.ranker).check_candidates(cfg)


register_method("thermal_blobs_fitted", fitted_proposals, ranked=True, check=_check_config,
                input_files=("ranker",))
