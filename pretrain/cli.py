"""``python -m pretrain``: check, train, export, params, load-check, verify, summary."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.command import run_command
from data_tools.config import CONFIG_DIR, int_in, load_config, out_file, out_folder


# Commands import what they need: `summary` and argument errors should not wait for torch.

def _cmd_params(args: argparse.Namespace) -> int:
    from pretrain.factory import build_model_from_config
    from pretrain.params import parameter_report
    from pretrain.schema import PretrainConfig

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    model = build_model_from_config(cfg, "meta")  # shapes only: ViT-H in milliseconds, no memory
    report = parameter_report(model)
    report["config"] = {"paradigm": cfg.model.paradigm, "adapter": cfg.model.adapter,
                        "scale": cfg.model.pad.scale, "size": cfg.model.encoder.size}
    print(json.dumps(report, indent=1))
    return 0


def _cmd_load_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pretrain.factory import build_model_from_config, initialise_from_config
    from pretrain.schema import PretrainConfig

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    model = build_model_from_config(cfg)
    report = initialise_from_config(model, cfg)
    if report is None:
        print(json.dumps({"checkpoint": None}))
        return 0
    print(json.dumps(asdict(report), indent=1))
    print(report.summary(), file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Refuse a config before any work (run.sh: before the shard build, hours on a large corpus): its
    schema and overrides, the ``init.checkpoint`` file, the global batch over ``--processes``; the
    checks ``train`` makes before it touches the run directory, the shards aside (not built yet)."""
    from pretrain.schema import PretrainConfig

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    said = ""
    if cfg.init.checkpoint or cfg.train.effective_batch:  # the engine's checks import torch: only when needed
        from pretrain.engine import resolve_batching
        from pretrain.engine.run import check_init_checkpoint

        check_init_checkpoint(cfg)
        said = f"; global batch {resolve_batching(cfg.train, args.processes).said()}"
    print(f"{args.config}: config fits its schema" + (f"; init.checkpoint {cfg.init.checkpoint} is there"
                                                     if cfg.init.checkpoint else "") + said)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pretrain.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.run_dir, overwrite=args.overwrite)  # ends the process itself (distributed exit)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pretrain.export import export_run

    pth, js = export_run(args.run_dir, args.out, tag=args.tag)
    print(f"wrote {pth} and {js}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pretrain.engine import Checkpointer, ResumeError
    from pretrain.engine.checkpoint import RESTART_ADVICE

    ckpt = Checkpointer(Path(args.run_dir) / "checkpoints")
    tags = ckpt.tags()
    if not tags:
        print(f"{args.run_dir}: no checkpoints")
        return 1
    print(f"latest pointer: {ckpt.latest_tag()!r}")
    for tag in tags:
        problem = ckpt.problem(tag)
        print(f"  {tag}: {'complete, checksums match' if problem is None else problem}")
    try:
        tag, _ = ckpt.choose(RESTART_ADVICE)  # what a training resume would say
    except ResumeError as e:
        print(f"resume would fail: {e}")
        return 1
    print(f"resume would use {tag}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from pretrain.summary import summary

    print(summary(args.path))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    # The deepspeed launcher passes --local_rank=N right after the module name (LOCAL_RANK is read
    # from the environment instead).
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("params", help="print the parameter report of a config as JSON")
    pr.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    pr.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pad.scale=sum")
    pr.set_defaults(func=_cmd_params)
    lc = sub.add_parser("load-check", help="load init.checkpoint into the configured model and report keys")
    lc.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    lc.add_argument("overrides", nargs="*", help="e.g. init.checkpoint=mae_pretrain_vit_base.pth")
    lc.set_defaults(func=_cmd_load_check)
    ch = sub.add_parser("check", help="refuse a config before any work: schema, overrides, init.checkpoint, "
                                      "global batch")
    ch.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    ch.add_argument("--processes", type=int_in(1), default=1,
                    help="processes the run will be launched with (GPUs over all nodes; default 1)")
    ch.add_argument("overrides", nargs="*", help="config overrides, as train takes them")
    ch.set_defaults(func=_cmd_check)
    tr = sub.add_parser("train", help="pre-train (resumes automatically from RUN_DIR's latest checkpoint)")
    tr.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    tr.add_argument("--run-dir", required=True, type=out_folder)
    tr.add_argument("--overwrite", action="store_true", help="discard what RUN_DIR holds and start fresh")
    tr.add_argument("overrides", nargs="*", help="e.g. data.shards='[{path: shards/}]' train.epochs=100")
    tr.set_defaults(func=_cmd_train)
    ex = sub.add_parser("export", help="write the fine-tuning backbone (encoder + adapters) of a run")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, type=out_file("backbone.pth", (".pth", ".pt")),
                    help="backbone .pth, or a folder for its backbone.pth (a .json with its config is written "
                         "beside it)")
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ex.set_defaults(func=_cmd_export)
    ve = sub.add_parser("verify", help="check a run's checkpoints (files, checksums) and say which one a resume "
                                       "would use (exit 1 if none)")
    ve.add_argument("run_dir")
    ve.set_defaults(func=_cmd_verify)
    su = sub.add_parser("summary", help="one line on a run folder (steps, loss, finished or not) or an exported "
                                        "backbone .pth")
    su.add_argument("path")
    su.set_defaults(func=_cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # WeightsError is a ValueError
    return run_command(args.func, args, (KeyError, ValueError, FileNotFoundError, RuntimeError))
