"""One line per artefact of pre-training, as the pipeline's summary prints them: a run folder
(steps, first and last loss, finished or not) and an exported backbone."""
from __future__ import annotations

from pathlib import Path

from data_tools.files import PRETRAIN_RUNS, check_folder_kind, read_jsonl


def run_summary(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    check_folder_kind(run_dir, PRETRAIN_RUNS)
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a pre-training run folder, or no step logged yet)")
    rows = [r for r in read_jsonl(log)[0] if "loss" in r]
    if not rows:
        raise ValueError(f"{log}: no step logged yet")
    state = "" if (run_dir / "DONE").is_file() else " (not finished: rerun the training command to resume)"
    first, last = rows[0], rows[-1]
    return f"pretrain   {run_dir}: {last['step']} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}{state}"


def backbone_summary(path: str | Path) -> str:
    from pretrain.backbone_meta import adapter_names, read_backbone_meta

    b = read_backbone_meta(path)
    adapters = " + ".join(adapter_names(b)) or "no"
    return (f"backbone   {path}: ViT-{b['encoder']['size']} + {adapters} adapters, "
            f"{b['num_parameters']:,} parameters")


def summary(path: str | Path) -> str:
    """A run folder or an exported backbone (``.pth`` with its ``.json``)."""
    return run_summary(path) if Path(path).is_dir() else backbone_summary(path)
