"""The ViT encoder: timm's VisionTransformer (so timm and official MAE weights load by name),
sizes from a registry, any token grid, 1- or 3-channel input.

The encoder's forward is written here as small functions over the timm module (embed, prefix,
blocks), because MAE masks tokens between the embedding and the blocks and the adapters need a
token context; the parameters and their names stay timm's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from pretrain.models.adapters import AdaptedBlock, TokenContext
from pretrain.models.pos_embed import sincos_2d

# name: (embed_dim, depth, num_heads). tiny..huge are the standard ViT sizes.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


@dataclass(frozen=True)
class EncoderConfig:
    size: str = "base"
    img_size: tuple[int, int] = (224, 224)  # (height, width); any multiple of the patch size
    patch_size: int = 16
    in_chans: int = 3  # channels of the patch embedding: 3 (1-channel input replicated) or 1 (folded)
    embed_dim: int | None = None  # override the size's values (e.g. a 2-block test model)
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0

    def dims(self) -> tuple[int, int, int]:
        d, n, h = VIT_SIZES[self.size]
        return self.embed_dim or d, self.depth or n, self.num_heads or h

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size


def build_encoder(cfg: EncoderConfig) -> VisionTransformer:
    """A timm ViT (cls token, qkv bias, LayerNorm eps 1e-6, no head) with a fixed sin-cos
    position embedding for the configured grid, as MAE uses."""
    if cfg.size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {cfg.size!r}; choose from {sorted(VIT_SIZES)}")
    dim, depth, heads = cfg.dims()
    vit = VisionTransformer(
        img_size=tuple(cfg.img_size), patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        global_pool="", embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, class_token=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=cfg.drop_path)
    gh, gw = cfg.grid
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_2d(dim, gh, gw).unsqueeze(0))
    vit.pos_embed.requires_grad_(False)
    # MAE's initialize_weights, not timm's: a randomly initialised encoder (from-scratch
    # pre-training, or any run without weights) starts as MAE's does.
    proj = vit.patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))  # the patch projection as a Linear
    nn.init.normal_(vit.cls_token, std=0.02)
    mae_init_(vit.blocks)
    mae_init_(vit.norm)
    vit.blocks = nn.Sequential(*[AdaptedBlock(b) for b in vit.blocks])
    return vit


def mae_init_(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear weights with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """1-channel input into a 3-channel patch embedding is replicated (PAD's choice)."""
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"input has {x.shape[1]} channels, the patch embedding takes {in_chans}")


def embed_patches(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens (N, L, D) with their position embedding added (no prefix tokens)."""
    x = match_channels(x, vit.patch_embed.proj.in_channels)
    return vit.patch_embed(x) + vit.pos_embed[:, vit.num_prefix_tokens:]


def prepend_cls(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1)


def run_blocks(vit: VisionTransformer, x: torch.Tensor, ctx: TokenContext,
               out_indices: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All blocks, then the final norm. Also returns the outputs of the blocks in ``out_indices``."""
    features = []
    for i, block in enumerate(vit.blocks):
        if i > 0 or ctx.stream is None:
            ctx.stream = ctx.split(x)[1]
        x = block(x, ctx)
        if i in out_indices:
            features.append(x)
    return vit.norm(x), features


def encode(vit: VisionTransformer, x: torch.Tensor, extras: dict | None = None,
           out_indices: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unmasked encoder: (N, C, H, W) -> normed tokens (N, 1 + L, D) and selected block outputs."""
    tokens = embed_patches(vit, x)
    ctx = TokenContext(grid=vit.patch_embed.grid_size, num_prefix=vit.num_prefix_tokens, extras=extras or {})
    return run_blocks(vit, prepend_cls(vit, tokens), ctx, out_indices)
