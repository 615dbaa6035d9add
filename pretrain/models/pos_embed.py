"""Fixed 2-D sin-cos position embeddings (MAE), for square and non-square token grids."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + H*W, dim) or (H*W, dim), tokens in row-major (h, w) order like a flattened patch grid.

    Matches MAE's ``get_2d_sincos_pos_embed``: the first half of the channels encodes the column
    (w) coordinate and the second half the row, so official MAE embeddings are reproduced exactly;
    it is written for H != W too (MAE's helper only takes square grids).
    """
    assert dim % 4 == 0, "embedding dimension must be divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
