"""Re-read a shard folder against its manifest: every shard's checksum, sample count and keys,
and every sample's image, proposals and metadata. Any mismatch is reported; none is fatal to
the check itself, so one run lists them all."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.files import sha256_file
from data_tools.manifest import ManifestError, read_manifest
from data_tools.shards import decode_sample, iter_shard


def verify_shards(out_dir: str | Path) -> list[str]:
    """Returns the list of problems found (empty when the folder matches its manifest)."""
    out = Path(out_dir)
    try:
        manifest = read_manifest(out)
    except ManifestError as e:
        return [str(e)]
    problems: list[str] = []
    listed = {s["shard"] for s in manifest["shards"]}
    prefix = manifest["config"]["shards"]["prefix"]
    for extra in sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in listed):
        problems.append(f"{extra}: shard not listed in the manifest")
    keys_seen: set[str] = set()
    written = 0
    for entry in manifest["shards"]:
        tar = out / entry["shard"]
        if not tar.is_file():
            problems.append(f"{entry['shard']}: missing")
            continue
        if sha256_file(str(tar)) != entry["sha256"]:
            problems.append(f"{entry['shard']}: sha256 differs from the manifest")
        count = 0
        try:
            for key, members in iter_shard(str(tar)):
                count += 1
                if key in keys_seen:
                    problems.append(f"{entry['shard']}: duplicate key {key}")
                keys_seen.add(key)
                problems += [f"{entry['shard']}/{key}: {p}" for p in _check_sample(members)]
        except Exception as e:  # a tar that cannot even be listed
            problems.append(f"{entry['shard']}: unreadable tar ({type(e).__name__}: {e})")
        if count != entry["samples"]:
            problems.append(f"{entry['shard']}: {count} samples, manifest says {entry['samples']}")
        written += count
    totals = manifest["totals"]
    if written != totals["written"]:
        problems.append(f"{written} samples in shards, manifest totals say {totals['written']}")
    if totals["found"] != totals["written"] + totals["skipped"]:
        problems.append(f"totals: found {totals['found']} != written {totals['written']} + skipped {totals['skipped']}")
    for name, ps in manifest["sources"].items():
        if ps["found"] != ps["written"] + ps["skipped"]:
            problems.append(f"source {name}: found {ps['found']} != written + skipped")
    return problems


def _check_sample(members: dict[str, bytes]) -> list[str]:
    try:
        image, proposals, meta = decode_sample(members)
    except Exception as e:
        return [f"does not decode ({type(e).__name__}: {e})"]
    problems = []
    if image.ndim != 2:
        problems.append(f"image has shape {image.shape}, expected one channel")
    elif image.shape != (meta["height"], meta["width"]):
        problems.append(f"image {image.shape[1]}x{image.shape[0]} != meta {meta['width']}x{meta['height']}")
    if str(image.dtype) != meta["dtype"]:
        problems.append(f"image dtype {image.dtype} != meta {meta['dtype']}")
    if proposals.ndim != 2 or proposals.shape[1] != 4 or proposals.dtype != np.int32:
        problems.append(f"proposals have shape {proposals.shape} / dtype {proposals.dtype}")
    elif len(proposals) and (proposals[:, :2].min() < 0 or (proposals[:, 0] + proposals[:, 2]).max() > meta["width"]
                             or (proposals[:, 1] + proposals[:, 3]).max() > meta["height"]):
        problems.append("a proposal leaves the image")
    return problems
