"""Weight loading and backbone export.

Loads official MAE pre-training checkpoints (``{'model': ...}``, encoder + decoder), timm ViT
state dicts (``.pth`` / ``.safetensors``), our exported backbones and our MAE state dicts. Never
unpickles code: ``torch.load(weights_only=True)`` or safetensors. Position embeddings are
resampled to the configured grid (non-square too); 3-channel patch weights are folded into one
channel when the model takes 1 (summed, timm's ``adapt_input_conv``), and a 3-channel MAE pixel
predictor is averaged over its colour outputs. Missing backbone weights are an error unless
explicitly allowed; every missing / unexpected key is reported.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv

from data_tools.files import atomic_write, atomic_write_text
from pretrain.models.block_extras import is_block_extra
from pretrain.backbone_meta import (BACKBONE_FORMAT, BACKBONE_VERSION, WeightsError, adapter_names,  # noqa: F401
                                    check_tensor_counts, is_exported_backbone, read_backbone_meta)

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
_DECODER_PREFIXES = ("mask_token", "decoder_")


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # keys resampled / folded to fit the model

    def summary(self) -> str:
        return (f"{self.path}: loaded {self.loaded} tensors, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, adapted {self.adapted or 'none'}")


def _torch_load_tensors(path: Path):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    MAE's and PAD's training scripts save their command-line arguments beside the weights
    (``'args': argparse.Namespace``); a Namespace holds attributes only, so the weights-only
    unpickler may rebuild it, and a checkpoint of the authors' code loads as it is."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        raise WeightsError(f"{path}: not a PyTorch checkpoint (.pth / .pt) nor a .safetensors file")

    def load(mmap: bool):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    # torch.save's zip format maps into memory: a method that looks at names and shapes before the
    # load (IV-tuning's and PAD's releases) reads little of the file, and the tensors are copied once,
    # into the model. The legacy format cannot be mapped; where the file system cannot map files
    # (some FUSE mounts), the file is read whole.
    mappable = magic[:2] == b"PK"
    try:
        try:
            return load(mmap=mappable)
        except (RuntimeError, OSError):  # not a refused pickle: torch's own and the file system's errors
            if not mappable:
                raise
            return load(mmap=False)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors"
        raise WeightsError(f"{path}: holds {what}; such objects are never loaded here (unpickling can run code); "
                           "save the weights as tensors (torch.save(model.state_dict(), ...) or safetensors)") from None
    except Exception as e:  # a truncated or damaged file
        raise WeightsError(f"{path}: not readable as a PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def weights_folder_problem(path: Path) -> str:
    """What a folder given as a weights file is, and the file to give instead: a pre-training run of
    ours (or one of its checkpoints) is exported first; a DeepSpeed checkpoint folder (MAE's and PAD's
    scripts under DeepSpeed write one) holds its weights in one file."""
    from data_tools.files import FOLDER_KINDS, folder_kind

    kind = folder_kind(path)
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    if kind == "pretrain" or run is not None and folder_kind(run) == "pretrain":
        run_dir, tag = (path, "") if kind == "pretrain" else (run, f" --tag {path.name}")
        what = "a pre-training run" if kind == "pretrain" else f"a checkpoint of the pre-training run {run_dir}"
        return (f"{path} is {what}, not a weights file: export its backbone first "
                f"(python -m pretrain export {run_dir}{tag} --out backbone.pth) and give that file")
    if kind is not None:
        return f"weights file {path} is {FOLDER_KINDS[kind][0]}, not weights"
    states = path / "mp_rank_00_model_states.pt"
    return f"weights file {path} is a folder" + (f"; its weights are in {states}" if states.is_file() else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(weights_folder_problem(path))
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors' own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        sd = _torch_load_tensors(path)
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise WeightsError(f"{path}: no tensors found")
    return out


def _resample_pos(pos: torch.Tensor, grid: tuple[int, int],
                  old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The patch positions of ``old_grid`` (None: a square one) resampled to ``grid`` as MAE's
    ``interpolate_pos_embed``, ViTDet's ``get_abs_pos`` and mmsegmentation's ``resize_pos_embed`` do
    (bicubic, corners not aligned, no antialiasing: timm's default antialiasing gives other values
    even when upsampling); the CLS slot as it is."""
    length = pos.shape[1] - 1
    if old_grid is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise WeightsError(f"cannot infer the grid of a position embedding with {length} tokens (not square)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != length:
        raise WeightsError(f"a position embedding of {length} tokens does not fill the "
                           f"{old_grid[0]}x{old_grid[1]} grid its weights were saved for")
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=1,
                                  antialias=False)


def adapt_encoder_state(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], grid: tuple[int, int],
                        prefix: str, report: LoadReport, saved_grid: tuple[int, int] | None = None) -> None:
    """Make encoder tensors (keys under ``prefix``) fit the target shapes, in place. ``saved_grid``:
    the patch grid the weights were saved for, where known (an export's); None: a square one."""
    pos, proj = f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight"
    if pos in sd and pos in target and sd[pos].shape != target[pos].shape:
        sd[pos] = _resample_pos(sd[pos], grid, saved_grid)
        report.adapted.append(pos)
    if proj in sd and proj in target and sd[proj].shape != target[proj].shape:
        src, dst = sd[proj], target[proj]
        if src.shape[2:] != dst.shape[2:]:
            raise WeightsError(f"patch size {tuple(src.shape[2:])} in the weights, {tuple(dst.shape[2:])} in the model")
        if src.shape[1] == 3 and dst.shape[1] == 1:
            sd[proj] = adapt_input_conv(1, src)
        elif src.shape[1] == 1 and dst.shape[1] == 3:
            sd[proj] = src.repeat(1, 3, 1, 1) / 3
        report.adapted.append(proj)


def _adapt_decoder(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], grid: tuple[int, int],
                   report: LoadReport) -> None:
    if "decoder_pos_embed" in sd and sd["decoder_pos_embed"].shape != target["decoder_pos_embed"].shape:
        sd["decoder_pos_embed"] = _resample_pos(sd["decoder_pos_embed"], grid)
        report.adapted.append("decoder_pos_embed")
    for key in ("decoder_pred.weight", "decoder_pred.bias"):
        if key in sd and sd[key].shape != target[key].shape and sd[key].shape[0] == 3 * target[key].shape[0]:
            # (p*p*3, ...) in MAE's (p, q, c) order -> mean over c for a 1-channel target.
            src = sd[key]
            sd[key] = src.reshape(src.shape[0] // 3, 3, *src.shape[1:]).mean(dim=1)
            report.adapted.append(key)


# PAD's released code names its adapter ``blocks.i.adaptmlp.*`` and its scale predictor
# ``blocks.i.scalar_pred``; ours sit in the block's parallel-MLP slot under ``pad``.
_PAD_AUTHOR_NAMES = ((".adaptmlp.adapter_layer_norm_before.", ".parallel_mlp.pad.norm."),
                     (".adaptmlp.down_proj.", ".parallel_mlp.pad.down."),
                     (".adaptmlp.up_proj.", ".parallel_mlp.pad.up."),
                     (".scalar_pred.", ".parallel_mlp.pad.scale."))
_ADAPTER_MARKERS = (".post_attn.", ".parallel_mlp.", ".post_mlp.", ".adaptmlp.", ".scalar_pred.")


def from_pad_author_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PAD's adapter and predictor names -> ours (other keys unchanged)."""
    out = {}
    for key, value in sd.items():
        for theirs, ours in _PAD_AUTHOR_NAMES:
            key = key.replace(theirs, ours)
        if key.endswith(".adaptmlp.scale"):  # per-layer scale: a parameter (learnable) or a buffer (fixed)
            key = key[: -len(".adaptmlp.scale")] + ".parallel_mlp.pad.scale"
        out[key] = value
    return out


def has_pad_author_keys(sd: dict[str, torch.Tensor]) -> bool:
    return any(".adaptmlp." in k or ".scalar_pred." in k for k in sd)


def _consume_fixed_scales(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], fixed_scale: float | None,
                          report: LoadReport) -> None:
    """PAD stores the fixed scale (its ``adapt_scalar``) as a buffer; our ``fixed`` variant holds
    it in the config. A stored value equal to ours is consumed; any other is an error. (Models
    without a fixed-scale PAD leave such keys to the stray-key check.)"""
    if fixed_scale is None:
        return
    for key in [k for k in sd if k.endswith(".parallel_mlp.pad.scale") and k not in target]:
        value = sd[key].flatten()
        if value.numel() != 1 or abs(float(value[0]) - fixed_scale) > 1e-6:
            raise WeightsError(f"{report.path}: {key} = {value.tolist()} does not fit this model's PAD scale "
                               f"(fixed at {fixed_scale})")
        del sd[key]
        report.adapted.append(f"{key} (fixed scale {fixed_scale}, matches the config)")


def _refuse_stray_adapter_keys(sd: dict, target: dict, report: LoadReport) -> None:
    """An adapter or predictor tensor that lands nowhere would leave that adapter at its init
    while the load looks successful: never drop one silently."""
    stray = sorted(k for k in sd if k not in target and any(m in k for m in _ADAPTER_MARKERS))
    if stray:
        raise WeightsError(f"{report.path}: {len(stray)} adapter / scale-predictor tensor(s) match nothing in "
                           f"this model: {stray[:6]}{' ...' if len(stray) > 6 else ''} (another adapter, "
                           "scale variant or depth?)")


def _fixed_scale_of(model: nn.Module) -> float | None:
    from pretrain.models.pad import pad_adapters

    adapters = pad_adapters(model)
    return adapters[0].fixed_scale if adapters and adapters[0].variant == "fixed" else None


def to_mae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE / PAD / timm / exported-backbone keys -> our MAE's (encoder under ``encoder.``)."""
    sd = from_pad_author_keys(sd)
    if any(k.startswith("encoder.") for k in sd):
        return dict(sd)
    return {(k if k.startswith(_DECODER_PREFIXES) else f"encoder.{k}"): v for k, v in sd.items()}


def load_into_mae(model: nn.Module, path: str | Path, allow_missing: bool = False) -> LoadReport:
    """Load weights into an MAE. Missing encoder (non-adapter) weights raise unless allowed;
    a checkpoint without a decoder (timm classification weights) leaves the decoder initialised."""
    report = LoadReport(str(path))
    sd = to_mae_keys(read_state_dict(path))
    target = model.state_dict()
    adapt_encoder_state(sd, target, model.grid, "encoder.", report)
    _adapt_decoder(sd, target, model.grid, report)
    _consume_fixed_scales(sd, target, _fixed_scale_of(model), report)
    _refuse_stray_adapter_keys(sd, target, report)
    adapters = model.encoder_adapter_names()
    backbone_missing = sorted(k for k in target if k.startswith("encoder.") and k not in sd and k not in adapters)
    if backbone_missing and not allow_missing:
        raise WeightsError(f"{path}: {len(backbone_missing)} backbone weight(s) missing, e.g. "
                           f"{backbone_missing[:5]}; pass allow_missing to accept")
    _load_matching(model, sd, target, report)
    return report


def _load_matching(model: nn.Module, sd: dict, target: dict, report: LoadReport) -> None:
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
                  for k in sd if k in target and sd[k].shape != target[k].shape]
    if mismatched:
        raise WeightsError(f"{report.path}: shape mismatch for {mismatched[:5]}")
    usable = {k: v for k, v in sd.items() if k in target}
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.missing = sorted(set(target) - set(usable))
    report.unexpected = sorted(set(sd) - set(target))


# --- the backbone handed to fine-tuning ------------------------------------------------------

def export_backbone(model: nn.Module, out_path: str | Path, input_norm: dict | None = None,
                    corpus: list[dict] | None = None) -> tuple[Path, Path]:
    """Encoder + adapters (decoder dropped) with timm names, and a JSON that rebuilds it.
    ``input_norm``: how pre-training normalised its input (``mean``, ``std`` of the 8-bit-scaled
    infrared intensity and the 16-bit ``intensity`` rule), for fine-tuning to do the same.
    ``corpus``: the shard folders and their sources it was pre-trained on (``pretraining_corpus``).
    ``out_path``: the .pth to write, or a folder to write ``backbone.pth`` into."""
    out_path = Path(out_path)
    if out_path.is_dir():  # `--out exports/`: torch.save would fail on the folder itself
        out_path = out_path / "backbone.pth"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k[len("encoder."):]: v.detach().cpu().contiguous()
          for k, v in model.state_dict().items() if k.startswith("encoder.")}
    # each file whole or not at all (a temporary name, then a rename); the JSON last, as readers go by
    # it, and with the tensor counts that tell a .pth of another export from this one's
    atomic_write(out_path, lambda f: torch.save(sd, f), binary=True)
    cfg = model.cfg
    meta = {
        "format": BACKBONE_FORMAT, "version": BACKBONE_VERSION,
        "encoder": asdict(cfg.encoder),
        "adapters": [] if cfg.adapter == "none" else [{"name": cfg.adapter, "settings": asdict(cfg.pad)}],
        "input": input_norm,
        "num_tensors": len(sd), "num_parameters": int(sum(v.numel() for v in sd.values())),
    }
    if corpus is not None:  # optional: an export of an earlier version, or of weights alone, has none
        meta["pretraining_corpus"] = corpus
    json_path = out_path.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(meta, indent=1))
    return out_path, json_path



def exported_encoder_config(meta: dict, img_size: tuple[int, int] | None = None):
    """The EncoderConfig an export was written from; ``img_size`` moves it to another input size."""
    from pretrain.models.vit import EncoderConfig

    return EncoderConfig(**dict(meta["encoder"], img_size=tuple(img_size or meta["encoder"]["img_size"])))


def attach_exported_adapters(vit: nn.Module, meta: dict) -> None:
    import pretrain.models.pad  # noqa: F401  (registers its adapter)
    from pretrain.models.adapters import attach_named

    for adapter in meta["adapters"]:
        attach_named(vit, adapter["name"], adapter["settings"])


def load_backbone(path: str | Path, img_size: tuple[int, int] | None = None):
    """Rebuild an exported encoder with its adapters and load it (strict). ``img_size`` moves
    the position embedding to another input size. Returns (vit, meta, report)."""
    from pretrain.models.vit import build_encoder

    meta = read_backbone_meta(path)
    vit = build_encoder(exported_encoder_config(meta, img_size))
    attach_exported_adapters(vit, meta)
    return vit, meta, load_exported_into(vit, path)


def load_exported_into(vit: nn.Module, path: str | Path) -> LoadReport:
    """An export's tensors into an encoder built from its JSON: every tensor of the encoder and of
    the export's adapters must be there; adapters attached since (a fine-tuning method's) keep
    their initialisation (not counted missing: the export never had them)."""
    from pretrain.models.adapters import POSITIONS

    report = LoadReport(str(path))
    sd = read_state_dict(path)
    target = vit.state_dict()
    meta = read_backbone_meta(path)
    check_tensor_counts(meta, path, len(sd), sum(v.numel() for v in sd.values()))
    exported = set(adapter_names(meta))
    added = {k for k in target if any(f".{p}." in k and k.split(f".{p}.", 1)[1].split(".")[0] not in exported
                                      for p in POSITIONS)}
    added |= {k for k in target if k not in sd and is_block_extra(k)}  # fine-tuning's block additions
    # at another input size the position embedding is resampled, as PAD's and MAE's fine-tuning
    # resample their pre-training checkpoints' (not the sin-cos of the new grid: that one places
    # the patches at positions the pre-training never saw)
    adapt_encoder_state(sd, target, tuple(vit.patch_embed.grid_size), "", report,
                        saved_grid=exported_encoder_config(meta).grid)
    missing = sorted(set(target) - set(sd) - added)
    if missing:
        raise WeightsError(f"{path}: exported backbone lacks {missing[:5]}")
    _load_matching(vit, sd, target, report)
    report.missing = [k for k in report.missing if k not in added]
    return report


def pad_config_from_state(sd: dict[str, torch.Tensor], scale: str | None = None):
    """The PADConfig that rebuilds the adapters of a PAD state dict (PAD's or our names): hidden
    width from the down-projection, the scale variant from the predictor's shape (a predictor on
    d inputs is one of sum / side / gside, and a stored per-layer scale is learnable (`layer`) or
    PAD's fixed buffer: ``scale`` names which)."""
    from pretrain.models.pad import PADConfig

    sd = from_pad_author_keys(sd)
    down = next((v for k, v in sd.items() if k.endswith(".parallel_mlp.pad.down.weight")), None)
    if down is None:
        raise WeightsError("no PAD adapter weights in this file")
    dim = down.shape[1]
    pred = next((v for k, v in sd.items() if k.endswith(".parallel_mlp.pad.scale.weight")), None)
    stored_scale = next((v for k, v in sd.items() if k.endswith(".parallel_mlp.pad.scale")), None)
    if pred is not None and pred.shape[-1] == 2 * dim:
        inferred = "concat"
    elif pred is not None:
        if scale not in ("sum", "side", "gside"):
            raise WeightsError("the scale predictor takes d inputs: one of sum / side / gside; name it "
                               "(init.pad_scale)")
        inferred = scale
    elif stored_scale is not None:
        inferred = "fixed" if scale == "fixed" else "layer"
    else:
        inferred = "fixed"
    kwargs = {"hidden": down.shape[0], "scale": inferred}
    if inferred == "fixed" and stored_scale is not None:
        kwargs["fixed_scale"] = float(stored_scale.flatten()[0])
    return PADConfig(**kwargs)


def load_into_encoder(vit: nn.Module, path: str | Path, allow_missing: bool = False,
                      unused: tuple[str, ...] = ()) -> LoadReport:
    """Official MAE, PAD, timm, or our MAE weights into a bare encoder (decoder and head keys are
    reported unexpected). Missing non-adapter weights raise unless allowed, or unless the caller
    never uses them (``unused``: key prefixes, e.g. the final norm that fine-tuning's heads do not
    read, which MAE's fine-tuned checkpoints replace by ``fc_norm``); adapter tensors that match
    nothing raise."""
    from pretrain.models.adapters import POSITIONS

    report = LoadReport(str(path))
    sd = from_pad_author_keys(read_state_dict(path))
    if any(k.startswith("encoder.") for k in sd):  # our MAE
        sd = {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()}
    target = vit.state_dict()
    adapt_encoder_state(sd, target, tuple(vit.patch_embed.grid_size), "", report)
    _consume_fixed_scales(sd, target, _fixed_scale_of(vit), report)
    _refuse_stray_adapter_keys(sd, target, report)
    slots = tuple(f".{p}." for p in POSITIONS)  # adapter parameters and buffers start from their init

    def not_needed(k: str) -> bool:  # initialised as intended (block extras), or never used by the caller
        return is_block_extra(k) or k.startswith(unused)

    missing = sorted(k for k in target if k not in sd and not any(s in k for s in slots) and not not_needed(k))
    if missing and not allow_missing:
        raise WeightsError(f"{path}: {len(missing)} backbone weight(s) missing, e.g. {missing[:5]}; "
                           "pass allow_missing to accept")
    _load_matching(vit, sd, target, report)
    report.missing = [k for k in report.missing if not not_needed(k)]
    return report
