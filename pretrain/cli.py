"""``python -m pretrain``: params (more subcommands come with the trainer)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from data_tools.config import CONFIG_DIR, load_config, to_container


def build_model_from_config(cfg, device: str | torch.device = "cpu"):
    from pretrain.models.mae import build_mae

    with torch.device(device):
        return build_mae(to_container(cfg)["model"])


def _cmd_params(args: argparse.Namespace) -> int:
    from pretrain.params import parameter_report

    cfg = load_config(args.config, args.overrides)
    model = build_model_from_config(cfg, "meta")  # shapes only: ViT-H in milliseconds, no memory
    report = parameter_report(model)
    report["config"] = {"paradigm": cfg.model.paradigm, "adapter": cfg.model.adapter,
                        "scale": cfg.model.pad.scale, "size": cfg.model.encoder.size}
    print(json.dumps(report, indent=1))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("params", help="print the parameter report of a config as JSON")
    pr.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    pr.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pad.scale=sum")
    pr.set_defaults(func=_cmd_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
