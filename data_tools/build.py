"""Build WebDataset shards with region proposals from infrared sources.

Frames are processed in parallel (read, crop, check, propose, encode) and written by the parent in
the order of ``write_order`` (a seeded shuffle of the corpus, or corpus order), so the output depends
only on the inputs and the config, never on the number of workers: same inputs + config ->
byte-identical shards and manifest.

Resume: each finished shard is renamed into place and followed by a small progress record
(``.progress/shard-NNNNNN.json``: item range, sha256, skips). A rerun keeps every shard whose
record and checksum agree and continues after the last one.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from data_tools import SAMPLE_SCHEMA_VERSION, dirlock
from data_tools.annotations import (ISSUE_REASONS, AnnotationSet, BoxRecord, assign_to_images, boxes_from_mask,
                                    boxes_to_pixels, clip_boxes, issue, read_annotations)
from data_tools.config import (check_config, config_changes, config_hash, earlier_version_of, save_resolved,
                               to_container)
from data_tools.imageio import (SKIP_REASONS, SkipSample, crop_border, label_map_values, mask_foreground, read_frame,
                               read_mask, write_png)
from data_tools.manifest import MANIFEST, read_manifest
from data_tools.overlay import OverlayFinding, find_source_overlay, overlay_message
from data_tools.proposals import ProposalConfig, compute_proposals, method_input_files, unique_boxes
from data_tools.schema import BuildConfig
from data_tools.command import STOP_SIGNALS, Interrupted
from data_tools.files import atomic_write_text, sha256_file, storage_problem
from data_tools.shards import ENCODINGS, ShardFile, encode_image, encode_sample, sample_key, tar_bytes
from data_tools.sources import Source, check_roots, discover, left_out_text

SAMPLE_FRAME_FORMAT = {
    "png": "the frame, lossless PNG, one channel, uint8 or uint16 exactly as read",
    "raw": "the frame as a .npy array (H, W), uint8 or uint16 exactly as read",
}
PROGRESS_DIR = ".progress"


class BuildError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Per-frame work (runs in worker processes)
# ----------------------------------------------------------------------------------------------

def frame_annotation_boxes(records: list[BoxRecord], mask_path: str | None, orig_w: int, orig_h: int,
                      source: Source, rel: str) -> tuple[np.ndarray, list[dict]]:
    """Annotation boxes of one frame in the stored (border-cropped) frame's pixels."""
    issues: list[dict] = []
    boxes = boxes_to_pixels(records, orig_w, orig_h)
    if mask_path is not None:
        try:
            mask = read_mask(mask_path)
        except SkipSample:
            mask = None
        if mask is None:
            issues.append(issue(mask_path, "mask_unreadable"))
        elif mask.shape[:2] != (orig_h, orig_w):
            issues.append(issue(mask_path, "mask_size_mismatch",
                                f"mask {mask.shape[1]}x{mask.shape[0]}, image {orig_w}x{orig_h} ({rel})"))
        else:
            boxes = np.concatenate([boxes, boxes_from_mask(mask_foreground(mask, mask_path))])
    top, bottom, left, right = source.border_crop
    boxes = boxes - np.array([left, top, 0, 0], np.float64)
    w, h = orig_w - left - right, orig_h - top - bottom
    clipped, keep, changed = clip_boxes(boxes, w, h)
    for i in np.flatnonzero(changed):
        issues.append(issue(rel, "box_clipped", f"box {np.round(boxes[i], 1).tolist()} in {w}x{h}"))
    for i in np.flatnonzero(~keep):
        issues.append(issue(rel, "box_empty", f"box {np.round(boxes[i], 1).tolist()} in {w}x{h}"))
    return clipped[keep], issues


# Fault injection for the tests of a build stopped midway: the worker given this frame index dies at
# once (as by the kernel's OOM killer); once this frame's result is in, the build sends a stop signal
# ("INDEX[:SIGNAL[:parent]]", SIGINT by default) to its process group, as Ctrl-C in a terminal does
# (the test starts it in a session of its own), or to its parent alone (run.sh, as docker signals it).
WORKER_KILL_FAULT_ENV = "IRPT_FAULT_SIGKILL_BUILD_WORKER_AT"
STOP_FAULT_ENV = "IRPT_FAULT_STOP_BUILD_AT"


def _send_fault_stop(spec: str) -> None:
    parts = spec.split(":")
    stop = signal.Signals[parts[1]] if len(parts) > 1 else signal.SIGINT
    if parts[2:] == ["parent"]:
        os.kill(os.getppid(), stop)
    else:
        os.killpg(0, stop)


def process_item(task: tuple) -> dict[str, Any]:
    index, item, source, records, mask_path, cfg = task
    if os.environ.get(WORKER_KILL_FAULT_ENV) == str(index) and mp.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    image_cfg, pcfg = cfg["image"], ProposalConfig(**cfg["proposals"])
    try:
        frame = read_frame(item.path, image_cfg["grey_tolerance"], source.channel)
        orig_h, orig_w = frame.image.shape
        image = crop_border(frame.image, source.border_crop)
        if min(image.shape) < image_cfg["min_side"]:
            raise SkipSample("too_small", f"{image.shape[1]}x{image.shape[0]} after crop, "
                                          f"minimum side {image_cfg['min_side']}")
        low, high = int(image.min()), int(image.max())
        if source.black_threshold is not None and high <= source.black_threshold:
            raise SkipSample("black_frame", f"max {high} <= {source.black_threshold:g}")
        if low == high:
            raise SkipSample("blank_frame", f"every pixel {low}")
        if image_cfg.get("skip_label_maps", True) and (values := label_map_values(image)) is not None:
            raise SkipSample("label_map", f"values {values.tolist()}")
    except SkipSample as s:
        return {"source": item.source,
                "skip": {"source": item.source, "path": item.rel, "reason": s.reason, "detail": s.detail}}
    ann, issues = frame_annotation_boxes(records, mask_path, orig_w, orig_h, source, item.rel)
    for it in issues:
        it["source"] = item.source
    found = compute_proposals(image, pcfg, _OVERLAYS.get(item.source))
    ann_int = unique_boxes(ann)
    proposals = unique_boxes(np.concatenate([ann_int, found])) if len(ann_int) else found
    meta = {
        "schema": SAMPLE_SCHEMA_VERSION, "source": item.source, "path": item.rel,
        "sequence": item.sequence, "frame": item.frame,
        "orig_width": orig_w, "orig_height": orig_h,
        "width": int(image.shape[1]), "height": int(image.shape[0]),
        "dtype": str(image.dtype), "format": frame.format, "colour": frame.colour,
        "crop": list(source.border_crop),
        "proposals_from_annotations": int(len(ann_int)),
        "proposals_method": pcfg.method if pcfg.enabled else None,
        "proposals_from_method": int(len(found)),
    }
    ext, data = encode_image(image, cfg["shards"]["encoding"], cfg["shards"]["png_compression"])
    key = sample_key(item.source, index - cfg["_source_offsets"][item.source])
    return {"source": item.source, "path": item.rel, "colour": frame.colour,
            "channel_spread": frame.channel_spread,
            "issues": issues, "proposals": int(len(proposals)),
            "sample": encode_sample(key, ext, data, proposals, meta)}


_OVERLAYS: dict[str, np.ndarray] = {}  # source name -> its burned-in overlay mask, set once per process


def _in_order(pool: ProcessPoolExecutor, fn, tasks: Iterable, window: int) -> Iterator:
    """``fn`` over ``tasks`` in the pool, results in task order, at most ``window`` frames in flight
    (a 178k-frame corpus is not submitted at once, as ``Executor.map`` would)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _worker_deaths_said(results: Iterable[dict], start: int, total: int) -> Iterator[dict]:
    done = start
    try:
        for res in results:
            yield res
            done += 1
    except BrokenProcessPool:
        raise BuildError(f"a worker process died after frame {done} of {total} (killed: out of memory?); "
                         "the finished shards are kept: rerun the same command to resume (with fewer --workers "
                         "if memory is short)") from None


def _init_worker(overlays: dict[str, np.ndarray]) -> None:
    cv2.setNumThreads(1)  # one OpenCV thread per process; parallelism comes from processes
    if mp.parent_process() is not None:  # Ctrl-C, a preemption notice or a hang-up reaches the whole group:
        # the build decides (its pool stops, the kept shards are said). Not SIGTERM: the pool ends its
        # workers with it (after one died); a scheduler's SIGTERM to the group ends the build's wait on
        # them before their ends are noticed
        for stop in STOP_SIGNALS:
            if stop != signal.SIGTERM:
                signal.signal(stop, signal.SIG_IGN)
    _OVERLAYS.clear()
    _OVERLAYS.update(overlays)  # once per worker, not pickled with every frame's task


# ----------------------------------------------------------------------------------------------
# Planning, resume, manifest
# ----------------------------------------------------------------------------------------------

def resolved_config(cfg: dict, described_sources: list[dict]) -> dict[str, Any]:
    """What a shard folder's ``config.yaml`` holds: the build config and the sources it read (a
    build, and a reencode of one, write the same)."""
    return {"build": {k: cfg[k] for k in ("image", "proposals", "shards")}, "sources": described_sources}


def build_identity(sources: list[Source], cfg: dict) -> dict[str, Any]:
    """Everything that determines the output bytes (the worker count does not), including the
    content of the files a proposal method reads (a ranker refitted under the same name is another build)."""
    pcfg = ProposalConfig(**cfg["proposals"])  # a method's own checks fail here, before any work
    identity = {
        "schema_version": SAMPLE_SCHEMA_VERSION,
        "sources": [s.describe() for s in sources],
        "image": cfg["image"], "proposals": cfg["proposals"], "shards": cfg["shards"],
    }
    for name, path in method_input_files(pcfg).items():
        identity[f"proposals_{name}_sha256"] = sha256_file(path)
    return identity


def write_order(frames: int, shards_cfg: dict) -> np.ndarray:
    """The corpus indices of the frames in the order their samples are written. Shuffled: a shard, and
    the run of samples each pre-training loader stream reads (``pretrain/data.py``), then holds frames
    of every source, as PAD's random sampler draws them, where corpus order gives it a few sequences of
    one source (a shuffle buffer cannot mix what a stream never reads). WebDataset shuffles samples when
    writing shards for the same reason; seeded, so the shards stay a function of the frames and config."""
    if shards_cfg["order"] == "corpus":
        return np.arange(frames)
    return np.random.default_rng(shards_cfg["seed"]).permutation(frames)


def _shard_name(cfg: dict, n: int) -> str:
    return f"{cfg['shards']['prefix']}-{n:06d}.tar"


def _load_progress(out: Path, cfg: dict) -> list[dict]:
    """Progress records of complete shards, contiguous from the first, checksums verified."""
    records = []
    pdir = out / PROGRESS_DIR
    n = 0
    while (pdir / f"{n:06d}.json").is_file():
        rec = json.loads((pdir / f"{n:06d}.json").read_text())
        if rec["shard"] is not None:
            tar = out / rec["shard"]
            if not tar.is_file() or sha256_file(str(tar)) != rec["sha256"]:
                break
        records.append(rec)
        n += 1
    # Forget anything after the last good record (partial or mismatching work is redone).
    for stale in sorted(pdir.glob("*.json")) if pdir.is_dir() else []:
        if int(stale.stem) >= n:
            stale.unlink()
    keep = {r["shard"] for r in records}
    for tar in out.glob(f"{cfg['shards']['prefix']}-*.tar*"):
        if tar.name not in keep:
            tar.unlink()
    return records


def _prepare_out_dir(out: Path, identity: dict, ident_hash: str, overwrite: bool) -> dict | None:
    """Returns the existing manifest when the output is already complete for this config."""
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = read_manifest(out, complete=False)
        # A build that stopped before its first shard (a source or annotation path to fix) claims nothing.
        if old.get("config_hash") != ident_hash and not overwrite and _started(out, old):
            then, now = old.get("config", {}), json.loads(json.dumps(identity))  # as the manifest holds it
            changes = "; ".join(config_changes(then, now))
            if earlier_version_of(then, old.get("config_hash"), now):  # only settings added since
                if old.get("status") == "complete":
                    print(f"note: {out} was built by an earlier version of this toolkit, before the settings "
                          f"{changes}; kept as built (pass --overwrite to build it again with them)", file=sys.stderr)
                    return old
                raise BuildError(
                    f"{out} holds an unfinished build of an earlier version of this toolkit, before the settings "
                    f"{changes}: this version would make its remaining shards another way; finish it with that "
                    "version, or pass --overwrite to build it again")
            raise BuildError(
                f"{out} holds shards of a different config (hash {old.get('config_hash')} != "
                f"{ident_hash}; {changes}); pass --overwrite to replace them or choose another --out")
        if old.get("config_hash") != ident_hash:
            _clear(out)
        elif old.get("status") == "complete":
            return old
    elif out.is_dir() and any(out.glob("*.tar")) and not overwrite:
        raise BuildError(f"{out} contains .tar files but no {MANIFEST}; pass --overwrite to replace them")
    elif overwrite and out.is_dir():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(manifest_path), json.dumps(
        {"status": "building", "config_hash": ident_hash, "config": identity}, indent=1))
    return None


def _started(out: Path, manifest: dict) -> bool:
    """Whether an output folder holds any work: a finished build, a shard or a progress record."""
    return (manifest.get("status") == "complete" or any(out.glob("*.tar"))
            or any((out / PROGRESS_DIR).glob("*.json")))


def _clear(out: Path) -> None:
    for p in list(out.glob("*.tar")) + list(out.glob("*.tar.tmp")) + [out / MANIFEST]:
        if p.exists():
            p.unlink()
    if (out / PROGRESS_DIR).is_dir():
        shutil.rmtree(out / PROGRESS_DIR)


def _frame_list(items: list) -> dict:
    """The frames a build reads, as its progress records keep them: per source its frame count, and a
    digest of every frame's source and path in corpus order."""
    counts: dict[str, int] = {}
    digest = hashlib.sha256()
    for it in items:
        counts[it.source] = counts.get(it.source, 0) + 1
        digest.update(f"{it.source}\0{it.rel}\n".encode())
    return {"frames": counts, "sha256": digest.hexdigest()}


def _same_frames_as_the_finished_shards(out: Path, records: list[dict], now: dict) -> None:
    """A resume continues the write order where the finished shards end; on another frame list (frames
    added or removed since, as by a download still unpacking) its positions name other frames, and the
    shards would repeat some and miss others."""
    then = records[0].get("corpus") if records else None
    if then is None or then == now:
        return
    changed = [f"{name}: {then['frames'].get(name, 0)} then, {now['frames'].get(name, 0)} now"
               for name in sorted(set(then["frames"]) | set(now["frames"]))
               if then["frames"].get(name, 0) != now["frames"].get(name, 0)]
    raise BuildError(f"{out}: the frames of the sources changed since this build started ("
                     f"{'; '.join(changed) or 'the same counts, other frames'}): its {len(records)} finished shard "
                     "record(s) hold frames of the old list. Restore the frames, or pass --overwrite to build again")


def _new_record(number: int, start: int, frame_list: dict) -> dict:
    """A progress record of the build of ``frame_list`` (``_frame_list``)."""
    return {"number": number, "corpus": frame_list, "shard": None, "start": start, "end": start, "samples": 0,
            "bytes": 0,
            "sha256": None, "first_key": None, "last_key": None, "proposals": 0,
            "written": {}, "skipped": [], "colour_converted": [], "issues": []}


def _write_manifest(out: Path, identity: dict, ident_hash: str, sources: list[Source],
                    discoveries: dict, orphan_issues: list[dict], records: list[dict],
                    overlays: dict[str, OverlayFinding]) -> dict:
    per_source = {}
    for s in sources:
        d = discoveries[s.name]
        per_source[s.name] = {"root": s.root, "matched": d.matched, "found": len(d.items),
                              "written": 0, "skipped": 0, "skipped_by_reason": {},
                              "colour_converted": 0, "annotation_issues": 0, "videos_not_read": len(d.videos),
                              "held_by_earlier_sources": dict(d.held_earlier),
                              "links_not_followed": len(d.links_not_followed),
                              "unreadable_folders": len(d.unreadable_folders),
                              "other_modalities_left_out": dict(d.other_modalities_left_out),
                              "infrared_twins": [{"folders": [a, b], "same_names": n} for a, b, n in d.infrared_twins]}
        if s.name in overlays:
            per_source[s.name]["overlay"] = overlays[s.name].describe()
    skipped, colour, issues, shards = [], [], list(orphan_issues), []
    proposals = 0
    for rec in records:
        for name, n in rec["written"].items():
            per_source[name]["written"] += n
        skipped += rec["skipped"]
        colour += rec["colour_converted"]
        issues += rec["issues"]
        proposals += rec["proposals"]
        if rec["shard"] is not None:
            shards.append({k: rec[k] for k in ("shard", "samples", "bytes", "sha256", "first_key", "last_key")})
    for s in skipped:
        ps = per_source[s["source"]]
        ps["skipped"] += 1
        ps["skipped_by_reason"][s["reason"]] = ps["skipped_by_reason"].get(s["reason"], 0) + 1
    for c in colour:
        per_source[c["source"]]["colour_converted"] += 1
    for i in issues:
        per_source[i["source"]]["annotation_issues"] += 1
    for name, ps in per_source.items():
        if ps["found"] != ps["written"] + ps["skipped"]:
            raise BuildError(f"internal accounting error for source '{name}': {ps}")
    for s in sources:  # a recipe's published counts (MSIP): a different download or rule shows here
        if s.expected_frames is not None:
            ps = per_source[s.name]
            ps["expected_frames"] = s.expected_frames
            if ps["written"] != s.expected_frames:
                print(f"warning: source '{s.name}': {ps['written']:,} frames written, the recipe expects "
                      f"{s.expected_frames:,} (found {ps['found']:,}, skipped {ps['skipped']:,}); check its "
                      "download, root and rules", file=sys.stderr)
    totals = {k: sum(ps[k] for ps in per_source.values())
              for k in ("found", "written", "skipped", "colour_converted", "annotation_issues")}
    totals.update(proposals=proposals, shards=len(shards), bytes=sum(s["bytes"] for s in shards))
    manifest = {
        "status": "complete", "schema_version": SAMPLE_SCHEMA_VERSION,
        "config_hash": ident_hash, "config": identity, "totals": totals, "sources": per_source,
        "shards": shards, "skipped": skipped, "colour_converted": colour, "annotation_issues": issues,
        "skip_reasons": SKIP_REASONS, "issue_reasons": ISSUE_REASONS,
        "encoding": identity["shards"]["encoding"],
        "sample_format": {
            ENCODINGS[identity["shards"]["encoding"]]: SAMPLE_FRAME_FORMAT[identity["shards"]["encoding"]],
            "proposals.npy": "(N, 4) int32 x, y, w, h in the stored frame's pixels",
            "json": "metadata: source, path, sequence, frame, sizes, dtype, crop, colour, proposal counts",
        },
    }
    text = json.dumps(manifest, indent=1)
    atomic_write_text(str(out / MANIFEST), text)
    return json.loads(text)  # exactly what the file says (tuples become lists)


def annotations_for_source(source: Source, discovery) -> tuple[dict[str, tuple[list[BoxRecord], str | None]], list]:
    """The annotations of each image of ``source`` that has any (its path relative to the root ->
    its boxes and mask file), and the annotation issues. Annotation folders are read with their
    subfolders (a tree per sequence, as tracking and video sets ship them): see ``assign_to_images``."""
    anns = AnnotationSet()
    for spec in source.annotations:
        read = read_annotations(spec.format, spec.path, spec.suffix, spec.classes, nested=True)
        for records in read.boxes.values():
            for r in records:
                if not r.ignore and str(r.label) in spec.ignore_classes:
                    r.ignore, r.ignored_as = True, f"class {r.label}"
        anns.merge(read)
    images = {rel: f"{source.root}/{rel}" for rel in discovery.all_rel}
    assigned, matching = assign_to_images(anns, images, "images of the source")
    for it in anns.issues + matching:
        it["source"] = source.name
    by_image = {rel: (anns.boxes.get(key, []), anns.masks.get(key)) for rel, key in assigned.items()}
    return by_image, anns.issues + matching


def overlay_picture(source_name: str) -> str:
    """The file, in a build's output folder, that shows the overlay found on a source."""
    return f"overlay-{source_name}.png"


def source_overlays(sources: list[Source], discoveries: dict, cfg: dict, out: Path) -> dict[str, OverlayFinding]:
    """Each source's burned-in overlay, found on frames spread over it (``overlay.py``), said on
    the console and drawn to ``overlay-<source>.png`` where found; none when proposals are off."""
    if not (cfg["proposals"]["enabled"] and cfg["proposals"]["overlay_mask"]):
        return {}
    found = {}
    for s in sources:
        finding = found[s.name] = find_source_overlay(s, discoveries[s.name].items)
        picture = out / overlay_picture(s.name)
        if finding.mask is not None:
            write_png(picture, finding.mask * 255)
        message = overlay_message(s.name, finding, picture)
        if message:
            print(message, file=sys.stderr)
    return found


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _without_held_frames(name: str, items: list, held: dict[str, str]) -> tuple[list, dict[str, int]]:
    """``items`` less the frames an earlier source of the build (or an earlier name in this one) holds
    (``held``: real path -> source, updated), and how many each such source held. Pooling datasets
    often nests one root in another."""
    kept, held_by, own = [], {}, set()
    for it in items:
        real = os.path.realpath(it.path)
        first = held.setdefault(real, name)
        if first == name and real not in own:  # a link to a frame of the same source is a second copy too
            own.add(real)
            kept.append(it)
        else:
            held_by[first] = held_by.get(first, 0) + 1
    return kept, held_by


@dataclass
class Corpus:
    """What a build reads, before any frame is: each source's discovery, the frames in corpus order
    with their annotations, and the annotation files that match no frame."""

    discoveries: dict = field(default_factory=dict)
    items: list = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # source -> index of its first frame
    orphan_issues: list[dict] = field(default_factory=list)
    per_item_ann: list = field(default_factory=list)  # (source, boxes, mask path) per frame


def discover_corpus(sources: list[Source], out: Path) -> Corpus:
    """Every source's frames and annotations, with the warnings a build prints (recordings not read,
    links not followed, folders not listed, frames an earlier source holds); ``out``, the build's
    output folder, is not read as frames."""
    corpus = Corpus()
    held: dict[str, str] = {}
    for s in sources:
        d = discover(s, skip=(str(out),))  # an output folder inside a source's root is not read as frames
        corpus.discoveries[s.name] = d
        d.items, d.held_earlier = _without_held_frames(s.name, d.items, held)
        for other, n in d.held_earlier.items():
            print(f"warning: source '{s.name}': {n} frame(s) left out, source '{other}' already holds them "
                  "(overlapping roots or links to the same files): a frame enters the corpus once", file=sys.stderr)
        if d.other_modalities_left_out:  # a multi-modal dataset's root given: its visible frames are not infrared
            print(f"note: source '{s.name}': {left_out_text(d.other_modalities_left_out)} left out, folders named "
                  "for another modality (visible, depth) beside one named for infrared, as infrared-visible datasets "
                  "ship; to read such a folder anyway, make it a source's root", file=sys.stderr)
        for a, b, shared in d.infrared_twins:  # read, both: which copy to keep is the user's choice
            print(f"warning: source '{s.name}': {a}/ and {b}/ hold {shared:,} frame(s) of the same names: the same "
                  "frames twice (as FLIR's thermal_8_bit/ and thermal_16_bit/)? Both are read; to keep one, give "
                  f"the source a glob (glob: \"**/{b.rpartition('/')[2]}/*\") or that folder as its root",
                  file=sys.stderr)
        if d.videos:  # beside its frames: not read, so said (and counted in the manifest)
            print(f"warning: source '{s.name}': {len(d.videos)} video file(s) not read (e.g. {d.videos[0]}): "
                  "the builder reads frames; extract them into folders to include them", file=sys.stderr)
        if d.links_not_followed:  # their frames are read once, under their own folder's name
            print(f"warning: source '{s.name}': {len(d.links_not_followed)} linked folder(s) not followed (e.g. "
                  f"{d.links_not_followed[0]}): each leads to a folder the source reads already (a loop, or a "
                  "second name for it)", file=sys.stderr)
        if d.unreadable_folders:
            print(f"warning: source '{s.name}': {len(d.unreadable_folders)} folder(s) could not be listed (e.g. "
                  f"{d.unreadable_folders[0]}; permissions?): their frames are not in the corpus", file=sys.stderr)
        by_image, issues = annotations_for_source(s, d)
        corpus.orphan_issues.extend(issues)
        corpus.offsets[s.name] = len(corpus.items)
        for it in d.items:
            corpus.per_item_ann.append((s, *by_image.get(it.rel, ([], None))))
            corpus.items.append(it)
    return corpus


def build_shards(sources: list[Source], cfg: Any, out_dir: str | Path, workers: int = 1,
                 overwrite: bool = False, progress: bool = True,
                 stop_after_shards: int | None = None) -> dict:
    """Build (or resume, or confirm) the shards of ``sources`` in ``out_dir``; returns the manifest.

    ``stop_after_shards`` ends the run early after that many new shards, leaving an unfinished
    build exactly as a kill would (used to test resume).
    """
    cfg = to_container(cfg)
    check_config(cfg, BuildConfig)  # bad settings fail here, before any work
    ProposalConfig(**cfg["proposals"])  # and a method's own checks (its ranker file, OpenCV's contrib)
    check_roots(sources)  # and sources not there, before the output folder is touched
    out = Path(out_dir)
    # Two builds writing one folder would interleave their shards and progress records.
    with dirlock.holding(out, "one build per output folder. Wait for it, stop it, or use another --out", BuildError):
        try:
            return _build_in(out, sources, cfg, workers, overwrite, progress, stop_after_shards)
        except OSError as e:
            if (problem := storage_problem(e)) is None:
                raise
            raise BuildError(f"writing {out} failed ({problem}); its {_records_kept(out)} finished shard record(s) "
                             "are kept: free space (or choose another --out) and rerun the same command to "
                             "resume") from None
        except KeyboardInterrupt:
            raise Interrupted(f"{_records_kept(out)} finished shard record(s) in {out} are kept: rerun the "
                              "same command to resume") from None


def _records_kept(out: Path) -> int:
    return len(list((out / PROGRESS_DIR).glob("*.json")))


def _build_in(out: Path, sources: list[Source], cfg: dict, workers: int, overwrite: bool, progress: bool,
              stop_after_shards: int | None) -> dict:
    identity = build_identity(sources, cfg)
    ident_hash = config_hash(identity)
    done = _prepare_out_dir(out, identity, ident_hash, overwrite)
    if done is not None:
        print(f"{out}: already complete ({done['totals']['written']} samples); nothing to do", file=sys.stderr)
        return done
    save_resolved(resolved_config(cfg, [s.describe() for s in sources]), out, "config.yaml")

    corpus = discover_corpus(sources, out)
    discoveries, items, offsets = corpus.discoveries, corpus.items, corpus.offsets
    orphan_issues, per_item_ann = corpus.orphan_issues, corpus.per_item_ann
    worker_cfg = dict(cfg, _source_offsets=offsets)
    overlays = source_overlays(sources, discoveries, cfg, out)
    masks = {name: f.mask for name, f in overlays.items() if f.mask is not None}

    records = _load_progress(out, cfg)
    frame_list = _frame_list(items)
    _same_frames_as_the_finished_shards(out, records, frame_list)
    start = records[-1]["end"] if records else 0  # records count positions in the write order
    if records:
        print(f"resuming: {len(records)} complete shard record(s), continuing at frame {start}/{len(items)}",
              file=sys.stderr)
    order = write_order(len(items), cfg["shards"])
    tasks = ((int(i), items[i], *per_item_ann[i], worker_cfg) for i in order[start:])
    max_samples = int(cfg["shards"].get("max_samples") or 0)
    max_bytes = int(cfg["shards"].get("max_bytes") or 0)

    pool = None
    if workers > 1:
        # spawn, not fork: a forked child inherits OpenCV's (or torch's) thread-pool locks in
        # whatever state the parent's threads left them, and can deadlock on its first call.
        # concurrent.futures, not multiprocessing.Pool: a worker killed mid-frame (out of memory)
        # breaks the executor, where Pool.imap would wait for that frame forever.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(masks,))
        results: Iterable[dict] = _in_order(pool, process_item, tasks, window=4 * workers)
    else:
        _init_worker(masks)
        results = map(process_item, tasks)

    rec = _new_record(len(records), start, frame_list)
    shard: ShardFile | None = None
    new_shards = 0
    bar = tqdm(total=len(items), initial=start, unit="frame", disable=not progress or not sys.stderr.isatty(),
               desc="shards")

    def finish(end: int) -> None:
        nonlocal shard, rec, new_shards
        rec["end"] = end
        if shard is not None:
            rec["sha256"] = shard.close()
            rec.update(shard=os.path.basename(shard.path), samples=shard.count, bytes=os.path.getsize(shard.path),
                       first_key=shard.keys[0], last_key=shard.keys[-1])
            new_shards += 1
        atomic_write_text(str(out / PROGRESS_DIR / f"{rec['number']:06d}.json"), json.dumps(rec))
        records.append(rec)
        rec, shard = _new_record(rec["number"] + 1, end, frame_list), None

    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    stop_fault = os.environ.get(STOP_FAULT_ENV, "")
    try:
        for position, res in enumerate(_worker_deaths_said(results, start, len(items)), start):
            bar.update(1)
            if str(position) == stop_fault.split(":")[0]:
                _send_fault_stop(stop_fault)
            if "skip" in res:
                rec["skipped"].append(res["skip"])
                continue
            sample = res["sample"]
            if shard is not None and ((max_samples and shard.count >= max_samples) or
                                      (max_bytes and shard.bytes + tar_bytes(sample) > max_bytes)):
                finish(position)
                if stop_after_shards is not None and new_shards >= stop_after_shards:
                    return {"status": "stopped", "shards_written": new_shards}
            if shard is None:
                shard = ShardFile(str(out / _shard_name(cfg, rec["number"])))
            shard.write(sample)
            rec["written"][res["source"]] = rec["written"].get(res["source"], 0) + 1
            rec["proposals"] += res["proposals"]
            rec["issues"] += res["issues"]
            if res["colour"] in ("colour", "packed"):
                kind = "colour_converted_to_luma" + ("_4th_channel_left_out" if res["colour"] == "packed" else "")
                rec["colour_converted"].append({"source": res["source"], "path": res["path"], "kind": kind,
                                                "mean_channel_spread": res["channel_spread"]})
        if shard is not None or rec["skipped"] or not records:
            finish(len(items))
    finally:
        bar.close()
        if pool is not None:  # frames being read finish (a frame is short); the rest are not started
            pool.shutdown(wait=True, cancel_futures=True)
        if shard is not None:  # interrupted mid-shard: no half-written tar survives
            shard.abandon()
    return _write_manifest(out, identity, ident_hash, sources, discoveries, orphan_issues, records, overlays)
