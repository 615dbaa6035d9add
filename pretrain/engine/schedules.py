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
               min_lr: float = 0.0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's ``poly`` policy with ``linear`` warm-up, the schedule of the segmentation code of PAD, UNIP
    and Mona (mmsegmentation 0.x): the decay counts from step 0, (base - min) (1 - step / total)^power
    + min, and for the first ``warmup_steps`` that value is scaled linearly from ``warmup_ratio`` to 1
    (so the decay does not restart at the end of the warm-up: MFNet's 1,000 of 9,800 steps end it at
    0.898 x base)."""
    progress = min(step / max(total_steps, 1), 1.0)
    lr = min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr


def step_lr_at(step: int, warmup_steps: int, base_lr: float, milestones: list[int], gamma: float = 0.1,
               warmup_factor: float = 0.001) -> float:
    """detectron2's WarmupMultiStepLR, ViTDet's detection schedule (mmdetection's LinearLR + MultiStepLR
    in IV-tuning's code): ``base_lr`` x ``gamma`` for each milestone reached, scaled during the first
    ``warmup_steps`` linearly from ``warmup_factor`` to 1."""
    lr = base_lr * gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        lr *= warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    return lr


def milestone_steps(milestones: list[int | float], total_steps: int) -> list[int]:
    """Milestones as steps: integers are steps already; shares of the run (floats in (0, 1), as
    ViTDet's 8/9 and 26/27) become the nearest step of ``total_steps``."""
    return [round(m * total_steps) if isinstance(m, float) else int(m) for m in milestones]
