"""Parameter report: totals, trainable / frozen, and per-component counts, as JSON."""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from pretrain.models.pad import pad_adapters


def component(name: str) -> str:
    """The report group of a parameter name of our MAE."""
    if name.startswith("encoder."):
        rest = name[len("encoder."):]
        for slot in (".post_attn.", ".parallel_mlp.", ".post_mlp."):
            if slot in rest:
                return "encoder.adapters." + rest.split(slot)[1].split(".")[0]
        return "encoder." + rest.split(".")[0]
    return "decoder"


def parameter_report(model: nn.Module, trainable: set[str] | None = None) -> dict:
    """Counts by parameter (not by tensor). ``trainable`` defaults to requires_grad."""
    named = dict(model.named_parameters())
    if trainable is None:
        trainable = {n for n, p in named.items() if p.requires_grad}
    per = defaultdict(lambda: {"total": 0, "trainable": 0})
    for name, p in named.items():
        group = per[component(name)]
        group["total"] += p.numel()
        group["trainable"] += p.numel() if name in trainable else 0
    total = sum(p.numel() for p in named.values())
    n_trainable = sum(named[n].numel() for n in trainable)
    encoder_total = sum(p.numel() for n, p in named.items() if n.startswith("encoder."))
    report = {
        "total": total,
        "trainable": n_trainable,
        "frozen": total - n_trainable,
        "trainable_encoder": sum(named[n].numel() for n in trainable if n.startswith("encoder.")),
        "trainable_decoder": sum(named[n].numel() for n in trainable if not n.startswith("encoder.")),
        "encoder_total": encoder_total,
        "scale_predictor": sum(p.numel() for a in pad_adapters(model) for p in a.scale_parameters()),
        "per_module": dict(sorted(per.items())),
    }
    report["trainable_encoder_share"] = round(report["trainable_encoder"] / max(encoder_total, 1), 6)
    return report
