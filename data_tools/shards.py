"""The shard format: standard WebDataset tars, one sample = three members sharing a key.

    <key>.png            the frame, lossless, one channel, 8- or 16-bit as read
    <key>.proposals.npy  (N, 4) int32 boxes x, y, w, h in the stored frame's pixels
    <key>.json           metadata: source, path, frame, original size, stored size, dtype, crop, ...

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
from typing import Iterator

import numpy as np
import webdataset as wds

from data_tools.imageio import decode_png

IMAGE_EXT = "png"
PROPOSALS_EXT = "proposals.npy"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, PROPOSALS_EXT, META_EXT)
_TAR_BLOCK = 512


def sample_key(source: str, index: int) -> str:
    return f"{source}-{index:08d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, png: bytes, proposals: np.ndarray, meta: dict) -> dict[str, bytes]:
    return {
        "__key__": key,
        IMAGE_EXT: png,
        PROPOSALS_EXT: npy_bytes(proposals.astype(np.int32).reshape(-1, 4)),
        META_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def decode_sample(members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image, proposals, meta) from a sample's raw members; raises ValueError if malformed."""
    missing = [e for e in SAMPLE_EXTS if e not in members]
    if missing:
        raise ValueError(f"sample lacks member(s) {missing}")
    image = decode_png(members[IMAGE_EXT])
    proposals = np.load(io.BytesIO(members[PROPOSALS_EXT]), allow_pickle=False)
    meta = json.loads(members[META_EXT])
    return image, proposals, meta


def tar_bytes(sample: dict[str, bytes]) -> int:
    """Bytes a sample occupies in a tar (headers + padded data)."""
    total = 0
    for k, v in sample.items():
        if k != "__key__":
            total += _TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK
    return total


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardFile:
    """A tar written under a temporary name and renamed only once complete, so a killed build
    never leaves a shard that looks finished. Members carry fixed metadata (mtime 0, fixed
    owner), so the same samples always give byte-identical tars."""

    def __init__(self, path: str):
        self.path = path
        self.tmp_path = path + ".tmp"
        self._file = open(self.tmp_path, "wb")
        self._writer = wds.TarWriter(self._file, user="irpt", group="irpt", mtime=0, encoder=False)
        self.count = 0
        self.bytes = 0
        self.keys: list[str] = []

    def write(self, sample: dict[str, bytes]) -> None:
        self._writer.write(sample)
        self.count += 1
        self.bytes += tar_bytes(sample)
        self.keys.append(sample["__key__"])

    def close(self) -> str:
        """Finish the tar, make it durable, rename it into place; returns its sha256."""
        self._writer.close()  # closes the tar stream
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        os.replace(self.tmp_path, self.path)
        return sha256_file(self.path)

    def abandon(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)


def iter_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar, in order, with plain ``tarfile``."""
    current_key, members = None, {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(info.name), key) if os.path.dirname(info.name) else key
            if key != current_key and current_key is not None:
                yield current_key, members
                members = {}
            current_key = key
            members[ext] = tar.extractfile(info).read()
    if current_key is not None:
        yield current_key, members


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
