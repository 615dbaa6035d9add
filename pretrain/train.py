"""MAE (+ PAD) pre-training: ``python -m pretrain train --config ... --run-dir DIR [key=value ...]``.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data_tools.config import check_config, config_hash, to_container
from data_tools.transforms import IntensityConfig, RoICropConfig
from pretrain.data import (EpochLoader, PretrainStream, StreamConfig, batches_per_epoch, load_shard_set,
                           network_input)
from pretrain.engine import Checkpointer, build_engine, deepspeed_config, lr_at
from pretrain.factory import build_model_from_config, initialise_from_config
from pretrain.health import HealthPolicy
from pretrain.loop import (LoopSpec, Task, frozen_reference, new_state, prepare_run_dir,
                           resolve_batching, resume_state, run_entry_point, train_steps)
from pretrain.models.pad import (gated_parameter_names, pad_adapters, scale_predictor_trainable,
                                 set_scale_predictors_trainable)
from pretrain.optim import param_groups
from pretrain.schema import PretrainConfig


def _stream_config(cfg, micro: int, bpe: int) -> StreamConfig:
    d = to_container(cfg.data)
    roi = dict(d["roi"], output_size=tuple(cfg.model.encoder.img_size))
    for k in ("fallback_scale", "fallback_ratio"):
        roi[k] = tuple(roi[k])
    inten = dict(d["intensity"], percentiles=tuple(d["intensity"]["percentiles"]))
    return StreamConfig(batch_size=micro, batches_per_epoch=bpe,
                        shuffle_buffer=d["shuffle_buffer"], hflip=d["hflip"], mean=d["mean"], std=d["std"],
                        roi=RoICropConfig(**roi), intensity=IntensityConfig(**inten))


class PretrainTask(Task):
    """MAE loss on a batch of crops; cosine lr; PAD's scale-predictor gate; previews; PAD scale logs."""

    def __init__(self, model, cfg, total_steps: int, warmup_steps: int, base_lr: float, device, run_dir: Path,
                 preview_images):
        self.model, self.cfg, self.device, self.run_dir = model, cfg, device, run_dir
        self.total_steps, self.warmup_steps, self.base_lr = total_steps, warmup_steps, base_lr
        self.preview_images = preview_images

    def learning_rate(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.cfg.train.min_lr)

    optimizer = None  # set once the engine exists: the gate holds W_s back in the optimiser too

    def begin_step(self, step: int) -> None:
        trainable = scale_predictor_trainable(step, self.total_steps, float(self.cfg.model.pad.scale_freeze_fraction))
        set_scale_predictors_trainable(self.model, trainable, self.optimizer)

    def forward(self, engine, batch: dict) -> torch.Tensor:
        images = batch["images"].to(self.device, non_blocking=True)
        loss, _, _ = engine(network_input(images, float(self.cfg.data.mean), float(self.cfg.data.std)))
        return loss

    def log_fields(self) -> dict:
        record = {}
        scales = [a.last_scale.float() for a in pad_adapters(self.model) if getattr(a, "last_scale", None) is not None]
        for i, s in enumerate(scales):
            record[f"pad_scale_mean/{i}"] = s.mean().item()
            record[f"pad_scale_std/{i}"] = s.std().item() if s.numel() > 1 else 0.0
        return record

    def end_step(self, step: int) -> None:
        every = int(self.cfg.train.preview_every_steps)
        if self.preview_images is not None and (step % every == 0 or step == self.total_steps):
            from pretrain.preview import write_preview
            write_preview(self.model, self.preview_images, self.run_dir / "previews" / f"step{step:08d}.png")


def train(cfg, run_dir: str | Path, overwrite: bool = False) -> None:
    check_config(cfg, PretrainConfig)  # before the run directory is touched
    run_entry_point(_train, cfg, Path(run_dir), overwrite)


def _train(rank: int, world: int, device: torch.device, cfg, run_dir: Path, overwrite: bool) -> bool:
    """False when a preemption signal stopped the run (after saving)."""
    t, m = cfg.train, cfg.model
    cfg_hash = config_hash(cfg)
    resume = prepare_run_dir(run_dir, overwrite, cfg, cfg_hash, rank)

    torch.manual_seed(t.seed)  # identical initialisation on every rank
    model = build_model_from_config(cfg)
    report = initialise_from_config(model, cfg)
    if report is not None and rank == 0:
        print(report.summary(), flush=True)
    model.to(device)
    frozen_ref = frozen_reference(model, cfg.init.checkpoint)

    sets = [load_shard_set(s["path"], s.get("weight", 1.0)) for s in to_container(cfg.data.shards)]
    batching = resolve_batching(t, world)
    micro, accum, eff = batching.micro, batching.accum, batching.effective
    workers = int(cfg.data.num_workers)
    # Micro-batches per epoch and rank: a multiple of accumulation x loader workers, so that every
    # loader slot needs the same number of samples (no slot re-reads samples within an epoch).
    unit = accum * max(workers, 1)
    micro_per_epoch = batches_per_epoch(sets, cfg.data.samples_per_epoch, world, micro) // unit * unit
    if micro_per_epoch < 1:
        raise ValueError(f"an epoch holds fewer than {unit} micro-batches of {micro} per process "
                         f"({accum} accumulation x {max(workers, 1)} loader workers): use fewer workers or smaller batches")
    steps_per_epoch = micro_per_epoch // accum
    total_steps = int(t.epochs * steps_per_epoch)
    warmup_steps = int(t.warmup_epochs * steps_per_epoch)
    base_lr = t.blr * eff / 256
    if rank == 0:
        print(f"effective batch {eff} = {micro} x {accum} accumulation x {world} processes; "
              f"lr = blr {t.blr:g} x {eff}/256 = {base_lr:.3e}; {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps, {warmup_steps} warm-up", flush=True)

    depth = len(model.encoder.blocks)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, depth if cfg.optim.layer_decay else None,
                          gates={"scale_predictor": gated_parameter_names(model)})
    ds_cfg = deepspeed_config(micro, accum, world, t.precision, t.zero_stage, t.grad_clip)
    engine, optimizer = build_engine(model, groups, base_lr, tuple(t.betas), ds_cfg)
    stream_cfg = _stream_config(cfg, micro, micro_per_epoch)
    loader = EpochLoader(PretrainStream(sets, stream_cfg, int(t.seed), rank, world), workers,
                         int(cfg.data.prefetch_factor), cfg.data.pin_memory)
    ckpt = Checkpointer(run_dir / "checkpoints", int(t.keep_last))
    state = resume_state(ckpt, engine, rank, world, cfg_hash, frozen_ref) if resume else new_state(workers)

    preview_images = None
    if rank == 0 and t.preview_every_steps:
        from pretrain.preview import fixed_frames
        preview_images = fixed_frames(list(sets[0].urls), int(t.preview_frames), tuple(m.encoder.img_size),
                                      stream_cfg.mean, stream_cfg.std, stream_cfg.intensity).to(device)
    task = PretrainTask(model, cfg, total_steps, warmup_steps, base_lr, device, run_dir, preview_images)
    task.optimizer = optimizer
    spec = LoopSpec(total_steps=total_steps, steps_per_epoch=steps_per_epoch, batching=batching, seed=int(t.seed),
                    num_workers=workers, log_every=int(t.log_every_steps), save_every=int(t.save_every_steps),
                    record_samples=bool(t.record_samples), health=HealthPolicy.from_config(t), desc="pretrain")
    finished = train_steps(task, engine, optimizer, loader, ckpt, state, spec, run_dir, rank, device,
                           {"config_hash": cfg_hash, "frozen": frozen_ref})
    if finished and rank == 0:
        (run_dir / "DONE").write_text(json.dumps({"steps": total_steps, "samples_seen": state["samples_seen"]}))
        print(f"done: {total_steps} steps, checkpoints in {ckpt.directory}", flush=True)
    return finished
