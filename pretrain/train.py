"""MAE (+ PAD) pre-training: ``python -m pretrain train --config ... --run-dir DIR [key=value ...]``.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_tools.config import config_hash, save_resolved, to_container
from data_tools.files import sha256_file
from data_tools.transforms import IntensityConfig, RoICropConfig
from pretrain.data import EpochLoader, PretrainStream, StreamConfig, batches_per_epoch, load_shard_set
from pretrain.engine import (Checkpointer, ResumeError, StopSignals, build_engine, deepspeed_config, finish,
                             frozen_fingerprint, init_distributed, lr_at, seed_step, set_lr)
from pretrain.factory import build_model_from_config, initialise_from_config
from pretrain.models.pad import pad_adapters, scale_predictor_trainable, set_scale_predictors_trainable
from pretrain.optim import param_groups

FAULT_ENV = "IRPT_FAULT_SIGKILL_AFTER_STEP"  # fault injection for the resume tests


def _run_dir_decision(run_dir: Path, overwrite: bool, cfg_hash: str) -> tuple[str, str | None]:
    """('resume' | 'fresh' | 'wipe', error or None) for a run directory."""
    if (run_dir / "checkpoints" / "latest").is_file() and not overwrite:
        hash_file = run_dir / "config_hash.txt"
        saved = hash_file.read_text().strip() if hash_file.is_file() else None
        if saved != cfg_hash:
            return "resume", (f"{run_dir} holds a run of another config (hash {saved} != {cfg_hash}); "
                              "use another --run-dir, or --overwrite to discard it")
        return "resume", None
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            return "fresh", (f"{run_dir} is not empty and has no checkpoint to resume from; "
                             "pass --overwrite to start fresh there")
        return "wipe", None
    return "fresh", None


def _prepare_run_dir(run_dir: Path, overwrite: bool, cfg: Any, cfg_hash: str, rank: int) -> bool:
    """Rank 0 decides (resume, start fresh, or refuse) and tells every rank, before anything is
    written, so that no rank sees another's new files. Returns True when resuming."""
    decision = [_run_dir_decision(run_dir, overwrite, cfg_hash) if rank == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    action, error = decision[0]
    if error:
        raise ResumeError(error)
    if rank == 0 and action != "resume":
        if action == "wipe":
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
        (run_dir / "config_hash.txt").write_text(cfg_hash + "\n")
    dist.barrier()
    return action == "resume"


def _stream_config(cfg, micro: int, bpe: int) -> StreamConfig:
    d = to_container(cfg.data)
    roi = dict(d["roi"], output_size=tuple(cfg.model.encoder.img_size))
    for k in ("fallback_scale", "fallback_ratio"):
        roi[k] = tuple(roi[k])
    inten = dict(d["intensity"], percentiles=tuple(d["intensity"]["percentiles"]))
    return StreamConfig(batch_size=micro, batches_per_epoch=bpe,
                        shuffle_buffer=d["shuffle_buffer"], hflip=d["hflip"], mean=d["mean"], std=d["std"],
                        roi=RoICropConfig(**roi), intensity=IntensityConfig(**inten))


class MetricsLog:
    """JSONL metrics (rank 0) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # drop records of steps the resumed run will redo
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception as e:  # TensorBoard is optional at run time
            print(f"warning: no TensorBoard logging ({e})", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


def train(cfg, run_dir: str | Path, overwrite: bool = False) -> None:
    rank, world, device = init_distributed()
    code = 0
    try:
        _train(cfg, Path(run_dir), overwrite, rank, world, device)
    except Exception:
        import traceback
        traceback.print_exc()
        code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a failed rank must not wait in a barrier for the others
    finish(code)


def _train(cfg, run_dir: Path, overwrite: bool, rank: int, world: int, device: torch.device) -> None:
    t, m = cfg.train, cfg.model
    cfg_hash = config_hash(cfg)
    resume = _prepare_run_dir(run_dir, overwrite, cfg, cfg_hash, rank)

    torch.manual_seed(t.seed)  # identical initialisation on every rank
    model = build_model_from_config(cfg)
    report = initialise_from_config(model, cfg)
    if report is not None and rank == 0:
        print(report.summary(), flush=True)
    model.to(device)
    frozen_ref = {"fingerprint": frozen_fingerprint(model),
                  "init_checkpoint": cfg.init.checkpoint,
                  "init_sha256": sha256_file(cfg.init.checkpoint) if cfg.init.checkpoint else None}

    sets = [load_shard_set(s["path"], s.get("weight", 1.0)) for s in to_container(cfg.data.shards)]
    micro = int(t.batch_size)
    accum = int(t.accum_steps)
    if t.effective_batch:
        if t.effective_batch % (micro * world):
            raise ValueError(f"effective_batch {t.effective_batch} is not a multiple of batch_size {micro} x "
                             f"{world} processes")
        accum = t.effective_batch // (micro * world)
    eff = micro * accum * world
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

    depth = model.encoder.blocks.__len__()
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, depth if cfg.optim.layer_decay else None)
    ds_cfg = deepspeed_config(micro, accum, world, t.precision, t.zero_stage, t.grad_clip)
    engine, optimizer = build_engine(model, groups, base_lr, tuple(t.betas), ds_cfg)
    stream_cfg = _stream_config(cfg, micro, micro_per_epoch)
    stream = PretrainStream(sets, stream_cfg, int(t.seed), rank, world)
    loader = EpochLoader(stream, workers)
    ckpt = Checkpointer(run_dir / "checkpoints", int(t.keep_last))

    state = {"step": 0, "epoch": 0, "batch": 0, "positions": [0] * max(workers, 1), "samples_seen": 0,
             "bad_samples": 0, "bad_shards": 0}
    if resume:
        saved = ckpt.load(engine, rank)
        if saved["world_size"] != world:
            raise ResumeError(f"the checkpoint was written by {saved['world_size']} processes, this run has {world}: "
                              "resume with the same number, or export it (python -m pretrain export) and start a "
                              "new run from it with init.checkpoint")
        if saved["config_hash"] != cfg_hash:
            raise ResumeError("the checkpoint's config hash differs from this config")
        if saved["frozen"]["fingerprint"] != frozen_ref["fingerprint"]:
            raise ResumeError(f"frozen weights differ from the checkpoint's reference {saved['frozen']} "
                              "(was init.checkpoint changed or modified?)")
        state = saved["data"]
        if rank == 0:
            print(f"resumed from {ckpt.latest_tag()} at step {state['step']} (epoch {state['epoch']}, "
                  f"micro-batch {state['batch']})", flush=True)

    log = MetricsLog(run_dir, state["step"], rank == 0)
    preview_images = None
    if rank == 0 and t.preview_every_steps:
        from pretrain.preview import fixed_frames, write_preview
        preview_images = fixed_frames(list(sets[0].urls), int(t.preview_frames), tuple(m.encoder.img_size),
                                      stream_cfg.mean, stream_cfg.std, stream_cfg.intensity).to(device)
    samples_log = run_dir / f"samples_rank{rank}.jsonl" if t.record_samples else None
    if samples_log is not None and samples_log.is_file():  # drop steps the resumed run will redo
        keep = [l for l in samples_log.read_text().splitlines() if json.loads(l)["step"] < state["step"]]
        samples_log.write_text("".join(l + "\n" for l in keep))
    signals = StopSignals()
    fault_step = int(os.environ.get(FAULT_ENV, "-1"))
    freeze_frac = float(m.pad.scale_freeze_fraction)

    def save() -> None:
        tag = f"step{state['step']:08d}"
        ckpt.save(engine, tag, rank, {"data": state, "world_size": world, "config_hash": cfg_hash,
                                      "frozen": frozen_ref})

    progress = _progress(total_steps, state["step"], rank == 0)
    while state["step"] < total_steps:
        epoch = state["step"] // steps_per_epoch
        if state["epoch"] != epoch:
            state.update(epoch=epoch, batch=0, positions=[0] * max(workers, 1))
        batches = loader.epoch(epoch, state["batch"], state["positions"] if state["batch"] else None)
        while state["step"] < total_steps and state["step"] // steps_per_epoch == epoch:
            step = state["step"]
            t0 = time.perf_counter()
            set_lr(optimizer, lr_at(step, total_steps, warmup_steps, base_lr, t.min_lr))
            set_scale_predictors_trainable(model, scale_predictor_trainable(step, total_steps, freeze_frac))
            seed_step(int(t.seed), rank, step)
            wait, losses, keys = 0.0, [], []
            for _ in range(accum):
                tw = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - tw
                state["positions"][batch["worker"]] = batch["position"]
                state["batch"] = batch["batch"] + 1
                state["bad_samples"] += batch["bad_samples"]
                state["bad_shards"] += batch["bad_shards"]
                keys += batch["keys"]
                loss, _, _ = engine(batch["images"].to(device, non_blocking=True))
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            state["step"] = step + 1
            state["samples_seen"] += eff
            if samples_log is not None:
                with open(samples_log, "a") as f:
                    f.write(json.dumps({"step": step, "keys": keys}) + "\n")
            if not torch.isfinite(torch.stack(losses)).all():
                raise FloatingPointError(f"non-finite loss at step {step}")
            elapsed = time.perf_counter() - t0
            progress.update(1)
            if state["step"] % int(t.log_every_steps) == 0 or state["step"] == total_steps:
                _log_step(log, model, losses, state, optimizer, eff, elapsed, wait, device)
            if preview_images is not None and (state["step"] % int(t.preview_every_steps) == 0
                                               or state["step"] == total_steps):
                write_preview(model, preview_images, run_dir / "previews" / f"step{state['step']:08d}.png")
            stop = signals.any_rank_requested(device)
            if state["step"] % int(t.save_every_steps) == 0 or state["step"] == total_steps or stop:
                save()
            if state["step"] == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                if rank == 0:
                    print(f"{signals.signal_name or 'stop signal'}: saved step {state['step']}, exiting; "
                          "rerun the same command to resume", flush=True)
                return
    progress.close()
    if rank == 0:
        (run_dir / "DONE").write_text(json.dumps({"steps": total_steps, "samples_seen": state["samples_seen"]}))
        print(f"done: {total_steps} steps, checkpoints in {ckpt.directory}", flush=True)


def _log_step(log: MetricsLog, model, losses, state, optimizer, eff, elapsed, wait, device) -> None:
    loss = torch.stack(losses).float().mean().reshape(1).to(device)
    dist.all_reduce(loss)
    loss = loss.item() / dist.get_world_size()
    scales = [a.last_scale.float() for a in pad_adapters(model) if getattr(a, "last_scale", None) is not None]
    record = {"step": state["step"], "epoch": state["epoch"], "loss": loss,
              "lr": max(g["lr"] for g in optimizer.param_groups),
              "images_per_s": eff / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9),
              "samples_seen": state["samples_seen"], "bad_samples": state["bad_samples"],
              "bad_shards": state["bad_shards"]}
    if device.type == "cuda":
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for i, s in enumerate(scales):
        record[f"pad_scale_mean/{i}"] = s.mean().item()
        record[f"pad_scale_std/{i}"] = s.std().item() if s.numel() > 1 else 0.0
    log.write(record)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled or not sys.stderr.isatty(),
                desc="pretrain")
