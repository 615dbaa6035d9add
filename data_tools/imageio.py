"""Robust reading of infrared frames: every failure becomes a named skip reason.

Accepted containers: PNG, JPEG, TIFF, BMP, Netpbm (PGM / PPM, as robotics recorders dump frames);
8- and 16-bit. Grey stored as RGB is detected and stored as one channel. Truly colour input is
converted to luma (ITU-R BT.601 weights, OpenCV's BGR2GRAY) and reported as a warning, because an
infrared corpus should not silently contain visible images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data_tools.files import atomic_write

# Every reason a frame can be skipped, with the meaning written into the manifest's docs.
SKIP_REASONS = {
    "unreadable": "the file could not be opened or read (permissions, I/O error)",
    "empty_file": "the file has zero bytes",
    "not_an_image": "the bytes are not PNG, JPEG, TIFF, BMP or Netpbm, whatever the extension says",
    "truncated": "the container ends before its end marker (PNG IEND / JPEG EOI)",
    "decode_failed": "the decoder rejected the data (corrupt content)",
    "unsupported_dtype": "pixels are neither 8- nor 16-bit unsigned integers",
    "too_small": "after the border crop, a side is shorter than the crop minimum",
    "blank_frame": "every pixel holds the same value (a dropped or blank frame: nothing to learn from)",
    "black_frame": "the frame's maximum is at or below the source's black-frame threshold",
    "no_such_channel": "the frame has fewer channels than the source's `channel` names",
    "label_map": "2 to 16 distinct values, all small class indices (< 64) or 0 / 255: a segmentation label "
                 "map or mask, not a frame (a source rooted at a dataset's top folder takes its label folders too)",
}

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)
_NETPBM = (b"P2", b"P3", b"P5", b"P6")  # grey / colour, text / binary; a space or newline follows


class SkipSample(Exception):
    """A frame that cannot enter the corpus; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Frame:
    image: np.ndarray  # (H, W), uint8 or uint16
    format: str  # png / jpeg / tiff / bmp
    # "grey", "grey_rgb" (grey stored as 3 equal channels), "colour" (converted to luma), "packed"
    # (converted, and its 4th channel varies: MFNet keeps the thermal frame there) or "channel" (one
    # stored channel, as the source's `channel` says)
    colour: str
    channel_spread: float = 0.0  # mean over pixels of max - min across colour channels


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SkipSample("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if not data:
        raise SkipSample("empty_file")
    return data


def sniff_format(data: bytes) -> str:
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:2] in _NETPBM and data[2:3].isspace():
        return "pnm"
    raise SkipSample("not_an_image", f"leading bytes {data[:8].hex()}")


def check_complete(data: bytes, fmt: str) -> None:
    """Catch truncation that decoders tolerate (libjpeg pads a cut JPEG with grey)."""
    if fmt == "png" and b"IEND" not in data[-32:]:
        raise SkipSample("truncated", "PNG has no IEND chunk")
    if fmt == "jpeg" and b"\xff\xd9" not in data.rstrip(b"\x00\r\n ")[-4096:]:
        raise SkipSample("truncated", "JPEG has no end-of-image marker")


def to_single_channel(image: np.ndarray, grey_tolerance: int) -> tuple[np.ndarray, str, float]:
    """One channel from a decoded frame: (image, colour class, mean channel spread).

    Grey stored as RGB (every pixel's channels within ``grey_tolerance``) converts losslessly.
    Anything else is colour: tinted or pseudo-coloured infrared and visible photos alike (their
    channel statistics overlap, e.g. dark night photos vs tinted screenshots), so it is converted
    to luma and reported rather than guessed about. Alpha is ignored.
    """
    if image.ndim == 2:
        return image, "grey", 0.0
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0], "grey", 0.0
    if image.ndim == 3 and image.shape[2] in (3, 4):
        bgr = np.ascontiguousarray(image[:, :, :3])
        spread = bgr.max(axis=2).astype(np.int32) - bgr.min(axis=2)
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        colour = "grey_rgb" if int(spread.max()) <= grey_tolerance else "colour"
        if image.shape[2] == 4 and image[:, :, 3].min() != image[:, :, 3].max():
            colour = "packed"  # not transparency: another image (MFNet's thermal), which luma leaves out
        return grey, colour, round(float(spread.mean()), 3)
    raise SkipSample("decode_failed", f"unexpected array shape {image.shape}")


def decode_raw(data: bytes) -> tuple[np.ndarray, str]:
    """Every channel as stored (BGR[A] order for colour), uint8 or uint16, and the format."""
    fmt = sniff_format(data)
    check_complete(data, fmt)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise SkipSample("decode_failed", f"OpenCV could not decode this {fmt}")
    if image.dtype not in (np.uint8, np.uint16):
        raise SkipSample("unsupported_dtype", str(image.dtype))
    return image, fmt


def decode_frame(data: bytes, grey_tolerance: int = 2, channel: int | None = None) -> Frame:
    """One channel of a frame: the stored ``channel`` (in stored order: OpenCV's B, G, R, A), or
    the single channel a grey or colour frame converts to."""
    image, fmt = decode_raw(data)
    if channel is not None:
        channels = 1 if image.ndim == 2 else image.shape[2]
        if channel >= channels:
            raise SkipSample("no_such_channel", f"channel {channel} of a frame with {channels}")
        return Frame(np.ascontiguousarray(image if image.ndim == 2 else image[:, :, channel]), fmt, "channel")
    image, colour, spread = to_single_channel(image, grey_tolerance)
    return Frame(np.ascontiguousarray(image), fmt, colour, spread)


def read_frame(path: str, grey_tolerance: int = 2, channel: int | None = None) -> Frame:
    return decode_frame(read_bytes(path), grey_tolerance, channel)


def read_raw(path: str) -> np.ndarray:
    """Every channel as stored (BGR[A] order for colour), uint8 or uint16; same checks as read_frame."""
    return decode_raw(read_bytes(path))[0]


def read_rgb(path: str) -> np.ndarray:
    """A visible frame as (H, W, 3) uint8 RGB (grey frames replicated, 16-bit scaled to 8)."""
    image = read_raw(path)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_BGR2RGB)


LOSSY_SUFFIXES = (".jpg", ".jpeg")  # compression that changes values along every edge


def is_lossy(path: str) -> bool:
    return Path(path).suffix.lower() in LOSSY_SUFFIXES


def mask_foreground(mask: np.ndarray, path: str) -> np.ndarray:
    """The object pixels of a binary mask read from ``path``: its non-zero values, or, of a JPEG
    mask, those over half its largest value (JPEG leaves small non-zero values along every edge)."""
    return mask > (mask.max() // 2 if is_lossy(path) and mask.size else 0)


def label_map_values(image: np.ndarray) -> np.ndarray | None:
    """The values of a frame that is a label map or mask rather than a camera's frame: 2 to 16
    distinct values, each a small class index (< 64), 255 (ignore / mask) or the type's maximum;
    None otherwise. Real infrared frames measured hold 12-256 values, never only small ones (the
    fewest, a SIRST sky frame: 12 values from 23 to 204)."""
    values = np.flatnonzero(np.bincount(image.ravel()))
    if not 2 <= len(values) <= 16:
        return None
    small = (values < 64) | (values == 255) | (values == np.iinfo(image.dtype).max)
    return values if small.all() else None


def read_label_map(path: str) -> np.ndarray:
    """A segmentation label PNG as (H, W) class indices: grey or palette ('P') images give their
    stored values (Pillow, because OpenCV expands palettes to colours); colour label images are
    refused, since their class colours would need a table."""
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(path)
    try:
        import io
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise SkipSample("decode_failed", f"label image mode {im.mode}: expected one channel of class indices")
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError) as e:
        raise SkipSample("decode_failed", str(e)) from None


def read_mask(path: str) -> np.ndarray:
    """An object mask as (H, W) values, non-zero = object: grey and palette PNGs through
    ``read_label_map`` (their stored indices, where OpenCV would expand a palette to colours),
    colour masks as any non-zero channel."""
    try:
        return read_label_map(path)
    except SkipSample:
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise
        return image.max(axis=2) if image.ndim == 3 else image


def crop_border(image: np.ndarray, border: tuple[int, int, int, int]) -> np.ndarray:
    """Remove (top, bottom, left, right) pixels, e.g. DroneVehicle's 100 px white frame."""
    top, bottom, left, right = border
    h, w = image.shape[:2]
    return image[top : max(top, h - bottom), left : max(left, w - right)]


def decode_png(data: bytes) -> np.ndarray:
    """Decode a shard's lossless image exactly as stored (uint8 or uint16, one channel)."""
    if not data:  # OpenCV asserts on an empty buffer (cv2.error, no ValueError): a damaged sample, said as one
        raise ValueError("image member is empty")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("image bytes do not decode as PNG")
    return image


def encode_png(image: np.ndarray, compression: int = 3) -> bytes:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """``image`` (grey or BGR, 8- or 16-bit) as a PNG file, whole or not at all. Not cv2.imwrite: on a
    full disk it returns False, which a caller easily drops, and leaves half a file."""
    data = encode_png(image)
    atomic_write(path, lambda f: f.write(data), binary=True)
    return Path(path)
