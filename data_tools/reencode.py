"""Convert a shard folder between frame encodings (``png`` <-> ``raw``) without recomputing
anything: proposals, metadata, keys and shard boundaries are kept; every frame is decoded and
re-encoded losslessly, so a round trip gives back the same pixels (and, for PNG with the same
compression level, the same bytes)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from data_tools import dirlock
from data_tools.build import SAMPLE_FRAME_FORMAT, resolved_config
from data_tools.config import config_hash, save_resolved
from data_tools.command import Interrupted
from data_tools.files import atomic_write_text, storage_problem
from data_tools.manifest import MANIFEST, ManifestError, read_manifest
from data_tools.shards import ENCODINGS, ShardFile, decode_image, encode_image, image_member, iter_shard


class ReencodeError(RuntimeError):
    pass


def reencode_shards(src: str | Path, dst: str | Path, encoding: str, png_compression: int | None = None) -> dict:
    """Write ``src``'s shards to ``dst`` with frames in ``encoding``; returns the new manifest.
    ``dst`` must not exist yet or be empty (no half-converted folder is ever taken for a finished
    one: the manifest is written last), and is locked for the conversion."""
    src, dst = Path(src), Path(dst)
    if encoding not in ENCODINGS:
        raise ReencodeError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    try:
        manifest = read_manifest(src)
    except ManifestError as e:
        raise ReencodeError(str(e)) from None
    # Two conversions into one folder would write the same shard names at once.
    with dirlock.holding(dst, "one reencode per output folder. Wait for it, stop it, or use another --out",
                         ReencodeError):
        try:
            return _reencode_into(src, dst, manifest, encoding, png_compression)
        except OSError as e:
            if (problem := storage_problem(e)) is None:
                raise
            raise ReencodeError(f"writing {dst} failed ({problem}): free space (or choose another --out), remove "
                                "the folder and run again") from None
        except KeyboardInterrupt:
            raise Interrupted(f"{dst} holds part of the conversion: remove the folder and run again") from None


def _reencode_into(src: Path, dst: Path, manifest: dict, encoding: str, png_compression: int | None) -> dict:
    held = [p.name for p in dst.iterdir() if p.name != dirlock.LOCK_NAME]
    if held and all(name.endswith((".tar", ".tar.tmp")) for name in held):  # the manifest comes last
        raise ReencodeError(f"{dst} holds {len(held)} shard files but no {MANIFEST}: a conversion that was "
                            "stopped; remove the folder (or choose another --out) and run again")
    if held:
        raise ReencodeError(f"{dst} exists and is not empty")
    config = copy.deepcopy(manifest["config"])
    config["shards"]["encoding"] = encoding
    if png_compression is not None:
        config["shards"]["png_compression"] = png_compression
    compression = int(config["shards"]["png_compression"])
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for entry in manifest["shards"]:
        out = ShardFile(str(dst / entry["shard"]))
        try:
            for key, members in iter_shard(str(src / entry["shard"])):
                old_ext = image_member(members)
                ext, data = encode_image(decode_image(members), encoding, compression)
                sample = {"__key__": key, **{k: v for k, v in members.items() if k != old_ext}, ext: data}
                out.write(sample)
        except BaseException:
            out.abandon()
            raise
        if out.count != entry["samples"]:
            raise ReencodeError(f"{entry['shard']}: read {out.count} samples, the manifest lists {entry['samples']}")
        sha = out.close()
        shards.append(dict(entry, sha256=sha, bytes=(dst / entry["shard"]).stat().st_size))
    new = dict(manifest, config=config, config_hash=config_hash(config), shards=shards, encoding=encoding)
    new["totals"] = dict(manifest["totals"], bytes=sum(s["bytes"] for s in shards))
    new["sample_format"] = {ENCODINGS[encoding]: SAMPLE_FRAME_FORMAT[encoding],
                            **{k: v for k, v in manifest["sample_format"].items() if k not in ENCODINGS.values()}}
    new["reencoded_from"] = {"folder": str(src), "config_hash": manifest["config_hash"]}
    save_resolved(resolved_config(config, config["sources"]), dst, "config.yaml")  # as a build with it writes
    text = json.dumps(new, indent=1)
    atomic_write_text(str(dst / MANIFEST), text)
    return json.loads(text)
