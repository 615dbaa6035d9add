"""MAE (+ PAD) pre-training: ``python -m pretrain train --config ... --run-dir DIR [key=value ...]``.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data_tools.config import to_container
from data_tools.transforms import IntensityConfig, RoICropConfig
from pretrain.data import (PretrainStream, StreamConfig, corpus_order_note, epoch_samples, load_shard_set,
                           micro_batches_per_epoch, network_input)
from pretrain.engine import (EpochLoader, PlanError, Task, TrainingPlan, engine_input, lr_at, param_groups, run,
                             spared_from_decay, training_inputs)
from pretrain.factory import build_model_from_config, initialise_from_config
from pretrain.models.pad import (gated_parameter_names, pad_adapters, scale_predictor_trainable,
                                 set_scale_predictors_trainable)
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


def shard_inputs(sets) -> dict:
    """The training data of a checkpoint: every shard of every set, with its sample count and the
    set's weight (a rebuilt or extended corpus differs)."""
    items = [f"{s.name} {s.weight:g} {Path(url).name} {count}"
             for s in sets for url, count in zip(s.urls, s.shard_samples or (None,) * len(s.urls))]
    return training_inputs("samples in shards", sum(s.samples for s in sets), items)


class PretrainTask(Task):
    """MAE loss on a batch of object-sensitive crops; cosine lr scaled by the effective batch;
    PAD's scale-predictor gate; reconstruction previews; PAD's per-block scale statistics."""

    name = "pretrain"
    schema = PretrainConfig

    def check_inputs(self, cfg, eval_only=False):
        """Shard folders are given, each once, and each holds a finished build (a parent folder given
        names the builds below it)."""
        from data_tools.manifest import read_manifest

        if not cfg.data.shards:
            raise ValueError('data.shards is empty: name the folders `python -m data_tools build` wrote, e.g. '
                             '"data.shards=[{path: shards/msip}]"')
        first: dict[Path, int] = {}
        for i, shard_set in enumerate(cfg.data.shards):
            read_manifest(shard_set.path)
            folder = Path(shard_set.path).resolve()
            if folder in first:
                raise ValueError(f"data.shards[{first[folder]}] and data.shards[{i}] are the same folder {folder}: "
                                 "its samples would be read twice per epoch; give it once, with a weight to sample "
                                 "it more often")
            first[folder] = i

    def build_model(self, cfg, where):
        model = build_model_from_config(cfg)
        report = initialise_from_config(model, cfg)
        if report is not None and where.is_main:
            print(report.summary(), flush=True)
        return model

    def param_groups(self, model, cfg):
        o, depth = cfg.optim, len(model.encoder.blocks)
        # MAE's and PAD's layer-decay groups (their lr_decay.param_groups_lrd) spare the encoder's
        # no_weight_decay() names; their plain groups (timm's add_weight_decay) do not.
        spared = spared_from_decay(model.encoder) if o.layer_decay else set()
        return param_groups(model, o.weight_decay, o.layer_decay, depth if o.layer_decay else None,
                            gates={"scale_predictor": gated_parameter_names(model)}, no_decay=spared)

    def training_plan(self, model, cfg, batching, where):
        t, micro, accum = cfg.train, batching.micro, batching.accum
        self.sets = [load_shard_set(s["path"], s.get("weight", 1.0)) for s in to_container(cfg.data.shards)]
        workers = int(cfg.data.num_workers)
        micro_per_epoch = micro_batches_per_epoch(self.sets, cfg.data.samples_per_epoch, where.world, micro, accum)
        if micro_per_epoch < 1:
            raise PlanError(
                f"an epoch of {epoch_samples(self.sets, cfg.data.samples_per_epoch)} samples holds fewer than {accum} "
                f"micro-batches of {micro} per process (one step of {accum} accumulation), the least it needs: lower "
                f"train.effective_batch (now {batching.effective}) or set data.samples_per_epoch="
                f"{accum * micro * where.world} or more (the corpus then repeats within an epoch)")
        steps_per_epoch = micro_per_epoch // accum
        self.total_steps = int(t.epochs * steps_per_epoch)
        o = cfg.optim
        self.warmup_steps = int(o.warmup_epochs * steps_per_epoch)
        self.base_lr = o.blr * batching.effective / 256  # MAE's linear scaling rule
        if where.is_main and (note := corpus_order_note(self.sets)):
            print(note, flush=True)
        if where.is_main:
            total, used = epoch_samples(self.sets, cfg.data.samples_per_epoch), micro_per_epoch * micro * where.world
            left = "" if used >= total else (
                f"; {used:,} of the {total:,} samples of an epoch (whole steps of {accum * micro} samples per process; "
                f"which ones fall out changes with each epoch's shard order)")
            print(f"effective batch {batching.said()}; "
                  f"lr = blr {o.blr:g} x {batching.effective}/256 = {self.base_lr:.3e}; {steps_per_epoch} steps/epoch, "
                  f"{self.total_steps} steps, {self.warmup_steps} warm-up{left}", flush=True)
        self.stream_cfg = _stream_config(cfg, micro, micro_per_epoch)
        loader = EpochLoader(PretrainStream(self.sets, self.stream_cfg, int(t.seed), where.rank, where.world),
                             workers, int(cfg.data.prefetch_factor), cfg.data.pin_memory)
        return TrainingPlan(loader, steps_per_epoch, self.total_steps, shard_inputs(self.sets))

    def start(self, model, optimizer, plan, cfg, where):
        self.model, self.cfg, self.device, self.run_dir = model, cfg, where.device, where.run_dir
        self.optimizer = optimizer  # the gate holds W_s back in the optimiser too
        t = cfg.train
        self.preview_images = None
        if where.is_main and t.preview_every_steps:
            from pretrain.preview import fixed_frames
            self.preview_images = fixed_frames(list(self.sets[0].urls), int(t.preview_frames),
                                               tuple(cfg.model.encoder.img_size), self.stream_cfg.mean,
                                               self.stream_cfg.std, self.stream_cfg.intensity).to(where.device)

    def learning_rate(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.cfg.optim.min_lr)

    def begin_step(self, step: int) -> None:
        trainable = scale_predictor_trainable(step, self.total_steps, float(self.cfg.model.pad.scale_freeze_fraction))
        set_scale_predictors_trainable(self.model, trainable, self.optimizer)

    def forward(self, engine, batch: dict) -> torch.Tensor:
        images = batch["images"].to(self.device, non_blocking=True)
        loss, _, _ = engine(engine_input(engine, network_input(images, float(self.cfg.data.mean),
                                                               float(self.cfg.data.std))))
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
    run(PretrainTask(), cfg, run_dir, overwrite)
