"""One line on a finished fine-tuning run, as the pipeline's summary prints it: method, score,
frames, the share of the backbone that trains, where the overlays are; and the command that applies
the run to new frames."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from data_tools.files import FINETUNE_RUNS, check_folder_kind, file_not_folder

SCORES = {"seg": lambda m: f"mIoU {100 * m['mIoU']:.1f}",
          "det": lambda m: (f"AP {100 * m['AP']:.1f}, AP50 {100 * m['AP50']:.1f}" if m["AP"] is not None
                            else "no score (no object to score)")}


def run_summary(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(file_not_folder(run_dir) or f"{run_dir}: no such run folder")
    check_folder_kind(run_dir, FINETUNE_RUNS)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (the run has not finished: rerun its command to resume)")
    m = json.loads(path.read_text())
    p = m["params"]
    best = json.loads((run_dir / "DONE").read_text()).get("best") if (run_dir / "DONE").is_file() else None
    best_text = f"; best {best['metric']} {100 * best['value']:.1f} at step {best['step']}" if best else ""
    return (f"{m['task']:10s} {run_dir}: {m['method']}, {SCORES[m['task']](m)} on {m['frames']} frames; trains "
            f"{100 * p['trainable_backbone_share']:.1f}% of the backbone ({p['trainable_backbone']:,}){best_text}; "
            f"overlays {run_dir / 'overlays'}")


def predict_command(run_dir: str | Path) -> str:
    """The ``finetune predict`` command of a run, as a shell reads it, with the frame folders its
    model takes (MFNet's packed images: ``--packed``; a detector of both modalities: both)."""
    from pretrain.engine.trained import run_config

    cfg = run_config(Path(run_dir), FINETUNE_RUNS)  # the config the run saved
    data, modality = cfg.data, cfg.model.modality
    if data.get("layout") == "mfnet":
        frames = "--packed DIR"
    elif modality != "both":
        frames = f"--{modality} DIR"
    else:
        frames = "--ir DIR --vi DIR" if "boxes" in data else "--ir DIR [--vi DIR]"
    return f"{shlex.join([sys.executable, '-m', 'finetune', 'predict', str(run_dir)])} {frames} --out DIR"
