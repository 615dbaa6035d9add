"""The shard format: standard WebDataset tars, one sample = three members sharing a key.

    <key>.png or <key>.npy  the frame, one channel, 8- or 16-bit exactly as read: lossless PNG
                            (``shards.encoding: png``) or the array itself (``raw``), which
                            decodes much faster for about twice the bytes (BENCHMARKS.md)
    <key>.proposals.npy     (N, 4) int32 boxes x, y, w, h in the stored frame's pixels
    <key>.json              metadata: source, path, frame, original size, stored size, dtype, crop, ...

Keys are ``<source>-<index>`` with the index the frame's position in the source's selected
frames, so they are unique, stable across rebuilds and contain no dots (WebDataset splits
member names at the first dot).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Callable, Iterator

import numpy as np

from data_tools.imageio import decode_png, encode_png

ENCODINGS = {"png": "png", "raw": "npy"}  # shards.encoding -> the frame member's extension
PROPOSALS_EXT = "proposals.npy"
META_EXT = "json"
_TAR_BLOCK = 512


def sample_key(source: str, index: int) -> str:
    return f"{source}-{index:08d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class SampleDecodeError(ValueError):
    """A sample whose stored members do not decode (corrupt, truncated, missing a member)."""


def decode_for_training(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(frame, proposals) of a sample as the loader reads it; any failure to decode the stored
    bytes is a ``SampleDecodeError`` naming the sample, so that callers can skip exactly those."""
    try:
        return decode_image(sample), npy_array(sample[PROPOSALS_EXT])
    except (ValueError, KeyError, EOFError, OSError) as e:
        raise SampleDecodeError(f"sample {sample.get('__key__', '?')}: {type(e).__name__}: {e}") from e


def npy_array(data: bytes) -> np.ndarray:
    """An array from .npy bytes (never unpickled)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_image(image: np.ndarray, encoding: str, png_compression: int = 3) -> tuple[str, bytes]:
    """(member extension, bytes) of a frame in the shard encoding."""
    if encoding == "png":
        return ENCODINGS[encoding], encode_png(image, png_compression)
    if encoding == "raw":
        return ENCODINGS[encoding], npy_bytes(image)
    raise ValueError(f"shards.encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")


def image_member(members: dict[str, bytes]) -> str:
    """The extension of the sample's frame member (png or npy)."""
    found = [ext for ext in ENCODINGS.values() if ext in members]
    if len(found) != 1:
        raise ValueError(f"sample has {len(found)} frame members ({sorted(members)}); expected one of "
                         f"{sorted(ENCODINGS.values())}")
    return found[0]


def decode_image(members: dict[str, bytes]) -> np.ndarray:
    """The frame of a sample, from PNG or from its raw array (never unpickled)."""
    ext = image_member(members)
    if ext == "png":
        return decode_png(members[ext])
    image = npy_array(members[ext])
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"raw frame of shape {image.shape} and dtype {image.dtype}: expected 2-D uint8 or uint16")
    return image


def encode_sample(key: str, image_ext: str, image_bytes: bytes, proposals: np.ndarray, meta: dict) -> dict[str, bytes]:
    return {
        "__key__": key,
        image_ext: image_bytes,
        PROPOSALS_EXT: npy_bytes(proposals.astype(np.int32).reshape(-1, 4)),
        META_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def decode_sample(members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image, proposals, meta) from a sample's raw members; raises ValueError if malformed."""
    missing = [e for e in (PROPOSALS_EXT, META_EXT) if e not in members]
    if missing:
        raise ValueError(f"sample lacks member(s) {missing}")
    image = decode_image(members)
    proposals = npy_array(members[PROPOSALS_EXT])
    meta = json.loads(members[META_EXT])
    return image, proposals, meta


def tar_bytes(sample: dict[str, bytes]) -> int:
    """Bytes a sample occupies in a tar (headers + padded data)."""
    total = 0
    for k, v in sample.items():
        if k != "__key__":
            total += _TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK
    return total


class _HashingFile:
    """A write-only file that hashes what passes through it (no re-read to checksum a shard)."""

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class ShardFile:
    """A tar written under a temporary name and renamed only once complete, so a killed build
    never leaves a shard that looks finished. Members carry fixed metadata (mtime 0, fixed
    owner, mode 0444), so the same samples always give byte-identical tars.

    Written with ``tarfile`` rather than ``webdataset.TarWriter`` (same layout) because importing
    webdataset imports torch, over a second of start-up in every build worker process.
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp_path = path + ".tmp"
        self._file = _HashingFile(self.tmp_path)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.bytes = 0
        self.keys: list[str] = []

    def write(self, sample: dict[str, bytes]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o444
            info.uname = info.gname = "irpt"
            self._tar.addfile(info, io.BytesIO(sample[ext]))
        self.count += 1
        self.bytes += tar_bytes(sample)
        self.keys.append(key)

    def close(self) -> str:
        """Finish the tar, make it durable, rename it into place; returns its sha256."""
        self._tar.close()
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self._file.sha256.hexdigest()

    def abandon(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)


def _key_and_extension(info: tarfile.TarInfo) -> tuple[str, str]:
    base = os.path.basename(info.name)
    key, _, ext = base.partition(".")
    return (os.path.join(os.path.dirname(info.name), key) if os.path.dirname(info.name) else key), ext


def shard_index(path: str) -> list[tuple[str, list[tarfile.TarInfo]]]:
    """Each sample's key and its members' headers (data offset and size), in order, from the tar
    headers alone: to read samples of a shard by position (:func:`read_indexed_sample`)."""
    index: list[tuple[str, list[tarfile.TarInfo]]] = []
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if info.isfile():
                key, _ = _key_and_extension(info)
                if not index or index[-1][0] != key:
                    index.append((key, []))
                index[-1][1].append(info)
    return index


def read_indexed_sample(path: str, members: list[tarfile.TarInfo]) -> dict[str, bytes]:
    """{extension: bytes} of one sample of :func:`shard_index`, each member read at its offset."""
    out = {}
    with open(path, "rb") as f:
        for info in members:
            f.seek(info.offset_data)
            data = f.read(info.size)
            if len(data) != info.size:
                raise EOFError(f"{path}: member {info.name} is cut short")
            out[_key_and_extension(info)[1]] = data
    return out


def iter_shard(path: str, wanted: Callable[[int], bool] | None = None
               ) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {extension: bytes}) for each sample of a tar, in order, with plain ``tarfile``.
    ``wanted(i)``: whether sample i (0-based) is read; one that is not comes as (key, None), its
    members' data skipped over, not read (a seekable tar: only their 512-byte headers are)."""
    current_key, members, index, reading = None, {}, -1, True
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _key_and_extension(info)
            if key != current_key:
                if current_key is not None:
                    yield current_key, members if reading else None
                current_key, members, index = key, {}, index + 1
                reading = wanted is None or wanted(index)
            if reading:
                members[ext] = tar.extractfile(info).read()
    if current_key is not None:
        yield current_key, members if reading else None
