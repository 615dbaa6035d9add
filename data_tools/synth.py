"""Procedural thermal-like scenes with aligned visible images, segmentation masks and boxes.

Every scene is drawn from its own generator seeded by (seed, index): a cool sky and ground with
low-frequency temperature variation, an optional warm road, and warm people and vehicles placed
with perspective (smaller towards the horizon) and occluding each other far to near. The
infrared frame adds optical blur, vignetting, column fixed-pattern noise and sensor noise; the
visible frame renders the same geometry with colours, day or night lighting. Masks and boxes
come from the final visible (un-occluded) pixels of each object.

Output layout (the paired layout fine-tuning reads, and a sources YAML for the shard builder):
    ir/NAME.png  vi/NAME.png  masks/NAME.png  labels/NAME.txt (YOLO)  classes.txt  sources.yaml
    train.txt  val.txt (every 4th frame held out, so that a demo never scores frames it trained on)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from data_tools.files import atomic_write_text
from data_tools.imageio import write_png

SEG_CLASSES = ("background", "road", "person", "car")  # mask values 0..3
BOX_CLASSES = ("person", "car")  # YOLO class ids 0, 1
VAL_EVERY = 4  # frames i with i % 4 == 3 form the held-out val.txt


@dataclass(frozen=True)
class SynthConfig:
    num_images: int = 96
    width: int = 320
    height: int = 256
    seed: int = 0
    max_people: int = 6
    max_cars: int = 4
    bit_depth: int = 8  # 8 or 16 (radiometric-style counts)
    min_visible_fraction: float = 0.3  # objects more occluded than this get no box


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells, max(2, cells * w // h))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _person(shape, cx, foot_y, height, rng):
    """Mask of a standing person: head, torso, legs and arms."""
    m = np.zeros(shape, np.uint8)
    w = max(3, int(height * rng.uniform(0.22, 0.3)))
    head_r = max(2, int(height * 0.09))
    cv2.circle(m, (cx, foot_y - height + head_r), head_r, 1, -1)
    top, hip = foot_y - height + 2 * head_r, foot_y - int(height * 0.45)
    cv2.ellipse(m, (cx, (top + hip) // 2), (w // 2, max(1, (hip - top) // 2 + 1)), 0, 0, 360, 1, -1)
    stride = int(w * rng.uniform(0.0, 0.5))
    for dx in (-w // 4, w // 4):
        cv2.line(m, (cx + dx, hip), (cx + dx + (stride if dx > 0 else -stride) // 2, foot_y), 1, max(1, w // 4))
    arm = rng.uniform(-0.5, 0.5)
    for side in (-1, 1):
        cv2.line(m, (cx + side * w // 2, top + 2), (cx + side * int(w * (0.7 + arm)), hip), 1, max(1, w // 6))
    return m


def _car(shape, cx, base_y, width, rng):
    """Masks of a car (body + cabin) and of its hot parts (wheels, engine/exhaust)."""
    m = np.zeros(shape, np.uint8)
    hot = np.zeros(shape, np.uint8)
    body_h = int(width * rng.uniform(0.28, 0.36))
    x1, x2 = cx - width // 2, cx + width // 2
    cv2.rectangle(m, (x1, base_y - body_h), (x2, base_y - body_h // 4), 1, -1)
    cab = int(width * rng.uniform(0.45, 0.6))
    off = int(width * rng.uniform(-0.1, 0.1))
    cv2.rectangle(m, (cx - cab // 2 + off, base_y - body_h - body_h // 2), (cx + cab // 2 + off, base_y - body_h), 1, -1)
    r = max(2, body_h // 3)
    for wx in (x1 + width // 5, x2 - width // 5):
        cv2.circle(m, (wx, base_y - r), r, 1, -1)
        cv2.circle(hot, (wx, base_y - r), max(1, r - 1), 1, -1)
    front = x1 if rng.uniform() < 0.5 else x2 - width // 4
    cv2.rectangle(hot, (front, base_y - body_h), (front + width // 4, base_y - body_h // 2), 1, -1)
    return m, hot & m


def render_scene(cfg: SynthConfig, index: int) -> dict[str, np.ndarray | list]:
    rng = np.random.default_rng([cfg.seed, index])
    h, w = cfg.height, cfg.width
    night = rng.uniform() < 0.5
    horizon = int(h * rng.uniform(0.3, 0.5))
    yy = np.arange(h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    # Temperature field in arbitrary units (about 0 = cold sky, 1 = body heat).
    temp = np.where(yy < horizon, 0.05 + 0.1 * yy / max(horizon, 1), 0.3 + 0.12 * (yy - horizon) / (h - horizon))
    temp += 0.06 * _smooth_noise(rng, h, w, 6) + 0.02 * _smooth_noise(rng, h, w, 24)
    sky_rgb = np.array([40, 30, 25] if night else rng.uniform([170, 120, 60], [240, 200, 140]), np.float32)
    ground_rgb = np.array(rng.uniform([20, 60, 30], [90, 140, 90]), np.float32)
    vis = np.where((yy < horizon)[..., None], sky_rgb, ground_rgb) + 12 * _smooth_noise(rng, h, w, 16)[..., None]
    seg = np.zeros((h, w), np.uint8)
    if rng.uniform() < 0.7:  # a road from the horizon to the bottom edge
        road = np.zeros((h, w), np.uint8)
        c = int(w * rng.uniform(0.3, 0.7))
        top_half, bottom_half = int(w * rng.uniform(0.02, 0.06)), int(w * rng.uniform(0.3, 0.5))
        pts = np.array([[c - top_half, horizon], [c + top_half, horizon], [c + bottom_half, h], [c - bottom_half, h]])
        cv2.fillPoly(road, [pts.astype(np.int32)], 1)
        r = road.astype(bool)
        temp[r] = (0.45 if not night else 0.38) + 0.03 * _smooth_noise(rng, h, w, 12)[r]
        vis[r] = rng.uniform(70, 110) + 8 * _smooth_noise(rng, h, w, 30)[r, None]
        seg[r] = 1
    objects = []
    for _ in range(int(rng.integers(1, cfg.max_people + 1))):
        objects.append(("person", int(rng.integers(horizon + 8, h))))
    for _ in range(int(rng.integers(0, cfg.max_cars + 1))):
        objects.append(("car", int(rng.integers(horizon + 8, h))))
    objects.sort(key=lambda o: o[1])  # far (small y) first, so near objects occlude them
    inst = np.zeros((h, w), np.int32)
    drawn_area = []
    for n, (kind, base_y) in enumerate(objects, 1):
        depth = (base_y - horizon) / max(h - horizon, 1)  # 0 at the horizon, 1 at the bottom
        cx = int(rng.integers(0, w))
        if kind == "person":
            m = _person((h, w), cx, base_y, max(12, int(h * (0.12 + 0.35 * depth))), rng).astype(bool)
            temp[m] = rng.uniform(0.85, 1.0) + 0.04 * _smooth_noise(rng, h, w, 8)[m]
            vis[m] = rng.uniform(20, 230, size=3)
            seg[m] = 2
        else:
            m, hot = _car((h, w), cx, base_y, max(20, int(w * (0.1 + 0.35 * depth))), rng)
            m = m.astype(bool)
            temp[m] = rng.uniform(0.5, 0.7)
            temp[hot.astype(bool)] = rng.uniform(0.95, 1.1)
            vis[m] = rng.uniform(20, 230, size=3)
            seg[m] = 3
        inst[m] = n
        drawn_area.append(int(m.sum()))
    boxes = []
    for n, (kind, _) in enumerate(objects, 1):
        ys, xs = np.nonzero(inst == n)
        if len(ys) == 0 or len(ys) < cfg.min_visible_fraction * drawn_area[n - 1]:
            continue  # hidden behind nearer objects: no box (its visible pixels stay in the mask)
        x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        boxes.append((BOX_CLASSES.index(kind), float(x1), float(y1), float(x2 - x1), float(y2 - y1)))
    boxes = [b for b in boxes if b[3] >= 2 and b[4] >= 2]
    # Infrared sensor model: optics blur, vignetting, column fixed-pattern noise, temporal noise.
    ir = cv2.GaussianBlur(temp.astype(np.float32), (0, 0), rng.uniform(0.6, 1.4))
    r2 = ((np.arange(w) - w / 2) / (w / 2))[None, :] ** 2 + ((np.arange(h) - h / 2) / (h / 2))[:, None] ** 2
    ir = ir * (1 - rng.uniform(0.1, 0.25) * r2 / 2) + rng.normal(0, 0.01, (1, w)) + rng.normal(0, 0.015, (h, w))
    lo, gain = rng.uniform(0.0, 0.05), rng.uniform(0.85, 1.0)
    ir = np.clip((ir - lo) * gain, 0, 1)
    if cfg.bit_depth == 16:  # radiometric-style counts in a narrow band of the 16-bit range
        ir_img = (7000 + ir * 4000).astype(np.uint16)
    else:
        ir_img = (ir * 255 + 0.5).astype(np.uint8)
    light = rng.uniform(0.15, 0.35) if night else rng.uniform(0.8, 1.1)
    vis = np.clip(vis * light + rng.normal(0, 6 if night else 3, vis.shape), 0, 255).astype(np.uint8)
    return {"ir": ir_img, "vi": vis, "mask": seg, "boxes": boxes, "night": night}


def write_corpus(out_dir: str | Path, cfg: SynthConfig = SynthConfig()) -> Path:
    out = Path(out_dir)
    for sub in ("ir", "vi", "masks", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(cfg.num_images):
        scene = render_scene(cfg, i)
        name = f"{i:05d}{'N' if scene['night'] else 'D'}"
        names.append(name)
        write_png(out / "ir" / f"{name}.png", scene["ir"])
        write_png(out / "vi" / f"{name}.png", cv2.cvtColor(scene["vi"], cv2.COLOR_RGB2BGR))
        write_png(out / "masks" / f"{name}.png", scene["mask"])
        lines = [f"{c} {(x + bw / 2) / cfg.width:.6f} {(y + bh / 2) / cfg.height:.6f} "
                 f"{bw / cfg.width:.6f} {bh / cfg.height:.6f}" for c, x, y, bw, bh in scene["boxes"]]
        (out / "labels" / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    train = [n for i, n in enumerate(names) if i % VAL_EVERY != VAL_EVERY - 1]
    (out / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (out / "val.txt").write_text("".join(f"{n}\n" for n in names[VAL_EVERY - 1::VAL_EVERY]))
    (out / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(BOX_CLASSES)))
    (out / "seg_classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(SEG_CLASSES)))
    (out / "sources.yaml").write_text(
        "# Shard-builder sources for this synthetic corpus (paths relative to this file).\n"
        "sources:\n"
        "  - name: synth\n"
        "    root: ir\n"
        "    glob: '*.png'\n"
        "    boxes: {format: yolo, path: labels, classes: [" + ", ".join(BOX_CLASSES) + "]}\n")
    # last, and whole: the corpus is complete once it is there (run.sh skips the stage by it)
    atomic_write_text(out / "synth.json", json.dumps(asdict(cfg), indent=1))
    return out


def burn_in_overlay(frame: np.ndarray) -> np.ndarray:
    """A copy of an 8-bit frame with what a handheld thermal camera burns into its exports: a
    palette bar at the right edge, a temperature readout and a time stamp in white, a centre
    crosshair (sizes relative to a 640 px wide frame). The same in every frame, as a camera draws it."""
    out = frame.copy()
    h, w = out.shape[:2]
    top, bottom = h // 8, h - h // 8
    out[top:bottom, w - w // 21 - w // 53: w - w // 53] = np.linspace(255, 0, bottom - top)[:, None].astype(np.uint8)
    scale = w / 640
    thick = max(1, round(2 * scale))
    cv2.putText(out, "36.5C  MAX", (round(10 * scale), round(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale,
                255, thick)
    cv2.putText(out, "12:04:31 2026-12-03", (round(10 * scale), h - round(12 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                0.7 * scale, 255, thick)
    cv2.drawMarker(out, (w // 2, h // 2), 255, cv2.MARKER_CROSS, round(30 * scale), thick)
    return out
