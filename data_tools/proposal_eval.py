"""How well region proposals find labelled objects: recall at IoU thresholds by object size,
proposals per frame, frames per second on one core, and recall against the number of proposals
kept. ``python -m data_tools proposals-eval`` runs it on any labelled source that ``build`` reads
(YOLO / VOC / COCO boxes, masks), so users can choose a method for their own camera.

An object counts when both sides are at least ``min_object_side`` (40 px: PAD's smallest
proposal) after the source's border crop; it is found when a proposal overlaps it with IoU at or
above the threshold. Sizes are bucketed by sqrt(w h). Ignore regions (COCO crowd boxes, VOC
``<difficult>`` objects, bbGt's ignore flag, a source's ``boxes.ignore_classes``) are not objects
to find, as detection scoring and proposal benchmarks leave them out; they are counted apart.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from data_tools.files import atomic_write_text, sha256_file
from data_tools.imageio import write_png
from data_tools.preview import display_bgr, write_grid
from data_tools.overlay import find_source_overlay, overlay_message
from data_tools.proposals import (
    PROPOSAL_METHODS,
    ProposalConfig,
    box_iou,
    compute_proposals,
    is_ranked,
    method_input_files,
)

IOU_THRESHOLDS = (0.5, 0.7)
SIZE_BUCKETS = (("40-96", 0.0, 96.0), ("96-192", 96.0, 192.0), ("192+", 192.0, float("inf")))
CURVE_POINTS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 75, 100)


@dataclass
class LabelledFrame:
    source: str
    path: str
    image: np.ndarray
    boxes: np.ndarray  # (N, 4) float xywh, objects of at least min_object_side
    overlay: np.ndarray | None = None  # its source's burned-in overlay mask, as the build finds it
    ignored: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # ignore regions, xywh, any size


@dataclass
class MethodResult:
    method: str
    frames: int = 0
    objects: int = 0
    proposals: int = 0
    seconds: float = 0.0
    best_iou: list[float] = field(default_factory=list)  # per object, over the proposals kept (the cap)
    rank_hit: list[int] = field(default_factory=list)  # per object: first rank with IoU >= 0.5 (-1: none)
    sizes: list[float] = field(default_factory=list)
    object_sources: list[str] = field(default_factory=list)  # per object: its source (camera)
    source_frames: Counter = field(default_factory=Counter)
    # objects without a box at IoU >= 0.5 among those kept; boxes x y w h after the border crop
    missed: list[dict] = field(default_factory=list)
    tiles: list[np.ndarray] = field(default_factory=list)  # pictures of the first missed objects

    def summary(self) -> dict:
        best, sizes, ranks = np.asarray(self.best_iou), np.asarray(self.sizes), np.asarray(self.rank_hit)
        recall = {}
        for t in IOU_THRESHOLDS:
            row = {"all": _share(best >= t)}
            for name, lo, hi in SIZE_BUCKETS:
                inside = (sizes >= lo) & (sizes < hi)
                row[name] = _share(best[inside] >= t) if inside.any() else None
            recall[f"iou_{t}"] = row
        curve = None
        if is_ranked(self.method):
            curve = {str(k): _share((ranks >= 0) & (ranks < k)) for k in CURVE_POINTS}
        return {
            "method": self.method, "frames": self.frames, "objects": self.objects,
            "objects_by_size": {name: int(((sizes >= lo) & (sizes < hi)).sum()) for name, lo, hi in SIZE_BUCKETS},
            "found_iou_0.5": int((best >= 0.5).sum()),
            "recall": recall,
            "proposals_per_frame": round(self.proposals / max(self.frames, 1), 2),
            "frames_per_second_one_core": round(self.frames / max(self.seconds, 1e-9), 2),
            "recall_at_k_iou_0.5": curve,
            "missed_iou_0.5": self.missed,
            "by_source": self._by_source(best),
        }

    def _by_source(self, best: np.ndarray) -> dict:
        """Objects, found and recall at IoU 0.5 per source: a pooled figure hides a weak camera."""
        sources = np.asarray(self.object_sources)
        out = {}
        for name in self.source_frames:
            mine = best[sources == name] if len(sources) else best[:0]
            out[name] = {"frames": self.source_frames[name], "objects": int(mine.size),
                         "found_iou_0.5": int((mine >= 0.5).sum()), "recall_iou_0.5": _share(mine >= 0.5)}
        return out


def _share(hits: np.ndarray) -> float | None:
    return round(float(hits.mean()), 4) if hits.size else None


def labelled_frames(sources, min_object_side: int = 40, every: int = 1, offset: int = 0,
                    unreadable: list | None = None, find_overlays: bool = True,
                    overlays: dict | None = None, ignored: Counter | None = None) -> Iterator[LabelledFrame]:
    """Frames of ``sources`` that carry annotation boxes or masks, read and cropped as ``build``
    reads them, each with its source's overlay mask as the build finds it (``find_overlays``, the
    config's ``proposals.overlay_mask``); ``every`` / ``offset`` select frames i with i % every ==
    offset (a held-out split). A frame that cannot be read is left out and appended to
    ``unreadable`` (source, path, reason), as the build skips it; each source's overlay finding
    goes into ``overlays`` (source name -> ``OverlayFinding``); the frames' ignore regions, by kind,
    are counted into ``ignored`` (their boxes ride along in ``LabelledFrame.ignored``)."""
    from data_tools.build import annotations_for_source, frame_annotation_boxes
    from data_tools.imageio import SkipSample, crop_border, read_frame
    from data_tools.sources import discover

    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"--every {every} --offset {offset}: frames i with i % every == offset need every >= 1 "
                         f"and 0 <= offset < every")
    index = 0
    for source in sources:
        discovery = discover(source)
        by_image, _ = annotations_for_source(source, discovery)
        overlay = None
        if find_overlays:
            finding = find_source_overlay(source, discovery.items)
            overlay = finding.mask
            if overlays is not None:
                overlays[source.name] = finding
        for item in discovery.items:
            records, mask = by_image.get(item.rel, ([], None))
            if not records and mask is None:
                continue
            index += 1
            if (index - 1) % every != offset:
                continue
            try:
                frame = read_frame(item.path, channel=source.channel)  # as the build reads it
            except SkipSample as e:
                if unreadable is not None:
                    unreadable.append({"source": source.name, "path": item.rel, "reason": e.reason, "detail": e.detail})
                continue
            h, w = frame.image.shape
            ignore = [r for r in records if r.ignore]
            boxes, _ = frame_annotation_boxes([r for r in records if not r.ignore], mask, w, h, source, item.rel)
            regions, _ = frame_annotation_boxes(ignore, None, w, h, source, item.rel)
            if ignored is not None:
                ignored.update(r.ignored_as for r in ignore)
            big = (boxes[:, 2] >= min_object_side) & (boxes[:, 3] >= min_object_side)
            yield LabelledFrame(source.name, item.rel, crop_border(frame.image, source.border_crop), boxes[big],
                                overlay, regions)


def evaluate(frames: Iterable[LabelledFrame], configs: dict[str, ProposalConfig], cap: int,
             missed_tiles: int = 30) -> dict[str, MethodResult]:
    """Every method on every frame, timed on one OpenCV thread. Ranked methods are scored on
    their first ``cap`` boxes (what the build keeps); their later boxes only extend the curve.
    Frames stream through one at a time (a labelled set of any size fits in memory); each method
    keeps a picture of its first ``missed_tiles`` missed objects."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        results = {name: MethodResult(name) for name in configs}
        # A bar on a terminal only (as build's): selective search takes about a second a frame.
        for i, frame in enumerate(tqdm(frames, unit="frame", disable=not sys.stderr.isatty(), leave=False)):
            if i == 0:  # One untimed call per method first: the first call in a process pays one-time
                # costs (code and tables loaded on first use), a third less speed on 15 frames.
                for cfg in configs.values():
                    compute_proposals(frame.image, cfg, frame.overlay)
            for name, cfg in configs.items():
                result = results[name]
                start = time.perf_counter()
                proposals = compute_proposals(frame.image, cfg, frame.overlay)
                elapsed = time.perf_counter() - start
                missed_before = len(result.missed)
                _score_frame(result, frame, proposals, elapsed, cap if is_ranked(name) else len(proposals))
                for miss in result.missed[missed_before:][:max(missed_tiles - len(result.tiles), 0)]:
                    result.tiles.append(missed_tile(frame.image, miss))
        return results
    finally:
        cv2.setNumThreads(threads)


def _score_frame(result: MethodResult, frame: LabelledFrame, proposals: np.ndarray, seconds: float,
                 cap: int) -> None:
    result.frames += 1
    result.source_frames[frame.source] += 1
    result.proposals += min(len(proposals), cap)
    result.seconds += seconds
    result.objects += len(frame.boxes)
    result.sizes += np.sqrt(frame.boxes[:, 2] * frame.boxes[:, 3]).tolist()
    result.object_sources += [frame.source] * len(frame.boxes)
    if len(frame.boxes) == 0:
        return
    if len(proposals) == 0:  # one column of zeros: no box, IoU 0, no hit
        proposals = np.zeros((1, 4))
    iou = box_iou(frame.boxes, proposals)
    kept = iou[:, :max(cap, 1)]
    best, nearest = kept.max(axis=1), kept.argmax(axis=1)
    hit = iou >= 0.5
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    result.best_iou += best.tolist()
    result.rank_hit += first_hit.tolist()
    for box, b, near, rank in zip(frame.boxes, best, nearest, first_hit):
        if b < 0.5:  # which objects a method loses, and whether a box for it came after the cap
            result.missed.append({"source": frame.source, "path": frame.path, "box": np.round(box, 1).tolist(),
                                  "best_iou": round(float(b), 3),
                                  "best_box": proposals[near].tolist() if b > 0 else None,
                                  "first_hit_rank": int(rank) + 1 if rank >= 0 else None})


def runnable_methods(base: ProposalConfig, left_out: dict[str, str] | None = None) -> list[str]:
    """Every registered method this config can run (``thermal_blobs_fitted`` only with a ranker,
    ``selective_search`` only with OpenCV's contrib modules); why each other one cannot goes into
    ``left_out`` (method -> reason) when given."""
    names = []
    for name in PROPOSAL_METHODS.names():
        try:
            replace(base, method=name)
        except ValueError as e:
            if left_out is not None:
                left_out[name] = str(e)
            continue
        names.append(name)
    return names


def method_configs(base: ProposalConfig, methods: list[str], max_k: int) -> dict[str, ProposalConfig]:
    """One config per method; ranked methods keep up to ``max_k`` so that the curve can be read
    at every k up to it (the frame's first k boxes are what a cap of k keeps)."""
    return {m: replace(base, method=m, max_proposals=max(max_k, base.max_proposals) if is_ranked(m)
                       else base.max_proposals) for m in methods}


def plot_recall_curves(summaries: list[dict], path: Path, cap: int) -> None:
    """Recall at IoU 0.5 against proposals kept per frame, one line per ranked method, one
    point per unranked method (at its mean count). Drawn with OpenCV: no plotting dependency."""
    w, h, left, bottom, top, right = 720, 480, 70, 60, 30, 30
    canvas = np.full((h, w, 3), 255, np.uint8)
    x_max = max([CURVE_POINTS[-1]] + [s["proposals_per_frame"] for s in summaries])

    def to_px(k, r):
        return (int(left + (w - left - right) * k / x_max), int(h - bottom - (h - top - bottom) * r))

    black, grey = (0, 0, 0), (200, 200, 200)
    for r in np.linspace(0, 1, 6):
        cv2.line(canvas, to_px(0, r), to_px(x_max, r), grey, 1)
        cv2.putText(canvas, f"{r:.1f}", (to_px(0, r)[0] - 40, to_px(0, r)[1] + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, black, 1)
    for k in (0, 10, 20, 30, 40, 50, 75, 100):
        if k <= x_max:
            cv2.putText(canvas, str(k), (to_px(k, 0)[0] - 8, h - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, black, 1)
    cv2.line(canvas, to_px(cap, 0), to_px(cap, 1), (150, 150, 255), 1)
    cv2.putText(canvas, f"cap {cap}", (to_px(cap, 1)[0] + 4, top + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 200), 1)
    cv2.putText(canvas, "proposals kept per frame", (w // 2 - 100, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1)
    cv2.putText(canvas, "recall @ IoU 0.5", (5, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1)
    colours = [(200, 80, 0), (0, 140, 0), (0, 0, 200), (160, 0, 160), (0, 140, 200)]
    for i, s in enumerate(summaries):
        colour = colours[i % len(colours)]
        if s["recall_at_k_iou_0.5"]:
            points = [to_px(int(k), r) for k, r in s["recall_at_k_iou_0.5"].items() if r is not None]
            cv2.polylines(canvas, [np.asarray(points, np.int32)], False, colour, 2)
        else:
            cv2.circle(canvas, to_px(s["proposals_per_frame"], s["recall"]["iou_0.5"]["all"] or 0), 6, colour, -1)
        cv2.putText(canvas, s["method"], (w - right - 210, h - bottom - 20 - 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    colour, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, canvas)


def missed_tile(image: np.ndarray, miss: dict, height: int = 160) -> np.ndarray:
    """The surroundings of a missed object (its box green, the best box kept red), labelled."""
    boxes = [miss["box"]] + ([miss["best_box"]] if miss["best_box"] else [])
    xywh = np.asarray(boxes, np.float64)
    (x0, y0), (x1, y1) = xywh[:, :2].min(axis=0), (xywh[:, :2] + xywh[:, 2:]).max(axis=0)
    margin = 0.25 * max(x1 - x0, y1 - y0)
    left, top = max(int(x0 - margin), 0), max(int(y0 - margin), 0)
    right, bottom = min(int(x1 + margin) + 1, image.shape[1]), min(int(y1 + margin) + 1, image.shape[0])
    view = display_bgr(image)
    for box, colour in zip(boxes, ((0, 200, 0), (0, 0, 255))):
        x, y, w, h = (int(round(v)) for v in box)
        cv2.rectangle(view, (x, y), (x + w - 1, y + h - 1), colour, 2)
    crop = view[top:bottom, left:right]
    width = max(1, round(crop.shape[1] * height / crop.shape[0]))
    tile = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
    tile = np.pad(tile, ((18, 0), (0, max(0, 200 - tile.shape[1])), (0, 0)), constant_values=255)
    rank = miss["first_hit_rank"]
    cv2.putText(tile, f"{Path(miss['path']).name} IoU {miss['best_iou']:.3f}" + (f" hit@{rank}" if rank else ""),
                (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    return tile


def write_missed_sheets(results: dict[str, MethodResult], out: Path) -> list[Path]:
    """``missed_<method>.png`` for each method that missed objects: its first missed ones."""
    return [write_grid(r.tiles, 5, out / f"missed_{name}.png") for name, r in results.items() if r.tiles]


def format_misses(summary: dict) -> str:
    """One line: how many objects the method missed, and how many of those it ranked past the cap."""
    missed = summary["missed_iou_0.5"]
    later = sorted(m["first_hit_rank"] for m in missed if m["first_hit_rank"] is not None)
    line = f"{summary['method']}: missed {len(missed)} of {summary['objects']} objects at IoU 0.5"
    if later:
        ranks = ", ".join(map(str, later)) if len(later) <= 5 else f"{later[0]}-{later[-1]}"
        line += f"; {len(later)} of them found past the cap of {summary['cap']} (rank {ranks})"
    return line


def format_by_source(summary: dict) -> str:
    """Per source, one line of objects found ('' with one source: the table says it)."""
    by_source = summary.get("by_source") or {}
    if len(by_source) < 2:
        return ""
    return "\n".join(f"{summary['method']} on {name}: {s['found_iou_0.5']} of {s['objects']} objects "
                     f"({'-' if s['recall_iou_0.5'] is None else format(s['recall_iou_0.5'], '.3f')}), "
                     f"{s['frames']} frames" for name, s in by_source.items())


def format_ignored(summary: dict) -> str:
    """One line on the ignore regions left out of the objects ('' when there were none)."""
    counts = summary.get("ignore_regions") or {}
    if not counts:
        return ""
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    return (f"not counted as objects: {sum(counts.values())} ignore region(s) ({kinds}), which detection scoring "
            f"leaves out too")


def format_table(summaries: list[dict]) -> str:
    head = (f"{'method':20s} {'frames':>6s} {'objects':>7s} {'found@.5':>8s} {'recall@.5':>9s} {'recall@.7':>9s} "
            + " ".join(f"{'@.5 ' + n:>11s}" for n, _, _ in SIZE_BUCKETS) + f" {'props/frame':>11s} {'frames/s/core':>13s}")
    rows = [head]
    for s in summaries:
        r5, r7 = s["recall"]["iou_0.5"], s["recall"]["iou_0.7"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"{s['method']:20s} {s['frames']:6d} {s['objects']:7d} {s['found_iou_0.5']:8d} "
                    f"{fmt(r5['all']):>9s} {fmt(r7['all']):>9s} "
                    + " ".join(f"{fmt(r5[n]):>11s}" for n, _, _ in SIZE_BUCKETS)
                    + f" {s['proposals_per_frame']:11.1f} {s['frames_per_second_one_core']:13.1f}")
    return "\n".join(rows)


def run(sources, base: ProposalConfig, methods: list[str], out: Path | None, min_object_side: int = 40,
        every: int = 1, offset: int = 0, max_k: int = 100) -> list[dict]:
    unreadable: list[dict] = []
    ignored: Counter = Counter()  # ignore regions by kind, not counted as objects
    overlays: dict = {}
    frames = labelled_frames(sources, min_object_side, every, offset, unreadable, base.overlay_mask, overlays, ignored)
    configs = method_configs(base, methods, max_k)
    results = evaluate(frames, configs, base.max_proposals)
    if not max((r.frames for r in results.values()), default=0):
        raise ValueError("no labelled frames in these sources (proposals-eval needs boxes or masks)"
                         + (f"; {len(unreadable)} could not be read" if unreadable else ""))
    for name, finding in overlays.items():
        message = overlay_message(name, finding)
        if message:
            print(message, file=sys.stderr)
    summaries = [r.summary() for r in results.values()]
    for s in summaries:
        s.update(cap=base.max_proposals, min_object_side=min_object_side, split={"every": every, "offset": offset},
                 unreadable_frames=unreadable, overlays={name: f.describe() for name, f in overlays.items()},
                 ignore_regions=dict(sorted(ignored.items())))
        for name, path in method_input_files(configs[s["method"]]).items():  # what was measured, by content
            s[name] = {"path": path, "sha256": sha256_file(path)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "proposals_eval.json", json.dumps(summaries, indent=1))
        plot_recall_curves(summaries, out / "recall_vs_proposals.png", base.max_proposals)
        write_missed_sheets(results, out)
    return summaries
