"""PAD's patchwise-scale adapter (arXiv 2312.08192), parallel to the MLP of every block:

    a = Up(Dropout(ReLU(Down(LN_a(x)))))
    m = MLP(LN2(x))
    s = sigmoid(W_s [m ; a])        # one scale per token
    x = x + s * a + DropPath(m)     # the block adds DropPath(m); this module returns s * a

Down is kaiming-uniform (a = sqrt 5) with zero bias; Up is zero, so at step 0 the model equals
the plain ViT; W_s is zero (s = 0.5). The scale variants are the paper's ablations:
``concat`` (W_s on [m; a]), ``sum`` (Linear(d -> 1) on m + a), ``side`` (on a), ``gside`` (on m),
``fixed`` (s = 0.5), ``layer`` (one learnable scale per block, initialised to 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.models.adapters import BlockAdapterKind, ParallelMLPAdapter, TokenContext, attach, register_block_adapter

SCALE_VARIANTS = ("concat", "sum", "side", "gside", "fixed", "layer")


@dataclass(frozen=True)
class PADConfig:
    hidden: int = 64
    dropout: float = 0.1
    scale: str = "concat"
    fixed_scale: float = 0.5
    scale_freeze_fraction: float = 0.6  # the scale predictor trains only after this share of steps


class PADAdapter(ParallelMLPAdapter):
    def __init__(self, dim: int, cfg: PADConfig):
        super().__init__()
        if cfg.scale not in SCALE_VARIANTS:
            raise ValueError(f"scale must be one of {SCALE_VARIANTS}, got {cfg.scale!r}")
        self.variant = cfg.scale
        self.fixed_scale = cfg.fixed_scale
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, cfg.hidden)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.hidden, dim)
        if cfg.scale == "concat":
            self.scale = nn.Linear(2 * dim, 1, bias=False)
        elif cfg.scale in ("sum", "side", "gside"):
            self.scale = nn.Linear(dim, 1, bias=False)
        elif cfg.scale == "layer":
            self.scale = nn.Parameter(torch.full((1,), 0.5))
        else:
            self.scale = None
        # The trainer opens W_s after `scale_freeze_fraction` of training (scale_predictor_trainable);
        # the `layer` scale is never gated (PAD's code gates only its scale predictor).
        self.scale_trainable = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if isinstance(self.scale, nn.Linear):
            nn.init.zeros_(self.scale.weight)
        elif isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.fill_(0.5)

    def scale_parameters(self) -> list[nn.Parameter]:
        if isinstance(self.scale, nn.Linear):
            return [self.scale.weight]
        return [self.scale] if isinstance(self.scale, nn.Parameter) else []

    def gated_parameters(self) -> list[nn.Parameter]:
        """W_s, the token-wise scale predictor: frozen for the first part of training."""
        return [self.scale.weight] if isinstance(self.scale, nn.Linear) else []

    def _scale(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.variant == "fixed":
            return torch.full_like(a[..., :1], self.fixed_scale)
        if self.variant == "layer":
            return self.scale
        weight = self.scale.weight if self.scale_trainable else self.scale.weight.detach()
        inp = {"concat": lambda: torch.cat([m, a], dim=-1), "sum": lambda: m + a,
               "side": lambda: a, "gside": lambda: m}[self.variant]()
        return torch.sigmoid(nn.functional.linear(inp, weight))

    def forward(self, x: torch.Tensor, mlp_out: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        a = self.up(self.dropout(self.act(self.down(self.norm(x)))))
        s = self._scale(a, mlp_out)
        self.last_scale = s.detach()  # for logging the mean/std of the scales per layer
        return s * a


def attach_pad(vit: nn.Module, cfg: PADConfig) -> None:
    attach(vit, "pad", "parallel_mlp", lambda i, dim: PADAdapter(dim, cfg))


register_block_adapter(BlockAdapterKind("pad", PADConfig, attach_pad))


def pad_adapters(model: nn.Module) -> list[PADAdapter]:
    return [m for m in model.modules() if isinstance(m, PADAdapter)]


def scale_predictor_trainable(step: int, total_steps: int, freeze_fraction: float) -> bool:
    """PAD keeps W_s frozen for the first `freeze_fraction` of training (60%)."""
    return step >= freeze_fraction * total_steps


def gated_parameter_names(model: nn.Module) -> set[str]:
    """Names of the W_s weights (the parameters the scale-predictor gate holds)."""
    gated = {id(p) for a in pad_adapters(model) for p in a.gated_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in gated}


def set_scale_predictors_trainable(model: nn.Module, trainable: bool, optimizer=None) -> None:
    """Open or close the gate. Closed: W_s is detached in the forward (no gradient) and, with
    ``optimizer``, its parameter group is marked ``gated`` so that the optimiser does not touch it
    either (``pretrain.engine.hold_gated_groups``): no step counted, no moments, no weight decay, so its
    first update after opening is a fresh AdamW's. The parameter set itself never changes."""
    for adapter in pad_adapters(model):
        adapter.scale_trainable = trainable
    if optimizer is not None:
        for group in optimizer.param_groups:
            if group.get("gate") == "scale_predictor":
                group["gated"] = not trainable
