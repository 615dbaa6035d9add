"""Mona (multi-cognitive visual adapter, arXiv 2408.08345): two unshared modules per block, after the
attention residual and after the MLP residual.

    z  = gamma * LN(x) + gamma_x * x          # per-channel, gamma = 1e-6, gamma_x = 1 at init
    h  = Down(z)                               # d -> 64
    h2 = token map of h (patch tokens; CLS bypasses the convolutions)
    h2 = h2 + mean(DW3x3, DW5x5, DW7x7)(h2);  h2 = h2 + Conv1x1(h2)
    out = x + Up(Dropout(GELU(h2)))

Parameters per module: 133 d + 9,728 (ViT-B, 24 modules: 2,684,928). Initialisation as Mona's
released backbones leave it: their ``init_weights`` sets every Linear to trunc-normal(0.02) with
zero bias before loading pre-trained weights that hold no Mona keys; the convolutions keep
PyTorch's default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from finetune.models.methods import Method, register
from pretrain.models.adapters import ResidualAdapter, TokenContext, attach


@dataclass(frozen=True)
class MonaConfig:
    hidden: int = 64
    dropout: float = 0.1
    gamma_init: float = 1e-6


class MonaOp(nn.Module):
    """Multi-scale depthwise convolutions averaged, then a 1x1 projection, each with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.conv5 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv7 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self.conv3(x) + self.conv5(x) + self.conv7(x)) / 3.0
        return x + self.projector(x)


class Mona(ResidualAdapter):
    def __init__(self, dim: int, cfg: MonaConfig = MonaConfig()):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), cfg.gamma_init))
        self.gamma_x = nn.Parameter(torch.ones(dim))
        self.down = nn.Linear(dim, cfg.hidden)
        self.op = MonaOp(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.hidden, dim)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        h = self.down(self.norm(x) * self.gamma + x * self.gamma_x)
        prefix, patches = ctx.split(h)
        patches = TokenContext.from_map(self.op(ctx.to_map(patches)))
        h = self.dropout(F.gelu(torch.cat([prefix, patches], dim=1)))
        return x + self.up(h)


def attach_mona(vit: nn.Module, cfg: MonaConfig = MonaConfig()) -> None:
    attach(vit, "mona", "post_attn", lambda i, dim: Mona(dim, cfg))
    attach(vit, "mona", "post_mlp", lambda i, dim: Mona(dim, cfg))


register(Method("mona", "Mona after attention and after MLP in every block; only Mona trains in the backbone",
                attach=lambda encoder, cfg: attach_mona(encoder, cfg.mona)))
