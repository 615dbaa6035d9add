"""A picture of a shard folder: each sample's frame with its proposals (green, at most 40 drawn)
and one online RoI crop (yellow box), with the resized crop itself beside the frame."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data_tools.imageio import write_png
from data_tools.manifest import read_manifest
from data_tools.shards import decode_sample, iter_shard
from data_tools.transforms import RoICropConfig, object_sensitive_crop, to_uint8


def display_bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(to_uint8(image), cv2.COLOR_GRAY2BGR)


def preview_tile(image: np.ndarray, proposals: np.ndarray, rng: np.random.Generator, height: int = 192,
                 max_boxes: int = 40) -> np.ndarray:
    crop = object_sensitive_crop(image, proposals, rng, RoICropConfig(output_size=(height, height)))
    frame = display_bgr(image)
    order = rng.permutation(len(proposals))[:max_boxes]
    for x, y, w, h in proposals[order]:
        cv2.rectangle(frame, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), (0, 200, 0), 1)
    x, y, w, h = crop.box
    cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), (0, 255, 255), 2)
    scale = height / frame.shape[0]
    frame = cv2.resize(frame, (max(1, round(frame.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
    label = "fallback crop" if crop.fallback else ("large RoI crop" if crop.need_big else "RoI crop")
    cv2.putText(frame, f"{len(proposals)} proposals", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0), 1)
    side = display_bgr(crop.image)
    cv2.putText(side, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
    return np.concatenate([frame, np.full((height, 4, 3), 255, np.uint8), side], axis=1)


def preview_shards(out_dir: str | Path, out_png: str | Path, samples: int = 8, columns: int = 2,
                   seed: int = 0) -> Path:
    out = Path(out_dir)
    manifest = read_manifest(out)
    rng = np.random.default_rng(seed)
    tiles = []
    for entry in manifest["shards"]:
        for _, members in iter_shard(str(out / entry["shard"])):
            image, proposals, _ = decode_sample(members)
            tiles.append(preview_tile(image, proposals, rng))
            if len(tiles) >= samples:
                break
        if len(tiles) >= samples:
            break
    if not tiles:
        raise ValueError(f"{out}: no samples to preview")
    return write_grid(tiles, columns, out_png)


def write_grid(tiles: list[np.ndarray], columns: int, out_png: str | Path) -> Path:
    """Tiles of one height (BGR uint8) in rows of ``columns``, white between them, as a PNG."""
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 4), (0, width - t.shape[1] + 4), (0, 0)), constant_values=255) for t in tiles]
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return write_png(out_png, np.concatenate(rows, axis=0))
