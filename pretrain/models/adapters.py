"""One mechanism to attach adapters to the blocks of a timm ViT.

Each timm ``Block`` is replaced by an ``AdaptedBlock`` that adopts the block's own submodules
under their own names (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
``drop_path2``), so the state-dict keys of the ViT stay timm's, and adds three named slots:

    x = x + DropPath(LS1(Attn(LN1(x))))             # Attn + a logit bias where attn_bias is set, in windows
                                                    # where window is set
    x = post_attn adapters (x, ctx)                 # Mona, IV-tuning: residual modules on x
    m = MLP(LN2(x))
    x = x + DropPath(LS2(m)) + sum(parallel_mlp adapters (x, m, ctx))   # PAD, AdaptFormer
    x = post_mlp adapters (x, ctx)

With no adapters attached the block computes exactly timm's ``Block.forward``. Adapters get a
``TokenContext``: the token grid (H, W), or None when tokens are masked, the number of prefix
(CLS) tokens, a stream of patch tokens that runs beside the blocks (IV-tuning's prompt stream:
the previous block's output, or what an input module set before block 0) and a dict of extras. A new adapter type (LoRA,
AdaptFormer, ...) subclasses one of the base classes and needs no new plumbing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from data_tools.registry import Registry
from pretrain.models.block_extras import attention_with_bias
from pretrain.models.window_attention import windowed

POSITIONS = ("post_attn", "parallel_mlp", "post_mlp")
_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class TokenContext:
    grid: tuple[int, int] | None  # (H, W) of the patch tokens; None when tokens are masked/shuffled
    num_prefix: int = 1
    extras: dict = field(default_factory=dict)
    # Patch tokens (N, L, C) of the stream for the current block: run_blocks sets it to the
    # previous block's output; before block 0 it is what the caller set (IV-tuning: its prompt),
    # else the block's input.
    stream: torch.Tensor | None = None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.num_prefix], x[:, self.num_prefix :]

    def to_map(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(N, H*W, C) patch tokens -> (N, C, H, W), rows first (the patch embedding's order)."""
        if self.grid is None:
            raise ValueError("this adapter needs the full token grid; it cannot run on masked tokens")
        h, w = self.grid
        n, length, c = patch_tokens.shape
        if length != h * w:
            raise ValueError(f"{length} patch tokens do not fill a {h}x{w} grid")
        return patch_tokens.transpose(1, 2).reshape(n, c, h, w)

    @staticmethod
    def from_map(feature_map: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H*W, C)."""
        return feature_map.flatten(2).transpose(1, 2)


class ResidualAdapter(nn.Module):
    """Runs after the attention or MLP residual: returns the new token tensor."""

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ParallelMLPAdapter(nn.Module):
    """Runs beside the MLP: gets x (after the attention residual) and the MLP output m,
    returns a term added to the residual stream together with DropPath(m)."""

    def forward(self, x: torch.Tensor, mlp_out: torch.Tensor, ctx: TokenContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class AdaptedBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        for name in _BLOCK_CHILDREN:
            if not hasattr(block, name):
                raise TypeError(f"{type(block).__name__} has no '{name}': not a timm ViT Block")
            self.add_module(name, getattr(block, name))
        self.post_attn = nn.ModuleDict()
        self.parallel_mlp = nn.ModuleDict()
        self.post_mlp = nn.ModuleDict()
        # A term added to the attention logits, from the queries: BEiT's relative position bias
        # (pretrain.models.block_extras) or ViTDet's decomposed one (pretrain.models.window_attention).
        self.attn_bias: nn.Module | None = None
        self.window = 0  # ViTDet's window attention: patches a side of a window; 0: global attention

    def forward(self, x: torch.Tensor, ctx: TokenContext | None = None) -> torch.Tensor:
        if ctx is None:
            ctx = TokenContext(grid=None)
        h = self.norm1(x)
        if self.window:
            a = windowed(self.attention, h, ctx.grid, self.window)
        else:
            a = self.attention(h)
        x = x + self.drop_path1(self.ls1(a))
        for adapter in self.post_attn.values():
            x = adapter(x, ctx)
        m = self.mlp(self.norm2(x))
        update = self.drop_path2(self.ls2(m))
        # a parallel adapter reads the MLP's output before the layer scale, as PAD's scale predictor does
        for adapter in self.parallel_mlp.values():
            update = update + adapter(x, m, ctx)
        x = x + update
        for adapter in self.post_mlp.values():
            x = adapter(x, ctx)
        return x

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        if self.attn_bias is None:
            return self.attn(h)
        return attention_with_bias(self.attn, h, self.attn_bias)


def attach(vit: nn.Module, name: str, position: str, factory: Callable[[int, int], nn.Module]) -> None:
    """Attach ``factory(block_index, dim)`` as adapter ``name`` at ``position`` of each block."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}")
    dim = vit.embed_dim
    for i, block in enumerate(vit.blocks):
        if not isinstance(block, AdaptedBlock):
            raise TypeError("build the encoder with pretrain.models.vit.build_encoder (blocks must be AdaptedBlock)")
        slot = getattr(block, position)
        if name in slot:
            raise ValueError(f"block {i} already has an adapter '{name}' at {position}")
        slot[name] = factory(i, dim)


def adapter_parameter_names(vit: nn.Module, prefix: str = "") -> set[str]:
    names = set()
    for i, block in enumerate(vit.blocks):
        for slot in POSITIONS:
            for n, _ in getattr(block, slot).named_parameters():
                names.add(f"{prefix}blocks.{i}.{slot}.{n}")
    return names


# --- block adapters an exported backbone can carry, by name ------------------------------------

@dataclass(frozen=True)
class BlockAdapterKind:
    """A pre-training adapter: its settings (a dataclass) and how it attaches to an encoder. An
    export lists its adapters as (name, settings), and loading re-attaches them through this."""
    name: str
    config: type
    attach: Callable[[nn.Module, object], None]


BLOCK_ADAPTERS: Registry[BlockAdapterKind] = Registry("pre-training adapter", "adapter")


def register_block_adapter(kind: BlockAdapterKind) -> BlockAdapterKind:
    return BLOCK_ADAPTERS.register(kind.name, kind)


def attach_named(vit: nn.Module, name: str, settings: dict) -> None:
    """Attach the registered adapter ``name`` with ``settings`` (as an export records them)."""
    kind = BLOCK_ADAPTERS.get(name)
    kind.attach(vit, kind.config(**settings))
