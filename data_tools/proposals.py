"""Offline region proposals for object-sensitive RoI cropping (PAD, arXiv 2312.08192, Sec. 3.2).

Three methods, chosen by ``proposals.method``:

- ``thermal_blobs`` (default): people, vehicles and animals in infrared frames are mostly warmer
  or colder compact regions against a smoother background, with weak texture. The frame is
  reduced to a working size, its local background (a box blur) subtracted, and the residual
  thresholded at several multiples of its standard deviation, hot and cold; each mask is closed
  with a few rectangles (vertical ones join a person's head, torso and legs) and its connected
  components become boxes, together with the union of every two components that touch or nearly
  touch, from any threshold or polarity (a car's warm wheels and cooler body). This runs on two
  views of the frame: its intensities as they are, and histogram-equalised (the mapping thermal
  cameras display with), where objects near ambient temperature (parked cars, bicycles) separate
  from a background that a few hot objects compress on the linear scale. Two working scales:
  320 px with a fine background (small objects) and 160 px with a coarse one (large,
  low-contrast objects). Boxes pass PAD's filter, are ranked by the contrast between the box and
  the ring around it, summed over the views, times a power of their size (large objects have
  lower contrast per pixel than lamps and exhausts), times a weight of the texture inside the box
  (objects carry structure: wheels, windows, limbs; the smooth bands of sky or road that
  out-contrast small objects on daytime frames do not), thinned by non-maximum suppression and capped
  (``max_proposals``): the crop sampler draws proposals uniformly, so junk boxes dilute the crops
  as much as missing boxes do.
- ``thermal_blobs_fitted`` (``proposal_ranker.py``): the same candidates, suppression and cap,
  ranked by a logistic model fitted to one camera's labelled frames (``proposals-fit``).
- ``selective_search``: PAD's own step, the faithful baseline: selective search with scale 600,
  sigma 0.9, min_size 30, then PAD's filter; every box kept (PAD keeps about 17 per frame). We use
  OpenCV's C++ implementation rather than the pure-Python package PAD called (same four grouping
  similarities: colour, fill, size, texture), for speed. Two documented differences: OpenCV
  reports boxes, not region pixel counts, so PAD's ">= 600 region pixels" filter is applied to box
  area (with w, h >= 40 it never binds); OpenCV ranks regions with C ``rand()``, so the boxes are
  sorted, which makes them deterministic.

Both are deterministic (same frame, same boxes) and return unique, in-image boxes (x, y, w, h)
int32, best first for the ranked methods. 16-bit frames go through the same intensity
normalisation as the network input (``to_uint8``). A new method is a module that calls
``register_method``; ``python -m data_tools proposals-eval`` measures any of them on labelled frames.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from data_tools.overlay import fill_overlay
from data_tools.registry import Registry
from data_tools.transforms import to_uint8

BLOB_VIEWS = ("linear", "equalized")


@dataclass(frozen=True)
class ProposalConfig:
    enabled: bool = True
    method: str = "thermal_blobs"  # thermal_blobs | selective_search
    # Ranked methods keep at most this many boxes per frame (selective search keeps all, as PAD).
    max_proposals: int = 50
    # PAD's filter, applied to every method.
    min_region_pixels: int = 600
    min_side: int = 40
    max_aspect: float = 3.0
    # selective_search: PAD's settings.
    scale: float = 600.0  # Felzenszwalb k
    sigma: float = 0.9
    min_size: int = 30
    # Run selective search on a copy whose longer side is at most this (None: full resolution,
    # as PAD does). Boxes are scaled back.
    max_side: int | None = None
    # thermal_blobs.
    blob_sides: tuple[int, ...] = (320, 160)  # working sizes (longer side, px) ...
    blob_backgrounds: tuple[float, ...] = (0.125, 0.5)  # ... and each one's background blur, share of that side
    blob_thresholds: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)  # x std of the background residual
    blob_closings: tuple[tuple[int, int], ...] = ((3, 3), (3, 9), (7, 7), (3, 15))  # (w, h), working px
    blob_merge_gap: int = 2  # components this close (working px) also give their union box
    blob_views: tuple[str, ...] = BLOB_VIEWS  # intensity mappings blobs are looked for in
    blob_size_power: float = 0.75  # score = ring contrast x sqrt(area) ** power ...
    blob_texture_weight: float = 2.0  # ... x (1 + this x std inside the box / frame std, summed over the views)
    nms_iou: float = 0.5
    # thermal_blobs_fitted: the ranking fitted on labelled frames of a camera (JSON, proposals-fit).
    ranker: str | None = None
    # Find each source's burned-in overlay (pixels static across its frames) and fill it in before
    # any method looks at a frame (``overlay.py``).
    overlay_mask: bool = True

    def __post_init__(self):
        method = PROPOSAL_METHODS.get(self.method)  # refuses an unknown name, naming the known ones
        if len(self.blob_sides) != len(self.blob_backgrounds):
            raise ValueError("proposals.blob_sides and proposals.blob_backgrounds need one value each per scale")
        if self.max_proposals < 1:
            raise ValueError(f"proposals.max_proposals must be >= 1, got {self.max_proposals}")
        # YAML gives lists: store tuples so that the config stays hashable and compares equal.
        if not self.blob_views or set(self.blob_views) - set(BLOB_VIEWS):
            raise ValueError(f"proposals.blob_views must be one or more of {list(BLOB_VIEWS)}, got {list(self.blob_views)}")
        for name in ("blob_sides", "blob_backgrounds", "blob_thresholds", "blob_views"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "blob_closings", tuple(tuple(c) for c in self.blob_closings))
        if method.check is not None:
            method.check(self)


# --- shared box helpers --------------------------------------------------------------------------

def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Rounded to int32 and de-duplicated, sorted lexicographically. Through one int64 key per box
    (coordinates in [0, 2^15), every frame we build): several times faster than
    ``np.unique(axis=0)``, which sorts rows as byte strings; other boxes go the slow way."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int32)
    b = np.round(boxes).astype(np.int64)
    if b.min() < 0 or b.max() >= 1 << 15:
        return np.unique(b, axis=0).astype(np.int32)
    keys = np.unique((b[:, 0] << 45) | (b[:, 1] << 30) | (b[:, 2] << 15) | b[:, 3])
    low = (1 << 15) - 1
    return np.stack([keys >> 45, (keys >> 30) & low, (keys >> 15) & low, keys & low], axis=1).astype(np.int32)


def filter_mask(boxes: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """PAD's filter: area >= min_region_pixels, w >= 40, h >= 40, aspect <= 3. PAD tests its 600 on the
    region's own pixel count, which OpenCV's selective search does not report: here the box's area,
    which every box of 40 x 40 or more already passes."""
    w = boxes[:, 2].astype(np.float64)
    h = boxes[:, 3].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.maximum(w / h, h / w)
    return (w * h >= cfg.min_region_pixels) & (w >= cfg.min_side) & (h >= cfg.min_side) & (aspect <= cfg.max_aspect)


def filter_proposals(boxes: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    return boxes[filter_mask(boxes, cfg)]


def round_to_image(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(x, y, w, h) boxes with their corners rounded to whole pixels and cut to the frame
    (rounding x and w separately could end a box one pixel outside)."""
    x0 = np.clip(np.round(boxes[:, 0]), 0, width)
    y0 = np.clip(np.round(boxes[:, 1]), 0, height)
    x1 = np.clip(np.round(boxes[:, 0] + boxes[:, 2]), 0, width)
    y1 = np.clip(np.round(boxes[:, 1] + boxes[:, 3]), 0, height)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (x, y, w, h) boxes, (len(a), len(b))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    iw = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best first, at most ``limit``.
    Ours rather than torchvision's: it stops at the cap and breaks score ties by the box itself
    (a stable order), so the result never depends on a sort's tie handling."""
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -scores))
    kept: list[int] = []
    alive = np.ones(len(order), bool)
    for pos, idx in enumerate(order):
        if not alive[pos]:
            continue
        kept.append(int(idx))
        if len(kept) == limit:
            break
        rest = order[pos + 1:]
        alive[pos + 1:] &= box_iou(boxes[idx:idx + 1], boxes[rest])[0] <= iou
    return np.asarray(kept, np.int64)


# --- selective search (PAD's step) ------------------------------------------------------------

def selective_search(image_u8: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """Unique selective-search boxes (N, 4) int32 xywh, sorted, on a grey or BGR uint8 image."""
    seg = cv2.ximgproc.segmentation
    bgr = image_u8 if image_u8.ndim == 3 else cv2.cvtColor(image_u8, cv2.COLOR_GRAY2BGR)
    factor = 1.0
    if cfg.max_side and max(bgr.shape[:2]) > cfg.max_side:
        factor = max(bgr.shape[:2]) / cfg.max_side
        size = (round(bgr.shape[1] / factor), round(bgr.shape[0] / factor))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    ss.clearGraphSegmentations()
    ss.addGraphSegmentation(seg.createGraphSegmentation(cfg.sigma, cfg.scale, cfg.min_size))
    ss.clearStrategies()
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
        seg.createSelectiveSearchSegmentationStrategyColor(),
        seg.createSelectiveSearchSegmentationStrategyFill(),
        seg.createSelectiveSearchSegmentationStrategySize(),
        seg.createSelectiveSearchSegmentationStrategyTexture()))
    ss.clearImages()
    ss.addImage(bgr)
    boxes = np.asarray(ss.process(), np.float64).reshape(-1, 4)
    if factor != 1.0:
        boxes = np.round(boxes * factor)
    return unique_boxes(boxes)


def selective_search_proposals(image_u8: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    return filter_proposals(selective_search(image_u8, cfg), cfg)


def opencv_contrib_problem() -> str | None:
    """Why OpenCV's selective search is not there, or None. It is one of OpenCV's contrib modules
    (opencv-contrib-python-headless); another OpenCV package in the same environment (opencv-python,
    a dependency of many tools) writes the same cv2 module, and the one installed last wins: cv2 then
    still has an empty ``ximgproc`` and fails at the first frame."""
    from importlib.metadata import PackageNotFoundError, version

    segmentation = getattr(getattr(cv2, "ximgproc", None), "segmentation", None)
    if hasattr(segmentation, "createSelectiveSearchSegmentation"):
        return None
    installed = {}
    for name in ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"):
        with contextlib.suppress(PackageNotFoundError):
            installed[name] = version(name)
    ours = installed.pop("opencv-contrib-python-headless", None)
    fix = (f"`pip install --force-reinstall --no-deps opencv-contrib-python-headless=={ours}`" if ours
           else "install opencv-contrib-python-headless in pyproject.toml's range")
    if installed:
        fix = f"`pip uninstall {' '.join(installed)}`, then {fix}"
    clash = f" ({', '.join(f'{n} {v}' for n, v in installed.items())} shares the cv2 module)" if installed else ""
    where = f"{getattr(cv2, '__version__', 'no version')}, {Path(getattr(cv2, '__file__', None) or '?').parent}"
    return f"OpenCV's contrib modules, which this cv2 ({where}) lacks{clash}: {fix}"


def _check_selective_search(cfg: ProposalConfig) -> None:
    problem = opencv_contrib_problem()
    if problem:
        raise ValueError(f"proposals.method=selective_search needs {problem}")


# --- thermal blobs ----------------------------------------------------------------------------

def _component_boxes(mask: np.ndarray) -> np.ndarray:
    # BBDT labelling: the same components (in another label order) at about a third of the
    # default's time with statistics on one thread (OpenCV 4.x-5.0).
    _, _, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_BBDT)
    return stats[1:, :4]


def _touching_unions(boxes: np.ndarray, gap: float, block: int = 1024) -> np.ndarray:
    """The union box of every two boxes at most ``gap`` apart on both axes. Boxes sorted by left
    edge: a block of rows is only compared with the boxes that start before its rows end (plus the
    gap), and the vertical test only runs on the pairs that pass the horizontal one, so that time
    and memory stay small even on a noise frame with thousands of components."""
    if len(boxes) < 2:
        return np.zeros((0, 4), np.int32)
    b = boxes[np.argsort(boxes[:, 0], kind="stable")].astype(np.int32)
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    # Sorted by x0, a later box j can only touch box i when x0[j] <= x1[i] + gap.
    reach = np.searchsorted(x0, x1 + gap, side="right")
    pairs_i, pairs_j = [], []
    for start in range(0, len(b), block):
        rows = np.arange(start, min(start + block, len(b)))
        cols = np.arange(start + 1, max(int(reach[rows].max()), start + 1))
        if len(cols) == 0:
            continue
        close = (cols[None] > rows[:, None]) & \
            (np.maximum(x0[rows, None], x0[None, cols]) - np.minimum(x1[rows, None], x1[None, cols]) <= gap)
        i, j = np.nonzero(close)
        i, j = rows[i], cols[j]
        near = np.maximum(y0[i], y0[j]) - np.minimum(y1[i], y1[j]) <= gap
        pairs_i.append(i[near])
        pairs_j.append(j[near])
    if not pairs_i:
        return np.zeros((0, 4), np.int32)
    i, j = np.concatenate(pairs_i), np.concatenate(pairs_j)
    ux0, uy0 = np.minimum(x0[i], x0[j]), np.minimum(y0[i], y0[j])
    unions = np.stack([ux0, uy0, np.maximum(x1[i], x1[j]) - ux0, np.maximum(y1[i], y1[j]) - uy0], axis=1)
    return unions


def integral_images(image: np.ndarray, squares: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Float64 integral images of a frame's values and, if asked, of their squares."""
    if squares:
        return cv2.integral2(image, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
    return cv2.integral(image, sdepth=cv2.CV_64F), None


def ring_statistics(integrals: tuple[np.ndarray, np.ndarray | None], boxes: np.ndarray,
                    ring: float = 0.25) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per (x, y, w, h) box: mean inside minus mean of the ring around it (ring width: ``ring`` of
    each side; 0 where no ring is left inside the frame, e.g. the whole frame: nothing to stand
    out from), and, from an integral of squares, the standard deviations inside and in the ring.
    Integral images, so that thousands of boxes per frame cost little."""
    sums, squares = integrals
    h, w = sums.shape[0] - 1, sums.shape[1] - 1

    def box_sum(s, x0, y0, x1, y1):
        return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]

    x0 = np.clip(np.floor(boxes[:, 0]).astype(int), 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int), 0, h)
    x1 = np.clip(np.ceil(boxes[:, 0] + boxes[:, 2]).astype(int), 0, w)
    y1 = np.clip(np.ceil(boxes[:, 1] + boxes[:, 3]).astype(int), 0, h)
    rx = np.maximum(np.round(boxes[:, 2] * ring).astype(int), 1)
    ry = np.maximum(np.round(boxes[:, 3] * ring).astype(int), 1)
    ox0, oy0 = np.clip(x0 - rx, 0, w), np.clip(y0 - ry, 0, h)
    ox1, oy1 = np.clip(x1 + rx, 0, w), np.clip(y1 + ry, 0, h)
    n_in = np.maximum((x1 - x0) * (y1 - y0), 1)
    ring_area = (ox1 - ox0) * (oy1 - oy0) - n_in
    n_ring = np.maximum(ring_area, 1)
    sum_in = box_sum(sums, x0, y0, x1, y1)
    sum_ring = box_sum(sums, ox0, oy0, ox1, oy1) - sum_in
    mean_in, mean_ring = sum_in / n_in, sum_ring / n_ring
    diff = np.where(ring_area > 0, mean_in - mean_ring, 0.0)
    if squares is None:
        return diff, None, None
    sq_in = box_sum(squares, x0, y0, x1, y1)
    sq_ring = box_sum(squares, ox0, oy0, ox1, oy1) - sq_in
    std_in = np.sqrt(np.maximum(sq_in / n_in - mean_in ** 2, 0))
    std_ring = np.sqrt(np.maximum(sq_ring / n_ring - mean_ring ** 2, 0))
    return diff, std_in, std_ring


def _ring_contrast(image: np.ndarray, boxes: np.ndarray, ring: float = 0.25) -> np.ndarray:
    """|mean inside the box - mean of the ring around it| (ring width: a quarter of each side)."""
    return np.abs(ring_statistics(integral_images(image), boxes, ring)[0])


def _views(small_u8: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """The working copy of the frame under each intensity mapping, float32.
    ``linear``: as normalised. ``equalized``: its histogram equalised, the mapping thermal cameras
    use for display: most of a frame's pixels sit in a narrow band of ambient temperatures, which a
    few hot objects compress on a linear scale, so parked cars, cold bicycles and people in warm
    surroundings only separate from their background once that band is spread."""
    out = []
    for name in names:
        view = cv2.equalizeHist(small_u8) if name == "equalized" else small_u8
        out.append(view.astype(np.float32))
    return out


def _blob_components(view: np.ndarray, background: float, cfg: ProposalConfig) -> np.ndarray:
    """Boxes (working px) of the hot and cold blobs of one view, and the unions of touching ones."""
    smooth = cv2.GaussianBlur(view, (0, 0), 1.0)
    k = int(max(smooth.shape) * background) | 1
    residual = smooth - cv2.blur(smooth, (k, k))
    spread = float(residual.std()) + 1e-6
    found = []
    for sign in (1.0, -1.0):  # warmer, then colder than the surroundings
        for t in cfg.blob_thresholds:
            mask = (sign * residual > t * spread).astype(np.uint8)
            for cw, ch in cfg.blob_closings:
                kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (cw, ch))
                found.append(_component_boxes(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)))
    components = unique_boxes(np.concatenate(found))
    # Unions across thresholds and polarities too: a car's warm wheels with its cooler body.
    return np.concatenate([components, _touching_unions(components, cfg.blob_merge_gap)])


def _blob_candidates(image_u8: np.ndarray, side: int, background: float,
                     cfg: ProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Candidate boxes in frame pixels, and their scores, at one working scale."""
    h, w = image_u8.shape
    factor = max(h, w) / side
    small = cv2.resize(image_u8, (max(round(w / factor), 1), max(round(h / factor), 1)),
                       interpolation=cv2.INTER_AREA)
    views = _views(small, cfg.blob_views)
    boxes = unique_boxes(np.concatenate([_blob_components(v, background, cfg) for v in views]))
    in_frame = boxes * factor
    keep = filter_mask(in_frame, cfg)
    boxes, in_frame = boxes[keep], in_frame[keep]
    # Every box is scored on every view: an object that stands out in either one ranks high.
    contrast = sum(_ring_contrast(v, boxes) / (float(v.std()) + 1e-6) for v in views)
    return in_frame, contrast * np.sqrt(in_frame[:, 2] * in_frame[:, 3]) ** cfg.blob_size_power


def grey_frame(image_u8: np.ndarray) -> np.ndarray:
    return image_u8 if image_u8.ndim == 2 else cv2.cvtColor(image_u8, cv2.COLOR_BGR2GRAY)


def inside_texture(grey: np.ndarray, boxes: np.ndarray, views: tuple[str, ...] = BLOB_VIEWS) -> np.ndarray:
    """Per (x, y, w, h) box of a grey uint8 frame: the standard deviation of the pixels inside it
    over the frame's, summed over ``views`` (full resolution)."""
    total = np.zeros(len(boxes))
    for name in views:
        view = cv2.equalizeHist(grey) if name == "equalized" else grey
        total += ring_statistics(integral_images(view, squares=True), boxes)[1] / (float(view.std()) + 1e-6)
    return total


def thermal_blob_candidates(grey: np.ndarray, cfg: ProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every filtered thermal-blob box of a grey uint8 frame, (N, 4) float64 xywh in whole frame
    pixels, and its score (contrast, size, texture), before non-maximum suppression and the cap."""
    h, w = grey.shape
    parts = [_blob_candidates(grey, side, bg, cfg) for side, bg in zip(cfg.blob_sides, cfg.blob_backgrounds)]
    boxes = round_to_image(np.concatenate([p[0] for p in parts]), w, h)
    scores = np.concatenate([p[1] for p in parts])
    keep = filter_mask(boxes, cfg)
    boxes, scores = boxes[keep], scores[keep]
    if cfg.blob_texture_weight and len(boxes):
        scores = scores * (1 + cfg.blob_texture_weight * inside_texture(grey, boxes, cfg.blob_views))
    return boxes, scores


def ranked_boxes(boxes: np.ndarray, scores: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """The best ``max_proposals`` boxes by score after non-maximum suppression, int32, best first."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int32)
    return boxes[greedy_nms(boxes, scores, cfg.nms_iou, cfg.max_proposals)].astype(np.int32)


def thermal_blob_proposals(image_u8: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """Ranked thermal-blob boxes, best first (see the module docstring)."""
    return ranked_boxes(*thermal_blob_candidates(grey_frame(image_u8), cfg), cfg)


# --- registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProposalMethod:
    propose: Callable[[np.ndarray, ProposalConfig], np.ndarray]  # (frame_u8, cfg) -> boxes (N, 4) xywh
    ranked: bool  # its order is a ranking (best first), so a cap keeps the best
    check: Callable[[ProposalConfig], None] | None = None
    input_files: tuple[str, ...] = ()  # config fields naming files a method reads


PROPOSAL_METHODS: Registry[ProposalMethod] = Registry("proposal method", "proposals.method")


def register_method(name: str, fn: Callable[[np.ndarray, ProposalConfig], np.ndarray], ranked: bool,
                    check: Callable[[ProposalConfig], None] | None = None, input_files: tuple[str, ...] = ()) -> None:
    """Make ``proposals.method=name`` run ``fn(frame_u8, cfg)``; ``check(cfg)`` raises ValueError
    for a config the method cannot run with (called when the config is made); ``input_files``
    are the config fields that name files its output depends on (hashed into a build's identity)."""
    PROPOSAL_METHODS.register(name, ProposalMethod(fn, ranked, check, tuple(input_files)))


def is_ranked(name: str) -> bool:
    return PROPOSAL_METHODS.get(name).ranked


def method_input_files(cfg: ProposalConfig) -> dict[str, str]:
    """{config field: path} of the files the configured method reads besides the frame."""
    return {field: getattr(cfg, field) for field in PROPOSAL_METHODS.get(cfg.method).input_files}


register_method("thermal_blobs", thermal_blob_proposals, ranked=True)
register_method("selective_search", selective_search_proposals, ranked=False, check=_check_selective_search)


def compute_proposals(image: np.ndarray, cfg: ProposalConfig, overlay: np.ndarray | None = None) -> np.ndarray:
    """The configured method's boxes (N, 4) int32 xywh for one frame (8- or 16-bit); ``overlay``:
    its source's burned-in overlay mask (``overlay.find_source_overlay``), filled in first."""
    if not cfg.enabled:
        return np.zeros((0, 4), np.int32)
    return PROPOSAL_METHODS.get(cfg.method).propose(fill_overlay(to_uint8(image), overlay), cfg)


# A method in its own module registers itself on import (after everything it uses is defined above).
from data_tools import proposal_ranker  # noqa: E402,F401
