"""Export a run's backbone from any of its checkpoints, without a distributed set-up."""
from __future__ import annotations

from pathlib import Path

from data_tools.config import to_container
from data_tools.files import PRETRAIN_RUNS
from data_tools.manifest import ManifestError, read_manifest
from pretrain.engine.trained import load_trained
from pretrain.factory import build_model_from_config, initialise_from_config
from pretrain.weights import export_backbone


def _pretrain_model(cfg):
    model = build_model_from_config(cfg)
    initialise_from_config(model, cfg)
    return model


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(the run's MAE with its frozen weights rebuilt (and verified) and its trainable weights
    loaded, the checkpoint tag, the run's config)."""
    return load_trained(run_dir, _pretrain_model, PRETRAIN_RUNS, tag)


def pretraining_corpus(cfg) -> list[dict]:
    """The shard folders a run pre-trained on, each with the sources it was built from (name, root,
    globs, stride; None where its manifest cannot be read now): for fine-tuning to tell which of its
    evaluation frames the backbone may have seen."""
    corpus = []
    for entry in cfg.data.shards:
        try:
            built = read_manifest(entry.path)["config"]["sources"]
            sources = [{"name": s["name"], "root": s["root"], "globs": list(s["globs"]), "stride": s["stride"]}
                       for s in built]
        except (ManifestError, OSError, KeyError, TypeError):
            sources = None
        corpus.append({"shards": str(entry.path), "sources": sources})
    return corpus


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None):
    model, _, cfg = load_run_model(run_dir, tag)
    d = cfg.data
    input_norm = {"mean": float(d.mean), "std": float(d.std), "intensity": to_container(d.intensity)}
    return export_backbone(model, out, input_norm, pretraining_corpus(cfg))
