"""``python -m finetune``: seg and det (train + evaluate), params, check (segmentation or detection config)."""
from __future__ import annotations

import argparse
import json
import sys

from data_tools.config import CONFIG_DIR, float_in, int_in, load_config, out_folder
from data_tools.command import run_command
from finetune.preflight import check_run, check_weights_given

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
    return cfg


def _cmd_params(args: argparse.Namespace) -> int:
    from finetune.factory import build_detector, build_segmentor, parameter_report

    cfg = _checked(args)
    check_weights_given(cfg, args.config)
    build = build_detector if "boxes" in cfg.data else build_segmentor
    report = parameter_report(build(cfg, "meta"))  # shapes only, no memory
    report["config"] = {"method": cfg.model.method, "modality": cfg.model.modality, "size": cfg.model.encoder.size}
    print(json.dumps(report, indent=1))
    return 0


def _cmd_seg(args: argparse.Namespace) -> int:
    from finetune.seg import train_seg

    # checks its inputs before the run directory is touched; ends the process itself (distributed exit)
    train_seg(_checked(args), args.run_dir, overwrite=args.overwrite, eval_only=args.eval_only, config_name=args.config)
    return 0


def _cmd_det(args: argparse.Namespace) -> int:
    from finetune.det import train_det

    # checks its inputs before the run directory is touched; ends the process itself (distributed exit)
    train_det(_checked(args), args.run_dir, overwrite=args.overwrite, eval_only=args.eval_only, config_name=args.config)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Refuse a config before any work: its schema, and the folders and files it names."""
    import torch

    from finetune.data.classes import label_id_names

    cfg = _checked(args)
    check_run(cfg, args.config, processes=args.processes, cuda=torch.cuda.is_available(),
              init_written_later=args.init_written_later, data_written_later=args.data_written_later)
    if args.data_written_later:
        where = f" under {cfg.data.root}" if cfg.data.root else ""
        print(f"{args.config}: config fits its schema; its frames{where} are not looked at (written later)")
        return 0
    source = ""
    if cfg.data.get("classes_file"):  # all of its classes, or some of them (data.classes picks)
        names = label_id_names(cfg.data)
        source = (f" (from {cfg.data.classes_file})" if list(names) == list(cfg.data.classes)
                  else f" (of the {len(names)} in {cfg.data.classes_file})")
    print(f"{args.config}: config fits its schema; the {cfg.data.layout} layout under {cfg.data.root} is there; "
          f"{len(cfg.data.classes)} class{'es' if len(cfg.data.classes) > 1 else ''}{source}: "
          f"{', '.join(cfg.data.classes)}{_val_boxes_note(cfg)}{_scoring_note(cfg)}")
    return 0


def _val_boxes_note(cfg) -> str:
    """Where the validation split's boxes come from when published apart (``data.val_boxes``)."""
    from finetune.factory import data_for_split

    apart = cfg.data.get("val_boxes") or {}
    if not apart.get("path"):
        return ""
    boxes = data_for_split(cfg, "val").boxes
    return f"; validation boxes from {boxes.path} ({boxes.format})"


def _scoring_note(cfg) -> str:
    """What a detection run does not score as objects: ignore classes, short or occluded objects."""
    from finetune.data.det import ScoringLimits

    if "boxes" not in cfg.data:
        return ""
    ignored = list(cfg.data.get("ignore_classes") or [])
    limits = ScoringLimits.of(cfg)
    parts = [f"{', '.join(ignored)} boxes"] if ignored else []
    if limits.min_height:
        parts.append(f"objects under {limits.min_height:g} px tall")
    if limits.max_occlusion is not None:
        parts.append(f"objects occluded above level {limits.max_occlusion}")
    if limits.border:
        parts.append(f"objects within {limits.border:g} px of the frame's edge")
    return f"; scored as ignore regions: {', '.join(parts)}" if parts else ""


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
    if earlier := report["earlier_files"]:
        print(f"note: {args.out} also holds {len(earlier)} file(s) this predict did not write (an earlier one's, "
              f"e.g. {earlier[0]}): predict_report.json lists this run's frames", file=sys.stderr)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from finetune.summary import predict_command, run_summary

    print(predict_command(args.run_dir) if args.predict_command else run_summary(args.run_dir))
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
    ck.add_argument("--processes", type=int_in(1), default=1,
                    help="processes the run will be launched with (GPUs over all nodes; default 1)")
    ck.add_argument("--init-written-later", action="store_true",
                    help="init.checkpoint is the export an earlier stage will write: not there yet")
    ck.add_argument("--data-written-later", action="store_true",
                    help="the dataset is what an earlier stage will write: its folders are not looked at")
    ck.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=MFNet")
    ck.set_defaults(func=_cmd_check)
    pd = sub.add_parser("predict", help="apply a trained run to frames without labels: masks (seg) or COCO "
                                        "detections (det), overlays, a report")
    pd.add_argument("run_dir")
    pd.add_argument("--ir", help="folder of infrared frames")
    pd.add_argument("--vi", help="folder of visible frames (matched to the infrared ones by name)")
    pd.add_argument("--packed", help="folder of 4-channel images holding both, RGB + thermal (MFNet's layout)")
    pd.add_argument("--out", required=True, type=out_folder, help="output folder")
    pd.add_argument("--checkpoint", default=None,
                    help="checkpoint folder name (default: best where the run kept one, else the newest)")
    pd.add_argument("--overlays", type=int_in(0), default=8, help="overlay PNGs of the first N frames (default 8)")
    pd.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    pd.add_argument("--min-score", type=float_in(0.0, 1.0), default=0.0,
                    help="detection: leave out boxes scoring below this (default 0: all the detector keeps)")
    pd.set_defaults(func=_cmd_predict)
    su = sub.add_parser("summary", help="one line on a finished run: method, score, frames, trainable share")
    su.add_argument("run_dir")
    su.add_argument("--predict-command", action="store_true",
                    help="print instead the command that applies the run to new frames")
    su.set_defaults(func=_cmd_summary)
    for name, help_text, config, example, func in (
            ("seg", "fine-tune and evaluate semantic segmentation", SEG_CONFIG,
             "data.root=MFNet model.method=mona init.checkpoint=backbone.pth", _cmd_seg),
            ("det", "fine-tune and evaluate object detection", DET_CONFIG,
             "data.root=M3FD model.head.detector=retinanet", _cmd_det)):
        task = sub.add_parser(name, help=f"{help_text} (resumes RUN_DIR)")
        task.add_argument("--config", default=config)
        task.add_argument("--run-dir", required=True, type=out_folder)
        task.add_argument("--overwrite", action="store_true", help="discard what RUN_DIR holds and start fresh")
        task.add_argument("--eval-only", action="store_true",
                          help="evaluate the latest checkpoint of RUN_DIR (any number of processes), no training")
        task.add_argument("overrides", nargs="*", help=f"e.g. {example}")
        task.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_command(args.func, args, (KeyError, ValueError, FileNotFoundError, RuntimeError))
