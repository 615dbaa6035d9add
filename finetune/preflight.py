"""What is checked before a fine-tuning run starts (``finetune check``, and every ``train_seg`` /
``train_det`` through the task's ``check_inputs`` hook, before the run directory is touched):
everything that would otherwise fail after hours, or train on nothing, found from the config,
the folder listing and the first frames of each split.

- the weights a method needs (``pad``: a pre-training export);
- the folders and files the config names for each split, with where the layout is when a
  download unpacked a folder or two down, the split folders there are when one is missing, and
  the command that writes train.txt / val.txt for a dataset published without them;
- segmentation training on one frame per process where BatchNorm is not synchronised across
  processes (UPerNet's pyramid pooling cannot train on it; the linear probe can); detection with its
  weights in bf16;
- a split in which no frame has all its files, or whose first frames are all unusable as training
  reads them (colour label images, values outside the classes, 0 / 255 masks read as indices);
- detection labels none of whose boxes has a configured class, or (validation) none of whose
  objects would be scored under ``eval.min_height`` / ``eval.max_occlusion`` / ``eval.border``
  (from the frames' sizes, read from their headers, where boxes are fractions or a border is set).
"""
from __future__ import annotations

import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from data_tools.config import override_arg
from data_tools.walk import path_matches


def check_weights_given(cfg, name: str) -> None:
    """A method that fine-tunes a pre-trained backbone with its adapters (pad) has nothing to start
    from without init.checkpoint: refused here, not after the run directory is claimed."""
    from finetune.models.methods import get_method, method_names

    adapter = get_method(cfg.model.method).needs_adapter
    if adapter and not cfg.init.checkpoint:
        others = ", ".join(m for m in method_names() if not get_method(m).needs_adapter)
        raise ValueError(f"{name}: model.method={cfg.model.method} fine-tunes a backbone pre-trained with {adapter} "
                         f"adapters: give init.checkpoint=FILE (a `python -m pretrain export`, or PAD's release), or "
                         f"another model.method ({others})")


def check_batch(cfg, name: str, processes: int = 1, cuda: bool = False) -> None:
    """Segmentation trains on at least two frames per BatchNorm step: UPerNet's pyramid pooling
    (scale 1) normalises a map pooled to one pixel, one value per channel and frame, and BatchNorm
    cannot train on a single value (PyTorch raises; mmsegmentation asks for two samples per GPU
    for the same reason). On several GPUs the engine's SyncBatchNorm pools the processes' frames;
    plain BatchNorm in CPU processes does not. Detection heads normalise whole maps, the linear
    probe nothing: no limit."""
    if "boxes" in cfg.data or cfg.model.head.get("type", "upernet") != "upernet":
        return
    if int(cfg.train.batch_size) >= 2 or (processes > 1 and cuda):
        return
    where = (f"{processes} CPU processes, whose BatchNorm is not synchronised" if processes > 1
             else "one process")
    raise ValueError(f"{name}: train.batch_size=1 with {where}: segmentation trains on 2 or more frames per "
                     f"BatchNorm step (UPerNet's pyramid pooling normalises a map pooled to 1x1). Set "
                     f"train.batch_size=2 or more (train.effective_batch, when set, keeps the batch the optimizer "
                     f"sees: the accumulation follows), or train on 2 or more GPUs, where SyncBatchNorm pools their "
                     f"frames")


def check_precision(cfg, name: str) -> None:
    """Detection does not run with its weights in bf16 (``train.precision=bf16``): its boxes would be
    bf16 too (8 bits of mantissa: a coordinate near 600 px moves in steps of 4 px) and torchvision's
    NMS has no bf16 kernel. ``bf16_autocast`` computes in bf16 and keeps the boxes in float32."""
    if "boxes" in cfg.data and cfg.train.precision == "bf16":
        raise ValueError(f"{name}: train.precision=bf16 holds the weights in bf16, and detection's boxes with them "
                         f"(steps of 4 px near 600 px; torchvision's NMS has no bf16 kernel): use "
                         f"train.precision=bf16_autocast (bf16 compute, float32 weights and boxes) or fp32")


def _check_layout(cfg, name: str, splits: tuple[str, ...] = ("train", "val"), read_frames: bool = True,
                  scoring: bool = True) -> None:
    """Raise FileNotFoundError, naming the split, unless the folders and files ``cfg.data`` names
    for ``splits`` are there, listed as training lists them, with some frame that has all its
    files; ValueError when the first frames read (``read_frames``) are all unusable, or (detection)
    no box has a configured class, or (``scoring``) no validation object would be scored."""
    from finetune.data.classes import label_id_names, misordered_classes_problem
    from finetune.data.det import ScoringLimits, classes_problem
    from finetune.data.pairs import discover, name_suffix, no_frames_problem
    from finetune.factory import data_for_split, split_list
    from pretrain.engine.distributed import launched_rank

    detection = "boxes" in cfg.data
    for split in splits:
        data = data_for_split(cfg, split)
        if detection and not data.boxes.path:
            raise ValueError(f"{name} ({split}): data.boxes.path is not set (the boxes: a COCO JSON file, or a folder "
                             "of YOLO / bbGt txt or VOC xml files; relative paths start at data.root)")
        try:
            listed = discover(data, split_list(data, split), need_label=not detection)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name} ({split}): not found: {e}{_split_folders_note(cfg, split)}"
                                    f"{_split_command_note(data, split_list(data, split))}") from None
        problem = no_frames_problem(data, split_list(data, split), *listed)
        if problem:
            raise FileNotFoundError(f"{name} ({split}): {problem}")
        if read_frames and (problem := _first_frames_problem(cfg, listed[0])):
            raise ValueError(f"{name} ({split}): {problem}")
        # every process of a launch checks; the first says it (and alone reads the export's corpus)
        if split == "val" and launched_rank() == 0 and (note := seen_in_pretraining(cfg, listed[0])):
            print(f"note: {name} (val): {note}", file=sys.stderr)
        if detection:  # its boxes.path is set (above)
            try:  # a folder of label files where they are read (each frame folder's), or one COCO file
                problem = classes_problem(listed[0], data.boxes, tuple(cfg.data.classes), name_suffix(data, "ir"),
                                          ScoringLimits.of(cfg) if split == "val" and scoring else None,
                                          label_id_names(data), dict(data.get("class_aliases") or {}))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{name} ({split}): {e}") from None
            if problem:
                raise ValueError(f"{name} ({split}): {problem}")
            if problem := misordered_classes_problem(data):
                raise ValueError(f"{name} ({split}): {problem}")


def seen_in_pretraining(cfg, records: list) -> str | None:
    """Which of ``records`` (the validation frames) a pre-training source of ``init.checkpoint`` reads (under
    its root, matched by its globs), said with the count per source; None when none is, or when the export
    does not say what it was pre-trained on. Self-supervised, without labels, but a benchmark's figures
    are comparable only with a backbone that has not seen its evaluation frames."""
    from pretrain.backbone_meta import is_exported_backbone, read_backbone_meta

    init = cfg.init.checkpoint
    if not init or not is_exported_backbone(init):
        return None
    corpus = read_backbone_meta(init).get("pretraining_corpus") or ()
    sources = [s for entry in corpus for s in entry.get("sources") or ()]
    roots = [(s["name"], os.path.realpath(s["root"]), s["globs"]) for s in sources]
    strides = {s["name"]: int(s.get("stride") or 1) for s in sources}
    seen: Counter = Counter()
    for record in records:
        if not (record.ir or record.packed):  # visible frames alone: not what pre-training reads
            continue
        frame = os.path.realpath(record.ir or record.packed)
        for source, root, globs in roots:
            rel = os.path.relpath(frame, root)
            if rel.split(os.sep)[0] != ".." and path_matches(rel.replace(os.sep, "/"), globs):
                seen[source] += 1
                break
    if not seen:
        return None
    said = ", ".join(f"{n:,} under source '{source}'" + (f", which read 1 in {strides[source]} of each folder"
                                                         if strides[source] > 1 else "") for source, n in seen.items())
    return (f"{sum(seen.values()):,} of its {len(records):,} frames are among those {init} was pre-trained on "
            f"({said}): the backbone may have seen them, without labels; a figure comparable with a paper's needs "
            "a pre-training corpus that leaves the evaluation frames out")


def _split_folders_note(cfg, split: str) -> str:
    """Where a folder named after the split (``{split}/ir``, ``images_thermal_{split}``) is missing:
    the split folders that are there, so that another release's names (``val`` for ``test``) are
    one override away."""
    current = (cfg.data.get("split_dirs") or {}).get(split)
    templated = [str(v) for v in cfg.data.dirs.values() if v and "{split}" in str(v)]
    if not current or not templated or not cfg.data.root:
        return ""
    parts = Path(templated[0]).parts
    k = next(i for i, part in enumerate(parts) if "{split}" in part)
    before, after = parts[k].split("{split}", 1)
    parent = Path(cfg.data.root, *parts[:k])
    found = sorted(p.name[len(before): len(p.name) - len(after)] for p in parent.glob(parts[k].replace("{split}", "*"))
                   if p.is_dir() and len(p.name) > len(before) + len(after))
    if not found or current in found:
        return ""
    task = "det" if "boxes" in cfg.data else "seg"
    return (f"; the split folders in {parent} are {', '.join(found)}: set data.split_dirs.{split} to one of them "
            f"(now {current!r}; run.sh: --{task}-set data.split_dirs.{split}=...)")


def _split_command_note(data, split_file: str | None) -> str:
    """Where ``train.txt`` / ``val.txt`` are missing beside the images (M3FD ships no split):
    the command that writes them."""
    images = data.dirs.get("ir") or data.dirs.get("image")
    root = Path(str(data.root))
    if (not split_file or Path(split_file).name not in ("train.txt", "val.txt") or (root / split_file).is_file()
            or not images or not (root / images).is_dir()):
        return ""
    command = shlex.join(["python", "-m", "data_tools", "split", "--root", str(root), "--images", str(images)])
    return f"; a dataset published without a split: `{command}` writes a seeded train.txt and val.txt"


def _root_below(cfg) -> str | None:
    """A folder one or two levels under ``data.root`` where the whole layout is: a download often
    unpacks into a folder of its own (``MSRS-main/``). Only folders holding the training split's
    image folders are checked in full."""
    import copy

    from data_tools.files import folders_below
    from finetune.data.pairs import FRAME_DIR
    from finetune.factory import data_for_split

    # read before the check failed; of a folder per frame folder ("images/{dir}/lwir"), the part above
    needed = [str(v).split(FRAME_DIR)[0] for v in data_for_split(cfg, "train").dirs.values() if v]
    for candidate in folders_below(cfg.data.root, needed):
        moved = copy.deepcopy(cfg)
        moved.data.root = str(candidate)
        try:
            _check_layout(moved, "", read_frames=False, scoring=False)  # where the files are, not what they hold
            return str(candidate)
        except (OSError, ValueError):  # not there, or not a layout training could read
            continue
    return None


def check_run(cfg, name: str, splits: tuple[str, ...] = ("train", "val"), processes: int = 1,
              cuda: bool = False, init_written_later: bool = False, data_written_later: bool = False) -> None:
    """Everything refused before a run of ``splits`` with ``processes`` (on GPUs: ``cuda``): the
    weights its method needs (and the file given: there, unless ``init_written_later``, the export of
    a pipeline's earlier stage), the batch training needs, then its inputs (unless ``data_written_later``:
    the frames of a pipeline's earlier stage)."""
    from pretrain.engine.run import check_init_checkpoint

    check_weights_given(cfg, name)
    if not init_written_later:
        check_init_checkpoint(cfg)
    check_precision(cfg, name)
    if "train" in splits:
        check_batch(cfg, name, processes, cuda)
    if not data_written_later:
        check_inputs(cfg, name, splits)


def check_inputs(cfg, name: str, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Refuse a config before any work: the folders and files it names for ``splits`` (and, when a
    download unpacked one or two folders down, where the whole layout is)."""
    if not cfg.data.root:
        raise ValueError(f"{name}: data.root is not set (the dataset folder)")
    if "boxes" not in cfg.data and not cfg.data.dirs.label:
        raise ValueError(f"{name}: data.dirs.label is not set (segmentation needs label maps)")
    try:
        _check_layout(cfg, name, splits)
    except FileNotFoundError as e:
        below = _root_below(cfg)  # an unreadable or missing root has no folders below it
        if below is None:
            raise
        task = "det" if "boxes" in cfg.data else "seg"
        raise FileNotFoundError(f"{e}. The whole layout is under {below}: use {override_arg('data.root', below)} "
                                f"(run.sh: --{task}-root {shlex.quote(str(below))})") from None


def _first_frames_problem(cfg, records: list, count: int = 4) -> str | None:
    """Why the first ``count`` frames of a split can all not be used, as training's own check of
    each frame finds (a fault of the whole dataset, such as colour label images, shows on its first
    frames), or None when one of them can."""
    from finetune.data.pairs import describe_issues
    from finetune.data.seg import SegDataset, read_checked_pair
    from finetune.factory import seg_spec

    segmentation = "boxes" not in cfg.data
    if segmentation and (problem := _lossy_labels_problem(cfg, records[:count])):
        return problem
    if segmentation:
        first = SegDataset(records[:count], seg_spec(cfg))
        problems = [first.check(i) for i in range(len(first))]
    else:
        problems = [read_checked_pair(record)[1] for record in records[:count]]
    if problems and all(problems):
        return f"its first {len(problems)} frames cannot be used {describe_issues(problems)}"
    if segmentation and not cfg.data.binary_labels:
        return _ignored_masks_problem(first, [i for i, p in enumerate(problems) if p is None])
    return None


def _lossy_labels_problem(cfg, records: list) -> str | None:
    """Label maps saved as JPEG: its compression changes class indices along every edge, into
    values of no class (frames left out) or of a neighbouring class (wrong labels, unseen). Binary
    masks survive it: ``binary_labels`` thresholds a JPEG mask at half its range."""
    from data_tools.imageio import is_lossy

    lossy = [r.label for r in records if r.label and is_lossy(r.label)]
    if not lossy or cfg.data.binary_labels:
        return None
    return (f"its label maps are JPEG ({len(lossy)} of the first {len(records)}, e.g. {lossy[0]}): JPEG compression "
            "changes class indices along every edge, into values of no class or of a neighbouring one. Use label "
            "maps saved without loss (PNG); binary masks (object / background) may stay JPEG with "
            "data.binary_labels=true")


def _ignored_masks_problem(dataset, usable: list[int]) -> str | None:
    """Binary masks (0 / 255) read as class indices: 255 is the ignore index, so every object
    pixel would be ignored and the model taught background alone."""
    import numpy as np

    ignore = dataset.spec.ignore_index
    values = set().union(*(np.unique(dataset.load(i)["label"]).tolist() for i in usable)) if usable else set()
    if ignore in values and values <= {0, ignore}:
        return (f"its first {len(usable)} label maps hold only 0 and {ignore}, the ignore index: every object pixel "
                "would be ignored. Binary masks (0 / 255): set data.binary_labels=true")
    return None
