"""BEiT's additions to a ViT block that MAE's and PAD's segmentation fine-tuning use (their
backbones come from BEiT's code, ``use_rel_pos_bias=True``, ``init_values=1.``):

- a relative position bias in every block's attention: one learnable value per head for each
  relative offset between two patch tokens, and three for the CLS token's pairs (Bao et al.,
  2022), zero at the start, so the block computes as without it;
- a layer scale on the attention and MLP branches: a learnable per-channel factor (``gamma``),
  timm's ``LayerScale`` (the names ``ls1.gamma`` / ``ls2.gamma`` of timm's ViT).

Pre-trained encoders hold neither: they start from their initial values (:func:`is_block_extra`
tells the weight loaders which keys those are).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

ATTN_BIAS = "attn_bias"


class RelativePositionBias(nn.Module):
    """(heads, 1 + H*W, 1 + H*W) attention-logit bias for an (H, W) grid with one CLS token before
    it, indexed as BEiT indexes its table: patch pairs by (dy + H - 1) * (2W - 1) + (dx + W - 1), then
    CLS -> patch, patch -> CLS and CLS -> CLS."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        h, w = grid
        distances = (2 * h - 1) * (2 * w - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(distances, num_heads))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, H*W), rows first as the patch embedding
        rel = coords[:, :, None] - coords[:, None, :]
        index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
        index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
        index[0, :] = distances - 3
        index[:, 0] = distances - 2
        index[0, 0] = distances - 1
        self.register_buffer("index", index, persistent=False)  # rebuilt from the grid, never loaded

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """The same bias for every query: (1, heads, n, n)."""
        n = self.index.shape[0]
        return self.relative_position_bias_table[self.index.flatten()].view(n, n, -1).permute(2, 0, 1)[None]


def attention_with_bias(attn: nn.Module, x: torch.Tensor,
                        bias: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A timm ``Attention`` with ``bias(q)`` added to its logits: softmax(q k^T / sqrt(d) + bias(q)) v,
    through its own projections (written here: timm's forward takes no bias before 1.0.15). A bias
    that can ``fold`` itself into the queries and keys (ViTDet's relative positions) is not built."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if hasattr(bias, "fold"):
        q, k = bias.fold(q, k, attn.scale)
        # all three zero-padded to one head width, a multiple of 8: the fused kernels take no other
        # (on a CPU, a ViT-B global block at 1024 px then holds 0.36 GB instead of 2.4 GB for its
        # backward); zeros change no dot product
        width, padded = v.shape[-1], -(-q.shape[-1] // 8) * 8
        q, k, v = (F.pad(t, (0, padded - t.shape[-1])) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0)[..., :width]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias(q).to(q.dtype), dropout_p=dropout)
    out = out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(attn, "norm", None)  # timm >= 1.0.15: an optional norm after the heads (Identity here)
    return attn.proj_drop(attn.proj(norm(out) if norm is not None else out))


def add_block_extras(vit: nn.Module, rel_pos_bias: bool, layer_scale: float | None) -> None:
    """Give every block of ``vit`` (AdaptedBlocks) a relative position bias and / or a layer scale
    starting at ``layer_scale``."""
    from timm.layers import LayerScale

    grid = tuple(vit.patch_embed.grid_size)
    if rel_pos_bias and vit.num_prefix_tokens != 1:
        raise ValueError(f"the relative position bias expects one CLS token, the encoder has {vit.num_prefix_tokens}")
    for block in vit.blocks:
        if rel_pos_bias:
            setattr(block, ATTN_BIAS, RelativePositionBias(grid, block.attn.num_heads))
        if layer_scale is not None:
            dim = block.norm1.normalized_shape[0]
            block.ls1, block.ls2 = LayerScale(dim, layer_scale), LayerScale(dim, layer_scale)


def is_block_extra(key: str) -> bool:
    """A state-dict key of these additions (absent from pre-trained encoders: initialised, not missing)."""
    return f".{ATTN_BIAS}." in key or key.endswith((".ls1.gamma", ".ls2.gamma"))
