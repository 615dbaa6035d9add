"""Semantic segmentation fine-tuning: ``python -m finetune seg --config ... --run-dir DIR [key=value ...]``.

Trains with the shared loop (DeepSpeed, checkpoints, exact resume, JSONL / TensorBoard), then
evaluates the validation split by sliding-window inference: ``metrics.json`` (mIoU, per-class
IoU, pixel accuracy from a confusion matrix summed over ranks), overlay PNGs, data reports.
Re-running the same command resumes training, or re-evaluates a finished run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_tools.config import config_hash, to_container
from finetune.factory import build_segmentor, parameter_report, seg_dataset
from pretrain.data import EpochLoader, _ignore_preemption_signals
from pretrain.engine import Checkpointer, build_engine, deepspeed_config, poly_lr_at
from pretrain.loop import (LoopSpec, Task, frozen_reference, new_state, prepare_run_dir, resolve_batching,
                           resume_state, run_entry_point, train_steps)
from pretrain.optim import param_groups
from finetune.data.pairs import write_report
from finetune.data.stream import MapBatchStream


class SegTask(Task):
    def __init__(self, cfg, total_steps: int, device: torch.device):
        self.cfg, self.total_steps, self.device = cfg, total_steps, device

    def learning_rate(self, step: int) -> float:
        o = self.cfg.optim
        return poly_lr_at(step, self.total_steps, int(o.warmup_steps), float(o.lr), float(o.poly_power), float(o.min_lr))

    def forward(self, engine, batch: dict) -> torch.Tensor:
        get = (lambda k: batch[k].to(self.device, non_blocking=True) if k in batch else None)
        return engine(get("ir"), get("vi"), get("label"))


def train_seg(cfg, run_dir: str | Path, overwrite: bool = False) -> None:
    run_entry_point(_train_seg, cfg, Path(run_dir), overwrite)


def _data(cfg, split: str, run_dir: Path, rank: int):
    dataset, issues, found = seg_dataset(cfg, split)
    if rank == 0:
        report = write_report(run_dir / f"data_report_{split}.json", split, found, len(dataset), issues)
        print(f"{split}: {len(dataset)} of {found} frames used, left out {report['issues_by_reason'] or 'none'} "
              f"(names in {run_dir / f'data_report_{split}.json'})", flush=True)
    return dataset


def _train_seg(rank: int, world: int, device: torch.device, cfg, run_dir: Path, overwrite: bool) -> None:
    t = cfg.train
    cfg_hash = config_hash(cfg)
    resume = prepare_run_dir(run_dir, overwrite, cfg, cfg_hash, rank)
    train_set = _data(cfg, "train", run_dir, rank)

    torch.manual_seed(int(t.seed))  # identical initialisation on every rank
    model = build_segmentor(cfg)
    if rank == 0:
        if model.backbone.load_report is not None:
            print(model.backbone.load_report.summary(), flush=True)
        report = parameter_report(model)
        (run_dir / "params.json").write_text(json.dumps(report, indent=1))
        print(f"method {cfg.model.method}: {report['trainable_backbone']:,} of {report['backbone_total']:,} backbone "
              f"parameters train ({100 * report['trainable_backbone_share']:.2f}%), head {report['trainable_head']:,}",
              flush=True)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    frozen_ref = frozen_reference(model, cfg.init.checkpoint)

    batching = resolve_batching(t, world)
    workers = int(cfg.data.num_workers)
    stream = MapBatchStream(train_set, batching.micro, int(t.seed), rank, world)
    steps_per_epoch = max(stream.batches_per_epoch // batching.accum, 1)
    total_steps = int(t.steps)
    if rank == 0:
        print(f"effective batch {batching.effective} = {batching.micro} x {batching.accum} accumulation x {world} "
              f"processes; {steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)
    o = cfg.optim
    layer_decay = o.layer_decay if cfg.model.method in ("full", "pad") else None
    depth = len(model.backbone.encoder.blocks)
    groups = param_groups(model, float(o.weight_decay), layer_decay, depth if layer_decay else None,
                          prefix="backbone.encoder.")
    ds_cfg = deepspeed_config(batching.micro, batching.accum, world, t.precision, t.zero_stage, t.grad_clip)
    engine, optimizer = build_engine(model, groups, float(o.lr), tuple(o.betas), ds_cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", int(t.keep_last))
    state = resume_state(ckpt, engine, rank, world, cfg_hash, frozen_ref) if resume else new_state(workers)
    loader = EpochLoader(stream, workers)
    spec = LoopSpec(total_steps=total_steps, steps_per_epoch=steps_per_epoch, batching=batching, seed=int(t.seed),
                    num_workers=workers, log_every=int(t.log_every_steps), save_every=int(t.save_every_steps),
                    record_samples=bool(t.record_samples), desc=f"seg {cfg.model.method}")
    if not train_steps(SegTask(cfg, total_steps, device), engine, optimizer, loader, ckpt, state, spec, run_dir,
                       rank, device, {"config_hash": cfg_hash, "frozen": frozen_ref}):
        return  # stopped by a signal after saving
    metrics = evaluate(model, cfg, _data(cfg, "val", run_dir, rank), device, rank, world, run_dir)
    if rank == 0:
        metrics.update(steps=total_steps, method=cfg.model.method, modality=cfg.model.modality,
                       params={k: v for k, v in report.items() if k != "per_module"})
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (run_dir / "DONE").write_text(json.dumps({"steps": total_steps}))
        print(f"mIoU {100 * metrics['mIoU']:.2f}, pixel accuracy {100 * metrics['pixel_accuracy']:.2f} on "
              f"{metrics['frames']} frames; {run_dir / 'metrics.json'}", flush=True)


class _EvalFrames(torch.utils.data.Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset.eval_sample(self.indices[i])
        return dict({k: torch.from_numpy(v)[None] for k, v in s.items() if k != "name"}, name=s["name"])


@torch.no_grad()
def evaluate(model, cfg, dataset, device: torch.device, rank: int, world: int, run_dir: Path) -> dict:
    """Sliding-window inference on this rank's share of the frames; the confusion matrix is summed
    over ranks. Rank 0 writes overlays of its first ``eval.overlays`` frames."""
    from finetune.metrics import confusion_matrix, reduce_confusion, segmentation_metrics
    from finetune.models.segmentor import slide_inference
    from finetune.overlay import write_seg_overlay

    model.eval()
    k, ignore = len(cfg.data.classes), int(cfg.data.ignore_index)
    crop = tuple(cfg.model.encoder.img_size)
    stride = tuple(cfg.eval.stride) if cfg.eval.stride else tuple(max(1, 2 * c // 3) for c in crop)
    indices = list(range(rank, len(dataset), world))
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        _EvalFrames(dataset, indices), batch_size=None, num_workers=workers,
        multiprocessing_context="spawn" if workers else None,
        worker_init_fn=_ignore_preemption_signals if workers else None)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision != "fp32")
    for n, sample in enumerate(loader):
        get = (lambda key: sample[key].to(device) if key in sample else None)
        with autocast:
            scores = slide_inference(model, get("ir"), get("vi"), crop, stride)
        pred = scores.argmax(dim=1)[0]
        label = get("label")[0]
        cm += confusion_matrix(pred, label, k, ignore)
        if rank == 0 and n < int(cfg.eval.overlays):
            write_seg_overlay(run_dir / "overlays" / f"{sample['name']}.png", sample, pred.cpu().numpy(),
                              label.cpu().numpy(), ignore)
    cm = reduce_confusion(cm)
    frames = torch.tensor([len(indices)], device=device)
    if dist.is_initialized():
        dist.all_reduce(frames)
    metrics = segmentation_metrics(cm.cpu(), list(cfg.data.classes))
    metrics["frames"] = int(frames.item())
    metrics["confusion_matrix"] = cm.cpu().tolist()
    return metrics
