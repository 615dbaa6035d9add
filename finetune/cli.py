"""``python -m finetune``: seg and det (train + evaluate), params, check (segmentation or detection config)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from data_tools.config import CONFIG_DIR, load_config, override_arg

SEG_CONFIG = str(CONFIG_DIR / "finetune" / "seg_vitb.yaml")
DET_CONFIG = str(CONFIG_DIR / "finetune" / "det_vitb.yaml")


def _checked(args: argparse.Namespace):
    """The config of a seg (or det: it names boxes) task, its class names read where it names a
    file of them, checked against its schema."""
    from data_tools.config import check_config
    from finetune.data.classes import resolve_classes
    from finetune.schema import DetConfig, SegConfig

    cfg = load_config(args.config, args.overrides)
    resolve_classes(cfg)
    check_config(cfg, DetConfig if "boxes" in cfg.data else SegConfig, args.config)
    _check_weights_given(cfg, args.config)
    return cfg


def _check_weights_given(cfg, name: str) -> None:
    """A method that fine-tunes a pre-trained backbone with its adapters (pad) has nothing to start
    from without init.checkpoint: refused here, not after the run directory is claimed."""
    from finetune.models.methods import get_method, method_names

    adapter = get_method(cfg.model.method).needs_adapter
    if adapter and not cfg.init.checkpoint:
        others = ", ".join(m for m in method_names() if not get_method(m).needs_adapter)
        raise ValueError(f"{name}: model.method={cfg.model.method} fine-tunes a backbone pre-trained with {adapter} "
                         f"adapters: give init.checkpoint=FILE (a `python -m pretrain export`, or PAD's release), or "
                         f"another model.method ({others})")


def _cmd_params(args: argparse.Namespace) -> int:
    from finetune.factory import build_detector, build_segmentor, parameter_report

    cfg = _checked(args)
    build = build_detector if "boxes" in cfg.data else build_segmentor
    report = parameter_report(build(cfg, "meta"))  # shapes only, no memory
    report["config"] = {"method": cfg.model.method, "modality": cfg.model.modality, "size": cfg.model.encoder.size}
    print(json.dumps(report, indent=1))
    return 0


def _cmd_seg(args: argparse.Namespace) -> int:
    from finetune.seg import train_seg

    cfg = _checked(args)
    _check_inputs(cfg, args.config, ("val",) if args.eval_only else ("train", "val"))  # before the run dir is touched
    # ends the process itself (distributed exit)
    train_seg(cfg, args.run_dir, overwrite=args.overwrite, eval_only=args.eval_only)
    return 0


def _cmd_det(args: argparse.Namespace) -> int:
    from finetune.det import train_det

    cfg = _checked(args)
    _check_inputs(cfg, args.config, ("val",) if args.eval_only else ("train", "val"))  # before the run dir is touched
    # ends the process itself (distributed exit)
    train_det(cfg, args.run_dir, overwrite=args.overwrite, eval_only=args.eval_only)
    return 0


def _check_layout(cfg, name: str, splits: tuple[str, ...] = ("train", "val"), read_frames: bool = True) -> None:
    """Raise FileNotFoundError, naming the split, unless the folders and files ``cfg.data`` names
    for ``splits`` are there, listed as training lists them, with some frame that has all its
    files; ValueError when the first frames read (``read_frames``) are all unusable, or (detection)
    no box has a configured class."""
    from data_tools.annotations import check_annotation_path
    from finetune.data.det import classes_problem
    from finetune.data.pairs import discover, name_suffix, no_frames_problem
    from finetune.factory import data_for_split, first_frames_problem, split_list

    detection = "boxes" in cfg.data
    for split in splits:
        data = data_for_split(cfg, split)
        try:
            listed = discover(data, split_list(data, split), need_label=not detection)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name} ({split}): not found: {e}{_split_folders_note(cfg, split)}") from None
        problem = no_frames_problem(data, split_list(data, split), *listed)
        if problem:
            raise FileNotFoundError(f"{name} ({split}): {problem}")
        if read_frames and (problem := first_frames_problem(cfg, listed[0])):
            raise ValueError(f"{name} ({split}): {problem}")
        if detection and data.boxes.path:
            try:  # a folder of label files where they are read, or one COCO file
                check_annotation_path(data.boxes.format, str(data.boxes.path))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{name} ({split}): {e}") from None
            problem = classes_problem(listed[0], data.boxes, tuple(cfg.data.classes), name_suffix(data, "ir"))
            if problem:
                raise ValueError(f"{name} ({split}): {problem}")


def _split_folders_note(cfg, split: str) -> str:
    """Where a folder named after the split (``{split}/ir``, ``images_thermal_{split}``) is missing:
    the split folders that are there, so that another release's names (``val`` for ``test``) are
    one override away."""
    from pathlib import Path

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


def _root_below(cfg) -> str | None:
    """A folder one or two levels under ``data.root`` where the whole layout is: a download often
    unpacks into a folder of its own (``MSRS-main/``). Only folders holding the training split's
    image folders are checked in full."""
    import copy

    from data_tools.files import folders_below
    from finetune.factory import data_for_split

    needed = [str(v) for v in data_for_split(cfg, "train").dirs.values() if v]  # read before the check failed
    for candidate in folders_below(cfg.data.root, needed):
        moved = copy.deepcopy(cfg)
        moved.data.root = str(candidate)
        try:
            _check_layout(moved, "", read_frames=False)
            return str(candidate)
        except (OSError, ValueError):  # not there, or not a layout training could read
            continue
    return None


def _check_inputs(cfg, name: str, splits: tuple[str, ...] = ("train", "val")) -> None:
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


def _cmd_check(args: argparse.Namespace) -> int:
    """Refuse a config before any work: its schema, and the folders and files it names."""
    cfg = _checked(args)
    _check_inputs(cfg, args.config)
    source = f" (from {cfg.data.classes_file})" if cfg.data.get("classes_file") else ""
    print(f"{args.config}: config fits its schema; the {cfg.data.layout} layout under {cfg.data.root} is there; "
          f"{len(cfg.data.classes)} classes{source}: {', '.join(cfg.data.classes)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from finetune.predict import predict_run

    if not (args.ir or args.vi or args.packed):
        raise ValueError("give the frames: --ir DIR and / or --vi DIR, or --packed DIR")
    report = predict_run(args.run_dir, args.out, args.ir, args.vi, args.checkpoint, args.overlays, args.device,
                         args.min_score, args.packed)
    what = "masks in masks/" if report["task"] == "seg" else "detections.json"
    print(f"{report['task']}: {report['used']} of {report['found']} frames predicted with {report['checkpoint']} "
          f"of {args.run_dir}; left out {report['issues_by_reason'] or 'none'}; {what}, overlays and "
          f"predict_report.json in {args.out}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from finetune.summary import run_summary

    print(run_summary(args.run_dir))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("params", help="print the parameter report of a config as JSON")
    pr.add_argument("--config", default=SEG_CONFIG)
    pr.add_argument("overrides", nargs="*", help="config overrides, e.g. model.method=mona")
    pr.set_defaults(func=_cmd_params)
    ck = sub.add_parser("check", help="check a seg / det config and the dataset folders it names, without "
                                      "building or training anything")
    ck.add_argument("--config", default=SEG_CONFIG)
    ck.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=MFNet")
    ck.set_defaults(func=_cmd_check)
    pd = sub.add_parser("predict", help="apply a trained run to frames without labels: masks (seg) or COCO "
                                        "detections (det), overlays, a report")
    pd.add_argument("run_dir")
    pd.add_argument("--ir", help="folder of infrared frames")
    pd.add_argument("--vi", help="folder of visible frames (matched to the infrared ones by name)")
    pd.add_argument("--packed", help="folder of 4-channel images holding both, RGB + thermal (MFNet's layout)")
    pd.add_argument("--out", required=True, help="output folder")
    pd.add_argument("--checkpoint", default=None,
                    help="checkpoint folder name (default: best where the run kept one, else the newest)")
    pd.add_argument("--overlays", type=int, default=8, help="overlay PNGs of the first N frames (default 8)")
    pd.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    pd.add_argument("--min-score", type=float, default=0.0,
                    help="detection: leave out boxes scoring below this (default 0: all the detector keeps)")
    pd.set_defaults(func=_cmd_predict)
    su = sub.add_parser("summary", help="one line on a finished run: method, score, frames, trainable share")
    su.add_argument("run_dir")
    su.set_defaults(func=_cmd_summary)
    for name, help_text, config, example, func in (
            ("seg", "fine-tune and evaluate semantic segmentation", SEG_CONFIG,
             "data.root=MFNet model.method=mona init.checkpoint=backbone.pth", _cmd_seg),
            ("det", "fine-tune and evaluate object detection", DET_CONFIG,
             "data.root=M3FD model.head.detector=retinanet", _cmd_det)):
        task = sub.add_parser(name, help=f"{help_text} (resumes RUN_DIR)")
        task.add_argument("--config", default=config)
        task.add_argument("--run-dir", required=True)
        task.add_argument("--overwrite", action="store_true", help="discard what RUN_DIR holds and start fresh")
        task.add_argument("--eval-only", action="store_true",
                          help="evaluate the latest checkpoint of RUN_DIR (any number of processes), no training")
        task.add_argument("overrides", nargs="*", help=f"e.g. {example}")
        task.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
