"""Learning-rate schedules as functions of the global step."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up, then half-cycle cosine to ``min_lr``, as a function of the global step."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def poly_lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, power: float = 1.0,
               min_lr: float = 0.0) -> float:
    """Linear warm-up, then polynomial decay to ``min_lr`` (mmsegmentation's schedule)."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power


def step_lr_at(step: int, warmup_steps: int, base_lr: float, milestones: list[int], gamma: float = 0.1) -> float:
    """Linear warm-up, then ``base_lr`` x ``gamma`` for each milestone reached (detectron2's
    WarmupMultiStepLR, ViTDet's detection schedule)."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    return base_lr * gamma ** sum(step >= m for m in milestones)
