"""The fine-tuning backbone: a ViT encoder set up for one method, giving multi-level feature maps.

Methods come from the registry (:mod:`finetune.models.methods`): ``full``, ``frozen``, ``pad``,
``mona``, ``ivtuning``, and any registered later. Inputs are chosen by ``modality``: ``ir`` or
``vi`` for a single image, ``both`` for a method that fuses the two (IV-tuning; with
infrared-only data it feeds the infrared frame to both streams).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import pretrain.models.pad  # noqa: F401  (registers the PAD adapter a checkpoint can carry)
from pretrain.models.adapters import TokenContext, adapter_parameter_names, attach_named
from pretrain.models.block_extras import add_block_extras
from pretrain.models.vit import EncoderConfig, build_encoder, embed_patches, prepend_cls, run_blocks
from pretrain.models.window_attention import add_window_attention
from finetune.models.ivtuning import IVTuningConfig
from finetune.models.methods import get_method
from finetune.models.mona import MonaConfig

MODALITIES = ("ir", "vi", "both")


@dataclass(frozen=True)
class BackboneConfig:
    method: str = "ivtuning"
    modality: str = "both"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    out_indices: tuple[int, ...] | None = None  # None: [3, 5, 7, 11] scaled to the depth
    mona: MonaConfig = field(default_factory=MonaConfig)
    ivtuning: IVTuningConfig = field(default_factory=IVTuningConfig)
    checkpoint: str | None = None  # exported backbone, official MAE or PAD, timm .pth / .safetensors
    allow_missing: bool = False
    pad_scale: str | None = None  # method pad on a PAD release whose predictor takes d inputs: sum | side | gside
    # BEiT's block additions of PAD's / MAE's segmentation backbones (pretrain.models.block_extras): a
    # relative position bias (zero at the start) and a layer scale starting at this value; they train
    # with the encoder, so only methods that train it whole take them
    rel_pos_bias: bool = False
    layer_scale: float | None = None
    # ViTDet's attention (pretrain.models.window_attention): windows of this many patches a side in
    # every block but global_blocks (None: the last of each quarter of the depth), a decomposed
    # relative position embedding (zero at the start, trains with the encoder); with either, the
    # blocks see patch tokens only, as ViTDet's (no CLS token)
    window_size: int = 0
    global_blocks: tuple[int, ...] | None = None
    decomposed_rel_pos: bool = False
    # Adapters that come with the weights (a PAD export or release), as (name, settings): set by
    # finetune.weights.resolve from the checkpoint, attached before the method's own.
    carried_adapters: tuple[tuple[str, dict], ...] = ()
    # False: the blocks see patch tokens only, whatever the attention; set by finetune.weights.resolve
    # for weights trained without a CLS token (IV-tuning's ViT_prompt, a ViTDet backbone)
    prefix_tokens: bool = True

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        check_modality(self.method, self.modality)
        check_block_extras(self.method, self.rel_pos_bias, self.layer_scale, self.decomposed_rel_pos)

    @property
    def patch_tokens_only(self) -> bool:
        """ViTDet's blocks: no CLS token."""
        return bool(self.window_size) or self.decomposed_rel_pos or not self.prefix_tokens


def check_block_extras(method: str, rel_pos_bias: bool, layer_scale: float | None,
                       decomposed_rel_pos: bool = False) -> None:
    if rel_pos_bias and decomposed_rel_pos:
        raise ValueError("model.rel_pos_bias (BEiT's) and model.decomposed_rel_pos (ViTDet's) are two kinds of "
                         "relative position term: choose one")
    off = {"rel_pos_bias": "false", "decomposed_rel_pos": "false", "layer_scale": "null"}
    on = [name for name, value in zip(off, (rel_pos_bias, decomposed_rel_pos, layer_scale is not None)) if value]
    if on and get_method(method).trains != "all":
        raise ValueError(f"{' / '.join(on)}: learnt with the encoder, but method {method!r} keeps it frozen, so "
                         "nothing would move from its start; use a method that trains the whole encoder (full, pad), "
                         f"or set {' '.join(f'model.{name}={off[name]}' for name in on)}")


def check_modality(method: str, modality: str) -> None:
    if modality not in get_method(method).modalities:
        raise ValueError(f"method {method!r} takes one image: set modality to 'ir' or 'vi' "
                         "(only a method that fuses infrared and visible, such as ivtuning, takes 'both')")


def backbone_config_from_dict(d: dict) -> BackboneConfig:
    d = dict(d)
    enc = dict(d.pop("encoder", {}))
    if "img_size" in enc:
        enc["img_size"] = tuple(enc["img_size"])
    out = d.pop("out_indices", None)
    global_blocks = d.pop("global_blocks", None)
    return BackboneConfig(encoder=EncoderConfig(**enc), mona=MonaConfig(**d.pop("mona", {})),
                          ivtuning=IVTuningConfig(**d.pop("ivtuning", {})),
                          out_indices=tuple(out) if out is not None else None,
                          global_blocks=tuple(global_blocks) if global_blocks is not None else None, **d)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks [3, 5, 7, 11] of a 12-block ViT, at the same relative depths for other depths
    (ViT-L: [7, 11, 15, 23])."""
    return tuple(max(round((i + 1) * depth / 12) - 1, 0) for i in (3, 5, 7, 11))


class Backbone(nn.Module):
    """``forward(ir, vi)`` -> feature maps (N, D, H/16, W/16), one per out index."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        for name, settings in cfg.carried_adapters:
            attach_named(self.encoder, name, settings)
        add_block_extras(self.encoder, cfg.rel_pos_bias, cfg.layer_scale)
        add_window_attention(self.encoder, cfg.window_size, cfg.global_blocks, cfg.decomposed_rel_pos)
        self.num_prefix = 0 if cfg.patch_tokens_only else self.encoder.num_prefix_tokens
        self.load_report = None  # set by the loading step (finetune.weights)
        depth = len(self.encoder.blocks)
        self.out_indices = cfg.out_indices or default_out_indices(depth)
        if max(self.out_indices) >= depth:
            raise ValueError(f"out_indices {self.out_indices} exceed the {depth} blocks")
        self.method = get_method(cfg.method)
        if self.method.attach is not None:
            self.method.attach(self.encoder, cfg)
        # the input side of a method that replaces the patch embedding (IV-tuning's prompter)
        self.prompter = self.method.input_module(self.encoder, cfg) if self.method.input_module else None
        trainable = self.trainable_names()
        for name, p in self.named_parameters():
            p.requires_grad_(name in trainable)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.method.trains == "none":
            # nothing of the encoder learns: it computes as at evaluation (no stochastic depth), as
            # mmsegmentation's frozen stages do in UNIP's linear probing
            self.encoder.eval()
        return self

    @property
    def unused_prefixes(self) -> tuple[str, ...]:
        """Parameter names the forward never reads: the encoder's final LayerNorm (the heads read
        block outputs, as MAE's and ViTDet's do), and the CLS token where the blocks see patch tokens
        only. They never train, and weights need not hold them."""
        return ("encoder.norm.", "encoder.cls_token") if self.num_prefix == 0 else ("encoder.norm.",)

    def trainable_names(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if not n.startswith(self.unused_prefixes)}
        if self.method.trains == "all":
            return names
        if self.method.trains == "none":
            return set()
        adapters = adapter_parameter_names(self.encoder, prefix="encoder.")
        slot = f".{self.method.name}."  # only this method's adapters (a PAD export's stay frozen)
        return {n for n in adapters if slot in n} | {n for n in names if n.startswith("prompter.")}

    def forward(self, ir: torch.Tensor | None = None, vi: torch.Tensor | None = None) -> list[torch.Tensor]:
        vit = self.encoder
        ctx = TokenContext(grid=tuple(vit.patch_embed.grid_size), num_prefix=self.num_prefix)
        if self.prompter is not None:
            tokens = self.prompter.tokens(vit, ir, vi, ctx)
        else:
            image = ir if self.cfg.modality == "ir" else vi
            if image is None:
                raise ValueError(f"modality '{self.cfg.modality}' but no such image in the batch")
            tokens = embed_patches(vit, image)
        wanted = sorted(set(self.out_indices))
        _, outputs = run_blocks(vit, prepend_cls(vit, tokens) if self.num_prefix else tokens, ctx, wanted)
        by_index = dict(zip(wanted, outputs))
        return [ctx.to_map(ctx.split(by_index[i])[1]) for i in self.out_indices]
