"""The optimiser side of a run: MAE's parameter groups (weight-decay rule, optional layer-wise lr
decay), the DeepSpeed config and engine around a torch AdamW, gated groups and held updates."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def engine_input(engine, images: torch.Tensor) -> torch.Tensor:
    """An image batch in the dtype of the engine's weights. DeepSpeed's ``bf16`` mode holds the
    model in bf16 but casts no inputs (only its fp16 mode has ``auto_cast``), and a float32 image
    into a bf16 convolution raises. Only images: targets (box coordinates) keep their precision."""
    return images.to(torch.bfloat16) if engine.bfloat16_enabled() and images.is_floating_point() else images


def no_weight_decay(name: str, ndim: int) -> bool:
    """MAE / timm rule: no decay on biases and 1-D parameters (norms, layer scales)."""
    return ndim <= 1 or name.endswith(".bias")


def spared_from_decay(encoder: nn.Module, prefix: str = "encoder.") -> set[str]:
    """The encoder's ``no_weight_decay()`` names (timm: CLS token, position embedding) as parameter
    names of the model it sits in: MAE's layer-decay groups, its fine-tuning and mmsegmentation's /
    detectron2's ViT recipes exempt them from weight decay."""
    return {prefix + n for n in encoder.no_weight_decay()}


def layer_id(name: str, num_layers: int, prefix: str = "encoder.") -> int:
    """0 for the embeddings, i + 1 for encoder block i, num_layers + 1 for everything after
    (heads, decoders). ``prefix``: where the encoder sits in the model's parameter names."""
    if name.startswith(tuple(prefix + k for k in ("cls_token", "pos_embed", "patch_embed"))):
        return 0
    if name.startswith(prefix + "blocks."):
        return int(name[len(prefix + "blocks."):].split(".")[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 num_layers: int | None = None, prefix: str = "encoder.",
                 gates: dict[str, set[str]] | None = None, no_decay: set[str] = frozenset()) -> list[dict]:
    """Groups of trainable parameters with their weight decay and lr scale (``lr_scale``).
    ``gates`` (gate name -> parameter names) puts those parameters in groups of their own with
    ``gate`` set, so that an optimiser can hold them back as a whole (PAD's scale predictor).
    ``no_decay``: names without weight decay besides biases and 1-D parameters."""
    gate_of = {n: gate for gate, names in (gates or {}).items() for n in names}
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers")
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if no_weight_decay(name, p.ndim) or name in no_decay else weight_decay
        lid = layer_id(name, num_layers, prefix) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        gate = gate_of.get(name)
        g = groups.setdefault((wd, lid, gate), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale,
                                                "gate": gate})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def group_layout(groups: list[dict]) -> list[list[str]]:
    """The parameter names of each optimiser group, in order: an optimiser's saved state (AdamW's
    moments) is matched to parameters by these positions when a checkpoint is loaded."""
    return [list(g["names"]) for g in groups]


def group_layout_problem(then: list[list[str]] | None, now: list[list[str]]) -> str | None:
    """Why optimiser state saved under the group layout ``then`` cannot be loaded into ``now`` (None:
    it can, or the checkpoint recorded no layout). A layout changes when the code groups the
    parameters otherwise (their weight decay, lr scale or gate) or trains another set; loaded by
    position, the saved moments would land on other parameters, of other shapes or none."""
    if then is None or then == now:
        return None
    place_then = {n: (i, j) for i, names in enumerate(then) for j, n in enumerate(names)}
    place_now = {n: (i, j) for i, names in enumerate(now) for j, n in enumerate(names)}
    dropped = [n for n in place_then if n not in place_now]
    added = [n for n in place_now if n not in place_then]
    moved = [n for n in place_now if n in place_then and place_then[n] != place_now[n]]
    said = [f"{what} {len(names)} (e.g. {', '.join(names[:3])})"
            for what, names in (("no longer trained:", dropped), ("trained now:", added),
                                ("in another optimiser group:", moved)) if names]
    return ("the optimiser's parameter groups differ from the checkpoint's (" + "; ".join(said) + "): its AdamW "
            "state is matched to the parameters by position and would land on others. This version of the code "
            "groups or trains the parameters otherwise (weight decay, learning-rate scale, what trains): resume "
            "with the version that wrote the run, or start again with --overwrite")


def deepspeed_config(micro_batch: int, accum_steps: int, world_size: int, precision: str, zero_stage: int,
                     grad_clip: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16_autocast":  # fp32 weights, bf16 matmuls (MAE's recipe, without fp16 NaNs)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16":  # bf16 weights with fp32 master copies in the optimiser
        cfg["bf16"] = {"enabled": True}
    elif precision != "fp32":
        raise ValueError(f"precision must be bf16_autocast, bf16 or fp32, got {precision!r}")
    return cfg


class UpdateHold:
    """Set ``everything`` before a step's last micro-batch to make that step's optimiser update
    a no-op on every parameter (no weight change, no AdamW state or step count): how the loop
    drops the update of a step with a non-finite loss."""

    def __init__(self):
        self.everything = False


def hold_gated_groups(optimizer: torch.optim.Optimizer, hold: UpdateHold | None = None) -> torch.optim.Optimizer:
    """Make ``optimizer`` leave every parameter group marked ``gated`` untouched (and every group
    while ``hold.everything``). DeepSpeed hands a parameter without gradient a zero gradient (to
    keep ranks in step), and AdamW would then count steps and decay it; a gated group is skipped
    as if it had no gradient at all. Step hooks rather than a subclass: DeepSpeed's ZeRO accepts
    only the optimiser classes it knows, and its own loss-scale skip exists for fp16 only."""
    held: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def before(opt, args, kwargs):
        everything = hold is not None and hold.everything
        held[:] = [(p, p.grad) for g in opt.param_groups if everything or g.get("gated") for p in g["params"]]
        for p, _ in held:
            p.grad = None  # AdamW skips parameters without a gradient: no state, no decay

    def after(opt, args, kwargs):
        for p, grad in held:
            p.grad = grad
        held.clear()

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def build_engine(model: torch.nn.Module, groups: list[dict], betas: tuple[float, float], ds_cfg: dict):
    """DeepSpeed engine around ``model`` with a torch AdamW (no extension to compile). A group
    with a ``gate`` name keeps it (and ``gated``, False until a task closes the gate);
    ``engine.update_hold`` drops a whole step's update. The learning rate starts at 0: the loop
    sets it before every step."""
    import deepspeed

    opt_groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": 0.0,
                   "lr_scale": g.get("lr_scale", 1.0), "gate": g.get("gate"), "gated": False} for g in groups]
    hold = UpdateHold()
    optimizer = hold_gated_groups(torch.optim.AdamW(opt_groups, lr=0.0, betas=tuple(betas)), hold)
    params = [p for g in groups for p in g["params"]]
    engine, wrapped, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                 model_parameters=params)
    uncount_steps_taken_while_wrapping(optimizer)
    engine.update_hold = hold
    return engine, wrapped


def uncount_steps_taken_while_wrapping(optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's bf16 optimiser without ZeRO (``train.precision=bf16``) makes AdamW's state as it
    wraps it, with one step on zero gradients: at learning rate 0 that step moved no weight (weight
    decay included), but AdamW counted it, and its bias correction would take the first real step
    for the second (AdamW's, and so MAE's and PAD's, count starts at 1). Zero moments at count 0 are
    a fresh state."""
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
