"""IV-tuning (SPEC §6): infrared-visible fine-tuning of one frozen backbone.

- The visible image goes through the frozen patch embedding (tokens x), the infrared image
  through its own trainable patch embedding of the same shape (tokens z), initialised as a copy
  of the pretrained one.
- The external modal prompt generator (EMPG) turns both token maps into a prompt p added to x
  (with the position embedding) before the blocks.
- Every block gets, after the attention residual and after the MLP residual, a hybrid adapter on
  x and an internal prompt adapter on the prompt stream s (the tokens that entered the block):
  x <- x + HA(x) + IPA(s). CLS tokens bypass the convolutions and SimAM.

Token maps are always (N, C, H, W) with H the rows of the patch grid (``TokenContext.to_map``),
so non-square inputs keep their geometry (the original release reshapes them as (w, h)).

Step 0: HA's up-projection and IPA's affine are zero, so both adapters add exactly 0 and the
model equals the frozen ViT on (visible tokens + prompt); the prompt itself is non-zero from
the start (xavier-uniform EMPG, as the paper's code). ``tests/test_finetune_models.py`` checks it.
Infrared-only data feeds the infrared frame to both streams.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pretrain.models.adapters import ResidualAdapter, TokenContext, attach


@dataclass(frozen=True)
class IVTuningConfig:
    hidden: int = 64  # hybrid adapter
    prompt_hidden: int = 8  # EMPG and internal prompt adapter
    dropout: float = 0.1


class SimAM(nn.Module):
    """u * sigmoid((u - mean)^2 / (4 (v + eps)) + 0.5), statistics per channel over space,
    v = sum((u - mean)^2) / (H W - 1). No parameters."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[2] * u.shape[3] - 1
        d = (u - u.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / max(n, 1)
        return u * torch.sigmoid(d / (4 * (v + self.eps)) + 0.5)


class HybridOp(nn.Module):
    """y = x + PConv(x), PConv = 3x3 depthwise on the first c/4 channels, the rest passed through;
    out = y + Conv1x1(ReLU(BN(Conv1x1(y))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.partial = max(channels // 4, 1)
        self.pconv = nn.Conv2d(self.partial, self.partial, 3, padding=1, groups=self.partial, bias=False)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, tail = x[:, : self.partial], x[:, self.partial :]
        y = x + torch.cat([self.pconv(head), tail], dim=1)
        return y + self.conv2(F.relu(self.bn(self.conv1(y))))


def _on_patches(module: nn.Module, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
    """Apply a map-to-map module to the patch tokens of h; prefix tokens pass unchanged."""
    prefix, patches = ctx.split(h)
    return torch.cat([prefix, TokenContext.from_map(module(ctx.to_map(patches)))], dim=1)


class HybridAdapter(nn.Module):
    """LN -> Linear(d -> 64) -> hybrid operation on the token map -> GELU -> Dropout -> Linear(64 -> d)."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, cfg.hidden)
        self.op = HybridOp(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        h = _on_patches(self.op, self.down(self.norm(x)), ctx)
        return self.up(self.dropout(F.gelu(h)))


class InternalPromptAdapter(nn.Module):
    """LN -> Linear(d -> 8) -> SimAM on the token map -> GELU -> Linear(8 -> d) -> affine -> GELU."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, cfg.prompt_hidden)
        self.simam = SimAM()
        self.up = nn.Linear(cfg.prompt_hidden, dim)
        self.scale = nn.Parameter(torch.zeros(dim))  # zero: the adapter starts silent
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, s: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        h = _on_patches(self.simam, self.down(self.norm(s)), ctx)
        return F.gelu(self.up(F.gelu(h)) * self.scale + self.shift)


class IVTuningAdapter(ResidualAdapter):
    """x <- x + HA(x) + IPA(s), s = the tokens that entered this block."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.hybrid = HybridAdapter(dim, cfg)
        self.prompt = InternalPromptAdapter(dim, cfg)

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        if ctx.block_input is None:
            raise ValueError("IV-tuning adapters need the block input (run the blocks with pretrain.models.vit.run_blocks)")
        return x + self.hybrid(x, ctx) + self.prompt(ctx.block_input, ctx)


class PromptGenerator(nn.Module):
    """EMPG: visible Conv1x1(C -> 8) + hybrid op, infrared Conv1x1(C -> 8) + SimAM, summed,
    Conv1x1(8 -> C). Inputs and output are (N, C, H, W) token maps."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        k = cfg.prompt_hidden
        self.visible_in = nn.Conv2d(dim, k, 1)
        self.visible_op = HybridOp(k)
        self.infrared_in = nn.Conv2d(dim, k, 1)
        self.simam = SimAM()
        self.out = nn.Conv2d(k, dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, visible: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
        return self.out(self.visible_op(self.visible_in(visible)) + self.simam(self.infrared_in(infrared)))


class IVTuningInput(nn.Module):
    """The trainable infrared patch embedding and the prompt generator (the input side)."""

    def __init__(self, patch_embed: nn.Module, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.infrared_embed = copy.deepcopy(patch_embed)
        self.generator = PromptGenerator(dim, cfg)

    def forward(self, visible_tokens: torch.Tensor, infrared: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Prompt tokens (N, L, C) from the visible patch tokens and the infrared image."""
        infrared_tokens = self.infrared_embed(infrared)
        prompt = self.generator(ctx.to_map(visible_tokens), ctx.to_map(infrared_tokens))
        return TokenContext.from_map(prompt)


def attach_ivtuning(vit: nn.Module, cfg: IVTuningConfig = IVTuningConfig()) -> None:
    attach(vit, "ivtuning", "post_attn", lambda i, dim: IVTuningAdapter(dim, cfg))
    attach(vit, "ivtuning", "post_mlp", lambda i, dim: IVTuningAdapter(dim, cfg))
