"""The fine-tuning run shared by segmentation and detection: data reports, model, parameter
report, DeepSpeed engine, the shared training loop (exact resume), then evaluation on the
validation split and ``metrics.json``. A task definition supplies what differs."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import torch

from data_tools.config import check_config, config_hash
from finetune.data.pairs import write_report
from finetune.data.stream import MapBatchStream
from finetune.factory import parameter_report
from pretrain.data import EpochLoader, _ignore_preemption_signals
from pretrain.engine import Checkpointer, ResumeError, build_engine, deepspeed_config, poly_lr_at
from pretrain.health import HealthPolicy
from pretrain.loop import (LoopSpec, Task, frozen_reference, new_state, prepare_run_dir, resolve_batching,
                           resume_state, run_entry_point, train_steps, weights_for_evaluation)
from pretrain.optim import param_groups


class FinetuneTask(Task):
    def __init__(self, cfg, total_steps: int, device: torch.device, targets: Callable):
        self.cfg, self.total_steps, self.device, self.targets = cfg, total_steps, device, targets

    def learning_rate(self, step: int) -> float:
        o = self.cfg.optim
        return poly_lr_at(step, self.total_steps, int(o.warmup_steps), float(o.lr), float(o.poly_power), float(o.min_lr))

    def forward(self, engine, batch: dict) -> torch.Tensor:
        get = (lambda k: batch[k].to(self.device, non_blocking=True) if k in batch else None)
        return engine(get("ir"), get("vi"), self.targets(batch, self.device))


def load_split(cfg, split: str, run_dir: Path, rank: int, build: Callable):
    """``build(cfg, split)`` -> (dataset, issues, frames found); rank 0 writes the data report."""
    dataset, issues, found = build(cfg, split)
    if rank == 0:
        path = run_dir / f"data_report_{split}.json"
        report = write_report(path, split, found, len(dataset), issues)
        print(f"{split}: {len(dataset)} of {found} frames used; issues {report['issues_by_reason'] or 'none'} "
              f"(names in {path})", flush=True)
    return dataset


class _EvalFrames(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset.eval_sample(self.indices[i])


def _as_is(sample):
    return sample


def eval_loader(dataset, indices: list[int], workers: int):
    """This rank's frames, one at a time, read by spawned workers that ignore preemption signals."""
    return torch.utils.data.DataLoader(_EvalFrames(dataset, indices), batch_size=None, num_workers=workers,
                                       collate_fn=_as_is, multiprocessing_context="spawn" if workers else None,
                                       worker_init_fn=_ignore_preemption_signals if workers else None)


def run_finetune(cfg, run_dir: Path, overwrite: bool, eval_only: bool, schema, **task) -> None:
    """Check ``cfg`` against ``schema``, then train and evaluate (or only evaluate) in every
    process of the launch and end the process. ``task``: the keyword arguments of
    :func:`train_and_evaluate` that define seg or det."""
    check_config(cfg, schema)  # before the run directory is touched
    run_entry_point(functools.partial(train_and_evaluate, eval_only=eval_only, **task), cfg, run_dir, overwrite)


def train_and_evaluate(rank: int, world: int, device: torch.device, cfg, run_dir: Path, overwrite: bool, *,
                       kind: str, build_model: Callable, build_data: Callable, targets: Callable,
                       evaluate: Callable, describe: Callable, eval_only: bool = False) -> bool | None:
    """``describe(metrics)``: the one-line result printed at the end. ``eval_only``: evaluate the
    latest checkpoint of the run with any number of processes, without training. False when a
    preemption signal stopped training (after saving)."""
    t = cfg.train
    cfg_hash = config_hash(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", int(t.keep_last))
    if eval_only and overwrite:
        raise ResumeError("--eval-only and --overwrite exclude each other")
    if eval_only and ckpt.latest_tag() is None:  # refused before anything is written
        raise ResumeError(f"--eval-only needs a trained run in {run_dir} (no checkpoint there)")
    resume = prepare_run_dir(run_dir, overwrite, cfg, cfg_hash, rank)

    torch.manual_seed(int(t.seed))  # identical initialisation on every rank
    model = build_model(cfg)
    report = parameter_report(model)
    if rank == 0:
        if model.backbone.load_report is not None:
            print(model.backbone.load_report.summary(), flush=True)
        (run_dir / "params.json").write_text(json.dumps(report, indent=1))
        print(f"{kind} {cfg.model.method}: {report['trainable_backbone']:,} of {report['backbone_total']:,} backbone "
              f"parameters train ({100 * report['trainable_backbone_share']:.2f}%), head {report['trainable_head']:,}",
              flush=True)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    frozen_ref = frozen_reference(model, cfg.init.checkpoint)

    batching = resolve_batching(t, world)
    workers = int(cfg.data.num_workers)
    o = cfg.optim
    layer_decay = o.layer_decay if cfg.model.method in ("full", "pad") else None
    depth = len(model.backbone.encoder.blocks)
    groups = param_groups(model, float(o.weight_decay), layer_decay, depth if layer_decay else None,
                          prefix=model.backbone_prefix + "encoder.")
    ds_cfg = deepspeed_config(batching.micro, batching.accum, world, t.precision, t.zero_stage, t.grad_clip)
    engine, optimizer = build_engine(model, groups, float(o.lr), tuple(o.betas), ds_cfg)
    if eval_only:
        state = weights_for_evaluation(ckpt, engine, cfg_hash, frozen_ref)
        if rank == 0:
            print(f"evaluating {ckpt.latest_tag()} (step {state['step']}) with {world} processes", flush=True)
        return _evaluate_and_report(model, cfg, run_dir, rank, world, device, kind, build_data, evaluate, describe,
                                    report, state["step"])
    train_set = load_split(cfg, "train", run_dir, rank, build_data)
    stream = MapBatchStream(train_set, batching.micro, int(t.seed), rank, world)
    steps_per_epoch = max(stream.batches_per_epoch // batching.accum, 1)
    total_steps = int(t.steps)
    if rank == 0:
        print(f"effective batch {batching.effective} = {batching.micro} x {batching.accum} accumulation x {world} "
              f"processes; {steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)
    state = resume_state(ckpt, engine, rank, world, cfg_hash, frozen_ref) if resume else new_state(workers)
    spec = LoopSpec(total_steps=total_steps, steps_per_epoch=steps_per_epoch, batching=batching, seed=int(t.seed),
                    num_workers=workers, log_every=int(t.log_every_steps), save_every=int(t.save_every_steps),
                    record_samples=bool(t.record_samples), health=HealthPolicy.from_config(t), desc=f"{kind} {cfg.model.method}")
    if not train_steps(FinetuneTask(cfg, total_steps, device, targets), engine, optimizer,
                       EpochLoader(stream, workers), ckpt, state, spec, run_dir, rank, device,
                       {"config_hash": cfg_hash, "frozen": frozen_ref}):
        return False  # stopped by a signal after saving
    _evaluate_and_report(model, cfg, run_dir, rank, world, device, kind, build_data, evaluate, describe, report,
                         total_steps)


def _evaluate_and_report(model, cfg, run_dir: Path, rank: int, world: int, device: torch.device, kind: str,
                         build_data: Callable, evaluate: Callable, describe: Callable, report: dict,
                         steps: int) -> None:
    metrics = evaluate(model, cfg, load_split(cfg, "val", run_dir, rank, build_data), device, rank, world, run_dir)
    if rank == 0:
        metrics.update(task=kind, steps=steps, method=cfg.model.method, modality=cfg.model.modality,
                       processes=world, params={k: v for k, v in report.items() if k != "per_module"})
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (run_dir / "DONE").write_text(json.dumps({"steps": steps}))
        print(f"{describe(metrics)} on {metrics['frames']} frames; {run_dir / 'metrics.json'}", flush=True)
