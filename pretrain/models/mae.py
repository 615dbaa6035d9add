"""Masked autoencoder (He et al. 2021) around the timm ViT encoder, with PAD adapters (arXiv 2312.08192).

Parameter names follow the official MAE release with the encoder under ``encoder.``:
``encoder.patch_embed.*``, ``encoder.blocks.*``, ``mask_token``, ``decoder_embed.*``,
``decoder_pos_embed``, ``decoder_blocks.*``, ``decoder_norm.*``, ``decoder_pred.*``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from timm.models.vision_transformer import Block

from pretrain.models.adapters import TokenContext, adapter_parameter_names
from pretrain.models.pad import PADConfig, attach_pad
from pretrain.models.pos_embed import sincos_2d
from pretrain.models.vit import (EncoderConfig, build_encoder, embed_patches, mae_init_, match_channels, prepend_cls,
                                 run_blocks)

PARADIGMS = ("pad", "continual", "scratch")


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class MAEConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    adapter: str = "pad"  # pad | none
    pad: PADConfig = field(default_factory=PADConfig)
    paradigm: str = "pad"  # pad: frozen encoder + adapters; continual / scratch: everything trains
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # PAD trains the decoder but keeps its input projection at the ImageNet-MAE value (PAD's
    # released code); true trains it too. Only the pad paradigm freezes anything in the decoder.
    train_decoder_embed: bool = False


def _from_dict(cls, d: dict[str, Any] | None):
    """Build a (nested) config dataclass from a plain dict, refusing unknown keys."""
    d = dict(d or {})
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown key(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        sub = {"encoder": EncoderConfig, "decoder": DecoderConfig, "pad": PADConfig}.get(name)
        if sub is not None and cls is MAEConfig:
            kwargs[name] = _from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def mae_config_from_dict(d: dict[str, Any]) -> MAEConfig:
    return _from_dict(MAEConfig, d)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches row-major, pixels in MAE's (p, q, c) order."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, gh * p, gw * p)


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """Per-sample random masking by argsort of uniform noise; keeps ``int(L * (1 - ratio))``
    tokens (truncation, as MAE's code: 196 tokens at ratio 0.9 keep 19).

    Returns the kept tokens, the binary mask (1 = removed) in the original order, and ids_restore.
    """
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if cfg.paradigm not in PARADIGMS:
            raise ValueError(f"paradigm must be one of {PARADIGMS}, got {cfg.paradigm!r}")
        if cfg.adapter not in ("pad", "none"):
            raise ValueError(f"adapter must be 'pad' or 'none', got {cfg.adapter!r}")
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        if cfg.adapter == "pad":
            attach_pad(self.encoder, cfg.pad)
        enc_dim = self.encoder.embed_dim
        p, c = cfg.encoder.patch_size, cfg.encoder.in_chans
        dec = cfg.decoder
        self.grid = cfg.encoder.grid
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.dim))
        self.decoder_embed = nn.Linear(enc_dim, dec.dim)
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec.dim, *self.grid).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(dec.dim, dec.num_heads, dec.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(dec.depth)])
        self.decoder_norm = nn.LayerNorm(dec.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec.dim, p * p * c)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mae_init_(module)
        apply_paradigm(self)

    # --- forward ---
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        tokens = embed_patches(self.encoder, imgs)
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio, generator)
        x = prepend_cls(self.encoder, tokens)
        x, _ = run_blocks(self.encoder, x, TokenContext(grid=None, num_prefix=1))
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        masked = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(match_channels(imgs, self.cfg.encoder.in_chans), self.cfg.encoder.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the removed patches only."""
        loss = ((pred.float() - self.targets(imgs).float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None):
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # --- parameter sets ---
    def encoder_adapter_names(self) -> set[str]:
        return adapter_parameter_names(self.encoder, prefix="encoder.")

    def trainable_names(self) -> set[str]:
        """The paradigm's trainable set (fixed position embeddings never train)."""
        fixed = {"encoder.pos_embed", "decoder_pos_embed"}
        names = {n for n, _ in self.named_parameters()} - fixed
        if self.cfg.paradigm == "pad":
            names = {n for n in names if not n.startswith("encoder.")} | self.encoder_adapter_names()
            if not self.cfg.train_decoder_embed:
                names -= {"decoder_embed.weight", "decoder_embed.bias"}
        return names


def apply_paradigm(model: MAE) -> None:
    trainable = model.trainable_names()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def build_mae(cfg: MAEConfig | dict) -> MAE:
    return MAE(cfg if isinstance(cfg, MAEConfig) else mae_config_from_dict(cfg))
