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


def parameter_report(model: nn.Module, trainable: set[str] | None = None, component_of=component,
                     parts: tuple[str, str] = ("encoder", "decoder"), backbone_prefix: str = "encoder.") -> dict:
    """Counts by parameter (not by tensor). ``trainable`` defaults to requires_grad. ``parts``
    names the backbone (parameters under ``backbone_prefix``) and the rest."""
    named = dict(model.named_parameters())
    if trainable is None:
        trainable = {n for n, p in named.items() if p.requires_grad}
    per = defaultdict(lambda: {"total": 0, "trainable": 0})
    for name, p in named.items():
        group = per[component_of(name)]
        group["total"] += p.numel()
        group["trainable"] += p.numel() if name in trainable else 0
    total = sum(p.numel() for p in named.values())
    n_trainable = sum(named[n].numel() for n in trainable)
    backbone, rest = parts
    backbone_total = sum(p.numel() for n, p in named.items() if n.startswith(backbone_prefix))
    trainable_backbone = sum(named[n].numel() for n in trainable if n.startswith(backbone_prefix))
    report = {
        "total": total,
        "trainable": n_trainable,
        "frozen": total - n_trainable,
        f"trainable_{backbone}": trainable_backbone,
        f"trainable_{rest}": n_trainable - trainable_backbone,
        f"{backbone}_total": backbone_total,
        "scale_predictor": sum(p.numel() for a in pad_adapters(model) for p in a.scale_parameters()),
        "per_module": dict(sorted(per.items())),
    }
    report[f"trainable_{backbone}_share"] = round(trainable_backbone / max(backbone_total, 1), 6)
    return report
