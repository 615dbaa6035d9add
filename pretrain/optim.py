"""Optimiser parameter groups: MAE's weight-decay rule and optional layer-wise lr decay."""
from __future__ import annotations

from torch import nn


def no_weight_decay(name: str, ndim: int) -> bool:
    """MAE / timm rule: no decay on biases and 1-D parameters (norms, layer scales)."""
    return ndim <= 1 or name.endswith(".bias")


def layer_id(name: str, num_layers: int, prefix: str = "encoder.") -> int:
    """0 for the embeddings, i + 1 for encoder block i, num_layers + 1 for everything after
    (heads, decoders). ``prefix``: where the encoder sits in the model's parameter names."""
    if name.startswith(tuple(prefix + k for k in ("cls_token", "pos_embed", "patch_embed"))):
        return 0
    if name.startswith(prefix + "blocks."):
        return int(name[len(prefix + "blocks."):].split(".")[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 num_layers: int | None = None, prefix: str = "encoder.",
                 gates: dict[str, set[str]] | None = None) -> list[dict]:
    """Groups of trainable parameters with their weight decay and lr scale (``lr_scale``).
    ``gates`` (gate name -> parameter names) puts those parameters in groups of their own with
    ``gate`` set, so that an optimiser can hold them back as a whole (PAD's scale predictor)."""
    gate_of = {n: gate for gate, names in (gates or {}).items() for n in names}
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers")
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if no_weight_decay(name, p.ndim) else weight_decay
        lid = layer_id(name, num_layers, prefix) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        gate = gate_of.get(name)
        g = groups.setdefault((wd, lid, gate), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale,
                                                "gate": gate})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())
