"""IV-tuning (Zhang et al., arXiv 2412.16654): infrared-visible fine-tuning of one frozen backbone,
wired as the authors' runnable ViT backbone (their ``ViT_prompt``).

- The visible image V goes through the frozen patch embedding (tokens x); the infrared image I
  through a separate trainable patch embedding of the same shape, PyTorch's default init (tokens z).
- Input prompt: one trainable LayerNorm shared by both modalities, then the external modal prompt
  generator (EMPG) on the two token maps: visible Conv1x1(C -> h) + hybrid operation, infrared
  Conv1x1(C -> h) + SimAM, summed, Conv1x1(h -> C). The prompt p is added to x (with the position
  embedding) before the blocks.
- Prompt stream: s_0 = p alone; s_{i+1} = the output tokens of block i.
- In every block, after the attention residual and again after the MLP residual (separate
  weights): x <- x + HA(x) + IPA(s_i), with
      HA(x)  = Up(Dropout(GELU(HybridOp(Down(gamma * LN(x) + beta)))))         d -> 64 -> d
      IPA(s) = GELU(scale * Up(GELU(SimAM(Down(gamma' * LN(s) + beta')))) + bias)  d -> 8 -> d
  Parameters as upstream (LN with its affine, then gamma / beta; scale / bias), so their
  checkpoints map one to one (``from_vit_prompt_keys``); init as upstream: Linear layers PyTorch
  default, gamma = scale = 1, beta = bias = 0, so the adapters act from step 0.
- Prefix tokens (a timm ViT's CLS) bypass every IV-tuning module: HA, IPA and the prompt act on
  patch tokens only.

Token maps are (N, C, H, W) with H the rows of the patch grid everywhere (``TokenContext.to_map``):
the authors' detection copy reshapes some maps as (w, h), which scrambles non-square grids, so
their EMPG's 3x3 kernel is transposed when their weights are loaded.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from finetune.models.methods import Method, register
from pretrain.models.adapters import ResidualAdapter, TokenContext, attach
from pretrain.models.vit import match_channels


@dataclass(frozen=True)
class IVTuningConfig:
    hidden: int = 64  # hybrid adapter (HA) width
    prompt_hidden: int = 8  # internal prompt adapter (IPA) width
    generator_hidden: int = 64  # EMPG width: 64 in the authors' ViT (8 in their EVA-02 / Swin code)
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
    out = y + Conv1x1(ReLU(BN(Conv1x1(y)))). Every conv has a bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.partial = max(channels // 4, 1)
        self.pconv = nn.Conv2d(self.partial, self.partial, 3, padding=1, groups=self.partial)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, tail = x[:, : self.partial], x[:, self.partial :]
        y = x + torch.cat([self.pconv(head), tail], dim=1)
        return y + self.conv2(F.relu(self.bn(self.conv1(y))))


class _ScaledNorm(nn.Module):
    """gamma * LN(x) + beta, LN with its own affine (upstream's parameterisation)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gamma + self.beta


class HybridAdapter(_ScaledNorm):
    """HA on patch tokens (N, L, d) -> the update (N, L, d)."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__(dim)
        self.down = nn.Linear(dim, cfg.hidden)
        self.op = HybridOp(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.hidden, dim)

    def forward(self, patches: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        h = TokenContext.from_map(self.op(ctx.to_map(self.down(self.normed(patches)))))
        return self.up(self.dropout(F.gelu(h)))


class InternalPromptAdapter(_ScaledNorm):
    """IPA on the prompt stream's patch tokens (N, L, d) -> the update (N, L, d)."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__(dim)
        self.down = nn.Linear(dim, cfg.prompt_hidden)
        self.simam = SimAM()
        self.up = nn.Linear(cfg.prompt_hidden, dim)
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, stream: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        h = TokenContext.from_map(self.simam(ctx.to_map(self.down(self.normed(stream)))))
        return F.gelu(self.up(F.gelu(h)) * self.scale + self.bias)


class IVTuningAdapter(ResidualAdapter):
    """Patch tokens <- patch tokens + HA(patch tokens) + IPA(s); prefix tokens pass unchanged."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.hybrid = HybridAdapter(dim, cfg)
        self.prompt = InternalPromptAdapter(dim, cfg)

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        if ctx.stream is None:
            raise ValueError("IV-tuning adapters need the prompt stream (run the blocks with pretrain.models.vit.run_blocks)")
        prefix, patches = ctx.split(x)
        patches = patches + self.hybrid(patches, ctx) + self.prompt(ctx.stream, ctx)
        return torch.cat([prefix, patches], dim=1)


class PromptGenerator(nn.Module):
    """EMPG: visible Conv1x1(C -> h) + hybrid op, infrared Conv1x1(C -> h) + SimAM, summed,
    Conv1x1(h -> C). Inputs and output are (N, C, H, W) token maps. Weights of more than one
    dimension xavier-uniform, biases and BatchNorm PyTorch's default (upstream's init)."""

    def __init__(self, dim: int, cfg: IVTuningConfig):
        super().__init__()
        k = cfg.generator_hidden
        self.visible_in = nn.Conv2d(dim, k, 1)
        self.visible_op = HybridOp(k)
        self.infrared_in = nn.Conv2d(dim, k, 1)
        self.simam = SimAM()
        self.out = nn.Conv2d(k, dim, 1)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, visible: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
        return self.out(self.visible_op(self.visible_in(visible)) + self.simam(self.infrared_in(infrared)))


class IVTuningInput(nn.Module):
    """The input side: the infrared patch embedding, the shared prompt LayerNorm and the EMPG."""

    def __init__(self, patch_embed: nn.Module, dim: int, cfg: IVTuningConfig):
        super().__init__()
        self.infrared_embed = copy.deepcopy(patch_embed)  # same shape as the visible one ...
        self.infrared_embed.proj.reset_parameters()  # ... with PyTorch's default init (upstream)
        self.norm = nn.LayerNorm(dim)
        self.generator = PromptGenerator(dim, cfg)

    def forward(self, visible_tokens: torch.Tensor, infrared: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """The prompt p (N, L, C) from the visible patch tokens and the infrared image."""
        infrared_tokens = self.infrared_embed(infrared)
        prompt = self.generator(ctx.to_map(self.norm(visible_tokens)), ctx.to_map(self.norm(infrared_tokens)))
        return TokenContext.from_map(prompt)

    def tokens(self, vit: nn.Module, ir: torch.Tensor | None, vi: torch.Tensor | None,
               ctx: TokenContext) -> torch.Tensor:
        """The blocks' input patch tokens x + p + position embedding; sets the prompt stream
        s_0 = p. With one image (infrared-only data) it feeds both streams."""
        if ir is None and vi is None:
            raise ValueError("IV-tuning needs an infrared or a visible image")
        infrared = ir if ir is not None else vi
        visible = vi if vi is not None else ir
        visible_tokens = vit.patch_embed(match_channels(visible, vit.patch_embed.proj.in_channels))
        prompt = self(visible_tokens, match_channels(infrared, self.infrared_embed.proj.in_channels), ctx)
        ctx.stream = prompt
        return visible_tokens + prompt + vit.pos_embed[:, vit.num_prefix_tokens:]


def attach_ivtuning(vit: nn.Module, cfg: IVTuningConfig = IVTuningConfig()) -> None:
    attach(vit, "ivtuning", "post_attn", lambda i, dim: IVTuningAdapter(dim, cfg))
    attach(vit, "ivtuning", "post_mlp", lambda i, dim: IVTuningAdapter(dim, cfg))


def _resolve_release(cfg):
    """The authors' ``ViT_prompt`` is a ViTDet backbone: its blocks never saw a CLS token, so with its
    weights ours see patch tokens only too (a CLS token in the attention would change every feature
    their adapters were trained on)."""
    import dataclasses

    from pretrain.weights import read_state_dict

    if cfg.checkpoint and is_vit_prompt_state(read_state_dict(cfg.checkpoint)):
        return dataclasses.replace(cfg, prefix_tokens=False)
    return cfg


def _load_release(backbone: nn.Module, cfg):
    """The authors' ``ViT_prompt`` weights (backbone and prompts in one file), or None for any
    other file (the plain encoder reader takes it)."""
    from pretrain.weights import read_state_dict

    sd = read_state_dict(cfg.checkpoint)
    return load_vit_prompt_state(backbone, sd, cfg.checkpoint, cfg.allow_missing) if is_vit_prompt_state(sd) else None


register(Method("ivtuning", "infrared patch embedding + prompt generator + per-block HA/IPA adapters train; "
                "fuses the infrared and the visible image",
                attach=lambda encoder, cfg: attach_ivtuning(encoder, cfg.ivtuning),
                input_module=lambda encoder, cfg: IVTuningInput(encoder.patch_embed, encoder.embed_dim, cfg.ivtuning),
                modalities=("ir", "vi", "both"), resolve_release=_resolve_release, load_release=_load_release))


# --- the authors' checkpoints -------------------------------------------------------------------
# Their ViT_prompt names -> ours (relative to finetune.models.backbone.Backbone).
_HYBRID_OP = (("adapter_conv.partial_conv.", "op.pconv."), ("adapter_conv.project1.", "op.conv1."),
              ("adapter_conv.BN.", "op.bn."), ("adapter_conv.project2.", "op.conv2."))
_HA = (("project1.", "down."), ("project2.", "up."), ("norm.", "norm."), ("gamma", "gamma"), ("beta", "beta"),
       *_HYBRID_OP)
_IPA = (("norm.", "norm."), ("down.", "down."), ("up.", "up."), ("scale", "scale"), ("bias", "bias"),
        ("gamma", "gamma"), ("beta", "beta"))
_EMPG = (("conv0_0.", "visible_in."), ("conv0_1.", "infrared_in."), ("conv1x1.", "out."),
         *((a, "visible_op." + b[len("op."):]) for a, b in _HYBRID_OP))
_BLOCK_MODULES = (("mona_prompt1.", "post_attn.ivtuning.hybrid.", _HA), ("mona_prompt2.", "post_mlp.ivtuning.hybrid.", _HA),
                  ("extra_prompt1.", "post_attn.ivtuning.prompt.", _IPA), ("extra_prompt2.", "post_mlp.ivtuning.prompt.", _IPA))
_EMPG_KERNEL = "prompter.generator.visible_op.pconv.weight"  # acts on their (w, h) map: transposed


def _key_pairs(their_keys) -> dict[str, str]:
    """Their key -> our key, for every key of a ViT_prompt state dict."""
    out = {}
    for key in their_keys:
        if key.startswith("patch_embed_prompt."):
            out[key] = "prompter.infrared_embed." + key[len("patch_embed_prompt."):]
        elif key.startswith("prompt_norms.0."):
            out[key] = "prompter.norm." + key[len("prompt_norms.0."):]
        elif key.startswith("prompt_blocks.0."):
            rest = key[len("prompt_blocks.0."):]
            out[key] = next("prompter.generator." + ours + rest[len(theirs):] for theirs, ours in _EMPG
                            if rest.startswith(theirs))
        elif key.startswith("blocks.") and any(f".{m}" in key for m, _, _ in _BLOCK_MODULES):
            _, index, module, rest = key.split(".", 3)
            _, ours_prefix, names = next(b for b in _BLOCK_MODULES if b[0] == module + ".")
            rest_ours = next(ours + rest[len(theirs):] for theirs, ours in names if rest.startswith(theirs))
            out[key] = f"encoder.blocks.{index}.{ours_prefix}{rest_ours}"
        else:  # the frozen ViT: timm's names already
            out[key] = "encoder." + key
    return out


def is_vit_prompt_state(sd: dict) -> bool:
    return any(k.removeprefix("backbone.").startswith(("patch_embed_prompt.", "prompt_blocks.")) for k in sd)


def from_vit_prompt_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT_prompt state dict (the authors' IV-tuning ViT) under our Backbone's names."""
    out = {ours: sd[theirs] for theirs, ours in _key_pairs(sd).items()}
    if _EMPG_KERNEL in out:
        out[_EMPG_KERNEL] = out[_EMPG_KERNEL].transpose(-1, -2).contiguous()
    return out


def to_vit_prompt_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Backbone's IV-tuning and ViT tensors under the authors' ViT_prompt names (the inverse)."""
    wanted = {k for k in sd if k.startswith(("encoder.", "prompter.")) and not k.startswith("encoder.norm.")}
    theirs = {}
    for key in wanted:
        their_key = _their_key(key)
        value = sd[key]
        theirs[their_key] = value.transpose(-1, -2).contiguous() if key == _EMPG_KERNEL else value
    return theirs


def _their_key(ours: str) -> str:
    if ours.startswith("prompter.infrared_embed."):
        return "patch_embed_prompt." + ours[len("prompter.infrared_embed."):]
    if ours.startswith("prompter.norm."):
        return "prompt_norms.0." + ours[len("prompter.norm."):]
    if ours.startswith("prompter.generator."):
        rest = ours[len("prompter.generator."):]
        return "prompt_blocks.0." + next(t + rest[len(o):] for t, o in _EMPG if rest.startswith(o))
    if ours.startswith("encoder.blocks."):
        _, _, index, rest = ours.split(".", 3)
        for module, ours_prefix, names in _BLOCK_MODULES:
            if rest.startswith(ours_prefix):
                tail = rest[len(ours_prefix):]
                return f"blocks.{index}.{module}" + next(t + tail[len(o):] for t, o in names if tail.startswith(o))
    return ours[len("encoder."):]


def _drop_frozen_relative_positions(ours: dict[str, torch.Tensor], path: str, report) -> None:
    """ViTDet's decomposed relative position tables (``blocks.i.attn.rel_pos_h`` / ``_w``), which their
    ViT holds when built with ``use_rel_pos``: IV-tuning freezes them at their zero start (only the
    prompt modules train, and MAE's weights have none), so they add nothing and are dropped. Tables
    that are not zero come from another training and are refused, by name."""
    from pretrain.weights import WeightsError

    tables = sorted(k for k in ours if re.fullmatch(r"encoder\.blocks\.\d+\.attn\.rel_pos_[hw]", k))
    learnt = [k for k in tables if ours[k].any()]
    if learnt:
        raise WeightsError(f"{path}: {len(learnt)} relative position table(s) are not zero (e.g. {learnt[0]}): "
                           "weights trained with ViTDet's relative positions, which IV-tuning keeps frozen at zero")
    for k in tables:
        del ours[k]
    if tables:
        report.adapted.append(f"{len(tables)} relative position tables, all zero, dropped")


def load_vit_prompt_state(backbone: nn.Module, sd: dict[str, torch.Tensor], path: str, allow_missing: bool = False):
    """Load an authors' IV-tuning ViT state dict (``backbone.`` prefixes of a detector checkpoint
    stripped) into our IV-tuning Backbone. Every tensor must land; their position embedding, kept at
    the pre-training grid (their ViT resamples it at every forward), is resampled once to ours as
    theirs is (bicubic, corners not aligned). Our CLS token, which their ViT lacks, is unused where
    the blocks see patch tokens only (as ``finetune.weights.resolve`` sets up for their weights) and
    otherwise keeps its value (reported missing); other missing weights raise unless allowed."""
    from pretrain.weights import LoadReport, WeightsError, adapt_encoder_state

    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    ours = from_vit_prompt_keys(sd)
    target = backbone.state_dict()
    report = LoadReport(path, adapted=[f"{_EMPG_KERNEL} (transposed)"])
    adapt_encoder_state(ours, target, tuple(backbone.encoder.patch_embed.grid_size), "encoder.", report)
    _drop_frozen_relative_positions(ours, path, report)
    stray = sorted(k for k in ours if k not in target)
    if stray:
        raise WeightsError(f"{path}: {len(stray)} tensor(s) match nothing in this IV-tuning backbone: {stray[:6]}")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in ours.items() if v.shape != target[k].shape]
    if mismatched:
        raise WeightsError(f"{path}: shape mismatch for {mismatched[:5]}")
    missing = sorted(k for k in target if k not in ours and not k.startswith(backbone.unused_prefixes))
    if [k for k in missing if k != "encoder.cls_token"] and not allow_missing:
        raise WeightsError(f"{path}: {len(missing)} weight(s) missing, e.g. {missing[:5]}; pass allow_missing to accept")
    backbone.load_state_dict(ours, strict=False)
    report.loaded, report.missing = len(ours), missing
    return report
