"""``python -m pretrain``: params, load-check (train and export come with the trainer)."""
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


def initialise_from_config(model, cfg):
    """Load ``init.checkpoint`` as the paradigm asks: pad / continual start from it (random init,
    with a warning, when none is given); scratch refuses one. Returns the LoadReport or None."""
    from pretrain.weights import load_into_mae

    checkpoint = cfg.init.checkpoint
    if cfg.model.paradigm == "scratch":
        if checkpoint:
            raise ValueError("paradigm 'scratch' trains from random init: unset init.checkpoint")
        return None
    if not checkpoint:
        print(f"warning: paradigm '{cfg.model.paradigm}' without init.checkpoint: the encoder starts "
              "from random init (PAD expects the ImageNet MAE weights)", file=sys.stderr)
        return None
    return load_into_mae(model, checkpoint, allow_missing=bool(cfg.init.allow_missing))


def _cmd_params(args: argparse.Namespace) -> int:
    from pretrain.params import parameter_report

    cfg = load_config(args.config, args.overrides)
    model = build_model_from_config(cfg, "meta")  # shapes only: ViT-H in milliseconds, no memory
    report = parameter_report(model)
    report["config"] = {"paradigm": cfg.model.paradigm, "adapter": cfg.model.adapter,
                        "scale": cfg.model.pad.scale, "size": cfg.model.encoder.size}
    print(json.dumps(report, indent=1))
    return 0


def _cmd_load_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    cfg = load_config(args.config, args.overrides)
    model = build_model_from_config(cfg)
    report = initialise_from_config(model, cfg)
    if report is None:
        print(json.dumps({"checkpoint": None}))
        return 0
    print(json.dumps(asdict(report), indent=1))
    print(report.summary(), file=sys.stderr)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("params", help="print the parameter report of a config as JSON")
    pr.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    pr.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pad.scale=sum")
    pr.set_defaults(func=_cmd_params)
    lc = sub.add_parser("load-check", help="load init.checkpoint into the configured model and report keys")
    lc.add_argument("--config", default=str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"))
    lc.add_argument("overrides", nargs="*", help="e.g. init.checkpoint=mae_pretrain_vit_base.pth")
    lc.set_defaults(func=_cmd_load_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as e:  # WeightsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
