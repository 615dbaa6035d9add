"""ViTDet's changes to a plain ViT's attention for detection (Li et al., ECCV 2022), as PAD's FLIR
detection runs them (window 14, ViT-B's blocks 2 / 5 / 8 / 11 global, relative positions on):

- window attention: a block attends within non-overlapping windows of the patch grid, which is
  zero-padded after the block's first norm to a multiple of the window (64 -> 70 for 1024 px and
  window 14) and cropped back after the attention; a few blocks keep global attention;
- a decomposed relative position embedding in every block (MViTv2, Li et al., CVPR 2022): a table
  along the height and one along the width, each (2 * size - 1, head dim), read with the query and
  added to the attention logits, zero at the start (so a pre-trained block computes as before);
- no CLS token: the blocks see patch tokens only (the backbone drops it, see
  ``finetune.models.backbone``).

The embedding lives in a block's ``attn_bias`` slot (:mod:`pretrain.models.block_extras`), so the
weight loaders treat it as an addition that pre-trained encoders lack.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pretrain.models.block_extras import ATTN_BIAS


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of the depth: ViTDet's global blocks (B: 2, 5, 8, 11; L: 5, 11,
    17, 23; H: 7, 15, 23, 31)."""
    return tuple(sorted({max(round(q * depth / 4) - 1, 0) for q in (1, 2, 3, 4)}))


class DecomposedRelPos(nn.Module):
    """The relative position term of attention over an (H, W) grid of queries and keys:
    ``q . R_h[qy - ky] + q . R_w[qx - kx]`` for each query / key pair, from the unscaled query.

    ``forward`` gives it as a logit bias; attention takes it through ``fold`` instead, which appends
    the term to the queries and one-hot key positions to the keys (the same logits, to rounding), so
    that no (heads, H*W, H*W) bias is built: 30 % less time for a ViT-B global block at 1024 px on a
    CPU (BENCHMARKS.md), and a fused attention kernel needs no mask."""

    def __init__(self, size: tuple[int, int], head_dim: int):
        super().__init__()
        h, w = size
        self.size = (h, w)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * h - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * w - 1, head_dim))
        # offset (query - key) + size - 1, rebuilt from the size, never loaded
        self.register_buffer("index_h", _offsets(h), persistent=False)
        self.register_buffer("index_w", _offsets(w), persistent=False)
        # each key's row and column, one-hot: (H*W, H + W)
        rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        self.register_buffer("key_positions", torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], -1).float(),
                             persistent=False)

    def _terms(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, H*W, C) queries -> q . R_h for every key row (.., H), q . R_w for every column (.., W)."""
        b, n, length, c = q.shape
        h, w = self.size
        if length != h * w:
            raise ValueError(f"{length} tokens, the relative position embedding is for a {h}x{w} grid")
        r = q.reshape(b, n, h, w, c)
        along_h = torch.einsum("bnhwc,hkc->bnhwk", r, self.rel_pos_h[self.index_h].to(q.dtype))
        along_w = torch.einsum("bnhwc,wkc->bnhwk", r, self.rel_pos_w[self.index_w].to(q.dtype))
        return along_h.reshape(b, n, length, h), along_w.reshape(b, n, length, w)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """(B, heads, H*W, C) queries -> (B, heads, H*W, H*W) logit bias."""
        along_h, along_w = self._terms(q)
        b, n, length, _ = q.shape
        return (along_h[..., :, None] + along_w[..., None, :]).reshape(b, n, length, length)

    def fold(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys whose dot products are ``scale * q . k`` plus the relative term."""
        along_h, along_w = self._terms(q)
        positions = self.key_positions.to(k.dtype).expand(*k.shape[:2], -1, -1)
        return torch.cat([q * scale, along_h, along_w], dim=-1), torch.cat([k, positions], dim=-1)


def _offsets(size: int) -> torch.Tensor:
    pos = torch.arange(size)
    return pos[:, None] - pos[None, :] + size - 1


def windowed(attend: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: tuple[int, int] | None,
             window: int) -> torch.Tensor:
    """``attend`` on each ``window`` x ``window`` window of the (N, H*W, C) patch tokens ``x`` (an
    (H, W) grid, zero-padded at the bottom and right to whole windows), back in the tokens' order."""
    if grid is None:
        raise ValueError("window attention needs the token grid; it cannot run on masked tokens")
    n, length, c = x.shape
    h, w = grid
    if length != h * w:
        raise ValueError(f"window attention needs patch tokens only: {length} tokens on a {h}x{w} grid")
    pad_h, pad_w = -h % window, -w % window
    x = F.pad(x.reshape(n, h, w, c), (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    windows = (x.reshape(n, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
               .reshape(-1, window * window, c))
    out = attend(windows)
    out = (out.reshape(n, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
           .reshape(n, hp, wp, -1))
    return out[:, :h, :w].reshape(n, h * w, -1)


def add_window_attention(vit: nn.Module, window: int, global_blocks: Sequence[int] | None,
                         rel_pos: bool) -> None:
    """Window attention of ``window`` patches a side in every block of ``vit`` (AdaptedBlocks) but
    ``global_blocks`` (None: :func:`default_global_blocks`; ``window`` 0: every block global), and a
    decomposed relative position embedding in every block when ``rel_pos``, sized to what the block
    attends over."""
    depth = len(vit.blocks)
    global_blocks = default_global_blocks(depth) if global_blocks is None else tuple(global_blocks)
    if window < 0:
        raise ValueError(f"window size must be 0 (global attention) or positive, got {window}")
    if any(not 0 <= i < depth for i in global_blocks):
        raise ValueError(f"global blocks {list(global_blocks)} must index the {depth} blocks")
    grid = tuple(vit.patch_embed.grid_size)
    for i, block in enumerate(vit.blocks):
        block.window = window if window and i not in global_blocks else 0
        if rel_pos:
            size = (block.window, block.window) if block.window else grid
            setattr(block, ATTN_BIAS, DecomposedRelPos(size, vit.embed_dim // block.attn.num_heads))
