"""A camera's burned-in overlay: the palette bar, temperature readout, logo or crosshair that
handheld and surveillance thermal cameras draw into the frames they export.

Proposal methods look for regions that stand out from their surroundings, and white text or a
palette bar does, in every frame: on the labelled frames of BENCHMARKS.md ("Proposals: a camera's
burned-in overlay") a bar, two lines of text and a crosshair cost `thermal_blobs` 12 of the 143
objects it finds on the clean frames. An overlay is what stays the same while the scene changes
under it, so it is found across a source's frames rather than in one: the pixels whose value varies
by at most ``TOLERANCE`` grey levels over up to ``SAMPLED_FRAMES`` frames spread over the source
(JPEG's ringing around text stays within it), in groups of at least ``MIN_PIXELS`` (a noisy fixed
camera leaves scattered pixels within the tolerance by chance), grown by ``GROW`` pixels. Proposal
methods then see the frame with those pixels filled in from their surroundings (OpenCV's
inpainting, about 10 ms a 640x480 frame); the stored frames keep every pixel as read.

A fixed camera watching a still scene keeps much of its frame unchanged too: when more than
``MAX_SHARE`` of the frame is static the source is left unmasked, and the build says so.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

from data_tools.imageio import SkipSample, crop_border, read_frame
from data_tools.transforms import to_uint8

SAMPLED_FRAMES = 32
MIN_FRAMES = 8
TOLERANCE = 8  # grey levels (of the 8-bit frame proposal methods see)
MIN_PIXELS = 8  # static pixels connected in smaller groups are chance (sensor noise in a fixed camera)
GROW = 2  # px around each static pixel: the anti-aliased edge of text
MAX_SHARE = 0.25


@dataclass(frozen=True)
class OverlayFinding:
    """What a source's sampled frames showed: a mask (uint8 0/1, the frames' size) or why none."""
    mask: np.ndarray | None
    frames: int
    share: float  # of the frame found static (also when not used)
    why_not: str | None = None

    def describe(self) -> dict:
        out = {"frames_compared": self.frames, "static_share": round(self.share, 4), "masked": self.mask is not None}
        if self.why_not:
            out["why_not"] = self.why_not
        return out


def sample_indices(count: int, wanted: int = SAMPLED_FRAMES) -> list[int]:
    """Up to ``wanted`` indices spread evenly over ``count`` frames (first and last included)."""
    if count <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(wanted, count))})


def find_overlay(frames: Iterable[np.ndarray]) -> OverlayFinding:
    """The static pixels of frames of one camera (8- or 16-bit, any mix of sizes: the most common
    size is used). 16-bit frames are compared as proposal methods see them (``to_uint8``, each
    frame through its own percentile stretch): text at the top or bottom of the range stays
    static, the middle of a palette bar may not."""
    greys = [to_uint8(f) for f in frames if f.size]
    if not greys:
        return OverlayFinding(None, 0, 0.0, "no readable frames")
    shape, n = Counter(g.shape for g in greys).most_common(1)[0]
    if n < MIN_FRAMES:
        return OverlayFinding(None, n, 0.0, f"{n} frame(s) of one size, {MIN_FRAMES} needed to tell an overlay")
    low, high = np.full(shape, 255, np.uint8), np.zeros(shape, np.uint8)
    for g in greys:
        if g.shape == shape:  # a running range: no stacked copy of the frames
            np.minimum(low, g, out=low)
            np.maximum(high, g, out=high)
    static = (high - low <= TOLERANCE).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(static, connectivity=8)
    static = (stats[:, cv2.CC_STAT_AREA] >= MIN_PIXELS)[labels].astype(np.uint8) * static
    if GROW:
        static = cv2.dilate(static, np.ones((2 * GROW + 1, 2 * GROW + 1), np.uint8))
    share = float(static.mean())
    if share == 0:
        return OverlayFinding(None, n, 0.0, "no static pixels")
    if share > MAX_SHARE:
        return OverlayFinding(None, n, share, f"{share:.0%} of the frame is static (a fixed camera on a still "
                                              f"scene?), more than the {MAX_SHARE:.0%} an overlay may cover")
    return OverlayFinding(static, n, share)


def overlay_message(source_name: str, finding: OverlayFinding, picture=None) -> str | None:
    """What the console says of a source's finding: the overlay filled in, or why a static part of
    the frame was left alone (nothing when no pixel was static)."""
    if finding.mask is not None:
        return (f"source '{source_name}': a burned-in overlay covers {int(finding.mask.sum()):,} px, "
                f"{finding.share:.2%} of the frame (pixels static across {finding.frames} frames spread over the "
                "source), filled in before the proposals"
                + (f"; see {picture}" if picture else ""))
    if finding.share > 0:
        return f"source '{source_name}': no overlay masked: {finding.why_not}"
    return None


def find_source_overlay(source, items: list) -> OverlayFinding:
    """``find_overlay`` over frames spread across a source's ``items``, read and border-cropped as
    the build reads them (a frame that cannot be read is left out here; the build reports it)."""
    frames = []
    for i in sample_indices(len(items)):
        try:
            frames.append(crop_border(read_frame(items[i].path, channel=source.channel).image, source.border_crop))
        except SkipSample:
            continue
    return find_overlay(frames)


def fill_overlay(image_u8: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The frame with the overlay's pixels inpainted from their surroundings (a frame of another
    size than the mask, or no mask: as it is)."""
    if mask is None or mask.shape != image_u8.shape[:2]:
        return image_u8
    return cv2.inpaint(image_u8, mask, 3, cv2.INPAINT_TELEA)
