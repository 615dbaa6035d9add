"""Reconstruction previews: original | masked | reconstruction for a fixed set of frames."""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import torch

from data_tools.imageio import write_png
from data_tools.shards import SampleDecodeError, decode_for_training, iter_shard
from data_tools.transforms import IntensityConfig, normalize_ir, stretch_to_uint8, to_unit_intensity
from pretrain.models.mae import patchify, unpatchify
from pretrain.models.vit import match_channels


def fixed_frames(urls: list[str], count: int, size: tuple[int, int], mean: float, std: float,
                 intensity: IntensityConfig = IntensityConfig()) -> torch.Tensor:
    """The first ``count`` frames of the shards, whole-frame resized (no random crop): (N, 1, H, W).
    Read as the training stream reads them (one shard reader); an undecodable sample or an
    unreadable shard is skipped with a warning, as training skips and counts it."""
    frames = []
    for url in urls:
        for key, members in _readable(url):
            try:
                image, _ = decode_for_training({"__key__": key, **members})
            except SampleDecodeError as e:
                print(f"warning: preview: {e}; skipped", file=sys.stderr)
                continue
            image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            frames.append(normalize_ir(to_unit_intensity(image, intensity), mean, std))
            if len(frames) == count:
                return torch.from_numpy(np.stack(frames)[:, None].astype(np.float32))
    if not frames:
        raise ValueError("no frames to preview")
    return torch.from_numpy(np.stack(frames)[:, None].astype(np.float32))


def _readable(url: str):
    try:
        yield from iter_shard(url)
    except (OSError, tarfile.TarError, EOFError) as e:
        print(f"warning: preview: shard {url} is unreadable from here on ({e}); skipped", file=sys.stderr)


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, seed: int = 0) -> np.ndarray:
    """uint8 (rows = frames; columns = original, masked input, reconstruction with visible patches)."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=images.device).manual_seed(seed)
    dtype = next(model.parameters()).dtype  # bf16 where the run holds its weights in bf16
    _, pred, mask = model(images.to(dtype), generator=g)
    pred = pred.float()
    p, c = model.cfg.encoder.patch_size, model.cfg.encoder.in_chans
    target = patchify(match_channels(images, c), p)
    if model.cfg.norm_pix_loss:  # predictions are per-patch normalised: undo with the true statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    recon = unpatchify(pred * m + target * (1 - m), p, model.grid, c)[:, :1]
    masked = unpatchify(target * (1 - m), p, model.grid, c)[:, :1]
    model.train(was_training)

    lo, hi = float(images.amin()), float(images.amax())  # one range for all three columns: comparable

    def to_u8(x: torch.Tensor) -> np.ndarray:
        return stretch_to_uint8(x.float().cpu().numpy(), lo, hi)

    rows = [np.concatenate([to_u8(images[i, 0]), to_u8(masked[i, 0]), to_u8(recon[i, 0])], axis=1)
            for i in range(images.shape[0])]
    return np.concatenate(rows, axis=0)


def write_preview(model, images: torch.Tensor, path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, reconstruction_grid(model, images, seed))
